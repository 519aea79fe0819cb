#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (Debian
# packages, a Python virtualenv under target/), then checks formatting, runs clippy with
# -D warnings, and runs every test. Tests never skip for a missing tool: they fail.
set -euo pipefail
cd "$(dirname "$0")/.."
# A whole-suite run is one build, not an edit loop: incremental state would only add
# gigabytes under target/ (5 GB on a fresh clone) for nothing.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
# The sidecar's allocator (jemalloc, through tikv-jemalloc-sys) builds with make.
have make      || need+=(make)
have curl      || need+=(curl)
have iptables  || need+=(iptables)
have ip        || need+=(iproute2)
have setpriv   || need+=(util-linux)
have promtool  || need+=(prometheus)
have h2load    || need+=(nghttp2-client)
have nghttpd   || need+=(nghttp2-server)
have haproxy   || need+=(haproxy)
# `kubectl kustomize` renders deploy/ offline (tests/deploy.rs); Debian's kubectl package
# on this machine kind (google-cloud-sdk's) carries kustomize.
have kubectl   || need+=(kubectl)
# The etcd store backend's tests run a real etcd, at the path Debian's package uses
# (control-plane/tests/support/etcd.rs looks there, not on PATH).
[ -x /usr/bin/etcd ] || need+=(etcd-server)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "missing test tools: ${need[*]}; run as root or: apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "--- installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

venv=target/venv
if ! "$venv/bin/python" -c 'import grpc, grpc_health, websockets, jsonpatch, jsonschema, kubernetes_validate, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc' 2>/dev/null; then
  echo "--- creating the Python test virtualenv in $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
fi

echo "--- cargo fmt --check"
cargo fmt --all --check
echo "--- cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# Broken intra-doc links and stray HTML in doc comments (the protos' comments included)
# fail here, not in a reader's browser.
echo "--- cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
# With the tests in the same invocation, so that dev-dependencies' features are unified
# the same way as in the test run below: `--bins` alone resolves features without them,
# and the test run then rebuilt tokio, hyper and everything above them a second time.
echo "--- cargo build (the binaries the end-to-end tests run, and the tests)"
cargo build --workspace --bins --tests --locked
echo "--- tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --doc --locked
else
  cargo test --workspace --locked --no-fail-fast
fi
# The benchmarks' smoke pass: every scenario of the harness (with HAProxy) briefly, and
# each Criterion benchmark once. Figures come from scripts/bench.sh, not from here.
# `--workspace` resolves features as the test run did, so nothing is compiled again.
echo "--- benchmark smoke pass"
cargo test --workspace --benches --locked
