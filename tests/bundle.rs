//! Bundle tooling end to end: keys, build, sign, inspect, test, and a sidecar
//! serving a signed archive (and refusing bad ones).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{Sidecar, example, example_request, run, s};

fn copy_example(to: &Path) {
    for entry in walk(&example("documents")) {
        let rel = entry.strip_prefix(example("documents")).unwrap();
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, dest).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

#[test]
fn test_command_runs_the_bundle_cases() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("report.xml");
    let (code, out, err) = run(&["test", s(&example("documents")), "--junit", s(&junit)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("14 passed, 0 failed"), "{out}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"14\" failures=\"0\""), "{xml}");
    // The agent example: tools as actions, step-up, approval, session rules.
    let (code, out, err) = run(&["test", s(&example("agent"))]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("11 passed, 0 failed"), "{out}");

    let broken = dir.path().join("broken");
    copy_example(&broken);
    std::fs::write(
        broken.join("tests/extra.json"),
        r#"[{"name": "wrong on purpose", "request": "requests/deny-suspended-user.json", "expect": {"outcome": "ALLOW"}}]"#,
    )
    .unwrap();
    let (code, out, _) = run(&["test", s(&broken)]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL") && out.contains("outcome DENY (expected ALLOW)"),
        "{out}"
    );

    // A bundle whose tests fail is not built.
    let (code, _, err) = run(&[
        "bundle",
        "build",
        s(&broken),
        "-o",
        s(&dir.path().join("x.tar.gz")),
    ]);
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("policy tests failed"), "{err}");
    assert!(!dir.path().join("x.tar.gz").exists());
}

#[tokio::test]
async fn signed_archive_is_built_inspected_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("ops");
    let (code, out, err) = run(&["bundle", "keygen", "--out", s(&prefix)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("key id"), "{out}");
    let (private, public) = (
        dir.path().join("ops.key.pem"),
        dir.path().join("ops.pub.pem"),
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    let archive = dir.path().join("documents.tar.gz");
    let (code, out, err) = run(&[
        "bundle",
        "build",
        s(&example("documents")),
        "-o",
        s(&archive),
        "--sign-key",
        s(&private),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("14 tests passed") && out.contains("signed by"),
        "{out}"
    );

    let (code, out, err) = run(&[
        "bundle",
        "inspect",
        s(&archive),
        "--trusted-key",
        s(&public),
    ]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "revision:   2026-11-24.1",
        "every file matches",
        "verified (signature by trusted key",
        "policies:   9",
        "guards.cedar",
    ] {
        assert!(out.contains(needle), "missing {needle} in\n{out}");
    }

    let sidecar = Sidecar::start(&archive, &["--trusted-key", s(&public)]);
    let mut client = sidecar.client().await;
    let r = client
        .check(example_request("requests/step-up-delete.json"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.bundle.as_str(), r.revision.as_str()),
        ("documents", "2026-11-24.1")
    );
    assert_eq!(r.policy_ids, ["delete-needs-recent-mfa", "delete-own"]);

    // Offline check against the archive too.
    let (code, out, err) = run(&[
        "check",
        "--bundle",
        s(&archive),
        "--trusted-key",
        s(&public),
        s(&example("documents/requests/allow-view-own.json")),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ALLOW"), "{out}");
}

#[test]
fn serve_refuses_unsigned_untrusted_and_untrusting() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, _) = run(&["bundle", "keygen", "--out", s(&dir.path().join("a"))]);
    let (_, _, _) = run(&["bundle", "keygen", "--out", s(&dir.path().join("b"))]);
    let unsigned = dir.path().join("unsigned.tar.gz");
    let (code, _, err) = run(&[
        "bundle",
        "build",
        s(&example("documents")),
        "-o",
        s(&unsigned),
    ]);
    assert_eq!(code, 0, "{err}");
    let signed = dir.path().join("signed.tar.gz");
    let (code, _, err) = run(&[
        "bundle",
        "sign",
        s(&unsigned),
        "--key",
        s(&dir.path().join("a.key.pem")),
        "-o",
        s(&signed),
    ]);
    assert_eq!(code, 0, "{err}");

    let serve = |bundle: &Path, key: Option<&Path>| {
        let mut args = vec![
            "serve",
            "--bundle",
            s(bundle),
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ];
        if let Some(k) = key {
            args.extend(["--trusted-key", s(k)]);
        }
        run(&args)
    };
    let (code, _, err) = serve(&unsigned, Some(&dir.path().join("a.pub.pem")));
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("not signed"), "{err}");
    let (code, _, err) = serve(&signed, Some(&dir.path().join("b.pub.pem")));
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("not trusted"), "{err}");
    let (code, _, err) = serve(&signed, None);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("no key is trusted"), "{err}");
    let garbage = dir.path().join("garbage.tar.gz");
    std::fs::write(&garbage, b"definitely not an archive").unwrap();
    let (code, _, err) = serve(&garbage, Some(&dir.path().join("a.pub.pem")));
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("not a readable tar.gz"), "{err}");
}
