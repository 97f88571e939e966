//! Backends from DNS (`[dns]`): a name that no site claims, on a listener with
//! `backend = "dns"`, is looked up (AAAA) and the connection goes to the first address inside
//! `allowed_backends`.
//!
//! # Never an open proxy
//!
//! Every address in the answer is judged on its own ([`judge`]): it must lie in an allowed
//! network, and it must not be unspecified, loopback, link-local, multicast, IPv4-mapped or
//! -compatible, or one of the proxy's own addresses (read from the interfaces when this
//! resolver is built), whatever the networks say. The first address that passes is used; when
//! none does, the connection is refused with `dns_not_allowed`. Names are looked up as fully
//! qualified names (a trailing dot), so no search domain from `resolv.conf` is appended, and IP
//! literals are never looked up. `/etc/hosts` is not read. CNAME chains are followed by the
//! resolver for at most 8 hops (hickory's bound); a loop ends there with no address, and is
//! refused as `dns_not_found` like a name without one.
//!
//! # Cache, coalescing, timeouts
//!
//! Answers are kept for their TTL, clamped to `ttl_floor..=ttl_ceiling`; failures for
//! `negative_ttl`. While a name is being looked up, other connections for it wait for that one
//! query instead of sending their own. A lookup gives up after `[dns] timeout` (never more than
//! `connect_timeout`), and its timeout is cached like any failure.
//!
//! # Not on the workers
//!
//! The queries run on a thread of their own with its own current-thread runtime: a connection
//! only waits on a channel, so a slow name server never holds a worker's runtime, and the
//! resolver's sockets live on one reactor whichever worker asked.
//!
//! Why hickory-resolver rather than `getaddrinfo` on a blocking thread: it is asynchronous (no
//! thread per lookup in flight), gives the TTL of the answer (libc does not), reads
//! `resolv.conf` or takes explicit servers, and bounds CNAME chains itself.
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    net::{DnsError, NetError, runtime::TokioRuntimeProvider},
    proto::{
        op::ResponseCode,
        rr::{RData, RecordType},
    },
};
use tokio::sync::{oneshot, watch};

use crate::config::{Cidr, Dns as DnsConfig};

/// Names kept in the cache at most; past it, expired entries are dropped, and if none expired
/// new answers are not kept (lookups still coalesce).
const CACHE_LIMIT: usize = 100_000;

/// Why a name has no usable backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// NXDOMAIN, or no AAAA record (also what a CNAME loop or an over-long chain ends in).
    NotFound,
    /// AAAA records, but none inside `allowed_backends` and allowed.
    NotAllowed,
    /// No answer within `[dns] timeout`.
    Timeout,
    /// The name servers failed (SERVFAIL, REFUSED, unreachable...).
    Error,
}

/// A lookup that gave no backend, with what to write in the access log's `detail=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Why.
    pub kind: FailureKind,
    /// For the log: the resolver's error, or each refused address with its reason.
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The outcome of looking a name up: the backend's address, or why there is none.
pub type Answer = Result<Ipv6Addr, Failure>;

/// A cache entry: an answer until it expires, or a lookup in flight that waiters subscribe to.
enum Slot {
    Ready { answer: Answer, expires: Instant },
    Pending(watch::Receiver<Option<Answer>>),
}

/// Settings a query needs, shared with the resolver thread.
struct Rules {
    allowed: Vec<Cidr>,
    own: Own,
    timeout: Duration,
    ttl_floor: Duration,
    ttl_ceiling: Duration,
    negative_ttl: Duration,
}

/// The DNS backend resolver for one configuration: its cache, and the thread its queries run
/// on (stopped when this is dropped, e.g. after a reload replaced it).
pub struct Resolver {
    resolver: TokioResolver,
    runtime: tokio::runtime::Handle,
    rules: Arc<Rules>,
    cache: Arc<Mutex<HashMap<String, Slot>>>,
    lookups: Arc<AtomicU64>,
    _stop: oneshot::Sender<()>,
}

