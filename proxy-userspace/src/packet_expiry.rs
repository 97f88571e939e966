//! When a handed-off connection's pair of table entries is removed, and why
//! (`docs/packet-engine.md`, section 6). Pure decisions on the two [`Flow`]s as the programs
//! left them; the sweeper reads the table, asks [`decide`] once a second, and deletes the pair
//! when it answers.
//!
//! The timing is decided here too, so the sweeper keeps no state of its own per connection
//! (and a spliced that adopted the table after a restart decides exactly as the one before):
//! - after an RST, the pair goes once nothing crossed it for [`RST_LINGER`], so segments still
//!   in flight are dropped by the entry (`FLOW_RESET`) rather than answered by the stack;
//! - after both FINs are acknowledged, it goes once nothing crossed it for `linger`: a FIN
//!   retransmitted because the last ACK was lost is still translated, and its arrival starts
//!   the wait again, as a TCP stack restarts `TIME_WAIT`;
//! - otherwise, once nothing crossed it for `idle_timeout`.
//!
//! "Nothing crossed it" is measured from the later `last_seen_ns` of the two entries, which
//! is `bpf_ktime_get_ns` ([`monotonic_ns`] reads the same clock). spliced must set both to
//! [`monotonic_ns`] when it inserts the pair, or a pair that has seen no segment yet would look
//! idle since boot.

use proxy_common::{FLOW_RESET, Flow};

use crate::config::PacketSettings;

/// How long a pair stays after an RST crossed it, counted from the last segment either way.
pub const RST_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// How a handed-off connection ended: the `end=` of its access-log line and the `reason` of
/// `spliced_packet_expiries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum End {
    /// Both FINs were sent and acknowledged (and `linger` passed).
    Fin,
    /// The client reset the connection.
    RstClient,
    /// The backend reset the connection.
    RstBackend,
    /// No segment either way for `idle_timeout`; removed without telling the peers.
    Idle,
    /// spliced stopped and removed the entries that were left.
    Stop,
}

impl End {
    /// Every end, in the order metrics list them.
    pub const ALL: [End; 5] = [
        End::Fin,
        End::RstClient,
        End::RstBackend,
        End::Idle,
        End::Stop,
    ];

