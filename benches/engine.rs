//! Criterion benchmarks of the engine alone (no I/O beyond the state store): a realistic mix of
//! 100k users, a 30 minute timeout and mild disorder, with the in-memory store and with the
//! RocksDB store; and the decoding of generated JSON events (`codec/decode`). Also prints the
//! memory held per open session (heap bytes counted by a wrapping allocator, for the in-memory
//! store) and RocksDB bytes per open session.
//!
//! Run: `cargo bench --bench engine` (see BENCHMARKS.md).

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use sessionizer::engine::{Engine, EngineConfig, EventClass, InputEvent, Millis, SourceOffset};
use sessionizer::store::{MemStore, RocksOptions, RocksStore};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;
static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        ALLOCATED.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const USERS: u64 = 100_000;
const EVENTS: usize = 1_000_000;
const TIMEOUT: Millis = 30 * 60_000;
const T0: Millis = 1_700_000_000_000;

struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Event {
    key: String,
    time: Millis,
    class: EventClass,
}

/// The realistic mix: `users` users who alternate between sessions (on average 10 events with
/// exponential think times of mean 30 s) and idle periods (exponential, mean 2 h, plus the
/// timeout), 3% excluded, 2% start and 2% end events; each event arrives up to 2 s after its
/// event time (mild disorder). At any moment only the users in a session are active, as in
/// real traffic.
fn mix(users: u64, n: usize) -> Vec<Event> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let exp = |g: &mut Gen, mean: f64| -> Millis {
        let u = (g.next() % 1_000_000 + 1) as f64 / 1_000_001.0;
        (-u.ln() * mean) as Millis
    };
    let mut heap: BinaryHeap<Reverse<(Millis, u64)>> = (0..users)
        .map(|u| Reverse((T0 + exp(&mut g, 7_200_000.0), u)))
        .collect();
    let mut evs = Vec::with_capacity(n);
    while evs.len() < n {
        let Some(Reverse((t, u))) = heap.pop() else {
            break;
        };
        let class = match g.next() % 100 {
            0..=2 => EventClass::Excluded,
            3 | 4 => EventClass::Start,
            5 | 6 => EventClass::End,
            _ => EventClass::Engagement,
        };
        let arrival = t + (g.next() % 2_000) as Millis;
        evs.push((
            arrival,
            Event {
                key: format!("user-{u}"),
                time: t,
                class,
            },
        ));
        let next = if g.next().is_multiple_of(10) {
            t + TIMEOUT + exp(&mut g, 7_200_000.0)
        } else {
            t + 1 + exp(&mut g, 30_000.0)
        };
        heap.push(Reverse((next, u)));
    }
    evs.sort_by_key(|(arrival, _)| *arrival);
    evs.into_iter().map(|(_, e)| e).collect()
}

/// The worst case, for comparison: every event from a uniformly random user (no locality at
/// all: each event touches cold state), 10 ms apart, up to 2 s of disorder.
fn uniform(users: u64, n: usize) -> Vec<Event> {
    let mut g = Gen(0x2545_F491_4F6C_DD1D);
    let mut clock = T0;
    (0..n)
        .map(|_| {
            clock += 10;
            Event {
                key: format!("user-{}", g.next() % users),
                time: clock - (g.next() % 2_000) as Millis,
                class: EventClass::Engagement,
            }
        })
        .collect()
}

fn cfg() -> EngineConfig {
    EngineConfig {
        allowed_lateness: 5_000,
        quiet_period: 0,
        ..EngineConfig::default()
    }
}

fn run<S: sessionizer::engine::StateStore>(
    engine: &mut Engine<S>,
    evs: &[Event],
    commit_every: usize,
) -> usize {
    let mut out = Vec::with_capacity(64);
    let mut produced = 0;
    let mut max_t = Millis::MIN;
    for (i, e) in evs.iter().enumerate() {
        let ev = InputEvent {
            key: &e.key,
            user: &e.key,
            time: e.time,
            class: e.class,
            timeout: TIMEOUT,
            source: 0,
            payload: b"",
        };
        // Wall clock: the largest event time so far plus 2 s (arrival delay).
        max_t = max_t.max(e.time);
        let now = max_t + 2_000;
        engine.process(&ev, now, &mut out).expect("process");
        if i % 64 == 0 {
            engine.advance(now, false, &mut out).expect("advance");
        }
        produced += out.len();
        out.clear();
        if commit_every > 0 && (i + 1) % commit_every == 0 {
            engine
                .commit(&[SourceOffset {
                    topic: "t".into(),
                    partition: 0,
                    next_offset: i as i64,
                }])
                .expect("commit");
        }
    }
    produced
}

