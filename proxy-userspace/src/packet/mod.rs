//! The packet engine in the running proxy (`docs/packet-engine.md`, sections 3.4, 6 and 8):
//! what is loaded at start ([`Packet::start`]), the handoff of one connection on a blocking
//! thread ([`Packet::handoff`]), and the sweeper that ends handed-off connections
//! ([`Packet::sweep`]) and wakes their tasks with how they ended.
//!
//! The kernel side (programs, tables, the handoff driver) is [`crate::ebpf`]'s; the expiry
//! rule is [`crate::packet_expiry`]'s. Here is only the glue: who holds what, when.
pub mod host;
pub mod icmp;
pub mod syn;

use std::{
    collections::HashMap,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use proxy_common::{Flow, FlowKey};
use tokio::{io::unix::AsyncFd, sync::oneshot};

use crate::{
    config::PacketSettings,
    ebpf::{Clamped, Freeze, HandedOff, HandoffError, HandoffLimits, IsnRecorder, PacketTables},
    packet_expiry::{self, End},
};

/// The packet engine's kernel side as the proxy holds it.
pub struct Packet {
    /// The tables and the ISN recorder, shared by the handoffs (each blocks its own thread
    /// for as long as its drain takes) and the sweeper.
    kernel: Kernel,
    /// Connections handed off, by the key of their client entry and the client socket's
    /// cookie: a client that reuses its port once a connection ended (design 2.1) may have
    /// its new connection handed off while the old one is still here, under the same key.
    live: Mutex<HashMap<(FlowKey, u64), Live>>,
    /// The MSS every listener that may use the engine announces.
    listener_mss: u16,
    /// Where the maps are pinned, to remove them at stop.
    pin_dir: Mutex<Option<PathBuf>>,
    /// Set when the process stops: no new handoffs.
    stopping: AtomicBool,
    /// The raw sockets ICMP errors are translated into (design section 7); `None` when they
    /// could not be opened (the engine works without, but a lower MTU beyond the proxy then
    /// stalls a connection).
    icmp: Option<icmp::Sender>,
    /// What became of the programs' ICMP reports, indexed as [`ICMP_COUNTERS`].
    icmp_counts: [AtomicU64; ICMP_COUNTERS.len()],
}

/// spliced's own counts of the ICMP reports, listed with the programs' counters: translated
/// and sent, held back by the per-connection rate limit, whose entry was gone or did not
/// translate, and whose send failed.
const ICMP_COUNTERS: [&str; 4] = [
    "icmp_sent",
    "icmp_rate_limited",
    "icmp_untranslated",
    "icmp_send_failed",
];
const ICMP_SENT: usize = 0;
const ICMP_RATE_LIMITED: usize = 1;
const ICMP_UNTRANSLATED: usize = 2;
const ICMP_SEND_FAILED: usize = 3;

struct Kernel {
    tables: PacketTables,
    isn: IsnRecorder,
}

/// A handed-off connection waiting for its end.
struct Live {
    handed: HandedOff,
    /// When the handoff completed (`CLOCK_MONOTONIC`): the entries count as seen then, or a
    /// pair no segment crossed yet would look idle since boot to [`packet_expiry::decide`].
    since_ns: u64,
    wake: oneshot::Sender<Ended>,
}

/// How a handed-off connection ended, with its entries as the programs left them.
pub struct Ended {
    /// Why.
    pub end: End,
    /// The client's entry (`E_up`), if it was still there.
    pub up: Option<Flow>,
    /// The backend's entry (`E_down`).
    pub down: Option<Flow>,
}

impl Ended {
    /// Bytes of each stream the programs carried after the handoff (client to backend,
    /// backend to client), FIN excluded.
    pub fn stream_bytes(&self) -> (u64, u64) {
        (
            self.up.as_ref().map_or(0, packet_expiry::stream_bytes),
            self.down.as_ref().map_or(0, packet_expiry::stream_bytes),
        )
    }
}

/// The clamped windows of a connection being offered ([`Packet::screen`]): removed
/// when this is dropped, once the handoff is over whatever its outcome.
pub struct WindowClamps {
    packet: Arc<Packet>,
    clamped: Clamped,
}

impl WindowClamps {
    /// Holds the clamped windows' right edges still from the freeze on (both directions
    /// stopped after `read` bytes from the client and from the backend).
    pub fn anchor(&mut self, client: BorrowedFd, backend: BorrowedFd, read: (u64, u64)) {
        if let Err(e) = self
            .packet
            .kernel
            .tables
            .anchor(&mut self.clamped, client, backend, read)
        {
            tracing::debug!("packet engine: anchoring the clamped windows: {e}");
        }
    }

    /// The handoff was refused: the clamps go now, and the connection goes on with splice,
    /// its sockets announcing their own windows again, a window update included for a peer
    /// stopped at an anchored edge ([`PacketTables::unanchor`]).
    pub fn refused(self, client: BorrowedFd, backend: BorrowedFd) {
        if let Err(e) = self
            .packet
            .kernel
            .tables
            .unanchor(&self.clamped, client, backend)
        {
            tracing::warn!("packet engine: releasing the anchored windows: {e:#}");
        }
    }
}

impl Drop for WindowClamps {
    fn drop(&mut self) {
        if let Err(e) = self
            .packet
            .kernel
            .tables
            .unclamp_windows(&self.clamped.keys)
        {
            tracing::warn!("packet engine: {e:#}");
        }
    }
}

/// What [`Packet::screen`] found.
pub enum Screened {
    /// The engine cannot take the connection, for this reason: it goes on with splice.
    Refused(&'static str),
    /// Freeze and hand off, with the windows clamped if that worked.
    Go(Option<WindowClamps>),
}

/// What [`Packet::handoff`] gives a connection's task.
pub enum Outcome {
    /// Nothing was installed: the connection goes on with splice.
    Refused(&'static str),
    /// The kernel carries the connection; `ended` resolves when the sweeper removed it.
    HandedOff {
        /// From the call to `ACTIVE`.
        duration: Duration,
        /// Bytes moved by rule F during the drain.
        drained: (u64, u64),
        /// Resolves with the end.
        ended: oneshot::Receiver<Ended>,
    },
}

impl Packet {
    /// Loads and attaches everything the engine needs, or says what is missing: `TCP_REPAIR`
    /// on a fresh socket, the ISN recorder on this process's cgroup v2 directory, the
    /// translation programs on the interfaces, the maps (the table sized for
    /// `settings.max_connections`) pinned under `pin_dir`.
    pub fn start(settings: &PacketSettings, pin_dir: Option<&Path>) -> Result<Packet> {
        host::check_repair()?;
        let cgroup = host::own_cgroup()?;
        // Several spliced may share a cgroup (tests do): the recorder attaches with
        // `CgroupAttachMode::Single`, one link per process, so each has its own.
        let isn = IsnRecorder::attach(&cgroup).with_context(|| {
            format!(
                "attaching the ISN recorder to spliced's cgroup {}",
                cgroup.display()
            )
        })?;
        let interfaces = host::interfaces(&settings.interfaces)?;
        let mtu = host::smallest_mtu(&interfaces)?;
        let listener_mss = host::listener_mss(settings.mss, mtu)?;
        if let Some(dir) = pin_dir {
            crate::ebpf::ensure_bpffs(dir)?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // Left by a run that did not stop cleanly (the pin directory's lock keeps a live
            // spliced's pins from here). Adopting its connections is not built yet: they end.
            for pin in pins(dir) {
                tracing::warn!(pin = %pin.display(), "removing a stale pin");
                std::fs::remove_file(&pin)
                    .with_context(|| format!("removing the stale pin {}", pin.display()))?;
            }
        }
        // Sized here, at start: a reload cannot resize a map the programs use, so a changed
        // `max_connections` waits for a restart (the reload diff says so).
        let loaded =
            PacketTables::load_sized(pin_dir, settings.max_connections).and_then(|mut tables| {
                for name in &interfaces {
                    tables.attach(name)?;
                }
                Ok(tables)
            });
        let tables = match loaded {
            Ok(tables) => tables,
            Err(e) => {
                // Under `auto` spliced runs on without the engine: leave no pins behind.
                for pin in pin_dir.into_iter().flat_map(pins) {
                    let _ = std::fs::remove_file(&pin);
                }
                return Err(e);
            }
        };
        let icmp = icmp::Sender::open()
            .inspect_err(|e| {
                tracing::warn!("packet engine: ICMP errors will not be translated: {e:#}");
            })
            .ok();
        tracing::info!(
            interfaces = %interfaces.join(","),
            mss = listener_mss,
            max_connections = settings.max_connections,
            cgroup = %cgroup.display(),
            "packet engine loaded"
        );
        Ok(Packet {
            kernel: Kernel { tables, isn },
            live: Mutex::new(HashMap::new()),
            listener_mss,
            pin_dir: Mutex::new(pin_dir.map(Path::to_path_buf)),
            stopping: AtomicBool::new(false),
            icmp,
            icmp_counts: Default::default(),
        })
    }

    /// Starts the task that turns the programs' ICMP reports into messages to the peers
    /// (design section 7, [`icmp`]). Call once, inside the runtime.
    pub fn spawn_icmp_reader(self: &Arc<Self>) -> Result<()> {
        if self.icmp.is_none() {
            return Ok(());
        }
        let ring = self
            .kernel
            .tables
            .take_icmp()
            .context("the ICMP reader is already running")?;
        // SAFETY: the ring buffer owns its descriptor and is moved into the AsyncFd, so the
        // descriptor stays open exactly as long as it is registered.
        let mut ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("watching the ICMP ring buffer: {e}"))?;
        let packet = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut limit = icmp::RateLimit::new(icmp::RATE);
            loop {
                let Ok(mut guard) = ring.readable_mut().await else {
                    return;
                };
                let Some(packet) = packet.upgrade() else {
                    return;
                };
                while let Some(item) = guard.get_inner_mut().next() {
                    if let Some(event) = icmp::parse_event(&item) {
                        packet.translate_icmp(&event, &mut limit);
                    }
                }
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// One ICMP report: the entry's peer gets the message in its own family, unless one
    /// went for the same connection less than [`icmp::RATE`] ago.
    fn translate_icmp(&self, event: &proxy_common::IcmpEvent, limit: &mut icmp::RateLimit) {
        let Some(sender) = &self.icmp else {
            return;
        };
        let count = |i: usize| self.icmp_counts[i].fetch_add(1, Ordering::Relaxed);
        if !limit.allow(&event.key, Instant::now()) {
            count(ICMP_RATE_LIMITED);
            return;
        }
        let reply = match self.kernel.tables.get(&event.key) {
            // A superseded client entry (design 2.1): the quoted segment is the client's new
            // connection's, which the stack itself carries; the message is the stack's too.
            Ok(Some(flow)) if flow.superseded != 0 => None,
            Ok(Some(flow)) => icmp::reply(event, &flow),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!("packet engine: reading the entry of an ICMP report: {e:#}");
                None
            }
        };
        let Some(reply) = reply else {
            count(ICMP_UNTRANSLATED);
            return;
        };
        match sender.send(&reply) {
            Ok(_) => {
                count(ICMP_SENT);
                tracing::debug!(mtu = event.mtu, ?reply, "packet engine: ICMP translated");
            }
            Err(e) => {
                count(ICMP_SEND_FAILED);
                tracing::debug!("packet engine: sending a translated ICMP: {e}");
            }
        }
    }

    /// What `spliced check` can find out without loading anything: whether `TCP_REPAIR` is
    /// permitted, the cgroup v2 directory (if one is mounted; `run` mounts one otherwise),
    /// the interfaces and the MSS listeners will announce. A one-line summary, or what is
    /// wrong.
    pub fn preflight(settings: &PacketSettings) -> Result<String> {
        host::check_repair()?;
        let mounts =
            std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
        let cgroup =
            std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let cgroup = host::cgroup_v2_dir(&mounts, &cgroup)
            .map_or_else(|e| format!("none yet ({e})"), |d| d.display().to_string());
        let interfaces = host::interfaces(&settings.interfaces)?;
        let mss = host::listener_mss(settings.mss, host::smallest_mtu(&interfaces)?)?;
        Ok(format!(
            "packet engine: TCP_REPAIR permitted, cgroup v2 {cgroup}, interfaces {}, listener \
             MSS {mss}",
            interfaces.join(",")
        ))
    }

    /// The MSS listeners that may use the engine announce (`TCP_MAXSEG`).
    pub fn listener_mss(&self) -> u16 {
        self.listener_mss
    }

    /// Before a connection is frozen for its handoff: whether the engine can take it at all
    /// (what the sockets alone decide, design section 9), and if so its windows clamped
    /// (`docs/packet-engine.md`, 3.6 item 12). `Go(None)`: nothing was clamped (a full clamp
    /// map), the handoff goes on without.
    pub fn screen(self: &Arc<Self>, client: BorrowedFd, backend: BorrowedFd) -> Screened {
        if self.stopping.load(Ordering::Relaxed) {
            return Screened::Refused("stopping");
        }
        match self.kernel.tables.screen(&self.kernel.isn, client, backend) {
            Ok(clamped) => Screened::Go(clamped.map(|clamped| WindowClamps {
                packet: Arc::clone(self),
                clamped,
            })),
            Err(HandoffError::Refused(reason)) => Screened::Refused(reason),
            // The screen installs nothing it does not remove itself.
            Err(HandoffError::Failed(e)) => {
                tracing::warn!("packet engine: screening a connection: {e:#}");
                Screened::Refused("socket_error")
            }
        }
    }

    /// Hands a frozen connection to the kernel on a blocking thread (the driver waits for the
    /// drain and an RCU grace period). `client` and `backend` are duplicates of the
    /// connection's descriptors; the originals stay with the task.
    pub async fn handoff(
        self: &Arc<Self>,
        (client, backend): (OwnedFd, OwnedFd),
        counts: [u64; 4],
        started_ns: u64,
        drain_timeout: Duration,
    ) -> Result<Outcome, anyhow::Error> {
        if self.stopping.load(Ordering::Relaxed) {
            return Ok(Outcome::Refused("stopping"));
        }
        let this = Arc::clone(self);
        let run = move || {
            let freeze = Freeze {
                client: client.as_fd(),
                backend: backend.as_fd(),
                read_from_client: counts[0],
                written_to_backend: counts[1],
                read_from_backend: counts[2],
                written_to_client: counts[3],
                started_ns,
            };
            let limits = HandoffLimits { drain_timeout };
            let Kernel { tables, isn } = &this.kernel;
            match tables.handoff(isn, &freeze, &limits) {
                Ok(handed) => {
                    let (duration, drained) = (handed.duration, handed.drained);
                    tracing::debug!(?duration, ?drained, up = ?handed.up, "packet handoff done");
                    let (wake, ended) = oneshot::channel();
                    // The sweeper looks only at registered connections: it never removes
                    // entries whose task it could not wake.
                    let since_ns = packet_expiry::monotonic_ns();
                    lock(&this.live).insert(
                        (handed.up, handed.handoff.client_cookie),
                        Live {
                            handed,
                            since_ns,
                            wake,
                        },
                    );
                    Ok(Outcome::HandedOff {
                        duration,
                        drained,
                        ended,
                    })
                }
                Err(HandoffError::Refused(reason)) => {
                    tracing::debug!(reason, "packet handoff refused");
                    Ok(Outcome::Refused(reason))
                }
                Err(HandoffError::Failed(e)) => {
                    tracing::debug!("packet handoff failed: {e:#}");
                    Err(e)
                }
            }
        };
        tokio::task::spawn_blocking(run)
            .await
            .context("the handoff thread panicked")?
    }

    /// One pass over the handed-off connections: each whose entries say it ended (see
    /// [`packet_expiry::decide`], which also says when: `linger` after both FINs, 1 s after a
    /// reset, `idle_timeout` without a segment), or every one when `stop`, is removed and its
    /// task woken. Returns the expiries made and the connections still handed off.
    pub fn sweep(&self, settings: &PacketSettings, stop: bool) -> (Vec<End>, usize) {
        let now_ns = packet_expiry::monotonic_ns();
        let kernel = &self.kernel;
        let mut live = lock(&self.live);
        let mut done = Vec::new();
        for (key, conn) in live.iter() {
            let entries = match kernel.tables.entries(&conn.handed.handoff) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("packet engine: reading a connection's entries: {e:#}");
                    continue;
                }
            };
            let end = match (&entries, stop) {
                (_, true) => Some(End::Stop),
                ([Some(up), Some(down)], false) => {
                    let seen = |flow: &Flow| Flow {
                        last_seen_ns: flow.last_seen_ns.max(conn.since_ns),
                        ..*flow
                    };
                    packet_expiry::decide(&seen(up), &seen(down), now_ns, settings)
                }
                // An entry gone without us: nothing translates this connection any more.
                _ => Some(End::Stop),
            };
            if let Some(end) = end {
                let [up, down] = entries;
                done.push((*key, Ended { end, up, down }));
            }
        }
        let mut ends = Vec::with_capacity(done.len());
        for (key, ended) in done {
            let Some(conn) = live.remove(&key) else {
                continue;
            };
            if let Err(e) = kernel.tables.remove(&conn.handed.handoff) {
                tracing::warn!("packet engine: removing a connection's entries: {e:#}");
            }
            ends.push(ended.end);
            // The task may be gone (the process is being cut): nothing to tell then.
            let _ = conn.wake.send(ended);
        }
        (ends, live.len())
    }

    /// The translation programs' counters summed over CPUs, by name, then spliced's counts
    /// of the ICMP messages it translated for them.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut counters = self.kernel.tables.counters();
        for (name, n) in ICMP_COUNTERS.iter().zip(&self.icmp_counts) {
            counters.push((name, n.load(Ordering::Relaxed)));
        }
        counters
    }

    /// Refuses new handoffs from now on.
    pub fn stop_handoffs(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Removes this process's pins of the packet maps (the maps themselves live on while this
    /// process holds them: on an upgrade its handed-off connections go on).
    pub fn unpin(&self) {
        let Some(dir) = lock(&self.pin_dir).take() else {
            return;
        };
        for pin in pins(&dir) {
            let _ = std::fs::remove_file(pin);
        }
        // Left when the sockmap side pinned nothing there.
        let _ = std::fs::remove_dir(dir);
    }

    /// Moves this process's pins into `dir` (on an upgrade they are made in a staging
    /// directory while the old process still holds `dir`), as `Kernel::move_pins` does.
    pub fn move_pins(&self, dir: &Path) -> Result<()> {
        let mut current = lock(&self.pin_dir);
        let Some(from) = current.clone() else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for pin in pins(&from) {
            if let Some(name) = pin.file_name() {
                let to = dir.join(name);
                std::fs::rename(&pin, &to)
                    .with_context(|| format!("moving {} to {}", pin.display(), to.display()))?;
            }
        }
        let _ = std::fs::remove_dir(&from);
        *current = Some(dir.to_path_buf());
        Ok(())
    }
}

/// The packet engine's pins in `dir`.
fn pins(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("SPLICED_PACKET_"))
        })
        .map(|e| e.path())
        .collect()
}

/// `CLOCK_BOOTTIME` in nanoseconds, for the time a connection was accepted.
pub fn boottime_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_BOOTTIME)
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock).map_or(0, |t| {
        u64::try_from(t.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
