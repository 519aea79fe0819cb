//! One request's telemetry: its ids, its span, its access-log line.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry::{Array, KeyValue, StringValue, Value};

use super::propagation::{self, Extracted, Formats};
use super::{Telemetry, X_REQUEST_ID, sampler};
use crate::body::{self, Body, BoxError};
use crate::outcome::{ReportServedBy, ServedBy};
use crate::proxy::{ConnInfo, MeshPeer};
use crate::rejection::Rejected;
use crate::stack::{Direction, HttpRequest};

/// The tracing target of the access log.
pub const ACCESS_LOG: &str = "ballast_sidecar::access";

/// Request extension read by the [attempt layer](super::attempt): tries are counted here,
/// and traced under `spans` when this request's tries get spans.
#[derive(Clone)]
pub struct RequestTrace(pub Arc<TraceShared>);

pub struct TraceShared {
    pub attempts: AtomicU32,
    pub spans: Option<AttemptParent>,
}

/// What an attempt's span hangs under and passes on.
pub struct AttemptParent {
    pub telemetry: Arc<Telemetry>,
    pub trace_id: TraceId,
    /// The request's client span.
    pub span_id: SpanId,
    pub sampled: bool,
    pub tracestate: Option<HeaderValue>,
    pub formats: Formats,
}

/// A request from arrival to the end of its response body.
///
/// Quiet when nothing can be recorded (the access-log target filtered out and tracing
/// off): the request still gets its `x-request-id`, but no clock is read, nothing of the
/// request is cloned and no extension is added for the attempt layer, which then lets
/// the request pass. That was about 1,500 of a proxied request's 38,000 instructions
/// (`benches/callgrind.sh`, session 10).
pub struct RequestScope(Option<Recording>);

/// What a scope that may record keeps of its request.
struct Recording {
    telemetry: Arc<Telemetry>,
    direction: Direction,
    start: Instant,
    start_wall: SystemTime,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    version: Version,
    user_agent: Option<HeaderValue>,
    grpc: bool,
    request_id: HeaderValue,
    client: SocketAddr,
    peer: Option<Arc<MeshPeer>>,
    extracted: Extracted,
    /// The trace: ours when tracing, else the caller's (for the log), if any.
    trace_id: Option<TraceId>,
    /// This sidecar's span for the request, when tracing.
    span_id: Option<SpanId>,
    /// Whether the span is recorded.
    sampled: bool,
    /// Whether the access log wants this request.
    log: bool,
    /// A policy's access-log sampling (0-1), over the flag's.
    log_ratio_override: Option<f64>,
    service: Option<Arc<str>>,
    /// Set by [`RequestScope::prepare`], shared with the attempt layer.
    shared: Option<Arc<TraceShared>>,
}

impl RequestScope {
    /// Called as the request arrives: sets `x-request-id` when missing and reads the
    /// caller's trace context.
    pub fn start(telemetry: &Arc<Telemetry>, conn: &ConnInfo, req: &mut HttpRequest) -> Self {
        // Whether a line may be written: the ratio is applied at the end, since a policy
        // can raise the flag's (even from 0).
        let log = tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO);
        if !log && telemetry.tracing.is_none() {
            // Nothing records the id: set it, without the copy a record keeps.
            req.headers_mut().entry(X_REQUEST_ID).or_insert_with(super::new_request_id);
            return Self(None);
        }
        let request_id = request_id(req);
        Self(Some(Recording::start(telemetry, conn, req, request_id, log)))
    }

    /// The request's service is known: its label, and its policy's sampling.
    pub fn route(&mut self, service: &Arc<str>, policy: Option<&ballast_api::policy::Telemetry>) {
        if let Some(r) = &mut self.0 {
            r.route(service, policy);
        }
    }

    /// Called just before the request enters its stack: the attempt layer's extension,
    /// and inbound, the context the app's own spans hang under.
    pub fn prepare(&mut self, req: &mut HttpRequest) {
        if let Some(r) = &mut self.0 {
            r.prepare(req);
        }
    }

    /// Called with the response: records once its body has ended.
    pub fn finish(self, result: Result<Response<Body>, BoxError>) -> Result<Response<Body>, BoxError> {
        match self.0 {
            Some(r) => r.finish(result),
            None => result,
        }
    }

    /// Whether nothing of this request can be recorded.
    #[cfg(test)]
    fn is_quiet(&self) -> bool {
        self.0.is_none()
    }
}

