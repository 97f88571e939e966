//! Short connections per second and the latency a proxy adds (issue 6), for any set of
//! contenders already running: spliced's engines, HAProxy, nginx and the direct path.
//!
//! A connection is: connect, send a real ClientHello, read the backend's 64-byte answer, then
//! wait for the end of stream and close. The backend ([`start_responder`]) answers right after
//! the hello and closes first, so the client side closes second and keeps no TIME_WAIT socket:
//! ephemeral ports cannot run out however long the run. Latency runs from the start of
//! `connect` to the last byte of the answer.
//!
//! Like `bench`, contenders are interleaved round by round (A B C A B C ...); rates are medians
//! with their min-max over rounds, latency percentiles are taken over every connection of every
//! round.
//!
//! The same backend also serves `bench_idle`: a hello whose ALPN list carries [`IDLE_ALPN`] gets
//! no answer; the connection is held open until the client sends a byte or goes away.
use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::bench::{median, spread};
use anyhow::{Context as _, Result, bail};
use nix::{
    errno::Errno,
    sys::{
        socket::{
            AddressFamily, Backlog, Shutdown, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind,
            connect, listen, setsockopt, shutdown, socket, sockopt,
        },
        time::TimeVal,
    },
};
use spliced_tests::{CLIENT_V4, CLIENT_V4_B, Ns, World, raw};

/// A proxy (or the direct path) under test, already running.
pub(crate) struct Target {
    pub name: String,
    /// Where the client connects (in the client namespace's view), e.g. 192.0.2.1:443.
    pub addr: SocketAddr,
    /// The SNI name to put in the ClientHello.
    pub sni: String,
    /// PIDs of the proxy's processes (empty for the direct path), for memory.
    pub pids: Vec<u32>,
}

/// What the backend answers to each hello.
const RESPONSE: [u8; 64] = [0x5a; 64];
/// An ALPN protocol name that tells the backend to hold the connection instead of answering.
pub(crate) const IDLE_ALPN: &str = "x-spliced-bench-idle";
/// Client threads, each doing one connection after the other.
const CLIENT_THREADS: usize = 32;
/// Backend threads, each accepting and serving one connection at a time.
const WORKERS: usize = 64;
/// Bounds every connect, read and write of the client and the backend.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// A cap on connections per client thread per sample, should a sample's clock misbehave.
const MAX_PER_THREAD: usize = 2_000_000;
/// The backend gives up on a preface longer than this.
const MAX_PREFACE: usize = 64 * 1024;
/// How often the backend checks its held (idle) connections for the client's close signal.
const REAP_EVERY: Duration = Duration::from_millis(300);
/// The PROXY protocol v2 signature.
const PROXY_V2_SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// Connections the backend holds open for `bench_idle` (hello read, no answer).
pub(crate) static HELD: AtomicUsize = AtomicUsize::new(0);

/// The running backend; stops its threads and closes every socket when dropped.
pub(crate) struct Guard {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    threads: Vec<JoinHandle<()>>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Shutting down a listening socket wakes every thread blocked in accept() (EINVAL).
        let _ = shutdown(self.listener.as_raw_fd(), Shutdown::Both);
        // Bounded: a worker is either in accept (woken above) or serving one connection, whose
        // reads and writes time out after IO_TIMEOUT; the reaper sleeps REAP_EVERY.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut held = match self.held.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        HELD.fetch_sub(held.len(), Ordering::SeqCst);
        held.clear();
    }
}

