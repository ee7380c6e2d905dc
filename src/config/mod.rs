//! Configuration: the raw form ([`raw::RawConfig`], TOML + overrides) and the validated form
//! ([`Settings`]) that the rest of the program uses. Every validation error names its key.

pub mod raw;

use crate::engine::{AnnotateMode, EngineConfig, FuturePolicy, Millis};
use raw::RawConfig;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem; the message names the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// How the event time is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeFormat {
    /// Numbers below 10^11 are epoch seconds, larger ones epoch milliseconds (with or without
    /// a fraction); strings are RFC 3339 (or numbers).
    Auto,
    Millis,
    Seconds,
    Rfc3339,
    /// The Kafka record timestamp (streaming only: offline mode refuses it, its lines have none).
    RecordTimestamp,
}

/// A timeout chosen by the value of an event field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeoutRule {
    pub field: String,
    pub values: Vec<String>,
    pub timeout: Millis,
}

/// What the codec needs to decode input records.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeSettings {
    pub user_id_field: String,
    pub time_field: String,
    pub event_field: String,
    pub time_format: TimeFormat,
    pub scope_fields: Vec<String>,
    pub max_record_bytes: usize,
    pub default_timeout: Millis,
    pub timeout_rules: Vec<TimeoutRule>,
    pub start_events: HashSet<String>,
    pub end_events: HashSet<String>,
    pub excluded_events: HashSet<String>,
    /// Name of the field added to annotated events.
    pub annotation_field: String,
}

/// The default `kafka.commit_interval`. Exactly-once: 100 ms, since read_committed readers see
/// outputs only once their transaction commits. At-least-once: 1 s, since outputs go out at
/// once and the interval only bounds what is produced again after a crash; every commit costs
/// a state transaction, and with 100 ms these halved the throughput in the end-to-end
/// benchmark (BENCHMARKS.md).
pub fn default_commit_interval(guarantee: Guarantee) -> &'static str {
    match guarantee {
        Guarantee::ExactlyOnce => "100ms",
        Guarantee::AtLeastOnce => "1s",
    }
}

/// The default `kafka.catch_up_commit_interval`: 1 s, or the commit interval if longer. While
/// a partition reads a backlog, nobody waits for its outputs to become visible within 100 ms,
/// and each commit costs a transaction and writes every key state the interval touched: in
/// standalone runs exactly-once took a backlog in about 15 % faster, with 15-25 % less CPU
/// per event, than with 100 ms commits (BENCHMARKS.md, tenth session).
pub const CATCH_UP_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// The default `kafka.catch_up_commit_interval` for `commit_interval`.
pub fn default_catch_up_commit_interval(commit_interval: Duration) -> Duration {
    commit_interval.max(CATCH_UP_COMMIT_INTERVAL)
}

/// The default `kafka.transaction_timeout`: 10 s, or twice the catch-up commit interval if
/// that is longer (a transaction spans up to one interval, and must not time out while the
/// next one waits for it), so a longer commit interval alone never makes a configuration
/// invalid.
pub fn default_transaction_timeout(catch_up_commit_interval: Duration) -> Duration {
    (catch_up_commit_interval * 2).max(Duration::from_secs(10))
}

/// Delivery guarantee of the streaming mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarantee {
    /// Kafka transactions: the outputs, the changelog records and the input offsets of a
    /// commit interval become visible to read_committed readers together, or not at all.
    ExactlyOnce,
    /// Outputs are not transactional; once they are delivered, the state (changelog records)
    /// and input offsets of a commit commit in one Kafka transaction, then in RocksDB. After a
    /// crash, outputs since the last commit are produced again, identically.
    AtLeastOnce,
}

impl Guarantee {
    /// The guarantee a `kafka.guarantee` value names.
    fn parse(name: &str) -> Option<Self> {
        match name {
            "at-least-once" | "at_least_once" => Some(Guarantee::AtLeastOnce),
            "exactly-once" | "exactly_once" => Some(Guarantee::ExactlyOnce),
            _ => None,
        }
    }
}

