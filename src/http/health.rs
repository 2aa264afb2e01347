//! `/healthz` (alive), `/readyz` (ledger open, projection caught up, disk writable), `/metrics`.

use super::errors::ApiError;
use super::State;
use crate::store::codec::FORMAT_VERSION;
use serde_json::json;
use std::sync::atomic::Ordering;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

/// Alive. 503 only when storage failed and did not recover: sled keeps an I/O error for the
/// life of the process, so a restart is the cure and a liveness probe should trigger it.
pub async fn healthz(state: &State) -> Result<Response, ApiError> {
    let degraded = state.ledger.is_degraded();
    let body = json!({
        "status": if degraded { "storage_failed" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "format_version": FORMAT_VERSION,
    });
    let status = if degraded {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    Ok(warp::reply::with_status(warp::reply::json(&body), status).into_response())
}

pub async fn readyz(state: &State) -> Result<Response, ApiError> {
    let accepting = state.accepting.load(Ordering::Relaxed);
    // Both under one guard: the writer moves them together, and two reads could straddle a
    // commit (a spurious "not caught up" under write load).
    let (head, caught_up) = {
        let m = state.ledger.read_model();
        (m.head.offset, m.projection.offset() == m.head.offset)
    };
    let storage_ok = !state.ledger.is_degraded();
    let disk_writable = state.disk_probe.writable().await;
    let integrity_failure = state.ledger.integrity_failure();
    let integrity = match (&integrity_failure, state.ledger.is_verified()) {
        (Some(_), _) => "failed",
        (None, true) => "verified",
        (None, false) => "checking",
    };
    let ready =
        accepting && caught_up && storage_ok && disk_writable && integrity_failure.is_none();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "ledger_open": true,
        "accepting": accepting,
        "projection_caught_up": caught_up,
        "head": head,
        "storage_ok": storage_ok,
        "disk_writable": disk_writable,
        "integrity": integrity,
        "integrity_error": integrity_failure,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(warp::reply::with_status(warp::reply::json(&body), status).into_response())
}

/// The "disk writable" check of `/readyz`. It writes and syncs a file on the ledger's own disk,
/// and `/readyz` is unauthenticated and often public: so at most one probe runs at a time, its
/// result serves every request for `PROBE_TTL`, and a probe that hangs (a stuck disk) answers
/// "not writable" after `PROBE_TIMEOUT` and is never started again while it hangs, instead of
/// holding a blocking thread per request.
pub struct DiskProbe {
    dir: std::path::PathBuf,
    gate: tokio::sync::Mutex<Option<(std::time::Instant, bool)>>,
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

const PROBE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl DiskProbe {
    pub fn new(dir: std::path::PathBuf) -> DiskProbe {
        DiskProbe {
            dir,
            gate: tokio::sync::Mutex::new(None),
            running: Default::default(),
        }
    }

    pub async fn writable(&self) -> bool {
        let mut last = self.gate.lock().await;
        if let Some((at, ok)) = *last {
            if at.elapsed() < PROBE_TTL {
                return ok;
            }
        }
        let ok = if self.running.swap(true, Ordering::SeqCst) {
            false // the previous probe still hangs
        } else {
            let (dir, running) = (self.dir.clone(), self.running.clone());
            let probe = tokio::task::spawn_blocking(move || {
                let ok = probe_writable(&dir);
                running.store(false, Ordering::SeqCst);
                ok
            });
            matches!(
                tokio::time::timeout(PROBE_TIMEOUT, probe).await,
                Ok(Ok(true))
            )
        };
        *last = Some((std::time::Instant::now(), ok));
        ok
    }
}

/// Creates, syncs and removes a small file in the data directory.
fn probe_writable(dir: &std::path::Path) -> bool {
    use std::io::Write;
    let path = dir.join(".readyz-probe");
    let ok = std::fs::File::create(&path)
        .and_then(|mut f| {
            f.write_all(b"ok")?;
            f.sync_data()
        })
        .is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

pub async fn metrics(state: &State) -> Result<Response, ApiError> {
    let m = &state.metrics;
    m.storage_failed.set(i64::from(state.ledger.is_degraded()));
    m.integrity_failed
        .set(i64::from(state.ledger.integrity_failure().is_some()));
    let text = m.render();
    Ok(warp::reply::with_header(
        text,
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_disk_probe_answers_and_caches_its_answer() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).expect("mkdir");
        let probe = DiskProbe::new(dir.clone());
        assert!(probe.writable().await);
        // Within the cache's lifetime the answer stands, even though the directory is gone.
        std::fs::remove_dir_all(&dir).expect("rm");
        assert!(probe.writable().await, "cached");
        tokio::time::sleep(PROBE_TTL + std::time::Duration::from_millis(50)).await;
        assert!(
            !probe.writable().await,
            "probed again after the cache expired"
        );
    }
}
