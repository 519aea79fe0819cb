//! The load generator: HTTP/1.1, HTTP/2 and gRPC unary over a fixed set of connections,
//! at a fixed rate or as fast as the target answers.
//!
//! Fixed rate without coordinated omission (wrk2's rule): a ticker thread computes each
//! request's intended send time from the start and the rate, sleeps to it with a 1 ns
//! timer slack, and hands it to a connection; latency is measured from that intended
//! time, not from when the request actually left. A slow response therefore delays the
//! requests queued behind it and every one of them is charged the wait, as a real
//! client at that rate would see it. The ticker is a thread of its own because tokio's
//! timer has a 1 ms granularity, larger than the latencies measured here.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Request, Version, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Proto {
    #[serde(rename = "http1")]
    Http1,
    #[serde(rename = "http2")]
    Http2,
    #[serde(rename = "grpc")]
    Grpc,
}

impl Proto {
    pub fn label(self) -> &'static str {
        match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::Http2 => "HTTP/2",
            Proto::Grpc => "gRPC unary",
        }
    }
}

/// Where the load goes and how it names the service.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host`/`:authority`: the mesh service name through Ballast.
    pub authority: String,
    pub proto: Proto,
}

/// What one run measured.
pub struct Outcome {
    /// Latency in nanoseconds.
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    /// The first error seen, to show the operator why.
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl Outcome {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1_000, 120_000_000_000, 3).expect("histogram bounds"),
            ok: 0,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
        }
    }

    fn merge(&mut self, other: Outcome) {
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn record(&mut self, result: Result<(), String>, latency: Duration) {
        match result {
            Ok(()) => {
                self.ok += 1;
                let _ = self.hist.record(latency.as_nanos().clamp(1_000, 120_000_000_000) as u64);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    /// Latency at `q` (0..1) in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1e6
    }

    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// gRPC request message: a 5-byte frame header and 64 bytes of payload.
fn grpc_message() -> Bytes {
    let mut m = vec![0u8, 0, 0, 0, 64];
    m.extend_from_slice(&[b'p'; 64]);
    Bytes::from(m)
}

fn request(target: &Target) -> Request<Full<Bytes>> {
    let mut b = Request::builder();
    b = match target.proto {
        Proto::Http1 => b.uri("/").header(header::HOST, &target.authority),
        Proto::Http2 => b.version(Version::HTTP_2).uri(format!("http://{}/", target.authority)),
        Proto::Grpc => b
            .version(Version::HTTP_2)
            .method(Method::POST)
            .uri(format!("http://{}/bench.Bench/Unary", target.authority))
            .header(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"))
            .header(header::TE, HeaderValue::from_static("trailers")),
    };
    let body = if target.proto == Proto::Grpc { Full::new(grpc_message()) } else { Full::new(Bytes::new()) };
    b.body(body).expect("a valid request")
}

async fn connect(target: &Target) -> Result<Sender, String> {
    let stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", target.addr))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    match target.proto {
        Proto::Http1 => {
            let (tx, conn) = http1::handshake(io).await.map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(Sender::H1(tx))
        }
        Proto::Http2 | Proto::Grpc => {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(Sender::H2(tx))
        }
    }
}

/// Sends one request and reads the whole answer; an error names what was wrong.
async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>, grpc: bool) -> Result<(), String> {
    let resp = match sender {
        Sender::H1(tx) => {
            tx.ready().await.map_err(|e| format!("connection: {e}"))?;
            tx.send_request(req).await
        }
        Sender::H2(tx) => tx.send_request(req).await,
    }
    .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut grpc_status = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        if let Some(t) = frame.trailers_ref() {
            grpc_status = t.get("grpc-status").map(|v| v.as_bytes().to_vec());
        }
    }
    if status != 200 {
        return Err(format!("status {status}"));
    }
    if grpc && grpc_status.as_deref() != Some(b"0") {
        return Err(format!(
            "grpc-status {:?}",
            grpc_status.map(|s| String::from_utf8_lossy(&s).into_owned())
        ));
    }
    Ok(())
}

fn h2_sender(sender: &Sender) -> Option<http2::SendRequest<Full<Bytes>>> {
    match sender {
        Sender::H2(tx) => Some(tx.clone()),
        Sender::H1(_) => None,
    }
}

/// Opens `n` connections to `target`.
async fn open(target: &Target, n: usize) -> Result<Vec<Sender>, String> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(connect(target).await?);
    }
    Ok(v)
}

/// Lowers this thread's timer slack so `sleep` wakes within microseconds of its deadline.
fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and changes only this thread's slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

fn sleep_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        std::thread::sleep(t - now);
    }
}

