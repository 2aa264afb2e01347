//! The format corpus: golden encodings of format version 1 in `snapshots/v1/`.
//!
//! A log is forever: a record written today must decode in five years. These tests build a
//! fixed chain of events (fixed ids, times and ledger id, one of every kind) and prove that
//! - every golden `.bin` record decodes to exactly that event, and the event re-encodes to the
//!   golden bytes, byte for byte;
//! - every golden `.json` is the canonical JSON of the event and every `.hash` is
//!   `SHA-256(prev || json)`, chained from the genesis hash;
//! - the golden projection snapshot decodes and re-encodes byte-identically;
//! - every WebSocket message the server sends, built from the corpus, equals its golden JSON in
//!   `wire/server/`, and every golden client message in `wire/client/` still parses as the
//!   message it is;
//! - unknown versions, truncated and corrupted records are errors, never panics;
//! - `scripts/verify_chain.py` (Python, standard library) recomputes the same chain from an
//!   NDJSON export and names the offset of a tampered line.
//!
//! Golden files are written only with `UPDATE_SNAPSHOTS=1`; otherwise a missing file fails.
//! See `snapshots/README.md`: v1 files are never regenerated after release.

use alarm_ledger::domain::{AlarmChanges, AlarmSpec, Event, EventData, Hash, Severity};
use alarm_ledger::ledger::snapshot::{self, Snapshot};
use alarm_ledger::projection::Projection;
use alarm_ledger::protocol::{self, export_line, ClientMessage, Hello};
use alarm_ledger::store::chain::{canonical_json, event_hash, genesis};
use alarm_ledger::store::codec::{decode_event, encode_event, CodecError, FORMAT_VERSION};
use alarm_ledger::time::Timestamp;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use uuid::Uuid;

const LEDGER_ID: &str = "6f1c1a4e-3b8a-4a53-9c1e-2f3a4b5c6d7e";
const ALARM_A: &str = "019aa5b0-7c10-7a3e-8b11-0123456789ab";
const ALARM_B: &str = "019aa5b1-2e40-7c55-9d22-fedcba987654";
const COMMAND_ID: &str = "5c0ffee0-1234-4abc-8def-0123456789ab";
/// 2026-11-21T09:30:00.125Z
const T0: i64 = 1_795_253_400_125;

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

fn ledger_id() -> Uuid {
    uuid(LEDGER_ID)
}

fn event_id(n: u64) -> Uuid {
    uuid(&format!("019aa5b0-7c2d-7000-8000-{n:012x}"))
}

fn s(v: &str) -> String {
    v.to_string()
}

/// (golden file name, milliseconds after `T0`, actor, alarm, command_id, payload)
type Item = (
    &'static str,
    i64,
    &'static str,
    Uuid,
    Option<Uuid>,
    EventData,
);

