//! The streaming pipeline: a Kafka consumer group feeding one engine task per input partition
//! number, each with its own RocksDB state backed by a changelog partition, and every output
//! produced to Kafka.
//!
//! Every `commit_interval` the pipeline moves time on in every task and stages a commit: each
//! task's state changes (the changelog records) and input offsets. Staging only marks the key
//! states the commit owes; the stores encode them [`KEYS_PER_RECORD`] after each record
//! consumed (see [`Staged`]), so consumption does not stop for them. Between commits it also
//! moves time on every [`TIME_STEP`], so that sessions are concluded in small steps. While a
//! partition reads a backlog (it has not reached its end since the last commit) commits come
//! every `catch_up_commit_interval` instead (1 s by default), or sooner once the interval's
//! buffered outputs reach [`CATCH_UP_BATCH_BYTES`]; once every partition has reached its
//! end, the backlog is committed at once (see [`commit_is_due`], [`Core::drained`]). Staged
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
//! within [`FENCE_WINDOW`] stops the process.
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

use crate::codec::records::{annotate, record_json, stats_json};
use crate::codec::Decoder;
use crate::config::{Guarantee, RuntimeSettings, Settings};
use crate::engine::{
    AnnotateMode, Counters, Disposition, Engine, EngineConfig, Output, SourceOffset, StateStore,
    StoreError,
};
use crate::kafka::changelog::Restorer;
use crate::kafka::committer::{Job, JobOutcome, StateCommitter, TaskCommit};
use crate::kafka::output::{Outputs, TxnError};
use crate::kafka::sink::{output_topics, Batch, Sink, HAND_OVER_AFTER};
use crate::kafka::standby::{standby_set, Standbys};
use crate::kafka::{self, KafkaError};
use crate::metrics::{DeadLetterReason, Metrics, Outcome, OutputKind, RebalanceKind, TopicMetrics};
use crate::store::{Change, RocksOptions, RocksStore, StateMemory};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
}

/// How many staged commits may wait for their transaction (at-least-once, also for their
/// outputs' acknowledgements) while the pipeline goes on consuming; one more stalls
/// consumption until the oldest is done.
pub const MAX_PENDING_COMMITS: usize = 3;

/// Exactly-once buffers an interval's outputs in memory until its transaction: while catching
/// up, a commit comes early once they reach this size, which bounds that memory to
/// [`MAX_PENDING_COMMITS`] + 1 batches of about this size.
pub const CATCH_UP_BATCH_BYTES: usize = 32 << 20;

/// Whether the commit interval that began `since` ago ends now: after `interval` (the
/// settings' two: `commit_interval`, `catch_up_commit_interval`) when no partition reads a
/// backlog, otherwise after the catch-up one, or once `buffered` output bytes reach
/// [`CATCH_UP_BATCH_BYTES`]; or at once when a backlog has just `drained`: the last commit
/// was made while a partition read a backlog, and now every partition has reached its end
/// (see [`Core::drained`]).
fn commit_is_due(
    since: Duration,
    (interval, catch_up): (Duration, Duration),
    catching_up: bool,
    buffered: usize,
    drained: bool,
) -> bool {
    drained
        || since >= interval
            && (!catching_up || since >= catch_up || buffered >= CATCH_UP_BATCH_BYTES)
}

/// A staged commit, in three steps. First its tasks' stores encode the key states it owes, a
/// few per record consumed (see [`RocksStore::collect`] and [`KEYS_PER_RECORD`]); then its
/// changes are taken. At-least-once, it also waits for its outputs: only once
/// every output up to it is acknowledged is it handed to the [`StateCommitter`], so a
/// committed changelog transaction (which another instance may restore and resume from) never
/// stands for outputs that were lost in a crash (exactly-once, it is handed over at once, with
/// its outputs). Then it waits for that transaction; once it has committed, the commit's
/// state is written locally with the changelog checkpoint.
struct PendingCommit {
    /// At-least-once: the output epoch it ended (see [`Outputs::seal`]).
    epoch: u64,
    /// Its changelog records.
    changes: Staged,
    /// Exactly-once: the outputs of its interval (handed over with the changes).
    outputs: Batch,
    /// The input offsets it reaches.
    offsets: TopicPartitionList,
    /// The tasks that staged a batch in it.
    partitions: Vec<i32>,
    /// A partition read a backlog in its interval (at its start or at its end): its changelog
    /// records go at once, not paced (see [`Core::hand_over`]).
    read_backlog: bool,
    started: Instant,
}

impl PendingCommit {
    /// Leaves `parts` out of a commit not handed over yet: nothing of theirs is sent, written
    /// or committed.
    fn forget(&mut self, parts: &[i32]) {
        self.partitions.retain(|p| !parts.contains(p));
        if let Staged::Taken(changes) = &mut self.changes {
            changes.retain(|(p, _)| !parts.contains(p));
        }
        let mut kept = TopicPartitionList::new();
        for e in self.offsets.elements() {
            if !parts.contains(&e.partition()) {
                let _ = kept.add_partition_offset(e.topic(), e.partition(), e.offset());
            }
        }
        self.offsets = kept;
    }
}

/// Where a staged commit's changelog records are.
enum Staged {
    /// Still in the stores of its tasks (its [`PendingCommit::partitions`]), which are
    /// collecting them; only the newest commit can be.
    Collecting,
    /// Per task, taken from the stores.
    Taken(Vec<(i32, Vec<Change>)>),
    /// Handed to the state committer: the job holds them, with a writer of each task's
    /// database.
    HandedOver,
}

