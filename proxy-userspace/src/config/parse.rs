//! The value syntaxes of the configuration: durations, sizes, hostnames, backends and the
//! enumerations. Pure functions; on error they return the reason for a human, and the caller
//! adds which key it was and where.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::{ForwardedHeader, Forwarding, Protocol, XdpMode};
use crate::preface::Version;

/// The longest hostname DNS can carry, without the trailing dot (RFC 1035, 2.3.4).
const MAX_HOSTNAME_LEN: usize = 253;
/// The longest DNS label (RFC 1035, 2.3.4).
const MAX_LABEL_LEN: usize = 63;
/// The longest Linux interface name: `IFNAMSIZ` (16) less the terminating NUL.
const MAX_INTERFACE_NAME_LEN: usize = 15;

/// Parses `"5s"`, `"250ms"`, `"1m"`, `"2h"` or a sum like `"1m30s"`; a bare `"0"` is zero.
///
/// Whole numbers only: `"1.5s"` is rejected rather than rounded, `"1500ms"` says it exactly.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("it is empty".into());
    }
    if trimmed.starts_with('-') {
        return Err("durations cannot be negative".into());
    }
    if trimmed == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = trimmed;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let (number, after) = rest.split_at(digits);
        let after = after.trim_start();
        let unit_len = after.len() - after.trim_start_matches(|c: char| c.is_alphabetic()).len();
        let (unit, after) = after.split_at(unit_len);
        let number: u64 = number
            .parse()
            .map_err(|_| "the number is too large".to_string())?;
        let part = match unit {
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "" if after.starts_with('.') => {
                return Err("use whole numbers, as in \"1500ms\"".into());
            }
            "" => return Err("a unit is missing (ms, s, m or h)".into()),
            other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
        };
        total = part
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| "it is too large".to_string())?;
        rest = after.trim_start();
    }
    Ok(total)
}

/// Parses a byte size: `"1048576"`, `"512KiB"`, `"4MiB"`, `"1GiB"`, or decimal `"4MB"`.
///
/// Both binary (KiB = 1024) and decimal (KB = 1000) units are accepted with their standard
/// meaning; a bare `K`/`M`/`G` is refused because readers disagree on which one it is.
pub(crate) fn size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("it is empty".into());
    }
    if trimmed.starts_with('-') {
        return Err("sizes cannot be negative".into());
    }
    let digits = trimmed.len()
        - trimmed
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .len();
    if digits == 0 {
        return Err("expected a number first".into());
    }
    let (number, unit) = trimmed.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| "the number is too large".to_string())?;
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ if unit.starts_with('.') => return Err("use whole numbers, as in \"1536KiB\"".into()),
        _ => {
            return Err(format!(
                "unknown unit {:?} (use B, KiB, MiB, GiB, or KB, MB, GB)",
                unit.trim_start()
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| "it is too large".to_string())
}

/// Validates a configured hostname and returns its normalized form (see
/// [`crate::name::normalize`]).
///
/// Accepted: DNS names whose labels are 1-63 letters, digits or hyphens, not starting or ending
/// with a hyphen, at most 253 characters; a leading `*.` wildcard label; or an IP literal (an
/// HTTP `Host` may be one), which is normalized to its canonical text.
pub(crate) fn hostname(text: &str) -> Result<String, String> {
    let name = crate::name::normalize(text).ok_or_else(|| "it is empty".to_string())?;
    if name.parse::<IpAddr>().is_ok() {
        return Ok(name);
    }
    if !name.is_ascii() {
        return Err("it is not ASCII; write internationalized names in their xn-- form".into());
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(format!(
            "it is {} characters long, more than {MAX_HOSTNAME_LEN}",
            name.len()
        ));
    }
    if name == "*" {
        return Err("a wildcard needs a parent name, as in \"*.example.com\"".into());
    }
    let body = name.strip_prefix("*.").unwrap_or(&name);
    if body.contains('*') {
        return Err("'*' is only allowed as the whole first label, as in \"*.example.com\"".into());
    }
    for label in body.split('.') {
        if label.is_empty() {
            return Err("it has an empty label".into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "label {label:?} is {} characters long, more than {MAX_LABEL_LEN}",
                label.len()
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "label {label:?} contains {bad:?}; only letters, digits and '-' are allowed"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(name)
}

/// Parses a backend address given as one string: an IP (the port then follows the listener's),
/// `"[IPv6]:port"`, `"IPv4:port"`, or a bracketed `"[IPv6]"` without a port.
///
/// Note that `"2001:db8::1:8443"` is itself a valid IPv6 address, which is why a port after an
/// IPv6 address needs the brackets.
pub(crate) fn backend_addr(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    let (ip, port) = if let Ok(addr) = text.parse::<SocketAddr>() {
        (addr.ip(), Some(addr.port()))
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        (ip, None)
    } else if let Some(ip) = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse::<IpAddr>().ok())
        .filter(IpAddr::is_ipv6)
    {
        (ip, None)
    } else {
        let hint = if text.chars().any(|c| c.is_ascii_alphabetic()) && !text.contains(':') {
            " (hostnames are not resolved; write the IP address)"
        } else {
            ""
        };
        return Err(format!(
            "expected an IP address, \"[IPv6]:port\" or \"IPv4:port\"{hint}"
        ));
    };
    // Connecting to :: or 0.0.0.0 reaches the proxy host itself on Linux, which is never what a
    // site means; a multicast address cannot accept a TCP connection.
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{ip} is not a unicast address"));
    }
    if port == Some(0) {
        return Err("port 0 cannot be connected to".into());
    }
    Ok((ip, port))
}

/// Parses one side of a per-protocol backend, where the port is required.
pub(crate) fn backend_socket(text: &str) -> Result<SocketAddr, String> {
    match backend_addr(text)? {
        (ip, Some(port)) => Ok(SocketAddr::new(ip, port)),
        (_, None) => Err(
            "a per-protocol backend needs a port, as in \"[2001:db8::1]:8443\" or \"192.0.2.1:8080\""
                .into(),
        ),
    }
}

/// Parses a listener address: `"0.0.0.0:443"` or `"[::]:443"`.
pub(crate) fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        if text.parse::<IpAddr>().is_ok() {
            "the port is missing, as in \"0.0.0.0:443\" or \"[::]:443\"".to_string()
        } else {
            "expected \"IPv4:port\" or \"[IPv6]:port\"".to_string()
        }
    })?;
    if addr.port() == 0 {
        return Err("port 0 would pick a random port".into());
    }
    Ok(addr)
}

