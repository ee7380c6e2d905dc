//! The streaming pipeline: a Kafka consumer group feeding one engine task per input partition
//! number, each with its own RocksDB state, and every output produced to Kafka.
//!
//! Delivery invariant (at-least-once): every `commit_interval` the pipeline moves time on in
//! every task, waits until every output produced so far is acknowledged by the brokers, then
//! writes each task's state together with its next input offsets in one RocksDB write batch,
//! and only then commits the offsets to Kafka (for lag monitoring; the RocksDB offsets are the
//! truth). Records below a task's stored offsets are skipped on redelivery. After a crash the
//! tasks resume from their last commit and produce the outputs since then again, identically,
//! because the engine is deterministic. A rebalance that revokes partitions commits them first.

use crate::codec::records::{annotate, record_json, stats_json};
use crate::codec::Decoder;
use crate::config::{RuntimeSettings, Settings};
use crate::engine::{
    AnnotateMode, Counters, Disposition, Engine, Output, SourceOffset, StateStore, StoreError,
};
use crate::kafka::output::Outputs;
use crate::kafka::{self, KafkaError};
use crate::metrics::{DeadLetterReason, Metrics, Outcome, OutputKind, RebalanceKind, TopicMetrics};
use crate::store::{RocksOptions, RocksStore};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::BTreeMap;
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
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One task: the engine of one partition number (of every co-partitioned input topic).
struct Task {
    partition: i32,
    engine: Engine<RocksStore>,
    /// Next offset to process, per input topic (by index); `None` until known.
    next: Vec<Option<i64>>,
    /// Reached the end of the partition and nothing arrived since.
    caught_up: bool,
    reported: Counters,
}

/// Everything the consumer loop and the rebalance callback share.
struct Core {
    rt: RuntimeSettings,
    settings: Settings,
    decoder: Decoder,
    outputs: Outputs,
    metrics: Arc<Metrics>,
    topic_metrics: Vec<TopicMetrics>,
    tasks: BTreeMap<i32, Task>,
    out: Vec<Output>,
    buf: Vec<u8>,
    held: Vec<u8>,
}

fn header(h: OwnedHeaders, key: &str, value: &str) -> OwnedHeaders {
    h.insert(Header {
        key,
        value: Some(value.as_bytes()),
    })
}

impl Core {
    fn state_dir(&self, partition: i32) -> PathBuf {
        self.rt
            .state_dir
            .join(&self.rt.group)
            .join(format!("partition-{partition}"))
    }

