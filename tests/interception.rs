//! Traffic interception, tested for real with network namespaces, iptables and an
//! unmodified `curl`.
//!
//! Each test builds its own namespaces (unique names: pid + counter, so tests running in
//! parallel never collide) and deletes them when it ends, even when it panics. Nothing is
//! installed in, or sent through, the host's own network namespace: addresses live in
//! 10.250.0.0/30 on a veth pair between the test's two namespaces (plus, in some tests, a
//! route in the app namespace for the service range 10.96.0.0/16 via that veth pair).
//!
//! What it proves:
//! - `init --dry-run` prints the rules and leaves the nat table untouched;
//! - `init` is idempotent: a second run leaves `iptables-save -t nat` identical;
//! - outbound: `curl` in the app namespace reaches a server in another namespace through
//!   the sidecar (the sidecar's metrics count exactly that one request, so its own
//!   upstream connection was not looped back into it), and only through it: with the
//!   sidecar stopped, the same `curl` is refused at the redirect target, while `curl` run
//!   as the proxy UID still reaches the server (the UID exclusion);
//! - inbound: a connection from the other namespace to the app's port goes through the
//!   inbound listener (the app sees it come from 127.0.0.1 and the metrics count it), the
//!   admin port is not redirected, and with the sidecar stopped the app port is unreachable;
//! - routing by original destination: a connection to a service's virtual IP (10.96.0.10,
//!   which exists nowhere) is sent by the sidecar to the service's endpoints in the other
//!   namespace, for HTTP (counted under the service, balanced over both endpoints under
//!   concurrent load) and for opaque TCP; with the sidecar stopped it is refused.
//!
//! The HTTP servers are threads of this test process that entered a namespace with
//! `setns(2)` before binding, so their sockets live in that namespace and they can record
//! who connected. Everything else runs through `ip netns exec`.
//!
//! Needs root, `ip`, `iptables` (with `iptables-save`/`iptables-restore`), `curl`,
//! `setpriv`, and the sidecar binary (`cargo build --workspace --bins`). A missing
//! requirement fails the test with a message saying what to install; it is never skipped.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

const PROXY_UID: u32 = 2102;
const APP_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const SRV_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
const SERVER_PORT: u16 = 8080;
const APP_PORT: u16 = 9090;
const ADMIN: &str = "http://127.0.0.1:4191";
/// curl's exit code for "failed to connect" (connection refused).
const CURL_COULDNT_CONNECT: i32 = 7;

// ---------------------------------------------------------------------------------------
// Requirements
// ---------------------------------------------------------------------------------------

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// Fails (never skips) when the test cannot run here, saying why.
fn require_environment() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the interception tests need root (network namespaces and iptables); run them as root"
    );
    let missing: Vec<&str> = ["ip", "iptables", "iptables-save", "iptables-restore", "curl", "setpriv"]
        .into_iter()
        .filter(|t| !on_path(t))
        .collect();
    assert!(
        missing.is_empty(),
        "the interception tests need {missing:?} on PATH (Debian: apt-get install -y iproute2 iptables curl util-linux)"
    );
}

