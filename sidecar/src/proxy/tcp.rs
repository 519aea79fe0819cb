//! Opaque TCP (and TLS) forwarding.

use std::net::SocketAddr;
use std::sync::Arc;

use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{ConnInfo, Shared};
use crate::balance::Target;
use crate::client::UpstreamStream;
use crate::identity::tls::Dial;
use crate::metrics::Metrics;
use crate::stack::Direction;

/// Forwards a connection whose protocol the sidecar does not speak.
///
/// Outbound it goes to an endpoint of the service whose virtual address was dialled, else
/// to the original destination; a meshed endpoint is reached in mesh TLS (ALPN
/// `ballast.io/opaque`), so strict servers accept it and the bytes are encrypted. A client
/// that used the outbound port directly (no original destination) and did not speak HTTP
/// has named no destination: it is closed.
pub async fn forward<T>(shared: Arc<Shared>, conn: ConnInfo, downstream: T)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let target = match conn.direction {
        Direction::Inbound => Some(Target::plain(shared.app_target(&conn), 1)),
        Direction::Outbound => conn.orig_dst.map(|dst| {
            let snap = shared.store.load();
            snap.by_original_dst(dst)
                .and_then(|e| e.tcp_endpoint(dst.port()))
                .unwrap_or_else(|| Target::plain(dst, 1))
        }),
    };
    let Some(target) = target else {
        tracing::debug!(peer = %conn.peer, "opaque connection to the outbound port without an original destination; closing");
        return;
    };
    if shared.is_own_listener(target.addr, &conn) {
        tracing::warn!(target = %target.addr, "refusing to forward a connection to this sidecar's own listener");
        return;
    }
    let upstream = match connect_target(&shared, &target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(target = %target.addr, error = %e, direction = conn.direction.as_str(), "TCP upstream connect failed");
            return;
        }
    };
    splice(&shared.metrics, conn.direction, downstream, upstream).await;
}

/// Connects to `target`: in mesh TLS when it has an identity and so does this sidecar,
/// else in plain TCP.
pub async fn connect_target(shared: &Shared, target: &Target) -> std::io::Result<UpstreamStream> {
    let timeout = shared.settings.connect_timeout;
    let tcp = connect(target.addr, timeout).await?;
    let (Some(mesh), Some(peer)) = (&shared.identity, &target.identity) else {
        return Ok(UpstreamStream::Plain(tcp));
    };
    let dial = Dial::new(mesh.tls.client_opaque.clone(), peer, &shared.metrics)
        .map_err(|e| std::io::Error::other(format!("endpoint identity {peer:?}: {e}")))?;
    dial.connect(tcp, timeout)
        .await
        .map(|tls| UpstreamStream::Tls(Box::new(tls)))
        .map_err(|e| std::io::Error::other(format!("mesh TLS with {} (expecting {peer}): {e}", target.addr)))
}

pub async fn connect(target: SocketAddr, timeout: std::time::Duration) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(target)).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}"))
    })??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Copies both ways until both sides are done. Bytes are counted as they flow, so a
/// connection that ends in a reset is still counted.
/// Copy buffer per direction of an opaque stream. tokio's default (8 KiB) made a bulk
/// stream cost one read and one write syscall per 8 KiB, and the benchmark's single
/// stream moved a third of direct throughput (HAProxy: half); with 32 KiB it moves 0.75×
/// direct, 1.6× HAProxy (benches/README.md). The price is 64 KiB per open tunnel.
const SPLICE_BUFFER: usize = 32 * 1024;

pub async fn splice<A, B>(metrics: &Metrics, direction: Direction, downstream: A, mut upstream: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let d = direction.as_str();
    let mut downstream = Counted {
        io: downstream,
        read: metrics.tcp_read_bytes.with_label_values(&[d]),
        written: metrics.tcp_write_bytes.with_label_values(&[d]),
    };
    if let Err(e) =
        tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, SPLICE_BUFFER, SPLICE_BUFFER)
            .await
    {
        tracing::debug!(error = %e, "tcp stream ended with an error");
    }
}

/// Counts the bytes read from and written to the downstream peer.
struct Counted<T> {
    io: T,
    read: IntCounter,
    written: IntCounter,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.inc_by(n as u64);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
