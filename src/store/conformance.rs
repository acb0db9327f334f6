//! Conformance tests: one set of tests, written once against [`SharedStore`]
//! and run against every store — memory, SQLite (in a temporary directory)
//! and PostgreSQL (a fresh schema per test).
//!
//! PostgreSQL is found at `TOLLGATE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). When it does not answer, its
//! tests print that they were skipped, unless `CI=true`, where they fail.

use super::memory::MemoryStore;
use super::postgres::PostgresStore;
use super::sqlite::{PanicAt, SqliteStore, CHECKPOINT_EVERY, LOOK_EVERY, LOOK_FOR_UNKNOWN};
use super::*;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection};
use std::str::FromStr;

mod outages;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

// ---------------------------------------------------------------------------
// Harness

enum Backend {
    Memory,
    Sqlite {
        _dir: tempfile::TempDir,
    },
    Postgres {
        options: Box<PgConnectOptions>,
        base: Box<PgConnectOptions>,
        schema: String,
        /// Other gateways opened on the same schema, dropped before it.
        others: std::sync::Mutex<Vec<SharedStore>>,
    },
}

struct Harness {
    store: SharedStore,
    backend: Backend,
}

impl Harness {
    fn memory() -> Harness {
        Harness {
            store: Arc::new(MemoryStore::default()),
            backend: Backend::Memory,
        }
    }

    async fn sqlite() -> Harness {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = SqliteStore::open(&dir.path().join("tollgate.db"))
            .await
            .expect("open sqlite store");
        Harness {
            store: Arc::new(store),
            backend: Backend::Sqlite { _dir: dir },
        }
    }

    /// A store on a fresh schema, or `None` (test skipped) when PostgreSQL
    /// does not answer and this is not CI.
    async fn postgres() -> Option<Harness> {
        let (base, options, schema) = pg_schema().await?;
        let store = PostgresStore::connect_with(options.clone())
            .await
            .expect("connect postgres store");
        Some(Harness {
            store: Arc::new(store),
            backend: Backend::Postgres {
                options: Box::new(options),
                base: Box::new(base),
                schema,
                others: std::sync::Mutex::new(Vec::new()),
            },
        })
    }

    /// Another gateway on the same data. Only PostgreSQL supports several;
    /// the others return the same store.
    async fn second_gateway(&self) -> SharedStore {
        match &self.backend {
            Backend::Postgres {
                options, others, ..
            } => {
                let store: SharedStore = Arc::new(
                    PostgresStore::connect_with((**options).clone())
                        .await
                        .expect("connect second postgres store"),
                );
                others.lock().expect("lock").push(store.clone());
                store
            }
            _ => self.store.clone(),
        }
    }

    async fn finish(self) {
        let Harness { store, backend } = self;
        drop(store);
        if let Backend::Postgres {
            base,
            schema,
            others,
            ..
        } = backend
        {
            drop(others);
            drop_schema(&base, &schema).await;
        }
    }
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Creates a fresh schema; returns the server's options, the options of
/// connections that use the schema, and its name.
async fn pg_schema() -> Option<(PgConnectOptions, PgConnectOptions, String)> {
    let url = std::env::var("TOLLGATE_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into());
    let base = PgConnectOptions::from_str(&url).expect("TOLLGATE_TEST_DATABASE_URL is invalid");
    let mut admin = match PgConnection::connect_with(&base).await {
        Ok(conn) => conn,
        Err(e) if ci() => panic!("PostgreSQL does not answer (CI=true): {e}"),
        Err(e) => {
            eprintln!("skipped: PostgreSQL test, no server answers ({e})");
            return None;
        }
    };
    drop_stale_schemas(&mut admin).await;
    let schema = format!(
        "{SCHEMA_PREFIX}{:x}_{:08x}",
        unix_secs(),
        rand::random::<u32>()
    );
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await
        .expect("create test schema");
    let _ = admin.close().await;
    let options = base.clone().options([("search_path", schema.as_str())]);
    Some((base, options, schema))
}

/// Test schemas are named `tg_test_<unix seconds, hex>_<random>`.
const SCHEMA_PREFIX: &str = "tg_test_";
/// A test schema this old was left by a test that panicked or was killed.
const SCHEMA_STALE_AFTER_SECS: u64 = 3600;

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Drops the test schemas that tests which failed (and so never reached
/// their clean-up) left over an hour ago.
async fn drop_stale_schemas(admin: &mut PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
            .bind(SCHEMA_PREFIX)
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    let now = unix_secs();
    for name in names {
        let made = name
            .strip_prefix(SCHEMA_PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .and_then(|(secs, _)| u64::from_str_radix(secs, 16).ok());
        // Names without a time are from older test code: stale too.
        if made.is_none_or(|made| now.saturating_sub(made) > SCHEMA_STALE_AFTER_SECS) {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// A connection in a transaction that holds key `id`'s row lock, as
/// another gateway's or the CLI's transaction may; see [`unlock`].
async fn lock_key_row(options: &PgConnectOptions, id: KeyId) -> PgConnection {
    let mut blocker = PgConnection::connect_with(options).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT 1 FROM api_keys WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut blocker)
        .await
        .unwrap();
    blocker
}

/// Makes `instance`'s last heartbeat five minutes old, as if it had died
/// (or lost the database) then.
async fn stop_heartbeat(admin: &mut PgConnection, instance: &str) {
    sqlx::query("UPDATE instances SET heartbeat_at = now() - interval '5 minutes' WHERE id = $1")
        .bind(instance)
        .execute(admin)
        .await
        .unwrap();
}

/// Ends the transaction of [`lock_key_row`].
async fn unlock(mut blocker: PgConnection) {
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    let _ = blocker.close().await;
}

async fn drop_schema(base: &PgConnectOptions, schema: &str) {
    if let Ok(mut admin) = PgConnection::connect_with(base).await {
        let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut admin)
            .await;
        let _ = admin.close().await;
    }
}

/// Generates, for each test function, one `#[tokio::test]` per store.
macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = super::Harness::memory();
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = super::Harness::sqlite().await;
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(h) = super::Harness::postgres().await else { return };
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
    };
}

conformance_tests!(
    create_lookup_and_duplicate,
    reserve_admits_exactly_what_is_covered,
    settle_charges_releases_and_records,
    concurrent_reserves_never_overspend,
    reserves_racing_settlements_never_overspend,
    abandoned_reservations_are_released,
    concurrent_writes_fail_alone,
    concurrent_settlements_on_two_keys,
    adjust_adds_and_sets,
    ledger_adds_up_to_the_balance,
    sync_grants_creates_keeps_disables_reenables,
    sync_grants_sets_the_configured_role,
    revoke_keeps_the_first_time,
    update_key_patches,
    usage_pages_newest_first,
    any_model_name_is_recorded,
    any_key_name_is_kept,
    usage_totals_add_up,
    usage_totals_stop_at_the_largest_count,
);

// ---------------------------------------------------------------------------
// Helpers

fn cr(s: &str) -> Credits {
    s.parse().expect("credits")
}

fn hash(s: &str) -> KeyHash {
    KeyHash(format!("{s:0>64}"))
}

fn new_key(name: &str, credits: Credits) -> NewKey {
    NewKey {
        hash: hash(name),
        name: name.into(),
        role: Role::User,
        credits,
        models: None,
        rate_limit_rpm: None,
        max_concurrent: None,
        expires_at: None,
        granted: false,
        actor: "test".into(),
    }
}

fn usage(key_id: KeyId, credits: Credits) -> UsageRecord {
    UsageRecord {
        time: now_millis(),
        key_id,
        endpoint: "/api/generate".into(),
        model: Some("mistral".into()),
        status: 200,
        prompt_tokens: 10,
        completion_tokens: 20,
        credits,
        duration_ms: 5,
    }
}

fn grant(name: &str, credits: &str) -> Grant {
    Grant {
        hash: hash(name),
        name: name.into(),
        role: Role::User,
        credits: cr(credits),
    }
}

fn add(n: &str) -> Adjustment {
    Adjustment {
        change: BalanceChange::Add(cr(n)),
        actor: "admin".into(),
        reason: format!("top up {n}"),
    }
}

fn set(n: &str) -> Adjustment {
    Adjustment {
        change: BalanceChange::Set(cr(n)),
        actor: "cli".into(),
        reason: format!("set {n}"),
    }
}

fn refused_with(r: Result<Credits, StoreError>) -> Credits {
    match r {
        Err(StoreError::InsufficientCredits { available }) => available,
        other => panic!("expected InsufficientCredits, got {other:?}"),
    }
}

/// A key's ten newest usage rows.
async fn newest_usage(store: &SharedStore, id: KeyId) -> Vec<UsageEntry> {
    store
        .usage(
            Some(id),
            PageRequest {
                limit: 10,
                before: None,
            },
        )
        .await
        .expect("usage")
}

async fn balance(store: &SharedStore, id: KeyId) -> Credits {
    store
        .key(id)
        .await
        .expect("key")
        .expect("key exists")
        .balance
}

/// Checks the invariants: adjustments minus usage equals the balance, and
/// the key's usage totals are what its ledger rows add up to.
async fn assert_ledger_adds_up(store: &SharedStore, id: KeyId) {
    let adjusted: Credits = store
        .adjustments(id)
        .await
        .expect("adjustments")
        .iter()
        .map(|a| a.delta)
        .sum();
    let totals = store.usage_totals(id).await.expect("totals");
    let spent = totals.credits_spent;
    let mut rows = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .usage(Some(id), PageRequest { limit: 100, before })
            .await
            .expect("usage");
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        rows.extend(page);
    }
    let listed = UsageTotals {
        requests: rows.len() as u64,
        prompt_tokens: rows.iter().map(|e| e.record.prompt_tokens).sum(),
        completion_tokens: rows.iter().map(|e| e.record.completion_tokens).sum(),
        credits_spent: rows.iter().map(|e| e.record.credits).sum(),
    };
    assert_eq!(totals, listed, "usage_totals agrees with the usage rows");
    assert_eq!(
        adjusted - spent,
        balance(store, id).await,
        "ledger of key {id}"
    );
}

// ---------------------------------------------------------------------------
// The tests, one body per behaviour

async fn create_lookup_and_duplicate(h: &Harness) {
    let s = &h.store;
    let before = now_millis();
    let mut new = new_key("alice", cr("12.5"));
    new.role = Role::Admin;
    new.models = Some(vec!["mistral".into(), "llama3:8b".into()]);
    new.rate_limit_rpm = Some(60);
    new.max_concurrent = Some(2);
    new.expires_at = Some(4_000_000_000_000);
    new.granted = true;
    let created = s.create_key(new.clone()).await.expect("create");
    assert_eq!(created.name, "alice");
    assert_eq!(created.role, Role::Admin);
    assert_eq!(created.balance, cr("12.5"));
    assert_eq!(created.models, new.models);
    assert_eq!(created.rate_limit_rpm, Some(60));
    assert_eq!(created.max_concurrent, Some(2));
    assert_eq!(created.expires_at, Some(4_000_000_000_000));
    assert!(created.granted && !created.disabled);
    assert_eq!(created.revoked_at, None);
    assert!(created.created_at >= before && created.created_at <= now_millis());

    let bob = s
        .create_key(new_key("bob", Credits::ZERO))
        .await
        .expect("create bob");
    assert_ne!(bob.id, created.id);
    assert_eq!(bob.models, None);
    assert!(!bob.granted);

    assert_eq!(
        s.key_by_hash(&hash("alice")).await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(s.key(created.id).await.unwrap(), Some(created.clone()));
    assert_eq!(s.key_by_hash(&hash("nobody")).await.unwrap(), None);
    assert_eq!(s.key(created.id + bob.id + 1000).await.unwrap(), None);
    assert_eq!(s.keys().await.unwrap(), vec![created.clone(), bob.clone()]);

    match s.create_key(new_key("alice", cr("1"))).await {
        Err(StoreError::DuplicateKey) => {}
        other => panic!("expected DuplicateKey, got {other:?}"),
    }
    assert_eq!(
        s.keys().await.unwrap().len(),
        2,
        "a duplicate creates nothing"
    );

    let adjustments = s.adjustments(created.id).await.unwrap();
    assert_eq!(adjustments.len(), 1, "the duplicate recorded no grant");
    let grant = &adjustments[0];
    assert_eq!(
        (
            grant.key_id,
            grant.delta,
            grant.actor.as_str(),
            grant.reason.as_str()
        ),
        (created.id, cr("12.5"), "test", "grant")
    );
    assert_eq!(s.adjustments(bob.id).await.unwrap()[0].delta, Credits::ZERO);
}

async fn reserve_admits_exactly_what_is_covered(h: &Harness) {
    let s = &h.store;
    let k = s.create_key(new_key("k", cr("1.5"))).await.unwrap().id;
    assert_eq!(s.reserve(k, cr("1")).await.unwrap(), cr("0.5"));
    assert_eq!(refused_with(s.reserve(k, cr("0.501")).await), cr("0.5"));
    assert_eq!(s.reserve(k, cr("0.5")).await.unwrap(), Credits::ZERO);
    assert_eq!(refused_with(s.reserve(k, cr("0.001")).await), Credits::ZERO);
    // A reservation does not change the balance.
    assert_eq!(balance(s, k).await, cr("1.5"));
    // Settling one frees what it did not use.
    let mut u = usage(k, cr("0.25"));
    u.status = 200;
    assert_eq!(s.settle(u, cr("1")).await.unwrap(), cr("1.25"));
    assert_eq!(s.reserve(k, cr("0.75")).await.unwrap(), Credits::ZERO);
    assert_eq!(refused_with(s.reserve(k, cr("0.001")).await), Credits::ZERO);

    // A balance at or below zero admits nothing, not even a free request.
    let zero = s
        .create_key(new_key("zero", Credits::ZERO))
        .await
        .unwrap()
        .id;
    assert_eq!(
        refused_with(s.reserve(zero, Credits::ZERO).await),
        Credits::ZERO
    );
    assert_eq!(refused_with(s.reserve(zero, cr("1")).await), Credits::ZERO);
    let negative = s.create_key(new_key("neg", cr("1"))).await.unwrap().id;
    s.adjust(negative, set("-2")).await.unwrap();
    assert_eq!(refused_with(s.reserve(negative, cr("1")).await), cr("-2"));

    match s.reserve(k + zero + negative + 1000, cr("1")).await {
        Err(StoreError::NoSuchKey(_)) => {}
        other => panic!("expected NoSuchKey, got {other:?}"),
    }
}

async fn settle_charges_releases_and_records(h: &Harness) {
    let s = &h.store;
    let k = s.create_key(new_key("k", cr("2"))).await.unwrap().id;
    assert_eq!(s.reserve(k, cr("1")).await.unwrap(), cr("1"));
    // The real cost may exceed the reservation and the balance.
    let mut record = usage(k, cr("3.125"));
    record.endpoint = "/v1/chat/completions".into();
    record.model = None;
    record.status = 499;
    record.prompt_tokens = 1234;
    record.completion_tokens = 5678;
    record.duration_ms = 987;
    assert_eq!(
        s.settle(record.clone(), cr("1")).await.unwrap(),
        cr("-1.125")
    );
    assert_eq!(balance(s, k).await, cr("-1.125"));

    let rows = newest_usage(s, k).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].record, record);

    assert_eq!(refused_with(s.reserve(k, cr("0.001")).await), cr("-1.125"));
    // The reservation was released: after a top-up all of it is available.
    assert_eq!(s.adjust(k, add("5")).await.unwrap(), cr("3.875"));
    assert_eq!(s.reserve(k, cr("3.875")).await.unwrap(), Credits::ZERO);

    // A refund: nothing charged, the reservation released, the row kept.
    let mut refund = usage(k, Credits::ZERO);
    refund.status = 502;
    assert_eq!(s.settle(refund, cr("3.875")).await.unwrap(), cr("3.875"));
    assert_eq!(s.reserve(k, cr("3.875")).await.unwrap(), Credits::ZERO);
    assert_eq!(s.usage_totals(k).await.unwrap().requests, 2);

    match s.settle(usage(k + 1000, cr("1")), cr("1")).await {
        Err(StoreError::NoSuchKey(_)) => {}
        other => panic!("expected NoSuchKey, got {other:?}"),
    }
    assert_ledger_adds_up(s, k).await;
}

async fn concurrent_reserves_never_overspend(h: &Harness) {
    let first = h.store.clone();
    let second = h.second_gateway().await;
    let k = first.create_key(new_key("k", cr("10"))).await.unwrap().id;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = if i % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.push(tokio::spawn(async move {
            (i % 2, store.reserve(k, cr("1")).await)
        }));
    }
    let mut admitted = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            (gateway, Ok(_)) => admitted.push(gateway),
            (_, Err(StoreError::InsufficientCredits { available })) => {
                assert!(available < cr("1"), "refused with {available} available");
            }
            (_, Err(e)) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(admitted.len(), 10, "exactly the balance is admitted");
    assert_eq!(
        refused_with(first.reserve(k, cr("0.001")).await),
        Credits::ZERO
    );
    assert_eq!(
        refused_with(second.reserve(k, cr("0.001")).await),
        Credits::ZERO
    );

