//! The JSON Schemas of `schemas/` against real server output: every message type a session
//! produces, and the HTTP alarm, history, export and command answers.

use crate::common::*;
use crate::support::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Validates a server message against the whole `oneOf` and against the `$def` of its type.
struct ServerMessages {
    any: jsonschema::Validator,
    defs: Vec<(&'static str, jsonschema::Validator)>,
    seen: BTreeSet<String>,
}

impl ServerMessages {
    fn new() -> Self {
        let defs = [
            "hello",
            "snapshot",
            "event",
            "live",
            "ok_command",
            "ok_request",
            "error",
            "token_expiring",
            "pong",
        ]
        .into_iter()
        .map(|d| {
            (
                d,
                validator(&format!("server-messages.schema.json#/$defs/{d}")),
            )
        })
        .collect();
        ServerMessages {
            any: validator("server-messages.schema.json"),
            defs,
            seen: BTreeSet::new(),
        }
    }

    #[track_caller]
    fn check(&mut self, v: &Value) {
        assert_valid(&self.any, "server message", v);
        let def = match v["type"].as_str().unwrap() {
            "ok" if v.get("offset").is_some() => "ok_command",
            "ok" => "ok_request",
            t => t,
        };
        let (_, val) = self
            .defs
            .iter()
            .find(|(d, _)| *d == def)
            .unwrap_or_else(|| panic!("no $def for {v}"));
        assert_valid(val, def, v);
        self.seen.insert(def.to_string());
    }

    async fn recv(&mut self, ws: &mut Ws) -> Value {
        let v = next_json(ws, STEP).await;
        self.check(&v);
        v
    }

