//! `retries`: tries a failed request again, on another endpoint, within a budget.
//!
//! Built on `tower::retry`: [`RetryPolicy`] is a `tower::retry::Policy` that decides per
//! response, and the budget is a `tower::retry::budget::Budget` ([`RatioBudget`]:
//! retries as a share of the requests of the last 10 s, plus a floor of `minPerSecond`). What this module
//! adds is what HTTP needs around it:
//!
//! * **Replayable requests only** (DESIGN §2). The body streams to the first try as it
//!   arrives while up to 64 KiB of it is kept ([`Replay`](super::replay)); a longer body
//!   is not retried, nor one that the failed try still holds half-sent. The method must be idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE), or
//!   the policy says otherwise: `nonIdempotent: true` for plain HTTP, or any `grpc:*`
//!   condition for gRPC calls (every gRPC call is a POST, so listing a gRPC condition is
//!   the operator saying its calls may be retried, as with Envoy's `retry_on`). Upgrades
//!   are never retried.
//! * **Conditions** read from the response headers only: a response that started
//!   streaming to the client is never retried because the decision is made before
//!   anything is sent. gRPC conditions read `grpc-status` from trailers-only responses.
//! * **Backoff with full jitter**: retry n (from 1) sleeps uniform in
//!   [0, min(max, base·2^(n-1))). A `Retry-After: SECONDS` header stretches the sleep to
//!   that many seconds, capped at `backoff.max`.
//! * **Another endpoint**: the endpoint that failed goes into the request's
//!   [`Avoid`] list, which the balancer honours while another endpoint is available.
//! * **Budget**: every original request deposits, every retry withdraws. A spent budget
//!   returns the last upstream response as it is and counts
//!   `ballast_retry_budget_exhausted_total`.
//! * **Deadline**: the overall `timeouts.request` covers every try and sleep. A retry
//!   whose backoff would end at or past the request's deadline is not made: the client
//!   gets the last upstream response (its real status, a `Retry-After` it may honour) at
//!   once instead of a 504 `timeout` when the deadline comes. No budget is spent on it.
//!
//! `timeouts.perTry` and the deadline during a try are enforced by the balancer around
//! each endpoint call (see [`timeout`](super::timeout)).

use std::sync::Arc;
use std::time::Duration;

use ballast_api::policy::{Retries, RetryOn};
use http::{Method, header};
use http_body::Body as _;
use prometheus::IntCounter;
use tower::retry::budget::Budget;

use super::budget::RatioBudget;
use super::replay::Replay;
use super::{Guard, ResponseFuture};
use crate::body::{self, BoxError};
use crate::outcome::{Avoid, Deadline, Limits, ReportServedBy, ServedBy, UpstreamFailure};
use crate::rejection::{self, Rejected};
use crate::stack::{HttpRequest, HttpResponse, HttpService};

/// Longest request body buffered for replay (DESIGN §2).
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

/// `retries` with its defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    pub base: Duration,
    pub max: Duration,
    pub non_idempotent: bool,
}

/// The budget and counters of one service, shared by its routes.
#[derive(Clone)]
pub struct RetryShared {
    pub budget: Arc<RatioBudget>,
    pub retries: IntCounter,
    pub exhausted: IntCounter,
}

impl RetryShared {
    /// The budget of `policy` (default: 20% of requests, at least 10 retries a second,
    /// Linkerd's defaults).
    pub fn new(policy: Option<&Retries>, retries: IntCounter, exhausted: IntCounter) -> Self {
        let (ratio, min) =
            policy.and_then(|r| r.budget).map(|b| (b.ratio, b.min_per_second)).unwrap_or((0.2, 10));
        Self { budget: Arc::new(RatioBudget::new(ratio, min)), retries, exhausted }
    }
}

