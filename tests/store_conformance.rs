//! One conformance suite for every `StateStore` implementation, plus RocksDB-specific checks
//! (durability across reopen, eviction) and a model test: random operation sequences applied to
//! a `MemStore` and a `RocksStore` must agree at every step and after commit + reopen, also
//! when the `RocksStore` stages several commits and writes them later (changelog mode).

use compact_str::CompactString;
use proptest::prelude::*;
use sessionizer::engine::{
    KeyState, Millis, PartitionMeta, SourceOffset, StateStore, TimerKind, UserStats,
};
use sessionizer::store::{Change, MemStore, RocksOptions, RocksStore, StateMemory};
use std::path::Path;
use tempfile::TempDir;

const KINDS: [TimerKind; 2] = [TimerKind::Deadline, TimerKind::Quiet];

fn state(user: &str, created: u64) -> KeyState {
    KeyState {
        user: user.to_owned(),
        created,
        arrivals: created * 2,
        deadline_timer: Some(-(created as i64)),
        ..KeyState::default()
    }
}

fn stats(n: u64) -> UserStats {
    UserStats {
        first_session_start: -1,
        last_session_start: n as i64,
        session_count: n,
        last_interval_ms: Some(n as i64 * 10),
        ..UserStats::default()
    }
}

fn meta(open: u64) -> PartitionMeta {
    PartitionMeta {
        open_sessions: open,
        ..PartitionMeta::default()
    }
}

fn off(topic: &str, partition: i32, next_offset: i64) -> SourceOffset {
    SourceOffset {
        topic: topic.to_owned(),
        partition,
        next_offset,
    }
}

fn sorted(mut v: Vec<SourceOffset>) -> Vec<SourceOffset> {
    v.sort();
    v
}

fn entries(v: &[(Millis, &str)]) -> Vec<(Millis, String)> {
    v.iter().map(|(t, k)| (*t, k.to_string())).collect()
}

fn popped(v: &[(Millis, &str)]) -> Vec<(Millis, CompactString)> {
    v.iter()
        .map(|(t, k)| (*t, CompactString::from(*k)))
        .collect()
}

fn rocks(dir: &Path, cache_keys: usize) -> RocksStore {
    let opts = RocksOptions {
        cache_keys,
        ..RocksOptions::default()
    };
    RocksStore::open(dir, opts).expect("open rocks store")
}

// ---------------------------------------------------------------- the shared suite

fn suite<S: StateStore>(mut make: impl FnMut() -> S) {
    keys_round_trip(&mut make());
    stats_round_trip(&mut make());
    timers(&mut make());
    payloads(&mut make());
    commit_meta_and_offsets(&mut make());
}

fn keys_round_trip(s: &mut impl StateStore) {
    assert_eq!(s.take_key("missing").unwrap(), None);
    s.put_key("k1", state("u1", 1)).unwrap();
    s.put_key("k2", state("u2", 2)).unwrap();
    // Own writes are visible before any commit.
    let got = s.take_key("k1").unwrap();
    assert_eq!(got, Some(state("u1", 1)));
    s.put_key("k1", state("u1", 5)).unwrap();
    assert_eq!(s.take_key("k1").unwrap(), Some(state("u1", 5)));
    s.put_key("k1", state("u1", 5)).unwrap();
    s.commit(&meta(0), &[]).unwrap();
    // ... and after it.
    assert_eq!(s.take_key("k2").unwrap(), Some(state("u2", 2)));
    s.put_key("k2", state("u2", 3)).unwrap();
    assert_eq!(s.take_key("k2").unwrap(), Some(state("u2", 3)));
    s.put_key("k2", state("u2", 3)).unwrap();
    assert_eq!(s.take_key("k3").unwrap(), None);
}

