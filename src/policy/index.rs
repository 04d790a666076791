//! The policy index: at load time, the policy set is cut into slices so a
//! decision evaluates only the policies that can apply to it.
//!
//! Two kinds of key, both exact (a slice gives the same decision, reasons and
//! errors as the whole set):
//!
//! - **Scope**: (action, principal type, resource type). A policy joins every
//!   scope its head can match; a head that cannot match is never evaluated by
//!   Cedar either, so dropping it changes nothing.
//! - **Leading equality**: within a scope, policies whose `when` condition
//!   *starts* with `principal.a == lit`, `resource.a == lit` or
//!   `context.a == lit`. When the request's value differs from `lit`, Cedar
//!   would stop at that first conjunct with `false` and no error, so only
//!   policies with the matching literal (and those without the constraint)
//!   are kept. When the request lacks the attribute (where Cedar would record
//!   an error) or holds a non-literal value, the whole scope is evaluated.

use std::collections::{HashMap, HashSet};

use cedar_policy::{
    ActionConstraint, Effect, Entities, EntityTypeName, EntityUid, Policy, PolicySet,
    PrincipalConstraint, ResourceConstraint, Schema,
};
use serde_json::{Map, Value};

use super::convert::Prepared;
use super::schema::TypeModel;

/// Fewer constrained policies than this in a scope are not worth a lookup.
const MIN_EQ_INDEXED: usize = 4;

/// Policies evaluated together, and the permits among them (used to learn
/// whether a permit applies once conditional forbids are set aside).
pub(crate) struct Slice {
    pub(crate) all: PolicySet,
    pub(crate) permits: PolicySet,
}

