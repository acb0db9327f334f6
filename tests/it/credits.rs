//! SPEC §4: atomic reservations, and settlement on every path.

use crate::support::fake_ollama::Behavior;
use crate::support::{
    blob_path, ollama_error, panicking_hook, sample, spawn, Fetch, TestApp, ADMIN, KEY,
};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::credits::Credits;

fn generate(stream: bool) -> Value {
    json!({"model": "mistral", "prompt": "hi", "stream": stream})
}

/// 100 concurrent requests against 10 credits: exactly 10 reach Ollama.
///
/// The fake holds every admitted request at a barrier until all 100 have
/// been answered or admitted, so the admitted ones really overlap. A store
/// that checks the balance and decrements it in two steps (read 10, admit;
/// read 10, admit; ...) would let more than 10 through here, because every
/// reader sees the balance before any settlement lowered it —
/// `a_check_then_decrement_store_would_overspend` shows exactly that.
#[tokio::test]
async fn concurrent_requests_never_overspend() {
    let app = TestApp::new().await;
    app.fake.set(Behavior {
        hold: true,
        ..Behavior::default()
    });
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let request = app.keyed("/api/generate").json(&generate(false));
        tasks.push(tokio::spawn(async move {
            request.send().await.unwrap().status().as_u16()
        }));
    }
    // The 90 refusals come back while the 10 are still held.
    assert!(
        app.fake
            .wait_for_requests(10, Duration::from_secs(10))
            .await
    );
    let mut refused = 0;
    let mut pending = Vec::new();
    for task in tasks {
        if task.is_finished() {
            let status = task.await.unwrap();
            assert_eq!(status, 402);
            refused += 1;
        } else {
            pending.push(task);
        }
    }
    app.fake.release(100);
    let mut ok = 0;
    for task in pending {
        match task.await.unwrap() {
            200 => ok += 1,
            402 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(refused, 90);
    assert_eq!(app.fake.generation_count(), 10);
    assert_eq!(app.balance_of(KEY).await, Credits::ZERO);
}

/// The companion to the test above: a store that checks then decrements in
/// two steps lets more than the balance through under the same load.
#[tokio::test]
async fn a_check_then_decrement_store_would_overspend() {
    let store = std::sync::Arc::new(racy::CheckThenDecrement::default());
    let app = spawn().store(store).start().await;
    app.fake.set(Behavior {
        hold: true,
        ..Behavior::default()
    });
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let request = app.keyed("/api/generate").json(&generate(false));
        tasks.push(tokio::spawn(async move {
            request.send().await.unwrap().status().as_u16()
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.fake.release(1000);
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        app.fake.generation_count() > 10,
        "the racy store let {} through",
        app.fake.generation_count()
    );
}

mod racy {
    //! A deliberately wrong store: it reads the balance, yields, then
    //! decrements — the race the real stores close.
    use async_trait::async_trait;
    use tollgate::credits::Credits;
    use tollgate::store::memory::MemoryStore;
    use tollgate::store::*;

    #[derive(Default)]
    pub struct CheckThenDecrement(MemoryStore);

    #[async_trait]
    impl Store for CheckThenDecrement {
        async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
            self.0.key_by_hash(hash).await
        }
        async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
            self.0.key(id).await
        }
        async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
            self.0.keys().await
        }
        async fn create_key(&self, new: NewKey) -> Result<KeyRecord, StoreError> {
            self.0.create_key(new).await
        }
        async fn update_key(&self, id: KeyId, patch: KeyPatch) -> Result<KeyRecord, StoreError> {
            self.0.update_key(id, patch).await
        }
        async fn revoke_key(&self, id: KeyId, at: Millis) -> Result<KeyRecord, StoreError> {
            self.0.revoke_key(id, at).await
        }
        async fn adjust(&self, id: KeyId, adjustment: Adjustment) -> Result<Credits, StoreError> {
            self.0.adjust(id, adjustment).await
        }
        async fn sync_grants(&self, grants: &[Grant]) -> Result<GrantReport, StoreError> {
            self.0.sync_grants(grants).await
        }
        async fn reserve(&self, id: KeyId, amount: Credits) -> Result<Credits, StoreError> {
            let balance = self
                .0
                .key(id)
                .await?
                .ok_or(StoreError::NoSuchKey(id))?
                .balance;
            if balance < amount {
                return Err(StoreError::InsufficientCredits { available: balance });
            }
            tokio::task::yield_now().await;
            self.0
                .adjust(
                    id,
                    Adjustment {
                        change: BalanceChange::Add(-amount),
                        actor: "racy".into(),
                        reason: "reserve".into(),
                    },
                )
                .await
        }
        async fn settle(
            &self,
            usage: UsageRecord,
            _reserved: Credits,
        ) -> Result<Credits, StoreError> {
            Ok(self
                .0
                .key(usage.key_id)
                .await?
                .map(|k| k.balance)
                .unwrap_or_default())
        }
        async fn usage(
            &self,
            key: Option<KeyId>,
            page: PageRequest,
        ) -> Result<Vec<UsageEntry>, StoreError> {
            self.0.usage(key, page).await
        }
        async fn usage_totals(&self, id: KeyId) -> Result<UsageTotals, StoreError> {
            self.0.usage_totals(id).await
        }
        async fn adjustments(&self, id: KeyId) -> Result<Vec<AdjustmentEntry>, StoreError> {
            self.0.adjustments(id).await
        }
        async fn release_stale_reservations(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }
}

#[tokio::test]
async fn ollama_down_is_502_naming_the_url_and_costs_nothing() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let app = spawn().var("OLLAMA_URL", &url).start().await;
    let response = app
        .keyed("/api/generate")
        .json(&generate(false))
        .send()
        .await
        .unwrap();
    // A metered response: it tells the balance, after the refund.
    assert_eq!(response.headers()["x-credits-remaining"], "10");
    let message = ollama_error(response, 502).await;
    assert!(message.contains(&url), "{message}");
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows[0].record.status, 502);
    assert_eq!(rows[0].record.credits, Credits::ZERO);
    assert_eq!(app.balance_of(KEY).await, Credits::whole(10));
}

