//! The `sqlite` store: one SQLite file, for a single gateway.
//!
//! # Durability
//!
//! A settlement is made durable by the settlement journal ([`journal`]):
//! one line copied into `<file>-settlements`, which is mapped into memory,
//! on the settling request's own thread, before its caller is answered.
//! Once the copy is done, the settlement survives `kill -9` of the process;
//! the writer applies the journal to the file later (every
//! [`APPLY_EVERY`] while it holds settlements, in one transaction nobody
//! waits for), and whoever opens the file next applies what a crash left
//! in it, each line once (the file records the number of the last line
//! applied, in the transaction that applies it). Every other write is
//! committed before its caller is answered. The file is opened in WAL mode
//! with `synchronous=NORMAL`: a committed transaction survives `kill -9`;
//! neither the WAL nor the journal is `fsync`ed at each write, so a power
//! loss or an operating-system crash may lose what was written last
//! before it (what the operating system had not written back yet; the
//! WAL is made durable at each checkpoint).
//!
//! Reads of what settlements write (the ledger, usage totals, key
//! listings) first have the writer apply the journal, so that they see
//! every settlement answered before them.
//!
//! # One gateway per file
//!
//! A gateway holds a lock on the journal (`<file>-settlements.lock`) for
//! as long as its store is open: a second gateway on the same file is
//! refused at start. The CLI opens the file beside it
//! ([`SqliteStore::open_beside`]): it applies the journal first only when
//! no gateway holds it, and never keeps it.
//!
//! All other writes go through one writer: a connection behind a queue
//! ([`WriteQueue`]). Whoever carries out the queue applies the journal
//! first (an adjustment that sets a balance sets it after the settlements
//! answered before it), then takes everything queued, applies it in ONE
//! transaction (group commit), commits, answers every command, and goes on
//! while more is queued; tasks that queue meanwhile just wait for their
//! answer. Who that is depends on the load. A task that queues a write
//! when the writer has been idle for [`INLINE_AFTER_IDLE`], while messages
//! arrive at a moderate rate (their average gap at least
//! [`INLINE_BELOW_GAP`]), carries it out itself, at once and on its own
//! thread (inside `block_in_place`, so that the worker's other tasks go on
//! elsewhere should the file system stall the commit's write). Otherwise
//! the turn goes to the writer thread, and the writes that arrive while it
//! wakes, and while it commits, share its next transaction.
//! A request's task carries out at most [`INLINE_BATCHES`] batches before
//! it hands the rest to the writer thread, and never waits for a lock: when
//! another connection (the CLI) holds the write lock, the batch goes to the
//! writer thread (`busy_timeout` is 0 while a batch starts on a request's
//! task, 5 s on the writer thread). A batch runs without savepoints; should
//! one of its commands fail, the batch is rolled back and carried out again
//! with each command in its own savepoint, so that one failing command does
//! not undo the others. Settlements the journal holds while another
//! connection keeps the write lock are answered all the same, and applied
//! once it is free; should applying them fail, they are applied again with
//! the next batch.
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
//! A settlement changes its key's entry itself, under the key's lock:
//! it appends its journal line, sets the key's new balance and releases
//! its reservation, all at once. So a reservation sees, for its key,
//! either the state before a settlement (old balance, reservation held)
//! or after it (new balance, reservation released), never a mix. An
//! entry's balance is the file's less the credits of its settlements that
//! the journal holds and the file does not have yet (`unapplied`, which
//! the writer lowers once it has committed them): whenever the writer
//! reads a key from the file again, or commits an admin write to it, the
//! entry takes the file's balance less that. Admin writes (top-ups,
//! adjustments, revocations, new keys) reach the entries after their
//! commit and before their caller is answered. Hence one gateway serves a
//! given SQLite file: a second gateway on the same file would not see the
//! first one's reservations, nor its journal (use PostgreSQL for
//! several). A restart starts with no reservations, so
//! [`Store::release_stale_reservations`] has nothing to do.
//!
//! Other processes (the `tollgate keys ...` CLI) may open the same file at
//! the same time: balance changes are relative (`balance = balance - ?`),
//! so they compose, and each side waits for the other's write lock (above).
//! Their commits reach the cache as follows. The writer's connection's
//! `PRAGMA data_version` changes exactly when another connection commits;
//! the writer reads it at the start of each batch (inside its write
//! transaction, where no other connection can commit), when asked, every
//! [`APPLY_EVERY`] while settlements wait in the journal and every 50 ms
//! otherwise, and reads every key again when it changed. After each look
//! it notes when the look began. `key_by_hash` and `key` ask for a look
//! (queued like a write, and answered after it) unless a look that began
//! less than [`LOOK_EVERY`] (10 ms) ago has finished. So a change
//! committed by another process is seen by every authenticated request
//! that starts 10 ms or more after the commit (and `reserve`, which
//! follows authentication, uses the balance seen then); under load, the
//! writer's own looks keep requests from asking at all. A request with a
//! key the cache does not have asks for a look unless one began less than
//! [`LOOK_FOR_UNKNOWN`] (1 ms) ago, so that a key created by another
//! process works 1 ms after its commit. A commit that no request looks for
//! (`reserve` alone) is caught within 50 ms.
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

