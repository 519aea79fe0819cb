//! The HTTP/1.1 connections of one endpoint: a stack of idle `hyper` senders.
//!
//! Why not hyper-util's pool (which the HTTP/2 side still uses): its client is built for
//! many origins behind one object. Every request hashes a `(scheme, authority)` key with
//! SipHash on checkout and again on return, races the checkout against a connect future
//! that is built (and moved, several hundred bytes at a time) even when an idle connection
//! is there, and boxes the whole. Here one pool is one endpoint already (see
//! [`crate::client`]), so none of that buys anything: callgrind counted the hyper-util
//! path at about 5,700 instructions per request on the sidecar's HTTP/1.1 benchmark, of
//! which the hashing, the race and the moves were over half (benches/README.md,
//! session 12). What is kept from it, as an operator expects of any proxy's pool:
//!
//! * **Reuse, newest first.** A connection goes back when hyper says it can take the next
//!   request (the response body read to its end). The most recently used is taken first,
//!   so a burst's extra connections age out instead of being kept warm in turn.
//! * **Idle timeout.** A connection idle longer than the pool's timeout is closed rather
//!   than used: checked on checkout, and swept once per timeout by a task that holds only
//!   a weak reference (so a dropped pool's sweeper ends at its next wake).
//! * **A stale connection is not an error.** When the server closed a pooled connection
//!   just as a request was given to it, hyper hands the unsent request back, and it goes
//!   on another connection (hyper-util's `retry_canceled_requests`). A fresh connection
//!   that fails fails the request.
//! * **Origin form and `Host`.** A request goes out in origin form (`GET /path`), CONNECT in
//!   authority form; a request without `Host` gets one from its URI.
//! * **Upgrades.** A connection that switched protocols (101) or tunnels a CONNECT belongs
//!   to that exchange and never returns; one whose upgrade the server declined does.
//!
//! No limit on idle connections, as hyper-util's default: the number open is bounded by
//! the requests in flight, and the idle timeout closes what a burst left.
//!
//! Each connection is driven by a task of its own (hyper's `Connection`), as in
//! hyper-util, and not by the request that uses it: session 9 tried the latter and lost
//! 20-30% of maximum throughput, because each response was then written as soon as its
//! upstream read finished, one wake-up of the client per response, where connection tasks
//! let one poll of the event loop read several responses before the writes
//! (benches/README.md, sessions 9 and 12).

use std::future::{Future, poll_fn};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::uri::{Parts, Uri};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tower::Service;

use crate::body::{Body, BoxError};
use crate::client::FixedConnector;

/// The idle HTTP/1.1 connections of one endpoint; clones share them.
#[derive(Clone)]
pub struct H1Pool(Arc<Inner>);

struct Inner {
    connector: FixedConnector,
    idle_timeout: Duration,
    /// Newest last.
    idle: Mutex<Vec<Idle>>,
    sweeping: AtomicBool,
}

struct Idle {
    tx: SendRequest<Body>,
    since: Instant,
}

impl H1Pool {
    pub fn new(connector: FixedConnector, idle_timeout: Duration) -> Self {
        Self(Arc::new(Inner {
            connector,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            sweeping: AtomicBool::new(false),
        }))
    }

    /// Sends `req` on an idle connection, or a new one when none is idle.
    pub fn request(
        &self,
        mut req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Incoming>, BoxError>> + Send + 'static {
        let inner = self.0.clone();
        let keeps_connection = to_wire_form(&mut req);
        async move {
            loop {
                let (mut tx, reused) = match inner.checkout() {
                    Some(tx) => (tx, true),
                    None => (inner.connect().await?, false),
                };
                match tx.try_send_request(req).await {
                    Ok(rsp) => {
                        // An upgrade the server declined (401, 426, ...) leaves an ordinary
                        // HTTP/1.1 connection, which goes back like any other.
                        if keeps_connection && rsp.status() != StatusCode::SWITCHING_PROTOCOLS {
                            inner.checkin(tx);
                        }
                        return Ok(rsp);
                    }
                    Err(mut e) => match e.take_message() {
                        // Never written: the pooled connection was closing. Another one.
                        Some(unsent) if reused => req = unsent,
                        _ => return Err(e.into_error().into()),
                    },
                }
            }
        }
    }

