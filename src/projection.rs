//! The projection: current state of every alarm, folded from the log in offset order.
//!
//! `apply` cannot fail and knows nothing of storage. The writer applies a batch only after it is
//! durable; queries read under the shared `RwLock` of the ledger's `ReadModel`.

use crate::domain::{Alarm, AlarmState, Event, EventData};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use uuid::Uuid;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Projection {
    alarms: HashMap<Uuid, Alarm>,
    /// Offset of the last event applied (0 = none).
    offset: u64,
}

/// Which alarms a listing returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum StateFilter {
    /// Every alarm that is not deleted.
    #[default]
    Current,
    Only(AlarmState),
}

impl Projection {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_parts(alarms: Vec<Alarm>, offset: u64) -> Self {
        Projection {
            alarms: alarms.into_iter().map(|a| (a.id, a)).collect(),
            offset,
        }
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> usize {
        self.alarms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alarms.is_empty()
    }

    pub fn get(&self, id: &Uuid) -> Option<&Alarm> {
        self.alarms.get(id)
    }

    /// Applies the next event. Events at or below the current offset are ignored so that a
    /// replay overlapping a snapshot is harmless.
    pub fn apply(&mut self, event: &Event) {
        if event.offset <= self.offset {
            return;
        }
        self.offset = event.offset;
        match &event.data {
            EventData::Created(_) => {
                if let Some(alarm) = Alarm::from_created(event) {
                    self.alarms.insert(alarm.id, alarm);
                }
            }
            _ => {
                if let Some(alarm) = self.alarms.get_mut(&event.alarm_id) {
                    alarm.apply(event);
                }
            }
        }
    }

    /// Alarms matching the filter, sorted by creation offset (stable, oldest first).
    pub fn list(&self, filter: StateFilter) -> Vec<&Alarm> {
        let mut out: Vec<&Alarm> = self
            .alarms
            .values()
            .filter(|a| match filter {
                StateFilter::Current => a.state != AlarmState::Deleted,
                StateFilter::Only(s) => a.state == s,
            })
            .collect();
        out.sort_by_key(|a| a.created.offset);
        out
    }

    /// Every alarm, sorted by id: the deterministic order used by snapshots and comparisons.
    /// `alarms_sorted` without a copy.
    pub fn into_sorted_alarms(self) -> Vec<Alarm> {
        let mut v: Vec<Alarm> = self.alarms.into_values().collect();
        v.sort_by_key(|a| a.id);
        v
    }

    pub fn alarms_sorted(&self) -> Vec<Alarm> {
        let mut v: Vec<Alarm> = self.alarms.values().cloned().collect();
        v.sort_by_key(|a| a.id);
        v
    }
}