impl RetryConfig {
    /// Defaults: 2 retries on gateway errors, resets and connect failures, backoff 25 ms to
    /// 250 ms (Envoy's base and cap).
    pub fn from_policy(r: &Retries) -> Self {
        let on = if r.on.is_empty() {
            vec![RetryOn::GatewayError, RetryOn::Reset, RetryOn::ConnectFailure]
        } else {
            r.on.clone()
        };
        Self {
            attempts: r.attempts.unwrap_or(2),
            on,
            base: r.backoff.map(|b| b.base.get()).unwrap_or(Duration::from_millis(25)),
            max: r.backoff.map(|b| b.max.get()).unwrap_or(Duration::from_millis(250)),
            non_idempotent: r.non_idempotent.unwrap_or(false),
        }
    }

    /// Whether this request may be tried more than once, its body aside; `grpc`: whether
    /// it is a gRPC call.
    fn may_retry(&self, req: &HttpRequest, grpc: bool) -> bool {
        if self.attempts == 0 || req.headers().contains_key(header::UPGRADE) {
            return false;
        }
        let idempotent = matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        let grpc_allowed = grpc && self.on.iter().any(|c| matches!(c, RetryOn::Grpc(_)));
        idempotent || self.non_idempotent || grpc_allowed
    }

    /// Whether `rsp` meets one of the conditions; `grpc`: whether the request was a gRPC
    /// call, whose status is read from `grpc-status` (not looked up otherwise).
    pub fn retriable(&self, rsp: &HttpResponse, grpc: bool) -> bool {
        if rsp.extensions().get::<Rejected>().is_some() {
            // The mesh's own verdicts (circuit open, no endpoints) are not transient.
            return false;
        }
        let status = rsp.status().as_u16();
        let failure = rsp.extensions().get::<UpstreamFailure>().copied();
        let grpc_status = || -> Option<u32> {
            let v = rsp.headers().get(crate::outcome::GRPC_STATUS)?;
            v.to_str().ok()?.parse().ok()
        };
        self.on.iter().any(|c| match c {
            RetryOn::ServerError => (500..600).contains(&status),
            RetryOn::GatewayError => matches!(status, 502..=504),
            // As Envoy's `reset`: the upstream did not answer at all (disconnect, reset,
            // or no response within the per-try timeout).
            RetryOn::Reset => matches!(failure, Some(UpstreamFailure::Reset | UpstreamFailure::Timeout)),
            RetryOn::ConnectFailure => failure == Some(UpstreamFailure::Connect),
            RetryOn::RetriableStatus(code) => status == *code,
            RetryOn::Grpc(code) => grpc && grpc_status() == Some(*code as u32),
        })
    }

    /// The sleep before retry `n` (1-based): full jitter, stretched by `Retry-After`.
    fn backoff(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << (n - 1).min(20)).min(self.max);
        let jitter = if ceiling.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(rand::random_range(0..ceiling.as_nanos() as u64))
        };
        match retry_after {
            Some(after) => jitter.max(after.min(self.max)),
            None => jitter,
        }
    }
}

/// A retrying layer of one route.
#[derive(Clone)]
pub struct Retry {
    state: Arc<RetryState>,
}

impl Retry {
    pub fn new(config: RetryConfig, shared: RetryShared) -> Self {
        Self { state: Arc::new(RetryState { config, shared }) }
    }
}

impl Guard for Retry {
    fn handle(&self, inner: &HttpService, req: HttpRequest) -> ResponseFuture {
        self.state.shared.budget.deposit();
        let grpc = rejection::is_grpc(&req);
        if !self.state.config.may_retry(&req, grpc) {
            return inner.call(req);
        }
        let (mut parts, body) = req.into_parts();
        if body.size_hint().lower() > MAX_REPLAY_BODY as u64 {
            // Known to be too long to replay: sent once, untouched.
            return inner.call(HttpRequest::from_parts(parts, body));
        }
        // A retry steers away from the endpoint that answered the failed try.
        parts.extensions.insert(ReportServedBy);
        // A body that has ended already (a GET, a `Content-Length: 0`) needs no record:
        // every try gets an empty one, which allocates nothing.
        let (replay, body) = if body.is_end_stream() {
            (None, body::empty())
        } else {
            let replay = Replay::new(body, MAX_REPLAY_BODY);
            let body = body::boxed(replay.body());
            (Some(replay), body)
        };
        let req = HttpRequest::from_parts(parts, body);
        let policy = RetryPolicy { state: self.state.clone(), replay, tries: 1, grpc };
        retrying(policy, inner.clone(), req)
    }
}

