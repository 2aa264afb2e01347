//! The wire contract (PROTOCOL.md v1): the only place that knows the JSON of client and server
//! messages. Client input is parsed here into domain types with limits checked, so nothing past
//! this boundary re-validates.

use crate::domain::command::limits;
use crate::domain::{Alarm, AlarmChanges, AlarmSpec, Command, CommandKind, Event, Severity};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

pub const PROTOCOL_VERSION: u32 = 1;

/// A client message's `req`: a string or an integer, echoed verbatim.
pub type Req = Option<Value>;

/// A malformed message: the `error` answer's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Fields of a new alarm, as sent by clients (`create.alarm`, `POST /alarms`).
#[derive(Debug, Deserialize)]
pub struct NewAlarm {
    pub name: String,
    #[serde(default)]
    pub instrument: Option<String>,
    #[serde(default)]
    pub condition: Option<String>,
    #[serde(default)]
    pub severity: Option<String>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub id: Option<Uuid>,
}

/// `update.changes` / `PATCH /alarms/{id}` body.
#[derive(Debug, Deserialize, Default)]
pub struct Changes {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub instrument: Option<String>,
    #[serde(default)]
    pub condition: Option<String>,
    #[serde(default)]
    pub severity: Option<String>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

/// A trigger `value`: a string (the exact text, e.g. `"201.35"`), or an integer, stored as its
/// decimal text. A non-integer JSON number is refused: parsing it would go through a float and
/// could change its digits (`95.40` → `95.4`), and events hold no floats.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ValueText {
    Text(String),
    Number(serde_json::Number),
}

impl ValueText {
    fn into_string(self) -> Result<String, BadRequest> {
        match self {
            ValueText::Text(s) => Ok(s),
            ValueText::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
            ValueText::Number(_) => Err(BadRequest(
                "`value` must be a string holding the exact text (e.g. \"201.35\"); a JSON number is accepted only as an integer of at most 64 bits".into(),
            )),
        }
    }
}

/// Client → server messages.
/// `null` reads as the field's default, as an omitted field does (Qt's `QJsonValue()` is
/// written as `null`).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Subscribe {
        #[serde(default, deserialize_with = "null_as_default")]
        from: u64,
        #[serde(default)]
        ledger_id: Option<Uuid>,
        #[serde(default)]
        from_hash: Option<String>,
        #[serde(default, deserialize_with = "null_as_default")]
        snapshot: bool,
    },
    Unsubscribe {},
    Create {
        alarm: NewAlarm,
        #[serde(default)]
        command_id: Option<Uuid>,
        /// `0`: the alarm must not exist yet (PRODUCT.md: any command may carry it).
        #[serde(default)]
        expected_version: Option<u64>,
    },
    Trigger {
        alarm_id: Uuid,
        #[serde(default)]
        value: Option<ValueText>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        command_id: Option<Uuid>,
        #[serde(default)]
        expected_version: Option<u64>,
    },
    Ack {
        alarm_id: Uuid,
        #[serde(default)]
        comment: Option<String>,
        #[serde(default)]
        command_id: Option<Uuid>,
        #[serde(default)]
        expected_version: Option<u64>,
    },
    Rearm {
        alarm_id: Uuid,
        #[serde(default)]
        command_id: Option<Uuid>,
        #[serde(default)]
        expected_version: Option<u64>,
    },
    Update {
        alarm_id: Uuid,
        changes: Changes,
        #[serde(default)]
        command_id: Option<Uuid>,
        #[serde(default)]
        expected_version: Option<u64>,
    },
    Delete {
        alarm_id: Uuid,
        #[serde(default)]
        command_id: Option<Uuid>,
        #[serde(default)]
        expected_version: Option<u64>,
    },
    Refresh {
        token: String,
    },
    Ping {},
}

