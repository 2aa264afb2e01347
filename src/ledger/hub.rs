//! Live fan-out of durable events.
//!
//! The writer publishes each durable batch once; every live subscriber holds a receiver of one
//! shared `tokio::sync::broadcast` ring, so memory is bounded by the ring, not by the number or
//! speed of subscribers. The broadcast is an optimisation, never the source of truth: a
//! subscriber that lags (the ring overwrote what it had not read) goes back to reading the log
//! (`subscription.rs`).

use crate::domain::Event;
use std::sync::{Arc, OnceLock};
use tokio::sync::broadcast;

/// A durable event with its WebSocket encoding computed at most once, by whichever subscriber
/// needs it first, and shared (reference-counted bytes): fan-out to N clients serializes once
/// and copies nothing per client.
#[derive(Debug)]
pub struct Published {
    pub event: Event,
    wire: OnceLock<bytes::Bytes>,
}

impl Published {
    pub fn new(event: Event) -> Arc<Published> {
        Arc::new(Published {
            event,
            wire: OnceLock::new(),
        })
    }

    /// The `event` message text (UTF-8 JSON, without `ledger_id`: the client has it from
    /// `hello`). Cloning the returned bytes is a reference-count increment.
    pub fn wire(&self) -> &bytes::Bytes {
        self.wire
            .get_or_init(|| bytes::Bytes::from(crate::protocol::event_message(&self.event)))
    }
}

pub type Batch = Arc<Vec<Arc<Published>>>;

pub struct Hub {
    tx: broadcast::Sender<Batch>,
}

impl Hub {
    /// `capacity` is in batches (one durable group commit each).
    pub fn new(capacity: usize) -> Hub {
        let (tx, _) = broadcast::channel(capacity.max(16));
        Hub { tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Batch> {
        self.tx.subscribe()
    }

    pub fn publish(&self, batch: Batch) {
        // No receivers is fine: nobody is live.
        let _ = self.tx.send(batch);
    }
}
