//! The Kubernetes sync's one error type. Each message says what to check: whoever reads
//! it runs the control plane, and the fix is usually RBAC, the CRD, or etcd.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "--kubernetes: no Kubernetes configuration ({0}); run the control plane in a pod with a service account (in-cluster configuration), or point KUBECONFIG at a kubeconfig"
    )]
    Config(String),
    #[error(
        "watching {resource} failed: {message}; check that the control plane's service account may get, list and watch {resource} (deploy/control-plane RBAC)"
    )]
    Forbidden { resource: &'static str, message: String },
    #[error(
        "watching {resource} failed: {message}; is its API installed? For resiliencepolicies.ballast.io install the CRD (kubectl apply -f deploy/crd/)"
    )]
    NotFound { resource: &'static str, message: String },
    #[error("watching {resource} failed: {message}; retrying (is the Kubernetes API server reachable?)")]
    Watch { resource: &'static str, message: String },
    #[error(
        "writing the status of ResiliencePolicy {namespace}/{name} failed: {message}; check that the service account may patch resiliencepolicies/status"
    )]
    Status { namespace: String, name: String, message: String },
    #[error("the store failed while mirroring Kubernetes into it: {0}; retrying")]
    Store(#[from] StoreError),
    #[error(
        "{what} kept changing between the Kubernetes sync's read and its write (someone else writes it too); retrying"
    )]
    Contended { what: String },
}

impl KubernetesError {
    /// A watcher's error, told apart by what the operator must do about it.
    pub fn watch(resource: &'static str, e: &kube::runtime::watcher::Error) -> Self {
        use kube::runtime::watcher::Error as W;
        let status = match e {
            W::InitialListFailed(kube::Error::Api(s))
            | W::WatchStartFailed(kube::Error::Api(s))
            | W::WatchFailed(kube::Error::Api(s)) => Some(s.code),
            W::WatchError(s) => Some(s.code),
            _ => None,
        };
        let message = ballast_api::errors::chain(e);
        match status {
            Some(401 | 403) => KubernetesError::Forbidden { resource, message },
            Some(404) => KubernetesError::NotFound { resource, message },
            _ => KubernetesError::Watch { resource, message },
        }
    }

    /// The `operation` label of `ballast_control_plane_kubernetes_errors_total`.
    pub fn operation(&self) -> &'static str {
        match self {
            KubernetesError::Config(_) => "config",
            KubernetesError::Forbidden { .. }
            | KubernetesError::NotFound { .. }
            | KubernetesError::Watch { .. } => "watch",
            KubernetesError::Status { .. } => "status",
            KubernetesError::Store(_) | KubernetesError::Contended { .. } => "store",
        }
    }
}
