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
//! All writes go through one writer: a connection behind a queue
//! ([`WriteQueue`]). Whoever carries out the queue takes everything queued,
//! applies it in ONE transaction (group commit), commits, answers every
//! command, and goes on while more is queued; tasks that queue meanwhile
//! just wait for their answer. Who that is depends on the load. A task that
//! queues a write when the writer has been idle for [`INLINE_AFTER_IDLE`],
//! while messages arrive at a moderate rate (their average gap at least
//! [`INLINE_BELOW_GAP`]), carries it out itself, at once and on its own
//! thread: at such a rate a settlement costs no hand-off to another thread
//! and back (inside `block_in_place`, so that the worker's other tasks go
//! on elsewhere should the file system stall the commit's write).
//! Otherwise the turn goes to the writer thread, and the settlements that
//! arrive while it wakes, and while it commits, share its next
//! transaction. It takes a batch as soon as it runs: waiting for more to
//! arrive (as PostgreSQL's `commit_delay`) made larger batches but held
//! every waiting request for the delay, and cost a sixth of the throughput
//! at saturation (see "What was tried" in BENCHMARKS.md).
//! A request's task carries out at most [`INLINE_BATCHES`] batches before
//! it hands the rest to the writer thread, and never waits for a lock: when
//! another connection (the CLI) holds the write lock, the batch goes to the
//! writer thread (`busy_timeout` is 0 while a batch starts on a request's
//! task, 5 s on the writer thread). A batch runs without savepoints; should
//! one of its commands fail, the batch is rolled back and carried out again
//! with each command in its own savepoint, so that one failing command does
//! not undo the others. While a batch runs without savepoints, the
//! settlements of one key write its row once: their charges are summed
//! and subtracted before any other command and before the commit (each
//! still writes its own ledger row).
//!
//! The keys (with their balances) and the open reservations are kept in
//! process memory: the request path (`key_by_hash`, `key` and `reserve`)
//! reads them there and runs no SQL. Each key has its own entry, under its
//! own mutex, holding its record and its open reservations; the map from
//! ids and hashes to entries is under a read-write lock that only the
//! writer takes for writing (when a key appears), the request path taking
//! it in shared mode just long enough to find an entry. A reservation locks
//! only its key's entry.
//!
//! Only the writer changes the entries. It commits a batch with no lock of
//! the cache held, and then applies the batch's changes, each under its
//! key's lock: a settlement sets the key's new balance and releases its
//! reservation at once. So a reservation sees, for its key, either the
//! state before a settlement (old balance, reservation held) or after it
//! (new balance, reservation released), never a mix; between the commit
//! and the update it sees the state before, which counts the settlement's
//! reservation as spent, so it is not admitted more than before the
//! settlement. Admin writes (top-ups, adjustments, revocations, new keys)
//! reach the entries the same way, after their commit and before their
//! caller is answered. Hence one gateway serves a given SQLite file: a
//! second gateway on the same file would not see the first one's
//! reservations (use PostgreSQL for several). A restart starts with no
//! reservations, so [`Store::release_stale_reservations`] has nothing to
//! do.
//!
//! Other processes (the `tollgate keys ...` CLI) may open the same file at
//! the same time: balance changes are relative (`balance = balance - ?`),
//! so they compose, and each side waits for the other's write lock (above).
//! Their commits reach the cache as follows. The writer's connection's
//! `PRAGMA data_version` changes exactly when another connection commits;
//! the writer reads it at the start of each batch (inside its write
//! transaction, where no other connection can commit), when asked, and
//! every 50 ms when idle, and reads every key again when
//! it changed. After each look it notes when the look began. `key_by_hash`
//! and `key` ask for a look (queued like a write, and answered after it)
//! unless a look that began less than [`LOOK_EVERY`] (2 ms) ago has
//! finished. So a change committed by another process is seen by every
//! authenticated request that starts 2 ms or more after the commit (and
//! `reserve`, which follows authentication, uses the balance seen then);
//! under load, the batches' own looks keep requests from asking at all. A
//! commit that no request looks for (`reserve` alone) is caught within
//! 50 ms.
//!
//! Reads other than those (listings, usage, totals) use a small pool of
//! read connections on the blocking thread pool; WAL readers never block
//! the writer nor wait for it. The writer commits without checkpointing
//! (`wal_autocheckpoint=0`), so that a commit is only the WAL write; every
//! 200 batches it asks a checkpoint thread, with a connection of its own,
//! to checkpoint the WAL (a passive checkpoint, which runs alongside the
//! writer's commits), so that no batch waits for the bulk of a checkpoint's
//! copying and `fsync`s. Such a checkpoint copies the frames that were in
//! the WAL when it began; SQLite starts the WAL over (writes from its
//! beginning again) only once every frame has been copied, which under
//! sustained load never happened by itself: the writer commits while the
//! checkpoint runs. So when the checkpoint thread is done, the writer,
//! between two batches and on the writer thread, checkpoints the few frames
//! committed meanwhile, and its next commit starts the WAL over. The WAL
//! file thus stays at a few MiB (`journal_size_limit` cuts it back to
//! [`WAL_SIZE_LIMIT`] when it was left larger). A reader using the WAL at
//! that moment (another connection's, or the pool's) keeps it from being
//! started over; should readers do so every time, the writer waits for
//! them, briefly, once the WAL is [`RESTART_AT_FRAMES`] long (a reader
//! that outlasts the wait is waited for again when the WAL has doubled).
//!
//! # Schema
//!
//! SQL files in `migrations/sqlite/NNNN_name.sql`, embedded in the binary and
//! applied in order at open; the schema version is `PRAGMA user_version`.

use super::*;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The schema, in order; entry `i` brings the file to version `i + 1`.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        "0002_ledger_without_autoincrement",
        include_str!("../../migrations/sqlite/0002_ledger_without_autoincrement.sql"),
    ),
    (
        "0003_usage_totals_on_keys",
        include_str!("../../migrations/sqlite/0003_usage_totals_on_keys.sql"),
    ),
];

