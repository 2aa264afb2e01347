//! Login, token refresh, user administration, the security log and backups.
//!
//! Every login (success, failure, throttled), refresh, user change, backup and audit read is
//! appended to the security log with actor, target, address and user agent.

use super::errors::ApiError;
use super::session::{authenticate, bearer, check_token, Principal};
use super::{json_ok, Request, State};
use crate::auth::{password, NewSecurityEntry, Role, SecurityAction};
use serde::Deserialize;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;
use warp::reply::Response;
use warp::Reply;

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
pub(super) async fn record(state: &State, e: NewSecurityEntry) {
    let st = state.clone();
    let r = tokio::task::spawn_blocking(move || {
        st.auth.security.append(e).map_err(|e| e.to_string())?;
        st.ledger.log().sync().map_err(|e| e.to_string())
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "security log append failed"),
        Err(e) => tracing::error!(error = %e, "security log task failed"),
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
    if let Err(retry) = state.auth.throttle.check(&user, ip, Instant::now()) {
        state.metrics.logins_throttled.inc();
        record(
            state,
            entry(state, req, SecurityAction::LoginThrottled).target(user.clone()),
        )
        .await;
        return Err(ApiError::rate_limited(retry));
    }
    let st = state.clone();
    let (name, password) = (user.clone(), body.password);
    // PBKDF2 costs ~150 ms: never on the reactor, never on every core, at low priority.
    let result = state
        .auth
        .hasher
        .run(move || st.auth.users.authenticate(&name, &password))
        .await?;
    match result {
        Ok(info) => {
            state.auth.throttle.record_success(&user, ip);
            let issued = state
                .auth
                .tokens
                .issue(&info.username, info.role, chrono::Utc::now())
                .map_err(|e| ApiError::internal(e.to_string()))?;
            record(
                state,
                entry(state, req, SecurityAction::LoginSucceeded)
                    .actor(info.username.clone())
                    .target(info.username.clone()),
            )
            .await;
            Ok(token_answer(&issued, &info.username, info.role))
        }
        Err(e) if e.is_client_fault() => {
            state
                .auth
                .throttle
                .record_failure(&user, ip, Instant::now());
            state.metrics.login_failures.inc();
            record(
                state,
                entry(state, req, SecurityAction::LoginFailed)
                    .target(user.clone())
                    .detail("reason", e.to_string()),
            )
            .await;
            Err(ApiError::unauthorized("bad credentials"))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn refresh(state: &State, req: &Request) -> Result<Response, ApiError> {
    let token =
        bearer(&req.headers).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let p = check_token(state, token)?;
    let issued = state
        .auth
        .tokens
        .issue(&p.name, p.role, chrono::Utc::now())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    record(
        state,
        entry(state, req, SecurityAction::TokenRefreshed)
            .actor(p.name.clone())
            .target(p.name.clone()),
    )
    .await;
    Ok(token_answer(&issued, &p.name, p.role))
}

fn admin(state: &State, req: &Request) -> Result<Principal, ApiError> {
    let p = authenticate(state, &req.headers)?;
    p.require_admin()?;
    Ok(p)
}

pub async fn list_users(state: &State, req: &Request) -> Result<Response, ApiError> {
    admin(state, req)?;
    let users = state.auth.users.list()?;
    Ok(json_ok(
        &serde_json::to_value(users).map_err(|e| ApiError::internal(e.to_string()))?,
    ))
}

#[derive(Deserialize)]
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
    .await;
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
    // A patch is applied whole or not at all: validate every field before changing anything.
    // Only the last-admin rule can refuse a step after this, so role and disabled go first
    // (once a role change has passed, a disable cannot trip the rule) and the password last.
    if let Some(p) = &body.password {
        password::validate_password(p)?;
    }
    if state.auth.users.get(name)?.is_none() {
        return Err(ApiError::not_found(format!("no user {name:?}")));
    }
    let mut info = None;
    if let Some(role) = role {
        info = Some(state.auth.users.set_role(name, role)?);
        record(
            state,
            entry(state, req, SecurityAction::UserRoleChanged)
                .actor(p.name.clone())
                .target(name)
                .detail("role", role.as_str()),
        )
        .await;
    }
    if let Some(disabled) = body.disabled {
        info = Some(state.auth.users.set_disabled(name, disabled)?);
        let action = if disabled {
            SecurityAction::UserDisabled
        } else {
            SecurityAction::UserEnabled
        };
        record(
            state,
            entry(state, req, action).actor(p.name.clone()).target(name),
        )
        .await;
    }
    if let Some(password) = body.password {
        let st = state.clone();
        let n = name.to_string();
        info = Some(
            state
                .auth
                .hasher
                .run(move || st.auth.users.set_password(&n, &password))
                .await??,
        );
        record(
            state,
            entry(state, req, SecurityAction::UserPasswordChanged)
                .actor(p.name.clone())
                .target(name),
        )
        .await;
    }
    let info = info.ok_or_else(|| ApiError::internal("no change applied"))?;
    Ok(json_ok(
        &serde_json::to_value(info).map_err(|e| ApiError::internal(e.to_string()))?,
    ))
}

pub async fn security_log(state: &State, req: &Request) -> Result<Response, ApiError> {
    let p = admin(state, req)?;
    // Reading the audit trail is audited too; recorded first, so this read is in its answer.
    record(
        state,
        entry(state, req, SecurityAction::HistoryRead)
            .actor(p.name)
            .target("security-log"),
    )
    .await;
    let st = state.clone();
    let body = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let mut out = String::new();
        for e in st.auth.security.iter() {
            let e = e?;
            out.push_str(
                &serde_json::to_string(&e).map_err(|e| ApiError::internal(e.to_string()))?,
            );
            out.push('\n');
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(warp::reply::with_header(body, "content-type", "application/x-ndjson").into_response())
}

pub async fn backup(state: &State, req: &Request) -> Result<Response, ApiError> {
    let p = admin(state, req)?;
    let st = state.clone();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let dest = state.settings.data_dir.join("backups").join(&stamp);
    // A thread of its own at the lowest priority: the copy of a large ledger takes seconds of
    // CPU and must not delay the writer (append p99 during a backup, benches/compliance.rs).
    let report = crate::background::run("backup", move || {
        let head = st.ledger.head().offset;
        let (security_head, _) = st.auth.security.head();
        let secret = st.settings.data_dir.join(crate::auth::token::SECRET_FILE);
        crate::backup::backup(
            st.ledger.log().as_ref(),
            &st.db,
            head,
            security_head,
            Some(&secret),
            &dest,
        )
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
    .await;
    Ok(json_ok(&json!({
        "path": report.path.display().to_string(),
        "head": report.head,
        "head_hash": report.head_hash,
    })))
}
