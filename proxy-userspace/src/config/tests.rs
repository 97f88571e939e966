//! Tests for the configuration: whole files in, `Config` or a positioned error out.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

/// A listener, for tests about other things.
const LISTEN: &str = "[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(text, Path::new("main.toml"))
}

/// The 1-based line of the first occurrence of `needle`, so a test can say "the error is on
/// the line with the bad value" without counting lines by hand.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the test text"));
    text[..at].matches('\n').count() + 1
}

/// Asserts that `text` (as `main.toml`) is refused at the line holding `at`, with a message
/// containing `message`.
#[track_caller]
fn refused(text: &str, at: &str, message: &str) -> ConfigError {
    refused_at(text, line_of(text, at), message)
}

/// Asserts that `text` (as `main.toml`) is refused at `line`, with a message containing
/// `message`.
#[track_caller]
fn refused_at(text: &str, line: usize, message: &str) -> ConfigError {
    let err = parse(text).expect_err("the configuration should be refused");
    assert_eq!(err.file, Path::new("main.toml"), "{err}");
    assert_eq!(err.line, Some(line), "{err}");
    assert!(err.column.is_some(), "{err}");
    assert!(err.message.contains(message), "{err}\nexpected: {message}");
    err
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test literal")
}

fn sock(text: &str) -> SocketAddr {
    text.parse().expect("test literal")
}

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "spliced-config-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn write(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.0.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(&path, text).expect("write file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn design_example() {
    let text = r#"
[defaults]
forwarding = "auto"            # auto | sockmap | splice | copy
client_hello_timeout = "5s"
connect_timeout = "3s"

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"               # tls: route on SNI; http: route on Host

[[listen]]
address = "0.0.0.0:80"
protocol = "http"

[[site]]
hostnames = ["site1.example", "*.site1.example"]
backend = "2001:db8:1::10"     # port follows the listener's port
proxy_protocol = "v2"          # none (default) | v1 | v2

[[site]]
hostnames = ["site2.example"]
backend = { tls = "[2001:db8:1::11]:8443", http = "[2001:db8:1::11]:8080" }
proxy_protocol = "v1"

[default]                      # optional: where unknown or missing names go; absent = refuse
backend = "2001:db8:1::12"
"#;
    let config = parse(text).expect("the DESIGN.md example is valid");
    assert_eq!(config.defaults, Defaults::default());
    assert_eq!(config.defaults.forwarding, Forwarding::Auto);
    assert_eq!(config.defaults.client_hello_timeout, Duration::from_secs(5));
    assert_eq!(config.defaults.connect_timeout, Duration::from_secs(3));
    assert_eq!(config.defaults.idle_timeout, None);
    assert_eq!(config.defaults.max_connections, 10_000);
    assert_eq!(config.defaults.sockmap_backlog_limit, 4 * 1024 * 1024);
    assert_eq!(
        config.listeners,
        vec![
            Listener {
                address: sock("0.0.0.0:443"),
                protocol: Protocol::Tls,
                forwarding: None,
                accept_proxy: Vec::new(),
                dns: false,
            },
            Listener {
                address: sock("0.0.0.0:80"),
                protocol: Protocol::Http,
                forwarding: None,
                accept_proxy: Vec::new(),
                dns: false,
            },
        ]
    );
    assert_eq!(
        config.sites,
        vec![
            Site {
                name: "site1.example".into(),
                hostnames: vec!["site1.example".into(), "*.site1.example".into()],
                backend: Backend::Addr {
                    ip: ip("2001:db8:1::10"),
                    port: None
                },
                proxy_protocol: Version::V2,
                tlvs: Tlvs {
                    authority: true,
                    crc32c: false,
                    unique_id: false
                },
                forwarding: None,
                forwarded_header: ForwardedHeader::None,
                source: SourceAddress::Proxy,
                origin: Origin {
                    file: "main.toml".into(),
                    line: line_of(text, "[[site]]\nhostnames = [\"site1")
                },
            },
            Site {
                name: "site2.example".into(),
                hostnames: vec!["site2.example".into()],
                backend: Backend::PerProtocol {
                    tls: Some(sock("[2001:db8:1::11]:8443")),
                    http: Some(sock("[2001:db8:1::11]:8080")),
                },
                proxy_protocol: Version::V1,
                tlvs: Tlvs::default(),
                forwarding: None,
                forwarded_header: ForwardedHeader::None,
                source: SourceAddress::Proxy,
                origin: Origin {
                    file: "main.toml".into(),
                    line: 20
                },
            },
        ]
    );
    assert_eq!(
        config.default_site,
        Some(Site {
            name: "default".into(),
            hostnames: vec![],
            backend: Backend::Addr {
                ip: ip("2001:db8:1::12"),
                port: None
            },
            proxy_protocol: Version::None,
            tlvs: Tlvs::default(),
            forwarding: None,
            forwarded_header: ForwardedHeader::None,
            source: SourceAddress::Proxy,
            origin: Origin {
                file: "main.toml".into(),
                line: 25
            },
        })
    );
    assert_eq!(config.files, vec![PathBuf::from("main.toml")]);
}

#[test]
fn every_key() {
    let text = r#"
[defaults]
forwarding = "splice"
client_hello_timeout = "250ms"
connect_timeout = "1m"
idle_timeout = "1h"
max_connections = 500
max_connections_per_source = 20
sockmap_backlog_limit = "512KiB"
sockmap_handoff = 0

[[listen]]
address = "[::]:443"
protocol = "tls"
forwarding = "sockmap"

[[site]]
hostnames = ["A.Example.", "*.a.example"]
backend = "[2001:db8::1]:8443"
proxy_protocol = "v2"
proxy_protocol_tlvs = ["crc32c", "unique_id"]
forwarding = "copy"

[[site]]
hostnames = ["b.example"]
backend = { http = "192.0.2.1:8080" }

[default]
backend = "192.0.2.2:443"
proxy_protocol = "v2"
proxy_protocol_tlvs = []
forwarding = "auto"
"#;
    let config = parse(text).expect("valid");
    assert_eq!(
        config.defaults,
        Defaults {
            forwarding: Forwarding::Splice,
            client_hello_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(60),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connections: 500,
            max_connections_per_source: Some(20),
            sockmap_backlog_limit: 512 * 1024,
            sockmap_handoff: 0,
            ..Defaults::default()
        }
    );
    assert_eq!(config.listeners[0].address, sock("[::]:443"));
    assert_eq!(config.listeners[0].forwarding, Some(Forwarding::Sockmap));
    let a = &config.sites[0];
    assert_eq!(a.name, "a.example");
    assert_eq!(a.hostnames, ["a.example", "*.a.example"]);
    assert_eq!(
        a.backend,
        Backend::Addr {
            ip: ip("2001:db8::1"),
            port: Some(8443)
        }
    );
    assert_eq!(
        a.tlvs,
        Tlvs {
            authority: false,
            crc32c: true,
            unique_id: true
        }
    );
    assert_eq!(a.forwarding, Some(Forwarding::Copy));
    assert_eq!(
        config.sites[1].backend,
        Backend::PerProtocol {
            tls: None,
            http: Some(sock("192.0.2.1:8080"))
        }
    );
    let default = config.default_site.as_ref().expect("default site");
    assert_eq!(default.proxy_protocol, Version::V2);
    assert_eq!(default.tlvs, Tlvs::default());
    assert_eq!(default.forwarding, Some(Forwarding::Auto));
}

#[test]
fn optional_parts_absent() {
    let config = parse(LISTEN).expect("a listener alone is valid");
    assert_eq!(config.defaults, Defaults::default());
    assert!(config.sites.is_empty());
    assert_eq!(config.default_site, None);
    let idle_zero = format!("[defaults]\nidle_timeout = \"0\"\n{LISTEN}");
    assert_eq!(
        parse(&idle_zero).expect("valid").defaults.idle_timeout,
        None
    );
    let size_int = format!("[defaults]\nsockmap_backlog_limit = 1048576\n{LISTEN}");
    assert_eq!(
        parse(&size_int)
            .expect("valid")
            .defaults
            .sockmap_backlog_limit,
        1 << 20
    );
}

#[test]
fn backend_for_listener() {
    let addr = Backend::Addr {
        ip: ip("2001:db8::1"),
        port: None,
    };
    assert_eq!(
        addr.for_listener(Protocol::Tls, 443),
        Some(sock("[2001:db8::1]:443"))
    );
    assert_eq!(
        addr.for_listener(Protocol::Http, 80),
        Some(sock("[2001:db8::1]:80"))
    );
    let fixed = Backend::Addr {
        ip: ip("192.0.2.1"),
        port: Some(8443),
    };
    assert_eq!(
        fixed.for_listener(Protocol::Tls, 443),
        Some(sock("192.0.2.1:8443"))
    );
    assert_eq!(
        fixed.for_listener(Protocol::Http, 80),
        Some(sock("192.0.2.1:8443"))
    );
    let both = Backend::PerProtocol {
        tls: Some(sock("[2001:db8::1]:8443")),
        http: Some(sock("[2001:db8::1]:8080")),
    };
    assert_eq!(
        both.for_listener(Protocol::Tls, 443),
        Some(sock("[2001:db8::1]:8443"))
    );
    assert_eq!(
        both.for_listener(Protocol::Http, 80),
        Some(sock("[2001:db8::1]:8080"))
    );
    let tls_only = Backend::PerProtocol {
        tls: Some(sock("[2001:db8::1]:8443")),
        http: None,
    };
    assert_eq!(
        tls_only.for_listener(Protocol::Tls, 443),
        Some(sock("[2001:db8::1]:8443"))
    );
    assert_eq!(tls_only.for_listener(Protocol::Http, 80), None);
    let http_only = Backend::PerProtocol {
        tls: None,
        http: Some(sock("[2001:db8::1]:8080")),
    };
    assert_eq!(http_only.for_listener(Protocol::Tls, 443), None);
}

