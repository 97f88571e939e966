//! Hostile and awkward clients against the real `spliced` binary, with raw sockets on both
//! sides: hellos cut into pieces, garbage, silence, unknown names, unreachable backends, many
//! connections at once, half-closes, server-first protocols and PROXY headers as the backend
//! sees them. Every test checks what the client observes and the access-log line.
//!
//! The tests that forward data are in `hostile/body.rs` and run here with the splice engine and
//! in `hostile_sockmap.rs` with the sockmap engine; the refusals below (nothing is forwarded, so
//! the engine does not matter) and the copy-engine variants run only here.
//!
//! Run as root (network namespaces) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test hostile`.
use std::{
    io::Write as _,
    net::{Shutdown, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use spliced_tests::raw::{
    self, ALERT_HANDSHAKE_FAILURE, ALERT_UNRECOGNIZED_NAME, Behavior, End, TestBackend, XorShift,
    client_hello, records, simple_hello,
};
use spliced_tests::spliced::Spliced;

/// The engine the shared tests in `hostile/body.rs` ask for.
const ENGINE: &str = "splice";

#[path = "hostile/body.rs"]
mod body;

use body::{
    CLIENT_TIMEOUT, ECHO_PORT, backend_half_closes_first_on, expect_log,
    half_close_with_data_in_flight, send_and_read, standard,
};

#[test]
fn plain_http_on_the_tls_port_gets_handshake_failure() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let (got, end, me) =
        send_and_read(&world, 443, b"GET / HTTP/1.1\r\nHost: echo.example\r\n\r\n")?;
    ensure!(
        got == ALERT_HANDSHAKE_FAILURE,
        "expected a handshake_failure alert, got {got:02x?}"
    );
    ensure!(end.closed(), "connection not closed: {end:?}");
    expect_log(&spliced, me, &[("outcome", "not_tls")])?;
    ensure!(echo.connections().is_empty(), "garbage reached the backend");
    Ok(())
}

#[test]
fn random_bytes_on_the_tls_port_get_handshake_failure() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let mut garbage = vec![0u8; 600];
    XorShift::new(99).fill(&mut garbage);
    garbage[0] = 0x47; // never 22 (handshake), so the very first byte decides
    let (got, end, me) = send_and_read(&world, 443, &garbage)?;
    ensure!(
        got == ALERT_HANDSHAKE_FAILURE,
        "expected a handshake_failure alert, got {got:02x?}"
    );
    ensure!(end.closed(), "connection not closed: {end:?}");
    expect_log(&spliced, me, &[("outcome", "not_tls")])?;
    ensure!(echo.connections().is_empty(), "garbage reached the backend");
    Ok(())
}

#[test]
fn empty_connections_are_closed_and_logged() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    // Connect and half-close: the proxy must close too, sending nothing.
    let (got, end, me) = send_and_read(&world, 443, b"")?;
    ensure!(
        got.is_empty(),
        "the proxy sent {got:02x?} to an empty connection"
    );
    ensure!(end == End::Eof, "expected EOF, got {end:?}");
    expect_log(&spliced, me, &[("outcome", "client_closed_before_hello")])?;
    // Connect and close at once, on both ports.
    for port in [443, 80] {
        let client = raw::connect(&world, port, CLIENT_TIMEOUT)?;
        let me = client.local_addr()?;
        drop(client);
        expect_log(&spliced, me, &[("outcome", "client_closed_before_hello")])?;
    }
    ensure!(
        echo.connections().is_empty(),
        "an empty connection reached the backend"
    );
    Ok(())
}

#[test]
fn half_a_hello_then_silence_is_closed_at_the_hello_timeout() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("echo.example");
    let mut client = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    let started = Instant::now();
    client.write_all(&hello[..hello.len() / 2])?;
    let (got, end) = raw::read_to_end(&mut client, 1 << 16);
    let waited = started.elapsed();
    closed_at_the_hello_deadline(
        &spliced,
        &echo,
        me,
        &got,
        &end,
        waited,
        Duration::from_secs(5),
    )
}

/// What a client whose hello is not complete by `client_hello_timeout` (1 s here) sees: the
/// connection closed after about that, and by `latest`; at most a handshake_failure alert
/// before it; the access log says why; nothing reached the backend.
fn closed_at_the_hello_deadline(
    spliced: &Spliced,
    backend: &TestBackend,
    me: SocketAddr,
    got: &[u8],
    end: &End,
    waited: Duration,
    latest: Duration,
) -> Result<()> {
    ensure!(
        end.closed(),
        "the proxy did not close the connection: {end:?} after {waited:?}"
    );
    ensure!(
        waited >= Duration::from_millis(800) && waited <= latest,
        "closed after {waited:?}, expected about client_hello_timeout = 1s"
    );
    ensure!(
        got.is_empty() || got == ALERT_HANDSHAKE_FAILURE,
        "unexpected bytes before the close: {got:02x?}"
    );
    expect_log(spliced, me, &[("outcome", "client_hello_timeout")])?;
    ensure!(
        backend.connections().is_empty(),
        "part of a hello reached the backend"
    );
    Ok(())
}

#[test]
fn http_without_host_gets_421() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let (got, end, me) = send_and_read(&world, 80, b"GET / HTTP/1.0\r\n\r\n")?;
    let text = String::from_utf8_lossy(&got);
    ensure!(
        text.starts_with("HTTP/1.1 421 "),
        "expected a 421 response, got {text:?}"
    );
    ensure!(end.closed(), "connection not closed: {end:?}");
    expect_log(&spliced, me, &[("outcome", "missing_name")])?;
    // HTTP/1.1 requires Host (RFC 9112 §3.2): a request without it is malformed, not unrouted.
    let (got, end, me) = send_and_read(&world, 80, b"GET / HTTP/1.1\r\n\r\n")?;
    let text = String::from_utf8_lossy(&got);
    ensure!(
        text.starts_with("HTTP/1.1 400 "),
        "expected a 400 response, got {text:?}"
    );
    ensure!(end.closed(), "connection not closed: {end:?}");
    expect_log(&spliced, me, &[("outcome", "bad_request")])?;
    ensure!(
        echo.connections().is_empty(),
        "a request without Host reached the backend"
    );
    Ok(())
}