    /// Sends (after checking the message against the client schema) and validates everything
    /// until the answer with the same req.
    async fn call(&mut self, client: &jsonschema::Validator, ws: &mut Ws, msg: Value) -> Value {
        assert_valid(client, "client message", &msg);
        let (answer, other) = call(ws, msg).await;
        for v in &other {
            self.check(v);
        }
        self.check(&answer);
        answer
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_output_matches_the_schemas() {
    let app = spawn_app().await;
    let tok = app.admin_token.clone();
    let client = validator("client-messages.schema.json");
    let mut msgs = ServerMessages::new();

    let (mut ws, hello) = app.ws(&tok).await;
    msgs.check(&hello);
    // A token with 61 s left gets `token_expiring` (due 60 s before its expiry) within a second.
    let short = alarm_ledger::auth::TokenService::new(
        b"test-secret-test-secret-test-secret-0123".to_vec(),
        chrono::Duration::seconds(61),
    )
    .issue("admin", alarm_ledger::auth::Role::Admin, chrono::Utc::now())
    .expect("token")
    .token;
    let (mut expiring, expiring_hello) = app.ws(&short).await;
    msgs.check(&expiring_hello);
    let warn = msgs.recv(&mut expiring).await;
    assert_eq!(warn["type"], "token_expiring", "{warn}");
    drop(expiring);

    // Commands producing every event kind, with and without optional fields.
    let mut ids = Vec::new();
    for (i, alarm) in [
        json!({"name": "full", "instrument": "AAPL", "condition": "PX_LAST > 200", "severity": "critical", "tags": ["eq", "us"]}),
        json!({"name": "minimal"}),
        json!({"name": "with id", "id": "0196a0a0-0000-7000-8000-00000000abcd"}),
    ]
    .into_iter()
    .enumerate()
    {
        let ok = msgs.call(&client, &mut ws, json!({"type": "create", "req": i, "alarm": alarm, "command_id": format!("0196a0a0-0000-4000-8000-0000000000{i:02}")})).await;
        assert_eq!(ok["type"], "ok", "{ok}");
        ids.push(ok["alarm_id"].as_str().unwrap().to_string());
    }
    let (a, b, c) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    for msg in [
        json!({"type": "trigger", "req": "t1", "alarm_id": a, "value": "201.5", "message": "crossed"}),
        json!({"type": "trigger", "req": "t2", "alarm_id": b}),
        json!({"type": "trigger", "req": "t3", "alarm_id": b, "value": "again"}), // already
        json!({"type": "ack", "req": "a1", "alarm_id": a, "comment": "on it", "expected_version": 2}),
        json!({"type": "ack", "req": "a2", "alarm_id": b}),
        json!({"type": "rearm", "req": "r1", "alarm_id": a}),
        json!({"type": "update", "req": "u1", "alarm_id": b, "changes": {"severity": "low", "tags": []}}),
        json!({"type": "update", "req": "u2", "alarm_id": a, "changes": {"name": "renamed", "instrument": "MSFT", "condition": "x"}}),
        json!({"type": "delete", "req": "d1", "alarm_id": c}),
        json!({"type": "create", "req": "dup", "alarm": {"name": "minimal"}, "command_id": "0196a0a0-0000-4000-8000-000000000001"}), // duplicate
        json!({"type": "ack", "req": "e1", "alarm_id": a}), // error not_triggered
        json!({"type": "trigger", "req": "e2", "alarm_id": c}), // error alarm_deleted
    ] {
        msgs.call(&client, &mut ws, msg).await;
    }
    let v = msgs
        .call(&client, &mut ws, json!({"type": "ping", "req": 5}))
        .await;
    assert_eq!(v, json!({"type": "pong", "req": 5}));
    // Errors without req (malformed input).
    send_json(&mut ws, json!({"type": "nope"})).await;
    let e = msgs.recv(&mut ws).await;
    assert_eq!(e["code"], "bad_request");

    // Snapshot, replayed events, live, live events, unsubscribe.
    send_json(
        &mut ws,
        json!({"type": "subscribe", "snapshot": true, "req": "s"}),
    )
    .await;
    let snap = msgs.recv(&mut ws).await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["alarms"].as_array().unwrap().len(), 2);
    assert_eq!(msgs.recv(&mut ws).await["type"], "live");
    let sub = json!({"type": "subscribe", "from": 0, "req": "f"});
    assert_valid(&client, "client message", &sub);
    send_json(&mut ws, sub).await;
    let head = head(&app).await;
    let mut check = StreamCheck::new("schema", 0);
    while check.last < head || check.lives.is_empty() {
        let v = msgs.recv(&mut ws).await;
        assert!(check.feed(&v), "{v}");
    }
    let v = msgs
        .call(&client, &mut ws, json!({"type": "unsubscribe", "req": "u"}))
        .await;
    assert_eq!(v, json!({"type": "ok", "req": "u"}));
    // refresh: ok with the new token_expires_at.
    let (s, fresh) = app.post(&tok, "/api/v1/token/refresh", json!({})).await;
    assert_eq!(s, 200, "{fresh}");
    let v = msgs
        .call(
            &client,
            &mut ws,
            json!({"type": "refresh", "req": "rf", "token": fresh["token"]}),
        )
        .await;
    assert_eq!(v["type"], "ok", "{v}");
    assert!(v["token_expires_at"].is_string(), "{v}");
    // ledger_mismatch and offset_out_of_range errors.
    msgs.call(
        &client,
        &mut ws,
        json!({"type": "subscribe", "req": "x", "from": head + 1}),
    )
    .await;
    let every: BTreeSet<String> = [
        "hello",
        "snapshot",
        "event",
        "live",
        "ok_command",
        "ok_request",
        "error",
        "token_expiring",
        "pong",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        msgs.seen, every,
        "every server message type was produced and checked"
    );

    // HTTP: alarms (every state), history events, export lines, command answers.
    let alarm_v = validator("alarm.schema.json");
    let event_v = validator("event.schema.json");
    let history_v = validator("event.schema.json#/$defs/event");
    let ok_v = validator("server-messages.schema.json#/$defs/ok_command");
    let (s, ok) = app
        .post(
            &tok,
            &format!("/api/v1/alarms/{a}/trigger"),
            json!({"value": 3}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(ok.get("already").is_none(), "{ok}");
    assert_valid(&ok_v, "HTTP ok", &ok);
    let (_, ok) = app
        .post(&tok, &format!("/api/v1/alarms/{a}/trigger"), json!({}))
        .await;
    assert_eq!(ok["already"], true);
    assert_valid(&ok_v, "HTTP ok (already)", &ok);
    let mut states = BTreeSet::new();
    for q in ["", "?state=deleted", "?as_of=3", "?as_of=1"] {
        let (s, list) = app.get(&tok, &format!("/api/v1/alarms{q}")).await;
        assert_eq!(s, 200);
        for x in list["alarms"].as_array().unwrap() {
            assert_valid(&alarm_v, "alarm", x);
            states.insert(x["state"].as_str().unwrap().to_string());
        }
    }
    for id in [&a, &b, &c] {
        let (_, x) = app.get(&tok, &format!("/api/v1/alarms/{id}")).await;
        assert_valid(&alarm_v, "alarm", &x);
        let (_, h) = app.get(&tok, &format!("/api/v1/alarms/{id}/history")).await;
        for e in h["events"].as_array().unwrap() {
            assert_valid(&history_v, "history event", e);
        }
    }
    // A fresh armed alarm that was never triggered (all-null stamps).
    let d = app.create_alarm("fresh").await;
    let (_, x) = app.get(&tok, &format!("/api/v1/alarms/{d}")).await;
    assert_eq!(x["last_triggered_at"], Value::Null);
    assert_valid(&alarm_v, "alarm", &x);
    assert_eq!(
        states.into_iter().collect::<Vec<_>>(),
        ["acknowledged", "armed", "deleted", "triggered"]
    );
    let (s, lines) = events(&app, "").await;
    assert_eq!(s, 200);
    let mut kinds = BTreeSet::new();
    for e in &lines {
        assert_valid(&event_v, "export line", e);
        kinds.insert(e["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds.len(), 6, "every event kind was checked: {kinds:?}");

    // HTTP answers against the OpenAPI component schemas.
    let api = |name: &str| validator(&format!("openapi.json#/components/schemas/{name}"));
    let (s, ledger) = app.get(&tok, "/api/v1/ledger").await;
    assert_eq!(s, 200);
    assert_valid(&api("Ledger"), "GET /ledger", &ledger);
    let (_, list) = app.get(&tok, "/api/v1/alarms?state=deleted").await;
    assert_valid(&api("AlarmList"), "GET /alarms", &list);
    let (_, list) = app.get(&tok, "/api/v1/alarms?as_of=2").await;
    assert_valid(&api("AlarmList"), "GET /alarms?as_of", &list);
    let (_, h) = app.get(&tok, &format!("/api/v1/alarms/{a}/history")).await;
    assert_valid(&api("History"), "GET /alarms/{id}/history", &h);
    let (_, fresh) = app.post(&tok, "/api/v1/token/refresh", json!({})).await;
    assert_valid(&api("TokenAnswer"), "POST /token/refresh", &fresh);
    let error = api("Error");
    for (status, body) in [
        app.post(&tok, &format!("/api/v1/alarms/{a}/rearm"), json!({}))
            .await,
        app.post(&tok, &format!("/api/v1/alarms/{c}/ack"), json!({}))
            .await,
        app.post(&tok, "/api/v1/alarms", json!({"name": 1})).await,
        app.get(&tok, "/api/v1/alarms/0196a0a0-0000-7000-8000-000000000000")
            .await,
        app.get(&tok, &format!("/api/v1/events?from={}", head + 10))
            .await,
        app.get("nope", "/api/v1/alarms").await,
    ] {
        assert_valid(&error, "HTTP error", &body);
        // The status PROTOCOL.md fixes for the code (written out here, apart from the server's
        // own table).
        let expected = match body["error"]["code"].as_str() {
            Some("bad_request") => 400,
            Some("unauthorized") => 401,
            Some("not_found") => 404,
            Some("not_triggered" | "not_acknowledged" | "version_conflict" | "alarm_deleted") => {
                409
            }
            Some("offset_out_of_range") => 416,
            other => panic!("unexpected code {other:?}: {body}"),
        };
        assert_eq!(status, expected, "{body}");
    }

    // The validators bite: small corruptions of real output are rejected.
    let mut bad = hello.clone();
    bad["extra"] = json!(1);
    assert!(!msgs.any.is_valid(&bad), "unknown field in hello");
    let mut bad = lines[0].clone();
    bad["hash"] = json!("ABC");
    assert!(!event_v.is_valid(&bad), "bad hash");
    let mut bad = lines[0].clone();
    bad.as_object_mut().unwrap().remove("ledger_id");
    assert!(!event_v.is_valid(&bad), "export line without ledger_id");
    let mut bad = x.clone();
    bad["state"] = json!("sleeping");
    assert!(!alarm_v.is_valid(&bad), "unknown state");
    let mut bad = x.clone();
    bad["created_at"] = json!("2026-01-01T00:00:00Z");
    assert!(!alarm_v.is_valid(&bad), "timestamp without milliseconds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_users_backup_health_and_security_log_match_the_openapi_schemas() {
    let app = spawn_app().await;
    let api = |name: &str| validator(&format!("openapi.json#/components/schemas/{name}"));
    let admin = app.admin_token.clone();

    let r = app
        .client
        .post(app.url("/api/v1/login"))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let login: Value = r.json().await.unwrap();
    assert_valid(&api("TokenAnswer"), "POST /login", &login);

    let (s, created) = app
        .post(
            &admin,
            "/api/v1/users",
            json!({"username": "sam", "password": USER_PASSWORD, "role": "operator"}),
        )
        .await;
    assert_eq!(s, 200, "{created}");
    assert_valid(&api("User"), "POST /users", &created);
    let r = app
        .client
        .patch(app.url("/api/v1/users/sam"))
        .bearer_auth(&admin)
        .json(&json!({"role": "viewer", "disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let patched: Value = r.json().await.unwrap();
    assert_valid(&api("User"), "PATCH /users/{name}", &patched);
    assert_eq!(
        (&patched["role"], &patched["disabled"]),
        (&json!("viewer"), &json!(true))
    );
    let (s, users) = app.get(&admin, "/api/v1/users").await;
    assert_eq!(s, 200);
    let users = users.as_array().expect("an array of users");
    assert_eq!(users.len(), 2);
    for u in users {
        assert_valid(&api("User"), "GET /users item", u);
    }

    let (s, backup) = app.post(&admin, "/api/v1/admin/backup", json!({})).await;
    assert_eq!(s, 200, "{backup}");
    assert_valid(&api("Backup"), "POST /admin/backup", &backup);

    for (path, schema) in [("/healthz", "Health"), ("/readyz", "Ready")] {
        let (s, v) = app.get("", path).await;
        assert_eq!(s, 200, "{path}: {v}");
        assert_valid(&api(schema), path, &v);
    }

    let (s, text) = app.get_text(&admin, "/api/v1/security-log").await;
    assert_eq!(s, 200);
    let entry = api("SecurityEntry");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 5, "{text}");
    for e in &lines {
        assert_valid(&entry, "security-log line", e);
    }
    // Throttled: the 429 body is an Error too.
    for _ in 0..5 {
        let _ = app
            .client
            .post(app.url("/api/v1/login"))
            .json(&json!({"username": "ghost", "password": "wrong-password-x"}))
            .send()
            .await
            .unwrap();
    }
    let r = app
        .client
        .post(app.url("/api/v1/login"))
        .json(&json!({"username": "ghost", "password": "wrong-password-x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_valid(&api("Error"), "429", &body);
    // The validators bite.
    let mut bad = patched.clone();
    bad["role"] = json!("root");
    assert!(!api("User").is_valid(&bad), "unknown role");
    let mut bad = lines[0].clone();
    bad.as_object_mut().unwrap().remove("hash");
    assert!(!entry.is_valid(&bad), "entry without hash");
}