#[test]
fn error_display() {
    let text = format!(
        "{LISTEN}[[site]]\nhostnames = [\"a.example\"]\nbackend = \"::1\"\nproxy_protocol = \"v3\"\n"
    );
    let err = parse(&text).expect_err("v3");
    assert_eq!(
        err.to_string(),
        "main.toml:7:18: site \"a.example\": proxy_protocol must be one of none, v1, v2, not \"v3\""
    );
    let err = parse("").expect_err("no listener");
    assert_eq!((err.line, err.column), (None, None));
    assert!(
        err.to_string()
            .starts_with("main.toml: no [[listen]] entry"),
        "{err}"
    );
    // Columns count characters, not bytes: hostnames are checked before proxy_protocol, so the
    // error is after the "ü" on the same line.
    let prefix = "site = [{ proxy_protocol = \"vü\", hostnames = [";
    let text = format!("{prefix}\"bad name\"], backend = \"::1\" }}]\n{LISTEN}");
    let err = parse(&text).expect_err("bad name");
    assert!(err.message.contains("\"bad name\" is not valid"), "{err}");
    assert_ne!(prefix.len(), prefix.chars().count());
    assert_eq!(
        (err.line, err.column),
        (Some(1), Some(prefix.chars().count() + 1)),
        "{err}"
    );
}

#[test]
fn toml_errors_keep_their_position() {
    refused("[[listen]]\naddress = 0.0.0.0:443\n", "address", "");
    refused("[[listen]\n", "[[listen]", "");
    refused_at(
        &format!("{LISTEN}[defaults]\nforwarding = \"auto\"\n[defaults]\n"),
        6,
        "duplicate",
    );
}

#[test]
fn unknown_keys_are_named() {
    refused(
        &format!("bogus_top = 1\n{LISTEN}"),
        "bogus_top",
        "unknown field `bogus_top`",
    );
    refused(
        &format!("[defaults]\nclient_timeout = \"5s\"\n{LISTEN}"),
        "client_timeout",
        "unknown field `client_timeout`",
    );
    refused(
        &format!("{LISTEN}porto = \"tls\"\n"),
        "porto",
        "unknown field `porto`",
    );
    refused(
        &format!(
            "{LISTEN}[[site]]\nhostnames = [\"a.example\"]\nbackend = \"::1\"\nproxy = \"v1\"\n"
        ),
        "proxy =",
        "unknown field `proxy`",
    );
    refused(
        &format!("{LISTEN}[default]\nbackend = \"::1\"\ntimeout = \"1s\"\n"),
        "timeout =",
        "unknown field `timeout`",
    );
    refused(
        &format!(
            "{LISTEN}[[site]]\nhostnames = [\"a.example\"]\nbackend = {{ tls = \"[::1]:1\", https = \"[::1]:2\" }}\n"
        ),
        "https",
        "unknown field `https`",
    );
}

#[test]
fn listener_errors() {
    let err = parse("[defaults]\n").expect_err("no listener");
    assert_eq!(err.line, None);
    assert!(err.message.contains("no [[listen]] entry"), "{err}");
    let text = "[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\n\
                [[listen]]\naddress = \"0.0.0.0:443\" # again\nprotocol = \"http\"\n";
    let err = refused(
        text,
        "\"0.0.0.0:443\" # again",
        "address 0.0.0.0:443 is already used by the listener at main.toml:1",
    );
    assert_eq!(err.column, Some(11));
    refused(
        "[[listen]]\naddress = \"0.0.0.0\"\nprotocol = \"tls\"\n",
        "address",
        "the port is missing",
    );
    refused(
        "[[listen]]\naddress = \"localhost:443\"\nprotocol = \"tls\"\n",
        "address",
        "address \"localhost:443\" is not valid",
    );
    refused(
        "[[listen]]\naddress = \"[::]:0\"\nprotocol = \"tls\"\n",
        "address",
        "port 0",
    );
    refused(
        "[[listen]]\naddress = \"[::]:443\"\nprotocol = \"https\"\n",
        "protocol",
        "protocol must be tls or http, not \"https\"",
    );
    refused(
        "[[listen]]\naddress = \"[::]:443\"\n",
        "[[listen]]",
        "listen [::]:443: protocol is missing (tls or http)",
    );
    refused(
        "[[listen]]\nprotocol = \"tls\"\n",
        "[[listen]]",
        "[[listen]] has no address",
    );
    refused(
        &format!("{LISTEN}forwarding = \"zerocopy\"\n"),
        "forwarding",
        "listen 0.0.0.0:443: forwarding must be one of auto, sockmap, splice, copy, packet, not \"zerocopy\"",
    );
}

#[test]
fn hostname_errors() {
    let site = |hostnames: &str| {
        format!("{LISTEN}[[site]]\nhostnames = {hostnames}\nbackend = \"2001:db8::1\"\n")
    };
    for (bad, message) in [
        ("a_b.example", "contains '_'"),
        ("a..example", "empty label"),
        (
            "a.*.example",
            "'*' is only allowed as the whole first label",
        ),
        ("*a.example", "'*' is only allowed as the whole first label"),
        ("*", "wildcard needs a parent"),
        ("-a.example", "starts or ends with '-'"),
        ("", "is empty"),
    ] {
        let text = site(&format!("[\"ok.example\", \"{bad}\"]"));
        refused(
            &text,
            "hostnames",
            &format!("site \"ok.example\": hostname \"{bad}\" is not valid: "),
        );
        let err = refused(&text, "hostnames", message);
        assert_eq!(err.column, Some(28), "{err}");
    }
    let long_label = format!("{}.example", "a".repeat(64));
    refused(
        &site(&format!("[\"{long_label}\"]")),
        "hostnames",
        "more than 63",
    );
    let long_name = vec!["abcdefghi"; 26].join(".");
    refused(
        &site(&format!("[\"{long_name}\"]")),
        "hostnames",
        "more than 253",
    );
    refused(&site("[]"), "hostnames", "hostnames is empty");
    refused(&site("\"a.example\""), "hostnames", "expected a sequence");
    refused(
        &format!("{LISTEN}[[site]]\nbackend = \"2001:db8::1\"\n"),
        "[[site]]",
        "[[site]] has no hostnames",
    );
    refused(
        &format!("{LISTEN}[default]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8::1\"\n"),
        "hostnames",
        "default site: hostnames are not allowed",
    );
}

#[test]
fn duplicate_hostnames_in_one_file() {
    let text = format!(
        "{LISTEN}[[site]]\nhostnames = [\"a.example\", \"*.a.example\"]\nbackend = \"::1\"\n\n\
         [[site]]\nhostnames = [\"b.example\", \"*.A.example.\"]\nbackend = \"::2\"\n"
    );
    refused(
        &text,
        "[\"b.example\"",
        "site \"b.example\": hostname \"*.a.example\" is already used by site \"a.example\" at \
         main.toml:5",
    );
    let same_site = format!(
        "{LISTEN}[[site]]\nhostnames = [\"a.example\", \"A.example\"]\nbackend = \"::1\"\n"
    );
    refused(
        &same_site,
        "hostnames",
        "already used by site \"a.example\" at main.toml:5",
    );
}

#[test]
fn backend_errors() {
    let site = |backend: &str| {
        format!("{LISTEN}[[site]]\nhostnames = [\"a.example\"]\nbackend = {backend}\n")
    };
    refused(
        &site("\"backend.example\""),
        "backend",
        "site \"a.example\": backend \"backend.example\" is not valid: expected an IP address",
    );
    refused(
        &site("\"backend.example\""),
        "backend",
        "hostnames are not resolved",
    );
    refused(&site("\"2001:db8::1]:80\""), "backend", "is not valid");
    refused(&site("\"[2001:db8::1]:0\""), "backend", "port 0");
    refused(&site("\"::\""), "backend", "not a unicast address");
    refused(
        &site("443"),
        "backend",
        "expected an address string or a table",
    );
    refused(
        &site("{}"),
        "backend",
        "backend needs an address for at least one of tls, http",
    );
    refused(
        &site("{ tls = \"2001:db8::1\" }"),
        "backend",
        "backend.tls \"2001:db8::1\" is not valid: a per-protocol backend needs a port",
    );
    let err = refused(
        &site("{ tls = \"[2001:db8::1]:1\", http = \"nope\" }"),
        "backend",
        "backend.http \"nope\" is not valid",
    );
    // Placed at the inner value, not at the table.
    assert_eq!(err.column, Some(45), "{err}");
    refused(
        &format!("{LISTEN}[[site]]\nhostnames = [\"a.example\"]\n"),
        "[[site]]",
        "site \"a.example\": backend is missing",
    );
    refused(
        &format!("{LISTEN}[default]\nproxy_protocol = \"v1\"\n"),
        "[default]",
        "default site: backend is missing",
    );
}

