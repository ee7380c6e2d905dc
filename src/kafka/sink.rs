//! Where the pipeline's outputs go: to the producer at once (at-least-once), or into the
//! [`Batch`] of the current commit interval (exactly-once), which the state committer
//! produces inside that interval's transaction, so the consumer thread never waits for a
//! transaction. Every output is counted in `sessionizer_records_out_total` here.
//!
//! At-least-once, the consumer thread does not queue the records on the producer itself (in a
//! profile that took 18 % of its time, BENCHMARKS.md, tenth session): it counts each one in
//! the producer's current epoch ([`Outputs::reserve`]) and collects them in small batches,
//! which a thread of their own ("output queue") queues on the producer in order. A batch goes
//! to that thread once it holds [`HAND_OVER_RECORDS`] records or its first record is
//! [`HAND_OVER_AFTER`] old ([`Sink::hand_over_due`]), when a poll finds no record, and
//! before the producer's epoch is sealed ([`Sink::seal`], at every commit): so every record
//! of an epoch is on its way before anything waits for the epoch's acknowledgement. A record counts
//! in its epoch from the moment it is reserved, so an epoch is acknowledged only once every
//! record of it is delivered: the at-least-once invariant of [`super::output`] holds as when
//! the consumer thread queued them. The channel to the thread is bounded: when the producer's
//! queue is full, the thread waits, and then so does the consumer thread.

use super::output::{OutputRecord, Outputs, ReservedSender};
use super::KafkaError;
use crate::config::RuntimeSettings;
use crate::metrics::{Metrics, OutputKind};
use rdkafka::message::OwnedHeaders;
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// At-least-once: a batch of this many records goes to the output thread at once.
pub const HAND_OVER_RECORDS: usize = 256;

/// At-least-once: a batch goes to the output thread once its first record is this old.
pub const HAND_OVER_AFTER: Duration = Duration::from_millis(1);

/// Batches waiting for the output thread; one more makes the consumer thread wait.
const QUEUED_BATCHES: usize = 2;

/// The output topics, indexed by [`OutputKind::index`].
pub type OutputTopics = [String; OutputKind::ALL.len()];

/// The output topic names of the settings, in [`OutputKind::ALL`] order.
pub fn output_topics(rt: &RuntimeSettings) -> OutputTopics {
    OutputKind::ALL.map(|k| {
        match k {
            OutputKind::Annotated => &rt.annotated_topic,
            OutputKind::Sessions => &rt.sessions_topic,
            OutputKind::Late => &rt.late_topic,
            OutputKind::DeadLetters => &rt.dlq_topic,
            OutputKind::Stats => &rt.stats_topic,
        }
        .clone()
    })
}

/// One buffered record: ranges into the batch's bytes.
struct Held {
    kind: OutputKind,
    /// At-least-once: its delivery opaque (see [`Outputs::reserve`]).
    opaque: usize,
    key: Option<Range<usize>>,
    /// `None`: a null value (a tombstone's dead letter).
    payload: Option<Range<usize>>,
    timestamp: Option<i64>,
    headers: Option<OwnedHeaders>,
}

/// How many emptied batches a [`Sink`] keeps for reuse: one per staged commit in flight, and
/// the one being filled.
const SPARE_BATCHES: usize = crate::pipeline::MAX_PENDING_COMMITS + 1;

/// A spare batch buffer of up to this many bytes is always reused (see
/// [`Batch::reuse_or_size_like`]).
const KEEP_BYTES: usize = 16 << 20;

/// Emptied batches' buffers, returned by [`Batch`]'s drop (on the state committer's thread,
/// once produced) for the next interval: a fresh multi-megabyte buffer every interval cost
/// the consumer thread a page fault per 4 KiB it filled.
type Spares = Arc<Mutex<Vec<Batch>>>;

/// Output records kept in memory, in order: keys and payloads in one buffer.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    records: Vec<Held>,
    /// Where its buffers go when it is dropped, if anywhere.
    spares: Option<Spares>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        let Some(spares) = self.spares.take() else {
            return;
        };
        let Ok(mut spares_now) = spares.lock() else {
            return;
        };
        if spares_now.len() < SPARE_BATCHES {
            self.clear();
            spares_now.push(Batch {
                bytes: std::mem::take(&mut self.bytes),
                records: std::mem::take(&mut self.records),
                spares: None,
            });
        }
    }
}

