//! The Kafka client as the sessionizer builds it (librdkafka from `vendor/rdkafka-sys`, with the
//! project's producer settings), against a real broker of its own:
//! - an idempotent producer whose request is in flight, with a batch ready behind it, waits
//!   for the broker's answer without spinning: while the broker is paused (SIGSTOP) for a
//!   second, the whole test process uses a small fraction of a CPU (the published librdkafka
//!   2.12.1 spins one of its threads at 100 % there; `vendor/rdkafka-sys/PATCHED.md`), and
//!   every record is delivered once the broker goes on.
//!
//! Needs a broker it can pause: with `KAFKA_BOOTSTRAP_SERVERS` set it says so and does nothing.

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use sessionizer::config::{raw::RawConfig, validate};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::e2e::Broker;
use support::kafka::{clock_ticks, cpu_secs};

/// How long the broker is paused while records keep coming.
const PAUSE: Duration = Duration::from_secs(1);

/// CPU time (user + system) of this whole process so far.
fn process_cpu(ticks: f64) -> Duration {
    Duration::from_secs_f64(cpu_secs(std::process::id(), ticks).expect("/proc/self/stat"))
}

/// Whether `kill SIG PID` succeeded.
fn signal(pid: &str, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, pid])
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends SIGCONT to the paused broker when dropped, so a failing assertion does not leave it
/// stopped (its directory's removal would then wait for a process that cannot exit). A
/// failure there is reported, not a panic: a drop may run while a failed assertion unwinds.
struct Paused<'a>(&'a str);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if !signal(self.0, "-CONT") {
            eprintln!("kill -CONT {} failed: the broker may stay stopped", self.0);
        }
    }
}

#[test]
fn an_idempotent_producer_waiting_for_the_broker_does_not_spin() {
    let broker = Broker::start();
    let Some(dir) = broker.dir() else {
        eprintln!("skipped: needs a broker of its own to pause (KAFKA_BOOTSTRAP_SERVERS is set)");
        return;
    };
    let pid = std::fs::read_to_string(Path::new(dir).join("node1").join("kafka.pid"))
        .expect("the broker's pid file")
        .trim()
        .to_owned();
    broker.create_topics(&["spin"], 1);

    let mut raw = RawConfig::default();
    raw.kafka.brokers = Some(broker.bootstrap.clone());
    raw.kafka.group = Some("spin".to_owned());
    raw.kafka.guarantee = Some("at-least-once".to_owned());
    let rt = validate(&raw).expect("a valid configuration").runtime;
    // The at-least-once outputs' producer: idempotent, acks=all, lz4, 5 ms linger.
    let producer: ThreadedProducer<DefaultProducerContext> =
        sessionizer::kafka::idempotent_producer_config(&rt)
            .create()
            .expect("a producer");
    let send = |n: usize| {
        for i in 0..n {
            let payload = format!("{{\"n\":{i}}}");
            producer
                .send(BaseRecord::to("spin").key("k").payload(&payload))
                .map_err(|(e, _)| e)
                .expect("queued");
        }
    };
    // The connection and the producer id, before the pause.
    send(10);
    producer
        .flush(Duration::from_secs(30))
        .expect("delivered before the pause");

    let paused = Paused(&pid);
    assert!(signal(&pid, "-STOP"), "kill -STOP {pid}");
    // Every 10 ms, 20 records: the first batch (more than the five records librdkafka lets an
    // idempotent producer have in flight per partition) is sent and waits for its answer,
    // the next ones are ready 5 ms later and must wait for it.
    let ticks = clock_ticks();
    let cpu_before = process_cpu(ticks);
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < PAUSE {
        send(20);
        sent += 20;
        std::thread::sleep(Duration::from_millis(10));
    }
    let used = process_cpu(ticks) - cpu_before;
    let wall = started.elapsed();
    drop(paused);
    eprintln!("{sent} records sent in {wall:?} with the broker paused; process CPU {used:?}");

    producer
        .flush(Duration::from_secs(60))
        .expect("every record delivered once the broker goes on");
    assert!(sent >= 100, "only {sent} records sent during the pause");
    // A spinning broker thread alone would use about all of `wall`.
    assert!(
        used < wall / 4,
        "the process used {used:?} of CPU in {wall:?} while the broker was paused: a producer \
         thread spins waiting for its answer"
    );
}
