//! The ledger core on real sled directories: restarts, projection snapshots, corruption, the
//! data directory lock, time and offsets under concurrency, group commit and back-pressure.
//!
//! Corruption is made the way it would happen on disk: the sled tree is opened directly and one
//! record's value is rewritten (one byte flipped inside a string, the version byte changed) or
//! removed. `Ledger::open` must then refuse to start, naming the offset; it never skips a record.

use alarm_ledger::domain::{AlarmSpec, Command, CommandKind, Event, EventData, Severity};
use alarm_ledger::error::Error;
use alarm_ledger::ledger::datadir::DataDir;
use alarm_ledger::ledger::snapshot::{self, SNAPSHOT_FORMAT};
use alarm_ledger::ledger::{CommandError, Ledger, LedgerOptions, Outcome, Restore};
use alarm_ledger::metrics::Metrics;
use alarm_ledger::projection::Projection;
use alarm_ledger::store::{chain, EventLog, Head, SledLog};
use alarm_ledger::time::Timestamp;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

// ------------------------------------------------------------------ helpers

fn opts(snapshot: Option<PathBuf>) -> LedgerOptions {
    LedgerOptions {
        queue_capacity: 1_024,
        max_batch: 256,
        snapshot_every: 0,
        hub_capacity: 64,
        snapshot_path: snapshot,
    }
}

fn ledger_dir(root: &Path) -> PathBuf {
    root.join("ledger")
}

fn snap_path(root: &Path) -> PathBuf {
    root.join("projection.snapshot")
}

fn try_open(root: &Path, o: LedgerOptions) -> alarm_ledger::error::Result<(Arc<Ledger>, Restore)> {
    let log = SledLog::open_after_close(&ledger_dir(root), &Default::default())?;
    Ledger::open(Arc::new(log), o, Arc::new(Metrics::new()))
}

fn open(root: &Path, snapshot: bool) -> (Arc<Ledger>, Restore) {
    let s = snapshot.then(|| snap_path(root));
    try_open(root, opts(s)).expect("ledger opens")
}

fn create(id: Uuid, actor: &str, name: &str) -> Command {
    Command {
        alarm_id: id,
        kind: CommandKind::Create(AlarmSpec {
            name: name.into(),
            instrument: "AAPL".into(),
            condition: "PX_LAST > 200".into(),
            severity: Severity::High,
            tags: vec!["eq".into()],
            owner: actor.into(),
        }),
        actor: actor.into(),
        command_id: Some(Uuid::new_v4()),
        expected_version: None,
    }
}

fn act(id: Uuid, actor: &str, kind: CommandKind) -> Command {
    Command {
        alarm_id: id,
        kind,
        actor: actor.into(),
        command_id: Some(Uuid::new_v4()),
        expected_version: None,
    }
}

fn trigger(id: Uuid, actor: &str) -> Command {
    act(
        id,
        actor,
        CommandKind::Trigger {
            value: Some("201.5".into()),
            message: Some("crossed".into()),
        },
    )
}

fn ack(id: Uuid, actor: &str) -> Command {
    act(
        id,
        actor,
        CommandKind::Ack {
            comment: Some("seen".into()),
        },
    )
}

fn rearm(id: Uuid, actor: &str) -> Command {
    act(id, actor, CommandKind::Rearm)
}

/// The command of step `i` of one alarm's endless create → (trigger → ack → rearm)* cycle.
fn cycle(id: Uuid, actor: &str, i: usize) -> Command {
    match i {
        0 => create(id, actor, "cycle"),
        i => match (i - 1) % 3 {
            0 => trigger(id, actor),
            1 => ack(id, actor),
            _ => rearm(id, actor),
        },
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Appends `n` events over a few alarms (every step appends), one command at a time.
fn fill(ledger: &Arc<Ledger>, rt: &tokio::runtime::Runtime, n: usize, actor: &str) -> Vec<u64> {
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut offsets = Vec::new();
    for i in 0..n {
        let id = ids[i % ids.len()];
        let cmd = cycle(id, actor, i / ids.len());
        let o = rt.block_on(ledger.submit(cmd)).expect("command succeeds");
        assert!(!o.already && !o.duplicate);
        offsets.push(o.offset);
    }
    offsets
}

/// A ledger with `n` events, stopped (final snapshot written), and what it looked like.
fn build(root: &Path, n: usize, actor: &str) -> (Head, Projection) {
    let rt = rt();
    let (ledger, _) = open(root, true);
    ledger.start().expect("writer");
    fill(&ledger, &rt, n, actor);
    ledger.stop();
    let head = ledger.head();
    let projection = ledger.read_model().projection.clone();
    (head, projection)
}

fn event_key(offset: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&offset.to_be_bytes());
    k
}

/// Opens the ledger's sled tree directly (no ledger code) and edits one record.
fn edit_record(root: &Path, offset: u64, f: impl FnOnce(Option<Vec<u8>>) -> Option<Vec<u8>>) {
    // The ledger was closed a moment ago: sled may still hold its lock.
    let db = alarm_ledger::store::sled_log::open_db_after_close(&ledger_dir(root))
        .expect("sled opens directly");
    let tree = db.open_tree("ledger").expect("tree");
    let key = event_key(offset);
    let old = tree.get(key).expect("get").map(|v| v.to_vec());
    match f(old) {
        Some(v) => tree.insert(key, v).expect("insert"),
        None => tree.remove(key).expect("remove"),
    };
    db.flush().expect("flush");
}

/// Flips one bit of the first byte of `needle` inside the record at `offset`.
fn flip_in_string(root: &Path, offset: u64, needle: &[u8]) {
    edit_record(root, offset, |v| {
        let mut v = v.expect("record exists");
        let at = v
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("the string is in the record");
        v[at] ^= 0x01;
        Some(v)
    });
}

fn corrupt_at(r: alarm_ledger::error::Result<(Arc<Ledger>, Restore)>) -> (u64, String) {
    match r {
        Err(Error::Corrupt { offset, reason }) => (offset, reason),
        Err(e) => panic!("expected Error::Corrupt, got {e}"),
        Ok((_, restore)) => panic!("expected Error::Corrupt, the ledger opened ({restore:?})"),
    }
}

// ------------------------------------------------------------------ restarts and snapshots

#[test]
fn reopen_keeps_head_hash_and_projection() {
    let tmp = tempfile::tempdir().unwrap();
    let (head, projection) = build(tmp.path(), 30, "alice");
    assert_eq!(head.offset, 30);
    assert_ne!(head.hash, chain::genesis(Uuid::nil()));

    // The final snapshot is used: nothing to replay.
    let (l, restore) = open(tmp.path(), true);
    assert_eq!(
        restore,
        Restore::Snapshot {
            offset: 30,
            tail: 0
        }
    );
    assert_eq!(l.head(), head);
    assert_eq!(l.read_model().projection, projection);
    let id = l.info().ledger_id;
    drop(l);

    // Without the snapshot: the same from the log alone.
    let (l, restore) = open(tmp.path(), false);
    assert_eq!(
        restore,
        Restore::FullReplay {
            events: 30,
            reason: None
        }
    );
    assert_eq!(l.head(), head);
    assert_eq!(l.read_model().projection, projection);
    assert_eq!(l.info().ledger_id, id, "ledger_id is fixed at creation");

    // And the writer continues right after the head.
    let rt = rt();
    l.start().unwrap();
    let alarm = Uuid::now_v7();
    let o = rt.block_on(l.submit(create(alarm, "bob", "next"))).unwrap();
    assert_eq!(o.offset, 31);
    let e = l.log().event_at(31).unwrap().unwrap();
    assert_eq!(
        e.hash,
        chain::event_hash(&head.hash, &e, id),
        "the chain continues from the stored head"
    );
    l.stop();
}

#[test]
fn an_older_snapshot_is_used_with_the_log_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rt = rt();
    let (ledger, _) = open(root, true);
    ledger.start().unwrap();
    fill(&ledger, &rt, 12, "alice");
    ledger.write_snapshot().unwrap();
    let older = std::fs::read(snap_path(root)).unwrap();
    fill(&ledger, &rt, 9, "bob");
    ledger.stop();
    let (head, projection) = (ledger.head(), ledger.read_model().projection.clone());
    drop(ledger);
    std::fs::write(snap_path(root), older).unwrap();

    let (l, restore) = open(root, true);
    assert_eq!(
        restore,
        Restore::Snapshot {
            offset: 12,
            tail: 9
        }
    );
    assert_eq!(l.head(), head);
    assert_eq!(l.read_model().projection, projection);
}

