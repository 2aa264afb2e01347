//! Consistent backups: a logical copy of the log up to a durable head, into a fresh data
//! directory that is itself complete (start a server on it: same ledger_id, head and hash).
//!
//! Copying a running server's directory is not safe (sled's `db`, `snap.*` and `blobs/` change
//! together), so the online backup reads through the log interface while the writer goes on:
//! events up to the head taken at the start are immutable, so the copy is a verified prefix.
//! Users, the security log (up to its head at the start) and the JWT secret file are copied too.

use crate::error::{Error, Result};
use crate::ledger::check_link;
use crate::ledger::datadir::DataDir;
use crate::store::sled_log::{SledLog, SledOptions};
use crate::store::{chain, EventLog, OutcomeKind};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Records (events, command outcomes, users, security-log entries) per batch written to the
/// destination. Small: sled 0.34 keeps several KB of memory per event written in batches of
/// ~1,000 or more (measured: 1M events in 10k-event batches left 9.6 GB resident), while
/// 256-event batches stay bounded. The outcome and security-log copies grow with the ledger's
/// age like the events do, and the online backup runs inside the live server, so they are
/// chunked the same way.
const CHUNK: usize = 256;

/// What a backup copies: the log up to `head`, the users and security-log trees of `db` (the
/// security log up to `security_head`), and the JWT secret file if there is one.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub log: &'a dyn EventLog,
    pub db: &'a sled::Db,
    pub head: u64,
    pub security_head: u64,
    /// The users as they were when `security_head` was taken (`users_snapshot`, under the lock
    /// that keeps a user change and its security-log entry together): an online backup, whose
    /// users could change during the copy, must not hold a change without its entry. `None`:
    /// the users tree as it is at the end of the copy (offline: nothing changes it).
    pub users: Option<&'a [(sled::IVec, sled::IVec)]>,
    pub secret_file: Option<&'a Path>,
    /// Pause after each chunk is written out: `ONLINE_CHUNK_PAUSE` while a writer shares the
    /// disk, zero for an offline copy.
    pub chunk_pause: Duration,
    /// The source's projection snapshot, to be checked against the projection rebuilt from the
    /// copied events at its offset (offline: `serve` and `verify` refuse a directory whose
    /// snapshot disagrees with its log, and a copy with a snapshot rebuilt from the log would
    /// erase that evidence). `None` online: the server's start-up check did this.
    pub expect_snapshot: Option<&'a crate::ledger::snapshot::Snapshot>,
    /// The offline tool's: the copy in progress is removed if the process is stopped by
    /// SIGINT, SIGTERM or SIGHUP (`read_copy::remove_on_signal`), and renamed into place only if
    /// it was not (`read_copy::publish_unless_stopped`). Never the server's (its signals stop
    /// it gracefully).
    pub removed_on_signal: bool,
}

/// The online backup's pause after each chunk written out, which leaves the disk to the live
/// writer's commits in between. Measured with benches/compliance.rs (1M events, 1,000 appends/s,
/// alternating runs): append p99 during the backup 11.0 and 13.0 ms with a 2 ms pause against
/// 17.8 and 18.6 ms without (p50 4.0–4.8 against 6.2–6.5 ms), the backup 43–49 s against
/// 42–45 s: the copy is bound by the disk, so the pauses cost it little.
pub const ONLINE_CHUNK_PAUSE: Duration = Duration::from_millis(2);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    pub path: PathBuf,
    pub head: u64,
    pub head_hash: String,
    /// How long the copy's checkpoint took, or `None` if sled still held the copy's lock after
    /// the wait (the copy is complete either way; its first open then recovers sled's log, as
    /// after a crash).
    pub checkpoint: Option<Duration>,
}

/// sled page cache of the copy being written: it is only written, never read back. Measured
/// with the offline backup of 1M events: peak RSS 1.40 GB with the default 256 MiB, 0.95 GB
/// with 64 MiB in the same time (45 s), 0.78 GB with 16 MiB but 56 s.
const DEST_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// How long the copy's checkpoint waits for sled to release the copy's file lock (its IO
/// threads let go a moment after the last handle is dropped).
const CHECKPOINT_WAIT: Duration = Duration::from_secs(10);

