//! Sockets for hand-written peers: clients in the client namespace, listeners in any
//! namespace, reading to the end, resetting, many clients at once, and peers on threads.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::stream::{BLOCK, Stream};
use crate::{Ns, PROXY_V4, World};

/// Connects from the client namespace to the proxy's `port`, with `TCP_NODELAY` and read and
/// write timeouts of `timeout`.
pub fn connect(world: &World, port: u16, timeout: Duration) -> Result<TcpStream> {
    let addr = SocketAddr::new(PROXY_V4, port);
    let stream = world
        .within(Ns::Client, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?
        .with_context(|| format!("connecting to {addr} from the client namespace"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Connects from `source` (an address of namespace `ns`, any port) to `to`, with
/// `TCP_NODELAY` and read and write timeouts of `timeout`: a client whose address matters, such
/// as a trusted balancer's or an IPv6 client's.
pub fn connect_from(
    world: &World,
    ns: Ns,
    source: std::net::IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, socket};
    let stream = world
        .within(ns, move || -> Result<TcpStream> {
            let family = if source.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrStorage::from(SocketAddr::new(source, 0)),
            )?;
            nix::sys::socket::connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrStorage::from(to),
            )?;
            Ok(TcpStream::from(fd))
        })?
        .with_context(|| format!("connecting from {source} to {to} in {ns:?}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// How a read-to-the-end ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Orderly end of stream (FIN).
    Eof,
    /// The connection was reset.
    Reset,
    /// The read timeout passed with the connection still open.
    TimedOut,
    /// Another error.
    Error(io::ErrorKind),
}

impl End {
    /// Whether the peer closed the connection (FIN or RST).
    pub fn closed(&self) -> bool {
        matches!(self, End::Eof | End::Reset)
    }
}

/// Reads until end of stream, reset, error or `limit` bytes; returns the bytes and how it
/// ended. Each read is bounded by the stream's read timeout.
pub fn read_to_end(stream: &mut TcpStream, limit: usize) -> (Vec<u8>, End) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (out, End::Eof),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() >= limit {
                    return (out, End::Error(io::ErrorKind::FileTooLarge));
                }
            }
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::ConnectionReset => return (out, End::Reset),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    return (out, End::TimedOut);
                }
                kind => return (out, End::Error(kind)),
            },
        }
    }
}

/// Half-closes `stream` and expects the peer's clean end of stream with no byte before it:
/// how a test ends a connection whose bytes it has already checked. `what` says where in the
/// test this is, for the failure message.
pub fn shut_and_expect_eof(stream: &mut TcpStream, what: &str) -> Result<()> {
    stream.shutdown(Shutdown::Write)?;
    let (rest, end) = read_to_end(stream, 1 << 16);
    anyhow::ensure!(
        end == End::Eof && rest.is_empty(),
        "{what}: {} bytes, {end:?}",
        rest.len()
    );
    Ok(())
}

/// Against an echo backend: sends `hello`, then `len` patterned bytes, expects each echoed
/// byte for byte, half-closes and expects a clean end with nothing more.
pub fn echo_round_trip(stream: &mut TcpStream, hello: &[u8], len: u32) -> Result<()> {
    let me = stream.local_addr()?;
    stream.write_all(hello)?;
    let echoed =
        read_exactly(stream, hello.len()).with_context(|| format!("{me}: the echoed hello"))?;
    anyhow::ensure!(echoed == hello, "{me}: the hello came back different");
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    stream.write_all(&payload)?;
    let echoed =
        read_exactly(stream, payload.len()).with_context(|| format!("{me}: the echoed payload"))?;
    anyhow::ensure!(echoed == payload, "{me}: the payload came back different");
    shut_and_expect_eof(stream, &format!("{me}: after the echo"))
}

/// A TCP port on `ip` that nothing in this namespace listens on right now (the kernel picks
/// it; it may be taken again before it is used, which is unlikely among high ports).
pub fn free_port(ip: std::net::IpAddr) -> Result<u16> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))?;
    Ok(listener.local_addr()?.port())
}

/// A listener on `addr` inside `ns`, for tests that write their own server.
pub fn listen_in(world: &World, ns: Ns, addr: SocketAddr) -> Result<TcpListener> {
    world
        .within(ns, move || TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr} in the {ns:?} namespace"))
}

/// Accepts one connection within `timeout`, with `TCP_NODELAY` and read and write timeouts of
/// `io_timeout` on it.
pub fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
    io_timeout: Duration,
) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                bail!(
                    "no connection to {:?} within {timeout:?}",
                    listener.local_addr()
                )
            }
            Err(e) => return Err(e).context("accepting"),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    Ok(stream)
}

/// Closes `stream` abruptly: with `SO_LINGER` 0 the kernel sends RST instead of FIN and throws
/// away whatever was not sent.
pub fn reset(stream: TcpStream) -> Result<()> {
    nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    drop(stream);
    Ok(())
}

