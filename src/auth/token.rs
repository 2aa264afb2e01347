//! Access tokens: short-lived HS256 JWTs, and the secret that signs them.
//!
//! jsonwebtoken 11 is built without its crypto features (one pulls `rsa` with an open advisory,
//! the other builds C); instead `hs256_provider.rs` supplies an HS256-only provider on `ring`,
//! which we already use. With no provider installed jsonwebtoken panics at first use, so
//! [`TokenService::new`] installs ours (once per process) and the server calls
//! [`TokenService::self_test`] at start.
//!
//! The clock is a parameter (`now`) everywhere, so expiry is testable without sleeping.
//! Expiry is checked here, not by jsonwebtoken, whose check reads the system clock.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::hs256_provider::install_hs256_provider;
use super::Role;

/// Shortest accepted secret, in bytes (HS256's key strength is capped by the secret's entropy).
pub const MIN_SECRET_BYTES: usize = 32;
/// The environment variable that can supply the secret; named in error messages.
pub const SECRET_ENV: &str = "ALARM_LEDGER_JWT_SECRET";
/// Name of the generated secret file inside the data directory.
pub const SECRET_FILE: &str = "jwt_secret";
/// Clock skew tolerated on `exp` and `iat`, in seconds. Small: tokens live only minutes.
pub const LEEWAY_SECS: i64 = 5;
/// Longer strings are not tokens of ours; refuse them before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims of our tokens. A gateway holding the same secret can read them too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The username.
    pub sub: String,
    /// The role at issue time; re-checked against the user record on use.
    pub role: Role,
    /// Issued at, seconds since the Unix epoch.
    pub iat: i64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: i64,
    /// Unique token id (UUID v4), for audit lines.
    pub jti: Uuid,
    /// Issued at, milliseconds since the Unix epoch (a private claim; `iat` has whole seconds).
    /// Revocation compares it with the user's `tokens_valid_after`, which has milliseconds: at
    /// second precision a token issued in the same second before a password change survived it,
    /// and refreshing kept it alive for good. Tokens without it (from a gateway, or from before
    /// this claim) are judged by their second, conservatively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat_ms: Option<i64>,
    /// Not before, seconds since the Unix epoch. We issue none; a gateway sharing the secret may,
    /// and such a token is refused until then (RFC 7519 §4.1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

/// A freshly signed token: the string for the client plus what it says.
#[derive(Clone)]
pub struct IssuedToken {
    /// The compact JWT (`header.payload.signature`).
    pub token: String,
    /// Equal to `claims.exp`, as a time.
    pub expires_at: DateTime<Utc>,
    /// The claims inside `token`.
    pub claims: Claims,
}

/// A token is a credential: Debug shows its claims but never the token itself.
impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("expires_at", &self.expires_at)
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

/// Why a token was not accepted (or could not be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Correctly signed, but past `exp` (plus [`LEEWAY_SECS`]): "log in again / refresh".
    #[error("token expired")]
    Expired,
    /// Malformed, wrongly signed, wrong algorithm, missing claims, … The reason is for logs.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Signing failed on our side (not the client's fault).
    #[error("token signing failed: {0}")]
    Internal(String),
}

/// Why the signing secret could not be obtained. All of these stop the server at start.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is set but too short.
    #[error("{SECRET_ENV} must be at least {MIN_SECRET_BYTES} bytes long (it has {0})")]
    EnvTooShort(usize),
    /// The secret file exists but holds fewer than [`MIN_SECRET_BYTES`] bytes.
    #[error(
        "the JWT secret file {0} holds fewer than {MIN_SECRET_BYTES} bytes; delete it to generate \
         a new one (this logs everyone out) or set {SECRET_ENV}"
    )]
    FileTooShort(PathBuf),
    /// Reading or creating the secret file failed.
    #[error("cannot read or create the JWT secret file {path}: {source}")]
    Io {
        /// The file (or its directory) that failed.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Signs and verifies our tokens. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct TokenService {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Built once: algorithms pinned to HS256, `exp` required, no audience.
    validation: Validation,
    ttl: chrono::Duration,
}

