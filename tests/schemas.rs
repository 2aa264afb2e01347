//! The files of `schemas/` are the single source of truth of the wire contract (PROTOCOL.md v1).
//! These tests prove that they are valid JSON Schema 2020-12 / OpenAPI 3.1, that what the code
//! emits today (export lines, every server message builder, alarms) conforms to them, that what
//! they accept from clients the server's parser accepts too, and that they reject what they must.
//!
//! Other tests can validate live output with [`validator`]'s recipe: load every
//! `schemas/*.schema.json` into the registry under its `$id`, then `$ref` the shape wanted.

use alarm_ledger::domain::{Alarm, Event, Rejection};
use alarm_ledger::ledger::snapshot;
use alarm_ledger::ledger::CommandError;
use alarm_ledger::projection::Projection;
use alarm_ledger::protocol::{self, Hello};
use alarm_ledger::store::chain::canonical_json;
use alarm_ledger::store::codec::decode_event;
use alarm_ledger::time::Timestamp;
use jsonschema::{Draft, Resource, Validator};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use uuid::Uuid;

const BASE: &str = "https://alarm-ledger.example/schemas/v1/";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every `schemas/*.schema.json`, by file name.
fn schema_files() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(root().join("schemas"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".schema.json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read_json(&p),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn openapi() -> Value {
    read_json(&root().join("schemas/openapi.json"))
}

/// A validator for `reference` (relative to the schemas' base, e.g. `event.schema.json` or
/// `server-messages.schema.json#/$defs/event`), with every schema file (and the OpenAPI
/// document, for its components) in the registry. Formats (`uuid`, `date-time`) are checked.
fn validator(reference: &str) -> Validator {
    let mut resources: Vec<(String, Resource)> = schema_files()
        .into_iter()
        .map(|(name, v)| {
            let id = v["$id"]
                .as_str()
                .expect("every schema has an $id")
                .to_string();
            assert_eq!(id, format!("{BASE}{name}"), "$id of {name}");
            (id, Resource::from_contents(v).unwrap())
        })
        .collect();
    resources.push((
        format!("{BASE}openapi.json"),
        Draft::Draft202012.create_resource(openapi()),
    ));
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .with_resources(resources.into_iter())
        .build(&json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": format!("{BASE}test-root.json"),
            "$ref": reference,
        }))
        .unwrap_or_else(|e| panic!("schema {reference} does not compile: {e}"))
}

#[track_caller]
fn assert_valid(v: &Validator, instance: &Value, what: &str) {
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} should be valid:\n{instance}\n{}",
        errors.join("\n")
    );
}

#[track_caller]
fn assert_invalid(v: &Validator, instance: &Value, what: &str) {
    assert!(
        !v.is_valid(instance),
        "{what} should be invalid:\n{instance}"
    );
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

/// The golden events of `snapshots/v1` (decoded from their records) and their ledger id.
fn golden_events() -> (Uuid, Vec<(String, Event)>) {
    let dir = root().join("snapshots/v1");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bin"))
        .map(|n| n.trim_end_matches(".bin").to_string())
        .collect();
    names.sort();
    assert!(names.len() >= 9, "the golden corpus is in snapshots/v1");
    let first = read_json(&dir.join(format!("{}.json", names[0])));
    let ledger_id = Uuid::parse_str(first["ledger_id"].as_str().unwrap()).unwrap();
    let events = names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(format!("{n}.bin"))).unwrap();
            (n, decode_event(&bytes).unwrap())
        })
        .collect();
    (ledger_id, events)
}

fn golden_alarms() -> Vec<Alarm> {
    let bytes = std::fs::read(root().join("snapshots/v1/projection.snapshot")).unwrap();
    snapshot::decode(&bytes).unwrap().alarms
}