mod journal;

use super::*;
use journal::{Entry, Journal};
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
    (
        "0004_settlement_journal",
        include_str!("../../migrations/sqlite/0004_settlement_journal.sql"),
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

/// How long a gateway opening the file waits for another process (the
/// CLI, applying what a crash left in the journal) to let go of its
/// settlement journal before it gives up.
const JOURNAL_WAIT: Duration = Duration::from_secs(5);

/// While settlements wait in the journal, the writer thread wakes this
/// often to apply them and to look for other processes' commits (half of
/// [`LOOK_EVERY`]: under load, requests never have to ask for a look).
/// It applies them before any other write, and before a read that needs
/// them, too. Measured at saturation: waking every millisecond instead
/// cost ~4 µs of CPU per request, a tenth of the throughput.
const APPLY_EVERY: Duration = Duration::from_millis(5);

pub struct SqliteStore {
    writer: Arc<WriteQueue>,
    readers: Arc<Readers>,
    cache: Arc<Cache>,
    /// `None` for a store opened beside a gateway ([`SqliteStore::open_beside`]),
    /// which makes no settlements.
    journal: Option<Arc<Journal>>,
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
/// look that began less than this long ago has finished: a request sees
/// commits that are at least this old, and under load the writer's own
/// looks (every [`APPLY_EVERY`]) keep requests from asking at all.
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(10);

/// A request with a key the gateway does not know asks for a look unless
/// one began less than this long ago: a key created by another process
/// (the CLI) is known to requests that start this long after its commit.
/// Unknown keys cost a look at most this often, however many arrive.
pub(crate) const LOOK_FOR_UNKNOWN: Duration = Duration::from_millis(1);

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
    /// As the file has it, but for the balance, which counts the
    /// settlements in the journal too.
    record: KeyRecord,
    /// Its open reservations.
    reserved: Credits,
    /// The credits of its settlements in the journal that the file does
    /// not have yet, in thousandths.
    unapplied: i64,
}

impl KeyState {
    /// The key's balance `in_file`, less its settlements that the file
    /// does not have yet.
    fn less_unapplied(&self, in_file: Credits) -> Credits {
        Credits::from_millis(in_file.millis().saturating_sub(self.unapplied))
    }

    /// Takes the key as the file has it, less what the journal holds.
    fn set(&mut self, mut record: KeyRecord) {
        record.balance = self.less_unapplied(record.balance);
        self.record = record;
    }
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

    /// Whether a request that wants to see commits at least `age` old must
    /// ask for a look (see [`LOOK_EVERY`]).
    fn due_for_a_look(&self, age: Duration) -> bool {
        let last = self.looked.load(Ordering::Acquire);
        last == 0 || self.now().saturating_sub(last) >= age.as_micros() as u64
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
            lock(&entry).set(record);
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
            unapplied: 0,
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
                    let mut state = lock(&entry);
                    state.record.balance = state.less_unapplied(balance);
                    true
                }
                None => false,
            },
        }
    }

    /// Charges a settlement that is in the journal: the balance, less
    /// `usage.credits`, and the reservation given back, both at once
    /// under the key's lock (a reservation sees the settlement whole or
    /// not at all). The reservation is given back even when the
    /// settlement fails. Returns the new balance, and whether the journal
    /// held no other settlement to apply.
    fn settle(
        &self,
        entry: &KeyEntry,
        journal: &Journal,
        usage: UsageRecord,
        reserved: Credits,
    ) -> Result<(Credits, bool), StoreError> {
        let mut state = lock(entry);
        state.reserved -= reserved;
        let credits = usage.credits.millis();
        // A charge beyond i64 (absurd token counts) is refused.
        let after = state.record.balance.millis().checked_sub(credits);
        let unapplied = state.unapplied.checked_add(credits);
        let (Some(after), Some(unapplied)) = (after, unapplied) else {
            return Err(backend("a charge that no balance can take"));
        };
        let first = journal.append(usage)?;
        state.record.balance = Credits::from_millis(after);
        state.unapplied = unapplied;
        Ok((state.record.balance, first))
    }

    /// Key `id`'s balance `in_file`, less its settlements that the file
    /// does not have yet.
    fn less_unapplied(&self, id: KeyId, in_file: Credits) -> Credits {
        self.entry(id)
            .map_or(in_file, |entry| lock(&entry).less_unapplied(in_file))
    }

    /// Notes that a settlement of `credits` of key `id` in the journal is
    /// in the file now. The writer only.
    fn applied(&self, id: KeyId, credits: Credits) {
        if let Some(entry) = self.entry(id) {
            lock(&entry).unapplied -= credits.millis();
        }
    }
}

