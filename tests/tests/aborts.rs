//! An abort stays an abort: when one side resets its connection while bytes flow, the other
//! side's connection is reset too (a read fails with ECONNRESET), never ended with a FIN that a
//! reader would take for a complete stream. Each engine, each side, uploading and
//! downloading. (`sockmap_resets.rs` checks the sockmap engine's timing and access log further.)
//!
//! Run as root (network namespaces, eBPF) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test aborts`.
use std::{io::Write as _, sync::mpsc, time::Duration};

use anyhow::{Result, ensure};
use spliced_tests::{
    World,
    raw::{self, End, SEED_DOWN, SEED_UP, expect_hello, result, simple_hello},
    sockmap::{PORT, backend, config_with, connect_after_hello},
    spliced::{Launch, Spliced, field},
};

/// Read and write timeout of every socket: a hang fails instead of blocking the suite.
const IO: Duration = Duration::from_secs(20);
/// How much flows before the reset.
const BEFORE_RESET: u64 = 1 << 20;
/// The length of the streams the verifying side checks its first bytes against.
const SEND_CAP: u64 = 1 << 30;

fn start(world: &World, engine: &str) -> Result<Spliced> {
    Launch::new(config_with(engine, "")).start(world, &[443])
}

/// Checks the access log blames `side` (`client` or `backend`) for `client`'s connection.
fn expect_blamed(spliced: &Spliced, client: std::net::SocketAddr, side: &str) -> Result<()> {
    let line = spliced.log_line_for(client, IO)?;
    ensure!(
        field(&line, "outcome").is_some_and(|o| o.starts_with(&format!("{side}_"))),
        "expected a {side}_* outcome: {line}"
    );
    Ok(())
}

/// The backend resets after receiving the hello and [`BEFORE_RESET`] bytes, with the client
/// `uploading` (sending all along) or downloading (the backend sent [`BEFORE_RESET`] bytes
/// first): the client's read ends with a reset.
fn backend_resets(engine: &str, uploading: bool) -> Result<()> {
    let world = World::new()?;
    let spliced = start(&world, engine)?;
    let hello = simple_hello("sm.example");
    let expected = hello.clone();
    let server = backend(&world, PORT, Duration::ZERO, move |mut stream| {
        expect_hello(&mut stream, &expected)?;
        if uploading {
            raw::receive_first(&mut stream, SEED_UP, SEND_CAP, BEFORE_RESET as usize)?;
        } else {
            raw::send_stream(&mut stream, SEED_DOWN, BEFORE_RESET)?;
        }
        raw::reset(stream)
    })?;
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    let (got, end) = if uploading {
        raw::send_until_end(&mut client, SEED_UP, IO)
    } else {
        let (got, end) = raw::read_to_end(&mut client, usize::MAX);
        (got.len() as u64, end)
    };
    result(&server, IO, "the backend")?;
    ensure!(
        end == End::Reset,
        "{engine}: the backend reset while the client was {}, but the client's connection \
         ended with {end:?} after {got} bytes",
        if uploading {
            "uploading"
        } else {
            "downloading"
        },
    );
    expect_blamed(&spliced, me, "backend")
}

/// The client resets after sending the hello and [`BEFORE_RESET`] bytes (`uploading`), or
/// after receiving [`BEFORE_RESET`] bytes of a backend that sends all along: the backend's read
/// ends with a reset.
fn client_resets(engine: &str, uploading: bool) -> Result<()> {
    let world = World::new()?;
    let spliced = start(&world, engine)?;
    let hello = simple_hello("sm.example");
    let expected = hello.clone();
    let (hello_tx, hello_rx) = mpsc::channel::<()>();
    let server = backend(&world, PORT, Duration::ZERO, move |mut stream| {
        expect_hello(&mut stream, &expected)?;
        let _ = hello_tx.send(());
        if uploading {
            let (got, end) = raw::read_to_end(&mut stream, usize::MAX);
            Ok((got.len() as u64, end))
        } else {
            Ok(raw::send_until_end(&mut stream, SEED_DOWN, IO))
        }
    })?;
    let (mut client, me) = connect_after_hello(&world, &hello, &hello_rx)?;
    if uploading {
        raw::send_stream(&mut client, SEED_UP, BEFORE_RESET)?;
    } else {
        raw::receive_first(&mut client, SEED_DOWN, SEND_CAP, BEFORE_RESET as usize)?;
    }
    raw::reset(client)?;
    let (got, end) = result(&server, IO + IO, "the backend")?;
    ensure!(
        end == End::Reset,
        "{engine}: the client reset while {}, but the backend's connection ended with {end:?} \
         after {got} bytes",
        if uploading {
            "uploading"
        } else {
            "downloading"
        }
    );
    expect_blamed(&spliced, me, "client")
}

#[test]
fn splice_backend_reset_while_client_uploads() -> Result<()> {
    backend_resets("splice", true)
}

#[test]
fn splice_backend_reset_while_client_downloads() -> Result<()> {
    backend_resets("splice", false)
}

#[test]
fn splice_client_reset_while_uploading() -> Result<()> {
    client_resets("splice", true)
}

#[test]
fn splice_client_reset_while_downloading() -> Result<()> {
    client_resets("splice", false)
}

#[test]
fn copy_backend_reset_while_client_uploads() -> Result<()> {
    backend_resets("copy", true)
}

#[test]
fn copy_backend_reset_while_client_downloads() -> Result<()> {
    backend_resets("copy", false)
}

#[test]
fn copy_client_reset_while_uploading() -> Result<()> {
    client_resets("copy", true)
}

#[test]
fn copy_client_reset_while_downloading() -> Result<()> {
    client_resets("copy", false)
}

#[test]
fn sockmap_backend_reset_while_client_uploads() -> Result<()> {
    backend_resets("sockmap", true)
}

#[test]
fn sockmap_backend_reset_while_client_downloads() -> Result<()> {
    backend_resets("sockmap", false)
}

#[test]
fn sockmap_client_reset_while_uploading() -> Result<()> {
    client_resets("sockmap", true)
}

#[test]
fn sockmap_client_reset_while_downloading() -> Result<()> {
    client_resets("sockmap", false)
}
