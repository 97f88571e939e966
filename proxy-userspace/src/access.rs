//! The access log: one line per connection, `key=value` pairs, on standard output.
//!
//! The reason names are the same strings the error types return and the metrics use, so a line
//! can be matched to a counter.
use std::{fmt::Write as _, net::SocketAddr, time::Duration};

/// Everything known about a connection when it ends.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    /// The client's address as the proxy saw it.
    pub client: Option<SocketAddr>,
    /// The listener's local address.
    pub listener: Option<SocketAddr>,
    /// The requested name (SNI or Host), if any.
    pub name: Option<&'a str>,
    /// ALPN protocols the client offered, comma-separated.
    pub alpn: Option<&'a str>,
    /// The site that served it.
    pub site: Option<&'a str>,
    /// The backend address connected to.
    pub backend: Option<SocketAddr>,
    /// `none`, `v1` or `v2`.
    pub proxy_protocol: &'a str,
    /// Forwarding engine used.
    pub engine: Option<&'a str>,
    /// Bytes from the client to the backend (hello included, PROXY header excluded).
    pub bytes_up: u64,
    /// Bytes from the backend to the client.
    pub bytes_down: u64,
    /// Time from accept to close.
    pub duration: Duration,
    /// `ok`, or the reason it ended early.
    pub outcome: &'a str,
    /// Extra detail for failures (an OS error message).
    pub detail: Option<&'a str>,
}

impl Entry<'_> {
    /// Formats the line (without a newline). Values with spaces or quotes are quoted.
    ///
    /// Every value is written straight into the line (this runs once per connection, so no
    /// string per field); only a value that needs quoting is formatted a second time.
    pub fn line(&self) -> String {
        let mut s = String::with_capacity(256);
        field(&mut s, "client", Dash(self.client));
        field(&mut s, "listener", Dash(self.listener));
        field(&mut s, "name", Dash(self.name));
        field(&mut s, "alpn", Dash(self.alpn));
        field(&mut s, "site", Dash(self.site));
        field(&mut s, "backend", Dash(self.backend));
        field(&mut s, "proxy", self.proxy_protocol);
        field(&mut s, "engine", Dash(self.engine));
        field(&mut s, "up", self.bytes_up);
        field(&mut s, "down", self.bytes_down);
        field(&mut s, "ms", self.duration.as_millis());
        field(&mut s, "outcome", self.outcome);
        if let Some(detail) = self.detail {
            field(&mut s, "detail", detail);
        }
        s.pop();
        s
    }
}

/// An optional value, written as `-` when absent.
struct Dash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Dash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Appends `key=value ` to `line`, quoting the value when it is empty or holds a space, a quote
/// or an `=`.
fn field(line: &mut String, key: &str, value: impl std::fmt::Display) {
    line.push_str(key);
    line.push('=');
    let start = line.len();
    let _ = write!(line, "{value}");
    let written = &line[start..];
    if written.is_empty() || written.contains([' ', '"', '=']) {
        let quoted = format!("{written:?}");
        line.truncate(start);
        line.push_str(&quoted);
    }
    line.push(' ');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_every_field_and_quotes_spaces() {
        let e = Entry {
            client: Some("192.0.2.2:40000".parse().unwrap_or_else(|_| unreachable!())),
            name: Some("a.example"),
            outcome: "backend_unreachable",
            detail: Some("Connection refused (os error 111)"),
            proxy_protocol: "v2",
            ..Default::default()
        };
        assert_eq!(
            e.line(),
            "client=192.0.2.2:40000 listener=- name=a.example alpn=- site=- backend=- proxy=v2 \
             engine=- up=0 down=0 ms=0 outcome=backend_unreachable \
             detail=\"Connection refused (os error 111)\""
        );
    }

    /// Values a client controls (the requested name) cannot forge a field: an empty value,
    /// an `=` or a quote is quoted and escaped.
    #[test]
    fn client_controlled_values_are_quoted() {
        let e = Entry {
            name: Some("a=b \"c\""),
            alpn: Some(""),
            outcome: "ok",
            proxy_protocol: "none",
            ..Default::default()
        };
        let line = e.line();
        assert!(
            line.contains(r#"name="a=b \"c\"" alpn="" site=-"#),
            "{line}"
        );
    }
}
