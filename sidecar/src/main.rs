//! `ballast-sidecar`: `run` the proxy, or `init` the pod's iptables rules.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use ballast_api::names;
use ballast_sidecar::{control, init, run};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ballast-sidecar", version, about = "The Ballast service mesh sidecar proxy")]
struct Cli {
    /// Log format.
    #[arg(long, env = "BALLAST_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Install the iptables rules that redirect the pod's TCP traffic through the proxy.
    Init(InitArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Static configuration: ResiliencePolicy and Service YAML documents. Reloaded when it changes.
    #[arg(long, env = "BALLAST_CONFIG")]
    config: Option<PathBuf>,
    /// Control plane gRPC URLs, comma-separated (http://HOST:8086,...): the sidecar gets
    /// its configuration from there and is ready once the first one is applied. A random
    /// one is tried first, the next after each failure. Excludes --config: two sources
    /// would overwrite each other.
    #[arg(
        long,
        env = "BALLAST_CONTROL_PLANE",
        value_delimiter = ',',
        value_parser = control::parse_url,
        conflicts_with = "config",
        value_name = "URL"
    )]
    control_plane: Vec<String>,
    /// This pod's namespace: short host names are resolved in it.
    #[arg(long, env = "BALLAST_NAMESPACE", default_value = names::DEFAULT_NAMESPACE)]
    namespace: String,
    /// The service this pod serves (labels inbound metrics).
    #[arg(long, env = "BALLAST_SERVICE")]
    service: Option<String>,
    #[arg(long, env = "BALLAST_OUTBOUND_ADDR", default_value = "127.0.0.1:4140")]
    outbound_addr: SocketAddr,
    #[arg(long, env = "BALLAST_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    inbound_addr: SocketAddr,
    #[arg(long, env = "BALLAST_ADMIN_ADDR", default_value = "0.0.0.0:4191")]
    admin_addr: SocketAddr,
    /// Where inbound connections go when they were not redirected by iptables.
    #[arg(long, env = "BALLAST_APP_ADDR", default_value = "127.0.0.1:8080")]
    app_addr: SocketAddr,
    /// The endpoint the control plane registers for --service, which other sidecars send
    /// to. Default: the pod IP (BALLAST_POD_IP or POD_IP) with the inbound listener's
    /// port; else the inbound address if it names an IP; else 127.0.0.1 with the inbound
    /// port.
    #[arg(long, env = "BALLAST_ADVERTISE_ADDR")]
    advertise_addr: Option<SocketAddr>,
    /// This sidecar's name in the control plane (`ballastctl get proxies`); unique per
    /// sidecar within a namespace. Default: env POD_NAME, else HOSTNAME-PID.
    #[arg(long, env = "BALLAST_POD", value_name = "NAME")]
    pod: Option<String>,
    /// The services this sidecar calls, comma-separated NAME or NAME.NAMESPACE (a short
    /// name is in --namespace); the control plane sends only those (and this pod's own
    /// service's policy). Default: every service of --namespace.
    #[arg(long, env = "BALLAST_CALLS", value_delimiter = ',', value_name = "NAME[.NAMESPACE]")]
    calls: Vec<String>,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "BALLAST_DRAIN_DEADLINE", default_value = "30s", value_parser = ballast_api::duration::parse_flag)]
    drain_deadline: std::time::Duration,
    /// How long to wait for a client's first bytes before forwarding as opaque TCP
    /// (server-speaks-first protocols send nothing).
    #[arg(long, env = "BALLAST_DETECT_TIMEOUT", default_value = "500ms", value_parser = ballast_api::duration::parse_flag)]
    detect_timeout: std::time::Duration,
    /// Upstream connect timeout; a policy's timeouts.connect overrides it per service.
    #[arg(long, env = "BALLAST_CONNECT_TIMEOUT", default_value = "1s", value_parser = ballast_api::duration::parse_flag)]
    connect_timeout: std::time::Duration,
    /// Resolve hosts that are not mesh services with DNS (proxy requests and CONNECT).
    #[arg(long, env = "BALLAST_EGRESS_DNS", default_value_t = true, action = clap::ArgAction::Set)]
    egress_dns: bool,
    /// How often the config file is checked for changes.
    #[arg(long, env = "BALLAST_CONFIG_POLL", default_value = "1s", value_parser = ballast_api::duration::parse_flag)]
    config_poll: std::time::Duration,
    /// Data-path worker threads. Default: the CPUs this process may use (affinity and
    /// cgroup quota), at most 2, as Istio's sidecars default to `concurrency: 2`. With 1,
    /// the proxy runs on a single-threaded runtime: no work stealing and no cross-thread
    /// wake-ups, the cheapest way to serve a pod with one core or less.
    #[arg(long, env = "BALLAST_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: Option<u16>,
    /// The mesh's trust anchors (its CA certificate), PEM text or a file: turns on
    /// workload identity and mutual TLS between sidecars. The control plane then issues
    /// this sidecar's certificate and must be given as https://.
    #[arg(long, env = "BALLAST_IDENTITY_TRUST_ANCHORS", value_name = "PEM|FILE")]
    identity_trust_anchors: Option<String>,
    /// The token proving this pod's service account, re-read at each renewal. Default
    /// in Kubernetes: the injector's projected token.
    #[arg(long, env = "BALLAST_IDENTITY_TOKEN_FILE", value_name = "FILE", conflicts_with = "identity_token")]
    identity_token_file: Option<PathBuf>,
    /// A bootstrap token (`ballastctl token create`), outside Kubernetes.
    #[arg(long, env = "BALLAST_IDENTITY_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    identity_token: Option<String>,
    /// This pod's service account: its identity is spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/NAME.
    /// Default: env POD_SERVICE_ACCOUNT (set by the injector), else `default`.
    #[arg(long, env = "BALLAST_SERVICE_ACCOUNT", value_name = "NAME")]
    service_account: Option<String>,
    /// The app's HTTP probes, comma-separated PORT:PATH (the injector sets them from the
    /// pod's httpGet probes): plain-text GET/HEAD of exactly these are served whatever
    /// `inbound.mtls` and `inbound.allow` say, since the kubelet has no mesh certificate.
    #[arg(long, env = "BALLAST_INBOUND_PROBES", value_delimiter = ',', value_parser = parse_probe, value_name = "PORT:PATH")]
    inbound_probes: Vec<(u16, String)>,
    /// Share of requests written to the access log (`ballast_sidecar::access`, info),
    /// in percent; a policy's `telemetry.accessLogSamplingPercent` overrides it for its
    /// service. 0 turns it off (so does `BALLAST_LOG=info,ballast_sidecar::access=off`).
    /// Spans are exported when OTEL_EXPORTER_OTLP_ENDPOINT is set (standard OTEL_*
    /// variables: OTEL_EXPORTER_OTLP_PROTOCOL grpc|http/protobuf, OTEL_TRACES_SAMPLER(_ARG),
    /// OTEL_SERVICE_NAME, OTEL_BSP_*).
    #[arg(long, env = "BALLAST_ACCESS_LOG_SAMPLING", default_value_t = 100.0, value_parser = parse_percent, value_name = "PERCENT")]
    access_log_sampling: f64,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim().trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