    /// Idle connections now (for tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.0.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Inner {
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            // `is_ready` is false once the connection is closed.
            if conn.tx.is_ready() && conn.since.elapsed() < self.idle_timeout {
                return Some(conn.tx);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Body>, BoxError> {
        let io = self.connector.clone().call(Uri::default()).await?;
        let (tx, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(tx)
    }

    /// Returns `tx` to the pool once it can take the next request: now when the response
    /// is already read whole (the usual case for small responses), else when the body has
    /// been streamed out.
    fn checkin(self: &Arc<Self>, mut tx: SendRequest<Body>) {
        if tx.is_ready() {
            self.put(tx);
        } else if !tx.is_closed() {
            let inner = self.clone();
            tokio::spawn(async move {
                if poll_fn(|cx| tx.poll_ready(cx)).await.is_ok() {
                    inner.put(tx);
                }
            });
        }
    }

    fn put(self: &Arc<Self>, tx: SendRequest<Body>) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(Idle { tx, since: Instant::now() });
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }
}

/// The shortest interval between two sweeps of a pool.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Closes connections idle for longer than `timeout`, once per `timeout` (at least
/// [`MIN_SWEEP_INTERVAL`]), while the pool lives: a connection is closed at most twice
/// its idle timeout (or that interval) after its last use.
async fn sweep(pool: Weak<Inner>, timeout: Duration) {
    // A policy may set a tiny idle timeout; checkout still honours it, the sweep need not
    // wake more often than this (hyper-util's pool clamps at 90 ms too).
    let every = timeout.max(MIN_SWEEP_INTERVAL);
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| !c.tx.is_closed() && c.since.elapsed() < timeout);
    }
}

/// Puts `req` in the form HTTP/1.1 sends (origin form, or authority form for CONNECT) with
/// a `Host` header; returns whether the connection can serve another request afterwards
/// (not after a CONNECT tunnel; after an upgrade only if the server declined it).
fn to_wire_form(req: &mut Request<Body>) -> bool {
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = host_of(req.uri())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let connect = req.method() == Method::CONNECT;
    let wire = if connect {
        let mut parts = Parts::default();
        parts.authority = req.uri().authority().cloned();
        // A CONNECT without an authority (refused by the proxy before this) goes out as `/`.
        Uri::from_parts(parts).ok().filter(|u| u.authority().is_some())
    } else {
        req.uri().path_and_query().filter(|pq| pq.as_str() != "/").and_then(|pq| {
            let mut parts = Parts::default();
            parts.path_and_query = Some(pq.clone());
            Uri::from_parts(parts).ok()
        })
    };
    *req.uri_mut() = wire.unwrap_or_default();
    !connect
}

