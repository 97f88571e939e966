//! Every connection gets its access-log line with what really happened: one cut when the
//! SIGTERM grace period ends says `outcome=shutdown`, and a refused one counts the bytes the
//! client sent in `up=`. With `--log-format json` every access-log and diagnostic line is one
//! JSON object; `--access-log FILE` is reopened on SIGUSR1 (logrotate); and lines never
//! interleave, even with hundreds of connections ending at once.
//!
//! Run as root (network namespaces) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test log_lines`.
use std::{
    collections::BTreeSet,
    io::Write as _,
    net::{Shutdown, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::Signal;
use serde_json::Value;
use spliced_tests::{
    BACKEND_V6, World,
    raw::{
        self, ALERT_HANDSHAKE_FAILURE, ALERT_UNRECOGNIZED_NAME, Behavior, End, TestBackend,
        expect_hello, simple_hello,
    },
    spliced::{Launch, Spliced, field},
    wait_for,
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

/// The keys of every access-log line, in the text line's order (`requests`, `id` and `detail`
/// only appear when they apply).
const KEYS: [&str; 12] = [
    "client", "listener", "name", "alpn", "site", "backend", "proxy", "engine", "up", "down", "ms",
    "outcome",
];

/// Parses every line of `text` as a JSON access-log line: an object with [`KEYS`] (and maybe
/// `detail`), nothing else, and a newline after the last one.
fn json_lines(text: &str) -> Result<Vec<serde_json::Map<String, Value>>> {
    ensure!(
        text.is_empty() || text.ends_with('\n'),
        "the last line is cut: {text:?}"
    );
    text.lines()
        .map(|line| {
            let value: Value =
                serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
            let Value::Object(object) = value else {
                bail!("not an object: {line}");
            };
            for key in KEYS {
                ensure!(object.contains_key(key), "no {key} in {line}");
            }
            for key in object.keys() {
                ensure!(
                    KEYS.contains(&key.as_str()) || key == "detail",
                    "unexpected key {key} in {line}"
                );
            }
            Ok(object)
        })
        .collect()
}

/// A served connection (hello echoed, then a clean end); returns the client's address.
fn served(world: &World) -> Result<SocketAddr> {
    let mut client = raw::connect(world, 443, IO)?;
    let me = client.local_addr()?;
    let hello = simple_hello("echo.example");
    client.write_all(&hello)?;
    expect_hello(&mut client, &hello)?;
    raw::shut_and_expect_eof(&mut client, "a served client")?;
    Ok(me)
}

/// With `--log-format json`, the access log is one JSON object per line with the text line's
/// fields (numbers as numbers, absent values as null), and every diagnostic line on standard
/// error is a JSON object with a level and fields.
#[test]
fn json_lines_parse_with_the_expected_fields() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced = start(&world, &["--log-format", "json"])?;
    let me = served(&world)?;
    let mut unknown = raw::connect(&world, 443, IO)?;
    let unknown_addr = unknown.local_addr()?;
    unknown.write_all(&simple_hello("nobody.example"))?;
    unknown.shutdown(Shutdown::Write)?;
    let _ = raw::read_to_end(&mut unknown, 1 << 16);
    let mut lines = Vec::new();
    wait_for("two access-log lines", IO, || {
        lines = json_lines(&spliced.stdout_text())?;
        Ok(lines.len() >= 2)
    })?;
    let line = |addr: SocketAddr| {
        lines
            .iter()
            .find(|l| l["client"] == addr.to_string())
            .with_context(|| format!("no line for {addr}: {lines:?}"))
    };
    let ok = line(me)?;
    ensure!(ok["outcome"] == "ok", "{ok:?}");
    ensure!(
        ok["name"] == "echo.example" && ok["site"] == "echo.example",
        "{ok:?}"
    );
    ensure!(
        ok["listener"] == "0.0.0.0:443" && ok["proxy"] == "none",
        "{ok:?}"
    );
    let hello_len = simple_hello("echo.example").len() as u64;
    ensure!(
        ok["up"].as_u64() == Some(hello_len) && ok["down"].as_u64() == Some(hello_len),
        "{ok:?}"
    );
    ensure!(ok["ms"].is_u64() && ok["alpn"] == "h2,http/1.1", "{ok:?}");
    let refused = line(unknown_addr)?;
    ensure!(
        refused["outcome"] == "unknown_name"
            && refused["site"].is_null()
            && refused["backend"].is_null(),
        "{refused:?}"
    );
    let diagnostics = spliced.stderr_text();
    let mut listening = false;
    for l in diagnostics.lines() {
        let value: Value =
            serde_json::from_str(l).with_context(|| format!("diagnostics not JSON: {l:?}"))?;
        ensure!(
            value["level"].is_string() && value["fields"]["message"].is_string(),
            "{l}"
        );
        listening |= value["fields"]["message"] == "listening"
            && value["fields"]["address"] == "0.0.0.0:443";
    }
    ensure!(listening, "no listening line in:\n{diagnostics}");
    Ok(())
}

/// The names (`name=`) of the text access-log lines in `path`.
fn names_in(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(text
        .lines()
        .filter_map(|l| field(l, "client"))
        .map(str::to_owned)
        .collect())
}

/// logrotate's way: the file is moved away, lines go on landing in it (spliced still holds it)
/// until SIGUSR1; after spliced says it reopened the file, the next lines land in a new file at
/// the path and none in the old one. Nothing goes to standard output.
#[test]
fn the_access_log_file_is_reopened_on_sigusr1() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let path = world.dir().join("access.log");
    let rotated = world.dir().join("access.log.1");
    let spliced = start(&world, &["--access-log", &path.display().to_string()])?;
    let wait_line = |file: &Path, client: SocketAddr| {
        wait_for(&format!("{client} in {}", file.display()), IO, || {
            Ok(names_in(file)?.contains(&client.to_string()))
        })
    };
    let first = served(&world)?;
    wait_line(&path, first)?;
    std::fs::rename(&path, &rotated)?;
    let second = served(&world)?;
    wait_line(&rotated, second)?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(spliced.pid().context("no PID")?)?);
    nix::sys::signal::kill(pid, Signal::SIGUSR1)?;
    wait_for("the reopen to be logged", IO, || {
        Ok(spliced.stderr_text().contains("access log reopened"))
    })?;
    let third = served(&world)?;
    wait_line(&path, third)?;
    ensure!(
        names_in(&rotated)? == [first.to_string(), second.to_string()],
        "the rotated file: {:?}",
        names_in(&rotated)?
    );
    ensure!(
        names_in(&path)? == [third.to_string()],
        "the new file: {:?}",
        names_in(&path)?
    );
    ensure!(
        spliced.stdout_text().is_empty(),
        "standard output: {}",
        spliced.stdout_text()
    );
    Ok(())
}

/// 500 clients at once, their connections ending together on both worker threads: every
/// access-log line is whole (one JSON object per line, none cut or merged), and each client
/// has exactly one.
#[test]
fn lines_never_interleave_under_500_concurrent_connections() -> Result<()> {
    const CLIENTS: usize = 500;
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced = start(&world, &["--log-format", "json"])?;
    let (addrs, failures) = raw::run_clients(&world, CLIENTS, |_| served(&world))?;
    ensure!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let mut lines = Vec::new();
    wait_for("a line per client", Duration::from_secs(30), || {
        lines = json_lines(&spliced.stdout_text())?;
        Ok(lines.len() >= CLIENTS)
    })?;
    ensure!(lines.len() == CLIENTS, "{} lines", lines.len());
    let logged: BTreeSet<String> = lines
        .iter()
        .filter(|l| l["outcome"] == "ok")
        .filter_map(|l| l["client"].as_str().map(str::to_owned))
        .collect();
    let expected: BTreeSet<String> = addrs.iter().map(ToString::to_string).collect();
    ensure!(
        logged == expected,
        "{} clients logged ok, {} expected",
        logged.len(),
        expected.len()
    );
    Ok(())
}
