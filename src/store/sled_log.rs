//! The embedded log on sled 0.34.
//!
//! One sled tree, `ledger`, holds the log and its indexes under key prefixes, so that a record and
//! its index entries go into one atomic `apply_batch`:
//!
//! | key                                   | value                          |
//! |---------------------------------------|--------------------------------|
//! | `e` + offset (u64 BE)                 | record (`codec`)               |
//! | `a` + alarm_id (16 B) + offset (u64 BE) | empty                        |
//! | `c` + command_id (16 B)               | bincode `CommandOutcome` (appended, already, rejected) |
//! | `m` + name                            | ledger metadata                |
//!
//! Durability: sled's `flush()` writes with `sync_file_range`, which is not power-loss durable
//! (sled #1452), so after each flush we `fdatasync` the `db` file ourselves. That is one
//! flush + one fdatasync per batch: the group commit. sled also writes a page image larger than
//! ~128 KiB (a leaf of large records) to a file of its own in `blobs/`, with no fsync at all; the
//! `db` file then points at it. So between the flush and the `fdatasync` of `db`, new blob files
//! and the `blobs/` directory are synced (`sync_blobs`): the pointer is never durable before
//! what it points at.

use super::codec::{self, decode_event, encode_event, FORMAT_VERSION};
use super::{chain, CommandOutcome, EventLog, Head, LedgerInfo, OutcomeKind};
use crate::domain::Event;
use crate::error::{Error, Result};
use crate::time::Timestamp;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use uuid::Uuid;

const EVENT: u8 = b'e';
const ALARM: u8 = b'a';
const COMMAND: u8 = b'c';
const META: u8 = b'm';

/// Options of the sled store.
#[derive(Clone, Debug)]
pub struct SledOptions {
    /// sled page cache in bytes. sled's default (1 GiB) is more than a small host can spare and
    /// real use exceeds it (sled #1309), so we always set it.
    pub cache_bytes: u64,
}

/// The default page cache: 256 MiB. A sequential read (replay, export, verify) through sled's
/// LRU cache hits only if the records it scans fit: the records of 1M events take ~170 MiB of
/// cache. Reading 1M events took 1.6 s with 128 MiB (every node paged in from the file, parsed
/// and evicted again), 0.65 s with 256 MiB, 0.67 s with 512 MiB (`log_read` bench).
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// How long a directory or blob must have gone unchanged before `sync_blobs` trusts what it saw:
/// longer than the coarsest Linux file timestamps (1 s).
const BLOB_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// What `sync_blobs` knows of `blobs/`: the names already synced, and the directory's stamp when
/// they were listed, if its mtime had settled (then an unchanged stamp means no blob was added,
/// and the directory need not be listed again).
#[derive(Default)]
struct BlobsSynced {
    names: HashSet<OsString>,
    settled: Option<DirStamp>,
}

