//! Requests reach Ollama as the client sent them; Ollama's replies reach
//! the client as Ollama sent them.

use crate::support::{Fetch, TestApp, KEY};
use serde_json::Value;

#[tokio::test]
async fn native_bodies_arrive_byte_for_byte() {
    let app = TestApp::new().await;
    let body = "{ \"model\" :\"mistral\",\n  \"prompt\": \"hi\",\t\"stream\":false, \"unknown_field\": {\"nested\": [1, 2.50, null]} }";
    let response = app
        .keyed("/api/generate")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.forwarded().pop().unwrap();
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.path, "/api/generate");
    assert_eq!(seen.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn native_generate_streams_by_default_like_ollama() {
    let app = TestApp::new().await;
    let response = app
        .keyed("/api/generate")
        .body(r#"{"model":"mistral","prompt":"hi"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    assert_eq!(response.headers()["x-credits-remaining"], "9");
    let text = response.text().await.unwrap();
    assert_eq!(text.lines().count(), 4);
    assert!(!text.contains("\n\n"), "no blank lines");
}

#[tokio::test]
async fn metadata_endpoints_need_a_key_and_cost_nothing() {
    let app = TestApp::new().await;
    for (method, path, body) in [
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("GET", "/api/version", None),
        ("POST", "/api/show", Some(r#"{"model":"mistral"}"#)),
    ] {
        let request = app
            .client
            .request(method.parse().unwrap(), format!("{}{path}", app.url));
        let request = match body {
            Some(b) => request.body(b),
            None => request,
        };
        assert_eq!(
            request.try_clone().unwrap().send().await.unwrap().status(),
            401,
            "{path}"
        );
        let response = request.header("x-api-key", KEY).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let _: Value = response.json().await.unwrap();
    }
    assert_eq!(
        app.balance_of(KEY).await,
        tollgate::credits::Credits::whole(10)
    );
}

#[tokio::test]
async fn embeddings_are_metered_and_relayed() {
    let app = TestApp::new().await;
    let embed: Value = app
        .keyed("/api/embed")
        .body(r#"{"model":"nomic-embed-text","input":["a","b"]}"#)
        .fetch_json()
        .await;
    assert_eq!(embed["embeddings"].as_array().unwrap().len(), 2);
    let legacy: Value = app
        .keyed("/api/embeddings")
        .body(r#"{"model":"nomic-embed-text","prompt":"a"}"#)
        .fetch_json()
        .await;
    assert!(legacy["embedding"].is_array());
    assert_eq!(
        app.balance_of(KEY).await,
        tollgate::credits::Credits::whole(8)
    );
}

#[tokio::test]
async fn the_root_probe_needs_no_key_like_ollama() {
    let app = TestApp::new().await;
    let response = app.get("/").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "Ollama is running");
    // A HEAD reply announces the GET reply's length, as Ollama's does.
    for path in ["/", "/api/tags", "/api/version"] {
        let direct = app
            .client
            .head(format!("{}{path}", app.fake.url()))
            .send()
            .await
            .unwrap();
        let head = app
            .head(path)
            .header("x-api-key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200, "{path}");
        let length = |r: &reqwest::Response| r.headers().get("content-length").cloned();
        assert!(length(&direct).is_some_and(|l| l != "0"), "{path}");
        assert_eq!(length(&head), length(&direct), "{path}");
        assert_eq!(head.text().await.unwrap(), "", "{path}");
    }
}

#[tokio::test]
async fn health_reports_whether_ollama_answers() {
    let app = TestApp::new().await;
    let health: Value = app.get("/health").fetch_json().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["ollama"]["reachable"], true);
    assert_eq!(health["ollama"]["url"], app.fake.url());
}

/// `/health` asks Ollama itself, as tollgate (its own user agent), under
/// the base path; a reply other than a success, or no reply, is "not
/// reachable".
#[tokio::test]
async fn health_asks_ollama_under_the_base_path_and_says_when_it_fails() {
    let app = TestApp::new().await;
    let health: Value = app.get("/health").fetch_json().await;
    assert_eq!(health["ollama"]["reachable"], true);
    let probe = version_probe(&app).expect("the probe reached Ollama");
    assert_eq!(
        (probe.method.as_str(), probe.path.as_str()),
        ("GET", "/api/version")
    );
    assert_eq!(
        probe.header("user-agent"),
        Some(tollgate::proxy::upstream::OWN_USER_AGENT)
    );
    assert_eq!(
        probe.header("host"),
        Some(&app.fake.url()["http://".len()..])
    );

    // Under a path the fake does not serve: it answers 404.
    let app = under_base_path("/elsewhere").await;
    let health: Value = app.get("/health").fetch_json().await;
    assert_eq!(health["ollama"]["reachable"], false);
    let probe = version_probe(&app).expect("the probe reached Ollama");
    assert_eq!(probe.path, "/elsewhere/api/version");

    // Nobody listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let app = crate::support::spawn()
        .var("OLLAMA_URL", &gone)
        .start()
        .await;
    let health: Value = app.get("/health").fetch_json().await;
    assert_eq!(health["ollama"]["reachable"], false);
    assert_eq!(health["ollama"]["url"], gone.as_str());
}

/// tollgate in front of a fake Ollama reached under `base_path`.
async fn under_base_path(base_path: &str) -> TestApp {
    let fake = crate::support::fake_ollama::FakeOllama::start().await;
    let base = format!("{}{base_path}", fake.url());
    crate::support::spawn()
        .var("OLLAMA_URL", &base)
        .fake(fake)
        .start()
        .await
}

/// The last request for Ollama's version that reached the fake (the model
/// list at start goes there too).
fn version_probe(app: &TestApp) -> Option<crate::support::fake_ollama::Recorded> {
    let requests = app.fake.requests();
    requests
        .into_iter()
        .rev()
        .find(|r| r.path.ends_with("/api/version"))
}

/// The path and query string reach Ollama exactly as sent, under the path
/// of `OLLAMA_URL` when it has one (Ollama behind a reverse proxy at a
/// sub-path), with or without a trailing slash on it.
#[tokio::test]
async fn path_and_query_arrive_as_sent_under_the_base_path() {
    let cases = [
        (
            "",
            "/api/tags?b=2&a=x%20y&empty=",
            "/api/tags?b=2&a=x%20y&empty=",
        ),
        ("/ollama", "/api/tags?x=1", "/ollama/api/tags?x=1"),
        ("/ollama/", "/api/tags", "/ollama/api/tags"),
        ("/a/b", "/api/show", "/a/b/api/show"),
    ];
    for (base_path, sent, expected) in cases {
        let app = under_base_path(base_path).await;
        let base = app.fake.url() + base_path;
        let request = if sent.starts_with("/api/show") {
            app.keyed(sent).body(r#"{"model":"mistral"}"#)
        } else {
            app.get(sent).header("x-api-key", KEY)
        };
        let status = request.send().await.unwrap().status();
        let seen = app.forwarded();
        let seen = seen
            .last()
            .unwrap_or_else(|| panic!("{sent} under {base}: nothing reached Ollama ({status})"));
        assert_eq!(seen.path, expected, "{sent} under {base}");
    }
}
