//! SPEC §3: where the key comes from, what a wrong one gets, what the
//! admin key may do.

use crate::support::{ollama_error, spawn, Fetch, TestApp, ADMIN, KEY};
use serde_json::{json, Value};
use std::sync::Arc;
use tollgate::auth::keys::hash;
use tollgate::credits::Credits;
use tollgate::store::*;

fn chat_body() -> Value {
    json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}], "stream": false})
}

#[tokio::test]
async fn missing_and_unknown_keys_get_401_and_reach_nothing() {
    let app = TestApp::new().await;
    let missing = app
        .post("/api/chat")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert!(ollama_error(missing, 401).await.contains("missing API key"));
    let unknown = app
        .post("/api/chat")
        .header("x-api-key", "nope")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(ollama_error(unknown, 401).await, "invalid API key");
    let empty_bearer = app
        .post("/api/chat")
        .header("authorization", "Bearer ")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(empty_bearer.status(), 401);
    assert!(app.forwarded().is_empty());
}

#[tokio::test]
async fn bearer_works_and_x_api_key_wins_even_when_wrong() {
    let app = TestApp::new().await;
    let bearer = app
        .post("/api/chat")
        .header("authorization", format!("Bearer {KEY}"))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    let both = app
        .post("/api/chat")
        .header("x-api-key", "wrong")
        .header("authorization", format!("Bearer {KEY}"))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), 401);
}

#[tokio::test]
async fn the_key_host_and_origin_never_reach_ollama() {
    let app = TestApp::new().await;
    let response = app
        .post("/api/chat")
        .header("x-api-key", KEY)
        .header("authorization", "Bearer something-else")
        .header("origin", "https://app.example.com")
        .header("x-trace", "kept")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    // The fake answers 403 to foreign Host/Origin values, as Ollama does.
    assert_eq!(response.status(), 200);
    let seen = app.forwarded().pop().unwrap();
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("origin"), None);
    assert_eq!(seen.header("x-trace"), Some("kept"));
    let host = seen.header("host").unwrap();
    assert_eq!(host, app.fake.addr().to_string());
}

#[tokio::test]
async fn admin_only_paths_are_403_for_ordinary_keys_and_open_to_admin() {
    let app = TestApp::new().await;
    for (method, path) in [
        (reqwest::Method::POST, "/api/pull"),
        (reqwest::Method::POST, "/api/create"),
        (reqwest::Method::POST, "/api/copy"),
        (reqwest::Method::DELETE, "/api/delete"),
        (reqwest::Method::POST, "/api/blobs/sha256:abc"),
        (reqwest::Method::POST, "/api/some-future-endpoint"),
        (reqwest::Method::GET, "/admin/keys"),
    ] {
        let response = app
            .client
            .request(method.clone(), format!("{}{path}", app.url))
            .header("x-api-key", KEY)
            .json(&json!({"model": "mistral"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
    }
    assert!(app.forwarded().is_empty());

    let pull = app
        .admin(reqwest::Method::POST, "/api/pull")
        .json(&json!({"model": "mistral"}))
        .send()
        .await
        .unwrap();
    assert_eq!(pull.status(), 200);
    let text = pull.text().await.unwrap();
    assert!(
        text.trim_end().ends_with(r#"{"status":"success"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn admin_keys_are_neither_charged_nor_refused_for_credits_but_recorded() {
    let app = spawn().var("API_KEY_CREDITS", "0").start().await;
    for _ in 0..3 {
        let response = app
            .admin(reqwest::Method::POST, "/api/chat")
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("x-credits-remaining").is_none());
    }
    let rows = app.wait_ledger(ADMIN, 3).await;
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r.record.credits == tollgate::credits::Credits::ZERO));
    let me: Value = app.get("/me").header("x-api-key", ADMIN).fetch_json().await;
    assert_eq!(me["role"], "admin");
    assert_eq!(me["credits"], Value::Null);
    // The ordinary key with no credits is refused.
    let poor = app
        .keyed("/api/chat")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(poor.status(), 402);
}

#[tokio::test]
async fn repeated_wrong_keys_get_429_but_a_key_at_work_still_works() {
    // Two valid keys: KEY, at work from this address, and one a guesser
    // would be after.
    let app = spawn()
        .var("AUTH_FAILURES_PER_MINUTE", "5")
        .var("API_KEYS", "target=10")
        .start()
        .await;
    let wrong = || {
        app.post("/api/chat")
            .header("x-api-key", "guess")
            .json(&chat_body())
            .send()
    };
    let with_target = || {
        app.post("/api/chat")
            .header("x-api-key", "target")
            .json(&chat_body())
            .send()
    };
    // A valid key (used before any wrong key, which nobody notes).
    assert_eq!(with_target().await.unwrap().status(), 200);
    assert_eq!(wrong().await.unwrap().status(), 401);
    // KEY is used from here after that first wrong key.
    let at_work = app
        .keyed("/api/chat")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(at_work.status(), 200);
    for _ in 0..4 {
        assert_eq!(wrong().await.unwrap().status(), 401);
    }
    // A missing key does not count, and is still a 401.
    let r = app
        .post("/api/chat")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let blocked = wrong().await.unwrap();
    assert_eq!(blocked.status(), 429);
    let retry: u64 = blocked.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    // The key at work goes on.
    let valid = app
        .keyed("/api/chat")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(valid.status(), 200);
    // A right guess now gets what a wrong one gets: guessing learns
    // nothing more once the limit is reached.
    assert_eq!(with_target().await.unwrap().status(), 429);
    assert_eq!(app.fake.generation_count(), 3);
}

/// A store whose lookups of the given hashes wait until all of them are
/// under way: requests whose key checks overlap, as a guesser sending many
/// at once would have them.
struct LookupsTogether {
    inner: SharedStore,
    hashes: Vec<KeyHash>,
    barrier: tokio::sync::Barrier,
}

#[async_trait::async_trait]
impl Store for LookupsTogether {
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        if self.hashes.contains(hash) {
            self.barrier.wait().await;
        }
        self.inner.key_by_hash(hash).await
    }
    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.key(id).await
    }
    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.keys().await
    }
    async fn create_key(&self, new: NewKey) -> Result<KeyRecord, StoreError> {
        self.inner.create_key(new).await
    }
    async fn update_key(&self, id: KeyId, patch: KeyPatch) -> Result<KeyRecord, StoreError> {
        self.inner.update_key(id, patch).await
    }
    async fn revoke_key(&self, id: KeyId, at: Millis) -> Result<KeyRecord, StoreError> {
        self.inner.revoke_key(id, at).await
    }
    async fn adjust(&self, id: KeyId, adjustment: Adjustment) -> Result<Credits, StoreError> {
        self.inner.adjust(id, adjustment).await
    }
    async fn sync_grants(&self, grants: &[Grant]) -> Result<GrantReport, StoreError> {
        self.inner.sync_grants(grants).await
    }
    async fn reserve(&self, id: KeyId, amount: Credits) -> Result<Credits, StoreError> {
        self.inner.reserve(id, amount).await
    }
    async fn settle(&self, usage: UsageRecord, reserved: Credits) -> Result<Credits, StoreError> {
        self.inner.settle(usage, reserved).await
    }
    async fn usage(
        &self,
        key: Option<KeyId>,
        page: PageRequest,
    ) -> Result<Vec<UsageEntry>, StoreError> {
        self.inner.usage(key, page).await
    }
    async fn usage_totals(&self, id: KeyId) -> Result<UsageTotals, StoreError> {
        self.inner.usage_totals(id).await
    }
    async fn adjustments(&self, id: KeyId) -> Result<Vec<AdjustmentEntry>, StoreError> {
        self.inner.adjustments(id).await
    }
    async fn release_stale_reservations(&self) -> Result<(), StoreError> {
        self.inner.release_stale_reservations().await
    }
}

