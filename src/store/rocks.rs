//! [`RocksStore`]: the durable [`StateStore`], one RocksDB database per task directory.
//!
//! Column families: `keys` (scope key -> `KeyState` without its open events, followed by the
//! tail of each open session's events), `event_chunks` (encoded `(key, session, index)` -> a
//! full chunk of a session's events, see [`super::chunks`]: a commit writes about the events
//! the interval added, not all of them), `stats` (user -> `UserStats`),
//! `deadline_timers` / `quiet_timers` (encoded `(at, key)` -> empty), `payloads` (encoded
//! `(key, tie)` -> bytes) and `meta` (`b"meta"` -> `PartitionMeta`, encoded `(topic,
//! partition)` -> next offset, `b"state-format"` -> [`STATE_FORMAT`], checked on open and
//! after a restore). Layouts are in [`super::encoding`]; values are `postcard`.
//!
//! **Durability invariant.** Nothing reaches the database except in [`StateStore::commit`],
//! which writes every change since the previous commit *together with* the meta and the input
//! offsets in one `WriteBatch` (one atomic `DB::write`). So after a restart the state is
//! exactly that of the last successful commit, and it always matches the committed offsets:
//! replaying the input from those offsets reproduces what was lost. Outside changelog mode,
//! writes go through the WAL without `fsync`, so a committed batch survives a process crash;
//! an OS crash may lose the last commits, but never tears one.
//!
//! Uncommitted writes live in memory and reads see them: a write-back cache of decoded
//! `KeyState`s / `UserStats` (dirty entries go into the next commit's batch; clean ones not
//! used in the last commit interval are evicted once the cache exceeds its bound: the store's
//! share of a [`StateMemory`] budget if [`RocksOptions::memory`] gives one, else
//! [`RocksOptions::cache_keys`] entries), an overlay of payload puts/deletes, and both timer
//! indexes mirrored entirely in memory (loaded at open) with the pending difference to the
//! database. With a budget, the block cache and the memtables are the budget's too.
//!
//! **Staged commits** (changelog mode, see [`RocksStore::enable_changelog`]). A commit may be
//! staged (its changes recorded, not written) while the engine goes on: the pipeline writes it
//! only once its changelog records have committed to Kafka, and may stage the next ones
//! meanwhile. Staging a commit encodes its key states later (see [`Collecting`]): a few at a
//! time through [`RocksStore::collect`], any key about to change first, and the rest when the
//! changes are taken; one commit is collected at a time. The write may happen on another
//! thread, through a [`StateWriter`]; the store learns of it from
//! [`RocksStore::staged_written`]. Staged commits are written in order. An entry whose newest
//! value is only in a staged commit stays in memory until the store learns that commit is
//! written, so reads never fall through to a database that does not have it yet.
//!
//! In changelog mode every write goes without the write-ahead log: the changelog is the
//! durable copy. After a crash the database is what its last (atomic) flush holds, a commit
//! boundary with the changelog checkpoint it reached, and the pipeline replays the changelog
//! from there. Closing the database flushes it.

use super::budget::{Registration, StateMemory};
use super::changelog::{cf_of, change_key, Change};
use super::chunks;
use super::encoding::{
    chunk_key, corrupt, decode_offset_key, decode_timer_key, decode_value, encode_value,
    offset_key, payload_key, take_value, timer_key,
};
use crate::engine::{
    KeyState, Millis, PartitionMeta, SourceOffset, StateStore, StoreError, TimerKind, Unchanged,
    UserStats,
};
use compact_str::CompactString;
use rocksdb::properties::{SIZE_ALL_MEM_TABLES, TOTAL_SST_FILES_SIZE};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    FlushOptions, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use rustc_hash::FxHashMap;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) const CF_KEYS: &str = "keys";
pub(crate) const CF_STATS: &str = "stats";
pub(crate) const CF_DEADLINE: &str = "deadline_timers";
pub(crate) const CF_QUIET: &str = "quiet_timers";
pub(crate) const CF_PAYLOADS: &str = "payloads";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_CHUNKS: &str = "event_chunks";
const COLUMN_FAMILIES: [&str; 7] = [
    CF_KEYS,
    CF_CHUNKS,
    CF_STATS,
    CF_DEADLINE,
    CF_QUIET,
    CF_PAYLOADS,
    CF_META,
];
pub(crate) const META_KEY: &[u8] = b"meta";
/// Meta key of the local checkpoint: the next changelog offset this database reflects.
const CHECKPOINT_KEY: &[u8] = b"changelog-checkpoint";
/// Meta key of the state format, written with every commit (so every committed state, and
/// every changelog, has it), checked on open and after a restore.
const FORMAT_KEY: &[u8] = b"state-format";
/// The encoding of the records: 1, key states with their open events field by field (before
/// 2026-11-23, commit 7c2b21f; those databases have no format key); 2, open events in a
/// compact form within the key state (until 2026-11-24); 3, open events in chunks of their
/// own (`event_chunks`, see [`super::chunks`]), the key state without them.
pub const STATE_FORMAT: u32 = 3;
const BLOCK_CACHE_BYTES: usize = 32 << 20;

/// Tuning of a [`RocksStore`].
#[derive(Clone, Debug)]
pub struct RocksOptions {
    /// Without a [`Self::memory`] budget: the maximum number of decoded `KeyState`s (and,
    /// separately, `UserStats`) kept in memory between commits; entries used since the last
    /// commit are kept regardless.
    pub cache_keys: usize,
    /// The memory budget shared by the process's stores (the streaming mode's); without one,
    /// each database has its own block cache and memtables and [`Self::cache_keys`] bounds
    /// the decoded entries.
    pub memory: Option<StateMemory>,
    /// Whether the store takes a share of the budget's decoded half: not for standby copies,
    /// which only apply changelog records and cache nothing.
    pub decoded_share: bool,
}

impl Default for RocksOptions {
    fn default() -> Self {
        Self {
            cache_keys: 100_000,
            memory: None,
            decoded_share: true,
        }
    }
}

impl RocksOptions {
    /// Options within the shared budget `memory`.
    pub fn within(memory: &StateMemory) -> Self {
        Self {
            memory: Some(memory.clone()),
            ..Self::default()
        }
    }

    /// Options of a store that only applies changelog records (a standby copy) within the
    /// shared budget `memory`: RocksDB's part only.
    pub fn copy_within(memory: &StateMemory) -> Self {
        Self {
            decoded_share: false,
            ..Self::within(memory)
        }
    }
}

/// Entries sampled to estimate a cache's size (see [`estimate`]).
const SAMPLE: usize = 64;

/// Fails unless the database is empty or holds state of [`STATE_FORMAT`]: committed state
/// without a format key is format 1.
fn check_format(db: &DB) -> Result<(), StoreError> {
    let meta = cf(db, CF_META)?;
    let found = match db.get_pinned_cf(meta, FORMAT_KEY).map_err(backend)? {
        Some(v) => decode_value::<u32>(CF_META, &v)?,
        None if db.get_pinned_cf(meta, META_KEY).map_err(backend)?.is_some() => 1,
        None => return Ok(()),
    };
    if found == STATE_FORMAT {
        Ok(())
    } else {
        Err(StoreError::Format {
            found,
            expected: STATE_FORMAT,
        })
    }
}

