//! The composition root of `arbiter serve`: builds every part from the
//! configuration, serves, and owns the shutdown order.
//!
//! Shutdown order (SIGTERM or SIGINT):
//! 1. readiness goes false (`/readyz` 503, gRPC health NOT_SERVING), so
//!    callers and load balancers stop sending new work;
//! 2. both listeners stop accepting and in-flight calls drain, bounded by
//!    `server.shutdown_grace_secs`;
//! 3. the decision log writer spools what is queued, the shipper gets a few
//!    seconds to deliver it (the rest stays in the spool for the next start),
//!    and the process exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::grpc::AuthorizerService;
use crate::api::http::{OpsState, router};
use crate::api::pb::v1::authorizer_server::AuthorizerServer;
use crate::api::pb::v1::tool_access_server::ToolAccessServer;
use crate::api::tools::ToolService;
use crate::api::{Limits, pb};
use crate::bundle::keys::{KeyError, TrustedKeys};
use crate::bundle::{ArchiveLimits, Bundle, BundleError, VerifyError};
use crate::config::Config;
use crate::controlplane::BundleClient;
use crate::decision::{CacheSettings, Decider, DecisionSink};
use crate::decision_log;
use crate::distribution::{self, Activator, FailMode, Freshness, PollSettings};
use crate::policy::{CompileError, CompileOptions, Engine};
use crate::sessions::feed::Link;
use crate::sessions::{Limits as SessionLimits, Sessions};
use crate::telemetry::Metrics;

