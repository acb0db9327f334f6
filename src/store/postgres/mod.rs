//! The `postgres` store: balances shared by several gateways.
//!
//! # Never overspending
//!
//! Each key row carries `reserved`, the sum of every gateway's open
//! reservations on it. A reservation is ONE statement that raises `reserved`
//! only where `balance > 0 AND balance - reserved >= amount`; the row lock it
//! takes serializes the reservations of one key (and only of that key), so
//! gateways sharing the database can never admit more than the balance
//! covers.
//!
//! Settlements are applied in batches: one settlement task per store takes
//! every settlement queued (up to `SETTLE_BATCH_MAX`, 256) and applies them
//! in one statement, its own transaction: one usage row per settlement, and
//! per key one update of the key row (the summed charge, the summed
//! release) and one of this instance's share. Row locks are thus held for
//! that one statement, not across round trips. Each settlement is answered
//! only after that statement committed, so an answered settlement survives
//! `kill -9` of the gateway. If the server refuses the batch (nothing of it
//! was applied), its settlements are applied one by one, so that a bad one
//! fails alone (and gives its reservation back). If the connection fails
//! instead, the batch may or may not have committed: each batch carries a
//! number, recorded in `settlement_batches` by the same statement, which
//! applies nothing if its number is recorded already; so the batch is sent
//! again until the server answers, and applied exactly once (a refusal of
//! a later attempt counts only once the batch is seen unrecorded). Its
//! callers wait meanwhile; should the gateway stop first, each charge of
//! the batch is logged at error level.
//!
//! A settlement, once queued, belongs to the task and is completed even if
//! its caller stops waiting; a reservation runs in its own task, and one
//! whose caller stopped waiting is given back at once.
//!
//! A proxied request thus costs at most three statements (key lookup, see
//! below; reservation; and its share of a settlement batch, which under
//! load is one statement for many requests): pooled connections are not
//! pinged before each use, only after sitting idle for `PING_IF_IDLE_FOR`
//! (5 s).
//!
//! # Leases
//!
//! A key with plenty of credits is *leased*: after a reservation that left
//! it enough, a block of 64 such reservations is reserved for this
//! instance in one more statement, and the key's next requests are admitted
//! from it in memory, with no statement at all ([`leases`] has the rules).
//! The block is an ordinary reservation of this instance, so everything
//! above holds for it: other gateways see it as reserved, each request
//! taken from it is settled or released like one reserved alone, and what
//! is left is released when the lease ends (a second after its last fill,
//! at once when a key is written through this store, and when the store is
//! closed at shutdown). Keys without that headroom are never leased.
//!
//! # Key lookups
//!
//! `key_by_hash` (authentication, once per request) answers from memory a
//! key it found less than `KEY_CACHE_FOR` (1 s) ago, so in the steady state
//! a request costs two statements of its own (reservation, its share of a
//! settlement batch), or only its share of a batch when its key is leased.
//! Every write to keys made through this store (create, update, revoke,
//! adjust, `sync_grants`) empties the cache and ends the leases before it
//! returns, and a lookup that started before such a write does not fill it,
//! so this store's own writes are seen at once. Writes made by other
//! gateways or by the CLI are seen within 1 s. The balance in a cached
//! record may be up to 1 s old; `key` (used where the balance is shown) is
//! never cached, and admission is decided by the reservation, never by that
//! balance. Unknown hashes are not cached, and at most `KEY_CACHE_MAX`
//! (10,000) keys are kept.
//!
//! # Durability
//!
//! The gateway's connections run with `synchronous_commit = off`: a commit
//! is visible to every gateway as soon as PostgreSQL accepts it, and
//! survives any gateway being killed; only a crash of the PostgreSQL server
//! itself can lose the last fraction of a second of commits (at most three
//! times `wal_writer_delay`, 600 ms by default). Waiting for the WAL flush
//! instead would hold each key's row lock for a disk flush per request.
//!
//! # Crash leaks
//!
//! A gateway killed with `-9` cannot release its open reservations. So each
//! [`PostgresStore`] has a random instance id; the same statement or
//! transaction that changes `api_keys.reserved` also changes that instance's
//! share in `instance_reservations (instance_id, key_id, reserved)`. Every
//! instance has a row in `instances` whose `heartbeat_at` (database clock) a
//! background task refreshes every 10 s, on a connection of its own (not
//! the pool's: requests holding every pooled connection, waiting on a
//! locked key row or a migration, must not make a live instance look
//! dead). [`Store::release_stale_reservations`]
//! (called at gateway start, and every minute by the heartbeat task) takes
//! the instances whose heartbeat is older than 60 s, and in one transaction
//! subtracts their shares from `api_keys.reserved` and deletes them. The
//! heartbeat task does so only once its own heartbeats have gone through
//! without a break for those 60 s ([`Standing`]), so that after an outage
//! every gateway saw, the first one back does not take the others for dead.
//!
//! Locks are always taken in the order `api_keys` rows (several in id
//! order), then their `instance_reservations` rows, so these paths cannot
//! deadlock each other. In more detail: every path touches a share row
//! `(instance, key)` only while holding the lock on row `key` of
//! `api_keys` (which conflicts with itself), so share locks are never
//! waited for; and the paths that lock several key rows (a settlement
//! batch, releasing stale reservations, `sync_grants`) lock them with one
//! `SELECT ... ORDER BY id FOR NO KEY UPDATE`, which locks in ascending id
//! order, while the others (reservation, release, adjustment, update,
//! revocation) lock a single key row. Waits therefore only go from a lower
//! key id to a higher one, and no cycle can form. A settlement batch first
//! locks its instance's row of `settlement_batches`, which only that
//! instance's settlement task writes (and, a day after its last batch,
//! the clean-up, holding no other lock).
//!
//! A gateway that is alive but could not reach the database for over 60 s
//! may have had its reservations released by another gateway; its later
//! settlements release only what its share still holds (never driving
//! `reserved` below what its share rows and the other gateways' hold),
//! and its next heartbeat registers it again and reconciles its shares
//! (below), so that what its requests in flight hold is held again. Until
//! that heartbeat (at most 10 s), a settlement of a reservation made
//! before may release part of a newer one of the same gateway and key.
//!
//! # Unknown outcomes
//!
//! A statement whose connection broke may or may not have been applied.
//! Settlement batches are numbered and sent again until the server answers
//! (see above). For reservations and releases, each instance keeps its own
//! account of what it holds per key ([`shares`]): a reservation whose
//! answer was lost counts as not made (its caller got an error), a release
//! as made; the heartbeat after such a failure sets the instance's share
//! rows, and `api_keys.reserved` with them, to that account, in one
//! transaction that waits for no statement of the instance to be running
//! and locks the keys of those failures too, so that it also waits for
//! such a statement still queued at the server for its key's lock.
//!
//! # Schema
//!
//! `migrations/postgres/*.sql`, applied by sqlx's migrator at connect (it
//! holds an advisory lock, so gateways starting together are safe). Amounts
//! are BIGINT thousandths of a credit; times are BIGINT milliseconds since
//! the Unix epoch, except the heartbeat, which uses the database clock so
//! that gateways on different hosts agree on staleness.

use super::*;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Row};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

mod leases;
mod shares;
use leases::{Fill, Leases};
use shares::Shares;

/// How often an instance proves it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// Every how many heartbeats the instance also releases stale reservations
/// (every minute).
const RELEASE_EVERY_BEATS: u32 = 6;
/// An instance silent this long is dead.
const STALE_AFTER_SECS: i64 = 60;
const STALE_AFTER: Duration = Duration::from_secs(STALE_AFTER_SECS.unsigned_abs());
/// A session of this store left idle inside a transaction this long is
/// ended by the server (its host or network gone), releasing its locks.
const IDLE_IN_TRANSACTION: &str = "30s";
/// A pooled connection idle this long is pinged before it is used.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(5);
/// How long a key found by `key_by_hash` is answered from memory.
const KEY_CACHE_FOR: Duration = Duration::from_secs(1);
/// The most keys kept in that cache.
const KEY_CACHE_MAX: usize = 10_000;
/// The most settlements applied by one statement.
const SETTLE_BATCH_MAX: usize = 256;
/// Key for the transaction-scoped advisory lock that serializes
/// `sync_grants` across gateways.
const GRANTS_LOCK: i64 = 0x746f_6c6c_6761_7465; // "tollgate"

pub struct PostgresStore {
    pool: PgPool,
    link: Arc<Link>,
    heartbeat: JoinHandle<()>,
    /// Queue of the settlement task (see [`settlement_task`]).
    settlements: mpsc::UnboundedSender<Settlement>,
    keys: Arc<KeyCache>,
    /// Writes to keys under way ([`PostgresStore::write`]).
    writes: crate::tally::Tally,
}

