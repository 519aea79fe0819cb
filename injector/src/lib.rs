//! The Ballast injector (DESIGN §6): a mutating admission webhook that adds the
//! `ballast-init` and `ballast-proxy` containers to pods that opt in.
//!
//! The crate reads top to bottom:
//! * [`annotations`]: the `ballast.io/*` annotations, parsed and checked;
//! * [`inject`]: the injection, a pure function from a pod to a decision and a JSONPatch;
//! * [`identity`]: workload identity for the injected proxies: the mesh's trust anchors,
//!   read from the file the control plane's ConfigMap `ballast-trust-anchors` is mounted
//!   as and followed when it changes, and the projected service-account token;
//! * [`telemetry`]: tracing (the OTLP collector, its protocol, sampling) and access-log
//!   sampling for the injected proxies, from flags and annotations, checked;
//! * [`review`]: AdmissionReview `admission.k8s.io/v1` in and out, answering every body;
//! * [`namespaces`]: the namespace opt-in label, read through the API and cached;
//! * [`tls`]: the serving certificate, reloaded when its files change, or generated at
//!   start and kept in a Secret, with the webhook's `caBundle` patched to match;
//! * [`server`]: HTTPS on 8443 with `/inject`, `/live`, `/ready` and `/metrics`.

pub mod annotations;
pub mod identity;
pub mod inject;
pub mod namespaces;
pub mod review;
pub mod server;
pub mod telemetry;
pub mod tls;

/// The ports the injected proxy claims in the pod, which the app must leave free.
pub const PROXY_PORTS: [u16; 3] =
    [ballast_api::names::OUTBOUND_PORT, ballast_api::names::INBOUND_PORT, ballast_api::names::ADMIN_PORT];