/// Parses `forwarding`.
pub(crate) fn forwarding(text: &str) -> Option<Forwarding> {
    [
        Forwarding::Auto,
        Forwarding::Sockmap,
        Forwarding::Splice,
        Forwarding::Copy,
        Forwarding::Packet,
    ]
    .into_iter()
    .find(|f| f.as_str() == text)
}

/// Parses a listener's `protocol`.
pub(crate) fn protocol(text: &str) -> Option<Protocol> {
    [Protocol::Tls, Protocol::Http]
        .into_iter()
        .find(|p| p.as_str() == text)
}

/// Parses `proxy_protocol`.
pub(crate) fn proxy_version(text: &str) -> Option<Version> {
    match text {
        "none" => Some(Version::None),
        "v1" => Some(Version::V1),
        "v2" => Some(Version::V2),
        _ => None,
    }
}

/// Parses `forwarded_header`.
pub(crate) fn forwarded_header(text: &str) -> Option<ForwardedHeader> {
    [
        ForwardedHeader::None,
        ForwardedHeader::XForwardedFor,
        ForwardedHeader::Forwarded,
    ]
    .into_iter()
    .find(|h| h.as_str() == text)
}

/// Parses the `[xdp]` `mode`.
pub(crate) fn xdp_mode(text: &str) -> Option<XdpMode> {
    [XdpMode::Auto, XdpMode::Native, XdpMode::Generic]
        .into_iter()
        .find(|m| m.as_str() == text)
}

/// Checks a network interface name the way the kernel does (`dev_valid_name`): 1 to 15 bytes,
/// not `.` or `..`, and no '/', ':' or whitespace. A NUL is refused too, since the name is
/// handed to the kernel as a C string.
pub(crate) fn interface_name(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("it is empty".into());
    }
    if text.len() > MAX_INTERFACE_NAME_LEN {
        return Err(format!(
            "it is {} bytes long, more than {MAX_INTERFACE_NAME_LEN}",
            text.len()
        ));
    }
    if text == "." || text == ".." {
        return Err("\".\" and \"..\" are not interface names".into());
    }
    if let Some(bad) = text.chars().find(|c| c.is_whitespace() || *c == '\0') {
        return Err(format!("it contains {bad:?}"));
    }
    if text.contains('/') {
        return Err("it contains '/'".into());
    }
    if text.contains(':') {
        return Err(
            "it contains ':'; an alias like \"eth0:1\" is an address label, not an interface"
                .into(),
        );
    }
    Ok(())
}