impl Resolver {
    /// Builds the resolver for `config`: its name servers (or `/etc/resolv.conf`'s), and the
    /// proxy's own addresses, which are never a backend. `extra_own` adds addresses that are
    /// ours without being on an interface (listeners on specific addresses), `own_networks`
    /// networks routed to this host as local (the NAT46 `source_prefix`).
    pub fn new(
        config: &DnsConfig,
        extra_own: &[IpAddr],
        own_networks: &[Cidr],
    ) -> Result<Resolver> {
        let mut addresses = own_addresses().context("reading the proxy's own addresses")?;
        addresses.extend_from_slice(extra_own);
        let own = Own {
            addresses,
            networks: own_networks.to_vec(),
        };
        let rules = Arc::new(Rules {
            allowed: config.allowed_backends.clone(),
            own,
            timeout: config.timeout,
            ttl_floor: config.ttl_floor,
            ttl_ceiling: config.ttl_ceiling,
            negative_ttl: config.negative_ttl,
        });
        let (resolver_config, mut options) = match &config.servers {
            Some(servers) => {
                let mut c = ResolverConfig::default();
                for server in servers {
                    let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                    for connection in &mut ns.connections {
                        connection.port = server.port();
                    }
                    c.name_servers.push(ns);
                }
                (c, ResolverOpts::default())
            }
            None => hickory_resolver::system_conf::read_system_conf()
                .context("reading /etc/resolv.conf for [dns]")?,
        };
        options.timeout = config.timeout;
        options.attempts = 1;
        // Our own cache keeps answers (with the floor and ceiling); one cache is enough.
        options.cache_size = 0;
        options.use_hosts_file = ResolveHosts::Never;
        // The CNAMEs stay in the answer, for the log.
        options.preserve_intermediates = true;
        options.ndots = 0;
        let resolver =
            TokioResolver::builder_with_config(resolver_config, TokioRuntimeProvider::default())
                .with_options(options)
                .build()
                .context("building the DNS resolver")?;

        // Its thread ends when the resolver is dropped (with `_stop`); nothing joins it.
        let crate::runtime_thread::RuntimeThread {
            handle: runtime,
            stop: stop_tx,
            ..
        } = crate::runtime_thread::start("spliced-dns".into(), Duration::from_millis(100))
            .context("starting the DNS thread")?;
        Ok(Resolver {
            resolver,
            runtime,
            rules,
            cache: Arc::new(Mutex::new(HashMap::new())),
            lookups: Arc::new(AtomicU64::new(0)),
            _stop: stop_tx,
        })
    }

    /// Lookups started so far (cache hits and coalesced waiters start none).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// The backend for `name` (normalized: lowercase, no trailing dot), from the cache, from a
    /// lookup already in flight, or from a new query on the DNS thread. The caller bounds the
    /// wait; the query bounds itself with `[dns] timeout` too.
    pub async fn resolve(&self, name: &str) -> Answer {
        if name.parse::<IpAddr>().is_ok() {
            return Err(Failure {
                kind: FailureKind::NotFound,
                detail: "an IP literal is not looked up".into(),
            });
        }
        // Only host names (letters, digits, hyphens, dots; labels of 1-63, 253 in all) are
        // looked up: anything else cannot have an AAAA a customer wrote, and must not take a
        // cache entry.
        if !is_host_name(name) {
            return Err(Failure {
                kind: FailureKind::NotFound,
                detail: "not a host name".into(),
            });
        }
        let mut waiting = {
            let mut cache = lock(&self.cache);
            match cache.get(name) {
                Some(Slot::Ready { answer, expires }) if *expires > Instant::now() => {
                    return answer.clone();
                }
                Some(Slot::Pending(rx)) => rx.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    cache.insert(name.to_string(), Slot::Pending(rx.clone()));
                    self.lookups.fetch_add(1, Ordering::Relaxed);
                    let resolver = self.resolver.clone();
                    let rules = Arc::clone(&self.rules);
                    let cache = Arc::clone(&self.cache);
                    let name = name.to_string();
                    self.runtime.spawn(async move {
                        let (answer, keep) = query(&resolver, &rules, &name).await;
                        {
                            let mut cache = lock(&cache);
                            if cache.len() >= CACHE_LIMIT {
                                let now = Instant::now();
                                cache.retain(|_, slot| match slot {
                                    Slot::Ready { expires, .. } => *expires > now,
                                    Slot::Pending(_) => true,
                                });
                            }
                            if cache.len() < CACHE_LIMIT {
                                let expires = Instant::now() + keep;
                                cache.insert(
                                    name,
                                    Slot::Ready {
                                        answer: answer.clone(),
                                        expires,
                                    },
                                );
                            } else {
                                cache.remove(&name);
                            }
                        }
                        let _ = tx.send(Some(answer));
                    });
                    rx
                }
            }
        };
        match waiting.wait_for(Option::is_some).await {
            Ok(answer) => answer.clone().unwrap_or_else(|| {
                Err(Failure {
                    kind: FailureKind::Error,
                    detail: "the lookup ended without an answer".into(),
                })
            }),
            Err(_) => Err(Failure {
                kind: FailureKind::Error,
                detail: "the DNS thread stopped".into(),
            }),
        }
    }
}

