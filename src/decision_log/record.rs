//! A decision record: what the decision path hands over (`Entry`, cheap to
//! build: it moves the request and shares the decision), written there as
//! canonical JSON without its chain position, which the writer adds.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

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
    /// A tool listing's verdict that holds for some arguments only.
    pub depends_on_arguments: bool,
}

/// Writes JSON straight into a byte buffer: a record is written on the
/// decision path, and serde's generic machinery (flattened structs become
/// maps of boxed keys) cost more than the rest of the hand-over. The output
/// is what `serde_json` writes for the same fields (tested against it).
struct Json<'a>(&'a mut Vec<u8>);

impl Json<'_> {
    fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn str(&mut self, s: &str) {
        // Most strings need no escapes; the rest get serde_json's.
        if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.0.push(b'"');
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(b'"');
        } else {
            let _ = serde_json::to_writer(&mut *self.0, s);
        }
    }

    fn uint(&mut self, n: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = n;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.0.extend_from_slice(&digits[at..]);
    }

    /// `"key":` after a comma, unless it is the object's first.
    fn key(&mut self, key: &str, first: bool) {
        if !first {
            self.0.push(b',');
        }
        self.str(key);
        self.0.push(b':');
    }

    /// A JSON array of `items`, each written by `each`.
    fn list<T>(&mut self, items: &[T], each: impl Fn(&mut Self, &T)) {
        self.0.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.0.push(b',');
            }
            each(self, item);
        }
        self.0.push(b']');
    }

    fn strs(&mut self, items: &[String]) {
        self.list(items, |j, s| j.str(s));
    }

    /// A JSON value with object keys sorted at every depth.
    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.raw(b"null"),
            Value::Bool(true) => self.raw(b"true"),
            Value::Bool(false) => self.raw(b"false"),
            Value::Number(n) => match n.as_u64() {
                Some(u) => self.uint(u),
                None => {
                    let _ = serde_json::to_writer(&mut *self.0, n);
                }
            },
            Value::String(s) => self.str(s),
            Value::Array(items) => self.list(items, Self::value),
            Value::Object(map) => self.sorted_map(map),
        }
    }

    fn sorted_map(&mut self, map: &Map<String, Value>) {
        self.0.push(b'{');
        // Maps built from protobuf Structs arrive sorted: no key list then.
        if map.keys().is_sorted() {
            for (i, (k, v)) in map.iter().enumerate() {
                self.key(k, i == 0);
                self.value(v);
            }
        } else {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            for (i, k) in keys.into_iter().enumerate() {
                self.key(k, i == 0);
                self.value(&map[k]);
            }
        }
        self.0.push(b'}');
    }

    fn entity(&mut self, e: &EntityRef) {
        self.raw(b"{\"id\":");
        self.str(&e.id);
        if let Some(properties) = &e.properties {
            self.raw(b",\"properties\":");
            self.sorted_map(properties);
        }
        self.raw(b",\"type\":");
        self.str(&e.kind);
        self.0.push(b'}');
    }

    /// The request in the record's (AuthZEN-shaped) form, keys sorted.
    fn request(&mut self, r: &Request) {
        self.raw(b"{\"action\":{\"name\":");
        self.str(&r.action);
        self.raw(b"},\"context\":");
        self.sorted_map(&r.context);
        self.raw(b",\"resource\":");
        self.entity(&r.resource);
        self.raw(b",\"subject\":");
        self.entity(&r.subject);
        self.0.push(b'}');
    }

    /// The decision's fields, continuing an object; `errors` stand in for
    /// the decision's own (they may be its redacted ones).
    fn decision(&mut self, d: &Decision, errors: &[String]) {
        self.raw(b",\"outcome\":");
        self.str(d.outcome.as_str());
        self.raw(b",\"policy_ids\":");
        self.strs(&d.policy_ids);
        self.raw(b",\"step_up\":");
        match &d.step_up {
            None => self.raw(b"null"),
            Some(s) => {
                self.raw(b"{\"acr_values\":");
                self.strs(&s.acr_values);
                self.raw(b",\"max_age\":");
                match s.max_age {
                    Some(n) => self.uint(n),
                    None => self.raw(b"null"),
                }
                self.0.push(b'}');
            }
        }
        self.raw(b",\"approver_groups\":");
        self.strs(&d.approver_groups);
        self.raw(b",\"obligations\":");
        self.list(&d.obligations, |j, o| {
            j.raw(b"{\"key\":");
            j.str(&o.key);
            j.raw(b",\"value\":");
            j.str(&o.value);
            j.raw(b",\"policy_id\":");
            j.str(&o.policy_id);
            j.0.push(b'}');
        });
        self.raw(b",\"errors\":");
        self.strs(errors);
    }

    /// `,"key":"value"` when there is a value.
    fn optional(&mut self, key: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.key(key, false);
            self.str(v);
        }
    }
}