#[tokio::test]
async fn ollama_too_slow_is_504_and_costs_nothing() {
    let app = spawn()
        .var("OLLAMA_FIRST_BYTE_TIMEOUT_SECS", "1")
        .start()
        .await;
    app.fake.set(Behavior {
        head_delay: Duration::from_secs(3),
        ..Behavior::default()
    });
    let response = app
        .keyed("/api/generate")
        .json(&generate(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-credits-remaining"], "10");
    let message = ollama_error(response, 504).await;
    assert!(message.contains("did not answer"), "{message}");
    assert_eq!(app.wait_ledger(KEY, 1).await[0].record.status, 504);
    assert_eq!(app.balance_of(KEY).await, Credits::whole(10));
}

/// A blob upload streamed at the client's pace takes longer than the
/// first-byte limit: the limit starts anew with every piece that leaves,
/// still applies to Ollama's answer after the last one, and ends an
/// upload that stalls for longer than it.
#[tokio::test]
async fn the_first_byte_limit_starts_after_a_slow_upload() {
    let app = spawn()
        .var("OLLAMA_FIRST_BYTE_TIMEOUT_SECS", "1")
        .start()
        .await;
    let piece = vec![7u8; 4096];
    let pieces = 8;
    let blob = piece.repeat(pieces);
    let path = blob_path(&blob);
    // 8 pieces 250 ms apart (the last leaves after 1.75 s), or with a
    // pause of 2.5 s before the fifth.
    let sent_in_pieces = |stall_before: Option<usize>| {
        let piece = bytes::Bytes::from(piece.clone());
        let stream = futures_util::stream::iter(0..pieces).then(move |i| {
            let piece = piece.clone();
            async move {
                let pause = match i {
                    0 => 0,
                    i if Some(i) == stall_before => 2500,
                    _ => 250,
                };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                Ok::<_, std::io::Error>(piece)
            }
        });
        reqwest::Body::wrap_stream(stream)
    };
    let slowly = || sent_in_pieces(None);
    let uploaded = app
        .admin(reqwest::Method::POST, &path)
        .body(slowly())
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), 201);
    assert_eq!(app.forwarded().pop().unwrap().body.len(), blob.len());

    app.fake.set(Behavior {
        head_delay: Duration::from_secs(3),
        ..Behavior::default()
    });
    let started = std::time::Instant::now();
    let stalled = app
        .admin(reqwest::Method::POST, &path)
        .body(slowly())
        .send()
        .await
        .unwrap();
    let message = ollama_error(stalled, 504).await;
    assert!(message.contains("did not answer"), "{message}");
    // Not before the body was sent whole (1.75 s) and waited for (1 s).
    assert!(started.elapsed() >= Duration::from_millis(2700));

    app.fake.set(Behavior::default());
    let forwarded = app.forwarded().len();
    let stalled = app
        .admin(reqwest::Method::POST, &path)
        .body(sent_in_pieces(Some(4)))
        .send()
        .await
        .unwrap();
    let message = ollama_error(stalled, 504).await;
    assert!(message.contains("did not answer"), "{message}");
    // Ollama never got the whole blob.
    assert!(app.forwarded()[forwarded..]
        .iter()
        .all(|seen| seen.body.len() < blob.len()));
}

