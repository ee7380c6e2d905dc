//! The state interface the engine is written against, and the records it keeps there.
//!
//! A task's state is: one [`KeyState`] per scope key (open events, concluded-session extents
//! still within the lateness horizon, the key's session counter), [`UserStats`] per user, two
//! timer indexes (event-time deadlines and wall-clock quiet checks, each keyed by due time so
//! advancing time only touches what is due), the payloads of held events (`on_close` mode) and
//! one [`PartitionMeta`]. Writes are buffered by the store and become durable together with the
//! input offsets in [`StateStore::commit`], atomically.

use super::types::{EndReason, EvKey, Millis, UserStats};
use super::watermark::Watermark;
use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Errors of a state store backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store backend error: {0}")]
    Backend(String),
    #[error("corrupt state record in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error(
        "the state was written in format {found} and this build reads format {expected}: stop \
         every instance, delete their state directories and the changelog topic, and start \
         again (README, Status)"
    )]
    Format { found: u32, expected: u32 },
}

/// The two timer indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// Keyed by event-time deadline: due when the watermark passes it.
    Deadline,
    /// Keyed by wall-clock time: due when "now" reaches it (quiet-period re-checks).
    Quiet,
}

/// An input position: the next offset to read from `topic`/`partition`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// An event of an open session, as kept in state (the payload is kept apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenEvent {
    pub k: EvKey,
    /// Session number (within the key) the event currently belongs to.
    pub sess: u64,
}

/// An open session of a key. Its events are the contiguous run of `KeyState::events` whose
/// `sess` is `num`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSession {
    pub num: u64,
    /// Time of the first event (the chain start for the max-length rule).
    pub first_t: Millis,
    /// Number of events in the session.
    pub count: u32,
    /// Wall-clock time ("now") when an event last joined this session.
    pub touched: Millis,
    /// Session numbers merged into this one.
    pub merged: Vec<u64>,
}

/// The extent of a concluded session, kept while an event within the lateness horizon could
/// still touch it, so that nothing published is ever contradicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub first: EvKey,
    pub last: EvKey,
    pub reason: EndReason,
}

/// Everything the engine keeps for one scope key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// The user id (the key without its extra scope fields).
    pub user: String,
    /// Number of sessions ever created for the key (ids are `1..=created`).
    pub created: u64,
    /// Number of events ever accepted for the key (the arrival tie-break).
    pub arrivals: u64,
    /// Open events, sorted by `EvKey`. Not serialized with the rest: the RocksDB store keeps
    /// them in chunks of their own (`store::chunks`).
    #[serde(skip)]
    pub events: Vec<OpenEvent>,
    /// Open sessions, in event order.
    pub sessions: Vec<OpenSession>,
    /// Concluded extents within the horizon, sorted.
    pub blocks: Vec<Block>,
    /// No block can be trimmed before the horizon cutoff passes this (saves touching
    /// `blocks` on every event).
    #[serde(default)]
    pub trim_hint: Millis,
    /// Due time of this key's live entry in the deadline index.
    pub deadline_timer: Option<Millis>,
    /// Due time of this key's live entry in the quiet index.
    pub quiet_timer: Option<Millis>,
    /// How many of `events` are unchanged since the store last wrote them. Every change to
    /// `events` must lower it to the first index changed (the engine's key logic does).
    #[serde(skip)]
    pub unchanged: Unchanged,
}

/// A lower bound on the number of leading open events of a [`KeyState`] that are unchanged
/// since the store last wrote the state: the RocksDB store rewrites only the chunks of events
/// after it. Bookkeeping carried with the state, not part of its value: every two are equal,
/// and it is never serialized. A new state has none unchanged; the store sets it to all the
/// events when it reads or writes the state.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unchanged(usize);

impl Unchanged {
    pub fn new(n: usize) -> Self {
        Self(n)
    }

    pub fn get(self) -> usize {
        self.0
    }

    /// Event `i` changed (was inserted, removed or reassigned), and so did every index after it.
    pub(crate) fn lower(&mut self, i: usize) {
        self.0 = self.0.min(i);
    }
}

impl PartialEq for Unchanged {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Unchanged {}

impl KeyState {
    /// About how many bytes the decoded state's allocations take (beside the value itself),
    /// for the memory budget of the stores.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.user.capacity()
            + self.events.capacity() * size_of::<OpenEvent>()
            + self
                .sessions
                .iter()
                .map(|s| s.merged.capacity() * size_of::<u64>())
                .sum::<usize>()
            + self.sessions.capacity() * size_of::<OpenSession>()
            + self.blocks.capacity() * size_of::<Block>()
    }
}

/// Per-task state that is not per key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    pub watermark: Watermark,
    /// Sessions currently open in this task.
    pub open_sessions: u64,
}

/// Storage for a task's state. Reads see the task's own uncommitted writes; nothing is durable
/// until [`StateStore::commit`], which persists all writes since the previous commit together
/// with `meta` and the input offsets, atomically.
pub trait StateStore {
    /// Removes and returns the state of `key` for modification; the engine always puts it back.
    fn take_key(&mut self, key: &str) -> Result<Option<KeyState>, StoreError>;
    fn put_key(&mut self, key: &str, state: KeyState) -> Result<(), StoreError>;
    /// The state of `key` for modification in place, created (empty, for `user`) if absent.
    /// The per-event path: one lookup, no copy.
    fn key_mut(&mut self, key: &str, user: &str) -> Result<&mut KeyState, StoreError>;

    fn get_stats(&mut self, user: &str) -> Result<Option<UserStats>, StoreError>;
    fn put_stats(&mut self, user: &str, stats: &UserStats) -> Result<(), StoreError>;

    /// Adds `(at, key)` to the index (a no-op if present).
    fn add_timer(&mut self, kind: TimerKind, at: Millis, key: &str) -> Result<(), StoreError>;
    /// Removes every entry with due time `< before` and appends them to `out` in
    /// `(at, key)` order.
    fn pop_due(
        &mut self,
        kind: TimerKind,
        before: Millis,
        out: &mut Vec<(Millis, CompactString)>,
    ) -> Result<(), StoreError>;
    /// Every entry of the index, in order, without removing anything (for inspection).
    fn timers(&mut self, kind: TimerKind) -> Result<Vec<(Millis, String)>, StoreError>;

    fn put_payload(&mut self, key: &str, tie: u64, payload: &[u8]) -> Result<(), StoreError>;
    fn take_payload(&mut self, key: &str, tie: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// The meta written by the last commit.
    fn load_meta(&mut self) -> Result<Option<PartitionMeta>, StoreError>;
    /// The offsets written by the last commit.
    fn committed_offsets(&mut self) -> Result<Vec<SourceOffset>, StoreError>;
    /// Makes every write since the previous commit durable, with `meta` and `offsets`, in one
    /// atomic step. Offsets not named keep their previous value.
    fn commit(&mut self, meta: &PartitionMeta, offsets: &[SourceOffset]) -> Result<(), StoreError>;
}