/// Every error code the contract knows, from the schema itself.
fn error_codes() -> Vec<String> {
    let common = read_json(&root().join("schemas/common.schema.json"));
    common["$defs"]["error_code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// PROTOCOL.md: each error code's HTTP status.
fn status_of(code: &str) -> u16 {
    match code {
        "bad_request" => 400,
        "unauthorized" => 401,
        "forbidden" => 403,
        "not_found" => 404,
        "not_triggered" | "not_acknowledged" | "version_conflict" | "alarm_deleted"
        | "ledger_mismatch" => 409,
        "offset_out_of_range" => 416,
        "rate_limited" => 429,
        "overloaded" => 503,
        "internal" => 500,
        other => panic!("{other} is not a PROTOCOL.md error code"),
    }
}

/// `status_of`, plus the HTTP-only code `conflict` (an existing user; README: an addition).
fn http_status_of(code: &str) -> u16 {
    match code {
        "conflict" => 409,
        other => status_of(other),
    }
}

// ---------------------------------------------------------------- the schema files

#[test]
fn every_schema_file_is_valid_draft_2020_12_and_compiles() {
    let files = schema_files();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for required in [
        "alarm.schema.json",
        "client-messages.schema.json",
        "common.schema.json",
        "event.schema.json",
        "server-messages.schema.json",
    ] {
        assert!(names.contains(&required), "schemas/{required} is missing");
    }
    for (name, schema) in &files {
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        if let Err(e) = jsonschema::meta::validate(schema) {
            panic!("{name} is not a valid JSON Schema: {e}");
        }
        // Compiling resolves every $ref (a dangling one is an error).
        validator(name);
        if let Some(defs) = schema["$defs"].as_object() {
            for def in defs.keys() {
                validator(&format!("{name}#/$defs/{def}"));
            }
        }
    }
    // PROTOCOL.md's error codes, exactly.
    let mut codes = error_codes();
    codes.sort();
    let mut expected = vec![
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "not_triggered",
        "not_acknowledged",
        "version_conflict",
        "alarm_deleted",
        "ledger_mismatch",
        "offset_out_of_range",
        "rate_limited",
        "overloaded",
        "internal",
    ];
    expected.sort();
    assert_eq!(codes, expected);
}

// ---------------------------------------------------------------- events

#[test]
fn golden_events_conform_to_the_event_schema() {
    let export = validator("event.schema.json");
    let event = validator("event.schema.json#/$defs/event");
    let canonical = validator("event.schema.json#/$defs/canonical");
    let message = validator("server-messages.schema.json");
    let (ledger_id, events) = golden_events();
    let mut kinds = std::collections::BTreeSet::new();
    for (name, e) in &events {
        kinds.insert(e.kind().as_str());
        let line = parse(&protocol::export_line(e, ledger_id));
        assert_valid(&export, &line, &format!("{name}: export line"));
        assert_valid(&event, &line, &format!("{name}: event with ledger_id"));
        assert_invalid(
            &canonical,
            &line,
            &format!("{name}: export line (has hash) as canonical"),
        );

        let golden_json = std::fs::read(root().join(format!("snapshots/v1/{name}.json"))).unwrap();
        let body: Value = serde_json::from_slice(&golden_json).unwrap();
        assert_valid(&canonical, &body, &format!("{name}: canonical form"));
        assert_invalid(
            &export,
            &body,
            &format!("{name}: canonical form (no hash) as export"),
        );
        assert_eq!(
            canonical_json(&Value::Object(e.json_body(Some(ledger_id)))),
            golden_json,
            "{name}"
        );

        let bare = Value::Object(e.to_json(None));
        assert_valid(&event, &bare, &format!("{name}: event without ledger_id"));
        assert_invalid(
            &export,
            &bare,
            &format!("{name}: export line without ledger_id"),
        );

        let wire = parse(&protocol::event_message(e));
        assert_valid(&message, &wire, &format!("{name}: event message"));
        assert_invalid(
            &export,
            &wire,
            &format!("{name}: event message (has type) as export"),
        );
    }
    assert_eq!(kinds.len(), 6, "the corpus covers every kind: {kinds:?}");
}

#[test]
fn event_schema_rejects_malformed_events() {
    let export = validator("event.schema.json");
    let (ledger_id, events) = golden_events();
    let find = |kind: &str| {
        let e = &events
            .iter()
            .find(|(_, e)| e.kind().as_str() == kind)
            .unwrap()
            .1;
        parse(&protocol::export_line(e, ledger_id))
    };
    let created = find("alarm_created");
    let triggered = find("alarm_triggered");
    let rearmed = find("alarm_rearmed");
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, &Value, Edit)> = vec![
        ("no ledger_id", &created, |v| {
            v.as_object_mut().unwrap().remove("ledger_id");
        }),
        ("no hash", &created, |v| {
            v.as_object_mut().unwrap().remove("hash");
        }),
        ("uppercase hash", &created, |v| {
            v["hash"] = json!(v["hash"].as_str().unwrap().to_uppercase())
        }),
        ("short hash", &created, |v| v["hash"] = json!("abcd")),
        ("extra field", &created, |v| v["extra"] = json!(1)),
        ("wire type", &created, |v| v["type"] = json!("event")),
        ("offset 0", &created, |v| v["offset"] = json!(0)),
        ("float offset", &created, |v| v["offset"] = json!(1.5)),
        ("string offset", &created, |v| v["offset"] = json!("1")),
        ("null command_id", &created, |v| {
            v["command_id"] = Value::Null
        }),
        ("uppercase id", &created, |v| {
            v["id"] = json!(v["id"].as_str().unwrap().to_uppercase())
        }),
        ("time without millis", &created, |v| {
            v["at"] = json!("2026-11-21T09:30:00Z")
        }),
        ("time with offset", &created, |v| {
            v["at"] = json!("2026-11-21T10:30:00.125+01:00")
        }),
        ("unknown kind", &created, |v| {
            v["kind"] = json!("alarm_exploded")
        }),
        ("created without owner", &created, |v| {
            v["data"].as_object_mut().unwrap().remove("owner");
        }),
        ("created with bad severity", &created, |v| {
            v["data"]["severity"] = json!("urgent")
        }),
        ("created with extra data", &created, |v| {
            v["data"]["x"] = json!(1)
        }),
        ("trigger value as number", &triggered, |v| {
            v["data"]["value"] = json!(95.42)
        }),
        ("trigger with a comment", &triggered, |v| {
            v["data"]["comment"] = json!("no")
        }),
        ("trigger with null message", &triggered, |v| {
            v["data"]["message"] = Value::Null
        }),
        ("created data under trigger kind", &created, |v| {
            v["kind"] = json!("alarm_triggered")
        }),
        ("rearm with data", &rearmed, |v| v["data"]["x"] = json!(1)),
        ("empty update", &rearmed, |v| {
            v["kind"] = json!("alarm_updated")
        }),
    ];
    for (what, base, edit) in cases {
        assert_valid(&export, base, "unedited");
        let mut v = base.clone();
        edit(&mut v);
        assert_invalid(&export, &v, what);
    }
}

// ---------------------------------------------------------------- alarms

#[test]
fn alarm_json_conforms_to_the_alarm_schema_in_every_state() {
    let alarm = validator("alarm.schema.json");
    let (_, events) = golden_events();
    // After every event of the corpus, every alarm's JSON conforms.
    let mut p = Projection::new();
    let mut states = std::collections::BTreeSet::new();
    for (name, e) in &events {
        p.apply(e);
        for a in p.alarms_sorted() {
            states.insert(a.state.as_str());
            assert_valid(&alarm, &a.to_json(), &format!("alarm after {name}"));
        }
    }
    assert_eq!(states.len(), 4, "every state was seen: {states:?}");
    for a in golden_alarms() {
        assert_valid(&alarm, &a.to_json(), "alarm of the golden snapshot");
    }
    let a = golden_alarms()
        .into_iter()
        .find(|a| a.last_ack.is_some())
        .unwrap()
        .to_json();
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit)> = vec![
        ("missing key", |v| {
            v.as_object_mut().unwrap().remove("last_ack_comment");
        }),
        ("extra key", |v| v["colour"] = json!("red")),
        ("unknown state", |v| v["state"] = json!("silenced")),
        ("version 0", |v| v["version"] = json!(0)),
        ("tags not strings", |v| v["tags"] = json!([1])),
        ("trigger time without actor", |v| {
            v["last_triggered_by"] = Value::Null
        }),
        ("acknowledged but never acked", |v| {
            v["last_acked_at"] = Value::Null;
            v["last_acked_by"] = Value::Null;
            v["last_ack_comment"] = Value::Null;
        }),
    ];
    for (what, edit) in cases {
        let mut v = a.clone();
        edit(&mut v);
        assert_invalid(&alarm, &v, what);
    }
}

