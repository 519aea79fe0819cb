//! Plain-text HTTP/1.1 upstream connections, driven by the requests that use them.
//!
//! Why not hyper-util's pooled client, which the HTTP/2 and mesh paths still use: the
//! profile of the sidecar at maximum HTTP/1.1 load (benches/README.md) showed the gap to
//! HAProxy in per-request user-space work, and that client adds a good share of it for
//! HTTP/1: the connection is a task of its own (every request and every response crosses
//! tasks through channels), each request is boxed and races a pool checkout against a
//! lazily built connect future keyed by scheme and authority, and each response spawns one
//! more task that waits to put the connection back. Nothing else fits: a tower `Service`
//! over `hyper::client::conn` still needs someone to poll the connection.
//!
//! Here the task of the request polls its connection itself: [`H1Pool::send`] polls the
//! connection together with the response future until the response head arrives, then
//! the response body ([`Driven`]) polls it until the body ends, and the connection goes
//! back on the idle list. Idle connections are polled by nobody; one the server closed
//! meanwhile is found at checkout (polling it then reads the end of file) and dropped, and
//! a request hyper returns unsent (the connection closed as it was reused) is sent again on
//! another connection, as hyper-util does. What stays on hyper-util: HTTP/2, mesh TLS
//! (HTTP/1 goes as HTTP/2 there) and upgrades (the upgraded stream must outlive the
//! request).
//!
//! Cancellation is HTTP/1's: a request or response body dropped before its end closes its
//! connection. A response that ends while its request body is still being sent (a server
//! answering early) hands the connection to a small task that finishes the request body
//! and then returns it, so the upload is not cut short.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;

use super::{FixedConnector, UpstreamStream};
use crate::body::{Body, BoxError};

type Io = TokioIo<UpstreamStream>;

/// An HTTP/1.1 connection and its request handle, polled by whoever holds it.
struct Conn {
    tx: SendRequest<Body>,
    conn: Connection<Io, Body>,
    /// The connection future has completed (closed or failed): do not poll it again.
    done: bool,
}

