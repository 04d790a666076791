//! Journey-time state on the sidecar: what the control plane's session
//! signals say about each session and subject, the recent decisions of each
//! session (to tell a watcher which of them a signal turned), and the feed
//! that keeps it current (`feed`).
//!
//! ```text
//! control plane ──Follow stream──▶ feed::follow ──apply──▶ Sessions
//!                                                          │  read on every decision (moka get, no lock)
//! Decider ──remember(session, request, outcome)──────────▶ │
//! WatchSession ◀──broadcast of SessionChange──────────────┘
//! ```
//!
//! Memory is bounded: at most `max_sessions` sessions and as many subjects
//! with signal state are kept (least recently used go first, counted in
//! metrics). Only the feed fills that state: callers' traffic cannot push a
//! revocation out. The remembered decisions live apart, bounded in bytes
//! (`max_remembered_bytes` in all, a sixteenth of it and `max_recent` calls
//! per session). A signal for a session this sidecar has not
//! seen yet is kept the same way and applies when the session appears.

pub mod feed;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use moka::sync::Cache;
use serde_json::{Map, Value};

use crate::decision::{Outcome, Request};
use crate::telemetry::SessionMetrics;

/// Risk levels in increasing order.
pub const RISK_LEVELS: [&str; 3] = ["low", "medium", "high"];

/// What signals say about a session or a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalState {
    pub revoked: bool,
    pub risk: String,
    pub assurance: String,
    pub device_compliant: bool,
    /// Feed position of the last signal applied (0: none).
    pub version: u64,
    /// The last signal's event type and id, for watchers and records.
    pub last_event: String,
    pub event_id: String,
}

impl Default for SignalState {
    fn default() -> Self {
        Self {
            revoked: false,
            risk: "low".into(),
            assurance: String::new(),
            device_compliant: true,
            version: 0,
            last_event: String::new(),
            event_id: String::new(),
        }
    }
}

fn risk_rank(r: &str) -> usize {
    RISK_LEVELS.iter().position(|l| *l == r).unwrap_or(0)
}

impl SignalState {
    /// Session and subject signals together, the stricter of each: revoked
    /// if either is, the higher risk, non-compliant if either is; the newer
    /// assurance level of those that have one (a subject's later risk signal
    /// says nothing about the session's sign-in).
    pub fn combine(session: Option<&SignalState>, subject: Option<&SignalState>) -> SignalState {
        match (session, subject) {
            (None, None) => SignalState::default(),
            (Some(s), None) | (None, Some(s)) => s.clone(),
            (Some(a), Some(b)) => {
                let (newer, older) = if a.version >= b.version {
                    (a, b)
                } else {
                    (b, a)
                };
                SignalState {
                    revoked: a.revoked || b.revoked,
                    risk: if risk_rank(&a.risk) >= risk_rank(&b.risk) {
                        a.risk.clone()
                    } else {
                        b.risk.clone()
                    },
                    assurance: if newer.assurance.is_empty() {
                        older.assurance.clone()
                    } else {
                        newer.assurance.clone()
                    },
                    device_compliant: a.device_compliant && b.device_compliant,
                    version: a.version.max(b.version),
                    last_event: newer.last_event.clone(),
                    event_id: newer.event_id.clone(),
                }
            }
        }
    }

    /// The `context.session` record policies see.
    pub fn context(&self, session_id: &str) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), Value::String(session_id.to_owned()));
        m.insert("revoked".into(), Value::Bool(self.revoked));
        m.insert("risk".into(), Value::String(self.risk.clone()));
        m.insert("assurance".into(), Value::String(self.assurance.clone()));
        m.insert(
            "device_compliant".into(),
            Value::Bool(self.device_compliant),
        );
        Value::Object(m)
    }
}

/// A decision remembered for its session: re-evaluated when a signal
/// arrives, so watchers learn which answers no longer hold.
#[derive(Debug, Clone)]
pub struct Remembered {
    /// Which call this is: subject, action and resource (a newer decision of
    /// the same call replaces it; its other facts, e.g. the user's sign-in
    /// age, change from call to call).
    call: u64,
    pub decision_id: String,
    pub request: Request,
    pub outcome: Outcome,
    /// About how much memory this takes (for the byte budget).
    bytes: u32,
}

