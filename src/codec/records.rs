//! Output encoding: annotated events (the input bytes with one field added) and the JSON
//! records of concluded sessions, merges, splits and user stats. The schemas are documented in
//! the README; field names here are the contract.

use super::decode::Decoder;
use crate::engine::{Annotation, ConcludedSession, Millis, Output, SessionId, UserStats};
use chrono::{SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use std::collections::BTreeMap;

/// Appends `"<field>":{...}` (or `null`) to the JSON object in `raw`, leaving every other byte
/// of the input as it was. `raw` must be a JSON object (as the decoder checked).
pub fn annotate(raw: &[u8], field: &str, ann: Option<&Annotation>, out: &mut Vec<u8>) {
    let end = raw.iter().rposition(|&b| b == b'}').unwrap_or(raw.len());
    let open = raw.iter().position(|&b| b == b'{').unwrap_or(0);
    let empty = raw[open + 1..end].iter().all(u8::is_ascii_whitespace);
    out.reserve(raw.len() + 96);
    out.extend_from_slice(&raw[..end]);
    if !empty {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(b"\":");
    match ann {
        None => out.extend_from_slice(b"null"),
        Some(a) => {
            // Written byte by byte: `write!` through `core::fmt` took about 5 % of the
            // consumer thread's time.
            let mut num = itoa::Buffer::new();
            out.extend_from_slice(b"{\"id\":\"");
            push_hex16(out, a.id.key_hash);
            out.push(b'-');
            out.extend_from_slice(num.format(a.id.num).as_bytes());
            out.extend_from_slice(b"\",\"seq\":");
            out.extend_from_slice(num.format(a.seq).as_bytes());
            out.extend_from_slice(if a.start {
                b",\"start\":true}"
            } else {
                b",\"start\":false}"
            });
        }
    }
    out.extend_from_slice(&raw[end..]);
}

/// `v` as 16 lowercase hex digits, as `{:016x}` writes it (the first part of a session id).
fn push_hex16(out: &mut Vec<u8>, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        out.push(DIGITS[((v >> (shift * 4)) & 0xf) as usize]);
    }
}

/// RFC 3339 rendering of an epoch-millis instant, in UTC.
pub fn iso(t: Millis) -> String {
    Utc.timestamp_millis_opt(t)
        .single()
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[derive(Serialize)]
struct SessionRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session_id: String,
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<BTreeMap<&'a str, &'a str>>,
    start: Millis,
    end: Millis,
    start_time: String,
    end_time: String,
    length_s: f64,
    event_count: u64,
    end_reason: &'static str,
    session_number: u64,
    merged_ids: Vec<String>,
}

#[derive(Serialize)]
struct MergeRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<BTreeMap<&'a str, &'a str>>,
    /// The surviving session.
    session_id: String,
    absorbed_session_id: String,
    at: Millis,
}

#[derive(Serialize)]
struct SplitRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<BTreeMap<&'a str, &'a str>>,
    session_id: String,
    new_session_id: String,
    at: Millis,
}

#[derive(Serialize)]
struct StatsRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    user_id: &'a str,
    session_count: u64,
    first_session_start: Millis,
    last_session_start: Millis,
    last_session_end: Millis,
    avg_length_s: f64,
    last_interval_s: Option<f64>,
}

fn scope<'a>(dec: &'a Decoder, key: &'a str) -> Option<BTreeMap<&'a str, &'a str>> {
    let s = dec.scope_of(key);
    (!s.is_empty()).then(|| s.into_iter().collect())
}

fn ids(v: &[SessionId]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

/// The JSON of a concluded session.
pub fn session_json(dec: &Decoder, s: &ConcludedSession) -> Vec<u8> {
    to_vec(&SessionRecord {
        kind: "session",
        session_id: s.id.to_string(),
        user_id: &s.user,
        scope: scope(dec, &s.key),
        start: s.start,
        end: s.end,
        start_time: iso(s.start),
        end_time: iso(s.end),
        length_s: (s.end - s.start) as f64 / 1000.0,
        event_count: s.event_count,
        end_reason: s.end_reason.as_str(),
        session_number: s.session_number,
        merged_ids: ids(&s.merged_ids),
    })
}

/// The JSON of a user's stats.
pub fn stats_json(user: &str, s: &UserStats) -> Vec<u8> {
    to_vec(&StatsRecord {
        kind: "user_stats",
        user_id: user,
        session_count: s.session_count,
        first_session_start: s.first_session_start,
        last_session_start: s.last_session_start,
        last_session_end: s.last_session_end,
        avg_length_s: s.avg_length_ms() / 1000.0,
        last_interval_s: s.last_interval_ms.map(|v| v as f64 / 1000.0),
    })
}

/// The JSON of a session-level record (session, merge or split); `None` for released events,
/// which are annotated events. A session's user stats are written with [`stats_json`].
pub fn record_json(dec: &Decoder, o: &Output) -> Option<Vec<u8>> {
    Some(match o {
        Output::Session(s) => session_json(dec, s),
        Output::Merge {
            key,
            user,
            absorbed,
            into,
            at,
        } => to_vec(&MergeRecord {
            kind: "merge",
            user_id: user,
            scope: scope(dec, key),
            session_id: into.to_string(),
            absorbed_session_id: absorbed.to_string(),
            at: *at,
        }),
        Output::Split {
            key,
            user,
            from,
            to,
            at,
        } => to_vec(&SplitRecord {
            kind: "split",
            user_id: user,
            scope: scope(dec, key),
            session_id: from.to_string(),
            new_session_id: to.to_string(),
            at: *at,
        }),
        Output::Released { .. } => return None,
    })
}

fn to_vec<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann() -> Annotation {
        Annotation {
            id: SessionId {
                key_hash: 0xab,
                num: 3,
            },
            seq: 2,
            start: false,
        }
    }

    #[test]
    fn annotation_keeps_every_input_byte() {
        let raw = br#"{"user_id":"u1", "n": 1.50e3, "s":"\u00e9" }  "#;
        let mut out = Vec::new();
        annotate(raw, "session", Some(&ann()), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"user_id":"u1", "n": 1.50e3, "s":"\u00e9" ,"session":{"id":"00000000000000ab-3","seq":2,"start":false}}  "#
        );
    }

    #[test]
    fn annotation_writes_the_session_id_as_its_display_form() {
        for (key_hash, num, seq, start) in [
            (0, 1, 1, true),
            (u64::MAX, u64::MAX, 7, false),
            (0x0123_4567_89ab_cdef, 0, u32::MAX, false),
        ] {
            let a = Annotation {
                id: SessionId { key_hash, num },
                seq,
                start,
            };
            let mut out = Vec::new();
            annotate(b"{}", "s", Some(&a), &mut out);
            let expected = format!(r#"{{"s":{{"id":"{}","seq":{seq},"start":{start}}}}}"#, a.id);
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn annotation_of_empty_object_and_null() {
        let mut out = Vec::new();
        annotate(b"{ }", "s", None, &mut out);
        assert_eq!(out, b"{ \"s\":null}");
    }
}
