//! The handoff driver (`docs/packet-engine.md`, section 3.4, steps 2 to 8): from a frozen
//! connection to two `ACTIVE` entries and two silent local sockets, on a blocking thread.
use std::{
    io,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use nix::libc;
use proxy_common::{FLOW_ACTIVE, FLOW_DRAIN, FLOW_RESET, Flow, FlowKey, WindowClamp};

use super::{
    Handoff, IsnRecorder, PacketTables, SocketClock, Wscale, backend_key, client_key, stream_seq,
};

/// The least [`allowance`], however little the far peer's window leaves (design 3.6 item 12):
/// a peer the clamp holds at a zero window with nothing in flight resumes only when the far
/// peer's ACK of the local socket's last byte comes through, which may be a delayed ACK.
pub const WINDOW_CLAMP_MIN: u32 = 64 << 10;

/// The windows of a connection being offered, clamped ([`PacketTables::screen`]).
#[derive(Debug)]
pub struct Clamped {
    /// The clamps, L's then L''s: remove them ([`PacketTables::unclamp_windows`]) once the
    /// handoff is over, whatever its outcome.
    pub keys: [FlowKey; 2],
    /// The client's ISN (L's peer's) and the backend's (L''s peer's), from which
    /// [`PacketTables::anchor`] finds where each stream stands.
    peer_isns: [u32; 2],
    /// The right edges [`PacketTables::anchor`] held the windows at, L's then L''s; `None`
    /// for a window it did not anchor.
    anchored: [Option<u32>; 2],
}

/// Half of what the far peer can still take from `sender` (the local socket that delivers to
/// it): the window it last announced less what `sender` has in flight or queued. The
/// translation puts the other peer's next bytes behind all of that, so more than this would
/// land past the far peer's window and be dropped there; and a peer may have as much again
/// in flight when it learns the clamp. At least [`WINDOW_CLAMP_MIN`].
fn allowance(info: &libc::tcp_info, sender: BorrowedFd) -> io::Result<u32> {
    let queued = ioctl_int(sender, libc::TIOCOUTQ)?.max(0) as u32;
    Ok((info.tcpi_snd_wnd.saturating_sub(queued) / 2).max(WINDOW_CLAMP_MIN))
}

/// A connection ready to be handed off: spliced stopped forwarding both ways with nothing
/// buffered in between.
pub struct Freeze<'a> {
    /// L, accepted, IPv4 (or IPv4-mapped).
    pub client: BorrowedFd<'a>,
    /// L', connected, IPv6.
    pub backend: BorrowedFd<'a>,
    /// Bytes spliced read from L (the hello included).
    pub read_from_client: u64,
    /// Bytes spliced wrote to L' (the PROXY header and the hello included).
    pub written_to_backend: u64,
    /// Bytes spliced read from L'.
    pub read_from_backend: u64,
    /// Bytes spliced wrote to L.
    pub written_to_client: u64,
    /// `CLOCK_BOOTTIME` at accept, nanoseconds.
    pub started_ns: u64,
}

/// Bounds of one handoff.
pub struct HandoffLimits {
    /// How long the drain (rule F and quiescence) may take before the connection is given up.
    pub drain_timeout: Duration,
}

/// Why a handoff did not happen.
#[derive(Debug)]
pub enum HandoffError {
    /// Nothing was installed; the caller goes on with splice. A reason of design section 9.
    /// The ISNs stay recorded, so a later attempt may succeed.
    Refused(&'static str),
    /// Entries had been installed; the connection is lost (`drain_timeout`, a peer's RST
    /// during the drain, a socket error). The entries are removed, and both sockets are in
    /// repair mode: closing them sends nothing. The message starts with the reason.
    Failed(anyhow::Error),
}

impl std::fmt::Display for HandoffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoffError::Refused(reason) => write!(f, "handoff refused: {reason}"),
            HandoffError::Failed(e) => write!(f, "handoff failed: {e:#}"),
        }
    }
}

impl std::error::Error for HandoffError {}

/// A connection the kernel now carries.
pub struct HandedOff {
    /// What the entries were built from (the byte counts include what rule F moved).
    pub handoff: Handoff,
    /// The key of the client's entry (`E_up`).
    pub up: FlowKey,
    /// The key of the backend's entry (`E_down`).
    pub down: FlowKey,
    /// From the call to `ACTIVE`.
    pub duration: Duration,
    /// Bytes moved by rule F during the drain (client to backend, backend to client).
    pub drained: (u64, u64),
}

/// `TCP_REPAIR` (not in the libc crate for every target).
const TCP_REPAIR: libc::c_int = 19;
/// `TCP_REPAIR_WINDOW`: the window state of a socket in repair mode.
const TCP_REPAIR_WINDOW: libc::c_int = 29;
/// `TCP_REPAIR_OFF_NO_WP`: leaves repair mode without sending a window probe.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
/// `TCP_TIMESTAMP`: the socket's timestamp clock now; the low bit says microseconds.
const TCP_TIMESTAMP: libc::c_int = 24;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_ECN: u8 = 8;
/// `TCPI_OPT_USEC_TS`: the connection's timestamps tick in microseconds (not translated).
const TCPI_OPT_USEC_TS: u8 = 64;
const TCP_ESTABLISHED: u8 = 1;
/// `MEMBARRIER_CMD_GLOBAL`.
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
/// How often the drain looks at the queues and the entries.
const DRAIN_TICK: Duration = Duration::from_millis(2);