/// What changes when an entry is added to or removed from a directory: its mtime and ctime (to
/// the nanosecond where the filesystem keeps them; ctime cannot be set by a user), and the inode
/// (the directory replaced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirStamp {
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl DirStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        DirStamp {
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

pub struct SledLog {
    db: sled::Db,
    tree: sled::Tree,
    /// The sled `db` file, kept open to `fdatasync` it after each flush.
    db_file: File,
    /// Names in `blobs/` already synced (pruned to what the directory holds at each sync).
    blobs_synced: Mutex<BlobsSynced>,
    /// Syncs run one at a time under this lock, which also holds the first failed one for the
    /// life of this handle. Linux reports a writeback error to an open file once: after an
    /// `fdatasync` failed (in the writer, or in a security-log append on the blocking pool,
    /// which shares this descriptor), a later one that succeeds proves nothing about the pages
    /// written before it, so every later sync and append fails. Serialised, no sync can succeed
    /// while another one, started earlier, is about to take the error.
    sync_state: Mutex<SyncState>,
    /// Tickets handed to `sync` callers in arrival order (see `SyncState::synced_through`).
    sync_tickets: std::sync::atomic::AtomicU64,
    info: LedgerInfo,
    dir: PathBuf,
}

fn event_key(offset: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = EVENT;
    k[1..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn alarm_key(alarm_id: Uuid, offset: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = ALARM;
    k[1..17].copy_from_slice(alarm_id.as_bytes());
    k[17..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn command_key(command_id: Uuid) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = COMMAND;
    k[1..].copy_from_slice(command_id.as_bytes());
    k
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut k = vec![META];
    k.extend_from_slice(name.as_bytes());
    k
}

fn offset_of(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Asks the kernel to read sled's whole `db` file in `dir` into the page cache
/// (`POSIX_FADV_WILLNEED`), on a thread of its own, for tools that are about to read all of it
/// (verify, export, backup): sled reads its pages one `pread` at a time, so on a cold cache each
/// one waited for the device in turn. Best effort; returns at once.
pub fn prefetch_db_file(dir: &Path) {
    let Ok(file) = File::open(dir.join("db")) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("prefetch".into())
        .spawn(move || {
            use std::os::unix::io::AsRawFd;
            // SAFETY: the descriptor belongs to `file`, which this closure owns until the call
            // returns; offset 0 and length 0 mean the whole file.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
            }
        });
}

/// Whether sled refused to open because another handle holds the directory's lock.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// How long `open_db_after_close` and `open_after_close` wait for the lock.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Retries `open` while it fails because the directory is locked, for up to `wait`.
fn retry_while_locked<T, E>(
    wait: std::time::Duration,
    mut open: impl FnMut() -> std::result::Result<T, E>,
    is_locked: impl Fn(&E) -> bool,
) -> std::result::Result<T, E> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match open() {
            Err(e) if is_locked(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Opens a sled database that this process closed a moment ago (tests that reopen a directory
/// in-process). sled 0.34 releases its file lock only when its IO threads and deferred
/// (epoch-based) cleanups have dropped the file, which under load can be a while after the last
/// handle is dropped; this retries while the directory is locked, for up to 10 s, and returns
/// any other error at once. A running server never needs it: another process's lock is
/// released when that process exits.
pub fn open_db_after_close(dir: &Path) -> sled::Result<sled::Db> {
    retry_while_locked(
        REOPEN_WAIT,
        || open_sled(dir, DEFAULT_CACHE_BYTES),
        is_lock_error,
    )
}

/// See `SledLog::sync_state`.
#[derive(Default)]
struct SyncState {
    /// The first sync that failed (other than for lack of descriptors or memory).
    failure: Option<String>,
    /// Every `sync` caller whose ticket is at most this is durable: a sync that began after
    /// those callers had written completed.
    synced_through: u64,
}

fn refused_after(why: &str) -> Error {
    Error::Storage(format!(
        "an earlier sync of the log failed ({why}): nothing written since can be proven durable; \
         restart the server (it recovers what the disk holds)"
    ))
}

/// A sync that failed for lack of descriptors or memory (opening a blob file, reading
/// `blobs/`), before any writeback was attempted on what it could not open: not a disk failure.
fn out_of_resources(e: &Error) -> bool {
    matches!(e, Error::Io(io) if matches!(io.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)))
}

/// `NoLedger` unless `dir` has sled's `db` file: checked before opening, which would create one.
pub fn require_db_file(dir: &Path) -> Result<()> {
    if dir.join("db").is_file() {
        Ok(())
    } else {
        Err(Error::NoLedger {
            path: dir.to_path_buf(),
            why: "no sled database (db file)",
        })
    }
}

/// The sled configuration of a ledger directory, for every open (the cache size is the caller's;
/// sled persists only segment size and compression, so one place keeps those from diverging).
fn sled_config(dir: &Path, cache_bytes: u64) -> sled::Config {
    sled::Config::new().path(dir).cache_capacity(cache_bytes)
}

/// Every open of a ledger's sled database: first `remove_partial_snapshots`, then sled's open.
/// The caller holds the data directory's lock (or owns the directory: a backup being written, a
/// test's temp dir), so no other process is writing a snapshot there.
///
/// sled 0.34 panics on some damaged files instead of returning an error (an empty or truncated
/// `db`: an index out of bounds while it reads its segments): such a panic is caught and
/// reported as the corruption it is, so every tool and `serve` fail with a clear message.
fn open_sled(dir: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    remove_partial_snapshots(dir);
    match quiet_panics_during(|| sled_config(dir, cache_bytes).open()) {
        Ok(opened) => opened,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            tracing::error!(dir = %dir.display(), detail = what, "sled failed while opening the database (an internal error of sled's on damaged data): it is damaged");
            Err(sled::Error::Corruption { at: None, bt: () })
        }
    }
}

thread_local! {
    /// Set while this thread runs `quiet_panics_during`.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic, which is not printed (the caller reports it): the process-wide
/// panic hook is wrapped once to skip threads inside this function; every other panic prints
/// as before.
fn quiet_panics_during<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static WRAP_HOOK: std::sync::Once = std::sync::Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(false));
    result
}

/// Removes `snap.*.generating` files from `dir`. sled 0.34 writes its page-table snapshot (at
/// every open that recovered log) to `snap.<lsn>.generating`, fsyncs it, renames it to
/// `snap.<lsn>`, then deletes the older snapshot. A process killed before the rename (a crash
/// during start-up, the shutdown checkpoint cut off by its deadline, a Ctrl-C on an offline
/// tool) leaves that file behind, and sled's next open takes the highest-named `snap.*` file,
/// `.generating` included: a partial one fails its checksum and the database will not open
/// (upstream #1527). Such a file is never needed: until the rename the previous snapshot is
/// still in place, and the open recovers from it and the log. Best effort: a file that cannot
/// be removed is logged, and sled's open then reports the corruption itself.
fn remove_partial_snapshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::warn!(
                    file = %entry.path().display(),
                    "removed a partial sled snapshot left by an interrupted open"
                ),
                Err(e) => tracing::error!(
                    file = %entry.path().display(),
                    error = %e,
                    "cannot remove a partial sled snapshot; sled's open will refuse it"
                ),
            }
        }
    }
}

