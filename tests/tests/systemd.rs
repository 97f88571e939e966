//! systemd's notify protocol as a `Type=notify` unit sees it: the test binds the datagram
//! socket that systemd would (`NOTIFY_SOCKET`), sets `WATCHDOG_USEC`, and reads what spliced
//! tells it while a client uses the proxy.
//!
//! This checks the protocol, not a real systemd: on the test machines systemd is installed but
//! is not PID 1, so no unit can be started. The unit itself is checked by `tests/tests/deb.rs`.
//!
//! Run as root (network namespaces) with a release build of the proxy:
//! `cargo xtask build && SPLICED_BIN=$PWD/target/release/spliced cargo test --release -p spliced-tests --test systemd`.
use std::{
    io::Write as _,
    net::{Shutdown, SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    sys::signal::{Signal, kill},
    time::{ClockId, clock_gettime},
    unistd::Pid,
};
use spliced_tests::{
    BACKEND_V6, World,
    raw::{self, Behavior, End, TestBackend, expect_hello, simple_hello},
    spliced::Launch,
};

const ECHO_PORT: u16 = 9330;
const IO: Duration = Duration::from_secs(10);
/// The watchdog timeout the test announces; spliced should ping every half of it.
const WATCHDOG: Duration = Duration::from_secs(1);

fn config(hostnames: &[&str]) -> String {
    let backend = SocketAddr::new(BACKEND_V6, ECHO_PORT);
    let mut text = String::from(
        "[defaults]\nforwarding = \"splice\"\n\n[[listen]]\naddress = \"0.0.0.0:443\"\n\
         protocol = \"tls\"\n",
    );
    for name in hostnames {
        text.push_str(&format!(
            "\n[[site]]\nhostnames = [\"{name}\"]\nbackend = \"{backend}\"\n"
        ));
    }
    text
}

/// The socket systemd would listen on, and every message read from it so far.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    messages: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind(world: &World) -> Result<NotifySocket> {
        let path = world.dir().join("notify.sock");
        let socket =
            UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        Ok(NotifySocket {
            socket,
            path,
            messages: Vec::new(),
        })
    }

    /// Reads messages until one satisfies `want` (within `timeout`) and returns it.
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {what} within {timeout:?}; messages so far: {:#?}",
                    self.texts()
                );
            }
            self.socket.set_read_timeout(Some(left))?;
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.messages.push((Instant::now(), text.clone()));
                    if want(&text) {
                        return Ok(text);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads whatever is queued now, without waiting.
    fn drain(&mut self) -> Result<()> {
        self.socket.set_nonblocking(true)?;
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.messages.push((Instant::now(), text));
        }
        self.socket.set_nonblocking(false)?;
        Ok(())
    }

    fn texts(&self) -> Vec<&str> {
        self.messages.iter().map(|(_, m)| m.as_str()).collect()
    }
}

/// Whether `message` has the line `line` (messages are newline-separated assignments).
fn has(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// The value of `KEY=` in `message`.
fn value<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// CLOCK_MONOTONIC in microseconds, as systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> Result<i64> {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() * 1_000_000 + now.tv_nsec() / 1_000)
}

/// A hello for `name` through the proxy, echoed back by the backend.
fn roundtrip(world: &World, name: &str) -> Result<()> {
    let mut stream = raw::connect(world, 443, IO)?;
    let hello = simple_hello(name);
    stream.write_all(&hello)?;
    expect_hello(&mut stream, &hello)?;
    stream.shutdown(Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut stream, 1 << 16);
    ensure!(end == End::Eof && rest.is_empty(), "{end:?} after {rest:?}");
    Ok(())
}

/// An open connection through the proxy, held until dropped.
fn hold(world: &World, name: &str) -> Result<TcpStream> {
    let mut stream = raw::connect(world, 443, IO)?;
    let hello = simple_hello(name);
    stream.write_all(&hello)?;
    expect_hello(&mut stream, &hello)?;
    Ok(stream)
}

