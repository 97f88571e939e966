//! Memory under attack, in every engine: clients that send as much as they can and never read,
//! each paired with a backend that does the same, so both directions of every connection stall
//! with the buffers in between as full as spliced lets them get. While they sit there, spliced's
//! memory must stay under the bound its design states (docs/memory.md derives each one), other
//! clients must still get every byte back, and once the attackers go, the memory must come back.
//!
//! What is measured, the way an operator can:
//! - kernel memory of the proxy namespace's TCP sockets: `skmem` of every socket in `ss -tanm`
//!   (receive queue + send queue + forward allocation + backlog). `/proc/net/sockstat`'s `mem`
//!   is the whole machine's (only `inuse` is per namespace), so other tests would be counted in
//!   it; it is printed for reference only. The namespace gets the kernel's default TCP buffer
//!   sizes, whatever the host's, since the bounds follow from them;
//! - bytes in spliced's pipes (the splice engine), read with `FIONREAD` on copies of its pipe
//!   descriptors (`pidfd_getfd`): pipe pages are no socket's and `ss` does not see them;
//! - what the sockmap engine parks in the kernel for a stalled reader (`/metrics`:
//!   `spliced_sockmap_parked_bytes_max`), which no socket is charged for (DESIGN.md, fact 7);
//! - spliced's resident memory (`VmRSS`).
//!
//! `SPLICED_MEMORY_CONNS=N` changes the number of attacking connections (default 32, about
//! 0.5 GiB of socket memory for splice; the kernel-path engines, whose stalled reader holds a
//! 16 MiB send buffer by design, get a quarter of it), so that the machine's TCP memory, which
//! every namespace shares, stays far from its pressure threshold (`net.ipv4.tcp_mem`).
//! The figures each run prints are the ones in docs/memory.md:
//! `cargo xtask build && SPLICED_BIN=target/release/spliced cargo test --release -p spliced-tests --test memory -- --nocapture --test-threads 1`.
use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::libc;
use spliced_tests::{
    BACKEND_V6, Ns, World, open_files,
    raw::{self, Behavior, Stream, TestBackend, simple_hello, spawn},
    spliced::{Launch, Spliced},
    wait_for,
};

/// The attacked site's backend: ours, accepting and then writing without reading.
const ATTACK_PORT: u16 = 9300;
/// An echo backend for the clients that must still be served over TLS.
const ECHO_PORT: u16 = 9301;
/// An HTTP backend that answers each request with its own body, for header mode.
const HTTP_ECHO_PORT: u16 = 9302;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const IO: Duration = Duration::from_secs(20);
/// The attackers write until no socket has taken a byte for this long (the buffers are full).
const QUIET: Duration = Duration::from_secs(1);
/// ... or until this, whichever comes first.
const FILL_LIMIT: Duration = Duration::from_secs(20);
/// The send buffer of the test's own writing sockets: what they hold is not spliced's, and a
/// small one keeps the whole machine's TCP memory low.
const PEER_SNDBUF: usize = 256 * 1024;
/// What a checked transfer from a well-behaved client moves while the attack holds.
const NORMAL_LEN: usize = 2 << 20;
/// How long a well-behaved client's transfer may take while the attack holds.
const NORMAL_LIMIT: Duration = Duration::from_secs(5);
/// What `sockmap_backlog_limit` defaults to (README, "Bounded memory, reactively").
const SOCKMAP_LIMIT: u64 = 4 * MIB;
/// What the kernel may redirect past half the limit while spliced reacts (README: measured
/// up to 31 MiB with the whole suite loading both cores; `tests/src/sockmap.rs`'s `REACTION`).
const REACTION: u64 = 48 * MIB;
/// The capacity spliced asks for each pipe (`CHUNK` in `forward/splice.rs`).
const PIPE: u64 = MIB;
/// User-space allowance per connection besides its data buffers: the task, its futures, the
/// two sockets' registrations, the access-log record.
const CONN_STATE: u64 = 64 * KIB;
/// The user-space buffer of the copy and header engines, per direction (`BUFFER`).
const USER_BUFFER: u64 = 64 * KIB;
/// What one socket may hold past its buffers: the kernel lets one more aggregate (up to 64 KiB)
/// in past a full buffer, and keeps a forward allocation.
const SOCKET_SLACK: u64 = 256 * KIB;
/// What spliced's resident memory may grow by during an attack besides what the connections
/// hold: the runtime, the metrics scrapes, the well-behaved clients (about 1.5 MiB was seen,
/// which over 32 connections would read as 45 KiB each).
const RSS_NOISE: u64 = 2 * MIB;
/// How much more resident memory spliced may have after any later attack than after the
/// second, whatever the steps below. What glibc keeps once an attack's memory is freed moves
/// in steps, up or down, that stick or go back: a non-main arena whose top stays untrimmed
/// (resident 1.2 MiB, then 3.4 MiB in the same mapping: 2.2 MiB a step, with glibc's default
/// arenas), or the main heap's top (5.5 MiB a step with one arena). Within runs of 5 rounds
/// in header mode the largest rise seen was 2.2 MiB (the fresh-clone CI's 2.1 MiB failed the
/// 2 MiB bound this replaced); over runs the level ranged from 12.7 to 17.9 MiB. A leak does
/// not step once: [`RSS_LEAK_EACH`] catches it.
const RSS_LEAK: u64 = 8 * MIB;
/// A leak adds about the same after every attack: resident memory that grew by more than this
/// in each round from the third on (16 KiB per connection of 32) is one. Allocator steps never
/// came twice in a row in 24 runs of 5 rounds.
const RSS_LEAK_EACH: u64 = 512 * KIB;
/// The proxy namespace's socket memory once the attackers left, above what it was before.
const KERNEL_KEPT: u64 = MIB;