fn stats_round_trip(s: &mut impl StateStore) {
    assert_eq!(s.get_stats("u").unwrap(), None);
    s.put_stats("u", &stats(1)).unwrap();
    assert_eq!(s.get_stats("u").unwrap(), Some(stats(1)));
    // get does not remove.
    assert_eq!(s.get_stats("u").unwrap(), Some(stats(1)));
    s.commit(&meta(0), &[]).unwrap();
    s.put_stats("u", &stats(2)).unwrap();
    assert_eq!(s.get_stats("u").unwrap(), Some(stats(2)));
    assert_eq!(s.get_stats("v").unwrap(), None);
}

fn timers(s: &mut impl StateStore) {
    for kind in KINDS {
        assert!(s.timers(kind).unwrap().is_empty());
    }
    let d = TimerKind::Deadline;
    for (at, k) in [
        (5, "b"),
        (-3, "z"),
        (5, "a"),
        (i64::MIN, "m"),
        (10, "a"),
        (-3, "a"),
    ] {
        s.add_timer(d, at, k).unwrap();
    }
    s.add_timer(d, 5, "a").unwrap(); // idempotent
    s.add_timer(TimerKind::Quiet, 1, "q").unwrap();
    let all = entries(&[
        (i64::MIN, "m"),
        (-3, "a"),
        (-3, "z"),
        (5, "a"),
        (5, "b"),
        (10, "a"),
    ]);
    assert_eq!(s.timers(d).unwrap(), all);
    assert_eq!(s.timers(d).unwrap(), all, "timers() must not remove");
    assert_eq!(s.timers(TimerKind::Quiet).unwrap(), entries(&[(1, "q")]));

    let mut out = vec![(99, CompactString::from("keep"))];
    s.pop_due(d, i64::MIN, &mut out).unwrap();
    assert_eq!(out.len(), 1, "nothing is due before i64::MIN");
    s.pop_due(d, 5, &mut out).unwrap(); // strictly before 5
    let mut expect = popped(&[(99, "keep"), (i64::MIN, "m"), (-3, "a"), (-3, "z")]);
    assert_eq!(out, expect, "appended in (at, key) order");
    assert_eq!(
        s.timers(d).unwrap(),
        entries(&[(5, "a"), (5, "b"), (10, "a")])
    );
    s.commit(&meta(0), &[]).unwrap();
    s.add_timer(d, -7, "n").unwrap();
    s.pop_due(d, 6, &mut out).unwrap();
    expect.extend(popped(&[(-7, "n"), (5, "a"), (5, "b")]));
    assert_eq!(out, expect);
    assert_eq!(s.timers(d).unwrap(), entries(&[(10, "a")]));
    // Other index untouched.
    assert_eq!(s.timers(TimerKind::Quiet).unwrap(), entries(&[(1, "q")]));
    let mut q = Vec::new();
    s.pop_due(TimerKind::Quiet, i64::MAX, &mut q).unwrap();
    assert_eq!(q, popped(&[(1, "q")]));
    assert!(s.timers(TimerKind::Quiet).unwrap().is_empty());
}

fn payloads(s: &mut impl StateStore) {
    assert_eq!(s.take_payload("k", 1).unwrap(), None);
    s.put_payload("k", 1, b"one").unwrap();
    s.put_payload("k", 2, b"two").unwrap();
    s.put_payload("kk", 1, b"").unwrap();
    assert_eq!(s.take_payload("k", 1).unwrap(), Some(b"one".to_vec()));
    assert_eq!(s.take_payload("k", 1).unwrap(), None, "take removes");
    s.commit(&meta(0), &[]).unwrap();
    assert_eq!(s.take_payload("k", 1).unwrap(), None);
    assert_eq!(s.take_payload("kk", 1).unwrap(), Some(Vec::new()));
    assert_eq!(s.take_payload("k", 2).unwrap(), Some(b"two".to_vec()));
    assert_eq!(s.take_payload("k", 2).unwrap(), None);
}

