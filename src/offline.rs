//! Offline (batch) mode: the engine over JSON lines, for backfills and for anyone without Kafka.
//!
//! Input order is arrival order, so lateness is exercised exactly as in streaming. The clock is
//! simulated: "now" is the largest event time read so far (the current line included), so the
//! output depends only on the input. At the end of the input every open session concludes.
//! Every input line ends up in exactly one of: annotated, late, dead letters.

use crate::codec::records::{annotate, record_json, stats_json};
use crate::codec::Decoder;
use crate::engine::{Disposition, Engine, Millis, Output, SourceOffset, StateStore, StoreError};
use base64::Engine as _;
use serde::Serialize;
use serde_json::value::RawValue;
use std::io::{self, BufRead, Write};

/// Where the outputs go. `None` discards that output (it is still counted).
pub struct Sinks<'a> {
    pub sessions: Option<&'a mut dyn Write>,
    pub annotated: Option<&'a mut dyn Write>,
    pub late: Option<&'a mut dyn Write>,
    pub dead_letters: Option<&'a mut dyn Write>,
    pub stats: Option<&'a mut dyn Write>,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub lines: u64,
    pub annotated: u64,
    pub excluded: u64,
    pub late: u64,
    pub dead_letters: u64,
    pub sessions: u64,
    pub merges: u64,
    pub splits: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lines={} annotated={} (excluded={}) late={} dead_letters={} sessions={} merges={} splits={}",
            self.lines,
            self.annotated,
            self.excluded,
            self.late,
            self.dead_letters,
            self.sessions,
            self.merges,
            self.splits
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("reading input: {0}")]
    Read(io::Error),
    #[error("writing output: {0}")]
    Write(io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often (in lines) state is committed when the store is durable.
pub const COMMIT_EVERY: u64 = 50_000;

#[derive(Serialize)]
struct DeadLetter<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    line: u64,
    reason: &'a str,
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record_base64: Option<String>,
}

#[derive(Serialize)]
struct Late<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    line: u64,
    reason: &'a str,
    watermark: Millis,
    event: &'a RawValue,
}

fn write_line(sink: &mut Option<&mut dyn Write>, bytes: &[u8]) -> Result<(), OfflineError> {
    if let Some(w) = sink {
        w.write_all(bytes).map_err(OfflineError::Write)?;
        w.write_all(b"\n").map_err(OfflineError::Write)?;
    }
    Ok(())
}

fn dead_letter(
    sinks: &mut Sinks<'_>,
    line: u64,
    raw: &[u8],
    reason: &str,
    error: String,
) -> Result<(), OfflineError> {
    let text = std::str::from_utf8(raw).ok();
    let rec = DeadLetter {
        kind: "dead_letter",
        line,
        reason,
        error,
        record: text,
        record_base64: text
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(raw)),
    };
    write_line(
        &mut sinks.dead_letters,
        &serde_json::to_vec(&rec).unwrap_or_default(),
    )
}

