//! The operations HTTP listener: `/metrics` (Prometheus text), `/healthz`
//! (the process is up and its decision log can still record) and `/readyz`
//! (that too, a bundle is active, and the sidecar is not shutting down).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::decision::Decider;
use crate::distribution::{FailMode, Freshness};
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct OpsState {
    pub decider: Arc<Decider>,
    pub metrics: Arc<Metrics>,
    /// Set when shutdown begins, so load balancers stop sending work first.
    pub draining: Arc<AtomicBool>,
    /// Present when the bundle is pulled: staleness shows in readiness.
    pub freshness: Option<Arc<Freshness>>,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<OpsState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// Liveness: fails only for what a restart mends (the decision log's writer
/// gone), so the kubelet restarts the sidecar instead of it refusing every
/// decision.
async fn healthz(State(s): State<OpsState>) -> impl IntoResponse {
    match s.decider.sink_failure() {
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        None => (StatusCode::OK, "ok\n".to_owned()),
    }
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    if let Some(why) = s.decider.sink_failure() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    }
    if s.draining.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_owned(),
        );
    }
    if s.decider.sessions().is_some_and(|x| !x.ready()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "session signals not loaded yet\n".to_owned(),
        );
    }
    let stale = s.freshness.as_ref().filter(|f| f.is_stale());
    match s.decider.snapshot() {
        Some(_) if stale.is_some_and(|f| f.mode == FailMode::DenyAll) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stale, denying every decision: {}\n",
                stale.map(|f| f.describe()).unwrap_or_default()
            ),
        ),
        Some(active) => (
            StatusCode::OK,
            format!(
                "ready: bundle {} revision {}{}\n",
                active.engine.name(),
                active.engine.revision(),
                stale
                    .map(|f| format!(" (stale, still serving: {})", f.describe()))
                    .unwrap_or_default()
            ),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no bundle active\n".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{CacheSettings, DecisionSink};
    use crate::decision_log::tests::Failed;

    fn state(sink: Option<Arc<dyn DecisionSink>>) -> OpsState {
        let metrics = Arc::new(Metrics::new());
        OpsState {
            decider: Arc::new(Decider::new(CacheSettings::OFF, metrics.clone(), sink)),
            metrics,
            draining: Arc::new(AtomicBool::new(false)),
            freshness: None,
        }
    }

    #[tokio::test]
    async fn a_failed_decision_log_fails_liveness_and_readiness() {
        let live = healthz(State(state(None))).await.into_response();
        assert_eq!(live.status(), StatusCode::OK);
        let failed = state(Some(Arc::new(Failed)));
        let live = healthz(State(failed.clone())).await.into_response();
        assert_eq!(live.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(live.into_body(), 1024)
            .await
            .expect("body");
        assert!(String::from_utf8_lossy(&body).contains("spool writer failed"));
        let ready = readyz(State(failed)).await.into_response();
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
