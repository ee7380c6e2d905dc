//! Test support: a naive batch reference sessionizer (the oracle) written independently of the
//! engine, event generators, and a driver that runs the engine like the offline mode does.
#![allow(dead_code)]

pub mod e2e;
pub mod kafka;

use chrono::{Datelike, TimeZone};
use sessionizer::engine::{
    Disposition, EndReason, Engine, EngineConfig, EventClass, InputEvent, Millis, Output,
    SourceOffset, StateStore,
};

/// One generated input event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ev {
    pub key: String,
    pub t: Millis,
    pub class: EventClass,
    pub timeout: Millis,
    /// Position in the input (also the payload).
    pub id: usize,
}

/// A session as the oracle (and the comparison) sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sess {
    pub key: String,
    pub start: Millis,
    pub end: Millis,
    pub count: u64,
    pub reason: EndReason,
}

fn local_day(tz: Option<chrono_tz::Tz>, t: Millis) -> Option<i32> {
    tz.map(|tz| {
        tz.timestamp_millis_opt(t)
            .earliest()
            .expect("valid instant")
            .date_naive()
            .num_days_from_ce()
    })
}

fn rank(c: EventClass) -> u8 {
    match c {
        EventClass::Start => 0,
        EventClass::End => 2,
        _ => 1,
    }
}

/// Batch sessionization: sort each key's events by (time, start<other<end, timeout, arrival)
/// and cut between consecutive events a, b when: a is an end event (explicit_end); the gap is
/// greater than a's timeout (inactivity); b is a start event (explicit_start); they fall on
/// different local days (day_boundary); b is more than max_length after the session's first
/// event (max_length). The last session of a key ends by explicit_end or inactivity.
pub fn oracle(cfg: &EngineConfig, accepted: &[Ev]) -> Vec<Sess> {
    let mut by_key: std::collections::BTreeMap<&str, Vec<&Ev>> = Default::default();
    for e in accepted {
        assert_ne!(e.class, EventClass::Excluded);
        by_key.entry(&e.key).or_default().push(e);
    }
    let mut out = Vec::new();
    for (key, mut evs) in by_key {
        evs.sort_by_key(|e| (e.t, rank(e.class), e.timeout, e.id));
        let mut start = evs[0].t;
        let mut count = 0u64;
        for (i, a) in evs.iter().enumerate() {
            count += 1;
            let reason = match evs.get(i + 1) {
                None => Some(if a.class == EventClass::End {
                    EndReason::ExplicitEnd
                } else {
                    EndReason::Inactivity
                }),
                Some(b) => {
                    if a.class == EventClass::End {
                        Some(EndReason::ExplicitEnd)
                    } else if b.t - a.t > a.timeout {
                        Some(EndReason::Inactivity)
                    } else if b.class == EventClass::Start {
                        Some(EndReason::ExplicitStart)
                    } else if b.t != a.t
                        && local_day(cfg.day_boundary, a.t) != local_day(cfg.day_boundary, b.t)
                    {
                        Some(EndReason::DayBoundary)
                    } else if cfg.max_length.is_some_and(|m| b.t - start > m) {
                        Some(EndReason::MaxLength)
                    } else {
                        None
                    }
                }
            };
            if let Some(reason) = reason {
                out.push(Sess {
                    key: key.to_owned(),
                    start,
                    end: a.t,
                    count,
                    reason,
                });
                count = 0;
                if let Some(b) = evs.get(i + 1) {
                    start = b.t;
                }
            }
        }
    }
    out.sort();
    out
}

/// Everything a run produced, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOut {
    /// Disposition of each input event, by input position.
    pub dispositions: Vec<Disposition>,
    /// Every output record, in emission order.
    pub outputs: Vec<Output>,
}

impl RunOut {
    pub fn sessions(&self) -> Vec<Sess> {
        let mut v: Vec<Sess> = self
            .outputs
            .iter()
            .filter_map(|o| match o {
                Output::Session(s) => Some(Sess {
                    key: s.key.clone(),
                    start: s.start,
                    end: s.end,
                    count: s.event_count,
                    reason: s.end_reason,
                }),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    pub fn accepted(&self, input: &[Ev]) -> Vec<Ev> {
        input
            .iter()
            .zip(&self.dispositions)
            .filter(|(_, d)| matches!(d, Disposition::Held | Disposition::Annotated(Some(_))))
            .map(|(e, _)| e.clone())
            .collect()
    }

    pub fn late_count(&self) -> usize {
        self.dispositions
            .iter()
            .filter(|d| matches!(d, Disposition::Late(_)))
            .count()
    }
}

/// Feeds `input[range]` to the engine the way offline mode does: "now" is the largest event
/// time so far, time is advanced after every event.
pub fn feed<S: StateStore>(
    engine: &mut Engine<S>,
    input: &[Ev],
    range: std::ops::Range<usize>,
    now: &mut Option<Millis>,
    run: &mut RunOut,
) {
    for e in &input[range] {
        let n = now.map_or(e.t, |n| n.max(e.t));
        *now = Some(n);
        let payload = e.id.to_string();
        let ev = InputEvent {
            key: &e.key,
            user: user_of(&e.key),
            time: e.t,
            class: e.class,
            timeout: e.timeout,
            source: 0,
            payload: payload.as_bytes(),
        };
        let mut out = Vec::new();
        let d = engine.process(&ev, n, &mut out).expect("process");
        run.dispositions.push(d);
        engine.advance(n, false, &mut out).expect("advance");
        run.outputs.extend(out);
    }
}

pub fn user_of(key: &str) -> &str {
    key.split('\u{1f}').next().unwrap_or(key)
}

/// Runs the whole input and finishes (end of input).
pub fn run_all<S: StateStore>(cfg: &EngineConfig, store: S, input: &[Ev]) -> RunOut {
    let mut engine = Engine::open(cfg.clone(), store).expect("open");
    let mut run = RunOut::default();
    let mut now = None;
    feed(&mut engine, input, 0..input.len(), &mut now, &mut run);
    finish(&mut engine, &mut run);
    run
}

pub fn finish<S: StateStore>(engine: &mut Engine<S>, run: &mut RunOut) {
    let mut out = Vec::new();
    engine.finish(&mut out).expect("finish");
    run.outputs.extend(out);
}

pub fn offsets(n: usize) -> Vec<SourceOffset> {
    vec![SourceOffset {
        topic: "t".into(),
        partition: 0,
        next_offset: n as i64,
    }]
}
