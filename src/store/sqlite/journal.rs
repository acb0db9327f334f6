//! The settlement journal: where a settlement of the `sqlite` store becomes
//! durable before its caller is answered.
//!
//! A settlement is one line appended to a file next to the database
//! (`<database>-settlements`), on the settling request's own thread. The
//! file is mapped into memory (shared): appending is a copy into the
//! operating system's page cache, without a system call, and once the copy
//! is done the line survives `kill -9` of the process (the operating system
//! writes the pages back to the disk in its own time, as it does the
//! WAL's). The file's blocks are reserved in advance (`posix_fallocate`,
//! [`CAPACITY`] at a time), so that on file systems that allocate in place
//! (ext4, XFS, tmpfs) a full disk is an error when they are reserved,
//! never a fault at a copy; on copy-on-write ones (btrfs, ZFS), which
//! allocate at each write, a full disk can still stop the process at a
//! copy (it is then as after `kill -9`). The rest of the file holds zeros.
//! The store's writer applies the lines to the database later, in large
//! transactions that nobody waits for (see the `sqlite` module), and
//! records in the same transaction the number of the last line applied
//! (`settlement_journal.applied`), so that a line is applied exactly once
//! however often the journal is read again.
//!
//! # Lines
//!
//! `<number> <JSON of the settlement> <CRC-32C of what precedes, 8 hex>\n`.
//! Numbers increase by one from line to line (they go on from the
//! database's `applied` after a restart). Zero bytes between lines are
//! skipped (a page that a power loss kept in an older state). A line whose
//! checksum does not match, or the last bytes of a line whose copy a crash
//! cut short, are skipped when the journal is read (with a warning): only
//! a crash in the middle of a copy (the line was not answered), a power
//! loss or a damaged disk can leave such a line.
//!
//! # Starting over
//!
//! Once the file holds [`START_OVER_AT`] bytes of lines, the writer,
//! right after a transaction that applied every line it had taken, writes
//! the lines not yet taken to a new file (`<journal>.next`, reserved and
//! mapped beforehand) and renames it over the journal: at every moment the
//! journal on disk holds every line not yet applied (and, before the
//! rename, applied ones, which are skipped by number). Should the writer
//! fall behind, the file grows by [`CAPACITY`] at a time.
//!
//! # One process
//!
//! The journal is used by one process at a time: the gateway holds an
//! exclusive lock on `<database>-settlements.lock` as long as its store is
//! open. A second gateway on the same file is refused at start; the CLI
//! reads the journal (and applies what it holds) only when no gateway
//! holds the lock, and lets it go at once.

use super::{backend, lock, StoreError, UsageRecord};
use crate::credits::Credits;
use memmap2::MmapMut;
use serde::{Deserialize, Serialize};
use std::fs::{File, Metadata, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The journal starts over (see the module doc) once it holds this many
/// bytes of lines: its pages that hold lines count in the process's
/// resident memory (RSS) while it is mapped. At saturation, a few times a
/// second.
pub(crate) const START_OVER_AT: usize = 1 << 20;

/// The journal's file is reserved this much at a time.
pub(crate) const CAPACITY: usize = 2 * START_OVER_AT;

/// The checksum of a line: CRC-32C (Castagnoli), as ext4 and iSCSI use.
/// Computed sixteen bytes at a time (slicing-by-16, a 16 KiB table built at
/// compile time): a line of ~150 bytes costs ~4× less than byte by byte,
/// on the thread that serves the request; the checksum is the same.
static CRC: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// A settlement in the journal, with its number.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Entry {
    pub seq: u64,
    pub usage: UsageRecord,
}

/// A settlement as a line holds it.
#[derive(Serialize, Deserialize)]
struct Line<S> {
    key: i64,
    time: i64,
    endpoint: S,
    model: Option<S>,
    status: u16,
    prompt: u64,
    completion: u64,
    credits: i64,
    duration: u64,
}

/// The settlement journal of one database file (see the module doc).
pub(super) struct Journal {
    /// The database's file.
    db: PathBuf,
    path: PathBuf,
    state: Mutex<State>,
    /// Entries appended and not yet applied to the database.
    unapplied: AtomicUsize,
    /// Holds the lock (`<database>-settlements.lock`) while open.
    _lock: File,
    /// Appends fail (tests of a journal that cannot be written).
    #[cfg(test)]
    pub(super) fail_appends: std::sync::atomic::AtomicBool,
}

