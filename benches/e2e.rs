//! End-to-end benchmark against a real Apache Kafka broker on this machine (started with
//! `scripts/kafka.sh` on free 127.0.0.1 ports, or `KAFKA_BOOTSTRAP_SERVERS`), in one run:
//! 1. throughput of a plain consume-and-produce pass-through (same client settings as the
//!    sessionizer: the same consumer and producer configuration, commits every 100 ms after a
//!    flush) over N pre-loaded records;
//!    Then an annotating pass-through: the same loop, each record decoded with the sessionizer
//!    runs' settings and written out annotated (a session made up from its offset, no state):
//!    the stateless floor of what any sessionizer does with a record;
//! 2. throughput of `sessionizer run` over the same records, at-least-once and exactly-once
//!    (each with its own group, outputs and state);
//! 3. the restore rate from the changelog: a fresh instance of the exactly-once group with an
//!    empty state directory restores every partition before consuming (records/s, from its
//!    "state restored" log lines);
//! 4. processing latency (p50/p99 from the sessionizer's own
//!    `sessionizer_processing_latency_seconds` histogram: Kafka record timestamp, i.e. send
//!    time, to the annotated record being handed to the producer) of a live stream at a fixed
//!    rate of half the measured at-least-once throughput, and its downstream latency (send to
//!    the annotated record read), per second too; then the pass-through's downstream latency
//!    on the same kind of stream. An untimed pass-through of such a stream runs before both,
//!    and an untimed sessionizer phase before the measured one, so that neither meets a
//!    broker whose JIT has not compiled the paths it uses yet.
//!
//! Throughput is measured from process (or thread) start until the consumer group has committed
//! every input offset, which both only do after their outputs are acknowledged; it is also
//! reported from the first record taken (read from the sessionizer's metrics endpoint every
//! 20 ms), which leaves out the start-up: process start, topic checks, group join, opening the
//! state; and from the first record taken to the last (read every 50 ms), which also leaves
//! out the wait for the last commit: the rate of taking records in. Committed offsets are read
//! every 20 ms by one long-lived client per group. Each
//! throughput measure also reports the CPU time per event (user + system, from `/proc`) of the
//! client (the sessionizer process; for the pass-through, the whole bench process: the
//! offsets reader's and the idle load producer's small share is billed to the baseline, not
//! to the sessionizer) and of the broker (the one the benchmark started; with
//! `KAFKA_BOOTSTRAP_SERVERS`, every `kafka.Kafka` process on the machine), each from just
//! before its start until its last offset is committed. (`scripts/cpu-sample.py` samples the
//! same `/proc` counters every second, per process and per thread, for a run's time profile.)
//!
//! Before the rounds, an untimed pass-through of all the records and one transaction warm the
//! broker up (its JVM compiles the fetch path only once it serves one; the first transaction
//! creates the transaction state topic).
//!
//! The pass-through uses the non-transactional producer configuration, so the exactly-once
//! ratio is against a non-transactional baseline. It runs on the sessionizer binary's
//! allocator (jemalloc for every allocation of the process, see `src/main.rs`), so that the
//! allocator is not a difference between the two.
//!
//! Run: `cargo bench --bench e2e` (E2E_EVENTS, default 1000000; E2E_ROUNDS, default 1, repeats
//! steps 1 and 2 that many times, alternating, each with groups of its own, and reports the
//! median ratios; E2E_LATENCY_RATE overrides the latency phase's rate, by default half the
//! median at-least-once rate; E2E_ROUNDS=0 with E2E_LATENCY_RATE runs the latency phases
//! only; E2E_TIMELINE=DIR also writes each latency phase's downstream arrivals per 50 ms of
//! wall-clock time to `DIR/<phase>.tl`, lines of "epoch ms, records, max latency ms", to line
//! up with per-thread CPU samples). Under `cargo test` it does nothing.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sessionizer::config::{raw::RawConfig, validate};
use sessionizer::generate::{Generator, GeneratorConfig};
use sessionizer::kafka::output::Outputs;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The allocator of the sessionizer binary (see `src/main.rs`), for the pass-through.
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../tests/support/kafka.rs"]
mod kafka_support;

use kafka_support::{clock_ticks, cpu_secs, free_port, free_port_pair, kafka_sh, metric, scrape};

const BIN: &str = env!("CARGO_BIN_EXE_sessionizer");
const PARTITIONS: i32 = 3;
const OUTPUTS: [&str; 5] = ["annotated", "sessions", "late", "dlq", "stats"];

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn create(bootstrap: &str, names: &[String]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        // Event-time timestamps may be older than the default retention.
        .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)).set("retention.ms", "-1"))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for r in rt
        .block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .unwrap()
    {
        r.unwrap();
    }
}

