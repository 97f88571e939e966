//! The packet engine's crossover (issue 15): at which transfer size handing a connection to the
//! TC programs pays for the handoff.
//!
//! The short connections of `bench_conns` move 64 bytes: there every `packet.after` above 64
//! bytes means no handoff at all, and the series would only say that a handoff costs more than
//! a 64-byte answer gains. What a user choosing `packet.after` wants to know is how a
//! connection that downloads N bytes fares with each setting. So here a connection is: connect,
//! ClientHello plus an 8-byte size N, the backend sends N bytes and closes, the client reads to
//! the end of stream and checks the count. Every `packet.after` setting (0, 64 KiB, 256 KiB,
//! 1 MiB, 4 MiB), and splice for reference (never a handoff), is measured at every size from
//! 64 bytes to 16 MiB: connections per second and the proxy's CPU per connection. `after`
//! counts both directions, so a connection of N bytes is handed off when N (plus the 8 bytes
//! up) reaches `after`; below that it stays with splice, refused as `half_closed` at its end.
//!
//! Only one packet-engine spliced can run in a namespace at a time (see
//! `proxies::start_packet`), so each setting runs in its own process, started for its turn and
//! stopped after it; rounds are interleaved (A B C A B C ...) as elsewhere.
use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::socket::{
    AddressFamily, Backlog, Shutdown, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt,
    shutdown, socket, sockopt,
};
use spliced_tests::{
    BACKEND_V6, CLIENT_V4, CLIENT_V4_B, Ns, PROXY_V4, World, raw,
    spliced::{Launch, Metrics, Spliced},
};

use crate::bench::{median, spread};
use crate::bench_conns::{IO_TIMEOUT, connect_from, preface_len, tune_client};

/// The sized responder's port in the backend namespace.
const PORT: u16 = 9200;
/// The proxy's client-facing port for this part.
const PROXY_PORT: u16 = 450;
/// Client threads, each doing one connection after the other.
const CLIENT_THREADS: usize = 16;
/// Backend threads, each serving one connection at a time.
const WORKERS: usize = 32;
/// The `packet.after` settings measured.
pub(crate) const AFTER: [u64; 5] = [0, 64 << 10, 256 << 10, 1 << 20, 4 << 20];
/// The download sizes measured.
const SIZES: [u64; 6] = [64, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20];
/// A cap on connections per client thread per sample.
const MAX_PER_THREAD: usize = 1_000_000;
const BUF: usize = 256 * 1024;

