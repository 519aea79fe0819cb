//! Compaction of the store's history, by one replica at a time.
//!
//! etcd keeps every revision until it is compacted, and Ballast writes one on every
//! registration and every acked push (proxy statuses), so without compaction etcd's
//! database grows until it hits its quota and refuses writes. Debian's etcd, like
//! upstream's, does not compact by itself unless started with
//! `--auto-compaction-retention`; the control plane does it, as kube-apiserver does.
//!
//! Work that must run once: the replica holding the `<prefix>/locks/compactor` lock
//! (under its session lease, so a crashed holder frees it within the TTL) compacts every
//! `every` to the revision it saw at the previous tick, which always leaves at least one
//! interval of history for watches that fall behind (they re-read when it is not enough:
//! [`crate::sync`]). The embedded store bounds its history itself.

use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::store::{LeaseId, Store};

/// The lock's name under the key prefix.
pub const LOCK: &str = "locks/compactor";

pub async fn run(
    store: Store,
    prefix: String,
    mut lease: watch::Receiver<Option<LeaseId>>,
    every: Duration,
    metrics: Metrics,
) {
    if matches!(store, Store::Memory(_)) {
        return;
    }
    let name = format!("{}/{LOCK}", prefix.trim_end_matches('/'));
    loop {
        let Ok(held) = lease.wait_for(Option::is_some).await.map(|l| *l) else { return };
        let Some(id) = held else { continue };
        let locked = tokio::select! {
            l = store.lock(&name, id) => l,
            // A new lease while waiting: contend again under it.
            r = lease.changed() => { if r.is_err() { return } continue; }
        };
        let key = match locked {
            Ok(key) => key,
            Err(e) => {
                metrics.store_errors.with_label_values(&["lock"]).inc();
                tracing::warn!(error = %e, "cannot take the compaction lock; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!(lock = %key, ?every, "this replica compacts the store's history");
        let mut previous = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                // The lease, and the lock with it, is gone: contend again.
                r = lease.changed() => { if r.is_err() { return } break; }
            }
            let now = match store.get(&key).await {
                Ok((_, revision)) => revision,
                Err(e) => {
                    metrics.store_errors.with_label_values(&["compact"]).inc();
                    tracing::warn!(error = %e, "cannot read the store's revision to compact");
                    continue;
                }
            };
            if let Some(to) = previous {
                match store.compact(to).await {
                    Ok(()) => tracing::debug!(revision = to, "compacted the store's history"),
                    Err(e) => {
                        metrics.store_errors.with_label_values(&["compact"]).inc();
                        tracing::warn!(error = %e, revision = to, "compaction failed");
                    }
                }
            }
            previous = Some(now);
        }
    }
}
