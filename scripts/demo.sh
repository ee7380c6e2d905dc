#!/usr/bin/env bash
# The main job, end to end on this machine: installs missing build dependencies, builds
# Sessionizer, starts a local Apache Kafka (KRaft, 127.0.0.1:9092), creates the topics, streams
# synthetic events into it, runs `sessionizer run`, and shows concluded sessions arriving.
# Metrics: http://127.0.0.1:9464/metrics. Ctrl-C stops everything.
#   DEMO_SESSIONS=N  stop after N concluded sessions have been shown (default: run until Ctrl-C)
#   DEMO_EVENTS=N    number of synthetic events (default 50000)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
cargo build --release --locked
BIN="$CARGO_TARGET_DIR/release/sessionizer"
OUT=target-demo
mkdir -p "$OUT"
KAFKA_DIR="$PWD/$OUT/kafka"
export KAFKA_DIR

cleanup() {
  [ -n "${SZ_PID:-}" ] && kill -TERM "$SZ_PID" 2>/dev/null && wait "$SZ_PID" 2>/dev/null || true
  scripts/kafka.sh stop --dir "$KAFKA_DIR" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

BROKERS=$(scripts/kafka.sh start --dir "$KAFKA_DIR" | tail -1)
echo "demo: Kafka at $BROKERS" >&2
for t in events:3 events-sessionized:3 sessions:3 events-late:3 events-dlq:3 user-session-stats:3; do
  extra=()
  [ "${t%%:*}" = user-session-stats ] && extra=(--config cleanup.policy=compact)
  scripts/kafka.sh topics --dir "$KAFKA_DIR" -- --create --if-not-exists --topic "${t%%:*}" \
    --partitions "${t##*:}" --replication-factor 1 "${extra[@]}" >/dev/null
done

# Events of the last day, keyed by user id (the input must be partitioned by user).
START=$(date -u -d '-1 day' +%Y-%m-%dT%H:%M:%SZ)
"$BIN" generate --users 500 --count "${DEMO_EVENTS:-50000}" --start "$START" --disorder 10s --seed 1 \
  --topic events --brokers "$BROKERS"

rm -rf "$OUT/state"
"$BIN" run --config examples/sessionizer-kafka.toml --brokers "$BROKERS" \
  --state-dir "$OUT/state" --metrics-addr 127.0.0.1:9464 >"$OUT/sessionizer.log" 2>&1 &
SZ_PID=$!
echo "demo: sessionizer running (log: $OUT/sessionizer.log); metrics: http://127.0.0.1:9464/metrics" >&2
echo "demo: concluded sessions from topic 'sessions':" >&2
max=()
[ -n "${DEMO_SESSIONS:-}" ] && max=(--max-messages "$DEMO_SESSIONS")
scripts/kafka.sh tool console-consumer --dir "$KAFKA_DIR" -- --topic sessions --from-beginning --isolation-level read_committed \
  "${max[@]}" --timeout-ms 120000 2>/dev/null || true
curl -s http://127.0.0.1:9464/metrics | grep -E '^sessionizer_(events_total|sessions_concluded_total)' >&2 || true
