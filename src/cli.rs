//! The command line: flags (each also a `SESSIONIZER_*` environment variable) turned into a
//! raw configuration overlay, then validated; subcommands dispatched (`generate` has flags
//! of its own, see `crate::generate`). Exit codes: 0 success, 1 runtime failure (I/O, state
//! store), 2 unusable arguments or configuration.

use crate::codec::Decoder;
use crate::config::raw::{RawConfig, RawTimeoutRule};
use crate::config::{self, Settings};
use crate::engine::{Engine, Millis, StateStore};
use crate::generate::{self, GenerateError, Generator, GeneratorConfig};
use crate::offline::{self, Sinks};
use crate::store::{MemStore, RocksOptions, RocksStore};
use clap::{Args, Parser, Subcommand};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "sessionizer",
    version,
    about = "Event-time sessionization of app and web events"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Sessionize JSON lines (a file or stdin) offline, with the same engine as streaming.
    Sessionize(SessionizeArgs),
    /// Run the streaming sessionizer: a Kafka consumer group (exactly-once by default).
    Run(RunArgs),
    /// Validate the configuration and print it with every default filled in (secrets redacted).
    Check(CheckArgs),
    /// Write synthetic app/web events as JSON lines (deterministic for a given seed).
    Generate(GenerateArgs),
}

/// Streaming-mode settings. Each flag overrides the config file.
#[derive(Args, Debug, Clone, Default)]
pub struct RuntimeArgs {
    /// Kafka bootstrap servers, e.g. 127.0.0.1:9092.
    #[arg(long, env = "SESSIONIZER_BROKERS")]
    pub brokers: Option<String>,
    /// Consumer group id.
    #[arg(long, env = "SESSIONIZER_GROUP")]
    pub group: Option<String>,
    /// Comma-separated (co-partitioned) input topics.
    #[arg(long, env = "SESSIONIZER_INPUT_TOPICS", value_delimiter = ',')]
    pub input_topics: Option<Vec<String>>,
    /// Topic of annotated events.
    #[arg(long, env = "SESSIONIZER_ANNOTATED_TOPIC")]
    pub annotated_topic: Option<String>,
    /// Topic of concluded sessions, merges and splits.
    #[arg(long, env = "SESSIONIZER_SESSIONS_TOPIC")]
    pub sessions_topic: Option<String>,
    /// Topic of late events.
    #[arg(long, env = "SESSIONIZER_LATE_TOPIC")]
    pub late_topic: Option<String>,
    /// Dead-letter topic.
    #[arg(long, env = "SESSIONIZER_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,
    /// Topic of per-user session stats (compacted).
    #[arg(long, env = "SESSIONIZER_STATS_TOPIC")]
    pub stats_topic: Option<String>,
    /// Directory of the per-partition RocksDB state.
    #[arg(long = "state-dir", env = "SESSIONIZER_STATE_DIR")]
    pub state_dir: Option<String>,
    /// Address of /metrics, /healthz and /readyz, e.g. 0.0.0.0:9464.
    #[arg(long, env = "SESSIONIZER_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Delivery guarantee: exactly-once (default) or at-least-once.
    #[arg(long, env = "SESSIONIZER_GUARANTEE")]
    pub guarantee: Option<String>,
    /// How often outputs, state and offsets are committed, e.g. 100ms.
    #[arg(long, env = "SESSIONIZER_COMMIT_INTERVAL", allow_hyphen_values = true)]
    pub commit_interval: Option<String>,
    /// The commit interval while an input partition is reading a backlog, e.g. 1s (default:
    /// 1s, or --commit-interval if longer).
    #[arg(
        long,
        env = "SESSIONIZER_CATCH_UP_COMMIT_INTERVAL",
        allow_hyphen_values = true
    )]
    pub catch_up_commit_interval: Option<String>,
    /// Compacted topic backing the state (default `<group>-changelog`; created if missing).
    #[arg(long, env = "SESSIONIZER_CHANGELOG_TOPIC")]
    pub changelog_topic: Option<String>,
    /// Stable, unique name of this instance (default: the host name).
    #[arg(long, env = "SESSIONIZER_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Transaction timeout (exactly-once), e.g. 10s.
    #[arg(
        long,
        env = "SESSIONIZER_TRANSACTION_TIMEOUT",
        allow_hyphen_values = true
    )]
    pub transaction_timeout: Option<String>,
    /// Standby copies kept per owned partition: the state of the next N partitions, warm for
    /// a fast failover (default 0).
    #[arg(long, env = "SESSIONIZER_STANDBY_REPLICAS", allow_hyphen_values = true)]
    pub standby_replicas: Option<String>,
    /// A librdkafka property KEY=VALUE for both clients (repeatable), e.g. security.protocol=SSL.
    #[arg(
        long = "kafka-property",
        env = "SESSIONIZER_KAFKA_PROPERTIES",
        value_delimiter = ';'
    )]
    pub kafka_properties: Vec<String>,
    /// Log format: human or json.
    #[arg(long, env = "SESSIONIZER_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// How long a graceful shutdown may wait for its final commit, e.g. 30s.
    #[arg(long, env = "SESSIONIZER_SHUTDOWN_TIMEOUT", allow_hyphen_values = true)]
    pub shutdown_timeout: Option<String>,
    /// Memory for the state of all the instance's partitions, in MiB (default 1024).
    #[arg(
        long,
        env = "SESSIONIZER_MEMORY_BUDGET_MIB",
        allow_hyphen_values = true
    )]
    pub memory_budget_mib: Option<String>,
}

