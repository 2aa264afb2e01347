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

/// Most events in one ring slot. The ring keeps its last `capacity` slots until they are
/// overwritten, read or not, so slots are bounded in events, not only in number: with the
/// default 1,024 slots at most 65,536 events stay referenced (a large group commit is published
/// as several slots).
pub const MAX_EVENTS_PER_SLOT: usize = 64;

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

    /// Publishes durable events, in order, in slots of at most `MAX_EVENTS_PER_SLOT`.
    pub fn publish(&self, events: Vec<Arc<Published>>) {
        let send = |slot: Vec<Arc<Published>>| {
            // No receivers is fine: nobody is live.
            let _ = self.tx.send(Arc::new(slot));
        };
        if events.len() <= MAX_EVENTS_PER_SLOT {
            send(events);
        } else {
            for chunk in events.chunks(MAX_EVENTS_PER_SLOT) {
                send(chunk.to_vec());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventData, Hash};
    use crate::time::Timestamp;
    use uuid::Uuid;

    fn event(offset: u64) -> Arc<Published> {
        Published::new(Event {
            offset,
            id: Uuid::now_v7(),
            at: Timestamp(0),
            actor: "a".into(),
            alarm_id: Uuid::nil(),
            command_id: None,
            data: EventData::Rearmed,
            hash: Hash::default(),
        })
    }

    #[test]
    fn a_large_batch_is_published_in_bounded_slots_in_order() {
        let hub = Hub::new(16);
        let mut rx = hub.subscribe();
        hub.publish((1..=150).map(event).collect());
        hub.publish(vec![event(151)]);
        let mut sizes = Vec::new();
        let mut offsets = Vec::new();
        while let Ok(slot) = rx.try_recv() {
            sizes.push(slot.len());
            offsets.extend(slot.iter().map(|p| p.event.offset));
        }
        assert_eq!(sizes, [64, 64, 22, 1]);
        assert_eq!(offsets, (1..=151).collect::<Vec<_>>());
    }
}
