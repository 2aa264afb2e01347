//! The user accounts, in the sled tree `users`: key = username (UTF-8), value = format-version
//! byte `1` + the bincode (serde, standard config) encoding of [`UserRecord`].
//!
//! Every call blocks (sled I/O, and ~150 ms of PBKDF2 in `add`, `set_password`, `authenticate`
//! and `bootstrap_admin`): call from `tokio::task::spawn_blocking`. Each change is followed by
//! `db.flush()`.

use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::password::{self, PasswordHash, PBKDF2_ITERATIONS};
use super::token::Claims;
use super::{from_millis, to_millis, AuthError, Role};

/// Name of the sled tree holding the accounts.
pub const USERS_TREE: &str = "users";
/// Longest accepted username, in characters.
pub const MAX_USERNAME_CHARS: usize = 64;
/// The account created on first start.
pub const BOOTSTRAP_ADMIN: &str = "admin";
/// First byte of every stored record. A future codec gets a new number; old records stay readable.
const FORMAT_VERSION: u8 = 1;
/// Length of a generated bootstrap password (~143 bits from 62 symbols).
const GENERATED_PASSWORD_CHARS: usize = 24;

/// Actor names the security log uses for what no user did: the offline tools (`cli`) and the
/// server itself (`server`, the first-start admin). No account may take them (compared without
/// letter case, as names are), or its entries could not be told from those.
pub const RESERVED_ACTORS: [&str; 2] = ["cli", "server"];