/// What the statements that change this instance's shares of reservations
/// need: the pool, the instance id and its own account of its shares.
struct Link {
    pool: PgPool,
    /// One connection of its own for the heartbeat: requests that hold
    /// every pooled connection (waiting on a locked key row, a migration)
    /// must not make a live instance look dead to the others.
    beats: PgPool,
    instance: Arc<str>,
    shares: Shares,
    /// Credits reserved in advance for this instance's requests.
    leases: Leases,
}

/// Recent answers of `key_by_hash` (see "Key lookups" in the module doc).
#[derive(Default)]
struct KeyCache(std::sync::Mutex<KeyCacheState>);

#[derive(Default)]
struct KeyCacheState {
    /// Raised by every write through this store: a lookup that started
    /// before it does not fill the cache.
    generation: u64,
    /// By key hash: when the lookup started, and what it found.
    entries: std::collections::HashMap<String, (Instant, KeyRecord)>,
}

impl KeyCache {
    fn state(&self) -> std::sync::MutexGuard<'_, KeyCacheState> {
        lock(&self.0)
    }

    /// A fresh enough record, or the generation to pass to [`KeyCache::fill`].
    fn get(&self, hash: &str) -> Result<KeyRecord, u64> {
        let state = self.state();
        match state.entries.get(hash) {
            Some((at, record)) if at.elapsed() < KEY_CACHE_FOR => Ok(record.clone()),
            _ => Err(state.generation),
        }
    }

    /// Remembers what a lookup started at `at` found, unless a write
    /// through this store happened since `generation` was read.
    fn fill(&self, hash: &str, generation: u64, at: Instant, record: &KeyRecord) {
        let mut state = self.state();
        if state.generation != generation {
            return;
        }
        if state.entries.len() >= KEY_CACHE_MAX && !state.entries.contains_key(hash) {
            state
                .entries
                .retain(|_, (at, _)| at.elapsed() < KEY_CACHE_FOR);
            if state.entries.len() >= KEY_CACHE_MAX {
                state.entries.clear();
            }
        }
        state.entries.insert(hash.to_owned(), (at, record.clone()));
    }

    /// Forgets everything; called after every write to keys.
    fn invalidate(&self) {
        let mut state = self.state();
        state.generation = state.generation.wrapping_add(1);
        state.entries.clear();
    }
}

/// What a write to keys makes stale ([`PostgresStore::write`]): ended by
/// [`Stale::end`], or when dropped (the write panicked).
struct Stale {
    keys: Arc<KeyCache>,
    link: Arc<Link>,
    ended: bool,
}

impl Stale {
    async fn end(mut self) {
        self.ended = true;
        self.keys.invalidate();
        end_leases(&self.link).await;
    }
}

impl Drop for Stale {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.keys.invalidate();
        let _ = release_leases(&self.link);
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl PostgresStore {
    /// Connects to the database at `url`, applies migrations, registers this
    /// gateway instance and starts its heartbeat.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| backend(format!("invalid PostgreSQL URL: {e}")))?;
        Self::connect_with(options).await
    }

    /// [`PostgresStore::connect`] with options built by the caller (tests use
    /// it to set a `search_path`).
    pub async fn connect_with(options: PgConnectOptions) -> Result<PostgresStore, StoreError> {
        // The promise is that a charge survives the *gateway* being killed:
        // a commit PostgreSQL has accepted is visible to every instance at
        // once, whether or not its WAL has reached the disk. Not waiting
        // for that flush keeps the key's row lock short (same-key requests
        // serialise on it); a crash of PostgreSQL itself may lose the last
        // fraction of a second of charges (see the README).
        //
        // Every statement of the store is prepared once per connection and
        // looks rows up by key; `force_generic_plan` plans it once there,
        // instead of planning each execution anew for its parameters (the
        // settlement batch's many CTEs cost more to plan than to run).
        //
        // A gateway whose host vanishes (power, network) in the middle of
        // a transaction would hold its key rows locked, and every other
        // gateway's requests for those keys waiting, until the server
        // noticed: with the operating system's TCP defaults, two hours.
        // The server ends such a session after [`IDLE_IN_TRANSACTION`]
        // (the store never waits between two statements of a transaction)
        // and probes an idle client's socket after 30 s (three probes
        // 10 s apart), which also frees a session-level lock such as the
        // migrator's.
        let options = options.options([
            ("synchronous_commit", "off"),
            ("plan_cache_mode", "force_generic_plan"),
            ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION),
            ("tcp_keepalives_idle", "30"),
            ("tcp_keepalives_interval", "10"),
            ("tcp_keepalives_count", "3"),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            // sqlx pings every connection it takes from the pool by default:
            // a round trip before each statement. Only a connection that sat
            // idle for a while (the server or the network may have dropped
            // it) is checked; a busy one has just proved itself.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await
            .map_err(|e| backend(format!("cannot connect to PostgreSQL: {e}")))?;
        // Keys' names, models and endpoints are any Unicode text: a
        // database that cannot hold it would refuse charges.
        let encoding: String = sqlx::query_scalar("SHOW server_encoding")
            .fetch_one(&pool)
            .await?;
        if encoding != "UTF8" {
            return Err(backend(format!(
                "the PostgreSQL database uses the {encoding} encoding; tollgate needs UTF8 \
                 (CREATE DATABASE ... ENCODING 'UTF8')"
            )));
        }
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| backend(format!("PostgreSQL migration failed: {e}")))?;
        let beats = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        let link = Arc::new(Link {
            pool: pool.clone(),
            beats,
            instance: format!("{:032x}", rand::random::<u128>()).into(),
            shares: Shares::default(),
            leases: Leases::default(),
        });
        beat(&pool, &link.instance).await?;
        // The row that settlement batches lock first exists from the
        // start, so that a look at it waits for a batch still in flight
        // (see `apply_once`).
        sqlx::query(
            "INSERT INTO settlement_batches (instance_id, last_batch) VALUES ($1, 0) \
             ON CONFLICT (instance_id) DO NOTHING",
        )
        .bind(&*link.instance)
        .execute(&pool)
        .await?;
        let heartbeat = tokio::spawn(heartbeat_task(link.clone()));
        let (settlements, queue) = mpsc::unbounded_channel();
        tokio::spawn(settlement_task(link.clone(), queue));
        Ok(PostgresStore {
            pool,
            link,
            heartbeat,
            settlements,
            keys: Arc::default(),
            writes: crate::tally::Tally::default(),
        })
    }

    /// The store's pool, for tests that look at its sessions.
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One heartbeat now, as the heartbeat task does every 10 s.
    #[cfg(test)]
    pub(crate) async fn heartbeat_now(&self) -> Result<(), StoreError> {
        heartbeat(&self.link).await.map_err(|e| match e {
            HeartbeatFailure::Missed(e) | HeartbeatFailure::Reconciliation(e) => e,
        })
    }

