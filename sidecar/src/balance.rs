//! The load balancer of a service's stack, with endpoint outlier detection (DESIGN §2:
//! `load balancer → endpoint outlier detection → pool`).
//!
//! Our own service rather than `tower::balance::p2c::Balance`, because the policy asks of
//! the balancer what tower's cannot give: a retry must go to a different endpoint when
//! one exists ([`Avoid`]), ejected endpoints must leave and come back on a timer,
//! endpoints have weights, and the policy chooses among five algorithms. tower's balancer
//! also needs `&mut self` and so a `Buffer` (a task and a channel hop per request) to be
//! shared; this one is shared state behind an `Arc` and picks under no lock but the
//! endpoint's own. What tower does well is reused: each endpoint's latency is tracked by
//! [`tower::load::PeakEwma`], the same estimator linkerd2-proxy uses.
//!
//! Algorithms (`loadBalancer`):
//! * `peak-ewma` (default): power of two choices, the lower peak-EWMA cost wins;
//! * `least-request`: power of two choices, fewer in-flight requests (per unit weight);
//! * `round-robin`: weighted round robin over an interleaved schedule;
//! * `random`: weighted random;
//! * `consistent-hash:HEADER`: weighted rendezvous hashing of the header's value, so a
//!   key sticks to its endpoint while the endpoint set is unchanged and only the keys of
//!   a removed endpoint move; requests without the header are spread at random.
//!
//! Outlier detection (`outlierDetection`): an endpoint that fails `consecutiveFailures`
//! tries in a row (see [`outcome::is_failure`]: 5xx, reset, connect failure, per-try
//! timeout, gRPC statuses of a server in trouble) is ejected for
//! `baseEjection` × the number of times it was ejected (capped at 10×, as Envoy caps it
//! with `max_ejection_time`). At most `maxEjectedPercent` of the endpoints are out at
//! once, rounded down, but one may always be ejected when there are two or more: a
//! service of two replicas must be protected from its broken one too.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use ballast_api::policy::{LoadBalancer, OutlierDetection};
use prometheus::IntGauge;
use tokio::time::Instant;
use tower::Service;
use tower::load::{CompleteOnResponse, Load, PeakEwma};

use crate::body::{self, BoxError};
use crate::client::{Clients, EndpointClient, PoolPolicy};
use crate::metrics::Metrics;
use crate::outcome::{self, Avoid, Deadline, Limits, ReportServedBy, ServedBy};
use crate::rejection::{self, Reason};
use crate::resilience::ResponseFuture;
use crate::stack::HttpRequest;

/// Default RTT assumed for an endpoint that has no latency history yet, and how fast
/// peak-EWMA forgets: Linkerd's values, which suit in-cluster calls.
const EWMA_DEFAULT_RTT: Duration = Duration::from_millis(30);
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Weights above this are clamped: they only shape the schedule.
pub const MAX_WEIGHT: u32 = 100;
/// An ejection lasts at most this many times `baseEjection`.
const MAX_EJECTION_MULTIPLIER: u32 = 10;

/// `outlierDetection` with its defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejected_percent: u32,
}

impl OutlierConfig {
    /// Defaults follow the DESIGN example (5 failures, 30 s, 50%).
    pub fn from_policy(p: &OutlierDetection) -> Self {
        Self {
            consecutive_failures: p.consecutive_failures.unwrap_or(5),
            base_ejection: p.base_ejection.map(|d| d.get()).unwrap_or(Duration::from_secs(30)),
            max_ejected_percent: p.max_ejected_percent.unwrap_or(50),
        }
    }

    /// How many of `n` endpoints may be ejected at once.
    pub fn max_ejected(&self, n: usize) -> usize {
        let by_percent = n * self.max_ejected_percent as usize / 100;
        if n >= 2 { by_percent.max(1) } else { by_percent }
    }
}

