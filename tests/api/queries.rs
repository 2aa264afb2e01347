//! Read routes: state as of an offset or a time, per-alarm history, the NDJSON event export and
//! its filters.

use crate::common::*;
use crate::support::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::{sleep, timeout};

/// Canonical JSON as PRODUCT.md describes it (sorted keys, no whitespace), written here
/// independently of the server's code.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push(':');
                canonical(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        s => out.push_str(&serde_json::to_string(s).unwrap()),
    }
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn offsets(lines: &[Value]) -> Vec<u64> {
    lines
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_history_and_event_export() {
    let app = spawn_app().await;
    let tok = app.admin_token.clone();
    let op = app.user_token("op", "operator").await;
    let ledger = app.get(&tok, "/api/v1/ledger").await.1;
    let ledger_id = ledger["ledger_id"].as_str().unwrap().to_string();
    assert_eq!(ledger["head"], 0);

    // A history with distinct millisecond times; after each step, the current state is recorded
    // (offset → GET /alarms, and the deleted ones) to compare with as_of later.
    let mut states: BTreeMap<u64, (Value, Value)> = BTreeMap::new();
    let (_, empty) = app.get(&tok, "/api/v1/alarms").await;
    assert_eq!(empty, json!({"offset": 0, "alarms": []}));
    states.insert(0, (json!([]), json!([])));
    let a = app.create_alarm("A").await;
    let mut b = String::new();
    let steps: Vec<(&str, String, &str, Value)> = vec![
        (
            "POST",
            "A/trigger".into(),
            "op",
            json!({"value": "10", "message": "up"}),
        ),
        (
            "POST",
            String::new(),
            "op",
            json!({"name": "B", "severity": "critical"}),
        ),
        ("POST", "A/ack".into(), "admin", json!({"comment": "seen"})),
        ("PATCH", "B".into(), "op", json!({"instrument": "MSFT"})),
        ("POST", "A/rearm".into(), "op", json!({})),
        ("DELETE", "B".into(), "admin", json!({})),
        ("POST", "A/trigger".into(), "admin", json!({"value": 12})),
    ];
    let record = |_: ()| async {
        let (_, cur) = app.get(&tok, "/api/v1/alarms").await;
        let (_, del) = app.get(&tok, "/api/v1/alarms?state=deleted").await;
        assert_eq!(cur["offset"], del["offset"]);
        (
            cur["offset"].as_u64().unwrap(),
            (cur["alarms"].clone(), del["alarms"].clone()),
        )
    };
    let (o, s) = record(()).await;
    states.insert(o, s);
    for (method, target, who, body) in steps {
        sleep(Duration::from_millis(15)).await;
        let token = if who == "op" { &op } else { &tok };
        let path = if target.is_empty() {
            "/api/v1/alarms".to_string()
        } else {
            let target = target.replacen('A', &a, 1).replacen('B', &b, 1);
            format!("/api/v1/alarms/{target}")
        };
        let url = app.url(&path);
        let rb = match method {
            "POST" => app.client.post(url),
            "PATCH" => app.client.patch(url),
            _ => app.client.delete(url),
        };
        let r = rb.bearer_auth(token).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{method} {path}");
        let v: Value = r.json().await.unwrap();
        if target.is_empty() {
            b = v["alarm_id"].as_str().unwrap().to_string();
        }
        let (o, s) = record(()).await;
        assert_eq!(Some(o), v["offset"].as_u64());
        states.insert(o, s);
    }
    let head = 8;
    assert_eq!(states.len(), head as usize + 1);

    // as_of = offset reconstructs each past state (the listing and the deleted ones).
    for (o, (cur, del)) in &states {
        let (s, v) = app.get(&tok, &format!("/api/v1/alarms?as_of={o}")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["offset"].as_u64(), Some(*o));
        assert_eq!(&v["alarms"], cur, "as_of={o}");
        let (_, v) = app
            .get(&tok, &format!("/api/v1/alarms?as_of={o}&state=deleted"))
            .await;
        assert_eq!(&v["alarms"], del, "as_of={o}&state=deleted");
    }
    // Beyond the head: the head.
    let (_, v) = app.get(&tok, "/api/v1/alarms?as_of=1000").await;
    assert_eq!(
        (v["offset"].as_u64(), &v["alarms"]),
        (Some(head), &states[&head].0)
    );

    // The export: NDJSON, every line with ledger_id and hash; the chain recomputes.
    let r = app
        .client
        .get(app.url("/api/v1/events"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    assert!(text.ends_with('\n'));
    let all: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(offsets(&all), (1..=head).collect::<Vec<_>>());
    let mut prev = unhex(&sha256_hex(&[ledger_id.as_bytes()]));
    for e in &all {
        assert_eq!(e["ledger_id"], json!(ledger_id), "{e}");
        let hash = e["hash"].as_str().unwrap();
        let mut body = e.clone();
        body.as_object_mut().unwrap().remove("hash");
        let mut c = String::new();
        canonical(&body, &mut c);
        assert_eq!(
            sha256_hex(&[&prev, c.as_bytes()]),
            hash,
            "chain at {}",
            e["offset"]
        );
        prev = unhex(hash);
    }
    assert_eq!(
        app.get(&tok, "/api/v1/ledger").await.1["head_hash"],
        all.last().unwrap()["hash"]
    );

    // as_of = an RFC 3339 time: the state after every event with at ≤ it.
    for e in &all {
        let o = e["offset"].as_u64().unwrap();
        let at = e["at"].as_str().unwrap();
        let (s, v) = app.get(&tok, &format!("/api/v1/alarms?as_of={at}")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["offset"].as_u64(), Some(o), "as_of={at}");
        assert_eq!(v["alarms"], states[&o].0, "as_of={at}");
    }
    // Any offset works when percent-encoded (`+` in a query string reads as a space).
    let at4 = chrono::DateTime::parse_from_rfc3339(all[3]["at"].as_str().unwrap()).unwrap();
    let east = at4
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
    assert!(east.ends_with("+02:00"), "{east}");
    let (s, v) = app
        .get(
            &tok,
            &format!("/api/v1/alarms?as_of={}", east.replace('+', "%2B")),
        )
        .await;
    assert_eq!(
        (s, v["offset"].as_u64()),
        (200, Some(4)),
        "as_of={east}: {v}"
    );
    let (_, v) = app
        .get(&tok, "/api/v1/alarms?as_of=2000-01-01T00:00:00.000Z")
        .await;
    assert_eq!(v, json!({"offset": 0, "alarms": []}));
    let (_, v) = app
        .get(&tok, "/api/v1/alarms?as_of=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(v["offset"].as_u64(), Some(head));

    // History: oldest first, only that alarm's events, as exported.
    let (s, h) = app.get(&op, &format!("/api/v1/alarms/{a}/history")).await;
    assert_eq!(s, 200);
    let history = h["events"].as_array().unwrap();
    let kinds: Vec<&str> = history
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "alarm_created",
            "alarm_triggered",
            "alarm_acknowledged",
            "alarm_rearmed",
            "alarm_triggered"
        ]
    );
    assert_eq!(offsets(history), vec![1, 2, 4, 6, 8]);
    for e in history {
        let o = e["offset"].as_u64().unwrap() as usize;
        assert_eq!(e, &all[o - 1], "history = export lines");
    }
    let (_, h) = app.get(&op, &format!("/api/v1/alarms/{b}/history")).await;
    assert_eq!(
        offsets(h["events"].as_array().unwrap()),
        vec![3, 5, 7],
        "a deleted alarm's history stays"
    );

    // Export filters.
    let q = |query: String| {
        let app = &app;
        async move {
            let (s, lines) = events(app, &query).await;
            assert_eq!(s, 200, "{query}: {lines:?}");
            offsets(&lines)
        }
    };
    assert_eq!(q("?from=3".into()).await, vec![3, 4, 5, 6, 7, 8]);
    assert_eq!(q("?limit=2".into()).await, vec![1, 2]);
    assert_eq!(q("?from=3&limit=2".into()).await, vec![3, 4]);
    assert_eq!(q("?from=0".into()).await, (1..=head).collect::<Vec<_>>());
    assert_eq!(q("?from=2&to=4".into()).await, vec![2, 3, 4]);
    assert_eq!(q("?to=3".into()).await, vec![1, 2, 3]);
    assert_eq!(q("?limit=0".into()).await, Vec::<u64>::new());
    assert_eq!(q(format!("?alarm_id={a}")).await, vec![1, 2, 4, 6, 8]);
    assert_eq!(q(format!("?alarm_id={b}&limit=2")).await, vec![3, 5]);
    assert_eq!(q(format!("?alarm_id={a}&from=3")).await, vec![4, 6, 8]);
    assert_eq!(q("?actor=op".into()).await, vec![2, 3, 5, 6]);
    assert_eq!(q("?actor=admin".into()).await, vec![1, 4, 7, 8]);
    assert_eq!(q("?actor=nobody".into()).await, Vec::<u64>::new());
    assert_eq!(q(format!("?actor=op&alarm_id={a}")).await, vec![2, 6]);
    let at = |o: usize| all[o - 1]["at"].as_str().unwrap().to_string();
    assert_eq!(
        q(format!("?since={}", at(3))).await,
        vec![3, 4, 5, 6, 7, 8],
        "since is inclusive"
    );
    assert_eq!(
        q(format!("?until={}", at(3))).await,
        vec![1, 2, 3],
        "until is inclusive"
    );
    assert_eq!(
        q(format!("?since={}&until={}", at(2), at(5))).await,
        vec![2, 3, 4, 5]
    );
    // Events are stamped in milliseconds: a bound with finer digits (.1235) leaves out an event
    // at .123 as a lower bound (since) and keeps it as an upper bound (until).
    let finer = |o: usize| at(o).replace('Z', "5Z");
    let last = head as usize;
    assert!(
        !q(format!("?since={}", finer(last))).await.contains(&head),
        "since {} includes the event at {}",
        finer(last),
        at(last)
    );
    assert!(
        q(format!("?until={}", finer(last))).await.contains(&head),
        "until {} leaves out the event at {}",
        finer(last),
        at(last)
    );
    assert_eq!(
        q(format!("?since={}&until={}&actor=op&limit=2", at(2), at(6))).await,
        vec![2, 3]
    );
    // from = head + 1 is the empty tail; beyond that is out of range (416).
    assert_eq!(q(format!("?from={}", head + 1)).await, Vec::<u64>::new());
    let (s, v) = app
        .get(&tok, &format!("/api/v1/events?from={}", head + 2))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (416, Some("offset_out_of_range")),
        "{v}"
    );
    // A viewer may export too.
    let viewer = app.user_token("auditor", "viewer").await;
    let (s, text) = app.get_text(&viewer, "/api/v1/events?limit=1").await;
    assert_eq!((s, text.lines().count()), (200, 1));
}

/// The export streams a log larger than one chunk completely and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_export_streams_a_large_log_in_order() {
    let app = spawn_app_with(&["--ws-command-rate", "100000"]).await;
    let n = 400;
    let written = blast(&app, &app.admin_token, "bulk", n, 64).await;
    assert_eq!(written.len(), n);
    let (s, lines) = events(&app, "").await;
    assert_eq!(s, 200);
    assert_eq!(
        offsets(&lines),
        (1..=n as u64).collect::<Vec<_>>(),
        "~2.6 MB over many chunks"
    );
    let (_, lines) = events(&app, "?from=350&limit=20").await;
    assert_eq!(offsets(&lines), (350..370).collect::<Vec<_>>());
}

