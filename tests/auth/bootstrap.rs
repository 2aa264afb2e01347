//! First start of the real binary: the generated admin password (printed once), the generated
//! JWT secret file (mode 0600), and secrets too short to start with.

use crate::common::*;
use crate::support::*;
use alarm_ledger::auth::TokenService;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

async fn login(server: &Server, password: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(server.url("/api/v1/login"))
        .json(&json!({"username": "admin", "password": password}))
        .send()
        .await
        .expect("login");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn first_start_generates_and_prints_the_admin_password_once_and_a_0600_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    let server = Server::start(&dir, &[], &[]).await;
    let banner = server.stderr.lock().unwrap().clone();
    let password = banner
        .lines()
        .find_map(|l| l.split("created user `admin` with password: ").nth(1))
        .unwrap_or_else(|| panic!("no generated password in:\n{banner}"))
        .trim()
        .to_string();
    assert!(
        password.chars().count() >= 16 && password.chars().all(|c| c.is_ascii_alphanumeric()),
        "{password}"
    );
    let (s, v) = login(&server, &password).await;
    assert_eq!(s, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["user"], json!({"name": "admin", "role": "admin"}));

    // The generated secret: mode 0600, at least 32 bytes, and the key tokens are signed with
    // (as given: a gateway holding the file's content can verify them).
    let path = dir.join("jwt_secret");
    let meta = std::fs::metadata(&path).expect("jwt_secret generated");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let secret = std::fs::read(&path).unwrap();
    assert!(secret.len() >= 32);
    let claims = TokenService::new(secret.clone(), chrono::Duration::minutes(15))
        .verify(&token, chrono::Utc::now())
        .expect("the token verifies with the file's content");
    assert_eq!(claims.sub, "admin");

    let logs = server.stop().await;
    assert_eq!(logs.matches(&password).count(), 1, "printed exactly once");
    assert!(!logs.contains(&String::from_utf8_lossy(&secret).to_string()));

    // A second start: no new password, the first one still works, the secret is reused (the
    // token from the first run is still valid).
    let server = Server::start(&dir, &[], &[]).await;
    assert_eq!(login(&server, &password).await.0, 200);
    let r = reqwest::Client::new()
        .get(server.url("/api/v1/ledger"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(std::fs::read(&path).unwrap(), secret);
    let logs = server.stop().await;
    assert!(!logs.contains("First start"), "{logs}");
    assert!(!logs.contains(&password));
}

/// With `--log-format json` stderr stays one JSON object per line for a collector, the
/// first-start password notice included (it was printed as plain text among the JSON).
#[tokio::test]
async fn with_json_logs_the_first_start_notice_is_json_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    let server = Server::start(&dir, &["--log-format", "json"], &[]).await;
    let password = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let banner = server.stderr.lock().unwrap().clone();
            if let Some(p) = banner
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find_map(|v| v["password"].as_str().map(str::to_string))
            {
                break p;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no password in:\n{banner}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    assert_eq!(login(&server, &password).await.0, 200);
    let logs = server.stop().await;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not JSON: {line}\n{logs}"
        );
    }
    assert_eq!(logs.matches(&password).count(), 1, "printed exactly once");
}

#[tokio::test]
async fn admin_password_from_the_environment_is_used_and_not_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    let server = Server::start(
        &dir,
        &[],
        &[
            ("ALARM_LEDGER_ADMIN_PASSWORD", ADMIN_PASSWORD),
            ("ALARM_LEDGER_JWT_SECRET", SECRET),
        ],
    )
    .await;
    assert_eq!(login(&server, ADMIN_PASSWORD).await.0, 200);
    let logs = server.stop().await;
    assert!(!logs.contains("First start"), "{logs}");
    assert!(!logs.contains(ADMIN_PASSWORD) && !logs.contains(SECRET));
    // With the secret from the environment, none is written to the directory.
    assert!(!dir.join("jwt_secret").exists());
    // Once users exist, another admin password is not taken, and the start says so (an
    // operator resetting a lost password this way would otherwise believe it had worked).
    let other = "another-admin-password";
    let server = Server::start(
        &dir,
        &[],
        &[
            ("ALARM_LEDGER_ADMIN_PASSWORD", other),
            ("ALARM_LEDGER_JWT_SECRET", SECRET),
        ],
    )
    .await;
    assert_eq!(login(&server, other).await.0, 401);
    assert_eq!(login(&server, ADMIN_PASSWORD).await.0, 200);
    let logs = server.stop().await;
    assert!(
        logs.contains(
            "is ignored: it sets the password of the first admin on the first start only"
        ),
        "{logs}"
    );
    assert!(!logs.contains(other));
}

#[tokio::test]
async fn secrets_and_admin_passwords_too_short_to_start_are_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("never-created");
    let short = "only-31-bytes-long-secret-xxxxx";
    assert_eq!(short.len(), 31);
    // (flags, environment, the variable the message must name, the value it must not echo)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case; 3] = [
        (
            &[],
            &[("ALARM_LEDGER_JWT_SECRET", short)],
            "ALARM_LEDGER_JWT_SECRET",
            short,
        ),
        (
            &["--jwt-secret", short],
            &[],
            "ALARM_LEDGER_JWT_SECRET",
            short,
        ),
        (
            &[],
            &[("ALARM_LEDGER_ADMIN_PASSWORD", "too-short")],
            "ALARM_LEDGER_ADMIN_PASSWORD",
            "too-short",
        ),
    ];
    for (args, env, variable, value) in cases {
        let mut cmd = bin();
        cmd.arg("serve")
            .arg("--data")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied());
        let r = run(cmd, Duration::from_secs(10)).await;
        assert_eq!(r.code, Some(2), "{args:?} {env:?}: {}", r.stderr);
        assert!(r.stderr.contains(variable), "{}", r.stderr);
        assert!(
            !r.stderr.contains(value),
            "the value is not echoed: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        // Refused before anything was opened or created.
        assert!(!dir.exists());
    }
}

