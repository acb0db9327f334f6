//! `/generate` and `/chat`: the original recipe's endpoints.
//!
//! They take what Ollama's `/api/generate` and `/api/chat` take, with the
//! recipe's conveniences: `POST /generate?prompt=...` with no body works,
//! `model` defaults to `DEFAULT_MODEL`, and the reply is one JSON object
//! unless the body says `"stream": true`. Every other field is kept.

use super::catalog::classify;
use super::forward::{enter, forward, read_body, Proxied};
use super::inspect::{is_blank, parse_object};
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::limits::Entered;
use crate::telemetry::RequestLog;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::Arc;

#[derive(Deserialize)]
struct GenerateQuery {
    prompt: Option<String>,
    model: Option<String>,
}

pub async fn generate(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    log: Option<Extension<Arc<RequestLog>>>,
    body: Body,
) -> Result<Response, ApiError> {
    let query = Query::<GenerateQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let entered = enter(&state, &caller)?;
    let mut map = read_object(&state, body).await?;
    if let Some(prompt) = &query.prompt {
        map.entry("prompt")
            .or_insert_with(|| Value::String(prompt.clone()));
    }
    if let Some(model) = &query.model {
        map.entry("model")
            .or_insert_with(|| Value::String(model.clone()));
    }
    let log = log.map(|Extension(log)| log);
    relay_simple(
        &state,
        &caller,
        ("/generate", "/api/generate"),
        (entered, map),
        headers,
        log,
    )
    .await
}

pub async fn chat(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    log: Option<Extension<Arc<RequestLog>>>,
    body: Body,
) -> Result<Response, ApiError> {
    let entered = enter(&state, &caller)?;
    let map = read_object(&state, body).await?;
    let log = log.map(|Extension(log)| log);
    relay_simple(
        &state,
        &caller,
        ("/chat", "/api/chat"),
        (entered, map),
        headers,
        log,
    )
    .await
}

/// The body as a JSON object; an empty body is an empty object.
async fn read_object(state: &AppState, body: Body) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(state, body).await?;
    if is_blank(&bytes) {
        return Ok(Map::new());
    }
    parse_object(&bytes)
}

async fn relay_simple(
    state: &AppState,
    caller: &Caller,
    (path, upstream_path): (&str, &str),
    (entered, mut map): (Entered, Map<String, Value>),
    mut headers: HeaderMap,
    log: Option<Arc<RequestLog>>,
) -> Result<Response, ApiError> {
    map.entry("model")
        .or_insert_with(|| Value::String(state.config.default_model.clone()));
    map.entry("stream").or_insert(Value::Bool(false));
    let body = serde_json::to_vec(&map).map_err(|e| ApiError::Internal(e.to_string()))?;
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let request = Proxied {
        method: Method::POST,
        path_and_query: upstream_path.to_string(),
        path: path.to_string(),
        headers,
        log,
    };
    let endpoint = classify(&Method::POST, upstream_path);
    Box::pin(forward(
        state,
        caller,
        endpoint,
        request,
        entered,
        body.into(),
    ))
    .await
}
