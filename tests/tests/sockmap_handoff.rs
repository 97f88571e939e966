//! The handoff between `splice(2)` and the kernel path: with `auto` (and the sockmap engine's
//! defaults) each direction starts with splice and goes into the kernel after
//! `sockmap_handoff` bytes; a direction whose reader falls behind leaves the kernel and comes
//! back after as much as the backlog limit. Every byte is checked by position.
//!
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test sockmap_handoff`.
use std::{
    io::{self, Write as _},
    net::{Shutdown, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use spliced_tests::{
    World,
    raw::{
        self, Behavior, SEED_DOWN, SEED_UP, Stream, TestBackend, expect_hello, receive, result,
        spawn,
    },
    sockmap::*,
    spliced::{Launch, Spliced, field},
    wait_for,
};

/// The kernel's redirected bytes so far, from `/metrics`.
fn redirected(spliced: &Spliced) -> Result<u64> {
    spliced
        .metrics()?
        .count("spliced_kernel_total", &[("counter", "redirected_bytes")])
}

/// Connections shorter than the handoff never touch the socket maps; a long one moves a large
/// part of its bytes in the kernel, after a splice phase of its own, and every byte arrives
/// once.
#[test]
fn auto_splices_short_connections_and_hands_long_ones_to_the_kernel() -> Result<()> {
    const LEN: u64 = 64 * MIB;
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = raw::simple_hello("bulk.example");
    let _bulk = TestBackend::start(
        &world,
        BULK_PORT,
        Behavior::Bulk {
            bytes_each_way: LEN,
            hello_len: hello.len(),
        },
    )?;
    let spliced = Launch::new(config_with("auto", ""))
        .metrics()
        .start(&world, &[443])?;

    for i in 0..10 {
        let me = roundtrip(&world, "echo.example", format!("short {i}").as_bytes())?;
        let line = spliced.log_line_for(me, LOG_WAIT)?;
        ensure!(
            field(&line, "outcome") == Some("ok") && field(&line, "engine") == Some("splice"),
            "a short connection: {line}"
        );
    }
    ensure!(
        redirected(&spliced)? == 0,
        "short connections went through the kernel"
    );

    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    let mut writer = client.try_clone()?;
    let sender = spawn(move || {
        raw::send_stream(&mut writer, SEED_UP, LEN)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(())
    });
    receive(&mut client, SEED_DOWN, LEN)?;
    result(&sender, IO, "the client's sender")?;
    let line = expect_ok(&spliced, me, LEN + hello.len() as u64, LEN)?;
    let kernel = redirected(&spliced)?;
    ensure!(
        field(&line, "engine") == Some("sockmap"),
        "the long transfer never went into the kernel: {line}"
    );
    // At least the handoff (256 KiB) each way went by splice, and a large part of the rest
    // in the kernel (how much depends on how often a direction falls behind and leaves it,
    // which a loaded machine makes more frequent).
    ensure!(
        kernel > 2 * LEN / 8 && kernel <= 2 * LEN - 2 * 256 * KIB,
        "{kernel} of {} bytes went through the kernel",
        2 * LEN
    );
    Ok(())
}

/// Writes the stream `seed` from `from` for `period` or until `to`, as much as the socket
/// takes without blocking; returns where it got to.
fn write_for(
    stream: &mut TcpStream,
    seed: u64,
    from: u64,
    to: u64,
    period: Duration,
) -> Result<u64> {
    stream.set_nonblocking(true)?;
    let mut source = Stream::new(seed);
    let mut offset = from;
    let started = Instant::now();
    while started.elapsed() < period && offset < to {
        let chunk = source.at(offset);
        let chunk = &chunk[..chunk.len().min((to - offset) as usize)];
        match stream.write(chunk) {
            Ok(n) => offset += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("writing at {offset}")),
        }
    }
    stream.set_nonblocking(false)?;
    Ok(offset)
}

/// A backend that stops reading makes the client's direction leave the kernel; once it reads
/// again, that direction goes back into the kernel and carries most of the rest there.
#[test]
fn a_direction_goes_back_into_the_kernel_after_a_hold() -> Result<()> {
    const LEN: u64 = 128 * MIB;
    const FIRST: u64 = 4 * MIB;
    let world = World::new()?;
    let spliced = Launch::new(config_with("auto", "sockmap_backlog_limit = \"1MiB\""))
        .metrics()
        .start(&world, &[443])?;
    let hello = raw::simple_hello("sm.example");
    let expected = hello.clone();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let server = backend(&world, PORT, Duration::ZERO, move |mut stream| {
        expect_hello(&mut stream, &expected)?;
        // The first bytes at once, so the direction reaches the kernel; then nothing until
        // the test says so.
        let verifier = raw::receive_first(&mut stream, SEED_UP, LEN, FIRST as usize)?;
        go_rx.recv_timeout(IO)?;
        raw::receive_rest(&mut stream, verifier)?;
        stream.shutdown(Shutdown::Write)?;
        Ok(())
    })?;
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    raw::send_stream_range(&mut client, SEED_UP, 0, FIRST)?;
    wait_for(
        "the client's direction to enter the kernel",
        Duration::from_secs(5),
        || Ok(redirected(&spliced)? > 0),
    )?;
    // The hold: the client writes what it can for a second while the backend does not read.
    let held = write_for(&mut client, SEED_UP, FIRST, LEN / 2, Duration::from_secs(1))?;
    wait_for(
        "the client's direction to leave the kernel",
        Duration::from_secs(5),
        || Ok(detached(&spliced, "client")? > 0),
    )
    .with_context(|| format!("{held} bytes written"))?;
    let at_hold = redirected(&spliced)?;
    go_tx.send(())?;
    raw::send_stream_range(&mut client, SEED_UP, held, LEN)?;
    client.shutdown(Shutdown::Write)?;
    result(&server, IO, "the backend")?;
    // The backend's end of stream follows, with nothing before it.
    let (rest, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(
        end == raw::End::Eof && rest.is_empty(),
        "after the transfer: {} bytes, {end:?}",
        rest.len()
    );
    expect_ok(&spliced, me, LEN + hello.len() as u64, 0)?;
    let after = redirected(&spliced)? - at_hold;
    ensure!(
        after > (LEN - held) / 2,
        "of the {} bytes written after the hold only {after} went through the kernel",
        LEN - held
    );
    Ok(())
}