/// How long a connection waits for another one's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The writer's busy timeout: [`BUSY_TIMEOUT`] where it may wait for other
/// connections' locks, none where it must not.
fn lock_wait(waits: bool) -> Duration {
    if waits {
        BUSY_TIMEOUT
    } else {
        Duration::ZERO
    }
}
/// Reads running at once, each on its own connection (kept open between
/// reads).
const READERS: usize = 8;
/// At most this many queued commands share one transaction.
const MAX_BATCH: usize = 512;
/// The WAL is checkpointed after this many committed batches.
pub(crate) const CHECKPOINT_EVERY: u32 = 200;
/// When the WAL starts over, its file is cut back to this size if larger
/// (`PRAGMA journal_size_limit`).
const WAL_SIZE_LIMIT: i64 = 16 << 20;
/// A WAL this long (in frames of a 4 KiB page: 16 MiB, three to four times
/// its usual length at its longest) that readers kept from starting over
/// is started over by the writer, which waits for them ([`RESTART_WAIT`]);
/// when they outlast the wait, again only once the WAL has doubled.
const RESTART_AT_FRAMES: i64 = 4096;
/// How long the writer waits for readers to move off the WAL.
const RESTART_WAIT: Duration = Duration::from_millis(200);

pub struct SqliteStore {
    writer: Arc<WriteQueue>,
    readers: Arc<Readers>,
    cache: Arc<Cache>,
}

/// The keys as committed, each with its open reservations (see the module
/// doc).
struct Cache {
    keys: RwLock<Keys>,
    /// When the last finished look for other processes' commits began, in
    /// microseconds since `opened` (0: none yet).
    looked: AtomicU64,
    opened: Instant,
}

/// A request asks the writer to look for other processes' commits unless a
/// look that began less than this long ago has finished: a request looks
/// at commits that are at least this old, and under load the batches' own
/// looks keep requests from asking at all.
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(2);

/// The map from keys to their entries. Only the writer changes it
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

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))
}

impl Cache {
    fn open(writer: &Connection) -> Result<Cache, StoreError> {
        let cache = Cache {
            keys: RwLock::new(Keys::default()),
            looked: AtomicU64::new(0),
            opened: Instant::now(),
        };
        cache.load(writer)?;
        Ok(cache)
    }

    /// Microseconds since the cache was opened (at least 1).
    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Gives back a reservation that no settlement will release.
    fn release(&self, id: KeyId, amount: Credits) {
        if let Some(entry) = self.entry(id) {
            lock(&entry).reserved -= amount;
        }
    }

    /// Whether a request must ask for a look (see [`LOOK_EVERY`]).
    fn due_for_a_look(&self) -> bool {
        let last = self.looked.load(Ordering::Acquire);
        last == 0 || self.now().saturating_sub(last) >= LOOK_EVERY.as_micros() as u64
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
    /// entries, keeping their reservations. The writer only.
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

    /// Adds or replaces a key. The writer only.
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
    /// (created by another process since the last load). The writer
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
            Change::Settled(id, balance, hold) => match self.entry(id) {
                Some(entry) => {
                    // Both at once, under the key's lock: a reservation
                    // sees the settlement whole or not at all.
                    let mut state = lock(&entry);
                    state.record.balance = balance;
                    if let Some(released) = hold.close() {
                        state.reserved -= released;
                    }
                    true
                }
                None => false,
            },
        }
    }
}

impl SqliteStore {
    /// Opens (creating it if missing) the SQLite file at `path` and brings
    /// its schema up to date.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let path = path.to_path_buf();
        let writer_path = path.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<Writer, StoreError> {
            let conn = open_writer(&writer_path)?;
            let checkpointed = Arc::new(AtomicBool::new(false));
            let data_version = data_version(&conn)?;
            let cache = Arc::new(Cache::open(&conn)?);
            Ok(Writer {
                conn,
                cache,
                changes: Vec::new(),
                stale: Vec::new(),
                data_version,
                reload: false,
                uncheckpointed: 0,
                restart_at: RESTART_AT_FRAMES,
                #[cfg(test)]
                restarts: 0,
                checkpoint: spawn_checkpointer(&writer_path, checkpointed.clone())?,
                checkpointed,
                waits: true,
                in_batch: false,
                defer: false,
                owed: Vec::new(),
                #[cfg(test)]
                panic_at: None,
                #[cfg(test)]
                lose_transaction_at: Vec::new(),
                #[cfg(test)]
                losing: None,
            })
        })
        .await
        .map_err(|e| backend(format!("opening the sqlite store failed: {e}")))??;
        let cache = writer.cache.clone();
        let (wake, handed_over) = mpsc::channel();
        let writer = Arc::new(WriteQueue {
            pending: Mutex::new(Pending::default()),
            writer: Mutex::new(writer),
            idle_since: AtomicU64::new(0),
            cache: cache.clone(),
            wake: Mutex::new(wake),
        });
        spawn_writer_thread(Arc::downgrade(&writer), handed_over)?;

        let readers = Arc::new(Readers {
            path,
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(READERS),
        });
        Ok(SqliteStore {
            writer,
            readers,
            cache,
        })
    }

    /// Queues a message for the writer and waits for its answer, carrying
    /// out the queue itself when nobody else is (see the module doc).
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Message) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let next = self.writer.queue(make(tx));
        self.writer.start(next);
        rx.await
            .map_err(|_| backend("the sqlite writer failed before answering"))?
    }

    /// Makes the writer panic at `at` in its next batch.
    #[cfg(test)]
    pub(crate) fn panic_in_next_batch(&self, at: PanicAt) {
        lock(&self.writer.writer).panic_at = Some(at);
    }

    /// How many times the writer has waited for readers to start the WAL
    /// over (`RESTART` checkpoints).
    #[cfg(test)]
    pub(crate) fn restarts(&self) -> u64 {
        lock(&self.writer.writer).restarts
    }

    /// Makes the next batch of more than `at[0]` commands fail at the
    /// commands `at` (counted across its passes) the way an I/O error
    /// does: the statement fails and SQLite rolls the whole transaction
    /// back.
    #[cfg(test)]
    pub(crate) fn lose_transaction_in_next_batch(&self, at: &[usize]) {
        lock(&self.writer.writer).lose_transaction_at = at.to_vec();
    }

    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        self.ask(|tx| Message::Write(make(tx))).await
    }

    /// Brings the cache up to date with commits of other processes at
    /// least [`LOOK_EVERY`] old: the writer reads the keys again if there
    /// were any (it alone changes the cache, so its changes stay in order).
    async fn fresh(&self) -> Result<(), StoreError> {
        if !self.cache.due_for_a_look() {
            return Ok(());
        }
        self.ask(Message::CatchUp).await
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
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
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

// ---------------------------------------------------------------------------
// Writes

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    CreateKey(NewKey, Reply<KeyRecord>),
    UpdateKey(KeyId, KeyPatch, Reply<KeyRecord>),
    RevokeKey(KeyId, Millis, Reply<KeyRecord>),
    Adjust(KeyId, Adjustment, Reply<Credits>),
    SyncGrants(Vec<Grant>, Reply<GrantReport>),
    Settle(Box<UsageRecord>, Arc<Hold>, Reply<Credits>),
}

