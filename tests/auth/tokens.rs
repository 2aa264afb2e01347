//! Tokens the server must refuse — expired, signed with another secret, unsigned (`alg: none`),
//! tampered with, HS384, or correctly signed but no longer matching the user — on HTTP (401
//! `unauthorized`) and on the WebSocket (accepted upgrade, then close 4001 with a reason).

use crate::common::*;
use crate::support::*;
use alarm_ledger::auth::Role;
use ring::hmac;
use serde_json::{json, Value};
use std::time::Duration;

/// HTTP 401 `unauthorized` on a viewer route and an admin route, and 4001 with `reason` on the
/// WebSocket both ways of passing the token.
async fn refused(app: &TestApp, token: &str, reason: &str, what: &str) {
    for path in ["/api/v1/ledger", "/api/v1/users"] {
        let got = app.get(token, path).await;
        assert_eq!(got.0, 401, "{what}: GET {path}: {}", got.1);
        assert_eq!(got.1["error"]["code"], "unauthorized", "{what}: {}", got.1);
    }
    let mut ws = app.ws_raw(token).await;
    let (code, why) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!((code, why.as_str()), (4001, reason), "{what} (header)");
    let mut ws = ws_query(app, token).await;
    let (code, why) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!((code, why.as_str()), (4001, reason), "{what} (query)");
}

#[tokio::test]
async fn expired_token_is_401_and_ws_close_4001_token_expired() {
    let app = spawn_app().await;
    // Issued an hour ago with the default lifetime: expired 45 minutes ago, correctly signed.
    let expired = signed("admin", Role::Admin, 3600, 15 * 60);
    let got = app.get(&expired, "/api/v1/ledger").await;
    assert_error(&got, 401, "unauthorized");
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{}",
        got.1
    );
    refused(&app, &expired, "token expired", "expired").await;
    // Past exp but beyond the 5 s leeway by one second: still expired.
    let just = signed("admin", Role::Admin, 70, 64);
    refused(&app, &just, "token expired", "just expired").await;
}

#[tokio::test]
async fn forged_tokens_are_refused() {
    let app = spawn_app().await;
    let viewer = app.user_token("vic", "viewer").await;
    let hs256 = hmac::HMAC_SHA256;
    let header = json!({"alg": "HS256", "typ": "JWT"});

    // Sanity: the forging helper makes tokens the server accepts when everything is right, so
    // the refusals below are about the one thing each changes.
    let good = forge(
        &header,
        &claims("vic", "viewer"),
        hs256,
        Some(SECRET.as_bytes()),
    );
    assert_eq!(app.get(&good, "/api/v1/ledger").await.0, 200);

    let other_secret = b"another-secret-another-secret-another-secret";
    let cases: Vec<(&str, String)> = vec![
        (
            "signed with another secret",
            forge(
                &header,
                &claims("admin", "admin"),
                hs256,
                Some(other_secret),
            ),
        ),
        (
            "alg none, no signature",
            forge(
                &json!({"alg": "none", "typ": "JWT"}),
                &claims("admin", "admin"),
                hs256,
                None,
            ),
        ),
        ("alg none, real signature glued on", {
            let sig = viewer.rsplit('.').next().unwrap();
            let unsigned = forge(
                &json!({"alg": "none", "typ": "JWT"}),
                &claims("vic", "admin"),
                hs256,
                None,
            );
            format!("{unsigned}{sig}")
        }),
        ("tampered payload: viewer's token with role admin", {
            let parts: Vec<&str> = viewer.split('.').collect();
            let mut body: Value = serde_json::from_slice(&b64url_decode(parts[1])).unwrap();
            body["role"] = json!("admin");
            format!(
                "{}.{}.{}",
                parts[0],
                b64url(body.to_string().as_bytes()),
                parts[2]
            )
        }),
        (
            "HS384 with the right secret",
            forge(
                &json!({"alg": "HS384", "typ": "JWT"}),
                &claims("admin", "admin"),
                hmac::HMAC_SHA384,
                Some(SECRET.as_bytes()),
            ),
        ),
        (
            "HS512 with the right secret",
            forge(
                &json!({"alg": "HS512", "typ": "JWT"}),
                &claims("admin", "admin"),
                hmac::HMAC_SHA512,
                Some(SECRET.as_bytes()),
            ),
        ),
        (
            "RS256 header with an HMAC signature (algorithm confusion)",
            forge(
                &json!({"alg": "RS256", "typ": "JWT"}),
                &claims("admin", "admin"),
                hs256,
                Some(SECRET.as_bytes()),
            ),
        ),
        (
            "no exp claim",
            forge(
                &header,
                &json!({"sub": "admin", "role": "admin", "iat": chrono::Utc::now().timestamp(),
                        "jti": uuid::Uuid::new_v4().to_string()}),
                hs256,
                Some(SECRET.as_bytes()),
            ),
        ),
        ("garbage", "not.a.token".to_string()),
        ("two parts", "abc.def".to_string()),
    ];
    for (what, token) in &cases {
        refused(&app, token, "unauthorized", what).await;
    }
}

