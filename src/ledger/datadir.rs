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
    /// Held for the life of the process; the lock goes with the file descriptor.
    _lock: File,
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
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".lock"))
            .map_err(|e| {
                Error::Other(format!("cannot open lock file in {}: {e}", root.display()))
            })?;
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(Error::Locked {
                path: root.to_path_buf(),
            });
        }
        Ok(DataDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// Opens an existing data directory for an offline tool: fails if it does not exist.
    pub fn lock_existing(root: &Path) -> Result<DataDir> {
        if !root.join("ledger").is_dir() {
            return Err(Error::Other(format!(
                "{} is not an alarm-ledger data directory (no ledger/ inside)",
                root.display()
            )));
        }
        Self::lock(root)
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
