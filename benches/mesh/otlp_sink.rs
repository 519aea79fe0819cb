//! The OTLP collector of the tracing set-ups, in the harness process: an HTTP/1.1 server
//! (hyper, one thread, like the upstream) that takes `POST /v1/traces` (OTLP
//! HTTP/protobuf), reads each body to its end and answers 200 with an empty
//! `application/x-protobuf` body (an empty `ExportTraceServiceResponse`: all accepted).
//! It counts requests, body bytes and the spans in them, so the sidecars' own count of
//! exported spans can be checked against what arrived.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    spans: AtomicU64,
    /// Bodies that were not a readable `ExportTraceServiceRequest`, and requests to
    /// anything but `POST /v1/traces` (answered 404).
    bad: AtomicU64,
}

/// What the sink has received so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Received {
    pub requests: u64,
    pub bytes: u64,
    pub spans: u64,
    pub bad: u64,
}

impl std::ops::Sub for Received {
    type Output = Received;
    fn sub(self, b: Received) -> Received {
        Received {
            requests: self.requests - b.requests,
            bytes: self.bytes - b.bytes,
            spans: self.spans - b.spans,
            bad: self.bad - b.bad,
        }
    }
}

pub struct OtlpSink {
    pub addr: SocketAddr,
    counters: Arc<Counters>,
}

impl OtlpSink {
    /// Starts the server on its own thread; it lives as long as the process.
    pub fn start() -> std::io::Result<Self> {
        let listener = StdListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new().name("otlp-sink".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("OTLP sink runtime");
            rt.block_on(serve(listener, c));
        })?;
        Ok(Self { addr, counters })
    }

    /// The value of `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter appends `/v1/traces`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Received {
        let c = &self.counters;
        Received {
            requests: c.requests.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            spans: c.spans.load(Ordering::Relaxed),
            bad: c.bad.load(Ordering::Relaxed),
        }
    }
}

async fn serve(listener: StdListener, counters: Arc<Counters>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("OTLP sink listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let counters = counters.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| receive(req, counters.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn receive(req: Request<Incoming>, c: Arc<Counters>) -> Result<Response<Empty<Bytes>>, Infallible> {
    let traces = req.method() == Method::POST && req.uri().path() == "/v1/traces";
    // Read the body to its end whatever it is, as a collector does.
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let mut resp = Response::new(Empty::new());
    if !traces {
        c.bad.fetch_add(1, Ordering::Relaxed);
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return Ok(resp);
    }
    c.requests.fetch_add(1, Ordering::Relaxed);
    c.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    match count_spans(&body) {
        Some(n) => c.spans.fetch_add(n, Ordering::Relaxed),
        None => c.bad.fetch_add(1, Ordering::Relaxed),
    };
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
    Ok(resp)
}

/// The spans in an OTLP `ExportTraceServiceRequest`; `None` when the body is not one.
fn count_spans(body: &[u8]) -> Option<u64> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    let req = <ExportTraceServiceRequest as prost::Message>::decode(body).ok()?;
    let spans = req.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len() as u64);
    Some(spans.sum())
}
