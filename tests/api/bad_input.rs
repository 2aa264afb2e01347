//! Bad input over WebSocket and HTTP: every rejection has its code, and the server keeps serving
//! other clients afterwards.

use crate::common::*;
use crate::support::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::{sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

/// The test servers' JWT secret (tests/common/mod.rs).
const SECRET: &str = "test-secret-test-secret-test-secret-0123";

async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string()))
        .await
        .expect("ws send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ws_messages_get_bad_request_and_the_connection_stays() {
    let app = spawn_app().await;
    let id = app.create_alarm("target").await;
    // (text, req echoed in the error)
    let batches: Vec<Vec<(String, Value)>> = vec![
        vec![
            ("{".into(), Value::Null),                                // invalid JSON
            ("not json at all".into(), Value::Null),                  // invalid JSON
            ("[1, 2]".into(), Value::Null),                           // not an object
            ("\"subscribe\"".into(), Value::Null),                    // not an object
            ("42".into(), Value::Null),                               // not an object
            (r#"{"type":"nope","req":"u"}"#.into(), json!("u")),      // unknown type
            (r#"{"req":1}"#.into(), json!(1)),                        // missing type
            (r#"{"type":5,"req":2}"#.into(), json!(2)),               // type of the wrong type
            (r#"{"type":"ping","req":{"a":1}}"#.into(), Value::Null), // req of the wrong type
            (r#"{"type":"ping","req":1.5}"#.into(), Value::Null),     // req not an integer
        ],
        vec![
            (r#"{"type":"trigger","req":3}"#.into(), json!(3)), // missing alarm_id
            (r#"{"type":"create","req":4}"#.into(), json!(4)),  // missing alarm
            (r#"{"type":"create","req":5,"alarm":{}}"#.into(), json!(5)), // missing name
            (r#"{"type":"refresh","req":6}"#.into(), json!(6)), // missing token
            (
                r#"{"type":"trigger","req":7,"alarm_id":5}"#.into(),
                json!(7),
            ), // wrong type
            (
                r#"{"type":"trigger","req":8,"alarm_id":"not-a-uuid"}"#.into(),
                json!(8),
            ),
            (
                r#"{"type":"subscribe","req":9,"from":"x"}"#.into(),
                json!(9),
            ),
            (
                r#"{"type":"subscribe","req":10,"from":-1}"#.into(),
                json!(10),
            ),
            (
                r#"{"type":"subscribe","req":11,"snapshot":"yes"}"#.into(),
                json!(11),
            ),
            (
                format!(r#"{{"type":"trigger","req":12,"alarm_id":"{id}","value":true}}"#),
                json!(12),
            ),
        ],
        vec![
            (
                r#"{"type":"create","req":13,"alarm":{"name":7}}"#.into(),
                json!(13),
            ),
            (
                r#"{"type":"create","req":14,"alarm":{"name":"x","tags":"a"}}"#.into(),
                json!(14),
            ),
            (
                format!(r#"{{"type":"update","req":15,"alarm_id":"{id}","changes":[]}}"#),
                json!(15),
            ),
            (
                format!(r#"{{"type":"ack","req":16,"alarm_id":"{id}","expected_version":"1"}}"#),
                json!(16),
            ),
            (
                format!(r#"{{"type":"ack","req":17,"alarm_id":"{id}","command_id":"nope"}}"#),
                json!(17),
            ),
        ],
    ];
    for batch in batches {
        let (mut ws, _) = app.ws(&app.admin_token).await;
        for (text, req) in batch {
            send_text(&mut ws, &text).await;
            let v = next_json(&mut ws, STEP).await;
            assert_eq!(v["type"], "error", "{text}: {v}");
            assert_eq!(v["code"], "bad_request", "{text}: {v}");
            assert_eq!(v["req"], req, "{text}: req echoed when readable: {v}");
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        // The connection is still usable, and so is the server for others.
        assert_eq!(
            ask(&mut ws, json!({"type": "ping", "req": "still"})).await,
            json!({"type": "pong", "req": "still"})
        );
        assert_serves(&app).await;
    }

    // Binary frames are refused with bad_request (no req to echo); the connection stays.
    let (mut ws, _) = app.ws(&app.admin_token).await;
    ws.send(Message::binary(br#"{"type":"ping","req":1}"#.to_vec()))
        .await
        .unwrap();
    let v = next_json(&mut ws, STEP).await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{v}"
    );
    assert!(v.get("req").is_none(), "{v}");
    assert_eq!(
        ask(&mut ws, json!({"type": "ping", "req": "b"})).await["type"],
        "pong"
    );

    // Invalid values inside well-formed commands: bad_request with req.
    let long = "n".repeat(201);
    let many_tags: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
    for (i, alarm) in [
        json!({"name": ""}),
        json!({"name": "   "}),
        json!({"name": long}),
        json!({"name": "x", "severity": "urgent"}),
        json!({"name": "bell\u{7}"}),
        json!({"name": "x", "tags": many_tags}),
        json!({"name": "x", "tags": [""]}),
        json!({"name": "x", "condition": "c".repeat(4097)}),
    ]
    .into_iter()
    .enumerate()
    {
        let v = ask(&mut ws, json!({"type": "create", "req": i, "alarm": alarm})).await;
        assert_error(&v, "bad_request", &json!(i));
    }
    let v = ask(
        &mut ws,
        json!({"type": "trigger", "req": "m", "alarm_id": id, "message": "m".repeat(4097)}),
    )
    .await;
    assert_error(&v, "bad_request", &json!("m"));
    // A refresh with a token that is not valid is refused; the connection keeps its own.
    for (i, token) in ["garbage", ""].into_iter().enumerate() {
        let v = ask(
            &mut ws,
            json!({"type": "refresh", "req": i, "token": token}),
        )
        .await;
        assert_error(&v, "unauthorized", &json!(i));
    }
    assert_eq!(
        ask(&mut ws, json!({"type": "ping", "req": "r"})).await["type"],
        "pong"
    );
    assert_eq!(head(&app).await, 1, "nothing was appended");
    assert_serves(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_ten_malformed_messages_a_minute_close_1008() {
    let app = spawn_app().await;
    let (mut ws, _) = app.ws(&app.admin_token).await;
    for i in 0..10 {
        send_text(&mut ws, &format!(r#"{{"type":"bogus","req":{i}}}"#)).await;
        let v = next_json(&mut ws, STEP).await;
        assert_error(&v, "bad_request", &json!(i));
    }
    // Valid messages in between do not reset the count.
    assert_eq!(
        ask(&mut ws, json!({"type": "ping", "req": "p"})).await["type"],
        "pong"
    );
    send_text(&mut ws, "{oops").await;
    let (code, texts) = read_to_close(&mut ws, STEP).await;
    assert_eq!(code, Some(1008), "{texts:?}");
    assert!(
        texts.is_empty(),
        "the 11th gets no error, only the close: {texts:?}"
    );
    assert_serves(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_closes_1008() {
    let app = spawn_app_with(&["--ws-max-message", "1024"]).await;
    let (mut ws, _) = app.ws(&app.admin_token).await;
    // Just under the limit is fine.
    let pad = "p".repeat(1024 - r#"{"type":"ping","req":1,"pad":""}"#.len());
    let msg = format!(r#"{{"type":"ping","req":1,"pad":"{pad}"}}"#);
    assert_eq!(msg.len(), 1024);
    send_text(&mut ws, &msg).await;
    assert_eq!(
        next_json(&mut ws, STEP).await,
        json!({"type": "pong", "req": 1})
    );
    // One byte over: closed with 1008.
    let msg = format!(r#"{{"type":"ping","req":2,"pad":"{pad}x"}}"#);
    send_text(&mut ws, &msg).await;
    let (code, texts) = read_to_close(&mut ws, STEP).await;
    assert_eq!(code, Some(1008), "{texts:?}");
    assert!(texts.is_empty(), "{texts:?}");
    // A binary frame over the limit too.
    let (mut ws, _) = app.ws(&app.admin_token).await;
    ws.send(Message::binary(vec![b'x'; 4000])).await.unwrap();
    let (code, _) = read_to_close(&mut ws, STEP).await;
    assert_eq!(code, Some(1008));
    assert_serves(&app).await;
}

/// A message over the limit is "a message over the size limit" whether our own check refuses
/// it (within the transport's margin of 4 KiB) or the transport does (beyond it, as soon as
/// the frame header announces the size, while the rest is still coming): 1008 either way, not
/// a close without a code or a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_message_beyond_the_transport_limit_closes_1008() {
    let app = spawn_app().await; // default limit: 64 KiB; transport backstop 68 KiB
    for size in [66_000, 70_000, 300_000, 1_500_000] {
        let (mut ws, _) = app.ws(&app.admin_token).await;
        let msg = format!(r#"{{"type":"ping","req":2,"pad":"{}"}}"#, "p".repeat(size));
        // The server may close while the frame is still being written.
        let _ = timeout(STEP, ws.send(Message::text(msg)))
            .await
            .expect("send in time");
        let (code, texts) = read_to_close(&mut ws, STEP).await;
        assert_eq!(code, Some(1008), "{size} bytes: {texts:?}");
    }
    assert_serves(&app).await;
}

/// Frames the transport itself refuses end with a close code, not a silently dropped
/// connection: a text frame that is not UTF-8 → 1007 (invalid payload), a protocol violation
/// (continuation without a start, unknown opcode, reserved bits set) → 1002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_1007_and_protocol_violations_close_1002() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let app = spawn_app().await;
    let text = |payload: &[u8]| Frame::message(payload.to_vec(), OpCode::Data(Data::Text), true);
    let mut rsv1 = text(br#"{"type":"ping"}"#);
    rsv1.header_mut().rsv1 = true;
    let cases: Vec<(&str, Frame, u16)> = vec![
        (
            "invalid UTF-8",
            text(b"{\"type\":\"ping\",\"req\":\"\xff\xfe\"}"),
            1007,
        ),
        // An overlong encoding and a lone surrogate are not UTF-8 either.
        ("overlong UTF-8", text(b"\xc0\xaf"), 1007),
        ("surrogate", text(b"\xed\xa0\x80"), 1007),
        (
            "continuation without a start",
            Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), true),
            1002,
        ),
        (
            "reserved opcode",
            Frame::message(b"x".to_vec(), OpCode::Data(Data::Reserved(3)), true),
            1002,
        ),
        ("reserved bit", rsv1, 1002),
    ];
    for (what, frame, want) in cases {
        let (mut ws, _) = app.ws(&app.admin_token).await;
        assert_eq!(
            ask(&mut ws, json!({"type": "ping", "req": what})).await["type"],
            "pong"
        );
        ws.send(Message::Frame(frame)).await.expect("ws send");
        let (code, texts) = read_to_close(&mut ws, STEP).await;
        assert_eq!(code, Some(want), "{what}: {texts:?}");
        assert!(texts.is_empty(), "{what}: {texts:?}");
    }
    assert_serves(&app).await;
}

/// Sends the `n` frames `frame(0..n)` at once, then reads their `n` answers: how many were
/// accepted (`ok`), the `req` of those refused with `rate_limited`, and the seconds from the
/// first send to the last answer.
async fn flood(ws: &mut Ws, n: usize, frame: impl Fn(usize) -> Value) -> (usize, Vec<u64>, f64) {
    let started = std::time::Instant::now();
    for i in 0..n {
        send_json(ws, frame(i)).await;
    }
    let mut ok = 0;
    let mut limited = Vec::new();
    for _ in 0..n {
        let v = next_json(ws, STEP).await;
        match v["type"].as_str() {
            Some("ok") => ok += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited.push(v["req"].as_u64().expect("req echoed"));
            }
            _ => panic!("{v}"),
        }
    }
    (ok, limited, started.elapsed().as_secs_f64())
}

/// What `--ws-command-rate 5` lets through in `secs`: the burst of 5, plus the refill of 5 per
/// second (what goes through depends on how long the flood took: seconds on a loaded machine).
fn budget_of_5_per_s(secs: f64) -> usize {
    5 + (5.0 * secs).ceil() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_flood_is_rate_limited_per_connection() {
    let app = spawn_app_with(&["--ws-command-rate", "5"]).await;
    let id = app.create_alarm("flood").await;
    let (mut ws, _) = app.ws(&app.admin_token).await;
    const N: usize = 40;
    let (ok, limited, secs) = flood(
        &mut ws,
        N,
        |i| json!({"type": "trigger", "req": i, "alarm_id": id}),
    )
    .await;
    assert!(
        (5..N).contains(&ok),
        "burst of 5 (plus a refill) goes through: {ok} ok"
    );
    assert_eq!(ok + limited.len(), N);
    let allowed = budget_of_5_per_s(secs);
    assert!(ok <= allowed, "{ok} ok, more than the budget of {allowed}");
    assert!(ok < N / 2, "{ok} of {N} ok: the flood was not limited");
    // A subscribe flood spends the same budget (each one starts a log read). An accepted
    // subscribe answers with its replay, and the next one replaces it, so count the refusals
    // up to a ping sent after the flood.
    let subs_started = std::time::Instant::now();
    for i in 0..N {
        send_json(&mut ws, json!({"type": "subscribe", "req": i, "from": 0})).await;
    }
    send_json(&mut ws, json!({"type": "ping", "req": "end"})).await;
    let mut limited_subs = 0;
    loop {
        let v = next_json(&mut ws, STEP).await;
        match v["type"].as_str() {
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited_subs += 1;
            }
            Some("pong") if v["req"] == "end" => break,
            Some("live") | Some("event") => {}
            _ => panic!("{v}"),
        }
    }
    let allowed = budget_of_5_per_s(subs_started.elapsed().as_secs_f64());
    assert!(
        limited_subs + allowed >= N && limited_subs > N / 2,
        "{limited_subs} of {N} subscribes limited (budget {allowed})"
    );
    // Once the budget refills (5 per second here), subscribing works again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "req": "again", "from": 0}),
    )
    .await;
    // Up to this subscription's own `live` (the replaced one's may still be on its way).
    loop {
        let v = next_json(&mut ws, STEP).await;
        match v["type"].as_str() {
            Some("live") if v["req"] == "again" => break,
            Some("live") | Some("event") => {}
            _ => panic!("a subscribe after the refill: {v}"),
        }
    }
    let v = ask(&mut ws, json!({"type": "unsubscribe", "req": "u"})).await;
    assert_eq!(v["type"], "ok", "{v}");
    // Not a command: ping is never limited; the connection stays open.
    assert_eq!(
        ask(&mut ws, json!({"type": "ping", "req": "p"})).await["type"],
        "pong"
    );
    // Another connection has its own budget.
    let (mut other, _) = app.ws(&app.admin_token).await;
    let v = ask(
        &mut other,
        json!({"type": "rearm", "req": "o", "alarm_id": id}),
    )
    .await;
    assert_error(&v, "not_acknowledged", &json!("o"));
    // After a pause, the flooder may command again.
    sleep(Duration::from_millis(400)).await;
    let v = ask(
        &mut ws,
        json!({"type": "ack", "req": "later", "alarm_id": id}),
    )
    .await;
    assert_eq!(v["type"], "ok", "{v}");
    assert_eq!(head(&app).await, 3, "create, one trigger, one ack");
    assert_serves(&app).await;
}

/// Refreshes made over WebSockets, as recorded in the security log.
async fn ws_refreshes_logged(app: &TestApp) -> usize {
    let (s, text) = timeout(STEP, app.get_text(&app.admin_token, "/api/v1/security-log"))
        .await
        .expect("security log in time");
    assert_eq!(s, 200, "{text}");
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|e| e["action"] == "token_refreshed" && e["details"]["via"] == "websocket")
        .count()
}

/// Each refresh appends a security-log entry (with a disk sync): a refresh flood spends the
/// connection's budget like commands and subscribes, and what is refused is not logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_flood_is_rate_limited_and_logs_at_most_the_budget() {
    let app = spawn_app_with(&["--ws-command-rate", "5"]).await;
    let (s, fresh) = app
        .post(&app.admin_token, "/api/v1/token/refresh", json!({}))
        .await;
    assert_eq!(s, 200, "{fresh}");
    let token = fresh["token"].as_str().expect("token").to_string();
    let before = ws_refreshes_logged(&app).await;
    let (mut ws, _) = app.ws(&app.admin_token).await;
    const N: usize = 40;
    let (ok, limited, elapsed) = flood(
        &mut ws,
        N,
        |i| json!({"type": "refresh", "req": i, "token": token}),
    )
    .await;
    let budget = budget_of_5_per_s(elapsed);
    assert!(
        (5..=budget).contains(&ok),
        "{ok} refreshes accepted, budget {budget} ({elapsed:.2} s)"
    );
    assert_eq!(ok + limited.len(), N);
    let logged = ws_refreshes_logged(&app).await - before;
    assert_eq!(logged, ok, "one security-log entry per accepted refresh");
    // The connection stays open, and once the budget refills a refresh works again.
    sleep(Duration::from_millis(400)).await;
    let v = ask(
        &mut ws,
        json!({"type": "refresh", "req": "later", "token": token}),
    )
    .await;
    assert_eq!(v["type"], "ok", "{v}");
    assert_eq!(ws_refreshes_logged(&app).await - before, ok + 1);
    assert_serves(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_bodies_and_queries_are_400() {
    let app = spawn_app().await;
    let id = app.create_alarm("http").await;
    let tok = app.admin_token.clone();
    let raw = |method: &str, path: &str, body: &str| {
        let url = app.url(path);
        let rb = match method {
            "POST" => app.client.post(url),
            "PATCH" => app.client.patch(url),
            "DELETE" => app.client.delete(url),
            _ => app.client.get(url),
        };
        rb.bearer_auth(&tok)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let alarms = "/api/v1/alarms".to_string();
    let trig = format!("/api/v1/alarms/{id}/trigger");
    let ack = format!("/api/v1/alarms/{id}/ack");
    let one = format!("/api/v1/alarms/{id}");
    let cases: Vec<(&str, &String, &str)> = vec![
        ("POST", &alarms, "{"),
        ("POST", &alarms, "[]"),
        ("POST", &alarms, "\"alarm\""),
        ("POST", &alarms, "{}"),
        ("POST", &alarms, r#"{"name": 5}"#),
        ("POST", &alarms, r#"{"name": ""}"#),
        ("POST", &alarms, r#"{"name": "x", "severity": "urgent"}"#),
        ("POST", &alarms, r#"{"name": "x", "tags": [1]}"#),
        ("POST", &alarms, r#"{"name": "x", "id": "nope"}"#),
        // A repeated key, known or not, at any depth (as on the WebSocket).
        ("POST", &alarms, r#"{"name": "x", "note": 1, "note": 2}"#),
        (
            "POST",
            &alarms,
            r#"{"name": "x", "meta": {"k": 1, "k": 2}}"#,
        ),
        ("POST", &alarms, r#"{"name": "x", "name": "y"}"#),
        (
            "POST",
            &trig,
            r#"{"value": "1", "extra": [{"a": 1, "a": 1}]}"#,
        ),
        ("POST", &trig, r#"{"value": true}"#),
        ("POST", &trig, r#"{"value": {"a": 1}}"#),
        ("POST", &trig, r#"{"expected_version": "1"}"#),
        ("POST", &trig, r#"{"command_id": 5}"#),
        ("POST", &ack, "not json"),
        ("POST", &ack, "[1]"),
        ("PATCH", &one, "{}"),
        ("PATCH", &one, r#"{"tags": "x"}"#),
        ("PATCH", &one, r#"{"name": "  "}"#),
        ("DELETE", &one, "{,}"),
    ];
    for (m, path, body) in cases {
        let r = timeout(STEP, raw(m, path, body))
            .await
            .expect("in time")
            .expect("http");
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(s, 400, "{m} {path} {body}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{m} {path} {body}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    }
    // Bad query parameters.
    for path in [
        "/api/v1/alarms?as_of=yesterday",
        "/api/v1/alarms?state=sleeping",
        "/api/v1/events?from=abc",
        "/api/v1/events?limit=-1",
        "/api/v1/events?since=today",
        "/api/v1/events?alarm_id=x",
        "/api/v1/events?alarm=0190a5d2-0000-7000-8000-000000000000",
        "/api/v1/events?from=5&to=2",
        "/api/v1/events?since=2026-12-09T00:00:00Z&until=2026-12-01T00:00:00Z",
    ] {
        let (s, v) = app.get(&tok, path).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{path}: {v}"
        );
    }
    // A body over 1 MiB is refused: 400 `bad_request`, as PROTOCOL.md maps that code.
    let big = format!(r#"{{"name": "{}"}}"#, "x".repeat(1024 * 1024 + 10));
    let r = timeout(STEP, raw("POST", &alarms, &big))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than"),
        "{v}"
    );
    // Declared too large, with `Expect: 100-continue`: refused at once, before the client is
    // told to send the body (no "100 Continue" first).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "POST /api/v1/alarms HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {tok}\r\n\
             Content-Type: application/json\r\nContent-Length: 5000000\r\n\
             Expect: 100-continue\r\n\r\n",
            app.addr
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = timeout(STEP, sock.read(&mut buf)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("Content-Length: 5000000"), "{answer}");
    }
    // Missing or invalid bearer on HTTP: 401 with the error shape.
    let r = app
        .client
        .get(app.url("/api/v1/alarms"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    let (s, v) = app.get("garbage", "/api/v1/alarms").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(head(&app).await, 1, "nothing was appended");
    assert_serves(&app).await;
}

/// A correctly signed admin token that expired an hour ago.
fn expired_admin_token() -> String {
    alarm_ledger::auth::TokenService::new(SECRET.as_bytes().to_vec(), chrono::Duration::minutes(1))
        .issue(
            "admin",
            alarm_ledger::auth::Role::Admin,
            chrono::Utc::now() - chrono::Duration::hours(2),
        )
        .expect("token")
        .token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_without_a_valid_token_is_closed_4001_not_refused() {
    use alarm_ledger::auth::{Role, TokenService};
    let app = spawn_app().await;
    let expired = expired_admin_token();
    let foreign = TokenService::new(
        b"another-secret-another-secret-0123456".to_vec(),
        chrono::Duration::minutes(15),
    )
    .issue("admin", Role::Admin, chrono::Utc::now())
    .unwrap()
    .token;
    let cases: Vec<(Option<&str>, String, &str)> = vec![
        (None, String::new(), "unauthorized"),
        (Some("garbage"), String::new(), "unauthorized"),
        (None, "?access_token=garbage".into(), "unauthorized"),
        (Some(foreign.as_str()), String::new(), "unauthorized"),
        (Some(expired.as_str()), String::new(), "token expired"),
        (None, format!("?access_token={expired}"), "token expired"),
    ];
    for (bearer, query, reason) in cases {
        // ws_connect asserts the upgrade itself succeeded (101).
        let mut ws = ws_connect(&app, bearer, &query).await;
        let msg = timeout(STEP, futures_util::StreamExt::next(&mut ws))
            .await
            .expect("close in time");
        match msg {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4001, "{bearer:?} {query}");
                assert_eq!(f.reason.as_str(), reason);
            }
            other => panic!("{bearer:?} {query}: expected a 4001 close, got {other:?}"),
        }
    }
    // The query-string token works when valid.
    let mut ws = ws_connect(&app, None, &format!("?access_token={}", app.admin_token)).await;
    let hello = next_json(&mut ws, STEP).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["user"]["name"], "admin");
    assert_serves(&app).await;
}

/// A rejected client that already sent frames still gets its 4001 and an orderly end: the
/// server reads (and drops) what the client sent until the client's Close instead of closing
/// the TCP socket with unread input, which sends a reset (and a reset can destroy the close
/// frame on its way: the client would see "network down" instead of "log in again").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_client_that_already_sent_frames_gets_4001_and_no_reset() {
    let app = spawn_app().await;
    let expired = expired_admin_token();
    for i in 0..30 {
        let (bearer, reason) = if i % 2 == 0 {
            (expired.as_str(), "token expired")
        } else {
            ("garbage", "unauthorized")
        };
        let mut ws = ws_connect(&app, Some(bearer), "").await;
        for n in 0..3 {
            let msg = json!({"type": "ping", "req": n}).to_string();
            if let Err(e) = ws.send(Message::text(msg)).await {
                panic!("round {i}: send {n} failed (the server reset the connection?): {e}");
            }
        }
        let msg = timeout(STEP, futures_util::StreamExt::next(&mut ws))
            .await
            .expect("close in time");
        match msg {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4001, "round {i}");
                assert_eq!(f.reason.as_str(), reason, "round {i}");
            }
            other => panic!("round {i}: expected a 4001 close, got {other:?}"),
        }
        // Our reading answers the Close; then the server ends the TCP connection in order
        // (end of stream), not with a reset.
        match timeout(STEP, futures_util::StreamExt::next(&mut ws)).await {
            Ok(None) => {}
            Ok(Some(Err(e))) => panic!("round {i}: the connection ended with {e}, not in order"),
            Ok(Some(Ok(m))) => panic!("round {i}: unexpected {m:?} after the close"),
            Err(_) => panic!("round {i}: the server never ended the connection"),
        }
    }
    assert_serves(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_users_live_socket_is_closed_4001() {
    let app = spawn_app().await;
    let tok = app.user_token("leaver", "operator").await;
    let (mut ws, _) = app.ws(&tok).await;
    assert_eq!(
        ask(&mut ws, json!({"type": "ping", "req": 1})).await["type"],
        "pong"
    );
    let r = app
        .client
        .patch(app.url("/api/v1/users/leaver"))
        .bearer_auth(&app.admin_token)
        .json(&json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The live socket notices within the periodic re-check (2 s).
    let (code, texts) = read_to_close(&mut ws, Duration::from_secs(6)).await;
    assert_eq!(code, Some(4001), "{texts:?}");
    // A new socket with the same token: accepted, then closed with 4001.
    let mut again = ws_connect(&app, Some(&tok), "").await;
    let (code, _) = read_to_close(&mut again, STEP).await;
    assert_eq!(code, Some(4001));
    let (s, v) = app.get(&tok, "/api/v1/alarms").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_serves(&app).await;
}

/// Slowloris: a client that never finishes its request head (half a request line, headers
/// trickled a line at a time, or nothing at all) is disconnected after the header read timeout
/// instead of holding its connection forever. A real server on 127.0.0.1:0 with the
/// application's state and routes, and the timeout shortened to 1 s (30 s in `serve`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    use alarm_ledger::config::Command;
    use alarm_ledger::startup::Application;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::Instant;
    const LIMIT: Duration = Duration::from_secs(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().display().to_string();
    let argv = [
        "alarm-ledger",
        "serve",
        "--data",
        &data,
        "--listen",
        "127.0.0.1:0",
        "--admin-password",
        ADMIN_PASSWORD,
        "--jwt-secret",
        SECRET,
    ];
    let Command::Serve(args) = parse_cli(argv).command else {
        panic!("not serve")
    };
    let app = Application::build(&args).await.expect("server builds");
    let state = app.state();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(alarm_ledger::http::server::serve_with(
        listener,
        state.clone(),
        alarm_ledger::http::routes(state.clone()),
        async move {
            let _ = stopped.await;
        },
        LIMIT,
    ));
    /// Reads until the server ends the connection; (bytes, time taken). An error (reset)
    /// ends it too.
    async fn until_closed(c: &mut TcpStream, what: &str) -> (Vec<u8>, Duration) {
        let t = Instant::now();
        let mut got = Vec::new();
        match timeout(STEP, c.read_to_end(&mut got)).await {
            Ok(_) => (got, t.elapsed()),
            Err(_) => panic!("{what}: the connection is still open after {STEP:?}; got {got:?}"),
        }
    }

    // A whole request is answered as usual.
    let mut whole = TcpStream::connect(addr).await.expect("connect");
    whole
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let (answer, _) = until_closed(&mut whole, "whole request").await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Half a request line, then nothing.
    // Timed from before the connect: the server's clock starts at its accept.
    let t0 = Instant::now();
    let mut half = TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"GET /healthz HT").await.expect("write");
    let (got, _) = until_closed(&mut half, "half a request line").await;
    let took = t0.elapsed();
    assert!(got.is_empty(), "no answer to half a request: {got:?}");
    assert!(took >= LIMIT - Duration::from_millis(100), "{took:?}");

    // Nothing at all.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let (got, _) = until_closed(&mut silent, "nothing sent").await;
    assert!(got.is_empty(), "{got:?}");

    // Headers trickled a line every 100 ms: the limit is for the whole head, not between bytes.
    let mut drip = TcpStream::connect(addr).await.expect("connect");
    drip.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .await
        .expect("write");
    let t = Instant::now();
    let mut closed = false;
    for i in 0..50 {
        // The server closing shows as EOF (or a reset) on a read; a write may still succeed.
        let mut byte = [0u8; 1];
        match timeout(Duration::from_millis(100), drip.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => panic!("an answer to an unfinished request"),
            Err(_) => {}
        }
        if drip
            .write_all(format!("X-Drip-{i}: {i}\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a trickling client kept its connection for {:?}",
        t.elapsed()
    );
    assert!(
        t.elapsed() < LIMIT * 4,
        "closed only after {:?}",
        t.elapsed()
    );

    // A whole head announcing a body that never fully comes (before any token check): the
    // same limit again for the body, then 400 and the connection is closed.
    let t0 = Instant::now();
    let mut short = TcpStream::connect(addr).await.expect("connect");
    short
        .write_all(
            b"POST /api/v1/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"username\"",
        )
        .await
        .expect("write");
    let (answer, _) = until_closed(&mut short, "a body that never comes").await;
    let took = t0.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("request body not received in time"),
        "{answer}"
    );
    assert!(
        took >= LIMIT - Duration::from_millis(100) && took < LIMIT * 4,
        "answered after {took:?}"
    );

    // The server still serves.
    let (s, v) = {
        let r = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .expect("healthz");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    assert_eq!(s, 200, "{v}");
    // Shutdown is still graceful: a keep-alive connection that had its answer is closed, and
    // the server returns (it waits for every connection).
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 12];
    timeout(STEP, kept.read_exact(&mut head))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(&head, b"HTTP/1.1 200");
    let _ = stop.send(());
    timeout(LIMIT / 2, server)
        .await
        .expect("server stops at once (not after the header read timeout)")
        .expect("server task");
    let (_, _) = until_closed(&mut kept, "kept-alive connection at shutdown").await;
    let ledger = state.ledger.clone();
    drop(app);
    let _ = tokio::task::spawn_blocking(move || ledger.stop()).await;
}

/// Subscribes and refreshes have a budget of their own (20 a second per connection), far below
/// the command rate (2,000 a second by default): each subscribe starts a log read, and one
/// viewer resubscribing at the command rate could queue thousands a second. Commands keep their
/// own budget meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_flood_is_limited_at_the_default_command_rate() {
    let app = spawn_app().await;
    let id = app.create_alarm("subflood").await;
    let viewer = app.user_token("subflooder", "viewer").await;
    let (mut ws, _) = app.ws(&viewer).await;
    const N: usize = 200;
    let started = std::time::Instant::now();
    for i in 0..N {
        send_json(&mut ws, json!({"type": "subscribe", "req": i, "from": 0})).await;
    }
    send_json(&mut ws, json!({"type": "ping", "req": "end"})).await;
    let mut limited = 0;
    loop {
        let v = next_json(&mut ws, STEP).await;
        match v["type"].as_str() {
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited += 1;
            }
            Some("pong") if v["req"] == "end" => break,
            Some("live") | Some("event") => {}
            _ => panic!("{v}"),
        }
    }
    let allowed = 20 + (20.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        limited + allowed >= N && limited > N / 2,
        "{limited} of {N} subscribes limited (budget {allowed})"
    );
    // The command budget is untouched: an operator on another connection, and this viewer's
    // own pings, are served.
    let (mut op, _) = app.ws(&app.admin_token).await;
    let v = ask(
        &mut op,
        json!({"type": "trigger", "req": "t", "alarm_id": id}),
    )
    .await;
    assert_eq!(v["type"], "ok", "{v}");
    // (`call`: the last accepted subscription may still be replaying.)
    let (pong, _) = call(&mut ws, json!({"type": "ping", "req": "p"})).await;
    assert_eq!(pong["type"], "pong");
    assert_serves(&app).await;
}

/// An upgrade with another WebSocket version is answered 400 with the JSON error shape and the
/// version the server speaks (RFC 6455 §4.4).
#[tokio::test]
async fn an_upgrade_with_another_websocket_version_is_a_json_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let mut s = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    s.write_all(
        b"GET /api/v1/ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 8\r\n\
          connection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{answer}"
    );
    let body = answer.split("\r\n\r\n").nth(1).expect("a body");
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    assert_serves(&app).await;
}

/// A plain GET of the WebSocket route (a proxy that dropped the upgrade headers) says what is
/// missing: `bad_request` with `Upgrade: websocket`, not "no route".
#[tokio::test]
async fn the_websocket_route_without_an_upgrade_says_so() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/api/v1/ws"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["upgrade"], "websocket");
    let v: Value = r.json().await.expect("JSON error");
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("WebSocket upgrade"),
        "{v}"
    );
}

/// A path the server has, asked with a method it does not take, is 405 `method_not_allowed`
/// with an `Allow` header (RFC 9110); an unknown path stays 404.
#[tokio::test]
async fn a_known_path_with_the_wrong_method_is_405_with_allow() {
    let app = spawn_app().await;
    let id = app.create_alarm("methods").await;
    let one = format!("/api/v1/alarms/{id}");
    let cases: [(&str, &str, &str); 5] = [
        ("PUT", "/api/v1/alarms", "GET, POST"),
        ("HEAD", "/api/v1/alarms", "GET, POST"),
        ("GET", "/api/v1/login", "POST"),
        ("POST", &one, "GET, PATCH, DELETE"),
        ("DELETE", "/healthz", "GET, HEAD"),
    ];
    for (method, path, allow) in cases {
        let r = app
            .client
            .request(method.parse().unwrap(), app.url(path))
            .bearer_auth(&app.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        if method != "HEAD" {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
        }
    }
    let (s, v) = app.get(&app.admin_token, "/api/v1/nothing-here").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    // Path segments are percent-decoded (`%30` is `0`); a malformed escape is a bad request.
    let hex = format!("%{:02X}", id.as_bytes()[0]);
    let (s, v) = app
        .get(
            &app.admin_token,
            &format!("/api/v1/alarms/{hex}{}", &id[1..]),
        )
        .await;
    assert_eq!((s, v["id"].as_str()), (200, Some(id.as_str())), "{v}");
    let (s, v) = app.get(&app.admin_token, "/api/v1/alarms/%zz").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
}
