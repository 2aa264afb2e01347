//! Who is calling: bearer token → `Principal`, and the role checks of PROTOCOL.md.

use super::errors::ApiError;
use super::AppState;
use crate::auth::token::{Claims, TokenError};
use crate::auth::Role;
use warp::http::HeaderMap;

/// An authenticated user, as of the token check.
#[derive(Clone, Debug)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub claims: Claims,
}

impl Principal {
    pub fn require_operator(&self) -> Result<(), ApiError> {
        if self.role.can_command() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "this action needs the operator or admin role",
            ))
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.role.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("this action needs the admin role"))
        }
    }
}

/// Why a token is not accepted, in the words the WebSocket close reason uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Expired,
    Invalid,
    /// Revoked, user disabled, role changed, or user gone.
    Revoked(String),
    /// The user record could not be read (storage failure): not the client's fault, so not a
    /// reason to log in again (HTTP 500, WebSocket close 1011).
    Unavailable(String),
}

impl Denied {
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Missing | Denied::Invalid => "unauthorized",
            Denied::Expired => "token expired",
            Denied::Revoked(_) => "token revoked",
            Denied::Unavailable(_) => "internal error",
        }
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Missing => ApiError::unauthorized(MISSING_BEARER),
            Denied::Expired => ApiError::unauthorized("token expired"),
            Denied::Invalid => ApiError::unauthorized("invalid token"),
            Denied::Revoked(why) => ApiError::unauthorized(why),
            Denied::Unavailable(_) => ApiError::internal("user storage unavailable"),
        }
    }
}

/// The answer to a request without an `Authorization: Bearer` header (none, or another scheme).
pub const MISSING_BEARER: &str =
    "missing bearer token (expected the header `Authorization: Bearer <token>`)";

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Checks a token: signature, algorithm, expiry, and that the user still exists, is enabled and
/// has the token's role.
pub fn check_token(state: &AppState, token: &str) -> Result<Principal, Denied> {
    let claims = state
        .auth
        .tokens
        .verify(token, chrono::Utc::now())
        .map_err(|e| match e {
            TokenError::Expired => Denied::Expired,
            _ => Denied::Invalid,
        })?;
    let user = state
        .auth
        .users
        .check_token_still_valid(&claims)
        .map_err(|e| {
            if e.is_client_fault() {
                Denied::Revoked(e.to_string())
            } else {
                tracing::error!(error = %e, "user check failed");
                Denied::Unavailable(e.to_string())
            }
        })?;
    Ok(Principal {
        name: user.username,
        role: user.role,
        claims,
    })
}

pub fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let token = bearer(headers).ok_or(Denied::Missing)?;
    Ok(check_token(state, token)?)
}
