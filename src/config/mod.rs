//! Configuration: typed sections read from a TOML file, overridden by flags
//! and `ARBITER_*` environment variables, and validated before any port is
//! bound. Every field has a safe default (loopback addresses, cache off).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::telemetry::LogFormat;

/// The whole `arbiter serve` configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub bundle: BundleConfig,
    pub control_plane: ControlPlaneConfig,
    pub limits: LimitsConfig,
    pub cache: CacheConfig,
    pub policy: PolicyConfig,
    pub log: LogConfig,
    pub decision_log: DecisionLogConfig,
    pub sessions: SessionsConfig,
}

/// Journey-time state: session signals and approvals, through the control
/// plane at `control_plane.url` (off without one).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// `false`: no signals are followed and no approvals can be filed.
    pub enabled: bool,
    /// Sessions kept (and, separately, subjects with signals); the least
    /// recently used go first when full.
    pub max_sessions: u64,
    /// Calls (subject, action, resource) remembered per session, for `WatchSession`.
    pub max_recent_decisions: usize,
    /// Bytes all sessions' remembered requests may take together (about):
    /// the least recently used sessions' memories go first.
    pub max_remembered_bytes: u64,
    /// Milliseconds an APPROVAL_REQUIRED answer may wait for the control
    /// plane to file or check an approval.
    pub approval_timeout_ms: u64,
    /// Seconds the signal feed may be down before the sidecar's session
    /// signals count as stale (0: never).
    pub max_signal_age_secs: u64,
    /// With stale signals: `decide` on what the sidecar last heard (and warn),
    /// or `deny` every decision that names a session.
    pub stale_signals: crate::sessions::StaleSignals,
    /// At start, decisions are refused (UNAVAILABLE) until the signal feed has
    /// caught up, for at most this many milliseconds; then they go ahead
    /// without signals (a warning is logged) so a control-plane outage does
    /// not stop the sidecar.
    pub startup_wait_ms: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_sessions: 100_000,
            max_recent_decisions: 32,
            max_remembered_bytes: 64 << 20,
            max_signal_age_secs: 300,
            stale_signals: Default::default(),
            approval_timeout_ms: 2_000,
            startup_wait_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where the gRPC API listens. Port 0 picks a free port (logged at start).
    pub grpc_addr: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub http_addr: SocketAddr,
    /// Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    pub shutdown_grace_secs: u64,
    /// Tokio worker threads; 0 means one per available CPU.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            shutdown_grace_secs: 10,
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BundleConfig {
    /// The bundle to serve: a directory (development) or a signed archive
    /// built by `arbiter bundle build`.
    pub path: Option<PathBuf>,
    /// Public keys (PEM) whose signatures are accepted on archives. Several
    /// keys allow rotation.
    pub trusted_keys: Vec<PathBuf>,
}

/// Whether two URLs name the same server: scheme, host and port (a URL with
/// credentials in it names none).
fn same_origin(a: &str, b: &str) -> bool {
    let (Ok(a), Ok(b)) = (a.parse::<http::Uri>(), b.parse::<http::Uri>()) else {
        return false;
    };
    let origin = |u: &http::Uri| {
        let authority = u.authority()?;
        if authority.as_str().contains('@') {
            return None;
        }
        let port = match (u.port_u16(), u.scheme_str()?) {
            (Some(p), _) => p,
            (None, "https") => 443,
            (None, "http") => 80,
            _ => return None,
        };
        Some((
            u.scheme_str()?.to_owned(),
            authority.host().to_ascii_lowercase(),
            port,
        ))
    };
    origin(&a).is_some_and(|o| Some(o) == origin(&b))
}

