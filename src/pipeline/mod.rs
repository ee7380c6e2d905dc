//! The streaming pipeline: a Kafka consumer group feeding one engine task per input partition
//! number, each with its own RocksDB state backed by a changelog partition, and every output
//! produced to Kafka.
//!
//! Every `commit_interval` the pipeline moves time on in every task and stages a commit: each
//! task's state changes (the changelog records) and input offsets. Staging only marks the key
//! states the commit owes; the stores encode them [`KEYS_PER_RECORD`] after each record
//! consumed (see [`Staged`](commits::Staged)), so consumption does not stop for them. Between commits it also
//! moves time on every [`TIME_STEP`], so that sessions are concluded in small steps. While a
//! partition reads a backlog (it has not reached its end since the last commit) commits come
//! every `catch_up_commit_interval` instead (1 s by default), or sooner once the interval's
//! buffered outputs reach [`CATCH_UP_BATCH_BYTES`]; once every partition has reached its
//! end, the backlog is committed at once (see [`commit_is_due`](commits::commit_is_due), [`Core::drained`]). Staged
//! commits are handed, in order, to the [`StateCommitter`], a thread with its own
//! transactional producer, which commits each in one Kafka transaction while the consumer
//! thread goes on with the next interval. Up to [`MAX_PENDING_COMMITS`] commits may be in
//! flight; a rebalance and the shutdown wait for all of them.
//!
//! * **exactly-once**: the outputs of an interval are buffered (see [`Sink`]) and go in its
//!   transaction, with its changelog records and input offsets, so read_committed readers see
//!   all of them or none;
//! * **at-least-once**: outputs go out at once on an idempotent producer; a staged commit is
//!   handed over only once every output sent up to it is acknowledged (at a steady rate its
//!   changelog records then go out spread over a quarter of the interval, [`PACE_SHARE`]), so
//!   the changelog never holds a commit whose outputs could still be lost. After a crash the
//!   tasks resume from their last written commit and produce the outputs since then again,
//!   identically, because the engine is deterministic.
//!
//! Either way the transaction makes a commit atomic and fences a zombie: a producer's offsets
//! commit only with the consumer group generation that owns the partitions (KIP-447). A failed
//! transaction skips every commit after it and rewinds every task to its last written commit
//! and input position. A fencing error stops the process if the consumer group has a member of
//! another process with the same instance id; otherwise it replaces the producer and rewinds
//! once (after a broker failure the transaction coordinator can bump the epoch of a
//! transaction that timed out, and librdkafka reports that as fencing too), and a second one
//! within [`FENCE_WINDOW`] stops the process. A transaction that failed because an output
//! can never be delivered (its topic deleted, writes refused) is retried the same way, but
//! once such failures have gone on for [`UNDELIVERABLE_FOR`] with nothing committed,
//! the process stops. `/readyz` is not ready from a failed transaction to the next commit
//! (or until the instance is idle with nothing left to commit).
//! A rewind reads the changelog only once the failed transaction has ended: a transaction
//! whose commit failed on the client may still commit on the brokers (a broker died with the
//! reply), and a restore that stopped before it would leave the task behind its changelog.
//!
//! Only then is the staged state written to RocksDB, with the changelog offset it reaches (the
//! local checkpoint). So local state is always a committed prefix of the changelog: a task
//! opening a partition replays the changelog from its checkpoint (or from the start, without
//! usable local state) before it consumes, and resumes from the input offsets of the state it
//! restored. Records below a task's offsets are skipped on redelivery. A rebalance commits
//! before it revokes partitions, and restores newly assigned partitions before they are
//! consumed.
//!
//! This module holds what the consumer thread and the rebalance callback share ([`Core`], its
//! tasks) and the consumer loop ([`run`]); `records` has the record path, `commits` the
//! commits, and `rebalance` the partitions coming and going and the consumer context.

mod commits;
mod rebalance;
mod records;

use commits::{commit_is_due, PendingCommit};
pub use commits::{FENCE_WINDOW, KEYS_PER_RECORD, PACE_SHARE, UNDELIVERABLE_FOR};
use rebalance::Ctx;

