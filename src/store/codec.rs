//! The disk encoding of a log record: one format-version byte, then the bincode (2.0, standard
//! config) encoding of [`Event`]. A future codec gets a new version byte; old records keep theirs
//! and stay readable forever. Golden files in `snapshots/` pin the bytes.

use crate::domain::Event;
use bincode::config::standard;

/// Largest record body decoded (records are a few hundred bytes; client text is capped).
const RECORD_LIMIT: usize = 1 << 20;
/// Largest other value decoded (projection snapshots are checksummed before decoding).
const VALUE_LIMIT: usize = 1 << 30;

/// The format of records written today.
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("unknown record format version {0} (this build reads version 1)")]
    UnknownVersion(u8),
    #[error("record does not decode: {0}")]
    Decode(String),
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
}

pub fn encode_event(event: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.push(FORMAT_VERSION);
    // Encoding plain data structs into a Vec has no failure mode in bincode's serde path other
    // than unsupported serde features (which `Event` does not use); fall back to an empty body,
    // which decoding reports as corrupt, rather than panic.
    match bincode::serde::encode_to_vec(event, standard()) {
        Ok(body) => out.extend_from_slice(&body),
        Err(e) => tracing::error!(error = %e, "event encoding failed"),
    }
    out
}

pub fn decode_event(bytes: &[u8]) -> Result<Event, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        1 => {
            // The limit makes bincode refuse a corrupt length prefix instead of trying to
            // allocate it (a flipped byte must be an error naming the offset, not an abort).
            // It does not change the encoding.
            let (event, used): (Event, usize) =
                bincode::serde::decode_from_slice(body, standard().with_limit::<RECORD_LIMIT>())
                    .map_err(|e| CodecError::Decode(e.to_string()))?;
            if used != body.len() {
                return Err(CodecError::Trailing(body.len() - used));
            }
            Ok(event)
        }
        v => Err(CodecError::UnknownVersion(v)),
    }
}

/// Encodes any serde value with bincode standard config (indexes, snapshots).
pub fn encode_value<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(v, standard()).map_err(|e| CodecError::Decode(e.to_string()))
}

pub fn decode_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (v, used) =
        bincode::serde::decode_from_slice(bytes, standard().with_limit::<VALUE_LIMIT>())
            .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(v)
}