struct State {
    /// The file, once it is open for appending ([`Journal::open_for_appending`]).
    mapped: Option<Mapped>,
    /// The bytes of lines in it.
    size: usize,
    /// The number of the next entry.
    next: u64,
    /// Entries appended and not yet taken by the writer, oldest first.
    pending: Vec<Entry>,
}

/// A journal file mapped into memory, its blocks reserved.
struct Mapped {
    file: File,
    map: MmapMut,
}

impl Mapped {
    /// Maps `file` (at `path`), made at least `capacity` bytes long first.
    fn new(file: File, path: &Path, capacity: usize) -> Result<Mapped, StoreError> {
        reserve(&file, capacity).map_err(|e| failed("reserve space for", path, e))?;
        Ok(Mapped {
            map: map(&file, path)?,
            file,
        })
    }

    /// Makes room for at least `len` bytes.
    fn grow(&mut self, path: &Path, len: usize) -> Result<(), StoreError> {
        let capacity = len.div_ceil(CAPACITY) * CAPACITY;
        reserve(&self.file, capacity).map_err(|e| failed("reserve space for", path, e))?;
        self.map = map(&self.file, path)?;
        Ok(())
    }
}

/// Maps the whole of `file`, shared: what is copied into the map is in the
/// file.
fn map(file: &File, path: &Path) -> Result<MmapMut, StoreError> {
    // SAFETY: the mapping is undefined behaviour only if the file shrinks
    // or is changed by someone else while it is mapped. The file is this
    // process's alone: the lock file keeps other gateways off it, the CLI
    // reads it only when no gateway holds that lock, and this module only
    // ever extends a mapped file (a file is emptied before it is mapped,
    // and replaced by a rename, never cut back).
    unsafe { MmapMut::map_mut(file) }.map_err(|e| failed("map", path, e))
}

/// Makes `file` at least `len` bytes long, its blocks allocated where the
/// system can (the bytes past its end are zeros).
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn reserve(file: &File, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len_off = libc::off_t::try_from(len)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: a system call on the descriptor that `file` owns, with
        // no pointer passed.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len_off) } {
            0 => return Ok(()),
            libc::EINTR => continue,
            // A file system that cannot allocate ahead (musl does not
            // emulate it): the file is made long enough, its blocks
            // allocated as pages are first written.
            libc::EOPNOTSUPP | libc::ENOSYS => return extend(file, len),
            e => return Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

/// Makes `file` at least `len` bytes long (the bytes past its end are
/// zeros), where the system cannot allocate its blocks ahead.
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn reserve(file: &File, len: usize) -> std::io::Result<()> {
    extend(file, len)
}

/// Makes `file` at least `len` bytes long, never shorter.
fn extend(file: &File, len: usize) -> std::io::Result<()> {
    let len =
        u64::try_from(len).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    if file.metadata()?.len() < len {
        file.set_len(len)?;
    }
    Ok(())
}

/// How [`open_file`] opens a journal file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// Created; it must not be there yet.
    New,
    /// Opened for reading and writing, created when missing.
    Any,
    /// Opened when it is there, never created (`None` when missing).
    Existing,
    /// The lock file: created when missing, else opened for writing or,
    /// where the process may not write it, for reading only (a lock needs
    /// no more: a CLI user who may read the database but not write the
    /// gateway's files can still see whether it runs).
    Lock,
}

/// Flags of every open of a journal file: never through a symbolic link,
/// and never blocking (a FIFO put in its place would hold the open for
/// ever; for a regular file the flag changes nothing).
const OPEN_FLAGS: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK;

