//! The attempt layer: one child span per try of an outbound request.
//!
//! It sits right under the retry layer (above the circuit breaker and the balancer), so
//! each try the retry makes passes it once: it counts the try (the access log's
//! `attempts`), writes the try's own span into `traceparent`/B3 for the next hop, and
//! records the try's span when it ends: the endpoint the balancer chose
//! (`network.peer.address`), the status, a per-try timeout or a failed connect
//! (`ballast.failure`), a rejection below the retry (circuit open, no endpoints) and the
//! circuit's state. A try cut short (the overall timeout, or the caller gone) is recorded
//! too, as cancelled.
//!
//! Requests without a [`RequestTrace`] (the benchmarks' bare stacks) pass untouched.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use http::{Method, Uri, Version};
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, Status};
use prometheus::IntGauge;

use super::propagation;
use super::request::{AttemptParent, RequestTrace, common_attributes, span_name};
use crate::outcome::{Deadline, Limits, ServedBy, UpstreamFailure};
use crate::rejection::Rejected;
use crate::resilience::{Guard, ResponseFuture};
use crate::stack::{HttpRequest, HttpResponse, HttpService};

/// See the module docs; `circuit` is the service's `ballast_circuit_state` gauge, when it
/// has a breaker.
#[derive(Clone, Default)]
pub struct Attempt {
    circuit: Option<IntGauge>,
}

impl Attempt {
    pub fn new(circuit: Option<IntGauge>) -> Self {
        Self { circuit }
    }
}

impl Guard for Attempt {
    fn handle(&self, inner: &HttpService, mut req: HttpRequest) -> ResponseFuture {
        let Some(RequestTrace(shared)) = req.extensions().get::<RequestTrace>().cloned() else {
            return inner.call(req);
        };
        let resend = shared.attempts.fetch_add(1, Ordering::Relaxed);
        let Some(parent) = &shared.spans else { return inner.call(req) };
        let span_id = super::new_span_id();
        propagation::inject(
            req.headers_mut(),
            parent.trace_id,
            span_id,
            parent.sampled,
            parent.formats,
            parent.tracestate.as_ref(),
        );
        if !parent.sampled {
            return inner.call(req);
        }
        let mut span = AttemptSpan {
            shared: shared.clone(),
            span_id,
            resend,
            start: Instant::now(),
            start_wall: SystemTime::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            grpc: crate::rejection::is_grpc(&req),
            deadline: Limits::deadline_of(&req),
            circuit: self.circuit.clone(),
            done: false,
        };
        let fut = inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            if let Ok(rsp) = &result {
                span.record(Some(rsp));
            }
            result
        })
    }
}

/// A try in flight; records itself as cancelled if dropped before its response.
struct AttemptSpan {
    shared: std::sync::Arc<super::request::TraceShared>,
    span_id: opentelemetry::trace::SpanId,
    resend: u32,
    start: Instant,
    start_wall: SystemTime,
    method: Method,
    uri: Uri,
    version: Version,
    grpc: bool,
    deadline: Option<Deadline>,
    circuit: Option<IntGauge>,
    done: bool,
}

impl Drop for AttemptSpan {
    fn drop(&mut self) {
        if !self.done {
            self.record(None);
        }
    }
}

impl AttemptSpan {
    fn record(&mut self, rsp: Option<&HttpResponse>) {
        self.done = true;
        let Some(parent) = &self.shared.spans else { return };
        let AttemptParent { telemetry, trace_id, span_id: parent_id, .. } = parent;
        let Some(tracing) = &telemetry.tracing else { return };
        let duration = self.start.elapsed();
        let mut attrs = Vec::with_capacity(16);
        common_attributes(&mut attrs, &self.method, &self.uri, None, self.version, false);
        if self.resend > 0 {
            attrs.push(KeyValue::new("http.request.resend_count", i64::from(self.resend)));
        }
        let mut error: Option<String> = None;
        let mut description = String::new();
        match rsp {
            Some(rsp) => {
                let status = rsp.status().as_u16();
                attrs.push(KeyValue::new("http.response.status_code", i64::from(status)));
                if status >= 400 {
                    error = Some(status.to_string());
                }
                if let Some(ServedBy(addr)) = rsp.extensions().get::<ServedBy>() {
                    attrs.push(KeyValue::new("network.peer.address", addr.ip().to_string()));
                    attrs.push(KeyValue::new("network.peer.port", i64::from(addr.port())));
                }
                if let Some(f) = rsp.extensions().get::<UpstreamFailure>() {
                    let f = match f {
                        UpstreamFailure::Connect => "connect",
                        UpstreamFailure::Reset => "reset",
                        UpstreamFailure::Timeout => "per-try-timeout",
                    };
                    attrs.push(KeyValue::new("ballast.failure", f));
                    description = format!("{f}: {}", rsp.status());
                }
                if let Some(Rejected(reason)) = rsp.extensions().get::<Rejected>() {
                    attrs.push(KeyValue::new("ballast.rejected", reason.as_str()));
                    description = format!("rejected by the mesh: {}", reason.as_str());
                }
                if self.grpc {
                    attrs.push(KeyValue::new("rpc.system", "grpc"));
                    // Only a trailers-only answer has its status by now.
                    if let Some(code) = rsp
                        .headers()
                        .get(crate::outcome::GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                    {
                        attrs.push(KeyValue::new("rpc.grpc.status_code", code));
                        if code != 0 {
                            error.get_or_insert(code.to_string());
                        }
                    }
                }
            }
            None => {
                let why = if crate::outcome::dropped_is_failure(self.deadline) {
                    "cancelled by the request timeout"
                } else {
                    "cancelled: the caller went away"
                };
                attrs.push(KeyValue::new("ballast.failure", "cancelled"));
                description = why.into();
                error = Some("cancelled".into());
            }
        }
        if let Some(g) = &self.circuit {
            let state = match g.get() {
                1 => "open",
                2 => "half-open",
                _ => "closed",
            };
            attrs.push(KeyValue::new("ballast.circuit.state", state));
        }
        let status = match error {
            Some(t) => {
                attrs.push(KeyValue::new("error.type", t));
                Status::error(description)
            }
            None => Status::Unset,
        };
        tracing.send(super::Finished {
            trace_id: *trace_id,
            span_id: self.span_id,
            parent: Some(*parent_id),
            parent_is_remote: false,
            kind: SpanKind::Client,
            name: span_name(&self.method, self.grpc.then_some(&self.uri)),
            start: self.start_wall,
            duration,
            attributes: attrs,
            status,
        });
    }
}
