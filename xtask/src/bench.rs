//! `cargo xtask bench`: throughput and CPU cost per GiB of each forwarding engine next to a
//! direct connection, HAProxy and nginx, measured side by side in one run.
//!
//! The proxies ([`crate::proxies`]) all do the same job in the proxy namespace: route on the
//! ClientHello's server name to the IPv6 backend and send it a PROXY header, which the backend
//! here checks and skips. The machines this runs on are noisy, so contenders are interleaved
//! round by round (A B C A B C ...), every figure is a median with its min-max, and the table
//! also gives ratios to the direct path and to HAProxy measured in the same run. A transfer
//! is: connect, send a real ClientHello, then push N bytes each way at once until both sides
//! saw end of stream; both ends count what they received.
//!
//! A second part (`bench_xdp`) follows in the same run: TCP SYNs per second the XDP edge
//! filter drops on one core next to those the kernel's stack handles there without it.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use spliced_tests::{BACKEND_V4, BACKEND_V6, CLIENT_V4, Ns, World, raw};

use crate::proxies::{self, Running};

/// The bench backend's port, on its IPv6 address (for the proxies) and its IPv4 one (direct).
pub(crate) const BACKEND_PORT: u16 = 9000;
const BUF: usize = 256 * 1024;

/// Benchmark options.
pub struct Options {
    /// Bytes each way per transfer.
    pub bytes: u64,
    /// Rounds; each round runs every contender once.
    pub rounds: usize,
    /// Only the contenders whose name contains this (for profiling one of them alone).
    pub contender: Option<String>,
}

/// A row of the table: the direct path, or one of the proxies.
enum Contender {
    Direct,
    Proxy(Running),
}

impl Contender {
    fn name(&self) -> String {
        match self {
            Contender::Direct => "direct (kernel routing, no proxy)".into(),
            Contender::Proxy(p) => p.name.clone(),
        }
    }
}

struct Sample {
    seconds: f64,
    proxy_cpu: f64,
    system_cpu: f64,
    /// Packets the proxy namespace sent on its two links (data and acknowledgements, both
    /// directions; a TSO/GSO packet counts once, as veth carries it whole).
    packets: u64,
    /// Segments without data (acknowledgements, window updates) the proxy's own TCP sent:
    /// what its sockets add to the stream's packets. Zero on the direct path.
    pure_acks: u64,
    /// Segments the proxy's own TCP sent again.
    retransmitted: u64,
}

