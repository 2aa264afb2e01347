//! The security audit log: who did what to which account, when, from where — logins, token
//! refreshes, user administration, backups, audit-trail reads. Admin-only to read.
//!
//! Stored in the sled tree `security_log`: key = big-endian u64 `seq` (1, 2, 3, …), value =
//! format-version byte `1` + the entry as JSON (JSON, not bincode, because `details` is free-form
//! JSON, which bincode cannot decode).
//!
//! Hash-chained like the alarm log, so deleting, reordering or editing an entry is detectable:
//! `hash = SHA-256(prev_hash (32 raw bytes) || canonical_json)`, where the canonical JSON is the
//! entry object without `hash`, keys sorted at every level, no whitespace, UTF-8; the first
//! entry's `prev_hash` is `SHA-256("security:" + ledger_id)` (hyphenated, lowercase), binding the
//! chain to its ledger.
//!
//! Blocking (sled): call from a blocking thread.

use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use ring::digest::{digest, Context, SHA256};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{to_hex, AuthError};

/// Name of the sled tree holding the security log.
pub const SECURITY_LOG_TREE: &str = "security_log";
const FORMAT_VERSION: u8 = 1;
/// Free-text fields (a login's attempted username, the user agent, …) come from clients: cut
/// them so one request cannot write a huge record (sled keeps big values in unsynced `blobs/`).
const MAX_TEXT_CHARS: usize = 256;

/// What happened. Serialized in snake_case (`login_succeeded`, …). Entries store the action as a
/// string, so a log written by a newer version (with new actions) stays readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityAction {
    /// A correct password; a token was issued.
    LoginSucceeded,
    /// Wrong username or password, or a disabled account.
    LoginFailed,
    /// Refused by the login throttle without checking the password.
    LoginThrottled,
    /// A new token for a still-valid one (HTTP refresh or WebSocket `refresh`).
    TokenRefreshed,
    /// An account was created (including the bootstrap admin).
    UserCreated,
    /// An account's role changed.
    UserRoleChanged,
    /// An account's password changed.
    UserPasswordChanged,
    /// An account was disabled.
    UserDisabled,
    /// An account was re-enabled.
    UserEnabled,
    /// A backup was written.
    BackupCreated,
    /// The alarm event log was exported over HTTP (`GET /api/v1/events`). The offline `export`
    /// records nothing: it reads a directory its user already holds at the file level (often a
    /// read-only backup copy) and leaves it unchanged.
    AuditExport,
    /// An alarm history or the security log was read.
    HistoryRead,
    /// The state of every alarm at a past point was reconstructed (`GET /api/v1/alarms?as_of=`).
    StateAsOfRead,
}

impl SecurityAction {
    /// The snake_case name stored in entries.
    pub fn as_str(&self) -> &'static str {
        match self {
            SecurityAction::LoginSucceeded => "login_succeeded",
            SecurityAction::LoginFailed => "login_failed",
            SecurityAction::LoginThrottled => "login_throttled",
            SecurityAction::TokenRefreshed => "token_refreshed",
            SecurityAction::UserCreated => "user_created",
            SecurityAction::UserRoleChanged => "user_role_changed",
            SecurityAction::UserPasswordChanged => "user_password_changed",
            SecurityAction::UserDisabled => "user_disabled",
            SecurityAction::UserEnabled => "user_enabled",
            SecurityAction::BackupCreated => "backup_created",
            SecurityAction::AuditExport => "audit_export",
            SecurityAction::HistoryRead => "history_read",
            SecurityAction::StateAsOfRead => "state_as_of_read",
        }
    }
}

/// An entry to append; the log adds `seq`, `at` and `hash`. Build with [`NewSecurityEntry::new`]
/// and the chained setters.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSecurityEntry {
    /// Who acted (the authenticated username), if known.
    pub actor: Option<String>,
    /// What happened.
    pub action: SecurityAction,
    /// The account (or object) acted upon, e.g. the username of a login attempt.
    pub target: Option<String>,
    /// The client's address (after trusted-proxy resolution).
    pub address: Option<String>,
    /// The client's `User-Agent`.
    pub user_agent: Option<String>,
    /// Anything else worth keeping (filters used, new role, …). Never a password: keys containing
    /// "password" are dropped on append.
    pub details: Map<String, Value>,
}

