//! Crash safety: the real binary, appending under concurrency, killed with SIGKILL at random
//! moments, many times over one data directory.
//!
//! Each round: several HTTP clients send commands (each with a `command_id`) as fast as the
//! server answers and record every command acknowledged with 200 and its offset; 50–400 ms into
//! the load the server gets SIGKILL. Then:
//! - `alarm-ledger verify --data DIR` exits 0 (offsets, records, chain, indexes, snapshot);
//! - a restarted server holds every acknowledged event (of every round so far) at its offset
//!   with its command_id, and its offsets are contiguous from 1;
//! - re-sending every command acknowledged this round answers `duplicate: true` with the
//!   original offset and appends nothing;
//! - re-sending the commands that were in flight at the kill (sent, no answer: the client
//!   cannot know whether they were appended — the case a client retrying after a dropped
//!   connection is in) answers `duplicate: true` with the offset where the log holds it, or
//!   appends it once if the kill came first; either way each command_id is in the log once.
//!
//! The server runs with `--snapshot-every 40` so that kills also land during projection
//! snapshots. `CRASH_SEED` reproduces a run's kill times; `CRASH_ROUNDS` changes the count.

#[path = "common/process.rs"]
mod process;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const ADMIN_PASSWORD: &str = "crash-test-admin-password";
const SECRET: &str = "crash-test-secret-crash-test-secret-0123";
const CLIENTS: usize = 6;

