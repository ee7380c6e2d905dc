//! [`StateMemory`]: the memory budget of every [`super::RocksStore`] of a process
//! (`service.memory_budget_mib`), so that what the state takes in memory does not grow with
//! the number of users or of partitions.
//!
//! Half of the budget is RocksDB's: one block cache shared by every database, which their
//! memtables are charged to as well (a write buffer manager), so reads and writes of all the
//! partitions together stay within it. The other half is for the decoded key states and user
//! stats the stores keep between commits, split evenly among the stores open at the time;
//! each store trims its cache to its share after every written commit (see
//! `RocksStore::settle_written`). What a store used since the last commit stays regardless,
//! so the bound is exceeded by at most one commit interval's working set; the timer indexes
//! (one entry per open session) are outside the budget.

use rocksdb::{Cache, WriteBufferManager};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The shared budget; clones share it.
#[derive(Clone)]
pub struct StateMemory {
    inner: Arc<Inner>,
}

struct Inner {
    budget: usize,
    cache: Cache,
    buffers: WriteBufferManager,
    decoded: usize,
    open: AtomicUsize,
}

impl StateMemory {
    /// A budget of `bytes` for the state of the whole process.
    pub fn new(bytes: usize) -> Self {
        let rocksdb = bytes / 2;
        let cache = Cache::new_lru_cache(rocksdb);
        // Memtables may take up to half of RocksDB's part; they are charged to the cache,
        // so blocks and memtables together stay within it. No write stall: a memtable over
        // its share is flushed.
        let buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            rocksdb / 2,
            false,
            cache.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                budget: bytes,
                cache,
                buffers,
                decoded: bytes - rocksdb,
                open: AtomicUsize::new(0),
            }),
        }
    }

    /// The whole budget, in bytes.
    pub fn budget(&self) -> usize {
        self.inner.budget
    }

    /// Bytes in RocksDB's shared block cache now (memtables charged to it included).
    pub fn rocksdb_usage(&self) -> usize {
        self.inner.cache.get_usage()
    }

    pub(crate) fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    pub(crate) fn buffers(&self) -> &WriteBufferManager {
        &self.inner.buffers
    }

    /// Counts a store in for [`Self::decoded_share`]; the guard counts it out when dropped.
    pub(crate) fn register(&self) -> Registration {
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        Registration(self.clone())
    }

    /// The stores open now that take a share of the decoded half.
    pub fn stores(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// The decoded state one store may keep: the decoded half of the budget over the stores
    /// open now.
    pub fn decoded_share(&self) -> usize {
        self.inner.decoded / self.stores().max(1)
    }
}

impl fmt::Debug for StateMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMemory")
            .field("budget", &self.inner.budget)
            .field("stores", &self.stores())
            .finish()
    }
}

/// A store's place in the budget (see [`StateMemory::register`]).
#[derive(Debug)]
pub(crate) struct Registration(StateMemory);

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.inner.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decoded_half_is_split_among_the_open_stores() {
        let m = StateMemory::new(64 << 20);
        assert_eq!(m.decoded_share(), 32 << 20, "no store yet: the whole half");
        let a = m.register();
        let b = m.clone().register();
        assert_eq!(m.decoded_share(), 16 << 20);
        drop(a);
        assert_eq!(m.decoded_share(), 32 << 20);
        drop(b);
    }
}
