//! Kafka clients: configuration of the consumer and the producer from the validated settings,
//! start-up checks of the brokers (reachable, credentials accepted) and the topics (exist,
//! co-partitioned), and the consumer context that hands rebalances and client statistics to
//! the pipeline.

pub mod changelog;
pub mod committer;
pub mod limits;
pub mod output;
pub mod rebootstrap;
pub mod sink;
pub mod standby;
pub mod watch;

use crate::config::RuntimeSettings;
use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigResourceResult, OwnedResourceSpecifier, ResourceSpecifier,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Start-up and client errors of the Kafka side.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// Made by [`KafkaError::client`], which keeps property values out of `detail`.
    #[error("cannot create the Kafka {what}: {detail}")]
    Client { what: &'static str, detail: String },
    /// `problem`: the failed metadata request, and what the client last reported
    /// (librdkafka's hints, e.g. a listener of another security protocol).
    #[error("cannot reach the Kafka brokers `{brokers}` ({problem})")]
    Unreachable { brokers: String, problem: String },
    #[error(
        "cannot connect to the Kafka brokers `{brokers}`: {reason} (check security.protocol, \
         sasl.* and ssl.* in kafka.properties)"
    )]
    Security { brokers: String, reason: String },
    #[error("topic `{0}` does not exist; create it first (see README, \"Streaming mode\")")]
    MissingTopic(String),
    #[error("input topics are not co-partitioned: {0}")]
    NotCoPartitioned(String),
    #[error("producing to Kafka failed: {0}")]
    Produce(String),
    #[error("committing offsets to Kafka failed: {0}")]
    Commit(rdkafka::error::KafkaError),
    #[error("changelog: {0}")]
    Changelog(String),
    /// A setting the output topics' `max.message.bytes` cannot take ([`limits`]).
    #[error("invalid configuration for the output topics: `{key}`: {problem}")]
    OutputLimit { key: &'static str, problem: String },
}

impl KafkaError {
    /// A client (or its subscription) could not be created. librdkafka's refusal of a
    /// property carries the property's value, which may be a secret (`sasl.jaas.config`,
    /// a misspelt password key): only the key and the reason are kept, and the value is
    /// masked wherever the reason repeats it.
    pub(crate) fn client(what: &'static str, e: rdkafka::error::KafkaError) -> Self {
        let detail = match &e {
            rdkafka::error::KafkaError::ClientConfig(_, reason, key, value) => {
                let reason = if value.is_empty() {
                    reason.clone()
                } else {
                    reason.replace(value.as_str(), "***")
                };
                format!("kafka.properties `{key}`: {reason}")
            }
            e => e.to_string(),
        };
        KafkaError::Client { what, detail }
    }
}

/// Logs a client error of a consumer that reads to partition ends: reaching the end of a
/// partition is expected (it is how caught-up is detected), everything else is a warning
/// (librdkafka retries by itself).
pub(crate) fn log_client_error(error: rdkafka::error::KafkaError, reason: &str, who: &str) {
    match error {
        rdkafka::error::KafkaError::PartitionEOF(_)
        | rdkafka::error::KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF) => {}
        e => tracing::warn!(error = %e, reason, "{who} error (retrying)"),
    }
}

/// What a client reported of its errors: the first security failure (authentication, TLS),
/// for start-up to stop with at once instead of waiting out the metadata timeout and calling
/// the brokers unreachable, and the last error of any kind, for the message when they are.
/// Shared between the client's context, which observes its errors, and the check.
#[derive(Clone, Debug, Default)]
pub struct ClientErrors(Arc<Mutex<Observed>>);

#[derive(Debug, Default)]
struct Observed {
    security: Option<String>,
    last: Option<String>,
}

impl ClientErrors {
    /// Keeps `reason` as the security failure if `error` is an authentication or TLS failure
    /// (the first one only), and as the last error in any case. A TLS alert from a broker
    /// is one too, though librdkafka reports it as a transport failure: with TLS 1.3 a
    /// broker that refuses the client's certificate (or the lack of one) says so after the
    /// handshake, as "... alert bad certificate: SSL alert number 42".
    pub fn observe(&self, error: &rdkafka::error::KafkaError, reason: &str) {
        let security = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        ) || reason.contains("SSL alert number");
        if let Ok(mut o) = self.0.lock() {
            if security {
                o.security.get_or_insert_with(|| reason.to_owned());
            }
            o.last = Some(reason.to_owned());
        }
    }

    /// The first security failure seen.
    pub fn security(&self) -> Option<String> {
        self.0.lock().ok().and_then(|o| o.security.clone())
    }

    /// The last error seen, of any kind.
    pub fn last(&self) -> Option<String> {
        self.0.lock().ok().and_then(|o| o.last.clone())
    }
}