/// Tests share two cores with the rest of the suite: one attack at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn config(forwarding: &str) -> String {
    format!(
        r#"[defaults]
forwarding = "{forwarding}"
client_hello_timeout = "5s"
connect_timeout = "3s"

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[listen]]
address = "0.0.0.0:80"
protocol = "http"

[[site]]
hostnames = ["mem.example"]
backend = "[{BACKEND_V6}]:{ATTACK_PORT}"

[[site]]
hostnames = ["echo.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"

[[site]]
hostnames = ["mem-http.example"]
backend = {{ http = "[{BACKEND_V6}]:{ATTACK_PORT}" }}
forwarded_header = "x-forwarded-for"

[[site]]
hostnames = ["echo-http.example"]
backend = {{ http = "[{BACKEND_V6}]:{HTTP_ECHO_PORT}" }}
forwarded_header = "x-forwarded-for"
"#
    )
}

/// The engine under attack and what its design lets it hold per connection.
#[derive(Clone, Copy, Debug)]
enum Engine {
    Copy,
    Splice,
    Sockmap,
    Auto,
    /// Header mode (`forwarded_header`) on the `http` listener.
    Http,
}

impl Engine {
    fn forwarding(self) -> &'static str {
        match self {
            Engine::Copy => "copy",
            Engine::Splice => "splice",
            Engine::Sockmap => "sockmap",
            // Header sites use the http engine whatever the default.
            Engine::Auto | Engine::Http => "auto",
        }
    }

    /// Whether the kernel path (sockmap) may take the stalled directions.
    fn kernel_path(self) -> bool {
        matches!(self, Engine::Sockmap | Engine::Auto)
    }

    fn connections(self) -> usize {
        let n = usize::try_from(spliced_tests::env_or("SPLICED_MEMORY_CONNS", 32)).unwrap_or(32);
        if self.kernel_path() {
            (n / 4).max(1)
        } else {
            n
        }
    }
}

/// The proxy namespace's TCP buffer sizes (`net.ipv4.tcp_rmem`/`tcp_wmem`, the largest a
/// socket's autotuned buffers grow to).
#[derive(Clone, Copy, Debug)]
struct Sysctls {
    rmem_max: u64,
    wmem_max: u64,
}

/// The kernel's own defaults for TCP buffer sizes in the proxy namespace (a new namespace
/// copies the host's, which may have been raised for benchmarks): the bounds follow from them.
const TCP_RMEM: &str = "4096 131072 6291456";
const TCP_WMEM: &str = "4096 16384 4194304";

fn set_kernel_defaults(world: &World) -> Result<()> {
    let out = world
        .command(Ns::Proxy, "sysctl")
        .args([
            "-q",
            "-w",
            &format!("net.ipv4.tcp_rmem={TCP_RMEM}"),
            &format!("net.ipv4.tcp_wmem={TCP_WMEM}"),
        ])
        .output()?;
    ensure!(out.status.success(), "sysctl failed: {out:?}");
    Ok(())
}

