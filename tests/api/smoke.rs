use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn create_trigger_subscribe_round_trip() {
    let app = spawn_app().await;
    let id = app.create_alarm("AAPL > 200").await;
    let (s, v) = app
        .post(
            &app.admin_token,
            &format!("/api/v1/alarms/{id}/trigger"),
            json!({"value": "201"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["offset"], 2);
    let (mut ws, hello) = app.ws(&app.admin_token).await;
    assert_eq!(hello["head"], 2);
    send_json(&mut ws, json!({"type": "subscribe", "from": 0, "req": 1})).await;
    let e1 = recv_json(&mut ws).await.unwrap();
    let e2 = recv_json(&mut ws).await.unwrap();
    let live = recv_json(&mut ws).await.unwrap();
    assert_eq!(
        (e1["offset"].as_u64(), e2["offset"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(e2["kind"], "alarm_triggered");
    assert_eq!(live, json!({"type": "live", "offset": 2, "req": 1}));
    send_json(&mut ws, json!({"type": "ack", "alarm_id": id, "req": "a"})).await;
    let mut got_ok = false;
    let mut got_event = false;
    for _ in 0..2 {
        let m = recv_json(&mut ws).await.unwrap();
        match m["type"].as_str() {
            Some("ok") => {
                assert_eq!(m["req"], "a");
                assert_eq!(m["offset"], 3);
                got_ok = true;
            }
            Some("event") => {
                assert_eq!(m["offset"], 3);
                assert_eq!(m["kind"], "alarm_acknowledged");
                got_event = true;
            }
            _ => panic!("unexpected {m}"),
        }
    }
    assert!(got_ok && got_event);
    let app = app.reopen().await;
    let (s, v) = app.get(&app.admin_token, "/api/v1/ledger").await;
    assert_eq!(s, 200);
    assert_eq!(v["head"], 3);
}

/// HEAD (RFC 9110: servers must support it) on the probes and the ledger summary answers as GET
/// would, without a body; on an audited or streamed read it is no route (it would run the read
/// and record it for nothing). Every answer carries `x-request-id`, the WebSocket's 101 too.
#[tokio::test]
async fn head_on_the_probes_and_request_ids_on_every_answer() {
    let app = spawn_app().await;
    for path in ["/healthz", "/readyz", "/metrics", "/api/v1/ledger"] {
        let r = app
            .client
            .head(app.url(path))
            .bearer_auth(&app.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "HEAD {path}");
        assert!(r.headers().contains_key("x-request-id"), "HEAD {path}");
        assert!(
            r.bytes().await.unwrap().is_empty(),
            "HEAD {path} has no body"
        );
    }
    let r = app
        .client
        .head(app.url("/api/v1/events"))
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap();
    // Not answered (a HEAD would run and record the whole read): 405, GET only.
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "GET");
    let id = app.ws_request_id(&app.admin_token).await;
    assert!(
        id.as_deref().is_some_and(|id| id.len() == 12),
        "the 101 carries x-request-id: {id:?}"
    );
}
