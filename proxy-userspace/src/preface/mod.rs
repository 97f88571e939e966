//! What the backend receives first: PROXY protocol v1/v2 headers.
