//! Tracing setup: human-readable by default, JSON lines with `--log-format json`; level from
//! `RUST_LOG` (default `info`). Logs never carry secrets: tokens and passwords are not fields of
//! any span or event.

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// The format `init` set up, for the few lines printed outside `tracing`.
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Whether stderr is JSON lines (`--log-format json`), as set up by `init`.
pub fn json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A line that cannot be written (stderr a closed pipe: a log collector or `| tee` that
        // died) is dropped: tracing's report of it goes to stderr through `eprintln`, which
        // panics on that error, in whatever task was logging (a request, the writer).
        .log_internal_errors(false)
        // Colours only on a terminal: files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // try_init: tests may initialise twice.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// One stderr line in the shape of the JSON log (`--log-format json`) for what is printed
/// outside `tracing`: the first-start password (which must reach no other log output), a fatal
/// error after the subscriber may be gone, and a configuration error found before it exists.
pub fn json_line(
    level: &str,
    message: &str,
    mut fields: serde_json::Map<String, serde_json::Value>,
) {
    fields.insert(
        "timestamp".into(),
        crate::time::Timestamp::now().to_rfc3339().into(),
    );
    fields.insert("level".into(), level.into());
    fields.insert("message".into(), message.into());
    stderr_line(&serde_json::Value::Object(fields).to_string());
}

/// The one notice that carries the generated `admin` password: on stderr, once, outside
/// `tracing` (it must reach no log filter's or layer's other outputs). `what` leads up to the
/// account ("First start: created user", "Start-up failed after creating user"); as one JSON
/// line with `--log-format json`, else as the human banner.
pub fn admin_password_notice(what: &str, password: &str) {
    const CHANGE: &str = "shown once; change it with `alarm-ledger user passwd admin`";
    if json() {
        let mut fields = serde_json::Map::new();
        fields.insert("username".into(), "admin".into());
        fields.insert("password".into(), password.into());
        json_line(
            "WARN",
            &format!(
                "{} admin with a random password ({CHANGE})",
                what.to_lowercase()
            ),
            fields,
        );
    } else {
        stderr_line(&format!(
            "\n  {what} `admin` with password: {password}\n  ({CHANGE})\n"
        ));
    }
}

/// Writes a line on stderr, or nothing if it cannot be written: `eprintln` panics when stderr
/// is a closed pipe, and a server (or a tool's exit) must not depend on its log reader.
pub fn stderr_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Writes a result line on stdout. `println` panics when stdout is a closed pipe (`| head`);
/// this is an error the tool reports and exits 1 for.
pub fn stdout_line(line: &str) -> Result<(), crate::error::Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .map_err(|e| crate::error::Error::Other(format!("cannot write to standard output: {e}")))
}

/// Prints a fatal error on stderr: one JSON line with `json`, else the text as is.
pub fn fatal_line(json: bool, message: &str) {
    if json {
        json_line("ERROR", message.trim_end(), serde_json::Map::new());
    } else {
        stderr_line(message.trim_end());
    }
}

/// Whether the command line or the environment asks for `--log-format json`, read before
/// (or without) a successful parse: an invalid command line must still be reported in the
/// format its collector expects. The last `--log-format` given wins, as in clap; the
/// environment counts only when no flag is given.
pub fn json_requested<I: IntoIterator<Item = std::ffi::OsString>>(
    args: I,
    env: Option<std::ffi::OsString>,
) -> bool {
    let mut flag: Option<bool> = None;
    let mut args = args.into_iter().skip(1);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy().into_owned();
        if a == "--" {
            break;
        }
        if a == "--log-format" {
            if let Some(v) = args.next() {
                flag = Some(v.to_string_lossy().eq_ignore_ascii_case("json"));
            }
        } else if let Some(v) = a.strip_prefix("--log-format=") {
            flag = Some(v.eq_ignore_ascii_case("json"));
        }
    }
    flag.unwrap_or_else(|| env.is_some_and(|v| v.to_string_lossy().eq_ignore_ascii_case("json")))
}

#[cfg(test)]
mod tests {
    use super::json_requested;

    fn asks(args: &[&str], env: Option<&str>) -> bool {
        json_requested(
            std::iter::once("alarm-ledger")
                .chain(args.iter().copied())
                .map(Into::into),
            env.map(Into::into),
        )
    }

    #[test]
    fn json_is_read_from_the_flag_then_the_environment() {
        assert!(!asks(&["serve", "--bogus"], None));
        assert!(asks(&["--log-format", "json", "serve", "--bogus"], None));
        assert!(asks(&["serve", "--log-format=json", "--bogus"], None));
        assert!(asks(&["serve", "--bogus"], Some("json")));
        assert!(
            !asks(&["--log-format", "human", "serve"], Some("json")),
            "the flag wins"
        );
        assert!(
            !asks(&["--log-format", "json", "--log-format", "human"], None),
            "the last wins"
        );
        assert!(
            !asks(&["export", "--", "--log-format", "json"], None),
            "after --"
        );
        assert!(!asks(&["--log-format"], None), "no value");
    }
}
