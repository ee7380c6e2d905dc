//! Scenario tables: one readable case per session rule and its edge. Each row gives the input
//! in arrival order (user, minute offset, kind) and the sessions and late events expected.

mod support;

use sessionizer::engine::{
    AnnotateMode, ConcludedSession, Disposition, EndReason, Engine, EngineConfig, EventClass,
    FuturePolicy, InputEvent, LateReason, Millis, Output,
};
use sessionizer::store::MemStore;
use support::{oracle, run_all, Ev, RunOut, Sess};

const MIN: Millis = 60_000;
/// 2024-01-15T00:00:00Z, an arbitrary base.
const BASE: Millis = 1_705_276_800_000;
const T30: Millis = 30 * MIN;

struct Scenario {
    name: &'static str,
    cfg: fn(&mut EngineConfig),
    /// (user, time offset in ms, kind): kind is "e", "start", "end", "x" (excluded) or "short"
    /// (an engagement event with a 5 minute timeout).
    input: &'static [(&'static str, Millis, &'static str)],
    /// (user, start offset, end offset, event count, end reason).
    sessions: &'static [(&'static str, Millis, Millis, u64, EndReason)],
    /// Input positions expected late.
    late: &'static [usize],
}

fn base_cfg(c: &mut EngineConfig) {
    c.allowed_lateness = 0;
    c.quiet_period = 0;
    c.idle_after = 1_000 * MIN;
    c.max_future_skew = 100_000 * MIN;
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "a gap exactly equal to the timeout stays in the session",
        cfg: |_| {},
        input: &[("u", 0, "e"), ("u", T30, "e")],
        sessions: &[("u", 0, T30, 2, EndReason::Inactivity)],
        late: &[],
    },
    Scenario {
        name: "a gap one millisecond longer than the timeout starts a new session",
        cfg: |_| {},
        input: &[("u", 0, "e"), ("u", T30 + 1, "e")],
        sessions: &[
            ("u", 0, 0, 1, EndReason::Inactivity),
            ("u", T30 + 1, T30 + 1, 1, EndReason::Inactivity),
        ],
        late: &[],
    },
    Scenario {
        name: "a late event bridging two open sessions merges them",
        cfg: |c| c.allowed_lateness = 60 * MIN,
        input: &[("u", 0, "e"), ("u", 50 * MIN, "e"), ("u", 25 * MIN, "e")],
        sessions: &[("u", 0, 50 * MIN, 3, EndReason::Inactivity)],
        late: &[],
    },
    Scenario {
        name: "an event that would join a concluded session is late",
        cfg: |_| {},
        input: &[("u", 0, "e"), ("u", 100 * MIN, "e"), ("u", 10 * MIN, "e")],
        sessions: &[
            ("u", 0, 0, 1, EndReason::Inactivity),
            ("u", 100 * MIN, 100 * MIN, 1, EndReason::Inactivity),
        ],
        late: &[2],
    },
    Scenario {
        name: "a late event between concluded sessions that touches neither is accepted",
        cfg: |_| {},
        input: &[
            ("u", 0, "e"),
            ("u", 200 * MIN, "e"),
            ("u", 100 * MIN, "e"),
            ("u", 300 * MIN, "e"),
        ],
        sessions: &[
            ("u", 0, 0, 1, EndReason::Inactivity),
            ("u", 100 * MIN, 100 * MIN, 1, EndReason::Inactivity),
            ("u", 200 * MIN, 200 * MIN, 1, EndReason::Inactivity),
            ("u", 300 * MIN, 300 * MIN, 1, EndReason::Inactivity),
        ],
        late: &[],
    },
    Scenario {
        name: "max length splits a continuous session",
        cfg: |c| c.max_length = Some(60 * MIN),
        input: &[
            ("u", 0, "e"),
            ("u", 20 * MIN, "e"),
            ("u", 40 * MIN, "e"),
            ("u", 60 * MIN, "e"),
            ("u", 80 * MIN, "e"),
            ("u", 100 * MIN, "e"),
        ],
        sessions: &[
            ("u", 0, 60 * MIN, 4, EndReason::MaxLength),
            ("u", 80 * MIN, 100 * MIN, 2, EndReason::Inactivity),
        ],
        late: &[],
    },
    Scenario {
        name: "excluded events neither start nor extend sessions",
        cfg: |_| {},
        input: &[
            ("u", 0, "e"),
            ("u", 20 * MIN, "x"),
            ("u", 40 * MIN, "e"),
            ("v", 0, "x"),
        ],
        sessions: &[
            ("u", 0, 0, 1, EndReason::Inactivity),
            ("u", 40 * MIN, 40 * MIN, 1, EndReason::Inactivity),
        ],
        late: &[],
    },
    Scenario {
        name: "explicit start opens and explicit end closes a session",
        cfg: |_| {},
        input: &[
            ("u", 0, "e"),
            ("u", 5 * MIN, "start"),
            ("u", 10 * MIN, "end"),
            ("u", 12 * MIN, "e"),
        ],
        sessions: &[
            ("u", 0, 0, 1, EndReason::ExplicitStart),
            ("u", 5 * MIN, 10 * MIN, 2, EndReason::ExplicitEnd),
            ("u", 12 * MIN, 12 * MIN, 1, EndReason::Inactivity),
        ],
        late: &[],
    },
    Scenario {
        name: "a late start event splits an open session",
        cfg: |c| c.allowed_lateness = 60 * MIN,
        input: &[
            ("u", 0, "e"),
            ("u", 10 * MIN, "e"),
            ("u", 20 * MIN, "e"),
            ("u", 15 * MIN, "start"),
        ],
        sessions: &[
            ("u", 0, 10 * MIN, 2, EndReason::ExplicitStart),
            ("u", 15 * MIN, 20 * MIN, 2, EndReason::Inactivity),
        ],
        late: &[],
    },
    Scenario {
        name: "timeout rules: a short-timeout event ends its session sooner",
        cfg: |_| {},
        input: &[
            ("u", 0, "short"),
            ("u", 6 * MIN, "e"),
            ("v", 0, "e"),
            ("v", 6 * MIN, "e"),
        ],
        sessions: &[
            ("u", 0, 0, 1, EndReason::Inactivity),
            ("u", 6 * MIN, 6 * MIN, 1, EndReason::Inactivity),
            ("v", 0, 6 * MIN, 2, EndReason::Inactivity),
        ],
        late: &[],
    },
    Scenario {
        name: "events older than the lateness horizon are late, excluded ones too",
        cfg: |c| c.lateness_horizon = 120 * MIN,
        input: &[
            ("u", 0, "e"),
            ("u", 300 * MIN, "e"),
            ("v", 60 * MIN, "e"),
            ("v", 60 * MIN, "x"),
            ("v", 200 * MIN, "x"),
        ],
        sessions: &[
            ("u", 0, 0, 1, EndReason::Inactivity),
            ("u", 300 * MIN, 300 * MIN, 1, EndReason::Inactivity),
        ],
        late: &[2, 3],
    },
    Scenario {
        name: "without a quiet period an offline-uploaded burst is split up",
        cfg: |_| {},
        input: &[
            ("u", 1_000 * MIN, "e"),
            ("v", 0, "e"),
            ("v", MIN, "e"),
            ("v", 2 * MIN, "e"),
        ],
        sessions: &[
            ("u", 1_000 * MIN, 1_000 * MIN, 1, EndReason::Inactivity),
            ("v", 0, 0, 1, EndReason::Inactivity),
        ],
        late: &[2, 3],
    },
    Scenario {
        name: "a quiet period keeps an offline-uploaded burst in one session",
        cfg: |c| c.quiet_period = 10_000,
        input: &[
            ("u", 1_000 * MIN, "e"),
            ("v", 0, "e"),
            ("v", MIN, "e"),
            ("v", 2 * MIN, "e"),
        ],
        sessions: &[
            ("u", 1_000 * MIN, 1_000 * MIN, 1, EndReason::Inactivity),
            ("v", 0, 2 * MIN, 3, EndReason::Inactivity),
        ],
        late: &[],
    },
];

