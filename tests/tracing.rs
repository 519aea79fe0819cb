//! Tracing and access logs end to end (issue 8): real sidecar processes, a real upstream,
//! curl and Python gRPC clients, and a real OTLP receiver built from the published
//! OpenTelemetry protobuf definitions (tests/python/otlp_receiver.py: Python
//! `opentelemetry-proto` over grpcio and http.server).
//!
//! The mesh under test: curl → client sidecar (outbound, service `api` with retries) →
//! server sidecar (inbound, `--service api`) → the app. The client sidecar exports over
//! OTLP/gRPC, the server sidecar over OTLP/HTTP protobuf, so both transports are used.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::otlp::{OtlpReceiver, Span};
use support::{Fault, Sidecar, Upstream, curl, stdout};

const SPANS_WAIT: Duration = Duration::from_secs(20);

fn service(name: &str, endpoint: &str, spec: &str) -> String {
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{{address: \"{endpoint}\"}}]\n---\napiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {name}-policy}}\nspec:\n  targetRef: {{service: {name}}}\n{spec}"
    )
}

/// OTLP settings for a sidecar: every new trace sampled, batches sent within 100 ms.
fn otel(endpoint: &str, protocol: &'static str, service_name: Option<&'static str>) -> Vec<(String, String)> {
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(), protocol.to_owned()),
        ("OTEL_TRACES_SAMPLER".to_owned(), "parentbased_traceidratio".to_owned()),
        ("OTEL_TRACES_SAMPLER_ARG".to_owned(), "1".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    if let Some(n) = service_name {
        env.push(("OTEL_SERVICE_NAME".to_owned(), n.to_owned()));
    }
    env
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// curl through `sidecar` as an HTTP proxy: (status, body).
fn get(sidecar: &Sidecar, url: &str, headers: &[&str]) -> (u16, String) {
    let mut c = curl();
    c.args(["-x", &sidecar.proxy_url(), "-w", "\n%{http_code}"]);
    for h in headers {
        c.args(["-H", h]);
    }
    let out = support::run(c.arg(url));
    let text = stdout(&out);
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (status.trim().parse().expect("status"), body.to_owned())
}

/// The access-log lines of a sidecar's log.
fn access_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("ballast_sidecar::access")).collect()
}

fn by_kind<'a>(spans: &'a [Span], kind: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.kind == kind).collect()
}

/// Three sidecar hops' worth of parts for one test.
struct Mesh {
    app: Upstream,
    server: Sidecar,
    client: Sidecar,
    client_rx: OtlpReceiver,
    server_rx: OtlpReceiver,
}

fn mesh(client_policy: &str) -> Mesh {
    let app = Upstream::start("app");
    let client_rx = OtlpReceiver::start();
    let server_rx = OtlpReceiver::start();
    let app_addr = app.addr.to_string();
    let server_env = otel(&server_rx.http_endpoint(), "http/protobuf", None);
    let server = Sidecar::start_with_env(
        "",
        &["--service", "api", "--app-addr", &app_addr, "--pod", "api-0"],
        &env_refs(&server_env),
    );
    let client_env = otel(&client_rx.grpc_endpoint(), "grpc", Some("storefront"));
    let client = Sidecar::start_with_env(
        &service("api", &server.inbound.to_string(), client_policy),
        &["--pod", "storefront-0"],
        &env_refs(&client_env),
    );
    Mesh { app, server, client, client_rx, server_rx }
}

