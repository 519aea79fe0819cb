//! `ballastctl demo`: the local mesh on one machine (DESIGN §5).
//!
//! It starts sample services in this process (`catalog` with two healthy replicas, and
//! `payments`, which fails 20% of its requests with a 503 and answers 10% of them after
//! 300 ms), starts a real `ballast-sidecar` process on a static configuration naming them,
//! and sends the same traffic to each service twice: straight to its replicas, and through
//! the sidecar. Every few seconds it prints success rate and latency for both, side by
//! side, and at the end what the sidecar's own metrics counted.
//!
//! Until the control plane exists the sidecar reads a static file. It carries a
//! resilience policy for `payments`: a per-try timeout cuts the slow answers short and
//! retries (within a budget) turn the 503s into successes, which the table shows as the
//! difference between the direct and the mesh rows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long, e.g. 30s (without it, runs until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Requests per second sent to each service on each path (direct and through the mesh).
    #[arg(long, default_value_t = 40)]
    pub rate: u32,
    /// The ballast-sidecar binary (default: next to ballastctl, then on PATH).
    #[arg(long, env = "BALLAST_SIDECAR_BIN")]
    pub sidecar_bin: Option<PathBuf>,
    /// Seconds between reports.
    #[arg(long, default_value_t = 5)]
    pub report_every: u64,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<ballast_api::Duration>().map(|d| d.get()).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "cannot find the ballast-sidecar binary (looked at {0}); build it with `cargo build --bins`, or pass --sidecar-bin"
    )]
    NoSidecar(String),
    #[error("the sidecar did not become ready within 10s; its log is {0}")]
    NotReady(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The policy the demo applies to `payments`.
const PAYMENTS_POLICY: &str = "apiVersion: ballast.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: payments, namespace: demo}
spec:
  targetRef: {service: payments}
  timeouts: {request: 1s, perTry: 100ms}
  retries: {attempts: 3, on: [5xx], backoff: {base: 5ms, max: 50ms}, budget: {ratio: 0.5, minPerSecond: 10}}
";

/// How a sample service behaves.
#[derive(Clone, Copy)]
struct Behaviour {
    fail_ratio: f64,
    slow_ratio: f64,
    slow: Duration,
}

const HEALTHY: Behaviour = Behaviour { fail_ratio: 0.0, slow_ratio: 0.0, slow: Duration::ZERO };
const FLAKY: Behaviour = Behaviour { fail_ratio: 0.2, slow_ratio: 0.1, slow: Duration::from_millis(300) };

async fn spawn_sample(name: &'static str, b: Behaviour) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| async move {
                    let (fail, slow) =
                        (rand::random::<f64>() < b.fail_ratio, rand::random::<f64>() < b.slow_ratio);
                    if slow {
                        tokio::time::sleep(b.slow).await;
                    }
                    let status = if fail { 503 } else { 200 };
                    http::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from(format!("{name}: {status}\n"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn find_sidecar(explicit: Option<PathBuf>) -> Result<PathBuf, DemoError> {
    if let Some(p) = explicit {
        return if p.exists() { Ok(p) } else { Err(DemoError::NoSidecar(p.display().to_string())) };
    }
    let mut looked = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(|p| p.to_path_buf())) {
        let p = dir.join("ballast-sidecar");
        if p.exists() {
            return Ok(p);
        }
        looked.push(p.display().to_string());
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("ballast-sidecar");
        if p.exists() {
            return Ok(p);
        }
    }
    looked.push("$PATH".into());
    Err(DemoError::NoSidecar(looked.join(", ")))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[derive(Default)]
struct Stats {
    ok: u64,
    failed: u64,
    latencies: Vec<f64>,
}

impl Stats {
    fn record(&mut self, ok: bool, secs: f64) {
        if ok {
            self.ok += 1;
        } else {
            self.failed += 1;
        }
        self.latencies.push(secs);
    }
    fn percentile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let mut v = self.latencies.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    }
}

type Table = Arc<Mutex<BTreeMap<(&'static str, &'static str), Stats>>>;

fn print_table(table: &Table, title: &str, elapsed: Duration) {
    let t = table.lock().unwrap_or_else(|p| p.into_inner());
    println!("\n== {title} ({:.0}s) ==", elapsed.as_secs_f64());
    println!(
        "{:<10} {:<8} {:>9} {:>9} {:>9} {:>9}",
        "service", "path", "requests", "success", "p50 ms", "p99 ms"
    );
    for ((svc, path), s) in t.iter() {
        let n = s.ok + s.failed;
        let rate = if n == 0 { 0.0 } else { 100.0 * s.ok as f64 / n as f64 };
        println!(
            "{svc:<10} {path:<8} {n:>9} {:>8.1}% {:>9.1} {:>9.1}",
            rate,
            s.percentile(0.5) * 1e3,
            s.percentile(0.99) * 1e3
        );
    }
}

pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let sidecar_bin = find_sidecar(args.sidecar_bin)?;
    let catalog = [spawn_sample("catalog-1", HEALTHY).await?, spawn_sample("catalog-2", HEALTHY).await?];
    let payments = spawn_sample("payments-1", FLAKY).await?;

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: catalog, namespace: demo}}\nspec:\n  ports: [{{port: 80, protocol: http}}]\n  endpoints: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n---\napiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: payments, namespace: demo}}\nspec:\n  ports: [{{port: 80, protocol: http}}]\n  endpoints: [{{address: \"{}\"}}]\n---\n{PAYMENTS_POLICY}",
            catalog[0], catalog[1], payments
        ),
    )?;
    let (outbound, admin) =
        (SocketAddr::from(([127, 0, 0, 1], free_port()?)), SocketAddr::from(([127, 0, 0, 1], free_port()?)));
    let log_path = dir.path().join("sidecar.log");
    let mut sidecar = tokio::process::Command::new(&sidecar_bin)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--namespace", "demo", "--egress-dns=false"])
        .args(["--outbound-addr", &outbound.to_string(), "--admin-addr", &admin.to_string()])
        .args(["--inbound-addr", &format!("127.0.0.1:{}", free_port()?)])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .kill_on_drop(true)
        .spawn()?;
    let ready_deadline = Instant::now() + Duration::from_secs(10);
    while admin_get(admin, "/ready").await.map(|(s, _)| s) != Some(200) {
        if Instant::now() > ready_deadline {
            return Err(DemoError::NotReady(log_path.display().to_string()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "Ballast demo: sidecar {} (pid {:?}) on {outbound}, admin http://{admin}",
        sidecar_bin.display(),
        sidecar.id()
    );
    println!("  catalog  = 2 healthy replicas {} {}", catalog[0], catalog[1]);
    println!(
        "  payments = 1 replica {payments} that fails 20% of requests (503) and is slow (300 ms) for 10%"
    );
    println!(
        "Each service gets {} req/s straight to its replicas ('direct') and the same through the sidecar ('mesh').",
        args.rate
    );
    println!("The mesh applies this policy to payments:\n{PAYMENTS_POLICY}");

    let direct: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mesh: Client<_, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(tower::service_fn(move |_uri: http::Uri| {
            Box::pin(async move { TcpStream::connect(outbound).await.map(TokioIo::new) })
        }));
    let table: Table = Arc::default();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    let mut report = tokio::time::interval(Duration::from_secs(args.report_every.max(1)));
    report.tick().await;
    let stop = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(stop);
    let mut n: usize = 0;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = report.tick() => print_table(&table, "so far", started.elapsed()),
            _ = tick.tick() => {
                n += 1;
                let targets: [(&'static str, &'static str, String, bool); 4] = [
                    ("catalog", "direct", format!("http://{}/items", catalog[n % 2]), false),
                    ("catalog", "mesh", "http://catalog/items".to_string(), true),
                    ("payments", "direct", format!("http://{payments}/charge"), false),
                    ("payments", "mesh", "http://payments/charge".to_string(), true),
                ];
                for (svc, path, url, via_mesh) in targets {
                    let (direct, mesh, table) = (direct.clone(), mesh.clone(), table.clone());
                    tokio::spawn(async move {
                        let Ok(uri) = url.parse::<http::Uri>() else { return };
                        let t = Instant::now();
                        let fut = if via_mesh { mesh.get(uri) } else { direct.get(uri) };
                        let ok = match tokio::time::timeout(Duration::from_secs(2), fut).await {
                            Ok(Ok(rsp)) => {
                                let ok = rsp.status().is_success();
                                let _ = rsp.into_body().collect().await;
                                ok
                            }
                            _ => false,
                        };
                        table.lock().unwrap_or_else(|p| p.into_inner()).entry((svc, path)).or_default().record(ok, t.elapsed().as_secs_f64());
                    });
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    print_table(&table, "final", started.elapsed());
    if let Some((_, metrics)) = admin_get(admin, "/metrics").await {
        println!("\nWhat the sidecar counted (ballast_requests_total):");
        for line in metrics.lines().filter(|l| l.starts_with("ballast_requests_total")) {
            println!("  {line}");
        }
    }
    let _ = admin_post(admin, "/shutdown").await;
    let _ = tokio::time::timeout(Duration::from_secs(5), sidecar.wait()).await;
    println!("\nDemo finished.");
    Ok(())
}

async fn admin_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    admin_call(admin, http::Method::GET, path).await
}

async fn admin_post(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    admin_call(admin, http::Method::POST, path).await
}

async fn admin_call(admin: SocketAddr, method: http::Method, path: &str) -> Option<(u16, String)> {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .body(Empty::new())
        .ok()?;
    let rsp = tokio::time::timeout(Duration::from_secs(2), client.request(req)).await.ok()?.ok()?;
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}