/// Never prints the key material.
impl fmt::Debug for TokenService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenService")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TokenService {
    /// A service signing with `secret` exactly as given (no decoding or hashing, so a gateway
    /// configured with the same bytes verifies our tokens). Tokens live `ttl` (at least 1 s).
    pub fn new(secret: Vec<u8>, ttl: chrono::Duration) -> Self {
        install_hs256_provider();
        let mut validation = Validation::new(Algorithm::HS256);
        // Only HS256: `alg: none`, HS384/512 and every asymmetric algorithm are rejected before
        // any signature check (the classic algorithm-confusion attacks).
        validation.algorithms = vec![Algorithm::HS256];
        // `exp` must be present; whether it has passed we check ourselves against the injected
        // clock (jsonwebtoken would read the system clock).
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        // We issue no `aud`, and a token that carries one is not ours.
        validation.validate_aud = true;
        validation.aud = None;
        TokenService {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            ttl: ttl.max(chrono::Duration::seconds(1)),
        }
    }

    /// How long issued tokens live.
    pub fn ttl(&self) -> chrono::Duration {
        self.ttl
    }

    /// Signs a token for `username` with `role`, valid from `now` for the configured ttl.
    pub fn issue(
        &self,
        username: &str,
        role: Role,
        now: DateTime<Utc>,
    ) -> Result<IssuedToken, TokenError> {
        let iat = now.timestamp();
        let exp = iat.saturating_add(self.ttl.num_seconds());
        let claims = Claims {
            sub: username.to_owned(),
            role,
            iat,
            exp,
            jti: Uuid::new_v4(),
            iat_ms: Some(now.timestamp_millis()),
            nbf: None,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| TokenError::Internal(e.to_string()))?;
        let expires_at = DateTime::from_timestamp(exp, 0)
            .ok_or_else(|| TokenError::Internal("expiry out of range".into()))?;
        Ok(IssuedToken {
            token,
            expires_at,
            claims,
        })
    }

    /// Checks signature, algorithm and expiry at `now`, and returns the claims.
    ///
    /// A valid token may still belong to a user who was since disabled or changed: callers also
    /// run `UserStore::check_token_still_valid`.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid("too long".into()));
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| TokenError::Invalid(reason(e.kind())))?
            .claims;
        let now = now.timestamp();
        if now >= claims.exp.saturating_add(LEEWAY_SECS) {
            return Err(TokenError::Expired);
        }
        if claims.iat > now.saturating_add(LEEWAY_SECS) {
            return Err(TokenError::Invalid("issued in the future".into()));
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECS))
        {
            return Err(TokenError::Invalid("not valid yet (nbf)".into()));
        }
        if let Some(ms) = claims.iat_ms {
            if ms.div_euclid(1000) != claims.iat {
                return Err(TokenError::Invalid("iat_ms disagrees with iat".into()));
            }
        }
        Ok(claims)
    }

    /// Signs and verifies a throw-away token: proves at start that the crypto provider is
    /// installed and the secret works, instead of failing on the first login.
    pub fn self_test(&self) -> Result<(), TokenError> {
        let now = Utc::now();
        let issued = self.issue("self-test", Role::Viewer, now)?;
        let claims = self
            .verify(&issued.token, now)
            .map_err(|e| TokenError::Internal(format!("self-test token rejected: {e}")))?;
        if claims != issued.claims {
            return Err(TokenError::Internal("self-test claims differ".into()));
        }
        Ok(())
    }
}

/// A short, stable reason for logs; the client only learns "unauthorized".
fn reason(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            "algorithm not allowed".into()
        }
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c}"),
        ErrorKind::InvalidClaimFormat(c) => format!("malformed claim {c}"),
        ErrorKind::InvalidAudience => "unexpected audience".into(),
        _ => "malformed token".into(),
    }
}