fn parse_probe(s: &str) -> Result<(u16, String), String> {
    let (port, path) = s.split_once(':').ok_or_else(|| format!("{s:?} is not PORT:PATH"))?;
    let port: u16 = port.parse().map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
    if !path.starts_with('/') || path.contains('?') {
        return Err(format!("{s:?}: the path must start with / and have no query"));
    }
    Ok((port, path.to_owned()))
}

/// The identity options from the flags; `None` when identity is off.
fn identity_options(a: &RunArgs) -> Result<Option<ballast_sidecar::identity::IdentityOptions>, String> {
    use ballast_sidecar::identity::{IdentityOptions, TokenSource};
    let https = a.control_plane.iter().filter(|u| u.starts_with("https://")).count();
    let Some(anchors) = &a.identity_trust_anchors else {
        if https > 0 {
            return Err("an https:// control plane needs --identity-trust-anchors to verify it".into());
        }
        return Ok(None);
    };
    if https != a.control_plane.len() {
        return Err("with --identity-trust-anchors the control plane serves TLS: give --control-plane https://HOST:8086".into());
    }
    let trust_anchors_pem = if anchors.trim_start().starts_with("-----BEGIN") {
        anchors.clone()
    } else {
        std::fs::read_to_string(anchors).map_err(|e| {
            format!("--identity-trust-anchors: cannot read {anchors:?}: {e} (give PEM text or a file)")
        })?
    };
    let token = match (&a.identity_token_file, &a.identity_token) {
        (Some(path), _) => Some(TokenSource::File(path.clone())),
        (None, Some(token)) => Some(TokenSource::Literal(token.clone())),
        (None, None) if std::path::Path::new(ballast_api::identity::TOKEN_PATH).exists() => {
            Some(TokenSource::File(ballast_api::identity::TOKEN_PATH.into()))
        }
        // A pod opted out of identity: the control plane is still verified over TLS.
        (None, None) => {
            tracing::warn!(
                "no identity token (--identity-token-file, --identity-token, or {}): no workload certificate; only the control plane connection uses TLS",
                ballast_api::identity::TOKEN_PATH
            );
            None
        }
    };
    let service_account = a
        .service_account
        .clone()
        .or_else(|| std::env::var("POD_SERVICE_ACCOUNT").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "default".into());
    if !ballast_api::identity::dns_subdomain(&service_account) {
        return Err(format!("--service-account: {service_account:?} is not a service account name"));
    }
    Ok(Some(IdentityOptions { trust_anchors_pem, token, namespace: a.namespace.clone(), service_account }))
}

