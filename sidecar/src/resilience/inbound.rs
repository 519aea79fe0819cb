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

use super::Guard;
use super::bulkhead::{Bulkhead, BulkheadConfig};
use super::rate_limit::RateLimit;
use crate::stack::HttpService;

pub struct InboundLimits {
    pub policy: Inbound,
    rate: Option<RateLimit>,
    concurrency: Option<Bulkhead>,
}

impl InboundLimits {
    pub fn new(policy: &Inbound) -> Arc<Self> {
        Arc::new(Self {
            policy: policy.clone(),
            rate: policy.rate_limit.map(|r| RateLimit::new(r.requests_per_second, r.burst)),
            concurrency: policy.max_concurrent.map(|m| {
                Bulkhead::new(BulkheadConfig {
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
        if let Some(bulkhead) = &self.concurrency {
            svc = bulkhead.clone().layer(svc);
        }
        if let Some(rate) = &self.rate {
            svc = rate.clone().layer(svc);
        }
        svc
    }
}
