//! spliced's kernel side: the eBPF object, its maps and programs, owned by one [`Kernel`].
//!
//! - [`load`]: loading the object, pinning the maps under bpffs, the eBPF log pump, the kernel
//!   counters; unpinning on drop.
//! - [`sockmap`]: the socket maps of the sockmap engine: a `SplicedPair` puts a connection's two
//!   sockets in, in the order the verdict needs, and takes them out when dropped; the progress
//!   events that wake a connection.
//! - [`xdp`]: the edge filter's maps and attachments.
//! - [`packet`]: the packet engine's programs, driven by the end-to-end tests until the engine
//!   exists.
//!
//! Socket options the engine reads (`SO_COOKIE`, `TCP_INFO`...) are in [`crate::sys`].
use std::{
    collections::HashMap as StdHashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use tokio::sync::Notify;

mod btf;
mod load;
mod packet;
mod sockmap;
mod xdp;

pub(crate) use load::ensure_bpffs;
pub use packet::{
    Clamped, Freeze, HandedOff, Handoff, HandoffError, HandoffLimits, IsnRecorder, PacketTables,
    SocketClock, Wscale, peer_key,
};
pub(crate) use sockmap::SplicedPair;

/// The loaded programs and maps; dropping it detaches and unloads everything and removes the
/// pins it made.
pub struct Kernel {
    /// The object; its `iter/tcp` program is run under this lock, one walk at a time.
    ebpf: Mutex<Ebpf>,
    maps: Mutex<sockmap::Maps>,
    counters: PerCpuArray<MapData, u64>,
    events: Mutex<Option<RingBuf<MapData>>>,
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    watchers: Mutex<StdHashMap<u64, Arc<Notify>>>,
    xdp: Mutex<xdp::XdpMaps>,
    /// The pins this process made and removes when dropped (an upgrade moves or releases
    /// them first).
    pins: Mutex<Vec<PathBuf>>,
}

/// Locks `m`, taking the data of a poisoned lock as it is: every critical section here is a
/// single map operation that leaves nothing half-done.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A per-CPU counter summed over CPUs (0 if it cannot be read).
fn sum_per_cpu(array: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    array
        .get(&index, 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(0)
}
