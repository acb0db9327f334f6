//! `GET /health`: no key; whether tollgate runs and whether Ollama answers.

use crate::app::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let reachable = state.upstream.is_reachable().await;
    Json(json!({
        "status": "ok",
        "ollama": { "url": state.upstream.base_url(), "reachable": reachable },
    }))
}
