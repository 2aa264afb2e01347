//! The single writer: the only code that assigns offsets.
//!
//! One OS thread (sled calls block) drains the bounded queue in batches and, per batch:
//! 1. decides every command in queue order against the projection plus the batch's own pending
//!    changes (so two triggers of one alarm in one batch: the first wins, the second is `already`);
//! 2. appends the batch's events and index entries atomically and makes them durable with one
//!    flush + one fdatasync (`EventLog::append_batch`);
//! 3. applies them to the projection and advances the head;
//! 4. publishes them to the hub;
//! 5. answers every command of the batch.
//!
//! Nothing is visible or answered before step 2 returns. If step 2 fails, every command of the
//! batch gets a storage error and the ledger is marked failed **for the life of the process**:
//! every later command gets the same error, reads go on, `/healthz` answers 503 so that the
//! orchestrator restarts the server. No retry: after a failed `fdatasync` Linux may have marked
//! the unwritten pages clean, so a second `fdatasync` that succeeds proves nothing ("fsyncgate"),
//! and sled keeps an I/O error for the life of the process anyway. At the restart, start-up
//! verifies and adopts whatever the disk holds; a client retrying with the same command_id then
//! learns whether its command was applied (`duplicate`) or not.

use super::hub::Published;
use super::Ledger;
use crate::domain::{decide, Alarm, Command, Decision, Event, EventKind, Hash, Rejection};
use crate::error::Result;
use crate::metrics::KindLabel;
use crate::store::{CommandOutcome, OutcomeKind};
use crate::time::Timestamp;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// A successful command's answer (the protocol's `ok`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub offset: u64,
    pub alarm_id: Uuid,
    /// Already in effect: nothing appended; `offset` is the event that put it in effect.
    pub already: bool,
    /// A repeat of a known command_id: nothing appended; `offset` is the original event.
    pub duplicate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("the write queue is full; retry with the same command_id")]
    Overloaded,
    /// The batch may have reached the disk before the failure (`recover` adopts what did), so
    /// the message does not claim either way: a retry with the same command_id tells.
    #[error("storage failure; the command may or may not have been applied (retry with the same command_id to find out): {0}")]
    Storage(String),
    /// Refused before anything of it was written (the ledger failed earlier, its log failed
    /// its integrity check, its writer died), for a command without a command_id: not applied,
    /// for certain. (With a command_id, an earlier attempt may have been: see `refused`.)
    #[error("not applied: {0}")]
    NotApplied(String),
    #[error("the server is shutting down; retry with the same command_id")]
    ShuttingDown,
    /// The writer took the command and ended without answering (it failed: it answers
    /// everything it took, at shutdown too). The command may have been flushed first.
    #[error("the writer failed without answering; the command may or may not have been applied (retry with the same command_id to find out)")]
    Unanswered,
    /// A repeat of a command_id whose first attempt was refused: the same refusal.
    #[error("{message}")]
    Repeated { code: String, message: String },
}

impl CommandError {
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::Rejected(r) => r.code(),
            CommandError::Overloaded => "overloaded",
            CommandError::Storage(_) | CommandError::NotApplied(_) | CommandError::Unanswered => {
                "internal"
            }
            // Nothing was appended and the command may be sent again (to this server once it is
            // back, or another): what `overloaded` tells a client ("retry with the same
            // command_id"), where `internal` would read as a failure of the command itself.
            CommandError::ShuttingDown => "overloaded",
            CommandError::Repeated { code, .. } => crate::domain::command::static_code(code),
        }
    }
}

pub struct WriteRequest {
    pub cmd: Command,
    pub reply: oneshot::Sender<Result<Outcome, CommandError>>,
    pub enqueued: Instant,
}

// Boxing the request would cost an allocation per command on the hot path; the size only
// matters for the queue slots, which are bounded.
#[allow(clippy::large_enum_variant)]
pub enum WriterMsg {
    Command(WriteRequest),
    /// Finish everything queued, snapshot, exit.
    Stop,
}

pub struct WriterHandle {
    thread: std::thread::JoinHandle<()>,
}