/// Starts the backend in the backend namespace on `[::]:port`, dual-stack, so it answers on
/// `[2001:db8:1::10]:port` and, after `world.route_direct()`, on `198.51.100.10:port`.
///
/// For each connection it reads an optional PROXY header (v1 or v2) and one TLS record (the
/// hello), then answers 64 bytes and closes; or, when the hello offers [`IDLE_ALPN`], keeps the
/// connection open without answering until the client sends anything or closes.
pub(crate) fn start_responder(world: &World, port: u16) -> Result<Guard> {
    let listener = world
        .within(Ns::Backend, move || dual_stack_listener(port))?
        .with_context(|| format!("listening on [::]:{port} in the backend namespace"))?;
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::new(Mutex::new(Vec::new()));
    let mut guard = Guard {
        stop: Arc::clone(&stop),
        listener: Arc::clone(&listener),
        threads: Vec::new(),
        held: Arc::clone(&held),
    };
    for i in 0..WORKERS {
        let (listener, stop, held) = (Arc::clone(&listener), Arc::clone(&stop), Arc::clone(&held));
        let t = std::thread::Builder::new()
            .name(format!("responder-{i}"))
            .stack_size(128 * 1024)
            .spawn(move || accept_loop(&listener, &stop, &held))
            .context("starting a responder thread")?;
        // On an early return the guard's drop stops the threads started so far.
        guard.threads.push(t);
    }
    let (stop2, held2) = (Arc::clone(&stop), Arc::clone(&held));
    let reaper = std::thread::Builder::new()
        .name("responder-reaper".into())
        .spawn(move || reap_loop(&stop2, &held2))
        .context("starting the responder's reaper")?;
    guard.threads.push(reaper);
    Ok(guard)
}

fn dual_stack_listener(port: u16) -> io::Result<TcpListener> {
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    bind(fd.as_raw_fd(), &addr)?;
    listen(&fd, Backlog::new(4096)?)?;
    Ok(TcpListener::from(fd))
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, held: &Mutex<Vec<TcpStream>>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                // A client that misbehaves only loses its own connection.
                let _ = serve(stream, held);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Out of descriptors or memory for a moment: let the others drain, then retry.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve(mut stream: TcpStream, held: &Mutex<Vec<TcpStream>>) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let end = loop {
        match preface_len(&buf) {
            Ok(Some(end)) => break end,
            Ok(None) => {}
            Err(what) => return Err(io::Error::new(io::ErrorKind::InvalidData, what)),
        }
        if buf.len() > MAX_PREFACE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "preface too long",
            ));
        }
        match stream.read(&mut chunk)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let idle = buf[..end]
        .windows(IDLE_ALPN.len())
        .any(|w| w == IDLE_ALPN.as_bytes());
    if idle {
        stream.set_nonblocking(true)?;
        let mut held = match held.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        held.push(stream);
        HELD.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    stream.write_all(&RESPONSE)?;
    // Closing now (everything received was read, so this is a FIN, not a RST) makes the
    // backend the side that keeps TIME_WAIT, not the client or the proxy's ephemeral ports.
    Ok(())
}

/// Closes held connections whose client sent a byte (the close signal) or went away.
fn reap_loop(stop: &AtomicBool, held: &Mutex<Vec<TcpStream>>) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(REAP_EVERY);
        let mut held = match held.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let before = held.len();
        held.retain_mut(
            |s| matches!(s.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        );
        HELD.fetch_sub(before - held.len(), Ordering::SeqCst);
    }
}

/// The length of the PROXY header (if any) plus the first TLS record, once `buf` holds them
/// all; `None` while more is needed.
pub(crate) fn preface_len(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    let start = match buf.first() {
        None => return Ok(None),
        Some(0x0D) => {
            if buf.len() < 16 {
                return Ok(None);
            }
            if buf[..12] != PROXY_V2_SIG {
                return Err("bad PROXY v2 signature");
            }
            16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]))
        }
        Some(b'P') => {
            // PROXY v1: one line of at most 107 bytes.
            match buf.windows(2).take(107).position(|w| w == b"\r\n") {
                Some(i) => i + 2,
                None if buf.len() >= 107 => return Err("PROXY v1 line too long"),
                None => return Ok(None),
            }
        }
        Some(0x16) => 0,
        Some(_) => return Err("neither a PROXY header nor a TLS handshake record"),
    };
    let Some(header) = buf.get(start..start + 5) else {
        return Ok(None);
    };
    let end = start + 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
    Ok((buf.len() >= end).then_some(end))
}

