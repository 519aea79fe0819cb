//! `inbound`: limits the sidecar of the target's own pods enforces on traffic to its app
//! (DESIGN §2: metrics → inbound rate limit → inbound concurrency limit → the app).
//!
//! The limits protect the pod, so their state is one per pod: every inbound connection,
//! whatever app port it is for, draws on the same bucket and the same slots. They are
//! kept across configuration snapshots while the `inbound` section is unchanged, so a
//! reload of something else does not refill the bucket. Beyond `maxConcurrent` a request
//! is rejected at once (no queue) with 503 `bulkhead-full`.

use std::sync::Arc;
use std::time::Duration;

use ballast_api::policy::Inbound;
use governor::{DefaultDirectRateLimiter, RateLimiter};
use tower::util::BoxCloneSyncService;

use super::bulkhead::{self, BulkheadConfig};
use super::rate_limit::{self, RateLimit};
use crate::stack::HttpService;

pub struct InboundLimits {
    pub policy: Inbound,
    rate: Option<(Arc<DefaultDirectRateLimiter>, f64)>,
    concurrency: Option<Arc<bulkhead::State>>,
}

impl InboundLimits {
    pub fn new(policy: &Inbound) -> Arc<Self> {
        Arc::new(Self {
            policy: policy.clone(),
            rate: policy.rate_limit.map(|r| {
                (
                    Arc::new(RateLimiter::direct(rate_limit::quota(r.requests_per_second, r.burst))),
                    r.requests_per_second,
                )
            }),
            concurrency: policy.max_concurrent.map(|m| {
                bulkhead::State::new(BulkheadConfig {
                    max_concurrent: m as usize,
                    max_pending: 0,
                    queue_timeout: Duration::ZERO,
                })
            }),
        })
    }

    /// Wraps the forward to the app in the pod's limits.
    pub fn wrap(&self, inner: HttpService) -> HttpService {
        let mut svc = inner;
        if let Some(state) = &self.concurrency {
            svc = BoxCloneSyncService::new(bulkhead::Bulkhead::with_state(svc, state.clone()));
        }
        if let Some((limiter, rps)) = &self.rate {
            svc = BoxCloneSyncService::new(RateLimit::with_limiter(svc, limiter.clone(), *rps));
        }
        svc
    }
}
