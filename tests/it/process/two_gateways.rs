//! Two tollgate processes sharing one PostgreSQL never overspend a key
//! together (SPEC §4).
//!
//! PostgreSQL is found at `TOLLGATE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); each test gets a fresh
//! schema, which the gateways use through the URL's
//! `options=-c search_path=...` (sqlx passes it on as the startup
//! `options` parameter). When no server answers the test prints "skipped"
//! and passes, unless `CI=true`, where it fails.

use super::{millis, Launch};
use crate::support::fake_ollama::{Behavior, FakeOllama};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const KEY: &str = "shared-pg-key";
const ADMIN: &str = "shared-pg-admin";

/// A fresh schema on the test server, dropped on [`Schema::drop_now`].
struct Schema {
    base: PgConnectOptions,
    name: String,
    /// The URL the gateways get: the server's, with the schema as
    /// `search_path`.
    url: String,
}

impl Schema {
    async fn create() -> Option<Schema> {
        let base_url =
            std::env::var("TOLLGATE_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into());
        let base = PgConnectOptions::from_str(&base_url)
            .expect("TOLLGATE_TEST_DATABASE_URL is not a PostgreSQL URL");
        let mut admin = match PgConnection::connect_with(&base).await {
            Ok(conn) => conn,
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("PostgreSQL at {base_url} does not answer (CI=true): {e}")
            }
            Err(e) => {
                eprintln!(
                    "skipped: two gateways on PostgreSQL, no server answers at {base_url} ({e})"
                );
                return None;
            }
        };
        // The store tests' naming (`tg_test_<unix seconds>_<random>`), so
        // that they drop this schema should this test fail to.
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = format!("tg_test_{secs:x}_{:08x}", rand::random::<u32>());
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut admin)
            .await
            .expect("create schema");
        let _ = admin.close().await;
        let separator = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{separator}options=-c%20search_path%3D{name}");
        Some(Schema { base, name, url })
    }

    /// Gateways on this schema in front of `fake`, with the key [`KEY`]
    /// granted `credits` and the admin key [`ADMIN`].
    fn launch(&self, dir: &std::path::Path, fake: &FakeOllama, credits: &str) -> Launch {
        Launch::new(dir)
            .var("OLLAMA_URL", &fake.url())
            .var("DATABASE_URL", &self.url)
            .var("API_KEYS", &format!("{KEY}={credits}"))
            .var("ADMIN_KEY", ADMIN)
            .var("RUST_LOG", "warn")
    }

    /// The tables the gateways created in the schema.
    async fn tables(&self) -> Vec<String> {
        let mut conn = PgConnection::connect_with(&self.base)
            .await
            .expect("connect");
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
        )
        .bind(&self.name)
        .fetch_all(&mut conn)
        .await
        .expect("list tables");
        let _ = conn.close().await;
        tables
    }

    async fn drop_now(self) {
        if let Ok(mut conn) = PgConnection::connect_with(&self.base).await {
            let _ = sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.name))
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}

/// 200 concurrent one-credit requests against a 50-credit key, split
/// between two gateways on one database: exactly 50 reach Ollama (held
/// there until every other request was answered, so they all overlap), 150
/// get 402, and the balance ends at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_never_overspend() {
    let Some(schema) = Schema::create().await else {
        return;
    };
    let fake = FakeOllama::start_with(Behavior {
        hold: true,
        ..Behavior::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let launch = schema.launch(dir.path(), &fake, "50");
    // Both start at once: migrations and grants race on one fresh schema.
    let (a, b) = tokio::join!(launch.start(), launch.start());

    let tables = schema.tables().await;
    assert!(
        tables.iter().any(|t| t == "api_keys"),
        "the gateways did not use the schema from the URL's options (tables there: {tables:?})"
    );

    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let request = gw
            .post("/generate")
            .query(&[("prompt", format!("pg-{i}"))])
            .header("x-api-key", KEY);
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let status = request.send().await.expect("send").status().as_u16();
            answered.fetch_add(1, Ordering::SeqCst);
            status
        }));
    }

    // Every request is either held at the fake or answered (402) before any
    // is released: the 50 admitted ones overlap.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fake.generation_count() + answered.load(Ordering::SeqCst) < 200 {
        assert!(
            Instant::now() < deadline,
            "stuck: {} at Ollama, {} answered",
            fake.generation_count(),
            answered.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.generation_count(), 50, "the key was overspent");
    fake.release(200);

    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("task") {
            200 => ok += 1,
            402 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, refused), (50, 150));
    assert_eq!(fake.generation_count(), 50);
    for gw in [&a, &b] {
        let (status, me) = gw.me(KEY).await;
        assert_eq!(status, 200);
        assert_eq!(millis(&me["credits"]), 0, "{me}");
        assert_eq!(me["usage"]["requests"], 50, "{me}");
    }
    assert_eq!(a.generate(KEY, "one more").await, 402);

    let (out_a, out_b) = tokio::join!(
        a.terminate(Duration::from_secs(30)),
        b.terminate(Duration::from_secs(30))
    );
    assert_eq!(out_a.status.code(), Some(0), "{}", out_a.stderr);
    assert_eq!(out_b.status.code(), Some(0), "{}", out_b.stderr);

    let ledger = super::Ledger::read(
        &tollgate::config::DatabaseUrl::Postgres(schema.url.clone()),
        KEY,
    )
    .await;
    assert_eq!(ledger.balance, 0);
    assert_eq!(ledger.usage.len(), 50);
    ledger.assert_adds_up();
    schema.drop_now().await;
}