impl SqliteStore {
    /// Opens (creating it if missing) the SQLite file at `path` for a
    /// gateway, brings its schema up to date, and applies what its
    /// settlement journal holds. Fails when another process keeps the
    /// journal (another gateway) for longer than [`JOURNAL_WAIT`].
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, true).await
    }

    /// Opens the SQLite file at `path` beside a gateway that may be serving
    /// it (the CLI): when none is, applies what the settlement journal
    /// holds first; makes no settlements.
    pub async fn open_beside(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, false).await
    }

    async fn open_with(path: &Path, gateway: bool) -> Result<SqliteStore, StoreError> {
        let path = path.to_path_buf();
        let writer_path = path.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<Writer, StoreError> {
            let mut conn = open_writer(&writer_path)?;
            let wait = if gateway {
                JOURNAL_WAIT
            } else {
                Duration::ZERO
            };
            let journal = match Journal::open(&writer_path, wait)? {
                Some((journal, found)) => {
                    replay(&mut conn, &journal, &found)?;
                    if gateway {
                        journal.open_for_appending()?;
                    }
                    gateway.then(|| Arc::new(journal))
                }
                None if gateway => {
                    return Err(backend(format!(
                        "another process keeps the settlement journal of {}: a gateway is \
                         serving that file already (one gateway per SQLite file; use \
                         PostgreSQL for several)",
                        writer_path.display()
                    )))
                }
                None => None,
            };
            let checkpointed = Arc::new(AtomicBool::new(false));
            let data_version = data_version(&conn)?;
            let cache = Arc::new(Cache::open(&conn)?);
            Ok(Writer {
                conn,
                cache,
                journal,
                applying: Vec::new(),
                applied_at: Instant::now(),
                changes: Vec::new(),
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
        let journal = writer.journal.clone();
        let (wake, handed_over) = mpsc::channel();
        let writer = Arc::new(WriteQueue {
            pending: Mutex::new(Pending::default()),
            writer: Mutex::new(writer),
            idle_since: AtomicU64::new(0),
            cache: cache.clone(),
            wake: Mutex::new(wake),
            journal: journal.clone(),
            #[cfg(test)]
            handed_over: AtomicU64::new(0),
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
            journal,
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

    /// Whether the panic asked for by [`Self::panic_in_next_batch`] is
    /// still to come.
    #[cfg(test)]
    pub(crate) fn panic_to_come(&self) -> bool {
        lock(&self.writer.writer).panic_at.is_some()
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
    /// least `age` old: the writer reads the keys again if there were any
    /// (it alone changes the cache, so its changes stay in order).
    async fn fresh(&self, age: Duration) -> Result<(), StoreError> {
        if !self.cache.due_for_a_look(age) {
            return Ok(());
        }
        self.ask(Message::CatchUp).await
    }

    /// Makes sure the file has every settlement in the journal (before a
    /// read of balances or of the ledger).
    async fn applied(&self) -> Result<(), StoreError> {
        match &self.journal {
            Some(journal) if journal.unapplied() => self.ask(Message::Apply).await,
            _ => Ok(()),
        }
    }

    /// How many turns were handed to the writer thread (tests).
    #[cfg(test)]
    pub(crate) fn turns_handed_over(&self) -> u64 {
        self.writer.handed_over.load(Ordering::Relaxed)
    }

    /// Makes the journal fail to take settlements (tests).
    #[cfg(test)]
    pub(crate) fn fail_journal_appends(&self, fail: bool) {
        if let Some(journal) = &self.journal {
            journal.fail_appends.store(fail, Ordering::Release);
        }
    }

    /// Runs a read on the blocking thread pool, once the file has every
    /// settlement in the journal.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.applied().await?;
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
            Command::Adjust(_, _, tx) => drop(tx.send(result.and_then(|o| match o {
                Outcome::Credits(c) => Ok(c),
                _ => Err(mismatch()),
            }))),
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
    /// Apply the settlements in the journal to the file.
    Apply(Reply<()>),
}

/// A change to the cache, applied when its transaction commits.
enum Change {
    /// A key created (with its hash) or changed.
    Key(Option<String>, KeyRecord),
    /// A key's new balance in the file.
    Balance(KeyId, Credits),
}

/// How often the writer looks for commits of other processes when nothing
/// else made it look.
const REFRESH_EVERY: Duration = Duration::from_millis(50);

/// At most this many batches are carried out on a request's task; what is
/// queued after that goes on on the writer thread.
const INLINE_BATCHES: usize = 4;

/// A write (or a look) is carried out on the task that queued it only when
/// the writer has been idle this long, and messages have been arriving at
/// most at the rate [`INLINE_BELOW_GAP`] sets. Under load, they go to the
/// writer thread, so that a batch gathers what arrives while that thread
/// wakes (measured when settlements were still queued here, before the
/// journal: carrying out every write on its own task cost ~25% more CPU
/// per request at saturation, and an idle threshold alone, which a busy
/// host's scheduling pauses meet at any rate, ~15% of the throughput); at
/// a moderate rate, a write or a look costs no hand-off to another thread.
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
    /// The settlement journal (the writer's), to tell when it must be
    /// applied.
    journal: Option<Arc<Journal>>,
    /// Turns handed to the writer thread (tests).
    #[cfg(test)]
    handed_over: AtomicU64,
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

    /// Queues a look that nobody waits for (the turn it starts applies the
    /// journal when due too).
    fn queue_look(&self) -> Next {
        let (tx, _) = oneshot::channel();
        self.queue(Message::CatchUp(tx))
    }

    /// Has the writer thread take a turn (a look, and the journal applied
    /// when due) unless a turn is under way, without carrying it out here.
    fn wake_writer_thread(self: &Arc<Self>) {
        if self.queue_look() != Next::Queued {
            self.hand_over();
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
        .spawn(move || {
            let mut wait = REFRESH_EVERY;
            loop {
                let turn = handed_over.recv_timeout(wait);
                let Some(queue) = queue.upgrade() else {
                    return;
                };
                // A panic ends the turn (see `Turn`), never this thread: the
                // messages of the batch that panicked are answered with an
                // error (their senders are dropped), the rest go on.
                let carry_out = || queue.carry_out(Place::MayWait);
                match turn {
                    Ok(()) => {
                        #[cfg(test)]
                        queue.handed_over.fetch_add(1, Ordering::Relaxed);
                        drop(std::panic::catch_unwind(AssertUnwindSafe(carry_out)))
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if queue.queue_look() != Next::Queued {
                            drop(std::panic::catch_unwind(AssertUnwindSafe(carry_out)));
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                // After the turn: a settlement that came while it ran, too
                // late for it and finding the queue busy, woke nobody.
                let unapplied = queue.journal.as_ref().is_some_and(|j| j.unapplied());
                wait = if unapplied {
                    APPLY_EVERY
                } else {
                    REFRESH_EVERY
                };
            }
        })
        .map_err(|e| backend(format!("cannot start the sqlite writer thread: {e}")))?;
    Ok(())
}

struct Writer {
    conn: Connection,
    cache: Arc<Cache>,
    /// The settlement journal, which this writer applies to the file
    /// (`None` beside a gateway).
    journal: Option<Arc<Journal>>,
    /// Settlements taken from the journal and not yet applied (kept
    /// should their transaction fail: they are applied again).
    applying: Vec<Entry>,
    /// When the journal was last applied (or tried).
    applied_at: Instant,
    /// The changes of the current batch, applied to the cache at its commit.
    changes: Vec<Change>,
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
    /// Applying the journal's settlements, before the commit.
    Applying,
    /// After that commit, before the cache notes it.
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
        // The last batch panicked. Its changes never reach the cache, which
        // is read again from the file, in case it had committed; the
        // settlements it was applying are applied again (those it had
        // committed are skipped by number).
        let panicked = std::mem::take(&mut self.in_batch);
        if panicked {
            self.changes.clear();
            self.reload = true;
        }
        if !self.conn.is_autocommit() {
            // A transaction left open by a failed commit and rollback, or
            // by a panic in the middle of a batch.
            let _ = self.exec("ROLLBACK");
        }
        if panicked {
            // Before the cache reads the balances again, which counts what
            // the journal holds as not in the file.
            self.note_committed();
        }
        // The journal first: an adjustment that sets a balance sets it
        // after the settlements made before it.
        // Only a write or a read that needs the journal applied waits for
        // another connection's lock to apply it; otherwise (a look, the
        // writer's own round) it is tried again at the next turn, and the
        // look goes on.
        let needed = messages
            .iter()
            .any(|m| matches!(m, Message::Write(_) | Message::Apply(_)));
        let applied = if needed || self.applied_at.elapsed() >= APPLY_EVERY {
            match self.apply_journal(may_wait && needed) {
                Err(e) if e.busy && !needed => Ok(()),
                Err(e) if e.busy && !may_wait => return Err(Busy),
                applied => applied.map_err(|e| e.message),
            }
        } else {
            Ok(())
        };
        // No write before the settlements answered before it (a set would
        // count them after it): while they cannot be applied, writes fail.
        let refused = match &applied {
            Err(e) if !self.applying.is_empty() => Some(e.clone()),
            _ => None,
        };
        let writes = refused.is_none() && messages.iter().any(|m| matches!(m, Message::Write(_)));
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
                Message::Write(cmd) => match &refused {
                    Some(e) => cmd.answer(Err(backend(e.clone())), None),
                    None => batch.push(cmd),
                },
                Message::CatchUp(tx) => waiting.push(tx),
                Message::Apply(tx) => drop(tx.send(applied.clone().map_err(backend))),
            }
        }
        let caught_up = match started {
            Err(e) => {
                for cmd in batch {
                    cmd.answer(Err(backend(e.message.clone())), None);
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
                for (cmd, mut result) in batch.into_iter().zip(results) {
                    if let (Command::Adjust(id, ..), Ok(Outcome::Credits(balance))) =
                        (&cmd, &mut result)
                    {
                        // The balance as requests see it.
                        *balance = self.cache.less_unapplied(*id, *balance);
                    }
                    cmd.answer(result, error.as_deref());
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

    /// Applies the settlements in the journal to the file, in a
    /// transaction of their own, and notes in the cache that the file has
    /// them. Those of a transaction that fails stay in
    /// [`Writer::applying`], to be applied with the next batch. Unless
    /// `may_wait`, fails (busy) when another connection holds the lock.
    fn apply_journal(&mut self, may_wait: bool) -> Result<(), NotStarted> {
        let Some(journal) = self.journal.clone() else {
            return Ok(());
        };
        self.applied_at = Instant::now();
        journal.take(&mut self.applying);
        if self.applying.is_empty() {
            return Ok(());
        }
        self.wait_for_locks(may_wait);
        let started = self.begin();
        self.wait_for_locks(true);
        started?;
        self.in_batch = true;
        #[cfg(test)]
        if self.panic_at == Some(PanicAt::Applying) {
            self.panic_at = None;
            panic!("applying the journal panics (test)");
        }
        let committed = apply_entries(&self.conn, &self.applying).and_then(|_| self.exec("COMMIT"));
        #[cfg(test)]
        if committed.is_ok() && self.panic_at == Some(PanicAt::Commit) {
            self.panic_at = None;
            panic!("applying the journal panics after its commit (test)");
        }
        self.in_batch = false;
        self.uncheckpointed += 1;
        if let Err(e) = committed {
            if !self.conn.is_autocommit() {
                let _ = self.exec("ROLLBACK");
            }
            tracing::warn!(
                error = %e,
                settlements = self.applying.len(),
                "sqlite: cannot apply the settlement journal to the file yet; trying again"
            );
            return Err(NotStarted {
                busy: false,
                message: format!("cannot apply the settlement journal: {e}"),
            });
        }
        let applied = std::mem::take(&mut self.applying);
        self.note_applied(&journal, applied);
        if let Err(e) = journal.start_over_if_long() {
            tracing::warn!(error = %e, "sqlite: cannot start the settlement journal over");
        }
        Ok(())
    }

    /// Notes that the file has these settlements of the journal.
    fn note_applied(&self, journal: &Journal, entries: Vec<Entry>) {
        journal.applied(entries.len());
        for entry in entries {
            self.cache.applied(entry.usage.key_id, entry.usage.credits);
        }
    }

    /// After a panic in [`Writer::apply_journal`]: notes the settlements
    /// being applied that the file has (their transaction had committed);
    /// the rest are applied again.
    fn note_committed(&mut self) {
        let Some(journal) = self.journal.clone() else {
            return;
        };
        let Ok(applied) = applied_in(&self.conn) else {
            return;
        };
        let (committed, rest) = std::mem::take(&mut self.applying)
            .into_iter()
            .partition(|entry| entry.seq <= applied);
        self.applying = rest;
        self.note_applied(&journal, committed);
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
        // Nothing runs after a failure: SQLite may have ended the
        // transaction (see `lost`).
        let mut failed = false;
        for cmd in batch {
            let result = self.execute(cmd);
            failed = result.is_err();
            results.push(result);
            if failed {
                break;
            }
        }
        if failed {
            results.clear();
            self.changes.clear();
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

/// Applies the journal's settlements `entries` that the file does not have
/// yet (numbered after its `settlement_journal.applied`) in the open
/// transaction: their ledger rows, and their charges written once per key.
/// Notes the last one applied; returns that number (the file's when none
/// was new).
fn apply_entries(conn: &Connection, entries: &[Entry]) -> Result<u64, StoreError> {
    let (applied, new) = not_in_file(conn, entries)?;
    let usages: Vec<&UsageRecord> = new.iter().map(|e| &e.usage).collect();
    record_usages(conn, &usages)?;
    let last = new.iter().map(|e| e.seq).max().unwrap_or(applied);
    let mut owed: HashMap<KeyId, Charged> = HashMap::new();
    for usage in usages {
        let charged = Charged::of(usage);
        let sum = owed.entry(usage.key_id).or_default();
        *sum = match sum.plus(&charged) {
            Some(total) => total,
            // Credits beyond i64 together: each written on its own.
            None => {
                charge(conn, usage.key_id, sum)?;
                charged
            }
        };
    }
    for (id, charged) in &owed {
        charge(conn, *id, charged)?;
    }
    if last != applied {
        conn.prepare_cached("UPDATE settlement_journal SET applied = ?1 WHERE id = 1")?
            .execute([i64_of(last)])?;
    }
    Ok(last)
}

/// The number of the last journal entry the file has, and those of
/// `entries` that come after it (the file does not have them yet).
fn not_in_file<'a>(
    conn: &Connection,
    entries: &'a [Entry],
) -> rusqlite::Result<(u64, Vec<&'a Entry>)> {
    let applied = applied_in(conn)?;
    Ok((
        applied,
        entries.iter().filter(|e| e.seq > applied).collect(),
    ))
}

/// The number of the last journal entry the file has.
fn applied_in(conn: &Connection) -> rusqlite::Result<u64> {
    let applied: i64 = conn
        .prepare_cached("SELECT applied FROM settlement_journal WHERE id = 1")?
        .query_row([], |r| r.get(0))?;
    Ok(u64::try_from(applied).unwrap_or(0))
}

/// Applies the settlements that the journal held at open (a gateway
/// stopped before it had applied them all), then empties it.
fn replay(conn: &mut Connection, journal: &Journal, found: &[Entry]) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if let Some(id) = unknown_key(&tx, found)? {
        return Err(foreign_journal(id, journal.path()));
    }
    let last = apply_entries(&tx, found)?;
    tx.commit()?;
    if !found.is_empty() {
        tracing::info!(
            settlements = found.len(),
            "sqlite: the settlement journal held settlements; those the file did not have are \
             applied"
        );
    }
    journal.applied_up_to(last)
}

/// The first key that a settlement not yet applied charges and the file
/// does not have. Only a journal that belongs to another file (one left
/// beside a database restored from a copy) or a file edited by hand holds
/// one.
fn unknown_key(conn: &Connection, entries: &[Entry]) -> Result<Option<KeyId>, StoreError> {
    let (_, new) = not_in_file(conn, entries)?;
    let mut known = conn.prepare_cached("SELECT 1 FROM api_keys WHERE id = ?1")?;
    for entry in new {
        if !known.exists([entry.usage.key_id])? {
            return Ok(Some(entry.usage.key_id));
        }
    }
    Ok(None)
}

/// The journal at `journal` charges key `id`, which the file lacks: says
/// what to do. (Any other failure to apply it, a full disk, an I/O error,
/// is passed on as it is: the journal is kept for the next open.)
fn foreign_journal(id: KeyId, journal: &Path) -> StoreError {
    backend(format!(
        "the settlement journal {} charges key {id}, which this database does not have; \
         if the database was restored from a copy, the journal belongs to the file it \
         replaced: stop every tollgate on it and move the journal away",
        journal.display()
    ))
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

/// Ledger rows written by one `INSERT` together (a statement per row costs
/// SQLite most of the work again for each).
const ROWS_PER_INSERT: usize = 32;

/// The `INSERT` of `rows` ledger rows.
fn insert_usage_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO usage (time, key_id, endpoint, model, status, prompt_tokens, \
         completion_tokens, credits, duration_ms) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?,?)");
    }
    sql
}

/// Writes settlements' ledger rows, in order: [`ROWS_PER_INSERT`] at a
/// time, the rest one by one.
fn record_usages(conn: &Connection, usages: &[&UsageRecord]) -> Result<(), StoreError> {
    static MANY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static ONE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let (whole, rest) = usages.split_at(usages.len() - usages.len() % ROWS_PER_INSERT);
    let many = MANY.get_or_init(|| insert_usage_sql(ROWS_PER_INSERT));
    insert_usages(conn, many, whole.chunks(ROWS_PER_INSERT))?;
    insert_usages(
        conn,
        ONE.get_or_init(|| insert_usage_sql(1)),
        rest.chunks(1),
    )
}

/// Runs `sql` (an [`insert_usage_sql`]) once for each group of rows.
fn insert_usages<'a>(
    conn: &Connection,
    sql: &str,
    groups: impl Iterator<Item = &'a [&'a UsageRecord]>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    for rows in groups {
        for (row, usage) in rows.iter().enumerate() {
            let at = row * 9;
            stmt.raw_bind_parameter(at + 1, usage.time)?;
            stmt.raw_bind_parameter(at + 2, usage.key_id)?;
            stmt.raw_bind_parameter(at + 3, &usage.endpoint)?;
            stmt.raw_bind_parameter(at + 4, &usage.model)?;
            stmt.raw_bind_parameter(at + 5, usage.status)?;
            stmt.raw_bind_parameter(at + 6, i64_of(usage.prompt_tokens))?;
            stmt.raw_bind_parameter(at + 7, i64_of(usage.completion_tokens))?;
            stmt.raw_bind_parameter(at + 8, usage.credits.millis())?;
            stmt.raw_bind_parameter(at + 9, i64_of(usage.duration_ms))?;
        }
        stmt.raw_execute()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------

#[async_trait]
impl Store for SqliteStore {
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        self.fresh(LOOK_EVERY).await?;
        let found = || {
            self.cache
                .entry_by_hash(&hash.0)
                .map(|entry| lock(&entry).record.clone())
        };
        if let Some(key) = found() {
            return Ok(Some(key));
        }
        // A key the CLI has just created is used at once (a script).
        self.fresh(LOOK_FOR_UNKNOWN).await?;
        Ok(found())
    }

    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.fresh(LOOK_EVERY).await?;
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
        let journal = self
            .journal
            .as_ref()
            .ok_or_else(|| backend("a store opened beside a gateway makes no settlements"))?;
        let id = usage.key_id;
        let entry = match self.cache.entry(id) {
            Some(entry) => entry,
            None => {
                // Created by another process since the last look.
                self.ask(Message::CatchUp).await?;
                self.cache.entry(id).ok_or(StoreError::NoSuchKey(id))?
            }
        };
        let (balance, first) = self.cache.settle(&entry, journal, usage, reserved)?;
        if first {
            // The writer thread may be idle for a while: it applies this
            // one now (under load it is awake every APPLY_EVERY anyway).
            self.writer.wake_writer_thread();
        }
        Ok(balance)
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

    async fn close(&self) {
        // Not needed for durability (the journal is): leaves the file whole
        // and the journal empty for whoever opens them next.
        match (self.applied().await, &self.journal) {
            (Ok(()), Some(journal)) => journal.empty_if_applied(),
            (Ok(()), None) => {}
            (Err(e), _) => {
                tracing::warn!(error = %e, "sqlite: the settlement journal is not all applied")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_journal_the_file_cannot_take_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("restored.db");
        drop(SqliteStore::open(&path).await.unwrap());
        // A settlement of a key this file does not have: the journal of
        // another file.
        {
            let (journal, _) = Journal::open(&path, JOURNAL_WAIT).unwrap().unwrap();
            journal.applied_up_to(0).unwrap();
            journal.open_for_appending().unwrap();
            journal.append(charge(4242, 1000)).unwrap();
        }
        for opened in [
            SqliteStore::open(&path).await.map(drop),
            SqliteStore::open_beside(&path).await.map(drop),
        ] {
            let message = opened.unwrap_err().to_string();
            assert!(
                message.contains("settlement journal") && message.contains("move the journal away"),
                "{message}"
            );
        }
    }

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
    fn journal_entries_are_applied_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("apply.db")).unwrap();
        conn.execute(
            "INSERT INTO api_keys (id, key_hash, name, role, balance, created_at) \
             VALUES (7, 'h', 'k', 'user', 10000, 0), (8, 'i', 'l', 'user', 0, 0)",
            [],
        )
        .unwrap();
        let one = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        let entry = |seq, key_id, millis| Entry {
            seq,
            usage: charge(key_id, millis),
        };
        let entries = [entry(1, 7, 1500), entry(2, 8, 250), entry(3, 7, 250)];
        assert_eq!(apply_entries(&conn, &entries).unwrap(), 3);
        assert_eq!(one("SELECT balance FROM api_keys WHERE id = 7"), 8250);
        assert_eq!(one("SELECT balance FROM api_keys WHERE id = 8"), -250);
        assert_eq!(one("SELECT used_requests FROM api_keys WHERE id = 7"), 2);
        assert_eq!(
            one("SELECT used_completion_tokens FROM api_keys WHERE id = 7"),
            4
        );
        assert_eq!(one("SELECT COUNT(*) FROM usage"), 3);
        // Read again with a new one: only the new one is applied.
        let more = [entry(2, 8, 250), entry(3, 7, 250), entry(4, 7, 1)];
        assert_eq!(apply_entries(&conn, &more).unwrap(), 4);
        assert_eq!(one("SELECT balance FROM api_keys WHERE id = 7"), 8249);
        assert_eq!(one("SELECT COUNT(*) FROM usage"), 4);
        assert_eq!(one("SELECT applied FROM settlement_journal"), 4);
        // Nothing new: nothing written, the file's number answered.
        assert_eq!(apply_entries(&conn, &entries).unwrap(), 4);
        assert_eq!(one("SELECT COUNT(*) FROM usage"), 4);
        // A key the file does not have: an error, nothing recorded.
        conn.execute_batch("BEGIN").unwrap();
        assert!(apply_entries(&conn, &[entry(5, 9, 1)]).is_err());
        conn.execute_batch("ROLLBACK").unwrap();
        assert_eq!(one("SELECT COUNT(*) FROM usage"), 4);
        assert_eq!(one("SELECT applied FROM settlement_journal"), 4);
        // Many at once (whole `INSERT`s of several rows, and the rest one
        // by one): every row, in order, each with its own values.
        let many: Vec<Entry> = (5..5 + 2 * ROWS_PER_INSERT as u64 + 3)
            .map(|seq| entry(seq, 7 + (seq % 2) as i64, seq as i64))
            .collect();
        assert_eq!(apply_entries(&conn, &many).unwrap(), 4 + many.len() as u64);
        let rows: Vec<(i64, i64)> = conn
            .prepare("SELECT key_id, credits FROM usage WHERE id > 4 ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<(i64, i64)> = many
            .iter()
            .map(|e| (e.usage.key_id, e.usage.credits.millis()))
            .collect();
        assert_eq!(rows, expected);
        let spent: i64 = many.iter().map(|e| e.usage.credits.millis()).sum();
        assert_eq!(one("SELECT SUM(balance) FROM api_keys"), 8249 - 250 - spent);
    }

    /// Settlements a gateway journaled and never applied (it was killed)
    /// reach the file when it is opened next, once: by the next gateway, or
    /// by the CLI when no gateway is running; a journal left holding lines
    /// the file has (a crash after their commit) applies nothing twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_the_journal_holds_is_applied_at_open_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replay.db");
        let id = {
            let store = SqliteStore::open(&path).await.unwrap();
            let grant = Grant {
                hash: KeyHash("h".into()),
                name: "k".into(),
                role: Role::User,
                credits: Credits::whole(10),
            };
            store.create_key(grant.new_key()).await.unwrap().id
        };
        // As a gateway journals: numbered after the file's last applied.
        let journaled = |charges: &[i64]| {
            let (journal, _) = Journal::open(&path, JOURNAL_WAIT).unwrap().unwrap();
            let applied: i64 = Connection::open(&path)
                .unwrap()
                .query_row("SELECT applied FROM settlement_journal", [], |r| r.get(0))
                .unwrap();
            journal.applied_up_to(applied as u64).unwrap();
            journal.open_for_appending().unwrap();
            for millis in charges {
                journal.append(charge(id, *millis)).unwrap();
            }
        };
        let in_file = || {
            let conn = Connection::open(&path).unwrap();
            conn.query_row(
                "SELECT balance, used_requests, (SELECT COUNT(*) FROM usage) FROM api_keys",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .unwrap()
        };
        let journal_len =
            || journal::lines_in(&std::fs::read(journal::path_of(&path)).unwrap()).len();
        journaled(&[1500, 250]);
        assert!(journal_len() > 0);
        // The CLI, with no gateway running.
        let cli = SqliteStore::open_beside(&path).await.unwrap();
        assert_eq!(in_file(), (8250, 2, 2));
        assert_eq!(journal_len(), 0);
        // It let go of the journal: a gateway starts beside it at once.
        let gateway = SqliteStore::open(&path).await.unwrap();
        let key = gateway.key(id).await.unwrap().unwrap();
        assert_eq!(key.balance, Credits::from_millis(8250));
        drop((cli, gateway));
        assert_eq!(in_file(), (8250, 2, 2));
        // The next gateway applies what is new.
        journaled(&[1]);
        drop(SqliteStore::open(&path).await.unwrap());
        assert_eq!(in_file(), (8249, 3, 3));
        // Lines the file has already (numbers 1 to 3): skipped.
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE settlement_journal SET applied = 0", [])
            .unwrap();
        journaled(&[1500, 250, 1]);
        conn.execute("UPDATE settlement_journal SET applied = 3", [])
            .unwrap();
        drop(SqliteStore::open(&path).await.unwrap());
        assert_eq!(in_file(), (8249, 3, 3));
        // A gateway that stops cleanly leaves the journal empty.
        let gateway = SqliteStore::open(&path).await.unwrap();
        gateway.settle(charge(id, 9), Credits::ZERO).await.unwrap();
        assert!(journal_len() > 0);
        gateway.close().await;
        assert_eq!(journal_len(), 0);
        assert_eq!(in_file(), (8240, 4, 4));
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