/// The corpus: one event of every kind and variant, chained from genesis in this order.
/// Strings exercise the canonical JSON escaping (quotes, backslash, tab, newline, non-ASCII).
fn corpus() -> Vec<(&'static str, Event)> {
    let a = uuid(ALARM_A);
    let b = uuid(ALARM_B);
    let items: Vec<Item> = vec![
        (
            "01_created",
            0,
            "alice",
            a,
            None,
            EventData::Created(AlarmSpec {
                name: s("Brent \"front month\" > 90 €"),
                instrument: s("CO1 Comdty"),
                condition: s("PX_LAST > 90\tand VOLUME > 0"),
                severity: Severity::High,
                tags: vec![s("energy"), s("ブレント")],
                owner: s("alice"),
            }),
        ),
        (
            "02_updated",
            1_500,
            "bob",
            a,
            None,
            EventData::Updated(AlarmChanges {
                name: None,
                instrument: None,
                condition: Some(s("PX_LAST > 95")),
                severity: Some(Severity::Critical),
                tags: Some(vec![s("energy"), s("urgent")]),
            }),
        ),
        (
            "03_triggered_value_message",
            60_000,
            "zoë",
            a,
            None,
            EventData::Triggered {
                value: Some(s("95.42")),
                message: Some(s("crossed 95\nsource: \"BBG\" \\ feed")),
            },
        ),
        (
            "04_acknowledged_comment",
            61_001,
            "bob",
            a,
            None,
            EventData::Acknowledged {
                comment: Some(s("on it — desk 3")),
            },
        ),
        ("05_rearmed", 120_000, "bob", a, None, EventData::Rearmed),
        (
            "06_triggered_empty",
            120_000,
            "alice",
            a,
            None,
            EventData::Triggered {
                value: None,
                message: None,
            },
        ),
        (
            "07_acknowledged_empty",
            3_600_000,
            "alice",
            a,
            None,
            EventData::Acknowledged { comment: None },
        ),
        (
            "08_created_command_id",
            3_600_001,
            "alice",
            b,
            Some(uuid(COMMAND_ID)),
            EventData::Created(AlarmSpec {
                name: s("Gold"),
                instrument: s(""),
                condition: s(""),
                severity: Severity::Low,
                tags: vec![],
                owner: s("alice"),
            }),
        ),
        (
            "09_deleted",
            86_400_000,
            "alice",
            b,
            None,
            EventData::Deleted,
        ),
    ];
    let lid = ledger_id();
    let mut prev = genesis(lid);
    let mut out = Vec::new();
    for (i, (name, dt, actor, alarm_id, command_id, data)) in items.into_iter().enumerate() {
        let offset = i as u64 + 1;
        let mut e = Event {
            offset,
            id: event_id(offset),
            at: Timestamp(T0 + dt),
            actor: s(actor),
            alarm_id,
            command_id,
            data,
            hash: Hash::default(),
        };
        e.hash = event_hash(&prev, &e, lid);
        prev = e.hash;
        out.push((name, e));
    }
    out
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/v1")
}

fn updating() -> bool {
    std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1")
}

/// The golden file's bytes. With `UPDATE_SNAPSHOTS=1`, first (re)writes it with `fresh`;
/// otherwise a missing file is a failure. Never compares: callers assert what they prove.
fn golden(file: &str, fresh: &[u8]) -> Vec<u8> {
    let path = golden_dir().join(file);
    if updating() {
        match std::fs::read(&path) {
            Ok(old) if old == fresh => {}
            Ok(_) => {
                eprintln!(
                    "UPDATE_SNAPSHOTS: OVERWRITING {} — never do this to a released format version",
                    path.display()
                );
                std::fs::write(&path, fresh).unwrap();
            }
            Err(_) => {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, fresh).unwrap();
            }
        }
    }
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "golden file {} is missing ({e}); golden files are created only with \
             UPDATE_SNAPSHOTS=1 (see snapshots/README.md)",
            path.display()
        )
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn canonical_of(e: &Event) -> Vec<u8> {
    canonical_json(&Value::Object(e.json_body(Some(ledger_id()))))
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish().as_ref().try_into().unwrap()
}

fn corpus_snapshot() -> Snapshot {
    let events = corpus();
    let mut p = Projection::new();
    for (_, e) in &events {
        p.apply(e);
    }
    let last = &events.last().unwrap().1;
    Snapshot {
        ledger_id: ledger_id(),
        offset: last.offset,
        head_hash: last.hash,
        head_at: last.at,
        alarms: p.alarms_sorted(),
    }
}

fn export_ndjson(events: &[(&str, Event)]) -> String {
    let mut out = String::new();
    for (_, e) in events {
        out.push_str(&export_line(e, ledger_id()));
        out.push('\n');
    }
    out
}

#[test]
fn v1_records_decode_to_the_corpus_and_reencode_byte_for_byte() {
    assert_eq!(
        FORMAT_VERSION, 1,
        "a new format version gets its own snapshots/vN corpus"
    );
    for (name, event) in corpus() {
        let bytes = golden(&format!("{name}.bin"), &encode_event(&event));
        assert_eq!(bytes[0], 1, "{name}: version byte");
        // (a) yesterday's bytes still decode to exactly this event
        assert_eq!(decode_event(&bytes).as_ref(), Ok(&event), "{name}: decode");
        // (b) and today's encoder still writes exactly those bytes
        assert_eq!(
            hex(&encode_event(&event)),
            hex(&bytes),
            "{name}: re-encoding differs from the golden record"
        );
    }
}