/// Parses JSON whose objects may not repeat a key (`StrictValue`) into `T`: HTTP bodies, so
/// that they refuse `{"name":"a","x":1,"x":2}` as WebSocket messages do (serde's derived structs
/// refuse only a repeated field they know).
pub fn from_strict_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, serde_json::Error> {
    serde_json::from_slice::<StrictValue>(bytes)
        .and_then(|StrictValue(v)| serde_json::from_value(v))
}

/// A JSON value whose objects may not repeat a key. serde_json keeps the last of repeated keys
/// without a word, so `{"type":"trigger","alarm_id":A,"alarm_id":B}` would act on B while a
/// proxy or log that read the first saw A. WebSocket messages and HTTP bodies
/// (`from_strict_json`) refuse them, at any depth.
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses one text frame. On failure, returns the `req` (if it could be read) with the error.
pub fn parse_client_message(text: &str) -> Result<(Req, ClientMessage), (Req, BadRequest)> {
    let value: Value = serde_json::from_str::<StrictValue>(text)
        .map_err(|e| (None, BadRequest(format!("invalid JSON: {e}"))))?
        .0;
    let Value::Object(obj) = &value else {
        return Err((None, BadRequest("a message must be a JSON object".into())));
    };
    let req = match obj.get("req") {
        None | Some(Value::Null) => None,
        Some(v @ Value::String(_)) => Some(v.clone()),
        Some(v @ Value::Number(n)) if n.is_i64() || n.is_u64() => Some(v.clone()),
        Some(_) => {
            return Err((
                None,
                BadRequest("`req` must be a string or an integer".into()),
            ))
        }
    };
    match obj.get("type") {
        Some(Value::String(_)) => {}
        Some(_) => return Err((req, BadRequest("`type` must be a string".into()))),
        None => return Err((req, BadRequest("missing field `type`".into()))),
    }
    match serde_json::from_value::<ClientMessage>(value) {
        Ok(m) => Ok((req, m)),
        Err(e) => Err((req, BadRequest(e.to_string()))),
    }
}

fn text(field: &str, v: Option<String>, max: usize) -> Result<Option<String>, BadRequest> {
    match v {
        Some(s) if s.chars().count() > max => Err(BadRequest(format!(
            "`{field}` is longer than {max} characters"
        ))),
        Some(s) if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => {
            Err(BadRequest(format!("`{field}` contains control characters")))
        }
        other => Ok(other),
    }
}

fn name(v: String) -> Result<String, BadRequest> {
    let v = text("name", Some(v), limits::NAME_MAX)?.unwrap_or_default();
    if v.trim().is_empty() {
        return Err(BadRequest("`name` must not be empty".into()));
    }
    Ok(v)
}

fn severity(v: Option<String>) -> Result<Option<Severity>, BadRequest> {
    v.map(|s| {
        Severity::parse(&s).ok_or_else(|| {
            BadRequest(format!(
                "`severity` must be one of low, medium, high, critical (got {s:?})"
            ))
        })
    })
    .transpose()
}

fn tags(v: Option<Vec<String>>) -> Result<Option<Vec<String>>, BadRequest> {
    let Some(tags) = v else { return Ok(None) };
    if tags.len() > limits::TAGS_MAX {
        return Err(BadRequest(format!("at most {} tags", limits::TAGS_MAX)));
    }
    for t in &tags {
        if t.is_empty() || t.chars().count() > limits::TAG_MAX || t.chars().any(char::is_control) {
            return Err(BadRequest(format!(
                "each tag must be 1..={} printable characters",
                limits::TAG_MAX
            )));
        }
    }
    Ok(Some(tags))
}

