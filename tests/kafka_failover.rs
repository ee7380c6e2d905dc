//! Scale-out and failover on a real three-node Apache Kafka cluster (started by
//! `scripts/kafka.sh start --nodes 3`), with the real `sessionizer` binary as several
//! instances of one consumer group, each with its own state directory (as on separate
//! machines):
//! - three instances on a six-partition input; one is killed with SIGKILL mid-stream, a fourth
//!   (with no local state: it restores from the changelog) joins, one leaves gracefully (scale
//!   down), and a broker is killed mid-run. Exactly-once: a read_committed reader sees every
//!   input exactly once across annotated / late / dead letters and every session of the offline
//!   result exactly once. At-least-once: the same run loses nothing (repeats only identical)
//!   and gives the same sessions.
//! - a zombie: an instance frozen (SIGSTOP) while a replacement with the same instance id
//!   starts; when it wakes up it is fenced (exits non-zero) and nothing it did after the
//!   replacement started is visible.
//!
//! Waiting is always for a condition (records seen, process exited), with a deadline.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::e2e::*;
use support::kafka::{free_port, kafka_sh, rand_u32};

const PARTITIONS: i32 = 6;

/// The semantics of the other end-to-end tests, except that a caught-up partition never
/// follows the wall clock: the input has event times of 2024, and a partition caught up during
/// a failover pause must not jump its watermark to now (making the rest of the input late).
/// The end of the input is marked by [`with_flush_events`] instead.
const IDLE_AFTER: &str = "100h";

/// Settings that make failover quick: a short consumer session and transaction timeout.
/// Standby copies are left out unless `FAILOVER_STANDBY=N` asks for them.
fn fast(instance: &str, guarantee: &str) -> Vec<String> {
    let standby = std::env::var("FAILOVER_STANDBY").unwrap_or_else(|_| "0".into());
    [
        "--standby-replicas",
        standby.as_str(),
        "--instance-id",
        instance,
        "--guarantee",
        guarantee,
        "--transaction-timeout",
        "5s",
        "--kafka-property",
        "session.timeout.ms=6000",
        "--kafka-property",
        "heartbeat.interval.ms=500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start(broker: &Broker, t: &Topics, root: &Path, group: &str, id: &str, g: &str) -> Proc {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let extra = fast(id, g);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    run_with(
        broker,
        t,
        &dir,
        group,
        free_port(),
        &semantics(IDLE_AFTER),
        &extra,
    )
}

fn produce(broker: &Broker, t: &Topics, chunk: &[(String, String)]) {
    broker.produce(&t.input, &to_user_partitions(chunk, PARTITIONS));
}

fn n_of(value: &str) -> u64 {
    let v: Value = serde_json::from_str(value).unwrap();
    v["n"].as_u64().unwrap()
}

/// Checks what a read_committed reader sees once every instance has stopped.
fn check_outputs(
    broker: &Broker,
    t: &Topics,
    input: &[(String, String)],
    want_sessions: &[Value],
    want_annotated: &[String],
    exactly_once: bool,
) {
    let annotated = broker.read_all(&t.annotated);
    let late = broker.read_all(&t.late);
    let dlq = broker.read_all(&t.dlq);
    let mut seen: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for r in annotated.iter().chain(&late) {
        seen.entry(n_of(&r.value))
            .or_default()
            .push(r.value.clone());
    }
    assert!(
        dlq.is_empty(),
        "no dead letters expected: {:?}",
        dlq.first()
    );
    assert_eq!(
        seen.len(),
        input.len(),
        "every input is in annotated or late"
    );
    for (n, copies) in &seen {
        let distinct: BTreeSet<&String> = copies.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "input {n}: repeats must be identical: {distinct:#?}\n{}",
            user_history(&copies[0], &annotated, want_annotated)
        );
        if exactly_once {
            assert_eq!(copies.len(), 1, "input {n} seen {} times", copies.len());
        }
    }
    let got: BTreeSet<String> = annotated.iter().map(|r| r.value.clone()).collect();
    let want: BTreeSet<String> = want_annotated.iter().cloned().collect();
    assert_eq!(got, want, "annotations equal the offline ones");
    let sessions: Vec<Value> = broker
        .read_all(&t.sessions)
        .iter()
        .map(|r| serde_json::from_str(&r.value).unwrap())
        .collect();
    let concluded: Vec<&Value> = sessions.iter().filter(|s| s["type"] == "session").collect();
    assert_eq!(
        session_set(&sessions),
        session_set(want_sessions),
        "sessions equal the offline result (none lost or split)"
    );
    if exactly_once {
        assert_eq!(
            concluded.len(),
            want_sessions.len(),
            "every session published exactly once"
        );
    }
}

