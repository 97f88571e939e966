//! `cargo xtask demo`: the product's purpose in one command.
//!
//! An IPv4-only client reaches an IPv6-only nginx through spliced, by name, over HTTPS and
//! HTTP, and nginx's own access log shows the client's IPv4 address, learned from a PROXY v2
//! header. After the header the eBPF sockmap program moves the bytes inside the kernel; the
//! access log's `engine=sockmap` and the kernel counters at shutdown show it. Everything runs in namespaces made for the demo and removed afterwards.
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use spliced_tests::{
    BACKEND_V6, CLIENT_V4, World,
    backends::{self, NginxServer},
    spliced::Launch,
};

/// Runs the demo with the given `spliced` binary.
pub fn run(bin: &Path) -> Result<()> {
    // SAFETY: set before any thread is started; the harness reads it to find the binary.
    unsafe { std::env::set_var("SPLICED_BIN", bin) };
    let world = World::new()?;
    println!("== namespaces: client (IPv4 only) -> proxy (IPv4 + IPv6) -> backend (IPv6 only)");
    let cert = backends::cert(&world, &["shop.example"])?;
    let _nginx = backends::nginx(
        &world,
        &[
            NginxServer {
                port: 443,
                tls: Some(&cert),
                proxy_protocol: true,
                real_ip_from: None,
                body: "hello from IPv6-only nginx over TLS",
            },
            NginxServer {
                port: 80,
                tls: None,
                proxy_protocol: true,
                real_ip_from: None,
                body: "hello from IPv6-only nginx over HTTP",
            },
        ],
    )?;
    println!(
        "== nginx listens on [{BACKEND_V6}]:443 (ssl proxy_protocol) and :80 (proxy_protocol)"
    );
    let config = format!(
        "[defaults]\n\
         # every byte through the kernel; by default a direction's first 256 KiB go by splice\n\
         sockmap_handoff = 0\n\n\
         [[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\n\
         [[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\n\n\
         [[site]]\nhostnames = [\"shop.example\"]\nbackend = \"{BACKEND_V6}\"\nproxy_protocol = \"v2\"\n\
         # after the PROXY header, the kernel moves the bytes (eBPF sockmap)\n\
         forwarding = \"sockmap\"\n"
    );
    println!("== spliced configuration:\n{config}");
    let mut spliced = Launch::new(config.as_str()).start(&world, &[443, 80])?;
    for url in ["https://shop.example/", "http://shop.example/"] {
        println!("== client {CLIENT_V4}: curl {url}");
        let out = backends::curl(&world, CLIENT_V4, url, Some(&cert))?;
        if !out.status.success() {
            bail!(
                "curl {url} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        print!("   response: {}", String::from_utf8_lossy(&out.stdout));
    }
    for port in [443, 80] {
        let log = backends::wait_log(&backends::nginx_log(&world, port), &CLIENT_V4.to_string())
            .context("nginx did not log the client's IPv4 address")?;
        println!(
            "== nginx access log on port {port} (client address as nginx saw it via PROXY v2):"
        );
        for line in log.lines() {
            println!("   {line}");
        }
    }
    spliced.terminate(std::time::Duration::from_secs(5))?;
    println!("== spliced access log:");
    for line in spliced.stdout_text().lines() {
        println!("   {line}");
    }
    println!("== spliced diagnostics:");
    for line in spliced.stderr_text().lines() {
        println!("   {line}");
    }
    println!("== done; namespaces removed");
    Ok(())
}