/// How long the first two metadata requests of the start-up check may take (1 and 2 times
/// this) before the client's errors are looked at and the request is made again; the third
/// has the rest of the check's timeout, so a large cluster's slow answer still fits.
const METADATA_SLICE: Duration = Duration::from_secs(1);

/// How long the start-up check serves the client's events after a failed metadata request.
const EVENTS_WAIT: Duration = Duration::from_millis(50);

pub(crate) fn base_config(rt: &RuntimeSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &rt.brokers);
    for (k, v) in &rt.properties {
        c.set(k, v);
    }
    c
}

/// `fetch.queue.backoff.ms` of the consumers. librdkafka stops fetching a partition whose local
/// queue holds more than `queued.min.messages` (100,000) records and, by default, looks again
/// only 1000 ms later (librdkafka issue 2879): a consumer that drains its queue faster than
/// that, as ours does when it catches up with a backlog, then sits idle with records waiting on
/// the broker. It held back the benchmark's pass-through baseline most (about 150k -> 376-430k
/// events/s) and the restore (157-251k -> 400-430k records/s); see BENCHMARKS.md.
pub(crate) const FETCH_QUEUE_BACKOFF_MS: &str = "20";

/// `statistics.interval.ms` of every client: the statistics feed the lag metrics and
/// [`rebootstrap::BrokerLoss`].
pub(crate) const STATISTICS_INTERVAL_MS: &str = "5000";

/// The consumer configuration: manual commits, cooperative-sticky assignment, EOF events (to
/// know when a partition is caught up), read_committed, a short fetch-queue backoff (see
/// [`FETCH_QUEUE_BACKOFF_MS`]).
pub fn consumer_config(rt: &RuntimeSettings) -> ClientConfig {
    let mut c = base_config(rt);
    c.set("group.id", &rt.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    for (k, v) in [
        ("auto.offset.reset", "earliest"),
        ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS),
    ] {
        if !rt.properties.contains_key(k) {
            c.set(k, v);
        }
    }
    c
}

/// [`idempotent_producer_config`], transactional with id `<group>-<instance_id>`: the state
/// committer's (see [`committer`]): changelog records, offsets and, exactly-once, the outputs.
pub fn transactional_producer_config(rt: &RuntimeSettings) -> ClientConfig {
    let mut c = idempotent_producer_config(rt);
    c.set("transactional.id", transactional_id(rt)).set(
        "transaction.timeout.ms",
        rt.transaction_timeout.as_millis().to_string(),
    );
    c
}

/// An idempotent producer configuration ([`producer_defaults`] plus idempotence): a retry
/// neither writes a record twice nor reorders a partition. The at-least-once outputs (and the
/// benchmark's pass-through), `sessionizer generate --topic`, and the base of the
/// transactional one.
///
/// Its cost: librdkafka's idempotent producer keeps one produce request in flight per
/// partition (it counts the messages in flight against its limit of five requests, see
/// librdkafka pull request 4989), and while a partition with a batch ready waits for that
/// request's acknowledgement, its broker thread polls without sleeping. When the brokers
/// answer more slowly than the linger, that thread takes CPU the brokers need
/// (BENCHMARKS.md, eighth session). A producer that is not idempotent does not spin, but
/// librdkafka can then reorder a partition's records when it retries a request (its
/// documentation of `retries` says so; `max.in.flight.requests.per.connection=1` does not
/// prevent it, a later request may already be built), which would let the compacted stats
/// topic keep an older value as the latest: the outputs stay idempotent.
pub fn idempotent_producer_config(rt: &RuntimeSettings) -> ClientConfig {
    let mut c = producer_defaults(rt);
    if !rt.properties.contains_key("enable.idempotence") {
        c.set("enable.idempotence", "true");
    }
    c
}

/// What every producer sets unless `kafka.properties` does: acks=all, lz4, 5 ms linger (a
/// commit waits for its records, so a longer linger would hold it up), and a
/// `message.max.bytes` that takes every output of an accepted record
/// ([`RuntimeSettings::max_output_bytes`]; librdkafka's default, 1,000,000 bytes, refused the
/// annotated output of a record just under the 1 MiB input limit, and the instance stopped).
fn producer_defaults(rt: &RuntimeSettings) -> ClientConfig {
    let mut c = base_config(rt);
    let max_output_bytes = rt.max_output_bytes.to_string();
    for (k, v) in [
        ("message.max.bytes", max_output_bytes.as_str()),
        ("acks", "all"),
        ("linger.ms", "5"),
        ("compression.type", "lz4"),
        ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
    ] {
        if !rt.properties.contains_key(k) {
            c.set(k, v);
        }
    }
    c
}

