//! Criterion micro-benchmarks of the sidecar's data-path hot spots.
//!
//! Each group is something the sidecar does for every connection or every request, so a
//! regression in any of them is paid on all traffic through the mesh:
//!
//! * `detect`: [`detect::classify`] on the first bytes of a connection (an HTTP/1.1
//!   request head, the HTTP/2 preface, a TLS ClientHello, opaque bytes). It runs once per
//!   accepted connection, on every read until it decides, before any byte is forwarded.
//! * `routing`: [`Snapshot::by_authority`], the lookup of the service a request's
//!   `Host`/`:authority` names, in a snapshot of 100 services: by short name, by fully
//!   qualified name with a port, and a miss (passthrough). It runs once per HTTP request.
//! * `stack`: one GET through a service's tower stack to an in-process hyper upstream on
//!   127.0.0.1 (1 KiB response body, read to the end), with no policy (`bare`) and with a
//!   policy that turns every resilience layer on (`full_policy`: rate limit, bulkhead,
//!   request and per-try timeouts, retries with a budget, circuit breaker, outlier
//!   detection). The difference is what the policy layers cost next to a real loopback
//!   round trip. Both stacks share one pooled keep-alive connection's worth of client.
//! * `stack_in_memory`: the same two configurations with the balancer and the network
//!   replaced by an in-memory service answering 200 at once, so only the layers are
//!   timed, through the sidecar's own assembly (`stack::policy_layers`). Outlier
//!   detection and the per-try deadline are enforced in the balancer, which is not in
//!   this stack.
//!
//! * `mesh_tls`: one mutual TLS handshake between two sidecars, in memory (no sockets),
//!   with the sidecar's own rustls configurations (`identity::tls::Configs`: TLS 1.3,
//!   ECDSA P-256 certificates from the control plane's CA, client certificate verified
//!   by the server, server verified for its identity's name by the client). `full`: the
//!   client configuration with resumption off, so every handshake exchanges and verifies
//!   both certificates; `resumed`: the sidecar's configuration as it is, whose session
//!   cache holds the server's TLS 1.3 tickets, so a reconnect to the same peer resumes
//!   (PSK with a fresh ECDHE, no certificates). Both include what the server sends after
//!   the handshake (its tickets) and the client reading it. Which kind each handshake
//!   really was is counted (`handshake_kind`) and printed; the certificates come from an
//!   in-process control plane (`mesh/identity.rs`), once, outside the timing.
//!
//! * `trace_context`: reading a request's trace context and writing the next hop's
//!   (`telemetry::propagation`): W3C `traceparent` + `tracestate`, B3 multi-header, and a
//!   request with none. It runs on every request once an OTLP endpoint is set.
//!
//! Everything async runs on a current-thread tokio runtime, server included, so the
//! numbers are CPU cost on one core rather than cross-thread wake-up latency.
//!
//! Run: `cargo bench --bench hot_paths` (or `-- stack` for one group). Under
//! `cargo test --bench hot_paths` each benchmark runs once, as a smoke test.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::header::HOST;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tower::ServiceExt;

use ballast_api::Config;
use ballast_api::policy::PolicySpec;
use ballast_sidecar::body::{self, BoxError};
use ballast_sidecar::client::Clients;
use ballast_sidecar::detect::{self, Protocol};
use ballast_sidecar::metrics::Metrics;
use ballast_sidecar::routes::Snapshot;
use ballast_sidecar::stack::{self, Direction, HttpRequest, HttpService, RecordMetrics, StackContext};

/// The upstream's (and the in-memory service's) response body.
static PAYLOAD: [u8; 1024] = [b'x'; 1024];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("build a tokio runtime")
}

fn context() -> Arc<StackContext> {
    StackContext::new(Clients::new(Duration::from_secs(1)), Metrics::new())
}

// ---------------------------------------------------------------------------------------
// detect

/// A typical first read of an HTTP/1.1 connection: a whole GET request head, 120 bytes.
const HTTP1_GET: &[u8] = b"GET /api/v1/orders?limit=20 HTTP/1.1\r\n\
Host: orders.shop.svc.cluster.local:8080\r\n\
User-Agent: curl/8.5.0\r\n\
Accept: */*\r\n\r\n";

