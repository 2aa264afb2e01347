//! The accept loop: hyper 1 connections (as warp's own `serve`), owned here so that
//! - every accepted socket gets TCP_NODELAY (a small WebSocket frame must not wait for Nagle),
//! - WebSocket upgrades of `/api/v1/ws` get our tungstenite configuration (`ws::upgrade`: small
//!   buffers, so idle connections cost a few KiB instead of the default 128 KiB read buffer),
//! - a client gets `HEADER_READ_TIMEOUT` to send a request's head (slowloris: a connection that
//!   sends nothing, trickles, or never finishes its request line and headers is closed), and as
//!   long again for its body (`BodyDeadline`: 400, and the connection is closed),
//! - shutdown is graceful: stop accepting, let in-flight HTTP requests finish.
//!
//! The connections are hyper's own HTTP/1 (`hyper::server::conn::http1`), not hyper-util's
//! `auto` builder: `auto` first reads until it can tell HTTP/1 from an HTTP/2 preface, with no
//! limit, so a client that sent nothing (or `P` and nothing more) held its connection forever
//! whatever the header read timeout; and hyper applies that timeout only with a timer, which
//! neither builder sets by itself. We serve HTTP/1 only anyway.

use super::{ws, State};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
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
                async move {
                    if req.uri().path() == "/api/v1/ws" && ws::is_upgrade(&req) {
                        return Ok::<Response, Infallible>(ws::upgrade(
                            state,
                            req,
                            Some(peer),
                            Some(fd),
                        ));
                    }
                    tower_service::Service::call(&mut filter, req).await
                }
            });
        let conn = http
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
