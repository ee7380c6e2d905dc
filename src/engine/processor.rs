//! [`Engine`]: one task's sessionizer (one input partition, or a set of co-partitioned ones).
//!
//! The caller feeds decoded events with [`Engine::process`], moves time on with
//! [`Engine::advance`] (wall clock and "caught up" are inputs, never read here), and makes the
//! state durable with [`Engine::commit`] together with its input offsets. Reopening an engine on
//! a committed store and feeding the input that follows the committed offsets yields exactly the
//! output an uninterrupted run would have produced.

use super::key::{Change, Insert};
use super::rules::{AnnotateMode, Boundaries, EngineConfig, FuturePolicy};
use super::state::{KeyState, PartitionMeta, SourceOffset, StateStore, StoreError, TimerKind};
use super::types::{
    Annotation, ConcludedSession, Disposition, EndReason, EvKey, EventClass, LateReason, Millis,
    Output, SessionId, UserStats,
};
use super::watermark::WatermarkParams;

/// A decoded input event.
#[derive(Clone, Copy, Debug)]
pub struct InputEvent<'a> {
    /// The session scope key: the user id, plus any configured scope field values.
    pub key: &'a str,
    /// The user id.
    pub user: &'a str,
    pub time: Millis,
    pub class: EventClass,
    /// Inactivity timeout after this event (from the timeout rules).
    pub timeout: Millis,
    /// Which input source (co-partitioned topic) it came from, for the watermark.
    pub source: u32,
    /// What to hold in `on_close` mode and give back in [`Output::Released`].
    pub payload: &'a [u8],
}

/// Running totals of what the engine did (for metrics and summaries).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub accepted: u64,
    pub excluded: u64,
    pub late_concluded: u64,
    pub late_horizon: u64,
    pub future_dead_lettered: u64,
    pub future_clamped: u64,
    pub sessions_opened: u64,
    pub sessions_merged: u64,
    pub sessions_split: u64,
    pub sessions_concluded: [u64; 5],
}

impl Counters {
    pub fn concluded_total(&self) -> u64 {
        self.sessions_concluded.iter().sum()
    }
}

