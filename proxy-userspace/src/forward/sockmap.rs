//! The sockmap engine: both sockets go into a `SOCKHASH` whose `sk_skb` stream-verdict program
//! redirects every skb to the peer's egress, so the payload never reaches user space.
//!
//! What user space still does, and why (DESIGN.md, "Facts about sockmap", has the evidence;
//! `docs/sockmap-engine.md` the history of each choice):
//! - Before insertion it forwards whatever the client already queued, until a read comes back
//!   short: the hello reader can leave an skb half-read, which the verdict would see whole.
//! - Insertion order is `ebpf::SplicedPair`'s: both sockets held and registered as peers,
//!   then the verdict map, so a redirect never targets a socket that is not there yet. The
//!   PROXY header and hello went out before, so redirected bytes always follow them. After
//!   insertion `SO_RCVLOWAT` makes TCP offer the verdict whatever arrived before.
//! - End of stream shows as `read() == 0`. The half-close is passed on only once every byte
//!   redirected to the peer has been handed to its TCP (`tcpi_bytes_acked` + `SIOCOUTQ`);
//!   earlier, the redirected tail would be thrown away.
//! - Backpressure: a psock egress queue has no bound. The verdict wakes us when a direction's
//!   redirected count reaches a point where its backlog could have reached half the limit
//!   (see [`decide`]); if it has, the sender is taken out of the verdict map under its socket
//!   lock, its data stays in its own TCP receive queue where flow control applies, and once
//!   every redirected byte reached the peer's TCP, `splice(2)` carries the rest of that
//!   direction. It does not go back into the kernel: re-inserting a detached socket has
//!   corrupted streams under load.
//! - A socket that already got its FIN cannot be inserted: the client side then falls back to
//!   another engine before anything moved; the backend side is spliced from user space.
//! - Under packet loss the kernel path has delivered an skb twice (DESIGN.md, fact 11), so
//!   `auto` does not choose this engine.
use std::{
    io,
    os::fd::AsFd,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream, sync::Notify};

use super::{Counters, ForwardError, Side, shutdown_write, splice};
use crate::{
    ebpf::{Kernel, SplicedPair},
    sys,
};

/// How the connection was forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Used {
    /// At least one direction went through the kernel path.
    Sockmap,
    /// Both directions stayed with `splice(2)`: short enough never to be handed over, or the
    /// sockets could not enter the maps.
    Splice,
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
    /// Payload bytes user space already read from the client (the hello and whatever came
    /// with it), all of them in `preface_len`.
    pub client_consumed: u64,
    /// The connection's idle timeout: the byte counters it watches are refreshed at least
    /// four times within it.
    pub idle_timeout: Option<Duration>,
    /// Bytes a direction moves with `splice(2)` before it is handed to the kernel; 0 hands it
    /// over at once.
    pub handoff: u64,
    /// What another engine did before this one took the connection over (under `auto`, the
    /// packet engine's splice phase, which ended with a refusal): nothing by default.
    pub earlier: Earlier,
}

/// Where an earlier engine left a connection: each direction's bytes it moved with
/// `splice(2)` (every one read from the source and written to the destination, nothing in a
/// pipe), and whether that direction's end of stream was already passed on. The kernel's
/// counts include those bytes, and the handoff counts them as spliced: a direction that
/// moved `handoff` bytes already goes to the kernel at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Earlier {
    /// Bytes moved client to backend, and backend to client.
    pub moved: (u64, u64),
    /// Whether client to backend, and backend to client, already ended.
    pub ended: (bool, bool),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// The verdict program moves this direction.
    Kernel,
    /// Out of the verdict map, its data waiting in the source's TCP receive queue (so TCP
    /// closes the window), until every byte redirected earlier reached the peer's TCP.
    Draining,
    /// Forwarded by `splice(2)`: before its handoff, after a hold, or for good when the kernel
    /// path is not available.
    User,
}

