//! `ballast-control-plane` (DESIGN §3, §5): endpoints and policy in etcd (or the
//! embedded store), pushed to every sidecar.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    ballast_api::logging::init(&cli.log_format);
    let opts = Options {
        etcd: cli.etcd,
        grpc_addr: cli.grpc_addr,
        admin_addr: cli.admin_addr,
        prefix: cli.prefix,
        lease_ttl: cli.lease_ttl,
        replica: cli.replica.unwrap_or_else(server::default_replica_name),
        compact_every: cli.compact_every,
        kubernetes: cli.kubernetes,
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