impl PacketTables {
    /// Hands a frozen connection to the kernel (design 3.4, steps 2 to 8). Blocks for up to
    /// `limits.drain_timeout` (plus one RCU grace period). Runs in the network namespace of
    /// the sockets (the route lookups are made in the calling thread's). Takes `&self`:
    /// several handoffs (one per blocking thread) and the sweeper may share the tables.
    ///
    /// After `Ok` both sockets are in repair mode for good: the caller keeps
    /// `freeze.backend` open (it owns the ephemeral port the translated connection uses)
    /// and closes `freeze.client` (silently). After [`HandoffError::Refused`] nothing
    /// changed and the caller goes on splicing.
    pub fn handoff(
        &self,
        isn: &IsnRecorder,
        freeze: &Freeze,
        limits: &HandoffLimits,
    ) -> Result<HandedOff, HandoffError> {
        let started = Instant::now();
        let handoff = Handoff {
            // Counts modulo 2^32, as sequence numbers.
            read_from_client: freeze.read_from_client as u32,
            written_to_backend: freeze.written_to_backend as u32,
            read_from_backend: freeze.read_from_backend as u32,
            written_to_client: freeze.written_to_client as u32,
            started_ns: freeze.started_ns,
            ..self.facts(isn, freeze.client, freeze.backend)?
        };
        let [(up, _), (down, _)] = handoff.entries(FLOW_DRAIN);
        if let Err(e) = self.insert(&handoff, FLOW_DRAIN) {
            let full = e.chain().any(|c| {
                c.downcast_ref::<aya::maps::MapError>().is_some_and(|m| {
                    matches!(m, aya::maps::MapError::SyscallError(s)
                        if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)))
                })
            });
            if full {
                return Err(HandoffError::Refused("table_full"));
            }
            tracing::warn!("inserting packet engine entries: {e:#}");
            return Err(HandoffError::Refused("insert_failed"));
        }
        tracing::debug!(
            read_from_backend = handoff.read_from_backend,
            written_to_client = handoff.written_to_client,
            read_from_client = handoff.read_from_client,
            queues = %Queues(freeze),
            "packet handoff: entries in, draining"
        );
        let mut drain = Drain::new(freeze, &handoff);
        let deadline = started + limits.drain_timeout;
        match drain.run(self, &handoff, (&up, &down), deadline) {
            Ok(()) => {}
            Err(e) => {
                // Translated segments may already have left: splice cannot resume. Both
                // sockets go silent, the entries go; the peers get RSTs from the stack on
                // their next segment (design 3.4, "what is not possible").
                let _ = repair(freeze.client);
                let _ = repair(freeze.backend);
                if let Err(r) = self.remove_keys(&[up, down]) {
                    tracing::warn!("removing the entries of a failed handoff: {r:#}");
                }
                forget(isn, &handoff);
                return Err(HandoffError::Failed(e));
            }
        }
        forget(isn, &handoff);
        tracing::debug!(
            drained_up = drain.up,
            drained_down = drain.down,
            queues = %Queues(freeze),
            "packet handoff: drained, entries active"
        );
        let handoff = Handoff {
            read_from_client: handoff.read_from_client.wrapping_add(drain.up as u32),
            written_to_backend: handoff.written_to_backend.wrapping_add(drain.up as u32),
            read_from_backend: handoff.read_from_backend.wrapping_add(drain.down as u32),
            written_to_client: handoff.written_to_client.wrapping_add(drain.down as u32),
            ..handoff
        };
        Ok(HandedOff {
            handoff,
            up,
            down,
            duration: started.elapsed(),
            drained: (drain.up, drain.down),
        })
    }

    /// Before a connection is frozen: the checks of design section 9 that the sockets alone
    /// decide (every one [`PacketTables::handoff`] makes again at the freeze), so that a
    /// connection the engine cannot take is neither frozen nor clamped; `Err` says why.
    ///
    /// Then design 3.6 item 12: from now until the drain ends, the window each local socket
    /// announces reaches at most half of what the far peer can still take ([`allowance`])
    /// past its ACK, so that what a peer has in flight when the translation starts lands
    /// within the far peer's window; [`PacketTables::anchor`] then holds the edges still.
    /// `Ok(None)` when nothing could be clamped (a full clamp map, or a failed map call,
    /// logged): the handoff goes on without.
    pub fn screen(
        &self,
        isn: &IsnRecorder,
        client: BorrowedFd,
        backend: BorrowedFd,
    ) -> Result<Option<Clamped>, HandoffError> {
        let facts = self.facts(isn, client, backend)?;
        let clamps = (|| -> io::Result<[WindowClamp; 2]> {
            let info_l: libc::tcp_info =
                getsockopt(client.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)?;
            let info_l2: libc::tcp_info =
                getsockopt(backend.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)?;
            Ok([
                // L's window, for what the client sends: bounded by what the backend can take.
                WindowClamp {
                    limit: allowance(&info_l2, backend)?,
                    wscale: wscale(&info_l).rcv,
                    ..WindowClamp::default()
                },
                WindowClamp {
                    limit: allowance(&info_l, client)?,
                    wscale: wscale(&info_l2).rcv,
                    ..WindowClamp::default()
                },
            ])
        })();
        let clamps = match clamps {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("packet engine: reading the windows to clamp: {e}");
                return Ok(None);
            }
        };
        let keys = [
            client_key(facts.client, facts.front),
            backend_key(facts.backend, facts.back),
        ];
        let made = match self.clamp_windows(&[(keys[0], clamps[0]), (keys[1], clamps[1])]) {
            Ok(made) => made,
            Err(e) => {
                tracing::debug!("packet engine: clamping the windows: {e:#}");
                return Ok(None);
            }
        };
        if made.len() < 2 {
            if let Err(e) = self.unclamp_windows(&made) {
                tracing::warn!("packet engine: {e:#}");
            }
            return Ok(None);
        }
        Ok(Some(Clamped {
            keys,
            peer_isns: [facts.client_isns.peer_isn, facts.backend_isns.peer_isn],
            anchored: [None; 2],
        }))
    }

    /// At the freeze (both directions stopped after `read` bytes from the client and from the
    /// backend): each clamped window stops moving with its socket's ACKs, its right edge held
    /// at what the far peer can still take past the freeze point ([`allowance`], now). What a
    /// peer puts into its local socket from here until the entries exist, read or not, and
    /// what the translation then carries before the far peer's own ACKs come through, stays
    /// within that.
    pub fn anchor(
        &self,
        clamped: &mut Clamped,
        client: BorrowedFd,
        backend: BorrowedFd,
        read: (u64, u64),
    ) -> io::Result<()> {
        let (l, l2) = (client.as_raw_fd(), backend.as_raw_fd());
        let info_l: libc::tcp_info = getsockopt(l, libc::IPPROTO_TCP, libc::TCP_INFO)?;
        let info_l2: libc::tcp_info = getsockopt(l2, libc::IPPROTO_TCP, libc::TCP_INFO)?;
        // Counts modulo 2^32, as sequence numbers.
        let next = |isn: u32, read: u64| stream_seq(isn, read as u32);
        let allowances = [allowance(&info_l2, backend)?, allowance(&info_l, client)?];
        tracing::debug!(
            ?allowances,
            "packet handoff: windows anchored (client's, backend's)"
        );
        let edges = [
            next(clamped.peer_isns[0], read.0).wrapping_add(allowances[0]),
            next(clamped.peer_isns[1], read.1).wrapping_add(allowances[1]),
        ];
        for ((key, edge), anchored) in clamped.keys.iter().zip(edges).zip(&mut clamped.anchored) {
            self.anchor_window(key, edge).map_err(io::Error::other)?;
            // Held at `edge` from now, whatever comes of the rest.
            *anchored = Some(edge);
        }
        Ok(())
    }

    /// After a refusal: the clamps go ([`PacketTables::unclamp_windows`]), and a peer the
    /// anchored window stopped at its edge with everything acknowledged hears of the open
    /// window only when its local socket sends a window update, so each socket is then told
    /// the edge its peer saw ([`believe_the_edge`]). Nothing more to do for a window never
    /// anchored: a relative clamp gives every ACK room past it.
    ///
    /// In that order: an ACK the socket sends while its clamp is still there carries the
    /// anchored edge to the peer but sets the socket's belief back to its own wider window.
    /// Told the edge first, a socket that acknowledged data arriving before the clamp went
    /// (the peer still short of its edge) sent no update once the peer stopped there, and the
    /// peer waited for its zero-window probe: 5 runs in 20 of
    /// `downloads_refused_after_the_anchor_do_not_wait_for_a_window_probe` saw one (of 16
    /// downloads), and in the runs traced the stalled one was the download whose `rcv_wup`
    /// had moved on between the two steps. The other way round, an ACK sent
    /// between them carries the socket's own window and the belief set after it is narrower
    /// than what the peer heard: at worst a segment the peer sends past the believed edge is
    /// dropped and sent again, where the first order cost a 200 ms stall.
    pub fn unanchor(
        &self,
        clamped: &Clamped,
        client: BorrowedFd,
        backend: BorrowedFd,
    ) -> anyhow::Result<()> {
        self.unclamp_windows(&clamped.keys)?;
        let mut result = Ok(());
        for (fd, edge) in [client, backend].into_iter().zip(clamped.anchored) {
            if let Some(edge) = edge {
                result = result.and(believe_the_edge(fd, edge));
            }
        }
        result.context("setting the edge a refused connection's peer saw")
    }

    /// Design 3.4 step 2: what the entries are built from, and the checks of section 9. The
    /// byte counts and `started_ns` are left at 0 for the caller.
    fn facts(
        &self,
        isn: &IsnRecorder,
        client: BorrowedFd,
        backend: BorrowedFd,
    ) -> Result<Handoff, HandoffError> {
        let internal = |what: &str, e: io::Error| {
            tracing::warn!("handoff: {what}: {e}");
            HandoffError::Refused("socket_error")
        };
        let l = client.as_raw_fd();
        let l2 = backend.as_raw_fd();
        let (client, front) = match (peer_addr(l), local_addr(l)) {
            (Ok(c), Ok(f)) => match (v4(c), v4(f)) {
                (Some(c), Some(f)) => (c, f),
                _ => return Err(HandoffError::Refused("client_not_ipv4")),
            },
            (Err(e), _) | (_, Err(e)) => return Err(internal("L's addresses", e)),
        };
        let (back, backend) = match (local_addr(l2), peer_addr(l2)) {
            (Ok(SocketAddr::V6(b)), Ok(SocketAddr::V6(y))) if y.ip().to_ipv4_mapped().is_none() => {
                (b, y)
            }
            (Ok(_), Ok(_)) => return Err(HandoffError::Refused("backend_not_ipv6")),
            (Err(e), _) | (_, Err(e)) => return Err(internal("L''s addresses", e)),
        };
        let info_l: libc::tcp_info = getsockopt(l, libc::IPPROTO_TCP, libc::TCP_INFO)
            .map_err(|e| internal("TCP_INFO", e))?;
        let info_l2: libc::tcp_info = getsockopt(l2, libc::IPPROTO_TCP, libc::TCP_INFO)
            .map_err(|e| internal("TCP_INFO", e))?;
        if info_l.tcpi_state != TCP_ESTABLISHED || info_l2.tcpi_state != TCP_ESTABLISHED {
            return Err(HandoffError::Refused("half_closed"));
        }
        if (info_l.tcpi_options | info_l2.tcpi_options) & TCPI_OPT_USEC_TS != 0 {
            return Err(HandoffError::Refused("usec_timestamps"));
        }
        let sizes = SegmentSizes::of(&info_l, &info_l2);
        if sizes.backend_too_small() {
            tracing::debug!(
                ?sizes,
                "handoff: the backend takes smaller segments than the client sends"
            );
            return Err(HandoffError::Refused("mss_backend_small"));
        }
        if info_l2.tcpi_options & TCPI_OPT_ECN != 0 && crate::packet::host::accecn_outgoing() {
            // This kernel's `tcp_info` says ECN, not which kind (`tcpi_ecn_mode` came later):
            // with AccECN asked for on outgoing connections, L''s ECN may be AccECN.
            return Err(HandoffError::Refused("accecn"));
        }
        let client_cookie: u64 = getsockopt(l, libc::SOL_SOCKET, libc::SO_COOKIE)
            .map_err(|e| internal("SO_COOKIE", e))?;
        let backend_cookie: u64 = getsockopt(l2, libc::SOL_SOCKET, libc::SO_COOKIE)
            .map_err(|e| internal("SO_COOKIE", e))?;
        let isns = |cookie| match isn.get(cookie) {
            Ok(Some(pair)) => Ok(pair),
            Ok(None) => Err(HandoffError::Refused("no_isn")),
            Err(e) => {
                tracing::warn!("handoff: reading the ISN map: {e:#}");
                Err(HandoffError::Refused("no_isn"))
            }
        };
        let client_isns = isns(client_cookie)?;
        let backend_isns = isns(backend_cookie)?;
        let client_ifindex = out_interface(IpAddr::V4(*client.ip()))?;
        let backend_ifindex = out_interface(IpAddr::V6(*backend.ip()))?;
        for index in [client_ifindex, backend_ifindex] {
            if !self.interfaces().contains(&index) {
                return Err(HandoffError::Refused("no_program_on_interface"));
            }
        }
        let client_timestamps = info_l.tcpi_options & TCPI_OPT_TIMESTAMPS != 0;
        let backend_timestamps = info_l2.tcpi_options & TCPI_OPT_TIMESTAMPS != 0;
        let clock = |fd, on: bool| {
            if on {
                socket_clock(fd).map_err(|e| internal("TCP_TIMESTAMP", e))
            } else {
                Ok(SocketClock::default())
            }
        };
        let handoff = Handoff {
            client,
            front,
            back,
            backend,
            client_isns,
            backend_isns,
            read_from_client: 0,
            written_to_backend: 0,
            read_from_backend: 0,
            written_to_client: 0,
            client_wscale: wscale(&info_l),
            backend_wscale: wscale(&info_l2),
            client_ifindex,
            backend_ifindex,
            // Stable per connection (ECMP keeps it on one path), and different between
            // connections.
            flow_label: (client_cookie as u32 ^ u32::from(back.port()) << 4) & 0x000f_ffff,
            client_ecn: info_l.tcpi_options & TCPI_OPT_ECN != 0,
            backend_ecn: info_l2.tcpi_options & TCPI_OPT_ECN != 0,
            client_timestamps,
            backend_timestamps,
            client_sack: info_l.tcpi_options & TCPI_OPT_SACK != 0,
            backend_sack: info_l2.tcpi_options & TCPI_OPT_SACK != 0,
            client_clock: clock(l, client_timestamps)?,
            backend_clock: clock(l2, backend_timestamps)?,
            client_cookie,
            backend_cookie,
            started_ns: 0,
        };
        if let Some(reason) = handoff.unsupported() {
            return Err(HandoffError::Refused(reason));
        }
        Ok(handoff)
    }
}

