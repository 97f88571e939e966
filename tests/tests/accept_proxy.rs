//! PROXY from a balancer in front of spliced (`accept_proxy`, issue 17).
//!
//! HAProxy runs in the client namespace as the balancer: clients connect to it on
//! [`BALANCER`], and it connects on to spliced from that same address with `send-proxy-v2`
//! (with a CRC32C) on 443 and `send-proxy` (v1) on 80. spliced trusts only [`BALANCER`]; the
//! other client address, [`CLIENT_V4`], is untrusted. Behind spliced, nginx reads the PROXY
//! header spliced sends and logs the client it announces: it must be the original client,
//! not the balancer. Forged, missing and corrupted headers are refused and counted. A
//! balancer on IPv6 ([`World::client_v6`]) may announce an IPv4 client.
use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use spliced_tests::{
    CLIENT_V4, CLIENT_V4_B, CLIENT_V6, Ns, PROXY_FRONT_V6, PROXY_V4, PROXY_V6, Service, World,
    backends::{self, Cert, NginxServer},
    raw,
    spliced::{Launch, Spliced, field},
};

/// The balancer's address: the client namespace's second address.
const BALANCER: IpAddr = CLIENT_V4_B;
/// Where HAProxy listens for clients (TLS and HTTP).
const BALANCER_TLS: u16 = 8443;
const BALANCER_HTTP: u16 = 8080;

fn config() -> String {
    format!(
        "[defaults]\nclient_hello_timeout = \"2s\"\n\n\
         [[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\
         accept_proxy = [\"{BALANCER}/32\", \"2001:db8:ba1::/48\"]\n\n\
         [[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\n\
         accept_proxy = [\"{BALANCER}/32\"]\n\n\
         [[site]]\nhostnames = [\"pp.example\"]\nbackend = \"2001:db8:1::10\"\n\
         proxy_protocol = \"v2\"\n\n\
         [[site]]\nhostnames = [\"pp1.example\"]\nbackend = \"2001:db8:1::10\"\n\
         proxy_protocol = \"v1\"\n\n\
         [[site]]\nhostnames = [\"xff.example\"]\n\
         backend = {{ http = \"[2001:db8:1::10]:8080\" }}\n\
         forwarded_header = \"x-forwarded-for\"\n"
    )
}

