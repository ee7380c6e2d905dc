//! Shared pieces of the end-to-end tests against the real broker: the broker (ours via
//! `scripts/kafka.sh`, or `KAFKA_BOOTSTRAP_SERVERS`), topics, synthetic input, running the
//! `sessionizer` binary, the offline reference run and the comparisons.
#![allow(dead_code)]

use super::kafka::{free_port_pair, kafka_sh, rand_u32};
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

pub const BIN: &str = env!("CARGO_BIN_EXE_sessionizer");

/// An input record: key, value (None: a tombstone), partition (None: by key).
pub type Input = (Option<String>, Option<Vec<u8>>, Option<i32>);

/// The broker: ours (stopped on drop) or an external one.
pub struct Broker {
    pub bootstrap: String,
    dir: Option<(tempfile::TempDir, PathBuf)>,
    /// Replication factor of the topics created.
    replication: i32,
}

/// The secured listeners of [`Broker::start_secure`].
pub struct Secure {
    /// Bootstrap servers of the SASL_PLAINTEXT listener.
    pub sasl: String,
    /// Bootstrap servers of the SSL listener.
    pub tls: String,
    /// Bootstrap servers of the SASL_SSL listener (the same user, the same CA).
    pub sasl_ssl: String,
    /// Bootstrap servers of the SSL listener that requires a client certificate.
    pub mtls: String,
    /// A client certificate for it, with its key (PKCS#12, password `sessionizer-tls`).
    pub client_keystore: PathBuf,
    /// The CA that signed the broker's certificate (PEM).
    pub ca: PathBuf,
}

/// A base port P with P..P+2n free on 127.0.0.1 (n brokers and their controllers).
fn free_ports(nodes: u16) -> u16 {
    if nodes == 1 {
        return free_port_pair();
    }
    free_port_run(2 * nodes)
}

/// A base port P with P..P+count free on 127.0.0.1.
fn free_port_run(count: u16) -> u16 {
    for _ in 0..200 {
        // Below the ephemeral range (32768+ on Linux), so that a client connection cannot
        // take the port of a node that is down and restarted later.
        let p = 20_000 + (rand_u32() % 12_000) as u16;
        if (p..p + count).all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok()) {
            return p;
        }
    }
    panic!("no free port range");
}

