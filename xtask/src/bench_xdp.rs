//! `cargo xtask bench`, second part: TCP SYNs per second the XDP edge filter drops on one core,
//! next to SYNs per second the kernel's TCP stack handles on that core without it.
//!
//! One packet generator thread, pinned to one CPU in the client namespace, sends TCP SYNs from
//! 192.0.2.2 to 192.0.2.1:443 as fast as it can for a fixed time. It hands prebuilt Ethernet
//! frames to the client's veth through an `AF_PACKET` socket (`sendmmsg` batches,
//! `PACKET_QDISC_BYPASS`), each frame its own flow (source ports 1024-65535). On a veth pair the
//! receiving side (the XDP program, or the IP and TCP stack) runs in softirq on the CPU that
//! transmitted, so pinning the sender pins the whole pipeline, sender included, to that core.
//!
//! Two contenders, interleaved round by round (A B A B ...), each with a fresh spliced:
//!
//! - XDP drop: spliced with `[xdp]` on the proxy's eth0, denying 192.0.2.2 on port 443. Rate:
//!   the `dropped_deny` counter's growth, from spliced's `/metrics` (`spliced_xdp_packets_total`).
//! - the stack: spliced without `[xdp]`, listening on 443. This is what a denied client's SYN
//!   flood meets without the filter: the listener's SYN queue fills at once, after which the
//!   stack answers every SYN with a SYN cookie SYN-ACK. Rate: the proxy namespace's TCP
//!   `InSegs` growth (every SYN that reached TCP). The proxy's neighbour entry for 192.0.2.2 is
//!   pinned to a documentation MAC address, so the SYN-ACKs leave eth0 as they would towards a
//!   real attacker but the client's stack discards them unread (not its MAC) instead of
//!   answering each with a RST that the proxy would have to process too.
//!
//! Next to each rate: what the generator sent, so a reader sees whether the generator was the
//! limit, and the softirq CPU time of the pinned core per packet handled (the receiving side's
//! cost per packet, sampled by the scheduler tick, so approximate).
use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    libc,
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    sys::socket::{AddressFamily, SockFlag, SockType, socket},
    unistd::Pid,
};
use spliced_tests::{
    BACKEND_V6, CLIENT_V4, Ns, PROXY_V4, World,
    packets::{self, ETHERTYPE_IPV4},
    spliced::{Launch, Spliced},
    wait_for,
};

use crate::bench::{median, spread};

/// The guarded, listening port the SYNs go to.
const PORT: u16 = 443;
/// The proxy's interface facing the client (and the client's own, at the other end).
const IFACE: &str = "eth0";
/// Frames per `sendmmsg` call.
const BATCH: usize = 64;
/// An upper bound on packets per sample, whatever the clock says.
const MAX_PACKETS: u64 = 500_000_000;
/// Where the proxy's SYN-ACKs to 192.0.2.2 go: a documentation MAC address (RFC 7042).
const NOWHERE_MAC: &str = "00:00:5e:00:53:01";
/// How long after the generator stops before counters are read, for queued packets to finish.
const SETTLE: Duration = Duration::from_millis(100);
const WAIT: Duration = Duration::from_secs(10);

/// Options of this part of the benchmark.
pub struct Options {
    /// How long the generator sends per sample.
    pub seconds: Duration,
    /// Rounds; each round samples every contender once.
    pub rounds: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    XdpDrop,
    Stack,
}

impl Contender {
    fn label(self) -> &'static str {
        match self {
            Contender::XdpDrop => "xdp",
            Contender::Stack => "stack",
        }
    }

    fn config(self) -> String {
        let mut config = format!(
            "[defaults]\nforwarding = \"splice\"\n\
             [[listen]]\naddress = \"0.0.0.0:{PORT}\"\nprotocol = \"tls\"\n\
             [[site]]\nhostnames = [\"x.example\"]\nbackend = \"[{BACKEND_V6}]:9443\"\n"
        );
        if self == Contender::XdpDrop {
            config.push_str(&format!(
                "[xdp]\ninterfaces = [\"{IFACE}\"]\nmode = \"auto\"\nports = [{PORT}]\n\
                 deny = [\"{CLIENT_V4}/32\"]\n"
            ));
        }
        config
    }
}

