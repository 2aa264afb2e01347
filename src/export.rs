//! Reading the audit trail with filters, in constant memory: shared by `GET /api/v1/events` and
//! `alarm-ledger export`.

use crate::domain::Event;
use crate::error::{Error, Result};
use crate::projection::Projection;
use crate::store::EventLog;
use crate::time::Timestamp;
use uuid::Uuid;

/// Which events to read. Offsets are inclusive on both ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub alarm_id: Option<Uuid>,
    pub actor: Option<String>,
    pub limit: Option<u64>,
}

/// An inverted range of an `EventFilter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inverted {
    Offsets { from: u64, to: u64 },
    Times { since: Timestamp, until: Timestamp },
}

impl Inverted {
    /// What is wrong, naming the bounds as the caller's interface does (`flag`: `""` for the
    /// HTTP parameters, `"--"` for the CLI's options).
    pub fn describe(&self, flag: &str) -> String {
        let (lower, upper) = match self {
            Inverted::Offsets { from, to } => (format!("from {from}"), format!("to {to}")),
            Inverted::Times { since, until } => (
                format!("since {}", since.to_rfc3339()),
                format!("until {}", until.to_rfc3339()),
            ),
        };
        format!("{flag}{lower} is after {flag}{upper} (both inclusive): the range holds nothing")
    }
}

impl EventFilter {
    /// The range, if it is inverted (`from` after `to`; `since` after `until` by more than the
    /// millisecond that rounding a finer `since` up and `until` down can put between two bounds
    /// that were in order as given): a swapped pair is a mistake to report, not an empty audit
    /// extract to hand over as if it were the answer.
    pub fn inverted(&self) -> Option<Inverted> {
        if let (Some(from), Some(to)) = (self.from, self.to) {
            if from > to {
                return Some(Inverted::Offsets { from, to });
            }
        }
        if let (Some(since), Some(until)) = (self.since, self.until) {
            if since.0 > until.0.saturating_add(1) {
                return Some(Inverted::Times { since, until });
            }
        }
        None
    }

    fn matches(&self, e: &Event) -> bool {
        self.since.is_none_or(|t| e.at >= t)
            && self.until.is_none_or(|t| e.at <= t)
            && self.alarm_id.is_none_or(|a| e.alarm_id == a)
            && self.actor.as_deref().is_none_or(|a| e.actor == a)
    }

    /// The filters as a JSON object (for the security log's record of who read what).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        if let Some(v) = self.from {
            m.insert("from".into(), v.into());
        }
        if let Some(v) = self.to {
            m.insert("to".into(), v.into());
        }
        if let Some(v) = self.since {
            m.insert("since".into(), v.to_rfc3339().into());
        }
        if let Some(v) = self.until {
            m.insert("until".into(), v.to_rfc3339().into());
        }
        if let Some(v) = self.alarm_id {
            m.insert("alarm_id".into(), v.to_string().into());
        }
        if let Some(v) = &self.actor {
            m.insert("actor".into(), v.clone().into());
        }
        if let Some(v) = self.limit {
            m.insert("limit".into(), v.into());
        }
        serde_json::Value::Object(m)
    }
}

/// The event an alarm-index entry points at. A missing record, or one of another alarm, is
/// corruption, never a silent skip: a filtered audit extract must not quietly lose events.
pub fn indexed_event(log: &dyn EventLog, alarm_id: Uuid, offset: u64) -> Result<Event> {
    let corrupt = |reason: String| crate::error::Error::Corrupt { offset, reason };
    match log.event_at(offset)? {
        Some(e) if e.alarm_id == alarm_id => Ok(e),
        Some(e) => Err(corrupt(format!(
            "the alarm index entry of {alarm_id} points at an event of {}",
            e.alarm_id
        ))),
        None => Err(corrupt(format!(
            "the alarm index entry of {alarm_id} points at a missing record"
        ))),
    }
}

