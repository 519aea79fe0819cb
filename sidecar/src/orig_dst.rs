//! The destination a connection was addressed to before iptables redirected it.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` (or `IP6T_SO_ORIGINAL_DST`) of a redirected connection. `None` when
/// the connection was not redirected: conntrack then either has no entry or reports the
/// listener's own address, which callers treat alike (a direct connection, e.g. a client
/// using the sidecar as an HTTP proxy, or a laptop with no iptables).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let sock = socket2::SockRef::from(stream);
    let orig = if local.is_ipv4() { sock.original_dst_v4() } else { sock.original_dst_v6() };
    let orig = orig.ok()?.as_socket()?;
    (orig != local).then_some(orig)
}
