//! Security against a real Apache Kafka broker with SASL_PLAINTEXT, SSL (one listener of it
//! requiring client certificates) and SASL_SSL listeners (started by `scripts/kafka.sh start
//! --sasl --tls`), with the real `sessionizer` binary:
//! - over SASL/PLAIN (exactly-once), SASL/SCRAM-SHA-256 (at-least-once), TLS (exactly-once,
//!   the broker's certificate checked against its CA), TLS with a client certificate
//!   (at-least-once) and SASL/SCRAM-SHA-512 over TLS (exactly-once) it sessionizes as over
//!   PLAINTEXT: the same annotations and sessions as the offline run;
//! - a wrong password (over SASL_PLAINTEXT and over SASL_SSL), a CA that did not sign the
//!   broker's certificate, or no client certificate where one is required, stops it at start,
//!   non-zero, with a message that names the failure (not "unreachable brokers") and the
//!   settings to check, and without the password; before the 15 s the start-up check gives
//!   brokers that do not answer at all.
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

/// Less than the start-up check's 15 s for brokers that do not answer: a security failure
/// must end the start before that.
const FAIL_FAST: Duration = Duration::from_secs(12);

fn properties(props: &[String]) -> Vec<String> {
    props
        .iter()
        .flat_map(|p| ["--kafka-property".to_string(), p.clone()])
        .collect()
}

fn sasl(mechanism: &str, password: &str) -> Vec<String> {
    properties(&[
        "security.protocol=SASL_PLAINTEXT".to_string(),
        format!("sasl.mechanism={mechanism}"),
        format!("sasl.username={USER}"),
        format!("sasl.password={password}"),
    ])
}

fn tls(ca: &str) -> Vec<String> {
    properties(&[
        "security.protocol=SSL".to_string(),
        format!("ssl.ca.location={ca}"),
    ])
}

/// TLS with a client certificate (mutual TLS).
fn mtls(ca: &str, keystore: &str) -> Vec<String> {
    let mut p = tls(ca);
    p.extend(properties(&[
        format!("ssl.keystore.location={keystore}"),
        "ssl.keystore.password=sessionizer-tls".to_string(),
    ]));
    p
}

/// SASL over TLS: what managed Kafka services ask for.
fn sasl_ssl(mechanism: &str, password: &str, ca: &str) -> Vec<String> {
    properties(&[
        "security.protocol=SASL_SSL".to_string(),
        format!("sasl.mechanism={mechanism}"),
        format!("sasl.username={USER}"),
        format!("sasl.password={password}"),
        format!("ssl.ca.location={ca}"),
    ])
}

/// Sessionizes a small input through `bootstrap` with `security` flags and compares with the
/// offline run.
fn sessionizes(broker: &Broker, name: &str, bootstrap: &str, security: &[String], guarantee: &str) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("sec-{name}");
    let t = Topics::new(broker, &prefix, 2);
    let input = with_flush_events(2, events(20, 30, 3));
    let (want_sessions, want_annotated) = offline(&input, dir.path());
    broker.produce(&t.input, &to_user_partitions(&input, 2));
    let mut extra = security.to_vec();
    extra.extend(["--guarantee".to_string(), guarantee.to_string()]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let p = run_on(
        bootstrap,
        &t,
        dir.path(),
        &format!("{prefix}-group"),
        free_port(),
        &semantics("100h"),
        &extra,
    );
    annotated_like_offline(broker, &t, input.len(), want_annotated, &want_sessions, p);
}

/// Security settings the broker refuses: the start fails, non-zero, soon, saying why.
fn refused(broker: &Broker, name: &str, bootstrap: &str, security: &[String], why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::new(broker, &format!("sec-{name}"), 1);
    let extra: Vec<&str> = security.iter().map(String::as_str).collect();
    let mut p = run_on(
        bootstrap,
        &t,
        dir.path(),
        &format!("sec-{name}-group"),
        free_port(),
        &semantics("1s"),
        &extra,
    );
    let status = p.wait_exit(
        FAIL_FAST,
        &format!("{name}: not stopped before {FAIL_FAST:?}"),
    );
    assert!(!status.success(), "{name}: exits non-zero");
    let log = p.log();
    let error = log
        .lines()
        .find(|l| l.contains("error: cannot connect to the Kafka brokers"))
        .unwrap_or_default();
    assert!(
        error.contains(why) && error.contains("sasl.*"),
        "{name}: the error names the failure ({why}) and what to check:\n{log}"
    );
    assert!(
        !log.contains("not-the-password"),
        "{name}: the password is never logged:\n{log}"
    );
}

#[test]
fn sasl_and_tls() {
    if std::env::var("KAFKA_BOOTSTRAP_SERVERS").is_ok() {
        eprintln!(
            "KAFKA_BOOTSTRAP_SERVERS is set: this test starts its own broker with SASL and TLS"
        );
    }
    let (broker, secure) = Broker::start_secure();
    let ca = secure.ca.to_str().unwrap();
    refused(
        &broker,
        "wrong-password",
        &secure.sasl,
        &sasl("PLAIN", "not-the-password"),
        "Authentication failed",
    );
    refused(
        &broker,
        "wrong-password-tls",
        &secure.sasl_ssl,
        &sasl_ssl("SCRAM-SHA-512", "not-the-password", ca),
        "Authentication failed",
    );
    // The broker's own certificate as the only trusted one: not the CA that signed it.
    let not_the_ca = secure.ca.with_file_name("broker.crt");
    refused(
        &broker,
        "wrong-ca",
        &secure.tls,
        &tls(not_the_ca.to_str().unwrap()),
        "SSL handshake failed",
    );
    sessionizes(
        &broker,
        "plain",
        &secure.sasl,
        &sasl("PLAIN", PASSWORD),
        "exactly-once",
    );
    sessionizes(
        &broker,
        "scram",
        &secure.sasl,
        &sasl("SCRAM-SHA-256", PASSWORD),
        "at-least-once",
    );
    refused(
        &broker,
        "no-client-certificate",
        &secure.mtls,
        &tls(ca),
        "alert bad certificate",
    );
    sessionizes(&broker, "tls", &secure.tls, &tls(ca), "exactly-once");
    let keystore = secure.client_keystore.to_str().unwrap();
    sessionizes(
        &broker,
        "mtls",
        &secure.mtls,
        &mtls(ca, keystore),
        "at-least-once",
    );
    sessionizes(
        &broker,
        "sasl-ssl",
        &secure.sasl_ssl,
        &sasl_ssl("SCRAM-SHA-512", PASSWORD, ca),
        "exactly-once",
    );
}
