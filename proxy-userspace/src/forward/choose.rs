//! Which engine a connection gets (README, "The packet engine"): pure functions of the
//! configuration and of what the process loaded, so that the rule the README states is
//! tested without sockets.
//!
//! `auto` is splice, then the sockmap engine's kernel path for each direction once it moved
//! `sockmap_handoff` bytes. With a `[packet]` section that sets `after` and the packet engine
//! loaded, a connection is first offered to the packet engine once it moved `packet.after`
//! bytes both ways together, before any direction enters
//! the kernel path: a connection in a socket map cannot be handed off, and one the engine
//! refuses goes on as `auto` would have, each direction to the kernel path once it moved
//! `sockmap_handoff` bytes (counted from the start, so at once if it already did).
use crate::config::{Config, Forwarding};

use super::Engine;

/// Whether the process loads the packet engine at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketLoad {
    /// Nothing may use it.
    No,
    /// `forwarding = "packet"` somewhere: if it cannot be loaded, `spliced check` fails and
    /// spliced does not start.
    Required,
    /// Only `auto` may use it, because the file has a `[packet]` section (which says where the
    /// programs may attach) with `after`: if it cannot be loaded, spliced says what is missing and `auto`
    /// runs without it.
    ForAuto,
}

/// Whether `auto` may use the packet engine under `config`: it has a `[packet]` section that
/// sets `after`.
pub fn auto_may_use_packet(config: &Config) -> bool {
    config.packet.auto_after.is_some()
}

/// Whether the process loads the packet engine for `config`.
pub fn packet_load(config: &Config) -> PacketLoad {
    if config.names_packet() {
        PacketLoad::Required
    } else if auto_may_use_packet(config) && config.names_auto() {
        PacketLoad::ForAuto
    } else {
        PacketLoad::No
    }
}

/// Whether connections accepted on `listener` may use the packet engine, once it is loaded
/// (they then save the client's SYN and announce a smaller MSS): a site's choice overrides
/// the listener's, so any site that may use it makes every listener a candidate.
pub fn listener_may_use_packet(config: &Config, listener: &crate::config::Listener) -> bool {
    let may = |f: Forwarding| {
        f == Forwarding::Packet || (f == Forwarding::Auto && auto_may_use_packet(config))
    };
    let sites = config
        .sites
        .iter()
        .chain(&config.default_site)
        .filter_map(|s| s.forwarding)
        .any(may);
    sites || may(listener.forwarding.unwrap_or(config.defaults.forwarding))
}

/// What the process has loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loaded {
    /// The sockmap engine's kernel path.
    pub sockmap: bool,
    /// The packet engine.
    pub packet: bool,
}

/// How a connection is forwarded, decided after its preface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Reads and writes through a buffer.
    Copy,
    /// `splice(2)` to the end.
    Splice,
    /// Splice, each direction to the kernel path once it moved `handoff` bytes.
    Sockmap {
        /// `sockmap_handoff`.
        handoff: u64,
    },
    /// Splice until `after` bytes moved both ways together, then the packet engine.
    Packet {
        /// `packet.after` (for `auto`, its default is the crossover).
        after: u64,
        /// A connection that ends before `after` counts as refused (`half_closed`), as
        /// under `forwarding = "packet"`; under `auto` it was never offered.
        short_is_refused: bool,
        /// What carries the connection if the engine does not.
        then: Then,
    },
}

/// What carries a connection the packet engine did not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Splice to the end.
    Splice,
    /// The sockmap engine, from where the splice phase left the connection: each direction
    /// to the kernel path once it moved `handoff` bytes, counting those already moved.
    Sockmap {
        /// `sockmap_handoff`.
        handoff: u64,
    },
}

impl Plan {
    /// The engine the connection is counted on while it is open, and its line's `engine=`
    /// until forwarding says otherwise.
    pub fn engine(self) -> Engine {
        match self {
            Plan::Copy => Engine::Copy,
            Plan::Splice => Engine::Splice,
            Plan::Sockmap { .. } => Engine::Sockmap,
            Plan::Packet { .. } => Engine::Packet,
        }
    }
}

