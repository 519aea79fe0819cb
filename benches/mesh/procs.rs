//! The proxies under test as child processes: Ballast sidecars and HAProxy, each pinned to
//! the proxy core, with their CPU time and memory read from `/proc`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Pins the calling thread (and what it spawns or execs afterwards) to `cpu`.
pub fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A free loopback port for a proxy under test to listen on, bound then released.
///
/// Chosen below the kernel's ephemeral range (`ip_local_port_range`), so that nothing
/// else the harness does can take it between here and the proxy's own bind: every
/// client connection and every port-0 listener (the upstreams, the sinks) gets its
/// port from that range. A port from `bind(:0)` was taken that way once in CI (the
/// load generator's connections use thousands of ephemeral ports), and the sidecar
/// then failed to start with "Address already in use". Each call hands out a port not
/// handed out before in this process; where the range below is too small, it falls
/// back to `bind(:0)` and [`Proxy::sidecar_from`]'s retry.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    /// The next candidate, as an offset from [`LOW`]; starts at a place that depends on
    /// the process id, so two harnesses on one machine (never done, but cheap) start apart.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    const LOW: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u32>().ok()))
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOW);
    if span >= 1_000 {
        let _ =
            NEXT.compare_exchange(u32::MAX, std::process::id() % span, Ordering::Relaxed, Ordering::Relaxed);
        for _ in 0..span {
            let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span;
            let Ok(port) = u16::try_from(port) else { continue };
            if let Ok(addr) = TcpListener::bind(("127.0.0.1", port)).and_then(|l| l.local_addr()) {
                return addr;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port")
}

pub struct Proxy {
    pub name: String,
    child: Child,
    _dir: tempfile::TempDir,
    stderr_path: PathBuf,
    /// When SIGTERM was sent ([`Proxy::terminate`]); the grace period runs from here.
    terminated: Option<Instant>,
}

/// Where a sidecar's configuration comes from.
pub enum Source<'a> {
    /// A static configuration file with this content.
    File(&'a str),
    /// A control plane at `url`, with more flags (identity, `--service`, ...).
    ControlPlane { url: &'a str, args: &'a [String] },
}

/// Ports of one Ballast sidecar.
#[derive(Debug, Clone, Copy)]
pub struct SidecarAddrs {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Proxy {
    /// A Ballast sidecar with this static configuration; the app behind its inbound
    /// listener is `app`. `env` is added to its environment (see [`Proxy::sidecar_from`]).
    pub fn sidecar(
        bin: &Path,
        name: &str,
        config: &str,
        app: SocketAddr,
        cpu: usize,
        env: &[(&str, String)],
    ) -> Result<(Self, SidecarAddrs), String> {
        Self::sidecar_from(bin, name, Source::File(config), app, cpu, env)
    }

    /// A Ballast sidecar configured from `source`; with a control plane, `args` are its
    /// identity and registration flags, where `{inbound}` stands for its inbound address.
    /// Its environment is the harness's with `BALLAST_LOG=warn` (no access log), then
    /// `env` (`OTEL_*` for tracing, or a `BALLAST_LOG` that turns the access log on).
    pub fn sidecar_from(
        bin: &Path,
        name: &str,
        source: Source<'_>,
        app: SocketAddr,
        cpu: usize,
        env: &[(&str, String)],
    ) -> Result<(Self, SidecarAddrs), String> {
        // A port taken between `free_addr` and the sidecar's bind (see there) fails the
        // start with "Address already in use": that one failure is retried on fresh
        // ports, any other fails the run.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_sidecar(bin, name, &source, app, cpu, env) {
                Err(e) if e.contains("Address already in use") => last = e,
                other => return other,
            }
        }
        Err(format!("{name} found no free ports in 3 attempts; last: {last}"))
    }

    fn try_sidecar(
        bin: &Path,
        name: &str,
        source: &Source<'_>,
        app: SocketAddr,
        cpu: usize,
        env: &[(&str, String)],
    ) -> Result<(Self, SidecarAddrs), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let addrs = SidecarAddrs { outbound: free_addr(), inbound: free_addr(), admin: free_addr() };
        let mut cmd = Command::new(bin);
        cmd.arg("run");
        match source {
            Source::File(config) => {
                let cfg = dir.path().join("config.yaml");
                std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
                cmd.arg("--config").arg(&cfg);
            }
            Source::ControlPlane { url, args } => {
                cmd.arg("--control-plane").arg(*url);
                cmd.args(args.iter().map(|a| a.replace("{inbound}", &addrs.inbound.to_string())));
            }
        }
        cmd.arg("--outbound-addr")
            .arg(addrs.outbound.to_string())
            .arg("--inbound-addr")
            .arg(addrs.inbound.to_string())
            .arg("--admin-addr")
            .arg(addrs.admin.to_string())
            .arg("--app-addr")
            .arg(app.to_string())
            .args(["--workers", "1"])
            // Stopped with SIGTERM (see `Drop`): in-flight requests get 1 s, well within
            // STOP_GRACE, instead of the default 30 s.
            .args(["--drain-deadline", "1s"])
            // Only loopback: a Host the mesh does not know yet (before a registration
            // arrives) must not become a DNS lookup.
            .arg("--egress-dns=false")
            .env("BALLAST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let mut proxy = Self::spawn(name, cmd, dir, cpu)?;
        proxy.wait_ready(|| http_get(addrs.admin, "/ready").is_ok_and(|s| s == 200))?;
        Ok((proxy, addrs))
    }

    /// HAProxy with this configuration (one thread, foreground).
    pub fn haproxy(config: &str, ready: SocketAddr, cpu: usize) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg);
        let mut proxy = Self::spawn("haproxy", cmd, dir, cpu)?;
        proxy.wait_ready(|| TcpStream::connect(ready).is_ok())?;
        Ok(proxy)
    }

    /// The bare byte relay (`relay.rs`): this same binary, started as one.
    pub fn relay(listen: SocketAddr, upstream: SocketAddr, cpu: usize) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this binary to start the relay: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.env(crate::relay::ENV, format!("{listen},{upstream}"));
        let mut proxy = Self::spawn("relay", cmd, dir, cpu)?;
        proxy.wait_ready(|| TcpStream::connect(listen).is_ok())?;
        Ok(proxy)
    }

    fn spawn(name: &str, mut cmd: Command, dir: tempfile::TempDir, cpu: usize) -> Result<Self, String> {
        let stderr_path = dir.path().join("stderr.log");
        // Appending, so that `take_stderr` can empty the file under a running process.
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        // SAFETY: only the async-signal-safe sched_setaffinity runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || pin_to(cpu));
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Self { name: name.to_owned(), child, _dir: dir, stderr_path, terminated: None })
    }

    /// Polls `ready` for up to 20 s, and gives up as soon as the process has exited (a
    /// sidecar that cannot bind exits at once; waiting out the 20 s would only slow
    /// [`Proxy::sidecar_from`]'s retry).
    fn wait_ready(&mut self, ready: impl Fn() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if ready() {
                return Ok(());
            }
            if !self.is_running() {
                return Err(format!("{} exited before it was ready: {}", self.name, self.stderr()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{} did not become ready: {}", self.name, self.stderr()))
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Lines and bytes written to stderr since the last call (or the start), then
    /// empties the file: an access log at full load would fill the disk otherwise.
    pub fn take_stderr(&self) -> std::io::Result<(u64, u64)> {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&self.stderr_path)?;
        let (mut lines, mut bytes) = (0u64, 0u64);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        }
        // The sidecar appends, so what it writes next starts the file again (a line
        // written between the read and here is lost from the count, not misplaced).
        f.set_len(0)?;
        Ok((lines, bytes))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User and system CPU time of the whole process (all threads), in seconds. On
    /// loopback the system part includes delivering each write to the receiving socket.
    pub fn cpu_split(&self) -> (f64, f64) {
        cpu_split(self.pid())
    }

    fn status_kib(&self, field: &str) -> f64 {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", self.pid())) else { return f64::NAN };
        s.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// Resident set size now, in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.status_kib("VmRSS:") / 1024.0
    }

    /// Peak resident set size, in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.status_kib("VmHWM:") / 1024.0
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// How long a stopped proxy gets to exit on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

impl Proxy {
    /// Sends SIGTERM once, without waiting: stopping every proxy this way first lets
    /// them drain at the same time, so a teardown waits at most one grace period
    /// rather than one per proxy.
    pub fn terminate(&mut self) {
        // Already reaped (`is_running` saw it exit): its pid may be someone else's now.
        if self.terminated.is_some() || !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory preconditions; the child was running just above
            // and is only reaped by us, so `pid` is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            self.terminated = Some(Instant::now());
        }
    }
}

impl Drop for Proxy {
    /// SIGTERM first (unless [`Proxy::terminate`] already sent it), so that a sidecar
    /// exits as in production (drained, its telemetry flushed, and an instrumented build
    /// writes its profile: `scripts/build-pgo.sh` trains on this harness); SIGKILL
    /// [`STOP_GRACE`] after the SIGTERM.
    fn drop(&mut self) {
        self.terminate();
        match self.terminated {
            Some(sent) => {
                while sent.elapsed() < STOP_GRACE {
                    if !matches!(self.child.try_wait(), Ok(None)) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            // Not signalled: exited already, or (never seen) a pid out of range.
            None if !matches!(self.child.try_wait(), Ok(None)) => return,
            None => {}
        }
        eprintln!("  {} did not exit within {STOP_GRACE:?} of SIGTERM; killed", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User and system CPU time of process `pid` (all threads), in seconds.
pub fn cpu_split(pid: u32) -> (f64, f64) {
    let nan = (f64::NAN, f64::NAN);
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return nan };
    // Fields after the parenthesised command name; utime and stime are the 14th and
    // 15th fields of the line, the 12th and 13th after it.
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { return nan };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) / hz, ticks(12) / hz)
}

/// A plain HTTP/1.1 GET; the status code.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    String::from_utf8_lossy(&buf)
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))
}

/// Polls `ready` every 20 ms until it holds, for at most `limit`.
pub fn wait_for(what: &str, limit: Duration, ready: impl Fn() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("timed out after {limit:?} waiting for {what}"))
}

/// The value of one sample (`name{labels}` exactly as exposed) on a sidecar's admin
/// `/metrics`.
pub fn metric(admin: SocketAddr, sample: &str) -> Option<f64> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Opens `n` HTTP/1.1 keep-alive connections to `addr`, makes one request on each and
/// leaves them open and idle; they close when the returned streams drop.
pub fn idle_connections(addr: SocketAddr, authority: &str, n: usize) -> Result<Vec<TcpStream>, String> {
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(addr).map_err(|e| format!("connection {i}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        write!(s, "GET / HTTP/1.1\r\nHost: {authority}\r\n\r\n").map_err(|e| e.to_string())?;
        read_response(&mut s).map_err(|e| format!("connection {i}: {e}"))?;
        open.push(s);
    }
    Ok(open)
}

/// Reads one response with a Content-Length body.
fn read_response(s: &mut TcpStream) -> Result<(), String> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the response ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(format!("unexpected answer: {}", head.lines().next().unwrap_or("")));
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("no content-length")?;
        if buf.len() >= end + 4 + len {
            return Ok(());
        }
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set we own; CPU_ISSET reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}
