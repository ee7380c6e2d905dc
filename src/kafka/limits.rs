//! What the output topics take. A broker refuses a record batch larger than its topic's
//! `max.message.bytes`, and a refused output stops the instance (README, "Crashes"),
//! again at every restart. Start-up reads every output topic's limit in one request
//! ([`OutputLimits::read`]), and from them:
//! - the producers' `batch.size` stays under the smallest ([`OutputLimits::batch_size`]): a
//!   fast stream of small records fills batches of librdkafka's default 1,000,000 bytes;
//! - an input record whose annotated or late output (or with `annotate = on_close`, its payload
//!   held in the changelog) would not fit its topic is a `record_too_large` dead letter
//!   ([`RecordRoom`]);
//! - a dead letter too large for its topic goes out truncated ([`dead_letter_fit`]).

use super::{KafkaError, KAFKA_MAX_MESSAGE_BYTES};
use crate::config::RuntimeSettings;
use rdkafka::admin::{AdminClient, AdminOptions, OwnedResourceSpecifier, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use std::time::Duration;

/// Bytes a record batch adds to one record's key, value and headers, at most: the batch header
/// (61), the record's and its headers' length fields, lz4's frame, with room to spare.
pub const RECORD_OVERHEAD: usize = 512;

/// Bytes an annotation adds to an input record, besides the annotation field's name:
/// `,"<field>":{"id":"<16 hex digits>-<number>","seq":<number>,"start":false}` with two
/// 20-digit numbers is 82, and `null` less.
pub const ANNOTATION_BYTES: usize = 96;

/// Bytes the headers of a late event or a dead letter take besides the source topic's name
/// and a dead letter's error message (their keys, the reason, the numbers), with room to
/// spare.
pub const HEADER_ALLOWANCE: usize = 256;

/// librdkafka's default `batch.size`.
pub const LIBRDKAFKA_BATCH_SIZE: usize = 1_000_000;

/// Whether a record of `value` bytes, with `rest` bytes of key and headers, fits a topic that
/// takes record batches of up to `limit` bytes, even if lz4 cannot compress it (lz4 then adds
/// up to 1/255 of it).
pub fn fits(value: usize, rest: usize, limit: usize) -> bool {
    value + value / 255 + rest + RECORD_OVERHEAD <= limit
}

/// The largest value that [`fits`] with `rest` bytes of key and headers in `limit`.
pub fn largest_value(rest: usize, limit: usize) -> usize {
    limit.saturating_sub(rest + RECORD_OVERHEAD) / 256 * 255
}

/// How much of a dead letter's `value` (its length) goes out to a topic that takes record
/// batches of up to `limit` bytes, when its key and headers take `rest`: all of it if it
/// [`fits`], otherwise as much as fits. (A record just under the input topic's own limit,
/// incompressible, refused for its size, came back with headers over the dead-letter topic's
/// same limit: the broker refused it and the instance stopped, again at every restart.)
pub fn dead_letter_fit(value: usize, rest: usize, limit: usize) -> usize {
    if fits(value, rest, limit) {
        value
    } else {
        largest_value(rest, limit).min(value)
    }
}

/// Every output topic's `max.message.bytes`, as start-up read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLimits {
    topics: Vec<(String, usize)>,
}