    fn task(&mut self, partition: i32) -> Result<&mut Task, PipelineError> {
        if !self.tasks.contains_key(&partition) {
            let dir = self.state_dir(partition);
            let store = RocksStore::open(&dir, RocksOptions::default())
                .map_err(|source| PipelineError::Store { partition, source })?;
            let mut engine = Engine::open(self.settings.engine.clone(), store)
                .map_err(|source| PipelineError::Store { partition, source })?;
            let stored = engine
                .store_mut()
                .committed_offsets()
                .map_err(|source| PipelineError::Store { partition, source })?;
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
                    reported: Counters::default(),
                },
            );
        }
        self.tasks
            .get_mut(&partition)
            .ok_or(PipelineError::Poisoned)
    }

    fn handle(&mut self, m: &BorrowedMessage<'_>) -> Result<(), PipelineError> {
        let Some(ti) = self.rt.input_topics.iter().position(|t| t == m.topic()) else {
            return Ok(());
        };
        let partition = m.partition();
        let offset = m.offset();
        let task = self.task(partition)?;
        if task.next[ti].is_some_and(|n| offset < n) {
            return Ok(()); // already reflected in the committed state
        }
        task.next[ti] = Some(offset + 1);
        task.caught_up = false;
        let now = wall_ms();
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
        let on_close = self.settings.engine.annotate == AnnotateMode::OnClose;
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
        let task = self
            .tasks
            .get_mut(&partition)
            .ok_or(PipelineError::Poisoned)?;
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
                self.outputs.send(
                    &self.rt.annotated_topic,
                    Some(d.user.as_bytes()),
                    &self.buf,
                    Some(d.time),
                    None,
                )?;
                self.metrics.record_out(OutputKind::Annotated);
                if let Some(ts) = record_ts {
                    self.metrics
                        .observe_processing_latency(Duration::from_millis(
                            (wall_ms() - ts).max(0) as u64
                        ));
                }
            }
            Disposition::Held => self.topic_metrics[ti].event(Outcome::Accepted),
            Disposition::Late(reason) => {
                self.topic_metrics[ti].event(Outcome::Late(reason));
                let h = header(OwnedHeaders::new(), "sessionizer.reason", reason.as_str());
                let h = header(h, "sessionizer.watermark", &watermark.to_string());
                let h = source_headers(h, m);
                self.outputs
                    .send(&self.rt.late_topic, key, payload, record_ts, Some(h))?;
                self.metrics.record_out(OutputKind::Late);
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
        self.outputs.send(
            &self.rt.dlq_topic,
            m.key(),
            m.payload().unwrap_or(&[]),
            m.timestamp().to_millis(),
            Some(h),
        )?;
        self.metrics.record_out(OutputKind::DeadLetters);
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
                    self.outputs.send(
                        &self.rt.annotated_topic,
                        Some(user),
                        &self.buf,
                        Some(*time),
                        None,
                    )?;
                    self.metrics.record_out(OutputKind::Annotated);
                }
                Output::Session(s) => {
                    if let Some(j) = record_json(&self.decoder, o) {
                        self.outputs.send(
                            &self.rt.sessions_topic,
                            Some(s.user.as_bytes()),
                            &j,
                            Some(s.end),
                            None,
                        )?;
                        self.metrics.record_out(OutputKind::Sessions);
                    }
                    let j = stats_json(&s.user, &s.stats);
                    self.outputs.send(
                        &self.rt.stats_topic,
                        Some(s.user.as_bytes()),
                        &j,
                        Some(s.end),
                        None,
                    )?;
                    self.metrics.record_out(OutputKind::Stats);
                    self.metrics.session_concluded(s);
                }
                Output::Merge { user, at, .. } | Output::Split { user, at, .. } => {
                    if let Some(j) = record_json(&self.decoder, o) {
                        self.outputs.send(
                            &self.rt.sessions_topic,
                            Some(user.as_bytes()),
                            &j,
                            Some(*at),
                            None,
                        )?;
                        self.metrics.record_out(OutputKind::Sessions);
                    }
                }
            }
        }
        Ok(())
    }

    fn caught_up(&mut self, partition: i32) {
        if let Some(t) = self.tasks.get_mut(&partition) {
            t.caught_up = true;
        }
    }

    /// Moves time on in every task, then commits everything (see the module docs).
    fn tick(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), PipelineError> {
        let now = wall_ms();
        let parts: Vec<i32> = self.tasks.keys().copied().collect();
        for p in parts {
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            if let Some(t) = self.tasks.get_mut(&p) {
                t.engine
                    .advance(now, t.caught_up, &mut out)
                    .map_err(|source| PipelineError::Store {
                        partition: p,
                        source,
                    })?;
            }
            let r = self.emit(&out);
            self.out = out;
            r?;
        }
        self.commit(consumer, None)
    }

    /// Flushes the outputs, then commits the state + offsets of the tasks (all, or `only`).
    fn commit(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        only: Option<&[i32]>,
    ) -> Result<(), PipelineError> {
        self.outputs.flush()?;
        let started = Instant::now();
        let mut tpl = TopicPartitionList::new();
        let now = wall_ms();
        for t in self.tasks.values_mut() {
            if only.is_some_and(|o| !o.contains(&t.partition)) {
                continue;
            }
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
            for topic in &self.rt.input_topics {
                self.metrics
                    .set_watermark(topic, t.partition, t.engine.watermark(), now);
            }
            self.metrics
                .set_state_size(t.partition, t.engine.store().approx_size_bytes());
        }
        self.metrics.observe_commit(started.elapsed());
        if tpl.count() > 0 {
            consumer
                .commit(&tpl, CommitMode::Async)
                .map_err(KafkaError::Commit)?;
        }
        Ok(())
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
}

