//! Metrics and logs. OpenTelemetry traces and OTLP export plug in here.

mod logging;
mod metrics;

pub use logging::{LogFormat, init_logging};
pub use metrics::{AtomicHistogram, DecisionLogMetrics, Metrics, SessionMetrics};
