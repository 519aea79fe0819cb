//! `bulkhead`: at most `maxConcurrent` requests in flight to the service from this
//! sidecar, at most `maxPending` waiting for a slot, each waiting at most `queueTimeout`.
//! Beyond that the request is rejected at once with 503 `ballast-rejected: bulkhead-full`
//! (gRPC: RESOURCE_EXHAUSTED), so a slow dependency cannot take every connection of the
//! caller with it.
//!
//! Written here because tower's `ConcurrencyLimit` queues without bound and `LoadShed`
//! admits no queue at all; the contract wants a bounded queue with a deadline. A slot is
//! held until the response body ends (or is dropped), not just until its headers, so a
//! streaming response counts as in flight.
//!
//! Without a queue (`maxPending: 0`, the default) the slots are a plain atomic count:
//! nothing ever waits for one, and a semaphore's release takes its waiters' lock on
//! every request.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use super::{Guard, ResponseFuture};
use crate::body::{Body, BoxError};
use crate::rejection::{self, Reason};
use crate::stack::{HttpRequest, HttpResponse, HttpService};
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BulkheadConfig {
    pub max_concurrent: usize,
    pub max_pending: usize,
    pub queue_timeout: Duration,
}

/// A bulkhead: its slots and queue, shared by every clone (and so by every stack it
/// fronts).
#[derive(Clone)]
pub struct Bulkhead {
    state: Arc<State>,
}

struct State {
    slots: Slots,
    pending: AtomicUsize,
    config: BulkheadConfig,
}

enum Slots {
    /// Requests in flight, when none may wait.
    Count(AtomicUsize),
    /// Free slots, when some may wait for one.
    Queue(Arc<Semaphore>),
}

/// A slot, given back when dropped.
enum Permit {
    Counted(Arc<State>),
    Queued { _permit: OwnedSemaphorePermit },
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Permit::Counted(state) = self
            && let Slots::Count(n) = &state.slots
        {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Bulkhead {
    pub fn new(config: BulkheadConfig) -> Self {
        let max = config.max_concurrent.max(1);
        let slots = if config.max_pending == 0 {
            Slots::Count(AtomicUsize::new(0))
        } else {
            Slots::Queue(Arc::new(Semaphore::new(max)))
        };
        Self { state: Arc::new(State { slots, pending: AtomicUsize::new(0), config }) }
    }

    /// A free slot, if there is one now.
    fn try_acquire(&self) -> Option<Permit> {
        match &self.state.slots {
            Slots::Count(n) => {
                let max = self.state.config.max_concurrent.max(1);
                n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| (c < max).then_some(c + 1)).ok()?;
                Some(Permit::Counted(self.state.clone()))
            }
            Slots::Queue(s) => s.clone().try_acquire_owned().ok().map(|p| Permit::Queued { _permit: p }),
        }
    }
}

/// Leaves the pending count when dropped, however the wait ends.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl State {
    /// Waits in the queue for a slot, if the queue has room.
    async fn queue(&self) -> Option<Permit> {
        let Slots::Queue(slots) = &self.slots else { return None };
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.config.max_pending).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            return None;
        }
        let _pending = Pending(&self.pending);
        let permit = tokio::time::timeout(self.config.queue_timeout, slots.clone().acquire_owned());
        Some(Permit::Queued { _permit: permit.await.ok()?.ok()? })
    }

    fn in_flight(&self) -> usize {
        let max = self.config.max_concurrent;
        match &self.slots {
            Slots::Count(n) => n.load(Ordering::Acquire),
            Slots::Queue(s) => max - s.available_permits().min(max),
        }
    }

    fn reject(&self, req: &HttpRequest) -> HttpResponse {
        let c = self.config;
        let detail = format!(
            "{} requests in flight and {} waiting (maxConcurrent {}, maxPending {}, queueTimeout {:?})",
            self.in_flight(),
            self.pending.load(Ordering::Acquire),
            c.max_concurrent,
            c.max_pending,
            c.queue_timeout
        );
        rejection::response(Reason::BulkheadFull, rejection::is_grpc(req), &detail)
    }
}

fn hold(rsp: HttpResponse, permit: Permit) -> HttpResponse {
    rsp.map(|body| crate::body::boxed(HoldPermit { body, _permit: permit }))
}

impl Guard for Bulkhead {
    fn handle(&self, inner: &HttpService, req: HttpRequest) -> ResponseFuture {
        // A free slot is taken at once, without waiting in an async block first.
        if let Some(permit) = self.try_acquire() {
            let fut = inner.call(req);
            return Box::pin(async move { Ok(hold(fut.await?, permit)) });
        }
        if self.state.config.max_pending == 0 {
            return Box::pin(std::future::ready(Ok(self.state.reject(&req))));
        }
        let (state, inner) = (self.state.clone(), inner.clone());
        Box::pin(async move {
            let Some(permit) = state.queue().await else {
                return Ok(state.reject(&req));
            };
            Ok(hold(inner.call(req).await?, permit))
        })
    }
}

/// A body that keeps its bulkhead slot until it ends or is dropped.
struct HoldPermit {
    body: Body,
    _permit: Permit,
}

impl http_body::Body for HoldPermit {
    type Data = bytes::Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::resilience::tests_support::{ok_after, request};

    fn bulkhead(max_concurrent: usize, max_pending: usize, queue_ms: u64) -> HttpService {
        Bulkhead::new(BulkheadConfig {
            max_concurrent,
            max_pending,
            queue_timeout: Duration::from_millis(queue_ms),
        })
        .layer(ok_after(Duration::from_secs(1)))
    }

    async fn statuses(b: &HttpService, n: usize) -> Vec<u16> {
        let calls = (0..n).map(|_| {
            let b = b.clone();
            async move {
                let rsp = b.oneshot(request()).await.unwrap();
                let status = rsp.status().as_u16();
                // Reading the body to its end releases the slot.
                let _ = http_body_util::BodyExt::collect(rsp.into_body()).await;
                status
            }
        });
        futures_util::future::join_all(calls).await
    }

    #[tokio::test(start_paused = true)]
    async fn admits_max_concurrent_and_rejects_the_rest_without_a_queue() {
        let b = bulkhead(10, 0, 100);
        let s = statuses(&b, 50).await;
        assert_eq!(s.iter().filter(|&&c| c == 200).count(), 10);
        assert_eq!(s.iter().filter(|&&c| c == 503).count(), 40);
        // Every body ended: the slots are free again, and only then.
        let s = statuses(&b, 12).await;
        assert_eq!(s.iter().filter(|&&c| c == 200).count(), 10);
        let held = b.clone().oneshot(request()).await.unwrap();
        assert_eq!(
            statuses(&b, 10).await.iter().filter(|&&c| c == 200).count(),
            9,
            "one slot held by a body"
        );
        drop(held);
        assert_eq!(statuses(&b, 10).await.iter().filter(|&&c| c == 200).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_requests_wait_up_to_the_queue_timeout() {
        // 2 slots, 3 may wait 2.5 s: two get a slot at 1 s, the third at 2 s.
        let s = statuses(&bulkhead(2, 3, 2500), 8).await;
        assert_eq!(s.iter().filter(|&&c| c == 200).count(), 5, "{s:?}");
        // A queue timeout shorter than the upstream: the waiters give up.
        let s = statuses(&bulkhead(2, 3, 500), 8).await;
        assert_eq!(s.iter().filter(|&&c| c == 200).count(), 2, "{s:?}");
    }
}
