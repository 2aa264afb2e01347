//! Property tests of the alarm state machine and of the ledger core built on it.
//!
//! 1. `decide` + `Alarm::apply`, fed random command sequences over a few alarm ids (random
//!    `expected_version`, random payloads), are checked step by step against an explicit
//!    `(state, command) → outcome` table written from PRODUCT.md's diagram: no transition outside
//!    it, `already` answers carry the offset of the event that put the state in effect, and every
//!    event moves the alarm's version by exactly one.
//! 2. The same sequences go through a real `Ledger` (sled in a temporary directory, the single
//!    writer, group commit; commands queued in small bursts so that one batch can hold several):
//!    every answer matches the table, a repeated `command_id` gets its first outcome again
//!    (`duplicate` with the original offset, or the same rejection) and never appends, and the projection the
//!    writer built event by event equals the one rebuilt by reopening the log — from the final
//!    snapshot, from an older snapshot plus the tail, and from the log alone.

use alarm_ledger::domain::{
    decide, Alarm, AlarmChanges, AlarmSpec, AlarmState, Command, CommandKind, Decision, Event,
    EventData, Hash, Rejection, Severity,
};
use alarm_ledger::ledger::{CommandError, Ledger, LedgerOptions, Outcome, Restore};
use alarm_ledger::metrics::Metrics;
use alarm_ledger::projection::Projection;
use alarm_ledger::store::SledLog;
use alarm_ledger::time::Timestamp;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use uuid::Uuid;

// ------------------------------------------------------------------ the table

/// The state of an alarm as the table sees it (`Absent` = never created).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum S {
    Absent,
    Armed,
    Triggered,
    Acknowledged,
    Deleted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum C {
    Create,
    Update,
    Trigger,
    Ack,
    Rearm,
    Delete,
}

/// Which event an `already` answer must point at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    /// The trigger that won.
    LastTrigger,
    /// The ack already in effect.
    LastAck,
    /// The alarm is armed: the creation or rearm that armed it (or a later event of the alarm).
    Armed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    /// One event, after which the alarm is in this state.
    Append(S),
    Already(Which),
    Reject(&'static str),
}

/// PRODUCT.md, "States and transitions", as data. Checked for completeness below.
const TABLE: &[(S, C, Out)] = &[
    // create ──> armed; every other command needs the alarm.
    (S::Absent, C::Create, Out::Append(S::Armed)),
    (S::Absent, C::Update, Out::Reject("not_found")),
    (S::Absent, C::Trigger, Out::Reject("not_found")),
    (S::Absent, C::Ack, Out::Reject("not_found")),
    (S::Absent, C::Rearm, Out::Reject("not_found")),
    (S::Absent, C::Delete, Out::Reject("not_found")),
    // armed ──trigger──> triggered; ack of armed: not_triggered; rearm of armed: already.
    (S::Armed, C::Create, Out::Reject("version_conflict")),
    (S::Armed, C::Update, Out::Append(S::Armed)),
    (S::Armed, C::Trigger, Out::Append(S::Triggered)),
    (S::Armed, C::Ack, Out::Reject("not_triggered")),
    (S::Armed, C::Rearm, Out::Already(Which::Armed)),
    (S::Armed, C::Delete, Out::Append(S::Deleted)),
    // triggered ──ack──> acknowledged; trigger again: already (the first won); rearm: not_acknowledged.
    (S::Triggered, C::Create, Out::Reject("version_conflict")),
    (S::Triggered, C::Update, Out::Append(S::Triggered)),
    (S::Triggered, C::Trigger, Out::Already(Which::LastTrigger)),
    (S::Triggered, C::Ack, Out::Append(S::Acknowledged)),
    (S::Triggered, C::Rearm, Out::Reject("not_acknowledged")),
    (S::Triggered, C::Delete, Out::Append(S::Deleted)),
    // acknowledged ──rearm──> armed; trigger: already (same firing); ack: already.
    (S::Acknowledged, C::Create, Out::Reject("version_conflict")),
    (S::Acknowledged, C::Update, Out::Append(S::Acknowledged)),
    (
        S::Acknowledged,
        C::Trigger,
        Out::Already(Which::LastTrigger),
    ),
    (S::Acknowledged, C::Ack, Out::Already(Which::LastAck)),
    (S::Acknowledged, C::Rearm, Out::Append(S::Armed)),
    (S::Acknowledged, C::Delete, Out::Append(S::Deleted)),
    // deleted: every command, delete and create included, is alarm_deleted.
    (S::Deleted, C::Create, Out::Reject("alarm_deleted")),
    (S::Deleted, C::Update, Out::Reject("alarm_deleted")),
    (S::Deleted, C::Trigger, Out::Reject("alarm_deleted")),
    (S::Deleted, C::Ack, Out::Reject("alarm_deleted")),
    (S::Deleted, C::Rearm, Out::Reject("alarm_deleted")),
    (S::Deleted, C::Delete, Out::Reject("alarm_deleted")),
];

