//! Resilience policy in the sidecar, end to end: a real sidecar process, real upstreams
//! on loopback, real clients (curl, h2load). Timing bounds are generous; the state
//! machines themselves are unit-tested with paused time in sidecar/src/resilience.

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// A `Service` over these endpoints (address, weight) and a policy with `spec` for it.
fn mesh(name: &str, endpoints: &[(String, u32)], spec: &str) -> String {
    let eps: Vec<String> =
        endpoints.iter().map(|(a, w)| format!("{{address: \"{a}\", weight: {w}}}")).collect();
    let service = format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{}]\n",
        eps.join(", ")
    );
    format!("{service}---\n{}", policy(name, spec))
}

/// A `ResiliencePolicy` for service `name` with `spec` (lines indented by two spaces).
fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {name}-policy}}\nspec:\n  targetRef: {{service: {name}}}\n{spec}"
    )
}

fn service_with_policy(name: &str, up: &Upstream, spec: &str) -> String {
    mesh(name, &[(up.addr.to_string(), 1)], spec)
}

/// A service over several upstreams (upstream, weight) with a policy.
fn weighted_service(name: &str, endpoints: &[(&Upstream, u32)], spec: &str) -> String {
    mesh(name, &endpoints.iter().map(|(u, w)| (u.addr.to_string(), *w)).collect::<Vec<_>>(), spec)
}

/// What h2load reported.
struct Load {
    output: String,
}

impl Load {
    /// From "status codes: 310 2xx, 0 3xx, 590 4xx, 0 5xx".
    fn count(&self, class: &str) -> u64 {
        self.field("status codes:", class)
    }
    /// From "requests: 900 total, 900 started, 900 done, 900 succeeded, 0 failed, ...".
    fn requests(&self, what: &str) -> u64 {
        self.field("requests:", what)
    }
    fn field(&self, line: &str, what: &str) -> u64 {
        let l = self
            .output
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line:?} line in h2load output: {}", self.output));
        l.trim_start_matches(line)
            .split(',')
            .filter_map(|p| {
                let v: Vec<&str> = p.split_whitespace().collect();
                (v.len() >= 2 && v[1] == what).then(|| v[0].parse().ok()).flatten()
            })
            .next()
            .unwrap_or_else(|| panic!("no {what:?} in {l:?}"))
    }
}

/// Runs h2load (HTTP/1.1) against the sidecar's outbound port for `authority`.
fn h2load(sc: &Sidecar, authority: &str, path: &str, args: &[&str]) -> Load {
    let out = run(Command::new(require_tool("h2load"))
        .arg("--h1")
        .args(args)
        .args(["-H", &format!(":authority: {authority}")])
        .arg(format!("http://{}{path}", sc.outbound)));
    Load { output: format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr)) }
}