/// For a failure message: every annotation of the user of `value`, in the order a reader saw
/// them (per partition, the order they were written), with their source offsets, and the
/// offline annotations of that user.
fn user_history(value: &str, annotated: &[Rec], want_annotated: &[String]) -> String {
    let user_of = |v: &str| serde_json::from_str::<Value>(v).unwrap()["user_id"].clone();
    let user = user_of(value);
    let mut out = format!("annotations of user {user} (source partition/offset: value):\n");
    for r in annotated.iter().filter(|r| user_of(&r.value) == user) {
        let h = |k: &str| r.headers.get(k).cloned().unwrap_or_default();
        out.push_str(&format!(
            "  {}/{}: {}\n",
            h("sessionizer.source.partition"),
            h("sessionizer.source.offset"),
            r.value
        ));
    }
    out.push_str("offline:\n");
    for v in want_annotated.iter().filter(|v| user_of(v) == user) {
        out.push_str(&format!("  {v}\n"));
    }
    out
}

/// Produces `input` to the input topic at about `rate` records/s, in arrival order, so that
/// no partition is ever idle long enough for the idle-advance to make later events late.
fn produce_paced(broker: &Broker, t: &Topics, input: &[(String, String)], rate: usize) {
    let batch = (rate / 10).max(1);
    for chunk in input.chunks(batch) {
        let started = Instant::now();
        produce(broker, t, chunk);
        // Pacing of the load, not synchronisation.
        std::thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
    }
}

/// When each phase of a scenario ended, on stderr and, with `E2E_KEEP_LOGS=DIR`, appended to
/// `DIR/failover-phases.log`: this test took 210 to 340 s from one CI run to the next, on the
/// same code, and this says where the time goes.
struct Phases {
    name: String,
    start: Instant,
    last: Instant,
}

impl Phases {
    fn new(name: &str) -> Phases {
        let now = Instant::now();
        Phases {
            name: name.to_owned(),
            start: now,
            last: now,
        }
    }

    fn end(&mut self, what: &str) {
        let now = Instant::now();
        let line = format!(
            "{}: {what} at {:.1} s (+{:.1} s)\n",
            self.name,
            (now - self.start).as_secs_f64(),
            (now - self.last).as_secs_f64()
        );
        self.last = now;
        eprint!("{line}");
        if let Some(dir) = std::env::var_os("E2E_KEEP_LOGS") {
            let _ = std::fs::create_dir_all(&dir);
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(&dir).join("failover-phases.log"))
                .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
            if let Err(e) = appended {
                eprintln!("failover-phases.log: {e}");
            }
        }
    }
}

