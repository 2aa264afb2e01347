//! `Application`: build (validate → lock data dir → bind → open log → rebuild projection →
//! auth → writer), `local_addr`, `run_until_stopped`.

use crate::auth::{
    LoginThrottle, NewSecurityEntry, Role, SecurityAction, SecurityLog, TokenService, UserStore,
};
use crate::config::ServeArgs;
use crate::error::{Error, Result};
use crate::http::server::ConnectionLimit;
use crate::http::{self, ApiSettings, AppState, AuthCtx};
use crate::ledger::datadir::DataDir;
use crate::ledger::{Ledger, LedgerOptions, Restore};
use crate::metrics::Metrics;
use crate::shutdown;
use crate::store::sled_log::{SledLog, SledOptions};
use crate::store::EventLog;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A server that stopped cleanly: it still holds the data directory's lock, for the shutdown
/// checkpoint (`checkpoint`), which runs once the runtime and every handle on the log are gone.
pub struct Stopped {
    dir: DataDir,
    /// The shutdown timeout: the checkpoint's bound.
    budget: Duration,
}

impl Stopped {
    /// The sled shutdown checkpoint (`sled_log::checkpoint`), so that the next start does not
    /// recover sled's log: call after the runtime has shut down (its tasks hold the log).
    ///
    /// Bounded by the shutdown timeout as a whole (the wait for the last handle and sled's
    /// open): it runs on a thread of its own, and past the bound the process goes on to exit,
    /// which ends the checkpoint like a crash would (harmless: everything is durable, and sled
    /// replaces its snapshot atomically). A signal during it ends the process at once: the
    /// runtime that handled signals is gone, so their default action is restored. Best effort:
    /// a start after a skipped checkpoint recovers like one after a crash. Logs what it did.
    pub fn checkpoint(self) {
        shutdown::restore_default_signals();
        let (dir, budget) = (self.dir.ledger_dir(), self.budget);
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let _ = tx.send(crate::store::sled_log::checkpoint(&dir, budget));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "shutdown checkpoint not started; the next start recovers sled's log");
            return;
        }
        match rx.recv_timeout(budget) {
            Ok(Ok(Some(took))) => tracing::info!(
                elapsed_ms = took.as_millis() as u64,
                "shutdown checkpoint written (sled page-table snapshot)"
            ),
            Ok(Ok(None)) => tracing::warn!(
                wait_ms = budget.as_millis() as u64,
                "shutdown checkpoint skipped: the log was still open; the next start recovers sled's log"
            ),
            Ok(Err(e)) => tracing::error!(error = %e, "shutdown checkpoint failed; the next start recovers sled's log"),
            Err(_) => tracing::warn!(
                timeout_ms = budget.as_millis() as u64,
                "shutdown checkpoint abandoned at the shutdown timeout; the next start recovers sled's log"
            ),
        }
        // The data directory's lock goes with the process (the checkpoint thread may still run).
        std::mem::forget(self.dir);
    }
}

pub struct Application {
    addr: SocketAddr,
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    ledger: Arc<Ledger>,
    shutdown_tx: watch::Sender<bool>,
    shutdown_timeout: Duration,
    /// Printed once by `serve` when the admin account was just created with a random password.
    pub generated_admin_password: Option<String>,
    /// The data directory's lock: held until the server has stopped and checkpointed.
    dir: DataDir,
}

