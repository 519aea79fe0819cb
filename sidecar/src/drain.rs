//! Graceful shutdown: stop accepting, let in-flight work finish, then exit.
//!
//! On the signal, accept loops return (their listeners close, so new connections are
//! refused), HTTP/1 connections finish their current request and close, HTTP/2 ones send
//! GOAWAY and finish their streams. Opaque TCP connections cannot be told to finish, so
//! they run until they end or the deadline passes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

#[derive(Clone)]
pub struct Shutdown {
    signal: watch::Sender<bool>,
    active: Arc<Active>,
}

struct Active {
    count: AtomicUsize,
    idle: Notify,
}

/// Held by each connection task; the drain waits for all of them.
pub struct Tracked {
    active: Arc<Active>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.active.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.active.idle.notify_waiters();
        }
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            signal: watch::Sender::new(false),
            active: Arc::new(Active { count: AtomicUsize::new(0), idle: Notify::new() }),
        }
    }

    /// Starts the drain. Idempotent.
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once the drain has started.
    pub fn signaled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.signal.subscribe();
        async move {
            // An error means the sender is gone, which only happens at exit.
            let _ = rx.wait_for(|draining| *draining).await;
        }
    }

    pub fn track(&self) -> Tracked {
        self.active.count.fetch_add(1, Ordering::AcqRel);
        Tracked { active: self.active.clone() }
    }

    pub fn active(&self) -> usize {
        self.active.count.load(Ordering::Acquire)
    }

    /// Waits until no tracked connection is left, or `deadline` passes. Returns how many
    /// were still open.
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        let wait = async {
            loop {
                let notified = self.active.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.active()
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
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
