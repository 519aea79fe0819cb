//! The Ballast control plane (DESIGN §3) and `ballastctl`.
//!
//! Today this crate holds `ballastctl demo` ([`demo`]), the local mesh on one machine.
//! The control plane proper (store on etcd or embedded, the gRPC push stream on 8086, the
//! admin API on 9990 and the rest of `ballastctl`) comes with the control-plane issue;
//! until then the demo runs the sidecar on a static configuration.

pub mod demo;
