//! `arbiter control-plane`: the reference control plane. It stores bundles by
//! name and revision (SQLite), serves the active one to sidecars with an ETag
//! and long polling, and accepts publishes and rollbacks from operators.
//!
//! ```text
//! PUT  /bundles/{name}            publish (bearer token; signature, policies and tests checked)
//! GET  /bundles/{name}            the active archive; ETag; If-None-Match → 304;
//!                                 `Prefer: wait=N` holds a 304 up to N s (max 60) for a new revision
//! GET  /bundles/{name}/revisions  every stored revision, newest first
//! POST /bundles/{name}/rollback   {"revision": "..."} (bearer token)
//! GET  /decisions?since=&until=&subject=&resource=&outcome=&policy=&instance=&limit=
//! GET  /decisions/{id}             one record, with the text of its deciding policies
//! GET  /decisions/verify?instance= walk each stored chain from seq 1
//! GET  /decisions/export?instance= the chained NDJSON lines (all /decisions: bearer token)
//! POST /signals                    {"type", "session_id"|"subject", "value"} (bearer token)
//! GET  /approvals?state=           approval requests, newest first (bearer token)
//! GET  /approvals/{id}
//! POST /approvals/{id}/approve     {"by": "..."}; /deny likewise (bearer token)
//! GET  /healthz, /metrics
//! gRPC arbiter.v1.DecisionLog/Ship sidecars stream decision records (same port, HTTP/2)
//! gRPC arbiter.v1.Sessions/*       sidecars follow signals and approvals, file and spend approvals
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use super::journeys::{JourneyError, Journeys, SessionsService, Signal};
use super::store::{Put, Store, StoreError};
use super::trail::{DecisionLogService, DecisionStore, Filter, TrailError};
use crate::api::pb::v1::decision_log_server::DecisionLogServer;
use crate::api::pb::v1::sessions_server::SessionsServer;
use crate::bundle::keys::TrustedKeys;
use crate::bundle::{ArchiveLimits, archive};
use crate::policy::{CompileOptions, Engine};
use crate::policytest;

/// The longest a long poll is held.
const MAX_WAIT: Duration = Duration::from_secs(60);

pub struct Settings {
    pub addr: SocketAddr,
    pub db: PathBuf,
    pub trusted: TrustedKeys,
    /// Bearer token required to publish and roll back.
    pub token: String,
    pub limits: ArchiveLimits,
    /// Certificate chain and private key (PEM): serve HTTPS instead of HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How long an approval request stays open (and a grant usable).
    pub approval_ttl: Duration,
    /// Token sidecars must present on the gRPC services, if any.
    pub sidecar_token: Option<String>,
    /// How long decision records are kept (`None`: forever).
    pub retention: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on `{addr}`: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control plane failed: {0}")]
    Serve(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("decision store: {0}")]
    Decisions(String),
}

/// A rustls acceptor from PEM files (ring provider, safe default versions).
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        ServerError::Tls(format!("`{}`: {e}", what.display()))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ServerError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut config = config;
    // gRPC (decision records) needs HTTP/2; operators' tools may use HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` over TLS until `shutdown`: each accepted connection is
/// handshaken, then handed to hyper.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted.map_err(ServerError::Serve)?,
            () = &mut shutdown => return Ok(()),
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

/// The active revision of one bundle, as served.
struct Published {
    revision: String,
    etag: String,
    bytes: Bytes,
}

struct AppState {
    store: Store,
    decisions: Arc<DecisionStore>,
    journeys: Arc<Journeys>,
    trusted: TrustedKeys,
    token: String,
    /// Sidecars' credential: with one, bundle reads need it (or `token`).
    sidecar_token: Option<String>,
    limits: ArchiveLimits,
    /// Per bundle name, the active revision; long polls wait on changes.
    active: Mutex<HashMap<String, watch::Sender<Option<Arc<Published>>>>>,
}

