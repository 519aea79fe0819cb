//! `timeouts.request`: the whole request, every try and backoff included, must get its
//! response headers within the limit, else the client gets 504 `ballast-rejected:
//! timeout` (gRPC: DEADLINE_EXCEEDED). A body that is already streaming cannot be turned
//! into a 504; the timeout bounds the wait for the response to start, as Linkerd's does.

use std::time::Duration;

use super::{Guard, ResponseFuture};
use crate::outcome::Deadline;
use crate::rejection::{self, Reason};
use crate::stack::{HttpRequest, HttpService};

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
        let grpc = rejection::is_grpc(&req);
        let timeout = self.timeout;
        // Lower layers tell a try cut off by this timeout (a failure) from a caller that
        // went away (nothing) by this deadline.
        req.extensions_mut().insert(Deadline(tokio::time::Instant::now() + timeout));
        let fut = inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(res) => res,
                Err(_) => Ok(rejection::response(
                    Reason::Timeout,
                    grpc,
                    &format!("no response within the request timeout of {timeout:?}"),
                )),
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