    /// Runs a write to keys, then ends what it makes stale: the key cache
    /// and the leases (see "Key lookups" in the module doc). In a task of
    /// its own, carried out to the end whether or not its caller waits for
    /// it (an admin client that hangs up): a write that reached the server
    /// is applied anyway, and what it makes stale must be ended after it,
    /// even should it panic. Counted in `writes`, which [`Store::close`]
    /// waits for.
    async fn write<T, F>(&self, write: impl FnOnce(PgPool) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let written = write(self.pool.clone());
        let stale = Stale {
            keys: self.keys.clone(),
            link: self.link.clone(),
            ended: false,
        };
        let counted = self.writes.enter();
        let task = tokio::spawn(async move {
            let _counted = counted;
            let result = written.await;
            stale.end().await;
            result
        });
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(backend(format!("a write's task ended: {e}"))),
        }
    }
    /// A reservation served from a lease: what the key has available, as
    /// far as this instance knows; the refill it asked for is started.
    fn served_from_lease(&self, taken: leases::Taken) -> Credits {
        if let Some(fill) = taken.refill {
            tokio::spawn(run_lease(self.link.clone(), fill));
        }
        Credits::from_millis(taken.available)
    }

    /// What key `id`'s lease holds in this instance now, polled until it
    /// is `want` (or 3 s).
    #[cfg(test)]
    pub(crate) async fn leased_becomes(&self, id: KeyId, want: Credits) -> Credits {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let now = Credits::from_millis(self.link.leases.left(id));
            if now == want || Instant::now() > deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// This gateway's instance id (its row in `instances`).
    pub fn instance_id(&self) -> &str {
        &self.link.instance
    }

    /// A key whose commit went unanswered may exist: that is said
    /// (`Unconfirmed`), so that nobody makes it again blindly, a second key
    /// with credits of its own.
    async fn create_key_uncached(pool: &PgPool, new: NewKey) -> Result<KeyRecord, StoreError> {
        let mut tx = pool.begin().await?;
        let record = insert_key(&mut tx, &new)
            .await?
            .ok_or(StoreError::DuplicateKey)?;
        tx.commit().await.map_err(|e| {
            if shares::outcome_unknown(&e) {
                unconfirmed(&e)
            } else {
                StoreError::from(e)
            }
        })?;
        Ok(record)
    }

    async fn update_key_uncached(
        pool: &PgPool,
        id: KeyId,
        patch: KeyPatch,
    ) -> Result<KeyRecord, StoreError> {
        let mut tx = pool.begin().await?;
        let mut record = Self::key_for_update(&mut tx, id)
            .await?
            .ok_or(StoreError::NoSuchKey(id))?;
        patch.apply(&mut record);
        record.name = storable(&record.name).into_owned();
        sqlx::query(
            "UPDATE api_keys SET name = $2, models = $3, rate_limit_rpm = $4, \
             max_concurrent = $5, expires_at = $6 WHERE id = $1",
        )
        .bind(id)
        .bind(&record.name)
        .bind(models_json(&record.models)?)
        .bind(record.rate_limit_rpm.map(i64::from))
        .bind(record.max_concurrent.map(i64::from))
        .bind(record.expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn revoke_key_uncached(
        pool: &PgPool,
        id: KeyId,
        at: Millis,
    ) -> Result<KeyRecord, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(at)
        .fetch_optional(pool)
        .await?
        .ok_or(StoreError::NoSuchKey(id))?;
        key_from_row(&row)
    }

    /// Applies `adjustment` exactly once. Its transaction records an id
    /// chosen here; when the connection fails (or the server gives up for
    /// a passing reason) it is sent again, for up to [`ADJUST_RETRY_FOR`],
    /// and an attempt that finds its id recorded answers with the balance
    /// as it is: an adjustment whose commit's answer was lost is neither
    /// reported failed (and made again by hand) nor applied twice.
    async fn adjust_uncached(
        pool: &PgPool,
        id: KeyId,
        adjustment: Adjustment,
    ) -> Result<Credits, StoreError> {
        let request = format!("{:032x}", rand::random::<u128>());
        let mut retries = Retries::new(Instant::now());
        loop {
            let left = retries.time_left(Instant::now());
            let committing = AtomicBool::new(false);
            let attempt = adjust_once(pool, id, &adjustment, &request, &committing);
            let e = match tokio::time::timeout(left, attempt).await {
                Ok(Ok(result)) => return result,
                Ok(Err(e)) => e,
                // Given up at the deadline: an attempt that had sent its
                // COMMIT may still commit; one still waiting before it (for
                // the key's row, a connection) is rolled back with its
                // transaction.
                Err(_) => return Err(retries.gave_up(committing.load(Ordering::SeqCst))),
            };
            let wait = retries.after(&e, Instant::now())?;
            tracing::warn!(key = id, "an adjustment is sent again: {e}");
            tokio::time::sleep(wait).await;
        }
    }

    async fn sync_grants_uncached(
        pool: &PgPool,
        grants: &[Grant],
    ) -> Result<GrantReport, StoreError> {
        let mut tx = pool.begin().await?;
        // Gateways starting together take turns.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(GRANTS_LOCK)
            .execute(&mut *tx)
            .await?;
        // Lock every row this may change, in id order like every path that
        // locks several keys.
        let hashes: Vec<&str> = grants.iter().map(|g| g.hash.0.as_str()).collect();
        sqlx::query(
            "SELECT id FROM api_keys WHERE key_hash = ANY($1) OR (granted AND NOT disabled) \
             ORDER BY id FOR NO KEY UPDATE",
        )
        .bind(&hashes)
        .execute(&mut *tx)
        .await?;
        let mut report = GrantReport::default();
        let mut configured = Vec::with_capacity(grants.len());
        for grant in grants {
            let existing: Option<(KeyId, bool, String)> =
                sqlx::query_as("SELECT id, disabled, role FROM api_keys WHERE key_hash = $1")
                    .bind(&grant.hash.0)
                    .fetch_optional(&mut *tx)
                    .await?;
            match existing {
                None => {
                    let new = grant.new_key();
                    let record = insert_key(&mut tx, &new)
                        .await?
                        .ok_or(StoreError::DuplicateKey)?;
                    report.created.push(record.id);
                    configured.push(record.id);
                }
                Some((id, disabled, role)) => {
                    if disabled {
                        sqlx::query("UPDATE api_keys SET disabled = FALSE WHERE id = $1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        report.reenabled.push(id);
                    }
                    if role != grant.role.as_str() {
                        sqlx::query("UPDATE api_keys SET role = $2 WHERE id = $1")
                            .bind(id)
                            .bind(grant.role.as_str())
                            .execute(&mut *tx)
                            .await?;
                        report.role_changed.push(id);
                    }
                    configured.push(id);
                }
            }
        }
        let disabled: Vec<KeyId> = sqlx::query_scalar(
            "WITH d AS ( \
                 UPDATE api_keys SET disabled = TRUE \
                 WHERE granted AND NOT disabled AND NOT (id = ANY($1)) RETURNING id \
             ) SELECT id FROM d ORDER BY id",
        )
        .bind(&configured)
        .fetch_all(&mut *tx)
        .await?;
        report.disabled = disabled;
        tx.commit().await?;
        Ok(report)
    }

    async fn key_for_update(
        conn: &mut PgConnection,
        id: KeyId,
    ) -> Result<Option<KeyRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE id = $1 FOR NO KEY UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| key_from_row(&r))
        .transpose()
    }
}

/// Gives back what every lease holds (after a write to keys, and when the
/// store is closed), and waits for it.
async fn end_leases(link: &Arc<Link>) {
    if let Some(releasing) = release_leases(link) {
        let _ = releasing.await;
    }
}

/// Ends every lease of this instance; the task that gives their credits
/// back, if any. A task of its own: a caller that stops waiting must not
/// leave the rest of the leases reserved, out of every lease and every
/// reconciliation, for as long as this instance lives.
fn release_leases(link: &Arc<Link>) -> Option<JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let ended = link.leases.end_all();
    if ended.is_empty() {
        return None;
    }
    let link = link.clone();
    Some(runtime.spawn(async move {
        for (id, left) in ended {
            release_abandoned(&link, id, Credits::from_millis(left)).await;
        }
    }))
}

