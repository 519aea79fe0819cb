//! Well-known names, ports and headers that are public interface (DESIGN §2, §6, §7).

/// Outbound listener: the app's outgoing connections, redirected by iptables.
pub const OUTBOUND_PORT: u16 = 4140;
/// Inbound listener: connections to the app, redirected by iptables.
pub const INBOUND_PORT: u16 = 4143;
/// Admin listener: metrics, health, config, shutdown.
pub const ADMIN_PORT: u16 = 4191;
/// The UID the sidecar runs as; its own connections are not redirected.
pub const PROXY_UID: u32 = 2102;
/// Control plane gRPC push port.
pub const CONTROL_PLANE_GRPC_PORT: u16 = 8086;
/// Control plane admin port.
pub const CONTROL_PLANE_ADMIN_PORT: u16 = 9990;

/// Namespace assumed when a document or a short host name does not name one.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Cluster DNS suffix accepted in `Host`: `name.ns.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Response header set on every response the mesh itself generates instead of the upstream.
pub const HEADER_REJECTED: &str = "ballast-rejected";
/// Response header on an answer the sidecar made for an upstream that failed (`upstream`:
/// refused, reset or broken; `per-try-timeout`): not a rejection by policy, so no
/// `ballast-rejected`.
pub const HEADER_ERROR: &str = "ballast-error";
/// Response header on an answer made by a policy's fault injection (`abort`).
pub const HEADER_FAULT: &str = "ballast-fault";
/// Request header the server sidecar sets to the caller's verified identity (its SPIFFE
/// ID) on requests that arrived over mesh mutual TLS. Removed from every other request,
/// so the app can trust it: a client cannot forge it.
pub const HEADER_PEER_IDENTITY: &str = "ballast-peer-identity";
/// Request header between two sidecars: the client sidecar carries an HTTP/1 request
/// over HTTP/2 inside mesh TLS and names the original version here, so the server
/// sidecar speaks it to its app. Honoured only on mesh TLS connections, removed always.
pub const HEADER_ORIG_PROTO: &str = "ballast-orig-proto";
