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
//! transaction (group commit), commits, and then answers them all. A batch
//! runs without savepoints; should one of its commands fail, the batch is
//! rolled back and carried out again with each command in its own
//! savepoint, so that one failing command does not undo the others.
//!
//! The keys (with their balances) and the open reservations are kept in
//! process memory, under one mutex: the request path (`key_by_hash`, `key`
//! and `reserve`) reads them there and runs no SQL. The writer holds that
//! mutex while it commits a batch and applies the batch's changes to the
//! keys and releases its settled reservations, so a reservation sees
//! either the state before a settlement (old balance, reservation held) or
//! after it (new balance, reservation released), never a mix: it cannot
//! race a settlement. Hence one gateway serves a given SQLite file: a
//! second gateway on the same file would not see the first one's
//! reservations (use PostgreSQL for several). A restart starts with no
//! reservations, so [`Store::release_stale_reservations`] has nothing to
//! do.
//!
//! Other processes (the `tollgate keys ...` CLI) may open the same file at
//! the same time: balance changes are relative (`balance = balance - ?`),
//! so they compose, and `busy_timeout` makes each side wait for the other's
//! write lock. Their commits reach the cached keys as follows:
//! `key_by_hash` and `key` first read `PRAGMA data_version` on a dedicated
//! connection (one read transaction, no table read), and read every key
//! again when something committed since the cache last matched the file;
//! the writer notes its own commits there while it holds the mutex. So a
//! change committed by another process is seen by the next authenticated
//! request (and `reserve`, which follows authentication, uses the balance
//! seen then). One narrow race remains: a commit that lands between the
//! writer's own commit and its noting it is taken for the writer's; the
//! writer's connection, whose `data_version` changes only on commits of
//! other connections, catches it at the start of its next batch or, when
//! idle, within 50 ms. That is the bound on staleness.
//!
//! Reads other than those (listings, usage, totals) use a small pool of
//! read connections on the blocking thread pool; WAL readers never block
//! the writer nor wait for it. The writer commits without checkpointing
//! (`wal_autocheckpoint=0`) and checkpoints the WAL itself between batches,
//! so that the mutex is held only for the commit's WAL write.
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
    shared: Arc<Shared>,
}

/// The keys as committed and the open reservations. Its mutex also orders
/// the request path with the writer's commits (see the module doc).
type Shared = Mutex<Cache>;

struct Cache {
    keys: HashMap<KeyId, KeyRecord>,
    by_hash: HashMap<String, KeyId>,
    /// Open reservations per key.
    reserved: HashMap<KeyId, Credits>,
    /// A connection that only reads `PRAGMA data_version`, to notice
    /// commits made since the cache last matched the file.
    watcher: Connection,
    /// `watcher`'s data version when the cache last matched the file.
    seen: Option<i64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every holder leaves the cache consistent before anything can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn data_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))?)
}

impl Cache {
    fn open(path: &Path) -> Result<Cache, StoreError> {
        let watcher = open_reader(path)?;
        let mut cache = Cache {
            keys: HashMap::new(),
            by_hash: HashMap::new(),
            reserved: HashMap::new(),
            watcher,
            seen: None,
        };
        cache.reload()?;
        Ok(cache)
    }

