//! Reading files, following includes, and turning the raw TOML into a validated [`Config`].
//! Every error is placed at the span of the value it is about.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::raw::{
    RawBackend, RawDefaults, RawDns, RawFile, RawListener, RawPacket, RawSite, RawSize, RawXdp,
    SpannedStrings,
};
use super::{
    Backend, Config, ConfigError, Defaults, Dns, ForwardedHeader, Forwarding, Listener, Origin,
    PacketSettings, Site, Tlvs,
};
use super::{Cidr, Protocol, SourceAddress, SynLimit, Xdp, XdpMode, parse};
use crate::preface::Version;

/// A file's name and text, to turn byte spans into lines and columns.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        // Spans from toml are on char boundaries; walking back is only a guard.
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.position(span.start);
        ConfigError {
            file: self.path.clone(),
            line: Some(line),
            column: Some(column),
            message: message.into(),
        }
    }

    fn error_without_position(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    fn origin(&self, span: Range<usize>) -> Origin {
        Origin {
            file: self.path.clone(),
            line: self.position(span.start).0,
        }
    }

    /// Deserializes the text; serde's own errors (syntax, unknown keys, wrong types) keep the
    /// span toml attaches to them.
    fn parse(&self) -> Result<RawFile, ConfigError> {
        toml::from_str(&self.text).map_err(|e| {
            let message = e.message().trim().to_string();
            match e.span() {
                Some(span) => self.error(span, message),
                None => self.error_without_position(message),
            }
        })
    }
}

/// State carried across the main file and its includes.
struct Loader {
    files: Vec<PathBuf>,
    /// Canonical path of every file read, with where it was included from (`None`: the main
    /// file), to refuse reading one twice.
    seen: HashMap<PathBuf, Option<Origin>>,
    /// The chain of files being read (canonical, as named), to print a cycle.
    stack: Vec<(PathBuf, PathBuf)>,
    sites: Vec<Site>,
    /// Every hostname so far, with where it was declared and by which site.
    hostnames: HashMap<String, (Origin, String)>,
    /// What every site's validation needs to know about the main file.
    rules: SiteRules,
}

/// What validating a site needs from the main file: the inherited header, and whether any
/// listener could ever add one.
#[derive(Clone, Copy)]
struct SiteRules {
    default_header: ForwardedHeader,
    http_listener: bool,
    /// Whether `[defaults]` has a `source_prefix` for `source = "embed"`.
    source_prefix: bool,
    /// The first `http` listener on which a site that sets no `forwarding` of its own gets
    /// the packet engine (the listener's `forwarding`, else `[defaults]`'), to refuse header
    /// sites there.
    packet_http_listener: Option<SocketAddr>,
}

/// Builds a [`Config`] from the main file's text, reading includes relative to `path`.
pub(super) fn load(text: String, path: &Path) -> Result<Config, ConfigError> {
    let main = Source {
        path: path.to_path_buf(),
        text,
    };
    let mut raw = main.parse()?;
    // `backend = "dns"` on listeners and in [defaults], with their spans, before the tables
    // are consumed: whether a listener uses DNS depends on both, and on [dns].
    let listener_backends: Vec<Option<Spanned<String>>> = raw
        .listen
        .iter_mut()
        .map(|l| l.get_mut().backend.take())
        .collect();
    let default_backend = raw
        .defaults
        .as_mut()
        .and_then(|d| d.get_mut().backend.take());
    // A main file given only as text (tests) may not exist; its name then stands for itself.
    let mut listeners = build_listeners(&main, raw.listen)?;
    let http_listener = listeners.iter().any(|l| l.protocol == Protocol::Http);
    let defaults = build_defaults(&main, raw.defaults, http_listener)?;
    let dns = raw
        .dns
        .map(|dns| build_dns(&main, dns, &defaults))
        .transpose()?;
    let default_dns = default_backend
        .as_ref()
        .map(|value| dns_backend(&main, value, "defaults", dns.is_some()))
        .transpose()?
        .unwrap_or(false);
    for (listener, backend) in listeners.iter_mut().zip(listener_backends) {
        let context = format!("listen {}", listener.address);
        listener.dns = match &backend {
            Some(value) => dns_backend(&main, value, &context, dns.is_some())?,
            None => default_dns,
        };
        // DNS backends get [defaults]' header: the same rule as a site's (see build_site).
        let engine = listener.forwarding.unwrap_or(defaults.forwarding);
        if let Some(value) = backend.as_ref().or(default_backend.as_ref())
            && listener.dns
            && listener.protocol == Protocol::Http
            && engine == Forwarding::Packet
            && defaults.forwarded_header != ForwardedHeader::None
        {
            return Err(main.error(
                value.span(),
                format!(
                    "{context}: DNS backends get forwarded_header = \"{}\" from [defaults] on \
                     this http listener, whose forwarding is \"packet\"; {}",
                    defaults.forwarded_header, PACKET_CANNOT_REWRITE
                ),
            ));
        }
    }
    if let Some(dns) = &dns
        && !listeners.iter().any(|l| l.dns)
    {
        return Err(main.error(
            dns.span.clone(),
            "[dns] is set but no listener uses it; add backend = \"dns\" to [defaults] or to a \
             [[listen]]",
        ));
    }
    let dns = dns.map(|d| d.dns);
    let rules = SiteRules {
        default_header: defaults.forwarded_header,
        http_listener,
        source_prefix: defaults.source_prefix.is_some(),
        packet_http_listener: listeners
            .iter()
            .find(|l| {
                l.protocol == Protocol::Http
                    && l.forwarding.unwrap_or(defaults.forwarding) == Forwarding::Packet
            })
            .map(|l| l.address),
    };
    let identity = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut loader = Loader {
        files: vec![main.path.clone()],
        seen: HashMap::from([(identity.clone(), None)]),
        stack: vec![(identity, main.path.clone())],
        sites: Vec::new(),
        hostnames: HashMap::new(),
        rules,
    };
    let xdp = raw
        .xdp
        .map(|xdp| build_xdp(&main, xdp, &listeners))
        .transpose()?;
    let packet = match raw.packet {
        Some(packet) => build_packet(&main, packet)?,
        None => PacketSettings::default(),
    };
    let default_site = match raw.default {
        Some(site) => Some(build_site(&main, site, true, rules)?.0),
        None => None,
    };
    loader.add_sites(&main, raw.site)?;
    loader.add_includes(&main, raw.include)?;
    Ok(Config {
        defaults,
        listeners,
        sites: loader.sites,
        default_site,
        files: loader.files,
        xdp,
        dns,
        packet,
    })
}