/// A misspelt, repeated or malformed parameter is refused with `bad_request`: answering the
/// current state to `?asof=5`, or picking one of two `as_of`, would look like the answer asked
/// for. A `+` in a time offset may be sent unencoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_parameters_are_refused_when_misspelt_repeated_or_malformed() {
    let app = spawn_app().await;
    let tok = app.admin_token.clone();
    app.create_alarm("q1").await;
    app.create_alarm("q2").await;
    for path in [
        "/api/v1/alarms?asof=1",
        "/api/v1/alarms?as_of=1&as_of=2",
        "/api/v1/alarms?as_of=+1",
        "/api/v1/alarms?state=armed&state=deleted",
        "/api/v1/events?from=+1",
        "/api/v1/events?limit=1&limit=2",
        "/api/v1/events?actor=%+0",
        "/api/v1/events?actor=%FF",
        "/api/v1/events?actor=%4",
    ] {
        let (s, v) = app.get(&tok, path).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{path}: {v}"
        );
    }
    let (s, v) = app.get(&tok, "/api/v1/alarms?as_of=1").await;
    assert_eq!((s, v["offset"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(v["alarms"].as_array().map(Vec::len), Some(1), "{v}");
    // An RFC 3339 time with an unencoded `+02:00`: two hours ahead of UTC, so the local time
    // below is the UTC time of now, which is after both events.
    let local = (chrono::Utc::now() + chrono::Duration::hours(2))
        .format("%Y-%m-%dT%H:%M:%S%.3f+02:00")
        .to_string();
    let (s, v) = app
        .get(&tok, &format!("/api/v1/alarms?as_of={local}"))
        .await;
    assert_eq!((s, v["offset"].as_u64()), (200, Some(2)), "{local}: {v}");
    assert_serves(&app).await;
}

/// Streamed answers are bounded: 16 at once (each holds a blocking thread), and a client that
/// stops reading is cut off after the stall timeout, which frees its place. Clients that read
/// are answered in chunks (no `content-length`: nothing is built whole in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answers_are_bounded_and_a_stalled_reader_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(&["--ws-command-rate", "100000", "--ws-stall-timeout", "15s"]).await;
    let tok = app.admin_token.clone();
    // ~13 MB of events: more than one stalled connection's buffers (socket buffers of at
    // most 4 MiB here, the stream's 8 chunks of 60 KiB, hyper's) can absorb, so its reader
    // blocks.
    let n = 2000;
    assert_eq!(blast(&app, &tok, "stall", n, 64).await.len(), n);
    let alarm = app.create_alarm("streamed history").await;
    let history = format!("/api/v1/alarms/{alarm}/history");
    for (path, content_type) in [
        ("/api/v1/events", "application/x-ndjson"),
        ("/api/v1/security-log", "application/x-ndjson"),
        (history.as_str(), "application/json"),
    ] {
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth(&tok)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert!(
            r.headers().get("content-length").is_none(),
            "{path} is streamed, not built whole"
        );
        assert_eq!(
            r.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some(content_type)
        );
        let text = r.text().await.expect("body");
        assert!(text.lines().count() >= 2, "{path}");
        if content_type == "application/json" {
            let v: Value = serde_json::from_str(&text).expect("one JSON document");
            assert_eq!(v["alarm_id"], alarm.as_str());
            assert_eq!(v["events"].as_array().map(Vec::len), Some(1), "{v}");
        }
    }
    // 16 exports that never read, on sockets with a small receive buffer.
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut s = sock.connect(app.addr).await.expect("connect");
        let req = format!(
            "GET /api/v1/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {tok}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        // Read the status line (so this one holds its place before the next is asked), then
        // stop reading.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = timeout(STEP, s.read(&mut byte))
                .await
                .expect("answer head in time")
                .expect("read");
            assert_eq!(n, 1, "connection closed before the answer head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        stalled.push(s);
    }
    // The 17th is refused while they hold their places...
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let r = app
            .client
            .get(app.url("/api/v1/events?limit=1"))
            .bearer_auth(&tok)
            .send()
            .await
            .expect("get");
        if r.status().as_u16() == 503 {
            break Some(r);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        sleep(Duration::from_millis(20)).await;
    };
    let refused = refused.expect("a 17th stream is refused while 16 are held");
    assert!(refused.headers().get("retry-after").is_some());
    let v: Value = refused.json().await.expect("json");
    assert_eq!(v["error"]["code"], "overloaded", "{v}");
    // The 16 held streams are counted: as active, or (read after) as cut off already.
    let active = metric(&app, "alarm_ledger_http_streams_active").await;
    let cut = metric(&app, "alarm_ledger_http_streams_cut_off_total").await;
    assert!(active + cut >= 16.0, "active {active}, cut off {cut}");
    // ...and served once the stall timeout has cut them off: wait until all 16 were cut (so
    // that the one read below is one of them, not one still waiting for room).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(&app, "alarm_ledger_http_streams_cut_off_total").await < 16.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled streams were never cut off"
        );
        sleep(Duration::from_millis(200)).await;
    }
    let (s, text) = app.get_text(&tok, "/api/v1/events?limit=1").await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(text.lines().count(), 1);
    // Every stream's end is counted (its thread ends just after its last chunk).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric(&app, "alarm_ledger_http_streams_active").await != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "streams still counted as active"
        );
        sleep(Duration::from_millis(50)).await;
    }
    // A stream that was cut off ends as an error (no terminating zero-length chunk), never as
    // a clean end that would pass for a complete, shorter answer.
    let mut cut = stalled.swap_remove(0);
    // What is still buffered for it (socket buffers, hyper's, the queued chunks) is drained
    // through a normal receive window: through the 4 KiB one, below one segment, the sender
    // waits on TCP's persist timer and a few MiB can take minutes.
    socket2::SockRef::from(&cut)
        .set_recv_buffer_size(1 << 20)
        .expect("rcvbuf");
    let mut body = Vec::new();
    let read = timeout(Duration::from_secs(60), cut.read_to_end(&mut body)).await;
    assert!(read.is_ok(), "the cut-off connection was closed");
    assert!(!body.is_empty(), "it had sent a part");
    assert!(
        !body.ends_with(b"\r\n0\r\n\r\n"),
        "a cut-off stream must not end like a complete chunked body"
    );
    drop(stalled);
    assert_serves(&app).await;
}

