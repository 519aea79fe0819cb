//! Resilience policy in the sidecar, end to end: a real sidecar process, real upstreams
//! on loopback, real clients (curl, h2load). Timing bounds are generous; the state
//! machines themselves are unit-tested with paused time in sidecar/src/resilience.

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

fn service_with_policy(name: &str, up: &Upstream, spec: &str) -> String {
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{{address: \"{}\"}}]\n---\napiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {name}-policy}}\nspec:\n  targetRef: {{service: {name}}}\n{spec}",
        up.addr
    )
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// 50 concurrent requests to an upstream that takes 1 s, `maxConcurrent: 10`,
/// `maxPending: 0`: exactly 10 reach it, 40 are rejected with `bulkhead-full`.
#[test]
fn bulkhead_admits_max_concurrent_and_rejects_the_rest() {
    let up = Upstream::start_with_delay("slow", Duration::from_secs(1));
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
    let out = run(Command::new(require_tool("h2load")).args([
        "--h1",
        "-c",
        "3",
        "--rps",
        "100",
        "-D",
        "3",
        "-H",
        ":authority: limited",
        &format!("http://{}/name", sc.outbound),
    ]));
    let text = stdout(&out);
    let line = text.lines().find(|l| l.starts_with("status codes:")).unwrap_or_else(|| panic!("{text}"));
    // "status codes: 310 2xx, 0 3xx, 590 4xx, 0 5xx"
    let count = |class: &str| -> u64 {
        line.trim_start_matches("status codes:")
            .split(',')
            .filter_map(|p| {
                p.split_whitespace()
                    .collect::<Vec<_>>()
                    .get(..2)
                    .map(|v| (v[0].to_string(), v[1].to_string()))
            })
            .find(|(_, c)| c == class)
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(0)
    };
    let (ok, limited) = (count("2xx"), count("4xx"));
    // 3 s at 100/s plus the burst of 10.
    let expected = 310.0;
    assert!(
        ((ok as f64) - expected).abs() <= expected * 0.10,
        "admitted {ok}, expected {expected} ±10%: {text}"
    );
    assert!(limited >= 450, "the rest are rejected with 429: {line}");
    let m = sc.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"ballast_rejections_total{direction="outbound",reason="rate-limited",service="limited.default"}"#
        ),
        limited as f64
    );
    assert_eq!(up.requests() as u64, ok);
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
    let app = Upstream::start_with_delay("app", Duration::from_millis(600));
    let policy = "apiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: web-inbound}\nspec:\n  targetRef: {service: web}\n  inbound:\n    rateLimit: {requestsPerSecond: 0.2, burst: 8}\n    maxConcurrent: 3\n";
    let sc = Sidecar::start(policy, &["--service", "web", "--app-addr", &app.addr.to_string()]);
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
    // The bucket (8, refilling every 5 s) had 6 tokens taken; after 2 more, 429s follow.
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