/// Why a connection that gets a forwarding header cannot use the packet engine, and what to
/// do about it; the end of every such message.
const PACKET_CANNOT_REWRITE: &str = "the packet engine forwards the byte stream unchanged and \
     cannot insert a header into it; set forwarding to another engine (e.g. \"splice\") for \
     it, or forwarded_header = \"none\"";

/// The largest MSS a `[packet] mss` may set: an IPv4 MTU of 65535 less 40 bytes of headers.
const MAX_MSS: i64 = 65_495;
/// The smallest: the MSS every IPv4 host must accept (RFC 1122, 4.2.2.6).
const MIN_MSS: i64 = 536;

/// Validates `[packet]`.
fn build_packet(src: &Source, raw: Spanned<RawPacket>) -> Result<PacketSettings, ConfigError> {
    let raw = raw.into_inner();
    let mut packet = PacketSettings::default();
    if let Some(list) = raw.interfaces {
        for name in list.into_inner() {
            let text = name.get_ref();
            parse::interface_name(text).map_err(|reason| {
                src.error(
                    name.span(),
                    format!("packet: interface {text:?} is not valid: {reason}"),
                )
            })?;
            if packet.interfaces.contains(text) {
                return Err(src.error(
                    name.span(),
                    format!("packet: interface {text:?} is listed twice"),
                ));
            }
            packet.interfaces.push(name.into_inner());
        }
    }
    if let Some(value) = &raw.after {
        packet.after = size_in(src, value, "packet", "after")?;
        packet.auto_after = Some(packet.after);
    }
    if let Some(value) = &raw.max_connections {
        let n = *value.get_ref();
        let most = proxy_common::PACKET_MAX_CONNECTIONS;
        packet.max_connections = u32::try_from(n)
            .ok()
            .filter(|&n| (1..=most).contains(&n))
            .ok_or_else(|| {
                src.error(
                    value.span(),
                    format!(
                        "packet: max_connections must be between 1 and {most} (the size of the \
                         kernel's table), not {n}"
                    ),
                )
            })?;
    }
    let packet_duration = |value: &Spanned<String>, key: &str, zero_ok: bool| {
        let text = value.get_ref();
        let d = parse::duration(text).map_err(|reason| {
            src.error(
                value.span(),
                format!(
                    "packet: {key} must be a duration like \"10s\", \"500ms\" or \"1h\", not \
                     {text:?}: {reason}"
                ),
            )
        })?;
        if d.is_zero() && !zero_ok {
            return Err(src.error(
                value.span(),
                format!("packet: {key} must be greater than zero"),
            ));
        }
        Ok(d)
    };
    if let Some(value) = &raw.idle_timeout {
        packet.idle_timeout = packet_duration(value, "idle_timeout", false)?;
    }
    // Zero is allowed: entries then go as soon as both FINs are acknowledged.
    if let Some(value) = &raw.linger {
        packet.linger = packet_duration(value, "linger", true)?;
    }
    if let Some(value) = &raw.drain_timeout {
        packet.drain_timeout = packet_duration(value, "drain_timeout", false)?;
    }
    if let Some(value) = &raw.keep_on_stop {
        // Keeping handed-off connections across a stop needs the next process to adopt the
        // pinned table and programs (docs/packet-engine.md section 6), which is not built: a
        // `true` that did nothing would promise what a restart then breaks.
        if *value.get_ref() {
            return Err(src.error(
                value.span(),
                "packet: keep_on_stop = true is not supported yet: handed-off connections end \
                 when spliced stops or restarts (their peers get a reset); leave it out or set \
                 it to false"
                    .to_string(),
            ));
        }
        packet.keep_on_stop = false;
    }
    if let Some(value) = &raw.mss {
        let n = *value.get_ref();
        // 0, as in docs/packet-engine.md section 8, means what leaving it out means.
        packet.mss = match n {
            0 => None,
            MIN_MSS..=MAX_MSS => u16::try_from(n).ok(),
            _ => {
                return Err(src.error(
                    value.span(),
                    format!(
                        "packet: mss must be between {MIN_MSS} and {MAX_MSS}, not {n} (leave it \
                         out, or 0, to derive it from the interfaces' MTU)"
                    ),
                ));
            }
        };
    }
    Ok(packet)
}