impl Remembered {
    pub fn new(decision_id: String, request: Request, outcome: Outcome) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (
            &request.subject.kind,
            &request.subject.id,
            &request.action,
            &request.resource.kind,
            &request.resource.id,
        )
            .hash(&mut h);
        let bytes = approx_bytes(&request) + decision_id.len() + 64;
        Self {
            call: h.finish(),
            decision_id,
            request,
            outcome,
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        }
    }
}

/// About how many bytes of memory a request takes: string lengths plus a
/// rough overhead per value. Close enough to bound memory, cheap to count.
fn approx_bytes(r: &Request) -> usize {
    // Every value is a `Value` (80 bytes with serde_json's `preserve_order`,
    // which cedar-policy turns on) plus what it owns; a map entry adds its
    // key and the index map's slot and hash.
    const VALUE: usize = std::mem::size_of::<Value>();
    fn value(v: &Value) -> usize {
        VALUE
            + match v {
                Value::String(s) => s.len(),
                Value::Array(a) => a.iter().map(value).sum::<usize>(),
                Value::Object(o) => object(o),
                _ => 0,
            }
    }
    fn object(o: &Map<String, Value>) -> usize {
        o.iter()
            .map(|(k, v)| 24 + k.len() + 16 + value(v))
            .sum::<usize>()
    }
    let entity = |e: &crate::decision::EntityRef| {
        96 + e.kind.len() + e.id.len() + e.properties.as_ref().map_or(0, object)
    };
    entity(&r.subject)
        + entity(&r.resource)
        + r.action.len()
        + object(&r.context)
        + r.session_id.as_ref().map_or(0, String::len)
}

/// Sessions by subject, and the very subject value (`Arc`) each session was
/// indexed with: an eviction takes a session out only if it evicted that
/// value, so a `remember` that re-indexed it meanwhile is not undone.
#[derive(Default)]
struct SessionsBySubject {
    by_subject: HashMap<Arc<str>, HashSet<String>>,
    indexed: HashMap<String, Arc<str>>,
}

impl SessionsBySubject {
    fn index(&mut self, session: &str, subject: Arc<str>) {
        if let Some(before) = self.indexed.insert(session.to_owned(), subject.clone()) {
            self.remove_from(&before, session);
        }
        self.by_subject
            .entry(subject)
            .or_default()
            .insert(session.to_owned());
    }

    /// The cache let `subject` of `session` go.
    fn evicted(&mut self, session: &str, subject: &Arc<str>) {
        if self
            .indexed
            .get(session)
            .is_some_and(|now| Arc::ptr_eq(now, subject))
        {
            self.indexed.remove(session);
            self.remove_from(subject, session);
        }
    }

    fn remove_from(&mut self, subject: &str, session: &str) {
        if let Some(sessions) = self.by_subject.get_mut(subject) {
            sessions.remove(session);
            if sessions.is_empty() {
                self.by_subject.remove(subject);
            }
        }
    }
}

/// What a remembered session costs beyond its requests (key, entry, lists).
const TRACKED_OVERHEAD: u32 = 512;