/// Page cache of a checkpoint's open: it reads sled's log segments, not the tree.
const CHECKPOINT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// A shutdown checkpoint of the sled database in `dir`, once this process has dropped its last
/// handle, at a clean stop (`startup::Stopped::checkpoint`).
///
/// sled 0.34 writes its page-table snapshot (`snap.*`) only when it opens a database; until then
/// every open recovers the page table by reading the log segments written since the last
/// snapshot, 1.4–2.1 s after 1,000,000 appended events here. Opening and closing the
/// database once at a clean stop moves that cost from the next start to this stop, as a
/// database's shutdown checkpoint does; after a crash the next start still pays it. sled writes
/// the snapshot to a `.generating` file, fsyncs it and renames it: a checkpoint interrupted by a
/// crash leaves the previous snapshot and that partial file, which the next open removes
/// (`remove_partial_snapshots`) and then recovers as without a checkpoint.
///
/// Waits at most `wait` for sled's lock (its IO threads release it a moment after the last
/// handle is dropped, or never while a handle leaked past shutdown still lives). Returns how
/// long it took (the wait for the lock included), or `None` if the lock was still held after
/// `wait` or `dir` holds no database.
pub fn checkpoint(dir: &Path, wait: std::time::Duration) -> Result<Option<std::time::Duration>> {
    if !dir.join("db").is_file() {
        // Nothing to checkpoint, and sled's open would create an empty database.
        return Ok(None);
    }
    let open = || open_sled(dir, CHECKPOINT_CACHE_BYTES);
    let t = std::time::Instant::now();
    match retry_while_locked(wait, open, is_lock_error) {
        Ok(db) => {
            drop(db);
            Ok(Some(t.elapsed()))
        }
        Err(e) if is_lock_error(&e) => Ok(None),
        Err(e) => Err(Error::Storage(format!(
            "checkpoint of {}: {e}",
            dir.display()
        ))),
    }
}

impl SledLog {
    /// Opens (or creates, with a fresh ledger_id) the log in `dir` (the `ledger/` sub-directory
    /// of the data directory). The caller holds the data directory's lock.
    pub fn open(dir: &Path, opts: &SledOptions) -> Result<SledLog> {
        Self::open_with(dir, opts, None)
    }

    /// Opens an existing log and never creates one: for the offline tools, which must not turn a
    /// copy that lost its `db` file (or its metadata) into a new, empty ledger that verifies.
    pub fn open_existing(dir: &Path, opts: &SledOptions) -> Result<SledLog> {
        require_db_file(dir)?;
        Self::open_inner(dir, opts, None, false)
    }