// ---------------------------------------------------------------- server → client

#[test]
fn every_server_message_builder_conforms() {
    let any = validator("server-messages.schema.json");
    let (ledger_id, events) = golden_events();
    let alarm_id = events[0].1.alarm_id;
    let expires = Timestamp(1_795_254_300_000).to_rfc3339();
    let mut messages: Vec<(String, String)> = vec![
        (
            "hello".into(),
            protocol::hello(&Hello {
                ledger_id,
                head: 9,
                user: "alice",
                role: "operator",
                token_expires_at: expires.clone(),
                server_time: Timestamp::now(),
            }),
        ),
        (
            "hello, empty ledger".into(),
            protocol::hello(&Hello {
                ledger_id,
                head: 0,
                user: "root",
                role: "admin",
                token_expires_at: expires.clone(),
                server_time: Timestamp::now(),
            }),
        ),
        (
            "snapshot".into(),
            protocol::snapshot(9, &golden_alarms(), &None).unwrap(),
        ),
        (
            "snapshot, string req".into(),
            protocol::snapshot(9, &golden_alarms(), &Some(json!("s1"))).unwrap(),
        ),
        (
            "empty snapshot, integer req".into(),
            protocol::snapshot(0, &[], &Some(json!(5))).unwrap(),
        ),
        (
            "empty snapshot".into(),
            protocol::snapshot(0, &[], &None).unwrap(),
        ),
        ("live".into(), protocol::live(9, &None)),
        (
            "live, string req".into(),
            protocol::live(9, &Some(json!("s1"))),
        ),
        (
            "live at 0, integer req".into(),
            protocol::live(0, &Some(json!(5))),
        ),
        ("live at 0".into(), protocol::live(0, &None)),
        ("token_expiring".into(), protocol::token_expiring(&expires)),
        ("pong".into(), protocol::pong(&None)),
        (
            "pong, string req".into(),
            protocol::pong(&Some(json!("p1"))),
        ),
        ("pong, integer req".into(), protocol::pong(&Some(json!(42)))),
        ("ok plain".into(), protocol::ok_plain(&None, Map::new())),
        (
            "ok plain, req".into(),
            protocol::ok_plain(&Some(json!("u1")), Map::new()),
        ),
        ("ok refresh".into(), {
            let mut extra = Map::new();
            extra.insert("token_expires_at".into(), json!(expires));
            protocol::ok_plain(&Some(json!(3)), extra)
        }),
    ];
    for req in [None, Some(json!("r-1")), Some(json!(7))] {
        for (already, duplicate) in [(false, false), (true, false), (false, true), (true, true)] {
            messages.push((
                format!("ok {req:?} already={already} duplicate={duplicate}"),
                protocol::ok_value(&req, 3, alarm_id, already, duplicate).to_string(),
            ));
        }
        for code in error_codes() {
            messages.push((
                format!("error {code} {req:?}"),
                protocol::error(&req, &code, "something \"went\" wrong"),
            ));
        }
    }
    for (name, e) in &events {
        messages.push((format!("event {name}"), protocol::event_message(e)));
    }
    for (what, text) in &messages {
        let v: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
        assert_valid(&any, &v, what);
        let ty = v["type"].as_str().unwrap();
        let def = match ty {
            "ok" if v.get("offset").is_some() => "ok_command".to_string(),
            "ok" => "ok_request".to_string(),
            other => other.to_string(),
        };
        assert_valid(
            &validator(&format!("server-messages.schema.json#/$defs/{def}")),
            &v,
            what,
        );
    }

    // Every code the domain and the writer produce is a protocol code.
    let id = Uuid::nil();
    let rejections = [
        Rejection::NotFound(id),
        Rejection::AlreadyExists(id),
        Rejection::NotTriggered,
        Rejection::NotAcknowledged,
        Rejection::AlarmDeleted(id),
        Rejection::VersionConflict {
            expected: 1,
            actual: 2,
        },
        Rejection::Invalid("x".into()),
    ];
    let mut produced: Vec<&str> = rejections.iter().map(Rejection::code).collect();
    produced.extend(
        [
            CommandError::Overloaded,
            CommandError::Storage("disk".into()),
            CommandError::ShuttingDown,
        ]
        .iter()
        .map(CommandError::code),
    );
    for code in produced {
        assert_valid(&any, &parse(&protocol::error(&None, code, "m")), code);
    }

    type Edit = fn(&mut Value);
    let hello = parse(&messages[0].1);
    let ok = parse(&protocol::ok_value(&None, 3, alarm_id, false, false).to_string());
    let err = parse(&protocol::error(&None, "not_found", "m"));
    let cases: Vec<(&str, &Value, Edit)> = vec![
        ("unknown type", &hello, |v| v["type"] = json!("welcome")),
        ("protocol 2", &hello, |v| v["protocol"] = json!(2)),
        ("hello without user", &hello, |v| {
            v.as_object_mut().unwrap().remove("user");
        }),
        ("hello with unknown role", &hello, |v| {
            v["user"]["role"] = json!("root")
        }),
        ("ok without alarm_id", &ok, |v| {
            v.as_object_mut().unwrap().remove("alarm_id");
        }),
        ("ok already false", &ok, |v| v["already"] = json!(false)),
        ("ok float req", &ok, |v| v["req"] = json!(1.5)),
        ("ok offset 0", &ok, |v| v["offset"] = json!(0)),
        ("error code not in PROTOCOL.md", &err, |v| {
            v["code"] = json!("conflict")
        }),
        ("error without message", &err, |v| {
            v.as_object_mut().unwrap().remove("message");
        }),
    ];
    for (what, base, edit) in cases {
        let mut v = base.clone();
        edit(&mut v);
        assert_invalid(&any, &v, what);
    }
}

