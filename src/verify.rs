//! `alarm-ledger verify`: checks a data directory (a stopped server's, or a backup) end to end:
//! offsets contiguous from 1, every record decodes, every hash chains, `at` never decreases, both indexes agree with
//! the log, the stored projection snapshot equals the projection rebuilt from the log, and the
//! security log chains.

use crate::domain::{Event, Hash};
use crate::error::{Error, Result};
use crate::ledger::{check_link, snapshot, SnapshotVerdict};
use crate::projection::Projection;
use crate::store::{chain, CommandOutcome, EventLog, OutcomeKind};
use std::path::Path;
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub events: u64,
    pub head: u64,
    pub head_hash: Hash,
    /// Offset of the snapshot checked, if there was one.
    pub snapshot_checked: Option<u64>,
    /// Why the snapshot there was not checked: one that start-up would discard and rebuild.
    pub snapshot_discarded: Option<String>,
    pub security_entries: u64,
}

/// Verifies the log and its indexes; with `snapshot_path`, the snapshot too. Stops at the first
/// problem and reports it as `Error::Corrupt { offset, reason }`.
pub fn verify_log(log: &dyn EventLog, snapshot_path: Option<&Path>) -> Result<VerifyReport> {
    // The two index scans run on a second core while this one walks and hashes the log.
    // (A third thread reading the log ahead of the checker was measured: no faster; sled's
    // iteration is the bound.)
    std::thread::scope(|scope| {
        let indexes = scope.spawn(|| -> Result<Indexes> {
            let alarms = log.alarm_index().collect::<Result<Vec<_>>>()?;
            let commands = log.command_index().collect::<Result<Vec<_>>>()?;
            Ok((alarms, commands))
        });
        verify_with(log, snapshot_path, log.iter_from(1), || {
            indexes
                .join()
                .map_err(|_| Error::Other("index scan thread panicked".into()))?
        })
    })
}

type Indexes = (Vec<(Uuid, u64)>, Vec<(Uuid, CommandOutcome)>);

