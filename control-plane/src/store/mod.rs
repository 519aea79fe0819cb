//! The control plane's store (DESIGN §3): etcd, or an embedded store with the same
//! semantics when no `--etcd` is given.
//!
//! What the control plane needs from a store, and both backends provide:
//!
//! * **Revisions.** Every write gets the next revision of the whole store, as in etcd; a
//!   read returns the revision it saw. Sidecars are told a configuration's version as
//!   the revision it was built from.
//! * **Watch from a revision.** A watch replays every change after the given revision,
//!   then follows new ones, in revision order. If that history is gone (compacted), the
//!   watch ends with [`StoreError::Compacted`]: the watcher must re-read and watch again
//!   from the revision of that read. It never silently skips changes.
//! * **Leases.** A key written under a lease is deleted, with a watch event, when the
//!   lease expires (no keep-alive within its TTL) or is revoked. Endpoints registered for
//!   a sidecar's stream live under such a lease.
//! * **Locks.** Work that must run once across control-plane replicas holds a named lock,
//!   itself tied to a lease so a crashed holder releases it.
//! * **Guarded writes.** [`Store::write_if`] puts and deletes several keys at one
//!   revision only if none of them was written since the writer read it: how the
//!   Kubernetes sync keeps its hands off keys that others (`ballastctl`, sidecars) wrote
//!   between its read and its write.
//!
//! The backends are one enum rather than a trait object: there are two, they are known,
//! and async methods on an enum need no boxing.

pub mod etcd;
pub mod memory;

use std::time::Duration;

use tokio::sync::mpsc;

/// Most writes in one [`Store::put_many`]: etcd's default `--max-txn-ops`.
pub const MAX_WRITES: usize = 128;

/// A store revision: 1 for an empty store, +1 per write.
pub type Revision = i64;

/// A lease, by its store-assigned id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

#[cfg(test)]
impl KeyValue {
    /// A key holding `json`, written once at `revision`, without a lease (unit tests).
    pub(crate) fn json(key: &str, json: serde_json::Value, revision: Revision) -> Self {
        Self {
            key: key.to_owned(),
            value: serde_json::to_vec(&json).unwrap_or_default(),
            create_revision: revision,
            mod_revision: revision,
            lease: None,
        }
    }
}

/// One write of [`Store::write_if`]: `key` set to `value` (deleted when `None`), on
/// condition that the key's last write is still the one at `expect` (0: that the key
/// does not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guarded {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub expect: Revision,
}

/// One change, as a watch reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// The key was deleted (or its lease ended) at `revision`.
    Delete {
        key: String,
        revision: Revision,
    },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// A watch: batches of events in revision order (all events of one revision in one
/// batch), until an error ends it. Dropping it cancels the watch.
pub struct Watch {
    rx: WatchRx,
    /// The backend's task feeding the watch (etcd's stream reader), ended with it.
    feeder: Option<tokio::task::AbortHandle>,
}

type Batch = Result<Vec<Event>, StoreError>;

/// Bounded for etcd, so a slow consumer holds back the gRPC stream; unbounded for the
/// embedded store, whose writers must never wait for a watcher (see `memory`).
enum WatchRx {
    Bounded(mpsc::Receiver<Batch>),
    Unbounded(mpsc::UnboundedReceiver<Batch>),
}

impl Watch {
    pub(crate) fn fed_by(rx: mpsc::Receiver<Batch>, feeder: tokio::task::AbortHandle) -> Self {
        Self { rx: WatchRx::Bounded(rx), feeder: Some(feeder) }
    }

    pub(crate) fn unbounded(rx: mpsc::UnboundedReceiver<Batch>) -> Self {
        Self { rx: WatchRx::Unbounded(rx), feeder: None }
    }

