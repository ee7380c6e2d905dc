//! End to end against a real Apache Kafka broker (started by `scripts/kafka.sh` on 127.0.0.1,
//! or the one in `KAFKA_BOOTSTRAP_SERVERS`), with the real `sessionizer` binary:
//! - streaming and offline give the same sessions and annotations, and /metrics agrees;
//! - bad records land in the dead-letter topic with reasons while the partition keeps flowing;
//! - kill -9 mid-stream, restart: every input is annotated (repeats only identical), sessions
//!   equal the offline result;
//! - `sessionizer generate --topic` produces keyed events;
//! - the broker stopped and restarted mid-run: the process recovers by itself, nothing lost.
//!
//! Waiting is always for a condition (records seen, process exited), with a deadline.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::kafka::{free_port, free_port_pair, kafka_sh, metric, rand_u32, scrape};

const BIN: &str = env!("CARGO_BIN_EXE_sessionizer");

/// An input record: key, value (None: a tombstone), partition (None: by key).
type Input = (Option<String>, Option<Vec<u8>>, Option<i32>);

/// The broker: ours (stopped on drop) or an external one.
struct Broker {
    bootstrap: String,
    dir: Option<(tempfile::TempDir, PathBuf)>,
}

impl Broker {
    fn start() -> Broker {
        if let Ok(b) = std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
            return Broker {
                bootstrap: b,
                dir: None,
            };
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("kafka");
        let port = free_port_pair().to_string();
        let out = kafka_sh(&["start", "--dir", dir.to_str().unwrap(), "--port", &port]);
        assert!(
            out.status.success(),
            "kafka start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bootstrap = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_owned();
        Broker {
            bootstrap,
            dir: Some((tmp, dir)),
        }
    }

    fn dir(&self) -> Option<&str> {
        self.dir.as_ref().map(|(_, d)| d.to_str().unwrap())
    }

    fn create_topics(&self, names: &[&str], partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let res = rt
            .block_on(admin.create_topics(&topics, &AdminOptions::new()))
            .unwrap();
        for r in res {
            r.unwrap();
        }
    }

    fn produce(&self, topic: &str, records: &[Input]) {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("linger.ms", "5")
            .create()
            .unwrap();
        for (k, v, part) in records {
            let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
            if let Some(k) = k {
                r = r.key(k.as_bytes());
            }
            if let Some(v) = v {
                r = r.payload(v.as_slice());
            }
            if let Some(part) = part {
                r = r.partition(*part);
            }
            let mut r = r;
            loop {
                match p.send(r) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        r = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(30)).unwrap();
    }

    /// Reads `topic` from the beginning until `done` holds for what was read (or panics at
    /// the deadline).
    fn read_until(
        &self,
        topic: &str,
        deadline: Duration,
        done: impl Fn(&[Rec]) -> bool,
    ) -> Vec<Rec> {
        match self.try_read_until(topic, deadline, done) {
            Ok(v) => v,
            Err(v) => panic!("timed out reading {topic}: {} records so far", v.len()),
        }
    }

    fn try_read_until(
        &self,
        topic: &str,
        deadline: Duration,
        done: impl Fn(&[Rec]) -> bool,
    ) -> Result<Vec<Rec>, Vec<Rec>> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", format!("reader-{}", rand_u32()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let n = md.topics()[0].partitions().len() as i32;
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let start = Instant::now();
        let mut got = Vec::new();
        // `done` is evaluated when the topic is drained for the moment (or every 5000 records),
        // not after every record: it may be expensive.
        let mut check = true;
        loop {
            if check && done(&got) {
                return Ok(got);
            }
            if start.elapsed() >= deadline {
                return Err(got);
            }
            let polled = c.poll(Duration::from_millis(100));
            check = polled.is_none() || got.len() % 5000 == 0;
            if let Some(Ok(m)) = polled {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_owned(),
                                    String::from_utf8_lossy(x.value.unwrap_or(&[])).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                got.push(Rec {
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m
                        .payload()
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default(),
                    headers,
                });
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(d) = self.dir() {
            let _ = kafka_sh(&["stop", "--dir", d]);
        }
    }
}

#[derive(Debug, Clone)]
struct Rec {
    key: Option<String>,
    value: String,
    headers: BTreeMap<String, String>,
}

/// Synthetic input: `users` users with sessions (think times 5-60 s, gaps of 40 min - 3 h),
/// app_open/app_close around mobile sessions, push_sent now and then; arrival up to 20 s after
/// the event time. Each event has a unique `n`.
fn events(users: u32, per_user: u32, seed: u64) -> Vec<(String, String)> {
    let mut s = seed;
    let mut rnd = move |m: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % m
    };
    let base: i64 = 1_704_067_200_000; // 2024-01-01
    let mut all = Vec::new();
    for u in 0..users {
        let mobile = u % 3 == 0;
        let mut t = base + rnd(3_600_000) as i64;
        let mut in_session = 0;
        for _ in 0..per_user {
            let event = if mobile && in_session == 0 {
                "app_open"
            } else if rnd(30) == 0 {
                "push_sent"
            } else if mobile && rnd(8) == 0 {
                "app_close"
            } else {
                ["view", "click", "search"][rnd(3) as usize]
            };
            all.push((t, format!("u{u}"), event.to_string()));
            in_session += 1;
            if event == "app_close" || rnd(10) == 0 {
                t += 2_400_000 + rnd(8_000_000) as i64;
                in_session = 0;
            } else {
                t += 5_000 + rnd(55_000) as i64;
            }
        }
    }
    let mut arr: Vec<(i64, usize, (i64, String, String))> = all
        .into_iter()
        .enumerate()
        .map(|(i, e)| (e.0 + rnd(20_000) as i64, i, e))
        .collect();
    arr.sort();
    arr.into_iter()
        .enumerate()
        .map(|(n, (_, _, (t, u, ev)))| {
            let line = format!(r#"{{"user_id":"{u}","timestamp":{t},"event":"{ev}","n":{n}}}"#);
            (u, line)
        })
        .collect()
}

const SEMANTICS: &[&str] = &[
    "--timeout",
    "30m",
    "--allowed-lateness",
    "30s",
    "--quiet-period",
    "0s",
    "--idle-after",
    "1s",
    "--start-events",
    "app_open",
    "--end-events",
    "app_close",
    "--excluded-events",
    "push_sent",
];

struct Topics {
    input: String,
    annotated: String,
    sessions: String,
    late: String,
    dlq: String,
    stats: String,
}

impl Topics {
    fn new(broker: &Broker, prefix: &str, partitions: i32) -> Topics {
        let t = Topics {
            input: format!("{prefix}-in"),
            annotated: format!("{prefix}-annotated"),
            sessions: format!("{prefix}-sessions"),
            late: format!("{prefix}-late"),
            dlq: format!("{prefix}-dlq"),
            stats: format!("{prefix}-stats"),
        };
        broker.create_topics(
            &[
                &t.input,
                &t.annotated,
                &t.sessions,
                &t.late,
                &t.dlq,
                &t.stats,
            ],
            partitions,
        );
        t
    }
}

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn terminate(mut self) -> i32 {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(broker: &Broker, t: &Topics, dir: &Path, group: &str, port: u16, extra: &[&str]) -> Proc {
    let log = dir.join(format!("run-{}.log", rand_u32()));
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(BIN)
        .arg("run")
        .args(SEMANTICS)
        .args(["--brokers", &broker.bootstrap, "--group", group])
        .args([
            "--input-topics",
            &t.input,
            "--annotated-topic",
            &t.annotated,
        ])
        .args(["--sessions-topic", &t.sessions, "--late-topic", &t.late])
        .args(["--dlq-topic", &t.dlq, "--stats-topic", &t.stats])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("SESSIONIZER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
}

fn offline(input: &[(String, String)], dir: &Path) -> (Vec<Value>, Vec<String>) {
    let file = dir.join("input.jsonl");
    let mut f = std::fs::File::create(&file).unwrap();
    for (_, l) in input {
        writeln!(f, "{l}").unwrap();
    }
    let out = Command::new(BIN)
        .arg("sessionize")
        .args(SEMANTICS)
        .arg("--input")
        .arg(&file)
        .arg("--annotated")
        .arg(dir.join("annotated.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sessions = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "session")
        .collect();
    let annotated = std::fs::read_to_string(dir.join("annotated.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (sessions, annotated)
}

fn session_set(v: &[Value]) -> BTreeSet<String> {
    v.iter()
        .filter(|s| s["type"] == "session")
        .map(|s| {
            format!(
                "{}|{}|{}|{}|{}|{}",
                s["session_id"],
                s["user_id"],
                s["start"],
                s["end"],
                s["event_count"],
                s["end_reason"]
            )
        })
        .collect()
}

fn annotated_by_n(recs: &[Rec]) -> BTreeMap<u64, BTreeSet<String>> {
    let mut m: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for r in recs {
        let v: Value = serde_json::from_str(&r.value).unwrap();
        m.entry(v["n"].as_u64().unwrap())
            .or_default()
            .insert(r.value.clone());
    }
    m
}

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
    let sessions = broker.read_until(&t.sessions, Duration::from_secs(90), |r| {
        r.len() >= want_sessions.len()
    });
    let got: Vec<Value> = sessions
        .iter()
        .map(|r| serde_json::from_str(&r.value).unwrap())
        .collect();
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

fn kill_9_and_restart_loses_nothing(broker: &Broker) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "kill", 3);
    let input = events(200, 100, 23);
    let (want_sessions, want_annotated) = offline(&input, dir.path());
    let part = |k: &str| (k.trim_start_matches('u').parse::<i32>().unwrap()) % 3;
    broker.produce(
        &t.input,
        &input
            .iter()
            .map(|(k, v)| (Some(k.clone()), Some(v.as_bytes().to_vec()), Some(part(k))))
            .collect::<Vec<_>>(),
    );
    // A short session timeout so the killed member's partitions move on quickly.
    let fast = ["--kafka-property", "session.timeout.ms=6000"];
    let p = run(broker, &t, dir.path(), "kill-group", free_port(), &fast);
    broker.read_until(&t.annotated, Duration::from_secs(90), |r| {
        r.len() >= input.len() / 5
    });
    let first_log = p.log.clone();
    drop(p); // SIGKILL
    let p = run(broker, &t, dir.path(), "kill-group", free_port(), &fast);
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
    let by_n = annotated_by_n(&annotated);
    assert_eq!(by_n.len(), input.len(), "every input annotated");
    let repeated_differently: Vec<_> = by_n.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        repeated_differently.is_empty(),
        "repeats must be identical: {repeated_differently:?}"
    );
    let got: BTreeSet<String> = by_n.values().flat_map(|v| v.iter().cloned()).collect();
    let want: BTreeSet<String> = want_annotated.into_iter().collect();
    assert_eq!(got, want, "annotations equal the offline ones");
    let want_s = session_set(&want_sessions);
    let sessions = broker.read_until(&t.sessions, Duration::from_secs(90), |r| {
        let v: Vec<Value> = r
            .iter()
            .map(|x| serde_json::from_str(&x.value).unwrap())
            .collect();
        session_set(&v).len() >= want_s.len()
    });
    let v: Vec<Value> = sessions
        .iter()
        .map(|x| serde_json::from_str(&x.value).unwrap())
        .collect();
    assert_eq!(session_set(&v), want_s, "sessions equal the offline result");
    assert_eq!(p.terminate(), 0);
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
    let p = run(broker, &t, dir.path(), "bounce-group", free_port(), &[]);
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
    let annotated = broker
        .try_read_until(&t.annotated, Duration::from_secs(120), |r| {
            annotated_by_n(r).len() >= input.len()
        })
        .unwrap_or_else(|r| {
            panic!(
                "{} of {} inputs annotated; log:\n{}",
                annotated_by_n(&r).len(),
                input.len(),
                p.log()
            )
        });
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
}

#[test]
fn kafka_end_to_end() {
    let broker = Broker::start();
    let only = std::env::var("E2E_ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only == name;
    if want("equivalence") {
        streaming_equals_offline_and_metrics_agree(&broker);
    }
    if want("dlq") {
        bad_records_go_to_the_dead_letter_topic(&broker);
    }
    if want("kill") {
        kill_9_and_restart_loses_nothing(&broker);
    }
    if want("generate") {
        generate_produces_keyed_events_to_a_topic(&broker);
    }
    if want("bounce") {
        broker_restart_is_survived(&broker);
    }
}
