//! What the layers of a stack tell each other about a request and its outcome.
//!
//! Layers talk through typed request and response extensions rather than arguments, so
//! each stays a plain `Service<Request>` and the stack can be read top to bottom:
//!
//! * the route layer puts the request's time [`Limits`] on it: its [`Deadline`] (from
//!   `timeouts.request`) and the per-try timeout. The balancer enforces whichever comes
//!   first around the one endpoint call it makes, so one timer per try bounds both; lower
//!   layers tell a try cut off by the deadline (a failure) from a caller that went away
//!   (neutral);
//! * a retry adds the endpoints that already failed to [`Avoid`];
//! * the balancer marks a response with the endpoint that answered ([`ServedBy`]) when a
//!   layer above asked for it ([`ReportServedBy`]), and every response it had to make
//!   itself with its [`UpstreamFailure`].
//!
//! Everything below the retry layer answers with a response, never an error: a failed
//! connect, a reset and a per-try timeout become 502/504 responses carrying their cause,
//! so the retry, circuit breaker and outlier detection classify responses only.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, StatusCode};

use crate::body::BoxError;
use crate::client::ConnectError;
use crate::rejection::{self, Rejected};
use crate::stack::HttpResponse;

/// The gRPC status trailer (or header, in a trailers-only response). A constant, so
/// lookups do not parse the name each time.
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// When the overall request timeout fires.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub tokio::time::Instant);

/// The time limits of a request (request extension), put on it by its route's stack
/// (see [`crate::resilience::timeout`]).
///
/// One extension rather than one per limit: every try copies the request's extensions
/// (the retry keeps a copy to send again), one allocation per entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// `timeouts.request` counted from when the request entered its route, and the
    /// timeout itself, for the message of the 504.
    pub deadline: Option<(Deadline, Duration)>,
    /// `timeouts.perTry`.
    pub per_try: Option<Duration>,
    /// Whether the request is a gRPC call: a timeout is then answered as gRPC's
    /// DEADLINE_EXCEEDED. Looked up once where the limits are set, and only with a
    /// deadline (only the timeout's answer reads it).
    pub grpc: bool,
}

impl Limits {
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline.map(|(d, _)| d)
    }

    /// The deadline of `req`, if its route has a request timeout.
    pub fn deadline_of<B>(req: &http::Request<B>) -> Option<Deadline> {
        req.extensions().get::<Limits>().and_then(Limits::deadline)
    }

    /// The 504 `ballast-rejected: timeout` for a request past its deadline.
    pub fn timeout_response(&self) -> HttpResponse {
        let timeout = self.deadline.map(|(_, t)| t).unwrap_or_default();
        rejection::response(
            rejection::Reason::Timeout,
            self.grpc,
            &format!("no response within the request timeout of {timeout:?}"),
        )
    }
}

/// Endpoints a retry should not go back to while another is available (request
/// extension).
#[derive(Debug, Clone, Default)]
pub struct Avoid(pub Vec<SocketAddr>);

/// The endpoint that produced a response (response extension), set only on the
/// responses to requests that carry [`ReportServedBy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedBy(pub SocketAddr);

/// Asks for [`ServedBy`] on the response (request extension). Only the layers that read
/// it ask: a retry (to steer the next try away from the endpoint that failed) and the
/// request's telemetry (the access log's `upstream`, a try's span). Marking every
/// response instead gave each one an extension map of its own, two allocations and a
/// hash insert: about 1% of a bare proxied request (callgrind, session 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportServedBy;

impl ReportServedBy {
    /// Whether `req` asks for [`ServedBy`] on its response.
    pub fn asked<B>(req: &http::Request<B>) -> bool {
        req.extensions().get::<ReportServedBy>().is_some()
    }
}

/// Why the sidecar had to answer a try itself (response extension on a 502 or 504).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No connection could be made.
    Connect,
    /// The connection or stream failed before response headers.
    Reset,
    /// The per-try timeout fired.
    Timeout,
}