    /// The next batch; `None` once the store closed the watch without an error (the
    /// store is shutting down). After an `Err` the watch is over.
    pub async fn next(&mut self) -> Option<Batch> {
        match &mut self.rx {
            WatchRx::Bounded(rx) => rx.recv().await,
            WatchRx::Unbounded(rx) => rx.recv().await,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(feeder) = &self.feeder {
            feeder.abort();
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store's history before revision {compact_revision} was compacted; re-read everything and watch from the read's revision"
    )]
    Compacted { compact_revision: Revision },
    #[error("revision {revision} is in the future (the store is at {current})")]
    FutureRevision { revision: Revision, current: Revision },
    #[error("lease {0} does not exist (it expired or was revoked)")]
    LeaseNotFound(i64),
    #[error("cannot reach etcd at {endpoints}: {message}; check --etcd and that etcd is running")]
    Unavailable { endpoints: String, message: String },
    #[error("etcd answered with an error: {0}")]
    Backend(String),
}

/// Where keys and leases live.
#[derive(Clone)]
pub enum Store {
    Memory(memory::MemoryStore),
    Etcd(etcd::EtcdStore),
}

impl Store {
    /// The embedded store, empty.
    pub fn memory() -> Self {
        Store::Memory(memory::MemoryStore::new())
    }

    /// A store on the etcd cluster at `endpoints` (`http://host:2379`), connected.
    pub async fn etcd(endpoints: &[String]) -> Result<Self, StoreError> {
        Ok(Store::Etcd(etcd::EtcdStore::connect(endpoints).await?))
    }

    /// What kind of store this is, for logs and `/ready`.
    pub fn describe(&self) -> String {
        match self {
            Store::Memory(_) => "embedded store".to_owned(),
            Store::Etcd(s) => format!("etcd at {}", s.endpoints()),
        }
    }

    /// Writes `key`, under `lease` if given; returns the write's revision.
    pub async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        match self {
            Store::Memory(s) => s.put(key, value, lease),
            Store::Etcd(s) => s.put(key, value, lease).await,
        }
    }

    /// Writes every `(key, value, lease)` at one revision, all or none (an etcd
    /// transaction; at most [`MAX_WRITES`] at once, etcd's default `--max-txn-ops`).
    /// Each key at most once: etcd refuses a transaction that names one twice.
    pub async fn put_many(
        &self,
        writes: Vec<(String, Vec<u8>, Option<LeaseId>)>,
    ) -> Result<Revision, StoreError> {
        if writes.len() > MAX_WRITES {
            return Err(StoreError::Backend(format!(
                "{} writes in one transaction; at most {MAX_WRITES}",
                writes.len()
            )));
        }
        match self {
            Store::Memory(s) => s.put_many(writes),
            Store::Etcd(s) => s.put_many(writes).await,
        }
    }

    /// Applies every write of `writes` at one revision if each key's last write is still
    /// the one it expects, and none of them otherwise (an etcd transaction, at most
    /// [`MAX_WRITES`] writes, each key at most once). Returns the revision written at, or
    /// `None` when a condition failed: someone wrote one of the keys since it was read.
    /// Keys are written without a lease.
    pub async fn write_if(&self, writes: Vec<Guarded>) -> Result<Option<Revision>, StoreError> {
        if writes.len() > MAX_WRITES {
            return Err(StoreError::Backend(format!(
                "{} writes in one transaction; at most {MAX_WRITES}",
                writes.len()
            )));
        }
        match self {
            Store::Memory(s) => Ok(s.write_if(writes)),
            Store::Etcd(s) => s.write_if(writes).await,
        }
    }