struct Direction<'s> {
    src: &'s TcpStream,
    dst: &'s TcpStream,
    side: Side,
    /// `src`'s cookie, once the connection entered the maps.
    cookie: u64,
    mode: Mode,
    /// Payload bytes user space read from `src` outside `splice` (the hello and whatever came
    /// with it): TCP counts them as received, the verdict never saw them.
    consumed_base: u64,
    /// Bytes user space wrote to `dst` outside `splice` (PROXY header and hello).
    written_base: u64,
    /// Payload moved by `splice(2)`, in every phase: read from `src` and written to `dst`.
    spliced: &'s AtomicU64,
    /// The splice count at which the current `splice` phase hands over to the kernel.
    handoff_at: u64,
    redirected: u64,
    /// What `dst`'s TCP had taken at the last check, to notice progress.
    handed: u64,
    /// The redirected count at which the verdict was last asked to wake us.
    wake_at: u64,
    /// `src`'s input ended (the socket reported `EPOLLRDHUP`): a FIN or a reset arrived, and
    /// the verdict may still be redirecting what came before it.
    fin: bool,
    /// The error `src` reported with the end of its input (a reset), if any.
    src_error: Option<io::ErrorKind>,
    /// A reset that arrived on `src` after its FIN: this direction ended cleanly, but nothing
    /// more can be delivered to that socket.
    reset_after_fin: Option<io::ErrorKind>,
    /// Since when the verdict has redirected less than arrived before the FIN, with no progress.
    short_since: Option<Instant>,
    /// Every byte before `src`'s FIN was redirected (or spliced): its end of stream can be
    /// passed on once they reached `dst`'s TCP.
    eof: bool,
    shut: bool,
}

/// What a full check of a direction measured.
struct Measured {
    /// Bytes sent towards `dst` that its TCP has not taken yet (the psock egress queue).
    backlog: u64,
    /// Sequence space that arrived on `src` for the kernel to forward (after what user space
    /// read): the payload, plus one for a FIN that arrived.
    arrived: u64,
    /// Payload the kernel delivered to `dst`'s TCP.
    delivered: u64,
    /// `dst`'s connection is gone (reset): what is still on its way to it never arrives.
    dst_closed: bool,
}

impl Direction<'_> {
    fn err_src(&self, error: io::Error) -> ForwardError {
        self.side.failed(error)
    }

    fn err_dst(&self, error: io::Error) -> ForwardError {
        self.side.other().failed(error)
    }

    /// While `src` is in the verdict map it is never read: a read there runs the verdict
    /// inside `recvmsg` and can lose track of the sequence (DESIGN.md, fact 12). Only its
    /// readiness is watched, for the FIN (`EPOLLRDHUP`) or an error.
    fn watches_src(&self) -> bool {
        self.mode == Mode::Kernel && !self.fin
    }

    /// `src` became ready without being read: a FIN, a reset, or (which the insertion order
    /// rules out) bytes the verdict passed to the socket, which the accounting then notices.
    /// Whether a reset came after a FIN is decided from the counts ([`fin_outcome`]).
    fn on_ready(&mut self, ready: tokio::io::Ready) -> Result<(), ForwardError> {
        if ready.is_read_closed() || ready.is_error() {
            self.fin = true;
            self.src_error = self
                .src
                .take_error()
                .map_err(|e| self.err_src(e))?
                .map(|e| e.kind());
        } else {
            // Clear the readiness without reading, or the next wait would return at once.
            let _ = self.src.try_io(Interest::READABLE, || -> io::Result<()> {
                Err(io::ErrorKind::WouldBlock.into())
            });
        }
        Ok(())
    }

    /// Reads both sockets' TCP counters and the verdict's count: the backlog towards `dst`,
    /// and what arrived and left, for the accounting.
    fn measure(&mut self, kernel: &Kernel) -> Result<Measured, ForwardError> {
        // The counts move while they are read: read them downstream first, so that each one
        // read later can only have grown past what the one before it saw (the peer's TCP
        // cannot have taken more than was redirected, nor the verdict redirected more than
        // arrived), and the accounting never blames the kernel for our own timing.
        // spliced connected the backend and accepted the client.
        let dst = sys::tcp_counts(self.dst.as_fd(), self.side == Side::Client)
            .map_err(|e| self.err_dst(e))?;
        self.redirected = kernel.redirected(self.cookie);
        let src = sys::tcp_counts(self.src.as_fd(), self.side == Side::Backend)
            .map_err(|e| self.err_src(e))?;
        // TCP counts a FIN as one byte: the one we sent on `dst` once we shut it, the one that
        // arrived on `src`.
        // (Whether a FIN is among what arrived is only known at the end; see `fin_outcome`.)
        let handed = dst.handed.saturating_sub(u64::from(self.shut));
        self.handed = handed;
        let spliced = self.spliced.load(Ordering::Relaxed);
        let written = self.written_base + spliced;
        Ok(Measured {
            backlog: (self.redirected + written).saturating_sub(handed),
            arrived: src.received.saturating_sub(self.consumed_base + spliced),
            delivered: handed.saturating_sub(written),
            dst_closed: dst.closed,
        })
    }
}