/// Copies `src` (the log's offsets 1..=head and the auxiliary trees of its `db`) into `dest` (a
/// new or empty directory). Each copied event is re-checked against the chain as it goes.
///
/// The copy is written into `<dest>.partial` and renamed to `dest` only once it is complete and
/// durable, so a `dest` that exists is a complete backup: an interrupted one (crash, full disk)
/// never looks like a shorter ledger that verifies. A failed copy removes its `.partial`; one
/// left by a crash must be removed by hand (the next backup to the same name refuses to start).
pub fn backup(src: &Source<'_>, dest: &Path) -> Result<BackupReport> {
    backup_chunked(src, dest, CHUNK)
}

/// [`backup`] writing `chunk` records per batch (a parameter so a test can cross many chunk
/// boundaries with a small ledger).
fn backup_chunked(src: &Source<'_>, dest: &Path, chunk: usize) -> Result<BackupReport> {
    let chunk = chunk.max(1);
    let named = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        Error::Other(format!("{what} {}: {e}", path.display()))
    };
    // A symlink would be replaced by the copy if it dangles, and cannot be renamed over if it
    // points at a directory: the directory itself must be named.
    // (`components` drops a trailing `/`, through which the check would follow the link.)
    let bare = dest.components().as_path();
    if std::fs::symlink_metadata(bare).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::Config(format!(
            "backup destination {} is a symlink: give the directory itself",
            dest.display()
        )));
    }
    let not_empty = dest.exists()
        && std::fs::read_dir(dest)
            .map_err(|e| named("backup destination", dest, &e))?
            .next()
            .is_some();
    if not_empty {
        return Err(Error::Other(format!(
            "backup destination {} exists and is not empty",
            dest.display()
        )));
    }
    let staging = crate::staging::staging_path(dest).ok_or_else(|| {
        Error::Other(format!("backup destination {} has no name", dest.display()))
    })?;
    let parent = crate::staging::parent_dir(&staging);
    std::fs::create_dir_all(&parent).map_err(|e| named("cannot create directory", &parent, &e))?;
    // Created here, new: one that exists is another backup's, running or interrupted.
    match std::fs::create_dir(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::Other(format!(
                "{} exists: an earlier backup to this destination was interrupted (or one is \
                 running); remove it first",
                staging.display()
            )))
        }
        Err(e) => return Err(named("cannot create directory", &staging, &e)),
    }
    if src.removed_on_signal {
        crate::read_copy::remove_on_signal(&staging);
    }
    // A failure of the disk being written names the copy (the source's own damage is reported
    // as `Corrupt`, with its offset).
    // Named: which backup failed (the error itself may be the source's or the copy's).
    let copied = copy_into(src, &staging, chunk).map_err(|e| match e {
        Error::Io(e) => named("backup to", &staging, &format!("failed: {e}")),
        Error::Storage(e) => named(
            "backup to",
            &staging,
            &format!("failed: storage error: {e}"),
        ),
        other => other,
    });
    let (head, head_hash, checkpoint) = match copied {
        Ok(done) => done,
        Err(e) => {
            // Its sled handles are closed: nothing half-written is left to look like a backup.
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    let published = if src.removed_on_signal {
        crate::read_copy::publish_unless_stopped(&staging, dest)
    } else {
        crate::staging::publish(&staging, dest)
    };
    if let Err(e) = published {
        // Not left behind: it would block the next backup to this name.
        let _ = std::fs::remove_dir_all(&staging);
        return Err(Error::Other(format!(
            "cannot rename {} to {} (and sync its directory): {e}",
            staging.display(),
            dest.display()
        )));
    }
    Ok(BackupReport {
        path: dest.to_path_buf(),
        head,
        head_hash,
        checkpoint,
    })
}

/// The copy itself, into `dest`; returns the head and its hash once everything is durable, and
/// how long the copy's checkpoint took (`None`: skipped).
fn copy_into(
    src: &Source<'_>,
    dest: &Path,
    chunk: usize,
) -> Result<(u64, String, Option<Duration>)> {
    let Source {
        log,
        db,
        head,
        security_head,
        users,
        secret_file,
        chunk_pause,
        expect_snapshot,
        removed_on_signal: _,
    } = *src;
    let pause = || {
        if !chunk_pause.is_zero() {
            std::thread::sleep(chunk_pause);
        }
    };
    let info = log.info();
    let dir = DataDir::lock(dest)?;
    let out = SledLog::open_with(
        &dir.ledger_dir(),
        &SledOptions {
            cache_bytes: DEST_CACHE_BYTES,
        },
        Some((info.ledger_id, info.created_at)),
    )?;
    let mut prev = chain::genesis(info.ledger_id);
    // The empty head's time is 0 (`Snapshot::empty_head_mismatch`).
    let mut prev_at = crate::time::Timestamp(0);
    // Rebuilt from the copied events, for the copy's projection snapshot: a restored copy then
    // starts from it instead of replaying its whole log.
    let mut projection = crate::projection::Projection::new();
    let mut next = 1u64;
    let mut events = Vec::with_capacity(chunk);
    // `contiguous` fails on a missing record below the head.
    for item in crate::export::contiguous(log, 1, head) {
        let e = item?;
        check_link(&e, next, &prev, info.ledger_id)?;
        prev = e.hash;
        prev_at = e.at;
        projection.apply(&e);
        if let Some(s) = expect_snapshot.filter(|s| s.offset == e.offset) {
            if projection.alarms_sorted() != s.alarms {
                return Err(Error::Corrupt {
                    offset: s.offset,
                    reason: "the projection snapshot differs from the projection rebuilt from \
                             the log (the log verifies up to this offset: the snapshot is wrong, \
                             or was altered); `verify` says the same, and `serve` refuses it"
                        .into(),
                });
            }
        }
        next += 1;
        events.push(e);
        if events.len() < chunk && next <= head {
            continue;
        }
        // Written out chunk by chunk (sled's flush), made durable once at the end: an
        // fdatasync per chunk queued with the live writer's on the same disk, and a big dirty
        // set left to sled's background flusher made the writer's fdatasync (ext4 journal
        // commit) wait for it. Measured with benches/compliance.rs (append p99 during a 1M
        // backup: 22-27 ms synced per chunk or every 64 chunks, 17-19 ms written out per chunk).
        out.write_unsynced(&events, &[])?;
        out.write_out()?;
        events.clear();
        pause();
    }
    // Outcomes of commands that appended nothing (the appended ones came with their events).
    // Only those decided up to the copied head: later ones may refer to later events, or (a
    // rejection) to a state the copy never had. A rejection's offset is the head it was decided
    // against; those recorded before that was so have 0 and are always copied. Written out
    // chunk by chunk like the events (one sync at the end).
    let mut outcomes = Vec::with_capacity(chunk);
    for item in log.command_index() {
        let (cid, o) = item?;
        if o.kind != OutcomeKind::Appended && o.offset <= head {
            outcomes.push((cid, o));
            if outcomes.len() >= chunk {
                out.write_unsynced(&[], &outcomes)?;
                out.write_out()?;
                outcomes.clear();
                pause();
            }
        }
    }
    if !outcomes.is_empty() {
        out.write_unsynced(&[], &outcomes)?;
        out.write_out()?;
    }
    match users {
        Some(users) => write_tree(
            out.db(),
            crate::auth::users::USERS_TREE,
            users.iter().cloned().map(Ok),
            chunk,
            &pause,
        )?,
        None => copy_tree(
            db,
            out.db(),
            crate::auth::users::USERS_TREE,
            None,
            chunk,
            &pause,
        )?,
    }
    copy_tree(
        db,
        out.db(),
        crate::auth::security_log::SECURITY_LOG_TREE,
        Some(security_head),
        chunk,
        &pause,
    )?;
    out.sync()?;
    // The projection at the copied head, in the snapshot file a server starts from (written
    // durably: temp file, fsync, rename, directory fsync). `verify` checks it against the log.
    crate::ledger::snapshot::save(
        &dir.snapshot_path(),
        &crate::ledger::snapshot::Snapshot {
            ledger_id: info.ledger_id,
            offset: head,
            head_hash: prev,
            head_at: prev_at,
            alarms: projection.into_sorted_alarms(),
        },
    )?;
    if let Some(src) = secret_file.filter(|p| p.exists()) {
        let to = dest.join(crate::auth::token::SECRET_FILE);
        std::fs::copy(src, &to)?;
        std::fs::File::open(&to)?.sync_all()?;
    }
    std::fs::File::open(dest)?.sync_all()?;
    drop(out);
    // The copy is complete and durable. sled writes its page-table snapshot only when it opens
    // a database, so without this the first start on a restored copy would recover sled's
    // whole log (1.4-2 s per million events): one open and close now, as at a server's clean
    // stop (`sled_log::checkpoint`). Best effort: a skipped checkpoint costs only that start.
    // A copy sled cannot open again is not a backup: that fails it (its `.partial` is removed).
    // A lock sled's IO threads hold past the wait only costs the copy's first start (logged).
    let checkpoint = crate::store::sled_log::checkpoint(&dir.ledger_dir(), CHECKPOINT_WAIT)?;
    if checkpoint.is_none() {
        tracing::warn!("backup copy not checkpointed (sled's lock still held); its first start recovers sled's log");
    }
    drop(dir);
    Ok((head, prev.to_hex(), checkpoint))
}

/// The users tree's records, read at once (a few per user): for `Source::users`.
pub fn users_snapshot(db: &sled::Db) -> Result<Vec<(sled::IVec, sled::IVec)>> {
    let tree = db.open_tree(crate::auth::users::USERS_TREE)?;
    let records = tree.iter().collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(records)
}

/// Writes `records` to the tree `name` of `dst`, `chunk` entries per batch, each written out
/// (not synced: the caller syncs once at the end), `pause` called after each full batch.
fn write_tree(
    dst: &sled::Db,
    name: &str,
    records: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    chunk: usize,
    pause: &dyn Fn(),
) -> Result<()> {
    let to = dst.open_tree(name)?;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0usize;
    for kv in records {
        let (k, v) = kv?;
        batch.insert(k, v);
        in_batch += 1;
        if in_batch >= chunk {
            to.apply_batch(std::mem::take(&mut batch))?;
            dst.flush()?;
            in_batch = 0;
            pause();
        }
    }
    if in_batch > 0 {
        to.apply_batch(batch)?;
        dst.flush()?;
    }
    Ok(())
}

/// Copies the tree `name` of `src` into `dst` (`write_tree`); with `upto`, only keys that are
/// big-endian u64 ≤ `upto`.
fn copy_tree(
    src: &sled::Db,
    dst: &sled::Db,
    name: &str,
    upto: Option<u64>,
    chunk: usize,
    pause: &dyn Fn(),
) -> Result<()> {
    let within = |k: &sled::IVec| {
        upto.is_none_or(|limit| {
            <[u8; 8]>::try_from(k.as_ref()).map_or(u64::MAX, u64::from_be_bytes) <= limit
        })
    };
    let records = src
        .open_tree(name)?
        .iter()
        .take_while(|kv| kv.as_ref().map_or(true, |(k, _)| within(k)));
    write_tree(dst, name, records, chunk, pause)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{NewSecurityEntry, SecurityAction, SecurityLog};
    use crate::domain::{AlarmSpec, Event, EventData, Hash, Severity};
    use crate::store::CommandOutcome;
    use crate::time::Timestamp;
    use uuid::Uuid;

    /// Far more outcomes, users and security-log entries than the chunk, and a chunk that does
    /// not divide any of the counts: everything up to the heads is copied, nothing beyond them.
    #[test]
    fn a_backup_copies_every_record_across_many_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let src = SledLog::open(&tmp.path().join("src"), &SledOptions::default()).unwrap();
        let ledger_id = src.info().ledger_id;
        let mut prev = chain::genesis(ledger_id);
        let mut events = Vec::new();
        for offset in 1..=10u64 {
            let mut e = Event {
                offset,
                id: Uuid::now_v7(),
                at: Timestamp(1_000 + offset as i64),
                actor: "test".into(),
                alarm_id: Uuid::now_v7(),
                command_id: (offset % 2 == 0).then(Uuid::now_v7),
                data: EventData::Created(AlarmSpec {
                    name: format!("alarm {offset}"),
                    instrument: String::new(),
                    condition: String::new(),
                    severity: Severity::Low,
                    tags: vec![],
                    owner: "test".into(),
                }),
                hash: Hash::default(),
            };
            e.hash = chain::event_hash(&prev, &e, ledger_id);
            prev = e.hash;
            events.push(e);
        }
        src.append_batch(&events).unwrap();
        let rejected = |i: u64| CommandOutcome {
            offset: 0,
            alarm_id: Uuid::from_u64_pair(0, i),
            kind: OutcomeKind::Rejected {
                code: "not_found".into(),
                message: format!("rejection {i}"),
            },
        };
        let mut outcomes: Vec<(Uuid, CommandOutcome)> =
            (0..11).map(|i| (Uuid::now_v7(), rejected(i))).collect();
        outcomes.push((
            Uuid::now_v7(),
            CommandOutcome {
                offset: 3,
                alarm_id: events[2].alarm_id,
                kind: OutcomeKind::Already,
            },
        ));
        src.append_with_outcomes(&[], &outcomes).unwrap();
        // Decided after the head the backup copies (the online backup's writer goes on).
        let later = (
            Uuid::now_v7(),
            CommandOutcome {
                offset: 11,
                alarm_id: Uuid::now_v7(),
                kind: OutcomeKind::Already,
            },
        );
        src.append_with_outcomes(&[], std::slice::from_ref(&later))
            .unwrap();
        // Refused against a state after the copied head (e.g. an ack of an alarm deleted at 11).
        let later_refusal = (
            Uuid::now_v7(),
            CommandOutcome {
                offset: 11,
                alarm_id: events[3].alarm_id,
                kind: OutcomeKind::Rejected {
                    code: "alarm_deleted".into(),
                    message: "the alarm is deleted".into(),
                },
            },
        );
        src.append_with_outcomes(&[], std::slice::from_ref(&later_refusal))
            .unwrap();
        let users = src.db().open_tree(crate::auth::users::USERS_TREE).unwrap();
        for i in 0..7u8 {
            users.insert([b'u', i], vec![i; 5]).unwrap();
        }
        // The online backup takes the users with the security head; a change after that (with
        // its entry after the head) is not in the copy.
        let users_at_cut = users_snapshot(src.db()).unwrap();
        users.insert([b'u', 99], vec![99; 5]).unwrap();
        let security = SecurityLog::open(src.db(), ledger_id).unwrap();
        for i in 0..12 {
            security
                .append(NewSecurityEntry::new(SecurityAction::BackupCreated).target(format!("{i}")))
                .unwrap();
        }
        let ten = security.iter().nth(9).unwrap().unwrap();

        let dest = tmp.path().join("copy");
        let from = Source {
            log: &src,
            db: src.db(),
            head: 10,
            security_head: 10,
            users: Some(&users_at_cut),
            secret_file: None,
            chunk_pause: Duration::from_micros(10),
            expect_snapshot: None,
            removed_on_signal: false,
        };
        let r = backup_chunked(&from, &dest, 3).unwrap();
        assert_eq!((r.head, r.head_hash.as_str()), (10, prev.to_hex().as_str()));
        // Checkpointed: sled's page-table snapshot is there (without the checkpoint a new copy
        // has none, and its first open would recover sled's whole log).
        assert!(r.checkpoint.is_some(), "the copy is checkpointed");
        let snapshots = std::fs::read_dir(dest.join("ledger"))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("snap.")
            })
            .count();
        assert_eq!(snapshots, 1, "sled's snapshot of the copy");

        // sled lets go of the copy's file lock a moment after the backup closed it.
        let copy = SledLog::open_after_close(&dest.join("ledger"), &SledOptions::default())
            .expect("the copy opens");
        let report = crate::verify::verify_log(&copy, Some(&dest.join("projection.snapshot")))
            .expect("the copy verifies, its projection snapshot too");
        assert_eq!((report.events, report.head), (10, 10));
        assert_eq!(
            report.snapshot_checked,
            Some(10),
            "the copy has a projection snapshot at its head"
        );
        let mut copied: Vec<_> = copy.command_index().map(|o| o.unwrap()).collect();
        let mut expected: Vec<_> = events
            .iter()
            .filter_map(|e| {
                e.command_id.map(|c| {
                    let o = CommandOutcome {
                        offset: e.offset,
                        alarm_id: e.alarm_id,
                        kind: OutcomeKind::Appended,
                    };
                    (c, o)
                })
            })
            .chain(outcomes)
            .collect();
        copied.sort_by_key(|(c, _)| *c);
        expected.sort_by_key(|(c, _)| *c);
        assert_eq!(copied.len(), 5 + 12);
        assert_eq!(
            copied, expected,
            "every outcome up to the head, and no later one"
        );
        let copied_users: Vec<_> = copy
            .db()
            .open_tree(crate::auth::users::USERS_TREE)
            .unwrap()
            .iter()
            .map(|kv| kv.unwrap())
            .collect();
        assert_eq!(users.len(), 8);
        assert_eq!(
            copied_users.len(),
            7,
            "the users at the cut, not the later one"
        );
        assert_eq!(copied_users, users_at_cut);
        let copied_security = SecurityLog::open(copy.db(), ledger_id).unwrap();
        assert_eq!(
            copied_security
                .verify()
                .expect("the copied security log verifies"),
            (10, ten.hash),
            "entries 1..=10: up to the security head, not the two after it"
        );
    }
}