/// What the generator did in one sample.
struct Sent {
    packets: u64,
    seconds: f64,
    /// `sendmmsg` calls that failed for full queues (`ENOBUFS`, `EAGAIN`) and were retried.
    retries: u64,
}

/// One sample of one contender.
struct Sample {
    sent: Sent,
    /// Packets the receiver handled: XDP `dropped_deny`, or TCP `InSegs`.
    handled: u64,
    /// The stack's SYN-ACKs (`OutSegs`) and those that were SYN cookies; 0 for XDP.
    answered: u64,
    cookies: u64,
    cpu: CpuDelta,
    /// How the XDP program was attached (`xdp` or `xdpgeneric`), for the XDP contender.
    mode: Option<String>,
}

impl Sample {
    fn handled_pps(&self) -> f64 {
        self.handled as f64 / self.sent.seconds
    }

    fn sent_pps(&self) -> f64 {
        self.sent.packets as f64 / self.sent.seconds
    }

    /// Softirq CPU nanoseconds of the pinned core per packet handled.
    fn softirq_ns(&self) -> f64 {
        if self.handled == 0 {
            return f64::NAN;
        }
        self.cpu.softirq * 1e9 / self.handled as f64
    }
}

/// Runs this part of the benchmark and prints a Markdown table. `SPLICED_BIN` must be set.
pub fn run(opts: &Options) -> Result<crate::report::Part> {
    let cpu = generator_cpu()?;
    let world = World::new()?;
    let proxy_mac = world.within(Ns::Proxy, || packets::mac_of(IFACE))??;
    let client_mac = world.within(Ns::Client, || packets::mac_of(IFACE))??;
    let status = world
        .command(Ns::Proxy, "ip")
        .args(["neigh", "replace", &CLIENT_V4.to_string(), "lladdr"])
        .args([NOWHERE_MAC, "dev", IFACE, "nud", "permanent"])
        .status()
        .context("starting ip neigh")?;
    ensure!(
        status.success(),
        "pinning the proxy's neighbour entry for {CLIENT_V4}: {status}"
    );
    let frames = Frames::new(proxy_mac, client_mac)?;
    let contenders = [Contender::XdpDrop, Contender::Stack];
    eprintln!(
        "bench xdp: {} rounds x {} contenders, {:.1} s of SYNs each, generator pinned to CPU {cpu}",
        opts.rounds,
        contenders.len(),
        opts.seconds.as_secs_f64()
    );
    let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
    for round in 0..opts.rounds {
        for (i, &c) in contenders.iter().enumerate() {
            let s = sample(&world, c, &frames, cpu, opts.seconds, round)
                .with_context(|| format!("round {round}, contender {}", c.label()))?;
            eprintln!(
                "  round {round} {:<5} sent {:>9.0} pps, handled {:>9.0} pps ({:.1}%), \
                 CPU {cpu}: {:.0}% busy, {:.0}% softirq, {:.0} ns softirq/packet, \
                 {} send retries",
                c.label(),
                s.sent_pps(),
                s.handled_pps(),
                100.0 * s.handled as f64 / s.sent.packets.max(1) as f64,
                100.0 * s.cpu.busy / s.cpu.total,
                100.0 * s.cpu.softirq / s.cpu.total,
                s.softirq_ns(),
                s.sent.retries,
            );
            samples[i].push(s);
        }
    }
    drop(world);
    Ok(print_table(opts, cpu, &samples[0], &samples[1]))
}