/// `target/<profile>/ballast-sidecar` (two directories up from this test executable,
/// `target/<profile>/deps/interception-<hash>`), as a path the proxy UID can execute.
///
/// The sidecar runs as UID 2102, which cannot reach a checkout under a private directory
/// (a CI clone in a 0700 temporary directory, say). Then the binary is copied into a
/// world-searchable temporary directory, returned so that it lives as long as the test.
fn sidecar_bin() -> (PathBuf, Option<tempfile::TempDir>) {
    let exe = std::env::current_exe().expect("the test executable's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .join("ballast-sidecar");
    assert!(bin.is_file(), "{} does not exist: run `cargo build --workspace --bins` first", bin.display());
    let runnable = Command::new("setpriv")
        .args([
            format!("--reuid={PROXY_UID}"),
            format!("--regid={PROXY_UID}"),
            "--clear-groups".into(),
            "--".into(),
        ])
        .arg(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runnable {
        return (bin, None);
    }
    let dir = tempfile::tempdir().expect("a temporary directory for the sidecar binary");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the directory");
    let copy = dir.path().join("ballast-sidecar");
    std::fs::copy(&bin, &copy).expect("copy the sidecar binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod the binary");
    (copy, Some(dir))
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (every command given here is short-lived or has its own
/// timeout, like `curl -m`).
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null());
    cmd.output().unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

/// Runs `cmd` and fails the test unless it succeeds; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstdout: {}\nstderr: {}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A unique suffix for this process and call.
fn unique_id() -> String {
    format!("{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// A network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str, id: &str) -> Netns {
        let name = format!("bl-{role}-{id}");
        ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// `ip netns exec <ns> <program> <args..>`.
    fn exec<I, S>(&self, program: impl AsRef<std::ffi::OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program).args(args);
        cmd
    }

    /// Like [`Netns::exec`], as the proxy UID (and GID), with no supplementary groups.
    fn exec_as_proxy<I, S>(&self, program: impl AsRef<std::ffi::OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let id = PROXY_UID.to_string();
        let mut cmd = self.exec(
            "setpriv",
            [format!("--reuid={id}"), format!("--regid={id}"), "--clear-groups".into(), "--".into()],
        );
        cmd.arg(program).args(args);
        cmd
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `iptables-save -t nat` without comments and with counters zeroed, so two saves of
    /// the same rules compare equal.
    fn nat_table(&self) -> String {
        let saved = ok(&mut self.exec("iptables-save", ["-t", "nat"]));
        saved
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
                (true, Some(i)) => format!("{} [0:0]", &l[..i]),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip").args(["netns", "del", &self.name]).stdin(Stdio::null()).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: cannot delete network namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: cannot delete network namespace {}: {e}", self.name),
        }
    }
}

/// An "app" namespace (where the sidecar intercepts) and a "server" namespace, joined by
/// a veth pair: app 10.250.0.1/30, server 10.250.0.2/30.
struct Topology {
    app: Netns,
    srv: Netns,
}

impl Topology {
    fn new() -> Topology {
        let id = unique_id();
        let app = Netns::new("app", &id);
        let srv = Netns::new("srv", &id);
        // Created inside the app namespace with its peer moved straight into the server
        // namespace: the host's namespace never sees these interfaces.
        ok(Command::new("ip").args([
            "-n", &app.name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns",
            &srv.name,
        ]));
        for (ns, dev, ip) in [(&app, "veth0", APP_IP), (&srv, "veth1", SRV_IP)] {
            ok(Command::new("ip").args(["-n", &ns.name, "addr", "add", &format!("{ip}/30"), "dev", dev]));
            ok(Command::new("ip").args(["-n", &ns.name, "link", "set", dev, "up"]));
        }
        Topology { app, srv }
    }
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP server living in a namespace
// ---------------------------------------------------------------------------------------

/// One request a [`TestServer`] received.
#[derive(Debug, Clone)]
struct Seen {
    peer: SocketAddr,
    /// The request line, e.g. `GET /path HTTP/1.1`.
    request_line: String,
    /// The whole request head (request line and headers), when the handler records it.
    head: String,
}

/// An HTTP/1.1 server on a thread that entered a network namespace. Every request gets
/// `200 OK` with body `<name> <path>\n`. Stopped on drop.
struct TestServer {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> std::io::Result<()> {
    let ns = File::open(path)?;
    // SAFETY: `ns` is an open namespace file descriptor for the duration of the call;
    // setns only changes this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What a [`TestServer`] does with each accepted connection.
type Handler = fn(TcpStream, SocketAddr, &str, &Mutex<Vec<Seen>>) -> std::io::Result<()>;

impl TestServer {
    fn start(ns: &Netns, addr: SocketAddr, name: &'static str) -> TestServer {
        TestServer::start_with(ns, addr, name, serve_one)
    }

    /// Like [`TestServer::start`], handling each connection with `handler`.
    fn start_with(ns: &Netns, addr: SocketAddr, name: &'static str, handler: Handler) -> TestServer {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let path = ns.path();
        let thread = thread::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            move || {
                let listener = enter_netns(&path).and_then(|()| {
                    let l = TcpListener::bind(addr)?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                });
                let listener = match listener {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            if let Err(e) = handler(stream, peer, name, &seen) {
                                eprintln!("{name}: connection from {peer}: {e}");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => {
                            eprintln!("{name}: accept failed: {e}");
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{name}: cannot listen on {addr} in namespace {}: {e}", ns.name),
            Err(e) => panic!("{name}: did not start listening on {addr}: {e}"),
        }
        TestServer { seen, stop, thread: Some(thread) }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request head, records it, answers, and closes the connection.
fn serve_one(
    mut stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(()); // closed (or not HTTP) before a full request head
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let request_line = head.lines().next().unwrap_or_default().to_owned();
    let path = request_line.split(' ').nth(1).unwrap_or("?");
    let body = format!("{name} {path}\n");
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
        peer,
        request_line: request_line.clone(),
        head: head.to_string(),
    });
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

// ---------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct CurlResult {
    /// curl's exit code (0: a response was received).
    exit: i32,
    /// The HTTP status (0 when there was no response).
    status: u16,
    body: String,
    stderr: String,
}

const STATUS_MARKER: &str = "\n@@curl-status=";

/// Runs `cmd` (a curl command line) and parses what it printed.
fn curl(mut cmd: Command) -> CurlResult {
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, status) = stdout.rsplit_once(STATUS_MARKER).unwrap_or((&stdout, "0"));
    CurlResult {
        exit: out.status.code().unwrap_or(-1),
        status: status.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The arguments of an unmodified, non-proxied `curl` of `url`, with a 5 s overall limit.
fn curl_args(url: &str) -> Vec<String> {
    ["-sS", "-m", "5", "--noproxy", "*", "-w", &format!("{STATUS_MARKER}%{{http_code}}"), url]
        .map(str::to_owned)
        .to_vec()
}

// ---------------------------------------------------------------------------------------
// The sidecar
// ---------------------------------------------------------------------------------------

/// `ballast-sidecar run` inside the app namespace as the proxy UID; killed on drop.
struct Sidecar {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    fn start(ns: &Netns, bin: &Path) -> Sidecar {
        Sidecar::start_with_config(ns, bin, "")
    }

    /// Like [`Sidecar::start`], with `config` (YAML) as its config file.
    fn start_with_config(ns: &Netns, bin: &Path, config: &str) -> Sidecar {
        Sidecar::start_with_args(ns, bin, config, &[])
    }

    /// Like [`Sidecar::start_with_config`], with `extra` appended to its command line
    /// (e.g. `--detect-timeout=2s`).
    fn start_with_args(ns: &Netns, bin: &Path, config: &str, extra: &[&str]) -> Sidecar {
        // The proxy UID must be able to run the binary and read its config.
        let check = output(&mut ns.exec_as_proxy(bin, ["--version"]));
        assert!(
            check.status.success(),
            "{} cannot be run as uid {PROXY_UID} ({}): {}; make every directory on its path \
             world-searchable and the file world-executable",
            bin.display(),
            check.status,
            String::from_utf8_lossy(&check.stderr).trim()
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temporary directory");
        let config_path = dir.path().join("ballast.yaml");
        std::fs::write(&config_path, config).expect("write the config");
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644))
            .expect("chmod the config");
        let log = dir.path().join("sidecar.log");
        let log_file = File::create(&log).expect("create the sidecar log");
        let mut cmd = ns.exec_as_proxy(bin, ["run", "--config"]);
        cmd.arg(&config_path)
            .args([
                "--outbound-addr=127.0.0.1:4140",
                "--inbound-addr=0.0.0.0:4143",
                "--admin-addr=0.0.0.0:4191",
                "--app-addr=127.0.0.1:8080",
                "--egress-dns=false",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup the log file"))
            .stderr(log_file);
        eprintln!("starting: {}", describe(&cmd));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
        let mut sidecar = Sidecar { child: Some(child), log, _dir: dir };
        sidecar.wait_ready(ns);
        sidecar
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(cannot read the log: {e})"))
    }

    /// Polls `/ready` from inside the namespace: at most 100 tries over about 10 s.
    fn wait_ready(&mut self, ns: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = None;
        for _ in 0..100 {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the sidecar exited before becoming ready ({status}); its log:\n{}", self.log());
            }
            let r = curl(ns.exec("curl", curl_args(&format!("{ADMIN}/ready"))));
            if r.status == 200 {
                return;
            }
            last = Some(r);
            if Instant::now() > deadline {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let last = last.map(|r| format!("status {}, curl exit {}: {}", r.status, r.exit, r.stderr.trim()));
        panic!(
            "the sidecar did not become ready within 10 s (last /ready: {}); its log:\n{}",
            last.unwrap_or_default(),
            self.log()
        );
    }

    /// Kills the sidecar (SIGKILL) and waits for it to be gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("--- sidecar log ---\n{}--- end of sidecar log ---", self.log());
        }
    }
}

/// `ballast-sidecar init` in `ns` with the default ports and UID.
fn init(ns: &Netns, bin: &Path, extra: &[&str]) {
    let mut args = vec!["init"];
    args.extend_from_slice(extra);
    ok(&mut ns.exec(bin, args));
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

fn scrape(ns: &Netns) -> String {
    let r = curl(ns.exec("curl", curl_args(&format!("{ADMIN}/metrics"))));
    assert_eq!(r.status, 200, "GET /metrics failed: {r:?}");
    r.body
}

/// The sum of the samples of `name` whose labels include all of `labels` (0 if none).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let have: Vec<(&str, &str)> = series_labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if labels.iter().all(|want| have.contains(want)) {
            total += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// Scrapes until `name{labels}` reaches `want` (at most 50 tries over about 5 s), then
/// returns the last scrape. Metrics may be recorded just after curl has its response.
fn wait_metric(ns: &Netns, name: &str, labels: &[(&str, &str)], want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(ns);
        if metric(&text, name, labels) >= want || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    text
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Rules every install must contain, in `iptables-save` form (which is also the form
/// `--dry-run` prints them in).
const EXPECTED_RULES: &[&str] = &[
    "-A BALLAST_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
    "-A BALLAST_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
    "-A BALLAST_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
    "-A BALLAST_INBOUND -p tcp -j REDIRECT --to-ports 4143",
    "-A BALLAST_OUTPUT -m owner --uid-owner 2102 -j RETURN",
    "-A BALLAST_OUTPUT -o lo -j RETURN",
    "-A BALLAST_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A BALLAST_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
    "-A BALLAST_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
];
const JUMPS: &[&str] = &["-A PREROUTING -p tcp -j BALLAST_INBOUND", "-A OUTPUT -p tcp -j BALLAST_OUTPUT"];
const SKIPS: &[&str] = &["--skip-inbound-ports", "22", "--skip-outbound-ports", "5432"];

#[test]
fn init_dry_run_prints_the_rules_without_touching_the_nat_table() {
    require_environment();
    let (bin, _bin_dir) = sidecar_bin();
    let ns = Netns::new("dry", &unique_id());
    let before = ns.nat_table();

    let mut args = vec!["init", "--dry-run"];
    args.extend_from_slice(SKIPS);
    let printed = ok(&mut ns.exec(&bin, args));

    for rule in EXPECTED_RULES {
        assert!(printed.lines().any(|l| l == *rule), "--dry-run did not print `{rule}`:\n{printed}");
    }
    for jump in JUMPS {
        let command = format!("iptables -t nat {}", jump);
        assert!(printed.contains(&command), "--dry-run did not print `{command}`:\n{printed}");
    }
    let after = ns.nat_table();
    assert_eq!(before, after, "--dry-run changed the nat table");
    assert!(!after.contains("BALLAST"), "--dry-run installed rules:\n{after}");
}

#[test]
fn init_is_idempotent() {
    require_environment();
    let (bin, _bin_dir) = sidecar_bin();
    let ns = Netns::new("idem", &unique_id());

    init(&ns, &bin, SKIPS);
    let first = ns.nat_table();
    init(&ns, &bin, SKIPS);
    let second = ns.nat_table();

    assert_eq!(first, second, "a second `init` changed the nat table");
    for rule in EXPECTED_RULES {
        assert_eq!(
            first.lines().filter(|l| l == rule).count(),
            1,
            "`{rule}` should be installed exactly once:\n{first}"
        );
    }
    for jump in JUMPS {
        assert_eq!(
            first.lines().filter(|l| l == jump).count(),
            1,
            "`{jump}` should be installed exactly once:\n{first}"
        );
    }
    // The REDIRECTs come after every exclusion of their chain.
    let lines: Vec<&str> = first.lines().collect();
    for (chain, redirect) in
        [("BALLAST_INBOUND", "REDIRECT --to-ports 4143"), ("BALLAST_OUTPUT", "REDIRECT --to-ports 4140")]
    {
        let prefix = format!("-A {chain} ");
        let last = lines.iter().rev().find(|l| l.starts_with(&prefix)).expect("the chain has rules");
        assert!(last.ends_with(redirect), "the last rule of {chain} should be the redirect, is `{last}`");
    }
}

#[test]
fn outbound_traffic_reaches_the_server_only_through_the_sidecar() {
    require_environment();
    let (bin, _bin_dir) = sidecar_bin();
    let net = Topology::new();
    let server = TestServer::start(&net.srv, SocketAddr::from((SRV_IP, SERVER_PORT)), "server");
    init(&net.app, &bin, &[]);
    let mut sidecar = Sidecar::start(&net.app, &bin);

    // An unmodified curl in the app namespace, addressing the server directly.
    let url = format!("http://{SRV_IP}:{SERVER_PORT}/through-the-sidecar");
    let r = curl(net.app.exec("curl", curl_args(&url)));
    assert_eq!((r.exit, r.status), (0, 200), "curl through the sidecar failed: {r:?}");
    assert_eq!(r.body, "server /through-the-sidecar\n");
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "the server should have seen exactly one request: {seen:?}");
    assert_eq!(seen[0].request_line, "GET /through-the-sidecar HTTP/1.1");
    assert_eq!(seen[0].peer.ip(), APP_IP, "the request should come from the app namespace");

    // The sidecar handled it, exactly once: had its own upstream connection been
    // redirected back into it, it would have counted (and looped) again.
    let requests = [("direction", "outbound"), ("service", "passthrough"), ("status_code", "200")];
    let text = wait_metric(&net.app, "ballast_requests_total", &requests, 1.0);
    assert_eq!(
        metric(&text, "ballast_requests_total", &requests),
        1.0,
        "the sidecar should count exactly one outbound passthrough request:\n{text}"
    );
    assert_eq!(
        metric(&text, "ballast_requests_total", &[("direction", "outbound"), ("outcome", "success")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "ballast_tcp_connections_total", &[("direction", "outbound"), ("protocol", "http1")]),
        1.0,
        "the sidecar should have accepted exactly one outbound connection:\n{text}"
    );
    assert_eq!(metric(&text, "ballast_tcp_connections_total", &[("direction", "inbound")]), 0.0, "{text}");

    // Without the sidecar the same curl is refused at the redirect target (127.0.0.1:4140):
    // there is no path to the server around it.
    sidecar.kill();
    let r = curl(net.app.exec("curl", curl_args(&url)));
    assert_eq!(
        r.exit, CURL_COULDNT_CONNECT,
        "with the sidecar stopped, curl from the app should be refused: {r:?}"
    );
    assert_eq!(server.seen().len(), 1, "the server was reached without the sidecar");

    // ...while the proxy's UID is not redirected: that is how the sidecar's own upstream
    // connections reach the server instead of looping back into it.
    let url = format!("http://{SRV_IP}:{SERVER_PORT}/as-the-proxy-uid");
    let r = curl(net.app.exec_as_proxy("curl", curl_args(&url)));
    assert_eq!((r.exit, r.status), (0, 200), "curl as uid {PROXY_UID} should bypass the redirect: {r:?}");
    assert_eq!(r.body, "server /as-the-proxy-uid\n");
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].peer.ip(), APP_IP);
}

#[test]
fn inbound_connections_to_the_app_pass_through_the_inbound_listener() {
    require_environment();
    let (bin, _bin_dir) = sidecar_bin();
    let net = Topology::new();
    let app = TestServer::start(&net.app, SocketAddr::from((Ipv4Addr::UNSPECIFIED, APP_PORT)), "app");
    init(&net.app, &bin, &[]);
    let mut sidecar = Sidecar::start(&net.app, &bin);

    // From the server namespace to the app's address and port.
    let url = format!("http://{APP_IP}:{APP_PORT}/inbound");
    let r = curl(net.srv.exec("curl", curl_args(&url)));
    assert_eq!((r.exit, r.status), (0, 200), "inbound curl failed: {r:?}");
    assert_eq!(r.body, "app /inbound\n");
    let seen = app.seen();
    assert_eq!(seen.len(), 1, "the app should have seen exactly one request: {seen:?}");
    assert_eq!(seen[0].request_line, "GET /inbound HTTP/1.1");
    // The sidecar forwards inbound connections to 127.0.0.1:<original port>; a connection
    // that bypassed it would come from the server namespace's address.
    assert_eq!(
        seen[0].peer.ip(),
        Ipv4Addr::LOCALHOST,
        "the app should see the inbound listener's forward, not the client ({SRV_IP})"
    );

    let requests = [("direction", "inbound"), ("service", "app"), ("status_code", "200")];
    let text = wait_metric(&net.app, "ballast_requests_total", &requests, 1.0);
    assert_eq!(
        metric(&text, "ballast_requests_total", &requests),
        1.0,
        "the sidecar should count exactly one inbound request:\n{text}"
    );
    assert_eq!(
        metric(&text, "ballast_tcp_connections_total", &[("direction", "inbound"), ("protocol", "http1")]),
        1.0,
        "{text}"
    );
    // Its forward to the app (loopback, proxy UID) did not come back in as outbound.
    assert_eq!(metric(&text, "ballast_requests_total", &[("direction", "outbound")]), 0.0, "{text}");

    // The admin port is reached directly from outside, not through the inbound listener.
    let r = curl(net.srv.exec("curl", curl_args(&format!("http://{APP_IP}:4191/ready"))));
    assert_eq!((r.exit, r.status), (0, 200), "the admin port should be reachable from outside: {r:?}");
    let text = scrape(&net.app);
    assert_eq!(
        metric(&text, "ballast_tcp_connections_total", &[("direction", "inbound")]),
        1.0,
        "a connection to the admin port went through the inbound listener:\n{text}"
    );

    // Without the sidecar, the app port is unreachable from outside: connections to it
    // are redirected to the (closed) inbound port.
    sidecar.kill();
    let r = curl(net.srv.exec("curl", curl_args(&url)));
    assert_eq!(
        r.exit, CURL_COULDNT_CONNECT,
        "with the sidecar stopped, inbound connections should be refused: {r:?}"
    );
    assert_eq!(app.seen().len(), 1, "the app was reached without the sidecar");
}

// ---------------------------------------------------------------------------------------
// Routing by original destination to a service's virtual address
// ---------------------------------------------------------------------------------------

/// A service virtual IP (a ClusterIP) that exists nowhere: no interface, in no namespace,
/// has it. A connection to it can only be answered through the sidecar.
const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
/// The two endpoints of the service, both in the server namespace.
const ENDPOINT_PORTS: [u16; 2] = [SERVER_PORT, SERVER_PORT + 1];

/// A `Service` named `web` in namespace `default` with [`SERVICE_VIP`]:[`SERVICE_PORT`]
/// as its virtual address and the [`ENDPOINT_PORTS`] on the server as its endpoints.
fn web_service_yaml() -> String {
    let endpoints: Vec<String> =
        ENDPOINT_PORTS.iter().map(|p| format!("{{address: \"{SRV_IP}:{p}\"}}")).collect();
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec:\n  ports: [{{port: {SERVICE_PORT}}}]\n  addresses: [{SERVICE_VIP}]\n  endpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// Gives the app namespace a route to the service range (10.96.0.0/16) via the server end
/// of the veth, so that `connect()` to [`SERVICE_VIP`] has a route and reaches the nat
/// OUTPUT chain (without one it fails with "network unreachable" before any iptables
/// rule sees it). The redirect then sends the connection to the local sidecar; were a
/// packet ever not redirected, it would reach the server namespace, which neither owns
/// the address nor forwards, and be dropped there: nothing leaves the test's namespaces.
fn route_service_range(net: &Topology) {
    ok(Command::new("ip").args([
        "-n",
        &net.app.name,
        "route",
        "add",
        "10.96.0.0/16",
        "via",
        &SRV_IP.to_string(),
    ]));
}

/// Echoes every byte it reads until the client half-closes, then closes. Records the
/// connection with the bytes it received (escaped) as its "request line".
fn echo_one(
    mut stream: TcpStream,
    peer: SocketAddr,
    _name: &str,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: each read waits at most 5 s, and at most 64 KiB are accepted.
    while received.len() <= 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
        received.extend_from_slice(&buf[..n]);
    }
    let request_line = received.escape_ascii().to_string();
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen { peer, request_line, head: String::new() });
    Ok(())
}

/// Runs `f` on a thread that entered the network namespace `ns`, and returns its result
/// (the calling thread stays where it is).
fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    let name = ns.name.clone();
    thread::spawn(move || {
        enter_netns(&path).unwrap_or_else(|e| panic!("cannot enter network namespace {name}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Opaque bytes, not the start of any protocol the sidecar detects.
const OPAQUE: &[u8] = b"\x00\x01ping\n";

/// From inside `ns`: connects to `dst`, sends [`OPAQUE`], reads as many bytes back, then
/// half-closes and reads until the peer closes. Returns (echoed bytes, trailing bytes).
fn opaque_exchange(ns: &Netns, dst: SocketAddr) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(OPAQUE)?;
        let mut echoed = vec![0u8; OPAQUE.len()];
        s.read_exact(&mut echoed)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok((echoed, rest))
    })
}

#[test]
fn outbound_to_a_service_virtual_ip_is_routed_to_its_endpoints() {
    require_environment();
    let (bin, _bin_dir) = sidecar_bin();
    let net = Topology::new();
    route_service_range(&net);
    let servers = [
        TestServer::start(&net.srv, SocketAddr::from((SRV_IP, ENDPOINT_PORTS[0])), "web-0"),
        TestServer::start(&net.srv, SocketAddr::from((SRV_IP, ENDPOINT_PORTS[1])), "web-1"),
    ];
    let seen_total = || servers.iter().map(|s| s.seen().len()).sum::<usize>();
    init(&net.app, &bin, &[]);
    let mut sidecar = Sidecar::start_with_config(&net.app, &bin, &web_service_yaml());

    let web = [("direction", "outbound"), ("service", "web.default")];
    let text = scrape(&net.app);
    assert_eq!(
        metric(&text, "ballast_endpoints", &[("service", "web.default"), ("state", "ready")]),
        2.0,
        "the sidecar should know the two endpoints of web.default:\n{text}"
    );

    // An unmodified curl in the app namespace, addressing the service's virtual IP: the
    // sidecar finds `web` by the original destination and sends the request to one of its
    // endpoints (a different port on a different address).
    let url = format!("http://{SERVICE_VIP}/to-the-vip");
    let r = curl(net.app.exec("curl", curl_args(&url)));
    assert_eq!((r.exit, r.status), (0, 200), "curl to the service's virtual IP failed: {r:?}");
    assert!(
        r.body == "web-0 /to-the-vip\n" || r.body == "web-1 /to-the-vip\n",
        "the answer should come from an endpoint of web: {r:?}"
    );
    let seen: Vec<Seen> = servers.iter().flat_map(TestServer::seen).collect();
    assert_eq!(seen.len(), 1, "the endpoints should have seen exactly one request: {seen:?}");
    assert_eq!(seen[0].request_line, "GET /to-the-vip HTTP/1.1");
    assert_eq!(seen[0].peer.ip(), APP_IP, "the sidecar's upstream connection comes from the app namespace");

    let success = [web[0], web[1], ("status_code", "200"), ("outcome", "success")];
    let text = wait_metric(&net.app, "ballast_requests_total", &success, 1.0);
    assert_eq!(
        metric(&text, "ballast_requests_total", &success),
        1.0,
        "the request should be counted under service=\"web.default\":\n{text}"
    );
    assert_eq!(
        metric(&text, "ballast_requests_total", &[("service", "passthrough")]),
        0.0,
        "a request to a service's virtual IP is not passthrough:\n{text}"
    );

    // Concurrent load is balanced over both endpoints (sequential requests may all go to
    // one: peak-EWMA prefers the endpoint that has been fastest).
    const CONCURRENT: usize = 24;
    let mut args: Vec<String> = ["-sS", "-m", "20", "--noproxy", "*", "--parallel", "--parallel-max", "8"]
        .map(str::to_owned)
        .to_vec();
    args.extend(["-w".to_owned(), format!("{STATUS_MARKER}%{{http_code}}\n")]);
    args.extend((0..CONCURRENT).map(|i| format!("http://{SERVICE_VIP}/balanced-{i}")));
    let out = output(&mut net.app.exec("curl", args));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "parallel curl to the virtual IP failed ({}): {}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches(&format!("{STATUS_MARKER}200")).count(),
        CONCURRENT,
        "every concurrent request should get a 200:\n{stdout}"
    );
    assert_eq!(seen_total(), 1 + CONCURRENT, "the endpoints should have seen every request");
    for (server, port) in servers.iter().zip(ENDPOINT_PORTS) {
        let seen = server.seen();
        let balanced = seen.iter().filter(|s| s.request_line.starts_with("GET /balanced-")).count();
        assert!(balanced > 0, "endpoint {SRV_IP}:{port} got none of {CONCURRENT} concurrent requests");
        assert!(seen.iter().all(|s| s.peer.ip() == APP_IP), "{seen:?}");
    }
    let want = (1 + CONCURRENT) as f64;
    let text = wait_metric(&net.app, "ballast_requests_total", &success, want);
    assert_eq!(metric(&text, "ballast_requests_total", &success), want, "{text}");
    assert_eq!(metric(&text, "ballast_requests_total", &[("direction", "outbound")]), want, "{text}");

    // 10.96.0.10 exists nowhere: without the sidecar the same curl is refused at the
    // redirect target, and no endpoint sees anything more.
    sidecar.kill();
    let r = curl(net.app.exec("curl", curl_args(&url)));
    assert_eq!(
        r.exit, CURL_COULDNT_CONNECT,
        "with the sidecar stopped, curl to the virtual IP should be refused: {r:?}"
    );
    assert_eq!(seen_total(), 1 + CONCURRENT, "an endpoint was reached without the sidecar");
}

#[test]
fn opaque_tcp_to_a_service_virtual_ip_is_forwarded_to_its_endpoints() {
    require_environment();
    let (bin, _bin_dir) = sidecar_bin();
    let net = Topology::new();
    route_service_range(&net);
    let servers = [
        TestServer::start_with(&net.srv, SocketAddr::from((SRV_IP, ENDPOINT_PORTS[0])), "echo-0", echo_one),
        TestServer::start_with(&net.srv, SocketAddr::from((SRV_IP, ENDPOINT_PORTS[1])), "echo-1", echo_one),
    ];
    let seen = || servers.iter().flat_map(TestServer::seen).collect::<Vec<_>>();
    init(&net.app, &bin, &[]);
    let mut sidecar = Sidecar::start_with_config(&net.app, &bin, &web_service_yaml());

    // Bytes that are not HTTP (nor TLS, nor HTTP/2), from a plain socket in the app
    // namespace to the virtual IP: forwarded as opaque TCP to an endpoint, which echoes.
    const CONNECTIONS: usize = 6;
    let vip = SocketAddr::from((SERVICE_VIP, SERVICE_PORT));
    for i in 0..CONNECTIONS {
        let (echoed, rest) =
            opaque_exchange(&net.app, vip).unwrap_or_else(|e| panic!("connection {i} to {vip} failed: {e}"));
        assert_eq!(echoed, OPAQUE, "connection {i}: the endpoint's echo should come back unchanged");
        assert!(rest.is_empty(), "connection {i}: unexpected bytes after the echo: {rest:?}");
    }
    let all = seen();
    assert_eq!(all.len(), CONNECTIONS, "the endpoints should have seen every connection: {all:?}");
    let want = OPAQUE.escape_ascii().to_string();
    for s in &all {
        assert_eq!(s.request_line, want, "an endpoint received other bytes: {all:?}");
        assert_eq!(s.peer.ip(), APP_IP, "the sidecar's upstream connection comes from the app namespace");
    }

    let opaque = [("direction", "outbound"), ("protocol", "opaque")];
    let n = CONNECTIONS as f64;
    let text = wait_metric(&net.app, "ballast_tcp_connections_total", &opaque, n);
    assert_eq!(
        metric(&text, "ballast_tcp_connections_total", &opaque),
        n,
        "the sidecar should count each connection as outbound opaque TCP:\n{text}"
    );
    let bytes = (CONNECTIONS * OPAQUE.len()) as f64;
    let text = wait_metric(&net.app, "ballast_tcp_write_bytes_total", &[("direction", "outbound")], bytes);
    for name in ["ballast_tcp_read_bytes_total", "ballast_tcp_write_bytes_total"] {
        assert_eq!(metric(&text, name, &[("direction", "outbound")]), bytes, "{name}:\n{text}");
    }
    assert_eq!(metric(&text, "ballast_requests_total", &[]), 0.0, "opaque TCP is not HTTP requests:\n{text}");

    // Without the sidecar the virtual IP is unreachable: refused at the redirect target.
    sidecar.kill();
    match opaque_exchange(&net.app, vip) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("with the sidecar stopped, a connection to {vip} should be refused, got {other:?}"),
    }
    assert_eq!(seen().len(), CONNECTIONS, "an endpoint was reached without the sidecar");
}

// ---------------------------------------------------------------------------------------
// Regressions
// ---------------------------------------------------------------------------------------

/// The sidecar's outbound port (it listens on 127.0.0.1 only).
const OUTBOUND_PORT: u16 = 4140;

#[test]
fn outbound_port_is_not_an_open_proxy_from_the_network() {
    require_environment();
    let (bin, _bin_dir) = sidecar_bin();
    let net = Topology::new();
    let server = TestServer::start(&net.srv, SocketAddr::from((SRV_IP, SERVER_PORT)), "server");
    init(&net.app, &bin, &[]);
    let _sidecar = Sidecar::start(&net.app, &bin);

    // From the server namespace: the app's address at the outbound port, asking for the
    // server itself. Were it an open proxy, the server would answer 200 through the pod.
    let url = format!("http://{APP_IP}:{OUTBOUND_PORT}/open-proxy");
    let mut args = curl_args(&url);
    args.extend(["-H".to_owned(), format!("Host: {SRV_IP}:{SERVER_PORT}")]);
    let r = curl(net.srv.exec("curl", &args));
    assert!(r.exit != 0 || r.status != 200, "{APP_IP}:{OUTBOUND_PORT} proxied a request from outside: {r:?}");
    assert_eq!(
        r.exit, CURL_COULDNT_CONNECT,
        "{APP_IP}:{OUTBOUND_PORT} should be refused from outside (nothing listens there): {r:?}"
    );
    assert!(server.seen().is_empty(), "the server was reached through the pod: {:?}", server.seen());

    // Inbound connections to the outbound port are not redirected to the inbound listener
    // (which would forward them to 127.0.0.1:4140, the outbound proxy), and the exclusion
    // comes before the redirect.
    let skip = format!("-A BALLAST_INBOUND -p tcp -m tcp --dport {OUTBOUND_PORT} -j RETURN");
    let table = net.app.nat_table();
    let lines: Vec<&str> = table.lines().collect();
    let skip_at = lines.iter().position(|l| *l == skip);
    let redirect_at =
        lines.iter().position(|l| *l == "-A BALLAST_INBOUND -p tcp -j REDIRECT --to-ports 4143");
    assert!(
        matches!((skip_at, redirect_at), (Some(s), Some(r)) if s < r),
        "`{skip}` should be installed before the inbound redirect:\n{table}"
    );

    // Second line of defence: without the exclusion (rules from an older init), the
    // connection reaches the inbound listener, which refuses to forward to the sidecar's
    // own outbound listener: 508 Loop Detected, and the server still sees nothing.
    ok(&mut net.app.exec(
        "iptables",
        ["-t", "nat", "-D", "BALLAST_INBOUND", "-p", "tcp", "-m", "tcp", "--dport", "4140", "-j", "RETURN"],
    ));
    let table = net.app.nat_table();
    assert!(!table.contains("--dport 4140 -j RETURN"), "the exclusion was not removed:\n{table}");
    let r = curl(net.srv.exec("curl", &args));
    assert!(r.exit != 0 || r.status != 200, "{APP_IP}:{OUTBOUND_PORT} proxied a request from outside: {r:?}");
    assert_eq!(
        (r.exit, r.status),
        (0, 508),
        "the inbound listener should refuse to forward to its own outbound listener: {r:?}"
    );
    assert!(server.seen().is_empty(), "the server was reached through the pod: {:?}", server.seen());

    // The redirected connection was the inbound listener's; the outbound proxy saw nothing.
    let inbound = [("direction", "inbound")];
    let text = wait_metric(&net.app, "ballast_tcp_connections_total", &inbound, 1.0);
    assert_eq!(metric(&text, "ballast_tcp_connections_total", &inbound), 1.0, "{text}");
    assert_eq!(
        metric(&text, "ballast_tcp_connections_total", &[("direction", "outbound")]),
        0.0,
        "a connection from outside reached the outbound proxy:\n{text}"
    );
    assert_eq!(
        metric(&text, "ballast_requests_total", &[("direction", "outbound")]),
        0.0,
        "a request from outside went out through the outbound proxy:\n{text}"
    );
}

/// The app's own forward proxy, in the server namespace (not a mesh service).
const OWN_PROXY_PORT: u16 = 3128;

/// A forward proxy that records each request head. A `CONNECT` gets `200 Connection
/// established` and then an echo of the tunnelled bytes until the client half-closes; any
/// other request gets `200 OK` with body `<name> <request target>\n`.
fn own_proxy_one(
    mut stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: each read waits at most 5 s, and at most 64 KiB are accepted.
    let end = loop {
        if let Some(i) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 || received.len() > 64 * 1024 {
            return Ok(()); // closed (or not HTTP) before a full request head
        }
        received.extend_from_slice(&buf[..n]);
    };
    let tunnelled = received.split_off(end);
    let head = String::from_utf8_lossy(&received).into_owned();
    let request_line = head.lines().next().unwrap_or_default().to_owned();
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
        peer,
        request_line: request_line.clone(),
        head,
    });
    if request_line.starts_with("CONNECT ") {
        stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
        stream.write_all(&tunnelled)?;
        let mut total = tunnelled.len();
        while total <= 64 * 1024 {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n])?;
            total += n;
        }
        return Ok(());
    }
    let target = request_line.split(' ').nth(1).unwrap_or("?");
    let body = format!("{name} {target}\n");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// `user:pass`, as curl's `-U user:pass` sends it.
const PROXY_CREDENTIALS: &str = "Basic dXNlcjpwYXNz";
/// A raw `CONNECT` for the app's own proxy.
const CONNECT_REQUEST: &[u8] =
    b"CONNECT example.test:80 HTTP/1.1\r\nHost: example.test:80\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n";
/// Bytes sent through the app's own tunnel.
const TUNNELLED: &[u8] = b"through the app's own tunnel\n";

/// Whether a request head has a header `name: value` (name in any case).
fn has_header(head: &str, name: &str, value: &str) -> bool {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .any(|(n, v)| n.trim().eq_ignore_ascii_case(name) && v.trim() == value)
}

#[test]
fn an_apps_own_http_proxy_is_passed_through_untouched() {
    require_environment();
    let (bin, _bin_dir) = sidecar_bin();
    let net = Topology::new();
    let proxy_addr = SocketAddr::from((SRV_IP, OWN_PROXY_PORT));
    let proxy = TestServer::start_with(&net.srv, proxy_addr, "own-proxy", own_proxy_one);
    init(&net.app, &bin, &[]);
    let _sidecar = Sidecar::start(&net.app, &bin);

    // (a) An absolute-form request with proxy credentials, from an unmodified curl told to
    // use the proxy (`--noproxy ""` overrides any no_proxy in the environment). curl never
    // resolves example.test: it sends the URL to the proxy.
    let proxy_url = format!("http://{proxy_addr}");
    let args = [
        "-sS",
        "-m",
        "5",
        "--noproxy",
        "",
        "-x",
        &proxy_url,
        "-U",
        "user:pass",
        "-w",
        &format!("{STATUS_MARKER}%{{http_code}}"),
        "http://example.test/path",
    ];
    let r = curl(net.app.exec("curl", args));
    assert_eq!((r.exit, r.status), (0, 200), "curl through the app's own proxy failed: {r:?}");
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "the proxy should have seen exactly one request: {seen:?}");
    assert_eq!(
        seen[0].request_line, "GET http://example.test/path HTTP/1.1",
        "the proxy should get the absolute-form request line unchanged: {seen:?}"
    );
    assert!(
        has_header(&seen[0].head, "Proxy-Authorization", PROXY_CREDENTIALS),
        "the proxy should get Proxy-Authorization: {PROXY_CREDENTIALS}; it got:\n{}",
        seen[0].head
    );
    assert_eq!(seen[0].peer.ip(), APP_IP, "the request should come from the app namespace");
    assert_eq!(r.body, "own-proxy http://example.test/path\n", "{r:?}");

    // (b) A CONNECT from a plain socket: the proxy gets it and tunnels, the sidecar does not
    // tunnel it itself.
    let (response, echoed, rest) = in_netns(&net.app, move || -> std::io::Result<_> {
        let mut s = TcpStream::connect_timeout(&proxy_addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(CONNECT_REQUEST)?;
        // The response head, a byte at a time so that nothing after it is consumed.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
            if s.read(&mut byte)? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 200 ") {
            return Ok((head, Vec::new(), Vec::new()));
        }
        s.write_all(TUNNELLED)?;
        let mut echoed = vec![0u8; TUNNELLED.len()];
        s.read_exact(&mut echoed)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok((head, echoed, rest))
    })
    .unwrap_or_else(|e| panic!("CONNECT through the app's own proxy failed: {e}"));
    assert_eq!(
        response, "HTTP/1.1 200 Connection established\r\n\r\n",
        "the CONNECT should be answered by the app's own proxy"
    );
    assert_eq!(echoed, TUNNELLED, "the tunnelled bytes should come back through the proxy's tunnel");
    assert!(rest.is_empty(), "unexpected bytes after the echo: {rest:?}");
    let seen = proxy.seen();
    assert_eq!(seen.len(), 2, "the proxy should have seen the CONNECT: {seen:?}");
    assert_eq!(seen[1].request_line, "CONNECT example.test:80 HTTP/1.1", "{seen:?}");
    assert!(
        has_header(&seen[1].head, "Proxy-Authorization", PROXY_CREDENTIALS),
        "the CONNECT should keep its Proxy-Authorization; the proxy got:\n{}",
        seen[1].head
    );
    assert_eq!(seen[1].peer.ip(), APP_IP);

    // Both went through the sidecar as outbound HTTP/1 connections, passed through as
    // bytes: no HTTP request of the sidecar's own.
    let http1 = [("direction", "outbound"), ("protocol", "http1")];
    let text = wait_metric(&net.app, "ballast_tcp_connections_total", &http1, 2.0);
    assert_eq!(
        metric(&text, "ballast_tcp_connections_total", &http1),
        2.0,
        "the sidecar should have accepted both connections as outbound http1:\n{text}"
    );
    assert_eq!(metric(&text, "ballast_tcp_connections_total", &[("direction", "outbound")]), 2.0, "{text}");
    let tunnelled = [("direction", "outbound")];
    let text = wait_metric(&net.app, "ballast_tcp_write_bytes_total", &tunnelled, TUNNELLED.len() as f64);
    assert!(
        metric(&text, "ballast_tcp_read_bytes_total", &tunnelled)
            >= (CONNECT_REQUEST.len() + TUNNELLED.len()) as f64,
        "the connections should have been passed through as bytes:\n{text}"
    );
    assert_eq!(
        metric(&text, "ballast_requests_total", &[("direction", "outbound")]),
        0.0,
        "the sidecar should not have handled the proxy's requests as its own:\n{text}"
    );
}

/// A database-like service: a declared `tcp` port whose server speaks first.
const DB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const DB_PORT: u16 = 3306;
const BANNER: &[u8] = b"5.7.0-mysql-banner\n";
/// The detect timeout the sidecar runs with in the test below, and the bound within which
/// a declared-`tcp` banner must arrive (the old behaviour waited the full timeout).
const DETECT_TIMEOUT: Duration = Duration::from_secs(2);
const BANNER_BOUND: Duration = Duration::from_secs(1);

/// A `Service` named `db` in namespace `default`: [`DB_VIP`]:[`DB_PORT`] declared `tcp`,
/// with the server namespace's [`DB_PORT`] as its endpoint.
fn db_service_yaml() -> String {
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {{name: db, namespace: default}}\n\
         spec:\n  ports: [{{port: {DB_PORT}, protocol: tcp}}]\n  addresses: [{DB_VIP}]\n  \
         endpoints: [{{address: \"{SRV_IP}:{DB_PORT}\"}}]\n"
    )
}

/// Sends [`BANNER`] as soon as it accepts, then reads until the client half-closes and
/// closes. Records the bytes it received (escaped) as its "request line".
fn banner_one(
    mut stream: TcpStream,
    peer: SocketAddr,
    _name: &str,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(BANNER)?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: each read waits at most 10 s, and at most 64 KiB are accepted.
    while received.len() <= 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
    }
    let request_line = received.escape_ascii().to_string();
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen { peer, request_line, head: String::new() });
    Ok(())
}

/// From inside `ns`: connects to `dst` and, sending nothing, reads [`BANNER`]'s length of
/// bytes; then half-closes and reads until the peer closes. Returns (time from connect to
/// the banner, the banner, trailing bytes).
fn read_banner(ns: &Netns, dst: SocketAddr) -> std::io::Result<(Duration, Vec<u8>, Vec<u8>)> {
    in_netns(ns, move || {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut banner = vec![0u8; BANNER.len()];
        s.read_exact(&mut banner)?;
        let elapsed = start.elapsed();
        s.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok((elapsed, banner, rest))
    })
}

#[test]
fn declared_tcp_ports_skip_protocol_detection() {
    require_environment();
    let (bin, _bin_dir) = sidecar_bin();
    let net = Topology::new();
    route_service_range(&net);
    let server = TestServer::start_with(&net.srv, SocketAddr::from((SRV_IP, DB_PORT)), "db", banner_one);
    init(&net.app, &bin, &[]);
    let timeout = format!("--detect-timeout={}ms", DETECT_TIMEOUT.as_millis());
    let _sidecar = Sidecar::start_with_args(&net.app, &bin, &db_service_yaml(), &[&timeout]);

    // The client sends nothing and waits for the server's banner: on a port declared `tcp`
    // the sidecar connects upstream at once instead of waiting for client bytes to detect.
    const CONNECTIONS: usize = 3;
    let vip = SocketAddr::from((DB_VIP, DB_PORT));
    for i in 0..CONNECTIONS {
        let (elapsed, banner, rest) =
            read_banner(&net.app, vip).unwrap_or_else(|e| panic!("connection {i} to {vip} failed: {e}"));
        assert_eq!(banner, BANNER, "connection {i}: the server's banner should come back unchanged");
        assert!(rest.is_empty(), "connection {i}: unexpected bytes after the banner: {rest:?}");
        assert!(
            elapsed < BANNER_BOUND,
            "connection {i}: the banner took {elapsed:?} (bound {BANNER_BOUND:?}, detect timeout \
             {DETECT_TIMEOUT:?}): the sidecar waited to detect a protocol on a port declared tcp"
        );
    }
    let seen = server.seen();
    assert_eq!(seen.len(), CONNECTIONS, "the server should have seen every connection: {seen:?}");
    assert!(seen.iter().all(|s| s.peer.ip() == APP_IP && s.request_line.is_empty()), "{seen:?}");

    let outbound = [("direction", "outbound")];
    let opaque = [("direction", "outbound"), ("protocol", "opaque")];
    let n = CONNECTIONS as f64;
    let text = wait_metric(&net.app, "ballast_tcp_connections_total", &opaque, n);
    assert_eq!(metric(&text, "ballast_tcp_connections_total", &opaque), n, "{text}");
    assert_eq!(
        metric(&text, "ballast_protocol_detect_timeouts_total", &outbound),
        0.0,
        "a connection to a port declared tcp waited for protocol detection:\n{text}"
    );

    // The control: the same server addressed directly is no declared port, so the sidecar
    // waits the detect timeout for client bytes first. This shows the timeout is in effect
    // and that the bound above tells the two behaviours apart.
    let direct = SocketAddr::from((SRV_IP, DB_PORT));
    let (elapsed, banner, _) =
        read_banner(&net.app, direct).unwrap_or_else(|e| panic!("connection to {direct} failed: {e}"));
    assert_eq!(banner, BANNER);
    assert!(
        elapsed >= DETECT_TIMEOUT.mul_f64(0.75) && elapsed >= BANNER_BOUND,
        "an undeclared server-speaks-first port should wait about the detect timeout \
         ({DETECT_TIMEOUT:?}), took {elapsed:?}"
    );
    let text = wait_metric(&net.app, "ballast_protocol_detect_timeouts_total", &outbound, 1.0);
    assert_eq!(metric(&text, "ballast_protocol_detect_timeouts_total", &outbound), 1.0, "{text}");
    assert_eq!(metric(&text, "ballast_tcp_connections_total", &opaque), n + 1.0, "{text}");
    assert_eq!(server.seen().len(), CONNECTIONS + 1);
}
