//! The `arbiter.v1.Authorizer` gRPC service: convert, decide, convert back.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::convert::{self, Limits, Semantic};
use super::pb::v1::{self as pb, authorizer_server::Authorizer};
use crate::decision::{Call, CheckError, Decider, Outcome};

pub struct AuthorizerService {
    decider: Arc<Decider>,
    limits: Limits,
}

impl AuthorizerService {
    pub fn new(decider: Arc<Decider>, limits: Limits) -> Self {
        Self { decider, limits }
    }
}

/// The one place decision errors become gRPC statuses.
pub(crate) fn status(e: CheckError) -> Status {
    match e {
        CheckError::NotReady => {
            Status::unavailable("no policy bundle is active yet; retry shortly")
        }
        CheckError::Invalid(e) => Status::invalid_argument(e.to_string()),
        CheckError::NotRecorded(why) => Status::unavailable(why),
        CheckError::SignalsNotLoaded => Status::unavailable(e.to_string()),
    }
}

/// A call's record identity, with the trace id and parent span id of a W3C
/// `traceparent` header (`00-<trace id>-<span id>-<flags>`) if it is valid.
pub(crate) fn call(kind: &'static str, metadata: &tonic::metadata::MetadataMap) -> Call {
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Option<(String, String)> = metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let mut it = v.split('-');
            let (_, trace, span) = (it.next()?, it.next()?, it.next()?);
            (hex(trace, 32) && hex(span, 16)).then(|| (trace.to_owned(), span.to_owned()))
        });
    let (trace_id, span_id) = parts.unzip();
    Call {
        kind,
        trace_id,
        span_id,
        signals_subject: None,
    }
}

#[tonic::async_trait]
impl Authorizer for AuthorizerService {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let call = call("check", request.metadata());
        let msg = request.into_inner();
        convert::check_size(msg.encoded_len(), &self.limits)?;
        let req = convert::request(msg, &self.limits)?;
        let answer = self.decider.check(req, &call).await.map_err(status)?;
        Ok(Response::new(convert::answer(&answer)))
    }

    async fn check_batch(
        &self,
        request: Request<pb::CheckBatchRequest>,
    ) -> Result<Response<pb::CheckBatchResponse>, Status> {
        let call = call("check_batch", request.metadata());
        let msg = request.into_inner();
        convert::check_size(msg.encoded_len(), &self.limits)?;
        let (items, semantic) = convert::batch(msg, &self.limits)?;
        // One revision decides the whole batch.
        let active = self
            .decider
            .snapshot()
            .ok_or_else(|| status(CheckError::NotReady))?;
        let mut decided = Vec::with_capacity(items.len());
        for item in items {
            let result =
                item.and_then(|req| self.decider.check_on(&active, req, &call).map_err(status));
            let stop = match &result {
                Ok((a, _)) => match semantic {
                    Semantic::ExecuteAll => false,
                    Semantic::DenyOnFirstDeny => a.decision.outcome != Outcome::Allow,
                    Semantic::PermitOnFirstPermit => a.decision.outcome == Outcome::Allow,
                },
                // An item error is not a permit: it stops deny-on-first-deny.
                Err(_) => semantic == Semantic::DenyOnFirstDeny,
            };
            decided.push(result);
            if stop {
                break;
            }
        }
        // Every record was handed over above; now wait for those that must
        // be kept before answering (they are written together).
        let mut results = Vec::with_capacity(decided.len());
        for result in decided {
            let result = match result {
                Ok((answer, handoff)) => handoff.settle().await.map(|()| answer).map_err(status),
                Err(s) => Err(s),
            };
            results.push(pb::BatchResult {
                result: Some(match result {
                    Ok(answer) => pb::batch_result::Result::Decision(convert::answer(&answer)),
                    Err(s) => pb::batch_result::Result::Error(pb::ItemError {
                        code: code_name(s.code()),
                        message: s.message().to_owned(),
                    }),
                }),
            });
        }
        Ok(Response::new(pb::CheckBatchResponse { results }))
    }
}

/// The gRPC spelling of a status code, e.g. `INVALID_ARGUMENT`.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}
