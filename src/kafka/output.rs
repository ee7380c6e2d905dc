//! The output side: an idempotent producer with delivery tracking. Exactly-once uses one,
//! transactional, for every output topic and the changelog; at-least-once uses a plain one for
//! the outputs and a transactional one for the changelog (see [`super::committer`]).
//!
//! Records are sent in numbered **epochs**: [`Outputs::seal`] ends the current one (the
//! pipeline seals one per commit) and the next send opens the next. Delivery reports are
//! counted per epoch, so the pipeline can tell when every record of a commit, and of every
//! commit before it, is acknowledged ([`Outputs::acknowledged`]) while it goes on producing.
//!
//! Delivery invariants. [`Outputs::acknowledged`] (and [`Outputs::flush`]) report an epoch's
//! records as delivered only when every one of them has been acknowledged by the brokers
//! (acks=all), and [`Outputs::check_failures`] reports any record that failed for good; the
//! at-least-once pipeline commits a commit's state only after its outputs are delivered, so
//! nothing is lost, and after a crash the records since the last commit are produced again,
//! identical (the engine is deterministic). Transactional: every record sent between
//! [`Outputs::begin`] and a successful [`Outputs::commit_epoch`] becomes visible to
//! read_committed readers together with the input offsets given to it, or none of them does.
//!
//! Changelog records are sent with [`Outputs::send_change`]; their delivery reports give each
//! changelog partition's next offset as of the last retired epoch
//! ([`Outputs::changelog_next`]), the local checkpoint of the commit that epoch ends.

use super::rebootstrap::BrokerLoss;
use super::KafkaError;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, TopicPartitionList};
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Epochs counted at once: more than the pipeline ever leaves unretired.
const EPOCH_SLOTS: usize = 64;

struct DeliveryState {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// The first failure that retrying will not mend ([`undeliverable`]), until an abort.
    undeliverable: Mutex<Option<Undeliverable>>,
    /// Records sent and not acknowledged (or failed) yet, by epoch modulo [`EPOCH_SLOTS`].
    unacked: [AtomicI64; EPOCH_SLOTS],
    /// Per (epoch, changelog partition): the offset after its last acknowledged changelog
    /// record. Folded into [`Outputs::checkpoints`] when the epoch is retired.
    changelog_acked: Mutex<FxHashMap<(u64, i32), i64>>,
}

impl Default for DeliveryState {
    fn default() -> Self {
        Self {
            failed: AtomicU64::new(0),
            first_error: Mutex::new(None),
            undeliverable: Mutex::new(None),
            unacked: std::array::from_fn(|_| AtomicI64::new(0)),
            changelog_acked: Mutex::default(),
        }
    }
}

impl DeliveryState {
    /// Counts a record for `topic` that will never be delivered, keeping the first error.
    fn fail(&self, topic: &str, e: &RdError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let what = self.note(topic, e);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(what);
        }
    }

    /// Describes a failure for `topic`, and keeps it if it is the first [`undeliverable`] one.
    fn note(&self, topic: &str, e: &RdError) -> String {
        let what = format!("topic `{topic}`: {e}");
        if undeliverable(e) {
            if let Ok(mut u) = self.undeliverable.lock() {
                u.get_or_insert_with(|| Undeliverable {
                    message: what.clone(),
                    unknown_topic: unknown_topic(e).then(|| topic.to_owned()),
                });
            }
        }
        what
    }
}

/// A record that failed for a reason that sending it again will not mend ([`undeliverable`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Undeliverable {
    /// The record's topic and error.
    pub message: String,
    /// The topic, when the client did not know it: the brokers can say whether that is so.
    pub unknown_topic: Option<String>,
}

/// Whether a record failed for a reason that sending it again will not mend: its topic or
/// partition does not exist (deleted while running), writing to it is not authorised, or the
/// broker refuses the record itself (too large for the topic, invalid, against a policy).
/// Unreachable brokers, timeouts and leader changes are not: librdkafka retries those.
pub fn undeliverable(e: &RdError) -> bool {
    unknown_topic(e)
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                    | RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessageSize
                    | RDKafkaErrorCode::InvalidRecord
                    | RDKafkaErrorCode::PolicyViolation
            )
        )
}