#[test]
fn proxy_protocol_errors() {
    let site = |extra: &str| {
        format!("{LISTEN}[[site]]\nhostnames = [\"a.example\"]\nbackend = \"::1\"\n{extra}\n")
    };
    refused(
        &site("proxy_protocol = \"v3\""),
        "proxy_protocol",
        "site \"a.example\": proxy_protocol must be one of none, v1, v2, not \"v3\"",
    );
    refused(
        &site("proxy_protocol = \"v1\"\nproxy_protocol_tlvs = [\"authority\"]"),
        "proxy_protocol_tlvs",
        "proxy_protocol_tlvs needs proxy_protocol = \"v2\", but it is \"v1\"",
    );
    refused(
        &site("proxy_protocol_tlvs = [\"authority\"]"),
        "proxy_protocol_tlvs",
        "but it is none (the default)",
    );
    refused(
        &site("proxy_protocol = \"none\"\nproxy_protocol_tlvs = []"),
        "proxy_protocol_tlvs",
        "needs proxy_protocol = \"v2\"",
    );
    refused(
        &site("proxy_protocol = \"v2\"\nproxy_protocol_tlvs = [\"authority\",\n  \"ssl\"]"),
        "\"ssl\"",
        "proxy_protocol_tlvs: unknown TLV \"ssl\"",
    );
    refused(
        &site("forwarding = \"fast\""),
        "forwarding",
        "site \"a.example\": forwarding must be one of auto, sockmap, splice, copy, packet, not \"fast\"",
    );
}

#[test]
fn duration_and_size_errors() {
    let defaults = |line: &str| format!("[defaults]\n{line}\n{LISTEN}");
    for (line, message) in [
        (
            "client_hello_timeout = \"5x\"",
            "defaults: client_hello_timeout must be a duration like \"5s\", \"250ms\" or \"1m\", \
             not \"5x\": unknown unit \"x\"",
        ),
        ("client_hello_timeout = \"\"", "not \"\": it is empty"),
        ("connect_timeout = \"-5s\"", "cannot be negative"),
        ("connect_timeout = \"5\"", "a unit is missing"),
        (
            "connect_timeout = \"0s\"",
            "connect_timeout must be greater than zero",
        ),
        (
            "client_hello_timeout = \"0\"",
            "client_hello_timeout must be greater than zero",
        ),
        ("idle_timeout = \"soon\"", "idle_timeout must be a duration"),
        (
            "connect_timeout = 5",
            "invalid type: integer `5`, expected a string",
        ),
        (
            "sockmap_backlog_limit = \"4XB\"",
            "sockmap_backlog_limit must be a size like \"4MiB\", \"512KiB\" or \"1048576\", not \
             \"4XB\": unknown unit",
        ),
        ("sockmap_backlog_limit = \"\"", "it is empty"),
        ("sockmap_backlog_limit = \"-1\"", "cannot be negative"),
        ("sockmap_backlog_limit = -1", "cannot be negative"),
        ("sockmap_backlog_limit = 0", "must be greater than zero"),
        (
            "sockmap_backlog_limit = \"0MiB\"",
            "must be greater than zero",
        ),
        (
            "max_connections = 0",
            "max_connections must be at least 1, not 0",
        ),
        (
            "max_connections = -5",
            "max_connections must be at least 1, not -5",
        ),
        ("max_connections = \"10\"", "invalid type"),
        (
            "max_connections_per_source = 0",
            "defaults: max_connections_per_source must be at least 1, not 0 (leave it out for \
             no limit)",
        ),
        (
            "max_connections_per_source = -1",
            "max_connections_per_source must be at least 1, not -1",
        ),
        (
            "max_connections_per_source = 20000",
            "defaults: max_connections_per_source (20000) is more than max_connections \
             (10000), so it would never apply",
        ),
        ("max_connections_per_source = \"5\"", "invalid type"),
        (
            "forwarding = \"kernel\"",
            "defaults: forwarding must be one of",
        ),
    ] {
        let text = defaults(line);
        let err = refused(&text, line, message);
        assert_eq!(err.line, Some(2), "{err}");
        let key_len = line.find('=').expect("key = value") + 2;
        assert_eq!(err.column, Some(key_len + 1), "{err}");
    }
}

#[test]
fn includes_one_file_per_customer() {
    let dir = TempDir::new("customers");
    let main = dir.write(
        "spliced.toml",
        &format!("include = [\"sites/*.toml\", \"other.toml\"]\n{LISTEN}"),
    );
    // Written out of order: the result must not depend on directory order.
    dir.write(
        "sites/b.toml",
        "[[site]]\nhostnames = [\"b.example\"]\nbackend = \"2001:db8::b\"\n",
    );
    dir.write(
        "sites/a.toml",
        "\n[[site]]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8::a\"\n\
         [[site]]\nhostnames = [\"a2.example\"]\nbackend = \"2001:db8::a2\"\n",
    );
    // Hidden files and other extensions are not customers.
    dir.write("sites/.a.toml.swp.toml", "not toml at all");
    dir.write("sites/notes.txt", "not toml at all");
    dir.write(
        "other.toml",
        "[[site]]\nhostnames = [\"other.example\"]\nbackend = \"2001:db8::c\"\n",
    );
    let config = Config::load(&main).expect("valid");
    assert_eq!(
        config.files,
        vec![
            main.clone(),
            dir.0.join("sites/a.toml"),
            dir.0.join("sites/b.toml"),
            dir.0.join("other.toml"),
        ]
    );
    let names: Vec<&str> = config.sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["a.example", "a2.example", "b.example", "other.example"]
    );
    assert_eq!(
        config.sites[1].origin,
        Origin {
            file: dir.0.join("sites/a.toml"),
            line: 5
        }
    );
    let summary = config.summary();
    assert!(summary.contains("files read: 4"), "{summary}");
    assert!(
        summary.contains(&dir.0.join("sites/b.toml").display().to_string()),
        "{summary}"
    );
}

#[test]
fn nested_includes_are_relative_to_their_file() {
    let dir = TempDir::new("nested");
    let main = dir.write(
        "spliced.toml",
        &format!("include = [\"customers/index.toml\"]\n{LISTEN}"),
    );
    dir.write("customers/index.toml", "include = [\"c/*.toml\"]\n");
    dir.write(
        "customers/c/x.toml",
        "[[site]]\nhostnames = [\"x.example\"]\nbackend = \"2001:db8::1\"\n",
    );
    let config = Config::load(&main).expect("valid");
    assert_eq!(config.sites.len(), 1);
    assert_eq!(
        config.sites[0].origin.file,
        dir.0.join("customers/c/x.toml")
    );
    assert_eq!(config.files.len(), 3);
}

#[test]
fn glob_matching_nothing_is_fine() {
    let dir = TempDir::new("empty");
    let main = dir.write(
        "spliced.toml",
        &format!("include = [\"sites/*.toml\"]\n{LISTEN}"),
    );
    let config = Config::load(&main).expect("valid");
    assert!(config.sites.is_empty());
    assert_eq!(config.files, vec![main]);
}

#[test]
fn glob_in_a_directory_with_glob_characters() {
    let dir = TempDir::new("brackets");
    let main = dir.write(
        "we[ird]/spliced.toml",
        &format!("include = [\"*.site.toml\"]\n{LISTEN}"),
    );
    dir.write(
        "we[ird]/x.site.toml",
        "[[site]]\nhostnames = [\"x.example\"]\nbackend = \"2001:db8::1\"\n",
    );
    let config = Config::load(&main).expect("valid");
    assert_eq!(config.sites.len(), 1);
}

#[test]
fn duplicate_hostname_across_files_names_both() {
    let dir = TempDir::new("dup");
    let main = dir.write(
        "spliced.toml",
        &format!("include = [\"sites/*.toml\"]\n{LISTEN}"),
    );
    let a = dir.write(
        "sites/a.toml",
        "[[site]]\nhostnames = [\"a.example\",\n  \"shared.example\"]\nbackend = \"2001:db8::a\"\n",
    );
    let b = dir.write(
        "sites/b.toml",
        "# customer b\n\n[[site]]\nhostnames = [\"b.example\", \"SHARED.example\"]\nbackend = \"2001:db8::b\"\n",
    );
    let err = Config::load(&main).expect_err("duplicate");
    assert_eq!(err.file, b, "{err}");
    assert_eq!((err.line, err.column), (Some(4), Some(27)), "{err}");
    let first = format!("{}:3", a.display());
    assert!(err.message.contains(&first), "{err}");
    assert!(
        err.message.contains(
            "site \"b.example\": hostname \"shared.example\" is already used by site \"a.example\""
        ),
        "{err}"
    );
}

#[test]
fn missing_include_names_the_including_file() {
    let dir = TempDir::new("missing");
    let main = dir.write(
        "spliced.toml",
        &format!("include = [\n  \"sites/*.toml\",\n  \"other.toml\",\n]\n{LISTEN}"),
    );
    let err = Config::load(&main).expect_err("missing");
    assert_eq!(err.file, main, "{err}");
    assert_eq!((err.line, err.column), (Some(3), Some(3)), "{err}");
    assert!(err.message.contains("included file"), "{err}");
    assert!(err.message.contains("other.toml does not exist"), "{err}");
}

