//! SPEC §5, §6, §7 on `/v1/*`: Ollama's OpenAI-compatible API passed
//! through, SSE relayed, errors in OpenAI's shape.

use crate::support::fake_ollama::Behavior;
use crate::support::{raw_upstream, spawn, Fetch, TestApp, KEY};
use serde_json::{json, Value};
use tollgate::credits::Credits;

fn chat(stream: bool) -> Value {
    json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

fn events(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("every event is data"))
        .collect()
}

#[tokio::test]
async fn sse_streams_are_relayed_event_by_event_with_done() {
    let app = TestApp::new().await;
    let response = app
        .post("/v1/chat/completions")
        .header("authorization", format!("Bearer {KEY}"))
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(response.headers()["x-credits-remaining"], "9");
    let text = response.text().await.unwrap();
    let events = events(&text);
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(
        !text.contains("\"choices\":[]"),
        "no usage chunk was asked for"
    );
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows[0].record.credits, Credits::whole(1));
    assert_eq!(rows[0].record.endpoint, "/v1/chat/completions");
}

#[tokio::test]
async fn with_token_pricing_usage_is_asked_for_and_the_extra_chunk_removed() {
    let app = spawn()
        .var("API_KEY_CREDITS", "100")
        .var("CREDITS_PER_1K_COMPLETION_TOKENS", "1000")
        .start()
        .await;
    // A small max_tokens keeps the reservation (1 + 10 tokens) affordable.
    let mut body = chat(true);
    body["max_tokens"] = json!(10);
    // `null` stream options are none to Ollama: usage is asked for all the same.
    body["stream_options"] = Value::Null;
    let response = app
        .keyed("/v1/chat/completions")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-credits-remaining"], "89");
    let text = response.text().await.unwrap();
    let asked = app.forwarded().pop().unwrap().json();
    assert_eq!(asked["stream_options"]["include_usage"], true);
    assert!(!text.contains("\"choices\":[]"), "{text}");
    assert_eq!(*events(&text).last().unwrap(), "[DONE]");
    let rows = app.wait_ledger(KEY, 1).await;
    // 1 per request + 3 completion tokens at 1 credit each, from `usage`.
    assert_eq!(
        (
            rows[0].record.prompt_tokens,
            rows[0].record.completion_tokens
        ),
        (7, 3)
    );
    assert_eq!(rows[0].record.credits, Credits::whole(4));

    // A client that asks for usage gets it.
    body["stream_options"] = json!({"include_usage": true});
    let text = app
        .keyed("/v1/chat/completions")
        .json(&body)
        .fetch_text()
        .await;
    assert!(text.contains("\"choices\":[]"), "{text}");
}

/// Ollama's completions writer, asked for usage, also puts a zero `usage`
/// in every chunk before the usage chunk. When tollgate asked for it, the
/// client sees none of it; when the client asked, it sees all of it.
#[tokio::test]
async fn usage_asked_for_by_tollgate_leaves_no_trace_in_completion_chunks() {
    let app = spawn()
        .var("API_KEY_CREDITS", "100")
        .var("CREDITS_PER_1K_COMPLETION_TOKENS", "1000")
        .start()
        .await;
    let mut body = json!({"model": "mistral", "prompt": "Once", "stream": true, "max_tokens": 10});
    let text = app.keyed("/v1/completions").json(&body).fetch_text().await;
    let asked = app.forwarded().pop().unwrap().json();
    assert_eq!(asked["stream_options"]["include_usage"], true);
    let sent = events(&text);
    assert_eq!(*sent.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = sent[..sent.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 2, "{text}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion", "{chunk}");
        assert_eq!(
            chunk["choices"].as_array().map(Vec::len),
            Some(1),
            "{chunk}"
        );
        assert!(chunk.get("usage").is_none(), "{chunk}");
    }
    // The text and the order of the fields are Ollama's own.
    assert!(
        sent[0].ends_with(r#""model":"mistral","system_fingerprint":"fp_ollama"}"#),
        "{}",
        sent[0]
    );
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows[0].record.completion_tokens, 3);
    assert_eq!(rows[0].record.credits, Credits::whole(4));

    // A client that asks for usage gets Ollama's stream untouched.
    body["stream_options"] = json!({"include_usage": true});
    let text = app.keyed("/v1/completions").json(&body).fetch_text().await;
    let sent = events(&text);
    let zero = r#","usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}"#;
    assert!(sent[0].ends_with(zero), "{}", sent[0]);
    assert!(text.contains("\"choices\":[]"), "{text}");
}

