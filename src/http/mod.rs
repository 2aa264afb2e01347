//! HTTP and WebSocket API v1 (PROTOCOL.md) on warp 0.4.
//!
//! `server.rs` accepts connections (hyper 1) and hands WebSocket upgrades of `/api/v1/ws` to
//! `ws.rs`; every other request goes to one catch-all warp filter that reads it (method, path,
//! query, headers, bounded body, peer) and `dispatch` matches `(method, path segments)` to a
//! handler: the route table is one `match` you can read in one sitting, and request logging,
//! request ids and metrics live in one place.

pub mod admin;
pub mod commands;
pub mod errors;
pub mod health;
pub mod queries;
pub mod server;
pub mod session;
pub mod stream;
pub mod ws;

use crate::auth::{
    security_log::SecurityLog, throttle::LoginThrottle, token::TokenService, users::UserStore,
};
use crate::ledger::Ledger;
use crate::metrics::{HttpLabel, Metrics};
use bytes::Bytes;
use errors::ApiError;
use futures_util::StreamExt;
use ipnet::IpNet;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, Method};
use warp::reply::Response;
use warp::{Filter, Reply};

/// Largest HTTP request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// Users, tokens, throttle and security log, shared by HTTP and WebSocket handlers.
pub struct AuthCtx {
    pub users: UserStore,
    pub tokens: TokenService,
    pub throttle: LoginThrottle,
    pub security: SecurityLog,
    /// Where password checks run (PBKDF2, ~150 ms of CPU each).
    pub hasher: Hasher,
    /// Token refreshes per user (HTTP and WebSocket): each one is a synced security-log entry.
    pub refreshes: crate::auth::throttle::PerUserLimit,
    /// Audited reads per user (history, event export, past state, security log): each is a
    /// synced security-log entry.
    pub audit_reads: crate::auth::throttle::PerUserLimit,
}

type HashJob = Box<dyn FnOnce() + Send>;

/// A few lowest-priority threads (`SCHED_IDLE`; all cores but one) for password hashing: a burst of
/// logins queues here (bounded) and yields the CPU to the writer and the WebSocket fan-out
/// instead of starving them.
pub struct Hasher {
    tx: std::sync::mpsc::Sender<HashJob>,
    /// Jobs queued or running; beyond `MAX_PENDING_HASHES` a login gets `overloaded` (503 +
    /// Retry-After) instead of waiting for seconds in an unbounded queue.
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

/// Password checks queued at most (~150 ms each per hashing thread).
pub const MAX_PENDING_HASHES: usize = 32;

impl Hasher {
    pub fn start() -> std::io::Result<Hasher> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1).max(1))
            .unwrap_or(1);
        let (tx, rx) = std::sync::mpsc::channel::<HashJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || {
                    crate::background::lowest_priority();
                    loop {
                        let job = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // all senders gone: shutting down
                        }
                    }
                })?;
        }
        Ok(Hasher {
            tx,
            pending: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    /// Runs `f` on a hashing thread and waits for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        use std::sync::atomic::Ordering;
        if self.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_HASHES {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::overloaded(
                "too many logins in progress; retry shortly",
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pending = self.pending.clone();
        let sent = self.tx.send(Box::new(move || {
            let _ = tx.send(f());
            pending.fetch_sub(1, Ordering::SeqCst);
        }));
        if sent.is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::internal("password hashing unavailable"));
        }
        rx.await
            .map_err(|_| ApiError::internal("password hashing failed"))
    }
}

/// Settings of the API layer (validated in `config`).
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub ws_ping_interval: Duration,
    pub ws_idle_timeout: Duration,
    pub ws_max_message: usize,
    pub ws_stall_timeout: Duration,
    pub ws_command_rate: u32,
    pub trusted_proxies: Vec<IpNet>,
    pub data_dir: PathBuf,
}