/// A site's or `[dns]`' `source`: `"proxy"` or `"embed"`, which needs `[defaults]
/// source_prefix`.
fn source_address(
    src: &Source,
    value: &Spanned<String>,
    context: &str,
    have_prefix: bool,
) -> Result<SourceAddress, ConfigError> {
    match value.get_ref().as_str() {
        "proxy" => Ok(SourceAddress::Proxy),
        "embed" if have_prefix => Ok(SourceAddress::Embed),
        "embed" => Err(src.error(
            value.span(),
            format!(
                "{context}: source = \"embed\" needs source_prefix in [defaults], e.g. \
                 source_prefix = \"2001:db8:4646::/96\""
            ),
        )),
        other => Err(src.error(
            value.span(),
            format!("{context}: source must be \"proxy\" or \"embed\", not {other:?}"),
        )),
    }
}

/// A listener's or `[defaults]`' `backend`: `"dns"` (look up names no site claims) or
/// `"none"` (refuse them, the default). `"dns"` needs a `[dns]` section.
fn dns_backend(
    src: &Source,
    value: &Spanned<String>,
    context: &str,
    have_dns: bool,
) -> Result<bool, ConfigError> {
    match value.get_ref().as_str() {
        "none" => Ok(false),
        "dns" if have_dns => Ok(true),
        "dns" => Err(src.error(
            value.span(),
            format!(
                "{context}: backend = \"dns\" needs a [dns] section with allowed_backends, \
                 e.g. [dns] allowed_backends = [\"2001:db8:1::/48\"]"
            ),
        )),
        other => Err(src.error(
            value.span(),
            format!(
                "{context}: backend must be \"dns\" or \"none\", not {other:?} (site \
                 backends are set in [[site]])"
            ),
        )),
    }
}

/// A validated `[dns]` with its span, to point at it when no listener uses it.
struct SpannedDns {
    dns: Dns,
    span: Range<usize>,
}

/// Validates `[dns]`: the fence (`allowed_backends`, IPv6 networks only), the servers, and the
/// timings, of which the lookup timeout must fit in `connect_timeout`.
fn build_dns(
    src: &Source,
    raw: Spanned<RawDns>,
    defaults: &Defaults,
) -> Result<SpannedDns, ConfigError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let Some(list) = raw.allowed_backends else {
        return Err(src.error(
            span.clone(),
            "[dns] has no allowed_backends; resolved backends must be fenced in, e.g. \
             allowed_backends = [\"2001:db8:1::/48\"]",
        ));
    };
    if list.get_ref().is_empty() {
        return Err(src.error(
            list.span(),
            "dns: allowed_backends is empty; no resolved backend could ever be used",
        ));
    }
    let mut allowed_backends = Vec::new();
    for entry in list.into_inner() {
        let cidr = network(src, &entry, "dns: allowed_backends")?;
        if cidr.addr.is_ipv4() {
            return Err(src.error(
                entry.span(),
                format!(
                    "dns: allowed_backends {:?} is an IPv4 network; DNS backends are IPv6 \
                     (AAAA records)",
                    entry.get_ref()
                ),
            ));
        }
        if cidr.prefix < 16 {
            return Err(src.error(
                entry.span(),
                format!(
                    "dns: allowed_backends {:?} is wider than a /16; list the backend networks \
                     themselves, or anyone's DNS name could send connections anywhere",
                    entry.get_ref()
                ),
            ));
        }
        allowed_backends.push(cidr);
    }
    let servers = match raw.servers {
        None => None,
        Some(list) => {
            if list.get_ref().is_empty() {
                return Err(src.error(
                    list.span(),
                    "dns: servers is empty; leave it out to use /etc/resolv.conf",
                ));
            }
            let mut servers = Vec::new();
            for entry in list.into_inner() {
                let text = entry.get_ref();
                let server = match parse::backend_addr(text) {
                    Ok((ip, port)) => SocketAddr::new(ip, port.unwrap_or(53)),
                    Err(reason) => {
                        return Err(src.error(
                            entry.span(),
                            format!("dns: server {text:?} is not valid: {reason}"),
                        ));
                    }
                };
                servers.push(server);
            }
            Some(servers)
        }
    };
    let dns_duration = |value: &Spanned<String>, key: &str| {
        let text = value.get_ref();
        let d = parse::duration(text).map_err(|reason| {
            src.error(
                value.span(),
                format!(
                    "dns: {key} must be a duration like \"1s\", \"250ms\" or \"5m\", not \
                     {text:?}: {reason}"
                ),
            )
        })?;
        if d.is_zero() {
            return Err(src.error(
                value.span(),
                format!("dns: {key} must be greater than zero"),
            ));
        }
        Ok(d)
    };
    let timeout = match &raw.timeout {
        None => Duration::from_secs(1).min(defaults.connect_timeout),
        Some(value) => {
            let d = dns_duration(value, "timeout")?;
            if d > defaults.connect_timeout {
                return Err(src.error(
                    value.span(),
                    format!(
                        "dns: timeout {} is longer than connect_timeout {}; the lookup is part \
                         of connecting",
                        parse::format_duration(d),
                        parse::format_duration(defaults.connect_timeout)
                    ),
                ));
            }
            d
        }
    };
    let ttl_floor = match &raw.ttl_floor {
        None => Duration::from_secs(5),
        Some(value) => dns_duration(value, "ttl_floor")?,
    };
    let ttl_ceiling = match &raw.ttl_ceiling {
        None => Duration::from_secs(300).max(ttl_floor),
        Some(value) => {
            let d = dns_duration(value, "ttl_ceiling")?;
            if d < ttl_floor {
                return Err(src.error(
                    value.span(),
                    format!(
                        "dns: ttl_ceiling {} is shorter than ttl_floor {}",
                        parse::format_duration(d),
                        parse::format_duration(ttl_floor)
                    ),
                ));
            }
            d
        }
    };
    let negative_ttl = match &raw.negative_ttl {
        None => Duration::from_secs(5),
        Some(value) => dns_duration(value, "negative_ttl")?,
    };
    let proxy_protocol = match &raw.proxy_protocol {
        None => Version::None,
        Some(value) => parse::proxy_version(value.get_ref()).ok_or_else(|| {
            src.error(
                value.span(),
                format!(
                    "dns: proxy_protocol must be one of none, v1, v2, not {:?}",
                    value.get_ref()
                ),
            )
        })?,
    };
    let source = match &raw.source {
        None => SourceAddress::Proxy,
        Some(value) => source_address(src, value, "dns", defaults.source_prefix.is_some())?,
    };
    Ok(SpannedDns {
        dns: Dns {
            allowed_backends,
            servers,
            timeout,
            ttl_floor,
            ttl_ceiling,
            negative_ttl,
            proxy_protocol,
            source,
            origin: src.origin(span.clone()),
        },
        span,
    })
}

