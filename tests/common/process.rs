//! The real `alarm-ledger` binary as a child process: started with JSON logs on 127.0.0.1:0, its
//! address read from the `alarm-ledger listening` log line, every log line kept for failure
//! messages. Shared by the crash and compliance tests.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_alarm-ledger");

/// The `alarm-ledger` binary as a command whose environment holds no `ALARM_LEDGER_*` variable
/// of whoever runs the tests (a test sets the ones it means with `.env`).
pub fn bin() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ALARM_LEDGER_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

pub struct Spawned {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything the server wrote to stderr.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Starts `serve --data DATA --listen 127.0.0.1:0 EXTRA...` with `env`, and waits (≤ 30 s) for
/// its address. Panics with the server's log if it does not come up.
pub fn spawn_server(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Spawned {
    spawn_server_limited(data, extra, env, None)
}

/// `spawn_server` with the files the server writes limited to `file_size` bytes
/// (`RLIMIT_FSIZE`): a disk that refuses writes, without root. `SIGXFSZ` is left at its default
/// action (which kills the process): the server ignores it itself, so a write beyond the limit
/// fails with `EFBIG`.
pub fn spawn_server_limited(
    data: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    file_size: Option<u64>,
) -> Spawned {
    let mut cmd = bin();
    if let Some(limit) = file_size {
        use std::os::unix::process::CommandExt;
        // SAFETY: signal and setrlimit only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGXFSZ, libc::SIG_DFL);
                let r = libc::rlimit {
                    rlim_cur: limit as libc::rlim_t,
                    rlim_max: limit as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.args(["--log-format", "json", "serve", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the server binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["message"] == "alarm-ledger listening" {
                    if let Some(a) = v["addr"].as_str().and_then(|a| a.parse().ok()) {
                        let _ = tx.send(a);
                    }
                }
            }
            lines.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Spawned { child, addr, log },
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server did not report its address:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
    }
}
