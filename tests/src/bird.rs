//! BGP and ECMP for a [`World::scale_out`]: BIRD (Debian's `bird2`) on the router and on each
//! proxy host, the health checker that ships in `contrib/bird/spliced-announce`, and what the
//! router's kernel does with the service route. `docs/scale-out.md` shows the configurations
//! these functions write.
//!
//! Every BIRD is this test's own: `bird -c <conf> -s <socket> -f` in one namespace, files in
//! the world's directory, stopped by PID (SIGTERM) when dropped. None is ever started
//! system-wide.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{Ns, PROXY_V4, ROUTER_CLIENT_V4, Service, Uplink, World, wait_for};

/// The router's autonomous system (private range).
pub const ROUTER_AS: u32 = 64500;
/// The proxy hosts' autonomous system: they share one, as hosts of one site do.
pub const HOST_AS: u32 = 64510;
/// The name of the host's BIRD static protocol that holds the service route; the health
/// checker enables and disables it.
pub const SERVICE_PROTOCOL: &str = "service";
/// The name of the host's BGP session to the router.
pub const UPLINK_PROTOCOL: &str = "uplink";

/// BGP timers and retries shared by both ends: keepalive every second and hold 3 s (BGP's
/// minimum), so that a host that vanishes altogether (power, cable) is noticed within 3 s;
/// short connect delays so that sessions come up within about a second of BIRD starting.
const BGP_TIMERS: &str = "  hold time 3;\n  keepalive time 1;\n  connect delay time 1;\n  \
                          connect retry time 1;\n  error wait time 1, 5;\n";

/// The router's BIRD configuration: one eBGP session per host in `hosts`, every route learnt
/// exported to the kernel, with `merge paths on` so that equal routes from several hosts
/// become one ECMP route.
pub fn router_config(hosts: &[(&str, Uplink)]) -> String {
    let mut conf = format!(
        "# The router in front of the spliced hosts (docs/scale-out.md).\n\
         router id {ROUTER_CLIENT_V4};\n\
         log stderr all;\n\n\
         protocol device {{\n}}\n\n\
         # Routes learnt from the hosts go to the kernel; equal ones merge into one\n\
         # multipath route (ECMP). The kernel spreads flows over it by the hash that\n\
         # net.ipv4.fib_multipath_hash_policy = 3 and fib_multipath_hash_fields = 0x37\n\
         # make of each packet's 5-tuple.\n\
         protocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n\n\
         template bgp spliced_host {{\n  local as {ROUTER_AS};\n{BGP_TIMERS}\
         \x20 ipv4 {{\n    # Only the service address, as a /32, from any host.\n    \
         import where net = {PROXY_V4}/32;\n    export none;\n  }};\n}}\n"
    );
    for (name, up) in hosts {
        conf.push_str(&format!(
            "\nprotocol bgp {name} from spliced_host {{\n  local {} as {ROUTER_AS};\n  \
             neighbor {} as {HOST_AS};\n}}\n",
            up.router, up.host
        ));
    }
    conf
}

/// A proxy host's BIRD configuration: the service route in a static protocol that starts
/// disabled (nothing is announced until the health checker has seen spliced healthy) and one
/// eBGP session to the router that exports that route only. Nothing is imported and BIRD has
/// no kernel protocol here: the host's own routing is static (a default route to the router).
pub fn host_config(up: Uplink) -> String {
    format!(
        "# A spliced host (docs/scale-out.md).\n\
         router id {host};\n\
         log stderr all;\n\n\
         protocol device {{\n}}\n\n\
         # The shared service address, announced only while spliced is healthy:\n\
         # contrib/bird/spliced-announce runs `birdc enable|disable {SERVICE_PROTOCOL}`.\n\
         # The address itself is on lo; this route exists only to be announced.\n\
         protocol static {SERVICE_PROTOCOL} {{\n  disabled;\n  ipv4;\n  \
         route {PROXY_V4}/32 blackhole;\n}}\n\n\
         protocol bgp {UPLINK_PROTOCOL} {{\n  local {host} as {HOST_AS};\n  \
         neighbor {router} as {ROUTER_AS};\n{BGP_TIMERS}\
         \x20 ipv4 {{\n    import none;\n    export where proto = \"{SERVICE_PROTOCOL}\";\n  }};\n}}\n",
        host = up.host,
        router = up.router,
    )
}

/// One BIRD daemon in one namespace of a world.
pub struct Bird {
    service: Service,
    socket: PathBuf,
}

