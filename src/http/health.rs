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
    let head = state.ledger.head().offset;
    let projection = state.ledger.read_model().projection.offset();
    let caught_up = projection == head;
    let storage_ok = !state.ledger.is_degraded();
    let dir = state.settings.data_dir.clone();
    let disk_writable = tokio::task::spawn_blocking(move || probe_writable(&dir))
        .await
        .unwrap_or(false);
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
    let text = state.metrics.render();
    Ok(warp::reply::with_header(
        text,
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
    .into_response())
}
