//! Host names as the router and the configuration compare them.
//!
//! Its own module because both [`crate::config`] (validating configured hostnames) and
//! [`crate::route`] (looking up requested names) need the same rule, and neither should import
//! the other for it.

use std::borrow::Cow;
use std::net::Ipv6Addr;

/// Normalizes a name for comparison: ASCII lowercase, one trailing dot removed; `None` if
/// nothing is left. An IPv6 literal, bracketed or not, becomes its canonical text, so
/// `[2001:DB8:0::1]` and `2001:db8::1` are the same name.
///
/// This does not check that the name is a valid hostname: a name nobody configured simply
/// matches nothing.
pub(crate) fn normalize(name: &str) -> Option<String> {
    normalize_cow(name).map(Cow::into_owned)
}

/// [`normalize`] without allocating for the common, already-normal name.
pub(crate) fn normalize_cow(name: &str) -> Option<Cow<'_, str>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    if name.contains(':') {
        let bare = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        if let Ok(ip) = bare.parse::<Ipv6Addr>() {
            return Some(Cow::Owned(ip.to_string()));
        }
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(name.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_rules() {
        assert_eq!(normalize("Example.COM.").as_deref(), Some("example.com"));
        assert_eq!(normalize("example.com").as_deref(), Some("example.com"));
        assert_eq!(normalize(""), None);
        assert_eq!(normalize("."), None);
        assert_eq!(normalize("[2001:DB8::1]").as_deref(), Some("2001:db8::1"));
        assert_eq!(
            normalize("2001:0db8:0:0::1").as_deref(),
            Some("2001:db8::1")
        );
        assert!(matches!(normalize_cow("a.example"), Some(Cow::Borrowed(_))));
    }
}
