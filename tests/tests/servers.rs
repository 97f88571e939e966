//! Real servers from Debian's packages behind spliced: nginx (with and without PROXY), Apache
//! with mod_remoteip, HAProxy with accept-proxy. Each must answer through the proxy, and its
//! own access log must show the IPv4 client address and port that the client really used.
use std::net::IpAddr;

use anyhow::{Context as _, Result, ensure};
use spliced_tests::{
    CLIENT_V4, CLIENT_V4_B, PROXY_V6, World,
    backends::{self, Cert, NginxServer},
    spliced::Launch,
};

const CONFIG_SITES: &str = r#"
[[site]]
hostnames = ["nginx-v2.example", "*.nginx-v2.example"]
backend = "2001:db8:1::10"
proxy_protocol = "v2"

[[site]]
hostnames = ["nginx-v1.example"]
backend = "2001:db8:1::10"
proxy_protocol = "v1"

[[site]]
hostnames = ["plain.example"]
backend = { tls = "[2001:db8:1::10]:8443", http = "[2001:db8:1::10]:8080" }

[[site]]
hostnames = ["apache.example"]
backend = { tls = "[2001:db8:1::10]:9443" }
proxy_protocol = "v2"

[[site]]
hostnames = ["apache-v1.example"]
backend = { tls = "[2001:db8:1::10]:9443" }
proxy_protocol = "v1"

[[site]]
hostnames = ["haproxy.example"]
backend = { http = "[2001:db8:1::10]:7080" }
proxy_protocol = "v2"
proxy_protocol_tlvs = ["authority", "crc32c", "unique_id"]
"#;

fn config(engine: &str) -> String {
    format!(
        "[defaults]\nforwarding = \"{engine}\"\nsockmap_handoff = 0\n\n\
         [[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\n\
         [[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\n{CONFIG_SITES}"
    )
}

struct Case {
    url: &'static str,
    body: &'static str,
    /// Where the server logs, and whether it sees the client (PROXY) or the proxy.
    log: Log,
}

enum Log {
    Nginx(u16),
    NginxNoProxy(u16),
    Apache,
    Haproxy,
}

fn certs(world: &World) -> Result<Cert> {
    backends::cert(
        world,
        &[
            "nginx-v2.example",
            "*.nginx-v2.example",
            "nginx-v1.example",
            "plain.example",
            "apache.example",
            "apache-v1.example",
        ],
    )
}