fn table(s: S, c: C) -> Out {
    TABLE
        .iter()
        .find(|(ts, tc, _)| *ts == s && *tc == c)
        .map(|(_, _, o)| *o)
        .expect("the table covers every (state, command)")
}

fn s_of(a: Option<&Alarm>) -> S {
    match a.map(|a| a.state) {
        None => S::Absent,
        Some(AlarmState::Armed) => S::Armed,
        Some(AlarmState::Triggered) => S::Triggered,
        Some(AlarmState::Acknowledged) => S::Acknowledged,
        Some(AlarmState::Deleted) => S::Deleted,
    }
}

fn c_of(k: &CommandKind) -> C {
    match k {
        CommandKind::Create(_) => C::Create,
        CommandKind::Update(_) => C::Update,
        CommandKind::Trigger { .. } => C::Trigger,
        CommandKind::Ack { .. } => C::Ack,
        CommandKind::Rearm => C::Rearm,
        CommandKind::Delete => C::Delete,
    }
}

/// The full expected outcome: the table plus the rules around it (optimistic concurrency, empty
/// updates), in the order PRODUCT.md implies — existence and deletion first, then the version,
/// then the transition.
fn expected(current: Option<&Alarm>, cmd: &Command) -> Out {
    let (s, c) = (s_of(current), c_of(&cmd.kind));
    let version = current.map_or(0, |a| a.version);
    let live = matches!(s, S::Armed | S::Triggered | S::Acknowledged);
    let absent_create = s == S::Absent && c == C::Create;
    // Any command may carry expected_version (PRODUCT.md), a create too: on a live alarm a
    // mismatch is version_conflict before "already exists"; on an absent one, 0 is expected.
    if live || absent_create {
        if let Some(ev) = cmd.expected_version {
            if ev != version {
                return Out::Reject("version_conflict");
            }
        }
    }
    if let CommandKind::Update(ch) = &cmd.kind {
        if live && ch.is_empty() {
            return Out::Reject("bad_request");
        }
    }
    table(s, c)
}

// ------------------------------------------------------------------ the model

/// What the test itself knows about one alarm, independently of `Alarm`.
#[derive(Clone, Debug, Default)]
struct Track {
    events: Vec<u64>,
    last_trigger: Option<u64>,
    last_ack: Option<u64>,
    /// Offset of the create or rearm that last armed it.
    armed_by: Option<u64>,
    /// The alarm's fields as the events say they are, kept here from the payloads (not with the
    /// crate's `Alarm::apply`): the definition after creation and updates, and who triggered
    /// and acknowledged last, with what.
    spec: Option<AlarmSpec>,
    created: Option<(u64, String)>,
    trigger: Option<(u64, String, Option<String>, Option<String>)>,
    ack: Option<(u64, String, Option<String>)>,
}