/// HAProxy as a TCP balancer in the client namespace, bound to [`BALANCER`] on both sides.
fn balancer(world: &World) -> Result<Service> {
    let conf = format!(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend tls\n  bind {BALANCER}:{BALANCER_TLS}\n  default_backend tls\n\
         backend tls\n  server spliced {PROXY_V4}:443 source {BALANCER} send-proxy-v2 \
         proxy-v2-options crc32c,unique-id\n\
         frontend http\n  bind {BALANCER}:{BALANCER_HTTP}\n  default_backend http\n\
         backend http\n  server spliced {PROXY_V4}:80 source {BALANCER} send-proxy\n"
    );
    let path = world.dir().join("balancer.cfg");
    std::fs::write(&path, conf)?;
    let mut cmd = world.command(Ns::Client, "haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    let mut service = Service::start("balancer", cmd, world.dir())?.stop_with(Signal::SIGUSR1);
    for port in [BALANCER_TLS, BALANCER_HTTP] {
        backends::wait_listening(world, Ns::Client, port, &mut service)?;
    }
    Ok(service)
}

struct Setup {
    world: World,
    cert: Cert,
    spliced: Spliced,
    _nginx: Service,
}

fn setup() -> Result<Setup> {
    let world = World::new()?;
    let cert = backends::cert(&world, &["pp.example", "pp1.example"])?;
    let nginx = backends::nginx(
        &world,
        &[
            NginxServer {
                port: 443,
                tls: Some(&cert),
                proxy_protocol: true,
                real_ip_from: None,
                body: "behind-balancer-tls",
            },
            NginxServer {
                port: 80,
                tls: None,
                proxy_protocol: true,
                real_ip_from: None,
                body: "behind-balancer-http",
            },
            NginxServer {
                port: 8080,
                tls: None,
                proxy_protocol: false,
                real_ip_from: Some(PROXY_V6),
                body: "behind-balancer-xff",
            },
        ],
    )?;
    let spliced = Launch::new(config()).metrics().start(&world, &[443, 80])?;
    Ok(Setup {
        world,
        cert,
        spliced,
        _nginx: nginx,
    })
}

/// curl from [`CLIENT_V4`] port `local_port` through the balancer to `url_host`.
fn curl_via_balancer(s: &Setup, https: bool, host: &str, local_port: u16) -> Result<String> {
    let port = if https { BALANCER_TLS } else { BALANCER_HTTP };
    let scheme = if https { "https" } else { "http" };
    let mut cmd: Command = s.world.command(Ns::Client, "curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "--interface",
        &CLIENT_V4.to_string(),
    ])
    .args(["--local-port", &local_port.to_string()])
    .args(["--resolve", &format!("{host}:{port}:{BALANCER}")])
    .arg("--cacert")
    .arg(&s.cert.cert)
    .arg(format!("{scheme}://{host}:{port}/"));
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "curl {scheme}://{host}: {}; spliced:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.spliced.stdout_text(),
        s.spliced.stderr_text()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The balancer's clients reach the sites, and both nginx (through the PROXY header spliced
/// sends on) and spliced's access log name the original client, not the balancer.
#[test]
fn balancer_clients_are_seen_behind_spliced() -> Result<()> {
    let s = setup()?;
    let mut haproxy = balancer(&s.world)?;
    for (https, host, local_port, body, nginx_port, received, sent) in [
        (
            true,
            "pp.example",
            45001,
            "behind-balancer-tls",
            443,
            "v2",
            "v2",
        ),
        (
            true,
            "pp1.example",
            45002,
            "behind-balancer-tls",
            443,
            "v2",
            "v1",
        ),
        (
            false,
            "pp.example",
            45003,
            "behind-balancer-http",
            80,
            "v1",
            "v2",
        ),
        (
            false,
            "pp1.example",
            45004,
            "behind-balancer-http",
            80,
            "v1",
            "v1",
        ),
    ] {
        let what = format!("{host} https={https} (balancer {received}, to nginx {sent})");
        let got = curl_via_balancer(&s, https, host, local_port).context(what.clone())?;
        ensure!(got == body, "{what}: body {got:?}");
        let client = SocketAddr::new(CLIENT_V4, local_port);
        backends::wait_log(
            &backends::nginx_log(&s.world, nginx_port),
            &format!("{client} \"GET / HTTP/1.1\" 200"),
        )
        .context(what.clone())?;
        let line = s.spliced.log_line_for(client, Duration::from_secs(5))?;
        let via = field(&line, "via").unwrap_or("-");
        ensure!(
            via.starts_with(&format!("{BALANCER}:")),
            "{what}: via= is not the balancer: {line}"
        );
        ensure!(field(&line, "outcome") == Some("ok"), "{what}: {line}");
        ensure!(field(&line, "proxy") == Some(sent), "{what}: {line}");
    }
    // A header site: X-Forwarded-For names the balancer's client too.
    let got = curl_via_balancer(&s, false, "xff.example", 45005)?;
    ensure!(got == "behind-balancer-xff", "xff.example: body {got:?}");
    let log = backends::wait_log(
        &backends::nginx_log(&s.world, 8080),
        "\"GET / HTTP/1.1\" 200",
    )?;
    ensure!(
        log.lines().any(|l| l.starts_with(&format!("{CLIENT_V4}:"))),
        "X-Forwarded-For did not carry the balancer's client:\n{log}"
    );

    // The balancer's own address never reached nginx as a client.
    for port in [443, 80, 8080] {
        let log = std::fs::read_to_string(backends::nginx_log(&s.world, port))?;
        ensure!(
            !log.contains(&format!("{BALANCER}:")),
            "nginx saw the balancer as a client:\n{log}"
        );
    }
    haproxy.check_running()?;
    Ok(())
}

/// Sends `bytes` from `source` to spliced's `port`, then reads what comes back until it closes.
fn send_raw(s: &Setup, source: IpAddr, port: u16, bytes: &[u8]) -> Result<(SocketAddr, Vec<u8>)> {
    let to = SocketAddr::new(PROXY_V4, port);
    let mut stream = raw::connect_from(&s.world, Ns::Client, source, to, Duration::from_secs(5))?;
    let me = stream.local_addr()?;
    stream.write_all(bytes)?;
    let (got, end) = raw::read_to_end(&mut stream, 64 * 1024);
    ensure!(end.closed(), "{me}: spliced did not close: {end:?}");
    Ok((me, got))
}

fn count(s: &Setup, outcome: &str) -> Result<u64> {
    s.spliced
        .metrics()?
        .count("spliced_connections_total", &[("outcome", outcome)])
}

/// A v2 header as a balancer would send it, for 198.51.100.99:4711 to 192.0.2.1:443, with a
/// CRC32C; `corrupt` flips a bit of the client address after the checksum was computed.
fn v2_header(corrupt: bool) -> Vec<u8> {
    let mut header = raw::PROXY_V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 19]);
    header.extend_from_slice(&[198, 51, 100, 99, 192, 0, 2, 1, 0x12, 0x67, 0x01, 0xbb]);
    header.extend_from_slice(&[0x03, 0, 4, 0, 0, 0, 0]);
    let crc = crc32c(&header);
    let at = header.len() - 4;
    header[at..].copy_from_slice(&crc.to_be_bytes());
    if corrupt {
        header[19] ^= 0x01;
    }
    header
}