/// How long the verdict may lag behind a FIN, redirecting nothing, before the bytes it has not
/// redirected count as lost.
const SHORT_LIMIT: Duration = Duration::from_secs(1);

/// The byte accounting of a direction in the kernel: the verdict cannot have redirected more
/// than arrived (which may count a FIN as one byte: a margin of one), nor can the peer's TCP
/// have taken more than was redirected. Either would mean
/// the kernel duplicated data (DESIGN.md, fact 11), and the connection must not go on as if
/// nothing happened.
fn check_accounts(m: &Measured, redirected: u64) -> Result<(), String> {
    if redirected > m.arrived {
        return Err(format!(
            "the verdict redirected {redirected} bytes, but only {} arrived",
            m.arrived
        ));
    }
    if m.delivered > redirected {
        return Err(format!(
            "the peer's TCP took {} bytes, but only {redirected} were redirected",
            m.delivered
        ));
    }
    Ok(())
}

/// The connection's link to the kernel: the pair of sockets in the maps, made when the first
/// direction is handed over (short connections never make one).
struct Link<'k> {
    kernel: &'k Kernel,
    pair: Option<SplicedPair<'k>>,
    /// The pair could not be made: every direction stays with `splice(2)`.
    unavailable: bool,
    /// A direction went through the kernel at some point.
    used: bool,
}

impl Link<'_> {
    /// Hands direction `d` to the kernel: makes the pair if this is the first direction, puts
    /// `d.src` in the verdict map, and kicks the verdict for what is already queued. Returns
    /// `false` (with nothing changed for `d`) when the kernel cannot take it; `d` then stays
    /// with `splice(2)` until its end.
    fn enter(&mut self, d: &mut Direction<'_>, other: &mut Direction<'_>, limit: u64) -> bool {
        if self.unavailable {
            return false;
        }
        // Every byte redirected before (if any) reached `dst`'s TCP before `d` left the kernel,
        // so the backlog is zero here: the verdict may redirect half the limit before we look.
        let wake_at = d.redirected + wake_room(limit, 0);
        let started = match &self.pair {
            Some(pair) => {
                self.kernel.wake_at(d.cookie, wake_at);
                pair.start(d.cookie, d.src.as_fd()).is_ok()
            }
            None => {
                let (Ok(mine), Ok(theirs)) = (
                    sys::socket_cookie(d.src.as_fd()),
                    sys::socket_cookie(other.src.as_fd()),
                ) else {
                    self.unavailable = true;
                    return false;
                };
                (d.cookie, other.cookie) = (mine, theirs);
                let wake = [wake_at, other.redirected + wake_room(limit, 0)];
                match self.kernel.splice_pair(
                    (mine, d.src.as_fd()),
                    (theirs, other.src.as_fd()),
                    wake,
                ) {
                    Ok(pair) => {
                        self.pair = Some(pair);
                        true
                    }
                    Err(e) => {
                        tracing::debug!("the sockets cannot enter the socket maps: {e}");
                        self.unavailable = true;
                        false
                    }
                }
            }
        };
        if !started {
            return false;
        }
        // See `send_buffer_for`.
        let sndbuf = send_buffer_for(limit);
        if let Err(e) = sys::set_send_buffer(d.dst.as_fd(), sndbuf) {
            tracing::debug!("setting the send buffer to {sndbuf} bytes: {e}");
        }
        // Makes TCP offer the verdict what arrived before the socket was in the map.
        let _ = sys::set_rcvlowat(d.src, 1);
        d.mode = Mode::Kernel;
        d.wake_at = wake_at;
        self.used = true;
        true
    }
}

