//! The bundle schema as a type model the request converter walks: entity
//! shapes, action scopes and context types, with every name fully qualified
//! and every common type resolved.
//!
//! Cedar's public API does not expose attribute types, so the model is read
//! from the schema's JSON form with types resolved
//! (`schema_str_to_json_with_resolved_types`).

use std::collections::HashMap;
use std::str::FromStr;

use cedar_policy::{EntityTypeName, EntityUid};
use serde_json::Value;

/// The type of an attribute or context field.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrType {
    String,
    Long,
    Bool,
    Set(Box<AttrType>),
    Record(RecordType),
    Entity(String),
    Extension(Extension),
}

/// Cedar extension types, written as strings in requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    IpAddr,
    Decimal,
    Datetime,
    Duration,
}

/// A record's declared attributes; anything else is refused (the
/// `.cedarschema` form has no open records).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RecordType {
    pub attrs: HashMap<String, AttrSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttrSpec {
    pub ty: AttrType,
    pub required: bool,
}

#[derive(Debug, Clone)]
pub struct EntityTypeInfo {
    pub name: EntityTypeName,
    /// The same name in cedar-policy-core's terms, for building entities.
    pub core: cedar_policy_core::ast::EntityType,
    pub shape: RecordType,
}

#[derive(Debug, Clone)]
pub struct ActionInfo {
    pub uid: EntityUid,
    pub principals: Vec<String>,
    pub resources: Vec<String>,
    pub context: RecordType,
}

/// Entity types and actions of a schema, by fully qualified name.
#[derive(Debug, Clone, Default)]
pub struct TypeModel {
    pub entities: HashMap<String, EntityTypeInfo>,
    /// By the action's display form, `Action::"edit"` or `Ns::Action::"edit"`.
    pub actions: HashMap<String, ActionInfo>,
    /// Bare action id → display form, when the id is unique across namespaces.
    action_ids: HashMap<String, Option<String>>,
    /// The schema in Cedar's JSON form, types resolved (for reduced schemas).
    pub json: Value,
}