/// Whether a response counts as a failure for the circuit breaker and outlier detection:
/// a 5xx from upstream, a reset, a connect failure or a timeout, and for gRPC (always
/// HTTP 200) a trailers-only UNKNOWN, DEADLINE_EXCEEDED, INTERNAL or UNAVAILABLE: the
/// statuses of a server in trouble rather than of a bad call. The mesh's own rejections
/// below the breaker (no endpoints) are not the upstream's failures; a try the request
/// timeout cut off is.
///
/// `grpc` says whether the request was a gRPC call (`rejection::is_grpc`): only then is
/// `grpc-status` looked for.
pub fn is_failure(rsp: &HttpResponse, grpc: bool) -> bool {
    if let Some(Rejected(reason)) = rsp.extensions().get::<Rejected>() {
        // Below the breaker, a timeout rejection is the balancer's answer for a try the
        // request's deadline cut off: the upstream was too slow.
        return *reason == rejection::Reason::Timeout;
    }
    rsp.status().is_server_error()
        || grpc
            && rsp
                .headers()
                .get(GRPC_STATUS)
                .is_some_and(|v| matches!(v.as_bytes(), b"2" | b"4" | b"13" | b"14"))
}

/// Whether a try that was dropped before its response (the caller went away, or the
/// overall timeout cut it off) counts as a failure: only when the deadline has passed.
pub fn dropped_is_failure(deadline: Option<Deadline>) -> bool {
    deadline.is_some_and(|Deadline(d)| tokio::time::Instant::now() >= d)
}

/// The response for an error from an endpoint's client, saying what failed.
pub fn upstream_error_response(err: &BoxError) -> HttpResponse {
    let mut connect = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
    while let Some(e) = source {
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            connect = Some(c.to_string());
            break;
        }
        source = e.source();
    }
    let (mut rsp, failure) = match connect {
        Some(c) => (
            rejection::text_response(
                StatusCode::BAD_GATEWAY,
                format!("ballast: upstream connect error: {c}"),
            ),
            UpstreamFailure::Connect,
        ),
        None => (
            rejection::text_response(
                StatusCode::BAD_GATEWAY,
                format!("ballast: upstream connection failed: {}", ballast_api::errors::chain(err.as_ref())),
            ),
            UpstreamFailure::Reset,
        ),
    };
    rsp.extensions_mut().insert(failure);
    rsp.headers_mut().insert(ballast_api::names::HEADER_ERROR, HeaderValue::from_static("upstream"));
    rsp
}

/// The response for a try that hit its per-try timeout.
pub fn per_try_timeout_response(timeout: Duration, endpoint: SocketAddr) -> HttpResponse {
    let mut rsp = rejection::text_response(
        StatusCode::GATEWAY_TIMEOUT,
        format!("ballast: no response from {endpoint} within the per-try timeout of {timeout:?}"),
    );
    rsp.extensions_mut().insert(UpstreamFailure::Timeout);
    rsp.headers_mut().insert(ballast_api::names::HEADER_ERROR, HeaderValue::from_static("per-try-timeout"));
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_rejection_is_a_failure_other_rejections_are_not() {
        let limits = Limits {
            deadline: Some((Deadline(tokio::time::Instant::now()), Duration::ZERO)),
            ..Default::default()
        };
        assert!(is_failure(&limits.timeout_response(), false), "a try the deadline cut off");
        let grpc = Limits { grpc: true, ..limits };
        assert!(is_failure(&grpc.timeout_response(), true), "gRPC too (HTTP 200, DEADLINE_EXCEEDED)");
        let none = rejection::response(rejection::Reason::NoEndpoints, false, "none");
        assert!(!is_failure(&none, false));
        let timeout = per_try_timeout_response(Duration::from_secs(1), ([127, 0, 0, 1], 1).into());
        assert!(is_failure(&timeout, false));
    }

    #[test]
    fn grpc_statuses_count_for_grpc_calls_only() {
        let rsp = |status: &'static str| {
            let mut r = http::Response::new(crate::body::empty());
            r.headers_mut().insert(GRPC_STATUS, HeaderValue::from_static(status));
            r
        };
        assert!(is_failure(&rsp("14"), true), "UNAVAILABLE");
        assert!(!is_failure(&rsp("5"), true), "NOT_FOUND is the call's, not the server's");
        assert!(!is_failure(&rsp("14"), false), "grpc-status means nothing outside gRPC");
    }
}
