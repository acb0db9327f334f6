//! Tests of the fake Ollama itself: if these fail, gateway tests built on it
//! prove nothing.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::support::fake_ollama::{Behavior, FakeOllama, BUSY_MESSAGE, STREAM_ERROR_MESSAGE};

const WAIT: Duration = Duration::from_secs(5);

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn lines(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with('\n'),
        "NDJSON must end with a newline: {body:?}"
    );
    body.lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

/// The JSON payloads of an SSE body, and whether it ended with `[DONE]`.
fn sse_events(body: &str) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    let mut done = false;
    for event in body.split_terminator("\n\n") {
        let data = event
            .strip_prefix("data: ")
            .expect("every event is `data: ...`");
        assert!(!done, "nothing may follow [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).expect("event data is JSON"));
        }
    }
    (events, done)
}

/// GETs `url` and reads the reply as JSON.
async fn get_json(url: String) -> Value {
    client()
        .get(url)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}

/// Reads the response body until it holds `n` newline-terminated lines.
async fn read_lines(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
    n: usize,
) {
    while buf.matches('\n').count() < n {
        let chunk = stream
            .next()
            .await
            .expect("stream ended")
            .expect("body error");
        buf.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
    }
}

#[tokio::test]
async fn generate_streams_ndjson_then_a_done_chunk() {
    let fake = FakeOllama::start().await;
    let resp = client()
        .post(format!("{}/api/generate", fake.url()))
        .json(&json!({ "model": "mistral", "prompt": "hi" }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let body = resp.text().await.expect("body");
    let chunks = lines(&body);
    assert_eq!(chunks.len(), 4);
    for (i, chunk) in chunks[..3].iter().enumerate() {
        assert_eq!(chunk["model"], "mistral", "model is echoed as sent");
        assert_eq!(chunk["response"], format!("w{i} "));
        assert_eq!(chunk["done"], false);
        assert!(chunk["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }
    let last = &chunks[3];
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["response"], "");
    assert_eq!(last["eval_count"], 3);
    assert_eq!(last["prompt_eval_count"], 7);
    assert!(last["total_duration"].as_u64().is_some_and(|d| d > 0));

    assert_eq!(fake.generation_count(), 1);
    let recorded = fake.last_request().expect("recorded");
    assert_eq!(recorded.method, "POST");
    assert_eq!(recorded.path, "/api/generate");
    assert_eq!(recorded.json()["prompt"], "hi");
    assert_eq!(recorded.header("Content-Type"), Some("application/json"));
    assert_eq!(
        fake.disconnects(),
        0,
        "a stream read to the end is no disconnect"
    );
    assert_eq!(fake.in_flight(), 0);
}

#[tokio::test]
async fn chat_non_stream_and_num_predict() {
    let fake = FakeOllama::start().await;
    let resp = client()
        .post(format!("{}/api/chat", fake.url()))
        .json(&json!({
            "model": "llama3.2:latest",
            "messages": [{ "role": "user", "content": "hi" }],
            "stream": false,
        }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let reply: Value = resp.json().await.expect("one JSON object");
    assert_eq!(
        reply["message"],
        json!({ "role": "assistant", "content": "w0 w1 w2 " })
    );
    assert_eq!(reply["done"], true);
    assert_eq!(reply["done_reason"], "stop");
    assert_eq!(reply["eval_count"], 3);

    let resp = client()
        .post(format!("{}/api/generate", fake.url()))
        .json(&json!({ "model": "mistral", "prompt": "hi", "options": { "num_predict": 2 } }))
        .send()
        .await
        .expect("send");
    let chunks = lines(&resp.text().await.expect("body"));
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[2]["done_reason"], "length");
    assert_eq!(chunks[2]["eval_count"], 2);
}

#[tokio::test]
async fn errors_are_ollamas() {
    let fake = FakeOllama::start().await;
    let post = |path: &str, body: &'static str| {
        client()
            .post(format!("{}{path}", fake.url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases = [
        (
            "/api/generate",
            r#"{"model":"nope","prompt":"x"}"#,
            404,
            "model 'nope' not found",
        ),
        ("/api/generate", "", 400, "missing request body"),
        (
            "/api/generate",
            "x",
            400,
            "invalid character 'x' looking for beginning of value",
        ),
        ("/api/generate", r#"{"model":"#, 400, "unexpected EOF"),
        ("/api/chat", r#"{"messages":[]}"#, 400, "model is required"),
        (
            "/api/embed",
            r#"{"model":"nope","input":"x"}"#,
            404,
            "model \"nope\" not found, try pulling it first",
        ),
        (
            "/api/copy",
            r#"{"source":"nope","destination":"b"}"#,
            404,
            "model \"nope\" not found",
        ),
    ];
    for (path, body, status, message) in cases {
        let resp = post(path, body).await.expect("send");
        assert_eq!(resp.status(), status, "{path} {body}");
        let reply: Value = resp.json().await.expect("JSON error body");
        assert_eq!(reply, json!({ "error": message }), "{path} {body}");
    }

    let resp = client()
        .get(format!("{}/nope", fake.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.text().await.expect("body"), "404 page not found");

    fake.set(Behavior {
        fail: Some((503, BUSY_MESSAGE.to_string())),
        ..Behavior::default()
    });
    let resp = post("/api/generate", r#"{"model":"mistral","prompt":"x"}"#)
        .await
        .expect("send");
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({ "error": BUSY_MESSAGE })
    );
    let resp = post(
        "/v1/chat/completions",
        r#"{"model":"mistral","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await
    .expect("send");
    assert_eq!(resp.status(), 503);
    let reply: Value = resp.json().await.expect("json");
    assert_eq!(reply["error"]["message"], BUSY_MESSAGE);
    assert_eq!(reply["error"]["type"], "api_error");
    assert_eq!(
        fake.generation_count(),
        8,
        "errors count as generation requests"
    );
}

#[tokio::test]
async fn foreign_host_or_origin_is_forbidden() {
    let fake = FakeOllama::start().await;
    let get = |host: Option<&str>, origin: Option<&str>| {
        let mut req = client().get(format!("{}/api/tags", fake.url()));
        if let Some(host) = host {
            req = req.header("host", host);
        }
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        req.send()
    };
    let resp = get(Some("gateway.example.com"), None).await.expect("send");
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.text().await.expect("body"), "");
    let resp = get(None, Some("https://evil.example")).await.expect("send");
    assert_eq!(resp.status(), 403);
    assert_eq!(
        get(Some("localhost:11434"), Some("http://127.0.0.1:3000"))
            .await
            .expect("send")
            .status(),
        200
    );
    let resp = get(None, None).await.expect("send");
    assert_eq!(resp.status(), 200);
    let tags: Value = resp.json().await.expect("json");
    assert_eq!(tags["models"][0]["name"], "mistral:latest");
    assert_eq!(
        fake.requests().len(),
        4,
        "refused requests are recorded too"
    );
}

#[tokio::test]
async fn lockstep_withholds_the_next_chunk_until_step() {
    let fake = FakeOllama::start_with(Behavior {
        lockstep: true,
        ..Behavior::default()
    })
    .await;
    let resp = client()
        .post(format!("{}/api/chat", fake.url()))
        .json(&json!({ "model": "mistral", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .expect("send");
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    read_lines(&mut stream, &mut buf, 1).await;
    assert_eq!(buf.matches('\n').count(), 1);
    assert!(buf.contains("w0 "));
    assert_eq!(fake.in_flight(), 1);

    let more = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(more.is_err(), "chunk 2 arrived without a step: {more:?}");

    fake.step();
    read_lines(&mut stream, &mut buf, 2).await;
    assert!(buf.contains("w1 "));
    fake.step_many(2);
    read_lines(&mut stream, &mut buf, 4).await;
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the done chunk"
    );
    assert_eq!(lines(&buf)[3]["done"], true);
}

#[tokio::test]
async fn dropping_a_stream_is_a_disconnect() {
    let fake = FakeOllama::start_with(Behavior {
        lockstep: true,
        ..Behavior::default()
    })
    .await;
    let resp = client()
        .post(format!("{}/api/generate", fake.url()))
        .json(&json!({ "model": "mistral", "prompt": "hi" }))
        .send()
        .await
        .expect("send");
    let mut stream = resp.bytes_stream();
    read_lines(&mut stream, &mut String::new(), 1).await;
    assert!(!fake.wait_disconnect(Duration::from_millis(50)).await);
    drop(stream);
    assert!(
        fake.wait_disconnect(WAIT).await,
        "the fake did not see the client go"
    );
    assert_eq!(fake.disconnects(), 1);
    assert_eq!(fake.in_flight(), 0);
}

#[tokio::test]
async fn sse_usage_chunk_only_when_asked() {
    let fake = FakeOllama::start().await;
    for include_usage in [true, false] {
        let resp = client()
            .post(format!("{}/v1/chat/completions", fake.url()))
            .json(&json!({
                "model": "mistral",
                "messages": [{ "role": "user", "content": "hi" }],
                "stream": true,
                "stream_options": { "include_usage": include_usage },
            }))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let (events, done) = sse_events(&resp.text().await.expect("body"));
        assert!(done, "ends with data: [DONE]");
        assert_eq!(events[0]["object"], "chat.completion.chunk");
        assert_eq!(events[0]["system_fingerprint"], "fp_ollama");
        assert!(events[0]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")));
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[0]["choices"][0]["delta"]["content"], "w0 ");
        assert_eq!(events[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[3]["choices"][0]["delta"]["content"], "");
        let usage: Vec<&Value> = events.iter().filter(|e| e.get("usage").is_some()).collect();
        if include_usage {
            assert_eq!(events.len(), 5);
            assert_eq!(usage.len(), 1);
            assert_eq!(usage[0]["choices"], json!([]));
            assert_eq!(
                usage[0]["usage"],
                json!({ "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10 })
            );
        } else {
            assert_eq!(events.len(), 4);
            assert!(usage.is_empty());
        }
    }

    // Non-streamed replies always carry usage.
    let resp = client()
        .post(format!("{}/v1/completions", fake.url()))
        .json(&json!({ "model": "mistral", "prompt": "hi", "max_tokens": 2 }))
        .send()
        .await
        .expect("send");
    let reply: Value = resp.json().await.expect("json");
    assert_eq!(reply["choices"][0]["text"], "w0 w1 ");
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    assert_eq!(reply["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn hold_counts_first_then_waits_for_release() {
    let fake = FakeOllama::start_with(Behavior {
        hold: true,
        ..Behavior::default()
    })
    .await;
    let url = format!("{}/api/embed", fake.url());
    let request = tokio::spawn(async move {
        client()
            .post(url)
            .json(&json!({ "model": "nomic-embed-text", "input": ["a", "b"] }))
            .send()
            .await
            .expect("send")
            .json::<Value>()
            .await
            .expect("json")
    });
    assert!(fake.wait_for_requests(1, WAIT).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!request.is_finished(), "a held request was answered");
    fake.release(1);
    let reply = tokio::time::timeout(WAIT, request)
        .await
        .expect("released")
        .expect("task");
    assert_eq!(reply["embeddings"].as_array().map(Vec::len), Some(2));
    assert_eq!(reply["prompt_eval_count"], 7);
}

#[tokio::test]
async fn die_after_aborts_and_stream_error_after_reports() {
    let fake = FakeOllama::start_with(Behavior {
        die_after: Some(1),
        ..Behavior::default()
    })
    .await;
    let send = || {
        client()
            .post(format!("{}/api/generate", fake.url()))
            .json(&json!({ "model": "mistral", "prompt": "hi" }))
            .send()
    };
    let resp = send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    read_lines(&mut stream, &mut buf, 1).await;
    let end = stream.next().await;
    assert!(
        matches!(end, Some(Err(_))),
        "expected a body error, got {end:?}"
    );
    assert_eq!(
        fake.disconnects(),
        0,
        "the fake dying is not a client disconnect"
    );

    fake.set(Behavior {
        stream_error_after: Some(2),
        ..Behavior::default()
    });
    let resp = send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let chunks = lines(&resp.text().await.expect("body"));
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[2], json!({ "error": STREAM_ERROR_MESSAGE }));
}

/// What Ollama's OpenAI writer makes of an error in a stream: after the
/// first chunk, an empty chunk and the end, without `[DONE]` or the
/// message; before it, the error with its status.
#[tokio::test]
async fn openai_streams_lose_a_late_error_and_keep_an_early_one() {
    let fake = FakeOllama::start_with(Behavior {
        stream_error_after: Some(2),
        ..Behavior::default()
    })
    .await;
    let send = |path: &'static str, body: Value| {
        client()
            .post(format!("{}{path}", fake.url()))
            .json(&body)
            .send()
    };
    let chat = json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let resp = send("/v1/chat/completions", chat.clone())
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let (events, done) = sse_events(&resp.text().await.expect("body"));
    assert!(!done);
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["model"], "");
    assert_eq!(
        events[2]["choices"],
        json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }])
    );
    let completion = json!({"model": "mistral", "prompt": "hi", "stream": true,
                            "stream_options": {"include_usage": true}});
    let resp = send("/v1/completions", completion.clone())
        .await
        .expect("send");
    let (events, done) = sse_events(&resp.text().await.expect("body"));
    assert!(!done);
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["choices"][0]["text"], "");
    assert_eq!(events[2]["usage"]["total_tokens"], 0);

    fake.set(Behavior {
        stream_error_after: Some(0),
        ..Behavior::default()
    });
    let resp = send(
        "/api/chat",
        json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .expect("send");
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!({ "error": STREAM_ERROR_MESSAGE }));
    let resp = send("/v1/chat/completions", chat).await.expect("send");
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["message"], STREAM_ERROR_MESSAGE);
    assert_eq!(body["error"]["type"], "api_error");
}

#[tokio::test]
async fn metadata_and_model_management() {
    let fake = FakeOllama::start().await;
    assert!(fake.addr().ip().is_loopback());
    assert_eq!(fake.url(), format!("http://{}", fake.addr()));
    let c = client();
    let root = c.get(fake.url()).send().await.expect("send");
    assert_eq!(root.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(root.text().await.expect("body"), "Ollama is running");
    let version: Value = get_json(format!("{}/api/version", fake.url())).await;
    assert_eq!(version, json!({ "version": "0.12.6" }));

    let copy = c
        .post(format!("{}/api/copy", fake.url()))
        .json(&json!({ "source": "mistral", "destination": "mine" }))
        .send()
        .await
        .expect("send");
    assert_eq!(copy.status(), 200);
    assert_eq!(copy.text().await.expect("body"), "");
    let delete = c
        .delete(format!("{}/api/delete", fake.url()))
        .json(&json!({ "model": "mistral" }))
        .send()
        .await
        .expect("send");
    assert_eq!(delete.status(), 200);
    let models: Value = get_json(format!("{}/v1/models", fake.url())).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["llama3.2:latest", "nomic-embed-text:latest", "mine:latest"]
    );
    assert_eq!(models["data"][0]["owned_by"], "library");

    let missing = c
        .get(format!("{}/v1/models/mistral", fake.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(missing.status(), 404);
    let err: Value = missing.json().await.expect("json");
    assert_eq!(err["error"]["type"], "not_found_error");
    assert_eq!(err["error"]["message"], "model 'mistral' not found");

    let pull = c
        .post(format!("{}/api/pull", fake.url()))
        .json(&json!({ "model": "mistral" }))
        .send()
        .await
        .expect("send");
    let progress = lines(&pull.text().await.expect("body"));
    assert_eq!(progress[0]["status"], "pulling manifest");
    assert_eq!(progress.last().expect("last")["status"], "success");
    assert!(fake.behavior().find_model("mistral").is_some());

    let embedded: Value = c
        .post(format!("{}/v1/embeddings", fake.url()))
        .json(&json!({ "model": "nomic-embed-text", "input": "hi", "encoding_format": "base64" }))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let b64 = embedded["data"][0]["embedding"]
        .as_str()
        .expect("base64 string");
    assert_eq!(b64.len(), 44, "8 f32 = 32 bytes = 44 base64 characters");
    assert_eq!(
        embedded["usage"],
        json!({ "prompt_tokens": 7, "total_tokens": 7 })
    );

    fake.shutdown();
    let gone = c.get(format!("{}/api/tags", fake.url())).send().await;
    assert!(gone.is_err(), "a shut-down fake still answered: {gone:?}");
}

/// Go marshals the model list's nil slice as `null` when there is no model.
#[tokio::test]
async fn no_model_is_a_null_openai_list() {
    let fake = FakeOllama::start_with(Behavior {
        models: Vec::new(),
        ..Behavior::default()
    })
    .await;
    let models: Value = get_json(format!("{}/v1/models", fake.url())).await;
    assert_eq!(models, json!({ "object": "list", "data": null }));
}

/// Go's decoder matches field names without regard to case (the Kelvin
/// sign is a `k`), and the last match wins.
#[tokio::test]
async fn field_names_match_as_go_matches_them() {
    let fake = FakeOllama::start().await;
    let generate = |body: &'static str| {
        let request = client()
            .post(format!("{}/api/generate", fake.url()))
            .body(body);
        async move {
            let reply: Value = request.send().await.unwrap().json().await.unwrap();
            reply
        }
    };
    for (body, model) in [
        (
            r#"{"model":"mistral","MODEL":"llama3.2","prompt":"hi","stream":false}"#,
            "llama3.2",
        ),
        (
            r#"{"Model":"llama3.2","prompt":"hi","stream":false}"#,
            "llama3.2",
        ),
        (
            r#"{"MODEL":"llama3.2","model":"mistral","prompt":"hi","stream":false}"#,
            "mistral",
        ),
    ] {
        assert_eq!(generate(body).await["model"], model, "{body}");
    }
    let unload = generate(r#"{"model":"mistral","prompt":"","\u212Aeep_alive":0}"#).await;
    assert_eq!(unload["done_reason"], "unload");
}
