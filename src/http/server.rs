//! The accept loop: hyper 1 connections (as warp's own `serve`), owned here so that
//! - every accepted socket gets TCP_NODELAY (a small WebSocket frame must not wait for Nagle),
//! - WebSocket upgrades of `/api/v1/ws` get our tungstenite configuration (`ws::upgrade`: small
//!   buffers, so idle connections cost a few KiB instead of the default 128 KiB read buffer),
//! - a client gets `HEADER_READ_TIMEOUT` to send a request's head (slowloris: a connection that
//!   sends nothing, trickles, or never finishes its request line and headers is closed), and as
//!   long again for its body (`BodyDeadline`: 400, and the connection is closed),
//! - open connections are limited (`ConnectionLimit`, `--max-connections`): over the limit a
//!   client is answered `503 overloaded` (a WebSocket upgrade: accepted and closed with 1013),
//!   and further over it the socket is closed unread,
//! - shutdown is graceful: stop accepting, let in-flight HTTP requests finish.
//!
//! The connections are hyper's own HTTP/1 (`hyper::server::conn::http1`), not hyper-util's
//! `auto` builder: `auto` first reads until it can tell HTTP/1 from an HTTP/2 preface, with no
//! limit, so a client that sent nothing (or `P` and nothing more) held its connection forever
//! whatever the header read timeout; and hyper applies that timeout only with a timer, which
//! neither builder sets by itself. We serve HTTP/1 only anyway.

use super::{errors::ApiError, ws, State};
use crate::metrics::{Metrics, ModeLabel};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use warp::filters::BoxedFilter;
use warp::reply::Response;

/// The peer address of a connection, put in every request's extensions (warp's own
/// `addr::remote()` only works under `warp::serve`).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// When a request's body must have arrived, put in every request's extensions: the header read
/// timeout again, from the end of the head. hyper's timeout covers the head only, and the body
/// is read before any token check, so without this a client announcing a 1 MiB body and
/// trickling it (or stopping one byte short) held a task and its buffer for as long as it
/// liked, unauthenticated.
#[derive(Clone, Copy, Debug)]
pub struct BodyDeadline(pub tokio::time::Instant);

/// How long a client may take to send the head of a request (request line and headers), from
/// the moment the server waits for it; then the connection is closed without an answer. It
/// also ends a keep-alive connection idle that long between requests. (An upgraded WebSocket
/// is no longer HTTP: its own ping and idle limits apply.)
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection over the limit may take to send its request before it is closed.
const REFUSAL_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Descriptors kept out of `--max-connections` when the limit is derived from the open-files
/// limit: sled's files and blobs, the listener, backups, the JWT secret, logs.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// The limit of open client connections, HTTP and WebSocket alike (each holds a descriptor and
/// ~10 KiB of memory when idle, more when busy), and what happens over it:
/// - up to `max`: served;
/// - the next `margin` (`max / 16`, 16 to 1,024): refused with an answer, cheaply and briefly —
///   `503 overloaded` with `Retry-After: 1` and `Connection: close` for HTTP, an accepted
///   upgrade closed at once with 1013 for a WebSocket (a Qt client cannot read a refused
///   handshake); the probes (`/healthz`, `/readyz`, `/metrics`) are still served, so that a
///   full server is not restarted by its orchestrator;
/// - beyond that: closed at once, unread (a flood costs a descriptor for an instant).
///
/// A served connection that closes frees its place at once (the limit counts connections, not
/// requests).
pub struct ConnectionLimit {
    max: usize,
    margin: usize,
    serving: AtomicUsize,
    refusing: AtomicUsize,
    metrics: Arc<Metrics>,
    /// Unix seconds of the last warning, so that a flood logs one line every 10 s.
    warned: AtomicU64,
}

/// What the accept loop does with a new connection.
pub enum Admission {
    Serve(Arc<Slot>),
    Refuse(Arc<Slot>),
    Drop,
}

