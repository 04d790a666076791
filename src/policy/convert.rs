//! Request → Cedar: properties become entity attributes and context, converted
//! straight to Cedar values using the schema's types.
//!
//! Converting with the types (instead of Cedar's JSON entity parser plus its
//! schema check) halves the per-decision cost, so this module must do that
//! check itself: a missing required attribute or a wrong type is an error
//! here, never a silent non-match (a `forbid` that silently does not match is
//! an allow).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{Context, Entities, Entity, EntityId, EntityUid, RestrictedExpression, Schema};
use serde_json::{Map, Value};

use super::schema::{AttrType, Extension, RecordType, TypeModel};
use crate::decision::{EntityRef, Request};

/// A request the caller must fix; the message says what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

/// The bundle's static entities: Cedar's store (closed under `in`), plus the
/// raw attributes and parents so a request can extend a stored entity.
pub(crate) struct StaticEntities {
    store: Entities,
    raw: HashMap<EntityUid, RawEntity>,
}

struct RawEntity {
    attrs: Map<String, Value>,
    parents: Vec<EntityUid>,
}

impl StaticEntities {
    /// Parses `entities.json`, checked against the schema by Cedar, and adds
    /// the schema's action entities so `action in Group` works.
    pub(crate) fn new(json: &Value, schema: &Schema) -> Result<Self, String> {
        let store =
            Entities::from_json_value(json.clone(), Some(schema)).map_err(|e| e.to_string())?;
        let mut raw = HashMap::new();
        for item in json.as_array().into_iter().flatten() {
            let uid = item
                .get("uid")
                .and_then(entity_uid_of)
                .ok_or("entity without `uid`")?;
            let attrs = item
                .get("attrs")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let parents = item
                .get("parents")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(entity_uid_of)
                .collect();
            raw.insert(uid, RawEntity { attrs, parents });
        }
        Ok(Self { store, raw })
    }

    pub(crate) fn len(&self) -> usize {
        self.raw.len()
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
    pub(crate) entities: Entities,
    pub(crate) principal_type: &'r str,
    pub(crate) resource_type: &'r str,
    pub(crate) action: &'r EntityUid,
    pub(crate) principal_attrs: Cow<'r, Map<String, Value>>,
    pub(crate) resource_attrs: Cow<'r, Map<String, Value>>,
    pub(crate) context: &'r Map<String, Value>,
}

pub(crate) struct Converter<'m> {
    pub(crate) model: &'m TypeModel,
    pub(crate) statics: &'m StaticEntities,
    /// The entity of each action that is in a group, with its groups as
    /// parents, so `action in` works without copying every action of the
    /// schema into each request.
    pub(crate) action_entities: &'m HashMap<EntityUid, Entity>,
}