use crate::codec::Decoder;
use crate::config::{Guarantee, RuntimeSettings, Settings};
use crate::engine::{Counters, Engine, EngineConfig, Output, StoreError};
use crate::kafka::changelog::Restorer;
use crate::kafka::committer::StateCommitter;
use crate::kafka::limits::{OutputLimits, RecordRoom};
use crate::kafka::output::{Outputs, TxnError};
use crate::kafka::sink::{output_topics, Sink, HAND_OVER_AFTER};
use crate::kafka::standby::Standbys;
use crate::kafka::{self, KafkaError};
use crate::metrics::{Metrics, TopicMetrics};
use crate::store::{RocksStore, StateMemory};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("state of partition {partition}: {source}")]
    Store { partition: i32, source: StoreError },
    #[error("the pipeline state lock was poisoned by a panic")]
    Poisoned,
    #[error("in a rebalance callback: {0}")]
    Rebalance(String),
    #[error(
        "fenced: another running instance has this transactional id ({0}); instance ids \
         (kafka.instance_id) must be unique"
    )]
    Fenced(String),
    #[error("the transactional producer failed: {0}")]
    Transaction(String),
    #[error(
        "outputs cannot be delivered: {error} (the first such failure was {} s ago, and no state transaction has committed since; \
         check that the output topics exist and that this instance may write to them)",
        .for_.as_secs()
    )]
    Undeliverable { error: String, for_: Duration },
}

/// How many staged commits may wait for their transaction (at-least-once, also for their
/// outputs' acknowledgements) while the pipeline goes on consuming; one more stalls
/// consumption until the oldest is done.
pub const MAX_PENDING_COMMITS: usize = 3;

/// Exactly-once buffers an interval's outputs in memory until its transaction: while catching
/// up, a commit comes early once they reach this size, which bounds that memory to
/// [`MAX_PENDING_COMMITS`] + 1 batches of about this size.
pub const CATCH_UP_BATCH_BYTES: usize = 32 << 20;

/// How often time moves on in every task between two commits, when the commit interval is
/// longer (at-least-once's default is 1 s): what falls due is concluded in small steps
/// instead of one long stop of the consumer thread per commit interval.
pub const TIME_STEP: Duration = Duration::from_millis(100);

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Wall-clock milliseconds derived from a monotonic clock reading, anchored to the system
/// clock again at every time step: the per-record path reads one clock, not two (clock reads
/// were 8 % of the consumer thread's samples in a profile of the latency phase, three per
/// record). Between anchors it is off by at most the system clock's adjustments since the
/// last anchor (usually one time step; longer when a rebalance holds the loop in `poll`).
struct WallClock {
    at: Instant,
    wall: i64,
}

impl WallClock {
    /// Anchored at `at`, a reading taken just now.
    fn anchored_at(at: Instant) -> Self {
        WallClock {
            at,
            wall: wall_ms(),
        }
    }

    fn ms(&self, now: Instant) -> i64 {
        let since = now.saturating_duration_since(self.at).as_millis();
        self.wall
            .saturating_add(i64::try_from(since).unwrap_or(i64::MAX))
    }
}

/// One task: the engine of one partition number (of every co-partitioned input topic).
struct Task {
    partition: i32,
    engine: Engine<RocksStore>,
    /// Next offset to process, per input topic (by index); `None` until known.
    next: Vec<Option<i64>>,
    /// Reached the end of the partition and nothing arrived since.
    caught_up: bool,
    /// Reached the end of the partition at least once since the task opened (logged once).
    reached_end: bool,
    /// Reached the end of the partition since the last commit.
    ended_since_commit: bool,
    reported: Counters,
}

