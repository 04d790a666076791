//! Request → Cedar: properties become entity attributes and context, converted
//! straight to Cedar values using the schema's types.
//!
//! Values, entities and the per-request entity store are built with
//! `cedar-policy-core` directly: Cedar's public constructors would evaluate
//! each value again as an expression and recompute the transitive closure of
//! the store on every request, which is most of a decision's cost. Neither is
//! needed here: values are built already evaluated, and a request entity's
//! ancestors are taken from the bundle's store, where the closure was computed
//! once at load.
//!
//! Converting with the types (instead of Cedar's JSON parser plus its schema
//! check) means this module must do that check itself: a missing required
//! attribute or a wrong type is an error here, never a silent non-match (a
//! `forbid` that silently does not match is an allow).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{EntityUid, Schema};
use cedar_policy_core::ast::{
    self, Eid, EntityUIDEntry, Name, PartialValue, RestrictedExpr, Value as CedarValue,
};
use cedar_policy_core::entities::{Entities as CoreEntities, NoEntitiesSchema, TCComputation};
use cedar_policy_core::evaluator::RestrictedEvaluator;
use cedar_policy_core::extensions::Extensions;
use serde_json::{Map, Value};
use smol_str::SmolStr;

use super::schema::{AttrType, Extension, RecordType, TypeModel};
use crate::decision::{EntityRef, Request};

/// A request the caller must fix; the message says what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

/// The bundle's static entities: Cedar's store (closed under `in`), plus the
/// raw attributes so a request can extend a stored entity.
pub(crate) struct StaticEntities {
    store: CoreEntities,
    raw: HashMap<ast::EntityUID, RawEntity>,
}

struct RawEntity {
    attrs: Map<String, Value>,
    /// Every ancestor (the closure), so an extended entity keeps its groups.
    ancestors: HashSet<ast::EntityUID>,
}

impl StaticEntities {
    /// Parses `entities.json`. Cedar checks it against the schema (for its
    /// error messages); the store itself is built with this module's
    /// converter, so stored and request entities are made the same way.
    pub(crate) fn new(json: &Value, schema: &Schema, model: &TypeModel) -> Result<Self, String> {
        cedar_policy::Entities::from_json_value(json.clone(), Some(schema))
            .map_err(|e| e.to_string())?;
        let converter = Converter {
            model,
            statics: &Self::empty(),
            action_entities: &HashMap::new(),
        };
        let mut entities = Vec::new();
        let mut raw = HashMap::new();
        for item in json.as_array().into_iter().flatten() {
            let (kind, id) = item
                .get("uid")
                .and_then(Value::as_object)
                .and_then(entity_ref_parts)
                .ok_or("entity without `uid`")?;
            let attrs = item
                .get("attrs")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let parents: HashSet<ast::EntityUID> = item
                .get("parents")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let (kind, id) = entity_ref_parts(p.as_object()?)?;
                    core_uid(kind, id).ok()
                })
                .collect();
            let info = model
                .entities
                .get(kind)
                .ok_or_else(|| format!("unknown entity type `{kind}`"))?;
            let uid = ast::EntityUID::from_components(info.core.clone(), Eid::new(id), None);
            let path = Path::root("entities.json");
            let pairs = converter
                .record_fields(&path, &attrs, &info.shape)
                .map_err(|e| e.0)?;
            entities.push(ast::Entity::new_with_attr_partial_value(
                uid.clone(),
                pairs.into_iter().map(|(k, v)| (k, PartialValue::Value(v))),
                HashSet::new(),
                parents,
                [],
            ));
            raw.insert(
                uid,
                RawEntity {
                    attrs,
                    ancestors: HashSet::new(),
                },
            );
        }
        let store = CoreEntities::from_entities(
            entities,
            None::<&NoEntitiesSchema>,
            TCComputation::ComputeNow,
            Extensions::all_available(),
        )
        .map_err(|e| e.to_string())?;
        for (uid, entry) in &mut raw {
            if let cedar_policy_core::entities::Dereference::Data(e) = store.entity(uid) {
                entry.ancestors = e.ancestors().cloned().collect();
            }
        }
        Ok(Self { store, raw })
    }

    fn empty() -> Self {
        Self {
            store: CoreEntities::new(),
            raw: HashMap::new(),
        }
    }
}

