//! Compliance benchmarks (issue 5): export and verify of a 1,000,000-event ledger with the real
//! binary, and an online backup while 1,000 events/s are appended (append latency during it,
//! from each append's scheduled time), and the start of the real server process on that ledger
//! (`process_start`: spawn → listening → `/readyz` 200, after a clean stop from a projection
//! snapshot and with a full replay, each the first start after the ledger was written and once
//! more, and from the snapshot after a crash, `after_crash`), with the shutdown checkpoint's cost
//! (`shutdown_checkpoint`).
//!
//! `cargo bench --bench compliance` (add `-- --events N` for another size; `-- --keep DIR` builds
//! the ledger in DIR and leaves it; `-- --keep DIR --only backup` runs the online backup alone,
//! on DIR's ledger if there is one; `-- --only start` builds a ledger and measures the process
//! starts alone; `-- --only checkpoint` builds one and checkpoints it three times). Prints one JSON line per measurement. Loopback only; every loop bounded in count and time.

use alarm_ledger::auth::users::BOOTSTRAP_ADMIN;
use alarm_ledger::auth::{NewSecurityEntry, SecurityAction, SecurityLog, UserStore};
use alarm_ledger::domain::{AlarmSpec, Event, EventData, Hash, Severity};
use alarm_ledger::ledger::datadir::DataDir;
use alarm_ledger::ledger::{Ledger, LedgerOptions, Restore};
use alarm_ledger::metrics::Metrics;
use alarm_ledger::store::sled_log::{SledLog, SledOptions};
use alarm_ledger::store::{chain, EventLog};
use alarm_ledger::time::Timestamp;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_alarm-ledger");
const PASSWORD: &str = "bench-admin-password";
const ALARMS: u64 = 10_000;

/// Writes `n` chained events (10,000 alarms created, then trigger/ack/rearm cycles) directly
/// through the log interface, in durable batches of 256 (sled 0.34 keeps several KB of memory
/// per event of larger batches), then what a server's first start adds (the `admin` account and
/// its security-log entry), so that every later server start is a restart. With `snapshot_to`,
/// also writes the projection snapshot at the head there, as a server's clean stop would (not
/// into the data directory: export and verify measure the ledger without one, as before).
/// Returns the head, its hash, and the seconds the events took.
fn build_ledger(root: &Path, n: u64, snapshot_to: Option<&Path>) -> (u64, String, f64) {
    let t = Instant::now();
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
    let secs = t.elapsed().as_secs_f64();
    let users = UserStore::open(log.db()).expect("users");
    users.bootstrap_admin(Some(PASSWORD)).expect("admin");
    let security = SecurityLog::open(log.db(), ledger_id).expect("security log");
    if security.head().0 == 0 {
        security
            .append(
                NewSecurityEntry::new(SecurityAction::UserCreated)
                    .actor("server")
                    .target(BOOTSTRAP_ADMIN)
                    .detail("role", "admin")
                    .detail("via", "bootstrap"),
            )
            .expect("security entry");
    }
    log.sync().expect("sync");
    drop((users, security));
    if let Some(path) = snapshot_to {
        let opts = LedgerOptions {
            snapshot_path: Some(path.to_path_buf()),
            ..LedgerOptions::default()
        };
        let log: Arc<dyn EventLog> = Arc::new(log);
        let (ledger, restore) = Ledger::open(log, opts, Arc::new(Metrics::new())).expect("open");
        assert!(matches!(restore, Restore::FullReplay { .. }), "{restore:?}");
        ledger.write_snapshot().expect("snapshot");
    }
    (n, prev.to_hex(), secs)
}

/// `cp -a`: a byte-for-byte copy of a stopped data directory (sled's files as the writer left
/// them, so that the first open of the copy recovers exactly as the first open of the original).
fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(
        st.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
}

/// Interval of the `/readyz` polls of a start (the resolution of `ready_secs`).
const READY_POLL: Duration = Duration::from_millis(5);