/// One endpoint as a balancer is given it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Its SPIFFE ID when a meshed sidecar fronts it: dialled with mesh TLS.
    pub identity: Option<Arc<str>>,
}

impl Target {
    /// An endpoint without identity (plain text).
    pub fn plain(addr: SocketAddr, weight: u32) -> Self {
        Self { addr, weight, identity: None }
    }
}

struct Endpoint {
    addr: SocketAddr,
    weight: u32,
    identity: Option<Arc<str>>,
    /// `PeakEwma::call` takes `&mut self`; the lock is held only to start a call or read
    /// the cost, never across an await.
    client: Mutex<PeakEwma<EndpointClient, CompleteOnResponse>>,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejection: Mutex<Ejection>,
}

#[derive(Default)]
struct Ejection {
    until: Option<Instant>,
    times: u32,
}

impl Endpoint {
    fn ejected(&self, now: Instant) -> bool {
        let e = self.ejection.lock().unwrap_or_else(|p| p.into_inner());
        e.until.is_some_and(|u| now < u)
    }

    fn ewma_cost(&self) -> tower::load::peak_ewma::Cost {
        self.client.lock().unwrap_or_else(|p| p.into_inner()).load()
    }
}

/// The endpoints of one moment. Replaced whole when they change; endpoints present before
/// and after keep their state (latency estimate, in-flight count, ejection).
struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    /// Endpoint indices interleaved by weight (round robin).
    schedule: Vec<usize>,
}

impl EndpointSet {
    fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let schedule = interleave(&endpoints.iter().map(|e| e.weight).collect::<Vec<_>>());
        Self { endpoints, schedule }
    }
}

struct Shared {
    set: ArcSwap<EndpointSet>,
    algorithm: LoadBalancer,
    next: AtomicUsize,
    outlier: Option<OutlierConfig>,
    /// Serialises ejection decisions so `maxEjectedPercent` holds under concurrency.
    ejecting: Mutex<()>,
    /// Endpoints ejected as last counted (under `ejecting`).
    ejected: AtomicUsize,
    ready_gauge: IntGauge,
    ejected_gauge: IntGauge,
    /// Where new endpoints' clients come from, and with which connection settings.
    clients: Arc<Clients>,
    pool: PoolPolicy,
    /// The answer while there are no endpoints.
    no_endpoints: Arc<str>,
}

/// A service's balancer: cheap to clone, every clone shares the endpoints' state.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

/// What a balancer is built from, besides its endpoints.
pub struct BalancerConfig {
    pub label: Arc<str>,
    pub clients: Arc<Clients>,
    pub pool: PoolPolicy,
    pub algorithm: LoadBalancer,
    pub outlier: Option<OutlierConfig>,
    /// Why the service may have no endpoints, for the `no-endpoints` answer.
    pub why_empty: String,
}

impl Balancer {
    pub fn new(config: BalancerConfig, metrics: &Metrics, endpoints: &[Target]) -> Self {
        let label = &config.label;
        let ready_gauge = metrics.endpoints.with_label_values(&[label, "ready"]);
        let ejected_gauge = metrics.endpoints.with_label_values(&[label, "ejected"]);
        ejected_gauge.set(0);
        let balancer = Self {
            shared: Arc::new(Shared {
                set: ArcSwap::from_pointee(EndpointSet::new(Vec::new())),
                algorithm: config.algorithm,
                next: AtomicUsize::new(0),
                outlier: config.outlier,
                ejecting: Mutex::new(()),
                ejected: AtomicUsize::new(0),
                ready_gauge,
                ejected_gauge,
                clients: config.clients,
                pool: config.pool,
                no_endpoints: format!("service {label} has no endpoints{}", config.why_empty).into(),
            }),
        };
        balancer.update(endpoints);
        balancer
    }