/// The tower retry future, erased: rustc cannot prove `Send` for it awaited in an async
/// block directly. Called without `poll_ready` first (not through `oneshot`, whose state
/// machine holds and moves the request until its first poll): `tower::retry::Retry` is
/// ready when its service is, and an [`HttpService`] always is.
fn retrying(policy: RetryPolicy, inner: HttpService, req: HttpRequest) -> ResponseFuture {
    use tower::Service as _;
    Box::pin(tower::retry::Retry::new(policy, inner).call(req))
}

/// What every try of a route's requests shares: one reference count to clone.
struct RetryState {
    config: RetryConfig,
    shared: RetryShared,
}

/// The `tower::retry::Policy` of one request.
#[derive(Clone)]
pub struct RetryPolicy {
    state: Arc<RetryState>,
    /// `None` for a body that was empty from the start.
    replay: Option<Replay>,
    tries: u32,
    /// Whether the request is a gRPC call (its conditions read `grpc-status`).
    grpc: bool,
}

impl tower::retry::Policy<HttpRequest, HttpResponse, BoxError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut HttpRequest,
        result: &mut Result<HttpResponse, BoxError>,
    ) -> Option<Self::Future> {
        let rsp = result.as_ref().ok()?;
        let RetryState { config, shared } = &*self.state;
        if self.tries > config.attempts || !config.retriable(rsp, self.grpc) {
            return None;
        }
        if self.replay.as_ref().is_some_and(|r| !r.can_replay()) {
            // Over the buffer limit, or the failed try still holds the body.
            return None;
        }
        let retry_after = rsp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let until = tokio::time::Instant::now() + config.backoff(self.tries, retry_after);
        if Limits::deadline_of(req).is_some_and(|Deadline(d)| d <= until) {
            // No time left for another try: the last response now beats a 504 later.
            return None;
        }
        if !shared.budget.withdraw() {
            shared.exhausted.inc();
            return None;
        }
        shared.retries.inc();
        if let Some(ServedBy(addr)) = rsp.extensions().get::<ServedBy>() {
            let avoid = req.extensions_mut().get_or_insert_default::<Avoid>();
            avoid.0.push(*addr);
        }
        self.tries += 1;
        Some(tokio::time::sleep_until(until))
    }

    fn clone_request(&mut self, req: &HttpRequest) -> Option<HttpRequest> {
        let body = self.replay.as_ref().map_or_else(body::empty, |r| body::boxed(r.body()));
        let mut clone = http::Request::new(body);
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::ServiceExt;

    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    fn config(attempts: u32, on: &[&str]) -> RetryConfig {
        RetryConfig {
            attempts,
            on: on.iter().map(|s| s.parse().expect("condition")).collect(),
            base: Duration::from_millis(10),
            max: Duration::from_millis(100),
            non_idempotent: false,
        }
    }

    fn shared(ratio: f64, min: u32) -> RetryShared {
        let budget = Some(Retries {
            budget: Some(ballast_api::policy::RetryBudget { ratio, min_per_second: min }),
            ..Default::default()
        });
        RetryShared::new(
            budget.as_ref(),
            IntCounter::new("r", "r").expect("counter"),
            IntCounter::new("e", "e").expect("counter"),
        )
    }

    /// A service answering each try with the next status of `statuses` (the last one
    /// repeats), recording the bodies it saw.
    fn scripted(statuses: &'static [u16], seen: Arc<std::sync::Mutex<Vec<Bytes>>>) -> HttpService {
        let n = Arc::new(AtomicUsize::new(0));
        HttpService::from_fn(move |req: HttpRequest| {
            let i = n.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            Box::pin(async move {
                let body = req.into_body().collect().await?.to_bytes();
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(body);
                let status = statuses[i.min(statuses.len() - 1)];
                let mut rsp = http::Response::new(body::empty());
                *rsp.status_mut() = http::StatusCode::from_u16(status)?;
                Ok::<_, BoxError>(rsp)
            })
        })
    }

    fn request(method: Method, body: &'static str) -> HttpRequest {
        let mut r = http::Request::new(body::full(body));
        *r.method_mut() = method;
        r
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_the_same_body_until_success() {
        let seen = Arc::default();
        let svc = Retry::new(config(3, &["5xx"]), shared(0.2, 10))
            .layer(scripted(&[503, 500, 200], Arc::clone(&seen)));
        let rsp = svc.oneshot(request(Method::PUT, "payload")).await.expect("response");
        assert_eq!(rsp.status(), 200);
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|b| b == "payload"));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_attempts_with_the_last_response() {
        let seen = Arc::default();
        let svc = Retry::new(config(2, &["gateway-error"]), shared(0.2, 10))
            .layer(scripted(&[503], Arc::clone(&seen)));
        let rsp = svc.oneshot(request(Method::GET, "")).await.expect("response");
        assert_eq!(rsp.status(), 503);
        assert_eq!(seen.lock().unwrap_or_else(|p| p.into_inner()).len(), 3, "first try and 2 retries");
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_post_without_permission() {
        let seen = Arc::default();
        let svc =
            Retry::new(config(2, &["5xx"]), shared(0.2, 10)).layer(scripted(&[503, 200], Arc::clone(&seen)));
        let rsp = svc.oneshot(request(Method::POST, "x")).await.expect("response");
        assert_eq!(rsp.status(), 503);
        assert_eq!(seen.lock().unwrap_or_else(|p| p.into_inner()).len(), 1);
        let seen = Arc::default();
        let permitted = RetryConfig { non_idempotent: true, ..config(2, &["5xx"]) };
        let svc = Retry::new(permitted, shared(0.2, 10)).layer(scripted(&[503, 200], Arc::clone(&seen)));
        assert_eq!(svc.oneshot(request(Method::POST, "x")).await.expect("response").status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_if_body_is_too_long() {
        let seen = Arc::default();
        let big: &'static str = Box::leak("a".repeat(MAX_REPLAY_BODY + 1).into_boxed_str());
        let svc =
            Retry::new(config(2, &["5xx"]), shared(0.2, 10)).layer(scripted(&[503, 200], Arc::clone(&seen)));
        let rsp = svc.oneshot(request(Method::PUT, big)).await.expect("response");
        assert_eq!(rsp.status(), 503);
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].len(), MAX_REPLAY_BODY + 1, "the body streamed through whole");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_uses_budget() {
        // No floor, 50%: each original request pays for half a retry. (Paused time: the
        // window does not move.)
        let budget = shared(0.5, 0);
        let seen = Arc::default();
        let svc = Retry::new(config(5, &["5xx"]), budget.clone()).layer(scripted(&[503], Arc::clone(&seen)));
        for _ in 0..10 {
            let rsp = svc.clone().oneshot(request(Method::GET, "")).await.expect("response");
            assert_eq!(rsp.status(), 503, "a spent budget returns the upstream's response");
        }
        let tries = seen.lock().unwrap_or_else(|p| p.into_inner()).len();
        assert!((10..=15).contains(&tries), "10 requests, at most 5 retries, got {tries} tries");
        assert!(budget.exhausted.get() >= 5);
        assert_eq!(budget.retries.get() as usize, tries - 10);
    }

    /// Answers 503 with `Retry-After: 1` and counts the tries.
    fn unavailable_retry_after_1s(tries: Arc<AtomicUsize>) -> HttpService {
        HttpService::from_fn(move |_req: HttpRequest| {
            tries.fetch_add(1, Ordering::SeqCst);
            let mut rsp = http::Response::new(body::empty());
            *rsp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            rsp.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            Box::pin(std::future::ready(Ok(rsp)))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_if_the_backoff_ends_past_the_deadline() {
        let c = RetryConfig { max: Duration::from_secs(2), ..config(3, &["5xx"]) };
        let budget = shared(0.2, 10);
        let tries = Arc::new(AtomicUsize::new(0));
        let retry = Retry::new(c, budget.clone()).layer(unavailable_retry_after_1s(tries.clone()));
        // 500 ms left, the upstream asks for 1 s: the 503 comes back at once.
        let svc = super::super::timeout::limits(retry.clone(), Some(Duration::from_millis(500)), None);
        let started = tokio::time::Instant::now();
        let rsp = svc.oneshot(request(Method::GET, "")).await.expect("response");
        assert_eq!(rsp.status(), 503);
        assert_eq!(rsp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        assert_eq!(budget.retries.get(), 0, "no budget spent on a retry not made");
        // 10 s left: the retries wait out the second each.
        let svc = super::super::timeout::limits(retry, Some(Duration::from_secs(10)), None);
        let rsp = svc.oneshot(request(Method::GET, "")).await.expect("response");
        assert_eq!(rsp.status(), 503);
        assert_eq!(tries.load(Ordering::SeqCst), 1 + 4, "first try and 3 retries");
        assert!(started.elapsed() >= Duration::from_secs(3), "{:?}", started.elapsed());
    }

    #[test]
    fn backoff_is_full_jitter_and_honours_retry_after_up_to_max() {
        let c = config(5, &["5xx"]);
        for n in 1..=6 {
            let ceiling = (Duration::from_millis(10) * (1 << (n - 1))).min(Duration::from_millis(100));
            for _ in 0..50 {
                assert!(c.backoff(n, None) < ceiling);
            }
        }
        assert_eq!(c.backoff(1, Some(Duration::from_secs(30))), Duration::from_millis(100));
        assert!(c.backoff(1, Some(Duration::from_millis(50))) >= Duration::from_millis(50));
    }

    #[test]
    fn conditions_match_statuses_failures_and_grpc() {
        let rsp = |status: u16, grpc: Option<&str>, failure: Option<UpstreamFailure>| {
            let mut r = http::Response::new(body::empty());
            *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
            if let Some(g) = grpc {
                r.headers_mut().insert("grpc-status", http::HeaderValue::from_str(g).expect("value"));
            }
            if let Some(f) = failure {
                r.extensions_mut().insert(f);
            }
            r
        };
        let c = config(1, &["gateway-error"]);
        assert!(c.retriable(&rsp(503, None, None), false));
        assert!(!c.retriable(&rsp(500, None, None), false));
        let c = config(1, &["reset"]);
        assert!(c.retriable(&rsp(502, None, Some(UpstreamFailure::Reset)), false));
        assert!(c.retriable(&rsp(504, None, Some(UpstreamFailure::Timeout)), false));
        assert!(!c.retriable(&rsp(502, None, Some(UpstreamFailure::Connect)), false));
        let c = config(1, &["retriable-status:409"]);
        assert!(c.retriable(&rsp(409, None, None), false));
        let c = config(1, &["grpc:unavailable"]);
        assert!(c.retriable(&rsp(200, Some("14"), None), true));
        assert!(!c.retriable(&rsp(200, Some("14"), None), false), "not a gRPC call");
        assert!(!c.retriable(&rsp(200, Some("13"), None), true));
        let mut rejected = rsp(503, None, None);
        rejected.extensions_mut().insert(Rejected(rejection::Reason::CircuitOpen));
        assert!(!config(1, &["5xx"]).retriable(&rejected, false));
    }
}