/// A settlement's reservation, given back in the cache exactly once: by
/// the settlement's commit ([`Cache::apply`]), by [`Writer::answer`] when
/// the settlement failed, or, should neither happen (its batch panicked),
/// when the last handle on it is dropped (the command's, or its change's,
/// which the writer drops at its next batch).
struct Hold {
    cache: Arc<Cache>,
    id: KeyId,
    amount: Credits,
    open: AtomicBool,
}

impl Hold {
    fn new(cache: Arc<Cache>, id: KeyId, amount: Credits) -> Arc<Hold> {
        Arc::new(Hold {
            cache,
            id,
            amount,
            open: AtomicBool::new(true),
        })
    }

    /// The amount to give back, the first time only.
    fn close(&self) -> Option<Credits> {
        self.open
            .swap(false, Ordering::AcqRel)
            .then_some(self.amount)
    }

    /// Gives the reservation back, unless that was done already.
    fn give_back(&self) {
        if let Some(amount) = self.close() {
            self.cache.release(self.id, amount);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// What a command carried out returns.
enum Outcome {
    Key(KeyRecord),
    Credits(Credits),
    Grants(GrantReport),
}

impl Command {
    /// For a settlement: the reservation it is to release.
    fn hold(&self) -> Option<&Hold> {
        match self {
            Command::Settle(_, hold, _) => Some(hold),
            _ => None,
        }
    }

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

/// What the writer is asked to do.
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
    Settled(KeyId, Credits, Arc<Hold>),
}

/// How often the writer looks for commits of other processes when nothing
/// else made it look.
const REFRESH_EVERY: Duration = Duration::from_millis(50);

/// At most this many batches are carried out on a request's task; what is
/// queued after that goes on on the writer thread.
const INLINE_BATCHES: usize = 4;

/// A write is carried out on the task that queued it only when the writer
/// has been idle this long, and messages have been arriving at most at the
/// rate [`INLINE_BELOW_GAP`] sets. Under load, writes go to the writer
/// thread, so that a batch gathers the settlements that arrive while that
/// thread wakes (fewer, larger transactions: measured, carrying out every
/// write on its own task cost ~25% more CPU per request at saturation, and
/// an idle threshold alone, which a busy host's scheduling pauses meet at
/// any rate, ~15% of the throughput at saturation); at a moderate rate, a
/// settlement costs no hand-off to another thread.
const INLINE_AFTER_IDLE: Duration = Duration::from_micros(200);

/// Writes are carried out on the task that queues them only while the
/// average gap between queued messages is at least this long (at most
/// 2,000 messages a second).
const INLINE_BELOW_GAP: Duration = Duration::from_micros(500);

/// A gap between two queued messages counts as at most this long in their
/// average, so that after one long pause a busy queue is seen as busy
/// again within a few messages.
const GAP_CAP: Duration = Duration::from_millis(10);

/// The writer and the messages waiting for it (see the module doc).
struct WriteQueue {
    pending: Mutex<Pending>,
    /// Taken only by whoever set [`Pending::busy`].
    writer: Mutex<Writer>,
    /// When the last turn ended, by the cache's clock ([`Cache::now`]).
    idle_since: AtomicU64,
    cache: Arc<Cache>,
    /// Hands a turn to the writer thread.
    wake: Mutex<mpsc::Sender<()>>,
}

#[derive(Default)]
struct Pending {
    messages: Vec<Message>,
    /// Someone is carrying out the queue: what is queued is theirs to do.
    busy: bool,
    arrivals: Arrivals,
}

/// How fast messages arrive: a moving average of the gaps between them.
#[derive(Default)]
struct Arrivals {
    /// When the last message was queued, by the cache's clock (µs).
    last: u64,
    /// In µs; each gap weighs 1/8, and counts as at most [`GAP_CAP`].
    average_gap: u64,
}

impl Arrivals {
    /// Notes a message queued at `now` (µs).
    fn note(&mut self, now: u64) {
        let gap = now
            .saturating_sub(self.last)
            .min(GAP_CAP.as_micros() as u64);
        self.last = now;
        self.average_gap = (self.average_gap * 7 + gap) / 8;
    }

    /// Faster than a task should carry them out ([`INLINE_BELOW_GAP`]).
    fn busy(&self) -> bool {
        self.average_gap < INLINE_BELOW_GAP.as_micros() as u64
    }
}

/// Who carries out the queue after a message was queued.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Next {
    /// Whoever is carrying it out already.
    Queued,
    /// The caller, on its own task: the writer is idle and the rate low.
    Caller,
    /// The writer thread, to which the caller hands the turn.
    WriterThread,
}

/// Where the queue is being carried out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// On a request's task: never waits for a lock, and hands the queue
    /// over to the writer thread rather than do so.
    RequestTask,
    /// On the writer thread, which may wait.
    MayWait,
}

impl WriteQueue {
    /// Queues `message` and says who carries out the queue now: unless it
    /// was busy already, the caller starts a turn, on its own task or by
    /// handing it to the writer thread ([`WriteQueue::start`]).
    fn queue(&self, message: Message) -> Next {
        let now = self.cache.now();
        let mut pending = lock(&self.pending);
        pending.messages.push(message);
        pending.arrivals.note(now);
        if std::mem::replace(&mut pending.busy, true) {
            return Next::Queued;
        }
        let idle_since = self.idle_since.load(Ordering::Acquire);
        let idle = now.saturating_sub(idle_since) >= INLINE_AFTER_IDLE.as_micros() as u64;
        if idle && !pending.arrivals.busy() {
            Next::Caller
        } else {
            Next::WriterThread
        }
    }

    /// Moves what is queued (at most [`MAX_BATCH`]) into `into`; when
    /// nothing is, ends the caller's turn and returns false.
    fn take(&self, into: &mut Vec<Message>) -> bool {
        let mut pending = lock(&self.pending);
        if pending.messages.is_empty() {
            pending.busy = false;
            self.idle_since.store(self.cache.now(), Ordering::Release);
            return false;
        }
        let n = pending.messages.len().min(MAX_BATCH);
        into.extend(pending.messages.drain(..n));
        true
    }

