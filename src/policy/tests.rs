//! Engine tests: the example corpus, bad bundles, bad requests, and the
//! policy index checked against whole-set evaluation on generated bundles.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;
use crate::api::json::request_from_json;
use crate::bundle::{Bundle, Manifest, PolicyFile};
use crate::decision::Outcome;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn compile_dir(dir: &Path, index: bool) -> Engine {
    let bundle = Bundle::read_dir(dir).expect("bundle reads");
    Engine::compile(&bundle, CompileOptions { index }).expect("bundle compiles")
}

fn bundle(schema: &str, policies: &str, entities: Value) -> Bundle {
    Bundle {
        manifest: Manifest {
            name: "t".into(),
            revision: "1".into(),
            description: None,
            files: Default::default(),
        },
        policies: vec![PolicyFile {
            name: "p.cedar".into(),
            text: policies.into(),
        }],
        schema: schema.into(),
        entities,
        files: Default::default(),
        source: PathBuf::from("test"),
    }
}

#[test]
fn example_corpus_decides_as_expected_with_and_without_index() {
    let dir = example("documents");
    let bundle = Bundle::read_dir(&dir).expect("bundle reads");
    let cases = crate::policytest::load(&bundle).expect("corpus parses");
    assert!(cases.len() >= 10);
    let seen: std::collections::HashSet<Outcome> =
        cases.iter().map(|(_, c)| c.expect.outcome).collect();
    assert_eq!(seen.len(), 4, "the corpus covers every outcome");
    for index in [true, false] {
        let engine = Engine::compile(&bundle, CompileOptions { index }).expect("compiles");
        let report = crate::policytest::run(&bundle, &engine).expect("runs");
        assert_eq!(report.results.len(), cases.len());
        assert_eq!(report.failed(), 0, "index {index}:\n{}", report.render());
    }
}

#[test]
fn peer_scenario_allows_by_edit_department() {
    let engine = compile_dir(&example("peer-bench"), true);
    let text = std::fs::read_to_string(example("peer-bench/request.json")).expect("request");
    let req = request_from_json(serde_json::from_str(&text).expect("json")).expect("request");
    let d = engine.decide(&req).expect("decides");
    assert_eq!(
        (d.outcome, d.policy_ids),
        (Outcome::Allow, vec!["edit-department".to_owned()])
    );
}

const SCHEMA: &str = r#"
entity User = { department: String, roles: Set<String>, level?: Long };
entity Document = { owner: User, department: String };
action view appliesTo { principal: User, resource: Document, context: { mfa?: Bool } };
"#;

fn req(v: Value) -> Request {
    request_from_json(v).expect("request shape")
}

fn view(subject_props: Value, resource_props: Value, context: Value) -> Request {
    req(json!({
        "subject": {"type": "User", "id": "alice", "properties": subject_props},
        "action": {"name": "view"},
        "resource": {"type": "Document", "id": "d1", "properties": resource_props},
        "context": context
    }))
}

fn ok_props() -> (Value, Value) {
    (
        json!({"department": "eng", "roles": ["viewer"]}),
        json!({"owner": {"type": "User", "id": "bob"}, "department": "eng"}),
    )
}

fn engine(policies: &str) -> Engine {
    Engine::compile(
        &bundle(SCHEMA, policies, json!([])),
        CompileOptions::default(),
    )
    .expect("compiles")
}