impl OutputLimits {
    /// Reads the `max.message.bytes` of the five output topics and, if `changelog_exists`, of
    /// the changelog, in one request. A topic the brokers do not describe (no
    /// DescribeConfigs permission, an old broker), and a changelog start-up has just created,
    /// count as Kafka's default ([`KAFKA_MAX_MESSAGE_BYTES`]); the first with a warning.
    pub fn read(
        admin: &AdminClient<DefaultClientContext>,
        runtime: &tokio::runtime::Runtime,
        rt: &RuntimeSettings,
        changelog_exists: bool,
    ) -> OutputLimits {
        let mut names: Vec<&str> = vec![
            &rt.annotated_topic,
            &rt.sessions_topic,
            &rt.late_topic,
            &rt.dlq_topic,
            &rt.stats_topic,
        ];
        if changelog_exists {
            names.push(&rt.changelog_topic);
        }
        let specs: Vec<ResourceSpecifier<'_>> =
            names.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
        let answer = runtime.block_on(admin.describe_configs(&specs, &opts));
        let described = |topic: &str| -> Result<usize, String> {
            let results = answer.as_ref().map_err(|e| e.to_string())?;
            results
                .iter()
                .find_map(|r| match r {
                    Ok(c) if c.specifier == OwnedResourceSpecifier::Topic(topic.to_owned()) => {
                        Some(c)
                    }
                    _ => None,
                })
                .ok_or_else(|| "the brokers did not describe it".to_owned())?
                .get("max.message.bytes")
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| "no max.message.bytes in its description".to_owned())
        };
        let mut topics: Vec<(String, usize)> = names
            .iter()
            .map(|&topic| {
                let limit = described(topic).unwrap_or_else(|problem| {
                    tracing::warn!(
                        topic,
                        problem,
                        assumed = KAFKA_MAX_MESSAGE_BYTES,
                        "cannot read the topic's max.message.bytes: assuming Kafka's default"
                    );
                    KAFKA_MAX_MESSAGE_BYTES
                });
                (topic.to_owned(), limit)
            })
            .collect();
        if !changelog_exists {
            topics.push((rt.changelog_topic.clone(), KAFKA_MAX_MESSAGE_BYTES));
        }
        OutputLimits { topics }
    }

    /// Limits as given, for tests.
    pub fn new(topics: Vec<(String, usize)>) -> OutputLimits {
        OutputLimits { topics }
    }

    /// `topic`'s `max.message.bytes` (Kafka's default for a topic not read).
    pub fn of(&self, topic: &str) -> usize {
        self.topics
            .iter()
            .find(|(t, _)| t == topic)
            .map_or(KAFKA_MAX_MESSAGE_BYTES, |(_, l)| *l)
    }

    /// The output topic that takes the smallest record batches, and its limit.
    fn smallest(&self) -> (&str, usize) {
        self.topics
            .iter()
            .min_by_key(|(_, l)| *l)
            .map_or(("", KAFKA_MAX_MESSAGE_BYTES), |(t, l)| (t.as_str(), *l))
    }

    /// The `batch.size` the producers need, when librdkafka's default is too large for an
    /// output topic (every producer may write to every topic: the exactly-once one writes all
    /// of them). `None` when the default fits, or `kafka.properties` sets a `batch.size` that
    /// does; one it sets too large is an error naming the key and the topic.
    pub fn batch_size(&self, rt: &RuntimeSettings) -> Result<Option<usize>, KafkaError> {
        let (topic, limit) = self.smallest();
        let most = largest_value(0, limit);
        match rt.properties.get("batch.size") {
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n > most => Err(KafkaError::OutputLimit {
                    key: "kafka.properties.batch.size",
                    problem: format!(
                        "`{v}` is larger than the record batches topic `{topic}` takes \
                         ({limit} bytes, its max.message.bytes, less lz4's worst case and \
                         framing: at most {most}); lower it or raise the topic's \
                         max.message.bytes"
                    ),
                }),
                _ => Ok(None), // librdkafka refuses what is not a number
            },
            None if most < LIBRDKAFKA_BATCH_SIZE => Ok(Some(most)),
            None => Ok(None),
        }
    }

    /// Room for an input record's outputs: its annotated and late events and, if
    /// `holds_payloads` (`annotate = on_close`), its payload's changelog record; at most
    /// `max_output_bytes`, the producers' `message.max.bytes`.
    pub fn record_room(
        &self,
        rt: &RuntimeSettings,
        annotation_field: &str,
        max_output_bytes: usize,
        holds_payloads: bool,
    ) -> RecordRoom {
        let longest_input = rt.input_topics.iter().map(String::len).max().unwrap_or(0);
        let room = |topic: &String, adds: usize, user_copies: usize| Room {
            topic: topic.clone(),
            limit: self.of(topic).min(max_output_bytes),
            adds,
            user_copies,
        };
        let mut rooms = vec![
            room(
                &rt.annotated_topic,
                annotation_field.len() + ANNOTATION_BYTES,
                1,
            ),
            room(&rt.late_topic, longest_input + HEADER_ALLOWANCE, 1),
        ];
        if holds_payloads {
            // Keyed by the scope key (the user id, and the scope's values, which are in the
            // record) with the partition and an event's number; the value holds the user id,
            // then the record.
            rooms.push(room(&rt.changelog_topic, CHANGELOG_PAYLOAD_BYTES, 2));
        }
        RecordRoom { rooms }
    }
}

/// Bytes a held payload's changelog record adds to the record and two copies of its user id
/// (its key's prefix, partition and event number; the value's length of the user id), with
/// room to spare.
pub const CHANGELOG_PAYLOAD_BYTES: usize = 128;

/// Where one output of an input record goes: its topic, that topic's limit, and what the
/// output adds to the record besides `user_copies` copies of its user id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Room {
    topic: String,
    limit: usize,
    adds: usize,
    user_copies: usize,
}

impl Room {
    fn rest(&self, user: usize) -> usize {
        self.adds + user * self.user_copies
    }
}

/// Room for the outputs of one input record: its annotated event (the record plus its
/// annotation) and its late event (the record plus headers), either of which it may become,
/// and with `annotate = on_close` its payload held in the changelog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRoom {
    rooms: Vec<Room>,
}

impl RecordRoom {
    /// `None` if the outputs of a record of `value` bytes, keyed by a user id of `user`
    /// bytes, fit their topics; otherwise the topic that refuses them and its limit.
    pub fn refuses(&self, value: usize, user: usize) -> Option<(&str, usize)> {
        self.rooms
            .iter()
            .find(|r| !fits(value, r.rest(user), r.limit))
            .map(|r| (r.topic.as_str(), r.limit))
    }