/// 50 concurrent requests to an upstream that takes 3 s, `maxConcurrent: 10`,
/// `maxPending: 0`: exactly 10 reach it, 40 are rejected with `bulkhead-full`. (3 s: all
/// 50 curl processes must arrive while the first 10 are held, even on a busy machine.)
#[test]
fn bulkhead_admits_max_concurrent_and_rejects_the_rest() {
    let up = Upstream::start_with_delay("slow", Duration::from_secs(3));
    let sc = Sidecar::start(
        &service_with_policy("slow", &up, "  bulkhead: {maxConcurrent: 10, maxPending: 0}\n"),
        &[],
    );
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let (url, results) = (sc.proxy_url(), results.clone());
            std::thread::spawn(move || {
                let out = run(curl().args(["-x", &url, "-i", "http://slow/name"]));
                results.lock().unwrap().push(stdout(&out));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let results = results.lock().unwrap();
    let ok = results.iter().filter(|r| r.starts_with("HTTP/1.1 200")).count();
    let rejected = results
        .iter()
        .filter(|r| r.starts_with("HTTP/1.1 503") && r.contains("ballast-rejected: bulkhead-full"))
        .count();
    assert_eq!((ok, rejected), (10, 40), "{results:?}");
    assert_eq!(up.requests(), 10, "exactly 10 reach the upstream");
    assert_eq!(
        sc.metric(
            r#"ballast_rejections_total{direction="outbound",reason="bulkhead-full",service="slow.default"}"#
        ),
        40.0
    );
}

/// At three times the limit for 3 s, the admitted rate is within ±10% of the limit.
#[test]
fn rate_limit_is_accurate_at_three_times_the_limit() {
    let up = Upstream::start("limited");
    let sc = Sidecar::start(
        &service_with_policy("limited", &up, "  rateLimit: {requestsPerSecond: 100, burst: 10}\n"),
        &[],
    );
    // 3 clients at 100 requests/s each for 3 s: 900 requests offered, 300/s.
    let load = h2load(&sc, "limited", "/name", &["-c", "3", "--rps", "100", "-D", "3"]);
    let text = &load.output;
    let (ok, limited) = (load.count("2xx"), load.count("4xx"));
    // 3 s at 100/s plus the burst of 10.
    let expected = 310.0;
    assert!(
        ((ok as f64) - expected).abs() <= expected * 0.10,
        "admitted {ok}, expected {expected} ±10%: {text}"
    );
    assert!(limited >= 450, "the rest are rejected with 429: {text}");
    // h2load's `-D` stops with up to one request per client (3) in flight: the sidecar
    // may have answered those without h2load counting them.
    let m = sc.metrics();
    let rejected = metric_value(
        &m,
        r#"ballast_rejections_total{direction="outbound",reason="rate-limited",service="limited.default"}"#,
    );
    assert!(
        (limited as f64..=limited as f64 + 3.0).contains(&rejected),
        "{rejected} rejections counted, h2load saw {limited}"
    );
    let reached = up.requests() as u64;
    assert!((ok..=ok + 3).contains(&reached), "{reached} reached the upstream, h2load saw {ok} admitted");
}

#[test]
fn request_timeout_is_a_504_rejection() {
    let up = Upstream::start("late");
    let sc = Sidecar::start(&service_with_policy("late", &up, "  timeouts: {request: 300ms}\n"), &[]);
    let started = Instant::now();
    let out = run(curl().args(["-x", &sc.proxy_url(), "-i", "http://late/slow/3000"]));
    let t = stdout(&out);
    assert!(t.starts_with("HTTP/1.1 504") && t.contains("ballast-rejected: timeout"), "{t}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let out = run(curl().args([
        "-x",
        &sc.proxy_url(),
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        "http://late/slow/50",
    ]));
    assert_eq!(stdout(&out), "200", "a fast response is untouched");
}

#[test]
fn injected_faults_abort_and_delay() {
    let up = Upstream::start("chaos");
    let sc = Sidecar::start(
        &service_with_policy("chaos", &up, "  faults:\n    abort: {percent: 100, status: 503}\n"),
        &[],
    );
    let out = run(curl().args(["-x", &sc.proxy_url(), "-i", "http://chaos/name"]));
    let t = stdout(&out);
    assert!(t.starts_with("HTTP/1.1 503") && t.contains("ballast-fault: abort"), "{t}");
    assert_eq!(up.requests(), 0, "an aborted request never reaches the upstream");
    // A delay fault inside a request timeout exercises the timeout.
    let sc = Sidecar::start(
        &service_with_policy(
            "chaos",
            &up,
            "  timeouts: {request: 200ms}\n  faults:\n    delay: {percent: 100, duration: 2s}\n",
        ),
        &[],
    );
    let out = run(curl().args(["-x", &sc.proxy_url(), "-i", "http://chaos/name"]));
    let t = stdout(&out);
    assert!(t.starts_with("HTTP/1.1 504"), "{t}");
}