pub struct AppState {
    pub ledger: Arc<Ledger>,
    /// The sled database of the data directory (auxiliary trees, copied by backups).
    pub db: sled::Db,
    pub auth: Arc<AuthCtx>,
    pub settings: ApiSettings,
    pub metrics: Arc<Metrics>,
    /// Flips to `true` once at shutdown: sockets close with 1001, streams end.
    pub shutdown: watch::Receiver<bool>,
    /// Cleared at shutdown so `/readyz` turns 503 before the listener closes.
    pub accepting: AtomicBool,
    /// Open client connections under `--max-connections` (the accept loop's).
    pub connection_limit: Arc<server::ConnectionLimit>,
    /// Live WebSocket connections: shutdown waits for them (they answer the commands they
    /// already sent to the writer, then close with 1001) before it stops the writer.
    pub connections: Arc<Connections>,
    /// Permits of the streamed answers (`stream::MAX_STREAMS`): each holds a blocking thread.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// `/readyz`'s disk check, shared and rate-limited.
    pub disk_probe: health::DiskProbe,
    /// HTTP handlers running (detached from their connections): shutdown waits for them.
    pub handlers: Arc<Connections>,
    /// Permits of WebSocket snapshot builds (`ws::MAX_SNAPSHOT_BUILDS`).
    pub snapshot_builds: Arc<tokio::sync::Semaphore>,
    /// Permits of past-state reconstructions (`queries::MAX_AS_OF_BUILDS`).
    pub as_of_builds: Arc<tokio::sync::Semaphore>,
    /// Current-state answers (`GET /api/v1/alarms`), built one at a time and shared.
    pub current_state: queries::CurrentState,
    /// Held by a user change from its write to its security-log entry, and by an online backup
    /// while it takes the security log's head and the users: the copy never holds a user change
    /// without its entry (or an entry without its change).
    pub user_changes: tokio::sync::Mutex<()>,
    /// Held by the online backup running (`POST /api/v1/admin/backup`): one at a time.
    pub backup_running: Arc<tokio::sync::Mutex<()>>,
}

/// Counts live tasks that shutdown waits for: WebSocket connections (spawned apart from the
/// HTTP server's) and detached HTTP handlers.
#[derive(Default)]
pub struct Connections {
    live: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Connections {
    /// Counts a connection until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> ConnectionGuard {
        self.live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ConnectionGuard(self.clone())
    }

    /// Resolves once no connection is live.
    pub async fn all_closed(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check: a close between the check and the await still wakes.
            changed.as_mut().enable();
            if self.live.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            changed.await;
        }
    }
}

pub struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self
            .0
            .live
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.changed.notify_waiters();
        }
    }
}

pub type State = Arc<AppState>;

/// A parsed HTTP request as handlers see it.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: Option<SocketAddr>,
    pub request_id: String,
}

impl Request {
    /// The client address: the socket peer, or the `X-Forwarded-For` client when the peer is a
    /// trusted proxy.
    pub fn client_ip(&self, state: &AppState) -> Option<IpAddr> {
        client_ip(self.peer, &self.headers, &state.settings.trusted_proxies)
    }

    pub fn user_agent(&self) -> Option<String> {
        user_agent(&self.headers)
    }

    /// The query's parameters, decoded; a name given twice is refused (which one would count
    /// is a guess the client should not have to make).
    pub fn query_pairs(&self) -> Result<Vec<(String, String)>, ApiError> {
        let pairs = parse_query(&self.query).map_err(ApiError::bad_request)?;
        let mut seen = std::collections::HashSet::with_capacity(pairs.len());
        for (k, _) in &pairs {
            if !seen.insert(k.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "parameter {k:?} is given more than once"
                )));
            }
        }
        Ok(pairs)
    }

    /// The body as JSON; an empty body reads as `{}`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        crate::protocol::from_strict_json(body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// `X-Forwarded-For` is believed only from trusted proxies; walking it right to left, the first