impl NewSecurityEntry {
    /// An entry with only its action set.
    pub fn new(action: SecurityAction) -> Self {
        NewSecurityEntry {
            actor: None,
            action,
            target: None,
            address: None,
            user_agent: None,
            details: Map::new(),
        }
    }

    /// Sets `actor`.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets `target`.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Sets `address`.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Sets `user_agent`.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = Some(user_agent.into());
        self
    }

    /// Adds one `details` field.
    pub fn detail(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }
}

/// A stored entry, as served (one per NDJSON line) by `GET /api/v1/security-log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurityEntry {
    /// 1, 2, 3, … without gaps.
    pub seq: u64,
    /// When it was appended; RFC 3339, milliseconds, `Z`; never decreasing along the log.
    #[serde(serialize_with = "super::serialize_rfc3339_ms")]
    pub at: DateTime<Utc>,
    /// Who acted, if known.
    pub actor: Option<String>,
    /// A [`SecurityAction`] name.
    pub action: String,
    /// The account or object acted upon.
    pub target: Option<String>,
    /// The client's address.
    pub address: Option<String>,
    /// The client's user agent.
    pub user_agent: Option<String>,
    /// Free-form details (a JSON object).
    pub details: Map<String, Value>,
    /// Lowercase hex SHA-256 chaining this entry to the previous one.
    pub hash: String,
}

/// The end of the chain, where the next entry attaches.
#[derive(Debug, Clone, Copy)]
struct Head {
    seq: u64,
    hash: [u8; 32],
    at: DateTime<Utc>,
}

/// The security log of one ledger. Share it behind an `Arc`.
pub struct SecurityLog {
    db: sled::Db,
    tree: sled::Tree,
    genesis: [u8; 32],
    /// Appends must be serialized: each needs the previous hash and the next seq. A std `Mutex`
    /// held across insert + flush: security events are rare (logins cost 150 ms of PBKDF2 each)
    /// and callers are on blocking threads.
    head: Mutex<Head>,
}

impl std::fmt::Debug for SecurityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (seq, hash) = self.head();
        f.debug_struct("SecurityLog")
            .field("head_seq", &seq)
            .field("head_hash", &hash)
            .finish_non_exhaustive()
    }
}

