//! `--max-connections`: over the limit a WebSocket is accepted and closed with 1013, HTTP is
//! answered `503 overloaded` (the probes still 200), further over it a socket is closed unread,
//! and a place freed by a served connection is served again.

use crate::common::*;
use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};

const MAX: usize = 4;

/// Reads until the peer closes; `Err` if it does not within `within`.
async fn read_to_close(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
) -> Result<Vec<u8>, ()> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, stream.read(&mut buf)).await {
            Err(_) => return Err(()),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A GET over a connection of its own (reqwest pools its connections, which would hold places).
async fn get_once(app: &TestApp, path: &str, token: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let out = read_to_close(&mut s, STEP)
        .await
        .expect("answered and closed");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_with_an_answer_and_the_probes_still_served() {
    let app = spawn_app_with(&["--max-connections", &MAX.to_string()]).await;
    let token = app.admin_token.clone();
    // Fill the places: the test client's pooled login connection may hold one of them, so open
    // sockets until one is refused (at most MAX of them can be served).
    let mut served = Vec::new();
    let mut refused = None;
    for _ in 0..=MAX {
        let mut ws = app.ws_raw(&token).await;
        match next_frame(&mut ws, STEP).await {
            Got::Json(v) if v["type"] == "hello" => served.push(ws),
            Got::Close(code) => {
                refused = Some(code);
                break;
            }
            other => panic!("neither hello nor close: {other:?}"),
        }
    }
    assert_eq!(
        refused,
        Some(Some(1013)),
        "the socket over the limit closes with 1013"
    );
    assert!(
        !served.is_empty() && served.len() <= MAX,
        "{} served",
        served.len()
    );

    // HTTP over the limit: 503 overloaded with Retry-After, and the connection is closed.
    let answer = get_once(&app, "/api/v1/ledger", &token).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("\"overloaded\""), "{answer}");
    // The probes are served even then.
    let health = get_once(&app, "/healthz", "-").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = get_once(&app, "/metrics", "-").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let refused_answered = metrics
        .lines()
        .find(|l| l.starts_with("alarm_ledger_connections_refused_total{mode=\"answered\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(refused_answered >= Some(2), "{metrics}");

    // The served sockets work as before.
    let ws = served.last_mut().expect("one served");
    send_json(ws, serde_json::json!({"type": "ping", "req": "p"})).await;
    match next_frame(ws, STEP).await {
        Got::Json(v) => assert_eq!(v["type"], "pong", "{v}"),
        other => panic!("no pong: {other:?}"),
    }

    // A freed place is served again (the close takes a moment to reach the server).
    drop(served.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut ws = app.ws_raw(&token).await;
        match next_frame(&mut ws, STEP).await {
            Got::Json(v) if v["type"] == "hello" => break,
            Got::Close(Some(1013)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("a freed place is not served again: {other:?}"),
        }
    }
}

#[tokio::test]
async fn beyond_the_refusal_margin_sockets_are_closed_unread_and_silent_ones_do_not_keep_places() {
    let app = spawn_app_with(&["--max-connections", &MAX.to_string()]).await;
    // Silent sockets: MAX served places (held until the 30 s head timeout, or fewer if the test
    // client's pooled connection holds one), then the refusal margin (16 at this limit), held
    // for the short refusal head timeout (2 s) only.
    let margin = 16;
    let mut silent = Vec::new();
    for _ in 0..MAX + margin {
        silent.push(
            tokio::net::TcpStream::connect(app.addr)
                .await
                .expect("connect"),
        );
    }
    // Accepted in order: give the server a moment to take them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The next one is closed at once, without an answer.
    let mut over = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let _ = over
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let got = read_to_close(&mut over, Duration::from_secs(5))
        .await
        .expect("closed at once");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // The silent sockets in the margin are closed after the short head timeout, which frees the
    // margin: a request then gets its answer (the probe).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = {
            let mut s = tokio::net::TcpStream::connect(app.addr)
                .await
                .expect("connect");
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await;
            read_to_close(&mut s, STEP).await.unwrap_or_default()
        };
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refusal margin was never freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(silent);
}
