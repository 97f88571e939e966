//! Routing a requested name to a site: exact, then wildcard, then the default site.
//!
//! Names are compared case-insensitively and without a trailing dot ([`crate::name::normalize`]).
//!
//! Wildcards follow the TLS certificate rule (RFC 6125, 6.4.3): `*.example.com` stands for
//! exactly one more label, so it matches `a.example.com` but neither `example.com` nor
//! `a.b.example.com`. A customer who owns a certificate for `*.example.com` gets exactly the
//! names that certificate is valid for, and a deeper name cannot silently land on a site that
//! would fail the handshake anyway. Because only one label can be replaced, there is exactly one
//! candidate wildcard per name, so "the most specific wildcard wins" needs no ranking; a name
//! with an exact entry always beats a wildcard.
//!
//! A lookup is at most two hash-map probes, whatever the number of sites. An IP literal (an
//! HTTP `Host` may be one) matches only an exact entry for that address, never a wildcard, and
//! otherwise goes to the default site.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use crate::config::{Config, Site};
use crate::name::normalize_cow;

/// The name-to-site table built from a [`Config`]; `Send + Sync`, so one can be shared by all
/// connections and replaced on reload.
#[derive(Debug, Clone)]
pub struct Router {
    sites: Vec<Site>,
    /// Normalized exact hostname -> index into `sites`.
    exact: HashMap<String, usize>,
    /// `example.com` for a configured `*.example.com` -> index into `sites`.
    wildcard: HashMap<String, usize>,
    default: Option<Site>,
}

/// Why a name could not be routed (`crate::outcome` names it for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// The client sent no name (no SNI, no `Host`) and there is no default site.
    MissingName,
    /// No site claims the name and there is no default site.
    UnknownName,
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteError::MissingName => "the client sent no name and there is no default site",
            RouteError::UnknownName => "no site has this name and there is no default site",
        })
    }
}

impl std::error::Error for RouteError {}