fn class(kind: &str) -> (EventClass, Millis) {
    match kind {
        "e" => (EventClass::Engagement, T30),
        "short" => (EventClass::Engagement, 5 * MIN),
        "start" => (EventClass::Start, T30),
        "end" => (EventClass::End, T30),
        "x" => (EventClass::Excluded, T30),
        other => panic!("unknown kind {other}"),
    }
}

fn input(rows: &[(&str, Millis, &str)]) -> Vec<Ev> {
    rows.iter()
        .enumerate()
        .map(|(id, (u, t, k))| {
            let (class, timeout) = class(k);
            Ev {
                key: u.to_string(),
                t: BASE + t,
                class,
                timeout,
                id,
            }
        })
        .collect()
}

#[test]
fn scenario_table() {
    for s in SCENARIOS {
        for mode in [AnnotateMode::OnArrival, AnnotateMode::OnClose] {
            let cfg = config(|c| {
                c.annotate = mode;
                (s.cfg)(c)
            });
            let evs = input(s.input);
            let run = run_all(&cfg, MemStore::new(), &evs);
            let mut want: Vec<Sess> = s
                .sessions
                .iter()
                .map(|(u, a, b, n, r)| Sess {
                    key: u.to_string(),
                    start: BASE + a,
                    end: BASE + b,
                    count: *n,
                    reason: *r,
                })
                .collect();
            want.sort();
            assert_eq!(run.sessions(), want, "{} ({mode:?}): sessions", s.name);
            let late: Vec<usize> = run
                .dispositions
                .iter()
                .enumerate()
                .filter(|(_, d)| matches!(d, Disposition::Late(_)))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(late, s.late, "{} ({mode:?}): late events", s.name);
            assert_eq!(
                run.sessions(),
                oracle(&cfg, &run.accepted(&evs)),
                "{} ({mode:?}): the oracle agrees",
                s.name
            );
        }
    }
}

