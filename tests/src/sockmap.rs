//! The sockmap engine's test world, shared by the `sockmap_*` tests: spliced with
//! `forwarding = "sockmap"` and its metrics endpoint, one site per kind of test backend, the
//! checks every test makes of the access log, and the counters it reads from `/metrics`.
//! `cargo xtask bench --only sockmap-stall` uses [`stalled_backend`] too.
use std::{
    io::Write as _,
    net::{Shutdown, SocketAddr, TcpStream},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    BACKEND_V6, Ns, World,
    raw::{
        self, SEED_UP, expect_hello, receive, result, simple_hello, spawn, write_while_possible,
    },
    spliced::{Launch, Spliced, field},
};

/// Where the tests' own servers listen (site `sm.example`).
pub const PORT: u16 = 9200;
/// A [`Behavior::Echo`] backend (site `echo.example`).
pub const ECHO_PORT: u16 = 9201;
/// A [`Behavior::ServerClosesFirst`] backend (site `closes.example`).
pub const CLOSES_PORT: u16 = 9202;
/// A [`Behavior::Bulk`] backend (site `bulk.example`).
pub const BULK_PORT: u16 = 9203;
/// Read and write timeout of every socket: a hang fails instead of blocking the suite.
pub const IO: Duration = Duration::from_secs(20);
/// How long to wait for an access-log line.
pub const LOG_WAIT: Duration = Duration::from_secs(10);
/// A kibibyte.
pub const KIB: u64 = 1 << 10;
/// A mebibyte.
pub const MIB: u64 = 1 << 20;
/// Where spliced pins its maps (inside its own mount namespace when run in the test world).
pub const PIN_DIR: &str = "/sys/fs/bpf/spliced";
/// The maps that hold per-connection state and must be empty when no connection is open
/// (others spliced pins that are not a counter array or the event ring count too).
pub const CONNECTION_MAPS: [&str; 5] = [
    "SPLICED_PEERS",
    "SPLICED_SOCKS",
    "SPLICED_HOLD",
    "SPLICED_DETACH",
    "SPLICED_WAKE",
];
/// The pinned maps that hold no per-connection entries (the edge filter's among them).
pub const GLOBAL_MAPS: [&str; 8] = [
    "SPLICED_COUNTERS",
    "SPLICED_EVENTS",
    "SPLICED_XDP_BUCKETS",
    "SPLICED_XDP_COUNTERS",
    "SPLICED_XDP_DENY4",
    "SPLICED_XDP_DENY6",
    "SPLICED_XDP_LIMIT",
    "SPLICED_XDP_PORTS",
];
/// What the kernel may redirect beyond the limit while spliced notices and takes the sender
/// out: the sender's rate times spliced's reaction time. On 2026-12-05, with a 1 MiB limit,
/// 0.5-16 MiB when the test ran alone and up to 31 MiB while the whole suite loaded both
/// cores. Without any limit it is hundreds of MiB (`cargo xtask bench --only sockmap-stall`).
pub const REACTION: u64 = 48 * MIB;
/// With no cap the verdict would keep redirecting into the peer's unbounded egress queue and a
/// stalled reader's sender could park hundreds of MiB in the kernel; with a 1 MiB limit only
/// socket buffers fill up.
pub const BOUND: u64 = 64 * MIB;
/// How long the stalled side does not read.
pub const STALL: Duration = Duration::from_secs(3);

/// The configuration: TLS on 443, `forwarding` as given, `extra` appended to `[defaults]`.
pub fn config_with(forwarding: &str, extra: &str) -> String {
    format!(
        r#"[defaults]
forwarding = "{forwarding}"
client_hello_timeout = "2s"
connect_timeout = "2s"
{extra}

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[site]]
hostnames = ["sm.example"]
backend = "[{BACKEND_V6}]:{PORT}"

[[site]]
hostnames = ["echo.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"

[[site]]
hostnames = ["closes.example"]
backend = "[{BACKEND_V6}]:{CLOSES_PORT}"

[[site]]
hostnames = ["bulk.example"]
backend = "[{BACKEND_V6}]:{BULK_PORT}"
"#
    )
}