fn backend(e: rocksdb::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, StoreError> {
    db.cf_handle(name)
        .ok_or_else(|| StoreError::Backend(format!("column family {name} is missing")))
}

/// A cached decoded record.
#[derive(Debug)]
struct Cached<T> {
    value: T,
    /// Changed since the last commit.
    dirty: bool,
    /// Commit generation in which it was last used.
    gen: u64,
    /// Generation of the last commit whose batch holds this value (0: none yet).
    staged: u64,
    /// Key states only: changed before the boundary of the staged commit being collected, and
    /// not collected into it yet (see [`Collecting`]).
    owed: bool,
}

impl<T> Cached<T> {
    fn new(value: T, gen: u64) -> Self {
        Self {
            value,
            dirty: false,
            gen,
            staged: 0,
            owed: false,
        }
    }
}

/// A staged commit whose key states are still being encoded (changelog mode). A commit only
/// marks the keys it owes (those changed in its interval); their records are encoded later,
/// a few at a time between records ([`RocksStore::collect`]), or at once when one is about
/// to change again (so what is encoded is the state as of the commit), or when the changes
/// are taken. The commit's other records, which are cheap, are encoded at once and come last.
#[derive(Debug)]
struct Collecting {
    gen: u64,
    /// The keys owed, collected from the back; some may have been collected already.
    owed: Vec<String>,
    /// The records of the keys collected so far.
    changes: Vec<Change>,
    /// The commit's other records: user stats, payloads, timers, offsets, then the meta (the
    /// commit marker).
    rest: Vec<Change>,
}

/// A cached key state, with the layout of its open events as last written (or staged): what
/// the next commit's chunk writes are relative to.
#[derive(Debug, Default)]
struct KeyEntry {
    state: KeyState,
    written: Vec<(u64, u32)>,
}

impl KeyEntry {
    fn heap_bytes(&self) -> usize {
        self.state.heap_bytes() + self.written.capacity() * std::mem::size_of::<(u64, u32)>()
    }
}

/// An uncommitted payload write: `Some` put, `None` delete.
#[derive(Debug)]
struct PayloadWrite {
    value: Option<Vec<u8>>,
    /// Changed since the last commit was built.
    dirty: bool,
    /// Generation of the last commit whose batch holds this write (0: none yet).
    staged: u64,
}

/// One timer index: the full set in memory, plus the difference to the database
/// (`true`: the entry must be put, `false`: deleted). Invariant: the database content with
/// `pending` applied equals `set`.
#[derive(Debug)]
struct TimerIndex {
    cf: &'static str,
    set: BTreeSet<(Millis, CompactString)>,
    pending: FxHashMap<(Millis, CompactString), bool>,
}

impl TimerIndex {
    fn load(db: &DB, name: &'static str) -> Result<Self, StoreError> {
        let mut set = BTreeSet::new();
        for item in db.iterator_cf(cf(db, name)?, IteratorMode::Start) {
            let (k, _) = item.map_err(backend)?;
            let (at, key) = decode_timer_key(name, &k)?;
            set.insert((at, CompactString::from(key)));
        }
        Ok(Self {
            cf: name,
            set,
            pending: FxHashMap::default(),
        })
    }

    fn add(&mut self, at: Millis, key: &str) {
        let entry = (at, CompactString::from(key));
        if self.set.contains(&entry) {
            return;
        }
        // A pending delete means the database has the entry: cancelling the delete suffices.
        if self.pending.remove(&entry) != Some(false) {
            self.pending.insert(entry.clone(), true);
        }
        self.set.insert(entry);
    }

    fn pop_due(&mut self, before: Millis, out: &mut Vec<(Millis, CompactString)>) {
        let start = out.len();
        super::pop_due_from(&mut self.set, before, out);
        for entry in &out[start..] {
            // A pending put means the entry never reached the database: dropping it suffices.
            if self.pending.remove(entry) != Some(true) {
                self.pending.insert(entry.clone(), false);
            }
        }
    }
}

/// The RocksDB state store. See the module documentation.
pub struct RocksStore {
    db: Arc<DB>,
    path: PathBuf,
    opts: RocksOptions,
    keys: FxHashMap<String, Cached<KeyEntry>>,
    stats: FxHashMap<String, Cached<UserStats>>,
    /// Payload writes not yet in the database, by encoded payload key.
    payloads: FxHashMap<Vec<u8>, PayloadWrite>,
    deadline: TimerIndex,
    quiet: TimerIndex,
    /// Commit generation, bumped at each commit (starts at 1).
    gen: u64,
    /// Changelog mode: `commit` only records the changes (see
    /// [`RocksStore::enable_changelog`]).
    capture: bool,
    /// Generations of the staged commits not written yet, oldest first.
    staged: VecDeque<u64>,
    /// The newest staged commit, while its key states are being collected.
    collecting: Option<Collecting>,
    /// The changes of the newest staged commit, once collected, until taken.
    changes: Option<Vec<Change>>,
    /// The keys changed since the last commit (each once), in the order they first changed.
    dirty_keys: Vec<String>,
    /// Scratch space: the new layout of a key being written, in the allocation of the one
    /// it replaces.
    layout: Vec<(u64, u32)>,
    /// Restored records written without the write-ahead log and not flushed yet.
    unflushed: bool,
    /// This store's place in the memory budget, if there is one.
    _budget: Option<Registration>,
}

impl fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .field("opts", &self.opts)
            .field("cached_keys", &self.keys.len())
            .field("cached_stats", &self.stats.len())
            .field("gen", &self.gen)
            .finish_non_exhaustive()
    }
}

impl RocksStore {
    /// Opens (creating if needed) the database in directory `path`, with its column families,
    /// and loads the timer indexes.
    pub fn open(path: &Path, opts: RocksOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| {
            StoreError::Backend(format!("cannot create directory {}: {e}", path.display()))
        })?;
        let own_cache;
        let cache = match &opts.memory {
            Some(m) => m.cache(),
            None => {
                own_cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
                &own_cache
            }
        };
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(cache);
        table.set_bloom_filter(10.0, false);
        let mut cf_opts = Options::default();
        cf_opts.set_compression_type(DBCompressionType::Lz4);
        cf_opts.set_block_based_table_factory(&table);

        let mut db_opts = cf_opts.clone();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // State and offsets span column families; keep their flushes consistent too.
        db_opts.set_atomic_flush(true);
        db_opts.set_max_background_jobs(2);
        match &opts.memory {
            Some(m) => db_opts.set_write_buffer_manager(m.buffers()),
            None => db_opts.set_db_write_buffer_size(64 << 20),
        }
        db_opts.set_keep_log_file_num(4);

