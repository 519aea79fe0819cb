//! What the layers of a stack tell each other about a request and its outcome.
//!
//! Layers talk through typed request and response extensions rather than arguments, so
//! each stays a plain `Service<Request>` and the stack can be read top to bottom:
//!
//! * the request timeout puts the request's [`Deadline`] on it, so lower layers can tell
//!   a try cut off by the timeout (a failure) from a caller that went away (neutral);
//! * the route layer puts the [`PerTryTimeout`] on it, which the balancer enforces around
//!   the one endpoint call it makes;
//! * a retry adds the endpoints that already failed to [`Avoid`];
//! * the balancer marks each response with the endpoint that answered ([`ServedBy`]) and
//!   every response it had to make itself with its [`UpstreamFailure`].
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

/// When the overall request timeout fires (request extension).
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub tokio::time::Instant);

/// Bound on each try, enforced by the balancer around one endpoint call (request
/// extension).
#[derive(Debug, Clone, Copy)]
pub struct PerTryTimeout(pub Duration);

/// Endpoints a retry should not go back to while another is available (request
/// extension).
#[derive(Debug, Clone, Default)]
pub struct Avoid(pub Vec<SocketAddr>);

/// The endpoint that produced a response (response extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedBy(pub SocketAddr);

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
/// below the breaker (no endpoints) are not the upstream's failures.
pub fn is_failure(rsp: &HttpResponse) -> bool {
    if rsp.extensions().get::<Rejected>().is_some() {
        return false;
    }
    rsp.status().is_server_error()
        || rsp.headers().get(GRPC_STATUS).is_some_and(|v| matches!(v.as_bytes(), b"2" | b"4" | b"13" | b"14"))
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
