//! The Ballast control plane (DESIGN §3) and `ballastctl`.
//!
//! Built so far:
//! * [`store`]: etcd, or the embedded store with the same semantics, behind one type;
//! * [`keys`]: where policies, services and endpoints live in it;
//! * [`mesh`]: the store's content in memory and the slice of it each sidecar gets;
//! * [`sync`]: keeps that mesh current (one read, one watch, a full re-read on a gap);
//! * [`demo`]: `ballastctl demo`, the local mesh on one machine (still on a static
//!   sidecar configuration).
//!
//! To come with the rest of the control-plane issue: the gRPC push stream on 8086 (its
//! protocol is `api/proto/ballast/v1/discovery.proto`), the admin API on 9990 and the
//! rest of `ballastctl`.

pub mod admin;
pub mod api;
pub mod ctl;
pub mod demo;
pub mod keys;
pub mod mesh;
pub mod metrics;
pub mod push;
pub mod server;
pub mod session;
pub mod sim;
pub mod store;
pub mod sync;