/// Where bundles come from when they are pulled rather than read locally.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// Base URL of the control plane; the bundle is `{url}/bundles/{bundle_name}`.
    /// With a local `bundle.path` and no `bundle_name`, the control plane is
    /// used for signals, approvals and the trail only.
    pub url: Option<String>,
    /// Name of the bundle to pull from the control plane.
    pub bundle_name: Option<String>,
    /// Or the full URL of the archive on any HTTP server or object store.
    pub bundle_url: Option<String>,
    /// Milliseconds between polls (with ±20 % jitter).
    pub poll_interval_ms: u64,
    /// Seconds a long-polling server may hold a request (`Prefer: wait`); 0 = off.
    pub long_poll_secs: u64,
    /// Milliseconds a fetch may take, beyond any long-poll wait.
    pub fetch_timeout_ms: u64,
    /// Longest wait between attempts after repeated failures, in seconds.
    pub max_backoff_secs: u64,
    /// Where the last-known-good archive is kept across restarts.
    pub cache_dir: PathBuf,
    /// The certificate authority (PEM) an `https` control plane must chain to.
    pub ca_file: Option<PathBuf>,
    /// The sidecar's bearer token for the control plane (bundle reads,
    /// records, signals, approvals), when it requires one.
    pub sidecar_token: Option<String>,
    /// Seconds the active bundle may go without its source confirming it
    /// current before it counts as stale; 0 = never stale.
    pub max_bundle_age_secs: u64,
    /// What a stale bundle does: `serve-stale` keeps deciding (and reports
    /// it), `deny-all` denies every decision and reports not ready.
    pub fail_mode: crate::distribution::FailMode,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            url: None,
            bundle_name: None,
            bundle_url: None,
            poll_interval_ms: 10_000,
            long_poll_secs: 30,
            fetch_timeout_ms: 10_000,
            max_backoff_secs: 60,
            cache_dir: PathBuf::from(".arbiter/bundles"),
            ca_file: None,
            sidecar_token: None,
            max_bundle_age_secs: 0,
            fail_mode: crate::distribution::FailMode::ServeStale,
        }
    }
}

impl ControlPlaneConfig {
    /// The archive URL to poll, if bundles are pulled.
    pub fn bundle_url(&self) -> Option<String> {
        if let Some(url) = &self.bundle_url {
            return Some(url.clone());
        }
        let (base, name) = (self.url.as_ref()?, self.bundle_name.as_ref()?);
        Some(format!("{}/bundles/{name}", base.trim_end_matches('/')))
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request message accepted, in bytes.
    pub max_request_bytes: usize,
    /// Most evaluations in one `CheckBatch`.
    pub max_batch_items: usize,
    /// Deepest nesting of properties and context values.
    pub max_depth: usize,
    /// Calls one connection may have in flight (HTTP/2 concurrent streams).
    pub max_concurrent_calls: usize,
    /// Largest `AuthorizeTool` arguments, in bytes.
    pub max_argument_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 1024 * 1024,
            max_batch_items: 256,
            max_depth: 32,
            max_concurrent_calls: 1024,
            max_argument_bytes: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Decisions kept in the decision cache; 0 (the default) turns it off.
    pub max_entries: u64,
    /// Seconds a cached decision is served.
    pub ttl_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 0,
            ttl_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Evaluate only the policies that can apply to a request (scope and
    /// equality index). Turning it off evaluates the whole set.
    pub index: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { index: true }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Level filter, e.g. `info` or `arbiter=debug`; `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// The decision trail. It is on whenever it has somewhere to go: a control
/// plane (`ship_to`, or else `control_plane.url`) and/or a local `file`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DecisionLogConfig {
    /// `false` turns the trail off even with a destination.
    pub enabled: bool,
    /// Control plane URL to ship records to; defaults to `control_plane.url`.
    pub ship_to: Option<String>,
    /// Also write every record here as NDJSON (`-` = stdout).
    pub file: Option<PathBuf>,
    /// Also export records (and spans of traced calls) to this OTLP/gRPC
    /// collector, e.g. `http://127.0.0.1:4317` (best effort).
    pub otlp_endpoint: Option<String>,
    /// Where records wait until the control plane acknowledges them.
    pub spool_dir: PathBuf,
    /// `buffered` (answer at once) or `durable` (answer once the record is fsynced).
    pub durability: crate::decision_log::Durability,
    /// At the spool cap: `block` (refuse decisions that cannot be recorded) or `drop`.
    pub overflow: crate::decision_log::Overflow,
    pub max_spool_bytes: u64,
    pub segment_bytes: u64,
    /// How long a decision may wait for its record to be kept before it is refused.
    pub block_timeout_ms: u64,
    /// Records the in-memory queue holds.
    pub queue_capacity: usize,
    /// Most records per write and per shipped batch.
    pub batch_max_records: usize,
    /// fsync the spool after every batch (group commit).
    pub fsync: bool,
    /// `buffered`: milliseconds the writer gathers records before one
    /// write + fsync. A `kill -9` loses at most this long's records.
    pub batch_interval_ms: u64,
    /// Least milliseconds between batches sent to the control plane.
    pub ship_interval_ms: u64,
    /// At shutdown, how long the shipper may keep delivering spooled records
    /// (what is left is resent at the next start).
    pub drain_ms: u64,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ship_to: None,
            file: None,
            otlp_endpoint: None,
            spool_dir: PathBuf::from(".arbiter/decisions"),
            durability: Default::default(),
            overflow: Default::default(),
            max_spool_bytes: 1 << 30,
            segment_bytes: 8 << 20,
            block_timeout_ms: 250,
            queue_capacity: 65_536,
            batch_max_records: 1024,
            fsync: true,
            batch_interval_ms: 10,
            ship_interval_ms: 100,
            drain_ms: 3_000,
        }
    }
}

