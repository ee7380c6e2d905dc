//! Every Prometheus metric of the service, named in this one place.
//!
//! [`Metrics`] owns a private [`Registry`] (no process-wide default registry, no global
//! singletons): the runtime creates one, shares it behind an `Arc`, and the HTTP server
//! ([`crate::http`]) renders it on `GET /metrics`. Call sites never spell a metric or label
//! name: they go through typed methods ([`Metrics::event_in`], [`Metrics::session_concluded`],
//! [`Metrics::record_out`], ...) whose label values come from enums ([`Outcome`],
//! [`DeadLetterReason`], [`OutputKind`], [`RebalanceKind`], the engine's `EndReason` and
//! `LateReason`). Hot paths can resolve their label values once with [`Metrics::topic`].
//!
//! Naming rules (SPEC section 4): every name starts with `sessionizer_`, counters end in
//! `_total`, units are in the name (`_seconds`, `_bytes`, `_records`), and no label ever
//! carries a user id: labels are topics, partition numbers and fixed reason codes only.
//! The metric table in the README is [`METRIC_TABLE`]; a test keeps it in step with the
//! registry.

use crate::codec::DecodeError;
use crate::engine::{ConcludedSession, EndReason, LateReason};
use prometheus::core::Collector;
use prometheus::{
    Encoder as _, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::time::Duration;

/// Prefix of every metric name.
pub const NAMESPACE: &str = "sessionizer";

/// Upper bounds (seconds) of `sessionizer_session_length_seconds`: 1, 2, 4, ..., 131072 (2^17,
/// about 36 h). Sessions of 0 s (a single event) fall in the first bucket.
pub const SESSION_LENGTH_BUCKETS: [f64; 18] = pow2_buckets::<18>();

/// Upper bounds of `sessionizer_events_per_session`: 1, 2, 4, ..., 4096 (2^12).
pub const EVENTS_PER_SESSION_BUCKETS: [f64; 13] = pow2_buckets::<13>();

/// Upper bounds (seconds) of `sessionizer_processing_latency_seconds`. The 50 ms bound is the
/// SPEC's p99 target, so the SLO can be read off one bucket.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds (seconds) of the commit-time histograms (transactions, state + offsets).
pub const COMMIT_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const fn pow2_buckets<const N: usize>() -> [f64; N] {
    let mut b = [0.0; N];
    let mut i = 0;
    let mut v = 1.0;
    while i < N {
        b[i] = v;
        v *= 2.0;
        i += 1;
    }
    b
}

/// Markdown table of every metric, for the README (name, type, labels, meaning).
pub const METRIC_TABLE: &str = "\
| name | type | labels | meaning |
|---|---|---|---|
| `sessionizer_build_info` | gauge | `version` | always 1; the running version |
| `sessionizer_events_total` | counter | `topic`, `outcome` | input events by fate: `accepted` (sessionized, or held in `on_close` mode), `excluded` (passed through out of session), `late`, `dead_letter`; counted when processed, so a rewind after a failed transaction counts the records it reads again |
| `sessionizer_dead_letters_total` | counter | `reason` | dead-lettered input records by reason code (the dead-letter reason codes, plus `future_time`) |
| `sessionizer_late_events_total` | counter | `reason` | late events by reason: `concluded_session`, `beyond_horizon` |
| `sessionizer_records_out_total` | counter | `output` | records handed on to be written, by output: `annotated`, `sessions`, `late`, `dead_letters`, `stats` (exactly-once: also those of a transaction that then aborted, which are written again after the rewind) |
| `sessionizer_sessions_opened_total` | counter | | sessions opened |
| `sessionizer_sessions_merged_total` | counter | | sessions absorbed by a merge (a late event bridged two open sessions) |
| `sessionizer_sessions_split_total` | counter | | sessions split by a late event |
| `sessionizer_sessions_concluded_total` | counter | `end_reason` | sessions concluded, by end reason: `inactivity`, `explicit_end`, `explicit_start`, `max_length`, `day_boundary` |
| `sessionizer_open_sessions` | gauge | `partition` | sessions currently open in the partition's task |
| `sessionizer_session_length_seconds` | histogram | | length (last - first event time) of concluded sessions; buckets 1, 2, 4, ..., 131072 s |
| `sessionizer_events_per_session` | histogram | | events in each concluded session; buckets 1, 2, 4, ..., 4096 |
| `sessionizer_watermark_seconds` | gauge | `topic`, `partition` | event-time watermark, as Unix epoch seconds |
| `sessionizer_watermark_lag_seconds` | gauge | `topic`, `partition` | wall clock minus watermark |
| `sessionizer_consumer_lag_records` | gauge | `topic`, `partition` | records of the input partition not yet taken: from the last one taken to its end (last stable offset), from the client's statistics (every 5 s) |
| `sessionizer_processing_latency_seconds` | histogram | | end-to-end latency, input record timestamp to its annotated record being handed on: to the producer at-least-once; exactly-once, to its interval's transaction, which read_committed readers see when it commits (up to `kafka.commit_interval` later, not counted); not recorded in `on_close` mode |
| `sessionizer_transaction_commit_seconds` | histogram | | time to produce and commit one Kafka transaction (exactly-once: outputs, changelog records and offsets; at-least-once: changelog records and offsets) |
| `sessionizer_transaction_aborts_total` | counter | | Kafka transactions aborted |
| `sessionizer_changelog_bytes_total` | counter | | bytes of state records (keys and values) staged for the changelog and RocksDB by commits; per event taken in (`sessionizer_events_total`), the state each event costs to commit (README, What a commit costs) |
| `sessionizer_commit_seconds` | histogram | | time from a commit being staged to its state and input offsets being written (waiting for the commits before it, its transaction and one RocksDB write batch; at-least-once, also the outputs' acknowledgements) |
| `sessionizer_tick_seconds` | histogram | | time the consumer thread spends at each commit interval moving time on, concluding sessions and staging the commit, and, when the commit interval is longer than 100 ms, at each 100 ms time step between commits moving time on; no input is taken meanwhile |
| `sessionizer_rebalances_total` | counter | `kind` | consumer-group rebalance callbacks: `assigned`, `revoked` |
| `sessionizer_restore_records_total` | counter | `partition` | state records restored from the changelog |
| `sessionizer_restoring_partitions` | gauge | | partitions currently restoring their state |
| `sessionizer_state_size_bytes` | gauge | `partition` | estimated size of the partition's RocksDB state (live SST files + memtables) |
| `sessionizer_state_cache_bytes` | gauge | `partition` | estimated memory of the decoded key states and user stats the partition keeps between commits (within its share of the memory budget; README, Sizing memory) |
| `sessionizer_rocksdb_cache_bytes` | gauge | | memory in RocksDB's block cache shared by every partition, memtables included (within half the memory budget) |
| `sessionizer_memory_budget_bytes` | gauge | | `service.memory_budget_mib`, in bytes |
| `sessionizer_standby_partitions` | gauge | | partitions of which this instance keeps a standby copy |
| `sessionizer_standby_checkpoint` | gauge | `partition` | next changelog offset a standby copy reflects (compare with the changelog's end offset) |
| `sessionizer_process_*` | counter / gauge | | process CPU seconds, resident and virtual memory bytes, open and max file descriptors, threads, start time (Linux) |
";

/// Failure to build or render the metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("invalid metric `{name}`: {source}")]
    Define {
        name: &'static str,
        #[source]
        source: prometheus::Error,
    },
    #[error("failed to encode the metrics: {0}")]
    Encode(#[source] prometheus::Error),
}

/// The fate of one input event: the `outcome` label of `sessionizer_events_total`. `Late` and
/// `DeadLetter` carry their reason, so the per-reason counters can't drift from the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sessionized (annotated now, or held until its session concludes in `on_close` mode).
    Accepted,
    /// A configured non-engagement event, passed through out of session.
    Excluded,
    /// Sent to the late output.
    Late(LateReason),
    /// Sent to the dead-letter output.
    DeadLetter(DeadLetterReason),
}

impl Outcome {
    /// The label values of `outcome`.
    pub const LABELS: [&'static str; 4] = ["accepted", "excluded", "late", "dead_letter"];

    fn index(self) -> usize {
        match self {
            Outcome::Accepted => 0,
            Outcome::Excluded => 1,
            Outcome::Late(_) => 2,
            Outcome::DeadLetter(_) => 3,
        }
    }

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

/// Why a record went to the dead-letter output: a decode failure ([`DecodeError::reason`]) or
/// a time too far in the future. Only these codes can be built, so the `reason` label set is
/// closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeadLetterReason(u8);

impl DeadLetterReason {
    const DECODE_COUNT: usize = DecodeError::REASONS.len();
    /// The record is larger than `input.max_record_bytes`, or its outputs than their topics
    /// take (see [`crate::kafka::limits`]).
    pub const RECORD_TOO_LARGE: DeadLetterReason = {
        let mut i = 0;
        // `position` is not const.
        while !matches!(DecodeError::REASONS[i].as_bytes(), b"record_too_large") {
            i += 1;
        }
        DeadLetterReason(i as u8)
    };
    /// The event time is beyond the allowed clock skew (`time.future_events = dead_letter`).
    pub const FUTURE_TIME: DeadLetterReason = DeadLetterReason(Self::DECODE_COUNT as u8);
    /// Number of reason codes.
    pub const COUNT: usize = Self::DECODE_COUNT + 1;

    /// Every reason, in a fixed order.
    pub fn all() -> impl Iterator<Item = DeadLetterReason> {
        (0..Self::COUNT as u8).map(DeadLetterReason)
    }

    /// The reason code, as in the dead-letter records.
    pub fn as_str(self) -> &'static str {
        DecodeError::REASONS
            .get(usize::from(self.0))
            .copied()
            .unwrap_or("future_time")
    }

    fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl From<&DecodeError> for DeadLetterReason {
    fn from(e: &DecodeError) -> Self {
        let code = e.reason();
        let i = DecodeError::REASONS
            .iter()
            .position(|r| *r == code)
            .unwrap_or(0);
        DeadLetterReason(i as u8)
    }
}

/// An output of the service: the `output` label of `sessionizer_records_out_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputKind {
    /// Annotated events.
    Annotated,
    /// Concluded sessions, merges and splits.
    Sessions,
    /// Late events.
    Late,
    /// Dead letters.
    DeadLetters,
    /// Per-user session stats.
    Stats,
}

impl OutputKind {
    pub const ALL: [OutputKind; 5] = [
        OutputKind::Annotated,
        OutputKind::Sessions,
        OutputKind::Late,
        OutputKind::DeadLetters,
        OutputKind::Stats,
    ];

    /// The `output` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Annotated => "annotated",
            OutputKind::Sessions => "sessions",
            OutputKind::Late => "late",
            OutputKind::DeadLetters => "dead_letters",
            OutputKind::Stats => "stats",
        }
    }

    /// Its position in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A consumer-group rebalance callback: the `kind` label of `sessionizer_rebalances_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RebalanceKind {
    Assigned,
    Revoked,
}

impl RebalanceKind {
    pub const ALL: [RebalanceKind; 2] = [RebalanceKind::Assigned, RebalanceKind::Revoked];

    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RebalanceKind::Assigned => "assigned",
            RebalanceKind::Revoked => "revoked",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

fn late_index(r: LateReason) -> usize {
    match r {
        LateReason::ConcludedSession => 0,
        LateReason::BeyondHorizon => 1,
    }
}

const LATE_REASONS: [LateReason; 2] = [LateReason::ConcludedSession, LateReason::BeyondHorizon];

fn end_reason_index(r: EndReason) -> usize {
    EndReason::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

/// Counters per reason, shared by [`Metrics`] and every [`TopicMetrics`] (cheap clones: each
/// metric handle is an `Arc`).
#[derive(Clone)]
struct ReasonCounters {
    late: [IntCounter; 2],
    dead_letter: Vec<IntCounter>,
}

impl ReasonCounters {
    fn count(&self, outcome: Outcome, n: u64) {
        match outcome {
            Outcome::Late(r) => self.late[late_index(r)].inc_by(n),
            Outcome::DeadLetter(r) => {
                if let Some(c) = self.dead_letter.get(r.index()) {
                    c.inc_by(n);
                }
            }
            Outcome::Accepted | Outcome::Excluded => {}
        }
    }
}

/// The input-event counters of one topic with their label values resolved, for the hot path:
/// counting through it is a couple of atomic adds, no label lookup.
#[derive(Clone)]
pub struct TopicMetrics {
    outcomes: [IntCounter; 4],
    reasons: ReasonCounters,
}

impl TopicMetrics {
    /// Counts one input event of this topic.
    pub fn event(&self, outcome: Outcome) {
        self.events(outcome, 1);
    }

    /// Counts `n` input events of this topic with the same outcome.
    pub fn events(&self, outcome: Outcome, n: u64) {
        self.outcomes[outcome.index()].inc_by(n);
        self.reasons.count(outcome, n);
    }
}

/// All the metrics of one process, in their own registry.
pub struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    reasons: ReasonCounters,
    records_out: [IntCounter; 5],
    sessions_opened: IntCounter,
    sessions_merged: IntCounter,
    sessions_split: IntCounter,
    sessions_concluded: [IntCounter; 5],
    open_sessions: IntGaugeVec,
    session_length: Histogram,
    events_per_session: Histogram,
    watermark: GaugeVec,
    watermark_lag: GaugeVec,
    consumer_lag: IntGaugeVec,
    processing_latency: Histogram,
    transaction_commit: Histogram,
    tick: Histogram,
    transaction_aborts: IntCounter,
    changelog_bytes: IntCounter,
    commit: Histogram,
    rebalances: [IntCounter; 2],
    restore_records: IntCounterVec,
    restoring_partitions: IntGauge,
    standby_partitions: IntGauge,
    standby_checkpoint: IntGaugeVec,
    state_size: IntGaugeVec,
    state_cache: IntGaugeVec,
    rocksdb_cache: IntGauge,
    memory_budget: IntGauge,
}

/// Registers metrics, turning errors into [`MetricsError::Define`] with the metric's name.
struct Builder {
    registry: Registry,
}

impl Builder {
    fn register<C: Collector + Clone + 'static>(
        &self,
        name: &'static str,
        made: prometheus::Result<C>,
    ) -> Result<C, MetricsError> {
        let define = |source| MetricsError::Define { name, source };
        let c = made.map_err(define)?;
        self.registry
            .register(Box::new(c.clone()))
            .map_err(define)?;
        Ok(c)
    }

    fn counter(&self, name: &'static str, help: &str) -> Result<IntCounter, MetricsError> {
        self.register(name, IntCounter::with_opts(Opts::new(name, help)))
    }

    fn counter_vec(
        &self,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        self.register(name, IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn int_gauge(&self, name: &'static str, help: &str) -> Result<IntGauge, MetricsError> {
        self.register(name, IntGauge::with_opts(Opts::new(name, help)))
    }

    fn int_gauge_vec(
        &self,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        self.register(name, IntGaugeVec::new(Opts::new(name, help), labels))
    }

    fn gauge_vec(
        &self,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Result<GaugeVec, MetricsError> {
        self.register(name, GaugeVec::new(Opts::new(name, help), labels))
    }

    fn histogram(
        &self,
        name: &'static str,
        help: &str,
        buckets: &[f64],
    ) -> Result<Histogram, MetricsError> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(name, Histogram::with_opts(opts))
    }
}

/// `[vec{label=values[0]}, vec{label=values[1]}, ...]`, resolved once.
fn resolve<const N: usize>(vec: &IntCounterVec, values: [&str; N]) -> [IntCounter; N] {
    values.map(|v| vec.with_label_values(&[v]))
}

impl Metrics {
    /// Defines every metric in a new registry. Fails only if a definition is invalid (a bug,
    /// caught by the tests).
    pub fn new() -> Result<Self, MetricsError> {
        let b = Builder {
            registry: Registry::new(),
        };

        let build_info = b.int_gauge_vec(
            "sessionizer_build_info",
            "Always 1; the version label tells which build is running.",
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let events = b.counter_vec(
            "sessionizer_events_total",
            "Input events by topic and fate: accepted (sessionized or held), excluded (passed \
             through out of session), late, dead_letter.",
            &["topic", "outcome"],
        )?;
        let dead_letters = b.counter_vec(
            "sessionizer_dead_letters_total",
            "Input records sent to the dead-letter output, by reason code.",
            &["reason"],
        )?;
        let late_events = b.counter_vec(
            "sessionizer_late_events_total",
            "Input events sent to the late output, by reason (concluded_session, \
             beyond_horizon).",
            &["reason"],
        )?;
        let reasons = ReasonCounters {
            late: LATE_REASONS.map(|r| late_events.with_label_values(&[r.as_str()])),
            dead_letter: DeadLetterReason::all()
                .map(|r| dead_letters.with_label_values(&[r.as_str()]))
                .collect(),
        };

        let records_out = b.counter_vec(
            "sessionizer_records_out_total",
            "Records handed on to be written, by output (annotated, sessions, late, \
             dead_letters, stats).",
            &["output"],
        )?;
        let records_out = resolve(&records_out, OutputKind::ALL.map(OutputKind::as_str));

        let sessions_opened = b.counter("sessionizer_sessions_opened_total", "Sessions opened.")?;
        let sessions_merged = b.counter(
            "sessionizer_sessions_merged_total",
            "Sessions absorbed into another by a late event that bridged them.",
        )?;
        let sessions_split = b.counter(
            "sessionizer_sessions_split_total",
            "Sessions split in two by a late event.",
        )?;
        let sessions_concluded = b.counter_vec(
            "sessionizer_sessions_concluded_total",
            "Sessions concluded, by end reason.",
            &["end_reason"],
        )?;
        let sessions_concluded =
            resolve(&sessions_concluded, EndReason::ALL.map(EndReason::as_str));
        let open_sessions = b.int_gauge_vec(
            "sessionizer_open_sessions",
            "Sessions currently open, per input partition (task).",
            &["partition"],
        )?;
        let session_length = b.histogram(
            "sessionizer_session_length_seconds",
            "Length of concluded sessions (last minus first event time), in seconds.",
            &SESSION_LENGTH_BUCKETS,
        )?;
        let events_per_session = b.histogram(
            "sessionizer_events_per_session",
            "Number of events in each concluded session.",
            &EVENTS_PER_SESSION_BUCKETS,
        )?;

        let watermark = b.gauge_vec(
            "sessionizer_watermark_seconds",
            "Event-time watermark of the input partition, as Unix epoch seconds.",
            &["topic", "partition"],
        )?;
        let watermark_lag = b.gauge_vec(
            "sessionizer_watermark_lag_seconds",
            "Wall clock minus the event-time watermark of the input partition, in seconds.",
            &["topic", "partition"],
        )?;
        let consumer_lag = b.int_gauge_vec(
            "sessionizer_consumer_lag_records",
            "Records of the input partition not yet taken (to its last stable offset).",
            &["topic", "partition"],
        )?;
        let processing_latency = b.histogram(
            "sessionizer_processing_latency_seconds",
            "End-to-end latency from an input record's timestamp to its annotated record \
             being handed on to be produced, in seconds.",
            &LATENCY_BUCKETS,
        )?;

        let transaction_commit = b.histogram(
            "sessionizer_transaction_commit_seconds",
            "Time to produce and commit a Kafka transaction (both delivery modes), in seconds.",
            &COMMIT_BUCKETS,
        )?;
        let transaction_aborts = b.counter(
            "sessionizer_transaction_aborts_total",
            "Kafka transactions aborted.",
        )?;
        let changelog_bytes = b.counter(
            "sessionizer_changelog_bytes_total",
            "Bytes of state records (keys and values) staged for the changelog and RocksDB by \
             commits.",
        )?;
        let commit = b.histogram(
            "sessionizer_commit_seconds",
            "Time from a commit being staged to its state and input offsets being written in \
             one RocksDB write batch (at-least-once: including the wait for its outputs' \
             acknowledgements), in seconds.",
            &COMMIT_BUCKETS,
        )?;

        let tick = b.histogram(
            "sessionizer_tick_seconds",
            "Time the consumer thread spends at each commit interval moving time on, \
             concluding sessions and staging the commit, and, when the commit interval is \
             longer than 100 ms, at each 100 ms time step between commits moving time on (no \
             input is taken meanwhile), in seconds.",
            &LATENCY_BUCKETS,
        )?;

        let rebalances = b.counter_vec(
            "sessionizer_rebalances_total",
            "Consumer-group rebalance callbacks, by kind (assigned, revoked).",
            &["kind"],
        )?;
        let rebalances = resolve(&rebalances, RebalanceKind::ALL.map(RebalanceKind::as_str));
        let restore_records = b.counter_vec(
            "sessionizer_restore_records_total",
            "State records restored from the changelog topic, per partition.",
            &["partition"],
        )?;
        let restoring_partitions = b.int_gauge(
            "sessionizer_restoring_partitions",
            "Partitions currently restoring their state from the changelog.",
        )?;
        let standby_partitions = b.int_gauge(
            "sessionizer_standby_partitions",
            "Partitions of which this instance keeps a standby copy of the state.",
        )?;
        let standby_checkpoint = b.int_gauge_vec(
            "sessionizer_standby_checkpoint",
            "Next changelog offset a standby copy of the partition's state reflects.",
            &["partition"],
        )?;
        let state_size = b.int_gauge_vec(
            "sessionizer_state_size_bytes",
            "Estimated size of the partition's RocksDB state (live SST files and memtables), \
             in bytes.",
            &["partition"],
        )?;
        let state_cache = b.int_gauge_vec(
            "sessionizer_state_cache_bytes",
            "Estimated memory of the decoded key states and user stats the partition keeps \
             between commits, in bytes.",
            &["partition"],
        )?;
        let rocksdb_cache = b.int_gauge(
            "sessionizer_rocksdb_cache_bytes",
            "Memory in RocksDB's block cache shared by every partition (memtables included), \
             in bytes.",
        )?;
        let memory_budget = b.int_gauge(
            "sessionizer_memory_budget_bytes",
            "The state's memory budget (service.memory_budget_mib), in bytes.",
        )?;

        #[cfg(target_os = "linux")]
        {
            let pid = i32::try_from(std::process::id()).unwrap_or(0);
            let process = prometheus::process_collector::ProcessCollector::new(pid, NAMESPACE);
            b.registry
                .register(Box::new(process))
                .map_err(|source| MetricsError::Define {
                    name: "sessionizer_process_*",
                    source,
                })?;
        }

        Ok(Metrics {
            registry: b.registry,
            events,
            reasons,
            records_out,
            sessions_opened,
            sessions_merged,
            sessions_split,
            sessions_concluded,
            open_sessions,
            session_length,
            events_per_session,
            watermark,
            watermark_lag,
            consumer_lag,
            processing_latency,
            transaction_commit,
            tick,
            transaction_aborts,
            changelog_bytes,
            commit,
            rebalances,
            restore_records,
            restoring_partitions,
            standby_partitions,
            standby_checkpoint,
            state_size,
            state_cache,
            rocksdb_cache,
            memory_budget,
        })
    }

    /// The registry, e.g. to gather the families in tests.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The input-event counters of `topic`, resolved once (every outcome then shows as 0
    /// until it happens). Keep the handle for the hot path.
    pub fn topic(&self, topic: &str) -> TopicMetrics {
        TopicMetrics {
            outcomes: Outcome::LABELS.map(|o| self.events.with_label_values(&[topic, o])),
            reasons: self.reasons.clone(),
        }
    }

    /// Counts one input event of `topic` (resolves the labels on each call; see
    /// [`Metrics::topic`] for the hot path).
    pub fn event_in(&self, topic: &str, outcome: Outcome) {
        self.events
            .with_label_values(&[topic, outcome.as_str()])
            .inc();
        self.reasons.count(outcome, 1);
    }

    /// Counts `n` records written to `output`.
    pub fn records_out(&self, output: OutputKind, n: u64) {
        self.records_out[output.index()].inc_by(n);
    }

    /// Counts one record written to `output`.
    pub fn record_out(&self, output: OutputKind) {
        self.records_out(output, 1);
    }

    /// Counts `n` sessions opened.
    pub fn sessions_opened(&self, n: u64) {
        self.sessions_opened.inc_by(n);
    }

    /// Counts `n` sessions absorbed by merges.
    pub fn sessions_merged(&self, n: u64) {
        self.sessions_merged.inc_by(n);
    }

    /// Counts `n` sessions split.
    pub fn sessions_split(&self, n: u64) {
        self.sessions_split.inc_by(n);
    }

    /// Counts a concluded session by end reason and observes its length and event count.
    pub fn session_concluded(&self, s: &ConcludedSession) {
        self.sessions_concluded[end_reason_index(s.end_reason)].inc();
        let length_ms = s.end.saturating_sub(s.start).max(0);
        self.session_length.observe(length_ms as f64 / 1000.0);
        self.events_per_session.observe(s.event_count as f64);
    }

    /// Sets the number of open sessions of a partition's task.
    pub fn set_open_sessions(&self, partition: i32, open: u64) {
        self.open_sessions
            .with_label_values(&[partition.to_string()])
            .set(saturating_i64(open));
    }

    /// Sets the watermark of an input partition and its lag behind the wall clock `now_ms`
    /// (both epoch milliseconds). A watermark of `i64::MIN` (no event yet) leaves the gauges
    /// unset.
    pub fn set_watermark(&self, topic: &str, partition: i32, watermark_ms: i64, now_ms: i64) {
        if watermark_ms == i64::MIN {
            return;
        }
        let p = partition.to_string();
        let labels = [topic, p.as_str()];
        self.watermark
            .with_label_values(&labels)
            .set(watermark_ms as f64 / 1000.0);
        self.watermark_lag
            .with_label_values(&labels)
            .set(now_ms.saturating_sub(watermark_ms) as f64 / 1000.0);
    }

    /// Sets the consumer lag (records) of an input partition.
    pub fn set_consumer_lag(&self, topic: &str, partition: i32, records: i64) {
        self.consumer_lag
            .with_label_values(&[topic, partition.to_string().as_str()])
            .set(records.max(0));
    }

    /// Observes the end-to-end latency of one record.
    pub fn observe_processing_latency(&self, latency: Duration) {
        self.processing_latency.observe(latency.as_secs_f64());
    }

    /// Observes the time a Kafka transaction commit took.
    pub fn observe_transaction_commit(&self, took: Duration) {
        self.transaction_commit.observe(took.as_secs_f64());
    }

    /// Counts an aborted Kafka transaction.
    pub fn transaction_aborted(&self) {
        self.transaction_aborts.inc();
    }

    /// Counts the bytes of the state records a commit staged.
    pub fn changelog_bytes(&self, n: u64) {
        self.changelog_bytes.inc_by(n);
    }

    /// Observes the time a state + offsets commit took.
    pub fn observe_commit(&self, took: Duration) {
        self.commit.observe(took.as_secs_f64());
    }

    /// Observes the time one tick of the consumer thread took (see `sessionizer_tick_seconds`).
    pub fn observe_tick(&self, took: Duration) {
        self.tick.observe(took.as_secs_f64());
    }

    /// Counts a rebalance callback.
    pub fn rebalance(&self, kind: RebalanceKind) {
        self.rebalances[kind.index()].inc();
    }

    /// Counts `n` state records restored for `partition`.
    pub fn restore_records(&self, partition: i32, n: u64) {
        self.restore_records
            .with_label_values(&[partition.to_string()])
            .inc_by(n);
    }

    /// Sets the number of partitions currently restoring.
    pub fn set_restoring_partitions(&self, n: u64) {
        self.restoring_partitions.set(saturating_i64(n));
    }

    /// Sets how many standby copies this instance keeps.
    pub fn set_standby_partitions(&self, n: u64) {
        self.standby_partitions.set(saturating_i64(n));
    }

    /// Sets the changelog offset a standby copy of `partition` has reached.
    pub fn set_standby_checkpoint(&self, partition: i32, next_offset: i64) {
        self.standby_checkpoint
            .with_label_values(&[partition.to_string()])
            .set(next_offset);
    }

    /// A standby copy of `partition` is no longer kept.
    pub fn forget_standby(&self, partition: i32) {
        let _ = self
            .standby_checkpoint
            .remove_label_values(&[partition.to_string().as_str()]);
    }

    /// Sets the RocksDB state size of a partition.
    pub fn set_state_size(&self, partition: i32, bytes: u64) {
        self.state_size
            .with_label_values(&[partition.to_string()])
            .set(saturating_i64(bytes));
    }

    /// Sets the estimated memory of a partition's decoded state cache.
    pub fn set_state_cache(&self, partition: i32, bytes: u64) {
        self.state_cache
            .with_label_values(&[partition.to_string()])
            .set(saturating_i64(bytes));
    }

    /// Sets the memory in RocksDB's shared block cache.
    pub fn set_rocksdb_cache(&self, bytes: u64) {
        self.rocksdb_cache.set(saturating_i64(bytes));
    }

    /// Sets the state's memory budget (once, at start).
    pub fn set_memory_budget(&self, bytes: u64) {
        self.memory_budget.set(saturating_i64(bytes));
    }

    /// Drops the per-partition series of a partition this instance no longer owns (after a
    /// revocation), so its gauges don't linger with stale values. `topics` are the input
    /// topics of the partition. Counters are kept (their series must not go backwards).
    pub fn forget_partition(&self, topics: &[&str], partition: i32) {
        let p = partition.to_string();
        // Removing a series that was never set is not an error worth reporting.
        let _ = self.open_sessions.remove_label_values(&[p.as_str()]);
        let _ = self.state_size.remove_label_values(&[p.as_str()]);
        let _ = self.state_cache.remove_label_values(&[p.as_str()]);
        for topic in topics {
            let labels = [*topic, p.as_str()];
            let _ = self.watermark.remove_label_values(&labels);
            let _ = self.watermark_lag.remove_label_values(&labels);
            let _ = self.consumer_lag.remove_label_values(&labels);
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn try_render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(MetricsError::Encode)?;
        String::from_utf8(buf)
            .map_err(|e| MetricsError::Encode(prometheus::Error::Msg(format!("not UTF-8: {e}"))))
    }

    /// Like [`Metrics::try_render`], with an encoding failure (never expected) rendered as a
    /// comment line instead.
    pub fn render(&self) -> String {
        self.try_render()
            .unwrap_or_else(|e| format!("# sessionizer: {e}\n"))
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{SessionId, UserStats};
    use prometheus::proto::MetricType;
    use std::collections::BTreeSet;

    fn session(reason: EndReason, start: i64, end: i64, events: u64) -> ConcludedSession {
        ConcludedSession {
            id: SessionId {
                key_hash: 1,
                num: 1,
            },
            key: "u".into(),
            user: "u".into(),
            start,
            end,
            event_count: events,
            end_reason: reason,
            session_number: 1,
            merged_ids: vec![],
            stats: UserStats::default(),
        }
    }

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(SESSION_LENGTH_BUCKETS[0], 1.0);
        assert_eq!(SESSION_LENGTH_BUCKETS[17], 131072.0);
        assert_eq!(EVENTS_PER_SESSION_BUCKETS[12], 4096.0);
        for (i, b) in SESSION_LENGTH_BUCKETS.iter().enumerate() {
            assert_eq!(*b, 2f64.powi(i as i32));
        }
    }

    #[test]
    fn dead_letter_reasons_cover_every_decode_reason() {
        let codes: Vec<_> = DeadLetterReason::all().map(|r| r.as_str()).collect();
        assert_eq!(codes.len(), DeadLetterReason::COUNT);
        assert_eq!(
            &codes[..DecodeError::REASONS.len()],
            &DecodeError::REASONS[..]
        );
        assert_eq!(DeadLetterReason::FUTURE_TIME.as_str(), "future_time");
        let e = DecodeError::TooLarge { size: 9, max: 1 };
        assert_eq!(DeadLetterReason::from(&e).as_str(), "record_too_large");
        assert_eq!(
            DeadLetterReason::RECORD_TOO_LARGE.as_str(),
            "record_too_large"
        );
        let e = DecodeError::AnnotationFieldPresent("session".into());
        assert_eq!(
            DeadLetterReason::from(&e).as_str(),
            "annotation_field_present"
        );
    }

    /// Metrics with a series in every labelled family, so that every family is gathered.
    fn every_family() -> Metrics {
        let m = Metrics::new().unwrap();
        m.topic("events");
        m.set_open_sessions(0, 1);
        m.set_watermark("events", 0, 1_000, 2_000);
        m.set_consumer_lag("events", 0, 3);
        m.restore_records(0, 1);
        m.set_state_size(0, 1);
        m.set_state_cache(0, 1);
        m.set_standby_checkpoint(1, 1);
        m
    }

    #[test]
    fn naming_rules_hold_for_every_family() {
        let families = every_family().registry().gather();
        let mut names = BTreeSet::new();
        for f in &families {
            let name = f.name();
            names.insert(name.to_string());
            assert!(name.starts_with("sessionizer_"), "{name}");
            assert!(!f.help().is_empty(), "{name} has no help");
            if f.get_field_type() == MetricType::COUNTER {
                assert!(name.ends_with("_total"), "{name}");
            } else {
                assert!(!name.ends_with("_total"), "{name}");
            }
            for metric in f.get_metric() {
                for l in metric.get_label() {
                    assert!(!l.name().contains("user"), "{name} has label {}", l.name());
                }
            }
        }
        // Every family is in the README table, and every table row is a family.
        for name in &names {
            let documented = METRIC_TABLE.contains(&format!("`{name}`"))
                || (name.starts_with("sessionizer_process_")
                    && METRIC_TABLE.contains("`sessionizer_process_*`"));
            assert!(documented, "{name} missing from METRIC_TABLE");
        }
        for row in METRIC_TABLE.lines().skip(2) {
            let name = row.split('`').nth(1).unwrap();
            if name != "sessionizer_process_*" {
                assert!(
                    names.contains(name),
                    "{name} in the table but not registered"
                );
            }
        }
    }

    /// Every metric the Grafana dashboard and the Prometheus alert rules query is one the
    /// service exports (histogram series by their family name).
    #[test]
    fn dashboards_and_alerts_query_existing_metrics() {
        let names: BTreeSet<String> = every_family()
            .registry()
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for (file, text) in [
            (
                "deploy/grafana/dashboards/sessionizer.json",
                include_str!("../deploy/grafana/dashboards/sessionizer.json"),
            ),
            (
                "deploy/prometheus/alerts.yml",
                include_str!("../deploy/prometheus/alerts.yml"),
            ),
        ] {
            let mut queried = 0;
            for (at, _) in text.match_indices("sessionizer_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                let family = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| names.contains(*f)))
                    .unwrap_or(&name);
                assert!(names.contains(family), "{file} queries unknown {name}");
                queried += 1;
            }
            assert!(queried > 5, "{file}: only {queried} metric names found");
        }
    }

    #[test]
    fn typed_api_counts_consistently() {
        let m = Metrics::new().unwrap();
        let t = m.topic("events");
        t.event(Outcome::Accepted);
        t.events(Outcome::Late(LateReason::BeyondHorizon), 2);
        m.event_in("events", Outcome::DeadLetter(DeadLetterReason::FUTURE_TIME));
        m.session_concluded(&session(EndReason::MaxLength, 0, 3_000, 5));
        let text = m.render();
        for line in [
            "sessionizer_events_total{outcome=\"accepted\",topic=\"events\"} 1",
            "sessionizer_events_total{outcome=\"late\",topic=\"events\"} 2",
            "sessionizer_events_total{outcome=\"dead_letter\",topic=\"events\"} 1",
            "sessionizer_events_total{outcome=\"excluded\",topic=\"events\"} 0",
            "sessionizer_late_events_total{reason=\"beyond_horizon\"} 2",
            "sessionizer_late_events_total{reason=\"concluded_session\"} 0",
            "sessionizer_dead_letters_total{reason=\"future_time\"} 1",
            "sessionizer_dead_letters_total{reason=\"invalid_json\"} 0",
            "sessionizer_sessions_concluded_total{end_reason=\"max_length\"} 1",
            "sessionizer_session_length_seconds_bucket{le=\"2\"} 0",
            "sessionizer_session_length_seconds_bucket{le=\"4\"} 1",
            "sessionizer_events_per_session_bucket{le=\"4\"} 0",
            "sessionizer_events_per_session_bucket{le=\"8\"} 1",
            "sessionizer_build_info{version=\"0.1.0\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        a.transaction_aborted();
        assert!(a
            .render()
            .contains("sessionizer_transaction_aborts_total 1"));
        assert!(b
            .render()
            .contains("sessionizer_transaction_aborts_total 0"));
    }

    #[test]
    fn forgetting_a_partition_drops_its_gauges() {
        let m = Metrics::new().unwrap();
        m.set_watermark("a", 3, 10_000, 12_500);
        m.set_open_sessions(3, 7);
        let text = m.render();
        assert!(text.contains("sessionizer_watermark_seconds{partition=\"3\",topic=\"a\"} 10"));
        assert!(text.contains("sessionizer_watermark_lag_seconds{partition=\"3\",topic=\"a\"} 2.5"));
        m.forget_partition(&["a"], 3);
        let text = m.render();
        assert!(!text.contains("partition=\"3\""), "{text}");
        // Forgetting twice, or a partition never seen, is harmless.
        m.forget_partition(&["a", "b"], 3);
    }

    #[test]
    fn no_watermark_yet_sets_nothing() {
        let m = Metrics::new().unwrap();
        m.set_watermark("a", 0, i64::MIN, 1_000);
        assert!(!m.render().contains("sessionizer_watermark_seconds{"));
    }
}
