//! The pure domain: the alarm model, its events and the state machine that turns a command into
//! an event or a typed rejection. Nothing here knows warp, sled or JSON I/O, and nothing can fail
//! on I/O.

pub mod alarm;
pub mod command;
pub mod event;

pub use alarm::{write_alarms_json, Alarm, AlarmState, AlarmView, Severity};
pub use command::{decide, Command, CommandKind, Decision, Rejection};
pub use event::{AlarmChanges, AlarmSpec, Event, EventData, EventKind, Hash};
