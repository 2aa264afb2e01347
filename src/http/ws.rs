//! The WebSocket endpoint `GET /api/v1/ws`: one task per connection.
//!
//! The connection task owns the socket and `select!`s over: client frames, answers of commands
//! (futures waiting for the writer's decision, held by the connection), the subscription's output,
//! the ping timer, token expiry, a periodic check that the user is still enabled, and shutdown.
//!
//! The subscription (`ledger::Subscription`: replay → live → replay on lag) is polled directly in
//! that `select!` (it is cancel-safe), so a connection holds at most two chunks in memory (one
//! being sent, one read ahead) and an event costs one task wake-up per subscriber. Writing to a client that does not read blocks
//! only its own task; if the client takes no bytes for the stall limit while a write waits
//! (`Tracked` notes each write the kernel accepted), the socket is closed with 4008 and the
//! client resumes from its last offset. A slow reader that keeps taking bytes is not stalled.

use super::server::Slot;
use super::session::{bearer, check_token, Denied, Principal};
use super::State;
use crate::auth::throttle::TokenBucket;
use crate::auth::{NewSecurityEntry, SecurityAction};
use crate::ledger::{CommandError, SubItem, Subscription};
use crate::protocol::{self, ClientMessage, Hello, Req};
use crate::time::Timestamp;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::unix::io::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;
use warp::Reply;

type WebSocket = WebSocketStream<Tracked>;

pub const CLOSE_GOING_AWAY: u16 = 1001;
/// RFC 6455 "protocol error": a frame that breaks the framing rules (reserved bits or opcodes,
/// a continuation without a start, an unmasked frame, ...).
pub const CLOSE_PROTOCOL: u16 = 1002;
/// RFC 6455 "invalid frame payload data": a text frame that is not UTF-8.
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// RFC 6455 "internal error": the server could not check the user (storage failure); not a
/// reason to log in again.
pub const CLOSE_INTERNAL: u16 = 1011;
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// RFC 6455 / IANA "try again later": the server is at `--max-connections` (an addition to
/// PROTOCOL.md's codes, documented in the README).
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// Malformed messages tolerated per minute; one more closes with 1008.
const MALFORMED_PER_MINUTE: usize = 10;
/// `token_expiring` is sent this long before expiry.
const EXPIRY_WARNING: Duration = Duration::from_secs(60);
/// How often a live socket re-checks that its user is still enabled with the same role.
const USER_RECHECK: Duration = Duration::from_secs(2);

/// Subscribes and refreshes a second per connection, at most (`Connection::control`).
const CONTROL_RATE: f64 = 20.0;

/// Least time between two snapshots on one connection.
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

/// Snapshots built at once, server-wide (each copies and encodes every alarm).
pub const MAX_SNAPSHOT_BUILDS: usize = 2;

/// Whether `req` asks for a WebSocket upgrade (RFC 6455 §4.2.1).
pub fn is_upgrade<B>(req: &hyper::Request<B>) -> bool {
    let h = req.headers();
    let has = |name: &str, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    req.method() == hyper::Method::GET
        && has("connection", "upgrade")
        && has("upgrade", "websocket")
        && h.get("sec-websocket-key").is_some()
}

/// What the transport accepts beyond our own message limit: a message a little over the limit
/// is read whole and refused by our check (the stream stays in step); one further over is
/// refused by the transport as soon as its frame header announces the size, so the server
/// never buffers more than the limit and this margin.
const TRANSPORT_MARGIN: usize = 4 * 1024;

/// The size at which a connection's send buffer goes to the socket, and the longest message
/// that goes through it. tungstenite's send buffer is a `Vec` drained from the front: it keeps,
/// for the life of the connection, the capacity of the most it ever held, and with its defaults
/// (128 KiB written at once, any message size) every client that loaded a 6 MB snapshot of
/// 10,000 alarms kept 6 MB of the server's memory until it disconnected. A longer message (a
/// snapshot) is written straight to the socket as one frame (`write_frame`), after the buffer
/// is flushed: still one message per text frame (PROTOCOL.md), and the buffer never grows past
/// about twice this.
const MAX_FRAME_OUT: usize = 16 * 1024;

/// The transport configuration of every socket: small buffers (tungstenite's default 128 KiB
/// read buffer is filled at the first read; with 10,000 connections that alone is 1.3 GB; the
/// send side: `MAX_FRAME_OUT`), and a message limit just above ours (`TRANSPORT_MARGIN`);
/// either way an oversized message is closed with 1008.
fn transport_config(limit: usize) -> WebSocketConfig {
    let backstop = limit.saturating_add(TRANSPORT_MARGIN);
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(MAX_FRAME_OUT)
        .max_message_size(Some(backstop))
        .max_frame_size(Some(backstop))
}

/// When a connection's periodic duties are next due; one timer is armed for the earliest.
struct Due {
    ping: Instant,
    recheck: Instant,
    warn: Instant,
    expiry: Instant,
}

impl Due {
    fn new(now: Instant, ping_interval: Duration, expiry: Instant, lifetime: Duration) -> Self {
        let mut due = Due {
            ping: now + ping_interval,
            recheck: now + USER_RECHECK,
            warn: expiry,
            expiry,
        };
        due.set_expiry(expiry, lifetime);
        due
    }

    /// A refresh moved the expiry: the warning moves with it. It comes `EXPIRY_WARNING` before
    /// the expiry, or half the tokens' `lifetime` before it when they live less than twice that
    /// (`--token-ttl` may be 1 minute): otherwise every fresh token would be "expiring" at once,
    /// and a client that refreshes on each warning would spend its refresh budget in a second.
    fn set_expiry(&mut self, expiry: Instant, lifetime: Duration) {
        self.expiry = expiry;
        self.warn = expiry
            .checked_sub(EXPIRY_WARNING.min(lifetime / 2))
            .unwrap_or(expiry);
    }

    /// The earliest duty still to do (the warning only once per token).
    fn next(&self, warned: bool) -> Instant {
        let mut t = self.ping.min(self.recheck).min(self.expiry);
        if !warned {
            t = t.min(self.warn);
        }
        t
    }
}

