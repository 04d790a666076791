//! Test harness: start the real `arbiter` binary on ephemeral loopback ports
//! and talk to it with real clients. Every wait is bounded.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arbiter::api::pb::v1::authorizer_client::AuthorizerClient;
use serde_json::Value;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_arbiter");

pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// A running sidecar; killed when dropped.
pub struct Sidecar {
    pub child: Child,
    pub grpc_addr: String,
    pub http_addr: String,
    /// Log lines after the listening line, for tests that read them.
    pub logs: mpsc::Receiver<String>,
    /// A private decision-log spool, unless the test gave one.
    _spool: Option<tempfile::TempDir>,
}

impl Sidecar {
    /// Starts `arbiter serve`; an empty `bundle` path leaves `--bundle` out
    /// (for sidecars that pull their bundle).
    pub fn start(bundle: &Path, extra: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve");
        if !bundle.as_os_str().is_empty() {
            cmd.arg("--bundle").arg(bundle);
        }
        let spool = if extra.contains(&"--decision-log-spool") {
            None
        } else {
            let dir = tempfile::tempdir().unwrap();
            cmd.arg("--decision-log-spool").arg(dir.path());
            Some(dir)
        };
        let mut child = cmd
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("arbiter starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sidecar did not report its addresses in time");
            };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let fields = &v["fields"];
            if fields["message"] == "arbiter listening" {
                return Self {
                    grpc_addr: fields["grpc_addr"].as_str().unwrap().to_owned(),
                    http_addr: fields["http_addr"].as_str().unwrap().to_owned(),
                    child,
                    logs: rx,
                    _spool: spool,
                };
            }
        }
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connects")
    }

    pub async fn client(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::new(self.channel().await)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.http_addr))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("http get");
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        wait_bounded(&mut self.child, Duration::from_secs(20))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to its exit, bounded by `limit`: its status and stderr.
pub fn exit_and_stderr(cmd: &mut Command, limit: Duration) -> (ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_bounded(&mut child, limit);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

/// Reads an example request file as the gRPC message.
pub fn example_request(file: &str) -> arbiter::api::pb::v1::CheckRequest {
    let text = std::fs::read_to_string(example("documents").join(file)).unwrap();
    let req = arbiter::api::json::request_from_json(serde_json::from_str(&text).unwrap()).unwrap();
    arbiter::api::json::request_to_pb(&req)
}

/// Runs the binary to completion: exit code, stdout, stderr.
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("ARBITER_CONTROL_PLANE_TOKEN")
        .output()
        .expect("arbiter runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Builds the example bundle at `revision` into `work/REVISION.tar.gz`,
/// signed with `key` when given.
pub fn build_example(work: &Path, revision: &str, key: Option<&Path>) -> PathBuf {
    build_bundle(work, "documents", revision, key)
}

/// Builds example bundle `name` at `revision` into `work/REVISION.tar.gz`.
pub fn build_bundle(work: &Path, name: &str, revision: &str, key: Option<&Path>) -> PathBuf {
    let dir = work.join(format!("src-{revision}"));
    let copied = Command::new("cp")
        .args(["-r", s(&example(name)), s(&dir)])
        .status()
        .unwrap();
    assert!(copied.success());
    let manifest = std::fs::read_to_string(dir.join("manifest.json"))
        .unwrap()
        .replace("2026-11-24.1", revision);
    std::fs::write(dir.join("manifest.json"), manifest).unwrap();
    let out = work.join(format!("{revision}.tar.gz"));
    let mut args = vec!["bundle", "build", s(&dir), "-o", s(&out)];
    if let Some(k) = key {
        args.extend(["--sign-key", s(k)]);
    }
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    out
}

impl Sidecar {
    /// The gRPC health status of the whole server (`""`).
    pub async fn health(&self) -> tonic_health::pb::health_check_response::ServingStatus {
        let status = tonic_health::pb::health_client::HealthClient::new(self.channel().await)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        tonic_health::pb::health_check_response::ServingStatus::try_from(status)
            .expect("known status")
    }

    /// The revision that answers a known-good request, if any answers.
    pub async fn revision(&self) -> Option<String> {
        let mut client = self.client().await;
        client
            .check(example_request("requests/allow-edit-department.json"))
            .await
            .ok()
            .map(|r| r.into_inner().revision)
    }

    /// Whether it has counted a failed bundle fetch.
    pub async fn counted_fetch_failures(&self) -> bool {
        self.get("/metrics")
            .await
            .1
            .lines()
            .any(|l| l.starts_with("arbiter_bundle_fetch_failures_total") && !l.ends_with(" 0"))
    }
}

/// `serve` arguments that pull bundle `name` from the control plane at `cp`,
/// trusting `public`, polling every 200 ms.
pub fn pull_args<'a>(
    cp: &'a str,
    name: &'a str,
    public: &'a Path,
    cache: &'a Path,
) -> Vec<&'a str> {
    vec![
        "--control-plane",
        cp,
        "--bundle-name",
        name,
        "--trusted-key",
        s(public),
        "--bundle-cache",
        s(cache),
        "--poll-interval-ms",
        "200",
    ]
}

/// Waits (bounded) until `f` holds; returns how long it took.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if f().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out after {within:?} waiting for {what}");
}

pub const TOKEN: &str = "test-token-0123456789";

/// A running `arbiter control-plane`: the child and its base URL.
pub struct ControlPlane(pub Child, pub String);

impl ControlPlane {
    pub fn start(db: &Path, public: &Path) -> Self {
        Self::start_with(db, public, &[])
    }

    pub fn start_with(db: &Path, public: &Path, extra: &[&str]) -> Self {
        let addr = if extra.contains(&"--addr") {
            &[][..]
        } else {
            &["--addr", "127.0.0.1:0"][..]
        };
        let mut child = Command::new(BIN)
            .arg("control-plane")
            .args(addr)
            .args([
                "--db",
                s(db),
                "--trusted-key",
                s(public),
                "--log-format",
                "json",
            ])
            .args(["--token", TOKEN])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("control plane did not start");
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "control plane listening" {
                let addr = v["fields"]["addr"].as_str().unwrap().to_owned();
                let scheme = if v["fields"]["tls"] == true {
                    "https"
                } else {
                    "http"
                };
                return Self(child, format!("{scheme}://{addr}"));
            }
        }
    }
}

impl ControlPlane {
    /// `host:port` it listens on.
    pub fn addr(&self) -> &str {
        self.1.split("://").nth(1).unwrap()
    }

    /// An authenticated GET, parsed as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.1))
            .bearer_auth(TOKEN)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("control plane answers");
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