// ---------------------------------------------------------------- client → server

/// Valid client messages: the schema accepts them, and so does the server's parser.
fn valid_client_messages() -> Vec<Value> {
    let id = "019aa5b0-7c10-7a3e-8b11-0123456789ab";
    let cmd = "5c0ffee0-1234-4abc-8def-0123456789ab";
    let hash = "a492829759b7cd8c0d1053463cb3a86983caa35069cff60d4ff7a30e49a044b5";
    vec![
        json!({"type": "subscribe"}),
        json!({"type": "subscribe", "from": 0}),
        json!({"type": "subscribe", "req": 1, "from": 42, "ledger_id": "6f1c1a4e-3b8a-4a53-9c1e-2f3a4b5c6d7e", "from_hash": hash}),
        json!({"type": "subscribe", "req": "s", "snapshot": true}),
        json!({"type": "unsubscribe"}),
        json!({"type": "unsubscribe", "req": "u"}),
        json!({"type": "create", "alarm": {"name": "Brent > 90"}}),
        json!({"type": "create", "req": 9, "command_id": cmd, "alarm": {
            "name": "Brent \"front\" > 90 €", "instrument": "CO1 Comdty",
            "condition": "PX_LAST > 90\nand\tmore", "severity": "critical",
            "tags": ["energy", "ブレント"], "id": id}}),
        json!({"type": "create", "alarm": {"name": "x".repeat(200), "tags": vec!["t"; 32]}}),
        json!({"type": "trigger", "alarm_id": id}),
        json!({"type": "trigger", "alarm_id": id, "value": "95.42", "message": "crossed", "command_id": cmd, "expected_version": 3, "req": "t"}),
        json!({"type": "trigger", "alarm_id": id, "value": 9542}),
        json!({"type": "trigger", "alarm_id": id.to_uppercase(), "value": -3}),
        json!({"type": "ack", "alarm_id": id}),
        json!({"type": "ack", "alarm_id": id, "comment": "on it", "command_id": cmd, "expected_version": 4}),
        json!({"type": "rearm", "alarm_id": id, "expected_version": 0}),
        json!({"type": "update", "alarm_id": id, "changes": {"severity": "low"}}),
        json!({"type": "update", "alarm_id": id, "req": 5, "changes": {"name": "n", "instrument": "i", "condition": "c", "tags": []}, "command_id": cmd, "expected_version": 2}),
        json!({"type": "delete", "alarm_id": id}),
        json!({"type": "delete", "alarm_id": id, "command_id": cmd, "expected_version": 7}),
        json!({"type": "refresh", "token": "eyJhbGciOiJIUzI1NiJ9.e30.sig"}),
        json!({"type": "ping"}),
        json!({"type": "ping", "req": -1}),
    ]
}