/// The request's `x-request-id`, made and set when it has none.
fn request_id(req: &mut HttpRequest) -> HeaderValue {
    req.headers_mut().entry(X_REQUEST_ID).or_insert_with(super::new_request_id).clone()
}

impl Recording {
    /// Only made when a log line or a span may be written, so the caller's trace context
    /// is always read here.
    fn start(
        telemetry: &Arc<Telemetry>,
        conn: &ConnInfo,
        req: &mut HttpRequest,
        request_id: HeaderValue,
        log: bool,
    ) -> Self {
        let start = Instant::now();
        let start_wall = SystemTime::now();
        let extracted = propagation::extract(req.headers());
        let (trace_id, span_id, sampled) = match &telemetry.tracing {
            Some(t) => {
                let trace_id = extracted.parent.map(|p| p.trace_id).unwrap_or_else(super::new_trace_id);
                (
                    Some(trace_id),
                    Some(super::new_span_id()),
                    t.sampler.decide(trace_id, extracted.sampled, None),
                )
            }
            None => (extracted.parent.map(|p| p.trace_id), None, false),
        };
        Self {
            telemetry: telemetry.clone(),
            direction: conn.direction,
            start,
            start_wall,
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req.headers().get(header::HOST).cloned(),
            version: req.version(),
            user_agent: req.headers().get(header::USER_AGENT).cloned(),
            grpc: crate::rejection::is_grpc(req),
            request_id,
            client: conn.peer,
            peer: conn.mesh_peer.clone(),
            extracted,
            trace_id,
            span_id,
            sampled,
            log,
            log_ratio_override: None,
            service: None,
            shared: None,
        }
    }

    fn route(&mut self, service: &Arc<str>, policy: Option<&ballast_api::policy::Telemetry>) {
        self.service = Some(service.clone());
        let Some(p) = policy else { return };
        if let (Some(t), Some(pct), Some(trace_id)) =
            (&self.telemetry.tracing, p.tracing_sampling_percent, self.trace_id)
        {
            self.sampled = t.sampler.decide(trace_id, self.extracted.sampled, Some(pct / 100.0));
        }
        if let Some(pct) = p.access_log_sampling_percent {
            self.log_ratio_override = Some(pct / 100.0);
        }
    }

    fn prepare(&mut self, req: &mut HttpRequest) {
        let spans = match (&self.telemetry.tracing, self.trace_id, self.span_id) {
            (Some(_), Some(trace_id), Some(span_id)) => match self.direction {
                Direction::Outbound => Some(AttemptParent {
                    telemetry: self.telemetry.clone(),
                    trace_id,
                    span_id,
                    sampled: self.sampled,
                    tracestate: self.extracted.tracestate.clone(),
                    formats: self.extracted.formats,
                }),
                Direction::Inbound => {
                    propagation::inject(
                        req.headers_mut(),
                        trace_id,
                        span_id,
                        self.sampled,
                        self.extracted.formats,
                        self.extracted.tracestate.as_ref(),
                    );
                    None
                }
            },
            _ => None,
        };
        let shared = Arc::new(TraceShared { attempts: AtomicU32::new(0), spans });
        let extensions = req.extensions_mut();
        extensions.insert(RequestTrace(shared.clone()));
        // The access log's `upstream` and each try's span name the endpoint.
        extensions.insert(ReportServedBy);
        self.shared = Some(shared);
    }

    /// The tries the attempt layer counted (0 when the request never reached a stack).
    fn attempts(&self) -> u32 {
        self.shared.as_ref().map_or(0, |s| s.attempts.load(Ordering::Relaxed))
    }

    fn finish(self, result: Result<Response<Body>, BoxError>) -> Result<Response<Body>, BoxError> {
        let log = self.log && self.log_sampled();
        let span = self.sampled && self.span_id.is_some();
        if !log && !span {
            return result;
        }
        match result {
            Ok(rsp) => {
                let ended = Ended {
                    status: rsp.status().as_u16(),
                    grpc_status: grpc_status(rsp.headers()),
                    rejected: rsp.extensions().get::<Rejected>().map(|r| r.0.as_str()),
                    upstream: rsp.extensions().get::<ServedBy>().map(|s| s.0),
                    bytes: 0,
                    error: None,
                };
                let record = Record { scope: self, ended, log, span };
                Ok(rsp.map(|b| body::boxed(Finishing { inner: b, record: Some(record) })))
            }
            Err(e) => {
                let ended = Ended { error: Some(ballast_api::errors::chain(e.as_ref())), ..Ended::default() };
                Record { scope: self, ended, log, span }.emit();
                Err(e)
            }
        }
    }

