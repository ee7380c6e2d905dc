//! The record path: one input record through its task's engine to the annotated, late or
//! dead-letter output, and the engine's outputs (released events, concluded sessions with
//! their user stats, merges, splits) encoded and handed to the sink.

use super::{wall_ms, Core, PipelineError};
use crate::codec::records::{annotate, record_json, stats_json};
use crate::engine::{AnnotateMode, Disposition, Output};
use crate::kafka::limits::{dead_letter_fit, Sizes, HEADER_ALLOWANCE};
use crate::metrics::{DeadLetterReason, Outcome, OutputKind};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use std::time::Duration;

impl Core {
    /// Handles one input record; `now` is the wall-clock time in ms.
    pub(super) fn handle(
        &mut self,
        m: &BorrowedMessage<'_>,
        now: i64,
    ) -> Result<(), PipelineError> {
        let Some(ti) = self.rt.input_topics.iter().position(|t| t == m.topic()) else {
            return Ok(());
        };
        let partition = m.partition();
        let offset = m.offset();
        // Tasks open on assignment, before their partitions are fetched: a record without a
        // task is a leftover of a revoked partition, which now belongs to another instance.
        let Some(task) = self.tasks.get_mut(&partition) else {
            tracing::debug!(
                partition,
                offset,
                "record of a partition not assigned: skipped"
            );
            return Ok(());
        };
        if task.next[ti].is_some_and(|n| offset < n) {
            return Ok(()); // already reflected in the committed state
        }
        task.next[ti] = Some(offset + 1);
        task.caught_up = false;
        self.dirty = true;
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
        let sizes = Sizes {
            value: payload.len(),
            user: d.user.len(),
            scope_key: d.key.len(),
            input_key: key.map_or(0, <[u8]>::len),
        };
        if let Some((topic, limit)) = self.room.refuses(&sizes) {
            let topic = topic.to_owned();
            return self.too_large_for(m, ti, &topic, limit);
        }
        let on_close = self.engine.annotate == AnnotateMode::OnClose;
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
                self.sink.send(
                    OutputKind::Annotated,
                    Some(d.user.as_bytes()),
                    Some(&self.buf),
                    Some(d.time),
                    None,
                )?;
                if let Some(ts) = record_ts {
                    self.metrics
                        .observe_processing_latency(
                            Duration::from_millis((now - ts).max(0) as u64),
                        );
                }
            }
            Disposition::Held => self.topic_metrics[ti].event(Outcome::Accepted),
            Disposition::Late(reason) => {
                // The engine keeps nothing of a late record: it may still be refused (and
                // what the engine appended to `out` still goes out, below).
                if let Some((topic, limit)) = self.room.refuses_late(&sizes) {
                    let topic = topic.to_owned();
                    self.too_large_for(m, ti, &topic, limit)?;
                } else {
                    self.topic_metrics[ti].event(Outcome::Late(reason));
                    let h = header(OwnedHeaders::new(), "sessionizer.reason", reason.as_str());
                    let h = header(h, "sessionizer.watermark", &watermark.to_string());
                    let h = source_headers(h, m);
                    self.sink
                        .send(OutputKind::Late, key, Some(payload), record_ts, Some(h))?;
                }
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

    /// A record whose output would not fit `topic`, which takes record batches of up to
    /// `limit` bytes: a dead letter instead (see [`crate::kafka::limits`]).
    fn too_large_for(
        &mut self,
        m: &BorrowedMessage<'_>,
        ti: usize,
        topic: &str,
        limit: usize,
    ) -> Result<(), PipelineError> {
        let reason = DeadLetterReason::RECORD_TOO_LARGE;
        self.topic_metrics[ti].event(Outcome::DeadLetter(reason));
        let msg = format!(
            "record of {} bytes: its output would exceed the {limit} bytes topic `{topic}` takes \
             (its max.message.bytes)",
            m.payload().map_or(0, <[u8]>::len)
        );
        self.dead_letter(m, reason.as_str(), &msg)
    }

    pub(super) fn dead_letter(
        &mut self,
        m: &BorrowedMessage<'_>,
        reason: &str,
        error: &str,
    ) -> Result<(), PipelineError> {
        let h = header(OwnedHeaders::new(), "sessionizer.reason", reason);
        let h = header(h, "sessionizer.error", error);
        let mut h = source_headers(h, m);
        let value = m.payload().unwrap_or(&[]);
        let key = m.key().unwrap_or(&[]);
        let rest = key.len() + error.len() + m.topic().len() + HEADER_ALLOWANCE;
        let fits = dead_letter_fit(value.len(), rest, self.dead_letter_limit);
        if fits < value.len() {
            tracing::warn!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                bytes = value.len(),
                kept = fits,
                limit = self.dead_letter_limit,
                "a dead letter would not fit in the dead-letter topic: its value is truncated"
            );
            h = header(h, "sessionizer.truncated_from", &value.len().to_string());
        }
        self.sink.send(
            OutputKind::DeadLetters,
            m.key(),
            // A tombstone's dead letter is a tombstone too.
            m.payload().map(|_| &value[..fits]),
            m.timestamp().to_millis(),
            Some(h),
        )?;
        Ok(())
    }

    pub(super) fn emit(&mut self, out: &[Output]) -> Result<(), PipelineError> {
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
                    self.sink.send(
                        OutputKind::Annotated,
                        Some(user),
                        Some(&self.buf),
                        Some(*time),
                        None,
                    )?;
                }
                Output::Session(s) => {
                    if let Some(j) = record_json(&self.decoder, o) {
                        self.sink.send(
                            OutputKind::Sessions,
                            Some(s.user.as_bytes()),
                            Some(&j),
                            Some(s.end),
                            None,
                        )?;
                    }
                    let j = stats_json(&s.user, &s.stats);
                    self.sink.send(
                        OutputKind::Stats,
                        Some(s.user.as_bytes()),
                        Some(&j),
                        Some(s.end),
                        None,
                    )?;
                    self.metrics.session_concluded(s);
                }
                Output::Merge { user, at, .. } | Output::Split { user, at, .. } => {
                    if let Some(j) = record_json(&self.decoder, o) {
                        self.sink.send(
                            OutputKind::Sessions,
                            Some(user.as_bytes()),
                            Some(&j),
                            Some(*at),
                            None,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn caught_up(&mut self, partition: i32) {
        if let Some(t) = self.tasks.get_mut(&partition) {
            t.caught_up = true;
            t.ended_since_commit = true;
            if !std::mem::replace(&mut t.reached_end, true) {
                tracing::info!(partition, next = ?t.next, "caught up: reached the end of the partition");
            }
        }
    }

    /// Moves time on in every task (concluding what is due) and sends what that outputs.
    pub(super) fn advance(&mut self) -> Result<(), PipelineError> {
        let now = wall_ms();
        let parts: Vec<i32> = self.tasks.keys().copied().collect();
        for p in parts {
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            let lagging = self.lagging.contains(&p);
            if let Some(t) = self.tasks.get_mut(&p) {
                t.engine
                    .advance(now, t.caught_up && !lagging, &mut out)
                    .map_err(|source| PipelineError::Store {
                        partition: p,
                        source,
                    })?;
            }
            self.dirty |= !out.is_empty();
            let r = self.emit(&out);
            self.out = out;
            r?;
        }
        Ok(())
    }
}

fn header(h: OwnedHeaders, key: &str, value: &str) -> OwnedHeaders {
    h.insert(Header {
        key,
        value: Some(value.as_bytes()),
    })
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