/// Opens a journal file (the journal, its `.next`, its lock) of the
/// database whose metadata is `db`, never through a symbolic link and only
/// a regular file with no other name (see [`check_opened`]). One this
/// process creates gets the database's permissions (whatever the umask)
/// and its owner and group where the process may (root may give both; a
/// member of the database's group may give the group), as SQLite does its
/// WAL: a CLI run as root, or by another member of the database's group,
/// beside a gateway run as a service user leaves no file the gateway
/// cannot open.
fn open_file(db: &Metadata, path: &Path, how: Opening) -> Result<Option<File>, StoreError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let mode = db.mode() & 0o666;
    let options = |write: bool| {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(write)
            .custom_flags(OPEN_FLAGS)
            .mode(mode);
        options
    };
    // Created here (exclusively: a symbolic link in its place is "there
    // already"), or else opened as it is: a lock for writing where the
    // process may (some network file systems lock only what is open for
    // writing), else for reading (a lock needs no more).
    let (file, created) = match options(true)
        .create_new(how != Opening::Existing)
        .open(path)
    {
        Ok(file) => (file, how != Opening::Existing),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && how != Opening::New => {
            let opened = match options(true).open(path) {
                Err(e) if how == Opening::Lock && e.raw_os_error() == Some(libc::EACCES) => {
                    options(false).open(path)
                }
                opened => opened,
            };
            (opened.map_err(|e| failed("open", path, e))?, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && how == Opening::Existing => {
            return Ok(None)
        }
        Err(e) => return Err(failed("open", path, e)),
    };
    let found = check_opened(&file, path)?;
    if created {
        // Best effort: the file works as created.
        let _ = file.set_permissions(std::fs::Permissions::from_mode(mode));
        if (found.uid(), found.gid()) != (db.uid(), db.gid())
            && std::os::unix::fs::fchown(&file, Some(db.uid()), Some(db.gid())).is_err()
        {
            // Not root: the group alone, which its members may give.
            let _ = std::os::unix::fs::fchown(&file, None, Some(db.gid()));
        }
    }
    Ok(Some(file))
}

/// Refuses an opened journal file that is not a regular file, or that has
/// another name too (a hard link: whoever made it could have a CLI run as
/// root empty a file they do not own).
fn check_opened(file: &File, path: &Path) -> Result<Metadata, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let found = file.metadata().map_err(|e| failed("open", path, e))?;
    if !found.file_type().is_file() {
        return Err(failed("open", path, "not a regular file"));
    }
    if found.nlink() > 1 {
        return Err(failed("open", path, "it has other names (hard links)"));
    }
    Ok(found)
}

/// [`open_file`] for a file that it creates when missing.
fn open_or_create(db: &Metadata, path: &Path, how: Opening) -> Result<File, StoreError> {
    open_file(db, path, how)?.ok_or_else(|| failed("open", path, "not found"))
}

/// Refuses to go on when `named`, the journal's name after the database
/// path as given, is another file than `journal` (the name after its real
/// path, which tollgate uses) and holds settlements: a tollgate before
/// 8f617bd named the journal after the path as given, and one that stopped
/// with settlements not yet applied left them there.
fn refuse_journal_under_other_name(named: &Path, journal: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(other) = std::fs::symlink_metadata(named) else {
        return Ok(());
    };
    let same = std::fs::symlink_metadata(journal)
        .is_ok_and(|ours| (ours.dev(), ours.ino()) == (other.dev(), other.ino()));
    if same || !other.file_type().is_file() || read(named)?.is_empty() {
        return Ok(());
    }
    Err(backend(format!(
        "{} holds settlements not yet applied, under a name of the database that is not its \
         real path: with no tollgate running, move it to {}",
        named.display(),
        journal.display()
    )))
}

/// The metadata of the database at `db`, which journal files copy.
fn metadata_of(db: &Path) -> Result<Metadata, StoreError> {
    std::fs::metadata(db).map_err(|e| failed("read the metadata of", db, e))
}

