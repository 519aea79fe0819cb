//! `ballast-control-plane` (DESIGN §3, §5): endpoints and policy in etcd (or the
//! embedded store), pushed to every sidecar.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ballast_control_plane::identity::{self, CaSource, IdentityOptions};
use ballast_control_plane::keys::DEFAULT_PREFIX;
use ballast_control_plane::server::{self, ControlPlane, Options};
use clap::Parser;

#[derive(Parser)]
#[command(name = "ballast-control-plane", version, about = "The Ballast control plane")]
struct Cli {
    /// etcd endpoints (comma-separated URLs). Without it, an embedded in-process store:
    /// one replica, state lost on restart; for a single machine and the demo.
    #[arg(long, env = "BALLAST_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Where sidecars open their push stream.
    #[arg(long, env = "BALLAST_GRPC_ADDR", default_value = "0.0.0.0:8086")]
    grpc_addr: SocketAddr,
    /// `/metrics`, `/live`, `/ready` and the API `ballastctl` uses.
    #[arg(long, env = "BALLAST_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    admin_addr: SocketAddr,
    /// Mirror Kubernetes ResiliencePolicies, Services and EndpointSlices into the store
    /// (one replica at a time, under a lock in the store) and write each policy's status
    /// back. Needs the in-cluster configuration (the pod's service account) or KUBECONFIG.
    #[arg(long, env = "BALLAST_KUBERNETES")]
    kubernetes: bool,
    /// Key prefix in the store.
    #[arg(long, env = "BALLAST_PREFIX", default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// TTL of this replica's lease: how long its sidecars' registrations outlive it if it
    /// crashes.
    #[arg(long, env = "BALLAST_LEASE_TTL", default_value = "10s", value_parser = duration)]
    lease_ttl: Duration,
    /// How often etcd's history is compacted (by one replica, under a lock), keeping at
    /// least this much of it.
    #[arg(long, env = "BALLAST_COMPACT_EVERY", default_value = "5m", value_parser = interval)]
    compact_every: Duration,
    /// This replica's name in `ballastctl get proxies` (default: POD_NAME, else host-pid).
    #[arg(long, env = "BALLAST_REPLICA")]
    replica: Option<String>,
    /// Workload identity: a CA signs each sidecar a certificate for its service account
    /// (Identity/Certify on --grpc-addr), both ports speak TLS, and the admin API wants
    /// --admin-token-file's token. Implied by --ca-cert/--ca-key and --ca-secret; with
    /// none of them the CA is generated and kept in the store (fine for a laptop; in
    /// production give files or a Secret, since anyone who reads etcd reads the key).
    #[arg(long, env = "BALLAST_IDENTITY")]
    identity: bool,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, env = "BALLAST_TRUST_DOMAIN", default_value = ballast_api::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The CA certificate (PEM) that signs workload certificates; with --ca-key.
    #[arg(long, env = "BALLAST_CA_CERT", requires = "ca_key", conflicts_with = "ca_secret")]
    ca_cert: Option<PathBuf>,
    /// The CA's private key (PKCS#8 PEM); with --ca-cert.
    #[arg(long, env = "BALLAST_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// A Secret in the control plane's namespace (POD_NAMESPACE, default ballast-system)
    /// holding ca.crt and ca.key; created with a generated CA when missing. Needs
    /// --kubernetes.
    #[arg(long, env = "BALLAST_CA_SECRET", requires = "kubernetes")]
    ca_secret: Option<String>,
    /// How long a workload certificate is valid (sidecars renew before it ends).
    #[arg(long, env = "BALLAST_CERTIFICATE_LIFETIME", default_value = "24h", value_parser = lifetime)]
    certificate_lifetime: Duration,
    /// Another DNS name for the control plane's serving certificate (repeatable), for
    /// clients that dial it by a name other than localhost or its Service's.
    #[arg(long = "tls-name", env = "BALLAST_TLS_NAME", value_delimiter = ',')]
    tls_names: Vec<String>,
    /// A file holding the admin API's bearer token (ballastctl --token-file sends it).
    /// Required with workload identity.
    #[arg(long, env = "BALLAST_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "BALLAST_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = ballast_api::duration::parse_flag(s)?;
    if d < Duration::from_secs(2) {
        return Err("must be at least 2s (the lease is renewed every third of it)".into());
    }
    Ok(d)
}

fn interval(s: &str) -> Result<Duration, String> {
    let d = ballast_api::duration::parse_flag(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

fn lifetime(s: &str) -> Result<Duration, String> {
    let d = ballast_api::duration::parse_flag(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

/// Workload identity's options from the flags; `None` when it is off.
fn identity_options(cli: &Cli) -> Result<Option<IdentityOptions>, String> {
    if !(cli.identity || cli.ca_cert.is_some() || cli.ca_secret.is_some()) {
        return Ok(None);
    }
    let Some(file) = &cli.admin_token_file else {
        return Err("workload identity is on: pass --admin-token-file FILE with the admin API's token (a long random string, e.g. from openssl rand -hex 32)".into());
    };
    let token = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read --admin-token-file {}: {e}", file.display()))?;
    let namespace = identity::default_namespace();
    let ca = match (&cli.ca_cert, &cli.ca_key, &cli.ca_secret) {
        (Some(cert), Some(key), _) => CaSource::Files { cert: cert.clone(), key: key.clone() },
        (_, _, Some(name)) => CaSource::Secret { namespace: namespace.clone(), name: name.clone() },
        _ => CaSource::Generated,
    };
    Ok(Some(IdentityOptions {
        trust_domain: cli.trust_domain.clone(),
        ca,
        certificate_lifetime: cli.certificate_lifetime,
        server_names: cli.tls_names.clone(),
        admin_token: Some(token.trim().to_owned()),
        namespace,
    }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ballast_api::logging::init(&cli.log_format);
    let identity = match identity_options(&cli) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("ballast-control-plane: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = Options {
        etcd: cli.etcd,
        grpc_addr: cli.grpc_addr,
        admin_addr: cli.admin_addr,
        prefix: cli.prefix,
        lease_ttl: cli.lease_ttl,
        replica: cli.replica.unwrap_or_else(server::default_replica_name),
        compact_every: cli.compact_every,
        kubernetes: cli.kubernetes,
        identity,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ballast-control-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let cp = match ControlPlane::start(opts).await {
            Ok(cp) => cp,
            Err(e) => {
                eprintln!("ballast-control-plane: {e}");
                return ExitCode::FAILURE;
            }
        };
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            eprintln!("ballast-control-plane: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping; sidecars move to another replica"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        cp.stop().await;
        ExitCode::SUCCESS
    })
}
