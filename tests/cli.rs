//! The `sessionizer` binary end to end: offline mode over the example file, outputs and their
//! schemas, exit codes, configuration errors naming their key, flags and environment variables.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sessionizer"))
}

fn lines(p: &Path) -> Vec<Value> {
    json_lines(&std::fs::read(p).unwrap())
}

/// JSON lines, as a file or a child's stdout holds them.
fn json_lines(text: &[u8]) -> Vec<Value> {
    std::str::from_utf8(text)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn sessionizes_the_example_file_into_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let out = bin()
        .args([
            "sessionize",
            "--config",
            "examples/sessionizer.toml",
            "--input",
            "examples/events.jsonl",
        ])
        .arg("--sessions")
        .arg(p("sessions"))
        .arg("--annotated")
        .arg(p("annotated"))
        .arg("--late")
        .arg(p("late"))
        .arg("--dead-letters")
        .arg(p("dead"))
        .arg("--stats")
        .arg(p("stats"))
        .output()
        .unwrap();
    ok(&out);
    let input = std::fs::read_to_string("examples/events.jsonl").unwrap();
    let n_in = input.lines().count();
    let annotated = lines(&p("annotated"));
    let late = lines(&p("late"));
    let dead = lines(&p("dead"));
    assert_eq!(
        annotated.len() + late.len() + dead.len(),
        n_in,
        "every line exactly once"
    );

    let reasons: Vec<(u64, &str)> = dead
        .iter()
        .map(|d| (d["line"].as_u64().unwrap(), d["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (11, "invalid_time"),
            (21, "invalid_json"),
            (31, "missing_user_id")
        ]
    );
    assert_eq!(late.len(), 1);
    assert_eq!(late[0]["reason"], "concluded_session");
    assert_eq!(late[0]["event"]["event"], "late_click");

    // Annotated events: the input line, byte for byte, plus the session field.
    let by_line: std::collections::HashSet<&str> = input.lines().collect();
    let raw_annotated = std::fs::read_to_string(p("annotated")).unwrap();
    for (line, v) in raw_annotated.lines().zip(&annotated) {
        let cut = line.rfind(",\"session\":").expect("session field appended");
        assert!(
            by_line.contains(format!("{}}}", &line[..cut]).as_str()),
            "{line}"
        );
        if v["event"] == "push_sent" {
            assert!(v["session"].is_null());
        } else {
            assert!(v["session"]["id"].is_string());
            assert!(v["session"]["seq"].as_u64().unwrap() >= 1);
        }
    }

    let sessions = lines(&p("sessions"));
    let concluded: Vec<&Value> = sessions.iter().filter(|s| s["type"] == "session").collect();
    assert!(concluded.len() >= 8, "{}", concluded.len());
    for s in &concluded {
        for f in [
            "session_id",
            "user_id",
            "start",
            "end",
            "start_time",
            "end_time",
            "length_s",
            "event_count",
            "end_reason",
            "session_number",
            "merged_ids",
        ] {
            assert!(!s[f].is_null(), "field {f} in {s}");
        }
    }
    let total: u64 = concluded
        .iter()
        .map(|s| s["event_count"].as_u64().unwrap())
        .sum();
    let in_session = annotated.iter().filter(|a| !a["session"].is_null()).count() as u64;
    assert_eq!(
        total, in_session,
        "session event counts add up to the sessionized events"
    );
    let reasons: std::collections::HashSet<&str> = concluded
        .iter()
        .map(|s| s["end_reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains("explicit_end"), "{reasons:?}");

    let stats = lines(&p("stats"));
    assert_eq!(stats.len(), concluded.len());
    assert!(stats.iter().all(|s| s["type"] == "user_stats"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("lines={n_in}")), "{stderr}");
}

#[test]
fn on_close_gives_final_positions_and_the_same_sessions() {
    let run = |mode: &str| {
        let out = bin()
            .args([
                "sessionize",
                "--config",
                "examples/sessionizer.toml",
                "--input",
                "examples/events.jsonl",
                "--annotate",
                mode,
            ])
            .output()
            .unwrap();
        ok(&out);
        let mut v: Vec<Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["type"] == "session")
            .map(|mut v| {
                v.as_object_mut().unwrap().remove("merged_ids");
                v
            })
            .collect();
        v.sort_by_key(|s| {
            (
                s["user_id"].as_str().unwrap().to_owned(),
                s["start"].as_i64().unwrap(),
            )
        });
        v
    };
    assert_eq!(run("on_arrival"), run("on_close"));
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let out = bin()
        .args([
            "sessionize",
            "--timeout",
            "soon",
            "--input",
            "examples/events.jsonl",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`session.timeout`") && err.contains("soon"),
        "{err}"
    );

    // Values clap would take for flags (a leading '-') or fail to parse itself are reported
    // under their configuration key too, from a flag or from the environment.
    let refused = |args: &[&str], env: &[(&str, &str)], key: &str| {
        let out = bin()
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(key), "{args:?} {env:?}: {err}");
    };
    refused(
        &["sessionize", "--timeout", "-5m"],
        &[],
        "`session.timeout`",
    );
    refused(
        &["check", "--standby-replicas", "-1"],
        &[],
        "`kafka.standby_replicas`",
    );
    refused(
        &["check"],
        &[("SESSIONIZER_MAX_RECORD_BYTES", "1MB")],
        "`input.max_record_bytes`",
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[session]\ntimout = \"5m\"\n").unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timout"));

    let out = bin()
        .args(["sessionize", "--input", "/nonexistent/input.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_refused_client_property_is_named_without_its_value() {
    // librdkafka refuses these when the consumer is created, before any broker is asked.
    for (property, key) in [
        ("sasl.jaas.config=SECRET-1", "`sasl.jaas.config`"),
        ("sasl.passwrd=SECRET-1", "`sasl.passwrd`"),
        ("acks=SECRET-1", "`acks`"),
    ] {
        let state = tempfile::tempdir().unwrap();
        let out = bin()
            .args([
                "run",
                "--brokers",
                "127.0.0.1:1",
                "--input-topics",
                "events",
            ])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--kafka-property",
                property,
            ])
            .arg("--state-dir")
            .arg(state.path())
            .env_clear()
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{property}: {err}");
        assert!(err.contains(key), "{property}: {err}");
        assert!(!err.contains("SECRET"), "{property}: {err}");
    }
}

#[test]
fn check_prints_the_effective_configuration_with_env_and_flag_overrides() {
    let out = bin()
        .args([
            "check",
            "--config",
            "examples/sessionizer.toml",
            "--allowed-lateness",
            "7m",
        ])
        .env("SESSIONIZER_TIMEOUT", "45m")
        .output()
        .unwrap();
    ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(v["session"]["timeout"].as_str(), Some("45m"));
    assert_eq!(v["time"]["allowed_lateness"].as_str(), Some("7m"));
    assert_eq!(
        v["time"]["quiet_period"].as_str(),
        Some("5s"),
        "file value kept"
    );
    assert_eq!(
        v["time"]["idle_after"].as_str(),
        Some("10s"),
        "default filled in"
    );
}

/// The `sessionizer.toml` block of the Kubernetes ConfigMap.
fn configmap_toml() -> String {
    let configmap = std::fs::read_to_string("deploy/kubernetes/configmap.yaml").unwrap();
    configmap
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("sessionizer.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect()
}

/// The shipped configuration files are valid: the examples and the one in the Kubernetes
/// ConfigMap (its `sessionizer.toml` block).
#[test]
fn shipped_configuration_files_pass_check() {
    let dir = tempfile::tempdir().unwrap();
    let block = configmap_toml();
    assert!(block.contains("[kafka]"), "no TOML block found:\n{block}");
    let from_configmap = dir.path().join("configmap.toml");
    std::fs::write(&from_configmap, &block).unwrap();
    for file in [
        Path::new("examples/sessionizer.toml"),
        Path::new("examples/sessionizer-kafka.toml"),
        &from_configmap,
    ] {
        let out = bin()
            .arg("check")
            .arg("--config")
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `KEY: value` lines of the `environment:` map of a docker-compose service (comments and
/// quotes dropped), but for the log filter, which is no setting. A reader for this file's
/// layout only: services indented by 2, their keys by 4, the map's entries by 6.
fn compose_environment(compose: &str, service: &str) -> Vec<(String, String)> {
    let comment = |l: &&str| l.trim_start().starts_with('#');
    let entries = compose
        .lines()
        .skip_while(|l| *l != format!("  {service}:"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("   ") || comment(l))
        .skip_while(|l| *l != "    environment:")
        .skip(1)
        .take_while(|l| l.starts_with("      ") || comment(l))
        .filter(|l| !comment(l))
        .map(|l| l.trim().split_once(": ").expect("KEY: value"));
    settings(entries)
}

/// `- name: K` followed by `value: V` in a Kubernetes container's `env` (literal values only),
/// but for the log filter.
fn manifest_env_values(manifest: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = manifest.lines().map(str::trim).collect();
    settings(lines.windows(2).filter_map(|w| {
        Some((
            w[0].strip_prefix("- name: ")?,
            w[1].strip_prefix("value: ")?,
        ))
    }))
}

/// Environment entries as settings: quotes dropped, `SESSIONIZER_LOG` (a log filter) left out.
fn settings<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    entries
        .filter(|(k, _)| *k != "SESSIONIZER_LOG")
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// The deployment files hold what they claim: docker-compose's sessionizer runs with the
/// settings of examples/sessionizer-kafka.toml, only the brokers, the metrics address and the
/// state directory changed for the container; the Kubernetes StatefulSet's environment on
/// the ConfigMap's file is a valid configuration with its state directory and instance id.
#[test]
fn deployment_files_give_the_configuration_they_claim() {
    let compose = std::fs::read_to_string("docker-compose.yml").unwrap();
    let env = compose_environment(&compose, "sessionizer");
    assert!(env.len() >= 20, "environment not found: {env:?}");
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} missing"))
    };
    let check = |args: &[&str], env: &[(String, String)]| {
        let out = bin()
            .arg("check")
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        ok(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    let from_compose = check(&[], &env);
    let from_example = check(
        &[
            "--config",
            "examples/sessionizer-kafka.toml",
            "--brokers",
            &get("SESSIONIZER_BROKERS"),
            "--metrics-addr",
            &get("SESSIONIZER_METRICS_ADDR"),
            "--state-dir",
            &get("SESSIONIZER_STATE_DIR"),
        ],
        &[],
    );
    assert_eq!(from_compose, from_example);

    let dir = tempfile::tempdir().unwrap();
    let block = configmap_toml();
    let file = dir.path().join("sessionizer.toml");
    std::fs::write(&file, block).unwrap();
    let statefulset = std::fs::read_to_string("deploy/kubernetes/statefulset.yaml").unwrap();
    assert!(
        statefulset.contains(r#"args: ["run", "--config", "/etc/sessionizer/sessionizer.toml"]"#)
    );
    let mut env = manifest_env_values(&statefulset);
    assert!(env.len() >= 2, "environment not found: {env:?}");
    // The downward API gives the pod's name.
    env.push(("SESSIONIZER_INSTANCE_ID".into(), "sessionizer-0".into()));
    let effective = check(&["--config", file.to_str().unwrap()], &env);
    for line in [
        r#"state_dir = "/var/lib/sessionizer""#,
        r#"metrics_addr = "0.0.0.0:9464""#,
        r#"instance_id = "sessionizer-0""#,
    ] {
        assert!(effective.lines().any(|l| l == line), "{line}:\n{effective}");
    }
}

#[test]
fn offline_runs_carry_no_state_over_whatever_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(
        &input,
        "{\"user_id\":\"u1\",\"timestamp\":\"2024-01-01T09:00:00Z\"}\n\
         {\"user_id\":\"u1\",\"timestamp\":\"2024-01-01T09:10:00Z\"}\n\
         {\"user_id\":\"u1\",\"timestamp\":\"2024-01-01T10:00:00Z\"}\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    // The streaming state directory's variable, as the container image sets it.
    let streaming = dir.path().join("streaming-state");
    let run = |state_dir: Option<&Path>| {
        let mut c = bin();
        c.args(["sessionize", "--timeout", "30m", "--input"])
            .arg(&input)
            .env("SESSIONIZER_STATE_DIR", &streaming);
        if let Some(d) = state_dir {
            c.arg("--state-dir").arg(d);
        }
        let out = c.output().unwrap();
        ok(&out);
        let sessions = json_lines(&out.stdout);
        assert_eq!(
            sessions.len(),
            2,
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        sessions
    };
    let in_memory = run(None);
    for _ in 0..2 {
        assert_eq!(
            run(Some(&state)),
            in_memory,
            "a second run saw the first one's state"
        );
        let left: Vec<_> = std::fs::read_dir(&state).unwrap().collect();
        assert!(left.is_empty(), "the run left {left:?} in the state dir");
    }
    assert!(
        !streaming.exists(),
        "offline mode used SESSIONIZER_STATE_DIR"
    );
}

#[test]
fn outputs_that_would_overwrite_the_input_or_each_other_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let events = "{\"user_id\":\"u1\",\"timestamp\":\"2024-01-01T09:00:00Z\"}\n";
    std::fs::write(&input, events).unwrap();
    let other = dir.path().join("out.jsonl");
    // The input through another spelling of its path.
    let same_input = dir.path().join(".").join("events.jsonl");
    for (args, named) in [
        (
            vec!["--annotated".as_ref(), same_input.as_os_str()],
            "--annotated",
        ),
        (
            vec![
                "--sessions".as_ref(),
                other.as_os_str(),
                "--stats".as_ref(),
                other.as_os_str(),
            ],
            "--stats",
        ),
    ] {
        let out = bin()
            .args(["sessionize", "--input"])
            .arg(&input)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{err}");
        assert_eq!(std::fs::read_to_string(&input).unwrap(), events, "{err}");
    }
    // Devices may take several outputs.
    let out = bin()
        .args(["sessionize", "--input"])
        .arg(&input)
        .args(["--sessions", "/dev/null", "--annotated", "/dev/null"])
        .output()
        .unwrap();
    ok(&out);
}

#[test]
fn reads_stdin_and_writes_sessions_to_stdout() {
    use std::io::Write;
    let mut child = bin()
        .args(["sessionize", "--timeout", "10m", "--allowed-lateness", "0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            // The input starts with a UTF-8 byte order mark, which is not part of line 1.
            b"\xEF\xBB\xBF{\"user_id\":1,\"timestamp\":\"2024-01-01T00:00:00Z\"}\n\
              {\"user_id\":1,\"timestamp\":\"2024-01-01T00:10:00Z\"}\n\
              {\"user_id\":1,\"timestamp\":1704068400.5}\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    ok(&out);
    let v = json_lines(&out.stdout);
    assert_eq!(v.len(), 2);
    assert_eq!(v[0]["event_count"], 2, "a gap of exactly the timeout stays");
    assert_eq!(v[0]["length_s"], 600.0);
    assert_eq!(v[1]["start"], 1_704_068_400_500_i64);
}
