//! Where the pipeline's outputs go: straight to a producer (at-least-once), or into the
//! [`Batch`] of the current commit interval (exactly-once), which the state committer
//! produces inside that interval's transaction, so the consumer thread never waits for a
//! transaction. Every output is counted in `sessionizer_records_out_total` here.

use super::output::Outputs;
use super::KafkaError;
use crate::config::RuntimeSettings;
use crate::metrics::{Metrics, OutputKind};
use rdkafka::message::OwnedHeaders;
use std::ops::Range;
use std::sync::{Arc, Mutex};

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
    key: Option<Range<usize>>,
    payload: Range<usize>,
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

    pub fn push(
        &mut self,
        kind: OutputKind,
        key: Option<&[u8]>,
        payload: &[u8],
        timestamp: Option<i64>,
        headers: Option<OwnedHeaders>,
    ) {
        let mut put = |b: &[u8]| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(b);
            start..self.bytes.len()
        };
        let key = key.map(&mut put);
        let payload = put(payload);
        self.records.push(Held {
            kind,
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
    pub fn produce(mut self, outputs: &Outputs, topics: &OutputTopics) -> Result<(), KafkaError> {
        let bytes = &self.bytes;
        for r in self.records.drain(..) {
            outputs.send(
                &topics[r.kind.index()],
                r.key.map(|k| &bytes[k]),
                &bytes[r.payload],
                r.timestamp,
                r.headers,
            )?;
        }
        Ok(())
    }
}

enum To {
    Direct(Outputs),
    Buffered(Batch, Spares),
}

/// The pipeline's output side.
pub struct Sink {
    topics: OutputTopics,
    metrics: Arc<Metrics>,
    to: To,
}

impl Sink {
    /// At-least-once: records go to `outputs` at once.
    pub fn direct(rt: &RuntimeSettings, metrics: Arc<Metrics>, outputs: Outputs) -> Self {
        Sink {
            topics: output_topics(rt),
            metrics,
            to: To::Direct(outputs),
        }
    }

    /// Exactly-once: records wait in a batch (see [`Sink::take_batch`]).
    pub fn buffered(rt: &RuntimeSettings, metrics: Arc<Metrics>) -> Self {
        Sink {
            topics: output_topics(rt),
            metrics,
            to: To::Buffered(Batch::default(), Spares::default()),
        }
    }

    pub fn send(
        &mut self,
        kind: OutputKind,
        key: Option<&[u8]>,
        payload: &[u8],
        timestamp: Option<i64>,
        headers: Option<OwnedHeaders>,
    ) -> Result<(), KafkaError> {
        match &mut self.to {
            To::Direct(o) => {
                o.send(&self.topics[kind.index()], key, payload, timestamp, headers)?
            }
            To::Buffered(b, _) => b.push(kind, key, payload, timestamp, headers),
        }
        self.metrics.record_out(kind);
        Ok(())
    }

    /// The producer, when records go straight to it.
    pub fn outputs(&mut self) -> Option<&mut Outputs> {
        match &mut self.to {
            To::Direct(o) => Some(o),
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

    #[test]
    fn a_dropped_batch_is_reused_empty_with_its_capacity() {
        let spares = Spares::default();
        let mut b = Batch::reuse_or_size_like(&spares, &Batch::default());
        for i in 0..1000u32 {
            b.push(
                OutputKind::Annotated,
                Some(b"user"),
                &i.to_le_bytes().repeat(64),
                Some(1),
                None,
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
            &vec![0; 3 * KEEP_BYTES],
            None,
            None,
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