/// A request through two sidecars that is retried twice makes one trace: the client
/// sidecar's client span, one attempt span under it per try, and under each attempt the
/// server sidecar's server span; the app sees the server span as its parent.
#[test]
fn one_trace_through_two_sidecars_with_a_span_per_attempt() {
    let m = mesh("  retries: {attempts: 2, on: [\"5xx\"], backoff: {base: 5ms, max: 10ms}}\n");
    m.app.set_fault(Fault::Always(503));
    let (status, _) = get(&m.client, "http://api/status/200", &[]);
    assert_eq!(status, 503, "the app fails every try");
    assert_eq!(m.app.requests(), 3, "first try and two retries");

    let client_spans = m.client_rx.wait_for_spans("client span and 3 attempts", SPANS_WAIT, |s| s.len() >= 4);
    let server_spans = m.server_rx.wait_for_spans("3 server spans", SPANS_WAIT, |s| s.len() >= 3);
    assert_eq!(client_spans.len(), 4, "{client_spans:#?}");
    assert_eq!(server_spans.len(), 3, "{server_spans:#?}");
    assert!(client_spans.iter().all(|s| s.transport == "grpc"));
    assert!(server_spans.iter().all(|s| s.transport == "http"));

    let traces: HashSet<&str> =
        client_spans.iter().chain(&server_spans).map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 1, "one trace: {traces:?}");

    // The request's client span: a root (the app sent no context), the retries counted.
    let roots: Vec<&Span> = client_spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{client_spans:#?}");
    let request = roots[0];
    assert_eq!((request.kind.as_str(), request.name.as_str()), ("CLIENT", "GET"));
    assert_eq!(request.attr_str("http.request.method"), Some("GET"));
    assert_eq!(request.attr_i64("http.response.status_code"), Some(503));
    assert_eq!(request.attr_str("url.full"), Some("http://api/status/200"));
    assert_eq!(request.attr_str("server.address"), Some("api"));
    assert_eq!(request.attr_str("error.type"), Some("503"));
    assert_eq!(request.attr_i64("ballast.attempts"), Some(3));
    assert_eq!(request.attr_str("ballast.service"), Some("api.default"));
    assert_eq!(request.attr_str("ballast.upstream"), Some(m.server.inbound.to_string().as_str()));
    assert_eq!(request.status.code, "ERROR");
    assert_eq!(request.resource_str("service.name"), Some("storefront"), "OTEL_SERVICE_NAME wins");
    assert_eq!(request.resource_str("k8s.pod.name"), Some("storefront-0"));
    assert_eq!(request.scope, "ballast-sidecar");

    // One attempt per try, children of the request span, in order, each naming the
    // endpoint it reached.
    let mut attempts: Vec<&Span> =
        client_spans.iter().filter(|s| s.parent_span_id == request.span_id).collect();
    attempts.sort_by_key(|s| s.start_ns);
    assert_eq!(attempts.len(), 3, "{client_spans:#?}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a.kind, "CLIENT");
        assert_eq!(a.attr_i64("http.request.resend_count"), (i > 0).then_some(i as i64), "{a:#?}");
        assert_eq!(a.attr_i64("http.response.status_code"), Some(503));
        assert_eq!(a.attr_str("network.peer.address"), Some("127.0.0.1"));
        assert_eq!(a.attr_i64("network.peer.port"), Some(i64::from(m.server.inbound.port())));
        assert!(a.start_ns >= request.start_ns && a.end_ns <= request.end_ns, "attempt within the request");
    }

    // Each server span hangs under the attempt that reached it.
    let attempt_ids: HashSet<&str> = attempts.iter().map(|a| a.span_id.as_str()).collect();
    let parents: HashSet<&str> = server_spans.iter().map(|s| s.parent_span_id.as_str()).collect();
    assert_eq!(attempt_ids, parents, "server spans are the attempts' children");
    for s in &server_spans {
        assert_eq!((s.kind.as_str(), s.name.as_str()), ("SERVER", "GET"));
        assert_eq!(s.attr_str("url.path"), Some("/status/200"));
        assert_eq!(s.attr_str("url.scheme"), Some("http"));
        assert_eq!(s.attr_i64("http.response.status_code"), Some(503));
        assert_eq!(s.attr_str("error.type"), Some("503"), "a server span errs at 5xx");
        assert_eq!(s.attr_str("client.address"), Some("127.0.0.1"));
        assert_eq!(s.attr_str("ballast.direction"), Some("inbound"));
        assert_eq!(s.attr_str("ballast.upstream"), Some(m.app.addr.to_string().as_str()), "the app");
        assert_eq!(s.resource_str("service.name"), Some("api"), "--service names the workload");
    }
    // The x-request-id the client sidecar made travels with every try.
    let ids: Vec<String> = std::iter::once(request)
        .chain(&server_spans)
        .map(|s| {
            s.attributes.get("http.request.header.x-request-id").map(|v| v.to_string()).unwrap_or_default()
        })
        .collect();
    assert!(ids[0].len() > 36 && ids.iter().all(|i| *i == ids[0]), "{ids:?}");

    // The app's parent is the server span.
    m.app.set_fault(Fault::None);
    let (status, body) = get(&m.client, "http://api/headers", &[]);
    assert_eq!(status, 200, "{body}");
    let headers: serde_json::Value = serde_json::from_str(&body).expect("headers as JSON");
    let tp = headers["traceparent"].as_str().expect("the app gets a traceparent").to_owned();
    let server_spans = m.server_rx.wait_for_spans("the 4th server span", SPANS_WAIT, |s| s.len() >= 4);
    let last = server_spans.iter().find(|s| s.attr_str("url.path") == Some("/headers")).expect("span");
    assert_eq!(tp, format!("00-{}-{}-01", last.trace_id, last.span_id));
    assert!(headers["x-request-id"].as_str().is_some_and(|v| v.len() == 36), "{headers}");

    // Access logs on both sides, at info, with the trace id and the tries.
    let client_log = m.client.log();
    let first = access_lines(&client_log)
        .into_iter()
        .find(|l| l.contains("path=\"/status/200\""))
        .unwrap_or_else(|| panic!("no access line:\n{client_log}"));
    for field in [
        "direction=\"outbound\"",
        "service=\"api.default\"",
        "method=\"GET\"",
        "authority=\"api\"",
        "status=503",
        "attempts=3",
        &format!("trace_id=\"{}\"", request.trace_id),
        &format!("span_id=\"{}\"", request.span_id),
        &format!("upstream=\"{}\"", m.server.inbound),
        "duration_ms=",
        "request_id=\"",
    ] {
        assert!(first.contains(field), "{field} missing in {first}");
    }
    assert!(first.contains(" INFO "), "the access log is at info: {first}");
    let server_log = m.server.log();
    let server_lines = access_lines(&server_log);
    assert_eq!(server_lines.iter().filter(|l| l.contains("path=\"/status/200\"")).count(), 3, "{server_log}");
}

