//! DNS for the `[dns]` backend tests: Knot, a real authoritative server, in the backend
//! namespace serving a zone the test writes, and a relay in front of it that holds every query
//! for a while (so that lookups overlap, for coalescing) and swallows the queries for one name
//! (a server that never answers, for timeouts).
//!
//! The query counts come from Knot itself (`knotc stats`, module `mod-stats`), so a test sees
//! what reached the server, not what spliced says it sent.
use std::{
    fs::File,
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::{Ns, Service, World, wait_for};

/// Knot DNS in the backend namespace, authoritative for one zone.
pub struct Knot {
    _service: Service,
    control: PathBuf,
}

impl Knot {
    /// Starts `knotd` on `listen` (an address of the backend namespace) serving `zone` (the
    /// zone file's text) as `origin` (e.g. `dns.test.`). Waits until the zone is loaded.
    pub fn start(world: &World, listen: SocketAddr, origin: &str, zone: &str) -> Result<Knot> {
        let dir = world.dir().join("knot");
        std::fs::create_dir_all(&dir)?;
        let zone_file = dir.join("zone");
        std::fs::write(&zone_file, zone)?;
        let control = dir.join("knot.sock");
        let config = format!(
            "server:\n    rundir: {dir}\n    listen: {ip}@{port}\n    user: root:root\n\
             log:\n  - target: stderr\n    any: info\n\
             database:\n    storage: {dir}\n\
             control:\n    listen: {control}\n\
             mod-stats:\n  - id: counters\n    query-type: on\n\
             template:\n  - id: default\n    storage: {dir}\n    global-module: mod-stats/counters\n\
             zone:\n  - domain: {origin}\n    file: {zone}\n",
            dir = dir.display(),
            ip = listen.ip(),
            port = listen.port(),
            control = control.display(),
            zone = zone_file.display(),
        );
        let config_path = dir.join("knot.conf");
        std::fs::write(&config_path, config)?;
        let mut cmd = world.command(Ns::Backend, "knotd");
        cmd.arg("-c").arg(&config_path);
        let mut service = Service::start("knotd", cmd, world.dir())
            .context("starting knotd (is Debian's knot package installed? ./x installs it)")?;
        // Loaded means a serial in the zone's status (`[dns.test.] role: master | serial: 1`).
        let status = format!("zone-status {origin}");
        wait_for("knotd to load the zone", Duration::from_secs(10), || {
            service.check_running()?;
            Ok(knotc(&control, &status).is_ok_and(|out| {
                out.split("serial: ")
                    .nth(1)
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            }))
        })?;
        Ok(Knot {
            _service: service,
            control,
        })
    }

    /// AAAA queries the server has received so far.
    pub fn aaaa_queries(&self) -> Result<u64> {
        let stats = knotc(&self.control, "stats")?;
        // `mod-stats.query-type[AAAA] = 3`; absent until the first one.
        for line in stats.lines() {
            if let Some(rest) = line.trim().strip_prefix("mod-stats.query-type[AAAA] = ") {
                return rest
                    .trim()
                    .parse()
                    .with_context(|| format!("knotc stats: {line:?}"));
            }
        }
        Ok(0)
    }
}

fn knotc(control: &Path, command: &str) -> Result<String> {
    let out = Command::new("knotc")
        .arg("-s")
        .arg(control)
        .args(command.split_whitespace())
        .output()
        .context("starting knotc")?;
    if !out.status.success() {
        bail!("knotc {command}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A UDP relay in the backend namespace in front of a name server: queries for a name
/// containing the label `slow` are sent on after `delay`, those containing the label `swallow`
/// get no answer at all, and the others are sent on at once. Stops (bounded) when dropped.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Binds `listen` in the backend namespace and relays to `upstream`.
    pub fn start(
        world: &World,
        listen: SocketAddr,
        upstream: SocketAddr,
        (slow, delay): (&str, Duration),
        swallow: &str,
    ) -> Result<Relay> {
        let netns = Path::new("/var/run/netns").join(world.name(Ns::Backend));
        let netns = File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicU64::new(0));
        let label = |name: &str| -> Result<Vec<u8>> {
            let mut label = vec![u8::try_from(name.len()).context("label too long")?];
            label.extend_from_slice(name.as_bytes());
            Ok(label)
        };
        let labels = Labels {
            slow: label(slow)?,
            swallow: label(swallow)?,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, swallowed) = (stop.clone(), swallowed.clone());
            std::thread::Builder::new()
                .name("dns-relay".into())
                .spawn(move || {
                    // Threads started from here inherit the namespace.
                    let socket = setns(&netns, CloneFlags::CLONE_NEWNET)
                        .context("entering the backend namespace")
                        .and_then(|()| UdpSocket::bind(listen).context("binding the relay"))
                        .and_then(|s| {
                            s.set_read_timeout(Some(Duration::from_millis(50)))?;
                            Ok(s)
                        });
                    let socket = match socket {
                        Ok(socket) => {
                            let _ = ready_tx.send(Ok(()));
                            socket
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    relay(&socket, upstream, delay, &labels, &stop, &swallowed);
                })?
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the relay did not start")??;
        Ok(Relay {
            addr: listen,
            stop,
            swallowed,
            thread: Some(thread),
        })
    }

    /// Queries swallowed so far.
    pub fn swallowed(&self) -> u64 {
        self.swallowed.load(Ordering::Relaxed)
    }
}

/// The two labels the relay looks for, as they appear on the wire (length byte first).
struct Labels {
    slow: Vec<u8>,
    swallow: Vec<u8>,
}

fn relay(
    socket: &UdpSocket,
    upstream: SocketAddr,
    delay: Duration,
    labels: &Labels,
    stop: &AtomicBool,
    swallowed: &AtomicU64,
) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, client)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let query = buf[..n].to_vec();
        // Names are compared case-insensitively by DNS; resolvers may randomize case (0x20).
        let lower: Vec<u8> = query.iter().map(u8::to_ascii_lowercase).collect();
        let has = |label: &[u8]| lower.windows(label.len()).any(|w| w == label);
        if has(&labels.swallow) {
            swallowed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let delay = if has(&labels.slow) {
            delay
        } else {
            Duration::ZERO
        };
        let Ok(reply_to) = socket.try_clone() else {
            continue;
        };
        // Each query waits on its own thread, so that queries overlap as they would at a
        // slow server; bounded by the test's connections.
        let _ = std::thread::Builder::new()
            .name("dns-relay-q".into())
            .spawn(move || {
                std::thread::sleep(delay);
                let bind: SocketAddr = if upstream.is_ipv6() {
                    "[::]:0".parse().unwrap_or(upstream)
                } else {
                    "0.0.0.0:0".parse().unwrap_or(upstream)
                };
                let Ok(out) = UdpSocket::bind(bind) else {
                    return;
                };
                let _ = out.set_read_timeout(Some(Duration::from_secs(2)));
                if out.send_to(&query, upstream).is_err() {
                    return;
                }
                let mut answer = [0u8; 4096];
                if let Ok(n) = out.recv(&mut answer) {
                    let _ = reply_to.send_to(&answer[..n], client);
                }
            });
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
