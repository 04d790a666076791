//! A decision record: what the decision path hands over (`Entry`, cheap to
//! build: it moves the request and shares the decision) and its canonical
//! JSON body, built off the decision path by the writer.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::mask::MaskRules;
use crate::decision::{Decision, EntityRef, Request};

/// One answered decision, as handed to the trail.
pub struct Entry {
    pub time_us: u64,
    pub decision_id: uuid::Uuid,
    /// Which API made it: `check`, `check_batch`, ...
    pub kind: &'static str,
    pub bundle: Arc<str>,
    pub revision: Arc<str>,
    pub request: Request,
    pub decision: Arc<Decision>,
    pub latency: Duration,
    pub trace_id: Option<String>,
    /// The masking rules of the revision that decided.
    pub mask: Arc<MaskRules>,
}

/// The body's field order is fixed by this struct; maps inside the request
/// are sorted when the body is built, so equal records give equal bytes.
#[derive(Serialize)]
struct Body<'a> {
    v: u8,
    instance: &'a str,
    seq: u64,
    kind: &'a str,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    decision_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    decision: Option<&'a Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    /// For a `dropped` marker: how many records were not kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<u64>,
}

/// The request in the record's (AuthZEN-shaped) form, masked.
fn request_form(r: &Request, mask: &MaskRules) -> Value {
    let entity = |e: &EntityRef| {
        let mut m = Map::new();
        m.insert("type".into(), Value::String(e.kind.clone()));
        m.insert("id".into(), Value::String(e.id.clone()));
        if let Some(p) = &e.properties {
            m.insert("properties".into(), Value::Object(p.clone()));
        }
        Value::Object(m)
    };
    let mut action = Map::new();
    action.insert("name".into(), Value::String(r.action.clone()));
    let mut form = Map::new();
    form.insert("subject".into(), entity(&r.subject));
    form.insert("action".into(), Value::Object(action));
    form.insert("resource".into(), entity(&r.resource));
    form.insert("context".into(), Value::Object(r.context.clone()));
    let mut form = Value::Object(form);
    mask.apply(&mut form);
    form.sort_all_objects();
    form
}

/// The canonical body of a decision record.
pub fn decision_body(instance: &str, seq: u64, e: &Entry, out: &mut Vec<u8>) {
    let body = Body {
        v: 1,
        instance,
        seq,
        kind: e.kind,
        time: super::time::format_micros(e.time_us),
        decision_id: Some(e.decision_id.to_string()),
        bundle: Some(&e.bundle),
        revision: Some(&e.revision),
        request: Some(request_form(&e.request, &e.mask)),
        decision: Some(&e.decision),
        latency_us: Some(e.latency.as_micros() as u64),
        trace_id: e.trace_id.as_deref(),
        dropped: None,
    };
    // Serializing plain data into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &body);
}

/// A marker standing in for records that were dropped (overflow `drop`), so
/// the loss itself is in the chain.
pub fn dropped_body(instance: &str, seq: u64, count: u64, out: &mut Vec<u8>) {
    let body = Body {
        v: 1,
        instance,
        seq,
        kind: "dropped",
        time: super::time::format_micros(super::time::now_micros()),
        decision_id: None,
        bundle: None,
        revision: None,
        request: None,
        decision: None,
        latency_us: None,
        trace_id: None,
        dropped: Some(count),
    };
    let _ = serde_json::to_writer(out, &body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Outcome;

    #[test]
    fn bodies_are_canonical_and_masked() {
        let mut context = Map::new();
        context.insert("z".into(), Value::from(1));
        context.insert("ssn".into(), Value::from("123-45-6789"));
        context.insert("a".into(), Value::from(2));
        let entry = Entry {
            time_us: 1_709_210_096_789_012,
            decision_id: uuid::Uuid::nil(),
            kind: "check",
            bundle: "b".into(),
            revision: "r1".into(),
            request: Request {
                subject: EntityRef {
                    kind: "User".into(),
                    id: "alice".into(),
                    properties: None,
                },
                action: "view".into(),
                resource: EntityRef {
                    kind: "Doc".into(),
                    id: "d1".into(),
                    properties: None,
                },
                context,
            },
            decision: Arc::new(Decision::deny(vec!["p1".into()], vec![])),
            latency: Duration::from_micros(12),
            trace_id: None,
            mask: Arc::new(MaskRules::parse(br#"{"erase":["/context/ssn"]}"#).expect("rules")),
        };
        let mut out = Vec::new();
        decision_body("i1", 7, &entry, &mut out);
        let text = String::from_utf8(out).expect("utf8");
        assert!(!text.contains("123-45"), "{text}");
        assert!(text.starts_with(r#"{"v":1,"instance":"i1","seq":7,"kind":"check","time":"2024-02-29T12:34:56.789012Z""#), "{text}");
        assert!(text.contains(r#""context":{"a":2,"z":1}"#), "{text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["outcome"], serde_json::json!(Outcome::Deny));
        assert_eq!(v["policy_ids"], serde_json::json!(["p1"]));
        assert_eq!(v["latency_us"], 12);
    }
}