    /// Replaces the endpoint set. Endpoints in both keep their state, so a replica coming
    /// or going does not reset the others' latency or ejections.
    pub fn update(&self, endpoints: &[Target]) {
        let shared = &self.shared;
        let _serial = shared.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let old = shared.set.load();
        let next: Vec<Arc<Endpoint>> = endpoints
            .iter()
            .map(|t| {
                let weight = t.weight.clamp(1, MAX_WEIGHT);
                old.endpoints
                    .iter()
                    .find(|e| e.addr == t.addr && e.weight == weight && e.identity == t.identity)
                    .cloned()
                    .unwrap_or_else(|| {
                        let client = shared.clients.get_with(t.addr, shared.pool, t.identity.as_ref());
                        Arc::new(Endpoint::new(t.addr, weight, t.identity.clone(), client))
                    })
            })
            .collect();
        let now = Instant::now();
        let ejected = next.iter().filter(|e| e.ejected(now)).count();
        shared.set.store(Arc::new(EndpointSet::new(next)));
        shared.update_gauges(ejected);
    }
}

impl Endpoint {
    fn new(addr: SocketAddr, weight: u32, identity: Option<Arc<str>>, client: EndpointClient) -> Self {
        Endpoint {
            addr,
            weight,
            identity,
            client: Mutex::new(PeakEwma::new(
                client,
                EWMA_DEFAULT_RTT,
                EWMA_DECAY.as_nanos() as f64,
                CompleteOnResponse::default(),
            )),
            in_flight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejection: Mutex::new(Ejection::default()),
        }
    }
}

/// A weighted round-robin schedule in which an endpoint's turns are spread out (weights
/// 3 and 1 give `0 0 1 0`, not `0 0 0 1`): smooth weighted round robin, as nginx does it.
fn interleave(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let Some((best, _)) = current.iter().enumerate().max_by_key(|&(i, &c)| (c, std::cmp::Reverse(i)))
        else {
            break;
        };
        current[best] -= total;
        out.push(best);
    }
    out
}

/// Indices of endpoints a request may go to.
type Candidates = smallvec::SmallVec<[usize; 16]>;

impl Shared {
    /// The endpoints a request may go to: not ejected and, when any other is left, not
    /// one a previous try of this request failed on.
    /// On the stack up to [`Candidates`]' inline size: this runs for every request.
    fn candidates(&self, set: &EndpointSet, avoid: Option<&Avoid>, now: Instant) -> Candidates {
        let live: Candidates = (0..set.endpoints.len())
            .filter(|&i| self.outlier.is_none() || !set.endpoints[i].ejected(now))
            .collect();
        // Never leave a request with nowhere to go: if every endpoint is out, use them all.
        let live = if live.is_empty() { (0..set.endpoints.len()).collect() } else { live };
        match avoid {
            Some(Avoid(addrs)) if !addrs.is_empty() => {
                let fresh: Candidates =
                    live.iter().copied().filter(|&i| !addrs.contains(&set.endpoints[i].addr)).collect();
                if fresh.is_empty() { live } else { fresh }
            }
            _ => live,
        }
    }

    fn pick(&self, set: &EndpointSet, req: &HttpRequest, now: Instant) -> usize {
        let candidates = self.candidates(set, req.extensions().get::<Avoid>(), now);
        if candidates.len() == 1 {
            return candidates[0];
        }
        match &self.algorithm {
            // Weights shape which two are drawn; peak-EWMA's cost is opaque to scaling.
            LoadBalancer::PeakEwma => p2c(set, &candidates, |a, b| b.ewma_cost() < a.ewma_cost()),
            LoadBalancer::LeastRequest => p2c(set, &candidates, |a, b| {
                let load = |e: &Endpoint| e.in_flight.load(Ordering::Relaxed) as f64 / f64::from(e.weight);
                load(b) < load(a)
            }),
            LoadBalancer::RoundRobin => {
                let n = set.schedule.len();
                for _ in 0..n {
                    let i = set.schedule[self.next.fetch_add(1, Ordering::Relaxed) % n];
                    if candidates.contains(&i) {
                        return i;
                    }
                }
                candidates[0]
            }
            LoadBalancer::Random => weighted_random(set, &candidates),
            LoadBalancer::ConsistentHash(header) => match req.headers().get(header.as_str()) {
                Some(key) => rendezvous(set, &candidates, key.as_bytes()),
                None => weighted_random(set, &candidates),
            },
        }
    }

