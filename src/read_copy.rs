//! Private copies for the read-only tools (`verify`, `export`, `user list`).
//!
//! Opening a sled database runs sled's recovery, and that writes: it re-reads the end of its log
//! and zeroes it from the first damaged page on (how it drops a write torn by a crash). A
//! `verify` of a damaged archive copy opened in place thus destroyed the very evidence it found
//! (review: 8 KB zeroed by one flipped byte). So these tools copy the directory's `ledger/` and
//! `projection.snapshot` into a private scratch directory and open the copy: the directory they
//! are given is only ever read.
//!
//! - The source is read under **shared** locks taken through read-only descriptors (`.lock`,
//!   ours, and `ledger/db`, sled's): a running server (or a tool writing there) holds them
//!   exclusively, so the copy is refused while one does, even on a read-only mount or a
//!   directory this user may only read; two read-only tools do not exclude each other. They are
//!   released once the copy is taken.
//! - The copy's files are this user's, mode 0600, whatever the source's (sled opens its files
//!   for writing).
//! - The scratch directory holds a lock of its own for the life of the run. SIGINT, SIGTERM and
//!   SIGHUP (when not ignored) remove it, and an export's `.partial` file, before the process
//!   dies of that signal (`handle_signals`); a copy left by a run killed outright is removed by
//!   the next run on the same scratch directory, once its lock is free.

use crate::error::{Error, Result};
use crate::ledger::datadir::DataDir;
use crate::store::sled_log::{SledLog, SledOptions};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The name of a scratch directory: this prefix, the pid, a nanosecond stamp.
const SCRATCH_PREFIX: &str = "alarm-ledger-read-";

/// Set (under its lock) by the signal cleanup before it removes the copy: the copy creates no
/// file or directory once it is set, so nothing is recreated behind the removal.
static CANCELLED: Mutex<bool> = Mutex::new(false);

/// What a read-only tool reads: the log (of a private copy unless `--in-place`) and the
/// projection snapshot beside it.
pub struct ReadView {
    pub log: SledLog,
    /// The projection snapshot that goes with `log` (copied with it).
    pub snapshot: PathBuf,
    /// Dropped after the log (`finish`).
    scratch: Option<Scratch>,
    /// `--in-place`: the directory's exclusive lock, held to the end.
    _dir: Option<DataDir>,
}

impl ReadView {
    /// Opens `root` for reading: a private copy in `scratch` (default: the system's temporary
    /// directory), or with `in_place` the directory itself under its exclusive lock.
    pub fn open(
        root: &Path,
        scratch: Option<&Path>,
        in_place: bool,
        cache_bytes: u64,
    ) -> Result<ReadView> {
        let opts = SledOptions { cache_bytes };
        if in_place {
            let dir = DataDir::lock_existing(root)?;
            crate::store::sled_log::prefetch_db_file(&dir.ledger_dir());
            let log = SledLog::open_existing(&dir.ledger_dir(), &opts)?;
            return Ok(ReadView {
                log,
                snapshot: dir.snapshot_path(),
                scratch: None,
                _dir: Some(dir),
            });
        }
        let dir = DataDir::lock_for_reading(root)?;
        let source = dir.ledger_dir();
        crate::store::sled_log::require_db_file(&source)?;
        let base = scratch
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        refuse_inside(&base, dir.root(), &source)?;
        std::fs::create_dir_all(&base).map_err(|e| {
            Error::Other(format!(
                "cannot create scratch directory {}: {e}",
                base.display()
            ))
        })?;
        sweep_stale(&base);
        let scratch = Scratch::create(&base)?;
        remove_on_signal(&scratch.path);
        crate::store::sled_log::prefetch_db_file(&source);
        let copy = scratch.path.join("ledger");
        let snapshot = scratch.path.join("projection.snapshot");
        copy_dir(&source, &copy)
            .and_then(|()| match File::open(dir.snapshot_path()) {
                Ok(mut from) => copy_file(&mut from, &snapshot),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(at(&dir.snapshot_path(), e)),
            })
            .map_err(|e| {
                use std::io::ErrorKind as K;
                let room = matches!(
                    e.kind(),
                    K::StorageFull | K::QuotaExceeded | K::FileTooLarge
                );
                Error::Other(format!(
                    "cannot copy {} to {} to read it{}: {e}",
                    dir.root().display(),
                    scratch.path.display(),
                    if room {
                        " (the copy needs room for the db file: --scratch DIR elsewhere, or \
                         --in-place on a copy you can lose)"
                    } else {
                        ""
                    }
                ))
            })?;
        // The copy is taken: a server may start on the source now.
        drop(dir);
        let log =
            SledLog::open_existing(&copy, &opts).map_err(|e| name_source(e, &copy, &source))?;
        Ok(ReadView {
            log,
            snapshot,
            scratch: Some(scratch),
            _dir: None,
        })
    }

