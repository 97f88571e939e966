//! Resets under the sockmap engine: when either side resets mid-transfer, the other side's
//! connection ends within seconds, the access log blames the right side, and spliced goes on
//! serving.
//!
//! Run as root (network namespaces, eBPF) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test sockmap_resets`.
use std::{
    io::{self, Write as _},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use spliced_tests::{
    World,
    raw::{
        self, BLOCK, Behavior, End, SEED_DOWN, SEED_UP, TestBackend, Verifier, expect_hello,
        receive_first, result, simple_hello, spawn,
    },
    sockmap::*,
    spliced::field,
};

/// How a backend connection ended after the client reset: when its reads and writes failed.
#[derive(Debug)]
struct Ended {
    read_end: End,
    read_at: Instant,
    write_error: io::ErrorKind,
    write_at: Instant,
}

/// The client resets its connection (SO_LINGER 0) while data flows both ways: the backend's
/// reads and writes end within a few seconds, the log blames the client, and spliced goes on
/// serving.
#[test]
fn client_reset_mid_transfer() -> Result<()> {
    let world = World::new()?;
    let spliced = start(&world, "")?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("sm.example");
    let server = backend(&world, PORT, Duration::ZERO, |mut stream| {
        let mut writer = stream.try_clone()?;
        // Sends until the connection breaks (at most 1 GiB or the write timeout).
        let sender = spawn(move || {
            let error = match raw::send_stream(&mut writer, SEED_DOWN, 1 << 30) {
                Ok(()) => io::ErrorKind::Other,
                Err(e) => e.kind(),
            };
            Ok((error, Instant::now()))
        });
        let (_, read_end) = raw::read_to_end(&mut stream, usize::MAX);
        let read_at = Instant::now();
        let (write_error, write_at) = result(&sender, IO + IO, "the backend's sender")?;
        Ok(Ended {
            read_end,
            read_at,
            write_error,
            write_at,
        })
    })?;
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    let _ = receive_first(&mut client, SEED_DOWN, 1 << 30, BLOCK)?;
    raw::send_stream(&mut client, SEED_UP, MIB)?;
    let _ = raw::read_exactly(&mut client, MIB as usize)?;
    let reset_at = Instant::now();
    raw::reset(client)?;
    let ended = result(&server, IO + IO + IO, "the backend")?;
    eprintln!(
        "after the client's reset the backend's read ended ({:?}) in {:?}, its write ({:?}) \
         in {:?}",
        ended.read_end,
        ended.read_at.saturating_duration_since(reset_at),
        ended.write_error,
        ended.write_at.saturating_duration_since(reset_at)
    );
    ensure!(
        ended.read_end.closed(),
        "the backend's connection was not closed: {ended:?}"
    );
    let limit = Duration::from_secs(3);
    ensure!(
        ended.read_at.saturating_duration_since(reset_at) < limit
            && ended.write_at.saturating_duration_since(reset_at) < limit,
        "the backend's connection did not end within {limit:?}: {ended:?}"
    );
    let line = spliced.log_line_for(me, LOG_WAIT)?;
    ensure!(
        field(&line, "outcome").is_some_and(|o| o.starts_with("client_")),
        "expected a client_* outcome: {line}"
    );
    ensure!(field(&line, "engine") == Some("sockmap"), "engine: {line}");
    let me = roundtrip(&world, "echo.example", b"still serving")?;
    let n = (simple_hello("echo.example").len() + 13) as u64;
    expect_ok(&spliced, me, n, n)?;
    Ok(())
}

/// The backend resets its connection while data flows both ways: the client's connection ends
/// (end of stream or reset) within a few seconds, the log blames the backend, and spliced goes
/// on serving.
#[test]
fn backend_reset_mid_transfer() -> Result<()> {
    let world = World::new()?;
    let spliced = start(&world, "")?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("sm.example");
    let expected_hello = hello.clone();
    let (hello_tx, hello_rx) = mpsc::channel::<()>();
    let server = backend(&world, PORT, Duration::ZERO, move |mut stream| {
        expect_hello(&mut stream, &expected_hello)?;
        let _ = hello_tx.send(());
        let _ = raw::read_exactly(&mut stream, MIB as usize)?;
        raw::send_stream(&mut stream, SEED_DOWN, MIB)?;
        let at = Instant::now();
        raw::reset(stream)?;
        Ok(at)
    })?;
    let (mut client, me) = connect_after_hello(&world, &hello, &hello_rx)?;
    let mut writer = client.try_clone()?;
    // A write that makes no progress for this long counts as stuck.
    const STUCK_WRITE: Duration = Duration::from_secs(5);
    writer.set_write_timeout(Some(STUCK_WRITE))?;
    // Sends until the connection breaks (at most 1 GiB or a stuck write).
    let sender = spawn(move || {
        let error = match raw::send_stream(&mut writer, SEED_UP, 1 << 30) {
            Ok(()) => io::ErrorKind::Other,
            Err(e) => e.kind(),
        };
        Ok((error, Instant::now()))
    });
    let (got, end) = raw::read_to_end(&mut client, usize::MAX);
    let ended_at = Instant::now();
    let reset_at = result(&server, IO, "the backend")?;
    let (write_error, write_at) = result(&sender, IO, "the client's sender")?;
    eprintln!(
        "after the backend's reset the client's read ended ({end:?}, {} bytes) in {:?}, its \
         write ({write_error:?}) in {:?}",
        got.len(),
        ended_at.saturating_duration_since(reset_at),
        write_at.saturating_duration_since(reset_at)
    );
    ensure!(
        end.closed(),
        "the client's connection was not closed: {end:?}"
    );
    let limit = Duration::from_secs(3);
    ensure!(
        ended_at.saturating_duration_since(reset_at) < limit,
        "the client's read did not end within {limit:?}"
    );
    // Still uploading when the backend went away: the upload must fail too, not hang.
    ensure!(
        write_at.saturating_duration_since(reset_at) < limit
            && write_error != io::ErrorKind::WouldBlock
            && write_error != io::ErrorKind::TimedOut,
        "the client's upload did not fail within {limit:?} of the backend's reset: its write \
         made no progress for {STUCK_WRITE:?} ({write_error:?}); its read had ended with \
         {end:?}. Sockets in the proxy namespace:\n{}\ndiagnostics (end):\n{}",
        proxy_sockets(&world),
        tail(&spliced.stderr_text(), 5)
    );
    ensure!(
        got.len() as u64 <= MIB,
        "the client got {} bytes, more than the backend sent",
        got.len()
    );
    let mut verifier = Verifier::new(SEED_DOWN, MIB);
    verifier.feed(&got)?;
    let line = spliced.log_line_for(me, LOG_WAIT)?;
    ensure!(
        field(&line, "outcome").is_some_and(|o| o.starts_with("backend_")),
        "expected a backend_* outcome: {line}"
    );
    ensure!(field(&line, "engine") == Some("sockmap"), "engine: {line}");
    let me = roundtrip(&world, "echo.example", b"still serving")?;
    let n = (simple_hello("echo.example").len() + 13) as u64;
    expect_ok(&spliced, me, n, n)?;
    Ok(())
}
