//! Pooled upstream connections, one [`EndpointClient`] per endpoint address.
//!
//! Each endpoint gets its own pools (HTTP/1.1: [`crate::pool`]; HTTP/2: hyper-util's
//! client) whose connector always dials that endpoint. The request keeps the authority
//! the app asked for, so the upstream sees the caller's `Host`/`:authority` unchanged,
//! while the pool is still per endpoint.
//! Clients are cached in [`Clients`] and shared by every stack, so a configuration change
//! that rebuilds a service's stack keeps its warm connections.
//!
//! An endpoint with an identity (a meshed sidecar, as the control plane says) is dialled
//! with mesh mutual TLS when this sidecar has an identity itself: the handshake proves
//! the server holds exactly that identity. HTTP/1 requests then travel as HTTP/2 inside
//! the tunnel (one multiplexed connection per peer, as linkerd2-proxy does), marked with
//! `ballast-orig-proto` so the server sidecar speaks HTTP/1.1 to its app; upgrades
//! (WebSocket) keep HTTP/1.1 on a tunnel of their own (ALPN `http/1.1`).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ballast_api::names::HEADER_ORIG_PROTO;
use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::body::{Body, BoxError};
use crate::identity::MeshIdentity;
use crate::identity::tls::Dial;
use crate::metrics::Metrics;
use crate::pool::H1Pool;

/// How long an idle upstream connection stays pooled. Shorter than common server
/// keep-alive timeouts would be ideal but varies (Node.js closes after 5 s); 30 s bounds
/// the window in which a request can meet a connection the server just closed, which the
/// policy's `reset` retry condition then covers. A policy's `timeouts.idle` overrides it
/// per service.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Dials one fixed address, whatever the URI says; with `tls`, then speaks mesh TLS
/// expecting the server to prove the endpoint's identity.
#[derive(Clone)]
pub struct FixedConnector {
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<Dial>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connecting to {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error(
        "mesh TLS with {addr} failed (expecting the identity {name}): {source}; a peer with another identity or certificate authority is refused"
    )]
    Tls { addr: SocketAddr, name: String, source: std::io::Error },
}

/// An upstream connection, plain or in mesh TLS. Our own type rather than the bare
/// `TcpStream` also to tell hyper-util there is no connection info to attach: its
/// `TcpStream` impl attaches the addresses (`HttpInfo`) to every response, three
/// allocations per request that nothing here reads.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl FixedConnector {
    /// Plain TCP to `addr`.
    pub fn plain(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self { addr, connect_timeout, tls: None }
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                Connected::new().negotiated_h2()
            }
            _ => Connected::new(),
        }
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            UpstreamStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            UpstreamStream::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        both!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => crate::small_write::poll_write_vectored(Pin::new(s), cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_shutdown(cx))
    }
}

impl tower::Service<http::Uri> for FixedConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (addr, timeout, tls) = (self.addr, self.connect_timeout, self.tls.clone());
        Box::pin(async move {
            let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| ConnectError::Timeout { addr, timeout })?
                .map_err(|source| ConnectError::Io { addr, source })?;
            // Small requests and responses must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            let Some(dial) = tls else { return Ok(TokioIo::new(UpstreamStream::Plain(stream))) };
            // The handshake shares the connect timeout.
            let tls = dial.connect(stream, timeout).await.map_err(|source| match source.kind() {
                io::ErrorKind::TimedOut => ConnectError::Timeout { addr, timeout },
                _ => ConnectError::Tls { addr, name: dial.name().to_str().into_owned(), source },
            })?;
            Ok(TokioIo::new(UpstreamStream::Tls(Box::new(tls))))
        })
    }
}

/// A pooled client for one endpoint, speaking HTTP/1.1 or HTTP/2 (prior knowledge) as
/// the request's version says. HTTP/1.1 goes through this crate's own per-endpoint pool
/// ([`crate::pool`], which says why), HTTP/2 through hyper-util's, which multiplexes one
/// connection.
#[derive(Clone)]
pub struct EndpointClient {
    h1: H1Pool,
    h2: Client<FixedConnector, Body>,
    /// Mesh TLS to this endpoint: HTTP/1 requests go as HTTP/2 (module docs).
    mesh: bool,
}

impl EndpointClient {
    /// `tls`: the dials of a meshed endpoint, for the HTTP/1.1 and the HTTP/2 pool.
    fn new(addr: SocketAddr, settings: &ClientSettings, tls: Option<(Dial, Dial)>) -> Self {
        let mesh = tls.is_some();
        let (h1_tls, h2_tls) = tls.unzip();
        let connector = |tls| FixedConnector { addr, connect_timeout: settings.connect_timeout, tls };
        let idle = settings.idle_timeout.unwrap_or(POOL_IDLE_TIMEOUT);
        // hyper's writev strategy, with small writes sent as one send(2) by
        // `UpstreamStream`: see `server::serve_http`.
        let h1 = H1Pool::new(connector(h1_tls), idle);
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(30))
            .build(connector(h2_tls));
        Self { h1, h2, mesh }
    }
}

