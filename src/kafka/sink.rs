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
use std::sync::Arc;

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

/// Output records kept in memory, in order: keys and payloads in one buffer.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    records: Vec<Held>,
}

impl Batch {
    /// An empty batch with room for one like `other`.
    pub fn sized_like(other: &Batch) -> Self {
        Batch {
            bytes: Vec::with_capacity(other.bytes.len()),
            records: Vec::with_capacity(other.records.len()),
        }
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
    pub fn produce(self, outputs: &Outputs, topics: &OutputTopics) -> Result<(), KafkaError> {
        let Batch { bytes, records } = self;
        for r in records {
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
    Buffered(Batch),
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
            to: To::Buffered(Batch::default()),
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
            To::Buffered(b) => b.push(kind, key, payload, timestamp, headers),
        }
        self.metrics.record_out(kind);
        Ok(())
    }

    /// The producer, when records go straight to it.
    pub fn outputs(&mut self) -> Option<&mut Outputs> {
        match &mut self.to {
            To::Direct(o) => Some(o),
            To::Buffered(_) => None,
        }
    }

    /// The records buffered since the last call (none when they go straight to a producer).
    pub fn take_batch(&mut self) -> Batch {
        match &mut self.to {
            To::Direct(_) => Batch::default(),
            To::Buffered(b) => {
                let next = Batch::sized_like(b);
                std::mem::replace(b, next)
            }
        }
    }

    /// Drops the buffered records: their interval will be processed again.
    pub fn discard(&mut self) {
        if let To::Buffered(b) = &mut self.to {
            b.clear();
        }
    }
}
