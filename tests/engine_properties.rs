//! Property tests of the engine against the batch oracle (tests/support): random users, gaps
//! around the timeouts, explicit start/end and excluded events, bounded disorder, with and
//! without max length and a DST day boundary, in both annotation modes.

mod support;

use proptest::prelude::*;
use sessionizer::engine::{
    AnnotateMode, Disposition, EngineConfig, EventClass, LateReason, Output,
};
use sessionizer::engine::{Engine, StateStore};
use sessionizer::store::{MemStore, RocksOptions, RocksStore};
use support::{feed, finish, offsets, oracle, run_all, Ev, RunOut};

/// 2024-03-31T22:00:00Z: midnight in Berlin on the day summer time starts.
const BERLIN_DST_MIDNIGHT: i64 = 1_711_922_400_000;

#[derive(Clone, Debug)]
pub struct Case {
    pub cfg: EngineConfig,
    pub disorder: i64,
    pub input: Vec<Ev>,
}

fn class() -> impl Strategy<Value = EventClass> {
    prop_oneof![
        80 => Just(EventClass::Engagement),
        7 => Just(EventClass::Start),
        7 => Just(EventClass::End),
        6 => Just(EventClass::Excluded),
    ]
}

/// A user's events as (gap to the previous, class, short timeout). `long`: mostly short gaps and
/// few start or end events, so that sessions of dozens of events are common.
fn user_events(
    events: std::ops::Range<usize>,
    long: bool,
) -> impl Strategy<Value = Vec<(i64, EventClass, bool)>> {
    if long {
        let gap = prop_oneof![30 => 0i64..40, 1 => 41i64..200];
        let class = prop_oneof![
            60 => Just(EventClass::Engagement),
            1 => Just(EventClass::Start),
            1 => Just(EventClass::End),
            1 => Just(EventClass::Excluded),
        ];
        return prop::collection::vec((gap, class, any::<bool>()), events).boxed();
    }
    let gap = prop_oneof![
        Just(0i64),
        Just(1),
        Just(39),
        Just(40),
        Just(41),
        Just(99),
        Just(100),
        Just(101),
        0i64..60,
        150i64..400,
        1_000i64..3_000,
    ];
    prop::collection::vec((gap, class(), any::<bool>()), events).boxed()
}

pub fn case() -> impl Strategy<Value = Case> {
    case_of(1..5, 1..30, false)
}

/// Cases of a few users with many events each: sessions long enough to take several chunks of
/// the RocksDB store's layout.
fn long_case() -> impl Strategy<Value = Case> {
    case_of(1..3, 40..200, true)
}

