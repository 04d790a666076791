//! `arbiter log show|query|verify`: asking the decision trail, on the
//! control plane or in an exported NDJSON file.

use std::fmt::Write;
use std::path::Path;

use serde_json::Value;

use super::bundle::{Failure, admin, refused, runtime};
use crate::controlplane::trail::Filter;
use crate::decision_log::{chain, spool};

/// Where the trail is read from.
pub struct Source<'a> {
    pub url: &'a str,
    pub token: &'a str,
    pub ca: Option<&'a Path>,
}

fn get(src: &Source, path: &str) -> Result<Value, Failure> {
    let client = admin(src.url, src.token, src.ca)?;
    let text = runtime()?.block_on(client.get(path)).map_err(refused)?;
    serde_json::from_str(&text).map_err(|e| {
        Failure::data(format!(
            "the control plane answered something that is not JSON: {e}"
        ))
    })
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes().fold(String::new(), |mut s, b| {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            let _ = write!(s, "%{b:02X}");
        }
        s
    })
}

/// `log show ID`: the whole record and its deciding policies.
pub fn show(src: &Source, id: &str, as_json: bool) -> Result<String, Failure> {
    let v = get(src, &format!("/decisions/{}", encode(id)))?;
    if as_json {
        return Ok(format!("{v:#}\n"));
    }
    let r = &v["record"];
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(out, "decision   {}", s(&r["decision_id"]));
    let _ = writeln!(out, "time       {}", s(&r["time"]));
    let _ = writeln!(out, "outcome    {}", s(&r["outcome"]));
    let _ = writeln!(
        out,
        "bundle     {} revision {}",
        s(&r["bundle"]),
        s(&r["revision"])
    );
    let _ = writeln!(out, "latency    {} µs", s(&r["latency_us"]));
    let _ = writeln!(
        out,
        "api        {}   trace {}",
        s(&r["kind"]),
        s(&r["trace_id"])
    );
    let _ = writeln!(out, "sidecar    {} seq {}", s(&v["instance"]), s(&v["seq"]));
    if v["forked"] == Value::Bool(true) {
        let _ = writeln!(
            out,
            "chain      FORKED: kept apart from the sidecar's chain, whose seq {} it repeats (its spool lost records it had shipped)",
            s(&v["seq"])
        );
    }
    let _ = writeln!(out, "request    {}", r["request"]);
    for key in ["step_up", "approver_groups", "obligations", "errors"] {
        let field = &r[key];
        let empty = field.is_null() || field.as_array().is_some_and(Vec::is_empty);
        if !empty {
            let _ = writeln!(out, "{key:<10} {field}");
        }
    }
    for key in ["session_id", "approval_id", "approved_by", "approval_error"] {
        if let Some(field) = r[key].as_str() {
            let _ = writeln!(out, "{key:<10} {field}");
        }
    }
    if r["depends_on_arguments"] == true {
        let _ = writeln!(
            out,
            "listing    the outcome holds for some arguments only (decided without them)"
        );
    }
    let policies = v["policies"].as_array().cloned().unwrap_or_default();
    if policies.is_empty() {
        let _ = writeln!(out, "policies   (none matched: default deny)");
    }
    for p in policies {
        let _ = writeln!(out, "policy     {}", s(&p["id"]));
        match p["text"].as_str() {
            Some(text) => {
                for line in text.lines() {
                    let _ = writeln!(out, "    {line}");
                }
            }
            None => {
                let _ = writeln!(
                    out,
                    "    (text unavailable: revision not stored on this control plane)"
                );
            }
        }
    }
    let next = v["followed_by"].as_array().cloned().unwrap_or_default();
    if !next.is_empty() {
        let _ = writeln!(out, "what happened next:");
    }
    for n in next {
        let _ = writeln!(out, "  {}", next_line(&n["record"]));
    }
    Ok(out)
}

/// One linked record on one line: a signal, an approval change, a decision.
fn next_line(r: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let time = s(&r["time"]);
    match r["kind"].as_str() {
        Some("signal") => {
            let sig = &r["signal"];
            format!(
                "{time}  signal {} {} on {} {} ({})",
                s(&sig["type"]),
                s(&sig["value"]),
                s(&sig["target_kind"]),
                s(&sig["target"]),
                s(&r["decision_id"])
            )
        }
        Some("approval") => {
            let a = &r["approval"];
            let by = a["by"]
                .as_str()
                .map(|b| format!(" by {b}"))
                .unwrap_or_default();
            format!(
                "{time}  approval {} {}{by}",
                s(&r["approval_id"]),
                s(&a["state"])
            )
        }
        _ => format!(
            "{time}  decision {} {} {}{}",
            s(&r["decision_id"]),
            s(&r["outcome"]),
            s(&r["request"]["action"]["name"]),
            r["approved_by"]
                .as_str()
                .map(|b| format!(" (approved by {b})"))
                .unwrap_or_default()
        ),
    }
}

