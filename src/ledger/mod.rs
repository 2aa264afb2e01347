//! The ledger: the log, the projection built from it, the single writer and the live hub.
//!
//! `Ledger::open` verifies and replays the log into the projection (from a snapshot when one is
//! valid); `Ledger::start` spawns the writer thread. Everything the API layer needs goes through
//! `Ledger`: `submit` a command, read the projection, read the log, `subscribe`.

pub mod datadir;
pub mod hub;
pub mod snapshot;
pub mod subscription;
pub mod writer;

use crate::domain::{Alarm, Command, Event, Hash};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::projection::{Projection, StateFilter};
use crate::store::{chain, EventLog, Head, LedgerInfo};
use crate::time::Timestamp;
use hub::Hub;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

pub use subscription::{SubItem, Subscription};
pub use writer::{CommandError, Outcome, WriterHandle};

/// Tunables of the ledger core (validated in `config`).
#[derive(Clone, Debug)]
pub struct LedgerOptions {
    /// Write queue bound; a full queue answers `overloaded`.
    pub queue_capacity: usize,
    /// Most commands decided and made durable in one group commit.
    pub max_batch: usize,
    /// Take a projection snapshot every this many events (0 = only at shutdown).
    pub snapshot_every: u64,
    /// Live broadcast ring size, in batches.
    pub hub_capacity: usize,
    /// Where snapshots go; `None` disables them (tests, tools).
    pub snapshot_path: Option<PathBuf>,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            queue_capacity: 65_536,
            max_batch: 512,
            snapshot_every: 100_000,
            hub_capacity: 1_024,
            snapshot_path: None,
        }
    }
}

/// The read model: projection and head under one lock, so a reader always sees a projection
/// and the head it corresponds to.
#[derive(Debug)]
pub struct ReadModel {
    pub projection: Projection,
    pub head: Head,
}

pub struct Ledger {
    /// The digest of the alarms of the projection snapshot this start loaded (`alarms_digest`),
    /// which `scrub` compares with the alarms it rebuilds from the log prefix: a snapshot's
    /// checksum only proves it was written whole, not that it was written from this log.
    snapshot_digest: Option<[u8; 32]>,
    log: Arc<dyn EventLog>,
    info: LedgerInfo,
    /// std RwLock, not tokio's: held only for in-memory reads/applies, never across an await.
    model: RwLock<ReadModel>,
    /// `model.head`, published on its own by the writer (while it holds the model's write
    /// lock, after the apply): `head()` is called on the event loop's threads by every
    /// subscription step, hello and query, and must not queue behind a writer waiting for the
    /// model while a reader copies every alarm (a snapshot subscribe, a state answer).
    published_head: std::sync::Mutex<Head>,
    hub: Hub,
    pub metrics: Arc<Metrics>,
    writer: std::sync::Mutex<Option<WriterHandle>>,
    tx: std::sync::Mutex<Option<mpsc::Sender<writer::WriterMsg>>>,
    /// Set when storage failed and was not yet recovered: readiness reports it.
    degraded: AtomicBool,
    /// Integrity of the records below the start-up snapshot (checked in the background by
    /// `scrub`): `None` while unchecked or fine, `Some(reason)` once a bad record is found —
    /// appends are then refused and readiness fails.
    integrity: std::sync::Mutex<Option<String>>,
    /// Whether every record below the head has been verified since start.
    verified: AtomicBool,
    /// Set by `stop`: the scrub gives up (a shutdown must not wait for a read of the whole log,
    /// and the shutdown checkpoint waits for its handle on the log).
    stopping: AtomicBool,
    opts: LedgerOptions,
}

/// How the projection was restored at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restore {
    Empty,
    FullReplay { events: u64, reason: Option<String> },
    Snapshot { offset: u64, tail: u64 },
}