impl RuntimeArgs {
    fn apply(&self, r: &mut RawConfig) -> Result<(), CliError> {
        let k = &mut r.kafka;
        k.brokers = self.brokers.clone();
        k.group = self.group.clone();
        k.input_topics = self.input_topics.clone();
        k.annotated_topic = self.annotated_topic.clone();
        k.sessions_topic = self.sessions_topic.clone();
        k.late_topic = self.late_topic.clone();
        k.dlq_topic = self.dlq_topic.clone();
        k.stats_topic = self.stats_topic.clone();
        k.guarantee = self.guarantee.clone();
        k.commit_interval = self.commit_interval.clone();
        k.catch_up_commit_interval = self.catch_up_commit_interval.clone();
        k.changelog_topic = self.changelog_topic.clone();
        k.instance_id = self.instance_id.clone();
        k.transaction_timeout = self.transaction_timeout.clone();
        k.standby_replicas = whole_number("kafka.standby_replicas", &self.standby_replicas)?;
        let props: Vec<&String> = self
            .kafka_properties
            .iter()
            .filter(|p| !p.trim().is_empty())
            .collect();
        if !props.is_empty() {
            let mut m = std::collections::BTreeMap::new();
            for p in props {
                let (key, value) = p.split_once('=').ok_or_else(|| {
                    CliError::Usage(format!("--kafka-property `{p}`: expected KEY=VALUE"))
                })?;
                m.insert(key.trim().to_owned(), value.to_owned());
            }
            k.properties = Some(m);
        }
        r.service.state_dir = self.state_dir.clone();
        r.service.metrics_addr = self.metrics_addr.clone();
        r.service.log_format = self.log_format.clone();
        r.service.shutdown_timeout = self.shutdown_timeout.clone();
        r.service.memory_budget_mib =
            whole_number("service.memory_budget_mib", &self.memory_budget_mib)?;
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub semantics: SemanticArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Session semantics, shared by every mode. Each flag overrides the config file.
#[derive(Args, Debug, Clone, Default)]
pub struct SemanticArgs {
    /// TOML configuration file.
    #[arg(long, env = "SESSIONIZER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Inactivity timeout, e.g. 30m.
    #[arg(long, env = "SESSIONIZER_TIMEOUT", allow_hyphen_values = true)]
    pub timeout: Option<String>,
    /// Timeout rule FIELD=V1,V2:DURATION (repeatable), e.g. platform=ios,android:5m.
    #[arg(
        long = "timeout-rule",
        env = "SESSIONIZER_TIMEOUT_RULES",
        value_delimiter = ';'
    )]
    pub timeout_rules: Vec<String>,
    /// Comma-separated events that always open a new session.
    #[arg(long, env = "SESSIONIZER_START_EVENTS", value_delimiter = ',')]
    pub start_events: Option<Vec<String>>,
    /// Comma-separated events that close their session.
    #[arg(long, env = "SESSIONIZER_END_EVENTS", value_delimiter = ',')]
    pub end_events: Option<Vec<String>>,
    /// Comma-separated non-engagement events (passed through, never sessionized).
    #[arg(long, env = "SESSIONIZER_EXCLUDED_EVENTS", value_delimiter = ',')]
    pub excluded_events: Option<Vec<String>>,
    /// Maximum session length, e.g. 24h ("none" to disable).
    #[arg(long, env = "SESSIONIZER_MAX_LENGTH", allow_hyphen_values = true)]
    pub max_length: Option<String>,
    /// IANA time zone whose midnights split sessions, e.g. Europe/Berlin ("none" to disable).
    #[arg(long, env = "SESSIONIZER_DAY_BOUNDARY_TIME_ZONE")]
    pub day_boundary_time_zone: Option<String>,
    /// How far the watermark trails the largest event time, e.g. 1m.
    #[arg(long, env = "SESSIONIZER_ALLOWED_LATENESS", allow_hyphen_values = true)]
    pub allowed_lateness: Option<String>,
    /// Events older than this behind the partition time are late, e.g. 72h.
    #[arg(long, env = "SESSIONIZER_LATENESS_HORIZON", allow_hyphen_values = true)]
    pub lateness_horizon: Option<String>,
    /// Wall-clock quiet time before a due session concludes, e.g. 5s.
    #[arg(long, env = "SESSIONIZER_QUIET_PERIOD", allow_hyphen_values = true)]
    pub quiet_period: Option<String>,
    /// Idle time after which a caught-up partition's watermark follows the wall clock.
    #[arg(long, env = "SESSIONIZER_IDLE_AFTER", allow_hyphen_values = true)]
    pub idle_after: Option<String>,
    /// Largest accepted clock skew of event times ahead of now, e.g. 1h.
    #[arg(long, env = "SESSIONIZER_MAX_FUTURE_SKEW", allow_hyphen_values = true)]
    pub max_future_skew: Option<String>,
    /// What to do with events beyond the skew: dead_letter or clamp.
    #[arg(long, env = "SESSIONIZER_FUTURE_EVENTS")]
    pub future_events: Option<String>,
    /// Annotation mode: on_arrival or on_close.
    #[arg(long, env = "SESSIONIZER_ANNOTATE")]
    pub annotate: Option<String>,
    /// Name of the field added to annotated events.
    #[arg(long, env = "SESSIONIZER_ANNOTATION_FIELD")]
    pub annotation_field: Option<String>,
    /// Input field holding the user id (falls back to the record key).
    #[arg(long, env = "SESSIONIZER_USER_ID_FIELD")]
    pub user_id_field: Option<String>,
    /// Input field holding the event time.
    #[arg(long, env = "SESSIONIZER_TIME_FIELD")]
    pub time_field: Option<String>,
    /// Input field holding the event name.
    #[arg(long, env = "SESSIONIZER_EVENT_FIELD")]
    pub event_field: Option<String>,
    /// auto, millis, seconds, rfc3339 or record_timestamp.
    #[arg(long, env = "SESSIONIZER_TIME_FORMAT")]
    pub time_format: Option<String>,
    /// Comma-separated fields that, with the user id, scope sessions (e.g. device_id).
    #[arg(long, env = "SESSIONIZER_SCOPE_FIELDS", value_delimiter = ',')]
    pub scope_fields: Option<Vec<String>>,
    /// Largest accepted record, in bytes.
    #[arg(long, env = "SESSIONIZER_MAX_RECORD_BYTES", allow_hyphen_values = true)]
    pub max_record_bytes: Option<String>,
}

