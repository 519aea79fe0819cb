//! How fast the control plane converges a mesh, and what it costs, on a real etcd.
//!
//! One `ballast-control-plane` process on one etcd member (both on loopback), and in
//! this process 1,000 simulated sidecars ([`ballast_control_plane::sim`]: the push
//! stream's client, acking each version as soon as it is decoded), spread over 10
//! namespaces. The store holds 100 services of 100 static endpoints each (10,000
//! endpoints), one more service every sidecar calls, and the sidecars' own 1,000
//! registrations.
//!
//! Measured, each change repeated and reported as p50/p99 over the repeats:
//! * **policy, one namespace**: `ballastctl apply` of a changed policy for a service that
//!   the 100 sidecars of its namespace call; time from sending the apply to the last of
//!   them receiving the new version (the ack follows in the same task, within
//!   microseconds), and from sending it to `apply --wait`'s answer, which also includes
//!   the acks' round trip through etcd (proxy statuses);
//! * **policy, every sidecar**: the same for the service all 1,000 call;
//! * **endpoint registered**: a new sidecar connects for a service; time from its connect
//!   to the last of the 100 sidecars of its namespace seeing the endpoint.
//!
//! And the control plane's resident memory and CPU time with all of it loaded, from
//! `/proc`. On this 2-core machine the control plane, etcd and the 1,000 simulated
//! sidecars share the cores, so the figures are upper bounds.
//!
//! `cargo bench --bench convergence` (the full run, release build) prints the tables and
//! writes `target/bench/convergence.json`; `cargo test --benches` runs a small smoke pass.

#[path = "../control-plane/tests/support/etcd.rs"]
#[allow(dead_code)]
mod etcd;
#[path = "mesh/report.rs"]
#[allow(dead_code)]
mod report;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_control_plane::ctl::Api;
use ballast_control_plane::sim::{SimSidecar, hello};
use ballast_control_plane::store::Store;
use http::Method;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy)]
struct Scale {
    namespaces: usize,
    services_per_namespace: usize,
    endpoints_per_service: usize,
    sidecars_per_namespace: usize,
    repeats: usize,
}

const FULL: Scale = Scale {
    namespaces: 10,
    services_per_namespace: 10,
    endpoints_per_service: 100,
    sidecars_per_namespace: 100,
    repeats: 30,
};
const SMOKE: Scale = Scale {
    namespaces: 2,
    services_per_namespace: 3,
    endpoints_per_service: 5,
    sidecars_per_namespace: 5,
    repeats: 3,
};
/// Streams per HTTP/2 connection (so 1,000 sidecars need 20 connections, not 1,000).
const STREAMS_PER_CONNECTION: usize = 50;
/// The longest any one change may take before the run fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(20);

/// What one simulated sidecar received: the versions and when.
#[derive(Default)]
struct Received {
    latest: AtomicU64,
    log: Mutex<Vec<(u64, Instant)>>,
}

impl Received {
    fn first_at_least(&self, version: u64) -> Option<Instant> {
        self.log.lock().ok()?.iter().find(|(v, _)| *v >= version).map(|(_, t)| *t)
    }
}

struct Sim {
    namespace: usize,
    received: Arc<Received>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; `cargo test --benches` does not.
    let smoke = !args.iter().any(|a| a == "--bench");
    let scale = if smoke { SMOKE } else { FULL };
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    if let Err(e) = rt.block_on(run(scale, smoke)) {
        eprintln!("convergence benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn control_plane_binary(smoke: bool) -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("BALLAST_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "ballast-control-plane", "--bin", "ballast-control-plane"]);
    if !smoke {
        cmd.arg("--release");
    }
    if !cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?.success() {
        return Err("building ballast-control-plane failed".into());
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| format!("{}/target", env!("CARGO_MANIFEST_DIR")));
    Ok(PathBuf::from(target).join(if smoke { "debug" } else { "release" }).join("ballast-control-plane"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(0, |a| a.port())
}

/// The control-plane process, killed on drop.
struct Cp(Child);

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident memory (KiB) and CPU seconds of a process, from /proc.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (rss, (ticks(11) + ticks(12)) / hz.max(1.0))
}

fn service_yaml(ns: &str, name: &str, endpoints: usize, seed: usize) -> String {
    let mut y = format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{{port: 80}}]\n  endpoints:\n"
    );
    for e in 0..endpoints {
        let _ = writeln!(y, "  - address: \"10.{}.{}.{}:8080\"", seed % 250, e / 250, e % 250);
    }
    y
}

