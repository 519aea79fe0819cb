//! The replica's session: one store lease, kept alive while the replica runs, under
//! which it writes what lives only as long as its streams (endpoint registrations,
//! proxy statuses).
//!
//! One lease per replica rather than one per sidecar stream: a thousand streams cost one
//! keep-alive every few seconds instead of a thousand. A stream that ends removes its own
//! keys at once (compare-and-delete, [`crate::store::Store::delete_if`]); the lease is
//! for when the replica itself dies, and takes its keys within the TTL.
//!
//! Decisions:
//! * The lease is not revoked when the replica stops: revoking would delete, in the same
//!   instant, the registrations of sidecars that have not reconnected to another replica
//!   yet, and their callers would see the endpoints vanish. Left to expire, the keys
//!   outlive the replica by the TTL, by which time the sidecars have written them again
//!   under their new replica's lease (a put moves a key to the new lease).
//! * A lease lost while the store was unreachable (it expired meanwhile) is replaced by
//!   a new one, published on [`Session::lease`]; every stream then writes its keys again.

use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::store::{LeaseId, Store, StoreError};

/// TTL of the replica's lease: a crashed replica's registrations outlive it this long.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

pub struct Session {
    /// The current lease; `None` until the first grant (or while none can be had).
    pub lease: watch::Receiver<Option<LeaseId>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Session {
    pub fn start(store: Store, ttl: Duration, metrics: Metrics) -> Self {
        let (tx, lease) = watch::channel(None);
        let task = tokio::spawn(keep(store, ttl, tx, metrics));
        Self { lease, task }
    }
}

async fn keep(store: Store, ttl: Duration, tx: watch::Sender<Option<LeaseId>>, metrics: Metrics) {
    // Renewed three times per TTL, so one lost renewal does not lose the lease.
    let every = ttl / 3;
    let mut retry = RETRY_MIN;
    loop {
        let lease = match store.grant(ttl).await {
            Ok(lease) => lease,
            Err(e) => {
                metrics.store_errors.with_label_values(&["grant"]).inc();
                tracing::warn!(error = %e, retry_in = ?retry, "cannot get the replica's lease; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        retry = RETRY_MIN;
        tracing::info!(lease = lease.0, ?ttl, "replica lease granted");
        tx.send_replace(Some(lease));
        loop {
            tokio::time::sleep(every).await;
            match store.keep_alive(lease).await {
                Ok(()) => {}
                Err(StoreError::LeaseNotFound(_)) => {
                    tracing::warn!(
                        lease = lease.0,
                        "the replica's lease expired (the store was unreachable for longer than its TTL); registering everything again under a new one"
                    );
                    break;
                }
                Err(e) => {
                    metrics.store_errors.with_label_values(&["keep_alive"]).inc();
                    tracing::warn!(error = %e, "cannot renew the replica's lease; trying again");
                }
            }
        }
    }
}