/// The request as a JSON value, for masking rules to edit.
fn request_value(r: &Request) -> Value {
    let entity = |e: &EntityRef| {
        let mut m = Map::new();
        m.insert("id".into(), Value::from(e.id.as_str()));
        if let Some(p) = &e.properties {
            m.insert("properties".into(), Value::Object(p.clone()));
        }
        m.insert("type".into(), Value::from(e.kind.as_str()));
        Value::Object(m)
    };
    let mut m = Map::new();
    m.insert("action".into(), serde_json::json!({ "name": r.action }));
    m.insert("context".into(), Value::Object(r.context.clone()));
    m.insert("resource".into(), entity(&r.resource));
    m.insert("subject".into(), entity(&r.subject));
    Value::Object(m)
}

/// Writes everything of a decision record but its chain position, masked,
/// into `out` (cleared first). Built on the decision path, so an unmasked
/// request never leaves it. Field order is fixed here and maps inside the
/// request are sorted, so equal records give equal bytes.
pub fn decision_tail(e: &Entry, out: &mut Vec<u8>) {
    out.clear();
    let mut j = Json(out);
    j.raw(b"{\"kind\":");
    j.str(e.kind);
    let mut time = [0; super::time::TIME_LEN];
    j.raw(b",\"time\":");
    j.str(super::time::format_micros_into(e.time_us, &mut time));
    let mut id = uuid::Uuid::encode_buffer();
    j.raw(b",\"decision_id\":");
    j.str(e.decision_id.hyphenated().encode_lower(&mut id));
    j.raw(b",\"bundle\":");
    j.str(&e.bundle);
    j.raw(b",\"revision\":");
    j.str(&e.revision);
    j.raw(b",\"request\":");
    if e.mask.is_empty() {
        j.request(&e.request);
    } else {
        let mut form = request_value(&e.request);
        // Sorted before masking too: a hashed object must hash the same
        // whatever order its keys arrived in.
        form.sort_all_objects();
        e.mask.apply(&mut form);
        j.value(&form);
    }
    j.decision(&e.decision, &recorded_errors(e));
    j.optional("session_id", e.request.session_id.as_deref());
    let l = &e.links;
    j.optional("approval_id", l.approval_id.as_deref());
    j.optional("approval_expires_at", l.approval_expires_at.as_deref());
    j.optional("approved_by", l.approved_by.as_deref());
    // The control plane's or the transport's words: not vetted either.
    let approval_error = match l.approval_error.as_deref() {
        Some(_) if !e.mask.is_empty() => Some(WITHHELD_ERROR),
        error => error,
    };
    j.optional("approval_error", approval_error);
    if e.depends_on_arguments {
        j.raw(b",\"depends_on_arguments\":true");
    }
    j.raw(b",\"latency_us\":");
    j.uint(e.latency.as_micros() as u64);
    j.optional("trace_id", e.trace_id.as_deref());
    j.optional("span_id", e.span_id.as_deref());
    j.0.push(b'}');
}

/// The errors a record carries: under masking rules, none that may quote
/// the request (Cedar's messages name the entities and values involved).
/// An error with no redacted form is withheld, not written: redacting is
/// the default, so a new source of errors cannot leak masked values.
fn recorded_errors(e: &Entry) -> Cow<'_, [String]> {
    let errors = &e.decision.errors;
    if e.mask.is_empty() || errors.is_empty() {
        return Cow::Borrowed(errors);
    }
    match &e.decision.redacted_errors {
        Some(redacted) => Cow::Borrowed(redacted),
        None => Cow::Owned(vec![WITHHELD_ERROR.to_owned(); errors.len()]),
    }
}

/// What a record holds, under masking rules, for an error that may quote
/// the request and has no redacted form.
const WITHHELD_ERROR: &str = "error withheld: the bundle masks request fields";

/// A marker standing in for records that were dropped (overflow `drop`), so
/// the loss itself is in the chain.
pub fn dropped_tail(count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut time = [0; super::time::TIME_LEN];
    let mut j = Json(&mut out);
    j.raw(b"{\"kind\":\"dropped\",\"time\":");
    j.str(super::time::format_micros_into(
        super::time::now_micros(),
        &mut time,
    ));
    j.raw(b",\"dropped\":");
    j.uint(count);
    j.0.push(b'}');
    out
}