/// Changes made through one gateway reach the other: balances at once
/// (they are read from the database), a revocation once the other's key
/// cache lets go of the key (at most a second by the README; polled here
/// with a generous deadline, as a test asserts no durations). The gateway
/// that made the change sees it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_on_one_gateway_reach_the_other() {
    let Some(schema) = Schema::create().await else {
        return;
    };
    let fake = FakeOllama::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let launch = schema.launch(dir.path(), &fake, "5");
    let a = launch.start().await;
    let b = launch.start().await;

    // Both gateways have looked the key up (and b has it cached).
    let (status, me) = a.me(KEY).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(b.generate(KEY, "cached").await, 200);
    let id = me["id"].as_i64().expect("id");

    // A top-up through a shows on b at once.
    let topup = a
        .post(&format!("/admin/keys/{id}/credits"))
        .header("x-api-key", ADMIN)
        .json(&serde_json::json!({"add": 10, "reason": "from a"}))
        .send()
        .await
        .expect("top-up");
    assert_eq!(topup.status(), 200);
    let (status, me) = b.me(KEY).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(millis(&me["credits"]), 14_000, "{me}");

    // A revocation through a: a refuses the key at once, b soon after.
    let revoke = a
        .client
        .delete(format!("{}/admin/keys/{id}", a.url))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoke.status(), 200);
    assert_eq!(a.generate(KEY, "after revoke").await, 401);
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.me(KEY).await.0 != 401 {
        assert!(
            Instant::now() < deadline,
            "b still accepts a key revoked through a"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = fake.generation_count();
    assert_eq!(b.generate(KEY, "after revoke").await, 401);
    assert_eq!(
        fake.generation_count(),
        before,
        "a revoked key reached Ollama"
    );

    let (out_a, out_b) = tokio::join!(
        a.terminate(Duration::from_secs(30)),
        b.terminate(Duration::from_secs(30))
    );
    assert_eq!(out_a.status.code(), Some(0), "{}", out_a.stderr);
    assert_eq!(out_b.status.code(), Some(0), "{}", out_b.stderr);
    schema.drop_now().await;
}

/// A gateway that stops gives back the credits it leased in advance: a
/// key with plenty of credits is leased by its first request, and after
/// SIGTERM nothing of it stays reserved in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_stops_gives_back_its_lease() {
    let Some(schema) = Schema::create().await else {
        return;
    };
    let fake = FakeOllama::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let launch = schema.launch(dir.path(), &fake, "1000000");
    let gateway = launch.start().await;
    let reserved = || async {
        let mut conn = PgConnection::connect_with(
            &schema
                .base
                .clone()
                .options([("search_path", schema.name.as_str())]),
        )
        .await
        .expect("connect");
        let total: i64 =
            sqlx::query_scalar("SELECT COALESCE(SUM(reserved), 0)::BIGINT FROM api_keys")
                .fetch_one(&mut conn)
                .await
                .expect("reserved");
        let _ = conn.close().await;
        total
    };
    assert_eq!(gateway.generate(KEY, "leased").await, 200);
    // The first request's reservation started a lease, which the database
    // holds as reserved.
    let deadline = Instant::now() + Duration::from_secs(5);
    while reserved().await == 0 {
        assert!(Instant::now() < deadline, "no lease was taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = gateway.terminate(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_eq!(reserved().await, 0, "a stopped gateway still holds credits");
    schema.drop_now().await;
}