/// What both local sockets hold, for the handoff's debug lines: the client's address, then
/// bytes received and not read, and bytes not yet acknowledged, of L and of L'.
struct Queues<'a, 'b>(&'a Freeze<'b>);

impl std::fmt::Display for Queues<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queue = |fd, request| ioctl_int(fd, request).unwrap_or(-1);
        let client = peer_addr(self.0.client.as_raw_fd()).map_or("?".into(), |a| a.to_string());
        write!(
            f,
            "client {client}; L: inq {} outq {}; L': inq {} outq {}",
            queue(self.0.client, libc::FIONREAD),
            queue(self.0.client, libc::TIOCOUTQ),
            queue(self.0.backend, libc::FIONREAD),
            queue(self.0.backend, libc::TIOCOUTQ),
        )
    }
}

/// The ISNs are read once; the recorder's LRU need not keep them.
fn forget(isn: &IsnRecorder, handoff: &Handoff) {
    for cookie in [handoff.client_cookie, handoff.backend_cookie] {
        if let Err(e) = isn.forget(cookie) {
            tracing::warn!("forgetting ISNs: {e:#}");
        }
    }
}

/// Rule F and quiescence (design 3.4 steps 4 to 8) for one connection.
struct Drain<'a> {
    l: BorrowedFd<'a>,
    l2: BorrowedFd<'a>,
    /// Bytes read from one socket not yet written to the other (client to backend, backend
    /// to client).
    pending: [Vec<u8>; 2],
    /// A FIN was read from the client (backend), not yet passed on.
    fin_read: [bool; 2],
    /// The FIN was passed on with `shutdown`.
    fin_sent: [bool; 2],
    /// Bytes rule F moved, client to backend.
    up: u64,
    /// Bytes rule F moved, backend to client.
    down: u64,
    /// L's next sequence number to write (`Ip + 1 + written_to_client`), and L''s.
    write_seq: [u32; 2],
    /// The client's (backend's) next sequence number, where a FIN read by rule F sits.
    read_seq: [u32; 2],
    /// The `ack_floor` rule F last gave the entry of the peer that acknowledges L (L').
    floor: [Option<u32>; 2],
}

