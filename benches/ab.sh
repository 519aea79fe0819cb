#!/usr/bin/env bash
# Side-by-side maximum HTTP/1.1 throughput of two sidecar binaries, for changes smaller
# than this VM's run-to-run noise (10-20%): both sidecars run at once on the same core
# (CPU 1, one at a time under load), h2load and the upstream (HAProxy returning 1 KiB)
# on CPU 0, and the rounds alternate which binary goes first, since the second of a
# pair measured a few percent faster with the same binary in both slots.
#
#   benches/ab.sh BIN_A BIN_B [ROUNDS] [SECONDS]     defaults: 8 rounds of 3 s each
#   POLICY=1 benches/ab.sh BIN_A BIN_B              with every resilience layer on
#   POLICY=B benches/ab.sh BIN BIN                  B alone has the full policy: its cost,
#                                                   paired (same binary, same minutes)
#
# Prints each round's req/s and the medians, and B/A. Both sidecars must be idle apart
# from the load, so run nothing else meanwhile. Needs haproxy, h2load, curl, taskset.
set -euo pipefail
A=$(realpath "${1:?usage: benches/ab.sh BIN_A BIN_B [ROUNDS] [SECONDS]}")
B=$(realpath "${2:?usage: benches/ab.sh BIN_A BIN_B [ROUNDS] [SECONDS]}")
ROUNDS=${3:-8}
SECONDS_EACH=${4:-3}
((ROUNDS > 0)) || { echo "ab.sh: ROUNDS must be at least 1" >&2; exit 1; }
cd "$(dirname "$0")/.."
for tool in haproxy h2load curl taskset; do
  command -v "$tool" >/dev/null || { echo "ab.sh: $tool is missing" >&2; exit 1; }
done
for bin in "$A" "$B"; do
  [ -x "$bin" ] || { echo "ab.sh: no sidecar at $bin" >&2; exit 1; }
done
DIR=target/ab
mkdir -p "$DIR"
UP=127.0.0.1:19180
# shellcheck source=benches/upstream.sh
. benches/upstream.sh
write_upstream_and_service "$DIR" "$UP"
PIDS=()
# Waits too, so a quick second run does not find this one's sidecars on its ports.
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
taskset -c 0 haproxy -db -f "$DIR/upstream.cfg" 2>"$DIR/haproxy.log" &
PIDS+=($!)
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://$UP/" && break; sleep 0.1; done
curl -sf -o /dev/null "http://$UP/" || { echo "ab.sh: the upstream HAProxy did not start: $(cat "$DIR/haproxy.log")" >&2; exit 1; }
# start BIN BASE_PORT [CONFIG]: outbound on BASE, inbound BASE+1, admin BASE+2.
start() {
  BALLAST_LOG=warn taskset -c 1 "$1" run --config "${3:-$DIR/config.yaml}" \
    --outbound-addr "127.0.0.1:$2" --inbound-addr "127.0.0.1:$(($2 + 1))" \
    --admin-addr "127.0.0.1:$(($2 + 2))" --app-addr "$UP" --workers 1 --egress-dns=false \
    >/dev/null 2>"$DIR/sidecar.$2.log" &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$(($2 + 2))/ready" && return; sleep 0.1; done
  echo "ab.sh: $1 did not get ready (see $DIR/sidecar.$2.log)" >&2
  exit 1
}
start "$A" 19190
if [ "${POLICY:-0}" = B ]; then start "$B" 19200 "$DIR/config.policy.yaml"; else start "$B" 19200; fi
# A misrouted request would still count as an answer: check both paths serve the body.
for port in 19190 19200; do
  got=$(curl -s -o "$DIR/check.$port" -w '%{http_code} %{size_download}' -H 'Host: bench' "http://127.0.0.1:$port/")
  [ "$got" = "200 1024" ] || { echo "ab.sh: through :$port got '$got', not 200 with 1024 bytes: $(head -c 300 "$DIR/check.$port")" >&2; exit 1; }
done
run() {
  local out
  out=$(taskset -c 0 h2load --h1 -D "$SECONDS_EACH" -c 32 -t 1 -H ':authority: bench' "http://127.0.0.1:$1/" 2>&1) ||
    { echo "ab.sh: h2load failed: $out" >&2; exit 1; }
  awk '/^finished in/ {print $4}' <<<"$out"
}
run 19190 >/dev/null
run 19200 >/dev/null
a=() b=()
for i in $(seq 1 "$ROUNDS"); do
  if ((i % 2)); then ra=$(run 19190); rb=$(run 19200); else rb=$(run 19200); ra=$(run 19190); fi
  a+=("$ra") b+=("$rb")
  printf 'round %d: A %s  B %s req/s\n' "$i" "$ra" "$rb"
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
ma=$(median "${a[@]}") mb=$(median "${b[@]}")
awk -v a="$ma" -v b="$mb" 'BEGIN {printf "median A %.0f  B %.0f req/s  B/A %.3f\n", a, b, b/a}'
