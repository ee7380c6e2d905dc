//! End to end against a real Apache Kafka broker (started by `scripts/kafka.sh` on 127.0.0.1,
//! or the one in `KAFKA_BOOTSTRAP_SERVERS`), with the real `sessionizer` binary:
//! - streaming and offline give the same sessions and annotations, and /metrics agrees;
//! - bad records land in the dead-letter topic with reasons while the partition keeps flowing;
//! - kill -9 mid-stream (more input arrives after the kill), restart: every input is annotated
//!   (repeats only identical), sessions equal the offline result;
//! - an existing changelog topic that is not compacted stops the start with a clear error;
//! - SIGTERM while the broker is away: the final commit is given up after
//!   `--shutdown-timeout` and the process exits 0; restarted, it loses nothing;
//! - a changelog restore applies a compacted changelog (commits whose meta record is gone);
//! - local state with a changelog checkpoint beyond the changelog's end is not trusted: it is
//!   rebuilt from the changelog, and the run equals the offline result;
//! - at-least-once, the state producer fenced mid-stream (another producer registers its
//!   transactional id): the failed state transaction rewinds every task, the producer is
//!   replaced, and nothing is lost (repeats only identical, sessions equal the offline result);
//! - `sessionizer generate --topic` produces keyed events;
//! - the broker stopped and restarted mid-run: the process recovers by itself, nothing lost;
//! - started on an empty topic (caught up at once), then given a backfill of old events: none
//!   of them is late;
//! - at-least-once with a two-minute commit interval, a backlog read to its end is committed at
//!   once.
//!
//! Waiting is always for a condition (records seen, process exited), with a deadline.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::e2e::*;
use support::kafka::{free_port, get, kafka_sh, metric, scrape};

fn streaming_equals_offline_and_metrics_agree(broker: &Broker) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "eq", 1);
    let input = events(40, 60, 11);
    let (want_sessions, want_annotated) = offline(&input, dir.path());
    broker.produce(
        &t.input,
        &input
            .iter()
            .map(|(k, v)| (Some(k.clone()), Some(v.as_bytes().to_vec()), None))
            .collect::<Vec<_>>(),
    );
    let port = free_port();
    let p = run(broker, &t, dir.path(), "eq-group", port, &[]);
    let annotated = broker.read_until(&t.annotated, Duration::from_secs(90), |r| {
        r.len() >= input.len()
    });
    // Counted as distinct concluded sessions: merge and split records share the topic.
    let got = wait_sessions(broker, &t.sessions, want_sessions.len(), session_set, &[&p]);
    assert_eq!(
        session_set(&got),
        session_set(&want_sessions),
        "sessions differ from offline"
    );
    let mut a: Vec<String> = annotated.iter().map(|r| r.value.clone()).collect();
    let mut b = want_annotated.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "annotated events differ from offline");
    assert!(annotated
        .iter()
        .all(|r| r.key.as_deref().is_some_and(|k| k.starts_with('u'))));
    let m = scrape(port);
    assert_eq!(
        metric(&m, "sessionizer_records_out_total{output=\"annotated\"}"),
        input.len() as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "sessionizer_events_total{outcome=\"accepted\"")
            + metric(&m, "sessionizer_events_total{outcome=\"excluded\""),
        input.len() as f64
    );
    assert_eq!(
        metric(&m, "sessionizer_sessions_concluded_total"),
        want_sessions.len() as f64
    );
    assert_eq!(
        metric(&m, "sessionizer_session_length_seconds_count"),
        want_sessions.len() as f64
    );
    // The state's memory: the default budget, the shared RocksDB cache in use (memtables are
    // charged to it), the partition's decoded states cached, all within the budget.
    let budget = metric(&m, "sessionizer_memory_budget_bytes");
    assert_eq!(budget, (1u64 << 30) as f64, "{m}");
    let rocksdb = metric(&m, "sessionizer_rocksdb_cache_bytes");
    let cached = metric(&m, "sessionizer_state_cache_bytes{partition=\"0\"}");
    assert!(rocksdb > 0.0 && rocksdb <= budget / 2.0, "{m}");
    assert!(cached > 0.0 && cached <= budget / 2.0, "{m}");
    // Commits have staged state records (the counter is wired to the commits).
    assert!(metric(&m, "sessionizer_changelog_bytes_total") > 0.0, "{m}");
    // Every record taken: the input partition's consumer lag (from the client's next
    // statistics report) is 0.
    let topic = format!("topic=\"{}\"", t.input);
    wait_metrics(port, |m| {
        m.lines().any(|l| {
            l.starts_with("sessionizer_consumer_lag_records{")
                && l.contains("partition=\"0\"")
                && l.contains(&topic)
                && l.ends_with(" 0")
        })
    });
    let stats = broker.read_until(&t.stats, Duration::from_secs(30), |r| {
        r.len() >= want_sessions.len()
    });
    assert_eq!(stats.len(), want_sessions.len());
    assert_eq!(p.terminate(), 0, "graceful shutdown exits 0");
}

