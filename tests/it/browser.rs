//! CORS proven in a real browser (issue 5 item 6, SPEC §2 `CORS_ORIGINS`,
//! §5): headless Chromium opens a page served from another origin on
//! loopback, and the page calls tollgate with `fetch`.
//!
//! Each test serves `tests/browser/page.html` from a tiny server of its own
//! on `127.0.0.1:<A>` while tollgate listens on `127.0.0.1:<B>` (origins
//! differ by port), starts Debian's Chromium (installed with apt-get when
//! `/usr/bin/chromium` is missing; see [`chromium`]) with a fresh profile,
//! and drives it over the DevTools protocol from Rust ([`cdp`]: no Node, no
//! browser download). The page takes its settings from its query string,
//! runs its checks on load and leaves what it got in `window.results`; the
//! test reads that and asserts on it, and on what tollgate and the fake
//! Ollama saw.
//!
//! * `a_page_from_an_allowed_origin_reads_answers_streams_and_errors`:
//!   `/generate` with `x-api-key` (the `response`, `X-Credits-Remaining`,
//!   `x-request-id`), a streamed `/chat` read with a `ReadableStream`
//!   reader line by line up to `"done": true` (chunk by chunk: the fake
//!   Ollama is in lockstep and the page asks for each next chunk through its
//!   own server's `/step` once it has read one), `Authorization: Bearer`, the
//!   page's own `x-request-id` echoed, and the status, JSON body and
//!   headers of a 402 (a key with 0 credits), a 401 and a 429 (a key
//!   limited to one request a minute, with `Retry-After`).
//! * `a_page_from_another_origin_is_refused_by_the_browser`: from an
//!   origin not in `CORS_ORIGINS`, a preflighted call and a simple one both
//!   fail with a `TypeError` in the page, and nothing is forwarded or
//!   charged; tollgate was reachable all the same (a `no-cors` fetch gets
//!   an opaque answer), and the same page may call a tollgate with
//!   `CORS_ORIGINS=*`.
//!
//! Without a browser (it cannot be installed) the tests print `skipped:
//! ...` and pass, except with `CI=true`, where they fail. Every wait is
//! bounded; nothing is timed. The browser is ended when its test ends,
//! failed or not.

mod cdp;
mod chromium;

use crate::support::fake_ollama::Behavior;
use crate::support::{spawn, TestApp, KEY};
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::{get, post};
use chromium::{Browser, PageRun};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const PAGE: &str = include_str!("../browser/page.html");

/// Serves the page at `/` on a loopback port of its own: an origin of its
/// own. `POST /step` (from the page, same origin) lets the fake Ollama
/// send one more lockstep chunk: it is passed on to [`PageServer::steps`].
struct PageServer {
    origin: String,
    steps: mpsc::UnboundedReceiver<()>,
    task: JoinHandle<()>,
}