fn sysctls(world: &World) -> Result<Sysctls> {
    let third = |name: &str| -> Result<u64> {
        let out = world
            .command(Ns::Proxy, "cat")
            .arg(format!("/proc/sys/net/ipv4/{name}"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} is {text:?}"))
    };
    Ok(Sysctls {
        rmem_max: third("tcp_rmem")?,
        wmem_max: third("tcp_wmem")?,
    })
}

/// What the design lets one connection hold with both directions stalled (docs/memory.md).
#[derive(Clone, Copy, Debug)]
struct Bound {
    /// Socket memory in the proxy namespace (both sockets, both directions).
    sockets: u64,
    /// Bytes in spliced's pipes.
    pipes: u64,
    /// Bytes the kernel path parks for one stalled reader, charged to no socket.
    parked: u64,
    /// spliced's resident memory.
    user: u64,
}

fn bound(engine: Engine, s: Sysctls) -> Bound {
    // Per stalled direction: the sender's socket receive queue (up to its autotuned buffer)
    // and the reader's socket send queue (likewise).
    let tcp = 2 * (s.rmem_max + s.wmem_max + SOCKET_SLACK);
    match engine {
        Engine::Copy => Bound {
            sockets: tcp,
            pipes: 0,
            parked: 0,
            user: 2 * USER_BUFFER + CONN_STATE,
        },
        Engine::Splice => Bound {
            sockets: tcp,
            pipes: 2 * PIPE,
            parked: 0,
            user: CONN_STATE,
        },
        Engine::Sockmap | Engine::Auto => {
            // The reader's send buffer is forced to twice the limit (1 to 8 MiB), which the
            // kernel doubles; a direction that left the kernel is spliced through a pipe.
            let forced = 2 * (2 * SOCKMAP_LIMIT).clamp(MIB, 8 * MIB);
            Bound {
                sockets: 2 * (s.rmem_max + forced.max(s.wmem_max) + SOCKET_SLACK),
                pipes: 2 * PIPE,
                parked: SOCKMAP_LIMIT / 2 + REACTION,
                user: CONN_STATE,
            }
        }
        // Per direction a read buffer and an output buffer of `BUFFER`, each of which can grow
        // by one more `BUFFER` before it is flushed.
        Engine::Http => Bound {
            sockets: tcp,
            pipes: 0,
            parked: 0,
            user: 2 * 4 * USER_BUFFER + CONN_STATE,
        },
    }
}

/// The proxy namespace's TCP sockets as `ss -tanm` shows them.
#[derive(Clone, Copy, Debug, Default)]
struct Sockets {
    count: usize,
    /// Sum over the sockets of receive queue + send queue + forward allocation + backlog.
    bytes: u64,
    /// The most one socket holds.
    largest: u64,
    /// The most a socket's receive queue held beyond its receive buffer (`r` - `rb`), and its
    /// send queue beyond its send buffer (`w` - `tb`): what the kernel lets through past a
    /// full buffer.
    over_rcvbuf: u64,
    over_sndbuf: u64,
}

fn sockets(world: &World) -> Result<Sockets> {
    let out = world
        .command(Ns::Proxy, "ss")
        .args(["-tanmH"])
        .output()
        .context("running ss")?;
    ensure!(out.status.success(), "ss failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = Sockets::default();
    for mem in text.split("skmem:(").skip(1) {
        let fields = mem.split(')').next().unwrap_or_default();
        let mut values = BTreeMap::new();
        for field in fields.split(',') {
            let split = field
                .find(|c: char| c.is_ascii_digit())
                .with_context(|| format!("skmem field {field:?}"))?;
            let (name, value) = field.split_at(split);
            values.insert(name, value.parse::<u64>()?);
        }
        let held: u64 = ["r", "w", "f", "bl"]
            .iter()
            .map(|k| values.get(k).copied().unwrap_or(0))
            .sum();
        let get = |k: &str| values.get(k).copied().unwrap_or(0);
        total.count += 1;
        total.bytes += held;
        total.largest = total.largest.max(held);
        total.over_rcvbuf = total.over_rcvbuf.max(get("r").saturating_sub(get("rb")));
        total.over_sndbuf = total.over_sndbuf.max(get("w").saturating_sub(get("tb")));
    }
    Ok(total)
}

/// Bytes waiting in `pid`'s pipes, read through copies of its pipe descriptors.
fn pipe_bytes(pid: u32) -> Result<u64> {
    // SAFETY: plain system calls; the returned descriptors are owned and closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    ensure!(
        pidfd >= 0,
        "pidfd_open({pid}): {}",
        io::Error::last_os_error()
    );
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if !target.starts_with("pipe:") || !seen.insert(target) {
            continue;
        }
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: as above; a descriptor closed meanwhile makes it fail, which we skip.
        let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if copy < 0 {
            continue;
        }
        // SAFETY: pidfd_getfd returned a new descriptor that nothing else owns.
        let copy = unsafe { OwnedFd::from_raw_fd(copy as i32) };
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        if unsafe { libc::ioctl(copy.as_raw_fd(), libc::FIONREAD, &mut queued) } == 0 {
            total += u64::try_from(queued).unwrap_or(0);
        }
    }
    Ok(total)
}

/// spliced's resident memory in bytes.
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * KIB)
        .context("no VmRSS in /proc/PID/status")
}

