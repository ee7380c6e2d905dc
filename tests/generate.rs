//! `sessionizer generate` end to end: determinism, the documented fields, volume flags,
//! bounded disorder, late events, flag errors, and the generator piped into
//! `sessionizer sessionize`, whose sessions must equal the generator's ground truth.

use clap::Parser;
use serde_json::Value;
use sessionizer::cli::{Cli, Command as Sub};
use sessionizer::generate::{self, Generator, GeneratorConfig};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sessionizer"))
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `sessionizer generate ARGS` and returns its stdout.
fn generate(args: &[&str]) -> Vec<u8> {
    let o = bin().arg("generate").args(args).output().unwrap();
    ok(&o);
    o.stdout
}

fn parse(out: &[u8]) -> Vec<Value> {
    std::str::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn times(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e["timestamp"].as_i64().unwrap())
        .collect()
}

/// For every event: the largest event time emitted before it minus its own (0 if none).
fn behind(ts: &[i64]) -> Vec<i64> {
    let mut max = i64::MIN;
    ts.iter()
        .map(|&t| {
            let b = if max == i64::MIN { 0 } else { max - t };
            max = max.max(t);
            b
        })
        .collect()
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = generate(&["--count", "3000", "--disorder", "20s"]);
    let b = generate(&["--count", "3000", "--disorder", "20s"]);
    assert_eq!(a, b);
    let c = generate(&["--count", "3000", "--disorder", "20s", "--seed", "43"]);
    assert_ne!(a, c);
    // --output writes the same bytes as stdout.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("events.jsonl");
    let o = bin()
        .args([
            "generate",
            "--count",
            "3000",
            "--disorder",
            "20s",
            "--output",
        ])
        .arg(&p)
        .output()
        .unwrap();
    ok(&o);
    assert!(o.stdout.is_empty());
    assert_eq!(std::fs::read(&p).unwrap(), a);
}

#[test]
fn count_is_exact_and_every_line_has_the_fields() {
    for n in [0usize, 1, 12345] {
        let n_s = n.to_string();
        let out = generate(&["--count", &n_s, "--users", "50"]);
        let events = parse(&out);
        assert_eq!(events.len(), n);
        assert!(out.is_empty() || out.ends_with(b"\n"));
        for e in &events {
            let o = e.as_object().unwrap();
            let uid = o["user_id"].as_str().unwrap();
            assert!(
                uid.len() == 8
                    && uid.starts_with("u-")
                    && uid[2..].bytes().all(|b| b.is_ascii_digit()),
                "{uid}"
            );
            assert!(o["timestamp"].is_i64(), "{e}");
            assert!(!o["event"].as_str().unwrap().is_empty());
            let platform = o["platform"].as_str().unwrap();
            assert!(["web", "ios", "android"].contains(&platform));
            assert!(o["device_id"].as_str().unwrap().starts_with("d-"));
            assert!(o["country"].is_string());
            assert!(!o.contains_key("session") && !o.contains_key("session_hint"));
        }
    }
    let events = parse(&generate(&["--count", "1"]));
    assert!(events[0]["timestamp"].as_i64().unwrap() >= 1_704_067_200_000);
}

#[test]
fn the_mix_is_realistic() {
    let events = parse(&generate(&["--count", "30000", "--users", "300"]));
    let mut names: HashMap<(&str, &str), usize> = HashMap::new();
    for e in &events {
        *names
            .entry((
                e["platform"].as_str().unwrap(),
                e["event"].as_str().unwrap(),
            ))
            .or_default() += 1;
    }
    let n = |p, e| names.get(&(p, e)).copied().unwrap_or(0);
    for p in ["ios", "android"] {
        assert!(n(p, "app_open") > 0 && n(p, "app_close") > 0 && n(p, "app_installed") > 0);
        assert!(n(p, "app_close") <= n(p, "app_open"));
        assert_eq!(n(p, "page_view"), 0);
    }
    for e in ["page_view", "click", "search", "add_to_cart", "purchase"] {
        assert!(n("web", e) > 0, "no web {e}");
    }
    assert_eq!(n("web", "app_open") + n("web", "notification_shown"), 0);
    let noise: usize = ["push_sent", "notification_shown", "app_installed"]
        .iter()
        .map(|e| {
            names
                .iter()
                .filter(|(k, _)| k.1 == *e)
                .map(|(_, v)| v)
                .sum::<usize>()
        })
        .sum();
    let share = noise as f64 / events.len() as f64;
    assert!(
        (0.01..0.08).contains(&share),
        "non-engagement share {share}"
    );
}