/// A client that goes away in the middle of a streamed upload: the
/// request is recorded as the client's failure (400), not Ollama's (502).
#[tokio::test]
async fn an_upload_the_client_breaks_off_is_recorded_as_its_failure() {
    let app = TestApp::new().await;
    let path = format!("/api/blobs/sha256:{}", "ab".repeat(32));
    let pieces = futures_util::stream::iter(0..3).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if i < 2 {
            Ok(bytes::Bytes::from(vec![1u8; 4096]))
        } else {
            Err(std::io::Error::other("the client gave up"))
        }
    });
    let sent = app
        .admin(reqwest::Method::POST, &path)
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await;
    assert!(sent.is_err() || sent.is_ok_and(|r| r.status() == 400));
    let rows = app.wait_ledger(ADMIN, 1).await;
    assert_eq!(rows[0].record.endpoint, path);
    assert_eq!(rows[0].record.status, 400);
    assert_eq!(rows[0].record.credits, Credits::ZERO);
}

#[tokio::test]
async fn ollamas_own_errors_pass_through_unchanged_and_cost_nothing() {
    let app = TestApp::new().await;
    let unknown = app
        .keyed("/api/generate")
        .json(&json!({"model": "nosuch", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ollama_error(unknown, 404).await, "model 'nosuch' not found");

    app.fake.set(Behavior {
        fail: Some((
            503,
            "server busy, please try again.  maximum pending requests exceeded".into(),
        )),
        ..Behavior::default()
    });
    let busy = app
        .keyed("/api/chat")
        .json(&json!({"model": "mistral", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ollama_error(busy, 503).await,
        "server busy, please try again.  maximum pending requests exceeded"
    );
    let rows = app.wait_ledger(KEY, 2).await;
    assert!(rows.iter().all(|r| r.record.credits == Credits::ZERO));
    assert_eq!(app.balance_of(KEY).await, Credits::whole(10));
}

/// Ollama serves generations with POST only. Another method on their paths
/// is denied to an ordinary key (403, as any path Ollama might serve one
/// day and nobody has priced), before any reservation: a key without
/// credits is not told 402 for a request that could never generate, and
/// nothing is forwarded or charged. The admin key's reaches Ollama, whose
/// answer (its fake: gin's 405) is passed on.
#[tokio::test]
async fn other_methods_on_generation_paths_are_denied_before_any_reservation() {
    let app = spawn().var("API_KEY_CREDITS", "0").start().await;
    let paths = [
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    ];
    for path in paths {
        let got = app
            .client
            .get(format!("{}{}", app.url, path))
            .header("x-api-key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), 403, "GET {path}");
    }
    let put = app
        .client
        .put(format!("{}/api/chat", app.url))
        .header("x-api-key", KEY)
        .json(&json!({"model": "mistral", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 403);
    assert!(app.forwarded().is_empty());
    assert_eq!(app.balance_of(KEY).await, Credits::ZERO);
    let admin = app
        .admin(reqwest::Method::GET, "/api/chat")
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 405);
    assert_eq!(admin.text().await.unwrap(), "405 method not allowed");
    // The same key is still refused a generation for want of credits.
    let post = app
        .keyed("/api/chat")
        .json(&json!({"model": "mistral", "messages": []}));
    assert_eq!(post.send().await.unwrap().status(), 402);
}

#[tokio::test]
async fn death_mid_stream_charges_what_was_relayed_and_ends_with_an_error_line() {
    let app = spawn()
        .var("CREDITS_PER_1K_COMPLETION_TOKENS", "1000")
        .var("CREDITS_PER_REQUEST", "1")
        .start()
        .await;
    app.fake.set(Behavior {
        chunks: 10,
        die_after: Some(4),
        ..Behavior::default()
    });
    let response = app
        .keyed("/api/generate")
        .json(&json!({"model": "mistral", "prompt": "hi", "options": {"num_predict": 5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[4]["error"]
        .as_str()
        .unwrap()
        .contains("broke mid-stream"));
    let rows = app.wait_ledger(KEY, 1).await;
    // 1 credit for the request + 4 relayed chunks counted as tokens at 1 each.
    assert_eq!(rows[0].record.completion_tokens, 4);
    assert_eq!(rows[0].record.credits, Credits::whole(5));
    assert_eq!(app.balance_of(KEY).await, Credits::whole(5));
}

#[tokio::test]
async fn token_pricing_charges_ollamas_counts() {
    let app = spawn()
        .var("API_KEY_CREDITS", "100")
        .var("CREDITS_PER_REQUEST", "0.5")
        .var("CREDITS_PER_1K_PROMPT_TOKENS", "1")
        .var("CREDITS_PER_1K_COMPLETION_TOKENS", "2")
        .start()
        .await;
    app.fake.set(Behavior {
        chunks: 5,
        prompt_eval_count: 11,
        ..Behavior::default()
    });
    let response = app
        .keyed("/api/generate")
        .json(&generate(true))
        .send()
        .await
        .unwrap();
    // Streamed: the header shows the balance net of the reservation
    // (0.5 + 512 default tokens at 0.002 = 1.524).
    assert_eq!(response.headers()["x-credits-remaining"], "98.476");
    response.text().await.unwrap();
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(
        (
            rows[0].record.prompt_tokens,
            rows[0].record.completion_tokens
        ),
        (11, 5)
    );
    // 0.5 + 11 * 0.001 + 5 * 0.002 = 0.521
    assert_eq!(rows[0].record.credits, Credits::from_millis(521));
    let response = app
        .keyed("/api/generate")
        .json(&generate(false))
        .send()
        .await
        .unwrap();
    // Non-streamed: the balance after settlement.
    assert_eq!(response.headers()["x-credits-remaining"], "98.958");
}

#[tokio::test]
async fn a_panic_inside_a_request_still_settles_its_reservation() {
    let app = spawn()
        .var("API_KEY_CREDITS", "1")
        .hooks(panicking_hook())
        .start()
        .await;
    let response = app
        .keyed("/api/generate")
        .json(&generate(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows.len(), 1, "the guard recorded the request");
    assert_eq!(rows[0].record.credits, Credits::ZERO);
    assert_eq!(rows[0].record.status, 500, "the status the client got");
    // The reservation was released: the single credit is available again.
    assert_eq!(
        app.store
            .reserve(app.key_of(KEY).await.id, Credits::whole(1))
            .await
            .unwrap(),
        Credits::ZERO
    );
}

#[tokio::test]
async fn a_client_that_hangs_up_is_settled_for_what_it_got() {
    let app = TestApp::new().await;
    app.fake.set(Behavior {
        chunks: 50,
        chunk_delay: Duration::from_millis(20),
        ..Behavior::default()
    });
    let response = app
        .keyed("/api/generate")
        .json(&generate(true))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    assert!(
        app.fake.wait_disconnect(Duration::from_secs(1)).await,
        "Ollama saw the hang-up"
    );
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].record.credits, Credits::whole(1));
    assert!(rows[0].record.completion_tokens >= 1);
}

/// A client that goes away while Ollama has not answered yet: nothing
/// reached it, nothing is charged, and the ledger row says the client
/// closed the request (499, as nginx says it), not a status nobody sent.
#[tokio::test]
async fn a_client_that_hangs_up_before_ollama_answers_is_recorded_as_499() {
    let app = TestApp::new().await;
    app.fake.set(Behavior {
        head_delay: Duration::from_secs(2),
        ..Behavior::default()
    });
    let gave_up = app
        .keyed("/api/generate")
        .timeout(Duration::from_millis(300))
        .json(&generate(false))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client gave up before the answer");
    let rows = app.wait_ledger(KEY, 1).await;
    assert_eq!(rows[0].record.status, 499);
    assert_eq!(rows[0].record.credits, Credits::ZERO);
    assert_eq!(app.balance_of(KEY).await, Credits::whole(10));
    // The log and the metrics say the same (the metrics are the process's,
    // and no other test ends a request so).
    let counted = || async {
        let text = app.get("/metrics").fetch_text().await;
        let labels = [("route", "/api/generate"), ("status", "499")];
        sample(&text, "tollgate_requests_total", &labels) >= 1.0
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !counted().await {
        assert!(
            std::time::Instant::now() < deadline,
            "no request counted with 499"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An Ollama whose listen queue is full never completes the TCP handshake:
/// the connect limit answers 502 and nothing is charged.
#[tokio::test]
async fn an_ollama_that_never_accepts_hits_the_connect_limit() {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue; the listener never accepts.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let url = format!("http://{addr}");
    let app = spawn()
        .var("OLLAMA_URL", &url)
        .var("OLLAMA_CONNECT_TIMEOUT_SECS", "1")
        .start()
        .await;
    let response = app
        .keyed("/api/generate")
        .json(&generate(false))
        .send()
        .await
        .unwrap();
    // A metered response: it tells the balance, after the refund.
    assert_eq!(response.headers()["x-credits-remaining"], "10");
    let message = ollama_error(response, 502).await;
    assert!(message.contains(&url), "{message}");
    assert_eq!(app.balance_of(KEY).await, Credits::whole(10));
    drop(fillers);
}