/// Checks a username: 1–64 characters of `[A-Za-z0-9._-]`, the first a letter or digit (so a name
/// can never look like an option, a path like `..`, or be empty).
pub fn validate_username(name: &str) -> Result<(), AuthError> {
    let first = name
        .chars()
        .next()
        .ok_or(AuthError::InvalidUsername("empty"))?;
    if name.chars().count() > MAX_USERNAME_CHARS {
        return Err(AuthError::InvalidUsername("longer than 64 characters"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(AuthError::InvalidUsername(
            "must start with a letter or digit",
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(AuthError::InvalidUsername(
            "only letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(())
}

/// One stored account. Read-only outside this file; change it through [`UserStore`].
///
/// Encoded by bincode *by position*: never reorder, remove or insert fields, and no
/// `skip_serializing_if` (bincode has no field names to skip by). A new layout needs a new
/// [`FORMAT_VERSION`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    name: String,
    role: Role,
    disabled: bool,
    /// Milliseconds since the Unix epoch.
    created_at: i64,
    password: PasswordHash,
    /// Milliseconds since the Unix epoch. Tokens issued before this second are revoked; bumped
    /// by a password change, a role change and a disable.
    tokens_valid_after: i64,
}

impl UserRecord {
    /// The username.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True when the account may not log in and its tokens are refused.
    pub fn disabled(&self) -> bool {
        self.disabled
    }

    /// When the account was created.
    pub fn created_at(&self) -> DateTime<Utc> {
        from_millis(self.created_at)
    }

    /// Tokens issued before this time are revoked.
    pub fn tokens_valid_after(&self) -> DateTime<Utc> {
        from_millis(self.tokens_valid_after)
    }

    /// The public view: what may be listed and sent to clients.
    pub fn info(&self) -> UserInfo {
        UserInfo {
            username: self.name.clone(),
            role: self.role,
            disabled: self.disabled,
            created_at: self.created_at(),
        }
    }
}

/// A user as listed by `GET /api/v1/users`: `{"username","role","disabled","created_at"}`.
/// Holds no password material by construction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserInfo {
    /// The username.
    pub username: String,
    /// The current role.
    pub role: Role,
    /// True when the account is disabled.
    pub disabled: bool,
    /// When the account was created; RFC 3339 with milliseconds, `Z`.
    #[serde(serialize_with = "super::serialize_rfc3339_ms")]
    pub created_at: DateTime<Utc>,
}

/// An administrator's change to an account (`UserStore::change`); `None` leaves a field alone.
#[derive(Default)]
pub struct UserChange {
    pub role: Option<Role>,
    pub disabled: Option<bool>,
    /// The new password, in clear until `change` hashes it.
    pub password: Option<String>,
}

/// The accounts. Share it behind an `Arc`.
pub struct UserStore {
    db: sled::Db,
    tree: sled::Tree,
    /// Serializes read-modify-write changes (add's case-insensitive uniqueness check, role and
    /// password updates, the last-admin rule). A std `Mutex`: callers are on blocking threads
    /// already, and admin changes are rare. Never held while hashing a password.
    write_lock: Mutex<()>,
    /// PBKDF2 cost for new hashes and for the dummy verification of unknown users. Always
    /// [`PBKDF2_ITERATIONS`] except in this file's unit tests.
    iterations: u32,
    /// Bumped after every written change of an account, before the change is answered: live
    /// WebSockets watch it and re-check their user at once (`watch_changes`), so a disabled,
    /// demoted or re-passworded user's socket sends no command once the change has returned.
    changes: tokio::sync::watch::Sender<u64>,
}

/// Shows the cost setting only; records are not dumped into logs.
impl std::fmt::Debug for UserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserStore")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl UserStore {
    /// Opens (or creates) the `users` tree in `db`.
    pub fn open(db: &sled::Db) -> Result<Self, AuthError> {
        Self::open_with_iterations(db, PBKDF2_ITERATIONS)
    }

    fn open_with_iterations(db: &sled::Db, iterations: u32) -> Result<Self, AuthError> {
        Ok(UserStore {
            db: db.clone(),
            tree: db.open_tree(USERS_TREE)?,
            write_lock: Mutex::new(()),
            iterations,
            changes: tokio::sync::watch::channel(0).0,
        })
    }

    /// A receiver that sees every later change of any account (`changed()`, `has_changed()`).
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// True when there is no account at all (first start).
    pub fn is_empty(&self) -> Result<bool, AuthError> {
        Ok(self.tree.first()?.is_none())
    }

    /// Creates an account. Errors: `InvalidUsername`, `WeakPassword`, `PasswordTooLong`,
    /// `UserExists` (also when a name differing only in letter case exists: `Admin` next to
    /// `admin` would make the audit trail ambiguous).
    pub fn add(&self, name: &str, password: &str, role: Role) -> Result<UserInfo, AuthError> {
        validate_username(name)?;
        if RESERVED_ACTORS.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            return Err(AuthError::InvalidUsername(
                "reserved: the security log names the offline tools `cli` and the server's own \
                 actions `server`",
            ));
        }
        password::validate_password(password)?;
        let hash = PasswordHash::new_with_iterations(password, self.iterations)?;
        let now = to_millis(Utc::now());
        let record = UserRecord {
            name: name.to_owned(),
            role,
            disabled: false,
            created_at: now,
            password: hash,
            tokens_valid_after: now,
        };
        let _guard = self.lock();
        for existing in self.records() {
            let existing = existing?;
            if existing.name.eq_ignore_ascii_case(name) {
                return Err(AuthError::UserExists(name.to_owned(), existing.name));
            }
        }
        // Compare-and-swap from "absent": even a second store on the same tree cannot overwrite.
        self.tree
            .compare_and_swap(name.as_bytes(), None::<&[u8]>, Some(encode(&record)?))?
            .map_err(|_| AuthError::UserExists(name.to_owned(), name.to_owned()))?;
        self.db.flush()?;
        Ok(record.info())
    }

    /// The account named exactly `name`, if any.
    pub fn get(&self, name: &str) -> Result<Option<UserRecord>, AuthError> {
        self.tree
            .get(name.as_bytes())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// All accounts, ordered by name (byte order).
    pub fn list(&self) -> Result<Vec<UserInfo>, AuthError> {
        self.records().map(|r| r.map(|r| r.info())).collect()
    }

    /// Changes the role; revokes the user's tokens if it changed. `LastAdmin` if this would
    /// demote the last enabled admin.
    pub fn set_role(&self, name: &str, role: Role) -> Result<UserInfo, AuthError> {
        self.change(
            name,
            UserChange {
                role: Some(role),
                ..UserChange::default()
            },
        )
        .map(|(_, after)| after)
    }

    /// Sets a new password (policy-checked) and revokes the user's tokens.
    pub fn set_password(&self, name: &str, password: &str) -> Result<UserInfo, AuthError> {
        self.change(
            name,
            UserChange {
                password: Some(password.to_owned()),
                ..UserChange::default()
            },
        )
        .map(|(_, after)| after)
    }

    /// Disables (revoking the user's tokens) or re-enables an account. Re-enabling does not
    /// revive tokens issued before the disable. `LastAdmin` if this would disable the last
    /// enabled admin.
    pub fn set_disabled(&self, name: &str, disabled: bool) -> Result<UserInfo, AuthError> {
        self.change(
            name,
            UserChange {
                disabled: Some(disabled),
                ..UserChange::default()
            },
        )
        .map(|(_, after)| after)
    }

    /// Applies a change whole or not at all. A new password is policy-checked and hashed
    /// (~150 ms) before anything is written; then role, disabled flag and password go into the
    /// record in one write, refused as a whole (`LastAdmin`) if the result would leave no
    /// enabled admin. A role change, a disable or a new password revokes the user's tokens.
    /// Returns the account before and after the change (the security log records what changed,
    /// not what was asked).
    pub fn change(
        &self,
        name: &str,
        change: UserChange,
    ) -> Result<(UserInfo, UserInfo), AuthError> {
        let hash = match &change.password {
            Some(password) => {
                password::validate_password(password)?;
                if self.get(name)?.is_none() {
                    // Answer before spending 150 ms on a hash nobody will store.
                    return Err(AuthError::UnknownUser(name.to_owned()));
                }
                Some(PasswordHash::new_with_iterations(
                    password,
                    self.iterations,
                )?)
            }
            None => None,
        };
        self.update(name, move |store, record| {
            let was_enabled_admin = record.role == Role::Admin && !record.disabled;
            let mut revoke = false;
            if let Some(role) = change.role {
                revoke |= record.role != role;
                record.role = role;
            }
            if let Some(disabled) = change.disabled {
                // Only disabling revokes; enabling leaves the earlier bump in place.
                revoke |= disabled && !record.disabled;
                record.disabled = disabled;
            }
            if let Some(hash) = hash {
                record.password = hash;
                revoke = true;
            }
            if was_enabled_admin && (record.role != Role::Admin || record.disabled) {
                store.ensure_another_enabled_admin(name)?;
            }
            Ok(revoke)
        })
    }

    /// Checks a login. Errors: `BadCredentials` (unknown user, malformed name or wrong password,
    /// indistinguishable on purpose) and `Disabled` (only after a correct password, so a guesser
    /// does not learn that a disabled account exists).
    ///
    /// An unknown user costs the same PBKDF2 work as a known one (verification against a hash
    /// that matches nothing), so response times do not reveal which usernames exist.
    pub fn authenticate(&self, name: &str, password: &str) -> Result<UserInfo, AuthError> {
        let record = match validate_username(name) {
            Ok(()) => self.get(name)?,
            Err(_) => None,
        };
        let too_long = password.chars().count() > password::MAX_PASSWORD_CHARS;
        match record {
            Some(record) if !too_long => {
                if !record.password.verify(password) {
                    return Err(AuthError::BadCredentials);
                }
                if record.disabled {
                    return Err(AuthError::Disabled);
                }
                Ok(record.info())
            }
            _ => {
                let _ = PasswordHash::unmatchable(self.iterations).verify(password);
                Err(AuthError::BadCredentials)
            }
        }
    }

    /// Is a token (already verified by `TokenService::verify`) still good for its user? The user
    /// must exist (`UnknownUser`), be enabled (`Disabled`), still have the token's role and not
    /// have had a password change, role change or disable since it was issued (`TokenRevoked`).
    ///
    /// Revocation is judged in milliseconds: a change sets `tokens_valid_after` to the
    /// millisecond after it, and a token issued (`iat_ms`) before that is revoked, including one
    /// issued in the change's own millisecond (before or after it: they cannot be told apart, so
    /// neither is trusted; a fresh login hashes a password for ~150 ms first anyway). A token
    /// without `iat_ms` (a gateway's) is judged by the start of its second, so one issued in the
    /// same second as the change is refused rather than trusted.
    pub fn check_token_still_valid(&self, claims: &Claims) -> Result<UserInfo, AuthError> {
        let record = self
            .get(&claims.sub)?
            .ok_or_else(|| AuthError::UnknownUser(claims.sub.clone()))?;
        if record.disabled {
            return Err(AuthError::Disabled);
        }
        if record.role != claims.role {
            return Err(AuthError::TokenRevoked);
        }
        let issued_ms = claims
            .iat_ms
            .unwrap_or_else(|| claims.iat.saturating_mul(1000));
        if issued_ms < record.tokens_valid_after {
            return Err(AuthError::TokenRevoked);
        }
        Ok(record.info())
    }

    /// First start: if there are no accounts, creates `admin` (role admin) with
    /// `password_from_env` (the value of `ALARM_LEDGER_ADMIN_PASSWORD`, policy-checked) or with a
    /// random 24-character password, which is returned so the caller can print it once. Returns
    /// `Ok(None)` when accounts exist (the env password is then ignored) or the env password was
    /// used.
    pub fn bootstrap_admin(
        &self,
        password_from_env: Option<&str>,
    ) -> Result<Option<String>, AuthError> {
        if !self.is_empty()? {
            return Ok(None);
        }
        match password_from_env {
            Some(password) => {
                self.add(BOOTSTRAP_ADMIN, password, Role::Admin)?;
                Ok(None)
            }
            None => {
                let password = random_password()?;
                self.add(BOOTSTRAP_ADMIN, &password, Role::Admin)?;
                Ok(Some(password))
            }
        }
    }

    /// Read-modify-write of one record under the write lock. `change` returns whether the change
    /// revokes the user's tokens; the record is written only if it changed.
    /// Returns the account before and after.
    fn update(
        &self,
        name: &str,
        change: impl FnOnce(&Self, &mut UserRecord) -> Result<bool, AuthError>,
    ) -> Result<(UserInfo, UserInfo), AuthError> {
        let _guard = self.lock();
        let mut record = self
            .get(name)?
            .ok_or_else(|| AuthError::UnknownUser(name.to_owned()))?;
        let before = record.clone();
        if change(self, &mut record)? {
            // The millisecond after the change: see `check_token_still_valid`.
            record.tokens_valid_after = to_millis(Utc::now())
                .saturating_add(1)
                .max(record.tokens_valid_after);
        }
        if record != before {
            self.tree.insert(name.as_bytes(), encode(&record)?)?;
            self.db.flush()?;
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok((before.info(), record.info()))
    }

    fn ensure_another_enabled_admin(&self, except: &str) -> Result<(), AuthError> {
        for record in self.records() {
            let record = record?;
            if record.name != except && record.role == Role::Admin && !record.disabled {
                return Ok(());
            }
        }
        Err(AuthError::LastAdmin)
    }

    fn records(&self) -> impl Iterator<Item = Result<UserRecord, AuthError>> + '_ {
        self.tree.iter().values().map(|v| decode(&v?))
    }

    /// A poisoned lock guards no data of its own (`()`): continuing is safe.
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn encode(record: &UserRecord) -> Result<Vec<u8>, AuthError> {
    let body = bincode::serde::encode_to_vec(record, bincode::config::standard())
        .map_err(|e| AuthError::Storage(format!("cannot encode user record: {e}")))?;
    let mut bytes = Vec::with_capacity(1 + body.len());
    bytes.push(FORMAT_VERSION);
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> Result<UserRecord, AuthError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => {
            let (record, used) =
                bincode::serde::decode_from_slice(body, bincode::config::standard())
                    .map_err(|e| AuthError::Storage(format!("corrupt user record: {e}")))?;
            if used != body.len() {
                return Err(AuthError::Storage(
                    "corrupt user record: trailing bytes".into(),
                ));
            }
            Ok(record)
        }
        Some((version, _)) => Err(AuthError::Storage(format!(
            "user record has unknown format version {version}"
        ))),
        None => Err(AuthError::Storage("empty user record".into())),
    }
}

/// 24 characters from `[A-Za-z0-9]`, uniformly (rejection sampling: 248 = 4 × 62).
fn random_password() -> Result<String, AuthError> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let rng = SystemRandom::new();
    let mut password = String::with_capacity(GENERATED_PASSWORD_CHARS);
    let mut buf = [0u8; 64];
    while password.len() < GENERATED_PASSWORD_CHARS {
        rng.fill(&mut buf)
            .map_err(|_| AuthError::Internal("system random number generator failed".into()))?;
        for &b in buf.iter().filter(|&&b| b < 248) {
            if password.len() == GENERATED_PASSWORD_CHARS {
                break;
            }
            password.push(char::from(ALPHABET[usize::from(b % 62)]));
        }
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::TokenService;
    use chrono::Duration;

    const PW: &str = "a long enough password";

    /// A real sled in a temp dir; cheap PBKDF2 so the suite stays fast in debug builds.
    fn store() -> (tempfile::TempDir, UserStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, UserStore::open_with_iterations(&db, 1_000).unwrap())
    }

    fn tokens() -> TokenService {
        TokenService::new(
            b"0123456789abcdef0123456789abcdef".to_vec(),
            Duration::minutes(15),
        )
    }

    #[test]
    fn usernames() {
        for ok in [
            "a",
            "alice",
            "Bob.Smith",
            "ops_1",
            "x-y",
            "9lives",
            &"a".repeat(64),
        ] {
            assert!(validate_username(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-opt",
            "_x",
            "a b",
            "ä",
            "a/b",
            "..",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(validate_username(bad), Err(AuthError::InvalidUsername(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn add_get_list_and_duplicates() {
        let (_dir, s) = store();
        assert!(s.is_empty().unwrap());
        let info = s.add("alice", PW, Role::Operator).unwrap();
        assert_eq!(info.username, "alice");
        assert_eq!(info.role, Role::Operator);
        assert!(!info.disabled);
        s.add("bob", PW, Role::Viewer).unwrap();
        assert!(!s.is_empty().unwrap());
        assert!(matches!(
            s.add("alice", PW, Role::Admin),
            Err(AuthError::UserExists(..))
        ));
        for reserved in ["cli", "Server"] {
            assert!(
                matches!(
                    s.add(reserved, PW, Role::Admin),
                    Err(AuthError::InvalidUsername(why)) if why.starts_with("reserved")
                ),
                "{reserved}"
            );
        }
        let e = s.add("ALICE", PW, Role::Admin).unwrap_err();
        assert!(matches!(&e, AuthError::UserExists(..)));
        // The message names the user that exists, and why another case is refused.
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "user \"alice\" already exists (names may not differ only in letter case"
            ),
            "{msg}"
        );
        assert_eq!(
            s.add("alice", PW, Role::Admin).unwrap_err().to_string(),
            "user \"alice\" already exists"
        );
        assert!(matches!(
            s.add("bad name", PW, Role::Admin),
            Err(AuthError::InvalidUsername(_))
        ));
        assert!(matches!(
            s.add("carol", "short", Role::Admin),
            Err(AuthError::WeakPassword)
        ));
        let names: Vec<_> = s.list().unwrap().into_iter().map(|u| u.username).collect();
        assert_eq!(names, ["alice", "bob"]);
        let rec = s.get("alice").unwrap().unwrap();
        assert_eq!(rec.role(), Role::Operator);
        assert_eq!(rec.info(), info);
        assert!(s.get("nobody").unwrap().is_none());
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            UserStore::open_with_iterations(&db, 1_000)
                .unwrap()
                .add("alice", PW, Role::Admin)
                .unwrap();
        }
        let db = crate::store::sled_log::open_db_after_close(dir.path()).unwrap();
        let s = UserStore::open_with_iterations(&db, 1_000).unwrap();
        assert_eq!(s.authenticate("alice", PW).unwrap().role, Role::Admin);
    }

    #[test]
    fn authenticate_outcomes() {
        let (_dir, s) = store();
        s.add("alice", PW, Role::Operator).unwrap();
        s.add("root", PW, Role::Admin).unwrap();
        assert_eq!(s.authenticate("alice", PW).unwrap().username, "alice");
        assert!(matches!(
            s.authenticate("alice", "wrong password!"),
            Err(AuthError::BadCredentials)
        ));
        assert!(matches!(
            s.authenticate("nobody", PW),
            Err(AuthError::BadCredentials)
        ));
        assert!(matches!(
            s.authenticate("../x", PW),
            Err(AuthError::BadCredentials)
        ));
        s.set_disabled("alice", true).unwrap();
        assert!(matches!(
            s.authenticate("alice", "wrong password!"),
            Err(AuthError::BadCredentials)
        ));
        assert!(matches!(
            s.authenticate("alice", PW),
            Err(AuthError::Disabled)
        ));
        s.set_disabled("alice", false).unwrap();
        assert!(s.authenticate("alice", PW).is_ok());
    }

    #[test]
    fn password_change() {
        let (_dir, s) = store();
        s.add("alice", PW, Role::Viewer).unwrap();
        assert!(matches!(
            s.set_password("alice", "short"),
            Err(AuthError::WeakPassword)
        ));
        assert!(matches!(
            s.set_password("nobody", "another long password"),
            Err(AuthError::UnknownUser(_))
        ));
        s.set_password("alice", "another long password").unwrap();
        assert!(s.authenticate("alice", PW).is_err());
        assert!(s.authenticate("alice", "another long password").is_ok());
    }

    /// Moves an account's creation (and so its token horizon) a minute into the past, so tests
    /// can issue "old" tokens that were valid before a change without sleeping.
    fn backdate(s: &UserStore, name: &str) {
        let mut record = s.get(name).unwrap().unwrap();
        record.created_at -= 60_000;
        record.tokens_valid_after -= 60_000;
        s.tree.insert(name, encode(&record).unwrap()).unwrap();
    }

    #[test]
    fn tokens_from_before_the_account_existed_are_refused() {
        let (_dir, s) = store();
        let t = tokens();
        s.add("alice", PW, Role::Operator).unwrap();
        let before = t
            .issue("alice", Role::Operator, Utc::now() - Duration::seconds(10))
            .unwrap();
        assert!(matches!(
            s.check_token_still_valid(&before.claims),
            Err(AuthError::TokenRevoked)
        ));
        let now = t.issue("alice", Role::Operator, Utc::now()).unwrap();
        assert!(s.check_token_still_valid(&now.claims).is_ok());
    }

    #[test]
    fn changes_revoke_older_tokens() {
        let (_dir, s) = store();
        let t = tokens();
        s.add("root", PW, Role::Admin).unwrap();
        s.add("alice", PW, Role::Operator).unwrap();
        backdate(&s, "alice");
        let earlier = Utc::now() - Duration::seconds(10);
        let verify = |tok: &str| s.check_token_still_valid(&t.verify(tok, Utc::now()).unwrap());

        let old = t.issue("alice", Role::Operator, earlier).unwrap().token;
        assert_eq!(verify(&old).unwrap().role, Role::Operator);

        // Role change: the old token (old role) is refused, a new one works.
        s.set_role("alice", Role::Viewer).unwrap();
        assert!(matches!(verify(&old), Err(AuthError::TokenRevoked)));
        let old_same_role = t.issue("alice", Role::Viewer, earlier).unwrap().token;
        assert!(matches!(
            verify(&old_same_role),
            Err(AuthError::TokenRevoked)
        ));
        std::thread::sleep(std::time::Duration::from_millis(2));
        let fresh = t.issue("alice", Role::Viewer, Utc::now()).unwrap().token;
        assert!(verify(&fresh).is_ok());

        // Password change revokes tokens issued before it.
        backdate(&s, "alice");
        let before = t.issue("alice", Role::Viewer, earlier).unwrap().token;
        assert!(verify(&before).is_ok());
        s.set_password("alice", "another long password").unwrap();
        assert!(matches!(verify(&before), Err(AuthError::TokenRevoked)));
        std::thread::sleep(std::time::Duration::from_millis(2));
        let fresh = t.issue("alice", Role::Viewer, Utc::now()).unwrap().token;
        assert!(verify(&fresh).is_ok());

        // Disable refuses everything; re-enable does not revive tokens from before the disable.
        backdate(&s, "alice");
        let before = t.issue("alice", Role::Viewer, earlier).unwrap().token;
        assert!(verify(&before).is_ok());
        s.set_disabled("alice", true).unwrap();
        assert!(matches!(verify(&fresh), Err(AuthError::Disabled)));
        s.set_disabled("alice", false).unwrap();
        assert!(matches!(verify(&before), Err(AuthError::TokenRevoked)));

        // A token for a user that no longer exists (or never did).
        let ghost = t.issue("ghost", Role::Admin, Utc::now()).unwrap().token;
        assert!(matches!(verify(&ghost), Err(AuthError::UnknownUser(_))));
    }

    /// A token issued in the same second as a password change, just before it, is revoked (at
    /// second precision it survived, and refreshing kept it alive for good); so is one without
    /// `iat_ms` from that second. A token from after the change is not.
    #[test]
    fn a_token_from_the_changes_own_second_is_revoked() {
        let (_dir, s) = store();
        let t = tokens();
        s.add("alice", PW, Role::Operator).unwrap();
        backdate(&s, "alice");
        // The token and the change must share a second: retried if a slow step crossed one.
        let mut shared_a_second = false;
        for attempt in 0..5 {
            while Utc::now().timestamp_subsec_millis() > 500 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let just_before = t.issue("alice", Role::Operator, Utc::now()).unwrap();
            let mut legacy = just_before.claims.clone();
            legacy.iat_ms = None;
            assert!(s.check_token_still_valid(&just_before.claims).is_ok());
            std::thread::sleep(std::time::Duration::from_millis(2));
            s.set_password("alice", &format!("another long password {attempt}"))
                .unwrap();
            if Utc::now().timestamp() != just_before.claims.iat {
                backdate(&s, "alice");
                continue;
            }
            assert!(matches!(
                s.check_token_still_valid(&just_before.claims),
                Err(AuthError::TokenRevoked)
            ));
            assert!(matches!(
                s.check_token_still_valid(&legacy),
                Err(AuthError::TokenRevoked)
            ));
            shared_a_second = true;
            break;
        }
        assert!(
            shared_a_second,
            "no attempt kept the token and the change in one second"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        let after = t.issue("alice", Role::Operator, Utc::now()).unwrap();
        assert!(s.check_token_still_valid(&after.claims).is_ok());
    }

    #[test]
    fn unchanged_role_does_not_revoke() {
        let (_dir, s) = store();
        s.add("alice", PW, Role::Operator).unwrap();
        let tva = s.get("alice").unwrap().unwrap().tokens_valid_after;
        s.set_role("alice", Role::Operator).unwrap();
        s.set_disabled("alice", false).unwrap();
        assert_eq!(s.get("alice").unwrap().unwrap().tokens_valid_after, tva);
    }

    #[test]
    fn the_last_enabled_admin_stays() {
        let (_dir, s) = store();
        s.add("root", PW, Role::Admin).unwrap();
        assert!(matches!(
            s.set_role("root", Role::Viewer),
            Err(AuthError::LastAdmin)
        ));
        assert!(matches!(
            s.set_disabled("root", true),
            Err(AuthError::LastAdmin)
        ));
        s.add("second", PW, Role::Admin).unwrap();
        s.set_disabled("second", true).unwrap();
        assert!(matches!(
            s.set_role("root", Role::Operator),
            Err(AuthError::LastAdmin)
        ));
        s.set_disabled("second", false).unwrap();
        s.set_role("root", Role::Operator).unwrap();
        assert!(matches!(
            s.set_role("nobody", Role::Admin),
            Err(AuthError::UnknownUser(_))
        ));
    }

    #[test]
    fn list_json_has_no_password_material() {
        let (_dir, s) = store();
        s.add("alice", PW, Role::Admin).unwrap();
        let json = serde_json::to_string(&s.list().unwrap()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let user = value[0].as_object().unwrap();
        let mut keys: Vec<_> = user.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["created_at", "disabled", "role", "username"]);
        let created = user["created_at"].as_str().unwrap();
        assert!(created.ends_with('Z') && created.len() == "2026-01-01T00:00:00.000Z".len());

        let record = s.get("alice").unwrap().unwrap();
        let (salt, hash) = record.password.raw_parts();
        let lower = json.to_lowercase();
        for secret in [&salt[..], &hash[..]] {
            assert!(!lower.contains(&crate::auth::to_hex(secret)));
            assert!(!json.contains(&format!("{secret:?}")));
            assert!(!json.contains(&serde_json::to_string(secret).unwrap()[1..20]));
        }
        assert!(!lower.contains("hash") && !lower.contains("salt") && !lower.contains("password"));
        assert!(!format!("{record:?}").contains(&format!("{salt:?}")));
    }

    #[test]
    fn bootstrap_creates_admin_once() {
        let (_dir, s) = store();
        let generated = s.bootstrap_admin(None).unwrap().unwrap();
        assert_eq!(generated.chars().count(), 24);
        assert!(generated.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(
            s.authenticate("admin", &generated).unwrap().role,
            Role::Admin
        );
        assert_eq!(s.bootstrap_admin(None).unwrap(), None);
        assert_eq!(s.list().unwrap().len(), 1);
    }

    #[test]
    fn bootstrap_with_env_password() {
        let (_dir, s) = store();
        assert!(matches!(
            s.bootstrap_admin(Some("weak")),
            Err(AuthError::WeakPassword)
        ));
        assert!(s.is_empty().unwrap());
        assert_eq!(s.bootstrap_admin(Some("the admin password")).unwrap(), None);
        assert!(s.authenticate("admin", "the admin password").is_ok());
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let (_dir, s) = store();
        s.tree.insert("x", &[9u8, 1, 2][..]).unwrap();
        assert!(matches!(s.get("x"), Err(AuthError::Storage(_))));
        s.tree.insert("y", &[1u8, 200][..]).unwrap();
        assert!(matches!(s.get("y"), Err(AuthError::Storage(_))));
        s.tree.insert("z", &[][..]).unwrap();
        assert!(matches!(s.get("z"), Err(AuthError::Storage(_))));
        assert!(s.list().is_err());
    }

    #[test]
    fn production_store_uses_the_production_cost() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        assert_eq!(UserStore::open(&db).unwrap().iterations, PBKDF2_ITERATIONS);
    }
}