/// `log query`: matching records, one line each (or JSON lines).
pub fn query(src: &Source, f: &Filter, as_json: bool) -> Result<String, Failure> {
    let mut q = Vec::new();
    for (k, v) in [
        ("since", &f.since),
        ("until", &f.until),
        ("instance", &f.instance),
        ("subject", &f.subject),
        ("subject_type", &f.subject_type),
        ("resource", &f.resource),
        ("resource_type", &f.resource_type),
        ("outcome", &f.outcome),
        ("policy", &f.policy),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", encode(v)));
        }
    }
    // JSON lines are the records themselves, with nowhere to mark one kept
    // apart: they hold the chains' records unless `--forked` asks for those.
    let forked = match (as_json, f.forked) {
        (true, None) => Some(false),
        (_, forked) => forked,
    };
    if let Some(forked) = forked {
        q.push(format!("forked={forked}"));
    }
    if let Some(l) = f.limit {
        q.push(format!("limit={l}"));
    }
    let v = get(src, &format!("/decisions?{}", q.join("&")))?;
    let mut out = String::new();
    for item in v["records"].as_array().into_iter().flatten() {
        let r = &item["record"];
        if as_json {
            let _ = writeln!(out, "{r}");
            continue;
        }
        let entity = |e: &Value| {
            format!(
                "{}:{}",
                e["type"].as_str().unwrap_or("?"),
                e["id"].as_str().unwrap_or("?")
            )
        };
        let _ = writeln!(
            out,
            "{}  {}  {:<17} {} {} {}  [{}]{}",
            r["time"].as_str().unwrap_or("-"),
            r["decision_id"].as_str().unwrap_or("-"),
            r["outcome"]
                .as_str()
                .unwrap_or(r["kind"].as_str().unwrap_or("-")),
            entity(&r["request"]["subject"]),
            r["request"]["action"]["name"].as_str().unwrap_or("?"),
            entity(&r["request"]["resource"]),
            r["policy_ids"]
                .as_array()
                .map(|p| p
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            match item["forked"] == Value::Bool(true) {
                true => format!("  FORKED (seq {} repeated)", item["seq"]),
                false => String::new(),
            },
        );
    }
    Ok(out)
}

/// `log verify`: the chain on the control plane (every instance, or one),
/// or in a file. Err (exit 1) names the first break.
pub fn verify_remote(src: &Source, instance: Option<&str>) -> Result<String, Failure> {
    let path = match instance {
        Some(i) => format!("/decisions/verify?instance={}", encode(i)),
        None => "/decisions/verify".to_owned(),
    };
    let v = get(src, &path)?;
    let mut out = String::new();
    let mut broken = false;
    let reports = v["instances"].as_array().cloned().unwrap_or_default();
    if reports.is_empty()
        || reports
            .iter()
            .all(|r| r["last_seq"] == 0 && r["first_break"].is_null())
    {
        return Err(Failure {
            message: "no decision records stored for that".into(),
            code: 1,
        });
    }
    for r in reports {
        let inst = r["instance"].as_str().unwrap_or("?");
        match r["first_break"].as_object() {
            None => {
                let _ = writeln!(
                    out,
                    "ok      instance {inst}: {} records, seq {}..={}, chain intact",
                    r["records"],
                    r["after_seq"].as_u64().unwrap_or(0) + 1,
                    r["last_seq"]
                );
                if let Some(head) = r["head"].as_str() {
                    // Kept apart from an export, it shows records cut
                    // from the export's end (`--file F --head`).
                    let _ = writeln!(out, "        head {head}");
                }
            }
            Some(b) => {
                broken = true;
                let _ = writeln!(
                    out,
                    "BROKEN  instance {inst}: first break at seq {}: {}",
                    b["seq"],
                    b["reason"].as_str().unwrap_or("")
                );
            }
        }
        for f in r["flagged_on_receipt"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "        flagged on receipt: seq {}: {}",
                f["seq"],
                f["reason"].as_str().unwrap_or("")
            );
        }
        if let Some(n) = r["forked_records"].as_u64().filter(|n| *n > 0) {
            let _ = writeln!(
                out,
                "        {n} records kept apart as forked, not on the chain: arbiter log query --forked --instance {inst}"
            );
        }
    }
    if broken {
        Err(Failure {
            message: out.trim_end().to_owned(),
            code: 1,
        })
    } else {
        Ok(out)
    }
}

