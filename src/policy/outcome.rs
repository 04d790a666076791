//! Annotations → outcome. A `forbid` may carry `@step_up("acr ...")` (with an
//! optional `@max_age("seconds")`) or `@approval("group")`; any policy may carry
//! `@obligation_<key>("value")`. A deny becomes STEP_UP or APPROVAL_REQUIRED
//! only when every applicable `forbid` carries such an annotation and some
//! `permit` applies; a plain `forbid` always wins.

use crate::decision::{Decision, Obligation, Outcome, StepUp};

/// What a policy's annotations mean, parsed and checked once at load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyMeta {
    pub id: String,
    pub step_up: Option<StepUp>,
    pub approver_group: Option<String>,
    pub obligations: Vec<(String, String)>,
    /// `@session_revoked("allow")`: this permit still applies to a revoked
    /// session (e.g. logging out).
    pub allows_revoked_session: bool,
}

impl PolicyMeta {
    /// Parses annotations; `is_forbid` because step-up and approval only make
    /// sense on a `forbid`.
    pub fn from_annotations<'a>(
        id: &str,
        is_forbid: bool,
        annotations: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut meta = PolicyMeta {
            id: id.to_owned(),
            ..Default::default()
        };
        let mut max_age = None;
        for (key, value) in annotations {
            match key {
                "step_up" => {
                    let acr_values: Vec<String> =
                        value.split_whitespace().map(str::to_owned).collect();
                    if acr_values.is_empty() {
                        return Err(
                            "`@step_up` needs at least one acr value, e.g. `@step_up(\"aal2\")`"
                                .into(),
                        );
                    }
                    meta.step_up = Some(StepUp {
                        acr_values,
                        max_age: None,
                    });
                }
                "max_age" => {
                    max_age = Some(value.trim().parse::<u64>().map_err(|_| {
                        format!("`@max_age(\"{value}\")` must be a whole number of seconds")
                    })?);
                }
                "session_revoked" => {
                    if value.trim() != "allow" || is_forbid {
                        return Err(
                            "`@session_revoked(\"allow\")` is the only form, on a `permit`".into(),
                        );
                    }
                    meta.allows_revoked_session = true;
                }
                "approval" => {
                    if value.trim().is_empty() {
                        return Err(
                            "`@approval` needs the approver group, e.g. `@approval(\"finance\")`"
                                .into(),
                        );
                    }
                    meta.approver_group = Some(value.trim().to_owned());
                }
                _ => {
                    if let Some(name) = key.strip_prefix("obligation_") {
                        meta.obligations.push((name.to_owned(), value.to_owned()));
                    }
                }
            }
        }
        match (&mut meta.step_up, max_age) {
            (Some(step_up), age) => step_up.max_age = age,
            (None, Some(_)) => return Err("`@max_age` is only meaningful with `@step_up`".into()),
            (None, None) => {}
        }
        if !is_forbid && (meta.step_up.is_some() || meta.approver_group.is_some()) {
            return Err("`@step_up` and `@approval` belong on a `forbid` policy".into());
        }
        Ok(meta)
    }

    fn is_conditional(&self) -> bool {
        self.step_up.is_some() || self.approver_group.is_some()
    }
}

/// The decision when Cedar allowed: the satisfied permits decided.
pub fn allow(permits: &[&PolicyMeta]) -> Decision {
    Decision {
        outcome: Outcome::Allow,
        policy_ids: sorted_ids(permits),
        step_up: None,
        approver_groups: Vec::new(),
        obligations: obligations(permits),
        errors: Vec::new(),
        redacted_errors: None,
    }
}

/// Whether a deny by these forbids can still turn into STEP_UP or
/// APPROVAL_REQUIRED (then the caller checks whether a permit applies).
pub fn deny_is_conditional(forbids: &[&PolicyMeta]) -> bool {
    !forbids.is_empty() && forbids.iter().all(|f| f.is_conditional())
}

/// The decision when Cedar denied because `forbids` applied, given the
/// permits that apply without them (empty if none). Step-up comes before
/// approval: approving a weakly authenticated user is worth little, and once
/// the user steps up the approval forbid still applies.
pub fn deny(forbids: &[&PolicyMeta], permits: &[&PolicyMeta]) -> Decision {
    if !deny_is_conditional(forbids) || permits.is_empty() {
        return Decision::deny(sorted_ids(forbids), Vec::new());
    }
    let deciding: Vec<&PolicyMeta> = forbids.iter().chain(permits).copied().collect();
    let mut decision = Decision {
        outcome: Outcome::ApprovalRequired,
        policy_ids: sorted_ids(&deciding),
        step_up: None,
        approver_groups: Vec::new(),
        obligations: obligations(&deciding),
        errors: Vec::new(),
        redacted_errors: None,
    };
    let step_ups: Vec<&StepUp> = forbids.iter().filter_map(|f| f.step_up.as_ref()).collect();
    if step_ups.is_empty() {
        let mut groups: Vec<String> = forbids
            .iter()
            .filter_map(|f| f.approver_group.clone())
            .collect();
        groups.sort();
        groups.dedup();
        decision.approver_groups = groups;
    } else {
        // Several step-up rules: any acr acceptable to all is not knowable
        // here, so offer each rule's values in order and the strictest age.
        let mut acr_values: Vec<String> = Vec::new();
        for s in &step_ups {
            for acr in &s.acr_values {
                if !acr_values.contains(acr) {
                    acr_values.push(acr.clone());
                }
            }
        }
        decision.outcome = Outcome::StepUp;
        decision.step_up = Some(StepUp {
            acr_values,
            max_age: step_ups.iter().filter_map(|s| s.max_age).min(),
        });
    }
    decision
}