/// The scenarios' base configuration, changed by `f`.
fn config(f: impl FnOnce(&mut EngineConfig)) -> EngineConfig {
    let mut cfg = EngineConfig::default();
    base_cfg(&mut cfg);
    f(&mut cfg);
    cfg
}

fn engine(f: impl FnOnce(&mut EngineConfig)) -> Engine<MemStore> {
    Engine::open(config(f), MemStore::new()).unwrap()
}

/// The sessions a run concluded, in order.
fn concluded(run: &RunOut) -> impl Iterator<Item = &ConcludedSession> {
    run.outputs.iter().filter_map(|o| match o {
        Output::Session(s) => Some(s),
        _ => None,
    })
}

fn ev(key: &str, t: Millis, class: EventClass) -> InputEvent<'_> {
    InputEvent {
        key,
        user: key,
        time: t,
        class,
        timeout: T30,
        source: 0,
        payload: b"{}",
    }
}

#[test]
fn merge_is_published_with_absorbed_and_surviving_ids() {
    let mut e = engine(|c| c.allowed_lateness = 60 * MIN);
    let mut out = Vec::new();
    let a = e
        .process(&ev("u", BASE, EventClass::Engagement), BASE, &mut out)
        .unwrap();
    let b = e
        .process(
            &ev("u", BASE + 50 * MIN, EventClass::Engagement),
            BASE + 50 * MIN,
            &mut out,
        )
        .unwrap();
    assert!(out.is_empty());
    let c = e
        .process(
            &ev("u", BASE + 25 * MIN, EventClass::Engagement),
            BASE + 50 * MIN,
            &mut out,
        )
        .unwrap();
    let id = |d: &Disposition| match d {
        Disposition::Annotated(Some(a)) => a.id,
        other => panic!("{other:?}"),
    };
    assert_ne!(id(&a), id(&b));
    assert_eq!(id(&c), id(&a), "the earlier session survives");
    assert_eq!(out.len(), 1);
    match &out[0] {
        Output::Merge { absorbed, into, .. } => {
            assert_eq!(*absorbed, id(&b));
            assert_eq!(*into, id(&a));
        }
        other => panic!("{other:?}"),
    }
    out.clear();
    e.finish(&mut out).unwrap();
    match &out[0] {
        Output::Session(s) => assert_eq!(s.merged_ids, vec![id(&b)]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn split_is_published_in_on_arrival_mode() {
    let mut e = engine(|c| c.allowed_lateness = 60 * MIN);
    let mut out = Vec::new();
    for m in [0, 10, 20] {
        e.process(
            &ev("u", BASE + m * MIN, EventClass::Engagement),
            BASE + m * MIN,
            &mut out,
        )
        .unwrap();
    }
    let d = e
        .process(
            &ev("u", BASE + 15 * MIN, EventClass::Start),
            BASE + 20 * MIN,
            &mut out,
        )
        .unwrap();
    let Disposition::Annotated(Some(a)) = d else {
        panic!("{d:?}")
    };
    assert!(a.start);
    assert_eq!(a.seq, 1);
    match &out[..] {
        [Output::Split { to, at, .. }] => {
            assert_eq!(*to, a.id);
            assert_eq!(*at, BASE + 15 * MIN);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn far_future_events_are_dead_lettered_or_clamped_and_never_move_the_watermark() {
    let mut e = engine(|c| c.max_future_skew = 60 * MIN);
    let mut out = Vec::new();
    let now = BASE;
    e.process(&ev("u", BASE, EventClass::Engagement), now, &mut out)
        .unwrap();
    let w = e.watermark();
    let d = e
        .process(
            &ev("u", BASE + 61 * MIN, EventClass::Engagement),
            now,
            &mut out,
        )
        .unwrap();
    assert_eq!(d, Disposition::FutureTime);
    assert_eq!(e.watermark(), w);
    let ok = e
        .process(
            &ev("u", BASE + 60 * MIN, EventClass::Engagement),
            now,
            &mut out,
        )
        .unwrap();
    assert!(
        matches!(ok, Disposition::Annotated(Some(_))),
        "exactly the skew is accepted"
    );

    let mut e = engine(|c| {
        c.max_future_skew = 60 * MIN;
        c.future_policy = FuturePolicy::Clamp;
    });
    e.process(&ev("u", BASE, EventClass::Engagement), now, &mut out)
        .unwrap();
    let d = e
        .process(
            &ev("u", BASE + 500 * MIN, EventClass::Engagement),
            now + MIN,
            &mut out,
        )
        .unwrap();
    let Disposition::Annotated(Some(a)) = d else {
        panic!("{d:?}")
    };
    assert_eq!(a.seq, 2, "clamped to arrival time, it joins the session");
    assert_eq!(e.watermark(), now + MIN);
}

#[test]
fn an_idle_caught_up_partition_concludes_by_wall_clock_and_a_lagging_one_does_not() {
    let mut e = engine(|c| c.idle_after = 10_000);
    let mut out = Vec::new();
    e.process(&ev("u", BASE, EventClass::Engagement), BASE, &mut out)
        .unwrap();
    let later = BASE + T30 + MIN;
    e.advance(later, false, &mut out).unwrap();
    assert!(out.is_empty(), "lagging: no wall-clock advance");
    e.advance(later, true, &mut out).unwrap();
    assert!(matches!(&out[..], [Output::Session(_)]), "{out:?}");
}

#[test]
fn a_partition_empty_when_caught_up_does_not_make_old_events_late() {
    // A task opened on an empty partition is caught up at once; a backfill of events days
    // old arriving later must meet no wall-clock watermark.
    let mut e = engine(|c| c.idle_after = 10_000);
    let mut out = Vec::new();
    let now = BASE + 5 * 24 * 60 * MIN;
    e.advance(now, true, &mut out).unwrap();
    e.advance(now + 60 * MIN, true, &mut out).unwrap();
    assert_eq!(e.watermark(), i64::MIN, "nothing seen, nothing to conclude");
    let d = e
        .process(
            &ev("u", BASE, EventClass::Engagement),
            now + 60 * MIN,
            &mut out,
        )
        .unwrap();
    assert!(matches!(d, Disposition::Annotated(_)), "{d:?}");
}

#[test]
fn late_reasons_are_reported() {
    let mut e = engine(|c| c.lateness_horizon = 120 * MIN);
    let mut out = Vec::new();
    e.process(&ev("u", BASE, EventClass::Engagement), BASE, &mut out)
        .unwrap();
    e.process(
        &ev("u", BASE + 100 * MIN, EventClass::Engagement),
        BASE + 100 * MIN,
        &mut out,
    )
    .unwrap();
    e.advance(BASE + 100 * MIN, false, &mut out).unwrap();
    let d = e
        .process(
            &ev("u", BASE + 5 * MIN, EventClass::Engagement),
            BASE + 100 * MIN,
            &mut out,
        )
        .unwrap();
    assert_eq!(d, Disposition::Late(LateReason::ConcludedSession));
    let d = e
        .process(
            &ev("v", BASE - 30 * MIN, EventClass::Engagement),
            BASE + 100 * MIN,
            &mut out,
        )
        .unwrap();
    assert_eq!(d, Disposition::Late(LateReason::BeyondHorizon));
}

#[test]
fn day_boundary_splits_at_local_midnight_across_dst() {
    // 2024-03-31 in Berlin: summer time starts; local midnight after it is 22:00Z.
    let midnight = 1_711_922_400_000;
    let cfg = config(|c| c.day_boundary = Some("Europe/Berlin".parse().unwrap()));
    let evs: Vec<Ev> = [
        midnight - 10 * MIN,
        midnight - 1,
        midnight,
        midnight + 10 * MIN,
    ]
    .iter()
    .enumerate()
    .map(|(id, t)| Ev {
        key: "u".into(),
        t: *t,
        class: EventClass::Engagement,
        timeout: T30,
        id,
    })
    .collect();
    let run = run_all(&cfg, MemStore::new(), &evs);
    assert_eq!(
        run.sessions(),
        vec![
            Sess {
                key: "u".into(),
                start: midnight - 10 * MIN,
                end: midnight - 1,
                count: 2,
                reason: EndReason::DayBoundary
            },
            Sess {
                key: "u".into(),
                start: midnight,
                end: midnight + 10 * MIN,
                count: 2,
                reason: EndReason::Inactivity
            },
        ]
    );
}

#[test]
fn on_close_releases_events_in_event_time_order_with_final_ids() {
    let mut e = engine(|c| {
        c.allowed_lateness = 60 * MIN;
        c.annotate = AnnotateMode::OnClose;
    });
    let mut out = Vec::new();
    for (i, m) in [(0u8, 0), (1, 50), (2, 25)] {
        let t = BASE + m * MIN;
        let p = [b'0' + i];
        let d = e
            .process(
                &InputEvent {
                    payload: &p,
                    ..ev("u", t, EventClass::Engagement)
                },
                BASE + 50 * MIN,
                &mut out,
            )
            .unwrap();
        assert_eq!(d, Disposition::Held);
    }
    assert!(out.is_empty(), "no merge records in on_close mode");
    e.finish(&mut out).unwrap();
    let released: Vec<(u8, u32, bool)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Released {
                payload,
                annotation,
                ..
            } => Some((payload[0], annotation.seq, annotation.start)),
            _ => None,
        })
        .collect();
    assert_eq!(
        released,
        vec![(b'0', 1, true), (b'2', 2, false), (b'1', 3, false)]
    );
}

#[test]
fn user_stats_follow_conclusions() {
    let cfg = config(|_| {});
    let evs = input(&[
        ("u", 0, "e"),
        ("u", 10 * MIN, "e"),
        ("u", 100 * MIN, "e"),
        ("u", 130 * MIN, "e"),
    ]);
    let run = run_all(&cfg, MemStore::new(), &evs);
    let stats: Vec<_> = concluded(&run).map(|s| s.stats.clone()).collect();
    assert_eq!(stats.len(), 2);
    let last = &stats[1];
    assert_eq!(last.session_count, 2);
    assert_eq!(last.first_session_start, BASE);
    assert_eq!(last.last_session_start, BASE + 100 * MIN);
    assert_eq!(last.last_interval_ms, Some(90 * MIN));
    assert_eq!(last.total_length_ms, 40 * MIN);
    let numbers: Vec<u64> = concluded(&run).map(|s| s.session_number).collect();
    assert_eq!(numbers, vec![1, 2]);
}

#[test]
fn a_session_accepted_late_gets_the_next_number_and_a_true_interval() {
    let cfg = config(|_| {});
    // [200] concludes once 400 is seen; 0 is older, touches nothing concluded, so it is
    // accepted and concludes at once; then [100] the same; [400] concludes at the end.
    let evs = input(&[
        ("u", 200 * MIN, "e"),
        ("u", 400 * MIN, "e"),
        ("u", 0, "e"),
        ("u", 100 * MIN, "e"),
    ]);
    let run = run_all(&cfg, MemStore::new(), &evs);
    let got: Vec<(Millis, u64, Option<Millis>, Millis)> = concluded(&run)
        .map(|s| {
            (
                s.start - BASE,
                s.session_number,
                s.stats.last_interval_ms,
                s.stats.last_session_start - BASE,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            // Numbers follow conclusion order: published numbers never change.
            (200 * MIN, 1, None, 200 * MIN),
            // The latest session is still [200]; the one before it is now [0].
            (0, 2, Some(200 * MIN), 200 * MIN),
            // [100] is now the one before [200].
            (100 * MIN, 3, Some(100 * MIN), 200 * MIN),
            (400 * MIN, 4, Some(200 * MIN), 400 * MIN),
        ]
    );
}
