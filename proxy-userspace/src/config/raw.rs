//! The file as TOML sees it: every value keeps its byte span so validation can point at it, and
//! unknown keys are rejected by serde with the key's own span.
//!
//! Enumerations, durations and addresses stay strings here on purpose: serde's messages for them
//! ("unknown variant") do not say which site or what the allowed spellings mean; the validation
//! in `load.rs` does.

use std::fmt;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use toml::Spanned;

/// A list of strings where each element keeps its own position.
pub(super) type SpannedStrings = Spanned<Vec<Spanned<String>>>;

/// One configuration file. Included files use the same shape; `load.rs` rejects the keys that
/// only the main file may have.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub include: Option<SpannedStrings>,
    pub defaults: Option<Spanned<RawDefaults>>,
    #[serde(default)]
    pub listen: Vec<Spanned<RawListener>>,
    #[serde(default)]
    pub site: Vec<Spanned<RawSite>>,
    pub default: Option<Spanned<RawSite>>,
    pub xdp: Option<Spanned<RawXdp>>,
    pub dns: Option<Spanned<RawDns>>,
    pub packet: Option<Spanned<RawPacket>>,
}

/// `[packet]`. Numbers stay `i64` so that out-of-range values get messages naming the key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPacket {
    pub interfaces: Option<SpannedStrings>,
    pub after: Option<Spanned<RawSize>>,
    pub max_connections: Option<Spanned<i64>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub linger: Option<Spanned<String>>,
    pub drain_timeout: Option<Spanned<String>>,
    pub keep_on_stop: Option<Spanned<bool>>,
    pub mss: Option<Spanned<i64>>,
}

/// `[dns]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub allowed_backends: Option<SpannedStrings>,
    pub servers: Option<SpannedStrings>,
    pub timeout: Option<Spanned<String>>,
    pub ttl_floor: Option<Spanned<String>>,
    pub ttl_ceiling: Option<Spanned<String>>,
    pub negative_ttl: Option<Spanned<String>>,
    pub proxy_protocol: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
}

/// `[defaults]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub forwarding: Option<Spanned<String>>,
    pub client_hello_timeout: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_source: Option<Spanned<i64>>,
    pub sockmap_backlog_limit: Option<Spanned<RawSize>>,
    pub sockmap_handoff: Option<Spanned<RawSize>>,
    pub forwarded_header: Option<Spanned<String>>,
    pub trusted_proxies: Option<SpannedStrings>,
    pub max_request_head: Option<Spanned<RawSize>>,
    pub backend: Option<Spanned<String>>,
    pub source_prefix: Option<Spanned<String>>,
}

/// `[[listen]]`; required keys are optional here for the same reason as in [`RawSite`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub address: Option<Spanned<String>>,
    pub protocol: Option<Spanned<String>>,
    pub forwarding: Option<Spanned<String>>,
    pub accept_proxy: Option<SpannedStrings>,
    pub backend: Option<Spanned<String>>,
}

/// `[[site]]` and `[default]`; `hostnames` and `backend` are optional here so that a missing one
/// gets a message naming the site instead of serde's bare "missing field".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSite {
    pub hostnames: Option<SpannedStrings>,
    pub backend: Option<Spanned<RawBackend>>,
    pub proxy_protocol: Option<Spanned<String>>,
    pub proxy_protocol_tlvs: Option<SpannedStrings>,
    pub forwarding: Option<Spanned<String>>,
    pub forwarded_header: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
}

/// `[xdp]`; `interfaces` is optional here so that a missing one gets a message saying what to
/// write. Numbers stay `i64` (TOML's integer) so that 0, negatives and values too large get
/// messages naming the key instead of serde's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawXdp {
    pub interfaces: Option<SpannedStrings>,
    pub mode: Option<Spanned<String>>,
    pub deny: Option<SpannedStrings>,
    pub syn_rate_per_source: Option<Spanned<i64>>,
    pub syn_burst: Option<Spanned<i64>>,
    pub ports: Option<Spanned<Vec<Spanned<i64>>>>,
}

/// A size written as a string (`"4MiB"`) or as a plain integer of bytes.
pub(super) enum RawSize {
    Text(String),
    Bytes(i64),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"4MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                i64::try_from(v)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::custom("size is too large"))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// `backend = "addr"` or `backend = { tls = "...", http = "..." }`.
pub(super) enum RawBackend {
    Addr(String),
    PerProtocol(RawPerProtocol),
}

/// The table form of a backend.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPerProtocol {
    pub tls: Option<Spanned<String>>,
    pub http: Option<Spanned<String>>,
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BackendVisitor;
        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address string or a table { tls = \"...\", http = \"...\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Addr(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawBackend, A::Error> {
                // Handing the map on to the derived struct keeps deny_unknown_fields and the
                // spans of the inner values, which an untagged enum would lose.
                RawPerProtocol::deserialize(MapAccessDeserializer::new(map))
                    .map(RawBackend::PerProtocol)
            }
        }
        deserializer.deserialize_any(BackendVisitor)
    }
}
