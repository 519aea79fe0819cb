//! The embedded store: etcd's data model in one process, for running the control plane
//! on a single machine with nothing else installed (the demo, development).
//!
//! Same semantics as the etcd backend, checked by one conformance suite: a revision per
//! write, watches that replay from a revision and fail with
//! [`StoreError::Compacted`] when that history is gone, leases whose keys go (in one
//! revision, as etcd's lease expiry does) when they expire or are revoked.
//!
//! Decisions:
//! * History for watches is kept for the last [`HISTORY`] revisions, then compacted
//!   automatically, so memory stays bounded; etcd leaves that to its operator
//!   (`--auto-compaction-retention`). A watcher that falls further behind gets
//!   `Compacted` and resyncs, which is what it must handle on etcd too.
//! * Watch channels are unbounded: a write must never wait for a slow watcher while
//!   holding the store's lock, and the watchers are the control plane's own tasks. A
//!   watcher that stops reading is dropped when its receiver is.
//! * Leases expire on a reaper task ticking every [`REAP_EVERY`], on tokio's clock so
//!   tests can pause time. The reaper holds only a weak reference: it ends with the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Event, Guarded, KeyValue, LeaseId, Revision, StoreError, Watch};

/// Revisions of history kept for watches.
pub const HISTORY: usize = 10_000;
/// How often expired leases are looked for.
pub const REAP_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    reaper: Arc<std::sync::OnceLock<()>>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<Result<Vec<Event>, StoreError>>,
}

struct Inner {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    /// Events of each revision after `compacted`, oldest first.
    history: VecDeque<(Revision, Vec<Event>)>,
    compacted: Revision,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    watchers: Vec<Watcher>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let inner = Inner {
            // etcd starts an empty store at revision 1.
            revision: 1,
            kvs: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 0,
            leases: HashMap::new(),
            next_lease: 0x1000,
            watchers: Vec::new(),
        };
        Self { inner: Arc::new(Mutex::new(inner)), reaper: Arc::new(std::sync::OnceLock::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        self.put_many(vec![(key.to_owned(), value, lease)])
    }

    /// Every write at one revision, or none (a missing lease fails them all), as an
    /// etcd transaction.
    pub fn put_many(&self, writes: Vec<(String, Vec<u8>, Option<LeaseId>)>) -> Result<Revision, StoreError> {
        let mut s = self.lock();
        if writes.iter().any(|w| w.2.is_some()) {
            // A lease past its deadline is gone even if the reaper has not run yet.
            s.expire(Instant::now());
        }
        if let Some(l) = writes.iter().filter_map(|w| w.2).find(|l| !s.leases.contains_key(&l.0)) {
            return Err(StoreError::LeaseNotFound(l.0));
        }
        let revision = s.revision + 1;
        let mut events = Vec::with_capacity(writes.len());
        for (key, value, lease) in writes {
            let create_revision = s.kvs.get(&key).map_or(revision, |kv| kv.create_revision);
            let previous_lease = s.kvs.get(&key).and_then(|kv| kv.lease);
            if let Some(old) = previous_lease
                && Some(old) != lease
                && let Some(l) = s.leases.get_mut(&old.0)
            {
                l.keys.remove(&key);
            }
            if let Some(l) = lease
                && let Some(l) = s.leases.get_mut(&l.0)
            {
                l.keys.insert(key.clone());
            }
            let kv = KeyValue { key: key.clone(), value, create_revision, mod_revision: revision, lease };
            s.kvs.insert(key, kv.clone());
            events.push(Event::Put(kv));
        }
        if events.is_empty() {
            return Ok(s.revision);
        }
        s.commit(revision, events);
        Ok(revision)
    }

    /// Every write at one revision if each key's last write is the one expected; else
    /// none (`None`).
    pub fn write_if(&self, writes: Vec<Guarded>) -> Option<Revision> {
        let mut s = self.lock();
        let current = |s: &Inner, key: &str| s.kvs.get(key).map_or(0, |kv| kv.mod_revision);
        if writes.iter().any(|w| current(&s, &w.key) != w.expect) {
            return None;
        }
        let revision = s.revision + 1;
        let mut events = Vec::with_capacity(writes.len());
        for w in writes {
            let previous = match &w.value {
                Some(_) => s.kvs.get(&w.key).cloned(),
                None => s.kvs.remove(&w.key),
            };
            if let Some(old) = previous.as_ref().and_then(|kv| kv.lease)
                && let Some(l) = s.leases.get_mut(&old.0)
            {
                l.keys.remove(&w.key);
            }
            match w.value {
                Some(value) => {
                    let create_revision = previous.map_or(revision, |kv| kv.create_revision);
                    let kv = KeyValue {
                        key: w.key.clone(),
                        value,
                        create_revision,
                        mod_revision: revision,
                        lease: None,
                    };
                    s.kvs.insert(w.key, kv.clone());
                    events.push(Event::Put(kv));
                }
                None if previous.is_some() => events.push(Event::Delete { key: w.key, revision }),
                None => {}
            }
        }
        if events.is_empty() {
            return Some(s.revision);
        }
        s.commit(revision, events);
        Some(revision)
    }

    pub fn get(&self, key: &str) -> (Option<KeyValue>, Revision) {
        let s = self.lock();
        (s.kvs.get(key).cloned(), s.revision)
    }

    pub fn list(&self, prefix: &str) -> (Vec<KeyValue>, Revision) {
        let s = self.lock();
        let kvs = s
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone());
        (kvs.collect(), s.revision)
    }

