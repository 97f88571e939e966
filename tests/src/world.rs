//! Network namespaces for one test.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::{
    BACKEND_V6, CLIENT_LINK_V4, CLIENT_V4, CLIENT_V4_B, CLIENT_V6, PROXY_B_V6, PROXY_FRONT_V6,
    PROXY_V4, PROXY_V6, ROUTER_CLIENT_V4,
};

/// Fails with a plain explanation unless we are root, which namespaces and eBPF need.
pub fn require_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the end-to-end tests need root: they create network namespaces and start servers \
             in them. Run them with `./x test` as root."
        );
    }
    Ok(())
}

/// One of the three namespaces of a [`World`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ns {
    /// IPv4-only clients.
    Client,
    /// Where spliced runs.
    Proxy,
    /// IPv6-only servers.
    Backend,
    /// The router in front of the proxy hosts; only in [`World::scale_out`].
    Router,
    /// The second proxy host; only in [`World::scale_out`] (there [`Ns::Proxy`] is the first).
    ProxyB,
}

impl Ns {
    fn index(self) -> usize {
        match self {
            Ns::Client => 0,
            Ns::Proxy => 1,
            Ns::Backend => 2,
            Ns::Router => 3,
            Ns::ProxyB => 4,
        }
    }
}

/// A proxy host's link to the router in a [`World::scale_out`]: a /30 of 198.51.100.0/24, the
/// host's `eth0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uplink {
    /// The router's address on the link (the host's default gateway and BGP neighbour).
    pub router: Ipv4Addr,
    /// The host's address on the link.
    pub host: Ipv4Addr,
    /// The link's interface in the router namespace.
    pub router_dev: &'static str,
}

impl Uplink {
    /// The uplink of proxy host `host` ([`Ns::Proxy`] or [`Ns::ProxyB`]).
    pub fn of(host: Ns) -> Option<Uplink> {
        match host {
            Ns::Proxy => Some(Uplink {
                router: Ipv4Addr::new(198, 51, 100, 1),
                host: Ipv4Addr::new(198, 51, 100, 2),
                router_dev: "eth1",
            }),
            Ns::ProxyB => Some(Uplink {
                router: Ipv4Addr::new(198, 51, 100, 5),
                host: Ipv4Addr::new(198, 51, 100, 6),
                router_dev: "eth2",
            }),
            _ => None,
        }
    }
}