impl SecurityLog {
    /// Opens (or creates) the `security_log` tree of the ledger `ledger_id`, reading its head.
    pub fn open(db: &sled::Db, ledger_id: Uuid) -> Result<Self, AuthError> {
        let tree = db.open_tree(SECURITY_LOG_TREE)?;
        let genesis = genesis_hash(ledger_id);
        let head = match tree.last()? {
            Some((key, value)) => {
                let last = decode(&value)?;
                // The key is the sequence number; the entry must say the same, or appends
                // would continue from a wrong number (and could overwrite entries).
                let key_seq = <[u8; 8]>::try_from(key.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        AuthError::Storage("security log key is not a sequence number".into())
                    })?;
                if last.seq != key_seq {
                    return Err(AuthError::Storage(format!(
                        "security log entry under key {key_seq} says seq {}: the log is damaged",
                        last.seq
                    )));
                }
                Head {
                    seq: last.seq,
                    hash: parse_hash(&last.hash)?,
                    at: last.at,
                }
            }
            None => Head {
                seq: 0,
                hash: genesis,
                at: DateTime::<Utc>::MIN_UTC,
            },
        };
        Ok(SecurityLog {
            db: db.clone(),
            tree,
            genesis,
            head: Mutex::new(head),
        })
    }

    /// Appends `entry` stamped with the current time; see [`SecurityLog::append_at`].
    pub fn append(&self, entry: NewSecurityEntry) -> Result<SecurityEntry, AuthError> {
        self.append_at(entry, Utc::now())
    }

    /// Appends `entry` at `now` (cut to milliseconds, and never before the previous entry),
    /// flushes, and returns it as stored.
    pub fn append_at(
        &self,
        entry: NewSecurityEntry,
        now: DateTime<Utc>,
    ) -> Result<SecurityEntry, AuthError> {
        let mut head = self.lock();
        let now_ms = DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
        let mut details = entry.details;
        drop_password_fields(&mut details);
        for value in details.values_mut() {
            cut_strings(value);
        }
        let mut stored = SecurityEntry {
            seq: head
                .seq
                .checked_add(1)
                .ok_or_else(|| AuthError::Storage("security log sequence exhausted".into()))?,
            at: now_ms.max(head.at),
            actor: entry.actor.map(cut),
            action: entry.action.as_str().to_owned(),
            target: entry.target.map(cut),
            address: entry.address.map(cut),
            user_agent: entry.user_agent.map(cut),
            details,
            hash: String::new(),
        };
        let hash = chain_hash(&head.hash, &stored)?;
        stored.hash = to_hex(&hash);
        let bytes = encode(&stored)?;
        self.tree.insert(stored.seq.to_be_bytes(), bytes)?;
        // The entry is in the tree now: advance the head even if the flush below fails, or the
        // next append would reuse this seq and overwrite it.
        *head = Head {
            seq: stored.seq,
            hash,
            at: stored.at,
        };
        self.db.flush()?;
        Ok(stored)
    }

    /// The last `seq` (0 when empty) and the head hash (the genesis hash when empty).
    pub fn head(&self) -> (u64, String) {
        let head = self.lock();
        (head.seq, to_hex(&head.hash))
    }

    /// All entries in order, read lazily from disk (no lock held: appends may continue).
    pub fn iter(&self) -> impl Iterator<Item = Result<SecurityEntry, AuthError>> + Send + 'static {
        self.iter_from(1)
    }

    /// Entries with `seq >= from`, in order.
    pub fn iter_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<SecurityEntry, AuthError>> + Send + 'static {
        self.tree
            .range(from.to_be_bytes()..)
            .values()
            .map(|value| decode(&value?))
    }

    /// Recomputes the whole chain: seqs 1, 2, 3, … matching their keys, times never
    /// decreasing, every hash right. Returns `(count, head_hash)` or a description of the first
    /// problem.
    pub fn verify(&self) -> Result<(u64, String), String> {
        let mut prev = self.genesis;
        let mut prev_at = DateTime::<Utc>::MIN_UTC;
        let mut count = 0u64;
        for item in self.tree.iter() {
            let (key, value) = item.map_err(|e| format!("security log unreadable: {e}"))?;
            let expected = count + 1;
            let entry =
                decode(&value).map_err(|e| format!("security log entry {expected}: {e}"))?;
            if key.as_ref() != expected.to_be_bytes() || entry.seq != expected {
                return Err(format!(
                    "security log: expected entry {expected}, found seq {}",
                    entry.seq
                ));
            }
            if entry.at < prev_at {
                return Err(format!(
                    "security log entry {expected}: time goes backwards"
                ));
            }
            let hash = chain_hash(&prev, &entry).map_err(|e| e.to_string())?;
            if to_hex(&hash) != entry.hash {
                return Err(format!(
                    "security log entry {expected}: hash mismatch (altered or out of order)"
                ));
            }
            prev = hash;
            prev_at = entry.at;
            count = expected;
        }
        Ok((count, to_hex(&prev)))
    }

    /// A poisoned lock: the panicking append either wrote nothing or advanced the head right
    /// after its insert, so the head is consistent with the tree.
    fn lock(&self) -> MutexGuard<'_, Head> {
        self.head
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `SHA-256("security:" + ledger_id)`, the predecessor of entry 1.
fn genesis_hash(ledger_id: Uuid) -> [u8; 32] {
    let seed = format!("security:{}", ledger_id.hyphenated());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, seed.as_bytes()).as_ref());
    out
}