/// `Host` for a URI, as hyper-util derives it: the host and a port other than the
/// scheme's default, never the user information of `user:password@host`.
fn host_of(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") | None => Some(80),
        Some(_) => None,
    };
    match uri.port_u16() {
        Some(port) if Some(port) != default_port => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::body;

    /// A raw HTTP/1.1 server answering each request on a connection with `ok`; after
    /// `per_conn` requests it closes the connection without a word. Counts connections.
    pub(crate) async fn server(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (c, h) = (conns.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_conn {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
                        let head: Vec<u8> = buf.drain(..end).collect();
                        h.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(String::from_utf8_lossy(&head).into());
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, conns, heads)
    }

    /// Waits (up to 5 s, far past the 100 ms the pool needs) until the pool holds `n`
    /// idle connections; panics naming `what` if it never does.
    async fn until_idle(pool: &H1Pool, n: usize, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while pool.idle() != n {
            assert!(tokio::time::Instant::now() < deadline, "{what}: {} idle, not {n}", pool.idle());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn pool(addr: SocketAddr, idle: Duration) -> H1Pool {
        H1Pool::new(FixedConnector::plain(addr, Duration::from_secs(2)), idle)
    }

    fn get(uri: &str) -> Request<Body> {
        Request::get(uri).header(header::HOST, "web.example").body(body::empty()).expect("request")
    }

    async fn ok(pool: &H1Pool, req: Request<Body>) {
        let rsp = pool.request(req).await.expect("response");
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.into_body().collect().await.expect("body").to_bytes(), "ok");
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection_in_origin_form() {
        let (addr, conns, heads) = server(usize::MAX).await;
        let pool = pool(addr, Duration::from_secs(30));
        for _ in 0..5 {
            ok(&pool, get("http://web.example/a/b?c=d")).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
        let heads = heads.lock().unwrap_or_else(|p| p.into_inner());
        assert!(heads[0].starts_with("GET /a/b?c=d HTTP/1.1\r\n"), "{}", heads[0]);
        assert!(heads[0].to_ascii_lowercase().contains("host: web.example\r\n"), "{}", heads[0]);
    }

    #[tokio::test]
    async fn a_request_without_host_gets_the_uri_authority() {
        let (addr, _, heads) = server(usize::MAX).await;
        let pool = pool(addr, Duration::from_secs(30));
        ok(&pool, Request::get("http://api.example:8080/").body(body::empty()).expect("request")).await;
        let head = heads.lock().unwrap_or_else(|p| p.into_inner())[0].to_ascii_lowercase();
        assert!(head.starts_with("get / http/1.1\r\n"), "{head}");
        assert!(head.contains("host: api.example:8080\r\n"), "{head}");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_an_error() {
        // One request per connection, then a silent close: every pooled connection is
        // stale by the next request, which must still succeed.
        let (addr, conns, _) = server(1).await;
        let pool = pool(addr, Duration::from_secs(30));
        for _ in 0..4 {
            ok(&pool, get("http://web.example/")).await;
            // Let the close arrive, as it would between real requests.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_not_reused_and_are_swept() {
        let (addr, conns, _) = server(usize::MAX).await;
        let pool = pool(addr, Duration::from_millis(100));
        ok(&pool, get("http://web.example/")).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        ok(&pool, get("http://web.example/")).await;
        assert_eq!(conns.load(Ordering::SeqCst), 2, "the idle connection was too old");
        assert_eq!(pool.idle(), 1);
        // Nothing checks the pool out again: only the sweeper (every 100 ms) can close it.
        until_idle(&pool, 0, "the sweeper closes the expired connection").await;
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_that_then_serve_in_turn() {
        let (addr, conns, _) = server(usize::MAX).await;
        let pool = pool(addr, Duration::from_secs(30));
        let reqs: Vec<_> = (0..4).map(|_| pool.request(get("http://web.example/"))).collect();
        for rsp in futures_util::future::join_all(reqs).await {
            let rsp = rsp.expect("response");
            assert_eq!(rsp.into_body().collect().await.expect("body").to_bytes(), "ok");
        }
        // Bodies read, the connections go back (some through the waiting task).
        until_idle(&pool, 4, "all four connections go back").await;
        for _ in 0..8 {
            ok(&pool, get("http://web.example/")).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_refused_connect_is_the_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        let err = pool(port, Duration::from_secs(30))
            .request(get("http://web.example/"))
            .await
            .expect_err("refused");
        assert!(err.downcast_ref::<crate::client::ConnectError>().is_some(), "{err}");
    }

    #[test]
    fn connect_goes_in_authority_form_and_never_returns() {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri("db.example:5432")
            .body(body::empty())
            .expect("request");
        assert!(!to_wire_form(&mut req));
        assert_eq!(req.uri(), "db.example:5432");
        let mut req = get("http://web.example/chat");
        req.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(to_wire_form(&mut req), "kept unless the answer is 101");
        assert_eq!(req.uri(), "/chat");
    }

    #[test]
    fn host_is_the_host_and_a_non_default_port_without_user_information() {
        let host = |u: &str| host_of(&u.parse().expect("uri")).expect("host");
        assert_eq!(host("http://user:pw@web.example/"), "web.example");
        assert_eq!(host("http://web.example:80/"), "web.example");
        assert_eq!(host("http://web.example:8080/"), "web.example:8080");
        assert_eq!(host("https://web.example:443/"), "web.example");
        assert!(host_of(&"/relative".parse().expect("uri")).is_none());
    }

    #[tokio::test]
    async fn a_declined_upgrade_keeps_the_connection() {
        let (addr, conns, _) = server(usize::MAX).await;
        let pool = pool(addr, Duration::from_secs(30));
        for _ in 0..3 {
            let mut req = get("http://web.example/chat");
            req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            req.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            ok(&pool, req).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }
}