fn policy_yaml(ns: &str, target: &str, request_ms: usize) -> String {
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {target}, namespace: {ns}}}\nspec:\n  targetRef: {{service: {target}}}\n  timeouts: {{request: {request_ms}ms}}\n  retries: {{attempts: 2}}\n"
    )
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Default, serde::Serialize)]
struct Series {
    /// Per change: to the last sidecar (ms).
    last_ms: Vec<f64>,
    /// Per change and sidecar (ms).
    each_ms: Vec<f64>,
    /// Per change: to `apply --wait`'s answer (ms), where measured.
    wait_ms: Vec<f64>,
}

impl Series {
    fn row(&self, name: &str, sidecars: usize) -> Vec<String> {
        let p = |v: &[f64], q| {
            let mut s = v.to_vec();
            s.sort_by(f64::total_cmp);
            let x = percentile(&s, q);
            if x.is_nan() { "-".to_owned() } else { format!("{x:.1}") }
        };
        vec![
            name.to_owned(),
            sidecars.to_string(),
            self.last_ms.len().to_string(),
            p(&self.last_ms, 0.5),
            p(&self.last_ms, 0.99),
            p(&self.each_ms, 0.5),
            p(&self.each_ms, 0.99),
            p(&self.wait_ms, 0.5),
            p(&self.wait_ms, 0.99),
        ]
    }
}