impl PageServer {
    async fn start() -> PageServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let origin = format!("http://{}", listener.local_addr().expect("addr"));
        let (step, steps) = mpsc::unbounded_channel();
        let router = axum::Router::new()
            .route("/", get(|| async { Html(PAGE) }))
            .route(
                "/step",
                post(move || async move {
                    let _ = step.send(());
                    StatusCode::NO_CONTENT
                }),
            )
            .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        PageServer {
            origin,
            steps,
            task,
        }
    }

    /// The page's address with these settings in its query string.
    fn url(&self, settings: &[(&str, &str)]) -> String {
        let query: Vec<String> = settings
            .iter()
            .map(|(name, value)| format!("{name}={}", encode(value)))
            .collect();
        format!("{}/?{}", self.origin, query.join("&"))
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Percent-encodes all but unreserved characters.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Creates a key through the admin API and returns its secret.
async fn create_key(app: &TestApp, body: Value) -> String {
    let response = app
        .admin(Method::POST, "/admin/keys")
        .json(&body)
        .send()
        .await
        .expect("admin API");
    assert_eq!(response.status(), 201, "creating {body}");
    let created: Value = response.json().await.expect("JSON");
    created["key"].as_str().expect("the secret").to_string()
}

/// The results and console of a page run, to show when an assertion fails.
fn shown(run: &PageRun) -> String {
    format!(
        "page results: {:#}\nbrowser console:\n{}",
        run.results,
        run.console.join("\n")
    )
}

#[tokio::test]
async fn a_page_from_an_allowed_origin_reads_answers_streams_and_errors() {
    let Some(executable) = chromium::available().await else {
        return;
    };
    let mut page = PageServer::start().await;
    // Two origins in the list: the page's is not the first.
    let origins = format!("http://app.localhost:5173, {}", page.origin);
    let app = spawn().var("CORS_ORIGINS", &origins).start().await;
    let empty = create_key(&app, json!({"name": "empty", "credits": 0})).await;
    let limited = create_key(
        &app,
        json!({"name": "limited", "credits": 10, "rate_limit_rpm": 1}),
    )
    .await;
    let url = page.url(&[
        ("mode", "allowed"),
        ("gate", &app.url),
        ("key", KEY),
        ("empty", &empty),
        ("limited", &limited),
    ]);

    // Streamed replies come one chunk per step, and the page steps.
    app.fake.set(Behavior {
        lockstep: true,
        ..Behavior::default()
    });
    let stepper = async {
        while page.steps.recv().await.is_some() {
            app.fake.step();
        }
    };

    let mut browser = Browser::start(&executable).await;
    let run = tokio::select! {
        run = browser.run_page(&url) => run,
        () = stepper => unreachable!("the page server outlives the page"),
    };
    browser.close().await;
    let r = &run.results;
    let all = shown(&run);
    assert_eq!(r["origin"], page.origin.as_str(), "{all}");
    assert_ne!(r["origin"], app.url.as_str(), "{all}");

    // (a) /generate with x-api-key: the reply, the credits, the request id.
    let generate = &r["generate"];
    assert_eq!(generate["status"], 200, "{all}");
    assert_eq!(generate["json"]["response"], "w0 w1 w2 ", "{all}");
    assert_eq!(generate["credits"], "9", "{all}");
    let generated_id = generate["requestId"].as_str().unwrap_or_default();
    assert!(!generated_id.is_empty(), "no readable x-request-id: {all}");

    // (b) A streamed /chat, read chunk by chunk up to "done": true.
    let stream = &r["stream"];
    assert_eq!(stream["status"], 200, "{all}");
    assert_eq!(stream["contentType"], "application/x-ndjson", "{all}");
    assert_eq!(
        stream["chunks"], 4,
        "three content chunks and the last: {all}"
    );
    assert_eq!(stream["content"], "w0 w1 w2 ", "{all}");
    assert_eq!(stream["done"], true, "{all}");
    assert_eq!(stream["doneReason"], "stop", "{all}");
    assert_eq!(
        stream["after"].as_str().map(str::trim),
        Some(""),
        "nothing after the last chunk: {all}"
    );
    // One step after each chunk but the last; each read of the body had at
    // most one chunk, as the next was not sent yet.
    assert_eq!(stream["steps"], 3, "{all}");
    assert!(stream["reads"].as_u64().unwrap_or(0) >= 4, "{all}");
    assert_eq!(stream["credits"], "8", "{all}");

    // (c) Authorization: Bearer.
    let bearer = &r["bearer"];
    assert_eq!(bearer["status"], 200, "{all}");
    assert_eq!(bearer["json"]["response"], "w0 w1 w2 ", "{all}");
    assert_eq!(bearer["credits"], "7", "{all}");

    // (e) The page's own request id comes back, readable.
    let me = &r["me"];
    assert_eq!(me["status"], 200, "{all}");
    assert_eq!(me["requestId"], "page-chosen.id-1", "{all}");
    assert_eq!(me["json"]["credits"], 7, "{all}");

    // (d) A 402: status, JSON body and headers readable by the page.
    let poor = &r["noCredits"];
    assert_eq!(poor["status"], 402, "{all}");
    assert!(
        poor["json"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "a 402 without a readable error: {all}"
    );
    assert!(poor["requestId"].as_str().is_some(), "{all}");

    // A 401 and a 429 (with Retry-After) are as readable.
    let wrong = &r["wrongKey"];
    assert_eq!(wrong["status"], 401, "{all}");
    assert!(wrong["json"]["error"].as_str().is_some(), "{all}");
    assert_eq!(r["limitedFirst"]["status"], 200, "{all}");
    let limited = &r["limitedSecond"];
    assert_eq!(limited["status"], 429, "{all}");
    assert!(limited["json"]["error"].as_str().is_some(), "{all}");
    let retry_after = limited["retryAfter"].as_str().unwrap_or_default();
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s > 0),
        "Retry-After not readable: {all}"
    );

    // What tollgate did for the page: three charges on the key, and the
    // stream was asked for as a stream.
    app.wait_ledger(KEY, 3).await;
    assert_eq!(app.balance_of(KEY).await.to_string(), "7");
    assert_eq!(
        app.fake.generation_count(),
        4,
        "three for the key, one limited"
    );
    let streamed = app
        .forwarded()
        .into_iter()
        .find(|r| r.path == "/api/chat")
        .expect("the chat was forwarded");
    assert_eq!(streamed.json()["stream"], true);
}

#[tokio::test]
async fn a_page_from_another_origin_is_refused_by_the_browser() {
    let Some(executable) = chromium::available().await else {
        return;
    };
    let allowed = PageServer::start().await;
    let other = PageServer::start().await;
    let app = spawn().var("CORS_ORIGINS", &allowed.origin).start().await;
    let open = spawn().var("CORS_ORIGINS", "*").start().await;

    let mut browser = Browser::start(&executable).await;
    let refused = browser
        .run_page(&other.url(&[("mode", "refused"), ("gate", &app.url), ("key", KEY)]))
        .await;
    let anyone = browser
        .run_page(&other.url(&[("mode", "wildcard"), ("gate", &open.url), ("key", KEY)]))
        .await;
    browser.close().await;

    let r = &refused.results;
    let all = shown(&refused);
    assert_eq!(r["origin"], other.origin.as_str(), "{all}");
    // Refused by the browser: the page's fetch rejects with a TypeError.
    for check in ["preflighted", "simple"] {
        let thrown = r[check]["thrown"].as_str().unwrap_or_default();
        assert!(
            thrown.starts_with("TypeError"),
            "{check}: not refused: {all}"
        );
    }
    // ... for CORS, not because tollgate or the page could not be reached.
    assert_eq!(r["opaque"]["type"], "opaque", "{all}");
    assert_eq!(r["sameOrigin"]["status"], 200, "{all}");
    assert!(
        refused
            .console
            .iter()
            .any(|line| line.contains("blocked by CORS policy")),
        "the browser did not say CORS refused the calls: {all}"
    );
    // The preflighted call never reached the gate's handlers: nothing was
    // forwarded or charged.
    assert_eq!(app.fake.generation_count(), 0);
    assert_eq!(app.balance_of(KEY).await.to_string(), "10");

    // The same page may call a tollgate that allows any origin.
    let w = &anyone.results;
    let all = shown(&anyone);
    for check in ["generate", "bearer"] {
        assert_eq!(w[check]["status"], 200, "{check}: {all}");
        assert_eq!(w[check]["json"]["response"], "w0 w1 w2 ", "{all}");
    }
    assert_eq!(w["bearer"]["credits"], "8", "{all}");
}