#[test]
fn untrusted_snapshots_are_discarded_and_the_projection_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (head, projection) = build(root, 20, "alice");
    let good = std::fs::read(snap_path(root)).unwrap();
    let decoded = snapshot::decode(&good).unwrap();
    assert_eq!(decoded.offset, 20);

    // A snapshot of another ledger (same shape, different ledger_id and history).
    let other = tempfile::tempdir().unwrap();
    build(other.path(), 20, "alice");
    let foreign = std::fs::read(snap_path(other.path())).unwrap();

    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    cases.push(("one byte flipped", flipped, "checksum mismatch"));
    let mut version = good.clone();
    version[6] = SNAPSHOT_FORMAT + 1;
    cases.push(("format version", version, "snapshot format"));
    cases.push((
        "truncated",
        good[..good.len() - 10].to_vec(),
        "checksum mismatch",
    ));
    cases.push((
        "not a snapshot",
        b"hello, world".repeat(8),
        "not a projection",
    ));
    cases.push(("another ledger", foreign, "snapshot is of ledger"));
    // Right history, wrong head time: start-up would stamp new events from it.
    let mut late = decoded.clone();
    late.head_at = Timestamp(late.head_at.0 + 86_400_000);
    cases.push((
        "head time",
        snapshot::encode(&late).unwrap(),
        "head time at offset 20 disagrees",
    ));
    for (what, bytes, why) in cases {
        std::fs::write(snap_path(root), &bytes).unwrap();
        let (l, restore) = open(root, true);
        match &restore {
            Restore::FullReplay {
                events: 20,
                reason: Some(r),
            } => assert!(r.contains(why), "{what}: reason {r:?} should say {why:?}"),
            other => panic!("{what}: expected a full replay with a reason, got {other:?}"),
        }
        assert_eq!(l.head(), head, "{what}");
        assert_eq!(l.read_model().projection, projection, "{what}");
    }
}

