//! Backends from DNS (issue 17): names no site claims are looked up (AAAA) with a real
//! authoritative server, Knot, in the backend namespace, and the connection goes to the first
//! address inside `allowed_backends`; everything else is refused like an unknown name, with its
//! own outcome. A relay in front of Knot holds the queries for `herd` for a while (so lookups
//! overlap) and never answers those for `silent` (a server that does not answer). DNS
//! backends embed the client's IPv4 address in their source (`[dns] source = "embed"`), with
//! a `source_prefix` inside `allowed_backends` that the fence must still refuse.
use std::{
    io::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use spliced_tests::{
    BACKEND_V6, CLIENT_V4, Ns, PROXY_V4, World,
    dns::{Knot, Relay},
    raw::{self, ALERT_UNRECOGNIZED_NAME, Behavior, End, TestBackend},
    spliced::{Launch, Spliced, field},
};

/// DNS backends see the client's IPv4 address in this prefix (`[dns] source = "embed"`).
const SOURCE_PREFIX: &str = "2001:db8:1:4646::/96";

/// How long the relay holds `herd`'s query: long enough for concurrent connections to overlap.
const DELAY: Duration = Duration::from_millis(300);

const ZONE: &str = "$ORIGIN dns.test.\n$TTL 60\n\
@        SOA ns hostmaster 1 3600 600 86400 5\n\
@        NS  ns\n\
ns       AAAA 2001:db8:1::10\n\
ok       AAAA 2001:db8:1::10\n\
alias    CNAME ok\n\
cached   AAAA 2001:db8:1::10\n\
herd     AAAA 2001:db8:1::10\n\
mixed    AAAA ::1\n\
mixed    AAAA 2001:db8:2::10\n\
mixed    AAAA 2001:db8:1::10\n\
outside  AAAA 2001:db8:2::10\n\
forbidden AAAA ::1\n\
forbidden AAAA fe80::1\n\
forbidden AAAA ::ffff:127.0.0.1\n\
forbidden AAAA 2001:db8:1::1\n\
forbidden AAAA ff02::1\n\
forbidden AAAA 2001:db8:1:4646::1\n\
loop-a   CNAME loop-b\n\
loop-b   CNAME loop-a\n\
silent   AAAA 2001:db8:1::10\n";

struct Setup {
    world: World,
    knot: Knot,
    relay: Relay,
    tls: TestBackend,
    http: TestBackend,
    spliced: Spliced,
}

fn setup() -> Result<Setup> {
    let world = World::new()?;
    // Inside allowed_backends on purpose: the fence must still refuse it.
    world.nat46(SOURCE_PREFIX)?;
    let knot = Knot::start(&world, SocketAddr::new(BACKEND_V6, 53), "dns.test.", ZONE)?;
    let relay = Relay::start(
        &world,
        SocketAddr::new(BACKEND_V6, 5300),
        SocketAddr::new(BACKEND_V6, 53),
        ("herd", DELAY),
        "silent",
    )?;
    let tls = TestBackend::start(&world, 443, Behavior::Echo)?;
    let http = TestBackend::start(&world, 80, Behavior::Echo)?;
    let config = format!(
        "[defaults]\nbackend = \"dns\"\nconnect_timeout = \"3s\"\n\
         source_prefix = \"{SOURCE_PREFIX}\"\n\n\
         [[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\n\
         [[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\n\n\
         [[site]]\nhostnames = [\"site.example\"]\nbackend = \"2001:db8:1::10\"\n\n\
         [dns]\nallowed_backends = [\"2001:db8:1::/48\"]\nservers = [\"{}\"]\n\
         timeout = \"1s\"\nttl_floor = \"10s\"\nnegative_ttl = \"10s\"\n\
         source = \"embed\"\n",
        relay.addr
    );
    let spliced = Launch::new(config).metrics().start(&world, &[443, 80])?;
    Ok(Setup {
        world,
        knot,
        relay,
        tls,
        http,
        spliced,
    })
}

/// Sends `hello` and 16 KiB to the proxy's `port`, expects both echoed byte for byte by the
/// test backend, half-closes and expects a clean end. Returns the client's address.
fn exchange(world: &World, port: u16, hello: &[u8]) -> Result<SocketAddr> {
    let to = SocketAddr::new(PROXY_V4, port);
    let mut stream = raw::connect_from(world, Ns::Client, CLIENT_V4, to, Duration::from_secs(10))?;
    let me = stream.local_addr()?;
    raw::echo_round_trip(&mut stream, hello, 16 * 1024)?;
    Ok(me)
}

/// Sends a ClientHello for `name` and expects spliced's `unrecognized_name` alert and a clean
/// close. Returns the client's address and how long the refusal took.
fn refused(world: &World, name: &str) -> Result<(SocketAddr, Duration)> {
    let to = SocketAddr::new(PROXY_V4, 443);
    let mut stream = raw::connect_from(world, Ns::Client, CLIENT_V4, to, Duration::from_secs(10))?;
    let me = stream.local_addr()?;
    let started = Instant::now();
    stream.write_all(&raw::simple_hello(name))?;
    let (got, end) = raw::read_to_end(&mut stream, 1024);
    let took = started.elapsed();
    ensure!(
        got == ALERT_UNRECOGNIZED_NAME && end == End::Eof,
        "{name}: expected the unrecognized_name alert and a close, got {got:02x?} and {end:?}"
    );
    Ok((me, took))
}

/// The access-log line of `client`, checked for `outcome` and, if given, a `detail` part.
fn logged(s: &Setup, client: SocketAddr, outcome: &str, detail: &[&str]) -> Result<String> {
    let line = s.spliced.log_line_for(client, Duration::from_secs(10))?;
    ensure!(
        field(&line, "outcome") == Some(outcome),
        "want outcome={outcome}: {line}"
    );
    for part in detail {
        ensure!(line.contains(part), "want {part:?} in the detail: {line}");
    }
    Ok(line)
}

#[test]
fn dns_backends_answers_and_refusals() -> Result<()> {
    spliced_tests::require_root()?;
    let s = setup()?;
    let backend = SocketAddr::new(BACKEND_V6, 443);

    // An allowed answer: the backend gets the hello and the payload, byte for byte.
    let hello = raw::simple_hello("ok.dns.test");
    let client = exchange(&s.world, 443, &hello)?;
    let line = logged(&s, client, "ok", &[])?;
    ensure!(
        field(&line, "site") == Some("dns")
            && field(&line, "backend") == Some(backend.to_string().as_str()),
        "{line}"
    );
    let conns = s.tls.wait_finished(1, Duration::from_secs(10))?;
    let conn = conns
        .iter()
        .find(|c| c.first.starts_with(&hello))
        .with_context(|| format!("the test backend never got the ok.dns.test hello: {conns:#?}"))?;
    // [dns] source = "embed": the client's 192.0.2.2 in the prefix's last 32 bits.
    let embedded: std::net::IpAddr = "2001:db8:1:4646::c000:202".parse()?;
    ensure!(
        conn.peer.map(|p| p.ip()) == Some(embedded),
        "the DNS backend saw {:?}, want {embedded}",
        conn.peer
    );

    // The Host of a plain HTTP request, through a CNAME.
    let get = b"GET / HTTP/1.1\r\nHost: alias.dns.test\r\n\r\n";
    let client = exchange(&s.world, 80, get)?;
    let line = logged(&s, client, "ok", &[])?;
    ensure!(
        field(&line, "backend") == Some(SocketAddr::new(BACKEND_V6, 80).to_string().as_str()),
        "{line}"
    );
    s.http.wait_finished(1, Duration::from_secs(10))?;

    // Loopback and an address outside the fence come first; the allowed one is used.
    let client = exchange(&s.world, 443, &raw::simple_hello("mixed.dns.test"))?;
    logged(&s, client, "ok", &[])?;

    // Outside the prefixes: refused like an unknown name, with its own outcome.
    let (client, _) = refused(&s.world, "outside.dns.test")?;
    logged(
        &s,
        client,
        "dns_not_allowed",
        &["2001:db8:2::10 (outside allowed_backends)"],
    )?;

    // Every address is judged, inside the prefixes or not.
    let (client, _) = refused(&s.world, "forbidden.dns.test")?;
    logged(
        &s,
        client,
        "dns_not_allowed",
        &[
            "::1 (loopback)",
            "fe80::1 (link-local)",
            "::ffff:127.0.0.1 (IPv4-mapped)",
            "2001:db8:1::1 (the proxy's own address)",
            "ff02::1 (multicast)",
            "2001:db8:1:4646::1 (the proxy's source_prefix)",
        ],
    )?;

    // A CNAME loop: refused, after a bounded number of queries.
    let before = s.knot.aaaa_queries()?;
    let (client, took) = refused(&s.world, "loop-a.dns.test")?;
    logged(&s, client, "dns_not_found", &[])?;
    let queries = s.knot.aaaa_queries()? - before;
    ensure!(
        (1..=10).contains(&queries),
        "the CNAME loop took {queries} queries; the chain must be bounded"
    );
    ensure!(
        took < Duration::from_secs(3),
        "the CNAME loop took {took:?}"
    );

    // NXDOMAIN: refused as an unknown name.
    let (client, _) = refused(&s.world, "nx.dns.test")?;
    logged(&s, client, "dns_not_found", &["NXDOMAIN"])?;

    // A server that does not answer: refused within the 1s lookup timeout.
    let (client, took) = refused(&s.world, "silent.dns.test")?;
    logged(&s, client, "dns_timeout", &[])?;
    ensure!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "the timeout refusal took {took:?}, want about 1s"
    );
    ensure!(s.relay.swallowed() >= 1, "the relay swallowed nothing");

    // A configured site is still routed as before, without a lookup.
    let before = s.knot.aaaa_queries()?;
    let client = exchange(&s.world, 443, &raw::simple_hello("site.example"))?;
    let line = logged(&s, client, "ok", &[])?;
    ensure!(field(&line, "site") == Some("site.example"), "{line}");
    ensure!(
        s.knot.aaaa_queries()? == before,
        "a configured site was looked up"
    );
    Ok(())
}