/// Runs the benchmark with the given `spliced` binary and prints a Markdown table.
///
/// A transfer that does not deliver exactly what was sent, either way, is left out of the
/// figures and listed under the table; the run goes on (a proxy that loses or repeats bytes
/// now and then still has a speed worth knowing, and the list says how often it did).
pub fn run(bin: &Path, opts: &Options) -> Result<crate::report::Part> {
    // SAFETY: set before any thread starts; the harness reads it to find the binary.
    unsafe { std::env::set_var("SPLICED_BIN", bin) };
    let world = World::new()?;
    world.route_direct()?;
    let sink = start_backend(&world)?;
    let proxies = proxies::start(&world, SocketAddr::new(BACKEND_V6, BACKEND_PORT))?;
    let contenders: Vec<Contender> = std::iter::once(Contender::Direct)
        .chain(proxies.running.iter().cloned().map(Contender::Proxy))
        .filter(|c| {
            opts.contender
                .as_ref()
                .is_none_or(|f| c.name().contains(f.as_str()))
        })
        .collect();
    ensure!(
        !contenders.is_empty(),
        "no contender's name contains {:?}",
        opts.contender
    );
    let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
    let mut failures: Vec<Vec<String>> = contenders.iter().map(|_| Vec::new()).collect();
    let gib_each_way = opts.bytes as f64 / f64::from(1u32 << 30);
    eprintln!(
        "bench: {} rounds x {} contenders, {:.2} GiB each way per transfer",
        opts.rounds,
        contenders.len(),
        gib_each_way
    );
    let width = contenders.iter().map(|c| c.name().len()).max().unwrap_or(0);
    for round in 0..opts.rounds {
        for (i, c) in contenders.iter().enumerate() {
            let (hello, target, header) = match c {
                Contender::Proxy(p) => (raw::simple_hello(&p.sni), p.target, p.proxy_protocol),
                Contender::Direct => (
                    raw::simple_hello("direct.bench"),
                    SocketAddr::new(BACKEND_V4, BACKEND_PORT),
                    0,
                ),
            };
            let proxy_cpu = || match c {
                Contender::Proxy(p) => p.cpu_seconds(),
                Contender::Direct => Ok(0.0),
            };
            let mark = sink.mark();
            let before = (
                proxy_cpu()?,
                system_cpu()?,
                proxy_packets(&world)?,
                proxy_tcp_segments(&world)?,
            );
            // A transfer cut short (a reset, a timeout) is a failure of that contender, listed
            // under the table like a count that does not match; the run goes on.
            let done = match transfer(&world, target, &hello, opts.bytes) {
                Ok(done) => done,
                Err(e) => {
                    let what = format!("{e:#}");
                    eprintln!("  round {round} {:<width$} FAILED: {what}", c.name());
                    failures[i].push(format!("round {round}: {what}"));
                    continue;
                }
            };
            let after = (
                proxy_cpu()?,
                system_cpu()?,
                proxy_packets(&world)?,
                proxy_tcp_segments(&world)?,
            );
            let mut problems = sink.problems_since(&mark, header);
            if done.received != opts.bytes {
                problems.push(format!(
                    "the client received {} bytes, expected {}",
                    done.received, opts.bytes
                ));
            }
            if !problems.is_empty() {
                let what = problems.join("; ");
                eprintln!("  round {round} {:<width$} FAILED: {what}", c.name());
                failures[i].push(format!("round {round}: {what}"));
                continue;
            }
            let s = Sample {
                seconds: done.seconds,
                proxy_cpu: after.0 - before.0,
                system_cpu: after.1 - before.1,
                packets: after.2.saturating_sub(before.2),
                pure_acks: after.3.0.saturating_sub(before.3.0),
                retransmitted: after.3.1.saturating_sub(before.3.1),
            };
            eprintln!(
                "  round {round} {:<width$} {:>8.1} MiB/s each way, proxy {:.3} s, system {:.3} s",
                c.name(),
                opts.bytes as f64 / done.seconds / f64::from(1u32 << 20),
                s.proxy_cpu,
                s.system_cpu
            );
            samples[i].push(s);
        }
    }
    let skipped = proxies.skipped.clone();
    drop(proxies);
    // Both directions moved `bytes`: CPU per GiB counts every byte forwarded.
    let gib_moved = 2.0 * gib_each_way;
    let mib = f64::from(1u32 << 20);
    let tput = |s: &[Sample]| -> Vec<f64> {
        s.iter()
            .map(|s| opts.bytes as f64 / s.seconds / mib)
            .collect()
    };
    let proxy = |s: &[Sample]| -> Vec<f64> { s.iter().map(|s| s.proxy_cpu / gib_moved).collect() };
    let system =
        |s: &[Sample]| -> Vec<f64> { s.iter().map(|s| s.system_cpu / gib_moved).collect() };
    // Packets per MiB moved (both directions): how finely the proxy cuts the stream. Every
    // packet costs a trip through both stacks, so this explains system CPU that the proxy's
    // own CPU does not show.
    let mib_moved = 2.0 * opts.bytes as f64 / mib;
    let packets =
        |s: &[Sample]| -> Vec<f64> { s.iter().map(|s| s.packets as f64 / mib_moved).collect() };
    let acks =
        |s: &[Sample]| -> Vec<f64> { s.iter().map(|s| s.pure_acks as f64 / mib_moved).collect() };
    let again = |s: &[Sample]| -> Vec<f64> {
        s.iter()
            .map(|s| s.retransmitted as f64 / mib_moved)
            .collect()
    };
    // The medians ratios are taken against, measured in the same rounds: the direct path's,
    // and the baseline HAProxy's when it runs.
    let direct = contenders
        .iter()
        .position(|c| matches!(c, Contender::Direct))
        .map_or((f64::NAN, f64::NAN), |i| {
            (median(&tput(&samples[i])), median(&system(&samples[i])))
        });
    let haproxy = contenders
        .iter()
        .position(|c| matches!(c, Contender::Proxy(p) if p.baseline))
        .map(|i| {
            (
                median(&tput(&samples[i])),
                median(&proxy(&samples[i])),
                median(&system(&samples[i])),
            )
        });
    let ratio = |value: f64, base: Option<f64>| match base {
        Some(base) if value.is_finite() && base.is_finite() && base > 0.0 => {
            format!("{:.2}x", value / base)
        }
        _ => "-".to_string(),
    };
    let mut table = String::from(
        "| contender | throughput each way, MiB/s (median, min-max) | vs direct | vs HAProxy \
         | proxy CPU s/GiB (median, min-max) | vs HAProxy \
         | system CPU s/GiB (median, min-max) | vs direct | vs HAProxy \
         | packets sent by the proxy host per MiB (median, min-max) \
         | pure ACKs from the proxy's sockets per MiB | segments they retransmitted per MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (c, s) in contenders.iter().zip(&samples) {
        let (tput, proxy, system, packets, acks, again) =
            (tput(s), proxy(s), system(s), packets(s), acks(s), again(s));
        let (proxy_cell, proxy_ratio) = match c {
            Contender::Direct => ("-".to_string(), "-".to_string()),
            Contender::Proxy(_) => (cell(&proxy, 3), ratio(median(&proxy), haproxy.map(|h| h.1))),
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c.name(),
            cell(&tput, 0),
            ratio(median(&tput), Some(direct.0)),
            ratio(median(&tput), haproxy.map(|h| h.0)),
            proxy_cell,
            proxy_ratio,
            cell(&system, 3),
            ratio(median(&system), Some(direct.1)),
            ratio(median(&system), haproxy.map(|h| h.2)),
            cell(&packets, 1),
            cell(&acks, 1),
            cell(&again, 1),
        ));
    }
    let mut notes = String::from(
        "Every proxy routes on the ClientHello's server name and announces the client to the \
         backend with a PROXY header (v2; nginx's stream module can only send v1), and \
         writes one access-log line per connection to a file. \"vs HAProxy\" compares with \
         HAProxy splicing every connection.",
    );
    notes.push_str(&format!(
        " The packet engine's contender hands a connection to the kernel once it moved {} KiB \
         (`packet.after`), as the README says to run it; the crossover part below has other \
         values.",
        proxies::PACKET_AFTER >> 10
    ));
    for why in &skipped {
        notes.push_str(&format!("\nSkipped {why}."));
    }
    let mut failed = String::new();
    for (c, f) in contenders.iter().zip(&failures) {
        if !f.is_empty() {
            failed.push_str(&format!(
                "\n- {}: {} of {} transfers, left out of its figures. {}.",
                c.name(),
                f.len(),
                opts.rounds,
                f.join(". ")
            ));
        }
    }
    if !failed.is_empty() {
        failed.insert_str(0, "\nTransfers that did not deliver exactly what was sent:");
    }
    let text = format!(
        "{} rounds, {:.2} GiB each way per transfer, kernel {}, {} CPUs\n\n{notes}\n\n{table}{failed}",
        opts.rounds,
        gib_each_way,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(0)
    );
    println!("\n{text}");
    let bars = |f: &dyn Fn(&[Sample]) -> Vec<f64>, with_direct: bool| {
        contenders
            .iter()
            .zip(&samples)
            .filter(|(c, _)| with_direct || !matches!(c, Contender::Direct))
            .map(|(c, s)| (c.name(), median(&f(s))))
            .collect::<Vec<_>>()
    };
    let panel = |title: &str, unit: &str, lower: bool, bars| crate::report::Panel {
        title: title.into(),
        unit: unit.into(),
        lower_is_better: lower,
        bars,
    };
    // The bar in issue 6: each spliced engine's median against HAProxy's and the direct path's.
    let spliced: Vec<(String, &[Sample])> = contenders
        .iter()
        .zip(&samples)
        .filter(|(c, _)| proxies::is_spliced(&c.name()))
        .map(|(c, s)| (c.name(), s.as_slice()))
        .collect();
    let against = |f: &dyn Fn(&[Sample]) -> Vec<f64>, base: f64| {
        spliced
            .iter()
            .map(|(name, s)| (name.clone(), median(&f(s)) / base))
            .collect::<Vec<_>>()
    };
    let mut checks = Vec::new();
    // The bar compares every engine with the full field; a run of some contenders checks none.
    if let (Some((h_tput, h_proxy, h_system)), None) = (haproxy, &opts.contender) {
        use crate::report::check;
        checks.extend(check(
            "throughput >= 1.0x HAProxy",
            against(&tput, h_tput),
            true,
            1.0,
            2,
            "x",
        ));
        checks.extend(check(
            "throughput >= 0.8x the direct path",
            against(&tput, direct.0),
            true,
            0.8,
            2,
            "x",
        ));
        checks.extend(check(
            "proxy CPU per GiB <= 0.1x HAProxy",
            against(&proxy, h_proxy),
            false,
            0.1,
            2,
            "x",
        ));
        checks.extend(check(
            "whole-system CPU per GiB <= 1.0x HAProxy",
            against(&system, h_system),
            false,
            1.0,
            2,
            "x",
        ));
        // Issue 15's bar, for the packet engine alone.
        let packet = |f: &dyn Fn(&[Sample]) -> Vec<f64>, base: f64| {
            spliced
                .iter()
                .filter(|(name, _)| name == proxies::PACKET_NAME)
                .map(|(name, s)| (name.clone(), median(&f(s)) / base))
                .collect::<Vec<_>>()
        };
        for (bar, values, higher, limit) in [
            (
                "packet: throughput >= 0.85x the direct path",
                packet(&tput, direct.0),
                true,
                0.85,
            ),
            (
                "packet: throughput >= 1.5x HAProxy",
                packet(&tput, h_tput),
                true,
                1.5,
            ),
            (
                "packet: whole-system CPU per GiB <= 1.2x the direct path",
                packet(&system, direct.1),
                false,
                1.2,
            ),
            (
                "packet: proxy CPU per GiB <= 0.02x HAProxy",
                packet(&proxy, h_proxy),
                false,
                0.02,
            ),
        ] {
            checks.extend(check(bar, values, higher, limit, 2, "x"));
        }
    }
    Ok(crate::report::Part {
        heading: "Bulk throughput and CPU per GiB".into(),
        markdown: text,
        checks,
        panels: vec![
            panel("Throughput each way", "MiB/s", false, bars(&tput, true)),
            panel(
                "Proxy process CPU per GiB",
                "s/GiB",
                true,
                bars(&proxy, false),
            ),
            panel(
                "Whole-system CPU per GiB",
                "s/GiB",
                true,
                bars(&system, true),
            ),
        ],
    })
}