#[test]
fn v1_canonical_json_and_hashes_match_the_golden_files() {
    let lid = ledger_id();
    let mut prev = genesis(lid);
    assert_eq!(
        prev.0,
        sha256(&[LEDGER_ID.as_bytes()]),
        "genesis = SHA-256 of the ledger id's lowercase hyphenated text"
    );
    for (name, event) in corpus() {
        let json = golden(&format!("{name}.json"), &canonical_of(&event));
        let hash_file = golden(
            &format!("{name}.hash"),
            format!("{}\n", event.hash.to_hex()).as_bytes(),
        );
        // (c) canonical JSON of today's code = the golden JSON ...
        assert_eq!(
            String::from_utf8(canonical_of(&event)).unwrap(),
            String::from_utf8(json.clone()).unwrap(),
            "{name}: canonical JSON"
        );
        // ... it is canonical (sorted, no whitespace: re-canonicalizing is the identity) ...
        let parsed: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            canonical_json(&parsed),
            json,
            "{name}: golden JSON is not canonical"
        );
        assert!(parsed.get("hash").is_none() && parsed.get("type").is_none());
        assert_eq!(parsed["ledger_id"], LEDGER_ID);
        // ... and the documented recipe over the golden bytes gives the golden hash.
        let hash_hex = std::str::from_utf8(&hash_file)
            .unwrap()
            .trim_end_matches('\n');
        assert_eq!(hex(&sha256(&[&prev.0, &json])), hash_hex, "{name}: recipe");
        assert_eq!(event.hash.to_hex(), hash_hex, "{name}: chain hash");
        assert_eq!(event_hash(&prev, &event, lid), event.hash, "{name}");
        prev = event.hash;
    }
}

#[test]
fn v1_projection_snapshot_decodes_and_reencodes_byte_identically() {
    let snap = corpus_snapshot();
    let fresh = snapshot::encode(&snap).unwrap();
    let bytes = golden("projection.snapshot", &fresh);
    assert_eq!(&bytes[..7], b"ALSNAP\x01", "magic and snapshot format 1");
    let decoded = snapshot::decode(&bytes).expect("golden snapshot decodes");
    // (d) the old file means the same state, and writes back to the same bytes
    assert_eq!(decoded, snap);
    assert_eq!(hex(&snapshot::encode(&decoded).unwrap()), hex(&bytes));
    assert_eq!(hex(&fresh), hex(&bytes));
    assert_eq!(decoded.alarms.len(), 2);
}

#[test]
fn v1_export_lines_match_the_golden_export() {
    let events = corpus();
    let fresh = export_ndjson(&events);
    let file = golden("export.ndjson", fresh.as_bytes());
    let file = String::from_utf8(file).unwrap();
    assert_eq!(file.lines().count(), events.len());
    // Compared as JSON values: key order and insignificant formatting are not the contract.
    for ((name, _), (got, want)) in events.iter().zip(fresh.lines().zip(file.lines())) {
        let got: Value = serde_json::from_str(got).unwrap();
        let want: Value = serde_json::from_str(want).unwrap();
        assert_eq!(got, want, "{name}: export line");
    }
}