/// CRC-32C (Castagnoli), bit by bit, independent of spliced's crate.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Headers only count from the balancer: a forged one from anyone else is refused as garbage
/// (a TLS alert, or 400 on HTTP) and counted; the balancer without a header, or with a
/// header whose CRC32C fails, is closed without an answer and counted. None reaches nginx.
#[test]
fn forged_missing_and_corrupt_headers_are_refused() -> Result<()> {
    let s = setup()?;
    let hello = raw::simple_hello("pp.example");
    let forged_v1 = b"PROXY TCP4 198.51.100.99 192.0.2.1 4711 443\r\n";

    // Forged, v1 and v2, from the untrusted client address: read as the hello, refused.
    let (me, got) = send_raw(&s, CLIENT_V4, 443, &[&forged_v1[..], &hello].concat())?;
    ensure!(
        got.first() == Some(&0x15),
        "forged v1 on TLS: no alert, got {got:02x?}"
    );
    let line = s.spliced.log_line_for(me, Duration::from_secs(5))?;
    ensure!(
        field(&line, "outcome") == Some("proxy_header_untrusted"),
        "{line}"
    );
    let (me, _) = send_raw(
        &s,
        CLIENT_V4,
        443,
        &[v2_header(false), hello.clone()].concat(),
    )?;
    let line = s.spliced.log_line_for(me, Duration::from_secs(5))?;
    ensure!(
        field(&line, "outcome") == Some("proxy_header_untrusted"),
        "{line}"
    );
    let get = b"GET / HTTP/1.1\r\nHost: pp.example\r\n\r\n";
    let (me, got) = send_raw(&s, CLIENT_V4, 80, &[&forged_v1[..], &get[..]].concat())?;
    ensure!(
        got.starts_with(b"HTTP/1.1 400"),
        "forged v1 on HTTP: {:?}",
        String::from_utf8_lossy(&got)
    );
    let line = s.spliced.log_line_for(me, Duration::from_secs(5))?;
    ensure!(
        field(&line, "outcome") == Some("proxy_header_untrusted"),
        "{line}"
    );
    ensure!(field(&line, "client") == Some(me.to_string().as_str()));
    ensure!(count(&s, "proxy_header_untrusted")? == 3);

    // The balancer's address without a header: closed, nothing sent back.
    let (me, got) = send_raw(&s, BALANCER, 443, &hello)?;
    ensure!(got.is_empty(), "missing header answered with {got:02x?}");
    let line = s.spliced.log_line_for(me, Duration::from_secs(5))?;
    ensure!(
        field(&line, "outcome") == Some("proxy_header_missing"),
        "{line}"
    );
    ensure!(count(&s, "proxy_header_missing")? == 1);

    // The balancer's address with a v2 header whose CRC32C fails: closed, nothing sent back.
    let (me, got) = send_raw(
        &s,
        BALANCER,
        443,
        &[v2_header(true), hello.clone()].concat(),
    )?;
    ensure!(got.is_empty(), "bad CRC answered with {got:02x?}");
    let line = s.spliced.log_line_for(me, Duration::from_secs(5))?;
    ensure!(
        field(&line, "outcome") == Some("proxy_header_invalid") && line.contains("CRC32C"),
        "{line}"
    );
    ensure!(count(&s, "proxy_header_invalid")? == 1);

    // The balancer's address stopping inside the header: closed at client_hello_timeout (2 s
    // here), which header and hello share.
    let started = std::time::Instant::now();
    let (me, got) = send_raw(&s, BALANCER, 443, b"PROXY TCP4 198.51.100.99 ")?;
    let waited = started.elapsed();
    ensure!(got.is_empty(), "a cut header answered with {got:02x?}");
    ensure!(
        (Duration::from_millis(1500)..Duration::from_millis(4500)).contains(&waited),
        "closed after {waited:?}, not at the 2 s hello timeout"
    );
    let line = s.spliced.log_line_for(me, Duration::from_secs(5))?;
    ensure!(
        field(&line, "outcome") == Some("client_hello_timeout")
            && line.contains("no complete PROXY header"),
        "{line}"
    );

    // None of the refused ones was connected to a backend.
    let log = s.spliced.stdout_text();
    for line in log.lines().filter(|l| l.contains("outcome=proxy_header_")) {
        ensure!(
            field(line, "backend") == Some("-"),
            "reached a backend: {line}"
        );
    }

    // The same header with a right CRC from the balancer passes: nginx answers the hello
    // with its ServerHello, and the header's client is the one logged.
    let to = SocketAddr::new(PROXY_V4, 443);
    let mut stream = raw::connect_from(&s.world, Ns::Client, BALANCER, to, Duration::from_secs(5))?;
    stream.write_all(&[v2_header(false), hello.clone()].concat())?;
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stream, &mut first)?;
    ensure!(
        first[0] == 0x16,
        "nginx did not answer with a handshake: {first:02x?}"
    );
    drop(stream);

    // A v2 LOCAL header (what a balancer's health check sends) keeps the connection's own
    // address: the balancer is the client, and there is no via=.
    let mut local = raw::PROXY_V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let mut stream = raw::connect_from(&s.world, Ns::Client, BALANCER, to, Duration::from_secs(5))?;
    let me = stream.local_addr()?;
    stream.write_all(&[local, hello.clone()].concat())?;
    std::io::Read::read_exact(&mut stream, &mut first)?;
    ensure!(
        first[0] == 0x16,
        "LOCAL: nginx did not answer: {first:02x?}"
    );
    drop(stream);
    let line = s.spliced.log_line_for(me, Duration::from_secs(5))?;
    ensure!(
        field(&line, "via").is_none() && field(&line, "site") == Some("pp.example"),
        "LOCAL: {line}"
    );

    let line = s
        .spliced
        .log_line_for("198.51.100.99:4711".parse()?, Duration::from_secs(5))?;
    ensure!(
        field(&line, "site") == Some("pp.example")
            && field(&line, "backend") == Some("[2001:db8:1::10]:443")
            && field(&line, "via").is_some_and(|v| v.starts_with(&format!("{BALANCER}:"))),
        "{line}"
    );
    Ok(())
}