/// The decisions of one session this sidecar answered.
#[derive(Debug, Default)]
pub struct Tracked {
    /// The subject key of the session's decisions, once one is made.
    subject: std::sync::Mutex<Option<String>>,
    recent: std::sync::Mutex<VecDeque<Remembered>>,
    /// Bytes of `recent` plus the overhead, as last weighed by the cache.
    weight: AtomicU32,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracked {
    pub fn subject(&self) -> Option<String> {
        lock(&self.subject).clone()
    }

    pub fn recent(&self) -> Vec<Remembered> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Replaces the remembered outcome of a decision (after re-evaluation).
    pub fn update_outcome(&self, decision_id: &str, outcome: Outcome) {
        for r in lock(&self.recent).iter_mut() {
            if r.decision_id == decision_id {
                r.outcome = outcome;
            }
        }
    }
}

/// A change of a session's state, as watchers receive it.
#[derive(Debug, Clone)]
pub struct SessionChange {
    pub session_id: String,
    pub state: SignalState,
    pub cause: String,
    pub changed: Vec<ChangedDecision>,
}

#[derive(Debug, Clone)]
pub struct ChangedDecision {
    pub decision_id: String,
    pub previous: Outcome,
    pub current: Outcome,
    pub policy_ids: Vec<String>,
}

/// What a sidecar does once its session signals are stale (the feed from
/// the control plane has been down longer than `max_signal_age`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StaleSignals {
    /// Decide on the last state heard; warn and show it in the metrics.
    #[default]
    Decide,
    /// Deny every decision that names a session until the feed is back.
    Deny,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sessions (and, separately, subjects) with signal state kept.
    pub max_sessions: u64,
    /// Distinct requests remembered per session.
    pub max_recent: usize,
    /// About how many bytes all sessions' remembered requests may take.
    pub max_remembered_bytes: u64,
    /// How long the feed may be down before signals are stale (zero: never).
    pub max_signal_age: std::time::Duration,
    pub stale_signals: StaleSignals,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 100_000,
            max_recent: 32,
            max_remembered_bytes: 64 << 20,
            max_signal_age: std::time::Duration::from_secs(300),
            stale_signals: StaleSignals::Decide,
        }
    }
}

pub struct Sessions {
    /// Signal state by session id (filled by the feed only).
    by_session: Cache<String, Arc<SignalState>>,
    by_subject: Cache<String, Arc<SignalState>>,
    /// Remembered decisions by session id (filled by callers' traffic).
    tracked: Cache<String, Arc<Tracked>>,
    /// Whose session each is, by session id (filled by callers' traffic;
    /// bounded in number, kept apart from the remembered requests so a
    /// session whose requests were pushed out still hears its subject's
    /// signals).
    subjects: Cache<String, Arc<str>>,
    /// The same, by subject: a subject-wide signal finds its sessions here
    /// instead of walking every session. Entries leave with `subjects`'.
    sessions_of: Arc<std::sync::Mutex<SessionsBySubject>>,
    /// Whether any subject-wide signal is held (skips a lookup per decision).
    any_subject: AtomicBool,
    limits: Limits,
    /// Feed position applied so far: where a reconnect resumes.
    position: AtomicU64,
    /// The control-plane database the position counts in.
    epoch: std::sync::Mutex<String>,
    /// Set once the feed has caught up (or the start-up wait gave up):
    /// until then decisions are refused rather than made without signals.
    ready: AtomicBool,
    /// When the feed was last heard, in milliseconds since `born` plus one
    /// (0: never; the age then counts from the start). Monotonic: a clock
    /// step cannot make stale signals look fresh.
    last_heard: AtomicU64,
    /// Whether the feed is connected and caught up right now.
    feed_live: AtomicBool,
    born: std::time::Instant,
    changes: tokio::sync::broadcast::Sender<Arc<SessionChange>>,
    pub metrics: SessionMetrics,
}

