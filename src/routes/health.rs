//! `GET /health`: no key; whether tollgate runs and whether Ollama answers.

use crate::app::AppState;
use crate::auth::AdminCaller;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let reachable = state.upstream.is_reachable().await;
    Json(json!({
        "status": "ok",
        "ollama": { "url": state.upstream.base_url(), "reachable": reachable },
    }))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics_handle().render(),
    )
}

/// `GET /metrics` when `METRICS_REQUIRE_ADMIN=true`.
pub async fn metrics_for_admin(_admin: AdminCaller) -> impl IntoResponse {
    metrics().await
}
