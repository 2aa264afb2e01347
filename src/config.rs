//! Every option: flag, `ALARM_LEDGER_*` variable, default, and validation.
//!
//! Values are parsed by clap with our own parsers (clear "expected ..." messages); a bad value
//! stops the process with exit code 2 **before anything is opened**, and the message names the
//! variable or flag, the value and what was expected (`parse_cli`). Unknown `ALARM_LEDGER_*`
//! variables are warned about (typo guard).

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "alarm-ledger",
    version,
    about = "Event-sourced alarm ledger server"
)]
pub struct Cli {
    /// Log format: `human` (default) or `json` (one JSON object per line, for collectors).
    #[arg(long, env = "ALARM_LEDGER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Manage users on a stopped server's data directory.
    User(UserArgs),
    /// Export the audit trail (NDJSON or CSV), or the state as of a point (`--state`).
    Export(ExportArgs),
    /// Verify a data directory: offsets, records, hash chain, indexes, snapshot.
    Verify(VerifyArgs),
    /// Copy a stopped server's data directory into a fresh, consistent data directory.
    Backup(BackupArgs),
}

#[derive(Debug, Args, Clone)]
pub struct DataArg {
    /// Data directory. Global, so `user add NAME --data DIR` and `user --data DIR add NAME` both work.
    #[arg(
        long = "data",
        env = "ALARM_LEDGER_DATA",
        default_value = "./data",
        global = true
    )]
    pub data: PathBuf,
}

