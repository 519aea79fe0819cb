//! The sidecar's life: start-up errors, the admin API, configuration reloads that keep
//! the old policy on bad input, draining on SIGTERM, and metrics that promtool accepts.

mod support;

use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

fn svc(name: &str, up: &Upstream) -> String {
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{{address: \"{}\"}}]\n",
        up.addr
    )
}

#[test]
fn bad_config_fails_at_start_naming_file_line_and_field() {
    let mut sc = Sidecar::spawn(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {name: ok}\nspec: {}\n---\napiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: p}\nspec:\n  targetRef: {service: ok}\n  retries: {attempts: 2, budget: {ratio: 3}}\n",
        &[],
    );
    let code = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(1), "a bad config must stop the sidecar at start");
    let log = sc.log();
    let path = sc.config.path().display().to_string();
    assert!(log.contains(&format!("{path}:6")), "names file and line of the document: {log}");
    assert!(log.contains("spec.retries.budget.ratio"), "names the field: {log}");

    let mut sc = Sidecar::spawn("kind: Service\nspec:\n  endpoints: [{adress: x}]\n", &[]);
    assert_eq!(sc.wait_exit(Duration::from_secs(10)), Some(1));
    let log = sc.log();
    assert!(log.contains(":3:") && log.contains("adress"), "unknown field named with its line: {log}");
}

#[test]
fn port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(Command::new(binary("ballast-sidecar")).args([
        "run",
        "--outbound-addr",
        &addr,
        "--admin-addr",
        "127.0.0.1:0",
        "--inbound-addr",
        "127.0.0.1:0",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("outbound"), "{err}");
}

#[test]
fn admin_api() {
    let up = Upstream::start("up");
    let sc = Sidecar::start(&svc("web", &up), &[]);
    assert_eq!(http_get(sc.admin, "/live").unwrap(), (200, "live\n".into()));
    assert_eq!(http_get(sc.admin, "/ready").unwrap(), (200, "ready\n".into()));
    let (status, body) = http_get(sc.admin, "/config").unwrap();
    assert_eq!(status, 200);
    let cfg: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cfg["version"], 1);
    assert_eq!(cfg["services"][0]["metadata"]["name"], "web");
    assert_eq!(http_get(sc.admin, "/nope").unwrap().0, 404);
    assert_eq!(http_get(sc.admin, "/shutdown").unwrap().0, 405, "shutdown needs POST");
    assert_eq!(sc.metric("ballast_config_version"), 1.0);
    assert_eq!(sc.metric("ballast_control_plane_connected"), 0.0);
}

