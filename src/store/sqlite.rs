//! The `sqlite` store: one SQLite file, for a single gateway.
//!
//! # Durability
//!
//! The file is opened in WAL mode with `synchronous=NORMAL`. A transaction
//! that has committed survives `kill -9` of the process (the WAL is written
//! before the commit returns, and the operating system keeps it); a power
//! loss or an operating-system crash may lose the last transactions
//! committed before it (they are made durable at the next WAL checkpoint).
//! Every write is committed before its caller is answered, so a settlement
//! that was answered is on disk.
//!
//! # One gateway per file
//!
//! All writes go through one dedicated writer thread with its own
//! connection. It takes whatever commands are queued, applies them in ONE
//! transaction (group commit, each command inside its own savepoint so that
//! one failing command does not undo the others), commits, and then answers
//! them all.
//!
//! Open reservations are kept in process memory, not in the file: a
//! reservation is a read of the committed balance plus a check against the
//! reservations table, both under one mutex. The writer holds that mutex
//! while it commits a batch and releases the batch's settled reservations,
//! so a reservation sees either the state before a settlement (old balance,
//! reservation held) or after it (new balance, reservation released), never
//! a mix: it cannot race a settlement. Hence one gateway serves a given
//! SQLite file: a second gateway on the same file would not see the first
//! one's reservations (use PostgreSQL for several). A restart starts with no
//! reservations, so [`Store::release_stale_reservations`] has nothing to do.
//! Other processes (the `tollgate keys ...` CLI) may open the same file at
//! the same time: balance changes are relative (`balance = balance - ?`), so
//! they compose, and `busy_timeout` makes each side wait for the other's
//! write lock.
//!
//! Reads use a small pool of read connections; WAL readers never block the
//! writer nor wait for it. The point lookups of the request path
//! (`key_by_hash`, `key`, and the balance read of `reserve`) take a few
//! microseconds on an indexed row and run right on the caller's thread, as
//! a handoff to another thread would cost more than the query; listings and
//! totals run on the blocking thread pool. The writer commits without
//! checkpointing (`wal_autocheckpoint=0`) and checkpoints the WAL itself
//! between batches, so that the mutex is held only for the commit's WAL
//! write.
//!
//! # Schema
//!
//! SQL files in `migrations/sqlite/NNNN_name.sql`, embedded in the binary and
//! applied in order at open; the schema version is `PRAGMA user_version`.

use super::*;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;

/// The schema, in order; entry `i` brings the file to version `i + 1`.
const MIGRATIONS: &[(&str, &str)] = &[(
    "0001_init",
    include_str!("../../migrations/sqlite/0001_init.sql"),
)];

/// How long a connection waits for another one's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads running at once, each on its own connection (kept open between
/// reads).
const READERS: usize = 8;
/// At most this many queued commands share one transaction.
const MAX_BATCH: usize = 512;
/// The writer checkpoints the WAL after this many committed batches.
const CHECKPOINT_EVERY: u32 = 200;

macro_rules! key_columns {
    () => {
        "id, name, role, balance, models, rate_limit_rpm, max_concurrent, \
         created_at, revoked_at, expires_at, granted, disabled"
    };
}

macro_rules! usage_columns {
    () => {
        "id, time, key_id, endpoint, model, status, prompt_tokens, \
         completion_tokens, credits, duration_ms"
    };
}

pub struct SqliteStore {
    writer: mpsc::Sender<Command>,
    readers: Arc<Readers>,
    reservations: Arc<Reservations>,
}

/// Open reservations per key. Its mutex also orders reservations with the
/// writer's commits (see the module doc).
type Reservations = Mutex<HashMap<KeyId, Credits>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every holder leaves the map consistent before anything can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn add_reserved(reserved: &mut HashMap<KeyId, Credits>, id: KeyId, change: Credits) {
    let entry = reserved.entry(id).or_insert(Credits::ZERO);
    *entry += change;
    if *entry == Credits::ZERO {
        reserved.remove(&id);
    }
}

