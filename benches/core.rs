//! Criterion micro-benchmarks of the ledger core (issue 7). Every benchmark reports elements/s.
//!
//! Run all: `cargo bench --bench core`; a subset: `cargo bench --bench core -- durable_append`;
//! a fast correctness pass: `cargo bench --bench core -- --test`.
//!
//! The on-disk benchmarks work in a temporary directory (honours `TMPDIR`: point it at the disk
//! you want to measure, never at a tmpfs). Setup progress, with this process's RSS, goes to stderr.
//! Knobs (environment):
//! - `LEDGER_BENCH_EVENTS` (default 1,000,000), `LEDGER_BENCH_ALARMS` (default 10,000): sizes;
//! - `LEDGER_BENCH_TIME_SCALE` (default 1): scales warm-up and measurement times (smoke runs);
//! - `LEDGER_BENCH_LOAD_BATCH` (default 256): events per `append_batch` when the big log is
//!   written. With sled 0.34, batches of ~1,000 events and more leave 7–10 KB of RSS per event
//!   written (1M events: 9.6 GB) and slow later reads; 256 keeps it near the cache size;
//! - `LEDGER_BENCH_COMMAND_IDS=0`: events without command_id (no command index entries).
//!
//! | group            | what                                                                 |
//! |------------------|----------------------------------------------------------------------|
//! | `codec`          | bincode record encode/decode, canonical JSON encode/parse, wire JSON |
//! | `chain`          | one hash-chain link (`chain::event_hash`)                            |
//! | `projection`     | apply (10k alarms, trigger/ack/rearm cycle), rebuild of N events     |
//! | `log_read`       | sequential read of N events from a real `SledLog` (warm: sled already open, page cache hot) |
//! | `ledger_open`    | `Ledger::open`: full replay+verify of N events, and from a snapshot (warm: sled already open; not a process start, see below) |
//! | `durable_append` | `Ledger::submit` through the writer, 1 / 16 / 64 concurrent appenders |
//! | `store_append`   | `SledLog::append_batch` of 64 ready events (record + 2 index keys, flush, fdatasync), and sled alone with the record keys only: the storage ceiling under the writer |
//! | `disk_raw`       | 4 KiB append + `fdatasync` loop in the same directory (the physical limit) |
//!
//! `log_read` and `ledger_open` run on the `SledLog` the fixture wrote and keeps open: they leave
//! out sled's own open and recovery (the latter ~0.8 s on the first open after 1M events were
//! written, when sled replays its log), the process start and the rest of the server's start-up.
//! They are components of the start-up targets, not measurements of them: the start of the real
//! process (spawn → listening → `/readyz` 200, with and without a projection snapshot) is
//! measured by `benches/compliance.rs` (`process_start`).

/// The same allocator as the server binary (src/main.rs explains why).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use alarm_ledger::domain::{AlarmSpec, Command, CommandKind, Event, EventData, Hash, Severity};
use alarm_ledger::ledger::{Ledger, LedgerOptions, Restore};
use alarm_ledger::metrics::Metrics;
use alarm_ledger::projection::Projection;
use alarm_ledger::store::sled_log::{SledLog, SledOptions};
use alarm_ledger::store::{chain, codec, EventLog};
use alarm_ledger::time::Timestamp;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use std::cell::OnceCell;
use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Events per `append_batch` when the big log is written once (`LEDGER_BENCH_LOAD_BATCH`).
const LOAD_BATCH: usize = 256;
/// Concurrent appender counts of `durable_append`.
const APPENDERS: [usize; 3] = [1, 16, 64];

