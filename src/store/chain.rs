//! The hash chain.
//!
//! `hash(e) = SHA-256( prev_hash (32 raw bytes) || canonical_json(e) )`, where
//! `canonical_json(e)` is the event object *with* `ledger_id` and *without* `hash` (and without a
//! wire `type`), keys sorted by code point at every level, no whitespace, UTF-8, strings escaped
//! as serde_json / Python's `json.dumps(ensure_ascii=False)` do. The genesis predecessor is
//! `SHA-256(ledger_id as lowercase hyphenated text)`. `scripts/verify_chain.py` recomputes it.

use crate::domain::{Event, Hash};
use ring::digest::{Context, SHA256};
use serde_json::Value;
use uuid::Uuid;

/// The predecessor of the first event.
pub fn genesis(ledger_id: Uuid) -> Hash {
    sha256(&[ledger_id.hyphenated().to_string().as_bytes()])
}

/// The chain hash of `event` following `prev`.
pub fn event_hash(prev: &Hash, event: &Event, ledger_id: Uuid) -> Hash {
    let body = Value::Object(event.json_body(Some(ledger_id)));
    let mut bytes = Vec::with_capacity(256);
    write_canonical(&body, &mut bytes);
    sha256(&[&prev.0, &bytes])
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
    use serde_json::json;

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
        // printf '6f1c1a4e-3b8a-4a53-9c1e-2f3a4b5c6d7e' | sha256sum
        let expected = sha256(&[b"6f1c1a4e-3b8a-4a53-9c1e-2f3a4b5c6d7e"]);
        assert_eq!(genesis(id), expected);
    }
}
