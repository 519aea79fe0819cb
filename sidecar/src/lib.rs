//! The Ballast sidecar: a transparent L4/L7 proxy with a per-service tower stack.
//!
//! Read it top to bottom:
//! * [`run`] wires everything together: configuration, listeners, admin, drain.
//! * [`control`] is the control plane client: it announces the sidecar, applies the
//!   configuration the control plane pushes, and acks or nacks each version.
//! * [`server`] accepts connections, recovers the original destination ([`orig_dst`]),
//!   detects the protocol ([`detect`]) and hands the connection to [`proxy`].
//! * [`proxy::http`] decides where each request goes and keeps it faithful; [`proxy::tcp`]
//!   forwards everything else.
//! * [`routes`] holds the applied configuration as an immutable [`routes::Snapshot`] behind
//!   an atomic pointer; [`stack`] builds each service's tower stack; [`client`] pools
//!   upstream connections; [`coarse_timer`] times hyper's header reads.
//! * [`metrics`], [`admin`], [`drain`], [`rejection`]: telemetry, the admin API, graceful
//!   shutdown, and the responses the mesh makes itself.
//! * [`resilience`]: the policy's layers (rate limit, bulkhead, timeout, faults).
//! * [`identity`]: this sidecar's workload certificate and mesh mutual TLS.
//! * [`telemetry`]: trace context, spans exported with OTLP, the access log.
//! * [`init`]: the iptables rules of the init container.

pub mod admin;
pub mod balance;
pub mod body;
pub mod client;
pub mod coarse_timer;
pub mod control;
pub mod detect;
pub mod drain;
pub mod identity;
pub mod init;
pub mod metrics;
pub mod orig_dst;
pub mod outcome;
pub mod pool;
pub mod proxy;
pub mod rejection;
pub mod resilience;
pub mod routes;
pub mod run;
pub mod server;
pub mod small_write;
pub mod stack;
pub mod telemetry;

pub use ballast_api::names::HEADER_REJECTED;
