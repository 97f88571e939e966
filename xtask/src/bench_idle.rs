//! Memory for idle established connections (issue 6): how much a proxy holds for each client
//! connection that sent its hello and then went quiet, with the backend connection open too.
//!
//! For each proxy in turn: measure its processes (VmRSS, and PSS and private memory from
//! `smaps_rollup`), the kernel's TCP buffer memory and its slab objects, open `count` connections from the client
//! namespace over both client addresses, each sending a hello that asks the backend
//! (`bench_conns::start_responder`) to hold the connection without answering, wait until the
//! backend holds them all and the proxy's memory settles, measure again, then close everything
//! and wait until the proxy's sockets are gone before the next one.
//!
//! Closing goes client byte -> backend closes -> proxy passes the end of stream on -> client
//! closes, so the backend side and the proxy's listening side keep the TIME_WAIT sockets and
//! neither the client's nor the proxy's ephemeral ports fill up between contenders.
use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use spliced_tests::{CLIENT_V4, CLIENT_V4_B, Ns, World, raw, wait_for};

use crate::bench_conns::{self, HELD, IDLE_ALPN, Target};

/// Threads opening the connections.
const OPENERS: usize = 16;
/// Bounds opening all connections, and the backend seeing them all.
const OPEN_TIMEOUT: Duration = Duration::from_secs(40);
/// Gives up when no new connection reached the backend for this long.
const STALL: Duration = Duration::from_secs(5);
/// Bounds the wait for the proxy's memory to stop moving once every connection is up.
const SETTLE_MAX: Duration = Duration::from_secs(5);
/// Bounds closing every connection, and the proxy dropping its sockets afterwards.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-proxy results of [`run`]; memory figures are after minus before, in KiB.
pub(crate) struct IdleResult {
    pub name: String,
    /// Connections held open at the second measurement.
    pub count: usize,
    pub rss_kib: i64,
    pub pss_kib: i64,
    pub private_kib: i64,
    /// Kernel TCP buffer memory (`/proc/net/sockstat` "mem", machine-wide), KiB: before, after.
    pub tcp_mem_kib: (u64, u64),
    /// Kernel slab objects in use (`/proc/slabinfo`, machine-wide: the sockets of the client,
    /// the proxy and the backend, epoll entries, pipes, socket-map links), KiB.
    pub slab_kib: i64,
    /// TCP sockets the proxy namespace gained (IPv4 plus IPv6, in use).
    pub proxy_sockets: i64,
    /// Seconds from the first connect until the backend held them all.
    pub open_seconds: f64,
    /// Why this contender has no figures (the others still run).
    pub error: Option<String>,
    /// Earlier contenders measured in the same process: memory its allocator kept from their
    /// connections is reused here, so this row understates.
    pub after: Option<String>,
}

/// Measures each target with PIDs (the direct path has none and is skipped) with `count` idle
/// connections, one target after the other. A contender that fails gets a row saying why.
pub(crate) fn run(world: &World, targets: &[Target], count: usize) -> Result<Vec<IdleResult>> {
    // This process holds both ends it owns: the clients' sockets and the backend's.
    let need = u64::try_from(count)? * 2 + 200;
    let got = raise_nofile(need + 800)?;
    if got < need {
        bail!(
            "{count} idle connections need {need} open files in this process (client and backend \
             ends), but its hard limit is {got} and cannot be raised (no CAP_SYS_RESOURCE?)"
        );
    }
    bench_conns::tune_client(world)?;
    let mut results: Vec<IdleResult> = Vec::new();
    let proxies: Vec<&Target> = targets.iter().filter(|t| !t.pids.is_empty()).collect();
    for (i, t) in proxies.iter().enumerate() {
        let started = Instant::now();
        warn_low_limits(t, count);
        let earlier: Vec<&str> = proxies[..i]
            .iter()
            .filter(|p| p.pids.iter().any(|pid| t.pids.contains(pid)))
            .map(|p| p.name.as_str())
            .collect();
        let after = (!earlier.is_empty()).then(|| earlier.join(" and "));
        let r = match measure(world, t, count) {
            Ok(r) => IdleResult { after, ..r },
            Err(e) => {
                eprintln!("  {:<28} failed: {e:#}", t.name);
                results.push(IdleResult {
                    name: t.name.clone(),
                    count,
                    rss_kib: 0,
                    pss_kib: 0,
                    private_kib: 0,
                    tcp_mem_kib: (0, 0),
                    slab_kib: 0,
                    proxy_sockets: 0,
                    open_seconds: 0.0,
                    error: Some(format!("{e:#}")),
                    after,
                });
                continue;
            }
        };
        eprintln!(
            "  {:<28} RSS {:+.1} MiB, PSS {:+.1} MiB, private {:+.1} MiB, kernel slab {:+.1} MiB, \
             TCP mem {} -> {} KiB, {} proxy sockets; opened in {:.1} s, {:.1} s in all",
            t.name,
            mib(r.rss_kib),
            mib(r.pss_kib),
            mib(r.private_kib),
            mib(r.slab_kib),
            r.tcp_mem_kib.0,
            r.tcp_mem_kib.1,
            r.proxy_sockets,
            r.open_seconds,
            started.elapsed().as_secs_f64()
        );
        results.push(r);
    }
    Ok(results)
}