fn bad_records_go_to_the_dead_letter_topic(broker: &Broker) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "dlq", 1);
    let good = |n: u32| {
        Some(
            format!(
                r#"{{"user_id":"g","timestamp":{},"event":"view"}}"#,
                1_704_067_200_000u64 + n as u64 * 1000
            )
            .into_bytes(),
        )
    };
    let recs = vec![
        (Some("g".to_string()), good(0), None),
        (Some("x".to_string()), Some(b"not json".to_vec()), None),
        (None, Some(br#"{"timestamp":1704067200000}"#.to_vec()), None),
        (
            Some("x".to_string()),
            Some(br#"{"user_id":"x","timestamp":"yesterday"}"#.to_vec()),
            None,
        ),
        (
            Some("x".to_string()),
            Some(
                format!(
                    r#"{{"user_id":"x","timestamp":1,"pad":"{}"}}"#,
                    "p".repeat(2000)
                )
                .into_bytes(),
            ),
            None,
        ),
        (Some("x".to_string()), None, None),
        (Some("g".to_string()), good(1), None),
    ];
    broker.produce(&t.input, &recs);
    let p = run(
        broker,
        &t,
        dir.path(),
        "dlq-group",
        free_port(),
        &["--max-record-bytes", "1024"],
    );
    let dlq = broker.read_until(&t.dlq, Duration::from_secs(60), |r| r.len() >= 5);
    let reasons: BTreeSet<&str> = dlq
        .iter()
        .map(|r| r.headers["sessionizer.reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        [
            "empty_record",
            "invalid_json",
            "invalid_time",
            "missing_user_id",
            "record_too_large"
        ]
        .into_iter()
        .collect()
    );
    assert!(
        dlq.iter().any(|r| r.value == "not json"),
        "original bytes kept"
    );
    // The tombstone's dead letter is a tombstone (null value, not empty), and the only one.
    let nulls: Vec<&Rec> = dlq.iter().filter(|r| r.null).collect();
    assert_eq!(nulls.len(), 1, "{dlq:?}");
    assert_eq!(nulls[0].headers["sessionizer.reason"], "empty_record");
    assert_eq!(nulls[0].key.as_deref(), Some("x"));
    assert!(dlq
        .iter()
        .all(|r| r.headers.contains_key("sessionizer.source.offset")));
    let annotated = broker.read_until(&t.annotated, Duration::from_secs(60), |r| r.len() >= 2);
    assert_eq!(
        annotated.len(),
        2,
        "the partition kept flowing past the bad records"
    );
    assert_eq!(p.terminate(), 0);
}

/// Records near the default input limit (1,000,000 bytes): one just under it is annotated
/// (its output, a little larger, is taken by the producers), one over it is a dead letter, and
/// the partition flows on. (With librdkafka's default `message.max.bytes` the first one's
/// annotated output was refused and the instance stopped, or aborted its transaction again
/// and again.)
fn records_near_the_size_limit(broker: &Broker) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "large", 1);
    let sized = |n: u32, size: usize| {
        let head = format!(
            r#"{{"user_id":"big","timestamp":{},"event":"view","pad":""#,
            1_704_067_200_000u64 + n as u64 * 1000
        );
        let mut v = head.into_bytes();
        v.resize(size - 2, b'p');
        v.extend_from_slice(b"\"}");
        (Some("big".to_string()), Some(v), None)
    };
    let recs = vec![sized(0, 999_990), sized(1, 1_010_000), sized(2, 200)];
    broker.produce(&t.input, &recs);
    let p = run(broker, &t, dir.path(), "large-group", free_port(), &[]);
    let annotated = broker.read_until(&t.annotated, Duration::from_secs(60), |r| r.len() >= 2);
    assert_eq!(annotated.len(), 2, "the records within the limit");
    assert!(
        annotated[0].value.len() > 1_000_000,
        "the annotated output is over librdkafka's default message.max.bytes"
    );
    let dlq = broker.read_until(&t.dlq, Duration::from_secs(60), |r| !r.is_empty());
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].headers["sessionizer.reason"], "record_too_large");
    assert_eq!(dlq[0].value.len(), 1_010_000, "the original bytes");
    assert_eq!(p.terminate(), 0);
}

/// A dead letter that would not fit in the dead-letter topic (a record refused for its size,
/// incompressible, whose headers take it over the topic's `max.message.bytes`) goes out
/// truncated, with the original size in a header, and the partition flows on. (The broker
/// refused it whole, and the instance stopped, again at every restart.)
fn a_dead_letter_too_large_for_its_topic_is_truncated(broker: &Broker) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::named("dlqfit");
    broker.create_topics(&[&t.input, &t.annotated, &t.sessions, &t.late, &t.stats], 1);
    broker.create_topics_with(&[&t.dlq], 1, &[("max.message.bytes", "20000")]);
    let pad = incompressible(19_900, 0x9e37_79b9_7f4a_7c15);
    let big = format!(r#"{{"user_id":"big","timestamp":1704067200000,"pad":"{pad}"}}"#);
    let small = r#"{"user_id":"big","timestamp":1704067201000}"#.to_string();
    broker.produce(
        &t.input,
        &[
            (Some("big".into()), Some(big.clone().into_bytes()), None),
            (Some("big".into()), Some(small.into_bytes()), None),
        ],
    );
    let p = run(
        broker,
        &t,
        dir.path(),
        "dlqfit-group",
        free_port(),
        &["--max-record-bytes", "10000"],
    );
    let annotated = broker.read_until(&t.annotated, Duration::from_secs(60), |r| !r.is_empty());
    assert_eq!(annotated.len(), 1, "the partition flowed on");
    let dlq = broker.read_until(&t.dlq, Duration::from_secs(60), |r| !r.is_empty());
    assert_eq!(dlq.len(), 1);
    let d = &dlq[0];
    assert_eq!(d.headers["sessionizer.reason"], "record_too_large");
    assert_eq!(
        d.headers["sessionizer.truncated_from"],
        big.len().to_string()
    );
    assert!(big.starts_with(&d.value), "a prefix of the original bytes");
    assert!(
        (15_000..big.len()).contains(&d.value.len()),
        "{}",
        d.value.len()
    );
    assert_eq!(p.terminate(), 0);
}

