//! Offline subcommands on a data directory: `user`, `export`, `verify`, `backup`. Each takes
//! the directory's lock first, so on a directory a running server holds it fails at once with a
//! clear message instead of hanging or tripping over sled. They are the binary's: the process
//! exits when one returns (`ReadView::finish`).

use crate::auth::{NewSecurityEntry, SecurityAction, SecurityLog, UserStore};
use crate::config::AsOf;
use crate::config::{
    BackupArgs, ExportArgs, ExportFormat, ReadArgs, UserAction, UserArgs, VerifyArgs,
};
use crate::error::{Error, Result};
use crate::export::{self, EventFilter};
use crate::ledger::datadir::DataDir;
use crate::read_copy::ReadView;
use crate::store::sled_log::{SledLog, SledOptions};
use crate::store::EventLog;
use crate::time::Timestamp;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// Page cache of the offline tools: they read the whole log once (and verify its two indexes
/// alongside), and sled re-fetches evicted pages; a large cache made `verify` of 1,000,000
/// events 1.7× faster (7.9 s → 4.6 s). sled only takes what it loads.
const OFFLINE_CACHE_BYTES: u64 = 1024 * 1024 * 1024;

/// Opens an existing ledger: the offline tools never create one.
fn open(dir: &DataDir) -> Result<SledLog> {
    SledLog::open_existing(
        &dir.ledger_dir(),
        &SledOptions {
            cache_bytes: OFFLINE_CACHE_BYTES,
        },
    )
}

/// `open` for a command that reads the whole log (export, verify, backup): the kernel starts
/// reading the file ahead before sled's own recovery reads it.
fn open_for_full_read(dir: &DataDir) -> Result<SledLog> {
    crate::store::sled_log::prefetch_db_file(&dir.ledger_dir());
    open(dir)
}

/// The ledger a read-only tool reads (`read_copy`: a private copy unless `--in-place`).
fn read_view(root: &Path, how: &ReadArgs) -> Result<ReadView> {
    ReadView::open(
        root,
        how.scratch.as_deref(),
        how.in_place,
        OFFLINE_CACHE_BYTES,
    )
}