/// `log verify --file`: an NDJSON export, a spool segment, or a spool
/// directory (its segments in order, as the sidecar would ship them).
/// With `head` (`SEQ:HASH`), `instance`'s chain (the file's one chain if
/// not named) must reach it.
pub fn verify_file(
    path: &Path,
    instance: Option<&str>,
    head: Option<&str>,
) -> Result<String, Failure> {
    let head = head
        .map(chain::parse_head)
        .transpose()
        .map_err(Failure::usage)?;
    let mut out = String::new();
    let (v, unchecked) = if path.is_dir() {
        let (v, unchecked, segments) = verify_spool(path, head.map(|h| h.0))?;
        let _ = writeln!(out, "spool   {segments} segments");
        (v, unchecked)
    } else {
        let bytes = std::fs::read(path).map_err(|e| unreadable(path, &e))?;
        let mut v = chain::Verifier::default();
        if let Some((seq, _)) = head {
            v.watch(seq);
        }
        // A segment may be the newest, written over an older one.
        let segment = spool::segment_first_seq(path);
        let unchecked = chain::verify_into(&mut v, &bytes, segment).map_err(broken)?;
        (v, unchecked)
    };
    let _ = writeln!(out, "ok      {} records, chain intact", v.records);
    if let Some(head) = head {
        let instance = match instance {
            Some(i) => i.to_owned(),
            None => one_instance(&v)?,
        };
        let after = v.holds_head(&instance, head).map_err(broken)?;
        let _ = writeln!(
            out,
            "ok      instance {instance} reaches the head at seq {}{}",
            head.0,
            match after {
                0 => String::new(),
                n => format!(" ({n} records after it)"),
            }
        );
    }
    for (instance, seq) in v.partial {
        let _ = writeln!(
            out,
            "note    instance {instance} starts at seq {seq}: its first link is not checkable here (its predecessor is not in what was read)"
        );
    }
    if unchecked > 0 {
        let _ = writeln!(
            out,
            "note    the last {unchecked} bytes of the newest segment are not checked: a line being written, or the older records of a reused segment"
        );
    }
    Ok(out)
}

/// The one chain a file holds, for `--head` without `--instance`.
fn one_instance(v: &chain::Verifier) -> Result<String, Failure> {
    let mut all: Vec<&str> = v.positions().map(|(i, _)| i).collect();
    all.sort_unstable();
    match all.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Err(Failure {
            message: "BROKEN  no records were read, so the head is not in them".into(),
            code: 1,
        }),
        many => Err(Failure::usage(format!(
            "the file holds the chains of {} instances ({}): name the head's with --instance",
            many.len(),
            many.join(", ")
        ))),
    }
}

fn broken(b: chain::Break) -> Failure {
    Failure {
        message: format!("BROKEN  {b}"),
        code: 1,
    }
}

fn unreadable(path: &Path, e: &std::io::Error) -> Failure {
    Failure::io(format!("cannot read `{}`: {e}", path.display()))
}

/// A spool's segments through one verifier, the newest allowed its older
/// bytes. A segment released while this reads (renamed for reuse) means
/// listing again. Returns the chain, the unchecked bytes and the segments.
fn verify_spool(
    dir: &Path,
    watch: Option<u64>,
) -> Result<(chain::Verifier, usize, usize), Failure> {
    let mut attempts = 0;
    'listing: loop {
        attempts += 1;
        let segments = spool::segments(dir).map_err(|e| unreadable(dir, &e))?;
        if segments.is_empty() {
            return Err(Failure::io(format!(
                "`{}` holds no spool segments (NNN.ndjson)",
                dir.display()
            )));
        }
        let mut v = chain::Verifier::default();
        if let Some(seq) = watch {
            v.watch(seq);
        }
        let mut unchecked = 0;
        for (i, (first, path)) in segments.iter().enumerate() {
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 5 => {
                    continue 'listing;
                }
                Err(e) => return Err(unreadable(path, &e)),
            };
            let newest = (i + 1 == segments.len()).then_some(*first);
            unchecked = chain::verify_into(&mut v, &bytes, newest).map_err(broken)?;
        }
        return Ok((v, unchecked, segments.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` chained lines of `instance`, as an export holds them.
    fn lines(instance: &str, n: u64) -> Vec<u8> {
        let (mut out, mut prev) = (Vec::new(), chain::GENESIS);
        for seq in 1..=n {
            let body = format!(r#"{{"instance":"{instance}","seq":{seq}}}"#);
            prev = chain::append_next(&mut out, &prev, |o| o.extend_from_slice(body.as_bytes()));
        }
        out
    }

    #[test]
    fn a_head_in_a_file_of_two_chains_needs_its_instance() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("two.ndjson");
        let mut both = lines("a", 3);
        both.extend(lines("b", 2));
        std::fs::write(&file, &both).expect("write");
        let mut v = chain::Verifier::default();
        chain::verify_into(&mut v, &lines("b", 2), None).expect("intact");
        let head = v.head("b").map(|h| chain::format_head(2, &h)).expect("b");

        let e = verify_file(&file, None, Some(&head)).expect_err("which instance?");
        assert_eq!(e.code, 64);
        assert!(e.message.contains("2 instances (a, b)"), "{}", e.message);
        let ok = verify_file(&file, Some("b"), Some(&head)).expect("b reaches it");
        assert!(ok.contains("instance b reaches the head at seq 2"), "{ok}");
        // a's chain stands at seq 3 with another hash there.
        let e = verify_file(&file, Some("a"), Some(&head)).expect_err("not a's");
        assert!(
            e.message.contains("not the one the head names"),
            "{}",
            e.message
        );
    }
}
