//! The hostile tests that move data through the proxy, shared by `hostile.rs` (splice) and
//! `hostile_sockmap.rs` (sockmap): every site without its own `forwarding` uses the including
//! file's `ENGINE`, so the same clients and backends exercise both engines. Tests whose outcome
//! does not depend on the engine (refusals before any byte is forwarded) live in `hostile.rs`
//! only.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use spliced_tests::{
    BACKEND_V6, CLIENT_V4, Ns, PROXY_V4, Service, World, backends,
    raw::{self, Behavior, End, Stream, TestBackend, client_hello, records, simple_hello},
    spliced::{Launch, Spliced, field},
};

use super::ENGINE;

pub(crate) const ECHO_PORT: u16 = 9000;

const DEFAULT_PORT: u16 = 9001;

const FIRST_PORT: u16 = 9002;

const TLS_SERVER_PORT: u16 = 9443;

/// Nothing ever listens here: connecting is refused.
const DOWN_PORT: u16 = 9999;

/// How long a client waits for one read before calling it a hang.
pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for an access-log line.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// The configuration every test uses: `[default]` only when `default` says so.
fn config(forwarding: &str, hello_timeout: &str, default: bool) -> String {
    let mut cfg = format!(
        r#"[defaults]
forwarding = "{forwarding}"
# The sockmap run puts every byte through the kernel path (no splice phase first).
sockmap_handoff = 0
client_hello_timeout = "{hello_timeout}"
connect_timeout = "1s"

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[listen]]
address = "0.0.0.0:80"
protocol = "http"

[[site]]
hostnames = ["echo.example", "*.wild.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"
proxy_protocol = "none"

[[site]]
hostnames = ["v1.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"
proxy_protocol = "v1"

[[site]]
hostnames = ["v2.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"
proxy_protocol = "v2"

[[site]]
hostnames = ["copy.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"
forwarding = "copy"

[[site]]
hostnames = ["first.example"]
backend = "[{BACKEND_V6}]:{FIRST_PORT}"

[[site]]
hostnames = ["first-copy.example"]
backend = "[{BACKEND_V6}]:{FIRST_PORT}"
forwarding = "copy"

[[site]]
hostnames = ["tls.example"]
backend = "[{BACKEND_V6}]:{TLS_SERVER_PORT}"

[[site]]
hostnames = ["down.example"]
backend = "[{BACKEND_V6}]:{DOWN_PORT}"
"#
    );
    if default {
        cfg.push_str(&format!(
            "\n[default]\nbackend = \"[{BACKEND_V6}]:{DEFAULT_PORT}\"\n"
        ));
    }
    cfg
}

/// A world with spliced running on 443 (TLS) and 80 (HTTP), with its metrics endpoint.
fn start(cfg: &str) -> Result<(World, Spliced)> {
    let world = World::new()?;
    let spliced = Launch::new(cfg).metrics().start(&world, &[443, 80])?;
    Ok((world, spliced))
}

pub(crate) fn standard() -> Result<(World, Spliced)> {
    start(&config(ENGINE, "1s", false))
}

/// The access-log line of `client`, checked for every `key=value` in `expect`.
pub(crate) fn expect_log(
    spliced: &Spliced,
    client: SocketAddr,
    expect: &[(&str, &str)],
) -> Result<String> {
    let line = spliced.log_line_for(client, LOG_WAIT)?;
    for (key, value) in expect {
        ensure!(
            field(&line, key) == Some(value),
            "access log: expected {key}={value} in\n{line}\nall:\n{}",
            spliced.stdout_text()
        );
    }
    Ok(line)
}

fn log_number(line: &str, key: &str) -> Result<u64> {
    field(line, key)
        .with_context(|| format!("no {key}= in {line}"))?
        .parse()
        .with_context(|| format!("{key}= is not a number in {line}"))
}

/// Sends each of `pieces` as its own write, `gap` apart.
fn send_pieces(stream: &mut TcpStream, pieces: &[&[u8]], gap: Duration) -> Result<()> {
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 && !gap.is_zero() {
            std::thread::sleep(gap);
        }
        stream.write_all(piece).context("writing to the proxy")?;
    }
    Ok(())
}

/// Connects, sends `pieces` (the hello, possibly cut up), then `payload`, half-closes, reads
/// everything the echo backend sends back, and checks that the client got exactly what it sent,
/// the backend received exactly that too, and the access log says ok for `name`.
fn echo_roundtrip(
    world: &World,
    spliced: &Spliced,
    echo: &TestBackend,
    pieces: &[&[u8]],
    gap: Duration,
    name: &str,
) -> Result<()> {
    let sent_hello: Vec<u8> = pieces.concat();
    let payload = Stream::prefix(42, 10_000);
    let mut client = raw::connect(world, 443, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    let before = echo.connections().len();
    send_pieces(&mut client, pieces, gap)?;
    client.write_all(&payload)?;
    client.shutdown(Shutdown::Write)?;
    let (got, end) = raw::read_to_end(&mut client, 1 << 20);
    let expected = [sent_hello.as_slice(), &payload].concat();
    ensure!(end == End::Eof, "the echo did not end with EOF but {end:?}");
    ensure!(
        got == expected,
        "the client got {} bytes back, expected its own {} bytes (first difference at {:?})",
        got.len(),
        expected.len(),
        got.iter().zip(&expected).position(|(a, b)| a != b)
    );
    let conns = echo.wait_finished(before + 1, Duration::from_secs(5))?;
    let conn = conns.last().context("no backend connection")?;
    ensure!(conn.error.is_none(), "backend error: {:?}", conn.error);
    ensure!(
        conn.proxy.is_none(),
        "unexpected PROXY header: {:?}",
        conn.proxy
    );
    ensure!(
        conn.total == expected.len() as u64,
        "backend got {} bytes",
        conn.total
    );
    ensure!(
        conn.first == expected,
        "the backend did not receive the exact bytes sent"
    );
    let line = expect_log(spliced, me, &[("outcome", "ok"), ("name", name)])?;
    ensure!(
        log_number(&line, "up")? == expected.len() as u64,
        "up= wrong: {line}"
    );
    ensure!(
        log_number(&line, "down")? == expected.len() as u64,
        "down= wrong: {line}"
    );
    Ok(())
}

#[test]
fn hello_trickled_one_byte_per_write() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("echo.example");
    let pieces: Vec<&[u8]> = hello.chunks(1).collect();
    echo_roundtrip(
        &world,
        &spliced,
        &echo,
        &pieces,
        Duration::from_millis(1),
        "echo.example",
    )
}

#[test]
fn hello_split_over_three_records() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let message = client_hello(Some("echo.example"), &["h2", "http/1.1"], false);
    let wire = records(&message, &[30, 110]);
    ensure!(wire.len() == message.len() + 15, "three records");
    echo_roundtrip(
        &world,
        &spliced,
        &echo,
        &[&wire],
        Duration::ZERO,
        "echo.example",
    )
}

#[test]
fn pq_hello_split_across_records_and_writes() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let message = client_hello(Some("echo.example"), &["h2"], true);
    ensure!(
        message.len() > 1600,
        "the PQ hello is {} bytes",
        message.len()
    );
    // Records cut at 700 and 1300; writes cut elsewhere, inside record headers and payloads.
    let wire = records(&message, &[700, 1300]);
    let cuts = [3, 500, 706, 1100, 1309, 1600, wire.len()];
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in cuts {
        pieces.push(&wire[start..cut]);
        start = cut;
    }
    echo_roundtrip(
        &world,
        &spliced,
        &echo,
        &pieces,
        Duration::from_millis(20),
        "echo.example",
    )?;
    // A wildcard name with the same treatment, through the copy engine's sibling site list.
    let message = client_hello(Some("a.wild.example"), &[], true);
    let wire = records(&message, &[1, 2, 1000]);
    let pieces: Vec<&[u8]> = wire.chunks(400).collect();
    echo_roundtrip(
        &world,
        &spliced,
        &echo,
        &pieces,
        Duration::from_millis(10),
        "a.wild.example",
    )
}