    // Each gateway settles what it admitted, concurrently.
    let mut tasks = Vec::new();
    for gateway in admitted {
        let store = if gateway == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.push(tokio::spawn(async move {
            store.settle(usage(k, cr("1")), cr("1")).await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("settle");
    }
    assert_eq!(balance(&first, k).await, Credits::ZERO);
    assert_eq!(first.usage_totals(k).await.unwrap().requests, 10);
    first.adjust(k, add("2")).await.unwrap();
    assert_eq!(second.reserve(k, cr("2")).await.unwrap(), Credits::ZERO);
    assert_ledger_adds_up(&first, k).await;
}

async fn reserves_racing_settlements_never_overspend(h: &Harness) {
    // Requests reserve and settle while others reserve: whatever the
    // interleaving, exactly the balance is spent, never more.
    let first = h.store.clone();
    let second = h.second_gateway().await;
    let k = first.create_key(new_key("k", cr("10"))).await.unwrap().id;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let store = if i % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0;
            loop {
                match store.reserve(k, cr("1")).await {
                    Ok(_) => {
                        tokio::task::yield_now().await;
                        store.settle(usage(k, cr("1")), cr("1")).await.unwrap();
                        admitted += 1;
                    }
                    Err(StoreError::InsufficientCredits { .. }) => return admitted,
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.expect("task");
    }
    assert_eq!(admitted, 10);
    assert_eq!(balance(&first, k).await, Credits::ZERO);
    first.adjust(k, add("1")).await.unwrap();
    assert_eq!(second.reserve(k, cr("1")).await.unwrap(), Credits::ZERO);
    assert_ledger_adds_up(&first, k).await;
}

async fn abandoned_reservations_are_released(h: &Harness) {
    // A caller that stops waiting for its reservation (a client hanging up)
    // either got it, and settles it, or leaves nothing reserved.
    // The key covers every attempt, so that abandoned reservations not yet
    // given back cannot get a later one refused.
    let s = &h.store;
    let k = s.create_key(new_key("k", cr("20"))).await.unwrap().id;
    for _ in 0..20 {
        let attempt =
            tokio::time::timeout(std::time::Duration::from_micros(1), s.reserve(k, cr("1"))).await;
        if let Ok(reserved) = attempt {
            reserved.unwrap();
            s.settle(usage(k, Credits::ZERO), cr("1")).await.unwrap();
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match s.reserve(k, cr("20")).await {
            Ok(left) => {
                assert_eq!(left, Credits::ZERO);
                break;
            }
            Err(StoreError::InsufficientCredits { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the abandoned reservations were not released: {e}"),
        }
    }
    assert_eq!(balance(s, k).await, cr("20"));
}

async fn concurrent_writes_fail_alone(h: &Harness) {
    // Many writes at once (they share transactions in the SQLite store):
    // a failing one must not take the others with it.
    let s = h.store.clone();
    let k = s.create_key(new_key("payer", cr("100"))).await.unwrap().id;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                0 => s
                    .create_key(new_key("same", cr("1")))
                    .await
                    .map(|_| "created-same"),
                1 => s
                    .create_key(new_key(&format!("unique{i}"), cr("1")))
                    .await
                    .map(|_| "created"),
                2 => s
                    .settle(usage(k, cr("1")), Credits::ZERO)
                    .await
                    .map(|_| "settled"),
                _ => s.adjust(k, add("0.5")).await.map(|_| "adjusted"),
            }
        }));
    }
    let mut counts = std::collections::HashMap::new();
    for task in tasks {
        let outcome = match task.await.expect("task") {
            Ok(what) => what,
            Err(StoreError::DuplicateKey) => "duplicate",
            Err(e) => panic!("unexpected error {e}"),
        };
        *counts.entry(outcome).or_insert(0) += 1;
    }
    assert_eq!(counts.get("created-same"), Some(&1));
    assert_eq!(counts.get("duplicate"), Some(&9));
    assert_eq!(counts.get("created"), Some(&10));
    assert_eq!(counts.get("settled"), Some(&10));
    assert_eq!(counts.get("adjusted"), Some(&10));
    assert_eq!(s.keys().await.unwrap().len(), 12);
    assert_eq!(balance(&s, k).await, cr("95"));
    assert_ledger_adds_up(&s, k).await;
}

async fn concurrent_settlements_on_two_keys(h: &Harness) {
    // Settlements arriving together (the PostgreSQL store applies them in
    // batches): each is charged and recorded exactly once, each reservation
    // is released, and one for a key that does not exist fails alone.
    let s = h.store.clone();
    let a = s.create_key(new_key("a", cr("100"))).await.unwrap().id;
    let b = s.create_key(new_key("b", cr("100"))).await.unwrap().id;
    for _ in 0..20 {
        s.reserve(a, cr("2")).await.unwrap();
        s.reserve(b, cr("2")).await.unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let store = s.clone();
        let key = if i % 2 == 0 { a } else { b };
        tasks.push(tokio::spawn(async move {
            let mut record = usage(key, Credits::from_millis(1000 + i as i64));
            record.prompt_tokens = i;
            (key, store.settle(record, cr("2")).await)
        }));
        if i % 10 == 0 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                (0, s.settle(usage(b + 1000, cr("1")), cr("1")).await)
            }));
        }
    }
    let mut answered: std::collections::HashMap<KeyId, Vec<Credits>> = Default::default();
    for task in tasks {
        match task.await.expect("task") {
            (0, Err(StoreError::NoSuchKey(_))) => {}
            (0, other) => panic!("expected NoSuchKey, got {other:?}"),
            (key, result) => answered
                .entry(key)
                .or_default()
                .push(result.expect("settle")),
        }
    }
    // Key a paid 1.000 + 1.002 + ... + 1.038, key b 1.001 + ... + 1.039.
    let final_a = cr("100") - Credits::from_millis((0..20).map(|i| 1000 + 2 * i).sum());
    let final_b = cr("100") - Credits::from_millis((0..20).map(|i| 1001 + 2 * i).sum());
    for (key, expected) in [(a, final_a), (b, final_b)] {
        assert_eq!(balance(&s, key).await, expected);
        // Each answer is the balance just after that settlement, in some
        // order of them: all distinct, the lowest the final one.
        let mut seen = answered.remove(&key).expect("answers");
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 20);
        assert_eq!(seen[0], expected);
        // From 100 down through the answers, each step is one settlement's
        // credits, each used once.
        let mut steps: Vec<Credits> = std::iter::once(cr("100"))
            .chain(seen.iter().rev().copied())
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[0] - w[1])
            .collect();
        steps.sort();
        let first = if key == a { 1000 } else { 1001 };
        let paid: Vec<Credits> = (0..20)
            .map(|i| Credits::from_millis(first + 2 * i))
            .collect();
        assert_eq!(steps, paid);
        // All reservations were released.
        assert_eq!(s.reserve(key, expected).await.unwrap(), Credits::ZERO);
        assert_ledger_adds_up(&s, key).await;
    }
    let mut prompts: Vec<u64> = Vec::new();
    for key in [a, b] {
        let rows = s
            .usage(
                Some(key),
                PageRequest {
                    limit: 100,
                    before: None,
                },
            )
            .await
            .unwrap();
        prompts.extend(rows.iter().map(|r| r.record.prompt_tokens));
    }
    prompts.sort();
    assert_eq!(prompts, (0..40).collect::<Vec<u64>>(), "one usage row each");
}

