//! alarm-ledger: an event-sourced alarm ledger server.
//!
//! The data flow, top to bottom:
//! - `config` parses and validates every option; `telemetry` sets up tracing.
//! - `startup` opens the store, rebuilds the projection, spawns the writer and serves HTTP/WS.
//! - `protocol` is the only place that knows the wire JSON; `http/` maps routes and the WebSocket.
//! - `ledger::writer` is the single writer: queue → decide → append batch → one durable sync →
//!   apply to the projection → publish to `ledger::hub` → answer.
//! - `domain/` is pure: the alarm state machine (`decide(state, command) → event | rejection`).
//! - `projection` folds events into the current state; it cannot fail.
//! - `store/` is the log behind the `EventLog` trait: sled today, codec and hash chain beside it.
//! - `auth/` holds users, passwords, tokens, login throttling and the security log.

pub mod auth;
pub mod background;
pub mod backup;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod export;
pub mod http;
pub mod ledger;
pub mod memory;
pub mod metrics;
pub mod projection;
pub mod protocol;
pub mod read_copy;
pub mod shutdown;
pub mod staging;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod verify;
