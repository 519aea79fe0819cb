//! `ballastctl demo`: the local mesh on one machine (DESIGN §5), with nothing installed
//! but the two binaries.
//!
//! What runs:
//! * a control plane in this process, on the embedded store, serving the push stream
//!   and the admin API on loopback ports; with workload identity on (the default, off
//!   with `--no-mtls`), both over TLS, with a CA generated into the store, the admin API
//!   behind a random admin token, and `Identity/Certify` next to the push stream;
//! * sample services, also in this process: `catalog`, two healthy replicas, and
//!   `payments`, two replicas that each fail 20% of requests with a 503 and answer 10%
//!   after 300 ms;
//! * one real `ballast-sidecar` process per replica, started with `--control-plane` and
//!   `--service`, so the control plane registers it as an endpoint of its service, and
//!   one for the demo's own traffic (`client`, no `--service`). With identity each runs
//!   as a service account (`catalog`, `payments`, `client`: one per service, as a
//!   Deployment's pods share theirs) with a bootstrap token of its own, as a sidecar
//!   outside Kubernetes joins a mesh; it is ready once it holds its certificate, and the
//!   control plane registers its endpoint as meshed, so that the client sidecar calls
//!   the replicas' sidecars over mutual TLS;
//! * policies applied through the admin API, as `ballastctl apply --wait` does: for
//!   `payments` a per-try timeout, retries with a budget and a circuit breaker that
//!   opens only on a failure rate of 50%; for `catalog` a circuit breaker that opens
//!   after 5 failures in a row.
//!
//! The same traffic goes to each service twice: straight to its replicas in turn
//! ("direct") and through the client sidecar by name ("mesh"). Every `--report-every`
//! seconds a table shows success rate and latency of both. For `payments` the mesh row is
//! the point: the per-try timeout cuts the slow answers short and the retries turn most
//! 503s into successes (the sidecar cannot help a request all of whose tries fail, nor
//! one the budget refuses to retry).
//!
//! Partway through (at a third of `--duration`, for a quarter of it, 1 to 5 s; without
//! `--duration`, at 10 s and every 30 s after, for 5 s) both `catalog` replicas answer
//! every request with 503. The demo polls the client sidecar's `/metrics` and prints its
//! breaker for `catalog` opening (`ballast_circuit_state`), the requests it answers itself
//! meanwhile (`ballast_rejections_total{reason="circuit-open"}`), and the breaker closing
//! once a probe succeeds after the outage. The mesh does not make those requests succeed:
//! both rows fail during the outage, and the mesh row a little longer, until the first
//! probe after it. What the breaker changes is where they fail: in the caller's sidecar,
//! at once, without loading `catalog` while it is down, which the demo shows by counting
//! the requests each path delivered to the replicas meanwhile.
//!
//! What identity changes is shown from both ends: at start, each sidecar's SPIFFE ID as
//! the control plane recorded it and the certificate the sidecar holds; with every
//! report, the share of the requests the services' sidecars received over mutual TLS
//! and who called whom, as they verified it (`ballast_inbound_requests_by_peer_total`).
//! At three quarters of the run (without `--duration`, at 25 s) `payments` is locked
//! down (`inbound: {mtls: strict, allow: [demo/client]}`): a plain-text caller and
//! catalog's sidecar, a mesh workload with a certificate but not on the list, get 403
//! `ballast-rejected: forbidden`, while the client's traffic goes on. The "direct" path
//! is not affected: it reaches the apps without a sidecar, as the demo's baseline.
//!
//! Stopping (after `--duration`, or on Ctrl-C or SIGTERM) sends SIGTERM to every sidecar
//! and waits for it (SIGKILL after 5 s), then stops the control plane. The sidecars run
//! in their own process group, so a Ctrl-C in the terminal reaches only the demo, which
//! prints its last report and then stops them; a guard does the same if the demo returns
//! early or panics; and on Linux the kernel sends them SIGTERM if the demo is killed
//! outright (`PR_SET_PDEATHSIG`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_api::identity::Identity;
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::ctl::{self, Api, ApplyArgs, CtlError, Kind, Output};
use crate::identity::IdentityOptions;
use crate::identity::tokens::TokenError;
use crate::keys::Keys;
use crate::server::{ControlPlane, Options, ServeError};
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long, e.g. 30s (without it, runs until Ctrl-C).
    #[arg(long, value_parser = ballast_api::duration::parse_flag)]
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
    /// Run in plain text, without workload identity or mutual TLS.
    ///
    /// By default the demo's control plane has a CA (generated, in its in-memory store)
    /// and serves TLS; each sidecar proves its service account (catalog, payments,
    /// client) with a bootstrap token, gets a certificate, and the sidecars call each
    /// other over mutual TLS; partway through, payments is locked down to mutual TLS from
    /// the client only. With --no-mtls: no CA, no certificates, plain text between the
    /// sidecars and to the control plane, and no lockdown.
    #[arg(long)]
    pub no_mtls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "cannot find the ballast-sidecar binary (looked at {0}); build it with `cargo build --bins`, or pass --sidecar-bin"
    )]
    NoSidecar(String),
    #[error("{what} did not become ready within {READY_WITHIN:?}; the end of its log:\n{log}")]
    NotReady { what: String, log: String },
    #[error("the mesh did not settle within {READY_WITHIN:?}: {0}")]
    NotSettled(String),
    #[error("cannot start the control plane: {0}")]
    ControlPlane(#[from] ServeError),
    #[error("applying the demo's policies: {0}")]
    Apply(#[from] CtlError),
    #[error("cannot create a sidecar's bootstrap token: {0}")]
    Token(#[from] TokenError),
    #[error("interrupted before the traffic started")]
    Interrupted,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

const NAMESPACE: &str = "demo";
/// How long each start-up step may take.
const READY_WITHIN: Duration = Duration::from_secs(15);
/// How long a sidecar may take to exit after SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(5);
/// How often the client sidecar's metrics are read for circuit transitions.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// What the demo applies, as `ballastctl apply -f` would.
const SERVICES: &str = "apiVersion: ballast.io/v1alpha1
kind: Service
metadata: {name: catalog, namespace: demo}
spec:
  ports: [{port: 80, protocol: http}]
---
apiVersion: ballast.io/v1alpha1
kind: Service
metadata: {name: payments, namespace: demo}
spec:
  ports: [{port: 80, protocol: http}]
";

/// A slow answer (300 ms) is cut at 100 ms and retried; a 503 is retried. The breaker
/// trips on a failure rate well above the 28% of tries that fail normally (20% 503s,
/// and 10% of the rest slow), over at least 50 tries: a start on a bad streak must not
/// open it.
const PAYMENTS_POLICY: &str = "apiVersion: ballast.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: payments, namespace: demo}
spec:
  targetRef: {service: payments}
  timeouts: {request: 1s, perTry: 100ms}
  retries:
    attempts: 3
    on: [5xx]
    backoff: {base: 5ms, max: 50ms}
    budget: {ratio: 0.5, minPerSecond: 10}
  circuitBreaker:
    failureRate: {threshold: 0.5, minimumRequests: 50, window: 5s}
    openFor: 1s
";

/// `openFor` 1 s doubling to at most 2 s: the breaker closes within about 2 s of the end
/// of the outage, so a 12 s run shows it.
const CATALOG_POLICY: &str = "apiVersion: ballast.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: catalog, namespace: demo}
spec:
  targetRef: {service: catalog}
  circuitBreaker: {consecutiveFailures: 5, openFor: 1s, maxOpenFor: 2s}
";

/// The lockdown, appended to [`PAYMENTS_POLICY`] (the rest of which stays): `payments`
/// takes only mutual TLS, and of the mesh's identities only the demo's client. Callers
/// outside the mesh (plain text) and other workloads (`catalog`, whose sidecar has a
/// certificate too) get 403 from the payments sidecars.
const PAYMENTS_LOCKDOWN: &str = "  inbound:
    mtls: strict
    allow: [demo/client]
";

/// How a sample replica answers.
#[derive(Clone, Copy)]
struct Behaviour {
    fail_ratio: f64,
    slow_ratio: f64,
    slow: Duration,
}

const HEALTHY: Behaviour = Behaviour { fail_ratio: 0.0, slow_ratio: 0.0, slow: Duration::ZERO };
const FLAKY: Behaviour = Behaviour { fail_ratio: 0.2, slow_ratio: 0.1, slow: Duration::from_millis(300) };

/// The header that tells a sample replica which path a request came by.
const PATH_HEADER: &str = "x-demo-path";

/// A sample replica: an HTTP/1.1 server on a loopback port of this process.
#[derive(Clone)]
struct App {
    addr: SocketAddr,
    /// While set, every request gets a 503 (the outage).
    down: Arc<AtomicBool>,
    /// Requests that arrived while down: [direct, mesh].
    while_down: Arc<[AtomicU64; 2]>,
}

async fn spawn_app(name: &'static str, b: Behaviour) -> std::io::Result<App> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let down = Arc::new(AtomicBool::new(false));
    let while_down: Arc<[AtomicU64; 2]> = Arc::default();
    let app = App { addr, down: down.clone(), while_down: while_down.clone() };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (down, while_down) = (down.clone(), while_down.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let (down, while_down) = (down.clone(), while_down.clone());
                    async move {
                        let status = if down.load(Ordering::Relaxed) {
                            let mesh = req.headers().get(PATH_HEADER).is_some_and(|v| v == "mesh");
                            while_down[usize::from(mesh)].fetch_add(1, Ordering::Relaxed);
                            503
                        } else {
                            let (fail, slow) =
                                (rand::random::<f64>() < b.fail_ratio, rand::random::<f64>() < b.slow_ratio);
                            if slow {
                                tokio::time::sleep(b.slow).await;
                            }
                            if fail { 503 } else { 200 }
                        };
                        http::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(format!("{name}: {status}\n"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(app)
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

fn loopback_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The system calls the process guard needs.
mod sys {
    use libc::{c_int, getppid, kill, prctl};

    pub const SIGTERM: c_int = libc::SIGTERM;

    /// Sends `sig` to `pid`, a child not yet reaped (so the pid is still ours).
    pub fn signal(pid: u32, sig: c_int) {
        // SAFETY: kill(2) has no memory effects; callers pass their unreaped child's pid.
        unsafe {
            kill(pid as c_int, sig);
        }
    }

    /// Asks the kernel to send the child SIGTERM when the thread that spawned it dies, so
    /// a demo killed with SIGKILL leaves no sidecar behind. Runs between fork and exec.
    /// The demo spawns from the thread that runs `block_on` (or a runtime worker), which
    /// lives as long as the process; never from a blocking-pool thread, which exits when
    /// idle and would take the sidecar with it.
    #[cfg(target_os = "linux")]
    pub fn die_with_parent(cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as c_int;
        // SAFETY: the closure only makes async-signal-safe system calls and allocates
        // nothing (`from_raw_os_error` does not allocate).
        unsafe {
            cmd.pre_exec(move || {
                if prctl(libc::PR_SET_PDEATHSIG, SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the prctl took effect.
                if getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn die_with_parent(_: &mut std::process::Command) {}
}

/// A sidecar process of the demo.
struct Proc {
    pod: String,
    child: Child,
    /// Its exit status, once reaped.
    exited: Option<std::process::ExitStatus>,
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Sidecars {
    /// One retried request as the access logs tell it: the client sidecar's line, and the
    /// tries as payments' sidecars logged them, found by the `x-request-id` the client
    /// sidecar gave the request.
    ///
    /// The first such request whose two tries are both in the logs: a try cut short by
    /// the client's per-try timeout is logged by its server sidecar only once the slow
    /// app answers, which may be after the demo reads the logs (the first retried
    /// request alone made the demo's test fail now and then).
    fn retried_request(&self) -> String {
        let read = |p: &Proc| std::fs::read_to_string(&p.log).unwrap_or_default();
        let Some(client) = self.procs.iter().find(|p| p.pod == "client").map(read) else {
            return String::new();
        };
        let servers: Vec<(&str, String)> = self
            .procs
            .iter()
            .filter(|p| p.pod.starts_with("payments"))
            .map(|p| (p.pod.as_str(), read(p)))
            .collect();
        let access = |l: &&str| l.contains("ballast_sidecar::access");
        let tries = |id: &str| -> Vec<String> {
            let tag = format!("request_id=\"{id}\"");
            servers
                .iter()
                .flat_map(|(pod, log)| {
                    log.lines()
                        .filter(access)
                        .filter(|l| l.contains(&tag))
                        .map(|l| format!("  {:<11} {}\n", pod, access_fields(l)))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let mut retried = client
            .lines()
            .filter(access)
            .filter(|l| {
                l.contains("service=\"payments.demo\"")
                    && l.contains("status=200")
                    && l.contains("attempts=2")
            })
            .filter_map(|l| Some((l, l.split("request_id=\"").nth(1)?.split('"').next()?)));
        let Some(first) = retried.next() else { return String::new() };
        let (line, tries) = std::iter::once(first)
            .chain(retried)
            .map(|(l, id)| (l, tries(id)))
            .find(|(_, t)| t.len() >= 2)
            .unwrap_or_else(|| (first.0, tries(first.1)));
        let mut out = format!(
            "\nA retried request in the access logs (on by default; joined by its x-request-id):\n  client      {}\n",
            access_fields(line)
        );
        for t in &tries {
            out.push_str(t);
        }
        out
    }
}

/// The fields of an access-log line, without its timestamp and target.
fn access_fields(line: &str) -> &str {
    line.split_once("ballast_sidecar::access: ").map(|(_, f)| f).unwrap_or(line)
}

impl Proc {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Whether it has exited (and is reaped).
    fn poll_exit(&mut self) -> bool {
        if self.exited.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exited = Some(status);
        }
        self.exited.is_some()
    }
}

/// How the demo's sidecars join a control plane with workload identity: as a sidecar
/// outside Kubernetes does, with the mesh's trust anchors and a bootstrap token for its
/// service account (`ballastctl token create`), both in files of the demo's directory.
struct Enrolment {
    /// The control plane's store and keys: the tokens are created there directly, as
    /// `POST /api/v1/tokens` would.
    store: Store,
    keys: Keys,
    /// The trust anchors (the CA certificate, PEM), in a file: given inline, a PEM would
    /// read as a flag.
    anchors: PathBuf,
}

/// A bootstrap token's lifetime. The store is in memory and ends with the demo, so no
/// token outlives it; the longest lifetime lets a demo left running for days renew its
/// certificates (every 16 h) with the token it started with.
const TOKEN_TTL: Duration = crate::identity::tokens::MAX_TTL;

/// The demo's sidecar processes. Dropping it stops and reaps every one still running, so
/// an early return leaves none behind.
struct Sidecars {
    bin: PathBuf,
    /// The control plane's gRPC URL (https:// with identity).
    control_plane: String,
    dir: tempfile::TempDir,
    /// With identity (the default; `None` with `--no-mtls`).
    enrolment: Option<Enrolment>,
    procs: Vec<Proc>,
}

impl Sidecars {
    /// Sidecars of the control plane `cp`; with identity on there, each gets a certificate.
    fn new(bin: PathBuf, cp: &ControlPlane, keys: Keys) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ballast-demo").tempdir()?;
        let enrolment = match cp.trust_anchors_pem() {
            Some(pem) => {
                let anchors = dir.path().join("ca.crt");
                std::fs::write(&anchors, pem)?;
                Some(Enrolment { store: cp.store.clone(), keys, anchors })
            }
            None => None,
        };
        Ok(Self {
            bin,
            control_plane: format!("{}://{}", cp.scheme(), cp.grpc_addr),
            dir,
            enrolment,
            procs: Vec::new(),
        })
    }

    /// Starts a sidecar named `pod` of service account `account` (registered for
    /// `service`, forwarding to `app`, when given) and waits until it is ready: with
    /// identity, once it holds its certificate. A port taken between choosing and binding
    /// it is retried with fresh ports.
    async fn start(
        &mut self,
        pod: &str,
        account: &str,
        service: Option<(&str, SocketAddr)>,
    ) -> Result<usize, DemoError> {
        // One token per sidecar, as each pod would get its own.
        let token = match &self.enrolment {
            Some(e) => {
                let token =
                    crate::identity::create_bootstrap_token(&e.store, &e.keys, NAMESPACE, account, TOKEN_TTL)
                        .await?;
                let file = self.dir.path().join(format!("{pod}.token"));
                std::fs::write(&file, token)?;
                Some(file)
            }
            None => None,
        };
        let identity = token.as_deref().map(|t| (account, t));
        let mut attempt = 1;
        loop {
            let i = self.spawn(pod, service, identity)?;
            match self.ready(i).await {
                Ok(()) => return Ok(i),
                Err(log) if attempt < 3 && log.contains("Address already in use") => attempt += 1,
                Err(log) => return Err(DemoError::NotReady { what: format!("the sidecar {pod}"), log }),
            }
        }
    }

    /// Waits until sidecar `i` answers `/ready`; the end of its log if it exits first or
    /// takes longer than [`READY_WITHIN`].
    async fn ready(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if admin_call(self.procs[i].admin, Method::GET, "/ready").await.map(|(s, _)| s) == Some(200) {
                return Ok(());
            }
            if self.procs[i].poll_exit() || Instant::now() > deadline {
                return Err(self.procs[i].log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Spawns a sidecar; `identity`: its service account and token file.
    fn spawn(
        &mut self,
        pod: &str,
        service: Option<(&str, SocketAddr)>,
        identity: Option<(&str, &std::path::Path)>,
    ) -> Result<usize, DemoError> {
        let (outbound, inbound, admin) = (loopback_port()?, loopback_port()?, loopback_port()?);
        let log = self.dir.path().join(format!("{pod}-{}.log", self.procs.len()));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .args(["--control-plane", &self.control_plane])
            .args(["--namespace", NAMESPACE, "--pod", pod])
            .args(["--outbound-addr", &outbound.to_string(), "--inbound-addr", &inbound.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--workers", "1", "--drain-deadline", "2s", "--egress-dns=false"])
            .env_remove("BALLAST_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if let Some((service, app)) = service {
            cmd.args(["--service", service, "--app-addr", &app.to_string()])
                .args(["--advertise-addr", &inbound.to_string()]);
        }
        if let (Some(e), Some((account, token))) = (&self.enrolment, identity) {
            cmd.arg("--identity-trust-anchors")
                .arg(&e.anchors)
                .arg("--identity-token-file")
                .arg(token)
                .args(["--service-account", account]);
        }
        // Its own process group: a Ctrl-C in the terminal goes to the demo alone, which
        // then stops the sidecars after its last report.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        sys::die_with_parent(&mut cmd);
        let child = cmd.spawn()?;
        self.procs.push(Proc { pod: pod.to_owned(), child, exited: None, outbound, inbound, admin, log });
        Ok(self.procs.len() - 1)
    }

    fn find(&self, pod: &str) -> Option<&Proc> {
        self.procs.iter().rev().find(|p| p.pod == pod && p.exited.is_none())
    }

    fn signal_all(&mut self, sig: std::ffi::c_int) {
        for p in &mut self.procs {
            if !p.poll_exit() {
                sys::signal(p.child.id(), sig);
            }
        }
    }

    fn all_exited(&mut self) -> bool {
        self.procs.iter_mut().all(|p| p.poll_exit())
    }

    /// SIGTERM to all, then waits up to [`STOP_WITHIN`] for them to drain and exit;
    /// SIGKILL for any still running. Returns the pods that had to be killed.
    async fn stop(&mut self) -> Vec<String> {
        self.signal_all(sys::SIGTERM);
        let deadline = Instant::now() + STOP_WITHIN;
        while !self.all_exited() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill_rest()
    }

    fn kill_rest(&mut self) -> Vec<String> {
        let mut killed = Vec::new();
        for p in &mut self.procs {
            if !p.poll_exit() {
                let _ = p.child.kill();
                if let Ok(status) = p.child.wait() {
                    p.exited = Some(status);
                }
                killed.push(p.pod.clone());
            }
        }
        killed
    }
}

impl Drop for Sidecars {
    fn drop(&mut self) {
        if self.all_exited() {
            return;
        }
        // An early return (an error, an interrupted start-up): the same as `stop`, with
        // blocking waits, as a destructor cannot await.
        self.signal_all(sys::SIGTERM);
        let deadline = Instant::now() + STOP_WITHIN;
        while !self.all_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_rest();
    }
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

/// The table as one string, printed at once so event lines do not split it.
fn render_table(table: &Table, title: &str, elapsed: Duration) -> String {
    let t = table.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = format!("\n== {title} ({:.0}s) ==\n", elapsed.as_secs_f64());
    let _ = writeln!(
        out,
        "{:<10} {:<8} {:>9} {:>9} {:>9} {:>9}",
        "service", "path", "requests", "success", "p50 ms", "p99 ms"
    );
    for ((svc, path), s) in t.iter() {
        let n = s.ok + s.failed;
        let rate = if n == 0 { 0.0 } else { 100.0 * s.ok as f64 / n as f64 };
        let _ = writeln!(
            out,
            "{svc:<10} {path:<8} {n:>9} {:>8.1}% {:>9.1} {:>9.1}",
            rate,
            s.percentile(0.5) * 1e3,
            s.percentile(0.99) * 1e3
        );
    }
    out
}

/// When `catalog` is down: at a third of the run for a quarter of it (1 to 5 s), or,
/// without a duration, at 10 s and every 30 s after, for 5 s.
#[derive(Clone, Copy)]
struct Outage {
    start: Duration,
    length: Duration,
    every: Option<Duration>,
}

impl Outage {
    fn for_run(duration: Option<Duration>) -> Self {
        match duration {
            Some(d) => Outage {
                start: d / 3,
                length: (d / 4).clamp(Duration::from_secs(1), Duration::from_secs(5)),
                every: None,
            },
            None => Outage {
                start: Duration::from_secs(10),
                length: Duration::from_secs(5),
                every: Some(Duration::from_secs(30)),
            },
        }
    }

    fn describe(&self) -> String {
        let at = match self.every {
            Some(every) => format!("{}s and every {}s after", self.start.as_secs(), every.as_secs()),
            None => format!("{:.0}s", self.start.as_secs_f64()),
        };
        format!(
            "At {at}, both catalog replicas go down (every answer a 503) for {:.0}s.",
            self.length.as_secs_f64()
        )
    }
}

/// `[  4.1s]`: time since the traffic started.
fn stamp(started: Instant) -> String {
    format!("[{:>5.1}s]", started.elapsed().as_secs_f64())
}

/// Takes `catalog` down and up on the [`Outage`] schedule, saying so.
async fn run_outages(outage: Outage, catalog: Vec<App>, started: Instant) {
    let mut start = outage.start;
    loop {
        tokio::time::sleep_until((started + start).into()).await;
        // Said first, so that it comes before anything the outage causes.
        println!(
            "{} OUTAGE: both catalog replicas answer every request with 503 for {:.0}s.\n         \
             Watch the client sidecar's breaker for catalog (its /metrics):",
            stamp(started),
            outage.length.as_secs_f64()
        );
        for app in &catalog {
            for n in app.while_down.iter() {
                n.store(0, Ordering::Relaxed);
            }
            app.down.store(true, Ordering::Relaxed);
        }
        tokio::time::sleep_until((started + start + outage.length).into()).await;
        let mut got = [0u64; 2];
        for app in &catalog {
            app.down.store(false, Ordering::Relaxed);
            for (g, n) in got.iter_mut().zip(app.while_down.iter()) {
                *g += n.load(Ordering::Relaxed);
            }
        }
        // The breaker sent 5 failures before it opened, then a probe now and then.
        let spared = got[1] * 2 < got[0];
        println!(
            "{} catalog is back. While it was down its replicas got {} requests direct\n         \
             and {} through the mesh{}",
            stamp(started),
            got[0],
            got[1],
            if spared { ": the open circuit kept the rest away from them." } else { "." }
        );
        match outage.every {
            Some(every) => start += every,
            None => return,
        }
    }
}

/// The lockdown step (identity on only): [`PAYMENTS_LOCKDOWN`] is applied while the
/// traffic runs, and two callers that must now be refused try `payments`.
#[derive(Clone)]
struct Lockdown {
    api: Arc<Api>,
    /// The payments policy with the lockdown, as a file for `ctl::apply`.
    file: PathBuf,
    /// A payments sidecar's inbound listener: where a caller outside the mesh lands
    /// (in Kubernetes, redirected there by the pod's iptables rules).
    payments_inbound: SocketAddr,
    /// catalog-1's sidecar's outbound listener: a workload of the mesh, with its own
    /// certificate (`demo/catalog`), that the allow list leaves out.
    catalog_outbound: SocketAddr,
}

impl Lockdown {
    /// When it happens: at three quarters of the run, after the catalog outage and its
    /// breaker have played out; without `--duration`, once, at 25 s.
    fn at(duration: Option<Duration>) -> Duration {
        match duration {
            Some(d) => d * 3 / 4,
            None => Duration::from_secs(25),
        }
    }

    /// Applies the lockdown and shows who is refused, in one print so event lines do not
    /// split it. The client's traffic goes on meanwhile: the payments mesh row shows it
    /// still gets through.
    async fn run(self, at: Duration, started: Instant) {
        tokio::time::sleep_until((started + at).into()).await;
        let mut out = format!(
            "{} LOCKDOWN: payments now takes only mutual TLS, and only from the client:\n",
            stamp(started)
        );
        let args = ApplyArgs { file: self.file.clone(), wait: true, timeout: READY_WITHIN };
        match ctl::apply(&self.api, &args, Output::Table).await {
            Ok(applied) => {
                let _ = writeln!(out, "         $ ballastctl apply -f payments-lockdown.yaml --wait");
                for line in applied.lines().chain(PAYMENTS_LOCKDOWN.lines()) {
                    let _ = writeln!(out, "           {line}");
                }
            }
            Err(e) => {
                println!("{out}         cannot apply it: {e}");
                return;
            }
        }
        let callers = [
            ("a caller outside the mesh (plain text to a payments sidecar)", self.payments_inbound),
            ("catalog-1's sidecar (demo/catalog, over mutual TLS)", self.catalog_outbound),
        ];
        for (who, via) in callers {
            // Every sidecar acked the policy, so the first answer is the new one; a few
            // tries cover a connection the old policy had admitted.
            let mut answer = None;
            for _ in 0..10 {
                answer = get_payments(via).await;
                if answer.as_ref().is_some_and(|a| a.status == 403) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match answer {
                Some(a) => {
                    let rejected = a.rejected.as_deref().unwrap_or("-");
                    let _ = writeln!(
                        out,
                        "         {who}: {} (ballast-rejected: {rejected})\n           {}",
                        a.status, a.body
                    );
                }
                None => {
                    let _ = writeln!(out, "         {who}: no answer");
                }
            }
        }
        out.push_str(
            "         The client's requests keep going over mutual TLS: see the payments mesh row.\n",
        );
        print!("{out}");
    }
}

/// An answer from [`get_payments`].
struct Answer {
    status: u16,
    /// The `ballast-rejected` header: why a sidecar refused.
    rejected: Option<String>,
    /// The body's first line.
    body: String,
}

/// `GET /charge` for host `payments`, sent to the sidecar listener `via`.
async fn get_payments(via: SocketAddr) -> Option<Answer> {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(format!("http://{via}/charge"))
        .header(http::header::HOST, "payments")
        .body(Empty::new())
        .ok()?;
    let rsp = tokio::time::timeout(Duration::from_secs(2), client.request(req)).await.ok()?.ok()?;
    let status = rsp.status().as_u16();
    let rejected = rsp.headers().get("ballast-rejected").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = rsp.into_body().collect().await.ok()?.to_bytes();
    let body = String::from_utf8_lossy(&body).lines().next().unwrap_or_default().to_owned();
    Some(Answer { status, rejected, body })
}

/// What the services' sidecars counted of their callers
/// (`ballast_inbound_requests_by_peer_total`), summed over replicas: requests by service,
/// the caller's verified identity (empty: none, plain text) and whether it came over
/// mutual TLS.
#[derive(Default)]
struct Peers(BTreeMap<(String, String, bool), f64>);

impl Peers {
    async fn read(admins: &[SocketAddr]) -> Peers {
        let mut peers = Peers::default();
        for &admin in admins {
            if let Some((200, text)) = admin_call(admin, Method::GET, "/metrics").await {
                peers.add(&text);
            }
        }
        peers
    }

    fn add(&mut self, text: &str) {
        for (l, v) in samples(text, "ballast_inbound_requests_by_peer_total") {
            let (Some(s), Some(peer), Some(tls)) = (l.get("service"), l.get("peer_identity"), l.get("tls"))
            else {
                continue;
            };
            *self.0.entry((s.to_string(), peer.to_string(), *tls == "true")).or_default() += v;
        }
    }

    /// Requests over mutual TLS, and in all.
    fn share(&self) -> (f64, f64) {
        // Folded from 0.0: an empty `sum` of floats is -0.0, printed "-0".
        let mtls = self.0.iter().filter(|((_, _, tls), _)| *tls).fold(0.0, |a, (_, v)| a + v);
        (mtls, self.0.values().fold(0.0, |a, v| a + v))
    }

    /// `demo/client` for a SPIFFE ID, `plain text` for none.
    fn caller(peer: &str) -> String {
        match peer.parse::<Identity>() {
            Ok(id) => format!("{}/{}", id.namespace, id.service_account),
            Err(_) if peer.is_empty() => "plain text".to_owned(),
            Err(_) => peer.to_owned(),
        }
    }

    /// One line: the share over mutual TLS, and who called whom.
    fn summary(&self) -> String {
        let (mtls, total) = self.share();
        // Rounded down: one plain-text request in thousands must not read as 100%.
        let pct = if total > 0.0 { (1000.0 * mtls / total).floor() / 10.0 } else { 0.0 };
        let calls: Vec<String> = self
            .0
            .iter()
            .map(|((service, peer, _), n)| format!("{} -> {service} {n}", Self::caller(peer)))
            .collect();
        format!(
            "mTLS: {pct:.1}% of the {total} requests the services' sidecars received ({mtls} over mutual TLS)\n  \
             callers: {}\n",
            if calls.is_empty() { "-".to_owned() } else { calls.join(", ") }
        )
    }

    /// Who called whom, a row per service and caller.
    fn table(&self) -> String {
        let mut out = format!("  {:<10} {:<44} {:<6} {:>8}\n", "service", "caller", "over", "requests");
        for ((service, peer, tls), n) in &self.0 {
            let peer = if peer.is_empty() { "(none: plain text)" } else { peer };
            let over = if *tls { "mTLS" } else { "plain" };
            let _ = writeln!(out, "  {service:<10} {peer:<44} {over:<6} {n:>8}");
        }
        out
    }
}

/// The samples of metric `name` in a Prometheus text exposition: (labels, value).
fn samples<'a>(text: &'a str, name: &str) -> Vec<(BTreeMap<&'a str, &'a str>, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k, v.trim_matches('"'))))
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

fn circuit_name(state: i64) -> &'static str {
    match state {
        0 => "closed",
        1 => "OPEN",
        2 => "half-open",
        _ => "unknown",
    }
}

/// Polls the client sidecar's metrics and prints each circuit transition, and while a
/// circuit rejects requests, how many, about once a second.
async fn watch_circuits(admin: SocketAddr, started: Instant) {
    /// What was last seen of one service's breaker.
    struct Seen {
        state: i64,
        /// `ballast_rejections_total{reason="circuit-open"}` when last seen closed.
        at_open: f64,
        /// ... when last printed, and when that was.
        printed: f64,
        printed_at: Instant,
        /// Closed since the last poll: the total is printed at the next one, when the
        /// rejections of the last moments before closing are counted.
        closed: bool,
    }
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut explained = false;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tick.tick().await;
        let Some((200, text)) = admin_call(admin, Method::GET, "/metrics").await else { continue };
        let rejected: BTreeMap<&str, f64> = samples(&text, "ballast_rejections_total")
            .into_iter()
            .filter(|(l, _)| l.get("reason") == Some(&"circuit-open"))
            .filter_map(|(l, v)| Some((*l.get("service")?, v)))
            .collect();
        for (labels, value) in samples(&text, "ballast_circuit_state") {
            let Some(&service) = labels.get("service") else { continue };
            let (state, n) = (value as i64, rejected.get(service).copied().unwrap_or(0.0));
            let s = seen.entry(service.to_owned()).or_insert(Seen {
                state: 0,
                at_open: n,
                printed: n,
                printed_at: Instant::now(),
                closed: false,
            });
            if std::mem::take(&mut s.closed) && n > s.at_open {
                println!(
                    "{} circuit {service}: {} rejected while it was open",
                    stamp(started),
                    n - s.at_open
                );
            }
            if state != s.state {
                let why = match state {
                    1 if !explained => {
                        explained = true;
                        " (ballast_circuit_state 1)\n         \
                         The sidecar stops calling the service and answers 503 circuit-open itself\n         \
                         (ballast_rejections_total); after openFor it lets one probe through,\n         \
                         and closes the circuit if the probe succeeds."
                    }
                    1 => " (ballast_circuit_state 1)",
                    2 => ": one probe goes through",
                    0 => ": a probe succeeded, requests flow again",
                    _ => "",
                };
                let from = circuit_name(s.state);
                println!("{} circuit {service}: {from} -> {}{why}", stamp(started), circuit_name(state));
                if s.state == 0 {
                    (s.printed, s.printed_at) = (s.at_open, Instant::now());
                }
                s.closed = state == 0;
                s.state = state;
            } else if state != 0 && n > s.printed && s.printed_at.elapsed() >= Duration::from_secs(1) {
                println!(
                    "{} circuit {service}: +{} rejected, {} since it opened (reason=\"circuit-open\")",
                    stamp(started),
                    n - s.printed,
                    n - s.at_open
                );
                (s.printed, s.printed_at) = (n, Instant::now());
            }
            if s.state == 0 && !s.closed {
                s.at_open = n;
            }
        }
    }
}

/// What the client sidecar counted, per service: requests by status, retries, rejections.
fn render_counted(text: &str) -> String {
    #[derive(Default)]
    struct Row {
        requests: f64,
        statuses: BTreeMap<String, f64>,
        retries: f64,
        rejected: BTreeMap<String, f64>,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (l, v) in samples(text, "ballast_requests_total") {
        if l.get("direction") != Some(&"outbound") {
            continue;
        }
        let (Some(s), Some(code)) = (l.get("service"), l.get("status_code")) else { continue };
        let row = rows.entry(s.to_string()).or_default();
        row.requests += v;
        *row.statuses.entry(code.to_string()).or_default() += v;
    }
    for (l, v) in samples(text, "ballast_retries_total") {
        if let Some(s) = l.get("service") {
            rows.entry(s.to_string()).or_default().retries += v;
        }
    }
    for (l, v) in samples(text, "ballast_rejections_total") {
        if let (Some(s), Some(r)) = (l.get("service"), l.get("reason")) {
            *rows.entry(s.to_string()).or_default().rejected.entry(r.to_string()).or_default() += v;
        }
    }
    let join = |m: &BTreeMap<String, f64>| {
        if m.is_empty() {
            return "-".to_owned();
        }
        m.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" ")
    };
    let mut out = format!(
        "  {:<14} {:>8}  {:<24} {:>7}  {}\n",
        "service", "requests", "by status", "retries", "rejected"
    );
    for (s, r) in &rows {
        let _ = writeln!(
            out,
            "  {s:<14} {:>8}  {:<24} {:>7}  {}",
            r.requests,
            join(&r.statuses),
            r.retries,
            join(&r.rejected)
        );
    }
    out
}

/// Resolves on Ctrl-C or SIGTERM; the handlers are installed at once.
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut int, mut term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let sidecar_bin = find_sidecar(args.sidecar_bin.clone())?;
    let stop = stop_signal()?;
    tokio::pin!(stop);

    // Identity on unless --no-mtls: a CA generated into the (in-memory) store, 24 h
    // certificates, TLS on both ports and a random admin token, as `IdentityOptions`
    // defaults to for embedding callers.
    let opts =
        Options { identity: (!args.no_mtls).then(IdentityOptions::default), ..Options::loopback("demo") };
    let keys = Keys::new(&opts.prefix);
    let cp = ControlPlane::start_on(Store::memory(), opts).await?;
    let mut sidecars = Sidecars::new(sidecar_bin, &cp, keys)?;
    let result = tokio::select! {
        r = setup(&mut sidecars, &cp) => r,
        _ = &mut stop => Err(DemoError::Interrupted),
    };
    if let Ok(mesh) = &result {
        traffic(&args, mesh, stop).await;
        print!("{}", sidecars.retried_request());
    }
    // Stopped in order: the sidecars close their streams (the control plane deregisters
    // them) and drain, then the control plane stops.
    let killed = sidecars.stop().await;
    let n = sidecars.procs.iter().map(|p| &p.pod).collect::<std::collections::BTreeSet<_>>().len();
    cp.stop().await;
    result?;
    if killed.is_empty() {
        println!("\nStopped {n} sidecars (SIGTERM: each drained and exited) and the control plane.");
    } else {
        println!("\nStopped {n} sidecars ({} needed SIGKILL) and the control plane.", killed.join(", "));
    }
    println!("Demo finished.");
    Ok(())
}

/// The running mesh the traffic goes to.
struct Mesh {
    catalog: [App; 2],
    payments: [App; 2],
    /// The client sidecar's outbound listener and admin address.
    outbound: SocketAddr,
    client_admin: SocketAddr,
    /// The services' sidecars' admin addresses: where their callers are counted.
    servers: Vec<SocketAddr>,
    /// With identity: the lockdown step's targets.
    lockdown: Option<Lockdown>,
}

/// The service accounts: one per service, as pods of one Deployment share theirs, and
/// one for the demo's own traffic.
const CLIENT_ACCOUNT: &str = "client";

/// Starts the sample services and their sidecars, applies the policies and waits until
/// every sidecar has them.
async fn setup(sidecars: &mut Sidecars, cp: &ControlPlane) -> Result<Mesh, DemoError> {
    let admin_url = format!("{}://{}", cp.scheme(), cp.admin_addr);
    let api = Arc::new(Api::with_tls(
        &admin_url,
        cp.trust_anchors_pem().as_deref(),
        cp.admin_token().map(str::to_owned),
    )?);
    let catalog = [spawn_app("catalog-1", HEALTHY).await?, spawn_app("catalog-2", HEALTHY).await?];
    let payments = [spawn_app("payments-1", FLAKY).await?, spawn_app("payments-2", FLAKY).await?];
    let replicas: [(&str, &str, &App); 4] = [
        ("catalog-1", "catalog", &catalog[0]),
        ("catalog-2", "catalog", &catalog[1]),
        ("payments-1", "payments", &payments[0]),
        ("payments-2", "payments", &payments[1]),
    ];
    let mut servers = Vec::new();
    for (pod, service, app) in replicas {
        let i = sidecars.start(pod, service, Some((service, app.addr))).await?;
        servers.push(sidecars.procs[i].admin);
    }
    let client = sidecars.start("client", CLIENT_ACCOUNT, None).await?;
    let (outbound, client_admin) = (sidecars.procs[client].outbound, sidecars.procs[client].admin);
    let identity = sidecars.enrolment.is_some();

    println!(
        "Ballast demo: a control plane on the embedded store (in this process) and {} sidecars, {}.",
        replicas.len() + 1,
        if identity { "with workload identity and mutual TLS" } else { "in plain text (--no-mtls)" }
    );
    println!("  control plane  push {} (gRPC), admin API {admin_url}", sidecars.control_plane);
    for (pod, _, app) in replicas {
        let Some(p) = sidecars.find(pod) else { continue };
        let what = if pod.starts_with("payments") { "flaky" } else { "healthy" };
        println!(
            "  {pod:<10}  app {:<15}  {what:<7}  sidecar pid {:<7}  inbound {}",
            app.addr.to_string(),
            p.child.id(),
            p.inbound
        );
    }
    if let Some(p) = sidecars.find("client") {
        println!(
            "  {:<10}  the demo's traffic        sidecar pid {:<7}  outbound {}",
            "client",
            p.child.id(),
            p.outbound
        );
    }
    println!("  flaky: fails 20% of requests (503) and answers 10% after 300 ms");
    // With identity the admin API wants the CA and the token: written next to the
    // sidecars' files (a directory only this user can read), so ballastctl can be pointed
    // at the running demo from another terminal.
    if let (Some(e), Some(token)) = (&sidecars.enrolment, cp.admin_token()) {
        let token_file = sidecars.dir.path().join("admin.token");
        std::fs::write(&token_file, token)?;
        println!(
            "  try meanwhile: ballastctl --control-plane {admin_url} --ca-file {} --token-file {} get proxies",
            e.anchors.display(),
            token_file.display()
        );
    }

    // Applied once the control plane has every sidecar's status, so that `--wait` waits
    // for all of them (a sidecar is ready before the control plane has recorded its ack).
    settle(&api, client_admin, replicas.len() + 1).await?;
    let file = sidecars.dir.path().join("mesh.yaml");
    std::fs::write(&file, format!("{SERVICES}---\n{PAYMENTS_POLICY}---\n{CATALOG_POLICY}"))?;
    let applied =
        ctl::apply(&api, &ApplyArgs { file, wait: true, timeout: READY_WITHIN }, Output::Table).await?;
    println!("\n$ ballastctl apply -f mesh.yaml --wait   (through the admin API)");
    print!("{applied}");
    println!("The policies:\n{PAYMENTS_POLICY}{CATALOG_POLICY}");

    settle(&api, client_admin, replicas.len() + 1).await?;
    println!("$ ballastctl get proxies");
    print!("{}", ctl::get(&api, Kind::Proxies, Some(NAMESPACE), Output::Table).await?);
    print!("\n{}", certificates(&api, sidecars, identity).await?);

    let lockdown = match (identity, sidecars.find("payments-1"), sidecars.find("catalog-1")) {
        (true, Some(payments), Some(catalog)) => {
            let file = sidecars.dir.path().join("payments-lockdown.yaml");
            std::fs::write(&file, format!("{PAYMENTS_POLICY}{PAYMENTS_LOCKDOWN}"))?;
            Some(Lockdown {
                api: api.clone(),
                file,
                payments_inbound: payments.inbound,
                catalog_outbound: catalog.outbound,
            })
        }
        _ => None,
    };
    Ok(Mesh { catalog, payments, outbound, client_admin, servers, lockdown })
}

/// What workload identity did at start-up: each sidecar's identity as the control plane
/// recorded it (from the client certificate of its push stream) and its certificate's
/// expiry as the sidecar reports it (`ballast_identity_certificate_expiry_timestamp_seconds`).
async fn certificates(api: &Api, sidecars: &Sidecars, identity: bool) -> Result<String, DemoError> {
    let mut sorted: Vec<&Proc> = sidecars.procs.iter().filter(|p| p.exited.is_none()).collect();
    sorted.sort_by(|a, b| a.pod.cmp(&b.pod));
    if !identity {
        return Ok(format!(
            "Workload identity is off (--no-mtls): no certificates; the {} sidecars and the control\n\
             plane talk plain text, and the services' sidecars cannot tell who calls them.\n",
            sorted.len()
        ));
    }
    let proxies = api.call(Method::GET, "/api/v1/proxies", None).await?;
    let recorded = |pod: &str| {
        proxies
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["namespace"] == NAMESPACE && p["pod"] == pod)
            .and_then(|p| p["identity"].as_str())
            .unwrap_or("-")
            .to_owned()
    };
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut out = String::from(
        "Workload identity: each sidecar generated its key, proved its service account with its\n\
         bootstrap token, and got a certificate signed by the control plane's CA (generated\n\
         into its store); mesh calls between sidecars then use mutual TLS (TLS 1.3).\n",
    );
    let _ = writeln!(out, "  {:<10}  {:<44}  certificate", "pod", "identity (SPIFFE ID)");
    let mut holding = 0;
    for p in &sorted {
        let metrics = admin_call(p.admin, Method::GET, "/metrics").await.map(|(_, m)| m).unwrap_or_default();
        let expiry = samples(&metrics, "ballast_identity_certificate_expiry_timestamp_seconds")
            .first()
            .map_or(0.0, |(_, v)| *v);
        let cert = if expiry > now {
            holding += 1;
            format!("valid for {:.1}h more", (expiry - now) / 3600.0)
        } else {
            "none".to_owned()
        };
        let _ = writeln!(out, "  {:<10}  {:<44}  {cert}", p.pod, recorded(&p.pod));
    }
    let _ = writeln!(out, "{holding} of {} sidecars hold a certificate.", sorted.len());
    Ok(out)
}

/// Waits until the control plane lists every sidecar as having applied the latest
/// version sent to it, and the client sidecar has both replicas of each service.
async fn settle(api: &Api, client_admin: SocketAddr, sidecars: usize) -> Result<(), DemoError> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let proxies = api.call(Method::GET, "/api/v1/proxies", None).await?;
        let synced = proxies
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["namespace"] == NAMESPACE && p["state"] == "SYNCED")
            .count();
        let metrics =
            admin_call(client_admin, Method::GET, "/metrics").await.map(|(_, m)| m).unwrap_or_default();
        let ready = |service: &str| {
            samples(&metrics, "ballast_endpoints").iter().any(|(l, v)| {
                l.get("service") == Some(&service) && l.get("state") == Some(&"ready") && *v == 2.0
            })
        };
        if synced == sidecars && ready("catalog.demo") && ready("payments.demo") {
            return Ok(());
        }
        if Instant::now() > deadline {
            let states: Vec<String> = proxies
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    format!("{} {}", p["pod"].as_str().unwrap_or("?"), p["state"].as_str().unwrap_or("?"))
                })
                .collect();
            return Err(DemoError::NotSettled(format!(
                "sidecars: {}; the client's endpoints: {}",
                states.join(", "),
                metrics.lines().filter(|l| l.starts_with("ballast_endpoints")).collect::<Vec<_>>().join("; ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends the traffic until `--duration` has passed or `stop` resolves, reporting as it
/// goes.
async fn traffic(args: &DemoArgs, mesh: &Mesh, stop: std::pin::Pin<&mut impl Future<Output = ()>>) {
    let outage = Outage::for_run(args.duration);
    let lockdown_at = Lockdown::at(args.duration);
    println!(
        "\nEach service gets {} req/s straight to its replicas in turn ('direct') and the same\n\
         through the client sidecar ('mesh'{}).\n{}",
        args.rate,
        if mesh.lockdown.is_some() { ", which calls their sidecars over mutual TLS" } else { "" },
        outage.describe()
    );
    if mesh.lockdown.is_some() {
        println!(
            "At {:.0}s, payments is locked down: mutual TLS only, and only from the client.",
            lockdown_at.as_secs_f64()
        );
    }
    let Mesh { catalog, payments, outbound, client_admin, servers, lockdown } = mesh;
    let (outbound, client_admin) = (*outbound, *client_admin);
    let direct: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mesh: Client<_, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(tower::service_fn(move |_uri: http::Uri| {
            Box::pin(async move { TcpStream::connect(outbound).await.map(TokioIo::new) })
        }));
    let table: Table = Arc::default();
    let started = Instant::now();
    let mut background = vec![
        tokio::spawn(run_outages(outage, catalog.to_vec(), started)),
        tokio::spawn(watch_circuits(client_admin, started)),
    ];
    if let Some(l) = lockdown {
        background.push(tokio::spawn(l.clone().run(lockdown_at, started)));
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    let mut report = tokio::time::interval(Duration::from_secs(args.report_every.max(1)));
    report.tick().await;
    let until = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    let mut stop = stop;
    let mut n: usize = 0;
    // The report being printed, awaited before the final one so that it comes first.
    let mut last_report = None;
    loop {
        tokio::select! {
            _ = &mut until => break,
            _ = stop.as_mut() => break,
            _ = report.tick() => {
                // The final table follows at once.
                let ending = args.duration.is_some_and(|d| started.elapsed() + Duration::from_millis(500) >= d);
                if !ending {
                    // Printed with the callers the services' sidecars counted, read
                    // aside so that the traffic keeps its pace meanwhile.
                    let table = render_table(&table, "so far", started.elapsed());
                    let servers = servers.clone();
                    last_report = Some(tokio::spawn(async move {
                        print!("{table}{}", Peers::read(&servers).await.summary());
                    }));
                }
            }
            _ = tick.tick() => {
                n += 1;
                let targets: [(&'static str, &'static str, String); 4] = [
                    ("catalog", "direct", format!("http://{}/items", catalog[n % 2].addr)),
                    ("catalog", "mesh", "http://catalog/items".to_string()),
                    ("payments", "direct", format!("http://{}/charge", payments[n % 2].addr)),
                    ("payments", "mesh", "http://payments/charge".to_string()),
                ];
                for (svc, path, url) in targets {
                    let (direct, mesh, table) = (direct.clone(), mesh.clone(), table.clone());
                    tokio::spawn(async move {
                        let Ok(req) = http::Request::get(url).header(PATH_HEADER, path).body(Empty::new()) else {
                            return;
                        };
                        let t = Instant::now();
                        let fut = if path == "mesh" { mesh.request(req) } else { direct.request(req) };
                        let ok = match tokio::time::timeout(Duration::from_secs(2), fut).await {
                            Ok(Ok(rsp)) => {
                                let ok = rsp.status().is_success();
                                let _ = rsp.into_body().collect().await;
                                ok
                            }
                            _ => false,
                        };
                        table
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry((svc, path))
                            .or_default()
                            .record(ok, t.elapsed().as_secs_f64());
                    });
                }
            }
        }
    }
    for task in &background {
        task.abort();
    }
    // Let the requests in flight finish (the slowest take 300 ms, bounded by 2 s).
    tokio::time::sleep(Duration::from_millis(400)).await;
    if let Some(report) = last_report {
        let _ = report.await;
    }
    let peers = Peers::read(servers).await;
    print!("{}{}", render_table(&table, "final", started.elapsed()), peers.summary());
    if let Some((200, metrics)) = admin_call(client_admin, Method::GET, "/metrics").await {
        println!("\nWhat the client sidecar counted (its /metrics):");
        print!("{}", render_counted(&metrics));
    }
    println!(
        "\nWho called whom, as the services' sidecars verified it\n\
         (ballast_inbound_requests_by_peer_total{{service,peer_identity,tls}}):"
    );
    print!("{}", peers.table());
}

async fn admin_call(admin: SocketAddr, method: Method, path: &str) -> Option<(u16, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_labels_and_values() {
        let text = "# HELP x\nballast_circuit_state{service=\"catalog.demo\"} 1\n\
                    ballast_circuit_state_other 3\nballast_config_version 7\n\
                    ballast_rejections_total{direction=\"outbound\",reason=\"circuit-open\",service=\"a.b\"} 38\n";
        let s = samples(text, "ballast_circuit_state");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0.get("service"), Some(&"catalog.demo"));
        assert_eq!(s[0].1, 1.0);
        assert_eq!(samples(text, "ballast_config_version")[0].1, 7.0);
        let r = samples(text, "ballast_rejections_total");
        assert_eq!((r[0].0.get("reason"), r[0].1), (Some(&"circuit-open"), 38.0));
    }

    #[test]
    fn the_outage_fits_the_run() {
        let o = Outage::for_run(Some(Duration::from_secs(12)));
        assert_eq!((o.start, o.length), (Duration::from_secs(4), Duration::from_secs(3)));
        let o = Outage::for_run(Some(Duration::from_secs(60)));
        assert_eq!((o.start, o.length), (Duration::from_secs(20), Duration::from_secs(5)));
        assert!(Outage::for_run(None).every.is_some());
    }

    #[test]
    fn the_demo_policies_validate() {
        let docs = format!("{SERVICES}---\n{PAYMENTS_POLICY}---\n{CATALOG_POLICY}");
        ballast_api::Config::from_yaml(&docs, "demo").expect("valid");
        let locked = format!("{SERVICES}---\n{PAYMENTS_POLICY}{PAYMENTS_LOCKDOWN}");
        let config = ballast_api::Config::from_yaml(&locked, "demo").expect("valid");
        let inbound = config.policies["demo/payments"].spec.inbound.clone().expect("inbound");
        assert_eq!(inbound.mtls, Some(ballast_api::policy::MtlsMode::Strict));
        assert_eq!(inbound.allow, ["demo/client"]);
        assert!(config.policies["demo/payments"].spec.retries.is_some(), "the rest stays");
    }

    #[test]
    fn peers_sum_replicas_and_name_callers() {
        let client = "spiffe://cluster.local/ns/demo/sa/client";
        let mut peers = Peers::default();
        for _ in 0..2 {
            peers.add(&format!(
                "ballast_inbound_requests_by_peer_total{{peer_identity=\"{client}\",service=\"payments\",tls=\"true\"}} 9\n\
                 ballast_inbound_requests_by_peer_total{{peer_identity=\"\",service=\"payments\",tls=\"false\"}} 1\n"
            ));
        }
        assert_eq!(peers.share(), (18.0, 20.0));
        let summary = peers.summary();
        assert!(summary.starts_with("mTLS: 90.0% of the 20 requests"), "{summary}");
        assert!(summary.contains("demo/client -> payments 18"), "{summary}");
        assert!(summary.contains("plain text -> payments 2"), "{summary}");
        assert!(peers.table().contains(client), "{}", peers.table());
    }
}
