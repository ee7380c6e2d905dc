#!/usr/bin/env python3
"""What a running `sessionizer run` does every 100 ms, from its /metrics: events taken, how
many of the records handed on in that slice took more than 25 and 50 ms (its own
`sessionizer_processing_latency_seconds`), commits, and the time its consumer thread spent in
time steps and commits (`sessionizer_tick_seconds`, consumption stopped). Shows whether a
latency tail comes with the commits.

    python3 scripts/latency-timeline.py PATTERN

PATTERN picks the process, as `pgrep -f` does, among those with a `--metrics-addr` (e.g.
`group bench-lat-group`, the e2e benchmark's measured latency phase; another script watching
the same pattern has none): the script waits for it, reads its `--metrics-addr` from its
command line, and prints a line per slice in which records were taken or handed on,
until the process is gone. Reads /proc (Linux).
"""
import subprocess
import sys
import time
import urllib.request

SLICE = 0.1


def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
        return []


def find(pattern):
    """The command line of the first process matching `pattern` that has a `--metrics-addr`
    (not another script watching the same pattern)."""
    while True:
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        for pid in out.split():
            cmd = cmdline(pid)
            if "--metrics-addr" in cmd:
                return cmd
        time.sleep(0.05)


def scrape(addr):
    try:
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=1).read().decode()
    except OSError:
        return None
    m = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            m[k] = float(v)
    return m


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cmd = find(sys.argv[1])
    addr = cmd[cmd.index("--metrics-addr") + 1]
    lat = "sessionizer_processing_latency_seconds"
    d = lambda m, p, k: m.get(k, 0) - p.get(k, 0)
    events = lambda m: sum(v for k, v in m.items() if k.startswith("sessionizer_events_total{"))
    prev, t0 = None, time.time()
    while True:
        m = scrape(addr)
        if m is None:
            if prev is not None:
                return
            time.sleep(0.05)
            continue
        if prev is not None:
            n = d(m, prev, f"{lat}_count")
            taken = events(m) - events(prev)
            if n or taken:
                over25 = n - d(m, prev, f'{lat}_bucket{{le="0.025"}}')
                over50 = n - d(m, prev, f'{lat}_bucket{{le="0.05"}}')
                commits = d(m, prev, "sessionizer_commit_seconds_count")
                ticks = d(m, prev, "sessionizer_tick_seconds_sum") * 1000
                print(f"{time.time() - t0:6.2f} s  taken {taken:7.0f}  handed on {n:7.0f}  "
                      f"> 25 ms {over25:6.0f}  > 50 ms {over50:6.0f}  commits {commits:.0f}  "
                      f"ticks {ticks:5.1f} ms", flush=True)
        prev = m
        time.sleep(SLICE)


if __name__ == "__main__":
    main()