    /// The largest record whose outputs fit, keyed by a user id of `user` bytes.
    pub fn largest(&self, user: usize) -> usize {
        self.rooms
            .iter()
            .map(|r| largest_value(r.rest(user), r.limit))
            .min()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_what_fits() {
        let limit = 1_048_588;
        assert_eq!(dead_letter_fit(1_000_000, 400, limit), 1_000_000);
        assert_eq!(dead_letter_fit(0, 400, limit), 0);
        // Just under the limit, incompressible: cut so that the worst case fits.
        let near = limit - 100;
        let kept = dead_letter_fit(near, 400, limit);
        assert!(kept < near);
        assert!(kept + kept / 255 + 400 + RECORD_OVERHEAD <= limit, "{kept}");
        assert!(fits(kept, 400, limit));
        assert!(kept > limit - 10_000, "{kept}: no more is cut than needed");
        // Headers alone over the limit: nothing of the value fits.
        assert_eq!(dead_letter_fit(10, 2_000, 1_000), 0);
    }

    #[test]
    fn the_largest_value_fits_and_one_more_byte_may_not() {
        for limit in [2_000, 20_000, 1_048_588] {
            for rest in [0, 100, 700] {
                let v = largest_value(rest, limit);
                assert!(fits(v, rest, limit), "{limit} {rest}");
                assert!(!fits(v + 256, rest, limit), "{limit} {rest}");
            }
        }
    }

    fn rt(properties: &[(&str, &str)]) -> RuntimeSettings {
        let raw = crate::config::raw::RawConfig::default();
        let mut rt = crate::config::validate(&raw).expect("valid").runtime;
        for (k, v) in properties {
            rt.properties.insert((*k).into(), (*v).into());
        }
        rt
    }

    fn limits(rt: &RuntimeSettings, annotated: usize) -> OutputLimits {
        let mut topics = vec![(rt.annotated_topic.clone(), annotated)];
        for t in [
            &rt.sessions_topic,
            &rt.late_topic,
            &rt.dlq_topic,
            &rt.stats_topic,
        ] {
            topics.push((t.clone(), KAFKA_MAX_MESSAGE_BYTES));
        }
        OutputLimits::new(topics)
    }

    #[test]
    fn batch_size_stays_under_the_smallest_topic() {
        let r = rt(&[]);
        // Kafka's default takes librdkafka's default batches.
        assert_eq!(
            limits(&r, KAFKA_MAX_MESSAGE_BYTES).batch_size(&r).unwrap(),
            None
        );
        let b = limits(&r, 20_000).batch_size(&r).unwrap().unwrap();
        assert!(fits(b, 0, 20_000) && b > 19_000, "{b}");
        // One set small enough is kept; one too large names the key and the topic.
        let small = rt(&[("batch.size", "16384")]);
        assert_eq!(limits(&small, 20_000).batch_size(&small).unwrap(), None);
        let large = rt(&[("batch.size", "100000")]);
        let e = limits(&large, 20_000)
            .batch_size(&large)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`kafka.properties.batch.size`"), "{e}");
        assert!(e.contains(&format!("`{}`", large.annotated_topic)), "{e}");
    }

    #[test]
    fn a_record_has_room_if_its_annotated_and_late_outputs_fit() {
        let r = rt(&[]);
        let room = limits(&r, 20_000).record_room(&r, "session", usize::MAX, false);
        let largest = room.largest(10);
        assert!(largest > 18_000, "{largest}");
        assert_eq!(room.refuses(largest, 10), None);
        assert_eq!(
            room.refuses(largest + 256, 10),
            Some((r.annotated_topic.as_str(), 20_000))
        );
        // A longer user id leaves less room.
        assert!(room.refuses(largest, 1_000).is_some());
        // The producers' own limit counts too.
        let room = limits(&r, KAFKA_MAX_MESSAGE_BYTES).record_room(&r, "session", 30_000, false);
        assert!(room.refuses(40_000, 10).is_some());
        assert_eq!(room.refuses(20_000, 10), None);
    }

    #[test]
    fn payloads_held_in_the_changelog_must_fit_it_too() {
        let r = rt(&[]);
        let mut l = limits(&r, KAFKA_MAX_MESSAGE_BYTES);
        l.topics.push((r.changelog_topic.clone(), 50_000));
        assert_eq!(
            l.record_room(&r, "session", usize::MAX, false)
                .refuses(60_000, 10),
            None
        );
        let held = l.record_room(&r, "session", usize::MAX, true);
        assert_eq!(
            held.refuses(60_000, 10),
            Some((r.changelog_topic.as_str(), 50_000))
        );
        assert!(held.largest(10) < 50_000);
    }
}