#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// Address to listen on (the container sets 0.0.0.0:8080).
    #[arg(long, env = "ALARM_LEDGER_LISTEN", default_value = "127.0.0.1:8080", value_parser = parse_addr)]
    pub listen: SocketAddr,
    /// HS256 secret for tokens, ≥ 32 bytes, used as given. Default: generated once into
    /// `<data>/jwt_secret` (mode 0600).
    #[arg(long, env = "ALARM_LEDGER_JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub jwt_secret: Option<String>,
    /// Password of the `admin` account created on first start (≥ 12 characters). Default: a
    /// random one printed once.
    #[arg(long, env = "ALARM_LEDGER_ADMIN_PASSWORD", hide_env_values = true, value_parser = parse_admin_password)]
    pub admin_password: Option<String>,
    /// Token lifetime.
    #[arg(long, env = "ALARM_LEDGER_TOKEN_TTL", default_value = "15m", value_parser = parse_token_ttl)]
    pub token_ttl: Duration,
    /// Failed logins per (user, address) within the window before 429.
    #[arg(long, env = "ALARM_LEDGER_LOGIN_MAX_FAILURES", default_value_t = 5, value_parser = whole_u32(1, 1000))]
    pub login_max_failures: u32,
    /// Login throttle window.
    #[arg(long, env = "ALARM_LEDGER_LOGIN_WINDOW", default_value = "15m", value_parser = parse_login_window)]
    pub login_window: Duration,
    /// Peers whose `X-Forwarded-For` is believed (comma-separated IPs or CIDRs). Default: none.
    #[arg(long, env = "ALARM_LEDGER_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,
    /// Write queue bound (commands); beyond it commands get `overloaded`.
    #[arg(long, env = "ALARM_LEDGER_QUEUE_CAPACITY", default_value_t = 65_536, value_parser = whole(1, 10_000_000))]
    pub queue_capacity: u64,
    /// Most commands per group commit. Kept moderate: sled 0.34 holds several KB per event of
    /// batches above ~1,000 events in memory (see README, benchmarks).
    #[arg(long, env = "ALARM_LEDGER_MAX_BATCH", default_value_t = 512, value_parser = whole(1, 100_000))]
    pub max_batch: u64,
    /// Projection snapshot every N events (0 = only at shutdown). A snapshot encodes the whole
    /// projection on the writer's thread (a few ms per 10,000 alarms), so a small interval costs
    /// append latency; small values are for tests (the crash test snapshots every 40 events).
    #[arg(long, env = "ALARM_LEDGER_SNAPSHOT_EVERY", default_value_t = 100_000, value_parser = parse_snapshot_every)]
    pub snapshot_every: u64,
    /// sled page cache, MiB. Sequential reads (replay, export) run at full speed while the
    /// records fit: ~170 MiB per million events.
    #[arg(long, env = "ALARM_LEDGER_CACHE_MB", default_value_t = 256, value_parser = whole(8, 65_536))]
    pub cache_mb: u64,
    /// Server WebSocket ping interval.
    #[arg(long, env = "ALARM_LEDGER_WS_PING_INTERVAL", default_value = "20s", value_parser = parse_ping_interval)]
    pub ws_ping_interval: Duration,
    /// A peer silent for this long (no frame, no pong, and no acknowledged progress through a
    /// backlog queued to it) is dropped. Longer than the ping interval (a quiet client is only heard from when it
    /// answers a ping).
    #[arg(long, env = "ALARM_LEDGER_WS_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_idle_timeout)]
    pub ws_idle_timeout: Duration,
    /// Largest WebSocket message accepted, bytes; larger closes with 1008.
    #[arg(long, env = "ALARM_LEDGER_WS_MAX_MESSAGE", default_value_t = 65_536, value_parser = whole(1024, 16_777_216))]
    pub ws_max_message: u64,
    /// A client that takes no bytes for this long while a write to it waits is closed with 4008
    /// (time without progress: a slow reader that keeps reading is not closed). Streamed HTTP
    /// answers whose client takes no chunk this long are cut off too.
    #[arg(long, env = "ALARM_LEDGER_WS_STALL_TIMEOUT", default_value = "30s", value_parser = parse_stall_timeout)]
    pub ws_stall_timeout: Duration,
    /// Commands per second per connection (burst = the same number) before `rate_limited`.
    /// Subscribes and refreshes have a budget of their own: 20 a second, or this rate if lower.
    #[arg(long, env = "ALARM_LEDGER_WS_COMMAND_RATE", default_value_t = 2_000, value_parser = whole_u32(1, 1_000_000))]
    pub ws_command_rate: u32,
    /// Open client connections (HTTP and WebSocket) served at once. Over it, a client is
    /// answered `503 overloaded` (a WebSocket: accepted and closed with 1013) and retries; the
    /// probes are still served. Lowered at start if the open-files limit cannot hold it.
    #[arg(long, env = "ALARM_LEDGER_MAX_CONNECTIONS", default_value_t = 50_000, value_parser = whole(1, 10_000_000))]
    pub max_connections: u64,
    /// Grace period for in-flight work at shutdown.
    #[arg(long, env = "ALARM_LEDGER_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_shutdown_timeout)]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct UserArgs {
    #[command(flatten)]
    pub data: DataArg,
    #[command(subcommand)]
    pub action: UserAction,
}