/// An annotated topic that takes record batches of at most 20,000 bytes. A `batch.size` set
/// larger is refused at start-up, naming the key and the topic. Left to the default, in both
/// modes, the producers' batches stay under the topic's limit (a backlog of small records
/// filled batches of librdkafka's default 1,000,000 bytes, which the broker refused: the
/// instance never got past them), and a record whose annotated output would not fit is a
/// `record_too_large` dead letter, kept whole. So is a late record too large for a small late
/// topic.
fn small_output_topics_take_every_output(broker: &Broker) {
    let refused = Topics::named("outlimit");
    broker.create_topics(&[&refused.input], 1);
    broker.create_topics_with(&[&refused.annotated], 1, &[("max.message.bytes", "20000")]);
    refused.create_outputs_but_annotated(broker);
    let dir = tempfile::tempdir().unwrap();
    let mut p = run(
        broker,
        &refused,
        dir.path(),
        "outlimit-group",
        free_port(),
        &["--kafka-property", "batch.size=100000"],
    );
    let status = p.wait_exit(
        Duration::from_secs(60),
        "no exit with a batch.size too large",
    );
    let log = p.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("`kafka.properties.batch.size`")
            && log.contains(&format!("`{}`", refused.annotated)),
        "{log}"
    );
    // In time order: none is late.
    let input: Vec<(String, String)> = (0..10_000i64)
        .map(|i| {
            let u = format!("u{}", i % 100);
            let ts = 1_704_067_200_000 + i * 1000;
            let v = format!(r#"{{"user_id":"{u}","timestamp":{ts},"event":"view","n":{i}}}"#);
            (u, v)
        })
        .collect();
    let mut records = to_user_partitions(&input, 1);
    let pad = incompressible(25_000, 0x2545_f491_4f6c_dd1d);
    let big = format!(r#"{{"user_id":"big","timestamp":1704067200000,"pad":"{pad}"}}"#);
    records.insert(
        records.len() / 2,
        (Some("big".into()), Some(big.clone().into_bytes()), None),
    );
    for guarantee in ["exactly-once", "at-least-once"] {
        let t = Topics::named(&format!("outlimit-{guarantee}"));
        broker.create_topics(&[&t.input], 1);
        broker.create_topics_with(&[&t.annotated], 1, &[("max.message.bytes", "20000")]);
        t.create_outputs_but_annotated(broker);
        broker.produce(&t.input, &records);
        let dir = tempfile::tempdir().unwrap();
        let group = format!("outlimit-{guarantee}-group");
        let flags = ["--guarantee", guarantee];
        let p = run(broker, &t, dir.path(), &group, free_port(), &flags);
        let annotated = broker
            .try_read_until(&t.annotated, Duration::from_secs(90), |r| {
                r.len() >= input.len()
            })
            .unwrap_or_else(|r| {
                panic!(
                    "{guarantee}: {} of {} annotated; log:\n{}",
                    r.len(),
                    input.len(),
                    p.log()
                )
            });
        assert_eq!(annotated.len(), input.len(), "{guarantee}");
        broker.read_until(&t.dlq, Duration::from_secs(30), |r| !r.is_empty());
        assert_eq!(p.terminate(), 0, "{guarantee}");
        let dlq = broker.read_all(&t.dlq);
        assert_eq!(dlq.len(), 1, "{guarantee}");
        let d = &dlq[0];
        assert_eq!(d.headers["sessionizer.reason"], "record_too_large");
        assert!(
            d.headers["sessionizer.error"].contains(&format!("`{}`", t.annotated)),
            "{:?}",
            d.headers
        );
        assert!(!d.headers.contains_key("sessionizer.truncated_from"));
        assert_eq!(d.value, big);
    }
    // A late record too large for a small late topic: a dead letter too, and the partition
    // flows on. (Records the engine takes are not checked against the late topic.)
    let t = Topics::named("outlimit-late");
    broker.create_topics(&[&t.input, &t.annotated, &t.sessions, &t.dlq, &t.stats], 1);
    broker.create_topics_with(&[&t.late], 1, &[("max.message.bytes", "20000")]);
    let old = big.replace("1704067200000", "1703000000000"); // 296 h earlier: beyond the horizon
    let record = |v: &str| (Some("big".to_string()), Some(v.as_bytes().to_vec()), None);
    let first = r#"{"user_id":"big","timestamp":1704067200000}"#;
    let last = r#"{"user_id":"big","timestamp":1704067201000}"#;
    broker.produce(&t.input, &[record(first), record(&old), record(last)]);
    let dir = tempfile::tempdir().unwrap();
    let p = run(
        broker,
        &t,
        dir.path(),
        "outlimit-late-group",
        free_port(),
        &[],
    );
    let annotated = broker.read_until(&t.annotated, Duration::from_secs(60), |r| r.len() >= 2);
    assert_eq!(annotated.len(), 2, "the partition flowed on");
    broker.read_until(&t.dlq, Duration::from_secs(30), |r| !r.is_empty());
    assert_eq!(p.terminate(), 0);
    let dlq = broker.read_all(&t.dlq);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].headers["sessionizer.reason"], "record_too_large");
    assert!(
        dlq[0].headers["sessionizer.error"].contains(&format!("`{}`", t.late)),
        "{:?}",
        dlq[0].headers
    );
    assert_eq!(dlq[0].value, old);
    assert!(broker.read_all(&t.late).is_empty());
}

fn kill_9_and_restart_loses_nothing(broker: &Broker) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "kill", 3);
    // No idle advance (the input pauses at the kill); flush events conclude every session.
    let input = with_flush_events(3, events(200, 100, 23));
    let (want_sessions, want_annotated) = offline(&input, dir.path());
    let part = |k: &str| user_partition(k, 3);
    let records = |i: &[(String, String)]| to_user_partitions(i, 3);
    // The second part arrives only after the kill, so the kill is mid-stream whatever the
    // speed of the first instance: sessions open at the kill continue after the restart.
    let (before, after) = input.split_at(input.len() * 3 / 5);
    broker.produce(&t.input, &records(before));
    // A short session timeout so the killed member's partitions move on quickly.
    let fast = ["--kafka-property", "session.timeout.ms=6000"];
    let semantics = semantics("100h");
    let start = || {
        let port = free_port();
        run_with(
            broker,
            &t,
            dir.path(),
            "kill-group",
            port,
            &semantics,
            &fast,
        )
    };
    let p = start();
    broker.read_until(&t.annotated, Duration::from_secs(90), |r| {
        r.len() >= input.len() / 5
    });
    let first_log = p.log.clone();
    drop(p); // SIGKILL
    broker.produce(&t.input, &records(after));
    let p = start();
    let annotated = broker
        .try_read_until(&t.annotated, Duration::from_secs(120), |r| annotated_by_n(r).len() >= input.len())
        .unwrap_or_else(|r| {
            let seen = annotated_by_n(&r);
            let mut missing: BTreeMap<i32, (usize, u64, u64)> = BTreeMap::new();
            for (n, (k, _)) in input.iter().enumerate() {
                if !seen.contains_key(&(n as u64)) {
                    let e = missing.entry(part(k)).or_insert((0, n as u64, 0));
                    e.0 += 1;
                    e.2 = n as u64;
                }
            }
            let l1 = std::fs::read_to_string(&first_log).unwrap_or_default();
            let late = broker.try_read_until(&t.late, Duration::from_secs(5), |_| false).unwrap_err();
            let dlq = broker.try_read_until(&t.dlq, Duration::from_secs(5), |_| false).unwrap_err();
            eprintln!("LATE {} DLQ {}; first late: {:?}; first dlq: {:?}", late.len(), dlq.len(), late.first(), dlq.first());
            if let Some(d) = broker.dir() {
                let o = kafka_sh(&["tool", "consumer-groups", "--dir", d, "--", "--describe", "--group", "kill-group"]);
                eprintln!("GROUP: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            }
            panic!("{} records read, {} of {} inputs annotated; missing by partition (count, first n, last n): {missing:?}; first log:\n{l1}\nlog:\n{}", r.len(), seen.len(), input.len(), p.log())
        });
    equals_offline(
        broker,
        &t,
        &annotated,
        input.len(),
        want_annotated,
        &want_sessions,
        p,
    );
}

fn fenced_state_producer_rewinds_and_loses_nothing(broker: &Broker) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, Producer};
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "fence", 3);
    let input = with_flush_events(3, events(200, 100, 31));
    let (want_sessions, want_annotated) = offline(&input, dir.path());
    let (before, after) = input.split_at(input.len() * 3 / 5);
    broker.produce(&t.input, &to_user_partitions(before, 3));
    let group = "fence-group";
    let semantics = semantics("100h");
    let extra = ["--guarantee", "at-least-once", "--instance-id", "fence-a"];
    let p = run_with(
        broker,
        &t,
        dir.path(),
        group,
        free_port(),
        &semantics,
        &extra,
    );
    broker.read_until(&t.annotated, Duration::from_secs(90), |r| {
        r.len() >= input.len() / 5
    });
    // Another producer registers the state producer's transactional id (`<group>-<instance
    // id>`): the open state transaction is aborted and the next one fails as fenced.
    let intruder: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("transactional.id", format!("{group}-fence-a"))
        .create()
        .unwrap();
    intruder.init_transactions(Duration::from_secs(60)).unwrap();
    drop(intruder);
    // The rest of the input: an instance that has already committed everything it read (an
    // idle interval commits nothing) meets the fence only with its next transaction, which
    // this input brings about.
    broker.produce(&t.input, &to_user_partitions(after, 3));
    // The instance's next state transaction fails: it replaces the producer and rewinds every
    // task (reopened from its last written commit: 3 openings at the start, 3 more).
    wait_log(
        &p,
        "the state producer fenced and replaced, and the tasks rewound",
        |log| {
            log.contains("fenced: replacing the producer once")
                && log.matches("task opened").count() >= 6
        },
    );
    annotated_like_offline(broker, &t, input.len(), want_annotated, &want_sessions, p);
}