/// The whole machine's TCP memory from `/proc/net/sockstat` (pages), for reference.
fn machine_tcp_pages() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("TCP:"))
                .and_then(|l| l.rsplit_once("mem ").map(|(_, v)| v.trim().to_owned()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One look at everything spliced holds.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    sockets: Sockets,
    pipes: u64,
    rss: u64,
    machine_pages: u64,
}

fn sample(world: &World, pid: u32) -> Result<Sample> {
    Ok(Sample {
        sockets: sockets(world)?,
        pipes: pipe_bytes(pid)?,
        rss: rss(pid)?,
        machine_pages: machine_tcp_pages(),
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Makes `stream` write with a small send buffer (see [`PEER_SNDBUF`]).
fn small_sndbuf(stream: &TcpStream) -> Result<()> {
    nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::SndBuf, &PEER_SNDBUF)?;
    Ok(())
}

/// Writes to every socket as long as any of them takes bytes; stops once none has for
/// [`QUIET`] or at [`FILL_LIMIT`]. Returns the bytes written in all.
fn pump(sockets: &mut [TcpStream], stop: &AtomicBool) -> Result<u64> {
    pump_cycle(sockets, &Stream::prefix(7, 64 * 1024), stop)
}

/// [`pump`] with `cycle` written over and over on each socket, whole: a write the kernel
/// takes only part of goes on from there.
fn pump_cycle(sockets: &mut [TcpStream], cycle: &[u8], stop: &AtomicBool) -> Result<u64> {
    for s in sockets.iter() {
        s.set_nonblocking(true)?;
    }
    let mut offsets = vec![0usize; sockets.len()];
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut total = 0u64;
    while started.elapsed() < FILL_LIMIT
        && last_progress.elapsed() < QUIET
        && !stop.load(Ordering::Relaxed)
    {
        let mut progress = false;
        for (s, offset) in sockets.iter_mut().zip(&mut offsets) {
            match s.write(&cycle[*offset..]) {
                Ok(n) => {
                    total += n as u64;
                    *offset = (*offset + n) % cycle.len();
                    progress = true;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).context("an attacker's write failed"),
            }
        }
        if progress {
            last_progress = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(total)
}

/// The backend side of the attack: accepts `n` connections, reads only what header mode needs
/// before a response may go out (the request head), then hands the sockets to the pump.
fn accept_attackers(listener: &TcpListener, n: usize, http: bool) -> Result<Vec<TcpStream>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = raw::accept_within(listener, IO, IO)
            .with_context(|| format!("accepting attacking connection {i}"))?;
        small_sndbuf(&s)?;
        if http {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).context("reading a request head")?;
                ensure!(n > 0, "the proxy closed before a request head");
                seen.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n")?;
        }
        out.push(s);
    }
    Ok(out)
}

/// An HTTP backend that answers every request (with a `Content-Length` body) with that body.
fn http_echo(world: &World) -> Result<Arc<AtomicBool>> {
    let listener = raw::listen_in(
        world,
        Ns::Backend,
        SocketAddr::new(BACKEND_V6, HTTP_ECHO_PORT),
    )?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => {
                    std::thread::spawn(move || answer_with_body(s));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Ok(stop)
}

fn answer_with_body(mut s: TcpStream) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte)?;
        head.push(byte[0]);
        ensure!(head.len() < 16 * 1024, "request head too long");
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no content-length")?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").as_bytes())?;
    s.write_all(&body)?;
    Ok(())
}

/// A well-behaved client: sends [`NORMAL_LEN`] bytes and checks every byte that comes back.
fn normal_client(world: &World, engine: Engine, seed: u64) -> Result<Duration> {
    let started = Instant::now();
    let payload = Stream::prefix(seed, NORMAL_LEN);
    let (port, prefix, want_prefix): (u16, Vec<u8>, Vec<u8>) = match engine {
        Engine::Http => {
            let head = format!(
                "POST / HTTP/1.1\r\nHost: echo-http.example\r\nContent-Length: {NORMAL_LEN}\r\n\r\n"
            );
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {NORMAL_LEN}\r\n\r\n");
            (80, head.into_bytes(), answer.into_bytes())
        }
        _ => {
            let hello = simple_hello("echo.example");
            (443, hello.clone(), hello)
        }
    };
    let mut client = raw::connect(world, port, NORMAL_LIMIT)?;
    let mut writer = client.try_clone()?;
    let sent = payload.clone();
    let sender = spawn(move || {
        writer.write_all(&prefix)?;
        writer.write_all(&sent)?;
        Ok(())
    });
    let got = raw::read_exactly(&mut client, want_prefix.len() + NORMAL_LEN)
        .context("a well-behaved client's transfer")?;
    raw::result(&sender, NORMAL_LIMIT, "a well-behaved client's upload")?;
    ensure!(
        got[..want_prefix.len()] == want_prefix[..],
        "a well-behaved client got {:?} first",
        String::from_utf8_lossy(&got[..want_prefix.len().min(64)])
    );
    ensure!(
        got[want_prefix.len()..] == payload[..],
        "a well-behaved client got other bytes back: {}",
        raw::difference(&got[want_prefix.len()..], &payload)
    );
    client.shutdown(Shutdown::Write)?;
    Ok(started.elapsed())
}

/// What one engine's test runs in.
struct Setup<'a> {
    engine: Engine,
    n: usize,
    world: &'a World,
    spliced: &'a Spliced,
    pid: u32,
    bound: Bound,
    listener: &'a TcpListener,
}

