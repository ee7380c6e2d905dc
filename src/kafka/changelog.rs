//! The changelog topic: creating or validating it at start-up, and restoring a task's RocksDB
//! state from one of its partitions.
//!
//! Partition `n` of the changelog holds the state of task `n` in the form of
//! [`crate::store::changelog`]. Every commit reaches it in a Kafka transaction (with the
//! outputs for exactly-once, alone for at-least-once), so a restore reads the partition with a
//! read_committed consumer from the local checkpoint to its end and applies every record: it
//! sees whole commits only, and the state it ends with is that of the last commit, with that
//! commit's input offsets. Records are not grouped by commit: log compaction removes the
//! earlier commits' markers (the partition meta record is rewritten by every commit) but keeps
//! their other records wherever no later commit rewrote the key.

use super::rebootstrap::BrokerLoss;
use super::{KafkaError, TopicConfig};
use crate::config::RuntimeSettings;
use crate::store::{Change, RocksStore};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Why local state cannot be trusted against its changelog partition, whose records span
/// offsets `low..high`, if it cannot: it holds state but no checkpoint, or its checkpoint is
/// outside the partition (the changelog was recreated or compacted past it).
pub fn distrust(
    store: &mut RocksStore,
    low: i64,
    high: i64,
) -> Result<Option<&'static str>, crate::engine::StoreError> {
    use crate::engine::StateStore;
    Ok(match store.changelog_checkpoint()? {
        None => store
            .load_meta()?
            .is_some()
            .then_some("no changelog checkpoint"),
        Some(c) if c > high => Some("checkpoint beyond the end of the changelog"),
        Some(c) if c < low => Some("checkpoint before the start of the changelog"),
        Some(_) => None,
    })
}

/// Applied in batches of about this many records.
const APPLY_BATCH: usize = 50_000;

/// Creates the changelog topic if it is missing (compacted, `partitions` partitions, the
/// brokers' default replication), or checks that the existing one has `partitions`
/// partitions. `runtime` runs the admin requests (see [`super::with_admin`]). Returns whether
/// it created the topic: one it did not create must be checked to be compacted
/// ([`check_policy`]).
pub fn ensure_topic(
    admin: &AdminClient<DefaultClientContext>,
    runtime: &tokio::runtime::Runtime,
    rt: &RuntimeSettings,
    existing_partitions: Option<i32>,
    partitions: i32,
) -> Result<bool, KafkaError> {
    let topic = rt.changelog_topic.as_str();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    match existing_partitions {
        None => {
            let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))
                .set("cleanup.policy", "compact");
            let results = runtime
                .block_on(admin.create_topics([&new], &opts))
                .map_err(|e| KafkaError::Changelog(format!("cannot create `{topic}`: {e}")))?;
            let mut created = true;
            for r in results {
                match r {
                    Ok(_) => tracing::info!(topic, partitions, "changelog topic created"),
                    Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                        created = false;
                    }
                    Err((_, code)) => {
                        return Err(KafkaError::Changelog(format!(
                            "cannot create `{topic}`: {code}"
                        )))
                    }
                }
            }
            Ok(created)
        }
        Some(n) if n != partitions => Err(KafkaError::Changelog(format!(
            "changelog topic `{topic}` has {n} partitions but the input topics have \
             {partitions}; delete it (the state is rebuilt from the input only if you \
             replay it) or point kafka.changelog_topic elsewhere"
        ))),
        Some(_) => Ok(false),
    }
}

/// Checks that the changelog topic `topic`, as `described` (see [`super::describe_topics`],
/// which waits for a topic just created by another instance), is compacted.
pub fn check_policy(topic: &str, described: &TopicConfig) -> Result<(), KafkaError> {
    let entries = described
        .as_ref()
        .map_err(|e| KafkaError::Changelog(format!("cannot describe `{topic}`: {e}")))?;
    let policy = entries.get("cleanup.policy").ok_or_else(|| {
        KafkaError::Changelog(format!(
            "changelog topic `{topic}`: its description has no cleanup.policy"
        ))
    })?;
    if !policy.split(',').any(|p| p.trim() == "compact") {
        return Err(KafkaError::Changelog(format!(
            "changelog topic `{topic}` has cleanup.policy `{policy}`; it must be \
             compacted (cleanup.policy=compact)"
        )));
    }
    Ok(())
}

/// What a restore did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Records applied.
    pub applied: u64,
    /// The new local checkpoint.
    pub checkpoint: i64,
}

/// Client context of a changelog reader (restore or standby): reaching the end of a partition
/// is expected; its statistics feed [`BrokerLoss`].
pub struct ReaderContext {
    brokers: BrokerLoss,
    who: &'static str,
}

impl ClientContext for ReaderContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        super::log_client_error(error, reason, self.who);
    }

    fn stats(&self, s: rdkafka::statistics::Statistics) {
        self.brokers.observe(&s);
    }
}

impl ConsumerContext for ReaderContext {}