#[test]
fn dns_backends_cache_and_coalescing() -> Result<()> {
    spliced_tests::require_root()?;
    let s = setup()?;

    // The second connection for a name takes the cached answer: no query.
    let before = s.knot.aaaa_queries()?;
    exchange(&s.world, 443, &raw::simple_hello("cached.dns.test"))?;
    let first = s.knot.aaaa_queries()? - before;
    ensure!(first == 1, "the first lookup sent {first} queries");
    let client = exchange(&s.world, 443, &raw::simple_hello("cached.dns.test"))?;
    logged(&s, client, "ok", &[])?;
    let total = s.knot.aaaa_queries()? - before;
    ensure!(
        total == 1,
        "the second connection queried again ({total} queries)"
    );

    // A failure is cached too.
    let before = s.knot.aaaa_queries()?;
    refused(&s.world, "gone.dns.test")?;
    refused(&s.world, "gone.dns.test")?;
    let total = s.knot.aaaa_queries()? - before;
    ensure!(
        total == 1,
        "two refusals of an NXDOMAIN sent {total} queries"
    );

    // Eight connections for one uncached name at once, while its query is held for 300ms:
    // one query, and all eight served.
    let before = s.knot.aaaa_queries()?;
    let hello = raw::simple_hello("herd.dns.test");
    let results: Vec<Result<SocketAddr>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| exchange(&s.world, 443, &hello)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    for result in results {
        let client = result?;
        logged(&s, client, "ok", &[])?;
    }
    let total = s.knot.aaaa_queries()? - before;
    ensure!(
        total == 1,
        "8 concurrent connections for one name sent {total} queries"
    );
    // The server's count alone would not catch spliced starting a lookup per connection:
    // hickory merges identical queries in flight on its own. spliced's count of lookups does.
    let metrics = s.spliced.metrics()?;
    let sent = metrics.count("spliced_dns_lookups_total", &[])?;
    // cached, gone, herd.
    ensure!(sent == 3, "spliced_dns_lookups_total is {sent}, want 3");
    Ok(())
}
