//! `ledger-load`: the load generator of issue 7. It drives a *running* server over real
//! WebSockets (or Redis Streams, for the comparison) and prints one JSON line per run on stdout;
//! progress and diagnostics go to stderr.
//!
//! It is a `harness = false` bench target (so it may use the dev-dependencies: tokio-tungstenite,
//! reqwest). Build: `cargo bench --bench load --no-run`; run:
//! `cargo bench --bench load -- <workload> [options]` (or the printed executable directly).
//! Without a workload it prints a note and exits 0, so a plain `cargo bench` is unaffected.
//!
//! | workload  | what                                                                          |
//! |-----------|-------------------------------------------------------------------------------|
//! | `w1`      | P clients, each sending trigger/ack/rearm (or create) and waiting for its `ok` |
//! | `w2`      | replay of N events from offset 0 to one client (prepares N events if needed)  |
//! | `w3`      | fan-out: S subscribers, writers at R events/s, publish→receipt latency, loss check |
//! | `w4`      | reconnect storm: S subscribers drop and resume at once while writes continue   |
//! | `idle`    | C authenticated idle connections; server RSS                                  |
//! | `disk-raw`| 4 KiB append + fdatasync loop in a directory (the disk's physical limit)       |
//!
//! `--target redis` runs w1/w2/w3 against Redis Streams (XADD / XRANGE / XREAD BLOCK) through
//! the small RESP client below. Every run is bounded: `--seconds` for the measured phase and
//! `--timeout` for the whole run. Only loopback addresses are accepted as targets.
//!
//! Latencies are measured on this machine's monotonic clock: W1 send→`ok`; W3/W4 the time the
//! writer's command (or XADD) was *scheduled* (its lane's tick) → the subscriber's receipt of the
//! event (so it includes the durable commit and any wait of a lane held up by a slow commit:
//! no coordinated omission); `send_lag_*` is how late the sends left after their ticks (about
//! 1 ms even when idle: tokio's timer fires on the next millisecond, so every W3/W4 latency
//! carries up to 1 ms of the generator's own timer resolution; in a check run of 20 subscribers
//! at 200 events/s, send lag p50 1.09 ms, p99 1.63 ms); W4
//! reconnect time is from the common drop instant to each client's `live`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Connections opened at once while setting up (not during the W4 storm, which is all at once).
const SETUP_CONCURRENCY: usize = 64;
/// How long subscribers may take to reach the final offset after the writers stop.
const SETTLE: Duration = Duration::from_secs(15);
/// Time limit of one connection attempt (TCP + upgrade + hello).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Resumes a subscriber attempts after an unexpected close, before giving up.
const MAX_RESUMES: u32 = 5;
/// Size of the Redis payload: about the size of one `event` message of the ledger.
const REDIS_PAYLOAD_BYTES: usize = 330;

// ------------------------------------------------------------------ command line

#[derive(Parser, Debug)]
#[command(
    name = "ledger-load",
    about = "Load generator for alarm-ledger (issue 7): W1-W4, idle connections, raw disk; one JSON line per run"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// W1: P clients, each sending commands and waiting for its `ok` (durable).
    W1(W1Args),
    /// W2: replay of N events from offset 0 to one client.
    W2(W2Args),
    /// W3: fan-out to S subscribers while writers append at R events/s.
    W3(W3Args),
    /// W4: reconnect storm: S subscribers drop and resume at once while writes continue.
    W4(W4Args),
    /// C idle authenticated connections; reports server RSS.
    Idle(IdleArgs),
    /// The disk's raw limit: append a block + fdatasync, in a loop.
    DiskRaw(DiskArgs),
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Base URL of the ledger server (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// User to log in as (needs the operator or admin role for commands).
    #[arg(long, default_value = "admin")]
    user: String,
    #[arg(
        long,
        env = "LEDGER_LOAD_PASSWORD",
        hide_env_values = true,
        default_value = ""
    )]
    password: String,
    /// Server process id: its VmRSS is reported as `server_rss_mib` (idle: while the connections
    /// are open) and, for W1/W3/W4, its peak during the run (VmHWM) as `server_hwm_mib`.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, value_enum, default_value_t = Target::Ledger)]
    target: Target,
    /// Redis address for `--target redis` (loopback only).
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
    /// Redis stream key.
    #[arg(long, default_value = "ledger-load")]
    redis_key: String,
    /// Hard limit for the whole run, seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Free text copied into the output line.
    #[arg(long)]
    label: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Ledger,
    Redis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Op {
    /// trigger → ack → rearm on the client's own alarm (every command appends one event).
    Cycle,
    /// create a new alarm per command.
    Create,
}

#[derive(Args, Debug)]
struct W1Args {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured warm-up before it, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[arg(long, value_enum, default_value_t = Op::Cycle)]
    op: Op,
}

#[derive(Args, Debug)]
struct W2Args {
    #[command(flatten)]
    common: Common,
    /// Events to replay; the ledger (or stream) is first filled up to this many.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Clients used to fill the ledger when it is smaller than `--events`.
    #[arg(long, default_value_t = 64)]
    prepare_clients: usize,
}

#[derive(Args, Debug)]
struct W3Args {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Total write rate, events/s.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Writer connections sharing the rate (default: one per 100 events/s, 4..=16).
    #[arg(long)]
    writers: Option<usize>,
    /// Logins per second attempted over HTTP during the run (PBKDF2 load; issue 4).
    #[arg(long, default_value_t = 0.0)]
    logins_per_s: f64,
}

#[derive(Args, Debug)]
struct W4Args {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Write rate kept up during the whole run, events/s.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds of writes before the storm.
    #[arg(long, default_value_t = 2.0)]
    before: f64,
    /// Seconds of writes after every client is live again.
    #[arg(long, default_value_t = 2.0)]
    after: f64,
    #[arg(long)]
    writers: Option<usize>,
}

#[derive(Args, Debug)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Seconds to hold the connections before measuring RSS.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

#[derive(Args, Debug)]
struct DiskArgs {
    /// Directory on the disk to measure (use the server's data disk).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 4096)]
    block: usize,
    #[arg(long)]
    label: Option<String>,
}

impl Cmd {
    fn name(&self) -> &'static str {
        match self {
            Cmd::W1(_) => "W1",
            Cmd::W2(_) => "W2",
            Cmd::W3(_) => "W3",
            Cmd::W4(_) => "W4",
            Cmd::Idle(_) => "idle",
            Cmd::DiskRaw(_) => "disk_raw",
        }
    }

    fn common(&self) -> Option<&Common> {
        match self {
            Cmd::W1(a) => Some(&a.common),
            Cmd::W2(a) => Some(&a.common),
            Cmd::W3(a) => Some(&a.common),
            Cmd::W4(a) => Some(&a.common),
            Cmd::Idle(a) => Some(&a.common),
            Cmd::DiskRaw(_) => None,
        }
    }
}

// ------------------------------------------------------------------ output

/// One output line.
struct Report(Map<String, Value>);

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Report {
    fn new(workload: &str, target: &str, label: &Option<String>) -> Report {
        let mut m = Map::new();
        m.insert("workload".into(), json!(workload));
        m.insert("target".into(), json!(target));
        if let Some(l) = label {
            m.insert("label".into(), json!(l));
        }
        Report(m)
    }

    fn for_common(workload: &str, c: &Common) -> Report {
        let target = match c.target {
            Target::Ledger => "ledger",
            Target::Redis => "redis",
        };
        Report::new(workload, target, &c.label)
    }

    fn set(&mut self, k: &str, v: impl Into<Value>) -> &mut Self {
        self.0.insert(k.into(), v.into());
        self
    }

    fn num(&mut self, k: &str, v: f64) -> &mut Self {
        self.set(k, round3(v))
    }

    /// `p50_ms`, `p99_ms`, `max_ms`, `mean_ms`, `samples` (with a prefix) from microseconds.
    fn latency(&mut self, prefix: &str, micros: &mut [u64]) -> &mut Self {
        micros.sort_unstable();
        let ms = |us: u64| round3(us as f64 / 1000.0);
        let pct = |p: f64| -> Value {
            if micros.is_empty() {
                Value::Null
            } else {
                let i = ((micros.len() as f64 * p).ceil() as usize).clamp(1, micros.len()) - 1;
                json!(ms(micros[i]))
            }
        };
        let p50 = pct(0.50);
        let p99 = pct(0.99);
        let max = micros.last().map_or(Value::Null, |&m| json!(ms(m)));
        let mean = if micros.is_empty() {
            Value::Null
        } else {
            json!(round3(
                micros.iter().sum::<u64>() as f64 / micros.len() as f64 / 1000.0
            ))
        };
        self.set(&format!("{prefix}p50_ms"), p50);
        self.set(&format!("{prefix}p99_ms"), p99);
        self.set(&format!("{prefix}max_ms"), max);
        self.set(&format!("{prefix}mean_ms"), mean);
        self.set(&format!("{prefix}samples"), micros.len() as u64);
        self
    }

    fn rss(&mut self, pid: Option<u32>) -> &mut Self {
        let v = pid
            .and_then(rss_mib)
            .map_or(Value::Null, |m| json!(round3(m)));
        self.set("server_rss_mib", v)
    }

    /// `server_hwm_mib`: the server's peak RSS (VmHWM), since `reset` if that worked
    /// (`server_hwm_since: "run"`), else since the server started (`"server start"`).
    fn hwm(&mut self, pid: Option<u32>, reset: bool) -> &mut Self {
        let v = pid
            .and_then(|p| status_mib(p, "VmHWM:"))
            .map_or(Value::Null, |m| json!(round3(m)));
        self.set("server_hwm_mib", v);
        if pid.is_some() {
            self.set(
                "server_hwm_since",
                if reset { "run" } else { "server start" },
            );
        }
        self
    }

    fn print(&self) {
        println!("{}", Value::Object(self.0.clone()));
    }
}