/// What puts every byte of a connection through the kernel path: no `splice(2)` phase first.
/// The sockmap tests use it, since they test what happens when sockets enter the maps with
/// data queued, half-closes and resets; `tests/sockmap_handoff.rs` tests the handoff itself.
pub const NO_HANDOFF: &str = "sockmap_handoff = 0";

/// spliced with `forwarding = "sockmap"` and [`NO_HANDOFF`] in the world's proxy namespace,
/// with its metrics endpoint (the tests read its counters there) and debug logging (for
/// failure messages).
pub fn start(world: &World, extra: &str) -> Result<Spliced> {
    Launch::new(config_with("sockmap", &format!("{NO_HANDOFF}\n{extra}")))
        .metrics()
        .env("RUST_LOG", "spliced=debug")
        .start(world, &[443])
}

/// Connects a client through spliced, sends `hello`, and waits until the test's backend says
/// on `arrived` that the hello reached it: from then on the connection is spliced end to end.
pub fn connect_after_hello(
    world: &World,
    hello: &[u8],
    arrived: &mpsc::Receiver<()>,
) -> Result<(TcpStream, SocketAddr)> {
    let mut client = raw::connect(world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(hello)?;
    arrived
        .recv_timeout(IO)
        .context("waiting for the hello to reach the backend")?;
    Ok((client, me))
}

/// The last `n` lines of `text`, for failure messages (debug logs are long).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn number(line: &str, key: &str) -> Result<u64> {
    field(line, key)
        .with_context(|| format!("no {key}= in {line}"))?
        .parse()
        .with_context(|| format!("{key}= is not a number in {line}"))
}

/// The access-log line of `client`, which must say the sockmap engine forwarded `up` bytes
/// from the client (hello included) and `down` bytes back, and ended well.
pub fn expect_ok(spliced: &Spliced, client: SocketAddr, up: u64, down: u64) -> Result<String> {
    let line = spliced.log_line_for(client, LOG_WAIT)?;
    let context = || {
        format!(
            "access log line:\n{line}\ndiagnostics (end):\n{}",
            tail(&spliced.stderr_text(), 30)
        )
    };
    ensure!(field(&line, "outcome") == Some("ok"), "{}", context());
    ensure!(field(&line, "engine") == Some("sockmap"), "{}", context());
    ensure!(
        number(&line, "up")? == up,
        "up= should be {up}: {}",
        context()
    );
    ensure!(
        number(&line, "down")? == down,
        "down= should be {down}: {}",
        context()
    );
    Ok(line)
}

/// A server of our own on `[BACKEND_V6]:port`: accepts one connection `delay` after the
/// listener exists (the kernel completes the handshake meanwhile) and runs `serve` on it.
pub fn backend<T: Send + 'static>(
    world: &World,
    port: u16,
    delay: Duration,
    serve: impl FnOnce(TcpStream) -> Result<T> + Send + 'static,
) -> Result<mpsc::Receiver<Result<T>>> {
    let listener = raw::listen_in(world, Ns::Backend, SocketAddr::new(BACKEND_V6, port))?;
    Ok(spawn(move || {
        std::thread::sleep(delay);
        let stream = raw::accept_within(&listener, Duration::from_secs(15), IO)?;
        serve(stream)
    }))
}

/// Sends a hello for `name`, reads its echo, sends `payload` and reads its echo, half-closes and
/// expects the end: a connection any engine serves. Returns the client's address for the log.
pub fn roundtrip(world: &World, name: &str, payload: &[u8]) -> Result<SocketAddr> {
    let mut client = raw::connect(world, 443, IO)?;
    let me = client.local_addr()?;
    let hello = simple_hello(name);
    client.write_all(&hello)?;
    expect_hello(&mut client, &hello)?;
    client.write_all(payload)?;
    let got = raw::read_exactly(&mut client, payload.len())?;
    ensure!(got == payload, "the echo differs from what was sent");
    raw::shut_and_expect_eof(&mut client, "after the echo")?;
    Ok(me)
}

