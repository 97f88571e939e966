//! The sockmap engine: both sockets go into a `SOCKHASH` whose `sk_skb` stream-verdict program
//! redirects every skb to the peer's egress, so the payload never reaches user space.
//!
//! What user space still does, and why (see DESIGN.md, "Facts about sockmap"):
//! - Insertion order: both sockets are first *held* (a second `SOCKHASH` without programs) and
//!   registered as peers, and only then put in the verdict map, so a redirect can never target
//!   a socket that is not there yet. Redirect targets are looked up in the hold map.
//! - The preface went out before any insertion, so kernel-redirected bytes always follow it.
//! - After insertion `SO_RCVLOWAT` is set, which makes TCP offer the verdict whatever arrived
//!   before the socket was in the map.
//! - End of stream shows as `read() == 0`. The half-close is passed on only once every byte
//!   redirected to the peer has been handed to its TCP (`tcpi_bytes_acked` + `SIOCOUTQ`);
//!   earlier, the redirected tail would be thrown away.
//! - Backpressure: a psock egress queue has no bound. The verdict reports at once when a
//!   direction's backlog may have reached half the limit; if it has, the sender is taken out
//!   of the verdict map, so its data stays in its own TCP receive queue and TCP closes the
//!   window. Once every redirected byte reached the peer's TCP, `splice(2)` carries the rest
//!   of that direction. The removal must not race with a verdict run (an skb already off the
//!   receive queue would be dropped), so an `iter/tcp` program does it with the socket
//!   locked (`Kernel::detach`). The kernel can redirect a little more while we react.
//! - Why a direction does not go back into the kernel: re-inserting a detached socket and
//!   kicking it, repeated under saturating two-way load, corrupted the stream in 9 of 20
//!   one-GiB runs (a segment duplicated or lost, not at the re-insertion point); leaving once
//!   was intact in every run. Earlier pause designs (passing to the socket's own queue) had
//!   the same defect. The cause is not found; see issue 4's notes.
//! - Known defect, why `auto` does not choose this engine: with no pause at all (a limit above
//!   the transfer), under saturating two-way load over veth, about 1 transfer in 60 of
//!   256 MiB delivered one aggregated segment twice (65160 = 45 x 1448 or 64260 = 45 x 1428
//!   extra bytes, either direction). Not found yet; the pauses were not the only trigger.
//!   The bench's throughput part showed it twice in about 35 one-GiB transfers on
//!   2026-11-28; about 90 runs of the 1 GiB bulk test that day (alone, next to a splice
//!   transfer, and with the client's data arriving before insertion) showed none. The one upstream fix for
//!   duplicated egress data we know of ("bpf, sockmap: fix duplicated data transmission",
//!   commit 3b4f14b79428, 2025: a partial send followed by EAGAIN resent the prefix already
//!   sent) should be in 6.18; this comes from a literature search, not checked against this
//!   kernel's source. Its symptom is a partial prefix, while this one repeats a whole skb.
//!   Next step: trace `sk_psock_backlog` and `skb_send_sock` per skb while the bench runs.
//! - A socket that already got its FIN cannot be inserted: the client side then falls back to
//!   another engine before anything moved; the backend side is spliced from user space.
use std::{
    io,
    os::fd::{AsFd, BorrowedFd},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream, sync::Notify};

use super::{Counters, ForwardError, Side, shutdown_write, splice, write_all};
use crate::ebpf::{self, Kernel};

/// How the connection was forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Used {
    /// In the kernel (possibly with the backend-to-client direction in user space, when the
    /// backend had already closed).
    Sockmap,
    /// The sockets could not enter the map; nothing moved, use another engine.
    NotInserted,
}

/// What the engine did across all connections, for the metrics endpoint: how often a direction
/// left the kernel because its peer did not keep up, and the most the kernel then held for a
/// peer. Process-wide like the kernel's own counters, which live in maps shared by every
/// connection.
pub static DETACHES: Detaches = Detaches {
    client: AtomicU64::new(0),
    backend: AtomicU64::new(0),
    parked_max: AtomicU64::new(0),
};

/// See [`DETACHES`].
pub struct Detaches {
    client: AtomicU64,
    backend: AtomicU64,
    parked_max: AtomicU64,
}

impl Detaches {
    /// Directions taken out of the kernel, by whose data was being sent: `(client, backend)`.
    pub fn detached(&self) -> (u64, u64) {
        (
            self.client.load(Ordering::Relaxed),
            self.backend.load(Ordering::Relaxed),
        )
    }

    /// The most bytes the kernel held for a peer when a direction left it.
    pub fn parked_max(&self) -> u64 {
        self.parked_max.load(Ordering::Relaxed)
    }

