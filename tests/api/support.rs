//! Helpers of the API tests on top of `tests/common`: bounded reads, a gapless-stream checker,
//! WebSocket connections without a token, metrics scraping and the JSON Schemas of `schemas/`.

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Upper bound of one read in tests that expect an answer.
pub const STEP: Duration = Duration::from_secs(10);

/// What one bounded read produced.
#[derive(Debug)]
pub enum Got {
    Json(Value),
    Ping,
    Close(Option<u16>),
    /// The stream ended or failed without a close frame.
    Ended(String),
    TimedOut,
}

/// The next frame within `within` (pongs and non-JSON frames are reported as `Ended`/skipped).
pub async fn next_frame(ws: &mut Ws, within: Duration) -> Got {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = match timeout(left, ws.next()).await {
            Err(_) => return Got::TimedOut,
            Ok(None) => return Got::Ended("stream ended".into()),
            Ok(Some(Err(e))) => return Got::Ended(e.to_string()),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .unwrap_or_else(|e| panic!("server sent invalid JSON ({e}): {t}"));
                return Got::Json(v);
            }
            Message::Ping(_) => return Got::Ping,
            Message::Close(f) => return Got::Close(f.map(|f| u16::from(f.code))),
            Message::Pong(_) | Message::Frame(_) => continue,
            Message::Binary(b) => panic!("server sent a binary frame of {} bytes", b.len()),
        }
    }
}

/// The next JSON message (skipping pings) within `within`; panics on anything else.
pub async fn next_json(ws: &mut Ws, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        match next_frame(ws, deadline.saturating_duration_since(Instant::now())).await {
            Got::Json(v) => return v,
            Got::Ping => continue,
            other => panic!("expected a JSON message, got {other:?}"),
        }
    }
}

/// Sends `msg` and returns the answer carrying the same `req` (events and other messages in
/// between are returned in the second element).
pub async fn call(ws: &mut Ws, msg: Value) -> (Value, Vec<Value>) {
    let req = msg["req"].clone();
    assert!(!req.is_null(), "call() needs a req: {msg}");
    send_json(ws, msg).await;
    let deadline = Instant::now() + STEP;
    let mut other = Vec::new();
    loop {
        let v = next_json(ws, deadline.saturating_duration_since(Instant::now())).await;
        if v["req"] == req && v["type"] != "event" {
            return (v, other);
        }
        other.push(v);
    }
}

/// Like `call`, for connections without a subscription: nothing else may arrive in between.
pub async fn ask(ws: &mut Ws, msg: Value) -> Value {
    let (v, other) = call(ws, msg).await;
    assert!(
        other.is_empty(),
        "unexpected messages before the answer: {other:?}"
    );
    v
}

