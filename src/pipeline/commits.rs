//! The pipeline's commits (see the parent module's docs): each interval's state changes and
//! input offsets staged, handed to the state committer in order (at-least-once only once the
//! outputs sent before them are acknowledged), written locally once their transaction has
//! committed; a failed transaction rewinds every task to its last written commit.

use super::{
    reading_backlog, wall_ms, Core, Ctx, PipelineError, CATCH_UP_BATCH_BYTES, MAX_PENDING_COMMITS,
};
use crate::config::Guarantee;
use crate::engine::SourceOffset;
use crate::kafka;
use crate::kafka::committer::{Job, JobOutcome, TaskCommit};
use crate::kafka::output::TxnError;
use crate::kafka::sink::Batch;
use crate::store::Change;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// How long state transactions may go on failing with an undeliverable output
/// ([`TxnError::Undeliverable`]: an output topic deleted, as the brokers confirm when asked
/// afresh; writes to it not authorised; a record the broker refuses), with none committed,
/// before the instance stops with an error at the next such failure. Each is retried like
/// any failed transaction (abort and rewind); a commit starts the count again, and so does a
/// topic the client took for deleted that the brokers still list (its producer is replaced:
/// librdkafka can take a topic for deleted after one metadata answer during a broker's
/// failover, and keeps refusing it for a while). Retrying for longer would only repeat the
/// failure: exactly-once aborts and rewinds several times a second.
pub const UNDELIVERABLE_FOR: Duration = Duration::from_secs(10);