#[test]
fn unknown_versions_and_truncated_records_are_errors_not_panics() {
    assert_eq!(decode_event(&[]), Err(CodecError::Empty));
    for (name, event) in &corpus() {
        let good = encode_event(event);
        for version in [0u8, 2, 3, 255] {
            let mut b = good.clone();
            b[0] = version;
            assert_eq!(
                decode_event(&b),
                Err(CodecError::UnknownVersion(version)),
                "{name}: version {version}"
            );
        }
        for len in 1..good.len() {
            assert!(
                matches!(decode_event(&good[..len]), Err(CodecError::Decode(_))),
                "{name}: truncated to {len} bytes"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode_event(&long), Err(CodecError::Trailing(1)), "{name}");
    }
    let snap = snapshot::encode(&corpus_snapshot()).unwrap();
    for len in 0..snap.len() {
        assert!(
            snapshot::decode(&snap[..len]).is_err(),
            "snapshot truncated to {len}"
        );
    }
    let mut other = snap.clone();
    other[6] = 2;
    assert!(snapshot::decode(&other).is_err(), "snapshot format 2");
    for i in 7..snap.len() {
        let mut b = snap.clone();
        b[i] ^= 0x01;
        assert!(
            snapshot::decode(&b).is_err(),
            "snapshot with byte {i} flipped"
        );
    }
}

/// A record whose length prefix is corrupted (one byte on disk) must decode to an error, so that
/// `Ledger::open` / `verify` report `Corrupt { offset }`. Without a decode limit bincode 2.0.1
/// allocates whatever length it reads: "capacity overflow" panics, or "memory allocation of …
/// bytes failed" aborts the whole process (e.g. `01_created` with byte 28, the actor's length,
/// set to 0xfd). `store::codec` decodes with `standard().with_limit::<N>()`.
#[test]
fn corrupted_records_are_errors_not_panics() {
    for (name, event) in &corpus() {
        let good = encode_event(event);
        for i in 1..good.len() {
            for v in [0x00, 0x7f, 0xfb, 0xfc, 0xfd, 0xfe, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let r = std::panic::catch_unwind(|| decode_event(&b));
                assert!(
                    r.is_ok(),
                    "{name}: byte {i} set to {v:#04x} panics the decoder"
                );
            }
        }
    }
}

// ---------------------------------------------------------------- scripts/verify_chain.py

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn verify_chain(args: &[&str], stdin: Option<&str>) -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/verify_chain.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to run scripts/verify_chain.py");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn verify_text(text: &str, extra: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.ndjson");
    std::fs::write(&path, text).unwrap();
    let mut args: Vec<&str> = extra.to_vec();
    args.push(path.to_str().unwrap());
    verify_chain(&args, None)
}

fn assert_ok(run: &Run, count: usize, head: &Event) {
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (
            0,
            format!(
                "ok {count} events, head {} {}\n",
                head.offset,
                head.hash.to_hex()
            )
            .as_str()
        ),
        "stderr: {}",
        run.stderr
    );
}

fn assert_fail(run: &Run, offset: u64) {
    assert_eq!(run.code, 1, "stdout: {} stderr: {}", run.stdout, run.stderr);
    assert!(
        run.stdout.starts_with(&format!("FAIL offset {offset}: ")),
        "expected a failure at offset {offset}, got: {}",
        run.stdout
    );
}

#[test]
fn verify_chain_script_recomputes_the_rust_chain() {
    let events = corpus();
    let head = &events.last().unwrap().1;
    let text = export_ndjson(&events);
    assert_ok(&verify_text(&text, &[]), events.len(), head);
    assert_ok(&verify_chain(&["-"], Some(&text)), events.len(), head);
    // The committed golden export verifies too (it is what an auditor would be handed).
    let golden_export = golden_dir().join("export.ndjson");
    assert!(
        golden_export.is_file(),
        "snapshots/v1/export.ndjson is committed"
    );
    assert_ok(
        &verify_chain(&[golden_export.to_str().unwrap()], None),
        events.len(),
        head,
    );
}