#[test]
fn bad_requests_name_the_field() {
    let e = engine(
        r#"@id("p") permit(principal, action, resource) when { resource.department == principal.department };"#,
    );
    let (s, r) = ok_props();
    let err = |r: Request| e.decide(&r).expect_err("invalid").to_string();

    let mut bad = view(s.clone(), r.clone(), json!({}));
    bad.subject.kind = "Robot".into();
    assert!(err(bad).contains("unknown entity type `Robot`"));

    let mut bad = view(s.clone(), r.clone(), json!({}));
    bad.action = "fly".into();
    assert!(err(bad).contains("unknown action `fly`"));

    let m = err(view(
        json!({"department": 7, "roles": []}),
        r.clone(),
        json!({}),
    ));
    assert!(
        m.contains("subject.properties.department") && m.contains("expected a string"),
        "{m}"
    );

    let m = err(view(json!({"roles": []}), r.clone(), json!({})));
    assert!(
        m.contains("subject.properties.department") && m.contains("missing"),
        "{m}"
    );

    let m = err(view(
        json!({"department": "eng", "roles": [1]}),
        r.clone(),
        json!({}),
    ));
    assert!(m.contains("subject.properties.roles.0"), "{m}");

    let m = err(view(
        s.clone(),
        json!({"owner": {"type": "Document", "id": "x"}, "department": "eng"}),
        json!({}),
    ));
    assert!(
        m.contains("resource.properties.owner") && m.contains("`User`"),
        "{m}"
    );

    let m = err(view(s.clone(), r.clone(), json!({"mfa": "yes"})));
    assert!(m.contains("context.mfa") && m.contains("boolean"), "{m}");

    let m = err(view(s.clone(), r.clone(), json!({"extra": 1})));
    assert!(
        m.contains("context.extra") && m.contains("not in the bundle schema"),
        "{m}"
    );

    let m = err(view(
        json!({"department": "eng", "roles": [], "level": 1.5}),
        r.clone(),
        json!({}),
    ));
    assert!(m.contains("whole number"), "{m}");

    let mut bad = view(s, r, json!({}));
    bad.resource.kind = "User".into();
    let m = err(bad);
    assert!(m.contains("does not apply to resource type `User`"), "{m}");
}

#[test]
fn evaluation_errors_fail_closed() {
    // The permit overflows at run time; the forbid that would have denied
    // errors too: Cedar alone would allow by `p2`, Arbiter denies.
    let e = engine(
        r#"@id("p2") permit(principal, action, resource);
           @id("f") forbid(principal, action, resource) when { principal has level && principal.level * 9223372036854775807 > 1 };"#,
    );
    let (_, r) = ok_props();
    let d = e
        .decide(&view(
            json!({"department": "eng", "roles": [], "level": 5}),
            r,
            json!({}),
        ))
        .expect("decides");
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(
        d.errors
            .iter()
            .any(|m| m.contains("`f`") && m.contains("overflow") && m.contains("`5`")),
        "{:?}",
        d.errors
    );
    // For the decision log under masking rules: the policy and the kind of
    // failure, not the subject's level.
    let redacted = d.redacted_errors.expect("cedar errors are redacted too");
    assert_eq!(
        redacted,
        [
            "error while evaluating policy `f`: integer overflow (details withheld: the bundle masks request fields)"
        ]
    );
}

#[test]
fn optional_attribute_missing_is_an_error_not_a_silent_allow() {
    // Strict validation demands `has` for optional attributes, so a policy
    // reading one can only be written safely; the request stays valid.
    let e = engine(
        r#"@id("p") permit(principal, action, resource);
           @id("f") forbid(principal, action, resource) when { principal has level && principal.level > 3 };"#,
    );
    let (s, r) = ok_props();
    assert_eq!(
        e.decide(&view(s, r.clone(), json!({})))
            .expect("ok")
            .outcome,
        Outcome::Allow
    );
    let d = e
        .decide(&view(
            json!({"department": "eng", "roles": [], "level": 9}),
            r,
            json!({}),
        ))
        .expect("ok");
    assert_eq!(
        (d.outcome, d.policy_ids),
        (Outcome::Deny, vec!["f".to_owned()])
    );
}

#[test]
fn invalid_bundles_report_file_line_and_policy() {
    let problems = |policies: &str| {
        Engine::compile(
            &bundle(SCHEMA, policies, json!([])),
            CompileOptions::default(),
        )
        .expect_err("invalid")
        .problems
    };
    let p =
        problems("\n\n@id(\"a\") permit(principal, action, resource) when { resource.nope == 1 };");
    assert_eq!(
        (p[0].file.as_str(), p[0].line, p[0].policy_id.as_deref()),
        ("p.cedar", Some(3), Some("a"))
    );
    assert!(p[0].message.contains("nope"), "{}", p[0].message);

    let p = problems(
        "@id(\"a\") permit(principal, action, resource);\n@id(\"a\") forbid(principal, action, resource);",
    );
    assert!(p[0].message.contains("duplicate id"), "{:?}", p);
    assert_eq!(p[0].line, Some(2));

    let p = problems("permit(principal, action, resource);");
    assert!(p[0].message.contains("@id"), "{:?}", p);

    let p = problems("@id(\"a\") permit(principal, action, resource) when { ");
    assert_eq!(p[0].file, "p.cedar");
    assert!(p[0].line.is_some());

    let p = problems("@id(\"a\") @step_up(\"aal2\") permit(principal, action, resource);");
    assert!(p[0].message.contains("forbid"), "{:?}", p);

    let p = problems("@id(\"a\") permit(principal, action == Action::\"fly\", resource);");
    assert!(p[0].message.contains("fly"), "{:?}", p);

    let err = Engine::compile(
        &bundle("entity User = {", "", json!([])),
        CompileOptions::default(),
    )
    .expect_err("bad schema");
    assert_eq!(err.problems[0].file, "schema.cedarschema");

    let err = Engine::compile(
        &bundle(SCHEMA, "", json!([{"uid": {"type": "User", "id": "x"}, "attrs": {"department": 1}, "parents": []}])),
        CompileOptions::default(),
    )
    .expect_err("bad entities");
    assert_eq!(err.problems[0].file, "entities.json");
}