/// A snapshot at offset 0 has no record to be checked against, so it must be exactly the empty
/// head; otherwise its hash, head time or alarms would be the replay's starting point.
#[test]
fn a_snapshot_at_offset_0_that_is_not_the_empty_head_is_discarded() {
    let other = tempfile::tempdir().unwrap();
    let (other_head, other_projection) = build(other.path(), 6, "mallory");
    let bad = |id: Uuid| {
        let empty = snapshot::Snapshot {
            ledger_id: id,
            offset: 0,
            head_hash: chain::genesis(id),
            head_at: Timestamp(0),
            alarms: vec![],
        };
        vec![
            (
                "foreign hash",
                snapshot::Snapshot {
                    head_hash: other_head.hash,
                    ..empty.clone()
                },
                "genesis hash",
            ),
            (
                "head time",
                snapshot::Snapshot {
                    head_at: Timestamp(Timestamp::now().0 + 86_400_000),
                    ..empty.clone()
                },
                "head time",
            ),
            (
                "alarms",
                snapshot::Snapshot {
                    alarms: other_projection.alarms_sorted(),
                    ..empty
                },
                "alarms",
            ),
        ]
    };
    let rt = rt();

    // An empty ledger: opens at the genesis head, and the first event chains from it.
    for case in 0..3 {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let (l, _) = open(root, false);
        let id = l.info().ledger_id;
        drop(l);
        let (what, snap, _) = bad(id).swap_remove(case);
        std::fs::write(snap_path(root), snapshot::encode(&snap).unwrap()).unwrap();
        let (l, restore) = open(root, true);
        assert_eq!(restore, Restore::Empty, "{what}");
        let genesis = Head {
            offset: 0,
            hash: chain::genesis(id),
            at: Timestamp(0),
        };
        assert_eq!(l.head(), genesis, "{what}");
        assert!(
            l.read_model().projection.alarms_sorted().is_empty(),
            "{what}"
        );
        l.start().unwrap();
        let before = Timestamp::now();
        let o = rt
            .block_on(l.submit(create(Uuid::now_v7(), "alice", "first")))
            .unwrap();
        l.stop();
        assert_eq!(o.offset, 1, "{what}");
        let e = l.log().event_at(1).unwrap().unwrap();
        assert_eq!(e.hash, chain::event_hash(&genesis.hash, &e, id), "{what}");
        assert!(
            e.at.0 < before.0 + 60_000,
            "{what}: stamped now, not from the snapshot"
        );
        alarm_ledger::verify::verify_log(l.log().as_ref(), Some(&snap_path(root)))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    // A ledger with events: the snapshot is discarded with its reason and the log replayed.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (head, projection) = build(root, 9, "alice");
    let id = open(root, false).0.info().ledger_id;
    for (what, snap, why) in bad(id) {
        std::fs::write(snap_path(root), snapshot::encode(&snap).unwrap()).unwrap();
        let (l, restore) = open(root, true);
        match &restore {
            Restore::FullReplay {
                events: 9,
                reason: Some(r),
            } => assert!(r.contains(why), "{what}: reason {r:?} should say {why:?}"),
            other => panic!("{what}: expected a full replay with a reason, got {other:?}"),
        }
        assert_eq!(l.head(), head, "{what}");
        assert_eq!(l.read_model().projection, projection, "{what}");
        // verify judges it as start-up does: discarded (reported, with the reason), the log
        // verified.
        let report = alarm_ledger::verify::verify_log(l.log().as_ref(), Some(&snap_path(root)))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let r = report.snapshot_discarded.expect("reported");
        assert!(r.contains(why), "{what}: {r}");
    }
}

#[test]
fn a_snapshot_the_log_contradicts_fails_start_up() {
    // The snapshot saw a history the log no longer holds: a shorter log (its tail lost, or an
    // older copy of ledger/ put back) or another event at its offset. Rebuilding quietly would
    // serve the changed history as if nothing happened.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 20, "alice");
    let good = std::fs::read(snap_path(root)).unwrap();
    let decoded = snapshot::decode(&good).unwrap();

    let mut forged = decoded.clone();
    forged.head_hash.0[0] ^= 0xff;
    forged.alarms.clear();
    let mut beyond = decoded.clone();
    beyond.offset = 25;
    for (what, snap, why) in [
        ("hash disagrees", forged, "disagrees with the log"),
        ("beyond the head", beyond, "beyond the log head 20"),
    ] {
        std::fs::write(snap_path(root), snapshot::encode(&snap).unwrap()).unwrap();
        let (offset, reason) = corrupt_at(try_open(root, opts(Some(snap_path(root)))));
        assert_eq!(offset, snap.offset, "{what}");
        assert!(reason.contains(why), "{what}: {reason}");
        assert!(
            reason.contains("delete the snapshot"),
            "{what}: says what to do: {reason}"
        );
    }
    // Without the snapshot the log itself is intact and opens.
    std::fs::remove_file(snap_path(root)).unwrap();
    let (l, _) = open(root, true);
    assert_eq!(l.head().offset, 20);
}

// ------------------------------------------------------------------ corruption

#[test]
fn a_flipped_byte_in_a_record_fails_open_naming_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 10, "tamper-target");
    flip_in_string(root, 6, b"tamper-target");

    // From the log alone: the chain breaks exactly there.
    let (offset, reason) = corrupt_at(try_open(root, opts(None)));
    assert_eq!(offset, 6, "{reason}");
    assert!(reason.contains("hash mismatch"), "{reason}");

    // With the final snapshot (offset 10), startup replays only the tail; `verify` reads
    // everything and names the same offset.
    let log = SledLog::open_after_close(&ledger_dir(root), &Default::default()).unwrap();
    match alarm_ledger::verify::verify_log(&log, None) {
        Err(Error::Corrupt { offset: 6, reason }) => assert!(reason.contains("hash mismatch")),
        other => panic!("verify should name offset 6: {other:?}"),
    }
    drop(log);

    // With a snapshot older than the tampered record, the replayed tail includes it.
    let tmp2 = tempfile::tempdir().unwrap();
    let root2 = tmp2.path();
    let rt = rt();
    let (ledger, _) = open(root2, true);
    ledger.start().unwrap();
    fill(&ledger, &rt, 4, "tamper-target");
    ledger.write_snapshot().unwrap();
    let older = std::fs::read(snap_path(root2)).unwrap();
    fill(&ledger, &rt, 6, "tamper-target");
    ledger.stop();
    drop(ledger);
    std::fs::write(snap_path(root2), older).unwrap();
    flip_in_string(root2, 7, b"tamper-target");
    let (offset, reason) = corrupt_at(try_open(root2, opts(Some(snap_path(root2)))));
    assert_eq!(offset, 7, "{reason}");
}

#[test]
fn a_flipped_byte_in_the_head_record_fails_open() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 5, "tamper-target");
    flip_in_string(root, 5, b"tamper-target");
    let (offset, reason) = corrupt_at(try_open(root, opts(None)));
    assert_eq!(offset, 5, "{reason}");
}

#[test]
fn a_deleted_record_is_a_gap_naming_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 10, "alice");
    edit_record(root, 4, |v| {
        assert!(v.is_some());
        None
    });
    let (offset, reason) = corrupt_at(try_open(root, opts(None)));
    assert_eq!(offset, 4, "{reason}");
    assert!(reason.contains("gap"), "{reason}");
    let log = SledLog::open_after_close(&ledger_dir(root), &Default::default()).unwrap();
    match alarm_ledger::verify::verify_log(&log, None) {
        Err(Error::Corrupt { offset: 4, reason }) => assert!(reason.contains("gap"), "{reason}"),
        other => panic!("verify should name offset 4: {other:?}"),
    }
}