async fn adjust_adds_and_sets(h: &Harness) {
    let s = &h.store;
    let k = s.create_key(new_key("k", cr("5"))).await.unwrap().id;
    let before = now_millis();
    assert_eq!(s.adjust(k, add("2.5")).await.unwrap(), cr("7.5"));
    assert_eq!(s.adjust(k, set("3")).await.unwrap(), cr("3"));
    assert_eq!(s.adjust(k, add("-4")).await.unwrap(), cr("-1"));
    assert_eq!(s.adjust(k, set("-1")).await.unwrap(), cr("-1"));
    assert_eq!(balance(s, k).await, cr("-1"));
    let entries = s.adjustments(k).await.unwrap();
    let summary: Vec<(Credits, &str, &str)> = entries
        .iter()
        .map(|a| (a.delta, a.actor.as_str(), a.reason.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (cr("5"), "test", "grant"),
            (cr("2.5"), "admin", "top up 2.5"),
            (cr("-4.5"), "cli", "set 3"),
            (cr("-4"), "admin", "top up -4"),
            (Credits::ZERO, "cli", "set -1"),
        ]
    );
    assert!(entries.iter().all(|a| a.key_id == k));
    assert!(entries[1..]
        .iter()
        .all(|a| a.time >= before && a.time <= now_millis()));
    // A balance beyond ±Credits::MAX is refused, and changes nothing.
    let max = Credits::MAX.to_string();
    let out_of_range = |r: Result<Credits, StoreError>| {
        assert!(matches!(r, Err(StoreError::BalanceOutOfRange)), "{r:?}");
    };
    assert_eq!(s.adjust(k, set(&max)).await.unwrap(), Credits::MAX);
    out_of_range(s.adjust(k, add("0.001")).await);
    assert_eq!(balance(s, k).await, Credits::MAX);
    let min = format!("-{max}");
    assert_eq!(s.adjust(k, set(&min)).await.unwrap(), -Credits::MAX);
    out_of_range(s.adjust(k, add("-0.001")).await);
    assert_eq!(balance(s, k).await, -Credits::MAX);
    assert_eq!(s.adjustments(k).await.unwrap().len(), 7);
    match s.adjust(k + 1000, add("1")).await {
        Err(StoreError::NoSuchKey(_)) => {}
        other => panic!("expected NoSuchKey, got {other:?}"),
    }
    assert!(s.adjustments(k + 1000).await.unwrap().is_empty());
    assert_ledger_adds_up(s, k).await;
}

