//! Protobuf ↔ domain, at the edge. Proto structs are destructured in full so
//! a new field breaks the build until it is handled here.

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};
use tonic::Status;

use super::pb::v1 as pb;
use crate::decision::{Answer, EntityRef, Outcome, Request};

/// Input limits applied while converting.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_batch_items: usize,
    pub max_depth: usize,
}

/// AuthZEN `evaluations_semantic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantic {
    ExecuteAll,
    DenyOnFirstDeny,
    PermitOnFirstPermit,
}

/// Longest session id accepted.
const MAX_ID_BYTES: usize = 1024;

/// Rejects a message over the size limit before any conversion work.
pub fn check_size(len: usize, limits: &Limits) -> Result<(), Status> {
    if len > limits.max_request_bytes {
        return Err(Status::invalid_argument(format!(
            "request is {len} bytes, over the limit of {} bytes (limits.max_request_bytes)",
            limits.max_request_bytes
        )));
    }
    Ok(())
}

pub fn request(msg: pb::CheckRequest, limits: &Limits) -> Result<Request, Status> {
    let pb::CheckRequest {
        subject,
        action,
        resource,
        context,
        session_id,
    } = msg;
    let subject = subject.ok_or_else(|| missing("subject"))?;
    let pb::Subject {
        r#type,
        id,
        properties,
    } = subject;
    let subject = entity("subject", r#type, id, properties, limits)?;
    let pb::Action { name, properties } = action.ok_or_else(|| missing("action"))?;
    if name.is_empty() {
        return Err(Status::invalid_argument("`action.name` is required"));
    }
    if properties.is_some_and(|p| !p.fields.is_empty()) {
        return Err(Status::invalid_argument(
            "`action.properties` is not supported: Cedar actions carry no attributes; send these facts in `context`",
        ));
    }
    let pb::Resource {
        r#type,
        id,
        properties,
    } = resource.ok_or_else(|| missing("resource"))?;
    let resource = entity("resource", r#type, id, properties, limits)?;
    let context = match context {
        Some(s) => object(s, "context", 1, limits)?,
        None => Map::new(),
    };
    Ok(Request {
        subject,
        action: name,
        resource,
        context,
        session_id: session(session_id)?,
    })
}

/// A session id, if given (bounded like an entity id).
pub fn session(id: String) -> Result<Option<String>, Status> {
    if id.len() > MAX_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "`session_id` is over {MAX_ID_BYTES} bytes"
        )));
    }
    Ok((!id.is_empty()).then_some(id))
}

/// Splits a batch into requests, each default-filled; an item that does not
/// convert carries its own error instead of failing the batch.
pub fn batch(
    msg: pb::CheckBatchRequest,
    limits: &Limits,
) -> Result<(Vec<Result<Request, Status>>, Semantic), Status> {
    let pb::CheckBatchRequest {
        subject,
        action,
        resource,
        context,
        evaluations,
        semantic,
    } = msg;
    if evaluations.len() > limits.max_batch_items {
        return Err(Status::invalid_argument(format!(
            "batch has {} evaluations, over the limit of {} (limits.max_batch_items)",
            evaluations.len(),
            limits.max_batch_items
        )));
    }
    let semantic = match pb::EvaluationsSemantic::try_from(semantic) {
        Ok(pb::EvaluationsSemantic::ExecuteAll) => Semantic::ExecuteAll,
        Ok(pb::EvaluationsSemantic::DenyOnFirstDeny) => Semantic::DenyOnFirstDeny,
        Ok(pb::EvaluationsSemantic::PermitOnFirstPermit) => Semantic::PermitOnFirstPermit,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown `semantic` value {semantic}"
            )));
        }
    };
    // AuthZEN: with no evaluations, the defaults are the one request.
    let items = if evaluations.is_empty() {
        vec![pb::CheckRequest::default()]
    } else {
        evaluations
    };
    let requests = items
        .into_iter()
        .map(|item| {
            request(
                pb::CheckRequest {
                    subject: item.subject.or_else(|| subject.clone()),
                    action: item.action.or_else(|| action.clone()),
                    resource: item.resource.or_else(|| resource.clone()),
                    context: item.context.or_else(|| context.clone()),
                    session_id: item.session_id,
                },
                limits,
            )
        })
        .collect();
    Ok((requests, semantic))
}