    pub fn delete(&self, key: &str) -> Option<Revision> {
        let mut s = self.lock();
        s.delete_keys([key.to_owned()])
    }

    pub fn delete_if(&self, key: &str, mod_revision: Revision) -> Option<Revision> {
        let mut s = self.lock();
        if s.kvs.get(key).is_some_and(|kv| kv.mod_revision == mod_revision) {
            s.delete_keys([key.to_owned()])
        } else {
            None
        }
    }

    pub fn grant(&self, ttl: Duration) -> LeaseId {
        self.start_reaper();
        // Whole seconds, as etcd.
        let ttl = Duration::from_secs(ttl.as_secs_f64().ceil().max(1.0) as u64);
        let mut s = self.lock();
        s.next_lease += 1;
        let id = s.next_lease;
        s.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
        LeaseId(id)
    }

    pub fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut s = self.lock();
        s.expire(Instant::now());
        let l = s.leases.get_mut(&lease.0).ok_or(StoreError::LeaseNotFound(lease.0))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    pub fn revoke(&self, lease: LeaseId) {
        let mut s = self.lock();
        if let Some(l) = s.leases.remove(&lease.0) {
            s.delete_keys(l.keys);
        }
    }

    pub fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.lock();
        if after < s.compacted {
            let _ = tx.send(Err(StoreError::Compacted { compact_revision: s.compacted }));
        } else {
            // Replay and registration under one lock: no write falls between them.
            for (revision, events) in &s.history {
                if *revision <= after {
                    continue;
                }
                let matching: Vec<Event> =
                    events.iter().filter(|e| e.key().starts_with(prefix)).cloned().collect();
                if !matching.is_empty() {
                    let _ = tx.send(Ok(matching));
                }
            }
            s.watchers.push(Watcher { prefix: prefix.to_owned(), tx });
        }
        Ok(Watch::unbounded(rx))
    }

    pub fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut s = self.lock();
        if revision > s.revision {
            return Err(StoreError::FutureRevision { revision, current: s.revision });
        }
        s.compact_to(revision);
        Ok(())
    }

    /// Starts the lease reaper once, on the first lease.
    fn start_reaper(&self) {
        self.reaper.get_or_init(|| {
            let weak: Weak<Mutex<Inner>> = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(REAP_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.lock().unwrap_or_else(|p| p.into_inner()).expire(Instant::now());
                }
            });
        });
    }
}

impl Inner {
    /// Records the events of a new revision and tells the watchers.
    fn commit(&mut self, revision: Revision, events: Vec<Event>) {
        self.revision = revision;
        self.watchers.retain(|w| {
            let matching: Vec<Event> =
                events.iter().filter(|e| e.key().starts_with(&w.prefix)).cloned().collect();
            matching.is_empty() || w.tx.send(Ok(matching)).is_ok()
        });
        self.history.push_back((revision, events));
        if self.history.len() > HISTORY {
            let keep_from = self.history[self.history.len() - HISTORY].0;
            self.compact_to(keep_from - 1);
        }
    }

    /// Deletes `keys` in one revision; `None` if none of them existed.
    fn delete_keys(&mut self, keys: impl IntoIterator<Item = String>) -> Option<Revision> {
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for key in keys {
            if let Some(kv) = self.kvs.remove(&key) {
                if let Some(l) = kv.lease
                    && let Some(l) = self.leases.get_mut(&l.0)
                {
                    l.keys.remove(&key);
                }
                events.push(Event::Delete { key, revision });
            }
        }
        if events.is_empty() {
            return None;
        }
        self.commit(revision, events);
        Some(revision)
    }

    fn expire(&mut self, now: Instant) {
        let due: Vec<i64> =
            self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for id in due {
            if let Some(l) = self.leases.remove(&id) {
                self.delete_keys(l.keys);
            }
        }
    }

    /// Forgets the history up to and including `revision`.
    fn compact_to(&mut self, revision: Revision) {
        if revision <= self.compacted {
            return;
        }
        while self.history.front().is_some_and(|(r, _)| *r <= revision) {
            self.history.pop_front();
        }
        self.compacted = revision;
    }
}