#[test]
fn verify_chain_script_names_the_tampered_offset() {
    let events = corpus();
    let lines: Vec<String> = events
        .iter()
        .map(|(_, e)| export_line(e, ledger_id()))
        .collect();
    // One changed character inside a `data` string of offset 3 ("95.42" → "95.43").
    let mut tampered = lines.clone();
    assert!(
        tampered[2].contains("\"value\":\"95.42\""),
        "{}",
        tampered[2]
    );
    tampered[2] = tampered[2].replace("\"value\":\"95.42\"", "\"value\":\"95.43\"");
    let run = verify_text(&(tampered.join("\n") + "\n"), &[]);
    assert_fail(&run, 3);
    assert!(run.stdout.contains("hash mismatch"), "{}", run.stdout);

    // A changed actor on the first line is caught against the genesis hash.
    let mut tampered = lines.clone();
    tampered[0] = tampered[0].replace("\"actor\":\"alice\"", "\"actor\":\"alicf\"");
    assert_fail(&verify_text(&(tampered.join("\n") + "\n"), &[]), 1);

    // A deleted line is a gap at its offset.
    let mut gap = lines.clone();
    gap.remove(4);
    assert_fail(&verify_text(&(gap.join("\n") + "\n"), &[]), 5);

    // Swapped lines.
    let mut swapped = lines.clone();
    swapped.swap(5, 6);
    assert_fail(&verify_text(&(swapped.join("\n") + "\n"), &[]), 6);

    // A line recomputed for another ledger cannot be mixed in.
    let other = Uuid::parse_str("00000000-0000-4000-8000-000000000000").unwrap();
    let mut mixed = lines.clone();
    mixed[7] = export_line(&events[7].1, other);
    assert_fail(&verify_text(&(mixed.join("\n") + "\n"), &[]), 8);

    // A line without ledger_id (a WebSocket-style event) is not an export line.
    let mut bare = lines.clone();
    bare[3] = Value::Object(events[3].1.to_json(None)).to_string();
    assert_fail(&verify_text(&(bare.join("\n") + "\n"), &[]), 4);

    // Unreadable first line, and an empty export.
    assert_fail(&verify_text("{\"offset\":1,\n", &[]), 0);
    assert_fail(&verify_text("", &[]), 0);
}

#[test]
fn verify_chain_script_checks_partial_exports() {
    let events = corpus();
    let lines: Vec<String> = events
        .iter()
        .map(|(_, e)| export_line(e, ledger_id()))
        .collect();
    let tail = lines[3..].join("\n") + "\n";
    let head = &events.last().unwrap().1;
    // Without --prev-hash: links from offset 4 on, with a note that offset 4 is taken as stored.
    let run = verify_text(&tail, &[]);
    assert_ok(&run, 6, head);
    assert!(run.stderr.contains("offset 4"), "{}", run.stderr);
    // With the hash of offset 3: fully verified.
    let prev = events[2].1.hash.to_hex();
    let run = verify_text(&tail, &["--prev-hash", &prev]);
    assert_ok(&run, 6, head);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    // With a wrong predecessor, offset 4 fails.
    let wrong = events[1].1.hash.to_hex();
    assert_fail(&verify_text(&tail, &["--prev-hash", &wrong]), 4);
    // A tampered offset 4 is only caught with --prev-hash.
    let tampered = tail.replace("on it — desk 3", "on it — desk 4");
    assert_fail(&verify_text(&tampered, &["--prev-hash", &prev]), 4);
}

/// Python's `json.dumps(ensure_ascii=False)` and our canonical JSON escape every string the
/// same way: control characters, quotes, backslashes, DEL, U+2028, astral characters.
#[test]
fn verify_chain_script_agrees_on_escaping_of_awkward_strings() {
    let lid = ledger_id();
    let mut all_controls: String = (0u8..0x20).map(char::from).collect();
    all_controls.push_str("\u{7f}\u{80}\u{9f}\u{a0}\u{2028}\u{2029}\u{feff}\"\\/😀é\u{10ffff}");
    let strings = [
        all_controls.clone(),
        s("</script><!--"),
        s("\\u0041 is not A"),
        s(""),
        s(" leading and trailing "),
    ];
    let mut prev = genesis(lid);
    let mut events = Vec::new();
    for (i, text) in strings.iter().enumerate() {
        let offset = i as u64 + 1;
        let mut e = Event {
            offset,
            id: event_id(100 + offset),
            at: Timestamp(T0 + offset as i64),
            actor: text.clone() + "x",
            alarm_id: uuid(ALARM_A),
            command_id: None,
            data: EventData::Triggered {
                value: Some(text.clone()),
                message: Some(all_controls.clone()),
            },
            hash: Hash::default(),
        };
        e.hash = event_hash(&prev, &e, lid);
        prev = e.hash;
        events.push(("awkward", e));
    }
    let head = &events.last().unwrap().1;
    assert_ok(
        &verify_text(&export_ndjson(&events), &[]),
        events.len(),
        head,
    );
}