/// Asserts an `error` answer with this code and req.
#[track_caller]
pub fn assert_error(v: &Value, code: &str, req: &Value) {
    assert_eq!(v["type"], "error", "expected error {code}, got {v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(&v["req"], req, "req echoed: {v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

/// Reads until a close frame; returns its code. Text messages before it are returned too.
pub async fn read_to_close(ws: &mut Ws, within: Duration) -> (Option<u16>, Vec<Value>) {
    let deadline = Instant::now() + within;
    let mut texts = Vec::new();
    loop {
        match next_frame(ws, deadline.saturating_duration_since(Instant::now())).await {
            Got::Json(v) => texts.push(v),
            Got::Ping => {}
            Got::Close(code) => return (code, texts),
            Got::Ended(e) => panic!("stream ended without a close frame ({e}); got {texts:?}"),
            Got::TimedOut => panic!("no close frame within {within:?}; got {texts:?}"),
        }
    }
}

/// A WebSocket upgrade with an optional bearer token and query string, nothing read.
pub async fn ws_connect(app: &TestApp, bearer: Option<&str>, query: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/api/v1/ws{query}", app.addr)
        .into_client_request()
        .expect("request");
    if let Some(t) = bearer {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    let (ws, resp) = timeout(STEP, tokio_tungstenite::connect_async(req))
        .await
        .expect("ws connect in time")
        .expect("ws upgrade accepted");
    assert_eq!(resp.status(), 101);
    ws
}

/// The server still serves: a new WebSocket answers a ping, and `/healthz` answers 200.
pub async fn assert_serves(app: &TestApp) {
    let (mut ws, _) = timeout(STEP, app.ws(&app.admin_token))
        .await
        .expect("hello in time");
    let pong = ask(&mut ws, json!({"type": "ping", "req": "alive"})).await;
    assert_eq!(pong, json!({"type": "pong", "req": "alive"}));
    let (s, v) = app.get(&app.admin_token, "/healthz").await;
    assert_eq!(s, 200, "{v}");
    let _ = ws.close(None).await;
}

/// A `/metrics` sample: the first line starting with `prefix` (name plus labels). A sample that
/// is not there fails the test (a renamed metric must not turn checks into no-ops).
pub async fn metric(app: &TestApp, prefix: &str) -> f64 {
    let r = timeout(STEP, app.client.get(app.url("/metrics")).send())
        .await
        .expect("metrics in time")
        .expect("metrics");
    let text = r.text().await.expect("metrics body");
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in /metrics:\n{text}"))
}

/// `GET /api/v1/events` parsed (status, lines).
pub async fn events(app: &TestApp, query: &str) -> (u16, Vec<Value>) {
    let (s, text) = timeout(
        STEP,
        app.get_text(&app.admin_token, &format!("/api/v1/events{query}")),
    )
    .await
    .expect("events in time");
    if s != 200 {
        return (s, vec![serde_json::from_str(&text).unwrap_or(Value::Null)]);
    }
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l}: {e}")))
        .collect();
    (s, lines)
}

/// Offset → hash of every event, from the export.
pub async fn all_hashes(app: &TestApp) -> BTreeMap<u64, String> {
    let (s, lines) = events(app, "").await;
    assert_eq!(s, 200);
    lines
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub async fn head(app: &TestApp) -> u64 {
    let (s, v) = app.get(&app.admin_token, "/api/v1/ledger").await;
    assert_eq!(s, 200, "{v}");
    v["head"].as_u64().expect("head")
}

/// A small deterministic PRNG (xorshift64*), seeded per test and printed for reproduction.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        println!("rng seed {seed}");
        Rng(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Checks one subscription's output: `event`s contiguous from `from + 1`, no duplicate, `live`
/// exactly once with the offset of the last event before it.
#[derive(Debug, Clone)]
pub struct StreamCheck {
    pub name: String,
    pub from: u64,
    pub last: u64,
    pub last_hash: Option<String>,
    pub lives: Vec<u64>,
    /// (offset, hash) of every event received.
    pub seen: Vec<(u64, String)>,
}

impl StreamCheck {
    pub fn new(name: impl Into<String>, from: u64) -> StreamCheck {
        StreamCheck {
            name: name.into(),
            from,
            last: from,
            last_hash: None,
            lives: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Feeds one message; panics on a gap, a duplicate or a second `live`. Returns whether it
    /// was an event or live (other types are ignored and reported as `false`).
    #[track_caller]
    pub fn feed(&mut self, v: &Value) -> bool {
        match v["type"].as_str() {
            Some("event") => {
                let off = v["offset"].as_u64().expect("event offset");
                assert_eq!(
                    off,
                    self.last + 1,
                    "{}: expected offset {} next, got {off} (gap or duplicate)",
                    self.name,
                    self.last + 1
                );
                let hash = v["hash"].as_str().expect("event hash").to_string();
                self.last = off;
                self.last_hash = Some(hash.clone());
                self.seen.push((off, hash));
                true
            }
            Some("live") => {
                assert!(
                    self.lives.is_empty(),
                    "{}: second live {v} after {:?}",
                    self.name,
                    self.lives
                );
                assert_eq!(
                    v["offset"].as_u64(),
                    Some(self.last),
                    "{}: live must carry the last replayed offset",
                    self.name
                );
                self.lives.push(self.last);
                true
            }
            _ => false,
        }
    }

    /// Every event from `from + 1` to `head` exactly once, and live once.
    #[track_caller]
    pub fn assert_complete(&self, head: u64, hashes: &BTreeMap<u64, String>) {
        assert_eq!(self.last, head, "{}: stopped at {}", self.name, self.last);
        assert_eq!(self.lives.len(), 1, "{}: lives {:?}", self.name, self.lives);
        let offsets: Vec<u64> = self.seen.iter().map(|(o, _)| *o).collect();
        let want: Vec<u64> = (self.from + 1..=head).collect();
        assert_eq!(offsets, want, "{}", self.name);
        for (o, h) in &self.seen {
            assert_eq!(
                hashes.get(o),
                Some(h),
                "{}: hash at {o} differs from the export",
                self.name
            );
        }
    }
}

/// Reads a subscription into `check` until it has the events up to `head` and its `live`, then
/// proves nothing more is pending with a ping round trip. Everything within `within`.
pub async fn read_stream_to(ws: &mut Ws, check: &mut StreamCheck, head: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while check.last < head || check.lives.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_frame(ws, left).await {
            Got::Json(v) => {
                if !check.feed(&v) {
                    panic!("{}: unexpected message {v}", check.name);
                }
            }
            Got::Ping => {}
            other => panic!(
                "{}: at {} of {head} (lives {:?}): {other:?}",
                check.name, check.last, check.lives
            ),
        }
    }
    assert!(check.last <= head, "{}: beyond the head", check.name);
    // Nothing but the pong may follow: no duplicate, no second live.
    let req = json!(format!("drain-{}", check.name));
    send_json(ws, json!({"type": "ping", "req": req})).await;
    let v = next_json(ws, deadline.saturating_duration_since(Instant::now())).await;
    if v["type"] != "pong" || v["req"] != req {
        check.feed(&v); // names a duplicate or a second live precisely
        panic!("{}: unexpected message after the head: {v}", check.name);
    }
}

// ------------------------------------------------------------------ JSON Schemas

pub const SCHEMA_BASE: &str = "https://alarm-ledger.example/schemas/v1/";

/// A validator for `$ref` (relative to the schemas' base, e.g. `alarm.schema.json` or
/// `server-messages.schema.json#/$defs/hello`), with every file of `schemas/` registered.
pub fn validator(reference: &str) -> jsonschema::Validator {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let mut opts = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true);
    for name in [
        "common.schema.json",
        "alarm.schema.json",
        "event.schema.json",
        "server-messages.schema.json",
        "client-messages.schema.json",
    ] {
        let text = std::fs::read_to_string(dir.join(name)).expect("schema file");
        let v: Value = serde_json::from_str(&text).expect("schema JSON");
        let id = v["$id"].as_str().expect("$id").to_string();
        assert_eq!(id, format!("{SCHEMA_BASE}{name}"), "$id of {name}");
        opts = opts.with_resource(
            id,
            jsonschema::Resource::from_contents(v).expect("resource"),
        );
    }
    // The OpenAPI document has no `$id`; its component schemas refer to the files above
    // relatively, so it is registered next to them.
    let text = std::fs::read_to_string(dir.join("openapi.json")).expect("openapi.json");
    let v: Value = serde_json::from_str(&text).expect("openapi JSON");
    let res = jsonschema::Draft::Draft202012.create_resource(v);
    opts = opts.with_resource(format!("{SCHEMA_BASE}openapi.json"), res);
    opts.build(&json!({ "$ref": format!("{SCHEMA_BASE}{reference}") }))
        .unwrap_or_else(|e| panic!("schema {reference} compiles: {e}"))
}

/// Asserts `instance` is valid, listing every error otherwise.
#[track_caller]
pub fn assert_valid(v: &jsonschema::Validator, what: &str, instance: &Value) {
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} violates its schema: {errors:#?}\n{instance:#}"
    );
}

// ------------------------------------------------------------------ writers

/// A writer of alarm events over one transport.
pub enum Via {
    Ws(Box<Ws>),
    Http,
}

/// Appends exactly `n` events (create, then trigger → ack → rearm cycles on alarms of its own),
/// one command at a time, over a WebSocket (`ws = true`) or HTTP; returns the offsets appended.
pub async fn write_events(app: &TestApp, token: &str, ws: bool, tag: &str, n: usize) -> Vec<u64> {
    let mut via = if ws {
        let (w, _) = timeout(STEP, app.ws(token)).await.expect("hello in time");
        Via::Ws(Box::new(w))
    } else {
        Via::Http
    };
    let mut offsets = Vec::with_capacity(n);
    let mut alarm = String::new();
    for i in 0..n {
        let step = i % 7; // create, then two cycles of trigger/ack/rearm
        let (kind, body) = match step {
            0 => (
                "create",
                json!({"name": format!("{tag} alarm {i}"), "instrument": tag}),
            ),
            1 | 4 => ("trigger", json!({"value": i.to_string(), "message": tag})),
            2 | 5 => ("ack", json!({"comment": format!("seen {i}")})),
            _ => ("rearm", json!({})),
        };
        let ok = match &mut via {
            Via::Ws(w) => {
                let mut msg = json!({"type": kind, "req": i});
                if kind == "create" {
                    msg["alarm"] = body;
                } else {
                    msg["alarm_id"] = json!(alarm);
                    for (k, v) in body.as_object().unwrap() {
                        msg[k] = v.clone();
                    }
                }
                let v = ask(w, msg).await;
                assert_eq!(v["req"], i, "{v}");
                v
            }
            Via::Http => {
                let path = if kind == "create" {
                    "/api/v1/alarms".to_string()
                } else {
                    format!("/api/v1/alarms/{alarm}/{kind}")
                };
                let (s, v) = timeout(STEP, app.post(token, &path, body))
                    .await
                    .expect("http command in time");
                assert_eq!(s, 200, "{kind}: {v}");
                v
            }
        };
        assert_eq!(ok["type"], "ok", "{tag} {kind}: {ok}");
        assert!(
            ok.get("already").is_none() && ok.get("duplicate").is_none(),
            "{ok}"
        );
        if kind == "create" {
            alarm = ok["alarm_id"].as_str().expect("alarm_id").to_string();
        }
        offsets.push(ok["offset"].as_u64().expect("offset"));
    }
    if let Via::Ws(mut w) = via {
        let _ = Ws::close(&mut w, None).await;
    }
    offsets
}

/// An alarm body of about 6.5 KB on the wire (long condition and tags), to fill socket buffers.
pub fn big_alarm(tag: &str, i: usize) -> Value {
    let tags: Vec<String> = (0..32)
        .map(|t| format!("{tag}-{i}-{t:02}-{}", "x".repeat(48)))
        .collect();
    json!({
        "name": format!("{tag} {i} {}", "n".repeat(150)),
        "instrument": format!("{tag}{i}"),
        "condition": format!("{i} {}", "PX_LAST > 200 AND ".repeat(220)),
        "tags": tags,
    })
}

/// Creates `n` big alarms over one WebSocket, keeping up to `window` commands in flight;
/// returns the offsets appended, in answer order.
pub async fn blast(app: &TestApp, token: &str, tag: &str, n: usize, window: usize) -> Vec<u64> {
    let (mut ws, _) = timeout(STEP, app.ws(token)).await.expect("hello in time");
    let mut sent = 0;
    let mut offsets = Vec::with_capacity(n);
    while offsets.len() < n {
        while sent < n && sent - offsets.len() < window {
            let alarm = big_alarm(tag, sent);
            send_json(
                &mut ws,
                json!({"type": "create", "req": sent, "alarm": alarm}),
            )
            .await;
            sent += 1;
        }
        let v = next_json(&mut ws, STEP).await;
        assert_eq!(v["type"], "ok", "{tag}: {v}");
        offsets.push(v["offset"].as_u64().expect("offset"));
    }
    let _ = Ws::close(&mut ws, None).await;
    offsets
}