fn sorted_ids(policies: &[&PolicyMeta]) -> Vec<String> {
    let mut ids: Vec<String> = policies.iter().map(|p| p.id.clone()).collect();
    ids.sort();
    ids.dedup();
    ids
}

fn obligations(policies: &[&PolicyMeta]) -> Vec<Obligation> {
    let mut out: Vec<Obligation> = policies
        .iter()
        .flat_map(|p| {
            p.obligations.iter().map(|(key, value)| Obligation {
                key: key.clone(),
                value: value.clone(),
                policy_id: p.id.clone(),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.key, &a.policy_id).cmp(&(&b.key, &b.policy_id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, forbid: bool, ann: &[(&str, &str)]) -> PolicyMeta {
        PolicyMeta::from_annotations(id, forbid, ann.iter().copied()).expect("valid annotations")
    }

    #[test]
    fn plain_forbid_denies() {
        let f = meta("f", true, &[]);
        let p = meta("p", false, &[]);
        let d = deny(&[&f], &[&p]);
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy_ids, ["f"]);
    }

    #[test]
    fn step_up_forbid_with_permit_steps_up() {
        let f = meta("mfa", true, &[("step_up", "aal2 aal3"), ("max_age", "300")]);
        let p = meta("p", false, &[("obligation_max_ttl", "900")]);
        let d = deny(&[&f], &[&p]);
        assert_eq!(d.outcome, Outcome::StepUp);
        assert_eq!(d.policy_ids, ["mfa", "p"]);
        let s = d.step_up.expect("step-up details");
        assert_eq!(s.acr_values, ["aal2", "aal3"]);
        assert_eq!(s.max_age, Some(300));
        assert_eq!(d.obligations[0].key, "max_ttl");
    }

    #[test]
    fn step_up_without_permit_denies() {
        let f = meta("mfa", true, &[("step_up", "aal2")]);
        let d = deny(&[&f], &[]);
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy_ids, ["mfa"]);
    }

    #[test]
    fn plain_forbid_beside_step_up_denies() {
        let f = meta("mfa", true, &[("step_up", "aal2")]);
        let g = meta("block", true, &[]);
        let p = meta("p", false, &[]);
        let d = deny(&[&f, &g], &[&p]);
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy_ids, ["block", "mfa"]);
    }

    #[test]
    fn approval_names_every_group() {
        let a = meta("a", true, &[("approval", "finance")]);
        let b = meta("b", true, &[("approval", "legal")]);
        let p = meta("p", false, &[]);
        let d = deny(&[&a, &b], &[&p]);
        assert_eq!(d.outcome, Outcome::ApprovalRequired);
        assert_eq!(d.approver_groups, ["finance", "legal"]);
    }

    #[test]
    fn step_up_comes_before_approval() {
        let a = meta("a", true, &[("approval", "finance")]);
        let s = meta("s", true, &[("step_up", "aal2"), ("max_age", "600")]);
        let t = meta("t", true, &[("step_up", "aal3"), ("max_age", "60")]);
        let p = meta("p", false, &[]);
        let d = deny(&[&a, &s, &t], &[&p]);
        assert_eq!(d.outcome, Outcome::StepUp);
        let step_up = d.step_up.expect("step-up");
        assert_eq!(step_up.acr_values, ["aal2", "aal3"]);
        assert_eq!(step_up.max_age, Some(60));
    }

    #[test]
    fn bad_annotations_are_rejected() {
        let bad = |forbid, ann: &[(&str, &str)]| {
            PolicyMeta::from_annotations("x", forbid, ann.iter().copied()).expect_err("invalid")
        };
        assert!(bad(true, &[("step_up", " ")]).contains("acr"));
        assert!(bad(true, &[("step_up", "aal2"), ("max_age", "soon")]).contains("seconds"));
        assert!(bad(true, &[("max_age", "60")]).contains("only meaningful"));
        assert!(bad(false, &[("approval", "finance")]).contains("forbid"));
        assert!(bad(true, &[("approval", "")]).contains("group"));
    }

    #[test]
    fn allow_carries_obligations_of_permits() {
        let p = meta(
            "p",
            false,
            &[
                ("obligation_max_credential_lifetime", "15m"),
                ("description", "x"),
            ],
        );
        let d = allow(&[&p]);
        assert_eq!(d.outcome, Outcome::Allow);
        assert_eq!(
            d.obligations,
            [Obligation {
                key: "max_credential_lifetime".into(),
                value: "15m".into(),
                policy_id: "p".into()
            }]
        );
    }
}