#[test]
fn unknown_name_is_refused_on_tls_and_http() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let (got, end, me) = send_and_read(&world, 443, &simple_hello("nobody.example"))?;
    ensure!(
        got == ALERT_UNRECOGNIZED_NAME,
        "expected unrecognized_name, got {got:02x?}"
    );
    ensure!(end.closed(), "connection not closed: {end:?}");
    expect_log(
        &spliced,
        me,
        &[("outcome", "unknown_name"), ("name", "nobody.example")],
    )?;

    // A name one label deeper than a wildcard does not match it.
    let (got, _, me) = send_and_read(&world, 443, &simple_hello("a.b.wild.example"))?;
    ensure!(
        got == ALERT_UNRECOGNIZED_NAME,
        "expected unrecognized_name, got {got:02x?}"
    );
    expect_log(&spliced, me, &[("outcome", "unknown_name")])?;

    let (got, end, me) = send_and_read(
        &world,
        80,
        b"GET / HTTP/1.1\r\nHost: nobody.example\r\n\r\n",
    )?;
    let text = String::from_utf8_lossy(&got);
    ensure!(
        text.starts_with("HTTP/1.1 421 "),
        "expected a 421 response, got {text:?}"
    );
    ensure!(end.closed(), "connection not closed: {end:?}");
    expect_log(
        &spliced,
        me,
        &[("outcome", "unknown_name"), ("name", "nobody.example")],
    )?;
    ensure!(
        echo.connections().is_empty(),
        "an unknown name reached a backend"
    );
    Ok(())
}

#[test]
fn no_sni_without_default_site_is_refused() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = records(&client_hello(None, &["h2"], false), &[]);
    let (got, end, me) = send_and_read(&world, 443, &hello)?;
    ensure!(
        got == ALERT_UNRECOGNIZED_NAME,
        "expected unrecognized_name, got {got:02x?}"
    );
    ensure!(end.closed(), "connection not closed: {end:?}");
    expect_log(&spliced, me, &[("outcome", "missing_name")])?;
    ensure!(
        echo.connections().is_empty(),
        "a hello without SNI reached a backend"
    );
    Ok(())
}

#[test]
fn unreachable_backend_closes_tls_and_answers_502_on_http() -> Result<()> {
    let (world, spliced) = standard()?;
    let (got, end, me) = send_and_read(&world, 443, &simple_hello("down.example"))?;
    ensure!(end.closed(), "the TLS client was not closed: {end:?}");
    ensure!(
        got.is_empty() || got == ALERT_HANDSHAKE_FAILURE,
        "the TLS client got {got:02x?}, expected a close (with at most an alert)"
    );
    expect_log(
        &spliced,
        me,
        &[("outcome", "backend_unreachable"), ("name", "down.example")],
    )?;

    let (got, end, me) =
        send_and_read(&world, 80, b"GET / HTTP/1.1\r\nHost: down.example\r\n\r\n")?;
    let text = String::from_utf8_lossy(&got);
    ensure!(
        text.starts_with("HTTP/1.1 502 "),
        "expected a 502 response, got {text:?}"
    );
    ensure!(end.closed(), "connection not closed: {end:?}");
    expect_log(
        &spliced,
        me,
        &[("outcome", "backend_unreachable"), ("name", "down.example")],
    )?;
    Ok(())
}

#[test]
fn half_close_with_a_mebibyte_in_flight_copy() -> Result<()> {
    half_close_with_data_in_flight("copy.example", "copy")
}

#[test]
fn hello_trickled_too_slowly_is_cut_at_the_hello_timeout() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("echo.example");
    let mut client = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    let mut writer = client.try_clone()?;
    let started = Instant::now();
    // A byte every 100 ms keeps the connection busy but the hello takes ~25 s: the deadline
    // is for the whole hello, not per read.
    let trickle = std::thread::spawn(move || {
        for byte in hello.chunks(1) {
            if writer.write_all(byte).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let (got, end) = raw::read_to_end(&mut client, 1 << 16);
    let waited = started.elapsed();
    let _ = client.shutdown(Shutdown::Both);
    let _ = trickle.join();
    closed_at_the_hello_deadline(
        &spliced,
        &echo,
        me,
        &got,
        &end,
        waited,
        Duration::from_secs(3),
    )
}

#[test]
fn oversized_hello_is_refused() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    // A ClientHello announcing 20000 bytes, sent in full over two records: more than the
    // 16 KiB a hello may take.
    let mut message = vec![1, 0, 0x4e, 0x20];
    message.resize(4 + 20_000, 0);
    let wire = records(&message, &[16_000]);
    let (got, end, me) = send_and_read(&world, 443, &wire)?;
    ensure!(
        got == ALERT_HANDSHAKE_FAILURE,
        "expected a handshake_failure alert, got {got:02x?}"
    );
    ensure!(end.closed(), "connection not closed: {end:?}");
    expect_log(&spliced, me, &[("outcome", "too_large")])?;
    ensure!(
        echo.connections().is_empty(),
        "an oversized hello reached the backend"
    );
    Ok(())
}

#[test]
fn backend_half_closes_first_copy() -> Result<()> {
    backend_half_closes_first_on("first-copy.example", "copy")
}
