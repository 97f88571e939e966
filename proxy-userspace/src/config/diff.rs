//! What a reload would change: a configuration as a table of entries (each site, the default
//! site, each listener, `[defaults]`, `[xdp]`), each a list of `field=value`, and the
//! difference between two such tables.
//!
//! The table has a text form (one entry per line, tab-separated), which a running spliced
//! serves at `/config` on its metrics endpoint, so `spliced check --against ADDR` compares a
//! file with what is actually running, not with a file that may have been edited since.
use std::{collections::BTreeMap, fmt::Write as _};

use super::{Config, PacketSettings, Site, parse, version_str};

/// Fields a reload cannot change, by entry: the diff says so next to them.
const RESTART_ONLY: &[(&str, &str)] = &[("packet", "max_connections"), ("packet", "interfaces")];

impl PacketSettings {
    /// The `[packet]` keys that differ between `self` (running) and `new` but take effect only
    /// after a restart: `max_connections` sizes the kernel's table when it is created, and the
    /// programs are attached to `interfaces` at start.
    pub fn restart_needed(&self, new: &PacketSettings) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.max_connections != new.max_connections {
            keys.push("max_connections");
        }
        if self.interfaces != new.interfaces {
            keys.push("interfaces");
        }
        keys
    }
}

/// Entries by key (`site a.example`, `default site`, `listen 0.0.0.0:443`, `defaults`, `xdp`),
/// each a list of `(field, value)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table(BTreeMap<String, Vec<(String, String)>>);

