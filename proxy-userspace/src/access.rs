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
    pub fn line(&self) -> String {
        let mut s = String::with_capacity(256);
        let mut field = |key: &str, value: &dyn std::fmt::Display| {
            let v = value.to_string();
            if v.is_empty() || v.contains([' ', '"', '=']) {
                let _ = write!(s, "{key}={v:?} ");
            } else {
                let _ = write!(s, "{key}={v} ");
            }
        };
        let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        field("client", &dash(self.client.map(|a| a.to_string())));
        field("listener", &dash(self.listener.map(|a| a.to_string())));
        field("name", &dash(self.name.map(str::to_owned)));
        field("alpn", &dash(self.alpn.map(str::to_owned)));
        field("site", &dash(self.site.map(str::to_owned)));
        field("backend", &dash(self.backend.map(|a| a.to_string())));
        field("proxy", &self.proxy_protocol);
        field("engine", &dash(self.engine.map(str::to_owned)));
        field("up", &self.bytes_up);
        field("down", &self.bytes_down);
        field("ms", &self.duration.as_millis());
        field("outcome", &self.outcome);
        if let Some(detail) = self.detail {
            field("detail", &detail);
        }
        s.pop();
        s
    }
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
}