fn mib(kib: i64) -> f64 {
    kib as f64 / 1024.0
}

fn measure(world: &World, t: &Target, count: usize) -> Result<IdleResult> {
    let hello = raw::records(&raw::client_hello(Some(&t.sni), &[IDLE_ALPN], false), &[]);
    let held_before = HELD.load(Ordering::SeqCst);
    quiet(world)?;
    let proxy_before = sockstat(world, Ns::Proxy)?;
    let mem_before = memory(&t.pids)?;
    let slab_before = slab_kib()?;
    let started = Instant::now();
    // On failure open_all has closed what it opened; otherwise close_all below does.
    let outcome = open_all(world, t.addr, &hello, count, held_before).and_then(|streams| {
        let measured = (|| -> Result<IdleResult> {
            wait_held(held_before + count, started + OPEN_TIMEOUT).with_context(|| {
                format!(
                    "the backend holds {} of {count} (is the responder the proxy's backend, and \
                     are the proxy's connection and file limits high enough?)",
                    HELD.load(Ordering::SeqCst).saturating_sub(held_before)
                )
            })?;
            let open_seconds = started.elapsed().as_secs_f64();
            settle(&t.pids)?;
            let mem_after = memory(&t.pids)?;
            let slab_after = slab_kib()?;
            let proxy_after = sockstat(world, Ns::Proxy)?;
            Ok(IdleResult {
                name: t.name.clone(),
                count,
                rss_kib: mem_after.rss_kib - mem_before.rss_kib,
                pss_kib: mem_after.pss_kib - mem_before.pss_kib,
                private_kib: mem_after.private_kib - mem_before.private_kib,
                tcp_mem_kib: (proxy_before.mem_kib, proxy_after.mem_kib),
                slab_kib: slab_after - slab_before,
                proxy_sockets: proxy_after.inuse - proxy_before.inuse,
                open_seconds,
                error: None,
                after: None,
            })
        })();
        close_all(streams);
        measured
    });
    // Wait for the proxy to let go of its sockets (TIME_WAIT ones are not "in use") and for
    // the backend to close what it held, so the next contender starts from the same place.
    let slack = i64::try_from(count / 100)?.max(16);
    let dropped = wait_for("the proxy to close its sockets", CLOSE_TIMEOUT, || {
        let now = sockstat(world, Ns::Proxy)?;
        Ok(now.inuse <= proxy_before.inuse + slack && HELD.load(Ordering::SeqCst) <= held_before)
    });
    if let Err(e) = dropped {
        eprintln!(
            "  warning: {}: {e:#} ({} sockets in the proxy namespace, {} before; the backend \
             still holds {})",
            t.name,
            sockstat(world, Ns::Proxy).map(|s| s.inuse).unwrap_or(-1),
            proxy_before.inuse,
            HELD.load(Ordering::SeqCst).saturating_sub(held_before)
        );
    }
    outcome
}

