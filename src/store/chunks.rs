//! State format 3's layout of a key's open events, so that a commit writes about as many
//! events per key as the interval added, not every event the key holds: full chunks of
//! [`CHUNK_EVENTS`] events in records of their own, written once; the rest with the key
//! state, in its record.
//!
//! **Chunks.** The events of an open session (a contiguous run of [`KeyState::events`]) are cut
//! into chunks from the session's first event: chunk `i` of session `num` holds its events
//! `i * CHUNK_EVENTS ..`. Every full chunk ("sealed") is a record of its own, id `(num, i)`;
//! the last, partial one (the session's "tail", up to `CHUNK_EVENTS - 1` events) is written
//! with the key state, after it, in the key's record ([`encode_tails`]). The key state says
//! which sealed chunks exist, through its sessions' numbers and counts. Appending an event
//! rewrites the key record (its session's tail) and, once every `CHUNK_EVENTS` events, seals
//! a chunk; concluding a session deletes its chunks and leaves the other sessions' alone. So a
//! key touched by a commit costs one record, plus one per chunk it sealed, as in state format
//! 2, but of at most a chunk's worth of events per open session.
//!
//! **What a commit writes** ([`plan`]). The engine keeps [`KeyState::unchanged`], the number of
//! leading events it has not changed since the store last wrote the state, and the store keeps
//! the sessions' numbers and counts as last written. A sealed chunk is written again unless all
//! its events are within the unchanged prefix *and* it was sealed when written (then it has the
//! same events: those before it are unchanged, so the session starts at the same place). Sealed
//! chunks of the written layout that no longer exist are deleted.
//!
//! **Encoding** ([`encode`], [`decode`]). Consecutive events are close in every field, so each
//! field is the zigzag varint of its difference from the previous event's (the first event's
//! from zero): usually one byte, two or three for the time; in the order `t`, `rank`,
//! `timeout`, `tie`, after a count. The session number is the chunk's, not repeated.
//!
//! [`KeyState::events`]: crate::engine::KeyState::events
//! [`KeyState::unchanged`]: crate::engine::KeyState::unchanged

use super::encoding::corrupt;
use super::rocks::CF_KEYS;
use crate::engine::{EvKey, KeyState, OpenEvent, StoreError};
use std::fmt;

/// The events of a sealed chunk.
pub(crate) const CHUNK_EVENTS: usize = 32;

/// Number of sealed chunks of a session of `count` events.
pub(crate) fn sealed(count: u32) -> u32 {
    count / CHUNK_EVENTS as u32
}

/// Number of events of the tail of a session of `count` events.
pub(crate) fn tail_len(count: u32) -> usize {
    count as usize % CHUNK_EVENTS
}

/// The layout of a state's open events, in `out` (cleared first): `(session number, event
/// count)` of every open session, sorted by number.
pub(crate) fn layout_into(state: &KeyState, out: &mut Vec<(u64, u32)>) {
    out.clear();
    out.extend(state.sessions.iter().map(|s| (s.num, s.count)));
    out.sort_unstable();
}

/// [`layout_into`] a new vector.
#[cfg(test)]
fn layout(state: &KeyState) -> Vec<(u64, u32)> {
    let mut l = Vec::new();
    layout_into(state, &mut l);
    l
}

fn count_in(layout: &[(u64, u32)], num: u64) -> u32 {
    layout
        .binary_search_by_key(&num, |&(n, _)| n)
        .map_or(0, |i| layout[i].1)
}

/// Fails if the state's sessions do not account for its events exactly (a bug: such a state
/// is never written).
pub(crate) fn check(state: &KeyState) -> Result<(), StoreError> {
    let total: usize = state.sessions.iter().map(|s| s.count as usize).sum();
    if total == state.events.len() {
        return Ok(());
    }
    Err(corrupt(
        CF_KEYS,
        format!(
            "a key state of {} open events whose sessions count {total}: not written",
            state.events.len()
        ),
    ))
}