/// Whether the client failed a record because it does not know its topic or partition.
fn unknown_topic(e: &RdError) -> bool {
    e.rdkafka_error_code().is_some_and(unknown_topic_code)
}

/// Whether `code` says a topic or partition is not known (to the client, or to the broker
/// that answered).
pub(crate) fn unknown_topic_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::UnknownTopicOrPartition
    )
}

fn slot(epoch: u64) -> usize {
    (epoch % EPOCH_SLOTS as u64) as usize
}

/// Delivery opaque: the epoch shifted left by one, the low bit set for changelog records.
const CHANGELOG: usize = 1;

/// Producer context counting failed deliveries.
pub struct DeliveryContext {
    state: Arc<DeliveryState>,
    brokers: BrokerLoss,
}

impl ClientContext for DeliveryContext {
    fn stats(&self, s: rdkafka::statistics::Statistics) {
        self.brokers.observe(&s);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let epoch = (opaque >> 1) as u64;
        match result {
            Err((e, m)) => self.state.fail(m.topic(), e),
            Ok(m) if opaque & CHANGELOG != 0 => {
                if let Ok(mut acked) = self.state.changelog_acked.lock() {
                    let n = acked.entry((epoch, m.partition())).or_insert(0);
                    *n = (*n).max(m.offset() + 1);
                }
            }
            Ok(_) => {}
        }
        // Last: an epoch counts as acknowledged only once its reports are fully taken in.
        self.state.unacked[slot(epoch)].fetch_sub(1, Ordering::AcqRel);
    }
}

/// A failed transaction operation.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// The transaction must be aborted; the producer stays usable.
    #[error("{0}")]
    Abortable(String),
    /// The producer is unusable, but nothing says another instance took over: a new
    /// producer with the same transactional id can carry on.
    #[error("{0}")]
    Fatal(String),
    /// Another producer with the same transactional id took over: this instance must stop.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Aborted because a record could not be delivered for a reason that retrying will not
    /// mend ([`undeliverable`]). The producer's state is reported apart (see the state
    /// committer).
    #[error("{}", .0.message)]
    Undeliverable(Undeliverable),
}

fn txn_error(what: &str, e: RdError) -> TxnError {
    let fenced = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    );
    match &e {
        _ if fenced => TxnError::Fenced(format!("{what}: {e}")),
        RdError::Transaction(t) if t.is_fatal() => TxnError::Fatal(format!("{what}: {e}")),
        _ => TxnError::Abortable(format!("{what}: {e}")),
    }
}

/// How long [`Outputs::init_transactions`] waits for the cluster's metadata before it goes on
/// without it.
const METADATA_BEFORE_INIT: Duration = Duration::from_secs(5);

/// The producer of all outputs.
pub struct Outputs {
    /// Shared with a thread that may outlive a wedged `send_offsets_to_transaction` (see
    /// [`Outputs::commit_transaction`]).
    producer: Arc<ThreadedProducer<DeliveryContext>>,
    state: Arc<DeliveryState>,
    /// The epoch records are sent in now.
    epoch: u64,
    /// Every epoch up to this one is retired.
    retired: u64,
    /// `bootstrap.servers`, for [`Self::keep_brokers`].
    bootstrap: String,
    /// Per changelog partition: the offset after its last changelog record of the retired
    /// epochs.
    checkpoints: FxHashMap<i32, i64>,
}

/// How long transaction operations may take before they count as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long adding the input offsets to a transaction may take before it counts as failed,
/// and how much longer the pipeline waits for librdkafka to say so before it gives up on the
/// producer (see [`Outputs::send_offsets`]). It takes milliseconds, and after a broker's
/// death as long as the brokers take to move its partitions' leadership (their
/// `broker.session.timeout.ms`, 9 s by default) plus a few retries. The full
/// [`TXN_TIMEOUT`] here held a failed-over partition still for 65 s whenever librdkafka's
/// call hung (kafka_failover, after a broker kill).
const OFFSETS_TIMEOUT: Duration = Duration::from_secs(15);
const OFFSETS_GRACE: Duration = Duration::from_secs(5);

