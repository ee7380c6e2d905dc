//! State store implementations of [`crate::engine::StateStore`]: [`MemStore`] keeps everything
//! in memory (offline mode, tests, benchmarks); [`RocksStore`] keeps a task's state in one
//! RocksDB database and makes it durable together with the input offsets at each commit.

pub mod memory;
pub mod rocks;

mod encoding;

pub use memory::MemStore;
pub use rocks::{RocksOptions, RocksStore};
