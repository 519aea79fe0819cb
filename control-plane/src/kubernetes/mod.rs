//! The Kubernetes sync (DESIGN §3, `ballast-control-plane --kubernetes`): mirrors
//! ResiliencePolicy custom resources, Services and EndpointSlices into the store, and
//! writes each policy's status back to its resource.
//!
//! Read it in this order:
//! * [`leader`]: only the replica holding `<prefix>/locks/kubernetes-sync` syncs;
//! * [`term`]: one term as leader: the watchers, and the passes over the store;
//! * [`cache`]: what a watcher listed and followed;
//! * [`policies`]: ResiliencePolicy → policy key and `Accepted` condition;
//!   [`status`]: writing that condition, only when it changes;
//! * [`services`]: Service + EndpointSlices → Service document and endpoints;
//! * [`mirror`]: the sync's own keys told from everyone else's, and guarded writes.
//!
//! # What it writes, and how it knows its own (contract additions, see [`crate::keys`])
//!
//! | Kubernetes | store | marker |
//! | --- | --- | --- |
//! | ResiliencePolicy `ns/name` | `<prefix>/policies/ns/name`, as `ballastctl apply` stores it | annotation `ballast.io/source: kubernetes` |
//! | Service `ns/name` | `<prefix>/services/ns/name` (ports, ClusterIPs, no endpoints) | the same annotation |
//! | EndpointSlice endpoints of `ns/name` | `<prefix>/endpoints/ns/name/<address>`, no lease | `"source": "kubernetes"` |
//!
//! The sync deletes only keys with its marker, and writes only keys that are absent or
//! carry it, each write guarded against a concurrent one ([`mirror`]). A policy or
//! Service applied with `ballastctl` under the same name wins over the Kubernetes object
//! (the sync reports a policy's case as `Conflict`); a sidecar's registration is never
//! touched. A pod whose sidecar registered `podIP:4143` and which an EndpointSlice lists
//! as `podIP:targetPort` is pushed once, through its sidecar ([`crate::mesh`]).
//!
//! # Readiness
//!
//! With `--kubernetes`, `/ready` waits until this replica either stands by (another
//! replica holds the lock: the store already holds what the leader mirrored) or, as
//! leader, has completed its first full sync. Otherwise the embedded store's single
//! replica would push sidecars a mesh without any Kubernetes Service in it, and they
//! would apply it. Once ready, it stays ready: a sync that later fails keeps the store as
//! it was, and sidecars are better served from it than turned away. A ResiliencePolicy
//! status the sync cannot write (RBAC) does not hold readiness back: the store is right
//! without it, and the statuses are retried on their own ([`term`]).
//!
//! # Kubernetes access
//!
//! The RBAC it needs: `get`, `list`, `watch` on `resiliencepolicies.ballast.io`,
//! `services` and `endpointslices.discovery.k8s.io`; `patch` on
//! `resiliencepolicies/status` (a merge patch). Nothing else.

pub mod cache;
pub mod error;
pub mod leader;
pub mod mirror;
pub mod policies;
pub mod services;
pub mod status;
pub mod term;

use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use error::KubernetesError;

use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::store::{LeaseId, Store};

/// The leader lock's name under the key prefix (`<prefix>/locks/kubernetes-sync`).
pub const LOCK: &str = "kubernetes-sync";

/// Where this replica stands in the sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Waiting for a lease, or for the store to answer the lock.
    #[default]
    Contending,
    /// Another replica holds the lock.
    Standby,
    /// This replica holds the lock and syncs.
    Leader,
}

/// The sync's state, for `/ready` and the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncState {
    pub role: Role,
    /// As leader: the first full sync of the current term is done.
    pub synced: bool,
    /// Latched: this replica was once standing by or synced.
    pub ready: bool,
}

impl SyncState {
    /// `Ok` when `/ready` may say ready as far as the sync goes; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.ready {
            return Ok(());
        }
        Err(match self.role {
            Role::Leader => "not ready: the first full sync from Kubernetes is not done yet (see the logs and ballast_control_plane_kubernetes_errors_total)".into(),
            _ => "not ready: contending for the Kubernetes sync's lock".into(),
        })
    }
}

/// What the sync works with.
pub struct Context {
    pub client: Client,
    pub store: Store,
    pub keys: Keys,
    pub metrics: Metrics,
}

/// A running sync: contending, standing by or syncing until stopped.
pub struct KubernetesSync {
    state: watch::Receiver<SyncState>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for KubernetesSync {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl KubernetesSync {
    /// Starts contending for the lock under the leases published on `lease` (the
    /// replica's session), and syncing whenever it is held.
    pub fn start(
        client: Client,
        store: Store,
        keys: Keys,
        lease: watch::Receiver<Option<LeaseId>>,
        metrics: Metrics,
    ) -> Self {
        let (tx, state) = watch::channel(SyncState::default());
        let stop = CancellationToken::new();
        let ctx = Context { client, store, keys, metrics };
        let task = tokio::spawn(leader::lead(ctx, lease, tx, stop.clone()));
        Self { state, stop, task: Some(task) }
    }

    pub fn state(&self) -> watch::Receiver<SyncState> {
        self.state.clone()
    }

    /// Stops syncing and frees the lock, so another replica takes over at once.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
    }
}

/// The client for `--kubernetes`: the in-cluster configuration (the pod's service
/// account), else a kubeconfig, on rustls with ring, the one crypto provider in the
/// build.
pub async fn client() -> Result<Client, KubernetesError> {
    // Another part of the process may have installed it already: that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await.map_err(|e| KubernetesError::Config(ballast_api::errors::chain(&e)))
}