/// Records that `instance` is alive, creating its row if it is not there
/// (at start, or because another gateway took this one for dead and
/// released its reservations); returns whether it had to.
async fn beat(pool: &PgPool, instance: &str) -> Result<bool, StoreError> {
    let beaten = sqlx::query("UPDATE instances SET heartbeat_at = now() WHERE id = $1")
        .bind(instance)
        .execute(pool)
        .await?;
    if beaten.rows_affected() > 0 {
        return Ok(false);
    }
    sqlx::query("INSERT INTO instances (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
        .bind(instance)
        .execute(pool)
        .await?;
    Ok(true)
}

/// Why a heartbeat failed.
#[derive(Debug, thiserror::Error)]
enum HeartbeatFailure {
    /// The beat did not go through within [`HEARTBEAT_EVERY`]: the other
    /// gateways may take this one for dead.
    #[error("{0}")]
    Missed(StoreError),
    /// The beat went through; reconciling this gateway's shares failed (it
    /// is tried again at the next heartbeat).
    #[error("reconciling this gateway's reservations failed: {0}")]
    Reconciliation(StoreError),
}

/// The heartbeat (given up after [`HEARTBEAT_EVERY`]: a beat that hangs
/// while the network drops packets has not gone through, whatever it says
/// when it ends); then, if this instance's shares may be wrong, their
/// reconciliation.
async fn heartbeat(link: &Link) -> Result<(), HeartbeatFailure> {
    let beaten = tokio::time::timeout(HEARTBEAT_EVERY, beat(&link.beats, &link.instance))
        .await
        .unwrap_or_else(|_| {
            Err(backend(format!(
                "no answer within {} s",
                HEARTBEAT_EVERY.as_secs()
            )))
        })
        .map_err(|e| {
            // It may have found this instance's row gone and made it again
            // (another gateway took it for dead) before its answer was
            // lost: the shares are checked at the next heartbeat whatever
            // it did (a reconciliation that finds them right changes
            // nothing).
            link.shares.unsure();
            HeartbeatFailure::Missed(e)
        })?;
    if beaten {
        // Its shares may have been released by another gateway.
        link.shares.unsure();
    }
    let reconciled = link
        .shares
        .reconcile(&link.pool, &link.instance)
        .await
        .map_err(HeartbeatFailure::Reconciliation)?;
    if reconciled {
        tracing::info!("this gateway's reservations were reconciled");
    }
    Ok(())
}

/// When the heartbeat task also releases the reservations of stopped
/// gateways: every [`RELEASE_EVERY_BEATS`] heartbeats that went through,
/// and only once this instance's own heartbeats have gone through without
/// a break for the whole stale window. After an outage that every gateway
/// shared (the server restarting, the network to it down), every
/// heartbeat in `instances` is old; the first gateway back must not
/// release the reservations of the others, which are alive and serving
/// from them, but give them the time to beat again, as it has.
/// A beat that went through more than two heartbeats after the one before
/// it (the process or its host paused) breaks the run as a failed one.
#[derive(Debug)]
struct Standing {
    /// Since when the heartbeats have all gone through.
    beating_since: Option<Instant>,
    /// When the last one that went through was recorded.
    last: Instant,
    /// Heartbeats that went through.
    beats: u32,
}

impl Standing {
    /// Starts beating at `now` (the instance has just beaten at connect).
    fn new(now: Instant) -> Standing {
        Standing {
            beating_since: Some(now),
            last: now,
            beats: 0,
        }
    }

    /// Records the outcome of a heartbeat at `now`; returns whether to
    /// release the stopped gateways' reservations now.
    fn beat(&mut self, went_through: bool, now: Instant) -> bool {
        if !went_through {
            self.beating_since = None;
            return false;
        }
        if now.saturating_duration_since(self.last) > 2 * HEARTBEAT_EVERY {
            self.beating_since = None;
        }
        self.last = now;
        let since = *self.beating_since.get_or_insert(now);
        self.beats = self.beats.wrapping_add(1);
        self.beats.is_multiple_of(RELEASE_EVERY_BEATS)
            && now.saturating_duration_since(since) >= STALE_AFTER
    }
}

/// Every [`HEARTBEAT_EVERY`], [`heartbeat`]; when [`Standing`] says so,
/// the release of stopped gateways' reservations too.
async fn heartbeat_task(link: Arc<Link>) {
    let mut ticks = tokio::time::interval(HEARTBEAT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; connect just beat
    let mut standing = Standing::new(Instant::now());
    loop {
        ticks.tick().await;
        let outcome = heartbeat(&link).await;
        if let Err(e) = &outcome {
            tracing::warn!("PostgreSQL heartbeat failed: {e}");
        }
        let went_through = !matches!(outcome, Err(HeartbeatFailure::Missed(_)));
        if standing.beat(went_through, Instant::now()) {
            if let Err(e) = release_stale(&link.pool).await {
                tracing::warn!("releasing stale reservations failed: {e}");
            }
        }
    }
}

/// Drops the reservations of instances whose heartbeat is stale (and of
/// instances that no longer have a row at all).
async fn release_stale(pool: &PgPool) -> Result<(), StoreError> {
    // The batch numbers of instances that settled nothing for a day: no
    // retry of theirs can still be waiting (its own statement, so that it
    // locks no row while holding key rows).
    sqlx::query("DELETE FROM settlement_batches WHERE updated_at < now() - interval '1 day'")
        .execute(pool)
        .await?;
    let mut tx = pool.begin().await?;
    let mut stale: Vec<String> = sqlx::query_scalar(
        "DELETE FROM instances \
         WHERE heartbeat_at < now() - $1::BIGINT * interval '1 second' RETURNING id",
    )
    .bind(STALE_AFTER_SECS)
    .fetch_all(&mut *tx)
    .await?;
    let orphans: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT r.instance_id FROM instance_reservations r \
         WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = r.instance_id)",
    )
    .fetch_all(&mut *tx)
    .await?;
    stale.extend(orphans);
    stale.sort();
    stale.dedup();
    if stale.is_empty() {
        tx.commit().await?;
        return Ok(());
    }
    // Lock the keys first, in id order, as every other path does.
    sqlx::query(
        "SELECT id FROM api_keys WHERE id IN \
         (SELECT key_id FROM instance_reservations WHERE instance_id = ANY($1)) \
         ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(&stale)
    .execute(&mut *tx)
    .await?;
    let released = sqlx::query(
        "WITH gone AS ( \
             DELETE FROM instance_reservations WHERE instance_id = ANY($1) \
             RETURNING key_id, reserved \
         ), per_key AS ( \
             SELECT key_id, SUM(reserved)::BIGINT AS total FROM gone GROUP BY key_id \
         ) \
         UPDATE api_keys k SET reserved = k.reserved - per_key.total \
         FROM per_key WHERE k.id = per_key.key_id",
    )
    .bind(&stale)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        instances = stale.len(),
        keys = released.rows_affected(),
        "released the reservations of stopped gateways"
    );
    Ok(())
}

fn decode<T>(r: Result<T, sqlx::Error>) -> Result<T, StoreError> {
    r.map_err(|e| backend(format!("unexpected data in PostgreSQL: {e}")))
}

fn opt_u32(row: &PgRow, column: &str) -> Result<Option<u32>, StoreError> {
    decode(row.try_get::<Option<i64>, _>(column))?
        .map(|v| u32::try_from(v).map_err(|_| backend(format!("{column} out of range: {v}"))))
        .transpose()
}

fn u64_of(row: &PgRow, column: &str) -> Result<u64, StoreError> {
    let v: i64 = decode(row.try_get(column))?;
    u64::try_from(v).map_err(|_| backend(format!("{column} out of range: {v}")))
}

fn key_from_row(row: &PgRow) -> Result<KeyRecord, StoreError> {
    let role: String = decode(row.try_get("role"))?;
    let models: Option<String> = decode(row.try_get("models"))?;
    Ok(KeyRecord {
        id: decode(row.try_get("id"))?,
        name: decode(row.try_get("name"))?,
        role: Role::parse(&role).ok_or_else(|| backend(format!("unknown role {role:?}")))?,
        balance: Credits::from_millis(decode(row.try_get("balance"))?),
        models: models
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| backend(format!("invalid models list: {e}")))?,
        rate_limit_rpm: opt_u32(row, "rate_limit_rpm")?,
        max_concurrent: opt_u32(row, "max_concurrent")?,
        created_at: decode(row.try_get("created_at"))?,
        revoked_at: decode(row.try_get("revoked_at"))?,
        expires_at: decode(row.try_get("expires_at"))?,
        granted: decode(row.try_get("granted"))?,
        disabled: decode(row.try_get("disabled"))?,
    })
}