    /// Carries out the queue until it is empty. Only a caller to whom
    /// [`WriteQueue::queue`] gave the turn (or to whom the queue was handed
    /// over) calls this.
    fn carry_out(self: &Arc<Self>, place: Place) {
        let mut turn = Turn {
            queue: self,
            over: false,
        };
        let mut writer = lock(&self.writer);
        let mut messages = Vec::new();
        let mut batches = 0;
        loop {
            match place {
                // The rest of a checkpoint waits for an `fsync`: the writer
                // thread's to do.
                Place::RequestTask
                    if batches == INLINE_BATCHES
                        || (batches > 0 && writer.checkpoint_to_finish()) =>
                {
                    break
                }
                Place::RequestTask => {}
                Place::MayWait => writer.finish_checkpoint(),
            }
            if !self.take(&mut messages) {
                turn.over = true;
                return;
            }
            if writer
                .carry_out(&mut messages, place == Place::MayWait)
                .is_err()
            {
                // Another connection holds the write lock: these go first
                // once the writer thread has it.
                let mut pending = lock(&self.pending);
                pending.messages.splice(0..0, messages.drain(..));
                break;
            }
            batches += 1;
        }
        drop(writer);
        // Still busy: the rest is the writer thread's.
        turn.over = true;
        self.hand_over();
    }

    /// Does what [`WriteQueue::queue`] said: nothing when the queue was
    /// busy already; else starts the caller's turn, on its own task
    /// ([`Next::Caller`]) or on the writer thread, where the batch gathers
    /// what arrives until that thread runs.
    fn start(self: &Arc<Self>, next: Next) {
        match next {
            Next::Queued => {}
            Next::Caller => {
                // A commit is a write to the WAL, which the file system may
                // stall (a checkpoint's fsync, writeback): on a
                // multi-threaded runtime, this worker's other tasks move to
                // another thread meanwhile, so that a stall holds up this
                // request alone.
                let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
                    runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                });
                if multi_thread {
                    tokio::task::block_in_place(|| self.carry_out(Place::RequestTask));
                } else {
                    self.carry_out(Place::RequestTask);
                }
            }
            Next::WriterThread => self.hand_over(),
        }
    }

    /// Hands the turn to the writer thread (the queue stays busy).
    fn hand_over(self: &Arc<Self>) {
        if lock(&self.wake).send(()).is_err() {
            // Not while the store lives (the writer thread ends only after
            // its drop); should it happen all the same, carry on here.
            self.carry_out(Place::MayWait);
        }
    }
}

/// A turn at carrying out the queue. Should it end by a panic, the next
/// message queued (the writer thread's look at the latest) starts a new
/// one.
struct Turn<'a> {
    queue: &'a WriteQueue,
    over: bool,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !self.over {
            lock(&self.queue.pending).busy = false;
        }
    }
}

/// Starts the writer thread: it carries out the turns handed over to it,
/// and makes the writer look for other processes' commits every
/// [`REFRESH_EVERY`] when it has nothing else to do. It ends with the store.
fn spawn_writer_thread(
    queue: std::sync::Weak<WriteQueue>,
    handed_over: mpsc::Receiver<()>,
) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("tollgate-sqlite-writer".into())
        .spawn(move || loop {
            let turn = handed_over.recv_timeout(REFRESH_EVERY);
            let Some(queue) = queue.upgrade() else {
                return;
            };
            // A panic ends the turn (see `Turn`), never this thread: the
            // messages of the batch that panicked are answered with an
            // error (their senders are dropped), the rest go on.
            let carry_out = || queue.carry_out(Place::MayWait);
            match turn {
                Ok(()) => drop(std::panic::catch_unwind(AssertUnwindSafe(carry_out))),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Nobody waits for this answer.
                    let (tx, _) = oneshot::channel();
                    if queue.queue(Message::CatchUp(tx)) != Next::Queued {
                        drop(std::panic::catch_unwind(AssertUnwindSafe(carry_out)));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        })
        .map_err(|e| backend(format!("cannot start the sqlite writer thread: {e}")))?;
    Ok(())
}

struct Writer {
    conn: Connection,
    cache: Arc<Cache>,
    /// The changes of the current batch, applied to the cache at its commit.
    changes: Vec<Change>,
    /// The changes of a batch that panicked, dropped (giving their
    /// settlements' reservations back) once the cache has read the
    /// balances again.
    stale: Vec<Change>,
    /// This connection's `PRAGMA data_version`, which changes only when
    /// another connection commits.
    data_version: i64,
    /// The cache must be read again from the file.
    reload: bool,
    /// Batches committed since the last checkpoint.
    uncheckpointed: u32,
    /// The WAL's length (frames) at which the writer next waits for readers
    /// to start it over: [`RESTART_AT_FRAMES`], doubled after each wait
    /// that readers outlasted.
    restart_at: i64,
    /// `RESTART` checkpoints begun (tests).
    #[cfg(test)]
    restarts: u64,
    /// Asks the checkpoint thread for a checkpoint.
    checkpoint: mpsc::SyncSender<()>,
    /// Set by the checkpoint thread when it has copied the WAL as it was:
    /// the writer checkpoints what was committed meanwhile
    /// ([`Writer::finish_checkpoint`]).
    checkpointed: Arc<AtomicBool>,
    /// Whether the connection waits for other connections' locks
    /// (`busy_timeout`) or fails at once.
    waits: bool,
    /// A batch is being carried out; still set when the next one starts,
    /// it means that one panicked.
    in_batch: bool,
    /// Settlements may leave their charge owed: set while a batch runs
    /// without savepoints (see [`Writer::owe`]).
    defer: bool,
    /// The charges of this batch's settlements not yet written to their
    /// keys' rows, by key: written once per key, before any other command
    /// and before the commit.
    owed: Vec<(KeyId, Charged)>,
    /// Where the next batch panics (tests of what a panic leaves).
    #[cfg(test)]
    panic_at: Option<PanicAt>,
    /// The next batch of more than `at[0]` commands loses its transaction
    /// at these commands carried out (counted from 0 across both passes),
    /// as SQLite ends a transaction on an I/O error (tests); while the
    /// batch runs, `losing` counts the commands carried out.
    #[cfg(test)]
    lose_transaction_at: Vec<usize>,
    #[cfg(test)]
    losing: Option<(usize, Vec<usize>)>,
}

/// Where a test makes the writer panic.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PanicAt {
    /// Carrying out a settlement, before the commit.
    Settlement,
    /// After the commit, before the cache takes the batch's changes.
    Commit,
}