#[test]
fn a_record_with_an_unknown_version_byte_fails_naming_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 8, "alice");
    edit_record(root, 3, |v| {
        let mut v = v.unwrap();
        assert_eq!(v[0], 1, "records written today carry format version 1");
        v[0] = 9;
        Some(v)
    });
    let (offset, reason) = corrupt_at(try_open(root, opts(None)));
    assert_eq!(offset, 3, "{reason}");
    assert!(
        reason.contains("unknown record format version 9"),
        "{reason}"
    );

    // A truncated record: also named, never skipped.
    edit_record(root, 3, |v| {
        let mut v = v.unwrap();
        v[0] = 1;
        v.truncate(v.len() / 2);
        Some(v)
    });
    let (offset, reason) = corrupt_at(try_open(root, opts(None)));
    assert_eq!(offset, 3, "{reason}");
}

/// A full replay reads ahead on a second thread in chunks of 1,024 events: corruption past the
/// first chunks is still reported at its exact offset, whether the record fails to decode (an
/// error raised on the reading thread) or breaks the chain (raised on the replaying one).
#[test]
fn corruption_after_several_read_ahead_chunks_names_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (head, _) = build(root, 2_600, "alice");
    assert_eq!(head.offset, 2_600);
    edit_record(root, 2_100, |v| {
        let mut v = v.unwrap();
        v[0] = 9;
        Some(v)
    });
    let (offset, reason) = corrupt_at(try_open(root, opts(None)));
    assert_eq!(offset, 2_100, "{reason}");
    assert!(
        reason.contains("unknown record format version 9"),
        "{reason}"
    );

    flip_in_string(root, 1_500, b"alice");
    let (offset, reason) = corrupt_at(try_open(root, opts(None)));
    assert_eq!(offset, 1_500, "{reason}");
    assert!(reason.contains("hash mismatch"), "{reason}");
}

// ------------------------------------------------------------------ the data directory lock

#[test]
fn a_second_open_of_one_data_directory_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let first = DataDir::lock(tmp.path()).expect("first lock");
    let t = Instant::now();
    match DataDir::lock(tmp.path()) {
        Err(Error::Locked { path }) => assert_eq!(path, tmp.path()),
        Err(e) => panic!("expected Error::Locked, got {e}"),
        Ok(_) => panic!("a second lock of one data directory succeeded"),
    }
    assert!(t.elapsed() < Duration::from_millis(500), "fails at once");
    let msg = DataDir::lock(tmp.path()).err().unwrap().to_string();
    assert!(msg.contains("in use by another process"), "{msg}");
    drop(first);
    DataDir::lock(tmp.path()).expect("free again once the holder is gone");
}

// ------------------------------------------------------------------ time and offsets

#[test]
fn at_never_decreases_even_after_a_future_stamped_head() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rt = rt();
    {
        let (l, _) = open(root, false);
        l.start().unwrap();
        fill(&l, &rt, 50, "alice");
        l.stop();
        let events = l.log().read_from(1, usize::MAX).unwrap();
        assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
    }
    // A head written by a machine whose clock was an hour ahead (then corrected): appended
    // directly to the log with a valid chain link, as that machine's writer would have.
    let future = Timestamp(Timestamp::now().0 + 3_600_000);
    {
        let log = SledLog::open_after_close(&ledger_dir(root), &Default::default()).unwrap();
        let head = log.head().unwrap();
        let mut e = Event {
            offset: head.offset + 1,
            id: Uuid::now_v7(),
            at: future,
            actor: "clock-ahead".into(),
            alarm_id: Uuid::now_v7(),
            command_id: None,
            data: EventData::Created(AlarmSpec {
                name: "future".into(),
                instrument: String::new(),
                condition: String::new(),
                severity: Severity::Low,
                tags: vec![],
                owner: "clock-ahead".into(),
            }),
            hash: Default::default(),
        };
        e.hash = chain::event_hash(&head.hash, &e, log.info().ledger_id);
        log.append_batch(&[e]).unwrap();
    }
    let (l, _) = open(root, false);
    assert_eq!(l.head().at, future);
    l.start().unwrap();
    fill(&l, &rt, 5, "bob");
    l.stop();
    let events = l.log().read_from(1, usize::MAX).unwrap();
    assert_eq!(events.len(), 56);
    assert!(
        events.windows(2).all(|w| w[0].at <= w[1].at),
        "at never decreases"
    );
    assert!(events[51..].iter().all(|e| e.at == future));
    alarm_ledger::verify::verify_log(l.log().as_ref(), None).expect("verifies");

    // A correctly chained event whose time goes back (no writer of ours makes one): verify
    // names it, since export's time filters and as_of rely on the order.
    drop(l);
    let log = SledLog::open_after_close(&ledger_dir(root), &Default::default()).unwrap();
    let head = log.head().unwrap();
    let mut e = events[55].clone();
    e.offset = head.offset + 1;
    e.command_id = None;
    e.at = Timestamp(future.0 - 1);
    e.hash = chain::event_hash(&head.hash, &e, log.info().ledger_id);
    log.append_batch(&[e]).unwrap();
    match alarm_ledger::verify::verify_log(&log, None) {
        Err(Error::Corrupt { offset, reason }) => {
            assert_eq!(offset, 57);
            assert!(reason.contains("time goes backwards"), "{reason}");
        }
        other => panic!("expected a corrupt report, got {other:?}"),
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not in:\n{text}"))
}

