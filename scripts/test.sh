#!/usr/bin/env bash
# The whole test suite: format and lint checks, then every test (unit, scenario tables,
# property tests against the batch oracle, store conformance, restart equivalence, the CLI),
# and the benchmarks run once each as smoke tests. Everything builds in release mode, once.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy (release, all targets, warnings denied)" >&2
cargo clippy --release --all-targets --locked -- -D warnings
# The log of every sessionizer process the Kafka tests start is kept here (the tests' own
# directories are deleted), so a failure that only shows up in CI can be read afterwards.
# Runs older than 14 days are pruned.
logs="$HOME/.cache/sessionizer/test-logs"
mkdir -p "$logs"
find "$logs" -mindepth 1 -maxdepth 1 -mtime +14 -exec rm -rf {} +
export E2E_KEEP_LOGS="${E2E_KEEP_LOGS:-$logs/$(date +%Y%m%d-%H%M%S)}"
echo "== cargo test (release, all targets); process logs in $E2E_KEEP_LOGS" >&2
cargo test --release --all-targets --locked