impl SqliteStore {
    /// Opens (creating it if missing) the SQLite file at `path` and brings
    /// its schema up to date.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let path = path.to_path_buf();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel();
        let thread_path = path.clone();
        let reservations = Arc::new(Reservations::default());
        let writer_reservations = reservations.clone();
        std::thread::Builder::new()
            .name("tollgate-sqlite-writer".into())
            .spawn(move || {
                let conn = match open_writer(&thread_path) {
                    Ok(conn) => conn,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(())).is_err() {
                    return;
                }
                Writer {
                    conn,
                    reservations: writer_reservations,
                    releases: Vec::new(),
                    uncheckpointed: 0,
                }
                .run(rx);
            })
            .map_err(|e| backend(format!("cannot start the sqlite writer thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| backend("the sqlite writer thread stopped"))??;

        let readers = Arc::new(Readers {
            path,
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(READERS),
        });
        // Open one reader now, so that a file we cannot read fails here.
        let first = readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = first.take()?;
            first.put(conn);
            Ok::<_, StoreError>(())
        })
        .await
        .map_err(|e| backend(e.to_string()))??;
        Ok(SqliteStore {
            writer: tx,
            readers,
            reservations,
        })
    }

    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(make(tx))
            .map_err(|_| backend("the sqlite writer thread stopped"))?;
        rx.await
            .map_err(|_| backend("the sqlite writer thread stopped"))?
    }

    /// Runs a point lookup right here on a pooled read connection.
    fn read_now<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.take()?;
        let result = f(&conn);
        self.readers.put(conn);
        result
    }

    /// Runs a read on the blocking thread pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self
            .readers
            .permits
            .acquire()
            .await
            .map_err(|e| backend(e.to_string()))?;
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.take()?;
            let result = f(&conn);
            readers.put(conn);
            result
        })
        .await
        .map_err(|e| backend(format!("sqlite read task failed: {e}")))?
    }
}

fn backend(msg: impl Into<String>) -> StoreError {
    StoreError::Backend(msg.into())
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| backend(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut conn = Connection::open(path)
        .map_err(|e| backend(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(backend(format!(
            "{}: cannot use WAL journal mode (got {mode})",
            path.display()
        )));
    }
    configure(&conn)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Applies the migrations the file has not seen yet, each in its own
/// transaction together with the new `user_version`.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let latest = MIGRATIONS.len() as i64;
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version < 0 || version > latest {
            return Err(backend(format!(
                "the database has schema version {version}, newer than this tollgate knows \
                 ({latest}); upgrade tollgate"
            )));
        }
        if version == latest {
            return Ok(());
        }
        let (name, sql) = MIGRATIONS[version as usize];
        tx.execute_batch(sql)
            .map_err(|e| backend(format!("sqlite migration {name} failed: {e}")))?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}

// ---------------------------------------------------------------------------
// Reads

struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: tokio::sync::Semaphore,
}

impl Readers {
    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => {
                let conn = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| backend(format!("cannot open {}: {e}", self.path.display())))?;
                configure(&conn)?;
                conn.pragma_update(None, "query_only", true)?;
                Ok(conn)
            }
        }
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < READERS {
            idle.push(conn);
        }
    }
}

fn conversion_error(
    column: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Integer, Box::new(e))
}

fn opt_u32(row: &Row, column: usize) -> rusqlite::Result<Option<u32>> {
    row.get::<_, Option<i64>>(column)?
        .map(|v| u32::try_from(v).map_err(|e| conversion_error(column, e)))
        .transpose()
}

fn u64_column(row: &Row, column: usize) -> rusqlite::Result<u64> {
    u64::try_from(row.get::<_, i64>(column)?).map_err(|e| conversion_error(column, e))
}

#[derive(Debug)]
struct BadRole(String);

impl std::fmt::Display for BadRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown role {:?}", self.0)
    }
}

impl std::error::Error for BadRole {}

/// A row of `key_columns!()`.
fn key_from_row(row: &Row) -> rusqlite::Result<KeyRecord> {
    let role: String = row.get(2)?;
    let models: Option<String> = row.get(4)?;
    Ok(KeyRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        role: Role::parse(&role).ok_or_else(|| conversion_error(2, BadRole(role.clone())))?,
        balance: Credits::from_millis(row.get(3)?),
        models: models
            .map(|m| serde_json::from_str::<Vec<String>>(&m).map_err(|e| conversion_error(4, e)))
            .transpose()?,
        rate_limit_rpm: opt_u32(row, 5)?,
        max_concurrent: opt_u32(row, 6)?,
        created_at: row.get(7)?,
        revoked_at: row.get(8)?,
        expires_at: row.get(9)?,
        granted: row.get(10)?,
        disabled: row.get(11)?,
    })
}

