//! Token refresh over HTTP and on a live WebSocket, `token_expiring`, and the 4001 close when
//! a token runs out unrefreshed.

use crate::common::*;
use crate::support::*;
use alarm_ledger::auth::Role;
use serde_json::{json, Value};
use std::time::Duration;

fn rfc3339(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().expect("a time string"))
        .expect("RFC 3339")
        .to_utc()
}

async fn refresh_http(app: &TestApp, token: Option<&str>) -> (u16, Value) {
    let mut r = app.client.post(app.url("/api/v1/token/refresh"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("refresh");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn http_refresh_returns_a_new_token_like_login() {
    let app = spawn_app().await;
    let old = app.user_token("rita", "operator").await;
    let (s, v) = refresh_http(&app, Some(&old)).await;
    assert_eq!(s, 200, "{v}");
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["expires_at", "token", "user"]);
    assert_eq!(v["user"], json!({"name": "rita", "role": "operator"}));
    let new = v["token"].as_str().unwrap();
    assert_ne!(new, old);
    let left = rfc3339(&v["expires_at"]) - chrono::Utc::now();
    assert!(left > chrono::Duration::minutes(14), "{left}");
    assert_eq!(app.get(new, "/api/v1/alarms").await.0, 200);
    let (s, _) = app.post(new, "/api/v1/alarms", json!({"name": "x"})).await;
    assert_eq!(s, 200, "the new token keeps the role");

    // No token, an expired one, a forged one: 401.
    assert_error(&refresh_http(&app, None).await, 401, "unauthorized");
    let expired = signed("rita", Role::Operator, 3600, 900);
    assert_error(
        &refresh_http(&app, Some(&expired)).await,
        401,
        "unauthorized",
    );
    assert_error(
        &refresh_http(&app, Some("a.b.c")).await,
        401,
        "unauthorized",
    );
    // A revoked one (role changed): refresh cannot launder it into a valid token.
    let (s, _) = patch_user(&app, &app.admin_token, "rita", json!({"role": "viewer"})).await;
    assert_eq!(s, 200);
    assert_error(&refresh_http(&app, Some(new)).await, 401, "unauthorized");
}

#[tokio::test]
async fn ws_refresh_answers_ok_and_refuses_another_users_token() {
    let app = spawn_app().await;
    let rita = app.user_token("rita", "viewer").await;
    let sam = app.user_token("sam", "viewer").await;
    let (mut ws, hello) = app.ws(&rita).await;
    let first_expiry = rfc3339(&hello["token_expires_at"]);

    let (s, v) = refresh_http(&app, Some(&rita)).await;
    assert_eq!(s, 200);
    let fresh = v["token"].as_str().unwrap().to_string();
    send_json(
        &mut ws,
        json!({"type": "refresh", "req": 7, "token": fresh}),
    )
    .await;
    let ok = expect_type(&mut ws, "ok", Duration::from_secs(5)).await;
    assert_eq!(ok["req"], 7, "{ok}");
    assert_eq!(rfc3339(&ok["token_expires_at"]), rfc3339(&v["expires_at"]));
    assert!(rfc3339(&ok["token_expires_at"]) >= first_expiry);

    // Another user's (valid) token: refused, and the connection stays open as rita.
    send_json(
        &mut ws,
        json!({"type": "refresh", "req": "x", "token": sam}),
    )
    .await;
    let err = expect_type(&mut ws, "error", Duration::from_secs(5)).await;
    assert_eq!(
        (&err["code"], &err["req"]),
        (&json!("unauthorized"), &json!("x"))
    );
    // Garbage and expired tokens: refused the same way.
    send_json(
        &mut ws,
        json!({"type": "refresh", "req": "g", "token": "a.b.c"}),
    )
    .await;
    let err = expect_type(&mut ws, "error", Duration::from_secs(5)).await;
    assert_eq!(
        (&err["code"], &err["req"]),
        (&json!("unauthorized"), &json!("g"))
    );
    let expired = signed("rita", Role::Viewer, 3600, 900);
    send_json(
        &mut ws,
        json!({"type": "refresh", "req": "e", "token": expired}),
    )
    .await;
    let err = expect_type(&mut ws, "error", Duration::from_secs(5)).await;
    assert_eq!(
        (&err["code"], &err["req"]),
        (&json!("unauthorized"), &json!("e"))
    );
    assert_alive(&mut ws, "still-open").await;
    // A refresh cannot switch identity: commands are still refused as rita the viewer.
    send_json(
        &mut ws,
        json!({"type": "create", "req": "c", "alarm": {"name": "x"}}),
    )
    .await;
    let err = expect_type(&mut ws, "error", Duration::from_secs(5)).await;
    assert_eq!(err["code"], "forbidden");
}

#[tokio::test]
async fn token_expiring_then_4001_unless_refreshed() {
    let app = spawn_app().await;

    // ~62 s left: `token_expiring` about 60 s before expiry, i.e. within a few seconds.
    let warned = async {
        let (mut ws, hello) = app.ws(&signed("admin", Role::Admin, 0, 62)).await;
        let m = expect_type(&mut ws, "token_expiring", Duration::from_secs(5)).await;
        assert_eq!(m["expires_at"], hello["token_expires_at"], "{m}");
        let at = rfc3339(&m["expires_at"]) - chrono::Utc::now();
        assert!(
            at > chrono::Duration::seconds(55) && at <= chrono::Duration::seconds(62),
            "warned {at} before expiry"
        );
        assert_alive(&mut ws, "warned").await;
    };

    // ~3 s left, never refreshed: closed with 4001 `token expired` when it runs out.
    let expires = async {
        let token = signed("admin", Role::Admin, 0, 3);
        let (mut ws, hello) = app.ws(&token).await;
        let exp = rfc3339(&hello["token_expires_at"]);
        // Less than 60 s left: the warning comes at once.
        expect_type(&mut ws, "token_expiring", Duration::from_secs(2)).await;
        let (code, reason) = expect_close(&mut ws, Duration::from_secs(6)).await;
        assert_eq!((code, reason.as_str()), (4001, "token expired"));
        let late = chrono::Utc::now() - exp;
        assert!(
            late > chrono::Duration::milliseconds(-200) && late < chrono::Duration::seconds(3),
            "closed {late} after expiry"
        );
    };

    // ~3 s left, refreshed on the socket: still served after the first token ran out.
    let refreshed = async {
        let token = signed("admin", Role::Admin, 0, 3);
        let (mut ws, hello) = app.ws(&token).await;
        let exp = rfc3339(&hello["token_expires_at"]);
        send_json(
            &mut ws,
            json!({"type": "refresh", "req": 1, "token": app.admin_token}),
        )
        .await;
        let ok = expect_type(&mut ws, "ok", Duration::from_secs(5)).await;
        assert!(rfc3339(&ok["token_expires_at"]) > exp + chrono::Duration::minutes(10));
        let wait = (exp - chrono::Utc::now() + chrono::Duration::milliseconds(1500))
            .to_std()
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        assert_alive(&mut ws, "after-first-expiry").await;
    };

    tokio::join!(warned, expires, refreshed);
}

/// Each refresh is a synced security-log entry, so a user's refreshes are limited (a burst of
/// 30, then one per 2 s), over HTTP and WebSocket together: 429 with `Retry-After` on HTTP,
/// `rate_limited` on the socket; another user is not affected.
#[tokio::test]
async fn a_users_refreshes_are_limited_across_http_and_websocket() {
    let app = spawn_app().await;
    let token = app.user_token("loopy", "viewer").await;
    let mut ok = 0;
    let mut refused = None;
    let started = std::time::Instant::now();
    for _ in 0..100 {
        let (s, v) = refresh_http(&app, Some(&token)).await;
        match s {
            200 => ok += 1,
            _ => {
                refused = Some((s, v));
                break;
            }
        }
    }
    // The burst, and at most one more per 2 s the loop took (a slow machine refills some).
    let refilled = (started.elapsed().as_secs_f64() / 2.0).ceil() as usize;
    assert!(
        (30..=30 + refilled).contains(&ok),
        "{ok} refreshes passed in {:?}",
        started.elapsed()
    );
    let (s, v) = refused.expect("a refresh beyond the burst is refused");
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{v}"
    );
    let r = app
        .client
        .post(app.url("/api/v1/token/refresh"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("refresh");
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // The same user on a WebSocket: the same budget, so refused within a few refreshes (a
    // budget of its own would pass 30; the connection's control budget allows 20). A
    // slow machine may have refilled one or two meanwhile.
    let (mut ws, _) = app.ws(&token).await;
    let mut passed = 0;
    let refused = loop {
        assert!(passed < 4, "{passed} refreshes passed on the socket");
        send_json(
            &mut ws,
            json!({"type": "refresh", "req": "r", "token": token}),
        )
        .await;
        let v = recv_json(&mut ws).await.expect("an answer");
        match v["type"].as_str() {
            Some("ok") => passed += 1,
            _ => break v,
        }
    };
    assert_eq!(
        (refused["code"].as_str(), refused["req"].as_str()),
        (Some("rate_limited"), Some("r")),
        "{refused}"
    );
    // Another user refreshes as usual.
    let other = app.user_token("calm", "viewer").await;
    assert_eq!(refresh_http(&app, Some(&other)).await.0, 200);
}

/// With the shortest token lifetime (`--token-ttl 1m`), a fresh token is not "expiring" at once
/// (it was, 60 s before its end being its start, and a client refreshing on each warning spent
/// its refresh budget in about a second): the warning comes half-way, ~30 s before the expiry.
#[tokio::test]
async fn a_one_minute_token_is_warned_half_way_not_at_once() {
    let app = spawn_app_with(&["--token-ttl", "1m"]).await;
    let (mut ws, hello) = app.ws(&app.admin_token).await;
    // Nothing but the pong within 3 s.
    send_json(&mut ws, json!({"type": "ping", "req": "p"})).await;
    let first = recv_json(&mut ws).await.expect("a message");
    assert_eq!(first["type"], "pong", "{first}");
    let quiet = tokio::time::timeout(Duration::from_secs(3), recv_json(&mut ws)).await;
    assert!(quiet.is_err(), "nothing more at once: {quiet:?}");
    // The warning, when it comes, names the same expiry, ~30 s before it.
    let m = expect_type(&mut ws, "token_expiring", Duration::from_secs(40)).await;
    assert_eq!(m["expires_at"], hello["token_expires_at"], "{m}");
    let left = rfc3339(&m["expires_at"]) - chrono::Utc::now();
    assert!(
        left > chrono::Duration::seconds(25) && left <= chrono::Duration::seconds(31),
        "warned {left} before expiry"
    );
}