    fn log_sampled(&self) -> bool {
        let ratio = self.log_ratio_override.unwrap_or(self.telemetry.access_log_ratio);
        match self.trace_id {
            _ if ratio >= 1.0 => true,
            Some(id) => sampler::ratio_decides(id, ratio),
            None => rand::random::<f64>() < ratio,
        }
    }
}

/// How a request ended.
#[derive(Debug, Default)]
struct Ended {
    /// 0: no response at all (the stack failed).
    status: u16,
    grpc_status: Option<i64>,
    rejected: Option<&'static str>,
    upstream: Option<SocketAddr>,
    /// Response body bytes sent.
    bytes: u64,
    /// Why the response did not complete: the stack's error, a body error, or the
    /// client going away.
    error: Option<String>,
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i64> {
    headers.get(crate::outcome::GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

struct Record {
    scope: Recording,
    ended: Ended,
    log: bool,
    span: bool,
}

pin_project_lite::pin_project! {
    /// The response body, recording the request when it ends or is dropped.
    struct Finishing {
        #[pin]
        inner: Body,
        record: Option<Record>,
    }

    impl PinnedDrop for Finishing {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut record) = this.record.take() {
                // hyper drops a body it has read to its end without asking for more.
                if record.ended.error.is_none() && !this.inner.is_end_stream() {
                    record.ended.error = Some("the client went away before the response ended".into());
                }
                record.emit();
            }
        }
    }
}

impl http_body::Body for Finishing {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = std::task::ready!(this.inner.poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let (Some(r), Some(data)) = (this.record.as_mut(), frame.data_ref()) {
                    r.ended.bytes += data.len() as u64;
                }
                if let (Some(r), Some(trailers)) = (this.record.as_mut(), frame.trailers_ref())
                    && let Some(status) = grpc_status(trailers)
                {
                    r.ended.grpc_status = Some(status);
                }
            }
            Some(Err(e)) => {
                if let Some(mut r) = this.record.take() {
                    r.ended.error = Some(ballast_api::errors::chain(e.as_ref()));
                    r.emit();
                }
            }
            None => {
                if let Some(r) = this.record.take() {
                    r.emit();
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Record {
    fn emit(self) {
        let duration = self.scope.start.elapsed();
        if self.log {
            self.log_line(duration);
        }
        if self.span {
            self.export(duration);
        }
    }

    fn log_line(&self, duration: Duration) {
        use super::access_log::{self, Value};
        let s = &self.scope;
        let e = &self.ended;
        let authority =
            s.uri.authority().map(|a| a.as_str()).or_else(|| s.host.as_ref().and_then(|h| h.to_str().ok()));
        let trace_id = s.trace_id.map(|t| t.to_string());
        let span_id = s.span_id.filter(|_| s.sampled).map(|t| t.to_string());
        let peer = s.peer.as_ref().map(|p| p.identity.to_string());
        let protocol = match s.version {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_11 => "HTTP/1.1",
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_3 => "HTTP/3.0",
            _ => "HTTP/?",
        };
        access_log::write(&[
            ("direction", Some(Value::Str(s.direction.as_str()))),
            ("service", Some(Value::Str(s.service.as_deref().unwrap_or("")))),
            ("method", Some(Value::Str(s.method.as_str()))),
            ("authority", Some(Value::Str(authority.unwrap_or("")))),
            ("path", Some(Value::Str(s.uri.path()))),
            ("protocol", Some(Value::Bare(protocol))),
            ("status", Some(Value::Int(i64::from(e.status)))),
            ("grpc_status", e.grpc_status.map(Value::Int)),
            ("duration_ms", Some(Value::Float(duration.as_micros() as f64 / 1000.0))),
            ("bytes", Some(Value::Int(i64::try_from(e.bytes).unwrap_or(i64::MAX)))),
            ("upstream", e.upstream.map(Value::QuotedAddr)),
            ("attempts", Some(Value::Int(i64::from(s.attempts())))),
            ("rejected", e.rejected.map(Value::Str)),
            ("error", e.error.as_deref().map(Value::Str)),
            ("trace_id", trace_id.as_deref().map(Value::Str)),
            ("span_id", span_id.as_deref().map(Value::Str)),
            ("request_id", Some(Value::Str(s.request_id.to_str().unwrap_or("")))),
            ("client", Some(Value::Addr(s.client))),
            ("peer_identity", peer.as_deref().map(Value::Str)),
        ]);
    }

    /// The request's span: server inbound, client outbound, per the HTTP semantic
    /// conventions.
    fn export(self, duration: Duration) {
        let s = self.scope;
        let e = self.ended;
        let (Some(tracing), Some(trace_id), Some(span_id)) = (&s.telemetry.tracing, s.trace_id, s.span_id)
        else {
            return;
        };
        let mut attrs = Vec::with_capacity(20);
        let server = s.direction == Direction::Inbound;
        common_attributes(&mut attrs, &s.method, &s.uri, s.host.as_ref(), s.version, server);
        if server {
            attrs.push(KeyValue::new("client.address", s.client.ip().to_string()));
            attrs.push(KeyValue::new("client.port", i64::from(s.client.port())));
            if let Some(ua) = s.user_agent.as_ref().and_then(|v| v.to_str().ok()) {
                attrs.push(KeyValue::new("user_agent.original", ua.to_owned()));
            }
            if let Some(p) = &s.peer {
                attrs.push(KeyValue::new("ballast.peer.identity", p.identity.to_string()));
            }
        }
        if let Ok(id) = s.request_id.to_str() {
            attrs.push(KeyValue::new(
                "http.request.header.x-request-id",
                Value::Array(Array::String(vec![StringValue::from(id.to_owned())])),
            ));
        }
        attrs.push(KeyValue::new("ballast.direction", s.direction.as_str()));
        if let Some(svc) = &s.service {
            attrs.push(KeyValue::new("ballast.service", svc.to_string()));
        }
        if !server {
            attrs.push(KeyValue::new("ballast.attempts", i64::from(s.attempts())));
        }
        if let Some(up) = e.upstream {
            attrs.push(KeyValue::new("ballast.upstream", up.to_string()));
        }
        let status = outcome_attributes(&mut attrs, &s.uri, s.grpc, server, &e);
        let parent = s.extracted.parent;
        tracing.send(super::Finished {
            trace_id,
            span_id,
            parent: parent.map(|p| p.span_id),
            parent_is_remote: parent.is_some(),
            kind: if server { SpanKind::Server } else { SpanKind::Client },
            name: span_name(&s.method, s.grpc.then_some(&s.uri)),
            start: s.start_wall,
            duration,
            attributes: attrs,
            status,
        });
    }
}

/// The methods of RFC 9110 and PATCH, which the HTTP conventions name; others are
/// `_OTHER` (attribute) or `HTTP` (span name), so a client cannot mint names.
fn known_method(method: &Method) -> Option<&'static str> {
    Some(match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return None,
    })
}

/// `{method}`, or for gRPC `{service}/{method}` (the RPC conventions' span name).
pub(crate) fn span_name(method: &Method, grpc: Option<&Uri>) -> super::Text {
    if let Some(uri) = grpc {
        return uri.path().trim_start_matches('/').to_owned().into();
    }
    known_method(method).unwrap_or("HTTP").into()
}

/// The request's attributes both span kinds share.
pub(crate) fn common_attributes(
    attrs: &mut Vec<KeyValue>,
    method: &Method,
    uri: &Uri,
    host: Option<&HeaderValue>,
    version: Version,
    server: bool,
) {
    match known_method(method) {
        Some(m) => attrs.push(KeyValue::new("http.request.method", m)),
        None => {
            attrs.push(KeyValue::new("http.request.method", "_OTHER"));
            attrs.push(KeyValue::new("http.request.method_original", method.as_str().to_owned()));
        }
    }
    let authority = uri.authority().map(|a| a.as_str()).or_else(|| host.and_then(|h| h.to_str().ok()));
    if let Some(a) = authority {
        let (host, port) = crate::routes::split_host_port(a);
        attrs.push(KeyValue::new("server.address", host.to_owned()));
        if let Some(p) = port {
            attrs.push(KeyValue::new("server.port", i64::from(p)));
        }
    }
    if server {
        attrs.push(KeyValue::new("url.path", uri.path().to_owned()));
        if let Some(q) = uri.query() {
            attrs.push(KeyValue::new("url.query", q.to_owned()));
        }
        attrs.push(KeyValue::new("url.scheme", "http"));
    } else {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        attrs.push(KeyValue::new("url.full", format!("http://{}{path}", authority.unwrap_or(""))));
    }
    let v = match version {
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        _ => "",
    };
    if !v.is_empty() {
        attrs.push(KeyValue::new("network.protocol.version", v));
    }
}

/// Status code, gRPC, rejection and error attributes; returns the span status: an error
/// for a client at 4xx and 5xx, for a server at 5xx (the HTTP conventions), and for gRPC
/// by its status (the RPC conventions).
fn outcome_attributes(attrs: &mut Vec<KeyValue>, uri: &Uri, grpc: bool, server: bool, e: &Ended) -> Status {
    if e.status != 0 {
        attrs.push(KeyValue::new("http.response.status_code", i64::from(e.status)));
    }
    let mut error: Option<String> = None;
    if grpc {
        attrs.push(KeyValue::new("rpc.system", "grpc"));
        let mut parts = uri.path().trim_start_matches('/').splitn(2, '/');
        if let (Some(svc), Some(m)) = (parts.next(), parts.next()) {
            attrs.push(KeyValue::new("rpc.service", svc.to_owned()));
            attrs.push(KeyValue::new("rpc.method", m.to_owned()));
        }
        if let Some(code) = e.grpc_status {
            attrs.push(KeyValue::new("rpc.grpc.status_code", code));
            // Server errors of the RPC conventions; any non-OK for a client.
            let is_error = if server { matches!(code, 2 | 4 | 12 | 13 | 14 | 15) } else { code != 0 };
            if is_error {
                error = Some(code.to_string());
            }
        }
    }
    if e.status >= 500 || (!server && e.status >= 400) {
        error = Some(e.status.to_string());
    }
    if let Some(reason) = e.rejected {
        attrs.push(KeyValue::new("ballast.rejected", reason));
    }
    if let Some(why) = &e.error {
        attrs.push(KeyValue::new("ballast.failure", why.clone()));
        error.get_or_insert_with(|| "incomplete".into());
    }
    match error {
        Some(t) => {
            let description = match (e.rejected, &e.error) {
                (Some(r), _) => format!("rejected by the mesh: {r}"),
                (None, Some(why)) => why.clone(),
                (None, None) => String::new(),
            };
            attrs.push(KeyValue::new("error.type", t));
            Status::error(description)
        }
        None => Status::Unset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ConnInfo {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("address");
        ConnInfo {
            direction: Direction::Outbound,
            peer: addr,
            local: addr,
            orig_dst: None,
            mesh_peer: None,
            peer_requests: None,
        }
    }

    /// No subscriber here, so the access-log target is off; without tracing nothing can
    /// be recorded, yet the request still gets its id and an existing one is kept.
    #[test]
    fn a_quiet_scope_still_sets_the_request_id_and_adds_nothing_else() {
        let telemetry = Arc::new(Telemetry { access_log_ratio: 1.0, tracing: None });
        let mut req = http::Request::new(body::empty());
        let mut scope = RequestScope::start(&telemetry, &conn(), &mut req);
        assert!(scope.is_quiet());
        let id = req.headers().get(X_REQUEST_ID).expect("an id is set").to_str().expect("ascii").to_owned();
        assert_eq!(id.len(), 36, "{id}");
        scope.prepare(&mut req);
        assert!(req.extensions().get::<RequestTrace>().is_none(), "the attempt layer gets nothing to record");
        let rsp = scope.finish(Ok(Response::new(body::empty()))).expect("the response passes");
        assert_eq!(rsp.status(), 200);

        let mut req = http::Request::new(body::empty());
        req.headers_mut().insert(X_REQUEST_ID, HeaderValue::from_static("given-1"));
        let scope = RequestScope::start(&telemetry, &conn(), &mut req);
        assert!(scope.is_quiet());
        assert_eq!(req.headers()[X_REQUEST_ID], "given-1");
    }
}
