//! Benchmark scenarios: the peer scenario (`examples/peer-bench`), and two
//! generated 1,000-policy bundles that test the policy index.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

/// The peer scenario's four policies, shared by the generated bundles so a
/// decision there is the same decision plus 1,000 policies that cannot apply.
pub const PEER_POLICIES: &str = include_str!("../../examples/peer-bench/policies.cedar");

/// The measured request: alice (editor, engineering) edits doc-1.
pub fn peer_request() -> Value {
    json!({
        "subject": {"type": "User", "id": "alice",
                    "properties": {"department": "engineering", "roles": ["editor"]}},
        "action": {"name": "edit"},
        "resource": {"type": "Document", "id": "doc-1",
                     "properties": {"owner": {"type": "User", "id": "bob"},
                                    "department": "engineering", "status": "draft"}},
        "context": {}
    })
}

/// `n` distinct requests of the same shape and outcome (ids vary), so a run
/// with the cache off measures decisions, not cache hits.
pub fn request_mix(base: &Value, n: usize, tenant: Option<&str>) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut r = base.clone();
            r["subject"]["id"] = json!(format!("user-{i}"));
            r["resource"]["id"] = json!(format!("doc-{i}"));
            if let Some(t) = tenant {
                r["resource"]["properties"]["tenant"] = json!(t);
            }
            r
        })
        .collect()
}

fn write_bundle(dir: &Path, name: &str, schema: &str, policies: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("manifest.json"),
        json!({"name": name, "revision": "generated-1"}).to_string(),
    )?;
    std::fs::write(dir.join("schema.cedarschema"), schema)?;
    std::fs::write(dir.join("policies.cedar"), policies)
}

/// 1,000 policies spread over 50 resource types × 20 actions, beside the
/// peer policies. Only the peer policies share the measured request's scope.
pub fn write_scope_bundle(dir: &Path) -> std::io::Result<()> {
    let mut schema = String::from(
        "entity User = { department: String, roles: Set<String> };\n\
         entity Document = { owner: User, department: String, status: String };\n\
         action view, edit, delete appliesTo { principal: User, resource: Document };\n",
    );
    let types: Vec<String> = (0..50).map(|t| format!("Res{t}")).collect();
    for t in &types {
        let _ = writeln!(
            schema,
            "entity {t} = {{ owner: User, department: String, status: String }};"
        );
    }
    let _ = writeln!(
        schema,
        "action {} appliesTo {{ principal: User, resource: [{}] }};",
        (0..20)
            .map(|a| format!("op{a}"))
            .collect::<Vec<_>>()
            .join(", "),
        types.join(", ")
    );
    let mut policies = String::from(PEER_POLICIES);
    for t in &types {
        for a in 0..20 {
            let _ = writeln!(
                policies,
                "@id(\"{t}-op{a}\")\npermit (principal, action == Action::\"op{a}\", resource is {t})\n\
                 when {{ principal.roles.contains(\"editor\") && resource.department == principal.department && resource.status != \"archived\" }};"
            );
        }
    }
    write_bundle(dir, "generated-scope-1000", &schema, &policies)
}

/// 1,000 per-tenant policies sharing the measured request's scope, each
/// starting with `resource.tenant == "tN"`, beside the peer policies.
pub fn write_tenant_bundle(dir: &Path) -> std::io::Result<()> {
    let schema = "entity User = { department: String, roles: Set<String> };\n\
         entity Document = { owner: User, department: String, status: String, tenant: String };\n\
         action view, edit, delete appliesTo { principal: User, resource: Document };\n";
    let mut policies = String::from(PEER_POLICIES);
    for t in 0..1000 {
        let _ = writeln!(
            policies,
            "@id(\"tenant-t{t}\")\npermit (principal, action == Action::\"edit\", resource)\n\
             when {{ resource.tenant == \"t{t}\" && principal.roles.contains(\"editor\") && resource.department == principal.department }};"
        );
    }
    write_bundle(dir, "generated-tenant-1000", schema, &policies)
}