/// Ollama ends an OpenAI stream that failed after its first chunk with an
/// empty chunk and no `[DONE]`; tollgate adds an error event, so that SDKs
/// raise instead of taking the cut reply for a whole one, and charges the
/// chunks relayed.
#[tokio::test]
async fn a_stream_that_ends_without_done_gets_an_error_event() {
    let app = spawn().var("API_KEY_CREDITS", "100").start().await;
    app.fake.set(Behavior {
        chunks: 5,
        stream_error_after: Some(2),
        ..Behavior::default()
    });
    for (n, path, body) in [
        (1, "/v1/chat/completions", chat(true)),
        (
            2,
            "/v1/completions",
            json!({"model": "mistral", "prompt": "Once", "stream": true}),
        ),
    ] {
        let text = app.keyed(path).json(&body).fetch_text().await;
        let sent = events(&text);
        assert_eq!(sent.len(), 4, "{text}");
        let empty: Value = serde_json::from_str(sent[2]).unwrap();
        assert_eq!(
            empty["model"], "",
            "Ollama's empty chunk is relayed: {text}"
        );
        let error: Value = serde_json::from_str(sent[3]).unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("without finishing it"), "{text}");
        assert_eq!(error["error"]["type"], "api_error");
        let rows = app.wait_ledger(KEY, n).await;
        let row = rows.iter().find(|r| r.record.endpoint == path).unwrap();
        assert_eq!(row.record.completion_tokens, 2, "{path}");
        assert_eq!(row.record.credits, Credits::whole(1));
    }
    // A finished stream gets nothing added.
    app.fake.set(Behavior::default());
    let text = app
        .keyed("/v1/chat/completions")
        .json(&chat(true))
        .fetch_text()
        .await;
    assert_eq!(*events(&text).last().unwrap(), "[DONE]");
    assert!(!text.contains("\"error\""), "{text}");
}

/// A reply made only of tool calls (empty `content` in every delta) is
/// output: charged as any other, by its usage or by its chunks.
#[tokio::test]
async fn a_reply_of_tool_calls_only_is_charged() {
    let app = spawn()
        .var("API_KEY_CREDITS", "100")
        .var("CREDITS_PER_1K_COMPLETION_TOKENS", "1000")
        .start()
        .await;
    app.fake.set(Behavior {
        tool_calls: true,
        ..Behavior::default()
    });
    let mut body = chat(true);
    body["max_tokens"] = json!(10);
    let text = app
        .keyed("/v1/chat/completions")
        .json(&body)
        .fetch_text()
        .await;
    assert!(text.contains("\"tool_calls\":[{"), "{text}");
    assert!(text.contains("\"finish_reason\":\"tool_calls\""), "{text}");
    assert_eq!(*events(&text).last().unwrap(), "[DONE]");
    let rows = app.wait_ledger(KEY, 1).await;
    // 1 per request + 3 completion tokens at 1 credit each, from `usage`.
    assert_eq!(
        (
            rows[0].record.prompt_tokens,
            rows[0].record.completion_tokens
        ),
        (7, 3)
    );
    assert_eq!(rows[0].record.credits, Credits::whole(4));
}

/// Without token pricing (no usage event), a stream of tool calls cut
/// before `[DONE]` is charged by its tool-call chunks.
#[tokio::test]
async fn a_cut_reply_of_tool_calls_counts_its_chunks() {
    let app = spawn().var("API_KEY_CREDITS", "100").start().await;
    app.fake.set(Behavior {
        tool_calls: true,
        chunks: 5,
        stream_error_after: Some(2),
        ..Behavior::default()
    });
    let text = app
        .keyed("/v1/chat/completions")
        .json(&chat(true))
        .fetch_text()
        .await;
    assert!(text.contains("without finishing it"), "{text}");
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows[0].record.completion_tokens, 2);
    assert_eq!(rows[0].record.credits, Credits::whole(1));
}