#[derive(Args, Debug)]
pub struct SessionizeArgs {
    #[command(flatten)]
    pub semantics: SemanticArgs,
    /// Input JSON lines (default: stdin).
    #[arg(long, short)]
    pub input: Option<PathBuf>,
    /// Output for concluded sessions, merges and splits (default: stdout).
    #[arg(long)]
    pub sessions: Option<PathBuf>,
    /// Output for annotated events.
    #[arg(long)]
    pub annotated: Option<PathBuf>,
    /// Output for late events.
    #[arg(long)]
    pub late: Option<PathBuf>,
    /// Output for dead letters.
    #[arg(long)]
    pub dead_letters: Option<PathBuf>,
    /// Output for per-user session stats (one record per conclusion).
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// Keep state in RocksDB under this directory instead of memory (for very large inputs):
    /// in a fresh subdirectory, removed when the run ends, so nothing carries over from one
    /// run to the next. (Not read from `SESSIONIZER_STATE_DIR`: that is the streaming state.)
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub semantics: SemanticArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Options of `sessionizer generate`; see `sessionizer::generate` for the model.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Number of users.
    #[arg(long, default_value_t = 1000)]
    pub users: u32,
    /// Mean think time between two events of a session (exponential).
    #[arg(long, default_value = "20s", value_parser = config::parse_duration)]
    pub think_time: Millis,
    /// Mean number of engagement events per session (geometric).
    #[arg(long, default_value_t = 12.0)]
    pub events_per_session: f64,
    /// Mean idle gap between two sessions of a user (at least --session-gap-min).
    #[arg(long, default_value = "2h", value_parser = config::parse_duration)]
    pub idle: Millis,
    /// Smallest idle gap between two sessions of a user (keep it above the timeout).
    #[arg(long, default_value = "31m", value_parser = config::parse_duration)]
    pub session_gap_min: Millis,
    /// Event time of the first events: RFC 3339 (1973-03-03T09:46:40Z or later), or `now`.
    #[arg(long, default_value = "2024-01-01T00:00:00Z", value_parser = generate::parse_start)]
    pub start: Millis,
    /// Largest delay of an event after its event time (uniform jitter): bounded disorder.
    #[arg(long, default_value = "0", value_parser = config::parse_duration)]
    pub disorder: Millis,
    /// Fraction of the events delayed by a further --late-by (late events).
    #[arg(long, default_value_t = 0.0)]
    pub late_fraction: f64,
    /// Extra delay of the late events.
    #[arg(long, default_value = "2h", value_parser = config::parse_duration)]
    pub late_by: Millis,
    /// Stop after this many events (default: no limit).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this much event time, e.g. 24h (default: no limit).
    #[arg(long, value_parser = config::parse_duration)]
    pub duration: Option<Millis>,
    /// Pace the output to this many events per second of wall-clock time (default: as fast
    /// as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Write each event when its arrival time comes on the wall clock (counted from
    /// --start): event time passes at the clock's speed, so with `--start now` the events
    /// are live. The rate then follows from --users and the session model.
    #[arg(long, conflicts_with = "rate")]
    pub real_time: bool,
    /// Random seed: the same seed and options give the same bytes.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output file (default: stdout).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Produce to this Kafka topic instead (keyed by user id), e.g. events.
    #[arg(long, conflicts_with = "output")]
    pub topic: Option<String>,
    /// Kafka bootstrap servers for --topic.
    #[arg(long, default_value = "127.0.0.1:9092", env = "SESSIONIZER_BROKERS")]
    pub brokers: String,
    /// A librdkafka property KEY=VALUE for the producer (repeatable).
    #[arg(long = "kafka-property", value_delimiter = ';')]
    pub kafka_properties: Vec<String>,
}

