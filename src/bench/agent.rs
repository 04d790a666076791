//! `arbiter bench --agent-seconds N`: what tool access costs and how fast a
//! session signal takes effect.
//!
//! 1. The `agent` example bundle answering `AuthorizeTool`, against `Check`
//!    of the very same Cedar request (so the ratio is the adapter's cost:
//!    building the context, the argument digest, the user's auth age).
//! 2. Under `AuthorizeTool` load, signals flip a session's risk between
//!    `high` and `low` through the control plane's HTTP API; a prober asks
//!    for a refund in that session until the answer turns. The time from
//!    sending the signal to the first turned answer is recorded.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use super::{BenchArgs, Caller, HEADER, connect, cpu_count, drive, row, sidecar_addr, spawn};
use crate::api::json::to_struct;
use crate::api::pb::v1 as pb;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn tool_call(
    i: usize,
    tool: &str,
    args: serde_json::Value,
    session: &str,
) -> pb::AuthorizeToolRequest {
    let (server, name) = tool.split_once('/').unwrap_or(("", tool));
    pb::AuthorizeToolRequest {
        agent: Some(pb::Agent {
            id: "support-bot".into(),
            properties: None,
        }),
        on_behalf_of: Some(pb::User {
            id: format!("user-{i}"),
            acr: "aal1".into(),
            auth_time: now() - 60,
            properties: None,
        }),
        delegation: Vec::new(),
        server: server.into(),
        tool: name.into(),
        arguments: args.as_object().map(to_struct),
        session_id: session.into(),
        approval_id: String::new(),
    }
}

/// `AuthorizeTool` reads of the user's own record, and the same requests as
/// `Check` (what the sidecar builds from them).
fn requests(n: usize) -> (Vec<pb::AuthorizeToolRequest>, Vec<pb::CheckRequest>) {
    let mut tools = Vec::with_capacity(n);
    let mut checks = Vec::with_capacity(n);
    for i in 0..n {
        let session = format!("bench-{i}");
        let user = format!("user-{i}");
        tools.push(tool_call(
            i,
            "crm/get_customer",
            json!({"customer_id": user}),
            &session,
        ));
        let context = json!({
            "args": {"customer_id": user},
            "user": {"id": user, "acr": "aal1", "auth_time": now() - 60, "auth_age_secs": 60},
            "delegation": [],
        });
        checks.push(pb::CheckRequest {
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
            context: context.as_object().map(to_struct),
            session_id: session,
        });
    }
    (tools, checks)
}

pub(super) async fn run(args: &BenchArgs, tmp: &Path, duration: Duration) -> Result<(), String> {
    // The control plane runs beside the load generator, at normal
    // priority: the signal path through it is what is measured.
    let (cp, cp_url) = super::decision_log_sink(tmp, tmp, true)?;
    let threads = if args.server_cpu == "none" {
        "0".to_owned()
    } else {
        cpu_count(&args.server_cpu).to_string()
    };
    // Cache and trail off: both APIs pay for the decision alone.
    let config = tmp.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nworker_threads = {threads}\n[cache]\nmax_entries = 0\n[decision_log]\nenabled = false\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let bundle = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agent");
    let sidecar = spawn(
        &args.server_cpu,
        &super::serve_command(&[
            "--bundle".into(),
            bundle.display().to_string(),
            "--control-plane".into(),
            cp_url.clone(),
            "--config".into(),
            config.display().to_string(),
        ]),
        sidecar_addr,
        true,
    )?;
    let grpc_addr = sidecar
        .addr
        .split('|')
        .next()
        .unwrap_or_default()
        .to_owned();
    let channel = connect(&grpc_addr).await?;
    let (tools, checks) = requests(args.distinct.max(1));
    let warmup = Duration::from_secs_f64(args.warmup);
    let run_for = Duration::from_secs_f64(args.duration);
    let check = Caller::Sidecar(
        pb::authorizer_client::AuthorizerClient::new(channel.clone()),
        Arc::new(checks),
    );
    let tool = Caller::Tool(
        pb::tool_access_client::ToolAccessClient::new(channel.clone()),
        Arc::new(tools),
    );
    println!("\n== agent bundle: AuthorizeTool vs Check of the same Cedar request");
    println!("{HEADER}");
    for c in args.callers_or_default() {
        let by_check = drive(check.clone(), sidecar.pid(), c, warmup, run_for).await;
        println!("{}", row("Check (same request)", c, &by_check, None));
        let by_tool = drive(tool.clone(), sidecar.pid(), c, warmup, run_for).await;
        println!("{}", row("AuthorizeTool", c, &by_tool, Some(&by_check)));
        println!("  (cpu/echo and p50/echo columns of AuthorizeTool are its ratios to Check)");
    }

    // Signal → decision, under load.
    let c = args.callers_or_default().last().copied().unwrap_or(8);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (tool, stop, pid) = (tool.clone(), stop.clone(), sidecar.pid());
        tokio::spawn(async move {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                drive(
                    tool.clone(),
                    pid,
                    c,
                    Duration::ZERO,
                    Duration::from_millis(500),
                )
                .await;
                rounds += 1;
            }
            rounds
        })
    };
    let admin = crate::controlplane::AdminClient::new(
        &cp_url,
        super::BENCH_TOKEN,
        Duration::from_secs(10),
        None,
    )
    .map_err(|e| e.to_string())?;
    let mut prober = pb::tool_access_client::ToolAccessClient::new(connect(&grpc_addr).await?);
    let probe = tool_call(
        0,
        "payments/refund",
        json!({"order_id": "o-1", "amount": 120, "currency": "EUR"}),
        "bench-signal",
    );
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let (mut signals, mut timeouts) = (0u64, 0u64);
    let end = Instant::now() + duration;
    let mut high = true;
    while Instant::now() < end {
        let want = if high {
            pb::Outcome::Deny
        } else {
            pb::Outcome::Allow
        } as i32;
        let body = json!({
            "type": "risk_level_changed",
            "session_id": "bench-signal",
            "value": if high { "high" } else { "low" },
        });
        let sent = Instant::now();
        admin
            .post("/signals", body.to_string())
            .await
            .map_err(|e| format!("signal refused: {e}"))?;
        let mut turned = false;
        while sent.elapsed() < Duration::from_secs(2) {
            let r = prober
                .authorize_tool(probe.clone())
                .await
                .map_err(|e| e.to_string())?;
            if r.get_ref().outcome == want {
                turned = true;
                break;
            }
        }
        if turned {
            let _ = hist.record(sent.elapsed().as_nanos() as u64);
        } else {
            timeouts += 1;
        }
        signals += 1;
        high = !high;
        // Signals a few times a second, not back to back.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1e6;
    println!(
        "\n== signal → decision, under AuthorizeTool load (C={c}), {} s",
        duration.as_secs()
    );
    println!(
        "  {signals} signals (risk high/low via POST /signals), turned within 2 s: {}, not: {timeouts}",
        hist.len()
    );
    println!(
        "  time from sending the signal to the first changed answer: p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        hist.max() as f64 / 1e6
    );
    drop(sidecar);
    drop(cp);
    Ok(())
}