#[test]
fn include_errors() {
    let dir = TempDir::new("errors");
    let bad_glob = dir.write(
        "bad_glob.toml",
        &format!("include = [\"sites/[a.toml\"]\n{LISTEN}"),
    );
    let err = Config::load(&bad_glob).expect_err("bad glob");
    assert_eq!(
        (err.file.as_path(), err.line),
        (bad_glob.as_path(), Some(1)),
        "{err}"
    );
    assert!(
        err.message
            .contains("include \"sites/[a.toml\" is not a valid glob"),
        "{err}"
    );

    let empty = dir.write("empty.toml", &format!("include = [\"\"]\n{LISTEN}"));
    let err = Config::load(&empty).expect_err("empty include");
    assert!(err.message.contains("the path is empty"), "{err}");

    let twice = dir.write(
        "twice.toml",
        &format!("include = [\"sites/*.toml\", \"sites/a.toml\"]\n{LISTEN}"),
    );
    dir.write("sites/a.toml", "");
    let err = Config::load(&twice).expect_err("twice");
    assert_eq!(
        (err.file.as_path(), err.line),
        (twice.as_path(), Some(1)),
        "{err}"
    );
    assert!(err.message.contains("is already included by"), "{err}");

    for (key, body) in [
        ("[[listen]]", LISTEN.to_string()),
        (
            "[defaults]",
            "[defaults]\nconnect_timeout = \"1s\"\n".to_string(),
        ),
        ("[default]", "[default]\nbackend = \"::1\"\n".to_string()),
        ("[xdp]", "[xdp]\ninterfaces = [\"eth0\"]\n".to_string()),
    ] {
        let dir = TempDir::new("main-only");
        let main = dir.write(
            "spliced.toml",
            &format!("include = [\"site.toml\"]\n{LISTEN}"),
        );
        let site = dir.write("site.toml", &format!("# a customer\n{body}"));
        let err = Config::load(&main).expect_err(key);
        assert_eq!(
            (err.file.as_path(), err.line),
            (site.as_path(), Some(2)),
            "{err}"
        );
        assert!(
            err.message.contains(&format!(
                "{key} is only allowed in the main configuration file"
            )),
            "{err}"
        );
    }

    let syntax = TempDir::new("syntax");
    let main = syntax.write(
        "spliced.toml",
        &format!("include = [\"site.toml\"]\n{LISTEN}"),
    );
    let site = syntax.write(
        "site.toml",
        "[[site]]\nhostnames = [\"a.example\"]\nbackend = \"::1\"\nbogus = 1\n",
    );
    let err = Config::load(&main).expect_err("unknown key in include");
    assert_eq!(
        (err.file.as_path(), err.line),
        (site.as_path(), Some(4)),
        "{err}"
    );
    assert!(err.message.contains("unknown field `bogus`"), "{err}");
}

#[test]
fn include_cycles() {
    let dir = TempDir::new("cycle");
    let main = dir.write("spliced.toml", &format!("include = [\"a.toml\"]\n{LISTEN}"));
    let a = dir.write("a.toml", "include = [\"b.toml\"]\n");
    let b = dir.write("b.toml", "\ninclude = [\"a.toml\"]\n");
    let err = Config::load(&main).expect_err("cycle");
    assert_eq!(
        (err.file.as_path(), err.line),
        (b.as_path(), Some(2)),
        "{err}"
    );
    let chain = format!(
        "include cycle: {} -> {} -> {}",
        a.display(),
        b.display(),
        a.display()
    );
    assert!(err.message.contains(&chain), "{err}");

    let own = TempDir::new("self");
    let main = own.write("spliced.toml", &format!("include = [\"*.toml\"]\n{LISTEN}"));
    let err = Config::load(&main).expect_err("includes itself");
    assert_eq!(
        (err.file.as_path(), err.line),
        (main.as_path(), Some(1)),
        "{err}"
    );
    assert!(err.message.contains("include cycle"), "{err}");
}

#[test]
fn from_str_resolves_includes_next_to_path() {
    let dir = TempDir::new("from-str");
    dir.write(
        "x.toml",
        "[[site]]\nhostnames = [\"x.example\"]\nbackend = \"2001:db8::1\"\n",
    );
    let text = format!("include = [\"x.toml\"]\n{LISTEN}");
    let config = Config::from_str(&text, &dir.0.join("not-on-disk.toml")).expect("valid");
    assert_eq!(config.sites[0].name, "x.example");
    assert_eq!(config.files[0], dir.0.join("not-on-disk.toml"));
}

#[test]
fn load_reports_unreadable_main_file() {
    let dir = TempDir::new("unreadable");
    let path = dir.0.join("absent.toml");
    let err = Config::load(&path).expect_err("absent");
    assert_eq!((err.file.as_path(), err.line), (path.as_path(), None));
    assert!(
        err.to_string().contains("cannot read the configuration"),
        "{err}"
    );
}

#[test]
fn summary_describes_the_config() {
    let text = r#"
[defaults]
idle_timeout = "90s"
[[listen]]
address = "0.0.0.0:443"
protocol = "tls"
[[listen]]
address = "[::]:80"
protocol = "http"
forwarding = "copy"
[[site]]
hostnames = ["a.example", "*.a.example"]
backend = "2001:db8::1"
proxy_protocol = "v2"
[[site]]
hostnames = ["b.example"]
backend = { tls = "[2001:db8::2]:443" }
proxy_protocol = "v1"
[default]
backend = "2001:db8::3"
"#;
    let summary = parse(text).expect("valid").summary();
    for line in [
        "files read: 1\n  main.toml\n",
        "idle_timeout 90s",
        "sockmap_backlog_limit 4MiB",
        "  0.0.0.0:443 tls forwarding auto (default)\n",
        "  [::]:80 http forwarding copy\n",
        "sites: 2 with 3 hostnames (2 exact, 1 wildcard)\n",
        "  served on tls: 2\n",
        "  served on http: 1\n",
        "default site: backend 2001:db8::3 (listener's port), proxy_protocol none\n",
        "proxy_protocol: 1 none, 1 v1, 1 v2\n",
    ] {
        assert!(summary.contains(line), "{line:?} not in:\n{summary}");
    }
    let refusing = parse(LISTEN).expect("valid").summary();
    assert!(
        refusing.contains("default site: none (unknown and missing names are refused)"),
        "{refusing}"
    );
    assert!(
        refusing.contains("xdp: none (no edge filter)\n"),
        "{refusing}"
    );
}

/// `[xdp]` on line 4, after the listener; `body` starts on line 5.
fn xdp(body: &str) -> String {
    format!("{LISTEN}[xdp]\n{body}")
}

/// Asserts that `[xdp]` with `body` is refused with exactly `expected` (`file:line:col: message`).
#[track_caller]
fn xdp_refused(body: &str, expected: &str) {
    let err = parse(&xdp(body)).expect_err("the [xdp] section should be refused");
    assert_eq!(err.to_string(), expected);
}

