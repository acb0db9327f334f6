//! The control server: lets the Python and JavaScript test scripts steer the
//! fake Ollama behind a test gateway. The protocol is described in
//! `tests/it/clients.rs`.

use crate::support::fake_ollama::Behavior;
use crate::support::TestApp;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// A running control server; stops when dropped.
pub struct ControlServer {
    pub url: String,
    task: JoinHandle<()>,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn serve(app: Arc<TestApp>) -> ControlServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the control server");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = Router::new()
        .route("/behavior", post(behavior))
        .route("/step", post(step))
        .route("/reset", post(reset))
        .route("/requests", get(requests))
        .with_state(app);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    ControlServer { url, task }
}

/// `POST /behavior`: the fields of [`Behavior`] the scripts may set; any
/// other field is refused, so that a typo fails loudly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BehaviorPatch {
    chunks: Option<usize>,
    prompt_eval_count: Option<u64>,
    lockstep: Option<bool>,
    die_after: Option<usize>,
    stream_error_after: Option<usize>,
    fail: Option<Fail>,
    models: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fail {
    status: u16,
    message: String,
}

/// The JSON body, `None` when empty, or the reason it is refused.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<Option<T>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn refuse(reason: &str) -> Response {
    (StatusCode::BAD_REQUEST, format!("control: {reason}\n")).into_response()
}

async fn behavior(State(app): State<Arc<TestApp>>, body: Bytes) -> Response {
    let patch = match parse::<BehaviorPatch>(&body) {
        Ok(patch) => patch,
        Err(reason) => return refuse(&reason),
    };
    let mut b = Behavior::default();
    if let Some(p) = patch {
        b.chunks = p.chunks.unwrap_or(b.chunks);
        b.prompt_eval_count = p.prompt_eval_count.unwrap_or(b.prompt_eval_count);
        b.lockstep = p.lockstep.unwrap_or(b.lockstep);
        b.die_after = p.die_after.or(b.die_after);
        b.stream_error_after = p.stream_error_after.or(b.stream_error_after);
        b.fail = p.fail.map(|f| (f.status, f.message)).or(b.fail);
        b.models = p.models.unwrap_or(b.models);
    }
    if let Some((status, _)) = &b.fail {
        if StatusCode::from_u16(*status).is_err() {
            return refuse("fail.status is not an HTTP status");
        }
    }
    app.fake.set(b);
    Json(json!({"ok": true})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    n: Option<usize>,
}

async fn step(State(app): State<Arc<TestApp>>, body: Bytes) -> Response {
    match parse::<Step>(&body) {
        Ok(step) => {
            app.fake.step_many(step.and_then(|s| s.n).unwrap_or(1));
            Json(json!({"ok": true})).into_response()
        }
        Err(reason) => refuse(&reason),
    }
}

async fn reset(State(app): State<Arc<TestApp>>) -> Json<Value> {
    app.fake.set(Behavior::default());
    Json(json!({"ok": true}))
}

async fn requests(State(app): State<Arc<TestApp>>) -> Json<Value> {
    let seen = app
        .fake
        .requests()
        .into_iter()
        .map(|r| {
            let body = serde_json::from_slice::<Value>(&r.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()));
            let mut headers = Map::new();
            for (name, value) in &r.headers {
                headers
                    .entry(name.clone())
                    .or_insert(Value::String(value.clone()));
            }
            json!({"method": r.method, "path": r.path, "headers": headers, "body": body})
        })
        .collect();
    Json(Value::Array(seen))
}