impl WriterHandle {
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

pub(super) fn spawn(ledger: Arc<Ledger>, rx: mpsc::Receiver<WriterMsg>) -> Result<WriterHandle> {
    let thread = std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || {
            let _watch = DeathWatch(ledger.clone());
            Writer::new(ledger).run(rx)
        })?;
    Ok(WriterHandle { thread })
}

/// Marks the ledger failed if the writer thread unwinds (a bug, or a panic inside sled): the
/// queue's receiver goes with the thread, so without this every later command would read as
/// "shutting down" (`overloaded`, retry) forever while the health checks stayed green.
struct DeathWatch(Arc<Ledger>);

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the ledger writer panicked: appends are refused until a restart");
            self.0.mark_writer_died();
        }
    }
}

/// The answer to a command refused before anything of it was written. Without a command_id it
/// was not applied; with one, an earlier attempt may have been (its answer lost, the batch
/// adopted after a failed sync), which only a retry once the server is back can tell.
pub(crate) fn refused(has_command_id: bool, why: String) -> CommandError {
    if has_command_id {
        CommandError::Storage(why)
    } else {
        CommandError::NotApplied(why)
    }
}

/// One group commit: the events to append, the outcomes of id-carrying commands that append
/// nothing, and the answer to give each request once all of it is durable.
struct Batch {
    events: Vec<Event>,
    outcomes: Vec<(Uuid, CommandOutcome)>,
    plans: Vec<Plan>,
}

/// The answer to a repeat of a known command_id: the original outcome, marked `duplicate`.
fn repeat_of(o: CommandOutcome) -> Plan {
    match o.kind {
        OutcomeKind::Appended | OutcomeKind::Already => Plan::Ok(Outcome {
            offset: o.offset,
            alarm_id: o.alarm_id,
            already: o.kind == OutcomeKind::Already,
            duplicate: true,
        }),
        OutcomeKind::Rejected { code, message } => {
            Plan::Err(CommandError::Repeated { code, message })
        }
    }
}

/// What to answer once the batch is durable.
enum Plan {
    Ok(Outcome),
    Err(CommandError),
}

struct Writer {
    ledger: Arc<Ledger>,
    since_snapshot: u64,
    /// Set by the first failed append: the storage error every later command gets.
    failed: Option<String>,
}