fn usage_from_row(row: &PgRow) -> Result<UsageEntry, StoreError> {
    let status: i32 = decode(row.try_get("status"))?;
    Ok(UsageEntry {
        id: decode(row.try_get("id"))?,
        record: UsageRecord {
            time: decode(row.try_get("time"))?,
            key_id: decode(row.try_get("key_id"))?,
            endpoint: decode(row.try_get("endpoint"))?,
            model: decode(row.try_get("model"))?,
            status: u16::try_from(status)
                .map_err(|_| backend(format!("status out of range: {status}")))?,
            prompt_tokens: u64_of(row, "prompt_tokens")?,
            completion_tokens: u64_of(row, "completion_tokens")?,
            credits: Credits::from_millis(decode(row.try_get("credits"))?),
            duration_ms: u64_of(row, "duration_ms")?,
        },
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

async fn record_adjustment(
    conn: &mut PgConnection,
    id: KeyId,
    delta: Credits,
    (actor, reason): (&str, &str),
    request: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO adjustments (time, key_id, delta, actor, reason, request_id) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(now_millis())
    .bind(id)
    .bind(delta.millis())
    .bind(storable(actor))
    .bind(storable(reason))
    .bind(request)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The attempts at one adjustment ([`PostgresStore::adjust_uncached`]):
/// whether to send it again, and what its caller is told when not.
struct Retries {
    deadline: Instant,
    wait: Duration,
    /// Some attempt's outcome is unknown: it may have committed, whatever
    /// later attempts say (a pool that cannot connect says nothing of it).
    maybe_applied: bool,
}

impl Retries {
    fn new(now: Instant) -> Retries {
        Retries {
            deadline: now + ADJUST_RETRY_FOR,
            wait: RETRY_WAIT_FIRST,
            maybe_applied: false,
        }
    }

    fn time_left(&self, now: Instant) -> Duration {
        self.deadline.saturating_duration_since(now)
    }

    /// The error when the deadline cut an attempt short, which had sent
    /// its COMMIT or not (`committing`).
    fn gave_up(&self, committing: bool) -> StoreError {
        if committing || self.maybe_applied {
            unconfirmed(&"no answer in time")
        } else {
            backend(format!(
                "the adjustment was not applied: no answer before its commit within {} s",
                ADJUST_RETRY_FOR.as_secs()
            ))
        }
    }

    /// After an attempt failed with `e` at `now`: how long to wait before
    /// the next one, or the error for the caller.
    fn after(&mut self, e: &sqlx::Error, now: Instant) -> Result<Duration, StoreError> {
        self.maybe_applied |= shares::outcome_unknown(e);
        if is_transient(e) && now + self.wait < self.deadline {
            let wait = self.wait;
            self.wait = (self.wait * 2).min(RETRY_WAIT_MAX);
            return Ok(wait);
        }
        Err(if self.maybe_applied {
            unconfirmed(e)
        } else {
            backend(e.to_string())
        })
    }
}

/// The error of an adjustment that may have been applied.
fn unconfirmed(e: &dyn std::fmt::Display) -> StoreError {
    StoreError::Unconfirmed(e.to_string())
}

/// One attempt at adjustment `request` (see
/// [`PostgresStore::adjust_uncached`]). The key's row is locked first: an
/// earlier attempt still running at the server holds it until it commits
/// or rolls back, and the look for its id that follows, a statement of its
/// own, sees what it did.
async fn adjust_once(
    pool: &PgPool,
    id: KeyId,
    adjustment: &Adjustment,
    request: &str,
    committing: &AtomicBool,
) -> Result<Result<Credits, StoreError>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let current: Option<i64> =
        sqlx::query_scalar("SELECT balance FROM api_keys WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(current) = current else {
        return Ok(Err(StoreError::NoSuchKey(id)));
    };
    let applied: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM adjustments WHERE request_id = $1)")
            .bind(request)
            .fetch_one(&mut *tx)
            .await?;
    if applied {
        tx.commit().await?;
        return Ok(Ok(Credits::from_millis(current)));
    }
    let delta = match delta_of(&adjustment.change, Credits::from_millis(current)) {
        Ok(delta) => delta,
        Err(e) => return Ok(Err(e)),
    };
    let balance: i64 = sqlx::query_scalar(
        "UPDATE api_keys SET balance = balance + $2 WHERE id = $1 RETURNING balance",
    )
    .bind(id)
    .bind(delta.millis())
    .fetch_one(&mut *tx)
    .await?;
    record_adjustment(
        &mut tx,
        id,
        delta,
        (&adjustment.actor, &adjustment.reason),
        Some(request),
    )
    .await?;
    committing.store(true, Ordering::SeqCst);
    tx.commit().await?;
    Ok(Ok(Credits::from_millis(balance)))
}

/// Inserts a key and its grant adjustment; `None` if the hash exists.
async fn insert_key(
    conn: &mut PgConnection,
    new: &NewKey,
) -> Result<Option<KeyRecord>, StoreError> {
    let row = sqlx::query(concat!(
        "INSERT INTO api_keys (key_hash, name, role, balance, models, rate_limit_rpm, \
         max_concurrent, created_at, expires_at, granted) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (key_hash) DO NOTHING RETURNING ",
        key_columns!()
    ))
    .bind(&new.hash.0)
    .bind(storable(&new.name))
    .bind(new.role.as_str())
    .bind(new.credits.millis())
    .bind(models_json(&new.models)?)
    .bind(new.rate_limit_rpm.map(i64::from))
    .bind(new.max_concurrent.map(i64::from))
    .bind(now_millis())
    .bind(new.expires_at)
    .bind(new.granted)
    .fetch_optional(&mut *conn)
    .await;
    let record = match row {
        Ok(Some(row)) => key_from_row(&row)?,
        Ok(None) => return Ok(None),
        Err(e) if is_unique_violation(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    record_adjustment(conn, record.id, new.credits, (&new.actor, "grant"), None).await?;
    Ok(Some(record))
}

/// Reserves `amount` on key `id` for this instance in one statement.
async fn reserve(link: &Link, id: KeyId, amount: Credits) -> Result<Credits, StoreError> {
    let _entered = link.shares.enter().await;
    // A refusal is re-checked a few times: a settlement may have freed
    // credits between the attempt and the read of what is available.
    let mut available = Credits::ZERO;
    for _ in 0..3 {
        let admitted: Option<i64> = sqlx::query_scalar(
            "WITH k AS ( \
                 UPDATE api_keys SET reserved = reserved + $1 \
                 WHERE id = $2 AND balance > 0 AND balance - reserved >= $1 \
                 RETURNING id, balance - reserved AS available \
             ), share AS ( \
                 INSERT INTO instance_reservations (instance_id, key_id, reserved) \
                 SELECT $3, id, $1 FROM k \
                 ON CONFLICT (instance_id, key_id) DO UPDATE \
                 SET reserved = instance_reservations.reserved + EXCLUDED.reserved \
             ) SELECT available FROM k",
        )
        .bind(amount.millis())
        .bind(id)
        .bind(&*link.instance)
        .fetch_optional(&link.pool)
        .await
        .inspect_err(|e| {
            // Made or not: counted as not made, the rows set to match.
            if shares::outcome_unknown(e) {
                link.shares.unsure_of(id);
            }
        })?;
        if let Some(left) = admitted {
            link.shares.reserved(id, amount.millis());
            return Ok(Credits::from_millis(left));
        }
        let state: Option<(i64, i64)> =
            sqlx::query_as("SELECT balance, reserved FROM api_keys WHERE id = $1")
                .bind(id)
                .fetch_optional(&link.pool)
                .await?;
        let (balance, reserved) = state.ok_or(StoreError::NoSuchKey(id))?;
        available = Credits::from_millis(balance) - Credits::from_millis(reserved);
        if balance <= 0 || available < amount {
            return Err(StoreError::InsufficientCredits { available });
        }
    }
    // Other requests kept taking what was freed before this one could.
    Err(StoreError::InsufficientCredits { available })
}

/// Gives back a reservation that will never be settled, in one statement:
/// `k` locks the key row `$3`, then `held` locks this instance's (`$2`)
/// share of it and yields how much of the reservation `$1` the share still
/// holds (less if it was released already because the instance was taken
/// for dead; no row if it holds nothing); `share` and the final update give
/// that back.
///
/// `held` joins `k`, so the share row is locked only after the key row:
/// the lock order of every path. Both reads are locking reads, which see
/// the latest committed version of their row (plain reads in the same
/// statement would see its snapshot, taken before it waited for the lock).
///
/// If it fails, the reservation counts as released all the same: this
/// instance's shares are reconciled once the server answers again.
async fn release(link: &Link, id: KeyId, amount: Credits) -> Result<(), StoreError> {
    let _entered = link.shares.enter().await;
    let result = sqlx::query(
        "WITH k AS ( \
             SELECT id FROM api_keys WHERE id = $3 FOR NO KEY UPDATE \
         ), held AS ( \
             SELECT GREATEST(LEAST(r.reserved, $1), 0) AS amount \
             FROM k JOIN instance_reservations r \
                  ON r.key_id = k.id AND r.instance_id = $2 \
             FOR NO KEY UPDATE OF r \
         ), share AS ( \
             UPDATE instance_reservations r SET reserved = r.reserved - held.amount \
             FROM held WHERE r.instance_id = $2 AND r.key_id = $3 AND held.amount <> 0 \
         ) UPDATE api_keys a SET reserved = a.reserved - held.amount \
           FROM k, held WHERE a.id = k.id AND held.amount <> 0",
    )
    .bind(amount.millis())
    .bind(&*link.instance)
    .bind(id)
    .execute(&link.pool)
    .await;
    link.shares.released(id, amount.millis());
    if result.is_err() {
        link.shares.unsure_of(id);
    }
    result?;
    Ok(())
}

/// A settlement waiting for the settlement task, and where to answer it.
struct Settlement {
    usage: UsageRecord,
    reserved: Credits,
    /// `None` once answered.
    answer: Option<oneshot::Sender<Result<Credits, StoreError>>>,
}

impl Settlement {
    fn answer(mut self, result: Result<Credits, StoreError>) {
        if let Some(answer) = self.answer.take() {
            // A caller that stopped waiting is not an error: it is applied.
            let _ = answer.send(result);
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if self.answer.is_some() {
            // The settlement task was dropped (the gateway stopped) before
            // PostgreSQL confirmed this charge: say what it was, so that it
            // can be put right by hand.
            let u = &self.usage;
            tracing::error!(
                key = u.key_id,
                credits = %u.credits,
                time = u.time,
                endpoint = %u.endpoint,
                prompt_tokens = u.prompt_tokens,
                completion_tokens = u.completion_tokens,
                "a charge was not recorded: the gateway stopped before PostgreSQL confirmed it"
            );
        }
    }
}

/// Applies the settlements of one store instance: takes every settlement
/// queued (up to [`SETTLE_BATCH_MAX`]), applies them in one statement
/// ([`settle_batch`]) and answers each once it has committed. Ends when the
/// store is dropped and the queue is drained.
async fn settlement_task(link: Arc<Link>, mut queue: mpsc::UnboundedReceiver<Settlement>) {
    let mut batch = Vec::with_capacity(SETTLE_BATCH_MAX);
    let mut numbers = BatchNumbers::default();
    while queue.recv_many(&mut batch, SETTLE_BATCH_MAX).await > 0 {
        let results = match apply_once(&link, numbers.next(), &batch).await {
            Ok(results) => results,
            // The server refused the statement, so nothing of it was
            // applied: settle one by one, so that one bad settlement fails
            // alone.
            Err(e) => {
                tracing::warn!("a batch of settlements failed ({e}); settling them one by one");
                let mut results = Vec::with_capacity(batch.len());
                for item in &batch {
                    results.push(settle_alone(&link, numbers.next(), item).await);
                }
                results
            }
        };
        for (settlement, result) in batch.drain(..).zip(results) {
            settlement.answer(result);
        }
    }
}

/// The numbers of one instance's settlement batches: 1, 2, 3, ...
#[derive(Default)]
struct BatchNumbers(i64);

impl BatchNumbers {
    fn next(&mut self) -> i64 {
        self.0 += 1;
        self.0
    }
}

/// Applies one settlement as a batch of its own (number `number`); if the
/// server refuses it too, gives its reservation back and reports why.
async fn settle_alone(link: &Link, number: i64, item: &Settlement) -> Result<Credits, StoreError> {
    match apply_once(link, number, std::slice::from_ref(item)).await {
        Ok(mut results) => results
            .pop()
            .unwrap_or_else(|| Err(backend("a settlement got no answer"))),
        Err(refused) => {
            // Nothing of it was applied: at least its credits must not stay
            // held until this gateway stops.
            let id = item.usage.key_id;
            if item.reserved > Credits::ZERO {
                release_abandoned(link, id, item.reserved).await;
            }
            tracing::error!(key = id, "a settlement was refused: {refused}");
            Err(StoreError::Backend(refused.to_string()))
        }
    }
}

/// First wait before a batch whose outcome is unknown is sent again;
/// each later wait doubles, up to [`RETRY_WAIT_MAX`].
const RETRY_WAIT_FIRST: Duration = Duration::from_millis(50);
const RETRY_WAIT_MAX: Duration = Duration::from_secs(2);
/// How long an adjustment whose outcome is unknown is sent again before
/// its caller is told so (shorter in unit tests, which wait for it).
#[cfg(not(test))]
const ADJUST_RETRY_FOR: Duration = Duration::from_secs(30);
#[cfg(test)]
const ADJUST_RETRY_FOR: Duration = Duration::from_secs(2);

/// Applies batch number `number` exactly once: returns each item's result,
/// or the server's refusal of the statement when no attempt at it can
/// have been applied.
///
/// When the connection fails (or the server reports a transient failure),
/// the batch may or may not have committed. It is then sent again, after a
/// pause, as long as it takes: the statement records `number` as the
/// instance's last batch in the same transaction and applies nothing if
/// that number (or a later one) was recorded already, so a batch that had
/// committed is answered with the balances as they are, never charged
/// twice. Should a later attempt be refused, the refusal is passed on only
/// once a look at the instance's row (which waits for an attempt still in
/// flight there) shows the batch unrecorded: the items are then applied
/// one by one under new, higher numbers, which an earlier attempt arriving
/// even later cannot pass. Callers wait meanwhile; a charge is never
/// dropped and a reservation never left held because the database was
/// briefly out of reach.
async fn apply_once(
    link: &Link,
    number: i64,
    items: &[Settlement],
) -> Result<Vec<Result<Credits, StoreError>>, sqlx::Error> {
    let _entered = link.shares.enter().await;
    let mut wait = RETRY_WAIT_FIRST;
    // Some attempt's outcome is unknown: it may have committed.
    let mut maybe_applied = false;
    let results = loop {
        let failure = match settle_batch(link, number, items).await {
            Ok(Some(results)) => break results,
            // An earlier attempt committed, its answer was lost.
            Ok(None) => match balances_now(&link.pool, items).await {
                Ok(results) => break results,
                Err(e) => e,
            },
            Err(e) => {
                maybe_applied |= shares::outcome_unknown(&e);
                if is_transient(&e) {
                    e
                } else if !maybe_applied {
                    // Refused, and no attempt can have been applied.
                    return Err(e);
                } else {
                    match recorded(link, number).await {
                        Ok(true) => match balances_now(&link.pool, items).await {
                            Ok(results) => break results,
                            Err(e) => e,
                        },
                        Ok(false) => return Err(e),
                        Err(e) => e,
                    }
                }
            }
        };
        tracing::warn!(
            batch = number,
            settlements = items.len(),
            "settlements not confirmed by PostgreSQL ({failure}); trying again in {wait:?}"
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_WAIT_MAX);
    };
    for item in items {
        link.shares
            .released(item.usage.key_id, item.reserved.millis());
    }
    for (item, result) in items.iter().zip(&results) {
        let id = item.usage.key_id;
        let left = result
            .as_ref()
            .ok()
            .and_then(|balance| link.leases.settled(id, balance.millis()));
        if let Some(left) = left {
            release_abandoned(link, id, Credits::from_millis(left)).await;
        }
    }
    Ok(results)
}

/// Whether batch `number` (or a later one) of this instance has committed,
/// once any attempt still holding the instance's row has finished.
async fn recorded(link: &Link, number: i64) -> Result<bool, sqlx::Error> {
    let last: Option<i64> = sqlx::query_scalar(
        "SELECT last_batch FROM settlement_batches WHERE instance_id = $1 FOR UPDATE",
    )
    .bind(&*link.instance)
    .fetch_optional(&link.pool)
    .await?;
    Ok(last.is_some_and(|last| last >= number))
}

/// Whether `e` may go away by itself: the connection failed (the statement
/// may have committed) or the server gave up on the statement for a reason
/// that is not in it (restarting, out of resources, a deadlock or
/// serialization failure, a cancelled query).
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d.code().is_some_and(|code| {
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
                || code == "55P03"
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Each item's key balance now: the answer for a batch that had committed.
async fn balances_now(
    pool: &PgPool,
    items: &[Settlement],
) -> Result<Vec<Result<Credits, StoreError>>, sqlx::Error> {
    let ids: Vec<KeyId> = items.iter().map(|item| item.usage.key_id).collect();
    let rows: Vec<(KeyId, i64)> =
        sqlx::query_as("SELECT id, balance FROM api_keys WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?;
    let balances: std::collections::HashMap<KeyId, i64> = rows.into_iter().collect();
    Ok(ids
        .iter()
        .map(|id| {
            balances
                .get(id)
                .map(|b| Credits::from_millis(*b))
                .ok_or(StoreError::NoSuchKey(*id))
        })
        .collect())
}

/// Text as PostgreSQL can store it: its `TEXT` cannot hold NUL, which a
/// client may put in a model name, or an admin in a key's name or an
/// adjustment's reason (`"\u0000"` is valid JSON). Replaced by U+FFFD, so
/// that the request is still recorded and charged, the key still made.
fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}").into()
    } else {
        text.into()
    }
}

/// Applies `items` (usage and reservation each) as batch number `number`,
/// in one statement, its own transaction: for each key, one update of the
/// key row (the summed charge, the summed release) and one of this
/// instance's share of it; one usage row per item; and `number` recorded
/// as this instance's last batch. Returns, per item, the key's balance just
/// after that item (items applied in order), or [`StoreError::NoSuchKey`];
/// `None`, with nothing applied, if batch `number` was applied already.
///
/// The instance's row in `settlement_batches` is locked first, then the key
/// rows in id order, then share rows (`held` joins `k`): the lock order of
/// every path. An earlier attempt at the same batch still in flight holds
/// that row, so this one waits for its outcome.
async fn settle_batch(
    link: &Link,
    number: i64,
    items: &[Settlement],
) -> Result<Option<Vec<Result<Credits, StoreError>>>, sqlx::Error> {
    let n = items.len();
    let mut key_id = Vec::with_capacity(n);
    let mut reserved = Vec::with_capacity(n);
    let mut credits = Vec::with_capacity(n);
    let mut time = Vec::with_capacity(n);
    let mut endpoints = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut prompt = Vec::with_capacity(n);
    let mut completion = Vec::with_capacity(n);
    let mut duration = Vec::with_capacity(n);
    for Settlement {
        usage,
        reserved: held,
        ..
    } in items
    {
        key_id.push(usage.key_id);
        reserved.push(held.millis());
        credits.push(usage.credits.millis());
        time.push(usage.time);
        endpoints.push(storable(&usage.endpoint));
        models.push(usage.model.as_deref().map(storable));
        status.push(i32::from(usage.status));
        prompt.push(i64_of(usage.prompt_tokens));
        completion.push(i64_of(usage.completion_tokens));
        duration.push(i64_of(usage.duration_ms));
    }
    let endpoint: Vec<&str> = endpoints.iter().map(|e| e.as_ref()).collect();
    let model: Vec<Option<&str>> = models.iter().map(|m| m.as_deref()).collect();
    let rows: Vec<(bool, Option<KeyId>, Option<i64>)> = sqlx::query_as(
        "WITH items AS ( \
             SELECT * FROM unnest($2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], \
                                  $6::TEXT[], $7::TEXT[], $8::INTEGER[], $9::BIGINT[], \
                                  $10::BIGINT[], $11::BIGINT[]) WITH ORDINALITY \
                 AS t(key_id, reserved, credits, time, endpoint, model, status, \
                      prompt_tokens, completion_tokens, duration_ms, n) \
         ), per_key AS ( \
             SELECT key_id, SUM(reserved)::BIGINT AS reserved, \
                    SUM(credits)::BIGINT AS credits \
             FROM items GROUP BY key_id \
         ), mark AS ( \
             INSERT INTO settlement_batches (instance_id, last_batch) VALUES ($1, $12) \
             ON CONFLICT (instance_id) DO UPDATE \
             SET last_batch = EXCLUDED.last_batch, updated_at = now() \
             WHERE settlement_batches.last_batch < EXCLUDED.last_batch \
             RETURNING 1 \
         ), k AS MATERIALIZED ( \
             SELECT id FROM api_keys \
             WHERE id IN (SELECT key_id FROM per_key) AND EXISTS (SELECT 1 FROM mark) \
             ORDER BY id FOR NO KEY UPDATE \
         ), held AS MATERIALIZED ( \
             SELECT r.key_id, GREATEST(LEAST(r.reserved, p.reserved), 0) AS amount \
             FROM k JOIN per_key p ON p.key_id = k.id \
                    JOIN instance_reservations r \
                         ON r.key_id = k.id AND r.instance_id = $1 \
             FOR NO KEY UPDATE OF r \
         ), share AS ( \
             UPDATE instance_reservations r SET reserved = r.reserved - held.amount \
             FROM held \
             WHERE r.instance_id = $1 AND r.key_id = held.key_id AND held.amount <> 0 \
         ), charged AS ( \
             UPDATE api_keys a \
             SET reserved = a.reserved - COALESCE(held.amount, 0), \
                 balance = a.balance - p.credits \
             FROM k JOIN per_key p ON p.key_id = k.id \
                    LEFT JOIN held ON held.key_id = k.id \
             WHERE a.id = k.id RETURNING a.id, a.balance \
         ), u AS ( \
             INSERT INTO usage (time, key_id, endpoint, model, status, prompt_tokens, \
                                completion_tokens, credits, duration_ms) \
             SELECT i.time, i.key_id, i.endpoint, i.model, i.status, i.prompt_tokens, \
                    i.completion_tokens, i.credits, i.duration_ms \
             FROM items i JOIN charged c ON c.id = i.key_id ORDER BY i.n \
         ) SELECT EXISTS (SELECT 1 FROM mark), c.id, c.balance \
           FROM (SELECT 1) AS one LEFT JOIN charged c ON TRUE",
    )
    .bind(&*link.instance)
    .bind(&key_id)
    .bind(&reserved)
    .bind(&credits)
    .bind(&time)
    .bind(&endpoint)
    .bind(&model)
    .bind(&status)
    .bind(&prompt)
    .bind(&completion)
    .bind(&duration)
    .bind(number)
    .fetch_all(&link.pool)
    .await?;
    if !rows.first().is_some_and(|(applied, ..)| *applied) {
        return Ok(None);
    }
    // The balance after each item: the final balance plus what the items
    // after it charged.
    let mut after: std::collections::HashMap<KeyId, i64> = rows
        .into_iter()
        .filter_map(|(_, id, balance)| Some((id?, balance?)))
        .collect();
    let mut results: Vec<Result<Credits, StoreError>> = items
        .iter()
        .rev()
        .map(|item| match after.get_mut(&item.usage.key_id) {
            Some(balance) => {
                let now = *balance;
                *balance = balance.saturating_add(item.usage.credits.millis());
                Ok(Credits::from_millis(now))
            }
            None => Err(StoreError::NoSuchKey(item.usage.key_id)),
        })
        .collect();
    results.reverse();
    Ok(Some(results))
}

/// Makes `fill`'s reservation and, if the server admits it, holds it as
/// the key's lease until it expires; then gives back what is left.
async fn run_lease(link: Arc<Link>, fill: Fill) {
    let (id, block) = (fill.id, Credits::from_millis(fill.block));
    let expiry = match reserve(&link, id, block).await {
        Ok(available) => link.leases.filled(fill, available.millis(), Instant::now()),
        Err(_) => {
            link.leases.fill_failed(fill);
            return;
        }
    };
    let left = match expiry {
        Ok(expiry) => {
            tokio::time::sleep_until(expiry.at.into()).await;
            link.leases.expire(&expiry)
        }
        Err(block) => block,
    };
    if left > 0 {
        release_abandoned(&link, id, Credits::from_millis(left)).await;
    }
}

async fn release_abandoned(link: &Link, id: KeyId, amount: Credits) {
    if let Err(e) = release(link, id, amount).await {
        tracing::warn!(key = id, "releasing an abandoned reservation failed: {e}");
    }
}

/// The caller's end of a reservation running in its own task.
struct Reservation {
    /// `None` once the answer was read.
    rx: Option<oneshot::Receiver<Result<Credits, StoreError>>>,
    link: Arc<Link>,
    id: KeyId,
    amount: Credits,
}

impl Reservation {
    async fn wait(&mut self) -> Result<Credits, StoreError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(backend("the reservation was already answered"));
        };
        let answer = rx.await;
        self.rx = None;
        answer.map_err(|_| backend("the reservation task failed"))?
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        // The caller stopped waiting. After `close` the task can no longer
        // send (and releases itself); an answer it sent before is here.
        rx.close();
        if let Ok(Ok(_)) = rx.try_recv() {
            let link = self.link.clone();
            let (id, amount) = (self.id, self.amount);
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(async move {
                        release_abandoned(&link, id, amount).await;
                    });
                }
                Err(_) => tracing::error!(
                    key = id,
                    "reservation abandoned outside a runtime; it stays open"
                ),
            }
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let generation = match self.keys.get(&hash.0) {
            Ok(record) => return Ok(Some(record)),
            Err(generation) => generation,
        };
        let started = Instant::now();
        let record = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE key_hash = $1"
        ))
        .bind(&hash.0)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| key_from_row(&r))
        .transpose()?;
        // Only keys that exist are remembered: unknown hashes are unbounded.
        if let Some(record) = &record {
            self.keys.fill(&hash.0, generation, started, record);
        }
        Ok(record)
    }

    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| key_from_row(&r))
        .transpose()
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(key_from_row)
        .collect()
    }

    async fn create_key(&self, new: NewKey) -> Result<KeyRecord, StoreError> {
        self.write(|pool| async move { Self::create_key_uncached(&pool, new).await })
            .await
    }

    async fn update_key(&self, id: KeyId, patch: KeyPatch) -> Result<KeyRecord, StoreError> {
        self.write(|pool| async move { Self::update_key_uncached(&pool, id, patch).await })
            .await
    }

    async fn revoke_key(&self, id: KeyId, at: Millis) -> Result<KeyRecord, StoreError> {
        self.write(|pool| async move { Self::revoke_key_uncached(&pool, id, at).await })
            .await
    }

    async fn adjust(&self, id: KeyId, adjustment: Adjustment) -> Result<Credits, StoreError> {
        self.write(|pool| async move { Self::adjust_uncached(&pool, id, adjustment).await })
            .await
    }

    async fn sync_grants(&self, grants: &[Grant]) -> Result<GrantReport, StoreError> {
        let grants = grants.to_vec();
        self.write(|pool| async move { Self::sync_grants_uncached(&pool, &grants).await })
            .await
    }

    async fn reserve(&self, id: KeyId, amount: Credits) -> Result<Credits, StoreError> {
        // Run apart from the caller: a caller that stops waiting (a client
        // that hung up) must not leave a reservation nobody will settle.
        // Exactly one side gives it back: the task, if its answer could not
        // be sent, or the `Reservation` when dropped, if the answer arrived
        // but was never read.
        if let Some(taken) = self.link.leases.take(id, amount.millis(), Instant::now()) {
            return Ok(self.served_from_lease(taken));
        }
        let (tx, rx) = oneshot::channel();
        let link = self.link.clone();
        tokio::spawn(async move {
            let result = reserve(&link, id, amount).await;
            if let Err(Ok(_)) = tx.send(result) {
                release_abandoned(&link, id, amount).await;
            }
        });
        let mut reservation = Reservation {
            rx: Some(rx),
            link: self.link.clone(),
            id,
            amount,
        };
        let available = match reservation.wait().await {
            Err(StoreError::InsufficientCredits { available }) => {
                // A fill of this instance's lease may have raced this
                // request to the key's last credits: they are here.
                let taken = self
                    .link
                    .leases
                    .take_after_refusal(id, amount.millis())
                    .await;
                return taken
                    .map(|taken| self.served_from_lease(taken))
                    .ok_or(StoreError::InsufficientCredits { available });
            }
            other => other?,
        };
        let fill =
            self.link
                .leases
                .fill_for(id, amount.millis(), available.millis(), Instant::now());
        if let Some(fill) = fill {
            tokio::spawn(run_lease(self.link.clone(), fill));
        }
        Ok(available)
    }

    async fn settle(&self, usage: UsageRecord, reserved: Credits) -> Result<Credits, StoreError> {
        // The settlement task owns the settlement once it is queued, so it
        // is completed even if the caller stops waiting.
        let (answer, rx) = oneshot::channel();
        self.settlements
            .send(Settlement {
                usage,
                reserved,
                answer: Some(answer),
            })
            .map_err(|_| backend("the settlement task has stopped"))?;
        rx.await
            .map_err(|_| backend("the settlement task failed"))?
    }

    async fn usage(
        &self,
        key: Option<KeyId>,
        page: PageRequest,
    ) -> Result<Vec<UsageEntry>, StoreError> {
        let limit = i64::from(page.limit);
        let rows = match (key, page.before) {
            (None, None) => {
                sqlx::query(concat!(
                    "SELECT ",
                    usage_columns!(),
                    " FROM usage ORDER BY id DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            (None, Some(before)) => {
                sqlx::query(concat!(
                    "SELECT ",
                    usage_columns!(),
                    " FROM usage WHERE id < $2 ORDER BY id DESC LIMIT $1"
                ))
                .bind(limit)
                .bind(before)
                .fetch_all(&self.pool)
                .await?
            }
            (Some(key), None) => {
                sqlx::query(concat!(
                    "SELECT ",
                    usage_columns!(),
                    " FROM usage WHERE key_id = $2 ORDER BY id DESC LIMIT $1"
                ))
                .bind(limit)
                .bind(key)
                .fetch_all(&self.pool)
                .await?
            }
            (Some(key), Some(before)) => {
                sqlx::query(concat!(
                    "SELECT ",
                    usage_columns!(),
                    " FROM usage WHERE key_id = $2 AND id < $3 ORDER BY id DESC LIMIT $1"
                ))
                .bind(limit)
                .bind(key)
                .bind(before)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(usage_from_row).collect()
    }

    async fn usage_totals(&self, id: KeyId) -> Result<UsageTotals, StoreError> {
        let (requests, prompt, completion, credits): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT used_requests, used_prompt_tokens, used_completion_tokens, used_credits \
             FROM api_keys WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or_default();
        let count = |v: i64| u64::try_from(v).map_err(|_| backend(format!("negative total {v}")));
        Ok(UsageTotals {
            requests: count(requests)?,
            prompt_tokens: count(prompt)?,
            completion_tokens: count(completion)?,
            credits_spent: Credits::from_millis(credits),
        })
    }

    async fn adjustments(&self, id: KeyId) -> Result<Vec<AdjustmentEntry>, StoreError> {
        let rows: Vec<(i64, i64, i64, String, String)> = sqlx::query_as(
            "SELECT time, key_id, delta, actor, reason FROM adjustments \
             WHERE key_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(time, key_id, delta, actor, reason)| AdjustmentEntry {
                time,
                key_id,
                delta: Credits::from_millis(delta),
                actor,
                reason,
            })
            .collect())
    }

    async fn release_stale_reservations(&self) -> Result<(), StoreError> {
        release_stale(&self.pool).await
    }

    async fn close(&self) {
        // A write whose caller has gone (a client that hung up, a request
        // cut at shutdown) is still under way: it is waited for, up to its
        // own time limit, so that it is neither lost nor left unknown.
        let within = ADJUST_RETRY_FOR + Duration::from_secs(5);
        if !self
            .writes
            .wait_idle(within, Duration::from_millis(20))
            .await
        {
            tracing::error!(
                writes = self.writes.count(),
                "writes to keys were still under way at shutdown: they may or may not \
                 have been applied; look at the keys' balances"
            );
        }
        end_leases(&self.link).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heartbeats every [`HEARTBEAT_EVERY`] from `start`, with the given
    /// outcomes; the numbers (1-based) of those after which it releases.
    fn releases(start: Instant, outcomes: &[bool]) -> Vec<usize> {
        let mut standing = Standing::new(start);
        let mut at = start;
        let mut released = Vec::new();
        for (n, &went_through) in outcomes.iter().enumerate() {
            at += HEARTBEAT_EVERY;
            if standing.beat(went_through, at) {
                released.push(n + 1);
            }
        }
        released
    }

    fn broken() -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }

    #[test]
    fn an_adjustment_is_sent_again_with_growing_waits_until_the_deadline() {
        let start = Instant::now();
        let mut retries = Retries::new(start);
        assert_eq!(retries.after(&broken(), start).ok(), Some(RETRY_WAIT_FIRST));
        assert_eq!(
            retries.after(&broken(), start).ok(),
            Some(2 * RETRY_WAIT_FIRST)
        );
        let late = start + ADJUST_RETRY_FOR;
        assert!(retries.after(&broken(), late).is_err());
    }

    #[test]
    fn an_adjustment_once_unconfirmed_stays_unconfirmed_whatever_follows() {
        let start = Instant::now();
        let late = start + ADJUST_RETRY_FOR;
        // The connection broke (perhaps after the commit); then the server
        // could not be reached at all until the deadline.
        let mut retries = Retries::new(start);
        assert!(retries.after(&broken(), start).is_ok());
        let told = retries.after(&sqlx::Error::PoolTimedOut, late);
        assert!(matches!(&told, Err(StoreError::Unconfirmed(_))), "{told:?}");
        // Never sent at all: nothing can have been applied.
        let mut retries = Retries::new(start);
        let told = retries.after(&sqlx::Error::PoolTimedOut, late);
        assert!(matches!(&told, Err(StoreError::Backend(_))), "{told:?}");
    }

    #[test]
    fn an_instance_beating_without_a_break_releases_every_minute() {
        assert_eq!(releases(Instant::now(), &[true; 18]), vec![6, 12, 18]);
    }

    #[test]
    fn an_instance_back_from_an_outage_beats_a_whole_stale_window_before_it_releases() {
        // Five beats, then the server is gone for seven (70 s: every other
        // gateway's heartbeat is stale too), then back.
        let mut outcomes = vec![true; 5];
        outcomes.extend([false; 7]);
        outcomes.extend([true; 14]);
        // Beat 13 is the first one back; it is the sixth that went
        // through, but this instance has beaten again for 0 s, and the
        // others have had no chance yet. The twelfth through is beat 19,
        // 60 s after beat 13; the eighteenth, beat 25.
        assert_eq!(releases(Instant::now(), &outcomes), vec![19, 25]);
    }

    #[test]
    fn a_beat_long_after_the_one_before_starts_the_window_again() {
        // Beats every 10 s for five minutes, but one hung (or the process
        // paused) for 70 s, then went through: the others had a minute
        // without heartbeats, as this one.
        let start = Instant::now();
        let mut standing = Standing::new(start);
        let mut at = start;
        let mut released = Vec::new();
        for n in 1..=30u64 {
            at += if n == 10 {
                Duration::from_secs(70)
            } else {
                HEARTBEAT_EVERY
            };
            if standing.beat(true, at) {
                released.push(n);
            }
        }
        // Beat 6 releases; beat 10 starts over; the sixth-through beats
        // after it (12, 18, 24, 30) release once 60 s have passed since
        // beat 10: from beat 16 on.
        assert_eq!(released, vec![6, 18, 24, 30]);
    }

    #[test]
    fn one_failed_heartbeat_starts_the_window_again() {
        let mut outcomes = vec![true; 11];
        outcomes.push(false);
        outcomes.extend([true; 12]);
        // Through: beats 1..=11 (the sixth at 6), 13.. (the 12th through at
        // 13, with 0 s behind it; the 18th at 19, 60 s; the 24th at 25).
        assert_eq!(releases(Instant::now(), &outcomes), vec![6, 19]);
    }
}
