//! Read-only routes: ledger info, alarms (current or as of a point), history, the event stream.

use super::errors::ApiError;
use super::session::{authenticate, Principal};
use super::{json_ok, Request, State};
use crate::auth::SecurityAction;
use crate::domain::AlarmState;
use crate::export::{self, EventFilter};
use crate::projection::StateFilter;
use crate::time::Timestamp;
use serde_json::json;
use uuid::Uuid;
use warp::reply::Response;
use warp::Reply;

pub async fn ledger(state: &State, req: &Request) -> Result<Response, ApiError> {
    authenticate(state, &req.headers)?;
    let info = state.ledger.info();
    let head = state.ledger.head();
    Ok(json_ok(&json!({
        "ledger_id": info.ledger_id.to_string(),
        "head": head.offset,
        "head_hash": head.hash.to_hex(),
        "created_at": info.created_at.to_rfc3339(),
        "format_version": info.format_version,
    })))
}

use crate::config::parse_offset;

/// `as_of`: an offset, or an RFC 3339 time (the last event with `at` ≤ it).
fn parse_as_of(v: &str) -> Result<crate::config::AsOf, ApiError> {
    crate::config::AsOf::parse(v).map_err(|e| ApiError::bad_request(format!("as_of: {e}")))
}

/// The offset an `as_of` point stands for (a time: a look-up in the log).
fn as_of_offset(state: &State, point: crate::config::AsOf) -> Result<u64, ApiError> {
    match point {
        crate::config::AsOf::Offset(n) => Ok(n),
        crate::config::AsOf::Time(t) => Ok(state.ledger.offset_at_time(t)?),
    }
}

fn state_filter(v: Option<&str>) -> Result<StateFilter, ApiError> {
    match v {
        None | Some("") => Ok(StateFilter::Current),
        Some(s) => AlarmState::parse(s).map(StateFilter::Only).ok_or_else(|| {
            ApiError::bad_request(format!(
                "state must be armed, triggered, acknowledged or deleted, got {s:?}"
            ))
        }),
    }
}

/// Reconstructions of a past state (`GET /alarms?as_of=`) at once, server-wide. Each replays the
/// log from offset 1 to its point (about a second of CPU per million events) and holds the
/// whole projection it builds, so without a bound a burst of them would take every core from
/// the writer and the fan-out, and memory with them. Beyond it: `503 overloaded`, Retry-After 1.
pub const MAX_AS_OF_BUILDS: usize = 2;