impl Ledger {
    /// Opens the ledger over `log`: loads a valid snapshot if any, replays and verifies the tail
    /// (offsets contiguous, every record decodes, every hash chains). Fails with the offset of
    /// the first bad record; never skips one.
    pub fn open(
        log: Arc<dyn EventLog>,
        opts: LedgerOptions,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Ledger>, Restore)> {
        let info = log.info();
        let head = log.head()?;
        let mut reason = None;
        let mut snapshot_digest = None;
        let mut start = (
            Projection::new(),
            chain::genesis(info.ledger_id),
            Timestamp(0),
        );
        if let Some(path) = &opts.snapshot_path {
            match judge_snapshot(log.as_ref(), path, head)? {
                SnapshotVerdict::Absent => {}
                SnapshotVerdict::Usable(s) => {
                    let projection = Projection::from_parts(s.alarms, s.offset);
                    snapshot_digest = Some(alarms_digest(&projection));
                    start = (projection, s.head_hash, s.head_at)
                }
                SnapshotVerdict::Discarded(why) => {
                    tracing::warn!(snapshot = %path.display(), reason = %why, "projection snapshot discarded; rebuilding from the log");
                    reason = Some(why);
                }
            }
        }
        let (mut projection, mut prev, mut last_at) = start;
        let from = projection.offset();
        let mut expected = from + 1;
        // Reading and decoding on a second thread while this one hashes and applies: a full
        // replay of 1M events costs about the larger half rather than both.
        crate::store::read_ahead(log.as_ref(), expected, |events| -> Result<()> {
            for item in events {
                let event = item.map_err(|e| unreadable_at(expected, e))?;
                check_link(&event, expected, &prev, info.ledger_id)?;
                prev = event.hash;
                last_at = event.at;
                projection.apply(&event);
                expected += 1;
            }
            Ok(())
        })??;
        let replayed = expected - 1 - from;
        if expected - 1 != head.offset {
            return Err(Error::Corrupt {
                offset: expected,
                reason: format!(
                    "log head is {} but replay ended at {}",
                    head.offset,
                    expected - 1
                ),
            });
        }
        let restore = if head.offset == 0 {
            Restore::Empty
        } else if from > 0 {
            Restore::Snapshot {
                offset: from,
                tail: replayed,
            }
        } else {
            Restore::FullReplay {
                events: replayed,
                reason,
            }
        };
        metrics.head_offset.set(head.offset as i64);
        let head = Head {
            offset: head.offset,
            hash: prev,
            at: last_at,
        };
        let hub = Hub::new(opts.hub_capacity);
        let ledger = Arc::new(Ledger {
            log,
            info,
            model: RwLock::new(ReadModel { projection, head }),
            published_head: std::sync::Mutex::new(head),
            hub,
            metrics,
            writer: std::sync::Mutex::new(None),
            tx: std::sync::Mutex::new(None),
            degraded: AtomicBool::new(false),
            integrity: std::sync::Mutex::new(None),
            // A full replay verified everything; a snapshot start leaves the prefix to `scrub`.
            verified: AtomicBool::new(from == 0),
            snapshot_digest,
            stopping: AtomicBool::new(false),
            opts,
        });
        Ok((ledger, restore))
    }

    /// Spawns the single writer thread. Commands submitted before `start` get `ShuttingDown`.
    pub fn start(self: &Arc<Self>) -> Result<()> {
        let (tx, rx) = mpsc::channel(self.opts.queue_capacity.max(1));
        let handle = writer::spawn(self.clone(), rx)?;
        *lock(&self.tx) = Some(tx);
        *lock(&self.writer) = Some(handle);
        Ok(())
    }

