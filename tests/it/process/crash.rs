//! `kill -9` under load, five times over (SPEC §4: "an acknowledged charge
//! survives `kill -9` of the gateway"), on the default SQLite store.

use super::{millis, sqlite_url, Launch, Ledger};
use crate::support::fake_ollama::{Behavior, FakeOllama};
use futures_util::StreamExt;
use rand::Rng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const KEY: &str = "crash-test-key";
const ADMIN: &str = "crash-admin-key";
/// Client tasks, each with one request in flight at a time.
const WORKERS: usize = 48;
/// The load must reach this many requests in flight before each kill.
const MIN_IN_FLIGHT: usize = 32;
const ROUNDS: usize = 5;

/// What the load generator saw.
#[derive(Default)]
struct Load {
    /// Requests sent.
    started: AtomicUsize,
    /// Requests the client saw complete: a 200 with its whole body, or a
    /// stream whose final `"done": true` chunk arrived and that ended cleanly.
    completed: AtomicUsize,
    in_flight: AtomicUsize,
    stop: AtomicBool,
    /// The gateway's URL while one is up.
    target: Mutex<Option<String>>,
}

struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One request of kind `n % 4`: streamed `/api/generate`, non-streamed
/// `/generate`, streamed `/api/chat`, non-streamed `/api/chat`. True when
/// the client saw it complete.
async fn one_request(client: &reqwest::Client, base: &str, n: usize) -> bool {
    let prompt = format!("crash-{n}");
    let request = match n % 4 {
        0 => client
            .post(format!("{base}/api/generate"))
            .json(&json!({"model": "mistral", "prompt": prompt, "stream": true})),
        1 => client
            .post(format!("{base}/generate"))
            .query(&[("prompt", prompt.as_str())]),
        2 => client.post(format!("{base}/api/chat")).json(&json!({
            "model": "mistral",
            "messages": [{"role": "user", "content": prompt}],
        })),
        _ => client.post(format!("{base}/api/chat")).json(&json!({
            "model": "mistral",
            "messages": [{"role": "user", "content": prompt}],
            "stream": false,
        })),
    };
    let Ok(response) = request.header("x-api-key", KEY).send().await else {
        return false;
    };
    if response.status() != 200 {
        return false;
    }
    let mut body = response.bytes_stream();
    let mut text = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => text.extend_from_slice(&bytes),
            Err(_) => return false,
        }
    }
    let text = String::from_utf8_lossy(&text);
    let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) else {
        return false;
    };
    serde_json::from_str::<Value>(last).is_ok_and(|v| v["done"] == true && v.get("error").is_none())
}

async fn worker(load: Arc<Load>, client: reqwest::Client) {
    while !load.stop.load(Ordering::SeqCst) {
        let target = load
            .target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(base) = target else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let n = load.started.fetch_add(1, Ordering::SeqCst);
        let ok = {
            let _guard = InFlight::enter(&load.in_flight);
            one_request(&client, &base, n).await
        };
        if ok {
            load.completed.fetch_add(1, Ordering::SeqCst);
        } else {
            // The gateway is going or gone: do not spin.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Under a load of at least 32 requests in flight (streamed and not), the
/// gateway is killed with SIGKILL at a random moment, five times. After
/// each kill, every request the client saw complete has a charged ledger
/// row, and adjustments − charges = balance exactly; after each restart,
/// the gateway reports that same balance (nothing refilled, nothing lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_charge() {
    let fake = FakeOllama::start_with(Behavior {
        chunks: 5,
        chunk_delay: Duration::from_millis(15),
        head_delay: Duration::from_millis(30),
        ..Behavior::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("crash.db");
    let launch = Launch::new(dir.path())
        .var("OLLAMA_URL", &fake.url())
        .var("DATABASE_URL", &sqlite_url(&db))
        .var("API_KEYS", &format!("{KEY}=1000000"))
        .var("ADMIN_KEY", ADMIN)
        .var("RUST_LOG", "warn");

    let load = Arc::new(Load::default());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(WORKERS)
        .build()
        .expect("client");
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| tokio::spawn(worker(load.clone(), client.clone())))
        .collect();

    let mut rng = rand::rng();
    let mut last_balance = None;
    for round in 1..=ROUNDS {
        let gw = launch.start().await;

        // The restarted gateway agrees with the store as it was at the kill.
        if let Some((id, balance, rows)) = last_balance {
            let key: Value = gw
                .get(&format!("/admin/keys/{id}"))
                .header("x-api-key", ADMIN)
                .send()
                .await
                .expect("admin key")
                .json()
                .await
                .expect("JSON");
            assert_eq!(millis(&key["credits"]), balance, "round {round}: {key}");
            assert_eq!(key["usage"]["requests"], rows, "round {round}: {key}");
        }

        *load.target.lock().unwrap() = Some(gw.url.clone());
        wait_for(
            "the load to reach 32 requests in flight",
            Duration::from_secs(20),
            || load.in_flight.load(Ordering::SeqCst) >= MIN_IN_FLIGHT,
        )
        .await;
        let completed_before = load.completed.load(Ordering::SeqCst);
        wait_for(
            "a request to complete on this gateway",
            Duration::from_secs(20),
            || load.completed.load(Ordering::SeqCst) > completed_before,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..500))).await;
        let in_flight_at_kill = load.in_flight.load(Ordering::SeqCst);
        let out = gw.kill9();
        assert!(!out.status.success());
        *load.target.lock().unwrap() = None;

        // Every request has now failed or completed.
        wait_for(
            "the clients to notice the kill",
            Duration::from_secs(30),
            || load.in_flight.load(Ordering::SeqCst) == 0,
        )
        .await;
        let completed = load.completed.load(Ordering::SeqCst);
        let started = load.started.load(Ordering::SeqCst);

        let ledger = Ledger::read_sqlite(&db, KEY).await;
        let charged = ledger.charged_successes();
        eprintln!(
            "crash round {round}: {in_flight_at_kill} in flight at the kill, \
             {completed} completed / {started} sent so far, {charged} charged rows"
        );
        assert!(
            charged >= completed,
            "round {round}: {completed} requests completed but only {charged} charged rows survived kill -9"
        );
        assert!(
            ledger.usage.len() <= started,
            "round {round}: more ledger rows ({}) than requests sent ({started})",
            ledger.usage.len()
        );
        ledger.assert_adds_up();
        assert_eq!(
            ledger.adjustments.len(),
            1,
            "only the grant, never a refill"
        );
        last_balance = Some((ledger.id, ledger.balance, ledger.usage.len()));
    }

    load.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
}