/// VmRSS of a process, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// A `kB` field of /proc/PID/status, MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the server's peak RSS (VmHWM) to its current RSS (`5` into /proc/PID/clear_refs, Linux
/// ≥ 4.0; needs the right to write there: same user or root), so that the peak reported at the
/// end is this run's. Returns whether it worked.
fn reset_hwm(pid: Option<u32>) -> bool {
    pid.is_some_and(|p| std::fs::write(format!("/proc/{p}/clear_refs"), "5").is_ok())
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[ledger-load] {}", msg.as_ref());
}

// ------------------------------------------------------------------ entry

fn main() -> ExitCode {
    // `cargo bench` appends `--bench` to a bench target's arguments.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let Some(cmd) = cli.cmd else {
        eprintln!(
            "ledger-load: no workload given; this bench target is the load generator \
             (cargo bench --bench load -- --help)"
        );
        return ExitCode::SUCCESS;
    };
    alarm_ledger::memory::raise_open_files_limit();
    let name = cmd.name();
    if let Cmd::DiskRaw(a) = &cmd {
        return finish(name, None, disk_raw(a));
    }
    let Some(common) = cmd.common().cloned() else {
        return ExitCode::FAILURE;
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return finish(name, Some(&common), Err(e.into())),
    };
    let limit = Duration::from_secs(common.timeout.max(1));
    let result = rt.block_on(async move {
        match tokio::time::timeout(limit, run(cmd)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {} s (--timeout)", limit.as_secs()).into()),
        }
    });
    let code = finish(name, Some(&common), result);
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

fn finish(name: &str, common: Option<&Common>, result: Res<Report>) -> ExitCode {
    match result {
        Ok(r) => {
            r.print();
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut r = match common {
                Some(c) => Report::for_common(name, c),
                None => Report::new(name, "disk", &None),
            };
            r.set("error", e.to_string());
            r.print();
            eprintln!("ledger-load {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Res<Report> {
    if let Some(c) = cmd.common() {
        check_loopback_url(&c.url)?;
        if c.target == Target::Redis {
            check_loopback_addr(&c.redis)?;
        }
    }
    match cmd {
        Cmd::W1(a) => match a.common.target {
            Target::Ledger => w1_ledger(&a).await,
            Target::Redis => w1_redis(&a).await,
        },
        Cmd::W2(a) => match a.common.target {
            Target::Ledger => w2_ledger(&a).await,
            Target::Redis => w2_redis(&a).await,
        },
        Cmd::W3(a) => match a.common.target {
            Target::Ledger => w3_ledger(&a).await,
            Target::Redis => w3_redis(&a).await,
        },
        Cmd::W4(a) => match a.common.target {
            Target::Ledger => w4_ledger(&a).await,
            Target::Redis => Err("W4 has no Redis variant".into()),
        },
        Cmd::Idle(a) => match a.common.target {
            Target::Ledger => idle_ledger(&a).await,
            Target::Redis => Err("idle has no Redis variant".into()),
        },
        Cmd::DiskRaw(_) => Err("disk-raw runs outside the runtime".into()),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `http://HOST:PORT[/...]` with a loopback HOST; returns `HOST:PORT` as parsed (the only form
/// the generator then connects to). Parsed as a URL, not split by hand: userinfo
/// (`http://127.0.0.1:80@example.com` is a request to example.com) is refused outright.
fn check_loopback_url(url: &str) -> Res<String> {
    if url.contains('@') {
        return Err(format!("refusing {url}: no user info (`@`) in --url; 127.0.0.1 only").into());
    }
    let u = reqwest::Url::parse(url).map_err(|e| format!("--url {url}: {e}"))?;
    if u.scheme() != "http" {
        return Err("--url must look like http://127.0.0.1:PORT".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!("refusing {url}: no user info in --url").into());
    }
    let host = u.host_str().unwrap_or("");
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if !is_loopback_host(bare) {
        return Err(format!("refusing non-loopback target {url}: 127.0.0.1 only").into());
    }
    let port = u.port_or_known_default().unwrap_or(80);
    Ok(format!("{host}:{port}"))
}

fn check_loopback_addr(addr: &str) -> Res<()> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("--redis {addr}: HOST:PORT"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if !is_loopback_host(host) || port.parse::<u16>().is_err() {
        return Err(format!("refusing non-loopback Redis address {addr}").into());
    }
    Ok(())
}

// ------------------------------------------------------------------ ledger client

struct Session {
    ws_url: String,
    token: String,
}

/// Logs in once; every connection of the run shares the token (one password hash per run).
async fn login(c: &Common) -> Res<Arc<Session>> {
    let authority = check_loopback_url(&c.url)?;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("http://{authority}/api/v1/login"))
        .json(&json!({"username": c.user, "password": c.password}))
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(format!("login as {} failed: {status} {body}", c.user).into());
    }
    let token = body["token"]
        .as_str()
        .ok_or("login answer without a token")?
        .to_string();
    Ok(Arc::new(Session {
        ws_url: format!("ws://{authority}/api/v1/ws"),
        token,
    }))
}

struct Hello {
    ledger_id: String,
    head: u64,
}

/// Opens an authenticated WebSocket (TCP_NODELAY) and reads `hello`. `small_buffers` for every
/// client that reads small messages (commanders, subscribers, idle sockets): tungstenite zeroes
/// its whole read chunk (128 KiB by default) before each read, which made `memset` 25 % of the
/// generator's CPU with 1,000 subscribers, CPU taken from the server it measures on 2 cores
/// (the Redis client's `BufReader` has no such cost). W2's one replay client keeps the default.
async fn connect(s: &Session, small_buffers: bool) -> Res<(Ws, Hello)> {
    let fut = async {
        let mut req = s.ws_url.as_str().into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {}", s.token).parse()?);
        let config = small_buffers.then(|| {
            WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0)
        });
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, config, true).await?;
        let hello: Value = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => break serde_json::from_str(t.as_str())?,
                Some(Ok(Message::Close(f))) => {
                    return Err(format!("closed before hello: {f:?}").into())
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err("connection ended before hello".into()),
            }
        };
        if hello["type"] != "hello" {
            return Err(format!("expected hello, got {hello}").into());
        }
        let h = Hello {
            ledger_id: hello["ledger_id"].as_str().unwrap_or_default().to_string(),
            head: hello["head"].as_u64().unwrap_or(0),
        };
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((ws, h))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| "connect timed out")?
}

/// The text after the first `pat` (e.g. `"offset":`). Our keys never occur inside strings
/// (quotes there are escaped), so a plain search is exact for the server's messages.
fn after<'a>(text: &'a str, pat: &str) -> Option<&'a str> {
    text.find(pat).map(|i| &text[i + pat.len()..])
}

fn field_u64(text: &str, pat: &str) -> Option<u64> {
    let rest = after(text, pat)?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn field_str<'a>(text: &'a str, pat: &str) -> Option<&'a str> {
    let rest = after(text, pat)?;
    rest.split('"').next()
}

fn msg_type(text: &str) -> &str {
    field_str(text, "\"type\":\"").unwrap_or("")
}

fn is_retryable(code: &str) -> bool {
    matches!(code, "rate_limited" | "overloaded" | "internal")
}

/// What one command came to.
enum Outcome {
    /// A new event at this offset.
    Appended(u64),
    /// `already` or `duplicate`: nothing appended.
    Noop,
    /// An `error` answer with this code.
    Failed(String),
}