/// Waits until the backend holds `target` connections: until `deadline`, and no longer than
/// [`STALL`] without one more.
fn wait_held(target: usize, deadline: Instant) -> Result<()> {
    let mut last = HELD.load(Ordering::SeqCst);
    let mut moved = Instant::now();
    loop {
        let now = HELD.load(Ordering::SeqCst);
        if now >= target {
            return Ok(());
        }
        if now != last {
            (last, moved) = (now, Instant::now());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {OPEN_TIMEOUT:?}");
        }
        if moved.elapsed() >= STALL {
            bail!("no new connection reached the backend for {STALL:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens `count` connections to `addr` from the client namespace, alternating the two client
/// addresses, each sending `hello`. Gives up when the backend saw no new connection for
/// [`STALL`] while some opened ones had not reached it (the proxy is out of files or
/// connection slots), or after [`OPEN_TIMEOUT`].
fn open_all(
    world: &World,
    addr: SocketAddr,
    hello: &[u8],
    count: usize,
    held_before: usize,
) -> Result<Vec<TcpStream>> {
    let deadline = Instant::now() + OPEN_TIMEOUT;
    let opened = AtomicUsize::new(0);
    let stalled = AtomicBool::new(false);
    let (opened, stalled) = (&opened, &stalled);
    world.within(Ns::Client, || {
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            for j in 0..OPENERS {
                let spawned = std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, move || {
                        let mut mine = Vec::with_capacity(count / OPENERS + 1);
                        let error = open_some(
                            &mut mine,
                            (j..count).step_by(OPENERS),
                            addr,
                            hello,
                            (deadline, stalled, opened),
                        )
                        .err();
                        (mine, error)
                    });
                match spawned {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        stalled.store(true, Ordering::Relaxed);
                        return Err(anyhow::Error::from(e).context("starting an opener"));
                    }
                }
            }
            // Watch the backend while the openers work (each of their steps is bounded).
            let mut last = HELD.load(Ordering::SeqCst);
            let mut moved = Instant::now();
            while !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(Duration::from_millis(50));
                let held = HELD.load(Ordering::SeqCst);
                if held != last {
                    (last, moved) = (held, Instant::now());
                } else if moved.elapsed() >= STALL
                    && opened.load(Ordering::Relaxed) > held.saturating_sub(held_before)
                {
                    stalled.store(true, Ordering::Relaxed);
                    break;
                }
            }
            let mut all = Vec::with_capacity(count);
            let mut first_error = None;
            for h in handles {
                match h.join() {
                    Ok((mine, error)) => {
                        all.extend(mine);
                        if let Some(e) = error {
                            first_error.get_or_insert(e);
                        }
                    }
                    Err(_) => {
                        first_error.get_or_insert(anyhow::anyhow!("an opener thread panicked"));
                    }
                }
            }
            match first_error {
                Some(e) => {
                    let opened = all.len();
                    // Resets leave no TIME_WAIT behind to slow down the next contender.
                    for s in all {
                        let _ = raw::reset(s);
                    }
                    Err(e.context(format!("{opened} of {count} connections opened")))
                }
                None => Ok(all),
            }
        })
    })?
}