#[test]
fn xdp_every_key() {
    let text = r#"
[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[xdp]
interfaces = ["eth0", "eth1"]     # required
mode = "auto"                     # auto (default) | native | generic
deny = ["192.0.2.3/32", "2001:db8:bad::/48", "198.51.100.7", "2001:DB8::1", "10.0.0.0/8"]
syn_rate_per_source = 100         # SYNs per second per source
syn_burst = 200
ports = [443, 80]
"#;
    let config = parse(text).expect("valid");
    let cidr = |addr: &str, prefix: u8| Cidr {
        addr: ip(addr),
        prefix,
    };
    assert_eq!(
        config.xdp,
        Some(Xdp {
            interfaces: vec!["eth0".into(), "eth1".into()],
            mode: XdpMode::Auto,
            deny: vec![
                cidr("192.0.2.3", 32),
                cidr("2001:db8:bad::", 48),
                cidr("198.51.100.7", 32),
                cidr("2001:db8::1", 128),
                cidr("10.0.0.0", 8),
            ],
            syn_limit: Some(SynLimit {
                rate_per_second: 100,
                burst: 200
            }),
            // Sorted; the listener's port is not added to an explicit list.
            ports: vec![80, 443],
        })
    );
    for (mode, expected) in [
        ("auto", XdpMode::Auto),
        ("native", XdpMode::Native),
        ("generic", XdpMode::Generic),
    ] {
        let text = xdp(&format!("interfaces = [\"eth0\"]\nmode = \"{mode}\"\n"));
        let xdp = parse(&text).expect("valid").xdp.expect("[xdp]");
        assert_eq!(xdp.mode, expected);
        assert_eq!(xdp.mode.to_string(), mode);
    }
    assert_eq!(cidr("2001:db8:bad::", 48).to_string(), "2001:db8:bad::/48");
    assert_eq!(cidr("192.0.2.0", 24).to_string(), "192.0.2.0/24");
    // Every network of a family, and the longest interface name.
    let text = xdp("interfaces = [\"abcdefghijklmno\"]\ndeny = [\"0.0.0.0/0\", \"::/0\"]\n");
    let xdp = parse(&text).expect("valid").xdp.expect("[xdp]");
    assert_eq!(xdp.interfaces, ["abcdefghijklmno"]);
    assert_eq!(xdp.deny, [cidr("0.0.0.0", 0), cidr("::", 0)]);
}

#[test]
fn xdp_defaults() {
    assert_eq!(parse(LISTEN).expect("valid").xdp, None);
    let text = r#"
[[listen]]
address = "0.0.0.0:8443"
protocol = "tls"
[[listen]]
address = "[::]:443"
protocol = "tls"
[[listen]]
address = "0.0.0.0:80"
protocol = "http"
[[listen]]
address = "0.0.0.0:443"
protocol = "tls"
[xdp]
interfaces = ["eth0"]
"#;
    let config = parse(text).expect("valid");
    assert_eq!(
        config.xdp,
        Some(Xdp {
            interfaces: vec!["eth0".into()],
            mode: XdpMode::Auto,
            deny: vec![],
            syn_limit: None,
            // The listeners' ports, deduplicated and sorted.
            ports: vec![80, 443, 8443],
        })
    );
    let rate_only = xdp("interfaces = [\"eth0\"]\nsyn_rate_per_source = 50\ndeny = []\n");
    let xdp = parse(&rate_only).expect("valid").xdp.expect("[xdp]");
    assert_eq!(
        xdp.syn_limit,
        Some(SynLimit {
            rate_per_second: 50,
            burst: 50
        })
    );
    assert!(xdp.deny.is_empty());
    assert_eq!(xdp.ports, [443]);
    let largest = xdp_limits(u32::MAX.into(), u32::MAX.into());
    assert_eq!(
        largest.syn_limit,
        Some(SynLimit {
            rate_per_second: u32::MAX,
            burst: u32::MAX
        })
    );
    let small_burst = xdp_limits(100, 1);
    assert_eq!(small_burst.syn_limit.map(|l| l.burst), Some(1));
}

/// The `[xdp]` section with the given SYN rate and burst.
fn xdp_limits(rate: i64, burst: i64) -> Xdp {
    let text = xdp(&format!(
        "interfaces = [\"eth0\"]\nsyn_rate_per_source = {rate}\nsyn_burst = {burst}\n"
    ));
    parse(&text).expect("valid").xdp.expect("[xdp]")
}

#[test]
fn xdp_section_errors() {
    xdp_refused(
        "interfaces = [\"eth0\"]\nmodes = \"auto\"\n",
        "main.toml:6:1: unknown field `modes`, expected one of `interfaces`, `mode`, `deny`, \
         `syn_rate_per_source`, `syn_burst`, `ports`",
    );
    xdp_refused(
        "mode = \"auto\"\n",
        "main.toml:4:1: [xdp] has no interfaces, e.g. interfaces = [\"eth0\"]",
    );
    xdp_refused(
        "interfaces = [\"eth0\"]\nmode = \"driver\"\n",
        "main.toml:6:8: xdp: mode must be one of auto, native, generic, not \"driver\"",
    );
    xdp_refused(
        "interfaces = [\"eth0\"]\nmode = \"Native\"\n",
        "main.toml:6:8: xdp: mode must be one of auto, native, generic, not \"Native\"",
    );
}

#[test]
fn xdp_interface_errors() {
    xdp_refused(
        "interfaces = []\n",
        "main.toml:5:14: xdp: interfaces is empty",
    );
    xdp_refused(
        "interfaces = \"eth0\"\n",
        "main.toml:5:14: invalid type: string \"eth0\", expected a sequence",
    );
    // `interfaces = ["eth0", ` is 22 characters: the bad name is at column 23.
    for (bad, reason) in [
        ("eth 0", "it contains ' '"),
        ("eth0\\t", "it contains '\\t'"),
        ("a/b", "it contains '/'"),
        (
            "eth0:1",
            "it contains ':'; an alias like \"eth0:1\" is an address label, not an interface",
        ),
        (".", "\".\" and \"..\" are not interface names"),
        ("..", "\".\" and \"..\" are not interface names"),
        ("", "it is empty"),
        ("abcdefghijklmnop", "it is 16 bytes long, more than 15"),
        ("ethernet-äöüß", "it is 17 bytes long, more than 15"),
    ] {
        let shown = bad.replace("\\t", "\t");
        xdp_refused(
            &format!("interfaces = [\"eth0\", \"{bad}\"]\n"),
            &format!("main.toml:5:23: xdp: interface {shown:?} is not valid: {reason}"),
        );
    }
    xdp_refused(
        "interfaces = [\"eth0\", \"eth1\", \"eth0\"]\n",
        "main.toml:5:31: xdp: interface \"eth0\" is listed twice",
    );
}

#[test]
fn xdp_deny_errors() {
    // `deny = [` is 8 characters: the first entry is at column 9.
    let deny = |list: &str| format!("interfaces = [\"eth0\"]\ndeny = [{list}]\n");
    xdp_refused(
        &deny("\"192.0.2/24\""),
        "main.toml:6:9: xdp: deny \"192.0.2/24\" is not valid: expected an IPv4 or IPv6 address, \
         optionally followed by /prefix, as in \"192.0.2.0/24\" or \"2001:db8::/32\"",
    );
    xdp_refused(
        &deny("\"bad.example\""),
        "main.toml:6:9: xdp: deny \"bad.example\" is not valid: expected an IPv4 or IPv6 \
         address, optionally followed by /prefix, as in \"192.0.2.0/24\" or \"2001:db8::/32\"",
    );
    xdp_refused(
        &deny("\"192.0.2.0/x\""),
        "main.toml:6:9: xdp: deny \"192.0.2.0/x\" is not valid: the prefix length \"x\" is not a \
         number",
    );
    xdp_refused(
        &deny("\"192.0.2.0/\""),
        "main.toml:6:9: xdp: deny \"192.0.2.0/\" is not valid: the prefix length \"\" is not a \
         number",
    );
    xdp_refused(
        &deny("24"),
        "main.toml:6:9: invalid type: integer `24`, expected a string",
    );
    xdp_refused(
        &deny("\"192.0.2.1/24\""),
        "main.toml:6:9: xdp: deny \"192.0.2.1/24\" has bits set after the prefix; the network \
         is 192.0.2.0/24",
    );
    xdp_refused(
        &deny("\"10.0.0.0/8\", \"2001:db8:bad:1::/48\""),
        "main.toml:6:23: xdp: deny \"2001:db8:bad:1::/48\" has bits set after the prefix; the \
         network is 2001:db8:bad::/48",
    );
    xdp_refused(
        &deny("\"192.0.2.0/33\""),
        "main.toml:6:9: xdp: deny \"192.0.2.0/33\" is not valid: the prefix length 33 is more \
         than 32, the length of an IPv4 address",
    );
    xdp_refused(
        &deny("\"2001:db8::/129\""),
        "main.toml:6:9: xdp: deny \"2001:db8::/129\" is not valid: the prefix length 129 is \
         more than 128, the length of an IPv6 address",
    );
    xdp_refused(
        &deny("\"192.0.2.0/24\", \"192.0.2.0/24\""),
        "main.toml:6:25: xdp: deny \"192.0.2.0/24\" is listed twice",
    );
    xdp_refused(
        &deny("\"198.51.100.7\",\n  \"198.51.100.7/32\""),
        "main.toml:7:3: xdp: deny \"198.51.100.7/32\" is listed twice: \"198.51.100.7\" is the \
         same network, 198.51.100.7/32",
    );
    xdp_refused(
        &deny("\"2001:db8::/32\", \"2001:DB8:0::/32\""),
        "main.toml:6:26: xdp: deny \"2001:DB8:0::/32\" is listed twice: \"2001:db8::/32\" is the \
         same network, 2001:db8::/32",
    );
}

#[test]
fn xdp_syn_limit_errors() {
    let limits = |keys: &str| format!("interfaces = [\"eth0\"]\n{keys}\n");
    xdp_refused(
        &limits("syn_burst = 200"),
        "main.toml:6:13: xdp: syn_burst needs syn_rate_per_source; without a rate there is no \
         SYN limit for a burst to size",
    );
    xdp_refused(
        &limits("syn_rate_per_source = 0"),
        "main.toml:6:23: xdp: syn_rate_per_source must be at least 1, not 0",
    );
    xdp_refused(
        &limits("syn_rate_per_source = -5"),
        "main.toml:6:23: xdp: syn_rate_per_source must be at least 1, not -5",
    );
    xdp_refused(
        &limits("syn_rate_per_source = 4294967296"),
        "main.toml:6:23: xdp: syn_rate_per_source must be at most 4294967295, not 4294967296",
    );
    xdp_refused(
        &limits("syn_rate_per_source = \"100\""),
        "main.toml:6:23: invalid type: string \"100\", expected i64",
    );
    xdp_refused(
        &limits("syn_rate_per_source = 100\nsyn_burst = 0"),
        "main.toml:7:13: xdp: syn_burst must be at least 1, not 0",
    );
    xdp_refused(
        &limits("syn_rate_per_source = 100\nsyn_burst = 4294967296"),
        "main.toml:7:13: xdp: syn_burst must be at most 4294967295, not 4294967296",
    );
}

#[test]
fn xdp_port_errors() {
    // `ports = [` is 9 characters: the first entry is at column 10.
    let ports = |list: &str| format!("interfaces = [\"eth0\"]\nports = [{list}]\n");
    xdp_refused(
        &ports("0"),
        "main.toml:6:10: xdp: ports must be between 1 and 65535, not 0",
    );
    xdp_refused(
        &ports("443, 70000"),
        "main.toml:6:15: xdp: ports must be between 1 and 65535, not 70000",
    );
    xdp_refused(
        &ports("-443"),
        "main.toml:6:10: xdp: ports must be between 1 and 65535, not -443",
    );
    xdp_refused(
        &ports("443, 80, 443"),
        "main.toml:6:19: xdp: port 443 is listed twice",
    );
    xdp_refused(
        &ports(""),
        "main.toml:6:9: xdp: ports is empty; leave it out to guard the listeners' ports",
    );
    xdp_refused(
        &ports("\"443\""),
        "main.toml:6:10: invalid type: string \"443\", expected i64",
    );
}

#[test]
fn xdp_only_in_the_main_file() {
    let dir = TempDir::new("xdp-include");
    let main = dir.write(
        "spliced.toml",
        &format!("include = [\"site.toml\"]\n{LISTEN}"),
    );
    let site = dir.write(
        "site.toml",
        "[[site]]\nhostnames = [\"a.example\"]\nbackend = \"::1\"\n\n[xdp]\ninterfaces = [\"eth0\"]\n",
    );
    let err = Config::load(&main).expect_err("[xdp] in an included file");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:5:1: [xdp] is only allowed in the main configuration file; included files may \
             contain [[site]] entries and include only",
            site.display()
        )
    );
}

