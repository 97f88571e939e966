//! The configuration file: parsing, includes, validation with file and line.
//!
//! The file is TOML (see DESIGN.md, "Configuration"). Everything is validated before use, and
//! every error carries the file, line and column of the offending value, so `spliced check` can
//! be pointed at a directory of customer files and say exactly which one is wrong.
//!
//! # Includes
//!
//! `include = ["sites/*.toml", "other.toml"]` at the top level of a file reads more files. Paths
//! and globs are relative to the directory of the file that names them. Glob results are sorted,
//! so the order sites are read in (and which of two duplicates is reported as the second) does
//! not depend on the file system. Hidden files (`.name`) are not matched by wildcards, which
//! keeps editor backups out. A glob that matches nothing is fine (a new host with no customers
//! yet); a plain path that does not exist is an error.
//!
//! Included files may contain `[[site]]` entries and `include` only: listeners, `[defaults]`,
//! `[default]`, `[xdp]`, `[dns]` and `[packet]` belong to the main file, so one file decides how
//! the proxy runs. Nested includes are allowed (a customer directory can have its own index
//! file); a file that includes itself directly or through others is an error that prints the
//! cycle, and so is a file included twice by overlapping patterns, because reading it twice
//! would define its hostnames twice.
//!
//! Sites are collected depth-first: a file's own `[[site]]` entries, then its includes in the
//! order listed.

mod diff;
mod load;
mod parse;
mod raw;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::preface::Version;

pub use diff::Table;

/// A validated configuration: what the proxy listens on and where each name goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Settings that apply unless a listener or site overrides them.
    pub(crate) defaults: Defaults,
    /// The `[[listen]]` entries, in file order; at least one, addresses unique.
    pub(crate) listeners: Vec<Listener>,
    /// Every `[[site]]` from the main file and its includes; no hostname appears twice.
    pub(crate) sites: Vec<Site>,
    /// The `[default]` site, for unknown and missing names; `None` refuses them.
    pub(crate) default_site: Option<Site>,
    /// Every file read, main file first, for the summary.
    pub(crate) files: Vec<PathBuf>,
    /// The `[xdp]` edge filter; `None` attaches nothing.
    pub(crate) xdp: Option<Xdp>,
    /// `[dns]`: backends for names no site claims, on listeners with `backend = "dns"`.
    pub(crate) dns: Option<Dns>,
    /// `[packet]`: the packet engine's settings (the defaults when the section is absent).
    pub(crate) packet: PacketSettings,
}

/// `[packet]`: how the packet engine (`forwarding = "packet"`, `docs/packet-engine.md`
/// section 8) attaches and when its table entries expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketSettings {
    /// Interfaces the TC programs attach to, in file order, no duplicates; empty means every
    /// interface that is up and has a global address, except `lo`.
    pub interfaces: Vec<String>,
    /// Bytes moved by splice (both directions together) before the handoff; 0 hands off right
    /// after the preface.
    pub after: u64,
    /// Connections the table holds at once: at most [`proxy_common::PACKET_MAX_CONNECTIONS`]
    /// (the map's size), which is also the default. Read at start: a reload does not change it.
    pub max_connections: u32,
    /// A handed-off connection with no segment either way for this long is removed without
    /// telling the peers (default 1h).
    pub idle_timeout: Duration,
    /// How long a connection's entries stay after both FINs are acknowledged, to translate a
    /// FIN retransmitted because the last ACK was lost (default 10s).
    pub linger: Duration,
    /// How long a handoff may wait for the local sockets to drain (default 30s).
    pub drain_timeout: Duration,
    /// On a normal stop, leave programs and maps pinned for the next spliced instead of
    /// deleting the entries (default false).
    pub keep_on_stop: bool,
    /// The MSS clamped on the listener's and the backend's sockets; `None` derives it from the
    /// interfaces' MTU. 536..=65495 when set.
    pub mss: Option<u16>,
    /// The bytes (both directions together) an `auto` connection moves before it is offered
    /// to the engine: the section's `after`, when the file sets it. `None` otherwise, and
    /// `auto` then never loads nor uses the engine: the crossover bench of 2026-12-06
    /// (`docs/benchmarks.md`) found no size up to 16 MiB where a handoff in the middle of a
    /// download paid (it costs the backend about one retransmission timeout), so there is no
    /// default that would make `auto` faster.
    pub auto_after: Option<u64>,
}

