//! Freshness: how long since the bundle source last confirmed the active
//! bundle current, and what to do when that exceeds `max_bundle_age`.
//!
//! `serve-stale` (the default) keeps deciding on the bundle it has and only
//! reports the staleness (readiness text, metric): a sidecar's readiness gates
//! its pod, so failing it would turn a control-plane outage into an
//! application outage. `deny-all` denies every decision and reports not ready
//! until the source is reachable again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FailMode {
    #[default]
    ServeStale,
    DenyAll,
}

#[derive(Debug)]
pub struct Freshness {
    max_age: Duration,
    pub mode: FailMode,
    /// Unix seconds of the last confirmation; 0 = never.
    confirmed: AtomicU64,
    stale: AtomicBool,
    /// Wakes whoever applies the fail mode as soon as a confirmation lands.
    pub confirmed_now: tokio::sync::Notify,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Freshness {
    pub fn new(max_age: Duration, mode: FailMode) -> Self {
        Self {
            max_age,
            mode,
            confirmed: AtomicU64::new(0),
            stale: AtomicBool::new(false),
            confirmed_now: tokio::sync::Notify::new(),
        }
    }

    /// The source answered: the active bundle is current as of now.
    pub fn confirm(&self) {
        self.confirm_at(unix_now());
    }

    pub fn confirm_at(&self, unix_secs: u64) {
        self.confirmed.fetch_max(unix_secs, Ordering::Relaxed);
        self.confirmed_now.notify_one();
    }

    /// Time since the last confirmation (`None`: never confirmed).
    pub fn age(&self) -> Option<Duration> {
        match self.confirmed.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_secs(unix_now().saturating_sub(t))),
        }
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// Recomputes staleness; returns the new state when it changed.
    pub fn tick(&self) -> Option<bool> {
        let stale = self.age().is_none_or(|a| a > self.max_age);
        (self.stale.swap(stale, Ordering::Relaxed) != stale).then_some(stale)
    }

    pub fn describe(&self) -> String {
        match self.age() {
            Some(a) => format!(
                "bundle not confirmed current for {} s (max_bundle_age {} s)",
                a.as_secs(),
                self.max_age.as_secs()
            ),
            None => "bundle never confirmed current by its source".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_stale_and_fresh_again() {
        let f = Freshness::new(Duration::from_secs(30), FailMode::DenyAll);
        assert_eq!(f.tick(), Some(true), "never confirmed is stale");
        f.confirm();
        assert_eq!(f.tick(), Some(false));
        assert_eq!(f.tick(), None, "no change, no news");
        let f = Freshness::new(Duration::from_secs(30), FailMode::ServeStale);
        f.confirm_at(unix_now() - 60);
        assert_eq!(f.tick(), Some(true));
        assert!(
            f.describe().contains("60 s") || f.describe().contains("61 s"),
            "{}",
            f.describe()
        );
        f.confirm_at(unix_now() - 100); // an older confirmation never moves time back
        f.confirm();
        assert_eq!(f.tick(), Some(false));
    }
}