/// What the start-up check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicCheck {
    /// Partitions of every input topic.
    pub partitions: i32,
    /// Partitions of the changelog topic, if it exists.
    pub changelog_partitions: Option<i32>,
}

/// The consumer's client id, `sessionizer-<instance_id>-<nonce>`: unique per process, so the
/// group's member list tells another process with the same instance id from this one. None
/// when `client.id` is configured (the check is then skipped).
pub fn member_client_id(rt: &RuntimeSettings, nonce: u64) -> Option<String> {
    (!rt.properties.contains_key("client.id")).then(|| format!("{}{nonce:016x}", member_prefix(rt)))
}

fn member_prefix(rt: &RuntimeSettings) -> String {
    format!("sessionizer-{}-", rt.instance_id)
}

/// A member of the consumer group from another process with this instance id (its client id
/// and host), if the group can be described within `timeout` and has one.
pub fn other_member_with_our_id<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    rt: &RuntimeSettings,
    own_client_id: &str,
    timeout: Duration,
) -> Option<String> {
    let groups = match consumer.fetch_group_list(Some(&rt.group), timeout) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "cannot describe the consumer group");
            return None;
        }
    };
    let prefix = member_prefix(rt);
    groups
        .groups()
        .iter()
        .flat_map(|g| g.members())
        .find(|m| {
            let nonce = m.client_id().strip_prefix(&prefix).unwrap_or_default();
            // Exactly a nonce after the prefix: instance "a" is not instance "a-b".
            nonce.len() == 16
                && nonce.bytes().all(|b| b.is_ascii_hexdigit())
                && m.client_id() != own_client_id
        })
        .map(|m| format!("{} at {}", m.client_id(), m.client_host()))
}

/// The transactional id of this instance.
pub fn transactional_id(rt: &RuntimeSettings) -> String {
    format!("{}-{}", rt.group, rt.instance_id)
}

/// Runs `f` with an admin client of `rt`'s brokers and a runtime to block on its requests.
pub fn with_admin<T>(
    rt: &RuntimeSettings,
    f: impl FnOnce(
        &AdminClient<DefaultClientContext>,
        &tokio::runtime::Runtime,
    ) -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    let mut config = base_config(rt);
    let admin: AdminClient<DefaultClientContext> = config
        .set("client.id", "sessionizer-admin")
        .create()
        .map_err(|e| KafkaError::client("admin client", e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KafkaError::Client {
            what: "admin client's runtime",
            detail: e.to_string(),
        })?;
    let result = f(&admin, &runtime);
    // Dropping an `AdminClient` joins its polling thread, which polls with a 100 ms timeout:
    // done in line, that held the start-up for up to 100 ms. Nothing waits for the drop.
    let dropped = std::thread::Builder::new()
        .name("admin client drop".into())
        .spawn(move || drop(admin));
    if let Err(e) = dropped {
        tracing::debug!(error = %e, "admin client dropped in line");
    }
    result
}

/// A topic's configuration as the brokers described it: its entries with a value, by name;
/// or why it was not described.
pub type TopicConfig = Result<HashMap<String, String>, String>;

/// The configuration of each of `topics`, in one DescribeConfigs request, by topic name. A
/// topic created just before (by start-up, a script or another instance) may not be known yet
/// to the broker that answers, or be described without all its entries: while one is, or
/// lacks one of `needs`, the request is made again every [`PROPAGATION_POLL`] for up to
/// [`PROPAGATION_WAIT`].
pub fn describe_topics(
    admin: &AdminClient<DefaultClientContext>,
    runtime: &tokio::runtime::Runtime,
    topics: &[&str],
    needs: &[&str],
) -> Vec<(String, TopicConfig)> {
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let deadline = Instant::now() + PROPAGATION_WAIT;
    loop {
        let mut propagating = false;
        let mut describe = |i: usize, topic: &str, results: &[ConfigResourceResult]| {
            match results.get(i) {
                // librdkafka answers in the order asked.
                Some(Ok(c)) if c.specifier == OwnedResourceSpecifier::Topic(topic.into()) => {
                    let entries: HashMap<String, String> = c
                        .entries
                        .iter()
                        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                        .filter(|(_, v)| !v.is_empty())
                        .collect();
                    propagating |= needs.iter().any(|k| !entries.contains_key(*k));
                    Ok(entries)
                }
                Some(Err(code)) => {
                    propagating |= output::unknown_topic_code(*code);
                    Err(code.to_string())
                }
                _ => Err("the brokers did not describe it".to_owned()),
            }
        };
        let described: Vec<(String, TopicConfig)> =
            match runtime.block_on(admin.describe_configs(&specs, &opts)) {
                Ok(results) => topics
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| (t.to_owned(), describe(i, t, &results)))
                    .collect(),
                Err(e) => {
                    let e = e.to_string();
                    return topics
                        .iter()
                        .map(|&t| (t.to_owned(), Err(e.clone())))
                        .collect();
                }
            };
        if !propagating || Instant::now() >= deadline {
            return described;
        }
        std::thread::sleep(PROPAGATION_POLL);
    }
}