#[test]
fn request_properties_extend_stored_entities() {
    let stored = json!([{"uid": {"type": "User", "id": "alice"}, "attrs": {"department": "eng", "roles": ["viewer"]}, "parents": []}]);
    let e = Engine::compile(
        &bundle(SCHEMA, r#"@id("p") permit(principal, action, resource) when { principal.department == resource.department && principal has level };"#, stored),
        CompileOptions::default(),
    )
    .expect("compiles");
    let (_, r) = ok_props();
    let only_id = req(
        json!({"subject": {"type": "User", "id": "alice"}, "action": {"name": "view"},
        "resource": {"type": "Document", "id": "d1", "properties": r.clone()}, "context": {}}),
    );
    assert_eq!(e.decide(&only_id).expect("ok").outcome, Outcome::Deny);
    let extended = view(json!({"level": 2}), r, json!({}));
    assert_eq!(e.decide(&extended).expect("ok").outcome, Outcome::Allow);
}

/// A random bundle over 3 principal types × 5 actions × 3 resource types,
/// with scope constraints, action groups, leading equalities on tenant,
/// level and context, conditional forbids, and conditions that can fail at
/// run time.
fn random_bundle(rng: &mut fastrand::Rng, n: usize) -> Bundle {
    let mut schema = String::new();
    for t in ["U0", "U1", "U2"] {
        let _ = writeln!(
            schema,
            "entity {t} in [Grp] = {{ tenant: String, level: Long, flag: Bool }};"
        );
    }
    schema.push_str("entity Grp;\n");
    for t in ["R0", "R1", "R2"] {
        let _ = writeln!(
            schema,
            "entity {t} = {{ tenant: String, level: Long, flag: Bool }};"
        );
    }
    schema.push_str("action g0;\naction a0, a1 in [g0] appliesTo { principal: [U0, U1, U2], resource: [R0, R1, R2], context: { tenant: String } };\n");
    schema.push_str("action a2, a3, a4 appliesTo { principal: [U0, U1, U2], resource: [R0, R1, R2], context: { tenant: String } };\n");
    let pick = |rng: &mut fastrand::Rng, xs: &[&str]| xs[rng.usize(..xs.len())].to_owned();
    let mut policies = String::new();
    for i in 0..n {
        let forbid = rng.u8(..4) == 0;
        let mut ann = format!("@id(\"p{i}\")");
        if forbid {
            match rng.u8(..3) {
                0 => ann.push_str(" @step_up(\"aal2\") @max_age(\"60\")"),
                1 => ann.push_str(" @approval(\"ops\")"),
                _ => {}
            }
        }
        let principal = pick(
            rng,
            &[
                "principal",
                "principal is U0",
                "principal is U1",
                "principal == U2::\"u1\"",
                "principal in Grp::\"g\"",
            ],
        );
        let action = pick(
            rng,
            &[
                "action",
                "action == Action::\"a0\"",
                "action == Action::\"a3\"",
                "action in [Action::\"g0\"]",
                "action in [Action::\"a2\", Action::\"a4\"]",
            ],
        );
        let resource = pick(
            rng,
            &[
                "resource",
                "resource is R0",
                "resource is R2",
                "resource == R1::\"r1\"",
            ],
        );
        let lead = match rng.u8(..6) {
            0 => None,
            1 => Some(format!("principal.level == {}", rng.u8(..3))),
            2 => Some(format!("context.tenant == \"t{}\"", rng.u8(..3))),
            _ => Some(format!("resource.tenant == \"t{}\"", rng.u8(..3))),
        };
        let rest = pick(
            rng,
            &[
                "true",
                "resource.level > 1",
                "principal.flag",
                "resource.level * 4611686018427387904 > 0",
                "principal.tenant == resource.tenant",
            ],
        );
        let cond = match lead {
            Some(l) => format!(" when {{ {l} && {rest} }}"),
            None if rng.bool() => format!(" when {{ {rest} }}"),
            None => String::new(),
        };
        let unless = if rng.u8(..5) == 0 {
            " unless { resource.flag }"
        } else {
            ""
        };
        let effect = if forbid { "forbid" } else { "permit" };
        let _ = writeln!(
            policies,
            "{ann}\n{effect}({principal}, {action}, {resource}){cond}{unless};"
        );
    }
    let entities = json!([{"uid": {"type": "Grp", "id": "g"}, "attrs": {}, "parents": []}]);
    bundle(&schema, &policies, entities)
}

fn random_request(rng: &mut fastrand::Rng) -> Request {
    let props = |rng: &mut fastrand::Rng| json!({"tenant": format!("t{}", rng.u8(..4)), "level": rng.i64(0..4), "flag": rng.bool()});
    let p = props(rng);
    let r = props(rng);
    req(json!({
        "subject": {"type": format!("U{}", rng.u8(..3)), "id": format!("u{}", rng.u8(..3)), "properties": p},
        "action": {"name": format!("a{}", rng.u8(..5))},
        "resource": {"type": format!("R{}", rng.u8(..3)), "id": format!("r{}", rng.u8(..3)), "properties": r},
        "context": {"tenant": format!("t{}", rng.u8(..4))}
    }))
}

#[test]
fn index_gives_exactly_the_decisions_of_the_whole_set() {
    let mut eq_indexed = 0;
    let mut outcomes = std::collections::HashMap::new();
    for seed in 0..12u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let b = random_bundle(&mut rng, 150);
        let indexed =
            Engine::compile(&b, CompileOptions { index: true }).expect("random bundle compiles");
        let whole =
            Engine::compile(&b, CompileOptions { index: false }).expect("random bundle compiles");
        eq_indexed += indexed.index_stats().1;
        for _ in 0..400 {
            let r = random_request(&mut rng);
            let a = indexed.decide(&r).expect("valid request");
            let b = whole.decide(&r).expect("valid request");
            assert_eq!(a, b, "seed {seed}: {r:?}");
            *outcomes
                .entry((a.outcome, a.errors.is_empty()))
                .or_insert(0) += 1;
        }
    }
    assert!(eq_indexed > 0, "the equality index was exercised");
    // The generator reaches every outcome, and evaluation errors.
    for o in Outcome::ALL {
        assert!(
            outcomes.contains_key(&(o, true)),
            "{o:?} not reached: {outcomes:?}"
        );
    }
    assert!(
        outcomes.contains_key(&(Outcome::Deny, false)),
        "errors not reached: {outcomes:?}"
    );
}

