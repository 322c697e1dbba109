//! Backend addresses: where a variant's requests go and which HTTP version they speak.
//! Every layer names backends, so the type lives at the bottom.

use http::uri::{Authority, Scheme};

/// Where to send requests: scheme + authority, and which HTTP version to speak.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    pub protocol: Protocol,
}

/// `http://` speaks HTTP/1.1 with keep-alive; `h2c://` speaks HTTP/2 with prior
/// knowledge; `https://` speaks TLS, with HTTP/2 or HTTP/1.1 chosen by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    H2c,
    Tls,
}
