//! The log and its storage interface.
//!
//! Everything above this module talks to the [`EventLog`] trait only; `sled_log` is the embedded
//! default. `codec` owns the disk encoding (format-version byte + bincode), `chain` the hash chain.

pub mod chain;
pub mod codec;
pub mod sled_log;

use crate::domain::{Event, Hash};
use crate::error::Result;
use crate::time::Timestamp;
use uuid::Uuid;

pub use sled_log::SledLog;

/// The last event of the log, or the empty log's genesis values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub offset: u64,
    pub hash: Hash,
    pub at: Timestamp,
}

/// What a command with a `command_id` produced the first time. Kept for the life of the
/// ledger, so a retry gets the original outcome whatever happened since (PRODUCT.md).
/// Encoded with bincode by position: never reorder fields or variants.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommandOutcome {
    /// The event appended (`Appended`), the event that was already in effect (`Already`), or
    /// the head the refusal was decided against (`Rejected`; 0 in rejections recorded before
    /// 2026-12-07), so that a backup of an earlier head can leave out what was decided after it.
    pub offset: u64,
    pub alarm_id: Uuid,
    pub kind: OutcomeKind,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OutcomeKind {
    /// The command appended the event at `offset`.
    Appended,
    /// Nothing was appended: the command was already in effect since `offset`.
    Already,
    /// The state machine refused it (a domain rejection; never a transient failure).
    Rejected { code: String, message: String },
}

/// Identity of a ledger, fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerInfo {
    pub ledger_id: Uuid,
    pub created_at: Timestamp,
    pub format_version: u8,
}

/// An append-only, gapless event log with two indexes (alarm → offsets, command_id → outcome).
/// All methods block: call them from the writer thread or `spawn_blocking`.
pub trait EventLog: Send + Sync + 'static {
    fn info(&self) -> LedgerInfo;

    /// The last event (offset 0 and the genesis hash when empty).
    fn head(&self) -> Result<Head>;

    /// Appends events with consecutive offsets following the head, with their index entries, in
    /// one atomic batch, and returns only once the batch is on disk (power-loss durable).
    fn append_batch(&self, events: &[Event]) -> Result<()> {
        self.append_with_outcomes(events, &[])
    }

    /// `append_batch` plus the outcomes of commands that appended nothing (`Already`,
    /// `Rejected`), in the same atomic, durable batch. Events' own command_ids are indexed as
    /// `Appended` automatically.
    fn append_with_outcomes(
        &self,
        events: &[Event],
        outcomes: &[(Uuid, CommandOutcome)],
    ) -> Result<()>;

    /// Makes everything written so far durable (used to recover after a failed append).
    fn sync(&self) -> Result<()>;

    /// Why storage can no longer be trusted, once a sync failed: from then on every `sync` and
    /// append fails (a later sync that succeeds would prove nothing about what was written
    /// before it). `None` while storage is healthy.
    fn storage_failure(&self) -> Option<String> {
        None
    }

    /// Up to `max` events with offset ≥ `from`, in order.
    fn read_from(&self, from: u64, max: usize) -> Result<Vec<Event>>;

    /// Streams every event with offset ≥ `from` in order, decoding lazily (constant memory).
    fn iter_from(&self, from: u64) -> Box<dyn Iterator<Item = Result<Event>> + Send + '_>;

    fn event_at(&self, offset: u64) -> Result<Option<Event>>;

    /// Offsets ≥ `from` of one alarm's events, oldest first, read as iterated (constant memory).
    fn alarm_offsets(
        &self,
        alarm_id: Uuid,
        from: u64,
    ) -> Box<dyn Iterator<Item = Result<u64>> + Send + '_>;

    fn command_outcome(&self, command_id: Uuid) -> Result<Option<CommandOutcome>>;

    /// Every indexed command id with its outcome (used by `verify`).
    fn command_index(&self)
        -> Box<dyn Iterator<Item = Result<(Uuid, CommandOutcome)>> + Send + '_>;

    /// Every alarm index entry (used by `verify`).
    fn alarm_index(&self) -> Box<dyn Iterator<Item = Result<(Uuid, u64)>> + Send + '_>;
}

/// Events per chunk handed from the read-ahead thread to the consumer.
const READ_AHEAD_CHUNK: usize = 1024;
/// Chunks in flight between the read-ahead thread and the consumer: memory stays bounded
/// (a few thousand decoded events) whatever the log size.
const READ_AHEAD_DEPTH: usize = 4;

/// Reads the log from `from` to its end on a second thread, decoding records there, while
/// `consume` walks the events in order on this one. A full replay (read + decode, then hash and
/// apply) then costs about the larger of the two halves instead of their sum.
///
/// The iterator yields exactly what `log.iter_from(from)` would, in order: events up to the
/// first read error, then that error. When `consume` returns early, the reader stops at its next
/// chunk.
pub fn read_ahead<T>(
    log: &dyn EventLog,
    from: u64,
    consume: impl FnOnce(&mut dyn Iterator<Item = Result<Event>>) -> T,
) -> Result<T> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Event>>>(READ_AHEAD_DEPTH);
        std::thread::Builder::new()
            .name("ledger-read-ahead".into())
            .spawn_scoped(scope, move || {
                let mut chunk = Vec::with_capacity(READ_AHEAD_CHUNK);
                for item in log.iter_from(from) {
                    match item {
                        Ok(event) => {
                            chunk.push(event);
                            if chunk.len() == READ_AHEAD_CHUNK {
                                let full = std::mem::replace(
                                    &mut chunk,
                                    Vec::with_capacity(READ_AHEAD_CHUNK),
                                );
                                if tx.send(Ok(full)).is_err() {
                                    return; // the consumer stopped
                                }
                            }
                        }
                        Err(e) => {
                            if tx.send(Ok(chunk)).is_ok() {
                                let _ = tx.send(Err(e));
                            }
                            return;
                        }
                    }
                }
                if !chunk.is_empty() {
                    let _ = tx.send(Ok(chunk));
                }
            })
            .map_err(|e| crate::error::Error::Other(format!("cannot start a read thread: {e}")))?;
        let mut events = Chunked {
            rx,
            current: Vec::new().into_iter(),
        };
        let out = consume(&mut events);
        drop(events); // unblocks a reader waiting on a full channel before the scope joins it
        Ok(out)
    })
}

/// The consumer side of `read_ahead`: chunks flattened back into a stream of events.
struct Chunked {
    rx: std::sync::mpsc::Receiver<Result<Vec<Event>>>,
    current: std::vec::IntoIter<Event>,
}

impl Iterator for Chunked {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(e) = self.current.next() {
                return Some(Ok(e));
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => self.current = chunk.into_iter(),
                Ok(Err(e)) => return Some(Err(e)),
                Err(_) => return None, // the reader finished
            }
        }
    }
}