/// Three namespaces (five for [`World::scale_out`]) and a scratch directory, all removed on
/// drop.
pub struct World {
    /// Every namespace's name, by [`Ns::index`]; only the first `made` exist.
    names: [String; 5],
    made: usize,
    dir: PathBuf,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl World {
    /// Creates the namespaces, links and addresses, and a scratch directory.
    pub fn new() -> Result<World> {
        let world = World::empty(3)?;
        world.build().context("building the test namespaces")?;
        Ok(world)
    }

    /// The scale-out world: two proxy hosts behind a router, for BGP and ECMP (see
    /// [`crate::bird`] and `docs/scale-out.md`).
    ///
    /// ```text
    ///  client                 router                       proxy (host A)            backend
    ///  203.0.113.2 ---------- 203.0.113.1                   lo 192.0.2.1/32
    ///  192.0.2.2, .3 (/32)    198.51.100.1/30 ------------ 198.51.100.2  2001:db8:1::1 --+ br0
    ///                         198.51.100.5/30 ------------ 198.51.100.6  2001:db8:1::2 --+ 2001:db8:1::10
    ///                                                      proxy-b (host B)
    ///                                                      lo 192.0.2.1/32
    /// ```
    ///
    /// Both hosts carry the service address [`PROXY_V4`] on their loopback and route
    /// everything else to the router; the router knows the client addresses and nothing
    /// about [`PROXY_V4`] until BGP tells it. The backend's [`BACKEND_V6`] sits on a bridge
    /// that both hosts reach. The client keeps [`CLIENT_V4`] and [`CLIENT_V4_B`] (its default
    /// route's source is [`CLIENT_V4`]), so [`crate::raw::connect`], `curl` and the other
    /// helpers that take a world work unchanged. The router forwards with
    /// `fib_multipath_hash_policy=3` and `fib_multipath_hash_fields=0x37`: an ECMP route picks
    /// its next hop from the 5-tuple in each packet's headers.
    pub fn scale_out() -> Result<World> {
        let world = World::empty(5)?;
        world
            .build_scale_out()
            .context("building the scale-out namespaces")?;
        Ok(world)
    }

    /// The three namespaces of [`World::new`] with a router ([`Ns::Router`]) between the
    /// proxy and the backend, whose link to the backend has MTU `mtu` while every other link
    /// has 1500: a segment the proxy sends the backend at more than `mtu` bytes is answered
    /// by the router with an ICMPv6 Packet Too Big to the proxy (issue 15's PMTU test).
    ///
    /// ```text
    ///  client           proxy                       router                      backend
    ///  192.0.2.2 ------ 192.0.2.1  2001:db8:1::1 -- ::fe  [fwd]  ::fd -------- 2001:db8:1::10
    ///            eth0   eth0       eth1        eth0             eth1 (mtu) eth0 (mtu)
    /// ```
    ///
    /// The addresses are those of [`World::new`] (both ends keep their /64 on the link); the
    /// proxy and the backend reach each other by a /128 route through the router, whose own
    /// addresses are /128s of the same prefix. The backend's route announces an MSS of 1440,
    /// as a backend on a 1500-byte link behind a narrower hop would: one that announced less
    /// than the client may send would not be handed off at all (`mss_backend_small`).
    pub fn with_backend_router(mtu: u32) -> Result<World> {
        let world = World::empty(4)?;
        world
            .build_backend_router(mtu)
            .context("building the namespaces with a router before the backend")?;
        Ok(world)
    }

    fn build_backend_router(&self, mtu: u32) -> Result<()> {
        let [c, p, b, r, ..] = &self.names;
        let (router_proxy, router_backend) = ("2001:db8:1::fe", "2001:db8:1::fd");
        let mtu = mtu.to_string();
        let (client, client_b, proxy4) = (
            format!("{CLIENT_V4}/24"),
            format!("{CLIENT_V4_B}/24"),
            format!("{PROXY_V4}/24"),
        );
        let (proxy6, backend6) = (format!("{PROXY_V6}/64"), format!("{BACKEND_V6}/64"));
        let (proxy_host, backend_host) = (format!("{PROXY_V6}/128"), format!("{BACKEND_V6}/128"));
        self.veths(&[
            ("eth0", c, "eth0", p),
            ("eth1", p, "eth0", r),
            ("eth1", r, "eth0", b),
        ])?;
        self.sysctl(c, "net.ipv6.conf.all.disable_ipv6=1")?;
        self.sysctl(r, "net.ipv6.conf.all.forwarding=1")?;
        for (ns, args) in [
            (c, vec!["addr", "add", &client, "dev", "eth0"]),
            (c, vec!["addr", "add", &client_b, "dev", "eth0"]),
            (p, vec!["addr", "add", &proxy4, "dev", "eth0"]),
            (p, vec!["addr", "add", &proxy6, "dev", "eth1", "nodad"]),
            (
                r,
                vec!["addr", "add", "2001:db8:1::fe/128", "dev", "eth0", "nodad"],
            ),
            (
                r,
                vec!["addr", "add", "2001:db8:1::fd/128", "dev", "eth1", "nodad"],
            ),
            (b, vec!["addr", "add", &backend6, "dev", "eth0", "nodad"]),
            (r, vec!["link", "set", "eth1", "mtu", &mtu]),
            (b, vec!["link", "set", "eth0", "mtu", &mtu]),
        ] {
            self.ip(ns, &args)?;
        }
        for (ns, dev) in [
            (c, "eth0"),
            (p, "eth0"),
            (p, "eth1"),
            (r, "eth0"),
            (r, "eth1"),
            (b, "eth0"),
        ] {
            self.ip(ns, &["link", "set", dev, "up"])?;
        }
        for (ns, args) in [
            (r, ["-6", "route", "add", &proxy_host, "dev", "eth0"]),
            (r, ["-6", "route", "add", &backend_host, "dev", "eth1"]),
        ] {
            self.ip(ns, &args)?;
        }
        self.ip(
            p,
            &[
                "-6",
                "route",
                "add",
                &backend_host,
                "via",
                router_proxy,
                "dev",
                "eth1",
            ],
        )?;
        self.ip(
            b,
            &[
                "-6",
                "route",
                "add",
                &proxy_host,
                "via",
                router_backend,
                "dev",
                "eth0",
                "advmss",
                "1440",
            ],
        )?;
        self.wait_reachable(p, BACKEND_V6)
            .context("the proxy does not reach the backend through the router")
    }

    /// Veth pairs: `(device, namespace, peer device, peer namespace)`.
    fn veths(&self, pairs: &[(&str, &str, &str, &str)]) -> Result<()> {
        for (dev1, ns1, dev2, ns2) in pairs {
            run(Command::new("ip").args([
                "link", "add", dev1, "netns", ns1, "type", "veth", "peer", "name", dev2, "netns",
                ns2,
            ]))?;
        }
        Ok(())
    }

    /// Pings `to` from `ns` until it answers (20 tries of at most a second). Once it does,
    /// every neighbour on the way is resolved and no address is tentative: a test's first
    /// connection then does not lose its SYN to the path being built (seen once: a connect
    /// that timed out).
    fn wait_reachable(&self, ns: &str, to: IpAddr) -> Result<()> {
        for _ in 0..20 {
            let ok = Command::new("ip")
                .args([
                    "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", "1",
                ])
                .arg(to.to_string())
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Ok(());
            }
        }
        bail!("{to} does not answer a ping from {ns}")
    }