impl Config {
    /// Where decision records are shipped, if anywhere.
    pub fn decision_log_destination(&self) -> Option<&str> {
        self.decision_log
            .ship_to
            .as_deref()
            .or(self.control_plane.url.as_deref())
    }

    /// The credential to send with bundle fetches: the sidecar token, where
    /// the bundle comes from the control plane it is meant for (by name, or
    /// a `bundle_url` on the server the trail ships to); never to another
    /// server, such as an object store.
    pub fn bundle_token(&self) -> Option<&str> {
        let cp = &self.control_plane;
        let token = cp.sidecar_token.as_deref()?;
        match &cp.bundle_url {
            None => Some(token),
            Some(url) => [cp.url.as_deref(), self.decision_log_destination()]
                .into_iter()
                .flatten()
                .any(|ours| same_origin(url, ours))
                .then_some(token),
        }
    }

    /// Whether decisions are recorded at all.
    pub fn decision_log_on(&self) -> bool {
        self.decision_log.enabled
            && (self.decision_log_destination().is_some()
                || self.decision_log.file.is_some()
                || self.decision_log.otlp_endpoint.is_some())
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file `{path}` is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Checks what types alone cannot. Runs before any port is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let cp = &self.control_plane;
        // A control plane without a bundle name serves a sidecar with a local
        // bundle: signals, approvals and the trail, no bundle pulls.
        if cp.bundle_name.is_some() && cp.url.is_none() {
            return bad("`--bundle-name` needs `--control-plane`".into());
        }
        if cp.url.is_some() && cp.bundle_name.is_none() && self.bundle.path.is_none() {
            return bad("`--control-plane` needs `--bundle-name` (or a local `--bundle`)".into());
        }
        if cp.bundle_url.is_some() && cp.url.is_some() {
            return bad(
                "give `--bundle-url` or `--control-plane` with `--bundle-name`, not both".into(),
            );
        }
        match (&self.bundle.path, cp.bundle_url()) {
            (None, None) => {
                return bad("no bundle: pass `--bundle PATH`, `--bundle-url URL`, or `--control-plane URL --bundle-name NAME`".into());
            }
            (Some(_), Some(_)) => {
                return bad(
                    "a local `--bundle` and a pulled bundle exclude each other; choose one".into(),
                );
            }
            (Some(path), None) => {
                if !path.exists() {
                    return bad(format!("bundle `{}` does not exist", path.display()));
                }
                if path.is_file() && self.bundle.trusted_keys.is_empty() {
                    return bad(format!(
                        "bundle `{}` is an archive but no key is trusted: pass `--trusted-key PUBLIC.pem` or set `[bundle] trusted_keys`",
                        path.display()
                    ));
                }
            }
            (None, Some(url)) => {
                crate::controlplane::BundleClient::new(
                    &url,
                    Duration::from_secs(1),
                    1,
                    cp.ca_file.as_deref(),
                )
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                if self.bundle.trusted_keys.is_empty() {
                    return bad("pulled bundles must be signed: pass `--trusted-key PUBLIC.pem` or set `[bundle] trusted_keys`".into());
                }
                if cp.poll_interval_ms == 0 || cp.fetch_timeout_ms == 0 {
                    return bad("`control_plane.poll_interval_ms` and `fetch_timeout_ms` must be at least 1".into());
                }
            }
        }
        for key in &self.bundle.trusted_keys {
            if !key.is_file() {
                return bad(format!("trusted key `{}` does not exist", key.display()));
            }
        }
        if self.server.grpc_addr == self.server.http_addr && self.server.grpc_addr.port() != 0 {
            return bad(format!(
                "`server.grpc_addr` and `server.http_addr` are both `{}`",
                self.server.grpc_addr
            ));
        }
        let l = &self.limits;
        if !(1024..=64 * 1024 * 1024).contains(&l.max_request_bytes) {
            return bad(format!(
                "`limits.max_request_bytes` is {}; use 1024 to 67108864",
                l.max_request_bytes
            ));
        }
        for (name, value) in [
            ("limits.max_batch_items", l.max_batch_items),
            ("limits.max_depth", l.max_depth),
            ("limits.max_concurrent_calls", l.max_concurrent_calls),
            ("limits.max_argument_bytes", l.max_argument_bytes),
            ("sessions.max_sessions", self.sessions.max_sessions as usize),
            (
                "sessions.max_recent_decisions",
                self.sessions.max_recent_decisions,
            ),
            (
                "sessions.approval_timeout_ms",
                self.sessions.approval_timeout_ms as usize,
            ),
            (
                "sessions.max_remembered_bytes",
                self.sessions.max_remembered_bytes as usize,
            ),
        ] {
            if value == 0 {
                return bad(format!("`{name}` must be at least 1"));
            }
        }
        if l.max_depth > 64 {
            return bad(format!(
                "`limits.max_depth` is {}; use at most 64",
                l.max_depth
            ));
        }
        if self.cache.max_entries > 0 && self.cache.ttl_secs == 0 {
            return bad("`cache.ttl_secs` must be at least 1 when the cache is on".into());
        }
        let d = &self.decision_log;
        if let Some(url) = &d.ship_to
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return bad(format!(
                "`decision_log.ship_to` `{url}` must be an http:// or https:// URL"
            ));
        }
        if let Some(url) = &d.otlp_endpoint
            && !url.starts_with("http://")
            && !url.starts_with("https://")
        {
            return bad(format!(
                "`decision_log.otlp_endpoint` `{url}` must be an http:// or https:// URL"
            ));
        }
        for (name, value) in [
            ("decision_log.max_spool_bytes", d.max_spool_bytes),
            ("decision_log.segment_bytes", d.segment_bytes),
            ("decision_log.block_timeout_ms", d.block_timeout_ms),
            ("decision_log.queue_capacity", d.queue_capacity as u64),
            ("decision_log.batch_max_records", d.batch_max_records as u64),
            ("decision_log.ship_interval_ms", d.ship_interval_ms),
        ] {
            if value == 0 {
                return bad(format!("`{name}` must be at least 1"));
            }
        }
        if d.max_spool_bytes < d.segment_bytes.saturating_mul(2) {
            return bad(format!(
                "`decision_log.max_spool_bytes` ({}) must be at least twice `segment_bytes` ({}): the segment being written is not released until the next one starts, so the cap must leave room for more than it",
                d.max_spool_bytes, d.segment_bytes
            ));
        }
        let most = crate::controlplane::trail::MAX_BATCH_LINES;
        if d.batch_max_records > most {
            return bad(format!(
                "`decision_log.batch_max_records` is {}; a control plane takes at most {most} records in one batch",
                d.batch_max_records
            ));
        }
        if d.durability == crate::decision_log::Durability::Durable && !d.fsync {
            return bad(
                "`decision_log.durability = \"durable\"` answers a decision once its record is on disk, which needs `fsync = true`".into(),
            );
        }
        if d.batch_interval_ms > 1000 {
            return bad(format!(
                "`decision_log.batch_interval_ms` is {}; use at most 1000 (a crash loses up to this long's records)",
                d.batch_interval_ms
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::Invalid(format!("`log.level` `{}`: {e}", self.log.level)))?;
        Ok(())
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.server.shutdown_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_bind_loopback_and_cache_off() {
        let c = Config::default();
        assert!(c.server.grpc_addr.ip().is_loopback());
        assert!(c.server.http_addr.ip().is_loopback());
        assert_eq!(c.cache.max_entries, 0);
        assert!(c.policy.index);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::from_toml("[server]\ngrpc_adr = \"127.0.0.1:1\"\n").expect_err("typo");
        assert!(err.contains("grpc_adr"), "{err}");
    }

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../examples/arbiter.toml");
        let mut c = Config::from_toml(text).expect("example parses");
        c.bundle.path = Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/documents"
        )));
        c.validate().expect("example validates");
    }

    #[test]
    fn the_example_shows_the_decision_log_defaults() {
        let text = include_str!("../../examples/arbiter.toml");
        let c = Config::from_toml(text).expect("example parses");
        assert_eq!(c.decision_log, DecisionLogConfig::default());
        assert_eq!(c.sessions, SessionsConfig::default());
        assert_eq!(c.limits, LimitsConfig::default());
    }

    #[test]
    fn decision_log_settings_are_checked() {
        let base = || {
            let mut c = Config::default();
            c.bundle.path = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
            c
        };
        let mut c = base();
        assert!(!c.decision_log_on(), "no destination: off");
        c.decision_log.file = Some("-".into());
        assert!(c.decision_log_on());
        for (edit, needle) in [
            (
                (|c: &mut Config| c.decision_log.ship_to = Some("127.0.0.1:8181".into()))
                    as fn(&mut Config),
                "ship_to",
            ),
            (|c| c.decision_log.max_spool_bytes = 0, "max_spool_bytes"),
            (
                |c| c.decision_log.batch_max_records = 100_000,
                "batch_max_records",
            ),
            (
                |c| c.decision_log.max_spool_bytes = c.decision_log.segment_bytes,
                "twice `segment_bytes`",
            ),
            (
                |c| {
                    c.decision_log.durability = crate::decision_log::Durability::Durable;
                    c.decision_log.fsync = false;
                },
                "needs `fsync = true`",
            ),
            (
                |c| c.decision_log.batch_interval_ms = 5000,
                "batch_interval_ms",
            ),
            (
                |c| c.decision_log.otlp_endpoint = Some("collector:4317".into()),
                "otlp_endpoint",
            ),
        ] {
            let mut c = base();
            edit(&mut c);
            let err = c.validate().expect_err(needle).to_string();
            assert!(err.contains(needle), "{err}");
        }
        let err = Config::from_toml("[decision_log]\noverflow = \"discard\"\n").expect_err("enum");
        assert!(err.contains("overflow") || err.contains("discard"), "{err}");
    }

    #[test]
    fn the_sidecar_token_goes_only_to_its_control_plane() {
        let config = |url: Option<&str>, bundle_url: Option<&str>, ship_to: Option<&str>| {
            let mut c = Config::default();
            c.control_plane.url = url.map(str::to_owned);
            c.control_plane.bundle_name = url.map(|_| "b".to_owned());
            c.control_plane.bundle_url = bundle_url.map(str::to_owned);
            c.control_plane.sidecar_token = Some("t".into());
            c.decision_log.ship_to = ship_to.map(str::to_owned);
            c
        };
        assert_eq!(
            config(Some("https://cp:8181/"), None, None).bundle_token(),
            Some("t")
        );
        // A bundle URL on the server the trail ships to (the only way to name
        // both, since a bundle URL excludes `url`).
        let ours = config(
            None,
            Some("https://CP:8181/bundles/x"),
            Some("https://cp:8181"),
        );
        assert_eq!(ours.bundle_token(), Some("t"));
        let default_port = config(None, Some("https://cp/bundles/x"), Some("https://cp:443/"));
        assert_eq!(default_port.bundle_token(), Some("t"));
        // Another server, or one whose name merely starts like it: not sent.
        for elsewhere in [
            "https://cdn.example/b.tar.gz",
            "https://cp:81810/bundles/x",
            "https://cp:8181.evil.example/bundles/x",
            "https://cp:8181@evil.example/bundles/x",
            "http://cp:8181/bundles/x",
        ] {
            let c = config(None, Some(elsewhere), Some("https://cp:8181"));
            assert_eq!(c.bundle_token(), None, "{elsewhere}");
        }
        assert_eq!(
            config(None, Some("https://cp:8181/b"), None).bundle_token(),
            None
        );
    }

    #[test]
    fn limits_are_checked() {
        let mut c = Config::default();
        c.bundle.path = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        c.limits.max_batch_items = 0;
        let err = c.validate().expect_err("zero batch");
        assert!(err.to_string().contains("max_batch_items"));
    }
}
