#!/usr/bin/env bash
# The benchmarks, side by side in one run: direct, one and two Ballast sidecars, and
# HAProxy, on loopback (benches/mesh), the control plane's convergence on a real etcd
# (benches/convergence), then the Criterion micro-benchmarks (benches/hot_paths).
# Installs HAProxy and etcd when missing. Extra arguments go to the harness,
# e.g. `scripts/bench.sh --quick` or `scripts/bench.sh --protocols http1 --repeats 5`;
# `PGO=1 scripts/bench.sh ...` measures the profile-guided build.
# Tables are printed; the harness's JSON lands in target/bench/mesh.json.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "haproxy is missing; run as root or: apt-get install -y haproxy" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
fi

if [ ! -x /usr/bin/etcd ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "etcd is missing; run as root or: apt-get install -y etcd-server" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi

# PGO=1: the mesh harness measures the profile-guided build (scripts/build-pgo.sh, ~30 min
# more) instead of the plain release build; Criterion and convergence are unaffected.
if [ "${PGO:-0}" = 1 ]; then
  scripts/build-pgo.sh
  export BALLAST_SIDECAR_BIN=$PWD/target/pgo/ballast-sidecar
fi
cargo bench --locked --bench mesh -- "$@"
# The control plane: 1,000 simulated sidecars on a real etcd (test.sh installs etcd-server).
cargo bench --locked --bench convergence
if [[ " $* " != *" --quick "* ]]; then
  cargo bench --locked --bench hot_paths
fi