    /// The mirror of [`World::with_backend_router`]: a router ([`Ns::Router`]) between the
    /// client and the proxy, whose link to the client has MTU `mtu` while every other link
    /// has 1500. The client's route to the proxy announces an MSS of 1460, as a client on a
    /// 1500-byte link behind a narrower hop would; a segment the proxy sends the client at
    /// more than `mtu` bytes is answered by the router with an ICMPv4 "fragmentation needed"
    /// to the proxy.
    ///
    /// ```text
    ///  client                  router                        proxy                  backend
    ///  192.0.2.2, .3 -------- .254 [fwd] .253 ------------- 192.0.2.1  2001:db8:1::1 -- ::10
    ///             eth0 (mtu)  eth0 (mtu)  eth1              eth0       eth1
    /// ```
    ///
    /// The client and the proxy keep their /24 addresses and reach each other by /32 routes
    /// through the router, whose own addresses are /32s of the same network.
    pub fn with_client_router(mtu: u32) -> Result<World> {
        let world = World::empty(4)?;
        world
            .build_client_router(mtu)
            .context("building the namespaces with a router before the client")?;
        Ok(world)
    }

    fn build_client_router(&self, mtu: u32) -> Result<()> {
        let [c, p, b, r, ..] = &self.names;
        let (router_client, router_proxy) = ("192.0.2.254", "192.0.2.253");
        let mtu = mtu.to_string();
        let (client, client_b) = (format!("{CLIENT_V4}/24"), format!("{CLIENT_V4_B}/24"));
        let (proxy4, proxy6, backend6) = (
            format!("{PROXY_V4}/24"),
            format!("{PROXY_V6}/64"),
            format!("{BACKEND_V6}/64"),
        );
        let (proxy_host, client_host, client_b_host) = (
            format!("{PROXY_V4}/32"),
            format!("{CLIENT_V4}/32"),
            format!("{CLIENT_V4_B}/32"),
        );
        self.veths(&[
            ("eth0", c, "eth0", r),
            ("eth1", r, "eth0", p),
            ("eth1", p, "eth0", b),
        ])?;
        self.sysctl(c, "net.ipv6.conf.all.disable_ipv6=1")?;
        self.sysctl(r, "net.ipv6.conf.all.disable_ipv6=1")?;
        self.sysctl(r, "net.ipv4.ip_forward=1")?;
        let router_client_addr = format!("{router_client}/32");
        let router_proxy_addr = format!("{router_proxy}/32");
        for (ns, args) in [
            (c, vec!["addr", "add", &client, "dev", "eth0"]),
            (c, vec!["addr", "add", &client_b, "dev", "eth0"]),
            (r, vec!["addr", "add", &router_client_addr, "dev", "eth0"]),
            (r, vec!["addr", "add", &router_proxy_addr, "dev", "eth1"]),
            (p, vec!["addr", "add", &proxy4, "dev", "eth0"]),
            (p, vec!["addr", "add", &proxy6, "dev", "eth1", "nodad"]),
            (b, vec!["addr", "add", &backend6, "dev", "eth0", "nodad"]),
            (c, vec!["link", "set", "eth0", "mtu", &mtu]),
            (r, vec!["link", "set", "eth0", "mtu", &mtu]),
        ] {
            self.ip(ns, &args)?;
        }
        for (ns, dev) in [
            (c, "eth0"),
            (r, "eth0"),
            (r, "eth1"),
            (p, "eth0"),
            (p, "eth1"),
            (b, "eth0"),
        ] {
            self.ip(ns, &["link", "set", dev, "up"])?;
        }
        for (ns, args) in [
            (r, vec!["route", "add", &proxy_host, "dev", "eth1"]),
            (r, vec!["route", "add", &client_host, "dev", "eth0"]),
            (r, vec!["route", "add", &client_b_host, "dev", "eth0"]),
            (
                p,
                vec![
                    "route",
                    "add",
                    &client_host,
                    "via",
                    router_proxy,
                    "dev",
                    "eth0",
                ],
            ),
            (
                p,
                vec![
                    "route",
                    "add",
                    &client_b_host,
                    "via",
                    router_proxy,
                    "dev",
                    "eth0",
                ],
            ),
            (
                c,
                vec![
                    "route",
                    "add",
                    &proxy_host,
                    "via",
                    router_client,
                    "dev",
                    "eth0",
                    "advmss",
                    "1460",
                ],
            ),
        ] {
            self.ip(ns, &args)?;
        }
        self.wait_reachable(c, PROXY_V4)
            .context("the client does not reach the proxy through the router")
    }

