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
//! Limits           504 timeout               timeouts.request and perTry put on the
//!                                            request (timeout.rs); enforced below by
//!                                            faults, retry and the balancer's timer
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
//! `Box<dyn Error>` (rust-lang/rust#102211). The price is at most one boxed future per
//! layer a policy turns on (a guard that only lets the request through passes the
//! inner future on as it is); layers it leaves off are not in the stack at all.

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

pub(crate) use crate::stack::ResponseFuture;
use crate::stack::{HttpRequest, HttpService};

/// One resilience mechanism in front of a stack.
pub trait Guard: Clone + Send + Sync + 'static {
    /// Handles `req`: answers it itself (a rejection, an injected fault) or passes it to
    /// `inner`.
    fn handle(&self, inner: &HttpService, req: HttpRequest) -> ResponseFuture;

    /// `inner` behind this guard.
    fn layer(self, inner: HttpService) -> HttpService {
        HttpService::from_fn(move |req| self.handle(&inner, req))
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use std::time::Duration;

    use crate::body;
    use crate::stack::{HttpRequest, HttpService};

    /// A service answering 200 after `delay` (tokio time, so tests can pause it).
    pub fn ok_after(delay: Duration) -> HttpService {
        HttpService::from_fn(move |_req: HttpRequest| {
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(http::Response::new(body::full("ok")))
            })
        })
    }

    pub fn request() -> HttpRequest {
        http::Request::new(body::empty())
    }
}