fn producer(bootstrap: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, value: &[u8]) {
    let mut r: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).key(key).payload(value);
    loop {
        match p.send(r) {
            Ok(()) => return,
            Err((_, back)) => {
                r = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn events(count: u64, start: i64, seed: u64) -> Vec<(String, Vec<u8>)> {
    let cfg = GeneratorConfig {
        users: 10_000,
        count: Some(count),
        start,
        disorder: 2_000,
        seed,
        ..GeneratorConfig::default()
    };
    Generator::new(cfg)
        .unwrap()
        .map(|e| (e.user_id.to_string(), serde_json::to_vec(&e).unwrap()))
        .collect()
}

/// The client settings of an at-least-once `sessionizer run` (the pass-through's baseline).
fn runtime_settings(bootstrap: &str, group: &str) -> sessionizer::config::RuntimeSettings {
    let mut raw = RawConfig::default();
    raw.kafka.brokers = Some(bootstrap.to_owned());
    raw.kafka.group = Some(group.to_owned());
    raw.kafka.guarantee = Some("at-least-once".to_owned());
    validate(&raw).unwrap().runtime
}

/// What [`pass_through`] does to a record before producing it.
#[derive(Clone, Copy, PartialEq)]
enum Forward {
    /// Nothing: the record goes out unchanged.
    Unchanged,
    /// What every sessionizer must do with a record and no more: decode it with the
    /// benchmark's session settings (its event classes), and write it out annotated, with a
    /// session made up from the record's offset instead of one looked up in any state.
    Annotated,
}

/// The session flags of every sessionizer run (`Run::start`), and of the annotating
/// pass-through's decoder ([`bench_decoder`]): the generator's event classes, and the
/// benchmark's watermark settings.
fn semantics() -> Vec<String> {
    let watermark = ["--allowed-lateness", "5s", "--idle-after", "2s"];
    let classes = sessionizer::generate::event_class_flags();
    classes
        .into_iter()
        .chain(watermark.map(String::from))
        .collect()
}

/// The decoder of the sessionizer runs: their [`semantics`], read by the binary's own flag
/// parser.
fn bench_decoder() -> sessionizer::codec::Decoder {
    use clap::Parser;
    use sessionizer::cli::{Cli, Command};
    let args = ["sessionizer".to_owned(), "sessionize".to_owned()]
        .into_iter()
        .chain(semantics());
    let Command::Sessionize(a) = Cli::try_parse_from(args).expect("valid flags").command else {
        unreachable!("parsed as `sessionize`")
    };
    sessionizer::codec::Decoder::new(a.semantics.settings().expect("valid settings").decode)
}

/// Consume `topic` from the start as `group` and produce every record to `out`, as `forward`
/// says, committing (after a flush) every 100 ms, until `n` records are through. Returns when
/// it took its first record and its last.
fn pass_through(
    bootstrap: &str,
    group: &str,
    topic: &str,
    out: &str,
    n: usize,
    forward: Forward,
) -> (Instant, Instant) {
    let rt = runtime_settings(bootstrap, group);
    let decoder = (forward == Forward::Annotated).then(bench_decoder);
    let mut annotated = Vec::new();
    let mut first = None;
    let consumer: BaseConsumer = sessionizer::kafka::consumer_config(&rt).create().unwrap();
    let mut outputs = Outputs::new(&sessionizer::kafka::idempotent_producer_config(&rt)).unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = 0usize;
    let mut last = Instant::now();
    let mut last_taken = last;
    let mut next: Vec<i64> = vec![-1; PARTITIONS as usize];
    while seen < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
            first.get_or_insert_with(Instant::now);
            let mut value = m.payload().unwrap_or(&[]);
            if let Some(decoder) = &decoder {
                let time = m.timestamp().to_millis();
                let event = decoder.decode(value, m.key(), time).expect("a valid event");
                let session = sessionizer::engine::Annotation {
                    id: sessionizer::engine::SessionId {
                        key_hash: (m.offset() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        num: event.time as u64 & 0xff,
                    },
                    seq: (m.offset() & 0x3f) as u32,
                    start: m.offset() & 0x3f == 0,
                };
                annotated.clear();
                sessionizer::codec::records::annotate(
                    value,
                    "session",
                    Some(&session),
                    &mut annotated,
                );
                value = &annotated;
            }
            outputs
                .send(out, m.key(), Some(value), m.timestamp().to_millis(), None)
                .unwrap();
            next[m.partition() as usize] = m.offset() + 1;
            seen += 1;
            if seen == n {
                last_taken = Instant::now();
            }
        }
        if last.elapsed() >= Duration::from_millis(100) || seen == n {
            outputs.flush().unwrap();
            let mut tpl = TopicPartitionList::new();
            for (p, o) in next.iter().enumerate() {
                if *o >= 0 {
                    tpl.add_partition_offset(topic, p as i32, Offset::Offset(*o))
                        .unwrap();
                }
            }
            if tpl.count() > 0 {
                let mode = if seen == n {
                    CommitMode::Sync
                } else {
                    CommitMode::Async
                };
                consumer.commit(&tpl, mode).unwrap();
            }
            last = Instant::now();
        }
    }
    (first.unwrap_or_else(Instant::now), last_taken)
}

/// The event with its `timestamp` field set to `t`.
fn retime(v: &[u8], t: i64) -> Vec<u8> {
    let text = std::str::from_utf8(v).unwrap();
    let at = text.find("\"timestamp\":").unwrap() + "\"timestamp\":".len();
    let end = at + text[at..].find(|c: char| !c.is_ascii_digit()).unwrap();
    format!("{}{t}{}", &text[..at], &text[end..]).into_bytes()
}

/// Reads groups' committed offsets, with one long-lived client per group: a client created
/// for every look (50 a second) would take CPU from the processes being measured.
#[derive(Default)]
struct Committed {
    clients: std::collections::HashMap<String, BaseConsumer>,
}

impl Committed {
    /// Sum of the committed offsets of `group` on `topic` (all partitions).
    fn sum(&mut self, bootstrap: &str, group: &str, topic: &str) -> i64 {
        let c = self.clients.entry(group.to_owned()).or_insert_with(|| {
            ClientConfig::new()
                .set("bootstrap.servers", bootstrap)
                .set("group.id", group)
                .create()
                .unwrap()
        });
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(topic, p);
        }
        c.committed_offsets(tpl, Duration::from_secs(5))
            .map(|t| {
                t.elements()
                    .iter()
                    .map(|e| match e.offset() {
                        Offset::Offset(o) => o,
                        _ => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Drops the client of `group` (an idle client still costs the bench process CPU, which
    /// the pass-through's figure would carry).
    fn done(&mut self, group: &str) {
        self.clients.remove(group);
    }

    /// Waits until `group` has committed `n` records of `topic`; the time since `started`.
    fn wait(
        &mut self,
        bootstrap: &str,
        group: &str,
        topic: &str,
        n: usize,
        started: Instant,
    ) -> Duration {
        while self.sum(bootstrap, group, topic) < n as i64 {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "{group} too slow"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        started.elapsed()
    }
}

/// One throughput measurement: `n` records, all committed `total` after the start, the first
/// taken `first` after it and the last `last` after it.
#[derive(Clone, Copy)]
struct Measure {
    n: usize,
    total: Duration,
    first: Duration,
    last: Duration,
    /// CPU seconds of the measured client (the pass-through's whole bench process, or the
    /// sessionizer process) and of the broker over the measurement.
    cpu: Cpu,
}

impl Measure {
    fn new(n: usize, total: Duration, (first, last): (Duration, Duration), cpu: Cpu) -> Self {
        Measure {
            n,
            total,
            first,
            last,
            cpu,
        }
    }

    /// This measure's ratio to `baseline`'s: from the start, from the first record, and
    /// while records were taken.
    fn against(&self, baseline: &Measure) -> String {
        format!(
            "ratio to pass-through {:.2} (from the first record: {:.2}; first to last record \
             taken: {:.2})",
            self.rate() / baseline.rate(),
            self.steady_rate() / baseline.steady_rate(),
            self.taking_rate() / baseline.taking_rate()
        )
    }

    /// CPU microseconds per record: the client's, the broker's.
    fn cpu_per_record(&self) -> (f64, f64) {
        let per = |s: f64| s * 1e6 / self.n as f64;
        (per(self.cpu.client), per(self.cpu.broker))
    }

    /// Records per second, start (process or thread) to the last offset committed.
    fn rate(&self) -> f64 {
        self.n as f64 / self.total.as_secs_f64()
    }

    /// Records per second, first record taken to the last offset committed: without the
    /// start-up (process start, topic checks, group join, opening the state).
    fn steady_rate(&self) -> f64 {
        self.n as f64 / (self.total - self.first.min(self.total)).as_secs_f64()
    }

    /// Records per second, first record taken to the last: without the start-up and the
    /// wait for the last commit (the sessionizer's first and last records are seen through
    /// its metrics, read every [`FIRST_RECORD_POLL`] and every [`LAST_RECORD_POLL`]: each
    /// moment is up to that much late).
    fn taking_rate(&self) -> f64 {
        let taking = self
            .last
            .saturating_sub(self.first)
            .max(Duration::from_millis(1));
        self.n as f64 / taking.as_secs_f64()
    }
}

impl std::fmt::Display for Measure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (client, broker) = self.cpu_per_record();
        write!(
            f,
            "{:.0} events/s ({:.2} s; first record after {:.2} s: {:.0} events/s from it; \
             last record after {:.2} s: {:.0} events/s between the two; CPU per event \
             {client:.2} µs client + {broker:.2} µs broker)",
            self.rate(),
            self.total.as_secs_f64(),
            self.first.as_secs_f64(),
            self.steady_rate(),
            self.last.as_secs_f64(),
            self.taking_rate(),
        )
    }
}

/// CPU seconds (user + system) of a client and of the broker(s).
#[derive(Clone, Copy, Default)]
struct Cpu {
    client: f64,
    broker: f64,
}

/// The broker processes whose CPU time is counted: the one this benchmark started (its pid
/// file), or, with `KAFKA_BOOTSTRAP_SERVERS`, every `kafka.Kafka` process on the machine.
fn broker_pids(kafka_dir: Option<&std::path::Path>) -> Vec<u32> {
    if let Some(dir) = kafka_dir {
        let pid = std::fs::read_to_string(dir.join("node1").join("kafka.pid")).unwrap();
        return vec![pid.trim().parse().unwrap()];
    }
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(11).any(|w| w == b"kafka.Kafka"))
        })
        .collect()
}

/// CPU seconds used so far by the brokers `pids` (each must still be running).
fn broker_cpu(pids: &[u32], ticks: f64) -> f64 {
    pids.iter()
        .map(|&pid| cpu_secs(pid, ticks).expect("a broker exited during the benchmark"))
        .sum()
}

/// The median of `v` (the mean of the middle two when even).
fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How often the benchmark reads a sessionizer's metrics for its count of records taken,
/// until its first, and then until its last: each read costs the process a little CPU.
const FIRST_RECORD_POLL: Duration = Duration::from_millis(20);
const LAST_RECORD_POLL: Duration = Duration::from_millis(50);

struct Run {
    child: std::process::Child,
    port: u16,
}

impl Run {
    fn start(
        bootstrap: &str,
        input: &str,
        prefix: &str,
        group: &str,
        state: &std::path::Path,
        guarantee: &str,
        log: Option<&std::path::Path>,
    ) -> Run {
        let port = free_port();
        let t = |s: &str| format!("{prefix}-{s}");
        let child = Command::new(BIN)
            .args(["run", "--brokers", bootstrap, "--group", group])
            .args([
                "--input-topics",
                input,
                "--annotated-topic",
                &t("annotated"),
            ])
            .args([
                "--sessions-topic",
                &t("sessions"),
                "--late-topic",
                &t("late"),
            ])
            .args(["--dlq-topic", &t("dlq"), "--stats-topic", &t("stats")])
            .args(semantics())
            .arg("--state-dir")
            .arg(state)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--guarantee", guarantee, "--instance-id", "bench"])
            .args(["--log-format", "json"])
            .env(
                "SESSIONIZER_LOG",
                if log.is_some() { "info" } else { "warn" },
            )
            .stdout(Stdio::null())
            .stderr(match log {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::inherit(),
            })
            .spawn()
            .unwrap();
        Run { child, port }
    }

    /// CPU seconds the process has used so far (it must still be running).
    fn cpu(&self, ticks: f64) -> f64 {
        cpu_secs(self.child.id(), ticks).expect("the sessionizer exited before it was stopped")
    }

    fn events_in(&self) -> f64 {
        metric(&scrape(self.port), "sessionizer_events_total{")
    }

    /// Waits until the process has taken `n` input records, reading its metrics every
    /// `poll`; the time since `started`. Fails with `what` if that takes `within` or more.
    fn wait_taken(
        &self,
        n: f64,
        poll: Duration,
        started: Instant,
        within: Duration,
        what: &str,
    ) -> Duration {
        while self.events_in() < n {
            assert!(started.elapsed() < within, "{what}");
            std::thread::sleep(poll);
        }
        started.elapsed()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Reads `topic` from the start until `expected` records have arrived (or 120 s pass) and
/// returns, for each, its arrival time and the milliseconds from its timestamp to its
/// arrival. Counts the records read so far in `seen`.
fn downstream_latencies(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    seen: Arc<AtomicUsize>,
) -> Vec<(i64, i64)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-lat-reader-{topic}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut out = Vec::with_capacity(expected);
    let t = Instant::now();
    while out.len() < expected && t.elapsed() < Duration::from_secs(120) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(50)) {
            if let Some(ts) = m.timestamp().to_millis() {
                let now = now_ms();
                out.push((now, now - ts));
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    out
}

/// Sends `evs` to `topic` at `rate` events/s, each with the send time as event time, paced in
/// bursts of at most 1 ms (a sleep per event would cost the load generator a third of a core,
/// taken from the broker and the process it measures).
fn paced_load(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    evs: &[(String, Vec<u8>)],
    rate: f64,
) {
    let t0 = Instant::now();
    for (i, (k, v)) in evs.iter().enumerate() {
        let due = Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            if wait >= Duration::from_millis(1) {
                std::thread::sleep(wait);
            }
        }
        send(p, topic, k, &retime(v, now_ms()));
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

/// The latencies of `v` over time, one line per second of arrival: records, p99 and max (ms).
/// Tells a steady delay from a few stalls, which a p99 over the whole phase cannot.
fn over_time(v: &[(i64, i64)]) -> String {
    let Some(start) = v.iter().map(|(at, _)| *at).min() else {
        return String::new();
    };
    let mut seconds: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (at, lat) in v {
        seconds.entry((at - start) / 1000).or_default().push(*lat);
    }
    seconds
        .into_iter()
        .map(|(s, mut l)| {
            let (_, p99) = p50_p99(&mut l);
            format!(
                "{s}s: {} p99 {p99} max {}",
                l.len(),
                l.last().unwrap_or(&-1)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Sends one probe event to each partition of `topic`, timed now, and waits for their
/// acknowledgements: a latency phase starts its load once the probes have gone through.
fn send_probes(p: &ThreadedProducer<DefaultProducerContext>, topic: &str) {
    for (part, (k, v)) in events(PARTITIONS as u64, now_ms(), 3).iter().enumerate() {
        let v = retime(v, now_ms());
        let rec: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic)
            .partition(part as i32)
            .key(k.as_str())
            .payload(v.as_slice());
        p.send(rec).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

/// The downstream latencies a reader collected, without the probes' (their latency includes
/// the group join), after printing them per second under `label`.
fn without_probes(mut read: Vec<(i64, i64)>, label: &str) -> Vec<i64> {
    let load = read.split_off((PARTITIONS as usize).min(read.len()));
    if let Ok(dir) = std::env::var("E2E_TIMELINE") {
        // Per 50 ms of arrival: records and the largest latency.
        let mut b: BTreeMap<i64, (usize, i64)> = BTreeMap::new();
        for (at, lat) in &load {
            let e = b.entry(at / 50 * 50).or_default();
            e.0 += 1;
            e.1 = e.1.max(*lat);
        }
        let txt: String = b
            .iter()
            .map(|(t, (n, m))| format!("{t} {n} {m}\n"))
            .collect();
        let path = format!("{dir}/{}.tl", label.replace(' ', "_"));
        std::fs::write(&path, txt).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    eprintln!(
        "e2e: {label}: downstream latency over time: {}",
        over_time(&load)
    );
    load.into_iter().map(|(_, l)| l).collect()
}

/// Waits until the downstream reader has read `n` records (the probes: it is then assigned
/// its partitions, so its group join is not billed to the first records of the load).
fn wait_seen(seen: &AtomicUsize, n: usize) {
    let t = Instant::now();
    while seen.load(Ordering::Relaxed) < n {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the downstream reader did not read the probes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// p50 and p99 of `v` (sorted in place); -1 when empty.
fn p50_p99(v: &mut [i64]) -> (i64, i64) {
    v.sort_unstable();
    let pct = |q: f64| v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)));
    (
        pct(0.5).copied().unwrap_or(-1),
        pct(0.99).copied().unwrap_or(-1),
    )
}

/// The pass-through's latency at `rate`: the loop of [`pass_through`] (same client settings)
/// from `input` to `out`, fed the same kind of paced live stream for 10 s once it is
/// consuming; returns the downstream p50 / p99 (send to forwarded record read), in ms.
fn pass_through_latency(
    bootstrap: &str,
    p: &ThreadedProducer<DefaultProducerContext>,
    rate: f64,
    (input, out): (&'static str, &'static str),
) -> (i64, i64) {
    let group = format!("{input}-passthrough");
    let total = (rate * 10.0) as usize;
    let probes = PARTITIONS as usize;
    let (b, g) = (bootstrap.to_owned(), group.clone());
    let forward = std::thread::spawn(move || {
        pass_through(&b, &g, input, out, probes + total, Forward::Unchanged)
    });
    // Start the load once every partition is being consumed: one probe per partition,
    // forwarded.
    let b = bootstrap.to_owned();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let reader = std::thread::spawn(move || downstream_latencies(&b, out, probes + total, s));
    send_probes(p, input);
    let t = Instant::now();
    let mut committed = Committed::default();
    while committed.sum(bootstrap, &group, input) < probes as i64 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the pass-through did not forward the probes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_seen(&seen, probes);
    paced_load(p, input, &events(total as u64, now_ms(), 2), rate);
    forward.join().unwrap();
    let mut lat = without_probes(reader.join().unwrap(), &format!("{input} -> {out}"));
    p50_p99(&mut lat)
}

/// The upper bound of the histogram bucket holding quantile `q`.
fn quantile(text: &str, name: &str, q: f64) -> f64 {
    let buckets = buckets(text, name);
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or(f64::NAN, |b| b.0)
}

/// A histogram's buckets up to 1 s, each as its upper bound and the share of observations at
/// or below it, in per cent with `decimals` decimals: "<= 5.0 ms: 12.17 %, ...".
fn distribution(text: &str, name: &str, decimals: usize) -> String {
    let buckets = buckets(text, name);
    let total = buckets.last().map_or(0.0, |b| b.1).max(1.0);
    buckets
        .iter()
        .filter(|(le, _)| *le <= 1.0)
        .map(|(le, c)| {
            format!(
                "<= {:.1} ms: {:.decimals$} %",
                le * 1000.0,
                c / total * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A histogram's buckets: upper bound and cumulative count, in order.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The exactly-once group started again without its state: every partition restores from
/// the changelog. Returns the records applied and the seconds the restores took, summed over
/// the partitions (from its "state restored" log lines).
fn restore(bootstrap: &str, dir: &std::path::Path, group: &str) -> (f64, f64) {
    let log = dir.join("restore.log");
    let restore = Run::start(
        bootstrap,
        "bench-in",
        "bench-eos",
        group,
        &dir.join("bench-eos-restore"),
        "exactly-once",
        Some(&log),
    );
    let t = Instant::now();
    let restored = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "state restored")
            .collect();
        if lines.len() >= PARTITIONS as usize {
            break lines
                .iter()
                .map(|v| {
                    let f = &v["fields"];
                    (
                        f["applied"].as_f64().unwrap_or(0.0),
                        f["seconds"].as_f64().unwrap_or(0.0),
                    )
                })
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "restore too slow:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    restore.stop();
    let restore_rate = restored.0 / restored.1.max(1e-9);
    eprintln!(
        "e2e: restore {:.0} records in {:.2} s = {restore_rate:.0} records/s",
        restored.0, restored.1
    );
    restored
}

/// A latency phase of the sessionizer (at-least-once) with topics and group named after
/// `prefix`: a live stream at `rate` events/s for 10 s (event time = send time), once its
/// partitions are assigned. Its own histogram's p50/p99 (s, bucket upper bounds) and the
/// downstream p50/p99 (ms, from a reader of its annotated topic).
fn sessionizer_latency(
    bootstrap: &str,
    p: &ThreadedProducer<DefaultProducerContext>,
    rate: f64,
    prefix: &str,
    dir: &std::path::Path,
) -> Latency {
    let input = format!("{prefix}-in");
    let lat = Run::start(
        bootstrap,
        &input,
        prefix,
        &format!("{prefix}-group"),
        &dir.join(prefix),
        "at-least-once",
        None,
    );
    // A downstream reader of the annotated topic: event time (= send time) to the annotated
    // record arriving, the whole way through both producers' batching and the broker.
    let total = (rate * 10.0) as usize;
    let seen = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (b, s, t) = (
            bootstrap.to_owned(),
            seen.clone(),
            format!("{prefix}-annotated"),
        );
        let expected = total + PARTITIONS as usize;
        std::thread::spawn(move || downstream_latencies(&b, &t, expected, s))
    };
    // Start the load once every partition is being consumed: one probe event per partition,
    // seen by the sessionizer and by the downstream reader.
    send_probes(p, &input);
    let probes = PARTITIONS as f64;
    lat.wait_taken(
        probes,
        LAST_RECORD_POLL,
        Instant::now(),
        Duration::from_secs(60),
        "the probe events were not consumed",
    );
    let evs = events(total as u64, now_ms(), 2);
    wait_seen(&seen, PARTITIONS as usize);
    // A live stream: the event time is the send time.
    paced_load(p, &input, &evs, rate);
    lat.wait_taken(
        total as f64 + probes,
        LAST_RECORD_POLL,
        Instant::now(),
        Duration::from_secs(120),
        "the latency load was not consumed",
    );
    let text = scrape(lat.port);
    let (p50, p99) = (
        quantile(&text, "sessionizer_processing_latency_seconds", 0.5),
        quantile(&text, "sessionizer_processing_latency_seconds", 0.99),
    );
    eprintln!(
        "e2e: {prefix}: latency distribution: {}",
        distribution(&text, "sessionizer_processing_latency_seconds", 2)
    );
    eprintln!(
        "e2e: {prefix}: latency phase: ticks (consumption stopped): {}",
        distribution(&text, "sessionizer_tick_seconds", 0)
    );
    let commit_p99 = quantile(&text, "sessionizer_commit_seconds", 0.99);
    let commits = metric(&text, "sessionizer_commit_seconds_count");
    eprintln!(
        "e2e: {prefix}: latency phase: {commits} commits, commit time p99 <= {:.1} ms",
        commit_p99 * 1000.0
    );
    lat.stop();
    let mut e2e = without_probes(reader.join().unwrap(), prefix);
    let (e2e_p50, e2e_p99) = p50_p99(&mut e2e);
    eprintln!(
        "e2e: {prefix}: downstream latency over {} records: p50 {e2e_p50} ms, p99 {e2e_p99} ms, max {} ms",
        e2e.len(),
        e2e.last().copied().unwrap_or(-1)
    );
    Latency {
        own: (p50, p99),
        downstream: (e2e_p50, e2e_p99),
    }
}

/// What [`sessionizer_latency`] measured.
struct Latency {
    /// p50 and p99 of the sessionizer's own histogram (seconds, bucket upper bounds).
    own: (f64, f64),
    /// p50 and p99 downstream (ms).
    downstream: (i64, i64),
}

/// Input and output topics of the latency phases' pass-throughs: the untimed warm-up and the
/// baseline.
const LAT_WARM_UP: (&str, &str) = ("bench-lat-warm-in", "bench-lat-warm-out");
const LAT_PASS_THROUGH: (&str, &str) = ("bench-lat-pt-in", "bench-lat-pt-out");
/// Topic prefixes of the sessionizer's latency phases: the untimed warm-up and the measured.
const LAT_SESSIONIZER_WARM_UP: &str = "bench-latw";
const LAT_SESSIONIZER: &str = "bench-lat";

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("e2e: skipped (run it with `cargo bench --bench e2e`)");
        return;
    }
    let n: usize = std::env::var("E2E_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().unwrap();
    let kdir = tmp.path().join("kafka");
    let (bootstrap, ours) = match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
        Ok(b) => (b, false),
        Err(_) => {
            let port = free_port_pair().to_string();
            let out = kafka_sh(&["start", "--dir", kdir.to_str().unwrap(), "--port", &port]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .last()
                    .unwrap()
                    .trim()
                    .to_owned(),
                true,
            )
        }
    };
    let mut topics = vec![
        "bench-in".to_owned(),
        "bench-pt-out".to_owned(),
        "bench-pa-out".to_owned(),
        format!("{LAT_SESSIONIZER}-in"),
        format!("{LAT_SESSIONIZER_WARM_UP}-in"),
        LAT_WARM_UP.0.to_owned(),
        LAT_WARM_UP.1.to_owned(),
        LAT_PASS_THROUGH.0.to_owned(),
        LAT_PASS_THROUGH.1.to_owned(),
    ];
    for p in [
        "bench-alo",
        "bench-eos",
        LAT_SESSIONIZER,
        LAT_SESSIONIZER_WARM_UP,
    ] {
        topics.extend(OUTPUTS.iter().map(|o| format!("{p}-{o}")));
    }
    create(&bootstrap, &topics);

    let p = producer(&bootstrap);
    for (k, v) in events(n as u64, now_ms() - 3 * 86_400_000, 1) {
        send(&p, "bench-in", &k, &v);
    }
    p.flush(Duration::from_secs(60)).unwrap();
    eprintln!("e2e: {n} events loaded into bench-in ({PARTITIONS} partitions)");

    // Warm-up: a full pass-through of the input, untimed. The first group on a fresh broker
    // creates the offsets topic, and the broker's JVM compiles its fetch path only once it
    // serves one: a first pass ran at 0.38-0.40 of the speed of the next ones (2026-11-23).
    // Don't bill either to whichever side runs first.
    {
        let (b, g) = (bootstrap.clone(), "bench-warmup".to_owned());
        let t = Instant::now();
        std::thread::spawn(move || {
            pass_through(&b, &g, "bench-in", "bench-pt-out", n, Forward::Unchanged)
        })
        .join()
        .unwrap();
        eprintln!(
            "e2e: warm-up pass-through took {:.2} s (not counted)",
            t.elapsed().as_secs_f64()
        );
        // And one transaction: the first transactional producer on a fresh broker creates the
        // transaction state topic, which both sessionizer runs (at-least-once commits its
        // state in transactions too) would otherwise wait for in the first round.
        let rt = runtime_settings(&bootstrap, "bench-warmup");
        let tp: ThreadedProducer<DefaultProducerContext> =
            sessionizer::kafka::transactional_producer_config(&rt)
                .create()
                .unwrap();
        tp.init_transactions(Duration::from_secs(60)).unwrap();
        tp.begin_transaction().unwrap();
        send(&tp, "bench-pt-out", "warm-up", b"{}");
        tp.commit_transaction(Duration::from_secs(60)).unwrap();
    }
    let rounds: usize = std::env::var("E2E_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    assert!(
        rounds > 0 || std::env::var("E2E_LATENCY_RATE").is_ok_and(|r| r.parse::<f64>().is_ok()),
        "E2E_ROUNDS=0 (latency only) needs E2E_LATENCY_RATE (events/s)"
    );
    let ticks = clock_ticks();
    let brokers = broker_pids(ours.then_some(kdir.as_path()));
    let mut committed = Committed::default();
    let mut results: Vec<[Measure; 4]> = Vec::new();
    let mut eos_group = String::new();
    for round in 1..=rounds {
        let sfx = if rounds == 1 {
            String::new()
        } else {
            format!("-{round}")
        };
        let [pt, pa] = [
            (Forward::Unchanged, "bench-passthrough", "bench-pt-out"),
            (Forward::Annotated, "bench-annotating", "bench-pa-out"),
        ]
        .map(|(forward, prefix, out)| {
            let group = format!("{prefix}{sfx}");
            let me = || cpu_secs(std::process::id(), ticks).expect("own CPU time");
            let (me0, broker0) = (me(), broker_cpu(&brokers, ticks));
            let started = Instant::now();
            let (b, g) = (bootstrap.clone(), group.clone());
            let worker =
                std::thread::spawn(move || pass_through(&b, &g, "bench-in", out, n, forward));
            let took = committed.wait(&bootstrap, &group, "bench-in", n, started);
            committed.done(&group);
            let (first, last) = worker.join().unwrap();
            let cpu = Cpu {
                client: me() - me0,
                broker: broker_cpu(&brokers, ticks) - broker0,
            };
            Measure::new(n, took, (first - started, last - started), cpu)
        });
        eprintln!("e2e: round {round}: pass-through {pt}");
        eprintln!(
            "e2e: round {round}: annotating pass-through {pa}, {}",
            pa.against(&pt)
        );
        let mut runs = Vec::new();
        for (guarantee, prefix) in [
            ("at-least-once", "bench-alo"),
            ("exactly-once", "bench-eos"),
        ] {
            let group = format!("{prefix}-group{sfx}");
            let state = tmp.path().join(format!("{prefix}{sfx}"));
            let broker0 = broker_cpu(&brokers, ticks);
            let started = Instant::now();
            let run = Run::start(
                &bootstrap, "bench-in", prefix, &group, &state, guarantee, None,
            );
            let first = run.wait_taken(
                1.0,
                FIRST_RECORD_POLL,
                started,
                Duration::from_secs(120),
                "no record consumed",
            );
            // The offsets reader's client is created by its first look: now, not after the
            // last record, where its connection would be billed to the sessionizer's time.
            committed.sum(&bootstrap, &group, "bench-in");
            let last = run.wait_taken(
                n as f64,
                LAST_RECORD_POLL,
                started,
                Duration::from_secs(600),
                "the sessionizer did not take every record",
            );
            let took = committed.wait(&bootstrap, &group, "bench-in", n, started);
            committed.done(&group);
            let cpu = Cpu {
                client: run.cpu(ticks),
                broker: broker_cpu(&brokers, ticks) - broker0,
            };
            run.stop();
            let m = Measure::new(n, took, (first, last), cpu);
            eprintln!(
                "e2e: round {round}: sessionizer run ({guarantee}) {m}, {}",
                m.against(&pt)
            );
            runs.push(m);
            eos_group = group;
        }
        results.push([pt, runs[0], runs[1], pa]);
    }
    let sz_rate = median(results.iter().map(|r| r[1].rate()));

    // Restore: the exactly-once group again, on a machine without its state.
    let restored = if rounds > 0 {
        restore(&bootstrap, tmp.path(), &eos_group)
    } else {
        (f64::NAN, f64::NAN)
    };
    let restore_rate = restored.0 / restored.1.max(1e-9);

    // Latency at half the measured sessionizer rate, for 10 s, events timed "now".
    let rate = std::env::var("E2E_LATENCY_RATE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or((sz_rate / 2.0).max(100.0));
    // Warm-up: the broker's JIT compiles its paths for a live stream (small batches, fetches
    // waiting at the log end) only once it serves one. Without this, the broker's compiler
    // took 20-50 % of a core throughout the sessionizer's latency phase, which ran first, and
    // little during the pass-through's (2026-11-23, eighth session).
    let (w50, w99) = pass_through_latency(&bootstrap, &p, rate, LAT_WARM_UP);
    eprintln!("e2e: latency warm-up (a pass-through, not counted): p50 {w50} ms, p99 {w99} ms");
    // The sessionizer's paths for a live stream (transactions, its output topics, the
    // changelog) are JIT-compiled by the broker only once it serves them: in a latency phase
    // run first on a broker warmed by pass-throughs only, the broker's C2 compiler took up to
    // 76 % of a core, 25 % on average (2026-11-24, fifteenth session). An untimed sessionizer
    // phase first.
    let warm = sessionizer_latency(&bootstrap, &p, rate, LAT_SESSIONIZER_WARM_UP, tmp.path());
    eprintln!(
        "e2e: sessionizer latency warm-up (not counted): own p99 <= {:.1} ms, downstream p50 {} ms, p99 {} ms",
        warm.own.1 * 1000.0,
        warm.downstream.0,
        warm.downstream.1
    );
    let lat = sessionizer_latency(&bootstrap, &p, rate, LAT_SESSIONIZER, tmp.path());
    let ((p50, p99), (e2e_p50, e2e_p99)) = (lat.own, lat.downstream);
    // The baseline: the pass-through at the same rate.
    let (pt_p50, pt_p99) = pass_through_latency(&bootstrap, &p, rate, LAT_PASS_THROUGH);
    eprintln!("e2e: pass-through downstream latency: p50 {pt_p50} ms, p99 {pt_p99} ms");
    println!("| measure | value |");
    println!("|---|---|");
    println!("| events | {n} |");
    for (i, [pt, alo, eos, pa]) in results.iter().enumerate() {
        let r = if rounds == 1 {
            String::new()
        } else {
            format!(", round {}", i + 1)
        };
        println!("| pass-through{r} | {pt} |");
        println!("| annotating pass-through{r} | {pa}; {} |", pa.against(pt));
        for (guarantee, m) in [("at-least-once", alo), ("exactly-once", eos)] {
            println!(
                "| sessionizer run, {guarantee}{r} | {m}; {} |",
                m.against(pt)
            );
        }
    }
    if rounds > 1 {
        for (guarantee, i) in [
            ("annotating pass-through", 3),
            ("at-least-once", 1),
            ("exactly-once", 2),
        ] {
            println!(
                "| median ratio over {rounds} rounds, {guarantee} | {:.2} (from the first record: {:.2}; first to last record taken: {:.2}) |",
                median(results.iter().map(|r| r[i].rate() / r[0].rate())),
                median(results.iter().map(|r| r[i].steady_rate() / r[0].steady_rate())),
                median(results.iter().map(|r| r[i].taking_rate() / r[0].taking_rate()))
            );
        }
        println!(
            "| median ratio over {rounds} rounds, at-least-once to the annotating pass-through | {:.2} (first to last record taken: {:.2}) |",
            median(results.iter().map(|r| r[1].rate() / r[3].rate())),
            median(results.iter().map(|r| r[1].taking_rate() / r[3].taking_rate()))
        );
    }
    if rounds > 0 {
        for (what, i) in [
            ("pass-through", 0),
            ("annotating pass-through", 3),
            ("sessionizer run, at-least-once", 1),
            ("sessionizer run, exactly-once", 2),
        ] {
            println!(
                "| CPU per event, {what} (median{}) | {:.2} µs client + {:.2} µs broker |",
                if rounds > 1 { " of the rounds" } else { "" },
                median(results.iter().map(|r| r[i].cpu_per_record().0)),
                median(results.iter().map(|r| r[i].cpu_per_record().1))
            );
        }
        println!(
            "| restore from the changelog | {restore_rate:.0} records/s ({:.0} records, {:.2} s) |",
            restored.0, restored.1
        );
    }
    println!(
        "| latency at {rate:.0} events/s, p50 (bucket upper bound) | <= {:.1} ms |",
        p50 * 1000.0
    );
    println!(
        "| latency at {rate:.0} events/s, p99 (bucket upper bound) | <= {:.1} ms |",
        p99 * 1000.0
    );
    println!(
        "| downstream latency at {rate:.0} events/s (send to annotated record read), p50 / p99 | {e2e_p50} ms / {e2e_p99} ms |"
    );
    println!(
        "| pass-through downstream latency at {rate:.0} events/s (send to forwarded record read), p50 / p99 | {pt_p50} ms / {pt_p99} ms |"
    );
    if ours {
        let _ = kafka_sh(&["stop", "--dir", kdir.to_str().unwrap()]);
    }
}