impl Default for PacketSettings {
    /// The values used when `[packet]` or one of its keys is left out.
    fn default() -> Self {
        PacketSettings {
            interfaces: Vec::new(),
            after: 0,
            max_connections: proxy_common::PACKET_MAX_CONNECTIONS,
            idle_timeout: Duration::from_secs(3600),
            linger: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            keep_on_stop: false,
            mss: None,
            auto_after: None,
        }
    }
}

/// `[dns]`: where names that no site claims are looked up (AAAA), and the fence their answers
/// must lie in. Used by listeners whose backend is `"dns"` (their own `backend` key, or
/// `[defaults]`'s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// IPv6 networks a resolved backend must lie in; at least one. Whatever the networks,
    /// loopback, link-local, multicast, unspecified, IPv4-mapped or -compatible addresses and
    /// the proxy's own addresses are never used.
    pub allowed_backends: Vec<Cidr>,
    /// Name servers to ask (port 53 unless given); `None` reads `/etc/resolv.conf`.
    pub servers: Option<Vec<SocketAddr>>,
    /// How long one lookup may take, at most `connect_timeout` (default 1s, or
    /// `connect_timeout` when that is shorter).
    pub timeout: Duration,
    /// The shortest time an answer is kept, whatever its TTL (default 5s).
    pub ttl_floor: Duration,
    /// The longest time an answer is kept, whatever its TTL (default 5m).
    pub ttl_ceiling: Duration,
    /// How long a failure (no such name, no allowed address, a timeout) is kept (default 5s).
    pub negative_ttl: Duration,
    /// The PROXY header sent to every DNS backend (default none); the v2 header carries the
    /// name (`PP2_TYPE_AUTHORITY`).
    pub proxy_protocol: Version,
    /// The source address of connections to DNS backends, as a site's `source`.
    pub source: SourceAddress,
    /// Where `[dns]` was declared.
    pub origin: Origin,
}

/// `[defaults]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// The forwarding engine unless a listener or site overrides it.
    pub forwarding: Forwarding,
    /// How long a client may take to send its complete ClientHello or request head.
    pub client_hello_timeout: Duration,
    /// How long connecting to a backend may take.
    pub connect_timeout: Duration,
    /// Close a connection idle in both directions for this long; `None` (or `"0"`) never does.
    pub idle_timeout: Option<Duration>,
    /// The most client connections open at once; further ones are accepted and closed at once
    /// (`outcome=over_max_connections`). Read at start: a reload does not change it.
    pub max_connections: usize,
    /// The most connections open at once from one source (an IPv4 address, or an IPv6 /64);
    /// further ones from it are accepted and closed at once
    /// (`outcome=over_max_connections_per_source`). `None` limits nothing. Reloadable.
    pub max_connections_per_source: Option<usize>,
    /// Bytes a sockmap-spliced peer may have queued before its sender is paused (DESIGN.md,
    /// sockmap fact 7).
    pub sockmap_backlog_limit: u64,
    /// Bytes a direction moves with `splice(2)` before it is handed to the kernel path (the
    /// sockmap engine, and `auto` where eBPF is loaded); 0 hands it over from the first byte.
    /// Short connections then never pay for entering the socket maps.
    pub sockmap_handoff: u64,
    /// The header HTTP sites add to every request unless a site says otherwise.
    pub forwarded_header: ForwardedHeader,
    /// Sources whose own `X-Forwarded-For`/`Forwarded` (and `X-Forwarded-Proto`/`-Port`) are
    /// kept and appended to; everyone else's are removed, since a client can write anything.
    pub trusted_proxies: Vec<Cidr>,
    /// The longest HTTP request head (request line, header lines, blank line) read on `http`
    /// listeners: the first request's, and every later one on a header site's connection.
    pub max_request_head: usize,
    /// The /96 that `source = "embed"` sites put the client's IPv4 address in, to form the
    /// source address of the backend connection (NAT46 source); `None` when no site embeds.
    pub source_prefix: Option<Cidr>,
}