#[test]
fn valid_client_messages_are_accepted_by_schema_and_server() {
    let schema = validator("client-messages.schema.json");
    for msg in valid_client_messages() {
        assert_valid(&schema, &msg, "client message");
        let ty = msg["type"].as_str().unwrap();
        assert_valid(
            &validator(&format!("client-messages.schema.json#/$defs/{ty}")),
            &msg,
            ty,
        );
        let (req, parsed) = protocol::parse_client_message(&msg.to_string())
            .unwrap_or_else(|(_, e)| panic!("the server rejects {msg}: {e}"));
        assert_eq!(req.as_ref(), msg.get("req"), "req echoed: {msg}");
        if let Some(cmd) = protocol::command_of(parsed, "alice") {
            cmd.unwrap_or_else(|e| panic!("the server rejects the command {msg}: {e}"));
        }
    }
}

#[test]
fn invalid_client_messages_are_rejected() {
    let schema = validator("client-messages.schema.json");
    let id = "019aa5b0-7c10-7a3e-8b11-0123456789ab";
    // (message, whether the server's parser rejects it too; `false` marks where the schema,
    // the contract, is stricter than the server's leniency)
    let cases: Vec<(Value, bool)> = vec![
        (json!({}), true),
        (json!([]), true),
        (json!({"type": "explode"}), true),
        (json!({"type": 5}), true),
        (json!({"type": "trigger"}), true),
        (json!({"type": "trigger", "alarm_id": "not-a-uuid"}), true),
        (json!({"type": "trigger", "alarm_id": 5}), true),
        (json!({"type": "ping", "req": 1.5}), true),
        (json!({"type": "ping", "req": true}), true),
        (json!({"type": "ping", "req": {"a": 1}}), true),
        (json!({"type": "subscribe", "from": -1}), true),
        (json!({"type": "subscribe", "from": "3"}), true),
        (json!({"type": "subscribe", "snapshot": "yes"}), true),
        (json!({"type": "create"}), true),
        (json!({"type": "create", "alarm": {}}), true),
        (json!({"type": "create", "alarm": {"name": "   "}}), true),
        (
            json!({"type": "create", "alarm": {"name": "x".repeat(201)}}),
            true,
        ),
        (
            json!({"type": "create", "alarm": {"name": "a", "severity": "urgent"}}),
            true,
        ),
        (
            json!({"type": "create", "alarm": {"name": "a", "tags": vec!["t"; 33]}}),
            true,
        ),
        (
            json!({"type": "create", "alarm": {"name": "a", "tags": [""]}}),
            true,
        ),
        (
            json!({"type": "create", "alarm": {"name": "a", "tags": ["a\tb"]}}),
            true,
        ),
        (
            json!({"type": "create", "alarm": {"name": "bell\u{7}"}}),
            true,
        ),
        (
            json!({"type": "trigger", "alarm_id": id, "message": "x".repeat(4097)}),
            true,
        ),
        (
            json!({"type": "trigger", "alarm_id": id, "value": true}),
            true,
        ),
        (
            json!({"type": "ack", "alarm_id": id, "comment": "esc\u{1b}[31m"}),
            true,
        ),
        (
            json!({"type": "rearm", "alarm_id": id, "expected_version": -1}),
            true,
        ),
        (json!({"type": "update", "alarm_id": id}), true),
        (
            json!({"type": "update", "alarm_id": id, "changes": {}}),
            true,
        ),
        (
            json!({"type": "update", "alarm_id": id, "changes": {"severity": "none"}}),
            true,
        ),
        (json!({"type": "refresh"}), true),
        // Stricter than the server: unknown fields, nulls for omitted fields, misspellings.
        (
            json!({"type": "ack", "alarm_id": id, "comments": "typo"}),
            false,
        ),
        (json!({"type": "ping", "extra": 1}), false),
        (
            json!({"type": "trigger", "alarm_id": id, "value": null}),
            false,
        ),
        (json!({"type": "subscribe", "from_hash": "ABC"}), false),
        (
            json!({"type": "update", "alarm_id": id, "changes": {"owner": "me"}}),
            true,
        ),
        (
            json!({"type": "update", "alarm_id": id, "changes": {"name": "a", "owner": "me"}}),
            false,
        ),
        (json!({"type": "refresh", "token": ""}), false),
    ];
    for (msg, server_rejects) in cases {
        assert_invalid(&schema, &msg, "client message");
        if server_rejects {
            let rejected = match protocol::parse_client_message(&msg.to_string()) {
                Err(_) => true,
                Ok((_, parsed)) => matches!(protocol::command_of(parsed, "alice"), Some(Err(_))),
            };
            assert!(
                rejected,
                "the server accepts {msg}, which the schema rejects"
            );
        }
    }
}

