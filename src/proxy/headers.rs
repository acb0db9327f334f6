//! Which headers cross the gateway (SPEC §6).
//!
//! Towards Ollama: never the client's key (`x-api-key`, `Authorization`),
//! nor `Host` or `Origin` (Ollama answers 403 to foreign values), nor
//! hop-by-hop headers. Back to the client: everything but hop-by-hop headers.

use axum::http::{header, HeaderMap, HeaderName};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str() == "keep-alive"
}

/// The client's headers as they may go to Ollama.
pub fn to_upstream(client: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len());
    for (name, value) in client {
        let secret_or_origin = name == header::AUTHORIZATION
            || name.as_str() == "x-api-key"
            || name == header::HOST
            || name == header::ORIGIN
            || name == header::CONTENT_LENGTH;
        if !secret_or_origin && !is_hop_by_hop(name) {
            out.append(name, value.clone());
        }
    }
    out
}

/// Ollama's response headers as they may go to the client. The body length
/// is left to the server, which knows what it sends.
pub fn to_client(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if !is_hop_by_hop(name) && name != header::CONTENT_LENGTH {
            out.append(name, value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_host_origin_and_hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-api-key", "secret"),
            ("authorization", "Bearer secret"),
            ("host", "gateway.example"),
            ("origin", "https://app.example"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        let out = to_upstream(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["content-type", "x-custom"]);
    }
}
