//! The observability endpoints end to end: a real server on 127.0.0.1:0, scraped over TCP with
//! plain HTTP/1.1 requests; the exposition text is parsed by a small parser here and checked
//! against what was counted through the typed API, and against the naming rules.

use sessionizer::engine::{ConcludedSession, EndReason, LateReason, SessionId, UserStats};
use sessionizer::http::{self, Health};
use sessionizer::metrics::{DeadLetterReason, Metrics, Outcome, OutputKind, RebalanceKind};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client.

struct HttpResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// Sends `GET path` over a fresh connection (blocking std I/O on the blocking pool, so no
/// extra tokio features are needed) and reads the response until the server closes.
async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(5);
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).expect("connect");
        stream.set_read_timeout(Some(timeout)).unwrap();
        stream.set_write_timeout(Some(timeout)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("read the response");
        raw
    })
    .await
    .unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let text = std::str::from_utf8(raw).expect("response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("no end of headers");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers: HashMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let body = match headers.get("transfer-encoding").map(String::as_str) {
        Some("chunked") => dechunk(body),
        _ => {
            if let Some(len) = headers.get("content-length") {
                assert_eq!(body.len(), len.parse::<usize>().unwrap(), "content-length");
            }
            body.to_owned()
        }
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        s = &rest[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// A small parser of the Prometheus text exposition format (0.0.4).

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Default, Debug)]
struct Exposition {
    /// Family name -> type (`counter`, `gauge`, `histogram`, ...).
    types: BTreeMap<String, String>,
    /// Family name -> help text.
    help: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                e.help.insert(name.to_owned(), help.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE line");
                e.types.insert(name.to_owned(), ty.to_owned());
            } else if line.starts_with('#') {
                continue;
            } else {
                e.samples.push(parse_sample(line));
            }
        }
        e
    }

    /// The value of the sample `name` whose labels are exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    /// The upper bounds of a histogram's buckets, in order.
    fn bucket_bounds(&self, family: &str) -> Vec<String> {
        let bucket = format!("{family}_bucket");
        self.samples
            .iter()
            .filter(|s| s.name == bucket)
            .map(|s| s.labels["le"].clone())
            .collect()
    }

    /// The family a sample belongs to (histogram samples have suffixes).
    fn family_of<'a>(&self, sample: &'a str) -> &'a str {
        if self.types.contains_key(sample) {
            return sample;
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if self.types.contains_key(base) {
                    return base;
                }
            }
        }
        panic!("sample {sample} has no TYPE line")
    }
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line.rsplit_once(' ').expect("sample value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
    };
    let (name, labels) = match series.split_once('{') {
        None => (series.to_owned(), BTreeMap::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}').expect("closing brace");
            (name.to_owned(), parse_labels(body))
        }
    };
    Sample {
        name,
        labels,
        value,
    }
}

fn parse_labels(mut s: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !s.is_empty() {
        let (name, rest) = s.split_once("=\"").expect("label name");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().expect("unterminated label value") {
                (_, '\\') => match chars.next().expect("escape") {
                    (_, 'n') => value.push('\n'),
                    (_, c) => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.to_owned(), value);
        s = rest[end + 1..].trim_start_matches(',');
    }
    labels
}

// ---------------------------------------------------------------------------------------------
// The server under test.

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), http::HttpError>>,
}