/// Guesses sent all at once (their key lookups under way together, so that
/// none found the address over the limit when it came in) get no more
/// answers than the limit: the rest get 429. (A right guess among them gets
/// 429 too once the limit is reached: the throttle's unit tests.)
#[tokio::test]
async fn guesses_sent_at_once_get_no_more_answers_than_the_limit() {
    let secrets: Vec<String> = (0..40).map(|n| format!("guess-{n}")).collect();
    let store = Arc::new(LookupsTogether {
        inner: Arc::new(tollgate::store::memory::MemoryStore::default()),
        hashes: secrets.iter().map(hash).collect(),
        barrier: tokio::sync::Barrier::new(secrets.len()),
    });
    let app = spawn()
        .var("AUTH_FAILURES_PER_MINUTE", "5")
        .store(store)
        .start()
        .await;
    let requests = secrets.iter().map(|secret| {
        app.post("/api/chat")
            .header("x-api-key", secret)
            .json(&chat_body())
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    let count = |status| statuses.iter().filter(|s| **s == status).count();
    assert_eq!(count(401), 5, "{statuses:?}");
    assert_eq!(count(429), 35, "{statuses:?}");
    assert_eq!(app.fake.generation_count(), 0);
}

#[tokio::test]
async fn a_revoked_key_gets_401() {
    let app = TestApp::new().await;
    let id = app.key_of(KEY).await.id;
    let revoke = app
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    let response = app
        .keyed("/api/chat")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

/// A blank `x-api-key` presents no key: it is not counted as a wrong one,
/// and a Bearer key beside it is read.
#[tokio::test]
async fn a_blank_x_api_key_is_no_key() {
    let app = spawn().var("AUTH_FAILURES_PER_MINUTE", "2").start().await;
    for _ in 0..4 {
        let r = app
            .post("/api/chat")
            .header("x-api-key", "")
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let error: Value = r.json().await.unwrap();
        assert!(
            error["error"].as_str().unwrap().contains("missing"),
            "{error}"
        );
    }
    let r = app
        .post("/api/chat")
        .header("x-api-key", " ")
        .header("authorization", format!("Bearer {KEY}"))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A configured key may be any string: one beyond ASCII works when sent
/// as its UTF-8 bytes, in either header.
#[tokio::test]
async fn a_configured_key_beyond_ascii_works() {
    let app = spawn().var("API_KEY", "clé-secrète").start().await;
    let value = reqwest::header::HeaderValue::from_bytes("clé-secrète".as_bytes()).unwrap();
    let bearer = reqwest::header::HeaderValue::from_bytes("Bearer clé-secrète".as_bytes()).unwrap();
    for (name, value) in [("x-api-key", value), ("authorization", bearer)] {
        let r = app
            .post("/api/chat")
            .header(name, value)
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
    }
}
