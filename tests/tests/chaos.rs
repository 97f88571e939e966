//! Chaos, per engine: many connections at once with random sizes and a random mix of normal
//! two-way transfers, half-closes from either side, resets from either side, stalled readers
//! (that resume, or that never do and are aborted by their peer) and a backend process that is
//! killed mid-transfer, while nftables drops packets at random on the egress of the client,
//! proxy and backend namespaces.
//!
//! What a user would notice is checked: every byte that arrives is checked by position (each
//! connection has its own streams, so a byte of another connection shows too); a transfer that
//! should complete arrives complete, followed by a clean end of stream; and every abort (a reset
//! on one side, the backend's death) reaches the other side as an abort (ECONNRESET or EPIPE),
//! never as a clean end of stream that would pass a truncated stream off as complete.
//! Afterwards spliced holds no more descriptors than before, the proxy namespace has no TCP
//! socket left (other than listeners and TIME-WAIT), the socket maps are empty, and after
//! spliced exits no pin is left.
//!
//! Each engine's run ends with one line, e.g. `chaos engine=splice conns=1000 ...`, written to
//! standard error (past the test harness's capture, so `./x test` shows it) and to
//! `target/tmp/chaos-ENGINE.summary`.
//!
//! Knobs (environment): `SPLICED_CHAOS_CONNS` (connections per engine, default 1000),
//! `SPLICED_CHAOS_SEED` (replays a run: the seed is in the summary), `SPLICED_CHAOS_PARALLEL`
//! (connections at once, default 24), `SPLICED_CHAOS_DROP_EVERY` (drop one packet in this many
//! on each egress, default 200), `SPLICED_CHAOS_MAX_KIB` (the largest transfer, default 4096).
//!
//! Run as root with a release build of the proxy: `cargo xtask build && cargo test --release
//! -p spliced-tests --test chaos`.
use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{libc, sys::signal::Signal};
use spliced_tests::{
    BACKEND_V6, Ns, PROXY_V4, Service, World, env_or, open_files,
    raw::{self, BLOCK, Stream, Verifier, XorShift, simple_hello},
    sockmap::CONNECTION_MAPS,
    spliced::Launch,
    wait_for,
};

/// Where the test's own backend listens (site `chaos.example`).
const PORT: u16 = 9400;
/// Where the backend process that gets killed listens (site `dying.example`).
const DIES_PORT: u16 = 9401;
/// The first bytes after the hello: [`MAGIC`], the connection's id, its downstream length.
const CONTROL_LEN: usize = 16;
/// What a control record starts with (`src/bin/dying-backend.rs` checks it too).
const MAGIC: u32 = 0x4348_414f;
/// "Until the connection ends": the length of a stream that is never sent to its end.
const ENDLESS: u64 = 1 << 40;
/// How long one connection may take, whatever happens to it.
const CONN_LIMIT: Duration = Duration::from_secs(90);
/// How long all connections of one engine may take.
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// How long leftovers (sockets closing under packet loss, map entries) may take to go away.
const SETTLE: Duration = Duration::from_secs(30);
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn config(engine: &str, extra: &str) -> String {
    format!(
        r#"[defaults]
forwarding = "{engine}"
client_hello_timeout = "5s"
connect_timeout = "5s"
{extra}

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[site]]
hostnames = ["chaos.example"]
backend = "[{BACKEND_V6}]:{PORT}"

[[site]]
hostnames = ["dying.example"]
backend = "[{BACKEND_V6}]:{DIES_PORT}"
"#
    )
}

// ---------------------------------------------------------------------------------------------
// What each connection does
// ---------------------------------------------------------------------------------------------

/// The scenario of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Both send at once, then half-close; both read everything and the clean end.
    Normal,
    /// The client sends everything and half-closes; only then does the backend answer.
    ClientHalfClose,
    /// The backend sends everything and half-closes first; only then does the client send.
    BackendHalfClose,
    /// Both send endlessly; the client resets after receiving `cut` bytes.
    ClientReset,
    /// Both send endlessly; the backend resets after receiving `cut` bytes.
    BackendReset,
    /// A normal transfer whose client stops reading for `stall` after `cut` bytes.
    ClientStall,
    /// A normal transfer whose backend stops reading for `stall` after `cut` bytes.
    BackendStall,
    /// The client stops reading after `cut` bytes of an endless download; the backend gives
    /// up after `stall / 2` and resets; the client reads again after `stall`.
    ClientStallAborted,
    /// The backend stops reading after `cut` bytes of an endless upload; the client gives up
    /// after `stall / 2` and resets; the backend reads again after `stall`.
    BackendStallAborted,
    /// The client uploads endlessly to a backend process that sent `down` bytes, stopped
    /// reading, and is then killed.
    BackendDies,
}

/// One connection's script, drawn from the seed.
#[derive(Clone, Copy, Debug)]
struct Plan {
    id: u32,
    kind: Kind,
    /// Bytes the client sends (or [`ENDLESS`]).
    up: u64,
    /// Bytes the backend sends (or [`ENDLESS`]).
    down: u64,
    /// Where the scenario's event happens, in bytes received by the side it happens to.
    cut: u64,
    stall: Duration,
    up_seed: u64,
    down_seed: u64,
}