/// A table cell of samples: median and min-max, or "-" when there are none.
pub(crate) fn cell(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        "-".to_string()
    } else {
        spread(v, decimals)
    }
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn spread(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.d$} ({:.d$}-{:.d$})", median(v), min, max, d = decimals)
}

pub(crate) fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// The tick counts on the `/proc/stat` line labelled `label` ("cpu" for all, "cpu1", ...):
/// user nice system idle iowait irq softirq steal ...
pub(crate) fn proc_stat(label: &str) -> Result<Vec<f64>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label))
        .with_context(|| format!("no {label} in /proc/stat"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    ensure!(v.len() >= 8, "unexpected /proc/stat: {line}");
    Ok(v)
}

/// Packets the proxy namespace has sent on its links to the client and to the backend (the
/// direct path is routed through the same namespace and links).
fn proxy_packets(world: &World) -> Result<u64> {
    let mut total = 0;
    for link in ["eth0", "eth1"] {
        let out = Command::new("ip")
            .args(["netns", "exec", world.name(Ns::Proxy), "cat"])
            .arg(format!("/sys/class/net/{link}/statistics/tx_packets"))
            .output()
            .context("running ip netns exec")?;
        ensure!(
            out.status.success(),
            "reading the tx packets of the proxy's {link}"
        );
        total += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .with_context(|| format!("the tx packets of the proxy's {link}"))?;
    }
    Ok(total)
}

/// The proxy namespace's own TCP: segments sent without data (acknowledgements, window updates)
/// and segments retransmitted, counted in segments (a TSO packet as the segments it becomes).
/// `OutSegs` counts new data and dataless segments only, never a retransmission
/// (`__tcp_transmit_skb` in `net/ipv4/tcp_output.c`), so the dataless ones are `OutSegs` less
/// `TCPOrigDataSent`.
fn proxy_tcp_segments(world: &World) -> Result<(u64, u64)> {
    let (snmp, netstat) = world.within(Ns::Proxy, || -> Result<(String, String)> {
        // thread-self: the namespace this thread entered, not the process's.
        Ok((
            std::fs::read_to_string("/proc/thread-self/net/snmp")?,
            std::fs::read_to_string("/proc/thread-self/net/netstat")?,
        ))
    })??;
    let mut all = crate::bench_xdp::proc_net_counters(&snmp);
    all.extend(crate::bench_xdp::proc_net_counters(&netstat));
    let get = |name: &str| -> Result<u64> {
        all.get(name)
            .copied()
            .with_context(|| format!("no {name} in the proxy's /proc/net counters"))
    };
    Ok((
        get("TcpOutSegs")?.saturating_sub(get("TcpExtTCPOrigDataSent")?),
        get("TcpRetransSegs")?,
    ))
}

/// Non-idle CPU seconds of the whole machine, softirq included.
fn system_cpu() -> Result<f64> {
    let v = proc_stat("cpu")?;
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Ok(busy / clock_ticks())
}

/// The sink/source backend, on [`BACKEND_PORT`] of the backend's IPv6 address (what the proxies
/// connect to) and of its IPv4 one (the direct path). Per connection: an optional PROXY v1 or
/// v2 header, which must announce the client's address; the hello; 8 bytes (big-endian)
/// saying how many bytes to send and to expect; then it sends that many while reading until
/// end of stream, checks the count it read, and only then ends its side, so whatever went
/// wrong is on record before the client sees the end of stream.
pub(crate) struct Backend {
    shared: Arc<Shared>,
    _threads: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    /// Connections so far that came with no PROXY header, with v1, with v2.
    headers: [AtomicU64; 3],
    /// What went wrong on connections so far, oldest first.
    problems: Mutex<Vec<String>>,
}

/// Where the backend's records stood before a transfer (see [`Backend::mark`]).
pub(crate) struct Mark {
    headers: [u64; 3],
    problems: usize,
}

impl Shared {
    fn problems(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A panicking connection thread leaves the list as it was: still usable.
        self.problems.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Backend {
    /// Where the records stand now, to check the next connection with
    /// [`Backend::problems_since`].
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            headers: [0, 1, 2].map(|i| self.shared.headers[i].load(Ordering::SeqCst)),
            problems: self.shared.problems().len(),
        }
    }

    /// What went wrong since `mark`, which should have seen exactly one connection, with PROXY
    /// `version` (0: none), that moved every byte both ways. Empty if all went well.
    pub(crate) fn problems_since(&self, mark: &Mark, version: u8) -> Vec<String> {
        let mut out: Vec<String> = self
            .shared
            .problems()
            .iter()
            .skip(mark.problems)
            .map(|p| format!("the backend saw: {p}"))
            .collect();
        let now = self.mark().headers;
        let mut expected = mark.headers;
        expected[usize::from(version.min(2))] += 1;
        if now != expected {
            out.push(format!(
                "expected one backend connection with {}, got (none, v1, v2) = {:?}",
                match version {
                    0 => "no PROXY header".to_string(),
                    v => format!("PROXY v{v}"),
                },
                [0, 1, 2].map(|i| now[i] - mark.headers[i])
            ));
        }
        out
    }
}

pub(crate) fn start_backend(world: &World) -> Result<Backend> {
    let shared = Arc::new(Shared::default());
    let mut threads = Vec::new();
    for ip in [BACKEND_V6, BACKEND_V4] {
        let listener = world
            .within(Ns::Backend, move || {
                TcpListener::bind(SocketAddr::new(ip, BACKEND_PORT))
            })?
            .with_context(|| format!("binding the bench backend on {ip}"))?;
        let shared = Arc::clone(&shared);
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    if let Err(e) = serve(&stream, &shared) {
                        shared.problems().push(format!("{e:#}"));
                    }
                    // Only now may the client see the end of stream.
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                });
            }
        }));
    }
    Ok(Backend {
        shared,
        _threads: threads,
    })
}

