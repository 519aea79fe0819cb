//! Ballast side by side with direct traffic and HAProxy, in one run, on loopback.
//!
//! `scripts/bench.sh` (or `cargo bench --bench mesh`) runs every scenario and prints the
//! tables, then writes them to `target/bench/mesh.json`. Under `cargo test --benches` the
//! same code runs a short smoke pass that fails on any error, so the harness cannot rot.
//!
//! Set-ups, all in front of the same upstream (`upstream.rs`, in this process):
//! * `direct`: client → upstream.
//! * `ballast x1`: client → sidecar (outbound) → upstream: one hop, the client side.
//! * `ballast x1 +policy`: the same sidecar, to a service whose policy turns on every
//!   resilience layer (retries, timeouts, breaker, bulkhead, rate limit, outliers).
//! * `ballast x2`: client → client sidecar → server sidecar (inbound) → upstream, the
//!   path of a request in a mesh, in plain text (static configuration).
//! * `ballast x2 trace 1%`, `ballast x2 trace 100%`: `ballast x2` again (a pair of its
//!   own, started the same way), both sidecars exporting spans with OTLP HTTP/protobuf
//!   to an in-process sink (`otlp_sink.rs`), sampling 1% and 100% of new traces
//!   (`parentbased_traceidratio`; the server sidecar follows the client's decision).
//!   After each run the spans the sidecars exported and dropped (queue full) are read
//!   from their `/metrics` and checked against what the sink received.
//! * `ballast x2 access log`: `ballast x2` with the access log on
//!   (`BALLAST_LOG=warn,ballast_sidecar::access=info`, as in production), written to a
//!   file; no tracing.
//! * `ballast x2 mTLS`: the same path between two sidecars with workload identity: an
//!   in-process control plane (`identity.rs`) issues their certificates and pushes the
//!   server sidecar's registration, and the client sidecar reaches it over mutual TLS
//!   (TLS 1.3, HTTP/2 inside the tunnel, whatever the client spoke). Besides the load
//!   scenarios, new mesh TLS connections to the server sidecar are timed, full and
//!   resumed (`handshake.rs`).
//! * `haproxy`: client → HAProxy (one thread, keep-alive both sides) → upstream.
//! * `relay`: client → a bare epoll byte relay (`relay.rs`) → upstream: the floor, what
//!   any process in the path costs on this machine before it does any HTTP.
//!
//! Placement: the load generator and the upstream run on the first CPU, every proxy on
//! the second (`--workers 1` for Ballast, `nbthread 1` for HAProxy), so a proxy's CPU
//! time and its single-core ceiling are its own. On a 2-core machine the load generator
//! shares its core with the upstream, so "max throughput" can be bound by the client
//! side; the table therefore also shows the proxy's CPU use and requests per
//! proxy-CPU-second, which compare proxies whatever the bound.
//!
//! Options (after `--`): `--quick` (1 run, short phases), `--repeats N`,
//! `--protocols http1,http2,grpc`,
//! `--setups direct,ballast-x1,ballast-x1-policy,ballast-x2,ballast-x2-trace1,ballast-x2-trace100,`
//! `ballast-x2-accesslog,ballast-x2-mtls,haproxy,relay`,
//! `--modes fixed,max`, `--rates 1000,10000`, `--seconds S`, `--no-tcp`, `--no-handshakes`,
//! `--json PATH`.
//! To profile a proxy: `perf record -g -C 1` (the proxy CPU) while a filtered run goes.

mod handshake;
mod identity;
mod loadgen;
mod otlp_sink;
mod procs;
mod relay;
mod report;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use loadgen::{Outcome, Proto, Target};
use procs::Proxy;
use report::{Spread, table};

/// The mesh service the load names through Ballast.
const SERVICE: &str = "bench";
/// The same upstream behind a policy with every resilience layer on.
const SERVICE_WITH_POLICY: &str = "bench-policy";
/// The namespace of the mTLS pair (and the identities of the handshake runs).
const MTLS_NAMESPACE: &str = "bench";
/// The server sidecar's count of accepted mesh TLS handshakes.
const TLS_OK: &str = r#"ballast_mesh_tls_handshakes_total{direction="inbound",result="ok"}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
enum Setup {
    #[serde(rename = "direct")]
    Direct,
    #[serde(rename = "ballast-x1")]
    Ballast1,
    #[serde(rename = "ballast-x1-policy")]
    Ballast1Policy,
    #[serde(rename = "ballast-x2")]
    Ballast2,
    #[serde(rename = "ballast-x2-trace1")]
    Ballast2Trace1,
    #[serde(rename = "ballast-x2-trace100")]
    Ballast2Trace100,
    #[serde(rename = "ballast-x2-accesslog")]
    Ballast2AccessLog,
    #[serde(rename = "ballast-x2-mtls")]
    Ballast2Mtls,
    #[serde(rename = "haproxy")]
    Haproxy,
    #[serde(rename = "relay")]
    Relay,
}

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::Ballast1 => "ballast x1",
            Setup::Ballast1Policy => "ballast x1 +policy",
            Setup::Ballast2 => "ballast x2 (mesh)",
            Setup::Ballast2Trace1 => "ballast x2 trace 1%",
            Setup::Ballast2Trace100 => "ballast x2 trace 100%",
            Setup::Ballast2AccessLog => "ballast x2 access log",
            Setup::Ballast2Mtls => "ballast x2 mTLS",
            Setup::Haproxy => "haproxy",
            Setup::Relay => "relay (floor)",
        }
    }

    /// Every set-up, in the order of the tables.
    const ALL: [Setup; 10] = [
        Setup::Direct,
        Setup::Ballast1,
        Setup::Ballast1Policy,
        Setup::Ballast2,
        Setup::Ballast2Trace1,
        Setup::Ballast2Trace100,
        Setup::Ballast2AccessLog,
        Setup::Ballast2Mtls,
        Setup::Haproxy,
        Setup::Relay,
    ];

    /// `ballast x2` with one more feature on: compared to the plain pair as well.
    fn vs_plain_x2(self) -> bool {
        self == Setup::Ballast2Mtls || self.telemetry()
    }

    /// `ballast x2` with spans or the access log on.
    fn telemetry(self) -> bool {
        matches!(self, Setup::Ballast2Trace1 | Setup::Ballast2Trace100 | Setup::Ballast2AccessLog)
    }

    /// `OTEL_TRACES_SAMPLER_ARG` of the tracing set-ups.
    fn trace_ratio(self) -> Option<&'static str> {
        match self {
            Setup::Ballast2Trace1 => Some("0.01"),
            Setup::Ballast2Trace100 => Some("1"),
            _ => None,
        }
    }
}

/// Spans per request at 100% sampling: the client sidecar's client span and one per
/// attempt (no retries here), the server sidecar's server span.
const SPANS_PER_REQUEST: u64 = 3;
/// The tracing sidecars' span counters (`/metrics`).
const SPANS_EXPORTED: &str = "ballast_trace_spans_exported_total";
const SPANS_QUEUE_FULL: &str = r#"ballast_trace_spans_dropped_total{reason="queue_full"}"#;
const SPANS_EXPORT_FAILED: &str = r#"ballast_trace_spans_dropped_total{reason="export_failed"}"#;
/// The access log on, the rest of the log as in the other set-ups.
const ACCESS_LOG_FILTER: &str = "warn,ballast_sidecar::access=info";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Mode {
    #[serde(rename = "fixed")]
    Fixed(u32),
    #[serde(rename = "max")]
    Max,
}

struct Options {
    smoke: bool,
    repeats: usize,
    protocols: Vec<Proto>,
    tcp: bool,
    /// Time new mesh TLS connections (`--no-handshakes` skips it).
    handshakes: bool,
    handshakes_for: Duration,
    rates: Vec<u32>,
    fixed_for: Duration,
    max_for: Duration,
    tcp_for: Duration,
    connections: usize,
    h2_depth: usize,
    idle_connections: usize,
    json: PathBuf,
    /// Only these set-ups (`--setups direct,ballast-x1,...`); all when empty.
    setups: Vec<Setup>,
    /// Only fixed-rate (`--modes fixed`) or maximum (`--modes max`) runs; both when empty.
    modes: Vec<String>,
}

