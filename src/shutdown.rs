//! The shutdown signal: SIGTERM, SIGINT (Ctrl-C) or SIGHUP (the terminal went away). SIGHUP is
//! handled only when it is at its default action: under `nohup` (or `trap '' HUP`) it stays
//! ignored, as asked. Nothing is reloaded on SIGHUP: the configuration is read at start only.
//!
//! The handlers are installed before the server opens anything (`Signals::install`), not when
//! the shutdown future is first polled: a SIGTERM that arrived between "listening" and that poll
//! met the default disposition and killed the process without a graceful stop (no final
//! snapshot, connections reset). A signal during start-up ends the start at once (exit 1).
//!
//! A second SIGTERM or SIGINT during the graceful stop ends the process at once (exit 1): an
//! operator pressing Ctrl-C twice means it (a SIGHUP never does, and a stop a SIGHUP started
//! takes the first SIGTERM or SIGINT after it as its own: they often come together). What was acknowledged is durable anyway; the next start
//! replays the log's tail instead of loading a final snapshot.

use tokio::signal::unix::{signal, Signal, SignalKind};

pub struct Signals {
    term: Option<Signal>,
    int: Option<Signal>,
    hup: Option<Signal>,
}

impl Signals {
    /// Installs the SIGTERM, SIGINT and (unless it is ignored) SIGHUP handlers now (inside the
    /// runtime). A handler that cannot be installed is logged and left out.
    pub fn install() -> Signals {
        let install = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, signal = name, "cannot install the signal handler");
                None
            }
        };
        Signals {
            term: install(SignalKind::terminate(), "SIGTERM"),
            int: install(SignalKind::interrupt(), "SIGINT"),
            hup: hup_is_default()
                .then(|| install(SignalKind::hangup(), "SIGHUP"))
                .flatten(),
        }
    }

    /// Resolves at the next SIGTERM, SIGINT or (handled) SIGHUP; true for SIGHUP.
    pub async fn wait(&mut self) -> bool {
        async fn recv(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            // SIGTERM first when both are pending (the kernel delivers SIGHUP, the lower number,
            // first; systemd sends SIGTERM, then SIGHUP).
            biased;
            _ = recv(&mut self.term) => tracing::info!("SIGTERM"),
            _ = recv(&mut self.int) => tracing::info!("SIGINT"),
            _ = recv(&mut self.hup) => {
                tracing::info!("SIGHUP");
                return true;
            }
        }
        false
    }
}

/// After the first signal (`first_was_hup`: a SIGHUP), the next SIGTERM or SIGINT exits the
/// process at once. A SIGHUP never does, and a stop a SIGHUP started takes a SIGTERM or SIGINT
/// as its own start, not as a second signal: the two often come together (systemd's
/// `SendSIGHUP=yes`, a closing terminal), in either order.
pub fn exit_on_second(mut signals: Signals, first_was_hup: bool) {
    tokio::spawn(async move {
        let mut armed = !first_was_hup;
        loop {
            if signals.wait().await {
                continue;
            }
            if armed {
                break;
            }
            armed = true;
        }
        // tracing writes stderr synchronously: the line is out before the exit.
        tracing::warn!("second signal during shutdown: exiting now");
        std::process::exit(1);
    });
}

/// The current action of signal `sig` (`SIG_DFL`, `SIG_IGN` or a handler), if it can be read.
pub fn disposition(sig: libc::c_int) -> Option<libc::sighandler_t> {
    // SAFETY: sigaction with a null new action only reads the current one into a zeroed struct.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        (libc::sigaction(sig, std::ptr::null(), &mut old) == 0).then_some(old.sa_sigaction)
    }
}

/// Whether SIGHUP is at its default action (not ignored by `nohup` or the parent).
fn hup_is_default() -> bool {
    disposition(libc::SIGHUP) == Some(libc::SIG_DFL)
}

/// Gives SIGTERM and SIGINT (and SIGHUP, unless it was ignored) back their default action (end
/// the process), for the last phase of a stop that runs after the runtime, whose handlers caught
/// them, is gone (the shutdown checkpoint): a signal then still ends the process at once instead
/// of being swallowed.
pub fn restore_default_signals() {
    let hup_ignored = disposition(libc::SIGHUP) == Some(libc::SIG_IGN);
    // SAFETY: signal(2) with SIG_DFL installs no handler code; no Rust state is involved.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        if !hup_ignored {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
        }
    }
}