    fn record(&self, side: Side, parked: u64) {
        let count = match side {
            Side::Client => &self.client,
            Side::Backend => &self.backend,
        };
        count.fetch_add(1, Ordering::Relaxed);
        self.parked_max.fetch_max(parked, Ordering::Relaxed);
    }
}

/// What the engine needs besides the sockets.
pub struct Params<'a> {
    /// The loaded programs and maps.
    pub kernel: &'a Arc<Kernel>,
    /// Per-direction cap on bytes waiting in the kernel for a slow reader.
    pub backlog_limit: u64,
    /// Bytes user space already wrote to the backend (PROXY header and hello).
    pub preface_len: u64,
    /// The connection's idle timeout: the byte counters it watches are refreshed at least
    /// four times within it.
    pub idle_timeout: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// The verdict program moves this direction.
    Kernel,
    /// Out of the verdict map, its data waiting in the source's TCP receive queue (so TCP
    /// closes the window), until every byte redirected earlier reached the peer's TCP.
    Draining,
    /// Forwarded by `splice(2)` from here on.
    User,
}

struct Direction<'s> {
    src: &'s TcpStream,
    dst: &'s TcpStream,
    side: Side,
    cookie: u64,
    mode: Mode,
    /// Bytes user space wrote to `dst` before the kernel took over (preface and hello).
    user_written: u64,
    /// Payload moved by user space, for the access log (excludes the preface).
    payload_user: u64,
    /// Payload moved by `splice(2)` once in [`Mode::User`].
    spliced: &'s AtomicU64,
    redirected: u64,
    /// What `dst`'s TCP had taken at the last check, to notice progress.
    handed: u64,
    /// The redirected count at which the verdict was last asked to wake us.
    wake_at: u64,
    /// `user_written` when `wake_at` was set.
    wake_user_written: u64,
    eof: bool,
    shut: bool,
}

impl Direction<'_> {
    fn err_src(&self, error: io::Error) -> ForwardError {
        self.side.failed(error)
    }

    fn err_dst(&self, error: io::Error) -> ForwardError {
        self.side.other().failed(error)
    }

    /// In the kernel a read sees only end of stream (and bytes that found no peer); once out
    /// of the map the data must stay queued until the splice takes over.
    fn wants_read(&self) -> bool {
        !self.eof && self.mode == Mode::Kernel
    }

    /// Reads what user space can see on `src`: end of stream, or bytes the kernel did not
    /// redirect, which go to `dst` right away.
    async fn on_readable(&mut self, buf: &mut Vec<u8>) -> Result<(), ForwardError> {
        // Allocated on first use: in the kernel a read normally sees only end of stream, and
        // an idle connection should not carry a buffer.
        if buf.is_empty() {
            buf.resize(16 * 1024, 0);
        }
        loop {
            match self.src.try_read(buf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    tracing::debug!(side = ?self.side, bytes = n, "user space forwards bytes that found no peer");
                    write_all(self.dst, &buf[..n])
                        .await
                        .map_err(|e| self.err_dst(e))?;
                    self.user_written += n as u64;
                    self.payload_user += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(self.err_src(e)),
            }
        }
    }

    /// Bytes sent towards `dst` that its TCP has not taken yet (the psock egress queue).
    fn backlog(&mut self, kernel: &Kernel) -> Result<u64, ForwardError> {
        self.redirected = kernel.redirected(self.cookie);
        let handed = ebpf::bytes_handed_to_tcp(self.dst.as_fd()).map_err(|e| self.err_dst(e))?;
        self.handed = handed;
        Ok((self.redirected + self.user_written).saturating_sub(handed))
    }
}

/// The most `drain_queued` forwards before giving the connection to another engine: a client
/// that keeps the queue full that long is better served by splice than by waiting.
const DRAIN_LIMIT: u64 = 4 << 20;

/// Forwards whatever `client` has queued to `backend` until a read comes back short, which
/// means the queue was empty under the socket lock, so every skb read was consumed whole.
/// (Reading exactly the `SIOCINQ` count is not enough: TCP merges segments arriving meanwhile
/// into the tail skb, so such a read can stop inside an skb the verdict later takes whole.)
/// Returns the bytes forwarded and whether the queue was emptied (`false` when the client
/// kept it full past [`DRAIN_LIMIT`] and another engine should take over).
async fn drain_queued(
    client: &TcpStream,
    backend: &TcpStream,
) -> Result<(u64, bool), ForwardError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match client.try_read(&mut buf) {
            Ok(0) => return Ok((total, true)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((total, true)),
            Err(error) => {
                return Err(Side::Client.failed(error));
            }
        };
        write_all(backend, &buf[..n])
            .await
            .map_err(|error| Side::Backend.failed(error))?;
        total += n as u64;
        if n < buf.len() {
            return Ok((total, true));
        }
        if total >= DRAIN_LIMIT {
            return Ok((total, false));
        }
    }
}

