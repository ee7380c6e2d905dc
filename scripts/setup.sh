#!/usr/bin/env bash
# Installs what building Sessionizer needs on a fresh Debian/Ubuntu machine: a C/C++ toolchain,
# cmake, libclang (RocksDB's bindgen) and the -dev packages librdkafka's build asks for.
# Does nothing for packages that are already there. Needs root (or sudo) only to install.
set -euo pipefail

need=()
for pkg in build-essential cmake pkg-config libclang-dev libssl-dev libsasl2-dev libcurl4-openssl-dev zlib1g-dev libzstd-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
for tool in rustfmt clippy-driver; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "setup: $tool not found; trying: rustup component add rustfmt clippy" >&2
    rustup component add rustfmt clippy
    break
  fi
done
