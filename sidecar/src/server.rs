//! Accept loops and per-connection handling: original destination, protocol detection,
//! then HTTP (hyper) or opaque TCP.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use ballast_api::service::Protocol as DeclaredProtocol;

use crate::detect::{self, Detection, Protocol};
use crate::identity::tls::{ALPN_H2, ALPN_HTTP1, ALPN_OPAQUE};
use crate::metrics::OpenConnection;
use crate::proxy::{ConnInfo, MeshPeer, Shared, http, tcp};
use crate::rejection::Reason;
use crate::stack::Direction;

/// Accepts until the drain starts; then the listener is dropped, so new connections are
/// refused while the old ones finish.
pub async fn accept_loop(listener: TcpListener, direction: Direction, shared: Arc<Shared>) {
    let stop = shared.shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let tracked = shared.shutdown.track();
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        handle(stream, peer, direction, shared).await;
                        drop(tracked);
                    });
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, direction = direction.as_str(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    tracing::debug!(direction = direction.as_str(), "listener closed for drain");
}

async fn handle(stream: TcpStream, peer: std::net::SocketAddr, direction: Direction, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else { return };
    let orig_dst = crate::orig_dst::original_dst(&stream);
    let _open = OpenConnection::new(&shared.metrics, direction.as_str());
    let peer_requests = (direction == Direction::Inbound)
        .then(|| ConnInfo::peer_requests(&shared.metrics, &shared.settings.inbound_label, None));
    let conn = ConnInfo { direction, peer, local, orig_dst, mesh_peer: None, peer_requests };
    let dir = direction.as_str();
    // A port the configuration declares `tcp` is forwarded at once: no detection delay for
    // server-speaks-first protocols, and no chance of HTTP-looking bytes being rewritten.
    if direction == Direction::Outbound
        && let Some(dst) = orig_dst
        && shared.store.load().by_original_dst(dst).and_then(|e| e.protocol(dst.port()))
            == Some(DeclaredProtocol::Tcp)
    {
        shared.metrics.tcp_connections_total.with_label_values(&[dir, Protocol::Opaque.as_str()]).inc();
        return Box::pin(tcp::forward(shared, conn, stream)).await;
    }
    let (protocol, io) = match detect::detect(stream, shared.settings.detect_timeout).await {
        Ok(Detection::Detected { protocol, io, timed_out }) => {
            if timed_out {
                shared.metrics.detect_timeouts.with_label_values(&[dir]).inc();
            }
            (protocol, io)
        }
        Ok(Detection::Closed) => return,
        Err(e) => {
            tracing::debug!(error = %e, %peer, "connection failed during protocol detection");
            return;
        }
    };
    shared.metrics.tcp_connections_total.with_label_values(&[dir, protocol.as_str()]).inc();
    tracing::trace!(%peer, ?orig_dst, protocol = protocol.as_str(), direction = dir, "accepted");
    // The app speaks to a proxy of its own (CONNECT or absolute-form through iptables) and
    // that proxy is not a mesh service: keep out of the way and pass the bytes through, so
    // its request targets and Proxy-* headers reach it unchanged.
    let own_proxy = direction == Direction::Outbound
        && protocol == Protocol::Http1
        && orig_dst.is_some_and(|dst| shared.store.load().by_original_dst(dst).is_none())
        && detect::is_proxy_request(io.prefix());
    if direction == Direction::Inbound && protocol == Protocol::Tls {
        // Boxed, like the opaque forwards below: a task is as large as the largest future
        // it may await, and plain HTTP connections must not each reserve room for a TLS
        // session or a splice.
        return Box::pin(inbound_tls(io, conn, shared)).await;
    }
    if direction == Direction::Inbound
        && protocol == Protocol::Opaque
        && let Err(why) = shared.store.load().access.check(None, None)
    {
        refuse_opaque(&shared, &conn, &why);
        return;
    }
    match protocol {
        Protocol::Http1 if own_proxy => Box::pin(tcp::forward(shared, conn, io)).await,
        Protocol::Http1 | Protocol::Http2 => serve_http(io, protocol, conn, shared).await,
        Protocol::Tls | Protocol::Opaque => Box::pin(tcp::forward(shared, conn, io)).await,
    }
}