fn commit_meta_and_offsets(s: &mut impl StateStore) {
    assert_eq!(s.load_meta().unwrap(), None);
    assert!(s.committed_offsets().unwrap().is_empty());
    s.commit(
        &meta(3),
        &[off("t", 0, 10), off("t", -1, 4), off("u", 0, 7)],
    )
    .unwrap();
    assert_eq!(s.load_meta().unwrap(), Some(meta(3)));
    s.commit(&meta(4), &[off("t", 0, 20), off("t", 1, 1)])
        .unwrap();
    assert_eq!(s.load_meta().unwrap(), Some(meta(4)));
    assert_eq!(
        sorted(s.committed_offsets().unwrap()),
        vec![
            off("t", -1, 4),
            off("t", 0, 20),
            off("t", 1, 1),
            off("u", 0, 7)
        ]
    );
}

#[test]
fn mem_store_conforms() {
    suite(MemStore::new);
}

#[test]
fn rocks_store_conforms() {
    let mut dirs = Vec::new();
    suite(|| {
        let dir = TempDir::new().expect("tempdir");
        let store = rocks(dir.path(), 1000);
        dirs.push(dir);
        store
    });
    // Same again with a cache that evicts at every commit.
    suite(|| {
        let dir = TempDir::new().expect("tempdir");
        let store = rocks(dir.path(), 0);
        dirs.push(dir);
        store
    });
    // And within a memory budget too small for anything to stay cached (RocksDB's cache and
    // memtables shared by every store of the suite; a decoded share of 128 bytes).
    let memory = StateMemory::new(256);
    suite(|| {
        let dir = TempDir::new().expect("tempdir");
        let store = RocksStore::open(dir.path(), RocksOptions::within(&memory)).expect("open");
        dirs.push(dir);
        store
    });
}

// ---------------------------------------------------------------- RocksDB only

fn write_everything(s: &mut RocksStore, n: u64) {
    s.put_key("k", state("u", n)).unwrap();
    s.put_stats("u", &stats(n)).unwrap();
    s.add_timer(TimerKind::Deadline, -(n as i64), "k").unwrap();
    s.add_timer(TimerKind::Quiet, n as i64, "k").unwrap();
    s.put_payload("k", n, b"payload").unwrap();
}

#[test]
fn rocks_reopen_sees_exactly_the_committed_state() {
    let dir = TempDir::new().unwrap();
    {
        let mut s = rocks(dir.path(), 10);
        write_everything(&mut s, 1);
        s.commit(&meta(1), &[off("t", 0, 5)]).unwrap();
        assert!(s.approx_size_bytes() > 0);
        assert_eq!(s.path(), dir.path());
    }
    {
        let mut s = rocks(dir.path(), 10);
        assert_eq!(s.take_key("k").unwrap(), Some(state("u", 1)));
        s.put_key("k", state("u", 1)).unwrap();
        assert_eq!(s.get_stats("u").unwrap(), Some(stats(1)));
        assert_eq!(
            s.timers(TimerKind::Deadline).unwrap(),
            entries(&[(-1, "k")])
        );
        assert_eq!(s.timers(TimerKind::Quiet).unwrap(), entries(&[(1, "k")]));
        assert_eq!(s.load_meta().unwrap(), Some(meta(1)));
        assert_eq!(s.committed_offsets().unwrap(), vec![off("t", 0, 5)]);

        // Uncommitted changes of every kind, then drop without committing.
        write_everything(&mut s, 2);
        let mut out = Vec::new();
        s.pop_due(TimerKind::Deadline, 0, &mut out).unwrap();
        assert_eq!(s.take_payload("k", 1).unwrap(), Some(b"payload".to_vec()));
        s.put_key("new", state("v", 9)).unwrap();
    }
    let mut s = rocks(dir.path(), 10);
    assert_eq!(s.take_key("k").unwrap(), Some(state("u", 1)));
    assert_eq!(s.take_key("new").unwrap(), None);
    assert_eq!(s.get_stats("u").unwrap(), Some(stats(1)));
    assert_eq!(
        s.timers(TimerKind::Deadline).unwrap(),
        entries(&[(-1, "k")])
    );
    assert_eq!(s.timers(TimerKind::Quiet).unwrap(), entries(&[(1, "k")]));
    assert_eq!(s.take_payload("k", 1).unwrap(), Some(b"payload".to_vec()));
    assert_eq!(s.take_payload("k", 2).unwrap(), None);
    assert_eq!(s.load_meta().unwrap(), Some(meta(1)));
    assert_eq!(s.committed_offsets().unwrap(), vec![off("t", 0, 5)]);
}

