//! Policy tests that travel in a bundle: every `tests/*.json` file is an
//! array of cases, each a request and the decision expected for it.
//!
//! ```json
//! [{ "name": "editor edits a draft",
//!    "request": "requests/allow-edit.json",          // a file in the bundle, or the request inline
//!    "expect": { "outcome": "ALLOW",
//!                "policy_ids": ["edit-department"],  // optional, like every field below
//!                "acr_values": ["aal2"], "max_age": 600,
//!                "approver_groups": ["owners"],
//!                "obligations": [{"key": "notify", "value": "owner", "policy_id": "p"}] } }]
//! ```
//!
//! `arbiter test` runs them; `arbiter bundle build` refuses a bundle whose
//! tests fail.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use crate::api::json::request_from_json;
use crate::bundle::Bundle;
use crate::decision::{Decision, Obligation, Outcome};
use crate::policy::Engine;

/// One test case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub request: RequestSpec,
    pub expect: Expect,
}

/// A request file in the bundle (path from the bundle root), or the request itself.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RequestSpec {
    File(String),
    Inline(Value),
}

/// What the decision must be; fields left out are not checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub outcome: Outcome,
    #[serde(default)]
    pub policy_ids: Option<Vec<String>>,
    #[serde(default)]
    pub acr_values: Option<Vec<String>>,
    #[serde(default)]
    pub max_age: Option<u64>,
    #[serde(default)]
    pub approver_groups: Option<Vec<String>>,
    #[serde(default)]
    pub obligations: Option<Vec<Obligation>>,
}

impl Expect {
    /// Every difference between `d` and this expectation, empty when it matches.
    pub fn differences(&self, d: &Decision) -> Vec<String> {
        let mut out = Vec::new();
        if d.outcome != self.outcome {
            out.push(format!(
                "outcome {} (expected {})",
                d.outcome.as_str(),
                self.outcome.as_str()
            ));
        }
        if let Some(ids) = &self.policy_ids
            && *ids != d.policy_ids
        {
            out.push(format!("policies {:?} (expected {ids:?})", d.policy_ids));
        }
        let acr = d.step_up.as_ref().map(|s| s.acr_values.clone());
        if self.acr_values.is_some() && self.acr_values != acr {
            out.push(format!(
                "acr_values {acr:?} (expected {:?})",
                self.acr_values
            ));
        }
        let age = d.step_up.as_ref().and_then(|s| s.max_age);
        if self.max_age.is_some() && self.max_age != age {
            out.push(format!("max_age {age:?} (expected {:?})", self.max_age));
        }
        if let Some(groups) = &self.approver_groups
            && *groups != d.approver_groups
        {
            out.push(format!(
                "approver_groups {:?} (expected {groups:?})",
                d.approver_groups
            ));
        }
        if let Some(obligations) = &self.obligations
            && *obligations != d.obligations
        {
            out.push(format!(
                "obligations {:?} (expected {obligations:?})",
                d.obligations
            ));
        }
        if !d.errors.is_empty() {
            out.push(format!("evaluation errors {:?}", d.errors));
        }
        out
    }
}

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: String,
    pub name: String,
    /// Why it failed; `None` when it passed.
    pub failure: Option<String>,
    pub took: Duration,
}

/// The results of every case of a bundle.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub bundle: String,
    pub results: Vec<CaseResult>,
}

/// The cases of a bundle, by test file, in file order.
pub fn load(bundle: &Bundle) -> Result<Vec<(String, Case)>, String> {
    let mut out = Vec::new();
    for (path, bytes) in &bundle.files {
        let Some(file) = path.strip_prefix("tests/") else {
            continue;
        };
        if !file.ends_with(".json") {
            continue;
        }
        let cases: Vec<Case> =
            serde_json::from_slice(bytes).map_err(|e| format!("`{path}`: {e}"))?;
        out.extend(cases.into_iter().map(|c| (path.clone(), c)));
    }
    Ok(out)
}