/// Reads exactly `len` bytes within the stream's read timeout (for a hello or a greeting).
pub fn read_exactly(stream: &mut TcpStream, len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    stream
        .read_exact(&mut out)
        .with_context(|| format!("reading {len} bytes"))?;
    Ok(out)
}

/// Runs `client(i)` for `i` in `0..n`, each on its own thread inside the client namespace, all
/// at once, and returns the addresses of those that succeeded and a message for each failure.
pub fn run_clients(
    world: &World,
    n: usize,
    client: impl Fn(usize) -> Result<SocketAddr> + Sync,
) -> Result<(Vec<SocketAddr>, Vec<String>)> {
    // Threads spawned from a thread inside the client namespace are in it too.
    let results: Vec<Result<SocketAddr>> = world.within(Ns::Client, || {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let client = &client;
                    std::thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn_scoped(s, move || client(i))
                        .expect("spawning a client thread")
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
                })
                .collect()
        })
    })?;
    let mut addrs = Vec::new();
    let mut failures = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(addr) => addrs.push(addr),
            Err(e) => failures.push(format!("client {i}: {e:#}")),
        }
    }
    Ok((addrs, failures))
}

// Hand-written peers on threads.

/// Runs `f` on its own thread; its result arrives on the returned channel (see [`result`]).
pub fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> mpsc::Receiver<Result<T>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// The result of a [`spawn`]ed thread, waiting at most `timeout`.
pub fn result<T>(rx: &mpsc::Receiver<Result<T>>, timeout: Duration, what: &str) -> Result<T> {
    match rx.recv_timeout(timeout) {
        Ok(r) => r.with_context(|| what.to_owned()),
        Err(mpsc::RecvTimeoutError::Timeout) => bail!("{what}: not done within {timeout:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => bail!("{what}: the thread panicked"),
    }
}

/// Echoes everything until end of stream, then half-closes; returns the bytes echoed.
pub fn echo(mut stream: TcpStream) -> Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut total = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("echo: reading after {total}")),
        };
        stream.write_all(&buf[..n])?;
        total += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(total)
}

/// Reads `hello.len()` bytes and checks they are the hello.
pub fn expect_hello(stream: &mut TcpStream, hello: &[u8]) -> Result<()> {
    let got = read_exactly(stream, hello.len())?;
    ensure!(got == hello, "the hello did not arrive intact");
    Ok(())
}

/// Writes as much of the stream `seed` as the kernel accepts without blocking, for `period`
/// (at most `cap` bytes); returns how much that was. The socket is blocking again afterwards.
pub fn write_while_possible(
    stream: &mut TcpStream,
    seed: u64,
    period: Duration,
    cap: u64,
) -> Result<u64> {
    stream.set_nonblocking(true)?;
    let mut source = Stream::new(seed);
    let mut offset = 0u64;
    let started = Instant::now();
    while started.elapsed() < period && offset < cap {
        match stream.write(source.at(offset)) {
            Ok(n) => offset += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("writing after {offset} bytes")),
        }
    }
    stream.set_nonblocking(false)?;
    Ok(offset)
}

/// Where `got` first differs from `want`, and where the bytes found there belong in `want`
/// (which tells loss, duplication and reordering apart).
pub fn difference(got: &[u8], want: &[u8]) -> String {
    let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) else {
        return format!("{} bytes where {} were expected", got.len(), want.len());
    };
    let probe = &got[at..got.len().min(at + 32)];
    let found = want.windows(probe.len()).position(|w| w == probe);
    format!(
        "first difference at offset {at} of {} received ({} expected); the bytes received there \
         belong at offset {found:?} of what was sent",
        got.len(),
        want.len()
    )
}

/// Sends the stream `seed` while reading (and discarding) whatever arrives, on this one
/// thread, until the connection ends or `timeout` passes; returns the bytes sent and the first
/// sign of the end. One thread matters: after a reset, whichever call comes first takes the
/// error, and a read after a write took it sees a plain end of stream; so a second thread
/// writing would make a reset look like a FIN to the reader.
pub fn send_until_end(stream: &mut TcpStream, seed: u64, timeout: Duration) -> (u64, End) {
    let later = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        )
    };
    let end = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionReset => End::Reset,
        kind => End::Error(kind),
    };
    if let Err(e) = stream.set_nonblocking(true) {
        return (0, end(e));
    }
    let mut source = Stream::new(seed);
    let mut sent = 0u64;
    let mut buf = vec![0u8; BLOCK];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut idle = true;
        match stream.write(source.at(sent)) {
            Ok(n) => {
                sent += n as u64;
                idle = false;
            }
            Err(e) if later(&e) => {}
            Err(e) => return (sent, end(e)),
        }
        match stream.read(&mut buf) {
            Ok(0) => return (sent, End::Eof),
            Ok(_) => idle = false,
            Err(e) if later(&e) => {}
            Err(e) => return (sent, end(e)),
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    (sent, End::TimedOut)
}
