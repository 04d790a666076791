//! The decision service: the one place every API adapter calls. It holds the
//! active engine behind an atomic pointer, the decision cache, metrics, and the
//! sink that records decisions.
//!
//! ```text
//! adapter ──Request──▶ Decider::check ──▶ active Engine (ArcSwap load, no lock)
//!                          │  cache (per revision, optional)
//!                          ├─▶ metrics (atomic adds)
//!                          └─▶ DecisionSink (non-blocking hand-off)
//! ```

mod model;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use moka::sync::Cache;

pub use model::{
    Answer, DETAILS_WITHHELD, Decision, EntityRef, Obligation, Outcome, Request, StepUp,
};

use crate::decision_log::Entry;
use crate::policy::{Engine, RequestError};
use crate::sessions::{ChangedDecision, Remembered, Sessions, SignalState, Tracked, subject_key};
use crate::telemetry::Metrics;

/// Receives every answered decision. Implementations must not block: the
/// decision path calls this inline (the decision trail hands records to a
/// bounded queue here). What it cannot finish at once it returns as a wait.
pub trait DecisionSink: Send + Sync {
    fn record(&self, entry: Entry) -> Handoff;

    /// Why the sink can take no more records, once that is so for good
    /// (every decision is refused from then on): health reports it.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// What a sink made of a record.
pub enum Handoff {
    /// Taken; the answer may leave.
    Done,
    /// The answer may leave once this resolves `Ok` (a durable record, or a
    /// full queue under the `block` overflow policy).
    Wait(std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>),
    /// Not taken: the decision must not be answered.
    Refused(String),
}

impl Handoff {
    pub async fn settle(self) -> Result<(), CheckError> {
        match self {
            Handoff::Done => Ok(()),
            Handoff::Wait(w) => w.await.map_err(CheckError::NotRecorded),
            Handoff::Refused(why) => Err(CheckError::NotRecorded(why)),
        }
    }
}

/// About the call a decision answers, for its record.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// The API that asked: `check`, `check_batch`, ...
    pub kind: &'static str,
    /// W3C trace id and parent span id of the caller's `traceparent`, if any.
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    /// Whose subject-wide signals apply, when not the request's subject (a
    /// tool call's user, not its agent), as `Type::"id"`.
    pub signals_subject: Option<String>,
}

/// What a decision is linked to beyond its request: the approval it filed or
/// spent. Carried to the answer and the record.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Links {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_expires_at: Option<String>,
    /// Who granted the approval this decision spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// Why an approval could not be filed or spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_error: Option<String>,
}

/// Decision cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Most decisions kept; 0 turns the cache off.
    pub max_entries: u64,
    /// How long a cached decision is served.
    pub ttl: Duration,
}

impl CacheSettings {
    pub const OFF: CacheSettings = CacheSettings {
        max_entries: 0,
        ttl: Duration::ZERO,
    };
}

/// An engine and the cache of its decisions. The cache lives and dies with
/// its revision, so a cached decision can never outlive the bundle that made it.
pub struct Active {
    pub engine: Engine,
    cache: Option<Cache<Vec<u8>, Arc<Decision>>>,
}

/// Why a check got no decision.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no policy bundle is active yet")]
    NotReady,
    #[error("session signals are not loaded yet; retry shortly")]
    SignalsNotLoaded,
    #[error(transparent)]
    Invalid(#[from] RequestError),
    #[error("{0}")]
    NotRecorded(String),
}

pub struct Decider {
    active: ArcSwapOption<Active>,
    /// The active revision, for whoever waits on activations (health).
    revision: tokio::sync::watch::Sender<Option<Arc<str>>>,
    /// Set while the bundle is stale under the `deny-all` fail mode.
    deny_all: std::sync::atomic::AtomicBool,
    cache: CacheSettings,
    metrics: Arc<Metrics>,
    sink: Option<Arc<dyn DecisionSink>>,
    sessions: Option<Arc<Sessions>>,
}

