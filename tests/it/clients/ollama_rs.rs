//! The `ollama-rs` crate (features `headers` and `stream`, no TLS) against
//! tollgate, with the key in an `x-api-key` header.
//!
//! What ollama-rs 0.3.6 does with errors: a non-2xx answer becomes
//! `OllamaError::Other(body)` (no status code is kept), and an in-stream
//! `{"error": ...}` line is not a chat message, so its chat stream logs it
//! and skips it: the stream just ends without a `done: true` message.

use crate::support::fake_ollama::{Behavior, STREAM_ERROR_MESSAGE};
use crate::support::{spawn, TestApp, KEY};
use futures_util::StreamExt;
use ollama_rs::error::OllamaError;
use ollama_rs::generation::chat::request::ChatMessageRequest;
use ollama_rs::generation::chat::ChatMessage;
use ollama_rs::generation::completion::request::GenerationRequest;
use ollama_rs::generation::embeddings::request::GenerateEmbeddingsRequest;
use ollama_rs::Ollama;
use reqwest::header::{HeaderMap, HeaderValue};
use std::time::Duration;

const REPLY: &str = "w0 w1 w2 ";

fn client(app: &TestApp, key: &str) -> Ollama {
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", HeaderValue::from_str(key).expect("header"));
    Ollama::builder()
        .url(app.url.as_str())
        .request_headers(headers)
        .build()
}

fn hi() -> Vec<ChatMessage> {
    vec![ChatMessage::user("hello".to_string())]
}

/// Waits for the next stream item, never forever.
async fn next<S: futures_util::Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the next chunk arrives without the test sending anything more")
}

#[tokio::test]
async fn ollama_rs_generate_chat_embed_list_show() {
    let app = spawn().var("API_KEY_CREDITS", "100").start().await;
    let ollama = client(&app, KEY);

    let generated = ollama
        .generate(GenerationRequest::new("mistral".into(), "hi"))
        .await
        .expect("generate");
    assert_eq!(generated.response, REPLY);
    assert!(generated.done);
    assert_eq!(generated.eval_count, Some(3));

    let chat = ollama
        .send_chat_messages(ChatMessageRequest::new("mistral".into(), hi()))
        .await
        .expect("chat");
    assert_eq!(chat.message.content, REPLY);
    assert_eq!(chat.final_data.expect("final data").eval_count, 3);

    let embedded = ollama
        .generate_embeddings(GenerateEmbeddingsRequest::new(
            "nomic-embed-text".into(),
            vec!["a", "b"].into(),
        ))
        .await
        .expect("embed");
    assert_eq!(embedded.embeddings.len(), 2);
    assert_eq!(embedded.embeddings[0].len(), 8);

    let models = ollama.list_local_models().await.expect("list");
    assert!(models.iter().any(|m| m.name == "mistral:latest"));
    let info = ollama
        .show_model_info("mistral".into())
        .await
        .expect("show");
    assert!(info.modelfile.contains("FROM"));

    // The key never reaches Ollama.
    for request in app.fake.requests() {
        assert_eq!(request.header("x-api-key"), None, "{}", request.path);
    }
    // generate, chat and embed were charged one credit each.
    assert_eq!(
        app.balance_of(KEY).await,
        tollgate::credits::Credits::whole(97)
    );
}

#[tokio::test]
async fn ollama_rs_streams_arrive_chunk_by_chunk() {
    let app = TestApp::new().await;
    app.fake.set(Behavior {
        chunks: 4,
        lockstep: true,
        ..Behavior::default()
    });
    let ollama = client(&app, KEY);

    // Chat: one message per chunk, each read before the fake may send the
    // next one.
    let mut chat = ollama
        .send_chat_messages_stream(ChatMessageRequest::new("mistral".into(), hi()))
        .await
        .expect("chat stream");
    for k in 0..4 {
        let part = next(&mut chat).await.expect("a chunk").expect("no error");
        assert_eq!(part.message.content, format!("w{k} "));
        assert!(!part.done);
        app.fake.step();
    }
    let last = next(&mut chat).await.expect("the final chunk").expect("ok");
    assert!(last.done);
    assert_eq!(last.final_data.expect("final data").eval_count, 4);
    assert!(next(&mut chat).await.is_none());

    // Generate: items are the lines of one network read.
    let mut generated = ollama
        .generate_stream(GenerationRequest::new("mistral".into(), "hi"))
        .await
        .expect("generate stream");
    let mut texts = Vec::new();
    while texts.len() < 4 {
        let lines = next(&mut generated).await.expect("a chunk").expect("ok");
        for line in lines {
            texts.push(line.response);
            app.fake.step();
        }
    }
    assert_eq!(texts, ["w0 ", "w1 ", "w2 ", "w3 "]);
    let last = next(&mut generated).await.expect("final").expect("ok");
    assert!(last.last().expect("a line").done);
}

#[tokio::test]
async fn ollama_rs_errors() {
    let app = TestApp::new().await;

    let bad = client(&app, "not-a-key")
        .generate(GenerationRequest::new("mistral".into(), "hi"))
        .await
        .expect_err("a bad key is refused");
    match bad {
        OllamaError::Other(body) => assert!(body.contains("invalid API key"), "{body}"),
        other => panic!("unexpected error {other:?}"),
    }
    let bad_stream = client(&app, "not-a-key")
        .send_chat_messages_stream(ChatMessageRequest::new("mistral".into(), hi()))
        .await;
    assert!(
        matches!(bad_stream, Err(OllamaError::Other(body)) if body.contains("invalid API key"))
    );
    let unknown = client(&app, KEY)
        .send_chat_messages(ChatMessageRequest::new("nope".into(), hi()))
        .await
        .expect_err("unknown model");
    assert!(matches!(unknown, OllamaError::Other(body) if body.contains("model 'nope' not found")));

    // An in-stream error: ollama-rs drops the error line, so the stream ends
    // without a final message.
    app.fake.set(Behavior {
        chunks: 5,
        stream_error_after: Some(2),
        ..Behavior::default()
    });
    let mut chat = client(&app, KEY)
        .send_chat_messages_stream(ChatMessageRequest::new("mistral".into(), hi()))
        .await
        .expect("stream");
    let mut parts = Vec::new();
    while let Some(part) = next(&mut chat).await {
        parts.push(part.expect("ok"));
    }
    let texts: Vec<&str> = parts.iter().map(|p| p.message.content.as_str()).collect();
    assert_eq!(texts, ["w0 ", "w1 "]);
    assert!(parts.iter().all(|p| !p.done));
    // ... but the line did reach the client: tollgate passes it through.
    let raw = app
        .keyed("/api/chat")
        .json(&serde_json::json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let last: serde_json::Value =
        serde_json::from_str(raw.lines().last().expect("lines")).expect("JSON");
    assert_eq!(last["error"], STREAM_ERROR_MESSAGE, "{raw}");
}