impl Loader {
    fn add_sites(&mut self, src: &Source, sites: Vec<Spanned<RawSite>>) -> Result<(), ConfigError> {
        for raw in sites {
            let (site, spans) = build_site(src, raw, false, self.rules)?;
            for (hostname, span) in site.hostnames.iter().zip(spans) {
                match self.hostnames.entry(hostname.clone()) {
                    Entry::Occupied(first) => {
                        let (origin, name) = first.get();
                        return Err(src.error(
                            span,
                            format!(
                                "site {:?}: hostname {hostname:?} is already used by site {name:?} \
                                 at {origin}",
                                site.name
                            ),
                        ));
                    }
                    Entry::Vacant(slot) => {
                        slot.insert((src.origin(span), site.name.clone()));
                    }
                }
            }
            self.sites.push(site);
        }
        Ok(())
    }

    fn add_includes(
        &mut self,
        src: &Source,
        include: Option<SpannedStrings>,
    ) -> Result<(), ConfigError> {
        for pattern in include.map(Spanned::into_inner).unwrap_or_default() {
            for path in expand(src, &pattern)? {
                self.include_file(src, &pattern, path)?;
            }
        }
        Ok(())
    }

    fn include_file(
        &mut self,
        src: &Source,
        pattern: &Spanned<String>,
        path: PathBuf,
    ) -> Result<(), ConfigError> {
        let unreadable = |e: io::Error| {
            let what = if e.kind() == io::ErrorKind::NotFound {
                "does not exist".to_string()
            } else {
                format!("cannot be read: {e}")
            };
            src.error(
                pattern.span(),
                format!("included file {} {what}", path.display()),
            )
        };
        let identity = std::fs::canonicalize(&path).map_err(unreadable)?;
        if let Some(start) = self.stack.iter().position(|(id, _)| *id == identity) {
            let chain: Vec<String> = self.stack[start..]
                .iter()
                .map(|(_, named)| named.display().to_string())
                .chain([path.display().to_string()])
                .collect();
            return Err(src.error(
                pattern.span(),
                format!("include cycle: {}", chain.join(" -> ")),
            ));
        }
        if let Some(first) = self.seen.get(&identity) {
            let first = match first {
                Some(origin) => format!("by {origin}"),
                None => "as the main file".to_string(),
            };
            return Err(src.error(
                pattern.span(),
                format!(
                    "{} is already included {first}; reading it twice would define its sites twice",
                    path.display()
                ),
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(unreadable)?;
        self.seen
            .insert(identity.clone(), Some(src.origin(pattern.span())));
        let child = Source {
            path: path.clone(),
            text,
        };
        let raw = child.parse()?;
        let main_only = "is only allowed in the main configuration file; included files may \
                         contain [[site]] entries and include only";
        if let Some(defaults) = &raw.defaults {
            return Err(child.error(defaults.span(), format!("[defaults] {main_only}")));
        }
        if let Some(listen) = raw.listen.first() {
            return Err(child.error(listen.span(), format!("[[listen]] {main_only}")));
        }
        if let Some(default) = &raw.default {
            return Err(child.error(default.span(), format!("[default] {main_only}")));
        }
        if let Some(xdp) = &raw.xdp {
            return Err(child.error(xdp.span(), format!("[xdp] {main_only}")));
        }
        if let Some(dns) = &raw.dns {
            return Err(child.error(dns.span(), format!("[dns] {main_only}")));
        }
        if let Some(packet) = &raw.packet {
            return Err(child.error(packet.span(), format!("[packet] {main_only}")));
        }
        self.files.push(path.clone());
        self.stack.push((identity, path));
        self.add_sites(&child, raw.site)?;
        self.add_includes(&child, raw.include)?;
        self.stack.pop();
        Ok(())
    }
}

/// Turns one `include` entry into the files it names, sorted.
fn expand(src: &Source, pattern: &Spanned<String>) -> Result<Vec<PathBuf>, ConfigError> {
    let text = pattern.get_ref();
    if text.is_empty() {
        return Err(src.error(pattern.span(), "include: the path is empty"));
    }
    let dir = src.path.parent().unwrap_or(Path::new(""));
    if !text.contains(['*', '?', '[']) {
        return Ok(vec![dir.join(text)]);
    }
    // The including file's directory is taken literally: a '[' in it must not act as a glob.
    let full = if Path::new(text).is_absolute() || dir.as_os_str().is_empty() {
        text.clone()
    } else {
        let dir = dir.to_str().ok_or_else(|| {
            src.error(
                pattern.span(),
                format!(
                    "include {text:?}: cannot expand a glob in {}, whose name is not UTF-8",
                    dir.display()
                ),
            )
        })?;
        format!("{}/{text}", glob::Pattern::escape(dir))
    };
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let prefix_chars = full.chars().count() - text.chars().count();
    let paths = glob::glob_with(&full, options).map_err(|e| {
        src.error(
            pattern.span(),
            format!(
                "include {text:?} is not a valid glob: {} (near character {})",
                e.msg,
                e.pos.saturating_sub(prefix_chars) + 1
            ),
        )
    })?;
    let mut files = Vec::new();
    for entry in paths {
        let path = entry.map_err(|e| {
            src.error(
                pattern.span(),
                format!(
                    "include {text:?}: cannot read {}: {}",
                    e.path().display(),
                    e.error()
                ),
            )
        })?;
        files.push(path);
    }
    files.sort();
    Ok(files)
}

fn build_defaults(
    src: &Source,
    raw: Option<Spanned<RawDefaults>>,
    http_listener: bool,
) -> Result<Defaults, ConfigError> {
    let mut defaults = Defaults::default();
    let Some(raw) = raw.map(Spanned::into_inner) else {
        return Ok(defaults);
    };
    if let Some(value) = raw.forwarding {
        defaults.forwarding = forwarding(src, &value, "defaults")?;
    }
    if let Some(value) = raw.client_hello_timeout {
        defaults.client_hello_timeout = timeout(src, &value, "client_hello_timeout")?;
    }
    if let Some(value) = raw.connect_timeout {
        defaults.connect_timeout = timeout(src, &value, "connect_timeout")?;
    }
    if let Some(value) = raw.idle_timeout {
        let idle = duration(src, &value, "idle_timeout")?;
        defaults.idle_timeout = (!idle.is_zero()).then_some(idle);
    }
    if let Some(value) = raw.max_connections {
        let n = *value.get_ref();
        defaults.max_connections = usize::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
            src.error(
                value.span(),
                format!("defaults: max_connections must be at least 1, not {n}"),
            )
        })?;
    }
    if let Some(value) = raw.max_connections_per_source {
        let n = *value.get_ref();
        let per_source = usize::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
            src.error(
                value.span(),
                format!(
                    "defaults: max_connections_per_source must be at least 1, not {n} (leave \
                     it out for no limit)"
                ),
            )
        })?;
        // Above the global limit it could never act: most likely a slip of a digit.
        if per_source > defaults.max_connections {
            return Err(src.error(
                value.span(),
                format!(
                    "defaults: max_connections_per_source ({per_source}) is more than \
                     max_connections ({}), so it would never apply",
                    defaults.max_connections
                ),
            ));
        }
        defaults.max_connections_per_source = Some(per_source);
    }
    if let Some(value) = &raw.sockmap_backlog_limit {
        let bytes = size_value(src, value, "sockmap_backlog_limit")?;
        if bytes == 0 {
            return Err(src.error(
                value.span(),
                "defaults: sockmap_backlog_limit must be greater than zero",
            ));
        }
        defaults.sockmap_backlog_limit = bytes;
    }
    if let Some(value) = &raw.sockmap_handoff {
        defaults.sockmap_handoff = size_value(src, value, "sockmap_handoff")?;
    }
    if let Some(value) = raw.forwarded_header {
        defaults.forwarded_header = forwarded_header(src, &value, "defaults", http_listener)?;
    }
    if let Some(list) = raw.trusted_proxies {
        for entry in list.into_inner() {
            let cidr = network(src, &entry, "defaults: trusted_proxies")?;
            defaults.trusted_proxies.push(cidr);
        }
    }
    if let Some(value) = raw.max_request_head {
        let bytes = size_value(src, &value, "max_request_head")?;
        // Below 1 KiB ordinary browser requests fail; above 1 MiB one client holds too much.
        if !(1 << 10..=1 << 20).contains(&bytes) {
            return Err(src.error(
                value.span(),
                "defaults: max_request_head must be between 1KiB and 1MiB",
            ));
        }
        defaults.max_request_head = usize::try_from(bytes).unwrap_or(1 << 20);
    }
    if let Some(value) = raw.source_prefix {
        let cidr = network(src, &value, "defaults: source_prefix")?;
        if !cidr.addr.is_ipv6() || cidr.prefix != 96 {
            return Err(src.error(
                value.span(),
                format!(
                    "defaults: source_prefix {:?} must be an IPv6 /96, such as \
                     \"2001:db8:4646::/96\": the client's 32-bit IPv4 address fills the rest",
                    value.get_ref()
                ),
            ));
        }
        defaults.source_prefix = Some(cidr);
    }
    Ok(defaults)
}