impl<'a> Drain<'a> {
    fn new(freeze: &Freeze<'a>, h: &Handoff) -> Self {
        Drain {
            l: freeze.client,
            l2: freeze.backend,
            pending: [Vec::new(), Vec::new()],
            fin_read: [false; 2],
            fin_sent: [false; 2],
            up: 0,
            down: 0,
            write_seq: [
                stream_seq(h.client_isns.local_isn, h.written_to_client),
                stream_seq(h.backend_isns.local_isn, h.written_to_backend),
            ],
            read_seq: [
                stream_seq(h.client_isns.peer_isn, h.read_from_client),
                stream_seq(h.backend_isns.peer_isn, h.read_from_backend),
            ],
            floor: [None; 2],
        }
    }

    fn run(
        &mut self,
        tables: &PacketTables,
        h: &Handoff,
        (up, down): (&FlowKey, &FlowKey),
        deadline: Instant,
    ) -> anyhow::Result<()> {
        let _ = h;
        loop {
            self.forward(tables, (up, down))?;
            if self.quiet(tables, (up, down))? {
                // Step 6: every segment that passed TC before now has reached TCP; taking
                // the socket locks (TCP_INFO) processes their backlogs. Then look again.
                membarrier()?;
                for fd in [self.l, self.l2] {
                    let _: libc::tcp_info =
                        getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)?;
                }
                self.forward(tables, (up, down))?;
                if self.quiet(tables, (up, down))? {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "drain_timeout: the local sockets did not drain in time ({})",
                    self.describe(tables, (up, down))
                ));
            }
            std::thread::sleep(DRAIN_TICK);
        }
        // Step 7 then step 8: nothing reaches the local sockets any more, and they never send
        // again (repair mode is never turned off: that sends a window probe).
        let changed = tables.set_state(&[*up, *down], FLOW_ACTIVE)?;
        if changed != 2 {
            tracing::debug!(
                up = ?tables.get(up).ok().flatten().map(|f| f.state),
                down = ?tables.get(down).ok().flatten().map(|f| f.state),
                "handoff: {changed} of 2 entries made ACTIVE (RST seen)"
            );
        }
        repair(self.l).context("TCP_REPAIR on L")?;
        repair(self.l2).context("TCP_REPAIR on L'")?;
        Ok(())
    }

    /// Rule F: whatever the local sockets received goes to the other one; a FIN read goes on
    /// as `shutdown(SHUT_WR)` once the bytes before it are written, announced to the egress
    /// guard and recorded in the sender's entry first.
    fn forward(
        &mut self,
        tables: &PacketTables,
        (up, down): (&FlowKey, &FlowKey),
    ) -> anyhow::Result<()> {
        let fds = [self.l, self.l2];
        // Entry of the sender, and of the socket the FIN leaves by (its egress guard).
        let sender = [*up, *down];
        let out_entry = [*down, *up];
        // Entry of the peer that acknowledges what the written socket sends: X acks L (E_up),
        // Y acks L' (E_down).
        let out_sender = [*down, *up];
        let mut buf = [0u8; 64 << 10];
        for dir in 0..2 {
            let (from, to) = (fds[dir], fds[1 - dir]);
            while !self.fin_read[dir] {
                match recv(from, &mut buf) {
                    Ok(0) => {
                        self.fin_read[dir] = true;
                        tables.set_fin(&sender[dir], self.read_seq[dir])?;
                    }
                    Ok(n) => {
                        self.pending[dir].extend_from_slice(&buf[..n]);
                        self.read_seq[dir] = self.read_seq[dir].wrapping_add(n as u32);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("rule F: reading a local socket"),
                }
            }
            if !self.pending[dir].is_empty() {
                // Before the bytes reach the socket: its peer may acknowledge them before
                // `send` returns, and an ACK at or past the floor is translated, not passed
                // (design 3.2). Raised afterwards, the floor let the peer's ACKs for rule F's
                // bytes bypass the socket: it kept them unacknowledged, its send buffer stayed
                // full, and what was still pending never went (a drain stalled for good in
                // `downloads_handed_off_in_their_middle_do_not_stall`). The floor covers the
                // pending bytes too: all of them were read from the other local socket, which
                // acknowledged them to the far peer, so a translated ACK raised to it tells
                // that peer nothing it did not know.
                let end = self.write_seq[1 - dir].wrapping_add(self.pending[dir].len() as u32);
                if self.floor[dir] != Some(end) {
                    tables.raise_ack_floor(&out_sender[dir], end)?;
                    self.floor[dir] = Some(end);
                }
            }
            while !self.pending[dir].is_empty() {
                match send(to, &self.pending[dir]) {
                    Ok(n) => {
                        self.pending[dir].drain(..n);
                        if dir == 0 {
                            self.up += n as u64;
                        } else {
                            self.down += n as u64;
                        }
                        self.write_seq[1 - dir] = self.write_seq[1 - dir].wrapping_add(n as u32);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("rule F: writing a local socket"),
                }
            }
            if self.fin_read[dir] && !self.fin_sent[dir] && self.pending[dir].is_empty() {
                tables.set_local_fin(&out_entry[dir])?;
                // SAFETY: a plain syscall on a descriptor the caller keeps open.
                if unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) } != 0 {
                    return Err(io::Error::last_os_error()).context("rule F: shutdown");
                }
                self.fin_sent[dir] = true;
                // The FIN takes one sequence number.
                self.write_seq[1 - dir] = self.write_seq[1 - dir].wrapping_add(1);
            }
        }
        Ok(())
    }

    /// Where the drain stands, for the error of a drain that timed out.
    fn describe(&self, tables: &PacketTables, (up, down): (&FlowKey, &FlowKey)) -> String {
        let queue = |fd, request| ioctl_int(fd, request).unwrap_or(-1);
        let acked = |key| tables.get(key).ok().flatten().map(|f| f.peer_acked);
        format!(
            "pending {:?} bytes; L: inq {} outq {} write_seq {} acked {:?}; L': inq {} outq {} \
             write_seq {} acked {:?}; FINs read {:?} sent {:?}",
            [self.pending[0].len(), self.pending[1].len()],
            queue(self.l, libc::FIONREAD),
            queue(self.l, libc::TIOCOUTQ),
            self.write_seq[0],
            acked(up),
            queue(self.l2, libc::FIONREAD),
            queue(self.l2, libc::TIOCOUTQ),
            self.write_seq[1],
            acked(down),
            self.fin_read,
            self.fin_sent,
        )
    }

    /// Step 5: nothing left to read, nothing pending, and each socket's sent bytes (and FIN)
    /// acknowledged, as the socket saw it or as the program saw the peer's ACKs.
    fn quiet(
        &self,
        tables: &PacketTables,
        (up, down): (&FlowKey, &FlowKey),
    ) -> anyhow::Result<bool> {
        let mut flows = [Flow::default(); 2];
        for (flow, key) in flows.iter_mut().zip([up, down]) {
            let Some(found) = tables.get(key)? else {
                anyhow::bail!("an entry vanished during the drain");
            };
            if found.state == FLOW_RESET {
                // A peer reset the connection and the program translated the RST to the
                // other peer (design 3.2 rule 1): the connection ended as it would have after
                // the drain. Nothing is left to move (the local sockets' bytes can no longer
                // be acknowledged); the sweeper ends it as `rst_client` or `rst_backend`
                // with the bytes the entries counted.
                return Ok(true);
            }
            *flow = found;
        }
        if self.pending.iter().any(|p| !p.is_empty()) {
            return Ok(false);
        }
        // The entry whose sender acknowledges each socket's bytes: X acks L (E_up), Y acks
        // L' (E_down).
        for (fd, flow, write_seq) in [
            (self.l, &flows[0], self.write_seq[0]),
            (self.l2, &flows[1], self.write_seq[1]),
        ] {
            if ioctl_int(fd, libc::FIONREAD)? != 0 {
                return Ok(false);
            }
            if ioctl_int(fd, libc::TIOCOUTQ)? == 0 {
                continue;
            }
            if !acked(flow, write_seq) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The peer acknowledged everything up to `write_seq` (as the program saw its ACKs).
fn acked(flow: &Flow, write_seq: u32) -> bool {
    (flow.peer_acked.wrapping_sub(write_seq) as i32) >= 0
}

fn repair(fd: BorrowedFd) -> io::Result<()> {
    setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_TCP, TCP_REPAIR, 1)
}

fn membarrier() -> io::Result<()> {
    // SAFETY: a syscall without pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn send(fd: BorrowedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for its length.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn ioctl_int(fd: BorrowedFd, request: libc::Ioctl) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    // SAFETY: both requests write one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut value) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn getsockopt<T: Copy>(fd: RawFd, level: libc::c_int, option: libc::c_int) -> io::Result<T> {
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`.
    let rc = unsafe { libc::getsockopt(fd, level, option, value.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed, then partly or wholly written by the kernel; every `T` here is plain data.
    Ok(unsafe { value.assume_init() })
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    setsockopt(fd, level, option, &value)
}

fn setsockopt<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: the kernel reads at most `size_of::<T>()` bytes from `value`.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct tcp_repair_window` (`TCP_REPAIR_WINDOW`, read and written in repair mode only).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RepairWindow {
    snd_wl1: u32,
    snd_wnd: u32,
    max_window: u32,
    rcv_wnd: u32,
    rcv_wup: u32,
}

/// Makes the socket's idea of the right edge it announced no further than `edge`, the edge
/// its anchored clamp made its peer see (design 3.6 item 12). The kernel sends a window
/// update when reading opens the window to twice what it thinks the peer has left
/// (`tcp_cleanup_rbuf`, `net/ipv4/tcp.c`); believing it announced the wider unclamped window,
/// a socket whose peer stopped at the anchored edge with everything acknowledged would never
/// send one, and the peer would wait for its zero-window probe (200 ms at least). Repair mode
/// is left without the window probe `TCP_REPAIR_OFF` sends (its old sequence number makes
/// the peer drop it anyway). Leaving repair mode also clears `SO_REUSEADDR`
/// (`sk_reuse = SK_NO_REUSE`, `do_tcp_setsockopt`), which L had from the listener: its
/// `TIME_WAIT` would then keep the next spliced from binding the listener's port for a
/// minute. So it is set back as it was.
fn believe_the_edge(fd: BorrowedFd, edge: u32) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    let reuse: libc::c_int = getsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 1)?;
    let shrunk = (|| {
        let mut w: RepairWindow = getsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW)?;
        // The peer sent nothing past `edge`. An edge behind `rcv_wup` (the socket took in more
        // than the anchor allowed before it was set: it acknowledged what it received, read
        // or not) was announced as a zero window (`clamped_window`).
        let room = edge.wrapping_sub(w.rcv_wup);
        let room = if (room as i32) < 0 { 0 } else { room };
        if room < w.rcv_wnd {
            w.rcv_wnd = room;
            setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &w)?;
        }
        Ok(())
    })();
    let off = setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP);
    let reused = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, reuse);
    shrunk.and(off).and(reused)
}