/// Standby replicas: instance A owns both partitions, then B joins and takes one of them (q),
/// of which A keeps a standby copy. When B stops, A opens q from that copy and replays less
/// than a tenth of q's changelog (without the copy, A's old state of q is half a changelog
/// behind). Annotations and sessions still equal the offline result.
fn standby_copy_shortens_a_takeover(broker: &Broker) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let t = Topics::new(broker, "standby", 2);
    let input = with_flush_events(2, events(200, 60, 43));
    let (want_sessions, want_annotated) = offline(&input, da.path());
    let (first, second) = input.split_at(input.len() / 2);
    broker.produce(&t.input, &to_user_partitions(first, 2));
    let group = "standby-group";
    let semantics = semantics("100h");
    let instance = |dir: &std::path::Path, id: &str| {
        let extra = ["--instance-id", id, "--standby-replicas", "1"];
        run_with(broker, &t, dir, group, free_port(), &semantics, &extra)
    };
    let a = instance(da.path(), "sb-a");
    wait_log(&a, "A opening both partitions", |l| {
        l.matches("task opened").count() >= 2
    });
    let b = instance(db.path(), "sb-b");
    wait_log(&b, "B opening a partition", |l| l.contains("task opened"));
    let q = field(&b.log(), "task opened", "partition").expect("partition opened by B");
    wait_log(&a, "A keeping a standby copy of B partition", |l| {
        l.lines()
            .any(|x| x.contains("standby copy kept") && x.contains(&format!("partition={q} ")))
    });
    broker.produce(&t.input, &to_user_partitions(second, 2));
    wait_annotated(broker, &t, input.len(), &[&a, &b]);
    let mark = a.log().len();
    assert_eq!(b.terminate(), 0, "B stops cleanly");
    let opened = format!("task opened partition={q} ");
    wait_log(&a, "A taking B's partition over", |l| {
        l.get(mark..).is_some_and(|l| l.contains(&opened))
    });
    let after = a.log()[mark..].to_owned();
    // The replay, if any: `restoring state from the changelog partition=q from=F to=T`.
    let replay = after.lines().find(|l| {
        l.contains("restoring state from the changelog") && l.contains(&format!("partition={q} "))
    });
    eprintln!("standby: partition {q} taken over, replay: {replay:?}");
    if let Some(line) = replay {
        let from: i64 = field(line, "restoring", "from").unwrap().parse().unwrap();
        let to: i64 = field(line, "restoring", "to").unwrap().parse().unwrap();
        assert!(
            (to - from) * 10 < to,
            "A replayed {} of {to} changelog offsets of partition {q}: its standby copy did \
             not keep up\n{after}",
            to - from
        );
    }
    annotated_like_offline(broker, &t, input.len(), want_annotated, &want_sessions, a);
}

/// The offsets of the committed records of `topic`'s partition 0, read from the beginning.
fn committed_offsets(broker: &Broker, topic: &str) -> Vec<i64> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", "compaction-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut offsets = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => offsets.push(m.offset()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return offsets,
            Some(Err(e)) => eprintln!("compaction reader: {e}"),
            None => {}
        }
    }
    panic!("{topic} not read to its end within 60 s");
}

/// The changelog compacted by the broker's own log cleaner (segments rolled every 200 ms, cleaned as soon
/// as the cleaner looks, tombstones dropped at once), not simulated: once the cleaner has
/// removed superseded records, an instance without local state restores from what is left and
/// carries on, and annotations and sessions equal the offline result.
fn restore_after_broker_compaction(broker: &Broker) {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let t = Topics::new(broker, "compact", 1);
    let group = "compact-group";
    let changelog = format!("{group}-changelog");
    broker.create_topics_with(
        &[&changelog],
        1,
        &[
            ("cleanup.policy", "compact"),
            ("segment.bytes", "1048576"),
            ("segment.ms", "200"),
            ("min.cleanable.dirty.ratio", "0.01"),
            ("min.compaction.lag.ms", "0"),
            ("delete.retention.ms", "0"),
        ],
    );
    // Few users with many events each, fed in chunks: every commit rewrites their keys.
    let input = with_flush_events(1, events(20, 150, 47));
    let (want_sessions, want_annotated) = offline(&input, d1.path());
    let (first, second) = input.split_at(input.len() * 2 / 3);
    let semantics = semantics("100h");
    let a = run_with(broker, &t, d1.path(), group, free_port(), &semantics, &[]);
    let chunks = 12;
    let size = first.len().div_ceil(chunks);
    let mut sent = 0;
    for chunk in first.chunks(size) {
        broker.produce(&t.input, &to_user_partitions(chunk, 1));
        sent += chunk.len();
        wait_annotated(broker, &t, sent, &[&a]);
    }
    // The cleaner has run once more offsets up to the last record hold no record than hold
    // one (before it, the only such offsets are one transaction marker per commit).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (records, removed) = loop {
        let o = committed_offsets(broker, &changelog);
        let removed = o.last().map_or(0, |l| l + 1 - o.len() as i64);
        if removed > o.len() as i64 {
            break (o.len(), removed);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broker did not compact {changelog} within 120 s: {} records, {removed} \
             offsets without one up to the last",
            o.len()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!("compaction: {records} records left, {removed} offsets without one");
    assert_eq!(a.terminate(), 0);
    // Another instance, without local state: it restores from the compacted changelog.
    broker.produce(&t.input, &to_user_partitions(second, 1));
    let b = run_with(broker, &t, d2.path(), group, free_port(), &semantics, &[]);
    let annotated = wait_annotated(broker, &t, input.len(), &[&b]);
    assert!(
        b.log().contains("state restored"),
        "the state was restored from the changelog:\n{}",
        b.log()
    );
    equals_offline(
        broker,
        &t,
        &annotated,
        input.len(),
        want_annotated,
        &want_sessions,
        b,
    );
}

/// The value of `key=` on the first line of `log` containing `marker`.
fn field(log: &str, marker: &str, key: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(marker))?;
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    Some(
        line[start..]
            .split(|c: char| c.is_whitespace())
            .next()?
            .to_owned(),
    )
}