/// Another connection holds the lock a batch needs.
struct Busy;

/// Why a batch could not start.
struct NotStarted {
    /// Another connection holds a lock it needs: worth trying again where
    /// the writer may wait.
    busy: bool,
    message: String,
}

impl NotStarted {
    fn new(e: rusqlite::Error, what: &str) -> NotStarted {
        let busy = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        NotStarted {
            busy,
            message: format!("{what}: {e}"),
        }
    }
}

/// Starts the thread that checkpoints the WAL whenever it is asked, on a
/// connection of its own, and sets `done` after each; it ends when the
/// writer drops its sender.
fn spawn_checkpointer(
    path: &Path,
    done: Arc<AtomicBool>,
) -> Result<mpsc::SyncSender<()>, StoreError> {
    let conn = open_connection(path)?;
    let (tx, rx) = mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("tollgate-sqlite-checkpoint".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Best effort: readers may hold part of the WAL; the
                // writer's part, or a later checkpoint, gets the rest.
                if checkpoint_in(&conn, "PASSIVE").is_ok() {
                    done.store(true, Ordering::Release);
                }
            }
        })
        .map_err(|e| backend(format!("cannot start the sqlite checkpoint thread: {e}")))?;
    Ok(tx)
}

/// What `PRAGMA wal_checkpoint` reports.
struct Checkpointed {
    /// Another connection's lock kept it from (part of) its work.
    busy: bool,
    /// Frames in the WAL.
    frames: i64,
}

/// A checkpoint: `PASSIVE` copies what it can of the WAL into the file
/// without waiting for anyone; `RESTART` waits (the connection's busy
/// timeout) for the readers and writers it needs out of the way, copies
/// all and starts the WAL over.
fn checkpoint_in(conn: &Connection, mode: &str) -> rusqlite::Result<Checkpointed> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        Ok(Checkpointed {
            busy: row.get::<_, i64>(0)? != 0,
            frames: row.get(1)?,
        })
    })
}

impl Writer {
    /// Whether the checkpoint thread is done, so that the writer has the
    /// rest of the checkpoint to do ([`Writer::finish_checkpoint`]).
    fn checkpoint_to_finish(&self) -> bool {
        self.checkpointed.load(Ordering::Acquire)
    }

