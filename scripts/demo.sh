#!/usr/bin/env bash
# The local mesh demo: builds the release binaries and runs `ballastctl demo`.
# Arguments go to `ballastctl demo` (default: --duration 30s).
set -euo pipefail
cd "$(dirname "$0")/.."
# The sidecar's allocator (jemalloc, through tikv-jemalloc-sys) builds with make and a C
# compiler; say so rather than fail deep in a build script.
for tool in make cc; do
  command -v "$tool" >/dev/null || { echo "demo: building Ballast needs $tool (Debian: apt-get install -y build-essential)" >&2; exit 1; }
done
cargo build --release --workspace --bins --locked
args=("$@")
((${#args[@]})) || args=(--duration 30s)
exec target/release/ballastctl demo "${args[@]}"
