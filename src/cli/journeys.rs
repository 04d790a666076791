//! `arbiter signal send` and `arbiter approval list|approve|deny`: operators
//! (or an identity provider's hook) acting on journeys at the control plane.

use std::fmt::Write;

use serde_json::{Value, json};

use super::bundle::{Failure, admin, refused, runtime};
use super::log::Source;

fn call(src: &Source, path: &str, body: Option<Value>) -> Result<Value, Failure> {
    let client = admin(src.url, src.token, src.ca)?;
    let rt = runtime()?;
    let text = match body {
        Some(b) => rt.block_on(client.post(path, b.to_string())),
        None => rt.block_on(client.get(path)),
    }
    .map_err(refused)?;
    serde_json::from_str(&text).map_err(|e| {
        Failure::data(format!(
            "the control plane answered something that is not JSON: {e}"
        ))
    })
}

/// What `signal send` was asked to send.
pub struct SignalArgs<'a> {
    pub kind: &'a str,
    pub session: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub value: Option<&'a str>,
    pub reason: Option<&'a str>,
}

pub fn send_signal(src: &Source, s: &SignalArgs) -> Result<String, Failure> {
    // The CLI spells types with dashes or underscores alike.
    let kind = s.kind.replace('-', "_");
    let mut body = json!({ "type": kind });
    if let Some(v) = s.session {
        body["session_id"] = json!(v);
    }
    if let Some(v) = s.subject {
        body["subject"] = json!(v);
    }
    if let Some(v) = s.value {
        body["value"] = json!(v);
    }
    if let Some(v) = s.reason {
        body["reason"] = json!(v);
    }
    let v = call(src, "/signals", Some(body))?;
    Ok(format!(
        "signal {} accepted (feed position {})\n",
        v["event_id"].as_str().unwrap_or("?"),
        v["position"]
    ))
}

pub fn list_approvals(src: &Source, state: Option<&str>, as_json: bool) -> Result<String, Failure> {
    let path = match state {
        Some(s) => format!("/approvals?state={s}"),
        None => "/approvals".into(),
    };
    let v = call(src, &path, None)?;
    let list = v["approvals"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    for a in &list {
        if as_json {
            let _ = writeln!(out, "{a}");
            continue;
        }
        let _ = writeln!(
            out,
            "{}  {:<8} {} for {} via {}  args {}  groups {}  expires {}{}",
            a["id"].as_str().unwrap_or("?"),
            a["state"].as_str().unwrap_or("?"),
            a["tool"].as_str().unwrap_or("?"),
            a["subject"].as_str().unwrap_or("?"),
            a["agent"].as_str().unwrap_or("?"),
            a["arguments"],
            a["approver_groups"],
            a["expires_at"].as_str().unwrap_or("?"),
            a["by"]
                .as_str()
                .map(|b| format!("  by {b}"))
                .unwrap_or_default(),
        );
    }
    if list.is_empty() && !as_json {
        out.push_str("no approval requests\n");
    }
    Ok(out)
}

pub fn decide_approval(src: &Source, id: &str, grant: bool, by: &str) -> Result<String, Failure> {
    let verb = if grant { "approve" } else { "deny" };
    let v = call(
        src,
        &format!("/approvals/{id}/{verb}"),
        Some(json!({ "by": by })),
    )?;
    Ok(format!(
        "approval {} is {} (by {})\n",
        v["id"].as_str().unwrap_or(id),
        v["state"].as_str().unwrap_or("?"),
        v["by"].as_str().unwrap_or(by)
    ))
}