/// Per-target results of [`run`].
pub(crate) struct ConnResult {
    pub name: String,
    /// Completed connections per second, one per round.
    pub rates: Vec<f64>,
    /// Latency percentiles over every completed connection, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Proxy CPU (user + system, all its processes) per completed connection, microseconds,
    /// one per round; empty without PIDs.
    pub cpu_us: Vec<f64>,
    pub completed: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// One client thread's tally.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    failed: u64,
    first_error: Option<String>,
}

/// Widens the client namespace's ephemeral port range and lets it reuse TIME_WAIT ports.
pub(crate) fn tune_client(world: &World) -> Result<()> {
    let out = world
        .command(Ns::Client, "sysctl")
        .args([
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1",
        ])
        .output()
        .context("starting sysctl in the client namespace")?;
    if !out.status.success() {
        bail!(
            "sysctl in the client namespace failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Measures every target for `per_sample` in each of `rounds` rounds, interleaved.
pub(crate) fn run(
    world: &World,
    targets: &[Target],
    rounds: usize,
    per_sample: Duration,
) -> Result<Vec<ConnResult>> {
    tune_client(world)?;
    let hellos: Vec<Vec<u8>> = targets.iter().map(|t| raw::simple_hello(&t.sni)).collect();
    eprintln!(
        "bench conns: {rounds} rounds x {} targets, {:.1} s each, {CLIENT_THREADS} client threads",
        targets.len(),
        per_sample.as_secs_f64()
    );
    // Check each path once, then a short unrecorded warm-up.
    for (t, hello) in targets.iter().zip(&hellos) {
        world
            .within(Ns::Client, || one_connection(CLIENT_V4, t.addr, hello))?
            .with_context(|| format!("a first connection to {} at {}", t.name, t.addr))?;
        sample(world, t.addr, hello, Duration::from_millis(200))?;
    }
    let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
    let mut rates: Vec<Vec<f64>> = targets.iter().map(|_| Vec::new()).collect();
    let mut cpu: Vec<Vec<f64>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (t, hello)) in targets.iter().zip(&hellos).enumerate() {
            let cpu_before = cpu_seconds(&t.pids);
            let (tally, seconds) = sample(world, t.addr, hello, per_sample)?;
            let cpu_after = cpu_seconds(&t.pids);
            let done = tally.latencies_us.len();
            let rate = done as f64 / seconds;
            let cpu_note = match (cpu_before, cpu_after) {
                (Some(b), Some(a)) if done > 0 && !t.pids.is_empty() => {
                    let us = (a - b) * 1e6 / done as f64;
                    cpu[i].push(us);
                    format!(", proxy CPU {us:.1} us/conn")
                }
                _ => String::new(),
            };
            eprintln!(
                "  round {round} {:<28} {rate:>9.0} conns/s, {} failed{cpu_note}",
                t.name, tally.failed
            );
            rates[i].push(rate);
            let all = &mut tallies[i];
            all.latencies_us.extend_from_slice(&tally.latencies_us);
            all.failed += tally.failed;
            if all.first_error.is_none() {
                all.first_error = tally.first_error;
            }
        }
    }
    Ok(targets
        .iter()
        .zip(tallies)
        .zip(rates.into_iter().zip(cpu))
        .map(|((t, mut tally), (rates, cpu_us))| {
            tally.latencies_us.sort_unstable();
            ConnResult {
                name: t.name.clone(),
                rates,
                p50_us: percentile(&tally.latencies_us, 0.50),
                p99_us: percentile(&tally.latencies_us, 0.99),
                cpu_us,
                completed: tally.latencies_us.len() as u64,
                failed: tally.failed,
                first_error: tally.first_error,
            }
        })
        .collect())
}

/// Closed-loop connections from `CLIENT_THREADS` threads for `length`; returns every thread's
/// tally merged and the seconds from start to the last thread's end.
fn sample(world: &World, addr: SocketAddr, hello: &[u8], length: Duration) -> Result<(Tally, f64)> {
    let outcomes = world.within(Ns::Client, || {
        std::thread::scope(|s| {
            let started = Instant::now();
            let deadline = started + length;
            let mut handles = Vec::new();
            let mut spawn_error = None;
            for k in 0..CLIENT_THREADS {
                let spawned = std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, move || client_loop(k, addr, hello, deadline));
                match spawned {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        spawn_error = Some(e);
                        break;
                    }
                }
            }
            let tallies: Vec<Option<Tally>> = handles.into_iter().map(|h| h.join().ok()).collect();
            (tallies, started.elapsed().as_secs_f64(), spawn_error)
        })
    })?;
    let (tallies, seconds, spawn_error) = outcomes;
    if let Some(e) = spawn_error {
        return Err(e).context("starting client threads");
    }
    let mut all = Tally::default();
    for t in tallies {
        let t = t.context("a client thread panicked")?;
        all.latencies_us.extend_from_slice(&t.latencies_us);
        all.failed += t.failed;
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
    }
    Ok((all, seconds))
}

