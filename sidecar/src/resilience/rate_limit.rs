//! `rateLimit` (and `inbound.rateLimit`): a token bucket (governor's GCRA) refilled at
//! `requestsPerSecond`, holding at most `burst` tokens. A request that finds no token is
//! answered at once with 429 `ballast-rejected: rate-limited` (gRPC: RESOURCE_EXHAUSTED).
//!
//! Without `burst`, the bucket holds a tenth of a second's worth (at least one), so a
//! limit is a limit from the first second and not exceeded by a full second's burst.
//! `scope: global` splits the limit among the target's live replicas once the control
//! plane tells each its share; until then every sidecar enforces the whole limit.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::{Guard, ResponseFuture};
use crate::rejection::{self, Reason};
use crate::stack::{HttpRequest, HttpService};

/// A token bucket, shared by every clone (and so by every stack it fronts).
#[derive(Clone)]
pub struct RateLimit {
    limiter: Arc<DefaultDirectRateLimiter>,
    rps: f64,
}

/// The governor quota for a policy's numbers.
pub fn quota(requests_per_second: f64, burst: Option<u32>) -> Quota {
    let rps = requests_per_second.max(1e-3);
    let default_burst = (rps / 10.0).ceil().max(1.0) as u32;
    let burst = NonZeroU32::new(burst.unwrap_or(default_burst)).unwrap_or(NonZeroU32::MIN);
    let period = Duration::from_secs_f64(1.0 / rps).max(Duration::from_nanos(1));
    // `with_period` only fails on a zero period, excluded above.
    Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst)
}

impl RateLimit {
    pub fn new(requests_per_second: f64, burst: Option<u32>) -> Self {
        Self {
            limiter: Arc::new(RateLimiter::direct(quota(requests_per_second, burst))),
            rps: requests_per_second,
        }
    }
}

impl Guard for RateLimit {
    fn handle(&self, inner: &HttpService, req: HttpRequest) -> ResponseFuture {
        if self.limiter.check().is_err() {
            let rsp = rejection::response(
                Reason::RateLimited,
                rejection::is_grpc(&req),
                &format!("over the limit of {} requests per second", self.rps),
            );
            return Box::pin(std::future::ready(Ok(rsp)));
        }
        inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::resilience::tests_support::{ok_after, request};

    #[tokio::test]
    async fn burst_passes_then_429() {
        let svc = RateLimit::new(1.0, Some(3)).layer(ok_after(Duration::ZERO));
        let mut codes = Vec::new();
        for _ in 0..5 {
            codes.push(svc.clone().oneshot(request()).await.unwrap().status().as_u16());
        }
        assert_eq!(codes, [200, 200, 200, 429, 429]);
    }

    #[test]
    fn default_burst_is_a_tenth_of_a_second() {
        assert_eq!(quota(500.0, None).burst_size().get(), 50);
        assert_eq!(quota(2.0, None).burst_size().get(), 1);
    }
}