/// Answers the upgrade request (101) and runs the connection once hyper hands the socket over.
///
/// `socket` must be the descriptor of the TCP stream `req` came on (the accept loop's): the
/// connection owns that stream once upgraded, so the descriptor stays its own while it runs,
/// and only asks the kernel about it (`SIOCOUTQ`, see `Drain`). `slot` is the connection's
/// place under `--max-connections`, held until the socket closes.
pub(crate) fn upgrade(
    state: State,
    mut req: hyper::Request<hyper::body::Incoming>,
    peer: Option<SocketAddr>,
    socket: Option<RawFd>,
    slot: Arc<Slot>,
) -> warp::reply::Response {
    // The connection's id in the logs, and its answer's `x-request-id` (as every HTTP answer).
    let conn_id = new_request_id();
    let (on_upgrade, resp) = match handshake(&mut req, &conn_id) {
        Ok(pair) => pair,
        Err(resp) => return *resp,
    };
    let headers = req.headers();
    let query = req.uri().query().unwrap_or("");
    let token = bearer(headers).map(str::to_string).or_else(|| {
        // A malformed query reads as no token: the socket is then closed with 4001.
        super::parse_query(query)
            .unwrap_or_default()
            .into_iter()
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v)
    });
    // Watching account changes from before the token check: a change after it is seen.
    let user_changes = state.auth.users.watch_changes();
    // Authentication happens before the upgrade completes, but a failure is reported by closing
    // the accepted socket with 4001: Qt's QWebSocket cannot read a rejected handshake.
    let auth = match token {
        None => Err(Denied::Missing),
        Some(t) => check_token(&state, &t),
    };
    let ip = super::client_ip(peer, headers, &state.settings.trusted_proxies);
    let ua = super::user_agent(headers);
    let config = transport_config(state.settings.ws_max_message);
    let span = tracing::info_span!("ws", conn = %conn_id, user = tracing::field::Empty, ip = ?ip);
    let counted = state.connections.enter();
    tokio::spawn(
        async move {
            let _counted = counted;
            let _slot = slot;
            let Some(socket) = upgraded(on_upgrade, socket, config).await else {
                return;
            };
            match auth {
                Err(denied) => {
                    tracing::info!(reason = denied.reason(), "websocket rejected");
                    let code = match denied {
                        Denied::Unavailable(_) => CLOSE_INTERNAL,
                        _ => CLOSE_UNAUTHORIZED,
                    };
                    reject(socket, code, denied.reason()).await
                }
                Ok(principal) => {
                    tracing::Span::current().record("user", principal.name.as_str());
                    let meta = ConnMeta { ip, ua };
                    Connection::new(state, principal, meta, user_changes)
                        .run(socket)
                        .await
                }
            }
        }
        .instrument(span),
    );
    resp
}

/// Answers an upgrade that came over `--max-connections` (`server::ConnectionLimit`): the
/// upgrade is accepted and the socket closed at once with 1013 (RFC 6455 "try again later"),
/// before any token check, for the reason PROTOCOL.md gives for 4001: a Qt client cannot read a
/// rejected handshake, and must be able to tell "server full, retry later" from "log in again".
pub(crate) fn upgrade_refused(
    mut req: hyper::Request<hyper::body::Incoming>,
    socket: Option<RawFd>,
    slot: Arc<Slot>,
    max_message: usize,
) -> warp::reply::Response {
    let (on_upgrade, resp) = match handshake(&mut req, &new_request_id()) {
        Ok(pair) => pair,
        Err(resp) => return *resp,
    };
    let config = transport_config(max_message);
    tokio::spawn(async move {
        let _slot = slot;
        if let Some(socket) = upgraded(on_upgrade, socket, config).await {
            reject(socket, CLOSE_TRY_AGAIN_LATER, "server full").await;
        }
    });
    resp
}

/// A request id, as the HTTP routes make them (12 hex characters).
pub(super) fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Checks an upgrade request's WebSocket version and builds the 101 answer, either carrying
/// `request_id` as `x-request-id`; the socket comes from the returned `OnUpgrade` once hyper
/// has sent it.
fn handshake(
    req: &mut hyper::Request<hyper::body::Incoming>,
    request_id: &str,
) -> Result<(hyper::upgrade::OnUpgrade, warp::reply::Response), Box<warp::reply::Response>> {
    let id = warp::http::HeaderValue::from_str(request_id).ok();
    let headers = req.headers();
    if headers
        .get("sec-websocket-version")
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        let mut resp =
            super::errors::ApiError::bad_request("unsupported WebSocket version (13 required)")
                .into_response();
        resp.headers_mut().insert(
            "sec-websocket-version",
            warp::http::HeaderValue::from_static("13"),
        );
        if let Some(id) = id {
            resp.headers_mut().insert("x-request-id", id);
        }
        return Err(Box::new(resp));
    }
    let accept = headers
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(req);
    let mut resp =
        warp::reply::with_status(warp::reply(), warp::http::StatusCode::SWITCHING_PROTOCOLS)
            .into_response();
    let h = resp.headers_mut();
    h.insert("upgrade", warp::http::HeaderValue::from_static("websocket"));
    h.insert(
        "connection",
        warp::http::HeaderValue::from_static("upgrade"),
    );
    if let Ok(v) = warp::http::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    if let Some(id) = id {
        h.insert("x-request-id", id);
    }
    Ok((on_upgrade, resp))
}

/// The WebSocket once hyper has handed the upgraded socket over (`None` if the upgrade failed).
async fn upgraded(
    on_upgrade: hyper::upgrade::OnUpgrade,
    socket: Option<RawFd>,
    config: WebSocketConfig,
) -> Option<WebSocket> {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            return None;
        }
    };
    let io = Tracked {
        io: hyper_util::rt::TokioIo::new(upgraded),
        progress: Arc::new(Progress::new()),
        socket,
        written: 0,
        waited: false,
        mid_frame: false,
    };
    Some(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
}

fn close_msg(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }))
}

/// Closes a socket that will not be served (no valid token, or the server is full) with `code`.
async fn reject(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_LINGER, socket.send(close_msg(code, reason))).await;
    // The client may already have sent frames (it had the 101): read them, or the close below
    // would reset the connection and could destroy the close frame on its way.
    closing_handshake(&mut socket, false).await;
}

/// How long the closing handshake may take (our Close out, the client's Close back).
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The longest a slow consumer's 4008 waits to be taken (`ws-idle-timeout` if shorter): the
/// connection keeps its place under `--max-connections` meanwhile, and a client frozen for
/// longer has most likely reconnected already.
const SLOW_CLOSE_LINGER_MAX: Duration = Duration::from_secs(60);

/// The closing handshake after our Close frame: read (and drop) what the client still sends
/// until its Close comes back, bounded by `CLOSE_LINGER`. Closing a TCP socket with unread
/// input sends a reset, which can destroy the answers and the Close frame still on their way
/// to the client. Once the frames no longer parse (`unreadable`: a read failed, e.g. the rest
/// of an oversized frame is still coming), the bytes are read raw and dropped until the client
/// closes.
async fn closing_handshake(socket: &mut WebSocket, mut unreadable: bool) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        let _ = SinkExt::close(&mut *socket).await;
        while !unreadable {
            match socket.next().await {
                Some(Ok(msg)) if msg.is_close() => return,
                Some(Ok(_)) => {}
                Some(Err(_)) => unreadable = true,
                None => return,
            }
        }
        // On the heap, and only now: a buffer in the future itself would make every
        // connection's task (which holds this future's state inline) 4 KiB larger for its
        // whole life; measured +3.1 KiB per idle connection.
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.get_mut().read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