#[test]
fn admin_shutdown_drains_and_exits_zero() {
    let mut sc = Sidecar::start("", &[]);
    let (status, _) = http_request(
        sc.admin,
        "POST /shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(sc.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn config_reload_applies_good_files_and_keeps_the_old_one_on_bad_ones() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let sc = Sidecar::start(&svc("web", &a), &[]);
    let get = || {
        String::from_utf8_lossy(&run(curl().args(["-x", &sc.proxy_url(), "http://web/name"])).stdout)
            .to_string()
    };
    assert_eq!(get(), "a");
    let write = |text: &str| {
        let mut f = std::fs::File::create(sc.config.path()).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    // A bad file is rejected and counted; traffic keeps flowing with the old config.
    write(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  endpoints: [{address: \"not an address\"}]\n",
    );
    wait_until("the bad config is rejected", || {
        sc.metric(r#"ballast_config_rejected_total{source="file"}"#) >= 1.0
    });
    assert_eq!(get(), "a");
    assert_eq!(sc.metric("ballast_config_version"), 1.0);
    assert!(sc.log().contains("spec.endpoints[0].address"), "the log names the field");
    // A good file is applied, without a restart.
    write(&svc("web", &b));
    wait_until("the good config is applied", || sc.metric("ballast_config_version") >= 2.0);
    assert_eq!(get(), "b");
}

/// In-flight requests finish across SIGTERM, new connections are refused, exit is 0.
#[test]
fn sigterm_drains_in_flight_requests_without_failures() {
    let up = Upstream::start("up");
    let mut sc = Sidecar::start(&svc("web", &up), &["--drain-deadline", "10s"]);
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for _ in 0..20 {
        let (url, results) = (sc.proxy_url(), results.clone());
        threads.push(std::thread::spawn(move || {
            let out = run(curl().args([
                "-x",
                &url,
                "-w",
                "%{http_code}",
                "-o",
                "/dev/null",
                "http://web/slow/1500",
            ]));
            results.lock().unwrap().push(String::from_utf8_lossy(&out.stdout).to_string());
        }));
    }
    // Wait until all 20 requests reached the upstream, then ask the sidecar to stop.
    wait_until("all 20 requests reach the upstream", || up.requests() >= 20);
    sc.signal(libc::SIGTERM);
    wait_until("new connections are refused while draining", || {
        std::net::TcpStream::connect(sc.outbound).is_err()
    });
    let code = sc.wait_exit(Duration::from_secs(15));
    for t in threads {
        t.join().unwrap();
    }
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 20);
    assert!(results.iter().all(|r| r == "200"), "every in-flight request completes: {results:?}");
    assert_eq!(code, Some(0));
}

#[test]
fn drain_deadline_bounds_the_wait() {
    let up = Upstream::start("up");
    let mut sc = Sidecar::start(&svc("web", &up), &["--drain-deadline", "300ms"]);
    let url = sc.proxy_url();
    let t = std::thread::spawn(move || run(curl().args(["-x", &url, "http://web/slow/5000"])));
    wait_until("the request reaches the upstream", || up.requests() >= 1);
    let started = Instant::now();
    sc.signal(libc::SIGTERM);
    assert_eq!(sc.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(started.elapsed() < Duration::from_secs(3), "exited after {:?}", started.elapsed());
    let out = t.join().unwrap();
    assert!(!out.status.success(), "the request cut at the deadline fails rather than hangs");
}

#[test]
fn metrics_pass_promtool() {
    let up = Upstream::start("up");
    // A policy with every mechanism on, so its metrics are present too.
    let policy = "---\napiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: web}\nspec:\n  targetRef: {service: web}\n  retries: {attempts: 1, on: [5xx], backoff: {base: 1ms, max: 2ms}, budget: {ratio: 0, minPerSecond: 0}}\n  circuitBreaker: {consecutiveFailures: 100}\n  outlierDetection: {consecutiveFailures: 100}\n  bulkhead: {maxConcurrent: 10}\n  rateLimit: {requestsPerSecond: 1000}\n";
    let sc = Sidecar::start(&format!("{}{policy}", svc("web", &up)), &[]);
    for path in ["/status/200", "/status/503", "/status/404"] {
        run(curl().args(["-x", &sc.proxy_url(), &format!("http://web{path}")]));
    }
    run(curl().args(["-x", &sc.proxy_url(), &format!("http://{}/name", up.addr)]));
    let text = sc.metrics();
    for name in [
        "ballast_requests_total",
        "ballast_request_duration_seconds_bucket",
        "ballast_tcp_connections_open",
        "ballast_tcp_connections_total",
        "ballast_config_version",
        "ballast_control_plane_connected",
        "ballast_endpoints",
        "ballast_retries_total",
        "ballast_retry_budget_exhausted_total",
        "ballast_circuit_state",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert_eq!(
        metric_value(
            &text,
            r#"ballast_requests_total{direction="outbound",outcome="failure",service="web.default",status_code="503"}"#
        ),
        1.0
    );
    promtool_check(&text);
}

/// A CONNECT tunnel outlives its request: it counts as an open connection and the drain
/// waits for it.
#[test]
fn drain_waits_for_open_tunnels() {
    use std::io::{Read, Write};
    let echo = RawServer::start(|mut s| {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut sc = Sidecar::start("", &["--drain-deadline", "10s"]);
    let mut tunnel = std::net::TcpStream::connect(sc.outbound).unwrap();
    tunnel.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tunnel.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", echo.addr).as_bytes()).unwrap();
    let mut head = [0u8; 19];
    tunnel.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let mut rest = Vec::new();
    let mut b = [0u8; 1];
    while !rest.ends_with(b"\r\n\r\n") {
        tunnel.read_exact(&mut b).unwrap();
        rest.push(b[0]);
    }
    tunnel.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    tunnel.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"ping");
    assert_eq!(
        sc.metric(r#"ballast_tcp_connections_open{direction="outbound"}"#),
        1.0,
        "the tunnel is an open connection"
    );
    sc.signal(libc::SIGTERM);
    assert_eq!(sc.wait_exit(Duration::from_millis(700)), None, "the drain waits for the open tunnel");
    tunnel.write_all(b"still").unwrap();
    let mut still = [0u8; 5];
    tunnel.read_exact(&mut still).unwrap();
    assert_eq!(&still, b"still", "the tunnel keeps working while draining");
    drop(tunnel);
    assert_eq!(sc.wait_exit(Duration::from_secs(5)), Some(0), "exits once the tunnel closed");
}

/// The sidecar turns transparent huge pages off for itself (`PR_SET_THP_DISABLE`), so
/// its RSS stays small on nodes whose THP mode is `always`: the kernel shows the flag in
/// `/proc/PID/status` as `THP_enabled: 0`.
#[test]
fn transparent_huge_pages_are_off_for_the_sidecar() {
    let thp = |pid: &str| {
        proc_status_field(pid, "THP_enabled").expect("THP_enabled in /proc/PID/status (Linux 5.0+)")
    };
    // Otherwise the sidecar's 0 would prove nothing: THP must be on for processes here.
    assert_eq!(thp("self"), "1", "this kernel has transparent huge pages off for every process");
    let up = Upstream::start("up");
    let sc = Sidecar::start(&svc("api", &up), &[]);
    assert_eq!(thp(&sc.pid().to_string()), "0");
}

/// The sidecar's allocator gives memory back on its own (jemalloc with a background
/// thread and a one-second decay, `sidecar/src/main.rs`): once a burst of connections
/// has closed, RSS falls most of the way back without any traffic to trigger it. glibc's
/// malloc kept its high-water mark here (1,000 connections: 27.5 MiB, 25.9 MiB after).
#[test]
fn memory_of_closed_connections_goes_back_to_the_kernel() {
    let up = Upstream::start("up");
    let sc = Sidecar::start(&svc("api", &up), &[]);
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", sc.pid()))
        .expect("list /proc/PID/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect();
    assert!(threads.iter().any(|t| t == "jemalloc_bg_thd"), "no jemalloc background thread: {threads:?}");

    let before = sc.rss_kib();
    // One request at a time, so the sidecar pools a single upstream connection (pooled
    // connections stay for their idle timeout, which is not what this test is about).
    let mut conns = Vec::new();
    for _ in 0..800 {
        let mut s = std::net::TcpStream::connect(sc.outbound).expect("connect to the sidecar");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        s.write_all(b"GET /name HTTP/1.1\r\nHost: api\r\n\r\n").expect("send a request");
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        conns.push(s);
    }
    assert_eq!(up.connections(), 1, "the sidecar reused one upstream connection");
    let busy = sc.rss_kib();
    assert!(busy >= before + 4096, "800 open connections should take MiBs: {before} KiB -> {busy} KiB");
    drop(conns);
    let back = before + (busy - before) / 3;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = sc.rss_kib();
    while now > back && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        now = sc.rss_kib();
    }
    assert!(
        now <= back,
        "RSS {before} KiB idle, {busy} KiB with 800 connections, still {now} KiB 20 s after they closed"
    );
}
