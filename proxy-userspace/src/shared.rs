//! What every connection task reads and counts into: the routing snapshot, the eBPF side, the
//! connection ids, the counters and the access log.
//!
//! Its own module, below both [`crate::server`] (which builds it, swaps the routing on reload and
//! owns the tasks) and [`crate::conn`] (which serves one connection with it), so neither imports
//! the other for it; [`crate::metrics`] reads it too.
use std::{
    net::Ipv6Addr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    access,
    config::{Backend, Config, Protocol, Site, Tlvs},
    dns,
    ebpf::Kernel,
    forward::Engine,
    limits::PerSource,
    outcome::Outcome,
    packet_expiry::End,
    preface::Version,
    route::Router,
    shed::PreHello,
};

/// Routing state swapped as a whole on reload.
pub struct Routing {
    /// The configuration this routing was built from.
    pub config: Config,
    /// Its routing table.
    pub router: Router,
    /// The resolver for `[dns]` backends, with its cache (a reload starts an empty one).
    pub dns: Option<dns::Resolver>,
    /// What connections to DNS backends are served as (`site=dns` in the log): `[dns]`'s PROXY
    /// setting, `[defaults]`' header.
    pub dns_site: Option<Site>,
}

impl Routing {
    /// Builds the routing table for `config`, and its DNS resolver when `[dns]` is set (which
    /// fails when `resolv.conf` is needed and unreadable, or its thread cannot start).
    pub fn new(config: Config) -> Result<Routing> {
        let router = Router::new(&config);
        let dns = match &config.dns {
            Some(settings) => {
                // Listeners on a specific address are ours even if no interface shows it
                // (a service address being moved, for example).
                let listeners: Vec<_> = config.listeners.iter().map(|l| l.address.ip()).collect();
                let networks: Vec<_> = config.defaults.source_prefix.into_iter().collect();
                Some(
                    dns::Resolver::new(settings, &listeners, &networks)
                        .context("starting [dns]")?,
                )
            }
            None => None,
        };
        let dns_site = config.dns.as_ref().map(|settings| Site {
            name: "dns".into(),
            hostnames: Vec::new(),
            // Never used: the address comes from the lookup.
            backend: Backend::Addr {
                ip: Ipv6Addr::UNSPECIFIED.into(),
                port: None,
            },
            proxy_protocol: settings.proxy_protocol,
            tlvs: Tlvs {
                authority: settings.proxy_protocol == Version::V2,
                ..Tlvs::default()
            },
            forwarding: None,
            forwarded_header: config.defaults.forwarded_header,
            source: settings.source,
            origin: settings.origin.clone(),
        });
        Ok(Routing {
            config,
            router,
            dns,
            dns_site,
        })
    }
}

/// State every connection task reads.
pub struct Shared {
    routing: RwLock<Arc<Routing>>,
    kernel: Option<Arc<Kernel>>,
    /// The packet engine's kernel side, when `forwarding = "packet"` is configured.
    packet_kernel: Option<Arc<crate::packet::Packet>>,
    id_seed: u64,
    next_id: AtomicU64,
    /// Connections ended, indexed by [`Outcome::index`].
    outcomes: [AtomicU64; Outcome::ALL.len()],
    open: AtomicU64,
    fallbacks: AtomicU64,
    access_log: access::Log,
    pre_hello: PreHello,
    per_source: Arc<PerSource>,
    /// Connections ended, by the engine that carried them last, indexed as [`Engine::ALL`].
    engines: [AtomicU64; Engine::ALL.len()],
    /// Connections forwarding now, by the engine chosen for them, indexed as [`Engine::ALL`].
    open_engines: [AtomicU64; Engine::ALL.len()],
    /// The listeners bound at start (a reload does not change them).
    listeners: Vec<(std::net::SocketAddr, Protocol)>,
    /// The packet engine's counts, for `/metrics`.
    packet: PacketStats,
}

