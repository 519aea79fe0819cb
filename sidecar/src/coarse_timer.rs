//! A coarse [`hyper::rt::Timer`] for hyper's HTTP/1 header read timeout.
//!
//! hyper starts the header read timeout anew for every request of a keep-alive
//! connection: it drops the sleep once a head is read and makes a new one for the next.
//! With tokio's timer each is a boxed `Sleep` put into the timer wheel (the next head is
//! not there yet when hyper starts waiting for it) and taken out again: about 550
//! instructions of a proxied request's 30,000 (callgrind, session 14), for a 30-second
//! timeout that fires only on a client that stalls mid-head or leaves its connection idle.
//!
//! Nothing in tokio or hyper-util trades precision for that cost, so this timer keeps the
//! pending sleeps of a whole sidecar in one slab and fires the due ones from a sweep once
//! a [`TICK`]: making and dropping a sleep is a slab insert and remove under a lock held
//! for a few instructions. The price is precision: a sleep ends up to one tick late
//! (a header read timeout of 30 s closes an idle connection after 30-31 s). The data
//! path's per-try and request timeouts keep tokio's timer.
//!
//! The sweep is a task of the runtime that first needs it. It stops when no sleep is
//! left and is started again by the next one, so an idle sidecar wakes for nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

/// How often due sleeps are fired: how late one may end.
pub const TICK: Duration = Duration::from_secs(1);

/// The timer; clones share its sleeps and sweep.
#[derive(Clone)]
pub struct CoarseTimer(Arc<Shared>);

struct Shared {
    tick: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    sleeps: Slab<Entry>,
    /// Whether a sweep task is running (or about to).
    sweeping: bool,
}

struct Entry {
    deadline: Instant,
    waker: Option<Waker>,
    fired: bool,
}

impl Default for CoarseTimer {
    fn default() -> Self {
        Self::with_tick(TICK)
    }
}

impl CoarseTimer {
    /// A timer sweeping every `tick` (tests use a short one).
    pub fn with_tick(tick: Duration) -> Self {
        Self(Arc::new(Shared { tick, state: Mutex::default() }))
    }

    /// Sleeps not yet dropped.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.0.lock().sleeps.len()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep { shared: self.0.clone(), deadline, key: None })
    }
}

/// One sleep: in the slab from its first poll until it is dropped.
struct CoarseSleep {
    shared: Arc<Shared>,
    deadline: Instant,
    key: Option<usize>,
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut state = this.shared.lock();
        match this.key.and_then(|k| state.sleeps.get_mut(k)) {
            Some(entry) if entry.fired => Poll::Ready(()),
            Some(entry) => {
                match &mut entry.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    w => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            None => {
                // Not read against the clock here: the next sweep fires a sleep already
                // due, within the tick this timer allows anyway.
                let entry = Entry { deadline: this.deadline, waker: Some(cx.waker().clone()), fired: false };
                this.key = Some(state.sleeps.insert(entry));
                if !state.sweeping {
                    state.sweeping = true;
                    drop(state);
                    tokio::spawn(sweep(this.shared.clone()));
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.shared.lock().sleeps.try_remove(key);
        }
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

/// Lets the next sleep start a sweep again if the sweep ends in any way, its runtime
/// shutting down included (even before its first poll: made outside the async block).
struct Stopped {
    shared: Arc<Shared>,
    /// Cleared when the sweep ends by itself, having cleared the flag already.
    armed: bool,
}

impl Stopped {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.armed {
            self.shared.lock().sweeping = false;
        }
    }
}

/// Fires the due sleeps every tick while there are any.
fn sweep(shared: Arc<Shared>) -> impl Future<Output = ()> + Send {
    let mut stopped = Stopped { shared, armed: true };
    async move {
        let shared = stopped.shared.clone();
        let mut due = Vec::new();
        loop {
            tokio::time::sleep(shared.tick).await;
            let now = Instant::now();
            {
                let mut state = shared.lock();
                if state.sleeps.is_empty() {
                    // Cleared under the same lock a new sleep checks it under.
                    state.sweeping = false;
                    stopped.disarm();
                    return;
                }
                for (_, entry) in state.sleeps.iter_mut() {
                    if !entry.fired && entry.deadline <= now {
                        entry.fired = true;
                        due.extend(entry.waker.take());
                    }
                }
            }
            // Woken outside the lock: a woken task may poll its sleep at once.
            for waker in due.drain(..) {
                waker.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn a_sleep_ends_after_its_deadline_within_a_tick() {
        let timer = CoarseTimer::with_tick(ms(20));
        let start = Instant::now();
        timer.sleep(ms(100)).await;
        let took = start.elapsed();
        assert!(took >= ms(100), "ended early, after {took:?}");
        assert!(took < ms(1_000), "ended {took:?} after a 100 ms deadline with a 20 ms tick");
        assert_eq!(timer.pending(), 0, "a finished sleep leaves the slab when dropped");
    }

    #[tokio::test]
    async fn dropped_sleeps_leave_the_slab_and_the_sweep_stops() {
        let timer = CoarseTimer::with_tick(ms(10));
        let waker = Waker::noop().clone();
        let mut cx = Context::from_waker(&waker);
        let mut sleeps: Vec<_> = (0..3).map(|_| timer.sleep(Duration::from_secs(60))).collect();
        for s in &mut sleeps {
            assert!(s.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(timer.pending(), 3);
        drop(sleeps);
        assert_eq!(timer.pending(), 0);
        // The sweep notices there is nothing left and ends; a new sleep starts another.
        tokio::time::sleep(ms(100)).await;
        assert!(!timer.0.lock().sweeping, "the sweep stopped with no sleep left");
        let start = Instant::now();
        timer.sleep(ms(30)).await;
        assert!(start.elapsed() < ms(1_000), "a new sleep started a new sweep");
    }

    #[tokio::test]
    async fn only_due_sleeps_fire() {
        let timer = CoarseTimer::with_tick(ms(10));
        let short = timer.sleep(ms(20));
        let long = timer.sleep(Duration::from_secs(60));
        tokio::pin!(long);
        short.await;
        let waker = Waker::noop().clone();
        assert!(long.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
        tokio::time::sleep(ms(50)).await;
        assert!(long.as_mut().poll(&mut Context::from_waker(&waker)).is_pending(), "not due for a minute");
    }

    #[test]
    fn a_sweep_ended_by_its_runtime_lets_the_next_sleep_start_one() {
        let timer = CoarseTimer::with_tick(ms(10));
        let rt = || tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        {
            let first = rt();
            let waker = Waker::noop().clone();
            let mut s = timer.sleep(Duration::from_secs(60));
            first.block_on(async { assert!(s.as_mut().poll(&mut Context::from_waker(&waker)).is_pending()) });
            assert!(timer.0.lock().sweeping);
            drop(first);
            assert!(!timer.0.lock().sweeping, "the runtime's end dropped the sweep");
        }
        rt().block_on(async {
            let start = Instant::now();
            timer.sleep(ms(30)).await;
            assert!(start.elapsed() < ms(1_000));
        });
    }
}