/// Opens the connections numbered `which` into `streams` (see [`open_all`]).
fn open_some(
    streams: &mut Vec<TcpStream>,
    which: impl Iterator<Item = usize>,
    addr: SocketAddr,
    hello: &[u8],
    (deadline, stalled, opened): (Instant, &AtomicBool, &AtomicUsize),
) -> Result<()> {
    for i in which {
        if stalled.load(Ordering::Relaxed) {
            bail!(
                "the proxy passed no new connection to the backend for {STALL:?} (out of files \
                 or connection slots?)"
            );
        }
        if Instant::now() >= deadline {
            bail!("not all opened within {OPEN_TIMEOUT:?}");
        }
        let source = if i.is_multiple_of(2) {
            CLIENT_V4
        } else {
            CLIENT_V4_B
        };
        let mut stream =
            bench_conns::connect_from(source, addr).with_context(|| format!("connection {i}"))?;
        if let Err(e) = stream.write_all(hello) {
            let _ = raw::reset(stream);
            return Err(e).with_context(|| format!("sending the hello on connection {i}"));
        }
        streams.push(stream);
        opened.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Closes every connection: sends the backend the byte that makes it close, waits (bounded)
/// for each end of stream to come back through the proxy, then closes; resets the stragglers.
fn close_all(mut streams: Vec<TcpStream>) {
    let mut waiting = Vec::with_capacity(streams.len());
    for mut s in streams.drain(..) {
        if s.write_all(b"x").is_ok() && s.set_nonblocking(true).is_ok() {
            waiting.push(s);
        } else {
            let _ = raw::reset(s);
        }
    }
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    let mut buf = [0u8; 64];
    while !waiting.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let mut still = Vec::with_capacity(waiting.len());
        for mut s in waiting.drain(..) {
            match s.read(&mut buf) {
                // The end of stream came back: closing now leaves no TIME_WAIT on this side.
                Ok(0) => drop(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => still.push(s),
                Ok(_) | Err(_) => {
                    let _ = raw::reset(s);
                }
            }
        }
        waiting = still;
    }
    if !waiting.is_empty() {
        eprintln!(
            "  warning: {} connections saw no end of stream within {CLOSE_TIMEOUT:?}; resetting them",
            waiting.len()
        );
    }
    for s in waiting {
        let _ = raw::reset(s);
    }
}

/// Waits until the proxy's RSS stops moving (two readings 200 ms apart within 0.5% or 64 KiB),
/// at most [`SETTLE_MAX`].
fn settle(pids: &[u32]) -> Result<()> {
    let deadline = Instant::now() + SETTLE_MAX;
    let mut last = memory(pids)?.rss_kib;
    let mut calm = 0;
    while Instant::now() < deadline && calm < 2 {
        std::thread::sleep(Duration::from_millis(200));
        let now = memory(pids)?.rss_kib;
        if (now - last).abs() <= (last / 200).max(64) {
            calm += 1;
        } else {
            calm = 0;
        }
        last = now;
    }
    Ok(())
}

/// Waits until the kernel's memory stops moving after the previous contender (sockets being
/// freed, TIME_WAIT expiring): two readings 250 ms apart with slab objects within 1 MiB and TCP
/// buffer memory within 256 KiB; at most [`SETTLE_MAX`].
fn quiet(world: &World) -> Result<()> {
    let deadline = Instant::now() + SETTLE_MAX;
    let reading =
        || -> Result<(i64, u64)> { Ok((slab_kib()?, sockstat(world, Ns::Proxy)?.mem_kib)) };
    let mut last = reading()?;
    let mut calm = 0;
    while Instant::now() < deadline && calm < 2 {
        std::thread::sleep(Duration::from_millis(250));
        let now = reading()?;
        if (now.0 - last.0).abs() <= 1024 && now.1.abs_diff(last.1) <= 256 {
            calm += 1;
        } else {
            calm = 0;
        }
        last = now;
    }
    Ok(())
}

/// Memory of a set of processes, KiB.
struct Memory {
    rss_kib: i64,
    pss_kib: i64,
    private_kib: i64,
}

fn memory(pids: &[u32]) -> Result<Memory> {
    let mut m = Memory {
        rss_kib: 0,
        pss_kib: 0,
        private_kib: 0,
    };
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status (has the proxy exited?)"))?;
        m.rss_kib += kib_field(&status, "VmRSS:").with_context(|| format!("no VmRSS for {pid}"))?;
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
        m.pss_kib += kib_field(&rollup, "Pss:").with_context(|| format!("no Pss for {pid}"))?;
        m.private_kib += kib_field(&rollup, "Private_Clean:").unwrap_or(0)
            + kib_field(&rollup, "Private_Dirty:").unwrap_or(0);
    }
    Ok(m)
}

/// The number in a "Label:   1234 kB" line.
fn kib_field(text: &str, label: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(label))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// KiB of kernel slab objects in use over the machine: active objects times object size.
fn slab_kib() -> Result<i64> {
    let text = std::fs::read_to_string("/proc/slabinfo").context("reading /proc/slabinfo")?;
    let mut bytes = 0i64;
    // name active_objs num_objs objsize ...; two header lines.
    for line in text.lines().skip(2) {
        let f: Vec<&str> = line.split_whitespace().take(4).collect();
        if let [_, active, _, size] = f[..] {
            bytes += active.parse::<i64>().unwrap_or(0) * size.parse::<i64>().unwrap_or(0);
        }
    }
    Ok(bytes / 1024)
}

/// What `/proc/net/sockstat{,6}` say in one namespace.
struct Sockstat {
    /// TCP sockets in use in the namespace, IPv4 plus IPv6 (not TIME_WAIT).
    inuse: i64,
    /// Pages of TCP buffer memory, machine-wide (the kernel counts it globally), in KiB.
    mem_kib: u64,
}

fn sockstat(world: &World, ns: Ns) -> Result<Sockstat> {
    // /proc/thread-self/net shows the namespace of the thread that reads it.
    let (v4, v6) = world.within(ns, || {
        (
            std::fs::read_to_string("/proc/thread-self/net/sockstat"),
            std::fs::read_to_string("/proc/thread-self/net/sockstat6"),
        )
    })?;
    let (v4, v6) = (
        v4.context("reading sockstat")?,
        v6.context("reading sockstat6")?,
    );
    let field = |text: &str, line: &str, key: &str| -> Option<i64> {
        let rest = text.lines().find_map(|l| l.strip_prefix(line))?;
        let words: Vec<&str> = rest.split_whitespace().collect();
        let at = words.iter().position(|w| *w == key)?;
        words.get(at + 1)?.parse().ok()
    };
    let tcp = field(&v4, "TCP:", "inuse").context("no TCP inuse in sockstat")?;
    let tcp6 = field(&v6, "TCP6:", "inuse").context("no TCP6 inuse in sockstat6")?;
    let pages = field(&v4, "TCP:", "mem").context("no TCP mem in sockstat")?;
    let page_kib = match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) if p > 0 => u64::try_from(p / 1024)?,
        _ => 4,
    };
    Ok(Sockstat {
        inuse: tcp + tcp6,
        mem_kib: u64::try_from(pages)? * page_kib,
    })
}