    /// The name in the access log and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Fin => "fin",
            End::RstClient => "rst_client",
            End::RstBackend => "rst_backend",
            End::Idle => "idle",
            End::Stop => "stop",
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether sequence number `a` is after `b`, modulo 2^32 (the kernel's `after()`).
fn after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

/// Whether the FIN `sender` sent was acknowledged by the other side, whose entry is `other`:
/// `other.peer_acked` (in the space of the local socket facing the other side) is past the
/// FIN moved into that space by `sender.seq_delta`.
fn fin_acked(sender: &Flow, other: &Flow) -> bool {
    sender.fin_seen != 0
        && after(
            other.peer_acked,
            sender.fin_seq.wrapping_add(sender.seq_delta),
        )
}

/// Whether the connection ended cleanly: both FINs seen and each acknowledged by the other
/// side.
pub fn fins_acked(up: &Flow, down: &Flow) -> bool {
    fin_acked(up, down) && fin_acked(down, up)
}

/// Whether the pair `up` (the client's segments) and `down` (the backend's) is to be removed
/// at `now_ns` (`CLOCK_MONOTONIC`, [`monotonic_ns`]), and why; `None` keeps it.
///
/// A pair whose client entry is [`Flow::superseded`] goes at once, whatever the waits: the
/// client reused the tuple for a new connection (design 2.1).
///
/// A clean end wins over an RST, an RST over idleness (`up`'s over `down`'s, if both). Once
/// both FINs are acknowledged every byte was delivered both ways, and an RST can only answer
/// a stray segment: a peer that closed from `LAST_ACK` has no socket left, so its stack
/// resets the `TIME_WAIT` ACKs the other side sends for duplicates still in flight (a
/// client without SACK, retransmitting go-back-N, met them by the dozen). Calling that a
/// reset would blame a peer that closed normally. Never [`End::Stop`], which is the caller's
/// own decision.
pub fn decide(up: &Flow, down: &Flow, now_ns: u64, settings: &PacketSettings) -> Option<End> {
    let last = up.last_seen_ns.max(down.last_seen_ns);
    let quiet = std::time::Duration::from_nanos(now_ns.saturating_sub(last));
    let reset = if up.state == FLOW_RESET {
        Some(End::RstClient)
    } else if down.state == FLOW_RESET {
        Some(End::RstBackend)
    } else {
        None
    };
    let clean = fins_acked(up, down);
    if up.superseded != 0 {
        // The client opened a new connection from the same port (design 2.1): its socket is
        // gone and the tuple is the new connection's, so nothing is left to linger for. The
        // program marks an entry so only after an RST (`reset`) or with both FINs seen: a
        // FIN whose last ACK the program did not see still ended the connection cleanly.
        return Some(match reset {
            Some(end) if !clean => end,
            _ => End::Fin,
        });
    }
    if let Some(end) = reset {
        // A reset connection never comes back; waiting longer than idle_timeout is pointless.
        let end = if clean { End::Fin } else { end };
        return (quiet >= RST_LINGER.min(settings.idle_timeout)).then_some(end);
    }
    if clean {
        return (quiet >= settings.linger.min(settings.idle_timeout)).then_some(End::Fin);
    }
    (quiet >= settings.idle_timeout).then_some(End::Idle)
}

/// Bytes of the sender's stream that crossed `flow` after the handoff, its FIN excluded: with
/// what spliced moved before, the access log's count for that direction.
///
/// The program's `stream_bytes` sums the advances of `high_end`, which counts past 4 GiB but
/// is not exact: its update is not atomic, so two CPUs advancing `high_end` at once can both
/// add the same stretch (a CI run counted 64,260 bytes, 45 segments, too many in 256 MiB;
/// this race would explain it, no trace confirmed it). The stream's end is exact (the
/// FIN's sequence number, or `high_end` without one), so the count is the number with that
/// end's offset from `seq_floor` modulo 2^32 nearest to the sum: exact while the sum is off by
/// less than 2 GiB.
pub fn stream_bytes(flow: &Flow) -> u64 {
    let fin = flow.fin_seen != 0;
    let sum = flow.stream_bytes.saturating_sub(u64::from(fin));
    let end = if fin { flow.fin_seq } else { flow.high_end };
    nearest_congruent(sum, end.wrapping_sub(flow.seq_floor))
}

/// The number congruent to `low` modulo 2^32 nearest to `approx` (never below 0).
fn nearest_congruent(approx: u64, low: u32) -> u64 {
    const SPAN: u64 = 1 << 32;
    let base = approx & !(SPAN - 1);
    [base.checked_sub(SPAN), Some(base), base.checked_add(SPAN)]
        .into_iter()
        .flatten()
        .map(|b| b + u64::from(low))
        .min_by_key(|v| v.abs_diff(approx))
        .unwrap_or(approx)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`, and so of
/// [`Flow::last_seen_ns`].
pub fn monotonic_ns() -> u64 {
    let mut ts = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proxy_common::{FLOW_ACTIVE, FLOW_DOWN, FLOW_UP};

    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// A pair as the programs leave it: the client's sequence space starts at `ic`, L' at
    /// `jp`, the backend's at `jb`, L's at `ip` (design section 1, no PROXY header), both last
    /// seen at `seen`.
    fn pair(ic: u32, ip: u32, jp: u32, jb: u32, seen: u64) -> (Flow, Flow) {
        let up = Flow {
            state: FLOW_ACTIVE,
            dir: FLOW_UP,
            seq_delta: jp.wrapping_sub(ic),
            ack_delta: ip.wrapping_sub(jb),
            // The client acknowledges L's bytes: L's ISN + 1 so far.
            peer_acked: ip.wrapping_add(1),
            last_seen_ns: seen,
            ..Flow::default()
        };
        let down = Flow {
            state: FLOW_ACTIVE,
            dir: FLOW_DOWN,
            seq_delta: ip.wrapping_sub(jb),
            ack_delta: jp.wrapping_sub(ic),
            peer_acked: jp.wrapping_add(1),
            last_seen_ns: seen,
            ..Flow::default()
        };
        (up, down)
    }

    /// The sender of `flow` sends its FIN after `bytes` bytes of its stream starting at
    /// `isn + 1`.
    fn fin(flow: &mut Flow, isn: u32, bytes: u32) {
        flow.fin_seen = 1;
        flow.fin_seq = isn.wrapping_add(1).wrapping_add(bytes);
        flow.stream_bytes = u64::from(bytes) + 1;
    }

    /// The receiver acknowledges everything up to and including the FIN the other entry saw,
    /// in its own ACK space (the local socket's): `fin_seq + seq_delta + 1`.
    fn ack_fin(receiver: &mut Flow, sender: &Flow) {
        receiver.peer_acked = sender
            .fin_seq
            .wrapping_add(sender.seq_delta)
            .wrapping_add(1);
    }

    fn settings() -> PacketSettings {
        PacketSettings::default()
    }

    #[test]
    fn names() {
        let names: Vec<&str> = End::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(names, ["fin", "rst_client", "rst_backend", "idle", "stop"]);
        assert_eq!(End::RstBackend.to_string(), "rst_backend");
    }

    #[test]
    fn a_live_connection_is_kept() {
        let (up, down) = pair(1000, 2000, 3000, 4000, 100 * SEC);
        assert_eq!(decide(&up, &down, 100 * SEC, &settings()), None);
        assert_eq!(decide(&up, &down, 3000 * SEC, &settings()), None);
        // A clock read before the program's last update: nothing is negative.
        assert_eq!(decide(&up, &down, 99 * SEC, &settings()), None);
    }

    #[test]
    fn idle_once_both_directions_are_quiet_for_the_timeout() {
        let (mut up, down) = pair(1000, 2000, 3000, 4000, 100 * SEC);
        let idle = settings().idle_timeout.as_secs();
        assert_eq!(
            decide(&up, &down, (100 + idle) * SEC - 1, &settings()),
            None
        );
        assert_eq!(
            decide(&up, &down, (100 + idle) * SEC, &settings()),
            Some(End::Idle)
        );
        // One direction still talking keeps the pair (keep-alive probes count).
        up.last_seen_ns = (100 + idle) * SEC;
        assert_eq!(decide(&up, &down, (100 + idle) * SEC, &settings()), None);
        assert_eq!(
            decide(&up, &down, (100 + 2 * idle) * SEC, &settings()),
            Some(End::Idle)
        );
    }

    #[test]
    fn fin_needs_both_fins_acknowledged_then_linger() {
        let (ic, ip, jp, jb) = (1000, 2000, 3000, 4000);
        let (mut up, mut down) = pair(ic, ip, jp, jb, 10 * SEC);
        let linger = settings().linger.as_nanos() as u64;
        let later = 10 * SEC + linger;
        // The client's FIN, not yet acknowledged.
        fin(&mut up, ic, 500);
        assert_eq!(decide(&up, &down, later, &settings()), None);
        // Acknowledged: a half-close; the backend still sends.
        ack_fin(&mut down, &up);
        assert!(fin_acked(&up, &down));
        assert_eq!(decide(&up, &down, later, &settings()), None);
        // The backend's FIN, acknowledged one short of it: not yet.
        fin(&mut down, jb, 70_000);
        ack_fin(&mut up, &down);
        up.peer_acked = up.peer_acked.wrapping_sub(1);
        assert_eq!(decide(&up, &down, later, &settings()), None);
        ack_fin(&mut up, &down);
        assert!(fins_acked(&up, &down));
        assert_eq!(decide(&up, &down, later - 1, &settings()), None);
        assert_eq!(decide(&up, &down, later, &settings()), Some(End::Fin));
        // A retransmitted FIN seen later starts the linger again.
        down.last_seen_ns = later;
        assert_eq!(decide(&up, &down, later, &settings()), None);
        assert_eq!(
            decide(&up, &down, later + linger, &settings()),
            Some(End::Fin)
        );
    }

    #[test]
    fn fin_acknowledged_in_the_other_side_s_space() {
        // An ACK that covers the FIN in the sender's own space but not after the offset does
        // not count: the offsets matter.
        let (ic, ip, jp, jb) = (1000, 2000, 900_000, 4000);
        let (mut up, mut down) = pair(ic, ip, jp, jb, 0);
        fin(&mut up, ic, 10);
        down.peer_acked = up.fin_seq.wrapping_add(1);
        assert!(!fin_acked(&up, &down));
        ack_fin(&mut down, &up);
        assert!(fin_acked(&up, &down));
    }

    #[test]
    fn zero_linger_ends_at_once_and_linger_is_capped_by_idle() {
        let (ic, ip, jp, jb) = (1000, 2000, 3000, 4000);
        let (mut up, mut down) = pair(ic, ip, jp, jb, 10 * SEC);
        fin(&mut up, ic, 1);
        fin(&mut down, jb, 1);
        ack_fin(&mut down, &up);
        ack_fin(&mut up, &down);
        let now_done = PacketSettings {
            linger: Duration::ZERO,
            ..settings()
        };
        assert_eq!(decide(&up, &down, 10 * SEC, &now_done), Some(End::Fin));
        let short_idle = PacketSettings {
            idle_timeout: Duration::from_secs(2),
            ..settings()
        };
        assert_eq!(decide(&up, &down, 12 * SEC, &short_idle), Some(End::Fin));
    }

    #[test]
    fn fin_across_the_sequence_wrap() {
        // Every space wraps between the handoff and the FINs: ISNs just below 2^32, offsets
        // that wrap, FINs past zero.
        let (ic, ip, jp, jb) = (0xffff_ff00, 0xffff_fff0, 0x0000_0100, 0xffff_f000);
        let (mut up, mut down) = pair(ic, ip, jp, jb, 0);
        fin(&mut up, ic, 0x1000);
        fin(&mut down, jb, 0x2_0000);
        assert!(up.fin_seq < ic, "the client's FIN wrapped");
        assert!(down.fin_seq < jb, "the backend's FIN wrapped");
        assert!(!fins_acked(&up, &down));
        ack_fin(&mut down, &up);
        ack_fin(&mut up, &down);
        assert!(fins_acked(&up, &down));
        // ACKs exactly at the FIN (not past it) wrap too and do not count.
        let mut short = up;
        short.peer_acked = down.fin_seq.wrapping_add(down.seq_delta);
        assert!(!fin_acked(&down, &short));
        assert_eq!(
            decide(&up, &down, settings().linger.as_nanos() as u64, &settings()),
            Some(End::Fin)
        );
        // An ACK half the space behind reads as before the FIN, not after it.
        short.peer_acked = down
            .fin_seq
            .wrapping_add(down.seq_delta)
            .wrapping_sub(0x7fff_ffff);
        assert!(!fin_acked(&down, &short));
    }

    #[test]
    fn after_is_modulo_2_32() {
        assert!(after(1, 0));
        assert!(!after(0, 0));
        assert!(!after(0, 1));
        assert!(after(0, u32::MAX));
        assert!(after(5, 0xffff_fff0));
        assert!(!after(0xffff_fff0, 5));
        assert!(after(0x7fff_ffff, 0));
        // Exactly half the space apart, the kernel's `after` says after, both ways round.
        assert!(after(0x8000_0000, 0));
        assert!(after(0, 0x8000_0000));
    }

    #[test]
    fn reset_by_either_side_after_a_second_of_quiet() {
        let (mut up, mut down) = pair(1, 2, 3, 4, 50 * SEC);
        up.state = FLOW_RESET;
        assert_eq!(decide(&up, &down, 50 * SEC, &settings()), None);
        assert_eq!(
            decide(&up, &down, 51 * SEC, &settings()),
            Some(End::RstClient)
        );
        up.state = FLOW_ACTIVE;
        down.state = FLOW_RESET;
        assert_eq!(
            decide(&up, &down, 51 * SEC, &settings()),
            Some(End::RstBackend)
        );
        // An RST with one FIN acknowledged is still a reset.
        fin(&mut up, 1, 0);
        fin(&mut down, 4, 0);
        ack_fin(&mut down, &up);
        assert_eq!(
            decide(&up, &down, 51 * SEC, &settings()),
            Some(End::RstBackend)
        );
        up.state = FLOW_RESET;
        assert_eq!(
            decide(&up, &down, 51 * SEC, &settings()),
            Some(End::RstClient)
        );
    }

    /// Both FINs acknowledged, then the client's stack resets the backend's `TIME_WAIT` ACKs
    /// (its socket closed from `LAST_ACK`): a clean end, gone after the RST's short wait.
    #[test]
    fn an_rst_after_both_fins_were_acknowledged_is_a_clean_end() {
        let (mut up, mut down) = pair(1, 2, 3, 4, 50 * SEC);
        fin(&mut up, 1, 0);
        fin(&mut down, 4, 0);
        ack_fin(&mut down, &up);
        ack_fin(&mut up, &down);
        up.state = FLOW_RESET;
        assert_eq!(decide(&up, &down, 50 * SEC, &settings()), None);
        assert_eq!(decide(&up, &down, 51 * SEC, &settings()), Some(End::Fin));
        down.state = FLOW_RESET;
        assert_eq!(decide(&up, &down, 51 * SEC, &settings()), Some(End::Fin));
    }

    /// The client reused the port (the program marked `E_up` superseded): the pair goes at
    /// once, without `linger` or the RST's wait, and the end says how the connection ended.
    #[test]
    fn a_superseded_pair_ends_at_once_as_it_ended() {
        let (ic, ip, jp, jb) = (1000, 2000, 3000, 4000);
        let seen = 50 * SEC;
        // Both FINs acknowledged: `fin`, not after `linger` but now.
        let (mut up, mut down) = pair(ic, ip, jp, jb, seen);
        fin(&mut up, ic, 10);
        fin(&mut down, jb, 20);
        ack_fin(&mut down, &up);
        ack_fin(&mut up, &down);
        assert_eq!(decide(&up, &down, seen, &settings()), None);
        up.superseded = 1;
        assert_eq!(decide(&up, &down, seen, &settings()), Some(End::Fin));
        // A clock read before the program's last update changes nothing.
        assert_eq!(decide(&up, &down, seen - SEC, &settings()), Some(End::Fin));
        // Both FINs seen, the last ACK not: still a clean end (the client's socket is gone).
        let (mut up, mut down) = pair(ic, ip, jp, jb, seen);
        fin(&mut up, ic, 10);
        fin(&mut down, jb, 20);
        ack_fin(&mut down, &up);
        up.superseded = 1;
        assert!(!fins_acked(&up, &down));
        assert_eq!(decide(&up, &down, seen, &settings()), Some(End::Fin));
        // Reset by either side: the reset, at once rather than after RST_LINGER.
        let (mut up, mut down) = pair(ic, ip, jp, jb, seen);
        up.state = FLOW_RESET;
        up.superseded = 1;
        assert_eq!(decide(&up, &down, seen, &settings()), Some(End::RstClient));
        up.state = FLOW_ACTIVE;
        down.state = FLOW_RESET;
        assert_eq!(decide(&up, &down, seen, &settings()), Some(End::RstBackend));
        // An RST after both FINs were acknowledged is a clean end, as without the mark.
        fin(&mut up, ic, 0);
        fin(&mut down, jb, 0);
        ack_fin(&mut down, &up);
        ack_fin(&mut up, &down);
        assert_eq!(decide(&up, &down, seen, &settings()), Some(End::Fin));
        // Only the client's entry carries the mark: on the backend's it means nothing.
        let (up, mut down) = pair(ic, ip, jp, jb, seen);
        down.superseded = 1;
        assert_eq!(decide(&up, &down, seen, &settings()), None);
    }

    #[test]
    fn stream_bytes_leave_the_fin_out() {
        // 8 GiB past a floor near the wrap; the FIN is the stream's last sequence number.
        let floor = u32::MAX - 10;
        let mut flow = Flow {
            seq_floor: floor,
            high_end: floor,
            stream_bytes: 1 << 33,
            ..Flow::default()
        };
        assert_eq!(stream_bytes(&flow), 1 << 33);
        flow.fin_seen = 1;
        flow.fin_seq = floor.wrapping_sub(1);
        flow.high_end = floor;
        assert_eq!(stream_bytes(&flow), (1 << 33) - 1);
        // A FIN alone: nothing of the stream.
        flow.stream_bytes = 1;
        flow.fin_seq = floor;
        assert_eq!(stream_bytes(&flow), 0);
        // Racy updates may leave the FIN seen before its count: never below zero.
        flow.stream_bytes = 0;
        assert_eq!(stream_bytes(&flow), 0);
    }

    #[test]
    fn stream_bytes_follow_the_sequence_numbers_when_the_sum_is_off() {
        // 256 MiB each way, with one GRO segment of 64,260 bytes added twice by two CPUs.
        let floor = 4_000_000_000u32;
        let len = 256u32 << 20;
        let mut flow = Flow {
            seq_floor: floor,
            high_end: floor.wrapping_add(len),
            stream_bytes: u64::from(len) + 64_260,
            ..Flow::default()
        };
        assert_eq!(stream_bytes(&flow), u64::from(len));
        flow.fin_seen = 1;
        flow.fin_seq = floor.wrapping_add(len);
        flow.high_end = flow.fin_seq.wrapping_add(1);
        flow.stream_bytes = u64::from(len) + 1 + 64_260;
        assert_eq!(stream_bytes(&flow), u64::from(len));
        // Past 4 GiB the sum says how many times the offset wrapped.
        flow.stream_bytes = (5u64 << 32) + u64::from(len) + 1 + 1000;
        assert_eq!(stream_bytes(&flow), (5u64 << 32) + u64::from(len));
        // A sum a little short (a lost `max` step) is made up as well.
        flow.stream_bytes = u64::from(len) + 1 - 3000;
        assert_eq!(stream_bytes(&flow), u64::from(len));
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a, "{a} {b}");
    }
}
