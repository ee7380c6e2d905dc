#!/usr/bin/env python3
"""One `sessionizer run` over a pre-loaded topic, timed, outside the e2e benchmark: to compare
settings or builds run after run on one broker, and to see where the CPU goes.

    . scripts/env.sh && cargo build --release
    python3 scripts/standalone-run.py setup              # broker on 127.0.0.1:24600, 1M events
    python3 scripts/standalone-run.py run NAME at-least-once [-- EXTRA SESSIONIZER FLAGS]
    python3 scripts/standalone-run.py startup NAME COUNT    # COUNT start-ups, timed
    python3 scripts/standalone-run.py stop

`setup` starts a single-node broker in /tmp/standalone-kafka (scripts/kafka.sh, port 24600)
and loads the e2e benchmark's input: `sessionizer generate --users 10000 --count 1000000
--disorder 2s`, starting 3 days ago, into the 3-partition topic `pin`. `run` starts the
sessionizer with the benchmark's flags, a fresh group NAME, its own output topics and state
directory, and stops it once it has taken all 1,000,000 events. It prints the rate (process
start to the last event taken), the CPU per event of the process and of the broker, the
commits it made, the broker's busiest threads, and for the sessionizer's busiest threads,
between 100,000 and 1,000,000 events, the share of the time each ran, waited for a CPU
(runnable) and slept (/proc/<pid>/task/*/schedstat). Names must differ from run to run.
`startup NAME COUNT` starts the sessionizer (at-least-once) COUNT times, each with a fresh
group NAME1, NAME2..., and stops each once it has opened its three partitions: it prints,
from the timestamps of its `info` log, the milliseconds from "sessionizer starting" to
"topics checked", to "transactions initialised" and to the third "task opened". The first
start-up on a fresh broker also creates the transaction state topic.
`SESSIONIZER_BIN` runs another binary (to compare two builds). Reads /proc only (Linux).
"""
import datetime
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KAFKA = os.path.join(ROOT, "scripts", "kafka.sh")
DIR = "/tmp/standalone-kafka"
PORT = 24600
BOOTSTRAP = f"127.0.0.1:{PORT}"
EVENTS = 1_000_000
BIN = os.environ.get("SESSIONIZER_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/sessionizer/target")),
    "release",
    "sessionizer",
)
HZ = os.sysconf("SC_CLK_TCK")


def kafka(*args, quiet=True):
    out = subprocess.DEVNULL if quiet else None
    subprocess.run([KAFKA, *args], check=True, stdout=out, stderr=out)


def topic(name):
    kafka("topics", "--dir", DIR, "--", "--create", "--topic", name,
          "--partitions", "3", "--replication-factor", "1")


