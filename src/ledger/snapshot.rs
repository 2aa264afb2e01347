//! Projection snapshots: the projection at an offset, so start-up replays only the log's tail.
//!
//! File layout: `ALSNAP` magic, one format-version byte, the bincode body, then SHA-256 of the
//! body. A snapshot is a cache, never a source of truth: one that fails to decode, has another
//! format version or another ledger_id is discarded (logged) and the projection is rebuilt from
//! the log. One whose hash at its offset disagrees with the log (or whose offset is beyond the
//! head) is evidence that the log changed or lost events: the start fails
//! (`Ledger::open`, `SnapshotCheck::Contradicts`).

use crate::domain::{Alarm, Hash};
use crate::store::codec;
use crate::time::Timestamp;
use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use uuid::Uuid;

const MAGIC: &[u8; 6] = b"ALSNAP";
/// Bump when `SnapshotV1` or anything inside it (`Alarm`) changes shape.
pub const SNAPSHOT_FORMAT: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub ledger_id: Uuid,
    pub offset: u64,
    pub head_hash: Hash,
    pub head_at: Timestamp,
    /// Sorted by id, so equal projections give equal bytes.
    pub alarms: Vec<Alarm>,
}

impl Snapshot {
    /// What a snapshot at offset 0 gets wrong about the empty head, if anything. There is no
    /// record to hold it against, but the empty head is known exactly, and start-up takes the
    /// head from the snapshot (a foreign hash every event 1 fails to chain to, a head time new
    /// events are stamped from). The alarms are for the caller to compare.
    pub fn empty_head_mismatch(&self, ledger_id: Uuid) -> Option<&'static str> {
        if self.head_hash != crate::store::chain::genesis(ledger_id) {
            Some("does not have the genesis hash")
        } else if self.head_at != Timestamp(0) {
            Some("has a head time")
        } else {
            None
        }
    }
}

pub fn encode(s: &Snapshot) -> Result<Vec<u8>, String> {
    let body = codec::encode_value(s).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(body.len() + 39);
    out.extend_from_slice(MAGIC);
    out.push(SNAPSHOT_FORMAT);
    out.extend_from_slice(&body);
    out.extend_from_slice(digest(&SHA256, &body).as_ref());
    Ok(out)
}

pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
    if bytes.len() < MAGIC.len() + 1 + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a projection snapshot".into());
    }
    let version = bytes[MAGIC.len()];
    if version != SNAPSHOT_FORMAT {
        return Err(format!(
            "snapshot format {version}, this build reads {SNAPSHOT_FORMAT}"
        ));
    }
    let (body, sum) = bytes[MAGIC.len() + 1..].split_at(bytes.len() - MAGIC.len() - 1 - 32);
    if digest(&SHA256, body).as_ref() != sum {
        return Err("snapshot checksum mismatch".into());
    }
    codec::decode_value(body).map_err(|e| e.to_string())
}

/// Writes atomically: temp file, fsync, rename, fsync the directory.
pub fn save(path: &Path, s: &Snapshot) -> std::io::Result<()> {
    let bytes = encode(s).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `Ok(None)` when there is no snapshot file; `Err(reason)` when there is one we cannot trust.
pub fn load(path: &Path) -> Result<Option<Snapshot>, String> {
    match fs::read(path) {
        Ok(bytes) => decode(&bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}