impl GenerateArgs {
    fn pace(&self) -> generate::Pace {
        match (self.real_time, self.rate) {
            (true, _) => generate::Pace::RealTime { from: self.start },
            (false, Some(r)) => generate::Pace::Rate(r),
            (false, None) => generate::Pace::Unpaced,
        }
    }

    /// The generator configuration these options describe.
    pub fn config(&self) -> GeneratorConfig {
        GeneratorConfig {
            users: self.users,
            think_time: self.think_time,
            events_per_session: self.events_per_session,
            idle: self.idle,
            session_gap_min: self.session_gap_min,
            start: self.start,
            disorder: self.disorder,
            late_fraction: self.late_fraction,
            late_by: self.late_by,
            count: self.count,
            duration: self.duration,
            seed: self.seed,
            ..GeneratorConfig::default()
        }
    }
}

/// A failure, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Runtime(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Config(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}

fn parse_rule(s: &str) -> Result<RawTimeoutRule, CliError> {
    let bad = || {
        CliError::Usage(format!(
            "--timeout-rule `{s}`: expected FIELD=VALUE[,VALUE...]:DURATION, e.g. platform=ios,android:5m"
        ))
    };
    let (field, rest) = s.split_once('=').ok_or_else(bad)?;
    let (values, timeout) = rest.rsplit_once(':').ok_or_else(bad)?;
    Ok(RawTimeoutRule {
        field: field.trim().to_owned(),
        values: values.split(',').map(|v| v.trim().to_owned()).collect(),
        timeout: timeout.trim().to_owned(),
    })
}

