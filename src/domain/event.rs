//! Events: the unit of the log. Each event is one change to one alarm.
//!
//! These types are also the on-disk record body (bincode, see `store::codec`): bincode encodes
//! struct fields and enum variants **by position**. Never reorder fields or variants; add new
//! variants at the end and bump `store::codec::FORMAT_VERSION`. The golden files in `snapshots/`
//! prove that every old record still decodes byte for byte.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::alarm::Severity;

/// A SHA-256 digest (the chain hash of an event).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[(b >> 4) as usize]));
            s.push(char::from(HEX[(b & 0xf) as usize]));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = hex_val(pair[0])?;
            let lo = hex_val(pair[1])?;
            out[i] = (hi << 4) | lo;
        }
        Some(Hash(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

/// The fields of a new alarm (the payload of `alarm_created`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmSpec {
    pub name: String,
    pub instrument: String,
    pub condition: String,
    pub severity: Severity,
    pub tags: Vec<String>,
    pub owner: String,
}

/// The fields an `update` changes; `None` = unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AlarmChanges {
    pub name: Option<String>,
    pub instrument: Option<String>,
    pub condition: Option<String>,
    pub severity: Option<Severity>,
    pub tags: Option<Vec<String>>,
}

impl AlarmChanges {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.instrument.is_none()
            && self.condition.is_none()
            && self.severity.is_none()
            && self.tags.is_none()
    }
}

/// The kind-specific payload of an event. Variant order is part of the disk format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventData {
    Created(AlarmSpec),
    Updated(AlarmChanges),
    Triggered {
        value: Option<String>,
        message: Option<String>,
    },
    Acknowledged {
        comment: Option<String>,
    },
    Rearmed,
    Deleted,
}

/// The wire name of an event's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    AlarmCreated,
    AlarmUpdated,
    AlarmTriggered,
    AlarmAcknowledged,
    AlarmRearmed,
    AlarmDeleted,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::AlarmCreated,
        EventKind::AlarmUpdated,
        EventKind::AlarmTriggered,
        EventKind::AlarmAcknowledged,
        EventKind::AlarmRearmed,
        EventKind::AlarmDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AlarmCreated => "alarm_created",
            EventKind::AlarmUpdated => "alarm_updated",
            EventKind::AlarmTriggered => "alarm_triggered",
            EventKind::AlarmAcknowledged => "alarm_acknowledged",
            EventKind::AlarmRearmed => "alarm_rearmed",
            EventKind::AlarmDeleted => "alarm_deleted",
        }
    }
}

impl EventData {
    pub fn kind(&self) -> EventKind {
        match self {
            EventData::Created(_) => EventKind::AlarmCreated,
            EventData::Updated(_) => EventKind::AlarmUpdated,
            EventData::Triggered { .. } => EventKind::AlarmTriggered,
            EventData::Acknowledged { .. } => EventKind::AlarmAcknowledged,
            EventData::Rearmed => EventKind::AlarmRearmed,
            EventData::Deleted => EventKind::AlarmDeleted,
        }
    }

    /// The `data` object of the JSON form. Absent optional fields are omitted, never `null`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        match self {
            EventData::Created(spec) => {
                m.insert("name".into(), json!(spec.name));
                m.insert("instrument".into(), json!(spec.instrument));
                m.insert("condition".into(), json!(spec.condition));
                m.insert("severity".into(), json!(spec.severity.as_str()));
                m.insert("tags".into(), json!(spec.tags));
                m.insert("owner".into(), json!(spec.owner));
            }
            EventData::Updated(c) => {
                if let Some(v) = &c.name {
                    m.insert("name".into(), json!(v));
                }
                if let Some(v) = &c.instrument {
                    m.insert("instrument".into(), json!(v));
                }
                if let Some(v) = &c.condition {
                    m.insert("condition".into(), json!(v));
                }
                if let Some(v) = &c.severity {
                    m.insert("severity".into(), json!(v.as_str()));
                }
                if let Some(v) = &c.tags {
                    m.insert("tags".into(), json!(v));
                }
            }
            EventData::Triggered { value, message } => {
                if let Some(v) = value {
                    m.insert("value".into(), json!(v));
                }
                if let Some(v) = message {
                    m.insert("message".into(), json!(v));
                }
            }
            EventData::Acknowledged { comment } => {
                if let Some(v) = comment {
                    m.insert("comment".into(), json!(v));
                }
            }
            EventData::Rearmed | EventData::Deleted => {}
        }
        Value::Object(m)
    }
}

/// One entry of the log. `offset` is assigned by the writer only: gapless, first = 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub offset: u64,
    /// UUIDv7: unique and time-ordered, so an event can be cited without its ledger.
    pub id: Uuid,
    /// Never decreases along the log, even if the wall clock steps back.
    pub at: Timestamp,
    pub actor: String,
    pub alarm_id: Uuid,
    /// The client's idempotency key, kept so dedup survives any rebuild.
    pub command_id: Option<Uuid>,
    pub data: EventData,
    pub hash: Hash,
}

impl Event {
    pub fn kind(&self) -> EventKind {
        self.data.kind()
    }

    /// The JSON object of the event without `hash` and without a wire `type`.
    /// With `ledger_id` it is exactly the object whose canonical form is hashed.
    pub fn json_body(&self, ledger_id: Option<Uuid>) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("offset".into(), json!(self.offset));
        m.insert("id".into(), json!(self.id.to_string()));
        m.insert("at".into(), json!(self.at.to_rfc3339()));
        m.insert("actor".into(), json!(self.actor));
        m.insert("kind".into(), json!(self.kind().as_str()));
        m.insert("alarm_id".into(), json!(self.alarm_id.to_string()));
        if let Some(c) = self.command_id {
            m.insert("command_id".into(), json!(c.to_string()));
        }
        m.insert("data".into(), self.data.to_json());
        if let Some(l) = ledger_id {
            m.insert("ledger_id".into(), json!(l.to_string()));
        }
        m
    }

    /// The full JSON form (with `hash`), as exported and streamed.
    pub fn to_json(&self, ledger_id: Option<Uuid>) -> Map<String, Value> {
        let mut m = self.json_body(ledger_id);
        m.insert("hash".into(), json!(self.hash.to_hex()));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_hex_round_trip() {
        let h = Hash([0xab; 32]);
        let s = h.to_hex();
        assert_eq!(s.len(), 64);
        assert_eq!(Hash::from_hex(&s), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(Hash::from_hex(&"g".repeat(64)), None);
    }
}