pub fn answer(a: &Answer) -> pb::CheckResponse {
    let d = &a.decision;
    pb::CheckResponse {
        outcome: outcome(d.outcome) as i32,
        decision: d.outcome == Outcome::Allow,
        policy_ids: d.policy_ids.clone(),
        decision_id: a.decision_id.to_string(),
        bundle: a.bundle.to_string(),
        revision: a.revision.to_string(),
        step_up: d.step_up.as_ref().map(|s| pb::StepUp {
            acr_values: s.acr_values.clone(),
            max_age: s.max_age,
        }),
        approval: (d.outcome == Outcome::ApprovalRequired).then(|| pb::Approval {
            approver_groups: d.approver_groups.clone(),
            approval_id: a.links.approval_id.clone().unwrap_or_default(),
            expires_at: a.links.approval_expires_at.clone().unwrap_or_default(),
        }),
        obligations: d
            .obligations
            .iter()
            .map(|o| pb::Obligation {
                key: o.key.clone(),
                value: o.value.clone(),
                policy_id: o.policy_id.clone(),
            })
            .collect(),
        errors: {
            let mut e = d.errors.clone();
            e.extend(a.links.approval_error.clone());
            e
        },
    }
}

pub fn outcome(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::Allow => pb::Outcome::Allow,
        Outcome::Deny => pb::Outcome::Deny,
        Outcome::StepUp => pb::Outcome::StepUp,
        Outcome::ApprovalRequired => pb::Outcome::ApprovalRequired,
    }
}

fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("`{field}` is required"))
}

fn entity(
    role: &str,
    kind: String,
    id: String,
    properties: Option<prost_types::Struct>,
    limits: &Limits,
) -> Result<EntityRef, Status> {
    if kind.is_empty() {
        return Err(missing(&format!("{role}.type")));
    }
    if id.is_empty() {
        return Err(missing(&format!("{role}.id")));
    }
    let properties = properties
        .map(|p| object(p, &format!("{role}.properties"), 1, limits))
        .transpose()?;
    Ok(EntityRef {
        kind,
        id,
        properties,
    })
}

pub(crate) fn object(
    s: prost_types::Struct,
    path: &str,
    depth: usize,
    limits: &Limits,
) -> Result<Map<String, Value>, Status> {
    if depth > limits.max_depth {
        return Err(Status::invalid_argument(format!(
            "`{path}` nests deeper than {} levels (limits.max_depth)",
            limits.max_depth
        )));
    }
    s.fields
        .into_iter()
        .map(|(k, v)| {
            let v = value(v, path, depth, limits)?;
            Ok((k, v))
        })
        .collect()
}

fn value(
    v: prost_types::Value,
    path: &str,
    depth: usize,
    limits: &Limits,
) -> Result<Value, Status> {
    Ok(match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => number(n).ok_or_else(|| {
            Status::invalid_argument(format!("`{path}` holds a number that is not finite"))
        })?,
        Some(Kind::StructValue(s)) => Value::Object(object(s, path, depth + 1, limits)?),
        Some(Kind::ListValue(l)) => {
            if depth + 1 > limits.max_depth {
                return Err(Status::invalid_argument(format!(
                    "`{path}` nests deeper than {} levels (limits.max_depth)",
                    limits.max_depth
                )));
            }
            Value::Array(
                l.values
                    .into_iter()
                    .map(|v| value(v, path, depth + 1, limits))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

/// `Struct` numbers are doubles; whole ones that a double holds exactly
/// become integers so they can be Cedar `Long`s.
fn number(n: f64) -> Option<Value> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if n.fract() == 0.0 && n.abs() <= EXACT {
        Some(Value::Number(Number::from(n as i64)))
    } else {
        Number::from_f64(n).map(Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_request_bytes: 1024,
        max_batch_items: 2,
        max_depth: 3,
    };

    fn nested(levels: usize) -> prost_types::Struct {
        let mut s = prost_types::Struct::default();
        for _ in 0..levels {
            let mut outer = prost_types::Struct::default();
            outer.fields.insert(
                "a".into(),
                prost_types::Value {
                    kind: Some(Kind::StructValue(s)),
                },
            );
            s = outer;
        }
        s
    }

    #[test]
    fn whole_numbers_become_integers() {
        assert_eq!(number(3.0), Some(Value::from(3)));
        assert_eq!(number(1.5), Some(serde_json::json!(1.5)));
        assert_eq!(number(f64::NAN), None);
    }

    #[test]
    fn depth_is_limited() {
        assert!(object(nested(2), "context", 1, &LIMITS).is_ok());
        let err = object(nested(5), "context", 1, &LIMITS).expect_err("too deep");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("max_depth"));
    }
}