/// A row of `usage_columns!()`.
fn usage_from_row(row: &Row) -> rusqlite::Result<UsageEntry> {
    Ok(UsageEntry {
        id: row.get(0)?,
        record: UsageRecord {
            time: row.get(1)?,
            key_id: row.get(2)?,
            endpoint: row.get(3)?,
            model: row.get(4)?,
            status: u16::try_from(row.get::<_, i64>(5)?).map_err(|e| conversion_error(5, e))?,
            prompt_tokens: u64_column(row, 6)?,
            completion_tokens: u64_column(row, 7)?,
            credits: Credits::from_millis(row.get(8)?),
            duration_ms: u64_column(row, 9)?,
        },
    })
}

fn key_by_id(conn: &Connection, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
    Ok(conn
        .prepare_cached(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE id = ?1"
        ))?
        .query_row([id], key_from_row)
        .optional()?)
}

fn key_by_hash(conn: &Connection, hash: &str) -> Result<Option<KeyRecord>, StoreError> {
    Ok(conn
        .prepare_cached(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE key_hash = ?1"
        ))?
        .query_row([hash], key_from_row)
        .optional()?)
}

fn models_json(models: &Option<Vec<String>>) -> Result<Option<String>, StoreError> {
    models
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| backend(e.to_string()))
}

/// Stores counts that do not fit an SQLite integer as the largest one.
fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------
// Writes

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    CreateKey(NewKey, Reply<KeyRecord>),
    UpdateKey(KeyId, KeyPatch, Reply<KeyRecord>),
    RevokeKey(KeyId, Millis, Reply<KeyRecord>),
    Adjust(KeyId, Adjustment, Reply<Credits>),
    SyncGrants(Vec<Grant>, Reply<GrantReport>),
    Settle(Box<UsageRecord>, Credits, Reply<Credits>),
}

/// A command carried out, to be answered once its transaction committed.
enum Done {
    Key(Reply<KeyRecord>, Result<KeyRecord, StoreError>),
    Credits(Reply<Credits>, Result<Credits, StoreError>),
    Grants(Reply<GrantReport>, Result<GrantReport, StoreError>),
}

impl Done {
    /// A command that is answered without being carried out.
    fn refused(cmd: Command, error: &str) -> Done {
        match cmd {
            Command::CreateKey(_, tx)
            | Command::UpdateKey(_, _, tx)
            | Command::RevokeKey(_, _, tx) => Done::Key(tx, Err(backend(error))),
            Command::Adjust(_, _, tx) | Command::Settle(_, _, tx) => {
                Done::Credits(tx, Err(backend(error)))
            }
            Command::SyncGrants(_, tx) => Done::Grants(tx, Err(backend(error))),
        }
    }

    /// Turns a success into `error`: its transaction did not commit.
    fn fail(&mut self, error: &str) {
        match self {
            Done::Key(_, r @ Ok(_)) => *r = Err(backend(error)),
            Done::Credits(_, r @ Ok(_)) => *r = Err(backend(error)),
            Done::Grants(_, r @ Ok(_)) => *r = Err(backend(error)),
            _ => {}
        }
    }

    fn answer(self) {
        // A caller that went away no longer wants its answer.
        match self {
            Done::Key(tx, r) => drop(tx.send(r)),
            Done::Credits(tx, r) => drop(tx.send(r)),
            Done::Grants(tx, r) => drop(tx.send(r)),
        }
    }
}

