//! The sessionization of one scope key: inserting an event into the key's open events,
//! re-deriving sessions (join, extend, merge, split), and concluding expired sessions.
//!
//! A key's open events are kept sorted in canonical order together with the extents of its
//! concluded sessions ("blocks"). Sessions are the batch split of that sequence by
//! [`Boundaries::between`]; a block must come out of that split unchanged, otherwise the
//! event would contradict published output and is late. Appending in order is O(1); an
//! out-of-order insert re-derives the key's open region (usually one or two sessions).

use super::rules::Boundaries;
use super::state::{Block, KeyState, OpenEvent, OpenSession};
use super::types::{EndReason, EvKey, Millis};
use std::ops::Range;

/// Marks the event being inserted before it has a session.
const UNASSIGNED: u64 = u64::MAX;

/// Result of inserting an event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Insert {
    /// It would touch a concluded session.
    Late,
    /// It belongs to session `num` at 1-based position `seq`.
    Joined { num: u64, seq: u32 },
}

/// Session-level changes caused by an insert.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Opened(u64),
    Merged { absorbed: u64, into: u64 },
    Split { from: u64, to: u64, at: Millis },
}

/// A session concluded by [`KeyState::expire`].
#[derive(Debug)]
pub(crate) struct Concluded {
    pub num: u64,
    pub first: EvKey,
    pub last: EvKey,
    pub count: u32,
    pub reason: EndReason,
    pub merged: Vec<u64>,
    /// Its events, in canonical order (to release held payloads).
    pub events: Vec<EvKey>,
}

fn deadline(last: &EvKey) -> Millis {
    if last.is_end() {
        last.t
    } else {
        last.t.saturating_add(last.timeout)
    }
}

/// Splits `events` into sessions, checking that every block stays a session of its own with
/// the same end reason. Returns the event ranges of the sessions, or `Err(())` if a block
/// would be joined or changed.
pub(crate) fn split(
    events: &[OpenEvent],
    blocks: &[Block],
    b: &Boundaries,
) -> Result<Vec<Range<usize>>, ()> {
    enum Prev<'a> {
        None,
        Event(EvKey),
        Block(&'a Block),
    }
    let mut groups = Vec::new();
    let mut group_start = 0usize;
    let mut chain_start: Millis = 0;
    let mut prev = Prev::None;
    let mut bi = 0usize;
    for (i, e) in events.iter().enumerate() {
        while let Some(bl) = blocks.get(bi) {
            if e.k >= bl.first && e.k <= bl.last {
                return Err(());
            }
            if bl.last > e.k {
                break;
            }
            // The block lies between the previous item and `e`.
            if let Prev::Event(p) = prev {
                if b.between(&p, &bl.first, chain_start).is_none() {
                    return Err(());
                }
                groups.push(group_start..i);
            }
            prev = Prev::Block(bl);
            bi += 1;
        }
        match prev {
            Prev::None => {
                group_start = i;
                chain_start = e.k.t;
            }
            Prev::Block(bl) => {
                if b.between(&bl.last, &e.k, bl.first.t) != Some(bl.reason) {
                    return Err(());
                }
                group_start = i;
                chain_start = e.k.t;
            }
            Prev::Event(p) => {
                if b.between(&p, &e.k, chain_start).is_some() {
                    groups.push(group_start..i);
                    group_start = i;
                    chain_start = e.k.t;
                }
            }
        }
        prev = Prev::Event(e.k);
    }
    if let Prev::Event(p) = prev {
        if let Some(bl) = blocks.get(bi) {
            if b.between(&p, &bl.first, chain_start).is_none() {
                return Err(());
            }
        }
        groups.push(group_start..events.len());
    }
    Ok(groups)
}