impl Decider {
    pub fn new(
        cache: CacheSettings,
        metrics: Arc<Metrics>,
        sink: Option<Arc<dyn DecisionSink>>,
    ) -> Self {
        Self {
            active: ArcSwapOption::empty(),
            revision: tokio::sync::watch::Sender::new(None),
            deny_all: std::sync::atomic::AtomicBool::new(false),
            cache,
            metrics,
            sink,
            sessions: None,
        }
    }

    /// Adds session state from control-plane signals to decisions.
    pub fn with_sessions(mut self, sessions: Arc<Sessions>) -> Self {
        self.sessions = Some(sessions);
        self
    }

    pub fn sessions(&self) -> Option<&Arc<Sessions>> {
        self.sessions.as_ref()
    }

    /// Why decisions cannot be answered until a restart, if that is so.
    pub fn sink_failure(&self) -> Option<String> {
        self.sink.as_ref().and_then(|s| s.failure())
    }

    /// Makes `engine` answer every decision from now on. In-flight decisions
    /// finish on the engine they started with.
    pub fn activate(&self, engine: Engine) {
        self.metrics
            .bundle_activated(engine.name(), engine.revision(), engine.policy_count());
        let cache = (self.cache.max_entries > 0).then(|| {
            Cache::builder()
                .max_capacity(self.cache.max_entries)
                .time_to_live(self.cache.ttl)
                .build()
        });
        let revision = engine.revision().clone();
        self.active.store(Some(Arc::new(Active { engine, cache })));
        self.revision.send_replace(Some(revision));
    }

