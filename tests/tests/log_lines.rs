//! Every connection gets its access-log line with what really happened: one cut when the
//! SIGTERM grace period ends says `outcome=shutdown`, and a refused one counts the bytes the
//! client sent in `up=`.
//!
//! Run as root (network namespaces) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test log_lines`.
use std::{
    io::Write as _,
    net::Shutdown,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use nix::sys::signal::Signal;
use spliced_tests::{
    BACKEND_V6, World,
    raw::{
        self, ALERT_HANDSHAKE_FAILURE, ALERT_UNRECOGNIZED_NAME, Behavior, End, TestBackend,
        expect_hello, simple_hello,
    },
    spliced::{Launch, Spliced, field},
};

const ECHO_PORT: u16 = 9310;
const IO: Duration = Duration::from_secs(10);

fn start(world: &World, args: &[&str]) -> Result<Spliced> {
    let config = format!(
        r#"[defaults]
client_hello_timeout = "30s"

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[site]]
hostnames = ["echo.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"
"#
    );
    args.iter()
        .fold(Launch::new(config), |launch, arg| launch.arg(arg))
        .start(world, &[443])
}

/// Sends `sent` and half-closes; expects `reply` and a clean end, and a line with `outcome`
/// whose `up=` counts every byte sent.
fn refused(
    world: &World,
    spliced: &Spliced,
    sent: &[u8],
    reply: &[u8],
    outcome: &str,
) -> Result<()> {
    let mut client = raw::connect(world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(sent)?;
    client.shutdown(Shutdown::Write)?;
    let (got, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(
        got == reply && end == End::Eof,
        "expected {reply:02x?} and a clean end: {got:02x?} {end:?}"
    );
    let line = spliced.log_line_for(me, IO)?;
    ensure!(field(&line, "outcome") == Some(outcome), "{line}");
    let want = sent.len().to_string();
    ensure!(
        field(&line, "up") == Some(want.as_str()),
        "expected up={want}: {line}"
    );
    Ok(())
}

/// Refused clients' `up=` counts what they sent: a request that is not TLS at all (refused
/// while reading the hello, logged as `up=0` before), and a hello for an unknown name followed
/// by early data.
#[test]
fn a_refused_connection_logs_the_bytes_it_sent() -> Result<()> {
    let world = World::new()?;
    let spliced = start(&world, &[])?;
    refused(
        &world,
        &spliced,
        b"GET / HTTP/1.1\r\nHost: echo.example\r\n\r\n",
        &ALERT_HANDSHAKE_FAILURE,
        "not_tls",
    )?;
    let mut sent = simple_hello("nobody.example");
    sent.extend_from_slice(b"early data after the hello");
    refused(
        &world,
        &spliced,
        &sent,
        &ALERT_UNRECOGNIZED_NAME,
        "unknown_name",
    )
}

/// A connection still forwarding and one still waiting for its hello when the grace period
/// ends: both get a line with `outcome=shutdown`, and the forwarding client sees a reset, not
/// a clean end.
#[test]
fn connections_cut_at_the_end_of_the_grace_period_are_logged() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let mut spliced = start(&world, &["--grace", "1"])?;
    let hello = simple_hello("echo.example");
    let mut forwarding = raw::connect(&world, 443, IO)?;
    let forwarding_addr = forwarding.local_addr()?;
    forwarding.write_all(&hello)?;
    expect_hello(&mut forwarding, &hello)?;
    let silent = raw::connect(&world, 443, IO)?;
    let silent_addr = silent.local_addr()?;
    // Accepted, not yet a line: the proxy holds it.
    std::thread::sleep(Duration::from_millis(200));
    let stopping = Instant::now();
    let status = spliced.stop(Signal::SIGTERM, Duration::from_secs(15))?;
    ensure!(
        status.success(),
        "spliced exited with {status}: {}",
        spliced.stderr_text()
    );
    ensure!(
        stopping.elapsed() < Duration::from_secs(8),
        "stopping took {:?} with a 1 s grace period",
        stopping.elapsed()
    );
    for (what, addr) in [("forwarding", forwarding_addr), ("silent", silent_addr)] {
        let line = spliced.log_line_for(addr, Duration::ZERO)?;
        ensure!(
            field(&line, "outcome") == Some("shutdown"),
            "the {what} connection: {line}"
        );
    }
    let (_, end) = raw::read_to_end(&mut forwarding, 1 << 16);
    ensure!(
        end == End::Reset,
        "the forwarding client's connection ended with {end:?}"
    );
    drop(silent);
    Ok(())
}