impl Shared {
    /// State for serving `config`, with the eBPF side if it was loaded, writing the access log
    /// to `access_log`. Fails if the OS has no randomness for the connection ids.
    pub fn with_log(
        config: Config,
        kernel: Option<Arc<Kernel>>,
        access_log: access::Log,
    ) -> Result<Shared> {
        let listeners = config
            .listeners
            .iter()
            .map(|l| (l.address, l.protocol))
            .collect();
        Ok(Shared {
            listeners,
            engines: std::array::from_fn(|_| AtomicU64::new(0)),
            open_engines: std::array::from_fn(|_| AtomicU64::new(0)),
            routing: RwLock::new(Arc::new(Routing::new(config)?)),
            kernel,
            packet_kernel: None,
            id_seed: getrandom::u64().context("drawing the connection-id seed from the OS")?,
            next_id: AtomicU64::new(0),
            outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
            open: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            access_log,
            pre_hello: PreHello::default(),
            per_source: Arc::default(),
            packet: PacketStats::default(),
        })
    }

    /// The packet engine's counts: refused handoffs, expiries, handoff times, entries, and
    /// (once the engine is loaded) its kernel counters.
    pub fn packet(&self) -> &PacketStats {
        &self.packet
    }

    /// The routing state new connections use.
    pub fn current(&self) -> Arc<Routing> {
        match self.routing.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Makes `routing` the state for connections accepted from now on.
    pub fn replace_routing(&self, routing: Routing) {
        let routing = Arc::new(routing);
        match self.routing.write() {
            Ok(mut guard) => *guard = routing,
            Err(poisoned) => *poisoned.into_inner() = routing,
        }
    }

    /// The loaded eBPF side, when the sockmap engine is available.
    pub fn kernel(&self) -> Option<&Arc<Kernel>> {
        self.kernel.as_ref()
    }

    /// With the packet engine's kernel side.
    pub fn with_packet(mut self, packet: Option<Arc<crate::packet::Packet>>) -> Shared {
        self.packet_kernel = packet;
        self
    }

    /// The packet engine's kernel side, when loaded.
    pub fn packet_kernel(&self) -> Option<&Arc<crate::packet::Packet>> {
        self.packet_kernel.as_ref()
    }

    /// A 128-bit connection id: a per-process random seed and a counter, so ids stay unique
    /// across restarts (the PROXY v2 UNIQUE_ID TLV and the access log's `id=`).
    pub fn next_id(&self) -> u128 {
        (u128::from(self.id_seed) << 64) | u128::from(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn open_connection(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(self))
    }

    /// Connections being served now.
    pub fn open_connections(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// The connections waiting for their hello, which are shed first under descriptor pressure.
    pub fn pre_hello(&self) -> &PreHello {
        &self.pre_hello
    }

    /// Open connections per source, for `max_connections_per_source`.
    pub fn per_source(&self) -> &Arc<PerSource> {
        &self.per_source
    }

    /// Counts a connection the sockmap engine could not take (it used another engine).
    pub fn count_fallback(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections the sockmap engine handed to another engine so far.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// The listeners bound at start, with their protocol.
    pub fn listeners(&self) -> &[(std::net::SocketAddr, Protocol)] {
        &self.listeners
    }

    /// Counts a connection that ended on `engine`.
    pub fn count_engine(&self, engine: Engine) {
        if let Some(i) = Engine::ALL.iter().position(|&e| e == engine) {
            self.engines[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection as forwarding on `engine` until the returned guard is dropped.
    pub fn open_on(&self, engine: Engine) -> OpenOn<'_> {
        let index = Engine::ALL.iter().position(|&e| e == engine);
        if let Some(i) = index {
            self.open_engines[i].fetch_add(1, Ordering::Relaxed);
        }
        OpenOn {
            shared: self,
            index,
        }
    }

    /// Connections forwarding on `engine` now (by the engine chosen for them: `sockmap`
    /// includes connections still on splice before their hand-off).
    pub fn open_on_engine(&self, engine: Engine) -> u64 {
        Engine::ALL
            .iter()
            .position(|&e| e == engine)
            .map_or(0, |i| self.open_engines[i].load(Ordering::Relaxed))
    }

    /// Connections ended on `engine` so far.
    pub fn engine_count(&self, engine: Engine) -> u64 {
        Engine::ALL
            .iter()
            .position(|&e| e == engine)
            .map_or(0, |i| self.engines[i].load(Ordering::Relaxed))
    }

    /// Counts a connection's outcome.
    pub fn count_outcome(&self, outcome: Outcome) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections ended with `outcome` so far.
    pub fn outcome_count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
    }

    /// Queues one access-log line; never blocks (see [`access::Log`]).
    pub fn access_log(&self, entry: &access::Entry<'_>) {
        self.access_log.write(entry);
    }

    /// Has the access log's file opened anew (SIGUSR1, for logrotate). Blocks while its queue
    /// is full: call it from a thread that may block.
    pub fn reopen_access_log(&self) {
        self.access_log.reopen();
    }

    /// Access-log lines dropped because the writer could not keep up.
    pub fn access_log_dropped(&self) -> u64 {
        self.access_log.dropped()
    }

    /// Waits, for at most `limit`, until every access-log line queued so far is written. Blocks
    /// the calling thread: call it from a thread that may block.
    pub fn flush_access_log(&self, limit: Duration) {
        self.access_log.flush(limit);
    }
}

/// Why a handoff to the packet engine can be refused (`docs/packet-engine.md`, section 9):
/// listed in `/metrics` from zero. Other reasons count too, from their first use.
pub const PACKET_REFUSALS: [&str; 11] = [
    "http_rewrite",
    "half_closed",
    "ts_client_only",
    "accecn",
    "ip_options",
    "mss_backend_small",
    "local_peer",
    "no_program_on_interface",
    "no_isn",
    "table_full",
    "not_quiet",
];

/// Upper bounds of the `spliced_packet_handoff_seconds` buckets: as written in `/metrics`,
/// and in nanoseconds. From 100 µs (a handoff with nothing in flight) to 5 s (the drain
/// waits for a pipe to empty, up to 1 s, `not_quiet`).
pub const HANDOFF_BUCKETS: [(&str, u64); 15] = [
    ("0.0001", 100_000),
    ("0.00025", 250_000),
    ("0.0005", 500_000),
    ("0.001", 1_000_000),
    ("0.0025", 2_500_000),
    ("0.005", 5_000_000),
    ("0.01", 10_000_000),
    ("0.025", 25_000_000),
    ("0.05", 50_000_000),
    ("0.1", 100_000_000),
    ("0.25", 250_000_000),
    ("0.5", 500_000_000),
    ("1", 1_000_000_000),
    ("2.5", 2_500_000_000),
    ("5", 5_000_000_000),
];

/// Reads the packet engine's kernel counters (summed over CPUs), by name: what
/// `PacketTables::counters` returns.
type CounterReader = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// The packet engine's counts, for `/metrics`. The connection tasks and the sweeper count into
/// it; the code that loads the engine hands it the kernel counters with
/// [`PacketStats::set_counters`], which is also what makes `/metrics` show the engine.
#[derive(Default)]
pub struct PacketStats {
    /// Refused handoffs by reason, in order of first use after [`PACKET_REFUSALS`].
    refused: Mutex<Vec<(&'static str, u64)>>,
    /// Pairs removed, indexed as [`End::ALL`].
    expiries: [AtomicU64; End::ALL.len()],
    /// Handoffs by duration: the count of each bucket of [`HANDOFF_BUCKETS`] alone (not
    /// cumulative), then those longer than the last.
    handoff_buckets: [AtomicU64; HANDOFF_BUCKETS.len() + 1],
    /// The sum of every handoff's duration, in nanoseconds.
    handoff_ns: AtomicU64,
    /// Connections in the table (a gauge the sweeper sets).
    entries: AtomicU64,
    /// The kernel counters, once the engine is loaded.
    counters: RwLock<Option<CounterReader>>,
}

impl PacketStats {
    /// Counts a connection whose handoff was refused for `reason` (section 9's names, or any
    /// other the driver gives).
    pub fn count_refused(&self, reason: &'static str) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match refused.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => refused.push((reason, 1)),
        }
    }

    /// Counts a connection whose entries were removed because of `end`.
    pub fn count_expiry(&self, end: End) {
        if let Some(i) = End::ALL.iter().position(|&e| e == end) {
            self.expiries[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records how long one handoff took (from the freeze to `ACTIVE`).
    pub fn observe_handoff(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = HANDOFF_BUCKETS
            .iter()
            .position(|&(_, bound)| ns <= bound)
            .unwrap_or(HANDOFF_BUCKETS.len());
        self.handoff_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.handoff_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Sets the number of connections in the table.
    pub fn set_entries(&self, connections: u64) {
        self.entries.store(connections, Ordering::Relaxed);
    }

    /// Hands over the reader of the kernel counters (e.g. a closure calling
    /// `PacketTables::counters`); from then on `/metrics` shows the packet engine. A second
    /// call replaces the first reader.
    pub fn set_counters(
        &self,
        read: impl Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static,
    ) {
        let mut slot = self.counters.write().unwrap_or_else(|p| p.into_inner());
        *slot = Some(Box::new(read));
    }

    /// Whether the engine is loaded (its counters were handed over).
    pub fn loaded(&self) -> bool {
        self.counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The kernel counters by name; empty while the engine is not loaded.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or_else(Vec::new, |read| read())
    }

    /// Refused handoffs by reason: every reason of [`PACKET_REFUSALS`] (from zero), then any
    /// other in order of first use.
    pub fn refused(&self) -> Vec<(&'static str, u64)> {
        let counted = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let count = |reason: &str| {
            counted
                .iter()
                .find(|(r, _)| *r == reason)
                .map_or(0, |&(_, n)| n)
        };
        PACKET_REFUSALS
            .iter()
            .map(|&reason| (reason, count(reason)))
            .chain(
                counted
                    .iter()
                    .filter(|(r, _)| !PACKET_REFUSALS.contains(r))
                    .copied(),
            )
            .collect()
    }

    /// Pairs removed because of `end` so far.
    pub fn expiries(&self, end: End) -> u64 {
        End::ALL
            .iter()
            .position(|&e| e == end)
            .map_or(0, |i| self.expiries[i].load(Ordering::Relaxed))
    }

    /// Connections in the table, as last set.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// Handoffs at or under each bound of [`HANDOFF_BUCKETS`] (cumulative, as Prometheus
    /// wants), then every handoff (`+Inf`), and the sum of their durations in nanoseconds.
    pub fn handoffs(&self) -> (Vec<u64>, u64) {
        let mut total = 0;
        let mut cumulative: Vec<u64> = self
            .handoff_buckets
            .iter()
            .map(|n| {
                total += n.load(Ordering::Relaxed);
                total
            })
            .collect();
        // The last slot (over the largest bound) makes the `+Inf` count.
        cumulative.truncate(HANDOFF_BUCKETS.len());
        cumulative.push(total);
        (cumulative, self.handoff_ns.load(Ordering::Relaxed))
    }
}

/// A connection counted in [`Shared::open_on_engine`] while this lives.
pub struct OpenOn<'a> {
    shared: &'a Shared,
    index: Option<usize>,
}

impl Drop for OpenOn<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.index {
            self.shared.open_engines[i].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A connection counted in [`Shared::open_connections`] while this lives.
pub struct OpenConnection(Arc<Shared>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `Shared` for a configuration without sites, logging into `log`.
    pub(crate) fn shared(log: access::Log) -> Shared {
        let text = "[[listen]]\naddress = \"127.0.0.1:443\"\nprotocol = \"tls\"\n";
        let config = Config::from_str(text, std::path::Path::new("test.toml")).expect("config");
        Shared::with_log(config, None, log).expect("getrandom")
    }
}
