//! Shared harness of the end-to-end tests: real sidecar processes, a real upstream
//! server, real client tools. Nothing here mocks the proxy.
#![allow(dead_code)]

pub mod otlp;
#[path = "../../control-plane/tests/support/promtool.rs"]
mod promtool;
#[path = "../../control-plane/tests/support/venv.rs"]
pub mod venv;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// `target/<profile>/`, where cargo puts the workspace binaries.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn binary(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first", p.display());
    p
}

/// A tool the test needs; fails loudly (never skips) when it is missing.
pub fn require_tool(name: &str) -> PathBuf {
    let venv = repo_root().join("target/venv/bin").join(name);
    if venv.exists() {
        return venv;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/sbin"]) {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run scripts/test.sh, which installs the test tools");
}

/// The test virtualenv's python, with grpcio and websockets.
pub use venv::python;

/// Polls `cond` every 20 ms until it holds; panics naming `what` after 10 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after 10s waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// A finished command's standard output, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Runs one case of tests/python/grpc_client.py against `target` with `:authority`
/// `authority`; the JSON line it printed.
pub fn grpc_case(target: &SocketAddr, authority: &str, case: &str) -> serde_json::Value {
    let out = run(Command::new(python()).arg(repo_root().join("tests/python/grpc_client.py")).args([
        "--target",
        &target.to_string(),
        "--case",
        case,
        "--authority",
        authority,
    ]));
    assert!(out.status.success(), "grpc client {case}: {out:?}");
    serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{case}: {e}: {out:?}"))
}

pub fn curl() -> Command {
    let mut c = Command::new(require_tool("curl"));
    c.args(["-sS", "--max-time", "20"]);
    c
}

