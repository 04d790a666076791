//! The `arbiter.v1.ToolAccess` gRPC service: tool calls of AI agents, their
//! approvals, and watching a session.
//!
//! A tool call becomes an ordinary Cedar request (see the README, "Agents and
//! tools"): principal `Agent::"<agent>"`, action `"<server>/<tool>"` (whose
//! context type is the tool's argument schema), resource
//! `Tool::"<server>/<tool>"`, and a context of `args`, `user` (id, `acr`,
//! `auth_time`, `auth_age_secs`, further claims), `delegation` and `session`
//! — each only where the action's context declares it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{self, Limits};
use super::grpc::{call, status};
use super::pb::v1::{self as pb, tool_access_server::ToolAccess};
use crate::decision::{
    Active, CheckError, DETAILS_WITHHELD, Decider, Decision, EntityRef, Links, Outcome,
};
use crate::sessions::feed::Link;
use crate::sessions::{SessionChange, subject_key};

/// The Cedar entity types of a tool call.
pub const AGENT_TYPE: &str = "Agent";
pub const TOOL_TYPE: &str = "Tool";
pub const USER_TYPE: &str = "User";

pub struct ToolService {
    decider: Arc<Decider>,
    limits: Limits,
    /// Most bytes of a call's arguments.
    max_argument_bytes: usize,
    /// The control plane, for approvals (`None`: approvals cannot be filed).
    link: Option<Link>,
}

impl ToolService {
    pub fn new(
        decider: Arc<Decider>,
        limits: Limits,
        max_argument_bytes: usize,
        link: Option<Link>,
    ) -> Self {
        Self {
            decider,
            limits,
            max_argument_bytes,
            link,
        }
    }
}

/// Who calls, for whom, in which session: shared by both RPCs.
struct Caller {
    agent: EntityRef,
    user_id: String,
    user: Map<String, Value>,
    delegation: Vec<String>,
    session_id: Option<String>,
}

fn required(v: &str, field: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("`{field}` is required")));
    }
    Ok(())
}