fn case_of(
    users: std::ops::Range<usize>,
    events: std::ops::Range<usize>,
    long: bool,
) -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(user_events(events, long), users),
        prop_oneof![Just(0i64), Just(50), Just(200)],
        0i64..300,
        prop_oneof![Just(0i64), Just(20)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
        prop_oneof![Just(100_000i64), 200i64..2_000],
        any::<bool>(),
    )
        .prop_map(
            move |(
                users,
                lateness,
                disorder,
                quiet,
                max_len,
                day,
                on_close,
                seed,
                horizon,
                scoped,
            )| {
                let cfg = EngineConfig {
                    allowed_lateness: lateness,
                    lateness_horizon: horizon.max(lateness),
                    quiet_period: quiet,
                    idle_after: 1_000_000,
                    max_future_skew: i64::MAX / 4,
                    max_length: max_len.then_some(if long { 3_000 } else { 300 }),
                    day_boundary: day.then(|| "Europe/Berlin".parse().unwrap()),
                    annotate: if on_close {
                        AnnotateMode::OnClose
                    } else {
                        AnnotateMode::OnArrival
                    },
                    ..EngineConfig::default()
                };
                let mut all = Vec::new();
                for (u, evs) in users.iter().enumerate() {
                    let mut t = BERLIN_DST_MIDNIGHT - 1_500 + (u as i64) * 37;
                    // Scoped: pairs of keys are two devices of one user (one user's stats),
                    // whose sessions may overlap.
                    let key = if scoped {
                        format!("u{}\u{1f}d{}", u / 2, u % 2)
                    } else {
                        format!("u{u}")
                    };
                    for (gap, class, short) in evs {
                        t += gap;
                        all.push((t, key.clone(), *class, if *short { 40 } else { 100 }));
                    }
                }
                // Bounded disorder: each event arrives up to `disorder` ms after its time.
                let mut rng = seed;
                type Keyed = (i64, usize, (i64, String, EventClass, i64));
                let mut keyed: Vec<Keyed> = all
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| {
                        rng = rng
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let jitter = if disorder == 0 {
                            0
                        } else {
                            ((rng >> 33) as i64) % (disorder + 1)
                        };
                        (e.0 + jitter, i, e)
                    })
                    .collect();
                keyed.sort_by_key(|(arrival, i, _)| (*arrival, *i));
                let input = keyed
                    .into_iter()
                    .enumerate()
                    .map(|(id, (_, _, (t, key, class, timeout)))| Ev {
                        key,
                        t,
                        class,
                        timeout,
                        id,
                    })
                    .collect();
                Case {
                    cfg,
                    disorder,
                    input,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// (1) Concluded sessions equal the batch sessionization of the accepted events.
    #[test]
    fn concluded_sessions_equal_the_batch_oracle(c in case()) {
        let run = run_all(&c.cfg, MemStore::new(), &c.input);
        let accepted: Vec<Ev> = run.accepted(&c.input);
        prop_assert_eq!(run.sessions(), oracle(&c.cfg, &accepted));
    }

    /// (2) Every input ends up exactly once: annotated (at once or released on close), late,
    /// or dead-lettered; held events are released exactly once with final positions.
    #[test]
    fn every_input_exactly_once(c in case()) {
        let run = run_all(&c.cfg, MemStore::new(), &c.input);
        prop_assert_eq!(run.dispositions.len(), c.input.len());
        let mut released: Vec<usize> = Vec::new();
        let mut per_session: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
        for o in &run.outputs {
            if let Output::Released { payload, annotation, .. } = o {
                released.push(std::str::from_utf8(payload).unwrap().parse().unwrap());
                per_session.entry(annotation.id.to_string()).or_default().push(annotation.seq);
            }
        }
        released.sort_unstable();
        let held: Vec<usize> = c.input.iter().zip(&run.dispositions)
            .filter(|(_, d)| **d == Disposition::Held).map(|(e, _)| e.id).collect();
        prop_assert_eq!(&released, &held, "held events are released exactly once");
        if c.cfg.annotate == AnnotateMode::OnArrival {
            prop_assert!(held.is_empty());
        }
        for o in &run.outputs {
            if let Output::Session(s) = o {
                if c.cfg.annotate == AnnotateMode::OnClose {
                    let seqs = per_session.remove(&s.id.to_string()).unwrap_or_default();
                    prop_assert_eq!(seqs, (1..=s.event_count as u32).collect::<Vec<_>>());
                }
            }
        }
        prop_assert!(per_session.is_empty(), "released events without a session: {:?}", per_session);
        for (e, d) in c.input.iter().zip(&run.dispositions) {
            if e.class == EventClass::Excluded {
                prop_assert!(
                    matches!(d, Disposition::Annotated(None) | Disposition::Late(LateReason::BeyondHorizon)),
                    "excluded event {:?}: {:?}", e, d
                );
            }
        }
    }

    /// User stats and session numbers, recomputed from the user's sessions concluded so far
    /// (in conclusion order): numbers count conclusions; the interval is the latest start
    /// minus the latest end among the sessions that started strictly before it.
    #[test]
    fn user_stats_equal_a_recomputation_from_the_concluded_sessions(c in case()) {
        let run = run_all(&c.cfg, MemStore::new(), &c.input);
        let mut seen: std::collections::HashMap<String, Vec<(i64, i64)>> = Default::default();
        for o in &run.outputs {
            if let Output::Session(s) = o {
                let prior = seen.entry(s.user.clone()).or_default();
                prior.push((s.start, s.end));
                let st = &s.stats;
                prop_assert_eq!(s.session_number, prior.len() as u64);
                prop_assert_eq!(st.session_count, prior.len() as u64);
                prop_assert_eq!(st.first_session_start, prior.iter().map(|p| p.0).min().unwrap());
                prop_assert_eq!(st.last_session_end, prior.iter().map(|p| p.1).max().unwrap());
                prop_assert_eq!(st.total_length_ms, prior.iter().map(|p| p.1 - p.0).sum::<i64>());
                let latest = prior.iter().map(|p| p.0).max().unwrap();
                prop_assert_eq!(st.last_session_start, latest);
                let before = prior.iter().filter(|p| p.0 < latest).map(|p| p.1).max();
                prop_assert_eq!(st.last_interval_ms, before.map(|b| latest - b));
            }
        }
    }

    /// (3) Nothing is late when disorder stays within the allowed lateness.
    #[test]
    fn nothing_late_within_allowed_lateness(mut c in case()) {
        c.cfg.allowed_lateness = c.cfg.allowed_lateness.max(c.disorder);
        c.cfg.lateness_horizon = c.cfg.lateness_horizon.max(c.cfg.allowed_lateness);
        let run = run_all(&c.cfg, MemStore::new(), &c.input);
        prop_assert_eq!(run.late_count(), 0);
    }

    /// (5) Determinism: the same input gives the same output, record for record.
    #[test]
    fn deterministic(c in case()) {
        let a = run_all(&c.cfg, MemStore::new(), &c.input);
        let b = run_all(&c.cfg, MemStore::new(), &c.input);
        prop_assert_eq!(a, b);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, ..ProptestConfig::default() })]

    /// (4) Restart equivalence: cut the input anywhere, commit to RocksDB, process a little
    /// more without committing, "crash" (drop), reopen, replay from the committed offset: the
    /// output is identical to an uninterrupted run (the uncommitted work is redone the same).
    #[test]
    fn restart_equivalence(c in case(), cut in 0.0f64..1.0, extra in 0usize..20) {
        restart_equivalent(c, cut, extra, usize::MAX, None)?;
    }

    /// The same with long sessions, and commits every `every` events before the cut (so that
    /// commits write only the chunks that changed since the previous one).
    #[test]
    fn restart_equivalence_with_long_sessions(
        c in long_case(),
        cut in 0.0f64..1.0,
        extra in 0usize..20,
        every in 1usize..40,
    ) {
        restart_equivalent(c, cut, extra, every, None)?;
    }

    /// The same in changelog mode, as the pipeline commits: each commit is staged, its key
    /// states encoded `per` after each event processed (or when the engine touches them
    /// again), and its changes taken and written before the next commit.
    #[test]
    fn restart_equivalence_with_staged_commits(
        c in long_case(),
        cut in 0.0f64..1.0,
        extra in 0usize..20,
        every in 1usize..40,
        per in 0usize..3,
    ) {
        restart_equivalent(c, cut, extra, every, Some(per))?;
    }
}