impl Router {
    /// Indexes the configuration's sites. Should two sites claim one hostname (a validated
    /// [`Config`] never has that), the first one keeps it.
    pub fn new(config: &Config) -> Router {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, site) in config.sites.iter().enumerate() {
            for hostname in &site.hostnames {
                match hostname.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(index),
                    None => exact.entry(hostname.clone()).or_insert(index),
                };
            }
        }
        Router {
            sites: config.sites.clone(),
            exact,
            wildcard,
            default: config.default_site.clone(),
        }
    }

    /// Finds the site for `name` (the SNI or `Host`, `None` if the client sent none): exact
    /// match, then the wildcard one label up, then the default site.
    pub fn route(&self, name: Option<&str>) -> Result<&Site, RouteError> {
        let Some(name) = name.and_then(normalize_cow) else {
            return self.fallback(RouteError::MissingName);
        };
        match self.find(&name) {
            Some(site) => Ok(site),
            None => self.fallback(RouteError::UnknownName),
        }
    }

    /// The site that claims `name` (already normalized) by an exact or wildcard hostname; the
    /// default site is not consulted.
    pub fn find(&self, name: &str) -> Option<&Site> {
        if let Some(&index) = self.exact.get(name) {
            return Some(self.site(index));
        }
        if let Some((label, parent)) = name.split_once('.')
            && !label.is_empty()
            && !label.contains('*')
            && name.parse::<IpAddr>().is_err()
            && let Some(&index) = self.wildcard.get(parent)
        {
            return Some(self.site(index));
        }
        None
    }

    fn site(&self, index: usize) -> &Site {
        // Indices come from enumerating `sites` in `new`, so they are always in range.
        &self.sites[index]
    }

    fn fallback(&self, error: RouteError) -> Result<&Site, RouteError> {
        self.default.as_ref().ok_or(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        Backend, Defaults, ForwardedHeader, Listener, Origin, Protocol, SourceAddress, Tlvs,
    };
    use crate::preface::Version;
    use std::net::{Ipv6Addr, SocketAddr};
    use std::path::PathBuf;

    fn site(hostnames: &[&str], last_octet: u16) -> Site {
        Site {
            name: hostnames.first().map_or("default", |h| h).to_string(),
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
            backend: Backend::Addr {
                ip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, last_octet)),
                port: None,
            },
            proxy_protocol: Version::None,
            tlvs: Tlvs::default(),
            forwarding: None,
            forwarded_header: ForwardedHeader::None,
            source: SourceAddress::Proxy,
            origin: Origin {
                file: PathBuf::from("test.toml"),
                line: 1,
            },
        }
    }

    fn config(sites: Vec<Site>, default_site: Option<Site>) -> Config {
        Config {
            defaults: Defaults::default(),
            listeners: vec![Listener {
                address: SocketAddr::from(([0, 0, 0, 0], 443)),
                protocol: Protocol::Tls,
                forwarding: None,
                accept_proxy: Vec::new(),
                dns: false,
            }],
            sites,
            default_site,
            files: vec![PathBuf::from("test.toml")],
            xdp: None,
            dns: None,
            packet: crate::config::PacketSettings::default(),
        }
    }

    /// The name of the site a lookup gives, or the error.
    fn lookup(router: &Router, name: Option<&str>) -> Result<String, RouteError> {
        router.route(name).map(|site| site.name.clone())
    }

    fn ok(name: &str) -> Result<String, RouteError> {
        Ok(name.to_string())
    }

    fn sample(with_default: bool) -> Router {
        let sites = vec![
            site(&["site1.example", "*.site1.example"], 10),
            site(&["special.site1.example"], 11),
            site(&["*.b.site1.example"], 12),
            site(&["192.0.2.7", "2001:db8::7"], 13),
        ];
        let default = with_default.then(|| site(&[], 99));
        Router::new(&config(sites, default))
    }

    #[test]
    fn exact_and_wildcard() {
        let r = sample(false);
        assert_eq!(lookup(&r, Some("site1.example")), ok("site1.example"));
        assert_eq!(lookup(&r, Some("www.site1.example")), ok("site1.example"));
        // One label only: a deeper name does not match *.site1.example...
        assert_eq!(
            lookup(&r, Some("a.c.site1.example")),
            Err(RouteError::UnknownName)
        );
        // ...but a wildcard one level deeper exists for b.site1.example.
        assert_eq!(
            lookup(&r, Some("a.b.site1.example")),
            ok("*.b.site1.example")
        );
        // The wildcard does not cover the bare parent it hangs off.
        assert_eq!(lookup(&r, Some("b.site1.example")), ok("site1.example"));
        assert_eq!(
            lookup(&r, Some("other.example")),
            Err(RouteError::UnknownName)
        );
        assert_eq!(lookup(&r, Some("example")), Err(RouteError::UnknownName));
        // A literal '*' sent by a client is not a wildcard match.
        assert_eq!(
            lookup(&r, Some("*.site1.example")),
            Err(RouteError::UnknownName)
        );
        assert_eq!(
            lookup(&r, Some(".site1.example")),
            Err(RouteError::UnknownName)
        );
    }

    #[test]
    fn exact_beats_wildcard_beats_default() {
        let r = sample(true);
        assert_eq!(
            lookup(&r, Some("special.site1.example")),
            ok("special.site1.example")
        );
        assert_eq!(lookup(&r, Some("other.site1.example")), ok("site1.example"));
        assert_eq!(lookup(&r, Some("unknown.example")), ok("default"));
    }

    #[test]
    fn case_and_trailing_dot() {
        let r = sample(false);
        assert_eq!(lookup(&r, Some("SITE1.Example.")), ok("site1.example"));
        assert_eq!(lookup(&r, Some("WWW.site1.EXAMPLE.")), ok("site1.example"));
        // Only one trailing dot is a DNS root; two is a different (invalid) name.
        assert_eq!(
            lookup(&r, Some("site1.example..")),
            Err(RouteError::UnknownName)
        );
    }

    #[test]
    fn missing_name() {
        let without = sample(false);
        assert_eq!(lookup(&without, None), Err(RouteError::MissingName));
        assert_eq!(lookup(&without, Some("")), Err(RouteError::MissingName));
        assert_eq!(lookup(&without, Some(".")), Err(RouteError::MissingName));
        let with = sample(true);
        assert_eq!(lookup(&with, None), ok("default"));
        assert_eq!(lookup(&with, Some("")), ok("default"));
    }

    #[test]
    fn ip_literals() {
        let r = sample(true);
        assert_eq!(lookup(&r, Some("192.0.2.7")), ok("192.0.2.7"));
        assert_eq!(lookup(&r, Some("[2001:DB8:0::7]")), ok("192.0.2.7"));
        assert_eq!(lookup(&r, Some("192.0.2.8")), ok("default"));
        // An IPv4 literal never matches a wildcard, even one that looks like its suffix.
        let odd = Router::new(&config(vec![site(&["*.0.2.8"], 1)], None));
        assert_eq!(
            lookup(&odd, Some("192.0.2.8")),
            Err(RouteError::UnknownName)
        );
        assert_eq!(lookup(&odd, Some("x.0.2.8")), ok("*.0.2.8"));
    }

    #[test]
    fn ten_thousand_sites() {
        let sites: Vec<Site> = (0..10_000u16)
            .map(|i| {
                let exact = format!("customer{i}.example");
                let wild = format!("*.customer{i}.example");
                site(&[exact.as_str(), wild.as_str()], i)
            })
            .collect();
        let router = Router::new(&config(sites, None));
        for i in 0..10_000u16 {
            let expected = format!("customer{i}.example");
            assert_eq!(
                lookup(&router, Some(&format!("CUSTOMER{i}.example."))),
                ok(&expected)
            );
            let site = router
                .route(Some(&format!("www.customer{i}.example")))
                .expect("wildcard");
            assert_eq!(site.name, expected);
            assert_eq!(
                site.backend.for_listener(Protocol::Tls, 443),
                Some(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, i)),
                    443
                ))
            );
        }
        assert_eq!(
            lookup(&router, Some("customer10000.example")),
            Err(RouteError::UnknownName)
        );
    }

    #[test]
    fn router_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Router>();
    }
}