/// Everything the consumer loop and the rebalance callback share.
struct Core {
    rt: RuntimeSettings,
    engine: EngineConfig,
    decoder: Decoder,
    sink: Sink,
    restorer: Restorer,
    /// The memory budget of every task's store (and standby copy).
    memory: StateMemory,
    metrics: Arc<Metrics>,
    health: crate::http::Health,
    topic_metrics: Vec<TopicMetrics>,
    tasks: BTreeMap<i32, Task>,
    /// Staged commits, oldest first (see the module docs).
    pending: VecDeque<PendingCommit>,
    /// The thread that commits the transactions.
    state: StateCommitter,
    /// The first failed transaction, until the commits after it are all skipped.
    commit_error: Option<TxnError>,
    /// When a state transaction first failed with an undeliverable output
    /// (`TxnError::Undeliverable`) since the failing state began (see [`UNDELIVERABLE_FOR`]).
    undeliverable_since: Option<Instant>,
    /// When the last state transaction failed, if none has committed since (`/readyz` says
    /// so).
    failing: Option<Instant>,
    /// The largest dead letter that goes out (see [`kafka::limits::Fitted`]).
    dead_letter_limit: usize,
    /// Room for an input record's outputs in their topics.
    room: RecordRoom,
    out: Vec<Output>,
    buf: Vec<u8>,
    held: Vec<u8>,
    /// This process's consumer client id, when the service chose it (see
    /// [`kafka::member_client_id`]).
    client_id: Option<String>,
    /// Standby copies of other partitions' state, if configured (see [`kafka::standby`]).
    standbys: Option<Standbys>,
    /// The input topics' partition count.
    partitions: i32,
    /// With several input topics: the partition numbers that had records left to fetch in
    /// some topic at the consumer's last statistics report (see
    /// [`kafka::watch::lagging_partitions`]); such a task is not caught up.
    lagging: HashSet<i32>,
    /// When the producer was last replaced after a fencing error.
    last_fence: Option<Instant>,
    /// Whether anything was consumed or concluded since the last commit (see [`Self::tick`]).
    dirty: bool,
    /// Whether a partition read a backlog at the last commit (or a task opened since): see
    /// [`Self::drained`].
    backlog_at_commit: bool,
    /// Shutting down (see [`Self::closing`]): when the final commit must be done
    /// (`service.shutdown_timeout`).
    deadline: Option<Instant>,
    /// The final commit was given up at the deadline; its transaction may still be running
    /// on the state committer's thread, which is then left behind, not waited for.
    abandoned: bool,
}

/// [`Core::catching_up`] of `tasks`.
fn reading_backlog(tasks: &BTreeMap<i32, Task>) -> bool {
    tasks
        .values()
        .any(|t| !t.caught_up && !t.ended_since_commit)
}

impl Core {
    fn state_dir(&self, partition: i32) -> PathBuf {
        self.rt
            .state_dir
            .join(&self.rt.group)
            .join(format!("partition-{partition}"))
    }

    /// Shutting down after the final commit: the revocation when the consumer closes only
    /// releases the tasks (there is nothing new to commit, and no transaction may be left
    /// open behind us).
    fn closing(&self) -> bool {
        self.deadline.is_some()
    }

    /// Whether some partition is reading a backlog: it has had records since it last reached
    /// its end, and has not reached it since the last commit.
    fn catching_up(&self) -> bool {
        reading_backlog(&self.tasks)
    }

    /// A backlog has just been read to its end: a partition read a backlog at the last commit
    /// (or a task opened since, as at the start), and now every partition has reached its
    /// end. Then the next commit comes at once rather than up to a commit interval
    /// later (1 s at-least-once): the committed offsets, which lag monitors read and a restart
    /// resumes from, reach the end of a replay as soon as it is done. In a live stream every
    /// partition reaches its end between two commits, so this does not add commits there.
    fn drained(&self) -> bool {
        self.backlog_at_commit && !self.catching_up()
    }

    fn exactly_once(&self) -> bool {
        self.rt.guarantee == Guarantee::ExactlyOnce
    }
}