/// address that is not itself a trusted proxy is the client. Every `X-Forwarded-For` line counts,
/// in order (a proxy may add a line of its own instead of appending to the client's, and the
/// client's line then comes first). Addresses are compared in canonical form, so an IPv4 proxy
/// seen through a dual-stack socket (`::ffff:10.0.0.1`) matches `10.0.0.0/8`. A hop may carry a
/// port (`1.2.3.4:5678`, `[2001:db8::1]:443`), as some proxies write it.
pub fn client_ip(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer?.ip().to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    // No header: no hops, and the walk below leaves the peer as the client.
    let mut hops = Vec::new();
    for line in headers.get_all("x-forwarded-for") {
        // A line that is not ASCII cannot be walked: stop at the proxy, as for any bad hop.
        let Ok(line) = line.to_str() else {
            return Some(peer);
        };
        hops.extend(line.split(','));
    }
    let mut client = peer;
    for part in hops.iter().rev() {
        match parse_hop(part) {
            Some(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            None => break,
        }
    }
    Some(client)
}

/// One `X-Forwarded-For` element: an address, optionally with a port, an IPv6 one optionally
/// in brackets without a port (`[2001:db8::1]`, as RFC 7239 writes it and some proxies copy).
fn parse_hop(part: &str) -> Option<IpAddr> {
    let part = part.trim();
    let bracketed = part
        .strip_prefix('[')
        .and_then(|p| p.strip_suffix(']'))
        .and_then(|p| p.parse::<std::net::Ipv6Addr>().ok())
        .map(IpAddr::V6);
    let ip = part
        .parse::<IpAddr>()
        .ok()
        .or(bracketed)
        .or_else(|| part.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(ip.to_canonical())
}

/// Splits and decodes a query string. A malformed escape (`%` not followed by two hex digits)
/// or a name or value that is not UTF-8 once decoded is refused, never guessed at.
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decoding. A `+` stays a `+` (not a space): no parameter of this API contains spaces,
/// and clients such as Qt's QUrlQuery send the `+` of a time offset (`+02:00`) unencoded.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_digit);
            let lo = bytes.get(i + 2).copied().and_then(hex_digit);
            match (hi, lo) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                _ => {
                    return Err(format!(
                        "malformed percent-escape in the query string near {:?}",
                        String::from_utf8_lossy(&bytes[i..bytes.len().min(i + 3)])
                    ))
                }
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the query string does not decode to UTF-8".to_string())
}

/// The body length the request declares (`Content-Length`), if it declares one that parses.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(warp::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads the body, refusing more than `MAX_BODY` bytes, or one not complete by `deadline`
/// (`server::BodyDeadline`; `HEADER_READ_TIMEOUT` from now where the accept loop set none).
async fn read_body(
    mut body: impl futures_util::Stream<Item = Result<impl bytes::Buf, warp::Error>> + Unpin,
    deadline: Option<server::BodyDeadline>,
) -> Result<Bytes, ApiError> {
    let deadline = deadline.map_or_else(
        || tokio::time::Instant::now() + server::HEADER_READ_TIMEOUT,
        |d| d.0,
    );
    let mut out = bytes::BytesMut::new();
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, body.next()).await else {
            return Err(ApiError::bad_request(format!(
                "request body not received in time ({} of it arrived)",
                out.len()
            )));
        };
        let Some(chunk) = next else { break };
        let mut chunk = chunk.map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
        if out.len() + chunk.remaining() > MAX_BODY {
            // 400 like every `bad_request` (PROTOCOL.md fixes the status of each code), not 413.
            return Err(ApiError::bad_request(format!(
                "request body larger than {MAX_BODY} bytes"
            )));
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            let n = c.len();
            out.extend_from_slice(c);
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}

/// The client's `User-Agent` for the security log, cut to 256 characters. Not ASCII-only:
/// UTF-8 is kept, and any other byte becomes U+FFFD, so no agent is recorded as none; control
/// and bidirectional-formatting characters become U+FFFD too (an audit line must read as it
/// is stored).
pub(crate) fn user_agent(headers: &HeaderMap) -> Option<String> {
    headers.get("user-agent").map(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .chars()
            .take(256)
            .map(|c| {
                let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
                if c.is_control() || bidi {
                    '\u{fffd}'
                } else {
                    c
                }
            })
            .collect()
    })
}

