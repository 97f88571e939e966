//! Backpressure in the sockmap engine: a reader that stops or reads slowly must not let the
//! other side park unbounded data in the kernel (spliced takes the sender out of the kernel,
//! which `/metrics` counts as `spliced_sockmap_detached_total` and
//! `spliced_sockmap_parked_bytes_max`), every byte still arrives, and paused connections do
//! not stall others. The same stall without a useful limit is a measurement:
//! `cargo xtask bench --only sockmap-stall`.
//!
//! Run as root (network namespaces, eBPF) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test sockmap_backpressure`.
use std::{
    io::Write as _,
    net::Shutdown,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use spliced_tests::{
    World,
    raw::{
        self, Behavior, SEED_DOWN, SEED_UP, TestBackend, expect_hello, receive, receive_slowly,
        result, simple_hello, spawn, write_while_possible,
    },
    sockmap::*,
    wait_for,
};

#[test]
fn stalled_backend_bounds_what_the_client_can_park() -> Result<()> {
    let stall = stalled_backend("1MiB")?;
    ensure!(
        stall.detached > 0,
        "spliced never took the client's socket out of the kernel"
    );
    eprintln!(
        "the kernel held at most {} bytes for the stalled backend (limit 1 MiB)",
        stall.parked_max
    );
    ensure!(
        stall.parked_max <= MIB + REACTION,
        "the kernel held {} bytes for the stalled backend, over the 1 MiB limit plus \
         {REACTION} bytes of reaction time",
        stall.parked_max
    );
    ensure!(
        stall.written < BOUND,
        "the client parked {} bytes while the backend did not read (bound {BOUND})",
        stall.written
    );
    Ok(())
}

/// The backend writes as much as it can while the client does not read for 3 s; what it
/// managed must stay bounded, and once the client reads, every byte arrives.
#[test]
fn stalled_client_bounds_what_the_backend_can_park() -> Result<()> {
    let world = World::new()?;
    let spliced = start(&world, "sockmap_backlog_limit = \"1MiB\"")?;
    let hello = simple_hello("sm.example");
    let expected_hello = hello.clone();
    let (len_tx, len_rx) = mpsc::channel::<u64>();
    let server = backend(&world, PORT, Duration::ZERO, move |mut stream| {
        expect_hello(&mut stream, &expected_hello)?;
        let written = write_while_possible(&mut stream, SEED_DOWN, STALL, 4 << 30)?;
        let _ = len_tx.send(written);
        raw::shut_and_expect_eof(&mut stream, "expected the client's EOF")?;
        Ok(written)
    })?;
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    let written = len_rx
        .recv_timeout(IO)
        .context("waiting for the backend to stop writing")?;
    eprintln!(
        "sockmap_backlog_limit=1MiB: the backend wrote {written} bytes ({:.1} MiB) while the \
         client did not read for {STALL:?}",
        written as f64 / MIB as f64
    );
    receive(&mut client, SEED_DOWN, written).context("reading after the stall")?;
    client.shutdown(Shutdown::Write)?;
    result(&server, IO, "the backend")?;
    ensure!(
        written < BOUND,
        "the backend parked {written} bytes while the client did not read (bound {BOUND})"
    );
    expect_ok(&spliced, me, hello.len() as u64, written)?;
    expect_parked_within(&spliced, "backend", MIB + REACTION)
}

/// Both sides read 64 KiB every 10 ms while the other sends 32 MiB: both directions get paused,
/// and every byte arrives.
#[test]
fn slow_readers_both_ways() -> Result<()> {
    const LEN: u64 = 32 * MIB;
    const PAUSE: Duration = Duration::from_millis(10);
    const LIMIT: Duration = Duration::from_secs(40);
    let world = World::new()?;
    let spliced = start(&world, "sockmap_backlog_limit = \"1MiB\"")?;
    let hello = simple_hello("sm.example");
    let expected_hello = hello.clone();
    let (hello_tx, hello_rx) = mpsc::channel::<()>();
    let server = backend(&world, PORT, Duration::ZERO, move |mut stream| {
        let mut writer = stream.try_clone()?;
        let sender = spawn(move || {
            raw::send_stream(&mut writer, SEED_DOWN, LEN)?;
            writer.shutdown(Shutdown::Write)?;
            Ok(())
        });
        expect_hello(&mut stream, &expected_hello)?;
        let _ = hello_tx.send(());
        receive_slowly(&mut stream, SEED_UP, LEN, PAUSE, LIMIT).context("the backend")?;
        result(&sender, LIMIT, "the backend's sender")
    })?;
    let started = Instant::now();
    let (mut client, me) = connect_after_hello(&world, &hello, &hello_rx)?;
    let mut writer = client.try_clone()?;
    let sender = spawn(move || {
        raw::send_stream(&mut writer, SEED_UP, LEN)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(())
    });
    receive_slowly(&mut client, SEED_DOWN, LEN, PAUSE, LIMIT).context("the client")?;
    result(&sender, LIMIT, "the client's sender")?;
    result(&server, LIMIT, "the backend")?;
    eprintln!(
        "32 MiB each way to slow readers in {:.2?}",
        started.elapsed()
    );
    expect_ok(&spliced, me, hello.len() as u64 + LEN, LEN)?;
    let (client_pauses, backend_pauses) = (
        detached(&spliced, "client")?,
        detached(&spliced, "backend")?,
    );
    ensure!(
        client_pauses > 0 && backend_pauses > 0,
        "expected both directions paused, got client {client_pauses} backend {backend_pauses}; \
         diagnostics:\n{}",
        tail(&spliced.stderr_text(), 30)
    );
    Ok(())
}

/// CPU time (user + system, in clock ticks) spliced's threads used so far.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("stat"))?;
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        for i in [11, 12] {
            total += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Six clients upload 4 MiB each and half-close without reading the echo, so both directions
/// of their connections are paused with the client's end of stream pending. While they wait,
/// spliced must stay (nearly) idle and keep serving other clients; when they finally read,
/// every byte arrives.
#[test]
fn paused_half_closed_connections_do_not_stall_others() -> Result<()> {
    const LEN: u64 = 4 * MIB;
    const STUCK: usize = 6;
    let world = World::new()?;
    let spliced = start(&world, "sockmap_backlog_limit = \"256KiB\"")?;
    let pid = spliced.pid().context("no pid")?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("echo.example");
    let mut stuck = Vec::new();
    for i in 0..STUCK as u64 {
        let mut client = raw::connect(&world, 443, IO)?;
        client.write_all(&hello)?;
        expect_hello(&mut client, &hello)?;
        let mut writer = client.try_clone()?;
        let sender = spawn(move || {
            raw::send_stream(&mut writer, 52 + i, LEN)?;
            writer.shutdown(Shutdown::Write)?;
            Ok(())
        });
        stuck.push((client, sender));
    }
    // Each upload gets paused; a stalled spliced may not even get that far, which the checks
    // below catch, so the wait's own timeout is not an error.
    let paused = wait_for("the uploads to be paused", Duration::from_secs(5), || {
        Ok(detached(&spliced, "client")? >= STUCK as u64)
    });
    eprintln!(
        "{} of {STUCK} uploads paused ({paused:?})",
        detached(&spliced, "client")?
    );
    // Let them settle into waiting for their readers.
    std::thread::sleep(Duration::from_millis(300));
    let ticks_before = cpu_ticks(pid)?;
    let idle = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu_ticks(pid)? - ticks_before;
    // Clock ticks are 1/100 s.
    let cpu = ticks as f64 / idle.elapsed().as_secs_f64();
    eprintln!("while {STUCK} paused connections wait for their readers spliced uses {cpu:.0}% CPU");

    let mut slow = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let served = (|| -> Result<()> {
            let mut client = raw::connect(&world, 443, Duration::from_secs(2))?;
            client.write_all(&hello)?;
            expect_hello(&mut client, &hello)
        })();
        if let Err(e) = served {
            slow.push(format!(
                "connection {i}: {e:#} after {:?}",
                started.elapsed()
            ));
        }
    }
    // Now the slow readers read: everything must arrive.
    for (i, (mut client, sender)) in stuck.into_iter().enumerate() {
        client.set_read_timeout(Some(Duration::from_secs(5)))?;
        receive(&mut client, 52 + i as u64, LEN)
            .with_context(|| format!("paused connection {i}"))?;
        result(&sender, IO, "a paused connection's sender")?;
    }
    ensure!(
        slow.is_empty(),
        "new connections were not served while paused connections waited ({cpu:.0}% CPU):\n{}",
        slow.join("\n")
    );
    ensure!(
        cpu < 20.0,
        "spliced used {cpu:.0}% CPU while paused connections waited for their readers"
    );
    Ok(())
}