struct ConnMeta {
    ip: Option<std::net::IpAddr>,
    ua: Option<String>,
}

/// Why the connection loop ended.
enum End {
    /// The peer closed or vanished.
    Gone,
    /// The peer was silent beyond the idle timeout: the socket is dropped.
    Dropped,
    /// We close with this code and reason.
    Close(u16, String),
}

struct Connection {
    state: State,
    principal: Principal,
    meta: ConnMeta,
    /// Commands waiting for the writer's decision, each resolving to its answer text. Polled in
    /// the connection's `select!`: no task and no channel per command. Bounded by the command
    /// rate limit and the writer's queue (`overloaded`).
    answers: FuturesUnordered<BoxFuture<'static, String>>,
    /// The subscription, polled directly in the connection's `select!` (it is cancel-safe):
    /// no task or channel between the broadcast and the socket.
    sub: Option<Subscription>,
    /// The `req` of the subscribe that started `sub`, echoed in its `snapshot` and `live`.
    sub_req: Req,
    malformed: VecDeque<Instant>,
    /// Commands: `--ws-command-rate` a second, burst the same.
    commands: TokenBucket,
    /// Subscribes and refreshes, which cost far more than a command (a subscribe starts a log
    /// read on the blocking pool, a refresh appends a security-log entry and syncs it): at most
    /// `CONTROL_RATE` a second, or the command rate if lower. A client needs one of each per
    /// connection and token lifetime; at the command rate (2,000 a second by default) one
    /// viewer could queue thousands of log reads a second by resubscribing.
    control: TokenBucket,
    expires_at: Instant,
    expires_at_text: String,
    warned: bool,
    /// A read failed (bad frame, oversized frame): what the client sends next no longer parses.
    unreadable: bool,
    /// When this connection last took a snapshot (`SNAPSHOT_INTERVAL` apart at least).
    last_snapshot: Option<Instant>,
    /// Account changes (`UserStore::watch_changes`): the user is re-checked at once after one,
    /// and before any message is handled once one happened.
    user_changes: tokio::sync::watch::Receiver<u64>,
}

impl Connection {
    fn new(
        state: State,
        principal: Principal,
        meta: ConnMeta,
        user_changes: tokio::sync::watch::Receiver<u64>,
    ) -> Self {
        let (expires_at, expires_at_text) = expiry(principal.claims.exp);
        let rate = f64::from(state.settings.ws_command_rate);
        Connection {
            state,
            principal,
            meta,
            answers: FuturesUnordered::new(),
            sub: None,
            sub_req: None,
            malformed: VecDeque::new(),
            commands: TokenBucket::full(rate, rate, std::time::Instant::now()),
            control: {
                let control = rate.min(CONTROL_RATE);
                TokenBucket::full(control, control, std::time::Instant::now())
            },
            expires_at,
            expires_at_text,
            warned: false,
            unreadable: false,
            last_snapshot: None,
            user_changes,
        }
    }

    /// The lifetime of the tokens this server issues (`--token-ttl`), for the expiry warning:
    /// what every refresh gives. A token from elsewhere with a shorter life may be warned at
    /// once the first time; the token it is refreshed into is the server's.
    fn token_lifetime(&self) -> Duration {
        self.state
            .auth
            .tokens
            .ttl()
            .to_std()
            .unwrap_or(EXPIRY_WARNING * 2)
    }

    /// Answers the commands this connection handed to the writer and has not answered yet,
    /// before a close (a shutdown's 1001, a 4001): they are committed, and a client without
    /// command_ids could not otherwise tell whether they were applied. The writer answers what
    /// it took within a commit; one stuck on the disk must not hold the close, so each answer
    /// gets the stall limit to come, and to go. False if the client could not take them.
    async fn answer_pending(&mut self, ws: &mut WebSocket) -> bool {
        let stall = self.state.settings.ws_stall_timeout;
        while let Ok(Some(answer)) = tokio::time::timeout(stall, self.answers.next()).await {
            if ws.get_ref().mid_frame || send(ws, vec![answer.into()], stall).await.is_err() {
                return false;
            }
        }
        true
    }

    async fn run(mut self, socket: WebSocket) {
        // A guard, not a decrement at the end: a task that unwinds must not leave the gauge up.
        let _counted = crate::metrics::GaugeGuard::enter(&self.state.metrics.ws_connections);
        tracing::info!(role = self.principal.role.as_str(), "websocket connected");
        let mut socket = socket;
        let end = self.serve(&mut socket).await;
        self.stop_subscription();
        // A token that expired or was revoked ends the connection, but commands it sent while
        // still valid were handed to the writer and are committed: answer them first (as a
        // shutdown does), or a client without command_ids could not tell whether they were
        // applied, and cannot ask again with the credentials it lost. Bounded by the stall
        // limit per answer.
        if let End::Close(CLOSE_UNAUTHORIZED, _) = &end {
            self.answer_pending(&mut socket).await;
        }
        // A long frame cut off part way (`write_frame`): nothing more may be written (a Close
        // frame would be read as part of it), so the socket is dropped; a client that
        // reconnects learns why (4001 at the upgrade if its user was revoked) and resumes.
        let mid_frame = socket.get_ref().mid_frame;
        // Whether to finish with the closing handshake: not after a Close that could not go out
        // (the client would get a Close without its code once it read on, which reads as a
        // normal end; dropped, it sees the connection cut, and learns why when it reconnects).
        let (how, handshake) = match end {
            End::Gone => ("peer gone".to_string(), !mid_frame),
            // No closing handshake: its Close (without a code) would reach a frozen client that
            // wakes up as a normal end; dropped, it sees the connection cut, and resumes.
            End::Dropped => ("silent beyond the idle timeout; dropped".to_string(), false),
            End::Close(code, reason) if mid_frame => {
                (format!("dropped mid-message: {code} {reason}"), false)
            }
            End::Close(code, reason) => {
                // A stalled client takes the Close only after the data queued before it: it
                // gets until the idle timeout (after which any silent peer is dropped; at most
                // a minute) to read on, instead of the 2 s linger, so that a client that
                // resumes reading gets the rest of its last frame and the 4008, not a cut frame
                // and a vanished socket.
                let linger = if code == CLOSE_SLOW_CONSUMER {
                    self.state
                        .settings
                        .ws_idle_timeout
                        .min(SLOW_CLOSE_LINGER_MAX)
                } else {
                    CLOSE_LINGER
                };
                let sent = tokio::time::timeout(linger, socket.send(close_msg(code, &reason)));
                let delivered = if code == CLOSE_SLOW_CONSUMER {
                    // Only the slow consumer's long wait is cut by a shutdown: the 1001 of a
                    // shutdown itself must still go out (within its 2 s).
                    let mut shutdown = self.state.shutdown.clone();
                    tokio::select! {
                        sent = sent => matches!(sent, Ok(Ok(()))),
                        _ = shutdown.wait_for(|stopping| *stopping) => false,
                    }
                } else {
                    matches!(sent.await, Ok(Ok(())))
                };
                if delivered {
                    (format!("closed {code} {reason}"), true)
                } else {
                    (
                        format!(
                            "{code} {reason}: the Close was not taken within {linger:?}; dropped"
                        ),
                        false,
                    )
                }
            }
        };
        if handshake {
            closing_handshake(&mut socket, self.unreadable).await;
        }
        tracing::info!(end = %how, "websocket disconnected");
    }

