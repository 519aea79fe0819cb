//! New mesh TLS connections to a server sidecar, timed one at a time: the harness dials
//! the sidecar's inbound listener as a client sidecar does, with a client sidecar's own
//! rustls configuration (`identity::tls::Configs::client_h2`) and a certificate from the
//! same control plane, asks for the server's identity name (SNI) and HTTP/2 (ALPN).
//!
//! Each connection is timed from `connect` to the first byte of the server's HTTP/2
//! (its SETTINGS), which the sidecar sends only after it has verified the client's
//! certificate: TCP set-up, the whole handshake on both sides and the server's tickets.
//! `full`: the client configuration with resumption off, every connection exchanges and
//! verifies both certificates; `resumed`: the configuration as sidecars use it, whose
//! session cache resumes with the tickets of the previous connection. Which kind each
//! handshake really was is counted from the client's `handshake_kind`. The server
//! sidecar's CPU time comes from `/proc`, the client's is this thread's.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, HandshakeKind};
use serde::Serialize;

use crate::procs::cpu_split;

/// The client's HTTP/2 preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    #[serde(rename = "full")]
    Full,
    #[serde(rename = "resumed")]
    Resumed,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Full => "full handshake",
            Kind::Resumed => "resumed (TLS 1.3 ticket)",
        }
    }
}

/// One timed series of new connections.
#[derive(Serialize)]
pub struct HandshakeRun {
    pub kind: Kind,
    pub repeat: usize,
    /// Connections that got the server's first HTTP/2 bytes.
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Of `ok`, how many handshakes the client saw as full and as resumed.
    pub full: u64,
    pub resumed: u64,
    pub seconds: f64,
    /// New connections per second, one at a time.
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU time per connection of the server sidecar (all of it: accept, detection,
    /// handshake, HTTP/2 set-up and teardown), and of the client (this thread).
    pub server_cpu_us: f64,
    pub client_cpu_us: f64,
}

/// The calling thread's CPU time, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One connection: the kind of its handshake once the server's first bytes arrived.
fn connect(
    addr: SocketAddr,
    name: &ServerName<'static>,
    config: &Arc<ClientConfig>,
) -> Result<HandshakeKind, String> {
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(config.clone(), name.clone()).map_err(|e| e.to_string())?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(H2_PREFACE).map_err(|e| format!("handshake: {e}"))?;
    let mut first = [0u8; 64];
    match tls.read(&mut first) {
        Ok(0) => return Err("closed by the server before any HTTP/2".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("reading the server's SETTINGS: {e}")),
    }
    let kind = conn.handshake_kind().ok_or("no handshake kind after the handshake")?;
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    Ok(kind)
}

/// The server sidecar dialled.
pub struct Peer {
    /// Its inbound listener.
    pub addr: SocketAddr,
    /// Its identity's DNS name, the SNI and the name its certificate is verified for.
    pub name: ServerName<'static>,
    /// Its process, whose CPU time is read.
    pub pid: u32,
}

/// New connections one after the other for `limit` or `max` connections, whichever
/// comes first.
pub fn run(
    kind: Kind,
    repeat: usize,
    peer: &Peer,
    config: &Arc<ClientConfig>,
    limit: Duration,
    max: u64,
) -> HandshakeRun {
    let (addr, name) = (peer.addr, &peer.name);
    let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram bounds");
    let (mut ok, mut errors, mut full, mut resumed) = (0u64, 0u64, 0u64, 0u64);
    let mut first_error = None;
    // The resumed series starts from a cache holding tickets of this server.
    if kind == Kind::Resumed {
        let _ = connect(addr, name, config);
    }
    let server_before = cpu_split(peer.pid);
    let client_before = thread_cpu();
    let start = Instant::now();
    while start.elapsed() < limit && ok + errors < max {
        let t = Instant::now();
        match connect(addr, name, config) {
            Ok(k) => {
                let _ = hist.record(t.elapsed().as_nanos() as u64);
                ok += 1;
                if k == HandshakeKind::Resumed {
                    resumed += 1;
                } else {
                    full += 1;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let client_cpu = thread_cpu() - client_before;
    let server_after = cpu_split(peer.pid);
    let server_cpu = (server_after.0 + server_after.1) - (server_before.0 + server_before.1);
    let per = |cpu: f64| if ok == 0 { f64::NAN } else { cpu / ok as f64 * 1e6 };
    HandshakeRun {
        kind,
        repeat,
        ok,
        errors,
        first_error,
        full,
        resumed,
        seconds,
        per_second: ok as f64 / seconds,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1e6,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1e6,
        server_cpu_us: per(server_cpu),
        client_cpu_us: per(client_cpu),
    }
}