/// All routes.
pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let api = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(warp::ext::optional::<server::PeerAddr>().map(|p: Option<server::PeerAddr>| p.map(|p| p.0)))
        .and(warp::ext::optional::<server::BodyDeadline>())
        .and_then(
            move |method: Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: HeaderMap,
                  body,
                  peer: Option<SocketAddr>,
                  body_deadline: Option<server::BodyDeadline>| {
                let state = state.clone();
                async move {
                    let started = Instant::now();
                    let request_id = ws::new_request_id();
                    let span = tracing::info_span!("http", request_id = %request_id, method = %method, path = %path.as_str());
                    let resp = async {
                        // Refused before a byte of it is read: a client that sent
                        // `Expect: 100-continue` is not told to go on (hyper says "continue"
                        // when the body is first read) and does not upload it for nothing.
                        if let Some(len) = declared_length(&headers).filter(|&n| n > MAX_BODY as u64) {
                            return ("body", ApiError::bad_request(format!(
                                "request body larger than {MAX_BODY} bytes (Content-Length: {len})"
                            )).into_response());
                        }
                        let body = match read_body(Box::pin(body), body_deadline).await {
                            Ok(b) => b,
                            Err(e) => return ("body", e.into_response()),
                        };
                        let req = Request {
                            method,
                            path: path.as_str().to_string(),
                            query,
                            headers,
                            body,
                            peer,
                            request_id: request_id.clone(),
                        };
                        // Detached: hyper drops this future when the client goes away, and a
                        // handler stopped between a change and its security-log entry (a user
                        // change, a backup) would leave the change unrecorded. Every request,
                        // once read, runs to its end.
                        let st = state.clone();
                        let running = state.handlers.enter();
                        let handler = tokio::spawn(
                            async move {
                                let _running = running;
                                dispatch(&st, &req).await
                            }
                            .in_current_span(),
                        );
                        match handler.await {
                            Ok(done) => done,
                            Err(e) => {
                                tracing::error!(error = %e, "request handler failed");
                                ("panic", ApiError::internal("request handler failed").into_response())
                            }
                        }
                    }
                    .instrument(span.clone())
                    .await;
                    let (route, mut resp) = resp;
                    let status = resp.status().as_u16();
                    state
                        .metrics
                        .http_requests
                        .get_or_create(&HttpLabel {
                            route: route.to_string(),
                            status,
                        })
                        .inc();
                    span.in_scope(|| {
                        tracing::info!(route, status, elapsed_ms = started.elapsed().as_millis() as u64, "request");
                    });
                    if let Ok(v) = warp::http::HeaderValue::from_str(&request_id) {
                        resp.headers_mut().insert("x-request-id", v);
                    }
                    Ok::<Response, Infallible>(resp)
                }
            },
        );
    api.boxed()
}

/// A request's route: what `route` finds for a method and path, before anything is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route<'a> {
    Healthz,
    Readyz,
    Metrics,
    Login,
    TokenRefresh,
    Ledger,
    Alarms,
    AlarmCreate,
    Alarm(&'a str),
    AlarmUpdate(&'a str),
    AlarmDelete(&'a str),
    AlarmHistory(&'a str),
    AlarmAction(&'a str, &'a str),
    Events,
    Users,
    UserCreate,
    UserUpdate(&'a str),
    SecurityLog,
    Backup,
    WebSocket,
}

/// The route table: the route of `method` on the path `segs`, if there is one.
fn route<'a>(method: &str, segs: &[&'a str]) -> Option<Route<'a>> {
    use Route as R;
    Some(match (method, segs) {
        // HEAD (RFC 9110: a server must support it) on the probes and the ledger summary, which
        // load balancers and uptime checks use: the GET answer, whose body hyper leaves out.
        // Not on the streamed or audited reads: a HEAD would run the whole read (and record
        // it) for nothing.
        ("GET" | "HEAD", ["healthz"]) => R::Healthz,
        ("GET" | "HEAD", ["readyz"]) => R::Readyz,
        ("GET" | "HEAD", ["metrics"]) => R::Metrics,
        ("POST", ["api", "v1", "login"]) => R::Login,
        ("POST", ["api", "v1", "token", "refresh"]) => R::TokenRefresh,
        ("GET" | "HEAD", ["api", "v1", "ledger"]) => R::Ledger,
        ("GET", ["api", "v1", "alarms"]) => R::Alarms,
        ("POST", ["api", "v1", "alarms"]) => R::AlarmCreate,
        ("GET", ["api", "v1", "alarms", id]) => R::Alarm(id),
        ("PATCH", ["api", "v1", "alarms", id]) => R::AlarmUpdate(id),
        ("DELETE", ["api", "v1", "alarms", id]) => R::AlarmDelete(id),
        ("GET", ["api", "v1", "alarms", id, "history"]) => R::AlarmHistory(id),
        ("POST", ["api", "v1", "alarms", id, action @ ("trigger" | "ack" | "rearm")]) => {
            R::AlarmAction(id, action)
        }
        ("GET", ["api", "v1", "events"]) => R::Events,
        ("GET", ["api", "v1", "users"]) => R::Users,
        ("POST", ["api", "v1", "users"]) => R::UserCreate,
        ("PATCH", ["api", "v1", "users", name]) => R::UserUpdate(name),
        ("GET", ["api", "v1", "security-log"]) => R::SecurityLog,
        ("POST", ["api", "v1", "admin", "backup"]) => R::Backup,
        ("GET", ["api", "v1", "ws"]) => R::WebSocket,
        _ => return None,
    })
}

/// The methods the route table has for the path `segs` (for `405` and its `Allow`), empty when
/// the path is none of its routes.
fn allowed_methods(segs: &[&str]) -> Vec<&'static str> {
    ["GET", "HEAD", "POST", "PATCH", "DELETE"]
        .into_iter()
        .filter(|m| route(m, segs).is_some())
        .collect()
}