impl Batch {
    /// An empty batch, from `spares` if one is there (else with room for one like `other`),
    /// which returns to `spares` when dropped. A spare more than twice the size `other` needed
    /// (and over [`KEEP_BYTES`]) is freed instead, so a burst does not hold memory for good.
    fn reuse_or_size_like(spares: &Spares, other: &Batch) -> Self {
        let limit = (2 * other.bytes.len()).max(KEEP_BYTES);
        let spare = spares
            .lock()
            .ok()
            .and_then(|mut s| s.pop())
            .filter(|b| b.bytes.capacity() <= limit);
        let mut b = spare.unwrap_or_else(|| Batch {
            bytes: Vec::with_capacity(other.bytes.len()),
            records: Vec::with_capacity(other.records.len()),
            spares: None,
        });
        b.spares = Some(Arc::clone(spares));
        b
    }

    /// Appends one record; `opaque` is its delivery opaque when it was reserved in a
    /// producer's epoch ([`Outputs::reserve`], at-least-once), else 0 (exactly-once: the
    /// producer gives it one when the batch is produced).
    pub fn push(
        &mut self,
        kind: OutputKind,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        timestamp: Option<i64>,
        headers: Option<OwnedHeaders>,
        opaque: usize,
    ) {
        let mut put = |b: &[u8]| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(b);
            start..self.bytes.len()
        };
        let key = key.map(&mut put);
        let payload = payload.map(&mut put);
        self.records.push(Held {
            kind,
            opaque,
            key,
            payload,
            timestamp,
            headers,
        });
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.records.clear();
    }

    /// Queues every record on `outputs`, in order.
    pub fn produce(self, outputs: &Outputs, topics: &OutputTopics) -> Result<(), KafkaError> {
        self.drain(topics, |r, _| {
            outputs.send(r.topic, r.key, r.payload, r.timestamp, r.headers)
        })
    }

    /// Queues every reserved record on `sender`, in order (the output thread's work).
    fn produce_reserved(self, sender: &ReservedSender, topics: &OutputTopics) {
        let Ok(()) = self.drain(topics, |r, opaque| {
            sender.send(r, opaque);
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Hands every record, with its delivery opaque, to `send`, in order, until it fails;
    /// the batch goes back to its spares when dropped.
    fn drain<E>(
        mut self,
        topics: &OutputTopics,
        mut send: impl FnMut(OutputRecord<'_>, usize) -> Result<(), E>,
    ) -> Result<(), E> {
        let Batch { bytes, records, .. } = &mut self;
        for r in records.drain(..) {
            let out = OutputRecord {
                topic: &topics[r.kind.index()],
                key: r.key.map(|k| &bytes[k]),
                payload: r.payload.map(|p| &bytes[p]),
                timestamp: r.timestamp,
                headers: r.headers,
            };
            send(out, r.opaque)?;
        }
        Ok(())
    }
}

/// At-least-once: the producer, the batch being filled, and the output thread.
struct Direct {
    outputs: Outputs,
    batch: Batch,
    /// When the pipeline first saw the batch non-empty ([`Sink::hand_over_due`]).
    since: Option<Instant>,
    spares: Spares,
    /// Dropped with the sink: the thread then queues what it was given and ends (it is not
    /// waited for, so a producer stuck on unreachable brokers cannot hold up the exit).
    to_thread: SyncSender<Batch>,
}

impl Direct {
    fn hand_over(&mut self) -> Result<(), KafkaError> {
        self.since = None;
        if self.batch.is_empty() {
            return Ok(());
        }
        let next = Batch::reuse_or_size_like(&self.spares, &self.batch);
        let full = std::mem::replace(&mut self.batch, next);
        self.to_thread
            .send(full)
            .map_err(|_| KafkaError::Produce("the output queue thread has stopped".into()))
    }
}

fn output_thread(rx: Receiver<Batch>, sender: ReservedSender, topics: OutputTopics) {
    for batch in rx {
        batch.produce_reserved(&sender, &topics);
    }
}

enum To {
    Direct(Box<Direct>),
    Buffered(Batch, Spares),
}

/// The pipeline's output side.
pub struct Sink {
    metrics: Arc<Metrics>,
    to: To,
}

impl Sink {
    /// At-least-once: records go to `outputs` at once (through the output thread, see the
    /// module docs).
    pub fn direct(
        rt: &RuntimeSettings,
        metrics: Arc<Metrics>,
        outputs: Outputs,
    ) -> Result<Self, KafkaError> {
        let topics = output_topics(rt);
        let (tx, rx) = sync_channel(QUEUED_BATCHES);
        let sender = outputs.reserved_sender();
        std::thread::Builder::new()
            .name("output queue".into())
            .spawn(move || output_thread(rx, sender, topics))
            .map_err(|e| KafkaError::Produce(format!("cannot start the output thread: {e}")))?;
        let spares = Spares::default();
        Ok(Sink {
            metrics,
            to: To::Direct(Box::new(Direct {
                outputs,
                batch: Batch::reuse_or_size_like(&spares, &Batch::default()),
                since: None,
                spares,
                to_thread: tx,
            })),
        })
    }

    /// Exactly-once: records wait in a batch (see [`Sink::take_batch`]).
    pub fn buffered(metrics: Arc<Metrics>) -> Self {
        Sink {
            metrics,
            to: To::Buffered(Batch::default(), Spares::default()),
        }
    }

    pub fn send(
        &mut self,
        kind: OutputKind,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        timestamp: Option<i64>,
        headers: Option<OwnedHeaders>,
    ) -> Result<(), KafkaError> {
        match &mut self.to {
            To::Direct(d) => {
                let opaque = d.outputs.reserve();
                d.batch.push(kind, key, payload, timestamp, headers, opaque);
                if d.batch.len() >= HAND_OVER_RECORDS {
                    d.hand_over()?;
                }
            }
            To::Buffered(b, _) => b.push(kind, key, payload, timestamp, headers, 0),
        }
        self.metrics.record_out(kind);
        Ok(())
    }

    /// At-least-once: hands the records collected so far to the output thread if the
    /// pipeline first saw them [`HAND_OVER_AFTER`] ago (it calls this with the time of each
    /// record it takes; a poll that finds none calls [`Self::hand_over`]).
    pub fn hand_over_due(&mut self, now: Instant) -> Result<(), KafkaError> {
        let To::Direct(d) = &mut self.to else {
            return Ok(());
        };
        if d.batch.is_empty() {
            return Ok(());
        }
        match d.since {
            Some(since) if now.saturating_duration_since(since) >= HAND_OVER_AFTER => d.hand_over(),
            Some(_) => Ok(()),
            None => {
                d.since = Some(now);
                Ok(())
            }
        }
    }

    /// Whether records wait here for the output thread.
    pub fn collecting(&self) -> bool {
        matches!(&self.to, To::Direct(d) if !d.batch.is_empty())
    }

    /// At-least-once: hands the records collected so far to the output thread (the
    /// pipeline calls this when a poll found no record).
    pub fn hand_over(&mut self) -> Result<(), KafkaError> {
        match &mut self.to {
            To::Direct(d) => d.hand_over(),
            To::Buffered(..) => Ok(()),
        }
    }

    /// Ends the producer's current epoch ([`Outputs::seal`]) once every record of it is
    /// with the output thread, so that waiting for its acknowledgement cannot wait for a
    /// record still collected here; 0 without a producer.
    pub fn seal(&mut self) -> Result<u64, KafkaError> {
        match &mut self.to {
            To::Direct(d) => {
                d.hand_over()?;
                Ok(d.outputs.seal())
            }
            To::Buffered(..) => Ok(0),
        }
    }

    /// The producer, when records go to it at once.
    pub fn outputs(&mut self) -> Option<&mut Outputs> {
        match &mut self.to {
            To::Direct(d) => Some(&mut d.outputs),
            To::Buffered(..) => None,
        }
    }

    /// Bytes of the records buffered since the last [`Self::take_batch`] (0 when they go
    /// straight to a producer).
    pub fn buffered_bytes(&self) -> usize {
        match &self.to {
            To::Direct(_) => 0,
            To::Buffered(b, _) => b.bytes.len(),
        }
    }

    /// The records buffered since the last call (none when they go straight to a producer).
    pub fn take_batch(&mut self) -> Batch {
        match &mut self.to {
            To::Direct(_) => Batch::default(),
            To::Buffered(b, spares) => {
                let next = Batch::reuse_or_size_like(spares, b);
                std::mem::replace(b, next)
            }
        }
    }

    /// Drops the buffered records: their interval will be processed again.
    pub fn discard(&mut self) {
        if let To::Buffered(b, _) = &mut self.to {
            b.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;

    /// At-least-once, through the output thread to a producer whose brokers never answer: a
    /// record counts in its epoch from the moment it is sent to the sink, and the epoch is
    /// acknowledged only once the producer has reported every record (here: as failed).
    #[test]
    fn reserved_records_hold_their_epoch_until_the_producer_reports_them() {
        let rt = crate::config::validate(&Default::default())
            .unwrap()
            .runtime;
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", "127.0.0.1:1")
            .set("message.timeout.ms", "2000");
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut sink = Sink::direct(&rt, metrics, Outputs::new(&cfg).unwrap()).unwrap();
        let send = |sink: &mut Sink, n: usize| {
            for i in 0..n {
                sink.send(
                    OutputKind::Annotated,
                    Some(b"u"),
                    Some(b"{}"),
                    Some(i as i64),
                    None,
                )
                .unwrap();
            }
        };
        send(&mut sink, 10);
        let t0 = Instant::now();
        sink.hand_over_due(t0).unwrap();
        assert!(sink.collecting(), "kept until HAND_OVER_AFTER has passed");
        sink.hand_over_due(t0 + HAND_OVER_AFTER).unwrap();
        assert!(
            !sink.collecting(),
            "handed over once HAND_OVER_AFTER has passed"
        );
        send(&mut sink, HAND_OVER_RECORDS);
        assert!(!sink.collecting(), "a full batch is handed over at once");
        send(&mut sink, 3);
        let epoch = sink.seal().unwrap();
        assert!(!sink.collecting(), "sealing hands over the rest");
        let o = sink.outputs().unwrap();
        assert!(!o.acknowledged(epoch), "nothing can have been delivered");
        o.wait_acknowledged(epoch, Some(Duration::from_secs(30)));
        assert!(
            o.acknowledged(epoch),
            "every record reported by the producer"
        );
        let e = o.check_failures().unwrap_err().to_string();
        let n = 10 + HAND_OVER_RECORDS + 3;
        assert!(e.contains(&format!("{n} output record(s)")), "{e}");
    }

    #[test]
    fn a_dropped_batch_is_reused_empty_with_its_capacity() {
        let spares = Spares::default();
        let mut b = Batch::reuse_or_size_like(&spares, &Batch::default());
        for i in 0..1000u32 {
            b.push(
                OutputKind::Annotated,
                Some(b"user"),
                Some(&i.to_le_bytes().repeat(64)),
                Some(1),
                None,
                0,
            );
        }
        let (bytes, records) = (b.bytes.capacity(), b.records.capacity());
        drop(b);
        assert_eq!(spares.lock().unwrap().len(), 1);
        let again = Batch::reuse_or_size_like(&spares, &Batch::default());
        assert!(again.is_empty() && again.bytes.is_empty());
        assert_eq!(again.bytes.capacity(), bytes);
        assert_eq!(again.records.capacity(), records);
        assert!(spares.lock().unwrap().is_empty());
    }

    #[test]
    fn a_spare_far_larger_than_needed_is_freed() {
        let spares = Spares::default();
        let mut big = Batch::reuse_or_size_like(&spares, &Batch::default());
        big.push(
            OutputKind::Annotated,
            None,
            Some(&vec![0; 3 * KEEP_BYTES]),
            None,
            None,
            0,
        );
        drop(big);
        assert_eq!(spares.lock().unwrap().len(), 1);
        let next = Batch::reuse_or_size_like(&spares, &Batch::default());
        assert!(next.bytes.capacity() < KEEP_BYTES);
        assert!(spares.lock().unwrap().is_empty());
    }

    #[test]
    fn spares_are_bounded_and_batches_without_a_pool_are_not_kept() {
        let spares = Spares::default();
        let batches: Vec<Batch> = (0..SPARE_BATCHES + 3)
            .map(|_| Batch::reuse_or_size_like(&spares, &Batch::default()))
            .collect();
        drop(batches);
        assert_eq!(spares.lock().unwrap().len(), SPARE_BATCHES);
        drop(Batch::default());
        assert_eq!(spares.lock().unwrap().len(), SPARE_BATCHES);
    }
}