/// The journal of the database at `db`.
pub(super) fn path_of(db: &Path) -> PathBuf {
    with_suffix(db, "-settlements")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn failed(what: &str, path: &Path, e: impl std::fmt::Display) -> StoreError {
    backend(format!("cannot {what} {}: {e}", path.display()))
}

impl Journal {
    /// Takes the journal of the database at `db`, waiting up to `wait` for
    /// another process to let go of it, and reads the entries it holds.
    /// `None` when another process still holds it.
    ///
    /// The journal is named after the database's canonical path, as SQLite
    /// names the WAL: two gateways that reach one file by two names (a
    /// symbolic link) take the same lock, the second is refused.
    pub fn open(db: &Path, wait: Duration) -> Result<Option<(Journal, Vec<Entry>)>, StoreError> {
        let given = db;
        let db = std::fs::canonicalize(given).map_err(|e| failed("find", given, e))?;
        refuse_journal_under_other_name(&path_of(given), &path_of(&db))?;
        let db_metadata = metadata_of(&db)?;
        let lock_path = with_suffix(&path_of(&db), ".lock");
        let lock_file = open_or_create(&db_metadata, &lock_path, Opening::Lock)?;
        let deadline = Instant::now() + wait;
        loop {
            match lock_file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(failed("lock", &lock_path, e)),
            }
        }
        let path = path_of(&db);
        let found = read(&path)?;
        let journal = Journal {
            db,
            path,
            state: Mutex::new(State {
                mapped: None,
                size: 0,
                next: 1,
                pending: Vec::new(),
            }),
            unapplied: AtomicUsize::new(0),
            _lock: lock_file,
            #[cfg(test)]
            fail_appends: std::sync::atomic::AtomicBool::new(false),
        };
        Ok(Some((journal, found)))
    }

    /// Empties the journal once every entry it held is applied, the last
    /// one (or the database's last) numbered `last`.
    pub fn applied_up_to(&self, last: u64) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        drop(state.mapped.take());
        // None there: nothing to empty (the CLI creates none).
        if let Some(file) = open_file(&metadata_of(&self.db)?, &self.path, Opening::Existing)? {
            file.set_len(0)
                .map_err(|e| failed("empty", &self.path, e))?;
        }
        state.size = 0;
        state.next = last + 1;
        Ok(())
    }

    /// Opens the (emptied) journal for appending: reserves its space and
    /// maps it. A gateway only; the CLI applies a journal and lets go.
    pub fn open_for_appending(&self) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        let file = open_or_create(&metadata_of(&self.db)?, &self.path, Opening::Any)?;
        state.mapped = Some(Mapped::new(file, &self.path, CAPACITY)?);
        Ok(())
    }

    /// Empties the journal when the database has every entry (at a
    /// gateway's stop: nothing is left for the next start to read).
    pub fn empty_if_applied(&self) {
        let mut state = lock(&self.state);
        let size = state.size;
        if self.unapplied() || size == 0 {
            return;
        }
        if let Some(mapped) = state.mapped.as_mut() {
            mapped.map[..size].fill(0);
        }
        state.size = 0;
    }

    /// Appends a settlement: once this returns, it survives the process.
    /// Returns whether it is the only one not applied yet (the writer may
    /// be waiting for nothing).
    pub fn append(&self, usage: UsageRecord) -> Result<bool, StoreError> {
        #[cfg(test)]
        if self.fail_appends.load(Ordering::Acquire) {
            return Err(backend("cannot write the settlement journal (test)"));
        }
        let body = body_of(&usage)?;
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let Some(mapped) = state.mapped.as_mut() else {
            return Err(backend("the settlement journal is not open for appending"));
        };
        let seq = state.next;
        let line = encode(seq, &body);
        let end = state.size + line.len();
        if end > mapped.map.len() {
            mapped.grow(&self.path, end)?;
        }
        mapped.map[state.size..end].copy_from_slice(&line);
        state.size = end;
        state.next += 1;
        state.pending.push(Entry { seq, usage });
        Ok(self.unapplied.fetch_add(1, Ordering::AcqRel) == 0)
    }

    /// Moves the entries appended since the last call into `into`.
    pub fn take(&self, into: &mut Vec<Entry>) {
        into.append(&mut lock(&self.state).pending);
    }

    /// Notes that `n` entries taken are applied to the database.
    pub fn applied(&self, n: usize) {
        self.unapplied.fetch_sub(n, Ordering::AcqRel);
    }

    /// The journal file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether some entries are not applied to the database yet.
    pub fn unapplied(&self) -> bool {
        self.unapplied.load(Ordering::Acquire) > 0
    }

    /// Starts the journal over when it is long (see the module doc). Only
    /// when every entry taken is applied.
    pub fn start_over_if_long(&self) -> Result<(), StoreError> {
        if lock(&self.state).size < START_OVER_AT {
            return Ok(());
        }
        // Reserved and mapped before appends are held up.
        let next = with_suffix(&self.path, ".next");
        match std::fs::remove_file(&next) {
            // Left by a start-over that failed half-way.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(failed("remove", &next, e))
            }
            _ => {}
        }
        let file = open_or_create(&metadata_of(&self.db)?, &next, Opening::New)?;
        let mut mapped = Mapped::new(file, &next, CAPACITY)?;
        let mut state = lock(&self.state);
        let mut lines = Vec::new();
        for entry in &state.pending {
            lines.extend(encode(entry.seq, &body_of(&entry.usage)?));
        }
        if lines.len() > mapped.map.len() {
            mapped.grow(&next, lines.len())?;
        }
        mapped.map[..lines.len()].copy_from_slice(&lines);
        std::fs::rename(&next, &self.path).map_err(|e| failed("rename", &next, e))?;
        // Appends go on in the new file; the old one, unlinked, is unmapped
        // once they can.
        let old = state.mapped.replace(mapped);
        state.size = lines.len();
        drop(state);
        drop(old);
        Ok(())
    }
}

/// The JSON of a settlement, as its line holds it.
fn body_of(usage: &UsageRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&line_of(usage))
        .map_err(|e| backend(format!("cannot encode a settlement: {e}")))
}