    /// Stops the writer after it has finished every queued command, writes a final snapshot,
    /// and waits for it (blocking: call from a blocking context).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let tx = lock(&self.tx).take();
        if let Some(tx) = tx {
            // The writer drains everything queued before this message.
            let _ = tx.blocking_send(writer::WriterMsg::Stop);
        }
        let handle = lock(&self.writer).take();
        if let Some(h) = handle {
            h.join();
        }
    }

    pub fn info(&self) -> LedgerInfo {
        self.info
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn options(&self) -> &LedgerOptions {
        &self.opts
    }

    /// Storage failed: a failed append, a sync that failed anywhere (a security-log entry's
    /// included), or a writer that died. Appends are refused for the life of the process.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed) || self.log.storage_failure().is_some()
    }

    /// The writer thread ended by a panic: the health checks fail, so that the orchestrator
    /// restarts the server (commands get `internal`: see `enqueue`).
    pub(crate) fn mark_writer_died(&self) {
        self.set_degraded(true);
    }

    pub(crate) fn set_degraded(&self, v: bool) {
        self.degraded.store(v, Ordering::Relaxed);
    }

    /// Why the ledger failed its integrity check, if it did.
    pub fn integrity_failure(&self) -> Option<String> {
        lock(&self.integrity).clone()
    }

    /// Whether every record up to the head has been verified since start.
    pub fn is_verified(&self) -> bool {
        self.verified.load(Ordering::Relaxed)
    }

    /// Verifies the records a snapshot start skipped (offsets 1..=`upto`: contiguous, decoding,
    /// chaining to the snapshot's hash), and that the state they give is the snapshot's. Blocking; run it in the background after start so a
    /// large ledger starts in milliseconds and is still fully checked. On failure the ledger
    /// refuses appends and readiness fails, naming the offset. Returns `Ok(false)` when `stop`
    /// interrupted it (nothing found so far, nothing concluded).
    pub fn scrub(&self, upto: u64) -> Result<bool> {
        let ledger_id = self.info.ledger_id;
        let mut prev = chain::genesis(ledger_id);
        let mut expected = 1u64;
        let result = (|| -> Result<bool> {
            // `contiguous` fails on a missing record, below `upto` or at its end.
            let mut rebuilt = Projection::new();
            for item in crate::export::contiguous(self.log.as_ref(), 1, upto) {
                let e = item.map_err(|e| unreadable_at(expected, e))?;
                if e.offset % 4096 == 1 && self.stopping.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                check_link(&e, expected, &prev, ledger_id)?;
                rebuilt.apply(&e);
                prev = e.hash;
                expected += 1;
            }
            // The state the server started from is the one the log gives at that offset.
            if let Some(loaded) = self.snapshot_digest {
                if alarms_digest(&rebuilt) != loaded {
                    return Err(Error::Corrupt {
                        offset: upto,
                        reason: "the projection snapshot this start loaded disagrees with the \
                                 state the log gives at its offset (the log itself verifies): \
                                 stop, delete projection.snapshot and start again (a full replay)"
                            .into(),
                    });
                }
            }
            Ok(true)
        })();
        match &result {
            Ok(true) => self.verified.store(true, Ordering::Relaxed),
            Ok(false) => tracing::info!(
                checked = expected - 1,
                "integrity check of the snapshot prefix interrupted by shutdown"
            ),
            Err(e) => {
                tracing::error!(error = %e, "integrity check failed: appends refused until the data directory is repaired (alarm-ledger verify names the offset)");
                *lock(&self.integrity) = Some(format!("ledger integrity check failed: {e}"));
            }
        }
        result
    }

    /// The durable head as published (never ahead of what readers may see).
    pub fn head(&self) -> Head {
        *lock(&self.published_head)
    }

    /// Publishes the head the writer just applied (see `published_head`).
    pub(crate) fn publish_head(&self, head: Head) {
        *lock(&self.published_head) = head;
    }

    pub fn read_model(&self) -> std::sync::RwLockReadGuard<'_, ReadModel> {
        self.model.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write_model(&self) -> std::sync::RwLockWriteGuard<'_, ReadModel> {
        self.model.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a command for the writer and waits for its durable outcome. A full queue answers
    /// `Overloaded` at once rather than buffering without bound.
    pub async fn submit(&self, cmd: Command) -> Result<Outcome, CommandError> {
        Self::outcome(self.enqueue(cmd)?).await
    }

    /// Waits for the outcome of an `enqueue`d command; a reply dropped by a failed writer is
    /// `Unanswered` (the command may or may not have been applied).
    pub async fn outcome(
        queued: oneshot::Receiver<Result<Outcome, CommandError>>,
    ) -> Result<Outcome, CommandError> {
        queued.await.unwrap_or(Err(CommandError::Unanswered))
    }

    /// Queues a command now (synchronously: commands enqueued one after the other are decided
    /// in that order) and returns where its durable outcome will arrive.
    pub fn enqueue(
        &self,
        cmd: Command,
    ) -> Result<oneshot::Receiver<Result<Outcome, CommandError>>, CommandError> {
        let (reply, rx) = oneshot::channel();
        let tx = lock(&self.tx).clone().ok_or(CommandError::ShuttingDown)?;
        let has_command_id = cmd.command_id.is_some();
        let msg = writer::WriterMsg::Command(writer::WriteRequest {
            cmd,
            reply,
            enqueued: std::time::Instant::now(),
        });
        tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => CommandError::Overloaded,
            // The queue closed while no stop was asked for: the writer thread died (its
            // panic watch may not have run yet; it marks the ledger failed as it unwinds).
            mpsc::error::TrySendError::Closed(_) if !self.stopping.load(Ordering::Relaxed) => {
                writer::refused(
                    has_command_id,
                    "the ledger writer stopped on an internal error: appends are refused until \
                     the server is restarted"
                        .into(),
                )
            }
            mpsc::error::TrySendError::Closed(_) => CommandError::ShuttingDown,
        })?;
        Ok(rx)
    }

    /// Current alarm, if known (deleted alarms included).
    pub fn alarm(&self, id: &Uuid) -> Option<Alarm> {
        self.read_model().projection.get(id).cloned()
    }

    /// Current alarms and the offset they are as of.
    pub fn alarms(&self, filter: StateFilter) -> (u64, Vec<Alarm>) {
        let m = self.read_model();
        (
            m.head.offset,
            m.projection.list(filter).into_iter().cloned().collect(),
        )
    }

    /// The state after every event with offset ≤ `offset`, replayed from the log (blocking).
    pub fn projection_as_of(&self, offset: u64) -> Result<Projection> {
        crate::export::state_as_of(self.log.as_ref(), offset.min(self.head().offset))
    }

    /// The offset of the last event with `at` ≤ `t` (0 if none).
    pub fn offset_at_time(&self, t: Timestamp) -> Result<u64> {
        crate::export::offset_at_time(self.log.as_ref(), self.head().offset, t)
    }

    /// A live subscription delivering every event with offset > `from`.
    pub fn subscribe(self: &Arc<Self>, from: u64) -> Subscription {
        Subscription::new(self.clone(), from)
    }

    /// The current state plus a subscription continuing exactly after it.
    pub fn subscribe_with_snapshot(self: &Arc<Self>) -> (u64, Vec<Alarm>, Subscription) {
        // Receiver first, then the state: every batch applied after the state was read is
        // still in the receiver; batches at or below the offset are skipped.
        let rx = self.hub.subscribe();
        let (offset, alarms) = self.alarms(StateFilter::Current);
        let sub = Subscription::with_receiver(self.clone(), offset, rx);
        (offset, alarms, sub)
    }

    /// Hash of the event at `offset` as stored (for `from_hash` checks).
    pub fn hash_at(&self, offset: u64) -> Result<Option<Hash>> {
        if offset == 0 {
            return Ok(Some(chain::genesis(self.info.ledger_id)));
        }
        if offset > self.head().offset {
            return Ok(None);
        }
        Ok(self.log.event_at(offset)?.map(|e| e.hash))
    }

    /// Writes a snapshot of the current projection now (blocking).
    pub fn write_snapshot(&self) -> Result<()> {
        let Some(path) = &self.opts.snapshot_path else {
            return Ok(());
        };
        let snap = {
            let m = self.read_model();
            snapshot::Snapshot {
                ledger_id: self.info.ledger_id,
                offset: m.head.offset,
                head_hash: m.head.hash,
                head_at: m.head.at,
                alarms: m.projection.alarms_sorted(),
            }
        };
        snapshot::save(path, &snap)?;
        self.metrics.snapshots_written.inc();
        Ok(())
    }
}