/// Past states are rebuilt by replaying the log, at most `MAX_AS_OF_BUILDS` (2) at once: a burst
/// of `as_of` queries gets `503 overloaded` with Retry-After beyond them (never a wrong or
/// partial answer), and the permits come back once the answers are out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_state_reconstructions_are_bounded() {
    let app = spawn_app_with(&["--ws-command-rate", "100000"]).await;
    let tok = app.admin_token.clone();
    const N: usize = 3_000;
    let offsets = blast(&app, &tok, "asof", N, 64).await;
    let head = *offsets.iter().max().expect("appended");
    let path = format!("/api/v1/alarms?as_of={head}");
    let ask = || async {
        let r = app
            .client
            .get(app.url(&path))
            .bearer_auth(&tok)
            .send()
            .await
            .expect("get");
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").is_some();
        let v: Value = r.json().await.expect("json");
        (status, retry_after, v)
    };
    let mut refused = 0;
    let mut served = 0;
    for _round in 0..5 {
        let answers = futures_util::future::join_all((0..12).map(|_| ask())).await;
        for (status, retry_after, v) in answers {
            match status {
                200 => {
                    served += 1;
                    assert_eq!(v["offset"], json!(head), "{}", v["offset"]);
                    assert_eq!(v["alarms"].as_array().map(Vec::len), Some(N));
                }
                503 => {
                    refused += 1;
                    assert!(retry_after, "a refusal says when to retry");
                    assert_eq!(v["error"]["code"], "overloaded", "{v}");
                }
                // The user's own budget (10 at once): not the server-wide bound tested here.
                429 => {
                    assert!(retry_after, "a refusal says when to retry");
                    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
                }
                other => panic!("as_of answered {other}: {v}"),
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(served >= 1, "no reconstruction was served");
    assert!(
        refused >= 1,
        "12 concurrent reconstructions, none refused: no bound"
    );
    // The permits are back: one at a time is always served (asked by another user: this one
    // has spent its own budget).
    let other = app.user_token("auditor", "viewer").await;
    let (status, v) = app.get(&other, &path).await;
    assert_eq!(status, 200, "{v}");
}

/// Each read of the audit trail (a past state, a history, an export, the security log) appends
/// a synced security-log entry, so a user's audited reads are bounded together (100 at once,
/// then one per 200 ms): `429 rate_limited` with `Retry-After` beyond; another user keeps their
/// own budget.
#[tokio::test]
async fn a_users_audited_reads_are_rate_limited() {
    let app = spawn_app().await;
    let id = app.create_alarm("one").await;
    let viewer = app.user_token("looper", "viewer").await;
    let started = std::time::Instant::now();
    let paths = [
        "/api/v1/alarms?as_of=1".to_string(),
        format!("/api/v1/alarms/{id}/history"),
        "/api/v1/events?from=1".to_string(),
    ];
    let mut ok = 0;
    let refusal = loop {
        let r = app
            .client
            .get(app.url(&paths[ok % paths.len()]))
            .bearer_auth(&viewer)
            .send()
            .await
            .expect("get");
        if r.status() == 200 {
            ok += 1;
            assert!(ok <= 1_000, "never limited");
            continue;
        }
        break r;
    };
    // The burst, and at most one more per 200 ms the loop took (a slow machine refills some).
    let refilled = (started.elapsed().as_secs_f64() / 0.2).ceil() as usize;
    assert!(
        (100..=100 + refilled).contains(&ok),
        "{ok} passed in {:?}",
        started.elapsed()
    );
    assert_eq!(refusal.status(), 429);
    assert!(refusal.headers().get("retry-after").is_some());
    let v: Value = refusal.json().await.expect("json");
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    let (s, v) = app.get(&app.admin_token, "/api/v1/alarms?as_of=1").await;
    assert_eq!(s, 200, "another user is not limited: {v}");
}

/// Current-state answers are built one at a time and shared by the requests that wait for them,
/// yet never older than what a client could see: while appends go on, every answer's offset is
/// at or beyond the last `ok` acknowledged before the request was sent, and its alarms are
/// exactly the state at that offset (each event here creates one alarm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_state_answers_are_never_older_than_acknowledged_writes() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let app = Arc::new(spawn_app_with(&["--ws-command-rate", "100000"]).await);
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (app, acked, stop) = (app.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let tok = app.admin_token.clone();
            let mut n = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let (st, v) = app
                    .post(&tok, "/api/v1/alarms", json!({"name": format!("s{n}")}))
                    .await;
                assert_eq!(st, 200, "{v}");
                acked.fetch_max(v["offset"].as_u64().expect("offset"), Ordering::SeqCst);
                n += 1;
            }
        })
    };
    let started = std::time::Instant::now();
    while acked.load(Ordering::SeqCst) < 50 {
        assert!(!writer.is_finished(), "the writer stopped early");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "50 writes not acknowledged in 30 s"
        );
        sleep(Duration::from_millis(10)).await;
    }
    let readers = (0..8).map(|_| {
        let (app, acked) = (app.clone(), acked.clone());
        tokio::spawn(async move {
            let tok = app.admin_token.clone();
            let mut offsets = Vec::new();
            for _ in 0..15 {
                let seen = acked.load(Ordering::SeqCst);
                let (st, v) = app.get(&tok, "/api/v1/alarms").await;
                assert_eq!(st, 200, "{v}");
                let offset = v["offset"].as_u64().expect("offset");
                assert!(
                    offset >= seen,
                    "answer at {offset}, older than the acked {seen}"
                );
                let alarms = v["alarms"].as_array().expect("alarms");
                assert_eq!(alarms.len() as u64, offset, "the state at its offset");
                assert!(alarms
                    .iter()
                    .all(|a| a["last_offset"].as_u64().is_some_and(|o| o <= offset)));
                offsets.push(offset);
            }
            offsets
        })
    });
    let answered: Vec<Vec<u64>> = futures_util::future::try_join_all(readers)
        .await
        .expect("readers");
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    // With the writer stopped, the answer is the final head (a cached one is at the head too).
    let head = acked.load(Ordering::SeqCst);
    for filter in ["", "?state=armed"] {
        let (st, v) = app
            .get(&app.admin_token, &format!("/api/v1/alarms{filter}"))
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["offset"], json!(head));
        assert_eq!(v["alarms"].as_array().map(Vec::len), Some(head as usize));
    }
    assert_eq!(answered.iter().map(Vec::len).sum::<usize>(), 8 * 15);
}
