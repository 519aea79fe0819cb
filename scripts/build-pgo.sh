#!/usr/bin/env bash
# A profile-guided release build of the sidecar, the one the proxy image ships
# (deploy/Dockerfile runs this script in its builder; see README "Benchmarks").
#
#   scripts/build-pgo.sh            -> target/pgo/ballast-sidecar
#
# Three steps: build the sidecar with LLVM's instrumentation, run it through the benchmark
# harness's quick pass (every setup and protocol: HTTP/1.1, HTTP/2, gRPC, TCP, one and two
# sidecars, the full resilience policy, access log, tracing, mesh mTLS and handshakes),
# then build it again with the counts. The counts tell LLVM which branches are taken and
# which code is cold, so it lays out and inlines the request path for what it does.
# Why: after sessions 9-14 the bare request was down to ~29,600 instructions against
# HAProxy's ~26,600, most of the rest inside hyper and tokio; PGO is how rustc, Clang and
# Firefox ship too (benches/README.md, session 15, has the figures).
#
# Training on the harness and then measuring with it flatters a little: the same loads
# taught the layout. The training covers every path the harness measures, not only the
# headline one, so no measured path is laid out as cold.
#
# Needs llvm-profdata for rustc's LLVM (rustup's llvm-tools component, added when
# missing, else Debian's llvm-N) and what the harness needs (haproxy; no etcd).
# Takes two release builds and the pass: 33 minutes here while CI ran beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$PWD/target/pgo
HOST=$(rustc -vV | awk '/^host:/ {print $2}')
# llvm-profdata must read what rustc's LLVM writes: rustup's llvm-tools component (the
# same LLVM build), added when missing; else Debian's llvm-N of the same major version.
LLVM=$(rustc -vV | awk '/^LLVM version:/ {split($3, v, "."); print v[1]}')
TOOLS="$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata"
if [ -n "${LLVM_PROFDATA:-}" ]; then
  PROFDATA=$LLVM_PROFDATA
elif [ -x "$TOOLS" ] || { rustup component add llvm-tools >/dev/null 2>&1 && [ -x "$TOOLS" ]; }; then
  PROFDATA=$TOOLS
else
  PROFDATA=llvm-profdata-$LLVM
  if ! command -v "$PROFDATA" >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
      echo "build-pgo.sh: no llvm-profdata for LLVM $LLVM: rustup component add llvm-tools, or apt-get install -y llvm-$LLVM" >&2
      exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$LLVM" >/dev/null
  fi
fi
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] \
  || { echo "build-pgo.sh: haproxy is missing (the harness compares against it): apt-get install -y haproxy" >&2; exit 1; }

# A profile path or flags from the environment would send the counts elsewhere or
# replace ours (CARGO_ENCODED_RUSTFLAGS wins over RUSTFLAGS).
unset LLVM_PROFILE_FILE CARGO_ENCODED_RUSTFLAGS
# The optimised build starts from scratch: cargo does not see a changed .profdata behind
# unchanged flags for registry crates (hyper, tokio), which would keep an old profile.
rm -rf "$OUT/profiles" "$OUT/merged.profdata" "$OUT/optimised"
mkdir -p "$OUT/profiles"
# --target keeps RUSTFLAGS off build scripts and proc macros; separate target dirs keep
# the instrumented and the final build from invalidating each other or target/release.
echo "build-pgo.sh: 1/3 instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$OUT/profiles" cargo build --release --locked -q -p ballast-sidecar \
  --bin ballast-sidecar --target "$HOST" --target-dir "$OUT/instrumented"

echo "build-pgo.sh: 2/3 training: the benchmark harness's quick pass" >&2
BALLAST_SIDECAR_BIN="$OUT/instrumented/$HOST/release/ballast-sidecar" \
  cargo bench --locked -q --bench mesh -- --quick --json "$OUT/training.json" >"$OUT/training.log" \
  || { echo "build-pgo.sh: the training pass failed; its tables are in $OUT/training.log" >&2; exit 1; }
# Sidecars write their counts when they exit on the harness's SIGTERM.
compgen -G "$OUT/profiles/*.profraw" >/dev/null \
  || { echo "build-pgo.sh: the training wrote no profile to $OUT/profiles (were the sidecars killed rather than stopped?)" >&2; exit 1; }
"$PROFDATA" merge -o "$OUT/merged.profdata" "$OUT/profiles"

echo "build-pgo.sh: 3/3 optimised build" >&2
RUSTFLAGS="-Cprofile-use=$OUT/merged.profdata" cargo build --release --locked -q -p ballast-sidecar \
  --bin ballast-sidecar --target "$HOST" --target-dir "$OUT/optimised"
cp "$OUT/optimised/$HOST/release/ballast-sidecar" "$OUT/ballast-sidecar"
echo "build-pgo.sh: $OUT/ballast-sidecar" >&2