/// The sized responder; stops its threads when dropped.
struct Responder {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes every thread blocked in accept() (EINVAL); the others time out within
        // IO_TIMEOUT.
        let _ = shutdown(self.listener.as_raw_fd(), Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn start_responder(world: &World) -> Result<Responder> {
    let listener = world
        .within(Ns::Backend, || -> io::Result<TcpListener> {
            let fd = socket(
                AddressFamily::Inet6,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            let addr = SockaddrIn6::from(SocketAddrV6::new(BACKEND_V6_ADDR, PORT, 0, 0));
            bind(fd.as_raw_fd(), &addr)?;
            listen(&fd, Backlog::new(4096)?)?;
            Ok(TcpListener::from(fd))
        })?
        .with_context(|| format!("listening on [{BACKEND_V6}]:{PORT} in the backend namespace"))?;
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let mut responder = Responder {
        stop: Arc::clone(&stop),
        listener: Arc::clone(&listener),
        threads: Vec::new(),
    };
    for i in 0..WORKERS {
        let (listener, stop) = (Arc::clone(&listener), Arc::clone(&stop));
        let t = std::thread::Builder::new()
            .name(format!("sized-{i}"))
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        // A client that misbehaves only loses its own connection.
                        Ok((stream, _)) => drop(serve(stream)),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .context("starting a responder thread")?;
        responder.threads.push(t);
    }
    Ok(responder)
}

const BACKEND_V6_ADDR: Ipv6Addr = match BACKEND_V6 {
    IpAddr::V6(a) => a,
    IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
};

/// One connection: the PROXY header and hello, then 8 bytes (big-endian) saying how many
/// bytes to send; sends them and closes (first, so the client keeps no TIME_WAIT).
fn serve(mut stream: std::net::TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let end = loop {
        match preface_len(&buf) {
            Ok(Some(end)) if buf.len() >= end + 8 => break end,
            Ok(_) => {}
            Err(what) => return Err(io::Error::new(io::ErrorKind::InvalidData, what)),
        }
        if buf.len() > 64 * 1024 {
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
    let mut size = [0u8; 8];
    size.copy_from_slice(&buf[end..end + 8]);
    let mut left = u64::from_be_bytes(size);
    let data = vec![0x5au8; BUF];
    while left > 0 {
        let n = usize::try_from(left.min(BUF as u64)).unwrap_or(BUF);
        stream.write_all(&data[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// One client thread's tally.
#[derive(Default)]
struct Tally {
    done: u64,
    failed: u64,
    first_error: Option<String>,
}

fn one_connection(source: IpAddr, addr: SocketAddr, first: &[u8], size: u64) -> Result<()> {
    let mut stream = connect_from(source, addr)?;
    stream.write_all(first).context("sending the hello")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) => {
                let _ = raw::reset(stream);
                return Err(e).with_context(|| format!("after {got} of {size} bytes"));
            }
        }
    }
    if got != size {
        bail!("received {got} bytes, expected {size}");
    }
    Ok(())
}

/// Closed-loop sized connections for `length`: (connections completed, seconds, tally).
fn sample(world: &World, size: u64, length: Duration) -> Result<(Tally, f64)> {
    let addr = SocketAddr::new(PROXY_V4, PROXY_PORT);
    let mut first = raw::simple_hello("packet.bench");
    first.extend_from_slice(&size.to_be_bytes());
    let first = &first;
    let (tallies, seconds) = world.within(Ns::Client, || {
        std::thread::scope(|s| {
            let started = Instant::now();
            let deadline = started + length;
            let handles: Vec<_> = (0..CLIENT_THREADS)
                .map(|k| {
                    s.spawn(move || {
                        let mut tally = Tally::default();
                        for n in 0..MAX_PER_THREAD {
                            if Instant::now() >= deadline {
                                break;
                            }
                            let source = if (k + n).is_multiple_of(2) {
                                CLIENT_V4
                            } else {
                                CLIENT_V4_B
                            };
                            match one_connection(source, addr, first, size) {
                                Ok(()) => tally.done += 1,
                                Err(e) => {
                                    tally.failed += 1;
                                    tally.first_error.get_or_insert(format!("{e:#}"));
                                    std::thread::sleep(Duration::from_millis(20));
                                }
                            }
                        }
                        tally
                    })
                })
                .collect();
            let tallies: Vec<Option<Tally>> = handles.into_iter().map(|h| h.join().ok()).collect();
            (tallies, started.elapsed().as_secs_f64())
        })
    })?;
    let mut all = Tally::default();
    for t in tallies {
        let t = t.context("a client thread panicked")?;
        all.done += t.done;
        all.failed += t.failed;
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
    }
    Ok((all, seconds))
}

/// What the packet engine's `/metrics` says about handoffs: how many, how long in all, and
/// the refusals by reason.
#[derive(Clone, Debug, Default)]
pub(crate) struct Handoffs {
    pub count: f64,
    pub seconds: f64,
    pub refused: Vec<(String, f64)>,
}

impl Handoffs {
    pub(crate) fn read(spliced: &Spliced) -> Result<Handoffs> {
        Ok(Handoffs::from(&spliced.metrics()?))
    }

    /// What happened between `earlier` and `self`.
    pub(crate) fn since(&self, earlier: &Handoffs) -> Handoffs {
        Handoffs {
            count: self.count - earlier.count,
            seconds: self.seconds - earlier.seconds,
            refused: self
                .refused
                .iter()
                .map(|(reason, n)| {
                    let before = earlier
                        .refused
                        .iter()
                        .find(|(r, _)| r == reason)
                        .map_or(0.0, |(_, b)| *b);
                    (reason.clone(), n - before)
                })
                .filter(|(_, n)| *n > 0.0)
                .collect(),
        }
    }

    /// "123 handed off (mean 10500 us); refused: half_closed 45" or similar.
    pub(crate) fn summary(&self) -> String {
        let mut out = format!("{:.0} handed off", self.count);
        if self.count > 0.0 {
            let _ = write!(out, " (mean {:.0} us)", self.seconds / self.count * 1e6);
        }
        if !self.refused.is_empty() {
            out.push_str("; refused:");
            for (reason, n) in &self.refused {
                let _ = write!(out, " {reason} {n:.0}");
            }
        }
        out
    }
}

impl From<&Metrics> for Handoffs {
    fn from(m: &Metrics) -> Handoffs {
        let mut h = Handoffs::default();
        for s in &m.samples {
            match s.name.as_str() {
                "spliced_packet_handoff_seconds_count" => h.count = s.value,
                "spliced_packet_handoff_seconds_sum" => h.seconds = s.value,
                "spliced_packet_refused_total" => {
                    if let Some((_, reason)) = s.labels.iter().find(|(k, _)| k == "reason") {
                        h.refused.push((reason.clone(), s.value));
                    }
                }
                _ => {}
            }
        }
        h
    }
}

/// One row of the series: a `packet.after` setting, or splice.
struct Row {
    name: String,
    /// `None`: splice, no handoff ever.
    after: Option<u64>,
    /// Per size: connections per second and proxy CPU per connection (us), one per round.
    rates: Vec<Vec<f64>>,
    cpu_us: Vec<Vec<f64>>,
    handoffs: Vec<Handoffs>,
    /// Per size: retransmission timeouts the backend (the sender) took, all rounds.
    timeouts: Vec<u64>,
    failed: Vec<(u64, Option<String>)>,
}

/// Retransmission timeouts the backend namespace's TCP has taken so far (`TCPTimeouts`): a
/// connection that lost its tail or stalled after the handoff waits one out (200 ms at
/// least), which the rate alone does not explain.
fn backend_timeouts(world: &World) -> Result<u64> {
    let netstat = world.within(Ns::Backend, || {
        // thread-self: the namespace this thread entered, not the process's.
        std::fs::read_to_string("/proc/thread-self/net/netstat")
    })??;
    crate::bench_xdp::proc_net_counters(&netstat)
        .get("TcpExtTCPTimeouts")
        .copied()
        .context("no TCPTimeouts in the backend's /proc/net/netstat")
}

fn size_name(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n.is_multiple_of(1 << 20) => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n.is_multiple_of(1 << 10) => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn start(world: &World, max: u32, after: Option<u64>) -> Result<Spliced> {
    let backend = SocketAddr::new(BACKEND_V6, PORT);
    match after {
        Some(after) => crate::proxies::start_packet(world, backend, max, PROXY_PORT, after),
        None => Launch::new(format!(
            "[defaults]\nmax_connections = {max}\n\
             [[listen]]\naddress = \"0.0.0.0:{PROXY_PORT}\"\nprotocol = \"tls\"\n\
             [[site]]\nhostnames = [\"packet.bench\"]\nbackend = \"{backend}\"\n\
             forwarding = \"splice\"\nproxy_protocol = \"v2\"\n"
        ))
        .named(&format!("spliced-{PROXY_PORT}"))
        .metrics()
        .start(world, &[PROXY_PORT]),
    }
}

/// This part of `cargo xtask bench`: the crossover series, `rounds` rounds of `per_sample`
/// per setting and size.
pub(crate) fn part(rounds: usize, per_sample: Duration) -> Result<crate::report::Part> {
    let world = World::new()?;
    tune_client(&world)?;
    let _responder = start_responder(&world)?;
    let max = crate::proxies::connection_limit()?;
    let mut rows: Vec<Row> = AFTER
        .iter()
        .map(|&a| Row {
            name: format!("packet, after = {}", size_name(a)),
            after: Some(a),
            rates: vec![Vec::new(); SIZES.len()],
            cpu_us: vec![Vec::new(); SIZES.len()],
            handoffs: vec![Handoffs::default(); SIZES.len()],
            timeouts: vec![0; SIZES.len()],
            failed: vec![(0, None); SIZES.len()],
        })
        .chain(std::iter::once(Row {
            name: "splice (no handoff)".into(),
            after: None,
            rates: vec![Vec::new(); SIZES.len()],
            cpu_us: vec![Vec::new(); SIZES.len()],
            handoffs: vec![Handoffs::default(); SIZES.len()],
            timeouts: vec![0; SIZES.len()],
            failed: vec![(0, None); SIZES.len()],
        }))
        .collect();
    eprintln!(
        "bench crossover: {rounds} rounds x {} settings x {} sizes, {:.1} s each, \
         {CLIENT_THREADS} client threads",
        rows.len(),
        SIZES.len(),
        per_sample.as_secs_f64()
    );
    for round in 0..rounds {
        for row in &mut rows {
            let mut spliced = start(&world, max, row.after)
                .with_context(|| format!("starting spliced for {}", row.name))?;
            let pid = spliced.pid().context("spliced has no PID")?;
            // A short unrecorded warm-up, which also checks the path once.
            sample(&world, 1024, Duration::from_millis(200))?;
            for (i, &size) in SIZES.iter().enumerate() {
                let before = (
                    crate::proxies::process_cpu(pid)?,
                    Handoffs::read(&spliced)?,
                    backend_timeouts(&world)?,
                );
                let (tally, seconds) = sample(&world, size, per_sample)?;
                let after = (
                    crate::proxies::process_cpu(pid)?,
                    Handoffs::read(&spliced)?,
                    backend_timeouts(&world)?,
                );
                let timeouts = after.2.saturating_sub(before.2);
                let rate = tally.done as f64 / seconds;
                // Not a figure when nothing completed (a stalled handoff): the cell says so.
                let cpu = if tally.done > 0 {
                    (after.0 - before.0) * 1e6 / tally.done as f64
                } else {
                    f64::NAN
                };
                let handoffs = after.1.since(&before.1);
                eprintln!(
                    "  round {round} {:<24} {:>7} {rate:>8.0} conns/s, proxy {cpu:.1} us/conn, \
                     {} failed, {} RTOs at the backend, {}",
                    row.name,
                    size_name(size),
                    tally.failed,
                    timeouts,
                    handoffs.summary()
                );
                row.timeouts[i] += timeouts;
                row.rates[i].push(rate);
                if cpu.is_finite() {
                    row.cpu_us[i].push(cpu);
                }
                let h = &mut row.handoffs[i];
                h.count += handoffs.count;
                h.seconds += handoffs.seconds;
                for (reason, n) in handoffs.refused {
                    match h.refused.iter_mut().find(|(r, _)| *r == reason) {
                        Some((_, m)) => *m += n,
                        None => h.refused.push((reason, n)),
                    }
                }
                row.failed[i].0 += tally.failed;
                if row.failed[i].1.is_none() {
                    row.failed[i].1 = tally.first_error;
                }
            }
            spliced.terminate(Duration::from_secs(15))?;
        }
    }
    let text = report(&rows, rounds, per_sample);
    println!("\n{text}");
    Ok(crate::report::Part {
        heading: "The packet engine's crossover".into(),
        markdown: text,
        checks: Vec::new(),
        panels: Vec::new(),
    })
}

fn report(rows: &[Row], rounds: usize, per_sample: Duration) -> String {
    let mut out = format!(
        "{rounds} rounds of {:.1} s per setting and size, {CLIENT_THREADS} client threads. A \
         connection is connect, ClientHello and an 8-byte size N, N bytes from the backend, \
         close; spliced sends PROXY v2. Each cell is connections per second (median, min-max) \
         and, below, the proxy's CPU per connection in microseconds; `after` counts bytes both \
         ways, so a connection is handed off once N reaches it.\n\n| setting |",
        per_sample.as_secs_f64()
    );
    for &s in &SIZES {
        let _ = write!(out, " {} |", size_name(s));
    }
    out.push_str("\n|---|");
    for _ in SIZES {
        out.push_str("---|");
    }
    out.push('\n');
    for row in rows {
        let _ = write!(out, "| {} |", row.name);
        for i in 0..SIZES.len() {
            let _ = write!(
                out,
                " {} conn/s<br>{} us |",
                spread(&row.rates[i], 0),
                spread(&row.cpu_us[i], 1)
            );
        }
        out.push('\n');
    }
    // Where the handoff right after the preface starts to pay: the smallest size at which
    // `after = 0` completes more connections per second than splice.
    let zero = rows.iter().find(|r| r.after == Some(0));
    let splice = rows.iter().find(|r| r.after.is_none());
    if let (Some(zero), Some(splice)) = (zero, splice) {
        let pays = SIZES
            .iter()
            .enumerate()
            .find(|(i, _)| median(&zero.rates[*i]) > median(&splice.rates[*i]));
        let _ = write!(
            out,
            "\nHanding off right after the preface (`after = 0`) against splice, connections \
             per second: "
        );
        for (i, &s) in SIZES.iter().enumerate() {
            let _ = write!(
                out,
                "{} {}; ",
                size_name(s),
                crate::bench_conns::ratio(median(&zero.rates[i]), Some(median(&splice.rates[i])))
            );
        }
        match pays {
            Some((_, &s)) => {
                let _ = writeln!(out, "it pays from {} on.", size_name(s));
            }
            None => out.push_str("it pays at none of these sizes.\n"),
        }
    }
    out.push_str(
        "\nHandoffs and refusals per setting and size, and the retransmission timeouts the \
         backend took (all rounds):\n\n",
    );
    for row in rows {
        let _ = write!(out, "- {}:", row.name);
        for (i, &s) in SIZES.iter().enumerate() {
            let _ = write!(
                out,
                " {}: {}, {} RTOs;",
                size_name(s),
                row.handoffs[i].summary(),
                row.timeouts[i]
            );
        }
        out.push('\n');
    }
    for row in rows {
        for (i, (failed, first)) in row.failed.iter().enumerate() {
            if *failed > 0 {
                let _ = writeln!(
                    out,
                    "- {} at {}: {failed} connections failed (first: {})",
                    row.name,
                    size_name(SIZES[i]),
                    first.as_deref().unwrap_or("?").replace('|', "/")
                );
            }
        }
    }
    out
}