#[test]
fn generated_bench_bundles_are_indexed() {
    let dir = tempfile::tempdir().expect("tempdir");
    crate::bench::scenario::write_scope_bundle(&dir.path().join("s")).expect("write");
    crate::bench::scenario::write_tenant_bundle(&dir.path().join("t")).expect("write");
    let scope = compile_dir(&dir.path().join("s"), true);
    assert_eq!(scope.policy_count(), 1004);
    let tenant = compile_dir(&dir.path().join("t"), true);
    assert!(
        tenant.index_stats().1 >= 1,
        "tenant scope has an equality index"
    );
    let base = crate::bench::scenario::peer_request();
    for (engine, tenant) in [(&scope, None), (&tenant, Some("t7"))] {
        let r = crate::bench::scenario::request_mix(&base, 1, tenant).remove(0);
        let d = engine
            .decide(&request_from_json(r).expect("request"))
            .expect("decides");
        assert_eq!(d.outcome, Outcome::Allow);
    }
    let r = crate::bench::scenario::request_mix(&base, 1, Some("t7")).remove(0);
    let d = tenant
        .decide(&request_from_json(r).expect("request"))
        .expect("decides");
    assert_eq!(d.policy_ids, ["edit-department", "tenant-t7"]);
}

#[test]
fn stored_groups_apply_transitively_also_to_extended_entities() {
    let schema = "entity Team in [Team];\nentity User in [Team] = { department: String, roles: Set<String> };\n\
                  entity Document = { owner: User, department: String };\n\
                  action view appliesTo { principal: User, resource: Document };";
    let stored = json!([
        {"uid": {"type": "Team", "id": "b"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Team", "id": "a"}, "attrs": {}, "parents": [{"type": "Team", "id": "b"}]},
        {"uid": {"type": "User", "id": "u"}, "attrs": {"department": "eng", "roles": []}, "parents": [{"type": "Team", "id": "a"}]}
    ]);
    let policies = r#"@id("p") permit(principal, action, resource);
                      @id("f") forbid(principal in Team::"b", action, resource);"#;
    let e = Engine::compile(&bundle(schema, policies, stored), CompileOptions::default())
        .expect("compiles");
    let (_, r) = ok_props();
    for subject in [
        json!({"type": "User", "id": "u"}),
        json!({"type": "User", "id": "u", "properties": {"roles": ["x"]}}),
    ] {
        let d = e
            .decide(&req(json!({"subject": subject, "action": {"name": "view"},
                "resource": {"type": "Document", "id": "d", "properties": r.clone()}, "context": {}})))
            .expect("decides");
        assert_eq!(
            (d.outcome, d.policy_ids),
            (Outcome::Deny, vec!["f".to_owned()])
        );
    }
}

#[test]
fn extension_values_convert_and_bad_ones_are_named() {
    let schema = "entity User = { ip: ipaddr, limit: decimal };\nentity Api;\n\
                  action call appliesTo { principal: User, resource: Api, context: { at: datetime } };";
    let policies = r#"@id("p") permit(principal, action, resource)
        when { principal.ip.isInRange(ip("10.0.0.0/8")) && principal.limit.lessThan(decimal("2.5")) && context.at < datetime("2030-01-01") };"#;
    let e = Engine::compile(
        &bundle(schema, policies, json!([])),
        CompileOptions::default(),
    )
    .expect("compiles");
    let ask = |ip: &str| {
        e.decide(&req(
            json!({"subject": {"type": "User", "id": "u", "properties": {"ip": ip, "limit": "1.5"}},
            "action": {"name": "call"}, "resource": {"type": "Api", "id": "a", "properties": {}},
            "context": {"at": "2026-11-24"}}),
        ))
    };
    assert_eq!(ask("10.1.2.3").expect("ok").outcome, Outcome::Allow);
    assert_eq!(ask("192.168.0.1").expect("ok").outcome, Outcome::Deny);
    let err = ask("not-an-ip").expect_err("bad ip").to_string();
    assert!(
        err.contains("subject.properties.ip") && err.contains("not-an-ip"),
        "{err}"
    );
}

#[test]
fn grouped_validation_agrees_with_full_validation() {
    let schema_text = "entity User = { department: String, roles: Set<String>, level?: Long };\n\
        entity Document = { owner: User, department: String };\n\
        action view appliesTo { principal: User, resource: Document, context: { mfa?: Bool } };\n\
        action \"write\";\n\
        action edit, delete in [\"write\"] appliesTo { principal: User, resource: Document };";
    let (schema, _) = Schema::from_cedarschema_str(schema_text).expect("schema");
    let cases = [
        // Mentions an action outside its head's group in its condition.
        r#"@id("a") permit(principal, action == Action::"edit", resource) when { action == Action::"view" };"#,
        r#"@id("a") permit(principal, action == Action::"edit", resource) when { action in Action::"write" };"#,
        r#"@id("a") permit(principal, action in [Action::"write"], resource) when { resource.department == "x" };"#,
        r#"@id("a") permit(principal, action in [Action::"write"], resource) when { context.mfa };"#,
        r#"@id("a") permit(principal, action == Action::"view", resource) when { context has mfa && context.mfa };"#,
        r#"@id("a") permit(principal, action == Action::"view", resource) when { principal.level > 1 };"#,
        r#"@id("a") permit(principal, action in [Action::"view", Action::"delete"], resource) when { resource.owner == principal };"#,
        r#"@id("a") forbid(principal, action, resource) when { resource.nope };"#,
        r#"@id("a") permit(principal, action == Action::"write", resource);"#,
    ];
    let mut verdicts = std::collections::HashSet::new();
    for policy in cases {
        let full = Validator::new(schema.clone())
            .validate(
                &policy.parse::<PolicySet>().expect("parses"),
                ValidationMode::Strict,
            )
            .validation_passed();
        let ours = Engine::compile(
            &bundle(schema_text, policy, json!([])),
            CompileOptions::default(),
        )
        .is_ok();
        assert_eq!(ours, full, "{policy}");
        verdicts.insert(full);
    }
    assert_eq!(
        verdicts.len(),
        2,
        "the cases include valid and invalid policies"
    );
}