/// Runs the request's route. Returns the route's name (a metrics label) and the response.
async fn dispatch(state: &State, req: &Request) -> (&'static str, Response) {
    // Each segment percent-decoded (RFC 3986: `%61dmin` is `admin`); a malformed escape, or one
    // that is not UTF-8, is refused rather than matched as written.
    let decoded = req
        .path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect::<Result<Vec<_>, _>>();
    let decoded = match decoded {
        Ok(d) => d,
        Err(why) => {
            let e = ApiError::bad_request(format!("the path {}: {why}", req.path));
            return ("unknown", e.into_response());
        }
    };
    let segs: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let m = &req.method;
    macro_rules! run {
        ($name:expr, $fut:expr) => {{
            let r: Result<Response, ApiError> = $fut.await;
            ($name, r.unwrap_or_else(ApiError::into_response))
        }};
    }
    use Route as R;
    match route(m.as_str(), &segs) {
        Some(R::Healthz) => run!("healthz", health::healthz(state)),
        Some(R::Readyz) => run!("readyz", health::readyz(state)),
        Some(R::Metrics) => run!("metrics", health::metrics(state)),
        Some(R::Login) => run!("login", admin::login(state, req)),
        Some(R::TokenRefresh) => run!("token_refresh", admin::refresh(state, req)),
        Some(R::Ledger) => run!("ledger", queries::ledger(state, req)),
        Some(R::Alarms) => run!("alarms", queries::alarms(state, req)),
        Some(R::AlarmCreate) => run!("alarm_create", commands::create(state, req)),
        Some(R::Alarm(id)) => run!("alarm", queries::alarm(state, req, id)),
        Some(R::AlarmUpdate(id)) => run!("alarm_update", commands::update(state, req, id)),
        Some(R::AlarmDelete(id)) => run!("alarm_delete", commands::delete(state, req, id)),
        Some(R::AlarmHistory(id)) => run!("alarm_history", queries::history(state, req, id)),
        Some(R::AlarmAction(id, action)) => {
            run!("alarm_action", commands::action(state, req, id, action))
        }
        Some(R::Events) => run!("events", queries::events(state, req)),
        Some(R::Users) => run!("users", admin::list_users(state, req)),
        Some(R::UserCreate) => run!("user_create", admin::create_user(state, req)),
        Some(R::UserUpdate(name)) => run!("user_update", admin::update_user(state, req, name)),
        Some(R::SecurityLog) => run!("security_log", admin::security_log(state, req)),
        Some(R::Backup) => run!("backup", admin::backup(state, req)),
        // The WebSocket route without an upgrade (a proxy that drops the `Upgrade` headers, a
        // browser tab): say so, rather than "no route".
        Some(R::WebSocket) => ("ws", {
            let mut resp = ApiError::new(
                "bad_request",
                "this is the WebSocket endpoint: send a WebSocket upgrade (Connection: Upgrade, \
                 Upgrade: websocket); a proxy in between must forward them",
            )
            .into_response();
            // 400, the status of `bad_request` (PROTOCOL.md's one status per code), with the
            // header a 426 would carry.
            resp.headers_mut()
                .insert("upgrade", warp::http::HeaderValue::from_static("websocket"));
            resp
        }),
        None => match allowed_methods(&segs) {
            // A path the server has, with another method: 405 and what it takes (RFC 9110).
            allowed if !allowed.is_empty() => {
                let allow = allowed.join(", ");
                let mut resp = ApiError::new(
                    "method_not_allowed",
                    format!("{m} is not allowed on {}: {allow}", req.path),
                )
                .into_response();
                if let Ok(v) = warp::http::HeaderValue::from_str(&allow) {
                    resp.headers_mut().insert("allow", v);
                }
                ("method_not_allowed", resp)
            }
            _ => (
                "unknown",
                ApiError::not_found(format!("no route for {} {}", m, req.path)).into_response(),
            ),
        },
    }
}

