//! Input decoding: bytes of one record -> the fields the engine needs, without touching the
//! rest. The JSON is parsed once, top level only; wanted fields are borrowed as raw JSON, all
//! others are skipped. Every failure has a stable reason code for the dead-letter output.

use crate::config::{DecodeSettings, TimeFormat};
use crate::engine::{EventClass, InputEvent, Millis};
use rustc_hash::FxHashMap;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Largest accepted event time: 9999-12-31T23:59:59.999Z.
pub const MAX_TIME: Millis = 253_402_300_799_999;
/// From this value on (10^11) a number in `auto` time format is epoch milliseconds, below it
/// epoch seconds: 10^11 ms is 1973-03-03T09:46:40Z, 10^11 s the year 5138.
pub const AUTO_MILLIS_FROM: Millis = 100_000_000_000;
/// Longest accepted user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 1024;
/// Deepest accepted nesting of arrays and objects.
pub const MAX_DEPTH: usize = 64;
/// Fields a decoder can look for without a heap allocation per record.
const INLINE_SLOTS: usize = 16;
/// Separator between the user id and scope field values in a scope key.
pub const SCOPE_SEPARATOR: char = '\u{1f}';

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("record of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("record is not valid UTF-8")]
    InvalidUtf8,
    #[error("record is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("record is not a JSON object")]
    NotAnObject,
    #[error("record nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("no user id: field `{0}` is missing or null and the record has no key")]
    MissingUserId(String),
    #[error("invalid user id: {0}")]
    InvalidUserId(String),
    #[error("no event time: field `{0}` is missing or null")]
    MissingTime(String),
    #[error("invalid event time: {0}")]
    InvalidTime(String),
    /// The time as written (or, from the record timestamp, in milliseconds).
    #[error("event time {0} is outside 1970-01-01 .. 9999-12-31")]
    TimeOutOfRange(String),
    #[error("invalid event name: {0}")]
    InvalidEventName(String),
    #[error("the record already has a field `{0}`, the configured annotation field")]
    AnnotationFieldPresent(String),
    #[error(
        "{0} contains U+001F, which separates the scope key's parts: two scopes could become one"
    )]
    InvalidScopeValue(String),
}

impl DecodeError {
    /// Stable machine-readable reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty_record",
            DecodeError::TooLarge { .. } => "record_too_large",
            DecodeError::InvalidUtf8 => "invalid_utf8",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::TooDeep => "too_deeply_nested",
            DecodeError::MissingUserId(_) => "missing_user_id",
            DecodeError::InvalidUserId(_) => "invalid_user_id",
            DecodeError::MissingTime(_) => "missing_time",
            DecodeError::InvalidTime(_) => "invalid_time",
            DecodeError::TimeOutOfRange(_) => "time_out_of_range",
            DecodeError::InvalidEventName(_) => "invalid_event_name",
            DecodeError::AnnotationFieldPresent(_) => "annotation_field_present",
            DecodeError::InvalidScopeValue(_) => "invalid_scope_value",
        }
    }

    /// Every reason code, for metrics and documentation.
    pub const REASONS: [&'static str; 14] = [
        "empty_record",
        "record_too_large",
        "invalid_utf8",
        "invalid_json",
        "not_an_object",
        "too_deeply_nested",
        "missing_user_id",
        "invalid_user_id",
        "missing_time",
        "invalid_time",
        "time_out_of_range",
        "invalid_event_name",
        "annotation_field_present",
        "invalid_scope_value",
    ];
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub user: Cow<'a, str>,
    /// The scope key: the user id, followed by each scope field value after a U+001F.
    pub key: Cow<'a, str>,
    pub time: Millis,
    pub class: EventClass,
    pub timeout: Millis,
}

impl Decoded<'_> {
    /// The engine's view of this event, from input `source`, holding `payload` in `on_close`
    /// mode.
    pub fn event<'s>(&'s self, source: u32, payload: &'s [u8]) -> InputEvent<'s> {
        InputEvent {
            key: &self.key,
            user: &self.user,
            time: self.time,
            class: self.class,
            timeout: self.timeout,
            source,
            payload,
        }
    }
}

/// Precomputed lookup from top-level field name to slot.
#[derive(Debug, Clone)]
pub struct Decoder {
    cfg: DecodeSettings,
    /// Wanted field names; slot = index.
    names: Vec<String>,
    slot_user: usize,
    slot_time: usize,
    slot_event: usize,
    slot_annotation: usize,
    slot_scope: Vec<usize>,
    slot_rules: Vec<usize>,
    /// The class of every configured event name: one lookup with a fast hash per record
    /// (three SipHash lookups took about 3 % of the consumer thread).
    classes: FxHashMap<String, EventClass>,
}