impl ToolService {
    fn caller(
        &self,
        agent: Option<pb::Agent>,
        user: Option<pb::User>,
        delegation: Vec<String>,
        session_id: String,
    ) -> Result<Caller, Status> {
        let agent = agent.unwrap_or_default();
        required(&agent.id, "agent.id")?;
        let user = user.unwrap_or_default();
        required(&user.id, "on_behalf_of.id")?;
        let agent_props = agent
            .properties
            .map(|p| convert::object(p, "agent.properties", 1, &self.limits))
            .transpose()?;
        let mut claims = match user.properties {
            Some(p) => convert::object(p, "on_behalf_of.properties", 2, &self.limits)?,
            None => Map::new(),
        };
        for reserved in ["id", "acr", "auth_time", "auth_age_secs"] {
            if claims.contains_key(reserved) {
                return Err(Status::invalid_argument(format!(
                    "`on_behalf_of.properties.{reserved}` is set by the sidecar; use the `on_behalf_of` field"
                )));
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        // Unknown authentication time counts as long ago: never fresh; so
        // does one more than a minute in the future (clock skew allowed).
        let age = if user.auth_time > 0 && user.auth_time <= now + 60 {
            (now - user.auth_time).max(0)
        } else {
            i64::from(i32::MAX)
        };
        claims.insert("id".into(), Value::String(user.id.clone()));
        claims.insert("acr".into(), Value::String(user.acr));
        claims.insert("auth_time".into(), Value::from(user.auth_time.max(0)));
        claims.insert("auth_age_secs".into(), Value::from(age));
        Ok(Caller {
            agent: EntityRef {
                kind: AGENT_TYPE.into(),
                id: agent.id,
                properties: agent_props,
            },
            user_id: user.id,
            user: claims,
            delegation,
            session_id: convert::session(session_id)?,
        })
    }

    /// The request for calling `tool` on `server`, checked against the
    /// bundle (unknown tool → INVALID_ARGUMENT).
    fn request(
        &self,
        active: &Active,
        caller: &Caller,
        server: &str,
        tool: &str,
        args: Option<Map<String, Value>>,
    ) -> Result<crate::decision::Request, Status> {
        required(server, "server")?;
        required(tool, "tool")?;
        let name = format!("{server}/{tool}");
        let engine = &active.engine;
        if !engine.has_action(&name) {
            return Err(Status::invalid_argument(format!(
                "unknown tool `{name}`: the bundle's schema has no action \"{name}\""
            )));
        }
        let mut context = Map::new();
        if engine.context_declares(&name, "user") {
            context.insert("user".into(), Value::Object(caller.user.clone()));
        }
        if engine.context_declares(&name, "delegation") {
            context.insert(
                "delegation".into(),
                Value::Array(
                    caller
                        .delegation
                        .iter()
                        .cloned()
                        .map(Value::String)
                        .collect(),
                ),
            );
        }
        if let Some(args) = args
            && (engine.context_declares(&name, "args") || !args.is_empty())
        {
            context.insert("args".into(), Value::Object(args));
        }
        Ok(crate::decision::Request {
            subject: caller.agent.clone(),
            action: name.clone(),
            resource: EntityRef {
                kind: TOOL_TYPE.into(),
                id: name,
                properties: None,
            },
            context,
            session_id: caller.session_id.clone(),
        })
    }
}

/// Hex SHA-256 of the arguments' canonical JSON (keys sorted at every depth).
pub fn arguments_digest(args: &Map<String, Value>) -> String {
    let mut v = Value::Object(args.clone());
    v.sort_all_objects();
    crate::decision_log::mask::hex(&Sha256::digest(v.to_string().as_bytes()))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::SessionUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ToolAccess for ToolService {
    async fn authorize_tool(
        &self,
        request: Request<pb::AuthorizeToolRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let mut call = call("authorize_tool", request.metadata());
        let msg = request.into_inner();
        convert::check_size(msg.encoded_len(), &self.limits)?;
        let arg_bytes = msg.arguments.as_ref().map_or(0, Message::encoded_len);
        if arg_bytes > self.max_argument_bytes {
            return Err(Status::invalid_argument(format!(
                "`arguments` are {arg_bytes} bytes, over the limit of {} bytes (limits.max_argument_bytes)",
                self.max_argument_bytes
            )));
        }
        let start = Instant::now();
        let caller = self.caller(msg.agent, msg.on_behalf_of, msg.delegation, msg.session_id)?;
        let args = match msg.arguments {
            Some(a) => convert::object(a, "arguments", 2, &self.limits)?,
            None => Map::new(),
        };
        let active = self
            .decider
            .snapshot()
            .ok_or_else(|| status(CheckError::NotReady))?;
        let mut req = self.request(&active, &caller, &msg.server, &msg.tool, Some(args))?;
        let subject = subject_key(USER_TYPE, &caller.user_id);
        call.signals_subject = Some(subject.clone());
        let mut decision = self
            .decider
            .evaluate(&active, &mut req, Some(&subject))
            .map_err(status)?;
        let decision_id = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext));
        let mut links = Links::default();
        if decision.outcome == Outcome::ApprovalRequired {
            let binding = pb::ApprovalBinding {
                subject,
                agent: caller.agent.id.clone(),
                tool: req.action.clone(),
                arguments_digest: match req.context.get("args") {
                    Some(Value::Object(a)) => arguments_digest(a),
                    _ => arguments_digest(&Map::new()),
                },
                approver_groups: decision.approver_groups.clone(),
                session_id: caller.session_id.clone().unwrap_or_default(),
                decision_id: decision_id.to_string(),
                arguments_json: String::new(),
            };
            if msg.approval_id.is_empty() {
                links = self.file_approval(&active, &req, binding).await;
            } else {
                (decision, links) = self
                    .spend_approval(decision, &msg.approval_id, binding)
                    .await;
            }
        }
        let (answer, handoff) =
            self.decider
                .conclude(&active, req, &call, decision, start, links, decision_id);
        handoff.settle().await.map_err(status)?;
        Ok(Response::new(convert::answer(&answer)))
    }

    async fn list_allowed_tools(
        &self,
        request: Request<pb::ListAllowedToolsRequest>,
    ) -> Result<Response<pb::ListAllowedToolsResponse>, Status> {
        let mut call = call("list_allowed_tools", request.metadata());
        let msg = request.into_inner();
        convert::check_size(msg.encoded_len(), &self.limits)?;
        if msg.tools.len() > self.limits.max_batch_items {
            return Err(Status::invalid_argument(format!(
                "{} tools asked, over the limit of {} (limits.max_batch_items)",
                msg.tools.len(),
                self.limits.max_batch_items
            )));
        }
        let caller = self.caller(msg.agent, msg.on_behalf_of, msg.delegation, msg.session_id)?;
        let active = self
            .decider
            .snapshot()
            .ok_or_else(|| status(CheckError::NotReady))?;
        let subject = subject_key(USER_TYPE, &caller.user_id);
        call.signals_subject = Some(subject.clone());
        let mut verdicts = Vec::with_capacity(msg.tools.len());
        for tool in msg.tools {
            let start = Instant::now();
            let mut verdict = pb::ToolVerdict {
                tool: tool.clone(),
                outcome: pb::Outcome::Deny as i32,
                ..Default::default()
            };
            let decided = self
                .request(&active, &caller, &msg.server, &tool, None)
                .and_then(|mut req| {
                    let (d, depends) = self
                        .decider
                        .evaluate_partially(&active, &mut req, Some(&subject), "args")
                        .map_err(status)?;
                    Ok((req, d, depends))
                });
            let handoff = match decided {
                Ok((req, d, depends)) => {
                    verdict.outcome = convert::outcome(d.outcome) as i32;
                    verdict.depends_on_arguments = depends;
                    verdict.policy_ids = d.policy_ids.clone();
                    let (id, handoff) = self
                        .decider
                        .conclude_listed(&active, req, &call, d, start, depends);
                    verdict.decision_id = id.to_string();
                    Some(handoff)
                }
                Err(s) => {
                    verdict.error = s.message().to_owned();
                    None
                }
            };
            verdicts.push((verdict, handoff));
        }
        // Every record is handed over; wait for those that must be kept
        // first. A tool whose record cannot be kept is not listed.
        let mut out = pb::ListAllowedToolsResponse {
            revision: active.engine.revision().to_string(),
            ..Default::default()
        };
        for (mut verdict, handoff) in verdicts {
            if let Some(handoff) = handoff
                && let Err(e) = handoff.settle().await
            {
                verdict.outcome = pb::Outcome::Deny as i32;
                verdict.error = e.to_string();
                verdict.decision_id.clear();
            }
            if verdict.outcome != pb::Outcome::Deny as i32 {
                out.allowed.push(verdict.tool.clone());
            }
            out.tools.push(verdict);
        }
        Ok(Response::new(out))
    }

    type WatchSessionStream = WatchStream;

    async fn watch_session(
        &self,
        request: Request<pb::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        let session_id = request.into_inner().session_id;
        required(&session_id, "session_id")?;
        let Some(sessions) = self.decider.sessions().cloned() else {
            return Err(Status::failed_precondition(
                "sessions are off: this sidecar follows no control plane",
            ));
        };
        // Subscribe before reading the state, so no change falls between.
        let mut changes = sessions.subscribe();
        let subject = sessions.subject_of(&session_id);
        let first = SessionChange {
            state: sessions.state_for(Some(&session_id), subject.as_deref()),
            session_id: session_id.clone(),
            cause: String::new(),
            changed: Vec::new(),
        };
        // Watchers are few; each holds a small buffer and, if it lags behind,
        // gets the current state again rather than growing it.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            if tx.send(Ok(update(&first))).await.is_err() {
                return;
            }
            loop {
                let change = tokio::select! {
                    c = changes.recv() => c,
                    () = tx.closed() => return,
                };
                let msg = match change {
                    Ok(c) if c.session_id == session_id => update(&c),
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let subject = sessions.subject_of(&session_id);
                        update(&SessionChange {
                            state: sessions.state_for(Some(&session_id), subject.as_deref()),
                            session_id: session_id.clone(),
                            cause: "lagged: some changes were skipped; this is the current state"
                                .into(),
                            changed: Vec::new(),
                        })
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

impl ToolService {
    /// Files the approval request for an APPROVAL_REQUIRED answer (or finds
    /// the identical pending one); the answer carries its id or the reason
    /// there is none.
    async fn file_approval(
        &self,
        active: &Active,
        req: &crate::decision::Request,
        mut binding: pb::ApprovalBinding,
    ) -> Links {
        let mut links = Links::default();
        binding.arguments_json = masked_arguments(active, req);
        match &self.link {
            None => {
                links.approval_error =
                    Some("no control plane is configured: approvals cannot be requested".into());
            }
            Some(link) => match link.request_approval(binding).await {
                Ok(t) => {
                    links.approval_id = Some(t.id);
                    links.approval_expires_at = Some(t.expires_at);
                }
                Err(e) => links.approval_error = Some(e),
            },
        }
        links
    }

    /// Spends a grant on a call that (decided again) still needs approval:
    /// at the control plane, so once across every sidecar and restart.
    /// ALLOW if it was granted for exactly this call, else DENY with why.
    async fn spend_approval(
        &self,
        decision: Arc<Decision>,
        approval_id: &str,
        binding: pb::ApprovalBinding,
    ) -> (Arc<Decision>, Links) {
        let mut links = Links {
            approval_id: Some(approval_id.to_owned()),
            ..Links::default()
        };
        let decision_id = binding.decision_id.clone();
        let verdict = match &self.link {
            None => Err("no control plane is configured: approvals cannot be checked".into()),
            Some(link) => {
                link.redeem(pb::RedeemRequest {
                    id: approval_id.to_owned(),
                    binding: Some(binding),
                    decision_id,
                })
                .await
            }
        };
        let decided = match verdict {
            Ok(v) if v.ok => {
                links.approved_by = Some(v.granted_by);
                Decision {
                    outcome: Outcome::Allow,
                    approver_groups: Vec::new(),
                    ..(*decision).clone()
                }
            }
            // The approver's reason may quote the request, so the log's form
            // leaves it out (the record names the approval in `approval_id`).
            Ok(v) => Decision {
                redacted_errors: Some(vec![format!(
                    "the approval does not allow this call {DETAILS_WITHHELD}"
                )]),
                ..Decision::deny(
                    decision.policy_ids.clone(),
                    vec![format!(
                        "approval `{approval_id}` does not allow this call: {}",
                        v.reason
                    )],
                )
            },
            Err(e) => Decision {
                redacted_errors: Some(vec![format!(
                    "the approval could not be checked {DETAILS_WITHHELD}"
                )]),
                ..Decision::deny(decision.policy_ids.clone(), vec![e])
            },
        };
        (Arc::new(decided), links)
    }
}

fn update(c: &SessionChange) -> pb::SessionUpdate {
    pb::SessionUpdate {
        state: Some(pb::SessionState {
            session_id: c.session_id.clone(),
            revoked: c.state.revoked,
            risk: c.state.risk.clone(),
            assurance: c.state.assurance.clone(),
            device_compliant: c.state.device_compliant,
            version: c.state.version,
        }),
        cause: c.cause.clone(),
        changed: c
            .changed
            .iter()
            .map(|d| pb::ChangedDecision {
                decision_id: d.decision_id.clone(),
                previous: convert::outcome(d.previous) as i32,
                current: convert::outcome(d.current) as i32,
                policy_ids: d.policy_ids.clone(),
            })
            .collect(),
    }
}

/// The call's arguments as approvers may see them: masked by the bundle's
/// rules like the request in its record.
fn masked_arguments(active: &Active, req: &crate::decision::Request) -> String {
    let mut form = serde_json::json!({ "context": { "args": req.context.get("args") } });
    active.engine.masking().apply(&mut form);
    form["context"]["args"].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_ignores_key_order() {
        let a: Map<String, Value> =
            serde_json::from_str(r#"{"amount": 800, "meta": {"b": 1, "a": 2}}"#).expect("json");
        let b: Map<String, Value> =
            serde_json::from_str(r#"{"meta": {"a": 2, "b": 1}, "amount": 800}"#).expect("json");
        let c: Map<String, Value> =
            serde_json::from_str(r#"{"amount": 801, "meta": {"a": 2, "b": 1}}"#).expect("json");
        assert_eq!(arguments_digest(&a), arguments_digest(&b));
        assert_ne!(arguments_digest(&a), arguments_digest(&c));
    }
}