/// READY=1 comes once the listener serves (the client connects at once, with no retry);
/// STATUS= follows the open connections; WATCHDOG=1 comes at half of WATCHDOG_USEC; SIGHUP gives
/// RELOADING=1 with the current MONOTONIC_USEC, then READY=1 once the new configuration serves;
/// SIGTERM gives STOPPING=1, and nothing says ready after it.
#[test]
fn tells_systemd_ready_reloading_stopping_status_and_watchdog() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let mut notify = NotifySocket::bind(&world)?;
    let mut spliced = Launch::new(config(&["one.example"]))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .start(&world, &[])?;
    let pid = Pid::from_raw(i32::try_from(spliced.pid().context("no PID")?)?);

    let ready = notify
        .wait("READY=1", IO, |m| has(m, "READY=1"))
        .with_context(|| spliced.stderr_text())?;
    // No retry: READY=1 means a client is served now.
    roundtrip(&world, "one.example").context("a connection right after READY=1")?;
    let status = value(&ready, "STATUS").context("READY=1 without STATUS=")?;
    ensure!(
        status.starts_with("serving: 0 connections open; forwarding splice"),
        "the status with READY=1: {status:?}"
    );
    ensure!(
        notify.messages.len() == 1,
        "messages before READY=1: {:#?}",
        notify.texts()
    );

    // Pings at about half the timeout: at least 3 in 4 timeouts' time, and never a gap of a
    // whole timeout (systemd would restart the service).
    let start = Instant::now();
    let mut pings = vec![start];
    while start.elapsed() < WATCHDOG * 4 {
        notify.wait("WATCHDOG=1", WATCHDOG * 2, |m| has(m, "WATCHDOG=1"))?;
        pings.push(Instant::now());
    }
    let longest = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    ensure!(
        pings.len() >= 4 && longest < WATCHDOG,
        "{} pings in {:?}, longest gap {longest:?}",
        pings.len() - 1,
        start.elapsed()
    );

    // The status follows the connections (it is recomputed once a second).
    let open = hold(&world, "one.example")?;
    notify.wait("STATUS= with 1 connection", Duration::from_secs(5), |m| {
        value(m, "STATUS").is_some_and(|s| s.starts_with("serving: 1 connection open"))
    })?;
    drop(open);
    notify.wait("STATUS= back to 0", Duration::from_secs(5), |m| {
        value(m, "STATUS").is_some_and(|s| s.starts_with("serving: 0 connections open"))
    })?;

    // Reload: a new site serves once READY=1 follows RELOADING=1.
    std::fs::write(
        spliced.config_path(),
        config(&["one.example", "two.example"]),
    )?;
    let before = monotonic_usec()?;
    kill(pid, Signal::SIGHUP)?;
    let reloading = notify.wait("RELOADING=1", IO, |m| has(m, "RELOADING=1"))?;
    let after = monotonic_usec()?;
    let usec: i64 = value(&reloading, "MONOTONIC_USEC")
        .context("RELOADING=1 without MONOTONIC_USEC=")?
        .parse()?;
    ensure!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is not between {before} and {after}"
    );
    ensure!(
        value(&reloading, "STATUS").is_some_and(|s| s.starts_with("reloading:")),
        "{reloading:?}"
    );
    notify.wait("READY=1 after the reload", IO, |m| has(m, "READY=1"))?;
    roundtrip(&world, "two.example").context("the new site right after READY=1")?;

    let status = spliced.stop(Signal::SIGTERM, IO)?;
    ensure!(status.success(), "spliced exited with {status}");
    notify.drain()?;
    let texts = notify.texts();
    let stopping = texts
        .iter()
        .position(|m| has(m, "STOPPING=1"))
        .with_context(|| format!("no STOPPING=1 after SIGTERM: {texts:#?}"))?;
    ensure!(
        !texts[stopping..].iter().any(|m| has(m, "READY=1")),
        "READY=1 after STOPPING=1: {texts:#?}"
    );
    ensure!(
        value(texts[stopping], "STATUS").is_some_and(|s| s.starts_with("stopping:")),
        "{texts:#?}"
    );
    Ok(())
}