fn client_loop(k: usize, addr: SocketAddr, hello: &[u8], deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    for n in 0..MAX_PER_THREAD {
        if Instant::now() >= deadline {
            break;
        }
        // Alternate the two client addresses to spread the ports over both.
        let source = if (k + n).is_multiple_of(2) {
            CLIENT_V4
        } else {
            CLIENT_V4_B
        };
        match one_connection(source, addr, hello) {
            Ok(latency) => tally
                .latencies_us
                .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX)),
            Err(e) => {
                tally.failed += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(format!("{e:#}"));
                }
                // Do not spin on a target that refuses at once.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    tally
}

/// A connected TCP socket from `source` (IPv4 only; an IPv6 `addr` gets no explicit source),
/// with connect, reads and writes bounded by [`IO_TIMEOUT`].
pub(crate) fn connect_from(source: IpAddr, addr: SocketAddr) -> Result<TcpStream> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // SO_SNDTIMEO also bounds a blocking connect (it then fails with EINPROGRESS).
    let timeout = timeval(IO_TIMEOUT);
    setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    let connected = match (addr, source) {
        (SocketAddr::V4(a), IpAddr::V4(src)) => {
            // Pick the port at connect time, per destination, not at bind time.
            setsockopt(&fd, sockopt::IpBindAddressNoPort, &true)?;
            bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))
                .with_context(|| format!("binding to {src}"))?;
            connect(fd.as_raw_fd(), &SockaddrIn::from(a))
        }
        (SocketAddr::V4(a), IpAddr::V6(_)) => connect(fd.as_raw_fd(), &SockaddrIn::from(a)),
        (SocketAddr::V6(a), _) => connect(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    match connected {
        Ok(()) => Ok(TcpStream::from(fd)),
        // What a connect cut short by SO_SNDTIMEO reports.
        Err(Errno::EINPROGRESS | Errno::EAGAIN) => {
            bail!("connecting to {addr}: no answer within {IO_TIMEOUT:?}")
        }
        Err(e) => Err(e).with_context(|| format!("connecting to {addr}")),
    }
}

fn timeval(d: Duration) -> TimeVal {
    TimeVal::new(
        nix::libc::time_t::try_from(d.as_secs()).unwrap_or(nix::libc::time_t::MAX),
        nix::libc::suseconds_t::from(d.subsec_micros()),
    )
}