impl Decoder {
    pub fn new(cfg: DecodeSettings) -> Self {
        let mut names: Vec<String> = Vec::new();
        let mut slot = |n: &str| match names.iter().position(|x| x == n) {
            Some(i) => i,
            None => {
                names.push(n.to_owned());
                names.len() - 1
            }
        };
        let slot_user = slot(&cfg.user_id_field);
        let slot_time = slot(&cfg.time_field);
        let slot_event = slot(&cfg.event_field);
        let slot_annotation = slot(&cfg.annotation_field);
        let slot_scope = cfg.scope_fields.iter().map(|f| slot(f)).collect();
        let slot_rules = cfg.timeout_rules.iter().map(|r| slot(&r.field)).collect();
        // In reverse order of precedence: a later class replaces an earlier one.
        let classes = [
            (&cfg.end_events, EventClass::End),
            (&cfg.start_events, EventClass::Start),
            (&cfg.excluded_events, EventClass::Excluded),
        ]
        .into_iter()
        .flat_map(|(names, class)| names.iter().map(move |n| (n.clone(), class)))
        .collect();
        Decoder {
            cfg,
            names,
            slot_user,
            slot_time,
            slot_event,
            slot_annotation,
            slot_scope,
            slot_rules,
            classes,
        }
    }

    pub fn settings(&self) -> &DecodeSettings {
        &self.cfg
    }

    /// Decodes one record. `record_key` is the Kafka key (the user id fallback) and
    /// `record_time` the Kafka record timestamp, when there are such things.
    pub fn decode<'a>(
        &self,
        bytes: &'a [u8],
        record_key: Option<&'a [u8]>,
        record_time: Option<Millis>,
    ) -> Result<Decoded<'a>, DecodeError> {
        if bytes.len() > self.cfg.max_record_bytes {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                max: self.cfg.max_record_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        if text.trim().is_empty() {
            return Err(DecodeError::Empty);
        }
        if too_deep(bytes) {
            return Err(DecodeError::TooDeep);
        }
        // The wanted fields' values; on the stack unless there are many (a heap allocation
        // per record showed in profiles).
        let mut inline = [None; INLINE_SLOTS];
        let mut heap = Vec::new();
        let slots: &mut [Option<&'a RawValue>] = if self.names.len() <= INLINE_SLOTS {
            &mut inline[..self.names.len()]
        } else {
            heap.resize(self.names.len(), None);
            &mut heap
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let seed = TopLevel {
            names: &self.names,
            slots,
        };
        seed.deserialize(&mut de).map_err(json_error)?;
        de.end().map_err(json_error)?;

        if slots[self.slot_annotation].is_some() {
            return Err(DecodeError::AnnotationFieldPresent(
                self.cfg.annotation_field.clone(),
            ));
        }
        let user = match slots[self.slot_user].filter(|r| r.get() != "null") {
            Some(raw) => user_id(raw)?,
            None => match record_key {
                Some(k) if !k.is_empty() => {
                    Cow::Borrowed(std::str::from_utf8(k).map_err(|_| {
                        DecodeError::InvalidUserId("the record key is not valid UTF-8".into())
                    })?)
                }
                _ => return Err(DecodeError::MissingUserId(self.cfg.user_id_field.clone())),
            },
        };
        if user.is_empty() {
            return Err(DecodeError::InvalidUserId("empty".into()));
        }
        if user.len() > MAX_USER_ID_BYTES {
            return Err(DecodeError::InvalidUserId(format!(
                "longer than {MAX_USER_ID_BYTES} bytes"
            )));
        }
        let (time, raw) = match self.cfg.time_format {
            TimeFormat::RecordTimestamp => (
                record_time.ok_or_else(|| DecodeError::MissingTime("(record timestamp)".into()))?,
                None,
            ),
            fmt => match slots[self.slot_time].filter(|r| r.get() != "null") {
                Some(raw) => (parse_time(raw.get(), fmt)?, Some(raw.get())),
                None => return Err(DecodeError::MissingTime(self.cfg.time_field.clone())),
            },
        };
        if !(0..=MAX_TIME).contains(&time) {
            return Err(DecodeError::TimeOutOfRange(match raw {
                Some(raw) => format!("{} ({time} ms)", truncate(raw)),
                None => format!("{time} ms (the record timestamp)"),
            }));
        }
        let class = match slots[self.slot_event].filter(|r| r.get() != "null") {
            None => EventClass::Engagement,
            Some(raw) => {
                let name = json_str(raw).ok_or_else(|| {
                    DecodeError::InvalidEventName(format!("expected a string, got {}", raw.get()))
                })?;
                self.classify(&name)
            }
        };
        let mut timeout = self.cfg.default_timeout;
        for (rule, &slot) in self.cfg.timeout_rules.iter().zip(&self.slot_rules) {
            if let Some(v) = slots[slot].map(scalar_text) {
                if rule.values.iter().any(|x| *x == v) {
                    timeout = rule.timeout;
                    break;
                }
            }
        }
        let key = if self.slot_scope.is_empty() {
            user.clone()
        } else {
            // The separator inside a part would let two scopes share a key: "a\u{1f}b" + "c"
            // and "a" + "b\u{1f}c".
            if user.contains(SCOPE_SEPARATOR) {
                return Err(DecodeError::InvalidScopeValue("the user id".into()));
            }
            let mut k = user.clone().into_owned();
            for (&slot, field) in self.slot_scope.iter().zip(&self.cfg.scope_fields) {
                k.push(SCOPE_SEPARATOR);
                if let Some(raw) = slots[slot].filter(|r| r.get() != "null") {
                    let v = scalar_text(raw);
                    if v.contains(SCOPE_SEPARATOR) {
                        return Err(DecodeError::InvalidScopeValue(format!(
                            "scope field `{field}`"
                        )));
                    }
                    k.push_str(&v);
                }
            }
            Cow::Owned(k)
        };
        Ok(Decoded {
            user,
            key,
            time,
            class,
            timeout,
        })
    }

    fn classify(&self, name: &str) -> EventClass {
        self.classes
            .get(name)
            .copied()
            .unwrap_or(EventClass::Engagement)
    }

    /// The scope field values of a scope key, paired with their configured names.
    pub fn scope_of<'k>(&self, key: &'k str) -> Vec<(&str, &'k str)> {
        let mut parts = key.split(SCOPE_SEPARATOR);
        parts.next();
        self.cfg
            .scope_fields
            .iter()
            .map(|f| f.as_str())
            .zip(parts)
            .collect()
    }
}

