//! The reference control plane end to end: publish (authenticated, verified),
//! a sidecar long-polling it, rollback, and the plain HTTP contract.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{ControlPlane, Sidecar, TOKEN, build_example, eventually, pull_args, run, s};

#[tokio::test]
async fn publish_long_poll_rollback() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    run(&["bundle", "keygen", "--out", s(&w.join("ops"))]);
    let (key, public) = (w.join("ops.key.pem"), w.join("ops.pub.pem"));
    let r1 = build_example(w, "r1", Some(&key));
    let r2 = build_example(w, "r2", Some(&key));
    let unsigned = build_example(w, "r3", None);
    let cp = ControlPlane::start(&w.join("cp.db"), &public);

    // Publishing needs the token, and a signed archive.
    let (code, _, err) = run(&[
        "bundle",
        "push",
        s(&r1),
        "--to",
        &cp.1,
        "--token",
        "wrong-token-0123456789",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = run(&[
        "bundle",
        "push",
        s(&unsigned),
        "--to",
        &cp.1,
        "--token",
        TOKEN,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("400") && err.contains("not signed"), "{err}");
    let (code, out, err) = run(&["bundle", "push", s(&r1), "--to", &cp.1, "--token", TOKEN]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"revision\":\"r1\""), "{out}");
    let (code, _, err) = run(&["bundle", "push", s(&r1), "--to", &cp.1, "--token", TOKEN]);
    assert_eq!(
        code, 0,
        "publishing the same revision again is harmless: {err}"
    );

    // A sidecar polling only once a minute still gets new revisions at once: long polling.
    let cache = w.join("cache");
    let sidecar = Sidecar::start(
        Path::new(""),
        &[
            "--control-plane",
            &cp.1,
            "--bundle-name",
            "documents",
            "--trusted-key",
            s(&public),
            "--bundle-cache",
            s(&cache),
            "--poll-interval-ms",
            "60000",
        ],
    );
    eventually("r1 active", Duration::from_secs(20), || async {
        sidecar.revision().await.as_deref() == Some("r1")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let the sidecar's long poll start
    let (code, _, err) = run(&["bundle", "push", s(&r2), "--to", &cp.1, "--token", TOKEN]);
    assert_eq!(code, 0, "{err}");
    let took = eventually("r2 active", Duration::from_secs(30), || async {
        sidecar.revision().await.as_deref() == Some("r2")
    })
    .await;
    // Polling would take 60 s; anything well below proves the long poll
    // (with room for a slow CI machine's verify + compile).
    assert!(
        took < Duration::from_secs(20),
        "long poll delivered r2 after {took:?}"
    );

    // Rollback is one command, and reaches the sidecar the same way.
    let (code, _, err) = run(&[
        "bundle",
        "rollback",
        "documents",
        "--to-revision",
        "r1",
        "--control-plane",
        &cp.1,
        "--token",
        TOKEN,
    ]);
    assert_eq!(code, 0, "{err}");
    eventually("r1 active", Duration::from_secs(30), || async {
        sidecar.revision().await.as_deref() == Some("r1")
    })
    .await;
    let (code, _, err) = run(&[
        "bundle",
        "rollback",
        "documents",
        "--to-revision",
        "r9",
        "--control-plane",
        &cp.1,
        "--token",
        TOKEN,
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("404") && err.contains("no revision `r9`"),
        "{err}"
    );

    let (code, out, err) = run(&["bundle", "revisions", "documents", "--control-plane", &cp.1]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().any(|l| l.starts_with("* r1")), "{out}");

    // The plain HTTP contract any sidecar (or curl) relies on.
    let http = reqwest::Client::new();
    let first = http
        .get(format!("{}/bundles/documents", cp.1))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(first.headers()["x-arbiter-revision"], "r1");
    let again = http
        .get(format!("{}/bundles/documents", cp.1))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let missing = http
        .get(format!("{}/bundles/nope", cp.1))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // The store survives a restart of the control plane.
    drop(cp);
    let cp = ControlPlane::start(&w.join("cp.db"), &public);
    let after = http
        .get(format!("{}/bundles/documents", cp.1))
        .send()
        .await
        .unwrap();
    assert_eq!(after.headers()["x-arbiter-revision"], "r1");
}

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`;
/// returns (ca, cert, key).
fn certificates(
    dir: &Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test]
async fn tls_control_plane_is_verified_against_the_configured_ca() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    run(&["bundle", "keygen", "--out", s(&w.join("ops"))]);
    let (key, public) = (w.join("ops.key.pem"), w.join("ops.pub.pem"));
    let r1 = build_example(w, "r1", Some(&key));
    let (ca, cert, tls_key) = certificates(w, "cp");
    let (other_ca, _, _) = certificates(w, "other");
    let cp = ControlPlane::start_with(
        &w.join("cp.db"),
        &public,
        &["--tls-cert", s(&cert), "--tls-key", s(&tls_key)],
    );
    assert!(cp.1.starts_with("https://"), "{}", cp.1);

    // No CA given: refused before connecting; a CA that did not sign the server's certificate: refused by TLS.
    let push = |ca: Option<&Path>| {
        let mut args = vec!["bundle", "push", s(&r1), "--to", &cp.1, "--token", TOKEN];
        if let Some(ca) = ca {
            args.extend(["--ca", s(ca)]);
        }
        run(&args)
    };
    let (code, _, err) = push(None);
    assert_ne!(code, 0);
    assert!(err.contains("certificate authority"), "{err}");
    let (code, _, err) = push(Some(&other_ca));
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let (code, _, err) = push(Some(&ca));
    assert_eq!(code, 0, "{err}");

    let pull = |ca: &Path, cache: &str| {
        let cache = w.join(cache);
        let mut args = pull_args(&cp.1, "documents", &public, &cache);
        args.extend(["--control-plane-ca", s(ca)]);
        Sidecar::start(Path::new(""), &args)
    };
    let good = pull(&ca, "c1");
    eventually("r1 over TLS", Duration::from_secs(20), || async {
        good.revision().await.as_deref() == Some("r1")
    })
    .await;
    let wrong = pull(&other_ca, "c2");
    eventually("fetch failures counted", Duration::from_secs(20), || {
        wrong.counted_fetch_failures()
    })
    .await;
    assert_eq!(
        wrong.get("/readyz").await.0,
        503,
        "nothing from an unverified control plane is served"
    );
}

/// With a sidecar token, the control plane serves bundles only to holders
/// of it (or of the operator token): policies are not for anyone who can
/// reach the port. Sidecars send it; one without it is told what is missing.
#[tokio::test]
async fn bundle_reads_need_the_sidecar_token_when_there_is_one() {
    const SIDECARS: &str = "sidecar-secret-0123456789";
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    run(&["bundle", "keygen", "--out", s(&w.join("ops"))]);
    let (key, public) = (w.join("ops.key.pem"), w.join("ops.pub.pem"));
    let r1 = build_example(w, "r1", Some(&key));
    let cp = ControlPlane::start_with(&w.join("cp.db"), &public, &["--sidecar-token", SIDECARS]);
    let (code, _, err) = run(&["bundle", "push", s(&r1), "--to", &cp.1, "--token", TOKEN]);
    assert_eq!(code, 0, "{err}");

    let http = reqwest::Client::new();
    for path in ["/bundles/documents", "/bundles/documents/revisions"] {
        let get = |token: Option<&str>| {
            let mut req = http.get(format!("{}{path}", cp.1));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.timeout(Duration::from_secs(10)).send()
        };
        let refused = get(None).await.unwrap();
        assert_eq!(refused.status(), 401, "{path}");
        assert!(refused.text().await.unwrap().contains("sidecar token"));
        assert_eq!(get(Some("wrong-0123456789")).await.unwrap().status(), 401);
        assert_eq!(get(Some(SIDECARS)).await.unwrap().status(), 200, "{path}");
        assert_eq!(get(Some(TOKEN)).await.unwrap().status(), 200, "{path}");
    }

    let pull = |token: Option<&str>, cache: &str| {
        let cache = w.join(cache);
        let mut args = pull_args(&cp.1, "documents", &public, &cache);
        if let Some(t) = token {
            args.extend(["--sidecar-token", t]);
        }
        Sidecar::start(Path::new(""), &args)
    };
    let with = pull(Some(SIDECARS), "c1");
    eventually(
        "r1 pulled with the token",
        Duration::from_secs(20),
        || async { with.revision().await.as_deref() == Some("r1") },
    )
    .await;
    let without = pull(None, "c2");
    eventually("fetch failures counted", Duration::from_secs(20), || {
        without.counted_fetch_failures()
    })
    .await;
    assert_eq!(without.revision().await, None);
    assert_ne!(without.get("/readyz").await.0, 200);
}

/// A database a newer build has migrated is refused at start, untouched:
/// storing records into it without what the newer schema keeps would show
/// them as chain breaks after the next upgrade.
#[test]
fn a_store_from_a_newer_build_is_refused_untouched() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    run(&["bundle", "keygen", "--out", s(&w.join("ops"))]);
    let db = w.join("cp.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE from_the_future (x); PRAGMA user_version = 99;")
            .unwrap();
    }
    let (status, err) = common::exit_and_stderr(
        std::process::Command::new(common::BIN)
            .args(["control-plane", "--addr", "127.0.0.1:0", "--db", s(&db)])
            .args(["--trusted-key", s(&w.join("ops.pub.pem")), "--token", TOKEN]),
        Duration::from_secs(20),
    );
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("schema version 99") && err.contains("newer arbiter"),
        "{err}"
    );

    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!((version, tables), (99, vec!["from_the_future".to_owned()]));
}