    /// Feeds one try's outcome to outlier detection.
    fn record(&self, e: &Endpoint, failed: bool) {
        let Some(cfg) = self.outlier else { return };
        if !failed {
            e.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let n = e.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < cfg.consecutive_failures {
            return;
        }
        let _serial = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let set = self.set.load();
        if !set.endpoints.iter().any(|x| std::ptr::eq(&**x, e)) {
            // Removed from the service meanwhile.
            return;
        }
        let ejected_now = set.endpoints.iter().filter(|e| e.ejected(now)).count();
        let mut ej = e.ejection.lock().unwrap_or_else(|p| p.into_inner());
        if ej.until.is_some_and(|u| now < u) || ejected_now >= cfg.max_ejected(set.endpoints.len()) {
            return;
        }
        ej.times = ej.times.saturating_add(1);
        let period = cfg.base_ejection * ej.times.min(MAX_EJECTION_MULTIPLIER);
        ej.until = Some(now + period);
        e.consecutive_failures.store(0, Ordering::Relaxed);
        drop(ej);
        tracing::warn!(endpoint = %e.addr, failures = n, ejected_for = ?period, "endpoint ejected by outlier detection");
        self.update_gauges(ejected_now + 1);
    }

    fn update_gauges(&self, ejected: usize) {
        let total = self.set.load().endpoints.len();
        self.ejected.store(ejected, Ordering::Relaxed);
        self.ejected_gauge.set(ejected as i64);
        self.ready_gauge.set(total.saturating_sub(ejected) as i64);
    }

    /// Refreshes the count (and gauges) when an ejection may have run out; free while
    /// nothing is ejected.
    fn refresh_gauges(&self, now: Instant) {
        if self.ejected.load(Ordering::Relaxed) == 0 {
            return;
        }
        let _serial = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let ejected = self.set.load().endpoints.iter().filter(|e| e.ejected(now)).count();
        if ejected != self.ejected.load(Ordering::Relaxed) {
            self.update_gauges(ejected);
        }
    }
}

fn weighted_random(set: &EndpointSet, candidates: &[usize]) -> usize {
    let total: u32 = candidates.iter().map(|&i| set.endpoints[i].weight).sum();
    let mut x = rand::random_range(0..total.max(1));
    for &i in candidates {
        let w = set.endpoints[i].weight;
        if x < w {
            return i;
        }
        x -= w;
    }
    candidates[candidates.len() - 1]
}

/// Power of two choices: two distinct candidates drawn by weight; the second wins
/// only when `better(first, second)`.
fn p2c(set: &EndpointSet, candidates: &[usize], better: impl Fn(&Endpoint, &Endpoint) -> bool) -> usize {
    let a = weighted_random(set, candidates);
    let mut b = weighted_random(set, candidates);
    for _ in 0..4 {
        if b != a {
            break;
        }
        b = weighted_random(set, candidates);
    }
    if b == a {
        // Dominant weights: draw the second uniformly among the others.
        let others: Vec<usize> = candidates.iter().copied().filter(|&i| i != a).collect();
        b = others[rand::random_range(0..others.len())];
    }
    if better(&set.endpoints[a], &set.endpoints[b]) { b } else { a }
}

/// Weighted rendezvous hashing: the endpoint with the highest `-w / ln(u)` for
/// `u = hash(key, endpoint)` in (0, 1) wins.
fn rendezvous(set: &EndpointSet, candidates: &[usize], key: &[u8]) -> usize {
    let mut best = (f64::NEG_INFINITY, candidates[0]);
    for &i in candidates {
        let e = &set.endpoints[i];
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        e.addr.hash(&mut h);
        let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -f64::from(e.weight) / u.ln();
        if score > best.0 {
            best = (score, i);
        }
    }
    best.1
}

/// Which limit ends a try (see [`try_bound`]).
#[derive(Clone, Copy)]
enum Cut {
    PerTry(Duration),
    Deadline,
}

/// When a try starting now must have its response headers: the earlier of its per-try
/// timeout and the request's deadline. One timer bounds both, so a route's request
/// timeout needs no timer of its own (see [`crate::resilience::timeout`]).
fn try_bound(limits: &Limits) -> Option<(tokio::time::Instant, Cut)> {
    let per_try = limits.per_try.map(|t| (tokio::time::Instant::now() + t, Cut::PerTry(t)));
    match (per_try, limits.deadline()) {
        (Some((end, cut)), Some(Deadline(d))) if end < d => Some((end, cut)),
        (_, Some(Deadline(d))) => Some((d, Cut::Deadline)),
        (per_try, None) => per_try,
    }
}

/// Counts a try in flight until its response headers, and reports a try abandoned
/// before them (see [`outcome::dropped_is_failure`]).
struct InFlight {
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    deadline: Option<Deadline>,
    done: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.done && outcome::dropped_is_failure(self.deadline) {
            self.shared.record(&self.endpoint, true);
        }
    }
}