/// Calls `f` for every matching event with offset ≤ `head`, in order, until `f` returns false.
/// With `alarm_id` it walks that alarm's index instead of the whole log.
pub fn for_each(
    log: &dyn EventLog,
    head: u64,
    filter: &EventFilter,
    mut f: impl FnMut(&Event) -> bool,
) -> Result<u64> {
    let from = filter.from.unwrap_or(1).max(1);
    let to = filter.to.unwrap_or(head).min(head);
    let limit = filter.limit.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    if from > to || limit == 0 {
        return Ok(0);
    }
    if let Some(alarm) = filter.alarm_id {
        for off in log.alarm_offsets(alarm, from) {
            let off = off?;
            if off > to {
                break;
            }
            let e = indexed_event(log, alarm, off)?;
            if filter.matches(&e) {
                sent += 1;
                if !f(&e) || sent >= limit {
                    break;
                }
            }
        }
        return Ok(sent);
    }
    // A filtered extract must not quietly lose a missing record: `contiguous` fails on one.
    for item in contiguous(log, from, to) {
        let e = item?;
        if filter.until.is_some_and(|u| e.at > u) {
            return Ok(sent); // `at` never decreases along the log
        }
        if filter.matches(&e) {
            sent += 1;
            if !f(&e) || sent >= limit {
                return Ok(sent);
            }
        }
    }
    Ok(sent)
}

/// The events `from..=to` (`from` ≥ 1) in order, each one there: a gap, or records that run
/// out before `to`, is an `Error::Corrupt` naming the first missing offset (and ends the walk).
pub fn contiguous(
    log: &dyn EventLog,
    from: u64,
    to: u64,
) -> impl Iterator<Item = Result<Event>> + '_ {
    let mut records = log.iter_from(from);
    let mut expected = from;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || expected > to {
            return None;
        }
        let missing = |reason: String| Error::Corrupt {
            offset: expected,
            reason,
        };
        let next = match records.next() {
            None => Err(missing("missing record below the head".into())),
            Some(Err(e)) => Err(e),
            Some(Ok(e)) if e.offset != expected => {
                Err(missing(format!("gap: next record has offset {}", e.offset)))
            }
            Some(Ok(e)) => Ok(e),
        };
        // After an error the walk is over.
        match next {
            Ok(_) => expected += 1,
            Err(_) => failed = true,
        }
        Some(next)
    })
}

/// CSV header and row (RFC 4180 quoting). `data` is the event's data object as JSON text.
pub const CSV_HEADER: &str = "offset,id,at,actor,kind,alarm_id,command_id,data,ledger_id,hash";

pub fn csv_row(e: &Event, ledger_id: Uuid) -> String {
    let q = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    format!(
        "{},{},{},{},{},{},{},{},{},{}",
        e.offset,
        e.id,
        e.at.to_rfc3339(),
        q(&e.actor),
        e.kind().as_str(),
        e.alarm_id,
        e.command_id.map(|c| c.to_string()).unwrap_or_default(),
        q(&e.data.to_json().to_string()),
        ledger_id,
        e.hash.to_hex()
    )
}

/// The offset of the last event with `at` ≤ `t` (0 if none), by binary search: `at` never
/// decreases along the log.
pub fn offset_at_time(log: &dyn EventLog, head: u64, t: Timestamp) -> Result<u64> {
    let (mut lo, mut hi) = (0u64, head);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        match log.event_at(mid)? {
            Some(e) if e.at <= t => lo = mid,
            Some(_) => hi = mid - 1,
            None => {
                return Err(Error::Corrupt {
                    offset: mid,
                    reason: "missing record below head".into(),
                })
            }
        }
    }
    Ok(lo)
}

/// The projection after every event with offset ≤ `offset` (the caller caps it at the head).
/// Every record 1..=`offset` must be there: a state that silently skipped a missing record
/// (an alarm's trigger, its deletion) would be a wrong answer, so a gap is corruption.
pub fn state_as_of(log: &dyn EventLog, offset: u64) -> Result<Projection> {
    let mut p = Projection::new();
    for item in contiguous(log, 1, offset) {
        p.apply(&item?);
    }
    Ok(p)
}