fn cookies(client: BorrowedFd<'_>, backend: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    Ok((ebpf::socket_cookie(client)?, ebpf::socket_cookie(backend)?))
}

/// Splices `client` and `backend` in the kernel until both directions are closed.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    counters: &Counters,
    params: Params<'_>,
) -> Result<Used, ForwardError> {
    let kernel = params.kernel;
    let Ok((ca, cb)) = cookies(client.as_fd(), backend.as_fd()) else {
        return Ok(Used::NotInserted);
    };
    // The hello was read in chunks, which can leave an skb half-read; the verdict would later
    // see that skb whole and send its head a second time. So first forward everything queued.
    let (drained, emptied) = drain_queued(client, backend).await?;
    counters.upstream.store(drained, Ordering::Relaxed);
    if !emptied {
        return Ok(Used::NotInserted);
    }
    // The verdict reports at once if a direction's backlog could reach the detach threshold,
    // counting every byte user space wrote as not yet taken by the peer; this is in place
    // before the first redirect, so a fast sender cannot run far ahead of the first check.
    let up_written = params.preface_len + drained;
    let first_wake = |written: u64| wake_room(params.backlog_limit, written);
    if kernel
        .register((ca, client.as_fd()), (cb, backend.as_fd()))
        .is_err()
        || {
            kernel.wake_at(ca, first_wake(up_written));
            kernel.wake_at(cb, first_wake(0));
            kernel.start(ca, client.as_fd()).is_err()
        }
    {
        // Nothing was redirected yet (the backend never entered the verdict map).
        kernel.unregister([ca, cb]);
        return Ok(Used::NotInserted);
    }
    let notify = kernel.watch(ca);
    let notify_b = kernel.watch(cb);
    let backend_mode = if kernel.start(cb, backend.as_fd()).is_ok() {
        Mode::Kernel
    } else {
        // The backend already closed: what it sent waits in its TCP queue for the splice.
        Mode::Draining
    };
    let (spliced_up, spliced_down) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut up = Direction {
        src: client,
        dst: backend,
        side: Side::Client,
        cookie: ca,
        mode: Mode::Kernel,
        user_written: up_written,
        payload_user: drained,
        spliced: &spliced_up,
        redirected: 0,
        handed: 0,
        wake_at: first_wake(up_written),
        wake_user_written: up_written,
        eof: false,
        shut: false,
    };
    let mut down = Direction {
        src: backend,
        dst: client,
        side: Side::Backend,
        cookie: cb,
        mode: backend_mode,
        user_written: 0,
        payload_user: 0,
        spliced: &spliced_down,
        redirected: 0,
        handed: 0,
        wake_at: first_wake(0),
        wake_user_written: 0,
        eof: false,
        shut: false,
    };
    let _ = ebpf::set_rcvlowat(client, 1);
    if backend_mode == Mode::Kernel {
        let _ = ebpf::set_rcvlowat(backend, 1);
    }
    let result = run(&mut up, &mut down, &params, counters, &notify, &notify_b).await;
    // Everything was handed to TCP before each half-close; on errors the connection is being
    // torn down anyway, so dropping queued bytes is what a reset means.
    kernel.unregister([ca, cb]);
    if result.is_err() {
        // Bytes parked in a psock are invisible to close(), which would then send a FIN and
        // make a failure look like a clean end: reset both sides instead, as splice would.
        for s in [client, backend] {
            let _ = nix::sys::socket::setsockopt(
                s,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
        }
    }
    result.map(|()| Used::Sockmap)
}

type SpliceFuture<'s> = Pin<Box<dyn Future<Output = Result<(), ForwardError>> + Send + 's>>;

/// Starts forwarding `d` with `splice(2)`; it half-closes `dst` at the end of stream.
fn splice_rest<'s>(d: &Direction<'s>) -> SpliceFuture<'s> {
    Box::pin(splice::one_way(d.src, d.dst, d.side, d.spliced, None))
}

/// How many more bytes the verdict may redirect before the backlog, now `backlog`, could
/// reach the detach threshold (half the limit) if the peer took nothing meanwhile; at least 1.
fn wake_room(limit: u64, backlog: u64) -> u64 {
    (limit / 2).saturating_sub(backlog).max(1)
}