impl Conn {
    /// Drives the connection's I/O; `false` once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.done = true;
        }
        !self.done
    }

    /// Whether a new request may go on it now (after driving it once, which notices a
    /// close the server sent while it was idle).
    fn reusable(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && self.tx.is_ready()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle HTTP/1.1 connections to one endpoint, and how to make more.
pub struct H1Pool {
    connector: FixedConnector,
    idle_timeout: Duration,
    idle: Mutex<IdleList>,
}

#[derive(Default)]
struct IdleList {
    /// Most recently used last: checkout takes the warmest.
    conns: Vec<Idle>,
    /// A task evicting connections idle past the timeout is running.
    reaper: bool,
}

impl H1Pool {
    pub fn new(connector: FixedConnector, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self { connector, idle_timeout, idle: Mutex::new(IdleList::default()) })
    }

    /// Sends `req` (origin-form URI and `Host` are set here) and answers with a response
    /// whose body drives the connection.
    pub async fn send(self: Arc<Self>, mut req: Request<Body>) -> Result<Response<Body>, BoxError> {
        prepare(&mut req);
        loop {
            let (mut conn, reused) = match poll_fn(|cx| Poll::Ready(self.checkout(cx))).await {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            let sent = conn.tx.try_send_request(req);
            let mut sent = std::pin::pin!(sent);
            let result = poll_fn(|cx| {
                // The connection first: it writes the request and reads the response
                // head into the future polled next.
                conn.drive(cx);
                sent.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(rsp) => {
                    let pool = Arc::downgrade(&self);
                    return Ok(rsp.map(|body| {
                        http_body_util::BodyExt::boxed_unsync(Driven {
                            body: Some(body),
                            conn: Some(conn),
                            pool,
                        })
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the reused connection had closed. Another one.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// The warmest idle connection that can take a request, dropping those that cannot
    /// (closed by the server, or idle past the timeout).
    fn checkout(&self, cx: &mut Context<'_>) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut c) = idle.conns.pop() {
            if c.since.elapsed() < self.idle_timeout && c.conn.reusable(cx) {
                return Some(c.conn);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Conn, BoxError> {
        let io = self.connector.connect().await?;
        let (tx, conn) = http1::Builder::new().handshake(io).await?;
        Ok(Conn { tx, conn, done: false })
    }

    /// Puts a connection whose exchange is over back on the idle list.
    fn release(self: &Arc<Self>, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.conns.push(Idle { conn, since: Instant::now() });
        if !idle.reaper {
            // Outside a runtime (never on the data path) idle connections are only
            // evicted at checkout.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                idle.reaper = true;
                rt.spawn(reap(Arc::downgrade(self)));
            }
        }
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.conns.len()).unwrap_or(0)
    }
}

/// Closes connections idle past the pool's timeout, every half timeout (at most every
/// 5 s), until the pool is empty or gone.
async fn reap(pool: Weak<H1Pool>) {
    let period = match pool.upgrade() {
        Some(p) => (p.idle_timeout / 2).clamp(Duration::from_millis(10), Duration::from_secs(5)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = pool.idle_timeout;
        idle.conns.retain(|c| c.since.elapsed() < timeout);
        if idle.conns.is_empty() {
            idle.reaper = false;
            return;
        }
    }
}

/// What hyper-util's client did to a request before handing it to the connection: the
/// origin-form target, and a `Host` from the URI when the request has none.
fn prepare(req: &mut Request<Body>) {
    if !req.headers().contains_key(header::HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        // The parsed path is reused, not parsed again.
        let mut parts = http::uri::Parts::default();
        parts.path_and_query =
            Some(req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// A response body that drives its connection, and returns the connection to the pool
/// at its end.
struct Driven {
    /// `None` only while being dropped: hyper must see the body gone before the
    /// connection is polled again.
    body: Option<Incoming>,
    conn: Option<Conn>,
    pool: Weak<H1Pool>,
}

impl Driven {
    /// The body has ended: the connection goes back to the pool. No waker is needed:
    /// an idle connection is polled again at checkout, by the task that takes it.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let Some(pool) = self.pool.upgrade() else { return };
        settle(conn, pool);
    }
}

/// Returns a connection whose response is over (read, or dropped unread) to the pool:
/// at once when hyper is ready for the next request, which it is after one more poll in
/// the common case. Otherwise it still has work to finish on its own: sending the rest of
/// a request body the server answered early, or draining a response body dropped unread
/// (a retried 503; hyper drains what is small and closes the connection otherwise, as
/// it does for hyper-util's pool). A small task does that and then pools it.
fn settle(mut conn: Conn, pool: Arc<H1Pool>) {
    let mut cx = Context::from_waker(Waker::noop());
    if conn.reusable(&mut cx) {
        pool.release(conn);
        return;
    }
    if conn.done {
        return;
    }
    // Without a runtime (never on the data path) the connection just closes.
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    rt.spawn(async move {
        let ready = poll_fn(|cx| {
            if !conn.drive(cx) {
                return Poll::Ready(false);
            }
            conn.tx.poll_ready(cx).map(|r| r.is_ok())
        })
        .await;
        if ready {
            pool.release(conn);
        }
    });
}

impl http_body::Body for Driven {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else { return Poll::Ready(None) };
        let mut frame = Pin::new(&mut *body).poll_frame(cx);
        if frame.is_pending()
            && let Some(conn) = this.conn.as_mut()
        {
            // The connection reads what the body waits for (or ends, which the body
            // then reports).
            conn.drive(cx);
            frame = Pin::new(&mut *body).poll_frame(cx);
        }
        let end = body.is_end_stream();
        match frame {
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(f))) => {
                if end {
                    this.finish();
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.conn = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

impl Drop for Driven {
    /// A body known to be empty (204, HEAD, `content-length: 0`) is never polled, and a
    /// caller may stop at `is_end_stream`: the exchange is over all the same. A body
    /// dropped before its end (a retry discarding a failed try's response, a client gone)
    /// is left to hyper to drain or close ([`settle`]), once the body is gone.
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let Some(pool) = self.pool.upgrade() else { return };
        drop(self.body.take());
        settle(conn, pool);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::{Method, StatusCode};
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;
    use crate::body;

    /// What the test upstream saw.
    #[derive(Default)]
    struct Seen {
        connections: AtomicUsize,
        requests: AtomicUsize,
        /// Bytes of request bodies read after the response was sent.
        late_body: AtomicUsize,
    }

    /// A hyper HTTP/1.1 server on loopback. Paths: `/big` answers 1 MiB, `/close`
    /// answers with `connection: close`, `/empty` a 204, `/early` answers at once and reads
    /// the request body afterwards; anything else echoes the path.
    async fn upstream() -> (SocketAddr, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let s = s.clone();
                        async move {
                            s.requests.fetch_add(1, Ordering::SeqCst);
                            let path = req.uri().path().to_owned();
                            let rsp = match path.as_str() {
                                "/big" => Response::new(Full::new(Bytes::from(vec![b'x'; 1 << 20]))),
                                "/close" => Response::builder()
                                    .header(header::CONNECTION, "close")
                                    .body(Full::new(Bytes::from_static(b"bye")))
                                    .expect("response"),
                                "/empty" => Response::builder()
                                    .status(StatusCode::NO_CONTENT)
                                    .body(Full::new(Bytes::new()))
                                    .expect("response"),
                                "/early" => {
                                    let mut body = req.into_body();
                                    tokio::spawn(async move {
                                        while let Some(Ok(f)) = body.frame().await {
                                            if let Some(d) = f.data_ref() {
                                                s.late_body.fetch_add(d.len(), Ordering::SeqCst);
                                            }
                                        }
                                    });
                                    Response::new(Full::new(Bytes::from_static(b"early")))
                                }
                                p => Response::new(Full::new(Bytes::from(p.to_owned()))),
                            };
                            Ok::<_, std::convert::Infallible>(rsp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    fn pool(addr: SocketAddr, idle: Duration) -> Arc<H1Pool> {
        H1Pool::new(FixedConnector { addr, connect_timeout: Duration::from_secs(1), tls: None }, idle)
    }

    fn get(addr: SocketAddr, path: &str) -> Request<Body> {
        Request::builder().uri(format!("http://{addr}{path}")).body(body::empty()).expect("request")
    }

    async fn text(rsp: Response<Body>) -> String {
        let bytes = rsp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, seen) = upstream().await;
        let pool = pool(addr, Duration::from_secs(30));
        for i in 0..5 {
            let rsp = pool.clone().send(get(addr, &format!("/r{i}"))).await.expect("response");
            assert_eq!(rsp.status(), StatusCode::OK);
            // Origin-form reached the server, with the authority as Host.
            assert_eq!(text(rsp).await, format!("/r{i}"));
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_and_pool_them_all() {
        let (addr, seen) = upstream().await;
        let pool = pool(addr, Duration::from_secs(30));
        let rsps =
            futures_util::future::join_all((0..4).map(|i| pool.clone().send(get(addr, &format!("/{i}")))))
                .await;
        for (i, rsp) in rsps.into_iter().enumerate() {
            assert_eq!(text(rsp.expect("response")).await, format!("/{i}"));
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle_count(), 4);
        for _ in 0..8 {
            text(pool.clone().send(get(addr, "/again")).await.expect("response")).await;
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 4, "later requests reuse them");
    }

    #[tokio::test]
    async fn empty_bodies_give_the_connection_back_unread() {
        let (addr, seen) = upstream().await;
        let pool = pool(addr, Duration::from_secs(30));
        for _ in 0..3 {
            let rsp = pool.clone().send(get(addr, "/empty")).await.expect("response");
            assert_eq!(rsp.status(), StatusCode::NO_CONTENT);
            assert!(rsp.body().is_end_stream());
            drop(rsp);
            let mut head = get(addr, "/x");
            *head.method_mut() = Method::HEAD;
            let rsp = pool.clone().send(head).await.expect("response");
            drop(rsp);
        }
        assert_eq!(seen.requests.load(Ordering::SeqCst), 6);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_server_closes_is_not_reused() {
        let (addr, seen) = upstream().await;
        let pool = pool(addr, Duration::from_secs(30));
        for _ in 0..3 {
            assert_eq!(text(pool.clone().send(get(addr, "/close")).await.expect("response")).await, "bye");
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_server_closing_an_idle_connection_costs_no_request() {
        // A server that answers one request per connection and closes without saying so.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                });
            }
        });
        let pool = pool(addr, Duration::from_secs(30));
        for _ in 0..5 {
            assert_eq!(text(pool.clone().send(get(addr, "/")).await.expect("response")).await, "ok");
            // Let the close arrive before the next checkout.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_small_body_dropped_unread_keeps_its_connection() {
        // What a retry does to the response of a failed try.
        let (addr, seen) = upstream().await;
        let pool = pool(addr, Duration::from_secs(30));
        for _ in 0..3 {
            drop(pool.clone().send(get(addr, "/unread")).await.expect("response"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(seen.requests.load(Ordering::SeqCst), 3);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1, "hyper drained the bodies");
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_midway_closes_its_connection() {
        let (addr, seen) = upstream().await;
        let pool = pool(addr, Duration::from_secs(30));
        let rsp = pool.clone().send(get(addr, "/big")).await.expect("response");
        let mut body = rsp.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
        drop(body);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.idle_count(), 0, "1 MiB is too much to drain");
        assert_eq!(text(pool.clone().send(get(addr, "/next")).await.expect("response")).await, "/next");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
        // A large body read to its end gives the connection back.
        assert_eq!(text(pool.clone().send(get(addr, "/big")).await.expect("response")).await.len(), 1 << 20);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_early_response_does_not_cut_the_upload_short() {
        let (addr, seen) = upstream().await;
        let pool = pool(addr, Duration::from_secs(30));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let upload = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}/early"))
            .header(header::CONTENT_LENGTH, "3000")
            .body(body::boxed(upload))
            .expect("request");
        tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 1000])))).await.expect("send");
        let rsp = pool.clone().send(req).await.expect("response");
        assert_eq!(text(rsp).await, "early");
        // The response is over; the rest of the body still reaches the server.
        for _ in 0..2 {
            tx.send(Ok(Frame::data(Bytes::from(vec![2u8; 1000])))).await.expect("send");
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.late_body.load(Ordering::SeqCst) < 3000 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen.late_body.load(Ordering::SeqCst), 3000);
        // And the connection is pooled again once the upload is done.
        assert_eq!(text(pool.clone().send(get(addr, "/after")).await.expect("response")).await, "/after");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let (addr, seen) = upstream().await;
        let pool = pool(addr, Duration::from_millis(100));
        text(pool.clone().send(get(addr, "/")).await.expect("response")).await;
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(pool.idle_count(), 0, "the reaper closed it");
        text(pool.clone().send(get(addr, "/")).await.expect("response")).await;
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connect_failures_name_the_endpoint() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = pool(addr, Duration::from_secs(30)).send(get(addr, "/")).await.expect_err("refused");
        let connect = err.downcast_ref::<super::super::ConnectError>().expect("a connect error");
        assert!(connect.to_string().contains(&addr.to_string()), "{connect}");
    }
}
