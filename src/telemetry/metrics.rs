//! Prometheus metrics. Handles are resolved once at start so recording on the
//! decision path is a few atomic adds, never a map lookup or a lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::decision::Outcome;

/// Latency bucket bounds in seconds: decisions take microseconds, so the
/// buckets start at 5 µs.
const LATENCY_BOUNDS: [f64; 14] = [
    5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 100e-3, 1.0,
];

/// A histogram whose observations are atomic adds (prometheus-client's own
/// takes a mutex per observation).
#[derive(Debug, Default, Clone)]
pub struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug, Default)]
struct HistogramCells {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0
            .sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.0.buckets.len());
        for (i, b) in self.0.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            buckets.push((
                LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::MAX),
                cumulative,
            ));
        }
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            sum, cumulative, &buckets, None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BundleLabel {
    bundle: String,
    revision: String,
}

/// The decision trail's metrics, shared by its sink, writer and shipper.
#[derive(Clone, Debug, Default)]
pub struct DecisionLogMetrics {
    pub queued: Gauge,
    pub spool_bytes: Gauge,
    pub spooled: Counter,
    pub shipped: Counter,
    pub acknowledged: Counter,
    pub dropped: Counter,
    pub refused: Counter,
    pub chain_breaks: Counter,
    pub otlp_exported: Counter,
    pub otlp_dropped: Counter,
    /// Time to append one batch to the spool, its fsync included.
    pub spool_write: AtomicHistogram,
}

impl DecisionLogMetrics {
    fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("decision_log");
        sub.register(
            "queued_records",
            "Records waiting in the in-memory queue",
            self.queued.clone(),
        );
        sub.register(
            "spool_bytes",
            "Bytes in the disk spool (not yet acknowledged, or the newest segment)",
            self.spool_bytes.clone(),
        );
        sub.register(
            "spooled_records",
            "Records written to the spool",
            self.spooled.clone(),
        );
        sub.register(
            "shipped_records",
            "Records sent to the control plane (resends included)",
            self.shipped.clone(),
        );
        sub.register(
            "acknowledged_records",
            "Records the control plane acknowledged as stored",
            self.acknowledged.clone(),
        );
        sub.register(
            "dropped_records",
            "Records lost to the `drop` overflow policy (0 under the default `block`)",
            self.dropped.clone(),
        );
        sub.register(
            "refused_decisions",
            "Decisions refused because their record could not be kept (in time, or at all once the writer failed)",
            self.refused.clone(),
        );
        sub.register(
            "otlp_exported_records",
            "Records exported through OTLP (the optional copy)",
            self.otlp_exported.clone(),
        );
        sub.register(
            "otlp_dropped_records",
            "Records the OTLP copy could not deliver (the spool and control plane still hold them)",
            self.otlp_dropped.clone(),
        );
        sub.register(
            "spool_write_seconds",
            "Time to append one batch to the spool, its fsync included (a slow disk shows here first)",
            self.spool_write.clone(),
        );
        sub.register(
            "chain_breaks",
            "Chain breaks the control plane reported on receipt",
            self.chain_breaks.clone(),
        );
    }
}

/// Journey-time state: signals followed from the control plane.
#[derive(Debug, Clone, Default)]
pub struct SessionMetrics {
    pub signals_applied: Counter,
    pub held: Gauge,
    pub evicted: Counter,
    pub feed_position: Gauge,
    pub remembered_bytes: Gauge,
    pub signals_age: Gauge,
}

impl SessionMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "session_signals_applied",
            "Session signals applied from the control plane's feed",
            self.signals_applied.clone(),
        );
        registry.register(
            "sessions_held",
            "Sessions and subjects with state held in memory",
            self.held.clone(),
        );
        registry.register(
            "sessions_evicted",
            "Sessions or subjects dropped because the memory budget was full",
            self.evicted.clone(),
        );
        registry.register(
            "session_signals_age_seconds",
            "Seconds the control plane's signal feed has been down (0 while live)",
            self.signals_age.clone(),
        );
        registry.register(
            "sessions_remembered_bytes",
            "About how many bytes the requests remembered for WatchSession take",
            self.remembered_bytes.clone(),
        );
        registry.register(
            "session_feed_position",
            "Feed position applied (where a reconnect resumes)",
            self.feed_position.clone(),
        );
    }
}