/// Forwards `client` and `backend` until both directions are closed: each direction with
/// `splice(2)` for its first `params.handoff` bytes, then in the kernel; back to `splice`
/// while its peer does not keep up, and into the kernel again once it has moved as much as
/// the backlog limit.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    counters: &Counters,
    params: Params<'_>,
) -> Result<Used, ForwardError> {
    // What an earlier engine spliced counts as this one's splicing: the same bytes for the
    // kernel's counts, the handoff and the byte counters.
    let Earlier { moved, ended } = params.earlier;
    let (spliced_up, spliced_down) = (AtomicU64::new(moved.0), AtomicU64::new(moved.1));
    let direction = |src, dst, side, consumed_base, written_base, spliced, ended| Direction {
        src,
        dst,
        side,
        cookie: 0,
        mode: Mode::User,
        consumed_base,
        written_base,
        spliced,
        handoff_at: params.handoff,
        redirected: 0,
        handed: 0,
        wake_at: 0,
        fin: false,
        src_error: None,
        reset_after_fin: None,
        short_since: None,
        // A direction that ended is where its splice phase leaves one at its end of stream.
        eof: ended,
        shut: ended,
    };
    let mut up = direction(
        client,
        backend,
        Side::Client,
        params.client_consumed,
        params.preface_len,
        &spliced_up,
        ended.0,
    );
    let mut down = direction(backend, client, Side::Backend, 0, 0, &spliced_down, ended.1);
    let mut link = Link {
        kernel: params.kernel,
        pair: None,
        unavailable: false,
        used: false,
    };
    let result = run(&mut up, &mut down, &params, counters, &mut link).await;
    let used = if link.used {
        Used::Sockmap
    } else {
        Used::Splice
    };
    // Everything was handed to TCP before each half-close; on errors the connection is being
    // torn down anyway, so dropping queued bytes is what a reset means.
    drop(link);
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
    result.map(|()| used)
}

type SpliceFuture<'s> =
    Pin<Box<dyn Future<Output = Result<splice::Stopped, ForwardError>> + Send + 's>>;

/// Forwards `d` with `splice(2)` until its end of stream (which it passes on) or until its
/// splice count reaches `d.handoff_at`.
fn splice_phase<'s>(d: &Direction<'s>) -> SpliceFuture<'s> {
    Box::pin(splice::one_way_until(
        d.src,
        d.dst,
        d.side,
        d.spliced,
        None,
        d.handoff_at,
    ))
}

/// The send buffer a socket in the kernel path gets: twice the backlog limit, between 1 and
/// 8 MiB (the kernel doubles it). Measured in `cargo xtask bench`: at 2 MiB the kernel-only path
/// kept 0.6x splice's throughput, at 8 MiB it passed splice. Memory is only used while a reader
/// is slower than its writer; README says what that bounds.
fn send_buffer_for(limit: u64) -> i32 {
    const MIN: u64 = 1 << 20;
    const MAX: u64 = 8 << 20;
    // The clamp keeps it far below i32::MAX.
    i32::try_from(limit.saturating_mul(2).clamp(MIN, MAX)).unwrap_or(i32::MAX)
}

/// How many more bytes the verdict may redirect before the backlog, now `backlog`, could
/// reach the detach threshold (half the limit) if the peer took nothing meanwhile; at least 1.
fn wake_room(limit: u64, backlog: u64) -> u64 {
    (limit / 2).saturating_sub(backlog).max(1)
}

/// Whether a direction in the kernel can skip its full check (`TCP_INFO` on both sockets, the
/// costly part): before its FIN and below its wake point, its backlog cannot have reached the
/// threshold. It was at most the threshold less the room left when the point was set, and the
/// peer's TCP has only taken more since.
fn below_wake_point(d: &Direction<'_>) -> bool {
    d.mode == Mode::Kernel && !d.fin && d.redirected < d.wake_at
}

/// How a direction's input ended, once `src` reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FinOutcome {
    /// A FIN, and the verdict redirected every byte before it. (A reset that came after the
    /// FIN does not undo that; it only means nothing more can be sent to that socket.)
    Complete,
    /// A reset before any FIN, with every byte before it redirected: pass the abort on.
    Aborted(io::ErrorKind),
    /// The verdict has not redirected everything that arrived yet.
    Behind,
}