#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// Add a user (password from --password, ALARM_LEDGER_NEW_PASSWORD, or stdin).
    Add {
        name: String,
        #[arg(long, default_value = "viewer", value_parser = parse_role)]
        role: crate::auth::Role,
        #[arg(long, env = "ALARM_LEDGER_NEW_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// List users (from a private copy of the ledger, as `verify`).
    List {
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Change a password (from --password, ALARM_LEDGER_NEW_PASSWORD, or stdin).
    Passwd {
        name: String,
        #[arg(long, env = "ALARM_LEDGER_NEW_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// Change a role.
    Role {
        name: String,
        #[arg(value_parser = parse_role)]
        role: crate::auth::Role,
    },
    /// Disable (or with --enable, re-enable) a user.
    Disable {
        name: String,
        #[arg(long)]
        enable: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Ndjson,
    Csv,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub data: DataArg,
    #[arg(long)]
    pub from: Option<u64>,
    #[arg(long)]
    pub to: Option<u64>,
    /// RFC 3339 time (inclusive).
    #[arg(long, value_parser = parse_time_lower)]
    pub since: Option<crate::time::Timestamp>,
    /// RFC 3339 time (inclusive).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<crate::time::Timestamp>,
    #[arg(long)]
    pub alarm: Option<uuid::Uuid>,
    #[arg(long)]
    pub actor: Option<String>,
    #[arg(long, value_enum, default_value_t = ExportFormat::Ndjson)]
    pub format: ExportFormat,
    /// Write here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Export the state of every alarm (JSON) instead of events. The event filters and
    /// `--format` do not apply to it and are refused with it.
    #[arg(long, conflicts_with_all = ["from", "to", "since", "until", "alarm", "actor", "format"])]
    pub state: bool,
    /// With --state: an offset or an RFC 3339 time (default: head).
    #[arg(long, requires = "state", value_parser = AsOf::parse)]
    pub as_of: Option<AsOf>,
    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub data: DataArg,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// How a read-only tool (`verify`, `export`) reads the directory. Opening a sled database runs
/// sled's recovery, which writes: it cuts a damaged log tail by zeroing it. So by default the
/// tool opens a private copy of `ledger/` and never the directory it was given.
#[derive(Debug, Args, Clone, Default)]
pub struct ReadArgs {
    /// Where the private copy of `ledger/` goes (default: the system's temporary directory;
    /// it needs room for the `db` file, and is removed at the end).
    #[arg(long, conflicts_with = "in_place")]
    pub scratch: Option<PathBuf>,
    /// Open the directory itself instead of a copy: faster, for a copy you can lose (sled's
    /// recovery may zero a damaged tail of it).
    #[arg(long)]
    pub in_place: bool,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// Destination: a new (or empty) directory.
    #[arg(long)]
    pub to: PathBuf,
}

/// A point of the log: an offset, or a time (the last event at or before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsOf {
    Offset(u64),
    Time(crate::time::Timestamp),
}

impl AsOf {
    /// Digits only: an offset (`+5` and `-1` are neither); anything else: an RFC 3339 time.
    /// The one parser of `--as-of` and `?as_of=`.
    pub fn parse(s: &str) -> Result<AsOf, String> {
        if is_digits(s) {
            return parse_offset(s)
                .map(AsOf::Offset)
                .ok_or_else(|| format!("offset {s:?} is too large"));
        }
        crate::time::Timestamp::parse_rfc3339(s)
            .map(AsOf::Time)
            .ok_or_else(|| format!("expected an offset or an RFC 3339 time, got {s:?}"))
    }
}

// ------------------------------------------------------------------ parsers

/// Non-empty and ASCII digits only (no sign, no space: `u64::from_str` would take `+5`).
fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A non-negative decimal integer written with digits only; `None` for anything else or one
/// beyond `u64`. The one offset syntax of flags and query parameters.
pub fn parse_offset(s: &str) -> Option<u64> {
    if is_digits(s) {
        s.parse().ok()
    } else {
        None
    }
}

fn parse_role(s: &str) -> Result<crate::auth::Role, String> {
    s.parse()
        .map_err(|_| format!("expected admin, operator or viewer, got {s:?}"))
}

/// A whole number in `min..=max`, with a message that says so (clap's own says only "invalid
/// digit found in string" for `zero`, and nothing of the range).
fn whole(min: u64, max: u64) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync {
    move |s: &str| match parse_offset(s) {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a whole number from {min} to {max}, got {s:?}"
        )),
    }
}

fn whole_u32(min: u32, max: u32) -> impl Fn(&str) -> Result<u32, String> + Clone + Send + Sync {
    let parse = whole(u64::from(min), u64::from(max));
    move |s: &str| parse(s).map(|n| n as u32)
}

fn parse_snapshot_every(s: &str) -> Result<u64, String> {
    whole(0, 1_000_000_000)(s)
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080".to_string())
}

fn parse_secret(s: &str) -> Result<String, String> {
    if s.len() < 32 {
        return Err(format!(
            "expected at least 32 bytes, got {} (generate one with `openssl rand -hex 32`)",
            s.len()
        ));
    }
    Ok(s.to_string())
}

fn parse_admin_password(s: &str) -> Result<String, String> {
    // The account policy itself (12 to 1,024 characters), checked before anything is opened.
    crate::auth::password::validate_password(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// Durations: `500ms`, `30s`, `15m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("expected a duration like 500ms, 30s, 15m or 1h (got {s:?})");
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
        _ => return Err(err()),
    };
    if d.is_zero() {
        return Err(format!("expected a duration greater than zero (got {s:?})"));
    }
    if d > MAX_DURATION {
        return Err(format!(
            "expected at most {} (got {s:?})",
            show(MAX_DURATION)
        ));
    }
    Ok(d)
}

/// No setting needs more; and deadlines computed as `now + setting` cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A duration in the unit it is most naturally written in (`500ms`, `30s`, `15m`, `720h`).
fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `parse_duration` within `[min, max]`: values outside make the setting misbehave (a 1 ms
/// login window is no throttle; a 1 ms stall limit closes healthy clients).
fn ranged(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(format!(
            "expected a duration between {} and {} (got {s:?})",
            show(min),
            show(max)
        ));
    }
    Ok(d)
}

fn parse_ping_interval(s: &str) -> Result<Duration, String> {
    ranged(s, Duration::from_secs(1), Duration::from_secs(3600))
}

fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    ranged(s, Duration::from_secs(2), Duration::from_secs(24 * 3600))
}

