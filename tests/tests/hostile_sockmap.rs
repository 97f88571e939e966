//! The hostile tests that forward data (`hostile/body.rs`, see `hostile.rs`), with every site
//! that does not pick its own engine on `forwarding = "sockmap"`: the eBPF verdict program
//! moves the bytes, and clients that half-close before their socket could enter the map exercise
//! the fallback.
//!
//! Run as root (network namespaces, eBPF) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test hostile_sockmap`.

/// The engine the shared tests in `hostile/body.rs` ask for.
const ENGINE: &str = "sockmap";

#[path = "hostile/body.rs"]
mod body;