/// The attack on one engine, five times (`SPLICED_MEMORY_ROUNDS` for more): the later rounds
/// find what the earlier ones left behind.
fn attack(engine: Engine) -> Result<()> {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let world = World::new()?;
    // glibc's malloc raises its mmap threshold the first time a large block is freed, after
    // which such blocks come from the heap and the memory it keeps after an attack grows in
    // steps over the first rounds (measured: 29.1, 29.8, 31.6 MiB, then flat for seven rounds
    // in header mode). A fixed threshold (its default value) keeps that constant, so growth
    // from one round to the next is a leak and not the allocator changing its mind.
    let spliced = Launch::new(config(engine.forwarding()))
        .metrics()
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .start(&world, &[443, 80])?;
    let pid = spliced.pid().context("spliced has no PID")?;
    set_kernel_defaults(&world)?;
    let limits = sysctls(&world)?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let _http_echo = StopOnDrop(http_echo(&world)?);
    let listener = raw::listen_in(
        &world,
        Ns::Backend,
        SocketAddr::new(BACKEND_V6, ATTACK_PORT),
    )?;
    let setup = Setup {
        engine,
        n: engine.connections(),
        world: &world,
        spliced: &spliced,
        pid,
        bound: bound(engine, limits),
        listener: &listener,
    };
    // Warm up: the runtime's threads and the allocator's arenas exist before the baseline.
    normal_client(&world, engine, 1)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = sample(&world, pid)?;
    let before_fds = open_files(pid)?.other;
    let rounds = spliced_tests::env_or("SPLICED_MEMORY_ROUNDS", 5).max(5);
    let mut after = Vec::new();
    for i in 1..=rounds {
        after.push(round(&setup, i, before, before_fds)?);
    }
    let shown: Vec<String> = after.iter().map(|&r| format!("{:.1}", mib(r))).collect();
    eprintln!(
        "memory[{engine:?}]: RSS {:.1} MiB before, after each attack: {} MiB",
        mib(before.rss),
        shown.join(", ")
    );
    // The allocator keeps some of what the first attack freed (its arenas, thread caches), so
    // that round may leave more behind. From the second on, each attack must reuse what the
    // one before left: a leak shows as growth in every round, beyond the allocator's steps.
    let settled = after[1];
    let grew_each = after[1..].windows(2).all(|w| w[1] > w[0] + RSS_LEAK_EACH);
    ensure!(
        !grew_each,
        "memory[{engine:?}]: spliced's resident memory grew by more than {} KiB after every \
         attack from the third on (MiB after each: {}; {} connections each): a leak",
        RSS_LEAK_EACH / KIB,
        shown.join(", "),
        setup.n
    );
    let most = after[1..].iter().copied().max().unwrap_or(settled);
    ensure!(
        most <= settled + RSS_LEAK,
        "memory[{engine:?}]: spliced's resident memory grew from {:.1} MiB after the second \
         attack to {:.1} MiB after a later one (MiB after each: {}; {} connections each; at \
         most {} KiB may differ)",
        mib(settled),
        mib(most),
        shown.join(", "),
        setup.n,
        RSS_LEAK / KIB
    );
    // And spliced still serves.
    normal_client(&world, engine, 1000 + rounds)?;
    Ok(())
}

