//! `arbiter check`: evaluate one JSON request offline against a bundle
//! directory, or send it to a running sidecar with `--addr`.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::api::json::{request_from_json, request_to_pb};
use crate::api::pb::v1 as pb;
use crate::decision::Outcome;
use crate::policy::CompileOptions;
use crate::server::load_bundle;

/// What a check prints, whichever way it was decided.
#[derive(Debug, Serialize)]
pub struct Report {
    pub outcome: String,
    pub decision: bool,
    pub policy_ids: Vec<String>,
    pub bundle: String,
    pub revision: String,
    pub decision_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acr_values: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub approver_groups: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub obligations: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Report {
    /// Human-readable lines.
    pub fn render(&self) -> String {
        let mut out = format!(
            "outcome:   {}\npolicies:  {}\nbundle:    {} (revision {})\ndecision:  {}\n",
            self.outcome,
            if self.policy_ids.is_empty() {
                "(none)".to_owned()
            } else {
                self.policy_ids.join(", ")
            },
            self.bundle,
            self.revision,
            self.decision_id
        );
        if let Some(acr) = &self.acr_values {
            out.push_str(&format!("step-up:   acr_values={}", acr.join(" ")));
            if let Some(age) = self.max_age {
                out.push_str(&format!(" max_age={age}"));
            }
            out.push('\n');
        }
        if !self.approver_groups.is_empty() {
            out.push_str(&format!("approvers: {}\n", self.approver_groups.join(", ")));
        }
        for o in &self.obligations {
            out.push_str(&format!("obligation: {o}\n"));
        }
        for e in &self.errors {
            out.push_str(&format!("error:     {e}\n"));
        }
        out
    }
}

fn read_request(path: &Path) -> Result<serde_json::Value, String> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("cannot read stdin: {e}"))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?
    };
    serde_json::from_str(&text).map_err(|e| format!("`{}` is not JSON: {e}", path.display()))
}

/// Decides offline against a bundle directory or a signed archive.
pub fn offline(
    bundle: &Path,
    trusted: &[std::path::PathBuf],
    request: &Path,
) -> Result<Report, String> {
    let trusted = crate::bundle::keys::TrustedKeys::load(trusted).map_err(|e| e.to_string())?;
    let engine =
        load_bundle(bundle, &trusted, CompileOptions::default()).map_err(|e| e.to_string())?;
    let req =
        request_from_json(read_request(request)?).map_err(|e| format!("invalid request: {e}"))?;
    let decision = engine
        .decide(&req)
        .map_err(|e| format!("invalid request: {e}"))?;
    Ok(Report {
        outcome: decision.outcome.as_str().to_owned(),
        decision: decision.outcome == Outcome::Allow,
        policy_ids: decision.policy_ids,
        bundle: engine.name().to_string(),
        revision: engine.revision().to_string(),
        decision_id: "(offline)".into(),
        acr_values: decision.step_up.as_ref().map(|s| s.acr_values.clone()),
        max_age: decision.step_up.and_then(|s| s.max_age),
        approver_groups: decision.approver_groups,
        obligations: decision
            .obligations
            .iter()
            .map(|o| format!("{}={} (from {})", o.key, o.value, o.policy_id))
            .collect(),
        errors: decision.errors,
    })
}

/// Sends the request to a running sidecar.
pub async fn remote(addr: &str, request: &Path) -> Result<Report, String> {
    let req =
        request_from_json(read_request(request)?).map_err(|e| format!("invalid request: {e}"))?;
    let endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .map_err(|e| format!("bad address `{addr}`: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to `{addr}`: {e}"))?;
    let mut client = pb::authorizer_client::AuthorizerClient::new(channel);
    let r = client
        .check(request_to_pb(&req))
        .await
        .map_err(|s| {
            format!(
                "sidecar refused the request ({:?}): {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    let outcome = pb::Outcome::try_from(r.outcome).unwrap_or(pb::Outcome::Unspecified);
    Ok(Report {
        outcome: outcome
            .as_str_name()
            .trim_start_matches("OUTCOME_")
            .to_owned(),
        decision: r.decision,
        policy_ids: r.policy_ids,
        bundle: r.bundle,
        revision: r.revision,
        decision_id: r.decision_id,
        acr_values: r.step_up.as_ref().map(|s| s.acr_values.clone()),
        max_age: r.step_up.and_then(|s| s.max_age),
        approver_groups: r.approval.map(|a| a.approver_groups).unwrap_or_default(),
        obligations: r
            .obligations
            .iter()
            .map(|o| format!("{}={} (from {})", o.key, o.value, o.policy_id))
            .collect(),
        errors: r.errors,
    })
}