/// Checks that `event` is the one expected at `expected` after `prev`.
/// A read of the log that failed where the record at `expected` was due, named by that offset
/// (sled's own errors name a file position, which tells an operator nothing): a `Corrupt`
/// already naming its offset is kept.
pub fn unreadable_at(expected: u64, e: Error) -> Error {
    match e {
        e @ Error::Corrupt { .. } => e,
        other => Error::Corrupt {
            offset: expected,
            reason: format!("the record cannot be read: {other}"),
        },
    }
}

pub fn check_link(event: &Event, expected: u64, prev: &Hash, ledger_id: Uuid) -> Result<()> {
    if event.offset != expected {
        return Err(Error::Corrupt {
            offset: expected,
            reason: format!("gap: next record has offset {}", event.offset),
        });
    }
    let h = chain::event_hash(prev, event, ledger_id);
    if h != event.hash {
        return Err(Error::Corrupt {
            offset: event.offset,
            reason: format!(
                "hash mismatch: stored {}, computed {}",
                event.hash.to_hex(),
                h.to_hex()
            ),
        });
    }
    Ok(())
}

/// What start-up makes of the projection snapshot at `path`.
pub enum SnapshotVerdict {
    Absent,
    /// This ledger's, and the log holds the event it names: the projection starts from it.
    Usable(snapshot::Snapshot),
    /// Unreadable, of another format or ledger, or inconsistent in itself: a cache that is of no
    /// use, discarded (the projection is rebuilt from the log). Why, for the log.
    Discarded(String),
}