    /// After the checkpoint thread's checkpoint, copies the frames that
    /// were committed while it ran. With no commit in between (the writer
    /// is the only one that commits, and this runs between its batches),
    /// every frame is then in the file, and the next commit writes the WAL
    /// from its beginning again instead of appending to it. Only on the
    /// writer thread: the copy ends with an `fsync` of the file.
    ///
    /// A reader that holds the WAL keeps it from being started over; should
    /// readers hold it each time, for [`RESTART_AT_FRAMES`], the writer
    /// waits for them to move off it ([`RESTART_WAIT`] at most) and starts
    /// it over itself (a `RESTART` checkpoint). Readers that never pause
    /// can outlast that wait too, and one that never lets go (a shell left
    /// in a transaction, a backup tool holding a snapshot) always does: it
    /// is tried again once the WAL has doubled, so that such a reader does
    /// not hold up every round of batches; a WAL started over goes back to
    /// the first length.
    fn finish_checkpoint(&mut self) {
        if !self.conn.is_autocommit() || !self.checkpointed.swap(false, Ordering::AcqRel) {
            return;
        }
        let frames = match checkpoint_in(&self.conn, "PASSIVE") {
            Ok(done) => done.frames,
            Err(e) => {
                tracing::warn!(error = %e, "sqlite checkpoint failed");
                return;
            }
        };
        if frames < RESTART_AT_FRAMES {
            self.restart_at = RESTART_AT_FRAMES;
            return;
        }
        if frames < self.restart_at {
            return;
        }
        #[cfg(test)]
        {
            self.restarts += 1;
        }
        // While the writer commits nothing, a reader's next transaction
        // reads the WAL as it is, so the first attempt copies all of it;
        // readers that begin after that read the file alone, and the
        // attempt after the last older reader has ended starts the WAL
        // over. SQLite stops waiting at the first reader it finds busy, so
        // the attempts are repeated, each waiting a little.
        let waits = self.waits;
        let deadline = Instant::now() + RESTART_WAIT;
        if self.conn.busy_timeout(Duration::from_millis(5)).is_ok() {
            loop {
                match checkpoint_in(&self.conn, "RESTART") {
                    Ok(Checkpointed { busy: false, .. }) => {
                        self.restart_at = RESTART_AT_FRAMES;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "sqlite checkpoint failed");
                        break;
                    }
                    Ok(_) if Instant::now() >= deadline => {
                        // A reader that never lets go (a shell left in a
                        // transaction, a backup tool holding a snapshot)
                        // would hold up every batch round: waited for
                        // again only once the WAL has doubled.
                        self.restart_at = frames.saturating_mul(2);
                        tracing::warn!(frames, "sqlite: readers kept the WAL from starting over");
                        break;
                    }
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }
        // As it was: `wait_for_locks` compares with `waits`.
        let _ = self.conn.busy_timeout(lock_wait(waits));
    }

    /// Carries out `messages` (and empties it): the writes in one
    /// transaction, then the catch-ups. Unless `may_wait`, fails with
    /// [`Busy`], `messages` untouched, when another connection holds the
    /// lock that the batch needs to start.
    fn carry_out(&mut self, messages: &mut Vec<Message>, may_wait: bool) -> Result<(), Busy> {
        // The last batch panicked. Its changes never reach the cache
        // (dropping them gives their settlements' reservations back), and
        // the cache is read again from the file, in case it had committed.
        if std::mem::take(&mut self.in_batch) {
            self.owed.clear();
            self.reload = true;
            // Kept until the balances are read again: a reservation that
            // found the batch's reservations given back and its charges
            // not yet in the cache would be admitted against credits
            // already spent.
            self.stale.append(&mut self.changes);
        }
        if !self.conn.is_autocommit() {
            // A transaction left open by a failed commit and rollback, or
            // by a panic in the middle of a batch.
            let _ = self.exec("ROLLBACK");
        }
        if !self.stale.is_empty() {
            let _ = self.reload_if_needed();
        }
        let writes = messages.iter().any(|m| matches!(m, Message::Write(_)));
        self.wait_for_locks(may_wait);
        let started = if writes {
            self.begin()
        } else {
            self.catch_up()
        };
        // Once started, nothing should have to wait; if it must (a batch
        // carried out again after a failing command starts a transaction
        // anew), it may: on a request's task, that is inside
        // `block_in_place` on a multi-threaded runtime.
        self.wait_for_locks(true);
        if matches!(&started, Err(e) if e.busy && !may_wait) {
            return Err(Busy);
        }
        let mut batch = Vec::with_capacity(messages.len());
        let mut waiting = Vec::new();
        for message in messages.drain(..) {
            match message {
                Message::Write(cmd) => batch.push(cmd),
                Message::CatchUp(tx) => waiting.push(tx),
            }
        }
        let caught_up = match started {
            Err(e) => {
                for cmd in batch {
                    self.answer(cmd, Err(backend(e.message.clone())), None);
                }
                if writes && !waiting.is_empty() {
                    // The write transaction did not start; a look needs no
                    // lock, so the catch-ups get one of their own.
                    self.catch_up().map_err(|e| e.message)
                } else {
                    Err(e.message)
                }
            }
            Ok(()) if batch.is_empty() => Ok(()),
            Ok(()) => {
                let mut results = Vec::with_capacity(batch.len());
                self.in_batch = true;
                let error = self.run_batch(&batch, &mut results);
                self.in_batch = false;
                for (cmd, result) in batch.into_iter().zip(results) {
                    self.answer(cmd, result, error.as_deref());
                }
                if self.reload {
                    Err("cannot read the keys again".to_string())
                } else {
                    Ok(())
                }
            }
        };
        for tx in waiting {
            let _ = tx.send(caught_up.clone().map_err(backend));
        }
        if self.uncheckpointed >= CHECKPOINT_EVERY {
            self.uncheckpointed = 0;
            // Full when a checkpoint is still running: that one will do.
            let _ = self.checkpoint.try_send(());
        }
        Ok(())
    }

    /// Answers `cmd` (see [`Command::answer`]). A settlement that failed
    /// charged nothing, and gives its reservation back, so that the key
    /// is not held for a request that will not be settled again.
    fn answer(&self, cmd: Command, result: Result<Outcome, StoreError>, error: Option<&str>) {
        let failed = result.is_err() || error.is_some();
        if let (true, Some(hold)) = (failed, cmd.hold()) {
            // Before the answer: a caller that reserves again at once
            // finds the credits free.
            hold.give_back();
        }
        cmd.answer(result, error);
    }

    /// Makes the connection wait for other connections' locks, or not.
    fn wait_for_locks(&mut self, waits: bool) {
        if self.waits != waits && self.conn.busy_timeout(lock_wait(waits)).is_ok() {
            self.waits = waits;
        }
    }

    /// Reads the keys again if the cache must be.
    fn reload_if_needed(&mut self) -> Result<(), StoreError> {
        if self.reload {
            self.cache.load(&self.conn)?;
            self.reload = false;
            self.stale.clear();
        }
        Ok(())
    }

    /// Brings the cache up to date with commits of other connections, and
    /// notes when this look began once it is done.
    fn catch_up(&mut self) -> Result<(), NotStarted> {
        let began = self.cache.now();
        match data_version(&self.conn) {
            Ok(version) if version == self.data_version => {}
            Ok(version) => {
                self.data_version = version;
                self.reload = true;
            }
            Err(e) if !self.waits => {
                // Tried again where it may wait; until then, `reload` says
                // the cache may be behind.
                self.reload = true;
                return Err(NotStarted::new(e, "cannot read the keys"));
            }
            // Cannot tell: read the keys again.
            Err(_) => self.reload = true,
        }
        // On a request's task, a failed read of the keys (most likely
        // another connection's lock) is tried again where it may wait.
        let waits = self.waits;
        self.reload_if_needed().map_err(|e| NotStarted {
            busy: !waits,
            message: e.to_string(),
        })?;
        self.cache.looked.fetch_max(began, Ordering::AcqRel);
        Ok(())
    }

    /// Carries out `batch` in the transaction that [`Writer::begin`]
    /// opened, commits, and fills `results`, one per command. Returns an
    /// error for all of them when the transaction did not commit.
    fn run_batch(
        &mut self,
        batch: &[Command],
        results: &mut Vec<Result<Outcome, StoreError>>,
    ) -> Option<String> {
        results.clear();
        self.changes.clear();
        self.owed.clear();
        #[cfg(test)]
        if self
            .lose_transaction_at
            .first()
            .is_some_and(|n| batch.len() > *n)
        {
            self.losing = Some((0, std::mem::take(&mut self.lose_transaction_at)));
        }
        // Optimistically without savepoints; when a command fails, the
        // whole batch is rolled back and carried out again, each command in
        // its own savepoint so that its failure undoes only its own changes.
        // Nothing runs after a failure, not even the charges owed: SQLite
        // may have ended the transaction (see `lost`).
        self.defer = true;
        let mut failed = false;
        for cmd in batch {
            let result = self.execute(cmd);
            failed = result.is_err();
            results.push(result);
            if failed {
                break;
            }
        }
        self.defer = false;
        if failed || self.pay_owed().is_err() {
            results.clear();
            self.changes.clear();
            self.owed.clear();
            if !self.conn.is_autocommit() {
                let _ = self.exec("ROLLBACK");
            }
            if let Err(e) = self.begin() {
                results.extend(batch.iter().map(|_| Err(backend(e.message.clone()))));
                return Some(e.message);
            }
            for cmd in batch {
                let result = self.savepoint(cmd);
                if self.conn.is_autocommit() {
                    return self.lost(batch.len(), results);
                }
                results.push(result);
            }
        }
        if self.conn.is_autocommit() {
            return self.lost(batch.len(), results);
        }
        // Commit with no lock of the cache held. Until its changes are
        // applied below, the cache shows the state before the batch (see
        // the module doc).
        let committed = self.exec("COMMIT");
        #[cfg(test)]
        if committed.is_ok() && self.panic_at == Some(PanicAt::Commit) {
            self.panic_at = None;
            panic!("a batch panics after its commit (test)");
        }
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

    /// The batch's transaction is gone: a statement failed with an I/O
    /// error (or, without a statement journal, out of memory or a full
    /// disk), and SQLite rolled the whole transaction back. Nothing of the
    /// batch was written, and nothing more of it may be: each statement
    /// after it would commit on its own (a charge without its ledger row,
    /// then the batch carried out again). Every command fails.
    fn lost(
        &mut self,
        commands: usize,
        results: &mut Vec<Result<Outcome, StoreError>>,
    ) -> Option<String> {
        let message = "sqlite rolled the batch back (an I/O error or out of memory): \
                       nothing of it was written";
        results.clear();
        results.extend((0..commands).map(|_| Err(backend(message))));
        self.changes.clear();
        self.owed.clear();
        // The file is as the batch found it, and so is the cache: read
        // again only if a failed savepoint left it unsure (the looks
        // waiting on this round would otherwise fail).
        let _ = self.reload_if_needed();
        Some(message.to_string())
    }

    /// Starts the batch's transaction and catches up with other writers'
    /// commits (none can commit until ours ends).
    fn begin(&mut self) -> Result<(), NotStarted> {
        // A cached statement: `execute_batch` would prepare it every time.
        self.conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut begin| begin.execute([]))
            .map_err(|e| NotStarted::new(e, "cannot start an sqlite transaction"))?;
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
        #[cfg(test)]
        if let Some((done, at)) = self.losing.as_mut() {
            *done += 1;
            if at.contains(&(*done - 1)) {
                let _ = self.exec("ROLLBACK");
                return Err(backend("disk I/O error (test)"));
            }
        }
        if !matches!(cmd, Command::Settle(..)) {
            // Whatever it does to a key comes after the charges before it.
            self.pay_owed()?;
        }
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
            Command::Settle(usage, hold, _) => {
                #[cfg(test)]
                if self.panic_at == Some(PanicAt::Settlement) {
                    self.panic_at = None;
                    panic!("a settlement panics (test)");
                }
                let before = self.balance_in_batch(usage.key_id);
                let balance = match self.owe(usage, before) {
                    Some(after) => {
                        record_usage(&self.conn, usage)?;
                        after
                    }
                    None => {
                        self.pay_owed()?;
                        settle(&self.conn, usage, before)?
                    }
                };
                self.changes
                    .push(Change::Settled(usage.key_id, balance, hold.clone()));
                Ok(Outcome::Credits(balance))
            }
        }
    }

