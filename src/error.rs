//! The crate's one error type for failures (ours or the machine's), as opposed to rejections
//! (the client's fault, `domain::Rejection`). HTTP/WS map both in `http::errors`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage error: {0}")]
    Storage(String),
    #[error("ledger is corrupt at offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error("data directory {} is locked: it is in use by another process (a running server?). Stop that process, or for a copy of a running server use its POST /api/v1/admin/backup", path.display())]
    Locked { path: PathBuf },
    /// A directory opened as an existing ledger where sled found no ledger at all (no records,
    /// no identity): the log was lost or never written. Distinct from `Corrupt` so that callers
    /// can tell "nothing here" from "something damaged here" without reading the message.
    #[error("{} holds no ledger: {why}", path.display())]
    NoLedger { path: PathBuf, why: &'static str },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}
