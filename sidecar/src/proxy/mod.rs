//! Proxying a detected connection: [`http`] for HTTP/1 and HTTP/2, [`tcp`] for
//! everything else (TLS included, passed through untouched).

pub mod http;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::drain::Shutdown;
use crate::identity::MeshIdentity;
use crate::metrics::Metrics;
use crate::routes::ConfigStore;
use crate::stack::{Direction, StackContext};

/// Settings every connection handler reads.
pub struct Settings {
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    /// Resolve hosts that are not mesh services with DNS (proxy mode and CONNECT).
    pub egress_dns: bool,
    /// `service` label of inbound metrics.
    pub inbound_label: Arc<str>,
    /// Where inbound connections go when they carry no original destination.
    pub app_addr: SocketAddr,
    /// Ports of our own listeners: a passthrough to one of them on this host would loop.
    pub own_ports: Vec<u16>,
    /// The app's HTTP probes (app port, path), which the kubelet sends in plain text:
    /// admitted whatever `inbound.mtls` and `inbound.allow` say, as Linkerd admits probes.
    pub inbound_probes: Vec<(u16, String)>,
}

/// State shared by every connection.
pub struct Shared {
    pub store: Arc<ConfigStore>,
    pub ctx: Arc<StackContext>,
    pub metrics: Metrics,
    pub settings: Settings,
    pub shutdown: Shutdown,
    /// This sidecar's workload identity, when the mesh has one (`--identity-trust-anchors`).
    pub identity: Option<Arc<MeshIdentity>>,
    /// Spans, trace context and the access log.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// The HTTP/1 header read timeout's timer: one for every connection (see
    /// [`crate::coarse_timer`] for why not tokio's).
    pub header_timer: crate::coarse_timer::CoarseTimer,
}

/// What is known of one accepted connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub direction: Direction,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Where the client meant to connect, when iptables redirected it here.
    pub orig_dst: Option<SocketAddr>,
    /// Inbound over mesh TLS: the caller's verified identity. `None`: plain text (or the
    /// app's own TLS, passed through).
    pub mesh_peer: Option<Arc<MeshPeer>>,
    /// Inbound: this connection's series of `ballast_inbound_requests_by_peer_total`,
    /// resolved once per connection (its caller cannot change) instead of per request.
    pub peer_requests: Option<prometheus::IntCounter>,
}

impl ConnInfo {
    /// The inbound series for this connection's caller (`mesh_peer`).
    pub fn peer_requests(
        metrics: &Metrics,
        service: &str,
        mesh_peer: Option<&MeshPeer>,
    ) -> prometheus::IntCounter {
        let (identity, tls) = match mesh_peer {
            Some(p) => (p.header.to_str().unwrap_or(""), "true"),
            None => ("", "false"),
        };
        metrics.inbound_peer_requests.with_label_values(&[service, identity, tls])
    }
}

/// The verified identity of an inbound mesh TLS caller.
#[derive(Debug)]
pub struct MeshPeer {
    pub identity: ballast_api::identity::Identity,
    /// Its SPIFFE ID, ready for the `ballast-peer-identity` header and metric labels.
    pub header: ::http::HeaderValue,
}

impl Shared {
    /// Whether dialing `addr` would reach one of this sidecar's own listeners.
    pub fn is_own_listener(&self, addr: SocketAddr, conn: &ConnInfo) -> bool {
        addr == conn.local
            || (self.settings.own_ports.contains(&addr.port())
                && (addr.ip().is_loopback() || addr.ip().is_unspecified() || addr.ip() == conn.local.ip()))
    }

    /// Where an inbound connection goes: the app on the port the client dialled, or
    /// `--app-addr` when nothing redirected it.
    pub fn app_target(&self, conn: &ConnInfo) -> SocketAddr {
        match conn.orig_dst {
            Some(dst) => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), dst.port()),
            None => self.settings.app_addr,
        }
    }
}