impl Ctx {
    fn lock(&self) -> Option<MutexGuard<'_, Option<Core>>> {
        self.core.lock().ok()
    }
}

impl ClientContext for Ctx {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        match error {
            // Reaching the end of a partition is how we learn it is caught up, not an error.
            rdkafka::error::KafkaError::PartitionEOF(_)
            | rdkafka::error::KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF) => {
            }
            e => tracing::warn!(error = %e, reason, "kafka client error (retrying)"),
        }
    }

    fn stats(&self, s: Statistics) {
        for (topic, t) in &s.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    self.metrics.set_consumer_lag(topic, *p, part.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = r {
            self.metrics.rebalance(RebalanceKind::Revoked);
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(partitions = ?parts, "partitions revoked: committing");
            if let Some(mut g) = self.lock() {
                if let Some(core) = g.as_mut() {
                    if let Err(e) = core.commit(consumer, Some(&parts)) {
                        tracing::error!(error = %e, "commit on revocation failed");
                        if let Ok(mut f) = self.failure.lock() {
                            f.get_or_insert_with(|| e.to_string());
                        }
                    }
                    for p in &parts {
                        core.tasks.remove(p);
                        let topics: Vec<&str> =
                            core.rt.input_topics.iter().map(|s| s.as_str()).collect();
                        self.metrics.forget_partition(&topics, *p);
                    }
                }
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = r {
            self.metrics.rebalance(RebalanceKind::Assigned);
            let parts: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(partitions = ?parts, "partitions assigned");
            // Open the tasks now, not on their first record: a partition with nothing left to
            // read must still move time on and conclude the sessions in its state.
            if let Some(mut g) = self.lock() {
                if let Some(core) = g.as_mut() {
                    for (_, p) in &parts {
                        if let Err(e) = core.task(*p) {
                            tracing::error!(partition = p, error = %e, "cannot open the task");
                            if let Ok(mut f) = self.failure.lock() {
                                f.get_or_insert_with(|| e.to_string());
                            }
                        }
                    }
                }
            }
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
    let ctx = Ctx {
        core: core.clone(),
        metrics: metrics.clone(),
        failure: failure.clone(),
    };
    let consumer: BaseConsumer<Ctx> = kafka::consumer_config(&rt)
        .create_with_context(ctx)
        .map_err(|source| KafkaError::Client {
            what: "consumer",
            source,
        })?;
    let partitions = kafka::check_topics(&consumer, &rt, Duration::from_secs(15))?;
    tracing::info!(
        brokers = %rt.brokers,
        group = %rt.group,
        inputs = ?rt.input_topics,
        partitions,
        "topics checked"
    );
    let outputs = Outputs::new(&kafka::producer_config(&rt))?;
    let decoder = Decoder::new(settings.decode.clone());
    let topic_metrics = rt.input_topics.iter().map(|t| metrics.topic(t)).collect();
    *core.lock().map_err(|_| PipelineError::Poisoned)? = Some(Core {
        rt: rt.clone(),
        settings,
        decoder,
        outputs,
        metrics: metrics.clone(),
        topic_metrics,
        tasks: BTreeMap::new(),
        out: Vec::new(),
        buf: Vec::new(),
        held: Vec::new(),
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
    while !shutdown.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => with_core(&mut |c| c.handle(&m))?,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => with_core(&mut |c| {
                c.caught_up(p);
                Ok(())
            })?,
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error (retrying)"),
            None => {}
        }
        if let Some(f) = failure.lock().ok().and_then(|f| f.clone()) {
            return Err(PipelineError::Rebalance(f));
        }
        if last_tick.elapsed() >= rt.commit_interval {
            with_core(&mut |c| c.tick(&consumer))?;
            last_tick = Instant::now();
        }
    }
    tracing::info!("shutting down: finishing the batch and committing");
    health.set_ready(false, "shutting down");
    with_core(&mut |c| c.tick(&consumer))?;
    drop(consumer);
    Ok(())
}
