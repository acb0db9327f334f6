//! The HTTP surface: which path goes to which handler. Handlers stay thin:
//! extract, call, map errors.

pub mod account;
pub mod catalog;
pub mod forward;
pub mod health;
pub mod inspect;
pub mod ollama;
pub mod simple;

use crate::app::AppState;
use crate::error;
use axum::routing::{any, get, post};
use axum::{middleware, Router};

pub fn router(state: AppState) -> Router {
    let metrics = if state.config.metrics_require_admin {
        get(health::metrics_for_admin)
    } else {
        get(health::metrics)
    };
    let openai = Router::new()
        .route("/v1/{*rest}", any(ollama::passthrough))
        .layer(middleware::from_fn(error::openai_shape));
    Router::new()
        .route("/", get(ollama::root).head(ollama::root))
        .route("/generate", post(simple::generate))
        .route("/chat", post(simple::chat))
        .route("/api/{*rest}", any(ollama::passthrough))
        .route("/me", get(account::me))
        .route("/usage", get(account::usage))
        .route("/health", get(health::health))
        .route("/metrics", metrics)
        .merge(crate::admin::router())
        .merge(openai)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}