#[test]
fn xdp_summary() {
    let text = format!(
        "{LISTEN}[[listen]]\naddress = \"[::]:80\"\nprotocol = \"http\"\n[xdp]\n\
         interfaces = [\"eth0\", \"eth1\"]\nmode = \"generic\"\n\
         deny = [\"192.0.2.0/24\", \"2001:db8::/32\", \"198.51.100.7\"]\n\
         syn_rate_per_source = 100\n"
    );
    let summary = parse(&text).expect("valid").summary();
    assert!(
        summary.contains(
            "xdp: mode generic on eth0, eth1\n\
             \x20 deny: 3 networks (2 IPv4, 1 IPv6)\n\
             \x20 syn limit: 100 per second per source, burst 100\n\
             \x20 guarded ports: 80, 443\n"
        ),
        "{summary}"
    );
    let unlimited = parse(&xdp("interfaces = [\"eth0\"]\n"))
        .expect("valid")
        .summary();
    assert!(unlimited.contains("  syn limit: none\n"), "{unlimited}");
}

/// An `http` listener, for the header tests.
const LISTEN_HTTP: &str = "[[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\n";

#[test]
fn forwarded_header_per_site_and_in_defaults() {
    let text = format!(
        "[defaults]\nforwarded_header = \"x-forwarded-for\"\n\
         trusted_proxies = [\"198.51.100.0/24\", \"2001:db8:9::/48\"]\n\
         max_request_head = \"32KiB\"\n{LISTEN}{LISTEN_HTTP}\
         [[site]]\nhostnames = [\"a.example\"]\nbackend = \"::1\"\n\
         [[site]]\nhostnames = [\"b.example\"]\nbackend = \"::1\"\nforwarded_header = \"forwarded\"\n\
         [[site]]\nhostnames = [\"c.example\"]\nbackend = \"::1\"\nforwarded_header = \"none\"\n\
         [[site]]\nhostnames = [\"d.example\"]\nbackend = {{ tls = \"[::1]:443\" }}\n"
    );
    let config = parse(&text).expect("valid");
    let headers: Vec<ForwardedHeader> = config.sites.iter().map(|s| s.forwarded_header).collect();
    // d.example inherits the default; its TLS-only backend simply never sees a header.
    assert_eq!(
        headers,
        [
            ForwardedHeader::XForwardedFor,
            ForwardedHeader::Forwarded,
            ForwardedHeader::None,
            ForwardedHeader::XForwardedFor
        ]
    );
    assert_eq!(config.defaults.max_request_head, 32 << 10);
    assert_eq!(
        config.defaults.trusted_proxies,
        [
            Cidr {
                addr: ip("198.51.100.0"),
                prefix: 24
            },
            Cidr {
                addr: ip("2001:db8:9::"),
                prefix: 48
            }
        ]
    );
    let summary = config.summary();
    assert!(
        summary.contains("forwarded_header: 1 none, 2 x-forwarded-for, 1 forwarded\n"),
        "{summary}"
    );
    let plain = parse(&format!(
        "{LISTEN_HTTP}[[site]]\nhostnames = [\"a.example\"]\nbackend = \"::1\"\n"
    ))
    .expect("valid");
    assert_eq!(plain.sites[0].forwarded_header, ForwardedHeader::None);
    assert_eq!(plain.defaults.max_request_head, 16 << 10);
}

#[test]
fn forwarded_header_errors() {
    let site = |listen: &str, extra: &str| {
        format!("{listen}[[site]]\nhostnames = [\"a.example\"]\nbackend = \"::1\"\n{extra}\n")
    };
    refused(
        &site(LISTEN_HTTP, "forwarded_header = \"x-real-ip\""),
        "forwarded_header",
        "site \"a.example\": forwarded_header must be one of x-forwarded-for, forwarded, none, \
         not \"x-real-ip\"",
    );
    refused(
        &site(LISTEN, "forwarded_header = \"x-forwarded-for\""),
        "forwarded_header",
        "needs a [[listen]] with protocol = \"http\"",
    );
    refused(
        &format!("[defaults]\nforwarded_header = \"forwarded\"\n{LISTEN}"),
        "forwarded_header",
        "defaults: forwarded_header = \"forwarded\" needs a [[listen]]",
    );
    refused(
        &format!(
            "{LISTEN}{LISTEN_HTTP}[[site]]\nhostnames = [\"a.example\"]\n\
             backend = {{ tls = \"[::1]:443\" }}\nforwarded_header = \"x-forwarded-for\"\n"
        ),
        "forwarded_header",
        "needs an http backend, but this site's backend only has tls",
    );
    refused(
        &format!("[defaults]\ntrusted_proxies = [\"198.51.100.1/24\"]\n{LISTEN}"),
        "trusted_proxies",
        "has bits set after the prefix; the network is 198.51.100.0/24",
    );
    refused(
        &format!("[defaults]\ntrusted_proxies = [\"lb.example\"]\n{LISTEN}"),
        "trusted_proxies",
        "trusted_proxies \"lb.example\" is not valid",
    );
    refused(
        &format!("[defaults]\nmax_request_head = \"100B\"\n{LISTEN}"),
        "max_request_head",
        "max_request_head must be between 1KiB and 1MiB",
    );
}

#[test]
fn accept_proxy_per_listener() {
    let config = parse(
        "[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\
         accept_proxy = [\"198.51.100.0/24\", \"2001:db8:9::/48\", \"192.0.2.9/32\"]\n\
         [[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\n",
    )
    .expect("valid");
    let cidr = |addr: &str, prefix| Cidr {
        addr: ip(addr),
        prefix,
    };
    assert_eq!(
        config.listeners[0].accept_proxy,
        vec![
            cidr("198.51.100.0", 24),
            cidr("2001:db8:9::", 48),
            cidr("192.0.2.9", 32)
        ]
    );
    assert!(config.listeners[1].accept_proxy.is_empty());
    assert!(
        config
            .summary()
            .contains("accept_proxy 198.51.100.0/24,2001:db8:9::/48,192.0.2.9/32"),
        "{}",
        config.summary()
    );
    let err = refused(
        "[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\
         accept_proxy = [\"198.51.100.0/24\", \"198.51.100.1/24\"]\n",
        "\"198.51.100.1/24\"",
        "listen 0.0.0.0:443: accept_proxy \"198.51.100.1/24\" has bits set after the prefix",
    );
    assert_eq!(err.line, Some(4));
    refused(
        "[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\
         accept_proxy = [\"lb.example\"]\n",
        "lb.example",
        "accept_proxy \"lb.example\" is not valid",
    );
    refused(
        "[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\
         accept_proxy = \"198.51.100.0/24\"\n",
        "accept_proxy",
        "invalid type",
    );
}

#[test]
fn cidr_contains() {
    let net = |addr: &str, prefix| Cidr {
        addr: ip(addr),
        prefix,
    };
    assert!(net("198.51.100.0", 24).contains(ip("198.51.100.200")));
    assert!(net("198.51.100.0", 24).contains(ip("::ffff:198.51.100.7")));
    assert!(!net("198.51.100.0", 24).contains(ip("198.51.101.1")));
    assert!(net("0.0.0.0", 0).contains(ip("192.0.2.1")));
    assert!(net("192.0.2.1", 32).contains(ip("192.0.2.1")));
    assert!(!net("192.0.2.1", 32).contains(ip("192.0.2.2")));
    assert!(net("2001:db8::", 32).contains(ip("2001:db8:1::1")));
    assert!(!net("2001:db8::", 32).contains(ip("192.0.2.1")));
    assert!(net("::", 0).contains(ip("2001:db8::1")));
}

/// The per-source limit is compared with the global one wherever either is written, and both
/// show in the summary.
#[test]
fn per_source_limit_against_the_global_one() {
    let text =
        format!("[defaults]\nmax_connections_per_source = 50\nmax_connections = 40\n{LISTEN}");
    refused(
        &text,
        "max_connections_per_source",
        "max_connections_per_source (50) is more than max_connections (40)",
    );
    let text =
        format!("[defaults]\nmax_connections_per_source = 40\nmax_connections = 40\n{LISTEN}");
    let config = parse(&text).expect("valid");
    assert_eq!(config.defaults.max_connections_per_source, Some(40));
    assert!(
        config
            .summary()
            .contains("max_connections 40, max_connections_per_source 40,"),
        "{}",
        config.summary()
    );
    assert!(
        parse(LISTEN)
            .expect("valid")
            .summary()
            .contains("max_connections_per_source none,")
    );
}

#[test]
fn dns_backends_with_defaults() {
    let text = format!(
        "{LISTEN}[[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\nbackend = \"none\"\n\
         [defaults]\nbackend = \"dns\"\n\
         [dns]\nallowed_backends = [\"2001:db8:1::/48\", \"2001:db8:2::/64\"]\n"
    );
    let config = parse(&text).expect("valid");
    assert_eq!(
        config.listeners.iter().map(|l| l.dns).collect::<Vec<_>>(),
        [true, false]
    );
    let dns = config.dns.expect("[dns]");
    assert_eq!(dns.allowed_backends.len(), 2);
    assert_eq!(dns.servers, None);
    assert_eq!(dns.timeout, Duration::from_secs(1));
    assert_eq!(dns.ttl_floor, Duration::from_secs(5));
    assert_eq!(dns.ttl_ceiling, Duration::from_secs(300));
    assert_eq!(dns.negative_ttl, Duration::from_secs(5));
    assert_eq!(dns.proxy_protocol, Version::None);
}