/// A JSON response with status 200.
pub fn json_ok(v: &serde_json::Value) -> Response {
    warp::reply::json(v).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_path_with_another_method_lists_the_methods_it_has() {
        let segs = |p: &'static str| p.trim_matches('/').split('/').collect::<Vec<_>>();
        assert_eq!(allowed_methods(&segs("/api/v1/alarms")), ["GET", "POST"]);
        assert_eq!(
            allowed_methods(&segs("/api/v1/alarms/x")),
            ["GET", "PATCH", "DELETE"]
        );
        assert_eq!(allowed_methods(&segs("/api/v1/alarms/x/ack")), ["POST"]);
        assert_eq!(allowed_methods(&segs("/api/v1/alarms/x/snooze")), [""; 0]);
        assert_eq!(allowed_methods(&segs("/healthz")), ["GET", "HEAD"]);
        assert_eq!(allowed_methods(&segs("/api/v1/ledger")), ["GET", "HEAD"]);
        assert_eq!(allowed_methods(&segs("/api/v1/login")), ["POST"]);
        assert_eq!(allowed_methods(&segs("/nowhere")), [""; 0]);
        assert_eq!(
            route("POST", &segs("/api/v1/alarms/x/rearm")),
            Some(Route::AlarmAction("x", "rearm"))
        );
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().expect("net")).collect()
    }

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in xff {
            h.append(
                "x-forwarded-for",
                warp::http::HeaderValue::from_str(line).expect("header"),
            );
        }
        h
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("socket address"))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    #[test]
    fn every_forwarded_for_line_counts_right_to_left() {
        let trusted = nets(&["127.0.0.1/32"]);
        // The client's own (forged) line first, the proxy's line after it.
        let h = headers(&["203.0.113.7", "10.0.0.1"]);
        assert_eq!(client_ip(peer("127.0.0.1:9"), &h, &trusted), ip("10.0.0.1"));
        let h = headers(&["203.0.113.7, 10.0.0.1"]);
        assert_eq!(client_ip(peer("127.0.0.1:9"), &h, &trusted), ip("10.0.0.1"));
        // From an untrusted peer the header is ignored.
        assert_eq!(
            client_ip(peer("192.0.2.1:9"), &h, &trusted),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn mapped_addresses_and_ports_are_understood() {
        let trusted = nets(&["10.0.0.0/8"]);
        // An IPv4 proxy seen through a dual-stack socket is still the trusted proxy.
        let h = headers(&["198.51.100.4"]);
        assert_eq!(
            client_ip(peer("[::ffff:10.1.2.3]:443"), &h, &trusted),
            ip("198.51.100.4")
        );
        // Hops with ports, and a trusted hop skipped on the way left.
        let h = headers(&["198.51.100.4:5678, 10.9.9.9:80"]);
        assert_eq!(
            client_ip(peer("10.0.0.2:1"), &h, &trusted),
            ip("198.51.100.4")
        );
        for hop in ["[2001:db8::1]:443", "[2001:db8::1]", "2001:db8::1"] {
            let h = headers(&[hop]);
            assert_eq!(
                client_ip(peer("10.0.0.2:1"), &h, &trusted),
                ip("2001:db8::1"),
                "{hop}"
            );
        }
        // A hop that is not an address stops the walk at the last good one.
        let h = headers(&["garbage"]);
        assert_eq!(client_ip(peer("10.0.0.2:1"), &h, &trusted), ip("10.0.0.2"));
    }

    #[test]
    fn query_strings_are_decoded_strictly() {
        assert_eq!(
            parse_query("a=1&as_of=2026-11-21T10:00:00+01:00&b=%41%2b").expect("valid"),
            vec![
                ("a".to_string(), "1".to_string()),
                ("as_of".to_string(), "2026-11-21T10:00:00+01:00".to_string()),
                ("b".to_string(), "A+".to_string()),
            ]
        );
        for bad in ["actor=%+0", "actor=%4", "actor=%", "actor=%zz", "actor=%FF"] {
            assert!(parse_query(bad).is_err(), "{bad} must be refused");
        }
    }
}