/// One sample: a fresh spliced for `contender`, the generator for `seconds`, counters around it.
fn sample(
    world: &World,
    contender: Contender,
    frames: &Frames,
    cpu: usize,
    seconds: Duration,
    round: usize,
) -> Result<Sample> {
    let mut spliced = Launch::new(contender.config())
        .named(&format!("bench-xdp-{}-{round}", contender.label()))
        .metrics()
        .start(world, &[PORT])?;
    let mode = match contender {
        Contender::XdpDrop => {
            wait_for("the XDP program on the proxy's eth0", WAIT, || {
                spliced.check_running()?;
                Ok(xdp_attached(world)?.is_some())
            })?;
            xdp_attached(world)?
        }
        Contender::Stack => {
            if let Some(mode) = xdp_attached(world)? {
                bail!("an XDP program ({mode}) is still attached to the proxy's eth0");
            }
            None
        }
    };
    let before = Counters::read(world, contender, &spliced)?;
    let cpu_before = CpuTicks::read(cpu)?;
    let sent = world.within(Ns::Client, || generate(frames, cpu, seconds))??;
    let cpu_after = CpuTicks::read(cpu)?;
    std::thread::sleep(SETTLE);
    let after = Counters::read(world, contender, &spliced)?;
    spliced.check_running()?;
    spliced.terminate(Duration::from_secs(5))?;
    ensure!(sent.packets > 0, "the generator sent nothing");
    Ok(Sample {
        sent,
        handled: after.handled.saturating_sub(before.handled),
        answered: after.answered.saturating_sub(before.answered),
        cookies: after.cookies.saturating_sub(before.cookies),
        cpu: cpu_after.since(&cpu_before),
        mode,
    })
}

