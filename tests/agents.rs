//! Agents and journey-time decisions, end to end with the real binaries: a
//! control plane with the `agent` example bundle, a sidecar pulling it, a
//! tonic client for `ToolAccess`, and the CLI for approvers and signals.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arbiter::api::pb::v1::tool_access_client::ToolAccessClient;
use arbiter::api::pb::v1::{self as pb, Outcome};
use common::*;
use serde_json::{Value, json};
use tonic::transport::Channel;

struct World {
    _work: tempfile::TempDir,
    dir: PathBuf,
    public: PathBuf,
    cp: ControlPlane,
    sidecar: Sidecar,
}

fn keyed(w: &Path) -> PathBuf {
    let (code, _, err) = run(&["bundle", "keygen", "--out", s(&w.join("k"))]);
    assert_eq!(code, 0, "{err}");
    let archive = build_bundle(w, "agent", "a1", Some(&w.join("k.key.pem")));
    assert!(archive.exists());
    w.join("k.pub.pem")
}

/// A sidecar pulling the agent bundle from `cp`, with `config` as its
/// configuration file (written next to its bundle cache).
fn sidecar_with(cp: &str, public: &Path, dir: &Path, cache: &str, config: &str) -> Sidecar {
    let file = dir.join(format!("{cache}.toml"));
    std::fs::write(&file, config).unwrap();
    let cache = dir.join(cache);
    let mut args = pull_args(cp, "agent", public, &cache);
    args.extend(["--config", s(&file)]);
    Sidecar::start(Path::new(""), &args)
}

/// A ToolAccess client of `sidecar`, once its bundle answers.
async fn ready_tools(sidecar: &Sidecar) -> ToolAccessClient<Channel> {
    let client = ToolAccessClient::new(sidecar.channel().await);
    eventually(
        "the agent bundle to be active",
        Duration::from_secs(20),
        || {
            let mut c = client.clone();
            async move { c.authorize_tool(read_own("probe")).await.is_ok() }
        },
    )
    .await;
    client
}

fn push(cp: &str, dir: &Path) {
    let (code, _, err) = run(&[
        "bundle",
        "push",
        s(&dir.join("a1.tar.gz")),
        "--to",
        cp,
        "--token",
        TOKEN,
    ]);
    assert_eq!(code, 0, "{err}");
}

impl World {
    async fn start(cp_extra: &[&str]) -> Self {
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().to_path_buf();
        let public = keyed(&dir);
        let cp = ControlPlane::start_with(&dir.join("cp.db"), &public, cp_extra);
        push(&cp.1, &dir);
        let sidecar = Self::sidecar(&cp.1, &public, &dir, "cache");
        Self {
            _work: work,
            dir,
            public,
            cp,
            sidecar,
        }
    }

    fn sidecar(cp: &str, public: &Path, dir: &Path, cache: &str) -> Sidecar {
        // Patient with a loaded CI machine: filing or spending an approval
        // (a control-plane write) gets 15 s, not 2, and a new sidecar waits
        // for its signal feed rather than answering without it after 5 s.
        sidecar_with(
            cp,
            public,
            dir,
            cache,
            "[sessions]\napproval_timeout_ms = 15000\nstartup_wait_ms = 60000\n",
        )
    }

    async fn tools(&self) -> ToolAccessClient<Channel> {
        ready_tools(&self.sidecar).await
    }

