//! Network namespaces for one test.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::{BACKEND_V6, CLIENT_V4, CLIENT_V4_B, PROXY_V4, PROXY_V6};

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
}

/// Three namespaces and a scratch directory, all removed on drop.
pub struct World {
    names: [String; 3],
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
        let world = World { names, dir };
        world.build().context("building the test namespaces")?;
        Ok(world)
    }

    fn build(&self) -> Result<()> {
        let [c, p, b] = &self.names;
        for ns in &self.names {
            run(Command::new("ip").args(["netns", "add", ns]))?;
            self.ip(ns, &["link", "set", "lo", "up"])?;
        }
        run(Command::new("ip").args([
            "link", "add", "eth0", "netns", c, "type", "veth", "peer", "name", "eth0", "netns", p,
        ]))?;
        run(Command::new("ip").args([
            "link", "add", "eth1", "netns", p, "type", "veth", "peer", "name", "eth0", "netns", b,
        ]))?;
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

    /// Lets the client reach the backend without the proxy, for benchmarks' "direct"
    /// baseline: the backend gets an IPv4 address too and the proxy namespace routes between
    /// its two links, so direct traffic crosses the same two veth hops as proxied traffic.
    pub fn route_direct(&self) -> Result<()> {
        let [c, p, b] = &self.names;
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

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self, ns: Ns) -> &str {
        match ns {
            Ns::Client => &self.names[0],
            Ns::Proxy => &self.names[1],
            Ns::Backend => &self.names[2],
        }
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
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if std::env::var_os("SPLICED_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