fn bench_engine(c: &mut Criterion) {
    let evs = mix(USERS, EVENTS);
    let users = evs
        .iter()
        .map(|e| e.key.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    let span = evs.last().map_or(0, |e| e.time) - evs.first().map_or(0, |e| e.time);
    eprintln!(
        "mix: {} events of {users} distinct users over {} s of event time",
        evs.len(),
        span / 1000
    );
    let worst = uniform(USERS, EVENTS);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.sample_size(10);
    g.bench_function("in_memory", |b| {
        b.iter_batched(
            || Engine::open(cfg(), MemStore::new()).expect("open"),
            |mut e| {
                run(&mut e, &evs, 0);
                e
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("in_memory_uniform_users", |b| {
        b.iter_batched(
            || Engine::open(cfg(), MemStore::new()).expect("open"),
            |mut e| {
                run(&mut e, &worst, 0);
                e
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("rocksdb", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let store =
                    RocksStore::open(dir.path(), RocksOptions::default()).expect("open rocksdb");
                (dir, Engine::open(cfg(), store).expect("open"))
            },
            |(dir, mut e)| {
                run(&mut e, &evs, 10_000);
                (e, dir)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// The consumer thread's work for a commit in the end-to-end benchmark's latency phase:
/// 10,000 keys, each with an open session of 100 events already written, then 21 more events
/// each (about one second at 215k events/s), then, with the store in changelog mode,
/// `Engine::commit` and the changes taken (`changelog_commit_10k_keys`: key records, the
/// sessions' tails and the chunks sealed since, encoded for the changelog and RocksDB), or
/// `Engine::commit` alone (`changelog_stage_10k_keys`: what consumption stops for; the
/// pipeline encodes the key states later, a few between records).
fn bench_commit(c: &mut Criterion) {
    const KEYS: u64 = 10_000;
    const BEFORE: u64 = 100;
    const ADDED: u64 = 21;
    let events = |from: u64, to: u64| -> Vec<Event> {
        (from..to)
            .flat_map(|i| {
                (0..KEYS).map(move |u| Event {
                    key: format!("user-{u}"),
                    time: T0 + (i * 46) as Millis,
                    class: EventClass::Engagement,
                })
            })
            .collect()
    };
    let (before, added) = (events(0, BEFORE), events(BEFORE, BEFORE + ADDED));
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(KEYS));
    g.sample_size(10);
    let setup = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store =
            RocksStore::open(dir.path(), RocksOptions::default()).expect("open rocksdb");
        store.enable_changelog();
        let mut e = Engine::open(cfg(), store).expect("open");
        run(&mut e, &before, 0);
        e.commit(&[]).expect("commit");
        let changes = e.store_mut().take_changes().expect("changes");
        e.store_mut().write_staged(&changes, None).expect("write");
        run(&mut e, &added, 0);
        (dir, e)
    };
    // The whole of a commit's work: staged, then every key state encoded.
    g.bench_function("changelog_commit_10k_keys", |b| {
        b.iter_batched(
            setup,
            |(dir, mut e)| {
                e.commit(&[]).expect("commit");
                let changes = e.store_mut().take_changes().expect("changes");
                (dir, e, changes)
            },
            BatchSize::PerIteration,
        )
    });
    // What the consumer thread stops for at a commit: staging it (the key states are
    // encoded later, a few between records).
    g.bench_function("changelog_stage_10k_keys", |b| {
        b.iter_batched(
            setup,
            |(dir, mut e)| {
                e.commit(&[]).expect("commit");
                (dir, e)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Bytes per open session: 1M users with one open session of 3 events each.
fn memory_report() {
    const N: u64 = 1_000_000;
    let evs: Vec<Event> = (0..3)
        .flat_map(|k| {
            (0..N).map(move |u| Event {
                key: format!("user-{u}"),
                time: T0 + k * 60_000,
                class: EventClass::Engagement,
            })
        })
        .collect();
    let before = ALLOCATED.load(Ordering::Relaxed);
    let mut e = Engine::open(cfg(), MemStore::new()).expect("open");
    run(&mut e, &evs, 0);
    let bytes = ALLOCATED.load(Ordering::Relaxed) - before;
    eprintln!(
        "memory: in-memory store, {} open sessions (3 events each): {:.0} heap bytes/session",
        e.open_sessions(),
        bytes as f64 / e.open_sessions() as f64
    );
    drop(e);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RocksStore::open(
        dir.path(),
        RocksOptions {
            cache_keys: 10_000,
            ..RocksOptions::default()
        },
    )
    .expect("rocksdb");
    let mut e = Engine::open(cfg(), store).expect("open");
    run(&mut e, &evs, 100_000);
    e.commit(&[]).expect("commit");
    let open = e.open_sessions();
    let size = e.store().approx_size_bytes();
    eprintln!(
        "memory: rocksdb store, {open} open sessions: {:.0} bytes/session on disk + memtables",
        size as f64 / open as f64
    );
    // The figure above depends on when RocksDB last flushed and compacted (older versions of
    // a key wait for compaction); this one is one version of each record, on disk.
    e.store().flush_and_compact().expect("compact");
    eprintln!(
        "memory: rocksdb store, {open} open sessions, flushed and compacted: {:.0} bytes/session",
        e.store().approx_size_bytes() as f64 / open as f64
    );
}

/// The codec's share of the per-record work: decoding 100,000 events of the generator's model
/// (the JSON the end-to-end benchmark sends) with the default decode settings.
fn bench_decode(c: &mut Criterion) {
    use sessionizer::generate::{Generator, GeneratorConfig};
    const N: u64 = 100_000;
    let records: Vec<Vec<u8>> = Generator::new(GeneratorConfig {
        users: 10_000,
        count: Some(N),
        start: T0,
        seed: 1,
        ..GeneratorConfig::default()
    })
    .expect("generator")
    .map(|e| serde_json::to_vec(&e).expect("json"))
    .collect();
    let settings = sessionizer::config::validate(&Default::default()).expect("defaults");
    let decoder = sessionizer::codec::decode::Decoder::new(settings.decode);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(N));
    g.sample_size(20);
    g.bench_function("decode", |b| {
        b.iter(|| {
            records
                .iter()
                .filter(|r| decoder.decode(r, None, None).is_ok())
                .count()
        })
    });
    // The codec's whole part of an at-least-once record in the end-to-end benchmark: the
    // event classes it configures, then the annotated output written.
    let mut raw = sessionizer::config::raw::RawConfig::default();
    raw.session.start_events = Some(vec!["app_open".into()]);
    raw.session.end_events = Some(vec!["app_close".into()]);
    raw.session.excluded_events = Some(
        ["push_sent", "notification_shown", "app_installed"]
            .map(String::from)
            .to_vec(),
    );
    let decoder = sessionizer::codec::decode::Decoder::new(
        sessionizer::config::validate(&raw).expect("valid").decode,
    );
    let annotation = sessionizer::engine::Annotation {
        id: sessionizer::engine::SessionId {
            key_hash: 0x1234_5678_9abc_def0,
            num: 12,
        },
        seq: 7,
        start: false,
    };
    let mut out = Vec::new();
    g.bench_function("decode_and_annotate", |b| {
        b.iter(|| {
            let mut bytes = 0;
            for r in &records {
                if let Ok(d) = decoder.decode(r, None, None) {
                    out.clear();
                    sessionizer::codec::records::annotate(
                        r,
                        "session",
                        Some(&annotation),
                        &mut out,
                    );
                    bytes += out.len() + d.user.len();
                }
            }
            bytes
        })
    });
    g.finish();
}

criterion_group!(benches, bench_engine, bench_decode, bench_commit);

fn main() {
    // The memory report runs with `cargo bench` unless a benchmark filter is given.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--bench") && args.iter().all(|a| a.starts_with('-')) {
        memory_report();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