/// Sends `bytes` to `port`, half-closes, and returns what came back and how it ended, with the
/// client's address for the log.
pub(crate) fn send_and_read(
    world: &World,
    port: u16,
    bytes: &[u8],
) -> Result<(Vec<u8>, End, SocketAddr)> {
    let mut client = raw::connect(world, port, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    client.write_all(bytes)?;
    // The proxy may close before reading everything; a failed half-close is not the point.
    let _ = client.shutdown(Shutdown::Write);
    let (got, end) = raw::read_to_end(&mut client, 1 << 16);
    Ok((got, end, me))
}

#[test]
fn no_sni_with_default_site_reaches_the_default_backend() -> Result<()> {
    let (world, spliced) = start(&config(ENGINE, "1s", true))?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let default = TestBackend::start(&world, DEFAULT_PORT, Behavior::Echo)?;
    let hello = records(&client_hello(None, &["h2"], true), &[900]);
    let mut client = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    client.write_all(b"after the hello")?;
    client.shutdown(Shutdown::Write)?;
    let (got, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(end == End::Eof, "expected EOF, got {end:?}");
    ensure!(
        got == [hello.as_slice(), b"after the hello"].concat(),
        "echo differs"
    );
    let conns = default.wait_finished(1, Duration::from_secs(5))?;
    ensure!(
        conns.len() == 1 && conns[0].first == got,
        "the default backend got {conns:?}"
    );
    ensure!(
        echo.connections().is_empty(),
        "the named site's backend was used"
    );
    let backend = SocketAddr::new(BACKEND_V6, DEFAULT_PORT).to_string();
    expect_log(
        &spliced,
        me,
        &[("outcome", "ok"), ("name", "-"), ("backend", &backend)],
    )?;
    // An unknown name goes there too when a default exists.
    let (got, end, me) = send_and_read(&world, 443, &simple_hello("nobody.example"))?;
    ensure!(
        end == End::Eof && got == simple_hello("nobody.example"),
        "no echo from default"
    );
    expect_log(&spliced, me, &[("outcome", "ok"), ("backend", &backend)])?;
    Ok(())
}

#[test]
fn silent_clients_do_not_delay_others() -> Result<()> {
    let (world, spliced) = start(&config(ENGINE, "5s", false))?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    // One client says nothing, another sends half a hello; both hold their connection.
    let mut silent = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let silent_addr = silent.local_addr()?;
    let mut half = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let hello = simple_hello("echo.example");
    half.write_all(&hello[..20])?;
    spliced.wait_metrics("spliced to hold both connections", LOG_WAIT, |m| {
        Ok(m.count("spliced_open_connections", &[])? >= 2)
    })?;
    let started = Instant::now();
    for i in 0..10 {
        let round = Instant::now();
        let (got, end, _) = send_and_read(&world, 443, &hello)?;
        ensure!(
            end == End::Eof && got == hello,
            "round {i}: no echo ({end:?})"
        );
        let took = round.elapsed();
        ensure!(
            took < Duration::from_secs(1),
            "round {i} took {took:?} next to silent clients"
        );
    }
    let total = started.elapsed();
    ensure!(
        total < Duration::from_secs(4),
        "ten round trips took {total:?}"
    );
    // They were served while the silent ones were still held open (the timeout is 5 s).
    ensure!(
        !spliced
            .stdout_text()
            .contains(&format!("client={silent_addr} ")),
        "the silent client was already closed: others were not served while it waited"
    );
    ensure!(
        echo.wait_finished(10, Duration::from_secs(5))?.len() == 10,
        "ten backend conns"
    );
    // And the silent clients are closed at their own timeout.
    silent.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (got, end) = raw::read_to_end(&mut silent, 1 << 16);
    ensure!(
        end.closed() && got.is_empty(),
        "silent client: {got:02x?} {end:?}"
    );
    expect_log(
        &spliced,
        silent_addr,
        &[("outcome", "client_hello_timeout")],
    )?;
    let (_, end) = raw::read_to_end(&mut half, 1 << 16);
    ensure!(end.closed(), "half-hello client: {end:?}");
    Ok(())
}

#[test]
fn five_hundred_concurrent_connections() -> Result<()> {
    const N: usize = 500;
    const DATA: usize = 4096;
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("echo.example");
    let started = Instant::now();
    let ready = AtomicUsize::new(0);
    let (addrs, failures) =
        raw::run_clients(&world, N, |i| one_client(i, &hello, &ready, N, DATA))?;
    let elapsed = started.elapsed();
    ensure!(
        failures.is_empty(),
        "{} of {N} clients failed, e.g.:\n{}\naccess-log lines that are not ok:\n{}\n\
         diagnostics:\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        spliced
            .stdout_text()
            .lines()
            .filter(|l| field(l, "outcome") != Some("ok"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n"),
        spliced.stderr_text()
    );
    ensure!(
        elapsed < Duration::from_secs(60),
        "{N} connections took {elapsed:?}"
    );
    eprintln!("{N} concurrent connections served in {elapsed:.2?}");
    let conns = echo.wait_finished(N, Duration::from_secs(10))?;
    ensure!(
        conns.len() == N,
        "the backend saw {} connections",
        conns.len()
    );
    let errors: Vec<_> = conns.iter().filter_map(|c| c.error.clone()).collect();
    ensure!(
        errors.is_empty(),
        "backend errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    // One ok line per client, each with the right byte counts.
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let log = spliced.stdout_text();
        let ok: std::collections::HashMap<&str, &str> = log
            .lines()
            .filter(|l| field(l, "outcome") == Some("ok"))
            .filter_map(|l| Some((field(l, "client")?, l)))
            .collect();
        let missing: Vec<_> = addrs
            .iter()
            .filter(|a| !ok.contains_key(a.to_string().as_str()))
            .collect();
        if missing.is_empty() {
            let want = (hello.len() + DATA).to_string();
            for addr in &addrs {
                let line = ok[addr.to_string().as_str()];
                ensure!(
                    field(line, "up") == Some(&want) && field(line, "down") == Some(&want),
                    "byte counts: {line}"
                );
            }
            let ok_lines = log
                .lines()
                .filter(|l| field(l, "outcome") == Some("ok"))
                .count();
            ensure!(ok_lines == N, "{ok_lines} ok lines for {N} connections");
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "{} of {N} clients have no outcome=ok line, e.g. {}",
                missing.len(),
                missing[0]
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One of many concurrent clients: connect, send the hello, wait until all are connected (at
/// most 20 s), send `data` bytes, half-close, and check the echo.
fn one_client(
    i: usize,
    hello: &[u8],
    ready: &AtomicUsize,
    n: usize,
    data: usize,
) -> Result<SocketAddr> {
    let addr = SocketAddr::new(PROXY_V4, 443);
    let mut client = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    client.set_nodelay(true)?;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    client.set_write_timeout(Some(Duration::from_secs(30)))?;
    let me = client.local_addr()?;
    client.write_all(hello)?;
    ready.fetch_add(1, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready.load(Ordering::SeqCst) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let payload = Stream::prefix(i as u64, data);
    client.write_all(&payload)?;
    client.shutdown(Shutdown::Write)?;
    let (got, end) = raw::read_to_end(&mut client, 1 << 20);
    ensure!(
        end == End::Eof,
        "ended with {end:?} after {} bytes",
        got.len()
    );
    // A refusal is a 7-byte TLS alert and a clean close: say so, rather than a byte count
    // that reads like a truncated echo (the access log then says why it was refused).
    ensure!(
        got.len() != 7 || got[0] != 0x15,
        "refused with the TLS alert {got:02x?} before any echo"
    );
    ensure!(
        got.len() == hello.len() + data,
        "got {} bytes back",
        got.len()
    );
    ensure!(
        got[..hello.len()] == *hello && got[hello.len()..] == payload,
        "echo differs"
    );
    Ok(me)
}

/// Sends a hello and 1 MiB, half-closes, and reads the echo concurrently: the client must get
/// exactly everything back, then EOF, and the backend must have seen our EOF.
pub(crate) fn half_close_with_data_in_flight(name: &str, engine: &str) -> Result<()> {
    const MIB: u64 = 1 << 20;
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello(name);
    let mut client = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    let hello_len = hello.len();
    // Wait for the echoed hello first: by then the connection is set up and, with sockmap,
    // in the kernel. A FIN that arrives before that makes the engine fall back to splice by
    // design (a socket that got its FIN cannot enter a sockmap), which is not what this
    // test is about.
    client.write_all(&hello)?;
    let mut echoed = vec![0u8; hello_len];
    client.read_exact(&mut echoed)?;
    ensure!(echoed == hello, "the echoed hello differs");
    let mut writer = client.try_clone()?;
    let sender = std::thread::spawn(move || -> Result<()> {
        raw::send_stream(&mut writer, 42, MIB)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let mut reader = client;
    let (rest, end) = raw::read_to_end(&mut reader, 4 << 20);
    let mut got = echoed;
    got.extend_from_slice(&rest);
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    ensure!(
        end == End::Eof,
        "ended with {end:?} after {} bytes",
        got.len()
    );
    ensure!(
        got.len() as u64 == hello_len as u64 + MIB,
        "got {} bytes back",
        got.len()
    );
    let mut verifier = raw::Verifier::new(42, MIB);
    verifier.feed(&got[hello_len..])?;
    verifier.finish()?;
    let conns = echo.wait_finished(1, Duration::from_secs(5))?;
    ensure!(
        conns[0].saw_eof,
        "the backend never saw the client's half-close"
    );
    ensure!(
        conns[0].error.is_none(),
        "backend error: {:?}",
        conns[0].error
    );
    ensure!(
        conns[0].sent == hello_len as u64 + MIB,
        "backend sent {}",
        conns[0].sent
    );
    let line = expect_log(&spliced, me, &[("outcome", "ok"), ("engine", engine)])?;
    ensure!(
        log_number(&line, "up")? == hello_len as u64 + MIB,
        "up= wrong: {line}"
    );
    ensure!(
        log_number(&line, "down")? == hello_len as u64 + MIB,
        "down= wrong: {line}"
    );
    Ok(())
}

#[test]
fn half_close_with_a_mebibyte_in_flight() -> Result<()> {
    half_close_with_data_in_flight("echo.example", ENGINE)
}

#[test]
fn server_first_greeting_arrives_before_the_client_says_more() -> Result<()> {
    let (world, spliced) = standard()?;
    let greeting = b"220 backend.example ready\r\n".to_vec();
    let first = TestBackend::start(
        &world,
        FIRST_PORT,
        Behavior::ServerFirst {
            greeting: greeting.clone(),
        },
    )?;
    let hello = simple_hello("first.example");
    let mut client = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    // Read the greeting (and, after it, the echoed hello) without sending anything more.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let want = greeting.len() + hello.len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < want && Instant::now() < deadline {
        let n = std::io::Read::read(&mut client, &mut buf).context("waiting for the greeting")?;
        ensure!(
            n > 0,
            "the proxy closed before the greeting arrived (got {got:02x?})"
        );
        got.extend_from_slice(&buf[..n]);
    }
    ensure!(
        got.starts_with(&greeting),
        "the first bytes were not the greeting: {got:02x?}"
    );
    ensure!(
        got == [greeting.as_slice(), &hello].concat(),
        "greeting then echoed hello"
    );
    client.write_all(b"QUIT\r\n")?;
    client.shutdown(Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(
        end == End::Eof && rest == b"QUIT\r\n",
        "after the greeting: {rest:02x?} {end:?}"
    );
    let line = expect_log(
        &spliced,
        me,
        &[
            ("outcome", "ok"),
            ("name", "first.example"),
            ("engine", ENGINE),
        ],
    )?;
    ensure!(
        log_number(&line, "down")? == (want + 6) as u64,
        "down= wrong: {line}"
    );
    let conn = first.wait_finished(1, Duration::from_secs(5))?.remove(0);
    ensure!(conn.error.is_none(), "backend error: {:?}", conn.error);
    ensure!(
        conn.first == [hello.as_slice(), b"QUIT\r\n"].concat() && conn.saw_eof,
        "the backend received {:02x?}",
        conn.first
    );
    Ok(())
}

#[test]
fn proxy_v1_header_precedes_the_exact_hello() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = records(&client_hello(Some("v1.example"), &["h2"], true), &[1000]);
    let (got, end, me) = send_and_read(&world, 443, &hello)?;
    ensure!(
        end == End::Eof && got == hello,
        "the client's echo differs ({end:?})"
    );
    let conn = echo.wait_finished(1, Duration::from_secs(5))?.remove(0);
    let header = format!("PROXY TCP4 {CLIENT_V4} {PROXY_V4} {} 443\r\n", me.port());
    ensure!(
        conn.first.starts_with(header.as_bytes()),
        "expected {header:?} first, got {:?}",
        String::from_utf8_lossy(&conn.first[..conn.first.len().min(60)])
    );
    ensure!(
        conn.first[header.len()..] == hello,
        "the hello did not follow the header exactly"
    );
    ensure!(
        conn.total == (header.len() + hello.len()) as u64,
        "extra bytes: {}",
        conn.total
    );
    let line = expect_log(&spliced, me, &[("outcome", "ok"), ("proxy", "v1")])?;
    ensure!(
        log_number(&line, "up")? == hello.len() as u64,
        "up= counts the header: {line}"
    );
    Ok(())
}

#[test]
fn proxy_v2_header_precedes_the_exact_hello() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("v2.example");
    let (got, end, me) = send_and_read(&world, 443, &hello)?;
    ensure!(
        end == End::Eof && got == hello,
        "the client's echo differs ({end:?})"
    );
    let conn = echo.wait_finished(1, Duration::from_secs(5))?.remove(0);
    let v2 = raw::parse_proxy_v2_inet(&conn.first)?;
    ensure!(
        v2.ver_cmd == 0x21,
        "version/command {:#04x}, expected 0x21",
        v2.ver_cmd
    );
    ensure!(
        v2.family == 0x11,
        "family {:#04x}, expected 0x11 (TCP over IPv4)",
        v2.family
    );
    ensure!(
        v2.source == me,
        "source {} but the client is {me}",
        v2.source
    );
    ensure!(
        v2.destination == SocketAddr::new(PROXY_V4, 443),
        "destination {}",
        v2.destination
    );
    ensure!(
        conn.first[v2.len..] == hello,
        "the hello did not follow the header exactly"
    );
    ensure!(
        conn.total == (v2.len + hello.len()) as u64,
        "extra bytes: {}",
        conn.total
    );
    expect_log(&spliced, me, &[("outcome", "ok"), ("proxy", "v2")])?;
    Ok(())
}

/// The hello builder's output is a ClientHello a real TLS server answers (OpenSSL replies with
/// a ServerHello), also when it is post-quantum sized and split into records, so the other
/// tests exercise the proxy with realistic hellos.
#[test]
fn built_hellos_get_a_server_hello_from_openssl_through_the_proxy() -> Result<()> {
    let (world, spliced) = standard()?;
    let cert = backends::cert(&world, &["tls.example"])?;
    let mut cmd = world.command(Ns::Backend, "openssl");
    cmd.args(["s_server", "-quiet", "-accept"])
        .arg(format!("[{BACKEND_V6}]:{TLS_SERVER_PORT}"))
        .arg("-cert")
        .arg(&cert.cert)
        .arg("-key")
        .arg(&cert.key);
    let mut server = Service::start("openssl-s_server", cmd, world.dir())?;
    backends::wait_listening(&world, Ns::Backend, TLS_SERVER_PORT, &mut server)?;
    for (pq, split) in [(false, vec![]), (true, vec![]), (true, vec![64, 900, 1500])] {
        let wire = records(
            &client_hello(Some("tls.example"), &["http/1.1"], pq),
            &split,
        );
        let mut client = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
        let me = client.local_addr()?;
        client.write_all(&wire)?;
        let mut head = [0u8; 6];
        std::io::Read::read_exact(&mut client, &mut head).with_context(|| {
            format!(
                "no ServerHello (pq={pq}); s_server said {}",
                server.stderr_text()
            )
        })?;
        ensure!(
            head[0] == 22 && head[1] == 3 && head[5] == 2,
            "expected a handshake record with a ServerHello, got {head:02x?} (pq={pq})"
        );
        drop(client);
        expect_log(&spliced, me, &[("name", "tls.example")])?;
    }
    Ok(())
}

#[test]
fn http_request_reaches_the_backend_unmodified() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let request: &[u8] = b"POST /upload HTTP/1.1\r\nHost: Echo.Example:80\r\n\
        Content-Length: 11\r\nUser-Agent: raw\r\n\r\nhello world";
    let mut client = raw::connect(&world, 80, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    send_pieces(
        &mut client,
        &[&request[..30], &request[30..]],
        Duration::from_millis(20),
    )?;
    client.shutdown(Shutdown::Write)?;
    let (got, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(end == End::Eof, "expected EOF, got {end:?}");
    ensure!(
        got == request,
        "echo differs: {:?}",
        String::from_utf8_lossy(&got)
    );
    let conn = echo.wait_finished(1, Duration::from_secs(5))?.remove(0);
    ensure!(
        conn.first == request,
        "the backend got {:?}",
        String::from_utf8_lossy(&conn.first)
    );
    let line = expect_log(&spliced, me, &[("outcome", "ok"), ("name", "echo.example")])?;
    ensure!(
        log_number(&line, "up")? == request.len() as u64,
        "up= wrong: {line}"
    );
    Ok(())
}

/// The backend half-closes first while the client still has 1 MiB to send: the client must see
/// the greeting and EOF, and every byte it sends afterwards must still reach the backend.
pub(crate) fn backend_half_closes_first_on(name: &str, engine: &str) -> Result<()> {
    const MIB: u64 = 1 << 20;
    let (world, spliced) = standard()?;
    let greeting = b"goodbye, but keep talking\r\n".to_vec();
    let backend = TestBackend::start(
        &world,
        FIRST_PORT,
        Behavior::ServerClosesFirst {
            greeting: greeting.clone(),
        },
    )?;
    let hello = simple_hello(name);
    let mut client = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    let (got, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(
        end == End::Eof && got == greeting,
        "expected the greeting then EOF, got {got:02x?} {end:?}"
    );
    raw::send_stream(&mut client, 7, MIB).context("sending after the backend's half-close")?;
    client.shutdown(Shutdown::Write)?;
    let conn = backend.wait_finished(1, Duration::from_secs(10))?.remove(0);
    ensure!(conn.error.is_none(), "backend error: {:?}", conn.error);
    ensure!(
        conn.saw_eof,
        "the backend never saw the client's end of stream"
    );
    ensure!(
        conn.total == hello.len() as u64 + MIB,
        "the backend received {} bytes, expected {}",
        conn.total,
        hello.len() as u64 + MIB
    );
    let mut verifier = raw::Verifier::new(7, MIB);
    verifier.feed(&conn.first[hello.len()..])?;
    ensure!(conn.first.starts_with(&hello), "the hello was altered");
    let line = expect_log(&spliced, me, &[("outcome", "ok"), ("engine", engine)])?;
    ensure!(
        log_number(&line, "up")? == hello.len() as u64 + MIB,
        "up= wrong: {line}"
    );
    ensure!(
        log_number(&line, "down")? == greeting.len() as u64,
        "down= wrong: {line}"
    );
    Ok(())
}

#[test]
fn backend_half_closes_first() -> Result<()> {
    backend_half_closes_first_on("first.example", ENGINE)
}

#[test]
fn client_reset_mid_stream_closes_the_backend_side() -> Result<()> {
    let (world, spliced) = standard()?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("echo.example");
    let mut client = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    client.write_all(&Stream::prefix(3, 100_000))?;
    // Wait until the connection is spliced through (the backend has data), then reset it.
    spliced_tests::wait_for(
        "the backend to receive data",
        Duration::from_secs(5),
        || Ok(echo.connections().first().is_some_and(|c| c.total > 0)),
    )?;
    // Linger 0: close sends RST instead of FIN.
    nix::sys::socket::setsockopt(
        &client,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    drop(client);
    let conn = echo.wait_finished(1, Duration::from_secs(5))?.remove(0);
    ensure!(
        conn.saw_eof || conn.error.is_some(),
        "the backend connection was not closed: {conn:?}"
    );
    let line = spliced.log_line_for(me, LOG_WAIT)?;
    let outcome = field(&line, "outcome").unwrap_or_default();
    ensure!(
        outcome.starts_with("client_"),
        "expected a client-side outcome (client_reset), got {line}"
    );
    ensure!(
        field(&line, "engine") == Some(ENGINE),
        "expected engine={ENGINE}: {line}"
    );
    Ok(())
}

/// A world whose spliced closes connections idle for `idle` (no byte either way).
fn with_idle_timeout(idle: &str) -> Result<(World, Spliced)> {
    let cfg = config(ENGINE, "1s", false).replacen(
        "[defaults]\n",
        &format!("[defaults]\nidle_timeout = \"{idle}\"\n"),
        1,
    );
    start(&cfg)
}

/// With an idle timeout of 500 ms and the echo backend: a client that sent its hello, its
/// address, and the hello.
fn idle_timeout_client() -> Result<(World, Spliced, TestBackend, TcpStream, SocketAddr, Vec<u8>)> {
    let (world, spliced) = with_idle_timeout("500ms")?;
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let mut client = raw::connect(&world, 443, CLIENT_TIMEOUT)?;
    let me = client.local_addr()?;
    let hello = simple_hello("echo.example");
    client.write_all(&hello)?;
    Ok((world, spliced, echo, client, me, hello))
}

/// A connection that goes quiet after the hello is closed once `idle_timeout` passes, and
/// the access log says why.
#[test]
fn idle_connections_are_closed_after_the_idle_timeout() -> Result<()> {
    let (_world, spliced, _echo, mut client, me, hello) = idle_timeout_client()?;
    let started = Instant::now();
    let (got, end) = raw::read_to_end(&mut client, 1 << 16);
    let waited = started.elapsed();
    ensure!(
        got == hello,
        "the echo of the hello differs: {} bytes",
        got.len()
    );
    ensure!(end.closed(), "the idle connection was not closed: {end:?}");
    ensure!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "closed after {waited:?}, with an idle timeout of 500ms"
    );
    expect_log(&spliced, me, &[("outcome", "idle_timeout")])?;
    Ok(())
}

/// Bytes trickling in more slowly than the engine's own bookkeeping, but more often than the
/// idle timeout, keep the connection open well past that timeout.
#[test]
fn trickling_connections_outlive_the_idle_timeout() -> Result<()> {
    let (_world, spliced, _echo, mut client, me, hello) = idle_timeout_client()?;
    ensure!(
        raw::read_exactly(&mut client, hello.len())? == hello,
        "hello echo differs"
    );
    // 2.4 s in all, almost five idle timeouts; one byte every 150 ms.
    for i in 0..16u8 {
        std::thread::sleep(Duration::from_millis(150));
        client.write_all(&[i])?;
        let got = raw::read_exactly(&mut client, 1)
            .with_context(|| format!("byte {i} did not come back"))?;
        ensure!(got == [i], "byte {i} came back as {got:?}");
    }
    client.shutdown(Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(
        rest.is_empty() && end == End::Eof,
        "after the trickle: {} bytes, {end:?}",
        rest.len()
    );
    expect_log(&spliced, me, &[("outcome", "ok")])?;
    Ok(())
}