/// Waits for a direction's splice, if it has one.
async fn finished(f: &mut Option<SpliceFuture<'_>>) -> Result<(), ForwardError> {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn run<'s>(
    up: &mut Direction<'s>,
    down: &mut Direction<'s>,
    params: &Params<'_>,
    counters: &Counters,
    notify_a: &Notify,
    notify_b: &Notify,
) -> Result<(), ForwardError> {
    let mut buf = Vec::new();
    let (client, backend) = (up.src, down.src);
    let mut splices: [Option<SpliceFuture<'s>>; 2] = [None, None];
    // Time between checks when nothing wakes us. While both directions are in the kernel and
    // open, the verdict's events are enough (a progress step, or the backlog reaching the
    // wake point), so the interval grows to a second whether or not bytes move: polling
    // every millisecond there cost a TCP_INFO, a SIOCOUTQ and a map lookup per direction
    // and was most of the engine's CPU. Something pending (a drain, a half-close waiting for
    // the peer's TCP) has no event, so it is polled from 1 ms, backing off while nothing moves.
    let (kernel, limit) = (params.kernel, params.backlog_limit);
    let mut interval = Duration::from_millis(1);
    let max_idle_interval = params.idle_timeout.map_or(Duration::from_secs(1), |idle| {
        (idle / 4).clamp(Duration::from_millis(1), Duration::from_secs(1))
    });
    const MAX_PENDING_INTERVAL: Duration = Duration::from_millis(50);
    loop {
        let [splice_up, splice_down] = &mut splices;
        tokio::select! {
            r = client.ready(Interest::READABLE), if up.wants_read() => {
                r.map_err(|e| up.err_src(e))?;
                up.on_readable(&mut buf).await?;
            }
            r = backend.ready(Interest::READABLE), if down.wants_read() => {
                r.map_err(|e| down.err_src(e))?;
                down.on_readable(&mut buf).await?;
            }
            r = finished(splice_up) => {
                r?;
                (up.eof, up.shut) = (true, true);
                *splice_up = None;
            }
            r = finished(splice_down) => {
                r?;
                (down.eof, down.shut) = (true, true);
                *splice_down = None;
            }
            () = notify_a.notified() => {}
            () = notify_b.notified() => {}
            () = tokio::time::sleep(interval) => {}
        }
        let before = (up.redirected, down.redirected, up.handed, down.handed);
        let mut pending = false;
        let [splice_up, splice_down] = &mut splices;
        for (d, splice) in [(&mut *up, splice_up), (&mut *down, splice_down)] {
            if d.mode == Mode::User {
                pending |= !d.shut;
                continue;
            }
            if d.mode == Mode::Kernel && !d.eof && d.user_written == d.wake_user_written {
                // Below the wake point the backlog cannot have reached the threshold: it was
                // at most threshold - (wake_at - redirected then) when the point was set, and
                // the peer's TCP has only taken more since. The redirected count (for the
                // byte counters) is all this check needs; TCP_INFO is the costly part.
                d.redirected = kernel.redirected(d.cookie);
                if d.redirected < d.wake_at {
                    continue;
                }
            }
            let backlog = d.backlog(kernel)?;
            if d.eof && !d.shut && backlog == 0 {
                shutdown_write(d.dst).map_err(|e| d.err_dst(e))?;
                d.shut = true;
            }
            match d.mode {
                Mode::Kernel if backlog > limit / 2 && !d.eof => {
                    // The peer is not keeping up. Taking the socket out of the verdict map
                    // leaves its data in its TCP queue, where flow control applies; the
                    // removal waits for any verdict run, so the redirected count is final.
                    kernel
                        .detach(d.cookie)
                        .map_err(|e| d.err_src(io::Error::other(format!("pausing: {e}"))))?;
                    d.mode = Mode::Draining;
                    // Now final: what the kernel holds for the peer at most, from here on.
                    let parked = d.backlog(kernel)?;
                    DETACHES.record(d.side, parked);
                    tracing::debug!(
                        side = ?d.side,
                        backlog,
                        parked,
                        "the peer is not keeping up: leaving the kernel"
                    );
                }
                Mode::Kernel if !d.eof => {
                    // Hear at once when the backlog could reach the threshold (if the peer
                    // took nothing meanwhile), instead of at the next progress step.
                    let at = d.redirected + wake_room(limit, backlog);
                    if at != d.wake_at {
                        kernel.wake_at(d.cookie, at);
                        d.wake_at = at;
                    }
                    d.wake_user_written = d.user_written;
                }
                Mode::Draining if backlog == 0 => {
                    // Every redirected byte is in the peer's TCP: the rest can follow.
                    d.mode = Mode::User;
                    *splice = Some(splice_rest(d));
                    tracing::debug!(side = ?d.side, "drained; splice carries the rest");
                }
                _ => {}
            }
            pending |= (d.eof && !d.shut) || d.mode != Mode::Kernel;
        }
        counters.upstream.store(
            up.redirected + up.payload_user + up.spliced.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        counters.downstream.store(
            down.redirected + down.payload_user + down.spliced.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if up.shut && down.shut {
            return Ok(());
        }
        let moved = before != (up.redirected, down.redirected, up.handed, down.handed);
        interval = if !pending {
            (interval * 2).min(max_idle_interval)
        } else if moved {
            Duration::from_millis(1)
        } else {
            (interval * 2).min(MAX_PENDING_INTERVAL)
        };
    }
}
