//! The AuthZEN JSON request form, as `arbiter check` reads it and the
//! examples are written, and its conversion to the gRPC message.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::pb::v1 as pb;
use crate::decision::{EntityRef, Request};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    subject: JsonEntity,
    action: JsonAction,
    resource: JsonEntity,
    #[serde(default)]
    context: Map<String, Value>,
    #[serde(default)]
    session_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntity {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(default)]
    properties: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonAction {
    name: String,
    #[serde(default)]
    properties: Option<Map<String, Value>>,
}

/// Parses an AuthZEN-shaped evaluation request.
pub fn request_from_json(value: Value) -> Result<Request, String> {
    let r: JsonRequest = serde_json::from_value(value).map_err(|e| e.to_string())?;
    if r.action.properties.is_some_and(|p| !p.is_empty()) {
        return Err("`action.properties` is not supported: send these facts in `context`".into());
    }
    let entity = |e: JsonEntity| EntityRef {
        kind: e.kind,
        id: e.id,
        properties: e.properties,
    };
    Ok(Request {
        subject: entity(r.subject),
        action: r.action.name,
        resource: entity(r.resource),
        context: r.context,
        session_id: r.session_id.filter(|s| !s.is_empty()),
    })
}

/// The gRPC message for a request (what `check --addr` and `bench` send).
pub fn request_to_pb(r: &Request) -> pb::CheckRequest {
    let props = |p: &Option<Map<String, Value>>| p.as_ref().map(to_struct);
    pb::CheckRequest {
        subject: Some(pb::Subject {
            r#type: r.subject.kind.clone(),
            id: r.subject.id.clone(),
            properties: props(&r.subject.properties),
        }),
        action: Some(pb::Action {
            name: r.action.clone(),
            properties: None,
        }),
        resource: Some(pb::Resource {
            r#type: r.resource.kind.clone(),
            id: r.resource.id.clone(),
            properties: props(&r.resource.properties),
        }),
        context: Some(to_struct(&r.context)),
        session_id: r.session_id.clone().unwrap_or_default(),
    }
}

pub fn to_struct(m: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}