fn read_password(given: Option<String>) -> Result<String> {
    if let Some(p) = given {
        return Ok(p);
    }
    // The prompt is for a person at a terminal; piped in, the password needs none (and with
    // `--log-format json` a collector would get a line that is not JSON).
    let stdin = std::io::stdin();
    if std::io::IsTerminal::is_terminal(&stdin) {
        crate::telemetry::stderr_line("password (one line on stdin):");
    }
    let mut line = String::new();
    if stdin.read_line(&mut line)? == 0 {
        return Err(Error::Config(
            "no password given: pass --password, set ALARM_LEDGER_NEW_PASSWORD or write it on stdin"
                .into(),
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

pub fn user(args: UserArgs) -> Result<()> {
    // What the operator gives is read and checked before the directory is locked and opened: a
    // weak password is a usage error (exit 2), not a failure after sled was opened.
    let new_password = match &args.action {
        UserAction::Add { password, .. } | UserAction::Passwd { password, .. } => {
            let pw = read_password(password.clone())?;
            crate::auth::password::validate_password(&pw)
                .map_err(|e| Error::Config(format!("password: {e}")))?;
            Some(pw)
        }
        _ => None,
    };
    if let UserAction::List { read } = &args.action {
        // Reads only: from a private copy, as `verify` and `export` (`ReadView`).
        crate::read_copy::handle_signals();
        let view = read_view(&args.data.data, read)?;
        let users = UserStore::open(view.log.db()).map_err(|e| Error::Storage(e.to_string()))?;
        for u in users.list().map_err(|e| Error::Storage(e.to_string()))? {
            crate::telemetry::stdout_line(&format!(
                "{}\t{}\t{}\t{}",
                u.username,
                u.role.as_str(),
                if u.disabled { "disabled" } else { "enabled" },
                Timestamp::from_datetime(u.created_at)
            ))?;
        }
        drop(users);
        return view.finish();
    }
    let dir = DataDir::lock_existing(&args.data.data)?;
    let log = open(&dir)?;
    let users = UserStore::open(log.db()).map_err(|e| Error::Storage(e.to_string()))?;
    let security = SecurityLog::open(log.db(), log.info().ledger_id)
        .map_err(|e| Error::Storage(e.to_string()))?;
    // `role`: the role given (creation, role change), recorded like the HTTP routes do.
    let audit_with = |action: SecurityAction, target: &str, role: Option<(&str, &str)>| {
        let mut e = NewSecurityEntry::new(action)
            .actor("cli")
            .target(target)
            .detail("via", "cli");
        if let Some((k, v)) = role {
            e = e.detail(k, v);
        }
        security
            .append(e)
            .map(|_| ())
            .map_err(|e| Error::Storage(e.to_string()))
    };
    let audit = |action: SecurityAction, target: &str| audit_with(action, target, None);
    // A value the command line gave (a name, a password) is a bad argument, exit 2 like every
    // other; an unknown user, an existing one or the last-admin guard, exit 1.
    let auth = |e: crate::auth::AuthError| {
        use crate::auth::AuthError as A;
        match e {
            A::InvalidUsername(_) | A::WeakPassword | A::PasswordTooLong | A::InvalidRole(_) => {
                Error::Config(e.to_string())
            }
            other => Error::Other(other.to_string()),
        }
    };
    match args.action {
        UserAction::Add { name, role: r, .. } => {
            let pw = new_password.unwrap_or_default();
            let info = users.add(&name, &pw, r).map_err(auth)?;
            audit_with(
                SecurityAction::UserCreated,
                &name,
                Some(("role", r.as_str())),
            )?;
            crate::telemetry::stdout_line(&format!(
                "added {} ({})",
                info.username,
                info.role.as_str()
            ))?;
        }
        // Handled above, from a private copy.
        UserAction::List { .. } => {}
        UserAction::Passwd { name, .. } => {
            let pw = new_password.unwrap_or_default();
            users.set_password(&name, &pw).map_err(auth)?;
            audit(SecurityAction::UserPasswordChanged, &name)?;
            crate::telemetry::stdout_line(&format!("password changed for {name}"))?;
        }
        UserAction::Role { name, role: r } => {
            // What changed, not what was asked (like the HTTP route).
            let (before, _) = users
                .change(
                    &name,
                    crate::auth::users::UserChange {
                        role: Some(r),
                        ..Default::default()
                    },
                )
                .map_err(auth)?;
            if before.role != r {
                audit_with(
                    SecurityAction::UserRoleChanged,
                    &name,
                    Some(("role", r.as_str())),
                )?;
            }
            crate::telemetry::stdout_line(&format!("{name} is now {}", r.as_str()))?;
        }
        UserAction::Disable { name, enable } => {
            let (before, _) = users
                .change(
                    &name,
                    crate::auth::users::UserChange {
                        disabled: Some(!enable),
                        ..Default::default()
                    },
                )
                .map_err(auth)?;
            if before.disabled == enable {
                let action = if enable {
                    SecurityAction::UserEnabled
                } else {
                    SecurityAction::UserDisabled
                };
                audit(action, &name)?;
            }
            crate::telemetry::stdout_line(&format!(
                "{name} {}",
                if enable { "enabled" } else { "disabled" }
            ))?;
        }
    }
    log.sync()
}

pub fn export(args: ExportArgs) -> Result<()> {
    // A swapped pair is a mistake to report, not an empty extract to hand over (exit 0).
    let bounds = EventFilter {
        from: args.from,
        to: args.to,
        since: args.since,
        until: args.until,
        ..EventFilter::default()
    };
    if let Some(why) = bounds.inverted() {
        return Err(Error::Config(why.describe("--")));
    }
    let target = args.out.as_deref().map(out_target).transpose()?;
    if let Some(OutTarget::File(out) | OutTarget::Stream(out)) = &target {
        crate::read_copy::refuse_output_inside("--out", out, &args.data.data, None)?;
    }
    crate::read_copy::handle_signals();
    let view = read_view(&args.data.data, &args.read)?;
    // As `GET /api/v1/events` (416): a start beyond the head + 1 is a mistake, not an empty
    // export (`from` is inclusive: head + 1 is where the next event will be).
    let head = view.log.head()?.offset;
    if let Some(from) = args.from.filter(|&f| f > head.saturating_add(1)) {
        return Err(Error::Other(format!(
            "offset out of range: --from {from} is beyond the head {head} (+ 1)"
        )));
    }
    match target {
        Some(OutTarget::File(path)) => export_to_file(&view.log, &args, &path)?,
        Some(OutTarget::Stream(path)) => {
            let mut out = BufWriter::with_capacity(256 * 1024, create(&path)?);
            write_export(&view.log, &args, &mut out)?;
        }
        Some(OutTarget::Descriptor(file)) => {
            let mut out = BufWriter::with_capacity(256 * 1024, file);
            write_export(&view.log, &args, &mut out)?;
        }
        None => {
            let mut out = BufWriter::with_capacity(256 * 1024, std::io::stdout().lock());
            write_export(&view.log, &args, &mut out)?;
        }
    }
    view.finish()
}

/// Where `export --out PATH` writes.
#[derive(Debug)]
enum OutTarget {
    /// `/dev/stdout`, `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N` (also through symlinks):
    /// that descriptor of this process, duplicated, as a shell redirection gave it (a pipe, or a
    /// file opened for appending that reopening by name would truncate or rename over).
    /// Duplicated at once, before the tool opens anything: a descriptor number that was not
    /// open could otherwise be one of sled's files by the time the export is written.
    Descriptor(std::fs::File),
    /// Not a regular file (a FIFO, a device): written through, as a stream.
    Stream(PathBuf),
    /// A regular file, new or existing, every symlink on the way resolved: written under a
    /// staging name beside it and renamed over it. A symlink given stays a symlink, now to the
    /// new file (renaming over the link itself had replaced it, `/dev/stdout` included).
    File(PathBuf),
}

/// The descriptor a path names when it is one of this process's descriptor aliases.
fn descriptor_alias(path: &Path) -> Option<std::os::fd::RawFd> {
    let s = path.to_str()?;
    match s {
        "/dev/stdin" => return Some(0),
        "/dev/stdout" => return Some(1),
        "/dev/stderr" => return Some(2),
        _ => {}
    }
    let pid = format!("/proc/{}/fd/", std::process::id());
    [
        "/dev/fd/",
        "/proc/self/fd/",
        "/proc/thread-self/fd/",
        pid.as_str(),
    ]
    .iter()
    .find_map(|prefix| s.strip_prefix(prefix)?.parse().ok())
}

fn out_target(path: &Path) -> Result<OutTarget> {
    let bad = |what: String| Error::Config(format!("--out {}: {what}", path.display()));
    let given = std::path::absolute(path).map_err(|e| bad(e.to_string()))?;
    let mut at = given.clone();
    for _ in 0..40 {
        if let Some(fd) = descriptor_alias(&at) {
            return Ok(OutTarget::Descriptor(duplicate(fd)?));
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&at).map_err(|e| bad(e.to_string()))?;
                let dir = crate::staging::parent_dir(&at);
                let dir = std::fs::canonicalize(&dir).map_err(|e| bad(e.to_string()))?;
                at = std::path::absolute(dir.join(target)).map_err(|e| bad(e.to_string()))?;
            }
            Ok(_) => {
                // Where it really is (`..`, symlinked directories, `/proc/self/cwd/...`), so the
                // inside-the-data-directory check sees the real place.
                let real = std::fs::canonicalize(&at).map_err(|e| bad(e.to_string()))?;
                let meta = std::fs::metadata(&real).map_err(|e| bad(e.to_string()))?;
                return if meta.is_dir() {
                    Err(bad("is a directory".into()))
                } else if meta.is_file() {
                    Ok(OutTarget::File(real))
                } else {
                    Ok(OutTarget::Stream(real))
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if at != given {
                    return Err(bad(format!(
                        "a symlink to {}, which does not exist: give the file itself",
                        at.display()
                    )));
                }
                return Ok(OutTarget::File(path.to_path_buf()));
            }
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    Err(bad("too many levels of symbolic links".into()))
}

/// A duplicate of this process's descriptor `fd`, to write an export to.
fn duplicate(fd: std::os::fd::RawFd) -> Result<std::fs::File> {
    use std::os::fd::{BorrowedFd, OwnedFd};
    if fd < 0 {
        return Err(Error::Config(format!("--out: no descriptor {fd}")));
    }
    // SAFETY: `fd` is only borrowed for the duration of the `fcntl(F_DUPFD_CLOEXEC)` that
    // `try_clone_to_owned` makes; a descriptor that is not open fails that call (EBADF).
    let owned: OwnedFd = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .map_err(|e| Error::Config(format!("--out: descriptor {fd}: {e}")))?;
    Ok(std::fs::File::from(owned))
}

/// `--out FILE`: written to `FILE.partial` beside it, fsynced and renamed to `FILE` only once
/// complete. A failure part-way (a missing record, a full disk) must not leave a line-aligned
/// prefix under the name asked for: `verify_chain.py` would take it for a complete export of a
/// shorter ledger. On failure the `.partial` is removed and an existing `FILE` is left as it was.
/// `path` is a regular file or a new one (`OutTarget::File`).
fn export_to_file(log: &SledLog, args: &ExportArgs, path: &Path) -> Result<()> {
    let partial = crate::staging::staging_path(path)
        .ok_or_else(|| Error::Config(format!("--out {} has no file name", path.display())))?;
    // Created new, never opened as found: a `.partial` already there is another export's (one
    // running, or one killed), or a link planted there (into the data directory, say), which
    // writing through would have filled with this export.
    // Registered as it is created: interrupted (Ctrl-C, `timeout`), no half-written
    // `.partial` is left behind.
    let file = match crate::read_copy::create_new_removed_on_signal(&partial) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::Other(format!(
                "{} exists: another export to {} is running, or one was interrupted; \
                 remove it first",
                partial.display(),
                path.display()
            )))
        }
        Err(e) => {
            return Err(Error::Other(format!(
                "cannot create {}: {e}",
                partial.display()
            )))
        }
    };
    // A failure of the file (a full disk) names it; a failure of the log says what it says.
    let named = |e: Error| match e {
        Error::Io(e) => Error::Other(format!("cannot write {}: {e}", partial.display())),
        other => other,
    };
    let written = write_durably(log, args, file)
        .map_err(named)
        .and_then(|()| {
            crate::staging::publish(&partial, path).map_err(|e| {
                Error::Other(format!(
                    "cannot rename {} to {}: {e}",
                    partial.display(),
                    path.display()
                ))
            })
        });
    if let Err(e) = written {
        // Ours, and closed by now: nothing half-written is left under either name.
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    Ok(())
}

/// Creates an export's file; a failure names it.
fn create(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", path.display())))
}

/// The export into `file` (new), fsynced; the file is closed when this returns.
fn write_durably(log: &SledLog, args: &ExportArgs, file: std::fs::File) -> Result<()> {
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    write_export(log, args, &mut out)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(())
}

/// The export itself, to `out` (flushed at the end).
fn write_export(log: &SledLog, args: &ExportArgs, out: &mut impl Write) -> Result<()> {
    let head = log.head()?.offset;
    let ledger_id = log.info().ledger_id;
    if args.state {
        let offset = match args.as_of {
            None => head,
            Some(AsOf::Offset(n)) => n.min(head),
            Some(AsOf::Time(t)) => export::offset_at_time(log, head, t)?,
        };
        let p = export::state_as_of(log, offset)?;
        let alarms: Vec<_> = p.alarms_sorted().iter().map(|a| a.to_json()).collect();
        let doc = serde_json::json!({"ledger_id": ledger_id.to_string(), "offset": offset, "alarms": alarms});
        writeln!(out, "{doc}")?;
        out.flush()?;
        return Ok(());
    }
    let filter = EventFilter {
        from: args.from,
        to: args.to,
        since: args.since,
        until: args.until,
        alarm_id: args.alarm,
        actor: args.actor.clone(),
        limit: None,
    };
    let total = filter
        .to
        .unwrap_or(head)
        .min(head)
        .saturating_sub(filter.from.unwrap_or(1).max(1) - 1);
    let bar = (std::io::stderr().is_terminal() && total > 100_000).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} events {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    // CSV records end with CRLF (RFC 4180); NDJSON lines with LF.
    let eol: &[u8] = match args.format {
        ExportFormat::Csv => b"\r\n",
        ExportFormat::Ndjson => b"\n",
    };
    if args.format == ExportFormat::Csv {
        out.write_all(export::CSV_HEADER.as_bytes())?;
        out.write_all(eol)?;
    }
    let mut io_err = None;
    let mut n = 0u64;
    let mut line = Vec::with_capacity(512);
    export::for_each(log, head, &filter, |e| {
        line.clear();
        match args.format {
            ExportFormat::Ndjson => crate::protocol::write_export_line(&mut line, e, ledger_id),
            ExportFormat::Csv => line.extend_from_slice(export::csv_row(e, ledger_id).as_bytes()),
        }
        line.extend_from_slice(eol);
        if let Err(err) = out.write_all(&line) {
            io_err = Some(err);
            return false;
        }
        n += 1;
        if let Some(b) = &bar {
            if n % 4096 == 0 {
                b.set_position(e.offset - filter.from.unwrap_or(1).max(1) + 1);
            }
        }
        true
    })?;
    // A reader that went away (`| head`, a closed FIFO) cut the export short: that is an error
    // (exit 1), never a success that would pass a truncated audit trail for a whole one.
    if let Some(e) = io_err {
        return Err(truncated(e));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out.flush().map_err(truncated)?;
    Ok(())
}

/// An export's write error, said plainly when the reader went away.
fn truncated(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Error::Other(
            "the output was closed before the export was complete (broken pipe): what was \
             written is a truncated export"
                .into(),
        )
    } else {
        e.into()
    }
}

pub fn verify(args: VerifyArgs) -> Result<String> {
    crate::read_copy::handle_signals();
    let view = read_view(&args.data.data, &args.read)?;
    let log = &view.log;
    let mut report = crate::verify::verify_log(log, Some(&view.snapshot))
        .map_err(|e| view.name_source(e, &args.data.data))?;
    if let Some(why) = &report.snapshot_discarded {
        tracing::warn!(
            snapshot = %args.data.data.join("projection.snapshot").display(),
            reason = %why,
            "the projection snapshot was not checked: a server started here discards it and \
             rebuilds the projection from the log (the log itself is verified)"
        );
    }
    let security = SecurityLog::open(log.db(), log.info().ledger_id)
        .map_err(|e| Error::Storage(e.to_string()))?;
    let (n, _) = security.verify().map_err(|why| Error::Corrupt {
        offset: 0,
        reason: format!("security log: {why}"),
    })?;
    report.security_entries = n;
    drop(security);
    view.finish()?;
    Ok(format!(
        "ok {} events, head {} {}",
        report.events,
        report.head,
        report.head_hash.to_hex()
    ))
}

pub fn backup(args: BackupArgs) -> Result<String> {
    let data = &args.data.data;
    crate::read_copy::refuse_output_inside("--to", &args.to, data, Some(&data.join("backups")))?;
    // Before anything is opened (sled's threads inherit the signal mask): stopped by SIGINT,
    // SIGTERM or SIGHUP (Ctrl-C), the copy in progress is removed as a failed one is, since a
    // `.partial` left behind would block the next backup to that name (`removed_on_signal`).
    crate::read_copy::handle_signals();
    let dir = DataDir::lock_existing(data)?;
    let log = open_for_full_read(&dir)?;
    let head = log.head()?;
    // A snapshot that proves events lost or rewritten stops `serve` and `verify`; the copy,
    // with a snapshot rebuilt from the log as it is now, would verify clean and erase that
    // evidence. One the server would discard is no evidence of anything: the copy goes on.
    // A snapshot that passes that but whose alarms differ from the log's at its offset is
    // caught during the copy (`expect_snapshot`), as `verify` and the server's check catch it.
    let usable = match crate::ledger::judge_snapshot(&log, &dir.snapshot_path(), head)? {
        crate::ledger::SnapshotVerdict::Usable(s) => Some(s),
        crate::ledger::SnapshotVerdict::Discarded(why) => {
            tracing::warn!(reason = %why, "the source's projection snapshot is discarded (the copy gets one rebuilt from the log)");
            None
        }
        crate::ledger::SnapshotVerdict::Absent => None,
    };
    let head = head.offset;
    let security = SecurityLog::open(log.db(), log.info().ledger_id)
        .map_err(|e| Error::Storage(e.to_string()))?;
    let (security_head, _) = security.head();
    let secret = dir.root().join(crate::auth::token::SECRET_FILE);
    let src = crate::backup::Source {
        log: &log,
        db: log.db(),
        head,
        security_head,
        // Offline: nothing changes the users during the copy.
        users: None,
        secret_file: Some(&secret),
        // Offline: no writer shares the disk.
        chunk_pause: std::time::Duration::ZERO,
        expect_snapshot: usable.as_ref(),
        removed_on_signal: true,
    };
    let r = crate::backup::backup(&src, &args.to)?;
    // Recorded in the source's security log (after the copy, as the online backup does), so
    // the backup itself does not contain it.
    security
        .append(
            NewSecurityEntry::new(SecurityAction::BackupCreated)
                .actor("cli")
                // The absolute path (as the online backup records it): an auditor must be able
                // to tell which copy it was, whatever directory the command ran in.
                .target(
                    std::path::absolute(&r.path)
                        .unwrap_or_else(|_| r.path.clone())
                        .display()
                        .to_string(),
                )
                .detail("head", r.head)
                .detail("via", "cli"),
        )
        .map_err(|e| e.to_string())
        .and_then(|_| log.sync().map_err(|e| e.to_string()))
        .map_err(|e| {
            Error::Storage(format!(
                "the backup at {} is complete, but its security-log entry could not be written: {e}",
                r.path.display()
            ))
        })?;
    Ok(format!(
        "backup of {} events written to {}, head {} {}",
        r.head,
        r.path.display(),
        r.head,
        r.head_hash
    ))
}