    /// Key `id`'s balance in the open transaction, as this batch has left
    /// it so far, when the writer can tell without asking SQLite: the
    /// cache holds every committed balance once [`Writer::begin`] has
    /// caught up (no other connection can commit until the batch does),
    /// and the batch's own changes say what it changed since. `None` while
    /// the cache may be behind (`reload`), and for a key it does not hold.
    fn balance_in_batch(&self, id: KeyId) -> Option<Credits> {
        if self.reload {
            return None;
        }
        let changed = self.changes.iter().rev().find_map(|change| match change {
            Change::Settled(key, balance, _) | Change::Balance(key, balance) if *key == id => {
                Some(*balance)
            }
            Change::Key(_, record) if record.id == id => Some(record.balance),
            _ => None,
        });
        changed.or_else(|| {
            self.cache
                .entry(id)
                .map(|entry| lock(&entry).record.balance)
        })
    }

    /// Notes a settlement's charge as owed by its key instead of writing it
    /// to the key's row now, when the batch runs without savepoints and the
    /// key's balance before it is known (see [`Writer::balance_in_batch`]);
    /// returns the balance after it. A busy key's settlements in one batch
    /// then cost one `UPDATE` of its row together instead of one each. The
    /// ledger rows are written one by one, as before.
    fn owe(&mut self, usage: &UsageRecord, before: Option<Credits>) -> Option<Credits> {
        if !self.defer {
            return None;
        }
        let charged = Charged::of(usage);
        // A charge beyond i64 is refused by the RETURNING form (`settle`).
        let after = before?.millis().checked_sub(charged.credits)?;
        match self.owed.iter_mut().find(|(id, _)| *id == usage.key_id) {
            Some((_, owed)) => *owed = owed.plus(&charged)?,
            None => self.owed.push((usage.key_id, charged)),
        }
        Some(Credits::from_millis(after))
    }