impl Options {
    fn parse() -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        // `cargo bench` passes --bench; `cargo test --benches` does not.
        let smoke = !args.iter().any(|a| a == "--bench");
        let quick = args.iter().any(|a| a == "--quick");
        let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
        let target = PathBuf::from(
            std::env::var("CARGO_TARGET_DIR")
                .unwrap_or_else(|_| format!("{}/target", env!("CARGO_MANIFEST_DIR"))),
        );
        let mut o = Options {
            smoke,
            repeats: 3,
            protocols: vec![Proto::Http1, Proto::Http2, Proto::Grpc],
            tcp: true,
            handshakes: true,
            handshakes_for: Duration::from_secs(3),
            rates: vec![1_000, 10_000],
            fixed_for: Duration::from_secs(10),
            max_for: Duration::from_secs(5),
            tcp_for: Duration::from_secs(3),
            connections: 32,
            h2_depth: 4,
            idle_connections: 1_000,
            json: target.join("bench").join(if smoke { "mesh-smoke.json" } else { "mesh.json" }),
            setups: Vec::new(),
            modes: Vec::new(),
        };
        if quick {
            o.repeats = 1;
            o.fixed_for = Duration::from_secs(3);
            o.max_for = Duration::from_secs(3);
            o.tcp_for = Duration::from_secs(2);
            o.handshakes_for = Duration::from_secs(2);
        }
        if smoke {
            o.repeats = 1;
            o.rates = vec![200];
            o.fixed_for = Duration::from_millis(500);
            o.max_for = Duration::from_millis(500);
            o.tcp_for = Duration::from_millis(300);
            o.handshakes_for = Duration::from_millis(300);
            o.connections = 8;
            o.idle_connections = 50;
        }
        if let Some(n) = value("--repeats").and_then(|v| v.parse().ok()) {
            o.repeats = n;
        }
        if let Some(p) = value("--protocols") {
            o.protocols = p
                .split(',')
                .filter_map(|s| match s {
                    "http1" => Some(Proto::Http1),
                    "http2" => Some(Proto::Http2),
                    "grpc" => Some(Proto::Grpc),
                    _ => None,
                })
                .collect();
        }
        if let Some(v) = value("--setups") {
            o.setups = v
                .split(',')
                .filter_map(|s| serde_json::from_value::<Setup>(serde_json::Value::String(s.to_owned())).ok())
                .collect();
        }
        if let Some(v) = value("--modes") {
            o.modes = v.split(',').map(str::to_owned).collect();
        }
        if let Some(r) = value("--rates") {
            o.rates = r.split(',').filter_map(|v| v.parse().ok()).collect();
        }
        if let Some(d) = value("--seconds").and_then(|v| v.parse::<f64>().ok()) {
            o.fixed_for = Duration::from_secs_f64(d);
            o.max_for = Duration::from_secs_f64(d);
        }
        if args.iter().any(|a| a == "--no-tcp") {
            o.tcp = false;
        }
        if args.iter().any(|a| a == "--no-handshakes") {
            o.handshakes = false;
        }
        if let Some(j) = value("--json") {
            o.json = PathBuf::from(j);
        }
        o
    }
}

/// One measured run.
#[derive(Serialize)]
struct Run {
    proto: Proto,
    mode: Mode,
    setup: Setup,
    repeat: usize,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// CPU seconds of the proxy processes (both sidecars for x2).
    proxy_cpu_seconds: f64,
    /// Of which in user space (the rest is the kernel: syscalls and loopback delivery).
    proxy_user_seconds: f64,
    /// Number of proxy processes the request crossed.
    proxies: usize,
    /// The tracing set-ups: spans exported and dropped over the run (warm-up included).
    #[serde(skip_serializing_if = "Option::is_none")]
    spans: Option<Spans>,
    /// `ballast x2 access log`: what both sidecars logged over the run (warm-up included).
    #[serde(skip_serializing_if = "Option::is_none")]
    access_log: Option<AccessLog>,
}

/// One sidecar's span counters, or their growth over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
struct SpanCounters {
    exported: u64,
    dropped_queue_full: u64,
    dropped_export_failed: u64,
}

impl SpanCounters {
    fn read(admin: SocketAddr) -> Result<Self, String> {
        let get = |sample: &str| procs::metric(admin, sample).map(|v| v as u64);
        Ok(Self {
            exported: get(SPANS_EXPORTED)
                .ok_or_else(|| format!("no {SPANS_EXPORTED} on {admin}/metrics: is tracing on?"))?,
            // A label value appears once counted.
            dropped_queue_full: get(SPANS_QUEUE_FULL).unwrap_or(0),
            dropped_export_failed: get(SPANS_EXPORT_FAILED).unwrap_or(0),
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            exported: self.exported - before.exported,
            dropped_queue_full: self.dropped_queue_full - before.dropped_queue_full,
            dropped_export_failed: self.dropped_export_failed - before.dropped_export_failed,
        }
    }

    fn total(self) -> u64 {
        self.exported + self.dropped_queue_full + self.dropped_export_failed
    }
}

/// The spans of one run of a tracing set-up, once the sidecars' queues were drained.
#[derive(Debug, Clone, Copy, Serialize)]
struct Spans {
    /// `OTEL_TRACES_SAMPLER_ARG`.
    ratio: f64,
    /// Requests sent, warm-up included: their spans are counted too.
    requests: u64,
    /// Client + attempt spans.
    client: SpanCounters,
    /// Server spans.
    server: SpanCounters,
    /// What the OTLP sink received meanwhile (it should be `exported`).
    sink: otlp_sink::Received,
}

impl Spans {
    fn exported(&self) -> u64 {
        self.client.exported + self.server.exported
    }
    fn queue_full(&self) -> u64 {
        self.client.dropped_queue_full + self.server.dropped_queue_full
    }
    fn export_failed(&self) -> u64 {
        self.client.dropped_export_failed + self.server.dropped_export_failed
    }
    fn total(&self) -> u64 {
        self.client.total() + self.server.total()
    }
}

/// What the access log wrote during one run.
#[derive(Debug, Clone, Copy, Serialize)]
struct AccessLog {
    /// Requests sent, warm-up included.
    requests: u64,
    /// Lines and bytes on both sidecars' stderr (a file).
    lines: u64,
    bytes: u64,
}

impl Run {
    fn cpu_per_1k_per_proxy(&self) -> f64 {
        if self.proxies == 0 || self.ok == 0 {
            return f64::NAN;
        }
        self.proxy_cpu_seconds / self.ok as f64 * 1000.0 / self.proxies as f64
    }
    fn user_share(&self) -> f64 {
        self.proxy_user_seconds / self.proxy_cpu_seconds
    }
    fn proxy_core_use(&self) -> f64 {
        self.proxy_cpu_seconds / self.seconds
    }
    fn per_proxy_cpu_second(&self) -> f64 {
        if self.proxies == 0 { f64::NAN } else { self.ok as f64 / self.proxy_cpu_seconds }
    }
}

/// Two sidecars as `ballast x2` has them: client sidecar → server sidecar (inbound) →
/// upstream, static configuration, plain text.
struct Pair {
    client: Proxy,
    client_addrs: procs::SidecarAddrs,
    server: Proxy,
    server_addrs: procs::SidecarAddrs,
}

impl Pair {
    /// `name-server` and `name-client`, both with `env` added to their environment.
    fn start(
        bin: &std::path::Path,
        name: &str,
        app: SocketAddr,
        cpu: usize,
        env: &[(&str, String)],
    ) -> Result<Self, String> {
        let (server, server_addrs) = Proxy::sidecar(bin, &format!("{name}-server"), "", app, cpu, env)?;
        let (client, client_addrs) = Proxy::sidecar(
            bin,
            &format!("{name}-client"),
            &service_yaml(SERVICE, server_addrs.inbound),
            app,
            cpu,
            env,
        )?;
        Ok(Self { client, client_addrs, server, server_addrs })
    }

