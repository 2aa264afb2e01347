//! The data directory: its layout and its lock.
//!
//! ```text
//! <data>/.lock                 flock held by the process that owns the directory
//! <data>/ledger/               sled: the event log + indexes, users, security log
//! <data>/projection.snapshot   projection cache (optional; rebuilt if missing or bad)
//! <data>/jwt_secret            generated HS256 secret (mode 0600) unless configured
//! <data>/backups/<timestamp>/  online backups (each a complete data directory)
//! ```
//!
//! We take our own `flock` before sled opens: a second process (a server or an offline
//! subcommand) then fails at once with a clear message instead of whatever sled reports.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub struct DataDir {
    root: PathBuf,
    /// Held until dropped; a lock goes with its file descriptor. One exclusive lock on
    /// `.lock`, or for a read-only tool (`lock_for_reading`) shared locks on `.lock` and on
    /// sled's `ledger/db`.
    _locks: Vec<File>,
}

impl DataDir {
    /// Creates the directory if needed and takes its exclusive lock (non-blocking).
    pub fn lock(root: &Path) -> Result<DataDir> {
        std::fs::create_dir_all(root).map_err(|e| {
            Error::Other(format!(
                "cannot create data directory {}: {e}",
                root.display()
            ))
        })?;
        let lock = Self::lock_file(root).map_err(|e| {
            Error::Other(format!("cannot open lock file in {}: {e}", root.display()))
        })?;
        Self::locked(root, lock)
    }

    fn lock_file(root: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".lock"))
    }

    fn locked(root: &Path, lock: File) -> Result<DataDir> {
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(Error::Locked {
                path: root.to_path_buf(),
            });
        }
        Ok(DataDir {
            root: root.to_path_buf(),
            _locks: vec![lock],
        })
    }

    /// For a tool that only reads the directory (a private copy, `read_copy`): **shared** locks
    /// taken through read-only descriptors on `.lock` (ours) and `ledger/db` (sled's), which
    /// fail while a server or a writing tool holds either exclusively, and which need no write
    /// access (`flock`): the same on a read-only mount or a directory this user may only read.
    /// Nothing is created in the directory, and read-only tools do not exclude each other.
    pub fn lock_for_reading(root: &Path) -> Result<DataDir> {
        Self::must_exist(root)?;
        let mut locks = Vec::new();
        for path in [root.join(".lock"), root.join("ledger").join("db")] {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::Other(format!("cannot read {}: {e}", path.display()))),
            };
            // SAFETY: flock on a valid, owned file descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
            if rc != 0 {
                return Err(Error::Locked {
                    path: root.to_path_buf(),
                });
            }
            locks.push(file);
        }
        Ok(DataDir {
            root: root.to_path_buf(),
            _locks: locks,
        })
    }

    /// Opens an existing data directory for an offline tool: fails if it does not exist.
    pub fn lock_existing(root: &Path) -> Result<DataDir> {
        Self::must_exist(root)?;
        Self::lock(root)
    }

    fn must_exist(root: &Path) -> Result<()> {
        if !root.join("ledger").is_dir() {
            return Err(Error::Other(format!(
                "{} is not an alarm-ledger data directory (no ledger/ inside)",
                root.display()
            )));
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ledger_dir(&self) -> PathBuf {
        self.root.join("ledger")
    }

    pub fn snapshot_path(&self) -> PathBuf {
        self.root.join("projection.snapshot")
    }

    pub fn backups_dir(&self) -> PathBuf {
        self.root.join("backups")
    }
}
