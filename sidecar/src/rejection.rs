//! Responses the mesh itself makes instead of the upstream (DESIGN §2).
//!
//! A rejection never looks like an upstream error: it carries `ballast-rejected: REASON`,
//! and a gRPC caller gets a trailers-only response with the status of the table (HTTP 200,
//! `grpc-status`), because gRPC clients map bare HTTP 503s to UNAVAILABLE with an
//! unhelpful message.

use http::{HeaderValue, Request, Response, StatusCode, header};

use crate::body::{self, Body};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    RateLimited,
    BulkheadFull,
    CircuitOpen,
    NoEndpoints,
    Timeout,
    /// The inbound policy does not admit the caller (`inbound.mtls`, `inbound.allow`).
    Forbidden,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RateLimited => "rate-limited",
            Reason::BulkheadFull => "bulkhead-full",
            Reason::CircuitOpen => "circuit-open",
            Reason::NoEndpoints => "no-endpoints",
            Reason::Timeout => "timeout",
            Reason::Forbidden => "forbidden",
        }
    }
    pub fn http_status(self) -> StatusCode {
        match self {
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::BulkheadFull | Reason::CircuitOpen | Reason::NoEndpoints => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::Forbidden => StatusCode::FORBIDDEN,
        }
    }
    /// gRPC status code (RESOURCE_EXHAUSTED 8, UNAVAILABLE 14, DEADLINE_EXCEEDED 4,
    /// PERMISSION_DENIED 7).
    pub fn grpc_status(self) -> u8 {
        match self {
            Reason::RateLimited | Reason::BulkheadFull => 8,
            Reason::CircuitOpen | Reason::NoEndpoints => 14,
            Reason::Timeout => 4,
            Reason::Forbidden => 7,
        }
    }
}

/// Whether the request is gRPC (`content-type: application/grpc[+proto|...]`). Every gRPC
/// call is a POST, so most requests are told apart by their method alone, without a
/// header lookup (several layers ask, per request).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::POST
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Marks a response made by this sidecar's own rejection, in its extensions. Metrics
/// count rejections from this marker only: a `ballast-rejected` header from upstream (a
/// peer sidecar's rejection, or anything an app sends) is that upstream's response, and
/// copying its value into a label would let any server create series at will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected(pub Reason);

/// The rejection response for `reason`, shaped for gRPC when `grpc` is set.
pub fn response(reason: Reason, grpc: bool, detail: &str) -> Response<Body> {
    let mut rsp = build(reason, grpc, detail);
    rsp.extensions_mut().insert(Rejected(reason));
    rsp
}

fn build(reason: Reason, grpc: bool, detail: &str) -> Response<Body> {
    let mut builder = Response::builder().header(crate::HEADER_REJECTED, reason.as_str());
    if grpc {
        let message = format!("ballast: {}: {detail}", reason.as_str());
        builder = builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", reason.grpc_status().to_string())
            .header(
                "grpc-message",
                HeaderValue::from_str(&percent_encode(&message))
                    .unwrap_or(HeaderValue::from_static("rejected")),
            );
        return builder.body(body::empty()).unwrap_or_else(|_| fallback());
    }
    builder
        .status(reason.http_status())
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body::full(format!("ballast: {}: {detail}\n", reason.as_str())))
        .unwrap_or_else(|_| fallback())
}

/// Percent-encodes a grpc-message as the gRPC HTTP/2 spec requires.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn fallback() -> Response<Body> {
    let mut r = Response::new(body::empty());
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

/// A plain-text response made by the sidecar itself (errors, and the admin API).
pub fn text_response(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut msg: String = message.into();
    msg.push('\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body::full(msg))
        .unwrap_or_else(|_| fallback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_grpc_shapes() {
        let r = response(Reason::NoEndpoints, false, "svc has no endpoints");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[crate::HEADER_REJECTED], "no-endpoints");
        assert_eq!(r.extensions().get::<Rejected>(), Some(&Rejected(Reason::NoEndpoints)));
        let g = response(Reason::Timeout, true, "late");
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], "4");
        assert_eq!(g.headers()[crate::HEADER_REJECTED], "timeout");
        assert_eq!(percent_encode("a b%\n"), "a b%25%0A");
    }
}
