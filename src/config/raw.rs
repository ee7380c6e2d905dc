//! The configuration as written: a TOML file, overridden key by key by command-line flags and
//! `SESSIONIZER_*` environment variables. Everything is optional here; `super::validate` turns
//! it into [`super::Settings`] or an error naming the key.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub input: RawInput,
    #[serde(default)]
    pub session: RawSession,
    #[serde(default)]
    pub time: RawTime,
    #[serde(default)]
    pub output: RawOutput,
    #[serde(default)]
    pub kafka: RawKafka,
    #[serde(default)]
    pub service: RawService,
}

/// The Kafka side of the streaming mode (`sessionizer run`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// Bootstrap servers, comma-separated.
    pub brokers: Option<String>,
    /// Consumer group id (also names the state directory).
    pub group: Option<String>,
    /// Co-partitioned input topics.
    pub input_topics: Option<Vec<String>>,
    pub annotated_topic: Option<String>,
    pub sessions_topic: Option<String>,
    pub late_topic: Option<String>,
    pub dlq_topic: Option<String>,
    pub stats_topic: Option<String>,
    /// exactly-once (Kafka transactions) or at-least-once.
    pub guarantee: Option<String>,
    /// How often state, outputs and offsets are committed.
    pub commit_interval: Option<String>,
    /// The commit interval while an input partition is reading a backlog (default: 1 s, or
    /// `commit_interval` if longer).
    pub catch_up_commit_interval: Option<String>,
    /// Compacted topic backing the state (default `<group>-changelog`).
    pub changelog_topic: Option<String>,
    /// This instance's stable, unique name (default: the host name); the transactional id is
    /// `<group>-<instance_id>`.
    pub instance_id: Option<String>,
    /// Transaction timeout: how long a crashed instance's open transaction can block
    /// read_committed readers before the broker aborts it.
    pub transaction_timeout: Option<String>,
    /// Partitions this instance keeps a warm copy of, per partition it owns (see README,
    /// "Standby replicas").
    pub standby_replicas: Option<u32>,
    /// Arbitrary librdkafka properties (security.protocol, sasl.*, ssl.*, ...), passed to both
    /// the consumer and the producer.
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// Process-level settings of the streaming mode.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// Directory of the per-partition RocksDB state.
    pub state_dir: Option<String>,
    /// Address of the HTTP server (/metrics, /healthz, /readyz).
    pub metrics_addr: Option<String>,
    /// Log format: human or json.
    pub log_format: Option<String>,
    /// How long a graceful shutdown may wait for its final commit.
    pub shutdown_timeout: Option<String>,
    /// Memory for the state of every partition of the instance, in MiB (RocksDB and the
    /// decoded state kept between commits).
    pub memory_budget_mib: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    pub user_id_field: Option<String>,
    pub time_field: Option<String>,
    pub event_field: Option<String>,
    /// auto | millis | seconds | rfc3339 | record_timestamp
    pub time_format: Option<String>,
    pub scope_fields: Option<Vec<String>>,
    pub max_record_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTimeoutRule {
    pub field: String,
    pub values: Vec<String>,
    pub timeout: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawSession {
    pub timeout: Option<String>,
    pub timeout_rules: Option<Vec<RawTimeoutRule>>,
    pub start_events: Option<Vec<String>>,
    pub end_events: Option<Vec<String>>,
    pub excluded_events: Option<Vec<String>>,
    pub max_length: Option<String>,
    pub day_boundary_time_zone: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTime {
    pub allowed_lateness: Option<String>,
    pub lateness_horizon: Option<String>,
    pub quiet_period: Option<String>,
    pub idle_after: Option<String>,
    pub max_future_skew: Option<String>,
    /// dead_letter | clamp
    pub future_events: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    /// on_arrival | on_close
    pub annotate: Option<String>,
    pub annotation_field: Option<String>,
}

macro_rules! overlay {
    ($dst:expr, $src:expr, [$($f:ident),* $(,)?]) => {
        $( if $src.$f.is_some() { $dst.$f = $src.$f.clone(); } )*
    };
}

impl RawConfig {
    /// Overrides every key that `over` sets.
    pub fn overlay(&mut self, over: &RawConfig) {
        overlay!(
            self.input,
            over.input,
            [
                user_id_field,
                time_field,
                event_field,
                time_format,
                scope_fields,
                max_record_bytes
            ]
        );
        overlay!(
            self.session,
            over.session,
            [
                timeout,
                timeout_rules,
                start_events,
                end_events,
                excluded_events,
                max_length,
                day_boundary_time_zone
            ]
        );
        overlay!(
            self.time,
            over.time,
            [
                allowed_lateness,
                lateness_horizon,
                quiet_period,
                idle_after,
                max_future_skew,
                future_events
            ]
        );
        overlay!(self.output, over.output, [annotate, annotation_field]);
        overlay!(
            self.kafka,
            over.kafka,
            [
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
                standby_replicas
            ]
        );
        if let Some(p) = &over.kafka.properties {
            let mine = self.kafka.properties.get_or_insert_with(Default::default);
            for (k, v) in p {
                mine.insert(k.clone(), v.clone());
            }
        }
        overlay!(
            self.service,
            over.service,
            [
                state_dir,
                metrics_addr,
                log_format,
                shutdown_timeout,
                memory_budget_mib
            ]
        );
    }
}