#[test]
fn offsets_are_gapless_under_16_concurrent_submitters_and_commits_are_grouped() {
    const SUBMITTERS: usize = 16;
    const EACH: usize = 40;
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let (ledger, _) = open(tmp.path(), true);
    ledger.start().unwrap();
    let answers: Vec<Vec<(Uuid, Outcome)>> = rt.block_on(async {
        let tasks: Vec<_> = (0..SUBMITTERS)
            .map(|n| {
                let l = ledger.clone();
                tokio::spawn(async move {
                    let id = Uuid::now_v7();
                    let mut out = Vec::new();
                    for i in 0..EACH {
                        let cmd = cycle(id, &format!("user{n}"), i);
                        let cid = cmd.command_id.unwrap();
                        out.push((cid, l.submit(cmd).await.expect("command succeeds")));
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.unwrap());
        }
        all
    });
    let total = (SUBMITTERS * EACH) as u64;
    let mut offsets: Vec<u64> = answers.iter().flatten().map(|(_, o)| o.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=total).collect::<Vec<_>>(), "gapless from 1");
    for per in &answers {
        assert!(
            per.windows(2).all(|w| w[0].1.offset < w[1].1.offset),
            "one submitter's commands land in its order"
        );
    }
    let events = ledger.log().read_from(1, usize::MAX).unwrap();
    assert_eq!(events.len() as u64, total);
    for (cid, o) in answers.iter().flatten() {
        assert_eq!(events[o.offset as usize - 1].command_id, Some(*cid));
    }
    let m = ledger.metrics.render();
    let sum = metric(&m, "alarm_ledger_group_commit_batch_size_sum");
    let count = metric(&m, "alarm_ledger_group_commit_batch_size_count");
    assert_eq!(sum as u64, total);
    let mean = sum / count;
    eprintln!("{total} events in {count} group commits: mean batch {mean:.2}");
    assert!(mean > 1.0, "concurrent appends share flushes (mean {mean})");
    ledger.stop();
    assert_eq!(ledger.head().offset, total);
}

#[test]
fn a_full_write_queue_answers_overloaded() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut o = opts(None);
    o.queue_capacity = 1;
    let (ledger, _) = try_open(tmp.path(), o).unwrap();
    ledger.start().unwrap();
    let results: Vec<Result<Outcome, CommandError>> = rt.block_on(async {
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let l = ledger.clone();
                tokio::spawn(async move {
                    l.submit(create(Uuid::now_v7(), "alice", &format!("a{i}")))
                        .await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let overloaded = results
        .iter()
        .filter(|r| matches!(r, Err(CommandError::Overloaded)))
        .count();
    let mut ok: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|o| o.offset))
        .collect();
    assert_eq!(overloaded + ok.len(), 400, "only overloaded or ok");
    assert!(
        overloaded > 0,
        "a queue of 1 under 400 concurrent submits overflows"
    );
    assert_eq!(
        CommandError::Overloaded.code(),
        "overloaded",
        "the protocol code"
    );
    ok.sort_unstable();
    assert_eq!(ok, (1..=ok.len() as u64).collect::<Vec<_>>());
    // Nothing refused was appended, and the writer is not stuck.
    assert_eq!(ledger.head().offset, ok.len() as u64);
    let next = rt
        .block_on(ledger.submit(create(Uuid::now_v7(), "alice", "after")))
        .unwrap();
    assert_eq!(next.offset, ok.len() as u64 + 1);
    eprintln!("{} ok, {overloaded} overloaded", ok.len());
    ledger.stop();
    let ids: HashSet<Uuid> = ledger
        .log()
        .read_from(1, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.alarm_id)
        .collect();
    assert_eq!(ids.len(), ok.len() + 1);
}

#[test]
fn a_second_open_of_one_log_fails_at_once_too() {
    // Below the data directory lock, sled's own lock: a tool that opened `ledger/` directly
    // gets the same clear error, not a hang.
    let tmp = tempfile::tempdir().unwrap();
    let first = SledLog::open(&ledger_dir(tmp.path()), &Default::default()).unwrap();
    let t = Instant::now();
    match SledLog::open(&ledger_dir(tmp.path()), &Default::default()) {
        Err(Error::Locked { path }) => assert_eq!(path, ledger_dir(tmp.path())),
        Err(e) => panic!("expected Error::Locked, got {e}"),
        Ok(_) => panic!("two sled opens of one log"),
    }
    assert!(t.elapsed() < Duration::from_millis(500));
    drop(first);
}

// ------------------------------------------------------------------ records below a snapshot
//
// A snapshot start replays only the tail; the prefix is verified by `Ledger::scrub`, which the
// server runs in the background right after start. A bad record there refuses appends and fails
// readiness, naming the offset.

/// Opens the ledger in `root` from its projection snapshot; returns it and the snapshot's offset.
fn start_from_snapshot(root: &Path) -> (Arc<Ledger>, u64) {
    let (l, restore) =
        try_open(root, opts(Some(snap_path(root)))).expect("starts from the snapshot");
    let Restore::Snapshot { offset, .. } = restore else {
        panic!("expected a snapshot start, got {restore:?}")
    };
    (l, offset)
}

fn scrub_fails_at(root: &Path) -> (u64, String) {
    let snapshot_before = std::fs::read(snap_path(root)).unwrap();
    let (l, offset) = start_from_snapshot(root);
    l.start().unwrap();
    // Served while the prefix is still being checked (as in production: the scrub runs in
    // the background): the head moves past the snapshot's.
    rt().block_on(l.submit(create(Uuid::now_v7(), "a", "before the verdict")))
        .expect("appends are taken until the scrub finds something");
    let found = match l.scrub(offset) {
        Err(Error::Corrupt { offset, reason }) => (offset, reason),
        other => panic!("expected Error::Corrupt from the scrub, got {other:?}"),
    };
    assert!(l.integrity_failure().is_some());
    let refused = rt().block_on(l.submit(create(Uuid::now_v7(), "a", "after")));
    assert!(
        refused.is_err(),
        "append accepted on a corrupt ledger: {refused:?}"
    );
    l.stop();
    // No final snapshot over a log that failed its check: the one in place stays, for the
    // next start (which checks again) and for whoever investigates.
    assert!(
        std::fs::read(snap_path(root)).unwrap() == snapshot_before,
        "the projection snapshot was rewritten over a corrupt log"
    );
    found
}

#[test]
fn startup_from_a_snapshot_still_detects_a_tampered_record() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 10, "tamper-target"); // graceful stop: snapshot at the head, as in production
    flip_in_string(root, 6, b"tamper-target");
    assert_eq!(scrub_fails_at(root).0, 6);
}

#[test]
fn startup_from_a_snapshot_still_detects_a_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 10, "alice");
    edit_record(root, 4, |_| None);
    assert_eq!(scrub_fails_at(root).0, 4);
}

