//! IPv6 clients (issue 17): a client namespace with IPv6 ([`World::client_v6`]) reaches sites
//! through spliced's IPv6 listeners with every engine, and the backend's PROXY header names
//! the client's IPv6 address as `TCP6` (v1) or `AF_INET6` (v2), while an IPv4 client on the
//! IPv4 listener still gets `TCP4`.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, bail, ensure};
use spliced_tests::{
    CLIENT_V4, CLIENT_V6, Ns, PROXY_FRONT_V6, PROXY_V4, World,
    raw::{self, Behavior, ConnRecord, TestBackend},
    spliced::{Launch, field},
};

/// With `xdp`, the edge filter guards the client link (eth0) and denies another IPv6 prefix:
/// IPv6 clients outside it must pass.
fn config(engine: &str, xdp: bool) -> String {
    let xdp = if xdp {
        "\n[xdp]\ninterfaces = [\"eth0\"]\ndeny = [\"2001:db8:bad::/48\", \"198.51.100.0/24\"]\n"
    } else {
        ""
    };
    format!(
        "[defaults]\nforwarding = \"{engine}\"\nsockmap_handoff = 0\n\n\
         [[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\n\
         [[listen]]\naddress = \"[::]:443\"\nprotocol = \"tls\"\n\n\
         [[listen]]\naddress = \"[::]:80\"\nprotocol = \"http\"\n\n\
         [[site]]\nhostnames = [\"v1.example\"]\nbackend = \"2001:db8:1::10\"\n\
         proxy_protocol = \"v1\"\n\n\
         [[site]]\nhostnames = [\"v2.example\"]\nbackend = \"2001:db8:1::10\"\n\
         proxy_protocol = \"v2\"\n{xdp}"
    )
}

/// Sends `hello` then 64 KiB from `source` to `to`, checks the echo of both, half-closes and
/// expects a clean end. Returns the client's address.
fn exchange(world: &World, source: IpAddr, to: SocketAddr, hello: &[u8]) -> Result<SocketAddr> {
    let mut stream = raw::connect_from(world, Ns::Client, source, to, Duration::from_secs(10))?;
    let me = stream.local_addr()?;
    raw::echo_round_trip(&mut stream, hello, 64 * 1024)?;
    Ok(me)
}

/// The backend connection that carried `client`, by the PROXY header's source port.
fn record_for(conns: &[ConnRecord], client: SocketAddr) -> Result<&ConnRecord> {
    let v1 = format!(" {} ", client.port());
    let v2 = client.port().to_be_bytes();
    conns
        .iter()
        .find(|c| match c.proxy.as_ref().map(|h| h.version) {
            Some(1) => String::from_utf8_lossy(&c.first)
                .lines()
                .next()
                .is_some_and(|l| l.contains(&v1)),
            Some(2) => c.first.get(48..50) == Some(&v2[..]) || c.first.get(24..26) == Some(&v2[..]),
            _ => false,
        })
        .ok_or_else(|| anyhow::anyhow!("no backend connection for {client}: {conns:#?}"))
}

fn run(engine: &str, xdp: bool) -> Result<()> {
    let world = World::new()?;
    world.client_v6()?;
    let tls = TestBackend::start(&world, 443, Behavior::Echo)?;
    let http = TestBackend::start(&world, 80, Behavior::Echo)?;
    let spliced = Launch::new(config(engine, xdp))
        .metrics()
        .start(&world, &[443, 80])?;
    let front6 = |port| SocketAddr::new(PROXY_FRONT_V6, port);

    let v1 = exchange(
        &world,
        CLIENT_V6,
        front6(443),
        &raw::simple_hello("v1.example"),
    )?;
    let v2 = exchange(
        &world,
        CLIENT_V6,
        front6(443),
        &raw::simple_hello("v2.example"),
    )?;
    let get = b"GET / HTTP/1.1\r\nHost: v1.example\r\n\r\n";
    let plain = exchange(&world, CLIENT_V6, front6(80), get)?;
    let v4 = exchange(
        &world,
        CLIENT_V4,
        SocketAddr::new(PROXY_V4, 443),
        &raw::simple_hello("v1.example"),
    )?;

    let conns = tls.wait_finished(3, Duration::from_secs(10))?;
    let line = |c: &ConnRecord| {
        String::from_utf8_lossy(&c.first)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    };
    let got = line(record_for(&conns, v1)?);
    let want = format!("PROXY TCP6 {CLIENT_V6} {PROXY_FRONT_V6} {} 443", v1.port());
    ensure!(
        got == want,
        "v1 over IPv6: backend got {got:?}, want {want:?}"
    );
    let got = line(record_for(&conns, v4)?);
    let want = format!("PROXY TCP4 {CLIENT_V4} {PROXY_V4} {} 443", v4.port());
    ensure!(
        got == want,
        "v1 over IPv4: backend got {got:?}, want {want:?}"
    );

    let record = record_for(&conns, v2)?;
    let (IpAddr::V6(client), IpAddr::V6(front)) = (CLIENT_V6, PROXY_FRONT_V6) else {
        bail!("IPv6 constants expected");
    };
    let f = &record.first;
    ensure!(
        f.get(12..14) == Some(&[0x21, 0x21][..])
            && f.get(16..32) == Some(&client.octets()[..])
            && f.get(32..48) == Some(&front.octets()[..])
            && f.get(50..52) == Some(&443u16.to_be_bytes()[..]),
        "v2 over IPv6: backend got {record:?}"
    );

    let conns = http.wait_finished(1, Duration::from_secs(10))?;
    let got = line(record_for(&conns, plain)?);
    let want = format!(
        "PROXY TCP6 {CLIENT_V6} {PROXY_FRONT_V6} {} 80",
        plain.port()
    );
    ensure!(
        got == want,
        "http over IPv6: backend got {got:?}, want {want:?}"
    );

    for client in [v1, v2, plain, v4] {
        let line = spliced.log_line_for(client, Duration::from_secs(5))?;
        ensure!(
            field(&line, "outcome") == Some("ok") && field(&line, "engine") == Some(engine),
            "{client}: {line}"
        );
    }
    if xdp {
        // The filter saw the IPv6 clients' SYNs on the guarded ports and passed them.
        let metrics = spliced.metrics()?;
        let passed = metrics.count("spliced_xdp_packets_total", &[("outcome", "passed")])?;
        let denied = metrics.count("spliced_xdp_packets_total", &[("outcome", "dropped_deny")])?;
        ensure!(
            passed >= 4 && denied == 0,
            "xdp: passed {passed}, dropped_deny {denied}"
        );
    }
    Ok(())
}

#[test]
fn ipv6_clients_through_copy() -> Result<()> {
    run("copy", false)
}

#[test]
fn ipv6_clients_through_splice() -> Result<()> {
    run("splice", false)
}

#[test]
fn ipv6_clients_through_sockmap() -> Result<()> {
    run("sockmap", false)
}

/// The XDP edge filter on the client link passes IPv6 clients outside its deny list.
#[test]
fn ipv6_clients_pass_the_xdp_filter() -> Result<()> {
    run("splice", true)
}