impl AppState {
    fn channel(&self, name: &str) -> watch::Sender<Option<Arc<Published>>> {
        let mut map = self.active.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_owned())
            .or_insert_with(|| watch::Sender::new(None))
            .clone()
    }

    fn set(&self, name: &str, revision: String, digest: &str, bytes: Vec<u8>) {
        self.channel(name).send_replace(Some(Arc::new(Published {
            revision,
            etag: format!("\"{digest}\""),
            bytes: Bytes::from(bytes),
        })));
    }

    /// Policy text by `@id` for a stored revision (empty if it is not stored).
    fn policy_texts(&self, name: &str, revision: &str) -> HashMap<String, String> {
        let Ok(Some(bytes)) = self.store.archive(name, revision) else {
            return HashMap::new();
        };
        match archive::verify(
            &bytes,
            &self.trusted,
            &self.limits,
            std::path::Path::new("stored"),
        ) {
            Ok(verified) => crate::policy::policy_texts(verified.bundle()),
            Err(_) => HashMap::new(),
        }
    }

    /// The operator's token.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        bearer(headers).is_some_and(|given| same_secret(given, &self.token))
    }

    /// Bundles are signed, so this guards their confidentiality: open when
    /// sidecars have no credential (as the gRPC services are), else theirs
    /// or the operator's.
    fn may_read_bundles(&self, headers: &HeaderMap) -> bool {
        match &self.sidecar_token {
            None => true,
            Some(sidecars) => {
                bearer(headers).is_some_and(|given| same_secret(given, sidecars))
                    || self.authorized(headers)
            }
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Compares a given credential with the one wanted in constant time (the
/// length leaks nothing useful).
fn same_secret(given: &str, want: &str) -> bool {
    given.len() == want.len()
        && given
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// What a bundle read without the credential is told.
const BUNDLE_READ_NEEDS: &str = "reading bundles on this control plane needs `Authorization: Bearer` with the sidecar token (`--sidecar-token`) or the operator token";

fn message(status: StatusCode, text: impl std::fmt::Display) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{text}\n"),
    )
        .into_response()
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// Retention: at start and every hour, deletes decision records older than
/// `keep` (each chain keeps an anchor where it was cut, so it verifies).
async fn expire_records(decisions: Arc<DecisionStore>, keep: Duration) {
    loop {
        let keep = u64::try_from(keep.as_micros()).unwrap_or(u64::MAX);
        let before = crate::decision_log::time::now_micros().saturating_sub(keep);
        let store = decisions.clone();
        match tokio::task::spawn_blocking(move || store.expire(before as i64)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(deleted = n, "decision records past retention deleted"),
            Ok(Err(e)) => tracing::error!("decision record retention failed: {e}"),
            Err(e) => tracing::error!("decision record retention failed: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// Runs until `shutdown` resolves.
pub async fn serve(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if let Some(dir) = settings.db.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // The decision store first: it refuses a file a newer build migrated
    // before anything else is written to it.
    let decisions = Arc::new(
        DecisionStore::open(&settings.db).map_err(|e| ServerError::Decisions(e.to_string()))?,
    );
    let store = Store::open(&settings.db)?;
    let journeys = Arc::new(
        Journeys::open(&settings.db, decisions.clone(), settings.approval_ttl)
            .map_err(|e| ServerError::Decisions(e.to_string()))?,
    );
    let state = Arc::new(AppState {
        store,
        decisions,
        journeys,
        trusted: settings.trusted,
        token: settings.token,
        sidecar_token: settings.sidecar_token.clone(),
        limits: settings.limits,
        active: Mutex::new(HashMap::new()),
    });
    for a in state.store.all_active()? {
        state.set(&a.name, a.revision, &a.digest, a.archive);
    }
    if let Some(keep) = settings.retention {
        tokio::spawn(expire_records(state.decisions.clone(), keep));
    }
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: settings.addr,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(settings.addr);
    let app = router(state, settings.limits, settings.sidecar_token);
    match &settings.tls {
        Some((cert, key)) => {
            let acceptor = tls_acceptor(cert, key)?;
            tracing::info!(%addr, db = %settings.db.display(), tls = true, "control plane listening");
            serve_tls(listener, acceptor, app, shutdown).await
        }
        None => {
            tracing::info!(%addr, db = %settings.db.display(), tls = false, "control plane listening");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(ServerError::Serve)
        }
    }
}

/// Checks the sidecar token on the control plane's gRPC services (constant
/// time), when one is configured.
fn sidecar_check(
    token: Option<String>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req: tonic::Request<()>| {
        let Some(want) = &token else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.is_some_and(|given| same_secret(given, want)) {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated(
                "this control plane needs the sidecar token (`--sidecar-token`)",
            ))
        }
    }
}

fn router(state: Arc<AppState>, limits: ArchiveLimits, sidecar_token: Option<String>) -> Router {
    let check = sidecar_check(sidecar_token);
    let ship = tonic::service::interceptor::InterceptedService::new(
        DecisionLogServer::new(DecisionLogService::new(state.decisions.clone()))
            // Batches arrive compressed inside the message (see the proto).
            .max_decoding_message_size(16 << 20),
        check.clone(),
    );
    let sessions = SessionsServer::with_interceptor(
        SessionsService {
            journeys: state.journeys.clone(),
        },
        check,
    );
    let grpc = tonic::service::Routes::new(ship)
        .add_service(sessions)
        .into_axum_router();
    // Operators' journey endpoints take small JSON bodies.
    let journeys = Router::new()
        .route("/signals", post(send_signal))
        .route("/approvals", get(list_approvals))
        .route("/approvals/{id}", get(show_approval))
        .route("/approvals/{id}/approve", post(approve))
        .route("/approvals/{id}/deny", post(deny))
        .layer(DefaultBodyLimit::max(64 << 10))
        .with_state(state.clone());
    Router::new()
        .route("/bundles/{name}", get(fetch).put(publish))
        .route("/bundles/{name}/revisions", get(revisions))
        .route("/bundles/{name}/rollback", post(rollback))
        .route("/decisions", get(query_decisions))
        .route("/decisions/verify", get(verify_decisions))
        .route("/decisions/export", get(export_decisions))
        .route("/decisions/{id}", get(show_decision))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        // Archives are bigger than axum's default body limit.
        .layer(DefaultBodyLimit::max(
            usize::try_from(limits.max_archive_bytes).unwrap_or(usize::MAX),
        ))
        .with_state(state)
        .merge(journeys)
        .merge(grpc)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut registry = prometheus_client::registry::Registry::with_prefix("arbiter_control_plane");
    registry.register(
        "decision_records_received",
        "Decision records received from sidecars (resends included)",
        state.decisions.records_stored.clone(),
    );
    registry.register(
        "decision_chain_breaks",
        "Chain breaks detected when records arrived",
        state.decisions.chain_breaks.clone(),
    );
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}

/// Runs a store read off the async threads; maps errors to responses.
async fn read_trail<T: Send + 'static>(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    read: impl FnOnce(&DecisionStore) -> Result<T, TrailError> + Send + 'static,
) -> Result<T, Response> {
    if let Some(refused) = refuse_trail_reader(state, headers) {
        return Err(refused);
    }
    let store = state.decisions.clone();
    match tokio::task::spawn_blocking(move || read(&store)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(trail_error(e)),
        Err(e) => Err(message(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

/// The refusal of a caller who may not read the trail.
fn refuse_trail_reader(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    (!state.authorized(headers)).then(|| {
        message(
            StatusCode::UNAUTHORIZED,
            "reading decision records needs `Authorization: Bearer <token>`",
        )
    })
}

fn trail_error(e: TrailError) -> Response {
    match e {
        TrailError::Bad(why) => message(StatusCode::BAD_REQUEST, why),
        e => message(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// An export's chunks (whole lines) as they leave the store.
const EXPORT_CHUNK: usize = 64 << 10;
/// How long an export waits for its client to take the next chunk before
/// it gives up: its read snapshot holds back the database's checkpoints.
const EXPORT_STALL: Duration = Duration::from_secs(30);

/// What the store's reader hands an export's response.
enum ExportPart {
    Lines(Vec<u8>),
    Failed(TrailError),
    /// The whole chain was read: without it, the reader went away (a
    /// panic), and the body must not end as if complete.
    End,
}

async fn query_decisions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(filter): Query<Filter>,
) -> Response {
    match read_trail(&state, &headers, move |s| s.query(&filter)).await {
        Ok(records) => json(StatusCode::OK, serde_json::json!({ "records": records })),
        Err(r) => r,
    }
}

async fn verify_decisions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(filter): Query<Filter>,
) -> Response {
    let instance = filter.instance;
    match read_trail(&state, &headers, move |s| s.verify(instance.as_deref())).await {
        Ok(reports) => json(StatusCode::OK, serde_json::json!({ "instances": reports })),
        Err(r) => r,
    }
}

async fn export_decisions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(filter): Query<Filter>,
) -> Response {
    let Some(instance) = filter.instance else {
        return message(StatusCode::BAD_REQUEST, "`instance` is required");
    };
    if let Some(refused) = refuse_trail_reader(&state, &headers) {
        return refused;
    }
    // Streamed: the store reads on a blocking thread, a few chunks ahead of
    // the client, and stops when the client goes or stops reading.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ExportPart>(4);
    let store = state.decisions.clone();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let send = |part| {
            let sent = runtime.block_on(tokio::time::timeout(EXPORT_STALL, tx.send(part)));
            matches!(sent, Ok(Ok(())))
        };
        // Every chunk must have gone for the end to be sent: a client that
        // stalled past the limit lost one, and its body is cut short.
        let mut whole = true;
        let read = store.export_chunks(&instance, EXPORT_CHUNK, |c| {
            whole = send(ExportPart::Lines(c));
            whole
        });
        match read {
            Ok(()) if whole => send(ExportPart::End),
            Ok(()) => false,
            Err(e) => send(ExportPart::Failed(e)),
        };
    });
    // An error before the first line is an error response; one after it
    // (the status is sent) cuts the body short, which the client sees as
    // an incomplete transfer rather than a shorter chain.
    let ndjson = [(header::CONTENT_TYPE, "application/x-ndjson")];
    let first = match rx.recv().await {
        Some(ExportPart::End) => return (StatusCode::OK, ndjson, "").into_response(),
        Some(ExportPart::Failed(e)) => return trail_error(e),
        Some(ExportPart::Lines(first)) => first,
        None => {
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the export's reader stopped",
            );
        }
    };
    let unfinished = || ExportPart::Failed(TrailError::Bad("the export's reader stopped".into()));
    let rest = tokio_stream::wrappers::ReceiverStream::new(rx)
        .chain(tokio_stream::once(unfinished()))
        .map_while(|part| match part {
            ExportPart::Lines(lines) => Some(Ok(lines)),
            ExportPart::End => None,
            ExportPart::Failed(e) => {
                tracing::error!("decision export cut short: {e}");
                Some(Err(std::io::Error::other(e.to_string())))
            }
        });
    let body = tokio_stream::once(Ok(first)).chain(rest);
    (StatusCode::OK, ndjson, axum::body::Body::from_stream(body)).into_response()
}

async fn show_decision(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let lookup = id.clone();
    let found = match read_trail(&state, &headers, move |s| s.get(&lookup)).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            return message(
                StatusCode::NOT_FOUND,
                format_args!("no decision `{id}` has been received"),
            );
        }
        Err(r) => return r,
    };
    // The deciding policies' text, from the revision that decided.
    let record: serde_json::Value =
        serde_json::from_str(found.record.get()).unwrap_or(serde_json::Value::Null);
    let texts = {
        let st = state.clone();
        let (bundle, revision) = (
            record["bundle"].as_str().unwrap_or_default().to_owned(),
            record["revision"].as_str().unwrap_or_default().to_owned(),
        );
        tokio::task::spawn_blocking(move || st.policy_texts(&bundle, &revision))
            .await
            .unwrap_or_default()
    };
    let next = {
        let id = id.clone();
        let time = record["time"]
            .as_str()
            .and_then(crate::decision_log::time::parse_micros)
            .unwrap_or(0) as i64;
        let session = record["session_id"].as_str().map(str::to_owned);
        let approval = record["approval_id"].as_str().map(str::to_owned);
        read_trail(&state, &headers, move |s| {
            s.followed_by(&id, time, session.as_deref(), approval.as_deref())
        })
        .await
        .unwrap_or_default()
    };
    let policies: Vec<serde_json::Value> = record["policy_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_str())
        .map(|id| serde_json::json!({"id": id, "text": texts.get(id)}))
        .collect();
    let mut body = serde_json::json!({
        "instance": found.instance,
        "seq": found.seq,
        "hash": found.hash,
        "record": record,
        "policies": policies,
        "followed_by": next,
    });
    if found.forked {
        body["forked"] = serde_json::Value::Bool(true);
    }
    json(StatusCode::OK, body)
}

fn requested_wait(headers: &HeaderMap) -> Option<Duration> {
    let prefer = headers.get("prefer")?.to_str().ok()?;
    let secs: u64 = prefer
        .split(',')
        .find_map(|p| p.trim().strip_prefix("wait="))?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_WAIT))
}

async fn fetch(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !state.may_read_bundles(&headers) {
        return message(StatusCode::UNAUTHORIZED, BUNDLE_READ_NEEDS);
    }
    let mut rx = state.channel(&name).subscribe();
    let held = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let current = |rx: &mut watch::Receiver<Option<Arc<Published>>>| rx.borrow_and_update().clone();
    let mut now = current(&mut rx);
    let stale =
        |p: &Option<Arc<Published>>| p.as_ref().is_none_or(|p| Some(&p.etag) == held.as_ref());
    if stale(&now)
        && let Some(wait) = requested_wait(&headers)
    {
        // Hold the request until a new revision is published, or the wait ends.
        if let Ok(Ok(())) = tokio::time::timeout(wait, rx.changed()).await {
            now = current(&mut rx);
        }
    }
    match now {
        None => message(
            StatusCode::NOT_FOUND,
            format_args!("no bundle named `{name}` has been published"),
        ),
        Some(p) if Some(&p.etag) == held.as_ref() => {
            (StatusCode::NOT_MODIFIED, [(header::ETAG, p.etag.clone())]).into_response()
        }
        Some(p) => (
            StatusCode::OK,
            [
                (header::ETAG, p.etag.clone()),
                (header::CONTENT_TYPE, "application/gzip".to_owned()),
                (
                    header::HeaderName::from_static("x-arbiter-revision"),
                    p.revision.clone(),
                ),
            ],
            p.bytes.clone(),
        )
            .into_response(),
    }
}

async fn publish(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !state.authorized(&headers) {
        return message(
            StatusCode::UNAUTHORIZED,
            "publishing needs `Authorization: Bearer <token>`",
        );
    }
    let checker = state.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let source = std::path::Path::new("upload");
        let verified = archive::verify(&body, &checker.trusted, &checker.limits, source)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        let bundle = verified.bundle();
        if bundle.manifest.name != name {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "the archive is bundle `{}`, not `{name}`",
                    bundle.manifest.name
                ),
            ));
        }
        let engine = Engine::compile(bundle, CompileOptions::default())
            .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        let report =
            policytest::run(bundle, &engine).map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e))?;
        if report.failed() > 0 {
            return Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("policy tests fail:\n{}", report.render()),
            ));
        }
        let revision = bundle.manifest.revision.clone();
        let put = checker
            .store
            .publish(
                &name,
                &revision,
                verified.digest(),
                verified.signer(),
                &body,
            )
            .map_err(|e| match e {
                StoreError::Conflict { .. } => (StatusCode::CONFLICT, e.to_string()),
                other => (StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
            })?;
        checker.set(&name, revision.clone(), verified.digest(), body.to_vec());
        Ok((
            name,
            revision,
            verified.digest().to_owned(),
            verified.signer().to_owned(),
            put,
        ))
    })
    .await;
    match checked {
        Ok(Ok((name, revision, digest, signer, put))) => {
            tracing::info!(%name, %revision, %signer, "bundle published");
            let status = if put == Put::Created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json(
                status,
                serde_json::json!({"name": name, "revision": revision, "digest": digest, "signer": signer, "active": true}),
            )
        }
        Ok(Err((status, why))) => {
            tracing::warn!("publish refused: {why}");
            message(status, why)
        }
        Err(e) => message(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn rollback(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !state.authorized(&headers) {
        return message(
            StatusCode::UNAUTHORIZED,
            "rolling back needs `Authorization: Bearer <token>`",
        );
    }
    let Some(revision) = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("revision")
                .and_then(|r| r.as_str())
                .map(str::to_owned)
        })
    else {
        return message(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"revision\": \"...\"}",
        );
    };
    let store_state = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        store_state.store.activate(&name, &revision)?;
        let active = store_state.store.active(&name)?;
        if let Some(a) = active {
            store_state.set(&name, a.revision, &a.digest, a.archive);
        }
        Ok::<_, StoreError>((name, revision))
    })
    .await;
    match result {
        Ok(Ok((name, revision))) => {
            tracing::info!(%name, %revision, "bundle rolled back");
            json(
                StatusCode::OK,
                serde_json::json!({"name": name, "revision": revision, "active": true}),
            )
        }
        Ok(Err(e @ StoreError::NoSuchRevision { .. })) => message(StatusCode::NOT_FOUND, e),
        Ok(Err(e)) => message(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => message(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn revisions(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !state.may_read_bundles(&headers) {
        return message(StatusCode::UNAUTHORIZED, BUNDLE_READ_NEEDS);
    }
    let lister = state.clone();
    match tokio::task::spawn_blocking(move || lister.store.revisions(&name)).await {
        Ok(Ok(list)) => json(
            StatusCode::OK,
            serde_json::to_value(list).unwrap_or_default(),
        ),
        Ok(Err(e)) => message(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => message(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Runs a journeys operation off the async threads, for an operator with the
/// token; maps errors to responses.
async fn journey<T: Send + 'static>(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    op: impl FnOnce(&Journeys) -> Result<T, JourneyError> + Send + 'static,
) -> Result<T, Response> {
    if !state.authorized(headers) {
        return Err(message(
            StatusCode::UNAUTHORIZED,
            "signals and approvals need `Authorization: Bearer <token>`",
        ));
    }
    let journeys = state.journeys.clone();
    match tokio::task::spawn_blocking(move || op(&journeys)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(JourneyError::Bad(why))) => Err(message(StatusCode::BAD_REQUEST, why)),
        Ok(Err(JourneyError::NotFound(why))) => Err(message(StatusCode::NOT_FOUND, why)),
        Ok(Err(JourneyError::Conflict(why))) => Err(message(StatusCode::CONFLICT, why)),
        Ok(Err(e)) => Err(message(StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(e) => Err(message(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

async fn send_signal(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let signal: Signal = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return message(StatusCode::BAD_REQUEST, format_args!("bad signal: {e}")),
    };
    match journey(&state, &headers, move |j| j.signal(&signal)).await {
        Ok((id, seq)) => json(
            StatusCode::ACCEPTED,
            serde_json::json!({ "event_id": id, "position": seq }),
        ),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
struct ApprovalFilter {
    state: Option<String>,
}

async fn list_approvals(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(f): Query<ApprovalFilter>,
) -> Response {
    match journey(&state, &headers, move |j| j.approvals(f.state.as_deref())).await {
        Ok(list) => json(StatusCode::OK, serde_json::json!({ "approvals": list })),
        Err(r) => r,
    }
}

async fn show_approval(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let lookup = id.clone();
    match journey(&state, &headers, move |j| j.approval(&lookup)).await {
        Ok(Some(a)) => json(StatusCode::OK, serde_json::json!(a)),
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            format_args!("no approval request `{id}`"),
        ),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Verdict {
    by: String,
}

async fn approve(
    state: State<Arc<AppState>>,
    id: Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    verdict(state, id, headers, body, true).await
}

async fn deny(
    state: State<Arc<AppState>>,
    id: Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    verdict(state, id, headers, body, false).await
}

async fn verdict(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
    grant: bool,
) -> Response {
    let v: Verdict = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return message(
                StatusCode::BAD_REQUEST,
                format_args!("expected {{\"by\": \"<approver>\"}}: {e}"),
            );
        }
    };
    match journey(&state, &headers, move |j| j.decide(&id, grant, &v.by)).await {
        Ok(a) => json(StatusCode::OK, serde_json::json!(a)),
        Err(r) => r,
    }
}