    fn span_counters(&self) -> Result<(SpanCounters, SpanCounters), String> {
        Ok((SpanCounters::read(self.client_addrs.admin)?, SpanCounters::read(self.server_addrs.admin)?))
    }
}

/// The environment of the tracing sidecars: OTLP HTTP/protobuf to `endpoint`, new traces
/// sampled at `ratio`, the batch processor's defaults (queue 2,048 spans, batches of 512)
/// except the schedule delay, 1 s instead of 5 s (100 ms in the smoke pass), so that a
/// run's last spans are out soon after it.
fn trace_env(endpoint: &str, ratio: &str, schedule_delay: Duration) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()),
        ("OTEL_TRACES_SAMPLER_ARG", ratio.into()),
        ("OTEL_BSP_SCHEDULE_DELAY", schedule_delay.as_millis().to_string()),
    ]
}

/// The proxies of one bench, started once and used by every scenario.
struct Bed {
    up: upstream::Upstream,
    b1: Proxy,
    b1_addrs: procs::SidecarAddrs,
    b2: Pair,
    /// `ballast x2` pairs with one telemetry feature on: spans at 1% and 100%, the
    /// access log; the collector of their spans.
    t1: Pair,
    t100: Pair,
    alog: Pair,
    otlp: otlp_sink::OtlpSink,
    /// What each pair above had added to its environment (for the JSON).
    env: BTreeMap<Setup, BTreeMap<String, String>>,
    /// The tracing sidecars' `OTEL_BSP_SCHEDULE_DELAY`.
    schedule_delay: Duration,
    /// The mTLS pair's control plane; the client identity of the handshake runs.
    ca: identity::MeshCa,
    m2_client: Proxy,
    m2_client_addrs: procs::SidecarAddrs,
    m2_server: Proxy,
    m2_server_addrs: procs::SidecarAddrs,
    /// A third meshed sidecar, in front of the TCP sink (service `sink`), for the
    /// opaque stream over mTLS; the client is `m2_client`.
    m2_sink: Proxy,
    m2_sink_admin: SocketAddr,
    haproxy: Proxy,
    /// The bare byte relay in front of the upstream's HTTP port (every protocol).
    relay: Proxy,
    relay_addr: SocketAddr,
    ha_h1: SocketAddr,
    ha_h2: SocketAddr,
    ha_tcp: SocketAddr,
}

fn service_yaml(name: &str, endpoint: SocketAddr) -> String {
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{{address: \"{endpoint}\"}}]\n---\n"
    )
}

/// Every layer on, none of them in the way; shared with the Criterion benchmarks.
const FULL_POLICY: &str = include_str!("../full-policy.yaml");

fn haproxy_config(up: &upstream::Upstream, h1: SocketAddr, h2: SocketAddr, tcp: SocketAddr) -> String {
    format!(
        "global
    nbthread 1
    # Each connection takes two descriptors (client and server side).
    maxconn 9000
defaults
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend fe_h1
    mode http
    bind {h1}
    default_backend be_h1
frontend fe_h2
    mode http
    bind {h2} proto h2
    default_backend be_h2
frontend fe_tcp
    mode tcp
    bind {tcp}
    default_backend be_tcp
backend be_h1
    mode http
    http-reuse always
    server up {http}
backend be_h2
    mode http
    http-reuse always
    server up {http} proto h2
backend be_tcp
    mode tcp
    server sink {sink}
",
        http = up.http,
        sink = up.tcp
    )
}

/// The flags that register a meshed sidecar as an endpoint of `service`.
fn registered(service: &str) -> [&str; 4] {
    ["--service", service, "--advertise-addr", "{inbound}"]
}

fn sidecar_binary(smoke: bool) -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("BALLAST_SIDECAR_BIN") {
        return Ok(PathBuf::from(p));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q", "-p", "ballast-sidecar", "--bin", "ballast-sidecar"]);
    if !smoke {
        cmd.arg("--release");
    }
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building ballast-sidecar failed".into());
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| format!("{}/target", env!("CARGO_MANIFEST_DIR")));
    Ok(PathBuf::from(target).join(if smoke { "debug" } else { "release" }).join("ballast-sidecar"))
}

impl Bed {
    fn start(bin: &std::path::Path, proxy_cpu: usize, smoke: bool) -> Result<Self, String> {
        let up = upstream::Upstream::start().map_err(|e| format!("upstream: {e}"))?;
        let b1_config = format!(
            "{}{}{FULL_POLICY}",
            service_yaml(SERVICE, up.http),
            service_yaml(SERVICE_WITH_POLICY, up.http)
        );
        let (b1, b1_addrs) = Proxy::sidecar(bin, "ballast-x1", &b1_config, up.http, proxy_cpu, &[])?;
        let otlp = otlp_sink::OtlpSink::start().map_err(|e| format!("OTLP sink: {e}"))?;
        let schedule_delay = Duration::from_millis(if smoke { 100 } else { 1000 });
        // The same pair each time, with its setting added.
        let mut env = BTreeMap::new();
        let mut pair = |setup: Setup, name: &str| {
            let vars = match setup.trace_ratio() {
                Some(ratio) => trace_env(&otlp.endpoint(), ratio, schedule_delay),
                None if setup == Setup::Ballast2AccessLog => vec![("BALLAST_LOG", ACCESS_LOG_FILTER.into())],
                None => Vec::new(),
            };
            env.insert(setup, vars.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect());
            Pair::start(bin, name, up.http, proxy_cpu, &vars)
        };
        let b2 = pair(Setup::Ballast2, "ballast-x2")?;
        let t1 = pair(Setup::Ballast2Trace1, "ballast-x2-trace1")?;
        let t100 = pair(Setup::Ballast2Trace100, "ballast-x2-trace100")?;
        let alog = pair(Setup::Ballast2AccessLog, "ballast-x2-accesslog")?;
        let ca = identity::MeshCa::start()?;
        let meshed = |name: &str, account: &str, extra: &[&str], app: SocketAddr| {
            let mut args = ca.sidecar_args(MTLS_NAMESPACE, name, account)?;
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            let url = ca.url();
            Proxy::sidecar_from(
                bin,
                name,
                procs::Source::ControlPlane { url: &url, args: &args },
                app,
                proxy_cpu,
                &[],
            )
        };
        let (m2_server, m2_server_addrs) =
            meshed("ballast-x2-mtls-server", "server", &registered(SERVICE), up.http)?;
        let (m2_sink, m2_sink_addrs) = meshed("ballast-x2-mtls-sink", "sink", &registered("sink"), up.tcp)?;
        let (m2_client, m2_client_addrs) = meshed("ballast-x2-mtls-client", "client", &[], up.http)?;
        // Ready means configured and certified; the server's registration reaches the
        // client through the control plane, and its first request opens the mesh
        // connection, over TLS: one inbound handshake on the server sidecar, or none of
        // this is mTLS.
        procs::wait_for("the mTLS pair to answer", Duration::from_secs(20), || {
            procs::http_get(m2_client_addrs.outbound, "/").is_ok_and(|s| s == 200)
        })?;
        let handshakes = procs::metric(m2_server_addrs.admin, TLS_OK).unwrap_or(0.0);
        if handshakes < 1.0 {
            return Err(format!(
                "the mTLS pair answered without a mesh TLS handshake ({TLS_OK} = {handshakes})"
            ));
        }
        let (ha_h1, ha_h2, ha_tcp) = (procs::free_addr(), procs::free_addr(), procs::free_addr());
        let haproxy = Proxy::haproxy(&haproxy_config(&up, ha_h1, ha_h2, ha_tcp), ha_h1, proxy_cpu)?;
        let relay_addr = procs::free_addr();
        let relay = Proxy::relay(relay_addr, up.http, proxy_cpu)?;
        Ok(Self {
            up,
            b1,
            b1_addrs,
            b2,
            t1,
            t100,
            alog,
            otlp,
            env,
            schedule_delay,
            ca,
            m2_client,
            m2_client_addrs,
            m2_server,
            m2_server_addrs,
            m2_sink,
            m2_sink_admin: m2_sink_addrs.admin,
            haproxy,
            relay,
            relay_addr,
            ha_h1,
            ha_h2,
            ha_tcp,
        })
    }