impl Outputs {
    pub fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        let state = Arc::new(DeliveryState::default());
        let producer = config
            .create_with_context(DeliveryContext {
                state: state.clone(),
                brokers: BrokerLoss::default(),
            })
            .map_err(|e| KafkaError::client("producer", e))?;
        Ok(Outputs {
            bootstrap: config
                .get("bootstrap.servers")
                .unwrap_or_default()
                .to_owned(),
            producer: Arc::new(producer),
            state,
            epoch: 1,
            retired: 0,
            checkpoints: FxHashMap::default(),
        })
    }

    /// Fails unless the brokers list `topic` within `wait` (asked again every
    /// [`super::PROPAGATION_POLL`], for a topic created just before): a record for a topic the brokers do not have waits
    /// `topic.metadata.propagation.max.ms` (30 s) before it fails.
    pub fn check_topic(&self, topic: &str, wait: Duration) -> Result<(), KafkaError> {
        let deadline = Instant::now() + wait;
        let mut answered = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Every topic's: asked for one topic the brokers do not have, librdkafka waits
            // for the whole timeout.
            match self
                .producer
                .client()
                .fetch_metadata(None, left.max(wait / 4))
            {
                Ok(md) => {
                    answered = true;
                    if super::partition_count(&md, topic).is_some() {
                        return Ok(());
                    }
                }
                Err(e) if !answered => {
                    return Err(KafkaError::Unreachable {
                        brokers: self.bootstrap.clone(),
                        problem: format!("metadata request failed: {e}"),
                    })
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(KafkaError::MissingTopic(topic.to_owned()));
            }
            std::thread::sleep(super::PROPAGATION_POLL);
        }
    }

    /// Gives the producer its bootstrap servers again if it has lost every broker (see
    /// [`BrokerLoss`]).
    pub fn keep_brokers(&self) {
        self.producer
            .context()
            .brokers
            .rebootstrap(self.producer.client(), &self.bootstrap);
    }

    /// Queues one record; waits while the local queue is full.
    pub fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        timestamp: Option<i64>,
        headers: Option<OwnedHeaders>,
    ) -> Result<(), KafkaError> {
        let r = OutputRecord {
            topic,
            key,
            payload,
            timestamp,
            headers,
        };
        self.enqueue(r.into_base(self.opaque(0)))
    }

    /// Counts one output record in the current epoch before another thread queues it with
    /// [`ReservedSender::send`] (the epoch is not acknowledged until it is delivered, or has
    /// failed); returns the record's delivery opaque.
    pub fn reserve(&self) -> usize {
        self.state.unacked[slot(self.epoch)].fetch_add(1, Ordering::AcqRel);
        self.opaque(0)
    }

    /// A handle for the thread that queues [reserved](Self::reserve) records.
    pub fn reserved_sender(&self) -> ReservedSender {
        ReservedSender {
            producer: Arc::clone(&self.producer),
            state: Arc::clone(&self.state),
        }
    }

    /// Queues one changelog record for `partition` (a tombstone when `value` is none).
    pub fn send_change(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), KafkaError> {
        let mut rec: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, self.opaque(CHANGELOG))
                .partition(partition)
                .key(key);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        self.enqueue(rec)
    }

    /// Queues the changelog records of one commit of `partition`, in order.
    pub fn send_changes(
        &self,
        topic: &str,
        partition: i32,
        changes: &[crate::store::Change],
    ) -> Result<(), KafkaError> {
        for c in changes {
            self.send_change(topic, partition, &c.key, c.value.as_deref())?;
        }
        Ok(())
    }

    fn opaque(&self, kind: usize) -> usize {
        (self.epoch as usize) << 1 | kind
    }

    /// Ends the current epoch and returns its number; later records belong to the next one.
    pub fn seal(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch - 1
    }

    /// Whether every record of `epoch` and of every epoch before it has been acknowledged or
    /// has failed (see [`Self::check_failures`]).
    pub fn acknowledged(&self, epoch: u64) -> bool {
        (self.retired + 1..=epoch).all(|e| self.state.unacked[slot(e)].load(Ordering::Acquire) == 0)
    }

    /// Waits until [`Self::acknowledged`]`(epoch)`, or `limit` has passed. Without a limit it
    /// keeps waiting while the brokers are unreachable (librdkafka retries until
    /// `message.timeout.ms`, then reports a failure).
    pub fn wait_acknowledged(&self, epoch: u64, limit: Option<Duration>) {
        wait_for(limit, || self.acknowledged(epoch));
    }

    /// Retires every epoch up to `epoch` (they must be [acknowledged](Self::acknowledged)):
    /// [`Self::changelog_next`] then reflects their changelog records.
    pub fn retire(&mut self, epoch: u64) {
        if let Ok(mut acked) = self.state.changelog_acked.lock() {
            acked.retain(|&(e, partition), next| {
                if e > epoch {
                    return true;
                }
                let c = self.checkpoints.entry(partition).or_insert(0);
                *c = (*c).max(*next);
                false
            });
        }
        self.retired = self.retired.max(epoch);
    }

    /// The offset after the last changelog record of `partition` in the retired epochs.
    fn changelog_next(&self, partition: i32) -> Option<i64> {
        self.checkpoints.get(&partition).copied()
    }

    /// Registers the transactional id (fencing any older instance with the same id and
    /// aborting its open transaction). Used by the state committer's producer, in either
    /// mode.
    ///
    /// The cluster's metadata is asked for first. A new client forgets its bootstrap
    /// connection once it has learned the brokers' ids; when librdkafka (2.12.1) had sent the
    /// transaction coordinator query on that connection, the query failed and was retried only
    /// by a 500 ms timer: that held 3 of 12 start-ups on a local broker back by about 450 ms
    /// (`scripts/standalone-run.py startup`). With the metadata known first, none of 20
    /// waited. (The same timer also covers a client that has no connected broker yet, so
    /// this narrows the wait's cause rather than ruling it out.)
    pub fn init_transactions(&self) -> Result<(), TxnError> {
        // A failure here shows again, with its reason, in the initialisation itself.
        let _ = self
            .producer
            .client()
            .fetch_metadata(None, METADATA_BEFORE_INIT);
        self.producer
            .init_transactions(TXN_TIMEOUT)
            .map_err(|e| txn_error("initialising transactions", e))
    }

    pub fn begin(&self) -> Result<(), TxnError> {
        self.producer
            .begin_transaction()
            .map_err(|e| txn_error("beginning a transaction", e))
    }

    /// Ends the current epoch (see [`Self::seal`]) and commits the transaction with the input
    /// offsets. Once it has committed, every record is acknowledged: waits until their reports
    /// are taken in, retires the epoch and returns the changelog checkpoint of each of
    /// `partitions` that has one.
    pub fn commit_epoch(
        &mut self,
        offsets: &TopicPartitionList,
        group: ConsumerGroupMetadata,
        partitions: impl IntoIterator<Item = i32>,
    ) -> Result<Vec<(i32, i64)>, TxnError> {
        let epoch = self.seal();
        self.commit_transaction(offsets, group)?;
        self.wait_acknowledged(epoch, None);
        self.retire(epoch);
        Ok(partitions
            .into_iter()
            .filter_map(|p| self.changelog_next(p).map(|c| (p, c)))
            .collect())
    }

    /// Waits for every record of the transaction, adds the input offsets and commits.
    fn commit_transaction(
        &self,
        offsets: &TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<(), TxnError> {
        // Wait for the acknowledgements ourselves first: the client's own flush polls in
        // 100 ms steps (see `flush`). Bounded: a transaction in error keeps its queue until
        // it is aborted, and the commit below reports that error.
        self.wait_in_flight(Some(TXN_TIMEOUT / 2));
        if offsets.count() > 0 {
            self.send_offsets(offsets.clone(), group)?;
        }
        self.producer
            .commit_transaction(TXN_TIMEOUT)
            .map_err(|e| txn_error("committing the transaction", e))
    }

    /// `send_offsets_to_transaction`, on a thread of its own: librdkafka 2.12 can block in it
    /// forever, past its timeout, when the group coordinator's broker has died (librdkafka
    /// issues 5456 and 5511, seen here after a broker kill). If it has not returned
    /// [`OFFSETS_GRACE`] after [`OFFSETS_TIMEOUT`], the producer counts as lost (a fatal error: the pipeline
    /// replaces it, which fences this one) and the thread is left to finish whenever it does.
    fn send_offsets(
        &self,
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<(), TxnError> {
        let producer = Arc::clone(&self.producer);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("txn offsets".into())
            .spawn(move || {
                let r = producer.send_offsets_to_transaction(&offsets, &group, OFFSETS_TIMEOUT);
                let _ = tx.send(r);
            })
            .map_err(|e| TxnError::Fatal(format!("cannot start a thread: {e}")))?;
        match rx.recv_timeout(OFFSETS_TIMEOUT + OFFSETS_GRACE) {
            Ok(r) => r.map_err(|e| txn_error("adding the input offsets to the transaction", e)),
            Err(_) => {
                tracing::error!(
                    timeout_s = OFFSETS_TIMEOUT.as_secs(),
                    "adding the input offsets to the transaction never returned (librdkafka \
                     issue 5511); the producer will be replaced"
                );
                Err(TxnError::Fatal(
                    "adding the input offsets to the transaction did not return".into(),
                ))
            }
        }
    }

    /// Aborts the open transaction (queued records are purged, not waited for); the
    /// failed-delivery count starts again from zero, and the [undeliverable](undeliverable)
    /// failure is forgotten.
    pub fn abort(&self) -> Result<(), TxnError> {
        let r = self
            .producer
            .abort_transaction(TXN_TIMEOUT)
            .map_err(|e| txn_error("aborting the transaction", e));
        self.state.failed.store(0, Ordering::Relaxed);
        if let Ok(mut f) = self.state.first_error.lock() {
            *f = None;
        }
        if let Ok(mut u) = self.state.undeliverable.lock() {
            *u = None;
        }
        r
    }

    /// The first record that failed, since the last abort, for a reason that sending it
    /// again will not mend (see [`undeliverable`]), with its topic.
    pub fn undeliverable(&self) -> Option<Undeliverable> {
        self.state.undeliverable.lock().ok().and_then(|u| u.clone())
    }

    fn enqueue(&self, rec: BaseRecord<'_, [u8], [u8], usize>) -> Result<(), KafkaError> {
        // Counted before it is handed over: its report may come before `send` returns.
        let unacked = &self.state.unacked[slot((rec.delivery_opaque >> 1) as u64)];
        let topic = rec.topic;
        unacked.fetch_add(1, Ordering::AcqRel);
        queue(&self.producer, rec).map_err(|e| {
            unacked.fetch_sub(1, Ordering::AcqRel);
            KafkaError::Produce(self.state.note(topic, &e))
        })
    }

    /// Waits until every record sent so far is acknowledged and retires every epoch. Keeps
    /// waiting while the brokers are unreachable (librdkafka retries until
    /// `message.timeout.ms`); fails if any delivery failed for good.
    pub fn flush(&mut self) -> Result<(), KafkaError> {
        let epoch = self.seal();
        self.wait_acknowledged(epoch, None);
        self.retire(epoch);
        self.check_failures()
    }

    /// Fails if any record could not be delivered (at-least-once: the process must stop
    /// before it writes state or offsets past it).
    pub fn check_failures(&self) -> Result<(), KafkaError> {
        let failed = self.state.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = self
                .state
                .first_error
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default();
            return Err(KafkaError::Produce(format!(
                "{failed} output record(s) could not be delivered, first error: {first}"
            )));
        }
        Ok(())
    }

    /// Waits until nothing is in flight, or `limit` has passed.
    fn wait_in_flight(&self, limit: Option<Duration>) {
        // Not `Producer::flush`: with a threaded producer it polls in steps of up to 100 ms
        // while the background thread consumes the delivery reports, so it stalls the
        // pipeline for ~100 ms per commit. The background thread serves the reports; waiting
        // for the in-flight count to reach zero is enough.
        wait_for(limit, || self.producer.in_flight_count() == 0);
    }
}