    /// Runs the CLI against this control plane.
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = args.to_vec();
        all.extend(["--control-plane", &self.cp.1, "--token", TOKEN]);
        run(&all)
    }

    /// `arbiter signal send ARGS...`, which must be accepted.
    fn signal(&self, args: &[&str]) {
        let mut all = vec!["signal", "send"];
        all.extend(args);
        let (code, _, err) = self.cli(&all);
        assert_eq!(code, 0, "{err}");
    }

    fn pending(&self) -> Vec<Value> {
        let (code, out, err) = self.cli(&["approval", "list", "--state", "pending", "--json"]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn structure(v: Value) -> prost_types::Struct {
    arbiter::api::json::to_struct(v.as_object().unwrap())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn call(
    agent: &str,
    tool: &str,
    args: Value,
    session: &str,
    acr: &str,
    auth_time: i64,
) -> pb::AuthorizeToolRequest {
    let (server, name) = tool.split_once('/').unwrap();
    pb::AuthorizeToolRequest {
        agent: Some(pb::Agent {
            id: agent.into(),
            properties: None,
        }),
        on_behalf_of: Some(pb::User {
            id: "alice".into(),
            acr: acr.into(),
            auth_time,
            properties: None,
        }),
        delegation: Vec::new(),
        server: server.into(),
        tool: name.into(),
        arguments: Some(structure(args)),
        session_id: session.into(),
        approval_id: String::new(),
    }
}

fn read_own(session: &str) -> pb::AuthorizeToolRequest {
    call(
        "support-bot",
        "crm/get_customer",
        json!({"customer_id": "alice"}),
        session,
        "aal1",
        now() - 60,
    )
}

/// `read_own` asked through `Check`, as a service (not an agent runtime) would.
fn check_read_own(session: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        subject: Some(pb::Subject {
            r#type: "Agent".into(),
            id: "support-bot".into(),
            properties: None,
        }),
        action: Some(pb::Action {
            name: "crm/get_customer".into(),
            properties: None,
        }),
        resource: Some(pb::Resource {
            r#type: "Tool".into(),
            id: "crm/get_customer".into(),
            properties: None,
        }),
        context: Some(structure(json!({
            "args": {"customer_id": "alice"},
            "user": {"id": "alice", "acr": "aal1", "auth_time": now(), "auth_age_secs": 0},
            "delegation": [],
        }))),
        session_id: session.into(),
    }
}

fn refund(amount: i64, session: &str) -> pb::AuthorizeToolRequest {
    call(
        "support-bot",
        "payments/refund",
        json!({"order_id": "o-7", "amount": amount, "currency": "EUR"}),
        session,
        "aal1",
        now() - 60,
    )
}

async fn ask(c: &mut ToolAccessClient<Channel>, r: pb::AuthorizeToolRequest) -> pb::CheckResponse {
    c.authorize_tool(r).await.unwrap().into_inner()
}

/// Waits (bounded) until `request` gets `want`.
async fn until(
    what: &str,
    c: &ToolAccessClient<Channel>,
    request: pb::AuthorizeToolRequest,
    want: Outcome,
) {
    eventually(what, Duration::from_secs(20), || {
        let (mut c, request) = (c.clone(), request.clone());
        async move { outcome(&ask(&mut c, request).await) == want }
    })
    .await;
}

fn outcome(r: &pb::CheckResponse) -> Outcome {
    Outcome::try_from(r.outcome).unwrap()
}

/// Watches a session: the stream, and its first message (the state now).
async fn watch_state(
    c: &mut ToolAccessClient<Channel>,
    session: &str,
) -> (tonic::Streaming<pb::SessionUpdate>, pb::SessionUpdate) {
    let mut stream = c
        .watch_session(pb::WatchSessionRequest {
            session_id: session.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the current state within 10 s")
        .unwrap()
        .unwrap();
    (stream, first)
}

/// A DENY whose errors say `why`.
fn denied_because(r: &pb::CheckResponse, why: &str) {
    assert_eq!(outcome(r), Outcome::Deny, "{r:?}");
    assert!(r.errors.iter().any(|e| e.contains(why)), "{why}: {r:?}");
}

#[tokio::test]
async fn approval_is_filed_granted_by_the_cli_and_spent_exactly_once() {
    let w = World::start(&[]).await;
    let mut c = w.tools().await;

    let first = ask(&mut c, refund(800, "s-a")).await;
    assert_eq!(outcome(&first), Outcome::ApprovalRequired, "{first:?}");
    let approval = first.approval.clone().unwrap();
    assert_eq!(approval.approver_groups, ["finance"]);
    assert!(!approval.approval_id.is_empty(), "{first:?}");
    assert_eq!(first.policy_ids, ["large-refund-needs-approval", "refund"]);
    // The identical call finds the same pending request.
    let again = ask(&mut c, refund(800, "s-a")).await;
    assert_eq!(again.approval.unwrap().approval_id, approval.approval_id);
    let pending = w.pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0]["tool"], "payments/refund");
    assert_eq!(pending[0]["arguments"]["amount"], 800);

    let with_id = |mut r: pb::AuthorizeToolRequest| {
        r.approval_id = approval.approval_id.clone();
        r
    };
    // Not yet approved: no.
    let early = ask(&mut c, with_id(refund(800, "s-a"))).await;
    denied_because(&early, "pending");

    // An agent runtime waits on its session for the verdict.
    let (mut watch, _current) = watch_state(&mut c, "s-a").await;
    let (code, out, err) = w.cli(&["approval", "approve", &approval.approval_id, "--by", "bob"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("granted"), "{out}");
    let verdict = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        verdict.cause,
        format!("approval {} granted by bob", approval.approval_id)
    );

    // Bound to its arguments and its agent.
    let other_args = ask(&mut c, with_id(refund(801, "s-a"))).await;
    denied_because(&other_args, "bound to other arguments");
    let mut by_other_agent = with_id(refund(800, "s-a"));
    by_other_agent.agent.as_mut().unwrap().id = "billing-bot".into();
    let other_agent = ask(&mut c, by_other_agent).await;
    denied_because(&other_agent, "bound to other agent");

    // ...and its session: a grant does not follow the call into another one.
    let other_session = ask(&mut c, with_id(refund(800, "s-elsewhere"))).await;
    denied_because(&other_session, "bound to other session");

    // The call it was granted for: once.
    let allowed = ask(&mut c, with_id(refund(800, "s-a"))).await;
    assert_eq!(outcome(&allowed), Outcome::Allow, "{allowed:?}");
    assert_eq!(
        allowed.policy_ids,
        ["large-refund-needs-approval", "refund"]
    );
    let replay = ask(&mut c, with_id(refund(800, "s-a"))).await;
    denied_because(&replay, "used");

    // The trail links it all: the first decision shows what happened next.
    // (records reach the control plane within a shipping interval)
    let show = |id: &str| {
        let (code, out, err) = w.cli(&["log", "show", id]);
        if code == 0 { out } else { err }
    };
    let mut story = String::new();
    eventually(
        "the approval story in the trail",
        Duration::from_secs(15),
        || {
            story = show(&first.decision_id);
            let done = story.contains("granted by bob")
                && story.contains("used by bob")
                && story.contains(&allowed.decision_id);
            async move { done }
        },
    )
    .await;
    assert!(story.contains(&allowed.decision_id), "{story}");
    let spent = show(&allowed.decision_id);
    assert!(spent.contains("approved_by bob"), "{spent}");

    // Approval is not permission: the retry is decided again, and a revoked
    // session is denied without spending the grant.
    let filed = ask(&mut c, refund(650, "s-a2")).await;
    let id = filed.approval.unwrap().approval_id;
    let (code, _, err) = w.cli(&["approval", "approve", &id, "--by", "bob"]);
    assert_eq!(code, 0, "{err}");
    // Retry only once the sidecar has applied the revocation: a retry that
    // raced ahead of the signal would rightly be allowed and spend the grant.
    let (mut watch, _current) = watch_state(&mut c, "s-a2").await;
    w.signal(&["session-revoked", "--session", "s-a2"]);
    // (the grant's own update may come first: it travels the same feed)
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(update) = watch.message().await.unwrap() {
            if update.state.is_some_and(|s| s.revoked) {
                return;
            }
        }
        panic!("the watch ended before the revocation");
    })
    .await
    .expect("the revocation within 10 s");
    let mut retry = refund(650, "s-a2");
    retry.approval_id = id.clone();
    denied_because(&ask(&mut c, retry).await, "revoked");
    let (code, out, err) = w.cli(&["approval", "list", "--state", "granted", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "still granted, not spent: {out}");
}

#[tokio::test]
async fn step_up_loop_completes_and_a_stale_sign_in_steps_up_again() {
    let w = World::start(&[]).await;
    let mut c = w.tools().await;
    let delete = |acr: &str, auth_time: i64| {
        call(
            "support-bot",
            "crm/delete_customer",
            json!({"customer_id": "alice"}),
            "s-b",
            acr,
            auth_time,
        )
    };
    let weak = ask(&mut c, delete("aal1", now() - 30)).await;
    assert_eq!(outcome(&weak), Outcome::StepUp, "{weak:?}");
    let step_up = weak.step_up.unwrap();
    assert_eq!(step_up.acr_values, ["aal2"]);
    assert_eq!(step_up.max_age, Some(600));

    let fresh = ask(&mut c, delete("aal2", now() - 5)).await;
    assert_eq!(outcome(&fresh), Outcome::Allow, "{fresh:?}");
    assert_eq!(fresh.policy_ids, ["delete-own-record"]);

    let stale = ask(&mut c, delete("aal2", now() - 3_600)).await;
    assert_eq!(outcome(&stale), Outcome::StepUp, "{stale:?}");
    let unknown_time = ask(&mut c, delete("aal2", 0)).await;
    assert_eq!(outcome(&unknown_time), Outcome::StepUp);
    let future = ask(&mut c, delete("aal2", now() + 86_400)).await;
    assert_eq!(
        outcome(&future),
        Outcome::StepUp,
        "a sign-in in the future is not fresh"
    );
}

#[tokio::test]
async fn a_risk_signal_turns_the_next_call_and_watch_session_reports_it() {
    let w = World::start(&[]).await;
    let mut c = w.tools().await;
    let before = ask(&mut c, refund(120, "s-c")).await;
    assert_eq!(outcome(&before), Outcome::Allow, "{before:?}");
    let read = ask(&mut c, read_own("s-c")).await;
    assert_eq!(outcome(&read), Outcome::Allow);

    let (mut watch, first) = watch_state(&mut c, "s-c").await;
    assert_eq!(first.state.unwrap().risk, "low");

    w.signal(&[
        "risk-level-changed",
        "high",
        "--session",
        "s-c",
        "--reason",
        "impossible travel",
    ]);

    let update = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let state = update.state.clone().unwrap();
    assert_eq!((state.risk.as_str(), state.revoked), ("high", false));
    assert!(
        update.cause.contains("risk_level_changed"),
        "{}",
        update.cause
    );
    assert_eq!(update.changed.len(), 1, "only the write turned: {update:?}");
    let turned = &update.changed[0];
    assert_eq!(turned.decision_id, before.decision_id);
    assert_eq!(
        (turned.previous, turned.current),
        (Outcome::Allow as i32, Outcome::Deny as i32)
    );

    let after = ask(&mut c, refund(120, "s-c")).await;
    assert_eq!(outcome(&after), Outcome::Deny, "{after:?}");
    assert_eq!(after.policy_ids, ["high-risk-no-writes"]);
    // Reads are untouched by risk; a revocation stops everything.
    assert_eq!(outcome(&ask(&mut c, read_own("s-c")).await), Outcome::Allow);
    w.signal(&["session-revoked", "--session", "s-c"]);
    let revoked = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(revoked.state.unwrap().revoked);
    let denied = ask(&mut c, read_own("s-c")).await;
    denied_because(&denied, "revoked");
    // `Check` of the same session sees the same state.
    let mut check = w.sidecar.client().await;
    let same = check
        .check(check_read_own("s-c"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&same), Outcome::Deny, "{same:?}");
    assert!(
        same.errors.iter().any(|e| e.contains("revoked")),
        "{same:?}"
    );
    // Other sessions are not affected.
    assert_eq!(
        outcome(&ask(&mut c, refund(120, "s-other")).await),
        Outcome::Allow
    );

    // A subject-wide signal reaches every session of that user.
    w.signal(&[
        "device-compliance-changed",
        "not-compliant",
        "--subject",
        "User::\"alice\"",
    ]);
    until(
        "the subject signal to apply",
        &c,
        read_own("s-other"),
        Outcome::Deny,
    )
    .await;
    w.signal(&[
        "device-compliance-changed",
        "compliant",
        "--subject",
        "User::\"alice\"",
    ]);

    // A user-wide revocation reaches the user's new sessions too, until it
    // is lifted; a revoked session cannot be lifted.
    w.signal(&["session-revoked", "--subject", "User::\"alice\""]);
    until(
        "the user's revocation",
        &c,
        read_own("s-new"),
        Outcome::Deny,
    )
    .await;
    w.signal(&["revocation-lifted", "--subject", "User::\"alice\""]);
    until(
        "the lifted revocation",
        &c,
        read_own("s-new"),
        Outcome::Allow,
    )
    .await;
    let (code, _, err) = w.cli(&["signal", "send", "revocation-lifted", "--session", "s-c"]);
    assert_ne!(code, 0);
    assert!(err.contains("stays revoked"), "{err}");
    assert_eq!(outcome(&ask(&mut c, read_own("s-c")).await), Outcome::Deny);

    // The decision's story names the signal that came after it.
    let mut story = String::new();
    eventually("the signal in the trail", Duration::from_secs(15), || {
        let (_, out, _) = w.cli(&["log", "show", &before.decision_id]);
        story = out;
        let done = story.contains("risk_level_changed high") && story.contains("session_revoked");
        async move { done }
    })
    .await;
}

#[tokio::test]
async fn a_control_plane_restart_keeps_pending_approvals_and_session_state() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut w = World::start(&["--addr", &addr]).await;
    let mut c = w.tools().await;
    let filed = ask(&mut c, refund(900, "s-d")).await;
    let id = filed.approval.unwrap().approval_id;
    w.signal(&["risk-level-changed", "medium", "--session", "s-d"]);
    w.signal(&["session-revoked", "--session", "s-gone"]);

    // SIGKILL and start again on the same database and address.
    let _ = w.cp.0.kill();
    let _ = w.cp.0.wait();
    w.cp = ControlPlane::start_with(&w.dir.join("cp.db"), &w.public, &["--addr", &addr]);
    let pending = w.pending();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["id"], id.as_str());
    let (code, _, err) = w.cli(&["approval", "approve", &id, "--by", "carol"]);
    assert_eq!(code, 0, "{err}");
    let mut retry = refund(900, "s-d");
    retry.approval_id = id.clone();
    let allowed = ask(&mut c, retry).await;
    assert_eq!(outcome(&allowed), Outcome::Allow, "{allowed:?}");
    // The running sidecar resumed its feed after the restart: a new signal applies.
    w.signal(&["risk-level-changed", "high", "--session", "s-d"]);
    until(
        "the resumed feed to apply a new signal",
        &c,
        refund(10, "s-d"),
        Outcome::Deny,
    )
    .await;

    // A sidecar started now learns the whole state from the feed.
    let fresh = World::sidecar(&w.cp.1, &w.public, &w.dir, "cache-2");
    let mut c2 = ToolAccessClient::new(fresh.channel().await);
    // It answers nothing (UNAVAILABLE) until its feed has caught up, so its
    // very first answer already knows the revocation.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        match c2.authorize_tool(read_own("s-gone")).await {
            Ok(r) => break r.into_inner(),
            Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new sidecar never answered"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(outcome(&first), Outcome::Deny, "{first:?}");
    assert_eq!(
        outcome(&ask(&mut c2, read_own("s-d")).await),
        Outcome::Allow
    );
    // The newest risk signal reached it too, and WatchSession shows it.
    let (_watch, first) = watch_state(&mut c2, "s-d").await;
    assert_eq!(first.state.unwrap().risk, "high");
    drop(fresh);

    // A control plane on a new database (recreated, not restarted) at the
    // same address: its feed positions start again, and the sidecar follows
    // it instead of skipping its first signals.
    let _ = w.cp.0.kill();
    let _ = w.cp.0.wait();
    w.cp = ControlPlane::start_with(&w.dir.join("cp-new.db"), &w.public, &["--addr", &addr]);
    w.signal(&["risk-level-changed", "high", "--session", "s-new"]);
    until(
        "the sidecar to follow the new feed",
        &c,
        refund(10, "s-new"),
        Outcome::Deny,
    )
    .await;
    // The old database's state is gone with it.
    assert_eq!(
        outcome(&ask(&mut c, read_own("s-gone")).await),
        Outcome::Allow
    );
}