struct Writer {
    conn: Connection,
    reservations: Arc<Reservations>,
    /// Reservations settled in the current batch, released at its commit.
    releases: Vec<(KeyId, Credits)>,
    /// Batches committed since the last checkpoint.
    uncheckpointed: u32,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::new();
        let mut done = Vec::new();
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            self.run_batch(&mut batch, &mut done);
            for d in done.drain(..) {
                d.answer();
            }
            if self.uncheckpointed >= CHECKPOINT_EVERY {
                self.uncheckpointed = 0;
                // Best effort: readers may hold part of the WAL; a later
                // checkpoint gets the rest.
                let _ = self
                    .conn
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        }
    }

    fn run_batch(&mut self, batch: &mut Vec<Command>, done: &mut Vec<Done>) {
        if !self.conn.is_autocommit() {
            // A transaction left open by a failed commit and rollback.
            let _ = self.exec("ROLLBACK");
        }
        if let Err(e) = self.exec("BEGIN IMMEDIATE") {
            let msg = format!("cannot start an sqlite transaction: {e}");
            done.extend(batch.drain(..).map(|cmd| Done::refused(cmd, &msg)));
            return;
        }
        self.releases.clear();
        for cmd in batch.drain(..) {
            let d = self.execute(cmd);
            done.push(d);
        }
        // Commit and release under the reservations' lock, so a reservation
        // never sees a settlement's charge without its release.
        let committed = {
            let mut reserved = lock(&self.reservations);
            let committed = self.exec("COMMIT");
            if committed.is_ok() {
                for (id, amount) in self.releases.drain(..) {
                    add_reserved(&mut reserved, id, -amount);
                }
            }
            committed
        };
        self.releases.clear();
        self.uncheckpointed += 1;
        if let Err(e) = committed {
            let _ = self.exec("ROLLBACK");
            let msg = format!("sqlite commit failed: {e}");
            for d in done.iter_mut() {
                d.fail(&msg);
            }
        }
    }

    fn exec(&self, sql: &str) -> Result<(), StoreError> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    fn execute(&mut self, cmd: Command) -> Done {
        match cmd {
            Command::CreateKey(new, tx) => {
                Done::Key(tx, self.savepoint(|c| create_key(c, new, now_millis())))
            }
            Command::UpdateKey(id, patch, tx) => {
                Done::Key(tx, self.savepoint(|c| update_key(c, id, patch)))
            }
            Command::RevokeKey(id, at, tx) => {
                Done::Key(tx, self.savepoint(|c| revoke_key(c, id, at)))
            }
            Command::Adjust(id, adjustment, tx) => {
                Done::Credits(tx, self.savepoint(|c| adjust(c, id, adjustment)))
            }
            Command::SyncGrants(grants, tx) => {
                Done::Grants(tx, self.savepoint(|c| sync_grants(c, &grants)))
            }
            Command::Settle(usage, reserved, tx) => {
                let result = self.savepoint(|c| settle(c, &usage));
                if result.is_ok() {
                    self.releases.push((usage.key_id, reserved));
                }
                Done::Credits(tx, result)
            }
        }
    }

    /// Runs `f` in a savepoint, so that its failure undoes only its own
    /// changes.
    fn savepoint<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.exec("SAVEPOINT command")?;
        match f(&self.conn) {
            Ok(v) => {
                self.exec("RELEASE command")?;
                Ok(v)
            }
            Err(e) => {
                if self.exec("ROLLBACK TO command").is_ok() {
                    let _ = self.exec("RELEASE command");
                }
                Err(e)
            }
        }
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

fn record_adjustment(
    conn: &Connection,
    id: KeyId,
    delta: Credits,
    actor: &str,
    reason: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO adjustments (time, key_id, delta, actor, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![now_millis(), id, delta.millis(), actor, reason])?;
    Ok(())
}

fn create_key(conn: &Connection, new: NewKey, now: Millis) -> Result<KeyRecord, StoreError> {
    let inserted = conn
        .prepare_cached(concat!(
            "INSERT INTO api_keys (key_hash, name, role, balance, models, rate_limit_rpm, \
             max_concurrent, created_at, expires_at, granted, disabled) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0) RETURNING ",
            key_columns!()
        ))?
        .query_row(
            params![
                new.hash.0,
                new.name,
                new.role.as_str(),
                new.credits.millis(),
                models_json(&new.models)?,
                new.rate_limit_rpm,
                new.max_concurrent,
                now,
                new.expires_at,
                new.granted,
            ],
            key_from_row,
        );
    let record = match inserted {
        Ok(record) => record,
        Err(e) if is_unique_violation(&e) => return Err(StoreError::DuplicateKey),
        Err(e) => return Err(e.into()),
    };
    record_adjustment(conn, record.id, new.credits, &new.actor, "grant")?;
    Ok(record)
}

fn update_key(conn: &Connection, id: KeyId, patch: KeyPatch) -> Result<KeyRecord, StoreError> {
    let mut record = key_by_id(conn, id)?.ok_or(StoreError::NoSuchKey(id))?;
    patch.apply(&mut record);
    conn.prepare_cached(
        "UPDATE api_keys SET name = ?2, models = ?3, rate_limit_rpm = ?4, max_concurrent = ?5, \
         expires_at = ?6 WHERE id = ?1",
    )?
    .execute(params![
        id,
        record.name,
        models_json(&record.models)?,
        record.rate_limit_rpm,
        record.max_concurrent,
        record.expires_at,
    ])?;
    Ok(record)
}

