//! Alarm commands over HTTP: the same `Command`s and the same `ok` answers as the WebSocket.

use super::errors::ApiError;
use super::session::{authenticate, Principal};
use super::{json_ok, Request, State};
use crate::domain::{Command, CommandKind};
use crate::protocol::{self, Changes, NewAlarm, ValueText};
use serde::Deserialize;
use uuid::Uuid;
use warp::reply::Response;

/// Fields common to every command body.
#[derive(Debug, Deserialize, Default)]
struct Common {
    #[serde(default)]
    command_id: Option<Uuid>,
    #[serde(default)]
    expected_version: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ActionBody {
    #[serde(default)]
    value: Option<ValueText>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct UpdateBody {
    #[serde(flatten)]
    changes: Changes,
    #[serde(flatten)]
    common: Common,
}

fn operator(state: &State, req: &Request) -> Result<Principal, ApiError> {
    let p = authenticate(state, &req.headers)?;
    p.require_operator()?;
    Ok(p)
}

fn alarm_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no alarm {id:?} (not a UUID)")))
}

/// The `Idempotency-Key` header (a UUID), else the body's `command_id`. Two keys, or a key and
/// a `command_id` that differ, are refused: which one would the retry be deduplicated on?
fn command_id(req: &Request, body: Option<Uuid>) -> Result<Option<Uuid>, ApiError> {
    let mut keys = req.headers.get_all("idempotency-key").iter();
    let Some(v) = keys.next() else {
        return Ok(body);
    };
    if keys.next().is_some() {
        return Err(ApiError::bad_request(
            "Idempotency-Key given more than once",
        ));
    }
    let key = v
        .to_str()
        .ok()
        .and_then(|s| Uuid::parse_str(s.trim()).ok())
        // An empty key too: a client whose key came out empty would otherwise lose its
        // protection against a double apply without a word.
        .ok_or_else(|| ApiError::bad_request("Idempotency-Key must be a UUID"))?;
    match body {
        Some(c) if c != key => Err(ApiError::bad_request(
            "Idempotency-Key and the body's command_id differ (give one, or the same)",
        )),
        _ => Ok(Some(key)),
    }
}

async fn run(state: &State, cmd: Command) -> Result<Response, ApiError> {
    let o = state.ledger.submit(cmd).await?;
    Ok(json_ok(&protocol::ok_value(
        &None,
        o.offset,
        o.alarm_id,
        o.already,
        o.duplicate,
    )))
}

pub async fn create(state: &State, req: &Request) -> Result<Response, ApiError> {
    let p = operator(state, req)?;
    #[derive(Deserialize)]
    struct Body {
        #[serde(flatten)]
        alarm: NewAlarm,
        #[serde(default)]
        command_id: Option<Uuid>,
        #[serde(default)]
        expected_version: Option<u64>,
    }
    let body: Body = req.json()?;
    let cid = command_id(req, body.command_id)?;
    let cmd = body
        .alarm
        .into_command(&p.name, cid, body.expected_version)?;
    run(state, cmd).await
}

pub async fn action(
    state: &State,
    req: &Request,
    id: &str,
    action: &str,
) -> Result<Response, ApiError> {
    let p = operator(state, req)?;
    let alarm_id = alarm_id(id)?;
    let body: ActionBody = req.json()?;
    let kind = match action {
        "trigger" => protocol::trigger_kind(body.value, body.message)?,
        "ack" => protocol::ack_kind(body.comment)?,
        _ => CommandKind::Rearm,
    };
    let cmd = Command {
        alarm_id,
        kind,
        actor: p.name,
        command_id: command_id(req, body.common.command_id)?,
        expected_version: body.common.expected_version,
    };
    run(state, cmd).await
}

pub async fn update(state: &State, req: &Request, id: &str) -> Result<Response, ApiError> {
    let p = operator(state, req)?;
    let alarm_id = alarm_id(id)?;
    let body: UpdateBody = req.json()?;
    let cmd = Command {
        alarm_id,
        kind: CommandKind::Update(body.changes.into_changes()?),
        actor: p.name,
        command_id: command_id(req, body.common.command_id)?,
        expected_version: body.common.expected_version,
    };
    run(state, cmd).await
}

pub async fn delete(state: &State, req: &Request, id: &str) -> Result<Response, ApiError> {
    let p = operator(state, req)?;
    let alarm_id = alarm_id(id)?;
    let body: Common = req.json()?;
    let cmd = Command {
        alarm_id,
        kind: CommandKind::Delete,
        actor: p.name,
        command_id: command_id(req, body.command_id)?,
        expected_version: body.expected_version,
    };
    run(state, cmd).await
}
