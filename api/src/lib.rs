//! The contract shared by every Ballast part (`../shared/DESIGN.md`).
//!
//! * [`policy`]: the `ResiliencePolicy` resource (DESIGN §4).
//! * [`service`]: the `Service` resource, a destination and how to find its endpoints.
//! * [`document`]: reading multi-document YAML into those resources, with errors that name
//!   the file, line and field, and [`document::Config`], the set a sidecar applies.
//! * [`duration`]: the `2s` / `500ms` durations used throughout.
//! * [`identity`]: workload identities (SPIFFE IDs) and the `inbound.allow` patterns.
//! * [`names`]: ports, headers and other well-known names that are public interface.
//! * [`proto`]: the push protocol between sidecars and the control plane (gRPC).
//! * `crd` (feature `crd`): the `ResiliencePolicy` CustomResourceDefinition, derived from
//!   the policy types with kube, its status conditions, and `ballastctl crd`'s YAML.
//! * [`errors`]: an error and its causes on one line; `logging` (feature `logging`): the
//!   binaries' log set-up.
//!
//! Nothing here does I/O beyond reading a file: the sidecar, control plane and injector
//! all depend on this crate, and the sidecar must stay small.

#[cfg(feature = "crd")]
pub mod crd;
pub mod document;
pub mod duration;
pub mod errors;
pub mod identity;
#[cfg(feature = "logging")]
pub mod logging;
pub mod names;
pub mod policy;
pub mod proto;
pub mod service;

pub use document::{Config, ConfigError, Document};
pub use duration::Duration;
pub use policy::ResiliencePolicy;
pub use service::Service;

/// `apiVersion` of every Ballast resource.
pub const API_VERSION: &str = "ballast.io/v1alpha1";

/// Kubernetes-style object metadata. Only what Ballast uses is kept; other fields that
/// `kubectl get -o yaml` prints (uid, resourceVersion, ...) are accepted and ignored, so
/// that a resource copied out of a cluster can be applied as is.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl ObjectMeta {
    /// The namespace, `default` when the document does not say.
    pub fn namespace_or_default(&self) -> &str {
        self.namespace.as_deref().unwrap_or(names::DEFAULT_NAMESPACE)
    }
}

/// A field that failed validation: `field` is the path from the document root
/// (`spec.retries.budget.ratio`), so the operator can find it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}
