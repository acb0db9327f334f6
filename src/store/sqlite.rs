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
//! process memory: the request path (`key_by_hash`, `key` and `reserve`)
//! reads them there and runs no SQL but one `PRAGMA data_version`. Each key
//! has its own entry, under its own mutex, holding its record and its open
//! reservations; the map from ids and hashes to entries is under a
//! read-write lock that only the writer thread takes for writing (when a
//! key appears), the request path taking it in shared mode just long
//! enough to find an entry. A reservation locks only its key's entry.
//!
//! Only the writer thread changes the entries. It commits a batch with no
//! lock of the cache held, and then applies the batch's changes, each
//! under its key's lock: a settlement sets the key's new balance and
//! releases its reservation at once. So a reservation sees, for its key,
//! either the state before a settlement (old balance, reservation held) or
//! after it (new balance, reservation released), never a mix; between the
//! commit and the update it sees the state before, which counts the
//! settlement's reservation as spent, so it is not admitted more than
//! before the settlement. Admin writes (top-ups, adjustments, revocations,
//! new keys) reach the entries the same way, after their commit and before
//! their caller is answered. Hence one gateway serves a given SQLite file:
//! a second gateway on the same file would not see the first one's
//! reservations (use PostgreSQL for several). A restart starts with no
//! reservations, so [`Store::release_stale_reservations`] has nothing to
//! do.
//!
//! Other processes (the `tollgate keys ...` CLI) may open the same file at
//! the same time: balance changes are relative (`balance = balance - ?`),
//! so they compose, and `busy_timeout` makes each side wait for the other's
//! write lock. Their commits reach the cache as follows. The writer's
//! connection's `PRAGMA data_version` changes exactly when another
//! connection commits; the writer reads it at the start of each batch
//! (inside its write transaction), after each commit, when asked, and every
//! 50 ms when idle, and reads every key again when it changed. The request
//! path cannot use that connection, so `key_by_hash` and `key` read
//! `data_version` on a "watcher": one of a few read-only connections, one
//! preferred per thread, each under its own mutex (taken by one request at
//! a time, or briefly by the writer). A request looks only when no request
//! has looked for [`LOOK_EVERY`] (2 ms): the look is a read transaction,
//! and under load one every 2 ms is enough. A watcher's version changes on any
//! other connection's commit, the writer's included, so after each commit
//! the writer re-bases every watcher (reads its version as the new normal)
//! and only then reads its own connection's version, which catches a
//! commit of another process hidden by the re-basing. When a watcher sees
//! a change, the request asks the writer to catch up and waits for it
//! (so, in practice, only after another process committed), except while
//! the writer is between a commit and the end of re-basing (`committing` is
//! odd, set before the commit starts), when the change may be the writer's
//! own and the writer's own look follows anyway. The writer answers a
//! batch as soon as its changes are in the cache, and re-bases after that.
//!
//! So a change committed by another process is seen by every
//! authenticated request that starts 2 ms or more after it (and `reserve`,
//! which follows authentication, uses the balance seen then), with one
//! narrow race: a request whose
//! watcher looks while the writer is between a commit and the end of
//! re-basing the watchers does not wait for the catch-up the writer then
//! does, and may use the keys as they were before that other process's
//! commit. That is the bound on staleness: the end of the writer's batch in
//! flight, which re-bases a handful of watchers and reads the keys again.
//! A commit that no request looks for (`reserve` alone) is caught by the
//! writer within 50 ms when idle, at its next batch otherwise.
//!
//! Reads other than those (listings, usage, totals) use a small pool of
//! read connections on the blocking thread pool; WAL readers never block
//! the writer nor wait for it. The writer commits without checkpointing
//! (`wal_autocheckpoint=0`), so that a commit is only the WAL write; every
//! 200 batches it asks a checkpoint thread, with a connection of its own,
//! to checkpoint the WAL (a passive checkpoint, which runs alongside the
//! writer's commits), so that no batch waits for a checkpoint's `fsync`.
//!
//! # Schema
//!
//! SQL files in `migrations/sqlite/NNNN_name.sql`, embedded in the binary and
//! applied in order at open; the schema version is `PRAGMA user_version`.

use super::*;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
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
/// The WAL is checkpointed after this many committed batches.
pub(crate) const CHECKPOINT_EVERY: u32 = 200;

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
    writer: mpsc::Sender<Message>,
    readers: Arc<Readers>,
    cache: Arc<Cache>,
}

/// The keys as committed, each with its open reservations, and the
/// watchers that notice commits of other processes (see the module doc).
struct Cache {
    keys: RwLock<Keys>,
    watchers: Vec<Mutex<Watcher>>,
    /// Odd while the writer is between the start of a commit and the end
    /// of re-basing the watchers on it.
    committing: AtomicU64,
    /// When a request last looked, in microseconds since `opened`.
    looked: AtomicU64,
    opened: Instant,
}

