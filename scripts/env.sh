# Sourced by the scripts: one cargo target dir outside the checkout, shared by every clone on
# this machine, so RocksDB (a ~17 minute C++ build on 2 cores) is compiled once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sessionizer/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"