/// The streaming mode's settings (Kafka and process).
#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeSettings {
    pub brokers: String,
    pub group: String,
    pub input_topics: Vec<String>,
    pub annotated_topic: String,
    pub sessions_topic: String,
    pub late_topic: String,
    pub dlq_topic: String,
    pub stats_topic: String,
    pub guarantee: Guarantee,
    pub commit_interval: Duration,
    /// The commit interval while some input partition reads a backlog (at least
    /// `commit_interval`; see the pipeline's module docs).
    pub catch_up_commit_interval: Duration,
    pub changelog_topic: String,
    pub instance_id: String,
    pub transaction_timeout: Duration,
    /// Standby copies kept per owned partition (see [`crate::kafka::standby`]).
    pub standby_replicas: u32,
    /// librdkafka properties passed through to the consumer and the producer.
    pub properties: std::collections::BTreeMap<String, String>,
    pub state_dir: PathBuf,
    pub metrics_addr: std::net::SocketAddr,
    pub json_logs: bool,
    /// How long a graceful shutdown waits for its final commit before it gives up on it (the
    /// partitions' next owner then redoes the work since the last commit).
    pub shutdown_timeout: Duration,
    /// Memory for the state of every partition of the instance, in bytes (see
    /// [`crate::store::StateMemory`]).
    pub memory_budget: usize,
    /// The largest record the producers take (their `message.max.bytes`, unless
    /// `kafka.properties` sets it): `input.max_record_bytes` plus [`OUTPUT_HEADROOM`], at least
    /// [`LIBRDKAFKA_MESSAGE_MAX_BYTES`], so that no output of an accepted record is refused.
    pub max_output_bytes: usize,
}

/// Default of `input.max_record_bytes`: an accepted record's annotated output (the record
/// plus its annotation, a few hundred bytes, and at worst 1/255 more once lz4 frames it) then
/// fits Kafka's default `max.message.bytes` of topics (1,048,588 bytes). The producers allow
/// [`OUTPUT_HEADROOM`] more than the input limit.
pub const DEFAULT_MAX_RECORD_BYTES: u64 = 1_000_000;

/// librdkafka's default `message.max.bytes`: the producers never take less.
pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// What an output record may add to the input record it comes from: the annotation, a dead
/// letter's or late event's headers. The producers' `message.max.bytes` is at least
/// `input.max_record_bytes` plus this (see [`RuntimeSettings::max_output_bytes`]).
pub const OUTPUT_HEADROOM: usize = 64 << 10;

/// Default of `service.memory_budget_mib`.
pub const DEFAULT_MEMORY_BUDGET_MIB: u64 = 1024;
/// Smallest `service.memory_budget_mib`.
pub const MIN_MEMORY_BUDGET_MIB: u64 = 64;

/// librdkafka properties the service sets itself; configuring them is an error.
pub const MANAGED_PROPERTIES: [&str; 9] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "partition.assignment.strategy",
    "enable.partition.eof",
    "isolation.level",
    "transactional.id",
    "transaction.timeout.ms",
];

/// Whether a property's value must never be printed or logged.
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "ssl.key.pem",
        "key.password",
        "token",
        "credential",
        // The rest of what librdkafka itself redacts (rdkafka_conf.c, _RK_SENSITIVE).
        "sasl.username",
        "oauthbearer.config",
        "private.key",
        "passphrase",
        "ssl.key.location",
        "ssl.ca.pem",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub engine: EngineConfig,
    pub decode: DecodeSettings,
    pub runtime: RuntimeSettings,
    /// The effective raw configuration (defaults filled in), for `sessionizer check`.
    pub effective: RawConfig,
}

/// Reads the TOML file at `path` (if any), applies `overrides`, validates.
pub fn load(path: Option<&Path>, overrides: &RawConfig) -> Result<Settings, ConfigError> {
    let mut raw = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?;
            toml::from_str::<RawConfig>(&text).map_err(|e| ConfigError::Parse {
                path: p.to_owned(),
                message: e.to_string(),
            })?
        }
        None => RawConfig::default(),
    };
    raw.overlay(overrides);
    validate(&raw)
}

fn duration(key: &str, v: Option<&str>, default: &str) -> Result<Millis, ConfigError> {
    let text = v.unwrap_or(default);
    parse_duration(text).map_err(|p| invalid(key, p))
}

/// Parses a duration such as `30m`, `1h 30m`, `500ms`, `72h`, or `0`.
pub fn parse_duration(text: &str) -> Result<Millis, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(0);
    }
    let d: Duration = humantime::parse_duration(t)
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. 30m, 90s, 1h 30m"))?;
    Millis::try_from(d.as_millis()).map_err(|_| format!("`{text}` is too long"))
}

/// A duration that must be positive, as a [`Duration`].
fn positive_duration(key: &str, v: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let ms = positive(key, duration(key, v, default)?)?;
    Ok(Duration::from_millis(ms.unsigned_abs()))
}

fn positive(key: &str, v: Millis) -> Result<Millis, ConfigError> {
    if v <= 0 {
        Err(invalid(key, "must be greater than zero"))
    } else {
        Ok(v)
    }
}

fn field_name(key: &str, v: Option<&String>, default: &str) -> Result<String, ConfigError> {
    let s = v.map_or(default, |s| s.as_str());
    if s.trim().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    Ok(s.to_owned())
}

