//! The output side: one idempotent producer for every output topic, with delivery tracking.
//!
//! Delivery invariant (at-least-once): [`Outputs::flush`] returns `Ok` only when every record
//! sent before it has been acknowledged by the brokers (acks=all). The pipeline commits state and
//! input offsets only after a successful flush, so nothing is lost; after a crash the records
//! since the last commit are produced again, identical (the engine is deterministic).

use super::KafkaError;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct DeliveryState {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// Producer context counting failed deliveries.
pub struct DeliveryContext {
    state: Arc<DeliveryState>,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.state.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = self.state.first_error.lock() {
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// The producer of all outputs.
pub struct Outputs {
    producer: ThreadedProducer<DeliveryContext>,
    state: Arc<DeliveryState>,
}

impl Outputs {
    pub fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        let state = Arc::new(DeliveryState::default());
        let producer = config
            .create_with_context(DeliveryContext {
                state: state.clone(),
            })
            .map_err(|source| KafkaError::Client {
                what: "producer",
                source,
            })?;
        Ok(Outputs { producer, state })
    }

    /// Queues one record; waits while the local queue is full.
    pub fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        timestamp: Option<i64>,
        headers: Option<OwnedHeaders>,
    ) -> Result<(), KafkaError> {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(payload);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(ts) = timestamp {
            rec = rec.timestamp(ts);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => return Err(KafkaError::Produce(e.to_string())),
            }
        }
    }

    /// Waits until every queued record is acknowledged. Keeps waiting while the brokers are
    /// unreachable (librdkafka retries until `message.timeout.ms`); fails if any delivery
    /// failed for good.
    pub fn flush(&self) -> Result<(), KafkaError> {
        // Not `Producer::flush`: with a threaded producer it polls in steps of up to 100 ms
        // while the background thread consumes the delivery reports, so it stalls the
        // pipeline for ~100 ms per commit. The background thread serves the reports; waiting
        // for the in-flight count to reach zero is enough.
        let started = Instant::now();
        let mut warned = false;
        while self.producer.in_flight_count() > 0 {
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
}
