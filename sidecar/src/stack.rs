//! The per-service HTTP stack, built from tower layers (DESIGN §2).
//!
//! Read top to bottom, a request to a configured service passes:
//!
//! ```text
//! RecordMetrics      ballast_requests_total, ballast_request_duration_seconds
//! (policy layers)    rate limit, bulkhead, then per route: request timeout, faults,
//!                    retry; then the circuit breaker (see crate::resilience)
//! Attempt            per try: counted, a span, trace context for the next hop
//!                    (under the retry, above the breaker; see crate::telemetry)
//! Balancer           picks an endpoint (peak-EWMA p2c by default), ejects outliers,
//!                    enforces the per-try timeout, turns errors into 502/504 responses
//!                    (see crate::balance)
//! EndpointClient     pooled HTTP/1.1 or HTTP/2 connections to one endpoint
//! ```
//!
//! A stack is built when a snapshot is applied and only rebuilt when its policy (or
//! anything of its service but the endpoints) changes; a change of endpoints alone
//! updates the balancer in place, so an open circuit, held bulkhead slots and the retry
//! budget carry on. Requests in flight keep the stack they started with.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response, StatusCode};
use prometheus::{Histogram, IntCounter};
use tower::Service;

use ballast_api::policy::PolicySpec;

use crate::balance::{Balancer, BalancerConfig, OutlierConfig, Target};
use crate::body::{self, Body, BoxError};
use crate::client::{Clients, PoolPolicy};
use crate::metrics::Metrics;
use crate::outcome::{self, ReportServedBy, ServedBy};
use crate::rejection;
use crate::resilience::Guard;
use crate::telemetry::attempt::Attempt;

pub type HttpRequest = Request<Body>;
pub type HttpResponse = Response<Body>;
/// What a stack's call returns: erased, because stacks are assembled at run time from a
/// policy.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send + 'static>>;

/// A type-erased stack, shared: cloning one is a reference count, and it is called
/// through `&self`.
///
/// Not tower's `BoxCloneSyncService`: cloning that clones the boxed service, and a layer's
/// service owns the stack below it, so one clone copied every layer below, one
/// allocation each, and each layer cloned its inner stack per request. For the full
/// policy that was 56 of the 81 allocations per request (counted with a uprobe on
/// `malloc`, see benches/README.md). Every service erased here is always ready (the
/// guards decide per request, the balancer and the pools queue), so there is no
/// `poll_ready` to carry either: wrap a tower service that needs one in
/// `oneshot` inside [`HttpService::from_fn`].
#[derive(Clone)]
pub struct HttpService(Arc<dyn Fn(HttpRequest) -> ResponseFuture + Send + Sync>);

impl HttpService {
    /// A stack answering through `f`; `f` must not block.
    pub fn from_fn(f: impl Fn(HttpRequest) -> ResponseFuture + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub fn call(&self, req: HttpRequest) -> ResponseFuture {
        (self.0)(req)
    }
}

impl Service<HttpRequest> for HttpService {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> ResponseFuture {
        (self.0)(req)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// (direction, metrics label, address) of a cached endpoint stack.
type EndpointKey = (Direction, Arc<str>, SocketAddr);

/// What every stack is built from.
pub struct StackContext {
    pub clients: Arc<Clients>,
    pub metrics: Metrics,
    endpoint_stacks: Mutex<HashMap<EndpointKey, HttpService>>,
}

impl StackContext {
    pub fn new(clients: Arc<Clients>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self { clients, metrics, endpoint_stacks: Mutex::new(HashMap::new()) })
    }

