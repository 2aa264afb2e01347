//! Prometheus metrics (prometheus-client: no global registry, renders to a string).
//!
//! One `Metrics` value is built at start-up and shared; every counter that a test or an operator
//! relies on is named in the README.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("alarm_ledger");
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
        Metrics {
            registry,
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