    /// The connection loop. The socket is not split into a sink and a stream: `select!` drops
    /// the branch futures (`ws.next()` among them) before a handler runs, so the handlers can
    /// write to the same socket, and no lock is taken per read and per write.
    async fn serve(&mut self, ws: &mut WebSocket) -> End {
        let settings = self.state.settings.clone();
        let stall = settings.ws_stall_timeout;
        let hello = protocol::hello(&Hello {
            ledger_id: self.state.ledger.info().ledger_id,
            head: self.state.ledger.head().offset,
            user: &self.principal.name,
            role: self.principal.role.as_str(),
            token_expires_at: self.expires_at_text.clone(),
            server_time: Timestamp::now(),
        });
        if send(ws, vec![hello.into()], stall).await.is_err() {
            return End::Gone;
        }
        let mut shutdown = self.state.shutdown.clone();
        // Created once: a `changed()` future made per iteration joined and left the shutdown
        // signal's waiter list (shared by every connection, behind a lock) once per event sent.
        let shutdown_signal = shutdown.changed();
        tokio::pin!(shutdown_signal);
        // The same for account changes, which repeat: a future that owns a receiver and hands
        // it back, re-armed only after it fired.
        let mut user_change = next_change(self.user_changes.clone());
        // One timer for the four periodic duties (ping + idle check, user re-check, expiry
        // warning, expiry), armed for the earliest: it is polled on every iteration, before the
        // socket and the subscription, so one timer costs one poll where four cost four.
        let mut due = Due::new(
            Instant::now(),
            settings.ws_ping_interval,
            self.expires_at,
            self.token_lifetime(),
        );
        let mut last_seen = Instant::now();
        let mut drain = Drain::new(last_seen);
        let timer = sleep_until(due.next(self.warned));
        tokio::pin!(timer);
        loop {
            if self.expires_at != due.expiry {
                due.set_expiry(self.expires_at, self.token_lifetime());
                timer.as_mut().reset(due.next(self.warned));
            }
            tokio::select! {
                biased;
                _ = &mut shutdown_signal => {
                    // Commands already handed to the writer are committed (it finishes its
                    // queue before it stops): answer them before closing, or a client that
                    // sent no command_id could not tell whether its command was applied.
                    if !self.answer_pending(ws).await {
                        return End::Gone;
                    }
                    return End::Close(CLOSE_GOING_AWAY, "server shutting down".into());
                }
                // Timers before frames and events: a long replay or a flooding client always
                // has a next chunk or frame ready, and must not hold off the ping, the idle
                // check, the user re-check or the token expiry.
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= due.expiry {
                        return End::Close(CLOSE_UNAUTHORIZED, "token expired".into());
                    }
                    if !self.warned && now >= due.warn {
                        self.warned = true;
                        let text = protocol::token_expiring(&self.expires_at_text);
                        if let Err(fail) = send(ws, vec![text.into()], stall).await {
                            return self.ended(fail);
                        }
                    }
                    if now >= due.recheck {
                        due.recheck = now + USER_RECHECK;
                        if let Some(end) = user_recheck(&self.state, &self.principal.claims) {
                            return end;
                        }
                    }
                    if now >= due.ping {
                        due.ping = now + settings.ws_ping_interval;
                        // Alive: a frame came in, or the peer worked through data queued to
                        // it (a slow reader of a long replay, whose pong waits behind it).
                        drain.observe(now, ws.get_mut().delivery());
                        if last_seen.max(drain.at).elapsed() > settings.ws_idle_timeout {
                            tracing::info!("peer silent beyond the idle timeout; dropping");
                            return End::Dropped;
                        }
                        if let Err(fail) = send_msg(ws, Message::Ping(Default::default()), stall).await {
                            return self.ended(fail);
                        }
                    }
                    timer.as_mut().reset(due.next(self.warned));
                }
                // An account changed: this user may have been disabled, demoted or given a new
                // password; re-check now rather than at the next periodic re-check.
                changed = &mut user_change => {
                    user_change = match changed {
                        Some(rx) => next_change(rx),
                        None => Box::pin(std::future::pending()),
                    };
                    if let Some(end) = user_recheck(&self.state, &self.principal.claims) {
                        return end;
                    }
                }
                // Polled only while a command waits (most connections are subscribers only),
                // and before new frames: answers that are ready go out before more commands
                // are read, so a client that pipelines cannot starve its own answers.
                Some(answer) = self.answers.next(), if !self.answers.is_empty() => {
                    if let Err(fail) = send(ws, vec![answer.into()], stall).await {
                        return self.ended(fail);
                    }
                }
                frame = ws.next() => {
                    let msg = match frame {
                        Some(Ok(msg)) => msg,
                        Some(Err(e)) => {
                            self.unreadable = true;
                            return read_failed(&e);
                        }
                        None => return End::Gone,
                    };
                    last_seen = Instant::now();
                    // Boxed: the frame handler's state (a subscribe, a snapshot build) would
                    // otherwise sit inline in every connection's task for its whole life.
                    if let Some(end) = Box::pin(self.on_frame(ws, msg)).await {
                        return end;
                    }
                }
                item = next_item(&mut self.sub) => {
                    match item {
                        Some(Ok(SubItem::Events(events))) => {
                            // Shared bytes: no copy per subscriber. They are UTF-8 by
                            // construction (JSON from a String); the check is a fast scan.
                            let texts: Vec<Utf8Bytes> = events
                                .iter()
                                .filter_map(|p| Utf8Bytes::try_from(p.wire().clone()).ok())
                                .collect();
                            // A replay chunk to a slow reader can take long: the token's
                            // expiry and the user re-check still apply meanwhile.
                            // (Live batches, at most 64 events, go the plain way: a timer
                            // per send to a thousand subscribers is not free.)
                            let sent = if texts.len() > crate::ledger::hub::MAX_EVENTS_PER_SLOT {
                                let (state, claims, expiry) =
                                    (&self.state, &self.principal.claims, due.expiry);
                                let watch = || duty_that_cannot_wait(state, claims, expiry);
                                Box::pin(send_watched(ws, texts, stall, watch)).await
                            } else {
                                send(ws, texts, stall).await
                            };
                            if let Err(fail) = sent {
                                return self.ended(fail);
                            }
                        }
                        Some(Ok(SubItem::Live { offset })) => {
                            if let Err(fail) = send(ws, vec![protocol::live(offset, &self.sub_req).into()], stall).await {
                                return self.ended(fail);
                            }
                        }
                        Some(Err(e)) => {
                            self.stop_subscription();
                            tracing::error!(error = %e, "subscription failed");
                            let text = protocol::error(&None, "internal", &format!("subscription failed: {e}"));
                            if send(ws, vec![text.into()], stall).await.is_err() {
                                return End::Gone;
                            }
                        }
                        None => self.stop_subscription(),
                    }
                }
            }
        }
    }

    fn ended(&self, fail: SendFail) -> End {
        match fail {
            SendFail::Gone => End::Gone,
            SendFail::Stalled => self.stalled(),
            SendFail::Ended(end) => end,
        }
    }

    fn stalled(&self) -> End {
        self.state.metrics.slow_consumer_closes.inc();
        tracing::warn!("client stalled beyond the limit; closing with 4008");
        End::Close(CLOSE_SLOW_CONSUMER, "slow consumer".into())
    }

    /// Handles one client frame; `Some(end)` ends the connection.
    async fn on_frame(&mut self, sink: &mut WebSocket, msg: Message) -> Option<End> {
        let stall = self.state.settings.ws_stall_timeout;
        if msg.is_close() {
            return Some(End::Gone);
        }
        if msg.is_ping() || msg.is_pong() {
            return None;
        }
        if msg.len() > self.state.settings.ws_max_message {
            return Some(End::Close(CLOSE_POLICY, "message too large".into()));
        }
        // A change of some account that this connection's loop has not looked at yet: the
        // user is re-checked before the message is handled, so nothing is done for a user
        // whose disable, demotion or new password has already been answered.
        if self.user_changes.has_changed().unwrap_or(false) {
            self.user_changes.mark_unchanged();
            if let Some(end) = user_recheck(&self.state, &self.principal.claims) {
                return Some(end);
            }
        }
        let Message::Text(text) = &msg else {
            return self
                .malformed(
                    sink,
                    &None,
                    "binary frames are not supported; send JSON text",
                )
                .await;
        };
        let (req, parsed) = match protocol::parse_client_message(text.as_str()) {
            Ok(x) => x,
            Err((req, bad)) => return self.malformed(sink, &req, &bad.0).await,
        };
        let reply = match parsed {
            ClientMessage::Ping {} => Some(protocol::pong(&req)),
            ClientMessage::Subscribe {
                from,
                ledger_id,
                from_hash,
                snapshot,
            } => {
                // A subscribe that starts a log read (or a snapshot of every alarm) spends the
                // connection's control budget (`subscribe`), so a subscribe flood cannot pile
                // up reads on the blocking pool.
                self.subscribe(&req, from, ledger_id, from_hash, snapshot)
                    .await
            }
            ClientMessage::Unsubscribe {} => {
                self.stop_subscription();
                Some(protocol::ok_plain(&req, Map::new()))
            }
            // A refresh appends a security-log entry (with a disk sync): the control budget, as
            // a subscribe (and the user's own refresh limit, `refresh`).
            ClientMessage::Refresh { token } => {
                Some(if self.control.take(std::time::Instant::now()).is_ok() {
                    self.refresh(&req, &token).await
                } else {
                    self.rate_limited(&req, "subscribes and refreshes")
                })
            }
            command => self.command(req, command),
        };
        if let Some(text) = reply {
            let sent = if text.len() > MAX_FRAME_OUT {
                // A snapshot (megabytes) to a slow reader takes as long as the reader takes: the
                // token's expiry and the user re-check still apply meanwhile.
                let (state, claims, expiry) =
                    (&self.state, &self.principal.claims, self.expires_at);
                let watch = || duty_that_cannot_wait(state, claims, expiry);
                Box::pin(send_watched(sink, vec![text.into()], stall, watch)).await
            } else {
                send(sink, vec![text.into()], stall).await
            };
            if let Err(fail) = sent {
                return Some(self.ended(fail));
            }
        }
        None
    }

    async fn malformed(&mut self, sink: &mut WebSocket, req: &Req, why: &str) -> Option<End> {
        let now = Instant::now();
        while self
            .malformed
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            self.malformed.pop_front();
        }
        self.malformed.push_back(now);
        self.state.metrics.rejected("bad_request");
        if self.malformed.len() > MALFORMED_PER_MINUTE {
            return Some(End::Close(
                CLOSE_POLICY,
                "too many malformed messages".into(),
            ));
        }
        let text = protocol::error(req, "bad_request", why);
        if let Err(fail) = send(
            sink,
            vec![text.into()],
            self.state.settings.ws_stall_timeout,
        )
        .await
        {
            return Some(self.ended(fail));
        }
        None
    }

    async fn subscribe(
        &mut self,
        req: &Req,
        from: u64,
        ledger_id: Option<uuid::Uuid>,
        from_hash: Option<String>,
        snapshot: bool,
    ) -> Option<String> {
        // A refused subscribe leaves the current subscription running; an accepted one
        // replaces it (below).
        // A malformed hash is a client bug, not a diverged history: `ledger_mismatch` would tell
        // the client to drop its state.
        if let Some(h) = from_hash.as_deref().filter(|_| !snapshot) {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(protocol::error(
                    req,
                    "bad_request",
                    "from_hash must be 64 hexadecimal digits (the hash of the event at from)",
                ));
            }
        }
        let ledger = self.state.ledger.clone();
        let ours = ledger.info().ledger_id;
        // A snapshot replaces whatever the client held, so its old ledger_id does not matter:
        // that is exactly how a client recovers from `ledger_mismatch`.
        if let Some(theirs) = ledger_id.filter(|_| !snapshot) {
            if theirs != ours {
                return Some(protocol::error(
                    req,
                    "ledger_mismatch",
                    &format!("this is ledger {ours}, not {theirs}: drop local state and resubscribe with snapshot:true"),
                ));
            }
        }
        let (sub, first) = if snapshot {
            // A snapshot copies every alarm under the read model's lock (which the writer
            // needs) and encodes them all: at most one per connection per `SNAPSHOT_INTERVAL`,
            // `MAX_SNAPSHOT_BUILDS` at once server-wide, built on the blocking pool, not on the
            // event loop.
            if self
                .last_snapshot
                .is_some_and(|t| t.elapsed() < SNAPSHOT_INTERVAL)
            {
                return Some(self.refuse(
                    req,
                    "rate_limited",
                    "at most one snapshot per second per connection",
                ));
            }
            // Not waited for: a connection waiting here would answer nothing (pings, shutdown).
            // Taken before the budget: a refusal that builds nothing costs nothing.
            let Ok(permit) = self.state.snapshot_builds.clone().try_acquire_owned() else {
                return Some(self.refuse(
                    req,
                    "overloaded",
                    "other snapshots are being built; retry shortly",
                ));
            };
            if self.control.take(std::time::Instant::now()).is_err() {
                return Some(self.rate_limited(req, "subscribes and refreshes"));
            }
            self.last_snapshot = Some(Instant::now());
            let l = ledger.clone();
            let echo = req.clone();
            let built = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let (offset, alarms, sub) = l.subscribe_with_snapshot();
                (sub, protocol::snapshot(offset, &alarms, &echo))
            })
            .await;
            match built {
                Ok((sub, Ok(text))) => (sub, Some(text)),
                Ok((_, Err(why))) => {
                    tracing::error!(error = %why, "snapshot message not written");
                    return Some(protocol::error(req, "internal", "snapshot failed"));
                }
                Err(why) => {
                    tracing::error!(error = %why, "snapshot build failed");
                    return Some(protocol::error(req, "internal", "snapshot failed"));
                }
            }
        } else {
            let head = ledger.head().offset;
            if from > head {
                return Some(protocol::error(
                    req,
                    "offset_out_of_range",
                    &format!("from {from} is beyond the head {head}"),
                ));
            }
            // Refusals above cost nothing; from here on the subscribe reads the log.
            if self.control.take(std::time::Instant::now()).is_err() {
                return Some(self.rate_limited(req, "subscribes and refreshes"));
            }
            if let Some(h) = from_hash {
                let l = ledger.clone();
                let stored = tokio::task::spawn_blocking(move || l.hash_at(from)).await;
                match stored {
                    Ok(Ok(Some(stored))) if stored.to_hex() == h.to_ascii_lowercase() => {}
                    Ok(Ok(_)) => {
                        return Some(protocol::error(
                            req,
                            "ledger_mismatch",
                            &format!("the event at offset {from} has another hash here: the history diverged (restored backup?); drop local state and resubscribe with snapshot:true"),
                        ))
                    }
                    _ => {
                        return Some(protocol::error(req, "internal", "cannot read the log"));
                    }
                }
            }
            (ledger.subscribe(from), None)
        };
        self.stop_subscription();
        self.sub = Some(sub);
        self.sub_req = req.clone();
        first
    }

    fn stop_subscription(&mut self) {
        self.sub = None;
    }

    async fn refresh(&mut self, req: &Req, token: &str) -> String {
        match check_token(&self.state, token) {
            Ok(p) if p.name == self.principal.name => {
                if let Err(wait) = self
                    .state
                    .auth
                    .refreshes
                    .take(&p.name, std::time::Instant::now())
                {
                    return self.refuse(
                        req,
                        "rate_limited",
                        &format!(
                            "too many token refreshes for this user; retry in {} s",
                            (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
                        ),
                    );
                }
                let mut e = NewSecurityEntry::new(SecurityAction::TokenRefreshed)
                    .actor(p.name.clone())
                    .target(p.name.clone())
                    .detail("via", "websocket");
                if let Some(ip) = self.meta.ip {
                    e = e.address(ip.to_string());
                }
                if let Some(ua) = &self.meta.ua {
                    e = e.user_agent(ua.clone());
                }
                // Recorded (durably) before the new token takes effect; if the entry cannot be
                // written, the refresh is refused and the old token keeps its expiry.
                if let Err(e) = super::admin::record(&self.state, e).await {
                    return protocol::error(req, e.code, &e.message);
                }
                let (at, text) = expiry(p.claims.exp);
                self.expires_at = at;
                self.expires_at_text = text.clone();
                self.warned = false;
                self.principal = p;
                let mut extra = Map::new();
                extra.insert("token_expires_at".into(), json!(text));
                protocol::ok_plain(req, extra)
            }
            Ok(_) => protocol::error(req, "unauthorized", "the new token is for another user"),
            Err(Denied::Unavailable(_)) => {
                protocol::error(req, "internal", "refresh refused: user storage unavailable")
            }
            Err(d) => protocol::error(
                req,
                "unauthorized",
                &format!("refresh refused: {}", d.reason()),
            ),
        }
    }

    /// Starts a command; its answer arrives later through `answers`.
    fn command(&mut self, req: Req, msg: ClientMessage) -> Option<String> {
        if !self.principal.role.can_command() {
            return Some(self.refuse(&req, "forbidden", "viewers cannot send commands"));
        }
        if self.commands.take(std::time::Instant::now()).is_err() {
            return Some(self.rate_limited(&req, "commands"));
        }
        let cmd = match protocol::command_of(msg, &self.principal.name) {
            Some(Ok(cmd)) => cmd,
            Some(Err(bad)) => {
                return Some(self.refuse(&req, "bad_request", &bad.0));
            }
            None => return Some(protocol::error(&req, "bad_request", "not a command")),
        };
        // Enter the write queue here, so that commands pipelined on one connection are decided
        // in the order they were sent; only the wait is deferred. (If the connection ends first,
        // the command still completes; a retry with its command_id answers `duplicate`.)
        let queued = self.state.ledger.enqueue(cmd);
        self.answers.push(Box::pin(async move {
            let outcome = match queued {
                Ok(rx) => crate::ledger::Ledger::outcome(rx).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(o) => protocol::ok_value(&req, o.offset, o.alarm_id, o.already, o.duplicate)
                    .to_string(),
                Err(e) => {
                    if matches!(e, CommandError::Storage(_) | CommandError::NotApplied(_)) {
                        tracing::error!(error = %e, "command failed on storage");
                    }
                    protocol::error(&req, e.code(), &e.to_string())
                }
            }
        }));
        None
    }

    /// A refusal: counted in `commands_rejected_total{code}`, answered as an `error`.
    fn refuse(&self, req: &Req, code: &str, message: &str) -> String {
        self.state.metrics.rejected(code);
        protocol::error(req, code, message)
    }

    /// The answer to a command, subscribe or refresh beyond the connection's budget (`what`).
    fn rate_limited(&self, req: &Req, what: &str) -> String {
        self.refuse(
            req,
            "rate_limited",
            &format!("too many {what} on this connection; slow down"),
        )
    }
}

