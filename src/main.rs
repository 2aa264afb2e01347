//! The `alarm-ledger` binary: parse and validate configuration (exit 2 on a bad value, before
//! anything is opened), set up logging, run the subcommand.

use alarm_ledger::config::{self, Command};
use alarm_ledger::error::Error;
use alarm_ledger::{cli, shutdown, startup::Application, telemetry};
use std::process::ExitCode;

/// mimalloc rather than glibc malloc: sled 0.34 allocates and frees a node copy or an IO buffer on
/// every insert, and with glibc's allocator `_int_malloc`, `malloc_consolidate` and friends were the
/// top of the writer's profile. mimalloc lifts the raw sled insert + flush rate of our key layout by
/// about 60% (`cargo bench --bench core -- sled_ceiling`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    alarm_ledger::memory::disable_transparent_huge_pages();
    alarm_ledger::memory::restrict_new_files();
    alarm_ledger::memory::ignore_file_size_signal();
    let args = config::parse_cli();
    telemetry::init(args.log_format);
    for var in config::unknown_env_vars() {
        tracing::warn!(variable = %var, "unknown ALARM_LEDGER_* environment variable (typo?); it is ignored");
    }
    let json = args.log_format == config::LogFormat::Json;
    let result = match args.command {
        Command::Serve(serve) => run_server(*serve, json),
        Command::User(a) => cli::user(a),
        Command::Export(a) => cli::export(a),
        Command::Verify(a) => cli::verify(a).and_then(|s| telemetry::stdout_line(&s)),
        Command::Backup(a) => cli::backup(a).and_then(|s| telemetry::stdout_line(&s)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if alarm_ledger::read_copy::stopping() => {
            // An offline tool stopped by a signal: the signal thread removes its copies and ends
            // the process by that signal. An error met meanwhile comes from that removal (the
            // scratch copy gone under a `verify`), and reporting it would be a false verdict.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                std::thread::park_timeout(left);
            }
            // The removal hangs (a scratch directory on a stuck mount): end anyway.
            telemetry::fatal_line(
                json,
                "error: stopped by a signal; its copy could not be removed in time",
            );
            ExitCode::from(1)
        }
        Err(e) => {
            // With `--log-format json`, one JSON object per line, as every other line.
            telemetry::fatal_line(json, &format!("error: {e}"));
            match e {
                Error::Config(_) => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

/// `json`: `--log-format json`, where stderr is one JSON object per line for a collector, so
/// the first-start notice is one too (and the human login hint is left out).
fn run_server(args: config::ServeArgs, json: bool) -> Result<(), Error> {
    match alarm_ledger::memory::raise_open_files_limit() {
        Some(n) if n < 4_096 => tracing::warn!(
            limit = n,
            "few open files allowed (ulimit -n): each connection takes one; raise the hard limit"
        ),
        Some(n) => tracing::debug!(limit = n, "open files allowed"),
        None => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("alarm-ledger")
        .build()?;
    let result = rt.block_on(async move {
        // Before anything is opened: a signal during start-up or right after it must stop the
        // server gracefully, not kill it (see shutdown.rs).
        let mut signals = shutdown::Signals::install();
        // A signal during start-up (a long replay) ends it at once: nothing was acknowledged
        // yet, and sled recovers a half-done start like a crash.
        let app = tokio::select! {
            app = Application::build(&args) => app?,
            // `main` prints it (`error: interrupted during start-up`) and exits 1.
            _ = signals.wait() => return Err(Error::Other("interrupted during start-up".into())),
        };
        let addr = app.local_addr();
        tracing::info!(%addr, data = %args.data.data.display(), "alarm-ledger listening");
        if let Some(pw) = &app.generated_admin_password {
            telemetry::admin_password_notice("First start: created user", pw);
        }
        if !json {
            telemetry::stderr_line(&format!(
                "  Log in: curl -s -X POST http://{addr}/api/v1/login -H 'content-type: application/json' -d '{{\"username\":\"admin\",\"password\":\"...\"}}'"
            ));
        }
        let stop = async move {
            let hup = signals.wait().await;
            shutdown::exit_on_second(signals, hup);
        };
        app.run_until_stopped(stop).await
    });
    // Blocking work still running (a writer past the shutdown deadline, a stuck disk probe)
    // must not hold the exit: the runtime's own drop would wait for it without a bound.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    // No runtime is left to handle a second signal: let it stop the process at once.
    shutdown::restore_default_signals();
    // With the runtime gone, so are the handles on the log (a blocking task abandoned above may
    // still hold one: the checkpoint then gives up at its bound).
    result?.checkpoint();
    Ok(())
}
