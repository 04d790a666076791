//! The decision trail end to end, with the real binaries: records masked,
//! chained and delivered exactly once through control-plane outages and
//! sidecar crashes; tampering found by `arbiter log verify`; the spool cap's
//! overflow policies. Every load is bounded in requests and time.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arbiter::api::pb::v1::CheckRequest;
use common::{ControlPlane, Sidecar, TOKEN, eventually, example, example_request, run, s};
use serde_json::Value;

const REQUESTS: [&str; 6] = [
    "requests/allow-edit-department.json",
    "requests/step-up-delete.json",
    "requests/deny-edit-archived.json",
    "requests/approval-share-external.json",
    "requests/allow-view-own.json",
    "requests/deny-suspended-user.json",
];

fn requests() -> Vec<CheckRequest> {
    REQUESTS.iter().map(|r| example_request(r)).collect()
}

/// The example bundle plus masking rules: entity properties are erased and
/// the subject id is hashed, so `"department"` and `"engineering"` must
/// never reach a record. One more policy fails on document `doc-9`, whose
/// owner is not known, with a Cedar error that names the owner.
fn masked_bundle(work: &Path) -> PathBuf {
    let dir = work.join("bundle");
    let ok = std::process::Command::new("cp")
        .args(["-r", s(&example("documents")), s(&dir)])
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::write(
        dir.join("masking.json"),
        r#"{"erase": ["/subject/properties", "/resource/properties"], "hash": ["/subject/id"], "salt": "t"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("zz-errors.cedar"),
        r#"@id("owner-department")
forbid(principal, action == Action::"share", resource)
when { resource == Document::"doc-9" && resource.owner.department == "nowhere" };
"#,
    )
    .unwrap();
    dir
}

/// What `masked_bundle`'s rules keep out of every record, also as it
/// appears inside a JSON string (an error message quoting it).
const MASKED: [&str; 6] = [
    "\"department\"",
    "engineering",
    "\"alice\"",
    "\"bob\"",
    r#"\"alice\""#,
    r#"\"bob\""#,
];

/// A request `masked_bundle` fails closed on, with a Cedar error naming
/// the (masked) owner `bob`.
fn unknown_owner_request() -> CheckRequest {
    let mut r = example_request("requests/allow-share-internal.json");
    r.resource.as_mut().unwrap().id = "doc-9".into();
    r
}

fn spool_args<'a>(cp: &'a str, spool: &'a Path) -> Vec<&'a str> {
    vec!["--decision-log-to", cp, "--decision-log-spool", s(spool)]
}

/// What a load run saw: decision ids of answered calls and failures.
#[derive(Default)]
struct Seen {
    ids: Vec<String>,
    failures: usize,
}

/// Sends `total` checks over `conns` connections, or until `stop` is set.
/// `load` to the end: `total` calls, none stopped early.
async fn load_all(sidecar_grpc: String, total: usize, conns: usize) -> Seen {
    load(sidecar_grpc, total, conns, Arc::new(AtomicBool::new(false))).await
}

async fn load(sidecar_grpc: String, total: usize, conns: usize, stop: Arc<AtomicBool>) -> Seen {
    let per = total / conns;
    let mut tasks = Vec::new();
    for c in 0..conns {
        let addr = format!("http://{sidecar_grpc}");
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let Ok(channel) = tonic::transport::Endpoint::from_shared(addr)
                .unwrap()
                .timeout(Duration::from_secs(5))
                .connect()
                .await
            else {
                seen.failures += per;
                return seen;
            };
            let mut client =
                arbiter::api::pb::v1::authorizer_client::AuthorizerClient::new(channel);
            let reqs = requests();
            for i in 0..per {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match client.check(reqs[(i + c) % reqs.len()].clone()).await {
                    Ok(r) => seen.ids.push(r.into_inner().decision_id),
                    Err(_) => seen.failures += 1,
                }
            }
            seen
        }));
    }
    let mut all = Seen::default();
    for t in tasks {
        let seen = t.await.unwrap();
        all.ids.extend(seen.ids);
        all.failures += seen.failures;
    }
    all
}

/// A STEP_UP check carrying a W3C `traceparent`; its decision id.
async fn traced_check(
    client: &mut arbiter::api::pb::v1::authorizer_client::AuthorizerClient<
        tonic::transport::Channel,
    >,
) -> String {
    let mut traced = tonic::Request::new(example_request("requests/step-up-delete.json"));
    traced.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    client.check(traced).await.unwrap().into_inner().decision_id
}

/// How many records the control plane holds for its only instance (0 before
/// the first arrives): for waiting, where `report` would fail too early.
async fn stored_records(cp: &ControlPlane) -> Value {
    let v = cp.get_json("/decisions/verify").await;
    match v["instances"].as_array().map(Vec::as_slice) {
        Some([only]) => only["records"].clone(),
        _ => Value::from(0),
    }
}

/// The stored chain report of the only instance (or of `instance`).
async fn report(cp: &ControlPlane) -> Value {
    let v = cp.get_json("/decisions/verify").await;
    let list = v["instances"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    list[0].clone()
}

/// The control plane's export of `instance`'s chain.
async fn export(cp: &ControlPlane, instance: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}/decisions/export?instance={instance}", cp.1))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
}

/// `SEQ:HASH` of an export's record at `seq` (its line's hash).
fn stored_head_at(export: &str, seq: usize) -> String {
    let line: Value = serde_json::from_str(export.lines().nth(seq - 1).unwrap()).unwrap();
    assert_eq!(line["record"]["seq"], seq);
    format!("{seq}:{}", line["hash"].as_str().unwrap())
}

/// Decision ids in the stored chain, in order (from the export).
async fn stored_ids(cp: &ControlPlane, instance: &str) -> Vec<String> {
    let text = export(cp, instance).await.text().await.unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["record"]["decision_id"].as_str().unwrap_or("").to_owned()
        })
        .collect()
}