/// Runs every case of `bundle` against `engine` (compiled from it).
pub fn run(bundle: &Bundle, engine: &Engine) -> Result<Report, String> {
    let mut report = Report {
        bundle: format!("{}@{}", bundle.manifest.name, bundle.manifest.revision),
        results: Vec::new(),
    };
    for (file, case) in load(bundle)? {
        let start = Instant::now();
        let failure = match request_of(bundle, &case.request) {
            Err(e) => Some(e),
            Ok(request) => match engine.decide(&request) {
                Err(e) => Some(format!("invalid request: {e}")),
                Ok(d) => {
                    let diffs = case.expect.differences(&d);
                    (!diffs.is_empty()).then(|| diffs.join("; "))
                }
            },
        };
        report.results.push(CaseResult {
            file,
            name: case.name,
            failure,
            took: start.elapsed(),
        });
    }
    Ok(report)
}

fn request_of(bundle: &Bundle, spec: &RequestSpec) -> Result<crate::decision::Request, String> {
    let value = match spec {
        RequestSpec::Inline(v) => v.clone(),
        RequestSpec::File(path) => {
            let bytes = bundle
                .files
                .get(path)
                .ok_or_else(|| format!("request file `{path}` is not in the bundle"))?;
            serde_json::from_slice(bytes).map_err(|e| format!("`{path}`: {e}"))?
        }
    };
    request_from_json(value).map_err(|e| format!("invalid request: {e}"))
}

impl Report {
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_some()).count()
    }

    /// A table for people: one line per case, failures explained.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.results {
            let mark = if r.failure.is_some() { "FAIL" } else { "pass" };
            let _ = writeln!(out, "{mark}  {:<28} {}", r.file, r.name);
            if let Some(why) = &r.failure {
                let _ = writeln!(out, "      {why}");
            }
        }
        let _ = writeln!(
            out,
            "{}: {} passed, {} failed",
            self.bundle,
            self.results.len() - self.failed(),
            self.failed()
        );
        out
    }

    /// JUnit XML, for CI systems that show test reports.
    pub fn junit(&self) -> String {
        let total: f64 = self.results.iter().map(|r| r.took.as_secs_f64()).sum();
        let mut out = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" time=\"{total:.6}\">\n",
            xml(&self.bundle),
            self.results.len(),
            self.failed()
        );
        for r in &self.results {
            let _ = write!(
                out,
                "  <testcase classname=\"{}\" name=\"{}\" time=\"{:.6}\"",
                xml(&r.file),
                xml(&r.name),
                r.took.as_secs_f64()
            );
            match &r.failure {
                None => out.push_str("/>\n"),
                Some(why) => {
                    let _ = write!(
                        out,
                        ">\n    <failure message=\"{}\"/>\n  </testcase>\n",
                        xml(why)
                    );
                }
            }
        }
        out.push_str("</testsuite>\n");
        out
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::CompileOptions;

    #[test]
    fn failing_cases_are_explained_and_reported_as_junit() {
        let mut bundle = Bundle::read_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/documents"),
        )
        .expect("reads");
        bundle.files.insert(
            "tests/wrong.json".into(),
            br#"[{"name": "wrong <on purpose>", "request": "requests/deny-edit-archived.json",
                  "expect": {"outcome": "ALLOW", "policy_ids": ["edit-department"]}},
                 {"name": "missing file", "request": "requests/nope.json", "expect": {"outcome": "DENY"}}]"#
                .to_vec(),
        );
        let engine = Engine::compile(&bundle, CompileOptions::default()).expect("compiles");
        let report = run(&bundle, &engine).expect("runs");
        assert_eq!(report.failed(), 2);
        let text = report.render();
        assert!(text.contains("outcome DENY (expected ALLOW)"), "{text}");
        assert!(
            text.contains("`requests/nope.json` is not in the bundle"),
            "{text}"
        );
        let junit = report.junit();
        assert!(junit.contains("failures=\"2\""), "{junit}");
        assert!(junit.contains("wrong &lt;on purpose&gt;"), "{junit}");
    }

    #[test]
    fn unknown_fields_in_a_case_are_rejected() {
        let mut bundle = Bundle::read_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/documents"),
        )
        .expect("reads");
        bundle.files.insert(
            "tests/typo.json".into(),
            br#"[{"name": "x", "request": {}, "expect": {"outcome": "ALLOW", "policy_id": []}}]"#
                .to_vec(),
        );
        let err = load(&bundle).expect_err("typo");
        assert!(
            err.contains("tests/typo.json") && err.contains("policy_id"),
            "{err}"
        );
    }
}