/// A whole-number flag (or its environment variable), parsed here rather than by clap so that
/// a bad value is reported under its configuration key, like every other setting.
fn whole_number<T: std::str::FromStr>(
    key: &str,
    given: &Option<String>,
) -> Result<Option<T>, config::ConfigError> {
    given
        .as_deref()
        .map(|v| {
            v.trim().parse().map_err(|_| config::ConfigError::Invalid {
                key: key.to_owned(),
                problem: format!("`{v}` is not a whole number (0, 1, 2...) or is too large"),
            })
        })
        .transpose()
}

impl SemanticArgs {
    /// The flags as a raw configuration overlay.
    pub fn overlay(&self) -> Result<RawConfig, CliError> {
        let mut r = RawConfig::default();
        r.input.user_id_field = self.user_id_field.clone();
        r.input.time_field = self.time_field.clone();
        r.input.event_field = self.event_field.clone();
        r.input.time_format = self.time_format.clone();
        r.input.scope_fields = self.scope_fields.clone();
        r.input.max_record_bytes = whole_number("input.max_record_bytes", &self.max_record_bytes)?;
        r.session.timeout = self.timeout.clone();
        if !self.timeout_rules.is_empty() {
            r.session.timeout_rules = Some(
                self.timeout_rules
                    .iter()
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| parse_rule(s))
                    .collect::<Result<_, _>>()?,
            );
        }
        r.session.start_events = self.start_events.clone();
        r.session.end_events = self.end_events.clone();
        r.session.excluded_events = self.excluded_events.clone();
        r.session.max_length = self.max_length.clone();
        r.session.day_boundary_time_zone = self.day_boundary_time_zone.clone();
        r.time.allowed_lateness = self.allowed_lateness.clone();
        r.time.lateness_horizon = self.lateness_horizon.clone();
        r.time.quiet_period = self.quiet_period.clone();
        r.time.idle_after = self.idle_after.clone();
        r.time.max_future_skew = self.max_future_skew.clone();
        r.time.future_events = self.future_events.clone();
        r.output.annotate = self.annotate.clone();
        r.output.annotation_field = self.annotation_field.clone();
        Ok(r)
    }

    pub fn settings(&self) -> Result<Settings, CliError> {
        self.settings_with(None)
    }

    /// The settings, with streaming-mode flags applied too.
    pub fn settings_with(&self, runtime: Option<&RuntimeArgs>) -> Result<Settings, CliError> {
        let mut overlay = self.overlay()?;
        if let Some(r) = runtime {
            r.apply(&mut overlay)?;
        }
        Ok(config::load(self.config.as_deref(), &overlay)?)
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessionizer: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SESSIONIZER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a log collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(io::stderr);
    let json = json || std::env::var("SESSIONIZER_LOG_FORMAT").as_deref() == Ok("json");
    // A second initialisation (tests calling `run` twice) is harmless: keep the first.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Run(a) => run_stream(a),
        Command::Check(a) => {
            let s = a.semantics.settings_with(Some(&a.runtime))?;
            let text = toml::to_string_pretty(&s.effective)
                .map_err(|e| CliError::Runtime(format!("rendering the configuration: {e}")))?;
            print!("{text}");
            Ok(())
        }
        Command::Sessionize(a) => sessionize(a),
        Command::Generate(a) => generate(a),
    }
}