/// An inbound TLS connection: mesh TLS when its SNI is this sidecar's identity name,
/// terminated here; else the app's own TLS, passed through (unless the policy refuses
/// callers without mesh TLS).
async fn inbound_tls(io: detect::PrefixedIo<TcpStream>, conn: ConnInfo, shared: Arc<Shared>) {
    let current = shared.identity.as_ref().and_then(|m| m.current().map(|c| (m.clone(), c)));
    let (io, mesh) = match current {
        Some((mesh, current)) => {
            match crate::identity::tls::read_sni(io, shared.settings.detect_timeout).await {
                Ok((sni, io)) => {
                    let ours = sni.as_deref() == Some(current.dns_name.as_str());
                    (io, ours.then_some(mesh))
                }
                Err(e) => {
                    tracing::debug!(error = %e, peer = %conn.peer, "connection failed while reading its TLS ClientHello");
                    return;
                }
            }
        }
        None => (io, None),
    };
    let Some(mesh) = mesh else {
        if let Err(why) = shared.store.load().access.check(None, None) {
            refuse_opaque(&shared, &conn, &why);
            return;
        }
        return tcp::forward(shared, conn, io).await;
    };
    let handshakes = &shared.metrics.mesh_tls_handshakes;
    let acceptor = tokio_rustls::TlsAcceptor::from(mesh.tls.server.clone());
    // The handshake gets the detection timeout too: a client that stalls mid-handshake
    // holds nothing for long.
    let tls = match tokio::time::timeout(
        shared.settings.detect_timeout.max(Duration::from_secs(5)),
        acceptor.accept(io),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            handshakes.with_label_values(&["inbound", "failed"]).inc();
            tracing::info!(peer = %conn.peer, error = %e, "mesh TLS handshake refused");
            return;
        }
        Err(_) => {
            handshakes.with_label_values(&["inbound", "failed"]).inc();
            tracing::info!(peer = %conn.peer, "mesh TLS handshake timed out");
            return;
        }
    };
    handshakes.with_label_values(&["inbound", "ok"]).inc();
    let session = tls.get_ref().1;
    let identity =
        session.peer_certificates().and_then(|c| c.first()).and_then(crate::identity::peer_identity);
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let Some(identity) = identity else {
        // The chain verified, so this is a certificate of our CA without a workload
        // identity (not one the control plane issues to sidecars).
        tracing::info!(peer = %conn.peer, "mesh TLS client certificate carries no SPIFFE ID; closing");
        return;
    };
    let header = match ::http::HeaderValue::from_str(&identity.to_string()) {
        Ok(h) => h,
        Err(_) => return,
    };
    let mesh_peer = MeshPeer { identity, header };
    let peer_requests =
        Some(ConnInfo::peer_requests(&shared.metrics, &shared.settings.inbound_label, Some(&mesh_peer)));
    let conn = ConnInfo { mesh_peer: Some(Arc::new(mesh_peer)), peer_requests, ..conn };
    tracing::trace!(peer = %conn.peer, identity = ?conn.mesh_peer, "mesh TLS accepted");
    match alpn.as_deref() {
        Some(ALPN_H2) => serve_http(tls, Protocol::Http2, conn, shared).await,
        Some(ALPN_HTTP1) => serve_http(tls, Protocol::Http1, conn, shared).await,
        Some(ALPN_OPAQUE) => {
            let peer = conn.mesh_peer.as_ref().map(|p| &p.identity);
            let trust_domain = mesh.current().map(|c| c.identity.trust_domain.clone());
            if let Err(why) = shared.store.load().access.check(peer, trust_domain.as_deref()) {
                refuse_opaque(&shared, &conn, &why);
                return;
            }
            tcp::forward(shared, conn, tls).await
        }
        _ => {
            tracing::info!(peer = %conn.peer, "mesh TLS client negotiated no known protocol (ALPN); closing")
        }
    }
}

/// Closes an inbound non-HTTP connection the policy refuses, counting it as a rejection.
fn refuse_opaque(shared: &Shared, conn: &ConnInfo, why: &str) {
    shared
        .metrics
        .rejections_total
        .with_label_values(&["inbound", &shared.settings.inbound_label, Reason::Forbidden.as_str()])
        .inc();
    tracing::info!(peer = %conn.peer, reason = %why, "inbound connection refused");
}

async fn serve_http<T>(io: T, protocol: Protocol, conn: ConnInfo, shared: Arc<Shared>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let svc = {
        let shared = shared.clone();
        // Boxed: hyper keeps the service's future inline in the connection's state, so
        // an unboxed one would make every idle connection as large as a request in
        // flight (23 KiB per idle HTTP/1.1 connection instead of 16 KiB, measured).
        service_fn(move |req| Box::pin(http::handle(shared.clone(), conn.clone(), req)))
    };
    let io = TokioIo::new(io);
    let stop = shared.shutdown.signaled();
    let result = if protocol == Protocol::Http2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        // Pings find dead peers, so their connections do not stay open forever.
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20));
        let c = builder.serve_connection(io, svc);
        tokio::pin!(c);
        tokio::select! {
            r = c.as_mut() => r,
            _ = stop => { c.as_mut().graceful_shutdown(); c.await }
        }
    } else {
        let mut builder = http1::Builder::new();
        // hyper's default write strategy (writev of head and body) stays: flattening them
        // into one buffer for send(2) was 5-12% faster, but that buffer keeps its size on
        // a keep-alive connection, ~550 KiB per connection that once carried a large body
        // to a slow reader (benches/README.md, session 10). The socket below copies small
        // writes into one send(2) instead (`small_write`), which keeps no memory.
        // The header read timeout (30 s, hyper's default) also closes idle keep-alive
        // connections; its timer is coarse, since hyper makes one per request.
        builder
            .timer(shared.header_timer.clone())
            .header_read_timeout(Duration::from_secs(30))
            .keep_alive(true);
        let c = builder.serve_connection(io, svc).with_upgrades();
        tokio::pin!(c);
        tokio::select! {
            r = c.as_mut() => r,
            _ = stop => { c.as_mut().graceful_shutdown(); c.await }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}
