//! SPEC §4a: per-key request policy.

use crate::support::fake_ollama::Behavior;
use crate::support::{spawn, Fetch, TestApp, ADMIN, KEY};
use reqwest::header::HeaderValue;
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
    // HEAD announces the length of the list this key gets, not the whole
    // list's.
    let got = app
        .get("/api/tags")
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let full = app
        .client
        .head(format!("{}/api/tags", app.fake.url()))
        .send()
        .await
        .unwrap();
    let head = app
        .head("/api/tags")
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers().get("content-length"),
        Some(&HeaderValue::from(got.len()))
    );
    assert_ne!(
        head.headers().get("content-length"),
        full.headers().get("content-length")
    );
    assert!(head.bytes().await.unwrap().is_empty());
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

/// `/api/ps`, the models Ollama has loaded, is a list of models too: a
/// limited key sees its own there, not which other models others use.
#[tokio::test]
async fn the_running_models_show_only_the_keys_models() {
    let app = TestApp::new().await;
    let key = limited_key(&app, json!(["mistral"])).await;
    for model in ["mistral", "llama3.2"] {
        let response = app
            .post("/api/generate")
            .header("x-api-key", ADMIN)
            .json(&json!({"model": model, "prompt": "hi", "stream": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{model}");
    }
    let names = |ps: Value| -> Vec<String> {
        ps["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    };
    let limited: Value = app
        .get("/api/ps")
        .header("x-api-key", &key)
        .fetch_json()
        .await;
    assert_eq!(names(limited.clone()), vec!["mistral:latest"]);
    // The rest of each entry as Ollama wrote it.
    assert!(limited["models"][0]["size_vram"].is_u64(), "{limited}");
    assert!(limited["models"][0]["expires_at"].is_string(), "{limited}");
    let everyone: Value = app
        .get("/api/ps")
        .header("x-api-key", KEY)
        .fetch_json()
        .await;
    assert_eq!(
        names(everyone),
        vec!["mistral:latest", "llama3.2:latest"],
        "an unlimited key sees every loaded model"
    );
}

#[tokio::test]
async fn keep_alive_from_an_ordinary_key_never_reaches_ollama() {
    let app = TestApp::new().await;
    // With something to generate, keep_alive is removed.
    let response = app
        .keyed("/api/generate")
        .json(&json!({"model": "mistral", "prompt": "hi", "keep_alive": 0, "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.forwarded().pop().unwrap().json();
    assert!(seen.get("keep_alive").is_none(), "{seen}");
    let forwarded = app.forwarded().len();
    // Without, the request only manages the model (an empty prompt with
    // keep_alive 0 unloads it; removing keep_alive would load it
    // instead): refused, for generate and chat, with any keep_alive.
    for (path, body) in [
        (
            "/api/generate",
            json!({"model": "mistral", "prompt": "", "keep_alive": 0}),
        ),
        (
            "/api/generate",
            json!({"model": "mistral", "keep_alive": "1h"}),
        ),
        (
            "/api/chat",
            json!({"model": "mistral", "messages": [], "keep_alive": 0}),
        ),
        ("/chat", json!({"messages": [], "keep_alive": -1})),
    ] {
        let response = app.keyed(path).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 403, "{path} {body}");
    }
    assert_eq!(app.forwarded().len(), forwarded);
    // The admin may unload.
    let unload: Value = app
        .admin(Method::POST, "/api/generate")
        .json(&json!({"model": "mistral", "prompt": "", "keep_alive": 0, "stream": false}))
        .fetch_json()
        .await;
    assert_eq!(unload["done_reason"], "unload");
}

/// An empty prompt without keep_alive loads the model: nothing is
/// generated, nothing is charged (the ledger still records it).
#[tokio::test]
async fn loading_a_model_is_not_charged() {
    let app = TestApp::new().await;
    for (path, body) in [
        (
            "/api/generate",
            json!({"model": "mistral", "prompt": "", "stream": false}),
        ),
        ("/api/chat", json!({"model": "mistral", "messages": []})),
    ] {
        let reply: Value = app.keyed(path).json(&body).fetch_json().await;
        assert_eq!(reply["done_reason"], "load", "{path}");
    }
    let rows = app.wait_ledger(KEY, 2).await;
    for row in rows {
        assert_eq!(row.record.credits, tollgate::credits::Credits::ZERO);
        assert_eq!(row.record.status, 200);
    }
}

/// The caps concern generations: `/api/show` (which reads `options` into
/// the Modelfile it shows) and the embedding endpoints get the body as
/// sent.
#[tokio::test]
async fn caps_leave_other_bodies_alone() {
    let app = spawn()
        .var("MAX_TOKENS_PER_REQUEST", "64")
        .var("MAX_NUM_CTX", "2048")
        .start()
        .await;
    for (path, body) in [
        ("/api/show", r#"{"model":"mistral"}"#),
        (
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":"hello"}"#,
        ),
        (
            "/api/embeddings",
            r#"{"model":"nomic-embed-text","prompt":"hello"}"#,
        ),
        (
            "/v1/embeddings",
            r#"{"model":"nomic-embed-text","input":"hello"}"#,
        ),
    ] {
        let response = app
            .keyed(path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            app.forwarded().pop().unwrap().body,
            body.as_bytes(),
            "{path}"
        );
    }
}

/// SPEC §4a: an embedding loads its model with the context it asks for,
/// so `MAX_NUM_CTX` caps it there too; the token cap, which means nothing
/// to an embedding, leaves its options alone.
#[tokio::test]
async fn the_context_cap_applies_to_native_embeddings() {
    let app = spawn()
        .var("MAX_TOKENS_PER_REQUEST", "64")
        .var("MAX_NUM_CTX", "2048")
        .start()
        .await;
    for (path, text) in [("/api/embed", "input"), ("/api/embeddings", "prompt")] {
        for num_ctx in [json!(131072), json!(1e6), json!(4096.5)] {
            let body = json!({
                "model": "nomic-embed-text",
                text: "hello",
                "options": {"num_ctx": num_ctx, "num_predict": 500},
            });
            let response = app.keyed(path).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path} {body}");
            let seen = app.forwarded().pop().unwrap().json();
            assert_eq!(seen["options"]["num_ctx"], 2048, "{path} {body}");
            assert_eq!(seen["options"]["num_predict"], 500, "{path} {body}");
            assert_eq!(seen[text], "hello", "{path} {body}");
        }
        // Within the cap: forwarded as sent.
        let body = r#"{"model":"nomic-embed-text","options":{"num_ctx":1024},"input":"x"}"#;
        let response = app.keyed(path).body(body).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(app.forwarded().pop().unwrap().body, body.as_bytes());
    }
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

/// Ollama's decoder (Go's `encoding/json`) matches field names without
/// regard to case, and the last match wins: every spelling of a field that
/// tollgate polices, but the exact one, is refused before Ollama sees it.
#[tokio::test]
async fn field_names_that_ollama_reads_as_policed_ones_are_refused() {
    let app = spawn().var("MAX_TOKENS_PER_REQUEST", "64").start().await;
    let key = limited_key(&app, json!(["mistral"])).await;
    for (path, body) in [
        (
            "/api/generate",
            r#"{"model":"mistral","MODEL":"llama3.2","prompt":"hi","stream":false}"#,
        ),
        ("/api/chat", r#"{"Model":"llama3.2","messages":[]}"#),
        (
            "/api/embed",
            r#"{"model":"mistral","mOdEl":"llama3.2","input":"x"}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"mistral","Model":"llama3.2","messages":[]}"#,
        ),
        ("/chat", r#"{"MODEL":"llama3.2","messages":[]}"#),
        (
            "/api/generate",
            r#"{"model":"mistral","prompt":"","KEEP_ALIVE":-1,"stream":false}"#,
        ),
        // The Kelvin sign folds to k, the long s to s.
        (
            "/api/generate",
            r#"{"model":"mistral","prompt":"","\u212Aeep_alive":0,"stream":false}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"mistral","prompt":"hi","\u017Ftream":true}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"mistral","prompt":"hi","options":{"num_predict":10},"Options":{"num_predict":100000}}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"mistral","messages":[],"max_tokens":10,"MAX_TOKENS":100000}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"mistral","messages":[],"stream":true,"stream_options":{"INCLUDE_USAGE":false}}"#,
        ),
        ("/api/show", r#"{"NAME":"llama3.2"}"#),
    ] {
        let response = app
            .post(path)
            .header("x-api-key", &key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path} {body}");
        let error = response.text().await.unwrap();
        assert!(error.contains("would be read by Ollama as"), "{error}");
    }
    assert!(app.forwarded().is_empty(), "{:?}", app.forwarded());
    // Admin keys too: tollgate would read another body than Ollama.
    let response = app
        .admin(Method::POST, "/api/generate")
        .header("content-type", "application/json")
        .body(r#"{"model":"mistral","MODEL":"llama3.2","prompt":"hi","stream":false}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

/// `/api/show` takes the model as `name` when `model` is empty or absent.
#[tokio::test]
async fn show_by_name_obeys_the_allow_list() {
    let app = TestApp::new().await;
    let key = limited_key(&app, json!(["mistral"])).await;
    for body in [
        json!({"name": "llama3.2"}),
        json!({"model": "", "name": "llama3.2"}),
    ] {
        let response = app
            .post("/api/show")
            .header("x-api-key", &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{body}");
    }
    assert!(app.forwarded().is_empty());
    let response = app
        .post("/api/show")
        .header("x-api-key", &key)
        .json(&json!({"name": "mistral"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// What Ollama reads as "no limit" (0, a negative value, `null` options)
/// and what it reads but tollgate did not (a float context size, only
/// `max_completion_tokens`) are capped too.
#[tokio::test]
async fn caps_hold_for_every_way_of_asking_for_no_limit() {
    let app = spawn()
        .var("MAX_TOKENS_PER_REQUEST", "64")
        .var("MAX_NUM_CTX", "2048")
        .start()
        .await;
    for body in [
        json!({"model": "mistral", "prompt": "hi", "stream": false, "options": {"num_predict": 0}}),
        json!({"model": "mistral", "prompt": "hi", "stream": false, "options": {"num_predict": 0.5}}),
        json!({"model": "mistral", "prompt": "hi", "stream": false, "options": {"num_predict": 1e6}}),
        json!({"model": "mistral", "prompt": "hi", "stream": false, "options": null}),
        json!({"model": "mistral", "prompt": "hi", "stream": false, "options": {"num_ctx": 1e6}}),
        json!({"model": "mistral", "prompt": "hi", "stream": false, "options": {"num_ctx": 131072.0}}),
    ] {
        let response = app.keyed("/api/generate").json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200, "{body}");
        let seen = app.forwarded().pop().unwrap().json();
        assert_eq!(seen["options"]["num_predict"], 64, "{body}");
        let ctx = &seen["options"]["num_ctx"];
        assert!(ctx.is_null() || *ctx == 2048, "{body}: {seen}");
    }
    // A float under the cap is Ollama's to cut (to 2 here): left alone.
    let reply: Value = app
        .keyed("/api/generate")
        .json(&json!({"model": "mistral", "prompt": "hi", "stream": false, "options": {"num_predict": 2.0}}))
        .fetch_json()
        .await;
    assert_eq!(reply["eval_count"], 2, "{reply}");
    assert_eq!(
        app.forwarded().pop().unwrap().json()["options"]["num_predict"],
        2.0
    );
    for (body, expected) in [
        (json!({"max_tokens": 0}), 64),
        (json!({"max_completion_tokens": 5000}), 64),
        (json!({"max_completion_tokens": 20}), 20),
    ] {
        let mut request =
            json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}]});
        request
            .as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let response = app
            .keyed("/v1/chat/completions")
            .json(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{body}");
        assert_eq!(
            app.forwarded().pop().unwrap().json()["max_tokens"],
            expected,
            "{body}"
        );
    }
}