async fn start(metrics: Arc<Metrics>, health: Health) -> Server {
    let (listener, addr) = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    assert_ne!(addr.port(), 0);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(http::serve_on(listener, metrics, health, async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        task,
    }
}

impl Server {
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

fn session(reason: EndReason, length_ms: i64, events: u64) -> ConcludedSession {
    ConcludedSession {
        id: SessionId {
            key_hash: 7,
            num: 1,
        },
        key: "user-42".into(),
        user: "user-42".into(),
        start: 1_700_000_000_000,
        end: 1_700_000_000_000 + length_ms,
        event_count: events,
        end_reason: reason,
        session_number: 1,
        merged_ids: vec![],
        stats: UserStats::default(),
    }
}

/// Counts a known mix through the typed API.
fn record_some(m: &Metrics) {
    let clicks = m.topic("clicks");
    for _ in 0..5 {
        clicks.event(Outcome::Accepted);
    }
    clicks.events(Outcome::Excluded, 2);
    clicks.event(Outcome::Late(LateReason::ConcludedSession));
    m.event_in("views", Outcome::Accepted);
    m.event_in("views", Outcome::Late(LateReason::BeyondHorizon));
    m.event_in(
        "views",
        Outcome::DeadLetter(DeadLetterReason::from(
            &sessionizer::codec::DecodeError::NotAnObject,
        )),
    );
    m.event_in("views", Outcome::DeadLetter(DeadLetterReason::FUTURE_TIME));
    m.records_out(OutputKind::Annotated, 8);
    m.record_out(OutputKind::Sessions);
    m.record_out(OutputKind::DeadLetters);
    m.record_out(OutputKind::DeadLetters);
    m.sessions_opened(3);
    m.sessions_merged(1);
    m.sessions_split(1);
    m.session_concluded(&session(EndReason::Inactivity, 0, 1));
    m.session_concluded(&session(EndReason::Inactivity, 1_500, 3));
    m.session_concluded(&session(EndReason::DayBoundary, 100_000_000, 5_000));
    m.set_open_sessions(2, 11);
    m.set_watermark("clicks", 2, 1_700_000_000_000, 1_700_000_003_000);
    m.set_consumer_lag("clicks", 2, 42);
    m.observe_processing_latency(Duration::from_millis(3));
    m.observe_transaction_commit(Duration::from_millis(20));
    m.transaction_aborted();
    m.observe_commit(Duration::from_millis(2));
    m.observe_tick(Duration::from_millis(3));
    m.rebalance(RebalanceKind::Assigned);
    m.rebalance(RebalanceKind::Assigned);
    m.rebalance(RebalanceKind::Revoked);
    m.restore_records(2, 1_000);
    m.set_restoring_partitions(1);
    m.set_state_size(2, 65_536);
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn scraped_metrics_match_what_was_counted() {
    let metrics = Arc::new(Metrics::new().unwrap());
    record_some(&metrics);
    let server = start(metrics.clone(), Health::new()).await;

    let r = get(server.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/plain; version=0.0.4");
    let e = Exposition::parse(&r.body);

    let events = "sessionizer_events_total";
    assert_eq!(
        e.must(events, &[("topic", "clicks"), ("outcome", "accepted")]),
        5.0
    );
    assert_eq!(
        e.must(events, &[("topic", "clicks"), ("outcome", "excluded")]),
        2.0
    );
    assert_eq!(
        e.must(events, &[("topic", "clicks"), ("outcome", "late")]),
        1.0
    );
    assert_eq!(
        e.must(events, &[("topic", "clicks"), ("outcome", "dead_letter")]),
        0.0
    );
    assert_eq!(
        e.must(events, &[("topic", "views"), ("outcome", "dead_letter")]),
        2.0
    );
    assert_eq!(
        e.must(events, &[("topic", "views"), ("outcome", "accepted")]),
        1.0
    );
    let late = "sessionizer_late_events_total";
    assert_eq!(e.must(late, &[("reason", "concluded_session")]), 1.0);
    assert_eq!(e.must(late, &[("reason", "beyond_horizon")]), 1.0);
    let dead = "sessionizer_dead_letters_total";
    assert_eq!(e.must(dead, &[("reason", "not_an_object")]), 1.0);
    assert_eq!(e.must(dead, &[("reason", "future_time")]), 1.0);
    assert_eq!(e.must(dead, &[("reason", "invalid_json")]), 0.0);

    let out = "sessionizer_records_out_total";
    assert_eq!(e.must(out, &[("output", "annotated")]), 8.0);
    assert_eq!(e.must(out, &[("output", "sessions")]), 1.0);
    assert_eq!(e.must(out, &[("output", "dead_letters")]), 2.0);
    assert_eq!(e.must(out, &[("output", "stats")]), 0.0);

    assert_eq!(e.must("sessionizer_sessions_opened_total", &[]), 3.0);
    assert_eq!(e.must("sessionizer_sessions_merged_total", &[]), 1.0);
    assert_eq!(e.must("sessionizer_sessions_split_total", &[]), 1.0);
    let concluded = "sessionizer_sessions_concluded_total";
    assert_eq!(e.must(concluded, &[("end_reason", "inactivity")]), 2.0);
    assert_eq!(e.must(concluded, &[("end_reason", "day_boundary")]), 1.0);
    assert_eq!(e.must(concluded, &[("end_reason", "explicit_end")]), 0.0);

    // Session lengths 0 s, 1.5 s and 100000 s; event counts 1, 3 and 5000.
    let len = "sessionizer_session_length_seconds_bucket";
    assert_eq!(e.must(len, &[("le", "1")]), 1.0);
    assert_eq!(e.must(len, &[("le", "2")]), 2.0);
    assert_eq!(e.must(len, &[("le", "65536")]), 2.0);
    assert_eq!(e.must(len, &[("le", "131072")]), 3.0);
    assert_eq!(e.must(len, &[("le", "+Inf")]), 3.0);
    assert_eq!(e.must("sessionizer_session_length_seconds_count", &[]), 3.0);
    assert_eq!(
        e.must("sessionizer_session_length_seconds_sum", &[]),
        100_001.5
    );
    let per = "sessionizer_events_per_session_bucket";
    assert_eq!(e.must(per, &[("le", "1")]), 1.0);
    assert_eq!(e.must(per, &[("le", "2")]), 1.0);
    assert_eq!(e.must(per, &[("le", "4")]), 2.0);
    assert_eq!(e.must(per, &[("le", "4096")]), 2.0);
    assert_eq!(e.must(per, &[("le", "+Inf")]), 3.0);

    let tp = [("topic", "clicks"), ("partition", "2")];
    assert_eq!(
        e.must("sessionizer_open_sessions", &[("partition", "2")]),
        11.0
    );
    assert_eq!(
        e.must("sessionizer_watermark_seconds", &tp),
        1_700_000_000.0
    );
    assert_eq!(e.must("sessionizer_watermark_lag_seconds", &tp), 3.0);
    assert_eq!(e.must("sessionizer_consumer_lag_records", &tp), 42.0);
    assert_eq!(
        e.must("sessionizer_processing_latency_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        e.must(
            "sessionizer_processing_latency_seconds_bucket",
            &[("le", "0.0025")]
        ),
        0.0
    );
    assert_eq!(
        e.must(
            "sessionizer_processing_latency_seconds_bucket",
            &[("le", "0.005")]
        ),
        1.0
    );
    assert_eq!(
        e.must("sessionizer_transaction_commit_seconds_count", &[]),
        1.0
    );
    assert_eq!(e.must("sessionizer_transaction_aborts_total", &[]), 1.0);
    assert_eq!(e.must("sessionizer_commit_seconds_count", &[]), 1.0);
    assert_eq!(
        e.must("sessionizer_tick_seconds_bucket", &[("le", "0.0025")]),
        0.0
    );
    assert_eq!(
        e.must("sessionizer_tick_seconds_bucket", &[("le", "0.005")]),
        1.0
    );
    let rebalances = "sessionizer_rebalances_total";
    assert_eq!(e.must(rebalances, &[("kind", "assigned")]), 2.0);
    assert_eq!(e.must(rebalances, &[("kind", "revoked")]), 1.0);
    assert_eq!(
        e.must("sessionizer_restore_records_total", &[("partition", "2")]),
        1_000.0
    );
    assert_eq!(e.must("sessionizer_restoring_partitions", &[]), 1.0);
    assert_eq!(
        e.must("sessionizer_state_size_bytes", &[("partition", "2")]),
        65_536.0
    );
    assert_eq!(
        e.must(
            "sessionizer_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // The user id of the sessions above appears nowhere.
    assert!(!r.body.contains("user-42"));

    // Counting more shows on the next scrape.
    metrics.event_in("clicks", Outcome::Accepted);
    let e = Exposition::parse(&get(server.addr, "/metrics").await.body);
    assert_eq!(
        e.must(events, &[("topic", "clicks"), ("outcome", "accepted")]),
        6.0
    );

    server.shutdown().await;
}

#[tokio::test]
async fn histogram_buckets_are_powers_of_two() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let server = start(metrics, Health::new()).await;
    let e = Exposition::parse(&get(server.addr, "/metrics").await.body);
    for (family, max_exp) in [
        ("sessionizer_session_length_seconds", 17),
        ("sessionizer_events_per_session", 12),
    ] {
        assert_eq!(e.types[family], "histogram");
        let mut want: Vec<String> = (0..=max_exp).map(|i| (1u64 << i).to_string()).collect();
        want.push("+Inf".to_owned());
        assert_eq!(e.bucket_bounds(family), want, "{family}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn names_follow_the_rules() {
    let metrics = Arc::new(Metrics::new().unwrap());
    record_some(&metrics);
    let server = start(metrics, Health::new()).await;
    let e = Exposition::parse(&get(server.addr, "/metrics").await.body);
    assert!(e.types.len() >= 24, "{:?}", e.types.keys());
    for (name, ty) in &e.types {
        assert!(name.starts_with("sessionizer_"), "{name}");
        assert!(!e.help[name].is_empty(), "{name} has no help");
        match ty.as_str() {
            "counter" => assert!(name.ends_with("_total"), "counter {name}"),
            _ => assert!(!name.ends_with("_total"), "{ty} {name}"),
        }
    }
    for s in &e.samples {
        let family = e.family_of(&s.name);
        assert!(family.starts_with("sessionizer_"));
        for label in s.labels.keys() {
            let l = label.to_ascii_lowercase();
            assert!(
                !l.contains("user") && l != "uid" && !l.contains("customer"),
                "{} has a label {label}",
                s.name
            );
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn healthz_and_readyz() {
    let health = Health::new();
    let server = start(Arc::new(Metrics::new().unwrap()), health.clone()).await;

    let r = get(server.addr, "/healthz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.trim(), "ok");

    let r = get(server.addr, "/readyz").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("starting"), "{}", r.body);

    health.set_ready(false, "restoring 3 partitions");
    let r = get(server.addr, "/readyz").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("restoring 3 partitions"), "{}", r.body);

    health.set_ready(true, "running");
    let r = get(server.addr, "/readyz").await;
    assert_eq!(r.status, 200);

    health.set_ready(false, "shutting down");
    assert_eq!(get(server.addr, "/readyz").await.status, 503);
    // Liveness does not follow readiness.
    assert_eq!(get(server.addr, "/healthz").await.status, 200);

    assert_eq!(get(server.addr, "/nope").await.status, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn shuts_down_gracefully_and_releases_the_port() {
    let (stop, stopped) = oneshot::channel::<()>();
    let (listener, addr) = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let task = tokio::spawn(http::serve_on(
        listener,
        Arc::new(Metrics::new().unwrap()),
        Health::new(),
        async move {
            let _ = stopped.await;
        },
    ));
    assert_eq!(get(addr, "/healthz").await.status, 200);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("server did not stop")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

#[tokio::test]
async fn serve_binds_the_configured_address() {
    // `serve` binds by itself; pick a free port first, then hand it over.
    let (probe, addr) = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    drop(probe);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(http::serve(
        addr,
        Arc::new(Metrics::new().unwrap()),
        Health::new(),
        async move {
            let _ = stopped.await;
        },
    ));
    // Wait until it listens.
    let mut up = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "server never listened on {addr}");
    assert_eq!(get(addr, "/metrics").await.status, 200);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn binding_a_taken_port_is_a_typed_error() {
    let (_held, addr) = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let err = http::serve(
        addr,
        Arc::new(Metrics::new().unwrap()),
        Health::new(),
        async {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, http::HttpError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
