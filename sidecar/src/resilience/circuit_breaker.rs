//! `circuitBreaker`: stops sending to a service that keeps failing, so callers fail fast
//! (503 `circuit-open`, gRPC UNAVAILABLE) instead of queueing behind it, and the service
//! gets room to recover.
//!
//! Written here rather than taken from a crate: tower has no breaker, and the crates that
//! have one (failsafe, recloser) lack either the failure-rate window with a minimum
//! number of requests, the growing open period, or a half-open state that admits a fixed
//! number of probes; the state machine is small and its tests pin it down.
//!
//! ```text
//!            consecutiveFailures in a row, or
//!            failure rate >= threshold over window (>= minimumRequests seen)
//!   Closed ─────────────────────────────────────────────▶ Open (rejects for openFor)
//!     ▲                                                    │ openFor elapsed
//!     │ halfOpenRequests probes all succeed                ▼
//!     └────────────────────────────────────────────── HalfOpen (admits halfOpenRequests
//!                                                      probes; a failure re-opens with
//!                                                      openFor doubled, up to maxOpenFor)
//! ```
//!
//! It sits below the retries (DESIGN §2), so each try is judged: failures are 5xx
//! responses, resets, connect failures and timeouts (per-try, or a try cut off by the
//! request timeout), and gRPC statuses of a server in trouble ([`outcome::is_failure`]);
//! a caller that goes away counts as nothing. Open turns half-open on the first request
//! after `openFor`, so `ballast_circuit_state` of an idle service stays 1 until then. Outcomes of requests
//! admitted before the last state change are ignored, so a burst of stale failures can
//! not re-open a circuit that a probe just closed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_api::policy::CircuitBreaker as BreakerPolicy;
use prometheus::IntGauge;
use tokio::time::Instant;

use super::{Guard, ResponseFuture};
use crate::outcome::{self, Deadline};
use crate::rejection::{self, Reason};
use crate::stack::{HttpRequest, HttpService};

/// `circuitBreaker` with its defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    pub consecutive_failures: Option<u32>,
    pub failure_rate: Option<RateConfig>,
    pub open_for: Duration,
    pub max_open_for: Duration,
    pub half_open_requests: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    pub threshold: f64,
    pub minimum_requests: u32,
    pub window: Duration,
}

impl BreakerConfig {
    /// Defaults: 5 consecutive failures when no trigger is given, open for 5 s growing up
    /// to 60 s (or `openFor` if longer), one probe in half-open.
    pub fn from_policy(p: &BreakerPolicy) -> Self {
        let open_for = p.open_for.map(|d| d.get()).unwrap_or(Duration::from_secs(5));
        let failure_rate = p.failure_rate.map(|f| RateConfig {
            threshold: f.threshold,
            minimum_requests: f.minimum_requests,
            window: f.window.get(),
        });
        let consecutive_failures = match (p.consecutive_failures, failure_rate) {
            (None, None) => Some(5),
            (c, _) => c,
        };
        Self {
            consecutive_failures,
            failure_rate,
            open_for,
            max_open_for: p.max_open_for.map(|d| d.get()).unwrap_or(Duration::from_secs(60)).max(open_for),
            half_open_requests: p.half_open_requests.unwrap_or(1).max(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
}

impl State {
    /// The value of `ballast_circuit_state`: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open { .. } => 1,
            State::HalfOpen { .. } => 2,
        }
    }
}

/// Permission to send one request, tied to the state it was given in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    generation: u64,
    probe: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// The caller went away: neither success nor failure.
    Cancelled,
}

/// Counts over a sliding window of ten buckets, with running totals so a request's
/// record does not sum the buckets.
#[derive(Debug)]
struct Window {
    bucket_len: Duration,
    /// (bucket start, successes, failures), oldest first.
    buckets: std::collections::VecDeque<(Instant, u32, u32)>,
    /// (requests, failures) over `buckets`.
    totals: (u32, u32),
}

impl Window {
    const BUCKETS: u32 = 10;

    fn new(window: Duration) -> Self {
        Self {
            bucket_len: (window / Self::BUCKETS).max(Duration::from_millis(1)),
            buckets: Default::default(),
            totals: (0, 0),
        }
    }