impl Application {
    pub async fn build(args: &ServeArgs) -> Result<Application> {
        let dir = DataDir::lock(&args.data.data)?;
        // Bound before anything long or irreversible: a busy port fails at once, not after a
        // replay of the log, and never after the first admin was created with a password
        // nobody saw. Connections wait in the backlog until the server runs.
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| Error::Other(format!("cannot listen on {}: {e}", args.listen)))?;
        let addr = listener.local_addr()?;
        remove_cut_short_backups(&dir.root().join("backups"));
        let metrics = Arc::new(Metrics::new());
        let opts = SledOptions {
            cache_bytes: args.cache_mb * 1024 * 1024,
        };
        let ledger_dir = dir.ledger_dir();
        // With a projection snapshot the directory held a ledger: a log whose db file is gone,
        // or that opens empty (sled found nothing to recover), lost it, and is not silently
        // re-founded (a new ledger_id and admin, the snapshot overwritten at stop).
        let snapshot_path = dir.snapshot_path();
        let held_one = snapshot_path.exists();
        let log = tokio::task::spawn_blocking(move || {
            if held_one {
                SledLog::open_existing(&ledger_dir, &opts).map_err(|e| match e {
                    e @ Error::NoLedger { .. } => lost_ledger(e.to_string(), &snapshot_path),
                    other => other,
                })
            } else {
                SledLog::open(&ledger_dir, &opts)
            }
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))??;
        // A log with no event where a snapshot of a ledger with events remains: the log was
        // replaced by another, empty one (a new ledger_id, so the snapshot reads as another
        // ledger's and would be discarded): the same loss as a missing log.
        if held_one && log.head()?.offset == 0 {
            if let Ok(Some(s)) = crate::ledger::snapshot::load(&dir.snapshot_path()) {
                if s.offset > 0 {
                    return Err(lost_ledger(
                        format!("{} holds no event", dir.ledger_dir().display()),
                        &dir.snapshot_path(),
                    ));
                }
            }
        }
        let log = Arc::new(log);
        let db = log.db().clone();
        let ledger_opts = LedgerOptions {
            queue_capacity: args.queue_capacity as usize,
            max_batch: args.max_batch as usize,
            snapshot_every: args.snapshot_every,
            hub_capacity: 1_024,
            snapshot_path: Some(dir.snapshot_path()),
        };
        let started = std::time::Instant::now();
        let m = metrics.clone();
        let dyn_log: Arc<dyn EventLog> = log.clone();
        let (ledger, restore) =
            tokio::task::spawn_blocking(move || Ledger::open(dyn_log, ledger_opts, m))
                .await
                .map_err(|e| Error::Other(e.to_string()))??;
        let info = ledger.info();
        match &restore {
            Restore::Empty => tracing::info!(ledger_id = %info.ledger_id, "new or empty ledger"),
            Restore::FullReplay { events, reason } => tracing::info!(
                ledger_id = %info.ledger_id, events, reason = reason.as_deref().unwrap_or("no snapshot"),
                elapsed_ms = started.elapsed().as_millis() as u64, "projection rebuilt from the log"
            ),
            Restore::Snapshot { offset, tail } => tracing::info!(
                ledger_id = %info.ledger_id, snapshot_offset = offset, tail,
                elapsed_ms = started.elapsed().as_millis() as u64, "projection restored from snapshot"
            ),
        }