/// A size in `[defaults]` (`"4MiB"`, `"512KiB"` or a number of bytes), with the key named in
/// the error.
fn size_value(src: &Source, value: &Spanned<RawSize>, key: &str) -> Result<u64, ConfigError> {
    size_in(src, value, "defaults", key)
}

/// A size in `section` (`"4MiB"`, `"512KiB"` or a number of bytes), with the section and key
/// named in the error.
fn size_in(
    src: &Source,
    value: &Spanned<RawSize>,
    section: &str,
    key: &str,
) -> Result<u64, ConfigError> {
    match value.get_ref() {
        RawSize::Text(text) => parse::size(text).map_err(|reason| {
            src.error(
                value.span(),
                format!(
                    "{section}: {key} must be a size like \"4MiB\", \"512KiB\" or \"1048576\", \
                     not {text:?}: {reason}"
                ),
            )
        }),
        RawSize::Bytes(n) => u64::try_from(*n).map_err(|_| {
            src.error(
                value.span(),
                format!("{section}: {key} cannot be negative, not {n}"),
            )
        }),
    }
}

fn duration(src: &Source, value: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
    let text = value.get_ref();
    parse::duration(text).map_err(|reason| {
        src.error(
            value.span(),
            format!(
                "defaults: {key} must be a duration like \"5s\", \"250ms\" or \"1m\", not \
                 {text:?}: {reason}"
            ),
        )
    })
}