/// Validates a raw configuration.
pub fn validate(raw: &RawConfig) -> Result<Settings, ConfigError> {
    let i = &raw.input;
    let s = &raw.session;
    let t = &raw.time;
    let o = &raw.output;

    let user_id_field = field_name("input.user_id_field", i.user_id_field.as_ref(), "user_id")?;
    let time_field = field_name("input.time_field", i.time_field.as_ref(), "timestamp")?;
    let event_field = field_name("input.event_field", i.event_field.as_ref(), "event")?;
    let time_format = match i.time_format.as_deref().unwrap_or("auto") {
        "auto" => TimeFormat::Auto,
        "millis" => TimeFormat::Millis,
        "seconds" => TimeFormat::Seconds,
        "rfc3339" => TimeFormat::Rfc3339,
        "record_timestamp" => TimeFormat::RecordTimestamp,
        other => {
            return Err(invalid(
                "input.time_format",
                format!("`{other}` is not one of auto, millis, seconds, rfc3339, record_timestamp"),
            ))
        }
    };
    let scope_fields = i.scope_fields.clone().unwrap_or_default();
    for f in &scope_fields {
        if f.trim().is_empty() {
            return Err(invalid(
                "input.scope_fields",
                "field names must not be empty",
            ));
        }
        if *f == user_id_field {
            return Err(invalid(
                "input.scope_fields",
                format!("`{f}` is the user id field; sessions are always scoped by user"),
            ));
        }
    }
    let max_record_bytes = i.max_record_bytes.unwrap_or(DEFAULT_MAX_RECORD_BYTES);
    if max_record_bytes == 0 {
        return Err(invalid(
            "input.max_record_bytes",
            "must be greater than zero",
        ));
    }

    let default_timeout = positive(
        "session.timeout",
        duration("session.timeout", s.timeout.as_deref(), "30m")?,
    )?;
    let mut timeout_rules = Vec::new();
    for (n, r) in s.timeout_rules.iter().flatten().enumerate() {
        let key = format!("session.timeout_rules[{n}]");
        if r.field.trim().is_empty() {
            return Err(invalid(&format!("{key}.field"), "must not be empty"));
        }
        if r.values.is_empty() {
            return Err(invalid(
                &format!("{key}.values"),
                "must list at least one value",
            ));
        }
        let tk = format!("{key}.timeout");
        let timeout = positive(&tk, duration(&tk, Some(&r.timeout), "")?)?;
        timeout_rules.push(TimeoutRule {
            field: r.field.clone(),
            values: r.values.clone(),
            timeout,
        });
    }
    for (key, names) in [
        ("session.start_events", &s.start_events),
        ("session.end_events", &s.end_events),
        ("session.excluded_events", &s.excluded_events),
    ] {
        if names.iter().flatten().any(|n| n.is_empty()) {
            return Err(invalid(key, "event names must not be empty"));
        }
    }
    let set = |v: &Option<Vec<String>>| -> HashSet<String> {
        v.iter().flatten().cloned().collect::<HashSet<_>>()
    };
    let start_events = set(&s.start_events);
    let end_events = set(&s.end_events);
    let excluded_events = set(&s.excluded_events);
    for (a, an, b, bn) in [
        (
            &start_events,
            "session.start_events",
            &end_events,
            "session.end_events",
        ),
        (
            &start_events,
            "session.start_events",
            &excluded_events,
            "session.excluded_events",
        ),
        (
            &end_events,
            "session.end_events",
            &excluded_events,
            "session.excluded_events",
        ),
    ] {
        if let Some(both) = a.intersection(b).next() {
            return Err(invalid(
                an,
                format!("event `{both}` is also listed in `{bn}`"),
            ));
        }
    }
    let max_length = match s.max_length.as_deref() {
        None | Some("") | Some("none") => None,
        Some(v) => Some(positive(
            "session.max_length",
            duration("session.max_length", Some(v), "")?,
        )?),
    };
    let day_boundary = match s.day_boundary_time_zone.as_deref() {
        None | Some("") | Some("none") => None,
        Some(z) => Some(z.parse::<chrono_tz::Tz>().map_err(|_| {
            invalid(
                "session.day_boundary_time_zone",
                format!("`{z}` is not an IANA time zone name (e.g. Europe/Berlin, UTC)"),
            )
        })?),
    };

    let allowed_lateness = duration("time.allowed_lateness", t.allowed_lateness.as_deref(), "1m")?;
    let lateness_horizon = duration(
        "time.lateness_horizon",
        t.lateness_horizon.as_deref(),
        "72h",
    )?;
    if lateness_horizon < allowed_lateness {
        return Err(invalid(
            "time.lateness_horizon",
            "must be at least time.allowed_lateness (otherwise events within the allowed lateness would be late)",
        ));
    }
    let quiet_period = duration("time.quiet_period", t.quiet_period.as_deref(), "5s")?;
    let idle_after = positive(
        "time.idle_after",
        duration("time.idle_after", t.idle_after.as_deref(), "10s")?,
    )?;
    let max_future_skew = duration("time.max_future_skew", t.max_future_skew.as_deref(), "1h")?;
    let future_policy = match t.future_events.as_deref().unwrap_or("dead_letter") {
        "dead_letter" => FuturePolicy::DeadLetter,
        "clamp" => FuturePolicy::Clamp,
        other => {
            return Err(invalid(
                "time.future_events",
                format!("`{other}` is not one of dead_letter, clamp"),
            ))
        }
    };
    let annotate = match o.annotate.as_deref().unwrap_or("on_arrival") {
        "on_arrival" => AnnotateMode::OnArrival,
        "on_close" => AnnotateMode::OnClose,
        other => {
            return Err(invalid(
                "output.annotate",
                format!("`{other}` is not one of on_arrival, on_close"),
            ))
        }
    };
    let annotation_field = field_name(
        "output.annotation_field",
        o.annotation_field.as_ref(),
        "session",
    )?;
    // A record that has the annotation field is a dead letter: naming a field every event
    // must have would dead-letter them all.
    let read = [
        ("input.user_id_field", &user_id_field),
        ("input.time_field", &time_field),
        ("input.event_field", &event_field),
    ];
    let rule_fields = timeout_rules
        .iter()
        .map(|r| ("session.timeout_rules", &r.field));
    let scopes = scope_fields.iter().map(|f| ("input.scope_fields", f));
    if let Some((key, _)) = read
        .into_iter()
        .chain(scopes)
        .chain(rule_fields)
        .find(|(_, f)| **f == annotation_field)
    {
        return Err(invalid(
            "output.annotation_field",
            format!("`{annotation_field}` is also read as `{key}`: every record that has it would be a dead letter"),
        ));
    }

    let engine = EngineConfig {
        allowed_lateness,
        lateness_horizon,
        quiet_period,
        idle_after,
        max_future_skew,
        future_policy,
        annotate,
        max_length,
        day_boundary,
    };
    let decode = DecodeSettings {
        user_id_field,
        time_field,
        event_field,
        time_format,
        scope_fields,
        max_record_bytes: usize::try_from(max_record_bytes).unwrap_or(usize::MAX),
        default_timeout,
        timeout_rules,
        start_events,
        end_events,
        excluded_events,
        annotation_field,
    };
    let runtime = validate_runtime(raw, decode.max_record_bytes)?;
    Ok(Settings {
        engine,
        decode,
        runtime,
        effective: effective(raw),
    })
}

