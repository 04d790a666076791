//! The policy engine: a bundle compiled for deciding. Cedar evaluates; this
//! part adds what Cedar leaves to the host: schema-typed request conversion,
//! the policy index, and the mapping of annotations to outcomes.
//!
//! An [`Engine`] is immutable. A new bundle revision is a new `Engine`,
//! swapped in whole by the decision service.

mod convert;
mod index;
pub mod outcome;
mod schema;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Effect, EntityUid, Policy, PolicyId, PolicySet, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

pub use convert::RequestError;
use convert::{Converter, StaticEntities};
use index::PolicyIndex;
use outcome::PolicyMeta;
pub use schema::TypeModel;

use crate::bundle::Bundle;
use crate::decision::{DETAILS_WITHHELD, Decision, Request};

/// How a bundle is compiled.
#[derive(Debug, Clone, Copy)]
pub struct CompileOptions {
    /// Evaluate only the policies that can apply (see `index`). Off only to
    /// compare against the whole-set model.
    pub index: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self { index: true }
    }
}

/// One problem found while compiling a bundle, located in its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleProblem {
    pub file: String,
    pub line: Option<usize>,
    pub policy_id: Option<String>,
    pub message: String,
}

impl fmt::Display for BundleProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(id) = &self.policy_id {
            write!(f, ": policy `{id}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why a bundle cannot be activated: every problem found, not just the first.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bundle `{bundle}` is invalid:\n{}", .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct CompileError {
    pub bundle: String,
    pub problems: Vec<BundleProblem>,
}

/// A compiled bundle, ready to decide.
pub struct Engine {
    name: Arc<str>,
    revision: Arc<str>,
    model: TypeModel,
    statics: StaticEntities,
    action_entities: HashMap<EntityUid, Arc<cedar_policy_core::ast::Entity>>,
    index: PolicyIndex,
    meta: HashMap<PolicyId, PolicyMeta>,
    authorizer: Authorizer,
    policy_count: usize,
    /// What decision records of this revision must not reveal.
    masking: Arc<crate::decision_log::MaskRules>,
    /// Whether any action's context declares `session` (most bundles: no,
    /// and then a decision skips the lookup).
    any_session: bool,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name)
            .field("revision", &self.revision)
            .field("policies", &self.policy_count)
            .finish_non_exhaustive()
    }
}

/// Each policy's source text by `@id`, as written in the bundle (for showing
/// a decision's deciding rules). Policies that do not parse are left out.
pub fn policy_texts(bundle: &Bundle) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for file in &bundle.policies {
        if let Ok(set) = file.text.parse::<cedar_policy::PolicySet>() {
            for p in set.policies() {
                if let Some(id) = p.annotation("id") {
                    out.insert(id.to_owned(), p.to_string());
                }
            }
        }
    }
    out
}