/// gRPC calls get the RPC conventions' name and their status from the trailers.
#[test]
fn grpc_status_is_recorded() {
    let port = support::free_port();
    let _server = support::spawn_python_server("grpc_server.py", port);
    let rx = OtlpReceiver::start();
    let env = otel(&rx.http_endpoint(), "http/protobuf", None);
    let cfg = format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: echo}}\nspec:\n  ports: [{{port: 80, protocol: grpc}}]\n  endpoints: [{{address: \"127.0.0.1:{port}\"}}]\n"
    );
    let sidecar = Sidecar::start_with_env(&cfg, &[], &env_refs(&env));
    let ok = support::grpc_case(&sidecar.outbound, "echo", "unary");
    assert_eq!(ok["code"], "OK", "{ok}");
    let failed = support::grpc_case(&sidecar.outbound, "echo", "fail");
    assert_eq!(failed["code"], "PERMISSION_DENIED", "{failed}");
    let spans = rx.wait_for_spans("two calls' spans", SPANS_WAIT, |s| by_kind(s, "CLIENT").len() >= 4);
    let requests: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    let unary = requests.iter().find(|s| s.name == "ballast.test.Echo/Unary").expect("unary span");
    assert_eq!(unary.attr_str("rpc.system"), Some("grpc"));
    assert_eq!(unary.attr_str("rpc.service"), Some("ballast.test.Echo"));
    assert_eq!(unary.attr_str("rpc.method"), Some("Unary"));
    assert_eq!(unary.attr_i64("rpc.grpc.status_code"), Some(0), "read from the trailers");
    assert_eq!(unary.status.code, "UNSET");
    let fail = requests.iter().find(|s| s.name == "ballast.test.Echo/Fail").expect("fail span");
    assert_eq!(fail.attr_i64("rpc.grpc.status_code"), Some(7));
    assert_eq!(fail.attr_i64("http.response.status_code"), Some(200));
    assert_eq!(fail.status.code, "ERROR");
}

/// The mesh's own rejections and per-try timeouts are visible in the spans.
#[test]
fn rejections_and_per_try_timeouts_are_recorded() {
    let m = mesh(
        "  rateLimit: {requestsPerSecond: 1, burst: 1}\n  timeouts: {perTry: 100ms}\n  retries: {attempts: 1, on: [\"gateway-error\"], backoff: {base: 5ms, max: 10ms}}\n",
    );
    // A slow app: both tries time out (504 per-try timeout), then the rate limit rejects.
    m.app.set_fault(Fault::Delay(Duration::from_millis(400)));
    let (status, _) = get(&m.client, "http://api/status/200", &[]);
    assert_eq!(status, 504);
    let (status, _) = get(&m.client, "http://api/status/200", &[]);
    assert_eq!(status, 429, "the bucket of one is spent");
    let spans = m.client_rx.wait_for_spans("two requests, two attempts", SPANS_WAIT, |s| s.len() >= 4);
    let requests: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(requests.len(), 2, "{spans:#?}");
    let limited =
        requests.iter().find(|s| s.attr_i64("http.response.status_code") == Some(429)).expect("429");
    assert_eq!(limited.attr_str("ballast.rejected"), Some("rate-limited"));
    assert_eq!(limited.attr_i64("ballast.attempts"), Some(0), "rejected before any try");
    assert!(limited.status.message.contains("rate-limited"), "{limited:#?}");
    assert!(!spans.iter().any(|s| s.parent_span_id == limited.span_id), "no attempt spans");
    let timed_out =
        requests.iter().find(|s| s.attr_i64("http.response.status_code") == Some(504)).expect("504");
    let tries: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id == timed_out.span_id).collect();
    assert_eq!(tries.len(), 2, "{spans:#?}");
    for t in tries {
        assert_eq!(t.attr_str("ballast.failure"), Some("per-try-timeout"), "{t:#?}");
        assert_eq!(t.attr_i64("http.response.status_code"), Some(504));
        let ms = (t.end_ns - t.start_ns) / 1_000_000;
        assert!((90..400).contains(&ms), "a try lasts about the per-try timeout: {ms} ms");
    }
    let log = m.client.log();
    assert!(
        access_lines(&log)
            .iter()
            .any(|l| l.contains("rejected=\"rate-limited\"") && l.contains("attempts=0")),
        "{log}"
    );
}