impl Balancer {
    /// Sends `req` to the endpoint the algorithm picks; see the `Service` impl.
    pub fn request(&self, req: HttpRequest) -> ResponseFuture {
        let shared = self.shared.clone();
        let set = shared.set.load();
        if set.endpoints.is_empty() {
            let rsp =
                rejection::response(Reason::NoEndpoints, rejection::is_grpc(&req), &shared.no_endpoints);
            return Box::pin(std::future::ready(Ok(rsp)));
        }
        let now = Instant::now();
        shared.refresh_gauges(now);
        let endpoint = set.endpoints[shared.pick(&set, &req, now)].clone();
        let limits = req.extensions().get::<Limits>().copied();
        let bound = limits.as_ref().and_then(try_bound);
        let addr = endpoint.addr;
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        let deadline = limits.and_then(|l| l.deadline());
        let grpc = rejection::is_grpc(&req);
        let report = ReportServedBy::asked(&req);
        let fut = endpoint.client.lock().unwrap_or_else(|p| p.into_inner()).call(req);
        let mut guard = InFlight { shared, endpoint, deadline, done: false };
        Box::pin(async move {
            let result = match bound {
                Some((end, cut)) => tokio::time::timeout_at(end, fut).await.map_err(|_| cut),
                None => Ok(fut.await),
            };
            let mut rsp = match result {
                Ok(Ok(rsp)) => rsp.map(body::boxed),
                Ok(Err(e)) => outcome::upstream_error_response(&BoxError::from(e)),
                Err(Cut::PerTry(t)) => outcome::per_try_timeout_response(t, addr),
                // Counts as the endpoint's failure (`outcome::is_failure`), as a try the
                // request timeout cuts off must.
                Err(Cut::Deadline) => limits.unwrap_or_default().timeout_response(),
            };
            guard.done = true;
            guard.shared.record(&guard.endpoint, outcome::is_failure(&rsp, grpc));
            if report {
                rsp.extensions_mut().insert(ServedBy(addr));
            }
            Ok(rsp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_try_is_bounded_by_the_earlier_of_per_try_and_deadline() {
        let now = tokio::time::Instant::now();
        let s = Duration::from_secs;
        let limits = |deadline: Option<u64>, per_try: Option<u64>| Limits {
            deadline: deadline.map(|d| (Deadline(now + s(d)), s(d))),
            per_try: per_try.map(s),
            grpc: false,
        };
        let bound = |l: Limits| try_bound(&l).map(|(end, cut)| (end - now, matches!(cut, Cut::Deadline)));
        assert_eq!(bound(limits(None, None)), None);
        assert_eq!(bound(limits(None, Some(2))), Some((s(2), false)));
        assert_eq!(bound(limits(Some(5), None)), Some((s(5), true)));
        assert_eq!(bound(limits(Some(5), Some(2))), Some((s(2), false)));
        assert_eq!(bound(limits(Some(1), Some(2))), Some((s(1), true)), "the deadline comes first");
        assert_eq!(bound(limits(Some(2), Some(2))), Some((s(2), true)), "a tie is the deadline's 504");
    }

    #[test]
    fn smooth_weighted_schedule_spreads_turns() {
        assert_eq!(interleave(&[3, 1]), vec![0, 0, 1, 0]);
        assert_eq!(interleave(&[1, 1, 1]), vec![0, 1, 2]);
        let s = interleave(&[5, 2]);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(s.iter().filter(|&&i| i == 1).count(), 2);
    }

    #[tokio::test]
    async fn an_update_keeps_the_state_of_endpoints_that_stay() {
        let metrics = Metrics::new();
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let outlier = OutlierConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
        };
        let config = BalancerConfig {
            label: "svc.default".into(),
            clients: Clients::new(Duration::from_secs(1)),
            pool: PoolPolicy::default(),
            algorithm: LoadBalancer::RoundRobin,
            outlier: Some(outlier),
            why_empty: String::new(),
        };
        let b = Balancer::new(config, &metrics, &[Target::plain(addr(1), 1), Target::plain(addr(2), 1)]);
        let first = b.shared.set.load().endpoints[0].clone();
        b.shared.record(&first, true);
        assert!(first.ejected(Instant::now()));
        b.update(&[Target::plain(addr(1), 1), Target::plain(addr(2), 1), Target::plain(addr(3), 1)]);
        let set = b.shared.set.load();
        assert!(Arc::ptr_eq(&set.endpoints[0], &first), "same endpoint, same state");
        assert!(set.endpoints[0].ejected(Instant::now()));
        let gauge = |state: &str| metrics.endpoints.with_label_values(&["svc.default", state]).get();
        assert_eq!((gauge("ready"), gauge("ejected")), (2, 1));
        b.update(&[]);
        assert_eq!(gauge("ready"), 0);
    }

    #[tokio::test]
    async fn responses_name_their_endpoint_only_when_asked() {
        let (addr, _, _) = crate::pool::tests::server(usize::MAX).await;
        let config = BalancerConfig {
            label: "svc.default".into(),
            clients: Clients::new(Duration::from_secs(1)),
            pool: PoolPolicy::default(),
            algorithm: LoadBalancer::RoundRobin,
            outlier: None,
            why_empty: String::new(),
        };
        let b = Balancer::new(config, &Metrics::new(), &[Target::plain(addr, 1)]);
        let get = || {
            http::Request::get(format!("http://{addr}/"))
                .header(http::header::HOST, "svc.default")
                .body(body::empty())
                .expect("request")
        };
        let rsp = b.request(get()).await.expect("response");
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.extensions().get::<ServedBy>(), None, "nobody asked: no extension map");
        let mut asked = get();
        asked.extensions_mut().insert(ReportServedBy);
        let rsp = b.request(asked).await.expect("response");
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.extensions().get::<ServedBy>(), Some(&ServedBy(addr)));
    }

    #[test]
    fn at_least_one_of_two_may_be_ejected() {
        let cfg = OutlierConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(1),
            max_ejected_percent: 10,
        };
        assert_eq!(cfg.max_ejected(1), 0);
        assert_eq!(cfg.max_ejected(2), 1);
        assert_eq!(cfg.max_ejected(30), 3);
        let half = OutlierConfig { max_ejected_percent: 50, ..cfg };
        assert_eq!(half.max_ejected(5), 2);
        let none = OutlierConfig { max_ejected_percent: 0, ..cfg };
        assert_eq!(none.max_ejected(4), 1);
    }
}