fn generate(a: GenerateArgs) -> Result<(), CliError> {
    // Logs on stderr: `--topic` reports brokers that do not acknowledge through tracing.
    init_logging(false);
    let generator = Generator::new(a.config()).map_err(generate_error)?;
    let hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    if !a.real_time && a.start > hour_ago {
        tracing::warn!(
            "--start is about now, but event time will run ahead of the wall clock (it passes \
             as fast as the events are written); a sessionizer dead-letters events further \
             ahead than time.max_future_skew as future_time. Add --real-time for live events"
        );
    }
    if let Some(topic) = &a.topic {
        return generate_to_kafka(&a, generator, topic);
    }
    let pace = a.pace();
    let result = match &a.output {
        Some(p) => generate::write_jsonl(generator, &mut create(p)?, pace),
        None => generate::write_jsonl(generator, &mut BufWriter::new(io::stdout().lock()), pace),
    };
    match result {
        Ok(_) => Ok(()),
        // The reader went away (e.g. `| head`): a normal end for a generator.
        Err(GenerateError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(generate_error(e)),
    }
}

/// How long `generate --topic` waits for its topic to appear in the brokers' metadata.
const GENERATE_TOPIC_WAIT: Duration = Duration::from_secs(5);

/// `generate --topic`: the events as JSON values keyed by user id, with the same idempotent
/// producer settings as the streaming mode; waits until every record is acknowledged.
fn generate_to_kafka(a: &GenerateArgs, generator: Generator, topic: &str) -> Result<(), CliError> {
    let mut raw = RawConfig::default();
    let runtime = RuntimeArgs {
        brokers: Some(a.brokers.clone()),
        kafka_properties: a.kafka_properties.clone(),
        ..RuntimeArgs::default()
    };
    runtime.apply(&mut raw)?;
    let settings = config::validate(&raw)?;
    let mut outputs = crate::kafka::output::Outputs::new(
        &crate::kafka::idempotent_producer_config(&settings.runtime),
    )
    .map_err(|e| CliError::Runtime(e.to_string()))?;
    outputs
        .check_topic(topic, GENERATE_TOPIC_WAIT)
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    let mut value = Vec::with_capacity(256);
    let mut failure = None;
    let n = generate::for_each_paced(generator, a.pace(), |ev| {
        value.clear();
        serde_json::to_writer(&mut value, ev).map_err(|e| GenerateError::Write(e.into()))?;
        if let Err(e) = outputs.send(topic, Some(ev.user_id.as_bytes()), Some(&value), None, None) {
            failure = Some(e.to_string());
            return Err(GenerateError::Write(io::Error::other("produce failed")));
        }
        Ok(())
    });
    if let Some(f) = failure {
        return Err(CliError::Runtime(f));
    }
    let n = n.map_err(generate_error)?;
    outputs
        .flush()
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    eprintln!("sessionizer: {n} events produced to {topic}");
    Ok(())
}

fn generate_error(e: GenerateError) -> CliError {
    match e {
        GenerateError::Invalid { .. } => CliError::Usage(e.to_string()),
        GenerateError::Write(_) => CliError::Runtime(e.to_string()),
    }
}

/// Where a path leads: an existing file's canonical path, else its directory's joined with its
/// name (`None` if neither resolves: opening it will say why).
fn resolved(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Some(c);
    }
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
    Some(
        std::fs::canonicalize(dir.unwrap_or(Path::new(".")))
            .ok()?
            .join(p.file_name()?),
    )
}

