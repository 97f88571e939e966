//! Reading the name a client asks for: TLS ClientHello (SNI) and HTTP request head (Host).