async fn ledger_adds_up_to_the_balance(h: &Harness) {
    let s = &h.store;
    let a = s.create_key(new_key("a", cr("10"))).await.unwrap().id;
    let b = s.create_key(new_key("b", cr("0.003"))).await.unwrap().id;
    for i in 0..30u32 {
        let key = if i % 3 == 0 { b } else { a };
        let estimate = Credits::from_millis(1 + i64::from(i % 7) * 137);
        match s.reserve(key, estimate).await {
            Ok(_) => {
                // Charges above, below and equal to the estimate.
                let charged = Credits::from_millis(estimate.millis() * i64::from(i % 3) / 2 + 1);
                s.settle(usage(key, charged), estimate).await.unwrap();
            }
            Err(StoreError::InsufficientCredits { .. }) => {
                if i % 2 == 0 {
                    s.adjust(key, add("1.111")).await.unwrap();
                } else {
                    s.adjust(key, set("2.5")).await.unwrap();
                }
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        if i % 10 == 9 {
            s.adjust(a, set("0.5")).await.unwrap();
        }
    }
    assert_ledger_adds_up(s, a).await;
    assert_ledger_adds_up(s, b).await;
}

async fn sync_grants_creates_keeps_disables_reenables(h: &Harness) {
    let s = &h.store;
    let manual = s.create_key(new_key("manual", cr("1"))).await.unwrap().id;

    let report = s
        .sync_grants(&[grant("g1", "10"), grant("g2", "5")])
        .await
        .unwrap();
    assert_eq!(report.created.len(), 2);
    assert!(report.reenabled.is_empty() && report.disabled.is_empty());
    let (g1, g2) = (report.created[0], report.created[1]);
    let k1 = s.key(g1).await.unwrap().unwrap();
    assert_eq!(k1.name, "g1");
    assert_eq!(k1.balance, cr("10"));
    assert!(k1.granted && !k1.disabled);
    assert_eq!(s.key_by_hash(&hash("g2")).await.unwrap().unwrap().id, g2);
    let first = &s.adjustments(g1).await.unwrap()[0];
    assert_eq!((first.delta, first.actor.as_str()), (cr("10"), "config"));

    // A restart never refills: the balance is kept.
    s.reserve(g1, cr("3")).await.unwrap();
    s.settle(usage(g1, cr("3")), cr("3")).await.unwrap();
    let report = s
        .sync_grants(&[grant("g1", "10"), grant("g2", "5")])
        .await
        .unwrap();
    assert_eq!(report, GrantReport::default());
    assert_eq!(balance(s, g1).await, cr("7"));

    // A grant taken out of the configuration is disabled; others stay.
    let report = s.sync_grants(&[grant("g1", "10")]).await.unwrap();
    assert_eq!(report.disabled, vec![g2]);
    assert!(report.created.is_empty() && report.reenabled.is_empty());
    let k2 = s.key(g2).await.unwrap().unwrap();
    assert!(k2.disabled && !k2.is_active(now_millis()));
    assert!(!s.key(manual).await.unwrap().unwrap().disabled);
    assert!(!s.key(g1).await.unwrap().unwrap().disabled);
    // Disabled stays disabled without being reported again.
    let report = s.sync_grants(&[grant("g1", "10")]).await.unwrap();
    assert_eq!(report, GrantReport::default());

    // Put back: re-enabled with its old balance.
    s.adjust(g2, set("4.5")).await.unwrap();
    let report = s
        .sync_grants(&[grant("g2", "100"), grant("g1", "10"), grant("g3", "1")])
        .await
        .unwrap();
    assert_eq!(report.reenabled, vec![g2]);
    assert_eq!(report.created.len(), 1);
    let g3 = report.created[0];
    assert!(report.disabled.is_empty());
    let k2 = s.key(g2).await.unwrap().unwrap();
    assert!(!k2.disabled && k2.is_active(now_millis()));
    assert_eq!(k2.balance, cr("4.5"));

    // An empty configuration disables every granted key, in id order.
    let report = s.sync_grants(&[]).await.unwrap();
    let mut expected = vec![g1, g2, g3];
    expected.sort();
    assert_eq!(report.disabled, expected);
    assert!(!s.key(manual).await.unwrap().unwrap().disabled);
    for id in [g1, g2] {
        assert_ledger_adds_up(s, id).await;
    }
}

/// A secret moved between `ADMIN_KEY` and `API_KEY`/`API_KEYS` takes the
/// role of the variable that now names it; its balance stays.
async fn sync_grants_sets_the_configured_role(h: &Harness) {
    let s = &h.store;
    let admin = Grant {
        role: Role::Admin,
        ..grant("old-admin", "0")
    };
    let id = s.sync_grants(&[admin]).await.unwrap().created[0];
    assert_eq!(s.key(id).await.unwrap().unwrap().role, Role::Admin);
    // Now an ordinary key.
    let report = s.sync_grants(&[grant("old-admin", "10")]).await.unwrap();
    assert_eq!(report.role_changed, vec![id]);
    assert!(report.created.is_empty() && report.disabled.is_empty());
    let key = s.key(id).await.unwrap().unwrap();
    assert_eq!(key.role, Role::User);
    assert_eq!(
        s.key_by_hash(&hash("old-admin"))
            .await
            .unwrap()
            .unwrap()
            .role,
        Role::User
    );
    // Unchanged from then on.
    let report = s.sync_grants(&[grant("old-admin", "10")]).await.unwrap();
    assert_eq!(report, GrantReport::default());
    // And back.
    let admin = Grant {
        role: Role::Admin,
        ..grant("old-admin", "0")
    };
    assert_eq!(
        s.sync_grants(&[admin]).await.unwrap().role_changed,
        vec![id]
    );
    assert_eq!(s.key(id).await.unwrap().unwrap().role, Role::Admin);
}

async fn revoke_keeps_the_first_time(h: &Harness) {
    let s = &h.store;
    let k = s.create_key(new_key("k", cr("1"))).await.unwrap();
    assert!(k.is_active(now_millis()));
    let revoked = s.revoke_key(k.id, 1_700_000_000_000).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(1_700_000_000_000));
    assert!(!revoked.is_active(now_millis()));
    let again = s.revoke_key(k.id, 1_800_000_000_000).await.unwrap();
    assert_eq!(again.revoked_at, Some(1_700_000_000_000));
    assert_eq!(s.key(k.id).await.unwrap(), Some(again.clone()));
    assert_eq!(s.key_by_hash(&hash("k")).await.unwrap(), Some(again));
    match s.revoke_key(k.id + 1000, 1).await {
        Err(StoreError::NoSuchKey(_)) => {}
        other => panic!("expected NoSuchKey, got {other:?}"),
    }
}

async fn update_key_patches(h: &Harness) {
    let s = &h.store;
    let mut new = new_key("k", cr("1"));
    new.models = Some(vec!["mistral".into()]);
    new.rate_limit_rpm = Some(60);
    new.expires_at = Some(4_000_000_000_000);
    let k = s.create_key(new).await.unwrap();

    let renamed = s
        .update_key(
            k.id,
            KeyPatch {
                name: Some("renamed".into()),
                ..KeyPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        renamed,
        KeyRecord {
            name: "renamed".into(),
            ..k.clone()
        }
    );

    let patched = s
        .update_key(
            k.id,
            KeyPatch {
                name: None,
                models: Some(None),
                rate_limit_rpm: Some(Some(30)),
                max_concurrent: Some(Some(3)),
                expires_at: Some(None),
            },
        )
        .await
        .unwrap();
    let expected = KeyRecord {
        name: "renamed".into(),
        models: None,
        rate_limit_rpm: Some(30),
        max_concurrent: Some(3),
        expires_at: None,
        ..k.clone()
    };
    assert_eq!(patched, expected);
    assert_eq!(s.key(k.id).await.unwrap(), Some(expected.clone()));

    let patched = s
        .update_key(
            k.id,
            KeyPatch {
                models: Some(Some(vec!["a".into(), "b:7b".into()])),
                rate_limit_rpm: Some(None),
                expires_at: Some(Some(5)),
                ..KeyPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.models, Some(vec!["a".into(), "b:7b".into()]));
    assert_eq!(patched.rate_limit_rpm, None);
    assert_eq!(patched.max_concurrent, Some(3));
    assert_eq!(patched.expires_at, Some(5));
    assert!(!patched.is_active(now_millis()));
    assert_eq!(s.key(k.id).await.unwrap(), Some(patched));

    // An empty patch changes nothing; balances are not touched by patches.
    let same = s.update_key(k.id, KeyPatch::default()).await.unwrap();
    assert_eq!(s.key(k.id).await.unwrap(), Some(same.clone()));
    assert_eq!(same.balance, cr("1"));
    match s.update_key(k.id + 1000, KeyPatch::default()).await {
        Err(StoreError::NoSuchKey(_)) => {}
        other => panic!("expected NoSuchKey, got {other:?}"),
    }
}

async fn usage_pages_newest_first(h: &Harness) {
    let s = &h.store;
    let a = s.create_key(new_key("a", cr("100"))).await.unwrap().id;
    let b = s.create_key(new_key("b", cr("100"))).await.unwrap().id;
    let mut expected = Vec::new();
    for i in 0..7u64 {
        let key = if i % 2 == 0 { a } else { b };
        let mut u = usage(key, Credits::from_millis(i as i64));
        u.endpoint = format!("/e{i}");
        u.prompt_tokens = i;
        s.settle(u.clone(), Credits::ZERO).await.unwrap();
        expected.push(u);
    }
    expected.reverse();

    let all = s
        .usage(
            None,
            PageRequest {
                limit: 100,
                before: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|e| e.record.clone()).collect::<Vec<_>>(),
        expected
    );
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "ids descend");

    // Paging with the cursor visits every row once.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = s
            .usage(None, PageRequest { limit: 3, before })
            .await
            .unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        paged.extend(page);
    }
    assert_eq!(paged, all);

    let of_a = s
        .usage(
            Some(a),
            PageRequest {
                limit: 2,
                before: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        of_a.iter()
            .map(|e| e.record.endpoint.as_str())
            .collect::<Vec<_>>(),
        vec!["/e6", "/e4"]
    );
    let rest = s
        .usage(
            Some(a),
            PageRequest {
                limit: 10,
                before: Some(of_a[1].id),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        rest.iter()
            .map(|e| e.record.endpoint.as_str())
            .collect::<Vec<_>>(),
        vec!["/e2", "/e0"]
    );
    let of_b = s
        .usage(
            Some(b),
            PageRequest {
                limit: 10,
                before: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(of_b.len(), 3);
    assert!(of_b.iter().all(|e| e.record.key_id == b));
    assert!(s
        .usage(
            Some(a),
            PageRequest {
                limit: 0,
                before: None
            }
        )
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .usage(
            None,
            PageRequest {
                limit: 10,
                before: Some(all[6].id)
            }
        )
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .usage(
            Some(b + 1000),
            PageRequest {
                limit: 10,
                before: None
            }
        )
        .await
        .unwrap()
        .is_empty());
}

/// A model name is the client's: whatever it holds (here a NUL, valid in
/// JSON and not storable in PostgreSQL's text), the request is charged and
/// recorded and its reservation released. PostgreSQL records U+FFFD for NUL.
async fn any_model_name_is_recorded(h: &Harness) {
    let s = &h.store;
    let k = s.create_key(new_key("k", cr("10"))).await.unwrap().id;
    s.reserve(k, cr("3")).await.unwrap();
    let mut record = usage(k, cr("1"));
    record.model = Some("evil\0model".into());
    assert_eq!(s.settle(record, cr("3")).await.unwrap(), cr("9"));
    let page = newest_usage(s, k).await;
    let recorded = match h.backend {
        Backend::Postgres { .. } => "evil\u{FFFD}model",
        _ => "evil\0model",
    };
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].record.model.as_deref(), Some(recorded));
    assert_eq!(s.reserve(k, cr("9")).await.unwrap(), Credits::ZERO);
    assert_ledger_adds_up(s, k).await;
}

/// Key names and adjustment reasons are the admin's: a NUL in them is
/// kept (PostgreSQL: U+FFFD), and what a write answers is what is stored.
async fn any_key_name_is_kept(h: &Harness) {
    let s = &h.store;
    let nul = |text: &str| match h.backend {
        Backend::Postgres { .. } => text.replace('\0', "\u{FFFD}"),
        _ => text.to_string(),
    };
    let mut new = new_key("k", cr("10"));
    new.name = "a\0b".into();
    let created = s.create_key(new).await.unwrap();
    assert_eq!(created.name, nul("a\0b"));
    let renamed = s
        .update_key(
            created.id,
            KeyPatch {
                name: Some("c\0d".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(renamed.name, nul("c\0d"));
    let stored = s.key(created.id).await.unwrap().unwrap();
    assert_eq!(stored.name, renamed.name);
    let mut topup = add("1");
    topup.actor = "ad\0min".into();
    topup.reason = "because\0".into();
    assert_eq!(s.adjust(created.id, topup).await.unwrap(), cr("11"));
    let adjustments = s.adjustments(created.id).await.unwrap();
    assert_eq!(adjustments.len(), 2);
    assert_eq!(adjustments[1].actor, nul("ad\0min"));
    assert_eq!(adjustments[1].reason, nul("because\0"));
    assert_ledger_adds_up(s, created.id).await;
}

/// Token counts beyond a 64-bit SQL integer (an upstream's absurd count)
/// are kept as the largest one; the totals stop there too instead of
/// failing the key's settlements from then on.
async fn usage_totals_stop_at_the_largest_count(h: &Harness) {
    let s = &h.store;
    let k = s.create_key(new_key("k", cr("100"))).await.unwrap().id;
    for _ in 0..3 {
        let mut record = usage(k, cr("1"));
        record.prompt_tokens = u64::MAX;
        s.settle(record, Credits::ZERO).await.unwrap();
    }
    s.settle(usage(k, cr("1")), Credits::ZERO).await.unwrap();
    let totals = s.usage_totals(k).await.unwrap();
    assert_eq!(totals.requests, 4);
    assert!(totals.prompt_tokens >= i64::MAX as u64, "{totals:?}");
    assert_eq!(totals.completion_tokens, 80);
    assert_eq!(totals.credits_spent, cr("4"));
    assert_eq!(balance(s, k).await, cr("96"));
}

async fn usage_totals_add_up(h: &Harness) {
    let s = &h.store;
    let a = s.create_key(new_key("a", cr("100"))).await.unwrap().id;
    let b = s.create_key(new_key("b", cr("100"))).await.unwrap().id;
    assert_eq!(s.usage_totals(a).await.unwrap(), UsageTotals::default());
    for (key, prompt, completion, credits) in [
        (a, 100, 20, "1.001"),
        (a, 5, 0, "0"),
        (b, 7, 7, "9"),
        (a, 3_000_000_000, 1, "0.25"),
    ] {
        let mut u = usage(key, cr(credits));
        u.prompt_tokens = prompt;
        u.completion_tokens = completion;
        s.settle(u, Credits::ZERO).await.unwrap();
    }
    assert_eq!(
        s.usage_totals(a).await.unwrap(),
        UsageTotals {
            requests: 3,
            prompt_tokens: 3_000_000_105,
            completion_tokens: 21,
            credits_spent: cr("1.251"),
        }
    );
    assert_eq!(s.usage_totals(b).await.unwrap().credits_spent, cr("9"));
    assert_eq!(
        s.usage_totals(b + 1000).await.unwrap(),
        UsageTotals::default()
    );
    assert_eq!(balance(s, a).await, cr("98.749"));
}

// ---------------------------------------------------------------------------
// Store-specific behaviour

/// The memory store keeps the most recent usage rows only, with ids that
/// go on counting; balances and totals count every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_keeps_the_last_usage_rows_and_every_request_in_the_totals() {
    let s: SharedStore = Arc::new(MemoryStore::keeping(3));
    let k = s.create_key(new_key("k", cr("10"))).await.unwrap().id;
    for _ in 0..5 {
        s.settle(usage(k, cr("1")), Credits::ZERO).await.unwrap();
    }
    let ids: Vec<i64> = newest_usage(&s, k).await.iter().map(|e| e.id).collect();
    assert_eq!(ids, [5, 4, 3]);
    let older = s
        .usage(
            None,
            PageRequest {
                limit: 10,
                before: Some(4),
            },
        )
        .await
        .unwrap();
    assert_eq!(older.iter().map(|e| e.id).collect::<Vec<_>>(), [3]);
    assert_eq!(s.usage_totals(k).await.unwrap().requests, 5);
    assert_eq!(s.usage_totals(k).await.unwrap().credits_spent, cr("5"));
    assert_eq!(balance(&s, k).await, cr("5"));
}

/// A new SQLite file with a store open on it: the directory (removed when
/// dropped), the file's path and the store.
async fn sqlite_file(name: &str) -> (tempfile::TempDir, std::path::PathBuf, SharedStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let store: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    (dir, path, store)
}

/// Applying the journal panics (a bug): before its commit or after it.
/// The settlement, answered from the journal, reaches the file exactly
/// once all the same; nothing stays held, and the store goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_panic_while_applying_the_journal_loses_nothing() {
    for at in [PanicAt::Applying, PanicAt::Commit] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("panic.db");
        let sqlite = Arc::new(SqliteStore::open(&path).await.unwrap());
        let store: SharedStore = sqlite.clone();
        let k = store.create_key(new_key("k", cr("10"))).await.unwrap().id;
        let other = store.create_key(new_key("o", cr("10"))).await.unwrap().id;
        store.reserve(k, cr("4")).await.unwrap();
        sqlite.panic_in_next_batch(at);
        assert_eq!(
            store.settle(usage(k, cr("1")), cr("4")).await.unwrap(),
            cr("9"),
            "{at:?}"
        );
        // The writer thread applies it on its own (and panics), then again.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!sqlite.panic_to_come(), "{at:?}: the writer did not panic");
        assert_eq!(store.usage_totals(k).await.unwrap().requests, 1, "{at:?}");
        assert_eq!(balance(&store, k).await, cr("9"), "{at:?}");
        assert_eq!(
            store.reserve(k, cr("9")).await.unwrap(),
            Credits::ZERO,
            "{at:?}: credits still held"
        );
        assert_ledger_adds_up(&store, k).await;
        assert_eq!(store.adjust(other, add("1")).await.unwrap(), cr("11"));
        drop((store, sqlite));
        let reopened: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
        assert_eq!(balance(&reopened, k).await, cr("9"), "{at:?}");
        assert_ledger_adds_up(&reopened, k).await;
    }
}

/// Another connection to `path` holding its write lock, as the CLI does
/// during its transaction, until it commits or rolls back.
fn hold_write_lock(path: &std::path::Path) -> rusqlite::Connection {
    let blocker = rusqlite::Connection::open(path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    blocker
}

/// Settles `usage`, releasing `reserved`, and waits until the SQLite file
/// has it (`close` applies the settlement journal), so that each settlement
/// is a transaction of the writer's.
async fn settle_into_the_file(store: &SharedStore, usage: UsageRecord, reserved: Credits) {
    store.settle(usage, reserved).await.unwrap();
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not/yet/there.db");
    let (id, keys, usage_rows, adjustments) = {
        let s: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
        let id = s.create_key(new_key("k", cr("10"))).await.unwrap().id;
        s.reserve(id, cr("2")).await.unwrap();
        s.settle(usage(id, cr("1.5")), cr("2")).await.unwrap();
        s.adjust(id, add("0.25")).await.unwrap();
        s.sync_grants(&[grant("g", "3")]).await.unwrap();
        s.revoke_key(id, 42).await.unwrap();
        // A reservation that is never settled dies with the process.
        s.reserve(id, cr("8")).await.unwrap();
        let page = PageRequest {
            limit: 10,
            before: None,
        };
        (
            id,
            s.keys().await.unwrap(),
            s.usage(None, page).await.unwrap(),
            s.adjustments(id).await.unwrap(),
        )
    };
    let s: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    s.release_stale_reservations().await.unwrap();
    assert_eq!(s.keys().await.unwrap(), keys);
    assert_eq!(balance(&s, id).await, cr("8.75"));
    let page = PageRequest {
        limit: 10,
        before: None,
    };
    assert_eq!(s.usage(None, page).await.unwrap(), usage_rows);
    assert_eq!(s.adjustments(id).await.unwrap(), adjustments);
    assert_eq!(s.reserve(id, cr("8.75")).await.unwrap(), Credits::ZERO);
    assert_ledger_adds_up(&s, id).await;
    let report = s.sync_grants(&[grant("g", "3")]).await.unwrap();
    assert_eq!(report, GrantReport::default(), "no refill after a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_version_1_file_is_migrated_with_its_ledger() {
    // A file as the first release left it: schema version 1, with
    // AUTOINCREMENT ledger tables holding rows.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(include_str!("../../migrations/sqlite/0001_init.sql"))
            .unwrap();
        conn.execute_batch(
            "PRAGMA user_version = 1;
             INSERT INTO api_keys (id, key_hash, name, role, balance, created_at)
                 VALUES (7, 'h', 'old', 'user', 9000, 1);
             INSERT INTO adjustments (time, key_id, delta, actor, reason)
                 VALUES (1, 7, 10000, 'cli', 'create');
             INSERT INTO usage (time, key_id, endpoint, model, status, prompt_tokens,
                                completion_tokens, credits, duration_ms)
                 VALUES (2, 7, '/api/chat', 'm', 200, 1, 2, 400, 3),
                        (3, 7, '/api/chat', 'm', 200, 1, 2, 600, 3);
             DELETE FROM usage WHERE id = 1;",
        )
        .unwrap();
    }
    let s: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    let page = PageRequest {
        limit: 10,
        before: None,
    };
    let rows = s.usage(Some(7), page).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), [2]);
    assert_eq!(rows[0].record.credits, cr("0.6"));
    assert_eq!(s.adjustments(7).await.unwrap()[0].delta, cr("10"));
    // Version 3 summed the ledger into the key's totals.
    let totals = UsageTotals {
        requests: 1,
        prompt_tokens: 1,
        completion_tokens: 2,
        credits_spent: cr("0.6"),
    };
    assert_eq!(s.usage_totals(7).await.unwrap(), totals);
    // New rows go after the old ones, and add to the totals.
    s.settle(usage(7, cr("1")), Credits::ZERO).await.unwrap();
    let rows = s.usage(Some(7), page).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), [3, 2]);
    assert_eq!(balance(&s, 7).await, cr("8"));
    let totals = UsageTotals {
        requests: 2,
        prompt_tokens: 11,
        completion_tokens: 22,
        credits_spent: cr("1.6"),
    };
    assert_eq!(s.usage_totals(7).await.unwrap(), totals);
    drop(s);

    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
    let sql: String = conn
        .query_row(
            "SELECT group_concat(sql, ';') FROM sqlite_master WHERE name IN ('usage', 'adjustments')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!sql.contains("AUTOINCREMENT"), "{sql}");
    let indexes: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' \
             AND name IN ('usage_key_id_id', 'adjustments_key_id_id')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_handles_on_one_file_compose() {
    // The CLI opens the file while the gateway runs: relative balance
    // changes from both compose.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let gateway: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    let cli: SharedStore = Arc::new(SqliteStore::open_beside(&path).await.unwrap());
    let id = gateway
        .create_key(new_key("k", cr("100")))
        .await
        .unwrap()
        .id;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (g, c) = (gateway.clone(), cli.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                g.reserve(id, cr("1")).await.unwrap();
                g.settle(usage(id, cr("1")), cr("1")).await.unwrap();
            } else {
                c.adjust(id, add("0.5")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Each handle sees the other's commits once they are LOOK_EVERY old;
    // the gateway's settlements, once applied from its journal.
    gateway.close().await;
    tokio::time::sleep(LOOK_EVERY + std::time::Duration::from_millis(1)).await;
    assert_eq!(balance(&cli, id).await, cr("95"));
    assert_eq!(balance(&gateway, id).await, cr("95"));
    assert_ledger_adds_up(&gateway, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sees_what_other_processes_commit() {
    // The gateway keeps the keys in memory; what another process (the CLI,
    // or any SQLite client) commits to the file must reach it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let gateway: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    let cli: SharedStore = Arc::new(SqliteStore::open_beside(&path).await.unwrap());
    let id = gateway.create_key(new_key("k", cr("10"))).await.unwrap().id;

    // Seen by every lookup that starts LOOK_EVERY after the commit.
    let settle_in = || tokio::time::sleep(LOOK_EVERY + std::time::Duration::from_millis(1));
    assert_eq!(cli.adjust(id, add("5")).await.unwrap(), cr("15"));
    settle_in().await;
    let key = gateway.key_by_hash(&hash("k")).await.unwrap().unwrap();
    assert_eq!(key.balance, cr("15"));
    cli.revoke_key(id, 42).await.unwrap();
    settle_in().await;
    assert_eq!(gateway.key(id).await.unwrap().unwrap().revoked_at, Some(42));
    // A new key is looked for sooner: a script creates one and uses it at
    // once, right after the gateway looked (the `key` call above).
    let other = cli.create_key(new_key("other", cr("1"))).await.unwrap().id;
    tokio::time::sleep(LOOK_FOR_UNKNOWN + std::time::Duration::from_millis(1)).await;
    let found = gateway.key_by_hash(&hash("other")).await.unwrap();
    assert_eq!(found.map(|k| k.id), Some(other));
    assert_eq!(
        gateway.reserve(other, cr("1")).await.unwrap(),
        Credits::ZERO
    );
    // And the other way round, once the gateway has applied its journal.
    gateway
        .settle(usage(other, cr("0.5")), cr("1"))
        .await
        .unwrap();
    gateway.close().await;
    settle_in().await;
    assert_eq!(balance(&cli, other).await, cr("0.5"));
    // The CLI's store makes no settlements: the gateway's journal is its.
    assert!(matches!(
        cli.settle(usage(other, cr("0.1")), Credits::ZERO).await,
        Err(StoreError::Backend(_))
    ));

    // A plain connection, and no lookup in between: the writer notices the
    // commit by itself (within 50 ms when idle), so that `reserve`, which
    // does not look, sees it too.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE api_keys SET balance = 0 WHERE id = ?1", [other])
        .unwrap();
    drop(conn);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        refused_with(gateway.reserve(other, cr("0.1")).await),
        Credits::ZERO
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_checkpoints_the_wal_while_serving() {
    // Commits only append to the WAL; the checkpoint thread writes the
    // pages back to the file itself, which therefore grows.
    let (_dir, path, store) = sqlite_file("wal.db").await;
    let id = store
        .create_key(new_key("k", cr("100000")))
        .await
        .unwrap()
        .id;
    let before = std::fs::metadata(&path).unwrap().len();
    // One batch each.
    for _ in 0..2 * CHECKPOINT_EVERY + 10 {
        store.reserve(id, cr("1")).await.unwrap();
        settle_into_the_file(&store, usage(id, cr("1")), cr("1")).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::metadata(&path).unwrap().len() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the file never grew from {before} bytes: no checkpoint"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Settles `each` charges of 1 from each of 32 tasks at once on a new key
/// of the SQLite file `name`, each waiting until the file has it (which
/// keeps the writer busy without a pause:
/// well over a hundred checkpoints' worth of batches), with `reader`
/// running on its own thread on the file meanwhile if given (it is told to
/// stop by the flag). Returns the largest size the WAL file had.
async fn largest_wal_while_settling(
    name: &str,
    each: i64,
    reader: Option<fn(&std::path::Path, &std::sync::atomic::AtomicBool)>,
) -> u64 {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (_dir, path, store) = sqlite_file(name).await;
    let wal = path.with_file_name(format!("{name}-wal"));
    let id = store
        .create_key(new_key("k", cr("100000000")))
        .await
        .unwrap()
        .id;
    let done = Arc::new(AtomicBool::new(false));
    let reader = reader.map(|read| {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || read(&path, &done))
    });
    let largest = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (largest, done) = (largest.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                largest.fetch_max(size, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..each {
                store.reserve(id, cr("1")).await.unwrap();
                settle_into_the_file(&store, usage(id, cr("1")), cr("1")).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    if let Some(reader) = reader {
        reader.join().unwrap();
    }
    let spent = Credits::whole(32 * each);
    assert_eq!(balance(&store, id).await, cr("100000000") - spent);
    largest.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_stays_bounded_under_sustained_writes() {
    // A passive checkpoint copies the frames that were there when it began.
    // Under sustained load the writer commits while it runs, so the WAL is
    // never wholly copied back and SQLite never starts it over: it grew by
    // every commit (at saturation, ~100 MB a second). The writer finishes
    // each checkpoint between two batches, so the next one starts the WAL
    // over.
    let largest = largest_wal_while_settling("bounded.db", 2_000, None).await;
    // 200 batches of a few 4 KiB frames each between checkpoints, and what
    // is committed while one runs: 4-6 MiB seen. Without the WAL started
    // over, these settlements left 70 MiB of it.
    assert!(
        largest < 24 << 20,
        "the WAL grew to {largest} bytes: it is never started over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_stays_bounded_while_readers_never_stop() {
    // A reader that holds the WAL keeps SQLite from starting it over; one
    // that reads without pause (a dashboard polling `/usage`, an export, a
    // key holder's loop) held it off for good, and the WAL grew by every
    // commit again. Past a size, the writer waits briefly for the readers
    // to move off the WAL and starts it over itself.
    fn read_without_pause(path: &std::path::Path, done: &std::sync::atomic::AtomicBool) {
        let conn = rusqlite::Connection::open(path).unwrap();
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            conn.execute_batch("BEGIN").unwrap();
            let _: i64 = conn
                .query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            conn.execute_batch("COMMIT").unwrap();
        }
    }
    let largest = largest_wal_while_settling("readers.db", 4_000, Some(read_without_pause)).await;
    // 16 MiB before the writer steps in, and what a checkpoint's round
    // adds: 19-20 MiB seen (also with the suite running alongside and two
    // more busy processes). Without it, 148 MiB.
    assert!(
        largest < 64 << 20,
        "the WAL grew to {largest} bytes while a reader held it"
    );
}

/// A reader that never lets go of its snapshot (a shell left in a
/// transaction, a backup tool) keeps the WAL from starting over for as
/// long as it holds it; the writer's wait for it, which holds up every
/// settlement, comes once the WAL is 16 MiB long and then only each time
/// it has doubled, not at every round of batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_reader_that_never_lets_go_is_waited_for_seldom() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.db");
    let wal_path = path.with_file_name("held.db-wal");
    let sqlite = Arc::new(SqliteStore::open(&path).await.unwrap());
    let store: SharedStore = sqlite.clone();
    let id = store
        .create_key(new_key("k", cr("100000000")))
        .await
        .unwrap()
        .id;
    let reader = rusqlite::Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
        .unwrap();
    // Settlements until the WAL is past 40 MiB (how many that takes
    // depends on how the writer batches them).
    let wal = || std::fs::metadata(&wal_path).map_or(0, |m| m.len());
    let mut settled = 0;
    while wal() < 40 << 20 && settled < 400_000 {
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..250 {
                    store.reserve(id, cr("1")).await.unwrap();
                    settle_into_the_file(&store, usage(id, cr("1")), cr("1")).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        settled += 32 * 250;
    }
    let wal = wal();
    reader.execute_batch("COMMIT").unwrap();
    assert!(wal >= 40 << 20, "the WAL reached only {wal} bytes");
    // A wait at 16 MiB, then one each time the WAL doubled (at most two
    // more by 64 MiB, three by 128); without the doubling, one at every
    // checkpoint round past 16 MiB: dozens.
    let restarts = sqlite.restarts();
    let most = 1 + (wal / (16 << 20)).ilog2() as u64;
    assert!(
        (1..=most).contains(&restarts),
        "{restarts} waits for the reader, the WAL at {wal} bytes"
    );
    assert_eq!(
        balance(&store, id).await,
        cr("100000000") - Credits::whole(settled)
    );
}

/// A settlement the database refuses fails alone, even when it arrived in
/// one batch with others, and gives its reservation back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_refused_settlement_fails_alone() {
    let Some(h) = Harness::postgres().await else {
        return;
    };
    let Backend::Postgres { options, .. } = &h.backend else {
        unreachable!("a postgres harness");
    };
    // What the server will refuse: a usage row with 5 in the last digit of
    // its prompt tokens.
    let mut admin = PgConnection::connect_with(options).await.unwrap();
    sqlx::query("ALTER TABLE usage ADD CONSTRAINT refuse_fives CHECK (prompt_tokens % 10 <> 5)")
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    let s = h.store.clone();
    let k = s.create_key(new_key("k", cr("100"))).await.unwrap().id;
    for _ in 0..30 {
        s.reserve(k, cr("2")).await.unwrap();
    }
    // The key's row locked elsewhere: the first batch waits for it, and the
    // other settlements pile up behind it into one batch.
    let blocker = lock_key_row(options, k).await;
    let mut tasks = Vec::new();
    for i in 0..30u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut record = usage(k, cr("1"));
            record.prompt_tokens = i;
            (i, s.settle(record, cr("2")).await)
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    unlock(blocker).await;
    for task in tasks {
        match task.await.expect("task") {
            (i, Err(StoreError::Backend(_))) if i % 10 == 5 => {}
            (i, Ok(_)) if i % 10 != 5 => {}
            (i, other) => panic!("settlement {i}: unexpected {other:?}"),
        }
    }
    // 27 charged; the three refused held nothing afterwards.
    assert_eq!(balance(&s, k).await, cr("73"));
    assert_eq!(s.usage_totals(k).await.unwrap().requests, 27);
    assert_eq!(s.reserve(k, cr("73")).await.unwrap(), Credits::ZERO);
    assert_ledger_adds_up(&s, k).await;
    h.finish().await;
}

/// Key lookups may be answered from a cache: this store's own writes are
/// seen at once, another gateway's within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_key_lookups_see_writes_in_time() {
    let Some(h) = Harness::postgres().await else {
        return;
    };
    let s = h.store.clone();
    let other = h.second_gateway().await;
    let k = s.create_key(new_key("k", cr("10"))).await.unwrap().id;
    let lookup = || async { s.key_by_hash(&hash("k")).await.unwrap().unwrap() };
    assert_eq!(lookup().await.balance, cr("10"));
    // Its own writes, at once.
    s.adjust(k, add("1")).await.unwrap();
    assert_eq!(lookup().await.balance, cr("11"));
    s.revoke_key(k, 42).await.unwrap();
    assert_eq!(lookup().await.revoked_at, Some(42));
    // Another gateway's, within the bound.
    other
        .update_key(
            k,
            KeyPatch {
                name: Some("renamed".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(lookup().await.name, "renamed");
    // `key` is never cached.
    other.adjust(k, add("1")).await.unwrap();
    assert_eq!(balance(&s, k).await, cr("12"));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_settles_while_another_connection_holds_the_lock() {
    // While another connection holds the write lock, settlements are
    // answered at once (the journal needs no lock), reservations go on
    // (they run no SQL), and so do lookups that look for other processes'
    // commits; the writer waits to apply the journal, and the lookups see
    // what that connection committed once it has.
    let (_dir, path, store) = sqlite_file("stuck.db").await;
    let a = store.create_key(new_key("a", cr("10"))).await.unwrap().id;
    let b = store.create_key(new_key("b", cr("10"))).await.unwrap().id;
    assert_eq!(store.reserve(a, cr("1")).await.unwrap(), cr("9"));

    let blocker = hold_write_lock(&path);
    assert_eq!(
        store.settle(usage(a, cr("1")), cr("1")).await.unwrap(),
        cr("9")
    );
    for id in [a, b] {
        store.reserve(id, cr("2")).await.unwrap();
    }
    // Past LOOK_EVERY since the last look: this lookup looks, which needs
    // no lock.
    let look = || async {
        tokio::time::sleep(LOOK_EVERY + std::time::Duration::from_millis(1)).await;
        let key = store.key_by_hash(&hash("b")).await.unwrap().unwrap();
        (key.id, key.balance)
    };
    // Not held up by the writer, which cannot apply the settlement yet.
    let looked = tokio::time::timeout(std::time::Duration::from_secs(2), look()).await;
    assert_eq!(looked.expect("the look waited for the lock"), (b, cr("10")));
    blocker
        .execute(
            "UPDATE api_keys SET balance = balance + 5000 WHERE id = ?1",
            [b],
        )
        .unwrap();
    blocker.execute_batch("COMMIT").unwrap();
    assert_eq!(look().await, (b, cr("15")));
    assert_eq!(store.usage_totals(a).await.unwrap().requests, 1);
    assert_eq!(store.reserve(a, cr("7")).await.unwrap(), Credits::ZERO);
    assert_eq!(store.reserve(b, cr("13")).await.unwrap(), Credits::ZERO);
    assert_ledger_adds_up(&store, a).await;
}

#[tokio::test(flavor = "current_thread")]
async fn sqlite_a_locked_file_never_blocks_the_requests_thread() {
    // A write may be carried out on the task that asks for it; when
    // another connection holds the write lock, it waits on the writer
    // thread, never on the runtime's thread. On this runtime's one
    // thread, a write that waited there would keep the test from
    // releasing the lock until `busy_timeout` gave up, and would fail.
    let (_dir, path, store) = sqlite_file("locked.db").await;
    let a = store.create_key(new_key("a", cr("10"))).await.unwrap().id;
    // Unlocked: answered on this thread, nothing else involved.
    assert_eq!(store.adjust(a, add("1")).await.unwrap(), cr("11"));

    let blocker = hold_write_lock(&path);
    let adjusting = {
        let store = store.clone();
        tokio::spawn(async move { store.adjust(a, add("1")).await })
    };
    // The adjustment starts, finds the lock taken, and is handed over;
    // meanwhile this thread goes on: reservations, settlements, timers.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !adjusting.is_finished(),
        "the adjustment waits for the lock"
    );
    assert_eq!(store.reserve(a, cr("2")).await.unwrap(), cr("9"));
    assert_eq!(
        store.settle(usage(a, cr("1")), cr("2")).await.unwrap(),
        cr("10")
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    adjusting.await.unwrap().unwrap();
    assert_eq!(balance(&store, a).await, cr("11"));
    // And the writer is back on the requests' tasks.
    assert_eq!(store.adjust(a, add("1")).await.unwrap(), cr("12"));
    assert_ledger_adds_up(&store, a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_settlement_that_fails_gives_its_reservation_back() {
    // A settlement the journal cannot take (a full disk), or one that no
    // balance can take, fails, charges nothing, and gives its reservation
    // back.
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(
        SqliteStore::open(&dir.path().join("failing.db"))
            .await
            .unwrap(),
    );
    let store: SharedStore = sqlite.clone();
    let a = store.create_key(new_key("a", cr("10"))).await.unwrap().id;
    store.reserve(a, cr("4")).await.unwrap();
    sqlite.fail_journal_appends(true);
    assert!(matches!(
        store.settle(usage(a, cr("1")), cr("4")).await,
        Err(StoreError::Backend(_))
    ));
    sqlite.fail_journal_appends(false);
    assert_eq!(store.reserve(a, cr("10")).await.unwrap(), Credits::ZERO);
    assert_eq!(
        store.settle(usage(a, cr("10.5")), cr("10")).await.unwrap(),
        cr("-0.5")
    );
    store.reserve(a, Credits::ZERO).await.unwrap_err();
    assert!(matches!(
        store
            .settle(usage(a, Credits::from_millis(i64::MAX)), Credits::ZERO)
            .await,
        Err(StoreError::Backend(_))
    ));
    assert_eq!(balance(&store, a).await, cr("-0.5"));
    assert_eq!(store.usage_totals(a).await.unwrap().requests, 1);
    assert_ledger_adds_up(&store, a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_journal_the_file_cannot_take_for_a_while_loses_nothing() {
    // Another connection keeps the write lock longer than the writer waits
    // for it (5 s): settlements are answered all the same, each with the
    // balance it left; reads of the ledger fail meanwhile rather than
    // answer without them, and so do writes; once the lock is free, every
    // settlement reaches the file exactly once.
    let (_dir, path, store) = sqlite_file("waiting.db").await;
    let a = store.create_key(new_key("a", cr("100"))).await.unwrap().id;
    let b = store.create_key(new_key("b", cr("100"))).await.unwrap().id;

    let blocker = hold_write_lock(&path);
    let (mut balance_a, mut balance_b) = (cr("100"), cr("100"));
    for i in 0..12i64 {
        let (key, left) = if i % 3 == 2 {
            (b, &mut balance_b)
        } else {
            (a, &mut balance_a)
        };
        let credits = Credits::from_millis(500 + i);
        *left -= credits;
        let answer = store.settle(usage(key, credits), Credits::ZERO).await;
        assert_eq!(answer.unwrap(), *left, "settlement {i}");
    }
    // Together: an adjustment made meanwhile fails too rather than land
    // before the settlements answered before it.
    let adjusting = {
        let store = store.clone();
        tokio::spawn(async move { store.adjust(a, set("1")).await })
    };
    assert!(matches!(
        store.usage_totals(a).await,
        Err(StoreError::Backend(_))
    ));
    assert!(matches!(
        adjusting.await.unwrap(),
        Err(StoreError::Backend(_))
    ));
    blocker.execute_batch("ROLLBACK").unwrap();
    balance_a += cr("10");
    assert_eq!(store.adjust(a, add("10")).await.unwrap(), balance_a);
    assert_eq!(store.usage_totals(a).await.unwrap().requests, 8);
    assert_eq!(store.usage_totals(b).await.unwrap().requests, 4);
    assert_eq!(balance(&store, a).await, balance_a);
    assert_eq!(balance(&store, b).await, balance_b);
    assert_ledger_adds_up(&store, a).await;
    assert_ledger_adds_up(&store, b).await;
    drop(store);
    let reopened: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    assert_eq!(balance(&reopened, a).await, balance_a);
    assert_eq!(balance(&reopened, b).await, balance_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_batch_that_loses_its_transaction_applies_nothing_twice() {
    // Commands carried out (0-based, both passes) that lose the transaction:
    // the third; then, in the second pass, its second command.
    for lost_at in [&[2][..], &[2, 4]] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lost.db");
        let sqlite = Arc::new(SqliteStore::open(&path).await.unwrap());
        let store: SharedStore = sqlite.clone();
        let a = store.create_key(new_key("a", cr("100"))).await.unwrap().id;
        let b = store.create_key(new_key("b", cr("100"))).await.unwrap().id;
        // The first batch of more than two commands: the one queued below.
        sqlite.lose_transaction_in_next_batch(lost_at);

        let blocker = hold_write_lock(&path);
        // The writer takes this one and waits for the lock with it.
        let first = {
            let store = store.clone();
            tokio::spawn(async move { store.adjust(a, add("1")).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // These queue up, in this order, for the next batch.
        let mut queued = Vec::new();
        for i in 0..5 {
            let store = store.clone();
            let (key, credits) = match i {
                2 => (b, "5"),
                4 => (b, "1"),
                _ => (a, "1"),
            };
            queued.push(tokio::spawn(async move {
                store.adjust(key, add(credits)).await
            }));
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        blocker.execute_batch("ROLLBACK").unwrap();
        assert_eq!(first.await.unwrap().unwrap(), cr("101"));
        let answers: Vec<Option<Credits>> = futures_util::future::join_all(queued)
            .await
            .into_iter()
            .map(|answer| answer.unwrap().ok())
            .collect();
        let (expected, a_left, b_left) = if lost_at.len() == 1 {
            let applied = [cr("102"), cr("103"), cr("105"), cr("104"), cr("106")];
            (applied.map(Some), cr("104"), cr("106"))
        } else {
            ([None; 5], cr("101"), cr("100"))
        };
        assert_eq!(answers, expected, "{lost_at:?}");
        assert_eq!(balance(&store, a).await, a_left, "{lost_at:?}");
        assert_eq!(balance(&store, b).await, b_left, "{lost_at:?}");
        assert_ledger_adds_up(&store, a).await;
        assert_ledger_adds_up(&store, b).await;
        // The store goes on working.
        assert_eq!(store.adjust(b, add("1")).await.unwrap(), b_left + cr("1"));
    }
}

/// Settlements waiting in the journal while another process (the CLI)
/// holds the write lock, then commits a change of the same key and a new
/// key: the cache reads the key again from the file less what the journal
/// still holds, and the file gets both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_journal_and_another_process_commits_add_up() {
    let (_dir, path, store) = sqlite_file("behind.db").await;
    let a = store.create_key(new_key("a", cr("100"))).await.unwrap().id;

    let blocker = hold_write_lock(&path);
    blocker
        .execute(
            "UPDATE api_keys SET balance = balance + 7000 WHERE id = ?1",
            [a],
        )
        .unwrap();
    blocker
        .execute(
            "INSERT INTO api_keys (key_hash, name, role, balance, created_at) \
             VALUES ('elsewhere', 'e', 'user', 3000, 0)",
            [],
        )
        .unwrap();
    let e: KeyId = blocker.last_insert_rowid();
    // Answered from what the gateway knows: the other process has not
    // committed yet.
    for (credits, left) in [("1", "99"), ("2", "97")] {
        let answer = store.settle(usage(a, cr(credits)), Credits::ZERO).await;
        assert_eq!(answer.unwrap(), cr(left));
    }
    // The writer waits for the lock with them.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    blocker.execute_batch("COMMIT").unwrap();
    // A key the gateway has not seen yet is looked for.
    assert_eq!(
        store
            .settle(usage(e, cr("0.75")), Credits::ZERO)
            .await
            .unwrap(),
        cr("2.25")
    );
    assert_eq!(store.reserve(a, cr("104")).await.unwrap(), Credits::ZERO);
    assert_eq!(balance(&store, a).await, cr("104"));
    assert_eq!(store.usage_totals(a).await.unwrap().requests, 2);
    assert_eq!(store.usage_totals(e).await.unwrap().requests, 1);
    drop(store);
    let reopened: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    assert_eq!(balance(&reopened, a).await, cr("104"));
    assert_eq!(balance(&reopened, e).await, cr("2.25"));
}

/// A settlement made while the gateway is quiet reaches the file at once
/// (the CLI, a backup, see it): it wakes the writer thread, rather than
/// wait for its next idle look (up to 50 ms later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_quiet_gateway_applies_a_settlement_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quiet.db");
    let sqlite = Arc::new(SqliteStore::open(&path).await.unwrap());
    let store: SharedStore = sqlite.clone();
    let a = store.create_key(new_key("a", cr("10"))).await.unwrap().id;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows = || -> i64 {
        conn.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
            .unwrap()
    };
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    for n in 1..=3 {
        // Quiet: nothing queued, nothing in the journal; the writer thread
        // only wakes for its idle looks, which are not turns handed over.
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        let handed_over = sqlite.turns_handed_over();
        store
            .settle(usage(a, cr("1")), Credits::ZERO)
            .await
            .unwrap();
        until("the settlement woke no writer", &|| {
            sqlite.turns_handed_over() > handed_over
        });
        until("the settlement is not in the file", &|| rows() >= n);
    }
}

/// One gateway per SQLite file: a second one is refused at start, after
/// waiting a while for the first to let go of the settlement journal;
/// the CLI opens the file beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_second_gateway_on_one_file_is_refused() {
    let (_dir, path, store) = sqlite_file("one.db").await;
    let a = store.create_key(new_key("a", cr("10"))).await.unwrap().id;
    let second = SqliteStore::open(&path).await;
    let Err(StoreError::Backend(refused)) = second else {
        panic!("a second gateway opened the file");
    };
    assert!(
        refused.contains("a gateway is serving that file"),
        "{refused}"
    );
    let cli: SharedStore = Arc::new(SqliteStore::open_beside(&path).await.unwrap());
    assert_eq!(balance(&cli, a).await, cr("10"));
    // Once the first is gone, the next one starts.
    drop(store);
    let next: SharedStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    assert_eq!(balance(&next, a).await, cr("10"));
}

/// `api_keys.reserved` of key `id`, in thousandths.
async fn reserved_now(admin: &mut PgConnection, id: KeyId) -> i64 {
    sqlx::query_scalar("SELECT reserved FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// [`reserved_now`], polled until it is `want` (or 3 s).
async fn reserved_becomes(admin: &mut PgConnection, id: KeyId, want: i64) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let now = reserved_now(admin, id).await;
        if now == want || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_leases_serve_reservations_without_the_server() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let gateway = PostgresStore::connect_with(options.clone()).await.unwrap();
        let mut admin = PgConnection::connect_with(&options).await.unwrap();
        let rich = gateway
            .create_key(new_key("rich", cr("1000000")))
            .await
            .unwrap()
            .id;

        // The first reservation goes to the server and starts a fill: a
        // block of 64 such reservations, reserved at the server too.
        assert_eq!(gateway.reserve(rich, cr("1")).await.unwrap(), cr("999999"));
        assert_eq!(gateway.leased_becomes(rich, cr("64")).await, cr("64"));
        assert_eq!(reserved_becomes(&mut admin, rich, 65_000).await, 65_000);
        // The next ones are handed out from it: the server's figure stays.
        for n in 1..=10 {
            let available = gateway.reserve(rich, cr("1")).await.unwrap();
            assert_eq!(
                available,
                cr("999935") + cr("64") - Credits::from_millis(n * 1_000)
            );
        }
        assert_eq!(reserved_becomes(&mut admin, rich, 65_000).await, 65_000);
        // Settling them moves their part of the block to charged.
        for _ in 0..11 {
            gateway.settle(usage(rich, cr("1")), cr("1")).await.unwrap();
        }
        assert_eq!(reserved_becomes(&mut admin, rich, 54_000).await, 54_000);
        // What is left of the block is given back once the lease expires.
        assert_eq!(reserved_becomes(&mut admin, rich, 0).await, 0);
        assert_eq!(
            gateway.leased_becomes(rich, Credits::ZERO).await,
            Credits::ZERO
        );
        assert_eq!(
            gateway.key(rich).await.unwrap().unwrap().balance,
            cr("999989")
        );

        // A write to keys ends the leases at once, before it returns.
        gateway.reserve(rich, cr("2")).await.unwrap();
        assert_eq!(gateway.leased_becomes(rich, cr("128")).await, cr("128"));
        assert_eq!(reserved_becomes(&mut admin, rich, 130_000).await, 130_000);
        gateway.adjust(rich, add("1")).await.unwrap();
        assert_eq!(
            reserved_now(&mut admin, rich).await,
            2_000,
            "only the open reservation is left"
        );
        gateway.settle(usage(rich, cr("2")), cr("2")).await.unwrap();

        // So does closing the store (a gateway that has drained).
        gateway.reserve(rich, cr("1")).await.unwrap();
        assert_eq!(gateway.leased_becomes(rich, cr("64")).await, cr("64"));
        gateway.close().await;
        assert_eq!(
            reserved_now(&mut admin, rich).await,
            1_000,
            "only the open reservation is left"
        );
        gateway.settle(usage(rich, cr("1")), cr("1")).await.unwrap();
        let shared: SharedStore = Arc::new(gateway);
        assert_eq!(balance(&shared, rich).await, cr("999987"));
        assert_ledger_adds_up(&shared, rich).await;

        // A key without the headroom is never leased: each reservation is
        // the server's, as without leases.
        let poor = shared
            .create_key(new_key("poor", cr("1000")))
            .await
            .unwrap()
            .id;
        shared.reserve(poor, cr("1")).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(reserved_becomes(&mut admin, poor, 1_000).await, 1_000);
        assert_eq!(
            shared.reserve(poor, cr("999")).await.unwrap(),
            Credits::ZERO
        );
        assert_eq!(
            refused_with(shared.reserve(poor, cr("0.001")).await),
            Credits::ZERO
        );
        let _ = admin.close().await;
    }
    drop_schema(&base, &schema).await;
}

/// A settlement may charge far more than it reserved (token pricing, a
/// long prompt). One that leaves the key less than its lease holds ends
/// the lease before it is answered: the key's next reservations are the
/// server's again, and a key at or below zero is refused, not served from
/// credits reserved when it had them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_lease_ends_when_a_charge_leaves_the_key_less_than_it_holds() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let gateway = PostgresStore::connect_with(options.clone()).await.unwrap();
        let mut admin = PgConnection::connect_with(&options).await.unwrap();
        let k = gateway
            .create_key(new_key("k", cr("1000000")))
            .await
            .unwrap()
            .id;
        assert_eq!(gateway.reserve(k, cr("1")).await.unwrap(), cr("999999"));
        assert_eq!(gateway.leased_becomes(k, cr("64")).await, cr("64"));
        // The request reserved 1 and costs 999,990: 10 credits are left,
        // less than the lease's 64.
        gateway
            .settle(usage(k, cr("999990")), cr("1"))
            .await
            .unwrap();
        assert_eq!(reserved_now(&mut admin, k).await, 0, "the lease given back");
        // The next reservation is the server's: 10 - 1 available.
        assert_eq!(gateway.reserve(k, cr("1")).await.unwrap(), cr("9"));
        gateway.settle(usage(k, cr("20")), cr("1")).await.unwrap();
        // At -10, refused.
        assert_eq!(refused_with(gateway.reserve(k, cr("1")).await), cr("-10"));
        let shared: SharedStore = Arc::new(gateway);
        assert_eq!(balance(&shared, k).await, cr("-10"));
        assert_eq!(reserved_now(&mut admin, k).await, 0);
        assert_ledger_adds_up(&shared, k).await;
        let _ = admin.close().await;
    }
    drop_schema(&base, &schema).await;
}

/// An admin write ends every lease before it returns; should its caller
/// stop waiting meanwhile (a client that hung up), the leases are still
/// given back, all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_leases_are_given_back_when_a_write_is_abandoned() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let gateway = PostgresStore::connect_with(options.clone()).await.unwrap();
        let mut admin = PgConnection::connect_with(&options).await.unwrap();
        // Keys first: a write ends the leases.
        let mut leased = Vec::new();
        for name in ["a", "b"] {
            let key = gateway.create_key(new_key(name, cr("1000000")));
            leased.push(key.await.unwrap().id);
        }
        let other = gateway
            .create_key(new_key("other", cr("10")))
            .await
            .unwrap()
            .id;
        for id in &leased {
            gateway.reserve(*id, cr("1")).await.unwrap();
            assert_eq!(gateway.leased_becomes(*id, cr("64")).await, cr("64"));
        }
        // The leased keys' rows are locked elsewhere: giving the leases
        // back waits (one release sent, the other not yet); the write of
        // the other key is abandoned meanwhile.
        let mut blocker = PgConnection::connect_with(&options).await.unwrap();
        sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
        sqlx::query("SELECT 1 FROM api_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&leased)
            .execute(&mut blocker)
            .await
            .unwrap();
        let write = gateway.adjust(other, add("1"));
        let abandoned = tokio::time::timeout(std::time::Duration::from_millis(500), write).await;
        assert!(abandoned.is_err(), "the write waits for the locked rows");
        sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
        for id in &leased {
            assert_eq!(
                reserved_becomes(&mut admin, *id, 1_000).await,
                1_000,
                "key {id}: only the open reservation is left"
            );
            gateway.settle(usage(*id, cr("1")), cr("1")).await.unwrap();
        }
        let shared: SharedStore = Arc::new(gateway);
        assert_eq!(balance(&shared, other).await, cr("11"));
        let _ = blocker.close().await;
        let _ = admin.close().await;
    }
    drop_schema(&base, &schema).await;
}

/// Requests that hold every pooled connection (here: writes waiting on a
/// key row locked elsewhere, as during a long migration) do not stop the
/// heartbeat: a live gateway is never taken for dead by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_heartbeat_beats_while_every_pooled_connection_waits() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let gateway = Arc::new(PostgresStore::connect_with(options.clone()).await.unwrap());
        let k = gateway.create_key(new_key("k", cr("10"))).await.unwrap().id;
        let mut blocker = lock_key_row(&options, k).await;
        // More writes than the pool has connections, each waiting.
        let writes: Vec<_> = (0..20)
            .map(|_| {
                let gateway = gateway.clone();
                tokio::spawn(async move { gateway.adjust(k, add("1")).await })
            })
            .collect();
        let mut observer = PgConnection::connect_with(&options).await.unwrap();
        const BEATEN_AT: &str =
            "SELECT EXTRACT(EPOCH FROM max(heartbeat_at))::float8 FROM instances";
        let before: f64 = sqlx::query_scalar(BEATEN_AT)
            .fetch_one(&mut observer)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // The beat itself comes first; what follows it (a reconciliation,
        // if any) may wait for the pool.
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), gateway.heartbeat_now()).await;
        let after: f64 = sqlx::query_scalar(BEATEN_AT)
            .fetch_one(&mut observer)
            .await
            .unwrap();
        assert!(after > before, "no beat while the pool was taken");
        sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        let shared: SharedStore = gateway;
        assert_eq!(balance(&shared, k).await, cr("30"));
        let _ = blocker.close().await;
        let _ = observer.close().await;
    }
    drop_schema(&base, &schema).await;
}

/// A gateway whose host vanishes inside a transaction must not hold its
/// key rows locked until the server's TCP gives up (hours): the store's
/// sessions ask the server to end a transaction left idle, and to probe
/// an idle client. Read on the store's own pooled connections, and shown
/// on one: a transaction left idle past the limit is ended and its lock
/// released.
#[tokio::test]
async fn postgres_sessions_left_idle_in_a_transaction_are_ended_by_the_server() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let gateway = PostgresStore::connect_with(options.clone()).await.unwrap();
        let k = gateway.create_key(new_key("k", cr("10"))).await.unwrap().id;
        let setting = |name: &'static str| {
            let pool = gateway.pool().clone();
            async move {
                sqlx::query_scalar::<_, String>(&format!("SHOW {name}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(setting("idle_in_transaction_session_timeout").await, "30s");
        // Over a Unix socket (a test URL with `host=/run/postgresql`) the
        // server shows no keepalive settings: there is no TCP to probe.
        let over_tcp: bool = sqlx::query_scalar("SELECT inet_server_addr() IS NOT NULL")
            .fetch_one(gateway.pool())
            .await
            .unwrap();
        if over_tcp {
            assert_eq!(setting("tcp_keepalives_idle").await, "30");
            assert_eq!(setting("tcp_keepalives_interval").await, "10");
            assert_eq!(setting("tcp_keepalives_count").await, "3");
        }
        // The same server-side end, with a limit short enough to watch:
        // a transaction that locks the key row and then goes quiet.
        let mut vanished = gateway.pool().acquire().await.unwrap();
        sqlx::query("SET idle_in_transaction_session_timeout = '300ms'")
            .execute(&mut *vanished)
            .await
            .unwrap();
        sqlx::query("BEGIN").execute(&mut *vanished).await.unwrap();
        sqlx::query("SELECT 1 FROM api_keys WHERE id = $1 FOR UPDATE")
            .bind(k)
            .execute(&mut *vanished)
            .await
            .unwrap();
        // A write on the key waits for that lock, and gets it once the
        // server has ended the quiet session.
        let adjusted = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            gateway.adjust(k, add("1")),
        )
        .await;
        assert!(
            matches!(adjusted, Ok(Ok(_))),
            "the idle transaction kept its lock"
        );
        vanished.detach();
        let shared: SharedStore = Arc::new(gateway);
        assert_eq!(balance(&shared, k).await, cr("11"));
    }
    drop_schema(&base, &schema).await;
}

/// A gateway with key "k" of 10 credits, whose adjustment of +1 waits for
/// the key's row (held by the connection returned) and whose caller has
/// stopped waiting for it.
async fn an_adjustment_left_waiting(
    options: &PgConnectOptions,
) -> (PostgresStore, KeyId, PgConnection) {
    let gateway = PostgresStore::connect_with(options.clone()).await.unwrap();
    let k = gateway.create_key(new_key("k", cr("10"))).await.unwrap().id;
    let blocker = lock_key_row(options, k).await;
    let waited = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        gateway.adjust(k, add("1")),
    )
    .await;
    assert!(waited.is_err(), "the adjustment did not wait");
    (gateway, k, blocker)
}

/// A write whose caller stops waiting for it (an admin client that hung
/// up) may still be applied: it is carried out to the end, and the key
/// cache emptied after it, so that lookups do not go on answering the key
/// as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_write_its_caller_stops_waiting_for_is_applied_and_seen() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let (gateway, k, mut blocker) = an_adjustment_left_waiting(&options).await;
        // A lookup now fills the cache with the key as it is (10), for a
        // second from when it started.
        let filled = std::time::Instant::now();
        let before = gateway.key_by_hash(&hash("k")).await.unwrap().unwrap();
        assert_eq!(before.balance, cr("10"));
        sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
        let _ = blocker.close().await;
        // Within that second, lookups see the adjustment.
        let deadline = filled + std::time::Duration::from_millis(900);
        loop {
            let seen = gateway.key_by_hash(&hash("k")).await.unwrap().unwrap();
            if seen.balance == cr("11") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "lookups still see {seen:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let shared: SharedStore = Arc::new(gateway);
        assert_eq!(balance(&shared, k).await, cr("11"));
    }
    drop_schema(&base, &schema).await;
}

/// A gateway shutting down waits for a write its caller no longer waits
/// for (a request cut at shutdown), so that it is neither lost nor left
/// unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_closing_waits_for_writes_still_under_way() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let (gateway, k, mut blocker) = an_adjustment_left_waiting(&options).await;
        let release = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
            let _ = blocker.close().await;
        });
        gateway.close().await;
        // Closed only once the write is done: it is applied.
        let mut observer = PgConnection::connect_with(&options).await.unwrap();
        let balance: i64 = sqlx::query_scalar("SELECT balance FROM api_keys WHERE id = $1")
            .bind(k)
            .fetch_one(&mut observer)
            .await
            .unwrap();
        assert_eq!(balance, 11_000);
        release.await.unwrap();
        let _ = observer.close().await;
    }
    drop_schema(&base, &schema).await;
}

/// An adjustment that waits for its key's row past its retries (another
/// write holds it) was never applied: its caller is told so, not that it
/// may have been, and nothing is applied once the row is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_adjustment_kept_waiting_too_long_is_not_applied_and_says_so() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let gateway = PostgresStore::connect_with(options.clone()).await.unwrap();
        let k = gateway.create_key(new_key("k", cr("10"))).await.unwrap().id;
        let mut blocker = lock_key_row(&options, k).await;
        let refused = gateway.adjust(k, add("1")).await;
        match &refused {
            Err(StoreError::Backend(m)) => assert!(m.contains("not applied"), "{m}"),
            other => panic!("expected a plain failure, got {other:?}"),
        }
        sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
        let _ = blocker.close().await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let shared: SharedStore = Arc::new(gateway);
        assert_eq!(balance(&shared, k).await, cr("10"));
    }
    drop_schema(&base, &schema).await;
}

/// Two gateways spend one key from leases down to its last credit: each
/// credit is admitted exactly once, and nothing stays reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_gateways_spend_a_leased_key_exactly() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let a: SharedStore = Arc::new(PostgresStore::connect_with(options.clone()).await.unwrap());
        let b: SharedStore = Arc::new(PostgresStore::connect_with(options.clone()).await.unwrap());
        // 1,100 credits: leased (64 at a time) until fewer than 1,024 are
        // available, then reserved one by one at the server.
        let k = a.create_key(new_key("k", cr("1100"))).await.unwrap().id;
        let admitted = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let mut tasks = Vec::new();
        for n in 0..16 {
            let store = if n % 2 == 0 { a.clone() } else { b.clone() };
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match store.reserve(k, cr("1")).await {
                        Ok(_) => {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            store.settle(usage(k, cr("1")), cr("1")).await.unwrap();
                        }
                        Err(StoreError::InsufficientCredits { .. }) => {
                            // Another gateway's lease may hold the rest for
                            // a moment; done once nothing is left at all.
                            let left = store.key(k).await.unwrap().unwrap().balance;
                            if left <= Credits::ZERO {
                                return;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("reserve failed: {e}"),
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(admitted.load(std::sync::atomic::Ordering::SeqCst), 1_100);
        assert_eq!(balance(&a, k).await, Credits::ZERO);
        assert_ledger_adds_up(&a, k).await;
        let mut admin = PgConnection::connect_with(&options).await.unwrap();
        assert_eq!(reserved_becomes(&mut admin, k, 0).await, 0);
        let _ = admin.close().await;
    }
    drop_schema(&base, &schema).await;
}

/// SPEC 4: a key with C credits and N > C concurrent one-credit requests
/// gets exactly C through, also when it has enough to be leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_burst_on_a_leased_key_gets_exactly_its_credits() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let a: SharedStore = Arc::new(PostgresStore::connect_with(options.clone()).await.unwrap());
        let k = a.create_key(new_key("k", cr("2000"))).await.unwrap().id;
        let tasks: Vec<_> = (0..2100)
            .map(|_| {
                let store = a.clone();
                tokio::spawn(async move { store.reserve(k, cr("1")).await.is_ok() })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            admitted += i32::from(task.await.unwrap());
        }
        assert_eq!(admitted, 2000);
    }
    drop_schema(&base, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_releases_reservations_of_dead_gateways() {
    let Some((base, options, schema)) = pg_schema().await else {
        return;
    };
    {
        let dead = PostgresStore::connect_with(options.clone()).await.unwrap();
        let live = PostgresStore::connect_with(options.clone()).await.unwrap();
        let dead_id = dead.instance_id().to_string();
        let k = live.create_key(new_key("k", cr("10"))).await.unwrap().id;
        let other = live.create_key(new_key("o", cr("10"))).await.unwrap().id;
        assert_eq!(dead.reserve(k, cr("4")).await.unwrap(), cr("6"));
        assert_eq!(dead.reserve(other, cr("1")).await.unwrap(), cr("9"));
        assert_eq!(live.reserve(k, cr("3")).await.unwrap(), cr("3"));
        assert_eq!(refused_with(live.reserve(k, cr("4")).await), cr("3"));

        let mut admin = PgConnection::connect_with(&options).await.unwrap();
        // Both are alive: nothing is released.
        live.release_stale_reservations().await.unwrap();
        assert_eq!(reserved_now(&mut admin, k).await, 7_000);

        // The first one stops beating (as after kill -9).
        stop_heartbeat(&mut admin, &dead_id).await;
        live.release_stale_reservations().await.unwrap();
        assert_eq!(reserved_now(&mut admin, k).await, 3_000);
        assert_eq!(reserved_now(&mut admin, other).await, 0);
        let rows: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM instance_reservations WHERE instance_id = $1")
                .bind(&dead_id)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        assert_eq!(rows, 0);
        let instances: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM instances WHERE id = $1")
            .bind(&dead_id)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert_eq!(instances, 0);
        assert_eq!(live.reserve(k, cr("7")).await.unwrap(), Credits::ZERO);

        // Had the "dead" one been alive after all, its late settlement
        // releases nothing it no longer holds, and still charges.
        assert_eq!(
            dead.settle(usage(k, cr("1")), cr("4")).await.unwrap(),
            cr("9")
        );
        assert_eq!(reserved_now(&mut admin, k).await, 10_000);
        // The live one settles what it holds.
        live.settle(usage(k, cr("3")), cr("3")).await.unwrap();
        live.settle(usage(k, cr("7")), cr("7")).await.unwrap();
        assert_eq!(reserved_now(&mut admin, k).await, 0);
        assert_eq!(balance(&(Arc::new(live) as SharedStore), k).await, cr("-1"));
        let _ = admin.close().await;
    }
    drop_schema(&base, &schema).await;
}

/// The hot path of a request, key_by_hash + reserve + settle, per store.
/// `cargo test --release -- --ignored --nocapture hot_path`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn hot_path_latency() {
    async fn measure(name: &str, s: SharedStore) {
        let k = s.create_key(new_key("hot", cr("1000000"))).await.unwrap();
        let mut times: [Vec<std::time::Duration>; 4] = Default::default();
        for i in 0..3000 {
            let start = std::time::Instant::now();
            let key = s.key_by_hash(&hash("hot")).await.unwrap().unwrap();
            let looked_up = std::time::Instant::now();
            s.reserve(key.id, cr("1")).await.unwrap();
            let reserved = std::time::Instant::now();
            s.settle(usage(k.id, cr("1")), cr("1")).await.unwrap();
            let settled = std::time::Instant::now();
            if i >= 500 {
                times[0].push(settled - start);
                times[1].push(looked_up - start);
                times[2].push(reserved - looked_up);
                times[3].push(settled - reserved);
            }
        }
        for (part, t) in ["all", "key_by_hash", "reserve", "settle"]
            .iter()
            .zip(times.iter_mut())
        {
            t.sort();
            let pct = |p: usize| t[t.len() * p / 100];
            println!(
                "{name} {part}: p50 {:?}  p90 {:?}  p99 {:?}",
                pct(50),
                pct(90),
                pct(99)
            );
        }
    }
    measure("memory", Arc::new(MemoryStore::default())).await;
    let h = Harness::sqlite().await;
    measure("sqlite", h.store.clone()).await;
    h.finish().await;
    if let Some(h) = Harness::postgres().await {
        measure("postgres", h.store.clone()).await;
        h.finish().await;
    }
}