/// A connection's place under the limit, freed when the last holder drops it (the HTTP
/// connection's task, and after an upgrade the WebSocket's).
pub struct Slot {
    limit: Arc<ConnectionLimit>,
    serving: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counter = if self.serving {
            &self.limit.serving
        } else {
            &self.limit.refusing
        };
        counter.fetch_sub(1, Ordering::SeqCst);
        self.limit.metrics.tcp_connections.dec();
    }
}

impl ConnectionLimit {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(ConnectionLimit {
            max,
            margin: Self::margin_for(max),
            serving: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            metrics,
            warned: AtomicU64::new(0),
        })
    }

    /// The limit for `configured` connections under an open-files limit of `open_files`: every
    /// connection the server holds (the refused ones too, while they are answered) and
    /// `RESERVED_DESCRIPTORS` must fit, or a flood would take the descriptors a commit needs.
    pub fn effective(configured: u64, open_files: Option<u64>) -> u64 {
        let Some(n) = open_files else {
            return configured;
        };
        let available = n.saturating_sub(RESERVED_DESCRIPTORS);
        let fit = available.saturating_sub((available / 17 + 1).clamp(16, 1024));
        configured.min(fit).max(1)
    }

    /// Connections over `max` answered before the rest are dropped unread.
    fn margin_for(max: usize) -> usize {
        (max / 16).clamp(16, 1024)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn admit(self: &Arc<Self>) -> Admission {
        let serving = if self.serving.fetch_add(1, Ordering::SeqCst) < self.max {
            true
        } else {
            self.serving.fetch_sub(1, Ordering::SeqCst);
            if self.refusing.fetch_add(1, Ordering::SeqCst) >= self.margin {
                self.refusing.fetch_sub(1, Ordering::SeqCst);
                self.refused("dropped");
                return Admission::Drop;
            }
            // Counted as "answered" when it is answered (`refuse`): a probe on it is served,
            // and a socket that sends nothing is closed at the short head timeout.
            false
        };
        self.metrics.tcp_connections.inc();
        let slot = Arc::new(Slot {
            limit: self.clone(),
            serving,
        });
        if serving {
            Admission::Serve(slot)
        } else {
            Admission::Refuse(slot)
        }
    }

    /// Counts a refusal (`answered`: a 503 or a close with 1013; `dropped`: closed unread) and
    /// warns, at most once per 10 s.
    pub fn refused(&self, how: &str) {
        self.metrics
            .connections_refused
            .get_or_create(&ModeLabel { mode: how.into() })
            .inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.warned.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                max_connections = self.max,
                "connection limit reached: new connections are refused (see connections_refused_total)"
            );
        }
    }
}

/// The answer to a request on a connection over the limit: the probes as usual, an upgrade
/// accepted and closed with 1013, anything else `503 overloaded`.
async fn refuse(
    state: State,
    mut filter: impl tower_service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = Response,
        Error = Infallible,
    >,
    req: hyper::Request<hyper::body::Incoming>,
    fd: std::os::unix::io::RawFd,
    slot: Arc<Slot>,
) -> Response {
    let path = req.uri().path();
    if path == "/api/v1/ws" && ws::is_upgrade(&req) {
        state.connection_limit.refused("answered");
        return ws::upgrade_refused(req, Some(fd), slot, state.settings.ws_max_message);
    }
    let mut resp = if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        let Ok(resp) = tower_service::Service::call(&mut filter, req).await;
        resp
    } else {
        state.connection_limit.refused("answered");
        ApiError::overloaded("the server is at its connection limit; retry shortly").into_response()
    };
    // One answer per refused connection: it holds a place of the bounded margin.
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    resp
}

pub async fn serve(
    listener: TcpListener,
    state: State,
    routes: BoxedFilter<(Response,)>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, state, routes, shutdown, HEADER_READ_TIMEOUT).await
}