struct StepResult {
    outcome: Outcome,
    sent: Instant,
    done: Instant,
}

/// One commanding connection: its own alarm cycled trigger → ack → rearm, one command in flight.
struct Cmdr {
    ws: Ws,
    alarm: Uuid,
    phase: u8,
    req: u64,
    /// The command_id of a command that failed retryably: sent again as is.
    pending: Option<Uuid>,
    created: u64,
}

impl Cmdr {
    async fn open(s: &Session, name: &str) -> Res<Cmdr> {
        let (ws, _) = connect(s, true).await?;
        let mut c = Cmdr {
            ws,
            alarm: Uuid::now_v7(),
            phase: 0,
            req: 0,
            pending: None,
            created: 0,
        };
        for _ in 0..100 {
            let r = c.create(name, Some(c.alarm)).await?;
            match r.outcome {
                Outcome::Appended(_) | Outcome::Noop => return Ok(c),
                Outcome::Failed(code) if is_retryable(&code) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Outcome::Failed(code) => return Err(format!("create failed: {code}").into()),
            }
        }
        Err("create kept failing".into())
    }

    /// Sends `text` (carrying `req`) and reads until the answer with that `req`.
    async fn call(&mut self, text: String, req: u64) -> Res<StepResult> {
        let sent = Instant::now();
        self.ws.send(Message::text(text)).await?;
        loop {
            let msg = match self.ws.next().await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(f))) => return Err(format!("server closed: {f:?}").into()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err("connection ended".into()),
            };
            let done = Instant::now();
            let ty = msg_type(msg.as_str());
            if ty != "ok" && ty != "error" {
                continue;
            }
            let v: Value = serde_json::from_str(msg.as_str())?;
            if v["req"].as_u64() != Some(req) {
                continue;
            }
            let outcome = if ty == "ok" {
                if v["already"] == true || v["duplicate"] == true {
                    Outcome::Noop
                } else {
                    Outcome::Appended(v["offset"].as_u64().unwrap_or(0))
                }
            } else {
                Outcome::Failed(v["code"].as_str().unwrap_or("?").to_string())
            };
            return Ok(StepResult {
                outcome,
                sent,
                done,
            });
        }
    }

    async fn create(&mut self, name: &str, id: Option<Uuid>) -> Res<StepResult> {
        self.req += 1;
        self.created += 1;
        let req = self.req;
        let id = id.unwrap_or_else(Uuid::now_v7);
        let text = json!({
            "type": "create", "req": req, "command_id": Uuid::new_v4().to_string(),
            "alarm": {"id": id.to_string(), "name": format!("{name}-{}", self.created),
                      "instrument": "PT-101", "condition": "value > 200", "severity": "high",
                      "tags": ["load", "bench"]}
        })
        .to_string();
        self.call(text, req).await
    }

    /// The next command of the cycle; retries a retryably failed one with its command_id.
    async fn step(&mut self) -> Res<StepResult> {
        self.req += 1;
        let req = self.req;
        let cid = *self.pending.get_or_insert_with(Uuid::new_v4);
        let text = match self.phase {
            0 => format!(
                r#"{{"type":"trigger","req":{req},"alarm_id":"{}","command_id":"{cid}","value":"201.5","message":"pressure above limit on line 4"}}"#,
                self.alarm
            ),
            1 => format!(
                r#"{{"type":"ack","req":{req},"alarm_id":"{}","command_id":"{cid}","comment":"operator on site"}}"#,
                self.alarm
            ),
            _ => format!(
                r#"{{"type":"rearm","req":{req},"alarm_id":"{}","command_id":"{cid}"}}"#,
                self.alarm
            ),
        };
        let r = self.call(text, req).await?;
        match &r.outcome {
            Outcome::Failed(code) if is_retryable(code) => {}
            Outcome::Failed(_) => self.pending = None,
            _ => {
                self.pending = None;
                self.phase = (self.phase + 1) % 3;
            }
        }
        Ok(r)
    }
}

/// Opens `n` commanders, `SETUP_CONCURRENCY` at a time.
async fn open_cmdrs(s: &Arc<Session>, n: usize, name: &str) -> Res<Vec<Cmdr>> {
    let sem = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let s = s.clone();
        let sem = sem.clone();
        let name = format!("{name}-{i}");
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            Cmdr::open(&s, &name).await
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r??);
    }
    Ok(out)
}

// ------------------------------------------------------------------ W1

#[derive(Default)]
struct W1Part {
    events: u64,
    noops: u64,
    errors: u64,
    lat: Vec<u64>,
    failure: Option<String>,
}

async fn w1_ledger(a: &W1Args) -> Res<Report> {
    let hwm_reset = reset_hwm(a.common.server_pid);
    let s = login(&a.common).await?;
    progress(format!("W1: opening {} clients", a.clients));
    let cmdrs = open_cmdrs(&s, a.clients.max(1), "w1").await?;
    let t0 = Instant::now();
    let begin = t0 + Duration::from_secs_f64(a.warmup.max(0.0));
    let end = begin + Duration::from_secs_f64(a.seconds.max(0.1));
    let op = a.op;
    let mut set = tokio::task::JoinSet::new();
    for mut c in cmdrs {
        set.spawn(async move {
            let mut p = W1Part::default();
            while Instant::now() < end {
                let r = match op {
                    Op::Cycle => c.step().await,
                    Op::Create => c.create("w1", None).await,
                };
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        p.failure = Some(e.to_string());
                        p.errors += 1;
                        break;
                    }
                };
                if r.sent < begin || r.done > end {
                    continue;
                }
                match r.outcome {
                    Outcome::Appended(_) => {
                        p.events += 1;
                        p.lat.push((r.done - r.sent).as_micros() as u64);
                    }
                    Outcome::Noop => p.noops += 1,
                    Outcome::Failed(code) => {
                        p.errors += 1;
                        if is_retryable(&code) {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                }
            }
            p
        });
    }
    let mut total = W1Part::default();
    while let Some(p) = set.join_next().await {
        let p = p?;
        total.events += p.events;
        total.noops += p.noops;
        total.errors += p.errors;
        total.lat.extend(p.lat);
        if total.failure.is_none() {
            total.failure = p.failure;
        }
    }
    let secs = (end - begin).as_secs_f64();
    let mut r = Report::for_common("W1", &a.common);
    r.set("clients", a.clients as u64)
        .set("op", format!("{:?}", a.op).to_lowercase())
        .num("seconds", secs)
        .set("events", total.events)
        .num("events_per_s", total.events as f64 / secs)
        .latency("", &mut total.lat)
        .rss(a.common.server_pid)
        .hwm(a.common.server_pid, hwm_reset)
        .set("noops", total.noops)
        .set("errors", total.errors);
    if let Some(f) = total.failure {
        r.set("first_failure", f);
    }
    Ok(r)
}

async fn w1_redis(a: &W1Args) -> Res<Report> {
    let c = &a.common;
    let hwm_reset = reset_hwm(c.server_pid);
    let mut conns = Vec::new();
    for _ in 0..a.clients.max(1) {
        conns.push(resp::Conn::connect(&c.redis).await?);
    }
    let payload = redis_payload();
    let t0 = Instant::now();
    let begin = t0 + Duration::from_secs_f64(a.warmup.max(0.0));
    let end = begin + Duration::from_secs_f64(a.seconds.max(0.1));
    let mut set = tokio::task::JoinSet::new();
    for mut conn in conns {
        let key = c.redis_key.clone();
        let payload = payload.clone();
        set.spawn(async move {
            let mut p = W1Part::default();
            while Instant::now() < end {
                let sent = Instant::now();
                let r = conn
                    .cmd(&[b"XADD", key.as_bytes(), b"*", b"e", payload.as_bytes()])
                    .await;
                let done = Instant::now();
                match r {
                    Ok(resp::Val::Bulk(Some(_))) => {
                        if sent >= begin && done <= end {
                            p.events += 1;
                            p.lat.push((done - sent).as_micros() as u64);
                        }
                    }
                    Ok(other) => {
                        p.errors += 1;
                        p.failure.get_or_insert_with(|| format!("{other:?}"));
                    }
                    Err(e) => {
                        p.errors += 1;
                        p.failure = Some(e.to_string());
                        break;
                    }
                }
            }
            p
        });
    }
    let mut total = W1Part::default();
    while let Some(p) = set.join_next().await {
        let p = p?;
        total.events += p.events;
        total.errors += p.errors;
        total.lat.extend(p.lat);
        if total.failure.is_none() {
            total.failure = p.failure;
        }
    }
    let secs = (end - begin).as_secs_f64();
    let mut r = Report::for_common("W1", c);
    r.set("clients", a.clients as u64)
        .set("op", "xadd")
        .num("seconds", secs)
        .set("events", total.events)
        .num("events_per_s", total.events as f64 / secs)
        .latency("", &mut total.lat)
        .rss(c.server_pid)
        .hwm(c.server_pid, hwm_reset)
        .set("errors", total.errors);
    if let Some(f) = total.failure {
        r.set("first_failure", f);
    }
    Ok(r)
}

