//! 1 GiB each way at the same time through the real `spliced` binary, every byte verified by
//! position on both ends, once with each engine: `sockmap`, `splice` and `copy`.
//!
//! Run as root with a release build of the proxy and of the tests (verification is slow in a
//! debug build): `cargo test --release -p spliced-tests --test bulk`.
use std::{
    io::{Read as _, Write as _},
    net::Shutdown,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use spliced_tests::{
    BACKEND_V6, World,
    raw::{self, BLOCK, Behavior, SEED_DOWN, SEED_UP, TestBackend, Verifier, simple_hello},
    spliced::{Launch, field},
};

const GIB: u64 = 1 << 30;
const BULK_PORT: u16 = 9100;
/// The whole transfer fails if it is not done by then.
const LIMIT: Duration = Duration::from_secs(300);

fn config(forwarding: &str, extra: &str) -> String {
    format!(
        r#"[defaults]
forwarding = "{forwarding}"
{extra}
client_hello_timeout = "1s"
connect_timeout = "1s"

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[site]]
hostnames = ["bulk.example"]
backend = "[{BACKEND_V6}]:{BULK_PORT}"
"#
    )
}

fn bulk(forwarding: &str, extra: &str) -> Result<()> {
    let world = World::new()?;
    let mut spliced = Launch::new(config(forwarding, extra)).start(&world, &[443])?;
    let hello = simple_hello("bulk.example");
    let hello_len = hello.len();
    let backend = TestBackend::start(
        &world,
        BULK_PORT,
        Behavior::Bulk {
            bytes_each_way: GIB,
            hello_len,
        },
    )?;
    let client = raw::connect(&world, 443, Duration::from_secs(60))?;
    let me = client.local_addr()?;
    let mut writer = client.try_clone()?;
    let mut reader = client.try_clone()?;
    let started = Instant::now();

    // With sockmap the client sends its stream only once the backend's first bytes arrived:
    // bytes that come together with the hello are what `sockmap_order.rs`'s early-data test is about,
    // and this one is about the bulk.
    let gate = forwarding == "sockmap";
    let (through_tx, through_rx) = mpsc::channel::<()>();

    // The transfer runs on its own threads; this one only watches the clock.
    let (done_tx, done_rx) = mpsc::channel();
    let send_done = done_tx.clone();
    std::thread::spawn(move || {
        let result = (|| -> Result<()> {
            writer.write_all(&hello)?;
            if gate {
                through_rx
                    .recv_timeout(Duration::from_secs(10))
                    .context("waiting for the backend's first bytes")?;
            }
            raw::send_stream(&mut writer, SEED_UP, GIB)?;
            writer.shutdown(Shutdown::Write)?;
            Ok(())
        })();
        let _ = send_done.send(("send", result, started.elapsed()));
    });
    std::thread::spawn(move || {
        let result = (|| -> Result<()> {
            let mut verifier = Verifier::new(SEED_DOWN, GIB);
            let mut first = vec![0u8; BLOCK];
            let n = reader.read(&mut first)?;
            verifier.feed(&first[..n])?;
            let _ = through_tx.send(());
            raw::receive_stream(&mut reader, &mut verifier)?;
            verifier.finish()
        })();
        let _ = done_tx.send(("receive", result, started.elapsed()));
    });
    let mut finished = Vec::new();
    while finished.len() < 2 {
        let left = LIMIT.saturating_sub(started.elapsed());
        match done_rx.recv_timeout(left) {
            Ok((what, result, at)) => {
                if let Err(e) = result {
                    let _ = client.shutdown(Shutdown::Both);
                    bail!(
                        "{forwarding}: the client's {what} failed after {at:.1?}: {e:#}\n\
                         backend: {:?}\ndiagnostics:\n{}",
                        backend.connections(),
                        spliced.stderr_text()
                    );
                }
                finished.push((what, at));
            }
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                bail!(
                    "{forwarding}: 1 GiB each way not done within {LIMIT:?} (finished: \
                     {finished:?}); backend: {:?}",
                    backend.connections()
                );
            }
        }
    }
    let elapsed = started.elapsed();
    let mib_s = GIB as f64 / (1 << 20) as f64 / elapsed.as_secs_f64();
    eprintln!(
        "bulk forwarding={forwarding}: 1 GiB each way simultaneously in {elapsed:.2?}: \
         {mib_s:.0} MiB/s each way, {:.0} MiB/s total ({finished:?})",
        2.0 * mib_s
    );

    let conns = backend.wait_finished(1, Duration::from_secs(30))?;
    ensure!(
        conns.len() == 1,
        "the backend saw {} connections",
        conns.len()
    );
    let conn = &conns[0];
    ensure!(conn.error.is_none(), "backend: {:?}", conn.error);
    ensure!(
        conn.proxy.is_none(),
        "unexpected PROXY header {:?}",
        conn.proxy
    );
    ensure!(
        conn.verified == GIB,
        "the backend verified {} bytes",
        conn.verified
    );
    ensure!(conn.sent == GIB, "the backend sent {} bytes", conn.sent);
    ensure!(
        conn.total == hello_len as u64 + GIB,
        "the backend received {}",
        conn.total
    );

    let line = spliced.log_line_for(me, Duration::from_secs(10))?;
    let number = |key: &str| -> Result<u64> {
        field(&line, key)
            .with_context(|| format!("no {key}= in {line}"))?
            .parse()
            .context(key.to_owned())
    };
    ensure!(field(&line, "outcome") == Some("ok"), "outcome: {line}");
    ensure!(field(&line, "engine") == Some(forwarding), "engine: {line}");
    ensure!(
        number("up")? == hello_len as u64 + GIB,
        "up= should be hello + 1 GiB: {line}"
    );
    ensure!(number("down")? == GIB, "down= should be 1 GiB: {line}");
    if forwarding == "sockmap" {
        // How much the kernel moved, for the record (a paused direction continues in user
        // space).
        let status = spliced.terminate(Duration::from_secs(10))?;
        ensure!(status.success(), "spliced exited with {status}");
        let counters = spliced
            .stderr_text()
            .lines()
            .find_map(|l| l.split_once("kernel counters: ").map(|(_, c)| c.to_owned()))
            .context("no kernel counters line at exit")?;
        eprintln!("bulk forwarding=sockmap: {counters}");
    }
    Ok(())
}

/// The kernel path alone: the backlog limit is above the transfer, so nothing pauses. It used
/// to deliver a ~64 KiB segment twice now and then (docs/sockmap-duplication.md); the verdict
/// now trims what it already forwarded.
#[test]
fn one_gib_each_way_sockmap() -> Result<()> {
    bulk(
        "sockmap",
        "sockmap_backlog_limit = \"4GiB\"\nsockmap_handoff = 0",
    )
}

/// With the defaults (`auto` does the same): each direction starts with splice, goes into the
/// kernel after its handoff, and under this saturating load may fall behind, leave the kernel
/// for splice and come back.
#[test]
fn one_gib_each_way_sockmap_default_limit() -> Result<()> {
    bulk("sockmap", "")
}

#[test]
fn one_gib_each_way_splice() -> Result<()> {
    bulk("splice", "")
}

#[test]
fn one_gib_each_way_copy() -> Result<()> {
    bulk("copy", "")
}