/// B3 callers are answered in B3 (and W3C), their trace id kept; `tracestate` travels.
#[test]
fn b3_and_tracestate_propagate() {
    let m = mesh("");
    let (status, body) = get(
        &m.client,
        "http://api/headers",
        &[
            "x-b3-traceid: 463ac35c9f6413ad48485a3953bb6124",
            "x-b3-spanid: a2fb4a1d1a96d312",
            "x-b3-sampled: 1",
            "b3: 463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1",
        ],
    );
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).expect("headers");
    assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
    assert_eq!(h["x-b3-sampled"], "1");
    let spans = m.server_rx.wait_for_spans("the server span", SPANS_WAIT, |s| !s.is_empty());
    assert_eq!(h["x-b3-spanid"].as_str(), Some(spans[0].span_id.as_str()), "B3 names the server span");
    assert!(h["b3"].as_str().is_some_and(|v| v.starts_with("463ac35c9f6413ad48485a3953bb6124-")), "{h}");
    assert!(h["traceparent"].as_str().is_some_and(|v| v.contains("463ac35c9f6413ad48485a3953bb6124")), "{h}");
    let client = m.client_rx.wait_for_spans("the client spans", SPANS_WAIT, |s| s.len() >= 2);
    let root = client.iter().find(|s| s.attr_i64("ballast.attempts").is_some()).expect("request span");
    assert_eq!(root.parent_span_id, "a2fb4a1d1a96d312", "the caller's B3 span is the parent");

    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, body) = get(
        &m.client,
        "http://api/headers",
        &[&format!("traceparent: {tp}"), "tracestate: congo=t61rcWkgMzE"],
    );
    assert_eq!(status, 200);
    let h: serde_json::Value = serde_json::from_str(&body).expect("headers");
    assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
    assert!(h["traceparent"].as_str().is_some_and(|v| v.starts_with("00-0af7651916cd43dd8448eb211c80319c-")));
    assert_ne!(h["traceparent"], tp, "the parent is rewritten to the server span");
    assert!(h.get("b3").is_none(), "no B3 for a W3C caller: {h}");
}