impl EndpointClient {
    /// Sends `req` on a pooled connection; the pools queue, so there is no readiness to
    /// wait for.
    pub fn request(&self, mut req: Request<Body>) -> ResponseFuture {
        if req.version() == Version::HTTP_2 {
            return ResponseFuture::H2(self.h2.request(req));
        }
        if self.mesh && !req.headers().contains_key(header::UPGRADE) {
            // The URI already carries the authority (the proxy sets it on every request).
            req.headers_mut().remove(header::HOST);
            req.headers_mut().insert(HEADER_ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
            *req.version_mut() = Version::HTTP_2;
            return ResponseFuture::H2(self.h2.request(req));
        }
        ResponseFuture::H1(Box::pin(self.h1.request(req)))
    }
}

/// The response of either pool.
pub enum ResponseFuture {
    H1(Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>),
    H2(hyper_util::client::legacy::ResponseFuture),
}

impl Future for ResponseFuture {
    type Output = Result<Response<Incoming>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            ResponseFuture::H1(f) => f.as_mut().poll(cx),
            ResponseFuture::H2(f) => Pin::new(f).poll(cx).map_err(BoxError::from),
        }
    }
}

impl tower::Service<Request<Body>> for EndpointClient {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.request(req)
    }
}

/// How a service's policy shapes its upstream connections (`timeouts.connect`,
/// `timeouts.idle`); `None` takes the sidecar's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PoolPolicy {
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientSettings {
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    /// The endpoint's identity (SPIFFE ID) when it is dialled with mesh TLS.
    peer: Option<Arc<str>>,
}

/// Cache of endpoint clients by address and connection settings: two services with
/// different `timeouts.connect` to the same address keep separate pools.
///
/// Bounded: passthrough traffic can name any address, so past 4,096 entries (`Clients::MAX`)
/// the cache is cleared (connections of dropped clients close when idle) rather than grown.
pub struct Clients {
    connect_timeout: Duration,
    /// This sidecar's identity (and the metrics its handshakes count in): without one,
    /// every endpoint is dialled in plain text.
    identity: Option<(Arc<MeshIdentity>, Metrics)>,
    cache: Mutex<HashMap<(SocketAddr, ClientSettings), EndpointClient>>,
}

impl Clients {
    const MAX: usize = 4096;

    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        Self::with_identity(connect_timeout, None)
    }

    pub fn with_identity(
        connect_timeout: Duration,
        identity: Option<(Arc<MeshIdentity>, Metrics)>,
    ) -> Arc<Self> {
        Arc::new(Self { connect_timeout, identity, cache: Mutex::new(HashMap::new()) })
    }

    /// The client of `addr` with the sidecar's default settings, in plain text.
    pub fn get(&self, addr: SocketAddr) -> EndpointClient {
        self.get_with(addr, PoolPolicy::default(), None)
    }

    /// The client of `addr`; with `peer` (the endpoint's SPIFFE ID) and an identity of
    /// our own, over mesh TLS requiring that identity.
    pub fn get_with(&self, addr: SocketAddr, policy: PoolPolicy, peer: Option<&Arc<str>>) -> EndpointClient {
        let tls = match (&self.identity, peer) {
            (Some((mesh, metrics)), Some(peer)) => match (
                Dial::new(mesh.tls.client_http1.clone(), peer, metrics),
                Dial::new(mesh.tls.client_h2.clone(), peer, metrics),
            ) {
                (Ok(h1), Ok(h2)) => Some((h1, h2)),
                (Err(e), _) | (_, Err(e)) => {
                    // Validated on arrival, so not expected; plain text beats no traffic,
                    // and a strict server will refuse it visibly.
                    tracing::warn!(endpoint = %addr, error = %e, "endpoint identity unusable; dialling in plain text");
                    None
                }
            },
            _ => None,
        };
        let settings = ClientSettings {
            connect_timeout: policy.connect_timeout.unwrap_or(self.connect_timeout),
            idle_timeout: policy.idle_timeout,
            peer: tls.as_ref().and(peer.cloned()),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr, settings);
        if let Some(c) = cache.get(&key) {
            return c.clone();
        }
        if cache.len() >= Self::MAX {
            cache.clear();
        }
        let c = EndpointClient::new(addr, &key.1, tls);
        cache.insert(key, c.clone());
        c
    }
}