    fn add(&mut self, now: Instant, failed: bool) {
        self.expire(now);
        let start_new = self.buckets.back().is_none_or(|&(start, _, _)| now >= start + self.bucket_len);
        if start_new {
            self.buckets.push_back((now, 0, 0));
        }
        if let Some(b) = self.buckets.back_mut() {
            if failed {
                b.2 += 1;
                self.totals.1 += 1;
            } else {
                b.1 += 1;
            }
            self.totals.0 += 1;
        }
    }

    fn expire(&mut self, now: Instant) {
        let span = self.bucket_len * Self::BUCKETS;
        while let Some(&(start, ok, failed)) = self.buckets.front() {
            if now < start + span {
                break;
            }
            self.buckets.pop_front();
            self.totals.0 -= ok + failed;
            self.totals.1 -= failed;
        }
    }

    /// (requests, failures) in the window.
    fn totals(&self) -> (u32, u32) {
        self.totals
    }

    fn clear(&mut self) {
        self.buckets.clear();
        self.totals = (0, 0);
    }
}

/// The breaker's state machine, free of I/O so tests drive it with explicit instants.
#[derive(Debug)]
pub struct Machine {
    config: BreakerConfig,
    state: State,
    generation: u64,
    consecutive: u32,
    window: Option<Window>,
    /// The open period the next opening uses.
    next_open_for: Duration,
}

impl Machine {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            state: State::Closed,
            generation: 0,
            consecutive: 0,
            window: config.failure_rate.map(|r| Window::new(r.window)),
            next_open_for: config.open_for,
            config,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Asks to send a request now: a permit, or how long the circuit stays open.
    pub fn try_acquire(&mut self, now: Instant) -> Result<Permit, Duration> {
        self.try_acquire_with(|| now)
    }

    /// [`Self::try_acquire`], reading the time only when the state needs it.
    pub fn try_acquire_with(&mut self, now: impl FnOnce() -> Instant) -> Result<Permit, Duration> {
        match self.state {
            State::Closed => Ok(Permit { generation: self.generation, probe: false }),
            State::Open { until } => {
                let now = now();
                if now < until {
                    return Err(until - now);
                }
                self.transition(State::HalfOpen { in_flight: 1, succeeded: 0 });
                Ok(Permit { generation: self.generation, probe: true })
            }
            State::HalfOpen { in_flight, succeeded } => {
                if in_flight + succeeded < self.config.half_open_requests {
                    self.state = State::HalfOpen { in_flight: in_flight + 1, succeeded };
                    Ok(Permit { generation: self.generation, probe: true })
                } else {
                    // Probes are out; callers wait for their verdict, rejected meanwhile.
                    Err(Duration::ZERO)
                }
            }
        }
    }

    /// Records what became of a permitted request.
    pub fn record(&mut self, now: Instant, permit: Permit, outcome: Outcome) {
        if permit.generation != self.generation {
            return;
        }
        match (self.state, permit.probe) {
            (State::HalfOpen { in_flight, succeeded }, true) => {
                let in_flight = in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Failure => self.open(now),
                    Outcome::Cancelled => self.state = State::HalfOpen { in_flight, succeeded },
                    Outcome::Success if succeeded + 1 >= self.config.half_open_requests => {
                        self.next_open_for = self.config.open_for;
                        self.transition(State::Closed);
                    }
                    Outcome::Success => self.state = State::HalfOpen { in_flight, succeeded: succeeded + 1 },
                }
            }
            (State::Closed, false) => {
                let failed = match outcome {
                    Outcome::Cancelled => return,
                    Outcome::Failure => true,
                    Outcome::Success => false,
                };
                self.consecutive = if failed { self.consecutive + 1 } else { 0 };
                if self.config.consecutive_failures.is_some_and(|n| self.consecutive >= n) {
                    self.open(now);
                    return;
                }
                if let (Some(w), Some(rate)) = (&mut self.window, self.config.failure_rate) {
                    w.add(now, failed);
                    let (requests, failures) = w.totals();
                    if requests >= rate.minimum_requests.max(1)
                        && f64::from(failures) >= rate.threshold * f64::from(requests)
                    {
                        self.open(now);
                    }
                }
            }
            _ => {}
        }
    }

    fn open(&mut self, now: Instant) {
        let period = self.next_open_for;
        self.next_open_for = (period * 2).min(self.config.max_open_for);
        self.transition(State::Open { until: now + period });
    }

    fn transition(&mut self, to: State) {
        self.state = to;
        self.generation += 1;
        self.consecutive = 0;
        if let Some(w) = &mut self.window {
            w.clear();
        }
    }
}

