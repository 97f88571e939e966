//! What every connection task reads and counts into: the routing snapshot, the eBPF side, the
//! connection ids, the counters and the access log.
//!
//! Its own module, below both [`crate::server`] (which builds it, swaps the routing on reload and
//! owns the tasks) and [`crate::conn`] (which serves one connection with it), so neither imports
//! the other for it; [`crate::metrics`] reads it too.
use std::{
    net::Ipv6Addr,
    sync::{
        Arc, RwLock,
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
    packet: Option<Arc<crate::packet::Packet>>,
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
            packet: None,
            id_seed: getrandom::u64().context("drawing the connection-id seed from the OS")?,
            next_id: AtomicU64::new(0),
            outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
            open: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            access_log,
            pre_hello: PreHello::default(),
            per_source: Arc::default(),
        })
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
        self.packet = packet;
        self
    }

    /// The packet engine's kernel side, when loaded.
    pub fn packet(&self) -> Option<&Arc<crate::packet::Packet>> {
        self.packet.as_ref()
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
