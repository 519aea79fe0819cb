//! `faults`: chaos testing from the calling side, as Istio's fault injection. A share of
//! requests waits `delay.duration` before going on; a share is answered at once with
//! `abort.status` and `ballast-fault: abort`, never reaching the upstream. The layer sits
//! inside the request timeout (a delay fault exercises it) and outside retries (an
//! injected abort is not retried).

use ballast_api::policy::Faults as FaultPolicy;
use http::{HeaderValue, StatusCode};

use super::{Guard, ResponseFuture};
use crate::outcome::{Deadline, Limits};
use crate::rejection;
use crate::stack::{HttpRequest, HttpService};

pub use ballast_api::names::HEADER_FAULT;

#[derive(Clone)]
pub struct Faults {
    policy: FaultPolicy,
}

impl Faults {
    pub fn new(policy: FaultPolicy) -> Self {
        Self { policy }
    }
}

fn hit(percent: f64) -> bool {
    percent > 0.0 && rand::random::<f64>() * 100.0 < percent
}

impl Guard for Faults {
    fn handle(&self, inner: &HttpService, req: HttpRequest) -> ResponseFuture {
        if let Some(abort) = self.policy.abort
            && hit(abort.percent)
        {
            let status = StatusCode::from_u16(abort.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut rsp = rejection::text_response(status, "ballast: fault injected by policy (abort)");
            rsp.headers_mut().insert(HEADER_FAULT, HeaderValue::from_static("abort"));
            return Box::pin(std::future::ready(Ok(rsp)));
        }
        let delay = self.policy.delay.filter(|d| hit(d.percent)).map(|d| d.duration.get());
        let Some(delay) = delay else { return inner.call(req) };
        // The request timeout has no timer of its own above (see `timeout`): a delay
        // that outlasts the deadline ends at it, with the timeout's 504.
        let limits = req.extensions().get::<Limits>().copied().unwrap_or_default();
        let until = tokio::time::Instant::now() + delay;
        match limits.deadline() {
            Some(Deadline(deadline)) if deadline <= until => Box::pin(async move {
                tokio::time::sleep_until(deadline).await;
                Ok(limits.timeout_response())
            }),
            _ => {
                let fut = inner.call(req);
                Box::pin(async move {
                    tokio::time::sleep_until(until).await;
                    fut.await
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ballast_api::policy::{AbortFault, DelayFault};
    use tower::ServiceExt;

    use super::*;
    use crate::resilience::tests_support::{ok_after, request};

    #[tokio::test(start_paused = true)]
    async fn always_and_never() {
        let abort = FaultPolicy { abort: Some(AbortFault { percent: 100.0, status: 418 }), delay: None };
        let rsp = Faults::new(abort).layer(ok_after(Duration::ZERO)).oneshot(request()).await.unwrap();
        assert_eq!(rsp.status(), 418);
        assert_eq!(rsp.headers()[HEADER_FAULT], "abort");
        let delay = FaultPolicy {
            abort: Some(AbortFault { percent: 0.0, status: 500 }),
            delay: Some(DelayFault { percent: 100.0, duration: ballast_api::Duration::from_millis(700) }),
        };
        let started = tokio::time::Instant::now();
        let rsp = Faults::new(delay).layer(ok_after(Duration::ZERO)).oneshot(request()).await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(started.elapsed(), Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_past_the_deadline_ends_at_it_with_the_timeout() {
        let delay = FaultPolicy {
            abort: None,
            delay: Some(DelayFault { percent: 100.0, duration: ballast_api::Duration::from_secs(3) }),
        };
        let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let inner = {
            let called = called.clone();
            HttpService::from_fn(move |_req: HttpRequest| {
                called.store(true, std::sync::atomic::Ordering::SeqCst);
                Box::pin(std::future::ready(Ok(http::Response::new(crate::body::empty()))))
            })
        };
        let faulty = Faults::new(delay).layer(inner);
        let svc = crate::resilience::timeout::limits(faulty.clone(), Some(Duration::from_secs(1)), None);
        let started = tokio::time::Instant::now();
        let rsp = svc.oneshot(request()).await.unwrap();
        assert_eq!(rsp.status(), 504);
        assert_eq!(rsp.headers()[crate::HEADER_REJECTED], "timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst), "the request never went on");
        let svc = crate::resilience::timeout::limits(faulty, Some(Duration::from_secs(5)), None);
        assert_eq!(svc.oneshot(request()).await.unwrap().status(), 200);
        assert_eq!(started.elapsed(), Duration::from_secs(4));
    }

    #[test]
    fn percent_is_a_share() {
        let hits = (0..10_000).filter(|_| hit(30.0)).count();
        assert!((2_600..3_400).contains(&hits), "{hits}");
        assert!(!hit(0.0));
    }
}
