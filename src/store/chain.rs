//! The hash chain.
//!
//! `hash(e) = SHA-256( prev_hash (32 raw bytes) || canonical_json(e) )`, where
//! `canonical_json(e)` is the event object *with* `ledger_id` and *without* `hash` (and without a
//! wire `type`), keys sorted by code point at every level, no whitespace, UTF-8, strings escaped
//! as serde_json / Python's `json.dumps(ensure_ascii=False)` do. The genesis predecessor is
//! `SHA-256(ledger_id as lowercase hyphenated text)`. `scripts/verify_chain.py` recomputes it.

use crate::domain::{AlarmChanges, Event, EventData, Hash};
use ring::digest::{Context, SHA256};
use serde_json::Value;
use uuid::Uuid;

/// The predecessor of the first event.
pub fn genesis(ledger_id: Uuid) -> Hash {
    sha256(&[ledger_id.hyphenated().to_string().as_bytes()])
}

/// The chain hash of `event` following `prev`.
pub fn event_hash(prev: &Hash, event: &Event, ledger_id: Uuid) -> Hash {
    let mut bytes = Vec::with_capacity(320);
    write_event(&mut bytes, event, Some(ledger_id), false, false);
    sha256(&[&prev.0, &bytes])
}

/// Writes the event's JSON with keys in sorted order and no whitespace — exactly
/// `canonical_json(event.json_body(..) [+ hash] [+ "type":"event"])` — without building a
/// `serde_json::Value` (the hot path of hashing, verifying, exporting and streaming; a test
/// checks both agree). `with_hash` adds `hash`; `as_message` adds `"type":"event"` (sorted last).
pub fn write_event(
    out: &mut Vec<u8>,
    e: &Event,
    ledger_id: Option<Uuid>,
    with_hash: bool,
    as_message: bool,
) {
    out.extend_from_slice(b"{\"actor\":");
    write_str(out, &e.actor);
    out.extend_from_slice(b",\"alarm_id\":");
    write_uuid(out, &e.alarm_id);
    out.extend_from_slice(b",\"at\":\"");
    e.at.write_rfc3339(out);
    out.push(b'"');
    if let Some(c) = &e.command_id {
        out.extend_from_slice(b",\"command_id\":");
        write_uuid(out, c);
    }
    out.extend_from_slice(b",\"data\":");
    write_data(out, &e.data);
    if with_hash {
        out.extend_from_slice(b",\"hash\":\"");
        out.extend_from_slice(e.hash.to_hex().as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"id\":");
    write_uuid(out, &e.id);
    out.extend_from_slice(b",\"kind\":\"");
    out.extend_from_slice(e.kind().as_str().as_bytes());
    out.push(b'"');
    if let Some(l) = &ledger_id {
        out.extend_from_slice(b",\"ledger_id\":");
        write_uuid(out, l);
    }
    out.extend_from_slice(b",\"offset\":");
    out.extend_from_slice(e.offset.to_string().as_bytes());
    if as_message {
        out.extend_from_slice(b",\"type\":\"event\"");
    }
    out.push(b'}');
}

/// The `data` object, keys sorted.
fn write_data(out: &mut Vec<u8>, data: &EventData) {
    let mut first = true;
    let mut field = |out: &mut Vec<u8>, key: &str| {
        out.extend_from_slice(if first { b"\"" } else { b",\"" });
        first = false;
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
    };
    out.push(b'{');
    match data {
        EventData::Created(spec) => {
            field(out, "condition");
            write_str(out, &spec.condition);
            field(out, "instrument");
            write_str(out, &spec.instrument);
            field(out, "name");
            write_str(out, &spec.name);
            field(out, "owner");
            write_str(out, &spec.owner);
            field(out, "severity");
            write_str(out, spec.severity.as_str());
            field(out, "tags");
            write_tags(out, &spec.tags);
        }
        EventData::Updated(AlarmChanges {
            name,
            instrument,
            condition,
            severity,
            tags,
        }) => {
            if let Some(v) = condition {
                field(out, "condition");
                write_str(out, v);
            }
            if let Some(v) = instrument {
                field(out, "instrument");
                write_str(out, v);
            }
            if let Some(v) = name {
                field(out, "name");
                write_str(out, v);
            }
            if let Some(v) = severity {
                field(out, "severity");
                write_str(out, v.as_str());
            }
            if let Some(v) = tags {
                field(out, "tags");
                write_tags(out, v);
            }
        }
        EventData::Triggered { value, message } => {
            if let Some(v) = message {
                field(out, "message");
                write_str(out, v);
            }
            if let Some(v) = value {
                field(out, "value");
                write_str(out, v);
            }
        }
        EventData::Acknowledged { comment } => {
            if let Some(v) = comment {
                field(out, "comment");
                write_str(out, v);
            }
        }
        EventData::Rearmed | EventData::Deleted => {}
    }
    out.push(b'}');
}

fn write_tags(out: &mut Vec<u8>, tags: &[String]) {
    out.push(b'[');
    for (i, t) in tags.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, t);
    }
    out.push(b']');
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaping: the same bytes as the canonical form.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn write_uuid(out: &mut Vec<u8>, id: &Uuid) {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.push(b'"');
    out.extend_from_slice(id.hyphenated().encode_lower(&mut buf).as_bytes());
    out.push(b'"');
}