    /// The `ballast x2` pair of a set-up, if it is one.
    fn pair(&self, setup: Setup) -> Option<&Pair> {
        match setup {
            Setup::Ballast2 => Some(&self.b2),
            Setup::Ballast2Trace1 => Some(&self.t1),
            Setup::Ballast2Trace100 => Some(&self.t100),
            Setup::Ballast2AccessLog => Some(&self.alog),
            _ => None,
        }
    }

    fn target(&self, setup: Setup, proto: Proto) -> Target {
        let (addr, authority) = match setup {
            Setup::Direct => (self.up.http, SERVICE),
            Setup::Ballast1 => (self.b1_addrs.outbound, SERVICE),
            Setup::Ballast1Policy => (self.b1_addrs.outbound, SERVICE_WITH_POLICY),
            Setup::Ballast2 | Setup::Ballast2Trace1 | Setup::Ballast2Trace100 | Setup::Ballast2AccessLog => {
                (self.pair(setup).map_or(self.up.http, |p| p.client_addrs.outbound), SERVICE)
            }
            Setup::Ballast2Mtls => (self.m2_client_addrs.outbound, SERVICE),
            Setup::Haproxy => (if proto == Proto::Http1 { self.ha_h1 } else { self.ha_h2 }, SERVICE),
            Setup::Relay => (self.relay_addr, SERVICE),
        };
        Target { addr, authority: authority.to_owned(), proto }
    }

    fn proxies(&self, setup: Setup) -> Vec<&Proxy> {
        match setup {
            Setup::Direct => vec![],
            Setup::Ballast1 | Setup::Ballast1Policy => vec![&self.b1],
            Setup::Ballast2 | Setup::Ballast2Trace1 | Setup::Ballast2Trace100 | Setup::Ballast2AccessLog => {
                self.pair(setup).map(|p| vec![&p.client, &p.server]).unwrap_or_default()
            }
            Setup::Ballast2Mtls => vec![&self.m2_client, &self.m2_server],
            Setup::Haproxy => vec![&self.haproxy],
            Setup::Relay => vec![&self.relay],
        }
    }

    fn all(&mut self) -> [&mut Proxy; 14] {
        [
            &mut self.b1,
            &mut self.b2.client,
            &mut self.b2.server,
            &mut self.t1.client,
            &mut self.t1.server,
            &mut self.t100.client,
            &mut self.t100.server,
            &mut self.alog.client,
            &mut self.alog.server,
            &mut self.m2_client,
            &mut self.m2_server,
            &mut self.m2_sink,
            &mut self.haproxy,
            &mut self.relay,
        ]
    }
}

impl Drop for Bed {
    /// Every proxy gets SIGTERM before any is waited for (each field's own drop then
    /// waits for its exit), so they drain together.
    fn drop(&mut self) {
        for p in self.all() {
            p.terminate();
        }
    }
}

fn measure(
    bed: &Bed,
    rt: &tokio::runtime::Runtime,
    o: &Options,
    proto: Proto,
    mode: Mode,
    setup: Setup,
    repeat: usize,
) -> Result<Run, String> {
    let target = bed.target(setup, proto);
    let depth = if proto == Proto::Http1 { 1 } else { o.h2_depth };
    // Telemetry counted from before the warm-up (its spans and lines are in the counts).
    let traced = setup.trace_ratio().and_then(|r| Some((r.parse::<f64>().ok()?, bed.pair(setup)?)));
    let spans_before = match traced {
        Some((_, pair)) => Some((pair.span_counters()?, bed.otlp.received())),
        None => None,
    };
    let logged = bed.pair(setup).filter(|_| setup == Setup::Ballast2AccessLog);
    if let Some(pair) = logged {
        for p in [&pair.client, &pair.server] {
            p.take_stderr().map_err(|e| format!("{} stderr: {e}", p.name))?;
        }
    }
    // Warm-up: connections, pools and caches, unmeasured.
    let warm = loadgen::max_rate(
        rt,
        &target,
        Duration::from_millis(if o.smoke { 100 } else { 300 }),
        o.connections,
        depth,
    );
    let proxies = bed.proxies(setup);
    eprintln!(
        "  measuring {} {:?} {} (pids {:?})",
        proto.label(),
        mode,
        setup.label(),
        proxies.iter().map(|p| p.pid()).collect::<Vec<_>>()
    );
    let cpu =
        |ps: &[&Proxy]| ps.iter().map(|p| p.cpu_split()).fold((0.0, 0.0), |a, c| (a.0 + c.0, a.1 + c.1));
    let before = cpu(&proxies);
    let out: Outcome = match mode {
        Mode::Fixed(rate) => loadgen::fixed_rate(rt, &target, rate, o.fixed_for, o.connections),
        Mode::Max => loadgen::max_rate(rt, &target, o.max_for, o.connections, depth),
    };
    let after = cpu(&proxies);
    let (user_s, cpu_s) = (after.0 - before.0, (after.0 + after.1) - (before.0 + before.1));
    let requests = warm.ok + warm.errors + out.ok + out.errors;
    let spans = match (traced, spans_before) {
        (Some((ratio, pair)), Some(before)) => Some(settle_spans(bed, pair, ratio, requests, before)?),
        _ => None,
    };
    let access_log = match logged {
        Some(pair) => {
            // The last lines are written as the last responses end.
            std::thread::sleep(Duration::from_millis(50));
            let (mut lines, mut bytes) = (0, 0);
            for p in [&pair.client, &pair.server] {
                let (l, b) = p.take_stderr().map_err(|e| format!("{} stderr: {e}", p.name))?;
                lines += l;
                bytes += b;
            }
            Some(AccessLog { requests, lines, bytes })
        }
        None => None,
    };
    Ok(Run {
        proto,
        mode,
        setup,
        repeat,
        ok: out.ok,
        errors: out.errors,
        first_error: out.first_error.clone(),
        seconds: out.elapsed.as_secs_f64(),
        requests_per_second: out.rate(),
        p50_ms: out.ms(0.5),
        p99_ms: out.ms(0.99),
        p999_ms: out.ms(0.999),
        max_ms: out.hist.max() as f64 / 1e6,
        proxy_cpu_seconds: cpu_s,
        proxy_user_seconds: user_s,
        proxies: proxies.len(),
        spans,
        access_log,
    })
}

/// Waits for a tracing pair to export (or drop) the spans of the run that just ended,
/// then returns what it did since `before`. The last batch leaves at most the schedule
/// delay after its first span; at 100% sampling every span is expected, otherwise the
/// counters must stand still for a while. Waiting here also keeps a run's export work
/// out of the next run's CPU time.
fn settle_spans(
    bed: &Bed,
    pair: &Pair,
    ratio: f64,
    requests: u64,
    before: ((SpanCounters, SpanCounters), otlp_sink::Received),
) -> Result<Spans, String> {
    let ((client0, server0), sink0) = before;
    let expected = if ratio >= 1.0 { requests * SPANS_PER_REQUEST } else { u64::MAX };
    let start = std::time::Instant::now();
    let quiet_after = bed.schedule_delay + Duration::from_millis(300);
    let mut last: Option<(Spans, std::time::Instant)> = None;
    loop {
        let (client, server) = pair.span_counters()?;
        let now = Spans {
            ratio,
            requests,
            client: client.since(client0),
            server: server.since(server0),
            sink: bed.otlp.received() - sink0,
        };
        if now.total() >= expected && now.sink.spans >= now.exported() {
            return Ok(now);
        }
        let unchanged_since = match last {
            Some((prev, since))
                if prev.client == now.client && prev.server == now.server && prev.sink == now.sink =>
            {
                since
            }
            _ => std::time::Instant::now(),
        };
        let quiet = unchanged_since.elapsed() >= Duration::from_millis(300);
        if (quiet && start.elapsed() >= quiet_after)
            || start.elapsed() >= quiet_after + Duration::from_secs(15)
        {
            return Ok(now);
        }
        last = Some((now, unchanged_since));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Serialize)]
