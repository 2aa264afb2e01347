//! Prometheus metrics (prometheus-client: no global registry, renders to a string).
//!
//! One `Metrics` value is built at start-up and shared; every counter that a test or an operator
//! relies on is named in the README.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabel {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
}

pub struct Metrics {
    registry: Registry,
    pub events_appended: Family<KindLabel, Counter>,
    pub append_latency: Histogram,
    pub batch_size: Histogram,
    pub flush_duration: Histogram,
    pub head_offset: Gauge,
    pub ws_connections: Gauge,
    pub tcp_connections: Gauge,
    pub connections_refused: Family<ModeLabel, Counter>,
    pub subscribers: Family<ModeLabel, Gauge>,
    pub slow_consumer_closes: Counter,
    pub subscriber_lag_fallbacks: Counter,
    pub commands_rejected: Family<CodeLabel, Counter>,
    pub login_failures: Counter,
    pub logins_throttled: Counter,
    pub security_log_failures: Counter,
    pub http_requests: Family<HttpLabel, Counter>,
    pub snapshots_written: Counter,
    pub http_streams_active: Gauge,
    pub http_streams_cut_off: Counter,
    pub storage_failed: Gauge,
    pub integrity_failed: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // The process metrics keep their standard, unprefixed names; ours are `alarm_ledger_*`.
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("alarm_ledger");
        let events_appended = Family::<KindLabel, Counter>::default();
        registry.register(
            "events_appended",
            "Events appended to the log, by kind",
            events_appended.clone(),
        );
        // 50 µs .. ~3.3 s
        let append_latency = Histogram::new(exponential_buckets(0.00005, 2.0, 17));
        registry.register(
            "append_latency_seconds",
            "Time from a command entering the write queue to its durable answer",
            append_latency.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "group_commit_batch_size",
            "Events per group commit (one flush + fdatasync each)",
            batch_size.clone(),
        );
        let flush_duration = Histogram::new(exponential_buckets(0.00005, 2.0, 17));
        registry.register(
            "flush_duration_seconds",
            "Duration of one durable batch write (sled flush + fdatasync)",
            flush_duration.clone(),
        );
        let head_offset = Gauge::default();
        registry.register(
            "head_offset",
            "Offset of the last durable event",
            head_offset.clone(),
        );
        let ws_connections = Gauge::default();
        registry.register(
            "websocket_connections",
            "Open WebSocket connections",
            ws_connections.clone(),
        );
        let tcp_connections = Gauge::default();
        registry.register(
            "tcp_connections",
            "Open client connections (HTTP and WebSocket): those served, under --max-connections, and those being refused",
            tcp_connections.clone(),
        );
        let connections_refused = Family::<ModeLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused at --max-connections, by how (answered = 503 or close 1013, dropped = closed unread)",
            connections_refused.clone(),
        );
        let subscribers = Family::<ModeLabel, Gauge>::default();
        registry.register(
            "subscribers",
            "Active subscriptions, by mode (replay = reading the log, live = following the broadcast)",
            subscribers.clone(),
        );
        let slow_consumer_closes = Counter::default();
        registry.register(
            "slow_consumer_closes",
            "WebSockets closed with 4008 because the client stalled",
            slow_consumer_closes.clone(),
        );
        let subscriber_lag_fallbacks = Counter::default();
        registry.register(
            "subscriber_lag_fallbacks",
            "Live subscriptions that fell behind the broadcast and went back to reading the log",
            subscriber_lag_fallbacks.clone(),
        );
        let commands_rejected = Family::<CodeLabel, Counter>::default();
        registry.register(
            "commands_rejected",
            "Commands answered with an error, by error code",
            commands_rejected.clone(),
        );
        let login_failures = Counter::default();
        registry.register("login_failures", "Failed logins", login_failures.clone());
        let security_log_failures = Counter::default();
        registry.register(
            "security_log_failures",
            "Security-log entries that could not be written (audit reads served anyway)",
            security_log_failures.clone(),
        );
        let logins_throttled = Counter::default();
        registry.register(
            "logins_throttled",
            "Logins refused by the throttle (429)",
            logins_throttled.clone(),
        );
        let http_requests = Family::<HttpLabel, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        let snapshots_written = Counter::default();
        registry.register(
            "projection_snapshots_written",
            "Projection snapshots written",
            snapshots_written.clone(),
        );
        let http_streams_active = Gauge::default();
        registry.register(
            "http_streams_active",
            "Streamed HTTP answers running (/events, /security-log, history; at most 16)",
            http_streams_active.clone(),
        );
        let http_streams_cut_off = Counter::default();
        registry.register(
            "http_streams_cut_off",
            "Streamed HTTP answers cut off because the client took no data within the stall timeout",
            http_streams_cut_off.clone(),
        );
        let storage_failed = Gauge::default();
        registry.register(
            "storage_failed",
            "1 when storage failed and appends are refused until a restart (/healthz answers 503), else 0",
            storage_failed.clone(),
        );
        let integrity_failed = Gauge::default();
        registry.register(
            "integrity_failed",
            "1 when the start-up integrity check found a bad record (/readyz answers 503), else 0",
            integrity_failed.clone(),
        );
        Metrics {
            registry: root,
            events_appended,
            append_latency,
            batch_size,
            flush_duration,
            head_offset,
            ws_connections,
            tcp_connections,
            connections_refused,
            subscribers,
            slow_consumer_closes,
            subscriber_lag_fallbacks,
            commands_rejected,
            login_failures,
            logins_throttled,
            security_log_failures,
            http_requests,
            snapshots_written,
            http_streams_active,
            http_streams_cut_off,
            storage_failed,
            integrity_failed,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn rejected(&self, code: &str) {
        self.commands_rejected
            .get_or_create(&CodeLabel { code: code.into() })
            .inc();
    }

    pub fn subscriber_mode(&self, mode: &str) -> Gauge {
        self.subscribers
            .get_or_create(&ModeLabel { mode: mode.into() })
            .clone()
    }
}

