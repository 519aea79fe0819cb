//! Protocol detection by reading the first bytes of a connection.
//!
//! Written here rather than taken from a crate because none fits: we need to tell HTTP/1,
//! HTTP/2 prior knowledge, TLS and anything else apart from as few bytes as possible, give
//! up on clients that wait for the server to speak first (MySQL, SMTP), and hand every
//! byte read to whatever handles the connection next ([`PrefixedIo`]).
//!
//! HTTP/1 is recognised by a whole request line (`TOKEN SP target SP HTTP/1.x`), not by
//! a method-looking first word: a Redis `SET k v` must stay opaque TCP, not get a 400.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Beyond this many bytes without a decision the connection is opaque.
pub const MAX_DETECT_BYTES: usize = 64 * 1024;
const MAX_METHOD_LEN: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

/// Result of [`detect`].
pub enum Detection<T> {
    /// The protocol, and the connection with every byte read so far put back in front.
    Detected { protocol: Protocol, io: PrefixedIo<T>, timed_out: bool },
    /// The client closed before sending anything.
    Closed,
}

/// Reads until the protocol is known, `timeout` passes (then: opaque, the server may be
/// meant to speak first), or [`MAX_DETECT_BYTES`] are read.
pub async fn detect<T: AsyncRead + Unpin>(mut io: T, timeout: Duration) -> io::Result<Detection<T>> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut timed_out = false;
    let protocol = loop {
        let read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await;
        match read {
            Err(_elapsed) => {
                timed_out = true;
                break Protocol::Opaque;
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) if buf.is_empty() => return Ok(Detection::Closed),
            Ok(Ok(0)) => break classify(&buf).unwrap_or(Protocol::Opaque),
            Ok(Ok(_)) => {
                if let Some(p) = classify(&buf) {
                    break p;
                }
                if buf.len() >= MAX_DETECT_BYTES {
                    break Protocol::Opaque;
                }
            }
        }
    };
    Ok(Detection::Detected { protocol, io: PrefixedIo::new(buf.freeze(), io), timed_out })
}

/// Decides from the bytes so far; `None` means more are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return None;
    }
    if buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if buf[0] == 0x16 {
        // TLS record header: handshake(22), then major version 3.
        return match buf.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    http1_request_line(buf)
}

/// `Some(Http1)` for a complete request line, `None` while a prefix of one, else opaque.
fn http1_request_line(buf: &[u8]) -> Option<Protocol> {
    let opaque = Some(Protocol::Opaque);
    // Method: an upper-case token.
    let mut i = 0;
    while i < buf.len() && (buf[i].is_ascii_uppercase() || buf[i] == b'-' || buf[i] == b'_') {
        i += 1;
        if i > MAX_METHOD_LEN {
            return opaque;
        }
    }
    if i == buf.len() {
        return None;
    }
    if i == 0 || buf[i] != b' ' {
        return opaque;
    }
    i += 1;
    // Request target: visible characters.
    let target_start = i;
    while i < buf.len() && buf[i] != b' ' {
        if buf[i] < 0x21 || buf[i] == 0x7f {
            return opaque;
        }
        i += 1;
    }
    if i == buf.len() {
        return None;
    }
    if i == target_start {
        return opaque;
    }
    i += 1;
    // Version, then end of line.
    const VERSION: &[u8] = b"HTTP/1.";
    let rest = &buf[i..];
    let n = rest.len().min(VERSION.len());
    if rest[..n] != VERSION[..n] {
        return opaque;
    }
    if rest.len() <= VERSION.len() {
        return None;
    }
    if !rest[VERSION.len()].is_ascii_digit() {
        return opaque;
    }
    match &rest[VERSION.len() + 1..] {
        [] | [b'\r'] => None,
        [b'\r', b'\n', ..] | [b'\n', ..] => Some(Protocol::Http1),
        _ => opaque,
    }
}

/// Whether an HTTP/1 request line (at the start of `buf`) is a proxy request: `CONNECT`
/// or an absolute-form target. Sent through iptables, such a request is the app talking
/// to a proxy of its own.
pub fn is_proxy_request(buf: &[u8]) -> bool {
    let Some(sp) = buf.iter().position(|&b| b == b' ') else { return false };
    let (method, rest) = (&buf[..sp], &buf[sp + 1..]);
    let lower: Vec<u8> = rest.iter().take(8).map(u8::to_ascii_lowercase).collect();
    method == b"CONNECT" || lower.starts_with(b"http://") || lower.starts_with(b"https://")
}

pin_project_lite::pin_project! {
    /// An I/O whose first reads return bytes already read from it.
    pub struct PrefixedIo<T> {
        prefix: Bytes,
        #[pin]
        io: T,
    }
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: Bytes, io: T) -> Self {
        Self { prefix, io }
    }
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }
    /// The bytes not yet read again, and the connection.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.io)
    }
}

impl<T: AsyncRead> AsyncRead for PrefixedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for PrefixedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        crate::small_write::poll_write_vectored(self.project().io, cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_complete_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: x\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET http://a/b HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"CONNECT a:443 HTTP/1.1\n"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(Protocol::Tls));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SET key value\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(&[0x16, 0x09]), Some(Protocol::Opaque));
    }

    #[test]
    fn waits_for_more_on_partial_input() {
        for partial in [
            &b"G"[..],
            b"GET",
            b"GET /",
            b"GET / HTTP/1",
            b"GET / HTTP/1.1",
            b"GET / HTTP/1.1\r",
            b"PRI * HT",
            &[0x16],
        ] {
            assert_eq!(classify(partial), None, "{:?}", String::from_utf8_lossy(partial));
        }
    }

    #[test]
    fn recognises_proxy_requests() {
        assert!(is_proxy_request(b"CONNECT example.com:443 HTTP/1.1\r\n"));
        assert!(is_proxy_request(b"GET http://example.com/ HTTP/1.1\r\n"));
        assert!(is_proxy_request(b"GET HTTPS://example.com/ HTTP/1.1\r\n"));
        assert!(!is_proxy_request(b"GET / HTTP/1.1\r\n"));
        assert!(!is_proxy_request(b"GET /http://x HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn silent_client_times_out_to_opaque() {
        let (client, server) = tokio::io::duplex(64);
        let d = detect(server, Duration::from_millis(20)).await.unwrap();
        match d {
            Detection::Detected { protocol, timed_out, .. } => {
                assert_eq!(protocol, Protocol::Opaque);
                assert!(timed_out);
            }
            Detection::Closed => panic!("not closed"),
        }
        drop(client);
    }

    #[tokio::test]
    async fn read_bytes_are_replayed() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\nrest").await.unwrap();
        let Detection::Detected { protocol, mut io, .. } =
            detect(server, Duration::from_secs(5)).await.unwrap()
        else {
            panic!("closed")
        };
        assert_eq!(protocol, Protocol::Http1);
        client.write_all(b"-more").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\nrest-more");
    }

    #[tokio::test]
    async fn closed_before_bytes() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        assert!(matches!(detect(server, Duration::from_secs(1)).await.unwrap(), Detection::Closed));
    }
}