/// `GET /readyz` over a plain socket: the status code, or 0 when the server does not answer.
fn readyz(addr: &str) -> u16 {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).is_err() {
        return 0;
    }
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// One start of `alarm-ledger serve` on `root`: the time from spawn until it prints its
/// `Log in:` line (listening) and until `/readyz` answers 200 (projection loaded or rebuilt,
/// writer started; after a start from a snapshot the log prefix is still being re-verified in
/// the background, which `/readyz` does not wait for), then a clean stop (which writes the
/// projection snapshot). `snapshot`: start with the snapshot present, else remove it first (full
/// replay). Asserts from the server's log that it restored the way asked. Prints one line.
fn process_start(root: &Path, n: u64, snapshot: bool, run: &str) {
    let snap = root.join("projection.snapshot");
    if snapshot {
        assert!(
            snap.exists(),
            "no projection snapshot in {}",
            root.display()
        );
    } else if snap.exists() {
        std::fs::remove_file(&snap).expect("remove projection.snapshot");
    }
    enum Line {
        Listening(Instant, String),
        Restore(String, Value),
    }
    let t0 = Instant::now();
    let mut server = Server(
        Command::new(BIN)
            .arg("serve")
            .arg("--data")
            .arg(root)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .env_remove("ALARM_LEDGER_ADMIN_PASSWORD")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn server"),
    );
    let stderr = server.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let now = Instant::now();
            if let Some(rest) = line.split("Log in:").nth(1) {
                let addr = rest
                    .split("http://")
                    .nth(1)
                    .and_then(|r| r.split('/').next())
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(Line::Listening(now, addr));
            } else if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let msg = v["message"].as_str().unwrap_or_default().to_string();
                if msg.starts_with("projection ") {
                    let _ = tx.send(Line::Restore(msg, v));
                } else if msg == "alarm-ledger listening" {
                    // `--log-format json` prints no "Log in:" banner: the address is here.
                    let addr = v["addr"].as_str().unwrap_or_default().to_string();
                    let _ = tx.send(Line::Listening(now, addr));
                }
            }
        }
    });
    let mut restore = None;
    let (listening, addr) = loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Line::Listening(t, a)) => break (t - t0, a),
            Ok(Line::Restore(m, v)) => restore = Some((m, v)),
            Err(e) => panic!(
                "server on {} did not report its address: {e}",
                root.display()
            ),
        }
    };
    let ready = loop {
        if readyz(&addr) == 200 {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "/readyz not 200 within 120 s"
        );
        std::thread::sleep(READY_POLL);
    };
    let stop = server.stop();
    let (msg, v) = restore.expect("no projection restore line in the server's log");
    let expected = if snapshot {
        "projection restored from snapshot"
    } else {
        "projection rebuilt from the log"
    };
    assert_eq!(msg, expected, "{v}");
    println!(
        "{}",
        json!({
            "bench": "process_start", "mode": if snapshot { "snapshot" } else { "full_replay" },
            "run": run, "events": n, "listening_secs": listening.as_secs_f64(),
            "ready_secs": ready.as_secs_f64(), "ready_poll_ms": READY_POLL.as_millis() as u64,
            "restore_ms": v["elapsed_ms"], "snapshot_tail": v["tail"],
            "stop_secs": stop.as_secs_f64(),
        })
    );
}

