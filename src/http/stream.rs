//! Long answers (`GET /api/v1/events`, `GET /api/v1/security-log`, an alarm's history) streamed
//! from a blocking reader in chunks, so that memory per request stays constant whatever the log's size.
//!
//! Each stream holds a thread of tokio's blocking pool while it runs, and that pool also serves
//! security-log writes, replays and history reads; so streams are bounded three ways:
//! - at most `MAX_STREAMS` run at once (beyond: `503 overloaded` with `Retry-After`);
//! - a client that takes no chunk for `stall` (the `ws-stall-timeout` setting) is cut off;
//! - a client that went away is noticed at the next line it would get, not only when a chunk
//!   is full. (A filter that matches nothing still reads to its end before it notices: the
//!   scan itself does not look at the client; it is bounded by the log's size and by the 16.)
//!
//! The stream also ends at shutdown, at its next chunk.

use super::errors::ApiError;
use super::State;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use warp::reply::Response;
use warp::Reply;

/// Streamed answers running at once.
pub const MAX_STREAMS: usize = 16;

/// Bytes gathered before a chunk is handed to the connection.
const CHUNK: usize = 60 * 1024;

/// The permits of `MAX_STREAMS` (one per server, in `AppState`).
pub fn limiter() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_STREAMS))
}

/// Where a producer writes its lines. `line` returns `false` once the stream is over (client
/// gone or stalled, or shutdown): the producer must stop.
pub struct LineSink {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
    stall: Duration,
    rt: tokio::runtime::Handle,
    shutdown: tokio::sync::watch::Receiver<bool>,
    over: bool,
    /// Set once the last chunk of a complete answer was handed over: the body ends cleanly only
    /// then. Any other end (cut off, failed, shutdown) ends it with an error, so that a client
    /// never holds a prefix that looks like a complete answer.
    complete: Arc<std::sync::atomic::AtomicBool>,
    cut_offs: prometheus_client::metrics::counter::Counter,
}

impl LineSink {
    /// Appends one line (the producer writes it without its LF; the sink adds it).
    pub fn line(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.over || self.tx.is_closed() {
            self.over = true;
            return false;
        }
        write(&mut self.buf);
        self.buf.push(b'\n');
        if self.buf.len() >= CHUNK {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 4096));
            return self.send(Ok(Bytes::from(chunk)));
        }
        true
    }

    /// Hands `item` to the connection, waiting at most `stall` for room.
    fn send(&mut self, item: Result<Bytes, std::io::Error>) -> bool {
        if self.over || *self.shutdown.borrow() {
            self.over = true;
            return false;
        }
        let sent = self
            .rt
            .block_on(tokio::time::timeout(self.stall, self.tx.send(item)));
        match sent {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                self.over = true; // the client went away
                false
            }
            Err(_) => {
                tracing::warn!(
                    stall_ms = self.stall.as_millis() as u64,
                    "streamed answer cut off: the client took no data within the stall timeout"
                );
                self.cut_offs.inc();
                self.over = true;
                false
            }
        }
    }

    /// Ends the stream: the rest of the buffer, or an error that cuts the stream (the client
    /// sees an incomplete chunked body, never a clean end).
    fn finish(mut self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                let delivered = if self.buf.is_empty() {
                    !self.over
                } else {
                    let rest = std::mem::take(&mut self.buf);
                    self.send(Ok(Bytes::from(rest)))
                };
                if delivered && !self.over {
                    self.complete
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Err(e) => {
                if !self.over {
                    tracing::error!(error = %e, "streamed answer failed mid-stream");
                    self.send(Err(std::io::Error::other(e)));
                }
            }
        }
    }
}

/// Takes a stream permit, or answers `overloaded`.
pub fn permit(state: &State) -> Result<OwnedSemaphorePermit, ApiError> {
    state.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::overloaded(format!(
            "{MAX_STREAMS} streamed exports are already running; retry shortly"
        ))
    })
}

/// Runs `produce` on the blocking pool and streams what it writes as `application/x-ndjson`.
/// `produce` returns `Err` with a message to cut the stream (a read failure mid-way).
pub fn ndjson(
    state: &State,
    permit: OwnedSemaphorePermit,
    produce: impl FnOnce(&mut LineSink) -> Result<(), String> + Send + 'static,
) -> Response {
    streamed(state, permit, "application/x-ndjson", produce)
}

/// `ndjson` for one JSON document written in pieces (each piece ends with a LF, which JSON
/// reads as whitespace).
pub fn json(
    state: &State,
    permit: OwnedSemaphorePermit,
    produce: impl FnOnce(&mut LineSink) -> Result<(), String> + Send + 'static,
) -> Response {
    streamed(state, permit, "application/json", produce)
}

fn streamed(
    state: &State,
    permit: OwnedSemaphorePermit,
    content_type: &'static str,
    produce: impl FnOnce(&mut LineSink) -> Result<(), String> + Send + 'static,
) -> Response {
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let complete = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut sink = LineSink {
        tx,
        buf: Vec::with_capacity(CHUNK + 4096),
        stall: state.settings.ws_stall_timeout,
        rt: tokio::runtime::Handle::current(),
        shutdown: state.shutdown.clone(),
        over: false,
        complete: complete.clone(),
        cut_offs: state.metrics.http_streams_cut_off.clone(),
    };
    // Counted in `http_streams_active` for as long as the producer runs (a panicking one too).
    let active = crate::metrics::GaugeGuard::enter(&state.metrics.http_streams_active);
    tokio::task::spawn_blocking(move || {
        let _held = (permit, active);
        let result = produce(&mut sink);
        sink.finish(result);
    });
    let mut ended = false;
    let stream = futures_util::stream::poll_fn(move |cx| {
        if ended {
            return std::task::Poll::Ready(None);
        }
        match rx.poll_recv(cx) {
            std::task::Poll::Ready(None) => {
                ended = true;
                if complete.load(std::sync::atomic::Ordering::SeqCst) {
                    std::task::Poll::Ready(None)
                } else {
                    // Cut off (stall, shutdown, a failure already reported or not): an error,
                    // so hyper aborts the body instead of ending it cleanly.
                    std::task::Poll::Ready(Some(Err(std::io::Error::other(
                        "streamed answer cut off before its end",
                    ))))
                }
            }
            other => other,
        }
    });
    let mut resp = warp::reply::stream(stream).into_response();
    resp.headers_mut().insert(
        "content-type",
        warp::http::HeaderValue::from_static(content_type),
    );
    resp
}