    /// `open` for a directory this process closed a moment ago (tests that restart a ledger
    /// in-process); see `open_db_after_close`.
    pub fn open_after_close(dir: &Path, opts: &SledOptions) -> Result<SledLog> {
        retry_while_locked(
            REOPEN_WAIT,
            || Self::open(dir, opts),
            |e| matches!(e, Error::Locked { .. }),
        )
    }

    /// Like `open`, but a new ledger gets the given identity (used by `backup`, which must
    /// reproduce the source's ledger_id and creation time).
    pub fn open_with(
        dir: &Path,
        opts: &SledOptions,
        identity: Option<(Uuid, Timestamp)>,
    ) -> Result<SledLog> {
        Self::open_inner(dir, opts, identity, true)
    }

    fn open_inner(
        dir: &Path,
        opts: &SledOptions,
        identity: Option<(Uuid, Timestamp)>,
        create: bool,
    ) -> Result<SledLog> {
        std::fs::create_dir_all(dir)?;
        let db = open_sled(dir, opts.cache_bytes).map_err(|e| {
            if is_lock_error(&e) {
                Error::Locked {
                    path: dir.to_path_buf(),
                }
            } else if matches!(e, sled::Error::Corruption { .. }) {
                Error::Storage(format!(
                    "cannot open {}: the database is damaged (sled found unreadable data while \
                     recovering its log); restore it from a backup",
                    dir.display()
                ))
            } else {
                Error::Storage(format!("cannot open {}: {e}", dir.display()))
            }
        })?;
        let tree = db.open_tree("ledger")?;
        let db_file = File::open(dir.join("db"))?;
        let info = match Self::read_info(&tree)? {
            Some(info) => info,
            // Records without an identity: the metadata was lost, and a new ledger_id would
            // silently re-found the ledger (and break its chain's genesis).
            None if !tree.is_empty() => {
                return Err(Error::Corrupt {
                    offset: 0,
                    reason: "the ledger metadata (ledger_id) is missing but the log holds records"
                        .into(),
                })
            }
            None if !create => {
                return Err(Error::NoLedger {
                    path: dir.to_path_buf(),
                    why: "its log is empty and has no ledger identity",
                })
            }
            None => {
                let (ledger_id, created_at) =
                    identity.unwrap_or_else(|| (Uuid::new_v4(), Timestamp::now()));
                let mut batch = sled::Batch::default();
                batch.insert(meta_key("ledger_id"), ledger_id.as_bytes().to_vec());
                batch.insert(meta_key("created_at"), created_at.0.to_be_bytes().to_vec());
                batch.insert(meta_key("format_version"), vec![FORMAT_VERSION]);
                tree.apply_batch(batch)?;
                db.flush()?;
                db_file.sync_all()?;
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
                LedgerInfo {
                    ledger_id,
                    created_at,
                    format_version: FORMAT_VERSION,
                }
            }
        };
        if info.format_version > FORMAT_VERSION {
            return Err(Error::Corrupt {
                offset: 0,
                reason: format!(
                    "ledger format version {} is newer than this build supports ({FORMAT_VERSION}); upgrade alarm-ledger",
                    info.format_version
                ),
            });
        }
        Ok(SledLog {
            db,
            tree,
            db_file,
            blobs_synced: Mutex::new(BlobsSynced::default()),
            sync_state: Mutex::new(SyncState::default()),
            sync_tickets: std::sync::atomic::AtomicU64::new(0),
            info,
            dir: dir.to_path_buf(),
        })
    }

    fn read_info(tree: &sled::Tree) -> Result<Option<LedgerInfo>> {
        let Some(id) = tree.get(meta_key("ledger_id"))? else {
            return Ok(None);
        };
        let corrupt = |what: &str| Error::Corrupt {
            offset: 0,
            reason: format!("ledger metadata `{what}` is malformed"),
        };
        let ledger_id = Uuid::from_slice(&id).map_err(|_| corrupt("ledger_id"))?;
        let created = tree
            .get(meta_key("created_at"))?
            .ok_or_else(|| corrupt("created_at"))?;
        let created: [u8; 8] = created
            .as_ref()
            .try_into()
            .map_err(|_| corrupt("created_at"))?;
        let version = tree
            .get(meta_key("format_version"))?
            .and_then(|v| v.first().copied())
            .ok_or_else(|| corrupt("format_version"))?;
        Ok(Some(LedgerInfo {
            ledger_id,
            created_at: Timestamp(i64::from_be_bytes(created)),
            format_version: version,
        }))
    }

