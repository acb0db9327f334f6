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
    let read = *method == Method::GET || *method == Method::HEAD;
    // Ollama serves generations with POST only; another method gets its
    // 404/405, which costs nothing and needs no credits to be told.
    let generates = *method == Method::POST;
    match path {
        "/api/generate" | "/api/chat" if generates => endpoint(Access::Metered, true),
        "/api/embed"
        | "/api/embeddings"
        | "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/embeddings"
            if generates =>
        {
            endpoint(Access::Metered, false)
        }
        "/api/generate"
        | "/api/chat"
        | "/api/embed"
        | "/api/embeddings"
        | "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/embeddings" => endpoint(Access::Free, false),
        "/api/show" | "/api/version" | "/api/ps" => endpoint(Access::Free, false),
        "/api/tags" | "/v1/models" if read => Endpoint {
            lists_models: true,
            ..endpoint(Access::Free, false)
        },
        p if read && p.starts_with("/v1/models/") && !p["/v1/models/".len()..].is_empty() => {
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
    fn generation_paths_are_metered_for_post_only() {
        for path in ["/api/chat", "/api/embed", "/v1/completions"] {
            assert_eq!(classify(&Method::POST, path).access, Access::Metered);
            for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
                assert_eq!(
                    classify(&method, path).access,
                    Access::Free,
                    "{method} {path}"
                );
            }
        }
    }
}
