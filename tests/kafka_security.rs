//! Security against a real Apache Kafka broker with a SASL_PLAINTEXT listener (started by
//! `scripts/kafka.sh start --sasl`), with the real `sessionizer` binary:
//! - over SASL/PLAIN (exactly-once) and SASL/SCRAM-SHA-256 (at-least-once) it sessionizes as
//!   over PLAINTEXT: the same annotations and sessions as the offline run;
//! - a wrong password stops it at start, non-zero, with a message that names the
//!   authentication failure (not "unreachable brokers") and the settings to check, and without
//!   the password.
//!
//! The tests' own clients (topics, input, reading the outputs) use the PLAINTEXT listener.
//! Waiting is always for a condition (records seen, process exited), with a deadline.

use std::time::Duration;

mod support;

use support::e2e::*;
use support::kafka::free_port;

/// The one user of `scripts/kafka.sh start --sasl`.
const USER: &str = "sessionizer";
const PASSWORD: &str = "sessionizer-secret";

fn sasl(mechanism: &str, password: &str) -> Vec<String> {
    [
        "security.protocol=SASL_PLAINTEXT".to_string(),
        format!("sasl.mechanism={mechanism}"),
        format!("sasl.username={USER}"),
        format!("sasl.password={password}"),
    ]
    .into_iter()
    .flat_map(|p| ["--kafka-property".to_string(), p])
    .collect()
}

/// Sessionizes a small input over the SASL listener and compares with the offline run.
fn sessionizes_over_sasl(broker: &Broker, sasl_bootstrap: &str, mechanism: &str, guarantee: &str) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("sec-{}", mechanism.to_lowercase());
    let t = Topics::new(broker, &prefix, 2);
    let input = with_flush_events(2, events(20, 30, 3));
    let (want_sessions, want_annotated) = offline(&input, dir.path());
    broker.produce(&t.input, &to_user_partitions(&input, 2));
    let mut extra = sasl(mechanism, PASSWORD);
    extra.extend(["--guarantee".to_string(), guarantee.to_string()]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let group = format!("{prefix}-group");
    let p = run_on(
        sasl_bootstrap,
        &t,
        dir.path(),
        &group,
        free_port(),
        &semantics("100h"),
        &extra,
    );
    let annotated = wait_annotated(broker, &t, input.len(), &[&p]);
    let got = wait_sessions(broker, &t.sessions, want_sessions.len(), session_set, &[&p]);
    let log = p.log();
    assert_eq!(p.terminate(), 0, "{mechanism}: clean exit:\n{log}");
    assert_eq!(
        session_set(&got),
        session_set(&want_sessions),
        "{mechanism}: sessions equal the offline result"
    );
    let got: std::collections::BTreeSet<String> =
        annotated.iter().map(|r| r.value.clone()).collect();
    let want: std::collections::BTreeSet<String> = want_annotated.into_iter().collect();
    assert_eq!(got, want, "{mechanism}: annotations equal the offline ones");
}

/// A wrong password: the start fails, non-zero, saying why.
fn wrong_password_fails_at_start(broker: &Broker, sasl_bootstrap: &str) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, "sec-wrong", 1);
    let extra = sasl("PLAIN", "not-the-password");
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut p = run_on(
        sasl_bootstrap,
        &t,
        dir.path(),
        "sec-wrong-group",
        free_port(),
        &semantics("1s"),
        &extra,
    );
    let status = p.wait_exit(Duration::from_secs(60), "wrong credentials did not stop it");
    assert!(!status.success(), "wrong credentials exit non-zero");
    let log = p.log();
    let error = log
        .lines()
        .find(|l| l.contains("error: cannot connect to the Kafka brokers"))
        .unwrap_or_default();
    assert!(
        error.contains("Authentication failed") && error.contains("sasl.*"),
        "the error names the authentication failure and what to check:\n{log}"
    );
    assert!(
        !log.contains("not-the-password"),
        "the password is never logged:\n{log}"
    );
}

#[test]
fn sasl_authentication() {
    if std::env::var("KAFKA_BOOTSTRAP_SERVERS").is_ok() {
        eprintln!("KAFKA_BOOTSTRAP_SERVERS is set: this test starts its own broker with SASL");
    }
    let (broker, sasl_bootstrap) = Broker::start_sasl();
    wrong_password_fails_at_start(&broker, &sasl_bootstrap);
    sessionizes_over_sasl(&broker, &sasl_bootstrap, "PLAIN", "exactly-once");
    sessionizes_over_sasl(&broker, &sasl_bootstrap, "SCRAM-SHA-256", "at-least-once");
}
