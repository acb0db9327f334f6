//! SPEC §5 and issue 5: one log line per request, the request id in every
//! line, `LOG_FORMAT=json`, and never a key, prompt or completion in a log.

use super::Launch;
use crate::support::fake_ollama::FakeOllama;
use serde_json::{json, Value};
use std::time::Duration;

const KEY: &str = "log-test-key-5b1e";
const PROMPT: &str = "a-very-private-prompt-9731";

/// The gateway in front of `fake`, with KEY and JSON logs.
fn json_logging(dir: &std::path::Path, fake: &FakeOllama) -> Launch {
    Launch::new(dir)
        .var("OLLAMA_URL", &fake.url())
        .var("DATABASE_URL", "memory")
        .var("API_KEY", KEY)
        .var("LOG_FORMAT", "json")
}

#[tokio::test]
async fn json_logs_have_one_line_per_request_and_no_secrets() {
    let fake = FakeOllama::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = json_logging(dir.path(), &fake).start().await;

    let ok = gw
        .post("/api/generate")
        .header("x-api-key", KEY)
        .header("x-request-id", "log-test-ok")
        .json(&json!({"model": "mistral", "prompt": PROMPT, "stream": false}))
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
    ok.text().await.expect("body");
    let refused = gw
        .post("/api/generate")
        .header("x-api-key", "wrong-key-7f3a")
        .header("x-request-id", "log-test-refused")
        .json(&json!({"model": "mistral", "prompt": PROMPT}))
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 401);
    assert!(
        gw.wait_log("log-test-refused", Duration::from_secs(10))
            .await
    );

    let stderr = gw.stderr();
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let request_lines = |id: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["message"] == "request" && l["request_id"] == id)
            .collect()
    };
    let ok_lines = request_lines("log-test-ok");
    assert_eq!(ok_lines.len(), 1, "one line per request:\n{stderr}");
    let line = ok_lines[0];
    assert_eq!(line["method"], "POST");
    assert_eq!(line["route"], "/api/generate");
    assert_eq!(line["status"], 200);
    assert!(line["key_id"].is_i64());
    assert_eq!(line["model"], "mistral");
    assert_eq!(line["prompt_tokens"], 7);
    assert_eq!(line["completion_tokens"], 3);
    assert_eq!(line["credits"], 1.0);
    assert!(line["duration_ms"].is_f64());
    assert!(line["upstream_first_byte_ms"].is_f64());

    let refused_lines = request_lines("log-test-refused");
    assert_eq!(refused_lines.len(), 1);
    assert_eq!(refused_lines[0]["status"], 401);

    for secret in [KEY, "wrong-key-7f3a", PROMPT, "w0 w1"] {
        assert!(
            !stderr.contains(secret),
            "{secret:?} appears in the logs:\n{stderr}"
        );
    }
}

/// A line written while a stream is relayed (after the handler returned)
/// names the request too.
#[tokio::test]
async fn a_line_written_while_streaming_names_the_request() {
    let fake = FakeOllama::start().await;
    fake.set(crate::support::fake_ollama::Behavior {
        chunks: 3,
        chunk_delay: Duration::from_secs(5),
        ..Default::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = json_logging(dir.path(), &fake)
        .var("STREAM_IDLE_TIMEOUT_SECS", "1")
        .start()
        .await;
    let text = gw
        .post("/api/generate")
        .header("x-api-key", KEY)
        .header("x-request-id", "log-test-idle")
        .json(&json!({"model": "mistral", "prompt": "hi"}))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    assert!(text.contains("\"error\""), "{text}");
    assert!(
        gw.wait_log("stream ended by tollgate", Duration::from_secs(10))
            .await
    );
    let stderr = gw.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("stream ended by tollgate"))
        .expect("the line");
    let line: Value = serde_json::from_str(line).expect("JSON");
    assert_eq!(line["request_id"], "log-test-idle", "{line}");
}