/// `SHA-256(prev || canonical JSON of entry without "hash")`.
fn chain_hash(prev: &[u8; 32], entry: &SecurityEntry) -> Result<[u8; 32], AuthError> {
    let mut value = serde_json::to_value(entry)
        .map_err(|e| AuthError::Internal(format!("cannot serialize security entry: {e}")))?;
    if let Value::Object(map) = &mut value {
        map.remove("hash");
    }
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    let mut ctx = Context::new(&SHA256);
    ctx.update(prev);
    ctx.update(canonical.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// Canonical JSON: object keys sorted (by bytes) at every level, no whitespace. Sorted
/// explicitly rather than relying on `serde_json::Map` being a BTreeMap: a dependency enabling
/// serde_json's `preserve_order` feature would silently change every hash.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        // Scalars: serde_json's compact form (strings escaped, numbers as written).
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Belt and braces for "never a password in the audit trail", at any depth.
fn drop_password_fields(map: &mut Map<String, Value>) {
    map.retain(|key, _| !key.to_ascii_lowercase().contains("password"));
    for value in map.values_mut() {
        if let Value::Object(inner) = value {
            drop_password_fields(inner);
        }
    }
}

/// Details carry client-supplied text (an export's `actor` filter, a failure reason): every
/// string in them is cut like the top-level fields.
fn cut_strings(value: &mut Value) {
    match value {
        Value::String(text) => *text = cut(std::mem::take(text)),
        Value::Array(items) => items.iter_mut().for_each(cut_strings),
        Value::Object(map) => map.values_mut().for_each(cut_strings),
        _ => {}
    }
}

fn cut(text: String) -> String {
    if text.chars().count() <= MAX_TEXT_CHARS {
        text
    } else {
        text.chars().take(MAX_TEXT_CHARS).collect()
    }
}

fn encode(entry: &SecurityEntry) -> Result<Vec<u8>, AuthError> {
    let mut bytes = vec![FORMAT_VERSION];
    serde_json::to_writer(&mut bytes, entry)
        .map_err(|e| AuthError::Internal(format!("cannot serialize security entry: {e}")))?;
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> Result<SecurityEntry, AuthError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => serde_json::from_slice(body)
            .map_err(|e| AuthError::Storage(format!("corrupt security log entry: {e}"))),
        Some((version, _)) => Err(AuthError::Storage(format!(
            "security log entry has unknown format version {version}"
        ))),
        None => Err(AuthError::Storage("empty security log entry".into())),
    }
}

fn parse_hash(hex: &str) -> Result<[u8; 32], AuthError> {
    let bad = || AuthError::Storage(format!("security log hash {hex:?} is not 64 hex digits"));
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = hex
            .get(2 * i..2 * i + 2)
            .and_then(|pair| u8::from_str_radix(pair, 16).ok())
            .ok_or_else(bad)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn open() -> (tempfile::TempDir, sled::Db, Uuid, SecurityLog) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let id = Uuid::new_v4();
        let log = SecurityLog::open(&db, id).unwrap();
        (dir, db, id, log)
    }

    fn login(user: &str) -> NewSecurityEntry {
        NewSecurityEntry::new(SecurityAction::LoginSucceeded)
            .actor(user)
            .target(user)
            .address("10.0.0.1")
            .user_agent("test/1.0")
    }

    #[test]
    fn empty_log_verifies_to_genesis() {
        let (_dir, _db, id, log) = open();
        let (count, head) = log.verify().unwrap();
        assert_eq!(count, 0);
        assert_eq!(head, to_hex(&genesis_hash(id)));
        assert_eq!(log.head(), (0, head));
    }

    #[test]
    fn chain_recipe_is_the_documented_one() {
        let (_dir, _db, id, log) = open();
        let at = DateTime::parse_from_rfc3339("2026-11-05T10:00:00.123456Z")
            .unwrap()
            .to_utc();
        let e = log
            .append_at(
                login("alice")
                    .detail("b", 2)
                    .detail("a", json!({"y": 1, "x": [true, null]})),
                at,
            )
            .unwrap();
        let canonical = concat!(
            r#"{"action":"login_succeeded","actor":"alice","address":"10.0.0.1","#,
            r#""at":"2026-11-05T10:00:00.123Z","details":{"a":{"x":[true,null],"y":1},"b":2},"#,
            r#""seq":1,"target":"alice","user_agent":"test/1.0"}"#
        );
        let genesis = digest(&SHA256, format!("security:{id}").as_bytes());
        let mut input = genesis.as_ref().to_vec();
        input.extend_from_slice(canonical.as_bytes());
        assert_eq!(e.hash, to_hex(digest(&SHA256, &input).as_ref()));
        let line = serde_json::to_value(&e).unwrap();
        assert_eq!(line["at"], "2026-11-05T10:00:00.123Z");
        assert_eq!(line["target"], "alice");
        assert!(line["hash"].as_str().unwrap().len() == 64);
    }

    #[test]
    fn appends_chain_and_verify_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        let head = {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let log = SecurityLog::open(&db, id).unwrap();
            for user in ["a", "b", "c"] {
                log.append(login(user)).unwrap();
            }
            log.verify().unwrap()
        };
        assert_eq!(head.0, 3);
        let db = crate::store::sled_log::open_db_after_close(dir.path()).unwrap();
        let log = SecurityLog::open(&db, id).unwrap();
        assert_eq!(log.head(), head.clone());
        let e = log
            .append(NewSecurityEntry::new(SecurityAction::BackupCreated))
            .unwrap();
        assert_eq!(e.seq, 4);
        assert_eq!(e.actor, None);
        let entries: Vec<_> = log.iter().map(Result::unwrap).collect();
        assert_eq!(
            entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(log.iter_from(3).count(), 2);
        assert_eq!(log.verify().unwrap(), (4, e.hash));
        // The same data under another ledger id does not verify: chains are bound to a ledger.
        let other = SecurityLog::open(&db, Uuid::new_v4()).unwrap();
        assert!(other.verify().is_err());
    }

    #[test]
    fn time_never_goes_backwards() {
        let (_dir, _db, _id, log) = open();
        let t = Utc::now();
        let first = log.append_at(login("a"), t).unwrap();
        let second = log
            .append_at(login("b"), t - chrono::Duration::hours(1))
            .unwrap();
        assert_eq!(second.at, first.at);
        log.verify().unwrap();
    }

    #[test]
    fn tampering_is_detected() {
        let (_dir, _db, _id, log) = open();
        for user in ["a", "b", "c"] {
            log.append(login(user)).unwrap();
        }
        let key = 2u64.to_be_bytes();
        let original = log.tree.get(key).unwrap().unwrap();
        let mut entry = decode(&original).unwrap();
        entry.address = Some("192.0.2.66".into());
        log.tree.insert(key, encode(&entry).unwrap()).unwrap();
        let err = log.verify().unwrap_err();
        assert!(err.contains("entry 2"), "{err}");

        // Removing an entry is detected too.
        log.tree.insert(key, original).unwrap();
        log.verify().unwrap();
        log.tree.remove(key).unwrap();
        assert!(log.verify().unwrap_err().contains("expected entry 2"));
    }

    #[test]
    fn a_last_entry_whose_seq_disagrees_with_its_key_fails_open() {
        let (_dir, db, id, log) = open();
        log.append(login("alice")).unwrap();
        log.append(login("bob")).unwrap();
        drop(log);
        let tree = db.open_tree(SECURITY_LOG_TREE).unwrap();
        let mut entry = decode(&tree.get(2u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        entry.seq = 1;
        tree.insert(2u64.to_be_bytes(), encode(&entry).unwrap())
            .unwrap();
        match SecurityLog::open(&db, id) {
            Err(AuthError::Storage(why)) => assert!(why.contains("key 2 says seq 1"), "{why}"),
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    #[test]
    fn passwords_and_huge_fields_do_not_get_in() {
        let (_dir, _db, _id, log) = open();
        let e = log
            .append(
                NewSecurityEntry::new(SecurityAction::LoginFailed)
                    .target("x".repeat(10_000))
                    .detail("password", "hunter2hunter2")
                    .detail(
                        "nested",
                        json!({"newPassword": "s3cret-s3cret", "role": "admin"}),
                    )
                    .detail("reason", "bad_credentials")
                    .detail(
                        "filters",
                        json!({"actor": "y".repeat(10_000), "tags": ["z".repeat(10_000)]}),
                    ),
            )
            .unwrap();
        let line = serde_json::to_string(&e).unwrap();
        assert!(!line.contains("hunter2") && !line.contains("s3cret"));
        assert!(line.contains("bad_credentials") && line.contains("\"role\":\"admin\""));
        assert_eq!(e.target.unwrap().len(), MAX_TEXT_CHARS);
        let filters = &e.details["filters"];
        assert_eq!(filters["actor"].as_str().unwrap().len(), MAX_TEXT_CHARS);
        assert_eq!(filters["tags"][0].as_str().unwrap().len(), MAX_TEXT_CHARS);
        log.verify().unwrap();
    }

    #[test]
    fn concurrent_appends_keep_the_chain() {
        let (_dir, _db, _id, log) = open();
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..10 {
                        log.append(login(&format!("u{t}-{i}"))).unwrap();
                    }
                });
            }
        });
        assert_eq!(log.verify().unwrap().0, 40);
    }

    #[test]
    fn action_names() {
        assert_eq!(
            serde_json::to_value(SecurityAction::UserPasswordChanged).unwrap(),
            SecurityAction::UserPasswordChanged.as_str()
        );
        assert_eq!(SecurityAction::AuditExport.as_str(), "audit_export");
    }
}