impl Sessions {
    pub fn new(limits: Limits, metrics: SessionMetrics) -> Self {
        let sessions_of = Arc::new(std::sync::Mutex::new(SessionsBySubject::default()));
        let index = sessions_of.clone();
        let counter = metrics.evicted.clone();
        let listener = move |_k: Arc<String>,
                             _v: Arc<SignalState>,
                             cause: moka::notification::RemovalCause| {
            if cause.was_evicted() {
                counter.inc();
            }
        };
        let counter2 = metrics.evicted.clone();
        let listener2 = move |_k: Arc<String>,
                              _v: Arc<SignalState>,
                              cause: moka::notification::RemovalCause| {
            if cause.was_evicted() {
                counter2.inc();
            }
        };
        Self {
            // LRU, not moka's default TinyLFU: a new signal must always be
            // admitted (TinyLFU may turn a first-seen key away when full).
            by_session: Cache::builder()
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .max_capacity(limits.max_sessions)
                .eviction_listener(listener)
                .build(),
            by_subject: Cache::builder()
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .max_capacity(limits.max_sessions)
                .eviction_listener(listener2)
                .build(),
            // Weighed in bytes: requests can be large (up to
            // `limits.max_request_bytes`), so a count alone bounds nothing.
            tracked: Cache::builder()
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .weigher(|_: &String, t: &Arc<Tracked>| {
                    t.weight.load(Ordering::Relaxed).max(TRACKED_OVERHEAD)
                })
                .max_capacity(limits.max_remembered_bytes)
                .build(),
            subjects: Cache::builder()
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .max_capacity(limits.max_sessions)
                .eviction_listener(move |session: Arc<String>, subject: Arc<str>, _| {
                    lock(&index).evicted(&session, &subject);
                })
                .build(),
            sessions_of,
            any_subject: AtomicBool::new(false),
            limits,
            position: AtomicU64::new(0),
            epoch: std::sync::Mutex::new(String::new()),
            ready: AtomicBool::new(false),
            last_heard: AtomicU64::new(0),
            feed_live: AtomicBool::new(false),
            born: std::time::Instant::now(),
            changes: tokio::sync::broadcast::channel(1024).0,
            metrics,
        }
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn epoch(&self) -> String {
        lock(&self.epoch).clone()
    }

    /// Follows a feed event's epoch: another database than before means the
    /// state held is from a feed that no longer exists, so it is dropped and
    /// the position starts again (the control plane resends everything).
    pub fn follow_epoch(&self, epoch: &str) {
        let mut held = lock(&self.epoch);
        if *held == epoch || epoch.is_empty() {
            return;
        }
        if !held.is_empty() {
            tracing::warn!(
                was = %held,
                now = epoch,
                "the control plane's signal feed is another one now; reloading session state"
            );
            self.by_session.invalidate_all();
            self.by_subject.invalidate_all();
            self.position.store(0, Ordering::Release);
        }
        *held = epoch.to_owned();
    }

    fn millis(&self) -> u64 {
        self.born.elapsed().as_millis() as u64 + 1
    }

    /// The feed is live and caught up: an event after its catch-up
    /// heartbeat just arrived.
    pub fn feed_heard(&self) {
        self.last_heard.store(self.millis(), Ordering::Relaxed);
        self.feed_live.store(true, Ordering::Relaxed);
    }

    /// The feed broke or went silent: signals age from when it was last heard.
    pub fn feed_lost(&self) {
        self.feed_live.store(false, Ordering::Relaxed);
    }

    /// How long since the feed was last heard (zero while it is live; from
    /// the start if it never was).
    pub fn signals_age(&self) -> std::time::Duration {
        if self.feed_live.load(Ordering::Relaxed) {
            return std::time::Duration::ZERO;
        }
        let heard = self.last_heard.load(Ordering::Relaxed).saturating_sub(1);
        std::time::Duration::from_millis(self.millis().saturating_sub(1 + heard))
    }

    pub fn stale_mode(&self) -> StaleSignals {
        self.limits.stale_signals
    }

    /// Whether signals are older than the limit.
    pub fn signals_stale(&self) -> bool {
        !self.limits.max_signal_age.is_zero() && self.signals_age() > self.limits.max_signal_age
    }

    /// Why a decision signals could change must be denied now, if it must:
    /// `stale_signals = "deny"` and the signals are stale, or were never
    /// heard (a start that gave up waiting for the feed).
    pub fn stale_denial(&self) -> Option<String> {
        if self.limits.stale_signals != StaleSignals::Deny {
            return None;
        }
        if self.last_heard.load(Ordering::Relaxed) == 0 {
            return Some(
                "session signals were never heard: the control plane's feed has not been reached since the start".into(),
            );
        }
        self.signals_stale().then(|| {
            format!(
                "session signals are stale: the control plane's feed has not been heard for {} s (sessions.max_signal_age_secs {})",
                self.signals_age().as_secs(),
                self.limits.max_signal_age.as_secs()
            )
        })
    }

    /// Whether subject-wide signals are in use (then any decision's subject
    /// may have some).
    pub fn any_subject_signals(&self) -> bool {
        self.any_subject.load(Ordering::Relaxed)
    }

    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }

    pub fn set_position(&self, seq: u64) {
        let was = self.position.fetch_max(seq, Ordering::AcqRel);
        self.metrics.feed_position.set(was.max(seq) as i64);
    }