impl KeyState {
    /// Index range of each open session's events, in order.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut start = 0usize;
        self.sessions.iter().map(move |s| {
            let r = start..start + s.count as usize;
            start = r.end;
            r
        })
    }

    /// Inserts an event with key `k` that arrived at wall-clock `now`.
    pub(crate) fn insert(
        &mut self,
        k: EvKey,
        now: Millis,
        b: &Boundaries,
        changes: &mut Vec<Change>,
    ) -> Insert {
        let last_ev = self.events.last().map(|e| e.k);
        let last_block = self.blocks.last().copied();
        let after_all = last_ev.is_none_or(|l| k > l) && last_block.is_none_or(|bl| k > bl.last);
        if !after_all {
            return self.insert_slow(k, now, b, changes);
        }
        let prev_block = match (last_ev, last_block) {
            (None, Some(bl)) => Some(bl),
            (Some(e), Some(bl)) if bl.last > e => Some(bl),
            _ => None,
        };
        if let Some(bl) = prev_block {
            if b.between(&bl.last, &k, bl.first.t) != Some(bl.reason) {
                return Insert::Late;
            }
        } else if let (Some(le), Some(sess)) = (last_ev, self.sessions.last_mut()) {
            if b.between(&le, &k, sess.first_t).is_none() {
                sess.count += 1;
                sess.touched = now;
                self.events.push(OpenEvent { k, sess: sess.num });
                return Insert::Joined {
                    num: sess.num,
                    seq: sess.count,
                };
            }
        }
        let num = self.new_session_num(changes);
        if self.sessions.capacity() == 0 {
            // Most keys have one open session at a time: don't let Vec reserve four.
            self.sessions.reserve_exact(1);
        }
        self.sessions.push(OpenSession {
            num,
            first_t: k.t,
            count: 1,
            touched: now,
            merged: Vec::new(),
        });
        self.events.push(OpenEvent { k, sess: num });
        Insert::Joined { num, seq: 1 }
    }

    fn new_session_num(&mut self, changes: &mut Vec<Change>) -> u64 {
        self.created += 1;
        changes.push(Change::Opened(self.created));
        self.created
    }

    fn insert_slow(
        &mut self,
        k: EvKey,
        now: Millis,
        b: &Boundaries,
        changes: &mut Vec<Change>,
    ) -> Insert {
        let pos = self.events.partition_point(|e| e.k < k);
        self.events.insert(
            pos,
            OpenEvent {
                k,
                sess: UNASSIGNED,
            },
        );
        let groups = match split(&self.events, &self.blocks, b) {
            Ok(g) => g,
            Err(()) => {
                self.events.remove(pos);
                return Insert::Late;
            }
        };
        self.unchanged.lower(pos);
        let old: Vec<OpenSession> = std::mem::take(&mut self.sessions);
        let find = |n: u64| old.iter().find(|s| s.num == n);
        let mut used: Vec<u64> = Vec::new();
        let mut result = Insert::Late;
        for g in groups {
            let mut nums: Vec<u64> = Vec::new();
            for e in &self.events[g.clone()] {
                if e.sess != UNASSIGNED && !nums.contains(&e.sess) {
                    nums.push(e.sess);
                }
            }
            let survivor = nums.iter().copied().find(|n| !used.contains(n));
            let num = match survivor {
                Some(n) => {
                    used.push(n);
                    n
                }
                None => self.new_session_num(changes),
            };
            let base = find(num);
            let mut merged = base.map(|s| s.merged.clone()).unwrap_or_default();
            let mut touched = base.map_or(now, |s| s.touched);
            let mut reshaped = survivor.is_none();
            for &n in nums.iter().filter(|&&n| n != num) {
                reshaped = true;
                if used.contains(&n) {
                    let at = self.events[g.start].k.t;
                    changes.push(Change::Split {
                        from: n,
                        to: num,
                        at,
                    });
                } else {
                    used.push(n);
                    changes.push(Change::Merged {
                        absorbed: n,
                        into: num,
                    });
                    merged.push(n);
                    if let Some(s) = find(n) {
                        merged.extend_from_slice(&s.merged);
                        touched = touched.max(s.touched);
                    }
                }
            }
            if g.contains(&pos) || reshaped {
                touched = now;
            }
            if g.contains(&pos) {
                result = Insert::Joined {
                    num,
                    seq: (pos - g.start + 1) as u32,
                };
            }
            for (i, e) in self.events[g.clone()].iter_mut().enumerate() {
                if e.sess != num {
                    e.sess = num;
                    self.unchanged.lower(g.start + i);
                }
            }
            self.sessions.push(OpenSession {
                num,
                first_t: self.events[g.start].k.t,
                count: g.len() as u32,
                touched,
                merged,
            });
        }
        result
    }

    /// The deadline of every open session: it may conclude once the watermark is past it.
    pub(crate) fn deadlines(&self) -> impl Iterator<Item = (Millis, &OpenSession)> + '_ {
        self.ranges()
            .zip(self.sessions.iter())
            .map(|(r, s)| (deadline(&self.events[r.end - 1].k), s))
    }

    /// Concludes every open session whose deadline is before `watermark` and that has been
    /// quiet (no event joined) for `quiet` at wall-clock `now`. With `keep_events`, the
    /// concluded sessions carry their events (to release held payloads).
    pub(crate) fn expire(
        &mut self,
        watermark: Millis,
        now: Millis,
        quiet: Millis,
        b: &Boundaries,
        keep_events: bool,
    ) -> Vec<Concluded> {
        let mut done = Vec::new();
        let (mut si, mut start) = (0usize, 0usize);
        while si < self.sessions.len() {
            let s = &self.sessions[si];
            let end = start + s.count as usize;
            let first = self.events[start].k;
            let last = self.events[end - 1].k;
            if deadline(&last) >= watermark || now.saturating_sub(s.touched) < quiet {
                si += 1;
                start = end;
                continue;
            }
            let next_event = self.events.get(end).map(|e| e.k);
            let at = self.blocks.partition_point(|bl| bl.first < last);
            let next_block = self.blocks.get(at).map(|bl| bl.first);
            let next = match (next_event, next_block) {
                (Some(e), Some(bl)) => Some(e.min(bl)),
                (e, bl) => e.or(bl),
            };
            let reason = match next {
                Some(n) => b
                    .between(&last, &n, s.first_t)
                    .unwrap_or(EndReason::Inactivity),
                None if last.is_end() => EndReason::ExplicitEnd,
                None => EndReason::Inactivity,
            };
            let s = self.sessions.remove(si);
            self.unchanged.lower(start);
            let events = if keep_events {
                self.events.drain(start..end).map(|e| e.k).collect()
            } else {
                self.events.drain(start..end);
                Vec::new()
            };
            self.blocks.insert(
                at,
                Block {
                    first,
                    last,
                    reason,
                },
            );
            self.refresh_trim_hint();
            done.push(Concluded {
                num: s.num,
                first,
                last,
                count: s.count,
                reason,
                merged: s.merged,
                events,
            });
        }
        done
    }

    /// Forgets concluded extents that no event within the horizon can touch any more: those
    /// ending (plus their timeout) before `cutoff` with no open event before them.
    pub(crate) fn trim_blocks(&mut self, cutoff: Millis) {
        if cutoff <= self.trim_hint {
            return;
        }
        let first_open = self.events.first().map(|e| e.k);
        let n = self
            .blocks
            .iter()
            .take_while(|bl| {
                bl.last.t.saturating_add(bl.last.timeout) < cutoff
                    && first_open.is_none_or(|f| bl.last < f)
            })
            .count();
        if n > 0 {
            self.blocks.drain(..n);
        }
        self.refresh_trim_hint();
    }

    fn refresh_trim_hint(&mut self) {
        self.trim_hint = self
            .blocks
            .first()
            .map_or(Millis::MAX, |bl| bl.last.t.saturating_add(bl.last.timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rules::EngineConfig;
    use crate::engine::state::Unchanged;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        /// An event at this time, this rank (0 start, 1 engagement, 2 end), timeout 100.
        Insert(Millis, u8),
        /// Expire with this watermark.
        Expire(Millis),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0i64..2_000, prop_oneof![8 => Just(1u8), 1 => Just(0u8), 1 => Just(2u8)])
                .prop_map(|(t, r)| Op::Insert(t, r)),
            1 => (0i64..2_200).prop_map(Op::Expire),
        ]
    }

    proptest! {
        /// Whatever the engine does to a key's events (appends, inserts out of order, merges,
        /// splits, conclusions), the events before `unchanged` are those of before.
        #[test]
        fn unchanged_is_a_true_prefix(
            ops in proptest::collection::vec(op(), 0..150),
            max_len in any::<bool>(),
        ) {
            let cfg = EngineConfig {
                max_length: max_len.then_some(300),
                ..EngineConfig::default()
            };
            let b = cfg.boundaries();
            let mut st = KeyState::default();
            let mut changes = Vec::new();
            for op in ops {
                let before = st.events.clone();
                st.unchanged = Unchanged::new(before.len());
                match op {
                    Op::Insert(t, rank) => {
                        let k = EvKey { t, rank, timeout: 100, tie: st.arrivals + 1 };
                        if let Insert::Joined { .. } = st.insert(k, 0, &b, &mut changes) {
                            st.arrivals += 1;
                        }
                    }
                    Op::Expire(wm) => {
                        st.expire(wm, 0, 0, &b, false);
                    }
                }
                let n = st.unchanged.get();
                prop_assert!(n <= before.len() && n <= st.events.len());
                prop_assert_eq!(&st.events[..n], &before[..n]);
            }
        }
    }
}
