#!/usr/bin/env bash
# The local mesh demo: builds the release binaries and runs `ballastctl demo`.
# Arguments go to `ballastctl demo` (default: --duration 30s).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --locked
args=("$@")
((${#args[@]})) || args=(--duration 30s)
exec target/release/ballastctl demo "${args[@]}"
