//! Pulling bundles: a sidecar polls a plain file server (Python's
//! `http.server`, which knows `Last-Modified` but not `ETag`), swaps
//! revisions atomically, refuses bad archives, and restarts from its
//! last-known-good bundle while the server is down.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{BIN, Sidecar, example, example_request};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn arbiter(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the example bundle at `revision`, signed with `key` when given.
fn build(work: &Path, revision: &str, key: Option<&Path>, out: &Path) {
    let dir = work.join(format!("src-{revision}"));
    let status = Command::new("cp")
        .args(["-r", s(&example("documents")), s(&dir)])
        .status()
        .unwrap();
    assert!(status.success());
    let manifest = std::fs::read_to_string(dir.join("manifest.json"))
        .unwrap()
        .replace("2026-11-24.1", revision);
    std::fs::write(dir.join("manifest.json"), manifest).unwrap();
    let mut args = vec!["bundle", "build", s(&dir), "-o", s(out)];
    if let Some(k) = key {
        args.extend(["--sign-key", s(k)]);
    }
    arbiter(&args);
}

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

async fn revision(sidecar: &Sidecar) -> Option<String> {
    let mut client = sidecar.client().await;
    client
        .check(example_request("requests/allow-edit-department.json"))
        .await
        .ok()
        .map(|r| r.into_inner().revision)
}

/// Waits (bounded) until `f` holds.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn pulls_swaps_refuses_and_restarts_from_last_known_good() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    arbiter(&["bundle", "keygen", "--out", s(&w.join("ops"))]);
    let (key, public) = (w.join("ops.key.pem"), w.join("ops.pub.pem"));
    build(w, "r1", Some(&key), &w.join("r1.tar.gz"));
    build(w, "r2", Some(&key), &w.join("r2.tar.gz"));
    build(w, "r3-unsigned", None, &w.join("r3.tar.gz"));

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
    eventually("r1 active", || async {
        revision(&sidecar).await.as_deref() == Some("r1")
    })
    .await;
    assert!(cache.join("last-known-good.tar.gz").exists());

    publish(&w.join("r2.tar.gz"), &served, 5);
    eventually("r2 active", || async {
        revision(&sidecar).await.as_deref() == Some("r2")
    })
    .await;

    // An unsigned archive is refused; r2 stays.
    publish(&w.join("r3.tar.gz"), &served, 10);
    eventually("the refusal counted", || async {
        sidecar
            .get("/metrics")
            .await
            .1
            .contains("arbiter_bundle_rejected_total 1")
    })
    .await;
    assert_eq!(revision(&sidecar).await.as_deref(), Some("r2"));
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
    assert_eq!(revision(&sidecar).await.as_deref(), Some("r2"));
    eventually("fetch failures counted", || async {
        let m = sidecar.get("/metrics").await.1;
        m.lines()
            .any(|l| l.starts_with("arbiter_bundle_fetch_failures_total") && !l.ends_with(" 0"))
    })
    .await;
    assert_eq!(sidecar.get("/readyz").await.0, 200);
    drop(sidecar);

    // A corrupt last-known-good file is set aside, never half-loaded.
    std::fs::write(cache.join("last-known-good.tar.gz"), b"corrupted on disk").unwrap();
    let sidecar = Sidecar::start(Path::new(""), &args);
    assert_eq!(sidecar.get("/readyz").await.0, 503);
    let mut health = tonic_health::pb::health_client::HealthClient::new(sidecar.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
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
    arbiter(&["bundle", "keygen", "--out", s(&w.join("ops"))]);
    build(w, "r1", Some(&w.join("ops.key.pem")), &w.join("r1.tar.gz"));
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
        eventually("r1 active and ready", || async {
            revision(sidecar).await.as_deref() == Some("r1")
                && sidecar.get("/readyz").await.0 == 200
        })
        .await;
    }

    drop(server);
    eventually("deny-all goes unready", || async {
        deny.get("/readyz").await.0 == 503
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
    let status = tonic_health::pb::health_client::HealthClient::new(deny.channel().await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    eventually("serve-stale reports it", || async {
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
