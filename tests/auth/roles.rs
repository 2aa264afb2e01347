//! Roles: viewers read and stream only, operators command but do not administer, admins do
//! everything; a role change revokes the tokens issued under the old role.

use crate::common::*;
use crate::support::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn viewer_reads_but_cannot_command() {
    let app = spawn_app().await;
    let id = app.create_alarm("AAPL > 200").await;
    let viewer = app.user_token("vera", "viewer").await;

    assert_eq!(app.get(&viewer, "/api/v1/alarms").await.0, 200);
    assert_eq!(
        app.get(&viewer, &format!("/api/v1/alarms/{id}")).await.0,
        200
    );
    let (s, text) = app.get_text(&viewer, "/api/v1/events").await;
    assert_eq!((s, text.lines().count()), (200, 1));
    let got = app
        .post(&viewer, "/api/v1/alarms", json!({"name": "mine"}))
        .await;
    assert_error(&got, 403, "forbidden");
    for action in ["trigger", "ack", "rearm"] {
        let got = app
            .post(&viewer, &format!("/api/v1/alarms/{id}/{action}"), json!({}))
            .await;
        assert_error(&got, 403, "forbidden");
    }
    let r = app
        .client
        .delete(app.url(&format!("/api/v1/alarms/{id}")))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // On the WebSocket: commands answer `forbidden` (with their req) and the socket stays open;
    // streaming works.
    let (mut ws, hello) = app.ws(&viewer).await;
    assert_eq!(hello["user"]["role"], "viewer");
    send_json(
        &mut ws,
        json!({"type": "create", "req": "c1", "alarm": {"name": "x"}}),
    )
    .await;
    let err = expect_type(&mut ws, "error", Duration::from_secs(5)).await;
    assert_eq!(
        (&err["code"], &err["req"]),
        (&json!("forbidden"), &json!("c1"))
    );
    send_json(
        &mut ws,
        json!({"type": "trigger", "req": 2, "alarm_id": id}),
    )
    .await;
    let err = expect_type(&mut ws, "error", Duration::from_secs(5)).await;
    assert_eq!(
        (&err["code"], &err["req"]),
        (&json!("forbidden"), &json!(2))
    );
    send_json(&mut ws, json!({"type": "subscribe", "from": 0})).await;
    let e = expect_type(&mut ws, "event", Duration::from_secs(5)).await;
    assert_eq!(e["kind"], "alarm_created");
    expect_type(&mut ws, "live", Duration::from_secs(5)).await;
    // Nothing was appended by the refused commands.
    let (_, ledger) = app.get(&app.admin_token, "/api/v1/ledger").await;
    assert_eq!(ledger["head"], 1);
}

#[tokio::test]
async fn operator_commands_but_admin_routes_are_403_and_admin_is_ok() {
    let app = spawn_app().await;
    let op = app.user_token("otto", "operator").await;
    let (s, v) = app
        .post(&op, "/api/v1/alarms", json!({"name": "EURUSD < 1"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["alarm_id"].as_str().unwrap().to_string();
    let (s, _) = app
        .post(
            &op,
            &format!("/api/v1/alarms/{id}/trigger"),
            json!({"value": "0.9"}),
        )
        .await;
    assert_eq!(s, 200);

    assert_error(&app.get(&op, "/api/v1/users").await, 403, "forbidden");
    let got = app
        .post(
            &op,
            "/api/v1/users",
            json!({"username": "mallory", "password": USER_PASSWORD, "role": "admin"}),
        )
        .await;
    assert_error(&got, 403, "forbidden");
    // Not even on themselves: an operator cannot make itself admin.
    let got = patch_user(&app, &op, "otto", json!({"role": "admin"})).await;
    assert_error(&got, 403, "forbidden");
    let got = patch_user(&app, &op, "admin", json!({"disabled": true})).await;
    assert_error(&got, 403, "forbidden");
    let (s, _) = app.get_text(&op, "/api/v1/security-log").await;
    assert_eq!(s, 403);
    assert_error(
        &app.post(&op, "/api/v1/admin/backup", json!({})).await,
        403,
        "forbidden",
    );

    // The same routes as admin.
    let (s, users) = app.get(&app.admin_token, "/api/v1/users").await;
    assert_eq!(s, 200);
    let mut names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["admin", "otto"], "mallory was not created");
    assert_eq!(
        app.get_text(&app.admin_token, "/api/v1/security-log")
            .await
            .0,
        200
    );
    let (s, _) = patch_user(&app, &app.admin_token, "otto", json!({"role": "viewer"})).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn role_change_revokes_old_tokens_and_closes_live_sockets() {
    let app = spawn_app().await;
    let op = app.user_token("olga", "operator").await;
    let (mut ws, _) = app.ws(&op).await;

    let (s, v) = patch_user(&app, &app.admin_token, "olga", json!({"role": "viewer"})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["role"], "viewer");
    // Refused at once on HTTP (the role in the token no longer matches), even for reads.
    assert_error(&app.get(&op, "/api/v1/alarms").await, 401, "unauthorized");
    let got = app.post(&op, "/api/v1/alarms", json!({"name": "x"})).await;
    assert_error(&got, 401, "unauthorized");
    // The live socket is closed within the re-check period (2 s; 10 s for a loaded machine).
    let (code, reason) = expect_close(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(code, 4001, "{reason}");
    // A new login carries the new role, which is enforced.
    let fresh = app.login("olga", USER_PASSWORD).await;
    let got = app
        .post(&fresh, "/api/v1/alarms", json!({"name": "x"}))
        .await;
    assert_error(&got, 403, "forbidden");
    let (_, hello) = app.ws(&fresh).await;
    assert_eq!(hello["user"], json!({"name": "olga", "role": "viewer"}));

    // Promotion revokes too: the viewer token does not silently gain operator rights, and the
    // old viewer token is refused rather than kept at the lower role.
    let (s, _) = patch_user(&app, &app.admin_token, "olga", json!({"role": "operator"})).await;
    assert_eq!(s, 200);
    assert_error(
        &app.get(&fresh, "/api/v1/alarms").await,
        401,
        "unauthorized",
    );
    let promoted = app.login("olga", USER_PASSWORD).await;
    let (s, _) = app
        .post(&promoted, "/api/v1/alarms", json!({"name": "y"}))
        .await;
    assert_eq!(s, 200);
}
