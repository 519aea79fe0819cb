#!/usr/bin/env bash
# Instructions per proxied request of one sidecar binary, counted by callgrind: exact and
# repeatable where timings are not (this VM has no hardware counters and its neighbours
# make throughput vary by 10-20% between runs). Two runs of N and 3N HTTP/1.1 requests
# through the sidecar (h2load, 4 connections, 1 KiB answers from HAProxy on loopback);
# the difference divided by 2N is the cost of one request, without start-up.
#
#   benches/callgrind.sh [BIN] [N]        BIN defaults to target/release/ballast-sidecar
#   BALLAST_LOG=warn,ballast_sidecar::access=info benches/callgrind.sh   # with access log
#   POLICY=1 benches/callgrind.sh          # every resilience layer on (full-policy.yaml)
#
# Needs valgrind, haproxy, h2load and curl. The profiles stay in target/callgrind/ for
# `callgrind_annotate --inclusive=yes target/callgrind/out.3N`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/ballast-sidecar}
N=${2:-2000}
for tool in valgrind haproxy h2load curl; do
  command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is missing" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "callgrind.sh: no sidecar at $BIN (cargo build --release -p ballast-sidecar)" >&2; exit 1; }
DIR=target/callgrind
mkdir -p "$DIR"
UP=127.0.0.1:18180 OUT=127.0.0.1:18181 IN=127.0.0.1:18182 ADMIN=127.0.0.1:18183

# shellcheck source=benches/upstream.sh
. benches/upstream.sh
write_upstream_and_service "$DIR" "$UP"
haproxy -db -f "$DIR/upstream.cfg" &
HAPROXY=$!
trap 'kill $HAPROXY 2>/dev/null' EXIT

count() {
  local n=$1 out="$DIR/out.$1"
  BALLAST_LOG=${BALLAST_LOG:-warn} valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$BIN" run --config "$DIR/config.yaml" --outbound-addr $OUT --inbound-addr $IN \
    --admin-addr $ADMIN --app-addr $UP --workers 1 --egress-dns=false 2>"$DIR/sidecar.$n.log" &
  local pid=$!
  for _ in $(seq 1 300); do curl -sf -o /dev/null "http://$ADMIN/ready" && break; sleep 0.1; done
  local ok
  ok=$(h2load --h1 -n "$n" -c 4 -H ':authority: bench' "http://$OUT/" | awk '/^status codes:/ {print $3}')
  kill -INT $pid
  wait $pid || true
  [ "$ok" = "$n" ] || { echo "callgrind.sh: only $ok of $n requests answered 2xx" >&2; exit 1; }
  awk '/^totals:/ {print $2}' "$out"
}
a=$(count "$N")
b=$(count $((3 * N)))
echo "instructions per request: $(( (b - a) / (2 * N) ))  (totals $a for $N requests, $b for $((3 * N)))"