    /// While on, every decision is DENY with the reason in its errors (a
    /// stale bundle under the `deny-all` fail mode).
    pub fn set_deny_all(&self, on: bool) {
        self.deny_all
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Follows activations: the receiver sees each newly active revision.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<Arc<str>>> {
        self.revision.subscribe()
    }

    /// The active engine, if any; hold it to decide several requests on one revision.
    pub fn snapshot(&self) -> Option<Arc<Active>> {
        self.active.load_full()
    }

    /// Decides and, once its record is handed over as the sink requires,
    /// answers.
    pub async fn check(&self, request: Request, call: &Call) -> Result<Answer, CheckError> {
        let active = self.snapshot().ok_or(CheckError::NotReady)?;
        let (answer, handoff) = self.check_on(&active, request, call)?;
        handoff.settle().await?;
        Ok(answer)
    }

    /// Decides on a given snapshot (a batch decides every item on one
    /// revision). The answer may leave once the handoff settles.
    pub fn check_on(
        &self,
        active: &Arc<Active>,
        mut request: Request,
        call: &Call,
    ) -> Result<(Answer, Handoff), CheckError> {
        let start = Instant::now();
        let decision = self.evaluate(active, &mut request, call.signals_subject.as_deref())?;
        let id = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext));
        Ok(self.conclude(active, request, call, decision, start, Links::default(), id))
    }

    /// Decides without answering or recording: the request gets its session
    /// state added to its context (as its record will show it).
    pub fn evaluate(
        &self,
        active: &Arc<Active>,
        request: &mut Request,
        signals_subject: Option<&str>,
    ) -> Result<Arc<Decision>, CheckError> {
        if self.deny_all.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(Arc::new(Self::stale_deny()));
        }
        let state = self.add_session(active, request, signals_subject)?;
        if let Some(deny) = self.stale_signals_deny(request, signals_subject) {
            return Ok(deny);
        }
        let decided = self
            .decide(active, request)
            .inspect_err(|_| self.metrics.rejected())?;
        Ok(self.apply_revocation(active, state.as_ref(), decided))
    }

    /// A DENY for a decision signals could change (it names a session, is
    /// a tool call whose user may have subject-wide signals, or any once
    /// subject-wide signals are in use) while they are stale and
    /// `sessions.stale_signals = "deny"`.
    fn stale_signals_deny(
        &self,
        request: &Request,
        signals_subject: Option<&str>,
    ) -> Option<Arc<Decision>> {
        let sessions = self.sessions.as_ref()?;
        if request.session_id.is_none()
            && signals_subject.is_none()
            && !sessions.any_subject_signals()
        {
            return None;
        }
        let why = sessions.stale_denial()?;
        Some(Arc::new(Decision::deny_own(Vec::new(), vec![why])))
    }

    /// Like `evaluate`, with context attribute `unknown` not known yet (a
    /// tool listed before it is called). Uncached. Returns whether the
    /// outcome depends on `unknown`.
    pub fn evaluate_partially(
        &self,
        active: &Arc<Active>,
        request: &mut Request,
        signals_subject: Option<&str>,
        unknown: &str,
    ) -> Result<(Arc<Decision>, bool), CheckError> {
        if self.deny_all.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok((Arc::new(Self::stale_deny()), false));
        }
        let state = self.add_session(active, request, signals_subject)?;
        if let Some(deny) = self.stale_signals_deny(request, signals_subject) {
            return Ok((deny, false));
        }
        let (decided, depends) = active.engine.decide_partially(request, unknown)?;
        Ok((
            self.apply_revocation(active, state.as_ref(), Arc::new(decided)),
            depends,
        ))
    }

    fn stale_deny() -> Decision {
        Decision::deny_own(
            Vec::new(),
            vec!["the policy bundle is stale and the fail mode is deny-all".to_owned()],
        )
    }

    /// Adds `context.session` where the action declares it; returns the
    /// signal state the decision is subject to.
    fn add_session(
        &self,
        active: &Arc<Active>,
        request: &mut Request,
        signals_subject: Option<&str>,
    ) -> Result<Option<SignalState>, CheckError> {
        if self.sessions.as_ref().is_some_and(|s| !s.ready()) {
            return Err(CheckError::SignalsNotLoaded);
        }
        let state = self.signal_state(request, signals_subject);
        if active.engine.takes_session(&request.action) {
            if request.context.contains_key("session") {
                self.metrics.rejected();
                return Err(RequestError(
                    "`context.session` is set by the sidecar from control-plane signals; do not send it (send `session_id`)".into(),
                )
                .into());
            }
            let state = state.clone().unwrap_or_default();
            let id = request.session_id.as_deref().unwrap_or("");
            request.context.insert("session".into(), state.context(id));
        }
        Ok(state)
    }

    fn apply_revocation(
        &self,
        active: &Arc<Active>,
        state: Option<&SignalState>,
        decided: Arc<Decision>,
    ) -> Arc<Decision> {
        // A revoked session is denied everything, unless every policy that
        // allowed says otherwise (`@session_revoked("allow")`, e.g. logout).
        if let Some(s) = state.filter(|s| s.revoked)
            && decided.outcome != Outcome::Deny
            && !(decided.outcome == Outcome::Allow
                && active.engine.allows_revoked_session(&decided.policy_ids))
        {
            let what = if s.event_id.is_empty() {
                "the session is revoked".to_owned()
            } else {
                format!("the session is revoked (signal {})", s.event_id)
            };
            return Arc::new(Decision::deny_own(decided.policy_ids.clone(), vec![what]));
        }
        decided
    }

    fn signal_state(
        &self,
        request: &Request,
        signals_subject: Option<&str>,
    ) -> Option<SignalState> {
        let sessions = self.sessions.as_ref()?;
        let session = request.session_id.as_deref();
        if !sessions.tracks(session) {
            return None;
        }
        let key;
        let subject = match signals_subject {
            Some(s) => s,
            None => {
                key = subject_key(&request.subject.kind, &request.subject.id);
                &key
            }
        };
        Some(sessions.state_for(session, Some(subject)))
    }

    /// Answers a decision made by `evaluate` under `decision_id` (chosen
    /// beforehand: an approval request names the decision that filed it):
    /// remembers it for its session and hands its record to the sink.
    #[allow(clippy::too_many_arguments)]
    pub fn conclude(
        &self,
        active: &Arc<Active>,
        request: Request,
        call: &Call,
        decision: Arc<Decision>,
        start: Instant,
        links: Links,
        decision_id: uuid::Uuid,
    ) -> (Answer, Handoff) {
        // A decision that spent an approval is not remembered: decided again
        // without it, it would look like a change to watchers. Nor is one
        // made while signals are stale under `deny` (the signal that follows
        // the feed's return would seem to have turned it).
        if let (Some(sessions), Some(session), None) = (
            &self.sessions,
            request.session_id.as_deref(),
            &links.approved_by,
        ) && sessions.stale_denial().is_none()
        {
            let mut plain = request.clone();
            plain.context.remove("session");
            let subject = call
                .signals_subject
                .clone()
                .unwrap_or_else(|| subject_key(&request.subject.kind, &request.subject.id));
            sessions.remember(
                session,
                subject,
                Remembered::new(decision_id.to_string(), plain, decision.outcome),
            );
        }
        self.hand_over(
            active,
            request,
            call,
            decision,
            start,
            links,
            decision_id,
            false,
        )
    }

    /// Concludes a tool listing's verdict: recorded (with whether it holds
    /// only for some arguments), not remembered for its session (decided
    /// without the call's arguments, deciding it again later would not say
    /// whether a call turned). Returns the verdict's decision id.
    pub fn conclude_listed(
        &self,
        active: &Arc<Active>,
        request: Request,
        call: &Call,
        decision: Arc<Decision>,
        start: Instant,
        depends_on_arguments: bool,
    ) -> (uuid::Uuid, Handoff) {
        let id = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext));
        let (_, handoff) = self.hand_over(
            active,
            request,
            call,
            decision,
            start,
            Links::default(),
            id,
            depends_on_arguments,
        );
        (id, handoff)
    }

    /// Counts a decision and hands its record to the sink.
    #[allow(clippy::too_many_arguments)]
    fn hand_over(
        &self,
        active: &Arc<Active>,
        request: Request,
        call: &Call,
        decision: Arc<Decision>,
        start: Instant,
        links: Links,
        decision_id: uuid::Uuid,
        depends_on_arguments: bool,
    ) -> (Answer, Handoff) {
        let took = start.elapsed();
        self.metrics.decided(decision.outcome, took);
        let answer = Answer {
            decision_id,
            bundle: active.engine.name().clone(),
            revision: active.engine.revision().clone(),
            decision,
            links: links.clone(),
        };
        let handoff = match &self.sink {
            None => Handoff::Done,
            Some(sink) => sink.record(Entry {
                time_us: crate::decision_log::time::now_micros(),
                decision_id: answer.decision_id,
                kind: call.kind,
                bundle: answer.bundle.clone(),
                revision: answer.revision.clone(),
                request,
                decision: answer.decision.clone(),
                latency: took,
                trace_id: call.trace_id.clone(),
                span_id: call.span_id.clone(),
                mask: active.engine.masking().clone(),
                links,
                depends_on_arguments,
            }),
        };
        (answer, handoff)
    }

    /// Decides a session's remembered requests again on its current state;
    /// returns those whose outcome changed (and remembers the new outcome).
    pub fn reevaluate(&self, tracked: &Tracked) -> Vec<ChangedDecision> {
        let Some(active) = self.snapshot() else {
            return Vec::new();
        };
        let subject = tracked.subject();
        let mut changed = Vec::new();
        for r in tracked.recent() {
            let mut request = r.request;
            let Ok(now) = self.evaluate(&active, &mut request, subject.as_deref()) else {
                continue;
            };
            if now.outcome != r.outcome {
                tracked.update_outcome(&r.decision_id, now.outcome);
                changed.push(ChangedDecision {
                    decision_id: r.decision_id,
                    previous: r.outcome,
                    current: now.outcome,
                    policy_ids: now.policy_ids.clone(),
                });
            }
        }
        changed
    }

    fn decide(
        &self,
        active: &Arc<Active>,
        request: &Request,
    ) -> Result<Arc<Decision>, RequestError> {
        match &active.cache {
            None => active.engine.decide(request).map(Arc::new),
            Some(cache) => {
                let Some(key) = request.canonical_bytes() else {
                    return active.engine.decide(request).map(Arc::new);
                };
                match cache.get(&key) {
                    Some(hit) => {
                        self.metrics.cache(true);
                        Ok(hit)
                    }
                    None => {
                        self.metrics.cache(false);
                        active.engine.decide(request).map(|d| {
                            let d = Arc::new(d);
                            cache.insert(key, d.clone());
                            d
                        })
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Bundle, Manifest, PolicyFile};
    use crate::policy::CompileOptions;

    fn engine(revision: &str, effect: &str) -> Engine {
        let bundle = Bundle {
            manifest: Manifest {
                name: "b".into(),
                revision: revision.into(),
                description: None,
                files: Default::default(),
            },
            policies: vec![PolicyFile {
                name: "p.cedar".into(),
                text: format!("@id(\"{effect}-all\") {effect}(principal, action, resource);"),
            }],
            schema:
                "entity User; entity Doc; action view appliesTo { principal: User, resource: Doc };"
                    .into(),
            entities: serde_json::json!([]),
            files: Default::default(),
            source: "test".into(),
        };
        Engine::compile(&bundle, CompileOptions::default()).expect("compiles")
    }

    impl Decider {
        /// Decides without a sink (these tests have none).
        fn check_now(&self, request: Request) -> Result<Answer, CheckError> {
            let active = self.snapshot().ok_or(CheckError::NotReady)?;
            self.check_on(&active, request, &Call::default())
                .map(|(a, _)| a)
        }
    }

    fn request() -> Request {
        let e = |kind: &str| EntityRef {
            kind: kind.into(),
            id: "x".into(),
            properties: None,
        };
        Request {
            subject: e("User"),
            action: "view".into(),
            resource: e("Doc"),
            context: serde_json::Map::new(),
            session_id: None,
        }
    }

    /// A bundle whose actions see `context.session`; `logout` stays allowed
    /// for a revoked session.
    fn session_engine() -> Engine {
        let bundle = Bundle {
            manifest: Manifest {
                name: "s".into(),
                revision: "r1".into(),
                description: None,
                files: Default::default(),
            },
            policies: vec![PolicyFile {
                name: "p.cedar".into(),
                text: r#"
                    @id("view") permit(principal, action == Action::"view", resource);
                    @id("risky") forbid(principal, action == Action::"view", resource)
                      when { context.session.risk == "high" };
                    @id("logout") @session_revoked("allow")
                    permit(principal, action == Action::"logout", resource);
                "#
                .into(),
            }],
            schema: r#"entity User; entity Doc;
                type S = { id: String, revoked: Bool, risk: String, assurance: String, device_compliant: Bool };
                action view, logout appliesTo { principal: User, resource: Doc, context: { session: S } };"#
                .into(),
            entities: serde_json::json!([]),
            files: Default::default(),
            source: "test".into(),
        };
        Engine::compile(&bundle, CompileOptions::default()).expect("compiles")
    }

    #[test]
    fn session_state_decides_at_once_and_a_revoked_session_is_denied() {
        let sessions = Arc::new(Sessions::new(
            crate::sessions::Limits::default(),
            crate::telemetry::SessionMetrics::default(),
        ));
        let cache = CacheSettings {
            max_entries: 100,
            ttl: Duration::from_secs(60),
        };
        let decider =
            Decider::new(cache, Arc::new(Metrics::new()), None).with_sessions(sessions.clone());
        decider.activate(session_engine());
        let mut unready = request();
        unready.session_id = Some("s1".into());
        assert!(
            matches!(
                decider.check_now(unready),
                Err(CheckError::SignalsNotLoaded)
            ),
            "no decision before the feed has caught up"
        );
        sessions.set_ready();
        let ask = |action: &str| {
            let mut r = request();
            r.action = action.into();
            r.session_id = Some("s1".into());
            decider.check_now(r).expect("decides")
        };
        assert_eq!(ask("view").decision.outcome, Outcome::Allow);
        assert_eq!(ask("view").decision.outcome, Outcome::Allow, "cached");
        // A signal changes the next answer although the first is cached.
        let high = SignalState {
            risk: "high".into(),
            version: 1,
            ..Default::default()
        };
        sessions.apply_session("s1", high.clone());
        let risky = ask("view");
        assert_eq!(
            (risky.decision.outcome, risky.decision.policy_ids.clone()),
            (Outcome::Deny, vec!["risky".to_owned()])
        );
        // WatchSession's view: the remembered call turned back once risk is low.
        let tracked = sessions.session("s1").expect("tracked");
        sessions.apply_session(
            "s1",
            SignalState {
                version: 2,
                ..Default::default()
            },
        );
        let turned = decider.reevaluate(&tracked);
        assert_eq!(turned.len(), 1, "{turned:?}");
        assert_eq!(
            (turned[0].previous, turned[0].current),
            (Outcome::Deny, Outcome::Allow)
        );

        sessions.apply_session(
            "s1",
            SignalState {
                revoked: true,
                event_id: "e9".into(),
                version: 3,
                ..Default::default()
            },
        );
        let revoked = ask("view");
        assert_eq!(revoked.decision.outcome, Outcome::Deny);
        assert!(revoked.decision.errors[0].contains("revoked (signal e9)"));
        assert_eq!(ask("logout").decision.outcome, Outcome::Allow);

        // Callers cannot supply the session state themselves.
        let mut forged = request();
        forged.context.insert("session".into(), high.context("s1"));
        assert!(matches!(
            decider.check_now(forged),
            Err(CheckError::Invalid(e)) if e.0.contains("set by the sidecar")
        ));
    }

    #[test]
    fn cached_decisions_never_cross_revisions() {
        let cache = CacheSettings {
            max_entries: 100,
            ttl: Duration::from_secs(60),
        };
        let decider = Decider::new(cache, Arc::new(Metrics::new()), None);
        assert!(matches!(
            decider.check_now(request()),
            Err(CheckError::NotReady)
        ));

        decider.activate(engine("r1", "permit"));
        let first = decider.check_now(request()).expect("decides");
        let again = decider.check_now(request()).expect("decides");
        assert_eq!(
            (first.decision.outcome, &*first.revision),
            (Outcome::Allow, "r1")
        );
        assert!(
            Arc::ptr_eq(&first.decision, &again.decision),
            "second answer came from the cache"
        );
        assert_ne!(first.decision_id, again.decision_id);

        decider.activate(engine("r2", "forbid"));
        let after = decider.check_now(request()).expect("decides");
        assert_eq!(
            (after.decision.outcome, &*after.revision),
            (Outcome::Deny, "r2")
        );
        assert_eq!(after.decision.policy_ids, ["forbid-all"]);
    }

    #[test]
    fn a_held_snapshot_keeps_deciding_on_its_revision() {
        let decider = Decider::new(CacheSettings::OFF, Arc::new(Metrics::new()), None);
        decider.activate(engine("r1", "permit"));
        let held = decider.snapshot().expect("active");
        decider.activate(engine("r2", "forbid"));
        let (old, _) = decider
            .check_on(&held, request(), &Call::default())
            .expect("decides");
        assert_eq!(
            (old.decision.outcome, &*old.revision),
            (Outcome::Allow, "r1")
        );
        assert_eq!(
            &*decider.check_now(request()).expect("decides").revision,
            "r2"
        );
    }
}
