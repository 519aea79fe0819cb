//! A real etcd server for tests: Debian's `etcd-server` (`/usr/bin/etcd`), one member on
//! 127.0.0.1 with free ports and a temporary data directory, killed on drop.
//!
//! Tests never skip for a missing etcd: [`EtcdServer::start`] panics and says how to
//! install it (`scripts/test.sh` does).
//!
//! The member runs with a 50 ms heartbeat and a 500 ms election timeout: etcd raises any
//! lease TTL below 1.5 election timeouts to that minimum, so with its defaults (1 s) a
//! 1-second lease would live 2 s; with these, TTLs of 1 s are honoured.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `etcd-server` package puts the binary.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long etcd may take to answer `/health` after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a start is retried with new ports when another process took one.
const START_ATTEMPTS: usize = 3;

pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    /// How many times the member was started, to name each run's log file.
    runs: usize,
}

impl EtcdServer {
    /// Starts a fresh single-member etcd and waits until it is healthy. Blocks for up to
    /// 20 s (about one second normally).
    pub fn start() -> EtcdServer {
        assert!(
            std::path::Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} is missing: these tests run a real etcd; install it with \
             `apt-get install -y etcd-server` (scripts/test.sh does this)"
        );
        let mut dir = tempfile::Builder::new()
            .prefix("ballast-etcd-")
            .tempdir()
            .expect("creating a temporary directory");
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let (client_port, peer_port) = (free_port(), free_port());
            let mut server = EtcdServer { child: None, client_port, peer_port, dir, runs: 0 };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(failure) => {
                    // Most likely a port taken between choosing and binding it: try
                    // again with new ports and a clean data directory.
                    last_failure = failure;
                    server.kill();
                    dir = tempfile::Builder::new()
                        .prefix("ballast-etcd-")
                        .tempdir()
                        .expect("creating a temporary directory");
                }
            }
        }
        panic!("etcd did not start after {START_ATTEMPTS} attempts; last:\n{last_failure}");
    }

    /// The client URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills the member (SIGKILL, as in a crash) and waits for it to exit. Its data
    /// directory and ports are kept for [`Self::restart`].
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the member again on the same data directory and ports (stopping it first
    /// if it runs) and waits until it is healthy: "etcd down, then back".
    pub fn restart(&mut self) {
        self.kill();
        if let Err(failure) = self.spawn_and_wait() {
            self.kill();
            panic!("etcd did not restart:\n{failure}");
        }
    }

    /// Whether the member process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `lines` lines of the current run's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("etcd-{}.log", self.runs))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Spawns etcd and waits for `/health`; on failure says why, with the log's tail.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        self.runs += 1;
        let log = File::create(self.log_path()).map_err(|e| format!("creating etcd's log file: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("duplicating etcd's log file: {e}"))?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(ETCD_BIN);
        // etcd also reads its flags from ETCD_* variables; none from the test's
        // environment may change this member.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(name);
            }
        }
        if cfg!(target_arch = "aarch64") {
            // etcd 3.4 refuses to start on arm64 unless told the platform is fine.
            cmd.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        cmd.arg("--name")
            .arg("ballast-test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("ballast-test={peer}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = cmd.spawn().map_err(|e| format!("starting {ETCD_BIN}: {e}"))?;
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "etcd exited with {status} before it was healthy; the end of its log ({}):\n{}",
                    self.log_path().display(),
                    self.log_tail(40)
                ));
            }
            if healthy(self.client_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd did not answer /health on {client} within {}s; the end of its log ({}):\n{}",
                    READY_TIMEOUT.as_secs(),
                    self.log_path().display(),
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- the end of etcd's log ({}):\n{}", self.log_path().display(), self.log_tail(40));
        }
    }
}

/// A port that was free a moment ago (the kernel's choice for port 0).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// Whether etcd's `GET /health` says `"health":"true"` (it does once it has a leader).
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.") && response.contains("\"health\":\"true\"")
}
