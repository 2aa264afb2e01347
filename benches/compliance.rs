//! Compliance benchmarks (issue 5): export and verify of a 1,000,000-event ledger with the real
//! binary, and an online backup while 1,000 events/s are appended (append latency during it).
//!
//! `cargo bench --bench compliance` (add `-- --events N` for another size; `-- --keep DIR` builds
//! the ledger in DIR and leaves it; `-- --keep DIR --only backup` runs the online backup alone,
//! on DIR's ledger if there is one). Prints one JSON line per measurement. Loopback only; every loop bounded in count and time.

use alarm_ledger::domain::{AlarmSpec, Event, EventData, Hash, Severity};
use alarm_ledger::ledger::datadir::DataDir;
use alarm_ledger::store::sled_log::{SledLog, SledOptions};
use alarm_ledger::store::{chain, EventLog};
use alarm_ledger::time::Timestamp;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_alarm-ledger");
const PASSWORD: &str = "bench-admin-password";
const ALARMS: u64 = 10_000;

/// Writes `n` chained events (10,000 alarms created, then trigger/ack/rearm cycles) directly
/// through the log interface, in durable batches of 256 (sled 0.34 keeps several KB of memory
/// per event of larger batches).
fn build_ledger(root: &Path, n: u64) -> (u64, String) {
    let dir = DataDir::lock(root).expect("lock");
    let log = SledLog::open(&dir.ledger_dir(), &SledOptions::default()).expect("open");
    let ledger_id = log.info().ledger_id;
    let mut prev = chain::genesis(ledger_id);
    let ids: Vec<Uuid> = (0..ALARMS)
        .map(|i| Uuid::from_u128(0xA1A2_0000 + i as u128))
        .collect();
    let t0 = 1_763_700_000_000i64;
    let mut batch = Vec::with_capacity(256);
    for offset in 1..=n {
        let i = offset - 1;
        let alarm = ids[(i % ALARMS) as usize];
        let data = if i < ALARMS {
            EventData::Created(AlarmSpec {
                name: format!("alarm {i}"),
                instrument: "AAPL".into(),
                condition: "PX_LAST > 200".into(),
                severity: Severity::High,
                tags: vec!["bench".into()],
                owner: "admin".into(),
            })
        } else {
            match (i / ALARMS - 1) % 3 {
                0 => EventData::Triggered {
                    value: Some(format!("{}", 200 + i % 50)),
                    message: Some("crossed".into()),
                },
                1 => EventData::Acknowledged {
                    comment: Some("seen".into()),
                },
                _ => EventData::Rearmed,
            }
        };
        let mut e = Event {
            offset,
            id: Uuid::now_v7(),
            at: Timestamp(t0 + offset as i64),
            actor: "admin".into(),
            alarm_id: alarm,
            command_id: Some(Uuid::new_v4()),
            data,
            hash: Hash::default(),
        };
        e.hash = chain::event_hash(&prev, &e, ledger_id);
        prev = e.hash;
        batch.push(e);
        if batch.len() == 256 || offset == n {
            log.append_batch(&batch).expect("append");
            batch.clear();
        }
    }
    (n, prev.to_hex())
}

fn timed(args: &[&str]) -> (Duration, std::process::Output) {
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run binary");
    (t.elapsed(), out)
}

fn main() {
    let mut n: u64 = 1_000_000;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--events") {
        n = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(n);
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes targets
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // `--keep DIR`: build the ledger there and leave it (for profiling the tools by hand).
    let root = match args.iter().position(|a| a == "--keep") {
        Some(i) => std::path::PathBuf::from(args.get(i + 1).expect("--keep DIR")),
        None => tmp.path().join("data"),
    };
    let root_s = root.display().to_string();
    // `--only backup`: skip export and verify (with `--keep DIR` on a ledger built before, the
    // online backup alone).
    if args.iter().any(|a| a == "--only") && args.iter().any(|a| a == "backup") {
        if !root.join("ledger").exists() {
            build_ledger(&root, n);
        }
        online_backup(&root_s, n);
        return;
    }
    let t = Instant::now();
    let (head, head_hash) = build_ledger(&root, n);
    println!(
        "{}",
        json!({"bench": "build_ledger", "events": head, "secs": t.elapsed().as_secs_f64()})
    );

    // The build leaves ~0.5 GB of dirty pages: write them out first, as on a stopped server's
    // directory, so that verify is not measured against the kernel's writeback.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // Twice: the first run pays for faulting in its memory after the build's (the kernel
    // reclaiming page cache: about 3 s of system time here), the second shows the steady cost.
    for name in ["verify", "verify_again"] {
        let (d, out) = timed(&["verify", "--data", &root_s]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "verify failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&head_hash), "verify head hash: {stdout}");
        println!(
            "{}",
            json!({"bench": name, "events": n, "secs": d.as_secs_f64(), "events_per_s": n as f64 / d.as_secs_f64()})
        );
    }

    let export = tmp.path().join("export.ndjson");
    let export_s = export.display().to_string();
    let (d, out) = timed(&["export", "--data", &root_s, "--out", &export_s]);
    assert!(
        out.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::metadata(&export).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}",
        json!({"bench": "export_ndjson", "events": n, "secs": d.as_secs_f64(), "events_per_s": n as f64 / d.as_secs_f64(), "bytes": bytes})
    );

    let t = Instant::now();
    let py = Command::new("python3")
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/verify_chain.py"),
            &export_s,
        ])
        .output()
        .expect("python3");
    let py_out = String::from_utf8_lossy(&py.stdout);
    assert!(py_out.contains(&head_hash), "python verifier: {py_out}");
    println!(
        "{}",
        json!({"bench": "verify_chain_py", "events": n, "secs": t.elapsed().as_secs_f64()})
    );
    let _ = std::fs::remove_file(&export);

    online_backup(&root_s, n);
}

