//! SPEC §5: `/me`, `/usage` and the admin API.

use crate::support::{ollama_error, Fetch, TestApp, KEY};
use reqwest::Method;
use serde_json::{json, Value};
use tollgate::credits::Credits;

#[tokio::test]
async fn me_shows_credits_and_usage_totals() {
    let app = TestApp::new().await;
    for _ in 0..2 {
        app.keyed("/generate?prompt=hi").send().await.unwrap();
    }
    app.wait_ledger(KEY, 2).await;
    let me: Value = app.get("/me").header("x-api-key", KEY).fetch_json().await;
    assert_eq!(me["credits"], 8);
    assert_eq!(me["role"], "user");
    assert_eq!(
        me["usage"],
        json!({"requests": 2, "prompt_tokens": 14, "completion_tokens": 6, "credits_spent": 2})
    );
    assert!(me["id"].is_i64());
    assert_eq!(app.get("/me").send().await.unwrap().status(), 401);
}

#[tokio::test]
async fn usage_pages_newest_first_with_a_cursor() {
    let app = TestApp::new().await;
    for i in 0..5 {
        app.keyed(&format!("/generate?prompt=p{i}"))
            .send()
            .await
            .unwrap();
    }
    app.wait_ledger(KEY, 5).await;
    let first: Value = app
        .get("/usage?limit=2")
        .header("x-api-key", KEY)
        .fetch_json()
        .await;
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let item = &first["items"][0];
    for field in [
        "time",
        "endpoint",
        "model",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "credits",
        "duration_ms",
    ] {
        assert!(item.get(field).is_some(), "{field} missing from {item}");
    }
    assert_eq!(item["endpoint"], "/generate");
    assert_eq!(item["model"], "mistral");
    assert_eq!(item["credits"], 1);
    // RFC 3339 in UTC, always with milliseconds: 2026-11-21T22:41:28.120Z.
    let time = item["time"].as_str().unwrap().as_bytes();
    assert_eq!(time.len(), 24, "{item}");
    assert_eq!((time[10], time[19], time[23]), (b'T', b'.', b'Z'), "{item}");
    assert!(time[20..23].iter().all(u8::is_ascii_digit), "{item}");
    let mut seen = 2;
    let mut next = first["next"].as_str().unwrap().to_string();
    loop {
        let page: Value = app
            .get(&format!("/usage?limit=2&cursor={next}"))
            .header("x-api-key", KEY)
            .fetch_json()
            .await;
        seen += page["items"].as_array().unwrap().len();
        match page["next"].as_str() {
            Some(n) => next = n.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, 5);
}

#[tokio::test]
async fn the_admin_api_manages_keys() {
    let app = TestApp::new().await;
    let created = app
        .admin(Method::POST, "/admin/keys")
        .json(
            &json!({"name": "alice", "credits": 2.5, "models": ["mistral"], "rate_limit_rpm": 60}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let secret = created["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("tg_"));
    assert_eq!(created["credits"], 2.5);
    let id = created["id"].as_i64().unwrap();

    // The new key works.
    let me: Value = app
        .get("/me")
        .header("x-api-key", &secret)
        .fetch_json()
        .await;
    assert_eq!(me["name"], "alice");

    // Listing never shows a secret or a hash.
    let list = app.admin(Method::GET, "/admin/keys").fetch_text().await;
    assert!(!list.contains(&secret));
    assert!(!list.contains(&tollgate::auth::keys::hash(&secret).0));
    let list: Value = serde_json::from_str(&list).unwrap();
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["name"] == "alice"));

    let topped: Value = app
        .admin(Method::POST, &format!("/admin/keys/{id}/credits"))
        .json(&json!({"add": 10, "reason": "invoice 7"}))
        .fetch_json()
        .await;
    assert_eq!(topped["credits"], 12.5);
    let set: Value = app
        .admin(Method::POST, &format!("/admin/keys/{id}/credits"))
        .json(&json!({"set": 3}))
        .fetch_json()
        .await;
    assert_eq!(set["credits"], 3);
    let adjustments = app.store.adjustments(id).await.unwrap();
    let deltas: Vec<Credits> = adjustments.iter().map(|a| a.delta).collect();
    assert_eq!(
        deltas,
        vec![
            Credits::from_millis(2500),
            Credits::whole(10),
            Credits::from_millis(-9500)
        ]
    );
    assert_eq!(adjustments[1].reason, "invoice 7");

    let patched: Value = app
        .admin(Method::PATCH, &format!("/admin/keys/{id}"))
        .json(&json!({"name": "alice2", "models": null, "max_concurrent": 2}))
        .fetch_json()
        .await;
    assert_eq!(patched["name"], "alice2");
    assert_eq!(patched["models"], Value::Null);
    assert_eq!(patched["max_concurrent"], 2);
    assert_eq!(patched["rate_limit_rpm"], 60);

    let one: Value = app
        .admin(Method::GET, &format!("/admin/keys/{id}"))
        .fetch_json()
        .await;
    assert_eq!(one["usage"]["requests"], 0);

    let revoked = app
        .admin(Method::DELETE, &format!("/admin/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    assert_eq!(
        app.get("/me")
            .header("x-api-key", &secret)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

#[tokio::test]
async fn admin_api_bad_input() {
    let app = TestApp::new().await;
    for (method, path, body) in [
        (Method::POST, "/admin/keys", "{oops"),
        (Method::POST, "/admin/keys", r#"{"credits": 5}"#),
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": "x", "credits": "5"}"#,
        ),
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": "x", "credits": 1.0001}"#,
        ),
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": "x", "role": "root"}"#,
        ),
        (
            Method::POST,
            "/admin/keys/1/credits",
            r#"{"add": 1, "set": 2}"#,
        ),
        (Method::POST, "/admin/keys/1/credits", r#"{}"#),
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": " ", "credits": 1}"#,
        ),
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": "x", "credits": -5}"#,
        ),
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": "x", "models": [""]}"#,
        ),
        (Method::PATCH, "/admin/keys/1", r#"{"name": ""}"#),
        // PATCH checks what create checks; a name cannot be cleared.
        (Method::PATCH, "/admin/keys/1", r#"{"models": [""]}"#),
        (Method::PATCH, "/admin/keys/1", r#"{"name": null}"#),
        // A limit of 0 would block a key for good (or, for the rate, lift
        // the default): a limit is at least 1, null is the default.
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": "x", "rate_limit_rpm": 0}"#,
        ),
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": "x", "max_concurrent": 0}"#,
        ),
        (Method::PATCH, "/admin/keys/1", r#"{"rate_limit_rpm": 0}"#),
        (Method::PATCH, "/admin/keys/1", r#"{"max_concurrent": 0}"#),
        // Amounts beyond a trillion credits.
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": "x", "credits": 9223372036854775}"#,
        ),
        (
            Method::POST,
            "/admin/keys/1/credits",
            r#"{"add": 1000000000000.001}"#,
        ),
        (
            Method::POST,
            "/admin/keys/1/credits",
            r#"{"set": -9223372036854775}"#,
        ),
    ] {
        let response = app
            .admin(method.clone(), path)
            .body(body)
            .send()
            .await
            .unwrap();
        ollama_error(response, 400).await;
    }
    let missing = app
        .admin(Method::POST, "/admin/keys/999/credits")
        .json(&json!({"add": 1}))
        .send()
        .await
        .unwrap();
    ollama_error(missing, 404).await;
    let missing = app
        .admin(Method::GET, "/admin/keys/abc")
        .send()
        .await
        .unwrap();
    ollama_error(missing, 404).await;
    // A body too large for the admin API is refused in JSON too.
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(2 * 1024 * 1024));
    let response = app
        .admin(Method::POST, "/admin/keys")
        .body(huge)
        .send()
        .await
        .unwrap();
    ollama_error(response, 413).await;
    // The balance stays where it was, and within range on repeated adds.
    let before = app.key_of(KEY).await;
    let add = |n: &'static str| {
        app.admin(Method::POST, &format!("/admin/keys/{}/credits", before.id))
            .body(format!(r#"{{"add": {n}}}"#))
            .send()
    };
    assert_eq!(add("999999999000").await.unwrap().status(), 200);
    ollama_error(add("1000").await.unwrap(), 400).await;
    let after = app.key_of(KEY).await;
    assert_eq!(
        after.balance,
        before.balance + "999999999000".parse().unwrap()
    );
}

#[tokio::test]
async fn admin_usage_exports_csv_and_ndjson() {
    let app = TestApp::new().await;
    for _ in 0..3 {
        app.keyed("/generate?prompt=hi").send().await.unwrap();
    }
    app.wait_ledger(KEY, 3).await;
    let id = app.key_of(KEY).await.id;
    let page: Value = app
        .admin(Method::GET, &format!("/admin/usage?key={id}"))
        .fetch_json()
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    assert_eq!(page["items"][0]["key_id"], id);
    let csv = app
        .admin(Method::GET, "/admin/usage?format=csv")
        .fetch_text()
        .await;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "time,key_id,endpoint,model,status,prompt_tokens,completion_tokens,credits,duration_ms"
    );
    assert_eq!(lines.len(), 4);
    assert!(
        lines[1].contains(",/generate,mistral,200,7,3,1,"),
        "{}",
        lines[1]
    );
    let ndjson = app
        .admin(Method::GET, "/admin/usage?format=ndjson")
        .fetch_text()
        .await;
    assert_eq!(ndjson.lines().count(), 3);
    let bad = app
        .admin(Method::GET, "/admin/usage?format=xml")
        .send()
        .await
        .unwrap();
    ollama_error(bad, 400).await;
}

#[tokio::test]
async fn an_export_longer_than_a_page_is_whole_and_in_order() {
    // The export is read a page (1,000 rows) at a time as the client takes
    // it: page boundaries must lose and repeat nothing.
    let app = TestApp::new().await;
    let id = app.key_of(KEY).await.id;
    let rows = 2_345u64;
    for n in 0..rows {
        let record = tollgate::store::UsageRecord {
            time: 1,
            key_id: id,
            endpoint: "/api/chat".into(),
            model: Some("mistral".into()),
            status: 200,
            prompt_tokens: 0,
            completion_tokens: 0,
            credits: Credits::ZERO,
            duration_ms: n,
        };
        app.store.settle(record, Credits::ZERO).await.unwrap();
    }
    let csv = app
        .admin(Method::GET, "/admin/usage?format=csv")
        .fetch_text()
        .await;
    let durations: Vec<u64> = csv
        .lines()
        .skip(1)
        .map(|line| line.rsplit(',').next().unwrap().parse().unwrap())
        .collect();
    assert!(csv.starts_with("time,key_id,"));
    assert_eq!(durations, (0..rows).rev().collect::<Vec<_>>());
    let ndjson = app
        .admin(Method::GET, &format!("/admin/usage?format=ndjson&key={id}"))
        .fetch_text()
        .await;
    let durations: Vec<u64> = ndjson
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["duration_ms"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(durations, (0..rows).rev().collect::<Vec<_>>());
}
