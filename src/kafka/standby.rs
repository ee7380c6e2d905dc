//! Standby replicas: warm copies of the state of partitions this instance does not own, kept
//! on a thread of their own by tailing their changelog partitions into the local state
//! directory. When such a partition is assigned here (a failover, a scale-down), its task
//! finds local state with a recent checkpoint and replays only the changelog records since
//! (see `pipeline`), instead of the whole partition.
//!
//! Which partitions: the `n` after each partition this instance owns, by number, wrapping
//! around ([`standby_set`]). The consumer group's assignor knows nothing of standbys, so a
//! failed instance's partitions land where a copy is kept only when ownership follows that
//! order; Kafka Streams' assignor places active tasks on their standbys, which a librdkafka
//! client cannot do.
//!
//! A copy is written exactly as a restore writes it: committed changelog records only
//! (read_committed), each batch with the changelog checkpoint it reaches. A task opening it
//! applies the same trust checks as to any local state. The pipeline takes a copy back
//! ([`Standbys::release`], which waits until its database is closed) before it opens the task,
//! and the copy's thread never opens a partition the pipeline owns: the set it is given
//! ([`Standbys::keep`]) leaves them out, and commands are served in order.

use super::changelog::{distrust, keep_brokers, reader, ReaderContext};
use super::KafkaError;
use crate::config::RuntimeSettings;
use crate::metrics::Metrics;
use crate::store::{Change, RocksOptions, RocksStore, StateMemory};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Records applied to a copy in one batch, at most.
const APPLY_BATCH: usize = 10_000;

/// The partitions to keep copies of: the `n` after each of `owned` (out of `partitions`), by
/// number and wrapping around, except those owned.
pub fn standby_set(owned: &[i32], partitions: i32, n: u32) -> Vec<i32> {
    if partitions <= 0 {
        return Vec::new();
    }
    let mut set: Vec<i32> = owned
        .iter()
        .flat_map(|&p| (1..=n.min(partitions as u32) as i32).map(move |k| (p + k) % partitions))
        .filter(|p| !owned.contains(p))
        .collect();
    set.sort_unstable();
    set.dedup();
    set
}

enum Cmd {
    Keep(Vec<i32>),
    Release(i32, Sender<()>),
}

/// The standby thread and the channel to it.
pub struct Standbys {
    tx: Option<Sender<Cmd>>,
    thread: Option<JoinHandle<()>>,
}

