//! What the output topics take. A broker refuses a record batch larger than its topic's
//! `max.message.bytes`, and a refused output stops the instance (README, "Crashes"),
//! again at every restart. Start-up reads every output topic's limit, and the changelog's
//! ([`OutputLimits::from_described`]), and from them ([`OutputLimits::fit`]):
//! - the producers' `batch.size` stays under the smallest ([`OutputLimits::batch_size`]): a
//!   fast stream of small records fills batches of librdkafka's default 1,000,000 bytes;
//! - an input record whose outputs would not fit their topics (its annotated or late event,
//!   the session and stats records and changelog records it leads to) is a
//!   `record_too_large` dead letter ([`RecordRoom`]);
//! - a dead letter too large for its topic goes out truncated ([`dead_letter_fit`]).

use super::{KafkaError, TopicConfig, KAFKA_MAX_MESSAGE_BYTES};
use crate::config::{DecodeSettings, RuntimeSettings};
use rdkafka::config::ClientConfig;

/// Bytes a record batch adds to one record's key, value and headers, at most: the batch header
/// (61), the record's and its headers' length fields, lz4's frame, with room to spare.
pub const RECORD_OVERHEAD: usize = 512;

/// Bytes an annotation adds to an input record, besides the annotation field's name:
/// `,"<field>":{"id":"<16 hex digits>-<number>","seq":<number>,"start":false}` is 91 with
/// two 20-digit numbers, and `null` less.
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