// ------------------------------------------------------------------ W2

/// Appends with `clients` commanders until the head reaches `target`.
async fn fill_ledger(s: &Arc<Session>, target: u64, clients: usize) -> Res<u64> {
    let cmdrs = open_cmdrs(s, clients.max(1), "w2-fill").await?;
    let head = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for mut c in cmdrs {
        let head = head.clone();
        set.spawn(async move {
            while head.load(Ordering::Relaxed) < target {
                let r = c.step().await?;
                match r.outcome {
                    Outcome::Appended(o) => {
                        head.fetch_max(o, Ordering::Relaxed);
                    }
                    Outcome::Failed(code) if is_retryable(&code) => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    _ => {}
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        });
    }
    let reporter = {
        let head = head.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let h = head.load(Ordering::Relaxed);
                progress(format!(
                    "W2 fill: head {h} / {target} ({:.0} events/s)",
                    h as f64 / t0.elapsed().as_secs_f64()
                ));
            }
        })
    };
    while let Some(r) = set.join_next().await {
        r??;
    }
    reporter.abort();
    Ok(head.load(Ordering::Relaxed))
}

async fn w2_ledger(a: &W2Args) -> Res<Report> {
    let s = login(&a.common).await?;
    let n = a.events.max(1);
    let (probe, hello) = connect(&s, false).await?;
    drop(probe);
    let mut prepared = 0;
    if hello.head < n {
        progress(format!("W2: ledger head {} < {n}: filling", hello.head));
        let t = Instant::now();
        fill_ledger(&s, n, a.prepare_clients).await?;
        prepared = t.elapsed().as_millis() as u64;
    }
    let (mut ws, hello) = connect(&s, false).await?;
    let want = n.min(hello.head);
    progress(format!("W2: replaying {want} events"));
    let t0 = Instant::now();
    ws.send(Message::text(
        json!({"type": "subscribe", "req": 1, "from": 0}).to_string(),
    ))
    .await?;
    let mut expected = 1u64;
    let (mut gaps, mut dups, mut bytes) = (0u64, 0u64, 0u64);
    let mut first: Option<Duration> = None;
    let mut received = 0u64;
    while received < want {
        let t = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => return Err(format!("server closed: {f:?}").into()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Err("connection ended".into()),
        };
        let text = t.as_str();
        match msg_type(text) {
            "event" => {
                let off = field_u64(text, "\"offset\":").ok_or("event without offset")?;
                first.get_or_insert_with(|| t0.elapsed());
                bytes += text.len() as u64;
                received += 1;
                if off == expected {
                    expected += 1;
                } else if off < expected {
                    dups += 1;
                } else {
                    gaps += off - expected;
                    expected = off + 1;
                }
            }
            "live" => break,
            "error" => return Err(format!("subscribe failed: {text}").into()),
            _ => {}
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(ws);
    let mut r = Report::for_common("W2", &a.common);
    r.set("events", received)
        .num("seconds", secs)
        .num("events_per_s", received as f64 / secs)
        .num("mib_per_s", bytes as f64 / 1048576.0 / secs)
        .num(
            "first_event_ms",
            first.unwrap_or_default().as_secs_f64() * 1000.0,
        )
        .set("prepare_ms", prepared)
        .set("loss", gaps)
        .set("duplicates", dups)
        .rss(a.common.server_pid)
        .set(
            "errors",
            gaps + dups + u64::from(received < want) * (want - received),
        );
    Ok(r)
}

fn redis_payload() -> String {
    let mut p = String::from(
        r#"{"type":"event","offset":1234567,"id":"0196a0a0-0000-7000-8000-000000000001","at":"2026-11-21T10:00:00.123Z","actor":"operator-1","kind":"alarm_triggered","alarm_id":"0196a0a0-0000-7000-8000-000000000002","data":{"value":"201.5","message":"pressure above limit on line 4"},"hash":""#,
    );
    while p.len() < REDIS_PAYLOAD_BYTES - 2 {
        p.push('a');
    }
    p.push_str("\"}");
    p
}

async fn w2_redis(a: &W2Args) -> Res<Report> {
    let c = &a.common;
    let n = a.events.max(1);
    let mut conn = resp::Conn::connect(&c.redis).await?;
    let len = conn
        .cmd(&[b"XLEN", c.redis_key.as_bytes()])
        .await?
        .int()
        .unwrap_or(0) as u64;
    let mut prepared = 0;
    if len < n {
        progress(format!("W2 redis: stream has {len} < {n}: filling"));
        let t = Instant::now();
        let missing = n - len;
        let workers = 4u64;
        let payload = redis_payload();
        let mut set = tokio::task::JoinSet::new();
        for w in 0..workers {
            let share = missing / workers + u64::from(w < missing % workers);
            let addr = c.redis.clone();
            let key = c.redis_key.clone();
            let payload = payload.clone();
            set.spawn(async move {
                let mut conn = resp::Conn::connect(&addr).await?;
                let mut left = share;
                while left > 0 {
                    let k = left.min(1000);
                    for _ in 0..k {
                        conn.queue(&[b"XADD", key.as_bytes(), b"*", b"e", payload.as_bytes()]);
                    }
                    conn.flush().await?;
                    for _ in 0..k {
                        if let resp::Val::Error(e) = conn.read().await? {
                            return Err(format!("XADD: {e}").into());
                        }
                    }
                    left -= k;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        prepared = t.elapsed().as_millis() as u64;
    }
    progress(format!("W2 redis: replaying {n} entries"));
    let t0 = Instant::now();
    let mut cursor = b"-".to_vec();
    let mut received = 0u64;
    let mut bytes = 0u64;
    let mut first = None;
    while received < n {
        let count = (n - received).min(10_000).to_string();
        let v = conn
            .cmd(&[
                b"XRANGE",
                c.redis_key.as_bytes(),
                &cursor,
                b"+",
                b"COUNT",
                count.as_bytes(),
            ])
            .await?;
        let entries = match v {
            resp::Val::Array(Some(e)) => e,
            resp::Val::Error(e) => return Err(format!("XRANGE: {e}").into()),
            _ => Vec::new(),
        };
        if entries.is_empty() {
            break;
        }
        first.get_or_insert_with(|| t0.elapsed());
        let mut last_id = None;
        for e in &entries {
            let (id, size) = resp::entry(e).ok_or("malformed XRANGE entry")?;
            bytes += size as u64;
            last_id = Some(id);
        }
        received += entries.len() as u64;
        let last = last_id.ok_or("no id")?;
        cursor = format!("({}-{}", last.0, last.1).into_bytes();
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut r = Report::for_common("W2", c);
    r.set("events", received)
        .num("seconds", secs)
        .num("events_per_s", received as f64 / secs)
        .num("mib_per_s", bytes as f64 / 1048576.0 / secs)
        .num(
            "first_event_ms",
            first.unwrap_or_default().as_secs_f64() * 1000.0,
        )
        .set("prepare_ms", prepared)
        .rss(c.server_pid)
        .set("errors", n.saturating_sub(received));
    Ok(r)
}

// ------------------------------------------------------------------ subscribers (W3, W4)

#[derive(Clone, Copy, Debug)]
struct Ctl {
    /// Incremented to make every subscriber drop its connection and resume at once.
    storm: u32,
    /// The last offset written; subscribers stop once they have it.
    final_offset: u64,
    /// Subscribers give up waiting for `final_offset` at this time.
    give_up: Option<Instant>,
}

#[derive(Default)]
struct SubOut {
    connected: bool,
    start: u64,
    last: u64,
    /// (offset, receipt µs since the run's base instant).
    received: Vec<(u64, u64)>,
    duplicates: u64,
    gaps: u64,
    /// Receipt of `live` after the storm, µs since base.
    live_again_us: Option<u64>,
    resumes: u32,
    error: Option<String>,
}

struct SubState {
    last: u64,
    last_hash: String,
    record: bool,
}

impl SubOut {
    /// Handles one server message; `Ok(true)` on `live`.
    fn handle(&mut self, st: &mut SubState, text: &str, base: Instant) -> Res<bool> {
        match msg_type(text) {
            "event" => {
                let now = base.elapsed().as_micros() as u64;
                let off = field_u64(text, "\"offset\":").ok_or("event without offset")?;
                if off <= st.last {
                    self.duplicates += 1;
                    return Ok(false);
                }
                if off > st.last + 1 {
                    self.gaps += off - st.last - 1;
                }
                st.last = off;
                if let Some(h) = field_str(text, "\"hash\":\"") {
                    st.last_hash.clear();
                    st.last_hash.push_str(h);
                }
                if st.record {
                    self.received.push((off, now));
                }
                Ok(false)
            }
            "live" => Ok(true),
            "error" => Err(format!("server error: {text}").into()),
            _ => Ok(false),
        }
    }
}

async fn next_text(ws: &mut Ws) -> Res<Utf8Bytes> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t),
            Some(Ok(Message::Close(f))) => return Err(format!("server closed: {f:?}").into()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Err("connection ended".into()),
        }
    }
}

/// Subscribes from `st.last` (with `ledger_id` and, when known, `from_hash`) and reads until
/// `live`, handling the replayed events.
async fn resume(
    ws: &mut Ws,
    out: &mut SubOut,
    st: &mut SubState,
    ledger_id: &str,
    base: Instant,
) -> Res<()> {
    let mut sub =
        json!({"type": "subscribe", "req": "sub", "from": st.last, "ledger_id": ledger_id});
    if !st.last_hash.is_empty() {
        sub["from_hash"] = json!(st.last_hash);
    }
    ws.send(Message::text(sub.to_string())).await?;
    loop {
        let t = next_text(ws).await?;
        if out.handle(st, &t, base)? {
            return Ok(());
        }
    }
}

/// One subscriber: connect (under `sem`), subscribe from the head, report readiness, receive
/// until the final offset; on a storm, drop the socket and resume from the last offset.
async fn subscriber(
    s: Arc<Session>,
    base: Instant,
    ctl: watch::Receiver<Ctl>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    live_again: mpsc::UnboundedSender<u64>,
    sem: Arc<Semaphore>,
) -> SubOut {
    let mut out = SubOut::default();
    let mut st = SubState {
        last: 0,
        last_hash: String::new(),
        record: true,
    };
    let setup = async {
        let _permit = sem.acquire().await?;
        let (mut ws, hello) = connect(&s, true).await?;
        st.last = hello.head;
        out.start = hello.head;
        resume(&mut ws, &mut out, &mut st, &hello.ledger_id, base).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((ws, hello.ledger_id))
    };
    let (mut ws, ledger_id) = match setup.await {
        Ok(x) => {
            out.connected = true;
            let _ = ready.send(Ok(()));
            x
        }
        Err(e) => {
            out.error = Some(e.to_string());
            let _ = ready.send(Err(e.to_string()));
            return out;
        }
    };
    let mut c = *ctl.borrow();
    let mut storms_seen = c.storm;
    // One timer for the whole loop, armed once the final offset (and so `give_up`) is known.
    let give_up = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(give_up);
    // One control future at a time, re-armed only when it fires: a `changed()` future made per
    // message joined and left the watch's waiter list (shared by all subscribers, behind a
    // lock) 100,000 times a second with 1,000 subscribers.
    let mut ctl_changed = control_changed(ctl);
    loop {
        if st.last >= c.final_offset {
            break;
        }
        tokio::select! {
            msg = next_text(&mut ws) => {
                let r = match msg {
                    Ok(t) => out.handle(&mut st, &t, base).map(|_| ()),
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    // An unexpected close (e.g. 4008) or error: resume like a real client.
                    out.resumes += 1;
                    if out.resumes > MAX_RESUMES {
                        out.error = Some(format!("gave up after {MAX_RESUMES} resumes: {e}"));
                        break;
                    }
                    progress(format!("subscriber resuming after: {e}"));
                    match reconnect(&s, &mut out, &mut st, &ledger_id, base).await {
                        Ok(w) => ws = w,
                        Err(e) => { out.error = Some(e.to_string()); break; }
                    }
                }
            }
            (changed, rx) = &mut ctl_changed => {
                if changed.is_err() { break; }
                c = *rx.borrow();
                ctl_changed = control_changed(rx);
                if let Some(g) = c.give_up {
                    give_up.as_mut().reset(tokio::time::Instant::from_std(g));
                }
                if c.storm != storms_seen {
                    storms_seen = c.storm;
                    drop(ws);
                    match reconnect(&s, &mut out, &mut st, &ledger_id, base).await {
                        Ok(w) => {
                            ws = w;
                            let t = base.elapsed().as_micros() as u64;
                            out.live_again_us = Some(t);
                            let _ = live_again.send(t);
                        }
                        Err(e) => {
                            out.error = Some(format!("storm resume failed: {e}"));
                            let _ = live_again.send(u64::MAX);
                            break;
                        }
                    }
                }
            }
            _ = &mut give_up => break,
        }
    }
    out.last = st.last;
    out
}

type ControlChanged = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (Result<(), watch::error::RecvError>, watch::Receiver<Ctl>),
            > + Send,
    >,
>;

/// Waits for the next control change, owning the receiver and handing it back.
fn control_changed(mut rx: watch::Receiver<Ctl>) -> ControlChanged {
    Box::pin(async move {
        let r = rx.changed().await;
        (r, rx)
    })
}

async fn reconnect(
    s: &Session,
    out: &mut SubOut,
    st: &mut SubState,
    ledger_id: &str,
    base: Instant,
) -> Res<Ws> {
    let (mut ws, hello) = connect(s, true).await?;
    if hello.ledger_id != ledger_id {
        return Err(format!("ledger changed: {} → {}", ledger_id, hello.ledger_id).into());
    }
    resume(&mut ws, out, st, ledger_id, base).await?;
    Ok(ws)
}

/// Writer lanes: each a commander paced at `rate / lanes` per second until `stop`.
/// Returns (offset → publish µs since base, commit latencies µs, send lags µs, errors).
///
/// The publish time of an event is the tick its command was *due* at (for a retried command,
/// the tick of its first attempt), not when it was sent: a lane held up by a slow commit sends
/// its missed ticks late (`Burst`), and measuring from the late send would hide the delay
/// (coordinated omission). How late each send left is returned as the send lag.
async fn run_writers(
    cmdrs: Vec<Cmdr>,
    rate: f64,
    base: Instant,
    stop: Arc<AtomicBool>,
) -> Res<WriterOut> {
    let lanes = cmdrs.len().max(1);
    let period = Duration::from_secs_f64(lanes as f64 / rate.max(0.001));
    let start = tokio::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, mut c) in cmdrs.into_iter().enumerate() {
        let stop = stop.clone();
        let first = start + period.mul_f64(i as f64 / lanes as f64);
        set.spawn(async move {
            let mut iv = tokio::time::interval_at(first, period);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut sent = Vec::new();
            let mut commit = Vec::new();
            let mut lag = Vec::new();
            let mut errors = 0u64;
            // Due time of the command being retried (its first attempt's tick).
            let mut first_due: Option<Instant> = None;
            loop {
                let tick = iv.tick().await.into_std();
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = *first_due.get_or_insert(tick);
                let r = c.step().await?;
                lag.push(r.sent.saturating_duration_since(tick).as_micros() as u64);
                match r.outcome {
                    Outcome::Appended(off) => {
                        first_due = None;
                        sent.push((off, due.saturating_duration_since(base).as_micros() as u64));
                        commit.push((r.done - r.sent).as_micros() as u64);
                    }
                    Outcome::Noop => first_due = None,
                    Outcome::Failed(code) => {
                        errors += 1;
                        if !is_retryable(&code) {
                            first_due = None;
                        }
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((sent, commit, lag, errors))
        });
    }
    let mut out = WriterOut::default();
    while let Some(r) = set.join_next().await {
        let (s, c, l, e) = r??;
        out.sent.extend(s);
        out.commit.extend(c);
        out.send_lag.extend(l);
        out.errors += e;
    }
    Ok(out)
}

#[derive(Default)]
struct WriterOut {
    /// offset → publish (scheduled) µs since base.
    sent: HashMap<u64, u64>,
    /// Send → `ok`, µs.
    commit: Vec<u64>,
    /// Actual send − scheduled tick, µs, one per command sent.
    send_lag: Vec<u64>,
    errors: u64,
}

/// Writer connections: each waits for its `ok` before its next command, so one lane gives at
/// most 1 / commit-latency events/s. At least 4 lanes (with 1,000 subscribers a commit takes
/// ~13 ms: a single lane managed 75 of the 100 events/s asked), one per 100 events/s above that.
fn default_writers(rate: f64, given: Option<usize>) -> usize {
    given
        .unwrap_or_else(|| (rate / 100.0).ceil() as usize)
        .clamp(4, 16)
}

struct FanOut {
    subs: Vec<SubOut>,
    sent: HashMap<u64, u64>,
    commit: Vec<u64>,
    send_lag: Vec<u64>,
    writer_errors: u64,
    final_offset: u64,
    write_secs: f64,
    /// W4: (storm instant µs, per-client live-again µs).
    storm: Option<(u64, Vec<u64>)>,
    setup_failures: Vec<String>,
}

/// Shared body of W3 and W4.
async fn fan_out(
    c: &Common,
    subscribers: usize,
    rate: f64,
    writers: usize,
    seconds: f64,
    storm_after: Option<(f64, f64)>,
) -> Res<FanOut> {
    let s = login(c).await?;
    let base = Instant::now();
    progress(format!("opening {writers} writers"));
    let cmdrs = open_cmdrs(&s, writers, "fanout").await?;
    progress(format!("opening {subscribers} subscribers"));
    let (ctl_tx, ctl_rx) = watch::channel(Ctl {
        storm: 0,
        final_offset: u64::MAX,
        give_up: None,
    });
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (live_tx, mut live_rx) = mpsc::unbounded_channel();
    let sem = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut subs = tokio::task::JoinSet::new();
    for _ in 0..subscribers {
        subs.spawn(subscriber(
            s.clone(),
            base,
            ctl_rx.clone(),
            ready_tx.clone(),
            live_tx.clone(),
            sem.clone(),
        ));
    }
    drop(ready_tx);
    let mut setup_failures = Vec::new();
    for _ in 0..subscribers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => setup_failures.push(e),
            None => break,
        }
    }
    progress(format!(
        "{} subscribers live ({} failed); writing at {rate} events/s",
        subscribers - setup_failures.len(),
        setup_failures.len()
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let t_write = Instant::now();
    let writer = tokio::spawn(run_writers(cmdrs, rate, base, stop.clone()));
    let mut storm = None;
    match storm_after {
        None => tokio::time::sleep(Duration::from_secs_f64(seconds)).await,
        Some((before, after)) => {
            tokio::time::sleep(Duration::from_secs_f64(before)).await;
            let live_subs = subscribers - setup_failures.len();
            let t_storm = base.elapsed().as_micros() as u64;
            progress(format!("storm: {live_subs} clients drop and resume"));
            ctl_tx.send_modify(|c| c.storm += 1);
            let mut lives = Vec::with_capacity(live_subs);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while lives.len() < live_subs {
                match tokio::time::timeout_at(deadline, live_rx.recv()).await {
                    Ok(Some(t)) => lives.push(t),
                    _ => break,
                }
            }
            progress(format!("{} of {live_subs} live again", lives.len()));
            storm = Some((t_storm, lives));
            tokio::time::sleep(Duration::from_secs_f64(after)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let WriterOut {
        sent,
        commit,
        send_lag,
        errors: writer_errors,
    } = writer.await??;
    let write_secs = t_write.elapsed().as_secs_f64();
    let final_offset = sent.keys().copied().max().unwrap_or(0);
    progress(format!(
        "writers stopped at offset {final_offset}; waiting for subscribers"
    ));
    ctl_tx.send_modify(|c| {
        c.final_offset = final_offset;
        c.give_up = Some(Instant::now() + SETTLE);
    });
    let mut outs = Vec::with_capacity(subscribers);
    while let Some(o) = subs.join_next().await {
        outs.push(o?);
    }
    drop(live_tx);
    Ok(FanOut {
        subs: outs,
        sent,
        commit,
        send_lag,
        writer_errors,
        final_offset,
        write_secs,
        storm,
        setup_failures,
    })
}

/// Latencies and delivery check common to W3 and W4.
fn fan_out_report(r: &mut Report, f: &mut FanOut) {
    let mut lat = Vec::new();
    let (mut loss, mut dups, mut incomplete, mut resumes) = (0u64, 0u64, 0u64, 0u64);
    let mut first_error = None;
    for s in &f.subs {
        if s.error.is_some() && first_error.is_none() {
            first_error = s.error.clone();
        }
        if !s.connected {
            continue; // counted in setup failures
        }
        for &(off, t) in &s.received {
            if let Some(&sent) = f.sent.get(&off) {
                lat.push(t.saturating_sub(sent));
            }
        }
        dups += s.duplicates;
        loss += s.gaps;
        resumes += u64::from(s.resumes);
        if s.last < f.final_offset {
            incomplete += 1;
            loss += f.final_offset - s.last;
        }
    }
    let events = f.sent.len() as u64;
    r.set("events", events)
        .num("events_per_s", events as f64 / f.write_secs.max(1e-9))
        .latency("", &mut lat)
        .latency("commit_", &mut f.commit)
        .latency("send_lag_", &mut f.send_lag)
        .set("final_offset", f.final_offset)
        .set("loss", loss)
        .set("duplicates", dups)
        .set("incomplete_subscribers", incomplete)
        .set("unexpected_resumes", resumes)
        .set("setup_failures", f.setup_failures.len() as u64)
        .set(
            "errors",
            loss + dups + incomplete + f.setup_failures.len() as u64 + f.writer_errors,
        );
    if let Some(e) = first_error.or_else(|| f.setup_failures.first().cloned()) {
        r.set("first_failure", e);
    }
}

async fn w3_ledger(a: &W3Args) -> Res<Report> {
    let hwm_reset = reset_hwm(a.common.server_pid);
    let writers = default_writers(a.rate, a.writers);
    let (stop_tx, stop_rx) = watch::channel(false);
    let logins = (a.logins_per_s > 0.0)
        .then(|| tokio::spawn(login_load(a.common.clone(), a.logins_per_s, stop_rx)));
    let fanned = fan_out(&a.common, a.subscribers, a.rate, writers, a.seconds, None).await;
    let _ = stop_tx.send(true);
    let login_stats = match logins {
        Some(t) => Some(t.await.map_err(|e| e.to_string())?),
        None => None,
    };
    let mut f = fanned?;
    let mut r = Report::for_common("W3", &a.common);
    r.set("subscribers", a.subscribers as u64)
        .num("rate", a.rate)
        .set("writers", writers as u64)
        .num("seconds", f.write_secs);
    if let Some((ok, failed, mut lat)) = login_stats {
        lat.sort_by(|x, y| x.total_cmp(y));
        let p = |q: f64| {
            lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        r.num("logins_per_s_attempted", a.logins_per_s)
            .num("logins_per_s_done", ok as f64 / f.write_secs.max(0.001))
            .set("logins_ok", ok)
            .set("logins_failed", failed)
            .num("login_p50_ms", p(0.5))
            .num("login_p99_ms", p(0.99));
    }
    fan_out_report(&mut r, &mut f);
    r.rss(a.common.server_pid)
        .hwm(a.common.server_pid, hwm_reset);
    Ok(r)
}

/// Logs in at `rate` per second (each login on its own task) until told to stop; returns
/// (succeeded, failed, latencies in ms).
async fn login_load(c: Common, rate: f64, mut stop: watch::Receiver<bool>) -> (u64, u64, Vec<f64>) {
    let Ok(authority) = check_loopback_url(&c.url) else {
        return (0, 0, Vec::new());
    };
    let client = reqwest::Client::new();
    let url = format!("http://{authority}/api/v1/login");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut tasks = tokio::task::JoinSet::new();
    let limit = Instant::now() + Duration::from_secs(600);
    while !*stop.borrow() && Instant::now() < limit {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let (client, url) = (client.clone(), url.clone());
        let body = json!({"username": c.user, "password": c.password});
        tasks.spawn(async move {
            let t = Instant::now();
            let ok = matches!(client.post(url).json(&body).send().await, Ok(r) if r.status().is_success());
            (ok, t.elapsed().as_secs_f64() * 1e3)
        });
    }
    let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((true, ms)) => {
                ok += 1;
                lat.push(ms);
            }
            _ => failed += 1,
        }
    }
    (ok, failed, lat)
}

async fn w4_ledger(a: &W4Args) -> Res<Report> {
    let hwm_reset = reset_hwm(a.common.server_pid);
    let writers = default_writers(a.rate, a.writers);
    let mut f = fan_out(
        &a.common,
        a.clients,
        a.rate,
        writers,
        0.0,
        Some((a.before, a.after)),
    )
    .await?;
    let mut r = Report::for_common("W4", &a.common);
    r.set("clients", a.clients as u64)
        .num("rate", a.rate)
        .set("writers", writers as u64)
        .num("seconds", f.write_secs);
    // Publish→receipt over the whole run (including the storm) under `delivery_*`.
    fan_out_report(&mut r, &mut f);
    for k in ["p50_ms", "p99_ms", "max_ms", "mean_ms", "samples"] {
        if let Some(v) = r.0.remove(k) {
            r.0.insert(format!("delivery_{k}"), v);
        }
    }
    let (t_storm, lives) = f.storm.take().unwrap_or((0, Vec::new()));
    let failed = lives.iter().filter(|&&t| t == u64::MAX).count() as u64;
    let mut reconnect: Vec<u64> = lives
        .iter()
        .filter(|&&t| t != u64::MAX)
        .map(|&t| t.saturating_sub(t_storm))
        .collect();
    let expected = (a.clients - f.setup_failures.len()) as u64;
    let live = reconnect.len() as u64;
    let all_live =
        (live == expected).then(|| reconnect.iter().copied().max().unwrap_or(0) as f64 / 1000.0);
    r.set("live_again", live)
        .set(
            "all_live_ms",
            all_live.map_or(Value::Null, |v| json!(round3(v))),
        )
        .latency("", &mut reconnect)
        .set("resume_failures", failed);
    let e = r.0.get("errors").and_then(Value::as_u64).unwrap_or(0);
    r.set("errors", e + expected.saturating_sub(live));
    r.rss(a.common.server_pid)
        .hwm(a.common.server_pid, hwm_reset);
    Ok(r)
}

// ------------------------------------------------------------------ W3 on Redis

/// Redis stream ids as (ms, seq).
type Sid = (u64, u64);

async fn w3_redis(a: &W3Args) -> Res<Report> {
    let c = &a.common;
    let hwm_reset = reset_hwm(c.server_pid);
    let writers = default_writers(a.rate, a.writers);
    let base = Instant::now();
    let mut conn = resp::Conn::connect(&c.redis).await?;
    let start: Sid = match conn
        .cmd(&[
            b"XREVRANGE",
            c.redis_key.as_bytes(),
            b"+",
            b"-",
            b"COUNT",
            b"1",
        ])
        .await?
    {
        resp::Val::Array(Some(v)) if !v.is_empty() => resp::entry(&v[0]).ok_or("bad entry")?.0,
        _ => (0, 0),
    };
    let final_id = Arc::new(std::sync::Mutex::new(None::<(Sid, Instant)>));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let mut subs = tokio::task::JoinSet::new();
    for _ in 0..a.subscribers {
        let addr = c.redis.clone();
        let key = c.redis_key.clone();
        let final_id = final_id.clone();
        let ready = ready_tx.clone();
        subs.spawn(async move {
            let mut got: Vec<(Sid, u64)> = Vec::new();
            let mut conn = match resp::Conn::connect(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return (got, Some(e.to_string()));
                }
            };
            let _ = ready.send(Ok(()));
            let mut last = start;
            loop {
                if let Some((f, give_up)) = *final_id.lock().unwrap_or_else(|p| p.into_inner()) {
                    if last >= f || Instant::now() > give_up {
                        break;
                    }
                }
                let from = format!("{}-{}", last.0, last.1);
                let v = conn
                    .cmd(&[
                        b"XREAD",
                        b"COUNT",
                        b"1000",
                        b"BLOCK",
                        b"200",
                        b"STREAMS",
                        key.as_bytes(),
                        from.as_bytes(),
                    ])
                    .await;
                let now = base.elapsed().as_micros() as u64;
                match v {
                    Ok(resp::Val::Array(Some(streams))) => {
                        for s in &streams {
                            let entries = match s {
                                resp::Val::Array(Some(kv)) if kv.len() == 2 => match &kv[1] {
                                    resp::Val::Array(Some(e)) => e.as_slice(),
                                    _ => &[],
                                },
                                _ => &[],
                            };
                            for e in entries {
                                if let Some((id, _)) = resp::entry(e) {
                                    got.push((id, now));
                                    last = last.max(id);
                                }
                            }
                        }
                    }
                    Ok(resp::Val::Array(None)) | Ok(resp::Val::Bulk(None)) => {}
                    Ok(other) => return (got, Some(format!("XREAD: {other:?}"))),
                    Err(e) => return (got, Some(e.to_string())),
                }
            }
            (got, None)
        });
    }
    drop(ready_tx);
    let mut setup_failures = 0u64;
    for _ in 0..a.subscribers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(_)) => setup_failures += 1,
            None => break,
        }
    }
    // Writers: paced XADD lanes.
    let stop = Arc::new(AtomicBool::new(false));
    let period = Duration::from_secs_f64(writers as f64 / a.rate.max(0.001));
    let t_write = Instant::now();
    let t0 = tokio::time::Instant::now();
    let mut wset = tokio::task::JoinSet::new();
    for i in 0..writers {
        let addr = c.redis.clone();
        let key = c.redis_key.clone();
        let stop = stop.clone();
        let payload = redis_payload();
        let first = t0 + period.mul_f64(i as f64 / writers as f64);
        wset.spawn(async move {
            let mut conn = resp::Conn::connect(&addr).await?;
            let mut iv = tokio::time::interval_at(first, period);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut sent: Vec<(Sid, u64, u64)> = Vec::new();
            let mut lag = Vec::new();
            let mut errors = 0u64;
            loop {
                // As on the ledger: the publish time is the tick the XADD was due at.
                let due = iv.tick().await.into_std();
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                lag.push(t.saturating_duration_since(due).as_micros() as u64);
                let v = conn
                    .cmd(&[b"XADD", key.as_bytes(), b"*", b"e", payload.as_bytes()])
                    .await?;
                let done = Instant::now();
                match v {
                    resp::Val::Bulk(Some(id)) => {
                        let id = resp::parse_id(&id).ok_or("bad XADD id")?;
                        sent.push((
                            id,
                            due.saturating_duration_since(base).as_micros() as u64,
                            (done - t).as_micros() as u64,
                        ));
                    }
                    _ => errors += 1,
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((sent, lag, errors))
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent: HashMap<Sid, u64> = HashMap::new();
    let mut commit = Vec::new();
    let mut send_lag = Vec::new();
    let mut writer_errors = 0;
    while let Some(r) = wset.join_next().await {
        let (s, l, e) = r??;
        for (id, t, l) in s {
            sent.insert(id, t);
            commit.push(l);
        }
        send_lag.extend(l);
        writer_errors += e;
    }
    let write_secs = t_write.elapsed().as_secs_f64();
    let last = sent.keys().copied().max().unwrap_or(start);
    *final_id.lock().unwrap_or_else(|p| p.into_inner()) = Some((last, Instant::now() + SETTLE));
    let expected: HashSet<Sid> = sent.keys().copied().collect();
    let mut lat = Vec::new();
    let (mut loss, mut dups, mut incomplete) = (0u64, 0u64, 0u64);
    let mut first_failure = None;
    while let Some(r) = subs.join_next().await {
        let (got, err) = r?;
        if err.is_some() && first_failure.is_none() {
            first_failure = err;
        }
        let mut seen = HashSet::with_capacity(got.len());
        for (id, t) in got {
            if !seen.insert(id) {
                dups += 1;
            } else if let Some(&s) = sent.get(&id) {
                lat.push(t.saturating_sub(s));
            }
        }
        let missing = expected.iter().filter(|id| !seen.contains(id)).count() as u64;
        if missing > 0 {
            incomplete += 1;
        }
        loss += missing;
    }
    let events = sent.len() as u64;
    let mut r = Report::for_common("W3", c);
    r.set("subscribers", a.subscribers as u64)
        .num("rate", a.rate)
        .set("writers", writers as u64)
        .num("seconds", write_secs)
        .set("events", events)
        .num("events_per_s", events as f64 / write_secs)
        .latency("", &mut lat)
        .latency("commit_", &mut commit)
        .latency("send_lag_", &mut send_lag)
        .set("loss", loss)
        .set("duplicates", dups)
        .set("incomplete_subscribers", incomplete)
        .set("setup_failures", setup_failures)
        .rss(c.server_pid)
        .hwm(c.server_pid, hwm_reset)
        .set(
            "errors",
            loss + dups + incomplete + setup_failures + writer_errors,
        );
    if let Some(f) = first_failure {
        r.set("first_failure", f);
    }
    Ok(r)
}

// ------------------------------------------------------------------ idle

async fn idle_ledger(a: &IdleArgs) -> Res<Report> {
    let s = login(&a.common).await?;
    let rss_before = a.common.server_pid.and_then(rss_mib);
    let sem = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..a.connections {
        let s = s.clone();
        let sem = sem.clone();
        let ready = ready_tx.clone();
        let mut stop = stop_rx.clone();
        set.spawn(async move {
            let permit = sem.acquire_owned().await;
            let r = connect(&s, true).await;
            drop(permit);
            let mut ws = match r {
                Ok((ws, _)) => {
                    let _ = ready.send(Ok(()));
                    ws
                }
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return false;
                }
            };
            // Keep reading so that server pings are answered; idle otherwise.
            loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(_)) => {}
                        _ => return false,
                    },
                    _ = stop.changed() => return true,
                }
            }
        });
    }
    drop(ready_tx);
    let (mut ok, mut failed, mut first_failure) = (0u64, 0u64, None);
    // Each task keeps its sender while it idles: count the answers, not the senders.
    for _ in 0..a.connections {
        let Some(r) = ready_rx.recv().await else {
            break;
        };
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_failure.get_or_insert(e);
            }
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    progress(format!(
        "idle: {ok} connected ({failed} failed) in {connect_secs:.1} s; holding {} s",
        a.hold
    ));
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    // While every connection is still open: the number the RSS target is about.
    let rss_after = a.common.server_pid.and_then(rss_mib);
    let _ = stop_tx.send(true);
    let mut dropped = 0u64;
    while let Some(r) = set.join_next().await {
        if !r.unwrap_or(false) {
            dropped += 1;
        }
    }
    let dropped = dropped.saturating_sub(failed);
    let mut r = Report::for_common("idle", &a.common);
    r.set("connections", a.connections as u64)
        .set("connected", ok)
        .num("connect_seconds", connect_secs)
        .num("hold_seconds", a.hold)
        .set(
            "server_rss_mib",
            rss_after.map_or(Value::Null, |v| json!(round3(v))),
        )
        .set(
            "rss_before_mib",
            rss_before.map_or(Value::Null, |v| json!(round3(v))),
        );
    // After the clients closed (informational: what the server gives back).
    let rss_closed = a.common.server_pid.and_then(rss_mib);
    r.set(
        "rss_after_close_mib",
        rss_closed.map_or(Value::Null, |v| json!(round3(v))),
    );
    if let (Some(b), Some(x)) = (rss_before, rss_after) {
        r.num("kib_per_connection", (x - b) * 1024.0 / ok.max(1) as f64);
    }
    r.set("dropped_while_idle", dropped)
        .set("errors", failed + dropped);
    if let Some(f) = first_failure {
        r.set("first_failure", f);
    }
    Ok(r)
}

// ------------------------------------------------------------------ raw disk

fn disk_raw(a: &DiskArgs) -> Res<Report> {
    use std::io::Write;
    std::fs::create_dir_all(&a.dir)?;
    let path = a.dir.join(format!("disk-raw-{}.dat", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let block = vec![0x5au8; a.block.max(1)];
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.seconds.max(0.1));
    let mut lat = Vec::new();
    let mut written = 0u64;
    let result = (|| {
        while Instant::now() < end {
            let t = Instant::now();
            if written >= 256 << 20 {
                f.set_len(0)?;
                std::io::Seek::rewind(&mut f)?;
                written = 0;
            }
            f.write_all(&block)?;
            f.sync_data()?;
            written += block.len() as u64;
            lat.push(t.elapsed().as_micros() as u64);
        }
        Ok::<_, std::io::Error>(())
    })();
    let secs = t0.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    result?;
    let ops = lat.len() as u64;
    let mut r = Report::new("disk_raw", "disk", &a.label);
    r.set("block_bytes", block.len() as u64)
        .num("seconds", secs)
        .set("ops", ops)
        .num("ops_per_s", ops as f64 / secs)
        .num(
            "mib_per_s",
            (ops * block.len() as u64) as f64 / 1048576.0 / secs,
        )
        .latency("", &mut lat)
        .set("dir", a.dir.display().to_string())
        .set("errors", 0u64);
    Ok(r)
}

// ------------------------------------------------------------------ RESP client

/// A minimal RESP2 client: enough for XADD, XLEN, XRANGE, XREVRANGE and XREAD.
mod resp {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::TcpStream;

    #[derive(Debug)]
    pub enum Val {
        // Read through `Debug` in failure messages only.
        #[allow(dead_code)]
        Simple(String),
        Error(String),
        Int(i64),
        Bulk(Option<Vec<u8>>),
        Array(Option<Vec<Val>>),
    }

    impl Val {
        pub fn int(&self) -> Option<i64> {
            match self {
                Val::Int(i) => Some(*i),
                _ => None,
            }
        }
    }

    pub struct Conn {
        rd: BufReader<OwnedReadHalf>,
        wr: OwnedWriteHalf,
        out: Vec<u8>,
        line: Vec<u8>,
    }

    fn bad(msg: impl Into<String>) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
    }

    impl Conn {
        pub async fn connect(addr: &str) -> std::io::Result<Conn> {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok(Conn {
                rd: BufReader::with_capacity(256 * 1024, r),
                wr: w,
                out: Vec::with_capacity(4096),
                line: Vec::with_capacity(64),
            })
        }

        /// Appends a command to the output buffer (pipelining: `flush` sends them all).
        pub fn queue(&mut self, args: &[&[u8]]) {
            self.out
                .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in args {
                self.out
                    .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                self.out.extend_from_slice(a);
                self.out.extend_from_slice(b"\r\n");
            }
        }

        pub async fn flush(&mut self) -> std::io::Result<()> {
            self.wr.write_all(&self.out).await?;
            self.out.clear();
            Ok(())
        }

        pub async fn cmd(&mut self, args: &[&[u8]]) -> std::io::Result<Val> {
            self.queue(args);
            self.flush().await?;
            self.read().await
        }

        async fn header(&mut self) -> std::io::Result<(u8, i64, String)> {
            self.line.clear();
            let n = self.rd.read_until(b'\n', &mut self.line).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if self.line.len() < 3 || !self.line.ends_with(b"\r\n") {
                return Err(bad("malformed RESP line"));
            }
            let kind = self.line[0];
            let text = String::from_utf8_lossy(&self.line[1..self.line.len() - 2]).into_owned();
            let num = match kind {
                b'$' | b'*' | b':' => text.parse().map_err(|_| bad("bad RESP length"))?,
                _ => 0,
            };
            Ok((kind, num, text))
        }

        /// Reads one reply (iteratively: nested arrays without recursion).
        pub async fn read(&mut self) -> std::io::Result<Val> {
            let mut stack: Vec<(Vec<Val>, usize)> = Vec::new();
            loop {
                let (kind, num, text) = self.header().await?;
                let mut v = match kind {
                    b'+' => Val::Simple(text),
                    b'-' => Val::Error(text),
                    b':' => Val::Int(num),
                    b'$' if num < 0 => Val::Bulk(None),
                    b'$' => {
                        let mut buf = vec![0u8; num as usize + 2];
                        self.rd.read_exact(&mut buf).await?;
                        buf.truncate(num as usize);
                        Val::Bulk(Some(buf))
                    }
                    b'*' if num < 0 => Val::Array(None),
                    b'*' if num == 0 => Val::Array(Some(Vec::new())),
                    b'*' => {
                        stack.push((Vec::with_capacity(num as usize), num as usize));
                        continue;
                    }
                    other => return Err(bad(format!("unknown RESP type {:?}", other as char))),
                };
                loop {
                    match stack.last_mut() {
                        None => return Ok(v),
                        Some((items, want)) => {
                            items.push(v);
                            if items.len() < *want {
                                break;
                            }
                            let (items, _) = stack.pop().unwrap_or_default();
                            v = Val::Array(Some(items));
                        }
                    }
                }
            }
        }
    }

    pub fn parse_id(id: &[u8]) -> Option<(u64, u64)> {
        let s = std::str::from_utf8(id).ok()?;
        let (ms, seq) = s.split_once('-')?;
        Some((ms.parse().ok()?, seq.parse().ok()?))
    }

    /// A stream entry `[id, [field, value, ...]]`: its id and payload bytes.
    pub fn entry(v: &Val) -> Option<((u64, u64), usize)> {
        let Val::Array(Some(parts)) = v else {
            return None;
        };
        let Val::Bulk(Some(id)) = parts.first()? else {
            return None;
        };
        let size = match parts.get(1) {
            Some(Val::Array(Some(fv))) => fv
                .iter()
                .map(|x| match x {
                    Val::Bulk(Some(b)) => b.len(),
                    _ => 0,
                })
                .sum(),
            _ => 0,
        };
        Some((parse_id(id)?, size))
    }
}
