//! The offline `user` subcommand of the real binary: on a stopped server's directory it
//! manages accounts a restarted server then honours; on a directory a running server holds it
//! fails at once with a clear message.

use crate::common::*;
use crate::support::*;
use std::time::Duration;

#[track_caller]
fn assert_ok(r: &Run, what: &str) {
    assert_eq!(r.code, Some(0), "{what}: {}{}", r.stdout, r.stderr);
}

#[track_caller]
fn assert_failed(r: &Run, what: &str, message: &str) {
    assert!(
        matches!(r.code, Some(c) if c != 0),
        "{what} should fail: {:?} {}{}",
        r.code,
        r.stdout,
        r.stderr
    );
    assert!(r.stderr.contains(message), "{what}: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{what}: {}", r.stderr);
}

#[tokio::test]
async fn user_subcommands_on_a_stopped_server_directory() {
    let mut app = spawn_app().await;
    app.stop().await;
    let dir = app.data.clone();
    let carol_pw = "carol's first password";
    let carol_pw2 = "carol's second password";
    let dave_pw = "dave via the environment";

    let r = cli_user(
        &dir,
        &["add", "carol", "--role", "operator", "--password", carol_pw],
        &[],
    )
    .await;
    assert_ok(&r, "add carol");
    assert!(
        r.stdout.contains("carol") && r.stdout.contains("operator"),
        "{}",
        r.stdout
    );
    // Password from ALARM_LEDGER_NEW_PASSWORD; role defaults to viewer.
    let r = cli_user(
        &dir,
        &["add", "dave"],
        &[("ALARM_LEDGER_NEW_PASSWORD", dave_pw)],
    )
    .await;
    assert_ok(&r, "add dave");
    let r = cli_user(
        &dir,
        &["add", "frank", "--password", "frank's password"],
        &[],
    )
    .await;
    assert_ok(&r, "add frank");

    // Refusals: clear message, non-zero exit, no panic.
    let r = cli_user(&dir, &["add", "carol", "--password", carol_pw], &[]).await;
    assert_failed(&r, "duplicate", "already exists");
    let r = cli_user(&dir, &["add", "erin", "--password", "short"], &[]).await;
    assert_failed(&r, "weak password", "too weak");
    let r = cli_user(&dir, &["add", "bad name", "--password", carol_pw], &[]).await;
    assert_failed(&r, "bad name", "invalid username");
    // A bad value given on the command line exits 2, like a bad option; a refusal of what the
    // directory holds (duplicate, last admin, unknown user) exits 1.
    assert_eq!(r.code, Some(2), "bad name: {}", r.stderr);
    let r = cli_user(&dir, &["add", "erin", "--password", "short"], &[]).await;
    assert_eq!(r.code, Some(2), "weak password: {}", r.stderr);
    let r = cli_user(&dir, &["add", "carol", "--password", carol_pw], &[]).await;
    assert_eq!(r.code, Some(1), "duplicate: {}", r.stderr);
    let r = cli_user(
        &dir,
        &["add", "erin", "--role", "root", "--password", carol_pw],
        &[],
    )
    .await;
    assert_failed(&r, "bad role", "role");
    let r = cli_user(&dir, &["role", "admin", "viewer"], &[]).await;
    assert_failed(&r, "demote the last admin", "last");
    let r = cli_user(&dir, &["passwd", "nobody", "--password", carol_pw], &[]).await;
    assert_failed(&r, "unknown user", "nobody");
    // No password given and stdin closed: refused as such, no hang.
    let r = cli_user(&dir, &["passwd", "carol"], &[]).await;
    assert_failed(&r, "nothing on stdin", "no password given");
    assert_eq!(r.code, Some(2), "{}", r.stderr);

    let r = cli_user(&dir, &["passwd", "carol", "--password", carol_pw2], &[]).await;
    assert_ok(&r, "passwd carol");
    let r = cli_user(&dir, &["role", "dave", "operator"], &[]).await;
    assert_ok(&r, "role dave");
    let r = cli_user(&dir, &["disable", "frank"], &[]).await;
    assert_ok(&r, "disable frank");
    // Changes that change nothing are answered but not recorded (checked below).
    let r = cli_user(&dir, &["role", "dave", "operator"], &[]).await;
    assert_ok(&r, "role dave again");
    let r = cli_user(&dir, &["disable", "frank"], &[]).await;
    assert_ok(&r, "disable frank again");

    let r = cli_user(&dir, &["list"], &[]).await;
    assert_ok(&r, "list");
    let rows: Vec<Vec<&str>> = r.stdout.lines().map(|l| l.split('\t').collect()).collect();
    let summary: Vec<(&str, &str, &str)> = rows.iter().map(|c| (c[0], c[1], c[2])).collect();
    assert_eq!(
        summary,
        [
            ("admin", "admin", "enabled"),
            ("carol", "operator", "enabled"),
            ("dave", "operator", "enabled"),
            ("frank", "viewer", "disabled"),
        ],
        "{}",
        r.stdout
    );
    assert!(rows.iter().all(|c| c.len() == 4), "{}", r.stdout);

    // A server on the directory honours all of it.
    let app = spawn_app_in(&dir, &[]).await;
    assert_eq!(login_raw(&app, "carol", carol_pw, None).await.0, 401);
    let (s, _, v) = login_raw(&app, "carol", carol_pw2, None).await;
    assert_eq!(
        (s, &v["user"]["role"]),
        (200, &serde_json::json!("operator"))
    );
    let (s, _, v) = login_raw(&app, "dave", dave_pw, None).await;
    assert_eq!(
        (s, &v["user"]["role"]),
        (200, &serde_json::json!("operator"))
    );
    assert_eq!(
        login_raw(&app, "frank", "frank's password", None).await.0,
        401
    );
    let carol = app.login("carol", carol_pw2).await;
    let (s, _) = app
        .post(&carol, "/api/v1/alarms", serde_json::json!({"name": "x"}))
        .await;
    assert_eq!(s, 200);
    // The CLI's changes are in the security log, attributed to the CLI.
    let log = security_log(&app).await;
    for (action, target) in [
        ("user_created", "carol"),
        ("user_created", "dave"),
        ("user_password_changed", "carol"),
        ("user_role_changed", "dave"),
        ("user_disabled", "frank"),
    ] {
        assert!(
            log.iter()
                .any(|e| e["action"] == action && e["target"] == target && e["actor"] == "cli"),
            "no {action} {target} by cli"
        );
    }
    let count = |action: &str, target: &str| {
        log.iter()
            .filter(|e| e["action"] == action && e["target"] == target)
            .count()
    };
    assert_eq!(
        count("user_role_changed", "dave"),
        1,
        "the repeat is not recorded"
    );
    assert_eq!(
        count("user_disabled", "frank"),
        1,
        "the repeat is not recorded"
    );
    let (_, ledger) = app.get(&app.admin_token, "/api/v1/ledger").await;
    verify_chain(ledger["ledger_id"].as_str().unwrap(), &log).expect("chain");
}

#[tokio::test]
async fn user_subcommand_on_a_running_servers_directory_fails_at_once() {
    let app = spawn_app().await;
    for args in [
        &["list"][..],
        &["add", "late", "--password", "late-comer-password"][..],
        &["disable", "admin"][..],
    ] {
        let r = cli_user(&app.data, args, &[]).await;
        assert_failed(&r, &format!("{args:?}"), "in use by another process");
        assert!(
            r.stderr.contains(&app.data.display().to_string()),
            "names the directory: {}",
            r.stderr
        );
        assert!(r.elapsed < Duration::from_secs(5), "took {:?}", r.elapsed);
    }
    // The server is unharmed, and nothing was changed behind its back.
    let (s, users) = app.get(&app.admin_token, "/api/v1/users").await;
    assert_eq!(s, 200);
    assert_eq!(users.as_array().unwrap().len(), 1);
    assert_eq!(users[0]["disabled"], false);
}