/// A snapshot whose checksum is right but whose state is not the log's (edited and re-sealed,
/// or written by a buggy build): the log verifies, but the state the server started from does
/// not; the scrub rebuilds the state from the log prefix and compares.
#[test]
fn startup_from_a_snapshot_detects_a_snapshot_whose_state_is_not_the_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 10, "alice");
    let mut s = snapshot::load(&snap_path(root)).unwrap().unwrap();
    s.alarms[0].name = "edited".into();
    std::fs::write(snap_path(root), snapshot::encode(&s).unwrap()).unwrap();
    let (offset, reason) = scrub_fails_at(root);
    assert_eq!(offset, s.offset);
    assert!(reason.contains("disagrees"), "{reason}");
}

#[test]
fn a_clean_prefix_scrubs_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 10, "alice");
    let (l, offset) = start_from_snapshot(root);
    assert!(!l.is_verified());
    assert!(l.scrub(offset).unwrap(), "the scrub ran to its end");
    assert!(l.is_verified());
    assert!(l.integrity_failure().is_none());
}

/// A shutdown interrupts the scrub (it would hold the log open, and the shutdown checkpoint
/// waits for that): it stops without a verdict, neither verified nor failed.
#[test]
fn a_stopped_ledger_abandons_its_scrub_without_a_verdict() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 10, "alice");
    let (l, offset) = start_from_snapshot(root);
    l.start().unwrap();
    l.stop();
    assert!(!l.scrub(offset).unwrap(), "the scrub was interrupted");
    assert!(!l.is_verified());
    assert!(l.integrity_failure().is_none());
}

#[test]
fn a_command_id_answered_already_never_appends_later() {
    // PRODUCT.md: "a repeat of a command_id returns the original outcome and appends nothing".
    // A trigger answered `already` and retried (same command_id) after an ack and a rearm must
    // not start a new firing.
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let (l, _) = open(tmp.path(), false);
    l.start().unwrap();
    let id = Uuid::now_v7();
    rt.block_on(l.submit(create(id, "a", "x"))).unwrap();
    rt.block_on(l.submit(trigger(id, "a"))).unwrap();
    let late = trigger(id, "b");
    let first = rt.block_on(l.submit(late.clone())).unwrap();
    assert!(first.already);
    rt.block_on(l.submit(ack(id, "a"))).unwrap();
    rt.block_on(l.submit(rearm(id, "a"))).unwrap();
    let retry = rt.block_on(l.submit(late)).unwrap();
    l.stop();
    assert_eq!(l.head().offset, 4, "the retry appended {retry:?}");
}

// ------------------------------------------------------------------ subscriptions

/// A connection polls its subscription inside `select!`, so `next()` is dropped whenever another
/// branch wins, often in the middle of a replay read. Nothing may be lost or repeated, and the
/// replay must still progress (the read in progress is kept, not restarted).
#[test]
fn a_subscription_polled_with_constant_cancellation_delivers_everything_once() {
    use alarm_ledger::ledger::SubItem;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rt = rt();
    let (ledger, _) = open(root, false);
    ledger.start().unwrap();
    fill(&ledger, &rt, 2_500, "alice");
    let head = ledger.head().offset;
    assert_eq!(head, 2_500);

    let mut sub = ledger.subscribe(0);
    let mut got = Vec::new();
    let mut cancelled = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        loop {
            assert!(
                Instant::now() < deadline,
                "replay did not finish: {} events",
                got.len()
            );
            // Give each poll almost no time: most polls are dropped while the read runs.
            match tokio::time::timeout(Duration::from_micros(50), sub.next()).await {
                Err(_) => cancelled += 1,
                Ok(Ok(Some(SubItem::Events(events)))) => {
                    got.extend(events.iter().map(|p| p.event.offset))
                }
                Ok(Ok(Some(SubItem::Live { offset }))) => {
                    assert_eq!(offset, head);
                    break;
                }
                Ok(other) => panic!("unexpected subscription result: {:?}", other.map(|_| ())),
            }
        }
    });
    assert_eq!(
        got,
        (1..=head).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert!(
        cancelled > 0,
        "the test never cancelled a poll; it proves nothing"
    );
    ledger.stop();
}

#[test]
fn large_records_that_sled_writes_as_blob_files_are_synced_and_read_back() {
    // sled 0.34 writes a page image over ~128 KiB (here: a leaf of ~20 KB records) to a file
    // of its own in `blobs/` without fsync; `sync` fsyncs those files and the directory before
    // the `db` file that points at them. This exercises that path (the fsync itself is only
    // visible to strace) and checks the records read back and verify after a reopen.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = ledger_dir(root);
    let log = SledLog::open(&dir, &Default::default()).unwrap();
    let ledger_id = log.info().ledger_id;
    let mut head = log.head().unwrap();
    let blobs = || std::fs::read_dir(dir.join("blobs")).map_or(0, |d| d.count());
    let mut n = 0u64;
    while blobs() == 0 {
        assert!(n < 400, "sled wrote no blob file for 400 records of 20 KB");
        let mut e = Event {
            offset: head.offset + 1,
            id: Uuid::now_v7(),
            at: Timestamp::now().max(head.at),
            actor: "big".into(),
            alarm_id: Uuid::now_v7(),
            command_id: Some(Uuid::new_v4()),
            data: EventData::Created(AlarmSpec {
                name: format!("big {n}"),
                instrument: "AAPL".into(),
                condition: "条件".repeat(3_400),
                severity: Severity::Low,
                tags: vec!["t".repeat(64); 32],
                owner: "big".into(),
            }),
            hash: Default::default(),
        };
        e.hash = chain::event_hash(&head.hash, &e, ledger_id);
        head = Head {
            offset: e.offset,
            hash: e.hash,
            at: e.at,
        };
        log.append_batch(&[e]).unwrap();
        n += 1;
    }
    println!("first blob file after {n} records of ~20 KB");
    drop(log);
    let log = SledLog::open_after_close(&dir, &Default::default()).unwrap();
    assert_eq!(log.head().unwrap().offset, n);
    let report = alarm_ledger::verify::verify_log(&log, None).expect("verifies");
    assert_eq!(report.head, n);
}