/// Every file under `dir`, concatenated.
fn bytes_under(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn cli(cp: &ControlPlane, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["log"];
    all.extend_from_slice(&args[..1]);
    all.extend_from_slice(&["--control-plane", &cp.1, "--token", TOKEN]);
    all.extend_from_slice(&args[1..]);
    run(&all)
}

#[tokio::test]
async fn records_are_masked_chained_explained_and_tamper_evident() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (spool, ndjson) = (w.join("spool"), w.join("decisions.ndjson"));
    // Publish the masked bundle so `log show` can print policy text.
    let bundle = masked_bundle(w);
    let (code, _, err) = run(&["bundle", "keygen", "--out", s(&w.join("k"))]);
    assert_eq!(code, 0, "{err}");
    let public = w.join("k.pub.pem");
    let archive = w.join("b.tar.gz");
    let (code, _, err) = run(&[
        "bundle",
        "build",
        s(&bundle),
        "-o",
        s(&archive),
        "--sign-key",
        s(&w.join("k.key.pem")),
    ]);
    assert_eq!(code, 0, "{err}");
    let db = w.join("cp.db");
    let cp = ControlPlane::start(&db, &public);
    let (code, _, err) = run(&[
        "bundle",
        "push",
        s(&archive),
        "--to",
        &cp.1,
        "--token",
        TOKEN,
    ]);
    assert_eq!(code, 0, "{err}");
    let cache = w.join("cache");
    let mut args = vec![
        "--control-plane",
        &cp.1,
        "--bundle-name",
        "documents",
        "--trusted-key",
        s(&public),
        "--bundle-cache",
        s(&cache),
        "--decision-log-file",
        s(&ndjson),
        "--decision-log-spool",
        s(&spool),
    ];
    let patient = patient_config(w);
    args.extend([
        "--decision-log-durability",
        "durable",
        "--config",
        s(&patient),
    ]);
    let sidecar = Sidecar::start(Path::new(""), &args);
    // Readiness, not a probing Check: every Check is a record counted below.
    eventually("the bundle is active", Duration::from_secs(20), || async {
        sidecar.get("/readyz").await.0 == 200
    })
    .await;

    // 60 decisions plus one with a trace id.
    let mut client = sidecar.client().await;
    let step_up_id = traced_check(&mut client).await;
    // A decision that fails closed on a Cedar error quoting masked values.
    let failed = client
        .check(unknown_owner_request())
        .await
        .unwrap()
        .into_inner();
    assert!(
        failed.errors[0].contains(r#"`User::"bob"` does not exist"#),
        "{failed:?}"
    );
    let seen = load_all(sidecar.grpc_addr.clone(), 60, 2).await;
    assert_eq!((seen.ids.len(), seen.failures), (60, 0));
    let total = seen.ids.len() + 2;
    eventually(
        "every record is stored",
        Duration::from_secs(20),
        || async { stored_records(&cp).await == total },
    )
    .await;
    let r = report(&cp).await;
    assert!(r["first_break"].is_null(), "{r}");
    assert_eq!(r["last_seq"], total);
    let instance = r["instance"].as_str().unwrap().to_owned();
    let ids: HashSet<String> = stored_ids(&cp, &instance).await.into_iter().collect();
    assert_eq!(ids.len(), total, "each decision stored once");
    assert!(seen.ids.iter().all(|id| ids.contains(id)));

    // Masked fields are in no byte the sidecar wrote or the store holds.
    let stored = [
        bytes_under(&spool),
        std::fs::read(&ndjson).unwrap(),
        bytes_under(w), // cp.db and its WAL
    ]
    .concat();
    for secret in MASKED {
        assert!(!contains(&stored, secret), "{secret} leaked into a record");
    }
    // The failed decision's record keeps what failed, not the values.
    let (code, out, err) = cli(&cp, &["show", &failed.decision_id]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("error while evaluating policy `owner-department`: an entity it refers to does not exist (details withheld"),
        "{out}"
    );

    // log show: the whole record, with its deciding policies' text.
    let (code, out, err) = cli(&cp, &["show", &step_up_id]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "STEP_UP",
        "delete-needs-recent-mfa",
        "forbid",
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "sha256:",
        "acr_values",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
    // log query filters.
    let (code, out, err) = cli(&cp, &["query", "--outcome", "STEP_UP", "--limit", "1000"]);
    assert_eq!(code, 0, "{err}");
    let expected = 1 + seen.ids.len() / REQUESTS.len();
    assert_eq!(out.lines().count(), expected, "{out}");
    assert!(out.lines().all(|l| l.contains("STEP_UP")));
    let (_, out, _) = cli(&cp, &["query", "--policy", "suspended-users"]);
    assert!(
        !out.is_empty() && out.lines().all(|l| l.contains("suspended-users")),
        "{out}"
    );
    let (_, out, _) = cli(&cp, &["query", "--since", "2999-01-01T00:00:00Z"]);
    assert!(out.is_empty());
    let (code, _, err) = cli(&cp, &["query", "--since", "yesterday"]);
    assert_ne!(code, 0);
    assert!(err.contains("RFC 3339"), "{err}");

    // log verify: intact on the control plane and in an export.
    let (code, out, err) = cli(&cp, &["verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("chain intact"), "{out}");
    let exported = export(&cp, &instance).await.text().await.unwrap();
    let file = w.join("export.ndjson");
    std::fs::write(&file, &exported).unwrap();
    // An instance with no records: an empty export, whole (not cut short).
    let empty = export(&cp, "nobody").await;
    assert_eq!(empty.status(), 200);
    assert_eq!(empty.text().await.expect("a whole body"), "");
    let (code, _, err) = run(&["log", "verify", "--file", s(&file)]);
    assert_eq!(code, 0, "{err}");
    // The local NDJSON copy verifies too.
    let (code, _, err) = run(&["log", "verify", "--file", s(&ndjson)]);
    assert_eq!(code, 0, "{err}");

    // Records cut from an export's end leave an intact chain: the head
    // `log verify` printed, kept apart, shows them.
    let head = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("head "))
        .unwrap_or_else(|| panic!("no head in {out}"))
        .to_owned();
    assert!(head.starts_with(&format!("{total}:")), "{head}");
    let (code, out, err) = run(&["log", "verify", "--file", s(&file), "--head", &head]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("reaches the head at seq {total}")),
        "{out}"
    );
    let cut: Vec<&str> = exported.lines().take(total - 2).collect();
    let cut_file = w.join("cut.ndjson");
    std::fs::write(&cut_file, cut.join("\n")).unwrap();
    let (code, _, err) = run(&["log", "verify", "--file", s(&cut_file)]);
    assert_eq!(code, 0, "without the head a cut export looks whole: {err}");
    let (code, _, err) = run(&["log", "verify", "--file", s(&cut_file), "--head", &head]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("seq {}", total - 1)) && err.contains("cut short"),
        "{err}"
    );
    // An earlier head still holds (the chain went on), a forged one does not.
    let earlier = stored_head_at(&exported, 5);
    let (code, out, err) = run(&["log", "verify", "--file", s(&cut_file), "--head", &earlier]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("records after it"), "{out}");
    let forged = format!("5:{}", "ab".repeat(32));
    let (code, _, err) = run(&["log", "verify", "--file", s(&file), "--head", &forged]);
    assert_eq!(code, 1);
    assert!(
        err.contains("seq 5") && err.contains("not the one"),
        "{err}"
    );
    let (code, _, err) = run(&["log", "verify", "--file", s(&file), "--head", "5"]);
    assert_eq!(code, 64);
    assert!(err.contains("SEQ:HASH"), "{err}");
    // A head is checked against a file only, not against the control plane.
    let (code, _, err) = cli(&cp, &["verify", "--head", &head]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--file"), "{err}");

    // An edited line and a deleted line in a file are named.
    let mut lines: Vec<String> = exported.lines().map(str::to_owned).collect();
    lines[6] = lines[6].replacen("\"kind\":\"check\"", "\"kind\":\"chek\"", 1);
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (code, _, err) = run(&["log", "verify", "--file", s(&file)]);
    assert_eq!(code, 1);
    assert!(
        err.contains("seq 7") && err.contains("does not match"),
        "{err}"
    );
    let mut lines: Vec<String> = exported.lines().map(str::to_owned).collect();
    lines.remove(11);
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (code, _, err) = run(&["log", "verify", "--file", s(&file)]);
    assert_eq!(code, 1);
    assert!(err.contains("seq 12") && err.contains("missing"), "{err}");

    // The newest record deleted from the store: no gap is left to walk
    // into, the head kept on receipt names it.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(&format!("DELETE FROM decisions WHERE seq = {total}"), [])
        .unwrap();
    let (code, _, err) = cli(&cp, &["verify"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("first break at seq {total}:")) && err.contains("missing"),
        "{err}"
    );

    // An edited and a deleted record in the store are named.
    conn.execute(
        "UPDATE decisions SET body = replace(body, '\"outcome\":\"DENY\"', '\"outcome\":\"ALLOW\"') WHERE seq = (SELECT MIN(seq) FROM decisions WHERE outcome = 'DENY')",
        [],
    )
    .unwrap();
    let edited: i64 = conn
        .query_row(
            "SELECT MIN(seq) FROM decisions WHERE outcome = 'DENY'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    conn.execute("DELETE FROM decisions WHERE seq = 40", [])
        .unwrap();
    drop(conn);
    let (code, _, err) = cli(&cp, &["verify"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("first break at seq {edited}:")),
        "{err}"
    );
    let (code, _, err) = cli(&cp, &["verify", "--instance", &instance]);
    assert_eq!(code, 1, "{err}");

    // Every record deleted: a break at seq 1, not an empty store.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("DELETE FROM decisions", []).unwrap();
    drop(conn);
    let (code, _, err) = cli(&cp, &["verify", "--instance", &instance]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("first break at seq 1:"), "{err}");
}

#[tokio::test]
async fn a_control_plane_outage_under_load_loses_and_repeats_nothing() {
    let (work, public) = work_with_key();
    let w = work.path();
    let db = w.join("cp.db");
    let cp = ControlPlane::start(&db, &public);
    let addr = cp.addr().to_owned();
    let spool = w.join("spool");
    let mut args = spool_args(&cp.1, &spool);
    let small_segments = config_file(w, "[decision_log]\nsegment_bytes = 16384\n");
    args.extend(["--config", s(&small_segments)]);
    let sidecar = Sidecar::start(&example("documents"), &args);

    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(sidecar.grpc_addr.clone(), 200_000, 4, stop.clone()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(cp); // SIGKILL: in-flight batches are never acknowledged
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cp = ControlPlane::start_with(&db, &public, &["--addr", &addr]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("load finishes")
        .unwrap();
    assert_eq!(seen.failures, 0, "no decision failed during the outage");
    let total = seen.ids.len();
    eprintln!("{total} decisions across the outage");
    assert!(total > 500, "the load ran through the outage");
    eventually("every record arrives", Duration::from_secs(30), || async {
        stored_records(&cp).await == total
    })
    .await;
    let r = report(&cp).await;
    assert!(r["first_break"].is_null(), "{r}");
    assert_eq!(r["flagged_on_receipt"], serde_json::json!([]));
    let stored = stored_ids(&cp, r["instance"].as_str().unwrap()).await;
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!((stored.len(), unique.len()), (total, total), "exactly once");
    // Enough to make the export stream in several chunks (64 KiB each).
    assert!(total > 150, "only {total} decisions under load");
    assert!(seen.ids.iter().all(|id| unique.contains(id)));
    let (_, metrics) = sidecar.get("/metrics").await;
    assert!(
        metrics.contains("arbiter_decision_log_dropped_records_total 0"),
        "{metrics}"
    );
    // The live spool verifies, and so does each of its segments on its own,
    // though segments have been written over (older bytes are not a break).
    let (code, out, err) = run(&["log", "verify", "--file", s(&spool)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("chain intact"), "{out}");
    // It holds the newest records: it reaches the head the control plane
    // reports.
    let (code, out, err) = cli(&cp, &["verify"]);
    assert_eq!(code, 0, "{err}");
    let head = out.lines().find_map(|l| l.trim().strip_prefix("head "));
    let head = head
        .unwrap_or_else(|| panic!("no head in {out}"))
        .to_owned();
    let (code, out, err) = run(&["log", "verify", "--file", s(&spool), "--head", &head]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("reaches the head at seq {total}")),
        "{out}"
    );
    for (_, segment) in arbiter::decision_log::spool::segments(&spool).unwrap() {
        let (code, out, err) = run(&["log", "verify", "--file", s(&segment)]);
        assert_eq!(code, 0, "{}: {out}{err}", segment.display());
    }
    // A directory that is no spool is an error, not an intact chain.
    let (code, out, err) = run(&["log", "verify", "--file", s(w)]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("holds no spool segments"), "{err}");
}

#[tokio::test]
async fn after_sigkill_the_spool_is_resent_and_durable_answers_are_all_stored() {
    let (work, public) = work_with_key();
    let w = work.path();
    let cp = ControlPlane::start(&w.join("cp.db"), &public);
    let spool = w.join("spool");
    let patient = patient_config(w);
    let mut args = spool_args(&cp.1, &spool);
    args.extend([
        "--decision-log-durability",
        "durable",
        "--config",
        s(&patient),
    ]);

    // Kill the sidecar mid-load; keep the ids of every answer received.
    let mut sidecar = Sidecar::start(&example("documents"), &args);
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(sidecar.grpc_addr.clone(), 100_000, 4, stop.clone()));
    // Mid-load by what has been spooled, not by a fixed sleep (slow disks).
    eventually(
        "a hundred records spooled",
        Duration::from_secs(30),
        || async {
            let (_, text) = sidecar.get("/metrics").await;
            metric(&text, "arbiter_decision_log_spooled_records_total") >= 100.0
        },
    )
    .await;
    sidecar.child.kill().unwrap(); // SIGKILL
    sidecar.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("load stops")
        .unwrap();
    assert!(seen.ids.len() > 50, "the load ran: {}", seen.ids.len());
    eprintln!("{} decisions answered before SIGKILL", seen.ids.len());

    // The restarted sidecar continues the same chain and resends the rest.
    let sidecar = Sidecar::start(&example("documents"), &args);
    let after = load_all(sidecar.grpc_addr.clone(), 20, 1).await;
    assert_eq!(after.failures, 0);
    let want: HashSet<String> = seen.ids.iter().chain(&after.ids).cloned().collect();
    eventually("the first records", Duration::from_secs(30), || async {
        stored_records(&cp).await != 0
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let r = report(&cp).await;
        let stored = stored_ids(&cp, r["instance"].as_str().unwrap()).await;
        let have: HashSet<&String> = stored.iter().collect();
        if want.iter().all(|id| have.contains(id)) {
            break stored;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "answered decisions missing from the store: {} of {}",
            want.iter().filter(|id| !have.contains(id)).count(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let r = report(&cp).await;
    assert!(
        r["first_break"].is_null(),
        "chain verifies across the restart: {r}"
    );
    assert_eq!(
        r["records"], r["last_seq"],
        "no seq stored twice or skipped"
    );
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "exactly once");
}

/// A work directory holding a signing key pair (`k`, `k.pub.pem`); the
/// public key's path.
fn work_with_key() -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&["bundle", "keygen", "--out", s(&work.path().join("k"))]);
    assert_eq!(code, 0, "{err}");
    let public = work.path().join("k.pub.pem");
    (work, public)
}

fn config_file(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("arbiter.toml");
    std::fs::write(&p, body).unwrap();
    p
}

/// Durable-mode waits long enough for a loaded CI disk: these tests count
/// records, and a decision refused after the default 250 ms still leaves one.
/// Segments of 16 KiB (about 30 records), so that acknowledged segments are
/// released and written over while the tests run.
fn patient_config(dir: &Path) -> PathBuf {
    config_file(
        dir,
        "[decision_log]\nblock_timeout_ms = 10000\nsegment_bytes = 16384\n",
    )
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn at_the_spool_cap_drop_keeps_deciding_and_marks_the_loss() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let spool = w.join("spool");
    // Nothing listens on port 9: records pile up in the spool.
    let config = config_file(
        w,
        &format!(
            "[decision_log]\nship_to = \"http://127.0.0.1:9\"\nspool_dir = \"{}\"\nmax_spool_bytes = 16384\nsegment_bytes = 4096\noverflow = \"drop\"\nbatch_max_records = 16\n",
            s(&spool)
        ),
    );
    let sidecar = Sidecar::start(
        &example("documents"),
        &["--config", s(&config), "--decision-log-spool", s(&spool)],
    );
    let seen = load_all(sidecar.grpc_addr.clone(), 200, 1).await;
    assert_eq!(
        (seen.ids.len(), seen.failures),
        (200, 0),
        "drop keeps deciding"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = sidecar.get("/metrics").await.1;
        if metric(&m, "arbiter_decision_log_dropped_records_total") > 0.0 {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no loss counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The cap is checked before each write: at most one batch (16 records here) over it.
    assert!(metric(&metrics, "arbiter_decision_log_spool_bytes") < 16384.0 + 16.0 * 1500.0);
    // The loss itself is a record in the chain.
    eventually(
        "a dropped marker is spooled",
        Duration::from_secs(10),
        || async {
            load_all(sidecar.grpc_addr.clone(), 1, 1).await;
            contains(&bytes_under(&spool), "\"kind\":\"dropped\"")
        },
    )
    .await;
    assert_eq!(
        metric(&metrics, "arbiter_decision_log_refused_decisions_total"),
        0.0
    );
}

#[tokio::test]
async fn at_the_spool_cap_block_refuses_what_it_cannot_record() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let spool = w.join("spool");
    let config = config_file(
        w,
        &format!(
            "[decision_log]\nship_to = \"http://127.0.0.1:9\"\nspool_dir = \"{}\"\nmax_spool_bytes = 16384\nsegment_bytes = 4096\nblock_timeout_ms = 50\nqueue_capacity = 4\n",
            s(&spool)
        ),
    );
    let sidecar = Sidecar::start(
        &example("documents"),
        &["--config", s(&config), "--decision-log-spool", s(&spool)],
    );
    let mut client = sidecar.client().await;
    let req = example_request("requests/allow-edit-department.json");
    let mut refused = None;
    for _ in 0..400 {
        if let Err(status) = client.check(req.clone()).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("a decision is refused once the spool is full");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("could not be recorded"),
        "{status:?}"
    );
    let (_, metrics) = sidecar.get("/metrics").await;
    assert!(metric(&metrics, "arbiter_decision_log_refused_decisions_total") >= 1.0);
    assert_eq!(
        metric(&metrics, "arbiter_decision_log_dropped_records_total"),
        0.0
    );
}

/// A fake OpenTelemetry collector: keeps the encoded bytes of every export.
mod collector {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };
    use prost::Message;

    #[derive(Clone, Default)]
    pub struct Seen {
        pub logs: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
        pub traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
        pub bytes: Arc<Mutex<Vec<u8>>>,
    }

    #[tonic::async_trait]
    impl LogsService for Seen {
        async fn export(
            &self,
            r: tonic::Request<ExportLogsServiceRequest>,
        ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
            let r = r.into_inner();
            self.bytes.lock().unwrap().extend(r.encode_to_vec());
            self.logs.lock().unwrap().push(r);
            Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl TraceService for Seen {
        async fn export(
            &self,
            r: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let r = r.into_inner();
            self.bytes.lock().unwrap().extend(r.encode_to_vec());
            self.traces.lock().unwrap().push(r);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Serves on an ephemeral loopback port; returns its URL.
    pub async fn start(seen: Seen) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LogsServiceServer::new(seen.clone()))
                .add_service(TraceServiceServer::new(seen))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }
}

#[tokio::test]
async fn otlp_export_carries_masked_records_and_joins_the_callers_trace() {
    let work = tempfile::tempdir().unwrap();
    let bundle = masked_bundle(work.path());
    let seen = collector::Seen::default();
    let url = collector::start(seen.clone()).await;
    let sidecar = Sidecar::start(&bundle, &["--decision-log-otlp", &url]);

    let mut client = sidecar.client().await;
    let id = traced_check(&mut client).await;
    let failed = client.check(unknown_owner_request()).await.unwrap();
    assert!(!failed.into_inner().errors.is_empty());
    let more = load_all(sidecar.grpc_addr.clone(), 10, 1).await;
    assert_eq!(more.failures, 0);

    // Logs are exported before the batch's spans: wait for both.
    eventually(
        "12 records and a span are exported",
        Duration::from_secs(20),
        || async {
            let logs = seen.logs.lock().unwrap();
            let records: usize = logs
                .iter()
                .flat_map(|r| &r.resource_logs)
                .flat_map(|r| &r.scope_logs)
                .map(|s| s.log_records.len())
                .sum();
            records == 12 && !seen.traces.lock().unwrap().is_empty()
        },
    )
    .await;
    let bytes = seen.bytes.lock().unwrap().clone();
    assert!(
        contains(&bytes, &id),
        "the record of the traced call is exported"
    );
    for secret in MASKED {
        assert!(
            !contains(&bytes, secret),
            "{secret} leaked into the OTLP export"
        );
    }
    let traces = seen.traces.lock().unwrap();
    let spans: Vec<_> = traces
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .collect();
    assert_eq!(spans.len(), 1, "one span: only the traced call");
    assert_eq!(
        spans[0].trace_id,
        [
            0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
            0x47, 0x36
        ]
    );
    assert_eq!(
        spans[0].parent_span_id,
        [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
    );
    assert_eq!(spans[0].name, "arbiter.decide");
    assert!(spans[0].end_time_unix_nano >= spans[0].start_time_unix_nano);
}

#[tokio::test]
async fn sigterm_delivers_every_record_before_exit() {
    let (work, public) = work_with_key();
    let w = work.path();
    let cp = ControlPlane::start(&w.join("cp.db"), &public);
    let spool = w.join("spool");
    // The drain gets longer than its 3 s default: CI disks and cores are slow.
    let config = config_file(w, "[decision_log]\ndrain_ms = 15000\n");
    let mut args = spool_args(&cp.1, &spool);
    args.extend(["--config", s(&config)]);
    let mut sidecar = Sidecar::start(&example("documents"), &args);
    let seen = load_all(sidecar.grpc_addr.clone(), 300, 3).await;
    assert_eq!((seen.ids.len(), seen.failures), (300, 0));
    // At once: most of these records are still queued or in the spool.
    let status = sidecar.terminate();
    assert!(status.success(), "clean exit: {status:?}");
    let r = report(&cp).await;
    assert_eq!(r["records"], 300, "shipped before exit: {r}");
    assert!(r["first_break"].is_null(), "{r}");
}

/// A disk that stops answering (here: the NDJSON copy goes to a pipe nobody
/// reads) holds the writer at shutdown; the sidecar still exits, after the
/// grace period, instead of hanging until it is killed.
#[cfg(unix)]
#[tokio::test]
async fn sigterm_with_a_stuck_disk_exits_after_the_grace_period() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let fifo = w.join("copy.pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    // Opened here for reading too, so the sidecar's open does not wait for
    // a reader; never read.
    let _pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let config = config_file(
        w,
        "[server]\nshutdown_grace_secs = 1\n[decision_log]\ndrain_ms = 500\n",
    );
    let spool = w.join("spool");
    let mut args = spool_args("http://127.0.0.1:9", &spool);
    args.extend(["--decision-log-file", s(&fifo), "--config", s(&config)]);
    let mut sidecar = Sidecar::start(&example("documents"), &args);
    // Well over the pipe's 64 KiB of records.
    let seen = load_all(sidecar.grpc_addr.clone(), 300, 1).await;
    assert_eq!(seen.failures, 0);
    // The disk is stuck indeed: not everything could be spooled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, text) = sidecar.get("/metrics").await;
    let spooled = metric(&text, "arbiter_decision_log_spooled_records_total");
    assert!((0.0..300.0).contains(&spooled), "{spooled} spooled");
    let started = std::time::Instant::now();
    let status = sidecar.terminate(); // panics if it does not exit within 20 s
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A control plane from before LZ4 batches: it never sets `accepts_lz4`
/// and reads only `lines_deflate` (the build it stands for refused anything
/// else). It records, per batch, whether the batch was readable DEFLATE.
struct OlderControlPlane {
    batches: Arc<std::sync::Mutex<Vec<bool>>>,
}

#[tonic::async_trait]
impl arbiter::api::pb::v1::decision_log_server::DecisionLog for OlderControlPlane {
    type ShipStream = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<Item = Result<arbiter::api::pb::v1::ShipAck, tonic::Status>>
                + Send,
        >,
    >;

    async fn ship(
        &self,
        request: tonic::Request<tonic::Streaming<arbiter::api::pb::v1::RecordBatch>>,
    ) -> Result<tonic::Response<Self::ShipStream>, tonic::Status> {
        use std::io::Read;
        let mut inbound = request.into_inner();
        let batches = self.batches.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut acked = 0;
            while let Ok(Some(batch)) = inbound.message().await {
                if batch.count > 0 {
                    let mut text = String::new();
                    let readable = batch.lines_lz4.is_empty()
                        && flate2::read::DeflateDecoder::new(&batch.lines_deflate[..])
                            .read_to_string(&mut text)
                            .is_ok()
                        && text.lines().count() == batch.count as usize;
                    batches.lock().unwrap().push(readable);
                    if !readable {
                        let _ = tx
                            .send(Err(tonic::Status::invalid_argument("no lines")))
                            .await;
                        return;
                    }
                    acked = batch.first_seq + u64::from(batch.count) - 1;
                }
                let ack = arbiter::api::pb::v1::ShipAck {
                    acked_seq: acked,
                    ..Default::default()
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[tokio::test]
async fn a_control_plane_from_before_lz4_gets_deflate_batches() {
    let work = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let batches = Arc::new(std::sync::Mutex::new(Vec::new()));
    let older = OlderControlPlane {
        batches: batches.clone(),
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(arbiter::api::pb::v1::decision_log_server::DecisionLogServer::new(older))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let spool = work.path().join("spool");
    let mut sidecar = Sidecar::start(&example("documents"), &spool_args(&url, &spool));
    let seen = load_all(sidecar.grpc_addr.clone(), 200, 2).await;
    assert_eq!((seen.ids.len(), seen.failures), (200, 0));
    let acked = || {
        let b = batches.lock().unwrap();
        (b.len(), b.iter().all(|readable| *readable))
    };
    eventually(
        "every record shipped to the older control plane",
        Duration::from_secs(10),
        || async {
            let (metrics_code, text) = sidecar.get("/metrics").await;
            metrics_code == 200
                && metric(&text, "arbiter_decision_log_acknowledged_records_total") >= 200.0
        },
    )
    .await;
    let (count, all_deflate) = acked();
    assert!(
        count > 0 && all_deflate,
        "{count} batches, all DEFLATE: {all_deflate}"
    );
    assert!(sidecar.terminate().success());
    server.abort();
}

#[tokio::test]
async fn a_control_plane_with_retention_deletes_old_records_and_the_rest_verifies() {
    use arbiter::controlplane::trail::{DecisionStore, Incoming};
    use arbiter::decision_log::chain;
    let (work, public) = work_with_key();
    let w = work.path();
    let db = w.join("cp.db");
    // A chain of 6 records: 1..=3 from 2020, 4..=6 from now.
    let today =
        arbiter::decision_log::time::format_micros(arbiter::decision_log::time::now_micros());
    {
        let store = DecisionStore::open(&db).unwrap();
        let mut head = store.head("old-sidecar").unwrap();
        let mut prev = head.1;
        let bodies: Vec<(u64, chain::Hash, Vec<u8>)> = (1..=6u64)
            .map(|seq| {
                let time = if seq <= 3 { "2020-01-01T00:00:00Z" } else { today.as_str() };
                let body = format!(
                    r#"{{"v":1,"instance":"old-sidecar","seq":{seq},"kind":"check","time":"{time}","decision_id":"d{seq}","outcome":"ALLOW"}}"#
                );
                prev = chain::link(&prev, body.as_bytes());
                (seq, prev, body.into_bytes())
            })
            .collect();
        let incoming: Vec<Incoming> = bodies
            .iter()
            .map(|(seq, hash, body)| Incoming {
                seq: *seq,
                hash: *hash,
                body,
            })
            .collect();
        assert!(
            store
                .append("old-sidecar", &mut head, &incoming)
                .unwrap()
                .is_empty()
        );
    }
    let cp = ControlPlane::start_with(&db, &public, &["--retain-days", "30"]);
    eventually("old records to go", Duration::from_secs(20), || async {
        stored_records(&cp).await == 3
    })
    .await;
    let r = report(&cp).await;
    assert!(r["first_break"].is_null(), "what is left verifies: {r}");
    assert_eq!(r["last_seq"], 6);
    let show = |id: &str| {
        run(&[
            "log",
            "show",
            id,
            "--control-plane",
            &cp.1,
            "--token",
            TOKEN,
        ])
    };
    let (code, _, err) = show("d1");
    assert_ne!(code, 0, "an expired record is gone: {err}");
    let (code, out, err) = show("d4");
    assert_eq!(code, 0, "a young one is kept: {err}");
    assert!(out.contains("d4"), "{out}");
}

/// Files of a (flat) directory copied into a new one.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

/// Whether the control plane returns `id` as a record kept apart as forked.
async fn kept_as_forked(cp: &ControlPlane, id: &str) -> bool {
    let r = reqwest::Client::new()
        .get(format!("{}/decisions/{id}", cp.1))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let ok = r.status().is_success();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
    ok && v["forked"] == Value::Bool(true)
}

/// A spool that lost records it had shipped (here: an older copy of it
/// restored while the sidecar was stopped) numbers new records with stored
/// seqs. The fork is put on record, and nothing is lost: the records that
/// cannot join the chain are kept apart. Found at connect both when the
/// spool is behind the control plane's head and when, the control plane
/// being away, it has spooled past it (the record at the head then differs).
#[tokio::test]
async fn a_spool_that_lost_shipped_records_is_flagged_as_a_fork() {
    let (work, public) = work_with_key();
    let w = work.path();
    let cp = ControlPlane::start(&w.join("cp.db"), &public);
    let cp_url = cp.1.clone();
    let spool = w.join("spool");
    let mut args = spool_args(&cp_url, &spool);
    let small_segments = config_file(w, "[decision_log]\nsegment_bytes = 16384\n");
    args.extend(["--config", s(&small_segments)]);
    let once = |n: usize, grpc: String| load_all(grpc, n, 1);
    let mut sidecar = Sidecar::start(&example("documents"), &args);
    assert_eq!(once(20, sidecar.grpc_addr.clone()).await.failures, 0);
    eventually("20 records stored", Duration::from_secs(30), || async {
        stored_records(&cp).await == 20
    })
    .await;
    assert!(sidecar.terminate().success());
    // A copy of the spool as it was then: restored later, it has lost what
    // was shipped after it (as a backup restored, or `fsync = false` and a
    // power loss, would).
    let backup = w.join("spool-backup");
    copy_dir(&spool, &backup);

    let mut sidecar = Sidecar::start(&example("documents"), &args);
    // A second sidecar on the same spool would fork it while both run: it
    // is refused at start.
    let (status, err) = common::exit_and_stderr(
        std::process::Command::new(common::BIN)
            .arg("serve")
            .arg("--bundle")
            .arg(example("documents"))
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(&args),
        Duration::from_secs(20),
    );
    assert!(!status.success(), "a second writer started");
    assert!(err.contains("in use by another process"), "{err}");
    assert_eq!(once(200, sidecar.grpc_addr.clone()).await.failures, 0);
    eventually("220 records stored", Duration::from_secs(30), || async {
        stored_records(&cp).await == 220
    })
    .await;
    // A plain restart is no fork: only the new records were shipped.
    let (_, text) = sidecar.get("/metrics").await;
    assert_eq!(
        metric(&text, "arbiter_decision_log_shipped_records_total"),
        200.0
    );
    assert_eq!(
        report(&cp).await["flagged_on_receipt"],
        serde_json::json!([])
    );
    assert!(sidecar.terminate().success());
    std::fs::remove_dir_all(&spool).unwrap();
    copy_dir(&backup, &spool);

    // 100 new records numbered 21..=120: seqs the control plane holds.
    let sidecar = Sidecar::start(&example("documents"), &args);
    let again = once(100, sidecar.grpc_addr.clone()).await;
    assert_eq!(again.failures, 0);
    assert_eq!(again.ids.len(), 100);
    eventually("the fork on record", Duration::from_secs(30), || async {
        let r = report(&cp).await;
        r["flagged_on_receipt"].as_array().is_some_and(|b| {
            b.iter()
                .any(|b| b["reason"].as_str().unwrap_or("").contains("forked"))
        })
    })
    .await;
    // Nothing overwritten, nothing lost: the fork's records are kept apart,
    // and `log show` finds them.
    eventually(
        "the fork's records kept",
        Duration::from_secs(30),
        || async {
            for id in &again.ids {
                if !kept_as_forked(&cp, id).await {
                    return false;
                }
            }
            true
        },
    )
    .await;
    assert_eq!(stored_records(&cp).await, 220, "nothing overwritten");
    let (code, out, err) = cli(&cp, &["show", &again.ids[0]]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("FORKED"), "{out}");
    // `log query` finds them as well, marked, and `log verify` counts them
    // beside a stored chain that is intact.
    let (code, out, err) = cli(&cp, &["query", "--forked", "--limit", "1000"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 100, "{out}");
    assert!(out.lines().all(|l| l.contains("FORKED")), "{out}");
    assert!(again.ids.iter().all(|id| out.contains(id.as_str())));
    let (code, out, _) = cli(&cp, &["query", "--limit", "1000"]);
    assert_eq!((code, out.lines().count()), (0, 320), "{out}");
    // JSON lines are records with nowhere to mark one kept apart: the
    // chain's, unless `--forked` asks for those.
    let json = |extra: &[&str]| {
        let mut args = vec!["query", "--json", "--limit", "1000"];
        args.extend(extra);
        let (code, out, err) = cli(&cp, &args);
        assert_eq!(code, 0, "{err}");
        out.lines().count()
    };
    assert_eq!((json(&[]), json(&["--forked"])), (220, 100));
    let (code, out, err) = cli(&cp, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("100 records kept apart as forked"), "{out}");
    // Kept is as good as stored: the spool lets go of those segments,
    // though the control plane's head stays above their seqs.
    eventually("the spool released", Duration::from_secs(30), || async {
        let (_, text) = sidecar.get("/metrics").await;
        let bytes = metric(&text, "arbiter_decision_log_spool_bytes");
        (0.0..=32768.0).contains(&bytes)
    })
    .await;
    eventually("the sidecar counts it", Duration::from_secs(10), || async {
        let (_, text) = sidecar.get("/metrics").await;
        metric(&text, "arbiter_decision_log_chain_breaks_total") >= 1.0
    })
    .await;

    // Again from the copy, the control plane away meanwhile: 250 records
    // (21..=270) take the spool past its head (220) before it connects.
    let mut sidecar = sidecar;
    assert!(sidecar.terminate().success());
    std::fs::remove_dir_all(&spool).unwrap();
    copy_dir(&backup, &spool);
    let addr = cp.addr().to_owned();
    drop(cp);
    let sidecar = Sidecar::start(&example("documents"), &args);
    let later = once(250, sidecar.grpc_addr.clone()).await;
    assert_eq!((later.failures, later.ids.len()), (0, 250));
    eventually("all spooled", Duration::from_secs(30), || async {
        let (_, text) = sidecar.get("/metrics").await;
        metric(&text, "arbiter_decision_log_spooled_records_total") >= 250.0
    })
    .await;
    // Each batch's write is timed: at least one, at most one per record.
    let (_, text) = sidecar.get("/metrics").await;
    let writes = metric(&text, "arbiter_decision_log_spool_write_seconds_count");
    assert!((1.0..=250.0).contains(&writes), "{writes} spool writes");
    assert!(metric(&text, "arbiter_decision_log_spool_write_seconds_sum") > 0.0);
    let cp = ControlPlane::start_with(&w.join("cp.db"), &public, &["--addr", &addr]);
    eventually(
        "the overlap kept apart",
        Duration::from_secs(30),
        || async {
            for id in &later.ids[..200] {
                if !kept_as_forked(&cp, id).await {
                    return false;
                }
            }
            true
        },
    )
    .await;
    // The rest joined the chain after the stored head.
    eventually("the rest stored", Duration::from_secs(30), || async {
        stored_records(&cp).await == 270
    })
    .await;
    let (code, out, err) = cli(&cp, &["query", "--forked", "--limit", "1000"]);
    assert_eq!((code, out.lines().count()), (0, 300), "{err}");
    // The fork's records past the stored head joined the chain, which
    // breaks where they did: their predecessor is the fork's, not the
    // stored one.
    let (code, out, err) = cli(&cp, &["verify"]);
    assert_eq!(code, 1, "{out}{err}");
    let said = format!("{out}{err}");
    assert!(said.contains("first break at seq 221"), "{said}");
    assert!(said.contains("300 records kept apart as forked"), "{said}");
}

/// Ten decisions spooled in `spool` by a sidecar with nowhere to ship
/// them, stopped; the segment that holds them.
async fn ten_unshipped_records(spool: &Path) -> PathBuf {
    let nowhere = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut sidecar = Sidecar::start(&example("documents"), &spool_args(&nowhere, spool));
    assert_eq!(load_all(sidecar.grpc_addr.clone(), 10, 1).await.failures, 0);
    sidecar.terminate();
    std::fs::read_dir(spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(b"{\"hash\""))
        .expect("a segment")
}

/// Damage that changed one spooled record's own seq: the record is shipped
/// where it stands, as evidence, and every other record joins the chain.
/// (Taken at its damaged seq, it would have moved the stored head far
/// ahead, skipped the records up to it, and set every later record apart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_seq_was_damaged_in_the_spool_is_kept_in_its_place() {
    let (work, public) = work_with_key();
    let w = work.path();
    let spool = w.join("spool");
    let segment = ten_unshipped_records(&spool).await;
    let text = String::from_utf8(std::fs::read(&segment).unwrap()).unwrap();
    assert!(text.contains(r#""seq":3,"#));
    std::fs::write(
        &segment,
        text.replacen(r#""seq":3,"#, r#""seq":900000,"#, 1),
    )
    .unwrap();

    let cp = ControlPlane::start(&w.join("cp.db"), &public);
    let _sidecar = Sidecar::start(&example("documents"), &spool_args(&cp.1, &spool));
    eventually("all ten stored", Duration::from_secs(30), || async {
        stored_records(&cp).await == 10
    })
    .await;
    let r = report(&cp).await;
    assert_eq!(r["last_seq"], 10, "{r}");
    let flagged: Vec<u64> = r["flagged_on_receipt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(flagged, [3], "{r}");
    let (code, out, err) = cli(&cp, &["query", "--forked", "--limit", "100"]);
    assert_eq!(
        (code, out.lines().count()),
        (0, 0),
        "nothing set apart: {out}{err}"
    );
}

/// Damage in one spool segment that merged two records into one line and
/// split a later one in two: a chunk's line count comes out right at its
/// end, so the sidecar's quick check ships it and the control plane refuses
/// the misnumbered batch. The sidecar then reads line by line: every intact
/// record arrives at its own seq, the gaps are flagged, and shipping goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_that_merged_and_split_records_is_shipped_around() {
    let (work, public) = work_with_key();
    let w = work.path();
    let spool = w.join("spool");
    let segment = ten_unshipped_records(&spool).await;
    let mut text = std::fs::read(&segment).unwrap();
    let breaks: Vec<usize> = text
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    assert_eq!(breaks.len(), 10);
    text[breaks[2]] = b' '; // records 3 and 4 on one line
    text[breaks[5] + 20] = b'\n'; // record 7 in two lines
    std::fs::write(&segment, &text).unwrap();

    let cp = ControlPlane::start(&w.join("cp.db"), &public);
    let _sidecar = Sidecar::start(&example("documents"), &spool_args(&cp.1, &spool));
    eventually(
        "the intact records stored",
        Duration::from_secs(30),
        || async { stored_records(&cp).await == 7 },
    )
    .await;
    let r = report(&cp).await;
    assert_eq!(r["last_seq"], 10, "{r}");
    let flagged: Vec<u64> = r["flagged_on_receipt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(flagged, [3, 7], "{r}");
}
