//! The operations HTTP listener: `/metrics` (Prometheus text), `/healthz`
//! (the process is up) and `/readyz` (a bundle is active and the sidecar is
//! not shutting down).

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
        .route("/healthz", get(|| async { "ok\n" }))
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

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
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
