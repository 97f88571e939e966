//! Loading the eBPF object: programs loaded and attached, maps taken and pinned under bpffs
//! (with BTF, so bpftool shows them by field name), the programs' log records, and the
//! per-CPU counters. Dropping the [`Kernel`] unloads everything and removes its pins.
use std::{collections::HashMap as StdHashMap, path::Path, sync::Mutex};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{Iter, SkSkb},
};
use proxy_common::{
    Counter, MAP_COUNTERS, MAP_DETACH, MAP_EVENTS, MAP_HOLD, MAP_OFFSETS, MAP_PACKET_CONTROL,
    MAP_PACKET_FLOWS, MAP_PACKET_ICMP, MAP_PACKET_ISN, MAP_PEERS, MAP_SOCKETS, MAP_WAKE,
    MAP_XDP_BUCKETS, MAP_XDP_COUNTERS, MAP_XDP_DENY4, MAP_XDP_DENY6, MAP_XDP_LIMIT, MAP_XDP_PORTS,
    PROG_DETACH, PROG_STREAM_VERDICT, SkbOffsets,
};
use tokio::io::unix::AsyncFd;

use super::{Kernel, lock, sockmap::Maps, sum_per_cpu, xdp::XdpMaps};

/// The eBPF object built by `build.rs` from the `proxy-ebpf` crate.
#[cfg(not(spliced_no_ebpf))]
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));
#[cfg(spliced_no_ebpf)]
pub(super) static OBJECT: &[u8] = &[];

/// Diagnostic only: when set in spliced's environment, the verdict is loaded without the
/// offsets it trims already-forwarded bytes with, which reproduces the kernel defect described
/// in `docs/sockmap-duplication.md`.
pub const DIAG_NO_TRIM: &str = "SPLICED_DIAG_NO_TRIM";

/// Where bpffs is mounted normally.
const BPFFS: &str = "/sys/fs/bpf";

impl Kernel {
    /// Loads the object, attaches the stream-verdict program to the socket hash and, if
    /// `pin_dir` is given, pins every map there (replacing stale pins from a crashed run).
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        anyhow::ensure!(
            !OBJECT.is_empty(),
            "this binary was built without its eBPF object"
        );
        // The packet engine's maps are not used by this kernel side yet: one entry each, so
        // they cost no memory (the LRU map is preallocated in full).
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(MAP_PACKET_FLOWS, 1)
            .map_max_entries(MAP_PACKET_CONTROL, 1)
            .map_max_entries(MAP_PACKET_ISN, 1)
            // A ring buffer's size is a multiple of the page size: one page.
            .map_max_entries(MAP_PACKET_ICMP, 4096)
            .load(OBJECT)
            .context("loading the eBPF object into the kernel")?;
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
        let maps = Maps {
            socks: take(&mut ebpf, MAP_SOCKETS)?.try_into()?,
            hold: take(&mut ebpf, MAP_HOLD)?.try_into()?,
            peers: take(&mut ebpf, MAP_PEERS)?.try_into()?,
            detach: take(&mut ebpf, MAP_DETACH)?.try_into()?,
            wake: take(&mut ebpf, MAP_WAKE)?.try_into()?,
        };
        let counters = take(&mut ebpf, MAP_COUNTERS)?.try_into()?;
        let events = take(&mut ebpf, MAP_EVENTS)?.try_into()?;
        let xdp = XdpMaps {
            deny4: take(&mut ebpf, MAP_XDP_DENY4)?.try_into()?,
            deny6: take(&mut ebpf, MAP_XDP_DENY6)?.try_into()?,
            ports: take(&mut ebpf, MAP_XDP_PORTS)?.try_into()?,
            limit: take(&mut ebpf, MAP_XDP_LIMIT)?.try_into()?,
            counters: take(&mut ebpf, MAP_XDP_COUNTERS)?.try_into()?,
            _buckets: take(&mut ebpf, MAP_XDP_BUCKETS)?.try_into()?,
            attached: Vec::new(),
            links: Vec::new(),
        };
        // The verdict trims bytes it already forwarded (see `btf`); without the offsets it
        // would forward them twice, so the engine is not offered at all.
        let offsets = super::btf::skb_offsets()
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
        let fd = maps.socks.fd().try_clone()?;
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
            maps: Mutex::new(maps),
            counters,
            events: Mutex::new(Some(events)),
            logger: Mutex::new(logger),
            watchers: Mutex::new(StdHashMap::new()),
            xdp: Mutex::new(xdp),
            pins: Mutex::new(pins),
        })
    }

    /// Starts the tasks that pass the programs' log records to our log and their progress
    /// events to the connections they belong to. Call once, inside the runtime.
    pub fn spawn_event_reader(self: &std::sync::Arc<Self>) -> Result<()> {
        self.spawn_log_pump()?;
        self.spawn_progress_reader()
    }

    fn spawn_log_pump(&self) -> Result<()> {
        let Some(logger) = lock(&self.logger).take() else {
            return Ok(());
        };
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
        Ok(())
    }

    /// Kernel-side counters summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| (c.name(), sum_per_cpu(&self.counters, c as u32)))
            .collect()
    }
}

impl Kernel {
    /// Removes this process's pins and forgets them: on an upgrade, the new process pins its
    /// own maps there. The maps live on while this process holds them, so its kernel-spliced
    /// connections go on (bpftool still finds the maps by id).
    pub fn unpin(&self) {
        let pins = std::mem::take(&mut *lock(&self.pins));
        remove_pins(&pins);
    }

    /// Moves this process's pins into `dir` (made if missing), keeping their names: on an
    /// upgrade they are made in a staging directory while the old process still holds `dir`.
    /// bpffs renames atomically.
    pub fn move_pins(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut pins = lock(&self.pins);
        let staging = pins.first().and_then(|p| p.parent()).map(Path::to_path_buf);
        for pin in pins.iter_mut() {
            let Some(name) = pin.file_name() else {
                continue;
            };
            let to = dir.join(name);
            std::fs::rename(&*pin, &to)
                .with_context(|| format!("moving {} to {}", pin.display(), to.display()))?;
            *pin = to;
        }
        if let Some(staging) = staging {
            let _ = std::fs::remove_dir(staging);
        }
        Ok(())
    }
}

/// Removes `pins` and then their directory, if that is left empty.
fn remove_pins(pins: &[std::path::PathBuf]) {
    for pin in pins {
        let _ = std::fs::remove_file(pin);
    }
    if let Some(dir) = pins.first().and_then(|p| p.parent()) {
        let _ = std::fs::remove_dir(dir);
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        remove_pins(&lock(&self.pins));
    }
}

/// Mounts bpffs on `/sys/fs/bpf` when `dir` is under it and nothing is mounted there:
/// `ip netns exec` gives its command a fresh `/sys` without one.
pub(crate) fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new(BPFFS);
    if !dir.starts_with(root) {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPFFS))
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