/// Which part of a request a value came from, rendered only on error.
#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    name: &'a str,
}

impl<'a> Path<'a> {
    fn root(name: &'a str) -> Self {
        Self { parent: None, name }
    }
    fn child(&'a self, name: &'a str) -> Path<'a> {
        Path {
            parent: Some(self),
            name,
        }
    }
    fn render(&self) -> String {
        match self.parent {
            Some(p) => format!("{}.{}", p.render(), self.name),
            None => self.name.to_owned(),
        }
    }
    fn err(&self, what: impl std::fmt::Display) -> RequestError {
        RequestError(format!("`{}`: {what}", self.render()))
    }
}

/// An entity's attributes as the request (or the bundle) gave them.
type Attrs<'r> = Cow<'r, Map<String, Value>>;

/// A request in Cedar's terms, plus the attribute values the policy index
/// looks at.
pub(crate) struct Prepared<'r> {
    pub(crate) request: cedar_policy::Request,
    pub(crate) entities: cedar_policy::Entities,
    pub(crate) principal_type: &'r str,
    pub(crate) resource_type: &'r str,
    pub(crate) action: &'r EntityUid,
    pub(crate) principal_attrs: Attrs<'r>,
    pub(crate) resource_attrs: Attrs<'r>,
    pub(crate) context: &'r Map<String, Value>,
}

pub(crate) struct Converter<'m> {
    pub(crate) model: &'m TypeModel,
    pub(crate) statics: &'m StaticEntities,
    /// The entity of each action that is in a group, with its groups as
    /// ancestors, so `action in` works without copying every action of the
    /// schema into each request.
    pub(crate) action_entities: &'m HashMap<EntityUid, Arc<ast::Entity>>,
}

