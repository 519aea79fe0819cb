//! The floor: a byte relay that does nothing but move bytes between two sockets, one
//! epoll loop on one thread, no HTTP, no buffers beyond one read, no timers.
//!
//! Any proxy on this machine pays at least what this pays for a request: two wake-ups
//! (the request in, the response back), two reads, two writes, and the kernel's loopback
//! delivery of each write. Measured beside Ballast and HAProxy in the same run, it says
//! how much of a proxy's CPU per request is the proxy's own work and how much is the
//! machine's price for any process in the path; at a low fixed rate (1,000 req/s) the
//! second dominates (benches/README.md, session 16). Written here rather than taken from
//! a package because none of Debian's relays (socat, HAProxy in `mode tcp`) is this bare:
//! socat forks per connection and HAProxy has its own scheduler and timers.
//!
//! The harness starts it as a child process (its own binary with [`ENV`] set), pinned to
//! the proxy CPU like every proxy, and stops it with SIGTERM (the default action).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

/// `LISTEN,UPSTREAM`: when set, this process is the relay.
pub const ENV: &str = "BALLAST_BENCH_RELAY";

/// Runs the relay and exits when this process was started as one; returns otherwise.
pub fn run_if_asked() {
    let Some(spec) = std::env::var_os(ENV) else { return };
    let parsed = spec.to_str().and_then(|s| {
        let (l, u) = s.split_once(',')?;
        Some((l.parse::<SocketAddr>().ok()?, u.parse::<SocketAddr>().ok()?))
    });
    let Some((listen, upstream)) = parsed else {
        eprintln!("relay: {ENV} must be LISTEN,UPSTREAM (two socket addresses), not {spec:?}");
        std::process::exit(2);
    };
    match serve(listen, upstream) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("relay {listen} -> {upstream}: {e}");
            std::process::exit(1);
        }
    }
}

fn serve(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Infallible> {
    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    // SAFETY: epoll_create1 has no memory preconditions.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    watch(ep, listener.as_raw_fd())?;
    // Each side of a relayed connection, by descriptor: its socket and its peer's
    // descriptor. Dropping a socket closes it, which also takes it out of the epoll set.
    let mut sides: HashMap<RawFd, (TcpStream, RawFd)> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `events` has room for the 64 entries the kernel may write.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 64, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as RawFd;
            if fd == listener.as_raw_fd() {
                while let Ok((client, _)) = listener.accept() {
                    // A blocking connect: the upstream is on loopback and listening.
                    let Ok(up) = TcpStream::connect(upstream) else { continue };
                    for s in [&client, &up] {
                        s.set_nodelay(true)?;
                        s.set_nonblocking(true)?;
                    }
                    let (c, u) = (client.as_raw_fd(), up.as_raw_fd());
                    watch(ep, c)?;
                    watch(ep, u)?;
                    sides.insert(c, (client, u));
                    sides.insert(u, (up, c));
                }
                continue;
            }
            // Level-triggered: one read per wake-up, the rest (if any) on the next.
            let Some((from, peer)) = sides.get(&fd) else { continue };
            let closed = match (&*from).read(&mut buf) {
                Ok(0) => true,
                Ok(n) => match sides.get(peer) {
                    Some((to, _)) => write_all(to, &buf[..n]).is_err(),
                    None => true,
                },
                Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
            };
            if closed {
                let peer = *peer;
                sides.remove(&fd);
                sides.remove(&peer);
            }
        }
    }
}

fn watch(ep: RawFd, fd: RawFd) -> io::Result<()> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes all of `data` to a non-blocking socket, waiting for room when it is full
/// (never at these message sizes, but a full buffer must not lose bytes). A peer that
/// takes nothing for a second fails the write, and the caller closes both sides, so a
/// stuck reader cannot hold the relay's one thread for longer.
fn write_all(mut to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut p = libc::pollfd { fd: to.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                // SAFETY: one valid pollfd.
                match unsafe { libc::poll(&mut p, 1, 1_000) } {
                    0 => return Err(ErrorKind::TimedOut.into()),
                    n if n < 0 => {
                        let e = io::Error::last_os_error();
                        if e.kind() != ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                    _ => {}
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
