//! The packet engine's part of forwarding (`docs/packet-engine.md`, section 3.4): splice until
//! `packet.after` bytes moved (none by default), freeze both directions where no pipe holds a
//! byte, and hand the connection to the kernel ([`crate::packet::Packet::handoff`]). A refused
//! handoff goes on with splice, or under `auto` as `auto` goes on without the engine (sockmap
//! after its handoff; see [`super::choose`]); a handed-off connection waits here for the
//! sweeper to end it.
use std::{
    io,
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::net::TcpStream;

use super::{
    Counters, ForwardError, Side, sockmap,
    splice::{self, Stopped},
};
use crate::{
    packet::{self, Packet},
    packet_expiry::End,
};

/// The most bytes each direction forwards from what its socket holds in one pass before the
/// freeze: about what a peer sends in a millisecond on a fast link, so that checking for
/// unsent bytes keeps up with a peer that keeps sending.
const QUEUED_LIMIT: u64 = 256 << 10;

/// How long the engine tries to reach a freeze point (both local sockets have sent every byte
/// they hold) before it refuses the handoff (`not_quiet`, design section 9).
const FREEZE_WITHIN: Duration = Duration::from_secs(1);

/// What the engine needs besides the sockets.
pub struct Params<'a> {
    /// The engine's kernel side.
    pub packet: &'a Arc<Packet>,
    /// Bytes (both ways together) moved by splice before the handoff.
    pub after: u64,
    /// Bytes written to the backend before forwarding (PROXY header and hello).
    pub preface_len: u64,
    /// Bytes read from the client before forwarding (a received PROXY header, the hello and
    /// what came with it).
    pub client_consumed: u64,
    /// `CLOCK_BOOTTIME` when the connection was accepted.
    pub started_ns: u64,
    /// How long the handoff's drain may take.
    pub drain_timeout: Duration,
    /// Why the connection may not be handed off, found before forwarding (from the SYN).
    pub refuse: Option<&'static str>,
    /// Set once the kernel carries the connection: the byte counters stop moving then, which
    /// must not count as idle.
    pub handed_off: &'a AtomicBool,
    /// Where refusals and handoff durations are counted, as they happen.
    pub stats: &'a crate::shared::PacketStats,
    /// Whether a connection that ends before `after` bytes counts as refused (`half_closed`),
    /// as under `forwarding = "packet"`; under `auto` it was never offered to the engine.
    pub short_is_refused: bool,
    /// What carries a connection the engine did not take: the sockmap engine, picking up
    /// where the splice phase left it (`auto` with the kernel path), or, when `None`, splice.
    pub then_sockmap: Option<sockmap::Params<'a>>,
}

/// How a connection was forwarded.
pub enum Used {
    /// The engine did not carry the connection: it refused it for this reason, or (`None`) the
    /// connection ended before it was offered. Splice, or the sockmap engine when `sockmap`
    /// (it moved at least one direction), carried it to its end.
    Stayed {
        /// Why the engine refused it, if it was offered.
        refused: Option<&'static str>,
        /// The sockmap engine's kernel path moved a direction.
        sockmap: bool,
    },
    /// The kernel carried it after the handoff, which took `handoff`, until `end`.
    Packet {
        /// Why the sweeper ended it.
        end: End,
        /// From the call to `ACTIVE`.
        handoff: Duration,
    },
}

/// Forwards a connection whose preface went out; see the module's doc. Every byte moved is in
/// `counters` at the end: spliced's, the drain's, and what the programs carried.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    counters: &Counters,
    mut params: Params<'_>,
) -> Result<Used, ForwardError> {
    let ended = AtomicBool::new(false);
    let then_sockmap = params.then_sockmap.take();
    let (refused, eof) = match offer(client, backend, counters, params, &ended).await? {
        Offered::Packet(used) => return Ok(used),
        Offered::Stayed { refused, eof } => (refused, eof),
    };
    let sockmap = match then_sockmap {
        // Every byte so far went through splice with empty pipes at the end, and nothing else
        // touched the sockets: the sockmap engine starts from that, as its own splice phase
        // would have left them.
        Some(mut next) => {
            let (up, down) = counters.get();
            next.earlier = sockmap::Earlier {
                moved: (up, down),
                ended: eof,
            };
            sockmap::forward(client, backend, counters, next).await? == sockmap::Used::Sockmap
        }
        None => {
            go_on_with_splice(client, backend, counters, &ended, eof).await?;
            false
        }
    };
    Ok(Used::Stayed { refused, sockmap })
}