#[tokio::test]
async fn correctly_signed_tokens_that_no_longer_match_the_user_are_refused() {
    let app = spawn_app().await;
    create_user(&app, "vic", USER_PASSWORD, "viewer").await;
    // A gateway (or an attacker who learnt the secret) claims more than the user has: the role
    // is re-checked against the user record on every use.
    let upgraded = signed("vic", Role::Admin, 0, 600);
    let got = app.get(&upgraded, "/api/v1/users").await;
    assert_error(&got, 401, "unauthorized");
    let mut ws = app.ws_raw(&upgraded).await;
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await.0, 4001);
    // A user that does not exist.
    let ghost = signed("ghost", Role::Admin, 0, 600);
    assert_error(
        &app.get(&ghost, "/api/v1/ledger").await,
        401,
        "unauthorized",
    );
    // Issued a minute in the future (beyond the 5 s leeway).
    let future = forge(
        &json!({"alg": "HS256", "typ": "JWT"}),
        &json!({"sub": "admin", "role": "admin",
                "iat": chrono::Utc::now().timestamp() + 60,
                "exp": chrono::Utc::now().timestamp() + 600,
                "jti": uuid::Uuid::new_v4().to_string()}),
        hmac::HMAC_SHA256,
        Some(SECRET.as_bytes()),
    );
    refused(&app, &future, "unauthorized", "issued in the future").await;
    // Not valid before a minute from now (`nbf`, which a gateway sharing the secret may set).
    let not_yet = forge(
        &json!({"alg": "HS256", "typ": "JWT"}),
        &json!({"sub": "admin", "role": "admin",
                "iat": chrono::Utc::now().timestamp(),
                "nbf": chrono::Utc::now().timestamp() + 60,
                "exp": chrono::Utc::now().timestamp() + 600,
                "jti": uuid::Uuid::new_v4().to_string()}),
        hmac::HMAC_SHA256,
        Some(SECRET.as_bytes()),
    );
    refused(&app, &not_yet, "unauthorized", "not valid yet").await;
    // Issued before the account existed (a token minted for a name that was later created).
    let before = signed("vic", Role::Viewer, 120, 600);
    assert_error(
        &app.get(&before, "/api/v1/ledger").await,
        401,
        "unauthorized",
    );
}

#[tokio::test]
async fn missing_or_non_bearer_credentials_are_refused() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/api/v1/ledger"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    let r = app
        .client
        .get(app.url("/api/v1/ledger"))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let mut ws = ws_anonymous(&app).await;
    assert_eq!(
        expect_close(&mut ws, Duration::from_secs(5)).await,
        (4001, "unauthorized".to_string())
    );
    // The valid token works both ways on the WebSocket.
    let mut ws = ws_query(&app, &app.admin_token).await;
    let hello = expect_type(&mut ws, "hello", Duration::from_secs(5)).await;
    assert_eq!(hello["user"], json!({"name": "admin", "role": "admin"}));
}

/// Inverse of `b64url` (no padding), enough to read a token's payload.
fn b64url_decode(s: &str) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = A.iter().position(|&a| a == c).expect("base64url") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}