impl<'m> Converter<'m> {
    pub(crate) fn prepare<'r>(&self, req: &'r Request) -> Result<Prepared<'r>, RequestError>
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

        let (principal, principal_attrs) = self.entity(&subject_path, &req.subject)?;
        let (resource, resource_attrs) = self.entity(&resource_path, &req.resource)?;
        let ctx_path = Path::root("context");
        let context_pairs = self.record_fields(&ctx_path, &req.context, &action.context)?;
        let context = Context::from_pairs(context_pairs).map_err(|e| ctx_path.err(e))?;

        let principal_uid = principal
            .as_ref()
            .map_or_else(|| uid(self.model, &req.subject), |e| Ok(e.uid()))?;
        let resource_uid = resource
            .as_ref()
            .map_or_else(|| uid(self.model, &req.resource), |e| Ok(e.uid()))?;
        let request = cedar_policy::Request::new(
            principal_uid,
            action.uid.clone(),
            resource_uid,
            context,
            None,
        )
        .map_err(|e| RequestError(e.to_string()))?;

        let mut fresh: Vec<Entity> = Vec::with_capacity(3);
        fresh.extend(principal);
        if let Some(r) = resource {
            if fresh.first().is_some_and(|p| p.uid() == r.uid()) {
                return Err(RequestError(
                    "subject and resource name the same entity with different properties; give the properties once".into(),
                ));
            }
            fresh.push(r);
        }
        fresh.extend(self.action_entities.get(&action.uid).cloned());
        let entities = if self.statics.len() == 0 {
            Entities::from_entities(fresh, None)
        } else {
            self.statics.store.clone().upsert_entities(fresh, None)
        }
        .map_err(|e| RequestError(e.to_string()))?;

        Ok(Prepared {
            request,
            entities,
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

    /// The entity to add for a request's subject or resource, or `None` when
    /// the bundle's stored entity serves as it is. Also returns the attributes
    /// that entity has, for the policy index.
    fn entity<'r>(
        &self,
        path: &Path<'_>,
        e: &'r EntityRef,
    ) -> Result<(Option<Entity>, Attrs<'r>), RequestError>
    where
        'm: 'r,
    {
        let info = &self.model.entities[&e.kind];
        let entity_uid = EntityUid::from_type_name_and_id(info.name.clone(), EntityId::new(&e.id));
        let stored = if self.statics.len() == 0 {
            None
        } else {
            self.statics.raw.get(&entity_uid)
        };
        let attrs: Cow<'r, Map<String, Value>> = match (&e.properties, stored) {
            (None, Some(stored)) => return Ok((None, Cow::Borrowed(&stored.attrs))),
            (Some(props), None) => Cow::Borrowed(props),
            (Some(props), Some(stored)) => {
                let mut merged = stored.attrs.clone();
                merged.extend(props.iter().map(|(k, v)| (k.clone(), v.clone())));
                Cow::Owned(merged)
            }
            (None, None) => Cow::Owned(Map::new()),
        };
        let props_path = path.child("properties");
        let pairs = self.record_fields(&props_path, &attrs, &info.shape)?;
        let parents: HashSet<EntityUid> = stored
            .map(|s| s.parents.iter().cloned().collect())
            .unwrap_or_default();
        let entity = Entity::new(entity_uid, pairs.into_iter().collect(), parents)
            .map_err(|err| props_path.err(err))?;
        Ok((Some(entity), attrs))
    }

    fn record_fields(
        &self,
        path: &Path<'_>,
        obj: &Map<String, Value>,
        ty: &RecordType,
    ) -> Result<Vec<(String, RestrictedExpression)>, RequestError> {
        let mut out = Vec::with_capacity(obj.len());
        for (name, value) in obj {
            let field = path.child(name);
            let expr = match ty.attrs.get(name) {
                Some(spec) => self.value(&field, value, &spec.ty)?,
                None if ty.open => untyped(&field, value)?,
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
            out.push((name.clone(), expr));
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

    fn value(
        &self,
        path: &Path<'_>,
        v: &Value,
        ty: &AttrType,
    ) -> Result<RestrictedExpression, RequestError> {
        let mismatch = || path.err(format!("expected {}, got {}", describe(ty), kind_of(v)));
        Ok(match (ty, v) {
            (AttrType::String, Value::String(s)) => RestrictedExpression::new_string(s.clone()),
            (AttrType::Bool, Value::Bool(b)) => RestrictedExpression::new_bool(*b),
            (AttrType::Long, Value::Number(n)) => RestrictedExpression::new_long(
                n.as_i64()
                    .ok_or_else(|| path.err(format!("expected a whole number, got `{n}`")))?,
            ),
            (AttrType::Set(elem), Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let idx = i.to_string();
                    out.push(self.value(&path.child(&idx), item, elem)?);
                }
                RestrictedExpression::new_set(out)
            }
            (AttrType::Record(rec), Value::Object(obj)) => {
                RestrictedExpression::new_record(self.record_fields(path, obj, rec)?)
                    .map_err(|e| path.err(e))?
            }
            (AttrType::Entity(expected), Value::Object(obj)) => {
                let (kind, id) = entity_ref_parts(obj).ok_or_else(mismatch)?;
                if kind != expected {
                    return Err(path.err(format!(
                        "expected an entity of type `{expected}`, got `{kind}`"
                    )));
                }
                let info = self.model.entities.get(expected).ok_or_else(mismatch)?;
                RestrictedExpression::new_entity_uid(EntityUid::from_type_name_and_id(
                    info.name.clone(),
                    EntityId::new(id),
                ))
            }
            (AttrType::Extension(ext), Value::String(s)) => extension(*ext, s),
            (AttrType::Extension(ext), Value::Object(obj)) => {
                let arg = obj
                    .get("__extn")
                    .and_then(|x| x.get("arg"))
                    .and_then(Value::as_str)
                    .ok_or_else(mismatch)?;
                extension(*ext, arg)
            }
            _ => return Err(mismatch()),
        })
    }
}

fn uid(model: &TypeModel, e: &EntityRef) -> Result<EntityUid, RequestError> {
    let info = model
        .entities
        .get(&e.kind)
        .ok_or_else(|| RequestError(format!("unknown entity type `{}`", e.kind)))?;
    Ok(EntityUid::from_type_name_and_id(
        info.name.clone(),
        EntityId::new(&e.id),
    ))
}

fn extension(ext: Extension, s: &str) -> RestrictedExpression {
    match ext {
        Extension::IpAddr => RestrictedExpression::new_ip(s),
        Extension::Decimal => RestrictedExpression::new_decimal(s),
        Extension::Datetime => RestrictedExpression::new_datetime(s),
        Extension::Duration => RestrictedExpression::new_duration(s),
    }
}

/// Values under `additionalAttributes` records have no declared type.
fn untyped(path: &Path<'_>, v: &Value) -> Result<RestrictedExpression, RequestError> {
    Ok(match v {
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => RestrictedExpression::new_long(
            n.as_i64()
                .ok_or_else(|| path.err(format!("expected a whole number, got `{n}`")))?,
        ),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let idx = i.to_string();
                out.push(untyped(&path.child(&idx), item)?);
            }
            RestrictedExpression::new_set(out)
        }
        Value::Object(obj) => {
            let mut out = Vec::with_capacity(obj.len());
            for (k, item) in obj {
                out.push((k.clone(), untyped(&path.child(k), item)?));
            }
            RestrictedExpression::new_record(out).map_err(|e| path.err(e))?
        }
        Value::Null => return Err(path.err("null is not a Cedar value; leave the field out")),
    })
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

fn entity_uid_of(v: &Value) -> Option<EntityUid> {
    let (kind, id) = entity_ref_parts(v.as_object()?)?;
    let ty = cedar_policy::EntityTypeName::from_str(kind).ok()?;
    Some(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
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
