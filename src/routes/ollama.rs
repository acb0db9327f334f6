//! Ollama's own surfaces, passed through: the native `/api/*`, the
//! OpenAI-compatible `/v1/*`, and the `/` probe.

use super::catalog::{classify, Access};
use super::forward::{check_path, enter, forward, forward_streamed, read_body, Proxied};
use crate::app::AppState;
use crate::auth::Caller;
use crate::credits::Settlement;
use crate::error::ApiError;
use crate::proxy::{self, headers, Outbound, RelayOptions};
use crate::telemetry::RequestLog;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::Extension;
use std::sync::Arc;

/// Any `/api/*` or `/v1/*` request.
pub async fn passthrough(
    State(state): State<AppState>,
    caller: Caller,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    log: Option<Extension<Arc<RequestLog>>>,
    body: Body,
) -> Result<Response, ApiError> {
    // The only client-chosen path: before the body is read.
    check_path(uri.path())?;
    let path = uri.path().to_string();
    let request = Proxied {
        method: method.clone(),
        path_and_query: uri
            .path_and_query()
            .map_or_else(|| path.clone(), |pq| pq.as_str().to_string()),
        path,
        headers,
        log: log.map(|Extension(log)| log),
    };
    let endpoint = classify(&method, &request.path);
    if endpoint.access == Access::Admin {
        if !caller.is_admin() {
            // Before any limit: an ordinary key can never use the path.
            return Err(ApiError::Forbidden(format!(
                "{} needs the admin key",
                request.path
            )));
        }
        // Model management and blob uploads: streamed through, any size.
        return Box::pin(forward_streamed(&state, &caller, request, body)).await;
    }
    let entered = enter(&state, &caller)?;
    let body = read_body(&state, body).await?;
    Box::pin(forward(&state, &caller, endpoint, request, entered, body)).await
}

/// `GET /` and `HEAD /`: Ollama's "Ollama is running", no key needed (tools
/// probe it).
pub async fn root(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let out = Outbound {
        method,
        path_and_query: "/".into(),
        headers: headers::to_upstream(headers),
        body: Body::empty(),
    };
    let options = RelayOptions::plain(state.stop_streams.clone());
    proxy::relay(&state.upstream, out, Settlement::detached(), options).await
}