/// Raises this process's limit on open files to `want` (the hard limit too, which needs
/// CAP_SYS_RESOURCE), or else as far as the hard limit allows; returns the soft limit now.
fn raise_nofile(want: u64) -> Result<u64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft == RLIM_INFINITY || soft >= want {
        return Ok(soft);
    }
    // Raising the hard limit needs CAP_SYS_RESOURCE; without it, go as far as it allows.
    let raised_hard = if hard == RLIM_INFINITY {
        hard
    } else {
        hard.max(want)
    };
    setrlimit(Resource::RLIMIT_NOFILE, want, raised_hard)
        .map(|()| want)
        .or_else(|_| {
            let soft = want.min(hard);
            setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map(|()| soft)
        })
        .with_context(|| format!("raising RLIMIT_NOFILE to {want}"))
}

/// Warns when none of the proxy's processes may open enough files for `count` client plus
/// `count` backend connections (the measurement would then time out).
fn warn_low_limits(t: &Target, count: usize) {
    let soft = |pid: u32| -> Option<u64> {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let rest = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))?;
        match rest.split_whitespace().next()? {
            "unlimited" => Some(u64::MAX),
            n => n.parse().ok(),
        }
    };
    let best = t.pids.iter().filter_map(|&p| soft(p)).max();
    if let Some(best) = best
        && best < 2 * count as u64 + 16
    {
        eprintln!(
            "  warning: {} may open at most {best} files; {count} idle connections need over {}",
            t.name,
            2 * count
        );
    }
}

/// `kib` measured over `count` connections, as MiB per 10,000 connections (NaN without any).
pub(crate) fn per_10k(kib: i64, count: usize) -> f64 {
    if count == 0 {
        f64::NAN
    } else {
        kib as f64 / 1024.0 * 10_000.0 / count as f64
    }
}

/// A Markdown table of `results`, with user-space memory (PSS) relative to the proxy named
/// `baseline`.
pub(crate) fn table(results: &[IdleResult], baseline: &str) -> String {
    let base = bench_conns::find_named(results.iter().map(|r| r.name.as_str()), baseline)
        .filter(|&i| results[i].error.is_none())
        .map(|i| per_10k(results[i].pss_kib, results[i].count));
    let mut out = format!(
        "| contender | PSS, MiB per 10k connections | vs {baseline} | RSS, MiB per 10k | private, MiB per 10k | \
         kernel slab objects, MiB per 10k (machine-wide) | kernel TCP buffers, KiB (before -> after) | \
         proxy sockets opened |\n|---|---|---|---|---|---|---|---|\n"
    );
    let mut notes = String::new();
    let mut noted = 0;
    for r in results {
        let mut name = r.name.clone();
        if let Some(earlier) = r.after.as_ref().filter(|_| r.error.is_none()) {
            noted += 1;
            let _ = write!(
                notes,
                "\nNote {noted}: measured in the same process after {earlier}; memory kept \
                 from those connections is reused, so this row understates (alone it needs its \
                 own process).\n"
            );
            let _ = write!(name, " (note {noted})");
        }
        if let Some(e) = &r.error {
            let _ = writeln!(
                out,
                "| {name} | failed: {} | - | - | - | - | - | - |",
                e.replace('|', "/")
            );
            continue;
        }
        let pss = per_10k(r.pss_kib, r.count);
        let _ = writeln!(
            out,
            "| {name} | {pss:.1} | {} | {:.1} | {:.1} | {:.1} | {} -> {} | {} |",
            bench_conns::ratio(pss, base),
            per_10k(r.rss_kib, r.count),
            per_10k(r.private_kib, r.count),
            per_10k(r.slab_kib, r.count),
            r.tcp_mem_kib.0,
            r.tcp_mem_kib.1,
            r.proxy_sockets,
        );
    }
    out.push_str(&notes);
    out
}