pub async fn alarms(state: &State, req: &Request) -> Result<Response, ApiError> {
    let principal = authenticate(state, &req.headers)?;
    let q = req.query_pairs()?;
    // Refused rather than ignored: a misspelt `as_of` would answer the current state as if it
    // were the historical one.
    if let Some((k, _)) = q.iter().find(|(k, _)| k != "as_of" && k != "state") {
        return Err(ApiError::bad_request(format!(
            "unknown parameter {k:?}: the parameters are as_of and state"
        )));
    }
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let filter = state_filter(get("state"))?;
    let Some(v) = get("as_of").filter(|v| !v.is_empty()) else {
        return state.current_state.answer(&state.ledger, filter).await;
    };
    // Malformed input is a 400 whatever the load: checked before a slot is taken.
    let point = parse_as_of(v)?;
    let permit = state
        .as_of_builds
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::overloaded(format!(
                "{MAX_AS_OF_BUILDS} past states are already being reconstructed; retry shortly"
            ))
        })?;
    // A reconstruction of the past is a read of the audit trail: who looked at which point.
    let mut details = serde_json::Map::new();
    details.insert("as_of".into(), json!(v));
    if let Some(s) = get("state") {
        details.insert("state".into(), json!(s));
    }
    audit(
        state,
        req,
        &principal,
        SecurityAction::StateAsOfRead,
        "alarms",
        serde_json::Value::Object(details),
    )
    .await?;
    let ledger = state.ledger.clone();
    let st = state.clone();
    // A thread of its own at the lowest CPU priority, as backups: the replay must not delay the
    // writer (`background::lowest_priority`).
    let body = crate::background::run("as-of", move || -> Result<_, ApiError> {
        let _permit = permit;
        let offset = as_of_offset(&st, point)?.min(ledger.head().offset);
        let p = ledger.projection_as_of(offset)?;
        state_answer(offset, p.list(filter))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(json_bytes(body))
}

/// Current-state answers (`GET /api/v1/alarms` without `as_of`), which every client loads when
/// it connects: 10,000 alarms are ~6 MB of JSON and ~30 ms of CPU to build.
///
/// - **Off the event loop**: built on the blocking pool, so WebSocket delivery does not wait
///   behind them.
/// - **One build at a time per filter, shared**: requests that arrive while one is built wait
///   for it, and
///   any answer whose offset is at or beyond the head a request saw when it arrived is served to
///   it as built. A request never gets a state older than what it could see (a client that got
///   `ok` at offset N and then asks gets a state at N or later), and the answer names its offset,
///   which is all a client needs to subscribe after it. After a burst of reconnects this is one
///   or two builds, not one per client.
/// - Only answers at the newest offset built are kept (one per filter at most): an older one
///   can serve no new request, since each asks for the head or later.
#[derive(Default)]
pub struct CurrentState {
    built: std::sync::Mutex<std::collections::HashMap<StateFilter, (u64, bytes::Bytes)>>,
    /// One build lock per filter (a large `state=deleted` build does not hold up the rest).
    building: std::sync::Mutex<
        std::collections::HashMap<StateFilter, std::sync::Arc<tokio::sync::Mutex<()>>>,
    >,
}

impl CurrentState {
    /// The answer (`{"alarms":[…],"offset":N}`) at the head or later.
    pub async fn answer(
        &self,
        ledger: &std::sync::Arc<crate::ledger::Ledger>,
        filter: StateFilter,
    ) -> Result<Response, ApiError> {
        let seen = ledger.head().offset;
        let body = match self.cached(filter, seen) {
            Some(body) => body,
            None => {
                let turn = self
                    .building
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(filter)
                    .or_default()
                    .clone();
                let _turn = turn.lock().await;
                match self.cached(filter, seen) {
                    Some(body) => body,
                    None => {
                        let ledger = ledger.clone();
                        let (offset, body) =
                            tokio::task::spawn_blocking(move || build_answer(&ledger, filter))
                                .await
                                .map_err(|e| ApiError::internal(e.to_string()))??;
                        let mut built = self.lock();
                        built.retain(|_, (o, _)| *o >= offset);
                        built.insert(filter, (offset, body.clone()));
                        body
                    }
                }
            }
        };
        Ok(json_bytes(body))
    }

    fn cached(&self, filter: StateFilter, seen: u64) -> Option<bytes::Bytes> {
        match self.lock().get(&filter) {
            Some((offset, body)) if *offset >= seen => Some(body.clone()),
            _ => None,
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<StateFilter, (u64, bytes::Bytes)>>
    {
        self.built.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The current-state answer's bytes and offset (blocking: the alarms are copied under the read
/// lock, then written out without it, so the writer is never held up by the JSON).
fn build_answer(
    ledger: &crate::ledger::Ledger,
    filter: StateFilter,
) -> Result<(u64, bytes::Bytes), ApiError> {
    let (offset, alarms) = ledger.alarms(filter);
    Ok((offset, state_answer(offset, &alarms)?))
}

/// `{"alarms":[…],"offset":N}`, written straight to bytes.
fn state_answer<'a>(
    offset: u64,
    alarms: impl IntoIterator<Item = &'a crate::domain::Alarm>,
) -> Result<bytes::Bytes, ApiError> {
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(b"{\"alarms\":");
    crate::domain::write_alarms_json(&mut out, alarms)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    out.extend_from_slice(b",\"offset\":");
    out.extend_from_slice(offset.to_string().as_bytes());
    out.push(b'}');
    // `Bytes` keeps the whole capacity of the Vec: the cache holds exactly the answer.
    out.shrink_to_fit();
    Ok(bytes::Bytes::from(out))
}

/// A JSON answer from its bytes.
fn json_bytes(body: bytes::Bytes) -> Response {
    let mut resp = warp::http::Response::new(body).into_response();
    resp.headers_mut().insert(
        "content-type",
        warp::http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no alarm {id:?} (not a UUID)")))
}

pub async fn alarm(state: &State, req: &Request, id: &str) -> Result<Response, ApiError> {
    authenticate(state, &req.headers)?;
    let id = parse_id(id)?;
    match state.ledger.alarm(&id) {
        Some(a) => Ok(json_ok(&a.to_json())),
        None => Err(ApiError::not_found(format!("no alarm {id}"))),
    }
}

/// Records who read the audit trail, with which filters (security log, durable), once the
/// reader's budget of audited reads (`PerUserLimit::audit_reads`) allows it: `429 rate_limited`
/// otherwise, and nothing is read.
async fn audit(
    state: &State,
    req: &Request,
    p: &Principal,
    action: SecurityAction,
    target: &str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    super::admin::audit_read_budget(state, &p.name)?;
    let mut e = super::admin::entry(state, req, action)
        .actor(p.name.clone())
        .target(target);
    if let serde_json::Value::Object(m) = details {
        for (k, v) in m {
            e = e.detail(k, v);
        }
    }
    super::admin::record_read(state, e).await;
    Ok(())
}

pub async fn history(state: &State, req: &Request, id: &str) -> Result<Response, ApiError> {
    let p = authenticate(state, &req.headers)?;
    let id = parse_id(id)?;
    if state.ledger.alarm(&id).is_none() {
        return Err(ApiError::not_found(format!("no alarm {id}")));
    }
    let permit = super::stream::permit(state)?;
    audit(
        state,
        req,
        &p,
        SecurityAction::HistoryRead,
        &format!("alarm:{id}"),
        json!({"alarm_id": id.to_string()}),
    )
    .await?;
    // Streamed: a flapping alarm's history grows without bound (a trigger-ack-rearm cycle
    // every 10 s is ~3M events a year), so it is never built whole in memory.
    let ledger = state.ledger.clone();
    let head = state.ledger.head().offset;
    Ok(super::stream::json(state, permit, move |sink| {
        let ledger_id = ledger.info().ledger_id;
        let mut first = true;
        let open = sink.line(|buf| {
            buf.extend_from_slice(b"{\"alarm_id\":\"");
            buf.extend_from_slice(id.to_string().as_bytes());
            buf.extend_from_slice(b"\",\"events\":[");
        });
        if !open {
            return Ok(());
        }
        let filter = EventFilter {
            alarm_id: Some(id),
            ..EventFilter::default()
        };
        export::for_each(ledger.log().as_ref(), head, &filter, |e| {
            let comma = !std::mem::take(&mut first);
            sink.line(|buf| {
                if comma {
                    buf.push(b',');
                }
                crate::protocol::write_export_line(buf, e, ledger_id);
            })
        })
        .map_err(|e| e.to_string())?;
        sink.line(|buf| buf.extend_from_slice(b"]}"));
        Ok(())
    }))
}

fn parse_filter(req: &Request) -> Result<EventFilter, ApiError> {
    let mut f = EventFilter::default();
    for (k, v) in req.query_pairs()? {
        let num = |v: &str| {
            parse_offset(v).ok_or_else(|| {
                ApiError::bad_request(format!("{k} must be a non-negative integer, got {v:?}"))
            })
        };
        // `since` is a lower bound: finer than a millisecond rounds up (events are stamped in
        // milliseconds; one at .123 is before .1235); `until` rounds down.
        let time = |v: &str| {
            let parse = if k == "since" {
                Timestamp::parse_rfc3339_ceil
            } else {
                Timestamp::parse_rfc3339
            };
            parse(v).ok_or_else(|| {
                ApiError::bad_request(format!("{k} must be an RFC 3339 time, got {v:?}"))
            })
        };
        match k.as_str() {
            "from" => f.from = Some(num(&v)?),
            "to" => f.to = Some(num(&v)?),
            "limit" => f.limit = Some(num(&v)?),
            "since" => f.since = Some(time(&v)?),
            "until" => f.until = Some(time(&v)?),
            "alarm_id" => {
                f.alarm_id = Some(Uuid::parse_str(&v).map_err(|_| {
                    ApiError::bad_request(format!("alarm_id must be a UUID, got {v:?}"))
                })?)
            }
            "actor" => f.actor = Some(v),
            // Refused rather than ignored: a misspelt filter (`alarm=` for `alarm_id=`) would
            // otherwise return the whole log as if it were the filtered audit extract.
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {k:?}: the filters are from, to, limit, since, until, alarm_id and actor"
                )))
            }
        }
    }
    if let Some(why) = f.inverted() {
        return Err(ApiError::bad_request(why.describe("")));
    }
    Ok(f)
}

/// NDJSON, streamed from the log in chunks: memory stays constant whatever the log's size.
pub async fn events(state: &State, req: &Request) -> Result<Response, ApiError> {
    let p = authenticate(state, &req.headers)?;
    let filter = parse_filter(req)?;
    let head = state.ledger.head().offset;
    if let Some(from) = filter.from {
        if from > head + 1 {
            return Err(ApiError::new(
                "offset_out_of_range",
                format!("from {from} is beyond the head {head}"),
            ));
        }
    }
    // The place first: a read refused with `overloaded` did not read the trail.
    let permit = super::stream::permit(state)?;
    audit(
        state,
        req,
        &p,
        SecurityAction::AuditExport,
        "events",
        filter.to_json(),
    )
    .await?;
    let ledger = state.ledger.clone();
    Ok(super::stream::ndjson(state, permit, move |sink| {
        let ledger_id = ledger.info().ledger_id;
        export::for_each(ledger.log().as_ref(), head, &filter, |e| {
            sink.line(|buf| crate::protocol::write_export_line(buf, e, ledger_id))
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    }))
}
