//! Test helpers shared by the integration test binaries: a real server on 127.0.0.1:0 with its
//! own temporary data directory, real HTTP (reqwest) and WebSocket (tokio-tungstenite) clients.
#![allow(dead_code)]

pub mod process;

use alarm_ledger::config::{Cli, Command};
use alarm_ledger::startup::Application;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";
pub const USER_PASSWORD: &str = "user-password-for-tests";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct TestApp {
    pub addr: SocketAddr,
    pub data: PathBuf,
    /// Keeps the temporary directory alive (None when the caller owns the directory).
    pub tmp: Option<tempfile::TempDir>,
    pub client: reqwest::Client,
    pub admin_token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// `Cli` from `argv` alone for `serve` (the top level's and the subcommands' own options; not
/// those of nested subcommands like `user add`): the `ALARM_LEDGER_*` variables of whoever runs
/// the tests are not read, so a developer's environment (say `ALARM_LEDGER_WS_COMMAND_RATE`
/// exported for a local server) cannot change the server a test builds.
pub fn parse_cli<I, T>(argv: I) -> Cli
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let no_env = |a: clap::Arg| a.env(None::<&'static str>);
    let matches = Cli::command()
        .mut_args(no_env)
        .mut_subcommands(|s| s.mut_args(no_env))
        .try_get_matches_from(argv)
        .expect("test arguments parse");
    Cli::from_arg_matches(&matches).expect("test arguments parse")
}

/// A server on a fresh temporary data directory.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// A server on a fresh temporary data directory, with extra `serve` flags.
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().to_path_buf();
    let mut app = spawn_app_in(&data, extra).await;
    app.tmp = Some(tmp);
    app
}

