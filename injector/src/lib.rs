//! The Ballast injector (DESIGN §6): a mutating admission webhook on 8443 (`/inject`) that
//! adds the `ballast-init` and `ballast-proxy` containers to annotated pods.
//!
//! Not built yet: see the Kubernetes integration issue.

/// The ports the injected proxy claims in the pod, which the injector must keep free.
pub const PROXY_PORTS: [u16; 3] =
    [ballast_api::names::OUTBOUND_PORT, ballast_api::names::INBOUND_PORT, ballast_api::names::ADMIN_PORT];