/// Whether the JSON text nests deeper than [`MAX_DEPTH`] (the parser skips unwanted values
/// without a depth limit of its own).
fn too_deep(bytes: &[u8]) -> bool {
    // Nesting cannot exceed the number of opening brackets: when they are few, as in nearly
    // every event, this count spares the exact scan. memchr's search (SIMD, chosen at run
    // time) took a few per cent of the consumer thread less than a plain byte loop did.
    let opening = memchr::memchr2_iter(b'{', b'[', bytes).count();
    opening > MAX_DEPTH && nesting_depth(bytes) > MAX_DEPTH
}

/// The deepest nesting of the JSON text, byte by byte: brackets inside strings don't count.
fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn json_error(e: serde_json::Error) -> DecodeError {
    if e.classify() == serde_json::error::Category::Data
        && e.to_string().contains("expected a JSON object")
    {
        DecodeError::NotAnObject
    } else {
        DecodeError::InvalidJson(e.to_string())
    }
}

/// A JSON string's value, unescaped.
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    if !s.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(s) {
        Ok(b) => Some(Cow::Borrowed(b)),
        Err(_) => serde_json::from_str::<String>(s).ok().map(Cow::Owned),
    }
}

/// A scalar's text: strings unescaped, anything else as written.
fn scalar_text(raw: &RawValue) -> Cow<'_, str> {
    json_str(raw).unwrap_or(Cow::Borrowed(raw.get()))
}

fn user_id(raw: &RawValue) -> Result<Cow<'_, str>, DecodeError> {
    if let Some(s) = json_str(raw) {
        return Ok(s);
    }
    let t = raw.get();
    if !t.is_empty()
        && t.bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
    {
        return Ok(Cow::Borrowed(t));
    }
    Err(DecodeError::InvalidUserId(format!(
        "expected a string or an integer, got {}",
        truncate(t)
    )))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Parses an event time written as a JSON number or string.