/// Why the sidecar could not start or stopped uncleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    BundleRead(#[from] BundleError),
    #[error(transparent)]
    BundleInvalid(#[from] CompileError),
    #[error("bundle `{path}` refused: {source}")]
    BundleRefused {
        path: std::path::PathBuf,
        source: VerifyError,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("bundle source: {0}")]
    Source(String),
    #[error("cannot listen on `{addr}`: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(String),
    #[error("cannot open the decision log spool `{dir}`: {source}")]
    DecisionLog {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Reads and compiles a bundle: a directory as it is, an archive only once
/// its signature (by one of `trusted`) and every digest check out.
pub fn load_bundle(
    path: &std::path::Path,
    trusted: &TrustedKeys,
    options: CompileOptions,
) -> Result<Engine, ServeError> {
    if path.is_dir() {
        return Ok(Engine::compile(&Bundle::read_dir(path)?, options)?);
    }
    let bytes = std::fs::read(path).map_err(|source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let verified = crate::bundle::archive::verify(&bytes, trusted, &ArchiveLimits::default(), path)
        .map_err(|source| ServeError::BundleRefused {
            path: path.to_path_buf(),
            source,
        })?;
    tracing::info!(
        signer = verified.signer(),
        digest = verified.digest(),
        "bundle archive verified"
    );
    Ok(Engine::compile(verified.bundle(), options)?)
}

/// Runs the sidecar until SIGTERM/SIGINT, then drains.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    serve_until(config, shutdown_signal()).await
}

/// Runs the sidecar until `shutdown` resolves, then drains.
pub async fn serve_until(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new());
    let cache = if config.cache.max_entries == 0 {
        CacheSettings::OFF
    } else {
        CacheSettings {
            max_entries: config.cache.max_entries,
            ttl: Duration::from_secs(config.cache.ttl_secs),
        }
    };
    let trail = if config.decision_log_on() {
        let d = &config.decision_log;
        let settings = decision_log::Settings {
            spool_dir: d.spool_dir.clone(),
            durability: d.durability,
            overflow: d.overflow,
            max_spool_bytes: d.max_spool_bytes,
            segment_bytes: d.segment_bytes,
            block_timeout: Duration::from_millis(d.block_timeout_ms),
            queue_capacity: d.queue_capacity,
            batch_max: d.batch_max_records,
            batch_interval: Duration::from_millis(d.batch_interval_ms),
            fsync: d.fsync,
            copy_to: d.file.clone(),
            otlp_endpoint: d.otlp_endpoint.clone(),
        };
        let started =
            decision_log::start(settings, metrics.decision_log.clone()).map_err(|source| {
                ServeError::DecisionLog {
                    dir: d.spool_dir.clone(),
                    source,
                }
            })?;
        Some(started)
    } else {
        tracing::info!(
            "decision log off: no control plane or file to send records to (see [decision_log])"
        );
        None
    };
    let sink = trail
        .as_ref()
        .map(|(sink, _)| sink.clone() as Arc<dyn DecisionSink>);
    // Journey-time state follows the control plane, when there is one.
    let journeys = match (&config.control_plane.url, config.sessions.enabled) {
        (Some(url), true) => {
            let s = &config.sessions;
            let link = Link::new(
                url,
                config.control_plane.ca_file.as_deref(),
                config.control_plane.sidecar_token.as_deref(),
                Duration::from_millis(s.approval_timeout_ms),
            )
            .map_err(|e| ServeError::Source(e.to_string()))?;
            let sessions = Arc::new(Sessions::new(
                SessionLimits {
                    max_sessions: s.max_sessions,
                    max_recent: s.max_recent_decisions,
                    max_remembered_bytes: s.max_remembered_bytes,
                    max_signal_age: Duration::from_secs(s.max_signal_age_secs),
                    stale_signals: s.stale_signals,
                },
                metrics.sessions.clone(),
            ));
            Some((link, sessions))
        }
        _ => None,
    };
    let mut decider = Decider::new(cache, metrics.clone(), sink);
    if let Some((_, sessions)) = &journeys {
        decider = decider.with_sessions(sessions.clone());
    }
    let decider = Arc::new(decider);
    // The shipper outlives the listeners: it gets its own stop, after the
    // writer has spooled the last record.
    let (ship_stop, ship_stop_rx) = watch::channel(false);
    let shipper = trail.as_ref().and_then(|(_, running)| {
        let url = config.decision_log_destination()?;
        let settings = decision_log::shipper::ShipSettings {
            url: url.to_owned(),
            ca_file: config.control_plane.ca_file.clone(),
            token: config.control_plane.sidecar_token.clone(),
            batch_max: config.decision_log.batch_max_records,
            window: 4,
            interval: Duration::from_millis(config.decision_log.ship_interval_ms),
            connect_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(config.control_plane.max_backoff_secs.clamp(1, 30)),
            drain_for: Duration::from_millis(config.decision_log.drain_ms),
        };
        Some(tokio::spawn(decision_log::shipper::run(
            settings,
            running,
            ship_stop_rx,
        )))
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, &decider, ServingStatus::NotServing).await;

    let trusted = TrustedKeys::load(&config.bundle.trusted_keys)?;
    let options = CompileOptions {
        index: config.policy.index,
    };
    // Validated config names either a local bundle or one to pull.
    let mut puller = None;
    let mut freshness = None;
    if let Some(path) = &config.bundle.path {
        let engine = load_bundle(path, &trusted, options)?;
        tracing::info!(
            bundle = %engine.name(),
            revision = %engine.revision(),
            policies = engine.policy_count(),
            path = %path.display(),
            "bundle activated"
        );
        decider.activate(engine);
    } else if let Some(url) = config.control_plane.bundle_url() {
        let cp = &config.control_plane;
        let limits = ArchiveLimits::default();
        let client = BundleClient::new(
            &url,
            Duration::from_millis(cp.fetch_timeout_ms),
            limits.max_archive_bytes as usize,
            cp.ca_file.as_deref(),
        )
        .and_then(|c| c.with_token(config.bundle_token()))
        .map_err(|e| ServeError::Source(e.to_string()))?;
        let fresh = Arc::new(Freshness::new(
            Duration::from_secs(cp.max_bundle_age_secs),
            cp.fail_mode,
        ));
        freshness = (cp.max_bundle_age_secs > 0).then(|| fresh.clone());
        let activator = Arc::new(Activator {
            freshness: fresh,
            decider: decider.clone(),
            metrics: metrics.clone(),
            trusted,
            limits,
            options,
            store: cp.cache_dir.join("last-known-good.tar.gz"),
        });
        // Serve the last good bundle at once, even while the source is down.
        let held = activator.load_last_known_good();
        let settings = PollSettings {
            interval: Duration::from_millis(cp.poll_interval_ms),
            long_poll: (cp.long_poll_secs > 0).then(|| Duration::from_secs(cp.long_poll_secs)),
            max_backoff: Duration::from_secs(cp.max_backoff_secs.max(1)),
        };
        tracing::info!(%url, "pulling the bundle");
        puller = Some((client, activator, settings, held));
    }

    let grpc_listener = bind(config.server.grpc_addr).await?;
    let http_listener = bind(config.server.http_addr).await?;
    let grpc_addr = local(&grpc_listener, config.server.grpc_addr);
    let http_addr = local(&http_listener, config.server.http_addr);
    tracing::info!(%grpc_addr, %http_addr, "arbiter listening");

    let limits = Limits {
        max_request_bytes: config.limits.max_request_bytes,
        max_batch_items: config.limits.max_batch_items,
        max_depth: config.limits.max_depth,
    };
    let authorizer = AuthorizerServer::new(AuthorizerService::new(decider.clone(), limits))
        // The transport's hard cap; messages between the configured limit
        // and this get a clear INVALID_ARGUMENT from the service.
        .max_decoding_message_size(limits.max_request_bytes.saturating_mul(4));
    let tools = ToolAccessServer::new(ToolService::new(
        decider.clone(),
        limits,
        config.limits.max_argument_bytes,
        journeys.as_ref().map(|(link, _)| link.clone()),
    ))
    .max_decoding_message_size(limits.max_request_bytes.saturating_mul(4));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::AUTHORIZER_DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let draining = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some((_, sessions)) = &journeys {
        let (sessions, wait) = (
            sessions.clone(),
            Duration::from_millis(config.sessions.startup_wait_ms),
        );
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if !sessions.ready() {
                tracing::warn!(
                    wait_ms = wait.as_millis() as u64,
                    "the control plane's signal feed did not catch up in time; deciding without session signals until it does"
                );
                sessions.set_ready();
            }
        });
    }
    if let Some((_, sessions)) = &journeys {
        tokio::spawn(crate::sessions::feed::watch_age(
            sessions.clone(),
            stop_rx.clone(),
        ));
    }
    let follower = journeys.map(|(link, sessions)| {
        let instance = trail
            .as_ref()
            .map(|(_, running)| running.instance.clone())
            .unwrap_or_default();
        tokio::spawn(crate::sessions::feed::follow(
            link,
            sessions,
            decider.clone(),
            instance,
            Duration::from_secs(config.control_plane.max_backoff_secs.clamp(1, 30)),
            stop_rx.clone(),
        ))
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    // The gRPC stack, outermost first:
    let grpc = Server::builder()
        // cap the calls one connection can have in flight, at the HTTP/2
        // layer (a tower concurrency limit costs a semaphore per call).
        // Deadlines come from the caller's `grpc-timeout`: a decision never
        // waits on I/O, so a server-wide timer per call would be pure cost.
        .max_concurrent_streams(
            u32::try_from(config.limits.max_concurrent_calls).unwrap_or(u32::MAX),
        )
        // bound a call's life so a stuck client cannot hold resources.
        // cap the work one connection can queue on the runtime.
        .add_service(health_service)
        .add_service(reflection)
        .add_service(authorizer)
        .add_service(tools)
        .serve_with_incoming_shutdown(
            // Decisions are small request/response pairs: send them at once (the
            // builder's `tcp_nodelay` does not apply to a listener passed in).
            TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );

    let ops = router(OpsState {
        decider: decider.clone(),
        metrics: metrics.clone(),
        draining: draining.clone(),
        freshness: freshness.clone(),
    });
    let http = axum::serve(http_listener, ops).with_graceful_shutdown(stopped(stop_rx.clone()));

    // Health follows activations: NOT_SERVING until a bundle is active.
    let mut activations = decider.subscribe();
    let follower_health = health.clone();
    let follower_draining = draining.clone();
    let follower_decider = decider.clone();
    tokio::spawn(async move {
        loop {
            let active = activations.borrow_and_update().is_some();
            if active && !follower_draining.load(Ordering::Relaxed) {
                set_health(&follower_health, &follower_decider, ServingStatus::Serving).await;
            }
            if activations.changed().await.is_err() {
                return;
            }
        }
    });
    // The decision log failing for good turns gRPC health too (the HTTP
    // probes read it directly).
    if trail.is_some() {
        let (health, decider) = (health.clone(), decider.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if decider.sink_failure().is_some() {
                    set_health(&health, &decider, ServingStatus::NotServing).await;
                    return;
                }
            }
        });
    }
    if let Some(f) = freshness {
        tokio::spawn(watch_freshness(
            f,
            decider.clone(),
            metrics.clone(),
            health.clone(),
            stop_rx.clone(),
        ));
    }
    let poll_task = puller.map(|(client, activator, settings, held)| {
        tokio::spawn(distribution::poll(
            client,
            activator,
            settings,
            held,
            stop_rx.clone(),
        ))
    });

    let grpc_task = tokio::spawn(grpc);
    let http_task = tokio::spawn(async move { http.await });

    shutdown.await;
    tracing::info!("shutting down: no longer ready, draining in-flight calls");
    draining.store(true, Ordering::Relaxed);
    set_health(&health, &decider, ServingStatus::NotServing).await;
    let _ = stop_tx.send(true);
    if let Some(task) = poll_task {
        let _ = task.await;
    }
    if let Some(task) = follower {
        let _ = task.await;
    }

    let grace = config.shutdown_grace();
    let drained = tokio::time::timeout(grace, async {
        let grpc = grpc_task.await;
        let http = http_task.await;
        (grpc, http)
    })
    .await;
    let outcome = match drained {
        Ok((Ok(Err(e)), _)) => Err(e.into()),
        Ok((_, Ok(Err(e)))) => Err(ServeError::Http(e)),
        Ok(_) => Ok(()),
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "calls still in flight after the grace period; exiting"
            );
            Ok(())
        }
    };
    // Whatever happened to the listeners, spool every record already made.
    if let Some((_, running)) = trail {
        close_trail(running, grace).await;
        let _ = ship_stop.send(true);
        if let Some(task) = shipper {
            let _ = task.await;
        }
    }
    if outcome.is_ok() {
        tracing::info!("drained; bye");
    }
    outcome
}