/// Starts the server on the ledger, appends at 1,000 events/s over HTTP from 3 s before an
/// online backup until 2 s after it, and reports append latency percentiles during the backup
/// and overall.
fn online_backup(root: &str, n: u64) {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--data",
            root,
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("ALARM_LEDGER_ADMIN_PASSWORD", PASSWORD)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn server");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["message"] == "alarm-ledger listening" {
                    let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("server listening");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let client = reqwest::Client::new();
        let base = format!("http://{addr}");
        let login: Value = client
            .post(format!("{base}/api/v1/login"))
            .json(&json!({"username": "admin", "password": PASSWORD}))
            .send()
            .await
            .expect("login")
            .json()
            .await
            .expect("login json");
        let token = login["token"].as_str().expect("token").to_string();
        let alarm: Value = client
            .post(format!("{base}/api/v1/alarms"))
            .bearer_auth(&token)
            .json(&json!({"name": "backup load"}))
            .send()
            .await
            .expect("create")
            .json()
            .await
            .expect("json");
        let id = alarm["alarm_id"].as_str().expect("id").to_string();
        let start = Instant::now();
        let backup_window = std::sync::Arc::new(std::sync::Mutex::new((Duration::MAX, Duration::MAX)));
        let bw = backup_window.clone();
        let (c2, b2, t2) = (client.clone(), base.clone(), token.clone());
        let backup = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let from = start.elapsed();
            let r: Value = c2
                .post(format!("{b2}/api/v1/admin/backup"))
                .bearer_auth(&t2)
                .send()
                .await
                .expect("backup")
                .json()
                .await
                .expect("backup json");
            let to = start.elapsed();
            *bw.lock().unwrap_or_else(|p| p.into_inner()) = (from, to);
            (r, to - from)
        });
        // 1,000 events/s: update commands paced every millisecond, 8 in flight at most, from
        // 3 s before the backup until 2 s after it (bounded: 180 s, 200,000 commands).
        let mut lat: Vec<(Duration, Duration)> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut inflight = tokio::task::JoinSet::new();
        let mut i = 0u64;
        let load_until = |start: Instant| {
            let (_, to) = *backup_window.lock().unwrap_or_else(|p| p.into_inner());
            let now = start.elapsed();
            now < Duration::from_secs(180) && (to == Duration::MAX || now < to + Duration::from_secs(2))
        };
        while load_until(start) && i < 200_000 {
            tick.tick().await;
            while inflight.len() >= 8 {
                if let Some(Ok(x)) = inflight.join_next().await {
                    lat.push(x);
                }
            }
            let (c, u, tok) = (client.clone(), format!("{base}/api/v1/alarms/{id}"), token.clone());
            let body = json!({"condition": format!("PX_LAST > {i}")});
            inflight.spawn(async move {
                let sent = start.elapsed();
                let t = Instant::now();
                let r = c.patch(u).bearer_auth(tok).json(&body).send().await;
                assert!(matches!(&r, Ok(r) if r.status() == 200), "append failed: {r:?}");
                (sent, t.elapsed())
            });
            i += 1;
        }
        while let Some(Ok(x)) = inflight.join_next().await {
            lat.push(x);
        }
        let load_secs = start.elapsed().as_secs_f64();
        let (report, took) = backup.await.expect("backup task");
        let (from, to) = *backup_window.lock().unwrap_or_else(|p| p.into_inner());
        let pct = |v: &mut Vec<f64>, p: f64| {
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
        };
        let mut all: Vec<f64> = lat.iter().map(|(_, d)| d.as_secs_f64() * 1e3).collect();
        let mut during: Vec<f64> = lat
            .iter()
            .filter(|(s, _)| *s >= from && *s <= to)
            .map(|(_, d)| d.as_secs_f64() * 1e3)
            .collect();
        let mut before: Vec<f64> = lat
            .iter()
            .filter(|(s, _)| *s < from)
            .map(|(_, d)| d.as_secs_f64() * 1e3)
            .collect();
        let rate = all.len() as f64 / load_secs;
        println!(
            "{}",
            json!({
                "bench": "online_backup", "ledger_events": n, "backup_head": report["head"],
                "backup_secs": took.as_secs_f64(), "append_rate_per_s": rate,
                "appends_during_backup": during.len(),
                "p50_ms_during": pct(&mut during, 0.50), "p99_ms_during": pct(&mut during, 0.99),
                "max_ms_during": during.last().copied().unwrap_or(f64::NAN),
                "p99_ms_overall": pct(&mut all, 0.99),
                "p50_ms_before": pct(&mut before, 0.50), "p99_ms_before": pct(&mut before, 0.99),
            })
        );
        let path = report["path"].as_str().expect("backup path").to_string();
        let out = Command::new(BIN).args(["verify", "--data", &path]).output().expect("verify");
        assert!(out.status.success(), "backup does not verify: {}", String::from_utf8_lossy(&out.stderr));
        println!("{}", json!({"bench": "online_backup_verify", "result": String::from_utf8_lossy(&out.stdout).trim()}));
    });
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}
