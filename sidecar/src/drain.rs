//! Graceful shutdown: stop accepting, let in-flight work finish, then exit.
//!
//! On the signal, accept loops return (their listeners close, so new connections are
//! refused), HTTP/1 connections finish their current request and close, HTTP/2 ones send
//! GOAWAY and finish their streams. Opaque TCP connections cannot be told to finish, so
//! they run until they end or the deadline passes.
//!
//! Built on tokio-util: a `CancellationToken` is the signal, a `TaskTracker` counts the
//! connections (and tunnels) still running.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    signal: CancellationToken,
    active: TaskTracker,
}

/// Held by each connection task (and each tunnel that outlives its request); the drain
/// waits for all of them.
pub type Tracked = TaskTrackerToken;

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the drain. Idempotent.
    pub fn start(&self) {
        self.signal.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Resolves once the drain has started.
    pub fn signaled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.signal.clone().cancelled_owned()
    }

    pub fn track(&self) -> Tracked {
        self.active.token()
    }

    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Waits until no tracked connection is left, or `deadline` passes. Returns how many
    /// were still open.
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        self.active.close();
        let _ = tokio::time::timeout(deadline, self.active.wait()).await;
        self.active()
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_tracked_work_up_to_the_deadline() {
        let s = Shutdown::new();
        let a = s.track();
        let b = s.track();
        s.start();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(a);
        });
        assert_eq!(s.wait_idle(Duration::from_secs(5)).await, 1, "b is still open at the deadline");
        drop(b);
        assert_eq!(s.wait_idle(Duration::from_secs(5)).await, 0);
        s.signaled().await;
        assert!(s.is_draining());
    }
}