impl<'m> Converter<'m> {
    pub(crate) fn prepare<'r>(&self, req: &'r Request) -> Result<Prepared<'r>, RequestError>
    where
        'm: 'r,
    {
        self.prepare_with_unknown(req, None)
    }

    /// Like `prepare`, with context attribute `unknown` (if the action's
    /// context declares it) left unknown, for partial evaluation: the
    /// request must not give it.
    pub(crate) fn prepare_with_unknown<'r>(
        &self,
        req: &'r Request,
        unknown: Option<&str>,
    ) -> Result<Prepared<'r>, RequestError>
    where
        'm: 'r,
    {
        let action = self.model.action(&req.action).map_err(RequestError)?;
        let subject_path = Path::root("subject");
        let resource_path = Path::root("resource");
        self.check_applies(
            &subject_path,
            &req.subject,
            &action.principals,
            "principal",
            &req.action,
        )?;
        self.check_applies(
            &resource_path,
            &req.resource,
            &action.resources,
            "resource",
            &req.action,
        )?;

        let (principal_uid, principal, principal_attrs) =
            self.entity(&subject_path, &req.subject)?;
        let (resource_uid, resource, resource_attrs) =
            self.entity(&resource_path, &req.resource)?;
        let ctx_path = Path::root("context");
        let unknown = unknown.filter(|u| action.context.attrs.contains_key(*u));
        let reduced;
        let context_type = match unknown {
            None => &action.context,
            Some(u) => {
                let mut t = action.context.clone();
                t.attrs.remove(u);
                reduced = t;
                &reduced
            }
        };
        let context: BTreeMap<SmolStr, CedarValue> = self
            .record_fields(&ctx_path, &req.context, context_type)?
            .into_iter()
            .collect();
        let context = match unknown {
            None => ast::Context::Value(Arc::new(context)),
            Some(u) => {
                let mut exprs: BTreeMap<SmolStr, ast::Expr> = context
                    .into_iter()
                    .map(|(k, v)| (k, ast::Expr::from(v)))
                    .collect();
                exprs.insert(
                    SmolStr::new(u),
                    ast::Expr::unknown(ast::Unknown::new_untyped(u)),
                );
                ast::Context::RestrictedResidual(Arc::new(exprs))
            }
        };

        let mut fresh: Vec<Arc<ast::Entity>> = Vec::with_capacity(3);
        fresh.extend(principal.map(Arc::new));
        if let Some(r) = resource {
            if fresh.first().is_some_and(|p| p.uid() == r.uid()) {
                return Err(RequestError(
                    "subject and resource name the same entity with different properties; give the properties once".into(),
                ));
            }
            fresh.push(Arc::new(r));
        }
        fresh.extend(self.action_entities.get(&action.uid).cloned());
        // Every entity added here is already closed under `in` (see the
        // module comment), so the closure is not recomputed.
        let base = if self.statics.raw.is_empty() {
            CoreEntities::new()
        } else {
            self.statics.store.clone()
        };
        let entities = base
            .upsert_entities(
                fresh,
                None::<&NoEntitiesSchema>,
                TCComputation::AssumeAlreadyComputed,
                Extensions::all_available(),
            )
            .map_err(|e| RequestError(e.to_string()))?;

        let request = ast::Request::new_unchecked(
            EntityUIDEntry::known(principal_uid, None),
            EntityUIDEntry::known(action.uid.as_ref().clone(), None),
            EntityUIDEntry::known(resource_uid, None),
            Some(context),
        );

        Ok(Prepared {
            request: request.into(),
            entities: entities.into(),
            principal_type: &req.subject.kind,
            resource_type: &req.resource.kind,
            action: &action.uid,
            principal_attrs,
            resource_attrs,
            context: &req.context,
        })
    }

    fn check_applies(
        &self,
        path: &Path<'_>,
        e: &EntityRef,
        allowed: &[String],
        role: &str,
        action: &str,
    ) -> Result<(), RequestError> {
        if !self.model.entities.contains_key(&e.kind) {
            return Err(path.child("type").err(format!(
                "unknown entity type `{}`: the bundle schema does not define it",
                e.kind
            )));
        }
        if !allowed.contains(&e.kind) {
            return Err(path.child("type").err(format!(
                "action `{action}` does not apply to {role} type `{}` (it applies to: {})",
                e.kind,
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            )));
        }
        if e.id.is_empty() {
            return Err(path.child("id").err("must not be empty"));
        }
        Ok(())
    }

    /// The uid of a request's subject or resource, and the entity to add for
    /// it (`None` when the bundle's stored entity serves as it is), with the
    /// attributes that entity has, for the policy index.
    fn entity<'r>(
        &self,
        path: &Path<'_>,
        e: &'r EntityRef,
    ) -> Result<(ast::EntityUID, Option<ast::Entity>, Attrs<'r>), RequestError>
    where
        'm: 'r,
    {
        let info = &self.model.entities[&e.kind];
        let uid = ast::EntityUID::from_components(info.core.clone(), Eid::new(e.id.as_str()), None);
        let stored = if self.statics.raw.is_empty() {
            None
        } else {
            self.statics.raw.get(&uid)
        };
        let attrs: Attrs<'r> = match (&e.properties, stored) {
            (None, Some(stored)) => return Ok((uid, None, Cow::Borrowed(&stored.attrs))),
            (Some(props), None) => Cow::Borrowed(props),
            (Some(props), Some(stored)) => {
                let mut merged = stored.attrs.clone();
                merged.extend(props.iter().map(|(k, v)| (k.clone(), v.clone())));
                Cow::Owned(merged)
            }
            (None, None) => Cow::Owned(Map::new()),
        };
        let pairs = self.record_fields(&path.child("properties"), &attrs, &info.shape)?;
        let ancestors = stored.map(|s| s.ancestors.clone()).unwrap_or_default();
        let entity = ast::Entity::new_with_attr_partial_value(
            uid.clone(),
            pairs.into_iter().map(|(k, v)| (k, PartialValue::Value(v))),
            HashSet::new(),
            ancestors,
            [],
        );
        Ok((uid, Some(entity), attrs))
    }

    fn record_fields(
        &self,
        path: &Path<'_>,
        obj: &Map<String, Value>,
        ty: &RecordType,
    ) -> Result<Vec<(SmolStr, CedarValue)>, RequestError> {
        let mut out = Vec::with_capacity(obj.len());
        for (name, value) in obj {
            let field = path.child(name);
            let v = match ty.attrs.get(name) {
                Some(spec) => self.value(&field, value, &spec.ty)?,
                None => {
                    let mut known: Vec<&str> = ty.attrs.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    return Err(field.err(format!(
                        "not in the bundle schema (expected: {})",
                        if known.is_empty() {
                            "no attributes".to_owned()
                        } else {
                            known.join(", ")
                        }
                    )));
                }
            };
            out.push((SmolStr::new(name), v));
        }
        for (name, spec) in &ty.attrs {
            if spec.required && !obj.contains_key(name) {
                return Err(path
                    .child(name)
                    .err("required by the bundle schema but missing"));
            }
        }
        Ok(out)
    }

    fn value(&self, path: &Path<'_>, v: &Value, ty: &AttrType) -> Result<CedarValue, RequestError> {
        let mismatch = || path.err(format!("expected {}, got {}", describe(ty), kind_of(v)));
        Ok(match (ty, v) {
            (AttrType::String, Value::String(s)) => CedarValue::from(s.as_str()),
            (AttrType::Bool, Value::Bool(b)) => CedarValue::from(*b),
            (AttrType::Long, Value::Number(n)) => CedarValue::from(
                n.as_i64()
                    .ok_or_else(|| path.err(format!("expected a whole number, got `{n}`")))?,
            ),
            (AttrType::Set(elem), Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let idx = i.to_string();
                    out.push(self.value(&path.child(&idx), item, elem)?);
                }
                CedarValue::set(out, None)
            }
            (AttrType::Record(rec), Value::Object(obj)) => {
                CedarValue::record(self.record_fields(path, obj, rec)?, None)
            }
            (AttrType::Entity(expected), Value::Object(obj)) => {
                let (kind, id) = entity_ref_parts(obj).ok_or_else(mismatch)?;
                if kind != expected {
                    return Err(path.err(format!(
                        "expected an entity of type `{expected}`, got `{kind}`"
                    )));
                }
                let info = self.model.entities.get(expected).ok_or_else(mismatch)?;
                CedarValue::from(ast::EntityUID::from_components(
                    info.core.clone(),
                    Eid::new(id),
                    None,
                ))
            }
            (AttrType::Extension(ext), Value::String(s)) => extension(path, *ext, s)?,
            (AttrType::Extension(ext), Value::Object(obj)) => {
                let arg = obj
                    .get("__extn")
                    .and_then(|x| x.get("arg"))
                    .and_then(Value::as_str)
                    .ok_or_else(mismatch)?;
                extension(path, *ext, arg)?
            }
            _ => return Err(mismatch()),
        })
    }
}

