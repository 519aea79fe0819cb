//! The sidecar as a faithful HTTP proxy, checked with curl against a real upstream.
//!
//! Most tests use proxy mode (curl `-x`, absolute-form URIs), which needs no iptables;
//! `tests/interception.rs` covers the transparent path in network namespaces.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

fn service_yaml(name: &str, endpoints: &[&Upstream]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|u| format!("{{address: \"{}\"}}", u.addr)).collect();
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: 80}}]\n  endpoints: [{}]\n",
        eps.join(", ")
    )
}

#[test]
fn routes_by_host_in_every_form() {
    let a = Upstream::start("a");
    let sc = Sidecar::start(&service_yaml("web", &[&a]), &[]);
    for host in ["web", "web.default", "web.default.svc", "web.default.svc.cluster.local", "WEB.Default"] {
        let out = run(curl().args(["-x", &sc.proxy_url(), &format!("http://{host}/name")]));
        assert_eq!(stdout(&out), "a", "{host}: {out:?}");
    }
    assert_eq!(
        sc.metric(r#"ballast_requests_total{direction="outbound",outcome="success",service="web.default",status_code="200"}"#),
        5.0
    );
}

/// Concurrent requests spread over both endpoints: peak-EWMA charges an endpoint for
/// the requests it has in flight, so one endpoint cannot take everything.
#[test]
fn concurrent_load_is_balanced_over_every_endpoint() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let sc = Sidecar::start(&service_yaml("web", &[&a, &b]), &[]);
    let urls: Vec<String> = (0..80).map(|_| "http://web/slow/40".to_string()).collect();
    let out = run(curl()
        .args([
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "16",
            "-x",
            &sc.proxy_url(),
            "-o",
            "/dev/null",
        ])
        .args(urls.iter().flat_map(|u| ["-o", "/dev/null", u.as_str()])));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(a.requests() + b.requests(), 80);
    assert!(a.requests() >= 10 && b.requests() >= 10, "a={} b={}", a.requests(), b.requests());
}

/// Peak-EWMA keeps most traffic away from a slow endpoint.
#[test]
fn slow_endpoint_gets_little_traffic() {
    let fast = Upstream::start("fast");
    let slow = Upstream::start_with_delay("slow", Duration::from_millis(60));
    let sc = Sidecar::start(&service_yaml("web", &[&fast, &slow]), &[]);
    for _ in 0..60 {
        let out = run(curl().args(["-x", &sc.proxy_url(), "http://web/name"]));
        assert!(out.status.success());
    }
    assert!(slow.requests() <= 12, "slow endpoint got {} of 60 requests", slow.requests());
}

#[test]
fn strips_hop_by_hop_headers_both_ways_and_keeps_the_host() {
    let up = Upstream::start("up");
    let sc = Sidecar::start(&service_yaml("web", &[&up]), &[]);
    let out = run(curl().args([
        "-i",
        "-x",
        &sc.proxy_url(),
        "-H",
        "Connection: X-Private",
        "-H",
        "X-Private: secret",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "Proxy-Authorization: Basic Zm9vOmJhcg==",
        "-H",
        "TE: trailers, deflate",
        "-H",
        "X-End-To-End: kept",
        "http://web.default/headers?q=a%20b",
    ]));
    let text = stdout(&out);
    let (head, body) = text.split_once("\r\n\r\n").expect("response");
    let seen: serde_json::Value = serde_json::from_str(body).expect("json body");
    assert_eq!(seen["x-end-to-end"], "kept");
    assert_eq!(seen["host"], "web.default", "the app's Host reaches the upstream unchanged");
    assert_eq!(seen[":uri"], "/headers?q=a%20b", "origin form, the query kept");
    for h in ["x-private", "keep-alive", "proxy-authorization", "connection", "proxy-connection"] {
        assert!(seen.get(h).is_none(), "{h} reached the upstream: {seen}");
    }
    assert_eq!(seen["te"], "trailers");
    assert_eq!(seen[":version"], "HTTP/1.1");
    assert!(!head.to_ascii_lowercase().contains("x-hop"), "response hop-by-hop header leaked: {head}");
    assert!(head.to_ascii_lowercase().contains("x-upstream: up"));
}