/// The command index value (`store::CommandOutcome`, bincode by position) is on disk too: a
/// repeat of a command_id must get its original outcome for the life of the ledger, so these
/// encodings are pinned like records.
#[test]
fn v1_command_outcomes_decode_and_reencode_byte_for_byte() {
    use alarm_ledger::store::codec::{decode_value, encode_value};
    use alarm_ledger::store::{CommandOutcome, OutcomeKind};
    let alarm = uuid("0196a0a0-0000-7000-8000-00000000a001");
    let cases = [
        (
            "command_index/appended.bin",
            CommandOutcome {
                offset: 7,
                alarm_id: alarm,
                kind: OutcomeKind::Appended,
            },
        ),
        (
            "command_index/already.bin",
            CommandOutcome {
                offset: 3,
                alarm_id: alarm,
                kind: OutcomeKind::Already,
            },
        ),
        (
            "command_index/rejected.bin",
            CommandOutcome {
                offset: 0,
                alarm_id: alarm,
                kind: OutcomeKind::Rejected {
                    code: "not_triggered".into(),
                    message: "alarm is not triggered".into(),
                },
            },
        ),
    ];
    for (file, outcome) in cases {
        let fresh = encode_value(&outcome).unwrap();
        let bytes = golden(file, &fresh);
        let decoded: CommandOutcome = decode_value(&bytes).unwrap();
        assert_eq!(decoded, outcome, "{file} decodes");
        assert_eq!(
            encode_value(&decoded).unwrap(),
            bytes,
            "{file} re-encodes byte for byte"
        );
    }
}

/// The server's WebSocket messages, built from the corpus with fixed values: (golden name,
/// message text).
fn server_messages() -> Vec<(String, String)> {
    let events = corpus();
    let snap = corpus_snapshot();
    let alarm = uuid(ALARM_A);
    let req = |v: Value| Some(v);
    let mut out: Vec<(String, String)> = vec![(
        "hello".into(),
        protocol::hello(&Hello {
            ledger_id: ledger_id(),
            head: snap.offset,
            user: "zoë",
            role: "operator",
            token_expires_at: "2026-11-21T09:45:00.125Z".into(),
            server_time: Timestamp(T0 + 1),
        }),
    )];
    for (name, e) in &events {
        out.push((format!("event_{name}"), protocol::event_message(e)));
    }
    let ok = |r: Option<Value>, already: bool, duplicate: bool| {
        protocol::ok_value(&r, 5, alarm, already, duplicate).to_string()
    };
    let mut refreshed = serde_json::Map::new();
    refreshed.insert(
        "token_expires_at".into(),
        Value::String("2026-11-21T10:00:00.125Z".into()),
    );
    out.extend([
        (
            "snapshot".into(),
            protocol::snapshot(snap.offset, &snap.alarms, &req("s1".into())).unwrap(),
        ),
        (
            "snapshot_without_req".into(),
            protocol::snapshot(snap.offset, &snap.alarms, &None).unwrap(),
        ),
        (
            "live".into(),
            protocol::live(snap.offset, &req("s1".into())),
        ),
        (
            "live_without_req".into(),
            protocol::live(snap.offset, &None),
        ),
        ("ok_command".into(), ok(req(7.into()), false, false)),
        ("ok_already".into(), ok(req("t-2".into()), true, false)),
        ("ok_duplicate".into(), ok(None, false, true)),
        (
            "ok_unsubscribe".into(),
            protocol::ok_plain(&req("u".into()), serde_json::Map::new()),
        ),
        (
            "ok_refresh".into(),
            protocol::ok_plain(&req("r".into()), refreshed),
        ),
        (
            "error".into(),
            protocol::error(
                &req(3.into()),
                "version_conflict",
                "alarm is at version 4, expected 3",
            ),
        ),
        (
            "error_without_req".into(),
            protocol::error(
                &None,
                "bad_request",
                "not JSON: expected value at line 1 column 1",
            ),
        ),
        ("pong".into(), protocol::pong(&req("p".into()))),
        (
            "token_expiring".into(),
            protocol::token_expiring("2026-11-21T09:45:00.125Z"),
        ),
    ]);
    out
}