/// A server on an existing data directory (for restarts: `reopen`).
pub async fn spawn_app_in(data: &Path, extra: &[&str]) -> TestApp {
    let mut argv: Vec<String> = vec![
        "alarm-ledger".into(),
        "serve".into(),
        "--data".into(),
        data.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-password".into(),
        ADMIN_PASSWORD.into(),
        "--jwt-secret".into(),
        "test-secret-test-secret-test-secret-0123".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let cli = parse_cli(argv);
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    // After `reopen`, sled may hold the directory's lock a moment longer than the stopped
    // server (see `SledLog::open_after_close`): retry that case for a bounded time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let app = loop {
        match Application::build(&args).await {
            Err(alarm_ledger::error::Error::Locked { .. })
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other.expect("server builds"),
        }
    };
    let addr = app.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run_until_stopped(async move {
            let _ = rx.await;
        })
        .await
        .expect("server runs");
    });
    let client = reqwest::Client::new();
    let mut t = TestApp {
        addr,
        data: data.to_path_buf(),
        tmp: None,
        client,
        admin_token: String::new(),
        stop: Some(tx),
        task: Some(task),
    };
    t.admin_token = t.login("admin", ADMIN_PASSWORD).await;
    t
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Logs in; panics unless 200.
    pub async fn login(&self, user: &str, password: &str) -> String {
        let r = self
            .client
            .post(self.url("/api/v1/login"))
            .json(&json!({"username": user, "password": password}))
            .send()
            .await
            .expect("login request");
        assert_eq!(r.status(), 200, "login of {user}");
        let v: Value = r.json().await.expect("login json");
        v["token"].as_str().expect("token").to_string()
    }

    /// Creates a user with `USER_PASSWORD` and returns a token for it.
    pub async fn user_token(&self, name: &str, role: &str) -> String {
        let r = self
            .client
            .post(self.url("/api/v1/users"))
            .bearer_auth(&self.admin_token)
            .json(&json!({"username": name, "password": USER_PASSWORD, "role": role}))
            .send()
            .await
            .expect("create user");
        assert_eq!(r.status(), 200, "create user {name}");
        self.login(name, USER_PASSWORD).await
    }

    pub async fn post(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let (status, text) = self.get_text(token, path).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get_text(&self, token: &str, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("get");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    /// Creates an alarm over HTTP as admin; returns its id.
    pub async fn create_alarm(&self, name: &str) -> String {
        let (s, v) = self
            .post(&self.admin_token, "/api/v1/alarms", json!({"name": name}))
            .await;
        assert_eq!(s, 200, "{v}");
        v["alarm_id"].as_str().expect("alarm_id").to_string()
    }

    /// Opens a WebSocket with the token in the Authorization header and reads `hello`.
    pub async fn ws(&self, token: &str) -> (Ws, Value) {
        let mut ws = self.ws_raw(token).await;
        let hello = recv_json(&mut ws).await.expect("hello");
        assert_eq!(hello["type"], "hello", "{hello}");
        (ws, hello)
    }

    /// The upgrade request of `/api/v1/ws` with `token` as its bearer.
    fn ws_request(
        &self,
        token: &str,
    ) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}/api/v1/ws", self.addr)
            .into_client_request()
            .expect("request");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        req
    }

    /// The upgrade answer's `x-request-id` (every HTTP answer carries one, the 101 included).
    pub async fn ws_request_id(&self, token: &str) -> Option<String> {
        let (_ws, resp) = tokio_tungstenite::connect_async(self.ws_request(token))
            .await
            .expect("ws connect");
        resp.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Opens a WebSocket without reading anything.
    pub async fn ws_raw(&self, token: &str) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_request(token))
            .await
            .expect("ws connect");
        ws
    }

    /// Opens a WebSocket (and reads its `hello`) over a socket whose receive buffer is fixed at
    /// `rcvbuf` bytes before it connects, which turns off the kernel's receive autotuning (up to
    /// 6 MiB here): what the server has written then waits in the server's send queue, not in
    /// this client's kernel, where the server cannot see whether it is being read.
    pub async fn ws_with_receive_buffer(&self, token: &str, rcvbuf: usize) -> (Ws, Value) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("rcvbuf");
        socket.connect(&self.addr.into()).expect("connect");
        socket.set_nonblocking(true).expect("nonblocking");
        let tcp = TcpStream::from_std(socket.into()).expect("tokio socket");
        tcp.set_nodelay(true).expect("nodelay");
        let (mut ws, _) =
            tokio_tungstenite::client_async(self.ws_request(token), MaybeTlsStream::Plain(tcp))
                .await
                .expect("ws connect");
        let hello = recv_json(&mut ws).await.expect("hello");
        assert_eq!(hello["type"], "hello", "{hello}");
        (ws, hello)
    }

    /// Stops the server gracefully and waits for it: a stop that hangs or fails (the task
    /// panics on an error from `run_until_stopped`) fails the test. Then waits until sled has
    /// let go of the data directory (it releases its lock a moment after the last handle is
    /// dropped), so that a command-line tool run next on it does not find it in use.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("the server stops within 20 s")
                .expect("the server stops cleanly");
            wait_unlocked(&self.data).await;
        }
    }

    /// Stops and starts a new server on the same data directory.
    pub async fn reopen(mut self) -> TestApp {
        self.stop().await;
        let mut next = spawn_app_in(&self.data, &[]).await;
        next.tmp = self.tmp.take();
        next
    }
}

/// Waits (at most 10 s) until no process or handle holds sled's lock on `data`'s database.
pub async fn wait_unlocked(data: &Path) {
    use std::os::unix::io::AsRawFd;
    let Ok(file) = std::fs::File::open(data.join("ledger/db")) else {
        return; // no database (yet): nothing holds it
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // SAFETY: flock on a descriptor we own; the lock is released at once.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "sled's lock still held 10 s after the server stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// Sends a JSON message.
pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string()))
        .await
        .expect("ws send");
}

/// The next JSON text message (skipping pings/pongs), or None on close/timeout (10 s).
pub async fn recv_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??
            .ok()?;
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// Reads until a close frame; returns its code (None if the stream ended without one).
pub async fn recv_close(ws: &mut Ws) -> Option<u16> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??;
        match msg {
            Ok(Message::Close(Some(f))) => return Some(f.code.into()),
            Ok(Message::Close(None)) => return None,
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}