/// A server child process; killed (SIGKILL) when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Everything the server wrote to stderr (for failure messages).
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(data: &Path) -> Server {
        let process::Spawned { child, addr, log } = process::spawn_server(
            data,
            &["--snapshot-every", "40"],
            &[
                ("ALARM_LEDGER_ADMIN_PASSWORD", ADMIN_PASSWORD),
                ("ALARM_LEDGER_JWT_SECRET", SECRET),
                ("RUST_LOG", "info"),
            ],
        );
        Server { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn kill9(&mut self) {
        // Child::kill is SIGKILL on Unix.
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// xorshift64*: kill times reproducible from a printed seed, no extra dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A command answered with 200: what was sent and what the server said.
#[derive(Clone, Debug)]
struct Acked {
    path: String,
    body: Value,
    command_id: Uuid,
    alarm_id: String,
    offset: u64,
}

async fn login(client: &reqwest::Client, s: &Server) -> String {
    let r = client
        .post(s.url("/api/v1/login"))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("login: {e}\n{}", s.log.lock().unwrap().join("\n")));
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// A command sent when the server died, without an answer.
struct InFlight {
    path: String,
    body: Value,
    command_id: Uuid,
}

/// One client: its own alarm's create → (trigger → ack → rearm)* cycle, until the server dies;
/// then the command it was waiting for, if any.
async fn client_loop(
    base: String,
    token: String,
    acked: Arc<Mutex<Vec<Acked>>>,
) -> Option<InFlight> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let alarm = Uuid::now_v7().to_string();
    for i in 0usize.. {
        let cid = Uuid::new_v4();
        let (path, body) = match i {
            0 => (
                "/api/v1/alarms".to_string(),
                json!({"name": "crash", "id": alarm, "instrument": "AAPL", "command_id": cid}),
            ),
            i => {
                let action = ["trigger", "ack", "rearm"][(i - 1) % 3];
                let body = match action {
                    "trigger" => json!({"value": format!("{i}"), "command_id": cid}),
                    "ack" => json!({"comment": "seen", "command_id": cid}),
                    _ => json!({"command_id": cid}),
                };
                (format!("/api/v1/alarms/{alarm}/{action}"), body)
            }
        };
        let r = client
            .post(format!("{base}{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await;
        let in_flight = |path, body| {
            Some(InFlight {
                path,
                body,
                command_id: cid,
            })
        };
        let Ok(r) = r else {
            return in_flight(path, body); // the server is gone
        };
        let status = r.status().as_u16();
        let Ok(v) = r.json::<Value>().await else {
            return in_flight(path, body);
        };
        assert_eq!(status, 200, "{path} {body}: {v}");
        assert!(
            v.get("already").is_none() && v.get("duplicate").is_none(),
            "{v}"
        );
        acked.lock().unwrap().push(Acked {
            path,
            body,
            command_id: cid,
            alarm_id: v["alarm_id"].as_str().unwrap().to_string(),
            offset: v["offset"].as_u64().unwrap(),
        });
    }
    None // (the range ends only at usize::MAX)
}

fn verify(data: &Path) -> (u64, String) {
    let out = process::bin()
        .args(["verify", "--data"])
        .arg(data)
        .output()
        .expect("verify runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "verify failed ({}): {}{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    // ok <n> events, head <offset> <hash>
    let w: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!((w[0], w[2], w[3]), ("ok", "events,", "head"), "{stdout}");
    (w[4].parse().unwrap(), w[5].to_string())
}

/// Every event of the log, via the export route.
async fn events(client: &reqwest::Client, s: &Server, token: &str) -> Vec<Value> {
    let text = client
        .get(s.url("/api/v1/events"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("CRASH_SEED={seed} CRASH_ROUNDS={rounds}");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut all: Vec<Acked> = Vec::new();
    let mut server = Server::start(&data);
    let started = Instant::now();
    for round in 0..rounds {
        let client = reqwest::Client::new();
        let token = login(&client, &server).await;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let base = format!("http://{}", server.addr);
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| tokio::spawn(client_loop(base.clone(), token.clone(), acked.clone())))
            .collect();
        let after = rng.between(50, 400);
        tokio::time::sleep(Duration::from_millis(after)).await;
        server.kill9();
        let mut in_flight = Vec::new();
        for t in tasks {
            in_flight.extend(t.await.expect("client task"));
        }
        let round_acked = std::mem::take(&mut *acked.lock().unwrap());

        let (head, hash) = verify(&data);
        server = Server::start(&data);
        let client = reqwest::Client::new();
        let token = login(&client, &server).await;
        let log = events(&client, &server, &token).await;
        assert_eq!(
            log.len() as u64,
            head,
            "verify and the server agree on the head"
        );
        for (i, e) in log.iter().enumerate() {
            assert_eq!(
                e["offset"].as_u64(),
                Some(i as u64 + 1),
                "offsets contiguous"
            );
        }
        assert_eq!(
            log.last().map(|e| e["hash"].as_str().unwrap()),
            Some(&*hash)
        );
        all.extend(round_acked.iter().cloned());
        for a in &all {
            let e = log
                .get(a.offset as usize - 1)
                .unwrap_or_else(|| panic!("acknowledged offset {} lost (head {head})", a.offset));
            assert_eq!(
                e["command_id"].as_str(),
                Some(&*a.command_id.to_string()),
                "offset {} holds another command: {e}",
                a.offset
            );
            assert_eq!(e["alarm_id"].as_str(), Some(&*a.alarm_id));
        }
        // Retries of everything acknowledged this round: the original answer, nothing appended.
        for a in &round_acked {
            let r = client
                .post(server.url(&a.path))
                .bearer_auth(&token)
                .json(&a.body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["duplicate"], true, "{v}");
            assert_eq!(v["offset"].as_u64(), Some(a.offset), "{v}");
        }
        let ledger: Value = client
            .get(server.url("/api/v1/ledger"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            ledger["head"].as_u64(),
            Some(head),
            "retries appended nothing"
        );
        // Retries of the commands in flight at the kill: appended at most once, ever.
        let mut appended_now = 0;
        for f in &in_flight {
            let cid = f.command_id.to_string();
            let held: Vec<u64> = log
                .iter()
                .filter(|e| e["command_id"].as_str() == Some(&*cid))
                .map(|e| e["offset"].as_u64().unwrap())
                .collect();
            assert!(held.len() <= 1, "command {cid} appended twice: {held:?}");
            let r = client
                .post(server.url(&f.path))
                .bearer_auth(&token)
                .json(&f.body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "retry of {} {}", f.path, f.body);
            let v: Value = r.json().await.unwrap();
            let offset = v["offset"].as_u64().unwrap();
            match held.first() {
                Some(&at) => {
                    assert_eq!(v["duplicate"], true, "durable before the kill: {v}");
                    assert_eq!(offset, at, "{v}");
                }
                None => {
                    assert!(v.get("duplicate").is_none(), "lost at the kill: {v}");
                    assert!(offset > head, "{v}");
                    appended_now += 1;
                }
            }
            all.push(Acked {
                path: f.path.clone(),
                body: f.body.clone(),
                command_id: f.command_id,
                alarm_id: v["alarm_id"].as_str().unwrap().to_string(),
                offset,
            });
        }
        let after_retries = events(&client, &server, &token).await;
        assert_eq!(
            after_retries.len() as u64,
            head + appended_now,
            "only the commands lost at the kill were appended by their retries"
        );
        eprintln!(
            "round {round}: killed after {after} ms, {} acknowledged, {} in flight ({appended_now} lost at the kill), head {head}",
            round_acked.len(),
            in_flight.len()
        );
    }
    // The last server stops gracefully; the directory still verifies.
    let pid = server.child.id() as libc::pid_t;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    assert!(status.success(), "graceful stop: {status}");
    let (head, _) = verify(&data);
    assert!(head >= all.len() as u64);
    assert!(
        all.len() >= 10 * rounds,
        "the load did run: {} acknowledged in {rounds} rounds",
        all.len()
    );
    eprintln!(
        "{rounds} rounds, {} acknowledged events, head {head}, {:?}",
        all.len(),
        started.elapsed()
    );
}
