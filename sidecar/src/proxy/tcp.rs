//! Opaque TCP (and TLS) forwarding.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{ConnInfo, Shared};
use crate::metrics::Metrics;
use crate::stack::Direction;

/// Forwards a connection whose protocol the sidecar does not speak.
///
/// Outbound it goes to an endpoint of the service whose virtual address was dialled, else
/// to the original destination. A client that used the outbound port directly (no
/// original destination) and did not speak HTTP has named no destination: it is closed.
pub async fn forward<T>(shared: Arc<Shared>, conn: ConnInfo, downstream: T)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let target = match conn.direction {
        Direction::Inbound => Some(shared.app_target(&conn)),
        Direction::Outbound => conn.orig_dst.map(|dst| {
            let snap = shared.store.load();
            snap.by_original_dst(dst).and_then(|e| e.tcp_endpoint(dst.port())).unwrap_or(dst)
        }),
    };
    let Some(target) = target else {
        tracing::debug!(peer = %conn.peer, "opaque connection to the outbound port without an original destination; closing");
        return;
    };
    if shared.is_own_listener(target, &conn) {
        tracing::warn!(%target, "refusing to forward a connection to this sidecar's own listener");
        return;
    }
    let upstream = match connect(target, shared.settings.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%target, error = %e, direction = conn.direction.as_str(), "TCP upstream connect failed");
            return;
        }
    };
    splice(&shared.metrics, conn.direction, downstream, upstream).await;
}

pub async fn connect(target: SocketAddr, timeout: std::time::Duration) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(target)).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}"))
    })??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Copies both ways until both sides are done, counting bytes.
pub async fn splice<A, B>(metrics: &Metrics, direction: Direction, mut downstream: A, mut upstream: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((from_client, to_client)) => {
            let d = direction.as_str();
            metrics.tcp_read_bytes.with_label_values(&[d]).inc_by(from_client);
            metrics.tcp_write_bytes.with_label_values(&[d]).inc_by(to_client);
        }
        Err(e) => tracing::debug!(error = %e, "tcp stream ended with an error"),
    }
}
