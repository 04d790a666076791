//! Journey-time state at the control plane: session signals and approval
//! requests (SQLite, in the control plane's database), the feed that pushes
//! their changes to sidecars, and the trail records of every change.
//!
//! The feed is compacted: each signal target (a session or a subject) and
//! each approval is one row carrying the feed position (`seq`) of its last
//! change, so "every change after N" is a range scan, a sidecar that
//! reconnects resumes where it stopped, and one that starts fresh (position
//! 0) receives the whole current state — nothing grows with the number of
//! signals, only with the number of targets.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::trail::{DecisionStore, Incoming, TrailError, append_in, head_in};
use crate::api::pb::v1::{self as pb, sessions_server::Sessions as SessionsApi};
use crate::decision_log::chain;
use crate::decision_log::time::{format_micros, now_micros};
use crate::sessions::RISK_LEVELS;

/// The chain the control plane's own records (signals, approval changes) go in.
pub const INSTANCE: &str = "control-plane";

/// Signal types (OpenID CAEP events, in snake case).
pub const SIGNAL_TYPES: [&str; 5] = [
    "session_revoked",
    "revocation_lifted",
    "risk_level_changed",
    "assurance_level_changed",
    "device_compliance_changed",
];

#[derive(Debug, thiserror::Error)]
pub enum JourneyError {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("cannot record it in the trail: {0}")]
    Trail(String),
}

/// A signal as an operator or an identity provider sends it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signal {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub session_id: Option<String>,
    /// `Type::"id"`, e.g. `User::"alice"`.
    #[serde(default)]
    pub subject: Option<String>,
    /// The new level: risk `low|medium|high`, assurance e.g. `aal2`, device
    /// `compliant|not_compliant`; nothing for `session_revoked`.
    #[serde(default)]
    pub value: Option<String>,
    /// Free text kept in the trail record.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One approval request as approvers see it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Approval {
    pub id: String,
    /// `pending`, `granted`, `denied`, `used` or `expired`.
    pub state: String,
    pub subject: String,
    pub agent: String,
    pub tool: String,
    pub arguments_digest: String,
    pub arguments: Value,
    pub approver_groups: Vec<String>,
    pub session_id: String,
    pub decision_id: String,
    pub created_at: String,
    pub expires_at: String,
    pub by: Option<String>,
    pub used_by_decision: Option<String>,
}