fn reason_index(r: EndReason) -> usize {
    EndReason::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

/// Deterministic 64-bit hash of a scope key (the first half of its session ids).
pub fn key_hash(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

/// One task's sessionizer over a state store.
pub struct Engine<S: StateStore> {
    cfg: EngineConfig,
    wm: WatermarkParams,
    bounds: Boundaries,
    store: S,
    meta: PartitionMeta,
    now: Millis,
    counters: Counters,
    changes: Vec<Change>,
    due: Vec<(Millis, compact_str::CompactString)>,
}

impl<S: StateStore> Engine<S> {
    /// Opens an engine on `store`, resuming from its last commit if there is one.
    pub fn open(cfg: EngineConfig, mut store: S) -> Result<Self, StoreError> {
        let mut meta = store.load_meta()?.unwrap_or_default();
        meta.watermark = std::mem::take(&mut meta.watermark).restored();
        Ok(Engine {
            wm: cfg.watermark_params(),
            bounds: cfg.boundaries(),
            cfg,
            store,
            meta,
            now: Millis::MIN,
            counters: Counters::default(),
            changes: Vec::new(),
            due: Vec::new(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn watermark(&self) -> Millis {
        self.meta.watermark.get()
    }
    pub fn open_sessions(&self) -> u64 {
        self.meta.open_sessions
    }
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    pub fn store(&self) -> &S {
        &self.store
    }
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }
    pub fn into_store(self) -> S {
        self.store
    }

    /// Processes one event that arrived at wall-clock `now`. Records other than the event's
    /// own disposition (merges, splits) are appended to `out`. Conclusions happen in
    /// [`Engine::advance`].
    pub fn process(
        &mut self,
        ev: &InputEvent<'_>,
        now: Millis,
        out: &mut Vec<Output>,
    ) -> Result<Disposition, StoreError> {
        self.now = self.now.max(now);
        let mut t = ev.time;
        if t > now.saturating_add(self.cfg.max_future_skew) {
            match self.cfg.future_policy {
                FuturePolicy::DeadLetter => {
                    self.counters.future_dead_lettered += 1;
                    return Ok(Disposition::FutureTime);
                }
                FuturePolicy::Clamp => {
                    self.counters.future_clamped += 1;
                    t = now;
                }
            }
        }
        let cutoff = self
            .meta
            .watermark
            .partition_time(&self.wm)
            .map(|pt| pt.saturating_sub(self.cfg.lateness_horizon));
        // The horizon applies to every event, excluded ones too: "older than the horizon is
        // late" is one rule, whatever the event's class.
        if cutoff.is_some_and(|c| t < c) {
            self.counters.late_horizon += 1;
            return Ok(Disposition::Late(LateReason::BeyondHorizon));
        }
        if ev.class == EventClass::Excluded {
            self.counters.excluded += 1;
            self.meta.watermark.observe(ev.source, t, now, &self.wm);
            return Ok(Disposition::Annotated(None));
        }

        let quiet = self.cfg.quiet_period;
        let st = self.store.key_mut(ev.key, ev.user)?;
        if let Some(c) = cutoff {
            st.trim_blocks(c);
        }
        let k = EvKey {
            t,
            rank: ev.class.rank(),
            timeout: ev.timeout,
            tie: st.arrivals + 1,
        };
        self.changes.clear();
        let (num, seq) = match st.insert(k, now, &self.bounds, &mut self.changes) {
            Insert::Late => {
                self.counters.late_concluded += 1;
                return Ok(Disposition::Late(LateReason::ConcludedSession));
            }
            Insert::Joined { num, seq } => (num, seq),
        };
        st.arrivals += 1;
        self.meta.watermark.observe(ev.source, t, now, &self.wm);
        let timers = plan_timers(st, self.meta.watermark.get(), quiet);
        self.counters.accepted += 1;
        self.add_timers(ev.key, timers)?;
        let hash = key_hash(ev.key);
        if !self.changes.is_empty() {
            self.apply_changes(ev.key, ev.user, hash, t, out);
        }
        if self.cfg.annotate == AnnotateMode::OnClose {
            self.store.put_payload(ev.key, k.tie, ev.payload)?;
        }
        Ok(match self.cfg.annotate {
            AnnotateMode::OnClose => Disposition::Held,
            AnnotateMode::OnArrival => Disposition::Annotated(Some(Annotation {
                id: SessionId {
                    key_hash: hash,
                    num,
                },
                seq,
                start: seq == 1,
            })),
        })
    }

    fn apply_changes(
        &mut self,
        key: &str,
        user: &str,
        hash: u64,
        at: Millis,
        out: &mut Vec<Output>,
    ) {
        let publish = self.cfg.annotate == AnnotateMode::OnArrival;
        let id = |num| SessionId {
            key_hash: hash,
            num,
        };
        for c in self.changes.drain(..) {
            match c {
                Change::Opened(_) => {
                    self.counters.sessions_opened += 1;
                    self.meta.open_sessions += 1;
                }
                Change::Merged { absorbed, into } => {
                    self.counters.sessions_merged += 1;
                    self.meta.open_sessions = self.meta.open_sessions.saturating_sub(1);
                    if publish {
                        out.push(Output::Merge {
                            key: key.to_owned(),
                            user: user.to_owned(),
                            absorbed: id(absorbed),
                            into: id(into),
                            at,
                        });
                    }
                }
                Change::Split { from, to, at } => {
                    self.counters.sessions_split += 1;
                    if publish {
                        out.push(Output::Split {
                            key: key.to_owned(),
                            user: user.to_owned(),
                            from: id(from),
                            to: id(to),
                            at,
                        });
                    }
                }
            }
        }
    }

    fn add_timers(&mut self, key: &str, timers: Timers) -> Result<(), StoreError> {
        if let Some(d) = timers.deadline {
            self.store.add_timer(TimerKind::Deadline, d, key)?;
        }
        if let Some(q) = timers.quiet {
            self.store.add_timer(TimerKind::Quiet, q, key)?;
        }
        Ok(())
    }

    /// Moves time on: wall clock `now`, and whether the caller has read everything available
    /// (no consumer lag). Concludes every session that is due, appending records to `out`.
    pub fn advance(
        &mut self,
        now: Millis,
        caught_up: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        self.now = self.now.max(now);
        self.meta.watermark.advance(self.now, caught_up, &self.wm);
        let w = self.meta.watermark.get();
        self.run_due(TimerKind::Deadline, w, w, self.now, false, out)?;
        self.run_due(
            TimerKind::Quiet,
            self.now.saturating_add(1),
            w,
            self.now,
            false,
            out,
        )
    }

    /// End of input (offline mode): concludes every open session as if time ran out.
    pub fn finish(&mut self, out: &mut Vec<Output>) -> Result<(), StoreError> {
        let end = Millis::MAX;
        self.run_due(TimerKind::Deadline, end, end, end, true, out)?;
        self.run_due(TimerKind::Quiet, end, end, end, true, out)
    }

    fn run_due(
        &mut self,
        kind: TimerKind,
        before: Millis,
        watermark: Millis,
        now: Millis,
        at_end: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        self.store.pop_due(kind, before, &mut due)?;
        for (at, key) in due.drain(..) {
            let Some(mut st) = self.store.take_key(&key)? else {
                continue;
            };
            let live = match kind {
                TimerKind::Deadline => st.deadline_timer == Some(at),
                TimerKind::Quiet => st.quiet_timer == Some(at),
            };
            if !live {
                self.store.put_key(&key, st)?;
                continue;
            }
            match kind {
                TimerKind::Deadline => st.deadline_timer = None,
                TimerKind::Quiet => st.quiet_timer = None,
            }
            let quiet = if at_end { 0 } else { self.cfg.quiet_period };
            let keep = self.cfg.annotate == AnnotateMode::OnClose;
            let concluded = st.expire(watermark, now, quiet, &self.bounds, keep);
            if !concluded.is_empty() {
                self.conclude(&key, &st.user, concluded, out)?;
            }
            let timers = if at_end {
                Timers::default()
            } else {
                plan_timers(&mut st, watermark, self.cfg.quiet_period)
            };
            self.store.put_key(&key, st)?;
            self.add_timers(&key, timers)?;
        }
        self.due = due;
        Ok(())
    }

    fn conclude(
        &mut self,
        key: &str,
        user: &str,
        sessions: Vec<super::key::Concluded>,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        let hash = key_hash(key);
        let on_close = self.cfg.annotate == AnnotateMode::OnClose;
        for c in sessions {
            let id = SessionId {
                key_hash: hash,
                num: c.num,
            };
            if on_close {
                for (i, ek) in c.events.iter().enumerate() {
                    let tie = ek.tie;
                    let payload =
                        self.store
                            .take_payload(key, tie)?
                            .ok_or_else(|| StoreError::Corrupt {
                                table: "payloads",
                                detail: format!(
                                    "held event {tie} of a session of key {key:?} is missing"
                                ),
                            })?;
                    out.push(Output::Released {
                        payload,
                        time: ek.t,
                        annotation: Annotation {
                            id,
                            seq: i as u32 + 1,
                            start: i == 0,
                        },
                    });
                }
            }
            let mut stats = self.store.get_stats(user)?.unwrap_or_default();
            update_stats(&mut stats, c.first.t, c.last.t);
            self.store.put_stats(user, &stats)?;
            self.counters.sessions_concluded[reason_index(c.reason)] += 1;
            self.meta.open_sessions = self.meta.open_sessions.saturating_sub(1);
            out.push(Output::Session(ConcludedSession {
                id,
                key: key.to_owned(),
                user: user.to_owned(),
                start: c.first.t,
                end: c.last.t,
                event_count: u64::from(c.count),
                end_reason: c.reason,
                session_number: stats.session_count,
                stats,
                merged_ids: if on_close {
                    Vec::new()
                } else {
                    c.merged
                        .iter()
                        .map(|&num| SessionId {
                            key_hash: hash,
                            num,
                        })
                        .collect()
                },
            }));
        }
        Ok(())
    }

    /// Declares the task's input sources `0..n` (several co-partitioned topics), so that each
    /// holds the watermark back until it delivers or idles (see [`super::watermark::Watermark::expect_source`]).
    pub fn expect_sources(&mut self, n: u32, now: Millis) {
        for source in 0..n {
            self.meta.watermark.expect_source(source, now);
        }
    }

    /// Makes the state durable together with the input positions, atomically.
    pub fn commit(&mut self, offsets: &[SourceOffset]) -> Result<(), StoreError> {
        self.store.commit(&self.meta, offsets)
    }
}

/// Timer index entries to add for a key.
#[derive(Default)]
struct Timers {
    deadline: Option<Millis>,
    quiet: Option<Millis>,
}

/// Decides the key's timer index entries for its earliest pending work: sessions not yet
/// expired wait for the watermark `w`, expired ones for the end of their quiet period. Entries
/// are lazy: one already registered earlier than needed fires, finds nothing due and re-arms,
/// so an event that extends a session costs no index write.
fn plan_timers(st: &mut KeyState, w: Millis, quiet: Millis) -> Timers {
    let mut next_deadline: Option<Millis> = None;
    let mut next_quiet: Option<Millis> = None;
    for (d, s) in st.deadlines() {
        if d >= w {
            next_deadline = Some(next_deadline.map_or(d, |x| x.min(d)));
        } else {
            let q = s.touched.saturating_add(quiet);
            next_quiet = Some(next_quiet.map_or(q, |x| x.min(q)));
        }
    }
    let mut t = Timers::default();
    if let Some(d) = next_deadline {
        if st.deadline_timer.is_none_or(|cur| d < cur) {
            st.deadline_timer = Some(d);
            t.deadline = Some(d);
        }
    }
    if let Some(q) = next_quiet {
        if st.quiet_timer.is_none_or(|cur| q < cur) {
            st.quiet_timer = Some(q);
            t.quiet = Some(q);
        }
    }
    t
}

/// Adds a concluded session to the user's stats. `last_interval_ms` is the latest start of
/// the user's sessions minus the latest end among the sessions that started strictly before
/// it (`None` while there are none), whatever order the sessions conclude in. A session
/// accepted late, older than the latest, can only move that end (it is kept implicitly:
/// `last_session_start - last_interval_ms`, so the stored format stays); one starting at the
/// latest start changes nothing of it.
fn update_stats(s: &mut UserStats, start: Millis, end: Millis) {
    if s.session_count == 0 {
        s.first_session_start = start;
        s.last_session_start = start;
        s.last_session_end = end;
        s.last_interval_ms = None;
    } else {
        s.first_session_start = s.first_session_start.min(start);
        if start > s.last_session_start {
            s.last_interval_ms = Some(start - s.last_session_end);
            s.last_session_start = start;
        } else if start < s.last_session_start {
            let before = s
                .last_interval_ms
                .map_or(end, |i| end.max(s.last_session_start - i));
            s.last_interval_ms = Some(s.last_session_start - before);
        }
        s.last_session_end = s.last_session_end.max(end);
    }
    s.session_count += 1;
    s.total_length_ms += end - start;
}
