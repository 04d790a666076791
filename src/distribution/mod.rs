//! The sidecar's side of bundle distribution. Activation knows policy and
//! nothing of HTTP: verify the archive, compile it, run its tests, swap it in,
//! and keep it on disk as the last-known-good bundle. The poller feeds it
//! from a `controlplane::BundleClient`, with backoff and jitter on errors.
//!
//! ```text
//! start: last-known-good file ──verify, compile, test──▶ Decider::activate
//! then:  poll ──GET (conditional, long poll)──▶ new archive ──same path──▶ activate, persist
//!                                   └─ refused: logged, counted, previous bundle stays
//! ```

mod freshness;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::bundle::keys::TrustedKeys;
use crate::bundle::{ArchiveLimits, VerifyError, archive};
use crate::controlplane::{BundleClient, Fetched, Validators};
use crate::decision::Decider;
use crate::policy::{CompileError, CompileOptions, Engine};
use crate::policytest;
use crate::telemetry::Metrics;

pub use freshness::{FailMode, Freshness};

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("refused: {0}")]
    Refused(#[from] VerifyError),
    #[error(transparent)]
    Invalid(#[from] CompileError),
    #[error("its policy tests fail:\n{0}")]
    TestsFailed(String),
}

/// Verifies, compiles, tests and activates archives; persists what it activates.
pub struct Activator {
    pub decider: Arc<Decider>,
    pub metrics: Arc<Metrics>,
    pub trusted: TrustedKeys,
    pub limits: ArchiveLimits,
    pub options: CompileOptions,
    /// Where the last-known-good archive is kept.
    pub store: PathBuf,
    pub freshness: Arc<Freshness>,
}

impl Activator {
    /// Makes `bytes` the active bundle, or leaves the active one alone.
    pub fn activate(&self, bytes: &[u8], source: &Path) -> Result<Arc<str>, ActivationError> {
        let start = Instant::now();
        let verified = archive::verify(bytes, &self.trusted, &self.limits, source)?;
        let engine = Engine::compile(verified.bundle(), self.options)?;
        let report =
            policytest::run(verified.bundle(), &engine).map_err(ActivationError::TestsFailed)?;
        if report.failed() > 0 {
            return Err(ActivationError::TestsFailed(report.render()));
        }
        let revision = engine.revision().clone();
        self.decider.activate(engine);
        self.metrics.activation_took(start.elapsed());
        tracing::info!(
            %revision,
            signer = verified.signer(),
            took_ms = start.elapsed().as_secs_f64() * 1e3,
            "bundle activated"
        );
        Ok(revision)
    }

    /// Writes the archive as the last-known-good one: a temporary file,
    /// synced, then renamed over the old one, so a crash leaves one or the
    /// other, never half of either.
    pub fn persist(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(dir) = self.store.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.store.with_extension("partial");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.store)
    }

    /// Activates the last-known-good archive, re-verified. A corrupt or
    /// refused one is set aside (`.rejected`) with a log line, never half-loaded.
    pub fn load_last_known_good(&self) -> Option<[u8; 32]> {
        let bytes = match std::fs::read(&self.store) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.store.display(), "cannot read the last-known-good bundle: {e}");
                return None;
            }
        };
        match self.activate(&bytes, &self.store) {
            Ok(revision) => {
                tracing::info!(%revision, path = %self.store.display(), "serving the last-known-good bundle");
                // It was current when it was written.
                if let Some(written) = std::fs::metadata(&self.store)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                {
                    self.freshness.confirm_at(written.as_secs());
                }
                Some(Sha256::digest(&bytes).into())
            }
            Err(e) => {
                self.metrics.bundle_rejected();
                tracing::warn!(path = %self.store.display(), "ignoring the last-known-good bundle: {e}");
                let _ = std::fs::rename(&self.store, self.store.with_extension("rejected"));
                None
            }
        }
    }
}

/// How often to ask, and how long a long poll may be held.
#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    pub interval: Duration,
    pub long_poll: Option<Duration>,
    /// Longest wait between attempts after repeated failures.
    pub max_backoff: Duration,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// ±20 % so a fleet of sidecars does not poll in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + fastrand::f64() * 0.4)
}