/// A duration that must not be zero: a zero timeout would refuse every connection.
fn timeout(src: &Source, value: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
    let d = duration(src, value, key)?;
    if d.is_zero() {
        return Err(src.error(
            value.span(),
            format!("defaults: {key} must be greater than zero"),
        ));
    }
    Ok(d)
}

/// Parses a `forwarded_header` value; one other than `none` needs an `http` listener, since
/// only there can a header be added.
fn forwarded_header(
    src: &Source,
    value: &Spanned<String>,
    context: &str,
    http_listener: bool,
) -> Result<ForwardedHeader, ConfigError> {
    let header = parse::forwarded_header(value.get_ref()).ok_or_else(|| {
        src.error(
            value.span(),
            format!(
                "{context}: forwarded_header must be one of x-forwarded-for, forwarded, none, \
                 not {:?}",
                value.get_ref()
            ),
        )
    })?;
    if header != ForwardedHeader::None && !http_listener {
        return Err(src.error(
            value.span(),
            format!(
                "{context}: forwarded_header = \"{header}\" needs a [[listen]] with protocol = \
                 \"http\": a header can only be added to plain HTTP, and there is no such \
                 listener (TLS is forwarded encrypted; use proxy_protocol there)"
            ),
        ));
    }
    Ok(header)
}

fn forwarding(
    src: &Source,
    value: &Spanned<String>,
    context: &str,
) -> Result<Forwarding, ConfigError> {
    parse::forwarding(value.get_ref()).ok_or_else(|| {
        src.error(
            value.span(),
            format!(
                "{context}: forwarding must be one of auto, sockmap, splice, copy, packet, not {:?}",
                value.get_ref()
            ),
        )
    })
}

fn build_listeners(
    src: &Source,
    raw: Vec<Spanned<RawListener>>,
) -> Result<Vec<Listener>, ConfigError> {
    if raw.is_empty() {
        return Err(src.error_without_position(
            "no [[listen]] entry; the proxy needs at least one, e.g. \
             [[listen]] address = \"0.0.0.0:443\" protocol = \"tls\"",
        ));
    }
    let mut seen: HashMap<SocketAddr, Origin> = HashMap::new();
    let mut listeners = Vec::with_capacity(raw.len());
    for entry in raw {
        let span = entry.span();
        let entry = entry.into_inner();
        let Some(address_value) = entry.address else {
            return Err(src.error(
                span,
                "[[listen]] has no address, e.g. address = \"0.0.0.0:443\"",
            ));
        };
        let text = address_value.get_ref();
        let address = parse::listen_addr(text).map_err(|reason| {
            src.error(
                address_value.span(),
                format!("listen: address {text:?} is not valid: {reason}"),
            )
        })?;
        let Some(protocol) = entry.protocol else {
            return Err(src.error(
                span,
                format!("listen {address}: protocol is missing (tls or http)"),
            ));
        };
        let protocol = parse::protocol(protocol.get_ref()).ok_or_else(|| {
            src.error(
                protocol.span(),
                format!(
                    "listen {address}: protocol must be tls or http, not {:?}",
                    protocol.get_ref()
                ),
            )
        })?;
        let context = format!("listen {address}");
        let forwarding = entry
            .forwarding
            .map(|f| forwarding(src, &f, &context))
            .transpose()?;
        match seen.entry(address) {
            Entry::Occupied(first) => {
                return Err(src.error(
                    address_value.span(),
                    format!(
                        "listen: address {address} is already used by the listener at {}",
                        first.get()
                    ),
                ));
            }
            Entry::Vacant(slot) => {
                slot.insert(src.origin(span));
            }
        }
        let mut accept_proxy = Vec::new();
        for entry in entry
            .accept_proxy
            .map(Spanned::into_inner)
            .unwrap_or_default()
        {
            accept_proxy.push(network(src, &entry, &format!("{context}: accept_proxy"))?);
        }
        listeners.push(Listener {
            address,
            protocol,
            forwarding,
            accept_proxy,
            // Set by `load`, which knows [defaults] and [dns].
            dns: false,
        });
    }
    Ok(listeners)
}

/// A network written as `"addr/prefix"`, refused when bits after the prefix are set (a typo
/// that would otherwise silently widen or move the network).
fn network(src: &Source, entry: &Spanned<String>, key: &str) -> Result<Cidr, ConfigError> {
    let text = entry.get_ref();
    let (addr, prefix) = parse::cidr(text).map_err(|reason| {
        src.error(
            entry.span(),
            format!("{key} {text:?} is not valid: {reason}"),
        )
    })?;
    let cidr = Cidr {
        addr: parse::network(addr, prefix),
        prefix,
    };
    if cidr.addr != addr {
        return Err(src.error(
            entry.span(),
            format!("{key} {text:?} has bits set after the prefix; the network is {cidr}"),
        ));
    }
    Ok(cidr)
}

