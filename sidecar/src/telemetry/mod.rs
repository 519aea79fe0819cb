//! Tracing and access logs (DESIGN §7, issue 8): what an operator needs to follow one
//! slow request through the mesh without touching the app.
//!
//! Per request, outermost first:
//!
//! ```text
//! proxy::http::handle    RequestScope::start     x-request-id (made when missing), trace
//!                                                context read (W3C, B3), sampling decided
//! proxy::http::{outbound,inbound}                the service found: its policy's sampling
//!                                                (telemetry.*SamplingPercent) applies
//! stack (below retry)    attempt::Attempt        per try: a child span, the context for
//!                                                the next hop written, tries counted
//! response body end      request::Finishing      the request's span (server inbound,
//!                                                client outbound) and its access-log line
//! ```
//!
//! Spans follow the OpenTelemetry HTTP semantic conventions (`http.request.method`,
//! `url.full`/`url.path`, `server.address`, `http.response.status_code`, `error.type`,
//! `http.request.resend_count`; `rpc.*` for gRPC) plus `ballast.*` attributes for what
//! the mesh decided: `ballast.rejected` (the `ballast-rejected` reason), `ballast.attempts`,
//! `ballast.upstream` (the endpoint that answered), `ballast.circuit.state`,
//! `ballast.failure` (connect, reset, per-try-timeout, cancelled) and
//! `ballast.peer.identity` (the caller's verified SPIFFE ID). A request's span ends when
//! its response body does (or the client goes away), so a stream's span covers the
//! stream and gRPC's status is read from the trailers; an attempt's span ends with its
//! response headers, which is when the retry layer judges it.
//!
//! Decisions where the issue and DESIGN are silent:
//! * **No OTLP endpoint, no spans, no rewritten context.** Without an exporter, the
//!   sidecar passes `traceparent`/B3 through untouched and adds none: a span id that is
//!   never exported would leave a hole in the app's own traces, and a made-up unsampled
//!   context would switch off the app's own parent-based sampling. The access log then
//!   shows the caller's trace id when there is one.
//! * **Inbound, the app's parent is the server span**; outbound, each try's
//!   `traceparent` names that try's span, so the callee's server span hangs under the
//!   try that reached it, retries side by side.
//! * **The access log is on at info** (`ballast_sidecar::access`; `BALLAST_LOG` can turn it
//!   off), every request by default (`--access-log-sampling`, or a policy's
//!   `telemetry.accessLogSamplingPercent`). With a trace id the sampling decision is
//!   taken from it, so the sidecars on both ends log the same requests.

pub mod access_log;
pub mod attempt;
pub mod export;
pub mod propagation;
pub mod request;
pub mod sampler;

use std::borrow::Cow;

use http::HeaderValue;
use opentelemetry::InstrumentationScope;
use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

pub use request::{ACCESS_LOG, RequestScope};

use crate::metrics::Metrics;

