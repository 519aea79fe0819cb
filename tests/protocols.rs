//! HTTP/2, gRPC, WebSocket, opaque TCP and TLS through the sidecar, each with a real
//! client and server: h2load and nghttpd (nghttp2), Python grpcio, Python websockets.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn service(name: &str, addr: &str, protocol: Option<&str>) -> String {
    let port = match protocol {
        Some(p) => format!("  ports: [{{port: 80, protocol: {p}}}]\n"),
        None => String::new(),
    };
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{port}  endpoints: [{{address: \"{addr}\"}}]\n"
    )
}

/// Runs h2load and returns (succeeded, failed) from its summary line.
fn h2load(args: &[&str]) -> (u64, u64, String) {
    let out = run(Command::new(require_tool("h2load")).args(args));
    let text = stdout(&out);
    let line = text.lines().find(|l| l.starts_with("requests:")).unwrap_or_else(|| panic!("h2load: {out:?}"));
    let num = |word: &str| -> u64 {
        line.split(',')
            .find(|p| p.trim().ends_with(word))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (num("succeeded"), num("failed") + num("errored"), text)
}

#[test]
fn http2_prior_knowledge_to_nghttpd_is_multiplexed() {
    let docroot = tempfile::tempdir().unwrap();
    std::fs::write(docroot.path().join("1k.bin"), vec![7u8; 1024]).unwrap();
    let port = free_port();
    let _nghttpd = ChildGuard(
        Command::new(require_tool("nghttpd"))
            .args(["--no-tls", "-a", "127.0.0.1", "-d"])
            .arg(docroot.path())
            .arg(port.to_string())
            .spawn()
            .expect("nghttpd"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nghttpd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sc = Sidecar::start(&service("files", &format!("127.0.0.1:{port}"), Some("http2")), &[]);
    let url = format!("http://{}/1k.bin", sc.outbound);
    let (ok, failed, text) = h2load(&["-n", "2000", "-c", "8", "-m", "16", "-H", ":authority: files", &url]);
    assert_eq!((ok, failed), (2000, 0), "{text}");
    assert!(text.contains("2000 2xx"), "{text}");
    // An HTTP/1.1 client reaches the same HTTP/2 upstream (the port is declared http2).
    let out = run(curl().args([
        "-x",
        &sc.proxy_url(),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        "http://files/1k.bin",
    ]));
    assert_eq!(stdout(&out), "200 1024");
    assert_eq!(
        sc.metric(r#"ballast_requests_total{direction="outbound",outcome="success",service="files.default",status_code="200"}"#),
        2001.0
    );
}

#[test]
fn http2_upstream_connections_are_multiplexed() {
    let up = Upstream::start("h2");
    let sc = Sidecar::start(&service("h2svc", &up.addr.to_string(), Some("http2")), &[]);
    let url = format!("http://{}/name", sc.outbound);
    // 8 downstream connections, 400 requests with up to 16 in flight on each.
    let (ok, failed, text) = h2load(&["-n", "400", "-c", "8", "-m", "16", "-H", ":authority: h2svc", &url]);
    assert_eq!((ok, failed), (400, 0), "{text}");
    assert_eq!(up.requests(), 400);
    assert!(up.connections() <= 2, "HTTP/2 upstream used {} connections for 400 requests", up.connections());
}

#[test]
fn grpc_unary_streaming_health_and_error_status_with_trailers() {
    let port = free_port();
    let _server = spawn_python_server("grpc_server.py", port);
    let sc = Sidecar::start(&service("greeter", &format!("127.0.0.1:{port}"), Some("grpc")), &[]);
    let unary = grpc_case(&sc.outbound, "greeter", "unary");
    assert_eq!(unary["code"], "OK", "{unary}");
    assert_eq!(unary["response"], "echo:hello");
    assert_eq!(unary["trailing_metadata"]["x-trailer"], "unary", "trailers cross the proxy");
    let stream = grpc_case(&sc.outbound, "greeter", "stream");
    assert_eq!((stream["code"].as_str(), stream["count"].as_u64()), (Some("OK"), Some(100)), "{stream}");
    assert_eq!(stream["last"], "msg-99");
    assert_eq!(stream["trailing_metadata"]["x-trailer"], "stream");
    let health = grpc_case(&sc.outbound, "greeter", "health");
    assert_eq!(health["status"], "SERVING", "{health}");
    let unknown = grpc_case(&sc.outbound, "greeter", "health-unknown");
    assert_eq!(unknown["code"], "NOT_FOUND", "{unknown}");
    // The error status travels in trailers after headers; it reaches the client intact.
    let fail = grpc_case(&sc.outbound, "greeter", "fail");
    assert_eq!(fail["code"], "PERMISSION_DENIED", "{fail}");
    assert_eq!(fail["details"], "denied by test");
    assert_eq!(fail["initial_metadata"]["x-initial"], "sent");
    assert_eq!(fail["trailing_metadata"]["x-reason"], "test");
    let m = sc.metrics();
    assert!(
        metric_value(
            &m,
            r#"ballast_requests_total{direction="outbound",outcome="success",service="greeter.default",status_code="200"}"#
        ) >= 5.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, r#"ballast_tcp_connections_total{direction="outbound",protocol="http2"}"#),
        5.0
    );
}

#[test]
fn grpc_to_a_service_without_endpoints_is_a_trailers_only_unavailable() {
    let sc = Sidecar::start(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {name: greeter}\nspec:\n  ports: [{port: 80, protocol: grpc}]\n",
        &[],
    );
    let v = grpc_case(&sc.outbound, "greeter", "unary");
    assert_eq!(v["code"], "UNAVAILABLE", "{v}");
    assert!(v["details"].as_str().unwrap_or("").contains("no-endpoints"), "{v}");
}

#[test]
fn websocket_upgrade_through_outbound_and_inbound() {
    let port = free_port();
    let _server = spawn_python_server("ws_echo_server.py", port);
    let app = format!("127.0.0.1:{port}");
    let sc = Sidecar::start(&service("chat", &app, None), &["--app-addr", &app]);
    for (connect, url) in [
        (sc.outbound.to_string(), "ws://chat/room/1".to_string()),
        (sc.inbound.to_string(), format!("ws://{app}/inbound")),
    ] {
        let out = run(Command::new(python()).arg(repo_root().join("tests/python/ws_client.py")).args([
            "--connect",
            &connect,
            "--url",
            &url,
        ]));
        let v: serde_json::Value =
            serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        assert_eq!(v["ok"], true, "{url}: {v}");
        assert_eq!(v["text_echoed"], 20);
        assert_eq!(v["binary_echoed"], 5, "including a 1 MiB binary message");
        assert_eq!(v["server_header"], "ballast-test");
    }
    let m = sc.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"ballast_requests_total{direction="outbound",outcome="success",service="chat.default",status_code="101"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            r#"ballast_requests_total{direction="inbound",outcome="success",service="app",status_code="101"}"#
        ),
        1.0,
        "{m}"
    );
}

#[test]
fn opaque_tcp_and_tls_bytes_pass_untouched() {
    let echo = RawServer::start(|mut s| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let sc = Sidecar::start("", &["--app-addr", &echo.addr.to_string()]);
    // A TLS ClientHello-looking record and a binary protocol, via the inbound side
    // (no iptables here, so it goes to --app-addr).
    let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x30];
    hello.extend((0..0x30u8).map(|i| i.wrapping_mul(7)));
    for payload in [hello, b"\x00\x01binary\xffprotocol\r\n".to_vec(), b"SET key value\r\n".to_vec()] {
        let mut s = TcpStream::connect(sc.inbound).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&payload).unwrap();
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, payload);
    }
    let m = sc.metrics();
    assert_eq!(
        metric_value(&m, r#"ballast_tcp_connections_total{direction="inbound",protocol="tls"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, r#"ballast_tcp_connections_total{direction="inbound",protocol="opaque"}"#),
        2.0,
        "{m}"
    );
}

#[test]
fn server_speaks_first_protocols_work_after_the_detect_timeout() {
    let banner = RawServer::start(|mut s| {
        let _ = s.write_all(b"220 smtp.example ESMTP ready\r\n");
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf) {
            let _ = s.write_all(&buf[..n]);
        }
    });
    let sc = Sidecar::start("", &["--app-addr", &banner.addr.to_string(), "--detect-timeout", "200ms"]);
    let started = Instant::now();
    let mut s = TcpStream::connect(sc.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 30];
    s.read_exact(&mut buf).expect("banner arrives although the client sent nothing");
    assert_eq!(&buf, b"220 smtp.example ESMTP ready\r\n");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    s.write_all(b"EHLO me\r\n").unwrap();
    let mut echo = [0u8; 9];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"EHLO me\r\n");
    assert_eq!(sc.metric(r#"ballast_protocol_detect_timeouts_total{direction="inbound"}"#), 1.0);
}