/// Validates `[xdp]`; without a `ports` key the filter guards the ports of `listeners`.
fn build_xdp(
    src: &Source,
    raw: Spanned<RawXdp>,
    listeners: &[Listener],
) -> Result<Xdp, ConfigError> {
    let span = raw.span();
    let raw = raw.into_inner();

    let Some(list) = raw.interfaces else {
        return Err(src.error(
            span,
            "[xdp] has no interfaces, e.g. interfaces = [\"eth0\"]",
        ));
    };
    if list.get_ref().is_empty() {
        return Err(src.error(list.span(), "xdp: interfaces is empty"));
    }
    let mut interfaces: Vec<String> = Vec::with_capacity(list.get_ref().len());
    for name in list.into_inner() {
        let text = name.get_ref();
        parse::interface_name(text).map_err(|reason| {
            src.error(
                name.span(),
                format!("xdp: interface {text:?} is not valid: {reason}"),
            )
        })?;
        if interfaces.contains(text) {
            return Err(src.error(
                name.span(),
                format!("xdp: interface {text:?} is listed twice"),
            ));
        }
        interfaces.push(name.into_inner());
    }

    let mode = match raw.mode {
        None => XdpMode::Auto,
        Some(value) => parse::xdp_mode(value.get_ref()).ok_or_else(|| {
            src.error(
                value.span(),
                format!(
                    "xdp: mode must be one of auto, native, generic, not {:?}",
                    value.get_ref()
                ),
            )
        })?,
    };

    let mut deny = Vec::new();
    // Each network with the text it was written as, to name both spellings of a duplicate.
    let mut seen: HashMap<Cidr, String> = HashMap::new();
    for entry in raw.deny.map(Spanned::into_inner).unwrap_or_default() {
        let text = entry.get_ref();
        let cidr = network(src, &entry, "xdp: deny")?;
        match seen.entry(cidr) {
            Entry::Occupied(first) if first.get() == text => {
                return Err(src.error(entry.span(), format!("xdp: deny {text:?} is listed twice")));
            }
            Entry::Occupied(first) => {
                return Err(src.error(
                    entry.span(),
                    format!(
                        "xdp: deny {text:?} is listed twice: {:?} is the same network, {cidr}",
                        first.get()
                    ),
                ));
            }
            Entry::Vacant(slot) => {
                slot.insert(text.clone());
            }
        }
        deny.push(cidr);
    }

    let count = |value: &Spanned<i64>, key: &str| {
        let n = *value.get_ref();
        if n < 1 {
            return Err(src.error(
                value.span(),
                format!("xdp: {key} must be at least 1, not {n}"),
            ));
        }
        u32::try_from(n).map_err(|_| {
            src.error(
                value.span(),
                format!("xdp: {key} must be at most {}, not {n}", u32::MAX),
            )
        })
    };
    let syn_limit = match (&raw.syn_rate_per_source, &raw.syn_burst) {
        (None, None) => None,
        (None, Some(burst)) => {
            return Err(src.error(
                burst.span(),
                "xdp: syn_burst needs syn_rate_per_source; without a rate there is no SYN limit \
                 for a burst to size",
            ));
        }
        (Some(rate), burst) => {
            let rate_per_second = count(rate, "syn_rate_per_source")?;
            let burst = match burst {
                Some(burst) => count(burst, "syn_burst")?,
                None => rate_per_second,
            };
            Some(SynLimit {
                rate_per_second,
                burst,
            })
        }
    };

    let ports = match raw.ports {
        Some(list) => {
            if list.get_ref().is_empty() {
                return Err(src.error(
                    list.span(),
                    "xdp: ports is empty; leave it out to guard the listeners' ports",
                ));
            }
            let mut ports: Vec<u16> = Vec::with_capacity(list.get_ref().len());
            for value in list.into_inner() {
                let n = *value.get_ref();
                let port = u16::try_from(n).ok().filter(|&p| p != 0).ok_or_else(|| {
                    src.error(
                        value.span(),
                        format!("xdp: ports must be between 1 and 65535, not {n}"),
                    )
                })?;
                if ports.contains(&port) {
                    return Err(
                        src.error(value.span(), format!("xdp: port {port} is listed twice"))
                    );
                }
                ports.push(port);
            }
            ports.sort_unstable();
            ports
        }
        None => {
            let mut ports: Vec<u16> = listeners.iter().map(|l| l.address.port()).collect();
            ports.sort_unstable();
            ports.dedup();
            ports
        }
    };

    Ok(Xdp {
        interfaces,
        mode,
        deny,
        syn_limit,
        ports,
    })
}