    /// Writes what is owed to the keys' rows.
    fn pay_owed(&mut self) -> Result<(), StoreError> {
        for (id, owed) in std::mem::take(&mut self.owed) {
            charge(&self.conn, id, &owed)?;
        }
        Ok(())
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
            } else {
                // What the command wrote may stay in the transaction:
                // the cache no longer knows the file's balances (see
                // `balance_in_batch`) until it reads them again.
                self.reload = true;
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
    let delta = delta_of(&adjustment.change, Credits::from_millis(current))?;
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
                if existing.role != grant.role {
                    conn.prepare_cached("UPDATE api_keys SET role = ?2 WHERE id = ?1")?
                        .execute(params![existing.id, grant.role.as_str()])?;
                    report.role_changed.push(existing.id);
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

/// Writes settlements to their key's row (parameters: [`Charged::params`]).
/// The totals stop at the largest integer, as each ledger count does (a
/// sum beyond it would make SQLite store a float). A macro, so that the
/// `RETURNING` form is a literal too.
macro_rules! charge_sql {
    () => {
        "UPDATE api_keys SET balance = balance - ?2, \
         used_credits = MIN(used_credits + ?2, 9223372036854775807), \
         used_requests = MIN(used_requests + ?3, 9223372036854775807), \
         used_prompt_tokens = MIN(used_prompt_tokens + ?4, 9223372036854775807), \
         used_completion_tokens = MIN(used_completion_tokens + ?5, 9223372036854775807) \
         WHERE id = ?1"
    };
}

/// Charges `usage` to its key and records it; returns the key's new
/// balance. `before` is the key's balance in the open transaction when
/// the writer knows it (see [`Writer::balance_in_batch`]): the `UPDATE` then
/// needs no `RETURNING`, which costs SQLite an ephemeral table and nearly
/// as many instructions as the rest of a settlement (measured with
/// callgrind: ~40k instructions per settlement with it, ~22k without).
fn settle(
    conn: &Connection,
    usage: &UsageRecord,
    before: Option<Credits>,
) -> Result<Credits, StoreError> {
    let (id, charged) = (usage.key_id, Charged::of(usage));
    // A charge beyond i64 (absurd token counts) would turn SQLite's
    // `balance - ?2` into a REAL: the RETURNING form refuses it, as before.
    let known_after = before.and_then(|b| b.millis().checked_sub(charged.credits));
    let balance = match known_after {
        Some(after) => {
            charge(conn, id, &charged)?;
            Credits::from_millis(after)
        }
        None => Credits::from_millis(
            conn.prepare_cached(concat!(charge_sql!(), " RETURNING balance"))?
                .query_row(charged.params(id), |r| r.get(0))
                .optional()?
                .ok_or(StoreError::NoSuchKey(id))?,
        ),
    };
    record_usage(conn, usage)?;
    Ok(balance)
}

/// What settlements write to their key's row: the credits charged, and the
/// usage totals they add to (`GET /me` reads them there).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Charged {
    credits: i64,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
}

impl Charged {
    fn of(usage: &UsageRecord) -> Charged {
        Charged {
            credits: usage.credits.millis(),
            requests: 1,
            prompt_tokens: i64_of(usage.prompt_tokens),
            completion_tokens: i64_of(usage.completion_tokens),
        }
    }

    /// Both together, unless the credits leave i64 (the counts stop at
    /// its largest value, as the row's totals do).
    fn plus(&self, other: &Charged) -> Option<Charged> {
        Some(Charged {
            credits: self.credits.checked_add(other.credits)?,
            requests: self.requests.saturating_add(other.requests),
            prompt_tokens: self.prompt_tokens.saturating_add(other.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_add(other.completion_tokens),
        })
    }

    fn params(&self, id: KeyId) -> [i64; 5] {
        [
            id,
            self.credits,
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
        ]
    }
}

/// Writes `charged` to key `id`'s row.
fn charge(conn: &Connection, id: KeyId, charged: &Charged) -> Result<(), StoreError> {
    let updated = conn
        .prepare_cached(charge_sql!())?
        .execute(charged.params(id))?;
    if updated == 0 {
        return Err(StoreError::NoSuchKey(id));
    }
    Ok(())
}

/// Writes a settlement's ledger row.
fn record_usage(conn: &Connection, usage: &UsageRecord) -> Result<(), StoreError> {
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
    Ok(())
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
        let hold = Hold::new(self.cache.clone(), usage.key_id, reserved);
        self.write(|tx| Command::Settle(Box::new(usage), hold, tx))
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
                "SELECT used_requests, used_prompt_tokens, used_completion_tokens, \
                     used_credits FROM api_keys WHERE id = ?1",
            )?
            .query_row([id], |r| {
                Ok(UsageTotals {
                    requests: u64_column(r, 0)?,
                    prompt_tokens: u64_column(r, 1)?,
                    completion_tokens: u64_column(r, 2)?,
                    credits_spent: Credits::from_millis(r.get(3)?),
                })
            })
            .optional()?
            .unwrap_or_default())
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
        // Reservations live in this process's memory and die with the
        // process: a fresh gateway has none, and one gateway serves a file.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(key_id: KeyId, millis: i64) -> UsageRecord {
        UsageRecord {
            time: 1,
            key_id,
            endpoint: "/api/chat".into(),
            model: None,
            status: 200,
            prompt_tokens: 1,
            completion_tokens: 2,
            credits: Credits::from_millis(millis),
            duration_ms: 3,
        }
    }

    #[test]
    fn a_settlement_charges_the_file_with_or_without_the_balance_known() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("settle.db")).unwrap();
        conn.execute(
            "INSERT INTO api_keys (id, key_hash, name, role, balance, created_at) \
             VALUES (7, 'h', 'k', 'user', 10000, 0)",
            [],
        )
        .unwrap();
        let in_file = || -> i64 {
            conn.query_row("SELECT balance FROM api_keys WHERE id = 7", [], |r| {
                r.get(0)
            })
            .unwrap()
        };
        // Not known: the new balance is read back from the file.
        let left = settle(&conn, &charge(7, 1500), None).unwrap();
        assert_eq!((left, in_file()), (Credits::from_millis(8500), 8500));
        // Known: the same charge in the file, the answer computed from it.
        let left = settle(&conn, &charge(7, 250), Some(left)).unwrap();
        assert_eq!((left, in_file()), (Credits::from_millis(8250), 8250));
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM usage WHERE key_id = 7", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(rows, 2);
        // A charge the balance cannot take (beyond i64): refused as the
        // RETURNING form refuses it, the balance left an integer.
        conn.execute_batch("BEGIN; UPDATE api_keys SET balance = -10 WHERE id = 7")
            .unwrap();
        let refused = settle(&conn, &charge(7, i64::MAX), Some(Credits::from_millis(-10)));
        conn.execute_batch("ROLLBACK").unwrap();
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(in_file(), 8250);
        // A key that is not in the file, either way: nothing recorded.
        for before in [None, Some(Credits::from_millis(5))] {
            assert!(matches!(
                settle(&conn, &charge(8, 1), before),
                Err(StoreError::NoSuchKey(8))
            ));
        }
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 2);
    }

    #[test]
    fn arrivals_tell_a_busy_queue_from_a_quiet_one() {
        let mut arrivals = Arrivals::default();
        // The first message after opening: quiet.
        arrivals.note(1_000_000);
        assert!(!arrivals.busy());
        // 1,000 a second, as the benchmark's fixed rate: quiet.
        let mut now = 1_000_000;
        for _ in 0..100 {
            now += 1_000;
            arrivals.note(now);
        }
        assert!(!arrivals.busy());
        // 10,000 a second: busy within a few dozen messages.
        for _ in 0..30 {
            now += 100;
            arrivals.note(now);
        }
        assert!(arrivals.busy());
        // Messages arriving together (gap 0) stay busy.
        arrivals.note(now);
        assert!(arrivals.busy());
        // One pause of a second: quiet again at once (the gap is capped,
        // and so is its weight).
        now += 1_000_000;
        arrivals.note(now);
        assert!(!arrivals.busy());
        assert!(arrivals.average_gap <= GAP_CAP.as_micros() as u64 / 8 + 100);
        // ... and busy again after a short burst.
        for _ in 0..20 {
            now += 50;
            arrivals.note(now);
        }
        assert!(arrivals.busy());
    }
}