/// Default for `--workers`.
const MAX_DEFAULT_WORKERS: usize = 2;

fn runtime(workers: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = workers.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_DEFAULT_WORKERS)
    });
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    }
}

#[derive(Args)]
struct InitArgs {
    #[arg(long, env = "BALLAST_PROXY_UID", default_value_t = names::PROXY_UID)]
    proxy_uid: u32,
    #[arg(long, env = "BALLAST_INBOUND_PORT", default_value_t = names::INBOUND_PORT)]
    inbound_port: u16,
    #[arg(long, env = "BALLAST_OUTBOUND_PORT", default_value_t = names::OUTBOUND_PORT)]
    outbound_port: u16,
    #[arg(long, env = "BALLAST_ADMIN_PORT", default_value_t = names::ADMIN_PORT)]
    admin_port: u16,
    /// Inbound ports not redirected (ports or ranges, comma-separated).
    #[arg(long, env = "BALLAST_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    skip_inbound_ports: Vec<String>,
    /// Outbound destination ports not redirected.
    #[arg(long, env = "BALLAST_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    skip_outbound_ports: Vec<String>,
    /// Outbound destination CIDRs not redirected.
    #[arg(long, env = "BALLAST_SKIP_OUTBOUND_CIDRS", value_delimiter = ',')]
    skip_outbound_cidrs: Vec<String>,
    /// The iptables command to use.
    #[arg(long, env = "BALLAST_IPTABLES", default_value = "iptables")]
    iptables: String,
    /// Print the rules instead of installing them.
    #[arg(long, env = "BALLAST_DRY_RUN")]
    dry_run: bool,
}

/// The first set and non-empty of these environment variables.
fn env_first(names: &[&str]) -> Option<(String, String)> {
    names.iter().find_map(|n| {
        std::env::var(n)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (n.to_string(), v))
    })
}

/// The pod IP, from the downward API (`BALLAST_POD_IP` or `POD_IP`), if set.
fn pod_ip() -> Result<Option<IpAddr>, String> {
    match env_first(&["BALLAST_POD_IP", "POD_IP"]) {
        None => Ok(None),
        Some((name, v)) => v.parse().map(Some).map_err(|_| format!("{name}={v:?} is not an IP address")),
    }
}

