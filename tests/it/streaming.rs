//! SPEC §6: chunks relayed as Ollama produces them, nothing held back, and
//! streams that tollgate must end ended with an error line.

use crate::support::fake_ollama::Behavior;
use crate::support::{raw_upstream, raw_upstream_ending, spawn, upstream_with, TestApp, KEY};
use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

/// A generation, streamed (Ollama's default), with the test key.
fn generate(app: &TestApp) -> reqwest::RequestBuilder {
    app.keyed("/api/generate")
        .json(&json!({"model": "mistral", "prompt": "hi"}))
}

/// Reads until at least one complete line is buffered; returns it.
async fn next_line(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    buffer: &mut Vec<u8>,
) -> Option<Value> {
    loop {
        if let Some(pos) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=pos).collect();
            assert!(line.len() > 1, "a blank line was relayed");
            return Some(serde_json::from_slice(&line).expect("each line is JSON"));
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("the next chunk arrives without the test sending anything more")?;
        buffer.extend_from_slice(&chunk.unwrap());
    }
}

/// The fake sends chunk k+1 only after the test has received chunk k, so a
/// proxy that buffers anything deadlocks this test instead of passing it.
#[tokio::test]
async fn chunks_are_relayed_in_lockstep() {
    let app = TestApp::new().await;
    app.fake.set(Behavior {
        chunks: 5,
        lockstep: true,
        ..Behavior::default()
    });
    for (path, body) in [
        ("/api/generate", json!({"model": "mistral", "prompt": "hi"})),
        (
            "/api/chat",
            json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ] {
        let response = app.keyed(path).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let mut buffer = Vec::new();
        for k in 0..5 {
            let line = next_line(&mut body, &mut buffer).await.unwrap();
            assert_eq!(line["done"], false, "{path} chunk {k}");
            app.fake.step();
        }
        let last = next_line(&mut body, &mut buffer).await.unwrap();
        assert_eq!(last["done"], true);
        assert_eq!(last["eval_count"], 5);
    }
}

#[tokio::test]
async fn a_client_disconnect_closes_the_upstream_request_within_a_second() {
    let app = TestApp::new().await;
    app.fake.set(Behavior {
        chunks: 1000,
        chunk_delay: Duration::from_millis(50),
        ..Behavior::default()
    });
    let response = app
        .keyed("/api/chat")
        .json(&json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    next_line(&mut body, &mut buffer).await.unwrap();
    drop(body);
    assert!(app.fake.wait_disconnect(Duration::from_secs(1)).await);
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows.len(), 1, "settled and recorded");
    assert_eq!(rows[0].record.credits, tollgate::credits::Credits::whole(1));
}

#[tokio::test]
async fn an_error_ollama_reports_in_the_stream_passes_through() {
    let app = TestApp::new().await;
    app.fake.set(Behavior {
        chunks: 5,
        stream_error_after: Some(2),
        ..Behavior::default()
    });
    let response = generate(&app).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[2]["error"].is_string());
    assert_eq!(app.wait_ledger(KEY, 1).await[0].record.completion_tokens, 2);
}

#[tokio::test]
async fn an_idle_stream_is_ended_with_an_error_line() {
    let app = spawn().var("STREAM_IDLE_TIMEOUT_SECS", "1").start().await;
    app.fake.set(Behavior {
        chunks: 3,
        chunk_delay: Duration::from_secs(3),
        ..Behavior::default()
    });
    let response = generate(&app).send().await.unwrap();
    let text = response.text().await.unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("sent nothing for 1 s"),
        "{text}"
    );
}