/// The socket's timestamp clock less `CLOCK_MONOTONIC` in milliseconds (design 4.3). The
/// kernel clears the low bit of a millisecond clock (it flags microseconds), and the clock may
/// tick between the two reads: both make the clock read low by at most a tick, so the bit is
/// set again and the earlier clock reading used, which errs towards a later clock, never an
/// earlier one (an earlier `TSval` than L's last would fail PAWS).
fn socket_clock(fd: RawFd) -> io::Result<SocketClock> {
    let before = monotonic_ms();
    let now: u32 = getsockopt(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP)?;
    Ok(SocketClock {
        offset: (now | 1).wrapping_sub(before),
        now: now | 1,
    })
}

fn monotonic_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writing.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1000)
        .wrapping_add(ts.tv_nsec as u64 / 1_000_000) as u32
}

/// The segment sizes both connections agreed, as `tcp_info` reports them: design 4.1's check
/// that a client's segment, translated, is one the backend takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SegmentSizes {
    /// The MSS L announced to the client (the listener's clamp, `tcpi_advmss`).
    client_may_send: u32,
    /// L's sending MSS with its option bytes: bounded by the MSS the client announced, so by
    /// what the client's own link carries.
    client_link: u32,
    /// L''s sending MSS with its option bytes: bounded by the MSS the backend announced (and by
    /// the client's, which L' announced in turn and which also clamps what L' sends).
    backend_takes: u32,
}