#[tokio::test]
async fn bad_tool_calls_and_stale_approvals_are_refused_clearly() {
    let w = World::start(&["--approval-ttl-secs", "1"]).await;
    let mut c = w.tools().await;
    let code_and_message = |r: Result<tonic::Response<pb::CheckResponse>, tonic::Status>| {
        let s = r.unwrap_err();
        (s.code(), s.message().to_owned())
    };

    let mut unknown = refund(10, "s-e");
    unknown.tool = "wire_money".into();
    let (code, msg) = code_and_message(c.authorize_tool(unknown).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("unknown tool `payments/wire_money`"), "{msg}");

    let wrong_type = call(
        "support-bot",
        "payments/refund",
        json!({"order_id": "o-1", "amount": "lots", "currency": "EUR"}),
        "s-e",
        "aal1",
        now(),
    );
    let (code, msg) = code_and_message(c.authorize_tool(wrong_type).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("context.args.amount"), "{msg}");
    let missing = call(
        "support-bot",
        "payments/refund",
        json!({"amount": 5, "currency": "EUR"}),
        "s-e",
        "aal1",
        now(),
    );
    let (_, msg) = code_and_message(c.authorize_tool(missing).await);
    assert!(msg.contains("context.args.order_id"), "{msg}");
    let extra = call(
        "support-bot",
        "crm/get_customer",
        json!({"customer_id": "alice", "drop_table": true}),
        "s-e",
        "aal1",
        now(),
    );
    let (_, msg) = code_and_message(c.authorize_tool(extra).await);
    assert!(msg.contains("context.args.drop_table"), "{msg}");
    let huge = call(
        "support-bot",
        "payments/refund",
        json!({"order_id": "o-1", "amount": 5, "currency": "EUR", "reason": "x".repeat(20_000)}),
        "s-e",
        "aal1",
        now(),
    );
    let (code, msg) = code_and_message(c.authorize_tool(huge).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("limits.max_argument_bytes"), "{msg}");
    let mut spoofed = read_own("s-e");
    spoofed.on_behalf_of.as_mut().unwrap().properties =
        Some(structure(json!({"auth_age_secs": 0})));
    let (code, msg) = code_and_message(c.authorize_tool(spoofed).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("set by the sidecar"), "{msg}");

    // An unknown approval id, and one whose request expired before approval.
    let mut made_up = refund(700, "s-e");
    made_up.approval_id = "not-an-approval".into();
    let r = ask(&mut c, made_up).await;
    denied_because(&r, "unknown");
    let filed = ask(&mut c, refund(700, "s-e")).await;
    let id = filed.approval.unwrap().approval_id;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (code, _, err) = w.cli(&["approval", "approve", &id, "--by", "bob"]);
    assert_ne!(code, 0);
    assert!(err.contains("expired"), "{err}");
    let mut late = refund(700, "s-e");
    late.approval_id = id;
    let r = ask(&mut c, late).await;
    denied_because(&r, "expired");

    // Bad signals are refused by the control plane, with the reason.
    let (code, _, err) = w.cli(&[
        "signal",
        "send",
        "risk-level-changed",
        "extreme",
        "--session",
        "s",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("low, medium, high"), "{err}");
    let (code, _, err) = w.cli(&["signal", "send", "user-teleported", "--session", "s"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown signal type"), "{err}");
    let (code, _, _) = run(&[
        "signal",
        "send",
        "session-revoked",
        "--session",
        "s",
        "--control-plane",
        &w.cp.1,
        "--token",
        "wrong-token-0123456789",
    ]);
    assert_ne!(code, 0, "signals need the operator token");
}

#[tokio::test]
async fn list_allowed_tools_filters_a_tool_list() {
    let w = World::start(&[]).await;
    let mut c = w.tools().await;
    let listed = c
        .list_allowed_tools(pb::ListAllowedToolsRequest {
            agent: Some(pb::Agent {
                id: "support-bot".into(),
                properties: None,
            }),
            on_behalf_of: Some(pb::User {
                id: "alice".into(),
                acr: "aal1".into(),
                auth_time: now() - 60,
                properties: None,
            }),
            delegation: Vec::new(),
            server: "crm".into(),
            tools: vec![
                "get_customer".into(),
                "delete_customer".into(),
                "export_all".into(),
                "no_such_tool".into(),
            ],
            session_id: "s-f".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.allowed, ["get_customer", "delete_customer"]);
    let by_name = |n: &str| listed.tools.iter().find(|t| t.tool == n).unwrap().clone();
    let get = by_name("get_customer");
    assert_eq!(
        (get.outcome, get.depends_on_arguments),
        (Outcome::Allow as i32, true),
        "{get:?}"
    );
    let delete = by_name("delete_customer");
    assert_eq!(delete.outcome, Outcome::StepUp as i32, "{delete:?}");
    assert_eq!(by_name("export_all").outcome, Outcome::Deny as i32);
    let unknown = by_name("no_such_tool");
    assert!(unknown.error.contains("unknown tool"), "{unknown:?}");
    assert!(
        unknown.decision_id.is_empty(),
        "nothing decided: {unknown:?}"
    );

    // Every verdict is a decision in the trail, explainable from its id.
    let ids: HashSet<&str> = listed.tools[..3]
        .iter()
        .map(|t| t.decision_id.as_str())
        .collect();
    assert_eq!(ids.len(), 3, "one record per tool: {listed:?}");
    let mut shown = String::new();
    eventually("the listing in the trail", Duration::from_secs(15), || {
        let (code, out, _) = w.cli(&["log", "show", &delete.decision_id]);
        shown = out;
        async move { code == 0 }
    })
    .await;
    for part in ["list_allowed_tools", "crm/delete_customer", "STEP_UP"] {
        assert!(shown.contains(part), "{part}: {shown}");
    }
    // A verdict that depends on the arguments says so in its record (and
    // one that does not, does not), and listings are not what happened
    // next in the session.
    let export = by_name("export_all");
    assert!(!export.depends_on_arguments, "{export:?}");
    for verdict in [&get, &delete, &export] {
        // (each record reaches the control plane within a shipping interval)
        let mut shown = String::new();
        eventually("the verdict's record", Duration::from_secs(15), || {
            let (code, out, _) = w.cli(&["log", "show", &verdict.decision_id]);
            shown = out;
            async move { code == 0 }
        })
        .await;
        assert_eq!(
            shown.contains("holds for some arguments only"),
            verdict.depends_on_arguments,
            "{verdict:?}: {shown}"
        );
        assert!(!shown.contains("what happened next"), "{shown}");
    }
}

#[tokio::test]
async fn signals_for_unseen_sessions_apply_later_and_a_flood_stays_bounded() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let public = keyed(dir);
    let cp = ControlPlane::start(&dir.join("cp.db"), &public);
    push(&cp.1, dir);
    let sidecar = sidecar_with(
        &cp.1,
        &public,
        dir,
        "cache",
        "[sessions]\nmax_sessions = 50\n",
    );
    let c = ready_tools(&sidecar).await;

    let http = reqwest::Client::new();
    let send = |body: Value| {
        let http = http.clone();
        let url = format!("{}/signals", cp.1);
        async move {
            let r = http
                .post(url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body.to_string())
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        }
    };
    // A signal about a session nobody has used yet is kept...
    send(json!({"type": "risk_level_changed", "session_id": "s-future", "value": "high"})).await;
    until(
        "the signal for the unseen session",
        &c,
        refund(10, "s-future"),
        Outcome::Deny,
    )
    .await;

    // ...and a flood of them stays within the memory budget.
    for i in 0..400 {
        send(json!({"type": "risk_level_changed", "session_id": format!("flood-{i}"), "value": "medium"})).await;
    }
    send(json!({"type": "session_revoked", "session_id": "s-last"})).await;
    until(
        "the last signal after the flood",
        &c,
        read_own("s-last"),
        Outcome::Deny,
    )
    .await;
    let (_, metrics) = sidecar.get("/metrics").await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert!(value("arbiter_sessions_held") <= 100.0, "{metrics}");
    assert!(
        value("arbiter_sessions_evicted_total") >= 300.0,
        "{metrics}"
    );
    assert!(
        value("arbiter_session_signals_applied_total") >= 402.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_control_plane_with_a_sidecar_token_refuses_sidecars_without_it() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let public = keyed(dir);
    let cp = ControlPlane::start_with(
        &dir.join("cp.db"),
        &public,
        &["--sidecar-token", "sidecar-secret-0123456789"],
    );
    // A stranger cannot read the feed or file approvals.
    let channel = tonic::transport::Endpoint::from_shared(cp.1.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stranger = pb::sessions_client::SessionsClient::new(channel);
    let refused = stranger
        .follow(pb::FollowRequest {
            after: 0,
            instance_id: "x".into(),
            epoch: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let refused = stranger
        .request_approval(pb::ApprovalBinding::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // A sidecar with the token files approvals (local bundle, control plane
    // for journeys only); one without gets none.
    let bundle = example("agent");
    let with = Sidecar::start(
        &bundle,
        &[
            "--control-plane",
            &cp.1,
            "--sidecar-token",
            "sidecar-secret-0123456789",
        ],
    );
    let mut c = ToolAccessClient::new(with.channel().await);
    eventually("the sidecar to catch up", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move { c.authorize_tool(read_own("probe")).await.is_ok() }
    })
    .await;
    let filed = ask(&mut c, refund(900, "s-t")).await;
    assert!(!filed.approval.unwrap().approval_id.is_empty(), "filed");

    let config = dir.join("quick.toml");
    std::fs::write(&config, "[sessions]\nstartup_wait_ms = 200\n").unwrap();
    let without = Sidecar::start(&bundle, &["--control-plane", &cp.1, "--config", s(&config)]);
    // (it answers once it gives up waiting for the feed)
    let mut c = ready_tools(&without).await;
    let refused = ask(&mut c, refund(900, "s-t")).await;
    assert_eq!(outcome(&refused), Outcome::ApprovalRequired);
    assert!(refused.approval.as_ref().unwrap().approval_id.is_empty());
    assert!(
        refused.errors.iter().any(|e| e.contains("sidecar token")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn stale_signals_deny_decisions_that_name_a_session_when_configured() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let public = keyed(dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let db = dir.join("cp.db");
    let cp = ControlPlane::start_with(&db, &public, &["--addr", &addr]);
    push(&cp.1, dir);
    let sidecar = sidecar_with(
        &cp.1,
        &public,
        dir,
        "cache",
        "[sessions]\nmax_signal_age_secs = 1\nstale_signals = \"deny\"\nstartup_wait_ms = 60000\n",
    );
    let c = ready_tools(&sidecar).await;
    let mut c2 = c.clone();
    assert_eq!(
        outcome(&ask(&mut c2, read_own("s-1")).await),
        Outcome::Allow
    );

    // The control plane goes away: a second later, what signals could
    // change is denied (calls naming a session; tool calls, whose user may
    // have subject-wide signals); a Check without a session is decided as
    // before (no subject-wide signal is in use).
    drop(cp);
    until("signals to go stale", &c, read_own("s-1"), Outcome::Deny).await;
    denied_because(
        &ask(&mut c2, read_own("s-1")).await,
        "session signals are stale",
    );
    denied_because(
        &ask(&mut c2, read_own("")).await,
        "session signals are stale",
    );
    let plain = sidecar
        .client()
        .await
        .check(check_read_own(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&plain), Outcome::Allow, "{plain:?}");
    // (the metric is refreshed every second)
    eventually(
        "the age in the metrics",
        Duration::from_secs(10),
        || async {
            let (_, metrics) = sidecar.get("/metrics").await;
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("arbiter_session_signals_age_seconds "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|age| age >= 1.0)
        },
    )
    .await;

    // Back: once the feed is heard again, sessions are decided again.
    let _cp = ControlPlane::start_with(&db, &public, &["--addr", &addr]);
    until("the feed to be back", &c, read_own("s-1"), Outcome::Allow).await;
}
