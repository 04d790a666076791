//! The sidecar's journey link to the control plane, over the same gRPC
//! channel kind as the decision trail: it follows the feed of signals (and
//! resumes after the last position applied when the stream breaks), and it
//! files and spends approvals.

use std::sync::Arc;
use std::time::Duration;

use crate::controlplane::client::{AuthedChannel, SidecarAuth};
use tokio::sync::watch;

use super::{SessionChange, Sessions, SignalState};
use crate::api::pb::v1::{self as pb, sessions_client::SessionsClient};
use crate::decision::Decider;

/// The control plane's `arbiter.v1.Sessions` service.
#[derive(Clone)]
pub struct Link {
    client: SessionsClient<AuthedChannel>,
    /// Bound on each approval call: an APPROVAL_REQUIRED answer waits for it.
    timeout: Duration,
}

impl Link {
    pub fn new(
        url: &str,
        ca: Option<&std::path::Path>,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, crate::controlplane::FetchError> {
        let channel = crate::controlplane::client::grpc_channel(url, timeout, ca)?;
        Ok(Self {
            client: SessionsClient::with_interceptor(channel, SidecarAuth::new(token)?),
            timeout,
        })
    }

    pub async fn request_approval(
        &self,
        binding: pb::ApprovalBinding,
    ) -> Result<pb::ApprovalTicket, String> {
        let mut c = self.client.clone();
        match tokio::time::timeout(self.timeout, c.request_approval(binding)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!(
                "the control plane did not file the approval request: {}",
                s.message()
            )),
            Err(_) => Err("the control plane did not answer the approval request in time".into()),
        }
    }

    /// Spends a grant; asks once more if the first answer is lost (the
    /// control plane answers the same decision the same way again).
    pub async fn redeem(&self, req: pb::RedeemRequest) -> Result<pb::RedeemResult, String> {
        match self.redeem_once(req.clone()).await {
            Err(_) => self.redeem_once(req).await,
            answered => answered,
        }
    }

    async fn redeem_once(&self, req: pb::RedeemRequest) -> Result<pb::RedeemResult, String> {
        let mut c = self.client.clone();
        match tokio::time::timeout(self.timeout, c.redeem_approval(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!(
                "the control plane could not check the approval: {}",
                s.message()
            )),
            Err(_) => Err("the control plane did not answer the approval check in time".into()),
        }
    }
}

/// Longest a followed feed may say nothing (it heartbeats every 10 s).
const SILENT: Duration = Duration::from_secs(30);

/// Every second until `stop`: how old the signals are, for the metric, and
/// a log line when they go stale or fresh again.
pub async fn watch_age(sessions: Arc<Sessions>, mut stop: watch::Receiver<bool>) {
    let mut was_stale = false;
    loop {
        let age = sessions.signals_age();
        sessions.metrics.signals_age.set(age.as_secs() as i64);
        let stale = sessions.signals_stale();
        if stale && !was_stale {
            tracing::warn!(
                age_secs = age.as_secs(),
                mode = ?sessions.stale_mode(),
                "session signals are stale: the control plane's feed is down"
            );
        } else if was_stale && !stale {
            tracing::info!("session signals are current again");
        }
        was_stale = stale;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Follows the feed until `stop`, applying each change to `sessions` and
/// telling watchers which remembered decisions it turned.
pub async fn follow(
    link: Link,
    sessions: Arc<Sessions>,
    decider: Arc<Decider>,
    instance_id: String,
    max_backoff: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut client = link.client.clone();
        let request = pb::FollowRequest {
            after: sessions.position(),
            instance_id: instance_id.clone(),
            epoch: sessions.epoch(),
        };
        let opened = tokio::select! {
            r = client.follow(request) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match opened {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                // Fresh only once this connection has replayed its backlog
                // (the control plane's catch-up heartbeat ends it).
                let mut caught_up = false;
                tracing::info!(
                    position = sessions.position(),
                    "following control-plane signals"
                );
                loop {
                    // A live feed says something at least every heartbeat
                    // (10 s); silence beyond that is a dead connection.
                    let next = tokio::select! {
                        m = tokio::time::timeout(SILENT, stream.message()) => m,
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    match next {
                        Ok(Ok(Some(event))) => {
                            backoff = Duration::from_millis(100);
                            caught_up |=
                                matches!(event.event, Some(pb::feed_event::Event::Heartbeat(_)));
                            // Heard before applied: the catch-up heartbeat also
                            // makes the sidecar ready, and a ready sidecar
                            // must not look as if it never heard the feed.
                            if caught_up {
                                sessions.feed_heard();
                            }
                            apply(&sessions, &decider, event);
                        }
                        Ok(Ok(None)) => break,
                        Ok(Err(s)) => {
                            tracing::warn!("signal feed broke: {}", s.message());
                            break;
                        }
                        Err(_) => {
                            tracing::warn!(
                                silent_secs = SILENT.as_secs(),
                                "signal feed went silent; reconnecting"
                            );
                            break;
                        }
                    }
                }
                sessions.feed_lost();
            }
            Err(s) => {
                sessions.feed_lost();
                tracing::warn!("cannot follow control-plane signals: {}", s.message())
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// Applies one feed event.
pub fn apply(sessions: &Sessions, decider: &Decider, event: pb::FeedEvent) {
    sessions.follow_epoch(&event.epoch);
    let seq = event.seq;
    let heartbeat = matches!(event.event, Some(pb::feed_event::Event::Heartbeat(_)));
    // An approval decided for a session: its watchers (an agent runtime
    // waiting to retry) learn at once.
    if let Some(pb::feed_event::Event::Approval(a)) = &event.event
        && !a.session_id.is_empty()
        && a.state != "pending"
        && seq > sessions.position()
    {
        let subject = sessions.subject_of(&a.session_id);
        sessions.publish(SessionChange {
            state: sessions.state_for(Some(&a.session_id), subject.as_deref()),
            session_id: a.session_id.clone(),
            cause: if a.by.is_empty() {
                format!("approval {} {}", a.id, a.state)
            } else {
                format!("approval {} {} by {}", a.id, a.state, a.by)
            },
            changed: Vec::new(),
        });
    }
    if let Some(pb::feed_event::Event::Signal(s)) = event.event {
        sessions.metrics.signals_applied.inc();
        let state = SignalState {
            revoked: s.revoked,
            risk: s.risk,
            assurance: s.assurance,
            device_compliant: s.device_compliant,
            version: seq,
            last_event: s.last_event,
            event_id: s.event_id,
        };
        let touched = if s.target_kind == "session" {
            vec![(
                s.target.clone(),
                sessions.apply_session(&s.target, state.clone()),
            )]
        } else {
            sessions.apply_subject(&s.target, state.clone())
        };
        for (session_id, tracked) in touched {
            let changed = tracked
                .as_ref()
                .map(|t| decider.reevaluate(t))
                .unwrap_or_default();
            let subject = sessions.subject_of(&session_id);
            sessions.publish(SessionChange {
                state: sessions.state_for(Some(&session_id), subject.as_deref()),
                session_id,
                cause: format!("{} ({})", state.last_event, state.event_id),
                changed,
            });
        }
    }
    if heartbeat && !sessions.ready() {
        tracing::info!(position = seq, "session signals caught up");
        sessions.set_ready();
    }
    sessions.set_position(seq);
    sessions.metrics.held.set(sessions.held() as i64);
    sessions
        .metrics
        .remembered_bytes
        .set(sessions.remembered_bytes() as i64);
}