impl Broker {
    /// A single node (or the one in `KAFKA_BOOTSTRAP_SERVERS`).
    pub fn start() -> Broker {
        if let Ok(b) = std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
            return Broker {
                bootstrap: b,
                dir: None,
                replication: 1,
            };
        }
        Self::start_nodes(1)
    }

    /// A fresh local cluster of `nodes` (1 or 3) nodes.
    pub fn start_nodes(nodes: u16) -> Broker {
        Self::start_with(nodes, free_ports(nodes), &[])
    }

    /// A fresh single node that also has a SASL_PLAINTEXT listener and an SSL listener
    /// (`scripts/kafka.sh start --sasl --tls`: SASL PLAIN and SCRAM, user `sessionizer`,
    /// password `sessionizer-secret`; a certificate for 127.0.0.1 signed by a CA of its own).
    /// The tests' own clients use the PLAINTEXT listener.
    pub fn start_secure() -> (Broker, Secure) {
        let b = Self::start_with(1, free_port_run(6), &["--sasl", "--tls"]);
        let dir = b.dir().unwrap().to_owned();
        let listener = |flag: &str| {
            let out = kafka_sh(&["bootstrap", "--dir", &dir, flag]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let secure = Secure {
            sasl: listener("--sasl"),
            tls: listener("--tls"),
            sasl_ssl: listener("--sasl-ssl"),
            mtls: listener("--mtls"),
            ca: Path::new(&dir).join("tls").join("ca.pem"),
            client_keystore: Path::new(&dir).join("tls").join("client.p12"),
        };
        (b, secure)
    }

    fn start_with(nodes: u16, port: u16, extra: &[&str]) -> Broker {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("kafka");
        let port = port.to_string();
        let n = nodes.to_string();
        let mut args = vec![
            "start",
            "--nodes",
            &n,
            "--dir",
            dir.to_str().unwrap(),
            "--port",
            &port,
        ];
        args.extend_from_slice(extra);
        let out = kafka_sh(&args);
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
            replication: i32::from(nodes),
        }
    }

    pub fn dir(&self) -> Option<&str> {
        self.dir.as_ref().map(|(_, d)| d.to_str().unwrap())
    }

    pub fn create_topics(&self, names: &[&str], partitions: i32) {
        self.create_topics_with(names, partitions, &[]);
    }

    /// An admin client of the broker, and a runtime to wait for its answers on.
    fn admin(&self) -> (AdminClient<DefaultClientContext>, tokio::runtime::Runtime) {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (admin, rt)
    }

    /// [`Self::create_topics`] with topic configurations.
    pub fn create_topics_with(&self, names: &[&str], partitions: i32, configs: &[(&str, &str)]) {
        let (admin, rt) = self.admin();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            // Records carry event times from 2024: without retention.ms=-1 the brokers' time
            // retention would delete them while the test runs.
            .map(|n| {
                let mut t = NewTopic::new(n, partitions, TopicReplication::Fixed(self.replication))
                    .set("retention.ms", "-1");
                for (k, v) in configs {
                    t = t.set(k, v);
                }
                t
            })
            .collect();
        let res = rt
            .block_on(admin.create_topics(&topics, &AdminOptions::new()))
            .unwrap();
        for r in res {
            r.unwrap();
        }
    }

    /// Deletes `topic` (and waits for the brokers' answer).
    pub fn delete_topic(&self, topic: &str) {
        let (admin, rt) = self.admin();
        let res = rt
            .block_on(admin.delete_topics(&[topic], &AdminOptions::new()))
            .unwrap();
        for r in res {
            r.unwrap();
        }
    }

    pub fn produce(&self, topic: &str, records: &[Input]) {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("linger.ms", "5")
            // Records up to the topics' own limit (1,048,588 bytes by default).
            .set("message.max.bytes", "1048588")
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
        // Long enough to ride out a node of the three-node cluster stalling (seen once on
        // 2 cores: a node answered nothing for about 30 s, then its partitions moved).
        p.flush(Duration::from_secs(180)).unwrap();
    }

    /// Reads `topic` from the beginning until `done` holds for what was read (or panics at
    /// the deadline).
    pub fn read_until(
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

    /// Everything a read_committed reader sees in `topic` now: reads every partition to its
    /// end.
    pub fn read_all(&self, topic: &str) -> Vec<Rec> {
        let (c, n) = self.reader(topic, true);
        let mut at_end = BTreeSet::new();
        let mut got = Vec::new();
        let start = Instant::now();
        while at_end.len() < n as usize {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "reading {topic} to its end took too long"
            );
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    at_end.remove(&m.partition());
                    got.push(rec(&m));
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                _ => {}
            }
        }
        got
    }

    /// A read_committed consumer outside any group, assigned every partition of `topic` from
    /// the beginning (reporting partition ends if `eof`), and the partition count.
    fn reader(&self, topic: &str, eof: bool) -> (BaseConsumer, i32) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", format!("reader-{}", rand_u32()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", if eof { "true" } else { "false" })
            .set("isolation.level", "read_committed")
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
        (c, n)
    }

    /// For a failure message: the topic's leaders and in-sync replicas, the consumer groups'
    /// lag, the transactions the brokers know of, and the producers of every partition of
    /// `topic` (an open transaction holds back what read_committed readers see).
    pub fn diagnose(&self, topic: &str) -> String {
        let Some(dir) = self.dir() else {
            return String::new();
        };
        let mut out = String::new();
        for node in 1..=self.replication {
            let log = Path::new(dir).join(format!("node{node}")).join("kafka.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("$ tail {}\n", log.display()));
            for l in &lines[lines.len().saturating_sub(30)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        let mut tool = |name: &str, args: &[&str]| {
            let mut all = vec!["tool", name, "--dir", dir, "--"];
            all.extend_from_slice(args);
            let o = kafka_sh(&all);
            out.push_str(&format!(
                "$ {name} {}\n{}{}\n",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        };
        // Leaders and in-sync replicas: a partition whose only in-sync replica died is offline.
        tool("topics", &["--describe", "--topic", topic]);
        tool("consumer-groups", &["--describe", "--all-groups"]);
        tool("transactions", &["list"]);
        let (_, n) = self.reader(topic, false);
        for p in 0..n {
            let p = p.to_string();
            let args = ["describe-producers", "--topic", topic, "--partition", &p];
            tool("transactions", &args);
        }
        out
    }

    pub fn try_read_until(
        &self,
        topic: &str,
        deadline: Duration,
        done: impl Fn(&[Rec]) -> bool,
    ) -> Result<Vec<Rec>, Vec<Rec>> {
        let (c, _) = self.reader(topic, false);
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
                got.push(rec(&m));
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
pub struct Rec {
    pub key: Option<String>,
    /// Empty for a null value, see `null`.
    pub value: String,
    /// The value is null (a tombstone).
    pub null: bool,
    pub headers: BTreeMap<String, String>,
}

/// Synthetic input: `users` users with sessions (think times 5-60 s, gaps of 40 min - 3 h),
/// app_open/app_close around mobile sessions, push_sent now and then; arrival up to 20 s after
/// the event time. Each event has a unique `n`.
pub fn events(users: u32, per_user: u32, seed: u64) -> Vec<(String, String)> {
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

/// A record as read back: key, value and headers as text.
fn rec(m: &rdkafka::message::BorrowedMessage<'_>) -> Rec {
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
    Rec {
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        value: m
            .payload()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default(),
        null: m.payload().is_none(),
        headers,
    }
}

/// The partition the tests give user `u<n>`: n modulo `partitions`.
/// `len` letters drawn at random from `seed` (not zero): lz4 finds nothing to compress.
pub fn incompressible(len: usize, seed: u64) -> String {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

pub fn user_partition(user: &str, partitions: i32) -> i32 {
    user.trim_start_matches('u').parse::<i32>().unwrap() % partitions
}

/// `input` as records to produce, keyed by user, each to its [`user_partition`].
pub fn to_user_partitions(input: &[(String, String)], partitions: i32) -> Vec<Input> {
    input
        .iter()
        .map(|(k, v)| {
            let p = user_partition(k, partitions);
            (Some(k.clone()), Some(v.as_bytes().to_vec()), Some(p))
        })
        .collect()
}

/// `input` plus, for each of `partitions` partitions, an excluded event a day after the last
/// event (users `u<600000 + p>` land on partition p with the tests' user-number partitioning
/// for 1, 2, 3 or 6 partitions), so that every watermark passes every session and they all
/// conclude, in streaming as offline, without the idle advance.
pub fn with_flush_events(
    partitions: i32,
    mut input: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let last = input
        .iter()
        .map(|(_, l)| {
            serde_json::from_str::<Value>(l).unwrap()["timestamp"]
                .as_i64()
                .unwrap()
        })
        .max()
        .unwrap();
    let n = input.len();
    for p in 0..partitions as usize {
        let user = format!("u{}", 600_000 + p);
        let t = last + 86_400_000;
        let line = format!(
            r#"{{"user_id":"{user}","timestamp":{t},"event":"push_sent","n":{}}}"#,
            n + p
        );
        input.push((user, line));
    }
    input
}

/// The session semantics flags of the end-to-end tests, with `--idle-after idle_after`.
pub fn semantics(idle_after: &'static str) -> Vec<&'static str> {
    vec![
        "--timeout",
        "30m",
        "--allowed-lateness",
        "30s",
        "--quiet-period",
        "0s",
        "--idle-after",
        idle_after,
        "--start-events",
        "app_open",
        "--end-events",
        "app_close",
        "--excluded-events",
        "push_sent",
    ]
}

/// The late records by reason and source partition, with their first source offset and the
/// watermarks they met: " [beyond_horizon p0: 1174 from offset 0, watermark 1795477697455..1795477697455]".
fn late_summary(late: &[Rec]) -> String {
    let mut by: BTreeMap<(String, String), (usize, i64, i64, i64)> = BTreeMap::new();
    for r in late {
        let h = |k: &str| r.headers.get(k).cloned().unwrap_or_default();
        let num = |k: &str| h(k).parse::<i64>().unwrap_or(-1);
        let e = by
            .entry((h("sessionizer.reason"), h("sessionizer.source.partition")))
            .or_insert((0, i64::MAX, i64::MAX, i64::MIN));
        e.0 += 1;
        e.1 = e.1.min(num("sessionizer.source.offset"));
        e.2 = e.2.min(num("sessionizer.watermark"));
        e.3 = e.3.max(num("sessionizer.watermark"));
    }
    by.iter()
        .map(|((reason, p), (n, offset, w0, w1))| {
            format!(" [{reason} p{p}: {n} from offset {offset}, watermark {w0}..{w1}]")
        })
        .collect()
}

/// Reads the annotated topic until `count` distinct inputs are annotated and returns what was
/// read; panics at the deadline with broker diagnostics and the logs of `procs`.
pub fn wait_annotated(broker: &Broker, t: &Topics, count: usize, procs: &[&Proc]) -> Vec<Rec> {
    broker
        .try_read_until(&t.annotated, Duration::from_secs(180), |r| {
            annotated_by_n(r).len() >= count
        })
        .unwrap_or_else(|r| {
            let late = broker.read_all(&t.late);
            panic!(
                "{} of {count} inputs annotated ({} annotated records; {} late{}, {} dead \
                 letters); brokers:\n{}\nprocesses:\n{}",
                annotated_by_n(&r).len(),
                r.len(),
                late.len(),
                late_summary(&late),
                broker.read_all(&t.dlq).len(),
                broker.diagnose(&t.annotated),
                report(procs)
            )
        })
}

/// Waits until each of `inputs` inputs is annotated (see [`wait_annotated`]; `p`'s log on
/// failure), then [`equals_offline`].
pub fn annotated_like_offline(
    broker: &Broker,
    t: &Topics,
    inputs: usize,
    want_annotated: Vec<String>,
    want_sessions: &[Value],
    p: Proc,
) {
    let annotated = wait_annotated(broker, t, inputs, &[&p]);
    equals_offline(
        broker,
        t,
        &annotated,
        inputs,
        want_annotated,
        want_sessions,
        p,
    );
}

/// Every one of the `inputs` inputs is annotated (repeats only identical), annotations and
/// sessions equal the offline result, and `p` exits 0 on SIGTERM.
pub fn equals_offline(
    broker: &Broker,
    t: &Topics,
    annotated: &[Rec],
    inputs: usize,
    want_annotated: Vec<String>,
    want_sessions: &[Value],
    p: Proc,
) {
    let by_n = annotated_by_n(annotated);
    assert_eq!(by_n.len(), inputs, "every input annotated");
    let repeated_differently: Vec<_> = by_n.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        repeated_differently.is_empty(),
        "repeats must be identical: {repeated_differently:?}"
    );
    let got: BTreeSet<String> = by_n.values().flat_map(|v| v.iter().cloned()).collect();
    let want: BTreeSet<String> = want_annotated.into_iter().collect();
    assert_eq!(got, want, "annotations equal the offline ones");
    let want_s = session_set(want_sessions);
    let v = wait_sessions(broker, &t.sessions, want_s.len(), session_set, &[&p]);
    assert_eq!(session_set(&v), want_s, "sessions equal the offline result");
    assert_eq!(p.terminate(), 0);
}

/// Reads `topic` (sessions) until `key` of what was read covers `want` entries; panics at the
/// deadline with the logs of `procs`. Returns the parsed records.
pub fn wait_sessions(
    broker: &Broker,
    topic: &str,
    want: usize,
    key: impl Fn(&[Value]) -> BTreeSet<String>,
    procs: &[&Proc],
) -> Vec<Value> {
    let parse = |r: &[Rec]| -> Vec<Value> {
        r.iter()
            .map(|x| serde_json::from_str(&x.value).unwrap())
            .collect()
    };
    match broker.try_read_until(topic, Duration::from_secs(120), |r| {
        key(&parse(r)).len() >= want
    }) {
        Ok(r) => parse(&r),
        Err(r) => {
            panic!(
                "{} of {want} sessions in {topic}; brokers:\n{}\nprocesses:\n{}",
                key(&parse(&r)).len(),
                broker.diagnose(topic),
                report(procs)
            )
        }
    }
}

pub struct Topics {
    pub input: String,
    pub annotated: String,
    pub sessions: String,
    pub late: String,
    pub dlq: String,
    pub stats: String,
}

impl Topics {
    /// The topics named after `prefix`, all created with `partitions` partitions.
    pub fn new(broker: &Broker, prefix: &str, partitions: i32) -> Topics {
        let t = Topics::named(prefix);
        let mut all = vec![t.input.as_str()];
        all.extend(t.outputs());
        broker.create_topics(&all, partitions);
        t
    }

    /// The topic names for `prefix`, none created.
    pub fn named(prefix: &str) -> Topics {
        Topics {
            input: format!("{prefix}-in"),
            annotated: format!("{prefix}-annotated"),
            sessions: format!("{prefix}-sessions"),
            late: format!("{prefix}-late"),
            dlq: format!("{prefix}-dlq"),
            stats: format!("{prefix}-stats"),
        }
    }

    /// Creates the output topics (not the input).
    pub fn create_outputs(&self, broker: &Broker, partitions: i32) {
        broker.create_topics(&self.outputs(), partitions);
    }

    /// Creates the output topics but the annotated one (one partition each).
    pub fn create_outputs_but_annotated(&self, broker: &Broker) {
        broker.create_topics(&self.outputs()[1..], 1);
    }

    fn outputs(&self) -> [&str; 5] {
        [
            &self.annotated,
            &self.sessions,
            &self.late,
            &self.dlq,
            &self.stats,
        ]
        .map(String::as_str)
    }
}

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// For a failure message: every thread's stack, from gdb when it is installed.
    pub fn stacks(&self) -> String {
        let pid = self.child.id().to_string();
        match Command::new("gdb")
            .args(["-batch", "-p", &pid, "-ex", "thread apply all bt"])
            .output()
        {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with('#') || l.starts_with("Thread"))
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(e) => format!("(no stacks: gdb: {e})\n"),
        }
    }
    /// Waits until the process exits, for at most `limit`; panics otherwise, with its log
    /// and its threads' stacks, saying it waited for `what`.
    pub fn wait_exit(&mut self, limit: Duration, what: &str) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "{what}:\n{}\nthreads:\n{}",
                self.log(),
                self.stacks()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn terminate(mut self) -> i32 {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let code = self
            .wait_exit(Duration::from_secs(60), "no exit after SIGTERM")
            .code()
            .unwrap_or(-1);
        if code != 0 {
            // Shown with the failure: why the process did not exit cleanly.
            eprintln!("exit code {code} after SIGTERM; log:\n{}", self.log());
        }
        code
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `E2E_KEEP_LOGS=DIR`: keep each process's log past the test's temporary directory.
        if let Some(keep) = std::env::var_os("E2E_KEEP_LOGS") {
            if let Some(name) = self.log.file_name() {
                let _ = std::fs::create_dir_all(&keep);
                let _ = std::fs::copy(&self.log, Path::new(&keep).join(name));
            }
        }
    }
}

/// For a failure message: the log and the threads' stacks of every process.
pub fn report(procs: &[&Proc]) -> String {
    let each: Vec<String> = procs
        .iter()
        .map(|p| format!("{}\nstacks:\n{}", p.log(), p.stacks()))
        .collect();
    each.join("\n-----\n")
}

pub fn run(
    broker: &Broker,
    t: &Topics,
    dir: &Path,
    group: &str,
    port: u16,
    extra: &[&str],
) -> Proc {
    run_with(broker, t, dir, group, port, &semantics("1s"), extra)
}

/// [`run`] with other session semantics flags.
pub fn run_with(
    broker: &Broker,
    t: &Topics,
    dir: &Path,
    group: &str,
    port: u16,
    semantics: &[&str],
    extra: &[&str],
) -> Proc {
    run_on(&broker.bootstrap, t, dir, group, port, semantics, extra)
}

/// [`run_with`] with the bootstrap servers given (another listener of the broker).
pub fn run_on(
    bootstrap: &str,
    t: &Topics,
    dir: &Path,
    group: &str,
    port: u16,
    semantics: &[&str],
    extra: &[&str],
) -> Proc {
    let log = dir.join(format!("run-{}.log", rand_u32()));
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(BIN)
        .arg("run")
        .args(semantics)
        .args(["--brokers", bootstrap, "--group", group])
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
        .args(kafka_debug().into_iter().flatten())
        .env(
            "SESSIONIZER_LOG",
            kafka_debug().map_or("info", |_| "info,librdkafka=debug"),
        )
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// Waits until `done` holds for the log of `p`, for at most 90 s; panics with the log
/// otherwise, saying it waited for `what`.
pub fn wait_log(p: &Proc, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let log = p.log();
        if done(&log) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited in vain for {what}; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `E2E_KAFKA_DEBUG=cgrp,eos` (librdkafka `debug` contexts): the processes log them, for
/// diagnosing a failed scenario from its log.
fn kafka_debug() -> Option<[String; 2]> {
    std::env::var("E2E_KAFKA_DEBUG")
        .ok()
        .filter(|d| !d.is_empty())
        .map(|d| ["--kafka-property".to_owned(), format!("debug={d}")])
}

pub fn offline(input: &[(String, String)], dir: &Path) -> (Vec<Value>, Vec<String>) {
    let file = dir.join("input.jsonl");
    let mut f = std::fs::File::create(&file).unwrap();
    for (_, l) in input {
        writeln!(f, "{l}").unwrap();
    }
    let out = Command::new(BIN)
        .arg("sessionize")
        .args(semantics("1s"))
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

pub fn session_set(v: &[Value]) -> BTreeSet<String> {
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

pub fn annotated_by_n(recs: &[Rec]) -> BTreeMap<u64, BTreeSet<String>> {
    let mut m: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for r in recs {
        let v: Value = serde_json::from_str(&r.value).unwrap();
        m.entry(v["n"].as_u64().unwrap())
            .or_default()
            .insert(r.value.clone());
    }
    m
}