/// How many key states the stores encode for the commit being collected after each record
/// consumed (all of them once no record is waiting). The consumer thread has time to spare
/// at a steady rate: at 215,000 events/s it is busy about a third of the time, and a key
/// state takes about 0.8 µs to encode. All at once, a commit stopped the consumer for 12-47 ms
/// in the end-to-end benchmark's latency phase (10,000 users), and the records behind it
/// waited that long.
pub const KEYS_PER_RECORD: usize = 2;

/// At-least-once, at a steady rate, a commit's changelog records are spread over this share
/// of the commit interval (see [`Job::pace`]); exactly-once they would hold the interval's
/// outputs back, and while catching up or closing they go at once.
pub const PACE_SHARE: u32 = 4;

/// How many times a restored task whose state is behind the group's committed offsets reads
/// the changelog tail again (see [`Core::check_against_group`]).
const TAIL_ATTEMPTS: u32 = 10;

/// How long a newly assigned partition waits at least for the group's committed offsets (see
/// [`Core::check_against_group`]; twice the transaction timeout if that is longer) before the
/// instance gives up.
const GROUP_OFFSETS_WAIT: Duration = Duration::from_secs(60);

/// How often time moves on in every task between two commits, when the commit interval is
/// longer (at-least-once's default is 1 s): what falls due is concluded in small steps
/// instead of one long stop of the consumer thread per commit interval.
pub const TIME_STEP: Duration = Duration::from_millis(100);

/// A second fencing error within this time of the first stops the instance.
pub const FENCE_WINDOW: Duration = Duration::from_secs(60);

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