/// Queues records [reserved](Outputs::reserve) on the consumer thread, from another thread
/// (at-least-once: see [`super::sink`]).
pub struct ReservedSender {
    producer: Arc<ThreadedProducer<DeliveryContext>>,
    state: Arc<DeliveryState>,
}

impl ReservedSender {
    /// Queues one record reserved with delivery opaque `opaque`; waits while the local queue
    /// is full. A record that cannot be queued counts as a failed delivery
    /// ([`Outputs::check_failures`] reports it).
    pub fn send(&self, r: OutputRecord<'_>, opaque: usize) {
        let topic = r.topic;
        if let Err(e) = queue(&self.producer, r.into_base(opaque)) {
            self.state.fail(topic, &e);
            self.state.unacked[slot((opaque >> 1) as u64)].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One output record, before it is queued.
pub struct OutputRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    /// `None`: a null value.
    pub payload: Option<&'a [u8]>,
    pub timestamp: Option<i64>,
    pub headers: Option<OwnedHeaders>,
}

impl<'a> OutputRecord<'a> {
    fn into_base(self, opaque: usize) -> BaseRecord<'a, [u8], [u8], usize> {
        let mut rec = BaseRecord::with_opaque_to(self.topic, opaque);
        if let Some(p) = self.payload {
            rec = rec.payload(p);
        }
        if let Some(k) = self.key {
            rec = rec.key(k);
        }
        if let Some(ts) = self.timestamp {
            rec = rec.timestamp(ts);
        }
        if let Some(h) = self.headers {
            rec = rec.headers(h);
        }
        rec
    }
}

/// Hands `rec` to the producer, waiting while its local queue is full.
fn queue(
    producer: &ThreadedProducer<DeliveryContext>,
    mut rec: BaseRecord<'_, [u8], [u8], usize>,
) -> Result<(), RdError> {
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// The checkpoint of `partition` among those [`Outputs::commit_epoch`] returned.
pub fn checkpoint_of(checkpoints: &[(i32, i64)], partition: i32) -> Option<i64> {
    checkpoints
        .iter()
        .find(|(p, _)| *p == partition)
        .map(|(_, c)| *c)
}

/// Sleeps in 250 µs steps until `done` holds or `limit` has passed, warning once if that takes
/// more than 5 s (the brokers are unreachable or slow).
fn wait_for(limit: Option<Duration>, done: impl Fn() -> bool) {
    let started = Instant::now();
    let mut warned = false;
    while !done() {
        if limit.is_some_and(|l| started.elapsed() >= l) {
            return;
        }
        std::thread::sleep(Duration::from_micros(250));
        if !warned && started.elapsed() > Duration::from_secs(5) {
            tracing::warn!("outputs not acknowledged yet; waiting for the brokers");
            warned = true;
        }
    }
    if warned {
        tracing::info!(
            waited_s = started.elapsed().as_secs(),
            "outputs acknowledged"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_retrying_cannot_mend_are_undeliverable() {
        let produce = |c| RdError::MessageProduction(c);
        for c in [
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::MessageSizeTooLarge,
        ] {
            assert!(undeliverable(&produce(c)), "{c:?}");
        }
        for c in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::QueueFull,
        ] {
            assert!(!undeliverable(&produce(c)), "{c:?}");
        }
    }

    #[test]
    fn a_failure_names_its_topic_and_the_first_undeliverable_one_is_kept() {
        let state = DeliveryState::default();
        state.fail(
            "t1",
            &RdError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        );
        state.fail(
            "t2",
            &RdError::MessageProduction(RDKafkaErrorCode::UnknownTopic),
        );
        let first = state.first_error.lock().unwrap().clone().unwrap();
        assert!(first.starts_with("topic `t1`: "), "{first}");
        let kept = state.undeliverable.lock().unwrap().clone().unwrap();
        assert!(kept.message.starts_with("topic `t2`: "), "{kept:?}");
        assert_eq!(kept.unknown_topic.as_deref(), Some("t2"));
        assert_eq!(state.failed.load(Ordering::Relaxed), 2);
    }
}