fn line_of(usage: &UsageRecord) -> Line<&str> {
    Line {
        key: usage.key_id,
        time: usage.time,
        endpoint: &usage.endpoint,
        model: usage.model.as_deref(),
        status: usage.status,
        prompt: usage.prompt_tokens,
        completion: usage.completion_tokens,
        credits: usage.credits.millis(),
        duration: usage.duration_ms,
    }
}

/// One line: the number, the settlement's JSON and their checksum.
fn encode(seq: u64, body: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut line = Vec::with_capacity(body.len() + 32);
    line.extend_from_slice(seq.to_string().as_bytes());
    line.push(b' ');
    line.extend_from_slice(body);
    let crc = CRC.checksum(&line);
    line.push(b' ');
    line.extend(
        (0..8)
            .rev()
            .map(|nibble| HEX[(crc >> (nibble * 4)) as usize & 0xf]),
    );
    line.push(b'\n');
    line
}

/// The entry of one line (without its `\n`), if it is whole.
fn decode(line: &str) -> Option<Entry> {
    let (content, crc) = line.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != CRC.checksum(content.as_bytes()) || crc.len() != 8 {
        return None;
    }
    let (seq, body) = content.split_once(' ')?;
    let line: Line<String> = serde_json::from_str(body).ok()?;
    Some(Entry {
        seq: seq.parse().ok()?,
        usage: UsageRecord {
            time: line.time,
            key_id: line.key,
            endpoint: line.endpoint,
            model: line.model,
            status: line.status,
            prompt_tokens: line.prompt,
            completion_tokens: line.completion,
            credits: Credits::from_millis(line.credits),
            duration_ms: line.duration,
        },
    })
}

/// The lines of a journal file: up to its last byte that is not zero (the
/// reserved rest of the file is zeros).
#[cfg(test)]
pub(super) fn lines_in(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |last| last + 1);
    &bytes[..end]
}

/// A line longer than this is damaged (a settlement's line is a few hundred
/// bytes, its model name included): reading does not hold on to it.
const LONGEST_LINE: usize = 64 << 10;

