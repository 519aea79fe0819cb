//! The per-service HTTP stack, built from tower layers (DESIGN §2).
//!
//! Read top to bottom, a request to a configured service passes:
//!
//! ```text
//! RecordMetrics      ballast_requests_total, ballast_request_duration_seconds
//! (policy layers)    rate limit, bulkhead, then per route: request timeout, faults,
//!                    retry; then the circuit breaker (see crate::resilience)
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

use http::{Request, Response};
use prometheus::Histogram;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

use ballast_api::policy::PolicySpec;

use crate::balance::{Balancer, BalancerConfig, OutlierConfig};
use crate::body::{self, Body, BoxError};
use crate::client::{Clients, PoolPolicy};
use crate::metrics::Metrics;
use crate::outcome;
use crate::rejection;

pub type HttpRequest = Request<Body>;
pub type HttpResponse = Response<Body>;
/// A type-erased, cloneable stack.
pub type HttpService = BoxCloneSyncService<HttpRequest, HttpResponse, BoxError>;

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

    /// The stack for a configured service with these endpoints (address, weight), with the
    /// layers `policy` turns on (see [`crate::resilience`] for their order), and its
    /// balancer, through which the endpoints can change without rebuilding the stack.
    pub fn service_stack(
        &self,
        label: Arc<str>,
        endpoints: &[(SocketAddr, u32)],
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
        let inner = BoxCloneSyncService::new(balancer.clone());
        let inner = match policy {
            Some(p) => policy_layers(inner, p, &label, &self.metrics),
            None => {
                let _ = self.metrics.circuit_state.remove_label_values(&[&label]);
                inner
            }
        };
        (
            BoxCloneSyncService::new(RecordMetrics::new(&self.metrics, Direction::Outbound, label, inner)),
            balancer,
        )
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
        let stack = BoxCloneSyncService::new(RecordMetrics::new(
            &self.metrics,
            direction,
            label.clone(),
            UpstreamErrors::new(self.endpoint_client(addr)),
        ));
        cache.insert((direction, label.clone(), addr), stack.clone());
        stack
    }
}

impl StackContext {
    /// The pooled client of the endpoint at `addr`, answering in the stack's body type.
    fn endpoint_client(
        &self,
        addr: SocketAddr,
    ) -> impl Service<HttpRequest, Response = HttpResponse, Error = BoxError, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static {
        ServiceBuilder::new()
            .map_response(|r: Response<hyper::body::Incoming>| r.map(body::boxed))
            .map_err(BoxError::from)
            .service(self.clients.get(addr))
    }

    /// The inbound forward to the app at `addr` within the pod's `inbound` limits.
    pub fn inbound_stack(
        &self,
        label: &Arc<str>,
        addr: SocketAddr,
        limits: &crate::resilience::inbound::InboundLimits,
    ) -> HttpService {
        let inner = limits.wrap(BoxCloneSyncService::new(UpstreamErrors::new(self.endpoint_client(addr))));
        BoxCloneSyncService::new(RecordMetrics::new(&self.metrics, Direction::Inbound, label.clone(), inner))
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
    use crate::resilience::{Guard, bulkhead, circuit_breaker, rate_limit, retry, routes};
    let mut lower = balancer;
    if let Some(cb) = &policy.circuit_breaker {
        let gauge = metrics.circuit_state.with_label_values(&[label]);
        lower = circuit_breaker::CircuitBreaker::new(
            circuit_breaker::BreakerConfig::from_policy(cb),
            label.clone(),
            gauge,
        )
        .layer(lower);
    } else {
        let _ = metrics.circuit_state.remove_label_values(&[label]);
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

/// Turns errors from below into 502 responses that say what failed.
#[derive(Clone)]
pub struct UpstreamErrors<S> {
    inner: S,
}

impl<S> UpstreamErrors<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> Service<HttpRequest> for UpstreamErrors<S>
where
    S: Service<HttpRequest, Response = HttpResponse>,
    S::Error: Into<BoxError>,
{
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = UpstreamErrorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        UpstreamErrorsFuture { inner: self.inner.call(req) }
    }
}

pin_project_lite::pin_project! {
    pub struct UpstreamErrorsFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, E> Future for UpstreamErrorsFuture<F>
where
    F: Future<Output = Result<HttpResponse, E>>,
    E: Into<BoxError>,
{
    type Output = Result<HttpResponse, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match std::task::ready!(self.project().inner.poll(cx)) {
            Ok(rsp) => Poll::Ready(Ok(rsp)),
            Err(e) => Poll::Ready(Ok(outcome::upstream_error_response(&e.into()))),
        }
    }
}

/// Records request count and latency (to response headers) per direction and service.
#[derive(Clone)]
pub struct RecordMetrics<S> {
    inner: S,
    metrics: Metrics,
    direction: Direction,
    service: Arc<str>,
    duration: Histogram,
}

impl<S> RecordMetrics<S> {
    pub fn new(metrics: &Metrics, direction: Direction, service: Arc<str>, inner: S) -> Self {
        let duration = metrics.request_duration.with_label_values(&[direction.as_str(), &service]);
        Self { inner, metrics: metrics.clone(), direction, service, duration }
    }
}

impl<S> Service<HttpRequest> for RecordMetrics<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = BoxError>,
{
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = RecordMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        RecordMetricsFuture {
            inner: self.inner.call(req),
            start: Instant::now(),
            metrics: self.metrics.clone(),
            direction: self.direction,
            service: self.service.clone(),
            duration: self.duration.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct RecordMetricsFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        metrics: Metrics,
        direction: Direction,
        service: Arc<str>,
        duration: Histogram,
    }
}

impl<F> Future for RecordMetricsFuture<F>
where
    F: Future<Output = Result<HttpResponse, BoxError>>,
{
    type Output = Result<HttpResponse, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx));
        this.duration.observe(this.start.elapsed().as_secs_f64());
        let dir = this.direction.as_str();
        let service: &str = this.service;
        match &res {
            Ok(rsp) => {
                let rejected = rsp.extensions().get::<rejection::Rejected>();
                let outcome = match rejected {
                    Some(rejection::Rejected(reason)) => {
                        this.metrics
                            .rejections_total
                            .with_label_values(&[dir, service, reason.as_str()])
                            .inc();
                        "rejected"
                    }
                    None if rsp.status().is_server_error() => "failure",
                    None => "success",
                };
                this.metrics
                    .requests_total
                    .with_label_values(&[dir, service, rsp.status().as_str(), outcome])
                    .inc();
            }
            Err(_) => {
                this.metrics.requests_total.with_label_values(&[dir, service, "", "error"]).inc();
            }
        }
        Poll::Ready(res)
    }
}

/// Calls a stack once, waiting for it to be ready.
///
/// A plain function returning an erased `Send` future rather than an `async fn`: rustc
/// cannot prove `Send` for async fns that hold tower futures over types containing
/// `Box<dyn Error>` (rust-lang/rust#102211), and the erasure is one allocation.
pub fn call(
    stack: HttpService,
    req: HttpRequest,
) -> Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send + 'static>> {
    Box::pin(stack.oneshot(req))
}
