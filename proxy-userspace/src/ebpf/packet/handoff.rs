//! The handoff driver (`docs/packet-engine.md`, section 3.4, steps 2 to 8): from a frozen
//! connection to two `ACTIVE` entries and two silent local sockets, on a blocking thread.
use std::{os::fd::BorrowedFd, time::Duration};

use proxy_common::FlowKey;

use super::{Handoff, IsnRecorder, PacketTables};

/// A connection ready to be handed off: spliced stopped forwarding both ways with nothing
/// buffered in between.
pub struct Freeze<'a> {
    /// L, accepted, IPv4 (or IPv4-mapped).
    pub client: BorrowedFd<'a>,
    /// L', connected, IPv6.
    pub backend: BorrowedFd<'a>,
    /// Bytes spliced read from L (the hello included).
    pub read_from_client: u64,
    /// Bytes spliced wrote to L' (the PROXY header and the hello included).
    pub written_to_backend: u64,
    /// Bytes spliced read from L'.
    pub read_from_backend: u64,
    /// Bytes spliced wrote to L.
    pub written_to_client: u64,
    /// `CLOCK_BOOTTIME` at accept, nanoseconds.
    pub started_ns: u64,
}

/// Bounds of one handoff.
pub struct HandoffLimits {
    /// How long the drain (rule F and quiescence) may take before the connection is given up.
    pub drain_timeout: Duration,
}

/// Why a handoff did not happen.
#[derive(Debug)]
pub enum HandoffError {
    /// Nothing was installed; the caller goes on with splice. A reason of design section 9.
    Refused(&'static str),
    /// Entries had been installed; the connection is lost (drain timeout, ...). The entries
    /// are removed.
    Failed(anyhow::Error),
}

impl std::fmt::Display for HandoffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoffError::Refused(reason) => write!(f, "handoff refused: {reason}"),
            HandoffError::Failed(e) => write!(f, "handoff failed: {e:#}"),
        }
    }
}

impl std::error::Error for HandoffError {}

/// A connection the kernel now carries.
pub struct HandedOff {
    /// What the entries were built from.
    pub handoff: Handoff,
    /// The key of the client's entry (`E_up`).
    pub up: FlowKey,
    /// The key of the backend's entry (`E_down`).
    pub down: FlowKey,
    /// From the call to `ACTIVE`.
    pub duration: Duration,
    /// Bytes moved by rule F during the drain (client to backend, backend to client).
    pub drained: (u64, u64),
}

impl PacketTables {
    /// Hands a frozen connection to the kernel (design 3.4, steps 2 to 8). Blocks for up to
    /// `limits.drain_timeout`. After `Ok` the caller keeps `freeze.backend` open (it guards
    /// the ephemeral port) and closes `freeze.client` (silent: it is in repair mode).
    pub fn handoff(
        &mut self,
        isn: &mut IsnRecorder,
        freeze: &Freeze,
        limits: &HandoffLimits,
    ) -> Result<HandedOff, HandoffError> {
        let _ = (isn, freeze, limits);
        Err(HandoffError::Refused("not_implemented"))
    }
}
