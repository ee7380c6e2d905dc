//! [`MemStore`]: the in-memory [`StateStore`], used by the offline batch mode, the tests and the
//! engine benchmark. It owns all state in plain maps; nothing is durable, so `commit` only
//! records the meta and the input offsets (which makes it the reference model the RocksDB store
//! is tested against). Every operation is a hash or B-tree lookup; the per-event path
//! (`take_key`/`put_key`) does not allocate once a key is known.

use crate::engine::{
    KeyState, Millis, PartitionMeta, SourceOffset, StateStore, StoreError, TimerKind, UserStats,
};
use compact_str::CompactString;
use rustc_hash::{FxBuildHasher, FxHashMap};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;

/// An in-memory state store. See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    /// Keys of up to 24 bytes are stored inline (no pointer to chase on the per-event path).
    keys: hashbrown::HashMap<CompactString, KeyState, FxBuildHasher>,
    stats: FxHashMap<CompactString, UserStats>,
    deadline_timers: BTreeSet<(Millis, CompactString)>,
    quiet_timers: BTreeSet<(Millis, CompactString)>,
    payloads: FxHashMap<(String, u64), Vec<u8>>,
    meta: Option<PartitionMeta>,
    /// Committed offsets by `(topic, partition)`.
    offsets: BTreeMap<(String, i32), i64>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn index(&mut self, kind: TimerKind) -> &mut BTreeSet<(Millis, CompactString)> {
        match kind {
            TimerKind::Deadline => &mut self.deadline_timers,
            TimerKind::Quiet => &mut self.quiet_timers,
        }
    }
}

impl StateStore for MemStore {
    /// Moves the state out and leaves a default `KeyState` in its slot, so the key `String` is
    /// not freed here and re-allocated by the following `put_key`. The placeholder is never
    /// observable: the engine always puts the state back before it reads the key again.
    fn take_key(&mut self, key: &str) -> Result<Option<KeyState>, StoreError> {
        Ok(self.keys.get_mut(key).map(std::mem::take))
    }

    fn put_key(&mut self, key: &str, state: KeyState) -> Result<(), StoreError> {
        match self.keys.get_mut(key) {
            Some(slot) => *slot = state,
            None => {
                self.keys.insert(CompactString::from(key), state);
            }
        }
        Ok(())
    }

    fn key_mut(&mut self, key: &str, user: &str) -> Result<&mut KeyState, StoreError> {
        let hash = self.keys.hasher().hash_one(key);
        let entry = self
            .keys
            .raw_entry_mut()
            .from_key_hashed_nocheck(hash, key)
            .or_insert_with(|| {
                (
                    CompactString::from(key),
                    KeyState {
                        user: user.to_owned(),
                        ..KeyState::default()
                    },
                )
            });
        Ok(entry.1)
    }

    fn get_stats(&mut self, user: &str) -> Result<Option<UserStats>, StoreError> {
        Ok(self.stats.get(user).cloned())
    }

    fn put_stats(&mut self, user: &str, stats: &UserStats) -> Result<(), StoreError> {
        match self.stats.get_mut(user) {
            Some(slot) => slot.clone_from(stats),
            None => {
                self.stats.insert(CompactString::from(user), stats.clone());
            }
        }
        Ok(())
    }

    fn add_timer(&mut self, kind: TimerKind, at: Millis, key: &str) -> Result<(), StoreError> {
        self.index(kind).insert((at, CompactString::from(key)));
        Ok(())
    }

    fn pop_due(
        &mut self,
        kind: TimerKind,
        before: Millis,
        out: &mut Vec<(Millis, CompactString)>,
    ) -> Result<(), StoreError> {
        super::pop_due_from(self.index(kind), before, out);
        Ok(())
    }

    fn timers(&mut self, kind: TimerKind) -> Result<Vec<(Millis, String)>, StoreError> {
        Ok(self
            .index(kind)
            .iter()
            .map(|(at, k)| (*at, k.to_string()))
            .collect())
    }

    fn put_payload(&mut self, key: &str, tie: u64, payload: &[u8]) -> Result<(), StoreError> {
        self.payloads
            .insert((key.to_owned(), tie), payload.to_vec());
        Ok(())
    }

    fn take_payload(&mut self, key: &str, tie: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.payloads.remove(&(key.to_owned(), tie)))
    }

    fn load_meta(&mut self) -> Result<Option<PartitionMeta>, StoreError> {
        Ok(self.meta.clone())
    }

    /// Sorted by `(topic, partition)`.
    fn committed_offsets(&mut self) -> Result<Vec<SourceOffset>, StoreError> {
        Ok(self
            .offsets
            .iter()
            .map(|((topic, partition), &next_offset)| SourceOffset {
                topic: topic.clone(),
                partition: *partition,
                next_offset,
            })
            .collect())
    }

    fn commit(&mut self, meta: &PartitionMeta, offsets: &[SourceOffset]) -> Result<(), StoreError> {
        self.meta = Some(meta.clone());
        for o in offsets {
            self.offsets
                .insert((o.topic.clone(), o.partition), o.next_offset);
        }
        Ok(())
    }
}