/// A stream cut in its last event, without `[DONE]`: that event is not
/// sent nor counted, and tollgate's error event stays a whole event.
#[tokio::test]
async fn an_unfinished_last_event_is_left_out_before_the_error_event() {
    let first = r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"role":"assistant","content":"a"},"finish_reason":null}]}"#;
    for tail in [
        r#"data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"cu"#,
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n",
    ] {
        let upstream = raw_upstream("text/event-stream", format!("data: {first}\n\n{tail}")).await;
        let app = spawn().var("OLLAMA_URL", &upstream).start().await;
        let text = app
            .keyed("/v1/chat/completions")
            .json(&chat(true))
            .fetch_text()
            .await;
        let sent = events(&text);
        assert_eq!(sent.len(), 2, "{text}");
        assert_eq!(sent[0], first);
        let error: Value = serde_json::from_str(sent[1]).unwrap();
        assert!(error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("without finishing it"));
        let rows = app.wait_ledger(KEY, 1).await;
        assert_eq!(rows[0].record.completion_tokens, 1, "{tail}");
    }
}

/// Ollama answers `_debug_render_only` with one chunk and no `[DONE]`: it
/// is relayed as it comes.
#[tokio::test]
async fn a_debug_render_is_relayed_without_an_error_event() {
    let chunk = r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
    let upstream = raw_upstream("text/event-stream", format!("data: {chunk}\n\n")).await;
    let app = spawn().var("OLLAMA_URL", &upstream).start().await;
    let mut body = chat(true);
    body["_debug_render_only"] = json!(true);
    let text = app
        .keyed("/v1/chat/completions")
        .json(&body)
        .fetch_text()
        .await;
    assert_eq!(text, format!("data: {chunk}\n\n"));
}

#[tokio::test]
async fn non_streamed_replies_and_metadata_pass_through() {
    let app = TestApp::new().await;
    let reply: Value = app
        .keyed("/v1/chat/completions")
        .json(&chat(false))
        .fetch_json()
        .await;
    assert_eq!(reply["object"], "chat.completion");
    assert!(reply["usage"]["completion_tokens"].is_u64());
    let completion: Value = app
        .keyed("/v1/completions")
        .json(&json!({"model": "mistral", "prompt": "Once"}))
        .fetch_json()
        .await;
    assert_eq!(completion["object"], "text_completion");
    let embedding: Value = app
        .keyed("/v1/embeddings")
        .json(&json!({"model": "nomic-embed-text", "input": "hi"}))
        .fetch_json()
        .await;
    assert_eq!(embedding["object"], "list");
    let models: Value = app
        .get("/v1/models")
        .header("x-api-key", KEY)
        .fetch_json()
        .await;
    assert_eq!(models["data"].as_array().unwrap().len(), 3);
    let one = app
        .get("/v1/models/mistral:latest")
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(app.balance_of(KEY).await, Credits::whole(7));
}

#[tokio::test]
async fn tollgates_own_errors_have_openais_shape() {
    let app = spawn().var("API_KEY_CREDITS", "0").start().await;
    let cases = [
        (
            app.post("/v1/chat/completions"),
            401,
            "invalid_request_error",
        ),
        (app.keyed("/v1/chat/completions"), 402, "insufficient_quota"),
        (app.keyed("/v1/some-new-endpoint"), 403, "permission_error"),
    ];
    for (request, status, kind) in cases {
        let response = request.json(&chat(false)).send().await.unwrap();
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(body["error"]["message"].is_string());
        assert!(body["error"].get("param").is_some() && body["error"].get("code").is_some());
    }
    let bad = app
        .keyed("/v1/chat/completions")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn ollamas_own_openai_errors_pass_through() {
    let app = TestApp::new().await;
    let response = app
        .keyed("/v1/chat/completions")
        .json(&json!({"model": "nosuch", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");
    assert_eq!(app.balance_of(KEY).await, Credits::whole(10));
}