/// How a failed read ends the connection. The transport refused what the client sent: a
/// message or frame over its size limit is still "a message over the size limit" (1008), a text
/// frame that is not UTF-8 is 1007, any other violation of RFC 6455 is 1002. Otherwise the
/// connection broke and there is nobody to tell.
fn read_failed(e: &WsError) -> End {
    match e {
        WsError::Capacity(_) => End::Close(CLOSE_POLICY, "message too large".into()),
        WsError::Utf8(_) => End::Close(
            CLOSE_INVALID_PAYLOAD,
            "text frame is not valid UTF-8".into(),
        ),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        WsError::Protocol(p) => {
            tracing::info!(error = %p, "websocket protocol violation");
            End::Close(CLOSE_PROTOCOL, "protocol error".into())
        }
        _ => End::Gone,
    }
}

/// The next subscription item (`None`: the ledger is shutting down), or pending forever when
/// not subscribed.
async fn next_item(sub: &mut Option<Subscription>) -> Option<Result<SubItem, String>> {
    match sub {
        Some(sub) => sub.next().await.map_err(|e| e.to_string()).transpose(),
        None => std::future::pending().await,
    }
}

/// Why a write to the client failed.
enum SendFail {
    /// The connection broke.
    Gone,
    /// The client did not take the data within the stall limit.
    Stalled,
    /// A duty that cannot wait for the write's end (token expiry, a revoked user) ended the
    /// connection mid-write (`send_watched`).
    Ended(End),
}