    /// The stack for a configured service with these endpoints, with the
    /// layers `policy` turns on (see [`crate::resilience`] for their order), and its
    /// balancer, through which the endpoints can change without rebuilding the stack.
    pub fn service_stack(
        &self,
        label: Arc<str>,
        endpoints: &[Target],
        why_empty: &str,
        policy: Option<&PolicySpec>,
    ) -> (HttpService, Balancer) {
        let timeouts = policy.and_then(|p| p.timeouts.as_ref());
        let config = BalancerConfig {
            label: label.clone(),
            clients: self.clients.clone(),
            pool: PoolPolicy {
                connect_timeout: timeouts.and_then(|t| t.connect).map(|d| d.get()),
                idle_timeout: timeouts.and_then(|t| t.idle).map(|d| d.get()),
            },
            algorithm: policy.and_then(|p| p.load_balancer.clone()).unwrap_or_default(),
            outlier: policy.and_then(|p| p.outlier_detection.as_ref()).map(OutlierConfig::from_policy),
            why_empty: why_empty.to_owned(),
        };
        let balancer = Balancer::new(config, &self.metrics, endpoints);
        let inner = {
            let balancer = balancer.clone();
            HttpService::from_fn(move |req| balancer.request(req))
        };
        let inner = match policy {
            Some(p) => policy_layers(inner, p, &label, &self.metrics),
            None => {
                let _ = self.metrics.circuit_state.remove_label_values(&[&label]);
                Attempt::default().layer(inner)
            }
        };
        (RecordMetrics::new(&self.metrics, Direction::Outbound, label, inner).into_service(), balancer)
    }

    /// The stack for one address with no service around it: passthrough traffic and the
    /// inbound forward to the app. Cached per (direction, label, address).
    pub fn endpoint_stack(&self, direction: Direction, label: &Arc<str>, addr: SocketAddr) -> HttpService {
        let mut cache = self.endpoint_stacks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(&(direction, label.clone(), addr)) {
            return s.clone();
        }
        if cache.len() >= 4096 {
            cache.clear();
        }
        let client = Attempt::default().layer(self.endpoint_client(addr));
        let stack = RecordMetrics::new(&self.metrics, direction, label.clone(), client).into_service();
        cache.insert((direction, label.clone(), addr), stack.clone());
        stack
    }
}

impl StackContext {
    /// The pooled client of the endpoint at `addr`, answering in the stack's body type
    /// and turning its errors into 502 responses that say what failed.
    fn endpoint_client(&self, addr: SocketAddr) -> HttpService {
        let client = self.clients.get(addr);
        HttpService::from_fn(move |req| {
            let report = ReportServedBy::asked(&req);
            let fut = client.request(req);
            Box::pin(async move {
                let mut rsp = match fut.await {
                    Ok(rsp) => rsp.map(body::boxed),
                    Err(e) => outcome::upstream_error_response(&BoxError::from(e)),
                };
                if report {
                    rsp.extensions_mut().insert(ServedBy(addr));
                }
                Ok(rsp)
            })
        })
    }

    /// A stack that answers every request with the `reason` rejection, counted in the
    /// metrics like any other request of `label`.
    pub fn rejecting_stack(
        &self,
        direction: Direction,
        label: &Arc<str>,
        reason: rejection::Reason,
        detail: String,
    ) -> HttpService {
        let detail: Arc<str> = detail.into();
        let inner = HttpService::from_fn(move |req: HttpRequest| {
            let rsp = rejection::response(reason, rejection::is_grpc(&req), &detail);
            Box::pin(async move { Ok(rsp) })
        });
        RecordMetrics::new(&self.metrics, direction, label.clone(), inner).into_service()
    }