impl TypeModel {
    /// Builds the model from a Cedar schema text that Cedar already accepted.
    pub fn from_schema_text(text: &str) -> Result<Self, String> {
        let (json, _) = cedar_policy::schema_str_to_json_with_resolved_types(text)
            .map_err(|e| e.to_string())?;
        let namespaces = json.as_object().ok_or("schema JSON is not an object")?;
        let mut common = HashMap::new();
        for (ns, body) in namespaces {
            for (name, ty) in obj(body, "commonTypes") {
                common.insert(qualify(ns, name), ty.clone());
            }
        }
        let resolver = Resolver { common: &common };
        let mut model = TypeModel {
            json: json.clone(),
            ..TypeModel::default()
        };
        for (ns, body) in namespaces {
            for (name, def) in obj(body, "entityTypes") {
                let full = qualify(ns, name);
                let shape = match def.get("shape") {
                    Some(shape) => resolver.record(shape, 0)?,
                    None => RecordType::default(),
                };
                let type_name = EntityTypeName::from_str(&full).map_err(|e| e.to_string())?;
                model.entities.insert(
                    full,
                    EntityTypeInfo {
                        core: type_name.as_ref().clone(),
                        name: type_name,
                        shape,
                    },
                );
            }
            let action_type = qualify(ns, "Action");
            for (id, def) in obj(body, "actions") {
                let display = format!("{action_type}::{}", quote(id));
                let uid = EntityUid::from_str(&display).map_err(|e| e.to_string())?;
                let applies = def.get("appliesTo");
                let names = |key: &str| -> Vec<String> {
                    applies
                        .and_then(|a| a.get(key))
                        .and_then(Value::as_array)
                        .map(|v| {
                            v.iter()
                                .filter_map(|t| t.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let context = match applies.and_then(|a| a.get("context")) {
                    Some(ctx) => resolver.record(ctx, 0)?,
                    None => RecordType::default(),
                };
                model.actions.insert(
                    display.clone(),
                    ActionInfo {
                        uid,
                        principals: names("principalTypes"),
                        resources: names("resourceTypes"),
                        context,
                    },
                );
                model
                    .action_ids
                    .entry(id.clone())
                    .and_modify(|slot| *slot = None)
                    .or_insert(Some(display));
            }
        }
        Ok(model)
    }

    /// The schema with only the actions in `keep` (display forms), for
    /// validating policies that can only apply to those actions.
    pub fn reduced_schema(
        &self,
        keep: &std::collections::HashSet<String>,
    ) -> Option<cedar_policy::Schema> {
        let mut json = self.json.clone();
        for (ns, body) in json.as_object_mut()? {
            let action_type = qualify(ns, "Action");
            if let Some(actions) = body.get_mut("actions").and_then(Value::as_object_mut) {
                actions.retain(|id, _| keep.contains(&format!("{action_type}::{}", quote(id))));
            }
        }
        cedar_policy::Schema::from_json_value(json).ok()
    }

    /// Finds an action by bare id (`edit`) or display form (`Ns::Action::"edit"`).
    pub fn action(&self, name: &str) -> Result<&ActionInfo, String> {
        if let Some(info) = self.actions.get(name) {
            return Ok(info);
        }
        match self.action_ids.get(name) {
            Some(Some(display)) => self.actions.get(display).ok_or_else(|| name.to_owned()),
            Some(None) => Err(format!(
                "action `{name}` is defined in several namespaces; name it in full, e.g. `Ns::Action::\"{name}\"`"
            )),
            None => Err(format!(
                "unknown action `{name}`: the bundle schema does not define it"
            )),
        }
    }
}

fn obj<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = (&'a String, &'a Value)> {
    v.get(key).and_then(Value::as_object).into_iter().flatten()
}

fn qualify(ns: &str, name: &str) -> String {
    if ns.is_empty() || name.contains("::") {
        name.to_owned()
    } else {
        format!("{ns}::{name}")
    }
}

fn quote(id: &str) -> String {
    serde_json::Value::String(id.to_owned()).to_string()
}

struct Resolver<'a> {
    common: &'a HashMap<String, Value>,
}

impl Resolver<'_> {
    /// Common types may refer to each other; Cedar rejects cycles, and the
    /// depth bound keeps a surprise from recursing forever.
    fn ty(&self, v: &Value, depth: usize) -> Result<AttrType, String> {
        if depth > 64 {
            return Err("schema types nest deeper than 64 levels".into());
        }
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .ok_or("schema type without `type`")?;
        Ok(match kind {
            "String" => AttrType::String,
            "Long" => AttrType::Long,
            "Bool" | "Boolean" => AttrType::Bool,
            "Set" => AttrType::Set(Box::new(
                self.ty(v.get("element").ok_or("set without `element`")?, depth + 1)?,
            )),
            "Record" => AttrType::Record(self.record(v, depth + 1)?),
            "Entity" => AttrType::Entity(
                v.get("name")
                    .and_then(Value::as_str)
                    .ok_or("entity type without `name`")?
                    .to_owned(),
            ),
            "Extension" => extension(v.get("name").and_then(Value::as_str).unwrap_or_default())?,
            "ipaddr" | "decimal" | "datetime" | "duration" => extension(kind)?,
            other => match self.common.get(other) {
                Some(def) => self.ty(def, depth + 1)?,
                None => return Err(format!("schema type `{other}` is not supported")),
            },
        })
    }

    fn record(&self, v: &Value, depth: usize) -> Result<RecordType, String> {
        if v.get("type").and_then(Value::as_str) != Some("Record") {
            return match self.ty(v, depth)? {
                AttrType::Record(r) => Ok(r),
                _ => Err("expected a record type".into()),
            };
        }
        let mut attrs = HashMap::new();
        for (name, spec) in obj(v, "attributes") {
            let required = spec
                .get("required")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            attrs.insert(
                name.clone(),
                AttrSpec {
                    ty: self.ty(spec, depth + 1)?,
                    required,
                },
            );
        }
        Ok(RecordType { attrs })
    }
}

fn extension(name: &str) -> Result<AttrType, String> {
    Ok(AttrType::Extension(match name {
        "ipaddr" => Extension::IpAddr,
        "decimal" => Extension::Decimal,
        "datetime" => Extension::Datetime,
        "duration" => Extension::Duration,
        other => return Err(format!("extension type `{other}` is not supported")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"namespace Acme {
        type Addr = { city: String, zip?: Long };
        entity Group;
        entity User in [Group] = { roles: Set<String>, addr: Addr, ip: ipaddr, mgr?: User };
        entity Doc = { owner: User };
        action view appliesTo { principal: User, resource: Doc, context: { mfa: Bool } };
    }
    entity Doc;
    action view appliesTo { principal: Acme::User, resource: Doc };"#;

    #[test]
    fn resolves_common_types_and_namespaces() {
        let model = TypeModel::from_schema_text(SCHEMA).expect("schema");
        let user = &model.entities["Acme::User"].shape;
        assert_eq!(
            user.attrs["roles"].ty,
            AttrType::Set(Box::new(AttrType::String))
        );
        assert_eq!(user.attrs["ip"].ty, AttrType::Extension(Extension::IpAddr));
        assert_eq!(user.attrs["mgr"].ty, AttrType::Entity("Acme::User".into()));
        assert!(!user.attrs["mgr"].required);
        let AttrType::Record(addr) = &user.attrs["addr"].ty else {
            panic!("addr is a record")
        };
        assert!(!addr.attrs["zip"].required);
        assert!(model.entities.contains_key("Doc"));
    }

    #[test]
    fn actions_by_id_and_full_name() {
        let model = TypeModel::from_schema_text(SCHEMA).expect("schema");
        let err = model.action("view").expect_err("ambiguous");
        assert!(err.contains("several namespaces"), "{err}");
        let acme = model.action(r#"Acme::Action::"view""#).expect("qualified");
        assert_eq!(acme.principals, ["Acme::User"]);
        assert!(acme.context.attrs["mfa"].required);
        assert!(model.action("fly").is_err());
    }
}