/// A first start that created `admin` but died before its security-log entry (simulated: the
/// security log emptied after a clean first run) records the creation at the next start, which
/// is no longer a first start.
#[tokio::test]
async fn an_unrecorded_bootstrap_admin_is_recorded_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    let env = [
        ("ALARM_LEDGER_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("ALARM_LEDGER_JWT_SECRET", SECRET),
    ];
    let server = Server::start(&dir, &[], &env).await;
    server.stop().await;
    {
        let db = alarm_ledger::store::sled_log::open_db_after_close(&dir.join("ledger"))
            .expect("open sled");
        db.open_tree("security_log")
            .expect("tree")
            .clear()
            .expect("clear");
        db.flush().expect("flush");
    }
    let server = Server::start(&dir, &[], &env).await;
    let (s, v) = login(&server, ADMIN_PASSWORD).await;
    assert_eq!(s, 200, "{v}");
    let token = v["token"].as_str().expect("token").to_string();
    let text = reqwest::Client::new()
        .get(server.url("/api/v1/security-log"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("security log")
        .text()
        .await
        .expect("body");
    let created: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .filter(|e: &Value| e["action"] == "user_created" && e["target"] == "admin")
        .collect();
    assert_eq!(created.len(), 1, "{text}");
    assert_eq!(created[0]["details"]["via"], "bootstrap");
    server.stop().await;
}

/// A SIGTERM right after the server says it listens is a graceful stop (exit 0): the handlers
/// are installed before start-up, not when the shutdown future is first polled (before, such a
/// SIGTERM met the default disposition and killed the process).
#[tokio::test]
async fn a_sigterm_right_after_start_is_a_graceful_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [
        ("ALARM_LEDGER_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("ALARM_LEDGER_JWT_SECRET", SECRET),
    ];
    for round in 0..5 {
        let server = Server::start(&tmp.path().join("d"), &[], &env).await;
        // `stop` sends SIGTERM at once and asserts a successful exit.
        let logs = server.stop().await;
        assert!(logs.contains("Log in:"), "round {round}: {logs}");
    }
}

/// A first start that cannot listen (port taken) fails before it creates anything: the next
/// start, on a free port, is still the first and prints the generated password (before, the
/// admin was created, the bind failed, and the password was never shown).
#[tokio::test]
async fn a_first_start_that_cannot_listen_creates_no_admin() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut cmd = bin();
    cmd.arg("serve")
        .arg("--data")
        .arg(&dir)
        .args(["--listen", &addr]);
    let r = run(cmd, Duration::from_secs(20)).await;
    assert_ne!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("cannot listen"), "{}", r.stderr);
    assert!(!r.stderr.contains("created user `admin`"), "{}", r.stderr);
    drop(taken);
    let server = Server::start(&dir, &[], &[]).await;
    let banner = server.stderr.lock().unwrap().clone();
    assert!(
        banner.contains("created user `admin` with password: "),
        "the first real start still creates and shows the admin: {banner}"
    );
    server.stop().await;
}

/// The secret file is written under a staging name and renamed into place, so a crash during
/// its creation leaves no file or a whole one. A data directory from an older build that died
/// mid-creation holds an empty `jwt_secret` (and maybe a stale staging file): no token was ever
/// signed with it, so the start makes a new one instead of refusing to start.
#[tokio::test]
async fn an_empty_secret_file_left_by_a_crash_is_replaced_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("crashed");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("jwt_secret"), b"").unwrap();
    std::fs::write(dir.join("jwt_secret.partial"), b"half").unwrap();
    let server = Server::start(
        &dir,
        &[],
        &[("ALARM_LEDGER_ADMIN_PASSWORD", "admin-password-x1")],
    )
    .await;
    assert_eq!(login(&server, "admin-password-x1").await.0, 200);
    let path = dir.join("jwt_secret");
    let meta = std::fs::metadata(&path).expect("jwt_secret");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 64, "a whole new secret");
    assert!(
        !dir.join("jwt_secret.partial").exists(),
        "no staging file left"
    );
    let logs = server.stop().await;
    assert!(logs.contains("the JWT secret file is empty"), "{logs}");
}

/// A `jwt_secret` that is a symlink (to a mounted secret) is never replaced: dangling (the mount
/// is missing), the start fails and the link stays.
#[tokio::test]
async fn a_dangling_secret_symlink_fails_the_start_and_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("linked");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("jwt_secret");
    std::os::unix::fs::symlink(tmp.path().join("missing-mount/jwt"), &link).unwrap();
    let out = alarm_ledger_output(&dir);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("jwt_secret"), "{stderr}");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link is kept"
    );
}

/// `serve` on `dir` run to its exit (it exits at start here).
fn alarm_ledger_output(dir: &std::path::Path) -> std::process::Output {
    crate::common::process::bin()
        .args(["serve", "--data"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .env("ALARM_LEDGER_ADMIN_PASSWORD", "admin-password-x1")
        .output()
        .expect("run")
}
