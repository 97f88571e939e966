//! Loading spliced's eBPF object, attaching its programs, pinning its maps, and the socket-map
//! operations the sockmap engine needs.
use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, SockHash, lpm_trie::Key},
    programs::{Iter, SkSkb, Xdp, xdp::XdpMode as AttachMode},
};
use proxy_common::{
    Counter, DETACH_ABSENT, DETACH_DONE, DETACH_REQUESTED, MAP_COUNTERS, MAP_DETACH, MAP_EVENTS,
    MAP_HOLD, MAP_OFFSETS, MAP_PEERS, MAP_SOCKETS, MAP_WAKE, MAP_XDP_BUCKETS, MAP_XDP_COUNTERS,
    MAP_XDP_DENY4, MAP_XDP_DENY6, MAP_XDP_LIMIT, MAP_XDP_PORTS, PROG_DETACH, PROG_STREAM_VERDICT,
    PROG_XDP, Pair, SkbOffsets, SynBucket, SynLimit, XdpCounter,
};

use crate::config::{Cidr, Xdp as XdpConfig, XdpMode};
use tokio::{io::unix::AsyncFd, sync::Notify};

/// The eBPF object built by `build.rs` from the `proxy-ebpf` crate.
#[cfg(not(spliced_no_ebpf))]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));
#[cfg(spliced_no_ebpf)]
static OBJECT: &[u8] = &[];

/// Diagnostic only: when set in spliced's environment, the verdict is loaded without the
/// offsets it trims already-forwarded bytes with, which reproduces the kernel defect described
/// in `docs/sockmap-duplication.md`.
pub const DIAG_NO_TRIM: &str = "SPLICED_DIAG_NO_TRIM";

/// The socket maps, behind one lock: every operation is a single short syscall.
struct Maps {
    socks: SockHash<MapData, u64>,
    hold: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, Pair>,
    detach: HashMap<MapData, u64, u32>,
    wake: HashMap<MapData, u64, u64>,
}