/// Reads the end of a direction's input from the counts: `arrived` is the sequence space that
/// arrived after what user space read (a FIN counts one), `redirected` the verdict's count,
/// `error` what the socket reported with the end (a reset), if anything.
fn fin_outcome(arrived: u64, redirected: u64, error: Option<io::ErrorKind>) -> FinOutcome {
    match (arrived.checked_sub(redirected), error) {
        (Some(1), _) => FinOutcome::Complete,
        (Some(0), Some(kind)) => FinOutcome::Aborted(kind),
        // More than redirected is the verdict still at work; fewer (`None`) the accounting
        // check reports before this is asked. A FIN with nothing counted for it is neither.
        _ => FinOutcome::Behind,
    }
}

/// What a direction does after a check, decided from its state and what the check measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decision {
    /// Pass the end of stream on now (`shutdown(SHUT_WR)` on the destination): every byte
    /// before it reached the destination's TCP.
    shutdown: bool,
    /// What happens to the direction's mode.
    next: Next,
}

/// The mode change a check decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Nothing changes.
    Stay,
    /// The peer is not keeping up: take the source out of the verdict map.
    Detach,
    /// Stay in the kernel, and have the verdict wake us when the redirected count reaches
    /// this (where the backlog could reach the threshold if the peer took nothing).
    WakeAt(u64),
    /// Every byte redirected earlier reached the peer's TCP: `splice(2)` carries the rest.
    Splice,
}

/// The per-direction rule. `backlog` is what was sent towards the destination but not yet
/// taken by its TCP, `redirected` the verdict's count, `limit` the backlog limit; a direction
/// leaves the kernel when its backlog passes half the limit, before its end of stream.
fn decide(
    mode: Mode,
    eof: bool,
    shut: bool,
    backlog: u64,
    redirected: u64,
    limit: u64,
) -> Decision {
    let next = match mode {
        Mode::Kernel if eof => Next::Stay,
        Mode::Kernel if backlog > limit / 2 => Next::Detach,
        Mode::Kernel => Next::WakeAt(redirected + wake_room(limit, backlog)),
        Mode::Draining if backlog == 0 => Next::Splice,
        Mode::Draining | Mode::User => Next::Stay,
    };
    Decision {
        shutdown: eof && !shut && backlog == 0,
        next,
    }
}

/// The most time between checks while something is pending that no event announces (a
/// drain, a half-close waiting for the peer's TCP).
const MAX_PENDING_INTERVAL: Duration = Duration::from_millis(50);

/// Time until the next check when nothing wakes us. While both directions are in the kernel
/// and open, the verdict's events are enough, so the interval grows to `max_idle` whether or
/// not bytes move (polling every millisecond there was most of the engine's CPU). Something
/// pending is polled from 1 ms while it moves, backing off while it does not.
fn next_interval(interval: Duration, pending: bool, moved: bool, max_idle: Duration) -> Duration {
    if !pending {
        (interval * 2).min(max_idle)
    } else if moved {
        Duration::from_millis(1)
    } else {
        (interval * 2).min(MAX_PENDING_INTERVAL)
    }
}

