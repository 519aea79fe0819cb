//! The Ballast control plane (DESIGN §3): it will keep services, endpoints and policies in
//! etcd (or an embedded store with the same semantics), push them to every sidecar over a
//! gRPC stream on port 8086, and serve the admin API on 9990 that `ballastctl` uses.
//!
//! Not built yet: see the control-plane issue. Today this crate only checks that the
//! contract types from `ballast-api` are what it will store.

pub use ballast_api::Config;
