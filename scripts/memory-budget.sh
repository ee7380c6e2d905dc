#!/usr/bin/env bash
# Peak resident memory of `sessionizer run` (at-least-once, 3 partitions) over the same
# generated input, once per memory budget given (MiB), on a broker of its own:
#
#   USERS=1000000 COUNT=3000000 scripts/memory-budget.sh 64 1024
#
# Prints, per budget: the time to take every event in, the open sessions at the end, and the
# peak and final resident set size (VmHWM, VmRSS). Needs a release build
# (`. scripts/env.sh && cargo build --release`).
set -euo pipefail
cd "$(dirname "$0")/.."
(($#)) || { echo "usage: [USERS=N COUNT=N] $0 BUDGET_MIB..." >&2; exit 2; }
command -v bc >/dev/null || { echo "needs bc" >&2; exit 1; }
. scripts/env.sh
B="$CARGO_TARGET_DIR/release/sessionizer"
[[ -x "$B" ]] || { echo "build first: cargo build --release" >&2; exit 1; }
USERS=${USERS:-1000000}
COUNT=${COUNT:-3000000}
WORK="$(mktemp -d)"
K="$WORK/kafka"
pid=""
trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null; scripts/kafka.sh stop --dir "$K" --clean >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
BS=$(scripts/kafka.sh start --dir "$K" --port "${PORT:-29900}" 2>"$WORK/kafka-start.log" | tail -1) ||
  { cat "$WORK/kafka-start.log" >&2; exit 1; }
scripts/kafka.sh topics --dir "$K" -- --create --topic mem-in --partitions 3 >/dev/null
t0=$(date +%s.%N)
"$B" generate --users "$USERS" --count "$COUNT" --topic mem-in --brokers "$BS" 2>/dev/null
echo "generated $COUNT events of $USERS users in $(echo "$(date +%s.%N) - $t0" | bc) s"
metric() {  # sum of the samples of metric $2 on port $1 (0 while nothing answers)
  { curl -s "127.0.0.1:$1/metrics" || true; } | awk -v m="$2" '$1 ~ "^"m {s+=$2} END {printf "%d\n", s}'
}
for i in $(seq "$#"); do
  budget="${!i}"
  g="mem-$i-$budget"
  for t in ann ses late dlq stats; do
    scripts/kafka.sh topics --dir "$K" -- --create --topic "$g-$t" --partitions 3 >/dev/null
  done
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$B" run --brokers "$BS" --group "$g" --guarantee at-least-once --input-topics mem-in \
    --annotated-topic "$g-ann" --sessions-topic "$g-ses" --late-topic "$g-late" \
    --dlq-topic "$g-dlq" --stats-topic "$g-stats" --state-dir "$WORK/state-$budget" \
    --metrics-addr "127.0.0.1:$port" --memory-budget-mib "$budget" >"$WORK/log-$budget" 2>&1 &
  pid=$!
  t0=$(date +%s.%N)
  deadline=$((SECONDS + 600))
  until (($(metric "$port" sessionizer_events_total) >= COUNT)); do
    ((SECONDS < deadline)) || { echo "budget $budget MiB: not done after 600 s" >&2; exit 1; }
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "budget $budget MiB: the sessionizer stopped; its log:" >&2
      tail -20 "$WORK/log-$budget" >&2
      exit 1
    fi
    sleep 0.5
  done
  secs=$(echo "$(date +%s.%N) - $t0" | bc)
  open=$(metric "$port" sessionizer_open_sessions)
  hwm=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$pid/status")
  rss=$(awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$pid/status")
  echo "budget $budget MiB: $COUNT events in $secs s; open sessions $open; peak RSS $hwm MiB, RSS at the end $rss MiB"
  kill -TERM "$pid"
  wait "$pid" || true
  pid=""
done
