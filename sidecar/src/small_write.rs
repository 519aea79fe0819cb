//! One `send(2)` instead of `writev(2)` for a small vectored write.
//!
//! hyper writes an HTTP/1.1 message as one vectored write of its head and body slices,
//! and rustls its records the same way. For the common small message (a head and a
//! 1 KiB body) the kernel's `writev` path costs more than copying the slices here: it
//! imports and walks an iovec array before the same TCP send as `send(2)`, which is what
//! HAProxy calls. Session 10 measured the gain through hyper's own flattening
//! (`writev(false)`): 5-12% more HTTP/1.1 requests per second on one core. But hyper's
//! flatten buffer keeps its largest size for the life of a keep-alive connection (about
//! 550 KiB for each connection that once sent a large body to a slow reader), so that
//! was reverted. Copying into one small buffer per worker thread instead gets the single
//! `send` without memory per connection; a write larger than [`COALESCE_LIMIT`] goes
//! through as `writev`, where the per-call cost is small next to the copying of the bytes.
//!
//! tokio and hyper have no such option (hyper's strategy is all or nothing per
//! connection), hence this helper, used by the inbound socket (`detect::PrefixedIo`) and
//! the plain upstream socket (`client::UpstreamStream`).

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// The largest vectored write that is copied into one buffer: a head and a few KiB of
/// body, which covers the benchmarks' 1 KiB answers and most API calls. A judgement,
/// not a measured crossover: the copy grows with the bytes while what `writev` costs
/// over `send` does not, so past a few KiB the copy stops paying.
pub const COALESCE_LIMIT: usize = 4096;

/// Writes `bufs` to `w` as one `poll_write` when they hold more than one non-empty slice
/// and at most [`COALESCE_LIMIT`] bytes in all; otherwise as `w`'s own vectored write.
/// The returned count means the same either way: how many bytes of the concatenated
/// slices were written, so a short write is resumed correctly by the caller.
pub fn poll_write_vectored<W: AsyncWrite + ?Sized>(
    w: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut total = 0;
    let mut slices = 0;
    for b in bufs {
        if !b.is_empty() {
            total += b.len();
            slices += 1;
        }
    }
    if slices < 2 || total > COALESCE_LIMIT {
        return match bufs.iter().find(|b| !b.is_empty()) {
            Some(only) if slices == 1 => w.poll_write(cx, only),
            _ => w.poll_write_vectored(cx, bufs),
        };
    }
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            for b in bufs {
                buf.extend_from_slice(b);
            }
            w.poll_write(cx, &buf)
        }
        // Only if a writer's poll_write came back here; never with a socket.
        Err(_) => w.poll_write_vectored(cx, bufs),
    })
}

thread_local! {
    /// One per worker thread, reused: an array on the stack would be zeroed on every
    /// call (4 KiB of stores per write), while a reused vector only copies the bytes.
    static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(COALESCE_LIMIT));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each call, and accepts at most `accept` bytes per call (a short write).
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(&'static str, Vec<u8>)>,
        accept: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = self.accept.map_or(buf.len(), |a| a.min(buf.len()));
            self.calls.push(("write", buf[..n].to_vec()));
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = self.accept.map_or(all.len(), |a| a.min(all.len()));
            self.calls.push(("writev", all[..n].to_vec()));
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(w: &mut Recorder, bufs: &[&[u8]]) -> usize {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match poll_write_vectored(Pin::new(w), &mut cx, &slices) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("the recorder is always ready, got {other:?}"),
        }
    }

    #[test]
    fn a_small_head_and_body_go_as_one_write_in_order() {
        let mut w = Recorder::default();
        let body = vec![b'x'; 1024];
        let n = write(&mut w, &[b"HTTP/1.1 200 OK\r\n\r\n", b"", &body]);
        assert_eq!(n, 19 + 1024);
        assert_eq!(w.calls.len(), 1);
        assert_eq!(w.calls[0].0, "write");
        assert_eq!(&w.calls[0].1[..19], b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(&w.calls[0].1[19..], &body[..]);
    }

    #[test]
    fn a_write_over_the_limit_stays_vectored() {
        let mut w = Recorder::default();
        let body = vec![b'y'; COALESCE_LIMIT];
        let n = write(&mut w, &[b"head", &body]);
        assert_eq!(n, 4 + COALESCE_LIMIT);
        assert_eq!(w.calls.len(), 1);
        assert_eq!(w.calls[0].0, "writev");
        // Exactly at the limit still coalesces.
        let mut w = Recorder::default();
        write(&mut w, &[b"head", &body[4..]]);
        assert_eq!(w.calls[0].0, "write");
        assert_eq!(w.calls[0].1.len(), COALESCE_LIMIT);
    }

    #[test]
    fn one_non_empty_slice_is_written_without_a_copy_or_writev() {
        let mut w = Recorder::default();
        assert_eq!(write(&mut w, &[b"", b"only", b""]), 4);
        assert_eq!(w.calls, vec![("write", b"only".to_vec())]);
        let mut w = Recorder::default();
        assert_eq!(write(&mut w, &[b"", b""]), 0);
        assert_eq!(w.calls, vec![("writev", Vec::new())]);
    }

    #[test]
    fn a_short_write_reports_the_bytes_of_the_concatenation_written() {
        // The socket takes 5 bytes: the caller (hyper) must learn that the first slice
        // and one byte of the second went, as with writev.
        let mut w = Recorder { accept: Some(5), ..Default::default() };
        assert_eq!(write(&mut w, &[b"abcd", b"efgh"]), 5);
        assert_eq!(w.calls, vec![("write", b"abcde".to_vec())]);
    }
}