#[test]
fn without_disorder_the_output_is_sorted_by_time() {
    let ts = times(&parse(&generate(&["--count", "20000"])));
    assert!(ts.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn disorder_is_bounded() {
    for (d, ms) in [("30s", 30_000), ("5m", 300_000)] {
        let ts = times(&parse(&generate(&["--count", "20000", "--disorder", d])));
        let b = behind(&ts);
        assert!(b.iter().all(|&x| x <= ms), "disorder beyond {d}");
        let out_of_order = b.iter().filter(|&&x| x > 0).count();
        assert!(
            out_of_order > 100,
            "only {out_of_order} out of order with {d}"
        );
    }
}

#[test]
fn late_fraction_makes_late_events() {
    let ts = times(&parse(&generate(&[
        "--count",
        "20000",
        "--late-fraction",
        "0.02",
        "--late-by",
        "2h",
    ])));
    let b = behind(&ts);
    let very_late = b.iter().filter(|&&x| x > 3_600_000).count();
    assert!(
        (100..1000).contains(&very_late),
        "{very_late} events over 1h late"
    );
    assert!(b.iter().all(|&x| x <= 2 * 3_600_000));
}

#[test]
fn duration_bounds_event_time() {
    let ts = times(&parse(&generate(&[
        "--duration",
        "3h",
        "--users",
        "500",
        "--start",
        "2024-03-01T12:00:00+01:00",
    ])));
    let start = 1_709_290_800_000; // 2024-03-01T11:00:00Z
    assert!(ts.len() > 100);
    assert!(ts
        .iter()
        .all(|&t| (start..start + 3 * 3_600_000).contains(&t)));
}

#[test]
fn rate_paces_the_output() {
    let t = Instant::now();
    let out = generate(&["--count", "51", "--rate", "500"]);
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(out, generate(&["--count", "51"]));
}

/// `--start now --real-time`: each event is written once its time has come on the wall
/// clock, so a sessionizer reading them live never sees one from the future (without
/// `--real-time` they run hours ahead). The same bytes as unpaced.
#[test]
fn real_time_events_are_never_ahead_of_the_clock() {
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let args = [
        "--start",
        "2030-01-01T00:00:00Z",
        "--users",
        "100000",
        "--count",
        "20",
    ];
    let mut child = bin()
        .arg("generate")
        .args([
            "--users",
            "100000",
            "--count",
            "20",
            "--start",
            "now",
            "--real-time",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let reader = BufReader::new(child.stdout.take().unwrap());
    let mut times = Vec::new();
    for line in reader.lines() {
        let t = serde_json::from_str::<Value>(&line.unwrap()).unwrap()["timestamp"]
            .as_i64()
            .unwrap();
        let read_at = now_ms();
        assert!(t <= read_at, "event time {t} read at {read_at}");
        times.push(t);
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(times.len(), 20);
    // The same stream as without pacing, shifted to its start.
    let unpaced = self::times(&parse(&generate(&args)));
    let shift = |ts: &[i64]| ts.iter().map(|t| t - ts[0]).collect::<Vec<_>>();
    assert_eq!(shift(&times[..]), shift(&unpaced[..]));
}

#[test]
fn an_unbounded_stream_stops_quietly_when_the_reader_goes() {
    let mut child = bin()
        .args(["generate", "--users", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..1000 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap();
    }
    drop(reader);
    let o = child.wait_with_output().unwrap();
    ok(&o);
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    for (args, needle) in [
        (vec!["--idle", "10m"], "--idle"),
        (vec!["--users", "0"], "--users"),
        (vec!["--late-fraction", "2"], "--late-fraction"),
        (vec!["--rate", "0"], "--rate"),
        (vec!["--disorder", "soon"], "--disorder"),
        (vec!["--start", "yesterday"], "--start"),
        (vec!["--real-time", "--rate", "5"], "--real-time"),
    ] {
        let o = bin()
            .arg("generate")
            .args(&args)
            .args(["--count", "10"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn flag_defaults_are_the_library_defaults() {
    let cli = Cli::try_parse_from(["sessionizer", "generate"]).unwrap();
    let Sub::Generate(a) = cli.command else {
        panic!("not generate")
    };
    assert_eq!(a.config(), GeneratorConfig::default());
    assert_eq!(a.rate, None);
    assert!(a.output.is_none());
}

// ---------------------------------------------------------------------------------------
// Piped into the sessionizer.

struct Run {
    summary: HashMap<String, u64>,
    sessions: Vec<Value>,
}

/// `sessionizer generate GEN | sessionizer sessionize ... --allowed-lateness LATENESS`.
fn pipeline(gen: &[&str], lateness: &str) -> Run {
    let mut g = bin()
        .arg("generate")
        .args(gen)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let s = bin()
        .arg("sessionize")
        .args(generate::event_class_flags())
        .args(["--allowed-lateness", lateness])
        .stdin(Stdio::from(g.stdout.take().unwrap()))
        .output()
        .unwrap();
    assert!(g.wait().unwrap().success(), "generate failed");
    ok(&s);
    let err = String::from_utf8_lossy(&s.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("sessionizer: lines="))
        .unwrap_or_else(|| panic!("no summary in {err}"));
    let summary = line["sessionizer: ".len()..]
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.trim_matches(|c| c == '(' || c == ')').split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect();
    Run {
        summary,
        sessions: parse(&s.stdout),
    }
}

type SessionKey = (String, i64, i64, u64, String);

/// (user, start, end, event count, end reason) of the concluded sessions, sorted.
fn session_keys(sessions: &[Value]) -> Vec<SessionKey> {
    let mut v: Vec<SessionKey> = sessions
        .iter()
        .filter(|r| r["type"] == "session")
        .map(|r| {
            (
                r["user_id"].as_str().unwrap().to_owned(),
                r["start"].as_i64().unwrap(),
                r["end"].as_i64().unwrap(),
                r["event_count"].as_u64().unwrap(),
                r["end_reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The generator's ground truth for the same options, in the same form.
fn truth(cfg: GeneratorConfig) -> Vec<SessionKey> {
    let mut m: HashMap<(String, u32), (i64, i64, u64, &str)> = HashMap::new();
    for e in Generator::new(cfg).unwrap() {
        let Some(s) = e.session else { continue };
        let t = e.timestamp;
        let entry = m
            .entry((e.user_id.to_string(), s))
            .or_insert((t, t, 0, e.event));
        entry.0 = entry.0.min(t);
        entry.1 = entry.1.max(t);
        entry.2 += 1;
        if t >= entry.1 {
            entry.3 = e.event;
        }
    }
    let mut v: Vec<SessionKey> = m
        .into_iter()
        .map(|((u, _), (start, end, n, last))| {
            let reason = if last == "app_close" {
                "explicit_end"
            } else {
                "inactivity"
            };
            (u, start, end, n, reason.to_owned())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn piped_into_sessionize_nothing_is_late_and_sessions_match_the_model() {
    let gen = ["--count", "20000", "--users", "200", "--seed", "7"];
    let run = pipeline(&gen, "0");
    assert_eq!(run.summary["lines"], 20000);
    assert_eq!(run.summary["dead_letters"], 0);
    assert_eq!(run.summary["late"], 0);
    let keys = session_keys(&run.sessions);
    assert_eq!(keys.len() as u64, run.summary["sessions"]);
    let mean = keys.iter().map(|k| k.3 as f64).sum::<f64>() / keys.len() as f64;
    assert!(
        (9.0..15.0).contains(&mean),
        "mean events per session {mean}, configured 12"
    );
    let engaged = 20000 - run.summary["excluded"];
    assert_eq!(keys.iter().map(|k| k.3).sum::<u64>(), engaged);

    // Exactly the generator's sessions.
    let cfg = GeneratorConfig {
        count: Some(20000),
        users: 200,
        seed: 7,
        ..GeneratorConfig::default()
    };
    let expected = truth(cfg.clone());
    assert_eq!(keys, expected);

    // Bounded disorder within the allowed lateness: still nothing late, same sessions.
    let disordered = [&gen[..], &["--disorder", "30s"]].concat();
    let run = pipeline(&disordered, "30s");
    assert_eq!(run.summary["dead_letters"], 0);
    assert_eq!(run.summary["late"], 0);
    assert_eq!(session_keys(&run.sessions), expected);
}

#[test]
fn piped_into_sessionize_late_events_are_late() {
    let run = pipeline(
        &[
            "--count",
            "20000",
            "--users",
            "200",
            "--seed",
            "7",
            "--late-fraction",
            "0.02",
        ],
        "0",
    );
    assert_eq!(run.summary["dead_letters"], 0);
    let late = run.summary["late"];
    assert!((50..1000).contains(&late), "late={late}");
    assert_eq!(run.summary["annotated"] + late, 20000);
}