/// Counts something in a gauge for as long as the guard lives (up at `enter`, down on drop, an
/// unwinding task included).
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn enter(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The standard `process_*` metrics of a Prometheus client (the names of client_golang's process
/// collector, so existing dashboards and alerts work): CPU time, resident and virtual memory,
/// open and allowed file descriptors, start time. Read from `/proc/self` at each scrape; where
/// `/proc` cannot be read (not Linux) a metric is left out rather than reported as 0.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What `/proc/self` says about this process, in the units Prometheus wants.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    pub fn read() -> ProcessStats {
        // SAFETY: sysconf takes an integer and returns a value; no memory is touched.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s));
        let mut stats = stat
            .as_deref()
            .map(|s| parse_stat(s, ticks, page, boot))
            .unwrap_or_default();
        stats.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        stats.max_fds = crate::memory::open_files_limit();
        stats
    }
}

/// Parses `/proc/<pid>/stat` (proc(5)): the fields after the command name, which is in
/// parentheses and may itself hold spaces and parentheses, so the split is at the last `)`.
/// `ticks` is `_SC_CLK_TCK`, `page` the page size, `boot` the boot time (`btime` of `/proc/stat`).
pub fn parse_stat(stat: &str, ticks: i64, page: i64, boot: Option<u64>) -> ProcessStats {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return ProcessStats::default();
    };
    // rest[0] is field 3 (state): field n is rest[n - 3].
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let per_tick = (ticks > 0).then(|| 1.0 / ticks as f64);
    ProcessStats {
        cpu_seconds: num(14)
            .zip(num(15))
            .zip(per_tick)
            .map(|((u, s), t)| (u + s) as f64 * t),
        resident_memory_bytes: num(24)
            .zip(u64::try_from(page).ok())
            .map(|(p, size)| p.saturating_mul(size)),
        virtual_memory_bytes: num(23),
        start_time_seconds: num(22)
            .zip(per_tick)
            .zip(boot)
            .map(|((start, t), boot)| boot as f64 + start as f64 * t),
        open_fds: None,
        max_fds: None,
    }
}

/// The `btime` line of `/proc/stat`: the boot time in seconds since the epoch.
pub fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read();
        if let Some(v) = s.cpu_seconds {
            let c = ConstCounter::new(v);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        let gauges: [(&str, &str, Option<f64>); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_memory_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_memory_bytes.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit)",
                s.max_fds.map(|v| v as f64),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
                g.encode(m)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_read_after_the_last_parenthesis() {
        // A command name with a space and a `)` in it; fields 14/15 utime/stime, 22 starttime,
        // 23 vsize, 24 rss (proc(5)).
        let stat = "4242 (we) ird) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 12 0 \
                    1000 7340032 300 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(stat, 100, 4096, Some(1_700_000_000));
        assert_eq!(s.cpu_seconds, Some(3.0));
        assert_eq!(s.virtual_memory_bytes, Some(7_340_032));
        assert_eq!(s.resident_memory_bytes, Some(300 * 4096));
        assert_eq!(s.start_time_seconds, Some(1_700_000_010.0));
        // Unparsable or cut short: nothing rather than zeros.
        assert_eq!(
            parse_stat("garbage", 100, 4096, None),
            ProcessStats::default()
        );
        let short = parse_stat("1 (x) S 1 2", 100, 4096, Some(1));
        assert_eq!(short, ProcessStats::default());
        // Without the boot time, no start time; without a tick rate, no CPU time.
        assert_eq!(parse_stat(stat, 100, 4096, None).start_time_seconds, None);
        assert_eq!(parse_stat(stat, 0, 4096, Some(1)).cpu_seconds, None);
    }

    #[test]
    fn boot_time_comes_from_the_btime_line() {
        let proc_stat = "cpu  1 2 3\nintr 5\nbtime 1765152000\nprocesses 9\n";
        assert_eq!(boot_time(proc_stat), Some(1_765_152_000));
        assert_eq!(boot_time("cpu 1\n"), None);
    }

    #[test]
    fn the_process_metrics_are_unprefixed_and_ours_are_prefixed() {
        let text = Metrics::new().render();
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
            assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
        }
        assert!(text.contains("\nalarm_ledger_head_offset 0\n"), "{text}");
        assert!(!text.contains("alarm_ledger_process_"), "{text}");
    }
}