/// Feeds the texts and flushes once; `Stalled` once the client took no bytes for the stall
/// limit. A slow reader that keeps taking bytes is not stalled, however long the whole
/// (replay chunk of up to 1,024 events) takes.
async fn send(ws: &mut WebSocket, texts: Vec<Utf8Bytes>, stall: Duration) -> Result<(), SendFail> {
    let progress = ws.get_ref().progress.clone();
    unless_stalled(stall, &progress, feed_all(ws, texts)).await
}

/// The texts as one text frame each, then one flush. One longer than `MAX_FRAME_OUT` is written
/// straight to the socket (`write_frame`), not through tungstenite's send buffer.
async fn feed_all(ws: &mut WebSocket, texts: Vec<Utf8Bytes>) -> Result<(), WsError> {
    for t in texts {
        if t.len() <= MAX_FRAME_OUT {
            ws.feed(Message::text(t)).await?;
        } else {
            // What tungstenite holds goes first (frames stay in order, and a pending pong).
            ws.flush().await?;
            write_frame(ws.get_mut(), t.as_str().as_bytes()).await?;
        }
    }
    ws.flush().await
}

/// The header of an unmasked, final text frame of `len` bytes (RFC 6455 §5.2; a server's frames
/// are not masked).
fn text_frame_header(len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(10);
    h.push(0x81); // FIN + text
    if len < 126 {
        h.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        h.push(126);
        h.extend_from_slice(&short.to_be_bytes());
    } else {
        h.push(127);
        h.extend_from_slice(&(len as u64).to_be_bytes());
    }
    h
}