    /// `e` with the private copy's paths (the log's, the snapshot's) named as the directory
    /// `root` they were copied from: a message must not send the user to a scratch file that is
    /// removed when the tool exits.
    pub fn name_source(&self, e: Error, root: &Path) -> Error {
        let Some(scratch) = &self.scratch else {
            return e;
        };
        let e = name_source(e, &scratch.path.join("ledger"), &root.join("ledger"));
        let file = "projection.snapshot";
        name_source(e, &scratch.path.join(file), &root.join(file))
    }

    /// Ends the tool's use of the log without tearing sled down, then removes the copy. The
    /// tools are the binary's: the process exits as soon as one returns, and freeing the page
    /// cache a full pass filled (~900 MiB for 1M events, millions of allocations) object by
    /// object took 0.4 s of a 2.9 s `verify`. The command wrote nothing; the flush is a
    /// formality that keeps it that way.
    pub fn finish(self) -> Result<()> {
        let ReadView {
            log, scratch, _dir, ..
        } = self;
        log.db().flush()?;
        std::mem::forget(log);
        drop(scratch);
        Ok(())
    }
}

/// A scratch directory with its lock (held for the run), removed when dropped.
struct Scratch {
    path: PathBuf,
    _lock: File,
}

impl Scratch {
    fn create(base: &Path) -> Result<Scratch> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = base.join(format!("{SCRATCH_PREFIX}{}-{nanos}", std::process::id()));
        let made = std::fs::create_dir(&path).and_then(|()| {
            let lock = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path.join(".lock"))?;
            // SAFETY: flock on a valid, owned descriptor.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(lock)
        });
        match made {
            Ok(lock) => Ok(Scratch { path, _lock: lock }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                Err(Error::Other(format!(
                    "cannot create scratch directory {}: {e}",
                    path.display()
                )))
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes the scratch directories of earlier runs that are gone: each is a whole copy of a
/// ledger, password hashes and audit trail included, and nothing else would ever remove it. A
/// run holds its directory's lock while it lives (in any pid namespace or host sharing the
/// directory); one without a lock file (killed while creating it) is removed after an hour.
fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let is_scratch = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(SCRATCH_PREFIX));
        if !is_scratch {
            continue;
        }
        let path = entry.path();
        let gone = match File::open(path.join(".lock")) {
            // SAFETY: flock on a valid, owned descriptor; released when `f` is dropped.
            Ok(f) => unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 },
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600)),
        };
        if gone {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Paths removed when a handled signal ends the tool (`remove_on_signal`).
static ON_SIGNAL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static HANDLING: std::sync::Once = std::sync::Once::new();

/// Removes `path` (a scratch copy, an export's `.partial` file) if a handled signal ends the
/// tool before it is done (`handle_signals`).
pub fn remove_on_signal(path: &Path) {
    handle_signals();
    ON_SIGNAL
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.to_path_buf());
}

/// Whether a stop signal came (the signal thread is removing what was registered and then
/// ends the process). A failure the tool meets meanwhile is an effect of that removal (a
/// scratch copy emptied under it reads as "no ledger"), not a finding: it must not be reported.
pub fn stopping() -> bool {
    *CANCELLED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Creates the new file `path` (mode 0600; an existing one is an error) and registers it with
/// `remove_on_signal`, both under the lock the signal thread takes first: a signal can come
/// neither between them (an unregistered file would be left behind) nor before them (the
/// signal thread would remove a file that is someone else's). Call `handle_signals` first.
pub fn create_new_removed_on_signal(path: &Path) -> std::io::Result<File> {
    let cancelled = CANCELLED.lock().unwrap_or_else(|p| p.into_inner());
    if *cancelled {
        return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    ON_SIGNAL
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.to_path_buf());
    drop(cancelled);
    Ok(file)
}

/// Renames the complete `staging` (registered with `remove_on_signal`) to `dest` and syncs the
/// directory, unless a stop signal came first (then `Interrupted`: the signal thread removes
/// it). Under the lock the signal thread takes before it removes anything, so the two never
/// overlap: the signal either finds `staging` gone (published, unregistered) or removes it
/// before it could be published — never the files of a published `dest`.
pub fn publish_unless_stopped(staging: &Path, dest: &Path) -> std::io::Result<()> {
    {
        let cancelled = CANCELLED.lock().unwrap_or_else(|p| p.into_inner());
        if *cancelled {
            return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
        }
        std::fs::rename(staging, dest)?;
        ON_SIGNAL
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| p != staging);
    }
    std::fs::File::open(crate::staging::parent_dir(dest))?.sync_all()
}