        // A too-short ALARM_LEDGER_JWT_SECRET is a usage error (exit 2; the command line's parser
        // refuses it first, before anything is opened); a secret file that cannot be read or
        // made, or a damaged one, is not (exit 1).
        let secret =
            crate::auth::token::load_or_create_secret(dir.root(), args.jwt_secret.as_deref())
                .map_err(|e| match e {
                    crate::auth::token::SecretError::EnvTooShort(_) => Error::Config(e.to_string()),
                    other => Error::Other(other.to_string()),
                })?;
        let ttl = chrono::Duration::from_std(args.token_ttl)
            .map_err(|e| Error::Config(format!("ALARM_LEDGER_TOKEN_TTL: {e}")))?;
        let tokens = TokenService::new(secret, ttl);
        tokens
            .self_test()
            .map_err(|e| Error::Other(format!("token self-test failed: {e}")))?;
        let users = UserStore::open(&db).map_err(|e| Error::Storage(e.to_string()))?;
        let admin_pw = args.admin_password.clone();
        let first_start = users
            .is_empty()
            .map_err(|e| Error::Storage(e.to_string()))?;
        if !first_start && admin_pw.is_some() {
            // Kept out of the ledger's users once they exist: an operator who set it to reset a
            // lost password would otherwise believe it had worked.
            tracing::warn!(
                "--admin-password (ALARM_LEDGER_ADMIN_PASSWORD) is ignored: it sets the password \
                 of the first admin on the first start only, and this ledger has users; change a \
                 password with `alarm-ledger user passwd NAME` (server stopped) or \
                 PATCH /api/v1/users/NAME"
            );
        }
        let generated_admin_password = users.bootstrap_admin(admin_pw.as_deref()).map_err(|e| {
            if e.is_client_fault() {
                Error::Config(format!("ALARM_LEDGER_ADMIN_PASSWORD: {e}"))
            } else {
                Error::Storage(format!("cannot create the first admin: {e}"))
            }
        })?;
        // Everything after the first admin's creation: if it fails, the generated password is
        // shown anyway, since the next start finds the account and never prints one.
        let rest = (|| {
            let security = SecurityLog::open(&db, info.ledger_id)
                .map_err(|e| Error::Storage(e.to_string()))?;
            // Also when the admin exists but its creation was never recorded: a crash between
            // creating the account and appending its entry left no entry, and the next start is no
            // longer a first start.
            let unrecorded_bootstrap = security.head().0 == 0
                && users
                    .get(crate::auth::users::BOOTSTRAP_ADMIN)
                    .map_err(|e| Error::Storage(e.to_string()))?
                    .is_some();
            if first_start || unrecorded_bootstrap {
                security
                    .append(
                        NewSecurityEntry::new(SecurityAction::UserCreated)
                            .actor("server")
                            .target(crate::auth::users::BOOTSTRAP_ADMIN)
                            .detail("role", Role::Admin.as_str())
                            .detail("via", "bootstrap"),
                    )
                    .map_err(|e| Error::Storage(e.to_string()))?;
            }
            log.sync()?;
            let auth = Arc::new(AuthCtx {
                users,
                tokens,
                throttle: LoginThrottle::new(args.login_max_failures, args.login_window, 100_000),
                security,
                hasher: crate::http::Hasher::start()?,
                refreshes: crate::auth::throttle::PerUserLimit::refreshes(),
                audit_reads: crate::auth::throttle::PerUserLimit::audit_reads(),
            });

            if let Restore::Snapshot { offset, .. } = restore {
                // The snapshot let us skip replaying offsets 1..=offset; verify them anyway, in the
                // background, so a large ledger starts fast and is still checked end to end.
                let l = ledger.clone();
                // Lowest priority: it reads the whole log prefix (seconds for a million events)
                // while the server already serves.
                crate::background::spawn("integrity-scrub", move || {
                    let t = std::time::Instant::now();
                    if let Ok(true) = l.scrub(offset) {
                        tracing::info!(
                            events = offset,
                            elapsed_ms = t.elapsed().as_millis() as u64,
                            "integrity check of the snapshot prefix passed"
                        );
                    }
                })?;
            }
            ledger.start()?;
            Ok::<_, Error>(auth)
        })();
        let auth = match rest {
            Ok(auth) => auth,
            Err(e) => {
                if let Some(pw) = &generated_admin_password {
                    crate::telemetry::admin_password_notice(
                        "Start-up failed after creating user",
                        pw,
                    );
                }
                return Err(e);
            }
        };
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let open_files = crate::memory::open_files_limit();
        let max_connections = ConnectionLimit::effective(args.max_connections, open_files) as usize;
        if (max_connections as u64) < args.max_connections {
            tracing::warn!(
                configured = args.max_connections,
                max_connections,
                open_files,
                "--max-connections lowered to what the open-files limit (ulimit -n) can hold"
            );
        }
        let state = Arc::new(AppState {
            ledger: ledger.clone(),
            db,
            auth,
            settings: ApiSettings {
                ws_ping_interval: args.ws_ping_interval,
                ws_idle_timeout: args.ws_idle_timeout,
                ws_max_message: args.ws_max_message as usize,
                ws_stall_timeout: args.ws_stall_timeout,
                ws_command_rate: args.ws_command_rate,
                trusted_proxies: args.trusted_proxies.clone(),
                data_dir: dir.root().to_path_buf(),
            },
            connection_limit: ConnectionLimit::new(max_connections, metrics.clone()),
            metrics,
            shutdown: shutdown_rx,
            accepting: AtomicBool::new(true),
            connections: Default::default(),
            handlers: Default::default(),
            streams: crate::http::stream::limiter(),
            disk_probe: crate::http::health::DiskProbe::new(dir.root().to_path_buf()),
            snapshot_builds: Arc::new(tokio::sync::Semaphore::new(
                crate::http::ws::MAX_SNAPSHOT_BUILDS,
            )),
            as_of_builds: Arc::new(tokio::sync::Semaphore::new(
                crate::http::queries::MAX_AS_OF_BUILDS,
            )),
            current_state: Default::default(),
            user_changes: Default::default(),
            backup_running: Default::default(),
        });
        Ok(Application {
            addr,
            listener,
            state,
            ledger,
            shutdown_tx,
            shutdown_timeout: args.shutdown_timeout,
            generated_admin_password,
            dir,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `signal` resolves, then shuts down gracefully: stop accepting, close every
    /// WebSocket with 1001, let in-flight requests and queued appends finish, write a final
    /// projection snapshot, flush. Bounded by the shutdown timeout. Returns the data directory's
    /// lock, for the shutdown checkpoint (`Stopped::checkpoint`).
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Stopped> {
        let Application {
            listener,
            state,
            ledger,
            shutdown_tx,
            shutdown_timeout,
            dir,
            ..
        } = self;
        let routes = http::routes(state.clone());
        let mut stop_rx = shutdown_tx.subscribe();
        let graceful = async move {
            let _ = stop_rx.wait_for(|v| *v).await;
        };
        let server = tokio::spawn(http::server::serve(
            listener,
            state.clone(),
            routes,
            graceful,
        ));
        signal.await;
        tracing::info!("shutdown requested");
        state.accepting.store(false, Ordering::Relaxed);
        let _ = shutdown_tx.send(true);
        let drain = async {
            let _ = server.await;
            // WebSocket connections answer what they already sent to the writer (which runs
            // until `stop`), then close with 1001; HTTP handlers detached from their
            // connections finish (a user change with its security-log entry, a backup).
            state.connections.all_closed().await;
            state.handlers.all_closed().await;
        };
        if tokio::time::timeout(shutdown_timeout, drain).await.is_err() {
            tracing::warn!(timeout = ?shutdown_timeout, "shutdown deadline passed; abandoning the connections still open");
        }
        // The writer finishes its queue and writes the final snapshot whatever the connections
        // did, under a bound of its own: past it, exit 1 without the snapshot (everything
        // acknowledged is already durable; the next start replays the log's tail).
        let l = ledger.clone();
        let stop = tokio::task::spawn_blocking(move || l.stop());
        if tokio::time::timeout(shutdown_timeout, stop).await.is_err() {
            tracing::error!(timeout = ?shutdown_timeout, "the writer did not stop in time; exiting without the final snapshot");
            // The writer may still write until the process exits: keep the directory locked.
            std::mem::forget(dir);
            return Err(Error::Other(format!(
                "the writer did not stop within {shutdown_timeout:?} (acknowledged events are durable; the next start replays the log's tail)"
            )));
        }
        if let Err(e) = ledger.log().sync() {
            // No checkpoint on a disk that just failed: exit 1 (what was acknowledged was
            // durable when it was acknowledged; the next start recovers as after a crash).
            tracing::error!(error = %e, "final flush failed");
            std::mem::forget(dir);
            return Err(Error::Storage(format!("final flush failed: {e}")));
        }
        if let Some(why) = ledger.integrity_failure() {
            // The checkpoint opens sled once more, and sled's recovery rewrites a damaged tail:
            // leave the directory as it is for `verify` and a restore (exit 1).
            std::mem::forget(dir);
            return Err(Error::Other(format!(
                "stopped without the shutdown checkpoint (and, once the check had failed, \
                 without a final snapshot): {why}; run `alarm-ledger verify` on the directory, \
                 and restore it from a backup"
            )));
        }
        tracing::info!("stopped");
        Ok(Stopped {
            dir,
            budget: shutdown_timeout,
        })
    }
}

/// Removes the `<stamp>.partial` directories an online backup cut short (the server killed
/// during the copy) left in `backups/`: a partial copy is not a backup, and a later backup
/// never finishes it. Ours alone: the data directory's lock is held and no backup runs yet.
/// Logged, one line each; best effort.
fn remove_cut_short_backups(backups: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(backups) else {
        return; // no backups/ yet
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let partial = path.extension().is_some_and(|e| e == "partial");
        if !partial || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::warn!(path = %path.display(), "removed an online backup that was cut short (the server stopped during the copy)")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "an online backup was cut short and could not be removed; remove it by hand")
            }
        }
    }
}

/// A data directory whose log is gone or empty but whose projection snapshot is still there held
/// a ledger: starting would found a new, empty one in its place (a new ledger_id, a new `admin`,
/// and at the next stop a snapshot overwriting the last trace of the old one). That is a lost
/// or half-restored directory, not a first start: refuse, and say what to do.
///
/// The refusal to start a new ledger where `snapshot` shows one was: what was `found`, what the
/// directory held, and what to do.
fn lost_ledger(found: String, snapshot: &std::path::Path) -> Error {
    let held = match crate::ledger::snapshot::load(snapshot) {
        Ok(Some(s)) => format!("ledger {} at offset {}", s.ledger_id, s.offset),
        _ => "a ledger".to_string(),
    };
    Error::Other(format!(
        "{found}, but {} shows this directory held {held}: restore the directory from a backup \
         (a new ledger is not started over a lost one); to start a new ledger here on purpose, \
         move {} away first",
        snapshot.display(),
        snapshot.display()
    ))
}
