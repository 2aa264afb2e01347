//! Helpers of the auth tests: hand-made tokens, raw HTTP and WebSocket probes, the security-log
//! chain recomputed independently of the server, and the real binary as a child process.

use crate::common::*;
use alarm_ledger::auth::{Role, TokenService};
use futures_util::StreamExt;
use ring::digest::{digest, Context, SHA256};
use ring::hmac;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The secret `spawn_app` gives the server (tests/common/mod.rs).
pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";
/// Sent by `ua_client`, so security-log entries can be told apart from the harness's own login.
pub const UA: &str = "auth-tests/1.0";
/// The real binary, built by cargo for integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_alarm-ledger");

/// A client that sends [`UA`] as its user agent.
pub fn ua_client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(UA)
        .build()
        .expect("client")
}

/// A token service with the test server's secret and the given lifetime, for tokens with
/// chosen `iat`/`exp` (expired, about to expire, wrong role, unknown user …).
pub fn tokens(ttl: chrono::Duration) -> TokenService {
    TokenService::new(SECRET.as_bytes().to_vec(), ttl)
}

/// A correctly signed token for `sub`/`role`, issued `ago` seconds before now, living `ttl` s.
pub fn signed(sub: &str, role: Role, ago: i64, ttl: i64) -> String {
    let now = chrono::Utc::now() - chrono::Duration::seconds(ago);
    tokens(chrono::Duration::seconds(ttl))
        .issue(sub, role, now)
        .expect("issue")
        .token
}

/// base64url without padding, as JWTs use.
pub fn b64url(data: &[u8]) -> String {
    b64(data, b"-_", false)
}