impl Default for Defaults {
    /// The values used for keys the file leaves out.
    fn default() -> Self {
        Defaults {
            forwarding: Forwarding::Auto,
            client_hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: None,
            max_connections: 10_000,
            max_connections_per_source: None,
            sockmap_backlog_limit: 4 << 20,
            sockmap_handoff: 256 << 10,
            forwarded_header: ForwardedHeader::None,
            trusted_proxies: Vec::new(),
            max_request_head: 16 << 10,
            source_prefix: None,
        }
    }
}

/// How bytes are moved once both sockets are connected (DESIGN.md, "Forwarding engines").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// The best engine available at start-up and for each connection.
    Auto,
    /// eBPF `SOCKHASH` + `sk_skb` stream verdict: payload stays in the kernel.
    Sockmap,
    /// `splice(2)` through a pipe per direction.
    Splice,
    /// User-space copy.
    Copy,
    /// TC programs translate each segment between the two TCP connections after the preface
    /// (`docs/packet-engine.md`); spliced holds no byte of a handed-off connection.
    Packet,
}

impl Forwarding {
    /// The spelling used in the configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Forwarding::Auto => "auto",
            Forwarding::Sockmap => "sockmap",
            Forwarding::Splice => "splice",
            Forwarding::Copy => "copy",
            Forwarding::Packet => "packet",
        }
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The header that tells an HTTP backend who the client is, added to every request (README,
/// "Client address in a header").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// Nothing is added; the connection is spliced untouched.
    None,
    /// `X-Forwarded-For: 192.0.2.7`, as HAProxy's `option forwardfor` and nginx's
    /// `$proxy_add_x_forwarded_for` send it.
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=192.0.2.7:4711;proto=http`.
    Forwarded,
}

impl ForwardedHeader {
    /// The spelling used in the configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardedHeader::None => "none",
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }
}

impl fmt::Display for ForwardedHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a listener expects first, and so where it finds the name to route on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// TLS: route on the ClientHello's SNI.
    Tls,
    /// Plain HTTP/1: route on the `Host` header.
    Http,
}

impl Protocol {
    /// The spelling used in the configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[listen]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Where to accept connections.
    pub address: SocketAddr,
    /// What clients send first on this address.
    pub protocol: Protocol,
    /// Overrides [`Defaults::forwarding`] for connections on this listener.
    pub forwarding: Option<Forwarding>,
    /// Balancers in front of us: connections from these sources must start with a PROXY
    /// header, whose client address then stands for the connection's. Nobody else's header is
    /// read (`crate::preface::receive`).
    pub accept_proxy: Vec<Cidr>,
    /// Names no site claims are looked up in DNS (`backend = "dns"` here or in `[defaults]`);
    /// the `[default]` site then only receives connections that sent no name.
    pub dns: bool,
}

/// A `[[site]]`, or the `[default]` site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The first hostname, or `"default"` for the default site: a stable label for logs.
    pub name: String,
    /// Lowercase, without a trailing dot; a wildcard is `*.` plus the rest. Empty for the
    /// default site.
    pub hostnames: Vec<String>,
    /// Where connections for this site go.
    pub backend: Backend,
    /// The PROXY protocol header to send first, if any.
    pub proxy_protocol: Version,
    /// Which v2 TLVs to add; all off unless `proxy_protocol` is v2.
    pub tlvs: Tlvs,
    /// Overrides the listener's and the default forwarding engine.
    pub forwarding: Option<Forwarding>,
    /// The header added to each request on `http` listeners: the site's own setting, else
    /// `[defaults]`'. Connections on `tls` listeners never get one.
    pub forwarded_header: ForwardedHeader,
    /// The source address of connections to the backend.
    pub source: SourceAddress,
    /// Where the site was declared, for messages.
    pub origin: Origin,
}

/// The source address of a site's backend connections (`source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceAddress {
    /// The proxy's own address toward the backend (the default).
    #[default]
    Proxy,
    /// `[defaults] source_prefix` plus the client's IPv4 address, so an unmodified backend
    /// logs the client: `2001:db8:4646::/96` and 192.0.2.10 give `2001:db8:4646::c000:20a`.
    /// IPv6 clients (and IPv4 backends) keep the proxy's own address.
    Embed,
}

/// PROXY protocol v2 TLVs a site asks for (`proxy_protocol_tlvs`).
///
/// With `proxy_protocol = "v2"` and no `proxy_protocol_tlvs`, only `authority` is on: it carries
/// the routed name, costs a few bytes, and every v2 reader skips TLVs it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tlvs {
    /// `PP2_TYPE_AUTHORITY`: the SNI or Host name the client asked for.
    pub authority: bool,
    /// `PP2_TYPE_CRC32C`: a checksum of the header.
    pub crc32c: bool,
    /// `PP2_TYPE_UNIQUE_ID`: an identifier for the connection, also written to the access log.
    pub unique_id: bool,
}