/// The largest multiple of 255 that [`fits`] as a value with `rest` bytes of key and headers
/// in `limit` (up to 254 bytes short of the largest value that does).
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
    /// The topics whose limits start-up reads: the five outputs and the changelog.
    pub fn topics(rt: &RuntimeSettings) -> [&str; 6] {
        [
            &rt.annotated_topic,
            &rt.sessions_topic,
            &rt.late_topic,
            &rt.dlq_topic,
            &rt.stats_topic,
            &rt.changelog_topic,
        ]
    }

    /// The limits of the topics `described` (see [`super::describe_topics`]): each one's
    /// `max.message.bytes`. A topic the brokers did not describe (no DescribeConfigs
    /// permission, an old broker) counts as Kafka's default ([`KAFKA_MAX_MESSAGE_BYTES`]), with
    /// a warning.
    pub fn from_described(described: &[(String, TopicConfig)]) -> OutputLimits {
        let topics = described
            .iter()
            .map(|(topic, d)| {
                let limit = d
                    .as_ref()
                    .map_err(String::clone)
                    .and_then(|entries| {
                        entries
                            .get("max.message.bytes")
                            .and_then(|v| v.parse::<usize>().ok())
                            .ok_or_else(|| "no max.message.bytes in its description".to_owned())
                    })
                    .unwrap_or_else(|problem| {
                        tracing::warn!(
                            topic,
                            problem,
                            assumed = KAFKA_MAX_MESSAGE_BYTES,
                            "cannot read the topic's max.message.bytes: assuming Kafka's default"
                        );
                        KAFKA_MAX_MESSAGE_BYTES
                    });
                (topic.clone(), limit)
            })
            .collect();
        OutputLimits { topics }
    }

    /// What the pipeline takes from the limits (see [`Fitted`]), logging what start-up should
    /// say: a lowered `batch.size`, and topics that take less than `input.max_record_bytes`
    /// allows. A `batch.size` in `kafka.properties` too large is an error
    /// ([`Self::batch_size`]).
    pub fn fit(
        &self,
        rt: &RuntimeSettings,
        decode: &DecodeSettings,
        holds_payloads: bool,
    ) -> Result<Fitted, KafkaError> {
        let batch_size = self.batch_size(rt)?;
        if let Some(b) = batch_size {
            tracing::info!(
                batch_size = b,
                "producers' batch.size lowered to what every output topic takes"
            );
        }
        let room = self.record_room(rt, decode, rt.max_output_bytes, holds_payloads);
        let (fits, topic) = room.largest(&TYPICAL);
        if fits < decode.max_record_bytes {
            tracing::warn!(
                topic,
                max_message_bytes = self.of(topic),
                max_record_bytes = decode.max_record_bytes,
                fits,
                "an output topic takes less than input.max_record_bytes allows: larger records \
                 will be dead letters (record_too_large); raise the topic's max.message.bytes \
                 to keep them"
            );
        }
        Ok(Fitted {
            batch_size,
            room,
            // The producers refuse larger records themselves.
            dead_letter_limit: self.of(&rt.dlq_topic).min(rt.max_output_bytes),
        })
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
    ///
    /// librdkafka counts a batch's uncompressed size against `batch.size` and sends a batch
    /// uncompressed when compressing would make it larger, so a batch never exceeds it; the
    /// margin ([`largest_value`]) is for a topic whose own `compression.type` makes the broker
    /// compress again.
    pub fn batch_size(&self, rt: &RuntimeSettings) -> Result<Option<usize>, KafkaError> {
        let (topic, limit) = self.smallest();
        let most = largest_value(0, limit).max(1);
        match rt.properties.get("batch.size") {
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n > most => Err(KafkaError::OutputLimit {
                    key: "kafka.properties.batch.size",
                    problem: format!(
                        "`{v}` is larger than the record batches topic `{topic}` takes \
                         ({limit} bytes, its max.message.bytes, less a margin: at most \
                         {most}); lower it or raise the topic's max.message.bytes"
                    ),
                }),
                _ => Ok(None), // librdkafka refuses what is not a number
            },
            None if most < LIBRDKAFKA_BATCH_SIZE => Ok(Some(most)),
            None => Ok(None),
        }
    }

    /// Room for the outputs of an input record (see [`RecordRoom`]); every limit at most
    /// `max_output_bytes`, the producers' `message.max.bytes`. `holds_payloads`: `annotate =
    /// on_close`, the record is held in the changelog until its session concludes.
    fn record_room(
        &self,
        rt: &RuntimeSettings,
        decode: &DecodeSettings,
        max_output_bytes: usize,
        holds_payloads: bool,
    ) -> RecordRoom {
        let room = |topic: &String, adds: usize| Room {
            topic: topic.clone(),
            limit: self.of(topic).min(max_output_bytes),
            adds,
            value: false,
            user: 0,
            scope_key: 0,
            input_key: 0,
        };
        let scope_names: usize = decode.scope_fields.iter().map(|f| f.len() + 8).sum();
        let longest_input = rt.input_topics.iter().map(String::len).max().unwrap_or(0);
        let mut accepted = vec![
            Room {
                value: true,
                user: 1,
                ..room(
                    &rt.annotated_topic,
                    decode.annotation_field.len() + ANNOTATION_BYTES,
                )
            },
            Room {
                user: 1 + JSON_ESCAPE,
                scope_key: JSON_ESCAPE,
                ..room(&rt.sessions_topic, SESSION_RECORD_BYTES + scope_names)
            },
            Room {
                user: 1 + JSON_ESCAPE,
                ..room(&rt.stats_topic, STATS_RECORD_BYTES)
            },
            Room {
                user: 1,
                scope_key: 1,
                ..room(&rt.changelog_topic, CHANGELOG_STATE_BYTES)
            },
        ];
        if holds_payloads {
            accepted.push(Room {
                value: true,
                user: 1,
                scope_key: 1,
                ..room(&rt.changelog_topic, CHANGELOG_PAYLOAD_BYTES)
            });
        }
        let late = Room {
            value: true,
            input_key: 1,
            ..room(&rt.late_topic, longest_input + HEADER_ALLOWANCE)
        };
        RecordRoom { accepted, late }
    }
}

/// What the pipeline takes from the output topics' limits ([`OutputLimits::fit`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fitted {
    /// The producers' `batch.size`, when librdkafka's default is too large.
    pub batch_size: Option<usize>,
    /// Room for an input record's outputs.
    pub room: RecordRoom,
    /// The largest dead letter that goes out (see [`dead_letter_fit`]).
    pub dead_letter_limit: usize,
}

impl Fitted {
    /// `config` (a producer's) with the [`Self::batch_size`], if any.
    pub fn producer(&self, mut config: ClientConfig) -> ClientConfig {
        if let Some(b) = self.batch_size {
            config.set("batch.size", b.to_string());
        }
        config
    }
}

/// Ids and keys of this length leave the room start-up's warning states.
const TYPICAL: Sizes = Sizes {
    value: 0,
    user: 64,
    scope_key: 128,
    input_key: 64,
};

/// At most how many bytes JSON writes for one byte of a string (`\u001f`).
const JSON_ESCAPE: usize = 6;

/// Bytes a concluded session's record (or a merge's, a split's) takes besides its user id and
/// scope, with room to spare: its fields, times and numbers, and a few merged session ids.
/// A session that absorbed dozens of others is not bounded by this.
pub const SESSION_RECORD_BYTES: usize = 1024;