    /// The inbound forward to the app at `addr` within the pod's `inbound` limits.
    pub fn inbound_stack(
        &self,
        label: &Arc<str>,
        addr: SocketAddr,
        limits: &crate::resilience::inbound::InboundLimits,
    ) -> HttpService {
        let inner = limits.wrap(Attempt::default().layer(self.endpoint_client(addr)));
        RecordMetrics::new(&self.metrics, Direction::Inbound, label.clone(), inner).into_service()
    }
}

/// Default `bulkhead.maxConcurrent` when the section omits it (Envoy's `max_requests`).
pub const DEFAULT_MAX_CONCURRENT: u32 = 1024;

/// Wraps the balancer in the resilience layers `policy` turns on, innermost first:
/// circuit breaker, then per route (retry, faults, request timeout), then bulkhead and
/// rate limit for the whole service. Public so the micro-benchmarks time exactly this
/// assembly over an in-memory service.
pub fn policy_layers(
    balancer: HttpService,
    policy: &PolicySpec,
    label: &Arc<str>,
    metrics: &Metrics,
) -> HttpService {
    use crate::resilience::{bulkhead, circuit_breaker, rate_limit, retry, routes};
    let mut lower = balancer;
    if let Some(cb) = &policy.circuit_breaker {
        let gauge = metrics.circuit_state.with_label_values(&[label]);
        lower = circuit_breaker::CircuitBreaker::new(
            circuit_breaker::BreakerConfig::from_policy(cb),
            label.clone(),
            gauge.clone(),
        )
        .layer(lower);
        lower = Attempt::new(Some(gauge)).layer(lower);
    } else {
        let _ = metrics.circuit_state.remove_label_values(&[label]);
        lower = Attempt::default().layer(lower);
    }
    // One budget for the service, whichever route a request takes.
    let budget = retry::RetryShared::new(
        policy.retries.as_ref(),
        metrics.retries_total.with_label_values(&[label]),
        metrics.retry_budget_exhausted.with_label_values(&[label]),
    );
    let mut svc = routes::routes(lower, policy, &budget);
    if let Some(b) = &policy.bulkhead {
        let config = bulkhead::BulkheadConfig {
            max_concurrent: b.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT) as usize,
            // No queue unless the policy asks for one.
            max_pending: b.max_pending.unwrap_or(0) as usize,
            queue_timeout: b.queue_timeout.map(|d| d.get()).unwrap_or_default(),
        };
        svc = bulkhead::Bulkhead::new(config).layer(svc);
    }
    if let Some(r) = &policy.rate_limit {
        svc = rate_limit::RateLimit::new(r.requests_per_second, r.burst).layer(svc);
    }
    svc
}

/// Records request count and latency (to response headers) per direction and service.
pub struct RecordMetrics {
    inner: HttpService,
    state: Arc<RecordState>,
}

struct RecordState {
    metrics: Metrics,
    direction: Direction,
    service: Arc<str>,
    duration: Histogram,
    /// `ballast_requests_total` handles by (status, outcome), so the hot path does not
    /// hash four label values and take the vector's lock per request. A service answers
    /// with a handful of statuses; past [`COUNTER_CACHE`] of them the rest are looked up.
    counters: Mutex<Vec<((u16, &'static str), IntCounter)>>,
}

const COUNTER_CACHE: usize = 32;

impl RecordMetrics {
    pub fn new(metrics: &Metrics, direction: Direction, service: Arc<str>, inner: HttpService) -> Self {
        let duration = metrics.request_duration.with_label_values(&[direction.as_str(), &service]);
        let state = RecordState {
            metrics: metrics.clone(),
            direction,
            service,
            duration,
            counters: Mutex::new(Vec::new()),
        };
        Self { inner, state: Arc::new(state) }
    }

    pub fn into_service(self) -> HttpService {
        HttpService::from_fn(move |req| {
            Box::pin(RecordMetricsFuture {
                inner: self.inner.call(req),
                start: Instant::now(),
                state: self.state.clone(),
            })
        })
    }
}

impl RecordState {
    fn count(&self, status: StatusCode, outcome: &'static str) {
        let key = (status.as_u16(), outcome);
        let mut cache = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
            c.inc();
            return;
        }
        let counter = self.metrics.requests_total.with_label_values(&[
            self.direction.as_str(),
            &self.service,
            status.as_str(),
            outcome,
        ]);
        counter.inc();
        if cache.len() < COUNTER_CACHE {
            cache.push((key, counter));
        }
    }
}

pin_project_lite::pin_project! {
    pub struct RecordMetricsFuture {
        #[pin]
        inner: ResponseFuture,
        start: Instant,
        state: Arc<RecordState>,
    }
}

impl Future for RecordMetricsFuture {
    type Output = Result<HttpResponse, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx));
        let state: &RecordState = this.state;
        state.duration.observe(this.start.elapsed().as_secs_f64());
        let dir = state.direction.as_str();
        let service: &str = &state.service;
        match &res {
            Ok(rsp) => {
                let rejected = rsp.extensions().get::<rejection::Rejected>();
                let outcome = match rejected {
                    Some(rejection::Rejected(reason)) => {
                        state
                            .metrics
                            .rejections_total
                            .with_label_values(&[dir, service, reason.as_str()])
                            .inc();
                        "rejected"
                    }
                    None if rsp.status().is_server_error() => "failure",
                    None => "success",
                };
                state.count(rsp.status(), outcome);
            }
            Err(_) => {
                state.metrics.requests_total.with_label_values(&[dir, service, "", "error"]).inc();
            }
        }
        Poll::Ready(res)
    }
}