fn print_table(
    opts: &Options,
    cpu: usize,
    xdp: &[Sample],
    stack: &[Sample],
) -> crate::report::Part {
    let k = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| x / 1e3).collect() };
    let mode = match xdp.iter().find_map(|s| s.mode.as_deref()) {
        Some("xdp") => "native",
        Some("xdpgeneric") => "generic",
        Some(other) => other,
        None => "?",
    };
    let mut table = String::from(
        "| contender | handled by the receiver, kpps (median, min-max) | generator sent, kpps (median, min-max) | handled / sent | pinned core: busy, in softirq | softirq ns per packet (median, min-max) | receiver's reply |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (name, what, s) in [
        (
            format!("XDP drop (`spliced_xdp`, {mode}, deny {CLIENT_V4}/32)"),
            "`dropped_deny`",
            xdp,
        ),
        (
            format!("stack, no XDP (spliced listening on {PORT})"),
            "TCP `InSegs`",
            stack,
        ),
    ] {
        let handled = k(s.iter().map(Sample::handled_pps).collect());
        let sent = k(s.iter().map(Sample::sent_pps).collect());
        let share: Vec<f64> = s
            .iter()
            .map(|s| 100.0 * s.handled as f64 / s.sent.packets.max(1) as f64)
            .collect();
        let ns: Vec<f64> = s.iter().map(Sample::softirq_ns).collect();
        let busy: Vec<f64> = s.iter().map(|s| 100.0 * s.cpu.busy / s.cpu.total).collect();
        let softirq: Vec<f64> = s
            .iter()
            .map(|s| 100.0 * s.cpu.softirq / s.cpu.total)
            .collect();
        let handled_total: u64 = s.iter().map(|s| s.handled).sum();
        let reply = if s.iter().all(|s| s.answered == 0) {
            "none".to_string()
        } else {
            let answered: u64 = s.iter().map(|s| s.answered).sum();
            let cookies: u64 = s.iter().map(|s| s.cookies).sum();
            format!(
                "SYN-ACK to {:.1}% ({:.1}% SYN cookies)",
                100.0 * answered as f64 / handled_total.max(1) as f64,
                100.0 * cookies as f64 / handled_total.max(1) as f64
            )
        };
        table.push_str(&format!(
            "| {name} | {} ({what}) | {} | {:.1}% | {:.0}%, {:.0}% | {} | {reply} |\n",
            spread(&handled, 0),
            spread(&sent, 0),
            median(&share),
            median(&busy),
            median(&softirq),
            spread(&ns, 0),
        ));
    }
    let xdp_pps: Vec<f64> = xdp.iter().map(Sample::handled_pps).collect();
    let stack_pps: Vec<f64> = stack.iter().map(Sample::handled_pps).collect();
    let xdp_ns = median(&xdp.iter().map(Sample::softirq_ns).collect::<Vec<_>>());
    let stack_ns = median(&stack.iter().map(Sample::softirq_ns).collect::<Vec<_>>());
    let per_round: Vec<f64> = xdp_pps.iter().zip(&stack_pps).map(|(x, s)| x / s).collect();
    let text = format!(
        "\nXDP drop vs the stack: TCP SYNs {CLIENT_V4} -> {PROXY_V4}:{PORT}, each a new flow, \
         {} rounds of {:.1} s per contender, kernel {}, {} CPUs; generator pinned to CPU {cpu}.\n\
         On veth the receiver runs in softirq on the sending CPU: every figure is one core doing \
         the sending and the receiving.\n\n{table}\n\
         XDP-drop pps / stack pps: {:.2}x (ratio of medians; per round {})\n\n\
         The receiving side alone (softirq time of CPU {cpu} per packet, sampled at the \
         scheduler tick, so approximate): XDP drop {:.0} ns, stack {:.0} ns per SYN, {:.1}x; a \
         core doing nothing else would then drop about {:.0} kpps with XDP and handle about \
         {:.0} kpps in the stack.\n",
        opts.rounds,
        opts.seconds.as_secs_f64(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(0),
        median(&xdp_pps) / median(&stack_pps),
        spread(&per_round, 2),
        xdp_ns,
        stack_ns,
        stack_ns / xdp_ns,
        1e6 / xdp_ns,
        1e6 / stack_ns,
    );
    println!("{text}");
    crate::report::Part {
        heading: "XDP: packets per second dropped on one core, next to the stack".into(),
        markdown: text,
        panels: vec![crate::report::Panel {
            title: "SYNs handled on one core".into(),
            unit: "kpps".into(),
            lower_is_better: false,
            bars: vec![
                ("XDP drop (spliced_xdp)".into(), median(&xdp_pps) / 1000.0),
                ("the stack, no XDP".into(), median(&stack_pps) / 1000.0),
            ],
        }],
        checks: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

/// The receiver's counters at one moment.
struct Counters {
    handled: u64,
    answered: u64,
    cookies: u64,
}

impl Counters {
    fn read(world: &World, contender: Contender, spliced: &Spliced) -> Result<Counters> {
        match contender {
            Contender::XdpDrop => Ok(Counters {
                handled: xdp_counter(spliced, "dropped_deny")?,
                answered: 0,
                cookies: 0,
            }),
            Contender::Stack => {
                let (snmp, netstat) =
                    world.within(Ns::Proxy, || -> Result<(String, String)> {
                        // thread-self: the namespace this thread entered, not the process's.
                        Ok((
                            std::fs::read_to_string("/proc/thread-self/net/snmp")?,
                            std::fs::read_to_string("/proc/thread-self/net/netstat")?,
                        ))
                    })??;
                let mut all = proc_net_counters(&snmp);
                all.extend(proc_net_counters(&netstat));
                let get = |name: &str| -> Result<u64> {
                    all.get(name)
                        .copied()
                        .with_context(|| format!("no {name} in the proxy's /proc/net counters"))
                };
                Ok(Counters {
                    handled: get("TcpInSegs")?,
                    answered: get("TcpOutSegs")?,
                    cookies: get("TcpExtSyncookiesSent")?,
                })
            }
        }
    }
}

/// Parses `/proc/net/snmp` or `/proc/net/netstat`: pairs of lines `Prefix: names...` and
/// `Prefix: values...`, into `PrefixName` -> value (the names `nstat` uses).
pub(crate) fn proc_net_counters(text: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((prefix, names)), Some((_, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = value.parse::<u64>() {
                out.insert(format!("{prefix}{name}"), v);
            }
        }
    }
    out
}

/// One of the XDP filter's counters, from spliced's metrics endpoint.
fn xdp_counter(spliced: &Spliced, name: &str) -> Result<u64> {
    spliced
        .metrics()?
        .count("spliced_xdp_packets_total", &[("outcome", name)])
}

/// How an XDP program is attached to the proxy's eth0 (`xdp`, `xdpgeneric`), if one is.
fn xdp_attached(world: &World) -> Result<Option<String>> {
    let out = world
        .command(Ns::Proxy, "ip")
        .args(["-d", "link", "show", "dev", IFACE])
        .output()
        .context("starting ip link show")?;
    ensure!(
        out.status.success(),
        "ip link show {IFACE}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().find_map(|w| {
        w.strip_prefix("prog/")
            .filter(|m| m.starts_with("xdp"))
            .map(str::to_owned)
    }))
}