/// A request looks for other processes' commits only when no request has
/// looked for this long: the look is a read transaction (shared-memory
/// locks, system calls), the dearest part of a request's path through the
/// cache, and under load one look every so often is enough.
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(2);

/// The map from keys to their entries. Only the writer thread changes it
/// (new keys); the request path takes it in shared mode to find an entry.
#[derive(Default)]
struct Keys {
    by_id: HashMap<KeyId, Arc<KeyEntry>>,
    by_hash: HashMap<String, Arc<KeyEntry>>,
}

/// One key's state, under its own lock.
type KeyEntry = Mutex<KeyState>;

struct KeyState {
    record: KeyRecord,
    /// Its open reservations.
    reserved: Credits,
}

/// A connection that only reads `PRAGMA data_version`.
struct Watcher {
    conn: Connection,
    /// `conn`'s data version when the cache last matched the file as far
    /// as this watcher can tell.
    seen: i64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every holder leaves the state consistent before anything can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn data_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))?)
}

/// A watcher per worker thread or so, at least two.
fn watcher_count() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get().clamp(2, 8))
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's preferred watcher (modulo their number).
    static SLOT: usize = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
}

impl Cache {
    fn open(path: &Path, writer: &Connection) -> Result<Cache, StoreError> {
        let mut watchers = Vec::new();
        for _ in 0..watcher_count() {
            let conn = open_reader(path)?;
            let seen = data_version(&conn)?;
            watchers.push(Mutex::new(Watcher { conn, seen }));
        }
        let cache = Cache {
            keys: RwLock::new(Keys::default()),
            watchers,
            committing: AtomicU64::new(0),
            looked: AtomicU64::new(0),
            opened: Instant::now(),
        };
        cache.load(writer)?;
        Ok(cache)
    }

    fn entry(&self, id: KeyId) -> Option<Arc<KeyEntry>> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.by_id.get(&id).cloned()
    }

    fn entry_by_hash(&self, hash: &str) -> Option<Arc<KeyEntry>> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.by_hash.get(hash).cloned()
    }

    /// Reads every key again on `conn` (the writer's) and updates the
    /// entries, keeping their reservations. Writer thread only.
    fn load(&self, conn: &Connection) -> Result<(), StoreError> {
        let mut stmt = conn.prepare_cached(concat!(
            "SELECT ",
            key_columns!(),
            ", key_hash FROM api_keys"
        ))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((key_from_row(row)?, row.get::<_, String>(12)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        for (record, hash) in rows {
            self.insert(Some(hash), record);
        }
        Ok(())
    }

    /// Adds or replaces a key. Writer thread only.
    fn insert(&self, hash: Option<String>, record: KeyRecord) {
        if let Some(entry) = self.entry(record.id) {
            lock(&entry).record = record;
            return;
        }
        let Some(hash) = hash else {
            // Created by another process since the last load: the next
            // load brings it with its hash.
            return;
        };
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let id = record.id;
        let entry = Arc::new(Mutex::new(KeyState {
            record,
            reserved: Credits::ZERO,
        }));
        keys.by_hash.insert(hash, entry.clone());
        keys.by_id.insert(id, entry);
    }

    /// Applies a committed change. Returns false when its key is unknown
    /// (created by another process since the last load). Writer thread
    /// only.
    fn apply(&self, change: Change) -> bool {
        match change {
            Change::Key(hash, record) => {
                let known = hash.is_some() || self.entry(record.id).is_some();
                self.insert(hash, record);
                known
            }
            Change::Balance(id, balance) => match self.entry(id) {
                Some(entry) => {
                    lock(&entry).record.balance = balance;
                    true
                }
                None => false,
            },
            Change::Settled(id, balance, released) => match self.entry(id) {
                Some(entry) => {
                    // Both at once, under the key's lock: a reservation
                    // sees the settlement whole or not at all.
                    let mut state = lock(&entry);
                    state.record.balance = balance;
                    state.reserved -= released;
                    true
                }
                None => false,
            },
        }
    }

    /// Whether something committed since the cache last matched the file,
    /// as far as the watcher of this thread can tell: `None` when not, else
    /// the watcher and the data version it read.
    fn look(&self) -> Result<Option<(usize, i64)>, StoreError> {
        let now = u64::try_from(self.opened.elapsed().as_micros()).unwrap_or(u64::MAX);
        let last = self.looked.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < LOOK_EVERY.as_micros() as u64 {
            return Ok(None);
        }
        self.looked.store(now.max(1), Ordering::Relaxed);
        let n = self.watchers.len();
        let start = SLOT.with(|s| *s) % n;
        // This thread's watcher, or any other that is free, or wait for it.
        let (i, watcher) = (0..n)
            .map(|k| (start + k) % n)
            .find_map(|i| self.watchers[i].try_lock().ok().map(|w| (i, w)))
            .unwrap_or_else(|| (start, lock(&self.watchers[start])));
        let version = data_version(&watcher.conn)?;
        if version == watcher.seen {
            return Ok(None);
        }
        if self.committing.load(Ordering::SeqCst) % 2 == 1 {
            // The writer is committing: it re-bases the watchers on its
            // commit and then looks for other writers' commits itself.
            return Ok(None);
        }
        Ok(Some((i, version)))
    }

    /// Notes that the cache caught up with what watcher `i` read.
    fn caught_up(&self, i: usize, version: i64) {
        lock(&self.watchers[i]).seen = version;
    }

    /// Re-bases every watcher on the current state of the file. Writer
    /// thread only, after its commit and before it looks for other
    /// writers' commits.
    fn rebase(&self) {
        for watcher in &self.watchers {
            let mut watcher = lock(watcher);
            if let Ok(version) = data_version(&watcher.conn) {
                watcher.seen = version;
            }
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
                    let cache = Arc::new(Cache::open(&thread_path, &conn)?);
                    Ok((conn, version, cache))
                });
                let (conn, version, cache) = match opened {
                    Ok(opened) => opened,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let checkpoint = match spawn_checkpointer(&thread_path) {
                    Ok(checkpoint) => checkpoint,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(cache.clone())).is_err() {
                    return;
                }
                Writer {
                    conn,
                    cache,
                    changes: Vec::new(),
                    data_version: version,
                    reload: false,
                    uncheckpointed: 0,
                    checkpoint,
                }
                .run(rx);
            })
            .map_err(|e| backend(format!("cannot start the sqlite writer thread: {e}")))?;
        let cache = ready_rx
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
            cache,
        })
    }

    /// Sends the writer thread a message and waits for its answer.
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Message) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(make(tx))
            .map_err(|_| backend("the sqlite writer thread stopped"))?;
        rx.await
            .map_err(|_| backend("the sqlite writer thread stopped"))?
    }

    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        self.ask(|tx| Message::Write(make(tx))).await
    }

    /// Brings the cache up to date with commits of other processes, if
    /// this thread's watcher saw any: the writer thread reads the keys
    /// again (it alone changes the cache, so its changes stay in order).
    async fn fresh(&self) -> Result<(), StoreError> {
        let Some((watcher, version)) = self.cache.look()? else {
            return Ok(());
        };
        self.ask(Message::CatchUp).await?;
        self.cache.caught_up(watcher, version);
        Ok(())
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

/// A connection to the file besides the writer's, configured like it.
fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| backend(format!("cannot open {}: {e}", path.display())))?;
    configure(&conn)?;
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = open_connection(path)?;
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

