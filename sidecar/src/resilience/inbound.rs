//! `inbound`: limits the sidecar of the target's own pods enforces on traffic to its app
//! (DESIGN §2: metrics → inbound rate limit → inbound concurrency limit → timeout → the
//! app). The timeout is the policy's `timeouts.request`: the server side bounds its app's
//! answer as the callers' sidecars do, so a caller outside the mesh (or an unmeshed
//! health checker) gets the same 504 `timeout` rather than waiting forever.
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
use super::timeout::RequestTimeout;
use crate::stack::HttpService;

pub struct InboundLimits {
    /// What they were built from: unchanged, they are kept across snapshots.
    pub policy: (Inbound, Option<Duration>),
    rate: Option<RateLimit>,
    concurrency: Option<Bulkhead>,
    timeout: Option<RequestTimeout>,
}

impl InboundLimits {
    pub fn new(policy: &Inbound, request_timeout: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            policy: (policy.clone(), request_timeout),
            timeout: request_timeout.map(RequestTimeout::new),
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
        if let Some(timeout) = &self.timeout {
            svc = timeout.clone().layer(svc);
        }
        if let Some(bulkhead) = &self.concurrency {
            svc = bulkhead.clone().layer(svc);
        }
        if let Some(rate) = &self.rate {
            svc = rate.clone().layer(svc);
        }
        svc
    }
}