/// CPU time of one CPU from `/proc/stat`, in seconds.
struct CpuTicks {
    total: f64,
    idle: f64,
    softirq: f64,
}

/// CPU seconds one CPU spent over a sample.
struct CpuDelta {
    total: f64,
    busy: f64,
    softirq: f64,
}

impl CpuTicks {
    fn read(cpu: usize) -> Result<CpuTicks> {
        let v = crate::bench::proc_stat(&format!("cpu{cpu}"))?;
        // user nice system idle iowait irq softirq steal
        let ticks = crate::bench::clock_ticks();
        Ok(CpuTicks {
            total: v[..8].iter().sum::<f64>() / ticks,
            idle: (v[3] + v[4]) / ticks,
            softirq: v[6] / ticks,
        })
    }

    fn since(&self, before: &CpuTicks) -> CpuDelta {
        let total = (self.total - before.total).max(f64::MIN_POSITIVE);
        CpuDelta {
            total,
            busy: total - (self.idle - before.idle),
            softirq: self.softirq - before.softirq,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------------------------------

/// The CPU the generator is pinned to: the last one this process may run on.
fn generator_cpu() -> Result<usize> {
    let allowed = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    (0..CpuSet::count())
        .rev()
        .find(|&c| allowed.is_set(c).unwrap_or(false))
        .context("no CPU in this process's affinity mask")
}

/// Every SYN frame the generator cycles through, back to back, all of one length.
struct Frames {
    bytes: Vec<u8>,
    len: usize,
    dst_mac: [u8; 6],
}

impl Frames {
    /// One frame per source port 1024..=65535: that many distinct flows before one repeats.
    fn new(dst_mac: [u8; 6], src_mac: [u8; 6]) -> Result<Frames> {
        let IpAddr::V4(src) = CLIENT_V4 else {
            bail!("{CLIENT_V4} is not IPv4");
        };
        let IpAddr::V4(dst) = PROXY_V4 else {
            bail!("{PROXY_V4} is not IPv4");
        };
        let count = usize::from(u16::MAX - packets::SPORT_MIN) + 1;
        let mut bytes = Vec::new();
        let mut len = 0;
        let mut seq: u32 = 0x2545_f491;
        for i in 0..count {
            // xorshift32: a different initial sequence number for every flow.
            seq ^= seq << 13;
            seq ^= seq >> 17;
            seq ^= seq << 5;
            let sport = packets::sport_for(packets::SPORT_MIN, i as u64);
            let frame = packets::ethernet(
                dst_mac,
                src_mac,
                None,
                ETHERTYPE_IPV4,
                &packets::syn_v4(src, dst, sport, PORT, seq),
            );
            len = frame.len();
            bytes.extend_from_slice(&frame);
        }
        ensure!(
            len > 0 && bytes.len() == len * count,
            "frames of unequal length"
        );
        Ok(Frames {
            bytes,
            len,
            dst_mac,
        })
    }

    fn count(&self) -> usize {
        self.bytes.len() / self.len
    }
}

/// Sends `frames` round and round out of the calling thread's eth0 for `duration` (at most
/// [`MAX_PACKETS`]), pinned to `cpu`. Call it inside the client namespace.
fn generate(frames: &Frames, cpu: usize, duration: Duration) -> Result<Sent> {
    let mut set = CpuSet::new();
    set.set(cpu).context("CPU number")?;
    sched_setaffinity(Pid::from_raw(0), &set)
        .with_context(|| format!("pinning the generator to CPU {cpu}"))?;
    let ifindex = nix::net::if_::if_nametoindex(IFACE)
        .with_context(|| format!("looking up {IFACE} in the client namespace"))?;
    let fd: OwnedFd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating an AF_PACKET socket")?;
    // Straight to the driver: no qdisc (veth has none by default anyway) and no packet taps.
    packets::set_int_option(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)
        .context("setting PACKET_QDISC_BYPASS")?;

    // SAFETY: `sockaddr_ll` is a C structure of integers and byte arrays; all zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as libc::c_ushort;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    addr.sll_ifindex = i32::try_from(ifindex)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frames.dst_mac);
    let addr_len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>())?;

    let mut iovecs: Vec<libc::iovec> = frames
        .bytes
        .chunks_exact(frames.len)
        .map(|f| libc::iovec {
            // The kernel only reads from it (a send).
            iov_base: f.as_ptr().cast_mut().cast(),
            iov_len: f.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: `mmsghdr` is a C structure of integers and pointers; all zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = std::ptr::from_mut(&mut addr).cast();
            h.msg_hdr.msg_namelen = addr_len;
            h.msg_hdr.msg_iov = std::ptr::from_mut(iov);
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let count = frames.count();
    ensure!(headers.len() == count && count > 0, "no frames");

    let started = Instant::now();
    let deadline = started + duration;
    let mut sent: u64 = 0;
    let mut retries: u64 = 0;
    let mut at = 0usize;
    // Every turn sends at least one frame or meets a transient error; the clock and
    // MAX_PACKETS end it.
    while sent < MAX_PACKETS && Instant::now() < deadline {
        let batch = BATCH.min(count - at);
        let Some(slice) = headers.get_mut(at..at + batch) else {
            bail!("frame index {at} out of range");
        };
        // SAFETY: `slice` holds `batch` initialised `mmsghdr`s, each pointing to a live
        // `iovec` (in `iovecs`) over a live frame (in `frames`) and to `addr`, all of which
        // outlive the call; the kernel reads them and writes only each `msg_len`.
        let n = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                slice.as_mut_ptr(),
                libc::c_uint::try_from(batch)?,
                libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(n) => {
                sent += n as u64;
                at = (at + n) % count;
            }
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // Queues full: let the softirq thread (same CPU) catch up.
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {
                        retries += 1;
                        std::thread::yield_now();
                    }
                    _ => return Err(e).context("sendmmsg on the AF_PACKET socket"),
                }
            }
        }
    }
    Ok(Sent {
        packets: sent,
        seconds: started.elapsed().as_secs_f64(),
        retries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_counters() {
        let text = "Tcp: RtoAlgorithm InSegs OutSegs\nTcp: 1 42 7\n\
                    Udp: InDatagrams\nUdp: 3\n";
        let all = proc_net_counters(text);
        assert_eq!(all.get("TcpInSegs"), Some(&42));
        assert_eq!(all.get("TcpOutSegs"), Some(&7));
        assert_eq!(all.get("UdpInDatagrams"), Some(&3));
    }

    #[test]
    fn frames_are_distinct_flows() -> Result<()> {
        let f = Frames::new([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])?;
        assert_eq!(f.count(), 64512);
        assert_eq!(f.len, 14 + 20 + 24);
        let sport = |i: usize| {
            let at = i * f.len + 14 + 20;
            u16::from_be_bytes([f.bytes[at], f.bytes[at + 1]])
        };
        assert_eq!(sport(0), 1024);
        assert_eq!(sport(f.count() - 1), 65535);
        Ok(())
    }
}
