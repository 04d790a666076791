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
    /// The caller's span id from the same header.
    pub span_id: Option<String>,
    /// The masking rules of the revision that decided.
    pub mask: Arc<MaskRules>,
    /// The approval the decision filed or spent.
    pub links: crate::decision::Links,
}

/// The body after its chain position (`v`, `instance`, `seq`, which the
/// writer puts in front). Field order is fixed by this struct and maps
/// inside the request are sorted, so equal records give equal bytes.
#[derive(Serialize)]
struct Tail<'a> {
    kind: &'a str,
    time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    decision_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<RequestForm<'a>>,
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    decision: Option<&'a Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    #[serde(flatten)]
    links: Option<&'a crate::decision::Links>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    span_id: Option<&'a str>,
    /// For a `dropped` marker: how many records were not kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<u64>,
}

/// The request in the record's (AuthZEN-shaped) form, masked. Without
/// masking rules it is serialized straight from the request (no copy).
enum RequestForm<'a> {
    Borrowed(Borrowed<'a>),
    Masked(Value),
}

impl Serialize for RequestForm<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RequestForm::Borrowed(b) => b.serialize(s),
            RequestForm::Masked(v) => v.serialize(s),
        }
    }
}

/// Fields in key order, as the sorted `Value` form serializes them.
#[derive(Serialize)]
struct Borrowed<'a> {
    action: ActionForm<'a>,
    context: SortedMap<'a>,
    resource: EntityForm<'a>,
    subject: EntityForm<'a>,
}

#[derive(Serialize)]
struct ActionForm<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct EntityForm<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<SortedMap<'a>>,
    #[serde(rename = "type")]
    kind: &'a str,
}

/// A JSON object serialized with its keys sorted, at every depth.
struct SortedMap<'a>(&'a Map<String, Value>);

impl Serialize for SortedMap<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        // Maps built from protobuf Structs arrive sorted: no key list then.
        if self.0.keys().is_sorted() {
            for (k, v) in self.0 {
                map.serialize_entry(k, &Sorted(v))?;
            }
        } else {
            let mut keys: Vec<&String> = self.0.keys().collect();
            keys.sort_unstable();
            for k in keys {
                map.serialize_entry(k, &Sorted(&self.0[k]))?;
            }
        }
        map.end()
    }
}

struct Sorted<'a>(&'a Value);

impl Serialize for Sorted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        match self.0 {
            Value::Object(m) => SortedMap(m).serialize(s),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Sorted(item))?;
                }
                seq.end()
            }
            other => other.serialize(s),
        }
    }
}

fn request_form<'a>(r: &'a Request, mask: &MaskRules) -> RequestForm<'a> {
    let entity = |e: &'a EntityRef| EntityForm {
        id: &e.id,
        properties: e.properties.as_ref().map(SortedMap),
        kind: &e.kind,
    };
    let borrowed = Borrowed {
        action: ActionForm { name: &r.action },
        context: SortedMap(&r.context),
        resource: entity(&r.resource),
        subject: entity(&r.subject),
    };
    if mask.is_empty() {
        return RequestForm::Borrowed(borrowed);
    }
    let mut form = serde_json::to_value(&borrowed).unwrap_or(Value::Null);
    mask.apply(&mut form);
    form.sort_all_objects();
    RequestForm::Masked(form)
}

/// Writes everything of a decision record but its chain position, masked,
/// into `out` (cleared first). Built on the decision path, so an unmasked
/// request never leaves it.
pub fn decision_tail(e: &Entry, out: &mut Vec<u8>) {
    let mut time = [0; super::time::TIME_LEN];
    let mut id = uuid::Uuid::encode_buffer();
    let tail = Tail {
        kind: e.kind,
        time: super::time::format_micros_into(e.time_us, &mut time),
        decision_id: Some(e.decision_id.hyphenated().encode_lower(&mut id)),
        bundle: Some(&e.bundle),
        revision: Some(&e.revision),
        request: Some(request_form(&e.request, &e.mask)),
        decision: Some(&e.decision),
        session_id: e.request.session_id.as_deref(),
        links: Some(&e.links),
        latency_us: Some(e.latency.as_micros() as u64),
        trace_id: e.trace_id.as_deref(),
        span_id: e.span_id.as_deref(),
        dropped: None,
    };
    out.clear();
    // Serializing plain data into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &tail);
}

/// A marker standing in for records that were dropped (overflow `drop`), so
/// the loss itself is in the chain.
pub fn dropped_tail(count: u64) -> Vec<u8> {
    let time = super::time::format_micros(super::time::now_micros());
    let tail = Tail {
        kind: "dropped",
        time: &time,
        decision_id: None,
        bundle: None,
        revision: None,
        request: None,
        decision: None,
        session_id: None,
        links: None,
        latency_us: None,
        trace_id: None,
        span_id: None,
        dropped: Some(count),
    };
    let mut out = Vec::with_capacity(128);
    let _ = serde_json::to_writer(&mut out, &tail);
    out
}

/// The canonical body: `{"v":1,"instance":…,"seq":…,` then the tail's fields.
pub fn body(instance: &str, seq: u64, tail: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"v\":1,\"instance\":");
    let _ = serde_json::to_writer(&mut *out, instance);
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.push(b',');
    out.extend_from_slice(tail.get(1..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Outcome;

    #[test]
    fn the_borrowed_and_the_masked_form_serialize_alike() {
        let mut context = Map::new();
        context.insert(
            "b".into(),
            serde_json::json!({"y": [1, {"d": 1, "c": 2}], "x": null}),
        );
        context.insert("a".into(), Value::from("z"));
        let r = Request {
            subject: EntityRef {
                kind: "User".into(),
                id: "u".into(),
                properties: Some(context.clone()),
            },
            action: "view".into(),
            resource: EntityRef {
                kind: "Doc".into(),
                id: "d".into(),
                properties: None,
            },
            context,
            session_id: None,
        };
        let plain = serde_json::to_string(&request_form(&r, &MaskRules::default())).expect("json");
        // A rule that matches nothing takes the masking path.
        let rules = MaskRules::parse(br#"{"erase": ["/context/absent"]}"#).expect("rules");
        let masked = serde_json::to_string(&request_form(&r, &rules)).expect("json");
        assert_eq!(plain, masked);
        assert!(plain.starts_with(r#"{"action":{"name":"view"},"context":{"a":"z","b":{"x":null,"y":[1,{"c":2,"d":1}]}}"#), "{plain}");
        // A map that arrives sorted takes the path without a key list.
        let mut sorted = r.context.clone();
        sorted.sort_keys();
        assert!(sorted.keys().is_sorted() && !r.context.keys().is_sorted());
        assert_eq!(
            serde_json::to_string(&SortedMap(&sorted)).expect("json"),
            serde_json::to_string(&SortedMap(&r.context)).expect("json")
        );
    }

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
                session_id: None,
            },
            decision: Arc::new(Decision::deny(vec!["p1".into()], vec![])),
            latency: Duration::from_micros(12),
            trace_id: None,
            span_id: None,
            mask: Arc::new(MaskRules::parse(br#"{"erase":["/context/ssn"]}"#).expect("rules")),
            links: Default::default(),
        };
        let mut tail = b"left over".to_vec();
        decision_tail(&entry, &mut tail);
        let mut out = Vec::new();
        body("i1", 7, &tail, &mut out);
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