impl Bird {
    /// Writes `config` to `<name>.conf` in the world's directory and starts
    /// `bird -c <name>.conf -s <name>.ctl -f` in `ns` (its log is `<name>.err`); waits until
    /// its control socket answers.
    pub fn start(world: &World, ns: Ns, name: &str, config: &str) -> Result<Bird> {
        let conf = world.dir().join(format!("{name}.conf"));
        std::fs::write(&conf, config)?;
        let socket = world.dir().join(format!("{name}.ctl"));
        let mut cmd = world.command(ns, "bird");
        cmd.arg("-c").arg(&conf).arg("-s").arg(&socket).arg("-f");
        let mut bird = Bird {
            service: Service::start(name, cmd, world.dir())?,
            socket,
        };
        let socket = bird.socket.clone();
        wait_for(
            &format!("BIRD {name}'s control socket"),
            Duration::from_secs(10),
            || {
                bird.service.check_running()?;
                Ok(birdc(&socket, &["show", "status"]).is_ok())
            },
        )?;
        Ok(bird)
    }

    /// The control socket (for `birdc -s`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs `birdc -s <socket> <args>` and returns its output.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        birdc(&self.socket, args)
    }

    /// Waits until BGP protocol `protocol` is `Established`.
    pub fn wait_established(&mut self, protocol: &str, timeout: Duration) -> Result<()> {
        let socket = self.socket.clone();
        let mut last = String::new();
        wait_for(
            &format!("BGP session {protocol} to be established"),
            timeout,
            || {
                self.service.check_running()?;
                last = birdc(&socket, &["show", "protocols", protocol])?;
                Ok(last.contains("Established"))
            },
        )
        .with_context(|| format!("last answer:\n{last}"))
    }

    /// The daemon's process.
    pub fn service(&mut self) -> &mut Service {
        &mut self.service
    }
}

fn birdc(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .context("running birdc")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.contains("Unable to connect") {
        bail!(
            "birdc {args:?} failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// The health checker as it ships: `contrib/bird/spliced-announce`.
pub fn announce_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/bird/spliced-announce")
}

/// Starts the shipped health checker in `ns`: it polls spliced's `/metrics` on
/// `127.0.0.1:metrics_port` every `interval` and enables or disables [`SERVICE_PROTOCOL`] on
/// `bird` (rise and fall of 2, the script's defaults). Its log is `<name>.err`.
pub fn announce(
    world: &World,
    ns: Ns,
    name: &str,
    metrics_port: u16,
    bird: &Bird,
    interval: Duration,
) -> Result<Service> {
    let mut cmd = world.command(ns, "sh");
    cmd.arg(announce_script())
        .args(["-i", &format!("{}", interval.as_secs_f64())])
        .arg(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .arg(bird.socket())
        .arg(SERVICE_PROTOCOL);
    Service::start(name, cmd, world.dir())
}

/// The next hops of the router's kernel route to the service address: empty when no host
/// announces it, one per announcing host otherwise (read with `ip -j route`).
pub fn service_next_hops(world: &World) -> Result<Vec<Ipv4Addr>> {
    let out = world
        .command(Ns::Router, "ip")
        .args(["-j", "route", "show", &format!("{PROXY_V4}/32")])
        .output()?;
    if !out.status.success() {
        bail!("ip route show: {}", String::from_utf8_lossy(&out.stderr));
    }
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -j route: {}", String::from_utf8_lossy(&out.stdout)))?;
    let mut hops = Vec::new();
    for route in routes.as_array().into_iter().flatten() {
        let gateways = match route.get("nexthops").and_then(|n| n.as_array()) {
            Some(nexthops) => nexthops.iter().filter_map(|n| n.get("gateway")).collect(),
            None => route.get("gateway").into_iter().collect::<Vec<_>>(),
        };
        for gw in gateways {
            let gw = gw.as_str().context("a gateway that is not a string")?;
            hops.push(gw.parse().with_context(|| format!("gateway {gw:?}"))?);
        }
    }
    hops.sort();
    Ok(hops)
}

/// The next hop the router's kernel picks for a TCP segment from `client` to `server`
/// arriving from the client link: `ip route get ... iif eth0 ipproto tcp sport dport`, which
/// computes the same multipath hash as forwarding does. `None` when there is no route.
pub fn next_hop_for(
    world: &World,
    client: SocketAddr,
    server: SocketAddr,
) -> Result<Option<IpAddr>> {
    let out = world
        .command(Ns::Router, "ip")
        .args(["-j", "route", "get", &server.ip().to_string()])
        .args(["from", &client.ip().to_string(), "iif", "eth0"])
        .args(["ipproto", "tcp"])
        .args(["sport", &client.port().to_string()])
        .args(["dport", &server.port().to_string()])
        .output()?;
    if !out.status.success() {
        return Ok(None);
    }
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -j route get: {}", String::from_utf8_lossy(&out.stdout)))?;
    let gateway = routes
        .as_array()
        .and_then(|r| r.first())
        .and_then(|r| r.get("gateway"))
        .and_then(|g| g.as_str());
    gateway
        .map(|g| g.parse().with_context(|| format!("gateway {g:?}")))
        .transpose()
}
