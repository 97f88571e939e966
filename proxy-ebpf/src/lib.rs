//! Intentionally empty: see the `[lib]` comment in this crate's `Cargo.toml`.
#![no_std]
