//! Login, token refresh, user administration, the security log and backups.
//!
//! Every login (success, failure, throttled), refresh, user change, backup and audit read is
//! appended to the security log with actor, target, address and user agent.

use super::errors::ApiError;
use super::session::{authenticate, bearer, check_token, Principal};
use super::{json_ok, Request, State};
use crate::auth::{password, NewSecurityEntry, Role, SecurityAction, UserChange};
use serde::Deserialize;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;
use warp::reply::Response;

/// A security-log entry with the request's client address and user agent.
pub(super) fn entry(state: &State, req: &Request, action: SecurityAction) -> NewSecurityEntry {
    let mut e = NewSecurityEntry::new(action);
    if let Some(ip) = req.client_ip(state) {
        e = e.address(ip.to_string());
    }
    if let Some(ua) = req.user_agent() {
        e = e.user_agent(ua);
    }
    e
}

/// Appends to the security log and makes it durable (same fdatasync as the event log).
///
/// Fails closed: if the entry cannot be written, the request it records fails with `internal`
/// (no token, no user change reported as done, no backup reported as done), so nothing that
/// grants or changes access happens unseen. A change already made when its entry fails (a
/// user change) is reported as such. Reads of the audit trail use `record_read`.
pub(super) async fn record(state: &State, e: NewSecurityEntry) -> Result<(), ApiError> {
    let st = state.clone();
    let r = tokio::task::spawn_blocking(move || {
        st.auth.security.append(e).map_err(|e| e.to_string())?;
        st.ledger.log().sync().map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    r.map_err(|e| {
        tracing::error!(error = %e, "security log append failed");
        ApiError::internal(format!("the security log could not be written: {e}"))
    })
}

/// `record` for a read of the audit trail (event export, alarm history, security log): the
/// read is served even if its entry cannot be written, because the server must stay up for
/// reads when its disk fails (full, read-only), and compliance most needs the trail then. The
/// failure is logged at error level and counted (`alarm_ledger_security_log_failures_total`).
pub(super) async fn record_read(state: &State, e: NewSecurityEntry) {
    if record(state, e).await.is_err() {
        state.metrics.security_log_failures.inc();
    }
}

fn token_answer(issued: &crate::auth::IssuedToken, name: &str, role: Role) -> Response {
    json_ok(&json!({
        "token": issued.token,
        "expires_at": crate::time::Timestamp::from_datetime(issued.expires_at).to_rfc3339(),
        "user": {"name": name, "role": role.as_str()},
    }))
}

#[derive(Deserialize)]
struct LoginBody {
    username: String,
    password: String,
}

pub async fn login(state: &State, req: &Request) -> Result<Response, ApiError> {
    let body: LoginBody = req.json()?;
    let ip = req
        .client_ip(state)
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let user: String = body.username.chars().take(128).collect();
    // Checks and counts the attempt in one step: parallel guesses cannot pass together.
    if let Err(refused) = state.auth.throttle.begin(&user, ip, Instant::now()) {
        state.metrics.logins_throttled.inc();
        if refused.first {
            record(
                state,
                entry(state, req, SecurityAction::LoginThrottled).target(user.clone()),
            )
            .await?;
        }
        return Err(ApiError::rate_limited(refused.retry_after));
    }
    let st = state.clone();
    let (name, password) = (user.clone(), body.password);
    // PBKDF2 costs ~150 ms: never on the reactor, never on every core, at low priority.
    // The token is dated from before the user record is read (`read_at`), not from its
    // issue: a password change, disable or role change written while the password was being
    // checked (~150 ms, more in the hash queue) is then later than the token and revokes it.
    // Dated at the issue, it outlived the change that should have revoked it (and, refreshed,
    // for as long as the attacker liked).
    let (read_at, result) = match state
        .auth
        .hasher
        .run(move || {
            let read_at = chrono::Utc::now();
            (read_at, st.auth.users.authenticate(&name, &password))
        })
        .await
    {
        Ok(r) => r,
        Err(e) => {
            // The password was never checked: the attempt does not count.
            state.auth.throttle.refund(&user, ip);
            return Err(e);
        }
    };
    match result {
        Ok(info) => {
            state.auth.throttle.record_success(&user, ip);
            let issued = state
                .auth
                .tokens
                .issue(&info.username, info.role, read_at)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            // A change to the user written while the password was checked has revoked this
            // token already: the login failed, and the audit trail must say so rather than
            // record a success after (say) the disable.
            if let Err(super::session::Denied::Revoked(why)) = check_token(state, &issued.token) {
                state.metrics.login_failures.inc();
                record(
                    state,
                    entry(state, req, SecurityAction::LoginFailed)
                        .target(user.clone())
                        .detail(
                            "reason",
                            format!("the account changed during the login: {why}"),
                        ),
                )
                .await?;
                return Err(ApiError::unauthorized(
                    "the account changed during the login: log in again",
                ));
            }
            record(
                state,
                entry(state, req, SecurityAction::LoginSucceeded)
                    .actor(info.username.clone())
                    .target(info.username.clone()),
            )
            .await?;
            Ok(token_answer(&issued, &info.username, info.role))
        }
        Err(e) if e.is_client_fault() => {
            // Already counted by `begin`.
            state.metrics.login_failures.inc();
            record(
                state,
                entry(state, req, SecurityAction::LoginFailed)
                    .target(user.clone())
                    .detail("reason", e.to_string()),
            )
            .await?;
            Err(ApiError::unauthorized("bad credentials"))
        }
        Err(e) => {
            state.auth.throttle.refund(&user, ip);
            Err(e.into())
        }
    }
}

pub async fn refresh(state: &State, req: &Request) -> Result<Response, ApiError> {
    let token = bearer(&req.headers)
        .ok_or_else(|| ApiError::unauthorized(super::session::MISSING_BEARER))?;
    // Dated from before the check (as a login's token): a change to the user written between
    // the check and the issue revokes the new token too.
    let read_at = chrono::Utc::now();
    let p = check_token(state, token)?;
    state
        .auth
        .refreshes
        .take(&p.name, std::time::Instant::now())
        .map_err(|wait| ApiError::budget_spent("too many token refreshes for this user", wait))?;
    let issued = state
        .auth
        .tokens
        .issue(&p.name, p.role, read_at)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    record(
        state,
        entry(state, req, SecurityAction::TokenRefreshed)
            .actor(p.name.clone())
            .target(p.name.clone()),
    )
    .await?;
    Ok(token_answer(&issued, &p.name, p.role))
}

fn admin(state: &State, req: &Request) -> Result<Principal, ApiError> {
    let p = authenticate(state, &req.headers)?;
    p.require_admin()?;
    Ok(p)
}

pub async fn list_users(state: &State, req: &Request) -> Result<Response, ApiError> {
    admin(state, req)?;
    let st = state.clone();
    let users = tokio::task::spawn_blocking(move || st.auth.users.list())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(json_ok(
        &serde_json::to_value(users).map_err(|e| ApiError::internal(e.to_string()))?,
    ))
}

/// Unknown fields are refused, as in `UserPatch`: `"disabled": true` on a creation was ignored
/// and the account created enabled.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    password: String,
    role: String,
}

fn parse_role(s: &str) -> Result<Role, ApiError> {
    s.parse::<Role>().map_err(|_| {
        ApiError::bad_request(format!("role must be admin, operator or viewer, got {s:?}"))
    })
}

pub async fn create_user(state: &State, req: &Request) -> Result<Response, ApiError> {
    let p = admin(state, req)?;
    let body: NewUser = req.json()?;
    let role = parse_role(&body.role)?;
    let st = state.clone();
    let name = body.username.clone();
    let _cut = state.user_changes.lock().await;
    let info = state
        .auth
        .hasher
        .run(move || st.auth.users.add(&name, &body.password, role))
        .await??;
    record(
        state,
        entry(state, req, SecurityAction::UserCreated)
            .actor(p.name)
            .target(info.username.clone())
            .detail("role", role.as_str()),
    )
    .await
    .map_err(applied_unrecorded)?;
    Ok(json_ok(
        &serde_json::to_value(info).map_err(|e| ApiError::internal(e.to_string()))?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserPatch {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    disabled: Option<bool>,
}

pub async fn update_user(state: &State, req: &Request, name: &str) -> Result<Response, ApiError> {
    let p = admin(state, req)?;
    let body: UserPatch = req.json()?;
    if body.role.is_none() && body.password.is_none() && body.disabled.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give role, password or disabled",
        ));
    }
    let role = body.role.as_deref().map(parse_role).transpose()?;
    if let Some(p) = &body.password {
        password::validate_password(p)?;
    }
    // One write with every field (UserStore::change): whole or not at all.
    let (password_given, disabled) = (body.password.is_some(), body.disabled);
    let change = UserChange {
        role,
        disabled,
        password: body.password,
    };
    let (st, n) = (state.clone(), name.to_string());
    let job = move || st.auth.users.change(&n, change);
    let _cut = state.user_changes.lock().await;
    let (before, info) = if password_given {
        // Hashing costs ~150 ms of CPU: the hash thread, like logins.
        state.auth.hasher.run(job).await??
    } else {
        tokio::task::spawn_blocking(job)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??
    };
    // What changed, not what was asked: a PATCH that sets the role the user already has
    // records no role change.
    let mut entries = Vec::new();
    if info.role != before.role {
        entries.push(
            entry(state, req, SecurityAction::UserRoleChanged).detail("role", info.role.as_str()),
        );
    }
    match (before.disabled, info.disabled) {
        (false, true) => entries.push(entry(state, req, SecurityAction::UserDisabled)),
        (true, false) => entries.push(entry(state, req, SecurityAction::UserEnabled)),
        _ => {}
    }
    if password_given {
        entries.push(entry(state, req, SecurityAction::UserPasswordChanged));
    }
    for e in entries {
        record(state, e.actor(p.name.clone()).target(name))
            .await
            .map_err(applied_unrecorded)?;
    }
    Ok(json_ok(
        &serde_json::to_value(info).map_err(|e| ApiError::internal(e.to_string()))?,
    ))
}

/// A user change that was made but whose security-log entry failed: say so, since the change
/// cannot be taken back.
fn applied_unrecorded(e: ApiError) -> ApiError {
    ApiError::internal(format!("the change was applied, but {}", e.message))
}

/// Takes one of `user`'s audited reads of the audit trail (`PerUserLimit::audit_reads`): each
/// is a synced security-log entry. `429 rate_limited` once spent, before anything is read.
pub(super) fn audit_read_budget(state: &State, user: &str) -> Result<(), ApiError> {
    state
        .auth
        .audit_reads
        .take(user, std::time::Instant::now())
        .map_err(|wait| {
            ApiError::budget_spent("too many reads of the audit trail for this user", wait)
        })
}

pub async fn security_log(state: &State, req: &Request) -> Result<Response, ApiError> {
    let p = admin(state, req)?;
    // It takes no filter: one given (`?actor=`) would be silently ignored and the whole log
    // read as if filtered, so it is refused, like an unknown filter on `/events`.
    if let Some((k, _)) = req.query_pairs()?.first() {
        return Err(ApiError::bad_request(format!(
            "unknown parameter {k:?}: the security log takes no parameter (filter the NDJSON lines)"
        )));
    }
    // The place first: a read refused with `overloaded` did not read the log.
    let permit = super::stream::permit(state)?;
    audit_read_budget(state, &p.name)?;
    // Reading the audit trail is audited too; recorded first, so this read is in its answer.
    record_read(
        state,
        entry(state, req, SecurityAction::HistoryRead)
            .actor(p.name)
            .target("security-log"),
    )
    .await;
    // Up to the entry that records this read: later entries belong to a later read.
    let (head, _) = state.auth.security.head();
    let entries = state.auth.security.iter();
    Ok(super::stream::ndjson(state, permit, move |sink| {
        for e in entries {
            let e = e.map_err(|e| e.to_string())?;
            if e.seq > head {
                break;
            }
            let mut failed = None;
            let more = sink.line(|buf| {
                if let Err(err) = serde_json::to_writer(&mut *buf, &e) {
                    failed = Some(err.to_string());
                }
            });
            if let Some(err) = failed {
                return Err(err);
            }
            if !more {
                break;
            }
        }
        Ok(())
    }))
}

pub async fn backup(state: &State, req: &Request) -> Result<Response, ApiError> {
    let p = admin(state, req)?;
    // One at a time: backups started together would compete for the disk with each other and
    // the writer, and two in the same millisecond would collide on their directory name.
    let running = state.backup_running.clone().try_lock_owned().map_err(|_| {
        let mut e = ApiError::overloaded("a backup is already running; retry when it has finished");
        e.retry_after = Some(std::time::Duration::from_secs(10));
        e
    })?;
    let st = state.clone();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let dest = state.settings.data_dir.join("backups").join(&stamp);
    // A thread of its own at the lowest priority: the copy of a large ledger takes seconds of
    // CPU and must not delay the writer (append p99 during a backup, benches/compliance.rs).
    let report = crate::background::run("backup", move || {
        let _running = running;
        let head = st.ledger.head().offset;
        // The security log's head and the users at one point: no user change in between.
        let cut = st.user_changes.blocking_lock();
        let (security_head, _) = st.auth.security.head();
        let users = crate::backup::users_snapshot(&st.db)?;
        drop(cut);
        let secret = st.settings.data_dir.join(crate::auth::token::SECRET_FILE);
        let src = crate::backup::Source {
            log: st.ledger.log().as_ref(),
            db: &st.db,
            head,
            security_head,
            users: Some(&users),
            secret_file: Some(&secret),
            chunk_pause: crate::backup::ONLINE_CHUNK_PAUSE,
            expect_snapshot: None,
            removed_on_signal: false,
        };
        crate::backup::backup(&src, &dest)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    record(
        state,
        entry(state, req, SecurityAction::BackupCreated)
            .actor(p.name)
            .target(report.path.display().to_string())
            .detail("head", report.head),
    )
    .await?;
    Ok(json_ok(&json!({
        "path": report.path.display().to_string(),
        "head": report.head,
        "head_hash": report.head_hash,
    })))
}