/// Bytes a user stats record takes besides its user id, with room to spare.
pub const STATS_RECORD_BYTES: usize = 512;

/// Bytes a key state's changelog record takes besides its scope key and user id, with room to
/// spare: the state, and the unsealed tails of its open sessions (fewer than 32 events each,
/// a few bytes per event). A key with dozens of open sessions at once is not bounded by this.
pub const CHANGELOG_STATE_BYTES: usize = 4096;

/// Bytes a held payload's changelog record adds to the record, its scope key (in the record's
/// key) and its user id (in the value): the key's kind, length and event number, the value's
/// length of the user id, with room to spare.
pub const CHANGELOG_PAYLOAD_BYTES: usize = 64;

/// The sizes of an input record that bound its outputs' sizes, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sizes {
    /// The record's value.
    pub value: usize,
    /// Its user id.
    pub user: usize,
    /// Its scope key (the user id and the scope's values).
    pub scope_key: usize,
    /// Its Kafka key, which its late event keeps.
    pub input_key: usize,
}

/// Where one output of an input record goes, and a bound of its size: `adds`, plus the record
/// (with lz4's worst case) if `value`, plus so many copies of the user id, the scope key and
/// the input's key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Room {
    topic: String,
    limit: usize,
    adds: usize,
    value: bool,
    user: usize,
    scope_key: usize,
    input_key: usize,
}

impl Room {
    fn rest(&self, s: &Sizes) -> usize {
        self.adds + self.user * s.user + self.scope_key * s.scope_key + self.input_key * s.input_key
    }

    fn fits(&self, s: &Sizes) -> bool {
        fits(
            if self.value { s.value } else { 0 },
            self.rest(s),
            self.limit,
        )
    }

    /// The largest record value that fits, with the other sizes of `s`.
    fn largest(&self, s: &Sizes) -> usize {
        match self.value {
            true => largest_value(self.rest(s), self.limit),
            false if self.fits(s) => usize::MAX,
            false => 0,
        }
    }
}

/// Room for the outputs of one input record. One the engine takes (annotated, or held) must
/// fit: its annotated event (the record plus its annotation, keyed by the user id), the
/// concluded session and user stats records it may lead to, its key state's changelog record
/// and, with `annotate = on_close`, the changelog record holding it. A late one must fit the
/// late topic (the record, keyed by its Kafka key, plus headers); the engine keeps nothing of
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRoom {
    accepted: Vec<Room>,
    late: Room,
}

impl RecordRoom {
    /// `None` if the outputs of a record the engine takes, of sizes `s`, fit their topics;
    /// otherwise the first topic that refuses them, and its limit.
    pub fn refuses(&self, s: &Sizes) -> Option<(&str, usize)> {
        self.accepted
            .iter()
            .find(|r| !r.fits(s))
            .map(|r| (r.topic.as_str(), r.limit))
    }

    /// [`Self::refuses`] for a late record's late event.
    pub fn refuses_late(&self, s: &Sizes) -> Option<(&str, usize)> {
        Some((self.late.topic.as_str(), self.late.limit)).filter(|_| !self.late.fits(s))
    }