/// Three instances, SIGKILL of one, a fourth joins, one leaves, a broker dies, while the
/// input keeps arriving.
fn failover(broker: &Broker, guarantee: &str) {
    let exactly_once = guarantee == "exactly-once";
    let root = tempfile::tempdir().unwrap();
    let prefix = format!("fo{}", rand_u32() % 100_000);
    let t = Topics::new(broker, &prefix, PARTITIONS);
    let group = format!("{prefix}-group");
    let input = with_flush_events(PARTITIONS, events(240, 60, 41));
    let (want_sessions, want_annotated) = offline(&input, root.path());
    let n = input.len();
    let mut phases = Phases::new(guarantee);

    let a = start(broker, &t, root.path(), &group, "a", guarantee);
    let b = start(broker, &t, root.path(), &group, "b", guarantee);
    let c = start(broker, &t, root.path(), &group, "c", guarantee);
    let (a, d) = std::thread::scope(|scope| {
        scope.spawn(|| produce_paced(broker, &t, &input, 400));
        wait_annotated(broker, &t, n / 6, &[&a, &b, &c]);
        phases.end("a sixth annotated by three instances");
        drop(b); // SIGKILL mid-stream
                 // A new instance without local state: whatever it gets, it restores from the changelog.
        let d = start(broker, &t, root.path(), &group, "d", guarantee);
        wait_annotated(broker, &t, n / 2, &[&a, &c, &d]);
        phases.end("half annotated after a kill -9 and a new instance");
        // Scale down: c leaves gracefully; its partitions move with their state.
        assert_eq!(c.terminate(), 0, "graceful exit of a leaving instance");
        phases.end("an instance stopped");
        wait_annotated(broker, &t, 2 * n / 3, &[&a, &d]);
        phases.end("two thirds annotated");
        // A broker of the cluster dies mid-run.
        if let Some(dir) = broker.dir() {
            let out = kafka_sh(&["kill-node", "3", "--dir", dir]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        phases.end("a broker killed");
        (a, d)
    });
    phases.end("all input produced");
    wait_annotated(broker, &t, n, &[&a, &d]);
    phases.end("all annotated");
    // Every session concludes (the flush events move every watermark on); then stop cleanly.
    wait_sessions(
        broker,
        &t.sessions,
        want_sessions.len(),
        session_set,
        &[&a, &d],
    );
    phases.end("every session concluded");
    let (la, ld) = (a.log(), d.log());
    assert_eq!(a.terminate(), 0, "a exits cleanly:\n{la}");
    assert_eq!(d.terminate(), 0, "d exits cleanly:\n{ld}");
    phases.end("both stopped");
    assert!(
        ld.contains("state restored") || la.contains("state restored"),
        "partitions moved with their state: a restore from the changelog happened"
    );
    check_outputs(
        broker,
        &t,
        &input,
        &want_sessions,
        &want_annotated,
        exactly_once,
    );
    phases.end("outputs checked");
    if let Some(dir) = broker.dir() {
        let out = kafka_sh(&["start-node", "3", "--dir", dir]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    phases.end("the broker restarted");
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// An instance frozen while its replacement (same instance id) takes over is fenced.
fn zombie_is_fenced(broker: &Broker) {
    let root = tempfile::tempdir().unwrap();
    let prefix = format!("zo{}", rand_u32() % 100_000);
    let t = Topics::new(broker, &prefix, PARTITIONS);
    let group = format!("{prefix}-group");
    let input = with_flush_events(PARTITIONS, events(60, 50, 7));
    let (want_sessions, want_annotated) = offline(&input, root.path());
    let n = input.len();
    let mut phases = Phases::new("zombie");
    let mut old = {
        let dir = root.path().join("old");
        std::fs::create_dir_all(&dir).unwrap();
        let extra = fast("same", "exactly-once");
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        run_with(
            broker,
            &t,
            &dir,
            &group,
            free_port(),
            &semantics(IDLE_AFTER),
            &extra,
        )
    };
    let new = std::thread::scope(|scope| {
        scope.spawn(|| produce_paced(broker, &t, &input, 200));
        wait_annotated(broker, &t, n / 4, &[&old]);
        phases.end("a quarter annotated");
        signal(&old, "-STOP");
        // The replacement, on another machine (state dir), with the same instance id.
        start(broker, &t, root.path(), &group, "same", "exactly-once")
    });
    phases.end("all input produced, the replacement started");
    wait_annotated(broker, &t, n, &[&new]);
    phases.end("all annotated");
    signal(&old, "-CONT");
    // The zombie must notice it was fenced and stop, without publishing anything.
    let status = old.wait_exit(Duration::from_secs(90), "the zombie did not stop");
    phases.end("the zombie stopped");
    assert!(!status.success(), "a fenced instance exits non-zero");
    assert!(
        old.log().contains("fenced") || old.log().contains("Fenced"),
        "the zombie says it was fenced:\n{}",
        old.log()
    );
    wait_sessions(
        broker,
        &t.sessions,
        want_sessions.len(),
        session_set,
        &[&new],
    );
    assert_eq!(new.terminate(), 0);
    phases.end("every session concluded, the replacement stopped");
    check_outputs(broker, &t, &input, &want_sessions, &want_annotated, true);
    phases.end("outputs checked");
}

#[test]
fn failover_on_a_three_node_cluster() {
    if std::env::var("KAFKA_BOOTSTRAP_SERVERS").is_ok() {
        eprintln!("KAFKA_BOOTSTRAP_SERVERS is set: this test needs its own three-node cluster");
    }
    let mut phases = Phases::new("cluster");
    let broker = Broker::start_nodes(3);
    phases.end("three nodes started");
    let only = std::env::var("FAILOVER_ONLY").unwrap_or_default();
    assert!(
        ["", "zombie", "exactly-once", "at-least-once"].contains(&only.as_str()),
        "FAILOVER_ONLY=`{only}` names no scenario"
    );
    let want = |name: &str| only.is_empty() || only == name;
    // The zombie first, on a fresh cluster: once, after the broker kill and restart of the
    // failover scenarios, the zombie scenario's outputs stopped becoming visible (unexplained).
    if want("zombie") {
        zombie_is_fenced(&broker);
    }
    if want("exactly-once") {
        failover(&broker, "exactly-once");
    }
    if want("at-least-once") {
        failover(&broker, "at-least-once");
    }
    drop(broker);
    phases.end("scenarios done, the cluster stopped");
}
