//! The client's IPv4 address in the IPv6 source (issue 17, `source = "embed"`): nginx and
//! Apache with neither PROXY nor a real-IP module log `<source_prefix>::<client IPv4>` as the
//! peer, through every engine (copy, splice, sockmap, auto, and the `http` header engine),
//! while a site without `source`, and an IPv6 client (no IPv4 address to embed), still show
//! the proxy's own address.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use spliced_tests::{
    CLIENT_V4, CLIENT_V6, Ns, PROXY_FRONT_V6, PROXY_V6, World,
    backends::{self, NginxServer, RemoteIp},
    spliced::{Launch, field},
};

const PREFIX: &str = "2001:db8:4646::/96";
/// [`PREFIX`] with [`CLIENT_V4`] (192.0.2.2) in its last 32 bits, as both servers print it.
const EMBEDDED: &str = "2001:db8:4646::c000:202";

const ENGINES: [&str; 4] = ["copy", "splice", "sockmap", "auto"];

fn config() -> String {
    let mut config = format!(
        "[defaults]\nsource_prefix = \"{PREFIX}\"\nsockmap_handoff = 0\n\n\
         [[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\n\n\
         [[listen]]\naddress = \"[::]:80\"\nprotocol = \"http\"\n\n"
    );
    for (server, port) in [("nginx", 8080), ("apache", 8081)] {
        for engine in ENGINES {
            config.push_str(&format!(
                "[[site]]\nhostnames = [\"{engine}.{server}.example\"]\n\
                 backend = \"[2001:db8:1::10]:{port}\"\nforwarding = \"{engine}\"\n\
                 source = \"embed\"\n\n"
            ));
        }
        config.push_str(&format!(
            "[[site]]\nhostnames = [\"header.{server}.example\"]\n\
             backend = {{ http = \"[2001:db8:1::10]:{port}\" }}\n\
             forwarded_header = \"x-forwarded-for\"\nsource = \"embed\"\n\n\
             [[site]]\nhostnames = [\"own.{server}.example\"]\n\
             backend = \"[2001:db8:1::10]:{port}\"\n\n"
        ));
    }
    config
}

#[test]
fn nat46_source_in_nginx_and_apache_logs() -> Result<()> {
    spliced_tests::require_root()?;
    let world = World::new()?;
    world.nat46(PREFIX)?;
    world.client_v6()?;
    let _nginx = backends::nginx(
        &world,
        &[NginxServer {
            port: 8080,
            tls: None,
            proxy_protocol: false,
            real_ip_from: None,
            body: "nginx",
        }],
    )?;
    let _apache = backends::apache_with(&world, 8081, None, "apache", RemoteIp::Off)?;
    let spliced = Launch::new(config()).start(&world, &[80])?;

    let mut local_port = 41000;
    for (server, log) in [
        ("nginx", backends::nginx_log(&world, 8080)),
        ("apache", backends::apache_log(&world)),
    ] {
        let own = PROXY_V6.to_string();
        let cases = ENGINES
            .iter()
            .map(|e| (*e, EMBEDDED))
            .chain([("header", EMBEDDED), ("own", own.as_str())]);
        for (engine, want) in cases {
            local_port += 1;
            let host = format!("{engine}.{server}.example");
            let url = format!("http://{host}/?{engine}");
            let out = backends::curl_from(&world, CLIENT_V4, Some(local_port), &url, None)?;
            ensure!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == server,
                "{url}: curl {:?}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // The backend's own log line names the embedded address (or ours).
            let request = format!("\"GET /?{engine} HTTP/1.1\" 200");
            let text = backends::wait_log(&log, &request)?;
            let line = text
                .lines()
                .find(|l| l.contains(&request))
                .context("the request's line")?;
            ensure!(
                line.starts_with(&format!("{want}:")),
                "{server} via {engine}: logged {line:?}, want the peer {want}"
            );
            // spliced served it with the engine named.
            let client = SocketAddr::new(CLIENT_V4, local_port);
            let entry = spliced.log_line_for(client, Duration::from_secs(10))?;
            let used = field(&entry, "engine").unwrap_or("-");
            let expected: &[&str] = match engine {
                "header" => &["http"],
                "own" | "auto" | "sockmap" => &["sockmap"],
                other => &[other],
            };
            ensure!(
                field(&entry, "outcome") == Some("ok") && expected.contains(&used),
                "{host}: want engine {expected:?}: {entry}"
            );
        }
    }

    // An IPv6 client has no IPv4 address to embed: the backend sees the proxy's own address.
    let out = world
        .command(Ns::Client, "curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--interface",
            &CLIENT_V6.to_string(),
        ])
        .args([
            "--resolve",
            &format!("copy.nginx.example:80:[{PROXY_FRONT_V6}]"),
        ])
        .arg("http://copy.nginx.example/?v6")
        .output()?;
    ensure!(
        out.status.success(),
        "IPv6 client: curl {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let request = "\"GET /?v6 HTTP/1.1\" 200";
    let text = backends::wait_log(&backends::nginx_log(&world, 8080), request)?;
    let line = text
        .lines()
        .find(|l| l.contains(request))
        .context("the IPv6 request's line")?;
    ensure!(
        line.starts_with(&format!("{PROXY_V6}:")),
        "IPv6 client: nginx logged {line:?}, want the proxy's {PROXY_V6}"
    );
    Ok(())
}