fn parse_stall_timeout(s: &str) -> Result<Duration, String> {
    ranged(s, Duration::from_millis(100), Duration::from_secs(600))
}

fn parse_login_window(s: &str) -> Result<Duration, String> {
    ranged(
        s,
        Duration::from_secs(1),
        Duration::from_secs(7 * 24 * 3600),
    )
}

fn parse_shutdown_timeout(s: &str) -> Result<Duration, String> {
    ranged(s, Duration::from_secs(1), Duration::from_secs(600))
}

/// Relations between settings that each parser alone cannot see.
fn check_serve(args: &ServeArgs) -> Result<(), String> {
    if args.ws_idle_timeout <= args.ws_ping_interval {
        return Err(format!(
            "ALARM_LEDGER_WS_IDLE_TIMEOUT ({}) must be longer than ALARM_LEDGER_WS_PING_INTERVAL ({}): \
             a quiet client is only heard from when it answers a ping",
            show(args.ws_idle_timeout),
            show(args.ws_ping_interval)
        ));
    }
    Ok(())
}

fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(60) || d > Duration::from_secs(24 * 3600) {
        return Err("expected a token lifetime between 1m and 24h".into());
    }
    Ok(d)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("expected an IP address or CIDR like 10.0.0.0/8 (got {s:?})"))
}

fn parse_time(s: &str) -> Result<crate::time::Timestamp, String> {
    crate::time::Timestamp::parse_rfc3339(s).ok_or_else(|| time_expected(s))
}

/// `parse_time` for a lower bound (`--since`): finer than a millisecond rounds up.
fn parse_time_lower(s: &str) -> Result<crate::time::Timestamp, String> {
    crate::time::Timestamp::parse_rfc3339_ceil(s).ok_or_else(|| time_expected(s))
}

fn time_expected(s: &str) -> String {
    format!("expected an RFC 3339 time like 2026-11-21T10:00:00Z (got {s:?})")
}

// ------------------------------------------------------------------ entry