/// Runs `engine` over the JSON lines of `input`, writing to `sinks`.
pub fn sessionize<S: StateStore>(
    decoder: &Decoder,
    engine: &mut Engine<S>,
    mut input: impl BufRead,
    sinks: &mut Sinks<'_>,
) -> Result<Summary, OfflineError> {
    let field = decoder.settings().annotation_field.clone();
    let mut sum = Summary::default();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    let mut now: Option<Millis> = None;
    loop {
        buf.clear();
        let n = input
            .read_until(b'\n', &mut buf)
            .map_err(OfflineError::Read)?;
        if n == 0 {
            break;
        }
        sum.lines += 1;
        let line_no = sum.lines;
        let mut raw: &[u8] = &buf;
        if let Some(r) = raw.strip_suffix(b"\n") {
            raw = r;
        }
        if let Some(r) = raw.strip_suffix(b"\r") {
            raw = r;
        }
        // A file saved with a UTF-8 byte order mark (as some Windows tools write): the mark
        // belongs to the file, not to the first record.
        if line_no == 1 {
            if let Some(r) = raw.strip_prefix("\u{feff}".as_bytes()) {
                raw = r;
            }
        }
        let d = match decoder.decode(raw, None, None) {
            Ok(d) => d,
            Err(e) => {
                sum.dead_letters += 1;
                dead_letter(sinks, line_no, raw, e.reason(), e.to_string())?;
                continue;
            }
        };
        // The simulated clock: the largest event time read so far, this line included (so no
        // event is ever ahead of "now" offline; filter far-future times before a backfill).
        let arrival = now.map_or(d.time, |n| n.max(d.time));
        let ev = d.event(0, raw);
        now = Some(arrival);
        out.clear();
        match engine.process(&ev, arrival, &mut out)? {
            Disposition::Annotated(ann) => {
                sum.annotated += 1;
                if ann.is_none() {
                    sum.excluded += 1;
                }
                if sinks.annotated.is_some() {
                    scratch.clear();
                    annotate(raw, &field, ann.as_ref(), &mut scratch);
                    write_line(&mut sinks.annotated, &scratch)?;
                }
            }
            Disposition::Held => {}
            Disposition::Late(reason) => {
                sum.late += 1;
                if sinks.late.is_some() {
                    let event: &RawValue = serde_json::from_slice(raw).map_err(|e| {
                        OfflineError::Read(io::Error::new(io::ErrorKind::InvalidData, e))
                    })?;
                    let rec = Late {
                        kind: "late",
                        line: line_no,
                        reason: reason.as_str(),
                        watermark: engine.watermark(),
                        event,
                    };
                    write_line(
                        &mut sinks.late,
                        &serde_json::to_vec(&rec).unwrap_or_default(),
                    )?;
                }
            }
            Disposition::FutureTime => {
                sum.dead_letters += 1;
                dead_letter(
                    sinks,
                    line_no,
                    raw,
                    "future_time",
                    format!(
                        "event time {} is more than the allowed clock skew ahead of {}",
                        d.time, arrival
                    ),
                )?;
            }
        }
        if let Some(n) = now {
            engine.advance(n, false, &mut out)?;
        }
        emit(decoder, &field, &out, &mut sum, sinks, &mut scratch)?;
        if line_no % COMMIT_EVERY == 0 {
            engine.commit(&[offset(line_no)])?;
        }
    }
    out.clear();
    engine.finish(&mut out)?;
    emit(decoder, &field, &out, &mut sum, sinks, &mut scratch)?;
    engine.commit(&[offset(sum.lines)])?;
    for w in [
        &mut sinks.sessions,
        &mut sinks.annotated,
        &mut sinks.late,
        &mut sinks.dead_letters,
        &mut sinks.stats,
    ]
    .into_iter()
    .flatten()
    {
        w.flush().map_err(OfflineError::Write)?;
    }
    Ok(sum)
}

fn offset(lines: u64) -> SourceOffset {
    SourceOffset {
        topic: "offline".into(),
        partition: 0,
        next_offset: i64::try_from(lines).unwrap_or(i64::MAX),
    }
}

fn emit(
    decoder: &Decoder,
    field: &str,
    out: &[Output],
    sum: &mut Summary,
    sinks: &mut Sinks<'_>,
    scratch: &mut Vec<u8>,
) -> Result<(), OfflineError> {
    for o in out {
        match o {
            Output::Released {
                payload,
                annotation,
                ..
            } => {
                sum.annotated += 1;
                if sinks.annotated.is_some() {
                    scratch.clear();
                    annotate(payload, field, Some(annotation), scratch);
                    write_line(&mut sinks.annotated, scratch)?;
                }
            }
            Output::Session(_) | Output::Merge { .. } | Output::Split { .. } => {
                match o {
                    Output::Session(_) => sum.sessions += 1,
                    Output::Merge { .. } => sum.merges += 1,
                    _ => sum.splits += 1,
                }
                if let Some(j) = record_json(decoder, o) {
                    write_line(&mut sinks.sessions, &j)?;
                }
                if let Output::Session(s) = o {
                    if sinks.stats.is_some() {
                        write_line(&mut sinks.stats, &stats_json(&s.user, &s.stats))?;
                    }
                }
            }
        }
    }
    Ok(())
}
