//! Resilience layers of the per-service stack (DESIGN §2, §4).
//!
//! Outermost first, as a request meets them:
//!
//! ```text
//! RecordMetrics    (stack.rs)
//! RateLimit        429 rate-limited          governor token bucket
//! Bulkhead         503 bulkhead-full         maxConcurrent, maxPending, queueTimeout
//! Router           per-route overrides       routes.rs: the first matching route's
//!                                            stack of the three layers below
//! RequestTimeout   504 timeout               timeouts.request, until response headers
//! Faults           injected delay / abort    chaos testing; inside the timeout so a
//!                                            delay fault exercises it, outside retries
//!                                            so injected aborts are not retried
//! Retry            (last upstream response)  tower::retry, budget.rs, replay.rs
//! CircuitBreaker   503 circuit-open          service level, one per policy
//! Balancer         503 no-endpoints          balance.rs: endpoint choice, outlier
//!                                            ejection, per-try timeout → pools
//! ```
//!
//! Each mechanism is a [`Guard`]: its shared state (a bucket, the bulkhead's slots),
//! cheap to clone, and what it does with one request given the stack below it. The same
//! guard can front several stacks: a pod's inbound limits are one bucket for every app
//! port. [`Guard::layer`] puts a guard in front of the type-erased [`HttpService`] below
//! it rather than a generic `S`: the stack is assembled at run time from a policy, and
//! rustc cannot prove `Send` for async blocks over generic tower futures carrying
//! `Box<dyn Error>` (see [`stack::call`](crate::stack::call)). The price is one boxed
//! future per layer a policy turns on; layers it leaves off are not in the stack at all.

pub mod budget;
pub mod bulkhead;
pub mod circuit_breaker;
pub mod faults;
pub mod inbound;
pub mod rate_limit;
pub mod replay;
pub mod retry;
pub mod routes;
pub mod timeout;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::Service;
use tower::util::BoxCloneSyncService;

use crate::body::BoxError;
use crate::stack::{HttpRequest, HttpResponse, HttpService};

pub(crate) type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send + 'static>>;

/// One resilience mechanism in front of a stack.
pub trait Guard: Clone + Send + Sync + 'static {
    /// Handles `req`: answers it itself (a rejection, an injected fault) or passes it to
    /// `inner`.
    fn handle(&self, inner: &HttpService, req: HttpRequest) -> ResponseFuture;

    /// `inner` behind this guard.
    fn layer(self, inner: HttpService) -> HttpService {
        BoxCloneSyncService::new(Guarded { guard: self, inner })
    }
}

#[derive(Clone)]
struct Guarded<G> {
    guard: G,
    inner: HttpService,
}

impl<G: Guard> Service<HttpRequest> for Guarded<G> {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: guards decide per request, and the stack below is driven to
    /// readiness by [`stack::call`](crate::stack::call).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        self.guard.handle(&self.inner, req)
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use std::time::Duration;

    use tower::util::BoxCloneSyncService;

    use crate::body;
    use crate::stack::{HttpRequest, HttpService};

    /// A service answering 200 after `delay` (tokio time, so tests can pause it).
    pub fn ok_after(delay: Duration) -> HttpService {
        BoxCloneSyncService::new(tower::service_fn(move |_req: HttpRequest| async move {
            tokio::time::sleep(delay).await;
            Ok(http::Response::new(body::full("ok")))
        }))
    }

    pub fn request() -> HttpRequest {
        http::Request::new(body::empty())
    }
}