/// Parses the command line and environment. On a usage error prints a message naming the
/// variable (or flag), the value and what is expected, and exits with code 2.
pub fn parse_cli() -> Cli {
    use clap::CommandFactory;
    // A refused command line is reported in the log format asked for, when one was: a
    // collector reading `--log-format json` output gets one JSON object, not clap's text.
    let json = crate::telemetry::json_requested(
        std::env::args_os(),
        std::env::var_os("ALARM_LEDGER_LOG_FORMAT"),
    );
    let refuse = |message: String| -> ! {
        crate::telemetry::fatal_line(json, &message);
        std::process::exit(2);
    };
    match Cli::try_parse() {
        Ok(cli) => {
            if let Command::Serve(args) = &cli.command {
                if let Err(why) = check_serve(args) {
                    refuse(format!("error: invalid configuration: {why}"));
                }
            }
            cli
        }
        Err(e) => {
            use clap::error::{ContextKind, ContextValue, ErrorKind};
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            if let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
                e.get(ContextKind::InvalidArg),
                e.get(ContextKind::InvalidValue),
            ) {
                // Name the environment variable too: most deployments set values that way.
                if let Some(env) = env_of(&Cli::command(), arg) {
                    let from_env = std::env::var(&env).ok().as_deref() == Some(value.as_str());
                    let hidden = env.ends_with("SECRET") || env.ends_with("PASSWORD");
                    let shown = if hidden { "<hidden>" } else { value.as_str() };
                    let source = if from_env {
                        format!("{env}={shown}")
                    } else {
                        format!("{arg} {shown} (env {env})")
                    };
                    let text = e.to_string();
                    let why = text
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim_start_matches("error: ");
                    // clap lists the accepted values of an enum on a line of its own.
                    let possible = text
                        .lines()
                        .map(str::trim)
                        .find(|l| l.starts_with("[possible values:"))
                        .map(|l| format!(" {l}"))
                        .unwrap_or_default();
                    // clap says "invalid value '<value>' for '<arg>': <reason>"; the value may
                    // itself contain ": ", so cut after the argument's name.
                    let marker = format!("'{arg}': ");
                    let why = match why.find(&marker) {
                        Some(i) => &why[i + marker.len()..],
                        None => why.rsplit(": ").next().unwrap_or(why),
                    };
                    refuse(format!(
                        "error: invalid configuration {source}: {why}{possible}"
                    ));
                }
            }
            if json {
                // clap's text without its styling, as one message (usage lines included).
                refuse(e.render().to_string());
            }
            e.exit();
        }
    }
}

/// The env var of the argument whose display is `arg` (e.g. `--listen <LISTEN>`).
fn env_of(cmd: &clap::Command, arg: &str) -> Option<String> {
    let long = arg.split_whitespace().next()?.trim_start_matches("--");
    let mut stack = vec![cmd];
    while let Some(c) = stack.pop() {
        for a in c.get_arguments() {
            if a.get_long() == Some(long) {
                if let Some(env) = a.get_env() {
                    return Some(env.to_string_lossy().into_owned());
                }
            }
        }
        stack.extend(c.get_subcommands());
    }
    None
}

/// Every `ALARM_LEDGER_*` variable this build knows.
pub fn known_env_vars() -> Vec<String> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mut out = vec!["ALARM_LEDGER_NEW_PASSWORD".to_string()];
    let mut stack = vec![&cmd];
    while let Some(c) = stack.pop() {
        for a in c.get_arguments() {
            if let Some(env) = a.get_env() {
                out.push(env.to_string_lossy().into_owned());
            }
        }
        stack.extend(c.get_subcommands());
    }
    out.sort();
    out.dedup();
    out
}

/// `ALARM_LEDGER_*` variables set in the environment that no option reads (likely typos).
pub fn unknown_env_vars() -> Vec<String> {
    let known = known_env_vars();
    let mut out: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("ALARM_LEDGER_") && !known.contains(k))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("15x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_token_ttl("10s").is_err());
        assert!(
            parse_duration("2562047788015217h").is_err(),
            "would overflow an Instant"
        );
        assert!(parse_duration("721h").is_err());
        assert_eq!(parse_duration("720h"), Ok(MAX_DURATION));
        assert!(parse_ping_interval("500ms").is_err());
        assert!(parse_login_window("1ms").is_err());
        assert!(parse_stall_timeout("99ms").is_err());
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(90)), "90s");
        assert_eq!(show(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn env_names_are_known() {
        let known = known_env_vars();
        assert!(known.contains(&"ALARM_LEDGER_LISTEN".to_string()));
        assert!(known.contains(&"ALARM_LEDGER_DATA".to_string()));
        assert!(known.contains(&"ALARM_LEDGER_JWT_SECRET".to_string()));
    }

    #[test]
    fn nets() {
        assert!(parse_net("10.0.0.0/8").is_ok());
        assert!(parse_net("127.0.0.1").is_ok());
        assert!(parse_net("::1").is_ok());
        assert!(parse_net("nope").is_err());
    }
}
