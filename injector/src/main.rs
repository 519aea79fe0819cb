//! `ballast-injector`: the mutating admission webhook (DESIGN §6). See the crate docs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ballast_injector::identity::TrustAnchors;
use ballast_injector::inject::Config;
use ballast_injector::namespaces::Namespaces;
use ballast_injector::server::{self, Injector, Metrics};
use ballast_injector::telemetry::{self, Collector, Percent, Protocol, TraceConfig};
use ballast_injector::tls::{self, Bootstrap, Certificate};
use clap::Parser;

/// Ballast's sidecar injector: HTTPS on --addr, POST /inject (AdmissionReview v1).
#[derive(Debug, Parser)]
#[command(name = "ballast-injector", version)]
struct Args {
    #[arg(long, env = "BALLAST_ADDR", default_value = "0.0.0.0:8443")]
    addr: SocketAddr,
    /// Serving certificate (PEM), reloaded when the file changes; with --tls-key.
    #[arg(long, env = "BALLAST_TLS_CERT", requires = "tls_key", conflicts_with = "tls_secret")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "BALLAST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Generate the certificate at start and keep it in this Secret (in --namespace);
    /// with --webhook-config, whose caBundle is set to its CA.
    #[arg(long, env = "BALLAST_TLS_SECRET", requires = "webhook_config")]
    tls_secret: Option<String>,
    /// The MutatingWebhookConfiguration to write the generated CA into.
    #[arg(long, env = "BALLAST_WEBHOOK_CONFIG", requires = "tls_secret")]
    webhook_config: Option<String>,
    /// The injector's Service: the generated certificate's DNS names, and the webhook
    /// entries whose caBundle is set.
    #[arg(long, env = "BALLAST_SERVICE_NAME", default_value = "ballast-injector")]
    service_name: String,
    /// The injector's own namespace (default: POD_NAMESPACE, else ballast-system).
    #[arg(long, env = "BALLAST_NAMESPACE")]
    namespace: Option<String>,
    /// Image of the injected ballast-init and ballast-proxy containers.
    #[arg(long, env = "BALLAST_PROXY_IMAGE", default_value = "ghcr.io/ballast-mesh/proxy:0.1.0")]
    proxy_image: String,
    /// The control plane the injected proxies connect to; must be https:// with
    /// --identity-trust-anchors-file (the control plane then serves TLS on its gRPC port). It
    /// is injected as given, never rewritten.
    #[arg(
        long,
        env = "BALLAST_CONTROL_PLANE_URL",
        default_value = "http://ballast-control-plane.ballast-system.svc:8086"
    )]
    control_plane_url: String,
    /// The mesh's trust anchors (PEM), e.g. the control plane's ConfigMap
    /// ballast-trust-anchors mounted as a volume: injected proxies get workload identity
    /// (mutual TLS) while it holds a certificate, and none while it is missing or invalid.
    /// Re-read when it changes.
    #[arg(long, env = "BALLAST_IDENTITY_TRUST_ANCHORS_FILE", value_name = "FILE")]
    identity_trust_anchors_file: Option<PathBuf>,
    /// Inject the proxy as a native sidecar (Kubernetes ≥ 1.29); pods can override with
    /// the ballast.io/native-sidecar annotation.
    #[arg(long, env = "BALLAST_NATIVE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    native_sidecar: bool,
    /// The OpenTelemetry collector (OTLP) every injected proxy exports spans to, plain
    /// http:// (the proxy does not speak TLS to it: use a collector in the cluster, e.g. a
    /// node agent or http://otel-collector.observability.svc:4317); `none` or unset: no
    /// tracing. Pods can override it with the ballast.io/trace-collector annotation.
    #[arg(long, env = "BALLAST_TRACE_COLLECTOR", value_name = "URL", value_parser = parse_collector)]
    trace_collector: Option<Collector>,
    /// How the proxies talk to the collector: grpc (port 4317) or http/protobuf (port
    /// 4318, spans posted to URL/v1/traces).
    #[arg(long, env = "BALLAST_TRACE_COLLECTOR_PROTOCOL", default_value = "grpc", value_name = "PROTOCOL", value_parser = parse_protocol)]
    trace_collector_protocol: Protocol,
    /// Percentage (0-100) of new traces the proxies sample (a caller's decision is always
    /// followed); pods can override it with ballast.io/trace-sampling.
    #[arg(long, env = "BALLAST_TRACE_SAMPLING", default_value = "1", value_name = "PERCENT", value_parser = parse_percent)]
    trace_sampling: Percent,
    #[arg(long, env = "BALLAST_PROXY_CPU_REQUEST", default_value = "10m")]
    proxy_cpu_request: String,
    #[arg(long, env = "BALLAST_PROXY_MEMORY_REQUEST", default_value = "20Mi")]
    proxy_memory_request: String,
    #[arg(long, env = "BALLAST_PROXY_MEMORY_LIMIT", default_value = "256Mi")]
    proxy_memory_limit: String,
    /// How long a namespace's opt-in label is cached.
    #[arg(long, env = "BALLAST_NAMESPACE_CACHE_TTL", default_value = "30s", value_parser = ballast_api::duration::parse_flag)]
    namespace_cache_ttl: Duration,
    /// On SIGTERM, how long open connections may take to finish.
    #[arg(long, env = "BALLAST_DRAIN_DEADLINE", default_value = "10s", value_parser = ballast_api::duration::parse_flag)]
    drain_deadline: Duration,
    #[arg(long, env = "BALLAST_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    ballast_api::logging::init(&args.log_format);
    // One crypto provider for rustls and kube's client (ring); see DEPENDENCIES.md.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ballast-injector: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    for (what, q) in [
        ("--proxy-cpu-request", &args.proxy_cpu_request),
        ("--proxy-memory-request", &args.proxy_memory_request),
        ("--proxy-memory-limit", &args.proxy_memory_limit),
    ] {
        if !ballast_injector::annotations::is_quantity(q) {
            return Err(format!("{what} {q:?} is not a Kubernetes quantity (such as 10m, 64Mi)"));
        }
    }
    let identity = args.identity_trust_anchors_file.is_some();
    ballast_injector::identity::check_control_plane_url(&args.control_plane_url, identity)
        .map_err(|e| e.to_string())?;
    if !identity && args.control_plane_url.starts_with("https://") {
        tracing::warn!(url = %args.control_plane_url, "an https control plane URL without --identity-trust-anchors-file: injected proxies have no trust anchors to verify the control plane with");
    }
    let trace = TraceConfig {
        collector: args.trace_collector.as_ref().and_then(|c| c.url().map(str::to_owned)),
        protocol: args.trace_collector_protocol,
        sampling: args.trace_sampling.clone(),
    };
    match &trace.collector {
        Some(url) => {
            if let Some(warning) = telemetry::port_mismatch(url, trace.protocol) {
                tracing::warn!("{warning}");
            }
            tracing::info!(collector = %url, protocol = %trace.protocol, sampling_percent = %trace.sampling, "injected proxies export traces");
        }
        None => tracing::info!(
            "no --trace-collector: injected proxies export no traces unless a pod sets ballast.io/trace-collector"
        ),
    }
    let namespace = args
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "ballast-system".into());
    let client = match kube::Client::try_default().await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes API client: namespace labels cannot be read, only pods annotated ballast.io/inject: enabled are injected");
            None
        }
    };
    let metrics = Metrics::new();
    // Read once now, so a missing file is reported at start; then at every review.
    let trust_anchors = args
        .identity_trust_anchors_file
        .clone()
        .map(|path| TrustAnchors::new(path, metrics.trust_anchors_loaded()));
    let certificate = match (&args.tls_cert, &args.tls_key, &args.tls_secret, &args.webhook_config) {
        (Some(cert), Some(key), _, _) => {
            let (pem, key_pair) = tls::load_files(cert, key).map_err(|e| e.to_string())?;
            let certificate = Certificate::new(key_pair);
            let reloads = metrics.certificate_reloads.clone();
            tokio::spawn(tls::watch_files(cert.clone(), key.clone(), pem, certificate.clone(), move |ok| {
                reloads.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
            }));
            certificate
        }
        (_, _, Some(secret), Some(webhook)) => {
            let client = client
                .clone()
                .ok_or("--tls-secret needs the Kubernetes API (in-cluster config or a kubeconfig)")?;
            let bootstrap = Bootstrap {
                namespace: namespace.clone(),
                secret: secret.clone(),
                webhook_config: webhook.clone(),
                service: args.service_name.clone(),
            };
            let generated = bootstrap.run(client).await.map_err(|e| e.to_string())?;
            Certificate::new(
                tls::certified_key(&generated.serving, "the generated certificate")
                    .map_err(|e| e.to_string())?,
            )
        }
        _ => {
            return Err(
                "no serving certificate: give --tls-cert and --tls-key, or --tls-secret and --webhook-config"
                    .into(),
            );
        }
    };
    let namespaces = match client {
        Some(c) => Namespaces::new(c, args.namespace_cache_ttl),
        None => Namespaces::without_api(),
    };
    let config = Config {
        proxy_image: args.proxy_image,
        control_plane_url: args.control_plane_url,
        native_sidecar: args.native_sidecar,
        cpu_request: args.proxy_cpu_request,
        memory_request: args.proxy_memory_request,
        cpu_limit: None,
        memory_limit: Some(args.proxy_memory_limit),
        trust_anchors: None,
        trace,
    };
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    tracing::info!(addr = %args.addr, "serving /inject");
    let injector = Arc::new(Injector { config, namespaces, metrics, trust_anchors });
    server::serve(
        listener,
        Arc::new(certificate.server_config()),
        injector,
        shutdown_signal(),
        args.drain_deadline,
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// `--trace-collector`: the URL checked, with the flag named in the error (clap adds the
/// value).
fn parse_collector(s: &str) -> Result<Collector, String> {
    Collector::parse(s).map_err(|problem| format!("the trace collector {problem}"))
}

fn parse_percent(s: &str) -> Result<Percent, String> {
    Percent::parse(s).map_err(|problem| format!("{s:?} {problem}"))
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    Protocol::parse(s).map_err(|problem| format!("{s:?} {problem}"))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("ballast-injector").chain(args.iter().copied()))
    }

    #[test]
    fn every_flag_has_its_env_twin() {
        Args::command().debug_assert();
        for arg in Args::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version"].contains(&long) {
                continue;
            }
            let want = format!("BALLAST_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(want.as_str()), "--{long}");
        }
    }

    #[test]
    fn trace_flags() {
        let a = parse(&[]).expect("defaults");
        assert_eq!(a.trace_collector, None);
        assert_eq!(a.trace_collector_protocol, Protocol::Grpc);
        assert_eq!(a.trace_sampling.ratio(), "0.01");
        let a = parse(&[
            "--trace-collector=http://otel-collector.observability.svc:4318",
            "--trace-collector-protocol=http/protobuf",
            "--trace-sampling=10",
        ])
        .expect("valid");
        assert_eq!(
            a.trace_collector.as_ref().and_then(Collector::url),
            Some("http://otel-collector.observability.svc:4318")
        );
        assert_eq!(a.trace_collector_protocol, Protocol::HttpProtobuf);
        assert_eq!(a.trace_sampling.ratio(), "0.1");
        assert_eq!(
            parse(&["--trace-collector=none"]).expect("valid").trace_collector,
            Some(Collector::Disabled)
        );

        for (args, flag, hint) in [
            (&["--trace-collector=https://otel-collector:4317"][..], "--trace-collector", "plain http"),
            (&["--trace-collector=otel-collector:4317"], "--trace-collector", "http://"),
            (&["--trace-collector=http://otel collector:4317"], "--trace-collector", "not a URL"),
            (
                &["--trace-collector-protocol=http/json"],
                "--trace-collector-protocol",
                "grpc or http/protobuf",
            ),
            (&["--trace-sampling=101"], "--trace-sampling", "0 to 100"),
        ] {
            let e = parse(args).expect_err("refused").to_string();
            assert!(e.contains(flag) && e.contains(hint), "{args:?}: {e}");
        }
    }
}