#[test]
fn verify_checks_the_snapshot_ledger_and_head_time() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 10, "alice");
    let good = snapshot::decode(&std::fs::read(snap_path(root)).unwrap()).unwrap();
    let log = SledLog::open_after_close(&ledger_dir(root), &Default::default()).unwrap();
    let path = snap_path(root);
    alarm_ledger::verify::verify_log(&log, Some(&path)).expect("the real snapshot verifies");
    let mut late = good.clone();
    late.head_at = Timestamp(late.head_at.0 + 1);
    let mut foreign = good.clone();
    foreign.ledger_id = Uuid::new_v4();
    // What start-up would discard and rebuild is reported, not called corruption: the log is
    // verified all the same.
    for (snap, why) in [
        (late, "head time at offset 10 disagrees"),
        (foreign, "snapshot is of ledger"),
    ] {
        std::fs::write(&path, snapshot::encode(&snap).unwrap()).unwrap();
        let report = alarm_ledger::verify::verify_log(&log, Some(&path)).expect(why);
        assert_eq!(report.head, 10);
        assert_eq!(report.snapshot_checked, None);
        let discarded = report.snapshot_discarded.expect("reported");
        assert!(discarded.contains(why), "{discarded}");
    }
    std::fs::write(&path, b"not a snapshot at all").unwrap();
    let report = alarm_ledger::verify::verify_log(&log, Some(&path)).expect("unreadable");
    assert!(report.snapshot_discarded.is_some());
    // What start-up refuses (this ledger's snapshot, and the log no longer holds what it saw)
    // fails verify too.
    let mut beyond = good.clone();
    beyond.offset = 11;
    let mut forked = good.clone();
    forked.head_hash = alarm_ledger::domain::Hash([7; 32]);
    for (snap, why) in [
        (beyond, "beyond the log head"),
        (forked, "hash at offset 10 disagrees"),
    ] {
        std::fs::write(&path, snapshot::encode(&snap).unwrap()).unwrap();
        match alarm_ledger::verify::verify_log(&log, Some(&path)) {
            Err(Error::Corrupt { reason, .. }) => {
                assert!(reason.contains(why), "{reason}");
                assert!(reason.contains("lost or rewrote events"), "{reason}");
            }
            other => panic!("expected {why:?}, got {other:?}"),
        }
    }
}

/// The shutdown checkpoint waits (bounded) for the last handle on the log and gives up while one
/// lives; once they are gone it opens and closes the database, and the ledger is intact.
#[test]
fn shutdown_checkpoint_waits_for_the_last_handle() {
    use alarm_ledger::store::sled_log::checkpoint;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(root, 10, "alice");
    let dir = ledger_dir(root);
    let held = SledLog::open_after_close(&dir, &Default::default()).unwrap();
    let head = held.head().unwrap();
    assert_eq!(
        checkpoint(&dir, Duration::from_millis(200)).unwrap(),
        None,
        "checkpointed while a handle was open"
    );
    drop(held);
    assert!(checkpoint(&dir, Duration::from_secs(10)).unwrap().is_some());
    let log = SledLog::open_after_close(&dir, &Default::default()).unwrap();
    assert_eq!(log.head().unwrap(), head);
    // A directory without a database is left alone (sled's open would create an empty one).
    let empty = tmp.path().join("no-ledger");
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(checkpoint(&empty, Duration::from_secs(1)).unwrap(), None);
    assert!(
        !empty.join("db").exists(),
        "the checkpoint created a database"
    );
}

/// sled writes its page-table snapshot (at every open that recovered log) to
/// `snap.<lsn>.generating`, fsyncs it and renames it; a process killed while writing it (a crash
/// during start-up, or the shutdown checkpoint cut off by its deadline) leaves a partial file
/// with a higher lsn than the last good snapshot. sled 0.34 takes the highest-named `snap.*`
/// file, `.generating` included, and refuses to open on its bad checksum (upstream #1527): the
/// ledger would not start until someone deleted the file by hand.
#[test]
fn a_partial_sled_snapshot_left_by_a_kill_does_not_stop_the_next_open() {
    let tmp = tempfile::tempdir().unwrap();
    let (head, projection) = build(tmp.path(), 12, "alice");
    let dir = ledger_dir(tmp.path());
    let partial = dir.join("snap.7FFFFFFFFFFFFFFF.generating");
    std::fs::write(&partial, b"partial snapshot, no checksum").unwrap();

    let (l, _) = open(tmp.path(), true);
    assert_eq!(l.head(), head);
    assert_eq!(l.read_model().projection, projection);
    assert!(!partial.exists(), "the partial file is removed");
    assert_eq!(
        alarm_ledger::verify::verify_log(l.log().as_ref(), None)
            .map(|r| r.events)
            .ok(),
        Some(12)
    );
}

/// A refusal is remembered with the head it was decided against, so that a backup of an
/// earlier head can leave it out (in the copy, the alarm may still be in the state the refusal
/// says it was not); a repeat still gets the same refusal.
#[test]
fn a_refusal_is_remembered_with_the_head_it_was_decided_against() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let (ledger, _) = open(tmp.path(), false);
    ledger.start().expect("writer");
    let alarm = Uuid::now_v7();
    rt.block_on(ledger.submit(create(alarm, "alice", "r")))
        .unwrap();
    rt.block_on(ledger.submit(trigger(alarm, "alice"))).unwrap();
    // Acknowledged twice is `already`; a rearm of a triggered alarm is refused.
    let mut refused = act(alarm, "alice", CommandKind::Rearm);
    let cid = Uuid::now_v7();
    refused.command_id = Some(cid);
    let first = rt.block_on(ledger.submit(refused.clone())).unwrap_err();
    assert_eq!(first.code(), "not_acknowledged");
    let outcome = ledger
        .log()
        .command_outcome(cid)
        .unwrap()
        .expect("remembered");
    assert_eq!(outcome.offset, 2, "decided against head 2: {outcome:?}");
    let again = rt.block_on(ledger.submit(refused)).unwrap_err();
    assert_eq!(
        again.code(),
        "not_acknowledged",
        "a repeat gets the same refusal"
    );
    ledger.stop();
}