/// Whether `name` (lowercase, no trailing dot) is a host name DNS can hold: labels of 1 to
/// 63 letters, digits, hyphens or underscores, not starting or ending with a hyphen, and 253
/// bytes in all.
fn is_host_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One query for `name`'s AAAA records, judged against the rules; returns the answer and how
/// long to keep it.
async fn query(resolver: &TokioResolver, rules: &Rules, name: &str) -> (Answer, Duration) {
    let fqdn = format!("{name}.");
    let failure = |kind, detail: String| (Err(Failure { kind, detail }), rules.negative_ttl);
    let lookup = match tokio::time::timeout(
        rules.timeout,
        resolver.lookup(fqdn.as_str(), RecordType::AAAA),
    )
    .await
    {
        Err(_) => {
            return failure(
                FailureKind::Timeout,
                format!("no answer within {:?}", rules.timeout),
            );
        }
        Ok(Err(e)) => {
            let (kind, detail) = classify(&e);
            return failure(kind, detail);
        }
        Ok(Ok(lookup)) => lookup,
    };
    let ttl = lookup
        .valid_until()
        .saturating_duration_since(Instant::now())
        .clamp(rules.ttl_floor, rules.ttl_ceiling);
    let mut refused = Vec::new();
    let mut cnames = 0usize;
    for record in lookup.answers() {
        match &record.data {
            RData::AAAA(aaaa) => match judge(aaaa.0, &rules.allowed, &rules.own) {
                Ok(()) => return (Ok(aaaa.0), ttl),
                Err(reason) => refused.push(format!("{} ({reason})", aaaa.0)),
            },
            RData::CNAME(_) => cnames += 1,
            _ => {}
        }
    }
    if refused.is_empty() {
        return failure(
            FailureKind::NotFound,
            format!("no AAAA record (after {cnames} CNAME)"),
        );
    }
    // Refused answers are kept as long as allowed ones: the same query would refuse them again.
    (
        Err(Failure {
            kind: FailureKind::NotAllowed,
            detail: format!("refused: {}", refused.join(", ")),
        }),
        ttl.min(rules.ttl_ceiling),
    )
}

/// Sorts a resolver error into a failure kind with a short detail.
fn classify(error: &NetError) -> (FailureKind, String) {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no)) => {
            let code = if no.response_code == ResponseCode::NXDomain {
                "NXDOMAIN".to_string()
            } else {
                format!(
                    "no AAAA record for {} ({})",
                    no.query.name(),
                    no.response_code
                )
            };
            (FailureKind::NotFound, code)
        }
        NetError::Timeout => (FailureKind::Timeout, error.to_string()),
        _ => (FailureKind::Error, error.to_string()),
    }
}

/// What is ours: addresses on interfaces (and listeners'), and networks routed to us as local.
#[derive(Debug, Clone, Default)]
pub struct Own {
    /// Single addresses.
    pub addresses: Vec<IpAddr>,
    /// Whole networks, such as the NAT46 `source_prefix`, which is routed locally: a
    /// connection to any address in it would reach this host.
    pub networks: Vec<Cidr>,
}