/// The process starts on copies of the data directory (each with the build's projection
/// snapshot but `without`): after a clean stop, from the snapshot, then without it (full
/// replay), each the first start after the ledger was written and once more; and `after_crash`,
/// the directory as the build left it before its shutdown checkpoint (sled recovers what was
/// written since its last open, as after a SIGKILL). The copies are removed afterwards.
fn process_starts(with_snapshot: &Path, without: &Path, after_crash: &Path, n: u64) {
    for (dir, snapshot) in [(with_snapshot, true), (without, false)] {
        process_start(dir, n, snapshot, "first");
        process_start(dir, n, snapshot, "again");
        let _ = std::fs::remove_dir_all(dir);
    }
    process_start(after_crash, n, true, "after_crash");
    let _ = std::fs::remove_dir_all(after_crash);
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
    alarm_ledger::memory::raise_open_files_limit(); // the paced appends may hold many connections during a stall
    let tmp = tempfile::tempdir().expect("tempdir");
    // `--keep DIR`: build the ledger there and leave it (for profiling the tools by hand).
    let root = match args.iter().position(|a| a == "--keep") {
        Some(i) => std::path::PathBuf::from(args.get(i + 1).expect("--keep DIR")),
        None => tmp.path().join("data"),
    };
    let root_s = root.display().to_string();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    // `--only backup`: skip export and verify (with `--keep DIR` on a ledger built before, the
    // online backup alone).
    if only == Some("backup") {
        if !root.join("ledger").exists() {
            build_ledger(&root, n, None);
        }
        online_backup(&root_s, n);
        return;
    }
    // `--only checkpoint`: the shutdown checkpoint after the build, three times in a row (what
    // each open of sled recovers; for profiling the checkpoint by hand, with `--keep DIR`).
    if only == Some("checkpoint") {
        build_ledger(&root, n, None);
        for round in 1..=3 {
            let took = alarm_ledger::store::sled_log::checkpoint(
                &root.join("ledger"),
                Duration::from_secs(30),
            )
            .expect("checkpoint")
            .expect("unlocked");
            println!(
                "{}",
                json!({"bench": "shutdown_checkpoint", "round": round, "secs": took.as_secs_f64()})
            );
        }
        return;
    }
    assert!(
        !root.join("ledger").exists(),
        "{} already holds a ledger: the start-up measurements need a freshly written one",
        root.display()
    );
    let snapshot = tmp.path().join("build.projection.snapshot");
    let (head, head_hash, secs) = build_ledger(&root, n, Some(&snapshot));
    println!(
        "{}",
        json!({"bench": "build_ledger", "events": head, "secs": secs})
    );
    // A copy as the build left it, before the shutdown checkpoint a server's clean stop does:
    // what a crash leaves.
    let start_crash = tmp.path().join("start-crash");
    copy_dir(&root, &start_crash);
    std::fs::copy(&snapshot, start_crash.join("projection.snapshot")).expect("copy snapshot");
    // The clean stop's checkpoint (`alarm-ledger serve` does it after its final snapshot).
    let took =
        alarm_ledger::store::sled_log::checkpoint(&root.join("ledger"), Duration::from_secs(30))
            .expect("checkpoint")
            .expect("the build's sled handles were released");
    println!(
        "{}",
        json!({"bench": "shutdown_checkpoint", "events": head, "secs": took.as_secs_f64()})
    );
    // Two copies of the directory as a clean stop leaves it, for the process starts (each must
    // be the first open of its sled database); the original is left as before, for verify.
    let (start_snap, start_replay) = (
        tmp.path().join("start-snapshot"),
        tmp.path().join("start-replay"),
    );
    copy_dir(&root, &start_snap);
    std::fs::copy(&snapshot, start_snap.join("projection.snapshot")).expect("copy snapshot");
    copy_dir(&root, &start_replay);
    if only == Some("start") {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        process_starts(&start_snap, &start_replay, &start_crash, n);
        return;
    }

    // The build (and the two copies) leave GBs of dirty pages: write them out first, as on a
    // stopped server's directory, so that verify is not measured against the kernel's writeback.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // Twice: the first run pays for faulting in its memory after the build's (the kernel
    // reclaiming page cache: about 3 s of system time here), the second shows the steady cost.
    // `--in-place`: this directory is the bench's own, built for it. The tools' default reads a
    // private copy of `ledger/` (README, "Export for compliance"), measured last.
    for (name, extra) in [
        ("verify", Some("--in-place")),
        ("verify_again", Some("--in-place")),
        ("verify_private_copy", None),
    ] {
        let mut args = vec!["verify", "--data", &root_s];
        args.extend(extra);
        let (d, out) = timed(&args);
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
    // The private copy's run first, so that the in-place run (the one the target is read
    // against, as before) leaves its export file for the Python verifier.
    for (name, extra) in [
        ("export_ndjson_private_copy", None),
        ("export_ndjson", Some("--in-place")),
    ] {
        let mut args = vec!["export", "--data", &root_s, "--out", &export_s];
        args.extend(extra);
        let (d, out) = timed(&args);
        assert!(
            out.status.success(),
            "export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::metadata(&export).map(|m| m.len()).unwrap_or(0);
        println!(
            "{}",
            json!({"bench": name, "events": n, "secs": d.as_secs_f64(), "events_per_s": n as f64 / d.as_secs_f64(), "bytes": bytes})
        );
    }

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

    process_starts(&start_snap, &start_replay, &start_crash, n);
    online_backup(&root_s, n);
}

/// One paced append: times relative to the load's start, and how it ended.
struct Append {
    /// When it was due: `i` ms after the start (the schedule, not when it was sent).
    due: Duration,
    /// When it was actually sent (late when the runtime or the loop fell behind).
    sent: Duration,
    /// When its answer arrived (or the request failed).
    done: Duration,
    /// `None` on a 200; else the error (transport, timeout, status, or the task's JoinError).
    error: Option<String>,
}

/// Most requests in flight at once. At 1,000/s this allows 2 s of stalled answers; a tick that
/// finds the limit reached is not sent and is counted in `skipped_sends` (a run with skipped
/// sends did not offer the load it claims).
const MAX_IN_FLIGHT: usize = 2_000;
/// Time limit of one append request (the backup request has its own, longer one).
const APPEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Time limit of the backup request.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(600);

/// Starts the server on the ledger, appends at 1,000 events/s over HTTP from 3 s before an
/// online backup until 2 s after it, and reports append latency percentiles during the backup
/// and overall. Latency is from each append's *scheduled* time (start + i ms) to its answer, so
/// a stall delays every append due during it (no coordinated omission); appends are not held
/// back by earlier ones (up to `MAX_IN_FLIGHT`). Errors (non-200, transport, timeout, a
/// panicked task) are counted and reported, never dropped.
fn online_backup(root: &str, n: u64) {
    let mut child = Server(
        Command::new(BIN)
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
            .expect("spawn server"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
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
        let client = reqwest::Client::builder()
            .timeout(APPEND_TIMEOUT)
            .build()
            .expect("http client");
        let backup_client = reqwest::Client::builder()
            .timeout(BACKUP_TIMEOUT)
            .build()
            .expect("http client");
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
        let (b2, t2) = (base.clone(), token.clone());
        let backup = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let from = start.elapsed();
            let r = async {
                let r = backup_client
                    .post(format!("{b2}/api/v1/admin/backup"))
                    .bearer_auth(&t2)
                    .send()
                    .await
                    .map_err(|e| format!("backup request: {e}"))?;
                let status = r.status();
                let body: Value = r.json().await.map_err(|e| format!("backup answer: {e}"))?;
                if status != 200 {
                    return Err(format!("backup answered {status}: {body}"));
                }
                Ok(body)
            }
            .await;
            let to = start.elapsed();
            // Set also on failure, so that the load stops 2 s later instead of at its bound.
            *bw.lock().unwrap_or_else(|p| p.into_inner()) = (from, to);
            (r, to - from)
        });
        // 1,000 events/s: update command i due at start + i ms, from 3 s before the backup until
        // 2 s after it (bounded: 180 s, 200,000 commands).
        let mut lat: Vec<Append> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut inflight = tokio::task::JoinSet::new();
        let (mut i, mut skipped, mut max_in_flight) = (0u64, 0u64, 0usize);
        let load_until = |start: Instant| {
            let (_, to) = *backup_window.lock().unwrap_or_else(|p| p.into_inner());
            let now = start.elapsed();
            now < Duration::from_secs(180) && (to == Duration::MAX || now < to + Duration::from_secs(2))
        };
        let collect = |r: Result<Append, tokio::task::JoinError>, lat: &mut Vec<Append>| match r {
            Ok(a) => lat.push(a),
            // A panicked or cancelled task: its times are lost, its failure is not.
            Err(e) => lat.push(Append {
                due: Duration::MAX,
                sent: Duration::MAX,
                done: Duration::MAX,
                error: Some(format!("task: {e}")),
            }),
        };
        while load_until(start) && i < 200_000 {
            tick.tick().await;
            // The schedule, independent of when this loop got here.
            let due = Duration::from_millis(i);
            i += 1;
            while let Some(r) = inflight.try_join_next() {
                collect(r, &mut lat);
            }
            if inflight.len() >= MAX_IN_FLIGHT {
                skipped += 1;
                continue;
            }
            let (c, u, tok) = (client.clone(), format!("{base}/api/v1/alarms/{id}"), token.clone());
            let body = json!({"condition": format!("PX_LAST > {i}")});
            inflight.spawn(async move {
                let sent = start.elapsed();
                let error = match c.patch(u).bearer_auth(tok).json(&body).send().await {
                    Ok(r) if r.status() == 200 => None,
                    Ok(r) => Some(format!("status {}", r.status())),
                    Err(e) => Some(e.to_string()),
                };
                Append { due, sent, done: start.elapsed(), error }
            });
            max_in_flight = max_in_flight.max(inflight.len());
        }
        while let Some(r) = inflight.join_next().await {
            collect(r, &mut lat);
        }
        let load_secs = start.elapsed().as_secs_f64();
        let (report, took) = backup.await.expect("backup task");
        let (report, backup_error) = match report {
            Ok(v) => (v, None),
            Err(e) => (Value::Null, Some(e)),
        };
        let (from, to) = *backup_window.lock().unwrap_or_else(|p| p.into_inner());
        let pct = |v: &mut Vec<f64>, p: f64| {
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ok: Vec<&Append> = lat.iter().filter(|a| a.error.is_none()).collect();
        let errors = lat.len() - ok.len();
        let first_error = lat.iter().find_map(|a| a.error.clone());
        let mut all: Vec<f64> = ok.iter().map(|a| ms(a.done - a.due)).collect();
        let mut during: Vec<f64> = ok
            .iter()
            .filter(|a| a.due >= from && a.due <= to)
            .map(|a| ms(a.done - a.due))
            .collect();
        let mut before: Vec<f64> = ok
            .iter()
            .filter(|a| a.due < from)
            .map(|a| ms(a.done - a.due))
            .collect();
        // How late the sends left (the loop or the runtime falling behind the schedule).
        let mut lag: Vec<f64> = ok.iter().map(|a| ms(a.sent.saturating_sub(a.due))).collect();
        let errors_during = lat
            .iter()
            .filter(|a| a.error.is_some() && a.due >= from && a.due <= to)
            .count();
        // Appends answered 200 within the backup window, per second of the window.
        let window = (to - from).as_secs_f64().max(1e-9);
        let done_during = ok.iter().filter(|a| a.done >= from && a.done <= to).count();
        // Sent (200 or not) with a due time in the window; skipped ticks are in skipped_sends.
        let sent_during = lat.iter().filter(|a| a.due >= from && a.due <= to).count();
        println!(
            "{}",
            json!({
                "bench": "online_backup", "ledger_events": n, "backup_head": report["head"],
                "backup_secs": took.as_secs_f64(), "backup_error": backup_error,
                "latency_from": "scheduled send time",
                "append_rate_during_backup_per_s": done_during as f64 / window,
                "append_rate_overall_per_s": ok.len() as f64 / load_secs,
                "appends_scheduled": i, "appends_ok": ok.len(),
                "appends_during_backup": during.len(), "appends_sent_during_backup": sent_during,
                "errors": errors, "errors_during_backup": errors_during, "first_error": first_error,
                "skipped_sends": skipped, "max_in_flight": max_in_flight,
                "send_lag_p99_ms": pct(&mut lag, 0.99), "send_lag_max_ms": lag.last().copied().unwrap_or(f64::NAN),
                "p50_ms_during": pct(&mut during, 0.50), "p99_ms_during": pct(&mut during, 0.99),
                "max_ms_during": during.last().copied().unwrap_or(f64::NAN),
                "p99_ms_overall": pct(&mut all, 0.99),
                "p50_ms_before": pct(&mut before, 0.50), "p99_ms_before": pct(&mut before, 0.99),
            })
        );
        if let Some(e) = backup_error {
            panic!("online backup failed: {e}");
        }
        let path = report["path"].as_str().expect("backup path").to_string();
        let out = Command::new(BIN).args(["verify", "--data", &path]).output().expect("verify");
        assert!(out.status.success(), "backup does not verify: {}", String::from_utf8_lossy(&out.stderr));
        println!("{}", json!({"bench": "online_backup_verify", "result": String::from_utf8_lossy(&out.stdout).trim()}));
        // A restore: the first start on the copy (its projection snapshot and checkpoint), then
        // again.
        let copied = report["head"].as_u64().expect("backup head");
        process_start(Path::new(&path), copied, true, "restored_backup_first");
        process_start(Path::new(&path), copied, true, "restored_backup_again");
    });
    drop(child);
}

/// A server child process, stopped (SIGTERM, then SIGKILL after 60 s) when dropped, also when a
/// measurement panics, so that no server outlives the bench.
struct Server(std::process::Child);

impl Server {
    /// SIGTERM and wait for the exit (bounded); returns how long the stop took.
    fn stop(&mut self) -> Duration {
        let t = Instant::now();
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            while t.elapsed() < Duration::from_secs(60) {
                if !matches!(self.0.try_wait(), Ok(None)) {
                    return t.elapsed();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
        t.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