/// `x-request-id`: kept when the request has one, else a UUID v4 (Envoy's behaviour).
pub const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// What the sidecar was told about telemetry at start.
#[derive(Debug, Clone)]
pub struct TelemetryOptions {
    /// Share of requests logged (0-1), unless a policy says otherwise.
    pub access_log_ratio: f64,
    /// Resource attributes: `service.name` (unless `OTEL_SERVICE_NAME` or
    /// `OTEL_RESOURCE_ATTRIBUTES` name one), `service.namespace`, `k8s.pod.name`.
    pub service: Option<String>,
    pub namespace: String,
    pub pod: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Sampler(#[from] sampler::SamplerError),
    #[error(transparent)]
    Export(#[from] export::ExportError),
}

/// The sidecar's telemetry, shared by every request.
pub struct Telemetry {
    pub access_log_ratio: f64,
    pub tracing: Option<Tracing>,
}

/// Span recording, when an OTLP endpoint is set.
pub struct Tracing {
    pub sampler: sampler::Sampler,
    pub exporter: export::Exporter,
    pub scope: InstrumentationScope,
}

impl Telemetry {
    /// Telemetry as the environment (`OTEL_*`) and `opts` describe it; starts the export
    /// thread when spans are to be exported.
    pub fn from_env(opts: &TelemetryOptions, metrics: &Metrics) -> Result<Self, TelemetryError> {
        let var = |k: &str| std::env::var(k).ok();
        let tracing = match export::ExportConfig::from_env(var)? {
            None => None,
            Some(config) => {
                let sampler = sampler::Sampler::from_env()?;
                tracing::info!(
                    endpoint = %config.endpoint,
                    protocol = ?config.protocol,
                    parent_based = sampler.parent_based,
                    ratio = sampler.ratio,
                    "exporting spans with OTLP"
                );
                let exporter = export::Exporter::start(config, resource(opts), metrics)?;
                Some(Tracing { sampler, exporter, scope: instrumentation_scope() })
            }
        };
        Ok(Self { access_log_ratio: opts.access_log_ratio.clamp(0.0, 1.0), tracing })
    }

    /// Flushes queued spans, waiting at most `deadline`.
    pub fn shutdown(&self, deadline: std::time::Duration) {
        if let Some(t) = &self.tracing {
            t.exporter.shutdown(deadline);
        }
    }
}

/// What a finished span is made of; [`Tracing::send`] adds the rest.
pub(crate) struct Finished {
    pub trace_id: opentelemetry::trace::TraceId,
    pub span_id: opentelemetry::trace::SpanId,
    /// `None`: a root span.
    pub parent: Option<opentelemetry::trace::SpanId>,
    /// The parent is in another process (the caller).
    pub parent_is_remote: bool,
    pub kind: opentelemetry::trace::SpanKind,
    pub name: Text,
    pub start: std::time::SystemTime,
    pub duration: std::time::Duration,
    pub attributes: Vec<KeyValue>,
    pub status: opentelemetry::trace::Status,
}

impl Tracing {
    /// Queues a sampled span for export.
    pub(crate) fn send(&self, f: Finished) {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceState};
        self.exporter.send(opentelemetry_sdk::trace::SpanData {
            span_context: SpanContext::new(
                f.trace_id,
                f.span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: f.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: f.parent_is_remote,
            span_kind: f.kind,
            name: f.name,
            start_time: f.start,
            end_time: f.start + f.duration,
            attributes: f.attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: f.status,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

fn instrumentation_scope() -> InstrumentationScope {
    InstrumentationScope::builder("ballast-sidecar").with_version(env!("CARGO_PKG_VERSION")).build()
}

/// The resource describing this sidecar's workload: `service.name` is `--service` (or
/// `ballast-sidecar`), over which `OTEL_RESOURCE_ATTRIBUTES` and then `OTEL_SERVICE_NAME`
/// win, as the spec orders them.
fn resource(opts: &TelemetryOptions) -> Resource {
    let own = [
        KeyValue::new("service.name", opts.service.clone().unwrap_or_else(|| "ballast-sidecar".into())),
        KeyValue::new("service.namespace", opts.namespace.clone()),
        KeyValue::new("k8s.namespace.name", opts.namespace.clone()),
        KeyValue::new("k8s.pod.name", opts.pod.clone()),
    ];
    let builder = Resource::builder_empty()
        .with_attributes(own)
        .with_detector(Box::new(opentelemetry_sdk::resource::EnvResourceDetector::new()));
    match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.trim().is_empty() => builder.with_service_name(name),
        _ => builder,
    }
    .build()
}

/// A fresh request id: a random UUID (version 4, RFC 9562 §5.4).
///
/// Written into a stack buffer by table rather than pushed into a `String` char by char:
/// that was about 1,400 instructions per request without an `x-request-id` (callgrind,
/// session 12), this is about a quarter of it.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = [b'-'; 36];
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        s[at] = HEX[(byte >> 4) as usize];
        s[at + 1] = HEX[(byte & 0xf) as usize];
        at += 2;
    }
    HeaderValue::from_bytes(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A random, valid (non-zero) span id.
pub(crate) fn new_span_id() -> opentelemetry::trace::SpanId {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return opentelemetry::trace::SpanId::from(id);
        }
    }
}

/// A random, valid (non-zero) trace id.
pub(crate) fn new_trace_id() -> opentelemetry::trace::TraceId {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return opentelemetry::trace::TraceId::from(id);
        }
    }
}

/// A span name or attribute value that is usually static.
pub(crate) type Text = Cow<'static, str>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4() {
        let a = new_request_id();
        let s = a.to_str().expect("ascii");
        assert_eq!(s.len(), 36);
        assert_eq!(s.as_bytes()[14], b'4', "{s}");
        assert!(matches!(s.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{s}");
        for (i, c) in s.bytes().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                assert_eq!(c, b'-', "{s}");
            } else {
                assert!(c.is_ascii_digit() || (b'a'..=b'f').contains(&c), "{s}");
            }
        }
        assert_ne!(a, new_request_id());
    }
}
