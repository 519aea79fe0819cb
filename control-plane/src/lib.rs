//! The Ballast control plane (DESIGN §3) and `ballastctl`.
//!
//! Read it top to bottom:
//! * [`server`] wires a replica together: the store, the sync, the session lease, the
//!   push stream and the admin API;
//! * [`store`]: etcd, or the embedded store with the same semantics, behind one type;
//! * [`keys`]: where policies, services, endpoints and proxy statuses live in it;
//! * [`mesh`]: the store's content in memory and the slice of it each sidecar gets;
//! * [`sync`]: keeps that mesh current (one read, one watch, a full re-read on a gap);
//! * [`session`]: the replica's lease, under which its sidecars' keys live;
//! * [`compactor`]: etcd's history compacted by one replica, under a lock;
//! * [`kubernetes`]: `--kubernetes`, ResiliencePolicies, Services and EndpointSlices
//!   mirrored into the store by one replica, under a lock, with policy status written back;
//! * [`push`]: the gRPC stream to each sidecar (`api/proto/ballast/v1/discovery.proto`);
//! * [`identity`]: workload identity (off by default): the mesh CA, `Identity/Certify`
//!   (`identity.proto`), bootstrap tokens and TokenReviews, TLS on both ports;
//! * [`admin`] and [`api`]: `/metrics`, `/live`, `/ready` and the API of `ballastctl`;
//!   [`metrics`] names the metrics;
//! * [`ctl`]: `ballastctl`'s commands; [`demo`]: `ballastctl demo`;
//! * [`sim`]: a simulated sidecar, for the convergence benchmark and the tests.

pub mod admin;
pub mod api;
pub mod compactor;
pub mod ctl;
pub mod demo;
pub mod identity;
pub mod keys;
pub mod kubernetes;
pub mod mesh;
pub mod metrics;
pub mod push;
pub mod server;
pub mod session;
pub mod sim;
pub mod store;
pub mod sync;