pub fn parse_time(raw: &str, fmt: TimeFormat) -> Result<Millis, DecodeError> {
    if raw.starts_with('"') {
        let s: String = serde_json::from_str(raw)
            .map_err(|_| DecodeError::InvalidTime(format!("bad string {}", truncate(raw))))?;
        let s = s.trim();
        // Anything that is not a number (RFC 3339's `T` or `t`, a space, `Z` or `z`, `:`) is
        // a date-time.
        let numeric =
            s.starts_with(|c: char| c.is_ascii_digit() || c == '-') && s.parse::<f64>().is_ok();
        return match fmt {
            TimeFormat::Rfc3339 => rfc3339(s),
            TimeFormat::Auto if !numeric => rfc3339(s),
            _ => number(s, fmt),
        };
    }
    match fmt {
        TimeFormat::Rfc3339 => Err(DecodeError::InvalidTime(format!(
            "expected an RFC 3339 string, got {}",
            truncate(raw)
        ))),
        _ if raw.starts_with(|c: char| c.is_ascii_digit() || c == '-') => number(raw, fmt),
        _ => Err(DecodeError::InvalidTime(format!(
            "expected a number or a string, got {}",
            truncate(raw)
        ))),
    }
}

fn rfc3339(s: &str) -> Result<Millis, DecodeError> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|d| d.timestamp_millis())
        .map_err(|e| DecodeError::InvalidTime(format!("`{}` is not RFC 3339 ({e})", truncate(s))))
}

/// Numbers, exactly: the digits and the exponent are read as a decimal, never through a float
/// (`8.617317888196e9` seconds is exactly 8617317888196 ms); below a millisecond, the floor.
fn number(s: &str, fmt: TimeFormat) -> Result<Millis, DecodeError> {
    let bad = || DecodeError::InvalidTime(format!("`{}` is not a valid number", truncate(s)));
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    // The common case first: a plain integer, read by the standard library's parser.
    if !body.is_empty() && body.len() <= 25 && body.bytes().all(|b| b.is_ascii_digit()) {
        let v: i128 = body.parse().map_err(|_| bad())?;
        return in_millis(s, fmt, neg, v != 0, |shift| {
            Some(v * 10i128.pow(shift as u32))
        });
    }
    let (mantissa, exp) = match body.split_once(['e', 'E']) {
        Some((m, e)) => {
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            // An exponent too large for an i64 is, whatever the mantissa (under 2^60 digits),
            // 0 or out of range; the clamp keeps the sums below from overflowing.
            const LIMIT: i64 = i64::MAX / 4;
            let e: i64 = e
                .parse()
                .unwrap_or(if e.starts_with('-') { -LIMIT } else { LIMIT });
            (m, e.clamp(-LIMIT, LIMIT))
        }
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if mantissa.contains('.') && (frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad());
    }
    // The value is the significant digits of `int` and `frac` times 10^`scale`.
    let digits = || int.bytes().chain(frac.bytes());
    let zeros = digits().take_while(|&b| b == b'0').count();
    let significant = int.len() + frac.len() - zeros;
    let scale = exp - frac.len() as i64;
    in_millis(s, fmt, neg, significant > 0, |shift| {
        let e = scale + shift;
        if significant == 0 {
            Some(0)
        } else if significant as i64 + e > 25 {
            None
        } else {
            let keep = (significant as i64 + e.min(0)).max(0) as usize;
            let v = digits()
                .skip(zeros)
                .take(keep)
                .fold(0i128, |v, b| v * 10 + i128::from(b - b'0'));
            Some(v * 10i128.pow(e.max(0) as u32))
        }
    })
}

/// The event time of a number in the unit written, given by `whole(shift)` = floor(|value| x
/// 10^shift), `None` when that is 10^25 or more (out of range in any unit); `shift` is 0 or 3.
/// `neg` and `nonzero`: the value is below zero, however little (the floor of -0.0001 is -1).
/// `written`: the number as written, for the error.
fn in_millis(
    written: &str,
    fmt: TimeFormat,
    neg: bool,
    nonzero: bool,
    whole: impl Fn(i64) -> Option<i128>,
) -> Result<Millis, DecodeError> {
    let ms = match fmt {
        TimeFormat::Seconds => whole(3),
        TimeFormat::Millis => whole(0),
        // Auto: seconds below AUTO_MILLIS_FROM, milliseconds from there on, with or without
        // a fraction.
        _ => match whole(0) {
            Some(v) if v < AUTO_MILLIS_FROM as i128 => whole(3),
            in_unit => in_unit,
        },
    };
    match ms {
        Some(v) if !(neg && nonzero) && v <= MAX_TIME as i128 => Ok(v as Millis),
        _ => Err(DecodeError::TimeOutOfRange(format!(
            "`{}`",
            truncate(written)
        ))),
    }
}