/// `--pod` when not given: `POD_NAME` (downward API), else `HOSTNAME-PID` (outside
/// Kubernetes; the PID keeps two sidecars on one machine apart).
fn default_pod_name() -> String {
    if let Some((_, name)) = env_first(&["POD_NAME"]) {
        return name;
    }
    format!("{}-{}", hostname().unwrap_or_else(|| "ballast-sidecar".into()), std::process::id())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of its whole length, which is what is passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    // A name that fills the buffer may come without its NUL.
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// jemalloc, returning freed memory to the kernel one second after it stops being used
/// (`dirty_decay_ms:1000`, `muzzy_decay_ms:0`) from its own background thread, so an
/// idle sidecar gives memory back without traffic to trigger it.
///
/// glibc's malloc keeps its high-water mark: 1,000 keep-alive connections took a
/// sidecar to 27.5 MiB RSS and, once they had all closed, it stayed at 25.9 MiB
/// (`malloc_trim(0)` brought it to 9.6). With this jemalloc it was 22.8 MiB with the
/// connections open and 11.3 MiB three seconds after they closed; idle it starts at
/// 9.1 MiB instead of 7.9. A request costs 6% fewer instructions (36,030 instead of
/// 38,501, `benches/callgrind.sh`) and 11% fewer with every resilience layer on
/// (43,297 instead of 48,598), where allocations are most of the extra work; side by
/// side (`POLICY=1 benches/ab.sh` and `benches/ab.sh`) that is 1.07x the requests/s
/// with the full policy and 0.99x without one. linkerd2-proxy uses jemalloc too.
/// mimalloc (session 10) was as fast but kept recycled memory resident whatever its
/// purge options (35-37 MiB after large transfers to slow readers, against 11-13 MiB
/// here). `_RJEM_MALLOC_CONF` in the environment overrides these options at run time.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The options above, read by jemalloc at its first allocation (the name is the
/// prefixed `malloc_conf` of tikv-jemalloc-sys).
#[unsafe(export_name = "_rjem_malloc_conf")]
#[allow(non_upper_case_globals)]
pub static malloc_conf: Option<&'static std::ffi::c_char> =
    // SAFETY: a C string literal lives for the whole program and is NUL-terminated.
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

/// Transparent huge pages off for the whole process, whatever the node's THP mode: with
/// `always` (RHEL's default) the kernel backs 2 MiB-aligned anonymous memory with huge
/// pages on first touch, so a sidecar's few MiB of scattered heap could cost 2 MiB a
/// page (session 10 saw 6-8 MiB more idle RSS from mimalloc's huge-page `madvise`).
/// Only pages touched from here on are affected, and start-up before it touches little.
fn disable_transparent_huge_pages() {
    let (on, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
    // SAFETY: PR_SET_THP_DISABLE takes one unsigned long argument and the rest must be
    // 0; it only sets a flag on this process's memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, on, zero, zero, zero) };
    if rc != 0 {
        // Kernels before 3.15: nothing to disable, and nothing wrong with running.
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot turn transparent huge pages off");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ballast_api::logging::init(&cli.log_format);
    // Right after the logger, so a failure is logged in its format; what was allocated
    // before is a few KiB.
    disable_transparent_huge_pages();
    ballast_sidecar::telemetry::access_log::set_json(cli.log_format == "json");
    match cli.command {
        Command::Init(a) => {
            let opts = init::InitOptions {
                proxy_uid: a.proxy_uid,
                inbound_port: a.inbound_port,
                outbound_port: a.outbound_port,
                admin_port: a.admin_port,
                skip_inbound_ports: a.skip_inbound_ports,
                skip_outbound_ports: a.skip_outbound_ports,
                skip_outbound_cidrs: a.skip_outbound_cidrs,
                iptables: a.iptables,
            };
            let result = if a.dry_run {
                init::plan(&opts).map(|p| print!("{p}"))
            } else {
                init::install(&opts).map(|()| tracing::info!("iptables rules installed"))
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ballast-sidecar init: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(a) => {
            let calls = match control::parse_calls(&a.calls, &a.namespace) {
                Ok(calls) => calls,
                Err(e) => {
                    eprintln!("ballast-sidecar: --calls: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let pod_ip = match pod_ip() {
                Ok(ip) => ip,
                Err(e) => {
                    eprintln!("ballast-sidecar: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let pod = a.pod.clone().unwrap_or_else(default_pod_name);
            if let Err(e) = control::check_pod(&pod) {
                eprintln!("ballast-sidecar: --pod: {e}");
                return ExitCode::FAILURE;
            }
            let identity = match identity_options(&a) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("ballast-sidecar: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if a.control_plane.is_empty() && !calls.is_empty() {
                tracing::warn!("--calls has no effect without --control-plane");
            }
            let telemetry = ballast_sidecar::telemetry::TelemetryOptions {
                access_log_ratio: a.access_log_sampling / 100.0,
                service: a.service.clone(),
                namespace: a.namespace.clone(),
                pod: pod.clone(),
            };
            let opts = run::RunOptions {
                config: a.config,
                control_plane: a.control_plane,
                namespace: a.namespace,
                service: a.service,
                pod,
                calls,
                advertise_addr: a.advertise_addr,
                pod_ip,
                outbound_addr: a.outbound_addr,
                inbound_addr: a.inbound_addr,
                admin_addr: a.admin_addr,
                app_addr: a.app_addr,
                drain_deadline: a.drain_deadline,
                detect_timeout: a.detect_timeout,
                connect_timeout: a.connect_timeout,
                egress_dns: a.egress_dns,
                config_poll: a.config_poll,
                identity,
                inbound_probes: a.inbound_probes.clone(),
                telemetry,
            };
            let rt = match runtime(a.workers) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ballast-sidecar: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run::run(opts)) {
                Ok(()) => {
                    // Remaining tasks (connections past the deadline) are dropped here.
                    rt.shutdown_timeout(std::time::Duration::from_millis(100));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ballast-sidecar: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