#[test]
fn dns_backends_explicit() {
    let text = "[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\nbackend = \"dns\"\n\
         [defaults]\nconnect_timeout = \"2s\"\n\
         [dns]\nallowed_backends = [\"2001:db8:1::/48\"]\n\
         servers = [\"2001:db8:53::53\", \"[2001:db8:53::54]:5353\"]\n\
         timeout = \"500ms\"\nttl_floor = \"1s\"\nttl_ceiling = \"1m\"\nnegative_ttl = \"2s\"\n\
         proxy_protocol = \"v2\"\n";
    let config = parse(text).expect("valid");
    assert!(config.listeners[0].dns);
    assert!(
        config
            .summary()
            .contains("dns: allowed_backends 2001:db8:1::/48")
    );
    let dns = config.dns.expect("[dns]");
    assert_eq!(
        dns.servers,
        Some(vec![
            sock("[2001:db8:53::53]:53"),
            sock("[2001:db8:53::54]:5353")
        ])
    );
    assert_eq!(dns.timeout, Duration::from_millis(500));
    assert_eq!(dns.ttl_ceiling, Duration::from_secs(60));
    assert_eq!(dns.proxy_protocol, Version::V2);
}

#[test]
fn dns_backends_refused() {
    let dns = "[dns]\nallowed_backends = [\"2001:db8:1::/48\"]\n";
    // backend = "dns" without [dns].
    let text = format!("{LISTEN}[defaults]\nbackend = \"dns\"\n");
    refused(&text, "backend = ", "needs a [dns] section");
    let text =
        "[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\nbackend = \"2001:db8::1\"\n";
    refused(text, "backend = ", "backend must be \"dns\" or \"none\"");
    // [dns] that nothing uses.
    let text = format!("{LISTEN}{dns}");
    refused(&text, "[dns]", "no listener uses it");
    let with = |body: &str| format!("{LISTEN}[defaults]\nbackend = \"dns\"\n[dns]\n{body}");
    refused(
        &with("timeout = \"1s\"\n"),
        "[dns]",
        "has no allowed_backends",
    );
    refused(
        &with("allowed_backends = []\n"),
        "allowed_backends",
        "is empty",
    );
    refused(
        &with("allowed_backends = [\"192.0.2.0/24\"]\n"),
        "allowed_backends",
        "IPv4 network",
    );
    refused(
        &with("allowed_backends = [\"::/0\"]\n"),
        "allowed_backends",
        "wider than a /16",
    );
    refused(
        &with("allowed_backends = [\"2001:db8:1::1/48\"]\n"),
        "allowed_backends",
        "bits set after the prefix",
    );
    let fenced = "allowed_backends = [\"2001:db8:1::/48\"]\n";
    refused(
        &with(&format!("{fenced}servers = [\"ns.example\"]\n")),
        "servers",
        "dns: server \"ns.example\" is not valid",
    );
    refused(
        &with(&format!("{fenced}timeout = \"4s\"\n")),
        "timeout",
        "longer than connect_timeout 3s",
    );
    refused(
        &with(&format!("{fenced}timeout = \"0s\"\n")),
        "timeout",
        "greater than zero",
    );
    refused(
        &with(&format!(
            "{fenced}ttl_floor = \"1m\"\nttl_ceiling = \"10s\"\n"
        )),
        "ttl_ceiling",
        "shorter than ttl_floor",
    );
    refused(
        &with(&format!("{fenced}source = \"embed\"\n")),
        "source = ",
        "dns: source = \"embed\" needs source_prefix",
    );
    refused(
        &with(&format!("{fenced}proxy_protocol = \"v3\"\n")),
        "proxy_protocol",
        "dns: proxy_protocol must be one of none, v1, v2",
    );
}

#[test]
fn source_embed() {
    let text = format!(
        "{LISTEN}[defaults]\nsource_prefix = \"2001:db8:4646::/96\"\n\
         [[site]]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8:1::10\"\nsource = \"embed\"\n\
         [[site]]\nhostnames = [\"b.example\"]\nbackend = \"2001:db8:1::10\"\n"
    );
    let config = parse(&text).expect("valid");
    assert_eq!(
        config.defaults.source_prefix,
        Some(Cidr {
            addr: ip("2001:db8:4646::"),
            prefix: 96
        })
    );
    assert_eq!(config.sites[0].source, SourceAddress::Embed);
    assert_eq!(config.sites[1].source, SourceAddress::Proxy);

    let site = "[[site]]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8:1::10\"\n";
    refused(
        &format!("{LISTEN}{site}source = \"embed\"\n"),
        "source = ",
        "source = \"embed\" needs source_prefix in [defaults]",
    );
    let with_prefix = |prefix: &str, source: &str| {
        format!("{LISTEN}[defaults]\nsource_prefix = \"{prefix}\"\n{site}source = \"{source}\"\n")
    };
    refused(
        &with_prefix("2001:db8:4646::/64", "embed"),
        "source_prefix",
        "must be an IPv6 /96",
    );
    refused(
        &with_prefix("192.0.2.0/24", "embed"),
        "source_prefix",
        "must be an IPv6 /96",
    );
    refused(
        &with_prefix("2001:db8:4646::1/96", "embed"),
        "source_prefix",
        "bits set after the prefix",
    );
    refused(
        &with_prefix("2001:db8:4646::/96", "client"),
        "source = ",
        "source must be \"proxy\" or \"embed\"",
    );
}

/// `[packet]` on line 4, after the listener; `body` starts on line 5.
fn packet(body: &str) -> String {
    format!("{LISTEN}[packet]\n{body}")
}

/// Asserts that `[packet]` with `body` is refused with exactly `expected`.
#[track_caller]
fn packet_refused(body: &str, expected: &str) {
    let err = parse(&packet(body)).expect_err("the [packet] section should be refused");
    assert_eq!(err.to_string(), expected);
}

#[test]
fn packet_defaults_and_every_key() {
    let config = parse(LISTEN).expect("valid");
    assert_eq!(config.packet(), &PacketSettings::default());
    assert_eq!(
        config.packet().max_connections,
        proxy_common::PACKET_MAX_CONNECTIONS
    );
    assert_eq!(config.packet().idle_timeout, Duration::from_secs(3600));
    assert_eq!(config.packet().linger, Duration::from_secs(1));
    assert_eq!(config.packet().drain_timeout, Duration::from_secs(30));
    assert!(!config.summary().contains("packet"), "{}", config.summary());

    let text = packet(
        "interfaces = [\"eth0\", \"veth-b\"]\nafter = \"64KiB\"\nmax_connections = 1000\n\
         idle_timeout = \"10m\"\nlinger = \"0\"\ndrain_timeout = \"5s\"\nkeep_on_stop = false\n\
         mss = 1400\n",
    );
    let config = parse(&text).expect("valid");
    assert_eq!(
        config.packet(),
        &PacketSettings {
            interfaces: vec!["eth0".into(), "veth-b".into()],
            after: 64 << 10,
            max_connections: 1000,
            idle_timeout: Duration::from_secs(600),
            linger: Duration::ZERO,
            drain_timeout: Duration::from_secs(5),
            keep_on_stop: false,
            mss: Some(1400),
            auto_after: Some(64 << 10),
        }
    );
    assert!(
        config.summary().contains(
            "packet: interfaces eth0, veth-b; after 64KiB, max_connections 1000, idle_timeout \
             10m, linger 0s, drain_timeout 5s, keep_on_stop false, mss 1400\n"
        ),
        "{}",
        config.summary()
    );
    // A plain number of bytes, the largest table, and mss 0 (derive it, as in the design).
    let text = packet("after = 1048576\nmax_connections = 65536\nmss = 0\ninterfaces = []\n");
    let settings = parse(&text).expect("valid").packet;
    assert_eq!(settings.after, 1 << 20);
    assert_eq!(settings.max_connections, 65_536);
    assert_eq!(settings.mss, None);
    assert!(settings.interfaces.is_empty());
}

#[test]
fn packet_forwarding_everywhere_forwarding_is() {
    let text = r#"
[defaults]
forwarding = "packet"
[[listen]]
address = "0.0.0.0:443"
protocol = "tls"
forwarding = "packet"
[[site]]
hostnames = ["a.example"]
backend = "2001:db8::1"
forwarding = "packet"
[default]
backend = "2001:db8::2"
forwarding = "packet"
"#;
    let config = parse(text).expect("valid");
    assert_eq!(config.defaults.forwarding, Forwarding::Packet);
    assert_eq!(config.listeners[0].forwarding, Some(Forwarding::Packet));
    assert_eq!(config.sites[0].forwarding, Some(Forwarding::Packet));
    assert_eq!(
        config.default_site.as_ref().and_then(|s| s.forwarding),
        Some(Forwarding::Packet)
    );
    assert_eq!(Forwarding::Packet.to_string(), "packet");
    assert!(config.names_packet());
    assert!(
        config.summary().contains(
            "packet: interfaces every up interface with a global address; after 0B, \
             max_connections 65536, idle_timeout 1h, linger 1s, drain_timeout 30s, \
             keep_on_stop false, mss from the MTU\n"
        ),
        "{}",
        config.summary()
    );
    assert!(!parse(LISTEN).expect("valid").names_packet());
}