/// Standard base64 (`+/`), with or without `=` padding.
pub fn b64(data: &[u8], tail: &[u8; 2], pad: bool) -> String {
    const HEAD: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let sym = |i: u32| -> char {
        let i = i as usize;
        char::from(if i < 62 { HEAD[i] } else { tail[i - 62] })
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(sym((n >> (18 - 6 * i)) & 63));
        }
        if pad {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// A JWT with any header and claims, signed with HMAC `alg` (or unsigned when `key` is None).
pub fn forge(header: &Value, claims: &Value, alg: hmac::Algorithm, key: Option<&[u8]>) -> String {
    let message = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = match key {
        Some(k) => b64url(hmac::sign(&hmac::Key::new(alg, k), message.as_bytes()).as_ref()),
        None => String::new(),
    };
    format!("{message}.{sig}")
}

/// Claims like ours, valid for ten minutes from now.
pub fn claims(sub: &str, role: &str) -> Value {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let now = now_ms.div_euclid(1000);
    json!({"sub": sub, "role": role, "iat": now, "exp": now + 600,
           "jti": uuid::Uuid::new_v4().to_string(), "iat_ms": now_ms})
}

/// Status, `Retry-After` and JSON body of a login, optionally with `X-Forwarded-For`.
pub async fn login_raw(
    app: &TestApp,
    user: &str,
    password: &str,
    xff: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut r = app
        .client
        .post(app.url("/api/v1/login"))
        .json(&json!({"username": user, "password": password}));
    if let Some(x) = xff {
        r = r.header("x-forwarded-for", x);
    }
    let resp = r.send().await.expect("login request");
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").to_string());
    (status, retry, resp.json().await.unwrap_or(Value::Null))
}

/// Asserts an HTTP error answer: status and `error.code`.
#[track_caller]
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
}

/// Creates a user as admin; panics unless 200.
pub async fn create_user(app: &TestApp, name: &str, password: &str, role: &str) {
    let (s, v) = app
        .post(
            &app.admin_token,
            "/api/v1/users",
            json!({"username": name, "password": password, "role": role}),
        )
        .await;
    assert_eq!(s, 200, "create {name}: {v}");
}

/// `PATCH /api/v1/users/{name}` with `token`.
pub async fn patch_user(app: &TestApp, token: &str, name: &str, body: Value) -> (u16, Value) {
    let r = app
        .client
        .patch(app.url(&format!("/api/v1/users/{name}")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("patch");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A WebSocket with the token in `?access_token=` (the other way PROTOCOL.md allows).
pub async fn ws_query(app: &TestApp, token: &str) -> Ws {
    let url = format!("ws://{}/api/v1/ws?access_token={token}", app.addr);
    tokio_tungstenite::connect_async(url.into_client_request().expect("request"))
        .await
        .expect("ws connect")
        .0
}

/// A WebSocket without any token.
pub async fn ws_anonymous(app: &TestApp) -> Ws {
    let url = format!("ws://{}/api/v1/ws", app.addr);
    tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connect")
        .0
}

/// Reads (skipping text messages) until a close frame within `within`; its code and reason.
/// Panics on timeout or when the stream ends without a close frame.
pub async fn expect_close(ws: &mut Ws, within: Duration) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no close frame within {within:?}"));
        match msg {
            Some(Ok(Message::Close(Some(f)))) => return (f.code.into(), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before a close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// The next JSON message of type `ty` within `within` (other messages are skipped).
pub async fn expect_type(ws: &mut Ws, ty: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {ty} within {within:?}"));
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json message");
                if v["type"] == ty {
                    return v;
                }
            }
            Some(Ok(Message::Close(f))) => panic!("closed while waiting for {ty}: {f:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error while waiting for {ty}: {e}"),
            None => panic!("stream ended while waiting for {ty}"),
        }
    }
}

/// Sends `ping` with `req` and waits for its `pong`: proves the socket is open and served.
pub async fn assert_alive(ws: &mut Ws, req: &str) {
    send_json(ws, json!({"type": "ping", "req": req})).await;
    let pong = expect_type(ws, "pong", Duration::from_secs(5)).await;
    assert_eq!(pong["req"], req);
}

/// The security log as parsed NDJSON lines (admin token).
pub async fn security_log(app: &TestApp) -> Vec<Value> {
    let (s, text) = app.get_text(&app.admin_token, "/api/v1/security-log").await;
    assert_eq!(s, 200, "{text}");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("security log line is JSON"))
        .collect()
}

/// Canonical JSON as the security log's hash recipe wants it: keys sorted at every level, no
/// whitespace. Written here, independently of the server's code.
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        scalar => scalar.to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Recomputes the chain: `hash = SHA-256(prev || canonical(entry without hash))`, the first
/// `prev` being `SHA-256("security:" + ledger_id)`; seqs 1, 2, 3, …; times never decreasing.
/// Returns the head hash, or where the chain breaks.
pub fn verify_chain(ledger_id: &str, entries: &[Value]) -> Result<String, String> {
    let mut prev = digest(&SHA256, format!("security:{ledger_id}").as_bytes())
        .as_ref()
        .to_vec();
    let mut prev_at = String::new();
    for (i, e) in entries.iter().enumerate() {
        let seq = i as u64 + 1;
        if e["seq"] != seq {
            return Err(format!("entry {seq} has seq {}", e["seq"]));
        }
        let at = e["at"].as_str().ok_or(format!("entry {seq}: no at"))?;
        // Same fixed-width RFC 3339 form everywhere, so text order is time order.
        if at < prev_at.as_str() {
            return Err(format!("entry {seq}: time goes backwards"));
        }
        prev_at = at.to_string();
        let mut body = e.clone();
        let stated = body
            .as_object_mut()
            .and_then(|m| m.remove("hash"))
            .ok_or(format!("entry {seq}: no hash"))?;
        let mut ctx = Context::new(&SHA256);
        ctx.update(&prev);
        ctx.update(canonical(&body).as_bytes());
        let hash = ctx.finish().as_ref().to_vec();
        if stated != hex(&hash) {
            return Err(format!("entry {seq}: hash mismatch"));
        }
        prev = hash;
    }
    Ok(hex(&prev))
}

// ------------------------------------------------------------------ the real binary

/// `Command` for the binary with every `ALARM_LEDGER_*` variable of the test environment
/// removed (so a developer's settings cannot leak in), stdin closed (never waits for a
/// password), and the child killed if the test panics.
pub fn bin() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ALARM_LEDGER_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Result of a finished run of the binary.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs the binary to completion (at most `limit`, else panics: a hang is a failure).
pub async fn run(mut cmd: Command, limit: Duration) -> Run {
    let started = std::time::Instant::now();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("the binary did not finish within {limit:?}"))
        .expect("run the binary");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// `alarm-ledger user --data <dir> <args>`, with extra environment variables.
///
/// `--data` goes before the action: it is an option of `user`, not of `user add` (config.rs),
/// so `user add NAME --data DIR` is refused by the argument parser.
pub async fn cli_user(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = bin();
    c.arg("user")
        .arg("--data")
        .arg(dir)
        .args(args)
        .envs(env.iter().copied());
    run(c, Duration::from_secs(20)).await
}

/// A server running as a child process, its stderr (logs and the banner) captured.
pub struct Server {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    /// Everything the server wrote to stderr so far.
    pub stderr: Arc<Mutex<String>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Server {
    /// `alarm-ledger serve --data <dir> --listen 127.0.0.1:0 <extra>` with `env`; waits for the
    /// "Log in:" banner (printed once listening), or with `--log-format json` the listening
    /// event, and reads the address from it.
    pub async fn start(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut c = bin();
        c.arg("serve")
            .arg("--data")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn the server");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<std::net::SocketAddr>();
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = stderr.clone();
        let reader = tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                {
                    let mut s = sink.lock().expect("stderr buffer");
                    s.push_str(&line);
                    s.push('\n');
                }
                // `--log-format json` prints no banner: the address is in the log event.
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "alarm-ledger listening" {
                        if let (Some(tx), Some(Ok(a))) =
                            (tx.take(), v["addr"].as_str().map(str::parse))
                        {
                            let _ = tx.send(a);
                        }
                    }
                }
                if let Some(rest) = line.split("http://").nth(1) {
                    if line.contains("Log in:") {
                        let addr = rest.split('/').next().unwrap_or_default();
                        if let (Some(tx), Ok(a)) = (tx.take(), addr.parse()) {
                            let _ = tx.send(a);
                        }
                    }
                }
            }
        });
        let addr = match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(a)) => a,
            _ => panic!(
                "the server did not print its address; stderr:\n{}",
                stderr.lock().expect("stderr buffer")
            ),
        };
        Server {
            child,
            addr,
            stderr,
            reader,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGTERM, then waits (bounded) for a clean exit; returns all of stderr.
    pub async fn stop(mut self) -> String {
        let pid = self.child.id().expect("running") as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the server stops within 20 s of SIGTERM")
            .expect("wait");
        assert!(status.success(), "server exit status {status}");
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        let s = self.stderr.lock().expect("stderr buffer").clone();
        s
    }
}

/// Sleeps into the next wall-clock second, so that "before" and "after" a change differ in the
/// second as well as in the millisecond (a token without `iat_ms`, as a gateway would sign it,
/// is judged by its whole-second `iat`: users.rs, `check_token_still_valid`).
pub async fn next_second() {
    let ms = u64::from(chrono::Utc::now().timestamp_subsec_millis());
    tokio::time::sleep(Duration::from_millis(1000 - ms.min(999) + 20)).await;
}