/// Closes the decision log, waiting as long as the queue is being spooled;
/// a disk that makes no progress for `quiet` (at least 2 s) does not hold
/// the exit (what it holds up is lost with the process, as with a kill; what
/// is spooled is resent on restart).
async fn close_trail(running: crate::decision_log::Running, quiet: Duration) {
    let quiet = quiet.max(Duration::from_secs(2));
    let mut spooled = running.spooled.clone();
    let close = running.close();
    tokio::pin!(close);
    loop {
        tokio::select! {
            () = &mut close => return,
            moved = tokio::time::timeout(quiet, spooled.changed()) => {
                if !matches!(moved, Ok(Ok(()))) {
                    break;
                }
            }
        }
    }
    if tokio::time::timeout(quiet, close).await.is_err() {
        tracing::error!(
            quiet_secs = quiet.as_secs(),
            "decision log: the spool writer made no progress; exiting without the records it still holds"
        );
    }
}

/// Re-checks freshness every second and applies the fail mode on a change.
async fn watch_freshness(
    freshness: Arc<Freshness>,
    decider: Arc<Decider>,
    metrics: Arc<Metrics>,
    health: HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Some(stale) = freshness.tick() {
            let deny = stale && freshness.mode == FailMode::DenyAll;
            decider.set_deny_all(deny);
            if stale {
                tracing::warn!(mode = ?freshness.mode, "{}", freshness.describe());
            } else {
                tracing::info!("bundle confirmed current again");
            }
            if freshness.mode == FailMode::DenyAll && decider.snapshot().is_some() {
                let status = if deny {
                    ServingStatus::NotServing
                } else {
                    ServingStatus::Serving
                };
                set_health(&health, &decider, status).await;
            }
        }
        metrics.freshness(freshness.is_stale(), freshness.age());
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = freshness.confirmed_now.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Sets the status of the whole server (`""`) and of the Authorizer service;
/// never SERVING once the decision log can no longer record (every decision
/// is refused then).
async fn set_health(health: &HealthReporter, decider: &Decider, status: ServingStatus) {
    let status = match decider.sink_failure() {
        Some(_) => ServingStatus::NotServing,
        None => status,
    };
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <AuthorizerServer<AuthorizerService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

fn local(l: &TcpListener, asked: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(asked)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::CacheSettings;
    use crate::decision_log::tests::Failed;
    use tonic_health::pb::health_check_response::ServingStatus as Reported;
    use tonic_health::pb::{HealthCheckRequest, health_server::Health};

    async fn reported(reporter: &HealthReporter) -> i32 {
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        service
            .check(request)
            .await
            .expect("known")
            .into_inner()
            .status
    }

    /// A grace period of zero still spools everything queued at shutdown:
    /// only a writer that makes no progress is left behind.
    #[tokio::test]
    async fn closing_the_trail_with_no_grace_still_spools_the_queue() {
        let dir = tempfile::tempdir().expect("tmp");
        let settings = crate::decision_log::Settings {
            spool_dir: dir.path().join("spool"),
            durability: crate::decision_log::Durability::Buffered,
            overflow: crate::decision_log::Overflow::Block,
            max_spool_bytes: 1 << 30,
            segment_bytes: 1 << 20,
            block_timeout: Duration::from_secs(1),
            queue_capacity: 4096,
            batch_max: 64,
            batch_interval: Duration::from_millis(10),
            fsync: true,
            copy_to: None,
            otlp_endpoint: None,
        };
        let (sink, running) =
            crate::decision_log::start(settings, Default::default()).expect("starts");
        let spooled = running.spooled.clone();
        for _ in 0..2000 {
            let entry = crate::decision_log::tests::entry();
            assert!(sink.record(entry).settle().await.is_ok());
        }
        close_trail(running, Duration::ZERO).await;
        assert_eq!(*spooled.borrow(), 2000);
    }

    #[tokio::test]
    async fn grpc_health_is_never_serving_once_the_decision_log_failed() {
        let metrics = Arc::new(Metrics::new());
        let healthy = Decider::new(CacheSettings::OFF, metrics.clone(), None);
        let failed = Decider::new(CacheSettings::OFF, metrics, Some(Arc::new(Failed)));
        let (reporter, _) = tonic_health::server::health_reporter();
        set_health(&reporter, &healthy, ServingStatus::Serving).await;
        assert_eq!(reported(&reporter).await, Reported::Serving as i32);
        set_health(&reporter, &failed, ServingStatus::Serving).await;
        assert_eq!(reported(&reporter).await, Reported::NotServing as i32);
    }
}