/// One short connection; returns the time from connect to the last byte of the answer.
fn one_connection(source: IpAddr, addr: SocketAddr, hello: &[u8]) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = connect_from(source, addr)?;
    stream.write_all(hello).context("sending the hello")?;
    let mut answer = [0u8; RESPONSE.len()];
    stream
        .read_exact(&mut answer)
        .context("reading the answer")?;
    let latency = started.elapsed();
    // Wait for the end of stream, so that this side closes second (no TIME_WAIT here).
    let mut more = [0u8; 16];
    match stream.read(&mut more) {
        Ok(0) => Ok(latency),
        Ok(_) => {
            let _ = raw::reset(stream);
            bail!("more than {} bytes in the answer", RESPONSE.len())
        }
        Err(e) => {
            let _ = raw::reset(stream);
            Err(e).context("waiting for the end of stream")
        }
    }
}

/// User plus system CPU seconds of all of `pids`; `None` if one cannot be read.
fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    let ticks = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    };
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        total += (utime + stime) / ticks;
    }
    Some(total)
}

/// Nearest-rank percentile of sorted `v`; NaN when empty.
fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Whether `name` is the direct path: "direct", or "direct" followed by a space and more.
pub(crate) fn is_direct(name: &str) -> bool {
    name.split_whitespace()
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("direct"))
}

/// The index of the entry named `wanted`: an exact match, else case-insensitively equal, else
/// the first whose name starts with it (case-insensitively).
pub(crate) fn find_named<'a>(
    names: impl Iterator<Item = &'a str> + Clone,
    wanted: &str,
) -> Option<usize> {
    let lower = wanted.to_lowercase();
    names
        .clone()
        .position(|n| n == wanted)
        .or_else(|| names.clone().position(|n| n.to_lowercase() == lower))
        .or_else(|| {
            names
                .clone()
                .position(|n| n.to_lowercase().starts_with(&lower))
        })
}

/// A ratio cell: "1.23x", or "-" when either side is missing.
pub(crate) fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b.is_finite() && b != 0.0 && value.is_finite() => format!("{:.2}x", value / b),
        _ => "-".into(),
    }
}

/// A Markdown table of `results`, with connection rates relative to the target named
/// `baseline` and latency added relative to the one named "direct".
pub(crate) fn table(results: &[ConnResult], baseline: &str) -> String {
    let base = find_named(results.iter().map(|r| r.name.as_str()), baseline)
        .map(|i| median(&results[i].rates));
    let direct = results.iter().find(|r| is_direct(&r.name));
    let mut out = format!(
        "| contender | connections/s (median, min-max) | vs {baseline} | latency p50 / p99, us | \
         added p50 / p99 vs direct, us | proxy CPU per connection, us (median, min-max) | failed |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for r in results {
        let added = match direct {
            Some(d) if !is_direct(&r.name) => {
                format!("{:+.0} / {:+.0}", r.p50_us - d.p50_us, r.p99_us - d.p99_us)
            }
            _ => "-".into(),
        };
        let failed = if r.failed == 0 {
            "0".to_string()
        } else {
            format!(
                "{} of {} ({})",
                r.failed,
                r.failed + r.completed,
                r.first_error.as_deref().unwrap_or("?").replace('|', "/")
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} / {:.0} | {added} | {} | {failed} |",
            r.name,
            spread(&r.rates, 0),
            ratio(median(&r.rates), base),
            r.p50_us,
            r.p99_us,
            spread(&r.cpu_us, 1),
        );
    }
    out
}