/// Deserializes the top-level object, borrowing wanted fields and skipping the rest.
struct TopLevel<'s, 'a> {
    names: &'s [String],
    slots: &'s mut [Option<&'a RawValue>],
}

impl<'de, 's> DeserializeSeed<'de> for TopLevel<'s, 'de> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 's> Visitor<'de> for TopLevel<'s, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(slot) = map.next_key_seed(FieldSlot { names: self.names })? {
            match slot {
                // Which of two values a reader takes is up to it (RFC 8259, 4): a record
                // that gives a field the sessionizer reads twice is refused, not guessed at.
                Some(i) if self.slots[i].is_some() => {
                    return Err(de::Error::custom(format_args!(
                        "duplicate field `{}`",
                        self.names[i]
                    )));
                }
                Some(i) => self.slots[i] = Some(map.next_value::<&'de RawValue>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Maps a key to its slot without allocating.
struct FieldSlot<'s> {
    names: &'s [String],
}

impl<'de, 's> DeserializeSeed<'de> for FieldSlot<'s> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 's> Visitor<'de> for FieldSlot<'s> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.names.iter().position(|n| n == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{raw::RawConfig, validate};

    fn decoder(f: impl FnOnce(&mut RawConfig)) -> Decoder {
        let mut raw = RawConfig::default();
        f(&mut raw);
        Decoder::new(validate(&raw).unwrap().decode)
    }

    fn reason(d: &Decoder, s: &str) -> &'static str {
        d.decode(s.as_bytes(), None, None).unwrap_err().reason()
    }

    proptest::proptest! {
        /// Every millisecond time reads back exactly whichever way it is written: integer
        /// milliseconds, seconds with a fraction, either unit with an exponent, as a number
        /// or a string; `auto` takes the unit from the size, the others as told.
        #[test]
        fn every_spelling_of_a_time_reads_back_exactly(
            v in 0i64..=MAX_TIME,
            quoted in proptest::bool::ANY,
        ) {
            let digits = v.to_string();
            let (first, rest) = digits.split_at(1);
            let point = |e: usize| format!("{first}.{rest}0e{e}");
            let spellings = [
                (digits.clone(), TimeFormat::Millis),
                (format!("{}.{:03}", v / 1000, v % 1000), TimeFormat::Seconds),
                (point(digits.len() - 1), TimeFormat::Millis),
                (format!("{}E-{}", digits, 3), TimeFormat::Seconds),
                (point(digits.len() - 1).replace('e', "e+"), TimeFormat::Millis),
            ];
            // Plain integers take a path of their own; padded with zeros (or with a zero
            // fraction) they take the decimal reader, which must agree in every format.
            for fmt in [TimeFormat::Auto, TimeFormat::Millis, TimeFormat::Seconds] {
                let fast = parse_time(&digits, fmt).ok();
                for slow in [format!("{}{digits}", "0".repeat(30)), format!("{digits}.0"), format!("{digits}e0")] {
                    proptest::prop_assert_eq!(parse_time(&slow, fmt).ok(), fast, "{} as {:?}", slow, fmt);
                }
            }
            for (text, fmt) in spellings {
                let raw = if quoted { format!("\"{text}\"") } else { text.clone() };
                proptest::prop_assert_eq!(parse_time(&raw, fmt).ok(), Some(v), "{} as {:?}", raw, fmt);
                // Auto: a written value below 10^11 is seconds, from there on milliseconds.
                let auto_reads_it = match fmt {
                    TimeFormat::Millis => v >= AUTO_MILLIS_FROM,
                    _ => v < AUTO_MILLIS_FROM * 1000,
                };
                if auto_reads_it {
                    proptest::prop_assert_eq!(parse_time(&raw, TimeFormat::Auto).ok(), Some(v), "{} as auto", raw);
                }
            }
        }

        /// The bracket count that spares the exact scan never changes the verdict: texts
        /// made mostly of brackets, quotes and escapes, often deeper than [`MAX_DEPTH`].
        #[test]
        fn too_deep_is_the_exact_scan(
            open in 0usize..80,
            s in "[\\[\\]{}\"\\\\a]{0,300}",
        ) {
            // Leading arrays make deep texts common: both verdicts are exercised.
            let text = format!("{}{s}", "[".repeat(open));
            let b = text.as_bytes();
            proptest::prop_assert_eq!(too_deep(b), nesting_depth(b) > MAX_DEPTH);
        }
    }