impl NewAlarm {
    pub fn into_command(
        self,
        actor: &str,
        command_id: Option<Uuid>,
        expected_version: Option<u64>,
    ) -> Result<Command, BadRequest> {
        let spec = AlarmSpec {
            name: name(self.name)?,
            instrument: text("instrument", self.instrument, limits::NAME_MAX)?.unwrap_or_default(),
            condition: text("condition", self.condition, limits::TEXT_MAX)?.unwrap_or_default(),
            severity: severity(self.severity)?.unwrap_or(Severity::Medium),
            tags: tags(self.tags)?.unwrap_or_default(),
            owner: actor.to_string(),
        };
        Ok(Command {
            alarm_id: self.id.unwrap_or_else(Uuid::now_v7),
            kind: CommandKind::Create(spec),
            actor: actor.to_string(),
            command_id,
            expected_version,
        })
    }
}

impl Changes {
    pub fn into_changes(self) -> Result<AlarmChanges, BadRequest> {
        let changes = AlarmChanges {
            name: self.name.map(name).transpose()?,
            instrument: text("instrument", self.instrument, limits::NAME_MAX)?,
            condition: text("condition", self.condition, limits::TEXT_MAX)?,
            severity: severity(self.severity)?,
            tags: tags(self.tags)?,
        };
        if changes.is_empty() {
            return Err(BadRequest(
                "`changes` must change at least one field".into(),
            ));
        }
        Ok(changes)
    }
}

/// Builds the domain command of a command message; `None` for non-command messages.
pub fn command_of(msg: ClientMessage, actor: &str) -> Option<Result<Command, BadRequest>> {
    let simple = |alarm_id, kind, command_id, expected_version| {
        Ok(Command {
            alarm_id,
            kind,
            actor: actor.to_string(),
            command_id,
            expected_version,
        })
    };
    Some(match msg {
        ClientMessage::Create {
            alarm,
            command_id,
            expected_version,
        } => alarm.into_command(actor, command_id, expected_version),
        ClientMessage::Trigger {
            alarm_id,
            value,
            message,
            command_id,
            expected_version,
        } => trigger_kind(value, message)
            .and_then(|k| simple(alarm_id, k, command_id, expected_version)),
        ClientMessage::Ack {
            alarm_id,
            comment,
            command_id,
            expected_version,
        } => text("comment", comment, limits::TEXT_MAX).and_then(|comment| {
            simple(
                alarm_id,
                CommandKind::Ack { comment },
                command_id,
                expected_version,
            )
        }),
        ClientMessage::Rearm {
            alarm_id,
            command_id,
            expected_version,
        } => simple(alarm_id, CommandKind::Rearm, command_id, expected_version),
        ClientMessage::Delete {
            alarm_id,
            command_id,
            expected_version,
        } => simple(alarm_id, CommandKind::Delete, command_id, expected_version),
        ClientMessage::Update {
            alarm_id,
            changes,
            command_id,
            expected_version,
        } => changes.into_changes().and_then(|c| {
            simple(
                alarm_id,
                CommandKind::Update(c),
                command_id,
                expected_version,
            )
        }),
        _ => return None,
    })
}

pub fn trigger_kind(
    value: Option<ValueText>,
    message: Option<String>,
) -> Result<CommandKind, BadRequest> {
    Ok(CommandKind::Trigger {
        value: text(
            "value",
            value.map(ValueText::into_string).transpose()?,
            limits::NAME_MAX,
        )?,
        message: text("message", message, limits::TEXT_MAX)?,
    })
}

pub fn ack_kind(comment: Option<String>) -> Result<CommandKind, BadRequest> {
    Ok(CommandKind::Ack {
        comment: text("comment", comment, limits::TEXT_MAX)?,
    })
}

// ---------------------------------------------------------------- server → client

fn with_req(mut m: Map<String, Value>, req: &Req) -> String {
    if let Some(r) = req {
        m.insert("req".into(), r.clone());
    }
    Value::Object(m).to_string()
}