/// An interface the edge filter is attached to, and in which mode ("native" or "generic").
pub type Attachment = (String, &'static str);

/// The edge filter's maps (see `proxy-ebpf/src/xdp.rs`).
struct XdpMaps {
    deny4: LpmTrie<MapData, [u8; 4], u8>,
    deny6: LpmTrie<MapData, [u8; 16], u8>,
    ports: HashMap<MapData, u16, u8>,
    limit: Array<MapData, SynLimit>,
    counters: PerCpuArray<MapData, u64>,
    /// Held only so that it is pinned (users read the buckets with bpftool).
    _buckets: HashMap<MapData, [u8; 16], SynBucket>,
    /// Interfaces the program is attached to, and how.
    attached: Vec<Attachment>,
}

/// The loaded programs and maps; dropping it detaches and unloads everything and removes the
/// pins it made.
pub struct Kernel {
    /// The object; its `iter/tcp` program is run under this lock, one walk at a time.
    ebpf: Mutex<Ebpf>,
    maps: Mutex<Maps>,
    counters: PerCpuArray<MapData, u64>,
    events: Mutex<Option<RingBuf<MapData>>>,
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    watchers: Mutex<StdHashMap<u64, Arc<Notify>>>,
    xdp: Mutex<XdpMaps>,
    pins: Vec<PathBuf>,
}

/// Why a socket could not be put in a socket map.
#[derive(Debug)]
pub struct InsertError(aya::maps::MapError);

impl std::fmt::Display for InsertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Kernel {
    /// Loads the object, attaches the stream-verdict program to the socket hash and, if
    /// `pin_dir` is given, pins every map there (replacing stale pins from a crashed run).
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        anyhow::ensure!(
            !OBJECT.is_empty(),
            "this binary was built without its eBPF object"
        );
        let mut ebpf = Ebpf::load(OBJECT).context("loading the eBPF object into the kernel")?;
        // The programs' aya-log records reach our log (debug level, target `proxy_ebpf`).
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!("eBPF log records will not be shown: {e}");
                None
            }
        };
        if let Some(dir) = pin_dir {
            ensure_bpffs(dir)?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut pins = Vec::new();
        let mut take = |ebpf: &mut Ebpf, name: &str| -> Result<aya::maps::Map> {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the object"))?;
            if let Some(dir) = pin_dir {
                let path = dir.join(name);
                if path.exists() {
                    // Left by a run that did not shut down cleanly; its maps died with it.
                    tracing::warn!(pin = %path.display(), "removing a stale pin");
                    std::fs::remove_file(&path)?;
                }
                map.pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
                pins.push(path);
            }
            Ok(map)
        };
        let socks: SockHash<MapData, u64> = take(&mut ebpf, MAP_SOCKETS)?.try_into()?;
        let hold: SockHash<MapData, u64> = take(&mut ebpf, MAP_HOLD)?.try_into()?;
        let peers: HashMap<MapData, u64, Pair> = take(&mut ebpf, MAP_PEERS)?.try_into()?;
        let detach: HashMap<MapData, u64, u32> = take(&mut ebpf, MAP_DETACH)?.try_into()?;
        let wake: HashMap<MapData, u64, u64> = take(&mut ebpf, MAP_WAKE)?.try_into()?;
        let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, MAP_COUNTERS)?.try_into()?;
        let events: RingBuf<MapData> = take(&mut ebpf, MAP_EVENTS)?.try_into()?;
        let xdp = XdpMaps {
            deny4: take(&mut ebpf, MAP_XDP_DENY4)?.try_into()?,
            deny6: take(&mut ebpf, MAP_XDP_DENY6)?.try_into()?,
            ports: take(&mut ebpf, MAP_XDP_PORTS)?.try_into()?,
            limit: take(&mut ebpf, MAP_XDP_LIMIT)?.try_into()?,
            counters: take(&mut ebpf, MAP_XDP_COUNTERS)?.try_into()?,
            _buckets: take(&mut ebpf, MAP_XDP_BUCKETS)?.try_into()?,
            attached: Vec::new(),
        };
        // The verdict trims bytes it already forwarded (see `kernel_btf`); without the offsets
        // it would forward them twice, so the engine is not offered at all.
        let offsets = crate::kernel_btf::skb_offsets()
            .context("finding sk_buff and tcp_sock members in the kernel's BTF")?;
        let mut offsets_map: Array<&mut MapData, SkbOffsets> = ebpf
            .map_mut(MAP_OFFSETS)
            .with_context(|| format!("map {MAP_OFFSETS} missing from the object"))?
            .try_into()?;
        if std::env::var_os(DIAG_NO_TRIM).is_some() {
            // Leaves the map zeroed: the verdict then forwards overlapping bytes again.
            tracing::warn!(
                "{DIAG_NO_TRIM} is set: the stream verdict will NOT trim bytes it already \
                 forwarded, and retransmissions can corrupt streams (for reproducing the \
                 kernel defect only)"
            );
        } else {
            offsets_map.set(0, &offsets, 0)?;
            tracing::debug!(?offsets, "kernel structure offsets for the stream verdict");
        }
        let fd = socks.fd().try_clone()?;
        let prog: &mut SkSkb = ebpf
            .program_mut(PROG_STREAM_VERDICT)
            .with_context(|| format!("program {PROG_STREAM_VERDICT} missing from the object"))?
            .try_into()?;
        prog.load()
            .context("the verifier rejected the stream-verdict program")?;
        prog.attach(&fd)
            .context("attaching the stream-verdict program")?;
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let iter: &mut Iter = ebpf
            .program_mut(PROG_DETACH)
            .with_context(|| format!("program {PROG_DETACH} missing from the object"))?
            .try_into()?;
        iter.load("tcp", &btf)
            .context("the verifier rejected the TCP iterator program")?;
        Ok(Kernel {
            ebpf: Mutex::new(ebpf),
            maps: Mutex::new(Maps {
                socks,
                hold,
                peers,
                detach,
                wake,
            }),
            counters,
            events: Mutex::new(Some(events)),
            logger: Mutex::new(logger),
            watchers: Mutex::new(StdHashMap::new()),
            xdp: Mutex::new(xdp),
            pins,
        })
    }

    /// Starts the task that turns the program's progress events into wake-ups of the
    /// connections they belong to. Call once, inside the runtime.
    pub fn spawn_event_reader(self: &Arc<Self>) -> Result<()> {
        let ring = self
            .events
            .lock()
            .map_err(|_| anyhow::anyhow!("event lock poisoned"))?
            .take()
            .context("the event reader is already running")?;
        // SAFETY: the ring buffer owns its descriptor and is moved into the AsyncFd, so the
        // descriptor stays open exactly as long as it is registered.
        let mut ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
        let logger = self
            .logger
            .lock()
            .map_err(|_| anyhow::anyhow!("logger lock poisoned"))?
            .take();
        if let Some(logger) = logger {
            // SAFETY: the logger owns its map descriptor and keeps it open while registered.
            let mut logger = unsafe { AsyncFd::register(logger) }
                .map_err(|e| anyhow::anyhow!("watching the eBPF log buffer: {e}"))?;
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = logger.readable_mut().await else {
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        let kernel = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = ring.readable_mut().await else {
                    return;
                };
                let Some(kernel) = kernel.upgrade() else {
                    return;
                };
                while let Some(item) = guard.get_inner_mut().next() {
                    if let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) {
                        kernel.wake(u64::from_ne_bytes(bytes));
                    }
                }
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// A notifier woken whenever the socket with this cookie makes progress.
    pub fn watch(&self, cookie: u64) -> Arc<Notify> {
        let mut w = self
            .watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(w.entry(cookie).or_default())
    }

    fn wake(&self, cookie: u64) {
        let w = self
            .watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = w.get(&cookie) {
            n.notify_one();
        }
    }

    /// Names of the programs in the loaded object.
    pub fn program_names(&self) -> Vec<String> {
        self.ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .programs()
            .map(|(name, _)| name.to_owned())
            .collect()
    }

    /// Kernel-side counters summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| (c.name(), sum_per_cpu(&self.counters, c as u32)))
            .collect()
    }

    fn with_maps<T>(&self, f: impl FnOnce(&mut Maps) -> T) -> T {
        let mut guard = match self.maps.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Fills the edge filter's maps from `cfg` and attaches the XDP program to its interfaces.
    /// A failed attach is an error naming the interface, except that `mode = "auto"` falls back
    /// from native to generic mode (logged).
    pub fn attach_xdp(&self, cfg: &XdpConfig) -> Result<()> {
        self.update_xdp(cfg)?;
        let mut ebpf = self
            .ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .with_context(|| format!("program {PROG_XDP} missing from the object"))?
            .try_into()?;
        prog.load()
            .context("the verifier rejected the XDP program")?;
        let mut attached = Vec::new();
        for name in &cfg.interfaces {
            let c_name = std::ffi::CString::new(name.as_str())
                .with_context(|| format!("interface name {name:?}"))?;
            let c_name = c_name.as_c_str();
            let how = match cfg.mode {
                XdpMode::Native => {
                    prog.attach(c_name, AttachMode::Driver).with_context(|| {
                        format!("attaching XDP to interface {name} in native mode")
                    })?;
                    "native"
                }
                XdpMode::Generic => {
                    prog.attach(c_name, AttachMode::Skb).with_context(|| {
                        format!("attaching XDP to interface {name} in generic mode")
                    })?;
                    "generic"
                }
                XdpMode::Auto => match prog.attach(c_name, AttachMode::Driver) {
                    Ok(_) => "native",
                    Err(native) => {
                        prog.attach(c_name, AttachMode::Skb).with_context(|| {
                            format!(
                                "attaching XDP to interface {name} (native mode failed too: \
                                 {native})"
                            )
                        })?;
                        tracing::warn!(
                            interface = %name,
                            "native XDP is not available ({native}); using generic mode"
                        );
                        "generic"
                    }
                },
            };
            tracing::info!(interface = %name, mode = how, "XDP edge filter attached");
            attached.push((name.clone(), how));
        }
        self.with_xdp(|x| x.attached = attached);
        Ok(())
    }

    /// Makes the edge filter's deny lists, guarded ports and SYN limit match `cfg`, without
    /// detaching anything (entries added by hand with bpftool are replaced by the config's).
    pub fn update_xdp(&self, cfg: &XdpConfig) -> Result<()> {
        self.with_xdp(|x| -> Result<()> {
            let mut want4 = Vec::new();
            let mut want6 = Vec::new();
            for Cidr { addr, prefix } in &cfg.deny {
                match addr {
                    std::net::IpAddr::V4(a) => want4.push(Key::new(u32::from(*prefix), a.octets())),
                    std::net::IpAddr::V6(a) => want6.push(Key::new(u32::from(*prefix), a.octets())),
                }
            }
            sync_trie(&mut x.deny4, &want4).context("updating the IPv4 deny list")?;
            sync_trie(&mut x.deny6, &want6).context("updating the IPv6 deny list")?;
            let stale: Vec<u16> = x
                .ports
                .keys()
                .filter_map(Result::ok)
                .filter(|p| !cfg.ports.contains(p))
                .collect();
            for p in stale {
                x.ports.remove(&p)?;
            }
            for p in &cfg.ports {
                x.ports.insert(p, &1, 0)?;
            }
            let limit = cfg.syn_limit.map_or(SynLimit::default(), |l| SynLimit {
                rate_per_second: u64::from(l.rate_per_second),
                burst: u64::from(l.burst),
            });
            x.limit.set(0, &limit, 0)?;
            Ok(())
        })
    }

    /// The edge filter's counters summed over CPUs, by name, and the interfaces it is on.
    pub fn xdp_counters(&self) -> (Vec<(&'static str, u64)>, Vec<Attachment>) {
        self.with_xdp(|x| {
            let counts = XdpCounter::ALL
                .iter()
                .map(|&c| (c.name(), sum_per_cpu(&x.counters, c as u32)))
                .collect();
            (counts, x.attached.clone())
        })
    }

    fn with_xdp<T>(&self, f: impl FnOnce(&mut XdpMaps) -> T) -> T {
        let mut guard = self
            .xdp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Registers `a` and `b` as peers and holds both sockets (no redirection yet).
    pub fn register(
        &self,
        a: (u64, BorrowedFd<'_>),
        b: (u64, BorrowedFd<'_>),
    ) -> Result<(), InsertError> {
        self.with_maps(|m| {
            m.peers
                .insert(
                    &a.0,
                    &Pair {
                        peer: b.0,
                        redirected: 0,
                    },
                    0,
                )
                .map_err(InsertError)?;
            m.peers
                .insert(
                    &b.0,
                    &Pair {
                        peer: a.0,
                        redirected: 0,
                    },
                    0,
                )
                .map_err(InsertError)?;
            m.hold
                .insert(&a.0, a.1.as_raw_fd(), 0)
                .map_err(InsertError)?;
            m.hold.insert(&b.0, b.1.as_raw_fd(), 0).map_err(InsertError)
        })
    }

    /// Starts redirecting what arrives on `sock`.
    pub fn start(&self, cookie: u64, sock: BorrowedFd<'_>) -> Result<(), InsertError> {
        self.with_maps(|m| {
            m.socks
                .insert(&cookie, sock.as_raw_fd(), 0)
                .map_err(InsertError)
        })
    }

    /// Stops redirecting what arrives on the socket: its data stays in its TCP receive queue,
    /// so TCP flow control holds the sender back. Returns `false` if it was not redirecting.
    ///
    /// A plain map delete would race with a verdict run that already took an skb off the
    /// receive queue, which the kernel then drops. The removal is done by the `iter/tcp`
    /// program instead, which the kernel runs with each socket locked. It walks the TCP
    /// sockets of this network namespace: about a microsecond each.
    pub fn detach(&self, cookie: u64) -> std::io::Result<bool> {
        let other = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        self.with_maps(|m| m.detach.insert(&cookie, &DETACH_REQUESTED, 0))
            .map_err(|e| other(&e))?;
        let walked = self.walk_tcp_sockets();
        let state = self.with_maps(|m| {
            let state = m.detach.get(&cookie, 0).ok();
            let _ = m.detach.remove(&cookie);
            state
        });
        walked?;
        match state {
            Some(DETACH_DONE) => Ok(true),
            Some(DETACH_ABSENT) => Ok(false),
            // Not visited: the socket is gone from the table (closed meanwhile).
            _ => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
        }
    }

    /// Runs the `iter/tcp` program over every TCP socket of this network namespace.
    fn walk_tcp_sockets(&self) -> std::io::Result<()> {
        use std::io::Read as _;
        let other = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let mut ebpf = self
            .ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let iter: &mut Iter = ebpf
            .program_mut(PROG_DETACH)
            .ok_or_else(|| other(&"the iterator program is missing"))?
            .try_into()
            .map_err(|e| other(&e))?;
        let id = iter.attach().map_err(|e| other(&e))?;
        let link = iter.take_link(id).map_err(|e| other(&e))?;
        let mut file = link.into_file().map_err(|e| other(&e))?;
        // The program prints nothing; reading to the end is what runs it.
        let mut sink = [0u8; 64];
        while file.read(&mut sink)? > 0 {}
        Ok(())
    }

    /// Asks for a progress event as soon as the socket's redirected count reaches `at`.
    pub fn wake_at(&self, cookie: u64, at: u64) {
        let _ = self.with_maps(|m| m.wake.insert(&cookie, &at, 0));
    }

    /// Bytes the verdict redirected from this socket so far.
    pub fn redirected(&self, cookie: u64) -> u64 {
        self.with_maps(|m| m.peers.get(&cookie, 0).map(|p| p.redirected).unwrap_or(0))
    }

    /// Forgets both sockets entirely. Only call once their queues are drained.
    pub fn unregister(&self, cookies: [u64; 2]) {
        {
            let mut w = self
                .watchers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for c in cookies {
                w.remove(&c);
            }
        }
        self.with_maps(|m| {
            for c in cookies {
                let _ = m.socks.remove(&c);
            }
            for c in cookies {
                let _ = m.peers.remove(&c);
                let _ = m.detach.remove(&c);
                let _ = m.wake.remove(&c);
                let _ = m.hold.remove(&c);
            }
        });
    }

    /// How many sockets the maps hold now (for leak checks and metrics).
    pub fn entries(&self) -> (usize, usize, usize) {
        self.with_maps(|m| {
            (
                m.socks.keys().filter(Result::is_ok).count(),
                m.hold.keys().filter(Result::is_ok).count(),
                m.peers.keys().filter(Result::is_ok).count(),
            )
        })
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        for pin in &self.pins {
            let _ = std::fs::remove_file(pin);
        }
        if let Some(dir) = self.pins.first().and_then(|p| p.parent()) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A per-CPU counter summed over CPUs (0 if it cannot be read).
fn sum_per_cpu(array: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    array
        .get(&index, 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(0)
}

/// Makes an LPM trie hold exactly `want` (value 1 each).
fn sync_trie<K: aya::Pod + PartialEq>(
    trie: &mut LpmTrie<MapData, K, u8>,
    want: &[Key<K>],
) -> Result<()> {
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            !want
                .iter()
                .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
        })
        .collect();
    for k in &stale {
        trie.remove(k)?;
    }
    for k in want {
        trie.insert(k, &1, 0)?;
    }
    Ok(())
}

/// Mounts bpffs on `/sys/fs/bpf` when `dir` is under it and nothing is mounted there:
/// `ip netns exec` gives its command a fresh `/sys` without one.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs on /sys/fs/bpf")?;
    Ok(())
}

/// The kernel's cookie for a socket: stable for its life, the key in every map.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: SO_COOKIE writes a u64 into the buffer we pass with its size.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Bytes a socket has handed to TCP: acknowledged by the peer plus still in the send queue.
pub fn bytes_handed_to_tcp(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    // SAFETY: tcp_info is plain data; getsockopt fills at most `len` bytes of it.
    let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
    // SAFETY: as above.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut outq: nix::libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + u64::try_from(outq).unwrap_or(0))
}

/// Sets `SO_RCVLOWAT`; setting it makes TCP re-check its queue and wake the verdict program
/// for data that arrived before the socket was in the map.
pub fn set_rcvlowat(fd: impl AsFd, bytes: i32) -> std::io::Result<()> {
    // SAFETY: SO_RCVLOWAT reads one int.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_RCVLOWAT,
            (&raw const bytes).cast(),
            size_of::<i32>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