/// Refuses outputs that would overwrite the input (it is truncated before it is read) or each
/// other. Devices (`/dev/stdout`, `/dev/null`) may take several outputs.
fn check_output_paths(a: &SessionizeArgs) -> Result<(), CliError> {
    let input = a.input.as_deref().and_then(resolved);
    let mut seen: Vec<(&str, PathBuf)> = Vec::new();
    for (flag, path) in [
        ("--sessions", &a.sessions),
        ("--annotated", &a.annotated),
        ("--late", &a.late),
        ("--dead-letters", &a.dead_letters),
        ("--stats", &a.stats),
    ] {
        let Some(path) = path else { continue };
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            continue;
        }
        let Some(r) = resolved(path) else { continue };
        if input.as_ref() == Some(&r) {
            return Err(CliError::Usage(format!(
                "{flag} {} is the input file: it would be emptied before it is read",
                path.display()
            )));
        }
        if let Some((other, _)) = seen.iter().find(|(_, s)| *s == r) {
            return Err(CliError::Usage(format!(
                "{other} and {flag} name the same file, {}: one output would overwrite the other",
                path.display()
            )));
        }
        seen.push((flag, r));
    }
    Ok(())
}

fn create(path: &Path) -> Result<BufWriter<File>, CliError> {
    File::create(path)
        .map(|f| BufWriter::with_capacity(1 << 16, f))
        .map_err(|e| CliError::Runtime(format!("cannot create {}: {e}", path.display())))
}

/// How much longer than `service.shutdown_timeout` a stop may take before the process exits
/// without finishing it.
const STOP_MARGIN: std::time::Duration = std::time::Duration::from_secs(15);

fn run_stream(a: RunArgs) -> Result<(), CliError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let settings = a.semantics.settings_with(Some(&a.runtime))?;
    init_logging(settings.runtime.json_logs);
    let metrics =
        Arc::new(crate::metrics::Metrics::new().map_err(|e| CliError::Runtime(e.to_string()))?);
    let health = crate::http::Health::new();
    let shutdown = Arc::new(AtomicBool::new(false));
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the async runtime: {e}")))?;
    let addr = settings.runtime.metrics_addr;
    let (listener, bound) = tokio_rt
        .block_on(crate::http::bind(addr))
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = crate::http::serve_on(listener, metrics.clone(), health.clone(), async {
        let _ = stop_rx.await;
    });
    tokio_rt.spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    let flag = shutdown.clone();
    // The final commit waits at most `shutdown_timeout`; whatever else blocks the way out (a
    // consumer leaving a group whose coordinator is gone, a restore in progress) gets
    // `STOP_MARGIN` more, then the process exits 1, as a crash would: nothing is lost.
    let stop_by = settings.runtime.shutdown_timeout + STOP_MARGIN;
    tokio_rt.spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received");
        flag.store(true, Ordering::Relaxed);
        tokio::time::sleep(stop_by).await;
        tracing::error!(
            seconds = stop_by.as_secs(),
            "not stopped yet: exiting now (as a crash would; the partitions' next owner resumes \
             from the last commit)"
        );
        std::process::exit(1);
    });
    tracing::info!(metrics = %format!("http://{bound}/metrics"), "sessionizer starting");
    let result = crate::pipeline::run(settings, metrics, health, shutdown);
    let _ = stop_tx.send(());
    tokio_rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result.map_err(|e| CliError::Runtime(e.to_string()))?;
    tracing::info!("stopped cleanly");
    Ok(())
}