/// One attack: `n` connections held with both directions stalled, checked against the bounds
/// while well-behaved clients are served, then let go. Returns spliced's resident memory once
/// everything the attack made it hold in the kernel is gone.
fn round(setup: &Setup<'_>, round: u64, before: Sample, before_fds: usize) -> Result<u64> {
    let Setup {
        engine,
        n,
        world,
        spliced,
        pid,
        bound,
        listener,
    } = *setup;
    let http = matches!(engine, Engine::Http);
    let backends = {
        let listener = listener.try_clone()?;
        spawn(move || accept_attackers(&listener, n, http))
    };
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = raw::connect(world, if http { 80 } else { 443 }, IO)
            .with_context(|| format!("attacking client {i}"))?;
        small_sndbuf(&c)?;
        if http {
            c.write_all(
                b"POST / HTTP/1.1\r\nHost: mem-http.example\r\nContent-Length: 1099511627776\r\n\r\n",
            )?;
        } else {
            c.write_all(&simple_hello("mem.example"))?;
        }
        clients.push(c);
    }
    let mut backends = raw::result(&backends, IO, "accepting the attacking connections")?;

    // Both sides write until nothing more goes in; meanwhile, watch the peak.
    let stop = AtomicBool::new(false);
    let filled = std::thread::scope(|s| -> Result<(u64, u64, Sample)> {
        let up = s.spawn(|| pump(&mut clients, &stop));
        let down = s.spawn(|| pump(&mut backends, &stop));
        let mut peak = before;
        let watched = (|| -> Result<()> {
            while !(up.is_finished() && down.is_finished()) {
                peak = max_sample(peak, sample(world, pid)?);
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let up = up
            .join()
            .map_err(|_| anyhow::anyhow!("client pump panicked"))??;
        let down = down
            .join()
            .map_err(|_| anyhow::anyhow!("backend pump panicked"))??;
        watched?;
        Ok((up, down, peak))
    });
    let (up, down, mut peak) = filled?;
    // Settled: the kernel path's worker and spliced's reactions are done.
    std::thread::sleep(Duration::from_millis(500));
    peak = max_sample(peak, sample(world, pid)?);
    if std::env::var_os("SPLICED_MEMORY_SS").is_some() {
        eprintln!("{}", proxy_sockets(world));
    }
    let metrics = spliced.metrics()?;
    let open = metrics.count("spliced_open_connections", &[])?;
    let (parked, detached) = if engine.kernel_path() {
        (
            metrics.count("spliced_sockmap_parked_bytes_max", &[])?,
            metrics.count("spliced_sockmap_detached_total", &[("side", "client")])?
                + metrics.count("spliced_sockmap_detached_total", &[("side", "backend")])?,
        )
    } else {
        (0, 0)
    };

    // Others are still served, every byte checked.
    let mut normal = Vec::new();
    for i in 0..3 {
        normal.push(
            normal_client(world, engine, 100 * round + i).with_context(|| {
                format!("a well-behaved client while {n} attacking connections hold")
            })?,
        );
    }

    let per = |total: u64, base: u64| total.saturating_sub(base) / n as u64;
    let socket_per = per(peak.sockets.bytes, before.sockets.bytes);
    let pipes_per = per(peak.pipes, before.pipes);
    let rss_per = per(peak.rss, before.rss);
    let report = format!(
        "memory[{engine:?}] round {round}: {n} attacking connections, both directions stalled \
         after {:.0} MiB up and {:.0} MiB down; {open} open, {detached} directions left the \
         kernel so far\n\
         memory[{engine:?}] round {round}: per connection: sockets {:.2} MiB (bound {:.1} MiB), \
         largest socket {:.2} MiB (past its buffers: receive {} KiB, send {} KiB), pipes {:.2} \
         MiB (bound {:.0} MiB), parked at most {:.2} MiB per stalled reader (bound {:.0} MiB), \
         RSS {:.1} KiB (bound {:.0} KiB)\n\
         memory[{engine:?}] round {round}: proxy namespace sockets {:.1} -> {:.1} MiB, pipes \
         {:.1} MiB, RSS {:.1} -> {:.1} MiB; machine TCP memory {} -> {} pages (all namespaces); \
         well-behaved clients took {normal:.2?}",
        mib(up),
        mib(down),
        mib(socket_per),
        mib(bound.sockets),
        mib(peak.sockets.largest),
        peak.sockets.over_rcvbuf / KIB,
        peak.sockets.over_sndbuf / KIB,
        mib(pipes_per),
        mib(bound.pipes),
        mib(parked),
        mib(bound.parked),
        rss_per as f64 / KIB as f64,
        bound.user as f64 / KIB as f64,
        mib(before.sockets.bytes),
        mib(peak.sockets.bytes),
        mib(peak.pipes),
        mib(before.rss),
        mib(peak.rss),
        before.machine_pages,
        peak.machine_pages,
    );
    eprintln!("{report}");
    ensure!(
        open >= n as u64,
        "only {open} connections open during the attack of {n}:\n{report}\n{}",
        spliced.stdout_text()
    );
    ensure!(
        up > 0 && down > 0,
        "the attackers wrote nothing ({up} up, {down} down)"
    );
    ensure!(
        socket_per <= bound.sockets,
        "socket memory over the bound:\n{report}\n{}",
        proxy_sockets(world)
    );
    ensure!(
        pipes_per <= bound.pipes,
        "pipe bytes over the bound:\n{report}"
    );
    ensure!(parked <= bound.parked, "parked over the bound:\n{report}");
    ensure!(
        peak.rss.saturating_sub(before.rss) <= n as u64 * bound.user + RSS_NOISE,
        "resident memory over the bound ({} KiB per connection plus {} MiB):\n{report}",
        bound.user / KIB,
        RSS_NOISE / MIB
    );
    if engine.kernel_path() {
        ensure!(
            detached > 0,
            "no stalled direction left the kernel:\n{report}"
        );
    }

    // The attackers leave: everything they made spliced hold in the kernel goes.
    drop(clients);
    drop(backends);
    let mut last = peak;
    let mut left_open = u64::MAX;
    let mut entries = 0;
    let mut fds = 0;
    wait_for("spliced to let go of the attack's memory", IO, || {
        last = sample(world, pid)?;
        let m = spliced.metrics()?;
        left_open = m.count("spliced_open_connections", &[])?;
        if engine.kernel_path() {
            entries = ["verdict", "hold", "peers"]
                .iter()
                .map(|map| m.count("spliced_sockmap_entries", &[("map", map)]))
                .sum::<Result<u64>>()?;
        }
        fds = open_files(pid)?.other;
        Ok(left_open == 0
            && fds == before_fds
            && entries == 0
            && last.sockets.bytes <= before.sockets.bytes + KERNEL_KEPT
            && last.pipes == 0)
    })
    .with_context(|| {
        format!(
            "{report}\nafter the attackers left: {left_open} connections open, {fds} descriptors \
             other than pipes (before: {before_fds}), {entries} map entries, sockets {:.1} MiB (before {:.1}, {} MiB may stay), pipes {} bytes\n{}",
            mib(last.sockets.bytes),
            mib(before.sockets.bytes),
            KERNEL_KEPT / MIB,
            last.pipes,
            proxy_sockets(world)
        )
    })?;
    // What stays: the least seen over a second, once the runtime is done with the closed
    // connections (a look in the middle of that can see 2 MiB more).
    let mut rss_after = u64::MAX;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        rss_after = rss_after.min(rss(pid)?);
    }
    eprintln!(
        "memory[{engine:?}] round {round}: after the attackers left: sockets {:.2} MiB, pipes {} \
         bytes, RSS {:.1} MiB",
        mib(last.sockets.bytes),
        last.pipes,
        mib(rss_after)
    );
    Ok(rss_after)
}

fn max_sample(a: Sample, b: Sample) -> Sample {
    Sample {
        sockets: Sockets {
            count: a.sockets.count.max(b.sockets.count),
            bytes: a.sockets.bytes.max(b.sockets.bytes),
            largest: a.sockets.largest.max(b.sockets.largest),
            over_rcvbuf: a.sockets.over_rcvbuf.max(b.sockets.over_rcvbuf),
            over_sndbuf: a.sockets.over_sndbuf.max(b.sockets.over_sndbuf),
        },
        pipes: a.pipes.max(b.pipes),
        rss: a.rss.max(b.rss),
        machine_pages: a.machine_pages.max(b.machine_pages),
    }
}

fn proxy_sockets(world: &World) -> String {
    world
        .command(Ns::Proxy, "ss")
        .args(["-tnmi"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(ss failed: {e})"))
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn copy_engine_memory_is_bounded_under_attack() -> Result<()> {
    attack(Engine::Copy)
}

#[test]
fn splice_engine_memory_is_bounded_under_attack() -> Result<()> {
    attack(Engine::Splice)
}

#[test]
fn sockmap_engine_memory_is_bounded_under_attack() -> Result<()> {
    attack(Engine::Sockmap)
}

#[test]
fn auto_engine_memory_is_bounded_under_attack() -> Result<()> {
    attack(Engine::Auto)
}

#[test]
fn header_mode_memory_is_bounded_under_attack() -> Result<()> {
    attack(Engine::Http)
}

/// Header mode keeps, for every request sent on, what its response needs to be framed, until
/// that response ends. Clients that pipeline small requests without reading, to a backend that
/// reads them all and answers none, must not make that grow without bound.
#[test]
fn header_mode_pipelined_requests_without_answers_are_bounded() -> Result<()> {
    const N: usize = 8;
    const FOR: Duration = Duration::from_secs(6);
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let world = World::new()?;
    let spliced = Launch::new(config("auto"))
        .metrics()
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .start(&world, &[80])?;
    let pid = spliced.pid().context("spliced has no PID")?;
    let listener = raw::listen_in(
        &world,
        Ns::Backend,
        SocketAddr::new(BACKEND_V6, ATTACK_PORT),
    )?;
    let before = rss(pid)?;
    let request = b"GET / HTTP/1.1\r\nHost: mem-http.example\r\n\r\n";
    let cycle: Vec<u8> = request
        .iter()
        .copied()
        .cycle()
        .take(request.len() * 1500)
        .collect();
    let backends = {
        let listener = listener.try_clone()?;
        spawn(move || {
            (0..N)
                .map(|_| raw::accept_within(&listener, IO, IO))
                .collect::<Result<Vec<_>>>()
        })
    };
    let mut clients = Vec::new();
    for _ in 0..N {
        // The backend is connected once a request head arrived.
        let mut c = raw::connect(&world, 80, IO)?;
        c.write_all(request)?;
        clients.push(c);
    }
    let backends = raw::result(&backends, IO, "accepting")?;
    let stop = AtomicBool::new(false);
    let (sent, read, peak) = std::thread::scope(|s| -> Result<(u64, u64, u64)> {
        let sender = s.spawn(|| pump_cycle(&mut clients, &cycle, &stop));
        let reader = s.spawn(|| -> Result<u64> {
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            for b in &backends {
                b.set_nonblocking(true)?;
            }
            while !stop.load(Ordering::Relaxed) {
                let mut any = false;
                for mut b in &backends {
                    if let Ok(n) = b.read(&mut buf) {
                        total += n as u64;
                        any |= n > 0;
                    }
                }
                if !any {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(total)
        });
        let started = Instant::now();
        let mut peak = 0;
        while started.elapsed() < FOR {
            peak = peak.max(rss(pid)?);
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
        let read = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
        Ok((sent, read, peak.max(rss(pid)?)))
    })?;
    eprintln!(
        "memory[pipelined]: {N} clients sent {:.2} MiB of requests, the backend read {:.2} MiB \
         of them with the header added and answered none; spliced's RSS {:.1} -> {:.1} MiB",
        mib(sent),
        mib(read),
        mib(before),
        mib(peak)
    );
    let bound = bound(
        Engine::Http,
        Sysctls {
            rmem_max: 0,
            wmem_max: 0,
        },
    )
    .user;
    ensure!(
        peak.saturating_sub(before) <= N as u64 * bound + RSS_NOISE,
        "{N} connections with unanswered pipelined requests grew spliced's resident memory by \
         {:.1} MiB (bound {} KiB per connection plus {} MiB)",
        mib(peak.saturating_sub(before)),
        bound / KIB,
        RSS_NOISE / MIB
    );
    Ok(())
}

/// The cap on requests waiting for an answer holds requests back, never drops them: 1,000
/// pipelined requests in one go all get their answer, in order.
#[test]
fn pipelined_requests_past_the_cap_are_all_answered() -> Result<()> {
    const REQUESTS: usize = 1000;
    let world = World::new()?;
    let _spliced = Launch::new(config("auto")).start(&world, &[80])?;
    let listener = raw::listen_in(
        &world,
        Ns::Backend,
        SocketAddr::new(BACKEND_V6, ATTACK_PORT),
    )?;
    // Answers each request head as it arrives, numbering the answers.
    let server = spawn(move || -> Result<usize> {
        let mut s = raw::accept_within(&listener, IO, IO)?;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut answered = 0;
        while answered < REQUESTS {
            let n = s.read(&mut buf)?;
            ensure!(n > 0, "the proxy closed after {answered} requests");
            seen.extend_from_slice(&buf[..n]);
            while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                seen.drain(..end + 4);
                let body = format!("{answered:06}");
                s.write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n{body}").as_bytes(),
                )?;
                answered += 1;
            }
        }
        Ok(answered)
    });
    let mut client = raw::connect(&world, 80, IO)?;
    let requests = b"GET / HTTP/1.1\r\nHost: mem-http.example\r\n\r\n".repeat(REQUESTS);
    let mut writer = client.try_clone()?;
    let sender = spawn(move || {
        writer.write_all(&requests)?;
        Ok(())
    });
    let one = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n000000".len();
    let got = raw::read_exactly(&mut client, one * REQUESTS)
        .context("reading the answers to 1,000 pipelined requests")?;
    raw::result(&sender, IO, "sending the requests")?;
    raw::result(&server, IO, "the backend")?;
    let want: String = (0..REQUESTS)
        .map(|i| format!("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n{i:06}"))
        .collect();
    ensure!(
        got == want.as_bytes(),
        "the answers differ: {}",
        raw::difference(&got, want.as_bytes())
    );
    Ok(())
}

/// When only the clients of stalled connections reset, and their backends stay as they are
/// (writing nothing more, reading nothing), spliced must still let the connections go with
/// everything they hold: the backends would never end them.
#[test]
fn attackers_that_reset_are_let_go_while_the_other_side_stays() -> Result<()> {
    const N: usize = 4;
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for engine in [
        Engine::Copy,
        Engine::Splice,
        Engine::Sockmap,
        Engine::Auto,
        Engine::Http,
    ] {
        let world = World::new()?;
        let spliced = Launch::new(config(engine.forwarding()))
            .metrics()
            .start(&world, &[443, 80])?;
        set_kernel_defaults(&world)?;
        let listener = raw::listen_in(
            &world,
            Ns::Backend,
            SocketAddr::new(BACKEND_V6, ATTACK_PORT),
        )?;
        let http = matches!(engine, Engine::Http);
        let backends = {
            let listener = listener.try_clone()?;
            spawn(move || accept_attackers(&listener, N, http))
        };
        let mut clients = Vec::new();
        for _ in 0..N {
            let mut c = raw::connect(&world, if http { 80 } else { 443 }, IO)?;
            small_sndbuf(&c)?;
            if http {
                c.write_all(
                    b"POST / HTTP/1.1\r\nHost: mem-http.example\r\nContent-Length: 1099511627776\r\n\r\n",
                )?;
            } else {
                c.write_all(&simple_hello("mem.example"))?;
            }
            clients.push(c);
        }
        let mut backends = raw::result(&backends, IO, "accepting the attacking connections")?;
        let stop = AtomicBool::new(false);
        let (up, down) = std::thread::scope(|s| {
            let up = s.spawn(|| pump(&mut clients, &stop));
            let down = s.spawn(|| pump(&mut backends, &stop));
            (up.join(), down.join())
        });
        let (Ok(up), Ok(down)) = (up, down) else {
            anyhow::bail!("a pump panicked");
        };
        let (up, down) = (up?, down?);
        let held = sockets(&world)?.bytes;
        for c in clients.drain(..) {
            raw::reset(c)?;
        }
        let started = Instant::now();
        let mut open = u64::MAX;
        let mut left = held;
        wait_for(
            "spliced to let go of connections whose clients reset",
            Duration::from_secs(5),
            || {
                open = spliced.metrics()?.count("spliced_open_connections", &[])?;
                left = sockets(&world)?.bytes;
                Ok(open == 0 && left <= KERNEL_KEPT)
            },
        )
        .with_context(|| {
            format!(
                "{engine:?}: {open} of {N} connections still open, sockets {:.1} MiB (held \
                 {:.1} MiB after {:.0} MiB up and {:.0} MiB down)\n{}",
                mib(left),
                mib(held),
                mib(up),
                mib(down),
                proxy_sockets(&world)
            )
        })?;
        eprintln!(
            "memory[{engine:?}]: {N} connections holding {:.1} MiB let go {:.2?} after their \
             clients reset",
            mib(held),
            started.elapsed()
        );
        drop(backends);
    }
    Ok(())
}
