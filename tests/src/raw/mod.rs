//! Raw protocol pieces for tests that talk to the proxy byte by byte, one module per concern:
//!
//! - [`hello`]: a TLS ClientHello builder and its records;
//! - [`stream`]: deterministic positional byte streams and a verifier for bulk transfers;
//! - [`proxy_header`]: recognising the PROXY headers a backend receives;
//! - [`backend`]: a scriptable test backend that records what it receives;
//! - [`net`]: client and listener sockets, reading to the end, resets.
//!
//! Nothing here depends on the proxy's own code: the hello is built from RFC 8446 and the PROXY
//! headers are recognised from HAProxy's specification, so the tests check the proxy against
//! the protocols rather than against itself. Everything is re-exported here, so `raw::connect`
//! and `raw::simple_hello` read the same wherever they come from.
pub mod backend;
pub mod hello;
pub mod net;
pub mod proxy_header;
pub mod stream;

pub use backend::*;
pub use hello::*;
pub use net::*;
pub use proxy_header::*;
pub use stream::*;
