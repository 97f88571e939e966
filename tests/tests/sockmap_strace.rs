//! Proof that the sockmap engine keeps the payload in the kernel: under strace, spliced reads
//! only the hello from its sockets while 128 MiB pass through, where the copy engine reads all
//! of them.
//!
//! Run as root (network namespaces, eBPF) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test sockmap_strace`.
use std::{collections::HashMap, io::Write as _, net::Shutdown, time::Duration};

use anyhow::{Context as _, Result, ensure};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use spliced_tests::{
    World,
    raw::{
        self, Behavior, SEED_DOWN, SEED_UP, TestBackend, receive_first, receive_rest, result,
        simple_hello, spawn,
    },
    sockmap::*,
    spliced::{Launch, field},
    wait_for,
};

/// Bytes spliced read from sockets and from anything else, by strace's log.
#[derive(Debug, Default)]
struct Reads {
    socket_bytes: u64,
    socket_calls: u64,
    other_bytes: u64,
}

/// Kills a process with SIGKILL when dropped, unless its PID was taken out.
struct KillOnDrop(Option<Pid>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// Sums the return values of read-like calls in an `strace -f -yy` log, split by whether the
/// descriptor was a socket. Calls interrupted by another thread's output are matched to their
/// `resumed` line by PID.
fn parse_strace(log: &str) -> Reads {
    let mut reads = Reads::default();
    let mut pending: HashMap<&str, bool> = HashMap::new();
    for line in log.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let on_socket = |text: &str| {
            let fd = text.split_once('(').map_or("", |(_, rest)| rest);
            let fd = fd.split(',').next().unwrap_or("");
            fd.contains("<TCP") || fd.contains("<socket:")
        };
        if call.contains("<unfinished ...>") {
            pending.insert(pid, on_socket(call));
            continue;
        }
        let socket = if call.contains(" resumed>") {
            pending.remove(pid).unwrap_or(false)
        } else {
            on_socket(call)
        };
        let Some((_, ret)) = call.rsplit_once(" = ") else {
            continue;
        };
        let Ok(n) = ret.split_whitespace().next().unwrap_or("").parse::<i64>() else {
            continue;
        };
        let Ok(n) = u64::try_from(n) else {
            continue;
        };
        if socket {
            reads.socket_bytes += n;
            reads.socket_calls += 1;
        } else {
            reads.other_bytes += n;
        }
    }
    reads
}

/// Moves 64 MiB each way through one connection of `engine` with spliced under strace and
/// returns what spliced read.
fn reads_under_strace(engine: &str, extra: &str) -> Result<Reads> {
    const LEN: u64 = 64 * MIB;
    let world = World::new()?;
    let hello = simple_hello("bulk.example");
    let bulk = TestBackend::start(
        &world,
        BULK_PORT,
        Behavior::Bulk {
            bytes_each_way: LEN,
            hello_len: hello.len(),
        },
    )?;
    let trace = world.dir().join(format!("strace-{engine}.log"));
    let strace: Vec<std::ffi::OsString> = [
        "strace",
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-yy",
        "-s",
        "0",
        "-e",
        "trace=read,recvfrom,recvmsg,readv",
        "-e",
        "signal=none",
        "-o",
    ]
    .iter()
    .map(Into::into)
    .chain([trace.clone().into_os_string()])
    .collect();
    let mut spliced = Launch::new(config_with(engine, extra))
        .named(&format!("spliced-{engine}"))
        .wrapped(&strace)
        .start(&world, &[443])?;
    // spliced is strace's child: stopping strace would leave it running, so it is stopped by
    // its own PID (and killed if the test fails before that).
    let tracer = spliced.pid().context("no pid")?;
    let children = std::fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children"))?;
    let mut traced = KillOnDrop(Some(Pid::from_raw(
        children
            .split_whitespace()
            .next()
            .context("strace has no child")?
            .parse()?,
    )));
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    let verifier = receive_first(&mut client, SEED_DOWN, LEN, 1)?;
    let mut writer = client.try_clone()?;
    let sender = spawn(move || {
        raw::send_stream(&mut writer, SEED_UP, LEN)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(())
    });
    receive_rest(&mut client, verifier)?;
    result(&sender, IO, "the client's sender")?;
    let conn = bulk.wait_finished(1, IO)?.remove(0);
    ensure!(
        conn.error.is_none() && conn.verified == LEN,
        "backend: {conn:?}"
    );
    let line = spliced.log_line_for(me, LOG_WAIT)?;
    ensure!(
        field(&line, "outcome") == Some("ok") && field(&line, "engine") == Some(engine),
        "{line}"
    );
    // Stop spliced so that strace finishes its log and exits.
    if let Some(pid) = traced.0 {
        kill(pid, Signal::SIGTERM)?;
    }
    wait_for("strace to exit", Duration::from_secs(15), || {
        Ok(spliced.check_running().is_err())
    })?;
    // strace reaped it: the PID is no longer ours to signal.
    traced.0 = None;
    let _ = spliced.stop(Signal::SIGKILL, Duration::from_secs(1));
    let log = std::fs::read_to_string(&trace)?;
    let reads = parse_strace(&log);
    eprintln!(
        "forwarding={engine}: 64 MiB each way; spliced read {} bytes from sockets in {} calls \
         and {} bytes from other descriptors ({} strace lines)",
        reads.socket_bytes,
        reads.socket_calls,
        reads.other_bytes,
        log.lines().count()
    );
    Ok(reads)
}

/// With sockmap, spliced reads only the hello from its sockets while 128 MiB pass through; the
/// same measurement on the copy engine sees all of them, which shows that it counts. The
/// backlog limit is set above the transfer, so no pause (which deliberately hands a direction to
/// user space) interferes; see the next test for the default.
#[test]
fn payload_never_reaches_user_space() -> Result<()> {
    let sockmap = reads_under_strace("sockmap", "sockmap_backlog_limit = \"256MiB\"")?;
    let copy = reads_under_strace("copy", "")?;
    ensure!(
        copy.socket_bytes >= 128 * MIB,
        "the copy engine read only {} bytes from sockets: the measurement is broken",
        copy.socket_bytes
    );
    ensure!(
        sockmap.socket_bytes < 64 * KIB,
        "with sockmap spliced read {} bytes from its sockets",
        sockmap.socket_bytes
    );
    Ok(())
}