#[test]
fn rocks_reopen_without_any_commit_is_empty() {
    let dir = TempDir::new().unwrap();
    {
        let mut s = rocks(dir.path(), 10);
        write_everything(&mut s, 1);
    }
    let mut s = rocks(dir.path(), 10);
    assert_eq!(s.take_key("k").unwrap(), None);
    assert_eq!(s.get_stats("u").unwrap(), None);
    for kind in KINDS {
        assert!(s.timers(kind).unwrap().is_empty());
    }
    assert_eq!(s.take_payload("k", 1).unwrap(), None);
    assert_eq!(s.load_meta().unwrap(), None);
    assert!(s.committed_offsets().unwrap().is_empty());
}

#[test]
fn rocks_eviction_keeps_correctness() {
    let dir = TempDir::new().unwrap();
    let mut s = rocks(dir.path(), 2);
    for i in 0..50 {
        s.put_key(&format!("k{i}"), state("u", i)).unwrap();
    }
    s.commit(&meta(0), &[]).unwrap();
    s.put_key("k0", state("u", 100)).unwrap(); // touched in the new generation
    s.commit(&meta(0), &[]).unwrap();
    assert!(s.cached_keys() <= 2, "cache holds {}", s.cached_keys());
    for i in 0..50 {
        let want = state("u", if i == 0 { 100 } else { i });
        assert_eq!(s.take_key(&format!("k{i}")).unwrap(), Some(want.clone()));
        s.put_key(&format!("k{i}"), want).unwrap();
    }
    s.commit(&meta(0), &[]).unwrap();
    drop(s);
    let mut s = rocks(dir.path(), 2);
    for i in 0..50 {
        let want = state("u", if i == 0 { 100 } else { i });
        assert_eq!(s.take_key(&format!("k{i}")).unwrap(), Some(want));
    }
}

// ---------------------------------------------------------------- model test

#[derive(Clone, Debug)]
enum Op {
    /// take_key, then put back a new state (the engine's read-modify-write).
    Update(u8, u64),
    /// take_key, then put back what was taken.
    Peek(u8),
    GetStats(u8),
    PutStats(u8, u64),
    AddTimer(bool, i64, u8),
    PopDue(bool, i64),
    PutPayload(u8, u64, u8),
    TakePayload(u8, u64),
    Commit(u64, u8, i32, i64),
    /// Changelog mode: write the oldest staged commit (elsewhere a no-op).
    WriteStaged,
    /// Changelog mode: encode up to this many of the key states the newest staged commit
    /// still owes, and take its changes once none is left (elsewhere a no-op).
    Collect(u8),
    /// Drop the RocksStore without committing and reopen it; the model rolls back to the last
    /// written commit.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0u8..4;
    prop_oneof![
        4 => (key.clone(), 0u64..100).prop_map(|(k, v)| Op::Update(k, v)),
        2 => key.clone().prop_map(Op::Peek),
        1 => key.clone().prop_map(Op::GetStats),
        1 => (key.clone(), 0u64..100).prop_map(|(k, v)| Op::PutStats(k, v)),
        4 => (any::<bool>(), -6i64..6, key.clone()).prop_map(|(d, t, k)| Op::AddTimer(d, t, k)),
        2 => (any::<bool>(), -6i64..8).prop_map(|(d, t)| Op::PopDue(d, t)),
        2 => (key.clone(), 0u64..3, any::<u8>()).prop_map(|(k, t, b)| Op::PutPayload(k, t, b)),
        2 => (key, 0u64..3).prop_map(|(k, t)| Op::TakePayload(k, t)),
        2 => (0u64..10, 0u8..2, -1i32..2, 0i64..1000).prop_map(|(m, t, p, o)| Op::Commit(m, t, p, o)),
        2 => Just(Op::WriteStaged),
        2 => (0u8..3).prop_map(Op::Collect),
        1 => Just(Op::Reopen),
    ]
}