    /// The largest record value whose outputs fit, taken or late, with the other sizes of
    /// `s`; and the topic that bounds it.
    pub fn largest(&self, s: &Sizes) -> (usize, &str) {
        self.accepted
            .iter()
            .chain([&self.late])
            .map(|r| (r.largest(s), r.topic.as_str()))
            .min_by_key(|(l, _)| *l)
            .unwrap_or((usize::MAX, ""))
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

    fn settings(properties: &[(&str, &str)]) -> (RuntimeSettings, DecodeSettings) {
        let raw = crate::config::raw::RawConfig::default();
        let s = crate::config::validate(&raw).expect("valid");
        let mut rt = s.runtime;
        for (k, v) in properties {
            rt.properties.insert((*k).into(), (*v).into());
        }
        (rt, s.decode)
    }

    fn rt(properties: &[(&str, &str)]) -> RuntimeSettings {
        settings(properties).0
    }

    /// Kafka's default for every topic, but `topic` at `limit`.
    fn limits(rt: &RuntimeSettings, topic: &str, limit: usize) -> OutputLimits {
        let topics = OutputLimits::topics(rt).map(|t| {
            let l = if t == topic {
                limit
            } else {
                KAFKA_MAX_MESSAGE_BYTES
            };
            (t.to_owned(), l)
        });
        OutputLimits {
            topics: topics.into(),
        }
    }

    #[test]
    fn batch_size_stays_under_the_smallest_topic() {
        let r = rt(&[]);
        let t = r.annotated_topic.clone();
        // Kafka's default takes librdkafka's default batches.
        let default = limits(&r, &t, KAFKA_MAX_MESSAGE_BYTES);
        assert_eq!(default.batch_size(&r).unwrap(), None);
        let b = limits(&r, &t, 20_000).batch_size(&r).unwrap().unwrap();
        assert!(fits(b, 0, 20_000) && b > 19_000, "{b}");
        // The changelog counts too.
        let c = r.changelog_topic.clone();
        assert_eq!(limits(&r, &c, 20_000).batch_size(&r).unwrap(), Some(b));
        // One set small enough is kept; one too large names the key and the topic.
        let small = rt(&[("batch.size", "16384")]);
        assert_eq!(limits(&small, &t, 20_000).batch_size(&small).unwrap(), None);
        let large = rt(&[("batch.size", "100000")]);
        let e = limits(&large, &t, 20_000)
            .batch_size(&large)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`kafka.properties.batch.size`"), "{e}");
        assert!(e.contains(&format!("`{t}`")), "{e}");
    }

    fn sizes(value: usize, user: usize) -> Sizes {
        Sizes {
            value,
            user,
            scope_key: user,
            input_key: user,
        }
    }

    #[test]
    fn a_record_the_engine_takes_needs_room_for_its_annotated_event() {
        let (r, d) = settings(&[]);
        let t = r.annotated_topic.as_str();
        let room = limits(&r, t, 20_000).record_room(&r, &d, usize::MAX, false);
        let (largest, bound) = room.largest(&sizes(0, 10));
        assert_eq!(bound, t);
        assert!(largest > 18_000, "{largest}");
        assert_eq!(room.refuses(&sizes(largest, 10)), None);
        assert_eq!(room.refuses(&sizes(largest + 256, 10)), Some((t, 20_000)));
        // A longer user id leaves less room.
        assert!(room.refuses(&sizes(largest, 1_000)).is_some());
        // A late record goes to the late topic, which takes it.
        assert_eq!(room.refuses_late(&sizes(largest + 256, 10)), None);
        // The producers' own limit counts too.
        let room = limits(&r, t, KAFKA_MAX_MESSAGE_BYTES).record_room(&r, &d, 30_000, false);
        assert!(room.refuses(&sizes(40_000, 10)).is_some());
        assert_eq!(room.refuses(&sizes(20_000, 10)), None);
    }

    #[test]
    fn a_late_record_needs_room_for_its_value_and_its_kafka_key() {
        let (r, d) = settings(&[]);
        let t = r.late_topic.as_str();
        let room = limits(&r, t, 20_000).record_room(&r, &d, usize::MAX, false);
        let short_key = sizes(19_000, 10);
        assert_eq!(room.refuses(&short_key), None, "the engine may take it");
        assert_eq!(room.refuses_late(&short_key), None);
        let long_key = Sizes {
            input_key: 5_000,
            ..short_key
        };
        assert_eq!(room.refuses_late(&long_key), Some((t, 20_000)));
    }

    #[test]
    fn sessions_stats_and_key_states_bound_the_user_id_and_scope() {
        let (r, d) = settings(&[]);
        for t in [&r.sessions_topic, &r.stats_topic, &r.changelog_topic] {
            let room = limits(&r, t, 6_000).record_room(&r, &d, usize::MAX, false);
            // Their records do not hold the input record: any value fits.
            assert_eq!(room.refuses(&sizes(500_000, 10)), None, "{t}");
            assert!(room.refuses(&sizes(10, 1_000)).is_some(), "{t}");
        }
    }

    #[test]
    fn payloads_held_in_the_changelog_must_fit_it_too() {
        let (r, d) = settings(&[]);
        let c = r.changelog_topic.as_str();
        let l = limits(&r, c, 50_000);
        let free = l.record_room(&r, &d, usize::MAX, false);
        assert_eq!(free.refuses(&sizes(60_000, 10)), None);
        let held = l.record_room(&r, &d, usize::MAX, true);
        assert_eq!(held.refuses(&sizes(60_000, 10)), Some((c, 50_000)));
        let (largest, bound) = held.largest(&sizes(0, 10));
        assert!(largest < 50_000 && bound == c, "{largest} {bound}");
    }
}