fn serve(stream: &TcpStream, shared: &Shared) -> Result<()> {
    let mut reader = stream;
    let mut header = [0u8; 5];
    reader.read_exact(&mut header)?;
    let version = if header == raw::PROXY_V2_SIGNATURE[..5] {
        // Signature, version and command, family, length; then the addresses and any TLVs.
        let mut fixed = header.to_vec();
        fixed.resize(16, 0);
        reader.read_exact(&mut fixed[5..])?;
        let len = 16 + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        fixed.resize(len, 0);
        reader.read_exact(&mut fixed[16..])?;
        let v2 = raw::parse_proxy_v2_inet(&fixed)?;
        ensure!(
            v2.ver_cmd == 0x21 && v2.family == 0x11 && v2.source.ip() == CLIENT_V4,
            "PROXY v2 header does not announce a TCP/IPv4 client at {CLIENT_V4}: {v2:?}"
        );
        reader.read_exact(&mut header)?;
        2
    } else if &header == b"PROXY" {
        // A text line of at most 107 bytes, CRLF included.
        let mut line = header.to_vec();
        while !line.ends_with(b"\r\n") {
            ensure!(line.len() < 107, "PROXY v1 line without CRLF in 107 bytes");
            let mut byte = [0u8; 1];
            reader.read_exact(&mut byte)?;
            line.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&line);
        ensure!(
            text.starts_with(&format!("PROXY TCP4 {CLIENT_V4} ")),
            "PROXY v1 line does not announce a TCP/IPv4 client at {CLIENT_V4}: {text:?}"
        );
        reader.read_exact(&mut header)?;
        1
    } else {
        0
    };
    // Skip the hello: its record header says how long it is.
    ensure!(
        header[0] == 22,
        "expected a TLS handshake record, got {header:02x?}"
    );
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let mut hello = vec![0u8; len];
    reader.read_exact(&mut hello)?;
    shared.headers[version].fetch_add(1, Ordering::SeqCst);
    let mut count = [0u8; 8];
    reader.read_exact(&mut count)?;
    let bytes = u64::from_be_bytes(count);
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || send(&mut writer, bytes));
    let received = drain(&mut reader);
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?
        .context("sending")?;
    let received = received.context("receiving")?;
    ensure!(
        received == bytes,
        "received {received} bytes from the client, expected {bytes}"
    );
    Ok(())
}

fn send(mut out: impl Write, mut bytes: u64) -> Result<()> {
    let buf = vec![0x5au8; BUF];
    while bytes > 0 {
        let n = usize::try_from(bytes.min(BUF as u64))?;
        out.write_all(&buf[..n])?;
        bytes -= n as u64;
    }
    Ok(())
}

fn drain(mut input: impl Read) -> Result<u64> {
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        match input.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

/// How one transfer went, as the client saw it.
struct Done {
    /// From connect to the end of stream, with the client's own sending done.
    seconds: f64,
    /// Bytes the client received.
    received: u64,
}

/// One transfer from the client namespace: `bytes` each way.
fn transfer(world: &World, target: SocketAddr, hello: &[u8], bytes: u64) -> Result<Done> {
    let started = Instant::now();
    let mut stream = world
        .within(Ns::Client, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
        })?
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut first = hello.to_vec();
    first.extend_from_slice(&bytes.to_be_bytes());
    stream.write_all(&first)?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> Result<()> {
        send(&mut writer, bytes)?;
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let received = drain(&mut stream).context("the client's receiving")?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?
        .context("the client's sending")?;
    Ok(Done {
        seconds: started.elapsed().as_secs_f64(),
        received,
    })
}
