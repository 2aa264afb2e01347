//! One subscriber's gapless stream: replay from the log, hand over to live, fall back to the log.
//!
//! The receiver of the live broadcast is registered **before** the replay reads the head, so
//! every event after that head is in the receiver (or the receiver reports a lag). Replay reads
//! the log up to the published head (never beyond: events not yet durable are not visible), then
//! the subscription goes live: it takes batches from the receiver, skips offsets it has already
//! delivered, and on any lag or gap goes back to the log. The broadcast is an optimisation; the
//! log is the truth, so a slow subscriber is never silently skipped.

use super::hub::{Batch, Published};
use super::Ledger;
use crate::error::Result;
use std::sync::Arc;
use tokio::sync::broadcast::{self, error::RecvError};

type ReplayRead = tokio::task::JoinHandle<Result<Vec<crate::domain::Event>>>;

/// Events read from the log per step of a replay.
const REPLAY_CHUNK: usize = 1_024;

pub enum SubItem {
    /// Events in offset order, contiguous with everything delivered before.
    Events(Vec<Arc<Published>>),
    /// Replay has caught up with the head; what follows is live. Sent once per subscription.
    Live { offset: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Replay,
    Live,
}

pub struct Subscription {
    ledger: Arc<Ledger>,
    /// A replay read in progress, or the next chunk read ahead while the previous one is sent:
    /// (first offset, blocking read of the chunk). At most one.
    pending: Option<(u64, ReplayRead)>,
    rx: broadcast::Receiver<Batch>,
    /// Offset of the last event delivered.
    last: u64,
    mode: Mode,
    live_sent: bool,
    /// A live batch that arrived with events beyond `last + 1` while we were live: we go back to
    /// the log, which holds everything up to that batch.
    replay_gauge: prometheus_client::metrics::gauge::Gauge,
    live_gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Subscription {
    pub(super) fn new(ledger: Arc<Ledger>, from: u64) -> Self {
        let rx = ledger.hub().subscribe();
        Self::with_receiver(ledger, from, rx)
    }

    pub(super) fn with_receiver(
        ledger: Arc<Ledger>,
        from: u64,
        rx: broadcast::Receiver<Batch>,
    ) -> Self {
        let replay_gauge = ledger.metrics.subscriber_mode("replay");
        let live_gauge = ledger.metrics.subscriber_mode("live");
        replay_gauge.inc();
        Subscription {
            ledger,
            pending: None,
            rx,
            last: from,
            mode: Mode::Replay,
            live_sent: false,
            replay_gauge,
            live_gauge,
        }
    }

    /// Starts reading the chunk from `from` (up to `head`) on a blocking thread.
    fn read(&self, from: u64, head: u64) -> (u64, ReplayRead) {
        let ledger = self.ledger.clone();
        let max = REPLAY_CHUNK
            .min((head + 1).saturating_sub(from) as usize)
            .max(1);
        (
            from,
            tokio::task::spawn_blocking(move || ledger.log().read_from(from, max)),
        )
    }

    /// Offset of the last event delivered (the resume point).
    pub fn last(&self) -> u64 {
        self.last
    }

    pub fn is_live(&self) -> bool {
        self.mode == Mode::Live
    }

    fn set_mode(&mut self, mode: Mode) {
        if self.mode == mode {
            return;
        }
        match mode {
            Mode::Replay => {
                self.live_gauge.dec();
                self.replay_gauge.inc();
            }
            Mode::Live => {
                self.replay_gauge.dec();
                self.live_gauge.inc();
            }
        }
        self.mode = mode;
    }

    /// The next items. Cancel-safe: dropping the future loses nothing (state only advances when
    /// an item is returned, and a replay read in progress is kept for the next call), so a
    /// connection polls it directly in its `select!`. Returns `Ok(None)` when the ledger is
    /// shutting down (hub closed).
    pub async fn next(&mut self) -> Result<Option<SubItem>> {
        loop {
            match self.mode {
                Mode::Replay => {
                    let head = self.ledger.head().offset;
                    if self.last >= head {
                        self.set_mode(Mode::Live);
                        if !self.live_sent {
                            self.live_sent = true;
                            return Ok(Some(SubItem::Live { offset: self.last }));
                        }
                        continue;
                    }
                    let from = self.last + 1;
                    if !matches!(&self.pending, Some((f, _)) if *f == from) {
                        self.pending = Some(self.read(from, head));
                    }
                    let Some((_, read)) = self.pending.as_mut() else {
                        continue;
                    };
                    // Awaited in place: if this future is dropped (the connection's select
                    // took another branch), the read carries on and the next call picks it up.
                    let joined = read.await;
                    self.pending = None;
                    let events =
                        joined.map_err(|e| crate::error::Error::Other(e.to_string()))??;
                    let mut out = Vec::with_capacity(events.len());
                    for e in events {
                        if e.offset != self.last + 1 || e.offset > head {
                            break;
                        }
                        self.last = e.offset;
                        out.push(Published::new(e));
                    }
                    if out.is_empty() {
                        return Err(crate::error::Error::Corrupt {
                            offset: self.last + 1,
                            reason: "missing record below the head".into(),
                        });
                    }
                    // Start reading the next chunk while the caller sends this one.
                    if self.last < head {
                        self.pending = Some(self.read(self.last + 1, head));
                    }
                    return Ok(Some(SubItem::Events(out)));
                }
                Mode::Live => match self.rx.recv().await {
                    Ok(batch) => {
                        let first = batch.first().map(|p| p.event.offset).unwrap_or(0);
                        if first > self.last + 1 {
                            // Something between is only in the log (we lagged unnoticed).
                            self.ledger.metrics.subscriber_lag_fallbacks.inc();
                            self.set_mode(Mode::Replay);
                            continue;
                        }
                        let out: Vec<Arc<Published>> = batch
                            .iter()
                            .filter(|p| p.event.offset > self.last)
                            .cloned()
                            .collect();
                        if let Some(l) = out.last() {
                            self.last = l.event.offset;
                            return Ok(Some(SubItem::Events(out)));
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        self.ledger.metrics.subscriber_lag_fallbacks.inc();
                        self.set_mode(Mode::Replay)
                    }
                    Err(RecvError::Closed) => return Ok(None),
                },
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // A read nobody will take: cancelled if it has not started yet (a running blocking
        // read cannot be stopped; it is one chunk).
        if let Some((_, read)) = &self.pending {
            read.abort();
        }
        match self.mode {
            Mode::Replay => self.replay_gauge.dec(),
            Mode::Live => self.live_gauge.dec(),
        };
    }
}
