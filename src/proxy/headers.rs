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

/// Headers that stay behind on the way to Ollama besides the hop-by-hop
/// ones and `x-api-key`: the key, the gateway's host and the page's origin, and the length,
/// which the client side of the proxy sets for what it sends.
const NOT_TO_UPSTREAM: &[HeaderName] = &[
    header::AUTHORIZATION,
    header::HOST,
    header::ORIGIN,
    header::CONTENT_LENGTH,
];

/// Whether a header describes one connection: the hop-by-hop ones,
/// `Keep-Alive` among them.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == "keep-alive"
}

/// Removes the headers named so by `unwanted`, in place (cheaper than
/// copying the rest into a new map). The names are looked at once each;
/// only those present are removed, each lookup of a name in the map
/// costing a hash.
fn remove_where(headers: &mut HeaderMap, unwanted: impl Fn(&HeaderName) -> bool) {
    let listed = named_by_connection(headers);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| unwanted(n) || listed.iter().any(|l| n.as_str().eq_ignore_ascii_case(l)))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// The headers that the `Connection` header names: they describe this
/// connection only (RFC 9110 §7.6.1), whatever their names.
fn named_by_connection(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect()
}

/// The client's headers as they may go to Ollama.
pub fn to_upstream(mut client: HeaderMap) -> HeaderMap {
    remove_where(&mut client, |name| {
        is_hop_by_hop(name) || NOT_TO_UPSTREAM.contains(name) || name == "x-api-key"
    });
    client
}

/// Ollama's response headers as they may go to the client. The body length
/// is left to the server, which knows what it sends.
pub fn to_client(mut upstream: HeaderMap) -> HeaderMap {
    remove_where(&mut upstream, |name| {
        is_hop_by_hop(name) || name == header::CONTENT_LENGTH
    });
    upstream
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
            ("connection", "keep-alive, X-Hop"),
            ("keep-alive", "timeout=5"),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
            // Named by `Connection`: hop-by-hop, whatever its name.
            ("x-hop", "secret"),
            ("x-api-key", "second"),
            ("content-length", "12"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        let out = to_upstream(h);
        // Removing entries may reorder differently named headers, whose
        // order carries no meaning (RFC 9110 §5.3).
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["content-type", "x-custom"]);
    }

    #[test]
    fn replies_keep_all_but_hop_by_hop_headers_and_length() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/x-ndjson"),
            ("date", "Sun, 22 Nov 2026 01:00:00 GMT"),
            ("content-length", "99"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-custom", "one"),
            ("x-custom", "two"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        let out = to_client(h);
        let mut pairs: Vec<(&str, &str)> = out
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        // Values of one name keep their order; names may be reordered.
        pairs.sort_by_key(|(name, _)| *name);
        assert_eq!(
            pairs,
            vec![
                ("content-type", "application/x-ndjson"),
                ("date", "Sun, 22 Nov 2026 01:00:00 GMT"),
                ("x-custom", "one"),
                ("x-custom", "two"),
            ]
        );
    }
}
