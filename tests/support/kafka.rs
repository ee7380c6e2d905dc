//! Helpers for tests and benchmarks against the real broker: `scripts/kafka.sh`, free ports,
//! scraping `/metrics`, processes' CPU time. Shared by `tests/kafka_e2e.rs` and `benches/e2e.rs`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};

/// Runs `scripts/kafka.sh` with `args` (from the crate root, where cargo runs tests).
pub fn kafka_sh(args: &[&str]) -> Output {
    Command::new("scripts/kafka.sh")
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .expect("run scripts/kafka.sh")
}

/// A cheap varying number (for group names and port choices), not a security-grade random.
pub fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t.wrapping_mul(2_654_435_761)
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A port P with P and P+1 free on 127.0.0.1 (a broker and its controller).
pub fn free_port_pair() -> u16 {
    for _ in 0..200 {
        // Below the ephemeral range (32768+ on Linux): a stopped broker restarted later must
        // find its ports free.
        let p = 20_000 + (std::process::id() as u16 % 3_000) * 2 + (rand_u32() % 3_000) as u16 * 2;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        {
            return p;
        }
    }
    panic!("no free port pair");
}

/// The body of `GET /metrics` on 127.0.0.1:`port` (empty while nothing listens yet).
pub fn scrape(port: u16) -> String {
    get(port, "/metrics")
}

/// The response to `GET path` on 127.0.0.1:`port`, status line and headers included (empty
/// while nothing listens).
pub fn get(port: u16, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response
}

/// Sum of the samples whose line starts with `prefix` (a name, optionally with labels).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Clock ticks per second of `/proc`'s CPU times (`getconf CLK_TCK`; 100 if that fails).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) used so far by process `pid`, from `/proc/<pid>/stat`; none
/// when it is gone.
pub fn cpu_secs(pid: u32, ticks: f64) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (in parentheses, which may hold spaces): utime and
    // stime are fields 14 and 15 of the line, 12th and 13th after the name.
    let rest = s.rfind(')').map_or("", |i| &s[i + 1..]);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    (f.len() == 2).then(|| f.iter().sum::<f64>() / ticks)
}