impl SegmentSizes {
    fn of(l: &libc::tcp_info, l2: &libc::tcp_info) -> SegmentSizes {
        let with_options = |info: &libc::tcp_info| {
            let options = if info.tcpi_options & TCPI_OPT_TIMESTAMPS != 0 {
                12
            } else {
                0
            };
            info.tcpi_snd_mss + options
        };
        SegmentSizes {
            client_may_send: l.tcpi_advmss,
            client_link: with_options(l),
            backend_takes: with_options(l2),
        }
    }

    /// The client sends at most the smaller of what L announced and what its own link takes
    /// (which is what it announced); the backend must take that much. L''s MSS is the least of
    /// the backend's MSS, the client's and the backend path's (never below the clamp, which
    /// leaves room for the bigger header), so it is below the client's largest segment only
    /// where the backend announced less.
    fn backend_too_small(&self) -> bool {
        self.backend_takes < self.client_may_send.min(self.client_link)
    }
}

fn wscale(info: &libc::tcp_info) -> Wscale {
    // `__u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4;`
    Wscale {
        snd: info.tcpi_snd_rcv_wscale & 0x0f,
        rcv: info.tcpi_snd_rcv_wscale >> 4,
    }
}

fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}

fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    sock_name(fd, libc::getsockname)
}

fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    sock_name(fd, libc::getpeername)
}

fn sock_name(
    fd: RawFd,
    f: unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
) -> io::Result<SocketAddr> {
    // SAFETY: zeroed storage is a valid `sockaddr_storage`.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes.
    if unsafe {
        f(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says which structure it is.
            let a: libc::sockaddr_in = unsafe { *(&ss as *const _ as *const libc::sockaddr_in) };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(a.sin_addr.s_addr).into(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above.
            let a: libc::sockaddr_in6 = unsafe { *(&ss as *const _ as *const libc::sockaddr_in6) };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        family => Err(io::Error::other(format!("address family {family}"))),
    }
}

/// Design 2.3: the interface the kernel routes `dst` out of, by asking it (`RTM_GETROUTE`, as
/// `ip route get` does), in the calling thread's namespace. A local destination (route type
/// `local`) is refused: translated segments cannot be delivered to this host.
fn out_interface(dst: IpAddr) -> Result<u32, HandoffError> {
    match route(dst) {
        Ok(Route { local: true, .. }) => Err(HandoffError::Refused("local_peer")),
        Ok(Route { oif: Some(oif), .. }) => Ok(oif),
        Ok(Route { oif: None, .. }) => Err(HandoffError::Refused("no_program_on_interface")),
        Err(e) => {
            tracing::warn!("handoff: route lookup for {dst}: {e}");
            Err(HandoffError::Refused("no_route"))
        }
    }
}

struct Route {
    oif: Option<u32>,
    local: bool,
}

fn route(dst: IpAddr) -> io::Result<Route> {
    const RTM_NEWROUTE: u16 = 24;
    const RTM_GETROUTE: u16 = 26;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTN_LOCAL: u8 = 2;
    let (family, addr): (u8, Vec<u8>) = match dst {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    // nlmsghdr (16), rtmsg (12), one attribute (4 + address).
    let len = 16 + 12 + 4 + addr.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[family, (addr.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&((4 + addr.len()) as u16).to_ne_bytes());
    req.extend_from_slice(&RTA_DST.to_ne_bytes());
    req.extend_from_slice(&addr);
    // SAFETY: plain syscalls; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the request is valid for its length; the kernel is the default destination.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: `buf` is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let msg = &buf[..n as usize];
    let u16_at = |at: usize| {
        msg.get(at..at + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        msg.get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let short = || io::Error::other("short netlink answer");
    let total = u32_at(0).ok_or_else(short)? as usize;
    match u16_at(4).ok_or_else(short)? {
        NLMSG_ERROR => {
            let errno = u32_at(16).ok_or_else(short)? as i32;
            return Err(io::Error::from_raw_os_error(-errno));
        }
        RTM_NEWROUTE => {}
        other => return Err(io::Error::other(format!("netlink message type {other}"))),
    }
    let local = msg.get(16 + 7).copied() == Some(RTN_LOCAL);
    let mut oif = None;
    let mut at = 16 + 12;
    let end = total.min(msg.len());
    while at + 4 <= end {
        let alen = usize::from(u16_at(at).ok_or_else(short)?);
        if alen < 4 {
            break;
        }
        if u16_at(at + 2) == Some(RTA_OIF) {
            oif = u32_at(at + 4);
        }
        at += (alen + 3) & !3;
    }
    Ok(Route { oif, local })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(advmss: u32, snd_mss: u32, timestamps: bool) -> libc::tcp_info {
        // SAFETY: `tcp_info` is plain integers; all zeroes is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        info.tcpi_advmss = advmss;
        info.tcpi_snd_mss = snd_mss;
        info.tcpi_options = if timestamps { TCPI_OPT_TIMESTAMPS } else { 0 };
        info
    }

    #[test]
    fn a_backend_announcing_less_than_the_clients_segments_is_too_small() {
        // The test world: L announces 1440, the client 1460; the backend 1440 (1500-byte link).
        let fits = SegmentSizes::of(&info(1440, 1428, true), &info(1440, 1428, true));
        assert!(!fits.backend_too_small(), "{fits:?}");
        // The backend announced 1340 (a 1400-byte link): 1500-byte client segments, translated,
        // would be 1520 bytes.
        let small = SegmentSizes::of(&info(1440, 1428, true), &info(1440, 1328, true));
        assert!(small.backend_too_small(), "{small:?}");
        // Without timestamps on the backend's side, its MSS has no option bytes to add back.
        let bare = SegmentSizes::of(&info(1440, 1428, true), &info(1440, 1440, false));
        assert!(!bare.backend_too_small(), "{bare:?}");
    }

    #[test]
    fn a_client_on_a_small_link_needs_only_as_much_from_the_backend() {
        // The client announced 1400 (a 1440-byte link): L' announced 1400 to the backend and
        // sends at most that, and the client never sends more either.
        let small_client = SegmentSizes::of(&info(1440, 1388, true), &info(1440, 1388, true));
        assert!(!small_client.backend_too_small(), "{small_client:?}");
        let smaller_backend = SegmentSizes::of(&info(1440, 1388, true), &info(1440, 1288, true));
        assert!(smaller_backend.backend_too_small(), "{smaller_backend:?}");
    }

    #[test]
    fn loopback_is_a_local_peer() {
        match route(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)) {
            Ok(r) => assert!(r.local),
            // No netlink in this sandbox: nothing to check.
            Err(e) => eprintln!("no route lookup here: {e}"),
        }
    }
}
