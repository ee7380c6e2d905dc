//! Partitions coming and going: a newly assigned partition's task opened (local state checked
//! against the changelog, the changelog replayed from the local checkpoint) and checked
//! against the group's committed offsets before it consumes; revoked partitions committed and
//! released, lost ones dropped; and the consumer context whose rebalance callback drives them.

use super::{wall_ms, Core, PipelineError, Task};
use crate::engine::{Counters, Engine, StateStore};
use crate::kafka;
use crate::kafka::standby::standby_set;
use crate::metrics::{Metrics, RebalanceKind};
use crate::store::{RocksOptions, RocksStore};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How many times a restored task whose state is behind the group's committed offsets reads
/// the changelog tail again (see [`Core::check_against_group`]).
const TAIL_ATTEMPTS: u32 = 10;

/// How long a newly assigned partition waits at least for the group's committed offsets (see
/// [`Core::check_against_group`]; twice the transaction timeout if that is longer) before the
/// instance gives up.
const GROUP_OFFSETS_WAIT: Duration = Duration::from_secs(60);

impl Core {
    /// Opens a task: local state checked against the changelog (deleted if it cannot be
    /// trusted), the changelog replayed from the local checkpoint, the engine opened on the
    /// result.
    pub(super) fn open_task(&mut self, partition: i32) -> Result<(), PipelineError> {
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

    /// Newly assigned partitions: restores their tasks and sets where consumption starts.
    pub(super) fn assign(
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
    pub(super) fn check_against_group(
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
    pub(super) fn revoke(
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
    pub(super) fn update_standbys(&self, owned: &[i32]) {
        if let Some(s) = &self.standbys {
            s.keep(standby_set(
                owned,
                self.partitions,
                self.rt.standby_replicas,
            ));
        }
    }
}

/// Consumer context: rebalances commit and release revoked tasks; statistics feed the lag
/// gauge.
pub(super) struct Ctx {
    pub(super) core: Arc<Mutex<Option<Core>>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) failure: Arc<Mutex<Option<String>>>,
    /// Reports input partitions that stop being fetched (see [`kafka::watch`]).
    pub(super) watch: Mutex<kafka::watch::FetchWatch>,
    /// See [`kafka::rebootstrap`].
    pub(super) brokers: kafka::rebootstrap::BrokerLoss,
    /// The client's errors, for the start-up check.
    pub(super) errors: kafka::ClientErrors,
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
        for (topic, p, records) in kafka::watch::consumer_lags(&s) {
            self.metrics.set_consumer_lag(topic, p, records);
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
