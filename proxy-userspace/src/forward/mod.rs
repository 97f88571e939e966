//! Moving bytes both ways once the backend has its preface.
//!
//! Every engine has the same contract: forward until both directions have seen end of stream,
//! propagate each half-close with `shutdown(SHUT_WR)` only after every byte before it went out,
//! and never lose, duplicate or reorder a byte. They differ in who touches the payload.

pub mod choose;
mod copy;
pub mod http;
pub mod packet;
pub mod sockmap;
mod splice;

use std::{
    io,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use tokio::net::TcpStream;

/// A forwarding engine a connection can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The eBPF sockmap: the kernel redirects each skb to the peer; see [`sockmap`].
    Sockmap,
    /// `splice(2)` through a pipe per direction: the payload stays in kernel pages.
    Splice,
    /// Plain reads and writes through a user-space buffer.
    Copy,
    /// HTTP/1.1 framing with a forwarding header added to each request ([`http`]); after a
    /// switch of protocols the connection is spliced.
    Http,
    /// TC programs translate each segment between the two TCP connections once the handoff is
    /// done (`docs/packet-engine.md`); spliced holds none of its bytes after that.
    Packet,
}

impl Engine {
    /// Every engine, in the order metrics list them.
    pub const ALL: [Engine; 5] = [
        Engine::Sockmap,
        Engine::Splice,
        Engine::Copy,
        Engine::Http,
        Engine::Packet,
    ];

    /// The engine's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Sockmap => "sockmap",
            Engine::Splice => "splice",
            Engine::Copy => "copy",
            Engine::Http => "http",
            Engine::Packet => "packet",
        }
    }
}

/// Bytes moved so far in each direction; readable while the transfer runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client to backend (payload after the preface).
    pub upstream: AtomicU64,
    /// Backend to client.
    pub downstream: AtomicU64,
}

impl Counters {
    /// `(upstream, downstream)` bytes.
    pub fn get(&self) -> (u64, u64) {
        (
            self.upstream.load(Ordering::Relaxed),
            self.downstream.load(Ordering::Relaxed),
        )
    }
}

/// Which side of a connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client's socket.
    Client,
    /// The backend's socket.
    Backend,
}

impl Side {
    /// A forwarding failure of this side's socket.
    pub fn failed(self, error: io::Error) -> ForwardError {
        ForwardError { side: self, error }
    }

    /// The other end of the connection.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

/// A forwarding failure: the side whose socket returned the error, and the error.
#[derive(Debug)]
pub struct ForwardError {
    /// Whose socket failed.
    pub side: Side,
    /// What the kernel said.
    pub error: io::Error,
}

impl ForwardError {
    /// The kernel's byte accounting for a spliced direction disagreed (it moved more than
    /// arrived, or less without moving on): the connection is reset rather than go on.
    pub fn kernel_accounting(detail: String) -> ForwardError {
        ForwardError {
            side: Side::Client,
            error: io::Error::other(KernelAccounting(detail)),
        }
    }

    /// Whether this is a [`ForwardError::kernel_accounting`] failure.
    pub fn is_kernel_accounting(&self) -> bool {
        self.error
            .get_ref()
            .is_some_and(|inner| inner.is::<KernelAccounting>())
    }
}

/// What a kernel-accounting failure says.
#[derive(Debug)]
struct KernelAccounting(String);

impl std::fmt::Display for KernelAccounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kernel byte accounting: {}", self.0)
    }
}

impl std::error::Error for KernelAccounting {}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(inner) = self.error.get_ref().filter(|e| e.is::<KernelAccounting>()) {
            return write!(f, "{inner}");
        }
        let side = match self.side {
            Side::Client => "client",
            Side::Backend => "backend",
        };
        write!(f, "{side} socket: {}", self.error)
    }
}

impl std::error::Error for ForwardError {}

/// Forwards between `client` and `backend` with a user-space engine until both directions are
/// closed. (The sockmap engine has its own entry point, [`sockmap::forward`], since it may
/// decline a connection; a connection it declines is forwarded with splice.)
pub async fn forward(
    engine: Engine,
    client: &TcpStream,
    backend: &TcpStream,
    counters: &Counters,
) -> Result<(), ForwardError> {
    // Whichever direction ends second skips its half-close: both sockets are closed next.
    let ended = AtomicBool::new(false);
    match engine {
        // An `http` connection comes here once it switched protocols: a byte stream to splice.
        // A `packet` connection is spliced until (and unless) its handoff is done.
        Engine::Splice | Engine::Sockmap | Engine::Http | Engine::Packet => {
            both_ways(client, backend, counters, &ended, splice::one_way).await
        }
        Engine::Copy => both_ways(client, backend, counters, &ended, copy::one_way).await,
    }
}

/// Runs `one_way` client-to-backend and backend-to-client at once, each until its own end of
/// stream; the first error ends both.
async fn both_ways<'a, F, Fut>(
    client: &'a TcpStream,
    backend: &'a TcpStream,
    counters: &'a Counters,
    ended: &'a AtomicBool,
    one_way: F,
) -> Result<(), ForwardError>
where
    F: Fn(&'a TcpStream, &'a TcpStream, Side, &'a AtomicU64, Option<&'a AtomicBool>) -> Fut,
    Fut: Future<Output = Result<(), ForwardError>>,
{
    let up = one_way(
        client,
        backend,
        Side::Client,
        &counters.upstream,
        Some(ended),
    );
    let down = one_way(
        backend,
        client,
        Side::Backend,
        &counters.downstream,
        Some(ended),
    );
    tokio::try_join!(up, down).map(|_| ())
}

/// Writes all of `bytes`, waiting for the socket whenever its send buffer is full.
pub(crate) async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = stream
            .async_io(tokio::io::Interest::WRITABLE, || stream.try_write(bytes))
            .await?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// `shutdown(SHUT_WR)` on a tokio stream we only hold by reference.
pub(crate) fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsFd as _;
    match nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&stream.as_fd()),
        nix::sys::socket::Shutdown::Write,
    ) {
        // The peer already went away entirely; nothing is left to tell it.
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes the next `close()` of `stream` abortive: with `SO_LINGER` 0 the kernel sends RST
/// instead of FIN and drops what is still queued. A forwarding failure on one side must reach
/// the other side as a failure: a FIN there would pass a truncated stream off as complete.
pub(crate) fn reset_on_close(stream: &TcpStream) {
    // Best effort: if the option cannot be set, the socket still closes, with a FIN.
    let _ = nix::sys::socket::setsockopt(
        stream,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}