/// Parses `"192.0.2.0/24"`, `"2001:db8::/32"`, or a bare address, which stands for a single
/// host (/32 or /128). Bits after the prefix are not checked here: see [`network`].
pub(crate) fn cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| {
        "expected an IPv4 or IPv6 address, optionally followed by /prefix, as in \
         \"192.0.2.0/24\" or \"2001:db8::/32\""
            .to_string()
    })?;
    let (family, max) = match addr {
        IpAddr::V4(_) => ("IPv4", 32),
        IpAddr::V6(_) => ("IPv6", 128),
    };
    let Some(prefix_text) = prefix_text else {
        return Ok((addr, max));
    };
    if prefix_text.is_empty() || !prefix_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the prefix length {prefix_text:?} is not a number"));
    }
    let prefix = prefix_text
        .parse::<u8>()
        .ok()
        .filter(|&p| p <= max)
        .ok_or_else(|| {
            format!("the prefix length {prefix_text} is more than {max}, the length of an {family} address")
        })?;
    Ok((addr, prefix))
}

/// `addr` with every bit after the first `prefix` cleared.
pub(crate) fn network(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// Formats a duration the way the configuration writes it, for the summary.
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Formats a size with the largest binary unit that divides it, for the summary.
pub(crate) fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration(" 10 s "), Ok(Duration::from_secs(10)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(duration("0s"), Ok(Duration::ZERO));
        for (bad, reason) in [
            ("", "empty"),
            ("  ", "empty"),
            ("5x", "unknown unit \"x\""),
            ("5", "unit is missing"),
            ("-5s", "negative"),
            ("1.5s", "whole numbers"),
            ("s", "expected a number"),
            ("5s5", "unit is missing"),
            ("99999999999999999999s", "too large"),
            ("9999999999999999999h", "too large"),
        ] {
            let err = duration(bad).expect_err(bad);
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size("1048576"), Ok(1 << 20));
        assert_eq!(size("4MiB"), Ok(4 << 20));
        assert_eq!(size("512KiB"), Ok(512 << 10));
        assert_eq!(size("512 kib"), Ok(512 << 10));
        assert_eq!(size("1GiB"), Ok(1 << 30));
        assert_eq!(size("4MB"), Ok(4_000_000));
        assert_eq!(size("10B"), Ok(10));
        for (bad, reason) in [
            ("", "empty"),
            ("-1", "negative"),
            ("4M", "unknown unit \"M\""),
            ("4XB", "unknown unit"),
            ("MiB", "number first"),
            ("1.5MiB", "whole numbers"),
            ("99999999999GiB", "too large"),
        ] {
            let err = size(bad).expect_err(bad);
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn hostnames() {
        assert_eq!(hostname("Site1.Example.").as_deref(), Ok("site1.example"));
        assert_eq!(hostname("*.Example.com").as_deref(), Ok("*.example.com"));
        assert_eq!(
            hostname("xn--bcher-kva.example").as_deref(),
            Ok("xn--bcher-kva.example")
        );
        assert_eq!(hostname("192.0.2.1").as_deref(), Ok("192.0.2.1"));
        assert_eq!(hostname("[2001:DB8:0::1]").as_deref(), Ok("2001:db8::1"));
        let long_label = "a".repeat(64);
        let long_name = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(long_name.len(), 253);
        assert!(hostname(&long_name).is_ok());
        for (bad, reason) in [
            ("", "empty"),
            (".", "empty"),
            ("a..example", "empty label"),
            (".example", "empty label"),
            ("*", "needs a parent name"),
            ("*.", "needs a parent name"),
            ("a.*.example", "'*' is only allowed"),
            ("*a.example", "'*' is only allowed"),
            ("**.example", "'*' is only allowed"),
            ("*.*.example", "'*' is only allowed"),
            ("a_b.example", "contains '_'"),
            ("a b.example", "contains ' '"),
            ("-a.example", "starts or ends with '-'"),
            ("a-.example", "starts or ends with '-'"),
            ("bücher.example", "xn--"),
            (&format!("{long_label}.example"), "more than 63"),
            (&format!("{long_name}x"), "more than 253"),
        ] {
            let err = hostname(bad).expect_err(bad);
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn backends() {
        let v6: IpAddr = "2001:db8::1".parse().expect("literal");
        let v4: IpAddr = "192.0.2.1".parse().expect("literal");
        assert_eq!(backend_addr("2001:db8::1"), Ok((v6, None)));
        assert_eq!(backend_addr("[2001:db8::1]"), Ok((v6, None)));
        assert_eq!(backend_addr("[2001:db8::1]:8443"), Ok((v6, Some(8443))));
        assert_eq!(backend_addr("192.0.2.1"), Ok((v4, None)));
        assert_eq!(backend_addr("192.0.2.1:80"), Ok((v4, Some(80))));
        for (bad, reason) in [
            ("", "expected an IP address"),
            ("backend.example", "hostnames are not resolved"),
            ("[192.0.2.1]", "expected an IP address"),
            ("2001:db8::1]:80", "expected an IP address"),
            ("::", "not a unicast address"),
            ("0.0.0.0:80", "not a unicast address"),
            ("ff02::1", "not a unicast address"),
            ("[2001:db8::1]:0", "port 0"),
            ("[2001:db8::1]:65536", "expected an IP address"),
        ] {
            let err = backend_addr(bad).expect_err(bad);
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
        assert!(backend_socket("2001:db8::1").is_err());
        assert_eq!(
            backend_socket("[2001:db8::1]:8080"),
            Ok(SocketAddr::new(v6, 8080))
        );
    }

    #[test]
    fn interface_names() {
        for good in ["eth0", "enp0s31f6", "a", "veth-abc.100", &"x".repeat(15)] {
            assert_eq!(interface_name(good), Ok(()), "{good:?}");
        }
        for (bad, reason) in [
            ("", "empty"),
            (&"x".repeat(16), "16 bytes long, more than 15"),
            (".", "not interface names"),
            ("..", "not interface names"),
            ("eth 0", "contains ' '"),
            ("eth0\t", "contains '\\t'"),
            ("eth\u{0}", "contains '\\0'"),
            ("a/b", "contains '/'"),
            ("eth0:1", "contains ':'"),
        ] {
            let err = interface_name(bad).expect_err(bad);
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn cidrs() {
        let v4: IpAddr = "192.0.2.0".parse().expect("literal");
        let v6: IpAddr = "2001:db8::".parse().expect("literal");
        assert_eq!(cidr("192.0.2.0/24"), Ok((v4, 24)));
        assert_eq!(cidr("192.0.2.0"), Ok((v4, 32)));
        assert_eq!(
            cidr("0.0.0.0/0"),
            Ok(("0.0.0.0".parse().expect("literal"), 0))
        );
        assert_eq!(cidr("2001:db8::/32"), Ok((v6, 32)));
        assert_eq!(cidr("2001:db8::"), Ok((v6, 128)));
        for (bad, reason) in [
            ("", "expected an IPv4 or IPv6 address"),
            ("192.0.2/24", "expected an IPv4 or IPv6 address"),
            ("host.example/24", "expected an IPv4 or IPv6 address"),
            ("[2001:db8::]/32", "expected an IPv4 or IPv6 address"),
            ("192.0.2.0/", "prefix length \"\" is not a number"),
            ("192.0.2.0/+24", "prefix length \"+24\" is not a number"),
            ("192.0.2.0/24/1", "prefix length \"24/1\" is not a number"),
            (
                "192.0.2.0/33",
                "33 is more than 32, the length of an IPv4 address",
            ),
            ("192.0.2.0/300", "300 is more than 32"),
            (
                "2001:db8::/129",
                "129 is more than 128, the length of an IPv6 address",
            ),
        ] {
            let err = cidr(bad).expect_err(bad);
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
        let addr = |t: &str| -> IpAddr { t.parse().expect("literal") };
        assert_eq!(network(addr("192.0.2.77"), 24), addr("192.0.2.0"));
        assert_eq!(network(addr("192.0.2.77"), 32), addr("192.0.2.77"));
        assert_eq!(network(addr("192.0.2.77"), 0), addr("0.0.0.0"));
        assert_eq!(network(addr("192.0.2.77"), 25), addr("192.0.2.0"));
        assert_eq!(network(addr("192.0.2.200"), 25), addr("192.0.2.128"));
        assert_eq!(
            network(addr("2001:db8:bad:1::1"), 48),
            addr("2001:db8:bad::")
        );
        assert_eq!(network(addr("2001:db8::1"), 128), addr("2001:db8::1"));
        assert_eq!(network(addr("2001:db8::1"), 0), addr("::"));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_size(4 << 20), "4MiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(0), "0B");
    }
}