/// Without an OTLP endpoint the context passes through untouched and nothing is made up,
/// so an app's own tracing is not disturbed; the request id is still set.
#[test]
fn without_an_exporter_trace_headers_pass_untouched() {
    let app = Upstream::start("app");
    let sidecar = Sidecar::start(&service("api", &app.addr.to_string(), ""), &[]);
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let (status, body) =
        get(&sidecar, "http://api/headers", &[&format!("traceparent: {tp}"), "x-request-id: given-1"]);
    assert_eq!(status, 200);
    let h: serde_json::Value = serde_json::from_str(&body).expect("headers");
    assert_eq!(h["traceparent"], tp);
    assert_eq!(h["x-request-id"], "given-1", "an existing id is kept");
    let (_, body) = get(&sidecar, "http://api/headers", &[]);
    let h: serde_json::Value = serde_json::from_str(&body).expect("headers");
    assert!(h.get("traceparent").is_none(), "no context made up: {h}");
    assert!(h["x-request-id"].as_str().is_some_and(|v| v.len() == 36), "{h}");
    let log = sidecar.log();
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 2, "{log}");
    assert!(lines[0].contains("trace_id=\"0af7651916cd43dd8448eb211c80319c\""), "{}", lines[0]);
    assert!(lines[0].contains("request_id=\"given-1\""), "{}", lines[0]);
}