async fn run(scale: Scale, smoke: bool) -> Result<(), String> {
    let bin = control_plane_binary(smoke)?;
    let etcd = etcd::EtcdServer::start();
    let (grpc, admin): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().map_err(|e| format!("{e}"))?,
        format!("127.0.0.1:{}", free_port()).parse().map_err(|e| format!("{e}"))?,
    );
    let child = Command::new(&bin)
        .args([
            "--etcd",
            &etcd.endpoint(),
            "--grpc-addr",
            &grpc.to_string(),
            "--admin-addr",
            &admin.to_string(),
        ])
        .args(["--replica", "bench"])
        .env("BALLAST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let cp = Cp(child);
    let pid = cp.0.id();
    let api = Api::new(&format!("http://{admin}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.call(Method::GET, "/api/v1/policies", None).await.is_err() {
        if Instant::now() > deadline {
            return Err("the control plane did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rss_empty, _) = usage(pid);

    // The mesh: per namespace, services of static endpoints; one shared service.
    let ns = |i: usize| format!("ns-{i}");
    let svc = |j: usize| format!("svc-{j}");
    for i in 0..scale.namespaces {
        let docs: Vec<String> = (0..scale.services_per_namespace)
            .map(|j| service_yaml(&ns(i), &svc(j), scale.endpoints_per_service, i * 100 + j))
            .collect();
        api.call(Method::POST, "/api/v1/apply", Some(docs.join("---\n").into()))
            .await
            .map_err(|e| e.to_string())?;
    }
    api.call(Method::POST, "/api/v1/apply", Some(service_yaml("shared", "common", 10, 999).into()))
        .await
        .map_err(|e| e.to_string())?;
    let endpoints = scale.namespaces * scale.services_per_namespace * scale.endpoints_per_service;

    // The sidecars.
    let total = scale.namespaces * scale.sidecars_per_namespace;
    let url = format!("http://{grpc}");
    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..total.div_ceil(STREAMS_PER_CONNECTION) {
        let ch = Endpoint::from_shared(url.clone())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        channels.push(ch);
    }
    let started = Instant::now();
    let mut sims = Vec::new();
    for k in 0..total {
        let namespace = k % scale.namespaces;
        let service = svc(k / scale.namespaces % scale.services_per_namespace);
        let address = format!("10.200.{}.{}:4143", k / 250, k % 250);
        let mut h = hello(&format!("sim-{k}"), &ns(namespace), Some((&service, &address)));
        h.calls = (0..scale.services_per_namespace)
            .map(|j| format!("{}.{}", svc(j), ns(namespace)))
            .chain(["common.shared".to_owned()])
            .collect();
        let received = Arc::new(Received::default());
        let mut sim = SimSidecar::on(channels[k / STREAMS_PER_CONNECTION].clone(), h)
            .await
            .map_err(|e| format!("sim {k}: {e}"))?;
        let r = received.clone();
        tokio::spawn(async move {
            while let Ok(m) = sim.next(Duration::from_secs(3600)).await {
                let now = Instant::now();
                if let Ok(mut log) = r.log.lock() {
                    log.push((m.version, now));
                }
                r.latest.fetch_max(m.version, Ordering::Release);
                if sim.ack(m.version).await.is_err() {
                    return;
                }
            }
        });
        sims.push(Sim { namespace, received });
    }
    // Everyone has a first snapshot, then every status is recorded.
    wait_for(&sims, |_| true, 1).await?;
    let snapshots = started.elapsed();
    let deadline = Instant::now() + CHANGE_TIMEOUT * 3;
    loop {
        let v = api.call(Method::GET, "/api/v1/proxies", None).await.map_err(|e| e.to_string())?;
        let synced = v.as_array().map_or(0, |a| a.iter().filter(|p| p["state"] == "SYNCED").count());
        if synced == total {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {synced} of {total} proxies SYNCED"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_synced = started.elapsed();
    let settle = if smoke { Duration::from_millis(200) } else { Duration::from_secs(2) };
    tokio::time::sleep(settle).await;
    let (rss_loaded, cpu_loaded) = usage(pid);

    // Changes.
    let mut series: BTreeMap<&str, Series> = BTreeMap::new();
    let store = Store::etcd(&[etcd.endpoint()]).await.map_err(|e| e.to_string())?;
    let cpu_before = usage(pid).1;
    for rep in 0..scale.repeats {
        // A policy one namespace calls, applied with --wait.
        let target_ns = rep % scale.namespaces;
        let yaml = policy_yaml(&ns(target_ns), &svc(0), 1000 + rep);
        let t0 = Instant::now();
        let applied =
            api.call(Method::POST, "/api/v1/apply", Some(yaml.into())).await.map_err(|e| e.to_string())?;
        let revision = applied["revision"].as_u64().unwrap_or(0);
        let req = serde_json::json!({
            "revision": revision, "services": applied["services"], "timeoutMs": CHANGE_TIMEOUT.as_millis() as u64,
        });
        api.call(Method::POST, "/api/v1/wait", Some(req.to_string().into()))
            .await
            .map_err(|e| e.to_string())?;
        let waited = t0.elapsed();
        let s = series.entry("policy, one namespace").or_default();
        record(s, &sims, |s| s.namespace == target_ns, revision, t0).await?;
        s.wait_ms.push(waited.as_secs_f64() * 1e3);

        // The service every sidecar calls.
        let yaml = policy_yaml("shared", "common", 1000 + rep);
        let t0 = Instant::now();
        let applied =
            api.call(Method::POST, "/api/v1/apply", Some(yaml.into())).await.map_err(|e| e.to_string())?;
        let revision = applied["revision"].as_u64().unwrap_or(0);
        let s = series.entry("policy, every sidecar").or_default();
        record(s, &sims, |_| true, revision, t0).await?;

        // A new sidecar registers for a service of one namespace.
        let target_ns = (rep + 1) % scale.namespaces;
        let address = format!("10.201.0.{}:4143", rep % 250);
        let key = format!("/ballast/endpoints/{}/{}/{address}", ns(target_ns), svc(1));
        let t0 = Instant::now();
        let mut newcomer = SimSidecar::on(
            channels[0].clone(),
            hello(&format!("new-{rep}"), &ns(target_ns), Some((&svc(1), &address))),
        )
        .await
        .map_err(|e| e.to_string())?;
        let revision = loop {
            if let Ok((Some(kv), _)) = store.get(&key).await {
                break kv.mod_revision as u64;
            }
            if t0.elapsed() > CHANGE_TIMEOUT {
                return Err(format!("{key} never registered"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let first = newcomer.next(CHANGE_TIMEOUT).await.map_err(|e| e.to_string())?;
        newcomer.ack(first.version).await.map_err(|e| e.to_string())?;
        let s = series.entry("endpoint registered").or_default();
        record(s, &sims, |s| s.namespace == target_ns, revision, t0).await?;
        drop(newcomer);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rss_after, cpu_after) = usage(pid);
    let cpu_per_change = (cpu_after - cpu_before) / (scale.repeats * 3) as f64;

    let header = [
        "change",
        "sidecars",
        "n",
        "last p50 ms",
        "last p99 ms",
        "each p50 ms",
        "each p99 ms",
        "--wait p50 ms",
        "--wait p99 ms",
    ];
    let reached = |name: &str| match name {
        "policy, every sidecar" => total,
        _ => scale.sidecars_per_namespace,
    };
    let rows: Vec<Vec<String>> = series.iter().map(|(k, s)| s.row(k, reached(k))).collect();
    println!(
        "\nConvergence: {total} simulated sidecars, {endpoints} static endpoints + {total} registered, one control plane on one etcd member\n"
    );
    println!("{}", report::table(&header, &rows));
    println!(
        "Initial: every sidecar had its snapshot {:.2} s after the first connected, every status SYNCED after {:.2} s",
        snapshots.as_secs_f64(),
        all_synced.as_secs_f64()
    );
    println!(
        "Control plane: RSS {:.1} MiB empty, {:.1} MiB loaded ({:.1} MiB after the changes); CPU {:.2} s to load, {:.1} ms per change",
        rss_empty as f64 / 1024.0,
        rss_loaded as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        cpu_loaded,
        cpu_per_change * 1e3
    );
    let json = serde_json::json!({
        "scale": {"sidecars": total, "endpoints": endpoints, "namespaces": scale.namespaces, "repeats": scale.repeats},
        "series": series,
        "initial_snapshots_s": snapshots.as_secs_f64(),
        "initial_all_synced_s": all_synced.as_secs_f64(),
        "rss_kib": {"empty": rss_empty, "loaded": rss_loaded, "after": rss_after},
        "cpu_s": {"load": cpu_loaded, "per_change": cpu_per_change},
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(if smoke { "convergence-smoke.json" } else { "convergence.json" });
    std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap_or_default()).map_err(|e| e.to_string())?;
    println!("written to {}", path.display());
    drop(cp);
    drop(etcd);
    Ok(())
}

/// Waits until every sim chosen by `which` has a version at least `version`.
async fn wait_for(sims: &[Sim], which: impl Fn(&Sim) -> bool, version: u64) -> Result<(), String> {
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    loop {
        let behind = sims
            .iter()
            .filter(|s| which(s))
            .filter(|s| s.received.latest.load(Ordering::Acquire) < version)
            .count();
        if behind == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{behind} sidecars never received version {version}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits for the change at `version` made at `t0` and records its timings.
async fn record(
    s: &mut Series,
    sims: &[Sim],
    which: impl Fn(&Sim) -> bool + Copy,
    version: u64,
    t0: Instant,
) -> Result<(), String> {
    wait_for(sims, which, version).await?;
    let mut last: f64 = 0.0;
    for sim in sims.iter().filter(|s| which(s)) {
        if let Some(at) = sim.received.first_at_least(version) {
            let ms = at.saturating_duration_since(t0).as_secs_f64() * 1e3;
            s.each_ms.push(ms);
            last = last.max(ms);
        }
    }
    s.last_ms.push(last);
    Ok(())
}