/// The HTTP/2 connection preface followed by an empty SETTINGS frame, as a client sends it.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// The start of a TLS 1.2/1.3 ClientHello: record header, handshake header, version, random.
const TLS_CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\
\x5c\x2a\x91\x0e\x7d\x33\xa4\x18\x6f\x02\xb9\xe1\x44\x90\xc7\x21\
\x0d\x58\x6e\xa3\x1b\x77\xf4\x2c\x99\x05\xd2\x6b\x30\xee\x81\x4f";

/// Opaque TCP: a Redis RESP `SET key value`.
const OPAQUE_REDIS: &[u8] = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";

fn bench_detect(c: &mut Criterion) {
    let cases: [(&str, &[u8], Protocol); 4] = [
        ("http1_get", HTTP1_GET, Protocol::Http1),
        ("http2_preface", HTTP2_PREFACE, Protocol::Http2),
        ("tls_client_hello", TLS_CLIENT_HELLO, Protocol::Tls),
        ("opaque_redis", OPAQUE_REDIS, Protocol::Opaque),
    ];
    let mut group = c.benchmark_group("detect");
    for (name, bytes, expected) in cases {
        assert_eq!(detect::classify(bytes), Some(expected), "{name} is classified as expected");
        group.bench_function(name, |b| b.iter(|| detect::classify(black_box(bytes))));
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------
// routing

const SERVICES: usize = 100;

/// `SERVICES` services `svc-000`..`svc-099` in namespace `default`, each on port 8080
/// with its own virtual IP and one endpoint.
fn hundred_services_yaml() -> String {
    (0..SERVICES)
        .map(|i| {
            format!(
                "apiVersion: ballast.io/v1alpha1\n\
                 kind: Service\n\
                 metadata: {{name: svc-{i:03}, namespace: default}}\n\
                 spec:\n  \
                   ports: [{{port: 8080, protocol: http}}]\n  \
                   addresses: [10.96.{}.{}]\n  \
                   endpoints: [{{address: \"10.0.{}.{}:8080\"}}]\n",
                i / 250,
                i % 250 + 1,
                i / 250,
                i % 250 + 1,
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn bench_routing(c: &mut Criterion) {
    let rt = runtime();
    let _enter = rt.enter();
    let config = Config::from_yaml(&hundred_services_yaml(), "bench-services.yaml")
        .expect("the generated services parse");
    assert_eq!(config.services.len(), SERVICES);
    let snapshot = Snapshot::build(config, &context(), "default", None, None);

    let cases = [
        ("short_name", "svc-042", true),
        ("fqdn_with_port", "svc-042.default.svc.cluster.local:8080", true),
        ("miss", "api.example.com:443", false),
    ];
    let mut group = c.benchmark_group("routing");
    for (name, authority, found) in cases {
        assert_eq!(snapshot.by_authority(authority).is_some(), found, "lookup of {authority}");
        group.bench_function(name, |b| b.iter(|| snapshot.by_authority(black_box(authority)).is_some()));
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------
// stack

/// A policy that turns every layer on, none of which ever trips on a healthy upstream;
/// the harness's `ballast x1 +policy` uses the same file.
const FULL_POLICY: &str = include_str!("full-policy.yaml");

fn full_policy() -> PolicySpec {
    let config =
        Config::from_yaml(FULL_POLICY, "benches/full-policy.yaml").expect("the benchmark policy parses");
    config.policy_for("default", "bench-policy").expect("the policy targets bench-policy").spec.clone()
}

/// A GET as the proxy hands it to a stack: absolute-form URI, `Host` set, empty body.
#[derive(Clone)]
struct Target {
    uri: Uri,
    host: HeaderValue,
}

impl Target {
    fn new(authority: &str) -> Self {
        Self {
            uri: format!("http://{authority}/").parse().expect("a valid URI"),
            host: HeaderValue::from_str(authority).expect("a valid Host"),
        }
    }

    fn request(&self) -> HttpRequest {
        let mut req = Request::new(body::empty());
        *req.uri_mut() = self.uri.clone();
        req.headers_mut().insert(HOST, self.host.clone());
        req
    }
}

/// One request through `stack`, the response body read to the end.
async fn round_trip(stack: &HttpService, target: &Target) -> Bytes {
    let rsp = stack.clone().oneshot(target.request()).await.expect("the stack answers");
    assert_eq!(rsp.status(), StatusCode::OK, "the stack answers 200");
    rsp.into_body().collect().await.expect("the response body is read").to_bytes()
}

/// An HTTP/1.1 server on 127.0.0.1 answering every request with 200 and [`PAYLOAD`].
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream");
    let addr = listener.local_addr().expect("the upstream's address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(&PAYLOAD))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn bench_stack(c: &mut Criterion) {
    let rt = runtime();
    let addr = rt.block_on(upstream());
    let ctx = context();
    let policy = full_policy();
    let (bare, full, _balancers) = {
        let _enter = rt.enter();
        let (bare, b1) = ctx.service_stack(
            "bench-bare.default".into(),
            &[ballast_sidecar::balance::Target::plain(addr, 1)],
            "no endpoints",
            None,
        );
        let (full, b2) = ctx.service_stack(
            "bench-policy.default".into(),
            &[ballast_sidecar::balance::Target::plain(addr, 1)],
            "no endpoints",
            Some(&policy),
        );
        (bare, full, (b1, b2))
    };
    let target = Target::new("bench.default.svc.cluster.local");
    for (name, stack) in [("bare", &bare), ("full_policy", &full)] {
        let body = rt.block_on(round_trip(stack, &target));
        assert_eq!(body.len(), PAYLOAD.len(), "{name}: the whole body comes back");
    }

    let mut group = c.benchmark_group("stack");
    for (name, stack) in [("bare", &bare), ("full_policy", &full)] {
        group.bench_function(name, |b| b.to_async(&rt).iter(|| round_trip(stack, &target)));
    }
    group.finish();
}

/// A service answering 200 with [`PAYLOAD`] at once, standing in for balancer and network.
fn in_memory() -> HttpService {
    HttpService::from_fn(|_req: HttpRequest| {
        Box::pin(std::future::ready(Ok::<_, BoxError>(Response::new(body::full(Bytes::from_static(
            &PAYLOAD,
        ))))))
    })
}

/// What `StackContext::service_stack` builds without a policy, over `inner`.
fn bare_in_memory(metrics: &Metrics, inner: HttpService) -> HttpService {
    RecordMetrics::new(metrics, Direction::Outbound, "mem-bare.default".into(), inner).into_service()
}

/// What `StackContext::service_stack` builds with `policy`, over `inner`.
fn full_policy_in_memory(metrics: &Metrics, inner: HttpService, policy: &PolicySpec) -> HttpService {
    let label: Arc<str> = "mem-full.default".into();
    let layers = stack::policy_layers(inner, policy, &label, metrics);
    RecordMetrics::new(metrics, Direction::Outbound, label, layers).into_service()
}

fn bench_stack_in_memory(c: &mut Criterion) {
    let rt = runtime();
    let metrics = Metrics::new();
    let policy = full_policy();
    let bare = bare_in_memory(&metrics, in_memory());
    let full = full_policy_in_memory(&metrics, in_memory(), &policy);
    let target = Target::new("bench.default.svc.cluster.local");
    for (name, stack) in [("bare", &bare), ("full_policy", &full)] {
        let body = rt.block_on(round_trip(stack, &target));
        assert_eq!(body.len(), PAYLOAD.len(), "{name}: the whole body comes back");
    }

    let mut group = c.benchmark_group("stack_in_memory");
    for (name, stack) in [("bare", &bare), ("full_policy", &full)] {
        group.bench_function(name, |b| b.to_async(&rt).iter(|| round_trip(stack, &target)));
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------
// mesh_tls

#[path = "mesh/identity.rs"]
#[allow(dead_code)] // shared with the harness and tests/mtls.rs, which use more of it
mod identity;

/// Bytes queued by `from` handed to `to`, which processes them.
fn transfer<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
    buf: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).expect("write to a Vec");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read from a slice");
        to.process_new_packets()?;
    }
    Ok(())
}

/// One handshake in memory, until neither side has anything left to send (the server's
/// tickets included); the client's view of its kind, and the server's connection.
fn mesh_handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    name: &rustls::pki_types::ServerName<'static>,
    buf: &mut Vec<u8>,
) -> (rustls::HandshakeKind, rustls::ServerConnection) {
    let mut c = rustls::ClientConnection::new(client.clone(), name.clone()).expect("client connection");
    let mut s = rustls::ServerConnection::new(server.clone()).expect("server connection");
    for _ in 0..8 {
        transfer(&mut *c, &mut *s, buf).expect("the server accepts the client");
        transfer(&mut *s, &mut *c, buf).expect("the client accepts the server");
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            return (c.handshake_kind().expect("a finished handshake has a kind"), s);
        }
    }
    panic!("the mesh TLS handshake did not finish in 8 round trips");
}

fn bench_mesh_tls(c: &mut Criterion) {
    let ca = identity::MeshCa::start().expect("an in-process control plane with identity");
    let web = ca.workload("bench", "web").expect("the client's certificate");
    let payments = ca.workload("bench", "payments").expect("the server's certificate");
    let name: rustls::pki_types::ServerName<'static> =
        payments.current().expect("certified").dns_name.clone().try_into().expect("a DNS name");
    let server = payments.tls.server.clone();
    let resuming = web.tls.client_h2.clone();
    let mut full = (*resuming).clone();
    full.resumption = rustls::client::Resumption::disabled();
    let full = Arc::new(full);
    let mut buf = Vec::with_capacity(16 * 1024);

    // The server authenticated the client as the sidecar it is, and the first handshake
    // of the resuming configuration is full, the next resumed.
    let (kind, s) = mesh_handshake(&full, &server, &name, &mut buf);
    assert_eq!(kind, rustls::HandshakeKind::Full);
    let seen =
        s.peer_certificates().and_then(|c| c.first()).and_then(ballast_sidecar::identity::peer_identity);
    assert_eq!(seen.map(|i| i.to_string()).as_deref(), Some("spiffe://cluster.local/ns/bench/sa/web"));
    assert_eq!(mesh_handshake(&resuming, &server, &name, &mut buf).0, rustls::HandshakeKind::Full);
    assert_eq!(mesh_handshake(&resuming, &server, &name, &mut buf).0, rustls::HandshakeKind::Resumed);

    let mut group = c.benchmark_group("mesh_tls");
    for (case, config) in [("full", &full), ("resumed", &resuming)] {
        let (mut kinds_full, mut kinds_resumed) = (0u64, 0u64);
        group.bench_function(case, |b| {
            b.iter(|| match mesh_handshake(config, &server, &name, &mut buf).0 {
                rustls::HandshakeKind::Resumed => kinds_resumed += 1,
                _ => kinds_full += 1,
            })
        });
        println!("mesh_tls/{case}: {kinds_full} full and {kinds_resumed} resumed handshakes");
        if kinds_full + kinds_resumed == 0 {
            // Filtered out (`cargo bench -- detect`, `--list`): nothing ran to check.
            continue;
        }
        if case == "resumed" {
            assert!(kinds_resumed > 0 && kinds_full * 100 <= kinds_resumed, "resumption mostly fails");
        } else {
            assert_eq!(kinds_resumed, 0, "resumption is off");
        }
    }
    group.finish();
}

fn bench_trace_context(c: &mut Criterion) {
    use ballast_sidecar::telemetry::propagation;
    use http::{HeaderMap, HeaderName, HeaderValue};
    let headers = |pairs: &[(&'static str, &'static str)]| -> HeaderMap {
        let mut h: HeaderMap =
            pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect();
        // A request's usual company: the lookups walk past these.
        for (k, v) in [("host", "payments"), ("user-agent", "curl/8.5"), ("accept", "*/*")] {
            h.insert(k, HeaderValue::from_static(v));
        }
        h
    };
    let cases = [
        (
            "w3c",
            headers(&[
                ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                ("tracestate", "congo=t61rcWkgMzE"),
            ]),
        ),
        (
            "b3_multi",
            headers(&[
                ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
                ("x-b3-sampled", "1"),
            ]),
        ),
        ("none", headers(&[])),
    ];
    let span = opentelemetry::trace::SpanId::from(0x53995c3f42cd8ad8u64);
    let mut group = c.benchmark_group("trace_context");
    for (name, h) in &cases {
        group.bench_function(*name, |b| {
            b.iter_batched_ref(
                || h.clone(),
                |h| {
                    let e = propagation::extract(black_box(h));
                    let trace =
                        e.parent.map(|p| p.trace_id).unwrap_or(opentelemetry::trace::TraceId::from(7u128));
                    propagation::inject(h, trace, span, true, e.formats, e.tracestate.as_ref());
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(50);
    targets = bench_detect, bench_routing, bench_stack, bench_stack_in_memory, bench_mesh_tls, bench_trace_context
}
criterion_main!(hot_paths);