fn run_world(engine: &str, port_base: u16) -> Result<()> {
    let world = World::new()?;
    let cert = certs(&world)?;
    let _nginx = backends::nginx(
        &world,
        &[
            NginxServer {
                port: 443,
                tls: Some(&cert),
                proxy_protocol: true,
                real_ip_from: None,
                body: "nginx-pp-tls",
            },
            NginxServer {
                port: 80,
                tls: None,
                proxy_protocol: true,
                real_ip_from: None,
                body: "nginx-pp-http",
            },
            NginxServer {
                port: 8443,
                tls: Some(&cert),
                proxy_protocol: false,
                real_ip_from: None,
                body: "nginx-plain-tls",
            },
            NginxServer {
                port: 8080,
                tls: None,
                proxy_protocol: false,
                real_ip_from: None,
                body: "nginx-plain-http",
            },
        ],
    )?;
    let mut apache = backends::apache(&world, 9443, Some(&cert), "apache-tls")?;
    let haproxy = backends::haproxy(&world, 7080, "haproxy-http")?;
    let mut spliced = Launch::new(config(engine)).start(&world, &[443, 80])?;

    let cases = [
        Case {
            url: "https://nginx-v2.example/",
            body: "nginx-pp-tls",
            log: Log::Nginx(443),
        },
        Case {
            url: "https://www.nginx-v2.example/",
            body: "nginx-pp-tls",
            log: Log::Nginx(443),
        },
        Case {
            url: "http://nginx-v2.example/",
            body: "nginx-pp-http",
            log: Log::Nginx(80),
        },
        Case {
            url: "https://nginx-v1.example/",
            body: "nginx-pp-tls",
            log: Log::Nginx(443),
        },
        Case {
            url: "http://nginx-v1.example/",
            body: "nginx-pp-http",
            log: Log::Nginx(80),
        },
        Case {
            url: "https://plain.example/",
            body: "nginx-plain-tls",
            log: Log::NginxNoProxy(8443),
        },
        Case {
            url: "http://plain.example/",
            body: "nginx-plain-http",
            log: Log::NginxNoProxy(8080),
        },
        Case {
            url: "https://apache.example/",
            body: "apache-tls",
            log: Log::Apache,
        },
        Case {
            url: "https://apache-v1.example/",
            body: "apache-tls",
            log: Log::Apache,
        },
        Case {
            url: "http://haproxy.example/",
            body: "haproxy-http",
            log: Log::Haproxy,
        },
    ];
    let mut port = port_base;
    for case in &cases {
        for source in [CLIENT_V4, CLIENT_V4_B] {
            port += 1;
            let out = backends::curl_from(&world, source, Some(port), case.url, Some(&cert))?;
            let body = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success() && body.trim() == case.body,
                "{} from {source}:{port}: curl {}, body {body:?}, stderr {}\nspliced: {}",
                case.url,
                out.status,
                String::from_utf8_lossy(&out.stderr),
                spliced.stdout_text()
            );
            check_log(&world, case, source, port, &haproxy).with_context(|| case.url)?;
        }
    }
    spliced.check_running()?;
    apache.check_running()?;
    let status = spliced.terminate(std::time::Duration::from_secs(5))?;
    ensure!(
        status.success(),
        "spliced exited with {status} after SIGTERM"
    );
    let log = spliced.stdout_text();
    // curl may close a kept-alive TLS connection with bytes it never read (a late session
    // ticket), which the kernel turns into a reset: the client's doing, logged as such, after
    // it got its whole response. Anything else (a refusal, a backend failure) is a defect.
    let served = log
        .lines()
        .filter(|l| l.contains("outcome=ok") || l.contains("outcome=client_reset"))
        .count();
    ensure!(
        served == cases.len() * 2,
        "expected {} served connections in spliced's log:\n{log}",
        cases.len() * 2
    );
    ensure!(
        log.contains(&format!("engine={engine}")),
        "engine {engine} not in log:\n{log}"
    );
    Ok(())
}

fn check_log(
    world: &World,
    case: &Case,
    source: IpAddr,
    port: u16,
    haproxy: &spliced_tests::Service,
) -> Result<()> {
    let client = format!("{source}:{port} ");
    match case.log {
        Log::Nginx(p) => {
            backends::wait_log(
                &backends::nginx_log(world, p),
                &format!("{client}\"GET / HTTP/1.1\" 200"),
            )?;
        }
        Log::NginxNoProxy(p) => {
            // Without PROXY the backend sees the proxy's IPv6 address, never the client.
            let log = backends::wait_log(&backends::nginx_log(world, p), &format!("{PROXY_V6}:"))?;
            ensure!(
                !log.contains(&source.to_string()),
                "plain backend saw the client?\n{log}"
            );
        }
        Log::Apache => {
            backends::wait_log(
                &backends::apache_log(world),
                &format!("{client}\"GET / HTTP/1.1\" 200"),
            )?;
        }
        Log::Haproxy => {
            backends::wait_log(&haproxy.stdout, &format!("{source}:{port} GET / 200"))?;
        }
    }
    Ok(())
}

#[test]
fn real_servers_see_the_client_through_splice() -> Result<()> {
    run_world("splice", 41000)
}

#[test]
fn real_servers_see_the_client_through_sockmap() -> Result<()> {
    run_world("sockmap", 43000)
}

#[test]
fn real_servers_see_the_client_through_copy() -> Result<()> {
    run_world("copy", 42000)
}