/// `ss -tanpi` in the proxy namespace, for failure messages.
pub fn proxy_sockets(world: &World) -> String {
    world
        .command(Ns::Proxy, "ss")
        .args(["-tanpi"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(ss failed: {e})"))
}

/// What [`stalled_backend`] saw.
#[derive(Clone, Copy, Debug)]
pub struct Stall {
    /// Bytes the client managed to write while the backend did not read.
    pub written: u64,
    /// How often spliced took the client's direction out of the kernel.
    pub detached: u64,
    /// The most the kernel held for the backend when it did (0 if it never did).
    pub parked_max: u64,
}

/// The client writes as much as it can while the backend (which read the hello) does not read
/// for [`STALL`] with `sockmap_backlog_limit = limit`; returns what that parked, after checking
/// that once the backend reads, every byte arrives.
pub fn stalled_backend(limit: &str) -> Result<Stall> {
    let world = World::new()?;
    let spliced = start(&world, &format!("sockmap_backlog_limit = \"{limit}\""))?;
    let hello = simple_hello("sm.example");
    let expected_hello = hello.clone();
    let (go_tx, go_rx) = mpsc::channel::<u64>();
    let (hello_tx, hello_rx) = mpsc::channel::<()>();
    let server = backend(&world, PORT, Duration::ZERO, move |mut stream| {
        expect_hello(&mut stream, &expected_hello)?;
        let _ = hello_tx.send(());
        let len = go_rx.recv_timeout(IO).context("waiting to start reading")?;
        receive(&mut stream, SEED_UP, len)?;
        stream.shutdown(Shutdown::Write)?;
        Ok(len)
    })?;
    let (mut client, me) = connect_after_hello(&world, &hello, &hello_rx)?;
    let written = write_while_possible(&mut client, SEED_UP, STALL, 4 << 30)?;
    eprintln!(
        "sockmap_backlog_limit={limit}: the client wrote {written} bytes ({:.1} MiB) while \
         the backend did not read for {STALL:?}",
        written as f64 / MIB as f64
    );
    let _ = go_tx.send(written);
    raw::shut_and_expect_eof(&mut client, "expected the backend's EOF")?;
    let received = result(&server, IO, "the stalled backend")?;
    ensure!(received == written, "the backend verified {received} bytes");
    expect_ok(&spliced, me, hello.len() as u64 + written, 0)?;
    Ok(Stall {
        written,
        detached: detached(&spliced, "client")?,
        parked_max: parked_max(&spliced)?,
    })
}

/// How often spliced took a direction out of the kernel because its peer did not keep up, by
/// `side` (`"client"` or `"backend"`: whose data was being sent), from `/metrics`.
pub fn detached(spliced: &Spliced, side: &str) -> Result<u64> {
    spliced
        .metrics()?
        .count("spliced_sockmap_detached_total", &[("side", side)])
}

/// The most the kernel held for a peer when a direction left it, from `/metrics`.
pub fn parked_max(spliced: &Spliced) -> Result<u64> {
    spliced
        .metrics()?
        .count("spliced_sockmap_parked_bytes_max", &[])
}

/// Checks that spliced took `side`'s direction out of the kernel and that the kernel never
/// held more than `limit` bytes for a peer.
pub fn expect_parked_within(spliced: &Spliced, side: &str, limit: u64) -> Result<()> {
    ensure!(
        detached(spliced, side)? > 0,
        "spliced never took the {side} side out of the kernel; diagnostics:\n{}",
        tail(&spliced.stderr_text(), 30)
    );
    let parked = parked_max(spliced)?;
    eprintln!("the kernel held at most {parked} bytes for the {side} side's peer (limit {limit})");
    ensure!(
        parked <= limit,
        "the kernel held {parked} bytes for the {side} side's peer, over the {limit} byte limit"
    );
    Ok(())
}