/// How a connection that asked for `wanted` is forwarded under `config`, with what the
/// process `loaded`.
pub fn choose(wanted: Forwarding, config: &Config, loaded: Loaded) -> Plan {
    let handoff = config.defaults.sockmap_handoff;
    match wanted {
        Forwarding::Copy => Plan::Copy,
        Forwarding::Splice => Plan::Splice,
        // Server::bind refuses to start when `packet` is asked for and cannot be loaded; a
        // reload cannot ask for it either.
        Forwarding::Packet if loaded.packet => Plan::Packet {
            after: config.packet.after,
            short_is_refused: true,
            then: Then::Splice,
        },
        Forwarding::Packet => Plan::Splice,
        // Server::bind refuses to start when `sockmap` cannot have the kernel path.
        Forwarding::Sockmap if loaded.sockmap => Plan::Sockmap { handoff },
        Forwarding::Sockmap => Plan::Splice,
        Forwarding::Auto => match config.packet.auto_after {
            Some(after) if loaded.packet => Plan::Packet {
                after,
                short_is_refused: false,
                then: if loaded.sockmap {
                    Then::Sockmap { handoff }
                } else {
                    Then::Splice
                },
            },
            _ if loaded.sockmap => Plan::Sockmap { handoff },
            _ => Plan::Splice,
        },
    }
}