/// Validates one `[[site]]` (or `[default]` when `is_default`) and returns it with the span of
/// each hostname, for the duplicate check.
fn build_site(
    src: &Source,
    raw: Spanned<RawSite>,
    is_default: bool,
    rules: SiteRules,
) -> Result<(Site, Vec<Range<usize>>), ConfigError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let mut hostnames = Vec::new();
    let mut spans = Vec::new();
    let context = if is_default {
        if let Some(list) = &raw.hostnames {
            return Err(src.error(
                list.span(),
                "default site: hostnames are not allowed here; the default site receives every \
                 name that no site claims",
            ));
        }
        "default site".to_string()
    } else {
        let Some(list) = raw.hostnames else {
            return Err(src.error(span, "[[site]] has no hostnames"));
        };
        let Some(first) = list.get_ref().first() else {
            return Err(src.error(list.span(), "[[site]]: hostnames is empty"));
        };
        let first = first.get_ref();
        let context = format!(
            "site {:?}",
            crate::name::normalize(first).unwrap_or_else(|| first.clone())
        );
        for hostname in list.into_inner() {
            let normalized = parse::hostname(hostname.get_ref()).map_err(|reason| {
                src.error(
                    hostname.span(),
                    format!(
                        "{context}: hostname {:?} is not valid: {reason}",
                        hostname.get_ref()
                    ),
                )
            })?;
            hostnames.push(normalized);
            spans.push(hostname.span());
        }
        context
    };

    let Some(backend) = raw.backend else {
        return Err(src.error(span, format!("{context}: backend is missing")));
    };
    let backend = build_backend(src, backend, &context)?;

    let proxy_protocol = match &raw.proxy_protocol {
        None => Version::None,
        Some(value) => parse::proxy_version(value.get_ref()).ok_or_else(|| {
            src.error(
                value.span(),
                format!(
                    "{context}: proxy_protocol must be one of none, v1, v2, not {:?}",
                    value.get_ref()
                ),
            )
        })?,
    };

    let tlvs = match raw.proxy_protocol_tlvs {
        None if proxy_protocol == Version::V2 => Tlvs {
            authority: true,
            ..Tlvs::default()
        },
        None => Tlvs::default(),
        Some(list) if proxy_protocol != Version::V2 => {
            let version = raw
                .proxy_protocol
                .as_ref()
                .map_or("none (the default)".to_string(), |v| {
                    format!("{:?}", v.get_ref())
                });
            return Err(src.error(
                list.span(),
                format!(
                    "{context}: proxy_protocol_tlvs needs proxy_protocol = \"v2\", but it is \
                     {version}"
                ),
            ));
        }
        Some(list) => {
            let mut tlvs = Tlvs::default();
            for name in list.into_inner() {
                let flag = match name.get_ref().as_str() {
                    "authority" => &mut tlvs.authority,
                    "crc32c" => &mut tlvs.crc32c,
                    "unique_id" => &mut tlvs.unique_id,
                    other => {
                        return Err(src.error(
                            name.span(),
                            format!(
                                "{context}: proxy_protocol_tlvs: unknown TLV {other:?}; the \
                                 known ones are authority, crc32c, unique_id"
                            ),
                        ));
                    }
                };
                *flag = true;
            }
            tlvs
        }
    };

    let forwarding = raw
        .forwarding
        .as_ref()
        .map(|f| forwarding(src, f, &context))
        .transpose()?;

    let forwarded_header = match &raw.forwarded_header {
        None => rules.default_header,
        Some(value) => {
            let header = forwarded_header(src, value, &context, rules.http_listener)?;
            if header != ForwardedHeader::None && backend.for_listener(Protocol::Http, 80).is_none()
            {
                return Err(src.error(
                    value.span(),
                    format!(
                        "{context}: forwarded_header = \"{header}\" needs an http backend, but \
                         this site's backend only has tls; a header can only be added to plain \
                         HTTP (use proxy_protocol for TLS)"
                    ),
                ));
            }
            header
        }
    };

    // The header engine rewrites the stream; the packet engine cannot (its sequence offsets
    // are constant, docs/packet-engine.md section 1). Refused rather than quietly served by
    // another engine: the file asks for two things that cannot both be had.
    if forwarded_header != ForwardedHeader::None
        && rules.http_listener
        && backend.for_listener(Protocol::Http, 80).is_some()
    {
        let conflict = match (&raw.forwarding, forwarding) {
            (Some(value), Some(Forwarding::Packet)) => Some((
                value.span(),
                "this site's forwarding is \"packet\"".to_string(),
            )),
            (None, _) => rules.packet_http_listener.map(|address| {
                let at = raw
                    .forwarded_header
                    .as_ref()
                    .map_or(span.clone(), Spanned::span);
                (
                    at,
                    format!("the http listener {address} forwards with \"packet\""),
                )
            }),
            _ => None,
        };
        if let Some((at, why)) = conflict {
            return Err(src.error(
                at,
                format!(
                    "{context}: forwarded_header = \"{forwarded_header}\" adds a header to every \
                     request on http listeners, but {why}: {PACKET_CANNOT_REWRITE}"
                ),
            ));
        }
    }

    let source = match &raw.source {
        None => SourceAddress::Proxy,
        Some(value) => source_address(src, value, &context, rules.source_prefix)?,
    };

    let site = Site {
        name: hostnames
            .first()
            .cloned()
            .unwrap_or_else(|| "default".to_string()),
        hostnames,
        backend,
        proxy_protocol,
        tlvs,
        forwarding,
        forwarded_header,
        source,
        origin: src.origin(span),
    };
    Ok((site, spans))
}

fn build_backend(
    src: &Source,
    raw: Spanned<RawBackend>,
    context: &str,
) -> Result<Backend, ConfigError> {
    let span = raw.span();
    match raw.into_inner() {
        RawBackend::Addr(text) => parse::backend_addr(&text)
            .map(|(ip, port)| Backend::Addr { ip, port })
            .map_err(|reason| {
                src.error(
                    span,
                    format!("{context}: backend {text:?} is not valid: {reason}"),
                )
            }),
        RawBackend::PerProtocol(table) => {
            let side = |value: Option<Spanned<String>>, protocol: Protocol| {
                value
                    .map(|value| {
                        parse::backend_socket(value.get_ref()).map_err(|reason| {
                            src.error(
                                value.span(),
                                format!(
                                    "{context}: backend.{protocol} {:?} is not valid: {reason}",
                                    value.get_ref()
                                ),
                            )
                        })
                    })
                    .transpose()
            };
            let tls = side(table.tls, Protocol::Tls)?;
            let http = side(table.http, Protocol::Http)?;
            if tls.is_none() && http.is_none() {
                return Err(src.error(
                    span,
                    format!("{context}: backend needs an address for at least one of tls, http"),
                ));
            }
            Ok(Backend::PerProtocol { tls, http })
        }
    }
}