fn kind(deadline: bool) -> TimerKind {
    if deadline {
        TimerKind::Deadline
    } else {
        TimerKind::Quiet
    }
}

/// Every observable piece of state, read through the trait (puts keys back).
fn compare_all(model: &mut MemStore, s: &mut RocksStore) -> Result<(), TestCaseError> {
    for k in 0..4u8 {
        let key = format!("key{k}");
        let a = model.take_key(&key).unwrap();
        prop_assert_eq!(&a, &s.take_key(&key).unwrap(), "key {}", key);
        if let Some(st) = a {
            model.put_key(&key, st.clone()).unwrap();
            s.put_key(&key, st).unwrap();
        }
        prop_assert_eq!(model.get_stats(&key).unwrap(), s.get_stats(&key).unwrap());
    }
    for kind in KINDS {
        prop_assert_eq!(model.timers(kind).unwrap(), s.timers(kind).unwrap());
    }
    prop_assert_eq!(model.load_meta().unwrap(), s.load_meta().unwrap());
    prop_assert_eq!(
        model.committed_offsets().unwrap(),
        s.committed_offsets().unwrap()
    );
    Ok(())
}

/// A RocksStore with a cache of one key (so eviction happens all the time); in changelog mode
/// (`staged`) commits are only staged, and written by `Op::WriteStaged`.
fn open_model_store(dir: &Path, staged: bool) -> RocksStore {
    let mut s = rocks(dir, 1);
    if staged {
        s.enable_changelog();
    }
    s
}