/// The engine a connection's line names at its end: the packet engine if it was handed off,
/// else the sockmap engine if its kernel path moved a direction, else what it was planned on
/// (splice for a plan whose handoffs did not happen).
pub fn ended_on(plan: Plan, handed_off: bool, sockmap_used: bool) -> Engine {
    match plan {
        Plan::Copy => Engine::Copy,
        _ if handed_off => Engine::Packet,
        Plan::Sockmap { .. } | Plan::Packet { .. } if sockmap_used => Engine::Sockmap,
        _ => Engine::Splice,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(text: &str) -> Config {
        Config::from_str(text, Path::new("/nonexistent/spliced.toml")).expect("valid")
    }

    const SITES: &str = "[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\n\
        [[site]]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8::1\"\n";

    fn with(defaults: &str, packet: Option<&str>) -> Config {
        let packet = packet.map_or(String::new(), |body| format!("[packet]\n{body}\n"));
        config(&format!("[defaults]\n{defaults}\n{packet}{SITES}"))
    }

    const ALL: Loaded = Loaded {
        sockmap: true,
        packet: true,
    };

    /// Without `[packet]`, `auto` is what it always was, whatever is loaded.
    #[test]
    fn without_a_packet_section_auto_is_splice_then_sockmap() {
        let c = with("forwarding = \"auto\"", None);
        assert_eq!(packet_load(&c), PacketLoad::No);
        assert!(!listener_may_use_packet(&c, &c.listeners[0]));
        let handoff = 256 << 10;
        assert_eq!(choose(Forwarding::Auto, &c, ALL), Plan::Sockmap { handoff });
        let no_packet = Loaded {
            packet: false,
            ..ALL
        };
        assert_eq!(
            choose(Forwarding::Auto, &c, no_packet),
            Plan::Sockmap { handoff }
        );
        assert_eq!(
            choose(Forwarding::Auto, &c, Loaded::default()),
            Plan::Splice
        );
    }

    /// With `[packet]` and its `after`, `auto` loads the engine (a failure is not fatal), its
    /// listeners save SYNs, and a connection is offered after `after`; refused, it goes on to
    /// the kernel path. The section without `after` leaves `auto` as it was (no measured
    /// size where a handoff in mid-download pays).
    #[test]
    fn with_a_packet_section_and_after_auto_offers_the_engine() {
        let c = with("forwarding = \"auto\"", Some(""));
        assert_eq!(packet_load(&c), PacketLoad::No);
        assert!(!listener_may_use_packet(&c, &c.listeners[0]));
        assert_eq!(
            choose(Forwarding::Auto, &c, ALL),
            Plan::Sockmap { handoff: 256 << 10 }
        );
        let c = with("forwarding = \"auto\"", Some("after = \"1MiB\""));
        assert_eq!(packet_load(&c), PacketLoad::ForAuto);
        assert!(listener_may_use_packet(&c, &c.listeners[0]));
        let plan = choose(Forwarding::Auto, &c, ALL);
        assert_eq!(
            plan,
            Plan::Packet {
                after: 1 << 20,
                short_is_refused: false,
                then: Then::Sockmap { handoff: 256 << 10 },
            }
        );
        assert_eq!(plan.engine(), Engine::Packet);
        let c = with(
            "forwarding = \"auto\"\nsockmap_handoff = \"64KiB\"",
            Some("after = \"4MiB\""),
        );
        assert_eq!(
            choose(Forwarding::Auto, &c, ALL),
            Plan::Packet {
                after: 4 << 20,
                short_is_refused: false,
                then: Then::Sockmap { handoff: 64 << 10 },
            }
        );
        // `after = 0` is kept: right after the preface, as for `packet`.
        let c = with("forwarding = \"auto\"", Some("after = 0"));
        assert!(matches!(
            choose(Forwarding::Auto, &c, ALL),
            Plan::Packet { after: 0, .. }
        ));
    }

    /// The engine did not load (or the kernel path did not): `auto` goes on without it.
    #[test]
    fn auto_without_the_loaded_engine_is_what_it_was() {
        let c = with("forwarding = \"auto\"", Some("after = \"1MiB\""));
        let sockmap_only = Loaded {
            sockmap: true,
            packet: false,
        };
        assert_eq!(
            choose(Forwarding::Auto, &c, sockmap_only),
            Plan::Sockmap { handoff: 256 << 10 }
        );
        let packet_only = Loaded {
            sockmap: false,
            packet: true,
        };
        assert_eq!(
            choose(Forwarding::Auto, &c, packet_only),
            Plan::Packet {
                after: 1 << 20,
                short_is_refused: false,
                then: Then::Splice,
            }
        );
        assert_eq!(
            choose(Forwarding::Auto, &c, Loaded::default()),
            Plan::Splice
        );
    }

    /// `packet` keeps its own rule: after 0 unless set, a short connection counts as refused,
    /// splice after a refusal; the section alone does not make `splice` or `sockmap` use it.
    #[test]
    fn packet_and_the_other_engines_are_unchanged() {
        let c = with("forwarding = \"packet\"", Some(""));
        assert_eq!(packet_load(&c), PacketLoad::Required);
        assert_eq!(
            choose(Forwarding::Packet, &c, ALL),
            Plan::Packet {
                after: 0,
                short_is_refused: true,
                then: Then::Splice,
            }
        );
        let c = with("forwarding = \"splice\"", Some(""));
        assert_eq!(packet_load(&c), PacketLoad::No);
        assert!(!listener_may_use_packet(&c, &c.listeners[0]));
        assert_eq!(choose(Forwarding::Splice, &c, ALL), Plan::Splice);
        assert_eq!(
            choose(Forwarding::Sockmap, &c, ALL),
            Plan::Sockmap { handoff: 256 << 10 }
        );
        assert_eq!(choose(Forwarding::Copy, &c, ALL), Plan::Copy);
    }

    /// A site on `auto` under `splice` defaults makes the engine load for it.
    #[test]
    fn a_site_on_auto_loads_the_engine_for_auto() {
        let c = config(&format!(
            "[defaults]\nforwarding = \"splice\"\n[packet]\nafter = 0\n{SITES}forwarding = \"auto\"\n"
        ));
        assert_eq!(packet_load(&c), PacketLoad::ForAuto);
        assert!(listener_may_use_packet(&c, &c.listeners[0]));
    }

    /// The line's engine follows what forwarding reports.
    #[test]
    fn the_line_names_the_engine_the_connection_ended_on() {
        let c = with("forwarding = \"auto\"", Some("after = \"1MiB\""));
        let plan = choose(Forwarding::Auto, &c, ALL);
        assert_eq!(ended_on(plan, true, false), Engine::Packet);
        assert_eq!(ended_on(plan, false, true), Engine::Sockmap);
        assert_eq!(ended_on(plan, false, false), Engine::Splice);
        let plan = choose(Forwarding::Auto, &with("forwarding = \"auto\"", None), ALL);
        assert_eq!(ended_on(plan, false, true), Engine::Sockmap);
        assert_eq!(ended_on(plan, false, false), Engine::Splice);
        assert_eq!(ended_on(Plan::Copy, false, false), Engine::Copy);
    }
}