#[tokio::test]
async fn shutdown_lets_streams_finish_then_cuts_what_remains() {
    let mut app = spawn().var("SHUTDOWN_GRACE_SECS", "1").start().await;
    app.fake.set(Behavior {
        chunks: 1000,
        chunk_delay: Duration::from_millis(20),
        ..Behavior::default()
    });
    let response = generate(&app).send().await.unwrap();
    app.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New requests are refused while draining, /health too; on /v1 in
    // OpenAI's shape.
    let refused = app.get("/health").send().await.unwrap();
    assert_eq!(refused.status(), 503);
    let refused = app.keyed("/v1/models").send().await.unwrap();
    assert_eq!(refused.status(), 503);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["type"], "api_error", "{error}");
    let text = response.text().await.unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(
        last["error"].as_str().unwrap().contains("shutting down"),
        "{last}"
    );
    let server = app.server.take().unwrap();
    server.await.unwrap().unwrap();
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows[0].record.credits, tollgate::credits::Credits::whole(1));
}

/// A client that stops reading its stream cannot hold shutdown up: the
/// stream's relay waits on a full socket, so it never sees the deadline;
/// the connection is cut once shutdown has waited for it (after the grace
/// period, the streams' extra time and the connections' linger), and what
/// was relayed to the client is charged before the server ends.
#[tokio::test]
async fn shutdown_cuts_a_connection_whose_client_stopped_reading() {
    const LINE: &[u8] =
        br#"{"model":"mistral","created_at":"2026-12-05T05:00:00Z","response":"a","done":false}
"#;
    // An endless stream: it fills every socket between Ollama and the client.
    let upstream = upstream_with("application/x-ndjson", || {
        Body::from_stream(futures_util::stream::repeat_with(|| {
            Ok::<_, std::io::Error>(Bytes::from_static(LINE))
        }))
    })
    .await;
    let mut app = spawn()
        .var("OLLAMA_URL", &upstream)
        .var("SHUTDOWN_GRACE_SECS", "1")
        .start()
        .await;
    let response = generate(&app).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // The client reads nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.begin_shutdown();
    let server = app.server.take().unwrap();
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("shutdown ends although the client never reads its stream")
        .unwrap()
        .unwrap();
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].record.completion_tokens > 0, "{:?}", rows[0]);
    assert_eq!(
        app.balance_of(KEY).await,
        tollgate::credits::Credits::whole(10) - rows[0].record.credits
    );
    drop(response);
}

/// A native generation stream that ends without its `"done": true` line is
/// cut: tollgate says so in an error line (as for a stream Ollama aborts),
/// leaves out an unfinished last line, and charges the chunks relayed.
#[tokio::test]
async fn a_native_stream_without_its_done_line_gets_an_error_line() {
    let chunk =
        r#"{"model":"mistral","created_at":"2026-12-04T23:00:00Z","response":"a","done":false}"#;
    // tollgate in front of an upstream that streams `ndjson`, and what it relays.
    let relayed = |ndjson: String| async move {
        let upstream = raw_upstream("application/x-ndjson", ndjson).await;
        let app = spawn().var("OLLAMA_URL", &upstream).start().await;
        let response = generate(&app).send().await.unwrap();
        (response.text().await.unwrap(), app)
    };
    for tail in [
        "",
        r#"{"model":"mistral","created_at":"2026-12-04T23:00:00Z","resp"#,
    ] {
        let (text, app) = relayed(format!("{chunk}\n{tail}")).await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0], chunk);
        let error: Value = serde_json::from_str(lines[1]).unwrap();
        assert!(
            error["error"]
                .as_str()
                .unwrap()
                .contains("without finishing it"),
            "{text}"
        );
        let rows = app.wait_ledger(KEY, 1).await;
        assert_eq!(rows[0].record.completion_tokens, 1, "{tail}");
    }
    // A finished one gets nothing added.
    let done = r#"{"model":"mistral","created_at":"2026-12-04T23:00:00Z","response":"","done":true,"done_reason":"stop","eval_count":1}"#;
    let (text, _app) = relayed(format!("{chunk}\n{done}")).await;
    assert_eq!(text, format!("{chunk}\n{done}"));
}

