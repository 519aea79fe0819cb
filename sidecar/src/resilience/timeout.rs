//! `timeouts.request`: the whole request, every try and backoff included, must get its
//! response headers within the limit, else the client gets 504 `ballast-rejected:
//! timeout` (gRPC: DEADLINE_EXCEEDED). A body that is already streaming cannot be turned
//! into a 504; the timeout bounds the wait for the response to start, as Linkerd's does.

use std::task::{Context, Poll};
use std::time::Duration;

use tower::Service;

use super::ResponseFuture;
use crate::body::BoxError;
use crate::rejection::{self, Reason};
use crate::stack::{self, HttpRequest, HttpResponse, HttpService};

#[derive(Clone)]
pub struct RequestTimeout {
    inner: HttpService,
    timeout: Duration,
}

impl RequestTimeout {
    pub fn new(inner: HttpService, timeout: Duration) -> Self {
        Self { inner, timeout }
    }
}

impl Service<HttpRequest> for RequestTimeout {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let grpc = rejection::is_grpc(&req);
        let timeout = self.timeout;
        let fut = stack::call(self.inner.clone(), req);
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
    use super::*;
    use crate::resilience::tests_support::{ok_after, request};

    #[tokio::test(start_paused = true)]
    async fn answers_504_when_the_upstream_is_late() {
        let mut svc = RequestTimeout::new(ok_after(Duration::from_secs(3)), Duration::from_secs(2));
        let started = tokio::time::Instant::now();
        let rsp = svc.call(request()).await.unwrap();
        assert_eq!(rsp.status(), 504);
        assert_eq!(rsp.headers()[crate::HEADER_REJECTED], "timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let rsp = RequestTimeout::new(ok_after(Duration::from_secs(1)), Duration::from_secs(2))
            .call(request())
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
    }
}