pub struct Journeys {
    conn: Mutex<Connection>,
    decisions: Arc<DecisionStore>,
    /// Newest feed position; followers wait on it.
    latest: watch::Sender<u64>,
    approval_ttl: Duration,
    /// This database's feed identity (see `FeedEvent.epoch`).
    epoch: String,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS feed_position (
      id INTEGER PRIMARY KEY CHECK (id = 1),
      seq INTEGER NOT NULL
    );
    INSERT OR IGNORE INTO feed_position (id, seq) VALUES (1, 0);
    CREATE TABLE IF NOT EXISTS feed_epoch (
      id INTEGER PRIMARY KEY CHECK (id = 1),
      epoch TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS session_signals (
      target_kind TEXT NOT NULL,
      target TEXT NOT NULL,
      revoked INTEGER NOT NULL,
      risk TEXT NOT NULL,
      assurance TEXT NOT NULL,
      device_compliant INTEGER NOT NULL,
      last_event TEXT NOT NULL,
      time TEXT NOT NULL,
      event_id TEXT NOT NULL,
      seq INTEGER NOT NULL,
      PRIMARY KEY (target_kind, target)
    );
    CREATE INDEX IF NOT EXISTS session_signals_by_seq ON session_signals (seq);
    CREATE TABLE IF NOT EXISTS approvals (
      id TEXT PRIMARY KEY,
      subject TEXT NOT NULL,
      agent TEXT NOT NULL,
      tool TEXT NOT NULL,
      digest TEXT NOT NULL,
      groups TEXT NOT NULL,
      session_id TEXT NOT NULL,
      decision_id TEXT NOT NULL,
      arguments TEXT NOT NULL,
      state TEXT NOT NULL,
      by TEXT,
      used_by_decision TEXT,
      created_us INTEGER NOT NULL,
      expires_us INTEGER NOT NULL,
      seq INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS approvals_by_seq ON approvals (seq);
    CREATE INDEX IF NOT EXISTS approvals_by_binding ON approvals (subject, agent, tool, digest);
";

/// Longest target, value or approver name accepted.
const MAX_FIELD: usize = 1024;

impl Journeys {
    pub fn open(
        path: &Path,
        decisions: Arc<DecisionStore>,
        approval_ttl: Duration,
    ) -> Result<Self, JourneyError> {
        let conn = Connection::open(path)?;
        // `synchronous = FULL` as the decision store has it: trail records
        // are committed on this connection too.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
        )?;
        conn.execute_batch(SCHEMA)?;
        let seq: i64 = conn.query_row("SELECT seq FROM feed_position", [], |r| r.get(0))?;
        conn.execute(
            "INSERT OR IGNORE INTO feed_epoch (id, epoch) VALUES (1, ?1)",
            params![uuid::Uuid::new_v4().to_string()],
        )?;
        let epoch: String = conn.query_row("SELECT epoch FROM feed_epoch", [], |r| r.get(0))?;
        Ok(Self {
            conn: Mutex::new(conn),
            decisions,
            latest: watch::Sender::new(seq as u64),
            approval_ttl,
            epoch,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// Applies a signal to its target's state; returns the event id and the
    /// feed position.
    pub fn signal(&self, s: &Signal) -> Result<(String, u64), JourneyError> {
        let bad = |m: String| Err(JourneyError::Bad(m));
        if !SIGNAL_TYPES.contains(&s.kind.as_str()) {
            return bad(format!(
                "unknown signal type `{}` (one of: {})",
                s.kind,
                SIGNAL_TYPES.join(", ")
            ));
        }
        let (target_kind, target) = match (&s.session_id, &s.subject) {
            (Some(id), None) if !id.is_empty() => ("session", id.clone()),
            (None, Some(subject)) if is_subject_key(subject) => ("subject", subject.clone()),
            (None, Some(subject)) => {
                return bad(format!(
                    "subject `{subject}` must be written `Type::\"id\"`, e.g. `User::\"alice\"`"
                ));
            }
            _ => return bad("give exactly one of `session_id` and `subject`".into()),
        };
        if target.len() > MAX_FIELD
            || s.value.as_ref().is_some_and(|v| v.len() > MAX_FIELD)
            || s.reason.as_ref().is_some_and(|v| v.len() > MAX_FIELD)
        {
            return bad(format!("fields are limited to {MAX_FIELD} bytes"));
        }
        let value = s.value.as_deref().unwrap_or("");
        let event_id = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext)).to_string();
        let time = format_micros(now_micros());
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current: Option<(bool, String, String, bool)> = tx
            .query_row(
                "SELECT revoked, risk, assurance, device_compliant FROM session_signals
                 WHERE target_kind = ?1 AND target = ?2",
                params![target_kind, target],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let (mut revoked, mut risk, mut assurance, mut compliant) =
            current.unwrap_or((false, "low".into(), String::new(), true));
        match s.kind.as_str() {
            "session_revoked" => revoked = true,
            // Undoes a subject-wide revocation (after a password reset, the
            // user's new sessions may be allowed again). A revoked session
            // stays revoked: its id may be in the wrong hands.
            // Only what is revoked can be lifted: a lift of nothing would
            // put a subject state on every sidecar for no reason.
            "revocation_lifted" if target_kind == "subject" && revoked => revoked = false,
            "revocation_lifted" if target_kind == "subject" => {
                return Err(JourneyError::Conflict(format!(
                    "{target} is not revoked: nothing to lift"
                )));
            }
            "revocation_lifted" => {
                return bad(
                    "`revocation_lifted` is for a subject; a revoked session stays revoked (start a new one)"
                        .into(),
                );
            }
            "risk_level_changed" => {
                if !RISK_LEVELS.contains(&value) {
                    return bad(format!(
                        "`risk_level_changed` needs a value of {}",
                        RISK_LEVELS.join(", ")
                    ));
                }
                risk = value.to_owned();
            }
            "assurance_level_changed" => {
                if value.is_empty() {
                    return bad("`assurance_level_changed` needs a value, e.g. `aal2`".into());
                }
                assurance = value.to_owned();
            }
            _ => {
                compliant = match value {
                    "compliant" => true,
                    "not_compliant" => false,
                    _ => {
                        return bad(
                            "`device_compliance_changed` needs `compliant` or `not_compliant`"
                                .into(),
                        );
                    }
                }
            }
        }
        let seq = next_seq(&tx)?;
        tx.execute(
            "INSERT INTO session_signals (target_kind, target, revoked, risk, assurance,
               device_compliant, last_event, time, event_id, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (target_kind, target) DO UPDATE SET revoked = ?3, risk = ?4,
               assurance = ?5, device_compliant = ?6, last_event = ?7, time = ?8,
               event_id = ?9, seq = ?10",
            params![
                target_kind,
                target,
                revoked,
                risk,
                assurance,
                compliant,
                s.kind,
                time,
                event_id,
                seq as i64
            ],
        )?;
        let mut record = json!({
            "kind": "signal",
            "decision_id": event_id,
            "signal": {
                "type": s.kind,
                "target_kind": target_kind,
                "target": target,
                "value": value,
                "state": {"revoked": revoked, "risk": risk, "assurance": assurance, "device_compliant": compliant},
            },
        });
        if target_kind == "session" {
            record["session_id"] = json!(target);
        }
        if let Some(r) = &s.reason {
            record["signal"]["reason"] = json!(r);
        }
        // In the same transaction: a signal is applied with its trail record
        // or not at all.
        let stored = self.record_in(&tx, record)?;
        tx.commit()?;
        drop(conn);
        self.decisions.counted(stored.0, stored.1);
        self.latest.send_replace(seq);
        Ok((event_id, seq))
    }

    /// Files an approval request, or returns the identical pending one.
    pub fn request_approval(
        &self,
        b: &pb::ApprovalBinding,
    ) -> Result<pb::ApprovalTicket, JourneyError> {
        for (name, v) in [
            ("subject", &b.subject),
            ("agent", &b.agent),
            ("tool", &b.tool),
            ("arguments_digest", &b.arguments_digest),
        ] {
            if v.is_empty() || v.len() > MAX_FIELD {
                return Err(JourneyError::Bad(format!(
                    "`{name}` is required (at most {MAX_FIELD} bytes)"
                )));
            }
        }
        if b.arguments_json.len() > 64 << 10 {
            return Err(JourneyError::Bad("`arguments_json` is over 64 KiB".into()));
        }
        let groups = serde_json::to_string(&b.approver_groups).unwrap_or_default();
        let now = now_micros();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existing: Option<(String, i64)> = tx
            .query_row(
                "SELECT id, expires_us FROM approvals
                 WHERE subject = ?1 AND agent = ?2 AND tool = ?3 AND digest = ?4 AND groups = ?5
                   AND session_id = ?6 AND state = 'pending' AND expires_us > ?7
                 ORDER BY created_us DESC LIMIT 1",
                params![
                    b.subject,
                    b.agent,
                    b.tool,
                    b.arguments_digest,
                    groups,
                    b.session_id,
                    now as i64
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((id, expires)) = existing {
            return Ok(pb::ApprovalTicket {
                id,
                state: "pending".into(),
                expires_at: format_micros(expires as u64),
                reused: true,
            });
        }
        let id = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext)).to_string();
        let expires = now + self.approval_ttl.as_micros() as u64;
        let seq = next_seq(&tx)?;
        tx.execute(
            "INSERT INTO approvals (id, subject, agent, tool, digest, groups, session_id,
               decision_id, arguments, state, created_us, expires_us, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10, ?11, ?12)",
            params![
                id,
                b.subject,
                b.agent,
                b.tool,
                b.arguments_digest,
                groups,
                b.session_id,
                b.decision_id,
                b.arguments_json,
                now as i64,
                expires as i64,
                seq as i64
            ],
        )?;
        let stored =
            self.approval_record_in(&tx, &id, "pending", None, &b.session_id, &b.decision_id)?;
        tx.commit()?;
        drop(conn);
        self.decisions.counted(stored.0, stored.1);
        self.latest.send_replace(seq);
        Ok(pb::ApprovalTicket {
            id,
            state: "pending".into(),
            expires_at: format_micros(expires),
            reused: false,
        })
    }

    /// An approver's verdict on a pending request.
    pub fn decide(&self, id: &str, grant: bool, by: &str) -> Result<Approval, JourneyError> {
        if by.is_empty() || by.len() > MAX_FIELD {
            return Err(JourneyError::Bad(
                "the approver's name (`by`) is required".into(),
            ));
        }
        let current = self
            .approval(id)?
            .ok_or_else(|| JourneyError::NotFound(format!("no approval request `{id}`")))?;
        if current.state != "pending" {
            return Err(JourneyError::Conflict(format!(
                "approval `{id}` is {}, not pending",
                current.state
            )));
        }
        let state = if grant { "granted" } else { "denied" };
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let seq = next_seq(&tx)?;
        let n = tx.execute(
            "UPDATE approvals SET state = ?2, by = ?3, seq = ?4 WHERE id = ?1 AND state = 'pending'",
            params![id, state, by, seq as i64],
        )?;
        if n == 0 {
            return Err(JourneyError::Conflict(format!(
                "approval `{id}` was decided meanwhile"
            )));
        }
        let stored = self.approval_record_in(
            &tx,
            id,
            state,
            Some(by),
            &current.session_id,
            &current.decision_id,
        )?;
        tx.commit()?;
        drop(conn);
        self.decisions.counted(stored.0, stored.1);
        self.latest.send_replace(seq);
        self.approval(id)?
            .ok_or_else(|| JourneyError::NotFound(id.to_owned()))
    }

    /// Spends a granted approval on the call it is bound to: once.
    pub fn redeem(&self, r: &pb::RedeemRequest) -> Result<pb::RedeemResult, JourneyError> {
        let no = |reason: String| {
            Ok(pb::RedeemResult {
                ok: false,
                reason,
                granted_by: String::new(),
            })
        };
        let Some(a) = self.approval(&r.id)? else {
            return no("unknown".into());
        };
        let b = r.binding.clone().unwrap_or_default();
        // The same decision asking again (its first answer was lost, e.g. to a
        // timeout) gets the same yes: spending is idempotent per decision.
        let again = a.state == "used"
            && !r.decision_id.is_empty()
            && a.used_by_decision.as_deref() == Some(r.decision_id.as_str());
        if a.state != "granted" && !again {
            return no(a.state);
        }
        for (field, want, got) in [
            ("subject", &a.subject, &b.subject),
            ("agent", &a.agent, &b.agent),
            ("tool", &a.tool, &b.tool),
            ("arguments", &a.arguments_digest, &b.arguments_digest),
            ("session", &a.session_id, &b.session_id),
        ] {
            if want != got {
                return no(format!("bound to other {field}"));
            }
        }
        // The policies now in force may name a group this approval did not ask.
        if let Some(g) = b
            .approver_groups
            .iter()
            .find(|g| !a.approver_groups.contains(g))
        {
            return no(format!(
                "not approved by group `{g}`, which the policies now require"
            ));
        }
        if again {
            return Ok(pb::RedeemResult {
                ok: true,
                reason: String::new(),
                granted_by: a.by.unwrap_or_default(),
            });
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let seq = next_seq(&tx)?;
        let n = tx.execute(
            "UPDATE approvals SET state = 'used', used_by_decision = ?2, seq = ?3
             WHERE id = ?1 AND state = 'granted' AND expires_us > ?4",
            params![r.id, r.decision_id, seq as i64, now_micros() as i64],
        )?;
        if n == 0 {
            return no("used".into());
        }
        let stored = self.approval_record_in(
            &tx,
            &r.id,
            "used",
            a.by.as_deref(),
            &a.session_id,
            &r.decision_id,
        )?;
        tx.commit()?;
        drop(conn);
        self.decisions.counted(stored.0, stored.1);
        self.latest.send_replace(seq);
        Ok(pb::RedeemResult {
            ok: true,
            reason: String::new(),
            granted_by: a.by.unwrap_or_default(),
        })
    }

    pub fn approval(&self, id: &str) -> Result<Option<Approval>, JourneyError> {
        Ok(self
            .select_approvals("WHERE id = ?1", params![id])?
            .into_iter()
            .next())
    }

    /// Approvals, newest first (at most 1,000), optionally only those in
    /// `state` (expiry is a state derived from the time, in SQL as well).
    pub fn approvals(&self, state: Option<&str>) -> Result<Vec<Approval>, JourneyError> {
        let now = now_micros() as i64;
        let (filter, state) = match state {
            None => ("", String::new()),
            Some("expired") => (
                "WHERE state IN ('pending', 'granted') AND expires_us <= ?1",
                String::new(),
            ),
            Some(s @ ("pending" | "granted")) => {
                ("WHERE state = ?2 AND expires_us > ?1", s.to_owned())
            }
            Some(s) => ("WHERE state = ?2", s.to_owned()),
        };
        let tail = format!("{filter} ORDER BY created_us DESC LIMIT 1000");
        let all = if state.is_empty() && filter.is_empty() {
            self.select_approvals(&tail, params![])?
        } else if state.is_empty() {
            self.select_approvals(&tail, params![now])?
        } else {
            self.select_approvals(&tail, params![now, state])?
        };
        Ok(all)
    }

    fn select_approvals(
        &self,
        tail: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Approval>, JourneyError> {
        let now = now_micros() as i64;
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, state, subject, agent, tool, digest, arguments, groups, session_id,
               decision_id, created_us, expires_us, by, used_by_decision FROM approvals {tail}"
        ))?;
        let rows = stmt.query_map(args, |r| {
            let state: String = r.get(1)?;
            let expires: i64 = r.get(11)?;
            let expired = expires <= now && (state == "pending" || state == "granted");
            let arguments: String = r.get(6)?;
            let groups: String = r.get(7)?;
            Ok(Approval {
                id: r.get(0)?,
                state: if expired { "expired".into() } else { state },
                subject: r.get(2)?,
                agent: r.get(3)?,
                tool: r.get(4)?,
                arguments_digest: r.get(5)?,
                arguments: serde_json::from_str(&arguments).unwrap_or(Value::Null),
                approver_groups: serde_json::from_str(&groups).unwrap_or_default(),
                session_id: r.get(8)?,
                decision_id: r.get(9)?,
                created_at: format_micros(r.get::<_, i64>(10)? as u64),
                expires_at: format_micros(expires as u64),
                by: r.get(12)?,
                used_by_decision: r.get(13)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Feed events after `after`, oldest first, at most `limit`.
    pub fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<pb::FeedEvent>, JourneyError> {
        let conn = self.conn();
        let mut out = Vec::new();
        let mut stmt = conn.prepare_cached(
            "SELECT target_kind, target, revoked, risk, assurance, device_compliant, last_event,
               time, event_id, seq FROM session_signals WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let signals = stmt.query_map(params![after as i64, limit as i64], |r| {
            Ok(pb::FeedEvent {
                epoch: String::new(),
                seq: r.get::<_, i64>(9)? as u64,
                event: Some(pb::feed_event::Event::Signal(pb::SessionSignal {
                    target_kind: r.get(0)?,
                    target: r.get(1)?,
                    revoked: r.get(2)?,
                    risk: r.get(3)?,
                    assurance: r.get(4)?,
                    device_compliant: r.get(5)?,
                    last_event: r.get(6)?,
                    time: r.get(7)?,
                    event_id: r.get(8)?,
                })),
            })
        })?;
        for s in signals {
            out.push(s?);
        }
        let mut stmt = conn.prepare_cached(
            "SELECT id, state, by, session_id, seq FROM approvals WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let approvals = stmt.query_map(params![after as i64, limit as i64], |r| {
            Ok(pb::FeedEvent {
                epoch: String::new(),
                seq: r.get::<_, i64>(4)? as u64,
                event: Some(pb::feed_event::Event::Approval(pb::ApprovalChange {
                    id: r.get(0)?,
                    state: r.get(1)?,
                    by: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    session_id: r.get(3)?,
                })),
            })
        })?;
        for a in approvals {
            out.push(a?);
        }
        out.sort_by_key(|e| e.seq);
        out.truncate(limit);
        Ok(out)
    }

    fn approval_record_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        id: &str,
        state: &str,
        by: Option<&str>,
        session_id: &str,
        decision_id: &str,
    ) -> Result<(u64, u64), JourneyError> {
        let mut record = json!({
            "kind": "approval",
            "decision_id": uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext)).to_string(),
            "approval_id": id,
            "approval": {"state": state, "for_decision": decision_id},
        });
        if let Some(by) = by {
            record["approval"]["by"] = json!(by);
        }
        if !session_id.is_empty() {
            record["session_id"] = json!(session_id);
        }
        self.record_in(tx, record)
    }

    /// Appends a record to the control plane's own chain in the trail, in
    /// `tx`: the change it records commits with it or not at all (a crash
    /// in between cannot leave a change the trail does not show). Returns
    /// the records stored and breaks found, for the store's counters once
    /// `tx` commits.
    fn record_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        mut tail: Value,
    ) -> Result<(u64, u64), JourneyError> {
        tail["time"] = json!(format_micros(now_micros()));
        tail.sort_all_objects();
        let tail = tail.to_string().into_bytes();
        // `tx` holds the database's write lock: the head read here is the
        // head the record is stored after.
        let trail = |e: TrailError| JourneyError::Trail(e.to_string());
        let mut head = head_in(tx, INSTANCE).map_err(trail)?;
        let seq = head.0 + 1;
        let mut body = Vec::with_capacity(tail.len() + 64);
        crate::decision_log::record::body(INSTANCE, seq, &tail, &mut body);
        let hash = chain::link(&head.1, &body);
        let record = Incoming {
            seq,
            hash,
            body: &body,
        };
        let appended = append_in(tx, INSTANCE, &mut head, &[record]).map_err(trail)?;
        Ok((appended.stored, appended.breaks.len() as u64))
    }
}

fn next_seq(tx: &rusqlite::Transaction<'_>) -> Result<u64, rusqlite::Error> {
    tx.query_row(
        "UPDATE feed_position SET seq = seq + 1 WHERE id = 1 RETURNING seq",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|s| s as u64)
}

/// `Type::"id"` with a valid Cedar-like type name and a JSON string id.
pub fn is_subject_key(s: &str) -> bool {
    let Some((kind, id)) = s.split_once("::\"") else {
        return false;
    };
    !kind.is_empty()
        && kind
            .split("::")
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        && serde_json::from_str::<String>(&format!("\"{id}")).is_ok()
}

/// The gRPC side: sidecars follow the feed and file and spend approvals.
pub struct SessionsService {
    pub journeys: Arc<Journeys>,
}

/// How long a quiet feed waits before a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(10);

type FeedStream = Pin<Box<dyn Stream<Item = Result<pb::FeedEvent, Status>> + Send>>;

fn internal(e: JourneyError) -> Status {
    match e {
        JourneyError::Bad(m) => Status::invalid_argument(m),
        JourneyError::NotFound(m) => Status::not_found(m),
        JourneyError::Conflict(m) => Status::failed_precondition(m),
        JourneyError::Db(e) => Status::internal(e.to_string()),
        JourneyError::Trail(m) => Status::internal(m),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, JourneyError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(internal)
}

#[tonic::async_trait]
impl SessionsApi for SessionsService {
    type FollowStream = FeedStream;

    async fn follow(
        &self,
        request: Request<pb::FollowRequest>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let request = request.into_inner();
        let journeys = self.journeys.clone();
        // A position from another database (recreated, restored) means nothing here.
        let mut cursor = if request.epoch.is_empty() || request.epoch == journeys.epoch {
            request.after
        } else {
            0
        };
        let mut latest = journeys.subscribe();
        // Small: the feed is read from the database page by page, so a slow
        // sidecar holds back its own reads, never the control plane's memory.
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            // After the backlog, a heartbeat at once tells the sidecar it has
            // caught up (it holds decisions until then).
            let mut caught_up = false;
            loop {
                latest.borrow_and_update();
                let j = journeys.clone();
                let page = match blocking(move || j.feed_after(cursor, 256)).await {
                    Ok(p) => p,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                let full = page.len() == 256;
                for mut event in page {
                    cursor = cursor.max(event.seq);
                    event.epoch.clone_from(&journeys.epoch);
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                if !caught_up {
                    caught_up = true;
                    let beat = pb::FeedEvent {
                        seq: cursor,
                        event: Some(pb::feed_event::Event::Heartbeat(true)),
                        epoch: journeys.epoch.clone(),
                    };
                    if tx.send(Ok(beat)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = latest.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(HEARTBEAT) => {
                        let beat = pb::FeedEvent { seq: cursor, event: Some(pb::feed_event::Event::Heartbeat(true)), epoch: journeys.epoch.clone() };
                        if tx.send(Ok(beat)).await.is_err() {
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn request_approval(
        &self,
        request: Request<pb::ApprovalBinding>,
    ) -> Result<Response<pb::ApprovalTicket>, Status> {
        let j = self.journeys.clone();
        let b = request.into_inner();
        blocking(move || j.request_approval(&b))
            .await
            .map(Response::new)
    }

    async fn redeem_approval(
        &self,
        request: Request<pb::RedeemRequest>,
    ) -> Result<Response<pb::RedeemResult>, Status> {
        let j = self.journeys.clone();
        let r = request.into_inner();
        blocking(move || j.redeem(&r)).await.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journeys(dir: &Path, ttl: Duration) -> Journeys {
        let db = dir.join("cp.db");
        let decisions = Arc::new(DecisionStore::open(&db).expect("trail"));
        Journeys::open(&db, decisions, ttl).expect("open")
    }

    fn binding(args: &str) -> pb::ApprovalBinding {
        pb::ApprovalBinding {
            subject: "User::\"alice\"".into(),
            agent: "support-bot".into(),
            tool: "payments/refund".into(),
            arguments_digest: args.into(),
            approver_groups: vec!["finance".into()],
            session_id: "s1".into(),
            decision_id: "d0".into(),
            arguments_json: "{}".into(),
        }
    }

    #[test]
    fn a_change_commits_with_its_trail_record_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tmp");
        let j = journeys(dir.path(), Duration::from_secs(60));
        let filed = j.request_approval(&binding("aa")).expect("filed");
        assert_eq!(j.decisions.head(INSTANCE).expect("head").0, 1);
        let feed_len = || j.feed_after(0, 100).expect("feed").len();
        let before = feed_len();

        // The trail refuses every record (a full disk, a damaged table...).
        let raw = Connection::open(dir.path().join("cp.db")).expect("open");
        raw.execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON decisions
             BEGIN SELECT RAISE(ABORT, 'the trail refuses'); END;",
        )
        .expect("trigger");
        let revoke = Signal {
            kind: "session_revoked".into(),
            session_id: Some("s1".into()),
            subject: None,
            value: None,
            reason: None,
        };
        let refused = j.signal(&revoke).expect_err("no record, no signal");
        assert!(matches!(refused, JourneyError::Trail(_)), "{refused}");
        assert!(j.decide(&filed.id, true, "bob").is_err());
        assert!(j.request_approval(&binding("bb")).is_err());
        // Nothing of the three took effect: no feed event, still pending,
        // nothing new filed.
        assert_eq!(feed_len(), before);
        assert_eq!(
            j.approval(&filed.id).expect("read").expect("kept").state,
            "pending"
        );
        assert_eq!(j.approvals(None).expect("list").len(), 1);

        raw.execute_batch("DROP TRIGGER refuse").expect("drop");
        j.signal(&revoke).expect("recorded and applied");
        assert_eq!(feed_len(), before + 1);
        assert_eq!(j.decisions.head(INSTANCE).expect("head").0, 2);
    }

    #[test]
    fn a_subject_revocation_can_be_lifted_a_session_one_cannot() {
        let dir = tempfile::tempdir().expect("tmp");
        let j = journeys(dir.path(), Duration::from_secs(60));
        let signal = |kind: &str, session: Option<&str>, subject: Option<&str>| {
            j.signal(&Signal {
                kind: kind.into(),
                session_id: session.map(Into::into),
                subject: subject.map(Into::into),
                value: None,
                reason: None,
            })
        };
        let alice = Some("User::\"alice\"");
        signal("session_revoked", None, alice).expect("revoked");
        let (_, seq) = signal("revocation_lifted", None, alice).expect("lifted");
        let events = j.feed_after(seq - 1, 10).expect("feed");
        let Some(pb::feed_event::Event::Signal(s)) = &events[0].event else {
            panic!("{events:?}")
        };
        assert!(!s.revoked, "{s:?}");
        assert_eq!(s.last_event, "revocation_lifted");
        let nothing =
            signal("revocation_lifted", None, Some("User::\"bob\"")).expect_err("not revoked");
        assert!(nothing.to_string().contains("nothing to lift"), "{nothing}");
        signal("session_revoked", Some("s1"), None).expect("revoked");
        let refused = signal("revocation_lifted", Some("s1"), None).expect_err("stays revoked");
        assert!(refused.to_string().contains("stays revoked"), "{refused}");
    }

    #[test]
    fn an_approval_is_reused_while_pending_and_spent_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let j = journeys(dir.path(), Duration::from_secs(60));
        let t1 = j.request_approval(&binding("aa")).expect("filed");
        let t2 = j.request_approval(&binding("aa")).expect("filed");
        assert_eq!((t1.id.as_str(), t2.reused), (t2.id.as_str(), true));
        let other = j.request_approval(&binding("bb")).expect("filed");
        assert_ne!(other.id, t1.id);

        let redeem = |id: &str, args: &str| {
            j.redeem(&pb::RedeemRequest {
                id: id.into(),
                binding: Some(binding(args)),
                decision_id: "d1".into(),
            })
            .expect("redeem")
        };
        assert_eq!(redeem(&t1.id, "aa").reason, "pending");
        j.decide(&t1.id, true, "bob").expect("granted");
        assert!(j.decide(&t1.id, false, "eve").is_err(), "decided once");
        assert_eq!(redeem(&t1.id, "bb").reason, "bound to other arguments");
        let mut stricter = binding("aa");
        stricter.approver_groups.push("legal".into());
        let r = j
            .redeem(&pb::RedeemRequest {
                id: t1.id.clone(),
                binding: Some(stricter),
                decision_id: "d1".into(),
            })
            .expect("redeem");
        assert!(r.reason.contains("`legal`"), "{}", r.reason);
        let ok = redeem(&t1.id, "aa");
        assert!(ok.ok && ok.granted_by == "bob");
        // The same decision may ask again (a lost answer); no other may.
        assert!(redeem(&t1.id, "aa").ok, "idempotent for decision d1");
        let other_decision = j
            .redeem(&pb::RedeemRequest {
                id: t1.id.clone(),
                binding: Some(binding("aa")),
                decision_id: "d2".into(),
            })
            .expect("redeem");
        assert_eq!(other_decision.reason, "used");
        assert_eq!(redeem("nope", "aa").reason, "unknown");
        j.decide(&other.id, false, "bob").expect("denied");
        assert_eq!(redeem(&other.id, "bb").reason, "denied");
    }

    #[test]
    fn expired_requests_cannot_be_granted_or_spent() {
        let dir = tempfile::tempdir().expect("tmp");
        let j = journeys(dir.path(), Duration::from_millis(1));
        let t = j.request_approval(&binding("aa")).expect("filed");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            j.approval(&t.id).expect("read").expect("there").state,
            "expired"
        );
        assert!(matches!(
            j.decide(&t.id, true, "bob"),
            Err(JourneyError::Conflict(_))
        ));
    }

    #[test]
    fn the_feed_is_compacted_and_resumable() {
        let dir = tempfile::tempdir().expect("tmp");
        let j = journeys(dir.path(), Duration::from_secs(60));
        let sig = |kind: &str, value: Option<&str>| Signal {
            kind: kind.into(),
            session_id: Some("s1".into()),
            subject: None,
            value: value.map(str::to_owned),
            reason: None,
        };
        j.signal(&sig("risk_level_changed", Some("high")))
            .expect("ok");
        let (_, seq) = j
            .signal(&sig("assurance_level_changed", Some("aal2")))
            .expect("ok");
        let all = j.feed_after(0, 100).expect("feed");
        assert_eq!(all.len(), 1, "one row per target");
        let Some(pb::feed_event::Event::Signal(s)) = &all[0].event else {
            panic!("a signal");
        };
        assert_eq!((s.risk.as_str(), s.assurance.as_str()), ("high", "aal2"));
        assert!(j.feed_after(seq, 100).expect("feed").is_empty());
        assert!(
            j.signal(&sig("risk_level_changed", Some("extreme")))
                .is_err()
        );
        assert!(j.signal(&sig("made_up", None)).is_err());
        let bad_subject = Signal {
            session_id: None,
            subject: Some("alice".into()),
            ..sig("session_revoked", None)
        };
        assert!(j.signal(&bad_subject).is_err());
        // Every change is a record in the control plane's chain.
        let report = j.decisions.verify(Some(INSTANCE)).expect("verify");
        assert!(
            report
                .iter()
                .all(|r| r.first_break.is_none() && r.records == 2),
            "{report:?}"
        );
    }
}
