//! The vocabulary of a decision, free of any wire format: what is asked and
//! what is answered. API adapters convert to and from these types.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An entity named by a request: a Cedar entity type, an id, and the
/// properties that become its attributes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityRef {
    /// Cedar entity type, e.g. `User` or `Acme::User`.
    pub kind: String,
    pub id: String,
    /// `None` when the request gave no properties (the bundle's entity, if any,
    /// supplies them).
    pub properties: Option<Map<String, Value>>,
}

/// "May `subject` do `action` on `resource` in `context`?" (AuthZEN-shaped).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    pub subject: EntityRef,
    /// Action id, e.g. `edit`, or fully qualified `Acme::Action::"edit"`.
    pub action: String,
    pub resource: EntityRef,
    pub context: Map<String, Value>,
    /// The user's session, whose signal state the sidecar adds to the context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

impl Request {
    /// A byte form that keys the decision cache: different requests give
    /// different bytes. Object keys keep the order they came in (serde_json
    /// keeps insertion order here, a feature cedar-policy turns on): maps
    /// from protobuf Structs arrive sorted, but a JSON body with its keys in
    /// another order is another entry (a miss, never a wrong answer).
    /// `None` if it cannot be made: the caller must then not cache, since a
    /// shared fallback key would mix decisions.
    pub fn canonical_bytes(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self).ok()
    }
}

/// The outcome that drives the caller's journey.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Allow,
    Deny,
    StepUp,
    ApprovalRequired,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Allow,
        Outcome::Deny,
        Outcome::StepUp,
        Outcome::ApprovalRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "ALLOW",
            Outcome::Deny => "DENY",
            Outcome::StepUp => "STEP_UP",
            Outcome::ApprovalRequired => "APPROVAL_REQUIRED",
        }
    }
}

/// Stronger authentication required, in RFC 9470 terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepUp {
    /// Acceptable ACRs, most preferred first.
    pub acr_values: Vec<String>,
    /// Maximum seconds since the last authentication.
    pub max_age: Option<u64>,
}

/// A duty carried by an annotation of a deciding policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Obligation {
    pub key: String,
    pub value: String,
    pub policy_id: String,
}

/// What the policy engine concluded for one request. The same request under
/// the same revision always yields an equal `Decision`, so it can be cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub outcome: Outcome,
    /// `@id`s of the deciding policies, sorted.
    pub policy_ids: Vec<String>,
    pub step_up: Option<StepUp>,
    /// Groups that must approve, for `APPROVAL_REQUIRED`.
    pub approver_groups: Vec<String>,
    pub obligations: Vec<Obligation>,
    /// Evaluation errors; non-empty only with `DENY` (fail closed).
    pub errors: Vec<String>,
    /// `errors` without the request values they may quote (Cedar's messages
    /// name entities and attribute values): for Cedar's, each names the
    /// policy and the kind of failure only. The decision log writes these
    /// when the bundle masks request fields; with `None` it withholds each
    /// error. [`Decision::deny_own`] sets them for the sidecar's own errors.
    #[serde(skip)]
    pub redacted_errors: Option<Vec<String>>,
}

/// Ends an error's redacted form: what the log writes under masking rules
/// in place of the request values the error would quote.
pub const DETAILS_WITHHELD: &str = "(details withheld: the bundle masks request fields)";

impl Decision {
    pub fn deny(policy_ids: Vec<String>, errors: Vec<String>) -> Self {
        Self {
            outcome: Outcome::Deny,
            policy_ids,
            step_up: None,
            approver_groups: Vec::new(),
            obligations: Vec::new(),
            errors,
            redacted_errors: None,
        }
    }

    /// A deny with errors the sidecar wrote itself from what it knows (its
    /// bundle, its signal feed, its control plane), quoting no request
    /// value: they are logged as they are, also under masking rules.
    pub fn deny_own(policy_ids: Vec<String>, errors: Vec<String>) -> Self {
        Self {
            redacted_errors: Some(errors.clone()),
            ..Self::deny(policy_ids, errors)
        }
    }
}

/// A decision as answered to a caller: the engine's conclusion plus the
/// identity of this answer and of the bundle that made it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Unique per answer, also for cached decisions (UUIDv7).
    pub decision_id: uuid::Uuid,
    pub bundle: Arc<str>,
    pub revision: Arc<str>,
    pub decision: Arc<Decision>,
    /// The approval this answer filed or spent, if any.
    pub links: super::Links,
}