/// SIGINT, SIGTERM or SIGHUP while a read-only tool runs removes what it registered
/// (`remove_on_signal`), then the process dies of that signal (so a shell loop sees Ctrl-C as
/// such). Only signals still at their default action are handled: one the tool was told to
/// ignore (`nohup`, `trap '' HUP`) stays ignored. They are blocked in this thread, so every
/// thread started later (sled's) inherits the mask, and one thread waits for them: call it
/// before the tool opens anything. Once per process.
pub fn handle_signals() {
    HANDLING.call_once(install_signal_thread);
}

fn install_signal_thread() {
    // SAFETY: the signal-set calls work on a local, initialized set; pthread_sigmask changes
    // this thread's mask only.
    let (set, previous) = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        let mut any = false;
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            if crate::shutdown::disposition(sig) == Some(libc::SIG_DFL) {
                libc::sigaddset(&mut set, sig);
                any = true;
            }
        }
        if !any {
            return;
        }
        let mut previous: libc::sigset_t = std::mem::zeroed();
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) != 0 {
            return;
        }
        (set, previous)
    };
    let spawned = std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait on a valid set with a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            let mut cancelled = CANCELLED.lock().unwrap_or_else(|p| p.into_inner());
            *cancelled = true;
            for path in ON_SIGNAL.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                // A directory may still be written by other threads (sled's, in a backup's
                // copy) while it is removed: a file they add makes the removal fail
                // (ENOTEMPTY), so it is tried again, a few times.
                for _ in 0..20 {
                    if path.is_dir() {
                        let _ = std::fs::remove_dir_all(path);
                    } else {
                        let _ = std::fs::remove_file(path);
                    }
                    if std::fs::symlink_metadata(path).is_err() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            // SAFETY: resets one signal to its default action, unblocks it in this thread and
            // sends it to this thread: the process ends as killed by it.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                let mut one: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut one);
                libc::sigaddset(&mut one, sig);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                libc::raise(sig);
            }
            std::process::exit(128 + sig);
        });
    if spawned.is_err() {
        // No thread to wait for them: the signals must not stay blocked (and so ignored).
        // SAFETY: restores this thread's previous mask.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        }
    }
}

/// A scratch directory inside the directory being read would be copied into itself (and
/// written into a directory that is only to be read).
fn refuse_inside(base: &Path, root: &Path, source: &Path) -> Result<()> {
    let base = canonical_even_if_missing(base)?;
    for inside in [root, source] {
        let Ok(inside) = std::fs::canonicalize(inside) else {
            continue;
        };
        if base.starts_with(&inside) || within(&base, &inside) {
            return Err(Error::Config(format!(
                "--scratch {} is inside the data directory being read ({}): choose a directory elsewhere",
                base.display(),
                inside.display()
            )));
        }
    }
    Ok(())
}

