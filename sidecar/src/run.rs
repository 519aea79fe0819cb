//! `ballast-sidecar run`: wires the parts together and runs until drained.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ballast_api::{Config, ConfigError};
use tokio::net::TcpListener;

use crate::admin::{self, Admin};
use crate::client::Clients;
use crate::control::{self, ControlOptions};
use crate::drain::Shutdown;
use crate::metrics::Metrics;
use crate::proxy::{Settings, Shared};
use crate::routes::ConfigStore;
use crate::server;
use crate::stack::{Direction, StackContext};

/// Everything `run` needs, from the command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: Option<PathBuf>,
    /// Control plane URLs (`http://host:8086`); empty: no control plane. Exclusive with
    /// `config` (see [`control`]).
    pub control_plane: Vec<String>,
    pub namespace: String,
    pub service: Option<String>,
    /// This sidecar's name in the control plane (`ballastctl get proxies`).
    pub pod: String,
    /// Services this sidecar calls, `name.namespace`; empty: every service of its
    /// namespace.
    pub calls: Vec<String>,
    /// The endpoint registered for `service`; `None`: [`control::default_advertise_addr`].
    pub advertise_addr: Option<SocketAddr>,
    /// This pod's IP (`BALLAST_POD_IP`/`POD_IP`), for the default advertised address.
    pub pod_ip: Option<IpAddr>,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub app_addr: SocketAddr,
    pub drain_deadline: Duration,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub egress_dns: bool,
    pub config_poll: Duration,
    /// The app's HTTP probes (port, path), admitted in plain text under any policy.
    pub inbound_probes: Vec<(u16, String)>,
    /// Workload identity and mesh TLS; needs a control plane (`https://`).
    pub identity: Option<crate::identity::IdentityOptions>,
    /// Access-log sampling and the workload's names for spans.
    pub telemetry: crate::telemetry::TelemetryOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(
        "cannot listen on {addr} ({role}): {source}; is another process using it? pass --{role}-addr to choose another"
    )]
    Bind { role: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("--config and --control-plane are mutually exclusive: give one source of configuration")]
    TwoSources,
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the admin server: {0}")]
    Admin(std::io::Error),
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("tracing: {0}")]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error(
        "identity (--identity-trust-anchors) needs a control plane to issue certificates: give --control-plane https://HOST:8086"
    )]
    IdentityWithoutControlPlane,
}

pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    let use_control_plane = !opts.control_plane.is_empty();
    if use_control_plane && opts.config.is_some() {
        return Err(RunError::TwoSources);
    }
    if opts.identity.is_some() && !use_control_plane {
        return Err(RunError::IdentityWithoutControlPlane);
    }
    // With trust anchors but no token, only the control plane connection uses TLS: no
    // certificate of our own, so no mesh TLS either way.
    let control_tls = opts.identity.clone().map(crate::identity::MeshIdentity::new).transpose()?;
    let identity = control_tls.clone().filter(|m| m.has_workload_identity());
    let metrics = Metrics::new();
    let telemetry = Arc::new(crate::telemetry::Telemetry::from_env(&opts.telemetry, &metrics)?);
    let ctx = StackContext::new(
        Clients::with_identity(opts.connect_timeout, identity.clone().map(|i| (i, metrics.clone()))),
        metrics.clone(),
    );
    let store = ConfigStore::new(ctx.clone(), &opts.namespace, opts.service.as_deref());
    let source: Arc<str> = match &opts.config {
        // Nothing is applied until the control plane's first snapshot: until then the
        // sidecar is not ready (`/ready` 503).
        None if use_control_plane => format!("control-plane:{}", opts.control_plane.join(",")).into(),
        Some(path) => {
            store.apply(Config::load(path)?);
            format!("file:{}", path.display()).into()
        }
        None => {
            store.apply(Config { version: 1, ..Default::default() });
            "none (every connection passes through)".into()
        }
    };

    let bind = |role, addr| async move {
        TcpListener::bind(addr).await.map_err(|source| RunError::Bind { role, addr, source })
    };
    let outbound = bind("outbound", opts.outbound_addr).await?;
    let inbound = bind("inbound", opts.inbound_addr).await?;
    let admin_listener = std::net::TcpListener::bind(opts.admin_addr).map_err(|source| RunError::Bind {
        role: "admin",
        addr: opts.admin_addr,
        source,
    })?;
    let inbound_local = inbound.local_addr().ok();
    let own_ports = [&outbound, &inbound]
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
        .chain(admin_listener.local_addr().ok().map(|a| a.port()))
        .collect();

    let shutdown = Shutdown::new();
    let shared = Arc::new(Shared {
        store: store.clone(),
        ctx,
        metrics: metrics.clone(),
        settings: Settings {
            detect_timeout: opts.detect_timeout,
            connect_timeout: opts.connect_timeout,
            egress_dns: opts.egress_dns,
            inbound_label: opts.service.clone().unwrap_or_else(|| "app".into()).into(),
            app_addr: opts.app_addr,
            own_ports,
            inbound_probes: opts.inbound_probes.clone(),
        },
        shutdown: shutdown.clone(),
        identity: identity.clone(),
        telemetry: telemetry.clone(),
        header_timer: crate::coarse_timer::CoarseTimer::default(),
    });
    admin::spawn(
        admin_listener,
        Admin { metrics: metrics.clone(), store: store.clone(), shutdown: shutdown.clone(), source },
    )
    .map_err(RunError::Admin)?;
    tracing::info!(
        outbound = %opts.outbound_addr, inbound = %opts.inbound_addr, admin = %opts.admin_addr,
        version = store.snapshot().version, "ballast-sidecar started"
    );
    tokio::spawn(server::accept_loop(outbound, Direction::Outbound, shared.clone()));
    tokio::spawn(server::accept_loop(inbound, Direction::Inbound, shared.clone()));
    if let Some(path) = opts.config.clone() {
        tokio::spawn(watch_file(path, store.clone(), metrics.clone(), opts.config_poll, shutdown.clone()));
    }
    if let Some(identity) = &identity {
        tokio::spawn(crate::identity::certify::run(
            identity.clone(),
            opts.control_plane.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    // Started once the inbound listener accepts, since it registers this pod's endpoint.
    let control_task = use_control_plane.then(|| {
        let inbound = inbound_local.unwrap_or(opts.inbound_addr);
        let address =
            opts.advertise_addr.unwrap_or_else(|| control::default_advertise_addr(inbound, opts.pod_ip));
        let control = ControlOptions {
            endpoints: opts.control_plane.clone(),
            pod: opts.pod.clone(),
            namespace: opts.namespace.clone(),
            service: opts.service.clone(),
            address: Some(address),
            ports: vec![u32::from(opts.app_addr.port())],
            calls: opts.calls.clone(),
        };
        tracing::info!(
            control_plane = %opts.control_plane.join(","), pod = %control.pod, advertise = %address,
            "waiting for the control plane's first configuration"
        );
        tokio::spawn(control::run(
            control,
            control_tls.clone(),
            store.clone(),
            metrics.clone(),
            shutdown.clone(),
        ))
    });

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
        _ = shutdown.signaled() => {}
    }
    shutdown.start();
    let left = shutdown.wait_idle(opts.drain_deadline).await;
    if left > 0 {
        tracing::warn!(open = left, deadline = ?opts.drain_deadline, "drain deadline passed; closing remaining connections");
    } else {
        tracing::info!("drained");
    }
    // The control client ended its stream when the drain started (deregistering this
    // pod); let it finish saying so before the runtime goes away.
    if let Some(task) = control_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    // The spans of the drained requests, flushed within a bound of their own.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown(Duration::from_secs(3))).await;
    Ok(())
}

/// Reapplies the config file when it changes (polled, so it also works on the symlink
/// swaps of a Kubernetes ConfigMap) or on SIGHUP. Replace the file atomically (write a
/// temporary file, then rename it over) so the sidecar never reads half of it. A file that fails to parse or validate
/// is logged and counted, and the previous configuration stays applied.
async fn watch_file(
    path: PathBuf,
    store: Arc<ConfigStore>,
    metrics: Metrics,
    every: Duration,
    shutdown: Shutdown,
) {
    let stamp = |p: &PathBuf| {
        std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
    };
    let mut last = stamp(&path);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        let forced = tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => false,
            Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let now = stamp(&path);
        if !forced && now == last {
            continue;
        }
        // A file rewritten in place (truncate, then write) is empty for a moment; applying
        // that would drop every service until the next poll. Wait for the content; an
        // intentionally empty configuration is applied on SIGHUP.
        if !forced && now.is_some_and(|(_, len)| len == 0) {
            tracing::debug!(path = %path.display(), "config file is empty; waiting for its content (SIGHUP applies it as is)");
            continue;
        }
        last = now;
        match Config::load(&path) {
            Ok(mut cfg) => {
                cfg.version = store.snapshot().version + 1;
                tracing::info!(version = cfg.version, path = %path.display(), "configuration reloaded");
                store.apply(cfg);
            }
            Err(e) => {
                metrics.config_reload_errors.with_label_values(&["file"]).inc();
                tracing::error!(error = %e, "configuration rejected; keeping the previous one");
            }
        }
    }
}
