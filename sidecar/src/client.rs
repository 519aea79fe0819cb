//! Pooled upstream connections, one [`EndpointClient`] per endpoint address.
//!
//! Each endpoint gets its own hyper-util client whose connector always dials that
//! endpoint. The request URI keeps the authority the app asked for, so the upstream sees
//! the caller's `Host`/`:authority` unchanged, while the pool is still per endpoint.
//! Clients are cached in [`Clients`] and shared by every stack, so a configuration change
//! that rebuilds a service's stack keeps its warm connections.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::body::Body;

/// How long an idle upstream connection stays pooled. Shorter than common server
/// keep-alive timeouts would be ideal but varies (Node.js closes after 5 s); 30 s bounds
/// the window in which a request can meet a connection the server just closed, which the
/// policy's `reset` retry condition then covers. A policy's `timeouts.idle` overrides it
/// per service.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Dials one fixed address, whatever the URI says.
#[derive(Clone)]
pub struct FixedConnector {
    addr: SocketAddr,
    connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connecting to {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
}

/// An upstream connection. A newtype rather than the bare `TcpStream` only to tell
/// hyper-util there is no connection info to attach: its `TcpStream` impl attaches the
/// addresses (`HttpInfo`) to every response, three allocations per request that nothing
/// here reads.
pub struct UpstreamStream(TcpStream);

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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
        let (addr, timeout) = (self.addr, self.connect_timeout);
        Box::pin(async move {
            let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| ConnectError::Timeout { addr, timeout })?
                .map_err(|source| ConnectError::Io { addr, source })?;
            // Small requests and responses must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(UpstreamStream(stream)))
        })
    }
}

/// A pooled client for one endpoint, speaking HTTP/1.1 or HTTP/2 (prior knowledge) as
/// the request's version says.
#[derive(Clone)]
pub struct EndpointClient {
    h1: Client<FixedConnector, Body>,
    h2: Client<FixedConnector, Body>,
}

impl EndpointClient {
    fn new(addr: SocketAddr, settings: ClientSettings) -> Self {
        let connector = FixedConnector { addr, connect_timeout: settings.connect_timeout };
        let idle = settings.idle_timeout.unwrap_or(POOL_IDLE_TIMEOUT);
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(30))
            .build(connector);
        Self { h1, h2 }
    }
}

impl EndpointClient {
    /// Sends `req` on a pooled connection; the pool queues, so there is no readiness to
    /// wait for.
    pub fn request(&self, req: Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
        if req.version() == Version::HTTP_2 { self.h2.request(req) } else { self.h1.request(req) }
    }
}

impl tower::Service<Request<Body>> for EndpointClient {
    type Response = Response<Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ClientSettings {
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
}

/// Cache of endpoint clients by address and connection settings: two services with
/// different `timeouts.connect` to the same address keep separate pools.
///
/// Bounded: passthrough traffic can name any address, so past [`Clients::MAX`] entries
/// the cache is cleared (connections of dropped clients close when idle) rather than grown.
pub struct Clients {
    connect_timeout: Duration,
    cache: Mutex<HashMap<(SocketAddr, ClientSettings), EndpointClient>>,
}

impl Clients {
    const MAX: usize = 4096;

    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self { connect_timeout, cache: Mutex::new(HashMap::new()) })
    }

    /// The client of `addr` with the sidecar's default settings.
    pub fn get(&self, addr: SocketAddr) -> EndpointClient {
        self.get_with(addr, PoolPolicy::default())
    }

    pub fn get_with(&self, addr: SocketAddr, policy: PoolPolicy) -> EndpointClient {
        let settings = ClientSettings {
            connect_timeout: policy.connect_timeout.unwrap_or(self.connect_timeout),
            idle_timeout: policy.idle_timeout,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&(addr, settings)) {
            return c.clone();
        }
        if cache.len() >= Self::MAX {
            cache.clear();
        }
        let c = EndpointClient::new(addr, settings);
        cache.insert((addr, settings), c.clone());
        c
    }
}