/// Applies `ops` to a MemStore model and a RocksStore. With `staged`, the RocksStore stages
/// its commits, collects their key states a few at a time or when they are touched again, and
/// the changes are taken and written later, in order, while the operations go on (the
/// pipelined commit): reads must see every write all along, each commit's changes must be its
/// state as of the commit, and the database (meta, offsets, what a reopen finds) must be
/// exactly the last written commit.
fn run_model(ops: Vec<Op>, staged: bool) -> Result<(), TestCaseError> {
    let dir = TempDir::new().unwrap();
    let mut s = open_model_store(dir.path(), staged);
    let mut model = MemStore::new();
    // The model as of the last commit written to the database, and as of each staged one
    // (with its changes, which the store's writer writes).
    let mut committed = MemStore::new();
    let mut queue: std::collections::VecDeque<(MemStore, Vec<Change>)> = Default::default();
    // The model as of the staged commit whose changes are not taken yet.
    let mut collecting: Option<MemStore> = None;
    let take = |s: &mut RocksStore,
                collecting: &mut Option<MemStore>,
                queue: &mut std::collections::VecDeque<_>| {
        if let Some(m) = collecting.take() {
            queue.push_back((m, s.take_changes().unwrap()));
        }
    };
    for op in ops {
        match op {
            Op::Update(k, v) => {
                let key = format!("key{k}");
                let a = model.take_key(&key).unwrap();
                prop_assert_eq!(&a, &s.take_key(&key).unwrap());
                let next = state(&key, a.map_or(0, |st| st.created) + v);
                model.put_key(&key, next.clone()).unwrap();
                s.put_key(&key, next).unwrap();
            }
            Op::Peek(k) => {
                let key = format!("key{k}");
                let a = model.take_key(&key).unwrap();
                prop_assert_eq!(&a, &s.take_key(&key).unwrap());
                if let Some(st) = a {
                    model.put_key(&key, st.clone()).unwrap();
                    s.put_key(&key, st).unwrap();
                }
            }
            Op::GetStats(k) => {
                let user = format!("key{k}");
                prop_assert_eq!(model.get_stats(&user).unwrap(), s.get_stats(&user).unwrap());
            }
            Op::PutStats(k, v) => {
                let user = format!("key{k}");
                model.put_stats(&user, &stats(v)).unwrap();
                s.put_stats(&user, &stats(v)).unwrap();
            }
            Op::AddTimer(d, at, k) => {
                let key = format!("key{k}");
                model.add_timer(kind(d), at, &key).unwrap();
                s.add_timer(kind(d), at, &key).unwrap();
            }
            Op::PopDue(d, before) => {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                model.pop_due(kind(d), before, &mut a).unwrap();
                s.pop_due(kind(d), before, &mut b).unwrap();
                prop_assert_eq!(a, b);
            }
            Op::PutPayload(k, tie, byte) => {
                let key = format!("key{k}");
                model.put_payload(&key, tie, &[byte, 1]).unwrap();
                s.put_payload(&key, tie, &[byte, 1]).unwrap();
            }
            Op::TakePayload(k, tie) => {
                let key = format!("key{k}");
                prop_assert_eq!(
                    model.take_payload(&key, tie).unwrap(),
                    s.take_payload(&key, tie).unwrap()
                );
            }
            Op::Commit(m, t, p, o) => {
                let offsets = [off(&format!("topic{t}"), p, o)];
                model.commit(&meta(m), &offsets).unwrap();
                take(&mut s, &mut collecting, &mut queue);
                s.commit(&meta(m), &offsets).unwrap();
                if staged {
                    collecting = Some(model.clone());
                } else {
                    committed = model.clone();
                }
            }
            Op::Collect(n) => {
                if s.collect(n as usize).unwrap() {
                    take(&mut s, &mut collecting, &mut queue);
                }
                prop_assert_eq!(s.collecting(), collecting.is_some());
            }
            Op::WriteStaged => {
                if queue.is_empty() {
                    take(&mut s, &mut collecting, &mut queue);
                }
                if let Some((next, changes)) = queue.pop_front() {
                    // Written through a writer (as from another thread), then reported.
                    s.writer().write(&changes, None).unwrap();
                    s.staged_written().unwrap();
                    committed = next;
                }
            }
            Op::Reopen => {
                drop(s);
                s = open_model_store(dir.path(), staged);
                model = committed.clone();
                queue.clear();
                collecting = None;
            }
        }
        prop_assert_eq!(
            s.staged_commits(),
            queue.len() + usize::from(collecting.is_some())
        );
        prop_assert_eq!(committed.load_meta().unwrap(), s.load_meta().unwrap());
        prop_assert_eq!(
            committed.committed_offsets().unwrap(),
            s.committed_offsets().unwrap()
        );
    }
    take(&mut s, &mut collecting, &mut queue);
    while let Some((_, changes)) = queue.pop_front() {
        s.write_staged(&changes, None).unwrap();
    }
    compare_all(&mut model, &mut s)?;
    // Final commit + reopen: the durable state is the model's.
    model.commit(&meta(77), &[]).unwrap();
    s.commit(&meta(77), &[]).unwrap();
    if staged {
        let changes = s.take_changes().unwrap();
        s.write_staged(&changes, None).unwrap();
    }
    drop(s);
    let mut s = open_model_store(dir.path(), staged);
    compare_all(&mut model, &mut s)?;
    for k in 0..4u8 {
        for tie in 0..3 {
            let key = format!("key{k}");
            prop_assert_eq!(
                model.take_payload(&key, tie).unwrap(),
                s.take_payload(&key, tie).unwrap()
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn rocks_store_agrees_with_mem_store(ops in proptest::collection::vec(op(), 0..60)) {
        run_model(ops, false)?;
    }

    #[test]
    fn staged_rocks_store_agrees_with_mem_store(ops in proptest::collection::vec(op(), 0..60)) {
        run_model(ops, true)?;
    }
}