/// Every metric the sidecar exports.
pub struct Metrics {
    pub decision_log: DecisionLogMetrics,
    pub sessions: SessionMetrics,
    registry: Registry,
    by_outcome: [Counter; 4],
    rejected: Counter,
    latency: AtomicHistogram,
    cache_hits: Counter,
    cache_misses: Counter,
    bundle: Family<BundleLabel, Gauge>,
    policies: Gauge,
    fetch_failures: Counter,
    bundles_rejected: Counter,
    last_fetch: Gauge<f64, std::sync::atomic::AtomicU64>,
    activation_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    stale: Gauge,
    bundle_age: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("arbiter");
        let decisions = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "decisions",
            "Decisions answered, by outcome",
            decisions.clone(),
        );
        let by_outcome = Outcome::ALL.map(|o| {
            decisions
                .get_or_create(&OutcomeLabel {
                    outcome: o.as_str(),
                })
                .clone()
        });
        let rejected = Counter::default();
        registry.register(
            "requests_rejected",
            "Requests rejected as invalid before a decision",
            rejected.clone(),
        );
        let latency = AtomicHistogram::default();
        registry.register(
            "decision_duration_seconds",
            "Time to decide, from request conversion to outcome",
            latency.clone(),
        );
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        registry.register(
            "decision_cache_hits",
            "Decisions answered from the cache",
            cache_hits.clone(),
        );
        registry.register(
            "decision_cache_misses",
            "Decisions the cache did not hold",
            cache_misses.clone(),
        );
        let bundle = Family::<BundleLabel, Gauge>::default();
        registry.register(
            "bundle_active",
            "1 for the bundle revision answering decisions",
            bundle.clone(),
        );
        let policies = Gauge::default();
        registry.register(
            "bundle_policies",
            "Policies in the active bundle",
            policies.clone(),
        );
        let fetch_failures = Counter::default();
        registry.register(
            "bundle_fetch_failures",
            "Bundle fetches that failed",
            fetch_failures.clone(),
        );
        let bundles_rejected = Counter::default();
        registry.register(
            "bundle_rejected",
            "Bundles refused by verification, validation or their tests (the previous one stayed active)",
            bundles_rejected.clone(),
        );
        let last_fetch = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "bundle_last_fetch_success_timestamp_seconds",
            "When the bundle source last answered (Unix time)",
            last_fetch.clone(),
        );
        let activation_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "bundle_activation_duration_seconds",
            "Time the last activation took: verify, compile, test, swap",
            activation_seconds.clone(),
        );
        let stale = Gauge::default();
        registry.register(
            "bundle_stale",
            "1 while the active bundle is older than max_bundle_age without confirmation",
            stale.clone(),
        );
        let bundle_age = Gauge::default();
        registry.register(
            "bundle_age_seconds",
            "Seconds since the bundle source last confirmed the active bundle current (-1: never)",
            bundle_age.clone(),
        );
        let decision_log = DecisionLogMetrics::default();
        decision_log.register(&mut registry);
        let sessions = SessionMetrics::default();
        sessions.register(&mut registry);
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            decision_log,
            sessions,
            registry,
            by_outcome,
            rejected,
            latency,
            cache_hits,
            cache_misses,
            bundle,
            policies,
            fetch_failures,
            bundles_rejected,
            last_fetch,
            activation_seconds,
            stale,
            bundle_age,
        }
    }

    pub fn freshness(&self, stale: bool, age: Option<Duration>) {
        self.stale.set(i64::from(stale));
        self.bundle_age
            .set(age.map_or(-1, |a| i64::try_from(a.as_secs()).unwrap_or(i64::MAX)));
    }

    pub fn fetch_succeeded(&self, unix_secs: f64) {
        self.last_fetch.set(unix_secs);
    }

    pub fn fetch_failed(&self) {
        self.fetch_failures.inc();
    }

    pub fn bundle_rejected(&self) {
        self.bundles_rejected.inc();
    }

    pub fn activation_took(&self, d: Duration) {
        self.activation_seconds.set(d.as_secs_f64());
    }

    pub fn decided(&self, outcome: Outcome, took: Duration) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(1);
        self.by_outcome[i].inc();
        self.latency.observe(took);
    }

    pub fn rejected(&self) {
        self.rejected.inc();
    }

    pub fn cache(&self, hit: bool) {
        if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        }
        .inc();
    }

    pub fn bundle_activated(&self, name: &str, revision: &str, policies: usize) {
        self.bundle.clear();
        self.bundle
            .get_or_create(&BundleLabel {
                bundle: name.to_owned(),
                revision: revision.to_owned(),
            })
            .set(1);
        self.policies.set(policies as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