// ---------------------------------------------------------------- OpenAPI

/// Every `$ref` below `v`, with its JSON pointer path.
fn refs(v: &Value, path: String, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push((path.clone(), x.as_str().unwrap().to_string()));
                } else {
                    refs(x, format!("{path}/{k}"), out);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                refs(x, format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn pointer<'a>(doc: &'a Value, fragment: &str) -> Option<&'a Value> {
    if fragment.is_empty() {
        Some(doc)
    } else {
        doc.pointer(fragment)
    }
}

/// The schemas of the OpenAPI document, each rebased so that it compiles on its own: local
/// `#/…` references point into `openapi.json`, relative file references stay relative.
fn openapi_schema_validator(schema: &Value) -> Validator {
    fn rebase(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    match x {
                        Value::String(s) if k == "$ref" && s.starts_with("#/") => {
                            *s = format!("openapi.json{s}");
                        }
                        _ => rebase(x),
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(rebase),
            _ => {}
        }
    }
    let mut s = schema.clone();
    rebase(&mut s);
    let inline = format!("{BASE}openapi-inline.json");
    let mut resources: Vec<(String, Resource)> = schema_files()
        .into_iter()
        .map(|(name, v)| (format!("{BASE}{name}"), Resource::from_contents(v).unwrap()))
        .collect();
    resources.push((
        format!("{BASE}openapi.json"),
        Draft::Draft202012.create_resource(openapi()),
    ));
    resources.push((
        inline.clone(),
        Draft::Draft202012.create_resource(json!({ "$defs": { "s": s } })),
    ));
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .with_resources(resources.into_iter())
        .build(&json!({ "$ref": format!("{inline}#/$defs/s") }))
        .unwrap_or_else(|e| panic!("OpenAPI schema does not compile: {e}\n{schema}"))
}