impl Writer {
    fn new(ledger: Arc<Ledger>) -> Self {
        Writer {
            ledger,
            since_snapshot: 0,
            failed: None,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let max = self.ledger.opts.max_batch.max(1);
        let mut stopping = false;
        let mut batch: Vec<WriteRequest> = Vec::with_capacity(max);
        while !stopping {
            match rx.blocking_recv() {
                Some(WriterMsg::Command(r)) => batch.push(r),
                Some(WriterMsg::Stop) | None => stopping = true,
            }
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(WriterMsg::Command(r)) => batch.push(r),
                    Ok(WriterMsg::Stop) => stopping = true,
                    Err(_) => break,
                }
            }
            if stopping {
                // Finish in-flight work: everything already queued is still processed. After
                // `close`, `recv` (not `try_recv`, which reports `Empty` while a sender is
                // still inside `try_send`) returns every message a sender got in, then `None`.
                rx.close();
                while let Some(msg) = rx.blocking_recv() {
                    if let WriterMsg::Command(r) = msg {
                        batch.push(r);
                    }
                }
            }
            let mut all = std::mem::take(&mut batch);
            while !all.is_empty() {
                let rest = if all.len() > max {
                    all.split_off(max)
                } else {
                    Vec::new()
                };
                self.process(all);
                all = rest;
            }
        }
        // Not over a log that failed its integrity check: the snapshot in place is the last one
        // made from a sound log, and one more would hide, at the next start, what the scrub
        // found below it.
        if let Some(why) = self.ledger.integrity_failure() {
            tracing::warn!(reason = %why, "final projection snapshot skipped: the log failed its integrity check");
        } else if let Err(e) = self.ledger.write_snapshot() {
            tracing::error!(error = %e, "final projection snapshot failed");
        }
        tracing::info!("writer stopped");
    }

    fn process(&mut self, reqs: Vec<WriteRequest>) {
        if reqs.is_empty() {
            return;
        }
        if let Some(why) = self.ledger.integrity_failure() {
            for r in reqs {
                self.ledger.metrics.rejected("internal");
                let _ = r
                    .reply
                    .send(Err(refused(r.cmd.command_id.is_some(), why.clone())));
            }
            return;
        }
        if let Some(why) = &self.failed {
            for r in reqs {
                self.ledger.metrics.rejected("internal");
                let _ = r.reply.send(Err(refused(
                    r.cmd.command_id.is_some(),
                    format!(
                        "storage failed earlier ({why}); appends stay refused until the server restarts"
                    ),
                )));
            }
            return;
        }
        let Batch {
            events,
            outcomes,
            plans,
        } = self.decide_batch(&reqs);
        let n = events.len();
        if n > 0 || !outcomes.is_empty() {
            let t = Instant::now();
            if let Err(e) = self.ledger.log.append_with_outcomes(&events, &outcomes) {
                tracing::error!(error = %e, events = n, "durable append failed; batch not acknowledged; appends refused until restart");
                self.ledger.set_degraded(true);
                let msg = e.to_string();
                self.failed = Some(msg.clone());
                for r in reqs {
                    let err = CommandError::Storage(msg.clone());
                    self.ledger.metrics.rejected(err.code());
                    let _ = r.reply.send(Err(err));
                }
                return;
            }
            self.ledger
                .metrics
                .flush_duration
                .observe(t.elapsed().as_secs_f64());
            self.ledger.metrics.batch_size.observe(n as f64);
            if n > 0 {
                self.publish(events);
            }
        }
        for (r, plan) in reqs.into_iter().zip(plans) {
            let answer = match plan {
                Plan::Ok(o) => Ok(o),
                Plan::Err(e) => {
                    self.ledger.metrics.rejected(e.code());
                    Err(e)
                }
            };
            self.ledger
                .metrics
                .append_latency
                .observe(r.enqueued.elapsed().as_secs_f64());
            let _ = r.reply.send(answer);
        }
    }

    /// Decides each command in order. Reads the projection (the writer is its only mutator, so
    /// what it reads cannot change underneath) plus this batch's pending alarms and outcomes.
    fn decide_batch(&self, reqs: &[WriteRequest]) -> Batch {
        let model = self.ledger.read_model();
        let ledger_id = self.ledger.info.ledger_id;
        let mut head = model.head;
        let mut pending: HashMap<Uuid, Alarm> = HashMap::new();
        let mut pending_cmds: HashMap<Uuid, CommandOutcome> = HashMap::new();
        let mut batch = Batch {
            events: Vec::new(),
            outcomes: Vec::new(),
            plans: Vec::with_capacity(reqs.len()),
        };
        let now = Timestamp::now();
        for r in reqs {
            let cmd = &r.cmd;
            if let Some(cid) = cmd.command_id {
                let known = match pending_cmds.get(&cid) {
                    Some(o) => Ok(Some(o.clone())),
                    None => self.ledger.log.command_outcome(cid),
                };
                match known {
                    Ok(Some(o)) => {
                        batch.plans.push(repeat_of(o));
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        // sled hands out an I/O error its background flusher met from every
                        // later operation, reads included: a failed look-up is the first sign
                        // of a failed disk, and the health checks must say so now, not at the
                        // next append (which fails too, and refuses appends for good).
                        tracing::error!(error = %e, "command_id look-up failed: storage failed");
                        self.ledger.set_degraded(true);
                        batch.plans.push(Plan::Err(CommandError::Storage(format!(
                            "its command_id could not be looked up: {e}"
                        ))));
                        continue;
                    }
                }
            }
            let current = pending
                .get(&cmd.alarm_id)
                .or_else(|| model.projection.get(&cmd.alarm_id));
            let remembered = match decide(current, cmd) {
                Ok(Decision::Append(data)) => {
                    let mut event = Event {
                        offset: head.offset + 1,
                        id: Uuid::now_v7(),
                        // Never decreasing, even if the wall clock steps back.
                        at: now.max(head.at),
                        actor: cmd.actor.clone(),
                        alarm_id: cmd.alarm_id,
                        command_id: cmd.command_id,
                        data,
                        hash: Hash::default(),
                    };
                    event.hash = crate::store::chain::event_hash(&head.hash, &event, ledger_id);
                    head.offset = event.offset;
                    head.hash = event.hash;
                    head.at = event.at;
                    let next = match current {
                        Some(a) => {
                            let mut a = a.clone();
                            a.apply(&event);
                            Some(a)
                        }
                        None => Alarm::from_created(&event),
                    };
                    if let Some(a) = next {
                        pending.insert(a.id, a);
                    }
                    batch.plans.push(Plan::Ok(Outcome {
                        offset: event.offset,
                        alarm_id: event.alarm_id,
                        already: false,
                        duplicate: false,
                    }));
                    let outcome = CommandOutcome {
                        offset: event.offset,
                        alarm_id: event.alarm_id,
                        kind: OutcomeKind::Appended,
                    };
                    batch.events.push(event);
                    // Indexed by the store with the event itself.
                    outcome
                }
                Ok(Decision::Already { offset }) => {
                    batch.plans.push(Plan::Ok(Outcome {
                        offset,
                        alarm_id: cmd.alarm_id,
                        already: true,
                        duplicate: false,
                    }));
                    CommandOutcome {
                        offset,
                        alarm_id: cmd.alarm_id,
                        kind: OutcomeKind::Already,
                    }
                }
                Err(rej) => {
                    let outcome = CommandOutcome {
                        // The head the decision saw: a backup of an earlier head leaves it out.
                        offset: head.offset,
                        alarm_id: cmd.alarm_id,
                        kind: OutcomeKind::Rejected {
                            code: rej.code().to_string(),
                            message: rej.to_string(),
                        },
                    };
                    batch.plans.push(Plan::Err(CommandError::Rejected(rej)));
                    outcome
                }
            };
            if let Some(cid) = cmd.command_id {
                // Remember the outcome of every command with an id, not only the appending ones:
                // a retry after a reconnect must get this answer, whatever happened since.
                if remembered.kind != OutcomeKind::Appended {
                    batch.outcomes.push((cid, remembered.clone()));
                }
                pending_cmds.insert(cid, remembered);
            }
        }
        batch
    }

    /// Applies durable events to the read model, then fans them out.
    fn publish(&mut self, events: Vec<Event>) {
        let n = events.len() as u64;
        {
            let mut m = self.ledger.write_model();
            for e in &events {
                m.projection.apply(e);
            }
            if let Some(last) = events.last() {
                m.head.offset = last.offset;
                m.head.hash = last.hash;
                m.head.at = last.at;
                // Under the write guard: whoever sees this head finds the model at it or later.
                self.ledger.publish_head(m.head);
            }
        }
        // Count per kind first: one labelled-counter lookup per kind and batch, not per event.
        let mut per_kind = [0u64; EventKind::ALL.len()];
        for e in &events {
            per_kind[e.kind() as usize] += 1;
        }
        for (kind, n) in EventKind::ALL.iter().zip(per_kind) {
            if n > 0 {
                self.ledger
                    .metrics
                    .events_appended
                    .get_or_create(&KindLabel {
                        kind: kind.as_str().into(),
                    })
                    .inc_by(n);
            }
        }
        if let Some(last) = events.last() {
            self.ledger.metrics.head_offset.set(last.offset as i64);
        }
        let batch: Vec<Arc<Published>> = events.into_iter().map(Published::new).collect();
        self.ledger.hub.publish(batch);
        self.since_snapshot += n;
        let every = self.ledger.opts.snapshot_every;
        if every > 0 && self.since_snapshot >= every {
            self.since_snapshot = 0;
            // The snapshot encodes the whole projection; done on this thread it pauses writes
            // for a few ms per 10k alarms, which we accept for its simplicity (README numbers).
            if let Err(e) = self.ledger.write_snapshot() {
                tracing::warn!(error = %e, "projection snapshot failed (the log is unaffected)");
            }
        }
    }
}