    /// The value of `key`, and the store's revision at the read.
    pub async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision), StoreError> {
        match self {
            Store::Memory(s) => Ok(s.get(key)),
            Store::Etcd(s) => s.get(key).await,
        }
    }

    /// Every key under `prefix`, in key order, and the store's revision at the read.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        match self {
            Store::Memory(s) => Ok(s.list(prefix)),
            Store::Etcd(s) => s.list(prefix).await,
        }
    }

    /// Deletes `key`; returns the delete's revision, or `None` if there was no such key.
    pub async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.delete(key)),
            Store::Etcd(s) => s.delete(key).await,
        }
    }

    /// Deletes `key` only if its last write was at `mod_revision`; returns the delete's
    /// revision, or `None` if the key is gone or was written since.
    ///
    /// How a stream's registration is removed without taking a newer one with it: when a
    /// sidecar reconnects (to this replica or another) its new stream writes the key
    /// again, and the old stream's late clean-up must leave that write alone.
    pub async fn delete_if(&self, key: &str, mod_revision: Revision) -> Result<Option<Revision>, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.delete_if(key, mod_revision)),
            Store::Etcd(s) => s.delete_if(key, mod_revision).await,
        }
    }

    /// A new lease that expires `ttl` (whole seconds, at least 1) after its last
    /// keep-alive.
    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.grant(ttl)),
            Store::Etcd(s) => s.grant(ttl).await,
        }
    }

    /// Renews `lease` for another TTL; [`StoreError::LeaseNotFound`] once it is gone.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => s.keep_alive(lease),
            Store::Etcd(s) => s.keep_alive(lease).await,
        }
    }

    /// Ends `lease` now, deleting its keys. Revoking a lease that is already gone is not
    /// an error.
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => {
                s.revoke(lease);
                Ok(())
            }
            Store::Etcd(s) => s.revoke(lease).await,
        }
    }

    /// Watches keys under `prefix`, from the changes after `after` (a revision returned
    /// by a read or write) onwards.
    pub async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        match self {
            Store::Memory(s) => s.watch(prefix, after),
            Store::Etcd(s) => s.watch(prefix, after).await,
        }
    }

    /// Drops the history before `revision`; watches from before it then fail with
    /// [`StoreError::Compacted`].
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => s.compact(revision),
            Store::Etcd(s) => s.compact(revision).await,
        }
    }

    /// Takes the lock `name`, waiting while another holder has it, and returns the
    /// lock's key for [`Store::unlock`]. The lock is held until then or until `lease`
    /// ends, so a crashed holder's lock frees itself within the lease's TTL.
    ///
    /// The recipe of etcd's own lock service, on the primitives above so both backends
    /// share it: each contender writes `name/<lease>` under its lease, and the key with
    /// the lowest create revision holds the lock; the others wait for a deletion.
    pub async fn lock(&self, name: &str, lease: LeaseId) -> Result<String, StoreError> {
        self.lock_or_wait(name, lease, || {}).await
    }

    /// [`Store::lock`], calling `waiting` each time it finds the lock held by another
    /// contender and starts waiting for it: how a replica knows it is standing by rather
    /// than about to take the lock.
    pub async fn lock_or_wait(
        &self,
        name: &str,
        lease: LeaseId,
        mut waiting: impl FnMut(),
    ) -> Result<String, StoreError> {
        let prefix = format!("{name}/");
        let key = Self::lock_key(name, lease);
        self.put(&key, Vec::new(), Some(lease)).await?;
        loop {
            let (held, revision) = self.list(&prefix).await?;
            if !held.iter().any(|kv| kv.key == key) {
                // Our key went with its lease while we waited.
                return Err(StoreError::LeaseNotFound(lease.0));
            }
            if held.iter().min_by_key(|kv| kv.create_revision).is_some_and(|first| first.key == key) {
                return Ok(key);
            }
            waiting();
            let mut watch = self.watch(&prefix, revision).await?;
            loop {
                match watch.next().await {
                    Some(Ok(events)) if events.iter().any(|e| matches!(e, Event::Delete { .. })) => break,
                    Some(Ok(_)) => continue,
                    // History gone: look again.
                    Some(Err(StoreError::Compacted { .. })) => break,
                    Some(Err(e)) => return Err(e),
                    None => return Err(StoreError::Backend("the store closed the lock's watch".into())),
                }
            }
        }
    }

    /// The key a contender for lock `name` under `lease` writes (and [`Store::unlock`]
    /// deletes), whether it holds the lock yet or still waits for it.
    pub fn lock_key(name: &str, lease: LeaseId) -> String {
        format!("{name}/{:016x}", lease.0)
    }

    pub async fn unlock(&self, key: &str) -> Result<(), StoreError> {
        self.delete(key).await.map(|_| ())
    }
}