#[test]
fn openapi_document_covers_every_route_and_its_references_resolve() {
    let doc = openapi();
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "OpenAPI {version}");
    assert_eq!(
        doc["jsonSchemaDialect"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(doc["security"], json!([{"bearer": []}]));

    let routes = [
        ("post", "/api/v1/login"),
        ("post", "/api/v1/token/refresh"),
        ("get", "/api/v1/ledger"),
        ("get", "/api/v1/alarms"),
        ("post", "/api/v1/alarms"),
        ("get", "/api/v1/alarms/{id}"),
        ("patch", "/api/v1/alarms/{id}"),
        ("delete", "/api/v1/alarms/{id}"),
        ("get", "/api/v1/alarms/{id}/history"),
        ("post", "/api/v1/alarms/{id}/trigger"),
        ("post", "/api/v1/alarms/{id}/ack"),
        ("post", "/api/v1/alarms/{id}/rearm"),
        ("get", "/api/v1/events"),
        ("get", "/api/v1/users"),
        ("post", "/api/v1/users"),
        ("patch", "/api/v1/users/{name}"),
        ("get", "/api/v1/security-log"),
        ("post", "/api/v1/admin/backup"),
        ("get", "/api/v1/ws"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    ];
    let public = ["/api/v1/login", "/healthz", "/readyz", "/metrics"];
    let mut op_ids = std::collections::BTreeSet::new();
    for (method, path) in routes {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        assert!(op_ids.insert(op["operationId"].as_str().unwrap()), "{path}");
        let responses = op["responses"].as_object().unwrap();
        assert!(!responses.is_empty(), "{method} {path}");
        if public.contains(&path) {
            assert_eq!(op["security"], json!([]), "{method} {path} needs no token");
        } else if path != "/api/v1/ws" {
            assert!(
                op.get("security").is_none(),
                "{method} {path} uses bearer auth"
            );
            assert!(responses.contains_key("401"), "{method} {path} answers 401");
        }
        // Every documented error status carries the error object with codes of that status.
        for (status, resp) in responses {
            let resp = match resp.get("$ref") {
                Some(r) => pointer(&doc, r.as_str().unwrap().trim_start_matches('#')).unwrap(),
                None => resp,
            };
            let Some(schema) = resp.pointer("/content/application~1json/schema") else {
                continue;
            };
            let code_schema = schema.pointer("/properties/error/properties/code");
            let codes: Vec<&Value> = match code_schema {
                Some(c) if c.get("const").is_some() => vec![&c["const"]],
                Some(c) => c["enum"].as_array().unwrap().iter().collect(),
                None => {
                    // Only health checks answer 503 with their own body (which check failed).
                    let own_body = (path == "/readyz" || path == "/healthz") && status == "503";
                    assert!(
                        own_body || !status.starts_with(['4', '5']),
                        "{method} {path} {status} must carry the error object"
                    );
                    continue;
                }
            };
            for code in codes {
                let code = code.as_str().unwrap();
                assert_eq!(
                    http_status_of(code).to_string(),
                    *status,
                    "{method} {path}: `{code}` documented under {status}"
                );
            }
        }
    }
    let params = |method: &str, path: &str| -> Vec<String> {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    let events = params("get", "/api/v1/events");
    for p in ["from", "limit", "alarm_id", "actor", "since", "until"] {
        assert!(events.contains(&p.to_string()), "/api/v1/events ?{p}");
    }
    let alarms = params("get", "/api/v1/alarms");
    for p in ["as_of", "state"] {
        assert!(alarms.contains(&p.to_string()), "/api/v1/alarms ?{p}");
    }
    assert_eq!(
        doc["paths"]["/api/v1/events"]["get"]["responses"]["200"]["content"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        vec!["application/x-ndjson"]
    );

    // Every reference resolves: local pointers, and files of schemas/ with their pointers.
    let mut all = Vec::new();
    refs(&doc, String::new(), &mut all);
    assert!(all.len() > 50);
    for (at, r) in &all {
        let (file, fragment) = r.split_once('#').unwrap_or((r.as_str(), ""));
        let target = if file.is_empty() {
            doc.clone()
        } else {
            read_json(&root().join("schemas").join(file))
        };
        assert!(
            pointer(&target, fragment).is_some(),
            "{at}: $ref {r} does not resolve"
        );
    }

    // Every schema in the document compiles (all references resolve through the registry).
    let mut schemas = Vec::new();
    collect_schemas(&doc, &mut schemas);
    assert!(schemas.len() > 40, "{}", schemas.len());
    for s in &schemas {
        openapi_schema_validator(s);
    }
}

/// Values under a `schema` key (parameters, media types, headers) and every component schema.
fn collect_schemas(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "schema" || k == "x-item-schema" {
                    out.push(x.clone());
                } else if k == "schemas" && x.is_object() {
                    out.extend(x.as_object().unwrap().values().cloned());
                } else {
                    collect_schemas(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_schemas(x, out)),
        _ => {}
    }
}

#[test]
fn openapi_components_accept_what_the_code_emits() {
    let doc = openapi();
    let component =
        |name: &str| openapi_schema_validator(&doc["components"]["schemas"][name].clone());
    let (ledger_id, events) = golden_events();
    let alarm_id = events[0].1.alarm_id;
    let alarms: Vec<Value> = golden_alarms().iter().map(Alarm::to_json).collect();

    for (req, already, duplicate) in [
        (None, false, false),
        (None, true, false),
        (None, false, true),
    ] {
        let ok = protocol::ok_value(&req, 5, alarm_id, already, duplicate);
        assert_valid(&component("Ok"), &ok, "HTTP command answer");
    }
    let error = component("Error");
    for code in error_codes() {
        assert_valid(
            &error,
            &json!({"error": {"code": code, "message": "m"}}),
            &code,
        );
    }
    assert_invalid(
        &error,
        &json!({"error": {"code": "conflict", "message": "m"}}),
        "a code PROTOCOL.md does not list",
    );
    assert_invalid(
        &error,
        &json!({"code": "not_found", "message": "m"}),
        "flat error",
    );
    let user_exists = openapi_schema_validator(
        &doc["components"]["responses"]["UserExists"]["content"]["application/json"]["schema"],
    );
    assert_valid(
        &user_exists,
        &json!({"error": {"code": "conflict", "message": "user \"bob\" already exists"}}),
        "409 on POST /api/v1/users",
    );

    let head = &events.last().unwrap().1;
    assert_valid(
        &component("Ledger"),
        &json!({"ledger_id": ledger_id.to_string(), "head": head.offset,
                "head_hash": head.hash.to_hex(), "created_at": Timestamp(0).to_rfc3339(),
                "format_version": 1}),
        "ledger",
    );
    assert_valid(
        &component("AlarmList"),
        &json!({"offset": 9, "alarms": alarms}),
        "alarm list",
    );
    for a in &alarms {
        assert_valid(&component("Alarm"), a, "alarm");
    }
    let history: Vec<Value> = events
        .iter()
        .filter(|(_, e)| e.alarm_id == alarm_id)
        .map(|(_, e)| Value::Object(e.to_json(Some(ledger_id))))
        .collect();
    assert_valid(
        &component("History"),
        &json!({"alarm_id": alarm_id.to_string(), "events": history}),
        "history",
    );
    for (name, e) in &events {
        assert_valid(
            &component("Event"),
            &parse(&protocol::export_line(e, ledger_id)),
            name,
        );
    }
    let at = Timestamp(1_795_253_400_125).to_rfc3339();
    assert_valid(
        &component("TokenAnswer"),
        &json!({"token": "a.b.c", "expires_at": at, "user": {"name": "alice", "role": "viewer"}}),
        "token",
    );
    assert_valid(
        &component("User"),
        &json!({"username": "alice", "role": "operator", "disabled": false, "created_at": at}),
        "user",
    );
    assert_invalid(
        &component("User"),
        &json!({"username": "alice", "role": "operator", "disabled": false, "created_at": at,
                "password_hash": "pbkdf2$..."}),
        "a user with password material",
    );
    assert_invalid(&component("UserPatch"), &json!({}), "empty user patch");
    assert_valid(
        &component("Backup"),
        &json!({"path": "/data/backups/20261121T093000.125Z", "head": 9, "head_hash": head.hash.to_hex()}),
        "backup",
    );
    assert_valid(
        &component("Health"),
        &json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "format_version": 1}),
        "healthz",
    );

    // Request bodies: the HTTP command bodies are the WebSocket messages' fields.
    let body = |path: &str, method: &str| {
        openapi_schema_validator(
            &doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"],
        )
    };
    let id_path = "/api/v1/alarms/{id}";
    assert_valid(
        &body("/api/v1/alarms", "post"),
        &json!({"name": "Brent", "severity": "high", "tags": ["energy"]}),
        "create body",
    );
    assert_invalid(
        &body("/api/v1/alarms", "post"),
        &json!({"severity": "high"}),
        "create without name",
    );
    let trigger = body("/api/v1/alarms/{id}/trigger", "post");
    assert_valid(&trigger, &json!({}), "empty trigger body");
    assert_valid(
        &trigger,
        &json!({"value": "95.4", "message": "m", "expected_version": 2}),
        "trigger body",
    );
    assert_invalid(
        &trigger,
        &json!({"alarm_id": alarm_id.to_string()}),
        "trigger body with alarm_id",
    );
    assert_invalid(
        &trigger,
        &json!({"type": "trigger"}),
        "trigger body with type",
    );
    let ack = body("/api/v1/alarms/{id}/ack", "post");
    assert_valid(&ack, &json!({"comment": "seen"}), "ack body");
    assert_invalid(&ack, &json!({"value": "1"}), "ack body with a value");
    assert_valid(
        &body("/api/v1/alarms/{id}/rearm", "post"),
        &json!({}),
        "rearm body",
    );
    let patch = body(id_path, "patch");
    assert_valid(
        &patch,
        &json!({"severity": "low", "expected_version": 3}),
        "patch body",
    );
    assert_invalid(
        &patch,
        &json!({"expected_version": 3}),
        "patch without a change",
    );
    assert_valid(&body(id_path, "delete"), &json!({}), "delete body");
    assert_valid(
        &body("/api/v1/login", "post"),
        &json!({"username": "alice", "password": "pw"}),
        "login body",
    );
}

/// The alarm wire form, both ways it is written (a `Value` per alarm, and straight to bytes for
/// state answers), is byte for byte the golden one (`snapshots/v1/alarms.json`, the alarms of the
/// golden projection snapshot as the code wrote them before the direct writer existed).
#[test]
fn alarm_wire_form_is_the_golden_one() {
    let alarms = golden_alarms();
    let golden = std::fs::read_to_string(root().join("snapshots/v1/alarms.json")).unwrap();
    let values: Vec<Value> = alarms.iter().map(Alarm::to_json).collect();
    assert_eq!(serde_json::to_string(&values).unwrap() + "\n", golden);
    let mut direct = Vec::new();
    alarm_ledger::domain::write_alarms_json(&mut direct, &alarms).unwrap();
    assert_eq!(String::from_utf8(direct).unwrap() + "\n", golden);
}

/// The golden wire messages of `snapshots/v1/wire/` conform to the schemas: the files that pin
/// today's messages and the schemas that document them cannot drift apart.
#[test]
fn golden_wire_messages_conform() {
    for (dir, schema) in [
        ("server", "server-messages.schema.json"),
        ("client", "client-messages.schema.json"),
    ] {
        let v = validator(schema);
        let mut n = 0;
        for entry in std::fs::read_dir(root().join("snapshots/v1/wire").join(dir)).unwrap() {
            let path = entry.unwrap().path();
            assert_valid(&v, &read_json(&path), &path.display().to_string());
            n += 1;
        }
        assert!(n >= 10, "{n} golden {dir} messages");
    }
}

/// `docs/PROTOCOL.md` and `docs/PRODUCT.md` are the repository's copies of the product's wire
/// contract and spec (a clone has no `../shared`): where the originals sit beside the project (as
/// on CI), the copies must be identical, so the README's links never describe another version.
#[test]
fn the_docs_copies_of_the_contract_match_the_originals() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut compared = 0;
    for name in ["PROTOCOL.md", "PRODUCT.md"] {
        let copy = std::fs::read(root.join("docs").join(name))
            .unwrap_or_else(|e| panic!("docs/{name} is missing: {e}"));
        let Ok(original) = std::fs::read(root.join("../shared").join(name)) else {
            continue;
        };
        assert!(
            copy == original,
            "docs/{name} differs from ../shared/{name}: copy the original again"
        );
        compared += 1;
    }
    if compared == 0 {
        eprintln!("../shared is not beside the project: the docs copies were not compared");
    }
}