/// Waits for a direction's splice, if it has one.
async fn finished(f: &mut Option<SpliceFuture<'_>>) -> Result<splice::Stopped, ForwardError> {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Waits for a wake-up from the verdict, once the pair exists.
async fn woken(notify: Option<&Notify>) {
    match notify {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// After a hold, a direction moves at least this much with `splice(2)` before it goes back
/// into the kernel, so a reader that keeps falling behind does not bounce between the two.
fn reentry(params: &Params<'_>) -> u64 {
    params.handoff.max(params.backlog_limit)
}

async fn run<'s>(
    up: &mut Direction<'s>,
    down: &mut Direction<'s>,
    params: &Params<'_>,
    counters: &Counters,
    link: &mut Link<'_>,
) -> Result<(), ForwardError> {
    let (client, backend) = (up.src, down.src);
    let mut splices: [Option<SpliceFuture<'s>>; 2] = [None, None];
    let (kernel, limit) = (params.kernel, params.backlog_limit);
    // Each direction starts with splice, or in the kernel at once when there is no handoff (if
    // the kernel cannot take it, e.g. because its FIN already arrived, splice to its end).
    let start = |d: &mut Direction<'s>, other: &mut Direction<'s>, link: &mut Link<'_>| {
        if d.shut {
            return None;
        }
        if params.handoff > 0 {
            return Some(splice_phase(d));
        }
        if link.enter(d, other, limit) {
            return None;
        }
        d.handoff_at = u64::MAX;
        Some(splice_phase(d))
    };
    splices[0] = start(up, down, link);
    splices[1] = start(down, up, link);
    let mut notify: Option<[Arc<Notify>; 2]> = None;
    let mut interval = Duration::from_millis(1);
    // The byte counters the idle timeout watches are refreshed at least four times within it.
    let max_idle_interval = params.idle_timeout.map_or(Duration::from_secs(1), |idle| {
        (idle / 4).clamp(Duration::from_millis(1), Duration::from_secs(1))
    });
    loop {
        if notify.is_none() {
            notify = link.pair.as_ref().map(SplicedPair::notifiers);
        }
        let (notify_a, notify_b) = match &notify {
            Some([a, b]) => (Some(&**a), Some(&**b)),
            None => (None, None),
        };
        let mut reached = [false; 2];
        let [splice_up, splice_down] = &mut splices;
        tokio::select! {
            r = client.ready(Interest::READABLE), if up.watches_src() => {
                up.on_ready(r.map_err(|e| up.err_src(e))?)?;
            }
            r = backend.ready(Interest::READABLE), if down.watches_src() => {
                down.on_ready(r.map_err(|e| down.err_src(e))?)?;
            }
            r = finished(splice_up) => {
                *splice_up = None;
                match r? {
                    splice::Stopped::Eof => (up.eof, up.shut) = (true, true),
                    splice::Stopped::Reached => reached[0] = true,
                }
            }
            r = finished(splice_down) => {
                *splice_down = None;
                match r? {
                    splice::Stopped::Eof => (down.eof, down.shut) = (true, true),
                    splice::Stopped::Reached => reached[1] = true,
                }
            }
            () = woken(notify_a) => {}
            () = woken(notify_b) => {}
            () = tokio::time::sleep(interval) => {}
        }
        // A direction whose splice phase reached its handoff goes into the kernel, or, if the
        // kernel cannot take it, splices to its end.
        if reached[0] && !link.enter(up, down, limit) {
            up.handoff_at = u64::MAX;
            splices[0] = Some(splice_phase(up));
        }
        if reached[1] && !link.enter(down, up, limit) {
            down.handoff_at = u64::MAX;
            splices[1] = Some(splice_phase(down));
        }
        let before = (up.redirected, down.redirected, up.handed, down.handed);
        let mut pending = false;
        // A direction whose destination reset after its FIN fails once it has bytes for it.
        let dst_reset = [down.reset_after_fin, up.reset_after_fin];
        let [splice_up, splice_down] = &mut splices;
        for (i, (d, splice)) in [(&mut *up, splice_up), (&mut *down, splice_down)]
            .into_iter()
            .enumerate()
        {
            if d.mode == Mode::User {
                continue;
            }
            if d.mode == Mode::Kernel {
                // The redirected count (for the byte counters) is all a direction below its
                // wake point needs.
                d.redirected = kernel.redirected(d.cookie);
                if below_wake_point(d) {
                    continue;
                }
            }
            let redirected_before = d.redirected;
            let m = d.measure(kernel)?;
            check_accounts(&m, d.redirected).map_err(ForwardError::kernel_accounting)?;
            if d.mode == Mode::Kernel && d.fin && !d.eof {
                match fin_outcome(m.arrived, d.redirected, d.src_error) {
                    FinOutcome::Complete => {
                        d.eof = true;
                        d.reset_after_fin = d.src_error;
                    }
                    FinOutcome::Aborted(kind) => return Err(d.err_src(kind.into())),
                    FinOutcome::Behind if d.redirected != redirected_before => {
                        d.short_since = None;
                    }
                    FinOutcome::Behind => {
                        let since = *d.short_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= SHORT_LIMIT {
                            // After a reset nothing runs the verdict again: what it left is
                            // lost with the reset.
                            if let Some(kind) = d.src_error {
                                return Err(d.err_src(kind.into()));
                            }
                            return Err(ForwardError::kernel_accounting(format!(
                                "{} bytes arrived up to the end of input, the verdict \
                                 redirected {} and then nothing for {SHORT_LIMIT:?}",
                                m.arrived, d.redirected
                            )));
                        }
                    }
                }
            }
            if let Some(kind) = dst_reset[i]
                && m.backlog > 0
            {
                // The destination reset after its own FIN: these bytes cannot reach it.
                return Err(d.err_dst(kind.into()));
            }
            if d.mode == Mode::Draining && m.dst_closed && m.backlog > 0 {
                // A draining direction waits for its reader to take what the kernel parked;
                // a reader that reset never will, and nothing else watches a draining
                // direction's sockets: without this, a connection whose two stalled peers both
                // reset stayed open, holding its descriptors, map entries and parked bytes.
                return Err(d.err_dst(io::ErrorKind::ConnectionReset.into()));
            }
            let backlog = m.backlog;
            let decision = decide(d.mode, d.eof, d.shut, backlog, d.redirected, limit);
            if decision.shutdown {
                shutdown_write(d.dst).map_err(|e| d.err_dst(e))?;
                d.shut = true;
            }
            match decision.next {
                Next::Stay => {}
                Next::Detach => {
                    // The removal waits for any verdict run, so the redirected count is
                    // final afterwards.
                    match kernel.detach(d.cookie) {
                        Ok(_) => {}
                        // The walk did not find `src`: it is closed (a socket leaves the TCP
                        // tables when it reaches CLOSE), after a FIN both ways or a reset, and
                        // its end may not have been reported yet. Nothing more arrives for
                        // the verdict, so there is nothing to stop: the end is handled as
                        // any FIN or reset is. (Failing here reset complete transfers: the
                        // sender had finished and closed while the reader was slow.)
                        Err(e)
                            if e.kind() == io::ErrorKind::NotConnected
                                && sys::tcp_state(d.src.as_fd())
                                    .is_ok_and(|s| s == sys::TCP_CLOSE) =>
                        {
                            if !d.fin {
                                d.fin = true;
                                d.src_error = d
                                    .src
                                    .take_error()
                                    .map_err(|e| d.err_src(e))?
                                    .map(|e| e.kind());
                            }
                            pending = true;
                            continue;
                        }
                        Err(e) => {
                            return Err(d.err_src(io::Error::other(format!("pausing: {e}"))));
                        }
                    }
                    d.mode = Mode::Draining;
                    // Now final: what the kernel holds for the peer at most, from here on.
                    let parked = d.measure(kernel)?.backlog;
                    DETACHES.record(d.side, parked);
                    tracing::debug!(
                        side = ?d.side,
                        backlog,
                        parked,
                        "the peer is not keeping up: leaving the kernel"
                    );
                }
                Next::WakeAt(at) => {
                    if at != d.wake_at {
                        kernel.wake_at(d.cookie, at);
                        d.wake_at = at;
                    }
                }
                Next::Splice => {
                    // Every redirected byte reached the peer's TCP: splice carries on, and
                    // after as much as the backlog limit the kernel gets it back.
                    d.mode = Mode::User;
                    d.handoff_at = d.spliced.load(Ordering::Relaxed) + reentry(params);
                    *splice = Some(splice_phase(d));
                    tracing::debug!(side = ?d.side, "drained; splice carries on for a while");
                }
            }
            pending |= d.mode == Mode::Draining || (d.fin && !d.shut);
        }
        counters.upstream.store(
            up.redirected + up.spliced.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        counters.downstream.store(
            down.redirected + down.spliced.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if up.shut && down.shut {
            return Ok(());
        }
        let moved = before != (up.redirected, down.redirected, up.handed, down.handed);
        interval = next_interval(interval, pending, moved, max_idle_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 4 << 20;

    fn next(mode: Mode, eof: bool, backlog: u64, redirected: u64) -> Next {
        decide(mode, eof, false, backlog, redirected, LIMIT).next
    }

    #[test]
    fn a_kernel_direction_leaves_only_past_half_the_limit_and_before_its_end() {
        assert_eq!(next(Mode::Kernel, false, LIMIT / 2 + 1, 0), Next::Detach);
        assert_eq!(
            next(Mode::Kernel, false, LIMIT / 2, 10),
            Next::WakeAt(11),
            "at the threshold it stays, woken after one more byte"
        );
        assert_eq!(
            next(Mode::Kernel, true, LIMIT, 0),
            Next::Stay,
            "ended: no detach"
        );
    }

    #[test]
    fn the_wake_point_is_where_the_backlog_could_reach_the_threshold() {
        assert_eq!(
            next(Mode::Kernel, false, 0, 100),
            Next::WakeAt(100 + LIMIT / 2)
        );
        assert_eq!(
            next(Mode::Kernel, false, LIMIT / 4, 100),
            Next::WakeAt(100 + LIMIT / 4)
        );
        assert_eq!(
            wake_room(LIMIT, LIMIT),
            1,
            "never zero: the verdict must move on"
        );
    }

    #[test]
    fn a_draining_direction_splices_once_its_backlog_is_gone() {
        assert_eq!(next(Mode::Draining, false, 1, 0), Next::Stay);
        assert_eq!(next(Mode::Draining, false, 0, 0), Next::Splice);
        assert_eq!(next(Mode::User, false, 0, 0), Next::Stay);
    }

    #[test]
    fn end_of_stream_passes_on_only_when_everything_reached_the_peer() {
        let shutdown =
            |eof, shut, backlog| decide(Mode::Kernel, eof, shut, backlog, 0, LIMIT).shutdown;
        assert!(shutdown(true, false, 0));
        assert!(
            !shutdown(true, false, 1),
            "the redirected tail would be thrown away"
        );
        assert!(!shutdown(true, true, 0), "once");
        assert!(!shutdown(false, false, 0), "not before the end");
        assert!(decide(Mode::Draining, true, false, 0, 0, LIMIT).shutdown);
    }

    #[test]
    fn the_kernel_may_not_move_more_than_arrived() {
        let m = |arrived, delivered| Measured {
            backlog: 0,
            arrived,
            delivered,
            dst_closed: false,
        };
        assert!(
            check_accounts(&m(100, 90), 95).is_ok(),
            "5 bytes still queued"
        );
        assert!(check_accounts(&m(100, 100), 100).is_ok());
        let duplicated = check_accounts(&m(100, 100), 100 + 65_160);
        assert!(duplicated.is_err_and(|e| e.contains("redirected 65260 bytes, but only 100")));
        let resent = check_accounts(&m(100, 101), 100);
        assert!(resent.is_err_and(|e| e.contains("took 101 bytes")));
    }

    #[test]
    fn the_end_of_input_is_read_from_the_counts() {
        let reset = Some(io::ErrorKind::ConnectionReset);
        assert_eq!(
            fin_outcome(101, 100, None),
            FinOutcome::Complete,
            "100 bytes and a FIN"
        );
        assert_eq!(
            fin_outcome(101, 100, reset),
            FinOutcome::Complete,
            "a reset after the FIN"
        );
        assert_eq!(
            fin_outcome(100, 100, reset),
            FinOutcome::Aborted(io::ErrorKind::ConnectionReset),
            "a reset with no FIN before it"
        );
        assert_eq!(fin_outcome(150, 100, None), FinOutcome::Behind);
        assert_eq!(
            fin_outcome(100, 100, None),
            FinOutcome::Behind,
            "no FIN counted yet"
        );
    }

    #[test]
    fn the_send_buffer_follows_the_limit_within_bounds() {
        assert_eq!(send_buffer_for(4 << 20), 8 << 20);
        assert_eq!(send_buffer_for(1 << 20), 2 << 20);
        assert_eq!(send_buffer_for(64 << 10), 1 << 20);
        assert_eq!(send_buffer_for(4 << 30), 8 << 20);
    }

    #[test]
    fn the_poll_interval_backs_off_unless_something_pending_moves() {
        let ms = Duration::from_millis;
        let max = Duration::from_secs(1);
        assert_eq!(
            next_interval(ms(1), false, true, max),
            ms(2),
            "events cover moving bytes"
        );
        assert_eq!(next_interval(ms(800), false, false, max), max);
        assert_eq!(next_interval(ms(40), true, true, max), ms(1));
        assert_eq!(
            next_interval(ms(40), true, false, max),
            MAX_PENDING_INTERVAL
        );
    }
}