fn core_uid(kind: &str, id: &str) -> Result<ast::EntityUID, String> {
    let ty = cedar_policy::EntityTypeName::from_str(kind).map_err(|e| e.to_string())?;
    Ok(ast::EntityUID::from_components(
        ty.as_ref().clone(),
        Eid::new(id),
        None,
    ))
}

/// Extension values are made by calling their constructor, as Cedar does.
fn extension(path: &Path<'_>, ext: Extension, s: &str) -> Result<CedarValue, RequestError> {
    let function = match ext {
        Extension::IpAddr => "ip",
        Extension::Decimal => "decimal",
        Extension::Datetime => "datetime",
        Extension::Duration => "duration",
    };
    let name = Name::from_str(function).map_err(|e| path.err(e))?;
    let call = RestrictedExpr::call_extension_fn(name, [RestrictedExpr::val(s)]);
    RestrictedEvaluator::new(Extensions::all_available())
        .interpret(call.as_borrowed())
        .map_err(|e| path.err(format!("`{s}` is not a valid {function} value: {e}")))
}

/// Accepts the AuthZEN form `{"type": T, "id": I}` and Cedar's `{"__entity": {...}}`.
fn entity_ref_parts(obj: &Map<String, Value>) -> Option<(&str, &str)> {
    let inner = match obj.get("__entity") {
        Some(Value::Object(inner)) => inner,
        _ => obj,
    };
    if inner.len() != 2 {
        return None;
    }
    Some((inner.get("type")?.as_str()?, inner.get("id")?.as_str()?))
}

fn describe(ty: &AttrType) -> String {
    match ty {
        AttrType::String => "a string".into(),
        AttrType::Long => "a whole number".into(),
        AttrType::Bool => "a boolean".into(),
        AttrType::Set(_) => "a list".into(),
        AttrType::Record(_) => "an object".into(),
        AttrType::Entity(t) => format!("an entity reference {{\"type\": \"{t}\", \"id\": ...}}"),
        AttrType::Extension(e) => format!("a {e:?} string").to_lowercase(),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
