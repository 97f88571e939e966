//! `spliced status` against a running instance with the kernel path and the XDP filter: run
//! as an unprivileged user in spliced's namespace, it prints the listeners, the sites, the
//! connections by engine and the kernel and XDP counters; with nothing running it fails with
//! a clear message.
//!
//! Run as root (network namespaces) with a release build of the proxy:
//! `cargo xtask build && cargo test --release -p spliced-tests --test status`.
use std::{io::Write as _, process::Output, time::Duration};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use spliced_tests::{
    BACKEND_V6, Ns, World,
    raw::{self, Behavior, TestBackend, expect_hello, simple_hello},
    spliced::Launch,
    spliced_bin, wait_for,
};

const ECHO_PORT: u16 = 9350;
const IO: Duration = Duration::from_secs(10);

/// `spliced status --metrics ADDR` in the proxy namespace as user `nobody`.
fn status(world: &World, metrics: &str) -> Result<Output> {
    Ok(world
        .command(Ns::Proxy, "setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(spliced_bin()?)
        .args(["status", "--metrics", metrics])
        .output()?)
}

/// The value after `name=` in the status report.
fn counter(report: &str, name: &str) -> Option<u64> {
    let prefix = format!("{name}=");
    report
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
}

#[test]
fn status_shows_listeners_sites_engines_and_kernel_and_xdp_counters() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let config = format!(
        r#"[defaults]
forwarding = "sockmap"
sockmap_handoff = 0

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[site]]
hostnames = ["echo.example", "*.echo.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"

[xdp]
interfaces = ["eth0"]
"#
    );
    let mut spliced = Launch::new(config).metrics().start(&world, &[443])?;
    let metrics = spliced
        .metrics_addr()
        .context("started with metrics")?
        .to_string();
    let mut client = raw::connect(&world, 443, IO)?;
    let hello = simple_hello("echo.example");
    client.write_all(&hello)?;
    expect_hello(&mut client, &hello)?;
    let payload = vec![7u8; 64 * 1024];
    client.write_all(&payload)?;
    ensure!(raw::read_exactly(&mut client, payload.len())? == payload);
    let out = status(&world, &metrics)?;
    let forwarding = String::from_utf8(out.stdout)?;
    ensure!(
        forwarding.contains(
            "connections: 1 open; forwarding, by engine: sockmap 1, splice 0, copy 0, http 0, \
             packet 0; ended, by engine: sockmap 0,"
        ),
        "while forwarding:\n{forwarding}"
    );
    raw::shut_and_expect_eof(&mut client, "the client")?;
    let mut report = String::new();
    wait_for("the connection in the status", IO, || {
        let out = status(&world, &metrics)?;
        ensure!(
            out.status.success(),
            "spliced status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        report = String::from_utf8(out.stdout)?;
        Ok(report.contains("outcomes: ok 1\n"))
    })?;
    eprintln!("{report}");
    for line in [
        "listeners: 0.0.0.0:443 (tls)\n",
        "sites: 1 (2 hostnames); default site: none (unknown names are refused)\n",
        "connections: 0 open; forwarding, by engine: sockmap 0, splice 0, copy 0, http 0, \
         packet 0; ended, by engine: sockmap 1, splice 0, copy 0, http 0, packet 0\n",
        "  socket-map entries: verdict 0, hold 0, peers 0\n",
    ] {
        ensure!(report.contains(line), "{line:?} not in:\n{report}");
    }
    let redirected = counter(&report, "redirected_bytes").context("redirected_bytes")?;
    ensure!(
        redirected >= payload.len() as u64,
        "the kernel redirected {redirected} bytes:\n{report}"
    );
    let passed = counter(&report, "passed").context("xdp passed")?;
    ensure!(passed > 0, "XDP passed nothing:\n{report}");
    ensure!(
        counter(&report, "dropped_deny") == Some(0),
        "dropped_deny:\n{report}"
    );

    spliced.stop(Signal::SIGTERM, Duration::from_secs(15))?;
    let out = status(&world, &metrics)?;
    ensure!(out.status.code() == Some(1), "exit status {}", out.status);
    ensure!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let error = String::from_utf8_lossy(&out.stderr);
    ensure!(
        error.starts_with(&format!(
            "spliced status: nothing answers at http://{metrics}/metrics (is spliced running \
             with --metrics {metrics}?): "
        )),
        "{error}"
    );
    Ok(())
}
