#!/usr/bin/env python3
"""CPU use by process while `cargo bench --bench e2e` runs: once a second, the machine's idle
share and the CPU of the broker (`kafka.Kafka`), the benchmark process and each `sessionizer
run` (named by the group prefix of its command line: bench-alo, bench-eos, bench-lat), in
percent of one core; for the at-least-once run also its busiest threads.

    python3 scripts/cpu-sample.py > cpu.txt &   # then, in the same shell:
    . scripts/env.sh && cargo bench --bench e2e; kill %1

Reads /proc only (Linux); the figures in BENCHMARKS.md's "where the time goes" come from it.
"""
import os
import time

HZ = os.sysconf("SC_CLK_TCK")


def machine():
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def ticks(stat_path):
    # utime + stime, after the parenthesised command name.
    rest = open(stat_path).read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def name_of(cmd):
    if "kafka.Kafka" in cmd:
        return "broker"
    if "sessionizer run" in cmd:
        for prefix in ("bench-alo", "bench-eos", "bench-lat"):
            if prefix in cmd:
                return prefix
        return "sessionizer"
    if "--bench" in cmd and "e2e-" in cmd:
        return "bench"
    return None


def sample():
    procs, threads = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            name = name_of(cmd)
            if name is None:
                continue
            procs[name] = procs.get(name, 0) + ticks(f"/proc/{pid}/stat")
            if name == "bench-alo":
                for tid in os.listdir(f"/proc/{pid}/task"):
                    comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                    threads[f"{tid}:{comm}"] = ticks(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue  # the process ended meanwhile
    return procs, threads


def main():
    total0, idle0 = machine()
    procs0, threads0 = sample()
    while True:
        time.sleep(1)
        total1, idle1 = machine()
        procs1, threads1 = sample()
        pct = lambda d: 100 * d / HZ
        line = f"idle {100 * (idle1 - idle0) / max(total1 - total0, 1):5.1f}%"
        line += "".join(f" {k} {pct(v - procs0.get(k, 0)):5.1f}%" for k, v in sorted(procs1.items()))
        busiest = sorted(((v - threads0.get(k, 0), k) for k, v in threads1.items()), reverse=True)
        if busiest:
            line += " | " + " ".join(f"{k.split(':', 1)[1]}={pct(d):.0f}%" for d, k in busiest[:6] if d > 0)
        print(line, flush=True)
        total0, idle0, procs0, threads0 = total1, idle1, procs1, threads1


if __name__ == "__main__":
    main()
