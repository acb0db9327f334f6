//! What each proxied path is: who may call it and whether it costs credits
//! (SPEC §4, §5).

use crate::policy::Dialect;
use axum::http::Method;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Any valid key; charged per request (and per token if priced).
    Metered,
    /// Any valid key; costs nothing.
    Free,
    /// The admin key only (model management, and any path tollgate does
    /// not know: Ollama grows new endpoints, and they are denied by default).
    Admin,
}

/// A proxied endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub access: Access,
    pub dialect: Dialect,
    /// The model list in the reply must be filtered for limited keys.
    pub lists_models: bool,
    /// Streams unless the body says `"stream": false` (Ollama's default);
    /// OpenAI endpoints stream only with `"stream": true`.
    pub streams_by_default: bool,
}

/// Classifies `/api/*` and `/v1/*` paths.
pub fn classify(method: &Method, path: &str) -> Endpoint {
    let dialect = if path.starts_with("/v1/") {
        Dialect::OpenAi
    } else {
        Dialect::Native
    };
    let endpoint = |access, streams_by_default| Endpoint {
        access,
        dialect,
        lists_models: false,
        streams_by_default,
    };
    // Each endpoint with the methods Ollama serves it with: another method
    // would get Ollama's 404/405, or, should Ollama one day serve it, an
    // answer nobody has decided an ordinary key may have. Denied by
    // default, as unknown paths are.
    let get = *method == Method::GET;
    let read = get || *method == Method::HEAD;
    let post = *method == Method::POST;
    match path {
        "/api/generate" | "/api/chat" if post => endpoint(Access::Metered, true),
        "/api/embed"
        | "/api/embeddings"
        | "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/embeddings"
            if post =>
        {
            endpoint(Access::Metered, false)
        }
        "/api/show" if post => endpoint(Access::Free, false),
        "/api/version" if read => endpoint(Access::Free, false),
        // The running models: a list of models, filtered as the others.
        "/api/ps" if get => Endpoint {
            lists_models: true,
            ..endpoint(Access::Free, false)
        },
        "/api/tags" if read => Endpoint {
            lists_models: true,
            ..endpoint(Access::Free, false)
        },
        "/v1/models" if get => Endpoint {
            lists_models: true,
            ..endpoint(Access::Free, false)
        },
        p if get && p.starts_with("/v1/models/") && !p["/v1/models/".len()..].is_empty() => {
            endpoint(Access::Free, false)
        }
        _ => endpoint(Access::Admin, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_management_paths_are_admin_only() {
        for path in [
            "/api/pull",
            "/api/delete",
            "/api/blobs/sha256:abc",
            "/api/something-new",
            "/v1/responses",
        ] {
            assert_eq!(
                classify(&Method::POST, path).access,
                Access::Admin,
                "{path}"
            );
        }
        assert_eq!(classify(&Method::POST, "/api/tags").access, Access::Admin);
        assert_eq!(classify(&Method::GET, "/api/tags").access, Access::Free);
        assert_eq!(
            classify(&Method::GET, "/v1/models/mistral").access,
            Access::Free
        );
        assert_eq!(
            classify(&Method::POST, "/v1/chat/completions").access,
            Access::Metered
        );
        assert_eq!(
            classify(&Method::POST, "/v1/chat/completions").dialect,
            Dialect::OpenAi
        );
    }

    #[test]
    fn other_methods_than_ollamas_are_admin_only() {
        for (path, served) in [
            ("/api/chat", &[Method::POST][..]),
            ("/api/embed", &[Method::POST]),
            ("/v1/completions", &[Method::POST]),
            ("/api/show", &[Method::POST]),
            ("/api/version", &[Method::GET, Method::HEAD]),
            ("/api/ps", &[Method::GET]),
            ("/api/tags", &[Method::GET, Method::HEAD]),
            ("/v1/models", &[Method::GET]),
            ("/v1/models/mistral", &[Method::GET]),
        ] {
            for method in [
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::OPTIONS,
            ] {
                let access = classify(&method, path).access;
                if served.contains(&method) {
                    assert_ne!(access, Access::Admin, "{method} {path}");
                } else {
                    assert_eq!(access, Access::Admin, "{method} {path}");
                }
            }
        }
    }
}