/// A new policy applies without a restart, and a bad one is refused with the old kept.
#[test]
fn policy_change_applies_and_a_bad_policy_keeps_the_old_one() {
    let up = Upstream::start("p");
    let sc = Sidecar::start(&service_with_policy("p", &up, "  timeouts: {request: 5s}\n"), &[]);
    let write = |spec: &str| std::fs::write(sc.config.path(), service_with_policy("p", &up, spec)).unwrap();
    write("  faults:\n    abort: {percent: 100, status: 418}\n");
    wait_until("the new policy is applied", || sc.metric("ballast_config_version") >= 2.0);
    let code = |sc: &Sidecar| {
        stdout(&run(curl().args([
            "-x",
            &sc.proxy_url(),
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            "http://p/name",
        ])))
    };
    assert_eq!(code(&sc), "418");
    write("  faults:\n    abort: {percent: 100, status: 200}\n");
    wait_until("the bad policy is rejected", || {
        sc.metric(r#"ballast_config_rejected_total{source="file"}"#) >= 1.0
    });
    assert_eq!(code(&sc), "418", "the running policy stays");
    assert!(sc.log().contains("spec.faults.abort.status"));
}

/// `inbound` limits act in the sidecar of the target's own pod, on traffic to its app:
/// the rate limit and the concurrency limit are one per pod.
#[test]
fn inbound_rate_and_concurrency_limits_protect_the_app() {
    // Margins for a busy machine: the 6 concurrent curls arrive within the app's 1 s, and
    // the bucket (one token per 10 s) does not refill during the test.
    let app = Upstream::start_with_delay("app", Duration::from_secs(1));
    let policy = policy(
        "web",
        "  inbound:\n    rateLimit: {requestsPerSecond: 0.1, burst: 8}\n    maxConcurrent: 3\n",
    );
    let sc = Sidecar::start(&policy, &["--service", "web", "--app-addr", &app.addr.to_string()]);
    let inbound = format!("http://{}/name", sc.inbound);
    // 6 at once: 3 slots, the other 3 rejected at once with bulkhead-full.
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (url, results) = (inbound.clone(), results.clone());
            std::thread::spawn(move || {
                let out = run(curl().args(["-i", &url]));
                results.lock().unwrap().push(stdout(&out));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let r = results.lock().unwrap().clone();
    assert_eq!(r.iter().filter(|t| t.starts_with("HTTP/1.1 200")).count(), 3, "{r:?}");
    assert_eq!(r.iter().filter(|t| t.contains("ballast-rejected: bulkhead-full")).count(), 3, "{r:?}");
    // The bucket (8, refilling every 10 s) had 6 tokens taken; after 2 more, 429s follow.
    let codes: Vec<String> = (0..4)
        .map(|_| stdout(&run(curl().args(["-o", "/dev/null", "-w", "%{http_code}", &inbound]))))
        .collect();
    assert_eq!(codes[..2], ["200", "200"], "{codes:?}");
    assert!(codes[2..].iter().all(|c| c == "429"), "{codes:?}");
    let m = sc.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"ballast_rejections_total{direction="inbound",reason="bulkhead-full",service="web"}"#
        ),
        3.0,
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            r#"ballast_rejections_total{direction="inbound",reason="rate-limited",service="web"}"#
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(app.requests(), 5);
}

/// (status, response head and body) of one request through the sidecar's proxy port.
fn fetch(sc: &Sidecar, args: &[&str]) -> (u16, String) {
    let out = run(curl().args(["-x", &sc.proxy_url(), "-i"]).args(args));
    let text = stdout(&out);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// An upstream failing 30% of requests at random: ≥ 99.5% of 2,000 client requests
/// succeed through the sidecar and the upstream sees ≤ 1.5× the client's requests.
#[test]
fn retries_hide_transient_failures_within_the_budget() {
    let up = Upstream::start("flaky");
    up.set_fault(Fault::Rate503(0.3));
    let spec = "  retries:\n    attempts: 5\n    on: [5xx]\n    backoff: {base: 1ms, max: 10ms}\n    budget: {ratio: 0.5, minPerSecond: 10}\n";
    let sc = Sidecar::start(&service_with_policy("flaky", &up, spec), &[]);
    let load = h2load(&sc, "flaky", "/name", &["-n", "2000", "-c", "10"]);
    let ok = load.count("2xx");
    assert!(ok >= 1990, "{ok} of 2000 succeeded: {}", load.output);
    let tries = up.requests();
    assert!(tries <= 3000, "the upstream saw {tries} tries for 2000 requests");
    assert_eq!(
        sc.metric(r#"ballast_retries_total{service="flaky.default"}"#) as usize,
        tries - 2000,
        "every try after the first is counted"
    );
}

/// An upstream that always fails: the budget caps retries at its ratio (20%) of the
/// requests plus the floor (minPerSecond × the 10 s window), and a spent budget returns
/// the upstream's own response, not a rejection.
#[test]
fn retry_budget_caps_load_on_a_failing_upstream() {
    let up = Upstream::start("down");
    up.set_fault(Fault::Always(503));
    let spec = "  retries:\n    attempts: 3\n    on: [5xx]\n    backoff: {base: 1ms, max: 5ms}\n    budget: {ratio: 0.2, minPerSecond: 10}\n";
    let sc = Sidecar::start(&service_with_policy("down", &up, spec), &[]);
    let started = Instant::now();
    let load = h2load(&sc, "down", "/name", &["-n", "1000", "-c", "10"]);
    let elapsed = started.elapsed();
    assert_eq!(load.count("5xx"), 1000, "{}", load.output);
    assert!(elapsed < Duration::from_secs(10), "the floor below assumes one window: {elapsed:?}");
    let tries = up.requests();
    assert!(tries <= 1000 + 200 + 100, "{tries} tries: over 1.2 × 1000 + the floor of 100");
    assert!(tries >= 1100, "the floor and ratio were used: {tries}");
    let exhausted = sc.metric(r#"ballast_retry_budget_exhausted_total{service="down.default"}"#);
    assert!(exhausted >= 900.0, "{exhausted} requests met a spent budget; {tries} tries");
    let m = sc.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"ballast_rejections_total{direction="outbound",reason="circuit-open",service="down.default"}"#
        ),
        0.0
    );
}

/// Sums the request-duration histogram's count and its `le` bucket for a service.
fn duration_bucket(sc: &Sidecar, service: &str, le: &str) -> (f64, f64) {
    let m = sc.metrics();
    let bucket = metric_value(
        &m,
        &format!(
            r#"ballast_request_duration_seconds_bucket{{direction="outbound",service="{service}",le="{le}"}}"#
        ),
    );
    let count = metric_value(
        &m,
        &format!(r#"ballast_request_duration_seconds_count{{direction="outbound",service="{service}"}}"#),
    );
    (bucket, count)
}

/// The circuit opens after consecutive failures, rejects at once (p99 under 1 ms inside
/// the sidecar), and closes through half-open once the upstream is back.
#[test]
fn circuit_opens_fails_fast_and_recovers_through_half_open() {
    let up = Upstream::start("breaking");
    up.set_fault(Fault::Always(500));
    // openFor 5 s: the 300 rejections below and their scrapes must all fall inside it,
    // or a half-open probe would reach the upstream.
    let spec = "  circuitBreaker: {consecutiveFailures: 5, openFor: 5s, halfOpenRequests: 1}\n";
    let sc = Sidecar::start(&service_with_policy("breaking", &up, spec), &[]);
    let state = || sc.metric(r#"ballast_circuit_state{service="breaking.default"}"#);
    for _ in 0..5 {
        assert_eq!(fetch(&sc, &["http://breaking/name"]).0, 500);
    }
    assert_eq!(state(), 1.0, "open after 5 failures");
    let (status, text) = fetch(&sc, &["http://breaking/name"]);
    assert_eq!(status, 503);
    assert!(text.contains("ballast-rejected: circuit-open"), "{text}");
    let before = duration_bucket(&sc, "breaking.default", "0.001");
    let load = h2load(&sc, "breaking", "/name", &["-n", "300", "-c", "1"]);
    assert_eq!(load.count("5xx"), 300, "{}", load.output);
    let after = duration_bucket(&sc, "breaking.default", "0.001");
    let (fast, all) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(all, 300.0);
    assert!(fast / all >= 0.99, "{fast} of {all} rejections took under 1 ms");
    assert_eq!(up.requests(), 5, "nothing reached the upstream while open");
    // Back up: after openFor, one probe goes through and closes the circuit.
    up.set_fault(Fault::None);
    wait_until("the half-open probe succeeds", || fetch(&sc, &["http://breaking/name"]).0 == 200);
    assert_eq!(state(), 0.0, "closed after the probe succeeded");
    assert_eq!(fetch(&sc, &["http://breaking/name"]).0, 200);
    assert!(sc.log().contains("circuit breaker state changed"));
}

/// A try the request timeout cuts off is the upstream's failure: slow answers open the
/// circuit as errors do, and the circuit then rejects without waiting out the timeout.
#[test]
fn requests_cut_by_the_request_timeout_open_the_circuit() {
    let up = Upstream::start("sluggish");
    // A 1 s timeout, so "at once" has room on both sides on a loaded machine.
    let spec = "  timeouts: {request: 1s}\n  circuitBreaker: {consecutiveFailures: 3, openFor: 30s}\n";
    let sc = Sidecar::start(&service_with_policy("sluggish", &up, spec), &[]);
    for _ in 0..3 {
        let (status, text) = fetch(&sc, &["http://sluggish/slow/3000"]);
        assert_eq!(status, 504, "{text}");
        assert!(text.contains("ballast-rejected: timeout"), "{text}");
    }
    assert_eq!(
        sc.metric(r#"ballast_circuit_state{service="sluggish.default"}"#),
        1.0,
        "open after 3 timeouts"
    );
    let started = Instant::now();
    let (status, text) = fetch(&sc, &["http://sluggish/slow/3000"]);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("ballast-rejected: circuit-open"), "{text}");
    assert!(started.elapsed() < Duration::from_millis(500), "rejected at once: {:?}", started.elapsed());
    assert_eq!(up.requests(), 3, "nothing reached the upstream while open");
}

/// A try that hits its per-try timeout is retried on the other endpoint, well within the
/// request timeout.
#[test]
fn per_try_timeout_then_success_on_another_endpoint() {
    let slow = Upstream::start_with_delay("slow", Duration::from_secs(3));
    let fast = Upstream::start("fast");
    let spec = "  loadBalancer: round-robin\n  timeouts: {request: 2s, perTry: 200ms}\n  retries: {attempts: 2, on: [gateway-error], backoff: {base: 1ms, max: 5ms}}\n";
    let sc = Sidecar::start(&weighted_service("pair", &[(&slow, 1), (&fast, 1)], spec), &[]);
    for _ in 0..10 {
        let started = Instant::now();
        let (status, text) = fetch(&sc, &["http://pair/name"]);
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("x-upstream: fast"), "{text}");
        assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    }
    assert!(slow.requests() >= 3, "round robin sent first tries to the slow endpoint: {}", slow.requests());
}

/// `timeouts.request` covers every try: retries stop when it fires, with a 504 timeout
/// rejection.
#[test]
fn request_timeout_covers_every_try() {
    let up = Upstream::start_with_delay("stuck", Duration::from_secs(5));
    let spec = "  timeouts: {request: 1s, perTry: 300ms}\n  retries: {attempts: 10, on: [gateway-error], backoff: {base: 1ms, max: 5ms}}\n";
    let sc = Sidecar::start(&service_with_policy("stuck", &up, spec), &[]);
    let started = Instant::now();
    let (status, text) = fetch(&sc, &["http://stuck/name"]);
    let elapsed = started.elapsed();
    assert_eq!(status, 504, "{text}");
    assert!(text.contains("ballast-rejected: timeout"), "{text}");
    assert!(elapsed >= Duration::from_millis(950) && elapsed < Duration::from_millis(2500), "{elapsed:?}");
    let tries = up.requests();
    assert!((3..=4).contains(&tries), "1 s of 300 ms tries: {tries}");
}

/// A POST is not retried unless the policy says so (`nonIdempotent`, here on a route).
#[test]
fn post_is_retried_only_with_permission() {
    let up = Upstream::start("orders");
    up.set_fault(Fault::Always(503));
    let spec = "  retries: {attempts: 2, on: [5xx], backoff: {base: 1ms, max: 2ms}}\n  routes:\n    - match: {pathPrefix: /idempotent-post, methods: [POST]}\n      retries: {nonIdempotent: true}\n";
    let sc = Sidecar::start(&service_with_policy("orders", &up, spec), &[]);
    assert_eq!(fetch(&sc, &["-X", "POST", "-d", "x", "http://orders/status/200"]).0, 503);
    assert_eq!(up.requests(), 1, "a POST without permission is tried once");
    assert_eq!(fetch(&sc, &["http://orders/status/200"]).0, 503);
    assert_eq!(up.requests(), 4, "a GET is tried 3 times");
    assert_eq!(fetch(&sc, &["-X", "POST", "-d", "x", "http://orders/idempotent-post"]).0, 503);
    assert_eq!(up.requests(), 7, "the route permits retrying its POSTs");
}

/// A body over the 64 KiB replay buffer streams through whole and is not retried.
#[test]
fn body_over_the_buffer_limit_is_streamed_and_not_retried() {
    let up = Upstream::start("upload");
    let spec = "  retries: {attempts: 2, on: [5xx], backoff: {base: 1ms, max: 2ms}}\n";
    let sc = Sidecar::start(&service_with_policy("upload", &up, spec), &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big");
    std::fs::write(&file, vec![b'b'; 100 * 1024]).unwrap();
    let data = format!("@{}", file.display());
    let out =
        run(curl().args(["-x", &sc.proxy_url(), "-X", "PUT", "--data-binary", &data, "http://upload/echo"]));
    assert_eq!(out.stdout.len(), 100 * 1024, "the whole body reached the upstream and came back");
    up.set_fault(Fault::Always(503));
    let before = up.requests();
    assert_eq!(fetch(&sc, &["-X", "PUT", "--data-binary", &data, "http://upload/echo"]).0, 503);
    assert_eq!(up.requests() - before, 1, "not retried");
    // A small body is replayed: 3 tries.
    assert_eq!(fetch(&sc, &["-X", "PUT", "-d", "small", "http://upload/echo"]).0, 503);
    assert_eq!(up.requests() - before, 4);
}

/// gRPC: an UNAVAILABLE in a trailers-only response is retried when the policy lists
/// `grpc:unavailable`; the client sees the second call's answer.
#[test]
fn grpc_unavailable_is_retried() {
    let port = free_port();
    let _server = spawn_python_server("grpc_server.py", port);
    let service = format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: greeter}}\nspec:\n  ports: [{{port: {port}, protocol: grpc}}]\n  endpoints: [{{address: \"127.0.0.1:{port}\"}}]\n"
    );
    let spec = "  retries: {attempts: 2, on: [grpc:unavailable], backoff: {base: 1ms, max: 5ms}}\n";
    let yaml = format!("{service}---\n{}", policy("greeter", spec));
    let sc = Sidecar::start(&yaml, &[]);
    for expected in ["call:2", "call:4"] {
        let v = grpc_case(&sc.outbound, "greeter", "flaky");
        assert_eq!(v["code"], "OK", "{v}");
        assert_eq!(v["response"], expected, "{v}");
    }
    assert_eq!(sc.metric(r#"ballast_retries_total{service="greeter.default"}"#), 2.0);
    // A retryable call's body streams to the upstream as it arrives: a bidi stream whose
    // client waits for each answer before sending on does not hang.
    let v = grpc_case(&sc.outbound, "greeter", "chat");
    assert_eq!(v["code"], "OK", "{v}");
    assert_eq!(v["replies"], serde_json::json!(["re:m0", "re:m1", "re:m2"]), "{v}");
}

/// Outlier detection ejects the endpoint that keeps failing; the other takes the traffic.
#[test]
fn outlier_detection_ejects_a_failing_endpoint() {
    let good = Upstream::start("good");
    let bad = Upstream::start("bad");
    bad.set_fault(Fault::Always(503));
    let spec = "  loadBalancer: round-robin\n  outlierDetection: {consecutiveFailures: 3, baseEjection: 30s, maxEjectedPercent: 10}\n";
    let sc = Sidecar::start(&weighted_service("duo", &[(&good, 1), (&bad, 1)], spec), &[]);
    let statuses: Vec<u16> = (0..20).map(|_| fetch(&sc, &["http://duo/name"]).0).collect();
    assert_eq!(bad.requests(), 3, "ejected after 3 failures in a row: {statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 17);
    assert_eq!(sc.metric(r#"ballast_endpoints{service="duo.default",state="ejected"}"#), 1.0);
    assert_eq!(sc.metric(r#"ballast_endpoints{service="duo.default",state="ready"}"#), 1.0);
    assert!(sc.log().contains("endpoint ejected by outlier detection"));
}

/// Round robin follows weights exactly; consistent hashing keeps a key on one endpoint.
#[test]
fn load_balancers_follow_weights_and_keys() {
    let (a, b, c) = (Upstream::start("a"), Upstream::start("b"), Upstream::start("c"));
    let sc = Sidecar::start(
        &weighted_service("rr", &[(&a, 2), (&b, 1), (&c, 1)], "  loadBalancer: round-robin\n"),
        &[],
    );
    for _ in 0..40 {
        assert_eq!(fetch(&sc, &["http://rr/name"]).0, 200);
    }
    assert_eq!((a.requests(), b.requests(), c.requests()), (20, 10, 10));
    drop(sc);
    let sc = Sidecar::start(
        &weighted_service("sticky", &[(&a, 1), (&b, 1), (&c, 1)], "  loadBalancer: consistent-hash:x-user\n"),
        &[],
    );
    let upstream_of = |user: &str| {
        let (_, text) = fetch(&sc, &["-H", &format!("x-user: {user}"), "http://sticky/name"]);
        text.lines().find_map(|l| l.strip_prefix("x-upstream: ")).unwrap_or("").trim().to_string()
    };
    let mut seen = std::collections::HashSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"] {
        let first = upstream_of(user);
        for _ in 0..3 {
            assert_eq!(upstream_of(user), first, "{user} sticks to {first}");
        }
        seen.insert(first);
    }
    assert!(seen.len() >= 2, "keys spread over the endpoints: {seen:?}");
}

/// Replacing the policy every 500 ms under 1,000 requests/s for 5 s fails no request.
#[test]
fn policy_swap_under_load_fails_no_request() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let policies = [
        "  timeouts: {request: 2s}\n  retries: {attempts: 1}\n  bulkhead: {maxConcurrent: 500}\n",
        "  loadBalancer: round-robin\n  timeouts: {request: 3s, perTry: 1s}\n  retries: {attempts: 2}\n  circuitBreaker: {consecutiveFailures: 50}\n  rateLimit: {requestsPerSecond: 100000}\n",
    ];
    let sc = Sidecar::start(&weighted_service("swap", &[(&a, 1), (&b, 1)], policies[0]), &[]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, path) = (stop.clone(), sc.config.path().to_path_buf());
        let yamls: Vec<String> =
            policies.iter().map(|p| weighted_service("swap", &[(&a, 1), (&b, 1)], p)).collect();
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 20 {
                std::thread::sleep(Duration::from_millis(500));
                i += 1;
                // In place (truncate, then write): the sidecar must not apply the
                // moment in which the file is empty.
                std::fs::write(&path, &yamls[i % 2]).unwrap();
            }
            i
        })
    };
    let load = h2load(&sc, "swap", "/name", &["-c", "10", "--rps", "100", "-D", "5"]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let swaps = swapper.join().unwrap();
    let total = load.requests("total");
    assert!(total >= 4000, "offered {total}: {}", load.output);
    let log = sc.log();
    let problems: Vec<&str> =
        log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(20).collect();
    assert_eq!(load.count("2xx"), total, "{}\nsidecar: {problems:#?}", load.output);
    assert_eq!(load.requests("failed") + load.requests("errored"), 0, "{}", load.output);
    assert!(swaps >= 9, "{swaps} swaps");
    assert!(sc.metric("ballast_config_version") >= 8.0, "the swaps were applied");
}

/// The server-side sidecar bounds its app's answer by the policy's `timeouts.request`
/// too, so a caller from outside the mesh gets the same 504 `timeout`.
#[test]
fn inbound_applies_the_request_timeout() {
    let app = Upstream::start("app");
    let policy = policy("web", "  timeouts: {request: 300ms}\n");
    let sc = Sidecar::start(&policy, &["--service", "web", "--app-addr", &app.addr.to_string()]);
    let started = Instant::now();
    let out = run(curl().args(["-i", &format!("http://{}/slow/3000", sc.inbound)]));
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(text.contains("ballast-rejected: timeout"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let out = run(curl().args(["-i", &format!("http://{}/slow/10", sc.inbound)]));
    assert!(stdout(&out).starts_with("HTTP/1.1 200"));
}

/// A listener whose accept queue is full: SYNs to it are dropped, so connecting hangs
/// (a blackhole on loopback). Returns it with the connections that fill it.
fn blackhole() -> (socket2::Socket, Vec<std::net::TcpStream>, std::net::SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    // Never accepted: these fill the queue.
    let fill: Vec<_> = (0..4)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    (s, fill, addr)
}

/// `timeouts.connect` bounds connecting per service, and `connect-failure` retries on
/// another endpoint.
#[test]
fn connect_timeout_is_per_service_and_retried_elsewhere() {
    let (_hole, _fill, hole) = blackhole();
    let yaml = mesh("dark", &[(hole.to_string(), 1)], "  timeouts: {connect: 200ms}\n");
    let sc = Sidecar::start(&yaml, &["--connect-timeout", "5s"]);
    let started = Instant::now();
    let (status, text) = fetch(&sc, &["http://dark/name"]);
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("timed out after 200ms"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(2), "the policy's 200ms, not the sidecar's 5s");
    drop(sc);
    let good = Upstream::start("good");
    let yaml = mesh(
        "mixed",
        &[(hole.to_string(), 1), (good.addr.to_string(), 1)],
        "  loadBalancer: round-robin\n  timeouts: {connect: 200ms}\n  retries: {attempts: 1, on: [connect-failure], backoff: {base: 1ms, max: 2ms}}\n",
    );
    let sc = Sidecar::start(&yaml, &["--connect-timeout", "5s"]);
    for _ in 0..4 {
        let (status, text) = fetch(&sc, &["http://mixed/name"]);
        assert_eq!(status, 200, "{text}");
    }
    assert_eq!(good.requests(), 4);
}

/// A change of endpoints alone updates the balancer in place: the policy's state (here an
/// open circuit) carries on, and the new endpoint is counted.
#[test]
fn endpoint_changes_keep_the_policy_state() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    a.set_fault(Fault::Always(500));
    let spec = "  circuitBreaker: {consecutiveFailures: 3, openFor: 30s}\n";
    let sc = Sidecar::start(&weighted_service("grow", &[(&a, 1)], spec), &[]);
    for _ in 0..3 {
        assert_eq!(fetch(&sc, &["http://grow/name"]).0, 500);
    }
    assert_eq!(sc.metric(r#"ballast_circuit_state{service="grow.default"}"#), 1.0);
    std::fs::write(sc.config.path(), weighted_service("grow", &[(&a, 1), (&b, 1)], spec)).unwrap();
    wait_until("the new endpoint is applied", || {
        sc.metric(r#"ballast_endpoints{service="grow.default",state="ready"}"#) == 2.0
    });
    let (status, text) = fetch(&sc, &["http://grow/name"]);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("ballast-rejected: circuit-open"), "still open: {text}");
    assert_eq!(b.requests(), 0);
    // A policy change is a new breaker.
    let spec = "  circuitBreaker: {consecutiveFailures: 4, openFor: 30s}\n";
    std::fs::write(sc.config.path(), weighted_service("grow", &[(&b, 1)], spec)).unwrap();
    wait_until("the new policy is applied", || sc.metric("ballast_config_version") >= 3.0);
    assert_eq!(fetch(&sc, &["http://grow/name"]).0, 200);
}