fn revoke_key(conn: &Connection, id: KeyId, at: Millis) -> Result<KeyRecord, StoreError> {
    conn.prepare_cached(concat!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1 RETURNING ",
        key_columns!()
    ))?
    .query_row(params![id, at], key_from_row)
    .optional()?
    .ok_or(StoreError::NoSuchKey(id))
}

fn adjust(conn: &Connection, id: KeyId, adjustment: Adjustment) -> Result<Credits, StoreError> {
    let current: i64 = conn
        .prepare_cached("SELECT balance FROM api_keys WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?
        .ok_or(StoreError::NoSuchKey(id))?;
    let delta = delta_of(&adjustment.change, Credits::from_millis(current));
    let balance: i64 = conn
        .prepare_cached(
            "UPDATE api_keys SET balance = balance + ?2 WHERE id = ?1 RETURNING balance",
        )?
        .query_row(params![id, delta.millis()], |r| r.get(0))?;
    record_adjustment(conn, id, delta, &adjustment.actor, &adjustment.reason)?;
    Ok(Credits::from_millis(balance))
}

fn set_disabled(conn: &Connection, id: KeyId, disabled: bool) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE api_keys SET disabled = ?2 WHERE id = ?1")?
        .execute(params![id, disabled])?;
    Ok(())
}

fn sync_grants(conn: &Connection, grants: &[Grant]) -> Result<GrantReport, StoreError> {
    let mut report = GrantReport::default();
    let mut configured = Vec::with_capacity(grants.len());
    for grant in grants {
        match key_by_hash(conn, &grant.hash.0)? {
            None => {
                let record = create_key(
                    conn,
                    NewKey {
                        hash: grant.hash.clone(),
                        name: grant.name.clone(),
                        role: grant.role,
                        credits: grant.credits,
                        models: None,
                        rate_limit_rpm: None,
                        max_concurrent: None,
                        expires_at: None,
                        granted: true,
                        actor: "config".into(),
                    },
                    now_millis(),
                )?;
                report.created.push(record.id);
                configured.push(record.id);
            }
            Some(existing) => {
                if existing.disabled {
                    set_disabled(conn, existing.id, false)?;
                    report.reenabled.push(existing.id);
                }
                configured.push(existing.id);
            }
        }
    }
    let candidates: Vec<KeyId> = conn
        .prepare_cached("SELECT id FROM api_keys WHERE granted AND NOT disabled ORDER BY id")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in candidates {
        if !configured.contains(&id) {
            set_disabled(conn, id, true)?;
            report.disabled.push(id);
        }
    }
    Ok(report)
}

fn settle(conn: &Connection, usage: &UsageRecord) -> Result<Credits, StoreError> {
    let balance: i64 = conn
        .prepare_cached(
            "UPDATE api_keys SET balance = balance - ?2 WHERE id = ?1 RETURNING balance",
        )?
        .query_row(params![usage.key_id, usage.credits.millis()], |r| r.get(0))
        .optional()?
        .ok_or(StoreError::NoSuchKey(usage.key_id))?;
    conn.prepare_cached(
        "INSERT INTO usage (time, key_id, endpoint, model, status, prompt_tokens, \
         completion_tokens, credits, duration_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        usage.time,
        usage.key_id,
        usage.endpoint,
        usage.model,
        usage.status,
        i64_of(usage.prompt_tokens),
        i64_of(usage.completion_tokens),
        usage.credits.millis(),
        i64_of(usage.duration_ms),
    ])?;
    Ok(Credits::from_millis(balance))
}

// ---------------------------------------------------------------------------