/// Where [`offer`] left a connection.
enum Offered {
    /// Handed off, and ended.
    Packet(Used),
    /// Not handed off, with every byte so far forwarded: why it was refused (`None`: never
    /// offered), and which directions already ended (their end of stream passed on).
    Stayed {
        refused: Option<&'static str>,
        eof: (bool, bool),
    },
}

/// Splices until `after`, freezes and hands the connection off: returns once it ended if it
/// was handed off, else at once with where it stands. A refusal is counted here.
async fn offer(
    client: &TcpStream,
    backend: &TcpStream,
    counters: &Counters,
    params: Params<'_>,
    ended: &AtomicBool,
) -> Result<Offered, ForwardError> {
    let mut eof = (false, false);
    if params.after > 0 {
        let stop = tokio::sync::watch::Sender::new(false);
        let after = params.after;
        let moved = || {
            let (up, down) = counters.get();
            up + down >= after
        };
        let up = splice::one_way_until_stopped(
            client,
            backend,
            Side::Client,
            &counters.upstream,
            Some(ended),
            &stop,
            &moved,
        );
        let down = splice::one_way_until_stopped(
            backend,
            client,
            Side::Backend,
            &counters.downstream,
            Some(ended),
            &stop,
            &moved,
        );
        // A direction that ended must not hold up the other: its end stops both (the
        // connection is then half-closed and stays with splice).
        let (up, down) = tokio::join!(
            async {
                let r = up.await;
                stop.send_replace(true);
                r
            },
            async {
                let r = down.await;
                stop.send_replace(true);
                r
            }
        );
        eof = (up? == Stopped::Eof, down? == Stopped::Eof);
        if (eof.0 || eof.1) && !moved() && !params.short_is_refused {
            // It ended before it moved `after` bytes: it was never the engine's.
            return Ok(Offered::Stayed { refused: None, eof });
        }
    }
    // What the peers already sent (early client data behind the hello, a backend that
    // answered at once) goes through spliced's counts now, and the freeze waits until both
    // sockets sent everything they were given at least once: the drain's rule F is for the
    // few segments still on their way, and a local socket's bytes are acknowledged during
    // the drain only as the programs see it, so bytes it has not even sent would never go.
    //
    // From here the windows both sockets announce are clamped (design 3.6 item 12): a peer
    // that had megabytes in flight towards its local socket at the switch sent much of them
    // past the far peer's window, and learnt of it only by a retransmission timeout.
    //
    // A connection the engine cannot take (its SYN, or what the sockets say) is neither
    // frozen nor clamped: it goes on with splice at once.
    let mut clamps = if !eof.0 && !eof.1 {
        let screened = match params.refuse {
            Some(reason) => packet::Screened::Refused(reason),
            None => params.packet.screen(client.as_fd(), backend.as_fd()),
        };
        match screened {
            packet::Screened::Go(clamps) => clamps,
            packet::Screened::Refused(reason) => {
                params.stats.count_refused(reason);
                return Ok(Offered::Stayed {
                    refused: Some(reason),
                    eof,
                });
            }
        }
    } else {
        None
    };
    let mut quiet = false;
    let deadline = tokio::time::Instant::now() + FREEZE_WITHIN;
    while !eof.0 && !eof.1 && tokio::time::Instant::now() < deadline {
        let up = splice::queued(
            client,
            backend,
            Side::Client,
            &counters.upstream,
            Some(ended),
            QUEUED_LIMIT,
        );
        let down = splice::queued(
            backend,
            client,
            Side::Backend,
            &counters.downstream,
            Some(ended),
            QUEUED_LIMIT,
        );
        let (up, down) = tokio::try_join!(up, down)?;
        eof = (up == Stopped::Eof, down == Stopped::Eof);
        let unsent =
            |s: &TcpStream, side: Side| packet::host::unsent(s.as_fd()).map_err(|e| side.failed(e));
        if unsent(client, Side::Client)? == 0 && unsent(backend, Side::Backend)? == 0 {
            quiet = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let reason = if !quiet && !eof.0 && !eof.1 {
        Some("not_quiet")
    } else if eof.0 || eof.1 {
        Some("half_closed")
    } else {
        None
    };
    if let Some(reason) = reason {
        params.stats.count_refused(reason);
        return Ok(Offered::Stayed {
            refused: Some(reason),
            eof,
        });
    }
    // Frozen: both directions stopped with their pipes empty.
    let (up, down) = counters.get();
    if let Some(c) = &mut clamps {
        c.anchor(
            client.as_fd(),
            backend.as_fd(),
            (params.client_consumed + up, down),
        );
    }
    let counts = [
        params.client_consumed + up,
        params.preface_len + up,
        down,
        down,
    ];
    let dup = |s: &TcpStream| s.as_fd().try_clone_to_owned();
    let fds = (
        dup(client).map_err(|e| Side::Client.failed(e))?,
        dup(backend).map_err(|e| Side::Backend.failed(e))?,
    );
    let outcome = params
        .packet
        .handoff(fds, counts, params.started_ns, params.drain_timeout)
        .await
        .map_err(|e| Side::Client.failed(io::Error::other(format!("packet handoff: {e:#}"))))?;
    match outcome {
        packet::Outcome::Refused(reason) => {
            // The sockets announce their own windows again.
            if let Some(c) = clamps {
                c.refused(client.as_fd(), backend.as_fd());
            }
            params.stats.count_refused(reason);
            Ok(Offered::Stayed {
                refused: Some(reason),
                eof,
            })
        }
        packet::Outcome::HandedOff {
            duration,
            drained,
            ended,
        } => {
            // The sockets are silent for good.
            drop(clamps);
            params.handed_off.store(true, Ordering::Relaxed);
            params.stats.observe_handoff(duration);
            let ended = ended.await.map_err(|_| {
                Side::Client.failed(io::Error::other(
                    "the packet engine's sweeper went away before the connection ended",
                ))
            })?;
            // Both the drain's bytes and the programs' count start where the freeze left each
            // stream (`seq_floor`), and the programs count every advance of the highest byte
            // they saw, over bytes the drain moved too: the stream went as far as the larger.
            let (up, down) = ended.stream_bytes();
            counters
                .upstream
                .fetch_add(up.max(drained.0), Ordering::Relaxed);
            counters
                .downstream
                .fetch_add(down.max(drained.1), Ordering::Relaxed);
            Ok(Offered::Packet(Used::Packet {
                end: ended.end,
                handoff: duration,
            }))
        }
    }
}

/// Splices the directions that have not ended yet, to their ends.
async fn go_on_with_splice(
    client: &TcpStream,
    backend: &TcpStream,
    counters: &Counters,
    ended: &AtomicBool,
    (up_done, down_done): (bool, bool),
) -> Result<(), ForwardError> {
    let up = async {
        if up_done {
            return Ok(());
        }
        splice::one_way(
            client,
            backend,
            Side::Client,
            &counters.upstream,
            Some(ended),
        )
        .await
    };
    let down = async {
        if down_done {
            return Ok(());
        }
        splice::one_way(
            backend,
            client,
            Side::Backend,
            &counters.downstream,
            Some(ended),
        )
        .await
    };
    tokio::try_join!(up, down).map(|_| ())
}