    /// The sled database, for the other trees of the data directory (users, security log).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn decode_at(key: &[u8], value: &[u8]) -> Result<Event> {
        let offset = offset_of(key).unwrap_or(0);
        let event = decode_event(value).map_err(|e| Error::Corrupt {
            offset,
            reason: e.to_string(),
        })?;
        if event.offset != offset {
            return Err(Error::Corrupt {
                offset,
                reason: format!("record carries offset {}", event.offset),
            });
        }
        Ok(event)
    }

    /// Writes events and outcomes in one atomic batch **without** making them durable: for
    /// `backup`, whose destination only has to be durable once it is complete (`sync` at the
    /// end). The ledger's own appends always go through `append_with_outcomes`.
    pub fn write_unsynced(
        &self,
        events: &[Event],
        outcomes: &[(Uuid, CommandOutcome)],
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        let mut index = |cid: Uuid, outcome: &CommandOutcome| -> Result<()> {
            let bytes = codec::encode_value(outcome).map_err(|e| Error::Storage(e.to_string()))?;
            batch.insert(&command_key(cid), bytes);
            Ok(())
        };
        for e in events {
            if let Some(c) = e.command_id {
                let outcome = CommandOutcome {
                    offset: e.offset,
                    alarm_id: e.alarm_id,
                    kind: OutcomeKind::Appended,
                };
                index(c, &outcome)?;
            }
        }
        for (cid, outcome) in outcomes {
            index(*cid, outcome)?;
        }
        for e in events {
            batch.insert(&event_key(e.offset), encode_event(e));
            batch.insert(&alarm_key(e.alarm_id, e.offset), &[]);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// The error of the first failed sync, once there was one (see `sync_state`).
    fn refuse_after_sync_failure(&self) -> Result<()> {
        match self.storage_failure() {
            Some(why) => Err(refused_after(&why)),
            None => Ok(()),
        }
    }

    fn lock_sync_state(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.sync_state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what `write_unsynced` buffered to the file (sled's flush: `pwrite` and
    /// `sync_file_range`) without the `fdatasync` that makes it durable.
    pub fn write_out(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// fsyncs the blob files sled wrote since the last sync, then the `blobs/` directory. Usually
    /// one empty directory read; sled removes a blob file when its page is rewritten (a file gone
    /// by the time it is opened needs nothing).
    fn sync_blobs(&self) -> Result<()> {
        let dir = self.dir.join("blobs");
        // Before the stat: "settled" must hold when the directory was read, not after the
        // listing (which fsyncs files and can take a while).
        let started = std::time::SystemTime::now();
        let settled = |mtime: Option<std::time::SystemTime>| {
            mtime.is_some_and(|m| started.duration_since(m).is_ok_and(|age| age > BLOB_SETTLE))
        };
        // A stat first, which takes no file descriptor. A commit should not need a new one: a
        // server out of descriptors (a connection flood under a low `ulimit -n`) would fail the
        // commit, and a failed commit stops appends until a restart. An open fails with EMFILE
        // before it even looks at the path. (Following a symlinked `blobs/`, as the listing
        // does.)
        let (stamp, mtime) = match std::fs::metadata(&dir) {
            Ok(meta) => (DirStamp::of(&meta), meta.modified().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut synced = self
            .blobs_synced
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if synced.settled == Some(stamp) {
            return Ok(()); // no entry added or removed since the last full look
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut present = HashSet::with_capacity(synced.names.len());
        let mut new = false;
        let mut all_settled = settled(mtime);
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if synced.names.contains(&name) {
                present.insert(name);
                continue;
            }
            match File::open(entry.path()) {
                Ok(f) => f.sync_data()?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            }
            new = true;
            // sled's flusher thread can create a blob while this runs, and writes its content
            // after creating it: a blob written to in the last moments may still be growing,
            // so it is synced again at every commit until it has settled.
            if settled(entry.metadata().ok().and_then(|m| m.modified().ok())) {
                present.insert(name);
            } else {
                all_settled = false;
            }
        }
        if new {
            File::open(&dir)?.sync_all()?;
        }
        // Only now: names recorded before their directory entry is durable would let the next
        // sync skip the directory after this one failed.
        synced.names = present;
        // The stamp stands for what was listed only if the directory's timestamp tick was over
        // when it was read (an entry added later in the same tick would leave it unchanged) and
        // no blob is still young.
        synced.settled = all_settled.then_some(stamp);
        Ok(())
    }

    fn event_range(&self, from: u64) -> sled::Iter {
        self.tree.range(event_key(from)..=event_key(u64::MAX))
    }
}

impl EventLog for SledLog {
    fn info(&self) -> LedgerInfo {
        self.info
    }

    fn head(&self) -> Result<Head> {
        match self.event_range(0).next_back() {
            None => Ok(Head {
                offset: 0,
                hash: chain::genesis(self.info.ledger_id),
                at: Timestamp(0),
            }),
            Some(kv) => {
                let (k, v) = kv?;
                let e = Self::decode_at(&k, &v)?;
                Ok(Head {
                    offset: e.offset,
                    hash: e.hash,
                    at: e.at,
                })
            }
        }
    }

    fn append_with_outcomes(
        &self,
        events: &[Event],
        outcomes: &[(Uuid, CommandOutcome)],
    ) -> Result<()> {
        if events.is_empty() && outcomes.is_empty() {
            return Ok(());
        }
        self.refuse_after_sync_failure()?;
        self.write_unsynced(events, outcomes)?;
        self.sync()
    }

    fn sync(&self) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        // Taken after the caller's writes: a sync that reads the ticket counter at or past it
        // starts its flush after those writes, and makes them durable too.
        let ticket = self.sync_tickets.fetch_add(1, SeqCst) + 1;
        let mut state = self.lock_sync_state();
        if let Some(why) = &state.failure {
            return Err(refused_after(why));
        }
        if state.synced_through >= ticket {
            return Ok(()); // group commit: another caller's sync covered these writes
        }
        let covering = self.sync_tickets.load(SeqCst);
        let synced = (|| -> Result<()> {
            self.db.flush()?;
            self.sync_blobs()?;
            self.db_file.sync_data()?;
            Ok(())
        })();
        match &synced {
            Ok(()) => state.synced_through = covering,
            Err(e) if !out_of_resources(e) => state.failure = Some(e.to_string()),
            // Out of descriptors or memory before anything was synced: nothing written was
            // lost, and the next sync tries again.
            Err(_) => {}
        }
        synced
    }

    fn storage_failure(&self) -> Option<String> {
        self.lock_sync_state().failure.clone()
    }

    fn read_from(&self, from: u64, max: usize) -> Result<Vec<Event>> {
        let mut out = Vec::with_capacity(max.min(4096));
        for kv in self.event_range(from.max(1)).take(max) {
            let (k, v) = kv?;
            out.push(Self::decode_at(&k, &v)?);
        }
        Ok(out)
    }

    fn iter_from(&self, from: u64) -> Box<dyn Iterator<Item = Result<Event>> + Send + '_> {
        Box::new(self.event_range(from.max(1)).map(|kv| {
            let (k, v) = kv?;
            Self::decode_at(&k, &v)
        }))
    }

    fn event_at(&self, offset: u64) -> Result<Option<Event>> {
        match self.tree.get(event_key(offset))? {
            None => Ok(None),
            Some(v) => Self::decode_at(&event_key(offset), &v).map(Some),
        }
    }

    fn alarm_offsets(
        &self,
        alarm_id: Uuid,
        from: u64,
    ) -> Box<dyn Iterator<Item = Result<u64>> + Send + '_> {
        let range = self
            .tree
            .range(alarm_key(alarm_id, from)..=alarm_key(alarm_id, u64::MAX));
        Box::new(range.filter_map(|kv| match kv {
            Ok((k, _)) => offset_of(&k).map(Ok),
            Err(e) => Some(Err(e.into())),
        }))
    }

    fn command_outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>> {
        match self.tree.get(command_key(command_id))? {
            None => Ok(None),
            Some(v) => codec::decode_value(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt {
                    offset: 0,
                    reason: format!("command index entry {command_id}: {e}"),
                }),
        }
    }

    fn command_index(
        &self,
    ) -> Box<dyn Iterator<Item = Result<(Uuid, CommandOutcome)>> + Send + '_> {
        Box::new(self.tree.scan_prefix([COMMAND]).map(|kv| {
            let (k, v) = kv?;
            let id = Uuid::from_slice(&k[1..]).map_err(|_| Error::Corrupt {
                offset: 0,
                reason: "malformed command index key".into(),
            })?;
            let outcome: CommandOutcome = codec::decode_value(&v).map_err(|e| Error::Corrupt {
                offset: 0,
                reason: format!("command index entry {id}: {e}"),
            })?;
            Ok((id, outcome))
        }))
    }

    fn alarm_index(&self) -> Box<dyn Iterator<Item = Result<(Uuid, u64)>> + Send + '_> {
        Box::new(self.tree.scan_prefix([ALARM]).map(|kv| {
            let (k, _) = kv?;
            let bad = || Error::Corrupt {
                offset: 0,
                reason: "malformed alarm index key".into(),
            };
            let id = k
                .get(1..17)
                .and_then(|b| Uuid::from_slice(b).ok())
                .ok_or_else(bad)?;
            let off = offset_of(&k).ok_or_else(bad)?;
            Ok((id, off))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets `path`'s mtime (and so its settled age) to an hour ago.
    fn age(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let ago = libc::timespec {
            tv_sec: (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                - 3_600) as libc::time_t,
            tv_nsec: 0,
        };
        // SAFETY: a valid C path and two timespecs.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [ago, ago].as_ptr(), 0) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    /// `blobs/` is listed again as soon as an entry is added, even after a sync that skipped it;
    /// a settled, unchanged directory is not listed; a young blob (maybe still being written by
    /// sled's flusher) is synced again at each commit until it has settled.
    #[test]
    fn a_new_blob_is_synced_after_the_directory_was_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let log = SledLog::open(&tmp.path().join("ledger"), &SledOptions::default()).unwrap();
        // A symlinked `blobs/` (moved to another disk) is followed, as the listing follows it.
        let target = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::remove_dir_all(tmp.path().join("ledger/blobs")).ok();
        std::os::unix::fs::symlink(&target, tmp.path().join("ledger/blobs")).unwrap();
        age(&target);
        log.sync().unwrap();
        let stamp = log.blobs_synced.lock().unwrap().settled;
        assert!(stamp.is_some(), "an hour-old directory is settled");
        log.sync().unwrap();
        assert_eq!(log.blobs_synced.lock().unwrap().settled, stamp, "skipped");
        std::fs::write(target.join("123"), b"a blob").unwrap();
        log.sync().unwrap();
        {
            let synced = log.blobs_synced.lock().unwrap();
            assert!(
                !synced.names.contains(std::ffi::OsStr::new("123")),
                "synced, but young: synced again next time"
            );
            assert_eq!(
                synced.settled, None,
                "a directory with a young blob is not settled"
            );
        }
        age(&target.join("123"));
        age(&target);
        log.sync().unwrap();
        let synced = log.blobs_synced.lock().unwrap();
        assert!(
            synced.names.contains(std::ffi::OsStr::new("123")),
            "settled: recorded"
        );
        assert!(synced.settled.is_some());
    }

    /// An existing ledger is required and the directory has none: the typed `NoLedger` (which
    /// `serve` turns into its lost-ledger refusal), nothing founded; a real ledger opens.
    #[test]
    fn open_existing_on_an_empty_directory_is_no_ledger() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        // No db file: refused before sled would create one.
        assert!(matches!(
            SledLog::open_existing(&dir, &SledOptions::default()),
            Err(Error::NoLedger { .. })
        ));
        assert!(!dir.join("db").exists(), "nothing created");
        // A db file with nothing in it (sled's own files, no ledger identity). sled releases
        // its lock a while after the last handle is dropped: each reopen waits for it.
        drop(open_db_after_close(&dir).unwrap());
        let existing = || {
            retry_while_locked(
                REOPEN_WAIT,
                || SledLog::open_existing(&dir, &SledOptions::default()),
                |e| matches!(e, Error::Locked { .. }),
            )
        };
        match existing() {
            Err(Error::NoLedger { path, .. }) => assert_eq!(path, dir),
            Err(other) => panic!("expected NoLedger, got {other:?}"),
            Ok(_) => panic!("an empty directory opened as a ledger"),
        }
        match existing() {
            Err(Error::NoLedger { .. }) => {}
            other => panic!("still no ledger expected: {:?}", other.map(|l| l.info())),
        }
        let founded = SledLog::open_after_close(&dir, &SledOptions::default())
            .unwrap()
            .info();
        let reopened = existing().unwrap();
        assert_eq!(reopened.info().ledger_id, founded.ledger_id);
    }

    /// A failed sync is remembered: the same descriptor fixed again, later syncs and appends
    /// still fail (a writeback error is reported to an open file once, so a later successful
    /// `fdatasync` would prove nothing), and `storage_failure` says why.
    #[test]
    fn a_failed_sync_fails_every_later_sync_and_append() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        let mut log = SledLog::open(&dir, &SledOptions::default()).unwrap();
        log.sync().unwrap();
        assert_eq!(log.storage_failure(), None);
        // fdatasync on a pipe fails (EINVAL): the failure a bad disk gives, on demand.
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two descriptors, each owned by exactly one File below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (pipe, _writer) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        let real = std::mem::replace(&mut log.db_file, pipe);
        let first = log.sync().unwrap_err().to_string();
        log.db_file = real;
        let why = log.storage_failure().expect("remembered");
        assert!(
            first.contains(&why) || why.contains(&first),
            "{first} / {why}"
        );
        let again = log.sync().unwrap_err().to_string();
        assert!(
            again.contains("an earlier sync of the log failed"),
            "{again}"
        );
        let info = log.info();
        let e = Event {
            offset: 1,
            id: Uuid::now_v7(),
            at: Timestamp(1),
            actor: "t".into(),
            alarm_id: Uuid::now_v7(),
            command_id: None,
            data: crate::domain::EventData::Rearmed,
            hash: crate::store::chain::genesis(info.ledger_id),
        };
        let refused = log.append_batch(&[e]).unwrap_err().to_string();
        assert!(
            refused.contains("an earlier sync of the log failed"),
            "{refused}"
        );
        assert_eq!(log.head().unwrap().offset, 0, "nothing was written");
    }

    /// A panic inside `quiet_panics_during` comes back as an error with its message, and the
    /// thread is not left quiet: the next call runs normally.
    #[test]
    fn a_panic_while_quiet_is_caught_and_the_next_call_runs() {
        let caught = quiet_panics_during(|| -> u32 { panic!("sled fell over") }).unwrap_err();
        assert_eq!(caught.downcast_ref::<&str>(), Some(&"sled fell over"));
        assert!(!QUIET_PANICS.with(std::cell::Cell::get));
        assert_eq!(quiet_panics_during(|| 7).unwrap(), 7);
    }

    /// Running out of descriptors or memory is not a disk failure (nothing written was lost;
    /// the next sync tries again); any other failed sync is.
    #[test]
    fn only_a_real_writeback_failure_is_remembered() {
        let io = |errno| Error::Io(std::io::Error::from_raw_os_error(errno));
        assert!(out_of_resources(&io(libc::EMFILE)));
        assert!(out_of_resources(&io(libc::ENFILE)));
        assert!(out_of_resources(&io(libc::ENOMEM)));
        assert!(!out_of_resources(&io(libc::EIO)));
        assert!(!out_of_resources(&io(libc::ENOSPC)));
        assert!(!out_of_resources(&Error::Storage("sled: IO error".into())));
    }

    /// Concurrent syncs (the writer's and security-log entries') all succeed, one at a time,
    /// and a caller whose writes an already finished sync covered returns without one.
    #[test]
    fn concurrent_syncs_all_succeed_and_cover_each_other() {
        let tmp = tempfile::tempdir().unwrap();
        let log = SledLog::open(&tmp.path().join("ledger"), &SledOptions::default()).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..20 {
                        log.sync().unwrap();
                    }
                });
            }
        });
        let state = log.lock_sync_state();
        assert_eq!(state.failure, None);
        let tickets = log.sync_tickets.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(tickets, 160);
        assert_eq!(
            state.synced_through, tickets,
            "the last sync covered every caller"
        );
    }
}