/// Whether the brokers, asked now, list `topic` with partitions; `None` if they do not answer
/// within `wait`.
pub fn topic_listed<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    wait: Duration,
) -> Option<bool> {
    consumer
        .fetch_metadata(None, wait)
        .ok()
        .map(|md| partition_count(&md, topic).is_some())
}

/// How many partitions `md` lists for `topic`; `None` if it lists none, or the topic with an
/// error (the brokers do not have it).
pub(crate) fn partition_count(md: &Metadata, topic: &str) -> Option<i32> {
    md.topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .filter(|n| *n > 0)
}

/// Kafka's default `max.message.bytes` of a topic (the brokers' `message.max.bytes`).
pub const KAFKA_MAX_MESSAGE_BYTES: usize = 1_048_588;

/// How long a topic created just before the start (by a script, or by another instance) may
/// take to appear in the metadata and configuration every broker serves: start-up asks again,
/// every [`PROPAGATION_POLL`], for this long before it reports the topic missing
/// ([`check_topics`]) or not described ([`describe_topics`]).
pub const PROPAGATION_WAIT: Duration = Duration::from_secs(15);

/// How often start-up asks again while it waits for [`PROPAGATION_WAIT`].
pub const PROPAGATION_POLL: Duration = Duration::from_millis(200);

/// Checks that the brokers answer (with the credentials given), that every input and output
/// topic exists and that the input topics have the same number of partitions, and looks up the
/// changelog topic.
///
/// A security failure that `consumer`'s context reports to `errors` ends the check at once
/// ([`KafkaError::Security`]); brokers that do not answer within `timeout` are
/// [`KafkaError::Unreachable`]. A missing topic is looked for again for [`PROPAGATION_WAIT`]
/// before the error is returned.
pub fn check_topics<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    rt: &RuntimeSettings,
    timeout: Duration,
    errors: &ClientErrors,
) -> Result<TopicCheck, KafkaError> {
    let deadline = Instant::now() + PROPAGATION_WAIT;
    let mut logged = false;
    loop {
        match check_topics_once(consumer, rt, timeout, errors) {
            Err(KafkaError::MissingTopic(t)) if Instant::now() < deadline => {
                if !std::mem::replace(&mut logged, true) {
                    tracing::info!(
                        topic = %t,
                        wait_s = PROPAGATION_WAIT.as_secs(),
                        "topic not in the metadata yet: waiting for it to appear"
                    );
                }
                std::thread::sleep(PROPAGATION_POLL);
            }
            r => return r,
        }
    }
}

/// The cluster's metadata, asked for in slices (see [`METADATA_SLICE`]) until `timeout`.
/// Between two, the consumer's queued events are served, so that its context sees the errors
/// of the failed connections (the context hands them to `errors`).
fn fetch_metadata<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    rt: &RuntimeSettings,
    timeout: Duration,
    errors: &ClientErrors,
) -> Result<Metadata, KafkaError> {
    let deadline = Instant::now() + timeout;
    let mut attempt = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        attempt += 1;
        let wait = if attempt <= 2 {
            (METADATA_SLICE * attempt).min(left)
        } else {
            left
        };
        match consumer.fetch_metadata(None, wait) {
            Ok(md) => return Ok(md),
            Err(source) => {
                if let Some(reason) = security_failure(consumer, errors) {
                    return Err(KafkaError::Security {
                        brokers: rt.brokers.clone(),
                        reason,
                    });
                }
                if Instant::now() >= deadline {
                    let mut problem = format!("metadata request failed: {source}");
                    if let Some(last) = errors.last() {
                        problem.push_str(&format!("; last client error: {last}"));
                    }
                    return Err(KafkaError::Unreachable {
                        brokers: rt.brokers.clone(),
                        problem,
                    });
                }
            }
        }
    }
}

