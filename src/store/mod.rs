//! State store implementations of [`crate::engine::StateStore`]: [`MemStore`] keeps everything
//! in memory (offline mode, tests, benchmarks); [`RocksStore`] keeps a task's state in one
//! RocksDB database and makes it durable together with the input offsets at each commit.

pub mod budget;
pub mod changelog;
pub mod memory;
pub mod rocks;

mod chunks;
mod encoding;

pub use budget::StateMemory;
pub use changelog::Change;
pub use memory::MemStore;
pub use rocks::{RocksOptions, RocksStore, StateWriter};

use crate::engine::Millis;
use compact_str::CompactString;
use std::collections::BTreeSet;

/// Moves every entry with `at < before` from a timer index to `out`, in order. Touches only
/// the due entries (each `pop_first` is O(log n)). Shared by both stores.
pub(crate) fn pop_due_from(
    set: &mut BTreeSet<(Millis, CompactString)>,
    before: Millis,
    out: &mut Vec<(Millis, CompactString)>,
) {
    while set.first().is_some_and(|(at, _)| *at < before) {
        if let Some(entry) = set.pop_first() {
            out.push(entry);
        }
    }
}