fn state_of_data(d: &EventData) -> Option<AlarmState> {
    match d {
        EventData::Created(_) | EventData::Rearmed => Some(AlarmState::Armed),
        EventData::Updated(_) => None,
        EventData::Triggered { .. } => Some(AlarmState::Triggered),
        EventData::Acknowledged { .. } => Some(AlarmState::Acknowledged),
        EventData::Deleted => Some(AlarmState::Deleted),
    }
}

fn to_s(s: AlarmState) -> S {
    match s {
        AlarmState::Armed => S::Armed,
        AlarmState::Triggered => S::Triggered,
        AlarmState::Acknowledged => S::Acknowledged,
        AlarmState::Deleted => S::Deleted,
    }
}

/// The payload the command must produce when it appends.
fn payload_of(kind: &CommandKind) -> EventData {
    match kind {
        CommandKind::Create(s) => EventData::Created(s.clone()),
        CommandKind::Update(c) => EventData::Updated(c.clone()),
        CommandKind::Trigger { value, message } => EventData::Triggered {
            value: value.clone(),
            message: message.clone(),
        },
        CommandKind::Ack { comment } => EventData::Acknowledged {
            comment: comment.clone(),
        },
        CommandKind::Rearm => EventData::Rearmed,
        CommandKind::Delete => EventData::Deleted,
    }
}

/// The model ledger: alarms folded with the crate's own `Alarm::apply`, each step checked, and
/// every field checked against what the payloads say (`Track`, kept without `Alarm::apply`).
#[derive(Default)]
struct Model {
    alarms: HashMap<Uuid, Alarm>,
    tracks: HashMap<Uuid, Track>,
    head: u64,
    /// command_id → (offset, alarm) of the event it appended.
    commands: HashMap<Uuid, (u64, Uuid)>,
    /// command_id → the answer a repeat gets, for commands that appended nothing.
    remembered: HashMap<Uuid, Answer>,
}

/// What a command should answer, in the ledger's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Appended { offset: u64 },
    Already { offset: u64 },
    Duplicate { offset: u64, alarm_id: Uuid },
    Rejected(&'static str),
}

impl Model {
    /// Checks `decide` against the table for `cmd` and returns the answer due, with the payload
    /// of the event to append when one is due (the model is not changed: see `apply`).
    fn predict(&self, cmd: &Command) -> (Answer, Option<EventData>) {
        if let Some(cid) = cmd.command_id {
            if let Some(&(offset, alarm_id)) = self.commands.get(&cid) {
                return (Answer::Duplicate { offset, alarm_id }, None);
            }
            if let Some(answer) = self.remembered.get(&cid) {
                return (answer.clone(), None);
            }
        }
        let current = self.alarms.get(&cmd.alarm_id);
        let want = expected(current, cmd);
        let got = decide(current, cmd);
        let track = self.tracks.get(&cmd.alarm_id).cloned().unwrap_or_default();
        match (want, got) {
            (Out::Reject(code), Err(rej)) => {
                assert_eq!(rej.code(), code, "{:?} on {:?}", cmd.kind, s_of(current));
                (Answer::Rejected(code), None)
            }
            (Out::Already(which), Ok(Decision::Already { offset })) => {
                match which {
                    Which::LastTrigger => assert_eq!(Some(offset), track.last_trigger),
                    Which::LastAck => assert_eq!(Some(offset), track.last_ack),
                    Which::Armed => {
                        assert!(track.events.contains(&offset), "already → own event");
                        assert!(Some(offset) >= track.armed_by, "already → armed by it");
                    }
                }
                (Answer::Already { offset }, None)
            }
            (Out::Append(_), Ok(Decision::Append(data))) => {
                assert_eq!(data, payload_of(&cmd.kind), "payload of {:?}", cmd.kind);
                (
                    Answer::Appended {
                        offset: self.head + 1,
                    },
                    Some(data),
                )
            }
            (want, got) => panic!(
                "{:?} on {:?} (version {:?}, expected_version {:?}): table says {want:?}, decide says {got:?}",
                cmd.kind,
                s_of(current),
                current.map(|a| a.version),
                cmd.expected_version
            ),
        }
    }