/// `after` in the `[packet]` section is what lets `auto` use the engine: without it
/// `auto_after` is `None`, while `packet` keeps 0. The summary says which applies to `auto`.
#[test]
fn a_packet_section_with_after_lets_auto_use_the_engine() {
    let without = parse(LISTEN).expect("valid");
    assert_eq!(without.packet().auto_after, None);
    assert!(
        !without.summary().contains("auto:"),
        "{}",
        without.summary()
    );

    // The section alone: `packet` may use it, `auto` does not (no default `after` pays).
    let empty = parse(&packet("")).expect("valid");
    assert_eq!(empty.packet().auto_after, None);
    assert_eq!(empty.packet().after, 0);
    assert!(!empty.summary().contains("auto:"), "{}", empty.summary());
    let mib = parse(&packet("after = \"1MiB\"\n")).expect("valid");
    assert!(
        mib.summary().contains(
            "auto: the packet engine after 1MiB both ways (where it loads), sockmap after \
             256KiB per direction for a connection it refuses\n"
        ),
        "{}",
        mib.summary()
    );

    let set = parse(&packet("after = \"4MiB\"\n")).expect("valid");
    assert_eq!(set.packet().auto_after, Some(4 << 20));
    assert_eq!(set.packet().after, 4 << 20);
    let zero = parse(&packet("after = 0\n")).expect("valid");
    assert_eq!(zero.packet().auto_after, Some(0));

    // Nothing on auto: the section changes nothing for it, and the summary says nothing.
    let splice = parse(&format!(
        "[defaults]\nforwarding = \"splice\"\n{}",
        packet("")
    ))
    .expect("valid");
    assert!(!splice.names_auto());
    assert!(!splice.summary().contains("auto:"), "{}", splice.summary());
}

#[test]
fn packet_refusals_say_where_and_what() {
    packet_refused(
        "bogus = 1\n",
        "main.toml:5:1: unknown field `bogus`, expected one of `interfaces`, `after`, \
         `max_connections`, `idle_timeout`, `linger`, `drain_timeout`, `keep_on_stop`, `mss`",
    );
    packet_refused(
        "interfaces = [\"eth0\", \"eth0:1\"]\n",
        "main.toml:5:23: packet: interface \"eth0:1\" is not valid: it contains ':'; an alias \
         like \"eth0:1\" is an address label, not an interface",
    );
    packet_refused(
        "interfaces = [\"eth0\", \"eth0\"]\n",
        "main.toml:5:23: packet: interface \"eth0\" is listed twice",
    );
    packet_refused(
        "interfaces = [\"averyveryverylongname\"]\n",
        "main.toml:5:15: packet: interface \"averyveryverylongname\" is not valid: it is 21 \
         bytes long, more than 15",
    );
    packet_refused(
        "keep_on_stop = true\n",
        "main.toml:5:16: packet: keep_on_stop = true is not supported yet: handed-off \
         connections end when spliced stops or restarts (their peers get a reset); leave it out \
         or set it to false",
    );
    packet_refused(
        "max_connections = 65537\n",
        "main.toml:5:19: packet: max_connections must be between 1 and 65536 (the size of the \
         kernel's table), not 65537",
    );
    packet_refused(
        "max_connections = 0\n",
        "main.toml:5:19: packet: max_connections must be between 1 and 65536 (the size of the \
         kernel's table), not 0",
    );
    packet_refused(
        "idle_timeout = \"1.5h\"\n",
        "main.toml:5:16: packet: idle_timeout must be a duration like \"10s\", \"500ms\" or \
         \"1h\", not \"1.5h\": use whole numbers, as in \"1500ms\"",
    );
    packet_refused(
        "linger = \"10\"\n",
        "main.toml:5:10: packet: linger must be a duration like \"10s\", \"500ms\" or \"1h\", \
         not \"10\": a unit is missing (ms, s, m or h)",
    );
    packet_refused(
        "drain_timeout = \"0s\"\n",
        "main.toml:5:17: packet: drain_timeout must be greater than zero",
    );
    packet_refused(
        "idle_timeout = \"0\"\n",
        "main.toml:5:16: packet: idle_timeout must be greater than zero",
    );
    packet_refused(
        "after = \"64K\"\n",
        "main.toml:5:9: packet: after must be a size like \"4MiB\", \"512KiB\" or \"1048576\", \
         not \"64K\": unknown unit \"K\" (use B, KiB, MiB, GiB, or KB, MB, GB)",
    );
    packet_refused(
        "after = -1\n",
        "main.toml:5:9: packet: after cannot be negative, not -1",
    );
    for mss in ["535", "65496", "-1"] {
        packet_refused(
            &format!("mss = {mss}\n"),
            &format!(
                "main.toml:5:7: packet: mss must be between 536 and 65495, not {mss} (leave it \
                 out, or 0, to derive it from the interfaces' MTU)"
            ),
        );
    }
    packet_refused(
        "keep_on_stop = \"yes\"\n",
        "main.toml:5:16: invalid type: string \"yes\", expected a boolean",
    );
    for mss in ["536", "65495"] {
        assert!(parse(&packet(&format!("mss = {mss}\n"))).is_ok(), "{mss}");
    }
}

#[test]
fn packet_section_only_in_the_main_file() {
    let dir = TempDir::new("packet-main-only");
    let main = dir.write(
        "spliced.toml",
        &format!("include = [\"site.toml\"]\n{LISTEN}"),
    );
    let site = dir.write("site.toml", "# a customer\n[packet]\nlinger = \"1s\"\n");
    let err = Config::load(&main).expect_err("[packet] in an include");
    assert_eq!(
        (err.file.as_path(), err.line),
        (site.as_path(), Some(2)),
        "{err}"
    );
    assert!(
        err.message
            .contains("[packet] is only allowed in the main configuration file"),
        "{err}"
    );
}

/// A header site on an http listener would have its stream rewritten, which the packet
/// engine cannot do: refused wherever `packet` comes from, at the key that asks for it.
#[test]
fn packet_with_a_forwarding_header_on_http_is_refused() {
    const HTTP: &str = "[[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\n";
    // The site's own forwarding.
    let text = format!(
        "{HTTP}[[site]]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8::1\"\n\
         forwarded_header = \"x-forwarded-for\"\nforwarding = \"packet\"\n"
    );
    let err = refused(
        &text,
        "forwarding = \"packet\"",
        "site \"a.example\": forwarded_header = \"x-forwarded-for\" adds a header to every \
         request on http listeners, but this site's forwarding is \"packet\": the packet engine \
         forwards the byte stream unchanged and cannot insert a header into it",
    );
    assert!(err.message.contains("forwarded_header = \"none\""), "{err}");
    // The listener's, with the header from [defaults]: at the site.
    let text = format!(
        "[defaults]\nforwarded_header = \"forwarded\"\n\
         {}forwarding = \"packet\"\n\
         [[site]]\nhostnames = [\"b.example\"]\nbackend = \"2001:db8::1\"\n",
        HTTP
    );
    refused(
        &text,
        "[[site]]",
        "site \"b.example\": forwarded_header = \"forwarded\" adds a header to every request on \
         http listeners, but the http listener 0.0.0.0:80 forwards with \"packet\"",
    );
    // [defaults]' forwarding, the site's header: at the header.
    let text = format!(
        "[defaults]\nforwarding = \"packet\"\n{HTTP}\
         [[site]]\nhostnames = [\"c.example\"]\nbackend = \"2001:db8::1\"\n\
         forwarded_header = \"x-forwarded-for\"\n"
    );
    refused(
        &text,
        "forwarded_header",
        "but the http listener 0.0.0.0:80 forwards with \"packet\"",
    );
    // The default site too.
    let text = format!(
        "[defaults]\nforwarding = \"packet\"\nforwarded_header = \"x-forwarded-for\"\n{HTTP}\
         [default]\nbackend = \"2001:db8::1\"\n"
    );
    refused(&text, "[default]", "default site: forwarded_header");

    // Accepted: the site chooses another engine; no header; a TLS-only backend; a TLS
    // listener's packet with the header only on http; packet on http without a header.
    for ok in [
        format!(
            "[defaults]\nforwarding = \"packet\"\nforwarded_header = \"x-forwarded-for\"\n{HTTP}\
             [[site]]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8::1\"\n\
             forwarding = \"splice\"\n"
        ),
        format!(
            "[defaults]\nforwarding = \"packet\"\nforwarded_header = \"x-forwarded-for\"\n{HTTP}\
             [[site]]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8::1\"\n\
             forwarded_header = \"none\"\n"
        ),
        format!(
            "[defaults]\nforwarding = \"packet\"\n{HTTP}\
             [[site]]\nhostnames = [\"a.example\"]\nbackend = {{ tls = \"[2001:db8::1]:443\" }}\n"
        ),
        format!(
            "[defaults]\nforwarded_header = \"x-forwarded-for\"\n{HTTP}{LISTEN}\
             forwarding = \"packet\"\n\
             [[site]]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8::1\"\n"
        ),
        format!(
            "[defaults]\nforwarding = \"packet\"\n{HTTP}\
             [[site]]\nhostnames = [\"a.example\"]\nbackend = \"2001:db8::1\"\n"
        ),
    ] {
        if let Err(e) = parse(&ok) {
            panic!("{e}\n{ok}");
        }
    }
}

/// DNS backends take `[defaults]`' header: the same rule, at the `backend = "dns"` that
/// sends them there.
#[test]
fn packet_with_a_header_for_dns_backends_is_refused() {
    let text = "[defaults]\nforwarded_header = \"x-forwarded-for\"\n\
                [[listen]]\naddress = \"0.0.0.0:80\"\nprotocol = \"http\"\n\
                forwarding = \"packet\"\nbackend = \"dns\"\n\
                [dns]\nallowed_backends = [\"2001:db8::/32\"]\n";
    refused(
        text,
        "backend = \"dns\"",
        "listen 0.0.0.0:80: DNS backends get forwarded_header = \"x-forwarded-for\" from \
         [defaults] on this http listener, whose forwarding is \"packet\"",
    );
}