        // RocksDB insists on opening every existing column family.
        let mut names: Vec<String> = COLUMN_FAMILIES.iter().map(|s| s.to_string()).collect();
        if let Ok(existing) = DB::list_cf(&db_opts, path) {
            for name in existing {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        let descriptors = names
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_opts.clone()));
        let db = DB::open_cf_descriptors(&db_opts, path, descriptors).map_err(backend)?;
        check_format(&db)?;
        let deadline = TimerIndex::load(&db, CF_DEADLINE)?;
        let quiet = TimerIndex::load(&db, CF_QUIET)?;
        let budget = opts
            .memory
            .as_ref()
            .filter(|_| opts.decoded_share)
            .map(StateMemory::register);
        Ok(Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
            opts,
            keys: FxHashMap::default(),
            stats: FxHashMap::default(),
            payloads: FxHashMap::default(),
            deadline,
            quiet,
            gen: 1,
            capture: false,
            staged: VecDeque::new(),
            collecting: None,
            changes: None,
            dirty_keys: Vec::new(),
            layout: Vec::new(),
            unflushed: false,
            _budget: budget,
        })
    }

    /// Deletes the database in `path` (state that cannot be trusted), if any.
    pub fn destroy(path: &Path) -> Result<(), StoreError> {
        match std::fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Backend(format!(
                "cannot delete {}: {e}",
                path.display()
            ))),
        }
    }

    /// Changelog mode. From now on [`StateStore::commit`] does not write: it stages the commit
    /// and records every write as a [`Change`]. The caller takes them with
    /// [`Self::take_changes`] (before the next commit), publishes them, and later writes them
    /// with [`Self::write_staged`], or with [`Self::writer`] and then
    /// [`Self::staged_written`]; or drops the store to discard every staged commit. The store
    /// stays usable meanwhile, and further commits may be staged.
    pub fn enable_changelog(&mut self) {
        self.capture = true;
    }

    /// The changes of the newest staged commit, in write order; the commit marker comes last.
    /// Collects whatever of it is still owed first (see [`Self::collect`]).
    pub fn take_changes(&mut self) -> Result<Vec<Change>, StoreError> {
        self.collect(usize::MAX)?;
        Ok(self.changes.take().unwrap_or_default())
    }

    /// Encodes up to `max` of the key states the newest staged commit still owes (see
    /// [`Collecting`]); true once none is left (then [`Self::take_changes`] costs nothing more).
    /// A commit's work spread this way between records keeps the consumer from stopping for
    /// all of it at once.
    pub fn collect(&mut self, max: usize) -> Result<bool, StoreError> {
        let Some(mut col) = self.collecting.take() else {
            return Ok(true);
        };
        let tables = KeyTables::of(&self.db)?;
        let mut w = Writes::Changes(&mut col.changes);
        let mut left = max;
        while left > 0 {
            let Some(key) = col.owed.pop() else {
                break;
            };
            // Collected already if it changed again since the commit; gone only if never
            // owed (a commit owes exactly the keys changed in its interval, and keeps them).
            if let Some(c) = self.keys.get_mut(&key).filter(|c| c.owed) {
                write_key(&key, c, col.gen, &mut self.layout, &mut w, tables)?;
                left -= 1;
            }
        }
        if col.owed.is_empty() {
            col.changes.append(&mut col.rest);
            self.changes = Some(col.changes);
            Ok(true)
        } else {
            self.collecting = Some(col);
            Ok(false)
        }
    }

    /// Whether the newest staged commit still owes key states (see [`Self::collect`]).
    pub fn collecting(&self) -> bool {
        self.collecting.is_some()
    }

    /// Number of staged commits not written yet.
    pub fn staged_commits(&self) -> usize {
        self.staged.len()
    }

    /// A handle that writes this database's staged commits, from any thread.
    pub fn writer(&self) -> StateWriter {
        StateWriter {
            db: Arc::clone(&self.db),
        }
    }

    /// Writes the oldest staged commit, whose changes are `changes`, with the changelog
    /// position it reaches (`checkpoint`: the next changelog offset after its records).
    pub fn write_staged(
        &mut self,
        changes: &[Change],
        checkpoint: Option<i64>,
    ) -> Result<(), StoreError> {
        if self.staged.is_empty() {
            return Err(StoreError::Backend("no staged commit to write".into()));
        }
        self.writer().write(changes, checkpoint)?;
        self.staged_written()
    }

    /// The oldest staged commit has been written (through [`Self::writer`]): what only it
    /// held need not stay in memory any more.
    pub fn staged_written(&mut self) -> Result<(), StoreError> {
        let gen = self
            .staged
            .pop_front()
            .ok_or_else(|| StoreError::Backend("no staged commit to write".into()))?;
        self.settle_written(gen);
        Ok(())
    }

    /// The next changelog offset this database reflects, if it was ever checkpointed.
    pub fn changelog_checkpoint(&self) -> Result<Option<i64>, StoreError> {
        self.db_get(CF_META, CHECKPOINT_KEY)
    }

    /// Applies changelog records (complete commits) and the new checkpoint in one batch.
    /// Only for a freshly opened store that has not been used yet; call
    /// [`Self::finish_restore`] afterwards.
    pub fn apply_changes(&mut self, changes: &[Change], checkpoint: i64) -> Result<(), StoreError> {
        self.writer().write(changes, Some(checkpoint))?;
        self.unflushed = true;
        Ok(())
    }

    /// After [`Self::apply_changes`]: makes the restored state durable (it was written
    /// without the write-ahead log), reloads the timer indexes and drops every cache.
    pub fn finish_restore(&mut self) -> Result<(), StoreError> {
        if std::mem::take(&mut self.unflushed) {
            let handles: Vec<&ColumnFamily> = COLUMN_FAMILIES
                .iter()
                .map(|name| cf(&self.db, name))
                .collect::<Result<_, _>>()?;
            self.db
                .flush_cfs_opt(&handles, &FlushOptions::default())
                .map_err(backend)?;
        }
        check_format(&self.db)?;
        self.deadline = TimerIndex::load(&self.db, CF_DEADLINE)?;
        self.quiet = TimerIndex::load(&self.db, CF_QUIET)?;
        self.keys.clear();
        self.stats.clear();
        self.payloads.clear();
        self.dirty_keys.clear();
        self.collecting = None;
        self.changes = None;
        Ok(())
    }

    /// The database has every value staged up to generation `gen`: those need not stay in
    /// memory.
    fn settle_written(&mut self, gen: u64) {
        match self.opts.memory.as_ref().map(StateMemory::decoded_share) {
            Some(share) => {
                if self.cached_bytes() > share {
                    settle(&mut self.keys, 0, gen);
                    settle(&mut self.stats, 0, gen);
                    // A large interval (catching up) may have grown the tables far beyond
                    // what stays: give the memory back.
                    shrink(&mut self.keys);
                    shrink(&mut self.stats);
                }
            }
            None => {
                let limit = self.opts.cache_keys;
                settle(&mut self.keys, limit, gen);
                settle(&mut self.stats, limit, gen);
            }
        }
        self.payloads.retain(|_, w| w.dirty || w.staged > gen);
    }

    /// About how many bytes the decoded key states and user stats cached take, their hash
    /// tables included.
    pub fn cached_bytes(&self) -> usize {
        estimate(&self.keys, KeyEntry::heap_bytes) + estimate(&self.stats, |_| 0)
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of decoded `KeyState`s currently cached.
    pub fn cached_keys(&self) -> usize {
        self.keys.len()
    }

    /// Flushes every column family's memtable and compacts it fully: what is left on disk is
    /// one version of each live record (for size measurements; not used in service).
    pub fn flush_and_compact(&self) -> Result<(), StoreError> {
        for name in COLUMN_FAMILIES {
            let h = cf(&self.db, name)?;
            self.db.flush_cf(h).map_err(backend)?;
            self.db.compact_range_cf(h, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Approximate size of the database: SST files plus memtables, over all column families.
    pub fn approx_size_bytes(&self) -> u64 {
        COLUMN_FAMILIES
            .iter()
            .filter_map(|name| self.db.cf_handle(name))
            .flat_map(|h| {
                [TOTAL_SST_FILES_SIZE, SIZE_ALL_MEM_TABLES].map(|p| {
                    self.db
                        .property_int_value_cf(h, p)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                })
            })
            .sum()
    }

    /// The cache entry of `key`, which the caller has just made sure exists, marked used (and
    /// changed, with `dirty`). If the staged commit being collected owes it, it is collected
    /// first: it may be about to change.
    fn cached_key(&mut self, key: &str, dirty: bool) -> Result<&mut Cached<KeyEntry>, StoreError> {
        let gen = self.gen;
        let c = self
            .keys
            .get_mut(key)
            .ok_or_else(|| StoreError::Backend(format!("key {key:?} vanished from the cache")))?;
        if c.owed {
            let col = self.collecting.as_mut().ok_or_else(|| {
                StoreError::Backend(format!("key {key:?} is owed to no staged commit"))
            })?;
            let mut w = Writes::Changes(&mut col.changes);
            let tables = KeyTables::of(&self.db)?;
            write_key(key, c, col.gen, &mut self.layout, &mut w, tables)?;
        }
        c.gen = gen;
        if dirty && !c.dirty {
            c.dirty = true;
            self.dirty_keys.push(key.to_owned());
        }
        Ok(c)
    }

    fn index(&mut self, kind: TimerKind) -> &mut TimerIndex {
        match kind {
            TimerKind::Deadline => &mut self.deadline,
            TimerKind::Quiet => &mut self.quiet,
        }
    }

    fn db_get<T: serde::de::DeserializeOwned>(
        &self,
        table: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self
            .db
            .get_pinned_cf(cf(&self.db, table)?, key)
            .map_err(backend)?
        {
            Some(bytes) => decode_value(table, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// `f` of the key state of `key` in the database, without its open events, and the bytes
    /// after it in its record (the sessions' tails).
    fn db_key_record<R>(
        &self,
        key: &str,
        f: impl FnOnce(KeyState, &[u8]) -> Result<R, StoreError>,
    ) -> Result<Option<R>, StoreError> {
        let Some(bytes) = self
            .db
            .get_pinned_cf(cf(&self.db, CF_KEYS)?, key.as_bytes())
            .map_err(backend)?
        else {
            return Ok(None);
        };
        let (state, tails) = take_value::<KeyState>(CF_KEYS, &bytes)?;
        f(state, tails).map(Some)
    }

    /// A key state from the database: its record, then each session's sealed chunks and its
    /// tail (see [`chunks`]).
    fn load_key(&self, key: &str) -> Result<Option<KeyEntry>, StoreError> {
        self.db_key_record(key, |state, tails| self.with_events(key, state, tails))
    }

    /// `state`, read without its events, with them: each session's sealed chunks from the
    /// database, then its tail from `tails`.
    fn with_events(
        &self,
        key: &str,
        mut state: KeyState,
        mut tails: &[u8],
    ) -> Result<KeyEntry, StoreError> {
        let chunks_cf = cf(&self.db, CF_CHUNKS)?;
        // Decoding `n` events where `want` belong: the error names the table and the part.
        let expect = |table, what: &dyn Fn() -> String, n: usize, want: usize| {
            if n == want {
                return Ok(());
            }
            Err(corrupt(
                table,
                format!("{} holds {n} events, not {want}", what()),
            ))
        };
        let total: usize = state.sessions.iter().map(|s| s.count as usize).sum();
        state.events.reserve_exact(total);
        for s in &state.sessions {
            for i in 0..chunks::sealed(s.count) {
                let what = || format!("chunk {i} of session {} of key {key:?}", s.num);
                let bytes = self
                    .db
                    .get_pinned_cf(chunks_cf, chunk_key(key, s.num, i)?)
                    .map_err(backend)?
                    .ok_or_else(|| corrupt(CF_CHUNKS, format!("{} is missing", what())))?;
                let n = chunks::decode(&bytes, s.num, &mut state.events)
                    .map_err(|e| corrupt(CF_CHUNKS, format!("key {key:?}: {e}")))?;
                expect(CF_CHUNKS, &what, n, chunks::CHUNK_EVENTS)?;
            }
            let (n, rest) = chunks::decode_prefix(tails, s.num, &mut state.events)
                .map_err(|e| corrupt(CF_KEYS, format!("key {key:?}: {e}")))?;
            let what = || format!("the tail of session {} of key {key:?}", s.num);
            expect(CF_KEYS, &what, n, chunks::tail_len(s.count))?;
            tails = rest;
        }
        if !tails.is_empty() {
            return Err(corrupt(CF_KEYS, format!("key {key:?}: trailing bytes")));
        }
        state.unchanged = Unchanged::new(state.events.len());
        let mut written = Vec::new();
        chunks::layout_into(&state, &mut written);
        Ok(KeyEntry { state, written })
    }

    /// Caches `value` as the entry of `key` (not cached yet), clean.
    fn cache_key(&mut self, key: &str, value: KeyEntry) {
        self.keys
            .insert(key.to_owned(), Cached::new(value, self.gen));
    }

    /// Collects the commit's records other than the key states': the user stats, payloads
    /// and timer entries changed, `offsets` and `meta` (last: the changelog's commit marker).
    /// What is collected is marked clean and staged in generation `gen`.
    fn write_rest(
        &mut self,
        w: &mut Writes<'_>,
        gen: u64,
        meta: &PartitionMeta,
        offsets: &[SourceOffset],
    ) -> Result<(), StoreError> {
        let stats_cf = cf(&self.db, CF_STATS)?;
        for (user, c) in self.stats.iter_mut().filter(|(_, c)| c.dirty) {
            w.put(
                stats_cf,
                CF_STATS,
                user.as_bytes(),
                encode_value(CF_STATS, &c.value)?,
            );
            c.dirty = false;
            c.staged = gen;
        }
        let payloads_cf = cf(&self.db, CF_PAYLOADS)?;
        for (key, p) in self.payloads.iter_mut().filter(|(_, p)| p.dirty) {
            match &p.value {
                Some(v) => w.put(payloads_cf, CF_PAYLOADS, key, v.clone()),
                None => w.delete(payloads_cf, CF_PAYLOADS, key),
            }
            p.dirty = false;
            p.staged = gen;
        }
        // The indexes are entirely in memory: once in a batch, a difference is no longer
        // pending (it is relative to the database plus the staged batches).
        for index in [&mut self.deadline, &mut self.quiet] {
            let timers_cf = cf(&self.db, index.cf)?;
            for ((at, key), put) in index.pending.drain() {
                let k = timer_key(at, &key);
                if put {
                    w.put(timers_cf, index.cf, &k, Vec::new());
                } else {
                    w.delete(timers_cf, index.cf, &k);
                }
            }
        }
        let meta_cf = cf(&self.db, CF_META)?;
        for o in offsets {
            w.put(
                meta_cf,
                CF_META,
                &offset_key(&o.topic, o.partition),
                encode_value(CF_META, &o.next_offset)?,
            );
        }
        w.put(
            meta_cf,
            CF_META,
            FORMAT_KEY,
            encode_value(CF_META, &STATE_FORMAT)?,
        );
        w.put(meta_cf, CF_META, META_KEY, encode_value(CF_META, meta)?);
        Ok(())
    }
}

/// The column families a key state is written to: its record's and its chunks'.
#[derive(Clone, Copy)]
struct KeyTables<'a> {
    keys: &'a ColumnFamily,
    chunks: &'a ColumnFamily,
}

impl<'a> KeyTables<'a> {
    fn of(db: &'a DB) -> Result<Self, StoreError> {
        Ok(Self {
            keys: cf(db, CF_KEYS)?,
            chunks: cf(db, CF_CHUNKS)?,
        })
    }
}

/// Writes the record of the key state `c` of `key` and the chunks of its events that changed
/// since the layout last written (puts and deletes, see [`chunks::plan`]), and marks it clean
/// and staged in generation `gen`. `layout` is scratch space.
fn write_key(
    key: &str,
    c: &mut Cached<KeyEntry>,
    gen: u64,
    layout: &mut Vec<(u64, u32)>,
    w: &mut Writes<'_>,
    tables: KeyTables<'_>,
) -> Result<(), StoreError> {
    let entry = &mut c.value;
    chunks::check(&entry.state)?;
    chunks::layout_into(&entry.state, layout);
    chunks::plan(&entry.state, &entry.written, layout, |num, i, events| {
        let k = chunk_key(key, num, i)?;
        match events {
            Some(events) => {
                let mut v = Vec::new();
                chunks::encode(events, &mut v);
                w.put(tables.chunks, CF_CHUNKS, &k, v);
            }
            None => w.delete(tables.chunks, CF_CHUNKS, &k),
        }
        Ok(())
    })?;
    let mut record = encode_value(CF_KEYS, &entry.state)?;
    chunks::encode_tails(&entry.state, &mut record);
    w.put(tables.keys, CF_KEYS, key.as_bytes(), record);
    // The new layout is the written one; the old one's allocation is the next scratch.
    std::mem::swap(&mut entry.written, layout);
    entry.state.unchanged = Unchanged::new(entry.state.events.len());
    c.dirty = false;
    c.owed = false;
    c.staged = gen;
    Ok(())
}

/// Where a commit's records go: a write batch, or (changelog mode) the changes.
enum Writes<'a> {
    Batch(&'a mut WriteBatch),
    Changes(&'a mut Vec<Change>),
}

impl Writes<'_> {
    fn put(&mut self, handle: &ColumnFamily, cf: &str, key: &[u8], value: Vec<u8>) {
        match self {
            Writes::Batch(b) => b.put_cf(handle, key, &value),
            Writes::Changes(c) => c.push(Change {
                key: change_key(cf, key),
                value: Some(value),
            }),
        }
    }

    fn delete(&mut self, handle: &ColumnFamily, cf: &str, key: &[u8]) {
        match self {
            Writes::Batch(b) => b.delete_cf(handle, key),
            Writes::Changes(c) => c.push(Change {
                key: change_key(cf, key),
                value: None,
            }),
        }
    }
}

/// Writes the staged commits of one [`RocksStore`]'s database, from any thread (see the
/// module docs). Holding one keeps the database open.
#[derive(Clone)]
pub struct StateWriter {
    db: Arc<DB>,
}

impl fmt::Debug for StateWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateWriter").finish_non_exhaustive()
    }
}

impl StateWriter {
    /// Writes `changes` (changelog records) and, if given, the changelog `checkpoint` they
    /// reach, in one batch, without the write-ahead log: the changelog is the durable copy,
    /// and the checkpoint in the same batch tells a reopened database where to replay from
    /// (atomic flush keeps the column families in step).
    pub fn write(&self, changes: &[Change], checkpoint: Option<i64>) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for c in changes {
            let (code, key) = c.key.split_first().ok_or_else(|| StoreError::Corrupt {
                table: "changelog",
                detail: "empty record key".into(),
            })?;
            let name = cf_of(*code).ok_or_else(|| StoreError::Corrupt {
                table: "changelog",
                detail: format!("unknown column family code {code}"),
            })?;
            let handle = cf(&self.db, name)?;
            match &c.value {
                Some(v) => batch.put_cf(handle, key, v),
                None => batch.delete_cf(handle, key),
            }
        }
        if let Some(c) = checkpoint {
            batch.put_cf(
                cf(&self.db, CF_META)?,
                CHECKPOINT_KEY,
                encode_value(CF_META, &c)?,
            );
        }
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        self.db.write_opt(batch, &opts).map_err(backend)
    }
}

/// About how many bytes `cache` takes: its table (every slot, with its control byte), plus
/// its length times the mean heap size (key and value allocations, from `heap`) of up to
/// [`SAMPLE`] entries, in hash order: a sample without a pattern.
fn estimate<T>(cache: &FxHashMap<String, Cached<T>>, heap: impl Fn(&T) -> usize) -> usize {
    let (n, total) = cache
        .iter()
        .take(SAMPLE)
        .fold((0, 0), |(n, total), (k, c)| {
            (n + 1, total + k.capacity() + heap(&c.value))
        });
    let table = cache.capacity() * (std::mem::size_of::<(String, Cached<T>)>() + 1);
    table + total.checked_div(n).map_or(0, |mean| mean * cache.len())
}

/// Gives back a hash table's memory beyond twice what it holds.
fn shrink<T>(cache: &mut FxHashMap<String, Cached<T>>) {
    if cache.capacity() > 4 * cache.len().max(16) {
        cache.shrink_to(2 * cache.len());
    }
}

/// After the batch of generation `gen` is written: if the cache is over `limit`, drops the
/// entries that are clean, whose newest value is in the database and that were not used since
/// generation `gen` began.
fn settle<T>(cache: &mut FxHashMap<String, Cached<T>>, limit: usize, gen: u64) {
    if cache.len() > limit {
        cache.retain(|_, c| c.dirty || c.staged > gen || c.gen >= gen);
    }
}

impl StateStore for RocksStore {
    /// From the cache, the state is moved out and a default placeholder left in its slot (never
    /// observable: the engine always puts the state back before reading the key again).
    ///
    /// A state read from the database is cached too (clean), so that the layout it was written
    /// in stays known when it is put back.
    fn take_key(&mut self, key: &str) -> Result<Option<KeyState>, StoreError> {
        if !self.keys.contains_key(key) {
            let Some(entry) = self.load_key(key)? else {
                return Ok(None);
            };
            self.cache_key(key, entry);
        }
        let c = self.cached_key(key, false)?;
        Ok(Some(std::mem::take(&mut c.value.state)))
    }

    /// Puts back what [`StateStore::take_key`] or [`StateStore::key_mut`] gave (a state from
    /// elsewhere must have [`KeyState::unchanged`] at its default, none).
    fn put_key(&mut self, key: &str, state: KeyState) -> Result<(), StoreError> {
        if !self.keys.contains_key(key) {
            // Never taken: the layout written is the database's.
            let mut written = Vec::new();
            self.db_key_record(key, |st, _| {
                chunks::layout_into(&st, &mut written);
                Ok(())
            })?;
            let entry = KeyEntry {
                state: KeyState::default(),
                written,
            };
            self.cache_key(key, entry);
        }
        let c = self.cached_key(key, true)?;
        c.value.state = state;
        Ok(())
    }

    fn key_mut(&mut self, key: &str, user: &str) -> Result<&mut KeyState, StoreError> {
        if !self.keys.contains_key(key) {
            let value = self.load_key(key)?.unwrap_or_else(|| KeyEntry {
                state: KeyState {
                    user: user.to_owned(),
                    ..KeyState::default()
                },
                written: Vec::new(),
            });
            self.cache_key(key, value);
        }
        let c = self.cached_key(key, true)?;
        Ok(&mut c.value.state)
    }

    fn get_stats(&mut self, user: &str) -> Result<Option<UserStats>, StoreError> {
        if let Some(c) = self.stats.get_mut(user) {
            c.gen = self.gen;
            return Ok(Some(c.value.clone()));
        }
        let found: Option<UserStats> = self.db_get(CF_STATS, user.as_bytes())?;
        if let Some(stats) = &found {
            self.stats
                .insert(user.to_owned(), Cached::new(stats.clone(), self.gen));
        }
        Ok(found)
    }

    fn put_stats(&mut self, user: &str, stats: &UserStats) -> Result<(), StoreError> {
        let gen = self.gen;
        match self.stats.get_mut(user) {
            Some(c) => {
                c.value.clone_from(stats);
                c.dirty = true;
                c.gen = gen;
            }
            None => {
                let mut c = Cached::new(stats.clone(), gen);
                c.dirty = true;
                self.stats.insert(user.to_owned(), c);
            }
        }
        Ok(())
    }

    fn add_timer(&mut self, kind: TimerKind, at: Millis, key: &str) -> Result<(), StoreError> {
        self.index(kind).add(at, key);
        Ok(())
    }

    fn pop_due(
        &mut self,
        kind: TimerKind,
        before: Millis,
        out: &mut Vec<(Millis, CompactString)>,
    ) -> Result<(), StoreError> {
        self.index(kind).pop_due(before, out);
        Ok(())
    }

    fn timers(&mut self, kind: TimerKind) -> Result<Vec<(Millis, String)>, StoreError> {
        Ok(self
            .index(kind)
            .set
            .iter()
            .map(|(at, k)| (*at, k.to_string()))
            .collect())
    }

    fn put_payload(&mut self, key: &str, tie: u64, payload: &[u8]) -> Result<(), StoreError> {
        let value = Some(payload.to_vec());
        match self.payloads.entry(payload_key(key, tie)?) {
            Entry::Occupied(mut o) => {
                let w = o.get_mut();
                w.value = value;
                w.dirty = true;
            }
            Entry::Vacant(v) => {
                v.insert(PayloadWrite {
                    value,
                    dirty: true,
                    staged: 0,
                });
            }
        }
        Ok(())
    }

    fn take_payload(&mut self, key: &str, tie: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let k = payload_key(key, tie)?;
        if let Some(w) = self.payloads.get_mut(&k) {
            // A write not in the database yet decides; either way it is now deleted.
            w.dirty = true;
            return Ok(w.value.take());
        }
        let found = self
            .db
            .get_cf(cf(&self.db, CF_PAYLOADS)?, &k)
            .map_err(backend)?;
        if found.is_some() {
            let w = PayloadWrite {
                value: None,
                dirty: true,
                staged: 0,
            };
            self.payloads.insert(k, w);
        }
        Ok(found)
    }

    fn load_meta(&mut self) -> Result<Option<PartitionMeta>, StoreError> {
        self.db_get(CF_META, META_KEY)
    }

    /// In encoded key order: by topic, then partition.
    fn committed_offsets(&mut self) -> Result<Vec<SourceOffset>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf(&self.db, CF_META)?, IteratorMode::Start)
        {
            let (k, v) = item.map_err(backend)?;
            if &*k == META_KEY || &*k == CHECKPOINT_KEY || &*k == FORMAT_KEY {
                continue;
            }
            let (topic, partition) = decode_offset_key(CF_META, &k)?;
            out.push(SourceOffset {
                topic,
                partition,
                next_offset: decode_value(CF_META, &v)?,
            });
        }
        Ok(out)
    }

    /// In changelog mode this only stages the commit (see [`RocksStore::enable_changelog`]),
    /// and leaves its key states to be collected (see [`RocksStore::collect`]).
    fn commit(&mut self, meta: &PartitionMeta, offsets: &[SourceOffset]) -> Result<(), StoreError> {
        if self.changes.is_some() || self.collecting.is_some() {
            return Err(StoreError::Backend(
                "the changes of the previous staged commit were never taken".into(),
            ));
        }
        let gen = self.gen;
        self.gen += 1;
        let dirty = std::mem::take(&mut self.dirty_keys);
        let vanished =
            |key: &str| StoreError::Backend(format!("changed key {key:?} is not cached"));
        if self.capture {
            for key in &dirty {
                let c = self.keys.get_mut(key).ok_or_else(|| vanished(key))?;
                c.dirty = false;
                c.owed = true;
                c.staged = gen;
            }
            let mut rest = Vec::new();
            self.write_rest(&mut Writes::Changes(&mut rest), gen, meta, offsets)?;
            self.staged.push_back(gen);
            self.collecting = Some(Collecting {
                gen,
                // At least a record per key.
                changes: Vec::with_capacity(dirty.len()),
                owed: dirty,
                rest,
            });
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        {
            let tables = KeyTables::of(&self.db)?;
            let mut w = Writes::Batch(&mut batch);
            for key in &dirty {
                let c = self.keys.get_mut(key).ok_or_else(|| vanished(key))?;
                write_key(key, c, gen, &mut self.layout, &mut w, tables)?;
            }
        }
        self.write_rest(&mut Writes::Batch(&mut batch), gen, meta, offsets)?;
        self.db.write(batch).map_err(backend)?;
        self.settle_written(gen);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offset(next_offset: i64) -> SourceOffset {
        SourceOffset {
            topic: "in".into(),
            partition: 0,
            next_offset,
        }
    }

    fn format_error(r: Result<RocksStore, StoreError>) -> Option<u32> {
        match r {
            Err(StoreError::Format { found, expected }) => {
                assert_eq!(expected, STATE_FORMAT);
                Some(found)
            }
            _ => None,
        }
    }

    #[test]
    fn committed_state_carries_its_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RocksStore::open(dir.path(), RocksOptions::default()).expect("open");
        s.commit(&PartitionMeta::default(), &[offset(7)])
            .expect("commit");
        drop(s);
        let mut s = RocksStore::open(dir.path(), RocksOptions::default()).expect("reopen");
        // The format key is not an input offset.
        assert_eq!(s.committed_offsets().expect("offsets"), vec![offset(7)]);
        let meta = cf(&s.db, CF_META).expect("meta");
        let v =
            s.db.get_cf(meta, FORMAT_KEY)
                .expect("get")
                .expect("format key");
        assert_eq!(decode_value::<u32>(CF_META, &v).ok(), Some(STATE_FORMAT));
    }

    #[test]
    fn state_of_another_format_is_refused() {
        // Committed state without a format key: written before formats were recorded (1).
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RocksStore::open(dir.path(), RocksOptions::default()).expect("open");
        let meta = cf(&s.db, CF_META).expect("meta");
        let m = encode_value(CF_META, &PartitionMeta::default()).expect("encode");
        s.db.put_cf(meta, META_KEY, m).expect("put");
        drop(s);
        assert_eq!(
            format_error(RocksStore::open(dir.path(), RocksOptions::default())),
            Some(1)
        );
        // A newer format.
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RocksStore::open(dir.path(), RocksOptions::default()).expect("open");
        let meta = cf(&s.db, CF_META).expect("meta");
        let v = encode_value(CF_META, &(STATE_FORMAT + 1)).expect("encode");
        s.db.put_cf(meta, FORMAT_KEY, v).expect("put");
        drop(s);
        assert_eq!(
            format_error(RocksStore::open(dir.path(), RocksOptions::default())),
            Some(STATE_FORMAT + 1)
        );
    }

    #[test]
    fn a_changelog_of_another_format_is_refused_after_restore() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RocksStore::open(dir.path(), RocksOptions::default()).expect("open");
        let m = encode_value(CF_META, &PartitionMeta::default()).expect("encode");
        let old = [Change {
            key: change_key(CF_META, META_KEY),
            value: Some(m),
        }];
        s.apply_changes(&old, 1).expect("apply");
        assert!(matches!(
            s.finish_restore(),
            Err(StoreError::Format { found: 1, .. })
        ));
    }

    /// A state of about `events` open events.
    fn state(user: &str, events: usize) -> KeyState {
        KeyState {
            user: user.into(),
            events: vec![
                crate::engine::state::OpenEvent {
                    k: crate::engine::EvKey {
                        t: 1_000,
                        rank: 1,
                        timeout: 60_000,
                        tie: 1,
                    },
                    sess: 1,
                };
                events
            ],
            sessions: vec![crate::engine::state::OpenSession {
                num: 1,
                first_t: 1_000,
                count: events as u32,
                touched: 0,
                merged: Vec::new(),
            }],
            ..KeyState::default()
        }
    }

    #[test]
    fn a_memory_budget_bounds_the_decoded_cache() {
        let users = 4_000;
        let run = |opts: RocksOptions| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut s = RocksStore::open(dir.path(), opts).expect("open");
            // About 4,000 x 2.2 kB: over the 2 MiB share of the only store.
            for u in 0..users {
                let k = format!("u{u}");
                s.put_key(&k, state(&k, 50)).expect("put");
            }
            s.commit(&PartitionMeta::default(), &[offset(1)])
                .expect("commit");
            // The next interval touches one key: the rest is evictable once over the bound.
            let mut st = s.take_key("u7").expect("take").expect("u7");
            st.created = 2;
            s.put_key("u7", st).expect("put");
            s.commit(&PartitionMeta::default(), &[offset(2)])
                .expect("commit");
            let cached = (s.cached_keys(), s.cached_bytes());
            // Evicted states read back from the database, unchanged.
            assert_eq!(s.take_key("u9").expect("take"), Some(state("u9", 50)));
            assert_eq!(s.take_key("u7").expect("take").map(|k| k.created), Some(2));
            cached
        };
        let (unbounded, _) = run(RocksOptions::default());
        assert_eq!(unbounded, users, "100,000 entries allowed: all stay");
        let memory = StateMemory::new(4 << 20);
        let (keys, bytes) = run(RocksOptions::within(&memory));
        assert!(
            keys <= 1 && bytes <= memory.decoded_share(),
            "within the budget: {keys} keys, {bytes} bytes"
        );
        assert_eq!(memory.stores(), 0, "the store closed");
        // A standby copy caches nothing: it takes no share.
        let dir = tempfile::tempdir().expect("tempdir");
        let _copy = RocksStore::open(dir.path(), RocksOptions::copy_within(&memory)).expect("open");
        assert_eq!(memory.stores(), 0);
    }

    /// Changelog records of the last staged commit in `keys` and in `event_chunks`.
    fn staged_by_cf(s: &mut RocksStore) -> (usize, usize) {
        let changes = s.take_changes().expect("changes");
        let in_cf = |name| {
            let in_it = |c: &&Change| c.key.first().and_then(|&code| cf_of(code)) == Some(name);
            changes.iter().filter(in_it).count()
        };
        (in_cf(CF_KEYS), in_cf(CF_CHUNKS))
    }

    #[test]
    fn a_commit_writes_the_chunks_filled_since_the_last_one() {
        use crate::engine::{EngineConfig, EvKey};
        let b = EngineConfig::default().boundaries();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RocksStore::open(dir.path(), RocksOptions::default()).expect("open");
        s.enable_changelog();
        let mut changes = Vec::new();
        let mut append = |s: &mut RocksStore, n: u64| {
            let st = s.key_mut("k", "u").expect("key");
            for _ in 0..n {
                let tie = st.arrivals + 1;
                let k = EvKey {
                    t: tie as i64,
                    rank: 1,
                    timeout: 100,
                    tie,
                };
                st.insert(k, 0, &b, &mut changes);
                st.arrivals = tie;
            }
        };
        let commit = |s: &mut RocksStore| {
            s.commit(&PartitionMeta::default(), &[offset(1)])
                .expect("commit");
            let counts = staged_by_cf(s);
            s.staged_written().expect("written");
            counts
        };
        append(&mut s, 70);
        assert_eq!(commit(&mut s), (1, 2), "the key, two full chunks");
        append(&mut s, 1);
        assert_eq!(commit(&mut s), (1, 0), "the key with its tail only");
        append(&mut s, 25);
        assert_eq!(commit(&mut s), (1, 1), "the key and the chunk it filled");
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// An event of key `key`: the clock moves on by `gap`, the event is `back` before it.
        Insert {
            key: u8,
            gap: i64,
            back: i64,
            rank: u8,
        },
        /// The key's sessions that ended before the clock minus `behind` conclude.
        Expire {
            key: u8,
            behind: i64,
        },
        Commit,
        /// Commit, then close and reopen the database.
        CommitAndReopen,
        /// Changelog mode: encode up to this many of the key states the staged commit owes.
        Collect(u8),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let key = 0u8..2;
        prop_oneof![
            20 => (key.clone(), 0i64..60, prop_oneof![3 => Just(0i64), 1 => 0i64..500],
                   prop_oneof![60 => Just(1u8), 1 => Just(0u8), 1 => Just(2u8)])
                .prop_map(|(key, gap, back, rank)| Op::Insert { key, gap, back, rank }),
            1 => (key, 0i64..1_000).prop_map(|(key, behind)| Op::Expire { key, behind }),
            3 => Just(Op::Commit),
            1 => Just(Op::CommitAndReopen),
            3 => (0u8..2).prop_map(Op::Collect),
        ]
    }

    /// The key states `k0` and `k1` as they are now, without touching them (a touch collects
    /// a key owed to a staged commit).
    fn peek_states(s: &RocksStore) -> Vec<Option<KeyState>> {
        ["k0", "k1"]
            .iter()
            .map(|k| match s.keys.get(*k) {
                Some(c) => Some(c.value.state.clone()),
                None => s.load_key(k).expect("load").map(|e| e.state),
            })
            .collect()
    }

    /// The database holds exactly the key states `want` of `k0` and `k1` (their events read
    /// back from their chunks), and no chunk beyond theirs.
    fn check_database(
        s: &mut RocksStore,
        want: &[Option<KeyState>],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::prelude::*;
        let mut chunks_expected = 0;
        for (k, want) in ["k0", "k1"].iter().zip(want) {
            let stored = s.load_key(k).expect("load").map(|e| e.state);
            prop_assert_eq!(want, &stored, "key {}", k);
            if let Some(st) = want {
                chunks_expected += st
                    .sessions
                    .iter()
                    .map(|x| chunks::sealed(x.count))
                    .sum::<u32>();
            }
        }
        let handle = cf(&s.db, CF_CHUNKS).expect("cf");
        let chunks_stored = s.db.iterator_cf(handle, IteratorMode::Start).count();
        prop_assert_eq!(chunks_stored, chunks_expected as usize);
        Ok(())
    }

    /// After every commit the database holds exactly the key states the store has.
    fn check_committed(s: &mut RocksStore) -> Result<(), proptest::test_runner::TestCaseError> {
        let want = peek_states(s);
        check_database(s, &want)
    }

    /// Applies `ops` to a store (in changelog mode with `staged`), checking the database after
    /// every commit is written.
    fn chunk_ops(ops: Vec<Op>, staged: bool) -> Result<(), proptest::test_runner::TestCaseError> {
        use crate::engine::{EngineConfig, EvKey};
        // Sessions of up to about 100 events: several chunks.
        let cfg = EngineConfig {
            max_length: Some(3_000),
            ..EngineConfig::default()
        };
        let b = cfg.boundaries();
        let dir = tempfile::tempdir().expect("tempdir");
        let open = || {
            let mut s = RocksStore::open(
                dir.path(),
                RocksOptions {
                    cache_keys: 1,
                    ..RocksOptions::default()
                },
            )
            .expect("open");
            if staged {
                s.enable_changelog();
            }
            s
        };
        // The staged commit not written yet: the states as of it.
        let mut pending: Option<Vec<Option<KeyState>>> = None;
        let write = |s: &mut RocksStore, pending: &mut Option<Vec<Option<KeyState>>>| {
            if let Some(want) = pending.take() {
                let changes = s.take_changes().expect("changes");
                s.write_staged(&changes, None).expect("write");
                check_database(s, &want)?;
            }
            Ok::<_, proptest::test_runner::TestCaseError>(())
        };
        let mut s = open();
        let mut clock = 1_000i64;
        let mut changes = Vec::new();
        for op in ops {
            match op {
                Op::Insert {
                    key,
                    gap,
                    back,
                    rank,
                } => {
                    clock += gap;
                    let st = s.key_mut(&format!("k{key}"), "u").expect("key");
                    let k = EvKey {
                        t: clock - back,
                        rank,
                        timeout: 100,
                        tie: st.arrivals + 1,
                    };
                    if matches!(
                        st.insert(k, 0, &b, &mut changes),
                        crate::engine::key::Insert::Joined { .. }
                    ) {
                        st.arrivals += 1;
                    }
                }
                Op::Expire { key, behind } => {
                    let k = format!("k{key}");
                    if let Some(mut st) = s.take_key(&k).expect("take") {
                        st.expire(clock - behind, 0, 0, &b, false);
                        s.put_key(&k, st).expect("put");
                    }
                }
                Op::Collect(n) => {
                    s.collect(n.into()).expect("collect");
                }
                Op::Commit | Op::CommitAndReopen => {
                    write(&mut s, &mut pending)?;
                    let want = peek_states(&s);
                    s.commit(&PartitionMeta::default(), &[offset(1)])
                        .expect("commit");
                    if staged {
                        pending = Some(want);
                    } else {
                        check_committed(&mut s)?;
                    }
                    if matches!(op, Op::CommitAndReopen) {
                        write(&mut s, &mut pending)?;
                        drop(s);
                        s = open();
                        check_committed(&mut s)?;
                    }
                }
            }
        }
        write(&mut s, &mut pending)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 64, ..proptest::prelude::ProptestConfig::default()
        })]

        /// The engine's changes to key states (appends, out-of-order inserts, merges, splits
        /// at start and end events and at the maximum length, conclusions), committed as
        /// chunk writes, leave in the database exactly the states' events.
        #[test]
        fn committed_chunks_hold_exactly_the_states_events(
            ops in proptest::collection::vec(op(), 0..400),
        ) {
            chunk_ops(ops, false)?;
        }

        /// The same in changelog mode: each commit staged, its key states encoded a few at a
        /// time or when touched again while the operations go on, then written. The
        /// database then holds exactly the states as of that commit.
        #[test]
        fn staged_commits_hold_exactly_the_states_events_as_of_the_commit(
            ops in proptest::collection::vec(op(), 0..400),
        ) {
            chunk_ops(ops, true)?;
        }
    }
}