/// Judges the projection snapshot at `path` against `log` (whose head is `head`) as start-up
/// does. `Err(Error::Corrupt)` when it is this ledger's and the log no longer holds what it saw
/// (a shorter log, another event at its offset): evidence that acknowledged events were lost or
/// rewritten, which `serve`, `verify` and the offline `backup` all refuse to pass over.
pub fn judge_snapshot(log: &dyn EventLog, path: &Path, head: Head) -> Result<SnapshotVerdict> {
    let s = match snapshot::load(path) {
        Ok(None) => return Ok(SnapshotVerdict::Absent),
        Ok(Some(s)) => s,
        Err(why) => return Ok(SnapshotVerdict::Discarded(why)),
    };
    match validate_snapshot(log, &s, log.info().ledger_id, head) {
        Ok(()) => Ok(SnapshotVerdict::Usable(s)),
        Err(SnapshotCheck::Untrusted(why)) => Ok(SnapshotVerdict::Discarded(why)),
        Err(SnapshotCheck::Contradicts(why)) => Err(Error::Corrupt {
            offset: s.offset,
            reason: format!(
                "{why}: the log lost or rewrote events since the snapshot {} was taken. \
                 Restore from a backup; or, if this log was restored from an older \
                 copy on purpose, delete the snapshot and start again",
                path.display()
            ),
        }),
    }
}

fn validate_snapshot(
    log: &dyn EventLog,
    s: &snapshot::Snapshot,
    ledger_id: Uuid,
    head: Head,
) -> std::result::Result<(), SnapshotCheck> {
    if s.ledger_id != ledger_id {
        return Err(SnapshotCheck::Untrusted(format!(
            "snapshot is of ledger {}",
            s.ledger_id
        )));
    }
    if s.offset > head.offset {
        return Err(SnapshotCheck::Contradicts(format!(
            "snapshot offset {} is beyond the log head {}",
            s.offset, head.offset
        )));
    }
    if s.offset == 0 {
        // It would be the starting point of the replay: exactly the empty head, and no alarms
        // (none that an event created).
        if let Some(why) = s.empty_head_mismatch(ledger_id) {
            return Err(SnapshotCheck::Untrusted(format!(
                "snapshot at offset 0 {why}"
            )));
        }
        if !s.alarms.is_empty() {
            return Err(SnapshotCheck::Untrusted(format!(
                "snapshot at offset 0 holds {} alarms",
                s.alarms.len()
            )));
        }
        return Ok(());
    }
    match log.event_at(s.offset) {
        Ok(Some(e)) if e.hash == s.head_hash && e.at == s.head_at => Ok(()),
        // The log holds what the snapshot saw, but the snapshot's head time is not that
        // event's (start-up would stamp new events from it): the snapshot is wrong, not the log.
        Ok(Some(e)) if e.hash == s.head_hash => Err(SnapshotCheck::Untrusted(format!(
            "snapshot head time at offset {} disagrees with the log",
            s.offset
        ))),
        Ok(Some(_)) => Err(SnapshotCheck::Contradicts(format!(
            "snapshot hash at offset {} disagrees with the log",
            s.offset
        ))),
        Ok(None) => Err(SnapshotCheck::Contradicts(format!(
            "no log record at snapshot offset {}",
            s.offset
        ))),
        Err(e) => Err(SnapshotCheck::Untrusted(e.to_string())),
    }
}

/// Why a decoded snapshot of the right format is not used.
enum SnapshotCheck {
    /// Not this ledger's, or unreadable against the log: discarded, the projection is rebuilt.
    Untrusted(String),
    /// This ledger's snapshot, and the log no longer holds what it saw (a shorter log, or
    /// another event at its offset): evidence of lost or rewritten events, so start-up fails
    /// rather than serve a history that silently changed.
    Contradicts(String),
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// SHA-256 of a projection's alarms (sorted by id, bincode): what `scrub` compares.
fn alarms_digest(p: &Projection) -> [u8; 32] {
    let bytes = crate::store::codec::encode_value(&p.alarms_sorted()).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed read where offset 7 was due is named by that offset; a `Corrupt` that already
    /// names one keeps it.
    #[test]
    fn an_unreadable_record_is_named_by_its_offset() {
        let sled_says = Error::Storage("IO error: failed to fill whole buffer".into());
        match unreadable_at(7, sled_says) {
            Error::Corrupt { offset, reason } => {
                assert_eq!(offset, 7);
                assert!(reason.contains("failed to fill whole buffer"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let named = Error::Corrupt {
            offset: 3,
            reason: "hash mismatch".into(),
        };
        assert!(matches!(
            unreadable_at(7, named),
            Error::Corrupt { offset: 3, .. }
        ));
    }
}