    /// Remembers the outcome of a command with an id that appended nothing: a repeat gets the
    /// same outcome for the life of the ledger (`already` → `duplicate` with that offset).
    fn remember(&mut self, cmd: &Command, answer: &Answer) {
        let Some(cid) = cmd.command_id else { return };
        let repeat = match answer {
            Answer::Already { offset } => Answer::Duplicate {
                offset: *offset,
                alarm_id: cmd.alarm_id,
            },
            Answer::Rejected(code) => Answer::Rejected(code),
            Answer::Appended { .. } | Answer::Duplicate { .. } => return,
        };
        self.remembered.entry(cid).or_insert(repeat);
    }

    /// Applies the event `predict` asked for and checks the state the table promised.
    fn apply_checked(&mut self, cmd: &Command, event: &Event) {
        let want = expected(self.alarms.get(&cmd.alarm_id), cmd);
        self.apply(event);
        let after = &self.alarms[&cmd.alarm_id];
        assert_eq!(
            Out::Append(to_s(after.state)),
            want,
            "state after {:?}",
            cmd.kind
        );
    }

    /// Folds one event (ours or the ledger's) and checks the version step of exactly one.
    fn apply(&mut self, event: &Event) {
        assert_eq!(event.offset, self.head + 1, "offsets are gapless");
        self.head = event.offset;
        let before = self.alarms.get(&event.alarm_id).map(|a| a.version);
        match self.alarms.get_mut(&event.alarm_id) {
            Some(a) => a.apply(event),
            None => {
                let a = Alarm::from_created(event).expect("first event of an alarm is a create");
                self.alarms.insert(a.id, a);
            }
        }
        let a = &self.alarms[&event.alarm_id];
        assert_eq!(a.version, before.unwrap_or(0) + 1, "one event, one version");
        assert_eq!(a.updated.offset, event.offset);
        if let Some(s) = state_of_data(&event.data) {
            assert_eq!(a.state, s);
        }
        let t = self.tracks.entry(event.alarm_id).or_default();
        t.events.push(event.offset);
        assert_eq!(a.version, t.events.len() as u64, "version = events applied");
        match &event.data {
            EventData::Created(_) | EventData::Rearmed => t.armed_by = Some(event.offset),
            EventData::Triggered { .. } => t.last_trigger = Some(event.offset),
            EventData::Acknowledged { .. } => t.last_ack = Some(event.offset),
            _ => {}
        }
        // The fields, from the payloads.
        match &event.data {
            EventData::Created(spec) => {
                t.spec = Some(spec.clone());
                t.created = Some((event.offset, event.actor.clone()));
            }
            EventData::Updated(c) => {
                let spec = t.spec.as_mut().expect("created first");
                if let Some(v) = &c.name {
                    spec.name = v.clone();
                }
                if let Some(v) = &c.instrument {
                    spec.instrument = v.clone();
                }
                if let Some(v) = &c.condition {
                    spec.condition = v.clone();
                }
                if let Some(v) = c.severity {
                    spec.severity = v;
                }
                if let Some(v) = &c.tags {
                    spec.tags = v.clone();
                }
            }
            EventData::Triggered { value, message } => {
                t.trigger = Some((
                    event.offset,
                    event.actor.clone(),
                    value.clone(),
                    message.clone(),
                ))
            }
            EventData::Acknowledged { comment } => {
                t.ack = Some((event.offset, event.actor.clone(), comment.clone()))
            }
            EventData::Rearmed | EventData::Deleted => {}
        }
        let spec = t.spec.as_ref().expect("created first");
        assert_eq!(
            (
                &a.name,
                &a.instrument,
                &a.condition,
                a.severity,
                &a.tags,
                &a.owner
            ),
            (
                &spec.name,
                &spec.instrument,
                &spec.condition,
                spec.severity,
                &spec.tags,
                &spec.owner
            ),
            "the definition after offset {}",
            event.offset
        );
        assert_eq!(
            Some((a.created.offset, a.created.by.clone())),
            t.created,
            "created"
        );
        assert_eq!(
            a.last_trigger.as_ref().map(|s| (
                s.offset,
                s.by.clone(),
                a.last_trigger_value.clone(),
                a.last_trigger_message.clone()
            )),
            t.trigger,
            "the last trigger after offset {}",
            event.offset
        );
        if a.last_trigger.is_none() {
            assert_eq!(
                (&a.last_trigger_value, &a.last_trigger_message),
                (&None, &None)
            );
        }
        assert_eq!(
            a.last_ack
                .as_ref()
                .map(|s| (s.offset, s.by.clone(), a.last_ack_comment.clone())),
            t.ack,
            "the last ack after offset {}",
            event.offset
        );
        assert_eq!(a.updated.by, event.actor, "updated by the event's actor");
        if let Some(cid) = event.command_id {
            let prev = self.commands.insert(cid, (event.offset, event.alarm_id));
            assert!(prev.is_none(), "command_id {cid} appended twice");
        }
    }