/// Writes `payload` as one text frame straight to the socket. `Tracked::mid_frame` is set until
/// the frame is complete: a write abandoned part way (the client stalled, or its user was
/// revoked meanwhile) leaves the stream inside a frame, where no other frame (our Close) may
/// follow, so the connection is then dropped without one (`Connection::run`).
async fn write_frame(io: &mut Tracked, payload: &[u8]) -> Result<(), WsError> {
    use tokio::io::AsyncWriteExt;
    io.mid_frame = true;
    io.write_all(&text_frame_header(payload.len())).await?;
    io.write_all(payload).await?;
    io.flush().await?;
    io.mid_frame = false;
    Ok(())
}

async fn send_msg(ws: &mut WebSocket, msg: Message, stall: Duration) -> Result<(), SendFail> {
    let progress = ws.get_ref().progress.clone();
    unless_stalled(stall, &progress, ws.send(msg)).await
}

/// `send` for a long write (a replay chunk of up to 1,024 events to a slow reader takes as long
/// as the reader takes): every `USER_RECHECK` while it runs, `watch` says whether a duty that
/// cannot wait ends the connection now. Ending mid-write is safe: part of the chunk went out,
/// and the client resumes from the last offset it got.
async fn send_watched(
    ws: &mut WebSocket,
    texts: Vec<Utf8Bytes>,
    stall: Duration,
    mut watch: impl FnMut() -> Option<End>,
) -> Result<(), SendFail> {
    let progress = ws.get_ref().progress.clone();
    let write = unless_stalled(stall, &progress, feed_all(ws, texts));
    tokio::pin!(write);
    loop {
        match tokio::time::timeout(USER_RECHECK, &mut write).await {
            Ok(done) => return done,
            Err(_) => {
                if let Some(end) = watch() {
                    return Err(SendFail::Ended(end));
                }
            }
        }
    }
}

/// The token's expiry, or a revoked / disabled user: what must end a connection even in the
/// middle of a long write. (Not shutdown: the connection answers the commands it handed to the
/// writer before it closes, so it finishes the write; the shutdown drain is bounded anyway.)
fn duty_that_cannot_wait(
    state: &State,
    claims: &crate::auth::token::Claims,
    expiry: Instant,
) -> Option<End> {
    if Instant::now() >= expiry {
        return Some(End::Close(CLOSE_UNAUTHORIZED, "token expired".into()));
    }
    user_recheck(state, claims)
}

/// Resolves at the next change of any account (`UserStore::watch_changes`) with the receiver to
/// wait for the one after; `None` once the store is gone.
type NextChange = Pin<Box<dyn std::future::Future<Output = Option<UserChanges>> + Send>>;
type UserChanges = tokio::sync::watch::Receiver<u64>;

fn next_change(mut rx: UserChanges) -> NextChange {
    Box::pin(async move { rx.changed().await.ok().map(|()| rx) })
}

/// The periodic user re-check: `Some` closes the connection (4001 for a disabled, changed or
/// removed user; 1011 when the user record cannot be read).
fn user_recheck(state: &State, claims: &crate::auth::token::Claims) -> Option<End> {
    match state.auth.users.check_token_still_valid(claims) {
        Ok(_) => None,
        Err(e) if e.is_client_fault() => Some(End::Close(
            CLOSE_UNAUTHORIZED,
            match e {
                crate::auth::AuthError::TokenRevoked => e.to_string(),
                e => format!("token revoked: {e}"),
            },
        )),
        Err(e) => {
            tracing::error!(error = %e, "user re-check failed");
            Some(End::Close(CLOSE_INTERNAL, "internal error".into()))
        }
    }
}

/// Runs a write to the client to its end, unless the client stalls: no byte taken for `stall`
/// since the write began or since the kernel last took bytes, whichever is later. The deadline
/// moves with every progress; the loop ends at the first deadline without any.
async fn unless_stalled(
    stall: Duration,
    progress: &Progress,
    write: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), SendFail> {
    let began = Instant::now();
    tokio::pin!(write);
    loop {
        let deadline = progress.last().max(began) + stall;
        match tokio::time::timeout_at(deadline, &mut write).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => return Err(SendFail::Gone),
            Err(_) if progress.last().max(began) + stall <= Instant::now() => {
                return Err(SendFail::Stalled)
            }
            // Bytes went out meanwhile: wait on from the new deadline.
            Err(_) => {}
        }
    }
}

