//! `timeouts.request` and `timeouts.perTry`.
//!
//! The whole request, every try and backoff included, must get its response headers
//! within `timeouts.request`, else the client gets 504 `ballast-rejected: timeout` (gRPC:
//! DEADLINE_EXCEEDED). A body that is already streaming cannot be turned into a 504; the
//! timeout bounds the wait for the response to start, as Linkerd's does.
//!
//! In a service's route stack ([`limits`]) the timeout costs no timer of its own: the
//! route puts the request's [`Limits`] on it, and every layer below that waits bounds the
//! wait by the deadline. The balancer runs one timer per try, to whichever of the per-try
//! timeout and the deadline comes first, and answers the 504 itself when the deadline
//! is what fired; a delay fault sleeps at most until the deadline; a retry whose backoff
//! would end past the deadline is not made (the client gets the last upstream response
//! at once rather than a 504 later). A second timer per request cost ~500 instructions
//! and a boxed future (benches/README.md, session 13), a few percent of throughput.
//!
//! [`RequestTimeout`] is the same limit for a stack that has no such layers below it (the
//! inbound forward to the app): a timer around the whole call.

use std::time::Duration;

use super::{Guard, ResponseFuture};
use crate::outcome::{Deadline, Limits};
use crate::rejection;
use crate::stack::{HttpRequest, HttpService};

/// `inner` with the route's limits put on each request: `request` counts from now.
pub fn limits(inner: HttpService, request: Option<Duration>, per_try: Option<Duration>) -> HttpService {
    if request.is_none() && per_try.is_none() {
        return inner;
    }
    HttpService::from_fn(move |mut req: HttpRequest| {
        let limits = Limits {
            deadline: request.map(|t| (Deadline(tokio::time::Instant::now() + t), t)),
            per_try,
            grpc: request.is_some() && rejection::is_grpc(&req),
        };
        req.extensions_mut().insert(limits);
        inner.call(req)
    })
}

/// The request timeout as a timer around the stack below (see the module doc).
#[derive(Clone)]
pub struct RequestTimeout {
    timeout: Duration,
}

impl RequestTimeout {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl Guard for RequestTimeout {
    fn handle(&self, inner: &HttpService, mut req: HttpRequest) -> ResponseFuture {
        let timeout = self.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let grpc = rejection::is_grpc(&req);
        let limits = req.extensions_mut().get_or_insert_default::<Limits>();
        // Lower layers tell a try cut off by this timeout (a failure) from a caller that
        // went away (nothing) by this deadline.
        limits.deadline = Some((Deadline(deadline), timeout));
        limits.grpc = grpc;
        let limits = *limits;
        let fut = inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(res) => res,
                Err(_) => Ok(limits.timeout_response()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::resilience::tests_support::{ok_after, request};

    #[tokio::test(start_paused = true)]
    async fn answers_504_when_the_upstream_is_late() {
        let svc = RequestTimeout::new(Duration::from_secs(2)).layer(ok_after(Duration::from_secs(3)));
        let started = tokio::time::Instant::now();
        let rsp = svc.oneshot(request()).await.unwrap();
        assert_eq!(rsp.status(), 504);
        assert_eq!(rsp.headers()[crate::HEADER_REJECTED], "timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let svc = RequestTimeout::new(Duration::from_secs(2)).layer(ok_after(Duration::from_secs(1)));
        assert_eq!(svc.oneshot(request()).await.unwrap().status(), 200);
    }
}