fn sessionize(a: SessionizeArgs) -> Result<(), CliError> {
    let settings = a.semantics.settings()?;
    init_logging(false);
    if settings.decode.time_format == config::TimeFormat::RecordTimestamp {
        return Err(config::ConfigError::Invalid {
            key: "input.time_format".into(),
            problem: "`record_timestamp` is the Kafka record's timestamp, and offline lines \
                      have none"
                .into(),
        }
        .into());
    }
    check_output_paths(&a)?;
    let decoder = Decoder::new(settings.decode.clone());
    let input: Box<dyn io::BufRead> = match &a.input {
        Some(p) => Box::new(BufReader::with_capacity(
            1 << 16,
            File::open(p)
                .map_err(|e| CliError::Runtime(format!("cannot open {}: {e}", p.display())))?,
        )),
        None => Box::new(io::stdin().lock()),
    };
    let mut sessions: Box<dyn Write> = match &a.sessions {
        Some(p) => Box::new(create(p)?),
        None => Box::new(BufWriter::new(io::stdout().lock())),
    };
    let open = |p: &Option<PathBuf>| p.as_deref().map(create).transpose();
    let mut annotated = open(&a.annotated)?;
    let mut late = open(&a.late)?;
    let mut dead = open(&a.dead_letters)?;
    let mut stats = open(&a.stats)?;
    let mut sinks = Sinks {
        sessions: Some(&mut *sessions),
        annotated: annotated.as_mut().map(|w| w as &mut dyn Write),
        late: late.as_mut().map(|w| w as &mut dyn Write),
        dead_letters: dead.as_mut().map(|w| w as &mut dyn Write),
        stats: stats.as_mut().map(|w| w as &mut dyn Write),
    };
    let summary = match &a.state_dir {
        None => drive(
            &decoder,
            Engine::open(settings.engine.clone(), MemStore::new()),
            input,
            &mut sinks,
        ),
        Some(dir) => {
            let fail = |e: &dyn std::fmt::Display| {
                CliError::Runtime(format!("state dir {}: {e}", dir.display()))
            };
            // A run's output depends only on its input: state left by an earlier run (its
            // watermark above all) would make this one's events late.
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
            let scratch = tempfile::Builder::new()
                .prefix("sessionize-")
                .tempdir_in(dir)
                .map_err(|e| fail(&e))?;
            let store =
                RocksStore::open(scratch.path(), RocksOptions::default()).map_err(|e| fail(&e))?;
            let summary = drive(
                &decoder,
                Engine::open(settings.engine.clone(), store),
                input,
                &mut sinks,
            );
            // The store is closed (dropped by `drive`) before its directory goes; a failed
            // run's error comes first.
            let removed = scratch.close();
            let summary = summary?;
            removed.map_err(|e| fail(&e))?;
            Ok(summary)
        }
    }?;
    eprintln!("sessionizer: {summary}");
    Ok(())
}

fn drive<S: StateStore>(
    decoder: &Decoder,
    engine: Result<Engine<S>, crate::engine::StoreError>,
    input: Box<dyn io::BufRead>,
    sinks: &mut Sinks<'_>,
) -> Result<offline::Summary, CliError> {
    let mut engine = engine.map_err(|e| CliError::Runtime(e.to_string()))?;
    offline::sessionize(decoder, &mut engine, input, sinks)
        .map_err(|e| CliError::Runtime(e.to_string()))
}