/// Runs the pipeline until `shutdown` is set, then finishes the batch, commits and returns.
pub fn run(
    settings: Settings,
    metrics: Arc<Metrics>,
    health: crate::http::Health,
    shutdown: Arc<AtomicBool>,
) -> Result<(), PipelineError> {
    let rt = settings.runtime.clone();
    let core = Arc::new(Mutex::new(None));
    let failure = Arc::new(Mutex::new(None));
    let errors = kafka::ClientErrors::default();
    let ctx = Ctx {
        core: core.clone(),
        metrics: metrics.clone(),
        failure: failure.clone(),
        watch: Mutex::default(),
        brokers: Default::default(),
        errors: errors.clone(),
    };
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()) << 32;
    let client_id = kafka::member_client_id(&rt, nonce);
    let mut consumer_config = kafka::consumer_config(&rt);
    if let Some(id) = &client_id {
        consumer_config.set("client.id", id);
    }
    let consumer: BaseConsumer<Ctx> = consumer_config
        .create_with_context(ctx)
        .map_err(|e| KafkaError::client("consumer", e))?;
    let found = kafka::check_topics(&consumer, &rt, Duration::from_secs(15), &errors)?;
    let fitted = kafka::with_admin(&rt, |admin, runtime| {
        let created = kafka::changelog::ensure_topic(
            admin,
            runtime,
            &rt,
            found.changelog_partitions,
            found.partitions,
        )?;
        // One request for every topic start-up needs to know about.
        let topics = OutputLimits::topics(&rt);
        let described = kafka::describe_topics(
            admin,
            runtime,
            &topics,
            &["max.message.bytes", "cleanup.policy"],
        );
        if !created {
            let changelog = described.iter().find(|(t, _)| *t == rt.changelog_topic);
            if let Some((t, d)) = changelog {
                kafka::changelog::check_policy(t, d)?;
            }
        }
        OutputLimits::from_described(&described).fit(
            &rt,
            &settings.decode,
            settings.engine.annotate == crate::engine::AnnotateMode::OnClose,
        )
    })?;
    tracing::info!(
        brokers = %rt.brokers,
        group = %rt.group,
        inputs = ?rt.input_topics,
        partitions = found.partitions,
        changelog = %rt.changelog_topic,
        guarantee = ?rt.guarantee,
        "topics checked"
    );
    let sink = match rt.guarantee {
        Guarantee::AtLeastOnce => Sink::direct(
            &rt,
            metrics.clone(),
            Outputs::new(&fitted.producer(kafka::idempotent_producer_config(&rt)))?,
        )?,
        Guarantee::ExactlyOnce => Sink::buffered(metrics.clone()),
    };
    let state = StateCommitter::start(
        fitted.producer(kafka::transactional_producer_config(&rt)),
        rt.changelog_topic.clone(),
        output_topics(&rt),
    )?;
    tracing::info!(transactional_id = %kafka::transactional_id(&rt), "transactions initialised");
    let restorer = Restorer::new(&rt)?;
    let memory = StateMemory::new(rt.memory_budget);
    metrics.set_memory_budget(rt.memory_budget as u64);
    let standbys = if rt.standby_replicas > 0 {
        Some(Standbys::start(&rt, metrics.clone(), memory.clone())?)
    } else {
        None
    };
    let decoder = Decoder::new(settings.decode);
    let topic_metrics = rt.input_topics.iter().map(|t| metrics.topic(t)).collect();
    *core.lock().map_err(|_| PipelineError::Poisoned)? = Some(Core {
        rt: rt.clone(),
        engine: settings.engine,
        decoder,
        sink,
        restorer,
        memory,
        metrics: metrics.clone(),
        health: health.clone(),
        topic_metrics,
        tasks: BTreeMap::new(),
        pending: VecDeque::new(),
        state,
        commit_error: None,
        undeliverable_since: None,
        failing: None,
        dead_letter_limit: fitted.dead_letter_limit,
        room: fitted.room,
        out: Vec::new(),
        buf: Vec::new(),
        held: Vec::new(),
        client_id,
        standbys,
        partitions: found.partitions,
        lagging: HashSet::new(),
        last_fence: None,
        dirty: false,
        backlog_at_commit: true,
        deadline: None,
        abandoned: false,
    });
    let topics: Vec<&str> = rt.input_topics.iter().map(|s| s.as_str()).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| KafkaError::client("subscription", e))?;
    health.set_ready(true, "");
    let with_core =
        |f: &mut dyn FnMut(&mut Core) -> Result<(), PipelineError>| -> Result<(), PipelineError> {
            let mut g = core.lock().map_err(|_| PipelineError::Poisoned)?;
            match g.as_mut() {
                Some(c) => f(c),
                None => Err(PipelineError::Poisoned),
            }
        };
    let mut last_tick = Instant::now();
    let mut last_step = last_tick;
    let mut clock = WallClock::anchored_at(last_tick);
    let mut backlog = (true, 0);
    let mut drained = false;
    let mut collecting = false;
    let mut serve = || -> Result<(), PipelineError> {
        while !shutdown.load(Ordering::Relaxed) {
            // At-least-once outputs collected for the output thread wait for at most
            // HAND_OVER_AFTER, also when no record comes.
            let polled = consumer.poll(if collecting {
                HAND_OVER_AFTER
            } else {
                Duration::from_millis(20)
            });
            let now = Instant::now();
            match polled {
                Some(Ok(m)) => with_core(&mut |c| {
                    c.handle(&m, clock.ms(now))?;
                    c.sink.hand_over_due(now)?;
                    collecting = c.sink.collecting();
                    c.collect_staged(KEYS_PER_RECORD)?;
                    c.settle_pending(&consumer)
                })?,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => with_core(&mut |c| {
                    c.caught_up(p);
                    drained = c.drained();
                    Ok(())
                })?,
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error (retrying)"),
                None => with_core(&mut |c| {
                    c.sink.hand_over()?;
                    collecting = false;
                    c.collect_staged(usize::MAX)?;
                    c.settle_pending(&consumer)
                })?,
            }
            if let Some(f) = failure.lock().ok().and_then(|f| f.clone()) {
                return Err(PipelineError::Rebalance(f));
            }
            // Whether a partition reads a backlog, and the outputs buffered, as of the last
            // step (at most a TIME_STEP old: not worth a lock per record).
            let (catching_up, buffered) = backlog;
            let since = now.saturating_duration_since(last_tick);
            let intervals = (rt.commit_interval, rt.catch_up_commit_interval);
            let commit_due = commit_is_due(since, intervals, catching_up, buffered, drained);
            if commit_due || now.saturating_duration_since(last_step) >= TIME_STEP {
                if commit_due {
                    consumer
                        .context()
                        .brokers
                        .rebootstrap(consumer.client(), &rt.brokers);
                }
                with_core(&mut |c| {
                    let started = Instant::now();
                    let r = if commit_due {
                        c.tick(&consumer)
                    } else {
                        c.advance()
                    };
                    c.metrics.observe_tick(started.elapsed());
                    backlog = (c.catching_up(), c.sink.buffered_bytes());
                    drained = c.drained();
                    collecting = c.sink.collecting();
                    r
                })?;
                last_step = Instant::now();
                clock = WallClock::anchored_at(last_step);
                if commit_due {
                    last_tick = last_step;
                }
            }
        }
        tracing::info!("shutting down: finishing the batch and committing");
        health.set_ready(false, "shutting down");
        with_core(&mut |c| {
            c.deadline = Some(Instant::now() + rt.shutdown_timeout);
            c.tick(&consumer)
        })
    };
    let result = serve();
    if let Ok(mut g) = core.lock() {
        if let Some(c) = g
            .as_mut()
            .filter(|c| c.abandoned || (result.is_err() && c.state.outstanding() > 0))
        {
            // Its thread may be stuck in a transaction until the brokers answer.
            c.state.detach();
        }
    }
    if result.is_err() {
        // Nothing more may be committed: closing the consumer must not run a commit in the
        // revocation callback.
        if let Ok(mut g) = core.lock() {
            g.take();
        }
    }
    drop(consumer);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_come_less_often_while_a_partition_reads_a_backlog() {
        let ms = Duration::from_millis;
        let eos = (ms(100), ms(1_000));
        let small = 1 << 20;
        // (since the last commit, catching up, buffered bytes, due)
        let table = [
            (ms(99), false, small, false),
            (ms(100), false, small, true),
            (ms(100), true, small, false),
            (ms(999), true, small, false),
            (ms(1_000), true, small, true),
            (ms(100), true, CATCH_UP_BATCH_BYTES, true),
            (ms(99), true, CATCH_UP_BATCH_BYTES, false),
        ];
        for (since, catching_up, buffered, due) in table {
            assert_eq!(
                commit_is_due(since, eos, catching_up, buffered, false),
                due,
                "{since:?} catching up {catching_up} buffered {buffered}"
            );
        }
        // Equal intervals (at-least-once by default): the backlog changes nothing.
        let alo = (ms(1_000), ms(1_000));
        assert!(!commit_is_due(ms(999), alo, false, 0, false));
        assert!(commit_is_due(ms(1_000), alo, true, 0, false));
        // A backlog just drained: at once, whatever the interval.
        assert!(commit_is_due(ms(0), alo, false, 0, true));
        assert!(commit_is_due(ms(1), eos, false, small, true));
    }

    #[test]
    fn wall_clock_follows_the_monotonic_clock_from_its_anchor() {
        let c = WallClock {
            at: Instant::now(),
            wall: 1_000,
        };
        assert_eq!(c.ms(c.at), 1_000);
        assert_eq!(c.ms(c.at + Duration::from_millis(250)), 1_250);
        // A reading from before the anchor is the anchor's time.
        assert_eq!(
            c.ms(c.at.checked_sub(Duration::from_millis(5)).unwrap_or(c.at)),
            1_000
        );
        let a = WallClock::anchored_at(Instant::now());
        assert!((a.ms(Instant::now()) - wall_ms()).abs() < 1_000);
    }
}
