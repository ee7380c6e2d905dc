#!/usr/bin/env bash
# Builds Sessionizer and sessionizes the example events offline: concluded sessions on
# stdout, the other outputs under target-demo/. Extra arguments go to `sessionizer sessionize`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
cargo build --release --locked
out=target-demo
mkdir -p "$out"
"$CARGO_TARGET_DIR/release/sessionizer" sessionize \
  --config examples/sessionizer.toml \
  --input examples/events.jsonl \
  --annotated "$out/annotated.jsonl" \
  --late "$out/late.jsonl" \
  --dead-letters "$out/dead_letters.jsonl" \
  --stats "$out/user_stats.jsonl" \
  "$@"
echo "annotated events, late events, dead letters and user stats are in $out/" >&2