/// The lines of the bar in issue 6 this part measures, for the best spliced engine: connections
/// per second against the baseline, added p50 latency against the baseline's, and memory per
/// 10,000 idle connections.
fn bar_checks(
    conns: &[ConnResult],
    idle: &[crate::bench_idle::IdleResult],
    baseline: &str,
) -> Vec<crate::report::Check> {
    use crate::report::check;
    let spliced = crate::proxies::is_spliced;
    let mut checks = Vec::new();
    let base = conns.iter().find(|r| r.name == baseline);
    let direct = conns.iter().find(|r| is_direct(&r.name));
    if let Some(base) = base {
        let base_rate = median(&base.rates);
        checks.extend(check(
            "connections/s >= 1.0x HAProxy",
            conns
                .iter()
                .filter(|r| spliced(&r.name))
                .map(|r| (r.name.clone(), median(&r.rates) / base_rate)),
            true,
            1.0,
            2,
            "x",
        ));
        // Issue 15's bar, for the packet engine alone.
        checks.extend(check(
            "packet: connections/s >= 1.0x HAProxy",
            conns
                .iter()
                .filter(|r| r.name == crate::proxies::PACKET_NAME)
                .map(|r| (r.name.clone(), median(&r.rates) / base_rate)),
            true,
            1.0,
            2,
            "x",
        ));
        if let Some(d) = direct {
            let limit = (base.p50_us - d.p50_us).round();
            checks.extend(check(
                &format!("added p50 latency <= HAProxy's ({limit:+.0} us)"),
                conns
                    .iter()
                    .filter(|r| spliced(&r.name))
                    .map(|r| (r.name.clone(), r.p50_us - d.p50_us)),
                false,
                limit,
                0,
                " us",
            ));
        }
    }
    checks.extend(check(
        "<= 50 MiB user space per 10,000 idle connections",
        idle.iter()
            .filter(|r| spliced(&r.name) && r.error.is_none())
            .map(|r| {
                (
                    r.name.clone(),
                    crate::bench_idle::per_10k(r.pss_kib, r.count),
                )
            }),
        false,
        50.0,
        1,
        " MiB",
    ));
    checks
}

/// Port of the responder in the backend namespace (both for short and for idle connections).
const RESPONDER_PORT: u16 = 9100;