/// The breaker in a stack: one [`Machine`] per service, shared by every request. One
/// reference count to clone per request (each request's guard holds one).
#[derive(Clone)]
pub struct CircuitBreaker(Arc<Breaker>);

struct Breaker {
    machine: Mutex<Machine>,
    gauge: IntGauge,
    service: Arc<str>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig, service: Arc<str>, gauge: IntGauge) -> Self {
        gauge.set(0);
        Self(Arc::new(Breaker { machine: Mutex::new(Machine::new(config)), gauge, service }))
    }

    fn with_machine<T>(&self, f: impl FnOnce(&mut Machine) -> T) -> T {
        let this = &*self.0;
        let mut m = this.machine.lock().unwrap_or_else(|p| p.into_inner());
        let before = m.state();
        let out = f(&mut m);
        let after = m.state();
        if before.gauge() != after.gauge() {
            this.gauge.set(after.gauge());
            tracing::info!(service = %this.service, from = ?before, to = ?after, "circuit breaker state changed");
        }
        out
    }
}

/// Reports a permitted request that never got its response.
struct PermitGuard {
    breaker: CircuitBreaker,
    permit: Option<Permit>,
    deadline: Option<Deadline>,
}

impl Drop for PermitGuard {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let outcome = if outcome::dropped_is_failure(self.deadline) {
                Outcome::Failure
            } else {
                Outcome::Cancelled
            };
            self.breaker.with_machine(|m| m.record(Instant::now(), permit, outcome));
        }
    }
}