struct Memory {
    proxy: String,
    idle_rss_mib: f64,
    rss_with_idle_connections_mib: f64,
    idle_connections: usize,
    peak_rss_mib: f64,
}

#[derive(Serialize)]
struct TcpRun {
    setup: Setup,
    repeat: usize,
    gbit_per_second: f64,
}

#[derive(Serialize)]
struct Record {
    machine: BTreeMap<&'static str, String>,
    repeats: usize,
    connections: usize,
    response_bytes: usize,
    fixed_seconds: f64,
    max_seconds: f64,
    runs: Vec<Run>,
    /// Medians over the repeats of each set-up's figures divided by (latency: also
    /// minus) those of the same repeat's base set-up.
    ratios: Vec<Ratio>,
    memory: Vec<Memory>,
    tcp: Vec<TcpRun>,
    handshakes: Vec<handshake::HandshakeRun>,
    /// What the `ballast x2` pairs had added to their environment, by set-up.
    sidecar_env: BTreeMap<Setup, BTreeMap<String, String>>,
    /// The telemetry set-ups' findings, as printed (spans dropped, ...).
    notes: Vec<String>,
}

/// One set-up against a base (`direct`; and `ballast-x2`, for `ballast-x2-mtls` and the
/// telemetry set-ups).
#[derive(Serialize)]
struct Ratio {
    proto: Proto,
    mode: Mode,
    setup: Setup,
    base: Setup,
    p50: Spread,
    p99: Spread,
    p50_added_ms: Spread,
    p99_added_ms: Spread,
    requests_per_second: Spread,
    cpu_per_1k_per_proxy: Spread,
}

/// `cpus`: how many CPUs the harness was allowed before it pinned itself.
fn machine(cpus: usize) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert("cpus", cpus.to_string());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    m.insert("cpu_model", model);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    m.insert("kernel", kernel.trim().to_owned());
    let haproxy = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_owned())
        .unwrap_or_default();
    m.insert("haproxy", haproxy);
    m
}