/// The entries of the journal at `path` (none when there is no file),
/// skipping zeros between lines and lines that are not whole (see the
/// module doc). Read 8 KiB at a time: the file is mostly zeros.
fn read(path: &Path) -> Result<Vec<Entry>, StoreError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt;
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(OPEN_FLAGS)
        .open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(failed("open", path, e)),
    };
    check_opened(&file, path)?;
    let skipped = |bytes: usize| {
        tracing::warn!(
            journal = %path.display(),
            bytes,
            "skipping a settlement journal line that is not whole"
        )
    };
    let mut entries = Vec::new();
    let mut block = vec![0; 8 << 10];
    // The line being read; `too_long` once it is past LONGEST_LINE.
    let (mut line, mut too_long) = (Vec::new(), 0usize);
    loop {
        let n = match file.read(&mut block) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed("read", path, e)),
        };
        for &byte in &block[..n] {
            match byte {
                // Zeros before a line: the reserved rest of the file, or a
                // page a power loss kept older.
                0 if line.is_empty() && too_long == 0 => {}
                b'\n' => {
                    match std::str::from_utf8(&line).ok().and_then(decode) {
                        Some(entry) if too_long == 0 => entries.push(entry),
                        _ => skipped(line.len() + too_long),
                    }
                    line.clear();
                    too_long = 0;
                }
                _ if line.len() < LONGEST_LINE => line.push(byte),
                // Not counted: the zeros after a line cut short.
                _ => too_long += usize::from(byte != 0),
            }
        }
    }
    // A line cut short by a crash is the last one, without its newline
    // (and maybe with zeros after it).
    let cut = line
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |last| last + 1);
    if cut + too_long > 0 {
        skipped(cut + too_long);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(key_id: i64, model: Option<&str>) -> UsageRecord {
        UsageRecord {
            time: 1_700_000_000_000,
            key_id,
            endpoint: "/api/chat".into(),
            model: model.map(Into::into),
            status: 200,
            prompt_tokens: u64::MAX,
            completion_tokens: 7,
            credits: Credits::from_millis(-3),
            duration_ms: 12,
        }
    }

    #[test]
    fn the_checksum_is_crc32c() {
        // The check value of CRC-32C: journals written byte by byte read
        // back under the table-driven computation, and the other way.
        assert_eq!(CRC.checksum(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_line_reads_back_as_written_and_not_when_damaged() {
        let written = Entry {
            seq: 42,
            usage: usage(7, Some("qwen \"3\"\n\ttab ü")),
        };
        let line = String::from_utf8(encode(42, &body_of(&written.usage).unwrap())).unwrap();
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line}"
        );
        let line = line.trim_end_matches('\n');
        assert_eq!(decode(line), Some(written.clone()));
        let no_model = Entry {
            seq: 1,
            usage: usage(8, None),
        };
        let other = String::from_utf8(encode(1, &body_of(&no_model.usage).unwrap())).unwrap();
        assert_eq!(decode(other.trim_end()), Some(no_model));
        // Any byte changed, or the line cut anywhere: not an entry.
        for at in 0..line.len() {
            let mut damaged = line.as_bytes().to_vec();
            damaged[at] ^= 0x01;
            let damaged = String::from_utf8_lossy(&damaged).into_owned();
            assert_eq!(decode(&damaged), None, "byte {at} changed: {damaged}");
            if let Some(cut) = line.get(..at) {
                assert_eq!(decode(cut), None, "cut at {at}");
            }
        }
    }

    /// A new (empty) database file in `dir`: a journal is opened beside
    /// one that is there.
    fn new_db(dir: &tempfile::TempDir) -> PathBuf {
        let db = dir.path().join("t.db");
        std::fs::write(&db, b"").unwrap();
        db
    }

    /// A new database file in `dir` and another name of it (a symbolic
    /// link).
    fn db_and_alias(dir: &tempfile::TempDir) -> (PathBuf, PathBuf) {
        let db = new_db(dir);
        let alias = dir.path().join("current.db");
        std::os::unix::fs::symlink(&db, &alias).unwrap();
        (db, alias)
    }

    /// The bytes of lines in the journal of `db`.
    fn used(db: &Path) -> usize {
        lines_in(&std::fs::read(path_of(db)).unwrap()).len()
    }

    /// The journal of `db`, opened for appending as a gateway does.
    fn opened(db: &Path) -> (Journal, Vec<Entry>) {
        let (journal, found) = Journal::open(db, Duration::ZERO).unwrap().unwrap();
        let last = found.iter().map(|e| e.seq).max().unwrap_or(0);
        journal.applied_up_to(last).unwrap();
        journal.open_for_appending().unwrap();
        (journal, found)
    }

    #[test]
    fn reading_skips_a_line_cut_short_and_damaged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(&dir);
        let (journal, found) = opened(&db);
        assert!(found.is_empty());
        for key in 1..=4 {
            journal.append(usage(key, None)).unwrap();
        }
        assert!(journal.unapplied());
        let mut taken = Vec::new();
        journal.take(&mut taken);
        assert_eq!(
            taken.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        drop(journal);
        // The file holds the lines, then zeros (its reserved rest).
        let path = path_of(&db);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), CAPACITY);
        // The third line damaged, and the fourth cut short by a crash in
        // the middle of its copy.
        let text = String::from_utf8(lines_in(&bytes).to_vec()).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        lines[2] = lines[2].replacen("\"key\":3", "\"key\":9", 1);
        let cut = lines[3].len() - 3;
        lines[3].truncate(cut);
        let mut damaged = format!("{}\n{}\n{}\n{}", lines[0], lines[1], lines[2], lines[3]);
        damaged.push_str(&"\0".repeat(100));
        std::fs::write(&path, damaged).unwrap();
        let (journal, found) = Journal::open(&db, Duration::ZERO).unwrap().unwrap();
        assert_eq!(found, taken[..2].to_vec());
        // Emptied once applied (not reserved: the CLI does that much);
        // numbers go on after the last applied.
        journal.applied_up_to(9).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        journal.open_for_appending().unwrap();
        journal.append(usage(5, None)).unwrap();
        drop(journal);
        let (_journal, found) = Journal::open(&db, Duration::ZERO).unwrap().unwrap();
        assert_eq!(found.iter().map(|e| e.seq).collect::<Vec<_>>(), [10]);
    }

    #[test]
    fn zeros_between_lines_are_skipped_and_a_line_with_a_gap_is_not_whole() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(&dir);
        let line = |seq, key| encode(seq, &body_of(&usage(key, None)).unwrap());
        // A page kept older by a power loss: zeros, then whole lines; and
        // a line whose copy stored its start and its end but not its
        // middle.
        let mut gapped = line(2, 2);
        gapped[10..20].fill(0);
        let mut bytes = line(1, 1);
        bytes.extend([0; 300]);
        bytes.extend(gapped);
        bytes.extend(line(3, 3));
        bytes.extend([0; 300]);
        std::fs::write(path_of(&db), bytes).unwrap();
        let (_journal, found) = Journal::open(&db, Duration::ZERO).unwrap().unwrap();
        assert_eq!(found.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(&dir);
        let held = Journal::open(&db, Duration::ZERO).unwrap();
        assert!(held.is_some());
        let waited = Instant::now();
        assert!(Journal::open(&db, Duration::from_millis(100))
            .unwrap()
            .is_none());
        assert!(waited.elapsed() >= Duration::from_millis(100));
        drop(held);
        assert!(Journal::open(&db, Duration::ZERO).unwrap().is_some());
    }

    #[test]
    fn a_journal_not_yet_emptied_takes_no_settlement() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(&new_db(&dir), Duration::ZERO)
            .unwrap()
            .unwrap();
        assert!(journal.append(usage(1, None)).is_err());
        assert!(!journal.unapplied());
    }

    #[test]
    fn a_journal_grows_when_the_writer_falls_behind_and_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(&dir);
        let (journal, _) = opened(&db);
        // Short: nothing happens.
        journal.append(usage(1, None)).unwrap();
        journal.start_over_if_long().unwrap();
        let short = used(&db);
        assert!(short > 0);
        // Past the reserved length, nothing taken by the writer: the file
        // grows, every line kept.
        let long_model = "m".repeat(1000);
        while used(&db) <= CAPACITY {
            for _ in 0..100 {
                journal.append(usage(1, Some(&long_model))).unwrap();
            }
        }
        assert_eq!(
            std::fs::metadata(path_of(&db)).unwrap().len() as usize,
            2 * CAPACITY
        );
        // Every line there, across the first reservation's end.
        let seqs: Vec<u64> = read(&path_of(&db)).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        // The entries taken (applied), two not: starting over keeps those.
        let mut taken = Vec::new();
        journal.take(&mut taken);
        journal.append(usage(2, None)).unwrap();
        journal.append(usage(3, None)).unwrap();
        let last = taken.last().unwrap().seq;
        journal.start_over_if_long().unwrap();
        assert!(used(&db) < 2 * short + 10);
        assert_eq!(
            std::fs::metadata(path_of(&db)).unwrap().len() as usize,
            CAPACITY
        );
        // Appends go on in the new file; a clean stop empties it.
        journal.append(usage(4, None)).unwrap();
        drop(journal);
        let (journal, found) = Journal::open(&db, Duration::ZERO).unwrap().unwrap();
        let seqs: Vec<u64> = found.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [last + 1, last + 2, last + 3]);
        let keys: Vec<i64> = found.iter().map(|e| e.usage.key_id).collect();
        assert_eq!(keys, [2, 3, 4]);
        journal.applied_up_to(last + 3).unwrap();
        journal.open_for_appending().unwrap();
        journal.append(usage(5, None)).unwrap();
        journal.empty_if_applied();
        assert!(used(&db) > 0, "emptied with an entry not applied");
        let mut taken = Vec::new();
        journal.take(&mut taken);
        journal.applied(taken.len());
        journal.empty_if_applied();
        assert_eq!(used(&db), 0);
    }

    #[test]
    fn journal_files_are_never_opened_through_a_link() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(&dir);
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"kept as it is").unwrap();
        let journal = path_of(&db);
        for link in [with_suffix(&journal, ".lock"), journal.clone()] {
            symlink(&victim, &link).unwrap();
            let refused = Journal::open(&db, Duration::ZERO);
            assert!(refused.is_err(), "{}", link.display());
            std::fs::remove_file(&link).unwrap();
        }
        // A link to a file not there yet: not created through it.
        let absent = dir.path().join("absent");
        for link in [with_suffix(&journal, ".lock"), journal.clone()] {
            let _ = std::fs::remove_file(&link);
            symlink(&absent, &link).unwrap();
            assert!(Journal::open(&db, Duration::ZERO).is_err());
            assert!(!absent.exists(), "{}", link.display());
            std::fs::remove_file(&link).unwrap();
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"kept as it is");
    }

    #[test]
    fn journal_files_take_the_permissions_and_owner_of_the_database() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(&dir);
        // Group-writable, as a database shared with a group is: more than
        // the usual umask lets a new file have.
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o660)).unwrap();
        // A umask that would take the group's bits away: the files get
        // them all the same. (Only this test creates files with a mode
        // that depends on it; others' SQLite files are at most 0600.)
        let umask = unsafe { libc::umask(0o077) };
        // Only root may give a file away.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            std::os::unix::fs::chown(&db, Some(4321), Some(4321)).unwrap();
        }
        let (journal, _) = opened(&db);
        let long_model = "m".repeat(1000);
        while used(&db) < START_OVER_AT {
            journal.append(usage(1, Some(&long_model))).unwrap();
        }
        let mut taken = Vec::new();
        journal.take(&mut taken);
        journal.applied(taken.len());
        // Started over: the journal is a new file, made as `.next`.
        let before = std::fs::metadata(path_of(&db)).unwrap().ino();
        journal.start_over_if_long().unwrap();
        unsafe { libc::umask(umask) };
        assert_ne!(std::fs::metadata(path_of(&db)).unwrap().ino(), before);
        for file in [path_of(&db), with_suffix(&path_of(&db), ".lock")] {
            let made = std::fs::metadata(&file).unwrap();
            assert_eq!(made.mode() & 0o777, 0o660, "{}", file.display());
            if root {
                assert_eq!((made.uid(), made.gid()), (4321, 4321), "{}", file.display());
            }
        }
    }

    /// (Opened for reading only where the process may not write it: not
    /// to be seen as root, who may write it whatever its mode.)
    #[test]
    fn a_lock_file_that_is_there_still_locks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(&dir);
        let lock_path = with_suffix(&path_of(&db), ".lock");
        std::fs::write(&lock_path, b"").unwrap();
        std::fs::set_permissions(&lock_path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let held = Journal::open(&db, Duration::ZERO).unwrap();
        assert!(held.is_some());
        assert!(Journal::open(&db, Duration::ZERO).unwrap().is_none());
    }

    #[test]
    fn applying_a_journal_that_is_not_there_creates_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(&dir);
        let (journal, found) = Journal::open(&db, Duration::ZERO).unwrap().unwrap();
        assert!(found.is_empty());
        // What the CLI does: applied, never opened for appending.
        journal.applied_up_to(0).unwrap();
        assert!(!path_of(&db).exists());
    }

    #[test]
    fn two_names_of_one_database_share_its_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (db, alias) = db_and_alias(&dir);
        let held = Journal::open(&db, Duration::ZERO).unwrap();
        assert!(held.is_some());
        assert!(Journal::open(&alias, Duration::ZERO).unwrap().is_none());
        drop(held);
        let (journal, _) = opened(&alias);
        journal.append(usage(1, None)).unwrap();
        drop(journal);
        assert!(used(&db) > 0);
        assert!(!path_of(&alias).exists());
    }

    #[test]
    fn a_fifo_or_a_hard_link_in_place_of_a_journal_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(&dir);
        let journal = path_of(&db);
        let other = dir.path().join("someone-elses");
        std::fs::write(&other, b"kept as it is").unwrap();
        for name in [with_suffix(&journal, ".lock"), journal.clone()] {
            // A FIFO: refused at once, not waited on for a writer.
            let c_name = std::ffi::CString::new(name.as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(c_name.as_ptr(), 0o600) }, 0);
            let (tx, rx) = std::sync::mpsc::channel();
            let opening = db.clone();
            std::thread::spawn(move || {
                let _ = tx.send(Journal::open(&opening, Duration::ZERO).is_err());
            });
            let refused = rx.recv_timeout(Duration::from_secs(10));
            assert_eq!(refused, Ok(true), "{}", name.display());
            std::fs::remove_file(&name).unwrap();
            // Another name of someone else's file.
            std::fs::hard_link(&other, &name).unwrap();
            assert!(
                Journal::open(&db, Duration::ZERO).is_err(),
                "{}",
                name.display()
            );
            std::fs::remove_file(&name).unwrap();
            let _ = std::fs::remove_file(with_suffix(&journal, ".lock"));
        }
        assert_eq!(std::fs::read(&other).unwrap(), b"kept as it is");
    }

    #[test]
    fn a_journal_left_under_another_name_of_the_database_is_not_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let (db, alias) = db_and_alias(&dir);
        // What a tollgate that named the journal after the path as given
        // left: empty, nothing to say; with settlements, refused.
        std::fs::write(path_of(&alias), b"").unwrap();
        assert!(Journal::open(&alias, Duration::ZERO).unwrap().is_some());
        std::fs::write(
            path_of(&alias),
            encode(1, &body_of(&usage(1, None)).unwrap()),
        )
        .unwrap();
        let refused = Journal::open(&alias, Duration::ZERO)
            .err()
            .unwrap()
            .to_string();
        assert!(refused.contains("move it to"), "{refused}");
        // Moved as told: its settlements are read.
        std::fs::rename(path_of(&alias), path_of(&db)).unwrap();
        let (_journal, found) = Journal::open(&alias, Duration::ZERO).unwrap().unwrap();
        assert_eq!(found.len(), 1);
    }
}