/// The sealed-chunk writes that take the stored events of a key from `written` (the layout
/// last written) to `state` (checked with [`check`]), whose layout is `new_layout`:
/// `write(num, i, Some(events))` for every chunk to put, `write(num, i, None)` for every chunk
/// to delete. The tails go with the key state ([`encode_tails`]).
pub(crate) fn plan(
    state: &KeyState,
    written: &[(u64, u32)],
    new_layout: &[(u64, u32)],
    mut write: impl FnMut(u64, u32, Option<&[OpenEvent]>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let unchanged = state.unchanged.get().min(state.events.len());
    let mut start = 0usize;
    for s in &state.sessions {
        let was_sealed = sealed(count_in(written, s.num));
        for i in 0..sealed(s.count) {
            let from = start + i as usize * CHUNK_EVENTS;
            let to = from + CHUNK_EVENTS;
            if to > unchanged || i >= was_sealed {
                write(s.num, i, Some(&state.events[from..to]))?;
            }
        }
        start += s.count as usize;
    }
    for &(num, count) in written {
        for i in sealed(count_in(new_layout, num))..sealed(count) {
            write(num, i, None)?;
        }
    }
    Ok(())
}

/// Appends the tail of every open session of `state` (checked with [`check`]), in session
/// order, each in the compact form.
pub(crate) fn encode_tails(state: &KeyState, out: &mut Vec<u8>) {
    let mut start = 0usize;
    for s in &state.sessions {
        let end = start + s.count as usize;
        encode(&state.events[end - tail_len(s.count)..end], out);
        start = end;
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_delta(out: &mut Vec<u8>, value: i64, prev: i64) {
    put_varint(out, zigzag(value.wrapping_sub(prev)));
}

/// Appends the compact form of `events` (a chunk) to `out`: the count, then the deltas of each
/// event. Their session number is not written.
pub(crate) fn encode(events: &[OpenEvent], out: &mut Vec<u8>) {
    out.reserve(2 + events.len() * 8);
    put_varint(out, events.len() as u64);
    let mut prev = [0i64; 4];
    for e in events {
        let fields = fields(e);
        for (f, p) in fields.iter().zip(prev.iter()) {
            put_delta(out, *f, *p);
        }
        prev = fields;
    }
}

fn fields(e: &OpenEvent) -> [i64; 4] {
    [e.k.t, i64::from(e.k.rank), e.k.timeout, e.k.tie as i64]
}

/// Why a byte string is not the compact form of a chunk of events.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed(&'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "open events: {}", self.0)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, Malformed> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.bytes.split_first().ok_or(Malformed("truncated"))?;
            self.bytes = rest;
            if shift == 63 && b > 1 {
                return Err(Malformed("varint longer than 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Malformed("varint longer than 64 bits"))
    }
}

/// Reads one chunk that [`encode`] wrote at the start of `bytes` and appends its events, with
/// session number `sess`, to `out`. Returns how many it appended and the bytes after it.
pub(crate) fn decode_prefix<'a>(
    bytes: &'a [u8],
    sess: u64,
    out: &mut Vec<OpenEvent>,
) -> Result<(usize, &'a [u8]), Malformed> {
    let mut r = Reader { bytes };
    let n = r.varint()?;
    // Each event takes at least four bytes: a count larger than that is corrupt (and must not
    // size an allocation).
    if n > (r.bytes.len() / 4) as u64 {
        return Err(Malformed("count larger than the bytes hold"));
    }
    out.reserve(n as usize);
    let mut prev = [0i64; 4];
    for _ in 0..n {
        let mut f = [0i64; 4];
        for (i, v) in f.iter_mut().enumerate() {
            *v = prev[i].wrapping_add(unzigzag(r.varint()?));
        }
        let rank = u8::try_from(f[1]).map_err(|_| Malformed("rank out of range"))?;
        out.push(OpenEvent {
            k: EvKey {
                t: f[0],
                rank,
                timeout: f[2],
                tie: f[3] as u64,
            },
            sess,
        });
        prev = f;
    }
    Ok((n as usize, r.bytes))
}

/// Reads what [`encode`] wrote (every byte must be used), like [`decode_prefix`].
pub(crate) fn decode(
    bytes: &[u8],
    sess: u64,
    out: &mut Vec<OpenEvent>,
) -> Result<usize, Malformed> {
    let (n, rest) = decode_prefix(bytes, sess, out)?;
    if !rest.is_empty() {
        return Err(Malformed("trailing bytes"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::state::{OpenSession, Unchanged};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ev(t: i64, rank: u8, timeout: i64, tie: u64, sess: u64) -> OpenEvent {
        OpenEvent {
            k: EvKey {
                t,
                rank,
                timeout,
                tie,
            },
            sess,
        }
    }

    /// Encodes `events` (all of session 3), checks they decode back, returns the bytes.
    fn round_trip(events: &[OpenEvent]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(events, &mut out);
        let mut back = Vec::new();
        assert_eq!(decode(&out, 3, &mut back), Ok(events.len()));
        assert_eq!(back, events);
        out
    }

    fn decoded(bytes: &[u8]) -> Result<Vec<OpenEvent>, Malformed> {
        let mut out = Vec::new();
        decode(bytes, 1, &mut out).map(|_| out)
    }

    #[test]
    fn empty() {
        assert_eq!(round_trip(&[]), [0]);
    }

    #[test]
    fn a_typical_session_takes_a_few_bytes_per_event() {
        let start = 1_795_000_000_000;
        let events: Vec<_> = (0..32)
            .map(|i| ev(start + i * 2_345, 1, 1_800_000, 7 + i as u64, 3))
            .collect();
        let compact = round_trip(&events).len();
        let derived = postcard::to_allocvec(&events).expect("encodes").len();
        assert!(compact <= 6 + 32 * 6, "{compact} bytes");
        assert!(compact * 2 < derived, "{compact} against {derived} bytes");
    }

    #[test]
    fn extremes() {
        round_trip(&[
            ev(i64::MIN, 0, i64::MAX, u64::MAX, 3),
            ev(i64::MAX, u8::MAX, i64::MIN, 0, 3),
            ev(-1, 2, 0, 1, 3),
        ]);
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut out = Vec::new();
        encode(&[ev(5, 1, 10, 1, 1), ev(9, 1, 10, 2, 1)], &mut out);
        for cut in 0..out.len() {
            assert!(decoded(&out[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = out.clone();
        trailing.push(0);
        assert_eq!(decoded(&trailing), Err(Malformed("trailing bytes")));
        // A huge count with nothing behind it is refused before allocating.
        assert_eq!(
            decoded(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(Malformed("count larger than the bytes hold"))
        );
        assert_eq!(
            decoded(&[0xff; 11]),
            Err(Malformed("varint longer than 64 bits"))
        );
        // A tenth byte may only hold the 64th bit.
        let mut overlong = vec![0xffu8; 9];
        overlong.push(0x02);
        assert_eq!(
            Reader { bytes: &overlong }.varint(),
            Err(Malformed("varint longer than 64 bits"))
        );
        let mut max = vec![0xffu8; 9];
        max.push(0x01);
        assert_eq!(Reader { bytes: &max }.varint(), Ok(u64::MAX));
        // Rank out of range.
        assert_eq!(
            decoded(&[1, 0, 0x80, 0x04, 0, 0]),
            Err(Malformed("rank out of range"))
        );
    }

    /// Appends session `num` of `count` events, the i-th event of the state at time
    /// `i * step` with tie-break `tie(t)`.
    fn push_session(st: &mut KeyState, num: u64, count: u32, step: i64, tie: fn(i64) -> u64) {
        for _ in 0..count {
            let t = st.events.len() as i64 * step;
            st.events.push(ev(t, 1, 100, tie(t), num));
        }
        st.sessions.push(OpenSession {
            num,
            first_t: 0,
            count,
            touched: 0,
            merged: Vec::new(),
        });
    }

    /// A state whose sessions are `(num, count)`, in that order, with distinct events.
    fn state_of(sessions: &[(u64, u32)]) -> KeyState {
        let mut st = KeyState::default();
        for &(num, count) in sessions {
            push_session(&mut st, num, count, 10, |t| t as u64 + 1);
        }
        st
    }

    /// The chunk writes of `plan`, as `(num, i, Some(events))` puts and `(num, i, None)`
    /// deletes.
    type Writes = Vec<(u64, u32, Option<Vec<OpenEvent>>)>;

    fn writes(st: &KeyState, written: &[(u64, u32)]) -> Result<Writes, StoreError> {
        let mut out = Vec::new();
        plan(st, written, &layout(st), |num, i, evs| {
            out.push((num, i, evs.map(<[OpenEvent]>::to_vec)));
            Ok(())
        })?;
        Ok(out)
    }

    fn ids(w: &Writes) -> Vec<(u64, u32, Option<usize>)> {
        w.iter()
            .map(|(n, i, e)| (*n, *i, e.as_ref().map(Vec::len)))
            .collect()
    }

    #[test]
    fn a_new_state_writes_every_sealed_chunk() {
        let st = state_of(&[(4, 70)]);
        let w = writes(&st, &[]).expect("plan");
        assert_eq!(ids(&w), [(4, 0, Some(32)), (4, 1, Some(32))]);
        assert_eq!(w[1].2.as_deref(), Some(&st.events[32..64]));
        // The other 6 go with the key state.
        let mut tails = Vec::new();
        encode_tails(&st, &mut tails);
        let mut back = Vec::new();
        assert_eq!(decode(&tails, 4, &mut back), Ok(6));
        assert_eq!(back, &st.events[64..]);
    }

    #[test]
    fn an_append_writes_a_chunk_only_when_it_fills_one() {
        let mut st = state_of(&[(1, 5), (4, 70)]);
        let before = layout(&st);
        st.unchanged = Unchanged::new(st.events.len());
        st.events.push(ev(10_000, 1, 100, 999, 4));
        st.sessions[1].count += 1;
        assert_eq!(writes(&st, &before).expect("plan"), []);
        // Filling a chunk: that chunk.
        let mut st = state_of(&[(4, 63)]);
        let before = layout(&st);
        st.unchanged = Unchanged::new(63);
        st.events.push(ev(10_000, 1, 100, 999, 4));
        st.sessions[0].count += 1;
        assert_eq!(
            ids(&writes(&st, &before).expect("plan")),
            [(4, 1, Some(32))]
        );
        // Nothing changed: nothing written.
        st.unchanged = Unchanged::new(64);
        assert_eq!(writes(&st, &layout(&st)).expect("plan"), []);
    }

    #[test]
    fn a_concluded_session_deletes_its_chunks() {
        let st = state_of(&[(1, 40), (2, 40)]);
        let before = layout(&st);
        // Session 1 drained from the front: nothing is unchanged.
        let mut after = state_of(&[(2, 40)]);
        after.unchanged = Unchanged::new(0);
        assert_eq!(
            ids(&writes(&after, &before).expect("plan")),
            [(2, 0, Some(32)), (1, 0, None)]
        );
        // Session 2 concluded (the tail): session 1 stays as written.
        let mut after = state_of(&[(1, 40)]);
        after.unchanged = Unchanged::new(40);
        assert_eq!(ids(&writes(&after, &before).expect("plan")), [(2, 0, None)]);
    }

    #[test]
    fn a_split_keeps_the_chunks_before_it() {
        // Session 1's last 40 events become session 5: the first 40 are unchanged, and so is
        // its first chunk.
        let st = state_of(&[(1, 80)]);
        let before = layout(&st);
        let mut after = st.clone();
        for e in &mut after.events[40..] {
            e.sess = 5;
        }
        after.sessions[0].count = 40;
        after.sessions.push(OpenSession {
            num: 5,
            count: 40,
            ..after.sessions[0].clone()
        });
        after.unchanged = Unchanged::new(40);
        assert_eq!(
            ids(&writes(&after, &before).expect("plan")),
            [(5, 0, Some(32)), (1, 1, None)]
        );
    }

    #[test]
    fn sessions_that_miscount_the_events_are_refused() {
        let mut st = state_of(&[(1, 3)]);
        assert!(check(&st).is_ok());
        st.events.pop();
        assert!(matches!(
            check(&st),
            Err(StoreError::Corrupt { table: "keys", .. })
        ));
    }

    /// The sealed chunks of `st`, written from nothing.
    fn stored(st: &KeyState) -> BTreeMap<(u64, u32), Vec<OpenEvent>> {
        let mut m = BTreeMap::new();
        apply(&mut m, writes(st, &[]).expect("plan"));
        m
    }

    fn apply(m: &mut BTreeMap<(u64, u32), Vec<OpenEvent>>, w: Writes) {
        for (num, i, e) in w {
            match e {
                Some(e) => m.insert((num, i), e),
                None => m.remove(&(num, i)),
            };
        }
    }

    /// A random state: up to four sessions (numbers from a small range, so that old and new
    /// share some) of up to 80 events, their times from a small range (so that prefixes agree).
    fn any_state() -> impl Strategy<Value = KeyState> {
        proptest::collection::vec((0u64..6, 0u32..80, 0i64..3), 0..4).prop_map(|s| {
            let mut st = KeyState::default();
            let mut used = Vec::new();
            for (num, count, step) in s {
                if used.contains(&num) || count == 0 {
                    continue;
                }
                used.push(num);
                push_session(&mut st, num, count, step, |_| 1);
            }
            st
        })
    }

    proptest! {
        #[test]
        fn any_events_round_trip(
            raw in proptest::collection::vec(
                (any::<i64>(), any::<u8>(), any::<i64>(), any::<u64>()),
                0..40,
            )
        ) {
            let events: Vec<_> = raw
                .into_iter()
                .map(|(t, rank, timeout, tie)| ev(t, rank, timeout, tie, 3))
                .collect();
            round_trip(&events);
        }

        /// Whatever the old and new states, and whatever lower bound of their common prefix
        /// the engine kept, the sealed chunks written over the old ones are exactly the new
        /// state's.
        #[test]
        fn the_writes_leave_exactly_the_new_chunks(
            old in any_state(),
            new in any_state(),
            bound in 0.0f64..=1.0,
        ) {
            let common = old
                .events
                .iter()
                .zip(&new.events)
                .take_while(|(a, b)| a == b)
                .count();
            let mut new = new;
            new.unchanged = Unchanged::new((common as f64 * bound).round() as usize);
            let mut m = stored(&old);
            apply(&mut m, writes(&new, &layout(&old)).expect("plan"));
            prop_assert_eq!(m, stored(&new));
        }
    }
}