#[async_trait]
impl Store for SqliteStore {
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        self.read_now(|c| key_by_hash(c, &hash.0))
    }

    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.read_now(|c| key_by_id(c, id))
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys ORDER BY id"
            ))?
            .query_map([], key_from_row)?
            .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn create_key(&self, new: NewKey) -> Result<KeyRecord, StoreError> {
        self.write(|tx| Command::CreateKey(new, tx)).await
    }

    async fn update_key(&self, id: KeyId, patch: KeyPatch) -> Result<KeyRecord, StoreError> {
        self.write(|tx| Command::UpdateKey(id, patch, tx)).await
    }

    async fn revoke_key(&self, id: KeyId, at: Millis) -> Result<KeyRecord, StoreError> {
        self.write(|tx| Command::RevokeKey(id, at, tx)).await
    }

    async fn adjust(&self, id: KeyId, adjustment: Adjustment) -> Result<Credits, StoreError> {
        self.write(|tx| Command::Adjust(id, adjustment, tx)).await
    }

    async fn sync_grants(&self, grants: &[Grant]) -> Result<GrantReport, StoreError> {
        let grants = grants.to_vec();
        self.write(|tx| Command::SyncGrants(grants, tx)).await
    }

    async fn reserve(&self, id: KeyId, amount: Credits) -> Result<Credits, StoreError> {
        self.read_now(|c| {
            let mut reserved = lock(&self.reservations);
            let balance: Option<i64> = c
                .prepare_cached("SELECT balance FROM api_keys WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            let balance = Credits::from_millis(balance.ok_or(StoreError::NoSuchKey(id))?);
            let available = balance - reserved.get(&id).copied().unwrap_or(Credits::ZERO);
            if !balance.is_positive() || available < amount {
                return Err(StoreError::InsufficientCredits { available });
            }
            add_reserved(&mut reserved, id, amount);
            Ok(available - amount)
        })
    }

    async fn settle(&self, usage: UsageRecord, reserved: Credits) -> Result<Credits, StoreError> {
        self.write(|tx| Command::Settle(Box::new(usage), reserved, tx))
            .await
    }

    async fn usage(
        &self,
        key: Option<KeyId>,
        page: PageRequest,
    ) -> Result<Vec<UsageEntry>, StoreError> {
        let limit = i64::from(page.limit);
        self.read(move |c| {
            let rows = match (key, page.before) {
                (None, None) => c
                    .prepare_cached(concat!(
                        "SELECT ",
                        usage_columns!(),
                        " FROM usage ORDER BY id DESC LIMIT ?1"
                    ))?
                    .query_map(params![limit], usage_from_row)?
                    .collect::<Result<_, _>>(),
                (None, Some(before)) => c
                    .prepare_cached(concat!(
                        "SELECT ",
                        usage_columns!(),
                        " FROM usage WHERE id < ?2 ORDER BY id DESC LIMIT ?1"
                    ))?
                    .query_map(params![limit, before], usage_from_row)?
                    .collect::<Result<_, _>>(),
                (Some(key), None) => c
                    .prepare_cached(concat!(
                        "SELECT ",
                        usage_columns!(),
                        " FROM usage WHERE key_id = ?2 ORDER BY id DESC LIMIT ?1"
                    ))?
                    .query_map(params![limit, key], usage_from_row)?
                    .collect::<Result<_, _>>(),
                (Some(key), Some(before)) => c
                    .prepare_cached(concat!(
                        "SELECT ",
                        usage_columns!(),
                        " FROM usage WHERE key_id = ?2 AND id < ?3 ORDER BY id DESC LIMIT ?1"
                    ))?
                    .query_map(params![limit, key, before], usage_from_row)?
                    .collect::<Result<_, _>>(),
            };
            Ok(rows?)
        })
        .await
    }

    async fn usage_totals(&self, id: KeyId) -> Result<UsageTotals, StoreError> {
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), \
                 COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(credits), 0) \
                 FROM usage WHERE key_id = ?1",
            )?
            .query_row([id], |r| {
                Ok(UsageTotals {
                    requests: u64_column(r, 0)?,
                    prompt_tokens: u64_column(r, 1)?,
                    completion_tokens: u64_column(r, 2)?,
                    credits_spent: Credits::from_millis(r.get(3)?),
                })
            })?)
        })
        .await
    }

    async fn adjustments(&self, id: KeyId) -> Result<Vec<AdjustmentEntry>, StoreError> {
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT time, key_id, delta, actor, reason FROM adjustments \
                 WHERE key_id = ?1 ORDER BY id",
            )?
            .query_map([id], |r| {
                Ok(AdjustmentEntry {
                    time: r.get(0)?,
                    key_id: r.get(1)?,
                    delta: Credits::from_millis(r.get(2)?),
                    actor: r.get(3)?,
                    reason: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn release_stale_reservations(&self) -> Result<(), StoreError> {
        // Reservations live in the writer thread's memory and die with the
        // process: a fresh gateway has none, and one gateway serves a file.
        Ok(())
    }
}
