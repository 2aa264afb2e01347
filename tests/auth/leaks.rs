//! Password hashes (and salts, and passwords) appear in no response, no export, no security-log
//! line and no log line. The server runs as the real binary with debug logging so its log output
//! can be searched; the stored hashes are read afterwards from the stopped server's data
//! directory through the library.

use crate::common::*;
use crate::support::*;
use alarm_ledger::auth::UserStore;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const LEAKY_PASSWORD: &str = "leaky-first-password";
const LEAKY_PASSWORD_2: &str = "leaky-second-password";

/// Every form in which `secret` could plausibly be written out: raw, hex (both cases), base64
/// (standard, padded or not, and url-safe) at each of the three byte alignments it could have
/// inside a larger encoded blob, and decimal byte lists (JSON and Debug).
fn encodings(secret: &[u8]) -> Vec<Vec<u8>> {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = vec![
        secret.to_vec(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
    ];
    for prefix in 0..3usize {
        let mut data = vec![0u8; prefix];
        data.extend_from_slice(secret);
        // Characters fully determined by the secret: skip those mixing in the prefix and the
        // last group (mixed with padding or whatever follows).
        let skip = (prefix * 8).div_ceil(6);
        for (tail, pad) in [(b"+/", true), (b"-_", false)] {
            let enc = b64(&data, tail, pad);
            let core = &enc[skip..enc.len() - 4];
            out.push(core.as_bytes().to_vec());
        }
    }
    let list: Vec<String> = secret.iter().map(u8::to_string).collect();
    out.push(list.join(",").into_bytes());
    out.push(list.join(", ").into_bytes());
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn password_hashes_appear_in_no_response_export_or_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start(
        &dir,
        &["--log-format", "json"],
        &[
            ("ALARM_LEDGER_ADMIN_PASSWORD", ADMIN_PASSWORD),
            ("ALARM_LEDGER_JWT_SECRET", SECRET),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let c = ua_client();
    // Every response body (HTTP and WebSocket) the server sends in this test.
    let mut seen: Vec<(String, Vec<u8>)> = Vec::new();
    macro_rules! req {
        ($what:expr, $builder:expr) => {{
            let resp = $builder.send().await.expect($what);
            let status = resp.status().as_u16();
            let body = resp.bytes().await.expect("body").to_vec();
            seen.push(($what.to_string(), body.clone()));
            (status, body)
        }};
    }
    let json_of = |b: &[u8]| -> Value { serde_json::from_slice(b).expect("json") };

    let (s, b) = req!(
        "login admin",
        c.post(server.url("/api/v1/login"))
            .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
    );
    assert_eq!(s, 200);
    let admin = json_of(&b)["token"].as_str().unwrap().to_string();
    let (s, _) = req!(
        "create leaky",
        c.post(server.url("/api/v1/users"))
            .bearer_auth(&admin)
            .json(&json!({"username": "leaky", "password": LEAKY_PASSWORD, "role": "operator"}))
    );
    assert_eq!(s, 200);
    let (s, _) = req!(
        "duplicate leaky",
        c.post(server.url("/api/v1/users"))
            .bearer_auth(&admin)
            .json(&json!({"username": "leaky", "password": LEAKY_PASSWORD, "role": "operator"}))
    );
    assert_eq!(s, 409);
    let (s, _) = req!(
        "wrong password",
        c.post(server.url("/api/v1/login"))
            .json(&json!({"username": "leaky", "password": "not-the-password"}))
    );
    assert_eq!(s, 401);
    let (s, b) = req!(
        "login leaky",
        c.post(server.url("/api/v1/login"))
            .json(&json!({"username": "leaky", "password": LEAKY_PASSWORD}))
    );
    assert_eq!(s, 200);
    let leaky = json_of(&b)["token"].as_str().unwrap().to_string();
    let (s, b) = req!(
        "create alarm",
        c.post(server.url("/api/v1/alarms"))
            .bearer_auth(&leaky)
            .json(&json!({"name": "BTC > 100k"}))
    );
    assert_eq!(s, 200);
    let alarm_id = json_of(&b)["alarm_id"].as_str().unwrap().to_string();
    let (s, _) = req!(
        "trigger",
        c.post(server.url(&format!("/api/v1/alarms/{alarm_id}/trigger")))
            .bearer_auth(&leaky)
            .json(&json!({"value": 100001}))
    );
    assert_eq!(s, 200);
    let (s, _) = req!(
        "patch password",
        c.patch(server.url("/api/v1/users/leaky"))
            .bearer_auth(&admin)
            .json(&json!({"password": LEAKY_PASSWORD_2}))
    );
    assert_eq!(s, 200);
    let (s, _) = req!(
        "weak password",
        c.patch(server.url("/api/v1/users/leaky"))
            .bearer_auth(&admin)
            .json(&json!({"password": "short"}))
    );
    assert_eq!(s, 400);
    let (s, b) = req!(
        "login leaky again",
        c.post(server.url("/api/v1/login"))
            .json(&json!({"username": "leaky", "password": LEAKY_PASSWORD_2}))
    );
    assert_eq!(s, 200);
    let leaky = json_of(&b)["token"].as_str().unwrap().to_string();
    let (s, _) = req!(
        "refresh",
        c.post(server.url("/api/v1/token/refresh"))
            .bearer_auth(&leaky)
    );
    assert_eq!(s, 200);
    for (what, path) in [
        ("users", "/api/v1/users".to_string()),
        ("ledger", "/api/v1/ledger".to_string()),
        ("alarms", "/api/v1/alarms".to_string()),
        ("alarm", format!("/api/v1/alarms/{alarm_id}")),
        ("history", format!("/api/v1/alarms/{alarm_id}/history")),
        ("events", "/api/v1/events".to_string()),
        ("security-log", "/api/v1/security-log".to_string()),
        ("metrics", "/metrics".to_string()),
    ] {
        let (s, _) = req!(what, c.get(server.url(&path)).bearer_auth(&admin));
        assert_eq!(s, 200, "{what}");
    }
    // The WebSocket: hello, snapshot, events.
    {
        let url = format!("ws://{}/api/v1/ws?access_token={leaky}", server.addr);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        for subscribe in [
            json!({"type": "subscribe", "snapshot": true}),
            json!({"type": "subscribe", "from": 0}),
        ] {
            send_json(&mut ws, subscribe).await;
            loop {
                let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
                    .await
                    .expect("ws message")
                    .expect("open")
                    .expect("ok");
                if let Message::Text(t) = msg {
                    seen.push(("ws".into(), t.as_bytes().to_vec()));
                    if t.as_str().contains("\"live\"") {
                        break;
                    }
                }
            }
        }
    }
    let logs = server.stop().await;
    assert!(
        logs.contains("\"level\":\"DEBUG\"") || logs.contains("DEBUG"),
        "debug logging is on, so the search covers the most verbose output:\n{logs}"
    );

    // The stored hashes, read through the library from the stopped server's directory.
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    {
        let db = sled::Config::new()
            .path(dir.join("ledger"))
            .open()
            .expect("open the stopped server's database");
        let users = UserStore::open(&db).expect("users");
        for name in ["admin", "leaky"] {
            let record = users.get(name).unwrap().expect("stored user");
            let stored = serde_json::to_value(&record).unwrap();
            for part in ["hash", "salt"] {
                let bytes: Vec<u8> = stored["password"][part]
                    .as_array()
                    .unwrap_or_else(|| panic!("record layout changed: {stored}"))
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect();
                assert!(bytes.len() >= 16 && bytes.iter().any(|&b| b != 0));
                secrets.push((format!("{name}'s {part}"), bytes));
            }
        }
    }
    // Offline exports of the same directory.
    for args in [
        vec!["export"],
        vec!["export", "--format", "csv"],
        vec!["export", "--state"],
        vec!["user", "list"],
    ] {
        let mut cmd = bin();
        cmd.arg(args[0]).arg("--data").arg(&dir).args(&args[1..]);
        let out = run(cmd, Duration::from_secs(20)).await;
        assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
        seen.push((format!("cli {args:?}"), out.stdout.into_bytes()));
        seen.push((format!("cli {args:?} stderr"), out.stderr.into_bytes()));
    }
    seen.push(("server log".into(), logs.into_bytes()));

    assert!(seen.len() > 30, "{} bodies collected", seen.len());
    for (what, body) in &seen {
        for (name, secret) in &secrets {
            for enc in encodings(secret) {
                assert!(
                    !find(body, &enc),
                    "{name} ({}) found in {what}",
                    String::from_utf8_lossy(&enc)
                );
            }
        }
        for pw in [
            ADMIN_PASSWORD,
            LEAKY_PASSWORD,
            LEAKY_PASSWORD_2,
            "not-the-password",
        ] {
            assert!(!find(body, pw.as_bytes()), "a password in {what}");
        }
        assert!(!find(body, SECRET.as_bytes()), "the JWT secret in {what}");
    }
    // The search is not vacuous: the same encodings do find a hash where it is written.
    let (name, secret) = &secrets[0];
    let planted = format!("x{}y", b64(secret, b"+/", true));
    assert!(
        encodings(secret)
            .iter()
            .any(|e| find(planted.as_bytes(), e)),
        "{name}"
    );
}
