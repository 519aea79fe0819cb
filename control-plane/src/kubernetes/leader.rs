//! Who syncs: the replica holding the lock `<prefix>/locks/kubernetes-sync`, taken under
//! the replica's session lease the way the compactor takes its own
//! ([`crate::store::Store::lock`]).
//!
//! * Only the holder runs a [`term`](super::term::run); the others wait in the lock (role
//!   `Standby`), which a holder's stop frees at once and a holder's crash frees when its
//!   lease expires (the session TTL).
//! * When the replica's lease changes (it expired while the store was unreachable; the
//!   session granted a new one), the lock went with the old lease: the term ends and the
//!   replica contends again under the new lease. Every new term starts with fresh
//!   watchers, so becoming leader always begins with a full resync.
//! * Between a holder losing its lease and noticing it (its next renewal, a third of the
//!   TTL later) it may still write while a new holder does. Both write what Kubernetes
//!   says, with guarded writes; the overlap is bounded by that renewal interval.
//! * With the embedded store there is one replica, and the lock is simply taken.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Context, LOCK, Role, SyncState, term};
use crate::store::{LeaseId, Store};

/// Pause after a failed attempt to take the lock (the store is down).
const LOCK_RETRY: Duration = Duration::from_secs(1);
/// How long releasing the lock may take when stopping.
const UNLOCK_TIMEOUT: Duration = Duration::from_secs(2);

fn set_role(state: &watch::Sender<SyncState>, role: Role) {
    state.send_if_modified(|s| {
        let before = *s;
        s.role = role;
        if role == Role::Standby {
            s.ready = true;
        }
        if role != Role::Leader {
            s.synced = false;
        }
        *s != before
    });
}

/// Contends for the lock, syncs while holding it, until `stop`.
pub async fn lead(
    ctx: Context,
    mut lease: watch::Receiver<Option<LeaseId>>,
    state: watch::Sender<SyncState>,
    stop: CancellationToken,
) {
    let name = ctx.keys.lock(LOCK);
    let mut held: Option<LeaseId> = None;
    loop {
        let id = tokio::select! {
            _ = stop.cancelled() => break,
            // Only a lease ends the wait: no lease means the session is gone.
            l = lease.wait_for(Option::is_some) => match l.ok().and_then(|l| *l) {
                Some(id) => id,
                None => break,
            },
        };
        held = Some(id);
        set_role(&state, Role::Contending);
        let locked = tokio::select! {
            _ = stop.cancelled() => break,
            r = lease.changed() => { if r.is_err() { break } continue; }
            l = ctx.store.lock_or_wait(&name, id, || set_role(&state, Role::Standby)) => l,
        };
        let key = match locked {
            Ok(key) => key,
            Err(e) => {
                ctx.metrics.kubernetes_errors.with_label_values(&["lock"]).inc();
                tracing::warn!(error = %e, lock = %name, "cannot take the Kubernetes sync's lock; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(LOCK_RETRY) => continue,
                }
            }
        };
        tracing::info!(lock = %key, "this replica mirrors Kubernetes into the store");
        set_role(&state, Role::Leader);
        ctx.metrics.kubernetes_leader.set(1);
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            r = lease.changed() => r.is_err(),
            never = term::run(&ctx, &state) => match never {},
        };
        ctx.metrics.kubernetes_leader.set(0);
        ctx.metrics.kubernetes_synced.set(0);
        // What a standby replica would report otherwise is its last term's, stale.
        ctx.metrics.kubernetes_objects.reset();
        ctx.metrics.kubernetes_policies.reset();
        set_role(&state, Role::Contending);
        if stopping {
            break;
        }
        tracing::warn!(
            "the replica's lease changed, and the Kubernetes sync's lock went with it; contending again"
        );
    }
    // Stopping: free the lock (or our place in its queue) now, so another replica takes
    // over at once instead of after the lease's TTL.
    if let Some(id) = held {
        let key = Store::lock_key(&name, id);
        if let Err(e) = tokio::time::timeout(UNLOCK_TIMEOUT, ctx.store.unlock(&key))
            .await
            .unwrap_or_else(|_| Err(crate::store::StoreError::Backend("no answer in time".into())))
        {
            tracing::warn!(error = %e, lock = %key, "could not release the Kubernetes sync's lock; it goes with the lease");
        }
    }
}