/// A warm-up or measurement time, scaled by `LEDGER_BENCH_TIME_SCALE` (default 1; e.g. 0.1 for a
/// smoke run whose numbers are not kept).
fn secs(s: f64) -> Duration {
    let scale = std::env::var("LEDGER_BENCH_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|x| *x > 0.0)
        .unwrap_or(1.0);
    Duration::from_secs_f64((s * scale).max(0.01))
}

/// This process's resident memory, MiB (setup diagnostics on stderr).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

// ------------------------------------------------------------------ event generation

fn spec(i: usize) -> AlarmSpec {
    AlarmSpec {
        name: format!("alarm-{i:05}"),
        instrument: format!("PT-{:03}", i % 1000),
        condition: "value > 200".into(),
        severity: Severity::High,
        tags: vec!["line-4".into(), "pressure".into()],
        owner: "operator-1".into(),
    }
}

/// The payload of the `step`-th event of an alarm's trigger → ack → rearm cycle.
fn cycle_data(step: usize) -> EventData {
    match step % 3 {
        0 => EventData::Triggered {
            value: Some("201.5".into()),
            message: Some("pressure above limit on line 4".into()),
        },
        1 => EventData::Acknowledged {
            comment: Some("operator on site".into()),
        },
        _ => EventData::Rearmed,
    }
}

/// A valid, hash-chained history: `alarms` creates, then trigger/ack/rearm cycles round-robin
/// over the alarms, `n` events in all. Every event carries a command_id, as client commands do
/// (`LEDGER_BENCH_COMMAND_IDS=0`: none, so no command index entries).
fn make_events(n: usize, alarms: usize, ledger_id: Uuid) -> Vec<Event> {
    let alarms = alarms.clamp(1, n.max(1));
    let ids: Vec<Uuid> = (0..alarms).map(|_| Uuid::new_v4()).collect();
    let base = Timestamp::now().0 - n as i64;
    let mut prev = chain::genesis(ledger_id);
    let mut out = Vec::with_capacity(n);
    let with_command_ids = std::env::var("LEDGER_BENCH_COMMAND_IDS").as_deref() != Ok("0");
    for i in 0..n {
        let (alarm, data) = if i < alarms {
            (i, EventData::Created(spec(i)))
        } else {
            let j = i - alarms;
            (j % alarms, cycle_data(j / alarms))
        };
        let mut e = Event {
            offset: i as u64 + 1,
            id: Uuid::now_v7(),
            at: Timestamp(base + i as i64),
            actor: "operator-1".into(),
            alarm_id: ids[alarm],
            command_id: with_command_ids.then(Uuid::new_v4),
            data,
            hash: Hash::default(),
        };
        e.hash = chain::event_hash(&prev, &e, ledger_id);
        prev = e.hash;
        out.push(e);
    }
    out
}

fn sample_event(ledger_id: Uuid) -> Event {
    let mut e = Event {
        offset: 123_456,
        id: Uuid::now_v7(),
        at: Timestamp::now(),
        actor: "operator-1".into(),
        alarm_id: Uuid::new_v4(),
        command_id: Some(Uuid::new_v4()),
        data: cycle_data(0),
        hash: Hash::default(),
    };
    e.hash = chain::event_hash(&Hash([7; 32]), &e, ledger_id);
    e
}

// ------------------------------------------------------------------ fixtures

/// Built on first use only, so a filtered run (`-- codec`) skips the expensive setup.
struct Fixtures {
    root: tempfile::TempDir,
    n: usize,
    alarms: usize,
    ledger_id: Uuid,
    events: OnceCell<Vec<Event>>,
    big: OnceCell<BigLog>,
}

/// A real log holding `n` events, and a projection snapshot at its head.
struct BigLog {
    log: Arc<dyn EventLog>,
    snapshot: PathBuf,
}

impl Fixtures {
    fn new() -> Fixtures {
        let root = tempfile::Builder::new()
            .prefix("ledger-bench-")
            .tempdir()
            .expect("temporary directory");
        eprintln!("bench data in {}", root.path().display());
        Fixtures {
            root,
            n: env_usize("LEDGER_BENCH_EVENTS", 1_000_000),
            alarms: env_usize("LEDGER_BENCH_ALARMS", 10_000),
            ledger_id: Uuid::new_v4(),
            events: OnceCell::new(),
            big: OnceCell::new(),
        }
    }

    fn events(&self) -> &[Event] {
        self.events.get_or_init(|| {
            let t = Instant::now();
            let v = make_events(self.n, self.alarms, self.ledger_id);
            eprintln!(
                "generated {} events in {:.1?} (RSS {:.0} MiB)",
                v.len(),
                t.elapsed(),
                rss_mib()
            );
            v
        })
    }

    fn big(&self) -> &BigLog {
        self.big.get_or_init(|| {
            let events = self.events();
            let t = Instant::now();
            let log = SledLog::open_with(
                &self.root.path().join("big/ledger"),
                &SledOptions::default(),
                Some((self.ledger_id, Timestamp::now())),
            )
            .expect("open big log");
            let batch = env_usize("LEDGER_BENCH_LOAD_BATCH", LOAD_BATCH);
            let report_every = (200_000 / batch).max(1);
            for (i, chunk) in events.chunks(batch).enumerate() {
                log.append_batch(chunk).expect("append");
                if (i + 1) % report_every == 0 {
                    eprintln!(
                        "  {} events written, {:.1?}, RSS {:.0} MiB",
                        (i + 1) * batch,
                        t.elapsed(),
                        rss_mib()
                    );
                }
            }
            let log: Arc<dyn EventLog> = Arc::new(log);
            eprintln!(
                "wrote {} events to sled in {:.1?} (RSS {:.0} MiB)",
                events.len(),
                t.elapsed(),
                rss_mib()
            );
            let snapshot = self.root.path().join("big/projection.snapshot");
            let opts = LedgerOptions {
                snapshot_path: Some(snapshot.clone()),
                ..LedgerOptions::default()
            };
            let (ledger, restore) =
                Ledger::open(log.clone(), opts, Arc::new(Metrics::new())).expect("ledger open");
            assert!(matches!(restore, Restore::FullReplay { .. }), "{restore:?}");
            ledger.write_snapshot().expect("snapshot");
            drop(ledger);
            eprintln!(
                "replayed and wrote the snapshot: {:.1?} since the first write (RSS {:.0} MiB)",
                t.elapsed(),
                rss_mib()
            );
            BigLog { log, snapshot }
        })
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ------------------------------------------------------------------ benchmarks

fn bench_codec(c: &mut Criterion) {
    let ledger_id = Uuid::new_v4();
    let e = sample_event(ledger_id);
    let record = codec::encode_event(&e);
    let canonical = chain::canonical_json(&serde_json::Value::Object(e.json_body(Some(ledger_id))));
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.warm_up_time(secs(0.5));
    g.measurement_time(secs(2.0));
    g.bench_function("bincode_encode", |b| {
        b.iter(|| codec::encode_event(black_box(&e)))
    });
    g.bench_function("bincode_decode", |b| {
        b.iter(|| codec::decode_event(black_box(&record)).expect("decode"))
    });
    g.bench_function("canonical_json_encode", |b| {
        b.iter(|| {
            chain::canonical_json(&serde_json::Value::Object(
                black_box(&e).json_body(Some(ledger_id)),
            ))
        })
    });
    g.bench_function("canonical_json_parse", |b| {
        b.iter(|| {
            serde_json::from_slice::<serde_json::Value>(black_box(&canonical)).expect("parse")
        })
    });
    g.bench_function("wire_event_message", |b| {
        b.iter(|| alarm_ledger::protocol::event_message(black_box(&e)))
    });
    g.finish();
    eprintln!(
        "record {} bytes, canonical JSON {} bytes",
        record.len(),
        canonical.len()
    );
}

fn bench_chain(c: &mut Criterion) {
    let ledger_id = Uuid::new_v4();
    let e = sample_event(ledger_id);
    let prev = Hash([9; 32]);
    let mut g = c.benchmark_group("chain");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.warm_up_time(secs(0.5));
    g.measurement_time(secs(2.0));
    g.bench_function("event_hash", |b| {
        b.iter(|| chain::event_hash(black_box(&prev), black_box(&e), ledger_id))
    });
    g.finish();
}

fn bench_projection(c: &mut Criterion, fx: &Fixtures) {
    let mut g = c.benchmark_group("projection");
    g.sample_size(10);
    g.warm_up_time(secs(1.0));
    g.measurement_time(secs(3.0));

    // apply: a projection of `alarms` alarms, one trigger/ack/rearm cycle of every alarm per
    // iteration; offsets are rewritten so that every event is newer than the last.
    let alarms = fx.alarms.min(fx.n);
    let ledger_id = Uuid::new_v4();
    let seed = make_events(alarms * 4, alarms, ledger_id);
    let (creates, cycle) = seed.split_at(alarms);
    let mut cycle = cycle.to_vec();
    let mut proj = Projection::new();
    for e in creates {
        proj.apply(e);
    }
    let mut offset = proj.offset();
    g.throughput(Throughput::Elements(cycle.len() as u64));
    g.bench_function(BenchmarkId::new("apply", format!("{alarms}_alarms")), |b| {
        b.iter(|| {
            for e in cycle.iter_mut() {
                offset += 1;
                e.offset = offset;
                proj.apply(e);
            }
        })
    });
    black_box(&proj);

    // rebuild: fold the whole in-memory history into a fresh projection.
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(fx.n as u64));
    g.bench_function(BenchmarkId::new("rebuild", fx.n), |b| {
        let events = fx.events();
        b.iter(|| {
            let mut p = Projection::new();
            for e in events {
                p.apply(e);
            }
            assert_eq!(p.len(), alarms);
            p
        })
    });
    g.finish();
}

/// Sequential reads of the whole log, warm: on the fixture's `SledLog`, already open, its pages
/// in sled's cache and the kernel's page cache after the first iteration. Not a cold read.
fn bench_log_read(c: &mut Criterion, fx: &Fixtures) {
    let mut g = c.benchmark_group("log_read");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(secs(1.0));
    g.measurement_time(secs(5.0));
    g.throughput(Throughput::Elements(fx.n as u64));
    let n = fx.n as u64;
    g.bench_function(BenchmarkId::new("iter_from", fx.n), |b| {
        let log = &fx.big().log;
        b.iter(|| {
            let mut count = 0u64;
            for item in log.iter_from(1) {
                black_box(item.expect("record"));
                count += 1;
            }
            assert_eq!(count, n);
        })
    });
    // The replay path of a subscription: `read_from` in chunks of 1,024.
    g.bench_function(BenchmarkId::new("read_from_chunks", fx.n), |b| {
        let log = &fx.big().log;
        b.iter(|| {
            let mut next = 1u64;
            loop {
                let chunk = log.read_from(next, 1024).expect("read");
                let Some(last) = chunk.last() else { break };
                next = last.offset + 1;
                black_box(&chunk);
            }
            assert_eq!(next, n + 1);
        })
    });
    g.finish();
}

/// `Ledger::open` on the fixture's `SledLog`, warm (sled already open, recovered and cached): the
/// replay/verify/rebuild or snapshot-load part of a start only. It excludes opening sled (and its
/// recovery after a large write), the process start, auth set-up and binding; the process start
/// is `process_start` in `benches/compliance.rs`.
fn bench_ledger_open(c: &mut Criterion, fx: &Fixtures) {
    let mut g = c.benchmark_group("ledger_open");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(secs(1.0));
    g.measurement_time(secs(5.0));
    g.throughput(Throughput::Elements(fx.n as u64));
    // Without a snapshot: read, decode, verify every link, apply (the rebuild at start), warm.
    g.bench_function(BenchmarkId::new("full_replay", fx.n), |b| {
        let big = fx.big();
        b.iter(|| {
            let (ledger, restore) = Ledger::open(
                big.log.clone(),
                LedgerOptions::default(),
                Arc::new(Metrics::new()),
            )
            .expect("open");
            assert!(matches!(restore, Restore::FullReplay { .. }), "{restore:?}");
            ledger
        })
    });
    // From a snapshot at the head: load + validate the snapshot, no tail to replay, warm.
    g.bench_function(
        BenchmarkId::new(
            "from_snapshot",
            format!("{}_events_{}_alarms", fx.n, fx.alarms),
        ),
        |b| {
            let big = fx.big();
            let opts = LedgerOptions {
                snapshot_path: Some(big.snapshot.clone()),
                ..LedgerOptions::default()
            };
            b.iter(|| {
                let (ledger, restore) =
                    Ledger::open(big.log.clone(), opts.clone(), Arc::new(Metrics::new()))
                        .expect("open");
                assert!(
                    matches!(restore, Restore::Snapshot { tail: 0, .. }),
                    "{restore:?}"
                );
                ledger
            })
        },
    );
    g.finish();
}

/// The next command of an alarm's cycle, given its phase (0 armed, 1 triggered, 2 acked).
fn cycle_command(alarm_id: Uuid, phase: u8) -> Command {
    let kind = match phase % 3 {
        0 => CommandKind::Trigger {
            value: Some("201.5".into()),
            message: Some("pressure above limit on line 4".into()),
        },
        1 => CommandKind::Ack {
            comment: Some("operator on site".into()),
        },
        _ => CommandKind::Rearm,
    };
    Command {
        alarm_id,
        kind,
        actor: "operator-1".into(),
        command_id: Some(Uuid::new_v4()),
        expected_version: None,
    }
}

fn bench_durable_append(c: &mut Criterion, fx: &Fixtures, rt: &tokio::runtime::Runtime) {
    let dir = fx.root.path().join("append/ledger");
    let log: Arc<dyn EventLog> =
        Arc::new(SledLog::open(&dir, &SledOptions::default()).expect("open log"));
    let (ledger, _) =
        Ledger::open(log, LedgerOptions::default(), Arc::new(Metrics::new())).expect("open ledger");
    ledger.start().expect("start writer");
    let max = *APPENDERS.iter().max().unwrap_or(&1);
    // One alarm per appender, each cycled trigger → ack → rearm: every command appends.
    let alarms: Vec<Uuid> = rt.block_on(async {
        let mut ids = Vec::new();
        for i in 0..max {
            let cmd = Command {
                alarm_id: Uuid::now_v7(),
                kind: CommandKind::Create(spec(i)),
                actor: "operator-1".into(),
                command_id: Some(Uuid::new_v4()),
                expected_version: None,
            };
            ids.push(ledger.submit(cmd).await.expect("create").alarm_id);
        }
        ids
    });
    let mut phases = vec![0u8; max];

    let mut g = c.benchmark_group("durable_append");
    g.sample_size(10);
    g.warm_up_time(secs(1.0));
    g.measurement_time(secs(4.0));
    g.throughput(Throughput::Elements(1));
    for &p in &APPENDERS {
        g.bench_function(BenchmarkId::new("appenders", p), |b| {
            b.iter_custom(|iters| {
                let share = |i: usize| iters / p as u64 + u64::from((i as u64) < iters % p as u64);
                rt.block_on(async {
                    let start = Instant::now();
                    let mut set = tokio::task::JoinSet::new();
                    for (i, &alarm) in alarms.iter().enumerate().take(p) {
                        let ledger = ledger.clone();
                        let n = share(i);
                        let mut phase = phases[i];
                        set.spawn(async move {
                            for _ in 0..n {
                                let o = ledger
                                    .submit(cycle_command(alarm, phase))
                                    .await
                                    .expect("durable append");
                                assert!(!o.already && !o.duplicate, "{o:?}");
                                phase = (phase + 1) % 3;
                            }
                            (i, phase)
                        });
                    }
                    while let Some(done) = set.join_next().await {
                        let (i, phase) = done.expect("appender task");
                        phases[i] = phase;
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
    ledger.stop();
}

/// The storage layer alone, without the writer, projection or hashing: batches of 64 prepared
/// events through `SledLog::append_batch` (record, alarm index, command index, flush, fdatasync),
/// then the same records written straight to a sled tree without index keys. The gap between
/// `durable_append/appenders/64` and `store_append/ledger_layout` is the writer's own cost; the gap
/// between the two `store_append` lines is the cost of the two index entries per event.
fn bench_store_append(c: &mut Criterion, fx: &Fixtures) {
    const BATCH: usize = 64;
    let events = fx.events();
    let mut g = c.benchmark_group("store_append");
    g.sample_size(10);
    g.warm_up_time(secs(1.0));
    g.measurement_time(secs(4.0));
    g.throughput(Throughput::Elements(BATCH as u64));
    let log = SledLog::open(
        &fx.root.path().join("store/ledger"),
        &SledOptions::default(),
    )
    .expect("open log");
    let mut next = 0usize;
    g.bench_function(BenchmarkId::new("ledger_layout", BATCH), |b| {
        b.iter(|| {
            if next + BATCH > events.len() {
                panic!("store_append ran past the {} prepared events", events.len());
            }
            log.append_batch(&events[next..next + BATCH])
                .expect("append");
            next += BATCH;
        })
    });
    drop(log);
    let dir = fx.root.path().join("store-raw");
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(SledOptions::default().cache_bytes)
        .open()
        .expect("open sled");
    let tree = db.open_tree("ledger").expect("tree");
    let db_file = std::fs::File::open(dir.join("db")).expect("db file");
    let mut offset = 0u64;
    g.bench_function(BenchmarkId::new("sled_records_only", BATCH), |b| {
        b.iter(|| {
            let mut batch = sled::Batch::default();
            for e in &events[offset as usize % (events.len() - BATCH)..][..BATCH] {
                offset += 1;
                let mut key = [b'e'; 9];
                key[1..].copy_from_slice(&offset.to_be_bytes());
                batch.insert(&key, codec::encode_event(e));
            }
            tree.apply_batch(batch).expect("apply");
            db.flush().expect("flush");
            db_file.sync_data().expect("fdatasync");
        })
    });
    g.finish();
}

/// The disk's physical limit for the durable-append pattern: append 4 KiB, `fdatasync`.
fn bench_disk_raw(c: &mut Criterion, fx: &Fixtures) {
    let path = fx.root.path().join("disk_raw.dat");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .expect("open raw file");
    let block = vec![0x5au8; 4096];
    let mut written = 0u64;
    let mut g = c.benchmark_group("disk_raw");
    g.sample_size(10);
    g.warm_up_time(secs(1.0));
    g.measurement_time(secs(4.0));
    g.throughput(Throughput::Elements(1));
    g.bench_function("write4k_fdatasync", |b| {
        b.iter(|| {
            if written >= 256 << 20 {
                f.set_len(0).expect("truncate");
                std::io::Seek::rewind(&mut f).expect("rewind");
                written = 0;
            }
            f.write_all(&block).expect("write");
            f.sync_data().expect("fdatasync");
            written += block.len() as u64;
        })
    });
    g.finish();
    drop(f);
    let _ = std::fs::remove_file(path);
}

fn main() {
    alarm_ledger::memory::disable_transparent_huge_pages();
    let mut c = Criterion::default().configure_from_args();
    let fx = Fixtures::new();
    let rt = runtime();
    bench_codec(&mut c);
    bench_chain(&mut c);
    bench_projection(&mut c, &fx);
    bench_log_read(&mut c, &fx);
    bench_ledger_open(&mut c, &fx);
    bench_durable_append(&mut c, &fx, &rt);
    bench_store_append(&mut c, &fx);
    bench_disk_raw(&mut c, &fx);
    drop(rt);
    drop(fx);
    c.final_summary();
}
