//! The packet engine's kernel side, as far as it exists (`docs/packet-engine.md`, "Order of
//! work"): the `sock_ops` program that records every connection's ISNs.
//!
//! It loads its own copy of the object, apart from [`super::Kernel`], because nothing in the
//! proxy uses it yet: the end-to-end tests drive it directly to check the kernel facts the
//! engine rests on. The handoff will move it into the [`super::Kernel`].
use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError},
    programs::{CgroupAttachMode, SockOps},
};
use proxy_common::{IsnPair, MAP_PACKET_ISN, PROG_PACKET_ISN};

use super::load::OBJECT;

/// `spliced_packet_isn` attached to one cgroup (v2), and its map of ISNs by socket cookie.
/// Dropping it detaches the program and frees the map.
pub struct IsnRecorder {
    /// Owns the program and its link to the cgroup.
    _ebpf: Ebpf,
    isn: HashMap<MapData, u64, IsnPair>,
}

impl IsnRecorder {
    /// Loads the object and attaches the `sock_ops` program to the cgroup v2 directory
    /// `cgroup`: every TCP socket created by a process of that cgroup (or of one below it)
    /// has its ISNs recorded when it becomes established.
    pub fn attach(cgroup: &Path) -> Result<Self> {
        anyhow::ensure!(
            !OBJECT.is_empty(),
            "this binary was built without its eBPF object"
        );
        let mut ebpf = Ebpf::load(OBJECT).context("loading the eBPF object into the kernel")?;
        let isn = ebpf
            .take_map(MAP_PACKET_ISN)
            .with_context(|| format!("map {MAP_PACKET_ISN} missing from the object"))?
            .try_into()?;
        let prog: &mut SockOps = ebpf
            .program_mut(PROG_PACKET_ISN)
            .with_context(|| format!("program {PROG_PACKET_ISN} missing from the object"))?
            .try_into()?;
        prog.load()
            .context("the verifier rejected the sock_ops program")?;
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        prog.attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {PROG_PACKET_ISN} to {}", cgroup.display()))?;
        Ok(IsnRecorder { _ebpf: ebpf, isn })
    }

    /// The ISNs recorded for the socket with this cookie, if any.
    pub fn get(&self, cookie: u64) -> Result<Option<IsnPair>> {
        match self.isn.get(&cookie, 0) {
            Ok(pair) => Ok(Some(pair)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading the ISN map"),
        }
    }

    /// Forgets the socket with this cookie (the engine reads an entry once, at handoff).
    pub fn forget(&mut self, cookie: u64) -> Result<()> {
        match self.isn.remove(&cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("deleting from the ISN map"),
        }
    }
}