#[test]
fn v1_server_messages_match_the_golden_files() {
    for (name, text) in server_messages() {
        let fresh: Value = serde_json::from_str(&text).expect("the server sends JSON");
        let file = golden(
            &format!("wire/server/{name}.json"),
            format!("{text}\n").as_bytes(),
        );
        let golden: Value = serde_json::from_slice(&file)
            .unwrap_or_else(|e| panic!("wire/server/{name}.json is not JSON: {e}"));
        // Compared as JSON values: fields and values are the contract, key order is not.
        assert_eq!(
            fresh, golden,
            "{name}: the message differs from the golden file"
        );
    }
}

/// Client messages a v1 client sends (golden name, text, the message it must parse as).
fn client_messages() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (
            "subscribe_from_0",
            r#"{"type":"subscribe","req":"s1","from":0}"#,
            "Subscribe",
        ),
        (
            "subscribe_resume",
            r#"{"type":"subscribe","req":"s2","from":9,"ledger_id":"6f1c1a4e-3b8a-4a53-9c1e-2f3a4b5c6d7e","from_hash":"8d7f1bb4a4b0c3b7a3b5c1d9e0f2a4c6b8d0e2f4a6c8e0b2d4f6a8c0e2b4d6f8"}"#,
            "Subscribe",
        ),
        (
            "subscribe_snapshot",
            r#"{"type":"subscribe","req":"s3","snapshot":true}"#,
            "Subscribe",
        ),
        (
            "unsubscribe",
            r#"{"type":"unsubscribe","req":"u"}"#,
            "Unsubscribe",
        ),
        (
            "create",
            r#"{"type":"create","req":1,"command_id":"5c0ffee0-1234-4abc-8def-0123456789ab","alarm":{"name":"AAPL above 200","instrument":"AAPL","condition":"PX_LAST > 200","severity":"high","tags":["equities","us"]}}"#,
            "Create",
        ),
        (
            "update",
            r#"{"type":"update","req":2,"alarm_id":"019aa5b0-7c10-7a3e-8b11-0123456789ab","expected_version":1,"changes":{"severity":"critical","tags":["equities"]}}"#,
            "Update",
        ),
        (
            "trigger",
            r#"{"type":"trigger","req":3,"alarm_id":"019aa5b0-7c10-7a3e-8b11-0123456789ab","value":"201.5","message":"crossed 200"}"#,
            "Trigger",
        ),
        (
            "ack",
            r#"{"type":"ack","req":4,"alarm_id":"019aa5b0-7c10-7a3e-8b11-0123456789ab","comment":"looking"}"#,
            "Ack",
        ),
        (
            "rearm",
            r#"{"type":"rearm","req":5,"alarm_id":"019aa5b0-7c10-7a3e-8b11-0123456789ab"}"#,
            "Rearm",
        ),
        (
            "delete",
            r#"{"type":"delete","req":6,"alarm_id":"019aa5b0-7c10-7a3e-8b11-0123456789ab","expected_version":4}"#,
            "Delete",
        ),
        ("ping", r#"{"type":"ping","req":"p"}"#, "Ping"),
        (
            "refresh",
            r#"{"type":"refresh","req":"r","token":"eyJhbGciOiJIUzI1NiJ9.e30.sig"}"#,
            "Refresh",
        ),
    ]
}

#[test]
fn v1_client_messages_still_parse() {
    for (name, text, kind) in client_messages() {
        let file = golden(
            &format!("wire/client/{name}.json"),
            format!("{text}\n").as_bytes(),
        );
        let text = String::from_utf8(file).expect("UTF-8");
        let (req, msg) = protocol::parse_client_message(text.trim_end())
            .unwrap_or_else(|(_, e)| panic!("{name}: a v1 client message no longer parses: {e:?}"));
        let parsed = format!("{msg:?}");
        assert!(
            parsed.starts_with(kind),
            "{name}: parsed as {parsed}, expected {kind}"
        );
        assert!(req.is_some(), "{name}: its req is kept");
        // Commands still turn into the command they are.
        if !matches!(
            msg,
            ClientMessage::Subscribe { .. }
                | ClientMessage::Unsubscribe {}
                | ClientMessage::Ping {}
                | ClientMessage::Refresh { .. }
        ) {
            protocol::command_of(msg, "zoë")
                .expect("a command")
                .unwrap_or_else(|e| panic!("{name}: refused: {e:?}"));
        }
    }
}
