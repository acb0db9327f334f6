//! SPEC §4a: per-key request policy.

use crate::support::fake_ollama::Behavior;
use crate::support::{spawn, Fetch, TestApp, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

async fn limited_key(app: &TestApp, models: Value) -> String {
    let created: Value = app
        .admin(Method::POST, "/admin/keys")
        .json(&json!({"name": "limited", "credits": 10, "models": models}))
        .fetch_json()
        .await;
    created["key"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_key_limited_to_some_models_gets_403_for_others_everywhere() {
    let app = TestApp::new().await;
    let key = limited_key(&app, json!(["mistral"])).await;
    for (path, body) in [
        ("/generate", json!({"model": "llama3.2", "prompt": "hi"})),
        ("/chat", json!({"model": "llama3.2", "messages": []})),
        (
            "/api/generate",
            json!({"model": "llama3.2", "prompt": "hi"}),
        ),
        (
            "/api/chat",
            json!({"model": "llama3.2:latest", "messages": []}),
        ),
        (
            "/api/embed",
            json!({"model": "nomic-embed-text", "input": "x"}),
        ),
        (
            "/api/embeddings",
            json!({"model": "nomic-embed-text", "prompt": "x"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": []}),
        ),
        (
            "/v1/completions",
            json!({"model": "llama3.2", "prompt": "x"}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "nomic-embed-text", "input": "x"}),
        ),
    ] {
        let response = app
            .post(path)
            .header("x-api-key", &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{path}");
    }
    assert!(app.forwarded().is_empty());
    // mistral matches mistral:latest, and DEFAULT_MODEL gets no exception
    // beyond being in the list.
    let ok = app
        .post("/api/generate")
        .header("x-api-key", &key)
        .json(&json!({"model": "mistral:latest", "prompt": "hi", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let ok = app
        .post("/generate?prompt=hi")
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn the_model_lists_show_only_the_keys_models() {
    let app = TestApp::new().await;
    let key = limited_key(&app, json!(["mistral"])).await;
    let tags: Value = app
        .get("/api/tags")
        .header("x-api-key", &key)
        .fetch_json()
        .await;
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["mistral:latest"]);
    let models: Value = app
        .get("/v1/models")
        .header("x-api-key", &key)
        .fetch_json()
        .await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["mistral:latest"]);
    let other = app
        .get("/v1/models/llama3.2:latest")
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 403);
    // With no model at all, Ollama's `"data": null` reaches the key as is.
    app.fake.set(Behavior {
        models: Vec::new(),
        ..Behavior::default()
    });
    let none: Value = app
        .get("/v1/models")
        .header("x-api-key", &key)
        .fetch_json()
        .await;
    assert_eq!(none, json!({"object": "list", "data": null}));
    app.fake.set(Behavior::default());
    // The admin sees everything.
    let tags: Value = app
        .get("/api/tags")
        .header("x-api-key", ADMIN)
        .fetch_json()
        .await;
    assert_eq!(tags["models"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn keep_alive_from_an_ordinary_key_never_reaches_ollama() {
    let app = TestApp::new().await;
    let response = app
        .keyed("/api/generate")
        .json(&json!({"model": "mistral", "prompt": "", "keep_alive": 0, "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_ne!(body["done_reason"], "unload");
    let seen = app.forwarded().pop().unwrap().json();
    assert!(seen.get("keep_alive").is_none(), "{seen}");
    // The admin may unload.
    let unload: Value = app
        .admin(Method::POST, "/api/generate")
        .json(&json!({"model": "mistral", "prompt": "", "keep_alive": 0, "stream": false}))
        .fetch_json()
        .await;
    assert_eq!(unload["done_reason"], "unload");
}

#[tokio::test]
async fn token_and_context_caps_are_applied() {
    let app = spawn()
        .var("MAX_TOKENS_PER_REQUEST", "64")
        .var("MAX_NUM_CTX", "2048")
        .start()
        .await;
    for body in [
        json!({"model": "mistral", "prompt": "hi", "stream": false}),
        json!({"model": "mistral", "prompt": "hi", "stream": false, "options": {"num_predict": -1, "num_ctx": 100000}}),
        json!({"model": "mistral", "prompt": "hi", "stream": false, "options": {"num_predict": 5000}}),
    ] {
        let response = app.keyed("/api/generate").json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let seen = app.forwarded().pop().unwrap().json();
        assert_eq!(seen["options"]["num_predict"], 64, "{body}");
        assert!(seen["options"]["num_ctx"].is_null() || seen["options"]["num_ctx"] == 2048);
    }
    let response = app
        .keyed("/v1/chat/completions")
        .json(&json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9999}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(app.forwarded().pop().unwrap().json()["max_tokens"], 64);
}