fn up_seed(base: u64, id: u32) -> u64 {
    base.rotate_left(29) ^ u64::from(id).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

/// `src/bin/dying-backend.rs` computes the same (its base comes in the environment).
fn down_seed(base: u64, id: u32) -> u64 {
    base ^ u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Random in `lo..=hi`.
fn between(rng: &mut XorShift, lo: u64, hi: u64) -> u64 {
    lo + rng.next_u64() % (hi - lo + 1)
}

/// A transfer size: mostly small, some medium, a few up to `max` (and now and then empty).
fn size(rng: &mut XorShift, max: u64) -> u64 {
    match rng.next_u64() % 100 {
        0..5 => 0,
        5..55 => between(rng, 1, 64 * KIB),
        55..90 => between(rng, 64 * KIB, MIB.min(max)),
        _ => between(rng, MIB.min(max), max),
    }
}

/// A size large enough that a stalled reader fills the buffers on the way.
fn large(rng: &mut XorShift, max: u64) -> u64 {
    between(rng, (512 * KIB).min(max), max)
}

/// `n` connections' plans from `seed` (ids 1 to `n`; one in twenty goes to the backend that
/// dies), after plan 0, a small normal transfer to warm up with.
fn plans(seed: u64, n: u32, max: u64) -> Vec<Plan> {
    let mut rng = XorShift::new(seed);
    let dying = n / 20;
    (0..=n)
        .map(|id| {
            let kind = if id == 0 {
                Kind::Normal
            } else if id > n - dying {
                Kind::BackendDies
            } else {
                match rng.next_u64() % 40 {
                    0..10 => Kind::Normal,
                    10..14 => Kind::ClientHalfClose,
                    14..18 => Kind::BackendHalfClose,
                    18..22 => Kind::ClientReset,
                    22..26 => Kind::BackendReset,
                    26..30 => Kind::ClientStall,
                    30..34 => Kind::BackendStall,
                    34..37 => Kind::ClientStallAborted,
                    _ => Kind::BackendStallAborted,
                }
            };
            let stall = Duration::from_millis(between(&mut rng, 200, 1000));
            let (mut up, mut down, mut cut) = (size(&mut rng, max), size(&mut rng, max), 0);
            if id == 0 {
                (up, down) = (1000, 1000);
            }
            match kind {
                Kind::ClientReset => {
                    let most = large(&mut rng, max);
                    cut = between(&mut rng, 1, most);
                    (up, down) = (ENDLESS, ENDLESS);
                }
                Kind::BackendReset => {
                    let most = large(&mut rng, max);
                    cut = between(&mut rng, 0, most);
                    (up, down) = (ENDLESS, ENDLESS);
                }
                Kind::ClientStall => {
                    down = large(&mut rng, max);
                    cut = between(&mut rng, 0, down / 2);
                }
                Kind::BackendStall => {
                    up = large(&mut rng, max);
                    cut = between(&mut rng, 0, up / 2);
                }
                Kind::ClientStallAborted => {
                    cut = between(&mut rng, 1, 64 * KIB);
                    (up, down) = (up.min(64 * KIB), ENDLESS);
                }
                Kind::BackendStallAborted => {
                    cut = between(&mut rng, 0, 64 * KIB);
                    (up, down) = (ENDLESS, between(&mut rng, 1, 64 * KIB));
                }
                Kind::BackendDies => {
                    (up, down) = (ENDLESS, down.min(256 * KIB));
                }
                Kind::Normal | Kind::ClientHalfClose | Kind::BackendHalfClose => {}
            }
            Plan {
                id,
                kind,
                up,
                down,
                cut,
                stall,
                up_seed: up_seed(seed, id),
                down_seed: down_seed(seed, id),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// One end of a connection: sends its stream, checks the other's, notices how it ended
// ---------------------------------------------------------------------------------------------

/// A non-blocking socket that sends a positional stream and verifies the one it receives, on
/// one thread: after a reset only the first call sees ECONNRESET (a read after a write took it
/// sees a plain end of stream), so reads and writes must not be split between threads.
struct End {
    sock: TcpStream,
    out: Stream,
    sent: u64,
    send_len: u64,
    /// Half-close once `send_len` bytes are sent.
    shut_after: bool,
    shut: bool,
    verifier: Verifier,
    /// A clean end of stream was read.
    eof: bool,
    /// How an abort showed (ECONNRESET, EPIPE...).
    abort: Option<io::ErrorKind>,
    buf: Vec<u8>,
}

fn later(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn is_abort(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

impl End {
    fn new(
        sock: TcpStream,
        (send_seed, send_len, shut_after): (u64, u64, bool),
        (recv_seed, recv_len): (u64, u64),
    ) -> Result<End> {
        sock.set_nonblocking(true)?;
        Ok(End {
            sock,
            out: Stream::new(send_seed),
            sent: 0,
            send_len,
            shut_after,
            shut: false,
            verifier: Verifier::new(recv_seed, recv_len),
            eof: false,
            abort: None,
            buf: vec![0; BLOCK],
        })
    }

    fn received(&self) -> u64 {
        self.verifier.received()
    }

    /// Writes and reads once each (as allowed) without blocking; whether anything happened.
    fn step(&mut self, read: bool, write: bool) -> Result<bool> {
        let mut progress = false;
        if write && self.abort.is_none() {
            if self.sent < self.send_len {
                let chunk = self.out.at(self.sent);
                let n = chunk
                    .len()
                    .min(usize::try_from(self.send_len - self.sent).unwrap_or(usize::MAX));
                match self.sock.write(&chunk[..n]) {
                    Ok(n) => {
                        self.sent += n as u64;
                        progress = true;
                    }
                    Err(e) if later(&e) => {}
                    Err(e) if is_abort(e.kind()) => {
                        self.abort = Some(e.kind());
                        return Ok(true);
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("writing after {}", self.sent));
                    }
                }
            }
            if self.sent == self.send_len && self.shut_after && !self.shut {
                match self.sock.shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    Err(e) if is_abort(e.kind()) => self.abort = Some(e.kind()),
                    Err(e) => return Err(e).context("half-closing"),
                }
                self.shut = true;
                progress = true;
            }
        }
        if read && !self.eof && self.abort.is_none() {
            match self.sock.read(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    progress = true;
                }
                Ok(n) => {
                    self.verifier
                        .feed(&self.buf[..n])
                        .context("the received stream is corrupt")?;
                    progress = true;
                }
                Err(e) if later(&e) => {}
                Err(e) if is_abort(e.kind()) => {
                    self.abort = Some(e.kind());
                    progress = true;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("reading after {}", self.received()));
                }
            }
        }
        Ok(progress)
    }

    /// Waits (up to 20 ms) until the socket can do what `step` would try.
    fn wait(&self, read: bool, write: bool) {
        let mut events = 0;
        if read && !self.eof {
            events |= libc::POLLIN;
        }
        if write && self.sent < self.send_len {
            events |= libc::POLLOUT;
        }
        if events == 0 {
            std::thread::sleep(Duration::from_millis(20));
            return;
        }
        let mut fd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&raw mut fd, 1, 20) };
    }

    /// Reads and writes (as allowed) until `done`, an abort, or `deadline` (an error).
    fn until(
        &mut self,
        deadline: Instant,
        read: bool,
        write: bool,
        done: impl Fn(&End) -> bool,
    ) -> Result<()> {
        loop {
            if done(self) || self.abort.is_some() {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "stuck: {}", self.state());
            if !self.step(read, write)? {
                self.wait(read, write);
            }
        }
    }

    /// Does not read for `pause` (writes if `write`).
    fn stall(&mut self, pause: Duration, write: bool) -> Result<()> {
        let end = Instant::now() + pause;
        while Instant::now() < end && self.abort.is_none() {
            if !self.step(false, write)? {
                self.wait(false, write);
            }
        }
        Ok(())
    }

    /// Fails unless the whole stream arrived, then a clean end, and nothing was aborted.
    fn expect_complete(&self) -> Result<()> {
        ensure!(
            self.abort.is_none() && self.eof,
            "expected a complete transfer: {}",
            self.state()
        );
        self.verifier.finish()
    }

    /// Fails unless nothing was aborted so far.
    fn expect_no_abort(&self) -> Result<()> {
        ensure!(self.abort.is_none(), "unexpected abort: {}", self.state());
        Ok(())
    }

    /// Fails unless the peer's abort was seen as one (not as a clean end of stream).
    fn expect_abort(&self, what: &str) -> Result<()> {
        ensure!(
            self.abort.is_some(),
            "{what}, but this side saw no abort: {}",
            self.state()
        );
        Ok(())
    }

    fn state(&self) -> String {
        format!(
            "sent {} of {}{}, received {} (verified), {}",
            self.sent,
            if self.send_len == ENDLESS {
                "endless".to_owned()
            } else {
                self.send_len.to_string()
            },
            if self.shut { " and half-closed" } else { "" },
            self.received(),
            match (self.abort, self.eof) {
                (Some(kind), _) => format!("aborted ({kind:?})"),
                (None, true) => "clean end of stream".to_owned(),
                (None, false) => "still open".to_owned(),
            }
        )
    }

    /// Closes with a reset (`SO_LINGER` 0).
    fn reset(self) -> Result<()> {
        raw::reset(self.sock)
    }
}

/// What one side of one connection reports.
#[derive(Clone, Debug, Default)]
struct Report {
    /// Stream bytes verified on arrival.
    verified: u64,
    /// An abort was seen (as expected: an unexpected one is an error).
    abort_seen: bool,
    /// This side reset the connection.
    reset: bool,
}

fn report(end: &End) -> Report {
    Report {
        verified: end.received(),
        abort_seen: end.abort.is_some(),
        reset: false,
    }
}

/// Each connection's client address, to find its access-log line when it fails.
static CLIENT_ADDRS: Mutex<BTreeMap<u32, SocketAddr>> = Mutex::new(BTreeMap::new());

/// Connects to the proxy and sends the hello and the control record of `plan`.
fn connect(plan: &Plan, hello: &[u8]) -> Result<TcpStream> {
    let addr = SocketAddr::new(PROXY_V4, 443);
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    lock(&CLIENT_ADDRS).insert(plan.id, sock.local_addr()?);
    sock.set_nodelay(true)?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut head = hello.to_vec();
    head.extend_from_slice(&MAGIC.to_le_bytes());
    head.extend_from_slice(&plan.id.to_le_bytes());
    head.extend_from_slice(&plan.down.to_le_bytes());
    sock.write_all(&head).context("sending the hello")?;
    Ok(sock)
}

/// The client's part of `plan`, from the client namespace.
fn client(plan: &Plan, hello: &[u8]) -> Result<Report> {
    let deadline = Instant::now() + CONN_LIMIT;
    let sock = connect(plan, hello)?;
    let shut = plan.up != ENDLESS;
    let mut end = End::new(
        sock,
        (plan.up_seed, plan.up, shut),
        (plan.down_seed, plan.down),
    )?;
    let (r, w) = (true, true);
    match plan.kind {
        Kind::Normal | Kind::BackendStall => {
            end.until(deadline, r, w, |e| e.shut && e.eof)?;
            end.expect_complete()?;
        }
        Kind::ClientHalfClose => {
            end.until(deadline, false, w, |e| e.shut)?;
            end.until(deadline, r, false, |e| e.eof)?;
            end.expect_complete()?;
        }
        Kind::BackendHalfClose => {
            end.until(deadline, r, false, |e| e.eof)?;
            end.until(deadline, r, w, |e| e.shut)?;
            end.expect_complete()?;
        }
        Kind::ClientReset => {
            end.until(deadline, r, w, |e| e.received() >= plan.cut)?;
            end.expect_no_abort()?;
            let mut rep = report(&end);
            end.reset()?;
            rep.reset = true;
            return Ok(rep);
        }
        Kind::BackendReset => {
            end.until(deadline, r, w, |e| e.eof)?;
            end.expect_abort("the backend reset mid-transfer")?;
        }
        Kind::ClientStall => {
            end.until(deadline, r, w, |e| e.received() >= plan.cut || e.eof)?;
            end.stall(plan.stall, w)?;
            end.until(deadline, r, w, |e| e.shut && e.eof)?;
            end.expect_complete()?;
        }
        Kind::ClientStallAborted => {
            end.until(deadline, r, w, |e| e.received() >= plan.cut)?;
            end.stall(plan.stall, w)?;
            end.until(deadline, r, w, |e| e.eof)?;
            end.expect_abort("the backend reset while this client did not read")?;
        }
        Kind::BackendStallAborted => {
            let started = Instant::now();
            let give_up = plan.stall / 2;
            end.until(deadline, r, w, |e| {
                e.received() >= 1 && started.elapsed() >= give_up
            })?;
            end.expect_no_abort()?;
            let mut rep = report(&end);
            end.reset()?;
            rep.reset = true;
            return Ok(rep);
        }
        Kind::BackendDies => {
            unreachable!("dying connections run in dying_client")
        }
    }
    Ok(report(&end))
}

/// The backend's part of `plan` on an accepted connection (the control record already read).
fn backend(plan: &Plan, sock: TcpStream) -> Result<Report> {
    let deadline = Instant::now() + CONN_LIMIT;
    let shut = plan.down != ENDLESS;
    let mut end = End::new(
        sock,
        (plan.down_seed, plan.down, shut),
        (plan.up_seed, plan.up),
    )?;
    let (r, w) = (true, true);
    match plan.kind {
        Kind::Normal | Kind::ClientStall => {
            end.until(deadline, r, w, |e| e.shut && e.eof)?;
            end.expect_complete()?;
        }
        Kind::ClientHalfClose => {
            end.until(deadline, r, false, |e| e.eof)?;
            end.until(deadline, r, w, |e| e.shut)?;
            end.expect_complete()?;
        }
        Kind::BackendHalfClose => {
            end.until(deadline, false, w, |e| e.shut)?;
            end.until(deadline, r, false, |e| e.eof)?;
            end.expect_complete()?;
        }
        Kind::ClientReset => {
            end.until(deadline, r, w, |e| e.eof)?;
            end.expect_abort("the client reset mid-transfer")?;
        }
        Kind::BackendReset => {
            end.until(deadline, r, w, |e| e.received() >= plan.cut)?;
            end.expect_no_abort()?;
            let mut rep = report(&end);
            end.reset()?;
            rep.reset = true;
            return Ok(rep);
        }
        Kind::BackendStall => {
            end.until(deadline, r, w, |e| e.received() >= plan.cut || e.eof)?;
            end.stall(plan.stall, w)?;
            end.until(deadline, r, w, |e| e.shut && e.eof)?;
            end.expect_complete()?;
        }
        Kind::ClientStallAborted => {
            let started = Instant::now();
            let give_up = plan.stall / 2;
            end.until(deadline, r, w, |_| started.elapsed() >= give_up)?;
            end.expect_no_abort()?;
            let mut rep = report(&end);
            end.reset()?;
            rep.reset = true;
            return Ok(rep);
        }
        Kind::BackendStallAborted => {
            end.until(deadline, r, w, |e| e.received() >= plan.cut)?;
            end.stall(plan.stall, w)?;
            end.until(deadline, r, w, |e| e.eof)?;
            end.expect_abort("the client reset while this backend did not read")?;
        }
        Kind::BackendDies => bail!("a dying connection reached the test's own backend"),
    }
    Ok(report(&end))
}

/// The client of a connection to the backend process that dies: uploads endlessly, checks the
/// `down` bytes the backend sent, says on `ready` when it has them, and expects an abort.
fn dying_client(plan: &Plan, hello: &[u8], ready: &AtomicUsize) -> Result<Report> {
    let deadline = Instant::now() + CONN_LIMIT;
    let sock = connect(plan, hello)?;
    let mut end = End::new(
        sock,
        (plan.up_seed, ENDLESS, false),
        (plan.down_seed, plan.down),
    )?;
    let down = plan.down;
    end.until(deadline, true, true, |e| {
        e.received() == down && e.sent >= 64 * KIB
    })?;
    end.expect_no_abort()?;
    ready.fetch_add(1, Ordering::SeqCst);
    end.until(deadline, true, true, |e| e.eof)?;
    end.expect_abort("the backend process was killed with unread data")?;
    Ok(report(&end))
}

// ---------------------------------------------------------------------------------------------
// The test's own backend
// ---------------------------------------------------------------------------------------------

type Results = Arc<Mutex<BTreeMap<u32, Result<Report, String>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Accepts connections in the backend namespace until `stop`, each served on its own thread
/// by the plan its control record names; results go to `results` by connection id.
fn serve_backend(
    listener: TcpListener,
    plans: Arc<Vec<Plan>>,
    hello_len: usize,
    results: Results,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = listener.set_nonblocking(true);
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let sock = match listener.accept() {
                Ok((sock, _)) => sock,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
            };
            let (plans, results) = (plans.clone(), results.clone());
            let spawned = std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut id = None;
                    let result = (|| -> Result<Report> {
                        let mut sock = sock;
                        sock.set_nonblocking(false)?;
                        sock.set_nodelay(true)?;
                        sock.set_read_timeout(Some(Duration::from_secs(20)))?;
                        let mut head = vec![0u8; hello_len + CONTROL_LEN];
                        sock.read_exact(&mut head)
                            .context("reading the hello and control record")?;
                        let control = &head[hello_len..];
                        let word = |i: usize| {
                            u32::from_le_bytes([
                                control[i],
                                control[i + 1],
                                control[i + 2],
                                control[i + 3],
                            ])
                        };
                        ensure!(word(0) == MAGIC, "no control record after the hello");
                        let plan = plans
                            .get(word(4) as usize)
                            .context("a control record names no plan")?;
                        id = Some(plan.id);
                        backend(plan, sock)
                    })();
                    let key = id.unwrap_or(u32::MAX);
                    let mut results = lock(&results);
                    let value = result.map_err(|e| format!("backend: {e:#}"));
                    if key == u32::MAX {
                        // Cannot happen unless bytes were lost before the control record.
                        let n = results.keys().filter(|&&k| k >= u32::MAX - 1000).count();
                        results.insert(
                            u32::MAX - n as u32,
                            Err(format!("unknown connection: {value:?}")),
                        );
                    } else {
                        results.insert(key, value);
                    }
                });
            if let Ok(t) = spawned {
                threads.retain(|t| !t.is_finished());
                threads.push(t);
            }
        }
        for t in threads {
            let _ = t.join();
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The world's state: drops, sockets, descriptors, maps, pins
// ---------------------------------------------------------------------------------------------

/// Drops one packet in `every` at random on the egress of every namespace. SYNs are spared (a
/// lost handshake costs a second and tests nothing here), and so are resets: TCP does not
/// retransmit a reset, so a lost one leaves a peer that only reads (a stalled reader coming
/// back, a backend waiting for the rest) open until a timeout whatever the proxy does; that is
/// TCP's, not the proxy's to fix.
fn drop_at_random(world: &World, every: u64) -> Result<()> {
    for (ns, family) in [
        (Ns::Client, "ip"),
        (Ns::Proxy, "inet"),
        (Ns::Backend, "ip6"),
    ] {
        let script = format!(
            "add table {family} chaos\n\
             add chain {family} chaos out {{ type filter hook output priority 0; }}\n\
             add rule {family} chaos out tcp flags & (syn | rst) == 0 \
             numgen random mod {every} == 0 counter drop\n"
        );
        world.nft(ns, "chaos.nft", &script)?;
    }
    Ok(())
}

/// Packets the random drops dropped, in all three namespaces.
fn dropped(world: &World) -> u64 {
    [Ns::Client, Ns::Proxy, Ns::Backend]
        .into_iter()
        .filter_map(|ns| {
            world
                .command(ns, "nft")
                .args(["list", "ruleset"])
                .output()
                .ok()
        })
        .map(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split("packets ")
                .skip(1)
                .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// TCP sockets in the proxy namespace other than listeners and TIME-WAIT (which holds no
/// descriptor and no buffer), as `ss` lists them.
fn proxy_sockets_left(world: &World) -> Result<Vec<String>> {
    let out = world.command(Ns::Proxy, "ss").args(["-Htanp"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("LISTEN") && !l.starts_with("TIME-WAIT"))
        .map(str::to_owned)
        .collect())
}

/// A bpffs mounted in the world's directory, for spliced's pins: under `ip netns exec` spliced
/// has its own mount namespace, but this mount is in it too, so the pins can be read (and
/// their removal checked) from here. Unmounted on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(world: &World) -> Result<Bpffs> {
        let dir = world.dir().join("bpf");
        std::fs::create_dir_all(&dir)?;
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .output()?;
        ensure!(
            out.status.success(),
            "mounting bpffs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Bpffs(dir))
    }

    /// Where spliced pins (it makes the directory and removes it when it exits).
    fn pin_dir(&self) -> PathBuf {
        self.0.join("spliced")
    }

    /// Everything in the mount but the kernel's own `maps.debug` and `progs.debug`.
    fn contents(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut dirs = vec![self.0.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if dir == self.0 && path.extension().is_some_and(|e| e == "debug") {
                    continue;
                }
                found.push(path.display().to_string());
                if path.is_dir() {
                    dirs.push(path);
                }
            }
        }
        found
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// Entries in each per-connection map pinned in `dir` (a socket hash's dump lists keys whose
/// values cannot be read back; they count too).
fn map_entries(dir: &Path) -> Result<Vec<(String, usize)>> {
    CONNECTION_MAPS
        .iter()
        .map(|m| {
            let out = Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(dir.join(m))
                .arg("-j")
                .output()
                .context("running bpftool")?;
            ensure!(
                out.status.success(),
                "bpftool map dump {m}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("parsing bpftool's dump of {m}"))?;
            Ok(((*m).to_owned(), entries.len()))
        })
        .collect()
}

/// spliced's descriptors other than pipe ends (the splice engine keeps up to 64 empty pipes
/// for reuse, `tests/resources.rs` checks that pool) and the descriptors' targets.
fn descriptors(pid: u32) -> Result<(usize, Vec<String>)> {
    let files = open_files(pid)?;
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .filter(|t| !t.starts_with("pipe:"))
        .collect();
    targets.sort();
    Ok((files.other, targets))
}

// ---------------------------------------------------------------------------------------------
// One engine's run
// ---------------------------------------------------------------------------------------------

/// Writes past the test harness's output capture, so that `cargo test` shows it on success.
fn say(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// What a run of one engine counted.
#[derive(Default)]
struct Tally {
    conns: usize,
    bytes: u64,
    intact: usize,
    aborts_seen: usize,
    resets: usize,
    half_closes: usize,
    stalls: usize,
    deaths: usize,
    failures: Vec<String>,
}

fn seed() -> u64 {
    std::env::var("SPLICED_CHAOS_SEED")
        .ok()
        .and_then(|v| {
            let v = v.trim();
            v.strip_prefix("0x")
                .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
        })
}

/// One engine at a time: the engines share two cores, and a run alone says more.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn chaos(engine: &str, forwarding: &str, extra: &str) -> Result<()> {
    let _alone = lock(&ONE_AT_A_TIME);
    let seed = seed();
    let n = u32::try_from(env_or("SPLICED_CHAOS_CONNS", 1000)).unwrap_or(1000);
    let parallel = usize::try_from(env_or("SPLICED_CHAOS_PARALLEL", 24)).unwrap_or(24);
    let every = env_or("SPLICED_CHAOS_DROP_EVERY", 200);
    let max = env_or("SPLICED_CHAOS_MAX_KIB", 4096) * KIB;
    say(&format!(
        "chaos engine={engine}: seed={seed:#x} conns={n} parallel={parallel} drop_every={every} \
         (replay with SPLICED_CHAOS_SEED={seed:#x})"
    ));
    let plans = Arc::new(plans(seed, n, max));
    lock(&CLIENT_ADDRS).clear();
    let world = World::new()?;
    let bpffs = Bpffs::mount(&world)?;
    let mut spliced = Launch::new(config(forwarding, extra))
        .arg("--pin-dir")
        .arg(bpffs.pin_dir())
        .metrics()
        .start(&world, &[443])?;
    let pid = spliced.pid().context("spliced has no pid")?;
    let hello = simple_hello("chaos.example");
    let dies_hello = simple_hello("dying.example");
    ensure!(
        hello.len() == dies_hello.len(),
        "the hellos differ in length"
    );

    let results: Results = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let listener = raw::listen_in(&world, Ns::Backend, SocketAddr::new(BACKEND_V6, PORT))?;
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(1024)?)?;
    let acceptor = serve_backend(
        listener,
        plans.clone(),
        hello.len(),
        results.clone(),
        stop.clone(),
    );
    let dying_bin = env!("CARGO_BIN_EXE_dying-backend");
    let mut dying_cmd = world.command(Ns::Backend, dying_bin);
    dying_cmd
        .arg(DIES_PORT.to_string())
        .arg(hello.len().to_string())
        .env("SPLICED_CHAOS_DOWN_BASE", seed.to_string());
    let mut dying =
        Service::start("dying-backend", dying_cmd, world.dir())?.stop_with(Signal::SIGKILL);
    wait_for(
        "the dying backend to listen",
        Duration::from_secs(10),
        || {
            dying.check_running()?;
            Ok(dying.stdout_text().contains("listening"))
        },
    )?;

    // The baseline, after one warm-up connection (plan 0: whatever spliced opens on first use).
    world
        .within(Ns::Client, || client(&plans[0], &hello))?
        .context("the warm-up connection")?;
    wait_for("the warm-up connection to close", SETTLE, || {
        Ok(spliced.metrics()?.count("spliced_open_connections", &[])? == 0)
    })?;
    let (baseline, baseline_fds) = descriptors(pid)?;
    lock(&results).remove(&0);

    drop_at_random(&world, every)?;
    let started = Instant::now();
    let next = AtomicUsize::new(1);
    let ready = AtomicUsize::new(0);
    let client_results: Mutex<BTreeMap<u32, Result<Report, String>>> = Mutex::default();
    let main: Vec<&Plan> = plans[1..]
        .iter()
        .filter(|p| p.kind != Kind::BackendDies)
        .collect();
    let doomed: Vec<&Plan> = plans[1..]
        .iter()
        .filter(|p| p.kind == Kind::BackendDies)
        .collect();
    let killed = world.within(Ns::Client, || {
        std::thread::scope(|s| -> Result<bool> {
            for _ in 0..parallel {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst) - 1;
                        let Some(plan) = main.get(i) else { break };
                        if started.elapsed() > RUN_LIMIT {
                            lock(&client_results)
                                .insert(plan.id, Err(format!("not started within {RUN_LIMIT:?}")));
                            continue;
                        }
                        let r = client(plan, &hello).map_err(|e| format!("client: {e:#}"));
                        lock(&client_results).insert(plan.id, r);
                    }
                });
            }
            // The connections to the backend that dies, all at once, a third into the run.
            while next.load(Ordering::SeqCst) < main.len() / 3 && started.elapsed() < RUN_LIMIT {
                std::thread::sleep(Duration::from_millis(20));
            }
            let handles: Vec<_> = doomed
                .iter()
                .map(|plan| {
                    let (dies_hello, ready) = (&dies_hello, &ready);
                    s.spawn(move || {
                        let r = dying_client(plan, dies_hello, ready)
                            .map_err(|e| format!("client: {e:#}"));
                        (plan.id, r)
                    })
                })
                .collect();
            let all_ready = wait_for(
                "every connection to the dying backend to be mid-transfer",
                Duration::from_secs(60),
                || {
                    let backend_ready = dying
                        .stdout_text()
                        .lines()
                        .filter(|l| l.starts_with("ready "))
                        .count();
                    Ok(ready.load(Ordering::SeqCst) == doomed.len()
                        && backend_ready == doomed.len())
                },
            );
            let killed = dying.terminate(Duration::from_secs(5)).is_ok();
            for h in handles {
                let (id, r) = h
                    .join()
                    .unwrap_or_else(|_| (u32::MAX, Err("a dying client panicked".to_owned())));
                lock(&client_results).insert(id, r);
            }
            all_ready?;
            Ok(killed)
        })
    })??;
    ensure!(killed, "the dying backend could not be killed");

    // Collect: every connection's both sides.
    let mut tally = Tally::default();
    let backend_done = wait_for("every backend side to report", SETTLE, || {
        Ok(lock(&results).len() >= main.len())
    });
    stop.store(true, Ordering::SeqCst);
    let _ = acceptor.join();
    let client_results = client_results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut backend_results = lock(&results).clone();
    for plan in main.iter().chain(&doomed) {
        tally.conns += 1;
        let c = client_results
            .get(&plan.id)
            .cloned()
            .unwrap_or_else(|| Err("client: no result".to_owned()));
        let b = if plan.kind == Kind::BackendDies {
            Ok(Report::default())
        } else {
            backend_results
                .remove(&plan.id)
                .unwrap_or_else(|| Err("backend: the connection never arrived".to_owned()))
        };
        match plan.kind {
            Kind::ClientHalfClose | Kind::BackendHalfClose => tally.half_closes += 1,
            Kind::ClientStall | Kind::BackendStall => tally.stalls += 1,
            Kind::BackendDies => tally.deaths += 1,
            _ => {}
        }
        match (&c, &b) {
            (Ok(c), Ok(b)) => {
                tally.intact += 1;
                tally.bytes += c.verified + b.verified;
                tally.aborts_seen += usize::from(c.abort_seen) + usize::from(b.abort_seen);
                tally.resets += usize::from(c.reset) + usize::from(b.reset);
            }
            _ => {
                let why: Vec<&String> = [&c, &b]
                    .into_iter()
                    .filter_map(|r| r.as_ref().err())
                    .collect();
                let line = lock(&CLIENT_ADDRS).get(&plan.id).map_or_else(
                    || "no client address".to_owned(),
                    |&a| {
                        spliced
                            .log_line_for(a, Duration::from_secs(1))
                            .unwrap_or_else(|_| format!("no access-log line for {a}"))
                    },
                );
                tally.failures.push(format!(
                    "connection {} {plan:?}: {why:?}\n  {line}",
                    plan.id
                ));
            }
        }
    }
    for (id, r) in backend_results {
        if let Err(e) = r {
            tally.failures.push(format!("backend connection {id}: {e}"));
        }
    }
    if let Err(e) = backend_done {
        tally.failures.push(format!("{e:#}"));
    }
    let elapsed = started.elapsed();
    let drops = dropped(&world);

    // Leftovers: connections, descriptors, sockets, map entries; then pins after exit. A
    // check that cannot be made (a failed scrape, bpftool) counts as a leak too.
    let mut leaks = Vec::new();
    let mut leaked = 0;
    if let Err(e) = wait_for("spliced to have no open connection", SETTLE, || {
        Ok(spliced.metrics()?.count("spliced_open_connections", &[])? == 0)
    }) {
        leaks.push(format!("{e:#}"));
        leaked += 1;
    }
    let mut fds = (usize::MAX, Vec::new());
    if let Err(e) = wait_for("spliced's descriptors back to the baseline", SETTLE, || {
        fds = descriptors(pid)?;
        Ok(fds.0 <= baseline)
    }) {
        leaks.push(format!(
            "{e:#}: {} descriptors (before: {baseline}): {:?} (before: {baseline_fds:?})",
            fds.0, fds.1
        ));
        leaked += fds.0.saturating_sub(baseline).max(1);
    }
    let mut sockets = Vec::new();
    if let Err(e) = wait_for("the proxy's sockets to close", SETTLE, || {
        sockets = proxy_sockets_left(&world)?;
        Ok(sockets.is_empty())
    }) {
        leaks.push(format!(
            "{e:#}: {} sockets left:\n{}",
            sockets.len(),
            sockets.join("\n")
        ));
        leaked += sockets.len().max(1);
    }
    let maps = forwarding == "sockmap" || forwarding == "auto";
    let mut entries = Vec::new();
    if maps
        && let Err(e) = wait_for("the socket maps to empty", SETTLE, || {
            entries = map_entries(&bpffs.pin_dir())?;
            Ok(entries.iter().all(|(_, n)| *n == 0))
        })
    {
        leaks.push(format!("{e:#}: map entries left: {entries:?}"));
        leaked += entries.iter().map(|(_, n)| n).sum::<usize>().max(1);
    }
    let outcomes = spliced
        .metrics()
        .map(|m| {
            m.samples
                .iter()
                .filter(|s| s.name == "spliced_connections_total" && s.value > 0.0)
                .map(|s| {
                    format!(
                        "{}={}",
                        s.labels.first().map_or("", |l| l.1.as_str()),
                        s.value
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let status = spliced.terminate(Duration::from_secs(15))?;
    if !status.success() {
        leaks.push(format!("spliced exited with {status}"));
    }
    let pins = bpffs.contents();
    if !pins.is_empty() {
        leaks.push(format!("pins left after exit: {pins:?}"));
        leaked += pins.len();
    }
    let entries_left = if maps {
        entries.iter().map(|(_, n)| n).sum::<usize>().to_string()
    } else {
        "none_used".to_owned()
    };

    let summary = format!(
        "chaos engine={engine} conns={} bytes={} intact={} failed={} aborts_seen={} resets={} \
         half_closes={} stalls={} backend_deaths={} drops={drops} leaks={leaked} (fds={}/{baseline} \
         sockets_left={} map_entries_left={entries_left} pins_left={}) secs={:.1} seed={seed:#x}",
        tally.conns,
        tally.bytes,
        tally.intact,
        tally.failures.len(),
        tally.aborts_seen,
        tally.resets,
        tally.half_closes,
        tally.stalls,
        tally.deaths,
        fds.0,
        sockets.len(),
        pins.len(),
        elapsed.as_secs_f64(),
    );
    say(&summary);
    say(&format!("chaos engine={engine} outcomes: {outcomes}"));
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{engine}.summary"));
    let _ = std::fs::write(&file, format!("{summary}\n"));
    if !tally.failures.is_empty() || !leaks.is_empty() {
        let shown: Vec<&String> = tally.failures.iter().take(20).collect();
        bail!(
            "{summary}\n{} connections failed (first 20):\n{}\nleaks:\n{}\nspliced's \
             diagnostics (end):\n{}",
            tally.failures.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            leaks.join("\n"),
            spliced_tests::sockmap::tail(&spliced.stderr_text(), 30)
        );
    }
    drop(spliced);
    drop(bpffs);
    Ok(())
}

#[test]
fn chaos_copy() -> Result<()> {
    chaos("copy", "copy", "")
}

#[test]
fn chaos_splice() -> Result<()> {
    chaos("splice", "splice", "")
}

/// Every byte through the kernel path, with a small backlog limit so that stalled readers take
/// directions out of the kernel and back.
#[test]
fn chaos_sockmap() -> Result<()> {
    chaos(
        "sockmap",
        "sockmap",
        "sockmap_handoff = 0\nsockmap_backlog_limit = \"512KiB\"",
    )
}

/// The default: splice first, the kernel path after the handoff.
#[test]
fn chaos_auto() -> Result<()> {
    chaos("auto", "auto", "sockmap_backlog_limit = \"1MiB\"")
}