/// Canonical JSON: sorted keys (explicitly, whatever map type serde_json was built with), no
/// whitespace. Only integers and strings occur in events: no floats, by design.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String((*k).clone()), out);
                out.push(b':');
                write_canonical(&m[k.as_str()], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(v: &Value, out: &mut Vec<u8>) {
    // Writing a scalar into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Hash(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AlarmSpec, Severity};
    use crate::time::Timestamp;
    use serde_json::json;

    fn events() -> Vec<Event> {
        let base = Event {
            offset: 42,
            id: Uuid::from_u128(7),
            at: Timestamp(1_763_719_200_123),
            actor: "al\"ice\u{1}é".into(),
            alarm_id: Uuid::from_u128(9),
            command_id: None,
            data: EventData::Rearmed,
            hash: Hash([3; 32]),
        };
        let datas = vec![
            EventData::Created(AlarmSpec {
                name: "n\n".into(),
                instrument: "i".into(),
                condition: "PX > 1 \\ \u{2028}".into(),
                severity: Severity::Critical,
                tags: vec!["a".into(), "ブ".into()],
                owner: "o".into(),
            }),
            EventData::Updated(AlarmChanges::default()),
            EventData::Updated(AlarmChanges {
                name: Some("x".into()),
                instrument: Some("y".into()),
                condition: Some("z".into()),
                severity: Some(Severity::Low),
                tags: Some(vec![]),
            }),
            EventData::Triggered {
                value: Some("1".into()),
                message: Some("m".into()),
            },
            EventData::Triggered {
                value: None,
                message: Some("m".into()),
            },
            EventData::Acknowledged { comment: None },
            EventData::Acknowledged {
                comment: Some("c".into()),
            },
            EventData::Rearmed,
            EventData::Deleted,
        ];
        let mut out = Vec::new();
        for (i, data) in datas.into_iter().enumerate() {
            let mut e = base.clone();
            e.data = data;
            e.command_id = (i % 2 == 0).then(|| Uuid::from_u128(i as u128));
            out.push(e);
        }
        out
    }

    #[test]
    fn direct_writer_equals_canonical_json_of_the_value_form() {
        let ledger = Uuid::from_u128(0xfeed);
        for e in events() {
            for (lid, hash, msg) in [
                (Some(ledger), false, false),
                (Some(ledger), true, false),
                (None, true, true),
                (None, false, false),
            ] {
                let mut m = if hash {
                    e.to_json(lid)
                } else {
                    e.json_body(lid)
                };
                if msg {
                    m.insert("type".into(), json!("event"));
                }
                let want = canonical_json(&Value::Object(m));
                let mut got = Vec::new();
                write_event(&mut got, &e, lid, hash, msg);
                assert_eq!(
                    String::from_utf8(got).unwrap(),
                    String::from_utf8(want).unwrap()
                );
            }
        }
    }

    #[test]
    fn canonical_sorts_nested_keys_without_whitespace() {
        let v = json!({"b": 1, "a": {"z": "x\n\"y\"", "c": [2, {"k": "é"}]}});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"c":[2,{"k":"é"}],"z":"x\n\"y\""},"b":1}"#
        );
    }

    #[test]
    fn genesis_is_sha256_of_the_ledger_id_text() {
        let id = Uuid::parse_str("6f1c1a4e-3b8a-4a53-9c1e-2f3a4b5c6d7e").unwrap();
        // printf '6f1c1a4e-3b8a-4a53-9c1e-2f3a4b5c6d7e' | sha256sum (coreutils)
        assert_eq!(
            genesis(id).to_hex(),
            "2dabe6173445f2ff504e4559a832a4ea85d2cc4271f329bcec655bd9831d6709"
        );
    }
}
