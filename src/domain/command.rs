//! Commands and the state machine: `decide(current, command) → Decision | Rejection`.
//!
//! `decide` is a pure function of the alarm's current state and the command; the writer calls it
//! in queue order, so two racing triggers are decided one after the other and the second one
//! learns that the first won (`Decision::Already`).

use super::alarm::{Alarm, AlarmState};
use super::event::{AlarmChanges, AlarmSpec, EventData};
use uuid::Uuid;

/// Limits on client-supplied text, checked at the boundary (`protocol`) before a command exists.
pub mod limits {
    pub const NAME_MAX: usize = 200;
    pub const TEXT_MAX: usize = 4096;
    pub const TAGS_MAX: usize = 32;
    pub const TAG_MAX: usize = 64;
    pub const ACTOR_MAX: usize = 64;
}

/// What the command asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandKind {
    /// `spec.owner` is the creating user.
    Create(AlarmSpec),
    Update(AlarmChanges),
    Trigger {
        value: Option<String>,
        message: Option<String>,
    },
    Ack {
        comment: Option<String>,
    },
    Rearm,
    Delete,
}

impl CommandKind {
    pub fn name(&self) -> &'static str {
        match self {
            CommandKind::Create(_) => "create",
            CommandKind::Update(_) => "update",
            CommandKind::Trigger { .. } => "trigger",
            CommandKind::Ack { .. } => "ack",
            CommandKind::Rearm => "rearm",
            CommandKind::Delete => "delete",
        }
    }
}

/// A validated command from an authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub alarm_id: Uuid,
    pub kind: CommandKind,
    pub actor: String,
    /// Idempotency key: a repeat returns the original outcome and appends nothing.
    pub command_id: Option<Uuid>,
    /// Optimistic concurrency: the alarm's `version` the client expects (0 = must not exist).
    pub expected_version: Option<u64>,
}

/// The outcome of a command that is not rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Append one event with this payload.
    Append(EventData),
    /// Already in effect; nothing to append. `offset` is the event that put it in effect
    /// (e.g. the trigger that won).
    Already { offset: u64 },
}

/// Why a command was refused: always the client's fault, never an I/O failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("alarm {0} not found")]
    NotFound(Uuid),
    #[error("alarm {0} already exists")]
    AlreadyExists(Uuid),
    #[error("alarm is not triggered")]
    NotTriggered,
    #[error("alarm is triggered and not acknowledged; acknowledge it before rearming")]
    NotAcknowledged,
    #[error("alarm {0} is deleted")]
    AlarmDeleted(Uuid),
    #[error("expected version {expected}, alarm is at version {actual}")]
    VersionConflict { expected: u64, actual: u64 },
    #[error("{0}")]
    Invalid(String),
}

impl Rejection {
    /// The protocol error code (PROTOCOL.md).
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NotFound(_) => "not_found",
            Rejection::AlreadyExists(_) | Rejection::VersionConflict { .. } => "version_conflict",
            Rejection::NotTriggered => "not_triggered",
            Rejection::NotAcknowledged => "not_acknowledged",
            Rejection::AlarmDeleted(_) => "alarm_deleted",
            Rejection::Invalid(_) => "bad_request",
        }
    }
}

/// The `&'static` form of a stored rejection code (see `Rejection::code`).
pub fn static_code(code: &str) -> &'static str {
    match code {
        "not_found" => "not_found",
        "version_conflict" => "version_conflict",
        "not_triggered" => "not_triggered",
        "not_acknowledged" => "not_acknowledged",
        "alarm_deleted" => "alarm_deleted",
        _ => "bad_request",
    }
}

/// The state machine. `current` is the alarm as of the last event the writer accepted.
pub fn decide(current: Option<&Alarm>, cmd: &Command) -> Result<Decision, Rejection> {
    let alarm = match (current, &cmd.kind) {
        (None, CommandKind::Create(spec)) => {
            if let Some(v) = cmd.expected_version {
                if v != 0 {
                    return Err(Rejection::VersionConflict {
                        expected: v,
                        actual: 0,
                    });
                }
            }
            return Ok(Decision::Append(EventData::Created(spec.clone())));
        }
        (Some(a), CommandKind::Create(_)) => {
            if a.state == AlarmState::Deleted {
                return Err(Rejection::AlarmDeleted(a.id));
            }
            // `expected_version: 0` says "must not exist yet": a mismatch like any other.
            if let Some(expected) = cmd.expected_version.filter(|v| *v != a.version) {
                return Err(Rejection::VersionConflict {
                    expected,
                    actual: a.version,
                });
            }
            return Err(Rejection::AlreadyExists(a.id));
        }
        (None, _) => return Err(Rejection::NotFound(cmd.alarm_id)),
        (Some(a), _) => a,
    };
    if alarm.state == AlarmState::Deleted {
        return Err(Rejection::AlarmDeleted(alarm.id));
    }
    if let Some(expected) = cmd.expected_version {
        if expected != alarm.version {
            return Err(Rejection::VersionConflict {
                expected,
                actual: alarm.version,
            });
        }
    }
    let already = |s: &Option<super::alarm::Stamp>| Decision::Already {
        offset: s.as_ref().map_or(alarm.updated.offset, |s| s.offset),
    };
    match (&cmd.kind, alarm.state) {
        (CommandKind::Create(_), _) => unreachable_create(),
        (CommandKind::Update(changes), _) => {
            if changes.is_empty() {
                return Err(Rejection::Invalid("update without changes".into()));
            }
            Ok(Decision::Append(EventData::Updated(changes.clone())))
        }
        (CommandKind::Trigger { value, message }, AlarmState::Armed) => {
            Ok(Decision::Append(EventData::Triggered {
                value: value.clone(),
                message: message.clone(),
            }))
        }
        // The same firing, already seen: the first trigger won.
        (CommandKind::Trigger { .. }, AlarmState::Triggered | AlarmState::Acknowledged) => {
            Ok(already(&alarm.last_trigger))
        }
        (CommandKind::Ack { comment }, AlarmState::Triggered) => {
            Ok(Decision::Append(EventData::Acknowledged {
                comment: comment.clone(),
            }))
        }
        (CommandKind::Ack { .. }, AlarmState::Acknowledged) => Ok(already(&alarm.last_ack)),
        (CommandKind::Ack { .. }, AlarmState::Armed) => Err(Rejection::NotTriggered),
        (CommandKind::Rearm, AlarmState::Acknowledged) => Ok(Decision::Append(EventData::Rearmed)),
        (CommandKind::Rearm, AlarmState::Armed) => Ok(Decision::Already {
            offset: alarm.updated.offset,
        }),
        (CommandKind::Rearm, AlarmState::Triggered) => Err(Rejection::NotAcknowledged),
        (CommandKind::Delete, _) => Ok(Decision::Append(EventData::Deleted)),
        (_, AlarmState::Deleted) => Err(Rejection::AlarmDeleted(alarm.id)),
    }
}

/// Create is fully handled before the match; kept as a function so the match stays exhaustive
/// without a panic.
fn unreachable_create() -> Result<Decision, Rejection> {
    Err(Rejection::Invalid("create of an existing alarm".into()))
}