    fn sorted(&self) -> Vec<Alarm> {
        let mut v: Vec<Alarm> = self.alarms.values().cloned().collect();
        v.sort_by_key(|a| a.id);
        v
    }
}

// ------------------------------------------------------------------ generators

const ALARMS: u128 = 4;
const COMMAND_IDS: u128 = 6;

#[derive(Clone, Debug)]
enum Op {
    Create(AlarmSpec),
    Update(AlarmChanges),
    Trigger(Option<String>, Option<String>),
    Ack(Option<String>),
    Rearm,
    Delete,
}

#[derive(Clone, Debug)]
enum Ev {
    None,
    /// The alarm's current version (0 when absent).
    Current,
    /// Current ± a small delta: a stale or future version.
    Off(i8),
}

#[derive(Clone, Debug)]
struct Step {
    alarm: u128,
    op: Op,
    ev: Ev,
    cid: Option<u128>,
    actor: &'static str,
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z]{1,8}",
        Just("quote \" back\\slash\ttab é".to_string()),
    ]
}

fn severity() -> impl Strategy<Value = Severity> {
    prop_oneof![
        Just(Severity::Low),
        Just(Severity::Medium),
        Just(Severity::High),
        Just(Severity::Critical)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let spec = (
        "[A-Z]{1,5} > [0-9]{1,3}",
        text(),
        text(),
        severity(),
        proptest::collection::vec("[a-z]{1,4}", 0..3),
    )
        .prop_map(|(name, instrument, condition, severity, tags)| AlarmSpec {
            name,
            instrument,
            condition,
            severity,
            tags,
            owner: String::new(),
        });
    let changes = (
        proptest::option::of("[a-z]{1,6}"),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(severity()),
        proptest::option::of(proptest::collection::vec("[a-z]{1,4}", 0..2)),
    )
        .prop_map(
            |(name, instrument, condition, severity, tags)| AlarmChanges {
                name,
                instrument,
                condition,
                severity,
                tags,
            },
        );
    prop_oneof![
        4 => spec.prop_map(Op::Create),
        3 => changes.prop_map(Op::Update),
        6 => (proptest::option::of("[0-9]{1,4}"), proptest::option::of(text()))
            .prop_map(|(v, m)| Op::Trigger(v, m)),
        5 => proptest::option::of(text()).prop_map(Op::Ack),
        4 => Just(Op::Rearm),
        1 => Just(Op::Delete),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (
        0..ALARMS,
        op(),
        prop_oneof![
            7 => Just(Ev::None),
            2 => Just(Ev::Current),
            1 => (-2i8..=2).prop_map(Ev::Off),
        ],
        proptest::option::of(0..COMMAND_IDS),
        prop_oneof![Just("alice"), Just("bob")],
    )
        .prop_map(|(alarm, op, ev, cid, actor)| Step {
            alarm,
            op,
            ev,
            cid,
            actor,
        })
}

fn alarm_id(n: u128) -> Uuid {
    Uuid::from_u128(0xa1a2_0000_0000_4000_8000_0000_0000_0000 | n)
}

fn command_id(n: u128) -> Uuid {
    Uuid::from_u128(0xc0de_0000_0000_4000_8000_0000_0000_0000 | n)
}

/// The command of a step, given the current model (for `expected_version`).
fn command(s: &Step, model: &Model) -> Command {
    let id = alarm_id(s.alarm);
    let version = model.alarms.get(&id).map_or(0, |a| a.version);
    let kind = match &s.op {
        Op::Create(spec) => CommandKind::Create(AlarmSpec {
            owner: s.actor.to_string(),
            ..spec.clone()
        }),
        Op::Update(c) => CommandKind::Update(c.clone()),
        Op::Trigger(value, message) => CommandKind::Trigger {
            value: value.clone(),
            message: message.clone(),
        },
        Op::Ack(comment) => CommandKind::Ack {
            comment: comment.clone(),
        },
        Op::Rearm => CommandKind::Rearm,
        Op::Delete => CommandKind::Delete,
    };
    Command {
        alarm_id: id,
        kind,
        actor: s.actor.to_string(),
        command_id: s.cid.map(command_id),
        expected_version: match s.ev {
            Ev::None => None,
            Ev::Current => Some(version),
            Ev::Off(d) => Some(version.saturating_add_signed(d as i64)),
        },
    }
}

// ------------------------------------------------------------------ 1. the pure state machine

/// Failures print their minimal case; nothing is written next to the sources.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[test]
fn the_table_is_complete_and_has_no_duplicates() {
    let states = [
        S::Absent,
        S::Armed,
        S::Triggered,
        S::Acknowledged,
        S::Deleted,
    ];
    let cmds = [
        C::Create,
        C::Update,
        C::Trigger,
        C::Ack,
        C::Rearm,
        C::Delete,
    ];
    let mut seen = HashSet::new();
    for (s, c, _) in TABLE {
        assert!(seen.insert((*s, *c)), "({s:?}, {c:?}) twice");
    }
    for s in states {
        for c in cmds {
            assert!(seen.contains(&(s, c)), "({s:?}, {c:?}) missing");
        }
    }
    // The diagram's only state changes.
    let moves: HashSet<(S, S)> = TABLE
        .iter()
        .filter_map(|(s, _, o)| match o {
            Out::Append(n) if n != s => Some((*s, *n)),
            _ => None,
        })
        .collect();
    let allowed: HashSet<(S, S)> = [
        (S::Absent, S::Armed),
        (S::Armed, S::Triggered),
        (S::Triggered, S::Acknowledged),
        (S::Acknowledged, S::Armed),
        (S::Armed, S::Deleted),
        (S::Triggered, S::Deleted),
        (S::Acknowledged, S::Deleted),
    ]
    .into_iter()
    .collect();
    assert_eq!(moves, allowed);
}

#[test]
fn rejections_carry_the_protocol_codes() {
    let id = Uuid::nil();
    assert_eq!(Rejection::AlreadyExists(id).code(), "version_conflict");
    assert_eq!(Rejection::AlarmDeleted(id).code(), "alarm_deleted");
    assert_eq!(Rejection::NotFound(id).code(), "not_found");
}

proptest! {
    #![proptest_config(config(256))]

    /// Every step of a random sequence is exactly what the table says, and the projection
    /// folded from the same events agrees with the model.
    #[test]
    fn decide_and_apply_follow_the_table(steps in proptest::collection::vec(step(), 1..40)) {
        let mut model = Model::default();
        let mut projection = Projection::new();
        for (i, s) in steps.iter().enumerate() {
            let cmd = command(s, &model);
            let head = model.head;
            match model.predict(&cmd) {
                (Answer::Appended { offset }, Some(data)) => {
                    prop_assert_eq!(offset, head + 1);
                    let event = Event {
                        offset,
                        id: Uuid::from_u128(offset as u128),
                        at: Timestamp(1_000 + i as i64),
                        actor: cmd.actor.clone(),
                        alarm_id: cmd.alarm_id,
                        command_id: cmd.command_id,
                        data,
                        hash: Hash::default(),
                    };
                    model.apply_checked(&cmd, &event);
                    projection.apply(&event);
                }
                (answer, None) => model.remember(&cmd, &answer),
                other => panic!("{other:?}"),
            }
            prop_assert_eq!(projection.offset(), model.head);
        }
        prop_assert_eq!(projection.alarms_sorted(), model.sorted());
        prop_assert_eq!(projection.offset(), model.head);
    }
}

// ------------------------------------------------------------------ 2. through a real Ledger

fn open(dir: &Path, snapshot: Option<&Path>) -> (Arc<Ledger>, Restore) {
    let log =
        SledLog::open_after_close(&dir.join("ledger"), &Default::default()).expect("sled opens");
    let opts = LedgerOptions {
        queue_capacity: 64,
        max_batch: 64,
        snapshot_every: 0,
        hub_capacity: 16,
        snapshot_path: snapshot.map(Path::to_path_buf),
    };
    Ledger::open(Arc::new(log), opts, Arc::new(Metrics::new())).expect("ledger opens")
}

fn answer_of(r: Result<Outcome, CommandError>) -> Answer {
    match r {
        Ok(o) if o.duplicate => Answer::Duplicate {
            offset: o.offset,
            alarm_id: o.alarm_id,
        },
        Ok(o) if o.already => Answer::Already { offset: o.offset },
        Ok(o) => Answer::Appended { offset: o.offset },
        Err(CommandError::Rejected(r)) => Answer::Rejected(r.code()),
        Err(e @ CommandError::Repeated { .. }) => Answer::Rejected(e.code()),
        Err(e) => panic!("unexpected failure: {e}"),
    }
}

#[derive(Clone, Debug)]
struct Run {
    steps: Vec<Step>,
    /// Burst sizes: the commands of one burst are queued back to back (one batch, usually).
    bursts: Vec<usize>,
    /// After this many bursts, a projection snapshot is taken and kept aside.
    snapshot_after: usize,
}

fn run() -> impl Strategy<Value = Run> {
    (
        // Runs start by creating the alarms, so that the rest exercises the transitions rather
        // than `not_found` (the pure test above covers absent alarms).
        proptest::collection::vec(step(), ALARMS as usize),
        proptest::collection::vec(step(), 4..32),
        proptest::collection::vec(1usize..5, 40),
        0usize..8,
    )
        .prop_map(|(creates, rest, bursts, snapshot_after)| {
            let mut steps: Vec<Step> = creates
                .into_iter()
                .enumerate()
                .map(|(i, mut s)| {
                    s.alarm = i as u128;
                    s.ev = Ev::None;
                    match s.op {
                        Op::Create(_) => {}
                        _ => {
                            s.op = Op::Create(AlarmSpec {
                                name: format!("ALARM{i} > 1"),
                                instrument: "X".into(),
                                condition: String::new(),
                                severity: Severity::High,
                                tags: vec![],
                                owner: String::new(),
                            })
                        }
                    }
                    s
                })
                .collect();
            steps.extend(rest);
            Run {
                steps,
                bursts,
                snapshot_after,
            }
        })
}

fn ledger_case(r: &Run) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let snap = dir.join("projection.snapshot");
    let mid = dir.join("mid.snapshot");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (ledger, restore) = open(dir, Some(&snap));
    assert_eq!(restore, Restore::Empty);
    ledger.start().expect("writer starts");
    let mut model = Model::default();
    let mut steps = r.steps.iter();
    let mut mid_offset = None;
    for (burst_no, &n) in r.bursts.iter().enumerate() {
        if burst_no == r.snapshot_after {
            ledger.write_snapshot().expect("snapshot");
            std::fs::copy(&snap, &mid).expect("keep the snapshot aside");
            mid_offset = Some(ledger.head().offset);
        }
        let burst: Vec<&Step> = steps.by_ref().take(n).collect();
        if burst.is_empty() {
            break;
        }
        // Queue the burst in order (join_all polls its futures in order, and `submit` enqueues
        // on its first poll), so the writer decides them in this order, in one batch or more.
        // The model decides them in the same order; expected_version is taken from the model
        // before the burst, as a client that sent them together would.
        let cmds: Vec<Command> = burst.iter().map(|s| command(s, &model)).collect();
        let answers = rt.block_on(futures_util::future::join_all(
            cmds.iter().map(|c| ledger.submit(c.clone())),
        ));
        for (cmd, got) in cmds.iter().zip(answers) {
            let got = answer_of(got);
            let (want, data) = model.predict(cmd);
            assert_eq!(want, got, "{cmd:?}");
            if let (Answer::Appended { offset }, Some(data)) = (got, data) {
                // Adopt the ledger's event (its time, id and hash) so the model stays exact.
                let stored = ledger
                    .log()
                    .event_at(offset)
                    .expect("read")
                    .expect("an acknowledged event is in the log");
                assert_eq!(stored.command_id, cmd.command_id);
                assert_eq!(stored.alarm_id, cmd.alarm_id);
                assert_eq!(stored.actor, cmd.actor);
                assert_eq!(stored.data, data);
                model.apply_checked(cmd, &stored);
            } else {
                model.remember(cmd, &want);
            }
        }
        assert_eq!(ledger.head().offset, model.head, "head follows the appends");
    }
    let head = ledger.head();
    let live = ledger.read_model().projection.clone();
    assert_eq!(
        live.alarms_sorted(),
        model.sorted(),
        "writer's projection = model"
    );
    assert_eq!(live.offset(), head.offset);

    // The log itself: gapless, each command_id at most once, folds to the same projection.
    let events = ledger.log().read_from(1, usize::MAX).expect("read log");
    assert_eq!(events.len() as u64, head.offset);
    let mut folded = Projection::new();
    let mut cids = HashSet::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.offset, i as u64 + 1);
        if let Some(c) = e.command_id {
            assert!(cids.insert(c), "command_id {c} appended twice");
        }
        folded.apply(e);
    }
    assert_eq!(
        folded, live,
        "event-by-event fold of the log = writer's projection"
    );

    ledger.stop();
    drop(ledger);
    rt.shutdown_background();

    // Reopen from the final snapshot.
    let (l, restore) = open(dir, Some(&snap));
    if head.offset > 0 {
        assert_eq!(
            restore,
            Restore::Snapshot {
                offset: head.offset,
                tail: 0
            }
        );
    } else {
        assert_eq!(restore, Restore::Empty);
    }
    assert_eq!(l.read_model().projection, live);
    assert_eq!(l.head(), head);
    drop(l);

    // Reopen from the older snapshot plus the tail.
    if let Some(m) = mid_offset {
        let (l, restore) = open(dir, Some(&mid));
        if head.offset > 0 {
            if m > 0 {
                assert_eq!(
                    restore,
                    Restore::Snapshot {
                        offset: m,
                        tail: head.offset - m
                    }
                );
            } else {
                assert_eq!(
                    restore,
                    Restore::FullReplay {
                        events: head.offset,
                        reason: None
                    }
                );
            }
        }
        assert_eq!(l.read_model().projection, live);
        assert_eq!(l.head(), head);
        drop(l);
    }

    // Reopen from the log alone.
    let (l, restore) = open(dir, None);
    if head.offset > 0 {
        assert_eq!(
            restore,
            Restore::FullReplay {
                events: head.offset,
                reason: None
            }
        );
    }
    assert_eq!(l.read_model().projection, live);
    assert_eq!(l.head(), head);
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn ledger_matches_the_model_and_rebuilds_identically(r in run()) {
        ledger_case(&r);
    }
}