#[test]
fn chunked_bodies_both_ways() {
    let up = Upstream::start("up");
    let sc = Sidecar::start(&service_yaml("web", &[&up]), &[]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    let out = run(curl().args([
        "-x",
        &sc.proxy_url(),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", input.display()),
        "-D",
        "-",
        "-o",
        &dir.path().join("out.bin").display().to_string(),
        "http://web/echo",
    ]));
    assert!(out.status.success(), "{out:?}");
    let head = stdout(&out).to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(std::fs::read(dir.path().join("out.bin")).unwrap(), data);
}

#[test]
fn expect_100_continue_is_answered() {
    let up = Upstream::start("up");
    let sc = Sidecar::start(&service_yaml("web", &[&up]), &[]);
    let out = run(curl().args([
        "-v",
        "-x",
        &sc.proxy_url(),
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &"z".repeat(4096),
        "http://web/echo",
    ]));
    assert!(out.status.success(), "{out:?}");
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert!(verbose.contains("HTTP/1.1 100 Continue"), "{verbose}");
    assert_eq!(stdout(&out), "z".repeat(4096));
}

#[test]
fn head_content_length_zero_and_http10() {
    let up = Upstream::start("up");
    let sc = Sidecar::start(&service_yaml("web", &[&up]), &[]);
    let head = run(curl().args(["-I", "-x", &sc.proxy_url(), "http://web/bytes/1000"]));
    assert!(head.status.success(), "{head:?}");
    let h = stdout(&head);
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let (status, body) = http_request(
        sc.outbound,
        "HEAD http://web/bytes/1000 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!((status, body.as_str()), (200, ""), "HEAD must not carry a body");
    let zero = run(curl().args([
        "-x",
        &sc.proxy_url(),
        "-X",
        "POST",
        "-H",
        "Content-Length: 0",
        "-w",
        "%{http_code}",
        "http://web/echo",
    ]));
    assert_eq!(stdout(&zero), "200");
    let v10 = run(curl().args(["--http1.0", "-i", "-x", &sc.proxy_url(), "http://web/name"]));
    let t = stdout(&v10);
    assert!(t.starts_with("HTTP/1.0 200"), "an HTTP/1.0 client is answered in HTTP/1.0: {t}");
    assert!(t.ends_with("\r\n\r\nup"), "{t}");
    // HTTP/1.0 request line without absolute form, Host only, straight to the inbound side.
    let (status, body) =
        http_request(sc.outbound, "GET http://web/name HTTP/1.0\r\nHost: web\r\n\r\n").unwrap();
    assert_eq!((status, body.as_str()), (200, "up"));
}

#[test]
fn response_delimited_by_connection_close() {
    let upstream = RawServer::start(|mut s| {
        read_head(&mut s);
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the connection closes");
    });
    let sc = Sidecar::start("", &[]);
    for version in ["--http1.1", "--http1.0"] {
        let out = run(curl().args([version, "-x", &sc.proxy_url(), &format!("http://{}/", upstream.addr)]));
        assert!(out.status.success(), "{version}: {out:?}");
        assert_eq!(stdout(&out), "until the connection closes", "{version}");
    }
}

#[test]
fn hundred_megabyte_bodies_stream_in_bounded_memory() {
    let up = Upstream::start("up");
    let sc = Sidecar::start(&service_yaml("web", &[&up]), &[]);
    const SIZE: u64 = 100 * 1024 * 1024;
    let down = run(curl().args([
        "-x",
        &sc.proxy_url(),
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("http://web/bytes/{SIZE}"),
    ]));
    assert_eq!(stdout(&down), SIZE.to_string(), "{down:?}");
    // Upload 100 MB of zeros and get it echoed back, streamed.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("zeros");
    std::fs::File::create(&f).unwrap().set_len(SIZE).unwrap();
    let up_out = run(curl().args([
        "-x",
        &sc.proxy_url(),
        "--data-binary",
        &format!("@{}", f.display()),
        "-H",
        "Content-Type: application/octet-stream",
        "-o",
        "/dev/null",
        "-w",
        "%{size_upload} %{size_download}",
        "http://web/echo",
    ]));
    assert_eq!(stdout(&up_out), format!("{SIZE} {SIZE}"), "{up_out:?}");
    let peak = sc.peak_rss_kib();
    assert!(
        peak > 0 && peak < 64 * 1024,
        "sidecar peak RSS {peak} KiB: bodies must be streamed, not buffered"
    );
}

#[test]
fn connect_tunnels_in_proxy_mode() {
    let up = Upstream::start("tunnelled");
    let sc = Sidecar::start("", &[]);
    let out = run(curl().args(["-p", "-x", &sc.proxy_url(), &format!("http://{}/name", up.addr)]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "tunnelled");
    // A CONNECT to something that does not listen is a 502, not a hang.
    let closed = free_port();
    let out = run(curl().args([
        "-p",
        "-x",
        &sc.proxy_url(),
        "-w",
        "%{http_connect}",
        &format!("http://127.0.0.1:{closed}/"),
    ]));
    assert_eq!(stdout(&out), "502", "{out:?}");
}

#[test]
fn unknown_host_in_proxy_mode_is_a_502_naming_it() {
    let sc = Sidecar::start("", &[]);
    let out =
        run(curl().args(["-x", &sc.proxy_url(), "-w", "\n%{http_code}", "http://no-such-service.example/x"]));
    let text = stdout(&out);
    assert!(text.ends_with("\n502"), "{text}");
    assert!(text.contains("no-such-service.example"), "{text}");
}

#[test]
fn empty_config_passes_through_and_counts() {
    let up = Upstream::start("direct");
    let sc = Sidecar::start("", &[]);
    let out = run(curl().args([
        "-x",
        &sc.proxy_url(),
        &format!("http://{}/status/201", up.addr),
        "-w",
        "%{http_code}",
    ]));
    assert!(stdout(&out).ends_with("201"), "{out:?}");
    assert_eq!(
        sc.metric(r#"ballast_requests_total{direction="outbound",outcome="success",service="passthrough",status_code="201"}"#),
        1.0
    );
    assert_eq!(sc.metric(r#"ballast_tcp_connections_total{direction="outbound",protocol="http1"}"#), 1.0);
}

#[test]
fn malformed_http_gets_400_and_the_connection_closed() {
    let sc = Sidecar::start("", &[]);
    for raw in [
        "GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ] {
        let mut s = TcpStream::connect(sc.outbound).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let started = Instant::now();
        s.read_to_end(&mut buf).expect("connection closed by the sidecar, not timed out");
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 400"), "{raw:?} -> {text:?}");
        assert!(started.elapsed() < Duration::from_secs(4));
    }
    // The sidecar is still serving.
    assert_eq!(http_get(sc.admin, "/live").unwrap().0, 200);
}

#[test]
fn upstream_reset_is_a_502_for_http1_and_a_stream_reset_for_http2() {
    let upstream = RawServer::start(|mut s| {
        let _ = s.read(&mut [0u8; 1024]);
        reset(s);
    });
    let svc = format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: flaky}}\nspec:\n  endpoints: [{{address: \"{}\"}}]\n",
        upstream.addr
    );
    let sc = Sidecar::start(&svc, &[]);
    let started = Instant::now();
    let out = run(curl().args(["-x", &sc.proxy_url(), "-w", "\n%{http_code}", "http://flaky/"]));
    assert!(stdout(&out).ends_with("\n502"), "{out:?}");
    // HTTP/2 prior knowledge straight at the outbound port, :authority naming the service.
    let out = run(curl().args([
        "--http2-prior-knowledge",
        "-H",
        "Host: flaky",
        &format!("http://{}/", sc.outbound),
    ]));
    assert!(!out.status.success(), "an upstream reset must not look like a success: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RST_STREAM") || err.contains("stream") || out.status.code() == Some(92), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "never a hang");
}

#[test]
fn upstream_connections_are_pooled() {
    let up = Upstream::start("pooled");
    let sc = Sidecar::start(&service_yaml("web", &[&up]), &[]);
    for _ in 0..30 {
        // Each curl is a new downstream connection.
        let out = run(curl().args(["-x", &sc.proxy_url(), "http://web/name"]));
        assert_eq!(stdout(&out), "pooled");
    }
    assert_eq!(up.requests(), 30);
    assert!(up.connections() <= 2, "30 sequential requests used {} upstream connections", up.connections());
}

#[test]
fn connection_refused_upstream_is_a_502_that_says_so() {
    let port = free_port();
    let svc = format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: down}}\nspec:\n  endpoints: [{{address: \"127.0.0.1:{port}\"}}]\n---\napiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: empty}}\nspec: {{}}\n---\napiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: dnsy}}\nspec: {{dns: dnsy.example.internal}}\n"
    );
    let sc = Sidecar::start(&svc, &[]);
    let out = run(curl().args(["-i", "-x", &sc.proxy_url(), "http://down/"]));
    let t = stdout(&out);
    assert!(t.starts_with("HTTP/1.1 502"), "{t}");
    assert!(t.contains("connect"), "{t}");
    assert!(!t.contains("ballast-rejected"), "an upstream failure is not a mesh rejection: {t}");
    let out = run(curl().args(["-i", "-x", &sc.proxy_url(), "http://empty/"]));
    let t = stdout(&out);
    assert!(t.starts_with("HTTP/1.1 503"), "{t}");
    assert!(t.contains("ballast-rejected: no-endpoints"), "{t}");
    // DNS discovery is not built yet: the answer says so instead of failing silently.
    let out = run(curl().args(["-i", "-x", &sc.proxy_url(), "http://dnsy/"]));
    let t = stdout(&out);
    assert!(
        t.starts_with("HTTP/1.1 503")
            && t.contains("dns discovery of dnsy.example.internal is not supported"),
        "{t}"
    );
}

/// A `ballast-rejected` header from upstream is that upstream's response: it is neither
/// counted as this sidecar's rejection nor copied into a metric label.
#[test]
fn upstream_rejection_headers_are_not_counted_as_ours() {
    let upstream = RawServer::start(|mut s| {
        read_head(&mut s);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nballast-rejected: made-up-reason\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
    });
    let sc = Sidecar::start("", &[]);
    let out = run(curl().args(["-x", &sc.proxy_url(), &format!("http://{}/", upstream.addr)]));
    assert_eq!(stdout(&out), "ok");
    let m = sc.metrics();
    assert!(!m.contains("made-up-reason"), "a header value became a label:\n{m}");
    assert_eq!(
        metric_value(
            &m,
            r#"ballast_requests_total{direction="outbound",outcome="success",service="passthrough",status_code="200"}"#
        ),
        1.0,
        "{m}"
    );
}

/// The inbound side only forwards to the app, never into the sidecar's own listeners.
#[test]
fn inbound_never_forwards_to_the_sidecars_own_listener() {
    let sc = Sidecar::start("", &["--app-addr", "{outbound}"]);
    let (status, body) =
        http_request(sc.inbound, "GET / HTTP/1.1\r\nHost: anything\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(status, 508, "{body}");
    assert_eq!(sc.metric(r#"ballast_tcp_connections_total{direction="outbound",protocol="http1"}"#), 0.0);
}

/// An endpoint given as a bare IP listens on the port the caller asked for.
#[test]
fn bare_ip_endpoints_take_the_requested_port() {
    let up = Upstream::start("any-port");
    let svc = "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {name: anyport}\nspec:\n  endpoints: [{address: \"127.0.0.1\"}]\n";
    let sc = Sidecar::start(svc, &[]);
    let out = run(curl().args(["-x", &sc.proxy_url(), &format!("http://anyport:{}/name", up.addr.port())]));
    assert_eq!(stdout(&out), "any-port", "{out:?}");
}

/// A client connection that has not sent a complete request head for 30 s is closed
/// 30-31 s after it went quiet (hyper's header read timeout on the coarse timer, README
/// "The sidecar"): an idle keep-alive connection after its response, one stalled
/// mid-head, and one trickling a header byte every two seconds (slowloris), which the
/// timeout bounds as a whole rather than per byte. Meanwhile the sidecar keeps serving.
#[test]
fn connections_without_a_request_head_for_30s_are_closed() {
    let a = Upstream::start("a");
    let sc = Sidecar::start(&service_yaml("web", &[&a]), &[]);
    let outbound = sc.outbound;
    let closes_after = |name: &'static str, start: fn(&mut TcpStream) -> Instant| {
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(outbound).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(45))).unwrap();
            let quiet_since = start(&mut s);
            let mut buf = [0u8; 4096];
            // What is left to read: nothing (the idle and stalled ones) or the keep-alive
            // response already consumed by `start`; then the close.
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                    Err(e) => panic!("{name}: not closed within 45 s: {e}"),
                }
            }
            (name, quiet_since.elapsed())
        })
    };
    let idle = closes_after("idle keep-alive", |s| {
        s.write_all(b"GET /name HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
        // The whole response (head and the one-byte body), however the reads split it.
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        while !response.ends_with(b"\r\n\r\na") && response.len() < 4096 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
        let response = String::from_utf8_lossy(&response).into_owned();
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("\r\n\r\na"), "{response:?}");
        Instant::now()
    });
    let stalled = closes_after("stalled mid-head", |s| {
        s.write_all(b"GET /name HTTP/1.1\r\nHost: web\r\n").unwrap();
        Instant::now()
    });
    let trickle = closes_after("trickling", |s| {
        let started = Instant::now();
        s.write_all(b"GET /name HTTP/1.1\r\nHost: web\r\nX-Slow: ").unwrap();
        // A byte every 2 s, for 40 s at most, watching for the close every 100 ms so
        // that it is seen when it happens rather than at the next write.
        s.set_nonblocking(true).unwrap();
        let mut next_byte = started + Duration::from_secs(2);
        while started.elapsed() < Duration::from_secs(40) {
            std::thread::sleep(Duration::from_millis(100));
            match s.peek(&mut [0u8; 1]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Closed (EOF or reset), or something to read before the close.
                _ => break,
            }
            if Instant::now() >= next_byte {
                if s.write_all(b"a").is_err() {
                    break;
                }
                next_byte += Duration::from_secs(2);
            }
        }
        s.set_nonblocking(false).unwrap();
        started
    });
    // The proxy still serves new requests while those wait out their timeouts.
    std::thread::sleep(Duration::from_secs(10));
    let out = run(curl().args(["-x", &sc.proxy_url(), "http://web/name"]));
    assert_eq!(stdout(&out), "a", "{out:?}");
    // Due 30-31 s after the sidecar started waiting for a head (the coarse timer is only
    // ever late): the lower bound leaves 0.5 s for the sidecar's clock starting a little
    // before the client's, the upper one 3 s for a slow machine.
    for t in [idle, stalled, trickle] {
        let (name, after) = t.join().unwrap();
        assert!(
            after >= Duration::from_millis(29_500) && after <= Duration::from_secs(34),
            "{name}: closed after {after:?}"
        );
    }
}