/// A balancer on IPv6 (a prefix in `accept_proxy`) in front of the IPv6 listener announces an
/// IPv4 client: the backend's PROXY header carries that client, as `TCP4`. The connection is
/// then spliced in the kernel from its first byte: the kernel's byte accounting must count the
/// received header among what was read from the client, or it would reset the connection.
#[test]
fn ipv6_balancer_announces_an_ipv4_client() -> Result<()> {
    let world = World::new()?;
    world.client_v6()?;
    let backend = raw::TestBackend::start(&world, 443, raw::Behavior::Echo)?;
    let config = "[defaults]\nforwarding = \"sockmap\"\nsockmap_handoff = 0\n\n\
                  [[listen]]\naddress = \"[::]:443\"\nprotocol = \"tls\"\n\
                  accept_proxy = [\"2001:db8:c::/64\"]\n\n\
                  [[site]]\nhostnames = [\"pp1.example\"]\nbackend = \"2001:db8:1::10\"\n\
                  proxy_protocol = \"v1\"\n";
    let spliced = Launch::new(config).start(&world, &[443])?;
    let to = SocketAddr::new(PROXY_FRONT_V6, 443);
    let mut stream = raw::connect_from(&world, Ns::Client, CLIENT_V6, to, Duration::from_secs(5))?;
    let me = stream.local_addr()?;
    let hello = raw::simple_hello("pp1.example");
    let header = b"PROXY TCP4 198.51.100.99 203.0.113.1 4711 443\r\n";
    stream.write_all(&[&header[..], &hello].concat())?;
    // The echo backend returns exactly the hello: the received header was not passed on.
    let echoed = raw::read_exactly(&mut stream, hello.len())?;
    ensure!(echoed == hello, "the echo is not the hello");
    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let writer = {
        let mut stream = stream.try_clone()?;
        let payload = payload.clone();
        std::thread::spawn(move || stream.write_all(&payload))
    };
    let echoed = raw::read_exactly(&mut stream, payload.len())?;
    ensure!(echoed == payload, "the payload came back different");
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    stream.shutdown(std::net::Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut stream, 1024);
    ensure!(
        rest.is_empty() && end == raw::End::Eof,
        "after the echo: {end:?}"
    );
    let conns = backend.wait_finished(1, Duration::from_secs(10))?;
    let first = String::from_utf8_lossy(&conns[0].first).into_owned();
    ensure!(
        first.starts_with("PROXY TCP4 198.51.100.99 203.0.113.1 4711 443\r\n\x16"),
        "backend got {:?}",
        &first[..first.len().min(60)]
    );
    let line = spliced.log_line_for("198.51.100.99:4711".parse()?, Duration::from_secs(5))?;
    ensure!(
        field(&line, "via") == Some(me.to_string().as_str())
            && field(&line, "engine") == Some("sockmap")
            && field(&line, "outcome") == Some("ok"),
        "{line}"
    );
    Ok(())
}