/// A collector that is down or failing costs no request: spans are dropped and counted.
#[test]
fn a_receiver_that_is_down_costs_no_requests() {
    let app = Upstream::start("app");
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let mut env = otel(&dead, "grpc", None);
    env.push(("OTEL_BSP_MAX_QUEUE_SIZE".into(), "16".into()));
    env.push(("OTEL_EXPORTER_OTLP_TIMEOUT".into(), "500".into()));
    let sidecar = Sidecar::start_with_env(&service("api", &app.addr.to_string(), ""), &[], &env_refs(&env));
    for i in 0..200 {
        let (status, _) = get(&sidecar, "http://api/status/200", &[]);
        assert_eq!(status, 200, "request {i}");
    }
    // 400 spans (a request span and an attempt span each), a queue of 16, nowhere to
    // send them: every one is dropped, and counted as such.
    let dropped = || {
        let m = sidecar.metrics();
        support::metric_value(&m, "ballast_trace_spans_dropped_total{reason=\"queue_full\"}")
            + support::metric_value(&m, "ballast_trace_spans_dropped_total{reason=\"export_failed\"}")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dropped() < 400.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = sidecar.metrics();
    assert_eq!(dropped(), 400.0, "{m}");
    assert_eq!(support::metric_value(&m, "ballast_trace_spans_exported_total"), 0.0);
    assert!(
        support::metric_value(&m, "ballast_trace_export_requests_total{result=\"failure\"}") >= 1.0,
        "{m}"
    );
    support::promtool_check(&m);

    // A collector that answers but refuses every export (HTTP 503): the exporter's own
    // retries (3, with backoff) run on the export thread; requests are not slowed.
    let rx = OtlpReceiver::start_failing(1_000_000);
    let env = otel(&rx.http_endpoint(), "http/protobuf", None);
    let sidecar = Sidecar::start_with_env(&service("api", &app.addr.to_string(), ""), &[], &env_refs(&env));
    for i in 0..20 {
        let started = std::time::Instant::now();
        let (status, _) = get(&sidecar, "http://api/status/200", &[]);
        assert_eq!(status, 200, "request {i}");
        assert!(started.elapsed() < Duration::from_secs(2), "request {i} took {:?}", started.elapsed());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sidecar.metric("ballast_trace_spans_dropped_total{reason=\"export_failed\"}") < 40.0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sidecar.metric("ballast_trace_spans_dropped_total{reason=\"export_failed\"}"), 40.0);
    assert_eq!(sidecar.metric("ballast_trace_spans_exported_total"), 0.0);
    assert!(rx.spans().is_empty());
}

/// Sampling: the caller's decision is followed; a policy decides for new traces of its
/// service; the access log can be sampled too.
#[test]
fn sampling_follows_the_caller_and_the_policy() {
    let m = mesh("  telemetry: {tracingSamplingPercent: 0, accessLogSamplingPercent: 0}\n");
    // New traces: the policy's 0% overrides OTEL_TRACES_SAMPLER_ARG=1.
    for _ in 0..5 {
        assert_eq!(get(&m.client, "http://api/status/200", &[]).0, 200);
    }
    // A caller that sampled: followed all the way, policy or not.
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    assert_eq!(get(&m.client, "http://api/status/204", &[&format!("traceparent: {tp}")]).0, 204);
    m.server_rx.wait_for_spans("the sampled request's server span", SPANS_WAIT, |s| !s.is_empty());
    m.client_rx.wait_for_spans("the sampled request's client spans", SPANS_WAIT, |s| s.len() >= 2);
    std::thread::sleep(Duration::from_millis(500));
    let (client, server) = (m.client_rx.spans(), m.server_rx.spans());
    assert_eq!(client.len(), 2, "only the caller-sampled request: {client:#?}");
    assert_eq!(server.len(), 1, "{server:#?}");
    assert!(client.iter().chain(&server).all(|s| s.trace_id == "0af7651916cd43dd8448eb211c80319c"));
    // The unsampled requests still carried a context (flag 00), so the server side agreed.
    let server_log = m.server.log();
    assert_eq!(access_lines(&server_log).len(), 6, "the server logs every request: {server_log}");
    assert_eq!(access_lines(&m.client.log()).len(), 0, "accessLogSamplingPercent: 0 on the client side");
}

/// `--log-format json`: each access-log line is one JSON object with the fields.
#[test]
fn access_log_in_json() {
    let app = Upstream::start("app");
    let sidecar = Sidecar::start(&service("api", &app.addr.to_string(), ""), &["--log-format", "json"]);
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    assert_eq!(get(&sidecar, "http://api/status/202", &[&format!("traceparent: {tp}")]).0, 202);
    let log = sidecar.log();
    let line = access_lines(&log).into_iter().next().unwrap_or_else(|| panic!("no access line:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "INFO");
    let f = &v["fields"];
    assert_eq!(f["status"], 202, "{v}");
    assert_eq!(f["method"], "GET");
    assert_eq!(f["path"], "/status/202");
    assert_eq!(f["service"], "api.default");
    assert_eq!(f["attempts"], 1);
    assert_eq!(f["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(f["upstream"], app.addr.to_string());
    assert!(f["duration_ms"].as_f64().is_some_and(|d| d > 0.0 && d < 5000.0), "{v}");
    assert!(f["request_id"].as_str().is_some_and(|r| r.len() == 36), "{v}");
}

/// A policy's `accessLogSamplingPercent` wins over the flag, upwards too: with
/// `--access-log-sampling 0`, only the service whose policy asks for lines gets them.
#[test]
fn a_policy_turns_the_access_log_on_over_the_flag() {
    let app = Upstream::start("app");
    let cfg = format!(
        "{}\n---\n{}",
        service("api", &app.addr.to_string(), "  telemetry: {accessLogSamplingPercent: 100}\n"),
        service("quiet", &app.addr.to_string(), "")
    );
    let sidecar = Sidecar::start(&cfg, &["--access-log-sampling", "0"]);
    assert_eq!(get(&sidecar, "http://quiet/status/200", &[]).0, 200);
    assert_eq!(get(&sidecar, "http://api/status/200", &[]).0, 200);
    let log = sidecar.log();
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("service=\"api.default\""), "{}", lines[0]);
}

/// With the access log filtered out and no exporter the sidecar records nothing per
/// request (the quiet `RequestScope`, unit-tested in `telemetry::request`), but requests
/// still get an id and keep the one they carry, and no line is written.
#[test]
fn with_the_access_log_off_requests_still_get_ids_and_no_line_is_written() {
    let app = Upstream::start("app");
    let sidecar =
        Sidecar::start_with_env(&service("api", &app.addr.to_string(), ""), &[], &[("BALLAST_LOG", "warn")]);
    let (status, body) = get(&sidecar, "http://api/headers", &["x-request-id: given-2"]);
    assert_eq!(status, 200);
    let h: serde_json::Value = serde_json::from_str(&body).expect("headers");
    assert_eq!(h["x-request-id"], "given-2", "an existing id is kept");
    let (status, body) = get(&sidecar, "http://api/headers", &[]);
    assert_eq!(status, 200);
    let h: serde_json::Value = serde_json::from_str(&body).expect("headers");
    assert!(h["x-request-id"].as_str().is_some_and(|v| v.len() == 36), "{h}");
    assert!(h.get("traceparent").is_none(), "no context made up: {h}");
    let log = sidecar.log();
    assert!(access_lines(&log).is_empty(), "{log}");
}
