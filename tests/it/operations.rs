//! SPEC §2, §3, §5: rate limits, request ids, metrics and CORS.

use crate::support::fake_ollama::Behavior;
use crate::support::{ollama_error, sample, spawn, Fetch, TestApp, ADMIN, KEY};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::credits::Credits;

fn chat() -> Value {
    json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}], "stream": false})
}

#[tokio::test]
async fn requests_over_the_per_minute_limit_get_429_and_are_neither_forwarded_nor_charged() {
    let app = spawn().var("RATE_LIMIT_RPM", "3").start().await;
    for _ in 0..3 {
        assert_eq!(
            app.keyed("/api/chat")
                .json(&chat())
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let refused = app.keyed("/api/chat").json(&chat()).send().await.unwrap();
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert!(ollama_error(refused, 429).await.contains("rate limit"));
    // OpenAI's shape on /v1.
    let refused = app
        .keyed("/v1/chat/completions")
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(app.fake.generation_count(), 3);
    assert_eq!(app.balance_of(KEY).await, Credits::whole(7));
    // The admin key is never limited.
    for _ in 0..5 {
        let r = app
            .admin(Method::POST, "/api/chat")
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test]
async fn a_per_key_override_replaces_the_default_limit() {
    let app = spawn().var("RATE_LIMIT_RPM", "1").start().await;
    let created: Value = app
        .admin(Method::POST, "/admin/keys")
        .json(&json!({"name": "busy", "credits": 10, "rate_limit_rpm": 4}))
        .fetch_json()
        .await;
    let key = created["key"].as_str().unwrap();
    for _ in 0..4 {
        let r = app
            .post("/api/chat")
            .header("x-api-key", key)
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = app
        .post("/api/chat")
        .header("x-api-key", key)
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
}

#[tokio::test]
async fn concurrent_requests_over_the_limit_get_429_and_do_not_count() {
    let app = spawn().var("MAX_CONCURRENT_PER_KEY", "2").start().await;
    app.fake.set(Behavior {
        hold: true,
        ..Behavior::default()
    });
    let held: Vec<_> = (0..2)
        .map(|_| {
            let request = app.keyed("/api/chat").json(&chat());
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    assert!(app.fake.wait_for_requests(2, Duration::from_secs(5)).await);
    let third = app.keyed("/api/chat").json(&chat()).send().await.unwrap();
    assert_eq!(
        ollama_error(third, 429).await,
        "too many concurrent requests for this key"
    );
    app.fake.release(2);
    for task in held {
        assert_eq!(task.await.unwrap(), 200);
    }
    // The slots are free again, and the refusal cost nothing.
    app.fake.set(Behavior::default());
    assert_eq!(
        app.keyed("/api/chat")
            .json(&chat())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(app.fake.generation_count(), 3);
    assert_eq!(app.balance_of(KEY).await, Credits::whole(7));
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = TestApp::new().await;
    let echoed = app
        .get("/health")
        .header("x-request-id", "trace-123.a_b")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "trace-123.a_b");
    for bad in ["has space", &"x".repeat(65), "semi;colon"] {
        let replaced = app
            .get("/health")
            .header("x-request-id", bad)
            .send()
            .await
            .unwrap();
        let id = replaced.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        assert_ne!(id, bad);
        assert_eq!(id.len(), 16);
    }
    let error = app.post("/api/chat").json(&chat()).send().await.unwrap();
    assert_eq!(error.status(), 401);
    assert!(error.headers().contains_key("x-request-id"));
    // Paths no route takes, and methods a route does not, too.
    let missing = app.get("/no-such-path").send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.headers().contains_key("x-request-id"));
    let wrong_method = app
        .client
        .put(format!("{}/generate", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert!(wrong_method.headers().contains_key("x-request-id"));
    assert_eq!(wrong_method.headers()["allow"], "POST");
    let error: serde_json::Value = wrong_method.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("PUT"), "{error}");
}

#[tokio::test]
async fn metrics_count_requests_rejections_tokens_and_credits() {
    let app = TestApp::new().await;
    let read = || async { app.get("/metrics").fetch_text().await };
    let before = read().await;
    let id = app.key_of(KEY).await.id.to_string();
    app.keyed("/api/chat").json(&chat()).send().await.unwrap();
    app.post("/api/chat")
        .header("x-api-key", "wrong")
        .json(&chat())
        .send()
        .await
        .unwrap();
    app.wait_ledger(KEY, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = read().await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    assert!(
        delta(
            "tollgate_requests_total",
            &[("route", "/api/chat"), ("status", "200")]
        ) >= 1.0
    );
    assert!(delta("tollgate_rejections_total", &[("reason", "401")]) >= 1.0);
    assert!(delta("tollgate_tokens_total", &[("kind", "completion")]) >= 3.0);
    assert!(delta("tollgate_credits_charged_millis_total", &[("key_id", &id)]) >= 1000.0);
    assert!(after.contains("tollgate_upstream_first_byte_seconds"));
    assert!(after.contains("tollgate_overhead_seconds"));
    assert!(!after.contains(KEY), "no secret in metrics");
}

#[tokio::test]
async fn a_model_ollama_does_not_list_is_labelled_other() {
    let app = TestApp::new().await;
    let chosen = "attacker-chosen-label-4242";
    app.keyed("/api/chat")
        .json(&json!({"model": chosen, "messages": []}))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = app.get("/metrics").fetch_text().await;
    assert!(!text.contains(chosen));
}

#[tokio::test]
async fn metrics_can_require_the_admin_key() {
    let app = spawn().var("METRICS_REQUIRE_ADMIN", "true").start().await;
    assert_eq!(app.get("/metrics").send().await.unwrap().status(), 401);
    assert_eq!(
        app.get("/metrics")
            .header("x-api-key", KEY)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let ok = app
        .get("/metrics")
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn cors_allows_the_configured_origins_with_named_headers() {
    let app = spawn()
        .var("CORS_ORIGINS", "http://app.localhost:5173")
        .start()
        .await;
    let preflight = app
        .client
        .request(Method::OPTIONS, format!("{}/generate", app.url))
        .header("origin", "http://app.localhost:5173")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "x-api-key,authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let h = preflight.headers();
    assert_eq!(
        h["access-control-allow-origin"],
        "http://app.localhost:5173"
    );
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for name in ["x-api-key", "authorization", "content-type"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    // A preflight is a response too: it carries an id.
    assert_eq!(h["x-request-id"].len(), 16, "{h:?}");
    // And a client's own sane id, on every response.
    for method in [Method::OPTIONS, Method::POST] {
        let response = app
            .client
            .request(method.clone(), format!("{}/generate", app.url))
            .header("origin", "http://app.localhost:5173")
            .header("access-control-request-method", "POST")
            .header("x-request-id", "page-7")
            .header("x-api-key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-request-id"], "page-7", "{method}");
    }
    // Errors carry the CORS headers too, so a page can read a 402.
    let app_poor = app
        .post("/generate?prompt=hi")
        .header("origin", "http://app.localhost:5173")
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(app_poor.status(), 401);
    assert_eq!(
        app_poor.headers()["access-control-allow-origin"],
        "http://app.localhost:5173"
    );
    let exposed = app_poor.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("x-credits-remaining") && exposed.contains("x-request-id"));
    // Another origin gets no CORS headers.
    let foreign = app
        .post("/generate?prompt=hi")
        .header("origin", "http://evil.localhost")
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert!(!foreign
        .headers()
        .contains_key("access-control-allow-origin"));
}
