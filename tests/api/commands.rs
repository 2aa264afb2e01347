//! Commands over WebSocket and HTTP: racing triggers, idempotent retries, the state machine,
//! roles, optimistic concurrency, and per-connection command order.

use crate::common::*;
use crate::support::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;
use tokio::time::timeout;

fn uuid() -> String {
    // A v4-shaped UUID, unique within the test binary: the nanosecond clock plus a counter.
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (t >> 32) as u32,
        (t >> 16) as u16,
        (t & 0xfff) as u16,
        (n & 0xfff) as u16,
        (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ t) & 0xffff_ffff_ffff
    )
}

/// The alarm's events (`GET /alarms/{id}/history`).
async fn history(app: &TestApp, id: &str) -> Vec<Value> {
    let (s, v) = app
        .get(&app.admin_token, &format!("/api/v1/alarms/{id}/history"))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["alarm_id"], id);
    v["events"].as_array().expect("events").clone()
}

async fn alarm(app: &TestApp, id: &str) -> Value {
    let (s, v) = app
        .get(&app.admin_token, &format!("/api/v1/alarms/{id}"))
        .await;
    assert_eq!(s, 200, "{v}");
    v
}

/// An HTTP command with an optional Idempotency-Key; (status, body).
async fn http(
    app: &TestApp,
    token: &str,
    method: &str,
    path: &str,
    body: Value,
    key: Option<&str>,
) -> (u16, Value) {
    let url = app.url(path);
    let mut rb = match method {
        "POST" => app.client.post(url),
        "PATCH" => app.client.patch(url),
        "DELETE" => app.client.delete(url),
        m => panic!("method {m}"),
    }
    .bearer_auth(token);
    if !body.is_null() {
        rb = rb.json(&body);
    }
    if let Some(k) = key {
        rb = rb.header("Idempotency-Key", k);
    }
    let r = timeout(STEP, rb.send())
        .await
        .expect("http in time")
        .expect("http");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[track_caller]
fn assert_http_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_triggers_append_exactly_one_event() {
    let app = spawn_app().await;
    let op = app.user_token("op", "operator").await;
    let id = app.create_alarm("racy").await;
    const CLIENTS: usize = 8;
    // Six WebSocket clients and two HTTP clients, released together.
    let mut sockets = Vec::new();
    for _ in 0..6 {
        sockets.push(app.ws(&op).await.0);
    }
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let ws_clients = sockets.into_iter().enumerate().map(|(i, mut ws)| {
        let (barrier, id) = (barrier.clone(), id.clone());
        async move {
            barrier.wait().await;
            let v = ask(
                &mut ws,
                json!({"type": "trigger", "req": i, "alarm_id": id, "value": i}),
            )
            .await;
            assert_eq!(v["req"], i);
            v
        }
    });
    let http_clients = (0..2).map(|i| {
        let (barrier, id, app, op) = (barrier.clone(), id.clone(), &app, &op);
        async move {
            barrier.wait().await;
            let (s, v) = http(
                app,
                op,
                "POST",
                &format!("/api/v1/alarms/{id}/trigger"),
                json!({"value": 100 + i}),
                None,
            )
            .await;
            assert_eq!(s, 200, "{v}");
            v
        }
    });
    let (a, b) = tokio::join!(join_all(ws_clients), join_all(http_clients));
    let answers: Vec<Value> = a.into_iter().chain(b).collect();
    assert_eq!(answers.len(), CLIENTS);
    let winners: Vec<&Value> = answers
        .iter()
        .filter(|v| v.get("already").is_none())
        .collect();
    assert_eq!(winners.len(), 1, "exactly one trigger wins: {answers:?}");
    let win_offset = winners[0]["offset"].clone();
    for v in &answers {
        assert_eq!(v["type"], "ok", "{v}");
        assert_eq!(v["alarm_id"], id);
        assert_eq!(
            v["offset"], win_offset,
            "everyone learns the winner's offset: {v}"
        );
        assert!(v.get("duplicate").is_none());
    }
    assert_eq!(
        answers.iter().filter(|v| v["already"] == true).count(),
        CLIENTS - 1
    );
    let events = history(&app, &id).await;
    let triggers: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "alarm_triggered")
        .collect();
    assert_eq!(triggers.len(), 1, "{events:?}");
    assert_eq!(triggers[0]["offset"], win_offset);
    assert_eq!(head(&app).await, 2);
    let a = alarm(&app, &id).await;
    assert_eq!(a["state"], "triggered");
    assert_eq!(a["last_trigger_offset"], win_offset);
    assert_eq!(a["last_trigger_value"], triggers[0]["data"]["value"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_command_ids_append_nothing() {
    let app = spawn_app().await;
    let id = app.create_alarm("retry").await;
    let tok = app.admin_token.clone();

    // 1. The answer arrived, then the connection dropped; the retry is a duplicate.
    let cid = uuid();
    let (mut ws, _) = app.ws(&tok).await;
    let first = ask(
        &mut ws,
        json!({"type": "trigger", "req": 1, "alarm_id": id, "command_id": cid, "value": "1"}),
    )
    .await;
    assert_eq!(first["type"], "ok", "{first}");
    assert!(first.get("duplicate").is_none());
    drop(ws);
    let (mut ws, _) = app.ws(&tok).await;
    let again = ask(
        &mut ws,
        json!({"type": "trigger", "req": 2, "alarm_id": id, "command_id": cid, "value": "1"}),
    )
    .await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["offset"], first["offset"]);
    assert_eq!(again["alarm_id"], id);
    assert_eq!(again["req"], 2);
    drop(ws);

    // 2. The connection dropped before the answer could be read: the retry still appends nothing
    //    beyond the one event (whichever of the two reached the writer first made it).
    let cid2 = uuid();
    let (mut ws, _) = app.ws(&tok).await;
    send_json(
        &mut ws,
        json!({"type": "ack", "req": 3, "alarm_id": id, "command_id": cid2}),
    )
    .await;
    drop(ws);
    let (mut ws, _) = app.ws(&tok).await;
    let retry = ask(
        &mut ws,
        json!({"type": "ack", "req": 4, "alarm_id": id, "command_id": cid2}),
    )
    .await;
    assert_eq!(retry["type"], "ok", "{retry}");
    let (_, acks) = events(&app, &format!("?alarm_id={id}")).await;
    let acks: Vec<&Value> = acks
        .iter()
        .filter(|e| e["command_id"] == json!(cid2))
        .collect();
    assert_eq!(acks.len(), 1, "one event for the command id");
    assert_eq!(acks[0]["offset"], retry["offset"]);
    // And a third try, certainly after both: a duplicate.
    let third = ask(
        &mut ws,
        json!({"type": "ack", "req": 5, "alarm_id": id, "command_id": cid2}),
    )
    .await;
    assert_eq!(third["duplicate"], true, "{third}");
    assert_eq!(third["offset"], retry["offset"]);

    // 3. HTTP: the Idempotency-Key header is the command_id, across transports too.
    let key = uuid();
    let body = json!({"name": "created once", "severity": "high"});
    let (s, c1) = http(
        &app,
        &tok,
        "POST",
        "/api/v1/alarms",
        body.clone(),
        Some(&key),
    )
    .await;
    assert_eq!(s, 200, "{c1}");
    assert!(c1.get("duplicate").is_none());
    let (s, c2) = http(
        &app,
        &tok,
        "POST",
        "/api/v1/alarms",
        body.clone(),
        Some(&key),
    )
    .await;
    assert_eq!(s, 200, "{c2}");
    assert_eq!(c2["duplicate"], true, "{c2}");
    assert_eq!(
        (&c2["offset"], &c2["alarm_id"]),
        (&c1["offset"], &c1["alarm_id"])
    );
    let new_id = c1["alarm_id"].as_str().unwrap().to_string();
    let trig_key = uuid();
    let path = format!("/api/v1/alarms/{new_id}/trigger");
    let (s, t1) = http(
        &app,
        &tok,
        "POST",
        &path,
        json!({"value": 5}),
        Some(&trig_key),
    )
    .await;
    assert_eq!(s, 200, "{t1}");
    let (s, t2) = http(
        &app,
        &tok,
        "POST",
        &path,
        json!({"value": 5}),
        Some(&trig_key),
    )
    .await;
    assert_eq!(s, 200, "{t2}");
    assert_eq!(t2["duplicate"], true);
    assert_eq!(t2["offset"], t1["offset"]);
    // Two keys, or a key and a different body command_id, are refused (which would the retry
    // be deduplicated on?); a body command_id equal to the key is the same command.
    let r = app
        .client
        .post(app.url(&path))
        .bearer_auth(&tok)
        .header("Idempotency-Key", uuid())
        .header("Idempotency-Key", uuid())
        .json(&json!({"value": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than once"),
        "{v}"
    );
    let (s, v) = http(
        &app,
        &tok,
        "POST",
        &path,
        json!({"value": 5, "command_id": uuid()}),
        Some(&trig_key),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("differ"),
        "{v}"
    );
    let (s, same) = http(
        &app,
        &tok,
        "POST",
        &path,
        json!({"value": 5, "command_id": trig_key}),
        Some(&trig_key),
    )
    .await;
    assert_eq!(s, 200, "{same}");
    assert_eq!(same["duplicate"], true, "{same}");
    assert_eq!(
        head(&app).await,
        t1["offset"].as_u64().unwrap(),
        "nothing appended"
    );
    // The same key on the WebSocket is the same command.
    let ws_retry = ask(
        &mut ws,
        json!({"type": "trigger", "req": 6, "alarm_id": new_id, "command_id": trig_key}),
    )
    .await;
    assert_eq!(ws_retry["duplicate"], true, "{ws_retry}");
    assert_eq!(ws_retry["offset"], t1["offset"]);
    // A body command_id without the header works as the key too.
    let body_key = uuid();
    let (_, p1) = http(
        &app,
        &tok,
        "PATCH",
        &format!("/api/v1/alarms/{new_id}"),
        json!({"name": "renamed", "command_id": body_key}),
        None,
    )
    .await;
    let (_, p2) = http(
        &app,
        &tok,
        "PATCH",
        &format!("/api/v1/alarms/{new_id}"),
        json!({"name": "renamed", "command_id": body_key}),
        None,
    )
    .await;
    assert_eq!(p2["duplicate"], true, "{p2}");
    assert_eq!(p2["offset"], p1["offset"]);
    // A key that is not a UUID is refused.
    let (s, bad) = http(&app, &tok, "POST", &path, json!({}), Some("not-a-uuid")).await;
    assert_http_error(s, &bad, 400, "bad_request");

    // Exactly: create, trigger, ack (alarm 1); create, trigger, update (alarm 2).
    assert_eq!(head(&app).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_machine_roles_and_versions_over_ws_and_http() {
    let app = spawn_app().await;
    let op = app.user_token("op", "operator").await;
    let viewer = app.user_token("viewer", "viewer").await;
    let (mut ws, hello) = app.ws(&op).await;
    assert_eq!(hello["user"], json!({"name": "op", "role": "operator"}));
    let id = {
        let v = ask(&mut ws, json!({"type": "create", "req": "c", "alarm": {"name": "AAPL > 200", "instrument": "AAPL", "condition": "PX_LAST > 200", "severity": "low", "tags": ["eq"]}})).await;
        assert_eq!(v["type"], "ok", "{v}");
        v["alarm_id"].as_str().unwrap().to_string()
    };
    let a = alarm(&app, &id).await;
    assert_eq!(
        (
            a["state"].as_str(),
            a["version"].as_u64(),
            a["owner"].as_str()
        ),
        (Some("armed"), Some(1), Some("op"))
    );
    let p = |action: &str| format!("/api/v1/alarms/{id}/{action}");

    // ack of armed → not_triggered
    let (s, v) = http(&app, &op, "POST", &p("ack"), json!({}), None).await;
    assert_http_error(s, &v, 409, "not_triggered");
    let v = ask(&mut ws, json!({"type": "ack", "req": 1, "alarm_id": id})).await;
    assert_error(&v, "not_triggered", &json!(1));

    // trigger; trigger again → already with the trigger's offset
    let t = ask(
        &mut ws,
        json!({"type": "trigger", "req": 2, "alarm_id": id, "value": "201.5", "message": "crossed"}),
    )
    .await;
    assert_eq!(t["type"], "ok", "{t}");
    let (s, again) = http(
        &app,
        &op,
        "POST",
        &p("trigger"),
        json!({"value": "202"}),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        (again["already"].clone(), again["offset"].clone()),
        (json!(true), t["offset"].clone())
    );
    let a = alarm(&app, &id).await;
    assert_eq!(
        a["last_trigger_value"], "201.5",
        "numbers are kept as their text"
    );
    assert_eq!(a["last_trigger_message"], "crossed");

    // rearm of triggered → not_acknowledged
    let (s, v) = http(&app, &op, "POST", &p("rearm"), json!({}), None).await;
    assert_http_error(s, &v, 409, "not_acknowledged");
    let v = ask(&mut ws, json!({"type": "rearm", "req": 3, "alarm_id": id})).await;
    assert_error(&v, "not_acknowledged", &json!(3));

    // update keeps the state
    let version = alarm(&app, &id).await["version"].as_u64().unwrap();
    let (s, u) = http(
        &app,
        &op,
        "PATCH",
        &format!("/api/v1/alarms/{id}"),
        json!({"name": "AAPL > 210", "severity": "critical", "tags": ["eq", "us"]}),
        None,
    )
    .await;
    assert_eq!(s, 200, "{u}");
    let a = alarm(&app, &id).await;
    assert_eq!(a["state"], "triggered");
    assert_eq!(
        (a["name"].as_str(), a["severity"].as_str()),
        (Some("AAPL > 210"), Some("critical"))
    );
    assert_eq!(a["tags"], json!(["eq", "us"]));
    assert_eq!(
        (a["instrument"].as_str(), a["condition"].as_str()),
        (Some("AAPL"), Some("PX_LAST > 200"))
    );
    assert_eq!(a["version"].as_u64(), Some(version + 1));
    let v = ask(&mut ws, json!({"type": "update", "req": 4, "alarm_id": id, "changes": {"condition": "PX_LAST > 210"}})).await;
    assert_eq!(v["type"], "ok", "{v}");
    let a = alarm(&app, &id).await;
    assert_eq!(
        (
            a["state"].as_str(),
            a["condition"].as_str(),
            a["name"].as_str()
        ),
        (Some("triggered"), Some("PX_LAST > 210"), Some("AAPL > 210"))
    );
    // An update without changes is a bad request.
    let v = ask(
        &mut ws,
        json!({"type": "update", "req": 5, "alarm_id": id, "changes": {}}),
    )
    .await;
    assert_error(&v, "bad_request", &json!(5));

    // expected_version: a mismatch conflicts, the right one goes through
    let version = a["version"].as_u64().unwrap();
    let (s, v) = http(
        &app,
        &op,
        "POST",
        &p("ack"),
        json!({"expected_version": version + 3}),
        None,
    )
    .await;
    assert_http_error(s, &v, 409, "version_conflict");
    let v = ask(
        &mut ws,
        json!({"type": "ack", "req": 6, "alarm_id": id, "expected_version": version - 1}),
    )
    .await;
    assert_error(&v, "version_conflict", &json!(6));
    let ack = ask(&mut ws, json!({"type": "ack", "req": 7, "alarm_id": id, "expected_version": version, "comment": "on it"})).await;
    assert_eq!(ack["type"], "ok", "{ack}");
    // create with expected_version 0: "must not exist yet" (PRODUCT.md: any command may carry
    // it); an existing id is a version_conflict, a new one is created.
    let v = ask(
        &mut ws,
        json!({"type": "create", "req": "c0", "alarm": {"id": id, "name": "again"}, "expected_version": 0}),
    )
    .await;
    assert_error(&v, "version_conflict", &json!("c0"));
    let (s, v) = http(
        &app,
        &op,
        "POST",
        "/api/v1/alarms",
        json!({"id": id, "name": "again", "expected_version": 0}),
        None,
    )
    .await;
    assert_http_error(s, &v, 409, "version_conflict");
    // ack again → already, with the ack's offset; trigger of acknowledged → already (same firing)
    let (_, v) = http(&app, &op, "POST", &p("ack"), json!({}), None).await;
    assert_eq!(
        (v["already"].clone(), v["offset"].clone()),
        (json!(true), ack["offset"].clone())
    );
    let v = ask(
        &mut ws,
        json!({"type": "trigger", "req": 8, "alarm_id": id}),
    )
    .await;
    assert_eq!(
        (v["already"].clone(), v["offset"].clone()),
        (json!(true), t["offset"].clone())
    );
    // rearm; rearm again → already
    let r = ask(&mut ws, json!({"type": "rearm", "req": 9, "alarm_id": id})).await;
    assert_eq!(r["type"], "ok");
    assert!(r.get("already").is_none());
    let (_, v) = http(&app, &op, "POST", &p("rearm"), json!({}), None).await;
    assert_eq!(
        (v["already"].clone(), v["offset"].clone()),
        (json!(true), r["offset"].clone())
    );
    assert_eq!(alarm(&app, &id).await["state"], "armed");
    // Creating an alarm with an id that exists conflicts.
    let v = ask(
        &mut ws,
        json!({"type": "create", "req": 10, "alarm": {"name": "dup", "id": id}}),
    )
    .await;
    assert_error(&v, "version_conflict", &json!(10));

    // unknown alarm → not_found
    let ghost = uuid();
    let v = ask(
        &mut ws,
        json!({"type": "trigger", "req": 11, "alarm_id": ghost}),
    )
    .await;
    assert_error(&v, "not_found", &json!(11));
    let (s, v) = http(
        &app,
        &op,
        "POST",
        &format!("/api/v1/alarms/{ghost}/ack"),
        json!({}),
        None,
    )
    .await;
    assert_http_error(s, &v, 404, "not_found");
    let (s, v) = app.get(&op, &format!("/api/v1/alarms/{ghost}")).await;
    assert_http_error(s, &v, 404, "not_found");
    let (s, v) = app
        .get(&op, &format!("/api/v1/alarms/{ghost}/history"))
        .await;
    assert_http_error(s, &v, 404, "not_found");
    let (s, v) = http(
        &app,
        &op,
        "POST",
        "/api/v1/alarms/not-a-uuid/trigger",
        json!({}),
        None,
    )
    .await;
    assert_http_error(s, &v, 404, "not_found");

    // viewers cannot command
    let (mut vws, _) = app.ws(&viewer).await;
    let v = ask(
        &mut vws,
        json!({"type": "trigger", "req": "v1", "alarm_id": id}),
    )
    .await;
    assert_error(&v, "forbidden", &json!("v1"));
    let v = ask(
        &mut vws,
        json!({"type": "create", "req": "v2", "alarm": {"name": "nope"}}),
    )
    .await;
    assert_error(&v, "forbidden", &json!("v2"));
    for (m, path) in [
        ("POST", p("trigger")),
        ("POST", "/api/v1/alarms".to_string()),
        ("PATCH", format!("/api/v1/alarms/{id}")),
        ("DELETE", format!("/api/v1/alarms/{id}")),
    ] {
        let (s, v) = http(&app, &viewer, m, &path, json!({"name": "x"}), None).await;
        assert_http_error(s, &v, 403, "forbidden");
    }
    // ... but can read and ping on the same socket
    assert_eq!(
        ask(&mut vws, json!({"type": "ping", "req": "v3"})).await,
        json!({"type": "pong", "req": "v3"})
    );
    let (s, _) = app.get(&viewer, "/api/v1/alarms").await;
    assert_eq!(s, 200);

    // expected_version in PATCH and DELETE bodies (flattened with the changes) is honoured.
    let one = format!("/api/v1/alarms/{id}");
    let (s, v) = http(
        &app,
        &op,
        "PATCH",
        &one,
        json!({"name": "late", "expected_version": 999}),
        None,
    )
    .await;
    assert_http_error(s, &v, 409, "version_conflict");
    let (s, v) = http(
        &app,
        &op,
        "DELETE",
        &one,
        json!({"expected_version": 999}),
        None,
    )
    .await;
    assert_http_error(s, &v, 409, "version_conflict");
    assert_eq!(alarm(&app, &id).await["name"], "AAPL > 210");

    // delete; then every command → alarm_deleted
    let (s, d) = http(
        &app,
        &op,
        "DELETE",
        &format!("/api/v1/alarms/{id}"),
        Value::Null,
        None,
    )
    .await;
    assert_eq!(s, 200, "{d}");
    for (i, msg) in [
        json!({"type": "trigger", "alarm_id": id}),
        json!({"type": "ack", "alarm_id": id}),
        json!({"type": "rearm", "alarm_id": id}),
        json!({"type": "update", "alarm_id": id, "changes": {"name": "zombie"}}),
        json!({"type": "delete", "alarm_id": id}),
        json!({"type": "create", "alarm": {"name": "zombie", "id": id}}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut msg = msg;
        msg["req"] = json!(100 + i);
        let v = ask(&mut ws, msg.clone()).await;
        assert_error(&v, "alarm_deleted", &json!(100 + i));
    }
    for (m, path, body) in [
        ("POST", p("trigger"), json!({})),
        ("POST", p("ack"), json!({})),
        ("POST", p("rearm"), json!({})),
        (
            "PATCH",
            format!("/api/v1/alarms/{id}"),
            json!({"name": "zombie"}),
        ),
        ("DELETE", format!("/api/v1/alarms/{id}"), json!({})),
    ] {
        let (s, v) = http(&app, &op, m, &path, body, None).await;
        assert_http_error(s, &v, 409, "alarm_deleted");
    }

    // deleted alarms are hidden from listings unless asked for
    let other = app.create_alarm("still here").await;
    let (_, list) = app.get(&viewer, "/api/v1/alarms").await;
    let ids: Vec<&str> = list["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![other.as_str()]);
    assert_eq!(list["offset"].as_u64(), Some(head(&app).await));
    let (_, list) = app.get(&viewer, "/api/v1/alarms?state=deleted").await;
    let deleted = list["alarms"].as_array().unwrap();
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        (deleted[0]["id"].as_str(), deleted[0]["state"].as_str()),
        (Some(id.as_str()), Some("deleted"))
    );
    let (_, list) = app.get(&viewer, "/api/v1/alarms?state=armed").await;
    assert_eq!(list["alarms"].as_array().unwrap().len(), 1);
    let (s, v) = app.get(&viewer, "/api/v1/alarms?state=gone").await;
    assert_http_error(s, &v, 400, "bad_request");
    assert_eq!(
        alarm(&app, &id).await["state"],
        "deleted",
        "a tombstone stays readable by id"
    );
    // The full history stays.
    let kinds: Vec<String> = history(&app, &id)
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "alarm_created",
            "alarm_triggered",
            "alarm_updated",
            "alarm_updated",
            "alarm_acknowledged",
            "alarm_rearmed",
            "alarm_deleted"
        ]
    );
}

/// Commands pipelined on one connection (sent without waiting for answers) are applied in the
/// order they were sent: create → trigger → ack → rearm → update → delete all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_on_one_connection_apply_in_order() {
    let app = spawn_app().await;
    let (mut ws, _) = app.ws(&app.admin_token).await;
    const ALARMS: usize = 40;
    let ids: Vec<String> = (0..ALARMS).map(|_| uuid()).collect();
    let mut sent = 0;
    for (i, id) in ids.iter().enumerate() {
        for msg in [
            json!({"type": "create", "alarm": {"name": format!("p{i}"), "id": id}}),
            json!({"type": "trigger", "alarm_id": id, "value": i}),
            json!({"type": "ack", "alarm_id": id}),
            json!({"type": "rearm", "alarm_id": id}),
            json!({"type": "update", "alarm_id": id, "changes": {"severity": "high"}}),
            json!({"type": "delete", "alarm_id": id}),
        ] {
            let mut msg = msg;
            msg["req"] = json!(sent);
            send_json(&mut ws, msg).await;
            sent += 1;
        }
    }
    let mut answers = Vec::new();
    for _ in 0..sent {
        answers.push(next_json(&mut ws, STEP).await);
    }
    let failed: Vec<&Value> = answers
        .iter()
        .filter(|v| v["type"] != "ok" || v.get("already").is_some())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {sent} pipelined commands were reordered: {failed:?}",
        failed.len()
    );
    assert_eq!(head(&app).await, sent as u64);
    for id in &ids[..3] {
        let kinds: Vec<String> = history(&app, id)
            .await
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "alarm_created",
                "alarm_triggered",
                "alarm_acknowledged",
                "alarm_rearmed",
                "alarm_updated",
                "alarm_deleted"
            ]
        );
    }
}

/// PRODUCT.md: "a repeat of a command_id returns the original outcome and appends nothing, for
/// the life of the ledger". A trigger that lost the race (`already`) and is retried with its
/// command_id after the alarm was acknowledged and rearmed must not fire the alarm again: the
/// writer records the outcome of every command that carries an id, appended or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_an_already_answer_appends_nothing_later() {
    let app = spawn_app().await;
    let id = app.create_alarm("late retry").await;
    let (mut ws, _) = app.ws(&app.admin_token).await;
    let win = ask(
        &mut ws,
        json!({"type": "trigger", "req": 1, "alarm_id": id}),
    )
    .await;
    let cid = uuid();
    let lost = ask(
        &mut ws,
        json!({"type": "trigger", "req": 2, "alarm_id": id, "command_id": cid}),
    )
    .await;
    assert_eq!(
        (lost["already"].clone(), lost["offset"].clone()),
        (json!(true), win["offset"].clone())
    );
    assert_eq!(
        ask(&mut ws, json!({"type": "ack", "req": 3, "alarm_id": id})).await["type"],
        "ok"
    );
    assert_eq!(
        ask(&mut ws, json!({"type": "rearm", "req": 4, "alarm_id": id})).await["type"],
        "ok"
    );
    let head_before = head(&app).await;
    // The client never saw the answer to req 2 (connection dropped) and retries it.
    let retry = ask(
        &mut ws,
        json!({"type": "trigger", "req": 5, "alarm_id": id, "command_id": cid}),
    )
    .await;
    assert_eq!(
        head(&app).await,
        head_before,
        "the retry appended an event: {retry}"
    );
    assert_eq!(retry["offset"], lost["offset"], "{retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_answers_overloaded_over_http_and_websocket() {
    // A queue of one command: a burst overflows it. Each refused command gets `overloaded`
    // (HTTP 503 with Retry-After; a WebSocket `error` with its req), nothing refused is
    // appended, and the server goes on serving.
    let app = spawn_app_with(&["--queue-capacity", "1"]).await;
    let tok = app.admin_token.clone();
    let http = futures_util::future::join_all((0..100).map(|i| {
        let (client, url, tok) = (app.client.clone(), app.url("/api/v1/alarms"), tok.clone());
        async move {
            let r = client
                .post(url)
                .bearer_auth(tok)
                .json(&json!({"name": format!("h{i}")}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = r.json().await.unwrap();
            (status, retry, body)
        }
    }));
    let ws_side = async {
        let (mut ws, _) = app.ws(&tok).await;
        for i in 0..100 {
            send_json(
                &mut ws,
                json!({"type": "create", "req": i, "alarm": {"name": format!("w{i}")}}),
            )
            .await;
        }
        let mut answers = Vec::new();
        while answers.len() < 100 {
            answers.push(next_json(&mut ws, STEP).await);
        }
        answers
    };
    let (http, ws) = tokio::join!(http, ws_side);
    let mut appended = 0;
    let mut refused = 0;
    for (status, retry, body) in &http {
        match status {
            200 => appended += 1,
            503 => {
                assert_eq!(body["error"]["code"], "overloaded", "{body}");
                assert!(retry.is_some(), "503 carries Retry-After: {body}");
                refused += 1;
            }
            _ => panic!("{status}: {body}"),
        }
    }
    for v in &ws {
        match v["type"].as_str() {
            Some("ok") => appended += 1,
            Some("error") => {
                assert_eq!(v["code"], "overloaded", "{v}");
                assert!(v["req"].is_u64(), "the error names its request: {v}");
                refused += 1;
            }
            _ => panic!("{v}"),
        }
    }
    assert_eq!(appended + refused, 200);
    assert!(
        refused > 0,
        "a queue of 1 under 200 concurrent commands overflows"
    );
    assert_eq!(
        head(&app).await,
        appended as u64,
        "nothing refused was appended"
    );
    assert_serves(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_every_command_the_server_took_is_answered_before_1001() {
    // Commands pipelined on a socket while the server stops: the writer finishes its queue, so
    // each command it took must reach its client as `ok` (or an error) before the 1001 close;
    // none may be appended unanswered.
    let mut app = spawn_app().await;
    let (mut ws, _) = app.ws(&app.admin_token).await;
    const N: usize = 300;
    let ids: Vec<String> = (0..N).map(|_| uuid()).collect();
    for (i, cid) in ids.iter().enumerate() {
        send_json(
            &mut ws,
            json!({"type": "create", "req": i, "command_id": cid, "alarm": {"name": format!("s{i}")}}),
        )
        .await;
    }
    // The stop starts once the writer has taken commands (the first `ok`): the test then
    // always has commands in flight at the stop, not only ones still in the socket.
    let mut answered = std::collections::HashSet::new();
    loop {
        match next_frame(&mut ws, STEP).await {
            Got::Json(v) if v["type"] == "ok" => {
                answered.insert(v["req"].as_u64().unwrap() as usize);
                break;
            }
            Got::Json(v) if v["type"] == "error" => {}
            Got::Ping => {}
            other => panic!("no answer before the stop: {other:?}"),
        }
    }
    let reader = async {
        loop {
            match next_frame(&mut ws, Duration::from_secs(20)).await {
                Got::Json(v) if v["type"] == "ok" => {
                    answered.insert(v["req"].as_u64().unwrap() as usize);
                }
                Got::Json(v) if v["type"] == "error" => {}
                Got::Ping => {}
                Got::Close(code) => return code,
                other => panic!("{other:?}"),
            }
        }
    };
    let ((), code) = tokio::join!(app.stop(), reader);
    assert_eq!(code, Some(1001));
    let app = app.reopen().await;
    let (s, lines) = events(&app, "").await;
    assert_eq!(s, 200);
    let mut appended = 0;
    for e in &lines {
        if let Some(i) = ids.iter().position(|c| e["command_id"] == c.as_str()) {
            appended += 1;
            assert!(
                answered.contains(&i),
                "command {i} was appended but not answered"
            );
        }
    }
    assert!(appended > 0, "commands were taken before the stop");
    println!("{appended} of {N} appended before the stop, all answered");
}