/// This part of `cargo xtask bench`: short connections per second and added latency, then
/// the memory of `idle` idle connections, against fresh proxies routed to the responder.
pub(crate) fn part(
    rounds: usize,
    per_sample: Duration,
    idle: usize,
    contender: Option<&str>,
) -> Result<crate::report::Part> {
    let world = World::new()?;
    world.route_direct()?;
    let _responder = start_responder(&world, RESPONDER_PORT)?;
    let proxies = crate::proxies::start(
        &world,
        SocketAddr::new(spliced_tests::BACKEND_V6, RESPONDER_PORT),
    )?;
    let mut targets = vec![Target {
        name: "direct".into(),
        addr: SocketAddr::new(spliced_tests::BACKEND_V4, RESPONDER_PORT),
        sni: "direct.bench".into(),
        pids: Vec::new(),
    }];
    targets.extend(proxies.running.iter().map(|r| Target {
        name: r.name.clone(),
        addr: r.target,
        sni: r.sni.clone(),
        pids: r.pids.clone(),
    }));
    // `--contender`: only those whose name contains it (the ratios then have nothing to
    // compare with, as in the throughput part).
    targets.retain(|t| contender.is_none_or(|c| t.name.contains(c)));
    if targets.is_empty() {
        bail!("no contender's name contains {contender:?}");
    }
    let baseline = proxies
        .running
        .iter()
        .find(|r| r.baseline)
        .map_or_else(|| "HAProxy".to_owned(), |r| r.name.clone());
    let packet = |what: &str| -> Result<Option<crate::bench_crossover::Handoffs>> {
        match &proxies.packet {
            Some(p)
                if targets
                    .iter()
                    .any(|t| t.name == crate::proxies::PACKET_NAME) =>
            {
                Ok(Some(
                    crate::bench_crossover::Handoffs::read(p).with_context(|| {
                        format!("reading the packet engine's metrics {what} the run")
                    })?,
                ))
            }
            _ => Ok(None),
        }
    };
    let handoffs_before = packet("before")?;
    let conns = run(&world, &targets, rounds, per_sample)?;
    let handoffs = match (handoffs_before, packet("after")?) {
        (Some(before), Some(after)) => {
            let h = after.since(&before);
            let cpu = conns
                .iter()
                .find(|r| r.name == crate::proxies::PACKET_NAME)
                .map_or(f64::NAN, |r| median(&r.cpu_us));
            format!(
                "\n\nThe packet engine's handoff cost in these connections (its \
                 `spliced_packet_handoff_seconds`, from the freeze to ACTIVE): {}; proxy CPU \
                 per connection {cpu:.1} us (median of rounds, the handoff included).",
                h.summary()
            )
        }
        _ => String::new(),
    };
    let conns_table = table(&conns, &baseline);
    println!("\n{conns_table}{handoffs}");
    // The file limit here caps how many connections this process can hold at once.
    let count = idle.min(usize::try_from(proxies.max_connections)?.saturating_sub(500));
    let idle_results = crate::bench_idle::run(&world, &targets, count)?;
    let idle_table = crate::bench_idle::table(&idle_results, &baseline);
    println!("\n{idle_table}");
    let conns_table = format!("{conns_table}{handoffs}");
    let text = format!(
        "Short connections: {rounds} rounds of {:.0} s per contender, {} client threads; a \
         connection is connect, ClientHello, a 64-byte answer from the backend, close. Latency \
         is from connect to the answer.\n\n{conns_table}\n\n### Idle connections\n\n{count} \
         idle connections per contender; memory is scaled to 10,000. The machine's hard \
         limit of open files, 20,000 (no CAP_SYS_RESOURCE to raise it), keeps this process \
         from holding 10,000 connections on both ends, and a single-process proxy would need \
         more than 20,000 descriptors for 10,000 client and 10,000 backend sockets. Each \
         spliced engine runs in its own process.\n\n{idle_table}",
        per_sample.as_secs_f64(),
        CLIENT_THREADS
    );
    let rate_bars = conns
        .iter()
        .map(|r| (r.name.clone(), median(&r.rates)))
        .collect();
    let idle_bars = idle_results
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                crate::bench_idle::per_10k(r.pss_kib, r.count),
            )
        })
        .collect();
    Ok(crate::report::Part {
        heading: "Short connections, latency and idle memory".into(),
        markdown: text,
        checks: bar_checks(&conns, &idle_results, &baseline),
        panels: vec![
            crate::report::Panel {
                title: "Short connections per second".into(),
                unit: "conn/s".into(),
                lower_is_better: false,
                bars: rate_bars,
            },
            crate::report::Panel {
                title: "User-space memory per 10,000 idle connections".into(),
                unit: "MiB".into(),
                lower_is_better: true,
                bars: idle_bars,
            },
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preface_lengths() -> Result<(), &'static str> {
        let hello = raw::simple_hello("a.example");
        assert_eq!(preface_len(&hello[..3])?, None);
        assert_eq!(preface_len(&hello[..hello.len() - 1])?, None);
        assert_eq!(preface_len(&hello)?, Some(hello.len()));
        let mut v2 = PROXY_V2_SIG.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12]);
        v2.extend_from_slice(&[0; 12]);
        let at = v2.len();
        v2.extend_from_slice(&hello);
        assert_eq!(preface_len(&v2[..at + 4])?, None);
        assert_eq!(preface_len(&v2)?, Some(v2.len()));
        let mut v1 = b"PROXY TCP4 192.0.2.2 192.0.2.1 5555 443\r\n".to_vec();
        v1.extend_from_slice(&hello);
        assert_eq!(preface_len(&v1)?, Some(v1.len()));
        assert!(preface_len(b"GET / HTTP/1.1\r\n").is_err());
        Ok(())
    }

    #[test]
    fn names() {
        let names = ["direct", "spliced, sockmap", "HAProxy 2.6", "nginx"];
        assert_eq!(find_named(names.iter().copied(), "HAProxy"), Some(2));
        assert_eq!(find_named(names.iter().copied(), "nginx"), Some(3));
        assert_eq!(find_named(names.iter().copied(), "envoy"), None);
        assert!(is_direct("direct (kernel routing)"));
        assert!(!is_direct("directly"));
    }
}
