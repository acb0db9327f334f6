//! SPEC §7: every bad input gets its status and a JSON error; nothing is
//! forwarded or charged; the process keeps serving.

use crate::support::{blob_path, ollama_error, spawn, TestApp, KEY};
use tollgate::credits::Credits;

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400_and_never_forwarded() {
    let app = TestApp::new().await;
    for (path, body) in [
        ("/api/generate", "{not json"),
        ("/api/generate", "[1, 2]"),
        ("/api/generate", r#"{"model": 42, "prompt": "hi"}"#),
        ("/api/generate", r#"{"model": "mistral", "stream": "yes"}"#),
        (
            "/api/generate",
            r#"{"model": "mistral", "options": {"num_predict": "ten"}}"#,
        ),
        ("/api/chat", r#"{"model": "mistral", "messages": "hi"}"#),
        ("/api/generate", ""),
        ("/generate", "{\"prompt\": "),
        ("/generate", r#"{"prompt": 5}"#),
        ("/chat", r#"{"options": []}"#),
        (
            "/v1/chat/completions",
            r#"{"model": "mistral", "max_tokens": "many"}"#,
        ),
        // JSON that only a full parse refuses, in fields tollgate does not
        // read: a lone surrogate, a number beyond f64.
        (
            "/api/chat",
            r#"{"model": "mistral", "messages": [{"role": "user", "content": "\ud83d"}]}"#,
        ),
        (
            "/api/generate",
            r#"{"model": "mistral", "prompt": "hi", "options": {"temperature": 1e999}}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "mistral", "messages": [], "temperature": 1e400}"#,
        ),
        (
            "/api/generate",
            r#"{"model": "mistral", "format": {"\udc00": 1}}"#,
        ),
        // serde_json's raw-value name: its Value parse reads the string as
        // JSON, so what was checked would not be what is forwarded.
        (
            "/api/generate",
            r#"{"$serde_json::private::RawValue": "{\"model\": \"mistral\", \"prompt\": \"hi\"}"}"#,
        ),
        (
            "/api/chat",
            r#"{"model": "mistral", "messages": [{"$serde_json::private::RawValue": "not json"}]}"#,
        ),
        (
            "/api/generate",
            r#"{"model": "mistral", "prompt": "hi", "options": {"$serde_json::private::RawValue": "{\"num_predict\": 5}"}}"#,
        ),
        (
            "/generate",
            r#"{"$serde_json::private::RawValue": "{\"prompt\": \"hi\"}"}"#,
        ),
    ] {
        let response = app.keyed(path).body(body).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path} {body}");
        let json: serde_json::Value = response.json().await.unwrap();
        assert!(!json["error"].is_null(), "{path} {body}: {json}");
    }
    // Nested deeper than serde_json's limit of 128.
    let deep = format!(
        r#"{{"model": "mistral", "prompt": "hi", "x": {}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let response = app.keyed("/api/generate").body(deep).send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(app.forwarded().is_empty());
    assert_eq!(app.balance_of(KEY).await, Credits::whole(10));
    // Still serving.
    let ok = app.keyed("/generate?prompt=hi").send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_bad_query_string_is_400() {
    let app = TestApp::new().await;
    let response = app.keyed("/usage?limit=lots").send().await.unwrap();
    // POST on /usage is not allowed, said in JSON.
    ollama_error(response, 405).await;
    let response = app
        .get("/usage?limit=lots")
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    ollama_error(response, 400).await;
    let response = app
        .get("/usage?limit=0")
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    ollama_error(response, 400).await;
    let response = app
        .get("/usage?cursor=abc")
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    ollama_error(response, 400).await;
}

#[tokio::test]
async fn unknown_paths_are_404_json() {
    let app = TestApp::new().await;
    let response = app.get("/nope").send().await.unwrap();
    ollama_error(response, 404).await;
}

#[tokio::test]
async fn an_overlong_model_name_or_path_is_400_and_never_recorded() {
    // Each would be written to the ledger and the log as it is: a free
    // endpoint (`/api/show`) let any key write megabytes per row.
    let app = TestApp::new().await;
    let long = "m".repeat(1025);
    for (path, body) in [
        ("/api/show", format!(r#"{{"model": "{long}"}}"#)),
        ("/api/show", format!(r#"{{"name": "{long}"}}"#)),
        (
            "/api/generate",
            format!(r#"{{"model": "{long}", "prompt": "hi"}}"#),
        ),
        ("/chat", format!(r#"{{"model": "{long}", "messages": []}}"#)),
        (
            "/v1/chat/completions",
            format!(r#"{{"model": "{long}", "messages": []}}"#),
        ),
    ] {
        let response = app.keyed(path).body(body).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let json: serde_json::Value = response.json().await.unwrap();
        assert!(!json["error"].is_null(), "{path}: {json}");
    }
    let long_path = format!("/api/{}", "p".repeat(2048));
    for path in [format!("/v1/models/{long}"), long_path.clone()] {
        let response = app
            .get(&path)
            .header("x-api-key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
    }
    // The admin key's streamed paths too.
    let response = app
        .admin(
            reqwest::Method::POST,
            &long_path.replace("/api/p", "/api/blobs/"),
        )
        .body("blob")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(app.forwarded().is_empty());
    assert!(app.wait_ledger(KEY, 0).await.is_empty());
    // A name of the limit's length is passed on, for Ollama to judge.
    let name = "m".repeat(1024);
    app.keyed("/api/show")
        .body(format!(r#"{{"model": "{name}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(app.forwarded().len(), 1);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let app = spawn().var("MAX_BODY_BYTES", "1024").start().await;
    let prompt = "x".repeat(2000);
    let body = format!(r#"{{"model":"mistral","prompt":"{prompt}"}}"#);
    let response = app
        .keyed("/api/generate")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    ollama_error(response, 413).await;
    // Also without a content length (chunked).
    let stream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(body)]);
    let response = app
        .keyed("/api/generate")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    ollama_error(response, 413).await;
    assert!(app.forwarded().is_empty());
    assert_eq!(app.balance_of(KEY).await, Credits::whole(10));
}

#[tokio::test]
async fn admin_blob_uploads_are_exempt_from_the_body_limit() {
    let app = spawn().var("MAX_BODY_BYTES", "1024").start().await;
    let blob = vec![7u8; 64 * 1024];
    let path = blob_path(&blob);
    let response = app
        .admin(reqwest::Method::POST, &path)
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let seen = app.forwarded().pop().unwrap();
    assert_eq!(seen.body.len(), blob.len());
    // An ordinary key is refused before its body is read.
    let refused = app.keyed(&path).body(blob).send().await.unwrap();
    assert_eq!(refused.status(), 403);
}