/// Refuses an output (`--out` of `export`, `--to` of `backup`) inside the data directory `data`
/// (symlinks and `..` resolved), except under `allowed` (the `backups/` the online backup uses):
/// a result written into `ledger/` would sit among sled's files, and one beside them would
/// travel with every copy of the directory taken as a backup.
pub fn refuse_output_inside(
    flag: &str,
    out: &Path,
    data: &Path,
    allowed: Option<&Path>,
) -> Result<()> {
    let Ok(data) = std::fs::canonicalize(data) else {
        return Ok(()); // no such directory: the command fails on it next, with its own message
    };
    let out = where_written(out).map_err(|e| {
        Error::Config(format!(
            "{flag} {}: cannot resolve the path: {e}",
            out.display()
        ))
    })?;
    let allowed = allowed.and_then(|a| canonical_even_if_missing(a).ok());
    // Strictly under it, judged on the parent: `backups/` itself (or it seen through a bind
    // mount) is not a place for a backup.
    let under_allowed = allowed.as_ref().is_some_and(|a| {
        out.parent()
            .is_some_and(|p| p.starts_with(a) || within(p, a))
    });
    if (out.starts_with(&data) || within(&out, &data)) && !under_allowed {
        return Err(Error::Config(format!(
            "{flag} {} is inside the data directory {}: write it elsewhere{}",
            out.display(),
            data.display(),
            if allowed.is_some() {
                " (or under its backups/)"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// Whether `path` (or the nearest of its ancestors that exists) lies in the directory `dir`,
/// by identity (device and inode) rather than by name: the same directory seen through a bind
/// mount has another path and the same identity.
fn within(path: &Path, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(dir) = id(dir) else {
        return false;
    };
    path.ancestors().any(|a| id(a) == Some(dir))
}

/// Where a result given as `path` really lands. A regular file (or a new one) is written under
/// a staging name beside `path` and renamed over it, replacing a symlink there rather than
/// following it: its directory is resolved, not its name. Anything else that exists (a FIFO,
/// `/dev/stdout`, a symlink to one) is written through: resolved whole.
fn where_written(path: &Path) -> Result<PathBuf> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() && !meta.is_dir() => Ok(std::fs::canonicalize(path)?),
        _ => match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => {
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                Ok(canonical_even_if_missing(parent)?.join(name))
            }
            _ => canonical_even_if_missing(path),
        },
    }
}

/// `path` with its existing part resolved (symlinks, `..`) and the rest, still to be created,
/// appended: where a directory created at `path` would really be.
fn canonical_even_if_missing(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut real) => {
                for part in rest.iter().rev() {
                    real.push(part);
                }
                return Ok(real);
            }
            Err(e) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    existing = parent;
                }
                _ => return Err(e.into()),
            },
        }
    }
}

/// An error about the private copy, told about the directory it was taken from.
fn name_source(e: Error, copy: &Path, source: &Path) -> Error {
    let fix = |s: String| {
        s.replace(
            &copy.display().to_string(),
            &format!("{} (read from a private copy)", source.display()),
        )
    };
    match e {
        Error::Storage(s) => Error::Storage(fix(s)),
        Error::Corrupt { offset, reason } => Error::Corrupt {
            offset,
            reason: fix(reason),
        },
        Error::NoLedger { path, why } => Error::NoLedger {
            path: fix(path.display().to_string()).into(),
            why,
        },
        other => other,
    }
}

/// `e` with the file it is about in its message (which file of the copy failed matters: a
/// source file the user may not read is not a full scratch disk).
fn at(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Creates `to` (mode 0600, new) unless the copy was cancelled, then copies `from` into it.
fn copy_file(from: &mut File, to: &Path) -> std::io::Result<()> {
    let mut dst = {
        let cancelled = CANCELLED.lock().unwrap_or_else(|p| p.into_inner());
        if *cancelled {
            return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
        }
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .map_err(|e| at(to, e))?
    };
    std::io::copy(from, &mut dst).map_err(|e| at(to, e))?;
    Ok(())
}

/// Copies a directory tree of plain files (sled's `ledger/`: `db`, `conf`, `snap.*`, `blobs/`),
/// following symlinks (a `blobs/` on another disk), as sled does; a snapshot sled was still
/// generating is left behind (it removes those itself).
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    {
        let cancelled = CANCELLED.lock().unwrap_or_else(|p| p.into_inner());
        if *cancelled {
            return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
        }
        std::fs::create_dir(to).map_err(|e| at(to, e))?;
    }
    for entry in std::fs::read_dir(from).map_err(|e| at(from, e))? {
        let entry = entry.map_err(|e| at(from, e))?;
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".generating") {
            continue;
        }
        let path = entry.path();
        if std::fs::metadata(&path).map_err(|e| at(&path, e))?.is_dir() {
            copy_dir(&path, &to.join(&name))?;
        } else {
            let mut from = File::open(&path).map_err(|e| at(&path, e))?;
            copy_file(&mut from, &to.join(&name))?;
        }
    }
    Ok(())
}