/// The secret, in order of preference: `from_env` (the value of [`SECRET_ENV`], used as raw
/// bytes, at least [`MIN_SECRET_BYTES`]); else the content of `<data_dir>/jwt_secret`; else a new
/// file with 32 random bytes as 64 hex characters, mode 0600, fsynced.
///
/// The file's content *is* the secret (its 64 ASCII bytes, not the 32 bytes they encode): copying
/// it into [`SECRET_ENV`] of this server or of a gateway yields the same key.
pub fn load_or_create_secret(
    data_dir: &Path,
    from_env: Option<&str>,
) -> Result<Vec<u8>, SecretError> {
    if let Some(value) = from_env {
        if value.len() < MIN_SECRET_BYTES {
            return Err(SecretError::EnvTooShort(value.len()));
        }
        return Ok(value.as_bytes().to_vec());
    }
    let path = data_dir.join(SECRET_FILE);
    let io_err = |source| SecretError::Io {
        path: path.clone(),
        source,
    };
    // A symlink (to a mounted secret, say) is the operator's: never replaced, even when it
    // dangles or points at an empty file; only our own regular file is made or remade.
    let ours = match std::fs::symlink_metadata(&path) {
        Ok(meta) => Some(meta.file_type().is_file()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    match File::open(&path) {
        // An empty file of ours can only be a creation cut short by a crash (before it was
        // written under a staging name): no token was ever signed with it; a new one is made.
        Ok(file) if ours == Some(true) && file.metadata().is_ok_and(|m| m.len() == 0) => {
            tracing::warn!(path = %path.display(), "the JWT secret file is empty (a creation cut short); generating a new one");
            create_secret_file(data_dir, &path)
        }
        Ok(file) => read_secret_file(file, &path),
        Err(e) if e.kind() == io::ErrorKind::NotFound && ours.is_none() => {
            create_secret_file(data_dir, &path)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Writes a new random secret to `path` whole or not at all: under a staging name (mode 0600 from
/// the first byte, never following a planted symlink), synced, then renamed into place and the
/// directory synced, so a crash leaves either no secret file or a complete one. The caller holds
/// the data directory's lock.
fn create_secret_file(data_dir: &Path, path: &Path) -> Result<Vec<u8>, SecretError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SecretError::Io { path, source }
    };
    let mut random = [0u8; 32];
    SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| SecretError::Random)?;
    let secret = super::to_hex(&random).into_bytes();
    let staging =
        crate::staging::staging_path(path).unwrap_or_else(|| path.with_extension("partial"));
    match std::fs::remove_file(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&staging)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .map_err(io_err(&staging))?;
    file.write_all(&secret).map_err(io_err(&staging))?;
    file.sync_all().map_err(io_err(&staging))?;
    drop(file);
    // Renamed over an empty file left by a crash too; the directory synced, or a crash could
    // forget the new entry and the next start would sign with a different secret.
    crate::staging::publish(&staging, path).map_err(io_err(data_dir))?;
    tracing::info!(path = %path.display(), "generated a new JWT secret");
    Ok(secret)
}

fn read_secret_file(mut file: File, path: &Path) -> Result<Vec<u8>, SecretError> {
    let io_err = |source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = file.metadata() {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the JWT secret file is readable by others; chmod 600 it");
        }
    }
    let mut content = Vec::new();
    file.read_to_end(&mut content).map_err(io_err)?;
    // Editors add a final newline; it is not part of the secret.
    while content.last().is_some_and(|b| b.is_ascii_whitespace()) {
        content.pop();
    }
    if content.len() < MIN_SECRET_BYTES {
        return Err(SecretError::FileTooShort(path.to_path_buf()));
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use ring::hmac;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    fn service() -> TokenService {
        TokenService::new(SECRET.to_vec(), Duration::minutes(15))
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 123_000_000).unwrap()
    }

    /// base64url without padding, as JWTs use; enough to forge tokens by hand.
    fn b64url(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    fn payload(now: DateTime<Utc>) -> String {
        let claims = serde_json::json!({
            "sub": "mallory", "role": "admin", "iat": now.timestamp(),
            "exp": now.timestamp() + 600, "jti": Uuid::new_v4(),
        });
        b64url(claims.to_string().as_bytes())
    }

    #[test]
    fn round_trip() {
        let s = service();
        let issued = s.issue("alice", Role::Operator, t0()).unwrap();
        assert_eq!(issued.claims.sub, "alice");
        assert_eq!(issued.claims.role, Role::Operator);
        assert_eq!(issued.claims.iat, t0().timestamp());
        assert_eq!(issued.claims.exp, t0().timestamp() + 15 * 60);
        assert_eq!(issued.expires_at.timestamp(), issued.claims.exp);
        let claims = s
            .verify(&issued.token, t0() + Duration::minutes(14))
            .unwrap();
        assert_eq!(claims, issued.claims);
        assert!(!format!("{issued:?}").contains(&issued.token));
    }

    #[test]
    fn expired_with_small_leeway() {
        let s = service();
        let issued = s.issue("alice", Role::Viewer, t0()).unwrap();
        let exp = issued.expires_at;
        assert!(s.verify(&issued.token, exp + Duration::seconds(4)).is_ok());
        assert_eq!(
            s.verify(&issued.token, exp + Duration::seconds(5)),
            Err(TokenError::Expired)
        );
        assert_eq!(
            s.verify(&issued.token, exp + Duration::hours(1)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn issued_in_the_future_is_rejected() {
        let s = service();
        let issued = s.issue("alice", Role::Viewer, t0()).unwrap();
        assert!(matches!(
            s.verify(&issued.token, t0() - Duration::minutes(1)),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let issued = service().issue("alice", Role::Admin, t0()).unwrap();
        let other = TokenService::new(
            b"another secret of thirty-two bytes!!".to_vec(),
            Duration::minutes(15),
        );
        assert_eq!(
            other.verify(&issued.token, t0()),
            Err(TokenError::Invalid("bad signature".into()))
        );
    }

    #[test]
    fn alg_none_is_rejected() {
        let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
        let token = format!("{header}.{}.", payload(t0()));
        assert!(matches!(
            service().verify(&token, t0()),
            Err(TokenError::Invalid(_))
        ));
        // Also with the signature of a real token glued on.
        let real = service().issue("x", Role::Viewer, t0()).unwrap().token;
        let sig = real.rsplit('.').next().unwrap();
        let token = format!("{header}.{}.{sig}", payload(t0()));
        assert!(matches!(
            service().verify(&token, t0()),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn hs384_is_rejected_even_with_the_right_secret() {
        let header = b64url(br#"{"alg":"HS384","typ":"JWT"}"#);
        let message = format!("{header}.{}", payload(t0()));
        let key = hmac::Key::new(hmac::HMAC_SHA384, SECRET);
        let sig = b64url(hmac::sign(&key, message.as_bytes()).as_ref());
        assert_eq!(
            service().verify(&format!("{message}.{sig}"), t0()),
            Err(TokenError::Invalid("algorithm not allowed".into()))
        );
    }

    #[test]
    fn hand_made_hs256_token_verifies() {
        // Proves the forging helpers are right, so the rejections above mean something.
        let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let message = format!("{header}.{}", payload(t0()));
        let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
        let sig = b64url(hmac::sign(&key, message.as_bytes()).as_ref());
        let claims = service().verify(&format!("{message}.{sig}"), t0()).unwrap();
        assert_eq!(claims.sub, "mallory");
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let s = service();
        let issued = s.issue("alice", Role::Viewer, t0()).unwrap();
        let parts: Vec<&str> = issued.token.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], payload(t0()), parts[2]);
        assert_eq!(
            s.verify(&forged, t0()),
            Err(TokenError::Invalid("bad signature".into()))
        );
    }

    #[test]
    fn garbage_is_rejected() {
        let s = service();
        for token in ["", "a.b", "a.b.c", "....", &"x".repeat(10_000)] {
            assert!(
                matches!(s.verify(token, t0()), Err(TokenError::Invalid(_))),
                "{token}"
            );
        }
    }

    #[test]
    fn missing_exp_is_rejected() {
        let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = serde_json::json!({"sub":"a","role":"admin","iat":1,"jti":Uuid::new_v4()});
        let message = format!("{header}.{}", b64url(body.to_string().as_bytes()));
        let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
        let sig = b64url(hmac::sign(&key, message.as_bytes()).as_ref());
        assert!(matches!(
            service().verify(&format!("{message}.{sig}"), t0()),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn self_test_passes_and_provider_install_is_idempotent() {
        service().self_test().unwrap();
        service().self_test().unwrap();
    }

    #[test]
    fn secret_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_secret(dir.path(), None).unwrap();
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = load_or_create_secret(dir.path(), None).unwrap();
        assert_eq!(first, second);
    }

    #[test]
    fn env_secret_is_used_as_given_and_short_one_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let env = "a secret of exactly thirty-two b";
        assert_eq!(env.len(), 32);
        assert_eq!(
            load_or_create_secret(dir.path(), Some(env)).unwrap(),
            env.as_bytes()
        );
        assert!(!dir.path().join(SECRET_FILE).exists());
        let err = load_or_create_secret(dir.path(), Some("too short")).unwrap_err();
        assert!(matches!(err, SecretError::EnvTooShort(9)));
        assert!(err.to_string().contains(SECRET_ENV));
    }

    #[test]
    fn short_secret_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SECRET_FILE), "short\n").unwrap();
        assert!(matches!(
            load_or_create_secret(dir.path(), None),
            Err(SecretError::FileTooShort(_))
        ));
    }
}