fn verify_with(
    log: &dyn EventLog,
    snapshot_path: Option<&Path>,
    events: impl Iterator<Item = Result<Event>>,
    indexes: impl FnOnce() -> Result<Indexes>,
) -> Result<VerifyReport> {
    let info = log.info();
    let mut prev = chain::genesis(info.ledger_id);
    let mut prev_at = crate::time::Timestamp(i64::MIN);
    let mut expected = 1u64;
    let mut alarm_of: Vec<Uuid> = Vec::new();
    // (command_id, offset) of every event that carries one; sorted and searched after the walk
    // (cheaper than a million-entry hash map).
    let mut commands: Vec<(Uuid, u64)> = Vec::new();
    // The snapshot is judged as start-up judges it: one that proves events lost or rewritten
    // fails here as it fails `serve`; one the server would discard and rebuild (unreadable, of
    // another format or ledger) is a cache of no use, not damage to the ledger: reported, and
    // the rest verified.
    let mut snapshot_discarded = None;
    let snap = match snapshot_path {
        None => None,
        Some(path) => match crate::ledger::judge_snapshot(log, path, log.head()?)? {
            SnapshotVerdict::Absent => None,
            SnapshotVerdict::Usable(s) => Some(s),
            SnapshotVerdict::Discarded(why) => {
                snapshot_discarded = Some(why);
                None
            }
        },
    };
    let mut projection = Projection::new();
    let mut snapshot_checked = None;
    let compare = |p: &Projection, s: &snapshot::Snapshot| -> Result<()> {
        if p.alarms_sorted() != s.alarms {
            return Err(Error::Corrupt {
                offset: s.offset,
                reason: "projection snapshot differs from the projection rebuilt from the log \
                         (the log verifies up to this offset: the snapshot is wrong; a stopped \
                         server's projection.snapshot can be deleted, the next start replays)"
                    .into(),
            });
        }
        Ok(())
    };
    if let Some(s) = &snap {
        if s.offset == 0 {
            // Start-up takes the head from a snapshot: at offset 0 it must be the empty head.
            if let Some(why) = s.empty_head_mismatch(info.ledger_id) {
                return Err(Error::Corrupt {
                    offset: 0,
                    reason: format!(
                        "projection snapshot at offset 0 {why} (it must be the empty head)"
                    ),
                });
            }
            compare(&projection, s)?;
            snapshot_checked = Some(0);
        }
    }
    for item in events {
        let e = item.map_err(|err| crate::ledger::unreadable_at(expected, err))?;
        check_link(&e, expected, &prev, info.ledger_id)?;
        // The writer never lets `at` decrease (a clock stepping back keeps the last time);
        // export's `--until` early stop and the as-of time search rely on it.
        if e.at < prev_at {
            return Err(Error::Corrupt {
                offset: e.offset,
                reason: format!(
                    "time goes backwards: at {} is before the previous event's {}",
                    e.at.to_rfc3339(),
                    prev_at.to_rfc3339()
                ),
            });
        }
        prev_at = e.at;
        prev = e.hash;
        alarm_of.push(e.alarm_id);
        if let Some(c) = e.command_id {
            commands.push((c, e.offset));
        }
        projection.apply(&e);
        if let Some(s) = &snap {
            if s.offset == e.offset {
                if s.head_hash != e.hash {
                    return Err(Error::Corrupt {
                        offset: e.offset,
                        reason: "projection snapshot hash disagrees with the log".into(),
                    });
                }
                // Start-up takes the head's time from the snapshot (new events are never
                // stamped earlier): it must be the time of the event it names.
                if s.head_at != e.at {
                    return Err(Error::Corrupt {
                        offset: e.offset,
                        reason: "projection snapshot head time disagrees with the log".into(),
                    });
                }
                compare(&projection, s)?;
                snapshot_checked = Some(s.offset);
            }
        }
        expected += 1;
    }
    let head = expected - 1;
    if let Some(s) = &snap {
        if snapshot_checked.is_none() {
            return Err(Error::Corrupt {
                offset: s.offset,
                reason: format!(
                    "projection snapshot at offset {} is beyond the log head {head}",
                    s.offset
                ),
            });
        }
    }
    let (alarm_index, command_index) = indexes()?;
    let mut alarm_entries = 0u64;
    for (alarm, off) in alarm_index {
        let ok = off >= 1 && alarm_of.get((off - 1) as usize) == Some(&alarm);
        if !ok {
            return Err(Error::Corrupt {
                offset: off,
                reason: format!("alarm index entry ({alarm}, {off}) does not match the log"),
            });
        }
        alarm_entries += 1;
    }
    if alarm_entries != head {
        return Err(Error::Corrupt {
            offset: 0,
            reason: format!("alarm index has {alarm_entries} entries for {head} events"),
        });
    }
    // Every command_id in the log is indexed as `Appended` at its event; other entries
    // (`Already`, `Rejected`) remember commands that appended nothing and must not point past
    // the head or at another alarm's event.
    commands.sort_unstable();
    if let Some(w) = commands.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Corrupt {
            offset: w[1].1,
            reason: format!("command_id {} appears twice in the log", w[1].0),
        });
    }
    // Both sides in command_id order, then one merge pass: sled yields the index in key order,
    // so the sort only confirms it (linear on sorted input), and a million binary searches
    // become a cursor that only moves forward.
    let mut command_index = command_index;
    command_index.sort_unstable_by_key(|(c, _)| *c);
    let mut cursor = 0usize;
    let mut find = |cid: &Uuid| {
        while commands.get(cursor).is_some_and(|(c, _)| c < cid) {
            cursor += 1;
        }
        commands
            .get(cursor)
            .filter(|(c, _)| c == cid)
            .map(|(_, off)| *off)
    };
    let mut appended_entries = 0usize;
    for (cid, outcome) in command_index {
        let bad = |what: &str| Error::Corrupt {
            offset: outcome.offset,
            reason: format!("command index entry {cid} {what}"),
        };
        let alarm_at = |off: u64| off.checked_sub(1).and_then(|i| alarm_of.get(i as usize));
        match outcome.kind {
            OutcomeKind::Appended => {
                if find(&cid) != Some(outcome.offset)
                    || alarm_at(outcome.offset) != Some(&outcome.alarm_id)
                {
                    return Err(bad("does not match the log"));
                }
                appended_entries += 1;
            }
            OutcomeKind::Already => {
                if find(&cid).is_some() || alarm_at(outcome.offset) != Some(&outcome.alarm_id) {
                    return Err(bad("(already) does not match the log"));
                }
            }
            OutcomeKind::Rejected { .. } => {
                if find(&cid).is_some() {
                    return Err(bad("(rejected) has an event in the log"));
                }
                if outcome.offset > head {
                    return Err(bad(
                        "(rejected) was decided against a head beyond the log's",
                    ));
                }
            }
        }
    }
    if appended_entries != commands.len() {
        return Err(Error::Corrupt {
            offset: 0,
            reason: format!(
                "command index has {appended_entries} entries for {} commands in the log",
                commands.len()
            ),
        });
    }
    Ok(VerifyReport {
        events: head,
        head,
        head_hash: prev,
        snapshot_checked,
        snapshot_discarded,
        security_entries: 0,
    })
}