    /// The state a decision sees: its session's and its subject's signals.
    pub fn state_for(&self, session_id: Option<&str>, subject: Option<&str>) -> SignalState {
        let session = session_id.and_then(|s| self.by_session.get(s));
        let subject = if self.any_subject.load(Ordering::Relaxed) {
            subject.and_then(|k| self.by_subject.get(k))
        } else {
            None
        };
        SignalState::combine(session.as_deref(), subject.as_deref())
    }

    /// Whether a decision for this subject could be affected by signals.
    pub fn tracks(&self, session_id: Option<&str>) -> bool {
        session_id.is_some() || self.any_subject.load(Ordering::Relaxed)
    }

    pub fn session(&self, session_id: &str) -> Option<Arc<Tracked>> {
        self.tracked.get(session_id)
    }

    /// The subject (`Type::"id"`) of a session this sidecar decided for.
    pub fn subject_of(&self, session_id: &str) -> Option<String> {
        match self.subjects.get(session_id) {
            Some(s) => Some(s.to_string()),
            None => self.tracked.get(session_id)?.subject(),
        }
    }

    /// Remembers an answered decision of a session (the newest answer per
    /// call, at most `max_recent` calls).
    pub fn remember(&self, session_id: &str, subject: String, r: Remembered) {
        let tracked = self
            .tracked
            .get_with_by_ref(session_id, || Arc::new(Tracked::default()));
        let before = self.subjects.get(session_id);
        if before.as_deref() != Some(subject.as_str()) {
            // Indexed first: the cache's listener takes it out again when
            // this very value is evicted (or replaced).
            let subject: Arc<str> = Arc::from(subject.as_str());
            lock(&self.sessions_of).index(session_id, subject.clone());
            self.subjects.insert(session_id.to_owned(), subject);
        }
        *lock(&tracked.subject) = Some(subject);
        // One session may not take more than a sixteenth of the budget (its
        // oldest calls go first), so it cannot push every other one out.
        let per_session = u32::try_from(self.limits.max_remembered_bytes / 16).unwrap_or(u32::MAX);
        let (before, weight) = {
            let mut recent = lock(&tracked.recent);
            recent.retain(|old| old.call != r.call);
            if recent.len() >= self.limits.max_recent {
                recent.pop_front();
            }
            recent.push_back(r);
            let weigh = |recent: &VecDeque<Remembered>| {
                recent
                    .iter()
                    .fold(TRACKED_OVERHEAD, |w, r| w.saturating_add(r.bytes))
            };
            let mut weight = weigh(&recent);
            while weight > per_session && recent.len() > 1 {
                recent.pop_front();
                weight = weigh(&recent);
            }
            (tracked.weight.swap(weight, Ordering::Relaxed), weight)
        };
        // The cache weighs an entry when it is inserted: insert again when
        // the weight moved by a KiB or more (not on every call), unless the
        // session was meanwhile replaced by another caller's.
        if before / 1024 != weight / 1024 {
            match self.tracked.get(session_id) {
                Some(current) if !Arc::ptr_eq(&current, &tracked) => {}
                _ => self.tracked.insert(session_id.to_owned(), tracked),
            }
        }
    }

    /// About how many bytes remembered requests take (for metrics).
    pub fn remembered_bytes(&self) -> u64 {
        self.tracked.run_pending_tasks();
        self.tracked.weighted_size()
    }

    /// Applies a session-wide signal state; returns the session's
    /// remembered decisions, if it has any.
    pub fn apply_session(&self, session_id: &str, state: SignalState) -> Option<Arc<Tracked>> {
        self.by_session
            .insert(session_id.to_owned(), Arc::new(state));
        self.tracked.get(session_id)
    }