impl Slice {
    fn new<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Self {
        let mut all = PolicySet::new();
        let mut permits = PolicySet::new();
        for p in policies {
            // Ids are unique (checked at compile), so adding cannot fail.
            if p.effect() == Effect::Permit {
                let _ = permits.add(p.clone());
            }
            let _ = all.add(p.clone());
        }
        Self { all, permits }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Var {
    Principal,
    Resource,
    Context,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Literal {
    Str(String),
    Long(i64),
    Bool(bool),
}

impl Literal {
    fn of_json(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Some(Literal::Str(s.clone())),
            Value::Bool(b) => Some(Literal::Bool(*b)),
            Value::Number(n) => n.as_i64().map(Literal::Long),
            _ => None,
        }
    }
}

struct EqIndex {
    var: Var,
    attr: String,
    by_value: HashMap<Literal, Slice>,
    /// Policies without the constraint: what applies when no literal matches.
    rest: Slice,
}

struct Scope {
    principal: String,
    resource: String,
    full: Slice,
    eq: Option<EqIndex>,
}

pub(crate) struct PolicyIndex {
    by_action: HashMap<EntityUid, Vec<Scope>>,
    /// Every policy: used when a request falls outside every known scope.
    everything: Slice,
}

impl PolicyIndex {
    /// With `enabled` false every request evaluates the whole set (the model
    /// the index must agree with).
    pub(crate) fn build(
        policies: &[Policy],
        schema: &Schema,
        model: &TypeModel,
        actions: &Entities,
        enabled: bool,
    ) -> Self {
        let everything = Slice::new(policies);
        if !enabled {
            return Self {
                by_action: HashMap::new(),
                everything,
            };
        }
        // Each policy's head, read once (Cedar's getters allocate per call).
        let heads: Vec<Head> = policies.iter().map(Head::of).collect();
        // Leading equalities are read (through Cedar's JSON form) only for
        // policies in scopes big enough to index.
        let leading: Vec<std::cell::OnceCell<Option<(Var, String, Literal)>>> = policies
            .iter()
            .map(|_| std::cell::OnceCell::new())
            .collect();
        let mut by_action: HashMap<EntityUid, Vec<Scope>> = HashMap::new();
        for info in model.actions.values() {
            let groups: HashSet<&EntityUid> =
                actions.ancestors(&info.uid).into_iter().flatten().collect();
            let for_action: Vec<usize> = (0..policies.len())
                .filter(|&i| heads[i].action.matches(&info.uid, &groups))
                .collect();
            for p_type in &info.principals {
                for r_type in &info.resources {
                    let (Some(pt), Some(rt)) =
                        (model.entities.get(p_type), model.entities.get(r_type))
                    else {
                        continue;
                    };
                    let members: Vec<usize> = for_action
                        .iter()
                        .copied()
                        .filter(|&i| {
                            heads[i].principal.matches(&pt.name, schema)
                                && heads[i].resource.matches(&rt.name, schema)
                        })
                        .collect();
                    let eq = if members.len() >= MIN_EQ_INDEXED {
                        let lead: Vec<Option<&(Var, String, Literal)>> = members
                            .iter()
                            .map(|&i| {
                                leading[i]
                                    .get_or_init(|| leading_equality(&policies[i]))
                                    .as_ref()
                            })
                            .collect();
                        EqIndex::build(&members, policies, &lead)
                    } else {
                        None
                    };
                    let scope = Scope {
                        principal: p_type.clone(),
                        resource: r_type.clone(),
                        full: Slice::new(members.iter().map(|&i| &policies[i])),
                        eq,
                    };
                    by_action.entry(info.uid.clone()).or_default().push(scope);
                }
            }
        }
        Self {
            by_action,
            everything,
        }
    }

    /// How many scopes, and how many of them have an equality index.
    pub(crate) fn stats(&self) -> (usize, usize) {
        let scopes = self.by_action.values().flatten();
        let eq = scopes.clone().filter(|s| s.eq.is_some()).count();
        (scopes.count(), eq)
    }

    /// The slice to evaluate for a prepared request.
    pub(crate) fn select(&self, req: &Prepared<'_>) -> &Slice {
        let Some(scope) = self.by_action.get(req.action).and_then(|scopes| {
            scopes
                .iter()
                .find(|s| s.principal == req.principal_type && s.resource == req.resource_type)
        }) else {
            return &self.everything;
        };
        let Some(eq) = &scope.eq else {
            return &scope.full;
        };
        let source: &Map<String, Value> = match eq.var {
            Var::Principal => &req.principal_attrs,
            Var::Resource => &req.resource_attrs,
            Var::Context => req.context,
        };
        match source.get(&eq.attr).map(Literal::of_json) {
            Some(Some(lit)) => eq.by_value.get(&lit).unwrap_or(&eq.rest),
            // Missing (Cedar would record an error) or not a plain literal.
            _ => &scope.full,
        }
    }
}

impl EqIndex {
    /// `leading[k]` is the leading equality of policy `members[k]`.
    fn build(
        members: &[usize],
        policies: &[Policy],
        leading: &[Option<&(Var, String, Literal)>],
    ) -> Option<Self> {
        let mut counts: HashMap<(Var, &str), usize> = HashMap::new();
        for (var, attr, _) in leading.iter().flatten() {
            *counts.entry((*var, attr.as_str())).or_default() += 1;
        }
        let ((var, attr), count) = counts
            .into_iter()
            .max_by_key(|(key, n)| (*n, key.1.to_owned()))?;
        if count < MIN_EQ_INDEXED {
            return None;
        }
        let constrained = |k: usize| match leading[k] {
            Some((v, a, lit)) if *v == var && a == attr => Some(lit),
            _ => None,
        };
        let rest_ids: Vec<usize> = (0..members.len())
            .filter(|&k| constrained(k).is_none())
            .map(|k| members[k])
            .collect();
        let mut groups: HashMap<&Literal, Vec<usize>> = HashMap::new();
        for (k, &member) in members.iter().enumerate() {
            if let Some(lit) = constrained(k) {
                groups.entry(lit).or_default().push(member);
            }
        }
        let by_value = groups
            .into_iter()
            .map(|(lit, ids)| {
                let mut all = ids;
                all.extend(&rest_ids);
                all.sort_unstable();
                (lit.clone(), Slice::new(all.iter().map(|&i| &policies[i])))
            })
            .collect();
        Some(Self {
            var,
            attr: attr.to_owned(),
            by_value,
            rest: Slice::new(rest_ids.iter().map(|&i| &policies[i])),
        })
    }
}

/// What a policy's head can match, resolved once.
struct Head {
    action: ActionHead,
    principal: TypeHead,
    resource: TypeHead,
}

enum ActionHead {
    Any,
    Eq(EntityUid),
    In(Vec<EntityUid>),
}

enum TypeHead {
    Any,
    /// Exactly this type (`==` an entity of it, `is`).
    Is(EntityTypeName),
    /// Any type that can be `in` an entity of this type (`in`).
    In(EntityTypeName),
    /// `is T in E`.
    IsIn(EntityTypeName, EntityTypeName),
}

impl Head {
    fn of(p: &Policy) -> Self {
        let action = match p.action_constraint() {
            ActionConstraint::Any => ActionHead::Any,
            ActionConstraint::Eq(uid) => ActionHead::Eq(uid),
            ActionConstraint::In(uids) => ActionHead::In(uids),
        };
        let principal = match p.principal_constraint() {
            PrincipalConstraint::Any => TypeHead::Any,
            PrincipalConstraint::Eq(uid) => TypeHead::Is(uid.type_name().clone()),
            PrincipalConstraint::In(uid) => TypeHead::In(uid.type_name().clone()),
            PrincipalConstraint::Is(t) => TypeHead::Is(t),
            PrincipalConstraint::IsIn(t, uid) => TypeHead::IsIn(t, uid.type_name().clone()),
        };
        let resource = match p.resource_constraint() {
            ResourceConstraint::Any => TypeHead::Any,
            ResourceConstraint::Eq(uid) => TypeHead::Is(uid.type_name().clone()),
            ResourceConstraint::In(uid) => TypeHead::In(uid.type_name().clone()),
            ResourceConstraint::Is(t) => TypeHead::Is(t),
            ResourceConstraint::IsIn(t, uid) => TypeHead::IsIn(t, uid.type_name().clone()),
        };
        Self {
            action,
            principal,
            resource,
        }
    }
}

impl ActionHead {
    fn matches(&self, action: &EntityUid, groups: &HashSet<&EntityUid>) -> bool {
        match self {
            ActionHead::Any => true,
            ActionHead::Eq(uid) => uid == action,
            ActionHead::In(uids) => uids.iter().any(|g| g == action || groups.contains(g)),
        }
    }
}

impl TypeHead {
    fn matches(&self, ty: &EntityTypeName, schema: &Schema) -> bool {
        match self {
            TypeHead::Any => true,
            TypeHead::Is(t) => t == ty,
            TypeHead::In(target) => can_be_in(ty, target, schema),
            TypeHead::IsIn(t, target) => t == ty && can_be_in(ty, target, schema),
        }
    }
}

/// Whether an entity of type `ty` can be `in` an entity of type `target`.
fn can_be_in(ty: &EntityTypeName, target: &EntityTypeName, schema: &Schema) -> bool {
    ty == target
        || schema
            .ancestors(ty)
            .is_none_or(|mut a| a.any(|t| t == target))
}

/// The first conjunct of a policy's first condition, when it is a `when`
/// comparing `var.attr` with a string, number or boolean literal. Read from
/// the policy's expression tree (cedar-policy-core): the conditions are one
/// expression, `when`s as they are and `unless`es negated, joined by `&&` in
/// order, so the leftmost leaf of the `&&` chain is what Cedar evaluates first.
fn leading_equality(p: &Policy) -> Option<(Var, String, Literal)> {
    use cedar_policy_core::ast::{BinaryOp, ExprKind};
    let policy: &cedar_policy_core::ast::Policy = p.as_ref();
    let mut expr = policy.non_scope_constraints()?;
    while let ExprKind::And { left, .. } = expr.expr_kind() {
        expr = left;
    }
    let ExprKind::BinaryApp {
        op: BinaryOp::Eq,
        arg1,
        arg2,
    } = expr.expr_kind()
    else {
        return None;
    };
    attr_access(arg1)
        .zip(literal(arg2))
        .or_else(|| attr_access(arg2).zip(literal(arg1)))
        .map(|((var, attr), lit)| (var, attr, lit))
}

fn attr_access(e: &cedar_policy_core::ast::Expr) -> Option<(Var, String)> {
    use cedar_policy_core::ast::{ExprKind, Var as CedarVar};
    let ExprKind::GetAttr { expr, attr } = e.expr_kind() else {
        return None;
    };
    let var = match expr.expr_kind() {
        ExprKind::Var(CedarVar::Principal) => Var::Principal,
        ExprKind::Var(CedarVar::Resource) => Var::Resource,
        ExprKind::Var(CedarVar::Context) => Var::Context,
        _ => return None,
    };
    Some((var, attr.to_string()))
}

fn literal(e: &cedar_policy_core::ast::Expr) -> Option<Literal> {
    use cedar_policy_core::ast::{ExprKind, Literal as CedarLiteral};
    match e.expr_kind() {
        ExprKind::Lit(CedarLiteral::String(s)) => Some(Literal::Str(s.to_string())),
        ExprKind::Lit(CedarLiteral::Long(n)) => Some(Literal::Long(*n)),
        ExprKind::Lit(CedarLiteral::Bool(b)) => Some(Literal::Bool(*b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(src: &str) -> Policy {
        Policy::parse(None, src).expect("policy parses")
    }

    #[test]
    fn finds_leading_equality_only_first() {
        let p = policy(
            r#"permit(principal, action, resource) when { resource.tenant == "t1" && principal.x == 2 };"#,
        );
        assert_eq!(
            leading_equality(&p),
            Some((Var::Resource, "tenant".into(), Literal::Str("t1".into())))
        );
        let p = policy(r#"permit(principal, action, resource) when { 3 == context.level };"#);
        assert_eq!(
            leading_equality(&p),
            Some((Var::Context, "level".into(), Literal::Long(3)))
        );
        let p = policy(
            r#"permit(principal, action, resource) when { principal.ok && resource.tenant == "t1" };"#,
        );
        assert_eq!(leading_equality(&p), None);
        let p =
            policy(r#"permit(principal, action, resource) unless { resource.tenant == "t1" };"#);
        assert_eq!(leading_equality(&p), None);
        let p =
            policy(r#"permit(principal, action, resource) when { resource.owner == principal };"#);
        assert_eq!(leading_equality(&p), None);
    }
}