/// The canonical body: `{"v":1,"instance":…,"seq":…,` then the tail's fields.
pub fn body(instance: &str, seq: u64, tail: &[u8], out: &mut Vec<u8>) {
    BodyStart::new(instance).write(seq, tail, out);
}

/// A body's first bytes up to its seq, which are the same for every record
/// of an instance: the writer makes them once.
pub struct BodyStart(Vec<u8>);

impl BodyStart {
    pub fn new(instance: &str) -> Self {
        let mut start = b"{\"v\":1,\"instance\":".to_vec();
        Json(&mut start).str(instance);
        start.extend_from_slice(b",\"seq\":");
        Self(start)
    }

    /// Appends the body of record `seq` to `out`.
    pub fn write(&self, seq: u64, tail: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
        Json(out).uint(seq);
        out.push(b',');
        out.extend_from_slice(tail.get(1..).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Outcome;

    /// What serde_json writes for a record's fields: the reference the
    /// hand-written form must match byte for byte.
    #[derive(serde::Serialize)]
    struct Reference<'a> {
        kind: &'a str,
        time: String,
        decision_id: String,
        bundle: &'a str,
        revision: &'a str,
        request: Value,
        #[serde(flatten)]
        decision: &'a Decision,
        #[serde(skip_serializing_if = "Option::is_none")]
        session_id: Option<&'a str>,
        #[serde(flatten)]
        links: &'a crate::decision::Links,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        depends_on_arguments: bool,
        latency_us: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        trace_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        span_id: Option<&'a str>,
    }

    fn reference(e: &Entry) -> Vec<u8> {
        // As before the record writer: sorted, masked (erasing may move a
        // key), sorted again.
        let mut request = request_value(&e.request);
        request.sort_all_objects();
        e.mask.apply(&mut request);
        request.sort_all_objects();
        let decision = Decision {
            errors: recorded_errors(e).into_owned(),
            ..(*e.decision).clone()
        };
        let mut links = e.links.clone();
        if !e.mask.is_empty() && links.approval_error.is_some() {
            links.approval_error = Some(WITHHELD_ERROR.into());
        }
        let r = Reference {
            kind: e.kind,
            time: crate::decision_log::time::format_micros(e.time_us),
            decision_id: e.decision_id.to_string(),
            bundle: &e.bundle,
            revision: &e.revision,
            request,
            decision: &decision,
            session_id: e.request.session_id.as_deref(),
            links: &links,
            depends_on_arguments: e.depends_on_arguments,
            latency_us: e.latency.as_micros() as u64,
            trace_id: e.trace_id.as_deref(),
            span_id: e.span_id.as_deref(),
        };
        serde_json::to_vec(&r).expect("json")
    }

    fn entry(request: Request, decision: Decision) -> Entry {
        Entry {
            time_us: 1_709_210_096_789_012,
            decision_id: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            kind: "check",
            bundle: "b".into(),
            revision: "r1".into(),
            request,
            decision: Arc::new(decision),
            latency: Duration::from_micros(12),
            trace_id: None,
            span_id: None,
            mask: Arc::new(MaskRules::default()),
            links: Default::default(),
            depends_on_arguments: false,
        }
    }

    fn request(context: Map<String, Value>) -> Request {
        Request {
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
        }
    }

    #[test]
    fn records_are_written_as_serde_json_writes_them() {
        // Unsorted keys at every depth, every kind of value, and strings
        // that need each kind of escape.
        let awkward: Map<String, Value> = serde_json::from_str(
            r#"{"z": {"y": [1, {"d": -1, "c": 2.5}], "x": null, "w": true, "v": false},
                "a": "quote \" back \\ nl \n tab \t bell \u0007 del \u007f é 🙂",
                "n": 18446744073709551615, "m": -9223372036854775808, "f": 1e300,
                "q\"k": [], "e": {}}"#,
        )
        .expect("json");
        assert!(!awkward.keys().is_sorted());
        let mut sorted = awkward.clone();
        sorted.sort_keys();
        let full = Decision {
            outcome: Outcome::StepUp,
            policy_ids: vec!["p\"1".into(), "p2".into()],
            step_up: Some(crate::decision::StepUp {
                acr_values: vec!["mfa".into(), "phr".into()],
                max_age: Some(300),
            }),
            approver_groups: vec!["admins".into()],
            obligations: vec![crate::decision::Obligation {
                key: "audit".into(),
                value: "high\n".into(),
                policy_id: "p2".into(),
            }],
            errors: vec!["an \"error\"".into()],
            redacted_errors: None,
        };
        let mut no_max_age = full.clone();
        no_max_age.step_up.as_mut().expect("step-up").max_age = None;
        let mut cases = vec![
            entry(request(Map::new()), Decision::deny(vec![], vec![])),
            entry(request(awkward.clone()), full.clone()),
            entry(request(sorted), no_max_age),
        ];
        let mut linked = entry(request(awkward.clone()), full);
        linked.request.session_id = Some("s-1".into());
        linked.request.action = "Acme::Action::\"view\"".into();
        linked.links = crate::decision::Links {
            approval_id: Some("a1".into()),
            approval_expires_at: Some("2024-03-01T00:00:00Z".into()),
            approved_by: Some("bob \"the approver\"".into()),
            approval_error: Some("none".into()),
        };
        linked.depends_on_arguments = true;
        linked.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        linked.span_id = Some("00f067aa0ba902b7".into());
        cases.push(linked);
        let rules = Arc::new(
            MaskRules::parse(
                br#"{"erase": ["/context/a"], "hash": ["/subject/id", "/context/z"]}"#,
            )
            .expect("rules"),
        );
        let failed = Decision {
            redacted_errors: Some(vec!["withheld \"p\"".into()]),
            ..Decision::deny(vec![], vec!["`User::\"u\"` lacks `level`".into()])
        };
        cases.push(entry(request(Map::new()), failed.clone()));
        let mut masked = entry(request(awkward.clone()), failed.clone());
        masked.mask = rules.clone();
        // A hashed object hashes the same whatever order its keys came in.
        let mut sorted_all = Value::Object(awkward);
        sorted_all.sort_all_objects();
        let Value::Object(sorted_all) = sorted_all else {
            unreachable!()
        };
        let mut masked_sorted = entry(request(sorted_all), failed);
        masked_sorted.mask = rules.clone();
        // The approval's error may quote the request too: withheld.
        let mut masked_links = entry(request(Map::new()), Decision::deny(vec![], vec![]));
        masked_links.mask = rules;
        masked_links.links = crate::decision::Links {
            approval_id: Some("a1".into()),
            approval_error: Some("`bob` may not".into()),
            ..Default::default()
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        decision_tail(&masked, &mut a);
        decision_tail(&masked_sorted, &mut b);
        assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
        assert!(String::from_utf8_lossy(&a).contains(r#""z":"sha256:"#));
        cases.push(masked);
        let mut withheld = Vec::new();
        decision_tail(&masked_links, &mut withheld);
        let withheld: Value = serde_json::from_slice(&withheld).expect("json");
        assert_eq!(withheld["approval_error"], WITHHELD_ERROR);
        cases.push(masked_links);
        let mut out = Vec::new();
        for e in &cases {
            decision_tail(e, &mut out);
            let expected = reference(e);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&expected)
            );
        }
        let tail: Value = serde_json::from_slice(&dropped_tail(7)).expect("json");
        assert_eq!(tail["kind"], "dropped");
        assert_eq!(tail["dropped"], 7);
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
            depends_on_arguments: false,
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

    #[test]
    fn masked_records_carry_errors_without_request_values() {
        let failed = Decision {
            redacted_errors: Some(vec!["policy `p1` read a missing attribute".into()]),
            ..Decision::deny(vec![], vec!["`User::\"alice\"` lacks `level`".into()])
        };
        let mut e = entry(request(Map::new()), failed);
        let errors_of = |e: &Entry| {
            let mut tail = Vec::new();
            decision_tail(e, &mut tail);
            serde_json::from_slice::<Value>(&tail).expect("json")["errors"].clone()
        };
        // No masking rules: the log keeps Cedar's message, values and all.
        assert_eq!(
            errors_of(&e),
            serde_json::json!(["`User::\"alice\"` lacks `level`"])
        );
        e.mask = Arc::new(MaskRules::parse(br#"{"hash":["/subject/id"]}"#).expect("rules"));
        assert_eq!(
            errors_of(&e),
            serde_json::json!(["policy `p1` read a missing attribute"])
        );
        // Errors the sidecar wrote itself quote nothing and are kept.
        e.decision = Arc::new(Decision::deny_own(
            vec![],
            vec!["the session is revoked".into()],
        ));
        assert_eq!(errors_of(&e), serde_json::json!(["the session is revoked"]));
        // Any other error without a redacted form is withheld, one for one:
        // nobody has said it quotes nothing.
        let unvetted = vec!["`User::\"alice\"` is unknown".into(), "bob".into()];
        e.decision = Arc::new(Decision::deny(vec![], unvetted.clone()));
        assert_eq!(
            errors_of(&e),
            serde_json::json!([WITHHELD_ERROR, WITHHELD_ERROR])
        );
        e.mask = Arc::new(MaskRules::default());
        assert_eq!(errors_of(&e), serde_json::json!(unvetted));
    }
}