fn site_fields(site: &Site) -> Vec<(String, String)> {
    let tlvs: Vec<&str> = [
        (site.tlvs.authority, "authority"),
        (site.tlvs.crc32c, "crc32c"),
        (site.tlvs.unique_id, "unique_id"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| *name)
    .collect();
    vec![
        ("hostnames".into(), site.hostnames.join(",")),
        ("backend".into(), site.backend.to_string()),
        (
            "proxy_protocol".into(),
            version_str(site.proxy_protocol).into(),
        ),
        ("proxy_protocol_tlvs".into(), tlvs.join(",")),
        (
            "forwarding".into(),
            site.forwarding.map_or("-".into(), |f| f.to_string()),
        ),
        ("forwarded_header".into(), site.forwarded_header.to_string()),
    ]
}

impl Table {
    /// The table of `config`.
    pub fn of(config: &Config) -> Table {
        let mut entries = BTreeMap::new();
        for site in &config.sites {
            entries.insert(format!("site {}", site.name), site_fields(site));
        }
        if let Some(site) = &config.default_site {
            entries.insert("default site".into(), site_fields(site));
        }
        for l in &config.listeners {
            entries.insert(
                format!("listen {}", l.address),
                vec![
                    ("protocol".into(), l.protocol.to_string()),
                    (
                        "forwarding".into(),
                        l.forwarding.map_or("-".into(), |f| f.to_string()),
                    ),
                ],
            );
        }
        let d = &config.defaults;
        let trusted: Vec<String> = d.trusted_proxies.iter().map(ToString::to_string).collect();
        entries.insert(
            "defaults".into(),
            vec![
                ("forwarding".into(), d.forwarding.to_string()),
                (
                    "client_hello_timeout".into(),
                    parse::format_duration(d.client_hello_timeout),
                ),
                (
                    "connect_timeout".into(),
                    parse::format_duration(d.connect_timeout),
                ),
                (
                    "idle_timeout".into(),
                    d.idle_timeout.map_or("none".into(), parse::format_duration),
                ),
                ("max_connections".into(), d.max_connections.to_string()),
                (
                    "max_connections_per_source".into(),
                    d.max_connections_per_source
                        .map_or("none".into(), |n| n.to_string()),
                ),
                (
                    "sockmap_backlog_limit".into(),
                    parse::format_size(d.sockmap_backlog_limit),
                ),
                (
                    "sockmap_handoff".into(),
                    parse::format_size(d.sockmap_handoff),
                ),
                ("forwarded_header".into(), d.forwarded_header.to_string()),
                ("trusted_proxies".into(), trusted.join(",")),
                (
                    "max_request_head".into(),
                    parse::format_size(d.max_request_head as u64),
                ),
            ],
        );
        // Only when the engine is named or configured, so that tables of configurations
        // without it stay as they were.
        if config.names_packet() || config.packet != PacketSettings::default() {
            let p = &config.packet;
            entries.insert(
                "packet".into(),
                vec![
                    ("interfaces".into(), p.interfaces.join(",")),
                    ("after".into(), parse::format_size(p.after)),
                    ("max_connections".into(), p.max_connections.to_string()),
                    (
                        "idle_timeout".into(),
                        parse::format_duration(p.idle_timeout),
                    ),
                    ("linger".into(), parse::format_duration(p.linger)),
                    (
                        "drain_timeout".into(),
                        parse::format_duration(p.drain_timeout),
                    ),
                    ("keep_on_stop".into(), p.keep_on_stop.to_string()),
                    ("mss".into(), p.mss.map_or("auto".into(), |m| m.to_string())),
                ],
            );
        }
        if let Some(xdp) = &config.xdp {
            let deny: Vec<String> = xdp.deny.iter().map(ToString::to_string).collect();
            let ports: Vec<String> = xdp.ports.iter().map(u16::to_string).collect();
            entries.insert(
                "xdp".into(),
                vec![
                    ("interfaces".into(), xdp.interfaces.join(",")),
                    ("mode".into(), xdp.mode.to_string()),
                    ("deny".into(), deny.join(",")),
                    (
                        "syn_limit".into(),
                        xdp.syn_limit.map_or("none".into(), |l| {
                            format!("{}/s burst {}", l.rate_per_second, l.burst)
                        }),
                    ),
                    ("ports".into(), ports.join(",")),
                ],
            );
        }
        Table(entries)
    }

    /// The text form: one line per entry, the key then `field=value`s, tab-separated.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (key, fields) in &self.0 {
            out.push_str(key);
            for (field, value) in fields {
                let _ = write!(out, "\t{field}={value}");
            }
            out.push('\n');
        }
        out
    }

    /// Reads the text form back; `None` for a line that is not `key<TAB>field=value...`.
    pub fn from_text(text: &str) -> Option<Table> {
        let mut entries = BTreeMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let mut parts = line.split('\t');
            let key = parts.next()?;
            let fields = parts
                .map(|p| p.split_once('=').map(|(f, v)| (f.to_owned(), v.to_owned())))
                .collect::<Option<Vec<_>>>()?;
            entries.insert(key.to_owned(), fields);
        }
        Some(Table(entries))
    }

    /// What changes from `self` (running) to `new`: human-readable lines (`+` added, `-`
    /// removed, `~` changed with each changed field) and a count line; `"no changes\n"` if
    /// there are none.
    pub fn diff(&self, new: &Table) -> String {
        let mut out = String::new();
        let (mut added, mut removed, mut changed) = (0, 0, 0);
        let joined = |fields: &[(String, String)]| {
            fields
                .iter()
                .map(|(f, v)| format!("{f}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        for (key, before) in &self.0 {
            match new.0.get(key) {
                None => {
                    removed += 1;
                    let _ = writeln!(out, "- {key}: {}", joined(before));
                }
                Some(after) if after != before => {
                    changed += 1;
                    let _ = writeln!(out, "~ {key}:");
                    for (field, value) in after {
                        let old = before.iter().find(|(f, _)| f == field).map(|(_, v)| v);
                        if old != Some(value) {
                            let old = old.map_or("(none)", String::as_str);
                            let note = if RESTART_ONLY.contains(&(key.as_str(), field.as_str())) {
                                " (takes effect only after a restart)"
                            } else {
                                ""
                            };
                            let _ = writeln!(out, "    {field}: {old} -> {value}{note}");
                        }
                    }
                    for (field, value) in before {
                        if !after.iter().any(|(f, _)| f == field) {
                            let _ = writeln!(out, "    {field}: {value} -> (none)");
                        }
                    }
                }
                Some(_) => {}
            }
        }
        for (key, after) in &new.0 {
            if !self.0.contains_key(key) {
                added += 1;
                let _ = writeln!(out, "+ {key}: {}", joined(after));
            }
        }
        if added + removed + changed == 0 {
            return "no changes\n".into();
        }
        let _ = writeln!(
            out,
            "{added} added, {removed} removed, {changed} changed; sites: {} -> {}",
            self.sites(),
            new.sites()
        );
        out
    }

    /// How many `[[site]]` entries the table has.
    pub fn sites(&self) -> usize {
        self.0.keys().filter(|k| k.starts_with("site ")).count()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn table(text: &str) -> Table {
        let config = Config::from_str(text, Path::new("t.toml")).expect("valid config");
        Table::of(&config)
    }

    const BASE: &str = r#"
[[listen]]
address = "0.0.0.0:443"
protocol = "tls"
[[site]]
hostnames = ["a.example"]
backend = "2001:db8::1"
[[site]]
hostnames = ["b.example"]
backend = "2001:db8::2"
proxy_protocol = "v2"
"#;

    #[test]
    fn the_text_form_reads_back() {
        let t = table(BASE);
        assert_eq!(Table::from_text(&t.to_text()), Some(t.clone()));
        assert_eq!(t.sites(), 2);
        assert!(
            t.to_text()
                .contains("site b.example\thostnames=b.example\tbackend=2001:db8::2 (listener's port)\tproxy_protocol=v2\tproxy_protocol_tlvs=authority\t"),
            "{}",
            t.to_text()
        );
        assert_eq!(Table::from_text("site a\tno equals sign\n"), None);
    }

    #[test]
    fn same_config_has_no_changes() {
        assert_eq!(table(BASE).diff(&table(BASE)), "no changes\n");
    }

    #[test]
    fn sites_added_removed_and_changed_field_by_field() {
        let new = BASE
            .replace("\"2001:db8::2\"", "\"2001:db8::22\"")
            .replace("[\"a.example\"]", "[\"c.example\"]")
            + "[defaults]\nmax_connections_per_source = 5\n";
        let diff = table(BASE).diff(&table(&new));
        assert_eq!(
            diff,
            "~ defaults:\n    max_connections_per_source: none -> 5\n\
             - site a.example: hostnames=a.example backend=2001:db8::1 (listener's port) \
             proxy_protocol=none proxy_protocol_tlvs= forwarding=- forwarded_header=none\n\
             ~ site b.example:\n    backend: 2001:db8::2 (listener's port) -> 2001:db8::22 \
             (listener's port)\n\
             + site c.example: hostnames=c.example backend=2001:db8::1 (listener's port) \
             proxy_protocol=none proxy_protocol_tlvs= forwarding=- forwarded_header=none\n\
             1 added, 1 removed, 2 changed; sites: 2 -> 2\n"
        );
    }

    /// `[packet]` is in the table once the engine is named; a changed table size or interface
    /// list is marked as needing a restart, other keys are not.
    #[test]
    fn packet_changes_that_need_a_restart_say_so() {
        assert!(!table(BASE).to_text().contains("packet"));
        let with =
            |body: &str| format!("{BASE}[defaults]\nforwarding = \"packet\"\n[packet]\n{body}");
        let before = table(&with("interfaces = [\"eth0\"]\n"));
        assert!(
            before.to_text().contains(
                "packet\tinterfaces=eth0\tafter=0B\tmax_connections=65536\tidle_timeout=1h\t\
                 linger=1s\tdrain_timeout=30s\tkeep_on_stop=false\tmss=auto\n"
            ),
            "{}",
            before.to_text()
        );
        let after = table(&with(
            "interfaces = [\"eth0\", \"eth1\"]\nmax_connections = 1000\nlinger = \"3s\"\n",
        ));
        assert_eq!(
            before.diff(&after),
            "~ packet:\n    interfaces: eth0 -> eth0,eth1 (takes effect only after a restart)\n\
             \x20   max_connections: 65536 -> 1000 (takes effect only after a restart)\n\
             \x20   linger: 1s -> 3s\n\
             0 added, 0 removed, 1 changed; sites: 2 -> 2\n"
        );
        let config = |text: &str| Config::from_str(text, Path::new("t.toml")).expect("valid");
        let running = config(&with("interfaces = [\"eth0\"]\n"));
        let file = config(&with(
            "interfaces = [\"eth1\"]\nmax_connections = 10\nmss = 1400\n",
        ));
        assert_eq!(
            running.packet().restart_needed(file.packet()),
            ["max_connections", "interfaces"]
        );
        assert!(running.packet().restart_needed(running.packet()).is_empty());
    }
}