fn broker_restart_is_survived(broker: &Broker) {
    let Some(d) = broker.dir() else {
        eprintln!("external broker: skipping the broker restart scenario");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "bounce", 1);
    let input = events(50, 40, 5);
    let (first, second) = input.split_at(input.len() / 2);
    broker.produce(
        &t.input,
        &first
            .iter()
            .map(|(k, v)| (Some(k.clone()), Some(v.as_bytes().to_vec()), None))
            .collect::<Vec<_>>(),
    );
    // The events are from 2024: a caught-up partition idle for `idle_after` moves its
    // watermark to the wall clock, which would make the second half late (beyond the lateness
    // horizon) whenever the broker stays away longer than that. Not what this scenario is
    // about: keep the watermark with the events.
    let p = run_with(
        broker,
        &t,
        dir.path(),
        "bounce-group",
        free_port(),
        &semantics("1h"),
        &[],
    );
    broker.read_until(&t.annotated, Duration::from_secs(60), |r| {
        r.len() >= first.len()
    });
    let out = kafka_sh(&["stop", "--dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_secs(2)); // the broker stays down for a while
    let out = kafka_sh(&["start-node", "1", "--dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    broker.produce(
        &t.input,
        &second
            .iter()
            .map(|(k, v)| (Some(k.clone()), Some(v.as_bytes().to_vec()), None))
            .collect::<Vec<_>>(),
    );
    let annotated = wait_annotated(broker, &t, input.len(), &[&p]);
    assert_eq!(
        annotated_by_n(&annotated).len(),
        input.len(),
        "nothing lost across the broker restart"
    );
    let log = p.log.clone();
    assert_eq!(
        p.terminate(),
        0,
        "the process recovered by itself and stopped cleanly; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// SIGTERM while the broker is away, with a final commit that cannot complete (sessions that
/// concluded on the wall clock after the broker stopped): the process gives up on it after
/// `--shutdown-timeout` and exits 0 instead of waiting for the brokers. Restarted once the
/// broker is back, it redoes the work since its last commit: every session is published.
/// Exactly-once, the given-up transaction never becomes visible: every session is published
/// exactly once. At-least-once, the outputs whose acknowledgement was given up are produced
/// again (identically).
fn shutdown_while_the_broker_is_away(broker: &Broker, guarantee: &str) {
    let Some(d) = broker.dir() else {
        eprintln!("external broker: skipping the shutdown-while-away scenario");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let name = format!("away-{guarantee}");
    let t = Topics::new(broker, &name, 1);
    // Events of now: their sessions conclude 25 s after their last event, on the wall clock
    // (a caught-up partition's watermark follows it after 1 s), once the broker is gone.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let users = 20;
    let input: Vec<(String, String)> = (0..users * 5)
        .map(|i| {
            let (u, k) = (i % users, i / users);
            let v = format!(
                r#"{{"user_id":"u{u}","timestamp":{},"event":"view"}}"#,
                now + k * 100
            );
            (format!("u{u}"), v)
        })
        .collect();
    broker.produce(&t.input, &to_user_partitions(&input, 1));
    let semantics = [
        "--timeout",
        "25s",
        "--allowed-lateness",
        "0s",
        "--quiet-period",
        "0s",
        "--idle-after",
        "1s",
    ];
    let port = free_port();
    let start = |port| {
        run_with(
            broker,
            &t,
            dir.path(),
            &format!("{name}-group"),
            port,
            &semantics,
            &["--shutdown-timeout", "5s", "--guarantee", guarantee],
        )
    };
    let p = start(port);
    broker.read_until(&t.annotated, Duration::from_secs(60), |r| {
        r.len() >= input.len()
    });
    // Caught up (the consumer saw the partition's end) and idle: the watermark follows the
    // wall clock, past the last event. Without that, sessions would not conclude while the
    // broker is away.
    let last_event_s = (now + 400) as f64 / 1000.0;
    wait_metrics(port, |m| {
        metric(m, "sessionizer_watermark_seconds{") > last_event_s + 1.0
    });
    let out = kafka_sh(&["stop", "--dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let concluded = |m: &str| metric(m, "sessionizer_sessions_concluded_total");
    assert_eq!(
        concluded(&scrape(port)),
        0.0,
        "sessions concluded before the broker stopped: the scenario needs them after"
    );
    wait_metrics(port, |m| concluded(m) >= users as f64);
    let stopping = Instant::now();
    let log = p.log.clone();
    let code = p.terminate();
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("did not complete within service.shutdown_timeout"),
        "the final commit was given up:\n{log}"
    );
    let took = stopping.elapsed();
    eprintln!("{guarantee}: stopped {took:?} after SIGTERM, with a 5 s shutdown timeout");
    assert!(
        took < Duration::from_secs(30),
        "stopped in {took:?}, with a 5 s shutdown timeout"
    );
    let out = kafka_sh(&["start-node", "1", "--dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = start(free_port());
    let got = wait_sessions(broker, &t.sessions, users as usize, session_set, &[&p]);
    let sessions: BTreeSet<String> = got
        .iter()
        .filter(|s| s["type"] == "session")
        .map(|s| format!("{}|{}", s["user_id"], s["event_count"]))
        .collect();
    assert_eq!(sessions.len(), users as usize, "{sessions:?}");
    assert!(sessions.iter().all(|s| s.ends_with("|5")), "{sessions:?}");
    assert_eq!(p.terminate(), 0);
    if guarantee == "exactly-once" {
        // Everything a read_committed reader sees once both runs have stopped.
        let published = broker
            .read_all(&t.sessions)
            .iter()
            .filter(|r| serde_json::from_str::<Value>(&r.value).unwrap()["type"] == "session")
            .count();
        assert_eq!(published, users as usize, "each session published once");
    }
}

/// Output topics deleted while the instance runs: their outputs cannot be delivered however
/// often they are sent again. Exactly-once says so on `/readyz` while it retries, then stops
/// with an error naming a deleted topic (it used to abort and rewind several times a second
/// for ever, ready all along); at-least-once stops at once. Either way nothing is committed
/// past the failure, and a restart refuses to start while the topic is missing.
fn a_deleted_output_topic_stops_the_instance(broker: &Broker, guarantee: &str) {
    if broker.dir().is_none() {
        // Kafka's default broker (auto.create.topics.enable) would create them again.
        eprintln!("external broker: skipping the deleted-output-topic scenario");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = format!("gone-{guarantee}");
    let t = Topics::new(broker, &name, 1);
    let input = events(20, 10, 41);
    let (first, second) = input.split_at(input.len() / 2);
    broker.produce(&t.input, &to_user_partitions(first, 1));
    let group = format!("{name}-group");
    let flags = ["--guarantee", guarantee];
    let port = free_port();
    let mut p = run(broker, &t, dir.path(), &group, port, &flags);
    broker.read_until(&t.annotated, Duration::from_secs(60), |r| {
        r.len() >= first.len()
    });
    // Every record of the second half is annotated or late (once the partition is idle, the
    // watermark follows the wall clock): both topics go.
    let gone = [&t.annotated, &t.late];
    for topic in gone {
        broker.delete_topic(topic);
    }
    let names_one = |text: &str| gone.iter().any(|g| text.contains(&format!("topic `{g}`")));
    broker.produce(&t.input, &to_user_partitions(second, 1));
    if guarantee == "exactly-once" {
        let started = Instant::now();
        loop {
            let r = get(port, "/readyz");
            // (The first failures may be timeouts, of other topics' records too.)
            if r.starts_with("HTTP/1.1 503")
                && r.contains("state transactions failing")
                && names_one(&r)
            {
                break;
            }
            assert!(
                p.child.try_wait().unwrap().is_none()
                    && started.elapsed() < Duration::from_secs(90),
                "/readyz never said the transactions fail for a deleted topic (last answer: {r}):\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let status = p.wait_exit(
        Duration::from_secs(90),
        "no exit with output topics deleted",
    );
    let log = p.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("sessionizer: error:"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(names_one(error), "{error}");
    if guarantee != "exactly-once" {
        return; // the start-up check is the same in both modes
    }
    let mut again = run(broker, &t, dir.path(), &group, free_port(), &flags);
    let status = again.wait_exit(
        Duration::from_secs(60),
        "a start with output topics missing",
    );
    let log = again.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("does not exist") && names_one(&log), "{log}");
}

/// Waits until the /metrics text on `port` satisfies `done`, for at most 120 s.
fn wait_metrics(port: u16, done: impl Fn(&str) -> bool) {
    let started = Instant::now();
    loop {
        let m = scrape(port);
        if done(&m) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "metrics never got there:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An instance started on an empty input topic is caught up at once; a backfill of old
/// events (2024) produced afterwards is sessionized like offline, none of it late. (A task that
/// had seen nothing used to jump its watermark to the wall clock at its first end of
/// partition, sending the whole backfill to the late topic: the failover test's flake.)
fn backfill_after_an_empty_start(broker: &Broker) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "backfill", 1);
    let input = with_flush_events(1, events(30, 40, 5));
    let (want_sessions, want_annotated) = offline(&input, dir.path());
    let port = free_port();
    let p = run_with(
        broker,
        &t,
        dir.path(),
        "backfill-group",
        port,
        &semantics("100h"),
        &[],
    );
    wait_log(&p, "the empty partition caught up", |l| {
        l.contains("caught up: reached the end of the partition")
    });
    // Time moves on in every task at each tick: two more ticks, and the caught-up empty task
    // has been advanced at least once.
    wait_metrics(port, |m| m.contains("sessionizer_tick_seconds_count"));
    let ticks = metric(&scrape(port), "sessionizer_tick_seconds_count");
    assert!(ticks > 0.0, "a tick ran before");
    wait_metrics(port, |m| {
        metric(m, "sessionizer_tick_seconds_count") >= ticks + 2.0
    });
    broker.produce(&t.input, &to_user_partitions(&input, 1));
    annotated_like_offline(broker, &t, input.len(), want_annotated, &want_sessions, p);
    assert!(broker.read_all(&t.late).is_empty(), "nothing is late");
}

/// At-least-once with a commit interval of two minutes: a backlog read to its end is committed
/// at once, not a commit interval later. The group's committed offsets (what lag monitors read
/// and a restart resumes from) reach the end of every partition well before the interval is
/// up, and every input is annotated.
fn a_drained_backlog_is_committed_at_once(broker: &Broker) {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let dir = tempfile::tempdir().unwrap();
    let partitions = 3;
    let t = Topics::new(broker, "drained", partitions);
    let input = with_flush_events(partitions, events(60, 30, 11));
    broker.produce(&t.input, &to_user_partitions(&input, partitions));
    let group = "drained-group";
    let p = run(
        broker,
        &t,
        dir.path(),
        group,
        free_port(),
        &[
            "--guarantee",
            "at-least-once",
            "--commit-interval",
            "120s",
            "--catch-up-commit-interval",
            "120s",
            "--transaction-timeout",
            "240s",
        ],
    );
    let offsets: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let ends: Vec<i64> = (0..partitions)
        .map(|q| {
            offsets
                .fetch_watermarks(&t.input, q, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect();
    let mut tpl = TopicPartitionList::new();
    for q in 0..partitions {
        tpl.add_partition(&t.input, q);
    }
    let limit = Duration::from_secs(40);
    let started = Instant::now();
    let committed = loop {
        // Until the broker has its offsets topic, the coordinator may not answer yet.
        let committed: Vec<i64> = offsets
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .map(|c| {
                c.elements()
                    .iter()
                    .map(|e| match e.offset() {
                        Offset::Offset(o) => o,
                        _ => -1,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if committed == ends || started.elapsed() > limit {
            break committed;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        committed,
        ends,
        "committed offsets {limit:?} after the start, with a 120 s commit interval: the drained \
         backlog was not committed at once\n{}",
        p.log()
    );
    let annotated = wait_annotated(broker, &t, input.len(), &[&p]);
    assert_eq!(annotated.len(), input.len(), "every input annotated once");
    assert_eq!(p.terminate(), 0);
}

/// Two co-partitioned input topics (app events on one, web events on the other, both keyed by
/// user): the sessions are those of the offline run over both; every input is annotated once.
/// Input topics with different partition counts are refused at start.
fn two_input_topics(broker: &Broker) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "multi", 2);
    let second = "multi-in-web".to_owned();
    broker.create_topics(&[&second], 2);
    let input = events(60, 40, 17);
    let (want_sessions, _) = offline(&input, dir.path());
    let part = |k: &str| user_partition(k, 2);
    // Arrival order is kept within each topic; users are spread over both topics by event.
    let (app, web): (Vec<_>, Vec<_>) = input.iter().enumerate().partition(|(i, _)| i % 3 != 0);
    for (topic, part_of) in [(&t.input, &app), (&second, &web)] {
        broker.produce(
            topic,
            &part_of
                .iter()
                .map(|(_, (k, v))| (Some(k.clone()), Some(v.as_bytes().to_vec()), Some(part(k))))
                .collect::<Vec<_>>(),
        );
    }
    let both = Topics {
        input: format!("{},{second}", t.input),
        annotated: t.annotated.clone(),
        sessions: t.sessions.clone(),
        late: t.late.clone(),
        dlq: t.dlq.clone(),
        stats: t.stats.clone(),
    };
    let p = run(broker, &both, dir.path(), "multi-group", free_port(), &[]);
    let annotated = broker.read_until(&t.annotated, Duration::from_secs(90), |r| {
        annotated_by_n(r).len() >= input.len()
    });
    let by_n = annotated_by_n(&annotated);
    assert_eq!(
        by_n.len(),
        input.len(),
        "every input of both topics annotated"
    );
    assert_eq!(annotated.len(), input.len(), "each exactly once");
    // Session numbers follow the order in which a user's sessions were first seen, which
    // depends on how the two topics interleave: compare everything but the ids.
    let without_ids = |v: &[Value]| -> BTreeSet<String> {
        session_set(v)
            .into_iter()
            .map(|s| s.split_once('|').unwrap().1.to_owned())
            .collect()
    };
    let want_s = without_ids(&want_sessions);
    let v = wait_sessions(broker, &t.sessions, want_s.len(), without_ids, &[&p]);
    assert_eq!(
        without_ids(&v),
        want_s,
        "sessions over both topics equal offline"
    );
    assert_eq!(p.terminate(), 0);

    // Not co-partitioned: a clear error and exit 1.
    let third = "multi-in-three".to_owned();
    broker.create_topics(&[&third], 3);
    let bad = format!("{},{third}", t.input);
    let err = refused_start(broker, &t, &bad, &dir.path().join("bad"), &[]);
    assert!(
        err.contains("not co-partitioned") && err.contains("multi-in-three: 3 partitions"),
        "{err}"
    );

    // An existing changelog topic that is not compacted: a clear error and exit 1.
    let deleting = "multi-deleting-changelog";
    broker.create_topics_with(&[deleting], 2, &[("cleanup.policy", "delete")]);
    let err = refused_start(
        broker,
        &t,
        &t.input,
        &dir.path().join("bad2"),
        &["--changelog-topic", deleting],
    );
    assert!(
        err.contains(deleting) && err.contains("cleanup.policy `delete`"),
        "{err}"
    );

    // An input topic that never appears: a clear error and exit 1, after the wait for it.
    let err = refused_start(broker, &t, "multi-missing", &dir.path().join("bad3"), &[]);
    assert!(
        err.contains("waiting for it to appear")
            && err.contains("topic `multi-missing` does not exist"),
        "{err}"
    );

    // An input topic created just after the start (a script racing the instance, or a
    // cluster whose brokers do not all know the topic yet): the instance waits for it.
    let appear = Topics::named("appear");
    appear.create_outputs(broker, 2);
    let appear_dir = dir.path().join("appear");
    std::fs::create_dir_all(&appear_dir).unwrap();
    let p = run(
        broker,
        &appear,
        &appear_dir,
        "appear-group",
        free_port(),
        &[],
    );
    wait_log(&p, "the wait for the missing input topic", |l| {
        l.contains("waiting for it to appear")
    });
    broker.create_topics(&[&appear.input], 2);
    let few = events(5, 4, 23);
    broker.produce(&appear.input, &to_user_partitions(&few, 2));
    let got = wait_annotated(broker, &appear, few.len(), &[&p]);
    assert_eq!(annotated_by_n(&got).len(), few.len());
    assert_eq!(p.terminate(), 0);
}

/// Runs `sessionizer run` on `inputs`, which must refuse to start: exit code 1 within 60 s.
/// Returns its standard error.
fn refused_start(
    broker: &Broker,
    t: &Topics,
    inputs: &str,
    state_dir: &std::path::Path,
    extra: &[&str],
) -> String {
    let log = state_dir.with_extension("log");
    let child = Command::new(BIN)
        .args([
            "run",
            "--brokers",
            &broker.bootstrap,
            "--group",
            "multi-bad",
        ])
        .args(["--input-topics", inputs, "--annotated-topic", &t.annotated])
        .args(["--sessions-topic", &t.sessions, "--late-topic", &t.late])
        .args(["--dlq-topic", &t.dlq, "--stats-topic", &t.stats])
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut p = Proc { child, log };
    let status = p.wait_exit(
        Duration::from_secs(60),
        "still running after 60 s instead of refusing to start",
    );
    let err = p.log();
    assert_eq!(status.code(), Some(1), "{err}");
    err
}

fn generate_produces_keyed_events_to_a_topic(broker: &Broker) {
    broker.create_topics(&["gen-in"], 3);
    let out = Command::new(BIN)
        .args(["generate", "--count", "500", "--users", "20", "--seed", "3"])
        .args(["--topic", "gen-in", "--brokers", &broker.bootstrap])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = broker.read_until("gen-in", Duration::from_secs(60), |r| r.len() >= 500);
    assert_eq!(recs.len(), 500);
    for r in &recs {
        let v: Value = serde_json::from_str(&r.value).unwrap();
        assert_eq!(r.key.as_deref(), v["user_id"].as_str(), "keyed by user id");
    }
    // A topic the brokers do not have: an error naming it, after a 5 s wait for it to
    // appear (librdkafka alone waited 30 s, then failed record by record).
    let out = Command::new(BIN)
        .args(["generate", "--count", "5", "--topic", "gen-missing"])
        .args(["--brokers", &broker.bootstrap])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("topic `gen-missing` does not exist"), "{err}");
}

/// A changelog as log compaction leaves it: the records of a first commit without its last
/// record (the partition meta record, superseded by the second commit's), then a second
/// commit. A restore must apply both: the first commit's other records are still the latest
/// values of their keys (grouping records by commit and waiting for each commit's marker
/// would drop them).
fn restore_applies_a_compacted_changelog(broker: &Broker) {
    use sessionizer::engine::{KeyState, PartitionMeta, SourceOffset, StateStore, UserStats};
    use sessionizer::kafka::{changelog::Restorer, output::Outputs};
    use sessionizer::store::{RocksOptions, RocksStore};
    let dir = tempfile::tempdir().unwrap();
    let mut raw = sessionizer::config::raw::RawConfig::default();
    raw.kafka.brokers = Some(broker.bootstrap.clone());
    raw.kafka.group = Some("restore-group".into());
    raw.kafka.changelog_topic = Some("restore-changelog".into());
    let rt = sessionizer::config::validate(&raw).unwrap().runtime;
    broker.create_topics(&["restore-changelog"], 1);
    let key = |user: &str, created: u64| KeyState {
        user: user.to_owned(),
        created,
        ..KeyState::default()
    };
    let meta = |open: u64| PartitionMeta {
        open_sessions: open,
        ..PartitionMeta::default()
    };
    let offset = |next_offset: i64| SourceOffset {
        topic: "in".into(),
        partition: 0,
        next_offset,
    };
    let stats = UserStats {
        session_count: 3,
        ..UserStats::default()
    };
    // The source: commit 1, then commit 2 (which overwrites u1 and adds u3).
    let mut src = RocksStore::open(&dir.path().join("src"), RocksOptions::default()).unwrap();
    src.enable_changelog();
    src.put_key("u1", key("u1", 1)).unwrap();
    src.put_key("u2", key("u2", 2)).unwrap();
    src.put_stats("u1", &stats).unwrap();
    src.commit(&meta(2), &[offset(10)]).unwrap();
    let first = src.take_changes().unwrap();
    src.write_staged(&first, Some(first.len() as i64)).unwrap();
    src.put_key("u1", key("u1", 5)).unwrap();
    src.put_key("u3", key("u3", 6)).unwrap();
    src.commit(&meta(3), &[offset(20)]).unwrap();
    let second = src.take_changes().unwrap();
    assert!(second.len() >= 3, "u1, u3 and the marker: {second:?}");
    // Compacted: the first commit's u1 (rewritten by the second) and its meta record (the last
    // record of every commit) are gone.
    let kept: Vec<_> = first[..first.len() - 1]
        .iter()
        .filter(|c| !second.iter().any(|s| s.key == c.key))
        .collect();
    assert!(kept.len() >= 2, "u2 and u1's stats survive: {kept:?}");
    let total = (kept.len() + second.len()) as u64;
    let mut out = Outputs::new(&sessionizer::kafka::idempotent_producer_config(&rt)).unwrap();
    for c in kept.into_iter().chain(&second) {
        out.send_change(&rt.changelog_topic, 0, &c.key, c.value.as_deref())
            .unwrap();
    }
    out.flush().unwrap();
    // Restored into an empty store.
    let mut dst = RocksStore::open(&dir.path().join("dst"), RocksOptions::default()).unwrap();
    let r = Restorer::new(&rt)
        .unwrap()
        .restore(0, 0, &mut dst, &mut |_, _| {})
        .unwrap();
    assert_eq!(r.applied, total, "every record is applied");
    assert_eq!(
        r.checkpoint, total as i64,
        "checkpoint after the last record"
    );
    assert_eq!(dst.take_key("u1").unwrap(), Some(key("u1", 5)));
    assert_eq!(
        dst.take_key("u2").unwrap(),
        Some(key("u2", 2)),
        "the first commit's surviving record"
    );
    assert_eq!(dst.take_key("u3").unwrap(), Some(key("u3", 6)));
    assert_eq!(dst.get_stats("u1").unwrap(), Some(stats));
    assert_eq!(dst.load_meta().unwrap(), Some(meta(3)));
    assert_eq!(dst.committed_offsets().unwrap(), vec![offset(20)]);
}

/// Local state whose changelog checkpoint lies beyond the end of the changelog (a disk from
/// another cluster, or a changelog topic deleted and created again) must not be trusted: the
/// task deletes it and rebuilds from the changelog (empty here). The junk state claims 1000
/// earlier sessions for every user and input offsets a sixth of the way in, so trusting it
/// would change every session id and skip records.
fn untrusted_local_state_is_rebuilt(broker: &Broker) {
    use sessionizer::engine::{KeyState, PartitionMeta, SourceOffset, StateStore};
    use sessionizer::store::{RocksOptions, RocksStore};
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "untrusted", 3);
    let group = "untrusted-group";
    let input = with_flush_events(3, events(60, 20, 37));
    let (want_sessions, want_annotated) = offline(&input, dir.path());
    for p in 0..3 {
        let path = dir
            .path()
            .join("state")
            .join(group)
            .join(format!("partition-{p}"));
        let mut s = RocksStore::open(&path, RocksOptions::default()).unwrap();
        s.enable_changelog();
        for (k, _) in input.iter().filter(|(k, _)| user_partition(k, 3) == p) {
            let junk = KeyState {
                user: k.clone(),
                created: 1000,
                ..KeyState::default()
            };
            s.put_key(k, junk).unwrap();
        }
        let skip = SourceOffset {
            topic: t.input.clone(),
            partition: p,
            next_offset: input.len() as i64 / 6,
        };
        s.commit(&PartitionMeta::default(), &[skip]).unwrap();
        let changes = s.take_changes().unwrap();
        // The changelog does not exist yet: any checkpoint is beyond its end.
        s.write_staged(&changes, Some(1_000_000)).unwrap();
    }
    broker.produce(&t.input, &to_user_partitions(&input, 3));
    let p = run_with(
        broker,
        &t,
        dir.path(),
        group,
        free_port(),
        &semantics("100h"),
        &[],
    );
    let annotated = wait_annotated(broker, &t, input.len(), &[&p]);
    let got: BTreeSet<String> = annotated.iter().map(|r| r.value.clone()).collect();
    let want: BTreeSet<String> = want_annotated.into_iter().collect();
    assert_eq!(got, want, "annotations equal the offline ones");
    let want_s = session_set(&want_sessions);
    let v = wait_sessions(broker, &t.sessions, want_s.len(), session_set, &[&p]);
    assert_eq!(session_set(&v), want_s, "sessions equal the offline result");
    let log = p.log();
    assert!(
        log.matches("checkpoint beyond the end of the changelog")
            .count()
            >= 3,
        "every partition's local state was distrusted:\n{log}"
    );
    assert_eq!(p.terminate(), 0);
}

#[test]
fn kafka_end_to_end() {
    let broker = Broker::start();
    let only = std::env::var("E2E_ONLY").unwrap_or_default();
    assert!(
        [
            "",
            "equivalence",
            "dlq",
            "large",
            "kill",
            "multi",
            "generate",
            "bounce",
            "restore",
            "untrusted",
            "fenced",
            "standby",
            "compact",
            "away",
            "backfill",
            "drained",
            "gone",
            "dlqfit",
            "outlimit"
        ]
        .contains(&only.as_str()),
        "E2E_ONLY=`{only}` names no scenario"
    );
    let want = |name: &str| only.is_empty() || only == name;
    if want("equivalence") {
        streaming_equals_offline_and_metrics_agree(&broker);
    }
    if want("dlq") {
        bad_records_go_to_the_dead_letter_topic(&broker);
    }
    if want("large") {
        records_near_the_size_limit(&broker);
    }
    if want("dlqfit") {
        a_dead_letter_too_large_for_its_topic_is_truncated(&broker);
    }
    if want("outlimit") {
        small_output_topics_take_every_output(&broker);
    }
    if want("kill") {
        kill_9_and_restart_loses_nothing(&broker);
    }
    if want("multi") {
        two_input_topics(&broker);
    }
    if want("generate") {
        generate_produces_keyed_events_to_a_topic(&broker);
    }
    if want("bounce") {
        broker_restart_is_survived(&broker);
    }
    if want("restore") {
        restore_applies_a_compacted_changelog(&broker);
    }
    if want("untrusted") {
        untrusted_local_state_is_rebuilt(&broker);
    }
    if want("fenced") {
        fenced_state_producer_rewinds_and_loses_nothing(&broker);
    }
    if want("standby") {
        standby_copy_shortens_a_takeover(&broker);
    }
    if want("compact") {
        restore_after_broker_compaction(&broker);
    }
    if want("backfill") {
        backfill_after_an_empty_start(&broker);
    }
    if want("drained") {
        a_drained_backlog_is_committed_at_once(&broker);
    }
    if want("gone") {
        a_deleted_output_topic_stops_the_instance(&broker, "exactly-once");
        a_deleted_output_topic_stops_the_instance(&broker, "at-least-once");
    }
    if want("away") {
        shutdown_while_the_broker_is_away(&broker, "exactly-once");
        shutdown_while_the_broker_is_away(&broker, "at-least-once");
    }
}