impl Engine {
    /// Parses the schema, parses and strictly validates every policy against
    /// it, checks annotations and static entities, and builds the index.
    pub fn compile(bundle: &Bundle, options: CompileOptions) -> Result<Self, CompileError> {
        let fail = |problems| CompileError {
            bundle: bundle.source.display().to_string(),
            problems,
        };
        let problem = |file: &str, line, policy_id: Option<&str>, message: String| BundleProblem {
            file: file.to_owned(),
            line,
            policy_id: policy_id.map(str::to_owned),
            message,
        };
        const SCHEMA_FILE: &str = "schema.cedarschema";

        let schema = match Schema::from_cedarschema_str(&bundle.schema) {
            Ok((schema, _warnings)) => schema,
            Err(e) => {
                let line = first_label_line(&e, &bundle.schema);
                return Err(fail(vec![problem(SCHEMA_FILE, line, None, flatten(&e))]));
            }
        };
        let model = TypeModel::from_schema_text(&bundle.schema)
            .map_err(|m| fail(vec![problem(SCHEMA_FILE, None, None, m)]))?;

        let mut problems = Vec::new();
        let mut policies: Vec<Policy> = Vec::new();
        let mut meta = HashMap::new();
        // Where each policy id is defined: file index and line.
        let mut origin: HashMap<String, (usize, usize)> = HashMap::new();
        for (file_idx, file) in bundle.policies.iter().enumerate() {
            let set = match PolicySet::from_str(&file.text) {
                Ok(set) => set,
                Err(e) => {
                    let line = first_label_line(&e, &file.text);
                    problems.push(problem(&file.name, line, None, flatten(&e)));
                    continue;
                }
            };
            if set.templates().next().is_some() {
                problems.push(problem(
                    &file.name,
                    None,
                    None,
                    "policy templates are not supported in bundles yet".into(),
                ));
            }
            // Policies come in source order: find each one's text from where
            // the previous one was found, counting lines as we go (a search
            // from the start each time is quadratic in the file size).
            let (mut cursor, mut cursor_line) = (0usize, 1usize);
            for policy in set.policies() {
                let text = policy.to_string();
                let line = match file
                    .text
                    .get(cursor..)
                    .and_then(|rest| rest.find(text.as_str()))
                {
                    Some(rel) => {
                        let at = cursor + rel;
                        cursor_line += file.text[cursor..at].matches('\n').count();
                        cursor = at;
                        cursor_line
                    }
                    None => file
                        .text
                        .find(text.as_str())
                        .map(|at| line_of(&file.text, at))
                        .unwrap_or(1),
                };
                let Some(id) = policy.annotation("id").map(str::to_owned) else {
                    problems.push(problem(
                        &file.name,
                        Some(line),
                        None,
                        "policy has no `@id(\"...\")` annotation; every policy needs a unique id so decisions can name it".into(),
                    ));
                    continue;
                };
                if id.trim().is_empty() {
                    problems.push(problem(
                        &file.name,
                        Some(line),
                        None,
                        "`@id` must not be empty".into(),
                    ));
                    continue;
                }
                if let Some((other_file, other_line)) = origin.get(&id) {
                    problems.push(problem(
                        &file.name,
                        Some(line),
                        Some(&id),
                        format!(
                            "duplicate id, first defined at {}:{other_line}",
                            bundle.policies[*other_file].name
                        ),
                    ));
                    continue;
                }
                let is_forbid = policy.effect() == Effect::Forbid;
                match PolicyMeta::from_annotations(&id, is_forbid, policy.annotations()) {
                    Ok(m) => {
                        meta.insert(PolicyId::new(&id), m);
                    }
                    Err(message) => {
                        problems.push(problem(&file.name, Some(line), Some(&id), message));
                        continue;
                    }
                }
                origin.insert(id.clone(), (file_idx, line));
                policies.push(policy.new_id(PolicyId::new(&id)));
            }
        }
        if !problems.is_empty() {
            return Err(fail(problems));
        }

        let mut all = PolicySet::new();
        for p in &policies {
            if let Err(e) = all.add(p.clone()) {
                problems.push(problem("", None, Some(p.id().as_ref()), e.to_string()));
            }
        }
        let actions = schema
            .action_entities()
            .map_err(|e| fail(vec![problem(SCHEMA_FILE, None, None, e.to_string())]))?;
        for validation in validate(&schema, &model, &actions, &policies) {
            for err in validation.validation_errors() {
                let id = err.policy_id().to_string();
                let (file_idx, start) = origin.get(&id).copied().unwrap_or((0, 1));
                let file = &bundle.policies[file_idx];
                let line = first_label_line(err, &file.text).or(Some(start));
                problems.push(problem(&file.name, line, Some(&id), flatten(err)));
            }
        }
        if !problems.is_empty() {
            return Err(fail(problems));
        }

        let statics = StaticEntities::new(&bundle.entities, &schema, &model)
            .map_err(|m| fail(vec![problem("entities.json", None, None, m)]))?;
        // Only actions in a group need their entity in a request's store:
        // for the others, `action in [...]` is plain equality.
        let action_entities = model
            .actions
            .values()
            .filter(|a| {
                actions
                    .ancestors(&a.uid)
                    .is_some_and(|mut g| g.next().is_some())
            })
            .filter_map(|a| {
                actions
                    .get(&a.uid)
                    .map(|e| (a.uid.clone(), Arc::new(e.as_ref().clone())))
            })
            .collect();
        let masking = match bundle.files.get(crate::decision_log::mask::FILE) {
            None => Default::default(),
            Some(bytes) => crate::decision_log::MaskRules::parse(bytes).map_err(|m| {
                fail(vec![problem(
                    crate::decision_log::mask::FILE,
                    None,
                    None,
                    m,
                )])
            })?,
        };
        let index = PolicyIndex::build(&policies, &schema, &model, &actions, options.index);
        let any_session = model
            .actions
            .values()
            .any(|a| a.context.attrs.contains_key("session"));

        Ok(Self {
            name: bundle.manifest.name.as_str().into(),
            revision: bundle.manifest.revision.as_str().into(),
            model,
            statics,
            action_entities,
            index,
            meta,
            authorizer: Authorizer::new(),
            policy_count: policies.len(),
            any_session,
            masking: Arc::new(masking),
        })
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn revision(&self) -> &Arc<str> {
        &self.revision
    }

    pub fn policy_count(&self) -> usize {
        self.policy_count
    }

    pub fn masking(&self) -> &Arc<crate::decision_log::MaskRules> {
        &self.masking
    }

    /// Decides a request whose context attribute `unknown` is not known yet
    /// (a tool listed before any call: its arguments), by Cedar's partial
    /// evaluation. Returns the outcome some value of `unknown` can get, and
    /// whether the outcome depends on it. A plain `forbid` that applies
    /// whatever the value is a DENY; one that depends on the value is not.
    pub fn decide_partially(
        &self,
        request: &Request,
        unknown: &str,
    ) -> Result<(Decision, bool), RequestError> {
        use cedar_policy_core::ast::Effect as CoreEffect;
        let converter = Converter {
            model: &self.model,
            statics: &self.statics,
            action_entities: &self.action_entities,
        };
        let prepared = converter.prepare_with_unknown(request, Some(unknown))?;
        let slice = self.index.select(&prepared);
        let core = cedar_policy_core::authorizer::Authorizer::new();
        let run = |set: &PolicySet| {
            core.is_authorized_core(
                AsRef::<cedar_policy_core::ast::Request>::as_ref(&prepared.request).clone(),
                set.as_ref(),
                prepared.entities.as_ref(),
            )
        };
        let metas = |policies: Vec<cedar_policy_core::ast::Policy>, effect: CoreEffect| {
            policies
                .into_iter()
                .filter(|p| p.effect() == effect)
                .filter_map(|p| self.meta.get(&PolicyId::new(p.id())))
                .collect::<Vec<&PolicyMeta>>()
        };
        let all = run(&slice.all);
        let satisfied: Vec<_> = all.definitely_satisfied().collect();
        Ok(match all.decision() {
            Some(cedar_policy::Decision::Allow) => {
                (outcome::allow(&metas(satisfied, CoreEffect::Permit)), false)
            }
            None => {
                // Some arguments allow: name the permits that may.
                let maybe: Vec<_> = all.may_be_determining().collect();
                (outcome::allow(&metas(maybe, CoreEffect::Permit)), true)
            }
            Some(cedar_policy::Decision::Deny) => {
                let forbids = metas(satisfied, CoreEffect::Forbid);
                if !outcome::deny_is_conditional(&forbids) {
                    (outcome::deny(&forbids, &[]), false)
                } else {
                    let permits = run(&slice.permits);
                    // Depends on the arguments if a permit might apply, or a
                    // forbid might (a plain one would make it a DENY).
                    let forbid_residual = all
                        .nontrivial_residuals()
                        .any(|p| p.effect() == CoreEffect::Forbid);
                    let depends = permits.decision().is_none() || forbid_residual;
                    let applying = if permits.decision() == Some(cedar_policy::Decision::Deny) {
                        Vec::new()
                    } else {
                        metas(permits.may_be_determining().collect(), CoreEffect::Permit)
                    };
                    (outcome::deny(&forbids, &applying), depends)
                }
            }
        })
    }

    /// Whether the schema declares action `name` (a tool, for `AuthorizeTool`).
    pub fn has_action(&self, name: &str) -> bool {
        self.model.action(name).is_ok()
    }

    /// Whether the context type of `action` has attribute `attr` (the
    /// sidecar adds `session` only where the schema declares it).
    pub fn context_declares(&self, action: &str, attr: &str) -> bool {
        self.model
            .action(action)
            .is_ok_and(|a| a.context.attrs.contains_key(attr))
    }

    /// Whether the context of `action` declares `session` (then the sidecar
    /// adds the session's signal state).
    pub fn takes_session(&self, action: &str) -> bool {
        self.any_session && self.context_declares(action, "session")
    }

    /// Whether every one of these (allowing) policies keeps allowing for a
    /// revoked session.
    pub fn allows_revoked_session(&self, policy_ids: &[String]) -> bool {
        !policy_ids.is_empty()
            && policy_ids.iter().all(|id| {
                self.meta
                    .get(&PolicyId::new(id))
                    .is_some_and(|m| m.allows_revoked_session)
            })
    }

    /// Scopes in the policy index, and how many have an equality index.
    pub fn index_stats(&self) -> (usize, usize) {
        self.index.stats()
    }

    /// Decides one request. A request the bundle cannot make sense of is an
    /// error for the caller to fix; anything that goes wrong while evaluating
    /// is a DENY that carries the error (fail closed).
    pub fn decide(&self, request: &Request) -> Result<Decision, RequestError> {
        let converter = Converter {
            model: &self.model,
            statics: &self.statics,
            action_entities: &self.action_entities,
        };
        let prepared = converter.prepare(request)?;
        let slice = self.index.select(&prepared);
        let response =
            self.authorizer
                .is_authorized(&prepared.request, &slice.all, &prepared.entities);
        if let Some(failed) = failed_closed(&response) {
            return Ok(failed);
        }
        let reason: Vec<&PolicyMeta> = response
            .diagnostics()
            .reason()
            .filter_map(|id| self.meta.get(id))
            .collect();
        if response.decision() == cedar_policy::Decision::Allow {
            return Ok(outcome::allow(&reason));
        }
        if !outcome::deny_is_conditional(&reason) {
            return Ok(outcome::deny(&reason, &[]));
        }
        // Every forbid that applied is conditional: would a permit apply
        // without them?
        let permits =
            self.authorizer
                .is_authorized(&prepared.request, &slice.permits, &prepared.entities);
        if let Some(failed) = failed_closed(&permits) {
            return Ok(failed);
        }
        let applying: Vec<&PolicyMeta> = if permits.decision() == cedar_policy::Decision::Allow {
            permits
                .diagnostics()
                .reason()
                .filter_map(|id| self.meta.get(id))
                .collect()
        } else {
            Vec::new()
        };
        Ok(outcome::deny(&reason, &applying))
    }
}

/// Strict validation, grouped: policies whose heads name the same actions
/// are validated against the schema reduced to those actions (and their
/// groups). Cedar type-checks a policy in every request environment of the
/// schema its head can match, and walks all of them per policy, so with many
/// actions this is far faster; it is exact because a policy is only
/// type-checked in the environments of its head's actions, and a reduced
/// schema can only add errors (e.g. an action literal it lacks), never remove
/// one. A group with errors is validated again against the whole schema, whose
/// verdict stands.
fn validate(
    schema: &Schema,
    model: &TypeModel,
    actions: &cedar_policy::Entities,
    policies: &[Policy],
) -> Vec<cedar_policy::ValidationResult> {
    use std::collections::{BTreeMap, HashSet};
    let all_actions: Vec<&EntityUid> = model.actions.values().map(|a| &a.uid).collect();
    // Key: the sorted display forms of the actions a head can match; `None` = all.
    let mut groups: BTreeMap<Option<Vec<String>>, PolicySet> = BTreeMap::new();
    for p in policies {
        let key = match p.action_constraint() {
            cedar_policy::ActionConstraint::Any => None,
            cedar_policy::ActionConstraint::Eq(uid) => Some(vec![uid.to_string()]),
            cedar_policy::ActionConstraint::In(targets) => {
                let mut hit: Vec<String> = all_actions
                    .iter()
                    .filter(|a| {
                        targets.contains(a)
                            || actions
                                .ancestors(a)
                                .is_some_and(|mut g| g.any(|g| targets.contains(g)))
                    })
                    .map(|a| a.to_string())
                    .collect();
                hit.extend(targets.iter().map(ToString::to_string));
                hit.sort();
                hit.dedup();
                Some(hit)
            }
        };
        // Ids are unique (checked before), so adding cannot fail.
        let _ = groups.entry(key).or_default().add(p.clone());
    }
    let full = || Validator::new(schema.clone());
    groups
        .into_iter()
        .map(|(key, set)| {
            let reduced = key.and_then(|names| {
                let mut keep: HashSet<String> = HashSet::new();
                for name in names {
                    if let Ok(uid) = name.parse::<EntityUid>() {
                        keep.extend(
                            actions
                                .ancestors(&uid)
                                .into_iter()
                                .flatten()
                                .map(ToString::to_string),
                        );
                    }
                    keep.insert(name);
                }
                model.reduced_schema(&keep)
            });
            match reduced {
                Some(small) => {
                    let result = Validator::new(small).validate(&set, ValidationMode::Strict);
                    if result.validation_passed() {
                        result
                    } else {
                        full().validate(&set, ValidationMode::Strict)
                    }
                }
                None => full().validate(&set, ValidationMode::Strict),
            }
        })
        .collect()
}

/// The DENY for a response whose evaluation went wrong, carrying Cedar's
/// messages and, for the decision log under masking rules, the same errors
/// without the request values those messages quote.
fn failed_closed(r: &cedar_policy::Response) -> Option<Decision> {
    let mut errors = Vec::new();
    let mut redacted = Vec::new();
    for e in r.diagnostics().errors() {
        errors.push(e.to_string());
        let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = e;
        redacted.push(format!(
            "error while evaluating policy `{}`: {} {DETAILS_WITHHELD}",
            e.policy_id(),
            evaluation_error_kind(e.inner())
        ));
    }
    if errors.is_empty() {
        return None;
    }
    errors.sort();
    redacted.sort();
    Some(Decision {
        redacted_errors: Some(redacted),
        ..Decision::deny(Vec::new(), errors)
    })
}

/// What kind of evaluation error this is, in words that quote nothing from
/// the request.
fn evaluation_error_kind(e: &cedar_policy::EvaluationError) -> &'static str {
    use cedar_policy::EvaluationError as E;
    match e {
        E::EntityDoesNotExist(_) => "an entity it refers to does not exist",
        E::EntityAttrDoesNotExist(_) => "an entity lacks an attribute it reads",
        E::RecordAttrDoesNotExist(_) => "a record lacks an attribute it reads",
        E::FailedExtensionFunctionLookup(_) => "an extension function is unknown",
        E::TypeError(_) => "a value has the wrong type",
        E::WrongNumArguments(_) => "a function got the wrong number of arguments",
        E::IntegerOverflow(_) => "integer overflow",
        E::UnlinkedSlot(_) => "a template slot is not linked",
        E::FailedExtensionFunctionExecution(_) => "an extension function failed",
        E::NonValue(_) => "an expression did not reduce to a value",
        E::RecursionLimit(_) => "the recursion limit was reached",
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |head| head.matches('\n').count() + 1)
}

fn first_label_line(diag: &dyn Diagnostic, text: &str) -> Option<usize> {
    let label = diag.labels()?.next()?;
    Some(line_of(text, label.offset()))
}

/// A diagnostic with its help and nested causes, on one line.
fn flatten(diag: &dyn Diagnostic) -> String {
    let mut out = diag.to_string();
    if let Some(related) = diag.related() {
        for r in related {
            out.push_str("; ");
            out.push_str(&r.to_string());
        }
    }
    if let Some(help) = diag.help() {
        out.push_str(&format!(" (help: {help})"));
    }
    out
}

#[cfg(test)]
mod tests;