/// Where a test sidecar's configuration comes from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A static file with this content (`--config`).
    File(&'a str),
    /// The control plane at this gRPC URL (`--control-plane`).
    ControlPlane(&'a str),
}

/// A running `ballast-sidecar run`, killed when dropped.
pub struct Sidecar {
    pub child: Option<Child>,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub config: tempfile::NamedTempFile,
    pub stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts a sidecar on `config_yaml` with fresh loopback ports and waits until ready.
    /// In `extra`, `{outbound}`, `{inbound}` and `{admin}` stand for its own addresses.
    ///
    /// A free port can be taken by another test between `free_port` and the sidecar's
    /// bind (tests run in parallel and open many connections); that one case is retried
    /// with fresh ports, any other start-up failure fails the test.
    pub fn start(config_yaml: &str, extra: &[&str]) -> Sidecar {
        Self::start_from(Source::File(config_yaml), extra, &[])
    }

    /// [`Sidecar::start`] with these environment variables set (`OTEL_*`, say).
    pub fn start_with_env(config_yaml: &str, extra: &[&str], env: &[(&str, &str)]) -> Sidecar {
        Self::start_from(Source::File(config_yaml), extra, env)
    }

    /// Starts a sidecar on the control plane at `grpc` (its configuration is pushed; it is
    /// ready once the first snapshot is applied).
    pub fn start_meshed(grpc: &str, extra: &[&str]) -> Sidecar {
        Self::start_from(Source::ControlPlane(grpc), extra, &[])
    }

    fn start_from(source: Source, extra: &[&str], env: &[(&str, &str)]) -> Sidecar {
        for _ in 0..3 {
            let mut s = Self::spawn_from(source, extra, env);
            if s.ready_within(Duration::from_secs(15)) {
                return s;
            }
            let log = s.log();
            if !log.contains("Address already in use") {
                panic!("sidecar not ready within 15s; log:\n{log}");
            }
            s.signal(libc::SIGKILL);
            let _ = s.wait_exit(Duration::from_secs(5));
        }
        panic!("sidecar could not find free ports in 3 attempts");
    }

    pub fn spawn(config_yaml: &str, extra: &[&str]) -> Sidecar {
        Self::spawn_from(Source::File(config_yaml), extra, &[])
    }

    fn spawn_from(source: Source, extra: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let config_yaml = match source {
            Source::File(yaml) => yaml,
            Source::ControlPlane(_) => "",
        };
        let source_args = match source {
            Source::File(_) => Vec::new(),
            Source::ControlPlane(url) => vec!["--control-plane".to_owned(), url.to_owned()],
        };
        let mut config = tempfile::Builder::new().suffix(".yaml").tempfile().expect("temp config");
        config.write_all(config_yaml.as_bytes()).unwrap();
        config.flush().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("sidecar.log");
        let (o, i, a) = (free_port(), free_port(), free_port());
        let outbound: SocketAddr = format!("127.0.0.1:{o}").parse().unwrap();
        let inbound: SocketAddr = format!("127.0.0.1:{i}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{a}").parse().unwrap();
        let child = Command::new(binary("ballast-sidecar"))
            .arg("run")
            .args(if source_args.is_empty() {
                vec!["--config".to_owned(), config.path().display().to_string()]
            } else {
                source_args
            })
            .args(["--outbound-addr", &outbound.to_string()])
            .args(["--inbound-addr", &inbound.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--egress-dns=false", "--config-poll", "100ms"])
            .args(extra.iter().map(|a| {
                a.replace("{outbound}", &outbound.to_string())
                    .replace("{inbound}", &inbound.to_string())
                    .replace("{admin}", &admin.to_string())
            }))
            .env("BALLAST_LOG", "info,ballast_sidecar=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn ballast-sidecar");
        Sidecar { child: Some(child), outbound, inbound, admin, config, stderr_path, _dir: dir }
    }

    fn ready_within(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(self.admin, "/ready") {
                return true;
            }
            if self.log().contains("Address already in use") {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn wait_ready(&self) {
        if !self.ready_within(Duration::from_secs(15)) {
            panic!("sidecar not ready within 15s; log:\n{}", self.log());
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200);
        body
    }

    /// The value of one series (exact name with labels as printed), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.outbound)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_field("VmHWM").and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// Resident memory now (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        let rss = self.status_field("VmRSS").expect("VmRSS in /proc/PID/status");
        rss.parse().unwrap_or_else(|_| panic!("VmRSS {rss:?} is not a number of KiB"))
    }

    /// The first value of a field of the sidecar's `/proc/PID/status`.
    pub fn status_field(&self, field: &str) -> Option<String> {
        proc_status_field(&self.pid().to_string(), field)
    }
}

/// The first value of a field of `/proc/PID/status` (`self` for this process): `VmRSS`
/// gives `"1234"` (KiB), `THP_enabled` `"1"`.
pub fn proc_status_field(pid: &str, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let prefix = format!("{field}:");
    let line = status.lines().find(|l| l.starts_with(&prefix))?;
    line[prefix.len()..].split_whitespace().next().map(str::to_owned)
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Minimal blocking HTTP/1.1 GET over a fresh connection: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"))
}

pub fn http_request(addr: SocketAddr, raw: &str) -> std::io::Result<(u16, String)> {
    let mut s = StdStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A real HTTP/1.1 + HTTP/2 upstream (hyper), on its own thread and runtime.
///
/// Routes: `/status/N`, `/echo` (streams the request body back), `/headers` (request
/// headers as JSON), `/bytes/N` (N bytes streamed in 64 KiB chunks), `/slow/MS`,
/// `/name`. Every response carries `x-upstream: NAME`; `connections()` counts accepted
/// connections, `requests()` requests.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    fault: Arc<std::sync::Mutex<Fault>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type TestBody = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).boxed()
}

/// Failures an [`Upstream`] injects before routing, changeable while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// This share of requests (0..1) gets a 503 at random.
    Rate503(f64),
    /// Every request gets this status.
    Always(u16),
    /// Every request waits this long (on top of the start delay), then is routed.
    Delay(Duration),
}

impl Upstream {
    pub fn set_fault(&self, f: Fault) {
        *self.fault.lock().unwrap() = f;
    }

    pub fn start(name: &str) -> Upstream {
        Self::start_with_delay(name, Duration::ZERO)
    }

    /// An upstream that waits `delay` before every response.
    pub fn start_with_delay(name: &str, delay: Duration) -> Upstream {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let fault = Arc::new(std::sync::Mutex::new(Fault::None));
        let (c, r, n, fl) = (connections.clone(), requests.clone(), name.to_string(), fault.clone());
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        acc = listener.accept() => {
                            let Ok((stream, _)) = acc else { continue };
                            c.fetch_add(1, Ordering::SeqCst);
                            let (r, n, fl) = (r.clone(), n.clone(), fl.clone());
                            tokio::spawn(async move {
                                let svc = hyper::service::service_fn(move |req| {
                                    r.fetch_add(1, Ordering::SeqCst);
                                    let n = n.clone();
                                    let fault = *fl.lock().unwrap();
                                    async move {
                                        if !delay.is_zero() {
                                            tokio::time::sleep(delay).await;
                                        }
                                        let status = match fault {
                                            Fault::None => None,
                                            Fault::Rate503(p) => (rand::random::<f64>() < p).then_some(503),
                                            Fault::Always(s) => Some(s),
                                            Fault::Delay(d) => {
                                                tokio::time::sleep(d).await;
                                                None
                                            }
                                        };
                                        if let Some(s) = status {
                                            // Read the body first, as a well-behaved server
                                            // does, so the client is not reset mid-upload.
                                            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                                            let mut rsp = Response::new(full(format!("fault {s}\n")));
                                            *rsp.status_mut() = hyper::StatusCode::from_u16(s).unwrap();
                                            rsp.headers_mut().insert("x-upstream", n.parse().unwrap());
                                            return Ok(rsp);
                                        }
                                        upstream_route(n, req).await
                                    }
                                });
                                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    }
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        Upstream {
            addr,
            name: name.into(),
            connections,
            requests,
            fault,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn upstream_route(name: String, req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let head = parts.next().unwrap_or("");
    let arg = parts.next().unwrap_or("");
    let rsp = match head {
        "status" => {
            let code: u16 = arg.parse().unwrap_or(200);
            Response::builder().status(code).body(full(format!("status {code}\n")))
        }
        "echo" => {
            let (parts, body) = req.into_parts();
            let mut b = Response::builder();
            if let Some(ct) = parts.headers.get("content-type") {
                b = b.header("content-type", ct);
            }
            // Streams: never collects, so large bodies stay bounded.
            let stream = http_body_util::BodyStream::new(body);
            let mapped = futures_map(stream);
            b.body(BoxBody::new(StreamBody::new(mapped)))
        }
        "headers" => {
            let mut map = serde_json::Map::new();
            for (k, v) in req.headers() {
                map.insert(
                    k.as_str().to_string(),
                    serde_json::Value::String(v.to_str().unwrap_or("").to_string()),
                );
            }
            map.insert(":version".into(), serde_json::Value::String(format!("{:?}", req.version())));
            map.insert(":uri".into(), serde_json::Value::String(req.uri().to_string()));
            Response::builder()
                .header("content-type", "application/json")
                .header("connection", "x-hop")
                .header("x-hop", "must not reach the client")
                .body(full(serde_json::to_vec(&map).unwrap()))
        }
        "bytes" => {
            let n: u64 = arg.parse().unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_bytes(n, chunk);
            Response::builder().body(BoxBody::new(StreamBody::new(stream)))
        }
        "slow" => {
            let ms: u64 = arg.parse().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::builder().body(full(format!("slept {ms}ms\n")))
        }
        "name" => Response::builder().body(full(name.clone())),
        _ => Response::builder().status(404).body(full("not found\n")),
    };
    let mut rsp = rsp.unwrap();
    rsp.headers_mut().insert("x-upstream", name.parse().unwrap());
    Ok(rsp)
}

/// Maps a body stream into data frames (errors end the stream).
fn futures_map(
    s: http_body_util::BodyStream<Incoming>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    struct S(std::sync::Mutex<http_body_util::BodyStream<Incoming>>);
    impl futures_core::Stream for S {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            let mut inner = self.0.lock().unwrap();
            match futures_core::Stream::poll_next(std::pin::Pin::new(&mut *inner), cx) {
                std::task::Poll::Ready(Some(Ok(f))) => std::task::Poll::Ready(Some(Ok(f))),
                std::task::Poll::Ready(_) => std::task::Poll::Ready(None),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        }
    }
    S(std::sync::Mutex::new(s))
}

fn futures_bytes(
    total: u64,
    chunk: Bytes,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    struct S {
        left: u64,
        chunk: Bytes,
    }
    impl futures_core::Stream for S {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            if self.left == 0 {
                return std::task::Poll::Ready(None);
            }
            let n = self.left.min(self.chunk.len() as u64);
            self.left -= n;
            std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
        }
    }
    S { left: total, chunk }
}

/// A raw TCP server on its own thread: for each accepted connection, runs `handler`.
pub struct RawServer {
    pub addr: SocketAddr,
}

impl RawServer {
    pub fn start(handler: impl Fn(StdStream) + Send + Sync + 'static) -> RawServer {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let handler = Arc::new(handler);
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let h = handler.clone();
                std::thread::spawn(move || h(s));
            }
        });
        RawServer { addr }
    }
}

/// Reads an HTTP/1 request head (up to the blank line).
pub fn read_head(s: &mut StdStream) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") && buf.len() < 65536 {
        match s.read(&mut b) {
            Ok(1) => buf.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).to_string()
}

/// Closes a socket with a TCP RST instead of a FIN.
pub fn reset(s: StdStream) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a valid fd with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
    drop(s);
}

/// A process spawned for a test, killed when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns a Python test peer from tests/python and waits for its `READY <port>` line.
pub fn spawn_python_server(script: &str, port: u16) -> ChildGuard {
    let mut child = Command::new(python())
        .arg(repo_root().join("tests/python").join(script))
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {script}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match out.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => break,
        }
    }
    let line = String::from_utf8_lossy(&line).to_string();
    assert!(line.starts_with("READY"), "{script} did not start: {line:?}");
    ChildGuard(child)
}

/// `promtool check metrics` on an exposition; fails the test on any complaint.
pub fn promtool_check(text: &str) {
    promtool::check(text);
}