/// Whether the commit interval that began `since` ago ends now: after `interval` (the
/// settings' two: `commit_interval`, `catch_up_commit_interval`) when no partition reads a
/// backlog, otherwise after the catch-up one, or once `buffered` output bytes reach
/// [`CATCH_UP_BATCH_BYTES`]; or at once when a backlog has just `drained`: the last commit
/// was made while a partition read a backlog, and now every partition has reached its end
/// (see [`Core::drained`]).
pub(super) fn commit_is_due(
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
pub(super) struct PendingCommit {
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
    pub(super) fn forget(&mut self, parts: &[i32]) {
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
pub(super) enum Staged {
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

/// A second fencing error within this time of the first stops the instance.
pub const FENCE_WINDOW: Duration = Duration::from_secs(60);

impl Core {
    /// Moves time on in every task, then commits everything (see the module docs).
    pub(super) fn tick(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), PipelineError> {
        self.advance()?;
        let now = wall_ms();
        let drain = self.closing();
        if !std::mem::take(&mut self.dirty) {
            // Nothing consumed, nothing concluded: no transaction (an idle instance would
            // otherwise commit every interval, and grow the changelog by a record and a
            // transaction marker each time, only to move a wall-clock watermark on).
            self.refresh_watermarks(now);
            self.backlog_at_commit = self.catching_up();
            self.settle_commits(consumer, drain)?;
            let settled = self.pending.is_empty() && self.commit_error.is_none();
            if settled
                && self
                    .failing
                    .is_some_and(|f| f.elapsed() >= self.quiet_after_failure())
            {
                // Rewound after a failed transaction, and nothing to commit since (the failed
                // commit may have completed on the brokers after all): no commit will come to
                // say the transactions work, and nothing is failing.
                self.transactions_work("no state transaction to retry: ready again");
            }
            return Ok(());
        }
        self.commit(consumer, drain)
    }

    /// Ends the failing state a failed transaction began (see [`Self::commit_failed`]), if
    /// any: `/readyz` is ready again, and the count towards [`UNDELIVERABLE_FOR`] starts
    /// over.
    fn transactions_work(&mut self, why: &str) {
        self.undeliverable_since = None;
        if self.failing.take().is_some() {
            tracing::info!("{why}");
            self.health.set_failing(None);
        }
    }

    /// How long an instance must have had nothing to commit since a failed transaction to be
    /// ready again without a commit: longer than a rewind takes to read the records again and
    /// commit them (which fails again if the failure lasts).
    fn quiet_after_failure(&self) -> Duration {
        (self.rt.commit_interval * 2).max(Duration::from_secs(1))
    }

    /// Sets every task's watermark gauges (committed or not).
    pub(super) fn refresh_watermarks(&self, now: i64) {
        for t in self.tasks.values() {
            for topic in &self.rt.input_topics {
                self.metrics
                    .set_watermark(topic, t.partition, t.engine.watermark(), now);
            }
        }
    }

    /// Commits every task (see the module docs): stages the interval's commit and moves the
    /// staged commits on. `drain` waits until every staged commit is written.
    pub(super) fn commit(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        drain: bool,
    ) -> Result<(), PipelineError> {
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
    pub(super) fn collect_staged(&mut self, keys: usize) -> Result<(), PipelineError> {
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
    pub(super) fn take_staged(&mut self) -> Result<(), PipelineError> {
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
    pub(super) fn settle_commits(
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
    pub(super) fn hand_over(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), PipelineError> {
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

    pub(super) fn outcome(&mut self, wait: Duration) -> Result<Option<JobOutcome>, PipelineError> {
        Ok(self.state.outcome(wait)?)
    }

    pub(super) fn outstanding(&self) -> usize {
        self.state.outstanding()
    }

    /// The outcome of the oldest handed-over commit.
    pub(super) fn settled(&mut self, outcome: JobOutcome) -> Result<(), PipelineError> {
        let Some(c) = self.pending.pop_front() else {
            return Err(PipelineError::Transaction(
                "a state commit ended that was never handed over".into(),
            ));
        };
        match outcome {
            JobOutcome::Committed { took, .. } => {
                self.metrics.observe_transaction_commit(took);
                self.transactions_work("state transactions commit again");
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
    pub(super) fn commit_failed(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
    ) -> Result<(), PipelineError> {
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
        self.failing = Some(Instant::now());
        self.health
            .set_failing(Some(format!("state transactions failing: {e}")));
        let new_producer = match e {
            // librdkafka can take a topic for deleted after one metadata answer during a
            // broker's failover, and refuses it for a while: asked afresh, the brokers say
            // whether it is gone. A new producer forgets what the old one decided.
            TxnError::Undeliverable(u)
                if u.unknown_topic.as_deref().is_some_and(|t| {
                    kafka::topic_listed(consumer, t, Duration::from_secs(5)) != Some(false)
                }) =>
            {
                self.undeliverable_since = None;
                tracing::warn!(error = %u.message, "state transaction failed for a topic the brokers still list (stale metadata): replacing the producer and rewinding to the last commit");
                true
            }
            TxnError::Undeliverable(u) => {
                let since = *self.undeliverable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= UNDELIVERABLE_FOR {
                    return Err(PipelineError::Undeliverable {
                        error: u.message,
                        for_: since.elapsed(),
                    });
                }
                tracing::warn!(error = %u.message, "state transaction failed, an output cannot be delivered: rewinding to the last commit");
                false
            }
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
    pub(super) fn settle_pending(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
    ) -> Result<(), PipelineError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.settle_commits(consumer, false)
    }

    /// The oldest staged commit of each of `partitions` is written to its database: tells
    /// the stores, and updates the tasks' metrics.
    pub(super) fn written(&mut self, partitions: &[i32]) -> Result<(), PipelineError> {
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
    pub(super) fn check_replaced(
        &self,
        consumer: &BaseConsumer<Ctx>,
        why: &str,
    ) -> Result<(), PipelineError> {
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
    pub(super) fn check_fence(
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
    pub(super) fn rewind(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), PipelineError> {
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
    pub(super) fn seek_task(
        &self,
        consumer: &BaseConsumer<Ctx>,
        partition: i32,
    ) -> Result<(), PipelineError> {
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
}