/// `serve` with another header read timeout (tests use a short one).
pub async fn serve_with(
    listener: TcpListener,
    state: State,
    routes: BoxedFilter<(Response,)>,
    shutdown: impl Future<Output = ()>,
    header_read_timeout: Duration,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    // Connections over the limit get a short time for their request: a refusal holds a place of
    // the bounded margin, which a client sending nothing must not keep for long.
    let mut refusing = hyper::server::conn::http1::Builder::new();
    refusing
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout.min(REFUSAL_HEADER_TIMEOUT));
    // Graceful shutdown: every connection task holds a receiver; at shutdown each one finishes
    // the request in flight and closes, and `closed()` resolves when the last one is gone.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (slot, serving) = match state.connection_limit.admit() {
            Admission::Serve(slot) => (slot, true),
            Admission::Refuse(slot) => (slot, false),
            Admission::Drop => continue, // `stream` is closed here, unread
        };
        let _ = stream.set_nodelay(true);
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&stream);
        let filter = warp::service(routes.clone());
        let state = state.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                req.extensions_mut().insert(BodyDeadline(
                    tokio::time::Instant::now() + header_read_timeout,
                ));
                let mut filter = filter.clone();
                let state = state.clone();
                let slot = slot.clone();
                async move {
                    if !serving {
                        return Ok(refuse(state, filter, req, fd, slot).await);
                    }
                    if req.uri().path() == "/api/v1/ws" && ws::is_upgrade(&req) {
                        return Ok::<Response, Infallible>(ws::upgrade(
                            state,
                            req,
                            Some(peer),
                            Some(fd),
                            slot,
                        ));
                    }
                    tower_service::Service::call(&mut filter, req).await
                }
            });
        let builder = if serving { &http } else { &refusing };
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                // The only change is to `true` (or the sender going away: stop as well).
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection error");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    stop_tx.closed().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_limit_and_its_margin_fit_in_the_open_files_limit() {
        for n in (0..5_000u64).chain([65_536, 524_288, 1_048_576]) {
            let max = ConnectionLimit::effective(u64::MAX, Some(n));
            let held = max + ConnectionLimit::margin_for(max as usize) as u64;
            if n >= RESERVED_DESCRIPTORS + 32 {
                assert!(
                    held + RESERVED_DESCRIPTORS <= n,
                    "n={n}: max {max}, held {held}"
                );
            }
            assert!(max >= 1);
        }
        // Generous limits leave the configured value alone.
        assert_eq!(ConnectionLimit::effective(50_000, Some(1_048_576)), 50_000);
        assert_eq!(ConnectionLimit::effective(50_000, None), 50_000);
        // A usual 1,024 holds about 840 connections and their margin.
        let at_1024 = ConnectionLimit::effective(50_000, Some(1_024));
        assert!((800..=880).contains(&at_1024), "{at_1024}");
    }

    #[test]
    fn places_are_served_then_refused_then_dropped_and_freed_on_drop() {
        let metrics = Arc::new(Metrics::new());
        let limit = ConnectionLimit::new(2, metrics.clone());
        let a = limit.admit();
        let b = limit.admit();
        assert!(matches!(a, Admission::Serve(_)) && matches!(b, Admission::Serve(_)));
        let refused: Vec<_> = (0..16).map(|_| limit.admit()).collect();
        assert!(refused.iter().all(|r| matches!(r, Admission::Refuse(_))));
        assert!(matches!(limit.admit(), Admission::Drop));
        assert_eq!(metrics.tcp_connections.get(), 18);
        drop(a);
        let c = limit.admit();
        assert!(
            matches!(c, Admission::Serve(_)),
            "a served place freed is served"
        );
        assert!(
            matches!(limit.admit(), Admission::Drop),
            "the margin is still full"
        );
        drop(refused);
        assert!(
            matches!(limit.admit(), Admission::Refuse(_)),
            "both places still served"
        );
        drop((b, c));
        assert_eq!(metrics.tcp_connections.get(), 0);
    }
}