fn header(h: OwnedHeaders, key: &str, value: &str) -> OwnedHeaders {
    h.insert(Header {
        key,
        value: Some(value.as_bytes()),
    })
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

    /// Opens a task: local state checked against the changelog (deleted if it cannot be
    /// trusted), the changelog replayed from the local checkpoint, the engine opened on the
    /// result.
    fn open_task(&mut self, partition: i32) -> Result<(), PipelineError> {
        let store_err = |source| PipelineError::Store { partition, source };
        // A standby copy, or a state commit in flight, may still hold the database open.
        if let Some(s) = &self.standbys {
            s.release(partition);
        }
        while self.outstanding() > 0 {
            if let Some(o) = self.outcome(Duration::from_millis(100))? {
                self.settled(o)?;
            }
        }
        let dir = self.state_dir(partition);
        let (low, high) = self.restorer.bounds(partition)?;
        let opts = RocksOptions::within(&self.memory);
        let mut store = match RocksStore::open(&dir, opts.clone()) {
            Ok(s) => s,
            // Open elsewhere (a bug if in this process): never delete a database in use.
            Err(e) if e.to_string().contains("LOCK") => return Err(store_err(e)),
            Err(e) => {
                tracing::warn!(partition, error = %e, "local state unreadable: rebuilding it from the changelog");
                RocksStore::destroy(&dir).map_err(store_err)?;
                RocksStore::open(&dir, opts.clone()).map_err(store_err)?
            }
        };
        let checkpoint = store.changelog_checkpoint().map_err(store_err)?;
        let untrusted = kafka::changelog::distrust(&mut store, low, high).map_err(store_err)?;
        if let Some(why) = untrusted {
            tracing::warn!(
                partition,
                why,
                ?checkpoint,
                low,
                high,
                "local state not trusted: rebuilding it from the changelog"
            );
            drop(store);
            RocksStore::destroy(&dir).map_err(store_err)?;
            store = RocksStore::open(&dir, opts.clone()).map_err(store_err)?;
        }
        let from = if untrusted.is_some() {
            low
        } else {
            checkpoint.unwrap_or(low)
        };
        if high > from {
            let started = Instant::now();
            tracing::info!(
                partition,
                from,
                to = high,
                "restoring state from the changelog"
            );
            let metrics = self.metrics.clone();
            let mut reported = 0;
            let r = self
                .restorer
                .restore(partition, from, &mut store, &mut |applied, _| {
                    metrics.restore_records(partition, applied - reported);
                    reported = applied;
                })?;
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                partition,
                applied = r.applied,
                checkpoint = r.checkpoint,
                seconds = secs,
                records_per_second = (r.applied as f64 / secs.max(1e-9)) as u64,
                "state restored"
            );
        }
        store.enable_changelog();
        let mut engine = Engine::open(self.engine.clone(), store).map_err(store_err)?;
        if self.rt.input_topics.len() > 1 {
            engine.expect_sources(self.rt.input_topics.len() as u32, wall_ms());
        }
        let stored = engine.store_mut().committed_offsets().map_err(store_err)?;
        let next = self
            .rt
            .input_topics
            .iter()
            .map(|t| {
                stored
                    .iter()
                    .find(|o| &o.topic == t && o.partition == partition)
                    .map(|o| o.next_offset)
            })
            .collect();
        tracing::info!(partition, dir = %dir.display(), offsets = ?stored, "task opened");
        self.tasks.insert(
            partition,
            Task {
                partition,
                engine,
                next,
                caught_up: false,
                reached_end: false,
                ended_since_commit: false,
                reported: Counters::default(),
            },
        );
        // Like a start, an assignment may come with a backlog.
        self.backlog_at_commit = true;
        Ok(())
    }

    /// Handles one input record; `now` is the wall-clock time in ms.
    fn handle(&mut self, m: &BorrowedMessage<'_>, now: i64) -> Result<(), PipelineError> {
        let Some(ti) = self.rt.input_topics.iter().position(|t| t == m.topic()) else {
            return Ok(());
        };
        let partition = m.partition();
        let offset = m.offset();
        // Tasks open on assignment, before their partitions are fetched: a record without a
        // task is a leftover of a revoked partition, which now belongs to another instance.
        let Some(task) = self.tasks.get_mut(&partition) else {
            tracing::debug!(
                partition,
                offset,
                "record of a partition not assigned: skipped"
            );
            return Ok(());
        };
        if task.next[ti].is_some_and(|n| offset < n) {
            return Ok(()); // already reflected in the committed state
        }
        task.next[ti] = Some(offset + 1);
        task.caught_up = false;
        self.dirty = true;
        let payload = m.payload().unwrap_or(&[]);
        let key = m.key();
        let record_ts = m.timestamp().to_millis();
        let d = match self.decoder.decode(payload, key, record_ts) {
            Ok(d) => d,
            Err(e) => {
                self.topic_metrics[ti].event(Outcome::DeadLetter(DeadLetterReason::from(&e)));
                return self.dead_letter(m, e.reason(), &e.to_string());
            }
        };
        let on_close = self.engine.annotate == AnnotateMode::OnClose;
        if on_close {
            // Held payload: user id length, user id, original value.
            self.held.clear();
            self.held
                .extend_from_slice(&(d.user.len() as u32).to_le_bytes());
            self.held.extend_from_slice(d.user.as_bytes());
            self.held.extend_from_slice(payload);
        }
        let ev = d.event(ti as u32, if on_close { &self.held } else { &[] });
        self.out.clear();
        let disposition = task
            .engine
            .process(&ev, now, &mut self.out)
            .map_err(|source| PipelineError::Store { partition, source })?;
        let watermark = task.engine.watermark();
        match disposition {
            Disposition::Annotated(ann) => {
                self.topic_metrics[ti].event(if ann.is_some() {
                    Outcome::Accepted
                } else {
                    Outcome::Excluded
                });
                self.buf.clear();
                annotate(
                    payload,
                    &self.decoder.settings().annotation_field,
                    ann.as_ref(),
                    &mut self.buf,
                );
                self.sink.send(
                    OutputKind::Annotated,
                    Some(d.user.as_bytes()),
                    &self.buf,
                    Some(d.time),
                    None,
                )?;
                if let Some(ts) = record_ts {
                    self.metrics
                        .observe_processing_latency(
                            Duration::from_millis((now - ts).max(0) as u64),
                        );
                }
            }
            Disposition::Held => self.topic_metrics[ti].event(Outcome::Accepted),
            Disposition::Late(reason) => {
                self.topic_metrics[ti].event(Outcome::Late(reason));
                let h = header(OwnedHeaders::new(), "sessionizer.reason", reason.as_str());
                let h = header(h, "sessionizer.watermark", &watermark.to_string());
                let h = source_headers(h, m);
                self.sink
                    .send(OutputKind::Late, key, payload, record_ts, Some(h))?;
            }
            Disposition::FutureTime => {
                self.topic_metrics[ti].event(Outcome::DeadLetter(DeadLetterReason::FUTURE_TIME));
                let msg = format!("event time {} is beyond the allowed clock skew", d.time);
                self.dead_letter(m, "future_time", &msg)?;
            }
        }
        let out = std::mem::take(&mut self.out);
        let r = self.emit(&out);
        self.out = out;
        r
    }

    fn dead_letter(
        &mut self,
        m: &BorrowedMessage<'_>,
        reason: &str,
        error: &str,
    ) -> Result<(), PipelineError> {
        let h = header(OwnedHeaders::new(), "sessionizer.reason", reason);
        let h = header(h, "sessionizer.error", error);
        let h = source_headers(h, m);
        self.sink.send(
            OutputKind::DeadLetters,
            m.key(),
            m.payload().unwrap_or(&[]),
            m.timestamp().to_millis(),
            Some(h),
        )?;
        Ok(())
    }

    fn emit(&mut self, out: &[Output]) -> Result<(), PipelineError> {
        for o in out {
            match o {
                Output::Released {
                    payload,
                    time,
                    annotation,
                } => {
                    let n = payload
                        .get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .unwrap_or(0);
                    let user = payload.get(4..4 + n).unwrap_or(&[]);
                    let raw = payload.get(4 + n..).unwrap_or(&[]);
                    self.buf.clear();
                    annotate(
                        raw,
                        &self.decoder.settings().annotation_field,
                        Some(annotation),
                        &mut self.buf,
                    );
                    self.sink.send(
                        OutputKind::Annotated,
                        Some(user),
                        &self.buf,
                        Some(*time),
                        None,
                    )?;
                }
                Output::Session(s) => {
                    if let Some(j) = record_json(&self.decoder, o) {
                        self.sink.send(
                            OutputKind::Sessions,
                            Some(s.user.as_bytes()),
                            &j,
                            Some(s.end),
                            None,
                        )?;
                    }
                    let j = stats_json(&s.user, &s.stats);
                    self.sink.send(
                        OutputKind::Stats,
                        Some(s.user.as_bytes()),
                        &j,
                        Some(s.end),
                        None,
                    )?;
                    self.metrics.session_concluded(s);
                }
                Output::Merge { user, at, .. } | Output::Split { user, at, .. } => {
                    if let Some(j) = record_json(&self.decoder, o) {
                        self.sink.send(
                            OutputKind::Sessions,
                            Some(user.as_bytes()),
                            &j,
                            Some(*at),
                            None,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    fn caught_up(&mut self, partition: i32) {
        if let Some(t) = self.tasks.get_mut(&partition) {
            t.caught_up = true;
            t.ended_since_commit = true;
            if !std::mem::replace(&mut t.reached_end, true) {
                tracing::info!(partition, next = ?t.next, "caught up: reached the end of the partition");
            }
        }
    }

    /// Moves time on in every task (concluding what is due) and sends what that outputs.
    fn advance(&mut self) -> Result<(), PipelineError> {
        let now = wall_ms();
        let parts: Vec<i32> = self.tasks.keys().copied().collect();
        for p in parts {
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            let lagging = self.lagging.contains(&p);
            if let Some(t) = self.tasks.get_mut(&p) {
                t.engine
                    .advance(now, t.caught_up && !lagging, &mut out)
                    .map_err(|source| PipelineError::Store {
                        partition: p,
                        source,
                    })?;
            }
            self.dirty |= !out.is_empty();
            let r = self.emit(&out);
            self.out = out;
            r?;
        }
        Ok(())
    }

    /// Moves time on in every task, then commits everything (see the module docs).
    fn tick(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), PipelineError> {
        self.advance()?;
        let now = wall_ms();
        let drain = self.closing();
        if !std::mem::take(&mut self.dirty) {
            // Nothing consumed, nothing concluded: no transaction (an idle instance would
            // otherwise commit every interval, and grow the changelog by a record and a
            // transaction marker each time, only to move a wall-clock watermark on).
            self.refresh_watermarks(now);
            self.backlog_at_commit = self.catching_up();
            return self.settle_commits(consumer, drain);
        }
        self.commit(consumer, drain)
    }

    /// Sets every task's watermark gauges (committed or not).
    fn refresh_watermarks(&self, now: i64) {
        for t in self.tasks.values() {
            for topic in &self.rt.input_topics {
                self.metrics
                    .set_watermark(topic, t.partition, t.engine.watermark(), now);
            }
        }
    }

    /// Commits every task (see the module docs): stages the interval's commit and moves the
    /// staged commits on. `drain` waits until every staged commit is written.
    fn commit(&mut self, consumer: &BaseConsumer<Ctx>, drain: bool) -> Result<(), PipelineError> {
        let started = Instant::now();
        // A store collects one staged commit at a time.
        self.take_staged()?;
        let before = self.backlog_at_commit;
        self.backlog_at_commit = self.catching_up();
        let read_backlog = before || self.backlog_at_commit;
        let mut tpl = TopicPartitionList::new();
        let mut partitions = Vec::with_capacity(self.tasks.len());
        for t in self.tasks.values_mut() {
            t.ended_since_commit = false;
            partitions.push(t.partition);
            let offsets: Vec<SourceOffset> = self
                .rt
                .input_topics
                .iter()
                .zip(&t.next)
                .filter_map(|(topic, n)| {
                    n.map(|next_offset| SourceOffset {
                        topic: topic.clone(),
                        partition: t.partition,
                        next_offset,
                    })
                })
                .collect();
            t.engine
                .commit(&offsets)
                .map_err(|source| PipelineError::Store {
                    partition: t.partition,
                    source,
                })?;
            for o in &offsets {
                let _ =
                    tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset));
            }
        }
        if let Some(o) = self.sink.outputs() {
            o.keep_brokers();
        }
        self.pending.push_back(PendingCommit {
            epoch: self.sink.seal()?,
            changes: Staged::Collecting,
            outputs: self.sink.take_batch(),
            offsets: tpl,
            partitions,
            read_backlog,
            started,
        });
        self.settle_commits(consumer, drain)
    }

    /// Has the stores encode up to `keys` key states for the commit being collected, if any
    /// (see [`Staged::Collecting`]); takes its changes once they are all encoded.
    fn collect_staged(&mut self, keys: usize) -> Result<(), PipelineError> {
        let Some(c) = self.pending.back() else {
            return Ok(());
        };
        if !matches!(c.changes, Staged::Collecting) {
            return Ok(());
        }
        // The first task still collecting gets the allowance; those after it wait.
        for p in &c.partitions {
            let Some(t) = self.tasks.get_mut(p) else {
                continue;
            };
            let done =
                t.engine
                    .store_mut()
                    .collect(keys)
                    .map_err(|source| PipelineError::Store {
                        partition: *p,
                        source,
                    })?;
            if !done {
                return Ok(());
            }
        }
        self.take_staged()
    }

    /// Takes the changes of the commit being collected, if any, from its tasks' stores
    /// (encoding what they still owe).
    fn take_staged(&mut self) -> Result<(), PipelineError> {
        let Some(c) = self
            .pending
            .back_mut()
            .filter(|c| matches!(c.changes, Staged::Collecting))
        else {
            return Ok(());
        };
        let mut changes = Vec::with_capacity(c.partitions.len());
        for &partition in &c.partitions {
            let t = self.tasks.get_mut(&partition).ok_or_else(|| {
                PipelineError::Rebalance(format!(
                    "partition {partition} closed while its commit was staged"
                ))
            })?;
            let staged = t
                .engine
                .store_mut()
                .take_changes()
                .map_err(|source| PipelineError::Store { partition, source })?;
            self.metrics
                .changelog_bytes(staged.iter().map(|c| c.bytes() as u64).sum());
            changes.push((partition, staged));
        }
        c.changes = Staged::Taken(changes);
        Ok(())
    }

    /// Moves the staged commits on (see [`PendingCommit`]), in order: hands them to the state
    /// committer (at-least-once, once their outputs are acknowledged), and takes in the
    /// outcomes of those it committed. Waits while more than [`MAX_PENDING_COMMITS`] are
    /// staged, or until none is left with `all`. Fails if an output could not be delivered
    /// (nothing after it may be committed). A failed transaction takes every task back to
    /// its last written commit (see [`Self::commit_failed`]).
    fn settle_commits(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        all: bool,
    ) -> Result<(), PipelineError> {
        if all {
            self.take_staged()?;
        }
        loop {
            if self.commit_error.is_none() {
                self.hand_over(consumer)?;
            }
            while let Some(o) = self.outcome(Duration::ZERO)? {
                self.settled(o)?;
            }
            if self.commit_error.is_some() && self.outstanding() == 0 {
                return self.commit_failed(consumer);
            }
            let wait = if all {
                !self.pending.is_empty()
            } else {
                self.pending.len() > MAX_PENDING_COMMITS
            };
            let waiting_for_outputs = self.commit_error.is_none()
                && self
                    .pending
                    .front()
                    .is_some_and(|c| !matches!(c.changes, Staged::HandedOver));
            let left = self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            if wait && left.is_some_and(|l| l.is_zero()) {
                tracing::warn!(
                    timeout_s = self.rt.shutdown_timeout.as_secs_f64(),
                    staged = self.pending.len(),
                    waiting_for = if waiting_for_outputs {
                        "output acknowledgements"
                    } else {
                        "the state transaction"
                    },
                    "the final commit did not complete within service.shutdown_timeout: stopping \
                     without it (the partitions' next owner redoes the work since the last commit)"
                );
                self.abandoned = true;
                self.pending.clear();
                return Ok(());
            }
            match (self.pending.front(), self.sink.outputs()) {
                (Some(c), Some(o)) if wait && waiting_for_outputs => {
                    o.wait_acknowledged(c.epoch, left)
                }
                (Some(_), _) if wait => {
                    if let Some(o) = self.outcome(Duration::from_millis(1))? {
                        self.settled(o)?;
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Hands the staged commits to the state committer, in order, with the consumer group
    /// generation of now; at-least-once, only those whose outputs are all acknowledged; only
    /// those whose changes are taken (see [`Staged`]).
    fn hand_over(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), PipelineError> {
        for c in self.pending.iter_mut() {
            match c.changes {
                Staged::HandedOver => continue,
                Staged::Collecting => break,
                Staged::Taken(_) => {}
            }
            if let Some(o) = self.sink.outputs() {
                if !o.acknowledged(c.epoch) {
                    break;
                }
                o.check_failures()?;
                o.retire(c.epoch);
            }
            let group = consumer.group_metadata().ok_or_else(|| {
                PipelineError::Rebalance("the consumer has no group metadata".into())
            })?;
            // Each task's part goes with a writer of its database (held only while the job is
            // in flight; `open_task` waits for it). Every task of a staged commit is still
            // open: a rewind drops the staged commits, a lost partition is forgotten first.
            let mut tasks = Vec::new();
            let Staged::Taken(taken) = std::mem::replace(&mut c.changes, Staged::HandedOver) else {
                continue;
            };
            for (partition, changes) in taken {
                let t = self.tasks.get(&partition).ok_or_else(|| {
                    PipelineError::Rebalance(format!(
                        "partition {partition} closed while its commit was staged"
                    ))
                })?;
                tasks.push(TaskCommit {
                    partition,
                    changes,
                    writer: t.engine.store().writer(),
                });
            }
            // Exactly-once, after a backlog (the commit of its end too: nothing waits for a
            // steady rate then), catching up or closing, at once (field by field: `c`
            // borrows the pending commits).
            let pace = if self.rt.guarantee == Guarantee::ExactlyOnce
                || c.read_backlog
                || reading_backlog(&self.tasks)
                || self.deadline.is_some()
            {
                Duration::ZERO
            } else {
                self.rt.commit_interval / PACE_SHARE
            };
            self.state.submit(Job {
                tasks,
                offsets: c.offsets.clone(),
                outputs: std::mem::take(&mut c.outputs),
                group,
                pace,
            })?;
        }
        Ok(())
    }

    fn outcome(&mut self, wait: Duration) -> Result<Option<JobOutcome>, PipelineError> {
        Ok(self.state.outcome(wait)?)
    }

    fn outstanding(&self) -> usize {
        self.state.outstanding()
    }

    /// The outcome of the oldest handed-over commit.
    fn settled(&mut self, outcome: JobOutcome) -> Result<(), PipelineError> {
        let Some(c) = self.pending.pop_front() else {
            return Err(PipelineError::Transaction(
                "a state commit ended that was never handed over".into(),
            ));
        };
        match outcome {
            JobOutcome::Committed { took, .. } => {
                self.metrics.observe_transaction_commit(took);
                self.written(&c.partitions)?;
                self.metrics.observe_commit(c.started.elapsed());
            }
            JobOutcome::NotWritten { partition, error } => {
                return Err(PipelineError::Store {
                    partition,
                    source: error,
                });
            }
            JobOutcome::Failed(e) => {
                self.metrics.transaction_aborted();
                self.commit_error.get_or_insert(e);
            }
            JobOutcome::Skipped => {}
        }
        Ok(())
    }

    /// A state transaction failed (and every commit after it was skipped). Every task goes
    /// back to its last written commit and input position, and consumes again from there:
    /// the outputs since then are produced again, identically (exactly-once: for the first
    /// time, as the failed transactions' outputs never became visible). A fenced producer
    /// stops the instance if another process has its instance id; otherwise it is replaced
    /// (see [`Self::check_fence`]). The rewind reads the changelog only once the failed
    /// transaction is aborted or the replacement producer is registered, which ends it (see
    /// [`StateCommitter::reset`]); a producer that cannot be replaced stops the instance.
    fn commit_failed(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), PipelineError> {
        let Some(e) = self.commit_error.take() else {
            return Ok(());
        };
        self.pending.clear();
        if self.closing() {
            // Nothing is rewound on the way out: the partitions' next owner (maybe this
            // instance, restarted) resumes from the last commit. Fencing by another running
            // instance with this id is still reported.
            if let TxnError::Fenced(e) = e {
                self.check_fence(consumer, e)?;
            } else {
                tracing::warn!(error = ?e, "the final state transaction failed: stopping without it (the partitions' next owner redoes the work since the last commit)");
            }
            return Ok(());
        }
        let new_producer = match e {
            TxnError::Abortable(e) => {
                tracing::warn!(error = %e, "state transaction failed: rewinding to the last commit");
                false
            }
            TxnError::Fatal(e) => {
                tracing::warn!(error = %e, "state producer failed: replacing it and rewinding to the last commit");
                true
            }
            TxnError::Fenced(e) => {
                self.check_fence(consumer, e)?;
                true
            }
        };
        self.state.reset(new_producer)?;
        self.rewind(consumer)
    }

    /// [`Self::settle_commits`] without waiting, if anything is pending.
    fn settle_pending(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), PipelineError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.settle_commits(consumer, false)
    }

    /// The oldest staged commit of each of `partitions` is written to its database: tells
    /// the stores, and updates the tasks' metrics.
    fn written(&mut self, partitions: &[i32]) -> Result<(), PipelineError> {
        let now = wall_ms();
        for p in partitions {
            let Some(t) = self.tasks.get_mut(p) else {
                continue;
            };
            t.engine
                .store_mut()
                .staged_written()
                .map_err(|source| PipelineError::Store {
                    partition: t.partition,
                    source,
                })?;
            // Metrics of the task.
            let c = t.engine.counters().clone();
            self.metrics
                .sessions_opened(c.sessions_opened - t.reported.sessions_opened);
            self.metrics
                .sessions_merged(c.sessions_merged - t.reported.sessions_merged);
            self.metrics
                .sessions_split(c.sessions_split - t.reported.sessions_split);
            t.reported = c;
            self.metrics
                .set_open_sessions(t.partition, t.engine.open_sessions());
            self.metrics
                .set_state_size(t.partition, t.engine.store().approx_size_bytes());
            self.metrics
                .set_state_cache(t.partition, t.engine.store().cached_bytes() as u64);
        }
        self.metrics
            .set_rocksdb_cache(self.memory.rocksdb_usage() as u64);
        self.refresh_watermarks(now);
        Ok(())
    }

    /// Fails (the instance must stop, `why`) if the consumer group has a member of another
    /// process with this instance id: that one replaced this one. Asked after a fencing
    /// error, and when partitions are lost (this instance's group session ended while it
    /// was away: frozen, cut off), since it would otherwise rejoin the group next to its
    /// replacement and, with nothing to commit, might never learn that it was fenced.
    fn check_replaced(&self, consumer: &BaseConsumer<Ctx>, why: &str) -> Result<(), PipelineError> {
        let Some(own) = self.client_id.as_deref() else {
            return Ok(());
        };
        match kafka::other_member_with_our_id(consumer, &self.rt, own, Duration::from_secs(5)) {
            Some(other) => Err(PipelineError::Fenced(format!(
                "{why}; the consumer group has another member with this instance id: {other}"
            ))),
            None => Ok(()),
        }
    }

    /// After a fencing error: fails if the instance must stop. If the consumer group has a
    /// member from another process with this instance id, that one took over: stop.
    /// Otherwise (or when the group cannot be described), the first time within
    /// [`FENCE_WINDOW`] the producer is replaced and every task rewinds: the fencing may come
    /// from the coordinator aborting a transaction that outlived its timeout while a broker
    /// was down. A second time means another running instance has the same transactional id:
    /// stop.
    fn check_fence(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        e: String,
    ) -> Result<(), PipelineError> {
        self.check_replaced(consumer, &e)?;
        if self.last_fence.is_some_and(|t| t.elapsed() < FENCE_WINDOW) {
            return Err(PipelineError::Fenced(format!(
                "{e}; fenced twice within {} s",
                FENCE_WINDOW.as_secs()
            )));
        }
        self.last_fence = Some(Instant::now());
        tracing::warn!(
            error = %e,
            window_s = FENCE_WINDOW.as_secs(),
            "fenced: replacing the producer once; fenced again within the window, this \
             instance stops"
        );
        Ok(())
    }

    /// Reopens every task from its committed state and moves the consumer back to the
    /// tasks' offsets; the outputs buffered since the last commit are dropped.
    fn rewind(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), PipelineError> {
        let parts: Vec<i32> = self.tasks.keys().copied().collect();
        // Dropping a store discards its staged commit: RocksDB holds the committed state.
        self.tasks.clear();
        self.sink.discard();
        for &p in &parts {
            self.open_task(p)?;
        }
        // A transaction that failed on the client may have committed on the brokers (its
        // offsets with it), and after a broker failure the restore can stop short of it: the
        // new partition leader may not report those records yet.
        self.check_against_group(consumer, &parts, false)?;
        for p in parts {
            self.seek_task(consumer, p)?;
        }
        Ok(())
    }

    /// Moves the consumer of a task's input partitions to the task's offsets (or, where the
    /// task has none, to the group's committed offset, else the beginning).
    fn seek_task(&self, consumer: &BaseConsumer<Ctx>, partition: i32) -> Result<(), PipelineError> {
        let Some(t) = self.tasks.get(&partition) else {
            return Ok(());
        };
        for (topic, next) in self.rt.input_topics.iter().zip(&t.next) {
            let offset = match next {
                Some(n) => Offset::Offset(*n),
                None => {
                    let mut q = TopicPartitionList::new();
                    q.add_partition(topic, partition);
                    consumer
                        .committed_offsets(q, Duration::from_secs(30))
                        .ok()
                        .and_then(|c| c.find_partition(topic, partition).map(|e| e.offset()))
                        .filter(|o| matches!(o, Offset::Offset(_)))
                        .unwrap_or(Offset::Beginning)
                }
            };
            consumer
                .seek(topic, partition, offset, Duration::from_secs(10))
                .map_err(|e| {
                    PipelineError::Rebalance(format!("cannot rewind {topic}[{partition}]: {e}"))
                })?;
        }
        Ok(())
    }

    /// Newly assigned partitions: restores their tasks and sets where consumption starts.
    fn assign(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        tpl: &mut TopicPartitionList,
    ) -> Result<(), PipelineError> {
        let mut parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        parts.sort_unstable();
        parts.dedup();
        if self.closing() {
            // Assigned while the consumer closes (another member left at the same time):
            // nothing more is consumed, so nothing is opened. Restoring them would only hold
            // the shutdown up, waiting for the group's offsets with a broker away; their next
            // owner opens them.
            tracing::info!(partitions = ?parts, "shutting down: partitions assigned now are left to their next owner");
            return Ok(());
        }
        let new: Vec<i32> = parts
            .iter()
            .copied()
            .filter(|p| !self.tasks.contains_key(p))
            .collect();
        self.metrics.set_restoring_partitions(new.len() as u64);
        self.health
            .set_ready(false, format!("restoring partitions {new:?}"));
        for (i, p) in new.iter().enumerate() {
            self.open_task(*p)?;
            self.metrics
                .set_restoring_partitions((new.len() - i - 1) as u64);
        }
        self.check_against_group(consumer, &new, true)?;
        let owned: Vec<i32> = self.tasks.keys().copied().collect();
        self.update_standbys(&owned);
        for (ti, topic) in self.rt.input_topics.iter().enumerate() {
            for p in &parts {
                if let Some(Some(n)) = self.tasks.get(p).map(|t| t.next[ti]) {
                    if tpl.find_partition(topic, *p).is_some() {
                        let _ = tpl.set_partition_offset(topic, *p, Offset::Offset(n));
                    }
                }
            }
        }
        self.health.set_ready(true, "");
        Ok(())
    }

    /// The restored state must have the input offsets the group committed (in the same
    /// transactions). A state behind them missed a commit that was still completing
    /// when the restore read the changelog: read the tail again.
    ///
    /// The lookup of the committed offsets is retried: at most [`GROUP_OFFSETS_WAIT`] (or
    /// twice the transaction timeout) when `bounded` (inside a rebalance; then the instance
    /// stops), otherwise for as long as the brokers are away (a rewind).
    fn check_against_group(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        partitions: &[i32],
        bounded: bool,
    ) -> Result<(), PipelineError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let mut q = TopicPartitionList::new();
        for topic in &self.rt.input_topics {
            for p in partitions {
                q.add_partition(topic, *p);
            }
        }
        // One lookup for all of them: it waits while a transaction that carries their offsets
        // is still completing. Going on without it could start from a state that misses such
        // a transaction, once it commits.
        let started = Instant::now();
        let mut warned: Option<Instant> = None;
        // A crashed owner's open transaction holds them until the coordinator aborts it.
        let wait = GROUP_OFFSETS_WAIT.max(self.rt.transaction_timeout * 2);
        let committed = loop {
            match consumer.committed_offsets(q.clone(), Duration::from_secs(10)) {
                Ok(c) => break c,
                Err(e) if !bounded || started.elapsed() < wait => {
                    if warned.is_none_or(|w| w.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(?partitions, error = %e, "cannot read the group's committed offsets yet (retrying)");
                        warned = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(PipelineError::Rebalance(format!(
                        "cannot read the group's committed offsets of partitions \
                         {partitions:?} for {} s: {e}",
                        wait.as_secs()
                    )))
                }
            }
        };
        for &partition in partitions {
            for attempt in 0..TAIL_ATTEMPTS {
                let Some(t) = self.tasks.get(&partition) else {
                    break;
                };
                let behind = self.rt.input_topics.iter().zip(&t.next).any(|(topic, n)| {
                    match committed
                        .find_partition(topic, partition)
                        .map(|e| e.offset())
                    {
                        Some(Offset::Offset(c)) => n.is_none_or(|n| n < c),
                        _ => false,
                    }
                });
                if !behind {
                    break;
                }
                if attempt + 1 == TAIL_ATTEMPTS {
                    tracing::error!(partition, "restored state stays behind the group's committed offsets (changelog lost or truncated?): continuing from the state's offsets");
                    break;
                }
                tracing::warn!(partition, attempt, "restored state is behind the group's committed offsets: reading the changelog tail again");
                if attempt > 0 {
                    // A new partition leader's high watermark can lag behind the records it
                    // has for a moment after a broker failure.
                    std::thread::sleep(Duration::from_secs(1));
                }
                self.tasks.remove(&partition);
                self.open_task(partition)?;
            }
        }
        Ok(())
    }

    /// Partitions taken away: commit (or, if they are already lost, abort and rewind), then
    /// release their tasks.
    fn revoke(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        parts: &[i32],
        lost: bool,
    ) -> Result<(), PipelineError> {
        if lost && !self.closing() {
            self.check_replaced(consumer, "this instance lost its partitions")?;
        }
        // Before any task closes: a commit being collected needs every one of its tasks, and
        // exactly-once every staged commit goes to the state committer with its tasks' writers
        // (as it would have by now without the collection).
        self.take_staged()?;
        if self.commit_error.is_none() {
            self.hand_over(consumer)?;
        }
        if self.closing() {
            // Everything was committed by the final tick.
        } else if lost && self.exactly_once() {
            // Their outputs since the last commit are buffered with the other tasks': once
            // the commits in flight are settled (those with their offsets fail: the group
            // generation moved on), every other task rewinds to its last commit.
            for p in parts {
                self.tasks.remove(p);
            }
            self.settle_commits(consumer, true)?;
            self.rewind(consumer)?;
        } else if lost {
            // At-least-once: another instance may own them already. Commits not handed over
            // yet leave them out (their state transaction would be refused: the group
            // generation moved on); one already handed over commits or fails as a whole
            // (the new owner's `check_against_group` waits for it). Their work since the
            // last commit is redone by the new owner; the other tasks commit as usual.
            for c in &mut self.pending {
                c.forget(parts);
            }
            for p in parts {
                self.tasks.remove(p);
            }
            tracing::warn!(partitions = ?parts, "partitions lost: their uncommitted work is dropped");
            self.commit(consumer, true)?;
        } else {
            self.commit(consumer, true)?;
        }
        let topics: Vec<&str> = self.rt.input_topics.iter().map(|s| s.as_str()).collect();
        for p in parts {
            self.tasks.remove(p);
            self.metrics.forget_partition(&topics, *p);
        }
        if !self.closing() {
            let owned: Vec<i32> = self.tasks.keys().copied().collect();
            self.update_standbys(&owned);
        }
        Ok(())
    }

    /// Keeps standby copies of the partitions after `owned` (see [`kafka::standby`]).
    fn update_standbys(&self, owned: &[i32]) {
        if let Some(s) = &self.standbys {
            s.keep(standby_set(
                owned,
                self.partitions,
                self.rt.standby_replicas,
            ));
        }
    }
}

fn source_headers(h: OwnedHeaders, m: &BorrowedMessage<'_>) -> OwnedHeaders {
    let h = header(h, "sessionizer.source.topic", m.topic());
    let h = header(
        h,
        "sessionizer.source.partition",
        &m.partition().to_string(),
    );
    header(h, "sessionizer.source.offset", &m.offset().to_string())
}

/// Consumer context: rebalances commit and release revoked tasks; statistics feed the lag
/// gauge.
struct Ctx {
    core: Arc<Mutex<Option<Core>>>,
    metrics: Arc<Metrics>,
    failure: Arc<Mutex<Option<String>>>,
    /// Reports input partitions that stop being fetched (see [`kafka::watch`]).
    watch: Mutex<kafka::watch::FetchWatch>,
    /// See [`kafka::rebootstrap`].
    brokers: kafka::rebootstrap::BrokerLoss,
    /// The client's errors, for the start-up check.
    errors: kafka::ClientErrors,
}

impl Ctx {
    fn lock(&self) -> Option<MutexGuard<'_, Option<Core>>> {
        self.core.lock().ok()
    }
}

impl ClientContext for Ctx {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.errors.observe(&error, reason);
        kafka::log_client_error(error, reason, "kafka client");
    }

    fn stats(&self, s: Statistics) {
        self.brokers.observe(&s);
        // Served by the consumer thread's poll, which never holds the core; `try_lock` all
        // the same, so that a report can never wait for it.
        if let Ok(mut g) = self.core.try_lock() {
            if let Some(c) = g.as_mut().filter(|c| c.rt.input_topics.len() > 1) {
                c.lagging = kafka::watch::lagging_partitions(&s);
            }
        }
        for (topic, t) in &s.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    self.metrics.set_consumer_lag(topic, *p, part.consumer_lag);
                }
            }
        }
        if let Ok(mut w) = self.watch.lock() {
            for st in w.observe(&s, Instant::now()) {
                tracing::warn!(
                    topic = %st.topic,
                    partition = st.partition,
                    fetch_state = %st.fetch_state,
                    leader = st.leader,
                    next_offset = st.next_offset,
                    behind = st.behind,
                    stalled_s = st.stalled.as_secs(),
                    "an assigned partition with records to read is not being fetched"
                );
            }
        }
    }
}

impl Ctx {
    fn fail(&self, e: PipelineError) {
        tracing::error!(error = %e, "rebalance failed");
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert_with(|| e.to_string());
        }
    }
}

impl ConsumerContext for Ctx {
    /// Cooperative rebalances, done here rather than in the pre/post hooks so that newly
    /// assigned partitions start at the offsets of their restored state.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.metrics.rebalance(RebalanceKind::Assigned);
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(partitions = ?parts, "partitions assigned");
                if let Some(mut g) = self.lock() {
                    if let Some(core) = g.as_mut() {
                        if let Err(e) = core.assign(consumer, tpl) {
                            self.fail(e);
                        }
                    }
                }
                if let Err(e) = consumer.incremental_assign(tpl) {
                    self.fail(PipelineError::Rebalance(format!("assign: {e}")));
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.metrics.rebalance(RebalanceKind::Revoked);
                let mut parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                parts.sort_unstable();
                parts.dedup();
                let lost = consumer.assignment_lost();
                tracing::info!(partitions = ?parts, lost, "partitions revoked");
                if let Some(mut g) = self.lock() {
                    if let Some(core) = g.as_mut() {
                        if let Err(e) = core.revoke(consumer, &parts, lost) {
                            self.fail(e);
                        }
                    }
                }
                if let Err(e) = consumer.incremental_unassign(tpl) {
                    self.fail(PipelineError::Rebalance(format!("unassign: {e}")));
                }
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
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
    let consumer: BaseConsumer<Ctx> =
        consumer_config
            .create_with_context(ctx)
            .map_err(|source| KafkaError::Client {
                what: "consumer",
                source,
            })?;
    let found = kafka::check_topics(&consumer, &rt, Duration::from_secs(15), &errors)?;
    kafka::changelog::ensure_topic(&rt, found.changelog_partitions, found.partitions)?;
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
            Outputs::new(&kafka::idempotent_producer_config(&rt))?,
        )?,
        Guarantee::ExactlyOnce => Sink::buffered(metrics.clone()),
    };
    let state = StateCommitter::start(
        kafka::transactional_producer_config(&rt),
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
        .map_err(|source| KafkaError::Client {
            what: "subscription",
            source,
        })?;
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