    /// Reads every key again.
    fn reload(&mut self) -> Result<(), StoreError> {
        // A commit between the two reads is seen again at the next check.
        let version = data_version(&self.watcher)?;
        let mut keys = HashMap::new();
        let mut by_hash = HashMap::new();
        let mut stmt = self.watcher.prepare_cached(concat!(
            "SELECT ",
            key_columns!(),
            ", key_hash FROM api_keys"
        ))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let record = key_from_row(row)?;
            by_hash.insert(row.get(12)?, record.id);
            keys.insert(record.id, record);
        }
        drop(rows);
        drop(stmt);
        self.keys = keys;
        self.by_hash = by_hash;
        self.seen = Some(version);
        Ok(())
    }

    /// Reloads the keys if anything committed since the cache matched the
    /// file.
    fn refresh(&mut self) -> Result<(), StoreError> {
        if self.seen != Some(data_version(&self.watcher)?) {
            self.reload()?;
        }
        Ok(())
    }

    /// Notes the writer's own commit, just applied to the cache.
    fn absorb(&mut self) {
        self.seen = data_version(&self.watcher).ok();
    }

    fn add_reserved(&mut self, id: KeyId, change: Credits) {
        let entry = self.reserved.entry(id).or_insert(Credits::ZERO);
        *entry += change;
        if *entry == Credits::ZERO {
            self.reserved.remove(&id);
        }
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::Key(hash, record) => {
                if let Some(hash) = hash {
                    self.by_hash.insert(hash, record.id);
                }
                self.keys.insert(record.id, record);
            }
            Change::Balance(id, balance) => {
                if let Some(record) = self.keys.get_mut(&id) {
                    record.balance = balance;
                } else {
                    // Created by another process since the last reload.
                    self.seen = None;
                }
            }
            Change::Release(id, amount) => self.add_reserved(id, -amount),
        }
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
        std::thread::Builder::new()
            .name("tollgate-sqlite-writer".into())
            .spawn(move || {
                let opened = open_writer(&thread_path).and_then(|conn| {
                    let version = data_version(&conn)?;
                    let shared = Arc::new(Mutex::new(Cache::open(&thread_path)?));
                    Ok((conn, version, shared))
                });
                let (conn, version, shared) = match opened {
                    Ok(opened) => opened,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(shared.clone())).is_err() {
                    return;
                }
                Writer {
                    conn,
                    shared,
                    changes: Vec::new(),
                    data_version: version,
                    reload: false,
                    uncheckpointed: 0,
                }
                .run(rx);
            })
            .map_err(|e| backend(format!("cannot start the sqlite writer thread: {e}")))?;
        let shared = ready_rx
            .await
            .map_err(|_| backend("the sqlite writer thread stopped"))??;

        let readers = Arc::new(Readers {
            path,
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(READERS),
        });
        Ok(SqliteStore {
            writer: tx,
            readers,
            shared,
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

    /// The cache, brought up to date with commits of other processes.
    fn fresh(&self) -> Result<std::sync::MutexGuard<'_, Cache>, StoreError> {
        let mut cache = lock(&self.shared);
        cache.refresh()?;
        Ok(cache)
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

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| backend(format!("cannot open {}: {e}", path.display())))?;
    configure(&conn)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

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
            None => open_reader(&self.path),
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

/// What a command carried out returns.
enum Outcome {
    Key(KeyRecord),
    Credits(Credits),
    Grants(GrantReport),
}

impl Command {
    /// Answers the command with `result`, or with `error` when its
    /// transaction did not commit.
    fn answer(self, result: Result<Outcome, StoreError>, error: Option<&str>) {
        let result = match error {
            Some(error) if result.is_ok() => Err(backend(error)),
            _ => result,
        };
        let mismatch = || backend("the sqlite writer answered with the wrong kind of result");
        // A caller that went away no longer wants its answer.
        match self {
            Command::CreateKey(_, tx)
            | Command::UpdateKey(_, _, tx)
            | Command::RevokeKey(_, _, tx) => drop(tx.send(result.and_then(|o| match o {
                Outcome::Key(k) => Ok(k),
                _ => Err(mismatch()),
            }))),
            Command::Adjust(_, _, tx) | Command::Settle(_, _, tx) => {
                drop(tx.send(result.and_then(|o| match o {
                    Outcome::Credits(c) => Ok(c),
                    _ => Err(mismatch()),
                })))
            }
            Command::SyncGrants(_, tx) => drop(tx.send(result.and_then(|o| match o {
                Outcome::Grants(g) => Ok(g),
                _ => Err(mismatch()),
            }))),
        }
    }
}

/// A change to the cache, applied when its transaction commits.
enum Change {
    /// A key created (with its hash) or changed.
    Key(Option<String>, KeyRecord),
    /// A key's new balance.
    Balance(KeyId, Credits),
    /// A settled reservation.
    Release(KeyId, Credits),
}

/// How often an idle writer looks for commits of other processes.
const REFRESH_EVERY: Duration = Duration::from_millis(50);

struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    /// The changes of the current batch, applied to the cache at its commit.
    changes: Vec<Change>,
    /// This connection's `PRAGMA data_version`, which changes only when
    /// another connection commits.
    data_version: i64,
    /// The cache must be read again from the file.
    reload: bool,
    /// Batches committed since the last checkpoint.
    uncheckpointed: u32,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::new();
        let mut results = Vec::new();
        loop {
            let first = match rx.recv_timeout(REFRESH_EVERY) {
                Ok(cmd) => cmd,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.refresh_when_idle();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            let error = self.run_batch(&batch, &mut results);
            for (cmd, result) in batch.drain(..).zip(results.drain(..)) {
                cmd.answer(result, error.as_deref());
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

    /// Notes commits of other connections since the last look.
    fn look_for_other_writers(&mut self) -> Result<(), StoreError> {
        let version = data_version(&self.conn)?;
        if version != self.data_version {
            self.data_version = version;
            self.reload = true;
        }
        Ok(())
    }

    fn refresh_when_idle(&mut self) {
        if self.look_for_other_writers().is_err() {
            // Cannot tell: read the keys again.
            self.reload = true;
        }
        if self.reload {
            let mut cache = lock(&self.shared);
            match cache.reload() {
                Ok(()) => self.reload = false,
                // The request path reloads at its next look.
                Err(_) => cache.seen = None,
            }
        }
    }

    /// Carries out `batch` in one transaction and fills `results`, one per
    /// command. Returns an error for all of them when the transaction did
    /// not commit.
    fn run_batch(
        &mut self,
        batch: &[Command],
        results: &mut Vec<Result<Outcome, StoreError>>,
    ) -> Option<String> {
        results.clear();
        self.changes.clear();
        if let Err(e) = self.begin() {
            results.extend(batch.iter().map(|_| Err(backend(e.clone()))));
            return Some(e);
        }
        // Optimistically without savepoints; when a command fails, the
        // whole batch is rolled back and carried out again, each command in
        // its own savepoint so that its failure undoes only its own changes.
        results.extend(batch.iter().map(|cmd| self.execute(cmd)));
        if results.iter().any(Result::is_err) {
            results.clear();
            self.changes.clear();
            let _ = self.exec("ROLLBACK");
            if let Err(e) = self.begin() {
                results.extend(batch.iter().map(|_| Err(backend(e.clone()))));
                return Some(e);
            }
            for cmd in batch {
                let result = self.savepoint(cmd);
                results.push(result);
            }
        }
        // Commit and update the cache under its lock, so a reservation
        // never sees a settlement's charge without its release.
        let committed = {
            let mut cache = lock(&self.shared);
            let committed = self.exec("COMMIT");
            if committed.is_ok() {
                for change in self.changes.drain(..) {
                    cache.apply(change);
                }
                if self.reload {
                    match cache.reload() {
                        Ok(()) => self.reload = false,
                        Err(_) => cache.seen = None,
                    }
                } else {
                    cache.absorb();
                }
            }
            committed
        };
        self.changes.clear();
        self.uncheckpointed += 1;
        match committed {
            Ok(()) => None,
            Err(e) => {
                let _ = self.exec("ROLLBACK");
                Some(format!("sqlite commit failed: {e}"))
            }
        }
    }

    /// Starts the batch's transaction and looks for other writers' commits
    /// since the last batch (none can commit until ours ends).
    fn begin(&mut self) -> Result<(), String> {
        if !self.conn.is_autocommit() {
            // A transaction left open by a failed commit and rollback.
            let _ = self.exec("ROLLBACK");
        }
        self.exec("BEGIN IMMEDIATE")
            .map_err(|e| format!("cannot start an sqlite transaction: {e}"))?;
        if self.look_for_other_writers().is_err() {
            self.reload = true;
        }
        Ok(())
    }

    fn exec(&self, sql: &str) -> Result<(), StoreError> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// Carries out one command in the open transaction; on success, notes
    /// its changes to the cache.
    fn execute(&mut self, cmd: &Command) -> Result<Outcome, StoreError> {
        let conn = &self.conn;
        match cmd {
            Command::CreateKey(new, _) => {
                let record = create_key(conn, new, now_millis())?;
                self.changes
                    .push(Change::Key(Some(new.hash.0.clone()), record.clone()));
                Ok(Outcome::Key(record))
            }
            Command::UpdateKey(id, patch, _) => {
                let record = update_key(conn, *id, patch.clone())?;
                self.changes.push(Change::Key(None, record.clone()));
                Ok(Outcome::Key(record))
            }
            Command::RevokeKey(id, at, _) => {
                let record = revoke_key(conn, *id, *at)?;
                self.changes.push(Change::Key(None, record.clone()));
                Ok(Outcome::Key(record))
            }
            Command::Adjust(id, adjustment, _) => {
                let balance = adjust(conn, *id, adjustment)?;
                self.changes.push(Change::Balance(*id, balance));
                Ok(Outcome::Credits(balance))
            }
            Command::SyncGrants(grants, _) => {
                let report = sync_grants(conn, grants)?;
                // Rare (at start): read every key again at the commit.
                self.reload = true;
                Ok(Outcome::Grants(report))
            }
            Command::Settle(usage, reserved, _) => {
                let balance = settle(conn, usage)?;
                self.changes.push(Change::Balance(usage.key_id, balance));
                self.changes.push(Change::Release(usage.key_id, *reserved));
                Ok(Outcome::Credits(balance))
            }
        }
    }

    /// Carries out `cmd` in a savepoint, so that its failure undoes only
    /// its own changes.
    fn savepoint(&mut self, cmd: &Command) -> Result<Outcome, StoreError> {
        self.exec("SAVEPOINT command")?;
        let noted = self.changes.len();
        let result = self.execute(cmd).and_then(|outcome| {
            self.exec("RELEASE command")?;
            Ok(outcome)
        });
        if result.is_err() {
            self.changes.truncate(noted);
            if self.exec("ROLLBACK TO command").is_ok() {
                let _ = self.exec("RELEASE command");
            }
        }
        result
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

fn create_key(conn: &Connection, new: &NewKey, now: Millis) -> Result<KeyRecord, StoreError> {
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

fn adjust(conn: &Connection, id: KeyId, adjustment: &Adjustment) -> Result<Credits, StoreError> {
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
                    &NewKey {
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
        let cache = self.fresh()?;
        Ok(cache
            .by_hash
            .get(&hash.0)
            .and_then(|id| cache.keys.get(id))
            .cloned())
    }

    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.fresh()?.keys.get(&id).cloned())
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
        // The request was authenticated just before, which brought the
        // cache up to date.
        let mut cache = lock(&self.shared);
        let balance = cache
            .keys
            .get(&id)
            .ok_or(StoreError::NoSuchKey(id))?
            .balance;
        let available = balance - cache.reserved.get(&id).copied().unwrap_or(Credits::ZERO);
        if !balance.is_positive() || available < amount {
            return Err(StoreError::InsufficientCredits { available });
        }
        cache.add_reserved(id, amount);
        Ok(available - amount)
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