    #[test]
    fn time_formats() {
        let d = decoder(|_| {});
        // (the timestamp field's JSON value, the time read in auto format)
        let table: &[(&str, Millis)] = &[
            ("1700000000123", 1_700_000_000_123),
            ("1700000000", 1_700_000_000_000),
            ("1700000000.123", 1_700_000_000_123),
            ("1700000000.1", 1_700_000_000_100),
            ("1.7e9", 1_700_000_000_000),
            // From 10^11 on a number is milliseconds, fraction or not; the fraction below a
            // millisecond is dropped, as it is for seconds.
            ("1700000000123.7", 1_700_000_000_123),
            ("1.7e12", 1_700_000_000_000),
            // Exponents are read as decimals too: through a float this was ...195.
            ("8.617317888196e9", 8_617_317_888_196),
            ("17000000001234E-4", 1_700_000_000_123),
            (r#""5e-400""#, 0),
            // The 10^11 threshold, on both sides.
            ("99999999999", 99_999_999_999_000),
            ("100000000000", 100_000_000_000),
            ("99999999999.5", 99_999_999_999_500),
            // Zero with a sign is zero.
            ("-0", 0),
            (r#""-0.0""#, 0),
            (r#""0e30""#, 0),
            (r#""1700000000123.7""#, 1_700_000_000_123),
            // RFC 3339 allows lower-case `t` and `z`, and chrono a space for `T`.
            (r#""2023-11-14t22:13:20.123z""#, 1_700_000_000_123),
            (r#""2023-11-14 22:13:20Z""#, 1_700_000_000_000),
            (r#""2023-11-14T22:13:20.123Z""#, 1_700_000_000_123),
            (r#""2023-11-14T23:13:20+01:00""#, 1_700_000_000_000),
            (r#""1700000000123""#, 1_700_000_000_123),
        ];
        for &(value, want) in table {
            let record = format!(r#"{{"user_id":"u","timestamp":{value}}}"#);
            let got = d.decode(record.as_bytes(), None, None).unwrap().time;
            assert_eq!(got, want, "{value}");
        }
        // A long mantissa is not cancelled by a clamped exponent.
        let long = format!("0.{}1e1000020", "0".repeat(1_000_009));
        assert_eq!(parse_time(&long, TimeFormat::Auto), Ok(10_000_000_000_000));
        let s = decoder(|r| r.input.time_format = Some("seconds".into()));
        assert_eq!(
            s.decode(br#"{"user_id":"u","timestamp":1700000000123}"#, None, None)
                .unwrap_err()
                .reason(),
            "time_out_of_range"
        );
        let m = decoder(|r| r.input.time_format = Some("millis".into()));
        assert_eq!(
            m.decode(br#"{"user_id":"u","timestamp":17.9}"#, None, None)
                .unwrap()
                .time,
            17
        );
        let k = decoder(|r| r.input.time_format = Some("record_timestamp".into()));
        assert_eq!(
            k.decode(br#"{"user_id":"u"}"#, None, Some(42))
                .unwrap()
                .time,
            42
        );
    }

    #[test]
    fn bad_times() {
        let d = decoder(|_| {});
        assert_eq!(reason(&d, r#"{"user_id":"u"}"#), "missing_time");
        assert_eq!(
            reason(&d, r#"{"user_id":"u","timestamp":null}"#),
            "missing_time"
        );
        assert_eq!(
            reason(&d, r#"{"user_id":"u","timestamp":-5}"#),
            "time_out_of_range"
        );
        assert_eq!(
            reason(&d, r#"{"user_id":"u","timestamp":1e300}"#),
            "time_out_of_range"
        );
        assert_eq!(
            reason(&d, r#"{"user_id":"u","timestamp":99999999999999999999999}"#),
            "time_out_of_range"
        );
        assert_eq!(
            reason(&d, r#"{"user_id":"u","timestamp":"NaN"}"#),
            "invalid_time"
        );
        for bad in ["1e", "1e+", "1.e5", ".5", "1e5e5", "1.5.5", "--1"] {
            let rec = format!(r#"{{"user_id":"u","timestamp":"{bad}"}}"#);
            assert_eq!(reason(&d, &rec), "invalid_time", "{bad}");
        }
        // Before 1970 however little: the floor of -0.0001 s is -1 ms.
        for before in ["-1", "-0.0001", "-1e-4", "-5e-400"] {
            let rec = format!(r#"{{"user_id":"u","timestamp":{before}}}"#);
            assert_eq!(reason(&d, &rec), "time_out_of_range", "{before}");
        }
        // The message shows the time as written (i128::MAX was shown for 1e30).
        let message = |d: &Decoder, rec: &str, at: Option<i64>| {
            d.decode(rec.as_bytes(), None, at).unwrap_err().to_string()
        };
        assert_eq!(
            message(&d, r#"{"user_id":"u","timestamp":1e30}"#, None),
            "event time `1e30` is outside 1970-01-01 .. 9999-12-31"
        );
        assert_eq!(
            message(&d, r#"{"user_id":"u","timestamp":"-0.5"}"#, None),
            "event time `-0.5` is outside 1970-01-01 .. 9999-12-31"
        );
        assert_eq!(
            message(
                &d,
                r#"{"user_id":"u","timestamp":"1969-12-31T23:59:59Z"}"#,
                None
            ),
            "event time \"1969-12-31T23:59:59Z\" (-1000 ms) is outside 1970-01-01 .. 9999-12-31"
        );
        let k = decoder(|r| r.input.time_format = Some("record_timestamp".into()));
        assert_eq!(
            message(&k, r#"{"user_id":"u"}"#, Some(-7)),
            "event time -7 ms (the record timestamp) is outside 1970-01-01 .. 9999-12-31"
        );
        assert_eq!(
            reason(&d, r#"{"user_id":"u","timestamp":"yesterday"}"#),
            "invalid_time"
        );
        // A field the sessionizer reads, given twice (escaped the second time): refused, not
        // the last one taken. Other fields are passed through as they are.
        let twice = r#"{"user_id":"u","timestamp":1,"user\u005fid":"v"}"#;
        assert_eq!(reason(&d, twice), "invalid_json");
        assert!(message(&d, twice, None).contains("duplicate field `user_id`"));
        for plain in [
            r#"{"user_id":"u","timestamp":1,"timestamp":2}"#,
            r#"{"user_id":"u","timestamp":1,"user_id":"v"}"#,
            r#"{"user_id":"u","timestamp":1,"event":"a","event":"b"}"#,
        ] {
            assert_eq!(reason(&d, plain), "invalid_json", "{plain}");
        }
        let other = r#"{"user_id":"u","timestamp":1,"x":1,"x":2}"#;
        assert_eq!(d.decode(other.as_bytes(), None, None).unwrap().time, 1000);
        assert_eq!(
            reason(&d, r#"{"user_id":"u","timestamp":true}"#),
            "invalid_time"
        );
        assert_eq!(
            reason(&d, r#"{"user_id":"u","timestamp":{"a":1}}"#),
            "invalid_time"
        );
    }

    #[test]
    fn user_ids() {
        let d = decoder(|_| {});
        let ok = |s: &str, key: Option<&[u8]>| {
            d.decode(s.as_bytes(), key, None).unwrap().user.into_owned()
        };
        assert_eq!(ok(r#"{"user_id":"a\u00e9","timestamp":1}"#, None), "aé");
        assert_eq!(ok(r#"{"user_id":123,"timestamp":1}"#, None), "123");
        assert_eq!(ok(r#"{"timestamp":1}"#, Some(b"from-key")), "from-key");
        assert_eq!(ok(r#"{"user_id":null,"timestamp":1}"#, Some(b"k")), "k");
        assert_eq!(reason(&d, r#"{"timestamp":1}"#), "missing_user_id");
        assert_eq!(
            reason(&d, r#"{"user_id":"","timestamp":1}"#),
            "invalid_user_id"
        );
        assert_eq!(
            reason(&d, r#"{"user_id":1.5,"timestamp":1}"#),
            "invalid_user_id"
        );
        assert_eq!(
            reason(&d, r#"{"user_id":["a"],"timestamp":1}"#),
            "invalid_user_id"
        );
        let long = format!(r#"{{"user_id":"{}","timestamp":1}}"#, "x".repeat(2000));
        assert_eq!(reason(&d, &long), "invalid_user_id");
    }

    #[test]
    fn bad_records() {
        let d = decoder(|r| r.input.max_record_bytes = Some(100));
        assert_eq!(reason(&d, ""), "empty_record");
        assert_eq!(reason(&d, "  "), "empty_record");
        assert_eq!(
            d.decode(b"{\"user_id\":\"\xff\"}", None, None)
                .unwrap_err()
                .reason(),
            "invalid_utf8"
        );
        assert_eq!(reason(&d, "nope"), "invalid_json");
        assert_eq!(
            reason(&d, r#"{"user_id":"u","timestamp":1} trailing"#),
            "invalid_json"
        );
        assert_eq!(reason(&d, "[1,2]"), "not_an_object");
        assert_eq!(reason(&d, "42"), "not_an_object");
        assert_eq!(reason(&d, &"x".repeat(101)), "record_too_large");
        let deep = decoder(|_| {});
        let nested = format!(
            r#"{{"user_id":"u","timestamp":1,"a":{}1{}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        assert_eq!(reason(&deep, &nested), "too_deeply_nested");
        let fine = format!(
            r#"{{"user_id":"u","timestamp":1,"a":{}1{},"s":"[[[[{{"}}"#,
            "[".repeat(60),
            "]".repeat(60)
        );
        assert!(deep.decode(fine.as_bytes(), None, None).is_ok());
        // The boundary: the object and 63 arrays nest 64 deep, one more array is too deep.
        let at = |arrays: usize| {
            format!(
                r#"{{"user_id":"u","timestamp":1,"a":{}1{}}}"#,
                "[".repeat(arrays),
                "]".repeat(arrays)
            )
        };
        assert!(deep
            .decode(at(MAX_DEPTH - 1).as_bytes(), None, None)
            .is_ok());
        assert_eq!(reason(&deep, &at(MAX_DEPTH)), "too_deeply_nested");
        assert_eq!(
            reason(&deep, r#"{"user_id":"u","timestamp":1,"session":1}"#),
            "annotation_field_present"
        );
        assert_eq!(
            reason(&deep, r#"{"user_id":"u","timestamp":1,"event":7}"#),
            "invalid_event_name"
        );
    }

    #[test]
    fn classes_rules_and_scope() {
        let d = decoder(|r| {
            r.session.start_events = Some(vec!["open".into()]);
            r.session.end_events = Some(vec!["close".into()]);
            r.session.excluded_events = Some(vec!["push".into()]);
            r.session.timeout_rules = Some(vec![crate::config::raw::RawTimeoutRule {
                field: "platform".into(),
                values: vec!["ios".into(), "android".into()],
                timeout: "5m".into(),
            }]);
            r.input.scope_fields = Some(vec!["device".into()]);
        });
        fn dec<'a>(d: &Decoder, s: &'a str) -> Decoded<'a> {
            d.decode(s.as_bytes(), None, None).unwrap()
        }
        let dec = |s: &'static str| dec(&d, s);
        assert_eq!(
            dec(r#"{"user_id":"u","timestamp":1,"event":"open"}"#).class,
            EventClass::Start
        );
        assert_eq!(
            dec(r#"{"user_id":"u","timestamp":1,"event":"close"}"#).class,
            EventClass::End
        );
        assert_eq!(
            dec(r#"{"user_id":"u","timestamp":1,"event":"push"}"#).class,
            EventClass::Excluded
        );
        assert_eq!(
            dec(r#"{"user_id":"u","timestamp":1,"event":"x"}"#).class,
            EventClass::Engagement
        );
        assert_eq!(
            dec(r#"{"user_id":"u","timestamp":1}"#).class,
            EventClass::Engagement
        );
        assert_eq!(
            dec(r#"{"user_id":"u","timestamp":1,"platform":"ios"}"#).timeout,
            300_000
        );
        assert_eq!(
            dec(r#"{"user_id":"u","timestamp":1,"platform":"web"}"#).timeout,
            1_800_000
        );
        let e = dec(r#"{"user_id":"u","timestamp":1,"device":"d1"}"#);
        assert_eq!(e.key, "u\u{1f}d1");
        assert_eq!(e.user, "u");
        assert_eq!(d.scope_of(&e.key), vec![("device", "d1")]);
        assert_eq!(dec(r#"{"user_id":"u","timestamp":1}"#).key, "u\u{1f}");
        // The separator inside a part is refused: these two would share the key "a␟b␟c".
        for (bad, what) in [
            (
                r#"{"user_id":"a\u001fb","timestamp":1,"device":"c"}"#,
                "the user id",
            ),
            (
                r#"{"user_id":"a","timestamp":1,"device":"b\u001fc"}"#,
                "`device`",
            ),
        ] {
            let e = d.decode(bad.as_bytes(), None, None).unwrap_err();
            assert_eq!(e.reason(), "invalid_scope_value");
            assert!(e.to_string().contains(what), "{e}");
        }
        // Without scope fields the user id alone is the key: nothing to confuse it with.
        let plain = decoder(|_| {});
        let u = plain
            .decode(br#"{"user_id":"a\u001fb","timestamp":1}"#, None, None)
            .unwrap();
        assert_eq!(u.key, "a\u{1f}b");
    }
}