/// What the writer thread is asked to do.
enum Message {
    Write(Command),
    /// Look for other processes' commits and read the keys again if any.
    CatchUp(Reply<()>),
}

/// A change to the cache, applied when its transaction commits.
enum Change {
    /// A key created (with its hash) or changed.
    Key(Option<String>, KeyRecord),
    /// A key's new balance.
    Balance(KeyId, Credits),
    /// A settlement: the key's new balance, and the reservation released.
    Settled(KeyId, Credits, Credits),
}

/// How often an idle writer looks for commits of other processes.
const REFRESH_EVERY: Duration = Duration::from_millis(50);

struct Writer {
    conn: Connection,
    cache: Arc<Cache>,
    /// The changes of the current batch, applied to the cache at its commit.
    changes: Vec<Change>,
    /// This connection's `PRAGMA data_version`, which changes only when
    /// another connection commits.
    data_version: i64,
    /// The cache must be read again from the file.
    reload: bool,
    /// Batches committed since the last checkpoint.
    uncheckpointed: u32,
    /// Asks the checkpoint thread for a checkpoint.
    checkpoint: mpsc::SyncSender<()>,
}

/// Starts the thread that checkpoints the WAL whenever it is asked, on a
/// connection of its own; it ends when the writer drops its sender.
fn spawn_checkpointer(path: &Path) -> Result<mpsc::SyncSender<()>, StoreError> {
    let conn = open_connection(path)?;
    let (tx, rx) = mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("tollgate-sqlite-checkpoint".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Best effort: readers may hold part of the WAL; a later
                // checkpoint gets the rest.
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        })
        .map_err(|e| backend(format!("cannot start the sqlite checkpoint thread: {e}")))?;
    Ok(tx)
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Message>) {
        let mut batch = Vec::new();
        let mut waiting = Vec::new();
        let mut results = Vec::new();
        loop {
            let first = match rx.recv_timeout(REFRESH_EVERY) {
                Ok(message) => message,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.catch_up();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut next = Some(first);
            while let Some(message) = next {
                match message {
                    Message::Write(cmd) => batch.push(cmd),
                    Message::CatchUp(tx) => waiting.push(tx),
                }
                next = if batch.len() < MAX_BATCH {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            // A batch catches up after its commit; so must a request that
            // came without one.
            let caught_up = if batch.is_empty() {
                self.catch_up().map_err(|e| e.to_string())
            } else {
                let error = self.run_batch(&batch, &mut results);
                // Answered as soon as the cache shows the batch; what
                // follows does not change what they are answered.
                for (cmd, result) in batch.drain(..).zip(results.drain(..)) {
                    cmd.answer(result, error.as_deref());
                }
                self.after_commit();
                if self.reload {
                    Err("cannot read the keys again".to_string())
                } else {
                    Ok(())
                }
            };
            for tx in waiting.drain(..) {
                let _ = tx.send(caught_up.clone().map_err(backend));
            }
            if self.uncheckpointed >= CHECKPOINT_EVERY {
                self.uncheckpointed = 0;
                // Full when a checkpoint is still running: that one will do.
                let _ = self.checkpoint.try_send(());
            }
        }
    }

    /// Notes commits of other connections since the last look.
    fn look_for_other_writers(&mut self) {
        match data_version(&self.conn) {
            Ok(version) if version == self.data_version => {}
            Ok(version) => {
                self.data_version = version;
                self.reload = true;
            }
            // Cannot tell: read the keys again.
            Err(_) => self.reload = true,
        }
    }

    /// Reads the keys again if the cache must be.
    fn reload_if_needed(&mut self) -> Result<(), StoreError> {
        if self.reload {
            self.cache.load(&self.conn)?;
            self.reload = false;
        }
        Ok(())
    }

    /// Brings the cache up to date with commits of other connections.
    fn catch_up(&mut self) -> Result<(), StoreError> {
        self.look_for_other_writers();
        self.reload_if_needed()
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
        // Commit with no lock of the cache held. Until its changes are
        // applied below, the cache shows the state before the batch (see the
        // module doc); the watchers see the commit, and are told to ignore
        // it (odd `committing`) until they are re-based on it
        // (`after_commit`, once the batch has been answered).
        self.cache.committing.fetch_add(1, Ordering::SeqCst);
        let committed = self.exec("COMMIT");
        if committed.is_ok() {
            for change in self.changes.drain(..) {
                if !self.cache.apply(change) {
                    self.reload = true;
                }
            }
            // A change the cache could not take (grants, a key created
            // elsewhere) is read from the file before the batch is answered.
            let _ = self.reload_if_needed();
        } else {
            let _ = self.exec("ROLLBACK");
        }
        self.changes.clear();
        self.uncheckpointed += 1;
        match committed {
            Ok(()) => None,
            Err(e) => Some(format!("sqlite commit failed: {e}")),
        }
    }

    /// Ends a commit that `run_batch` started: re-bases the watchers on it
    /// and then looks for other processes' commits.
    fn after_commit(&mut self) {
        // Odd only if the batch got as far as its commit.
        if self.cache.committing.load(Ordering::SeqCst) % 2 == 1 {
            self.cache.rebase();
            self.cache.committing.fetch_add(1, Ordering::SeqCst);
        }
        // A commit of another process since ours is hidden from the
        // watchers by the re-basing; this connection sees it.
        let _ = self.catch_up();
    }

    /// Starts the batch's transaction and catches up with other writers'
    /// commits (none can commit until ours ends).
    fn begin(&mut self) -> Result<(), String> {
        if !self.conn.is_autocommit() {
            // A transaction left open by a failed commit and rollback.
            let _ = self.exec("ROLLBACK");
        }
        self.exec("BEGIN IMMEDIATE")
            .map_err(|e| format!("cannot start an sqlite transaction: {e}"))?;
        // On failure, `reload` stays set: tried again after the commit.
        let _ = self.catch_up();
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
                self.changes
                    .push(Change::Settled(usage.key_id, balance, *reserved));
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
                let record = create_key(conn, &grant.new_key(), now_millis())?;
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
        self.fresh().await?;
        Ok(self
            .cache
            .entry_by_hash(&hash.0)
            .map(|entry| lock(&entry).record.clone()))
    }

    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.fresh().await?;
        Ok(self
            .cache
            .entry(id)
            .map(|entry| lock(&entry).record.clone()))
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
        // cache up to date. Only this key's lock is taken.
        let entry = self.cache.entry(id).ok_or(StoreError::NoSuchKey(id))?;
        let mut state = lock(&entry);
        let balance = state.record.balance;
        let available = balance - state.reserved;
        if !balance.is_positive() || available < amount {
            return Err(StoreError::InsufficientCredits { available });
        }
        state.reserved += amount;
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