/// At the shutdown deadline, a request still waiting for Ollama's answer
/// is ended with 503 (it does not hold shutdown up until Ollama answers)
/// and, nothing having reached the client, charged nothing.
#[tokio::test]
async fn shutdown_cuts_a_request_still_waiting_for_ollama() {
    let mut app = spawn().var("SHUTDOWN_GRACE_SECS", "1").start().await;
    app.fake.set(Behavior {
        head_delay: Duration::from_secs(30),
        ..Behavior::default()
    });
    let waiting = app
        .keyed("/api/generate")
        .json(&json!({"model": "mistral", "prompt": "hi", "stream": false}))
        .send();
    let waiting = tokio::spawn(waiting);
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.begin_shutdown();
    let response = waiting.await.unwrap().unwrap();
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("shutting down"),
        "{error}"
    );
    let server = app.server.take().unwrap();
    server.await.unwrap().unwrap();
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows[0].record.credits, tollgate::credits::Credits::ZERO);
    assert_eq!(rows[0].record.status, 503, "the status the client got");
}

/// A reply that is complete (its final unit came) while Ollama has not
/// closed the stream yet gets no error line, whatever happens meanwhile
/// (here the idle limit).
#[tokio::test]
async fn a_complete_stream_left_open_gets_no_error_line() {
    let chunk =
        r#"{"model":"mistral","created_at":"2026-12-04T23:00:00Z","response":"a","done":false}"#;
    let done = r#"{"model":"mistral","created_at":"2026-12-04T23:00:00Z","response":"","done":true,"done_reason":"stop","prompt_eval_count":2,"eval_count":1}"#;
    let sse = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\ndata: [DONE]\n\n";
    for (path, content_type, reply) in [
        (
            "/api/generate",
            "application/x-ndjson",
            format!("{chunk}\n{done}\n"),
        ),
        ("/v1/completions", "text/event-stream", sse.to_string()),
    ] {
        let upstream = raw_upstream_ending(content_type, reply.clone(), false).await;
        let app = spawn()
            .var("OLLAMA_URL", &upstream)
            .var("STREAM_IDLE_TIMEOUT_SECS", "1")
            .start()
            .await;
        let text = app
            .keyed(path)
            .json(&json!({"model": "mistral", "prompt": "hi", "stream": true}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(text, reply, "{path}");
        let rows = app.wait_ledger(KEY, 1).await;
        assert_eq!(rows[0].record.credits, tollgate::credits::Credits::whole(1));
    }
}

/// A line that never ends (here: 5 MiB without a line break, then nothing)
/// is not gathered for ever: past 4 MiB the stream is ended with an error
/// line, and what was relayed before it is charged.
#[tokio::test]
async fn an_overlong_line_ends_the_stream_with_an_error_line() {
    let chunk =
        r#"{"model":"mistral","created_at":"2026-12-04T23:00:00Z","response":"a","done":false}"#;
    let endless = format!(
        r#"{{"model":"mistral","created_at":"2026-12-04T23:00:00Z","response":"{}"#,
        "x".repeat(5 << 20)
    );
    let upstream =
        raw_upstream_ending("application/x-ndjson", format!("{chunk}\n{endless}"), false).await;
    let app = spawn().var("OLLAMA_URL", &upstream).start().await;
    let response = generate(&app)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let text = response
        .text()
        .await
        .expect("the stream ends without waiting for Ollama's next line break");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{}", &text[..text.len().min(300)]);
    assert_eq!(lines[0], chunk);
    let error: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(
        error["error"],
        "Ollama sent a line longer than 4 MiB; the stream was ended"
    );
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows[0].record.completion_tokens, 1);

    // After a whole reply, such a line ends the stream quietly: no error
    // line follows a reply that finished.
    let done = r#"{"model":"mistral","created_at":"2026-12-04T23:00:00Z","response":"","done":true,"done_reason":"stop","prompt_eval_count":2,"eval_count":1}"#;
    let upstream = raw_upstream_ending(
        "application/x-ndjson",
        format!("{chunk}\n{done}\n{endless}"),
        false,
    )
    .await;
    let app = spawn().var("OLLAMA_URL", &upstream).start().await;
    let text = generate(&app)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .expect("the stream ends");
    assert_eq!(text, format!("{chunk}\n{done}\n"));
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows[0].record.completion_tokens, 1);
}
