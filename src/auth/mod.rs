//! Who may do what: users and roles, password hashing, access tokens, login throttling and the
//! hash-chained security audit log.
//!
//! The data flow of a login reads top to bottom through the files:
//! `throttle.rs` (may this user+address try?) → `users.rs` (`authenticate`, which uses
//! `password.rs`) → `token.rs` (issue a JWT) → `security_log.rs` (record what happened).
//! Every later request goes `token.rs::verify` → `users.rs::check_token_still_valid`.
//!
//! Nothing here knows about HTTP or WebSockets; mapping [`AuthError`] and [`token::TokenError`]
//! to status codes and close codes is the HTTP layer's job. Password hashing and every sled call
//! block: callers run them on a blocking thread (`tokio::task::spawn_blocking`).

mod hs256_provider;
pub mod password;
pub mod security_log;
pub mod throttle;
pub mod token;
pub mod users;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

pub use password::PasswordHash;
pub use security_log::{NewSecurityEntry, SecurityAction, SecurityEntry, SecurityLog};
pub use throttle::{LoginThrottle, Throttled};
pub use token::{Claims, IssuedToken, SecretError, TokenError, TokenService};
pub use users::{UserChange, UserInfo, UserRecord, UserStore};

/// What a user may do. Checked on every request from the token's claims (and the user record).
///
/// Serialized as `"admin"`, `"operator"`, `"viewer"` in JSON and in tokens. User records encode
/// it with bincode *by variant position*: never reorder these variants, only append new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Users, backups, the security log, and everything an operator may do.
    Admin,
    /// Create / trigger / ack / rearm / update / delete alarms, and read.
    Operator,
    /// Read and stream only.
    Viewer,
}

impl Role {
    /// The wire name: `admin`, `operator` or `viewer`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// May this role send alarm commands (create, trigger, ack, rearm, update, delete)?
    pub fn can_command(&self) -> bool {
        matches!(self, Role::Admin | Role::Operator)
    }

    /// May this role administer users, make backups and read the security log?
    pub fn is_admin(&self) -> bool {
        matches!(self, Role::Admin)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AuthError;

    /// Exact, lowercase names only, like the JSON form: a role is not free text.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            other => Err(AuthError::InvalidRole(other.chars().take(32).collect())),
        }
    }
}

/// Everything that can go wrong in user management and login.
///
/// The variants above `Storage` are the client's fault (bad input, wrong password, …) and map to
/// 4xx answers; `Storage` and `Internal` are ours (500) and their text is for the log, not the
/// client. Use [`AuthError::is_client_fault`] rather than matching on the list.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The username is not 1–64 characters of `[A-Za-z0-9._-]` starting with a letter or digit.
    #[error("invalid username: {0}")]
    InvalidUsername(&'static str),
    /// The password is shorter than [`password::MIN_PASSWORD_CHARS`] characters.
    #[error(
        "password too weak: at least {} characters are required",
        password::MIN_PASSWORD_CHARS
    )]
    WeakPassword,
    /// The password is longer than [`password::MAX_PASSWORD_CHARS`] characters.
    #[error(
        "password too long: at most {} characters are allowed",
        password::MAX_PASSWORD_CHARS
    )]
    PasswordTooLong,
    /// Not one of `admin`, `operator`, `viewer`.
    #[error("unknown role {0:?} (expected admin, operator or viewer)")]
    InvalidRole(String),
    /// A user with this name (compared case-insensitively) already exists: the name asked for,
    /// and the existing user's.
    #[error("user {existing:?} already exists{case}", existing = .1, case = if .0 == .1 { "" } else { " (names may not differ only in letter case; every other use of a name matches it exactly)" })]
    UserExists(String, String),
    /// No user with this name (administration paths only; login answers `BadCredentials`).
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    /// Wrong username or password. Deliberately does not say which.
    #[error("invalid username or password")]
    BadCredentials,
    /// The account is disabled.
    #[error("account disabled")]
    Disabled,
    /// The token was issued before a password change, role change or disable of its user.
    #[error("token revoked")]
    TokenRevoked,
    /// The change would leave the ledger without an enabled admin.
    #[error("the last enabled admin cannot be disabled or demoted")]
    LastAdmin,
    /// The database failed, or a stored record could not be decoded.
    #[error("user storage failed: {0}")]
    Storage(String),
    /// Something else of ours failed (e.g. the system random number generator).
    #[error("internal error: {0}")]
    Internal(String),
}

impl AuthError {
    /// True when the request was wrong (4xx), false when we failed (5xx).
    pub fn is_client_fault(&self) -> bool {
        !matches!(self, AuthError::Storage(_) | AuthError::Internal(_))
    }
}

impl From<sled::Error> for AuthError {
    fn from(e: sled::Error) -> Self {
        AuthError::Storage(e.to_string())
    }
}

/// Milliseconds since the Unix epoch, the resolution we store times at.
pub(crate) fn to_millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The inverse of [`to_millis`]; out-of-range values (only from a corrupt record) become the epoch
/// rather than a panic.
pub(crate) fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Lowercase hex, for hashes and the generated secret.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Serializes a time the way the wire contract wants it: RFC 3339, UTC, milliseconds, `Z`.
pub(crate) fn serialize_rfc3339_ms<S: Serializer>(
    t: &DateTime<Utc>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip() {
        for role in [Role::Admin, Role::Operator, Role::Viewer] {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{role}\""));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
        }
        assert!("Admin".parse::<Role>().is_err());
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn role_permissions() {
        assert!(Role::Admin.can_command() && Role::Admin.is_admin());
        assert!(Role::Operator.can_command() && !Role::Operator.is_admin());
        assert!(!Role::Viewer.can_command() && !Role::Viewer.is_admin());
    }

    #[test]
    fn client_faults_are_separated_from_failures() {
        assert!(AuthError::BadCredentials.is_client_fault());
        assert!(AuthError::WeakPassword.is_client_fault());
        assert!(!AuthError::Storage("disk".into()).is_client_fault());
        assert!(!AuthError::Internal("rng".into()).is_client_fault());
    }
}