fn main() {
    relay::run_if_asked();
    if let Err(e) = run() {
        eprintln!("mesh bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let o = Options::parse();
    if std::process::Command::new("haproxy").arg("-v").output().is_err() {
        return Err("haproxy is not installed: run scripts/bench.sh, or apt-get install -y haproxy".into());
    }
    let cpus = procs::allowed_cpus();
    let (load_cpu, proxy_cpu) = match cpus.as_slice() {
        [a, b, ..] => (*a, *b),
        [a] => (*a, *a),
        [] => return Err("no CPU is allowed to this process".into()),
    };
    procs::pin_to(load_cpu).map_err(|e| format!("cannot pin the load generator: {e}"))?;
    let bin = sidecar_binary(o.smoke)?;
    let mut bed = Bed::start(&bin, proxy_cpu, o.smoke)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    eprintln!(
        "mesh bench: {} run(s); load generator and upstream on CPU {load_cpu}, proxies on CPU {proxy_cpu}; sidecar {}",
        o.repeats,
        bin.display()
    );

    // Memory at rest, then with idle connections open.
    std::thread::sleep(Duration::from_millis(300));
    let mut memory = Vec::new();
    for (p, addr, authority) in [
        (&bed.b1, bed.b1_addrs.outbound, SERVICE),
        (&bed.m2_client, bed.m2_client_addrs.outbound, SERVICE),
        (&bed.haproxy, bed.ha_h1, SERVICE),
    ] {
        let idle = p.rss_mib();
        let t = std::time::Instant::now();
        let conns = procs::idle_connections(addr, authority, o.idle_connections)
            .map_err(|e| format!("{}: {e}", p.name))?;
        eprintln!(
            "  {} idle connections to {} opened in {:.1} s",
            o.idle_connections,
            p.name,
            t.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(300));
        let with = p.rss_mib();
        drop(conns);
        memory.push(Memory {
            proxy: p.name.clone(),
            idle_rss_mib: idle,
            rss_with_idle_connections_mib: with,
            idle_connections: o.idle_connections,
            peak_rss_mib: f64::NAN,
        });
    }

    let setups = Setup::ALL;
    let mut modes: Vec<Mode> = Vec::new();
    if o.modes.is_empty() || o.modes.iter().any(|m| m == "fixed") {
        modes.extend(o.rates.iter().map(|r| Mode::Fixed(*r)));
    }
    if o.modes.is_empty() || o.modes.iter().any(|m| m == "max") {
        modes.push(Mode::Max);
    }
    let mut runs = Vec::new();
    let mut tcp = Vec::new();
    let mut handshakes = Vec::new();
    // The client of the handshake runs: a workload of the mTLS pair's namespace.
    let loadgen_identity = bed.ca.workload(MTLS_NAMESPACE, "loadgen")?;
    let peer = handshake::Peer {
        addr: bed.m2_server_addrs.inbound,
        name: format!("spiffe://cluster.local/ns/{MTLS_NAMESPACE}/sa/server")
            .parse::<ballast_api::identity::Identity>()
            .map_err(|e| e.to_string())?
            .dns_name()
            .try_into()
            .map_err(|e| format!("the server's identity name: {e}"))?,
        pid: bed.m2_server.pid(),
    };
    let resuming = loadgen_identity.tls.client_h2.clone();
    let mut no_resumption = (*resuming).clone();
    no_resumption.resumption = rustls::client::Resumption::disabled();
    let no_resumption = std::sync::Arc::new(no_resumption);
    for repeat in 0..o.repeats {
        for &proto in &o.protocols {
            for &mode in &modes {
                for &setup in &setups {
                    // The smoke pass runs the telemetry variants of x2 over HTTP/1.1 only.
                    if ((setup == Setup::Ballast1Policy || (o.smoke && setup.telemetry()))
                        && proto != Proto::Http1)
                        || (!o.setups.is_empty() && !o.setups.contains(&setup))
                    {
                        continue;
                    }
                    let r = measure(&bed, &rt, &o, proto, mode, setup, repeat)?;
                    eprintln!(
                        "  run {} {:<10} {:<9} {:<21} {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms  errors {}",
                        repeat + 1,
                        proto.label(),
                        load_label(mode),
                        setup.label(),
                        r.requests_per_second,
                        r.p50_ms,
                        r.p99_ms,
                        r.errors
                    );
                    if let Some(s) = &r.spans {
                        eprintln!(
                            "        spans: {} exported, {} dropped (queue full), {} failed, of {} requests; the sink got {} spans in {} requests",
                            s.exported(),
                            s.queue_full(),
                            s.export_failed(),
                            s.requests,
                            s.sink.spans,
                            s.sink.requests
                        );
                    }
                    if let Some(l) = &r.access_log {
                        eprintln!(
                            "        access log: {} lines, {:.1} MiB, of {} requests",
                            l.lines,
                            l.bytes as f64 / 1048576.0,
                            l.requests
                        );
                    }
                    runs.push(r);
                }
            }
        }
        if o.tcp {
            tcp.extend(tcp_runs(&bed, &bin, proxy_cpu, &o, repeat)?);
        }
        if o.handshakes {
            for (kind, config) in
                [(handshake::Kind::Full, &no_resumption), (handshake::Kind::Resumed, &resuming)]
            {
                let h = handshake::run(kind, repeat, &peer, config, o.handshakes_for, 200_000);
                eprintln!(
                    "  run {} mesh TLS {:<25} {:>7.0} conn/s  p50 {:.3} ms  p99 {:.3} ms  server {:.0} µs/conn  {} full, {} resumed, errors {}",
                    repeat + 1,
                    kind.label(),
                    h.per_second,
                    h.p50_ms,
                    h.p99_ms,
                    h.server_cpu_us,
                    h.full,
                    h.resumed,
                    h.errors
                );
                handshakes.push(h);
            }
        }
        for p in bed.all() {
            if !p.is_running() {
                return Err(format!("{} exited during the bench: {}", p.name, p.stderr()));
            }
        }
    }
    let peak: Vec<(String, f64)> = bed.all().iter().map(|p| (p.name.clone(), p.peak_rss_mib())).collect();
    for m in &mut memory {
        if let Some((_, p)) = peak.iter().find(|(name, _)| *name == m.proxy) {
            m.peak_rss_mib = *p;
        }
    }

    let notes = telemetry_notes(&runs);
    print!("{}", render(&o, &runs, &memory, &peak, &tcp, &handshakes, &notes));
    let record = Record {
        machine: machine(cpus.len()),
        repeats: o.repeats,
        connections: o.connections,
        response_bytes: upstream::RESPONSE_BYTES,
        fixed_seconds: o.fixed_for.as_secs_f64(),
        max_seconds: o.max_for.as_secs_f64(),
        ratios: ratios(&runs),
        runs,
        memory,
        tcp,
        handshakes,
        sidecar_env: std::mem::take(&mut bed.env),
        notes,
    };
    if let Some(dir) = o.json.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
    std::fs::write(&o.json, json).map_err(|e| format!("{}: {e}", o.json.display()))?;
    println!("\nwritten: {}", o.json.display());

    if o.smoke {
        smoke_checks(&record)?;
    }
    Ok(())
}

/// Opaque TCP through a CONNECT tunnel (Ballast) or a `mode tcp` frontend (HAProxy).
fn tcp_runs(
    bed: &Bed,
    bin: &std::path::Path,
    proxy_cpu: usize,
    o: &Options,
    repeat: usize,
) -> Result<Vec<TcpRun>, String> {
    // The server sidecar of x2 sends its inbound to the HTTP upstream; the TCP path
    // needs one whose app is the sink.
    let (_server, server) = Proxy::sidecar(bin, "ballast-tcp-server", "", bed.up.tcp, proxy_cpu, &[])?;
    let (_client, client) = Proxy::sidecar(
        bin,
        "ballast-tcp-client",
        &service_yaml("sink", server.inbound),
        bed.up.http,
        proxy_cpu,
        &[],
    )?;
    let sink = bed.up.tcp;
    let sink_authority = sink.to_string();
    let mesh_authority = format!("sink:{}", sink.port());
    let cases: [(Setup, SocketAddr, Option<&str>); 5] = [
        (Setup::Direct, sink, None),
        (Setup::Ballast1, bed.b1_addrs.outbound, Some(&sink_authority)),
        (Setup::Ballast2, client.outbound, Some(&mesh_authority)),
        // The mTLS client sidecar tunnels it to `bed.m2_sink` (ALPN ballast.io/opaque).
        (Setup::Ballast2Mtls, bed.m2_client_addrs.outbound, Some(&mesh_authority)),
        (Setup::Haproxy, bed.ha_tcp, None),
    ];
    let mut out = Vec::new();
    let sink_handshakes = || procs::metric(bed.m2_sink_admin, TLS_OK).unwrap_or(0.0);
    let before = sink_handshakes();
    for (setup, addr, connect) in cases {
        let bps = loadgen::tcp_throughput(addr, connect, 1, o.tcp_for, || bed.up.sunk())
            .map_err(|e| format!("tcp {}: {e}", setup.label()))?;
        eprintln!("  run {} TCP stream {:<20} {:>7.2} Gbit/s", repeat + 1, setup.label(), bps / 1e9);
        out.push(TcpRun { setup, repeat, gbit_per_second: bps / 1e9 });
    }
    if sink_handshakes() <= before {
        return Err(
            "the opaque stream of ballast x2 mTLS did not reach the sink's sidecar over mesh TLS".into()
        );
    }
    Ok(out)
}

fn smoke_checks(r: &Record) -> Result<(), String> {
    for run in &r.runs {
        if run.errors > 0 || run.ok == 0 {
            return Err(format!(
                "{} {:?} {}: {} ok, {} errors (first: {:?})",
                run.proto.label(),
                run.mode,
                run.setup.label(),
                run.ok,
                run.errors,
                run.first_error
            ));
        }
        if run.proxies > 0 && (run.proxy_cpu_seconds.is_nan() || run.proxy_cpu_seconds < 0.0) {
            return Err(format!("{}: no CPU time read", run.setup.label()));
        }
        let what = format!("{} {:?} {}", run.proto.label(), run.mode, run.setup.label());
        if let Some(s) = &run.spans {
            // Drops are a finding; failures, strays and missing spans are the harness's.
            if s.export_failed() > 0 || s.sink.bad > 0 || s.sink.spans != s.exported() {
                return Err(format!("{what}: spans and the OTLP sink disagree: {s:?}"));
            }
            if s.ratio >= 1.0 && (s.exported() == 0 || s.total() < s.requests * SPANS_PER_REQUEST) {
                return Err(format!(
                    "{what}: {} spans for {} requests at 100% sampling: {s:?}",
                    s.total(),
                    s.requests
                ));
            }
        } else if run.setup.trace_ratio().is_some() {
            return Err(format!("{what}: no span counts"));
        }
        if run.setup == Setup::Ballast2AccessLog
            && !run.access_log.is_some_and(|l| l.lines >= 2 * run.ok && l.bytes > 0)
        {
            return Err(format!(
                "{what}: the access log is short: {:?} for {} requests",
                run.access_log, run.ok
            ));
        }
    }
    for m in &r.memory {
        if !(m.idle_rss_mib > 0.0 && m.rss_with_idle_connections_mib > 0.0) {
            return Err(format!("{}: no memory read", m.proxy));
        }
    }
    if r.tcp.iter().any(|t| t.gbit_per_second.is_nan() || t.gbit_per_second <= 0.0) {
        return Err("a TCP run moved no bytes".into());
    }
    for h in &r.handshakes {
        let resumed_as_asked = match h.kind {
            handshake::Kind::Full => h.resumed == 0,
            // The first connection of a series may find no ticket left; the others resume.
            handshake::Kind::Resumed => h.full <= 1 && h.resumed > 0,
        };
        if h.errors > 0 || h.ok == 0 || !resumed_as_asked {
            return Err(format!(
                "mesh TLS {}: {} ok ({} full, {} resumed), {} errors (first: {:?})",
                h.kind.label(),
                h.ok,
                h.full,
                h.resumed,
                h.errors,
                h.first_error
            ));
        }
    }
    Ok(())
}

fn render(
    o: &Options,
    runs: &[Run],
    memory: &[Memory],
    peak: &[(String, f64)],
    tcp: &[TcpRun],
    handshakes: &[handshake::HandshakeRun],
    notes: &[String],
) -> String {
    let mut out = String::new();
    let n = o.repeats;
    let of = |proto: Proto, mode: Mode, setup: Setup| -> Vec<&Run> {
        runs.iter().filter(|r| r.proto == proto && r.mode == mode && r.setup == setup).collect()
    };
    // Paired with the same repeat's run of `base`: the noise of that moment cancels.
    let paired =
        |proto: Proto, mode: Mode, setup: Setup, base: Setup, f: &dyn Fn(&Run, &Run) -> f64| -> Spread {
            let v: Vec<f64> = of(proto, mode, setup)
                .iter()
                .filter_map(|r| {
                    of(proto, mode, base).into_iter().find(|b| b.repeat == r.repeat).map(|b| f(r, b))
                })
                .collect();
            Spread::of(&v)
        };
    for &proto in &o.protocols {
        for mode in o.rates.iter().map(|r| Mode::Fixed(*r)).chain([Mode::Max]) {
            let setups: Vec<Setup> =
                Setup::ALL.into_iter().filter(|s| !of(proto, mode, *s).is_empty()).collect();
            // The plain mesh is the base of the mTLS and telemetry rows (and its own, 1.00).
            let vs_plain = |s: Setup| s == Setup::Ballast2 || s.vs_plain_x2();
            let mut rows = Vec::new();
            match mode {
                Mode::Fixed(rate) => {
                    out.push_str(&format!(
                        "\n{} at {rate} req/s, {} connections, {:.1} s; median (min–max) of {n} run(s); latency from the intended send time\n",
                        proto.label(),
                        o.connections,
                        o.fixed_for.as_secs_f64()
                    ));
                    for &s in &setups {
                        let rs = of(proto, mode, s);
                        let col =
                            |f: fn(&Run) -> f64| Spread::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
                        let added =
                            |f: fn(&Run) -> f64| paired(proto, mode, s, Setup::Direct, &|r, b| f(r) - f(b));
                        rows.push(vec![
                            s.label().to_owned(),
                            col(|r| r.p50_ms).show(3),
                            col(|r| r.p99_ms).show(3),
                            col(|r| r.p999_ms).show(3),
                            if s == Setup::Direct { "".into() } else { added(|r| r.p50_ms).show(3) },
                            if s == Setup::Direct { "".into() } else { added(|r| r.p99_ms).show(3) },
                            if s == Setup::Direct {
                                "".into()
                            } else {
                                paired(proto, mode, s, Setup::Direct, &|r, b| r.p50_ms / b.p50_ms).show(2)
                            },
                            if vs_plain(s) {
                                paired(proto, mode, s, Setup::Ballast2, &|r, b| r.p50_ms / b.p50_ms).show(2)
                            } else {
                                "".into()
                            },
                            if vs_plain(s) {
                                paired(proto, mode, s, Setup::Ballast2, &|r, b| r.p99_ms / b.p99_ms).show(2)
                            } else {
                                "".into()
                            },
                            col(|r| r.cpu_per_1k_per_proxy()).show(4),
                            if vs_plain(s) {
                                paired(proto, mode, s, Setup::Ballast2, &|r, b| {
                                    r.cpu_per_1k_per_proxy() / b.cpu_per_1k_per_proxy()
                                })
                                .show(2)
                            } else {
                                "".into()
                            },
                            if s == Setup::Direct {
                                "".into()
                            } else {
                                col(|r| r.user_share() * 100.0).show(0)
                            },
                            rs.iter().map(|r| r.errors).sum::<u64>().to_string(),
                        ]);
                    }
                    out.push_str(&table(
                        &[
                            "set-up",
                            "p50 ms",
                            "p99 ms",
                            "p99.9 ms",
                            "+p50 ms",
                            "+p99 ms",
                            "p50 x direct",
                            "p50 x plain x2",
                            "p99 x plain x2",
                            "CPU s/1k req/proxy",
                            "CPU x plain x2",
                            "user %",
                            "errors",
                        ],
                        &rows,
                    ));
                }
                Mode::Max => {
                    out.push_str(&format!(
                        "\n{} maximum throughput, {} connections{}, {:.1} s, proxy on one core; median (min–max) of {n} run(s)\n",
                        proto.label(),
                        o.connections,
                        if proto == Proto::Http1 { String::new() } else { format!(" x {} streams", o.h2_depth) },
                        o.max_for.as_secs_f64()
                    ));
                    for &s in &setups {
                        let rs = of(proto, mode, s);
                        let col =
                            |f: fn(&Run) -> f64| Spread::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
                        let ratio = |base: Setup, f: fn(&Run) -> f64| {
                            paired(proto, mode, s, base, &|r, b| f(r) / f(b))
                        };
                        let proxied = s != Setup::Direct;
                        rows.push(vec![
                            s.label().to_owned(),
                            col(|r| r.requests_per_second).show(0),
                            ratio(Setup::Direct, |r| r.requests_per_second).show(2),
                            ratio(Setup::Haproxy, |r| r.requests_per_second).show(2),
                            if vs_plain(s) {
                                ratio(Setup::Ballast2, |r| r.requests_per_second).show(2)
                            } else {
                                "".into()
                            },
                            if proxied { col(|r| r.proxy_core_use() * 100.0).show(0) } else { "".into() },
                            if proxied { col(|r| r.user_share() * 100.0).show(0) } else { "".into() },
                            if proxied { col(|r| r.per_proxy_cpu_second()).show(0) } else { "".into() },
                            if proxied {
                                ratio(Setup::Haproxy, |r| r.per_proxy_cpu_second()).show(2)
                            } else {
                                "".into()
                            },
                            col(|r| r.p99_ms).show(2),
                            rs.iter().map(|r| r.errors).sum::<u64>().to_string(),
                        ]);
                    }
                    out.push_str(&table(
                        &[
                            "set-up",
                            "req/s",
                            "x direct",
                            "x haproxy",
                            "x plain x2",
                            "proxy CPU %",
                            "user %",
                            "req/proxy-CPU-s",
                            "x haproxy",
                            "p99 ms",
                            "errors",
                        ],
                        &rows,
                    ));
                }
            }
        }
    }
    out.push_str(&render_telemetry(o, runs, notes));
    out.push_str(&format!(
        "\nMemory (RSS, MiB); {} idle HTTP/1.1 keep-alive connections after one request each\n",
        o.idle_connections
    ));
    let rows: Vec<Vec<String>> = memory
        .iter()
        .map(|m| {
            vec![
                m.proxy.clone(),
                format!("{:.1}", m.idle_rss_mib),
                format!("{:.1}", m.rss_with_idle_connections_mib),
                format!("{:.1}", m.peak_rss_mib),
            ]
        })
        .collect();
    out.push_str(&table(&["proxy", "idle", "with connections", "peak (whole bench)"], &rows));
    out.push_str(&format!(
        "peak RSS of every proxy: {}\n",
        peak.iter().map(|(n, p)| format!("{n} {p:.1}")).collect::<Vec<_>>().join(", ")
    ));
    if !tcp.is_empty() {
        out.push_str(&format!(
            "\nOpaque TCP, one stream, {:.1} s; median (min–max) of {n} run(s)\n",
            o.tcp_for.as_secs_f64()
        ));
        let mut rows = Vec::new();
        for s in [Setup::Direct, Setup::Ballast1, Setup::Ballast2, Setup::Ballast2Mtls, Setup::Haproxy] {
            let v: Vec<f64> = tcp.iter().filter(|t| t.setup == s).map(|t| t.gbit_per_second).collect();
            let d: Vec<f64> =
                tcp.iter().filter(|t| t.setup == Setup::Direct).map(|t| t.gbit_per_second).collect();
            let ratio: Vec<f64> = v.iter().zip(&d).map(|(a, b)| a / b).collect();
            rows.push(vec![s.label().to_owned(), Spread::of(&v).show(2), Spread::of(&ratio).show(2)]);
        }
        out.push_str(&table(&["set-up", "Gbit/s", "x direct"], &rows));
    }
    if !handshakes.is_empty() {
        out.push_str(&format!(
            "\nNew mesh TLS connections to the server sidecar, one at a time, {:.1} s; connect to the server's first HTTP/2 bytes; median (min–max) of {n} run(s)\n",
            o.handshakes_for.as_secs_f64()
        ));
        let mut rows = Vec::new();
        for kind in [handshake::Kind::Full, handshake::Kind::Resumed] {
            let hs: Vec<&handshake::HandshakeRun> = handshakes.iter().filter(|h| h.kind == kind).collect();
            let col = |f: fn(&handshake::HandshakeRun) -> f64| {
                Spread::of(&hs.iter().map(|h| f(h)).collect::<Vec<_>>())
            };
            let (ok, resumed) = hs.iter().fold((0, 0), |a, h| (a.0 + h.ok, a.1 + h.resumed));
            rows.push(vec![
                kind.label().to_owned(),
                col(|h| h.per_second).show(0),
                col(|h| h.p50_ms).show(3),
                col(|h| h.p99_ms).show(3),
                col(|h| h.server_cpu_us).show(0),
                col(|h| h.client_cpu_us).show(0),
                format!("{resumed} of {ok}"),
                hs.iter().map(|h| h.errors).sum::<u64>().to_string(),
            ]);
        }
        out.push_str(&table(
            &[
                "handshake",
                "conn/s",
                "p50 ms",
                "p99 ms",
                "server CPU µs/conn",
                "client CPU µs/conn",
                "resumed",
                "errors",
            ],
            &rows,
        ));
    }
    out
}

fn load_label(mode: Mode) -> String {
    match mode {
        Mode::Fixed(r) => format!("{r}/s"),
        Mode::Max => "max".into(),
    }
}

/// The runs of the telemetry set-ups, per set-up, protocol and mode in table order.
fn telemetry_groups(runs: &[Run]) -> Vec<(Setup, Proto, Mode, Vec<&Run>)> {
    let mut keys: Vec<(Setup, Proto, Mode)> =
        runs.iter().filter(|r| r.setup.telemetry()).map(|r| (r.setup, r.proto, r.mode)).collect();
    keys.sort_by_key(|k| (k.0, k.1 as u8, k.2));
    keys.dedup();
    keys.into_iter()
        .map(|(s, p, m)| (s, p, m, runs.iter().filter(|r| (r.setup, r.proto, r.mode) == (s, p, m)).collect()))
        .collect()
}

/// What the span counts say, in words: drops (a finding at 100% sampling, not an
/// error), failed exports, and any disagreement between the sidecars and the sink.
fn telemetry_notes(runs: &[Run]) -> Vec<String> {
    let mut notes = Vec::new();
    let mut traced_100 = false;
    for (setup, proto, mode, rs) in telemetry_groups(runs) {
        let spans: Vec<&Spans> = rs.iter().filter_map(|r| r.spans.as_ref()).collect();
        if spans.is_empty() {
            continue;
        }
        let sum = |f: fn(&Spans) -> u64| spans.iter().map(|s| f(s)).sum::<u64>();
        let (total, full, failed) = (sum(Spans::total), sum(Spans::queue_full), sum(Spans::export_failed));
        let (exported, received, requests) =
            (sum(Spans::exported), sum(|s| s.sink.spans), sum(|s| s.requests));
        let what = format!("{}, {} {}", setup.label(), proto.label(), load_label(mode));
        traced_100 |= setup == Setup::Ballast2Trace100;
        if full > 0 {
            notes.push(format!(
                "{what}: {full} of {total} spans ({:.1}%) DROPPED with the export queue full (client sidecar {}, server sidecar {}): the export thread did not keep up{}",
                full as f64 * 100.0 / total.max(1) as f64,
                spans.iter().map(|s| s.client.dropped_queue_full).sum::<u64>(),
                spans.iter().map(|s| s.server.dropped_queue_full).sum::<u64>(),
                if setup == Setup::Ballast2Trace100 { " with every request sampled at this rate" } else { "" }
            ));
        }
        if failed > 0 {
            notes.push(format!("{what}: {failed} spans failed to export to the sink"));
        }
        if received != exported {
            notes.push(format!(
                "{what}: the OTLP sink received {received} spans, the sidecars counted {exported} exported"
            ));
        }
        if setup == Setup::Ballast2Trace100 && total < requests * SPANS_PER_REQUEST {
            notes.push(format!(
                "{what}: {total} spans accounted for (exported or dropped) of the {} expected ({SPANS_PER_REQUEST} per request)",
                requests * SPANS_PER_REQUEST
            ));
        }
    }
    if traced_100
        && !runs
            .iter()
            .any(|r| r.setup == Setup::Ballast2Trace100 && r.spans.is_some_and(|s| s.queue_full() > 0))
    {
        notes.push(format!("{}: no span dropped in any run", Setup::Ballast2Trace100.label()));
    }
    notes
}

/// The spans of the tracing set-ups and the lines of the access log, summed over the
/// repeats, then the notes.
fn render_telemetry(o: &Options, runs: &[Run], notes: &[String]) -> String {
    let mut out = String::new();
    let groups = telemetry_groups(runs);
    let mut rows = Vec::new();
    for (setup, proto, mode, rs) in &groups {
        let spans: Vec<&Spans> = rs.iter().filter_map(|r| r.spans.as_ref()).collect();
        if spans.is_empty() {
            continue;
        }
        let sum = |f: fn(&Spans) -> u64| spans.iter().map(|s| f(s)).sum::<u64>();
        let (requests, total, bytes) = (sum(|s| s.requests), sum(Spans::total), sum(|s| s.sink.bytes));
        rows.push(vec![
            setup.label().to_owned(),
            proto.label().to_owned(),
            load_label(*mode),
            requests.to_string(),
            total.to_string(),
            format!("{:.3}", total as f64 / requests.max(1) as f64),
            sum(Spans::exported).to_string(),
            sum(Spans::queue_full).to_string(),
            sum(Spans::export_failed).to_string(),
            sum(|s| s.sink.requests).to_string(),
            if total > 0 {
                format!("{:.0}", bytes as f64 / sum(|s| s.sink.spans).max(1) as f64)
            } else {
                "-".into()
            },
        ]);
    }
    if !rows.is_empty() {
        out.push_str(&format!(
            "\nSpans of the tracing set-ups, both sidecars, warm-up included, sum of {} run(s); counted from /metrics once each run's spans were out\n",
            o.repeats
        ));
        out.push_str(&table(
            &[
                "set-up",
                "protocol",
                "load",
                "requests",
                "spans",
                "spans/request",
                "exported",
                "dropped (queue full)",
                "export failed",
                "OTLP requests",
                "bytes/span",
            ],
            &rows,
        ));
    }
    let mut rows = Vec::new();
    for (_, proto, mode, rs) in &groups {
        let logs: Vec<&AccessLog> = rs.iter().filter_map(|r| r.access_log.as_ref()).collect();
        if logs.is_empty() {
            continue;
        }
        let (requests, lines, bytes) =
            logs.iter().fold((0, 0, 0), |a, l| (a.0 + l.requests, a.1 + l.lines, a.2 + l.bytes));
        rows.push(vec![
            proto.label().to_owned(),
            load_label(*mode),
            requests.to_string(),
            lines.to_string(),
            format!("{:.2}", lines as f64 / requests.max(1) as f64),
            format!("{:.1}", bytes as f64 / 1048576.0),
            format!("{:.0}", bytes as f64 / lines.max(1) as f64),
        ]);
    }
    if !rows.is_empty() {
        out.push_str(&format!(
            "\nAccess log of {}, both sidecars (stderr to a file), warm-up included, sum of {} run(s)\n",
            Setup::Ballast2AccessLog.label(),
            o.repeats
        ));
        out.push_str(&table(
            &["protocol", "load", "requests", "lines", "lines/request", "MiB", "bytes/line"],
            &rows,
        ));
    }
    for n in notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

/// Every set-up against `direct`, and the mTLS and telemetry pairs against the plain
/// one, per protocol and mode: medians of the paired repeats.
fn ratios(runs: &[Run]) -> Vec<Ratio> {
    let mut out = Vec::new();
    let mut keys: Vec<(Proto, Mode, Setup)> = runs.iter().map(|r| (r.proto, r.mode, r.setup)).collect();
    keys.sort_by_key(|k| (k.0 as u8, k.1, k.2));
    keys.dedup();
    for (proto, mode, setup) in keys {
        let bases: &[Setup] = match setup {
            Setup::Direct => &[],
            s if s.vs_plain_x2() => &[Setup::Direct, Setup::Ballast2],
            _ => &[Setup::Direct],
        };
        for &base in bases {
            let pairs: Vec<(&Run, &Run)> = runs
                .iter()
                .filter(|r| r.proto == proto && r.mode == mode && r.setup == setup)
                .filter_map(|r| {
                    runs.iter()
                        .find(|b| {
                            b.proto == proto && b.mode == mode && b.setup == base && b.repeat == r.repeat
                        })
                        .map(|b| (r, b))
                })
                .collect();
            if pairs.is_empty() {
                continue;
            }
            let of = |f: &dyn Fn(&Run, &Run) -> f64| {
                Spread::of(&pairs.iter().map(|(r, b)| f(r, b)).collect::<Vec<_>>())
            };
            out.push(Ratio {
                proto,
                mode,
                setup,
                base,
                p50: of(&|r, b| r.p50_ms / b.p50_ms),
                p99: of(&|r, b| r.p99_ms / b.p99_ms),
                p50_added_ms: of(&|r, b| r.p50_ms - b.p50_ms),
                p99_added_ms: of(&|r, b| r.p99_ms - b.p99_ms),
                requests_per_second: of(&|r, b| r.requests_per_second / b.requests_per_second),
                cpu_per_1k_per_proxy: of(&|r, b| r.cpu_per_1k_per_proxy() / b.cpu_per_1k_per_proxy()),
            });
        }
    }
    out
}
