//! The alarm model and how an event changes it (ISA-18.2-inspired states).
//!
//! ```text
//! create ──> armed ──trigger──> triggered ──ack──> acknowledged ──rearm──> armed
//! any non-deleted state ──update──> same state (fields changed)
//! any non-deleted state ──delete──> deleted (tombstone; history stays forever)
//! ```

use super::event::{Event, EventData};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Severity. Variant order is part of the disk format (bincode encodes by position).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "low" => Some(Severity::Low),
            "medium" => Some(Severity::Medium),
            "high" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// State. Variant order is part of the projection snapshot format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlarmState {
    Armed,
    Triggered,
    Acknowledged,
    Deleted,
}

impl AlarmState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmState::Armed => "armed",
            AlarmState::Triggered => "triggered",
            AlarmState::Acknowledged => "acknowledged",
            AlarmState::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<AlarmState> {
        match s {
            "armed" => Some(AlarmState::Armed),
            "triggered" => Some(AlarmState::Triggered),
            "acknowledged" => Some(AlarmState::Acknowledged),
            "deleted" => Some(AlarmState::Deleted),
            _ => None,
        }
    }
}

/// Who did something, and when, at which offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub at: Timestamp,
    pub by: String,
    pub offset: u64,
}

impl Stamp {
    fn of(event: &Event) -> Stamp {
        Stamp {
            at: event.at,
            by: event.actor.clone(),
            offset: event.offset,
        }
    }
}

/// The current state of one alarm: the fold of its events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarm {
    pub id: Uuid,
    pub name: String,
    pub instrument: String,
    pub condition: String,
    pub severity: Severity,
    pub tags: Vec<String>,
    pub owner: String,
    pub state: AlarmState,
    /// Number of events applied to this alarm (1 after creation).
    pub version: u64,
    pub created: Stamp,
    pub updated: Stamp,
    pub last_trigger: Option<Stamp>,
    pub last_trigger_value: Option<String>,
    pub last_trigger_message: Option<String>,
    pub last_ack: Option<Stamp>,
    pub last_ack_comment: Option<String>,
}

impl Alarm {
    /// The alarm an `alarm_created` event brings into being; `None` for any other event.
    pub fn from_created(event: &Event) -> Option<Alarm> {
        let EventData::Created(spec) = &event.data else {
            return None;
        };
        Some(Alarm {
            id: event.alarm_id,
            name: spec.name.clone(),
            instrument: spec.instrument.clone(),
            condition: spec.condition.clone(),
            severity: spec.severity,
            tags: spec.tags.clone(),
            owner: spec.owner.clone(),
            state: AlarmState::Armed,
            version: 1,
            created: Stamp::of(event),
            updated: Stamp::of(event),
            last_trigger: None,
            last_trigger_value: None,
            last_trigger_message: None,
            last_ack: None,
            last_ack_comment: None,
        })
    }

    /// Applies an event of this alarm. Events come from the log, where the writer only put
    /// events that `decide` produced, so this cannot fail.
    pub fn apply(&mut self, event: &Event) {
        match &event.data {
            EventData::Created(_) => {}
            EventData::Updated(c) => {
                if let Some(v) = &c.name {
                    self.name = v.clone();
                }
                if let Some(v) = &c.instrument {
                    self.instrument = v.clone();
                }
                if let Some(v) = &c.condition {
                    self.condition = v.clone();
                }
                if let Some(v) = c.severity {
                    self.severity = v;
                }
                if let Some(v) = &c.tags {
                    self.tags = v.clone();
                }
            }
            EventData::Triggered { value, message } => {
                self.state = AlarmState::Triggered;
                self.last_trigger = Some(Stamp::of(event));
                self.last_trigger_value = value.clone();
                self.last_trigger_message = message.clone();
            }
            EventData::Acknowledged { comment } => {
                self.state = AlarmState::Acknowledged;
                self.last_ack = Some(Stamp::of(event));
                self.last_ack_comment = comment.clone();
            }
            EventData::Rearmed => self.state = AlarmState::Armed,
            EventData::Deleted => self.state = AlarmState::Deleted,
        }
        self.version += 1;
        self.updated = Stamp::of(event);
    }

    /// The wire form of an alarm (PROTOCOL.md `alarm`). Optional fields are `null` when unset so
    /// that clients see one fixed shape.
    pub fn to_json(&self) -> Value {
        // A struct of strings, numbers and options always converts (serde_json fails only on
        // non-string map keys and non-finite floats, neither of which it has).
        serde_json::to_value(self.view()).unwrap_or_default()
    }

    /// The wire form, borrowed, for writing straight to bytes (`write_alarms_json`).
    pub fn view(&self) -> AlarmView<'_> {
        let at = |s: &Option<Stamp>| s.as_ref().map(|s| s.at.to_rfc3339());
        fn by(s: &Option<Stamp>) -> Option<&str> {
            s.as_ref().map(|s| s.by.as_str())
        }
        let offset = |s: &Option<Stamp>| s.as_ref().map(|s| s.offset);
        AlarmView {
            condition: &self.condition,
            created_at: self.created.at.to_rfc3339(),
            created_by: &self.created.by,
            id: self.id,
            instrument: &self.instrument,
            last_ack_comment: self.last_ack_comment.as_deref(),
            last_ack_offset: offset(&self.last_ack),
            last_acked_at: at(&self.last_ack),
            last_acked_by: by(&self.last_ack),
            last_offset: self.updated.offset,
            last_trigger_message: self.last_trigger_message.as_deref(),
            last_trigger_offset: offset(&self.last_trigger),
            last_trigger_value: self.last_trigger_value.as_deref(),
            last_triggered_at: at(&self.last_trigger),
            last_triggered_by: by(&self.last_trigger),
            name: &self.name,
            owner: &self.owner,
            severity: self.severity.as_str(),
            state: self.state.as_str(),
            tags: &self.tags,
            updated_at: self.updated.at.to_rfc3339(),
            updated_by: &self.updated.by,
            version: self.version,
        }
    }
}

/// The wire form of an alarm (PROTOCOL.md `alarm`), borrowing from it. Fields in code-point
/// order, the order a `serde_json::Value` map writes them in, so `to_json` and
/// `write_alarms_json` give the same bytes (a test checks).
#[derive(Serialize)]
pub struct AlarmView<'a> {
    condition: &'a str,
    created_at: String,
    created_by: &'a str,
    id: Uuid,
    instrument: &'a str,
    last_ack_comment: Option<&'a str>,
    last_ack_offset: Option<u64>,
    last_acked_at: Option<String>,
    last_acked_by: Option<&'a str>,
    last_offset: u64,
    last_trigger_message: Option<&'a str>,
    last_trigger_offset: Option<u64>,
    last_trigger_value: Option<&'a str>,
    last_triggered_at: Option<String>,
    last_triggered_by: Option<&'a str>,
    name: &'a str,
    owner: &'a str,
    severity: &'static str,
    state: &'static str,
    tags: &'a [String],
    updated_at: String,
    updated_by: &'a str,
    version: u64,
}

/// Appends `alarms` as a JSON array of their wire forms, without building a `Value` per alarm
/// (a state answer of 10,000 alarms is ~6 MB).
pub fn write_alarms_json<'a>(
    out: &mut Vec<u8>,
    alarms: impl IntoIterator<Item = &'a Alarm>,
) -> serde_json::Result<()> {
    out.push(b'[');
    for (i, a) in alarms.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, &a.view())?;
    }
    out.push(b']');
    Ok(())
}