    fn empty(made: usize) -> Result<World> {
        require_root()?;
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let names = [
            format!("spl-{id}-c"),
            format!("spl-{id}-p"),
            format!("spl-{id}-b"),
            format!("spl-{id}-r"),
            format!("spl-{id}-q"),
        ];
        let dir = std::env::temp_dir().join(format!("spliced-test-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Worker processes of nginx and Apache run unprivileged and read files from here.
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            &dir,
            nix::sys::stat::Mode::from_bits_truncate(0o755),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )?;
        let mut world = World {
            names,
            made: 0,
            dir,
        };
        for i in 0..made {
            let ns = &world.names[i];
            run(Command::new("ip").args(["netns", "add", ns]))?;
            world.made = i + 1;
            world.ip(ns, &["link", "set", "lo", "up"])?;
        }
        Ok(world)
    }

    fn build(&self) -> Result<()> {
        let [c, p, b, ..] = &self.names;
        self.veths(&[("eth0", c, "eth0", p), ("eth1", p, "eth0", b)])?;
        // The client has no IPv6 at all, the backend no IPv4 address: the proxy is the bridge.
        self.sysctl(c, "net.ipv6.conf.all.disable_ipv6=1")?;
        self.ip(
            c,
            &["addr", "add", &format!("{CLIENT_V4}/24"), "dev", "eth0"],
        )?;
        self.ip(
            c,
            &["addr", "add", &format!("{CLIENT_V4_B}/24"), "dev", "eth0"],
        )?;
        self.ip(
            p,
            &["addr", "add", &format!("{PROXY_V4}/24"), "dev", "eth0"],
        )?;
        self.ip(
            p,
            &[
                "addr",
                "add",
                &format!("{PROXY_V6}/64"),
                "dev",
                "eth1",
                "nodad",
            ],
        )?;
        self.ip(
            b,
            &[
                "addr",
                "add",
                &format!("{BACKEND_V6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        for (ns, dev) in [(c, "eth0"), (p, "eth0"), (p, "eth1"), (b, "eth0")] {
            self.ip(ns, &["link", "set", dev, "up"])?;
        }
        Ok(())
    }

    fn build_scale_out(&self) -> Result<()> {
        let [c, a, b, r, q] = &self.names;
        // The backend side after the client's: the bridge's ports are named after the host
        // they lead to.
        self.veths(&[
            ("eth0", c, "eth0", r),
            ("eth1", a, "to-a", b),
            ("eth1", q, "to-b", b),
        ])?;
        self.sysctl(c, "net.ipv6.conf.all.disable_ipv6=1")?;
        for addr in [
            format!("{CLIENT_LINK_V4}/24"),
            format!("{CLIENT_V4}/32"),
            format!("{CLIENT_V4_B}/32"),
        ] {
            self.ip(c, &["addr", "add", &addr, "dev", "eth0"])?;
        }
        self.ip(c, &["link", "set", "eth0", "up"])?;
        self.ip(
            c,
            &[
                "route",
                "add",
                "default",
                "via",
                &ROUTER_CLIENT_V4.to_string(),
                "src",
                &CLIENT_V4.to_string(),
            ],
        )?;

        self.ip(
            r,
            &[
                "addr",
                "add",
                &format!("{ROUTER_CLIENT_V4}/24"),
                "dev",
                "eth0",
            ],
        )?;
        self.ip(r, &["link", "set", "eth0", "up"])?;
        for client in [CLIENT_V4, CLIENT_V4_B] {
            self.ip(
                r,
                &[
                    "route",
                    "add",
                    &format!("{client}/32"),
                    "via",
                    &CLIENT_LINK_V4.to_string(),
                ],
            )?;
        }
        self.sysctl(r, "net.ipv4.ip_forward=1")?;
        // L4 hashing: the next hop of an ECMP route follows the 5-tuple, so every packet of a
        // connection goes to the same host (the default, 0, hashes the addresses only).
        // Policy 3 with the fields source and destination address, protocol, source and
        // destination port (0x37) hashes the headers of every packet. Policy 1 would first
        // reuse a hash the packet already carries: here, through veth, the client socket's
        // random `sk_txhash`, which no `ip route get` can predict and which TCP changes after
        // a retransmission timeout, moving the connection to the other host.
        self.sysctl(r, "net.ipv4.fib_multipath_hash_policy=3")?;
        self.sysctl(r, "net.ipv4.fib_multipath_hash_fields=0x0037")?;

        for (host, ns, v6) in [(Ns::Proxy, a, PROXY_V6), (Ns::ProxyB, q, PROXY_B_V6)] {
            let up = Uplink::of(host).context("a proxy host has an uplink")?;
            self.veths(&[(up.router_dev, r, "eth0", ns)])?;
            self.ip(
                r,
                &[
                    "addr",
                    "add",
                    &format!("{}/30", up.router),
                    "dev",
                    up.router_dev,
                ],
            )?;
            self.ip(r, &["link", "set", up.router_dev, "up"])?;
            self.ip(
                ns,
                &["addr", "add", &format!("{}/30", up.host), "dev", "eth0"],
            )?;
            self.ip(ns, &["addr", "add", &format!("{PROXY_V4}/32"), "dev", "lo"])?;
            self.ip(
                ns,
                &["addr", "add", &format!("{v6}/64"), "dev", "eth1", "nodad"],
            )?;
            for dev in ["eth0", "eth1"] {
                self.ip(ns, &["link", "set", dev, "up"])?;
            }
            self.ip(
                ns,
                &["route", "add", "default", "via", &up.router.to_string()],
            )?;
        }

        // No STP: the bridge forwards as soon as its ports are up.
        self.ip(
            b,
            &["link", "add", "br0", "type", "bridge", "stp_state", "0"],
        )?;
        for port in ["to-a", "to-b"] {
            self.ip(b, &["link", "set", port, "master", "br0"])?;
            self.ip(b, &["link", "set", port, "up"])?;
        }
        self.ip(
            b,
            &[
                "addr",
                "add",
                &format!("{BACKEND_V6}/64"),
                "dev",
                "br0",
                "nodad",
            ],
        )?;
        self.ip(b, &["link", "set", "br0", "up"])
    }

    /// Gives the client namespace IPv6, for IPv6 clients: [`CLIENT_V6`] on its link to the
    /// proxy and [`PROXY_FRONT_V6`] on the proxy's side of it, one /64 of 2001:db8::/32, so
    /// the link's own route is the only one needed (the client still has no route to the
    /// backend's network). Worlds without it keep an IPv4-only client.
    pub fn client_v6(&self) -> Result<()> {
        let [c, p, ..] = &self.names;
        self.sysctl(c, "net.ipv6.conf.all.disable_ipv6=0")?;
        self.sysctl(c, "net.ipv6.conf.eth0.disable_ipv6=0")?;
        for (ns, addr) in [(c, CLIENT_V6), (p, PROXY_FRONT_V6)] {
            self.ip(
                ns,
                &["addr", "add", &format!("{addr}/64"), "dev", "eth0", "nodad"],
            )?;
        }
        Ok(())
    }

    /// Routes a NAT46 source prefix (`source = "embed"`, e.g. `2001:db8:4646::/96`): the
    /// backend sends it to the proxy (`ip -6 route add <prefix> via 2001:db8:1::1`), and the
    /// proxy takes every address in it as its own (`ip -6 route add local <prefix> dev lo`),
    /// so replies to the embedded sources reach spliced's sockets.
    pub fn nat46(&self, prefix: &str) -> Result<()> {
        let [_, p, b, ..] = &self.names;
        self.ip(p, &["-6", "route", "add", "local", prefix, "dev", "lo"])?;
        self.ip(
            b,
            &[
                "-6",
                "route",
                "add",
                prefix,
                "via",
                &PROXY_V6.to_string(),
                "dev",
                "eth0",
            ],
        )
    }

    /// Lets the client reach the backend without the proxy, for benchmarks' "direct"
    /// baseline: the backend gets an IPv4 address too and the proxy namespace routes between
    /// its two links, so direct traffic crosses the same two veth hops as proxied traffic.
    pub fn route_direct(&self) -> Result<()> {
        let [c, p, b, ..] = &self.names;
        self.ip(
            p,
            &[
                "addr",
                "add",
                &format!("{}/24", crate::PROXY_ROUTER_V4),
                "dev",
                "eth1",
            ],
        )?;
        self.ip(
            b,
            &[
                "addr",
                "add",
                &format!("{}/24", crate::BACKEND_V4),
                "dev",
                "eth0",
            ],
        )?;
        self.ip(
            c,
            &[
                "route",
                "add",
                "198.51.100.0/24",
                "via",
                &PROXY_V4.to_string(),
            ],
        )?;
        self.ip(
            b,
            &[
                "route",
                "add",
                "192.0.2.0/24",
                "via",
                &crate::PROXY_ROUTER_V4.to_string(),
            ],
        )?;
        self.sysctl(p, "net.ipv4.ip_forward=1")
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", ns]).args(args))
    }

    fn sysctl(&self, ns: &str, setting: &str) -> Result<()> {
        run(Command::new("ip").args(["netns", "exec", ns, "sysctl", "-q", "-w", setting]))
    }

    /// The namespace's name as `ip netns` knows it. [`Ns::Router`] and [`Ns::ProxyB`] exist
    /// only in a [`World::scale_out`]; elsewhere commands in them fail (no such namespace).
    pub fn name(&self, ns: Ns) -> &str {
        &self.names[ns.index()]
    }

    /// The scratch directory for configs, certificates and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A command that runs `program` inside `ns`.
    pub fn command(&self, ns: Ns, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name(ns)]).arg(program);
        cmd
    }

    /// Loads an nftables script into `ns` (`nft -f`, from a file named `name` in the scratch
    /// directory); the rules go away with the namespace.
    pub fn nft(&self, ns: Ns, name: &str, script: &str) -> Result<()> {
        let path = self.dir().join(name);
        std::fs::write(&path, script)?;
        let out = self
            .command(ns, "nft")
            .arg("-f")
            .arg(&path)
            .output()
            .context("starting nft (is the nftables package installed?)")?;
        if !out.status.success() {
            bail!(
                "nft in {ns:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered `ns`: sockets it creates live in that namespace
    /// and stay there after the thread ends.
    pub fn within<T: Send>(&self, ns: Ns, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(Some(self.name(ns)), f)
    }
}

/// Runs `f` on a thread that has entered the network namespace `netns` (an `ip netns` name),
/// or in this thread's own namespace for `None`.
pub(crate) fn in_netns<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T> {
    let Some(name) = netns else {
        return Ok(f());
    };
    let path = Path::new("/var/run/netns").join(name);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread inside namespace {name} panicked"))?
    })
}

impl Drop for World {
    fn drop(&mut self) {
        for ns in &self.names[..self.made] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if std::env::var_os("SPLICED_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
