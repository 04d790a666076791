//! The command line: `check` offline and against a sidecar, and refusals to
//! start on bad bundles and bad configuration.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Sidecar, example, run};

fn path(p: &str) -> String {
    example(p).display().to_string()
}

#[test]
fn check_offline_prints_outcome_and_policies() {
    let (code, out, err) = run(&[
        "check",
        "--bundle",
        &path("documents"),
        &path("documents/requests/step-up-delete.json"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("STEP_UP"), "{out}");
    assert!(out.contains("delete-needs-recent-mfa, delete-own"), "{out}");
    assert!(out.contains("acr_values=aal2 max_age=600"), "{out}");

    let (code, out, _) = run(&[
        "check",
        "--json",
        "--bundle",
        &path("documents"),
        &path("documents/requests/allow-share-internal.json"),
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["outcome"], "ALLOW");
    assert_eq!(v["policy_ids"][0], "share-department");

    let (code, _, err) = run(&[
        "check",
        "--expect",
        "ALLOW",
        "--bundle",
        &path("documents"),
        &path("documents/requests/deny-suspended-user.json"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("expected ALLOW, got DENY"), "{err}");
}

#[test]
fn check_reports_bad_requests_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("r.json");
    std::fs::write(
        &req,
        r#"{"subject": {"type": "User", "id": "a"}, "action": {"name": "edit"}}"#,
    )
    .unwrap();
    let (code, _, err) = run(&[
        "check",
        "--bundle",
        &path("documents"),
        req.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("resource"), "{err}");
}

#[tokio::test]
async fn check_against_a_running_sidecar() {
    let sidecar = Sidecar::start(&example("documents"), &[]);
    let addr = format!("http://{}", sidecar.grpc_addr);
    let out = tokio::task::spawn_blocking(move || {
        run(&[
            "check",
            "--addr",
            &addr,
            &path("documents/requests/approval-share-external.json"),
        ])
    })
    .await
    .unwrap();
    assert_eq!(out.0, 0, "{}", out.2);
    assert!(out.1.contains("APPROVAL_REQUIRED"), "{}", out.1);
    assert!(out.1.contains("approvers: document-owners"), "{}", out.1);
    assert!(out.1.contains("revision 2026-11-24.1"), "{}", out.1);
}

#[test]
fn serve_refuses_an_invalid_bundle_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "manifest.json",
        "schema.cedarschema",
        "documents.cedar",
        "entities.json",
    ] {
        std::fs::copy(example("documents").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("broken.cedar"),
        "// a typo\n@id(\"typo\")\npermit (principal, action == Action::\"view\", resource)\nwhen { resource.departmnt == \"x\" };\n",
    )
    .unwrap();
    let (code, _, err) = run(&[
        "serve",
        "--bundle",
        dir.path().to_str().unwrap(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("broken.cedar:4: policy `typo`"), "{err}");
    assert!(err.contains("departmnt"), "{err}");
}

#[test]
fn serve_refuses_bad_configuration_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[limits]\nmax_batch_items = 0\n").unwrap();
    let (code, _, err) = run(&[
        "serve",
        "--bundle",
        &path("documents"),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("max_batch_items"), "{err}");

    std::fs::write(&cfg, "[server]\ngrpc_adr = \"127.0.0.1:1\"\n").unwrap();
    let (code, _, err) = run(&[
        "serve",
        "--bundle",
        &path("documents"),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("grpc_adr"), "{err}");

    let (code, _, err) = run(&["serve", "--bundle", "/nonexistent/bundle"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

/// A guessable credential is refused before the control plane listens: an
/// empty sidecar token would let a request without any through.
#[test]
fn control_plane_refuses_short_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cp.db");
    let base = [
        "control-plane",
        "--addr",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
        "--trusted-key",
        "unread.pem",
    ];
    for (extra, says) in [
        (&["--token", "short"][..], "control plane token"),
        (
            &["--token", "operator-0123456789", "--sidecar-token", ""][..],
            "sidecar token",
        ),
        (
            &["--token", "operator-0123456789", "--sidecar-token", "short"][..],
            "sidecar token",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (code, _, err) = run(&args);
        assert_eq!(code, 64, "{err}");
        assert!(err.contains(says) && err.contains("16 characters"), "{err}");
    }
}

/// A short open-loop `arbiter bench` of the peer scenario (cache off, not
/// pinned) at 300 calls a second, with `extra` arguments; its output.
fn bench_at_300_a_second(extra: &[&str]) -> String {
    let mut args = vec![
        "bench",
        "--scenarios",
        "peer",
        "--cache",
        "off",
        "--rate",
        "300",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--server-cpu",
        "none",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    out
}

/// `arbiter bench` in its open-loop mode: calls at a fixed rate, every one
/// answered within the window, so the achieved rate is the offered one.
#[test]
fn bench_drives_a_sidecar_at_a_fixed_rate() {
    let out = bench_at_300_a_second(&[]);
    let row = out
        .lines()
        .find(|l| l.starts_with("arbiter cache off"))
        .unwrap_or_else(|| panic!("no sidecar row: {out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    // label (3 words), load, req/s, p50, p90, p99, p99.9, cpu, ratios, fails
    assert_eq!(cols[3], "300/s", "{row}");
    let rate: f64 = cols[4].parse().unwrap();
    // Wide: on a loaded machine the last calls may be answered after the
    // window; a closed loop would be in the thousands.
    assert!((200.0..=400.0).contains(&rate), "achieved {rate}/s: {row}");
    assert_eq!(cols.last(), Some(&"0"), "failed calls: {row}");
}

/// `arbiter bench` with the decision log on: the sidecar ships every record
/// to the stand-in receiver, which acknowledges them all, nothing dropped.
#[test]
fn bench_ships_a_decision_log_run_to_its_stand_in_receiver() {
    let out = bench_at_300_a_second(&["--decision-log", "buffered"]);
    assert!(out.contains("ship to a stand-in receiver"), "{out}");
    let after = out
        .lines()
        .find(|l| l.contains("decision log at +2 s"))
        .unwrap_or_else(|| panic!("no shipping report: {out}"));
    // At least the measured calls, all acknowledged, none lost.
    let spooled: u64 = after
        .split_whitespace()
        .nth(5)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{after}"));
    assert!(spooled >= 200, "{after}");
    assert!(
        after.contains("(lag 0)") && after.contains("dropped 0, refused 0"),
        "{after}"
    );
}
