//! Pulling bundles: a sidecar polls a plain file server (Python's
//! `http.server`, which knows `Last-Modified` but not `ETag`), swaps
//! revisions atomically, refuses bad archives, and restarts from its
//! last-known-good bundle while the server is down.
#![allow(clippy::unwrap_used)]

mod common;

/// The patience these tests have for anything to happen.
async fn eventually_20<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(what, Duration::from_secs(20), f).await;
}

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{Sidecar, build_example, eventually, example_request, run, s};

/// Puts `archive` where the file server serves it, with a modification time
/// later than any before (Last-Modified has one-second resolution).
fn publish(archive: &Path, served: &Path, bump: u64) {
    let tmp = served.with_extension("tmp");
    std::fs::copy(archive, &tmp).unwrap();
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(bump))
        .unwrap();
    drop(f);
    std::fs::rename(&tmp, served).unwrap();
}

struct FileServer(Child, u16);

impl FileServer {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
                s(dir),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        let port = line
            .split(" port ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        Self(
            child,
            port.unwrap_or_else(|| panic!("unexpected http.server banner: {line}")),
        )
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn pulls_swaps_refuses_and_restarts_from_last_known_good() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    run(&["bundle", "keygen", "--out", s(&w.join("ops"))]);
    let (key, public) = (w.join("ops.key.pem"), w.join("ops.pub.pem"));
    build_example(w, "r1", Some(&key));
    build_example(w, "r2", Some(&key));
    build_example(w, "r3", None);

    let served_dir = w.join("www");
    std::fs::create_dir_all(&served_dir).unwrap();
    let served = served_dir.join("documents.tar.gz");
    publish(&w.join("r1.tar.gz"), &served, 0);
    let server = FileServer::start(&served_dir);
    let url = format!("http://127.0.0.1:{}/documents.tar.gz", server.1);
    let cache = w.join("cache");
    let args = [
        "--bundle-url",
        &url,
        "--trusted-key",
        s(&public),
        "--bundle-cache",
        s(&cache),
        "--poll-interval-ms",
        "200",
    ];

    let sidecar = Sidecar::start(Path::new(""), &args);
    eventually_20("r1 active", || async {
        sidecar.revision().await.as_deref() == Some("r1")
    })
    .await;
    // Kept on disk right after activation (a task of its own).
    eventually_20("r1 kept as last-known-good", || async {
        cache.join("last-known-good.tar.gz").exists()
    })
    .await;

    publish(&w.join("r2.tar.gz"), &served, 5);
    eventually_20("r2 active", || async {
        sidecar.revision().await.as_deref() == Some("r2")
    })
    .await;

    // An unsigned archive is refused; r2 stays.
    publish(&w.join("r3.tar.gz"), &served, 10);
    eventually_20("the refusal counted", || async {
        sidecar
            .get("/metrics")
            .await
            .1
            .contains("arbiter_bundle_rejected_total 1")
    })
    .await;
    assert_eq!(sidecar.revision().await.as_deref(), Some("r2"));
    let (_, metrics) = sidecar.get("/metrics").await;
    assert!(
        metrics.contains("arbiter_bundle_active{bundle=\"documents\",revision=\"r2\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("arbiter_bundle_activation_duration_seconds"),
        "{metrics}"
    );
    drop(sidecar);

    // The source goes away; a restarted sidecar serves r2 from disk at once.
    drop(server);
    let sidecar = Sidecar::start(Path::new(""), &args);
    assert_eq!(sidecar.revision().await.as_deref(), Some("r2"));
    eventually_20("fetch failures counted", || {
        sidecar.counted_fetch_failures()
    })
    .await;
    assert_eq!(sidecar.get("/readyz").await.0, 200);
    drop(sidecar);

    // A corrupt last-known-good file is set aside, never half-loaded.
    std::fs::write(cache.join("last-known-good.tar.gz"), b"corrupted on disk").unwrap();
    let sidecar = Sidecar::start(Path::new(""), &args);
    assert_eq!(sidecar.get("/readyz").await.0, 503);
    assert_eq!(
        sidecar.health().await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    let err = sidecar
        .client()
        .await
        .check(example_request("requests/allow-edit-department.json"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        cache.join("last-known-good.tar.rejected").exists(),
        "the corrupt file is set aside"
    );
}

#[tokio::test]
async fn a_stale_bundle_follows_the_fail_mode() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    run(&["bundle", "keygen", "--out", s(&w.join("ops"))]);
    build_example(w, "r1", Some(&w.join("ops.key.pem")));
    let served_dir = w.join("www");
    std::fs::create_dir_all(&served_dir).unwrap();
    publish(
        &w.join("r1.tar.gz"),
        &served_dir.join("documents.tar.gz"),
        0,
    );
    let server = FileServer::start(&served_dir);
    let url = format!("http://127.0.0.1:{}/documents.tar.gz", server.1);
    let start = |mode: &str, cache: &str| {
        Sidecar::start(
            Path::new(""),
            &[
                "--bundle-url",
                &url,
                "--trusted-key",
                s(&w.join("ops.pub.pem")),
                "--bundle-cache",
                s(&w.join(cache)),
                "--poll-interval-ms",
                "200",
                "--max-bundle-age-secs",
                "1",
                "--fail-mode",
                mode,
            ],
        )
    };
    let deny = start("deny-all", "c1");
    let serve = start("serve-stale", "c2");
    for sidecar in [&deny, &serve] {
        eventually_20("r1 active and ready", || async {
            sidecar.revision().await.as_deref() == Some("r1")
                && sidecar.get("/readyz").await.0 == 200
        })
        .await;
    }

    drop(server);
    // Readiness, health and the metric turn one after another: wait for all.
    eventually_20("deny-all goes unready", || async {
        deny.get("/readyz").await.0 == 503
            && deny.health().await
                == tonic_health::pb::health_check_response::ServingStatus::NotServing
            && deny
                .get("/metrics")
                .await
                .1
                .contains("arbiter_bundle_stale 1")
    })
    .await;
    let r = deny
        .client()
        .await
        .check(example_request("requests/allow-edit-department.json"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !r.decision && r.errors.iter().any(|e| e.contains("stale")),
        "{r:?}"
    );
    assert!(
        deny.get("/metrics")
            .await
            .1
            .contains("arbiter_bundle_stale 1")
    );
    assert_eq!(
        deny.health().await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );

    eventually_20("serve-stale reports it", || async {
        serve
            .get("/readyz")
            .await
            .1
            .contains("stale, still serving")
    })
    .await;
    assert_eq!(serve.get("/readyz").await.0, 200);
    let r = serve
        .client()
        .await
        .check(example_request("requests/allow-edit-department.json"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.decision, "serve-stale keeps deciding: {r:?}");
    assert!(
        serve
            .get("/metrics")
            .await
            .1
            .contains("arbiter_bundle_stale 1")
    );
}