/// Polls until `shutdown` turns true. `held` is the digest of the archive
/// already active (from the last-known-good file), so it is not re-activated.
pub async fn poll(
    client: BundleClient,
    activator: Arc<Activator>,
    settings: PollSettings,
    held: Option<[u8; 32]>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut validators = Validators::default();
    let mut failures: u32 = 0;
    let source = PathBuf::from(client.url());
    // The archive that is active, the last one seen (refused ones too, so
    // the same bad bytes are not re-verified on every poll), and whether the
    // validators we send describe the active one (only then does a 304
    // confirm the active bundle current).
    let mut active = held;
    let mut seen = held;
    let mut validators_name_active = false;
    loop {
        let asked = Instant::now();
        let mut changed = false;
        let result = tokio::select! {
            r = client.fetch(&validators, settings.long_poll) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match result {
            Ok(Fetched::NotModified) => {
                failures = 0;
                activator.metrics.fetch_succeeded(unix_now());
                if validators_name_active {
                    activator.freshness.confirm();
                }
            }
            Ok(Fetched::New {
                bytes,
                validators: fresh,
            }) => {
                failures = 0;
                activator.metrics.fetch_succeeded(unix_now());
                validators = fresh;
                let digest: [u8; 32] = Sha256::digest(&bytes).into();
                if active == Some(digest) {
                    validators_name_active = true;
                    activator.freshness.confirm();
                } else if seen == Some(digest) {
                    validators_name_active = false;
                } else {
                    changed = true;
                    seen = Some(digest);
                    let (task_activator, task_source) = (activator.clone(), source.clone());
                    // Compiling a large bundle takes milliseconds: keep it
                    // off the threads that answer decisions.
                    let outcome = tokio::task::spawn_blocking(move || {
                        let r = task_activator.activate(&bytes, &task_source);
                        if r.is_ok()
                            && let Err(e) = task_activator.persist(&bytes)
                        {
                            tracing::warn!(path = %task_activator.store.display(), "cannot keep the bundle as last-known-good: {e}");
                        }
                        r
                    })
                    .await;
                    validators_name_active = matches!(outcome, Ok(Ok(_)));
                    match outcome {
                        Ok(Ok(_)) => {
                            active = Some(digest);
                            activator.freshness.confirm();
                        }
                        Ok(Err(e)) => {
                            activator.metrics.bundle_rejected();
                            tracing::warn!(url = %source.display(), "new bundle not activated, the previous one stays: {e}");
                        }
                        Err(e) => tracing::error!("bundle activation task failed: {e}"),
                    }
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                activator.metrics.fetch_failed();
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(failures, "bundle fetch failed: {e}");
                }
            }
        }
        // With long polling, ask again at once after a change, or after a
        // poll the server held (it has already waited). A quick "not
        // modified", or the same bytes again, means the server does not long
        // poll: wait the interval.
        let held_long = settings.long_poll.is_some_and(|w| asked.elapsed() >= w / 2);
        let delay = if failures > 0 {
            settings
                .interval
                .saturating_mul(1 << failures.min(6))
                .min(settings.max_backoff)
        } else if settings.long_poll.is_some() && (changed || held_long) {
            Duration::ZERO
        } else {
            settings.interval
        };
        tokio::select! {
            () = tokio::time::sleep(jitter(delay)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Bundle;
    use crate::decision::CacheSettings;

    fn activator(dir: &Path, key: &ed25519_dalek::SigningKey) -> Activator {
        let metrics = Arc::new(Metrics::new());
        Activator {
            decider: Arc::new(Decider::new(CacheSettings::OFF, metrics.clone(), None)),
            metrics,
            trusted: TrustedKeys::from_keys([key.verifying_key()]),
            limits: ArchiveLimits::default(),
            options: CompileOptions::default(),
            store: dir.join("lkg.tar.gz"),
            freshness: Arc::new(Freshness::new(
                Duration::from_secs(60),
                FailMode::ServeStale,
            )),
        }
    }

    /// The example bundle at `revision`, with `edit` applied to its files, signed.
    fn archive_with(
        key: &ed25519_dalek::SigningKey,
        revision: &str,
        edit: impl Fn(&mut Bundle),
    ) -> Vec<u8> {
        let mut b =
            Bundle::read_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/documents"))
                .expect("reads");
        b.manifest.revision = revision.into();
        b.files.insert(
            "manifest.json".into(),
            serde_json::to_vec(&b.manifest).expect("json"),
        );
        edit(&mut b);
        archive::sign(
            &archive::build(&b).expect("builds"),
            key,
            &ArchiveLimits::default(),
        )
        .expect("signs")
    }

    #[test]
    fn refused_bundles_leave_the_active_one_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let a = activator(dir.path(), &key);
        a.activate(&archive_with(&key, "good", |_| {}), Path::new("test"))
            .expect("good bundle activates");

        let invalid = archive_with(&key, "invalid", |b| {
            b.files.insert(
                "broken.cedar".into(),
                br#"@id("x") permit(principal, action, resource) when { resource.nope };"#.to_vec(),
            );
        });
        assert!(matches!(
            a.activate(&invalid, Path::new("test")),
            Err(ActivationError::Invalid(_))
        ));

        let failing = archive_with(&key, "failing", |b| {
            b.files.insert(
                "tests/wrong.json".into(),
                br#"[{"name": "wrong", "request": "requests/deny-suspended-user.json", "expect": {"outcome": "ALLOW"}}]"#.to_vec(),
            );
        });
        let err = a
            .activate(&failing, Path::new("test"))
            .expect_err("tests fail");
        assert!(
            matches!(err, ActivationError::TestsFailed(ref t) if t.contains("outcome DENY (expected ALLOW)")),
            "{err}"
        );

        assert!(matches!(
            a.activate(b"<html>502 Bad Gateway</html>", Path::new("test")),
            Err(ActivationError::Refused(_))
        ));

        let active = a.decider.snapshot().expect("still active");
        assert_eq!(&**active.engine.revision(), "good");
    }

    #[test]
    fn persisted_bundle_is_what_restarts_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let bytes = archive_with(&key, "kept", |_| {});
        activator(dir.path(), &key)
            .persist(&bytes)
            .expect("persists");
        assert!(
            !dir.path().join("lkg.partial").exists(),
            "no temporary file is left behind"
        );
        let fresh = activator(dir.path(), &key);
        assert!(fresh.load_last_known_good().is_some());
        assert_eq!(
            &**fresh.decider.snapshot().expect("active").engine.revision(),
            "kept"
        );
        // A key that is no longer trusted: set aside, nothing served.
        let other = activator(dir.path(), &ed25519_dalek::SigningKey::from_bytes(&[5; 32]));
        assert!(other.load_last_known_good().is_none());
        assert!(other.decider.snapshot().is_none());
        assert!(dir.path().join("lkg.tar.rejected").exists());
    }
}
