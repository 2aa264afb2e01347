//! The accept loop: hyper 1 connections (as warp's own `serve`), owned here so that
//! - every accepted socket gets TCP_NODELAY (a small WebSocket frame must not wait for Nagle),
//! - WebSocket upgrades of `/api/v1/ws` get our tungstenite configuration (`ws::upgrade`: small
//!   buffers, so idle connections cost a few KiB instead of the default 128 KiB read buffer),
//! - shutdown is graceful: stop accepting, let in-flight HTTP requests finish.

use super::{ws, State};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
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

pub async fn serve(
    listener: TcpListener,
    state: State,
    routes: BoxedFilter<(Response,)>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
        let filter = warp::service(routes.clone());
        let state = state.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                let mut filter = filter.clone();
                let state = state.clone();
                async move {
                    if req.uri().path() == "/api/v1/ws" && ws::is_upgrade(&req) {
                        return Ok::<Response, Infallible>(ws::upgrade(state, req, Some(peer)));
                    }
                    tower_service::Service::call(&mut filter, req).await
                }
            });
        let conn = auto::Builder::new(TokioExecutor::new())
            .http1_only()
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
