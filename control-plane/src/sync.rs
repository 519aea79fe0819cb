//! Keeps the in-memory [`Mesh`] current with the store: one full read of the prefix,
//! then one watch from that read's revision, applying each batch as it comes.
//!
//! When the watch ends (the store compacted past it, etcd restarted, the connection
//! broke), the whole prefix is read again and the mesh replaced, then watched from the
//! new read: a resync, never a gap. Reads that fail are retried with jittered
//! exponential backoff (100 ms up to 5 s), and meanwhile the last mesh stays in place, so
//! sidecars keep what they have while etcd is down.
//!
//! Consumers learn of changes through `tokio::sync::watch`es: the mesh's revision, and
//! [`Change`], published only when some view may differ (a proxy status written on every
//! ack changes none, and must not wake a thousand push streams). A slow consumer sees
//! only the latest of each, which is what a per-sidecar diff against the current mesh
//! needs; [`Change::generation`] tells it whether it missed any, and so whether the
//! services named are all that changed.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::keys::Keys;
use crate::mesh::{Mesh, Name};
use crate::store::{Revision, Store, StoreError};

/// The shared, current mesh.
pub type SharedMesh = Arc<RwLock<Mesh>>;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A change of the mesh that may change views.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// +1 per change: a consumer that saw `generation - 1` missed nothing.
    pub generation: u64,
    pub revision: Revision,
    /// The services whose views changed; empty with `everything`.
    pub services: BTreeSet<Name>,
    /// The whole mesh was (re-)read.
    pub everything: bool,
}

impl Change {
    /// Whether a consumer that last saw generation `seen` must look at `services`
    /// (`Some`), or at everything (`None`).
    pub fn since(&self, seen: u64) -> Option<&BTreeSet<Name>> {
        (!self.everything && self.generation == seen + 1).then_some(&self.services)
    }
}

/// A running sync: the mesh it keeps, and the revision it last applied.
pub struct MeshSync {
    pub mesh: SharedMesh,
    /// 0 until the first read of the store; a store's revisions start at 1.
    pub revision: watch::Receiver<Revision>,
    /// The last change that may change views (generation 0: none yet).
    pub changes: watch::Receiver<Arc<Change>>,
    /// Whether the sync is following the store now (read done, watch open); false while
    /// it retries, for `/ready` and the store-error metrics.
    pub connected: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MeshSync {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MeshSync {
    /// Starts following `store` under `keys`.
    pub fn start(store: Store, keys: Keys) -> Self {
        let mesh: SharedMesh = Arc::default();
        let (revision_tx, revision) = watch::channel(0);
        let (connected_tx, connected) = watch::channel(false);
        let (changes_tx, changes) = watch::channel(Arc::default());
        let tx = Senders { revision: revision_tx, connected: connected_tx, changes: changes_tx };
        let task = tokio::spawn(run(store, keys, mesh.clone(), tx));
        Self { mesh, revision, changes, connected, task }
    }

    /// Whether the mesh has been read from the store at least once (`/ready`).
    pub fn is_loaded(&self) -> bool {
        *self.revision.borrow() > 0
    }

    /// Waits until the mesh has applied `revision` (or a later one), at most `within`.
    pub async fn caught_up(&self, revision: Revision, within: Duration) -> bool {
        let mut rx = self.revision.clone();
        tokio::time::timeout(within, rx.wait_for(|r| *r >= revision)).await.is_ok_and(|r| r.is_ok())
    }
}

struct Senders {
    revision: watch::Sender<Revision>,
    connected: watch::Sender<bool>,
    changes: watch::Sender<Arc<Change>>,
}

impl Senders {
    fn change(&self, revision: Revision, services: BTreeSet<Name>, everything: bool) {
        let generation = self.changes.borrow().generation + 1;
        self.changes.send_replace(Arc::new(Change { generation, revision, services, everything }));
    }
}

async fn run(store: Store, keys: Keys, mesh: SharedMesh, tx: Senders) {
    let mut delay = BACKOFF_MIN;
    loop {
        let ended = follow(&store, &keys, &mesh, &tx).await;
        tx.connected.send_replace(false);
        match ended {
            // A compaction needs an immediate re-read, not a pause.
            StoreError::Compacted { compact_revision } => {
                tracing::info!(
                    compact_revision,
                    "store history compacted under the watch; reading everything again"
                );
                delay = BACKOFF_MIN;
                continue;
            }
            e => {
                tracing::warn!(error = %e, retry_in = ?delay, "lost the store; keeping the last mesh and retrying");
            }
        }
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// Reads everything, then applies the watch until it ends; returns why it ended.
async fn follow(store: &Store, keys: &Keys, mesh: &SharedMesh, tx: &Senders) -> StoreError {
    let (kvs, at) = match store.list(&keys.root()).await {
        Ok(read) => read,
        Err(e) => return e,
    };
    let mut watch = match store.watch(&keys.root(), at).await {
        Ok(w) => w,
        Err(e) => return e,
    };
    let fresh = Mesh::load(keys, &kvs, at);
    for (key, why) in fresh.invalid() {
        tracing::warn!(%key, error = %why, "invalid resource in the store; it is left out");
    }
    *mesh.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    tx.change(at, BTreeSet::new(), true);
    tx.revision.send_replace(at);
    tx.connected.send_replace(true);
    loop {
        match watch.next().await {
            Some(Ok(batch)) => {
                let (now, changed) = {
                    let mut m = mesh.write().unwrap_or_else(|p| p.into_inner());
                    let changed = m.apply(keys, &batch);
                    (m.revision, changed)
                };
                if !changed.is_empty() {
                    tx.change(now, changed, false);
                }
                tx.revision.send_replace(now);
            }
            Some(Err(e)) => return e,
            None => return StoreError::Backend("the store closed the watch".into()),
        }
    }
}

/// `d` ± 20%, so replicas that lost etcd together do not retry in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::Name;

    fn service_json(ns: &str, name: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"port": 80}]}
        }))
        .expect("json")
    }

    fn names(sync: &MeshSync) -> Vec<Name> {
        sync.mesh.read().expect("lock").services().collect()
    }

    #[tokio::test]
    async fn follows_the_store_from_a_full_read() {
        let store = Store::memory();
        let keys = Keys::default();
        store
            .put("/ballast/services/shop/catalog", service_json("shop", "catalog"), None)
            .await
            .expect("put");
        let sync = MeshSync::start(store.clone(), keys);
        assert!(sync.caught_up(2, Duration::from_secs(5)).await);
        assert!(sync.is_loaded());
        assert_eq!(names(&sync), [("shop".to_owned(), "catalog".to_owned())]);

        let r = store
            .put("/ballast/services/shop/payments", service_json("shop", "payments"), None)
            .await
            .expect("put");
        assert!(sync.caught_up(r, Duration::from_secs(5)).await);
        assert_eq!(names(&sync).len(), 2);
        let r = store.delete("/ballast/services/shop/catalog").await.expect("delete").expect("deleted");
        assert!(sync.caught_up(r, Duration::from_secs(5)).await);
        assert_eq!(names(&sync), [("shop".to_owned(), "payments".to_owned())]);
        assert_eq!(sync.mesh.read().expect("lock").revision, r);
    }
}
