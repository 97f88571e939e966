//! spliced: an edge reverse proxy that routes TLS on SNI and HTTP on `Host` from IPv4 clients to
//! IPv6 backends, optionally announces the client with a PROXY protocol header, and moves the
//! payload with the cheapest engine available (kernel sockmap splicing, `splice(2)`, or copy).
//!
//! Modules follow a connection's path: [`config`] and [`route`] decide where it goes, [`hello`]
//! reads the name, [`preface`] builds what the backend sees first, then forwarding and closing.
#![warn(missing_docs)]

pub mod access;
pub mod config;
pub mod conn;
pub mod ebpf;
pub mod forward;
pub mod hello;
pub mod kernel_btf;
pub mod listen;
pub mod metrics;
pub mod preface;
pub mod route;
pub mod server;
