//! The security log: every login, refresh, user change and audit read is recorded with actor,
//! target, address and user agent; it is admin-only; its hash chain verifies when recomputed
//! here from the served NDJSON.

use crate::common::*;
use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

/// A request with [`UA`] as user agent; status and body text.
async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut r = client.request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("request");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

async fn login(client: &reqwest::Client, app: &TestApp, user: &str, pw: &str) -> (u16, String) {
    call(
        client,
        reqwest::Method::POST,
        app.url("/api/v1/login"),
        None,
        Some(json!({"username": user, "password": pw})),
    )
    .await
}

fn token_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).expect("json");
    v["token"].as_str().expect("token").to_string()
}

#[tokio::test]
async fn everything_is_recorded_with_who_what_whom_and_where_and_the_chain_verifies() {
    let mut app = spawn_app().await;
    let c = ua_client();
    use reqwest::Method;

    let (s, body) = login(&c, &app, "admin", ADMIN_PASSWORD).await;
    assert_eq!(s, 200);
    let admin = token_of(&body);
    let (s, _) = call(
        &c,
        Method::POST,
        app.url("/api/v1/users"),
        Some(&admin),
        Some(json!({"username": "sam", "password": USER_PASSWORD, "role": "operator"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(login(&c, &app, "sam", "wrong-password-sam").await.0, 401);
    let (s, body) = login(&c, &app, "sam", USER_PASSWORD).await;
    assert_eq!(s, 200);
    let sam = token_of(&body);
    // The operator may not read the security log.
    let (s, _) = call(
        &c,
        Method::GET,
        app.url("/api/v1/security-log"),
        Some(&sam),
        None,
    )
    .await;
    assert_eq!(s, 403);
    // Throttle "ghost" (an unknown user).
    for _ in 0..5 {
        assert_eq!(login(&c, &app, "ghost", "guess-guess-guess").await.0, 401);
    }
    assert_eq!(login(&c, &app, "ghost", "guess-guess-guess").await.0, 429);
    // Refresh over HTTP and on the WebSocket (the socket's entry carries the upgrade's UA).
    let (s, _) = call(
        &c,
        Method::POST,
        app.url("/api/v1/token/refresh"),
        Some(&sam),
        None,
    )
    .await;
    assert_eq!(s, 200);
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}/api/v1/ws", app.addr)
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        h.insert("authorization", format!("Bearer {sam}").parse().unwrap());
        h.insert("user-agent", UA.parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        expect_type(&mut ws, "hello", Duration::from_secs(5)).await;
        send_json(&mut ws, json!({"type": "refresh", "req": 1, "token": sam})).await;
        expect_type(&mut ws, "ok", Duration::from_secs(5)).await;
    }
    // Audit reads: an export of the event log and an alarm history.
    let (s, body) = call(
        &c,
        Method::POST,
        app.url("/api/v1/alarms"),
        Some(&admin),
        Some(json!({"name": "GOLD > 3000"})),
    )
    .await;
    assert_eq!(s, 200);
    let alarm: Value = serde_json::from_str(&body).unwrap();
    let alarm_id = alarm["alarm_id"].as_str().unwrap().to_string();
    let (s, _) = call(
        &c,
        Method::GET,
        app.url("/api/v1/events?from=1"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        &c,
        Method::GET,
        app.url(&format!("/api/v1/alarms/{alarm_id}/history")),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        &c,
        Method::GET,
        app.url("/api/v1/alarms?as_of=1&state=armed"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200);
    // User administration.
    for body in [
        json!({"role": "viewer"}),
        json!({"password": "sam's second password"}),
        json!({"disabled": true}),
        json!({"disabled": false}),
    ] {
        let (s, text) = call(
            &c,
            Method::PATCH,
            app.url("/api/v1/users/sam"),
            Some(&admin),
            Some(body),
        )
        .await;
        assert_eq!(s, 200, "{text}");
    }

    // The WebSocket refresh is recorded before its `ok`; the loop only tolerates a slow read.
    let mut log = Vec::new();
    for _ in 0..50 {
        log = security_log(&app).await;
        if log
            .iter()
            .any(|e| e["action"] == "token_refreshed" && e["details"]["via"] == "websocket")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let find = |action: &str, actor: Option<&str>, target: &str| -> Value {
        log.iter()
            .find(|e| {
                e["action"] == action
                    && e["target"] == target
                    && e["user_agent"] == UA
                    && actor.map_or(e["actor"].is_null(), |a| e["actor"] == a)
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {action} by {actor:?} on {target} from {UA}; log:\n{}",
                    log.iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
            .clone()
    };
    let expected = [
        ("login_succeeded", Some("admin"), "admin"),
        ("user_created", Some("admin"), "sam"),
        ("login_failed", None, "sam"),
        ("login_succeeded", Some("sam"), "sam"),
        ("login_failed", None, "ghost"),
        ("login_throttled", None, "ghost"),
        ("token_refreshed", Some("sam"), "sam"),
        ("user_role_changed", Some("admin"), "sam"),
        ("user_password_changed", Some("admin"), "sam"),
        ("user_disabled", Some("admin"), "sam"),
        ("user_enabled", Some("admin"), "sam"),
    ];
    for (action, actor, target) in expected {
        let e = find(action, actor, target);
        assert_eq!(e["address"], "127.0.0.1", "{e}");
    }
    for action in ["audit_export", "history_read", "state_as_of_read"] {
        let e = log
            .iter()
            .find(|e| e["action"] == action && e["user_agent"] == UA)
            .unwrap_or_else(|| panic!("no {action}"));
        assert_eq!(
            (&e["actor"], &e["address"]),
            (&json!("admin"), &json!("127.0.0.1")),
            "{e}"
        );
    }
    assert!(log
        .iter()
        .any(|e| e["action"] == "history_read" && e["details"]["alarm_id"] == alarm_id.as_str()));
    // Who reconstructed which past state.
    let as_of = log
        .iter()
        .find(|e| e["action"] == "state_as_of_read")
        .unwrap();
    assert_eq!(
        (&as_of["target"], &as_of["details"]),
        (&json!("alarms"), &json!({"as_of": "1", "state": "armed"})),
        "{as_of}"
    );
    // Who pulled the audit trail, with which filters.
    let export = log
        .iter()
        .find(|e| e["action"] == "audit_export" && e["user_agent"] == UA)
        .unwrap();
    assert_eq!(
        (&export["target"], &export["details"]),
        (&json!("events"), &json!({"from": 1})),
        "{export}"
    );
    // The first-start admin is an entry too, made by the server itself.
    let boot = &log[0];
    assert_eq!(
        (
            &boot["action"],
            &boot["actor"],
            &boot["target"],
            &boot["details"]
        ),
        (
            &json!("user_created"),
            &json!("server"),
            &json!("admin"),
            &json!({"role": "admin", "via": "bootstrap"})
        ),
        "{boot}"
    );
    assert_eq!(
        find("user_created", Some("admin"), "sam")["details"]["role"],
        "operator"
    );
    assert_eq!(
        find("user_role_changed", Some("admin"), "sam")["details"]["role"],
        "viewer"
    );
    assert_eq!(find("login_failed", None, "ghost")["address"], "127.0.0.1");
    assert_eq!(
        log.iter()
            .filter(|e| e["action"] == "login_failed" && e["target"] == "ghost")
            .count(),
        5
    );
    assert!(log.iter().any(|e| e["action"] == "token_refreshed"
        && e["details"]["via"] == "websocket"
        && e["user_agent"] == UA
        && e["address"] == "127.0.0.1"));
    // Entries have the documented fields and never a password.
    let text = log
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for secret in [
        ADMIN_PASSWORD,
        USER_PASSWORD,
        "wrong-password-sam",
        "sam's second password",
        "guess-guess-guess",
    ] {
        assert!(!text.contains(secret), "{secret} in the security log");
    }
    for e in &log {
        let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "action",
                "actor",
                "address",
                "at",
                "details",
                "hash",
                "seq",
                "target",
                "user_agent"
            ]
        );
    }

    // Reading the security log is itself an audit-trail read, and recorded as one
    // (SecurityAction::HistoryRead: "an alarm history or the security log was read").
    let (s, text) = call(
        &c,
        Method::GET,
        app.url("/api/v1/security-log"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let log: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        log.iter().any(|e| e["action"] == "history_read"
            && e["target"] == "security-log"
            && e["actor"] == "admin"
            && e["user_agent"] == UA
            && e["address"] == "127.0.0.1"),
        "reading the security log is not recorded"
    );

    // The chain, recomputed here from the served lines.
    let (_, ledger) = app.get(&app.admin_token, "/api/v1/ledger").await;
    let ledger_id = ledger["ledger_id"].as_str().unwrap();
    let head = verify_chain(ledger_id, &log).expect("the security log chain verifies");
    assert_eq!(head, log.last().unwrap()["hash"]);
    // And by the independent Python script, from the served bytes.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &text).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/verify_chain.py");
    let py = std::process::Command::new("python3")
        .arg(&script)
        .args(["--security-log", ledger_id])
        .arg(file.path())
        .output()
        .expect("python3 runs");
    assert_eq!(
        String::from_utf8_lossy(&py.stdout),
        format!("ok {n} entries, head {n} {}\n", head, n = log.len()),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let mut tampered = text.clone().into_bytes();
    let at = text.find("127.0.0.1").unwrap();
    tampered[at] = b'2';
    std::fs::write(file.path(), &tampered).unwrap();
    let py = std::process::Command::new("python3")
        .arg(&script)
        .args(["--security-log", ledger_id])
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(py.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&py.stdout).starts_with("FAIL seq "));
    // The check is not vacuous: edits, deletions, reordering and another ledger are caught.
    let mut edited = log.clone();
    edited[2]["address"] = json!("192.0.2.66");
    assert!(verify_chain(ledger_id, &edited).is_err());
    let mut dropped = log.clone();
    dropped.remove(3);
    assert!(verify_chain(ledger_id, &dropped).is_err());
    let mut swapped = log.clone();
    swapped.swap(3, 4);
    assert!(verify_chain(ledger_id, &swapped).is_err());
    assert!(verify_chain(&uuid::Uuid::new_v4().to_string(), &log).is_err());

    // The offline verifier agrees (it checks the stored chain, on the stopped server's data).
    app.stop().await;
    let mut cmd = bin();
    cmd.arg("verify").arg("--data").arg(&app.data);
    let out = run(cmd, Duration::from_secs(20)).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
}

/// A client that sends a password change and hangs up at once (before the ~150 ms hash is
/// done) still gets the change recorded: the handler runs to its end, security-log entry
/// included, instead of being dropped with the connection between the change and its entry.
#[tokio::test]
async fn a_change_whose_client_hung_up_is_still_recorded() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app().await;
    create_user(&app, "hugo", "hugo-password-1", "operator").await;
    let body = json!({"password": "hugo-password-2"}).to_string();
    let req = format!(
        "PATCH /api/v1/users/hugo HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        app.admin_token,
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    s.shutdown().await.expect("shutdown");
    drop(s);
    // The change completes: its entry appears in the log (polled there, not by logging in,
    // whose early failures would count towards the login throttle), and the new password works.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let changed = loop {
        let changed: Vec<Value> = security_log(&app)
            .await
            .into_iter()
            .filter(|e| e["action"] == "user_password_changed" && e["target"] == "hugo")
            .collect();
        if !changed.is_empty() {
            break changed;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the password change was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (status, _, v) = login_raw(&app, "hugo", "hugo-password-2", None).await;
    assert_eq!(status, 200, "the new password logs in: {v}");
    assert_eq!(changed.len(), 1, "{changed:?}");
}

/// The log records what changed, not what was asked: a PATCH that sets the role a user already
/// has, or enables an enabled user, records nothing; a real change records its entry.
#[tokio::test]
async fn a_patch_that_changes_nothing_records_nothing() {
    let app = spawn_app().await;
    create_user(&app, "nina", "nina-password-1", "operator").await;
    let count = |log: &[Value], action: &str| {
        log.iter()
            .filter(|e| e["action"] == action && e["target"] == "nina")
            .count()
    };
    let (s, v) = patch_user(
        &app,
        &app.admin_token,
        "nina",
        json!({"role": "operator", "disabled": false}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let log = security_log(&app).await;
    assert_eq!(count(&log, "user_role_changed"), 0);
    assert_eq!(count(&log, "user_enabled"), 0);
    let (s, v) = patch_user(&app, &app.admin_token, "nina", json!({"role": "viewer"})).await;
    assert_eq!(s, 200, "{v}");
    let log = security_log(&app).await;
    let changed: Vec<&Value> = log
        .iter()
        .filter(|e| e["action"] == "user_role_changed" && e["target"] == "nina")
        .collect();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0]["details"]["role"], "viewer");
}

/// A user agent in UTF-8 (a desk named in its own language) is recorded as sent, and a byte
/// that is not UTF-8, a control or a bidirectional override as U+FFFD: never dropped, which
/// left the entry without one.
#[tokio::test]
async fn a_non_ascii_user_agent_is_recorded() {
    let app = spawn_app().await;
    for (sent, recorded) in [
        ("Bureau de Zoë/2.1".as_bytes(), "Bureau de Zoë/2.1"),
        (&b"desk-\xff/1"[..], "desk-\u{fffd}/1"),
        // A C1 control (CSI) and a right-to-left override: an audit line reads as stored.
        (
            "desk\u{9b}2J/\u{202e}1".as_bytes(),
            "desk\u{fffd}2J/\u{fffd}1",
        ),
    ] {
        let r = app
            .client
            .post(app.url("/api/v1/login"))
            .header(
                "user-agent",
                reqwest::header::HeaderValue::from_bytes(sent).unwrap(),
            )
            .json(&json!({"username": "admin", "password": "wrong password, twelve+"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let log = security_log(&app).await;
        assert!(
            log.iter()
                .any(|e| e["action"] == "login_failed" && e["user_agent"] == recorded),
            "{recorded:?} not in {log:?}"
        );
    }
}

/// The security log takes no filter: a parameter is refused (it was ignored, and the whole log
/// came back as if filtered), and the refusal reads nothing, so nothing is recorded.
#[tokio::test]
async fn the_security_log_refuses_parameters() {
    let app = spawn_app().await;
    let before = security_log(&app).await.len();
    for q in ["?actor=admin", "?x=1", "?seq=3"] {
        let (s, v) = app
            .get(&app.admin_token, &format!("/api/v1/security-log{q}"))
            .await;
        assert_eq!(s, 400, "{q}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
    }
    // The reads that listed it before and after are the only new entries.
    assert_eq!(security_log(&app).await.len(), before + 1);
}