def cpu_ticks(pid):
    rest = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def threads(pid):
    """Per thread id: (name, run ns, runnable-wait ns, CPU ticks)."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{t}/stat").read()
            run, wait, _ = map(int, open(f"/proc/{pid}/task/{t}/schedstat").read().split())
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        out[t] = (name, run, wait, cpu_ticks(f"{pid}/task/{t}"))
    return out


def events_taken(port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except (OSError, http.client.HTTPException):
        return 0, ""
    n = sum(float(l.split()[-1]) for l in text.splitlines()
            if l.startswith("sessionizer_events_total{"))
    return n, text


def broker_pid():
    out = subprocess.run(["pgrep", "-f", f"{DIR}/node1"], capture_output=True, text=True)
    pids = out.stdout.split()
    if not pids:
        sys.exit(f"no broker of {DIR} runs: run `setup` first")
    return int(pids[0])


def setup():
    kafka("start", "--dir", DIR, "--port", str(PORT), quiet=False)
    topic("pin")
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3 * 86400))
    subprocess.run([BIN, "generate", "--users", "10000", "--count", str(EVENTS),
                    "--disorder", "2s", "--start", start, "--topic", "pin",
                    "--brokers", BOOTSTRAP], check=True)


def outputs(name):
    for o in ("annotated", "sessions", "late", "dlq", "stats"):
        topic(f"{name}-{o}")


def start(name, guarantee, extra, log="warn", stderr=None):
    """Starts the sessionizer with the benchmark's flags as group NAME (its output topics
    created by `outputs`); returns the process and its metrics port."""
    port = 25000 + os.getpid() % 1000
    p = subprocess.Popen(
        [BIN, "run", "--brokers", BOOTSTRAP, "--group", name, "--input-topics", "pin",
         "--annotated-topic", f"{name}-annotated", "--sessions-topic", f"{name}-sessions",
         "--late-topic", f"{name}-late", "--dlq-topic", f"{name}-dlq",
         "--stats-topic", f"{name}-stats", "--start-events", "app_open",
         "--end-events", "app_close",
         "--excluded-events", "push_sent,notification_shown,app_installed",
         "--allowed-lateness", "5s", "--idle-after", "2s",
         "--state-dir", f"/tmp/standalone-state-{name}",
         "--metrics-addr", f"127.0.0.1:{port}", "--guarantee", guarantee,
         "--instance-id", name, "--log-format", "json", *extra],
        env={**os.environ, "SESSIONIZER_LOG": log}, stderr=stderr)
    return p, port


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def startup(name, count):
    marks = ("topics checked", "transactions initialised", "task opened")
    for i in range(1, count + 1):
        log_path = f"/tmp/standalone-startup-{name}{i}.log"
        outputs(f"{name}{i}")
        with open(log_path, "w") as log:
            p, _ = start(f"{name}{i}", "at-least-once", [], log="info", stderr=log)
        # Per mark: the time of its latest line (for "task opened", the third) and how many
        # lines had it. The log is read as it grows; a line not yet complete waits for the
        # next read.
        at, partial = {}, ""
        try:
            deadline = time.time() + 60
            with open(log_path) as log:
                while at.get("task opened", (0, 0))[1] < 3:
                    if time.time() > deadline or p.poll() is not None:
                        sys.exit(f"start-up {i} did not open three partitions: see {log_path}")
                    time.sleep(0.02)
                    *lines, partial = (partial + log.read()).split("\n")
                    for line in lines:
                        try:
                            entry = json.loads(line)
                        except ValueError:
                            continue
                        msg = entry.get("fields", {}).get("message", "")
                        t = datetime.datetime.fromisoformat(
                            entry["timestamp"].replace("Z", "+00:00")).timestamp()
                        key = "starting" if msg == "sessionizer starting" else msg
                        if key == "starting" or key in marks:
                            at[key] = (t, at.get(key, (t, 0))[1] + 1)
        finally:
            stop(p)
        t0 = at["starting"][0]
        print(f"{name}{i}: " + ", ".join(f"{m} {1000 * (at[m][0] - t0):.0f} ms"
                                         for m in marks if m in at))


def run(name, guarantee, extra):
    outputs(name)
    bpid = broker_pid()
    b0, bt0, t0 = cpu_ticks(bpid), threads(bpid), time.time()
    p, port = start(name, guarantee, extra)
    first = None
    try:
        while True:
            n, text = events_taken(port)
            if first is None and n >= EVENTS / 10:
                first = (time.time(), threads(p.pid))
            if n >= EVENTS:
                break
            if p.poll() is not None:
                sys.exit(f"the sessionizer exited: {p.returncode}")
            time.sleep(0.02)
        t1, last = time.time(), threads(p.pid)
        client, b1, bt1 = cpu_ticks(p.pid), cpu_ticks(bpid), threads(bpid)
    finally:
        # Also when this script fails: no sessionizer is left running.
        stop(p)
    us = lambda ticks: ticks / HZ / EVENTS * 1e6
    print(f"{name} {guarantee}: {EVENTS / (t1 - t0):.0f} events/s ({t1 - t0:.2f} s); CPU per "
          f"event {us(client):.2f} µs client + {us(b1 - b0):.2f} µs broker")
    for l in text.splitlines():
        if l.startswith(("sessionizer_commit_seconds_count",
                         "sessionizer_transaction_commit_seconds_count")):
            print("  " + l)
    by_name = {}
    for t, (nm, _, _, ticks) in bt1.items():
        nm = nm.rstrip("0123456789#-")
        by_name[nm] = by_name.get(nm, 0) + ticks - bt0.get(t, (nm, 0, 0, 0))[3]
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:6]
    print("  broker threads (CPU ticks): " + ", ".join(f"{k}={v}" for k, v in top))
    window = (t1 - first[0]) * 1e9
    rows = []
    for t, (nm, run_ns, wait_ns, _) in last.items():
        _, r0, w0, _ = first[1].get(t, (nm, 0, 0, 0))
        rows.append((run_ns - r0, wait_ns - w0, nm))
    for r, w, nm in sorted(rows, reverse=True)[:5]:
        print(f"  {nm:16s} ran {r / window:6.1%}  waited for a CPU {w / window:6.1%}  "
              f"slept {1 - (r + w) / window:6.1%}")


def main():
    args = sys.argv[1:]
    if args[:1] == ["setup"]:
        setup()
    elif args[:1] == ["stop"]:
        kafka("stop", "--dir", DIR, "--clean", quiet=False)
    elif args[:1] == ["startup"] and len(args) == 3 and args[2].isdigit():
        startup(args[1], int(args[2]))
    elif args[:1] == ["run"] and len(args) >= 3:
        extra = args[4:] if args[3:4] == ["--"] else args[3:]
        run(args[1], args[2], extra)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