/// When the kernel last took bytes written to a connection (nanoseconds since `base`).
struct Progress {
    base: Instant,
    last_write: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            base: Instant::now(),
            last_write: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_write.store(ns, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last_write.load(Ordering::Relaxed))
    }
}

/// The upgraded connection under tungstenite, noting every write that moved bytes (the stall
/// limit is time without progress), the bytes written and whether a write found the send
/// buffer full (the idle check's `Delivery`).
struct Tracked {
    io: hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>,
    progress: Arc<Progress>,
    /// The TCP socket under `io` (owned by it, so valid while `io` lives), to ask the kernel how
    /// much of what was written the peer has acknowledged.
    socket: Option<RawFd>,
    /// Bytes the kernel took from this connection's writes.
    written: u64,
    /// A write found the send buffer full since the last `delivery()`.
    waited: bool,
    /// A frame written straight to the socket is incomplete (`write_frame`).
    mid_frame: bool,
}

/// How far the peer is through what was written to it.
#[derive(Clone, Copy, Debug)]
struct Delivery {
    /// Bytes written here and acknowledged by the peer's TCP: an estimate, `written` minus
    /// `SIOCOUTQ`, which also counts what hyper wrote before the upgrade (the 101 answer) until
    /// it is acknowledged, hence the saturating subtraction.
    acked: u64,
    /// Bytes written and not acknowledged yet (sent or still in the send buffer).
    queued: u64,
    /// A write found the send buffer full since the previous sample.
    waited: bool,
}

impl Tracked {
    fn wrote(&mut self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.progress.mark();
                self.written += *n as u64;
            }
            Poll::Pending => self.waited = true,
            Poll::Ready(_) => {}
        }
    }

    /// A sample of the peer's progress; `None` where the kernel cannot tell (not Linux, no
    /// socket, a failed call).
    fn delivery(&mut self) -> Option<Delivery> {
        let waited = std::mem::take(&mut self.waited);
        let queued = unacknowledged_bytes(self.socket?)?;
        Some(Delivery {
            acked: self.written.saturating_sub(queued),
            queued,
            waited,
        })
    }
}

/// Bytes in a TCP socket's send queue, not yet acknowledged by the peer (`SIOCOUTQ`, tcp(7)).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn unacknowledged_bytes(socket: RawFd) -> Option<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: `socket` is a TCP socket owned by the connection calling this, open for as long
    // as it lives; SIOCOUTQ (= TIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut queued as *mut libc::c_int) };
    (rc == 0).then(|| u64::try_from(queued).ok()).flatten()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn unacknowledged_bytes(_socket: RawFd) -> Option<u64> {
    None
}

/// Whether a peer that sends nothing is working through what was queued to it, sampled at each
/// ping: its pong waits behind every byte queued before the ping (megabytes during a long
/// replay: seconds to minutes for a slow reader), and the connection reads no frame while a
/// write to it is in progress, so a frame from it is not the only proof of life.
///
/// The peer counts as alive at a sample if it has acknowledged more since the previous one
/// while there was a backlog: at least `BACKLOG` bytes unacknowledged at the previous sample,
/// or a write that found the send buffer full in between. Acknowledgements alone prove little:
/// a hung client's kernel acknowledges pings and live events until its receive buffer is full,
/// and on a long link a few KiB are unacknowledged at any moment. A backlog builds up only
/// once the client's window limits the sender, and then acknowledgements come as the client
/// reads; when its window closes nothing moves, and the idle timeout (or the stall limit,
/// during a write) applies. Linux only (`SIOCOUTQ`); elsewhere only frames count.
struct Drain {
    /// When the peer last made such progress (the connection's start if never).
    at: Instant,
    acked: u64,
    waiting: bool,
}

/// Unacknowledged bytes that make a backlog (see `Drain`): far more than a round trip of live
/// events (a few KiB at 1,000 events/s on a 10 ms link), less than a socket buffer.
const BACKLOG: u64 = 64 * 1024;

impl Drain {
    fn new(now: Instant) -> Self {
        Drain {
            at: now,
            acked: 0,
            waiting: false,
        }
    }

    fn observe(&mut self, now: Instant, sample: Option<Delivery>) {
        let Some(d) = sample else { return };
        if (self.waiting || d.waited) && d.acked > self.acked {
            self.at = now;
        }
        self.acked = d.acked;
        self.waiting = d.queued >= BACKLOG;
    }
}

impl tokio::io::AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The token's expiry as a tokio instant and as RFC 3339 text.
fn expiry(exp: i64) -> (Instant, String) {
    let now = chrono::Utc::now().timestamp_millis();
    let left = (exp.saturating_mul(1000) - now).max(0) as u64;
    (
        Instant::now() + Duration::from_millis(left),
        Timestamp(exp.saturating_mul(1000)).to_rfc3339(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    /// What tungstenite (a client's parser) reads from `text_frame_header` and the payload.
    fn parsed(len: usize) -> (FrameHeader, u64) {
        let mut bytes = text_frame_header(len);
        bytes.extend(std::iter::repeat_n(b'x', len));
        let mut cursor = std::io::Cursor::new(bytes);
        FrameHeader::parse(&mut cursor)
            .unwrap()
            .expect("a whole header")
    }

    /// `token_expiring` is due 60 s before the expiry, or half-way for a token that lives less
    /// than 2 minutes (never at once, which made a client refreshing on each warning loop).
    #[test]
    fn the_expiry_warning_comes_a_minute_before_or_half_way() {
        let now = Instant::now();
        let s = Duration::from_secs;
        // Fresh tokens of each lifetime: the warning, from now.
        let warn = |ttl: u64| {
            Due::new(now, s(20), now + s(ttl), s(ttl))
                .warn
                .saturating_duration_since(now)
        };
        assert_eq!(warn(900), s(840));
        assert_eq!(warn(120), s(60));
        assert_eq!(warn(90), s(45));
        assert_eq!(warn(60), s(30));
        // A 15-minute token with 30 s left when the socket opens: warned at once.
        let late = Due::new(now, s(20), now + s(30), s(900));
        assert!(late.warn <= now);
        // A 1-minute token refreshed: the new one is warned 30 s before its end, not at once.
        let mut due = Due::new(now, s(20), now + s(60), s(60));
        due.set_expiry(now + s(90), s(60));
        assert_eq!(due.warn.saturating_duration_since(now), s(60));
    }

    #[test]
    fn a_frame_written_straight_to_the_socket_is_one_final_unmasked_text_frame() {
        for len in [0, 125, 126, 16 * 1024 + 1, 65_535, 65_536, 6_000_000] {
            let (header, payload_len) = parsed(len);
            assert_eq!(payload_len, len as u64, "length {len}");
            assert!(header.is_final, "length {len}");
            assert_eq!(header.opcode, OpCode::Data(Data::Text), "length {len}");
            assert!(header.mask.is_none(), "length {len}");
        }
    }
}