/// Serves the consumer's queued events for up to [`EVENTS_WAIT`], or until its context has
/// reported a security failure to `errors`, which it returns. The consumer is not subscribed
/// yet: no record can come, only the client's events, one per call (statistics, errors).
fn security_failure<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    errors: &ClientErrors,
) -> Option<String> {
    let until = Instant::now() + EVENTS_WAIT;
    loop {
        if let Some(reason) = errors.security() {
            return Some(reason);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let _ = consumer.poll(left);
    }
}

fn check_topics_once<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    rt: &RuntimeSettings,
    timeout: Duration,
    errors: &ClientErrors,
) -> Result<TopicCheck, KafkaError> {
    let md = fetch_metadata(consumer, rt, timeout, errors)?;
    let partitions = |name: &str| partition_count(&md, name);
    let mut counts = Vec::new();
    for t in &rt.input_topics {
        counts.push((
            t,
            partitions(t).ok_or_else(|| KafkaError::MissingTopic(t.clone()))?,
        ));
    }
    for t in [
        &rt.annotated_topic,
        &rt.sessions_topic,
        &rt.late_topic,
        &rt.dlq_topic,
        &rt.stats_topic,
    ] {
        partitions(t).ok_or_else(|| KafkaError::MissingTopic(t.clone()))?;
    }
    let first = counts[0].1;
    if counts.iter().any(|(_, n)| *n != first) {
        let desc: Vec<String> = counts
            .iter()
            .map(|(t, n)| format!("{t}: {n} partitions"))
            .collect();
        return Err(KafkaError::NotCoPartitioned(desc.join(", ")));
    }
    Ok(TopicCheck {
        partitions: first,
        changelog_partitions: partitions(&rt.changelog_topic),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{raw::RawConfig, validate};

    fn settings(properties: &[(&str, &str)]) -> RuntimeSettings {
        let mut raw = RawConfig::default();
        raw.kafka.brokers = Some("127.0.0.1:9092".into());
        raw.kafka.group = Some("g".into());
        let mut rt = validate(&raw).expect("valid").runtime;
        for (k, v) in properties {
            rt.properties.insert((*k).into(), (*v).into());
        }
        rt
    }

    #[test]
    fn kafka_properties_override_the_producer_defaults() {
        let c = idempotent_producer_config(&settings(&[("linger.ms", "20")]));
        assert_eq!(c.get("linger.ms"), Some("20"));
        assert_eq!(c.get("acks"), Some("all"));
        let c = idempotent_producer_config(&settings(&[("enable.idempotence", "false")]));
        assert_eq!(c.get("enable.idempotence"), Some("false"));
    }

    #[test]
    fn every_producer_is_idempotent() {
        let rt = settings(&[]);
        for c in [
            idempotent_producer_config(&rt),
            transactional_producer_config(&rt),
        ] {
            assert_eq!(c.get("enable.idempotence"), Some("true"));
            assert_eq!(c.get("max.in.flight.requests.per.connection"), None);
            assert_eq!(c.get("linger.ms"), Some("5"));
        }
    }

    #[test]
    fn security_failures_keep_the_first_and_every_error_the_last() {
        use rdkafka::error::KafkaError as Rd;
        let f = ClientErrors::default();
        f.observe(
            &Rd::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "refused",
        );
        assert_eq!(f.security(), None, "not a security failure");
        assert_eq!(f.last().as_deref(), Some("refused"));
        let seen = f.clone();
        f.observe(
            &Rd::Global(RDKafkaErrorCode::Authentication),
            "SASL: bad password",
        );
        f.observe(&Rd::Global(RDKafkaErrorCode::SSL), "TLS: bad certificate");
        assert_eq!(seen.security().as_deref(), Some("SASL: bad password"));
        assert_eq!(seen.last().as_deref(), Some("TLS: bad certificate"));
        let alert = "ssl://127.0.0.1:9093/bootstrap: Receive failed: error:0A000412:SSL \
                     routines::sslv3 alert bad certificate: SSL alert number 42";
        let f = ClientErrors::default();
        f.observe(&Rd::Global(RDKafkaErrorCode::BrokerTransportFailure), alert);
        assert_eq!(
            f.security().as_deref(),
            Some(alert),
            "a TLS alert from the broker is a security failure"
        );
    }
}