/// A site's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One address for every protocol; without a port, the listener's port is used.
    Addr {
        /// The backend's address.
        ip: IpAddr,
        /// The port, or `None` to use the port the client connected to.
        port: Option<u16>,
    },
    /// A separate address per protocol; a missing one means the site is not served on it.
    PerProtocol {
        /// Where TLS connections go.
        tls: Option<SocketAddr>,
        /// Where HTTP connections go.
        http: Option<SocketAddr>,
    },
}

impl Backend {
    /// The address to connect to for a client that arrived on a `protocol` listener bound to
    /// `listener_port`; `None` if this site is not served on that protocol.
    pub fn for_listener(&self, protocol: Protocol, listener_port: u16) -> Option<SocketAddr> {
        match *self {
            Backend::Addr { ip, port } => Some(SocketAddr::new(ip, port.unwrap_or(listener_port))),
            Backend::PerProtocol { tls, http } => match protocol {
                Protocol::Tls => tls,
                Protocol::Http => http,
            },
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Backend::Addr {
                ip,
                port: Some(port),
            } => write!(f, "{}", SocketAddr::new(ip, port)),
            Backend::Addr { ip, port: None } => write!(f, "{ip} (listener's port)"),
            Backend::PerProtocol { tls, http } => {
                let show = |a: Option<SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
                write!(f, "tls {}, http {}", show(tls), show(http))
            }
        }
    }
}

/// `[xdp]`: the edge filter attached to network interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xdp {
    /// The interfaces to attach to, in file order; at least one, no duplicates, each a valid
    /// Linux interface name.
    pub interfaces: Vec<String>,
    /// How the program is attached.
    pub mode: XdpMode,
    /// Source networks whose packets are dropped, in file order; no two are the same network.
    pub deny: Vec<Cidr>,
    /// The per-source SYN limit; `None` limits nothing.
    pub syn_limit: Option<SynLimit>,
    /// Guarded destination ports; already resolved: the `ports` key, or else the listeners'
    /// ports (deduplicated, sorted). Either way sorted, without duplicates, and not empty.
    pub ports: Vec<u16>,
}

/// How the XDP program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, generic (SKB) mode otherwise.
    Auto,
    /// Native (driver) mode only; attaching fails on drivers without XDP support.
    Native,
    /// Generic (SKB) mode: works on every interface, after the kernel has built an skb.
    Generic,
}

impl XdpMode {
    /// The spelling used in the configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token bucket per source: IPv4 sources are counted per address (/32), IPv6 sources per /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynLimit {
    /// SYNs per second a source may send; at least 1.
    pub rate_per_second: u32,
    /// How many SYNs a source may send at once (the bucket size); at least 1.
    pub burst: u32,
}

