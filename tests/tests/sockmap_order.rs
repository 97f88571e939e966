//! The sockmap engine keeps bytes in order: data sent with the hello, a backend that speaks
//! first, half-closes from either side with megabytes in flight, and 200 connections at once,
//! every byte verified by position and every access-log line checked.
//!
//! Apart from `early_data_with_the_hello_arrives_in_order`, clients send their payload only
//! once the hello has gone through (the echoed hello or the backend's first bytes came back),
//! so that each test checks its own subject rather than what happens to bytes that arrive
//! together with the hello. The shared world is `spliced_tests::sockmap`.
//!
//! Run as root (network namespaces, eBPF) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test sockmap_order`.
use std::{
    collections::HashMap,
    io::Write as _,
    net::{Shutdown, SocketAddr, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use spliced_tests::{
    PROXY_V4, World,
    raw::{
        self, BLOCK, Behavior, SEED_DOWN, SEED_UP, Stream, TestBackend, Verifier, difference, echo,
        expect_hello, receive, receive_first, receive_rest, result, simple_hello, spawn,
    },
    sockmap::*,
    spliced::field,
    wait_for,
};

/// 64 KiB sent in the same write as the hello wait in the proxy's client socket while the
/// backend is connected (which accepts 200 ms late): they were queued before the socket entered
/// the map and must still come through, in order, before what follows.
#[test]
fn early_data_with_the_hello_arrives_in_order() -> Result<()> {
    const EARLY: usize = 64 * 1024;
    const MORE: usize = 100_000;
    let world = World::new()?;
    let spliced = start(&world, "")?;
    let server = backend(&world, PORT, Duration::from_millis(200), echo)?;
    let hello = simple_hello("sm.example");
    let first = [hello.as_slice(), &Stream::prefix(11, EARLY)].concat();
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&first)?;
    let got = raw::read_exactly(&mut client, first.len())?;
    if got != first {
        let _ = client.shutdown(Shutdown::Both);
        let line = spliced.log_line_for(me, LOG_WAIT).unwrap_or_default();
        bail!(
            "the hello and early data came back altered: {}\n(the client sent {} bytes in \
             all; access log: {line})",
            difference(&got, &first),
            first.len()
        );
    }
    // And what comes after, once the connection is spliced.
    let more = Stream::prefix(12, MORE);
    client.write_all(&more)?;
    let got = raw::read_exactly(&mut client, MORE)?;
    ensure!(got == more, "data after the early data came back altered");
    raw::shut_and_expect_eof(&mut client, "expected EOF")?;
    let echoed = result(&server, IO, "the echo backend")?;
    let total = (first.len() + MORE) as u64;
    ensure!(echoed == total, "the backend echoed {echoed} of {total}");
    expect_ok(&spliced, me, total, total)?;
    Ok(())
}

/// The backend speaks first with 256 KiB, before the proxy has put its socket in the map; the
/// client reads it all before saying more, then the conversation continues through the kernel.
#[test]
fn server_speaks_first() -> Result<()> {
    const GREETING: u64 = 256 * KIB;
    let world = World::new()?;
    let spliced = start(&world, "")?;
    let server = backend(&world, PORT, Duration::ZERO, |mut stream| {
        raw::send_stream(&mut stream, 21, GREETING)?;
        echo(stream)
    })?;
    let hello = simple_hello("sm.example");
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    let greeting = raw::read_exactly(&mut client, GREETING as usize)?;
    let mut verifier = Verifier::new(21, GREETING);
    verifier.feed(&greeting)?;
    expect_hello(&mut client, &hello)?;
    let mut writer = client.try_clone()?;
    let sender = spawn(move || {
        raw::send_stream(&mut writer, 22, MIB)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(())
    });
    receive(&mut client, 22, MIB).context("the echo after the greeting")?;
    result(&sender, IO, "sending after the greeting")?;
    let echoed = result(&server, IO, "the server-first backend")?;
    let up = hello.len() as u64 + MIB;
    ensure!(echoed == up, "the backend echoed {echoed}, expected {up}");
    expect_ok(&spliced, me, up, GREETING + up)?;
    Ok(())
}

/// The client sends 8 MiB and half-closes while the echo is still coming back: it gets exactly
/// its bytes back, then end of stream.
#[test]
fn client_half_closes_with_eight_mib_in_flight() -> Result<()> {
    const LEN: u64 = 8 * MIB;
    let world = World::new()?;
    let spliced = start(&world, "")?;
    let echo_backend = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("echo.example");
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    expect_hello(&mut client, &hello)?;
    let mut writer = client.try_clone()?;
    let sender = spawn(move || {
        raw::send_stream(&mut writer, 31, LEN)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(Instant::now())
    });
    receive(&mut client, 31, LEN).context("the echo")?;
    let eof_at = Instant::now();
    let half_closed_at = result(&sender, IO, "the client's sender")?;
    let conn = echo_backend
        .wait_finished(1, Duration::from_secs(10))?
        .remove(0);
    ensure!(conn.error.is_none(), "backend error: {:?}", conn.error);
    ensure!(
        conn.saw_eof,
        "the backend never saw the client's half-close"
    );
    let up = hello.len() as u64 + LEN;
    ensure!(conn.sent == up, "the backend echoed {}", conn.sent);
    eprintln!(
        "client half-closed {:?} before the echo ended",
        eof_at.saturating_duration_since(half_closed_at)
    );
    expect_ok(&spliced, me, up, up)?;
    Ok(())
}

/// The backend sends 8 MiB and half-closes while the client is half-way through sending its
/// own 8 MiB: the client sees all 8 MiB and end of stream, then sends the rest, and the
/// backend receives all of it and the client's end of stream.
#[test]
fn backend_half_closes_first_while_the_client_still_sends() -> Result<()> {
    const LEN: u64 = 8 * MIB;
    let world = World::new()?;
    let spliced = start(&world, "")?;
    let hello = simple_hello("sm.example");
    let expected_hello = hello.clone();
    let server = backend(&world, PORT, Duration::ZERO, move |mut stream| {
        let mut writer = stream.try_clone()?;
        let sender = spawn(move || {
            raw::send_stream(&mut writer, SEED_DOWN, LEN)?;
            writer.shutdown(Shutdown::Write)?;
            Ok(())
        });
        expect_hello(&mut stream, &expected_hello)?;
        receive(&mut stream, SEED_UP, LEN).context("the backend receiving")?;
        result(&sender, IO, "the backend's sender")
    })?;
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    let verifier = receive_first(&mut client, SEED_DOWN, LEN, BLOCK)?;
    let mut writer = client.try_clone()?;
    let (eof_tx, eof_rx) = mpsc::channel::<()>();
    let sender = spawn(move || {
        raw::send_stream_range(&mut writer, SEED_UP, 0, LEN / 2)?;
        // The second half only after the backend's end of stream arrived.
        eof_rx
            .recv_timeout(IO)
            .context("waiting for the backend's end of stream")?;
        raw::send_stream_range(&mut writer, SEED_UP, LEN / 2, LEN)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(())
    });
    receive_rest(&mut client, verifier).context("the client receiving")?;
    let _ = eof_tx.send(());
    result(&sender, IO, "the client's sender")?;
    result(&server, IO, "the backend")?;
    expect_ok(&spliced, me, hello.len() as u64 + LEN, LEN)?;
    Ok(())
}

/// 200 connections at once, each moving 1 MiB each way, all verified on both ends.
#[test]
fn two_hundred_concurrent_connections_of_a_mebibyte_each_way() -> Result<()> {
    const N: usize = 200;
    let world = World::new()?;
    let spliced = start(&world, "")?;
    let hello = simple_hello("bulk.example");
    let hello_len = hello.len();
    let bulk = TestBackend::start(
        &world,
        BULK_PORT,
        Behavior::Bulk {
            bytes_each_way: MIB,
            hello_len,
        },
    )?;
    let started = Instant::now();
    let (addrs, failures) = raw::run_clients(&world, N, |_| bulk_client(&hello))?;
    let elapsed = started.elapsed();
    ensure!(
        failures.is_empty(),
        "{} of {N} clients failed, e.g.:\n{}\ndiagnostics (end):\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n"),
        tail(&spliced.stderr_text(), 30)
    );
    eprintln!("{N} connections moved 1 MiB each way in {elapsed:.2?}");
    let conns = bulk.wait_finished(N, Duration::from_secs(20))?;
    ensure!(
        conns.len() == N,
        "the backend saw {} connections",
        conns.len()
    );
    for c in &conns {
        ensure!(
            c.error.is_none() && c.verified == MIB && c.sent == MIB,
            "backend connection: {c:?}"
        );
    }
    let want_up = (hello_len as u64 + MIB).to_string();
    let want_down = MIB.to_string();
    let mut bad = Vec::new();
    wait_for("an access-log line per client", LOG_WAIT, || {
        let log = spliced.stdout_text();
        let lines: HashMap<&str, &str> = log
            .lines()
            .filter_map(|l| Some((field(l, "client")?, l)))
            .collect();
        if addrs
            .iter()
            .any(|a| !lines.contains_key(a.to_string().as_str()))
        {
            return Ok(false);
        }
        bad = addrs
            .iter()
            .map(|a| lines[a.to_string().as_str()])
            .filter(|l| {
                field(l, "outcome") != Some("ok")
                    || field(l, "engine") != Some("sockmap")
                    || field(l, "up") != Some(want_up.as_str())
                    || field(l, "down") != Some(want_down.as_str())
            })
            .map(str::to_owned)
            .collect();
        Ok(true)
    })?;
    ensure!(
        bad.is_empty(),
        "{} of {N} log lines are not ok/sockmap with the right counts, e.g.:\n{}",
        bad.len(),
        bad[..bad.len().min(5)].join("\n")
    );
    Ok(())
}

/// One bulk client: hello, then (once the first byte came back) 1 MiB up while verifying 1 MiB
/// down.
fn bulk_client(hello: &[u8]) -> Result<SocketAddr> {
    let addr = SocketAddr::new(PROXY_V4, 443);
    let mut client = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    client.set_read_timeout(Some(IO))?;
    client.set_write_timeout(Some(IO))?;
    let me = client.local_addr()?;
    client.write_all(hello)?;
    let verifier = receive_first(&mut client, SEED_DOWN, MIB, 1)?;
    let mut writer = client.try_clone()?;
    std::thread::scope(|s| {
        let sender = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn_scoped(s, move || -> Result<()> {
                raw::send_stream(&mut writer, SEED_UP, MIB)?;
                writer.shutdown(Shutdown::Write)?;
                Ok(())
            })?;
        let received = receive_rest(&mut client, verifier);
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))?;
        received.context("receiving")?;
        sent.context("sending")
    })?;
    Ok(me)
}