/// The `event` message (no `ledger_id`: the client has it from `hello`).
pub fn event_message(event: &Event) -> String {
    let mut out = Vec::with_capacity(384);
    crate::store::chain::write_event(&mut out, event, None, true, true);
    // The writer emits JSON built from `&str`s and ASCII only: always valid UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// One NDJSON export line: the event with `ledger_id` and `hash`.
pub fn export_line(event: &Event, ledger_id: Uuid) -> String {
    let mut out = Vec::with_capacity(384);
    write_export_line(&mut out, event, ledger_id);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends one export line (without the newline): the canonical JSON plus `hash`.
pub fn write_export_line(out: &mut Vec<u8>, event: &Event, ledger_id: Uuid) {
    crate::store::chain::write_event(out, event, Some(ledger_id), true, false);
}

pub struct Hello<'a> {
    pub ledger_id: Uuid,
    pub head: u64,
    pub user: &'a str,
    pub role: &'a str,
    pub token_expires_at: String,
    pub server_time: crate::time::Timestamp,
}

pub fn hello(h: &Hello<'_>) -> String {
    json!({
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "ledger_id": h.ledger_id.to_string(),
        "head": h.head,
        "server_time": h.server_time.to_rfc3339(),
        "user": {"name": h.user, "role": h.role},
        "token_expires_at": h.token_expires_at,
    })
    .to_string()
}

/// `{"alarms":[…],"offset":N,"type":"snapshot"}`, written straight to text (keys in the same
/// sorted order as every other message; 10,000 alarms are ~6 MB).
/// With the subscribe's `req`, if it had one (`live` too): after a second `subscribe` the
/// client can tell which subscription a `snapshot` or `live` belongs to (messages of the one it
/// replaced may still be on their way).
pub fn snapshot(offset: u64, alarms: &[Alarm], req: &Req) -> Result<String, String> {
    let mut out = Vec::with_capacity(alarms.len() * 640 + 64);
    out.extend_from_slice(b"{\"alarms\":");
    crate::domain::write_alarms_json(&mut out, alarms).map_err(|e| e.to_string())?;
    out.extend_from_slice(format!(",\"offset\":{offset}").as_bytes());
    if let Some(r) = req {
        out.extend_from_slice(b",\"req\":");
        serde_json::to_writer(&mut out, r).map_err(|e| e.to_string())?;
    }
    out.extend_from_slice(b",\"type\":\"snapshot\"}");
    String::from_utf8(out).map_err(|e| e.to_string())
}

pub fn live(offset: u64, req: &Req) -> String {
    let mut m = Map::new();
    m.insert("type".into(), json!("live"));
    m.insert("offset".into(), json!(offset));
    with_req(m, req)
}

/// The `ok` object of a command. HTTP command answers are the same object (with `type`), so a
/// client parses one shape on both transports.
pub fn ok_value(req: &Req, offset: u64, alarm_id: Uuid, already: bool, duplicate: bool) -> Value {
    let mut m = Map::new();
    m.insert("type".into(), json!("ok"));
    if let Some(r) = req {
        m.insert("req".into(), r.clone());
    }
    m.insert("offset".into(), json!(offset));
    m.insert("alarm_id".into(), json!(alarm_id.to_string()));
    if already {
        m.insert("already".into(), json!(true));
    }
    if duplicate {
        m.insert("duplicate".into(), json!(true));
    }
    Value::Object(m)
}

/// `ok` for non-command requests (`unsubscribe`, `refresh`), with extra fields.
pub fn ok_plain(req: &Req, extra: Map<String, Value>) -> String {
    let mut m = Map::new();
    m.insert("type".into(), json!("ok"));
    m.extend(extra);
    with_req(m, req)
}

pub fn error(req: &Req, code: &str, message: &str) -> String {
    let mut m = Map::new();
    m.insert("type".into(), json!("error"));
    m.insert("code".into(), json!(code));
    m.insert("message".into(), json!(message));
    with_req(m, req)
}

pub fn pong(req: &Req) -> String {
    let mut m = Map::new();
    m.insert("type".into(), json!("pong"));
    with_req(m, req)
}

pub fn token_expiring(expires_at: &str) -> String {
    json!({"type": "token_expiring", "expires_at": expires_at}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_reads_as_omitted_in_subscribe() {
        let (_, m) =
            parse_client_message(r#"{"type":"subscribe","from":null,"snapshot":null}"#).unwrap();
        assert!(
            matches!(
                m,
                ClientMessage::Subscribe {
                    from: 0,
                    snapshot: false,
                    ..
                }
            ),
            "{m:?}"
        );
        let (_, m) =
            parse_client_message(r#"{"type":"subscribe","from":7,"snapshot":true}"#).unwrap();
        assert!(matches!(
            m,
            ClientMessage::Subscribe {
                from: 7,
                snapshot: true,
                ..
            }
        ));
        assert!(parse_client_message(r#"{"type":"subscribe","from":"7"}"#).is_err());
    }

    #[test]
    fn parses_commands_and_reports_bad_input() {
        let (req, m) = parse_client_message(
            r#"{"type":"trigger","req":7,"alarm_id":"0196a0a0-0000-7000-8000-000000000001","value":201}"#,
        )
        .unwrap();
        assert_eq!(req, Some(json!(7)));
        let cmd = command_of(m, "alice").unwrap().unwrap();
        assert_eq!(
            cmd.kind,
            CommandKind::Trigger {
                value: Some("201".into()),
                message: None
            }
        );
        let (_, m) = parse_client_message(
            r#"{"type":"trigger","alarm_id":"0196a0a0-0000-7000-8000-000000000001","value":95.40}"#,
        )
        .unwrap();
        let err = command_of(m, "alice").unwrap().unwrap_err();
        assert!(err.0.contains("exact text"), "{}", err.0);
        let (req, e) = parse_client_message(r#"{"type":"nope","req":"a"}"#).unwrap_err();
        assert_eq!(req, Some(json!("a")));
        assert!(e.0.contains("unknown variant"), "{}", e.0);
        assert!(parse_client_message("{").is_err());
        assert!(parse_client_message("[]").is_err());
        let (_, e) = parse_client_message(r#"{"type":"trigger","alarm_id":5}"#).unwrap_err();
        assert!(
            e.0.contains("alarm_id") || e.0.contains("invalid type"),
            "{}",
            e.0
        );
        let (_, m) = parse_client_message(r#"{"type":"create","alarm":{"name":"  "}}"#).unwrap();
        assert!(command_of(m, "a").unwrap().is_err());
        let (_, m) =
            parse_client_message(r#"{"type":"create","alarm":{"name":"x","severity":"urgent"}}"#)
                .unwrap();
        assert!(command_of(m, "a").unwrap().is_err());
    }

    /// A repeated key, at the top or inside an object, is refused (serde_json would keep the
    /// last one without a word); numbers, arrays and nesting come through as before.
    #[test]
    fn repeated_keys_are_refused() {
        let a = "0196a0a0-0000-7000-8000-00000000000a";
        let b = "0196a0a0-0000-7000-8000-00000000000b";
        let twice = format!(r#"{{"type":"trigger","alarm_id":"{a}","alarm_id":"{b}"}}"#);
        let (_, e) = parse_client_message(&twice).unwrap_err();
        assert!(e.0.contains("duplicate key `alarm_id`"), "{}", e.0);
        let nested = r#"{"type":"create","req":1,"alarm":{"name":"x","name":"y"}}"#;
        let (_, e) = parse_client_message(nested).unwrap_err();
        assert!(e.0.contains("duplicate key `name`"), "{}", e.0);
        let fine = r#"{"type":"create","req":18446744073709551615,"alarm":{"name":"x","tags":["a","b"],"severity":"low"}}"#;
        let (req, m) = parse_client_message(fine).unwrap();
        assert_eq!(req, Some(json!(18446744073709551615u64)));
        assert!(command_of(m, "a").unwrap().is_ok());
    }
}
