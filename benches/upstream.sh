# Sourced by benches/callgrind.sh and benches/ab.sh: writes, into directory $1, the one
# upstream both use (HAProxy, one thread, answering every request with 200 and 1 KiB of
# text on $2) and the sidecar configuration naming it as service `bench`:
# $1/upstream.cfg and $1/config.yaml. With POLICY=1 in the environment, the service also
# gets the benchmarks' full policy (benches/full-policy.yaml: every resilience layer on);
# $1/config.policy.yaml always has it.
write_upstream_and_service() {
  local dir=$1 up=$2 body
  body=$(printf 'x%.0s' $(seq 1 1024))
  cat >"$dir/upstream.cfg" <<CFG
global
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend up
    bind $up
    http-request return status 200 content-type text/plain string "$body"
CFG
  cat >"$dir/config.yaml" <<CFG
apiVersion: ballast.io/v1alpha1
kind: Service
metadata: {name: bench}
spec:
  endpoints: [{address: "$up"}]
CFG
  # The same service with the full policy, for POLICY=1 (and ab.sh's POLICY=B).
  { cat "$dir/config.yaml"; echo ---; sed 's/service: bench-policy}/service: bench}/' benches/full-policy.yaml; } >"$dir/config.policy.yaml"
  grep -q 'service: bench}' "$dir/config.policy.yaml" || { echo "upstream.sh: full-policy.yaml no longer targets bench-policy" >&2; return 1; }
  if [ "${POLICY:-0}" = 1 ]; then
    cp "$dir/config.policy.yaml" "$dir/config.yaml"
  fi
}