impl Standbys {
    /// Starts the thread; copies live in `<state_dir>/<group>/partition-<n>`, like tasks, and
    /// within the same memory budget.
    pub fn start(
        rt: &RuntimeSettings,
        metrics: Arc<Metrics>,
        memory: StateMemory,
    ) -> Result<Self, KafkaError> {
        let consumer = reader(rt, "standby", "standby reader", &[])?;
        let copies = Copies {
            consumer,
            topic: rt.changelog_topic.clone(),
            bootstrap: rt.brokers.clone(),
            dir: rt.state_dir.join(&rt.group),
            held: BTreeMap::new(),
            metrics,
            memory,
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("standbys".into())
            .spawn(move || copies.serve(rx))
            .map_err(|e| KafkaError::Changelog(format!("cannot start a thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Keep copies of exactly `partitions` (none of them owned here).
    pub fn keep(&self, partitions: Vec<i32>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Cmd::Keep(partitions));
        }
    }

    /// Stops keeping a copy of `partition` and returns once its database is closed (at once if
    /// there is none). If the thread has stopped, its copies are closed already.
    pub fn release(&self, partition: i32) {
        let Some(tx) = &self.tx else {
            return;
        };
        let (ack, done) = mpsc::channel();
        if tx.send(Cmd::Release(partition, ack)).is_ok() {
            let _ = done.recv();
        }
    }
}

impl Drop for Standbys {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One copy: its database and the records read but not applied yet.
struct Copy {
    store: RocksStore,
    pending: Vec<Change>,
    /// The changelog offset after the last record read.
    next: i64,
}

struct Copies {
    consumer: BaseConsumer<ReaderContext>,
    topic: String,
    bootstrap: String,
    dir: PathBuf,
    held: BTreeMap<i32, Copy>,
    metrics: Arc<Metrics>,
    memory: StateMemory,
}

impl Copies {
    fn serve(mut self, rx: Receiver<Cmd>) {
        loop {
            // Commands first, in order; block for one while there is nothing to read.
            let cmd = if self.held.is_empty() {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            };
            match cmd {
                Some(Cmd::Keep(set)) => {
                    let drop: Vec<i32> = self
                        .held
                        .keys()
                        .copied()
                        .filter(|p| !set.contains(p))
                        .collect();
                    for p in drop {
                        self.close(p);
                    }
                    for p in set {
                        if !self.held.contains_key(&p) {
                            self.open(p);
                        }
                    }
                    self.metrics.set_standby_partitions(self.held.len() as u64);
                    continue;
                }
                Some(Cmd::Release(p, ack)) => {
                    self.close(p);
                    self.metrics.set_standby_partitions(self.held.len() as u64);
                    let _ = ack.send(());
                    continue;
                }
                None => {}
            }
            if self.held.is_empty() {
                continue;
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let p = m.partition();
                    if let Some(c) = self.held.get_mut(&p) {
                        c.pending.push(Change {
                            key: m.key().unwrap_or(&[]).to_vec(),
                            value: m.payload().map(<[u8]>::to_vec),
                        });
                        c.next = m.offset() + 1;
                        if c.pending.len() >= APPLY_BATCH {
                            self.apply(p);
                        }
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => self.apply(p),
                Some(Err(e)) => tracing::debug!(error = %e, "standby read (retrying)"),
                None => {
                    let parts: Vec<i32> = self.held.keys().copied().collect();
                    for p in parts {
                        self.apply(p);
                    }
                    keep_brokers(&self.consumer, &self.bootstrap);
                }
            }
        }
        let parts: Vec<i32> = self.held.keys().copied().collect();
        for p in parts {
            self.close(p);
        }
    }

    /// Opens the copy of `partition` (rebuilt if it cannot be trusted) and starts reading its
    /// changelog partition from the copy's checkpoint. A failure leaves it out, with a warning.
    fn open(&mut self, partition: i32) {
        if let Err(e) = self.try_open(partition) {
            tracing::warn!(partition, error = %e, "standby copy not kept");
        }
    }

    fn try_open(&mut self, partition: i32) -> Result<(), String> {
        let dir = self.dir.join(format!("partition-{partition}"));
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
            .map_err(|e| format!("cannot read the changelog offsets: {e}"))?;
        let mut store = RocksStore::open(&dir, RocksOptions::copy_within(&self.memory))
            .map_err(|e| e.to_string())?;
        let mut from = store
            .changelog_checkpoint()
            .map_err(|e| e.to_string())?
            .unwrap_or(low);
        if let Some(why) = distrust(&mut store, low, high).map_err(|e| e.to_string())? {
            tracing::info!(partition, why, "standby copy not trusted: rebuilding it");
            drop(store);
            RocksStore::destroy(&dir).map_err(|e| e.to_string())?;
            store = RocksStore::open(&dir, RocksOptions::copy_within(&self.memory))
                .map_err(|e| e.to_string())?;
            from = low;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from))
            .map_err(|e| e.to_string())?;
        self.consumer
            .incremental_assign(&tpl)
            .map_err(|e| format!("cannot read the changelog: {e}"))?;
        tracing::info!(partition, from, to = high, "standby copy kept");
        self.held.insert(
            partition,
            Copy {
                store,
                pending: Vec::new(),
                next: from,
            },
        );
        Ok(())
    }

    /// Applies the records read for `partition`, with the checkpoint they reach.
    fn apply(&mut self, partition: i32) {
        let Some(c) = self.held.get_mut(&partition) else {
            return;
        };
        if c.pending.is_empty() {
            return;
        }
        match c.store.apply_changes(&c.pending, c.next) {
            Ok(()) => {
                c.pending.clear();
                self.metrics.set_standby_checkpoint(partition, c.next);
            }
            Err(e) => {
                // Closed without the records: a task opening it replays them.
                tracing::warn!(partition, error = %e, "standby copy write failed: dropping the copy");
                self.close(partition);
            }
        }
    }

    /// Stops reading `partition` and closes its copy, flushed (the copy skips the write-ahead
    /// log), with the records read so far.
    fn close(&mut self, partition: i32) {
        let Some(mut c) = self.held.remove(&partition) else {
            return;
        };
        if !c.pending.is_empty() {
            if let Err(e) = c.store.apply_changes(&c.pending, c.next) {
                // Closed without them: a task opening the copy replays them.
                tracing::warn!(partition, error = %e, "standby copy write failed");
            }
        }
        if let Err(e) = c.store.finish_restore() {
            tracing::warn!(partition, error = %e, "flushing a standby copy failed");
        }
        drop(c);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        if let Err(e) = self.consumer.incremental_unassign(&tpl) {
            tracing::warn!(partition, error = %e, "cannot stop reading a standby copy's changelog");
        }
        self.metrics.forget_standby(partition);
        tracing::info!(partition, "standby copy released");
    }
}

#[cfg(test)]
mod tests {
    use super::standby_set;

    #[test]
    fn the_next_partitions_wrapping_around_except_owned_ones() {
        assert_eq!(standby_set(&[0], 6, 1), vec![1]);
        assert_eq!(standby_set(&[5], 6, 2), vec![0, 1]);
        assert_eq!(standby_set(&[0, 1], 6, 1), vec![2]);
        assert_eq!(standby_set(&[0, 3], 6, 1), vec![1, 4]);
        assert_eq!(standby_set(&[0, 1, 2], 3, 1), Vec::<i32>::new());
    }

    #[test]
    fn none_without_partitions_or_replicas() {
        assert_eq!(standby_set(&[], 6, 2), Vec::<i32>::new());
        assert_eq!(standby_set(&[2], 6, 0), Vec::<i32>::new());
        assert_eq!(standby_set(&[0], 2, 5), vec![1]);
    }
}