/// The real sled log, except that its second append panics (as a bug in the writer's path, or
/// a panic inside sled, would): the writer thread dies with it.
struct PanicsOnSecondAppend {
    inner: SledLog,
    appends: std::sync::atomic::AtomicU64,
}

impl EventLog for PanicsOnSecondAppend {
    fn info(&self) -> alarm_ledger::store::LedgerInfo {
        self.inner.info()
    }
    fn head(&self) -> alarm_ledger::error::Result<Head> {
        self.inner.head()
    }
    fn append_with_outcomes(
        &self,
        events: &[Event],
        outcomes: &[(Uuid, alarm_ledger::store::CommandOutcome)],
    ) -> alarm_ledger::error::Result<()> {
        if self
            .appends
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            panic!("injected: the second append panics");
        }
        self.inner.append_with_outcomes(events, outcomes)
    }
    fn sync(&self) -> alarm_ledger::error::Result<()> {
        self.inner.sync()
    }
    fn read_from(&self, from: u64, max: usize) -> alarm_ledger::error::Result<Vec<Event>> {
        self.inner.read_from(from, max)
    }
    fn iter_from(
        &self,
        from: u64,
    ) -> Box<dyn Iterator<Item = alarm_ledger::error::Result<Event>> + Send + '_> {
        self.inner.iter_from(from)
    }
    fn event_at(&self, offset: u64) -> alarm_ledger::error::Result<Option<Event>> {
        self.inner.event_at(offset)
    }
    fn alarm_offsets(
        &self,
        alarm_id: Uuid,
        from: u64,
    ) -> Box<dyn Iterator<Item = alarm_ledger::error::Result<u64>> + Send + '_> {
        self.inner.alarm_offsets(alarm_id, from)
    }
    fn command_outcome(
        &self,
        command_id: Uuid,
    ) -> alarm_ledger::error::Result<Option<alarm_ledger::store::CommandOutcome>> {
        self.inner.command_outcome(command_id)
    }
    fn command_index(
        &self,
    ) -> Box<
        dyn Iterator<
                Item = alarm_ledger::error::Result<(Uuid, alarm_ledger::store::CommandOutcome)>,
            > + Send
            + '_,
    > {
        self.inner.command_index()
    }
    fn alarm_index(
        &self,
    ) -> Box<dyn Iterator<Item = alarm_ledger::error::Result<(Uuid, u64)>> + Send + '_> {
        self.inner.alarm_index()
    }
}

/// A writer that dies (a panic on its thread) fails the ledger loudly: the command in flight
/// gets `internal` (it may or may not have been applied), every later command `internal` too —
/// not the `overloaded` of a shutdown, which would have clients retry forever — and the ledger
/// reports itself degraded, so `/healthz` and `/readyz` answer 503 and the orchestrator
/// restarts it. What was acknowledged before stays in the log.
#[test]
fn a_writer_that_panics_fails_the_ledger_instead_of_reading_as_a_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let log = PanicsOnSecondAppend {
        inner: SledLog::open(&ledger_dir(tmp.path()), &Default::default()).unwrap(),
        appends: Default::default(),
    };
    let (ledger, _) = Ledger::open(Arc::new(log), opts(None), Arc::new(Metrics::new())).unwrap();
    ledger.start().unwrap();
    let rt = rt();
    let id = Uuid::now_v7();
    let first = rt.block_on(ledger.submit(create(id, "op", "a"))).unwrap();
    assert_eq!(first.offset, 1);
    assert!(!ledger.is_degraded());
    let in_flight = rt.block_on(ledger.submit(trigger(id, "op"))).unwrap_err();
    assert_eq!(in_flight.code(), "internal", "{in_flight:?}");
    // The thread marks the ledger as it unwinds, after the reply it held was dropped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ledger.is_degraded() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(ledger.is_degraded(), "a dead writer is a failed ledger");
    for _ in 0..3 {
        let later = rt.block_on(ledger.submit(trigger(id, "op"))).unwrap_err();
        assert_eq!(later.code(), "internal", "{later:?}");
        assert!(later.to_string().contains("restarted"), "{later}");
    }
    // Without a command_id nothing can have been applied by an earlier attempt: "not applied".
    let mut plain = trigger(id, "op");
    plain.command_id = None;
    let refused = rt.block_on(ledger.submit(plain)).unwrap_err();
    assert!(refused.to_string().starts_with("not applied"), "{refused}");
    assert_eq!(refused.code(), "internal");
    assert_eq!(ledger.head().offset, 1, "the acknowledged event stays");
    assert_eq!(ledger.log().event_at(1).unwrap().unwrap().alarm_id, id);
}

/// `head()` does not queue behind the model's lock: while a reader holds the model (as a
/// snapshot subscribe or a state answer does while it copies every alarm) and the writer waits
/// to apply a batch, the event loop's `head()` calls still answer, with the head before the
/// batch; once the reader lets go, the batch is applied and its head published.
#[test]
fn head_answers_while_a_reader_holds_the_model_and_the_writer_waits() {
    let tmp = tempfile::tempdir().unwrap();
    let (ledger, _) = open(tmp.path(), false);
    ledger.start().unwrap();
    let rt = rt();
    let id = Uuid::now_v7();
    rt.block_on(ledger.submit(create(id, "op", "a"))).unwrap();
    let guard = ledger.read_model();
    let pending = rt.spawn({
        let ledger = ledger.clone();
        async move { ledger.submit(trigger(id, "op")).await }
    });
    // Time for the writer to make the trigger durable and block on the model's write lock
    // (if it has not yet, head() answers at once either way: the check cannot fail falsely).
    std::thread::sleep(Duration::from_millis(300));
    let (tx, rx) = std::sync::mpsc::channel();
    let l2 = ledger.clone();
    std::thread::spawn(move || {
        let _ = tx.send(l2.head().offset);
    });
    let seen = rx.recv_timeout(Duration::from_secs(5));
    drop(guard);
    assert_eq!(seen, Ok(1), "head() blocked behind the model's lock");
    let o = rt.block_on(pending).unwrap().unwrap();
    assert_eq!(o.offset, 2);
    assert_eq!(ledger.head().offset, 2);
}