impl Guard for CircuitBreaker {
    fn handle(&self, inner: &HttpService, req: HttpRequest) -> ResponseFuture {
        // A closed circuit (the common case) admits without reading the clock.
        let permit = match self.with_machine(|m| m.try_acquire_with(Instant::now)) {
            Ok(p) => p,
            Err(remaining) => {
                let detail = format!(
                    "the circuit breaker of {} is open after repeated failures; retry in {:.1}s",
                    self.0.service,
                    remaining.as_secs_f64()
                );
                return Box::pin(std::future::ready(Ok(rejection::response(
                    Reason::CircuitOpen,
                    rejection::is_grpc(&req),
                    &detail,
                ))));
            }
        };
        let deadline = outcome::Limits::deadline_of(&req);
        let grpc = rejection::is_grpc(&req);
        let mut guard = PermitGuard { breaker: self.clone(), permit: Some(permit), deadline };
        let fut = inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let outcome = match &res {
                Ok(rsp) if outcome::is_failure(rsp, grpc) => Outcome::Failure,
                Ok(_) => Outcome::Success,
                Err(_) => Outcome::Failure,
            };
            if let Some(permit) = guard.permit.take() {
                guard.breaker.with_machine(|m| m.record(Instant::now(), permit, outcome));
            }
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: Some(3),
            failure_rate: None,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(12),
            half_open_requests: 2,
        }
    }

    fn fail(m: &mut Machine, now: Instant) {
        let p = m.try_acquire(now).expect("admitted");
        m.record(now, p, Outcome::Failure);
    }

    fn succeed(m: &mut Machine, now: Instant) {
        let p = m.try_acquire(now).expect("admitted");
        m.record(now, p, Outcome::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let mut m = Machine::new(config());
        let t0 = Instant::now();
        fail(&mut m, t0);
        fail(&mut m, t0);
        succeed(&mut m, t0);
        fail(&mut m, t0);
        fail(&mut m, t0);
        assert_eq!(m.state(), State::Closed);
        fail(&mut m, t0);
        assert_eq!(m.state(), State::Open { until: t0 + Duration::from_secs(5) });
        assert_eq!(m.try_acquire(t0 + Duration::from_secs(1)), Err(Duration::from_secs(4)));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_its_probes_and_closes_when_they_all_succeed() {
        let mut m = Machine::new(config());
        let t0 = Instant::now();
        (0..3).for_each(|_| fail(&mut m, t0));
        let t1 = t0 + Duration::from_secs(5);
        let a = m.try_acquire(t1).expect("first probe");
        let b = m.try_acquire(t1).expect("second probe");
        assert!(m.try_acquire(t1).is_err(), "only halfOpenRequests probes at once");
        assert_eq!(m.state(), State::HalfOpen { in_flight: 2, succeeded: 0 });
        m.record(t1, a, Outcome::Success);
        assert!(matches!(m.state(), State::HalfOpen { .. }));
        m.record(t1, b, Outcome::Success);
        assert_eq!(m.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_twice_as_long_up_to_the_maximum() {
        let mut m = Machine::new(config());
        let mut now = Instant::now();
        (0..3).for_each(|_| fail(&mut m, now));
        let mut expected = [5u64, 10, 12, 12].into_iter();
        let mut period = Duration::from_secs(expected.next().unwrap_or_default());
        for next in expected {
            assert_eq!(m.state(), State::Open { until: now + period });
            now += period;
            fail(&mut m, now);
            period = Duration::from_secs(next);
        }
        // Once closed again, the next opening starts from openFor.
        now += period;
        succeed(&mut m, now);
        succeed(&mut m, now);
        assert_eq!(m.state(), State::Closed);
        (0..3).for_each(|_| fail(&mut m, now));
        assert_eq!(m.state(), State::Open { until: now + Duration::from_secs(5) });
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_its_slot() {
        let mut m = Machine::new(BreakerConfig { half_open_requests: 1, ..config() });
        let t0 = Instant::now();
        (0..3).for_each(|_| fail(&mut m, t0));
        let t1 = t0 + Duration::from_secs(5);
        let p = m.try_acquire(t1).expect("probe");
        assert!(m.try_acquire(t1).is_err());
        m.record(t1, p, Outcome::Cancelled);
        let p = m.try_acquire(t1).expect("slot freed");
        m.record(t1, p, Outcome::Success);
        assert_eq!(m.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_outcomes_do_not_reopen_a_closed_circuit() {
        let mut m = Machine::new(BreakerConfig { half_open_requests: 1, ..config() });
        let t0 = Instant::now();
        let stale: Vec<Permit> = (0..3).map(|_| m.try_acquire(t0).expect("closed")).collect();
        (0..3).for_each(|_| fail(&mut m, t0));
        let t1 = t0 + Duration::from_secs(5);
        succeed(&mut m, t1);
        assert_eq!(m.state(), State::Closed);
        for p in stale {
            m.record(t1, p, Outcome::Failure);
        }
        assert_eq!(m.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_needs_the_minimum_and_forgets_old_buckets() {
        let cfg = BreakerConfig {
            consecutive_failures: None,
            failure_rate: Some(RateConfig {
                threshold: 0.5,
                minimum_requests: 10,
                window: Duration::from_secs(10),
            }),
            ..config()
        };
        let mut m = Machine::new(cfg);
        let t0 = Instant::now();
        // 4 failures of 8: over the threshold but under the minimum.
        for i in 0..8 {
            if i % 2 == 0 { fail(&mut m, t0) } else { succeed(&mut m, t0) }
        }
        assert_eq!(m.state(), State::Closed);
        // 11 s later those have left the window: 5 failures of 10 fresh ones open it,
        // the ninth and tenth requests decide.
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..5 {
            succeed(&mut m, t1);
        }
        for _ in 0..4 {
            fail(&mut m, t1);
        }
        assert_eq!(m.state(), State::Closed, "4 of 9");
        fail(&mut m, t1);
        assert!(matches!(m.state(), State::Open { .. }), "5 of 10");
    }

    #[tokio::test(start_paused = true)]
    async fn defaults_fill_in_a_bare_section() {
        let c = BreakerConfig::from_policy(&BreakerPolicy::default());
        assert_eq!(c.consecutive_failures, Some(5));
        assert_eq!(c.open_for, Duration::from_secs(5));
        assert_eq!(c.max_open_for, Duration::from_secs(60));
        assert_eq!(c.half_open_requests, 1);
    }
}
