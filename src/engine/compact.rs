//! The compact serialized form of a key's open events ([`KeyState::events`]), used through
//! `#[serde(with = ...)]`: one byte string instead of a sequence of five-field structs.
//!
//! Every commit writes the whole state of each key it touched (to RocksDB, and to the
//! changelog), and the open events are most of it. Consecutive events of a key are close in
//! every field, so each field is written as the zigzag varint of its difference from the
//! previous event's (the first event's from zero): usually one byte, two or three for the
//! time. In the order `t`, `rank`, `timeout`, `tie`, `sess`.
//!
//! Measured on the e2e benchmark's latency phase (BENCHMARKS.md, eighth session): serializing
//! the events through serde's derived form (five varints per event, each through the
//! serializer) was most of the consumer thread's stop at each commit.
//!
//! [`KeyState::events`]: super::state::KeyState::events

use super::state::OpenEvent;
use super::types::EvKey;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};
use std::fmt;

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

/// Appends the compact form of `events` to `out`: the count, then the deltas of each event.
pub(crate) fn encode(events: &[OpenEvent], out: &mut Vec<u8>) {
    out.reserve(2 + events.len() * 8);
    put_varint(out, events.len() as u64);
    let mut prev = [0i64; 5];
    for e in events {
        let fields = fields(e);
        for (f, p) in fields.iter().zip(prev.iter()) {
            put_delta(out, *f, *p);
        }
        prev = fields;
    }
}

fn fields(e: &OpenEvent) -> [i64; 5] {
    [
        e.k.t,
        i64::from(e.k.rank),
        e.k.timeout,
        e.k.tie as i64,
        e.sess as i64,
    ]
}

/// Why a byte string is not the compact form of a list of events.
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

/// Reads what [`encode`] wrote; every byte must be used.
pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<OpenEvent>, Malformed> {
    let mut r = Reader { bytes };
    let n = r.varint()?;
    // Each event takes at least five bytes: a count larger than that is corrupt (and must not
    // size an allocation).
    if n > (r.bytes.len() / 5) as u64 {
        return Err(Malformed("count larger than the bytes hold"));
    }
    let mut events = Vec::with_capacity(n as usize);
    let mut prev = [0i64; 5];
    for _ in 0..n {
        let mut f = [0i64; 5];
        for (i, v) in f.iter_mut().enumerate() {
            *v = prev[i].wrapping_add(unzigzag(r.varint()?));
        }
        let rank = u8::try_from(f[1]).map_err(|_| Malformed("rank out of range"))?;
        events.push(OpenEvent {
            k: EvKey {
                t: f[0],
                rank,
                timeout: f[2],
                tie: f[3] as u64,
            },
            sess: f[4] as u64,
        });
        prev = f;
    }
    if !r.bytes.is_empty() {
        return Err(Malformed("trailing bytes"));
    }
    Ok(events)
}

/// `serialize_with` for [`KeyState::events`](super::state::KeyState::events).
pub(crate) fn serialize<S: Serializer>(events: &[OpenEvent], s: S) -> Result<S::Ok, S::Error> {
    let mut buf = Vec::new();
    encode(events, &mut buf);
    s.serialize_bytes(&buf)
}

/// `deserialize_with` for [`KeyState::events`](super::state::KeyState::events).
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<OpenEvent>, D::Error> {
    d.deserialize_bytes(EventsVisitor)
}

struct EventsVisitor;

impl<'de> Visitor<'de> for EventsVisitor {
    type Value = Vec<OpenEvent>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the compact form of a key's open events (a byte string)")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        decode(v).map_err(E::custom)
    }

    /// Self-describing formats without byte strings (JSON) write them as a sequence.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        decode(&bytes).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::state::KeyState;
    use proptest::prelude::*;

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

    fn round_trip(events: &[OpenEvent]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(events, &mut out);
        assert_eq!(decode(&out).as_deref(), Ok(events));
        out
    }

    #[test]
    fn empty() {
        assert_eq!(round_trip(&[]), [0]);
    }

    #[test]
    fn a_typical_session_takes_a_few_bytes_per_event() {
        let start = 1_795_000_000_000;
        let events: Vec<_> = (0..50)
            .map(|i| ev(start + i * 2_345, 1, 1_800_000, 7 + i as u64, 3))
            .collect();
        let compact = round_trip(&events).len();
        let derived = postcard::to_allocvec(&events).expect("encodes").len();
        assert!(compact <= 6 + 50 * 7, "{compact} bytes");
        assert!(compact * 2 < derived, "{compact} against {derived} bytes");
    }

    #[test]
    fn extremes() {
        round_trip(&[
            ev(i64::MIN, 0, i64::MAX, u64::MAX, 0),
            ev(i64::MAX, u8::MAX, i64::MIN, 0, u64::MAX),
            ev(-1, 2, 0, 1, 1),
        ]);
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut out = Vec::new();
        encode(&[ev(5, 1, 10, 1, 1), ev(9, 1, 10, 2, 1)], &mut out);
        for cut in 0..out.len() {
            assert!(decode(&out[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = out.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(Malformed("trailing bytes")));
        // A huge count with nothing behind it is refused before allocating.
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(Malformed("count larger than the bytes hold"))
        );
        assert_eq!(
            decode(&[0xff; 11]),
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
            decode(&[1, 0, 0x80, 0x04, 0, 0, 0]),
            Err(Malformed("rank out of range"))
        );
    }

    #[test]
    fn key_state_round_trips_through_postcard_and_json() {
        let state = KeyState {
            user: "u".into(),
            created: 2,
            arrivals: 3,
            events: vec![
                ev(100, 0, 30, 1, 1),
                ev(90, 1, 30, 3, 2),
                ev(200, 2, 60, 2, 2),
            ],
            ..KeyState::default()
        };
        let bytes = postcard::to_allocvec(&state).expect("encodes");
        assert_eq!(
            postcard::from_bytes::<KeyState>(&bytes).ok(),
            Some(state.clone())
        );
        let json = serde_json::to_string(&state).expect("encodes");
        assert_eq!(serde_json::from_str::<KeyState>(&json).ok(), Some(state));
    }

    proptest! {
        #[test]
        fn any_events_round_trip(
            raw in proptest::collection::vec(
                (any::<i64>(), any::<u8>(), any::<i64>(), any::<u64>(), any::<u64>()),
                0..40,
            )
        ) {
            let events: Vec<_> = raw
                .into_iter()
                .map(|(t, rank, timeout, tie, sess)| ev(t, rank, timeout, tie, sess))
                .collect();
            let mut out = Vec::new();
            encode(&events, &mut out);
            prop_assert_eq!(decode(&out), Ok(events));
        }
    }
}