/// The runtime settings; `max_record_bytes` is the validated `input.max_record_bytes`.
fn validate_runtime(
    raw: &RawConfig,
    max_record_bytes: usize,
) -> Result<RuntimeSettings, ConfigError> {
    let k = &raw.kafka;
    let name = |key: &str, v: &Option<String>, default: &str| -> Result<String, ConfigError> {
        let s = v.as_deref().unwrap_or(default).trim().to_owned();
        if s.is_empty() {
            return Err(invalid(key, "must not be empty"));
        }
        Ok(s)
    };
    let brokers = name("kafka.brokers", &k.brokers, "127.0.0.1:9092")?;
    let group = name("kafka.group", &k.group, "sessionizer")?;
    let input_topics = k
        .input_topics
        .clone()
        .unwrap_or_else(|| vec!["events".into()]);
    if input_topics.is_empty() || input_topics.iter().any(|t| t.trim().is_empty()) {
        return Err(invalid(
            "kafka.input_topics",
            "must name at least one topic, none empty",
        ));
    }
    if let Some(t) = input_topics
        .iter()
        .enumerate()
        .find_map(|(i, t)| input_topics[..i].contains(t).then_some(t))
    {
        return Err(invalid(
            "kafka.input_topics",
            format!("`{t}` is named twice"),
        ));
    }
    let annotated_topic = name(
        "kafka.annotated_topic",
        &k.annotated_topic,
        "events-sessionized",
    )?;
    let sessions_topic = name("kafka.sessions_topic", &k.sessions_topic, "sessions")?;
    let late_topic = name("kafka.late_topic", &k.late_topic, "events-late")?;
    let dlq_topic = name("kafka.dlq_topic", &k.dlq_topic, "events-dlq")?;
    let stats_topic = name("kafka.stats_topic", &k.stats_topic, "user-session-stats")?;
    let outputs = [
        ("kafka.annotated_topic", &annotated_topic),
        ("kafka.sessions_topic", &sessions_topic),
        ("kafka.late_topic", &late_topic),
        ("kafka.dlq_topic", &dlq_topic),
        ("kafka.stats_topic", &stats_topic),
    ];
    for (i, (key, t)) in outputs.iter().enumerate() {
        if input_topics.contains(t) {
            return Err(invalid(key, format!("`{t}` is also an input topic")));
        }
        if let Some((other, _)) = outputs[..i].iter().find(|(_, o)| o == t) {
            return Err(invalid(
                key,
                format!("`{t}` is also {other}: every output needs a topic of its own"),
            ));
        }
    }
    let given = k.guarantee.as_deref().unwrap_or("exactly-once");
    let guarantee = Guarantee::parse(given).ok_or_else(|| {
        invalid(
            "kafka.guarantee",
            format!("`{given}` is not one of at-least-once, exactly-once"),
        )
    })?;
    let commit_interval = positive_duration(
        "kafka.commit_interval",
        k.commit_interval.as_deref(),
        default_commit_interval(guarantee),
    )?;
    let catch_up_commit_interval = match k.catch_up_commit_interval.as_deref() {
        None => default_catch_up_commit_interval(commit_interval),
        given => {
            let d = positive_duration("kafka.catch_up_commit_interval", given, "1s")?;
            if d < commit_interval {
                return Err(invalid(
                    "kafka.catch_up_commit_interval",
                    "must be at least kafka.commit_interval",
                ));
            }
            d
        }
    };
    let changelog_topic = name(
        "kafka.changelog_topic",
        &k.changelog_topic,
        &format!("{group}-changelog"),
    )?;
    if input_topics.contains(&changelog_topic)
        || outputs.iter().any(|(_, t)| **t == changelog_topic)
    {
        return Err(invalid(
            "kafka.changelog_topic",
            format!("`{changelog_topic}` is already used as an input or output topic"),
        ));
    }
    let instance_id = match &k.instance_id {
        Some(id) => id.clone(),
        None => default_instance_id(),
    };
    if instance_id.is_empty()
        || !instance_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(invalid(
            "kafka.instance_id",
            format!(
                "`{instance_id}` must be non-empty and use only letters, digits, `.`, `_`, `-`"
            ),
        ));
    }
    let transaction_timeout = match k.transaction_timeout.as_deref() {
        None => default_transaction_timeout(catch_up_commit_interval),
        given => positive_duration("kafka.transaction_timeout", given, "10s")?,
    };
    if transaction_timeout < catch_up_commit_interval * 2 {
        return Err(invalid(
            "kafka.transaction_timeout",
            "must be at least twice kafka.commit_interval and kafka.catch_up_commit_interval",
        ));
    }
    let properties = k.properties.clone().unwrap_or_default();
    for key in properties.keys() {
        if MANAGED_PROPERTIES.contains(&key.as_str()) {
            return Err(invalid(
                &format!("kafka.properties.{key}"),
                "is managed by sessionizer (use kafka.brokers / kafka.group, or leave it out)",
            ));
        }
    }
    let max_output_bytes = max_record_bytes
        .saturating_add(OUTPUT_HEADROOM)
        .max(LIBRDKAFKA_MESSAGE_MAX_BYTES);
    if let Some(v) = properties.get("message.max.bytes") {
        if v.trim()
            .parse::<usize>()
            .is_ok_and(|n| n < max_output_bytes)
        {
            return Err(invalid(
                "kafka.properties.message.max.bytes",
                format!(
                    "`{v}` is less than input.max_record_bytes + {OUTPUT_HEADROOM} \
                     ({max_output_bytes}): the outputs of an accepted record must fit"
                ),
            ));
        }
    }
    let s = &raw.service;
    let state_dir = PathBuf::from(s.state_dir.as_deref().unwrap_or("./sessionizer-state"));
    let addr = s.metrics_addr.as_deref().unwrap_or("127.0.0.1:9464");
    let metrics_addr = addr.parse().map_err(|_| {
        invalid(
            "service.metrics_addr",
            format!("`{addr}` is not an address like 127.0.0.1:9464"),
        )
    })?;
    let json_logs = match s.log_format.as_deref().unwrap_or("human") {
        "human" => false,
        "json" => true,
        other => {
            return Err(invalid(
                "service.log_format",
                format!("`{other}` is not one of human, json"),
            ))
        }
    };
    let shutdown_timeout = positive_duration(
        "service.shutdown_timeout",
        s.shutdown_timeout.as_deref(),
        "30s",
    )?;
    let mib = s.memory_budget_mib.unwrap_or(DEFAULT_MEMORY_BUDGET_MIB);
    if !(MIN_MEMORY_BUDGET_MIB..=1 << 30).contains(&mib) {
        return Err(invalid(
            "service.memory_budget_mib",
            format!("{mib} MiB is not between {MIN_MEMORY_BUDGET_MIB} MiB and 1 PiB"),
        ));
    }
    Ok(RuntimeSettings {
        brokers,
        group,
        input_topics,
        annotated_topic,
        sessions_topic,
        late_topic,
        dlq_topic,
        stats_topic,
        guarantee,
        commit_interval,
        catch_up_commit_interval,
        changelog_topic,
        instance_id,
        transaction_timeout,
        standby_replicas: k.standby_replicas.unwrap_or(0),
        properties,
        state_dir,
        metrics_addr,
        json_logs,
        shutdown_timeout,
        memory_budget: usize::try_from(mib << 20).unwrap_or(usize::MAX),
        max_output_bytes,
    })
}

