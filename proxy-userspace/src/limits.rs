//! Connection limits that fail politely, and the descriptor limit they need.
//!
//! Over `max_connections` (global) or `max_connections_per_source`, a connection is accepted
//! and closed at once, counted under its own outcome, and logged; everyone else goes on being
//! served. Accepting and closing, rather than leaving it in the kernel's accept queue, tells the
//! client at once instead of after its connect timeout, and keeps the queue for those who fit
//! (HAProxy's `tcp-request connection reject` does the same).
//!
//! The per-source count is a function of the client address the connection carries: today
//! the peer address; once spliced reads PROXY headers from a balancer in front of it, the
//! address from the header, by calling [`PerSource::enter`] after reading it.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
};

/// Descriptors one connection may hold: the client's socket, the backend's, and a pipe (two
/// descriptors) per direction with the splice engine.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 6;

/// Descriptors the process needs besides its connections: listeners, the metrics endpoint,
/// the eBPF maps and programs, event loops, the standard streams, and the splice engine's pool
/// of spare pipes (64 pipes, 128 descriptors).
pub const DESCRIPTORS_BESIDES: u64 = 256;

/// The `RLIMIT_NOFILE` that `max_connections` connections need: each at most
/// [`DESCRIPTORS_PER_CONNECTION`], plus [`DESCRIPTORS_BESIDES`], plus the reserve kept free
/// below the limit for shedding ([`crate::shed::reserve_for`]).
pub fn descriptors_needed(max_connections: usize) -> u64 {
    let base = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_mul(DESCRIPTORS_PER_CONNECTION)
        .saturating_add(DESCRIPTORS_BESIDES);
    base.saturating_add(crate::shed::reserve_for(base))
}

/// What raising the descriptor limit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit wanted.
    pub asked: u64,
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now.
    pub obtained: u64,
    /// The hard limit, which an unprivileged process cannot pass (and which spliced does not
    /// raise: the service manager sets it, e.g. systemd's `LimitNOFILE`).
    pub hard: u64,
}

/// The soft limit to set for `asked` descriptors under `soft`/`hard`: never lowered, never
/// above the hard limit.
pub fn nofile_target(asked: u64, soft: u64, hard: u64) -> u64 {
    asked.min(hard).max(soft)
}

/// Raises the soft `RLIMIT_NOFILE` towards `asked`, up to the hard limit; never lowers it.
pub fn raise_nofile(asked: u64) -> std::io::Result<Nofile> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = nofile_target(asked, soft, hard);
    if target != soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    let (obtained, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(Nofile {
        asked,
        before: soft,
        obtained,
        hard,
    })
}

/// Which sources share a per-source count: an IPv4 address (an IPv4-mapped IPv6 address counts
/// as the IPv4 one), or an IPv6 /64, since one IPv6 client usually holds a whole /64 (the XDP
/// filter's SYN limit counts the same way).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

/// Open connections per source.
#[derive(Default)]
pub struct PerSource {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerSource {
    /// Counts a connection from `client` if its source has fewer than `limit` open (always,
    /// without a limit); `None` if it is over. The count drops when the slot is dropped.
    pub fn enter(self: &Arc<Self>, client: IpAddr, limit: Option<usize>) -> Option<SourceSlot> {
        let key = source_key(client);
        let mut open = match self.open.lock() {
            Ok(open) => open,
            Err(poisoned) => poisoned.into_inner(),
        };
        let count = open.entry(key).or_insert(0);
        if limit.is_some_and(|limit| *count >= limit) {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            owner: Arc::clone(self),
            key,
        })
    }

    /// Connections open from `client`'s source.
    #[cfg(test)]
    fn open(&self, client: IpAddr) -> usize {
        self.open
            .lock()
            .map_or(0, |o| o.get(&source_key(client)).copied().unwrap_or(0))
    }

    /// Sources with an open connection.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.open.lock().map_or(0, |o| o.len())
    }
}

/// One connection counted for its source, until dropped.
pub struct SourceSlot {
    owner: Arc<PerSource>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = match self.owner.open.lock() {
            Ok(open) => open,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Forget sources with nothing open, so the map stays as small as the open connections.
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|_| unreachable!("{text}"))
    }

    #[test]
    fn a_source_gets_its_limit_and_no_more_and_others_are_apart() {
        let sources = Arc::new(PerSource::default());
        let a = ip("192.0.2.2");
        let mut slots: Vec<_> = (0..3).filter_map(|_| sources.enter(a, Some(3))).collect();
        assert_eq!(slots.len(), 3);
        assert!(sources.enter(a, Some(3)).is_none(), "the fourth from a");
        let b = sources.enter(ip("192.0.2.3"), Some(3));
        assert!(b.is_some(), "another source is apart");
        slots.pop();
        assert_eq!(sources.open(a), 2);
        assert!(sources.enter(a, Some(3)).is_some(), "a slot was freed");
        drop(b);
        assert_eq!(sources.sources(), 1, "an empty source is forgotten");
    }

    #[test]
    fn without_a_limit_everything_is_counted_and_admitted() {
        let sources = Arc::new(PerSource::default());
        let a = ip("192.0.2.2");
        let slots: Vec<_> = (0..100).filter_map(|_| sources.enter(a, None)).collect();
        assert_eq!(slots.len(), 100);
        assert_eq!(sources.open(a), 100);
        drop(slots);
        assert_eq!(sources.sources(), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_key(ip("2001:db8:1:2:bbbb::9")),
            source_key(ip("2001:db8:1:2::7"))
        );
        assert_ne!(source_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(source_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let sources = Arc::new(PerSource::default());
        let _one = sources.enter(ip("2001:db8:1:2::1"), Some(1));
        assert!(sources.enter(ip("2001:db8:1:2::2"), Some(1)).is_none());
        assert!(sources.enter(ip("::ffff:192.0.2.7"), Some(1)).is_some());
    }

    #[test]
    fn descriptors_follow_the_connection_limit() {
        // 10,000 connections: 60,256 plus a reserve of 512.
        assert_eq!(descriptors_needed(10_000), 60_768);
        // 100: 856 plus an eighth of it.
        assert_eq!(descriptors_needed(100), 856 + 107);
        assert_eq!(descriptors_needed(usize::MAX), u64::MAX);
    }

    #[test]
    fn the_soft_limit_is_raised_up_to_the_hard_one_and_never_lowered() {
        assert_eq!(nofile_target(5000, 1024, 524_288), 5000);
        assert_eq!(nofile_target(5000, 1024, 4096), 4096);
        assert_eq!(nofile_target(500, 1024, 4096), 1024);
        assert_eq!(nofile_target(500, 96, 96), 96);
    }
}