    /// Applies a subject-wide signal state; returns the sessions of that
    /// subject this sidecar has seen, with their remembered decisions if
    /// they still have any.
    pub fn apply_subject(
        &self,
        subject: &str,
        state: SignalState,
    ) -> Vec<(String, Option<Arc<Tracked>>)> {
        self.by_subject.insert(subject.to_owned(), Arc::new(state));
        self.any_subject.store(true, Ordering::Relaxed);
        let sessions: Vec<String> = lock(&self.sessions_of)
            .by_subject
            .get(subject)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        sessions
            .into_iter()
            .filter(|id| self.subjects.get(id).as_deref() == Some(subject))
            .map(|id| {
                let tracked = self.tracked.get(&id);
                (id, tracked)
            })
            .collect()
    }

    pub fn publish(&self, change: SessionChange) {
        // No watcher is fine.
        let _ = self.changes.send(Arc::new(change));
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<SessionChange>> {
        self.changes.subscribe()
    }

    /// Sessions and subjects with signal state held (for metrics and tests).
    pub fn held(&self) -> u64 {
        self.by_session.run_pending_tasks();
        self.by_subject.run_pending_tasks();
        self.by_session.entry_count() + self.by_subject.entry_count()
    }
}

/// The subject key signals name: `Type::"id"`.
pub fn subject_key(kind: &str, id: &str) -> String {
    format!("{kind}::{}", Value::String(id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(risk: &str, revoked: bool, version: u64) -> SignalState {
        SignalState {
            risk: risk.into(),
            revoked,
            version,
            ..Default::default()
        }
    }

    #[test]
    fn session_and_subject_combine_to_the_stricter() {
        let a = state("high", false, 3);
        let b = SignalState {
            assurance: "aal2".into(),
            device_compliant: false,
            ..state("medium", true, 5)
        };
        let c = SignalState::combine(Some(&a), Some(&b));
        assert_eq!(
            (
                c.risk.as_str(),
                c.revoked,
                c.device_compliant,
                c.assurance.as_str()
            ),
            ("high", true, false, "aal2")
        );
        assert_eq!(SignalState::combine(None, None), SignalState::default());
        // A newer state without an assurance level keeps the other's.
        let signed_in = SignalState {
            assurance: "aal2".into(),
            ..state("low", false, 3)
        };
        let later_risk = state("medium", false, 8);
        let c = SignalState::combine(Some(&signed_in), Some(&later_risk));
        assert_eq!((c.risk.as_str(), c.assurance.as_str()), ("medium", "aal2"));
        let c = SignalState::combine(Some(&later_risk), Some(&signed_in));
        assert_eq!(c.assurance, "aal2");
    }

    #[test]
    fn memory_stays_within_the_budget() {
        let s = Sessions::new(
            Limits {
                max_sessions: 100,
                max_recent: 4,
                ..Limits::default()
            },
            SessionMetrics::default(),
        );
        s.set_ready();
        for i in 0..5_000 {
            s.apply_session(&format!("s{i}"), state("high", false, i));
        }
        assert!(s.held() <= 100, "held {}", s.held());
        assert!(s.metrics.evicted.get() >= 4_900);
    }

    #[test]
    fn the_newest_signal_is_kept_when_the_budget_is_full() {
        let s = Sessions::new(
            Limits {
                max_sessions: 10,
                max_recent: 4,
                ..Limits::default()
            },
            SessionMetrics::default(),
        );
        s.set_ready();
        for i in 0..100 {
            s.apply_session(&format!("s{i}"), state("medium", false, i));
            s.held();
        }
        s.apply_session("last", state("high", true, 100));
        s.held();
        assert!(s.state_for(Some("last"), None).revoked);
    }

    #[test]
    fn callers_cannot_push_signal_state_out() {
        let s = Sessions::new(
            Limits {
                max_sessions: 10,
                max_recent: 4,
                ..Limits::default()
            },
            SessionMetrics::default(),
        );
        s.set_ready();
        s.apply_session("victim", state("low", true, 1));
        for i in 0..1_000 {
            let mut req = request("u");
            req.session_id = Some(format!("junk-{i}"));
            s.remember(
                &format!("junk-{i}"),
                subject_key("User", "u"),
                Remembered::new(format!("d{i}"), req, Outcome::Allow),
            );
        }
        s.held();
        assert!(s.state_for(Some("victim"), None).revoked);
    }

    #[test]
    fn remembered_requests_stay_within_the_byte_budget() {
        let budget = 1 << 20;
        let s = Sessions::new(
            Limits {
                max_remembered_bytes: budget,
                ..Limits::default()
            },
            SessionMetrics::default(),
        );
        s.set_ready();
        // 2,000 sessions × 4 calls × ~12 KiB of context: ~96 MiB if kept.
        let big = Value::String("x".repeat(12 << 10));
        for i in 0..2_000 {
            for call in 0..4 {
                let mut req = request(&format!("u{call}"));
                req.context.insert("blob".into(), big.clone());
                req.session_id = Some(format!("s{i}"));
                s.remember(
                    &format!("s{i}"),
                    subject_key("User", "u"),
                    Remembered::new(format!("d{i}-{call}"), req, Outcome::Allow),
                );
            }
        }
        let used = s.remembered_bytes();
        assert!(used <= budget, "{used} bytes remembered, budget {budget}");
        assert!(
            used >= budget / 2,
            "the budget is used, not emptied: {used}"
        );
        // The most recent session is kept whole; the oldest went first.
        assert_eq!(s.session("s1999").expect("newest kept").recent().len(), 4);
        assert!(s.session("s0").is_none());

        // One session of large calls keeps only its newest within a
        // sixteenth of the budget (64 KiB here), never fewer than one.
        let huge = Value::String("y".repeat(40 << 10));
        for call in 0..4 {
            let mut req = request(&format!("u{call}"));
            req.context.insert("blob".into(), huge.clone());
            s.remember(
                "greedy",
                subject_key("User", "u"),
                Remembered::new(format!("g{call}"), req, Outcome::Allow),
            );
        }
        let kept = s.session("greedy").expect("kept").recent();
        assert_eq!(kept.len(), 1, "only the newest 40 KiB call fits in 64 KiB");
        assert_eq!(kept[0].decision_id, "g3");
        assert!(
            s.session("s1999").is_some(),
            "the others are not pushed out"
        );
    }

    #[test]
    fn a_session_whose_requests_were_pushed_out_still_hears_its_subject() {
        let s = Sessions::new(
            Limits {
                max_remembered_bytes: 64 << 10,
                ..Limits::default()
            },
            SessionMetrics::default(),
        );
        s.set_ready();
        let remember = |session: &str, user: &str| {
            let mut req = request(user);
            req.context
                .insert("blob".into(), Value::String("x".repeat(2 << 10)));
            s.remember(
                session,
                subject_key("User", user),
                Remembered::new(format!("d-{session}"), req, Outcome::Allow),
            );
        };
        remember("mine", "alice");
        for i in 0..200 {
            remember(&format!("other-{i}"), "bob");
        }
        s.remembered_bytes();
        assert!(s.session("mine").is_none(), "its requests were pushed out");
        let hit = s.apply_subject("User::\"alice\"", state("low", true, 2));
        assert_eq!(hit.len(), 1);
        assert_eq!(hit[0].0, "mine");
        assert!(hit[0].1.is_none());
        assert_eq!(s.subject_of("mine").as_deref(), Some("User::\"alice\""));
    }

    #[test]
    fn the_subject_index_follows_the_bounded_sessions() {
        let s = Sessions::new(
            Limits {
                max_sessions: 10,
                ..Limits::default()
            },
            SessionMetrics::default(),
        );
        s.set_ready();
        for i in 0..1_000 {
            let mut req = request("alice");
            req.session_id = Some(format!("s{i}"));
            s.remember(
                &format!("s{i}"),
                subject_key("User", "alice"),
                Remembered::new(format!("d{i}"), req, Outcome::Allow),
            );
        }
        s.subjects.run_pending_tasks();
        let indexed = lock(&s.sessions_of)
            .by_subject
            .get("User::\"alice\"")
            .map_or(0, HashSet::len);
        assert!(indexed <= 10, "{indexed} sessions indexed for 10 kept");
        let hit = s.apply_subject("User::\"alice\"", state("low", true, 2));
        assert!(!hit.is_empty() && hit.len() <= 10, "{}", hit.len());
        assert!(
            hit.iter().any(|(id, _)| id == "s999"),
            "the newest is found"
        );
        // A session that changes hands leaves its first subject's list.
        let mut req = request("bob");
        req.session_id = Some("s999".into());
        s.remember(
            "s999",
            subject_key("User", "bob"),
            Remembered::new("d-bob".into(), req, Outcome::Allow),
        );
        s.subjects.run_pending_tasks();
        let hit = s.apply_subject("User::\"alice\"", state("low", true, 3));
        assert!(hit.iter().all(|(id, _)| id != "s999"));
        assert_eq!(
            s.apply_subject("User::\"bob\"", state("low", true, 4))
                .len(),
            1
        );
    }

    #[test]
    fn an_eviction_does_not_undo_a_newer_index_entry() {
        let mut index = SessionsBySubject::default();
        let evicted: Arc<str> = Arc::from("User::\"alice\"");
        index.index("s", evicted.clone());
        // Re-indexed (same subject, a new value) before the eviction of the
        // old value is told: the session stays indexed.
        index.index("s", Arc::from("User::\"alice\""));
        index.evicted("s", &evicted);
        assert!(index.by_subject["User::\"alice\""].contains("s"));
        // The eviction of the value indexed now takes it out.
        let now = index.indexed["s"].clone();
        index.evicted("s", &now);
        assert!(index.by_subject.is_empty() && index.indexed.is_empty());
    }

    #[test]
    fn signals_go_stale_when_the_feed_is_not_heard() {
        let limits = |mode| Limits {
            max_signal_age: std::time::Duration::from_millis(50),
            stale_signals: mode,
            ..Limits::default()
        };
        let s = Sessions::new(limits(StaleSignals::Deny), SessionMetrics::default());
        let never = s.stale_denial().expect("never heard: denied under deny");
        assert!(never.contains("never heard"), "{never}");
        s.feed_heard();
        assert_eq!(s.signals_age(), std::time::Duration::ZERO);
        assert!(s.stale_denial().is_none());
        s.feed_lost();
        assert!(s.stale_denial().is_none(), "within the limit");
        std::thread::sleep(std::time::Duration::from_millis(80));
        assert!(s.signals_age() >= std::time::Duration::from_millis(80));
        let stale = s.stale_denial().expect("past the limit");
        assert!(stale.contains("are stale"), "{stale}");
        s.feed_heard();
        assert!(s.stale_denial().is_none(), "fresh again");

        // `decide` never denies, but the staleness still shows.
        let s = Sessions::new(limits(StaleSignals::Decide), SessionMetrics::default());
        std::thread::sleep(std::time::Duration::from_millis(80));
        assert!(s.signals_stale());
        assert!(s.stale_denial().is_none());
    }

    fn request(user: &str) -> Request {
        Request {
            subject: crate::decision::EntityRef {
                kind: "User".into(),
                id: user.into(),
                properties: None,
            },
            action: "view".into(),
            resource: crate::decision::EntityRef {
                kind: "Doc".into(),
                id: "d".into(),
                properties: None,
            },
            context: Map::new(),
            session_id: None,
        }
    }

    #[test]
    fn a_signal_before_the_session_applies_when_it_appears() {
        let s = Sessions::new(Limits::default(), SessionMetrics::default());
        s.set_ready();
        s.apply_session("later", state("high", false, 1));
        assert_eq!(s.state_for(Some("later"), None).risk, "high");
        assert_eq!(s.state_for(Some("other"), None).risk, "low");
    }

    #[test]
    fn subject_signals_reach_every_session_of_the_subject() {
        let s = Sessions::new(Limits::default(), SessionMetrics::default());
        s.set_ready();
        assert_eq!(subject_key("User", "alice"), "User::\"alice\"");
        let req = Request {
            session_id: Some("s1".into()),
            ..request("alice")
        };
        s.remember(
            "s1",
            subject_key("User", "alice"),
            Remembered::new("d1".into(), req, Outcome::Allow),
        );
        let hit = s.apply_subject("User::\"alice\"", state("low", true, 2));
        assert_eq!(hit.len(), 1);
        assert!(s.state_for(Some("s1"), Some("User::\"alice\"")).revoked);
        assert!(!s.state_for(Some("s1"), None).revoked);
    }
}