/// The default instance id: the host name (a StatefulSet pod's name), else `sessionizer`.
pub fn default_instance_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sessionizer".to_owned())
}

/// The raw configuration with every default written out.
fn effective(raw: &RawConfig) -> RawConfig {
    let mut e = raw.clone();
    let d = |v: &mut Option<String>, def: &str| {
        if v.is_none() {
            *v = Some(def.to_owned());
        }
    };
    d(&mut e.input.user_id_field, "user_id");
    d(&mut e.input.time_field, "timestamp");
    d(&mut e.input.event_field, "event");
    d(&mut e.input.time_format, "auto");
    e.input.scope_fields.get_or_insert_with(Vec::new);
    e.input
        .max_record_bytes
        .get_or_insert(DEFAULT_MAX_RECORD_BYTES);
    d(&mut e.session.timeout, "30m");
    e.session.timeout_rules.get_or_insert_with(Vec::new);
    e.session.start_events.get_or_insert_with(Vec::new);
    e.session.end_events.get_or_insert_with(Vec::new);
    e.session.excluded_events.get_or_insert_with(Vec::new);
    d(&mut e.session.max_length, "none");
    d(&mut e.session.day_boundary_time_zone, "none");
    d(&mut e.time.allowed_lateness, "1m");
    d(&mut e.time.lateness_horizon, "72h");
    d(&mut e.time.quiet_period, "5s");
    d(&mut e.time.idle_after, "10s");
    d(&mut e.time.max_future_skew, "1h");
    d(&mut e.time.future_events, "dead_letter");
    d(&mut e.output.annotate, "on_arrival");
    d(&mut e.output.annotation_field, "session");
    d(&mut e.kafka.brokers, "127.0.0.1:9092");
    d(&mut e.kafka.group, "sessionizer");
    e.kafka
        .input_topics
        .get_or_insert_with(|| vec!["events".into()]);
    d(&mut e.kafka.annotated_topic, "events-sessionized");
    d(&mut e.kafka.sessions_topic, "sessions");
    d(&mut e.kafka.late_topic, "events-late");
    d(&mut e.kafka.dlq_topic, "events-dlq");
    d(&mut e.kafka.stats_topic, "user-session-stats");
    d(&mut e.kafka.guarantee, "exactly-once");
    let guarantee = e
        .kafka
        .guarantee
        .as_deref()
        .and_then(Guarantee::parse)
        .unwrap_or(Guarantee::ExactlyOnce);
    d(
        &mut e.kafka.commit_interval,
        default_commit_interval(guarantee),
    );
    // A default that follows another setting, as written (already filled in above).
    let follow = |from: &Option<String>, unset: Duration, f: fn(Duration) -> Duration| {
        let d = from
            .as_deref()
            .and_then(|s| humantime::parse_duration(s).ok())
            .map_or(unset, f);
        humantime::format_duration(d).to_string()
    };
    let catch_up = follow(
        &e.kafka.commit_interval,
        CATCH_UP_COMMIT_INTERVAL,
        default_catch_up_commit_interval,
    );
    d(&mut e.kafka.catch_up_commit_interval, &catch_up);
    let group = e.kafka.group.clone().unwrap_or_default();
    d(&mut e.kafka.changelog_topic, &format!("{group}-changelog"));
    d(&mut e.kafka.instance_id, &default_instance_id());
    let transaction_timeout = follow(
        &e.kafka.catch_up_commit_interval,
        Duration::from_secs(10),
        default_transaction_timeout,
    );
    d(&mut e.kafka.transaction_timeout, &transaction_timeout);
    e.kafka.standby_replicas.get_or_insert(0);
    let props = e.kafka.properties.get_or_insert_with(Default::default);
    for (k, v) in props.iter_mut() {
        if is_secret(k) {
            *v = "<redacted>".into();
        }
    }
    d(&mut e.service.state_dir, "./sessionizer-state");
    d(&mut e.service.metrics_addr, "127.0.0.1:9464");
    d(&mut e.service.log_format, "human");
    d(&mut e.service.shutdown_timeout, "30s");
    e.service
        .memory_budget_mib
        .get_or_insert(DEFAULT_MEMORY_BUDGET_MIB);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(raw: RawConfig) -> String {
        validate(&raw).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid() {
        let s = validate(&RawConfig::default()).unwrap();
        assert_eq!(s.decode.default_timeout, 30 * 60_000);
        assert_eq!(s.engine.lateness_horizon, 72 * 3_600_000);
        assert_eq!(s.engine.annotate, AnnotateMode::OnArrival);
    }

    #[test]
    fn the_commit_interval_defaults_by_guarantee() {
        let mut r = RawConfig::default();
        assert_eq!(
            validate(&r).unwrap().runtime.commit_interval,
            Duration::from_millis(100)
        );
        r.kafka.guarantee = Some("at-least-once".into());
        let s = validate(&r).unwrap();
        assert_eq!(s.runtime.commit_interval, Duration::from_secs(1));
        assert_eq!(validate(&s.effective).unwrap().runtime, s.runtime);
        r.kafka.commit_interval = Some("250ms".into());
        assert_eq!(
            validate(&r).unwrap().runtime.commit_interval,
            Duration::from_millis(250)
        );
    }

    /// The runtime settings of the given commit interval, catch-up commit interval and
    /// transaction timeout, checking that what `check` prints gives the same settings back.
    fn commit_settings(
        commit: Option<&str>,
        catch_up: Option<&str>,
        transaction_timeout: Option<&str>,
    ) -> Result<RuntimeSettings, ConfigError> {
        let mut r = RawConfig::default();
        r.kafka.commit_interval = commit.map(Into::into);
        r.kafka.catch_up_commit_interval = catch_up.map(Into::into);
        r.kafka.transaction_timeout = transaction_timeout.map(Into::into);
        let s = validate(&r)?;
        assert_eq!(validate(&s.effective).unwrap().runtime, s.runtime);
        Ok(s.runtime)
    }

    #[test]
    fn the_catch_up_commit_interval_is_at_least_the_commit_interval() {
        let catch_up = |commit: Option<&str>, catch_up: Option<&str>| {
            commit_settings(commit, catch_up, None).map(|r| r.catch_up_commit_interval)
        };
        let secs = Duration::from_secs;
        assert_eq!(catch_up(None, None).unwrap(), secs(1));
        assert_eq!(catch_up(Some("3s"), None).unwrap(), secs(3));
        assert_eq!(catch_up(None, Some("5s")).unwrap(), secs(5));
        assert_eq!(
            catch_up(None, Some("100ms")).unwrap(),
            Duration::from_millis(100)
        );
        let e = catch_up(Some("2s"), Some("1s")).unwrap_err().to_string();
        assert!(
            e.contains("kafka.catch_up_commit_interval") && e.contains("at least"),
            "{e}"
        );
        // The transaction timeout's default follows (twice the catch-up interval).
        assert_eq!(catch_up(None, Some("6s")).unwrap(), secs(6));
        assert_eq!(catch_up(Some("30s"), None).unwrap(), secs(30));
    }

    #[test]
    fn the_transaction_timeout_outlasts_two_catch_up_intervals() {
        let timeout = |commit: Option<&str>, catch_up: Option<&str>, given: Option<&str>| {
            commit_settings(commit, catch_up, given).map(|r| r.transaction_timeout)
        };
        let secs = Duration::from_secs;
        assert_eq!(timeout(None, None, None).unwrap(), secs(10));
        assert_eq!(timeout(None, Some("6s"), None).unwrap(), secs(12));
        assert_eq!(timeout(Some("30s"), None, None).unwrap(), secs(60));
        assert_eq!(timeout(None, Some("6s"), Some("20s")).unwrap(), secs(20));
        // Only a timeout given too short is an error.
        let e = timeout(None, Some("6s"), Some("10s"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kafka.transaction_timeout") && e.contains("twice"),
            "{e}"
        );
    }

    #[test]
    fn the_printed_defaults_are_the_defaults_in_force() {
        // `effective` writes the defaults out a second time, for `sessionizer check`: feeding
        // its output back must give the same settings.
        let a = validate(&RawConfig::default()).unwrap();
        let b = validate(&a.effective).unwrap();
        assert_eq!(a.engine, b.engine);
        assert_eq!(a.decode, b.decode);
        assert_eq!(a.runtime, b.runtime);
    }

    #[test]
    fn the_producers_take_every_output_of_an_accepted_record() {
        let s = validate(&RawConfig::default()).unwrap();
        assert_eq!(s.decode.max_record_bytes, 1_000_000);
        assert_eq!(s.runtime.max_output_bytes, 1_000_000 + OUTPUT_HEADROOM);
        let mut r = RawConfig::default();
        r.input.max_record_bytes = Some(100);
        assert_eq!(validate(&r).unwrap().runtime.max_output_bytes, 1_000_000);
        let mut r = RawConfig::default();
        r.input.max_record_bytes = Some(4 << 20);
        let max = (4 << 20) + OUTPUT_HEADROOM;
        assert_eq!(validate(&r).unwrap().runtime.max_output_bytes, max);
        // A message.max.bytes given must be as large.
        r.kafka.properties = Some([("message.max.bytes".into(), (max - 1).to_string())].into());
        assert!(err(r.clone()).contains("`kafka.properties.message.max.bytes`"));
        r.kafka.properties = Some([("message.max.bytes".into(), max.to_string())].into());
        assert!(validate(&r).is_ok());
    }

    #[test]
    fn errors_name_the_key() {
        let mut r = RawConfig::default();
        r.session.timeout = Some("soon".into());
        assert!(err(r).contains("`session.timeout`"));
        let mut r = RawConfig::default();
        r.session.day_boundary_time_zone = Some("Mars/Olympus".into());
        assert!(err(r).contains("`session.day_boundary_time_zone`"));
        let mut r = RawConfig::default();
        r.session.start_events = Some(vec!["open".into()]);
        r.session.excluded_events = Some(vec!["open".into()]);
        assert!(err(r).contains("`session.start_events`"));
        let mut r = RawConfig::default();
        r.time.allowed_lateness = Some("2h".into());
        r.time.lateness_horizon = Some("1h".into());
        assert!(err(r).contains("`time.lateness_horizon`"));
        let mut r = RawConfig::default();
        r.output.annotate = Some("later".into());
        assert!(err(r).contains("`output.annotate`"));
    }

    #[test]
    fn kafka_settings_validate_and_secrets_are_redacted() {
        let mut r = RawConfig::default();
        r.kafka.properties = Some(
            [
                ("sasl.password".to_string(), "hunter2".to_string()),
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
            ]
            .into(),
        );
        let s = validate(&r).unwrap();
        assert_eq!(s.runtime.properties["sasl.password"], "hunter2");
        let shown = toml::to_string(&s.effective).unwrap();
        assert!(
            !shown.contains("hunter2") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(shown.contains("SASL_SSL"));
        for key in [
            "sasl.username",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.assertion.private.key.pem",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "ssl.keystore.password",
            "ssl.key.location",
            "ssl.ca.pem",
        ] {
            assert!(is_secret(key), "{key} is shown");
        }
        assert!(!is_secret("security.protocol") && !is_secret("ssl.ca.location"));
        let mut r = RawConfig::default();
        r.kafka.properties = Some([("group.id".to_string(), "x".to_string())].into());
        assert!(err(r).contains("`kafka.properties.group.id`"));
        let mut r = RawConfig::default();
        r.kafka.sessions_topic = Some("events".into());
        assert!(err(r).contains("`kafka.sessions_topic`"));
        let mut r = RawConfig::default();
        r.kafka.stats_topic = Some("sessions".into());
        let e = err(r);
        assert!(
            e.contains("`kafka.stats_topic`") && e.contains("kafka.sessions_topic"),
            "{e}"
        );
        let mut r = RawConfig::default();
        r.service.metrics_addr = Some("nowhere".into());
        assert!(err(r).contains("`service.metrics_addr`"));
        let mut r = RawConfig::default();
        r.service.memory_budget_mib = Some(32);
        assert!(err(r).contains("`service.memory_budget_mib`"));
        let mut r = RawConfig::default();
        r.kafka.input_topics = Some(vec!["a".into(), "b".into(), "a".into()]);
        assert!(err(r).contains("`kafka.input_topics`"));
    }

    #[test]
    fn settings_that_would_dead_letter_every_record_are_refused() {
        for field in ["user_id", "timestamp", "event", "device", "platform"] {
            let mut r = RawConfig::default();
            r.output.annotation_field = Some(field.into());
            r.input.scope_fields = Some(vec!["device".into()]);
            r.session.timeout_rules = Some(vec![crate::config::raw::RawTimeoutRule {
                field: "platform".into(),
                values: vec!["ios".into()],
                timeout: "5m".into(),
            }]);
            let e = err(r);
            assert!(e.contains("`output.annotation_field`"), "{field}: {e}");
        }
        let mut r = RawConfig::default();
        r.session.start_events = Some(vec!["a".into(), "".into()]);
        assert!(err(r).contains("`session.start_events`"));
    }

    #[test]
    fn the_memory_budget_is_in_mib() {
        let mut r = RawConfig::default();
        assert_eq!(validate(&r).unwrap().runtime.memory_budget, 1 << 30);
        r.service.memory_budget_mib = Some(256);
        let s = validate(&r).unwrap();
        assert_eq!(s.runtime.memory_budget, 256 << 20);
        assert_eq!(s.effective.service.memory_budget_mib, Some(256));
    }

    #[test]
    fn unknown_keys_in_the_file_are_rejected() {
        let e = toml::from_str::<RawConfig>("[session]\ntimout = \"5m\"\n").unwrap_err();
        assert!(e.to_string().contains("timout"), "{e}");
    }
}
