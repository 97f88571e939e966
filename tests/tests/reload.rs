//! SIGHUP reloads as an operator's control panel sends them: many, under load, sometimes with a
//! broken file, sometimes removing a site that still has connections.
//!
//! - 50 reloads while clients connect without pause: not one connection fails (the counts are
//!   printed on standard error and written to `target/tmp/reload.summary`);
//! - a file with an error: the running configuration stays, and the log names file:line;
//! - a removed site: its new connections are refused with `unknown_name`, while a long
//!   transfer on it finishes byte-exact.
//!
//! Run as root with a release build of the proxy:
//! `cargo xtask build && SPLICED_BIN=$PWD/target/release/spliced cargo test --release -p spliced-tests --test reload`.
use std::{
    io::Write as _,
    net::Shutdown,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use spliced_tests::{
    BACKEND_V6, World, env_or,
    load::ClientLoop,
    raw::{
        self, ALERT_UNRECOGNIZED_NAME, Behavior, End, TestBackend, Verifier, expect_hello,
        receive_stream, send_stream_range, simple_hello, spawn,
    },
    spliced::{Launch, Spliced, field},
    wait_for,
};

const ECHO_PORT: u16 = 9330;
const IO: Duration = Duration::from_secs(10);

/// A configuration with one TLS listener on 443 and a site per name, all on the echo backend;
/// `extra` goes at the end verbatim.
fn config(names: &[&str], extra: &str) -> String {
    let mut out = String::from(
        "[defaults]\nclient_hello_timeout = \"2s\"\nconnect_timeout = \"2s\"\n\n\
         [[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n",
    );
    for name in names {
        out.push_str(&format!(
            "\n[[site]]\nhostnames = [\"{name}\"]\nbackend = \"[{BACKEND_V6}]:{ECHO_PORT}\"\n"
        ));
    }
    out.push_str(extra);
    out
}

fn pid(spliced: &Spliced) -> Result<Pid> {
    Ok(Pid::from_raw(i32::try_from(
        spliced.pid().context("no PID")?,
    )?))
}

/// How many times spliced has logged `what` so far.
fn logged(spliced: &Spliced, what: &str) -> usize {
    spliced.stderr_text().matches(what).count()
}

/// Sends SIGHUP and waits until spliced has logged one more `what` than before.
fn reload(spliced: &Spliced, what: &str) -> Result<()> {
    let before = logged(spliced, what);
    kill(pid(spliced)?, Signal::SIGHUP)?;
    wait_for(&format!("{what:?} after SIGHUP"), IO, || {
        Ok(logged(spliced, what) > before)
    })
    .with_context(|| spliced.stderr_text())
}

/// A hello for `name` and its echo, then a clean end.
fn roundtrip(world: &World, name: &str) -> Result<()> {
    let mut stream = raw::connect(world, 443, IO)?;
    let hello = simple_hello(name);
    stream.write_all(&hello)?;
    expect_hello(&mut stream, &hello).with_context(|| format!("a connection to {name}"))?;
    stream.shutdown(Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut stream, 1 << 16);
    ensure!(end == End::Eof && rest.is_empty(), "{name}: {end:?}");
    Ok(())
}

/// A hello for `name` must be refused with TLS's `unrecognized_name`, and logged as
/// `outcome=unknown_name`.
fn refused(world: &World, spliced: &Spliced, name: &str) -> Result<()> {
    let mut stream = raw::connect(world, 443, IO)?;
    let me = stream.local_addr()?;
    stream.write_all(&simple_hello(name))?;
    let (got, end) = raw::read_to_end(&mut stream, 1 << 16);
    ensure!(
        got == ALERT_UNRECOGNIZED_NAME && end.closed(),
        "{name}: expected the unrecognized_name alert and a close, got {got:02x?} and {end:?}"
    );
    let line = spliced.log_line_for(me, IO)?;
    ensure!(
        field(&line, "outcome") == Some("unknown_name"),
        "{name}: the access log says {line}"
    );
    Ok(())
}

/// 50 SIGHUPs, each waited for, while two clients make connections one after the other; every
/// other reload adds a site and the next removes it again, so the routing really changes.
#[test]
fn fifty_reloads_under_load_fail_no_connection() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced = Launch::new(config(&["a.example", "b.example"], "")).start(&world, &[443])?;
    let reloads = env_or("SPLICED_TEST_RELOADS", 50);
    let clients = ClientLoop::start(
        &world,
        443,
        &["a.example", "b.example"],
        2,
        100_000,
        Duration::from_secs(20 + reloads),
    )?;
    // Some connections before the first reload, so the loop is known to work.
    wait_for("the clients' first connections", IO, || {
        Ok(clients.attempted() >= 20)
    })?;
    let started = Instant::now();
    for i in 0..reloads {
        let names: &[&str] = if i % 2 == 0 {
            &["a.example", "b.example", "c.example"]
        } else {
            &["a.example", "b.example"]
        };
        std::fs::write(spliced.config_path(), config(names, ""))?;
        reload(&spliced, "configuration reloaded")?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    // And some after the last one.
    let after = clients.attempted() + 20;
    wait_for("connections after the last reload", IO, || {
        Ok(clients.attempted() >= after)
    })?;
    let counts = clients.stop();
    let summary = format!(
        "reload under load: {reloads} SIGHUPs in {:.1} s; connections: {counts}",
        took.as_secs_f64()
    );
    eprintln!("{summary}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("reload.summary"), format!("{summary}\n"));
    ensure!(
        logged(&spliced, "configuration reloaded") as u64 == reloads,
        "expected {reloads} reloads in the log:\n{}",
        spliced.stderr_text()
    );
    ensure!(counts.failed == 0, "{summary}");
    ensure!(counts.attempted >= 100, "too few connections: {summary}");
    Ok(())
}

/// A file with an error is refused as a whole: the log names file and line, the sites of the
/// running configuration still work, and a site only the broken file adds is unknown.
#[test]
fn an_invalid_file_keeps_the_running_configuration() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced = Launch::new(config(&["a.example"], "")).start(&world, &[443])?;
    roundtrip(&world, "a.example")?;
    // A valid new site, then a broken one.
    let broken = config(
        &["b.example"],
        "\n[[site]]\nhostnames = [\"c.example\"]\nbackend = \"not an address\"\n",
    );
    let line = broken
        .lines()
        .position(|l| l.contains("not an address"))
        .context("the broken line")?
        + 1;
    std::fs::write(spliced.config_path(), &broken)?;
    reload(&spliced, "reload refused")?;
    let log = spliced.stderr_text();
    let said = log
        .lines()
        .find(|l| l.contains("reload refused"))
        .context("no refusal in the log")?;
    let place = format!("{}:{line}:", spliced.config_path().display());
    ensure!(
        said.contains(&place),
        "the refusal should name {place}: {said}"
    );
    roundtrip(&world, "a.example")?;
    refused(&world, &spliced, "b.example")?;
    // Fixed, it loads.
    std::fs::write(spliced.config_path(), config(&["b.example"], ""))?;
    reload(&spliced, "configuration reloaded")?;
    roundtrip(&world, "b.example")?;
    refused(&world, &spliced, "a.example")?;
    Ok(())
}

/// A site removed by a reload: a transfer on it that started before goes on to its end, every
/// byte in place, while a new connection to it is refused.
#[test]
fn a_removed_site_refuses_new_connections_and_finishes_open_ones() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced =
        Launch::new(config(&["gone.example", "kept.example"], "")).start(&world, &[443])?;
    let total: u64 = env_or("SPLICED_TEST_RELOAD_BYTES", 64 << 20);
    let half = total / 2;
    let seed = 0x0dd_5eed;
    let mut stream = raw::connect(&world, 443, Duration::from_secs(60))?;
    let hello = simple_hello("gone.example");
    stream.write_all(&hello)?;
    expect_hello(&mut stream, &hello)?;
    let mut reader = stream.try_clone()?;
    let received = spawn(move || {
        let mut verifier = Verifier::new(seed, total);
        receive_stream(&mut reader, &mut verifier)?;
        verifier.finish()?;
        Ok(verifier.received())
    });
    send_stream_range(&mut stream, seed, 0, half).context("the first half")?;

    std::fs::write(spliced.config_path(), config(&["kept.example"], ""))?;
    reload(&spliced, "configuration reloaded")?;
    refused(&world, &spliced, "gone.example")?;
    roundtrip(&world, "kept.example")?;

    send_stream_range(&mut stream, seed, half, total).context("the second half")?;
    stream.shutdown(Shutdown::Write)?;
    let got = raw::result(&received, Duration::from_secs(120), "the echoed transfer")?;
    ensure!(got == total, "{got} of {total} bytes came back");
    Ok(())
}