/// `rate` requests per second for `duration` over `conns` connections, latency measured
/// from each request's intended send time. HTTP/2 connections carry several requests at
/// once when answers are late; an HTTP/1.1 connection queues them (no pipelining).
pub fn fixed_rate(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    rate: u32,
    duration: Duration,
    conns: usize,
) -> Outcome {
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let senders = match rt.block_on(open(target, conns)) {
        Ok(s) => s,
        Err(e) => return failed(total, e),
    };
    let mut txs = Vec::with_capacity(conns);
    let mut rxs = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (tx, rx) = mpsc::unbounded_channel::<Instant>();
        txs.push(tx);
        rxs.push(rx);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let ticker = std::thread::spawn(move || {
        precise_timers();
        for i in 0..total {
            let t = start + period.mul_f64(i as f64);
            sleep_until(t);
            let _ = txs[(i % txs.len() as u64) as usize].send(t);
        }
    });
    let grpc = target.proto == Proto::Grpc;
    let mut outcome = rt.block_on(async {
        let tasks: Vec<_> = senders
            .into_iter()
            .zip(rxs)
            .map(|(mut sender, mut rx)| {
                let target = target.clone();
                tokio::spawn(async move {
                    let mut out = Outcome::new();
                    if let Some(h2) = h2_sender(&sender) {
                        let mut inflight = FuturesUnordered::new();
                        let mut open = true;
                        loop {
                            tokio::select! {
                                m = rx.recv(), if open => match m {
                                    Some(t) => {
                                        let mut s = Sender::H2(h2.clone());
                                        let req = request(&target);
                                        inflight.push(async move { (exchange(&mut s, req, grpc).await, t) });
                                    }
                                    None => open = false,
                                },
                                Some((r, t)) = inflight.next(), if !inflight.is_empty() => out.record(r, t.elapsed()),
                                else => break,
                            }
                        }
                    } else {
                        while let Some(t) = rx.recv().await {
                            let r = exchange_h1(&mut sender, &target).await;
                            out.record(r, t.elapsed());
                        }
                    }
                    out
                })
            })
            .collect();
        gather(tasks).await
    });
    let _ = ticker.join();
    outcome.elapsed = start.elapsed();
    outcome
}

/// As many requests as the target answers in `duration`: each connection keeps `depth`
/// requests in flight (HTTP/1.1: always 1). Latency is measured from the actual send.
pub fn max_rate(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    duration: Duration,
    conns: usize,
    depth: usize,
) -> Outcome {
    let senders = match rt.block_on(open(target, conns)) {
        Ok(s) => s,
        Err(e) => return failed(1, e),
    };
    let grpc = target.proto == Proto::Grpc;
    let start = Instant::now();
    let deadline = start + duration;
    let mut outcome = rt.block_on(async {
        let tasks: Vec<_> = senders
            .into_iter()
            .map(|mut sender| {
                let target = target.clone();
                tokio::spawn(async move {
                    let mut out = Outcome::new();
                    if let Some(h2) = h2_sender(&sender) {
                        let mut inflight = FuturesUnordered::new();
                        let one = |h2: &http2::SendRequest<Full<Bytes>>| {
                            let mut s = Sender::H2(h2.clone());
                            let req = request(&target);
                            async move {
                                let t = Instant::now();
                                (exchange(&mut s, req, grpc).await, t)
                            }
                        };
                        for _ in 0..depth.max(1) {
                            inflight.push(one(&h2));
                        }
                        while let Some((r, t)) = inflight.next().await {
                            out.record(r, t.elapsed());
                            if Instant::now() < deadline {
                                inflight.push(one(&h2));
                            }
                        }
                    } else {
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            let r = exchange_h1(&mut sender, &target).await;
                            out.record(r, t.elapsed());
                        }
                    }
                    out
                })
            })
            .collect();
        gather(tasks).await
    });
    outcome.elapsed = start.elapsed();
    outcome
}

/// One request on an HTTP/1.1 connection; after a failure the connection is replaced,
/// since hyper will not send on a connection that failed.
async fn exchange_h1(sender: &mut Sender, target: &Target) -> Result<(), String> {
    let r = exchange(sender, request(target), target.proto == Proto::Grpc).await;
    if r.is_err()
        && let Ok(s) = connect(target).await
    {
        *sender = s;
    }
    r
}

/// Waits for every connection's task and adds up what they measured; a task that
/// panicked counts as an error rather than vanishing from the totals.
async fn gather(tasks: Vec<tokio::task::JoinHandle<Outcome>>) -> Outcome {
    let mut all = Outcome::new();
    for t in tasks {
        match t.await {
            Ok(o) => all.merge(o),
            Err(e) => all.record(Err(format!("a connection task failed: {e}")), Duration::ZERO),
        }
    }
    all
}

fn failed(n: u64, e: String) -> Outcome {
    let mut o = Outcome::new();
    o.errors = n;
    o.first_error = Some(e);
    o
}

/// Opaque TCP: `streams` connections each writing 64 KiB chunks for `duration`; the
/// throughput is what the sink received, in bits per second.
pub fn tcp_throughput(
    target: SocketAddr,
    connect_to: Option<&str>,
    streams: usize,
    duration: Duration,
    sunk: impl Fn() -> u64,
) -> Result<f64, String> {
    use std::io::{Read, Write};
    let before = sunk();
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let connect_to = connect_to.map(str::to_owned);
            std::thread::spawn(move || -> Result<(), String> {
                let mut s =
                    std::net::TcpStream::connect(target).map_err(|e| format!("connect {target}: {e}"))?;
                let _ = s.set_nodelay(true);
                if let Some(authority) = connect_to {
                    // An HTTP CONNECT tunnel through the client sidecar, as an app's opaque
                    // protocol reaches the mesh without iptables.
                    write!(s, "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")
                        .map_err(|e| e.to_string())?;
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        let n = s.read(&mut b).map_err(|e| e.to_string())?;
                        if n == 0 {
                            return Err("tunnel closed".into());
                        }
                        head.push(b[0]);
                    }
                    if !head.starts_with(b"HTTP/1.1 200") {
                        return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&head)));
                    }
                }
                // Zeros: no protocol detector mistakes them for HTTP.
                let chunk = vec![0u8; 64 * 1024];
                while Instant::now() < deadline {
                    s.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "writer panicked".to_string())??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((sunk() - before) as f64 * 8.0 / elapsed)
}