/// Whether `ip` may be a backend: inside one of `allowed`, and none of the addresses that
/// would make the proxy reach itself, its host or anything but one unicast backend.
pub fn judge(ip: Ipv6Addr, allowed: &[Cidr], own: &Own) -> Result<(), &'static str> {
    let segments = ip.segments();
    if ip.is_unspecified() {
        return Err("unspecified");
    }
    if ip.is_loopback() {
        return Err("loopback");
    }
    if ip.is_multicast() {
        return Err("multicast");
    }
    if ip.is_unicast_link_local() {
        return Err("link-local");
    }
    if ip.to_ipv4_mapped().is_some() {
        return Err("IPv4-mapped");
    }
    // ::a.b.c.d, deprecated, which some stacks still send to the IPv4 address.
    if segments[..6] == [0; 6] {
        return Err("IPv4-compatible");
    }
    if own
        .addresses
        .iter()
        .any(|o| o.to_canonical() == IpAddr::V6(ip))
    {
        return Err("the proxy's own address");
    }
    if own.networks.iter().any(|net| net.contains(IpAddr::V6(ip))) {
        return Err("the proxy's source_prefix");
    }
    if !allowed.iter().any(|net| net.contains(IpAddr::V6(ip))) {
        return Err("outside allowed_backends");
    }
    Ok(())
}

/// Every address on this host's interfaces (in this network namespace).
fn own_addresses() -> Result<Vec<IpAddr>> {
    let mut own = Vec::new();
    for interface in nix::ifaddrs::getifaddrs()? {
        let Some(address) = interface.address else {
            continue;
        };
        if let Some(v6) = address.as_sockaddr_in6() {
            own.push(IpAddr::V6(v6.ip()));
        } else if let Some(v4) = address.as_sockaddr_in() {
            own.push(IpAddr::V4(v4.ip()));
        }
    }
    Ok(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Cidr {
        let (addr, prefix) = text.split_once('/').expect("a network");
        Cidr {
            addr: addr.parse().expect("an address"),
            prefix: prefix.parse().expect("a prefix"),
        }
    }

    fn ip(text: &str) -> Ipv6Addr {
        text.parse().expect("an IPv6 address")
    }

    #[test]
    fn only_allowed_unicast_backends() {
        let allowed = [net("2001:db8:1::/48"), net("::/0")];
        let own = Own {
            addresses: vec![IpAddr::V6(ip("2001:db8:1::1"))],
            networks: vec![net("2001:db8:1:4646::/96")],
        };
        let only = [net("2001:db8:1::/48")];
        assert_eq!(judge(ip("2001:db8:1::20"), &only, &own), Ok(()));
        assert_eq!(
            judge(ip("2001:db8:2::20"), &only, &own),
            Err("outside allowed_backends")
        );
        // Even a network that covers everything lets none of these through.
        for (bad, why) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("ff02::1", "multicast"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "IPv4-mapped"),
            ("::ffff:192.0.2.1", "IPv4-mapped"),
            ("::192.0.2.1", "IPv4-compatible"),
            ("2001:db8:1::1", "the proxy's own address"),
            ("2001:db8:1:4646::c000:202", "the proxy's source_prefix"),
        ] {
            assert_eq!(judge(ip(bad), &allowed, &own), Err(why), "{bad}");
        }
    }

    #[test]
    fn only_host_names_are_looked_up() {
        assert!(is_host_name("ok.dns.test"));
        assert!(is_host_name("xn--bcher-kva.example"));
        assert!(is_host_name("_spliced.a-b.example"));
        for bad in [
            "",
            "a..b",
            "-a.example",
            "a-.example",
            "a b.example",
            "a/b",
            "*.example",
        ] {
            assert!(!is_host_name(bad), "{bad}");
        }
        assert!(!is_host_name(&"a".repeat(64)));
        assert!(!is_host_name(&["a"; 128].join(".")));
    }

    #[test]
    fn own_ipv4_mapped_counts_as_own() {
        let allowed = [net("::/0")];
        let own = Own {
            addresses: vec![IpAddr::V6(ip("::ffff:192.0.2.1"))],
            networks: Vec::new(),
        };
        // A mapped own address compares as its IPv4 form; the IPv6 check above catches it first.
        assert_eq!(
            judge(ip("::ffff:192.0.2.1"), &allowed, &own),
            Err("IPv4-mapped")
        );
    }
}