/// A read_committed changelog reader outside the consumer group (group id
/// `<group>-<role>`, partitions assigned by hand), with `tuning` on top; `who` names it in
/// its error logs.
pub(crate) fn reader(
    rt: &RuntimeSettings,
    role: &str,
    who: &'static str,
    tuning: &[(&str, &str)],
) -> Result<BaseConsumer<ReaderContext>, KafkaError> {
    let mut c: ClientConfig = super::base_config(rt);
    c.set("group.id", format!("{}-{role}", rt.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", super::STATISTICS_INTERVAL_MS);
    for (k, v) in tuning {
        c.set(*k, *v);
    }
    c.create_with_context(ReaderContext {
        brokers: BrokerLoss::default(),
        who,
    })
    .map_err(|e| KafkaError::client("changelog reader", e))
}

/// Gives a changelog reader its bootstrap servers again if it has lost every broker (see
/// [`BrokerLoss`]).
pub(crate) fn keep_brokers(consumer: &BaseConsumer<ReaderContext>, bootstrap: &str) {
    consumer
        .context()
        .brokers
        .rebootstrap(consumer.client(), bootstrap);
}

/// Reads changelog partitions (a read_committed consumer outside the group).
pub struct Restorer {
    consumer: BaseConsumer<ReaderContext>,
    topic: String,
    bootstrap: String,
}

impl Restorer {
    pub fn new(rt: &RuntimeSettings) -> Result<Self, KafkaError> {
        let consumer = reader(
            rt,
            "restore",
            "changelog reader",
            &[
                ("fetch.max.bytes", "52428800"),
                // The end of a partition is known at once, not after the default 500 ms wait.
                ("fetch.wait.max.ms", "10"),
                // A restore waits for nothing else: retry a failed fetch quickly.
                ("fetch.error.backoff.ms", "20"),
                // See `FETCH_QUEUE_BACKOFF_MS`: a full local queue must not stop fetching
                // for 1 s.
                ("fetch.queue.backoff.ms", super::FETCH_QUEUE_BACKOFF_MS),
                ("max.partition.fetch.bytes", "10485760"),
            ],
        )?;
        Ok(Self {
            consumer,
            topic: rt.changelog_topic.clone(),
            bootstrap: rt.brokers.clone(),
        })
    }

    /// See [`BrokerLoss`].
    fn keep_brokers(&self) {
        keep_brokers(&self.consumer, &self.bootstrap);
    }

    /// Low and high watermarks of a changelog partition. Retries for up to a minute while
    /// the brokers are unavailable (e.g. a leader moving after a broker failure).
    pub fn bounds(&self, partition: i32) -> Result<(i64, i64), KafkaError> {
        let started = Instant::now();
        loop {
            match self
                .consumer
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
            {
                Ok(b) => return Ok(b),
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    tracing::warn!(partition, error = %e, "cannot read the changelog offsets yet (retrying)");
                    self.keep_brokers();
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(KafkaError::Changelog(format!(
                        "cannot read the offsets of {}[{partition}]: {e}",
                        self.topic
                    )))
                }
            }
        }
    }

    /// Applies the partition from `from` to its end onto `store`; `progress` is called after
    /// each applied batch with the records applied so far and the offset reached.
    pub fn restore(
        &self,
        partition: i32,
        from: i64,
        store: &mut RocksStore,
        progress: &mut dyn FnMut(u64, i64),
    ) -> Result<Restored, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from))
            .map_err(|e| KafkaError::Changelog(e.to_string()))?;
        self.consumer
            .assign(&tpl)
            .map_err(|e| KafkaError::Changelog(format!("cannot read the changelog: {e}")))?;
        let store_err = |e| KafkaError::Changelog(format!("applying the changelog: {e}"));
        let mut r = Restored {
            checkpoint: from,
            ..Restored::default()
        };
        // Read, not yet applied.
        let mut batch: Vec<Change> = Vec::new();
        let mut last_progress = Instant::now();
        loop {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    batch.push(Change {
                        key: m.key().unwrap_or(&[]).to_vec(),
                        value: m.payload().map(<[u8]>::to_vec),
                    });
                    r.checkpoint = m.offset() + 1;
                    if batch.len() >= APPLY_BATCH {
                        store
                            .apply_changes(&batch, r.checkpoint)
                            .map_err(store_err)?;
                        r.applied += batch.len() as u64;
                        batch.clear();
                        progress(r.applied, r.checkpoint);
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) if p == partition => break,
                Some(Err(e)) => tracing::warn!(error = %e, partition, "changelog read (retrying)"),
                None => {
                    self.keep_brokers();
                    if last_progress.elapsed() > Duration::from_secs(10) {
                        tracing::warn!(partition, "changelog restore waiting for the brokers");
                        last_progress = Instant::now();
                    }
                }
            }
        }
        if !batch.is_empty() {
            store
                .apply_changes(&batch, r.checkpoint)
                .map_err(store_err)?;
            r.applied += batch.len() as u64;
            progress(r.applied, r.checkpoint);
        }
        store.finish_restore().map_err(store_err)?;
        self.consumer
            .unassign()
            .map_err(|e| KafkaError::Changelog(e.to_string()))?;
        Ok(r)
    }
}