/// Restart equivalence of `c` cut at `cut` (a fraction of the input), with `extra` events
/// processed after the last commit and lost, committing every `every` events before the cut.
/// With `staged: Some(per)` the store is in changelog mode: see
/// `restart_equivalence_with_staged_commits`.
fn restart_equivalent(
    c: Case,
    cut: f64,
    extra: usize,
    every: usize,
    staged: Option<usize>,
) -> Result<(), TestCaseError> {
    let full = run_all(&c.cfg, MemStore::new(), &c.input);
    let n = c.input.len();
    let cut = ((n as f64) * cut) as usize;
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        RocksStore::open(
            dir.path(),
            RocksOptions {
                cache_keys: 3,
                ..RocksOptions::default()
            },
        )
        .unwrap()
    };
    let mut run = RunOut::default();
    let mut now = None;
    // Feeds `range`; in changelog mode the staged commit is collected after each event.
    let feed_collecting = |e: &mut Engine<RocksStore>,
                           range: std::ops::Range<usize>,
                           now: &mut Option<_>,
                           run: &mut RunOut| {
        for i in range {
            feed(e, &c.input, i..i + 1, now, run);
            if let Some(per) = staged {
                e.store_mut().collect(per).unwrap();
            }
        }
    };
    // Changelog mode: writes the staged commit, if any, its changes taken first.
    let write = |e: &mut Engine<RocksStore>| {
        if e.store().staged_commits() > 0 {
            let changes = e.store_mut().take_changes().unwrap();
            e.store_mut().write_staged(&changes, None).unwrap();
        }
    };
    {
        let mut store = open();
        if staged.is_some() {
            store.enable_changelog();
        }
        let mut e = Engine::open(c.cfg.clone(), store).unwrap();
        let mut from = 0;
        while from < cut {
            let to = cut.min(from.saturating_add(every));
            feed_collecting(&mut e, from..to, &mut now, &mut run);
            if to < cut {
                write(&mut e);
                e.commit(&offsets(to)).unwrap();
            }
            from = to;
        }
        write(&mut e);
        e.commit(&offsets(cut)).unwrap();
        // Work after the commit is lost in the crash; in changelog mode it goes on while the
        // commit is collected, and the commit is written before the crash.
        let mut lost = RunOut::default();
        let mut lost_now = now;
        feed_collecting(&mut e, cut..(cut + extra).min(n), &mut lost_now, &mut lost);
        write(&mut e);
    }
    let mut store = open();
    prop_assert_eq!(store.committed_offsets().unwrap(), offsets(cut));
    let mut e = Engine::open(c.cfg.clone(), store).unwrap();
    feed(&mut e, &c.input, cut..n, &mut now, &mut run);
    finish(&mut e, &mut run);
    prop_assert_eq!(run, full);
    Ok(())
}