/// An IPv4 or IPv6 network: address with every bit after `prefix` zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address; every bit after `prefix` is zero.
    pub addr: IpAddr,
    /// The prefix length: at most 32 for IPv4, 128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in this network; an IPv4-mapped IPv6 address (a client on a dual-stack
    /// listener) counts as the IPv4 address it maps.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A place in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The file, as it was named (relative paths stay relative).
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Why a configuration was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in (for a missing include: the file that names it).
    pub(crate) file: PathBuf,
    /// 1-based line, when the problem has a position.
    pub(crate) line: Option<usize>,
    /// 1-based column in characters, when the problem has a position.
    pub(crate) column: Option<usize>,
    /// What is wrong, for a human.
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, "{line}:")?;
            if let Some(column) = self.column {
                write!(f, "{column}:")?;
            }
        }
        write!(f, " {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, includes and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            message: format!("cannot read the configuration: {e}"),
        })?;
        load::load(text, path)
    }

    /// `[packet]`: the packet engine's settings (defaults when the section is absent).
    pub fn packet(&self) -> &PacketSettings {
        &self.packet
    }

    /// Whether `forwarding = "packet"` is set anywhere (`[defaults]`, a listener, a site or
    /// the default site).
    pub fn names_packet(&self) -> bool {
        self.names(Forwarding::Packet)
    }

    /// Whether `forwarding = "auto"` is in effect anywhere (`[defaults]`, where it is the
    /// default, a listener, a site or the default site).
    pub fn names_auto(&self) -> bool {
        self.names(Forwarding::Auto)
    }

    fn names(&self, engine: Forwarding) -> bool {
        std::iter::once(Some(self.defaults.forwarding))
            .chain(self.listeners.iter().map(|l| l.forwarding))
            .chain(
                self.sites
                    .iter()
                    .chain(&self.default_site)
                    .map(|s| s.forwarding),
            )
            .any(|f| f == Some(engine))
    }

    /// Validates `text` as if it had been read from `path`; `include`s, if any, are read from
    /// disk relative to `path`'s directory.
    pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        load::load(text.to_owned(), path)
    }

    /// A multi-line description for `spliced check`: files read, listeners, how many sites and
    /// hostnames, the default site, which PROXY protocol versions are in use and the XDP
    /// filter.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        // Writing to a String cannot fail, hence the ignored results.
        let _ = writeln!(out, "files read: {}", self.files.len());
        for file in &self.files {
            let _ = writeln!(out, "  {}", file.display());
        }
        let d = &self.defaults;
        let _ = writeln!(
            out,
            "defaults: forwarding {}, client_hello_timeout {}, connect_timeout {}, idle_timeout {}, \
             max_connections {}, max_connections_per_source {}, sockmap_backlog_limit {}, \
             sockmap_handoff {}, forwarded_header {}, max_request_head {}, trusted_proxies {}",
            d.forwarding,
            parse::format_duration(d.client_hello_timeout),
            parse::format_duration(d.connect_timeout),
            d.idle_timeout
                .map_or("none".to_string(), parse::format_duration),
            d.max_connections,
            d.max_connections_per_source
                .map_or("none".to_string(), |n| n.to_string()),
            parse::format_size(d.sockmap_backlog_limit),
            parse::format_size(d.sockmap_handoff),
            d.forwarded_header,
            parse::format_size(d.max_request_head as u64),
            d.trusted_proxies.len(),
        );
        let _ = writeln!(out, "listeners: {}", self.listeners.len());
        for l in &self.listeners {
            let forwarding = match l.forwarding {
                Some(f) => f.to_string(),
                None => format!("{} (default)", d.forwarding),
            };
            let _ = write!(
                out,
                "  {} {} forwarding {}",
                l.address, l.protocol, forwarding
            );
            if !l.accept_proxy.is_empty() {
                let from: Vec<String> = l.accept_proxy.iter().map(Cidr::to_string).collect();
                let _ = write!(out, " accept_proxy {}", from.join(","));
            }
            let _ = writeln!(out);
        }
        let wildcards = self
            .sites
            .iter()
            .flat_map(|s| &s.hostnames)
            .filter(|h| h.starts_with("*."))
            .count();
        let hostnames: usize = self.sites.iter().map(|s| s.hostnames.len()).sum();
        let _ = writeln!(
            out,
            "sites: {} with {} hostnames ({} exact, {} wildcard)",
            self.sites.len(),
            hostnames,
            hostnames - wildcards,
            wildcards
        );
        for protocol in [Protocol::Tls, Protocol::Http] {
            let served = self
                .sites
                .iter()
                .filter(|s| s.backend.for_listener(protocol, 1).is_some())
                .count();
            let listening = self.listeners.iter().any(|l| l.protocol == protocol);
            let note = if served > 0 && !listening {
                format!(" (no {protocol} listener)")
            } else {
                String::new()
            };
            let _ = writeln!(out, "  served on {protocol}: {served}{note}");
        }
        match &self.default_site {
            Some(site) => {
                let _ = writeln!(
                    out,
                    "default site: backend {}, proxy_protocol {}",
                    site.backend,
                    version_str(site.proxy_protocol)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "default site: none (unknown and missing names are refused)"
                );
            }
        }
        let count = |v: Version| {
            self.sites
                .iter()
                .chain(&self.default_site)
                .filter(|s| s.proxy_protocol == v)
                .count()
        };
        let _ = writeln!(
            out,
            "proxy_protocol: {} none, {} v1, {} v2",
            count(Version::None),
            count(Version::V1),
            count(Version::V2)
        );
        let headers = |h: ForwardedHeader| {
            self.sites
                .iter()
                .chain(&self.default_site)
                .filter(|s| s.forwarded_header == h)
                .count()
        };
        let _ = writeln!(
            out,
            "forwarded_header: {} none, {} x-forwarded-for, {} forwarded",
            headers(ForwardedHeader::None),
            headers(ForwardedHeader::XForwardedFor),
            headers(ForwardedHeader::Forwarded)
        );
        match &self.dns {
            Some(dns) => {
                let nets: Vec<String> = dns.allowed_backends.iter().map(Cidr::to_string).collect();
                let servers = match &dns.servers {
                    Some(list) => list
                        .iter()
                        .map(SocketAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    None => "/etc/resolv.conf".to_string(),
                };
                let users: Vec<String> = self
                    .listeners
                    .iter()
                    .filter(|l| l.dns)
                    .map(|l| l.address.to_string())
                    .collect();
                let _ = writeln!(
                    out,
                    "dns: allowed_backends {}; servers {servers}; timeout {}, ttl {}..{}, \
                     negative_ttl {}, proxy_protocol {}; used on {}",
                    nets.join(", "),
                    parse::format_duration(dns.timeout),
                    parse::format_duration(dns.ttl_floor),
                    parse::format_duration(dns.ttl_ceiling),
                    parse::format_duration(dns.negative_ttl),
                    version_str(dns.proxy_protocol),
                    users.join(", ")
                );
            }
            None => {
                let _ = writeln!(out, "dns: none (unknown names are not looked up)");
            }
        }
        // Only when the engine is named or configured, so existing summaries stay as they were.
        if self.names_packet() || self.packet != PacketSettings::default() {
            let p = &self.packet;
            let interfaces = if p.interfaces.is_empty() {
                "every up interface with a global address".to_string()
            } else {
                p.interfaces.join(", ")
            };
            let _ = writeln!(
                out,
                "packet: interfaces {interfaces}; after {}, max_connections {}, idle_timeout {}, \
                 linger {}, drain_timeout {}, keep_on_stop {}, mss {}",
                parse::format_size(p.after),
                p.max_connections,
                parse::format_duration(p.idle_timeout),
                parse::format_duration(p.linger),
                parse::format_duration(p.drain_timeout),
                p.keep_on_stop,
                p.mss.map_or("from the MTU".to_string(), |m| m.to_string()),
            );
            if let Some(after) = p.auto_after.filter(|_| self.names_auto()) {
                let _ = writeln!(
                    out,
                    "auto: the packet engine after {} both ways (where it loads), sockmap after \
                     {} per direction for a connection it refuses",
                    parse::format_size(after),
                    parse::format_size(self.defaults.sockmap_handoff),
                );
            }
        }
        match &self.xdp {
            Some(xdp) => {
                let _ = writeln!(
                    out,
                    "xdp: mode {} on {}",
                    xdp.mode,
                    xdp.interfaces.join(", ")
                );
                let v4 = xdp.deny.iter().filter(|c| c.addr.is_ipv4()).count();
                let _ = writeln!(
                    out,
                    "  deny: {} networks ({} IPv4, {} IPv6)",
                    xdp.deny.len(),
                    v4,
                    xdp.deny.len() - v4
                );
                match xdp.syn_limit {
                    Some(limit) => {
                        let _ = writeln!(
                            out,
                            "  syn limit: {} per second per source, burst {}",
                            limit.rate_per_second, limit.burst
                        );
                    }
                    None => {
                        let _ = writeln!(out, "  syn limit: none");
                    }
                }
                let ports: Vec<String> = xdp.ports.iter().map(u16::to_string).collect();
                let _ = writeln!(out, "  guarded ports: {}", ports.join(", "));
            }
            None => {
                let _ = writeln!(out, "xdp: none (no edge filter)");
            }
        }
        out
    }
}

/// The configuration spelling of a PROXY protocol version.
fn version_str(v: Version) -> &'static str {
    match v {
        Version::None => "none",
        Version::V1 => "v1",
        Version::V2 => "v2",
    }
}
