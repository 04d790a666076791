//! The control plane's side of the decision trail: the `DecisionLog` gRPC
//! service sidecars stream records to, and the store that keeps them
//! (SQLite, same database file, its own connection). Each batch is verified
//! against the chain as it arrives, stored in one transaction, then
//! acknowledged; resends are de-duplicated by (instance, seq).

use std::borrow::Cow;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::pb::v1::{RecordBatch, ShipAck, decision_log_server::DecisionLog};
use crate::decision_log::chain::{self, Break, GENESIS, Hash, Verifier};
use crate::decision_log::mask::hex;

/// One stored record.
#[derive(Debug, Clone, Serialize)]
pub struct Stored {
    pub instance: String,
    pub seq: u64,
    pub hash: String,
    pub record: Box<serde_json::value::RawValue>,
    /// Kept apart from the chain: a forked chain numbered it with a seq
    /// the store already held (see `append_in`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forked: bool,
}

/// Filters of `arbiter log query`; all optional, combined with AND.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub since: Option<String>,
    pub until: Option<String>,
    pub instance: Option<String>,
    pub subject: Option<String>,
    pub subject_type: Option<String>,
    pub resource: Option<String>,
    pub resource_type: Option<String>,
    pub outcome: Option<String>,
    pub policy: Option<String>,
    /// Only records kept apart as forked (true), or only the chains' (false).
    pub forked: Option<bool>,
    pub limit: Option<u32>,
}

/// The chain check of one instance's stored records.
#[derive(Debug, Clone, Serialize)]
pub struct ChainReport {
    pub instance: String,
    pub records: u64,
    /// Where the stored chain starts: after this seq (0, or where retention
    /// cut it).
    pub after_seq: u64,
    pub last_seq: u64,
    /// `SEQ:HASH` of the last stored record, for `log verify --file
    /// --head` to check an export against later; none without records.
    pub head: Option<String>,
    /// The first break found now, walking the stored chain from its start.
    pub first_break: Option<Break>,
    /// Breaks flagged when the records arrived.
    pub flagged_on_receipt: Vec<Break>,
    /// Records of this instance kept apart as forked (not on the chain).
    pub forked_records: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    #[error("decision store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Bad(String),
}

pub struct DecisionStore {
    conn: Mutex<Connection>,
    /// The database file, for connections of their own (see `reader`).
    path: std::path::PathBuf,
    pub records_stored: Counter,
    pub chain_breaks: Counter,
}

/// One received record.
pub struct Incoming<'a> {
    pub seq: u64,
    pub hash: Hash,
    pub body: &'a [u8],
}

/// Most bytes one batch may unpack to (a compression bomb stops here).
const MAX_BATCH_BYTES: u64 = 64 << 20;

/// Most lines one batch may hold: a sidecar sends at most
/// `decision_log.batch_max_records`, which is held below this.
pub const MAX_BATCH_LINES: usize = 65_536;

/// Unpacks a shipped batch's compressed lines (LZ4 frame, or DEFLATE from
/// older sidecars).
pub fn unpack(batch: &RecordBatch) -> Result<Vec<u8>, String> {
    unpack_at_most(batch, MAX_BATCH_BYTES)
}

fn unpack_at_most(batch: &RecordBatch, max_bytes: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut text = Vec::new();
    let read = match (batch.lines_lz4.is_empty(), batch.lines_deflate.is_empty()) {
        (false, true) => lz4_flex::frame::FrameDecoder::new(&batch.lines_lz4[..])
            .take(max_bytes + 1)
            .read_to_end(&mut text)
            .map_err(|e| format!("batch at seq {} is not an LZ4 frame: {e}", batch.first_seq)),
        (true, _) => flate2::read::DeflateDecoder::new(&batch.lines_deflate[..])
            .take(max_bytes + 1)
            .read_to_end(&mut text)
            .map_err(|e| format!("batch at seq {} is not DEFLATE data: {e}", batch.first_seq)),
        (false, false) => Err(format!(
            "batch at seq {} sets both lines_lz4 and lines_deflate",
            batch.first_seq
        )),
    };
    read?;
    if text.len() as u64 > max_bytes {
        return Err(format!(
            "batch at seq {} unpacks to more than {max_bytes} bytes",
            batch.first_seq
        ));
    }
    Ok(text)
}

/// Parses unpacked lines, checking the batch is where it says it is.
pub fn parse_batch<'a>(
    instance: &str,
    first_seq: u64,
    count: u32,
    text: &'a [u8],
) -> Result<Vec<Incoming<'a>>, String> {
    // A sidecar ships whole lines and counts them as it reads them: the
    // count is checked before anything is sized by it, and a batch holds at
    // most what a sidecar sends in one.
    let whole = match text.strip_suffix(b"\n") {
        Some(whole) => Some(whole),
        None if text.is_empty() => None,
        None => return Err("batch does not end with a whole line".into()),
    };
    let held = whole.map_or(0, |w| memchr::memchr_iter(b'\n', w).count() + 1);
    if held != count as usize {
        return Err(format!("batch says {count} lines but holds {held}"));
    }
    if held > MAX_BATCH_LINES {
        return Err(format!(
            "batch holds {held} lines; a sidecar sends at most {MAX_BATCH_LINES} in one"
        ));
    }
    // Seqs are stored as SQLite integers (i64): one past that would read
    // back negative and sort before the chain's first record.
    let last_fits = first_seq
        .checked_add(u64::from(count))
        .is_some_and(|end| end <= i64::MAX as u64);
    if first_seq == 0 || !last_fits {
        return Err(format!(
            "batch at seq {first_seq} is outside the seqs a chain has"
        ));
    }
    let lines: Vec<&[u8]> = whole
        .into_iter()
        .flat_map(|w| w.split(|b| *b == b'\n'))
        .collect();
    let parsed: Vec<_> = lines.iter().map(|l| chain::parse_line(l)).collect();
    let in_place = |i: usize| matches!(parsed.get(i), Some(Ok(p)) if p.seq == first_seq + i as u64 && p.instance == instance);
    let mut out = Vec::with_capacity(held);
    for (i, (line, p)) in lines.iter().zip(&parsed).enumerate() {
        let want = first_seq + i as u64;
        match p {
            Ok(p) if in_place(i) => out.push(Incoming {
                seq: want,
                hash: p.hash,
                body: p.body,
            }),
            // A readable line out of place: the batch is not where it says
            // (or damage shifted its lines, and the sidecar numbers what
            // follows by its count). Storing it would put intact records
            // at the wrong seqs, and the sidecar would skip the real ones:
            // refused, visibly, rather than lost. Unless the line after it
            // is in place: then this record's own seq (or instance) was
            // damaged, and it goes as evidence like an unreadable line.
            Ok(p) if !in_place(i + 1) => {
                return Err(format!(
                    "batch line {} is seq {} of instance {}, expected seq {want} of {instance}: if this sidecar's spool is damaged, `arbiter log verify --file SPOOL_DIR` shows where",
                    i + 1,
                    p.seq,
                    p.instance
                ));
            }
            // Damaged in place in the sidecar's spool (unreadable, empty,
            // or misnumbered): kept as evidence at the seq it stands for.
            // It does not match its hash (none, if unreadable), so the chain
            // shows the break there, and shipping goes on (refusing the
            // batch would make the sidecar resend it forever). A hash it
            // still carries lets the next record link to it: the break is
            // this record alone.
            _ => out.push(Incoming {
                seq: want,
                hash: p.as_ref().map_or([0; 32], |p| p.hash),
                body: line,
            }),
        }
    }
    Ok(out)
}

/// The fields of a record body the store indexes. Strings are borrowed
/// where they can be, owned where JSON escapes them (a `"` in a session id).
#[derive(Deserialize)]
struct Indexed<'a> {
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    decision_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    time: Cow<'a, str>,
    #[serde(borrow, default)]
    outcome: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    policy_ids: Vec<Cow<'a, str>>,
    #[serde(default)]
    request: Option<IndexedRequest>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    approval_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct IndexedRequest {
    subject: Option<IndexedEntity>,
    resource: Option<IndexedEntity>,
}

#[derive(Deserialize)]
struct IndexedEntity {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
}

/// What [`DecisionStore::rows`] reads from `table`, in this order.
fn selected(table: &str) -> String {
    let forked = table == "forked_records";
    format!("instance, seq, hash, body, {} AS forked", u8::from(forked))
}

/// The columns `log query` filters on, as stored with a record (on the
/// chain or kept apart as forked).
struct Columns<'i> {
    decision_id: Option<&'i str>,
    time_us: Option<i64>,
    outcome: Option<&'i str>,
    subject_type: Option<&'i str>,
    subject_id: Option<&'i str>,
    resource_type: Option<&'i str>,
    resource_id: Option<&'i str>,
    /// `,id1,id2,`, each id [`listed`]: a policy id is found with its commas.
    policy_ids: Option<String>,
}

/// The columns of [`Columns::filtered`], in its order.
const FILTERED: &str =
    "time_us, outcome, subject_type, subject_id, resource_type, resource_id, policy_ids";

impl<'i> Columns<'i> {
    /// The values of [`FILTERED`].
    fn filtered(&self) -> [&dyn rusqlite::ToSql; 7] {
        [
            &self.time_us,
            &self.outcome,
            &self.subject_type,
            &self.subject_id,
            &self.resource_type,
            &self.resource_id,
            &self.policy_ids,
        ]
    }

    fn of(ix: Option<&'i Indexed<'i>>) -> Self {
        let entity = |pick: fn(&IndexedRequest) -> &Option<IndexedEntity>| {
            ix.and_then(|i| i.request.as_ref())
                .and_then(|q| pick(q).as_ref())
        };
        let (subject, resource) = (entity(|q| &q.subject), entity(|q| &q.resource));
        Self {
            decision_id: ix.and_then(|i| i.decision_id.as_deref()),
            time_us: ix
                .and_then(|i| crate::decision_log::time::parse_micros(&i.time))
                .map(|t| t as i64),
            outcome: ix.and_then(|i| i.outcome.as_deref()),
            subject_type: subject.and_then(|e| e.kind.as_deref()),
            subject_id: subject.and_then(|e| e.id.as_deref()),
            resource_type: resource.and_then(|e| e.kind.as_deref()),
            resource_id: resource.and_then(|e| e.id.as_deref()),
            policy_ids: ix.map(|i| policy_list(&i.policy_ids)),
        }
    }
}

/// Adds the columns a table made by an older version lacks.
fn add_missing_columns(
    conn: &Connection,
    table: &str,
    columns: &[(&str, &str)],
) -> Result<(), TrailError> {
    for (column, kind) in columns {
        let has: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
            .exists(params![table, column])?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

/// A policy id as it stands between the commas of the `policy_ids`
/// column: `@id` may hold commas, so `\` and `,` are escaped (`\\`, `\c`),
/// and one id's search never matches part of another.
fn listed(id: &str) -> Cow<'_, str> {
    if !id.contains([',', '\\']) {
        return Cow::Borrowed(id);
    }
    Cow::Owned(id.replace('\\', "\\\\").replace(',', "\\c"))
}

/// The `policy_ids` column of a record deciding by `ids` (`,,` for none,
/// as before ids were escaped).
fn policy_list<S: AsRef<str>>(ids: &[S]) -> String {
    if ids.is_empty() {
        return ",,".into();
    }
    let mut out = String::from(",");
    for id in ids {
        out.push_str(&listed(id.as_ref()));
        out.push(',');
    }
    out
}

/// `(instance, seq, hash, body)` rows of a query selecting those columns.
type KeyedBody = (String, i64, Vec<u8>, String);

fn keyed_bodies(conn: &Connection, sql: &str) -> Result<Vec<KeyedBody>, TrailError> {
    Ok(conn
        .prepare(sql)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<Vec<_>, _>>()?)
}

/// Lists again the policy ids of records stored before ids were escaped
/// (store version 3): only records with an id holding a comma or a
/// backslash change. SQLite finds them (its JSON reader runs only where the
/// column has a backslash or more than one id), so only those are read.
fn relist_policy_ids(conn: &Connection) -> Result<(), TrailError> {
    let tx = conn.unchecked_transaction()?;
    for table in ["decisions", "forked_records"] {
        let rows = keyed_bodies(
            &tx,
            &format!(
                "SELECT instance, seq, hash, body FROM {table}
                 WHERE (instr(policy_ids, '\\') > 0
                        OR length(policy_ids) - length(replace(policy_ids, ',', '')) > 2)
                   AND CASE WHEN json_valid(body) THEN EXISTS (
                         SELECT 1 FROM json_each(body, '$.policy_ids')
                         WHERE instr(value, ',') > 0 OR instr(value, '\\') > 0) END"
            ),
        )?;
        let mut update = tx.prepare(&format!(
            "UPDATE {table} SET policy_ids = ?4 WHERE instance = ?1 AND seq = ?2 AND hash = ?3"
        ))?;
        for (instance, seq, hash, body) in rows {
            if let Ok(ix) = serde_json::from_str::<Indexed>(&body) {
                update.execute(params![instance, seq, hash, policy_list(&ix.policy_ids)])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Fills the index columns of forked records kept by a version before they
/// had them, in one transaction.
fn index_forked_records(conn: &Connection) -> Result<(), TrailError> {
    let tx = conn.unchecked_transaction()?;
    let rows = keyed_bodies(
        &tx,
        "SELECT instance, seq, hash, body FROM forked_records WHERE time_us IS NULL",
    )?;
    {
        let mut update = tx.prepare(&format!(
            "UPDATE forked_records SET ({FILTERED}) = (?4, ?5, ?6, ?7, ?8, ?9, ?10)
             WHERE instance = ?1 AND seq = ?2 AND hash = ?3"
        ))?;
        for (instance, seq, hash, body) in rows {
            let ix: Option<Indexed> = serde_json::from_str(&body).ok();
            let c = Columns::of(ix.as_ref());
            let key: [&dyn rusqlite::ToSql; 3] = [&instance, &seq, &hash];
            update.execute(rusqlite::params_from_iter(
                key.into_iter().chain(c.filtered()),
            ))?;
        }
    }
    tx.commit()?;
    Ok(())
}

impl DecisionStore {
    pub fn open(path: &Path) -> Result<Self, TrailError> {
        let conn = Connection::open(path)?;
        let version = known_version(&conn, path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS decisions (
               instance TEXT NOT NULL,
               seq INTEGER NOT NULL,
               hash BLOB NOT NULL,
               body TEXT NOT NULL,
               decision_id TEXT,
               time_us INTEGER,
               outcome TEXT,
               subject_type TEXT, subject_id TEXT,
               resource_type TEXT, resource_id TEXT,
               policy_ids TEXT,
               session_id TEXT,
               approval_id TEXT,
               received_us INTEGER,
               PRIMARY KEY (instance, seq)
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS decisions_by_id ON decisions (decision_id);
             CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions (time_us);
             CREATE TABLE IF NOT EXISTS chain_breaks (
               instance TEXT NOT NULL,
               seq INTEGER NOT NULL,
               reason TEXT NOT NULL,
               detected_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             );
             CREATE TABLE IF NOT EXISTS chain_anchors (
               instance TEXT PRIMARY KEY,
               seq INTEGER NOT NULL,
               hash BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS chain_heads (
               instance TEXT PRIMARY KEY,
               seq INTEGER NOT NULL,
               hash BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS forked_records (
               instance TEXT NOT NULL,
               seq INTEGER NOT NULL,
               hash BLOB NOT NULL,
               body TEXT NOT NULL,
               decision_id TEXT,
               received_us INTEGER NOT NULL,
               time_us INTEGER,
               outcome TEXT,
               subject_type TEXT, subject_id TEXT,
               resource_type TEXT, resource_id TEXT,
               policy_ids TEXT,
               PRIMARY KEY (instance, seq, hash)
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS forked_by_id ON forked_records (decision_id);",
        )?;
        // Stores made before sessions existed lack the link columns, and
        // those made before retention used receipt times lack `received_us`.
        add_missing_columns(
            &conn,
            "decisions",
            &[
                ("session_id", "TEXT"),
                ("approval_id", "TEXT"),
                ("received_us", "INTEGER"),
            ],
        )?;
        // Before `log query` found forked records, they had no index columns.
        add_missing_columns(
            &conn,
            "forked_records",
            &[
                ("time_us", "INTEGER"),
                ("outcome", "TEXT"),
                ("subject_type", "TEXT"),
                ("subject_id", "TEXT"),
                ("resource_type", "TEXT"),
                ("resource_id", "TEXT"),
                ("policy_ids", "TEXT"),
            ],
        )?;
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS decisions_by_session ON decisions (session_id, time_us);
             CREATE INDEX IF NOT EXISTS decisions_by_approval ON decisions (approval_id);",
        )?;
        // Records stored before receipt times were kept get the upgrade's
        // time as theirs, once: a record whose own time is unreadable then
        // ages from the upgrade instead of stopping retention for good.
        if version < 1 {
            let now = crate::decision_log::time::now_micros() as i64;
            conn.execute(
                "UPDATE decisions SET received_us = ?1 WHERE received_us IS NULL",
                params![now],
            )?;
            conn.execute_batch("PRAGMA user_version = 1")?;
        }
        if version < 2 {
            // Stores made before heads were kept: each chain's last record
            // as it is now stands for what was received.
            conn.execute_batch(
                "INSERT OR IGNORE INTO chain_heads (instance, seq, hash)
                   SELECT instance, MAX(seq), hash FROM decisions GROUP BY instance;
                 PRAGMA user_version = 2",
            )?;
        }
        if version < 3 {
            relist_policy_ids(&conn)?;
            conn.execute_batch(&format!("PRAGMA user_version = {STORE_VERSION}"))?;
        }
        // Every open, not once: an older version may have kept some since.
        index_forked_records(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            records_stored: Counter::default(),
            chain_breaks: Counter::default(),
        })
    }

    /// A read-only connection of its own, for reads of a whole chain: in
    /// WAL mode it reads a snapshot while sidecars' appends (on `conn`) go
    /// on, where holding `conn` would stop them for the whole walk.
    fn reader(&self) -> Result<Connection, TrailError> {
        use rusqlite::OpenFlags;
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last stored record of an instance: where its chain continues.
    pub fn head(&self, instance: &str) -> Result<(u64, Hash), TrailError> {
        head_in(&self.conn(), instance)
    }

    /// Verifies a batch against `head`, stores it in one transaction, and
    /// moves `head`. Returns the breaks found (records are stored anyway:
    /// the trail keeps evidence, the breaks say what is wrong with it).
    pub fn append(
        &self,
        instance: &str,
        head: &mut (u64, Hash),
        records: &[Incoming],
    ) -> Result<Vec<Break>, TrailError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // From what is stored, not from what this stream last stored: another
        // stream of the instance (a copy of its spool) may have moved it.
        *head = head_in(&tx, instance)?;
        let appended = append_in(&tx, instance, head, records)?;
        tx.commit()?;
        self.counted(appended.stored, appended.breaks.len() as u64);
        Ok(appended.breaks)
    }

    /// Counts records stored (and breaks found) by `append_in` in a
    /// transaction of another connection, once it committed.
    pub fn counted(&self, records: u64, breaks: u64) {
        self.records_stored.inc_by(records);
        self.chain_breaks.inc_by(breaks);
    }

    pub fn get(&self, decision_id: &str) -> Result<Option<Stored>, TrailError> {
        let mut found = self.select("WHERE decision_id = ?1 LIMIT 1", params![decision_id])?;
        if found.is_empty() {
            found = self.select_from(
                "forked_records",
                "WHERE decision_id = ?1 LIMIT 1",
                params![decision_id],
            )?;
        }
        Ok(found.pop())
    }

    /// What happened after a decision, linked by ids: records of the same
    /// session from its time on (signals, later decisions), and records of
    /// the approval it filed or spent. Oldest first, at most 100.
    pub fn followed_by(
        &self,
        decision_id: &str,
        time_us: i64,
        session_id: Option<&str>,
        approval_id: Option<&str>,
    ) -> Result<Vec<Stored>, TrailError> {
        // Two indexed lookups (the link columns are filled on receipt).
        self.select(
            "WHERE decision_id IS NOT ?1 AND (
               (session_id = ?2 AND time_us >= ?3) OR approval_id = ?4)
             ORDER BY time_us, instance, seq LIMIT 100",
            params![decision_id, session_id, time_us, approval_id],
        )
    }

    pub fn query(&self, f: &Filter) -> Result<Vec<Stored>, TrailError> {
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        let time = |t: &str| {
            crate::decision_log::time::parse_micros(t)
                .map(|t| t as i64)
                .ok_or_else(|| {
                    TrailError::Bad(format!(
                        "`{t}` is not a UTC RFC 3339 time like 2026-11-24T10:00:00Z"
                    ))
                })
        };
        if let Some(t) = &f.since {
            args.push(Box::new(time(t)?));
            clauses.push(format!("time_us >= ?{}", args.len()));
        }
        if let Some(t) = &f.until {
            args.push(Box::new(time(t)?));
            clauses.push(format!("time_us < ?{}", args.len()));
        }
        for (column, value) in [
            ("instance", &f.instance),
            ("subject_id", &f.subject),
            ("subject_type", &f.subject_type),
            ("resource_id", &f.resource),
            ("resource_type", &f.resource_type),
            ("outcome", &f.outcome),
        ] {
            if let Some(v) = value {
                args.push(Box::new(v.clone()));
                clauses.push(format!("{column} = ?{}", args.len()));
            }
        }
        if let Some(p) = &f.policy {
            args.push(Box::new(format!(",{},", listed(p))));
            clauses.push(format!("instr(policy_ids, ?{}) > 0", args.len()));
        }
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let limit = f.limit.unwrap_or(100).min(10_000);
        let refs: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref()).collect();
        // The chains' records and those kept apart as forked, merged by time
        // (the filters' parameters are numbered, so both arms share them).
        let arm =
            |table: &str| format!("SELECT {}, time_us FROM {table} {filter}", selected(table));
        let select = match f.forked {
            None => format!("{} UNION ALL {}", arm("decisions"), arm("forked_records")),
            Some(true) => arm("forked_records"),
            Some(false) => arm("decisions"),
        };
        self.rows(
            &format!("{select} ORDER BY time_us, instance, seq LIMIT {limit}"),
            &refs,
        )
    }

    fn select(&self, tail: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<Stored>, TrailError> {
        self.select_from("decisions", tail, args)
    }

    fn select_from(
        &self,
        table: &str,
        tail: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Stored>, TrailError> {
        self.rows(
            &format!("SELECT {} FROM {table} {tail}", selected(table)),
            args,
        )
    }

    /// Runs a select of [`selected`] columns (any after them are ignored).
    fn rows(&self, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<Stored>, TrailError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (instance, seq, hash, body, forked) = row?;
            // A body that is no longer JSON (edited in the store) is shown as a string.
            let record = serde_json::value::RawValue::from_string(body.clone())
                .or_else(|_| serde_json::value::to_raw_value(&body))
                .map_err(|e| TrailError::Bad(e.to_string()))?;
            out.push(Stored {
                instance,
                seq: seq as u64,
                hash: hex(&hash),
                record,
                forked,
            });
        }
        Ok(out)
    }

    fn instances(&self) -> Result<Vec<String>, TrailError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT instance FROM decisions UNION SELECT instance FROM chain_anchors
             UNION SELECT instance FROM chain_heads UNION SELECT instance FROM chain_breaks
             UNION SELECT instance FROM forked_records ORDER BY instance",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Walks each instance's stored chain from seq 1.
    pub fn verify(&self, instance: Option<&str>) -> Result<Vec<ChainReport>, TrailError> {
        let instances = match instance {
            Some(i) => vec![i.to_owned()],
            None => self.instances()?,
        };
        let mut out = Vec::new();
        for instance in instances {
            // One snapshot per instance: retention cannot move the anchor
            // between reading it and walking the chain from it.
            let mut reader = self.reader()?;
            let conn = reader.transaction()?;
            let mut stmt = conn.prepare(
                "SELECT seq, hash, body FROM decisions WHERE instance = ?1 ORDER BY seq",
            )?;
            let mut rows = stmt.query(params![instance])?;
            // Anchored at its start, or where retention cut it: a stored
            // chain beginning later than that has lost records.
            let (from, anchor) = anchor_in(&conn, &instance)?;
            let mut v = Verifier::default();
            v.resume(&instance, from, anchor);
            let (mut first_break, mut last_seq) = (None, from);
            while let Some(row) = rows.next()? {
                let seq = row.get::<_, i64>(0)? as u64;
                let hash: Hash = row.get::<_, Vec<u8>>(1)?.try_into().unwrap_or(GENESIS);
                let body: String = row.get(2)?;
                if let Err(b) = v.push(&instance, seq, &hash, body.as_bytes())
                    && first_break.is_none()
                {
                    first_break = Some(b);
                }
                last_seq = seq;
            }
            drop(rows);
            drop(stmt);
            // Records deleted from the chain's end leave no gap to walk
            // into: the head kept on receipt says how far it went.
            if first_break.is_none()
                && let Some(b) = past_head(&conn, &instance, last_seq, v.head(&instance))?
            {
                first_break = Some(b);
            }
            let mut stmt = conn
                .prepare("SELECT seq, reason FROM chain_breaks WHERE instance = ?1 ORDER BY seq")?;
            let flagged = stmt
                .query_map(params![instance], |r| {
                    Ok(Break {
                        instance: instance.clone(),
                        seq: r.get::<_, i64>(0)? as u64,
                        reason: r.get(1)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let forked_records: i64 = conn.query_row(
                "SELECT COUNT(*) FROM forked_records WHERE instance = ?1",
                params![instance],
                |r| r.get(0),
            )?;
            out.push(ChainReport {
                instance: instance.clone(),
                records: v.records,
                after_seq: from,
                last_seq,
                head: v
                    .head(&instance)
                    .filter(|_| last_seq > 0)
                    .map(|h| chain::format_head(last_seq, &h)),
                first_break,
                flagged_on_receipt: flagged,
                forked_records: forked_records as u64,
            });
        }
        Ok(out)
    }

    /// Retention: deletes each instance's records from its start up to the
    /// last one made before `before_us` (a prefix of its chain, so what is
    /// left still verifies), keeping where the cut chain continues as its
    /// anchor. Returns the records deleted.
    pub fn expire(&self, before_us: i64) -> Result<u64, TrailError> {
        let mut deleted = 0;
        for instance in self.instances()? {
            // The control plane's own chain (signals, approvals) is kept as
            // long as the state it records.
            if instance == crate::controlplane::journeys::INSTANCE {
                continue;
            }
            // In steps, each its own transaction: sidecars' appends and
            // signal writes wait at most one step, not the whole backlog.
            loop {
                match self.expire_step(&instance, before_us) {
                    Ok(0) => break,
                    Ok(n) => deleted += n,
                    Err(e) => {
                        tracing::error!(%instance, "decision record retention: {e}");
                        break;
                    }
                }
            }
        }
        deleted += self.conn().execute(
            "DELETE FROM forked_records WHERE received_us < ?1",
            params![before_us],
        )? as u64;
        Ok(deleted)
    }

    /// Deletes up to `EXPIRE_STEP` of an instance's expired prefix.
    fn expire_step(&self, instance: &str, before_us: i64) -> Result<u64, TrailError> {
        const EXPIRE_STEP: i64 = 10_000;
        {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // The prefix ends before the first record that is still young:
            // everything after it stays. A record's age runs from when it
            // was made, by its sidecar's clock, but never from later than
            // its receipt here (a clock running ahead does not keep records
            // longer), and from its receipt if its time is unreadable
            // (stored before receipt times were: it stops the cut).
            let young: Option<i64> = tx.query_row(
                "SELECT MIN(seq) FROM decisions WHERE instance = ?1 AND
                   COALESCE(MIN(time_us, received_us), time_us, received_us, ?2) >= ?2",
                params![instance, before_us],
                |r| r.get(0),
            )?;
            let first: Option<i64> = tx.query_row(
                "SELECT MIN(seq) FROM decisions WHERE instance = ?1",
                params![instance],
                |r| r.get(0),
            )?;
            let Some(first) = first else {
                return Ok(0);
            };
            let limit = young.unwrap_or(i64::MAX).min(first + EXPIRE_STEP);
            let last: Option<(i64, Vec<u8>)> = tx
                .query_row(
                    "SELECT seq, hash FROM decisions WHERE instance = ?1 AND seq < ?2
                     ORDER BY seq DESC LIMIT 1",
                    params![instance, limit],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((cut, hash)) = last else {
                return Ok(0);
            };
            tx.execute(
                "INSERT INTO chain_anchors (instance, seq, hash) VALUES (?1, ?2, ?3)
                 ON CONFLICT (instance) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                params![instance, cut, hash],
            )?;
            let n = tx.execute(
                "DELETE FROM decisions WHERE instance = ?1 AND seq <= ?2",
                params![instance, cut],
            )? as u64;
            tx.commit()?;
            Ok(n)
        }
    }

    /// One instance's records in the chained line form (`log verify --file`),
    /// from one snapshot, handed to `emit` in chunks of whole lines of about
    /// `chunk` bytes: a chain of millions of records is never held in
    /// memory at once. Stops early, without error, once `emit` returns
    /// false (whoever reads has gone).
    pub fn export_chunks(
        &self,
        instance: &str,
        chunk: usize,
        mut emit: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<(), TrailError> {
        let conn = self.reader()?;
        let mut stmt =
            conn.prepare("SELECT hash, body FROM decisions WHERE instance = ?1 ORDER BY seq")?;
        let mut rows = stmt.query(params![instance])?;
        let mut out = Vec::with_capacity(chunk);
        while let Some(row) = rows.next()? {
            let hash: Hash = row.get::<_, Vec<u8>>(0)?.try_into().unwrap_or(GENESIS);
            let body: String = row.get(1)?;
            chain::write_line(&mut out, &hash, body.as_bytes());
            if out.len() >= chunk && !emit(std::mem::replace(&mut out, Vec::with_capacity(chunk))) {
                return Ok(());
            }
        }
        if !out.is_empty() {
            emit(out);
        }
        Ok(())
    }

    /// The whole export at once, for tests.
    #[cfg(test)]
    pub fn export(&self, instance: &str) -> Result<Vec<u8>, TrailError> {
        let mut all = Vec::new();
        self.export_chunks(instance, 64 << 10, |c| {
            all.extend_from_slice(&c);
            true
        })?;
        Ok(all)
    }
}

/// Where an instance's stored chain ends, read in `conn` (a transaction that
/// is about to append to it, or the store's own connection).
pub fn head_in(conn: &Connection, instance: &str) -> Result<(u64, Hash), TrailError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM decisions WHERE instance = ?1 ORDER BY seq DESC LIMIT 1",
            params![instance],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match row {
        // Every record expired: the chain continues from its anchor.
        None => anchor_in(conn, instance),
        Some((seq, hash)) => Ok((seq as u64, hash.try_into().unwrap_or(GENESIS))),
    }
}

/// Where an instance's stored chain starts: its retention anchor (the last
/// record deleted), or the genesis.
fn anchor_in(conn: &Connection, instance: &str) -> Result<(u64, Hash), TrailError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM chain_anchors WHERE instance = ?1",
            params![instance],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match row {
        None => (0, GENESIS),
        Some((seq, hash)) => (seq as u64, hash.try_into().unwrap_or(GENESIS)),
    })
}

/// The decision store's schema version (`PRAGMA user_version`), raised by
/// each migration in [`DecisionStore::open`].
const STORE_VERSION: i64 = 3;

/// The store's schema version, refusing one a newer build has migrated
/// before anything is written to it: this build would store records
/// without what the newer schema keeps (as a build before chain heads did,
/// whose records read as "never received" breaks after the next upgrade),
/// so it fails closed instead.
fn known_version(conn: &Connection, path: &Path) -> Result<i64, TrailError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > STORE_VERSION {
        return Err(TrailError::Bad(format!(
            "decision store {}: schema version {version} was written by a newer arbiter (this one knows up to {STORE_VERSION}); run a control plane of that version or later on it",
            path.display()
        )));
    }
    Ok(version)
}

/// Whether the walked chain ends where the head kept on receipt says it
/// does: its last record deleted, edited consistently with its hash, or
/// records added after it are a break there.
fn past_head(
    conn: &Connection,
    instance: &str,
    last_seq: u64,
    last_hash: Option<Hash>,
) -> Result<Option<Break>, TrailError> {
    let kept: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM chain_heads WHERE instance = ?1",
            params![instance],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((seq, hash)) = kept else {
        return Ok(None);
    };
    let seq = seq as u64;
    let broken = |at: u64, reason: String| {
        Some(Break {
            instance: instance.to_owned(),
            seq: at,
            reason,
        })
    };
    Ok(match last_seq.cmp(&seq) {
        std::cmp::Ordering::Less => broken(
            last_seq + 1,
            format!("records {}..={seq} are missing: the chain had reached seq {seq} when it was received", last_seq + 1),
        ),
        std::cmp::Ordering::Greater => broken(
            seq + 1,
            format!("records {}..={last_seq} were never received: the chain ended at seq {seq}", seq + 1),
        ),
        // Only where the walk read the record itself (not an anchor).
        std::cmp::Ordering::Equal if last_hash.is_some_and(|h| h[..] != hash[..]) => broken(
            seq,
            "the last record is not the one received (its hash differs from the head kept on receipt)".into(),
        ),
        std::cmp::Ordering::Equal => None,
    })
}

/// What [`append_in`] did.
pub struct Appended {
    /// The breaks found (records are stored anyway).
    pub breaks: Vec<Break>,
    /// Records newly stored on the chain or kept apart; resends are not.
    pub stored: u64,
}

/// Verifies records against `head` and stores them in `tx` (the caller
/// commits, so they can go in with a change they record); moves `head`,
/// and the head kept for `verify`.
pub fn append_in(
    tx: &rusqlite::Transaction<'_>,
    instance: &str,
    head: &mut (u64, Hash),
    records: &[Incoming],
) -> Result<Appended, TrailError> {
    let mut breaks = Vec::new();
    let mut stored_count = 0;
    {
        let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO decisions (instance, seq, hash, body, decision_id, time_us, outcome,
                   subject_type, subject_id, resource_type, resource_id, policy_ids,
                   session_id, approval_id, received_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
        let mut flag = tx.prepare_cached(
            "INSERT INTO chain_breaks (instance, seq, reason) VALUES (?1, ?2, ?3)",
        )?;
        let received_us = crate::decision_log::time::now_micros() as i64;
        // Each record must continue the stored chain.
        let mut v = Verifier::default();
        v.resume(instance, head.0, head.1);
        let mut stored_hash =
            tx.prepare_cached("SELECT hash FROM decisions WHERE instance = ?1 AND seq = ?2")?;
        let mut keep_forked = tx.prepare_cached(&format!(
            "INSERT OR IGNORE INTO forked_records (instance, seq, hash, body, decision_id, received_us,
               {FILTERED})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
        ))?;
        // The first record of this batch newly kept apart: the fork is
        // flagged there, once per batch, and not again for a resend of what
        // is kept.
        let mut fork: Option<(u64, &str)> = None;
        let mut keep_apart = |r: &Incoming, reason: &'static str| -> Result<u64, TrailError> {
            let ix: Option<Indexed> = serde_json::from_slice(r.body).ok();
            let c = Columns::of(ix.as_ref());
            // Aged from its own time where it has one, so retention does not
            // keep a resent expired record another full period.
            let made = c.time_us.map_or(received_us, |t| t.min(received_us));
            let (seq, body) = (r.seq as i64, String::from_utf8_lossy(r.body));
            let record: [&dyn rusqlite::ToSql; 6] =
                [&instance, &seq, &&r.hash[..], &body, &c.decision_id, &made];
            let kept = keep_forked.execute(rusqlite::params_from_iter(
                record.into_iter().chain(c.filtered()),
            ))?;
            if kept == 1 && fork.is_none() {
                fork = Some((r.seq, reason));
            }
            Ok(kept as u64)
        };
        const FORKED: &str = "resent with another hash than the stored record: the sidecar's chain forked (its spool lost records it had shipped, or a copy of it runs elsewhere); its records at stored seqs are kept apart, as forked records";
        for r in records {
            if r.seq <= head.0 {
                // A resend of what is stored, unless its hash differs: then
                // the sidecar lost records it had shipped (a damaged spool,
                // or fsync off and a power loss) and numbers new ones with
                // their seqs. They cannot join the chain, whose place they
                // claim: kept apart. A seq with no stored record (expired,
                // or never received) cannot be compared: kept apart too.
                let stored: Option<Vec<u8>> = stored_hash
                    .query_row(params![instance, r.seq as i64], |row| row.get(0))
                    .optional()?;
                stored_count += match stored {
                    Some(h) if h[..] == r.hash[..] => 0,
                    Some(_) => keep_apart(r, FORKED)?,
                    None => keep_apart(
                        r,
                        "resent at a seq whose stored record has expired or was never received: kept apart, as a forked record, since it cannot be compared",
                    )?,
                };
                continue;
            }
            let hash = r.hash;
            // Not UTF-8 means damaged: its hash check fails below and flags
            // the break; the text is kept as well as it can be.
            let body = String::from_utf8_lossy(r.body);
            let body = body.as_ref();
            if let Err(b) = v.push(instance, r.seq, &hash, r.body) {
                flag.execute(params![instance, b.seq as i64, b.reason])?;
                breaks.push(b);
            }
            let ix: Option<Indexed> = serde_json::from_str(body).ok();
            let c = Columns::of(ix.as_ref());
            let inserted = insert.execute(params![
                instance,
                r.seq as i64,
                &hash[..],
                body,
                c.decision_id,
                c.time_us,
                c.outcome,
                c.subject_type,
                c.subject_id,
                c.resource_type,
                c.resource_id,
                c.policy_ids,
                // Tool listings are not what happens next in a session
                // (one listing can be hundreds of records): not linked.
                ix.as_ref()
                    .filter(|i| i.kind.as_deref() != Some("list_allowed_tools"))
                    .and_then(|i| i.session_id.as_deref()),
                ix.as_ref().and_then(|i| i.approval_id.as_deref()),
                received_us,
            ])?;
            if inserted == 0 {
                // Another stream of this instance stored the seq first (a
                // copy of its spool running elsewhere): the same record is
                // a resend, another one a fork. (`append` reads the head in
                // its transaction, so only a caller of `append_in` with a
                // head older than the store's gets here.)
                let stored: Option<Vec<u8>> = stored_hash
                    .query_row(params![instance, r.seq as i64], |row| row.get(0))
                    .optional()?;
                if let Some(stored) = stored.filter(|h| h[..] != hash[..]) {
                    stored_count += keep_apart(r, FORKED)?;
                    // The chain goes on from what is stored there.
                    let stored: Hash = stored.try_into().unwrap_or(GENESIS);
                    v.resume(instance, r.seq, stored);
                    *head = (r.seq, stored);
                    continue;
                }
            }
            stored_count += inserted as u64;
            *head = (r.seq, hash);
        }
        if let Some((seq, reason)) = fork {
            flag.execute(params![instance, seq as i64, reason])?;
            breaks.push(Break {
                instance: instance.to_owned(),
                seq,
                reason: reason.to_owned(),
            });
            breaks.sort_by_key(|b| b.seq);
        }
    }
    if head.0 > 0 {
        tx.prepare_cached(
            "INSERT INTO chain_heads (instance, seq, hash) VALUES (?1, ?2, ?3)
             ON CONFLICT (instance) DO UPDATE SET seq = excluded.seq, hash = excluded.hash
             WHERE excluded.seq >= chain_heads.seq",
        )?
        .execute(params![instance, head.0 as i64, &head.1[..]])?;
    }
    Ok(Appended {
        breaks,
        stored: stored_count,
    })
}

/// What an acknowledgement says of the stored head's hash.
fn acked_hash(head: (u64, Hash)) -> Vec<u8> {
    match head.0 {
        0 => Vec::new(),
        _ => head.1.to_vec(),
    }
}

/// The gRPC service sidecars ship to.
pub struct DecisionLogService {
    store: Arc<DecisionStore>,
    /// Batches being unpacked and stored at once, across all streams. A
    /// batch may unpack to 64 MiB, and appends take the store's one
    /// connection in turn anyway: more at once would only hold memory.
    /// A stream waiting here holds its one received (compressed) batch and
    /// stops reading, so flow control holds back what its sidecar sends.
    storing: Arc<tokio::sync::Semaphore>,
}

impl DecisionLogService {
    /// Batches unpacked and stored at once: one appending, one unpacking.
    const STORING_AT_ONCE: usize = 2;

    pub fn new(store: Arc<DecisionStore>) -> Self {
        Self {
            store,
            storing: Arc::new(tokio::sync::Semaphore::new(Self::STORING_AT_ONCE)),
        }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ShipAck, Status>> + Send>>;

#[tonic::async_trait]
impl DecisionLog for DecisionLogService {
    type ShipStream = AckStream;

    async fn ship(
        &self,
        request: Request<Streaming<RecordBatch>>,
    ) -> Result<Response<Self::ShipStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream must open with a batch naming the instance")
        })?;
        let instance = hello.instance_id.clone();
        if instance.is_empty() || instance.len() > 128 {
            return Err(Status::invalid_argument(
                "`instance_id` must be 1 to 128 characters",
            ));
        }
        if instance == super::journeys::INSTANCE {
            return Err(Status::invalid_argument(
                "`control-plane` is the control plane's own chain; sidecars may not write to it",
            ));
        }
        let (store, storing) = (self.store.clone(), self.storing.clone());
        let lookup = store.clone();
        let who = instance.clone();
        let mut head = tokio::task::spawn_blocking(move || lookup.head(&who))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let (tx, rx) = mpsc::channel::<Result<ShipAck, Status>>(8);
        tokio::spawn(async move {
            let mut pending = Some(hello);
            loop {
                let batch = match pending.take() {
                    Some(b) => b,
                    None => match inbound.message().await {
                        Ok(Some(b)) => b,
                        Ok(None) => return,
                        Err(e) => {
                            tracing::debug!(%instance, "decision stream ended: {e}");
                            return;
                        }
                    },
                };
                if batch.count == 0 {
                    // The hello: answer with where the stored chain stands.
                    if tx
                        .send(Ok(ShipAck {
                            instance_id: instance.clone(),
                            acked_seq: head.0,
                            chain_breaks: 0,
                            accepts_lz4: true,
                            acked_hash: acked_hash(head),
                            batch_last_seq: 0,
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                let (s, who) = (store.clone(), instance.clone());
                let batch_last_seq = (batch.first_seq + u64::from(batch.count)).saturating_sub(1);
                let Ok(turn) = storing.clone().acquire_owned().await else {
                    return;
                };
                let stored = tokio::task::spawn_blocking(move || {
                    let _turn = turn;
                    let text = match unpack(&batch) {
                        Ok(t) => t,
                        Err(e) => return (Err(TrailError::Bad(e)), head),
                    };
                    let records = match parse_batch(&who, batch.first_seq, batch.count, &text) {
                        Ok(r) => r,
                        Err(e) => return (Err(TrailError::Bad(e)), head),
                    };
                    let breaks = s.append(&who, &mut head, &records);
                    (breaks, head)
                })
                .await;
                let ack = match stored {
                    Ok((Ok(breaks), moved)) => {
                        head = moved;
                        for b in &breaks {
                            tracing::error!(instance = %b.instance, seq = b.seq, "decision chain break on receipt: {}", b.reason);
                        }
                        Ok(ShipAck {
                            instance_id: instance.clone(),
                            acked_seq: head.0,
                            chain_breaks: breaks.len() as u32,
                            accepts_lz4: true,
                            acked_hash: acked_hash(head),
                            batch_last_seq,
                        })
                    }
                    Ok((Err(TrailError::Bad(e)), _)) => Err(Status::invalid_argument(e)),
                    Ok((Err(e), _)) => Err(Status::internal(e.to_string())),
                    Err(e) => Err(Status::internal(e.to_string())),
                };
                let failed = ack.is_err();
                if tx.send(ack).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(from: u64, to: u64, prev: &mut Hash) -> Vec<(u64, Hash, Vec<u8>)> {
        (from..=to)
            .map(|seq| {
                let body = format!(
                    r#"{{"v":1,"instance":"i1","seq":{seq},"kind":"check","time":"2026-11-24T10:00:{:02}.000000Z","decision_id":"d{seq}","outcome":"ALLOW","policy_ids":["p{seq}"],"request":{{"subject":{{"type":"User","id":"u{}"}},"resource":{{"type":"Doc","id":"r"}}}}}}"#,
                    seq % 60,
                    seq % 2
                );
                *prev = chain::link(prev, body.as_bytes());
                (seq, *prev, body.into_bytes())
            })
            .collect()
    }

    fn incoming(r: &[(u64, Hash, Vec<u8>)]) -> Vec<Incoming<'_>> {
        r.iter()
            .map(|(seq, hash, body)| Incoming {
                seq: *seq,
                hash: *hash,
                body,
            })
            .collect()
    }

    #[test]
    fn a_resend_with_another_hash_is_flagged_as_a_fork() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DecisionStore::open(&dir.path().join("cp.db")).expect("open");
        let mut prev = GENESIS;
        let first = records(1, 4, &mut prev);
        let mut head = store.head("i1").expect("head");
        store
            .append("i1", &mut head, &incoming(&first))
            .expect("append");
        // The same records again: a resend, nothing to say.
        assert!(
            store
                .append("i1", &mut head, &incoming(&first[2..]))
                .expect("resend")
                .is_empty()
        );
        // A sidecar that lost 3..=4 numbers new records 3..=5 after 2.
        let mut forked = first[1].1;
        let again = other_records(3, 5, "f", &mut forked);
        let breaks = store
            .append("i1", &mut head, &incoming(&again))
            .expect("fork");
        assert_eq!(
            breaks.iter().map(|b| b.seq).collect::<Vec<_>>(),
            [3, 5],
            "{breaks:?}"
        );
        assert!(breaks[0].reason.contains("forked"), "{}", breaks[0].reason);
        let report = store.verify(Some("i1")).expect("verify");
        assert_eq!(report[0].flagged_on_receipt.len(), 2);
        // Nothing the fork decided is lost: 3 and 4 are kept apart (once,
        // and flagged once, though resent), 5 went on the chain after the
        // stored head.
        let resent = store
            .append("i1", &mut head, &incoming(&again[..2]))
            .expect("resent fork");
        assert!(resent.is_empty(), "{resent:?}");
        for id in ["f3", "f4"] {
            let kept = store.get(id).expect("get").expect("kept");
            assert!(kept.forked, "{id}");
            assert!(kept.record.get().contains(id));
        }
        let original = store.get("d3").expect("get").expect("stored");
        assert!(!original.forked);
        assert!(!store.get("f5").expect("get").expect("on the chain").forked);
        let kept: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM forked_records", [], |r| r.get(0))
            .expect("count");
        assert_eq!(kept, 2);
        // `log query` finds them too, marked, by the same filters.
        let ids = |f: Filter| -> Vec<(String, bool)> {
            let mut found: Vec<_> = store
                .query(&f)
                .expect("query")
                .iter()
                .map(|s| {
                    let v: serde_json::Value = serde_json::from_str(s.record.get()).expect("json");
                    (v["decision_id"].as_str().expect("id").to_owned(), s.forked)
                })
                .collect();
            found.sort();
            found
        };
        let on_chain = |id: &str| (id.to_owned(), false);
        let apart = |id: &str| (id.to_owned(), true);
        // Merged by time across both tables, the limit over both.
        let in_order = |limit: u32| -> Vec<String> {
            let f = Filter {
                limit: Some(limit),
                ..Filter::default()
            };
            let found = store.query(&f).expect("query");
            let id = |s: &Stored| {
                let v: serde_json::Value = serde_json::from_str(s.record.get()).expect("json");
                v["decision_id"].as_str().expect("id")[..1].to_owned() + &s.seq.to_string()
            };
            found.iter().map(id).collect()
        };
        // (d3 and f3, made in the same second, may come in either order.)
        let all = in_order(100);
        assert_eq!(
            (&all[..2], &all[6..]),
            (&["d1".to_owned(), "d2".into()][..], &["f5".to_owned()][..])
        );
        assert_eq!(in_order(3).len(), 3);
        assert_eq!(in_order(3)[..2], all[..2]);
        assert_eq!(
            ids(Filter::default()),
            [
                on_chain("d1"),
                on_chain("d2"),
                on_chain("d3"),
                on_chain("d4"),
                apart("f3"),
                apart("f4"),
                on_chain("f5")
            ]
        );
        let by_subject = Filter {
            subject: Some("u1".into()),
            ..Filter::default()
        };
        assert_eq!(
            ids(by_subject.clone()),
            [on_chain("d1"), on_chain("d3"), apart("f3"), on_chain("f5")]
        );
        let only_forked = Filter {
            forked: Some(true),
            ..by_subject.clone()
        };
        assert_eq!(ids(only_forked), [apart("f3")]);
        let only_chain = Filter {
            forked: Some(false),
            ..by_subject
        };
        assert_eq!(ids(only_chain).len(), 3);
        let by_policy = Filter {
            policy: Some("p4".into()),
            ..Filter::default()
        };
        assert_eq!(ids(by_policy), [on_chain("d4"), apart("f4")]);
        assert_eq!(
            store.verify(Some("i1")).expect("verify")[0].forked_records,
            2
        );
        // Retention deletes kept-apart records as it does the chain's.
        let far = crate::decision_log::time::now_micros() as i64 + 3_600_000_000;
        store.expire(far).expect("expire");
        assert!(store.get("f3").expect("get").is_none());
    }

    /// `records(from, to)` with decision ids tagged `tag` instead of `d`,
    /// chained on from `prev`: another chain at the same seqs.
    fn other_records(from: u64, to: u64, tag: &str, prev: &mut Hash) -> Vec<(u64, Hash, Vec<u8>)> {
        let mut ignored = GENESIS;
        records(from, to, &mut ignored)
            .into_iter()
            .map(|(seq, _, body)| {
                let body = String::from_utf8(body).expect("utf-8");
                let body = body.replace(r#""decision_id":"d"#, &format!(r#""decision_id":"{tag}"#));
                *prev = chain::link(prev, body.as_bytes());
                (seq, *prev, body.into_bytes())
            })
            .collect()
    }

    #[test]
    fn a_second_stream_past_the_stored_head_breaks_the_chain_where_it_joins() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DecisionStore::open(&dir.path().join("cp.db")).expect("open");
        let mut prev = GENESIS;
        let mut first = store.head("i1").expect("head");
        let mut second = first;
        store
            .append("i1", &mut first, &incoming(&records(1, 4, &mut prev)))
            .expect("first stream");
        // The copy, connected at the same head, sends its own 1..=6: 1..=4
        // are kept apart, 5 and 6 join the stored chain after its 4, and
        // the break is flagged there on receipt, not only found by verify.
        let mut other_prev = GENESIS;
        let other = other_records(1, 6, "o", &mut other_prev);
        let breaks = store
            .append("i1", &mut second, &incoming(&other))
            .expect("second stream");
        assert!(
            breaks
                .iter()
                .any(|b| b.seq == 5 && !b.reason.contains("forked")),
            "{breaks:?}"
        );
        assert_eq!(second, (6, other[5].1));
        let report = store.verify(Some("i1")).expect("verify");
        assert_eq!(report[0].first_break.as_ref().map(|b| b.seq), Some(5));
        assert_eq!(report[0].forked_records, 4);
    }

    #[test]
    fn a_second_stream_and_resends_at_expired_seqs_are_kept_apart() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DecisionStore::open(&dir.path().join("cp.db")).expect("open");
        let mut prev = GENESIS;
        let all = records(1, 4, &mut prev);
        // Two streams of one instance (a copy of its spool runs elsewhere),
        // each with the head it read when it connected.
        let mut first = store.head("i1").expect("head");
        let mut second = first;
        store
            .append("i1", &mut first, &incoming(&all))
            .expect("first stream");
        let mut other_prev = GENESIS;
        let other = other_records(1, 2, "o", &mut other_prev);
        let breaks = store
            .append("i1", &mut second, &incoming(&other))
            .expect("second stream");
        assert!(
            breaks.iter().any(|b| b.reason.contains("forked")),
            "{breaks:?}"
        );
        assert!(store.get("o1").expect("get").expect("kept").forked);
        assert!(!store.get("d1").expect("get").expect("stored").forked);

        // Retention takes 1..=4 (made at 10:00:01..04), and the kept-apart
        // records with them: they age from their own time.
        let at = |s: &str| crate::decision_log::time::parse_micros(s).expect("time") as i64;
        store.expire(at("2026-11-24T10:00:05Z")).expect("expire");
        assert!(store.get("d1").expect("get").is_none());
        assert!(store.get("o1").expect("get").is_none());
        // A record at an expired seq cannot be compared: kept apart, with
        // its own reason.
        let mut x_prev = GENESIS;
        let late = other_records(3, 3, "x", &mut x_prev);
        let breaks = store
            .append("i1", &mut first, &incoming(&late))
            .expect("resend");
        assert_eq!(breaks.len(), 1, "{breaks:?}");
        assert!(breaks[0].reason.contains("expired"), "{}", breaks[0].reason);
        assert!(store.get("x3").expect("get").expect("kept").forked);
    }

    #[test]
    fn batches_must_hold_what_they_claim() {
        let mut prev = GENESIS;
        let mut text = Vec::new();
        for (_, hash, body) in records(3, 5, &mut prev) {
            chain::write_line(&mut text, &hash, &body);
        }
        assert_eq!(parse_batch("i1", 3, 3, &text).expect("valid").len(), 3);
        // A damaged line stands at its position, with a hash nothing matches.
        let mut damaged = text.clone();
        let second = damaged.iter().position(|b| *b == b'\n').expect("lines") + 1;
        damaged[second] = b'#';
        let parsed = parse_batch("i1", 3, 3, &damaged).expect("kept");
        assert_eq!((parsed[1].seq, parsed[1].hash), (4, [0; 32]));
        // So does an emptied one; a readable line out of place is refused
        // (storing it would put intact records at the wrong seqs).
        let renumbered =
            String::from_utf8(text.clone())
                .expect("utf-8")
                .replacen("\"seq\":5", "\"seq\":9", 1);
        let err = parse_batch("i1", 3, 3, renumbered.as_bytes())
            .err()
            .expect("refused");
        assert!(
            err.contains("line 3 is seq 9") && err.contains("verify --file"),
            "{err}"
        );
        // A record whose own seq was damaged, between two in place, stands
        // at its position too: taking its seq would skip the records after.
        let misnumbered = String::from_utf8(text.clone()).expect("utf-8").replacen(
            "\"seq\":4",
            "\"seq\":70000",
            1,
        );
        let parsed = parse_batch("i1", 3, 3, misnumbered.as_bytes()).expect("kept");
        let intact = parse_batch("i1", 3, 3, &text).expect("valid");
        assert_eq!(
            parsed.iter().map(|r| (r.seq, r.hash)).collect::<Vec<_>>(),
            intact.iter().map(|r| (r.seq, r.hash)).collect::<Vec<_>>(),
            "each at its seq, with the hash its line carries"
        );
        assert!(String::from_utf8_lossy(parsed[1].body).contains("70000"));
        let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
        let emptied = [lines[0], b"", lines[2], b""].join(&b'\n');
        let parsed = parse_batch("i1", 3, 3, &emptied).expect("kept");
        assert_eq!((parsed[1].seq, parsed[1].body), (4, &b""[..]));
        for (instance, first, count, needle) in [
            ("i1", 4, 3, "expected seq 4"),
            ("i2", 3, 3, "expected seq 3 of i2"),
            ("i1", 3, 2, "holds 3"),
            // A count no batch this size can hold: refused, nothing sized by it.
            ("i1", 3, u32::MAX, "holds 3"),
            ("i1", 3, 4, "holds 3"),
            ("i1", u64::MAX, 3, "outside"),
            ("i1", 1 << 63, 3, "outside"),
            ("i1", i64::MAX as u64 - 1, 3, "outside"),
        ] {
            let err = parse_batch(instance, first, count, &text)
                .err()
                .expect("refused");
            assert!(err.contains(needle), "{err}");
        }
        // Lines are cheap to send and each costs a row: a batch holds at
        // most what a sidecar sends in one.
        let many = vec![b'\n'; MAX_BATCH_LINES + 1];
        let err = parse_batch("i1", 3, many.len() as u32, &many)
            .err()
            .expect("refused");
        assert!(err.contains("at most"), "{err}");
        let bomb = RecordBatch {
            lines_deflate: b"\xff\xffnot deflate".to_vec(),
            ..RecordBatch::default()
        };
        assert!(unpack(&bomb).expect_err("refused").contains("not DEFLATE"));
        let bomb = RecordBatch {
            lines_lz4: b"\x04\x22\x4d\x18 not lz4".to_vec(),
            ..RecordBatch::default()
        };
        assert!(
            unpack(&bomb)
                .expect_err("refused")
                .contains("not an LZ4 frame")
        );
        let both = RecordBatch {
            lines_lz4: vec![1],
            lines_deflate: vec![1],
            ..RecordBatch::default()
        };
        assert!(unpack(&both).expect_err("refused").contains("both"));
        // Sidecars from before LZ4 send DEFLATE; it is still read.
        let mut deflate =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut deflate, &text).expect("deflates");
        let old = RecordBatch {
            lines_deflate: deflate.finish().expect("deflates"),
            ..RecordBatch::default()
        };
        assert_eq!(unpack(&old).expect("unpacks"), text);
        // A batch that unpacks past the cap is refused, whichever the format.
        let lz4 = RecordBatch {
            lines_lz4: crate::decision_log::shipper::compress(&text).expect("packs"),
            ..RecordBatch::default()
        };
        let cap = text.len() as u64 - 1;
        for batch in [&lz4, &old] {
            assert_eq!(unpack_at_most(batch, cap + 1).expect("fits"), text);
            let err = unpack_at_most(batch, cap).expect_err("refused");
            assert!(err.contains("more than"), "{err}");
        }
    }

    #[test]
    fn a_store_from_before_sessions_gains_the_link_columns() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("old.db");
        Connection::open(&db)
            .expect("db")
            .execute_batch(
                "CREATE TABLE decisions (instance TEXT NOT NULL, seq INTEGER NOT NULL,
                   hash BLOB NOT NULL, body TEXT NOT NULL, decision_id TEXT, time_us INTEGER,
                   outcome TEXT, subject_type TEXT, subject_id TEXT, resource_type TEXT,
                   resource_id TEXT, policy_ids TEXT, PRIMARY KEY (instance, seq)) WITHOUT ROWID;",
            )
            .expect("old schema");
        let store = DecisionStore::open(&db).expect("migrates");
        let mut head = store.head("i").expect("head");
        let body = br#"{"v":1,"instance":"i","seq":1,"kind":"check","time":"2026-11-24T10:00:00Z","decision_id":"d1","session_id":"s1","approval_id":"a1"}"#;
        let hash = crate::decision_log::chain::link(&head.1, body);
        store
            .append("i", &mut head, &[Incoming { seq: 1, hash, body }])
            .expect("stored");
        let linked = store
            .followed_by("other", 0, Some("s1"), None)
            .expect("query");
        assert_eq!(linked.len(), 1);
        assert_eq!(
            store
                .followed_by("other", 0, None, Some("a1"))
                .expect("query")
                .len(),
            1
        );
        // Opening again is a no-op.
        DecisionStore::open(&db).expect("reopens");
    }

    /// Verifying and exporting a chain read a snapshot of their own: they
    /// do not wait for (or hold up) sidecars' appends.
    #[test]
    fn verify_and_export_do_not_take_the_appending_connection() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(DecisionStore::open(&dir.path().join("cp.db")).expect("open"));
        let mut prev = GENESIS;
        let mut head = store.head("i1").expect("head");
        store
            .append("i1", &mut head, &incoming(&records(1, 5, &mut prev)))
            .expect("append");
        let appending = store.conn();
        let (tx, rx) = std::sync::mpsc::channel();
        let reading = store.clone();
        std::thread::spawn(move || {
            let report = reading.verify(Some("i1")).expect("verify");
            let export = reading.export("i1").expect("export");
            let _ = tx.send((report[0].records, export.len()));
        });
        let (records, bytes) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("read while an append holds the connection");
        assert_eq!(records, 5);
        assert!(bytes > 0);
        drop(appending);
    }

    #[test]
    fn records_with_escaped_strings_are_indexed() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DecisionStore::open(&dir.path().join("cp.db")).expect("open");
        let mut head = store.head("i").expect("head");
        // JSON escapes these; they cannot be borrowed from the body.
        let body = br#"{"v":1,"instance":"i","seq":1,"kind":"check","time":"2026-11-24T10:00:00Z","decision_id":"d1","outcome":"ALLOW","session_id":"s\"1\\","policy_ids":["p\"q"],"request":{"subject":{"type":"User","id":"a\"b"}}}"#;
        let hash = chain::link(&head.1, body);
        store
            .append("i", &mut head, &[Incoming { seq: 1, hash, body }])
            .expect("stored");
        assert!(store.get("d1").expect("get").is_some(), "found by id");
        let by = |f: Filter| store.query(&f).expect("query").len();
        let subject = Filter {
            subject: Some("a\"b".into()),
            ..Filter::default()
        };
        assert_eq!(by(subject), 1);
        let policy = Filter {
            policy: Some("p\"q".into()),
            ..Filter::default()
        };
        assert_eq!(by(policy), 1);
        let next = store
            .followed_by("other", 0, Some("s\"1\\"), None)
            .expect("linked");
        assert_eq!(next.len(), 1);
    }

    #[test]
    fn a_policy_id_holding_commas_is_found_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("cp.db");
        let store = DecisionStore::open(&path).expect("open");
        let mut head = store.head("i").expect("head");
        let mut incoming = Vec::new();
        let bodies: Vec<String> = [r#"["a,b"]"#, r#"["a","b"]"#, r#"["c\\","d"]"#]
            .iter()
            .enumerate()
            .map(|(i, ids)| {
                format!(
                    r#"{{"v":1,"instance":"i","seq":{},"kind":"check","time":"2026-11-24T10:00:00Z","decision_id":"d{}","outcome":"ALLOW","policy_ids":{ids}}}"#,
                    i + 1,
                    i + 1
                )
            })
            .collect();
        for (i, body) in bodies.iter().enumerate() {
            let hash = chain::link(&head.1, body.as_bytes());
            head.1 = hash;
            incoming.push(Incoming {
                seq: i as u64 + 1,
                hash,
                body: body.as_bytes(),
            });
        }
        let mut at = store.head("i").expect("head");
        store.append("i", &mut at, &incoming).expect("stored");
        let found = |store: &DecisionStore, policy: &str| -> Vec<String> {
            let f = Filter {
                policy: Some(policy.into()),
                ..Filter::default()
            };
            let mut ids: Vec<String> = store
                .query(&f)
                .expect("query")
                .iter()
                .map(|r| {
                    serde_json::from_str::<serde_json::Value>(r.record.get()).expect("json")["decision_id"]
                        .as_str()
                        .expect("id")
                        .to_owned()
                })
                .collect();
            ids.sort();
            ids
        };
        let expect = |store: &DecisionStore| {
            assert_eq!(found(store, "a,b"), ["d1"]);
            assert_eq!(found(store, "a"), ["d2"]);
            assert_eq!(found(store, "b"), ["d2"]);
            assert_eq!(found(store, "c\\"), ["d3"]);
            assert!(found(store, "c").is_empty());
        };
        expect(&store);
        // A store from before ids were escaped lists them again on open.
        drop(store);
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "UPDATE decisions SET policy_ids = ',a,b,' WHERE decision_id = 'd1';
                 UPDATE decisions SET policy_ids = ',c\\,d,' WHERE decision_id = 'd3';
                 INSERT INTO decisions (instance, seq, hash, body, policy_ids)
                   VALUES ('i', 4, x'00', 'damaged, not JSON', ',x,y,');
                 PRAGMA user_version = 2;",
            )
            .expect("as before");
        }
        let store = DecisionStore::open(&path).expect("reopen");
        expect(&store);
    }

    #[test]
    fn forked_records_kept_before_they_were_indexed_are_found_by_query() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("old.db");
        let body = r#"{"v":1,"instance":"i","seq":3,"kind":"check","time":"2026-11-24T10:00:03Z","decision_id":"f3","outcome":"DENY","policy_ids":["p3"],"request":{"subject":{"type":"User","id":"alice"}}}"#;
        {
            // As a store of the version before: forked records without index columns.
            drop(DecisionStore::open(&db).expect("new store"));
            let conn = Connection::open(&db).expect("db");
            conn.execute_batch(
                "DROP TABLE forked_records;
                 CREATE TABLE forked_records (instance TEXT NOT NULL, seq INTEGER NOT NULL,
                   hash BLOB NOT NULL, body TEXT NOT NULL, decision_id TEXT,
                   received_us INTEGER NOT NULL, PRIMARY KEY (instance, seq, hash)) WITHOUT ROWID;
                 PRAGMA user_version = 1;",
            )
            .expect("old schema");
            conn.execute(
                "INSERT INTO forked_records VALUES ('i', 3, x'00', ?1, 'f3', 0)",
                params![body],
            )
            .expect("old row");
        }
        let store = DecisionStore::open(&db).expect("migrates");
        let found = store
            .query(&Filter {
                subject: Some("alice".into()),
                outcome: Some("DENY".into()),
                since: Some("2026-11-24T10:00:00Z".into()),
                ..Filter::default()
            })
            .expect("query");
        assert_eq!(found.len(), 1);
        assert!(found[0].forked);
        assert_eq!(
            store.verify(Some("i")).expect("verify")[0].forked_records,
            1
        );
        DecisionStore::open(&db).expect("reopens");
    }

    #[test]
    fn an_export_comes_in_chunks_of_whole_lines_and_stops_when_asked() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DecisionStore::open(&dir.path().join("cp.db")).expect("open");
        let mut prev = GENESIS;
        let all = records(1, 40, &mut prev);
        let mut head = store.head("i1").expect("head");
        store
            .append("i1", &mut head, &incoming(&all))
            .expect("append");
        let whole = store.export("i1").expect("export");
        assert!(chain::verify_lines(&whole).is_ok());

        let mut chunks = Vec::new();
        store
            .export_chunks("i1", 1000, |c| {
                chunks.push(c);
                true
            })
            .expect("chunks");
        assert!(chunks.len() > 3, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.ends_with(b"\n")));
        assert_eq!(chunks.concat(), whole);

        let mut taken = 0;
        store
            .export_chunks("i1", 1000, |_| {
                taken += 1;
                taken < 2
            })
            .expect("stopped");
        assert_eq!(taken, 2);

        let mut none = 0;
        store
            .export_chunks("nobody", 1000, |_| {
                none += 1;
                true
            })
            .expect("empty");
        assert_eq!(none, 0);
    }

    #[test]
    fn stores_dedupes_flags_breaks_and_verifies() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DecisionStore::open(&dir.path().join("cp.db")).expect("open");
        let mut prev = GENESIS;
        let first = records(1, 5, &mut prev);
        let mut head = store.head("i1").expect("head");
        assert!(
            store
                .append("i1", &mut head, &incoming(&first))
                .expect("append")
                .is_empty()
        );
        assert_eq!(store.records_stored.get(), 5);
        // A resend changes nothing, and is not counted as stored.
        assert!(
            store
                .append("i1", &mut head, &incoming(&first[2..]))
                .expect("again")
                .is_empty()
        );
        assert_eq!(store.records_stored.get(), 5);
        assert_eq!(head.0, 5);
        assert_eq!(store.head("i1").expect("head").0, 5);

        let q = store
            .query(&Filter {
                subject: Some("u1".into()),
                ..Filter::default()
            })
            .expect("query");
        assert_eq!(q.iter().map(|s| s.seq).collect::<Vec<_>>(), [1, 3, 5]);
        let q = store
            .query(&Filter {
                policy: Some("p4".into()),
                ..Filter::default()
            })
            .expect("query");
        assert_eq!(q.len(), 1);
        assert!(store.get("d2").expect("get").is_some());

        // A gap is flagged on receipt and found again by verify.
        let mut skipped = prev;
        let later = records(6, 8, &mut skipped);
        let breaks = store
            .append("i1", &mut head, &incoming(&later[1..]))
            .expect("gap");
        assert_eq!(breaks.len(), 1);
        assert_eq!(breaks[0].seq, 6);
        let report = store.verify(Some("i1")).expect("verify");
        assert_eq!(report[0].first_break.as_ref().map(|b| b.seq), Some(6));
        assert_eq!(report[0].flagged_on_receipt.len(), 1);
        let exported = store.export("i1").expect("export");
        assert_eq!(chain::verify_lines(&exported).expect_err("gap").seq, 6);

        // A chain whose beginning never arrived breaks at seq 1, on receipt and on verify.
        let mut prev = GENESIS;
        let late = records(1, 4, &mut prev);
        let mut head = store.head("i2").expect("head");
        let breaks = store
            .append("i2", &mut head, &incoming(&late[2..]))
            .expect("late start");
        assert_eq!(breaks.iter().map(|b| b.seq).collect::<Vec<_>>(), [1]);
        let report = store.verify(Some("i2")).expect("verify");
        assert_eq!(report[0].first_break.as_ref().map(|b| b.seq), Some(1));
    }

    #[test]
    fn records_deleted_or_replaced_at_the_chains_end_are_breaks() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DecisionStore::open(&dir.path().join("cp.db")).expect("open");
        let mut prev = GENESIS;
        let all = records(1, 6, &mut prev);
        let mut head = store.head("i1").expect("head");
        store
            .append("i1", &mut head, &incoming(&all))
            .expect("append");
        let first_break = |store: &DecisionStore| {
            let report = store.verify(Some("i1")).expect("verify");
            report[0].first_break.clone().map(|b| (b.seq, b.reason))
        };
        assert_eq!(first_break(&store), None);
        let sql = |q: &str| store.conn().execute_batch(q).expect("sql");

        // A record added after the head, linking to it: never received.
        let mut extra_prev = all[5].1;
        let extra = records(7, 7, &mut extra_prev);
        store
            .conn()
            .execute(
                "INSERT INTO decisions (instance, seq, hash, body) VALUES ('i1', 7, ?1, ?2)",
                params![
                    &extra[0].1[..],
                    String::from_utf8(extra[0].2.clone()).expect("utf-8")
                ],
            )
            .expect("add");
        let (seq, reason) = first_break(&store).expect("added");
        assert_eq!(seq, 7, "{reason}");
        assert!(reason.contains("never received"), "{reason}");
        sql("DELETE FROM decisions WHERE seq = 7");
        assert_eq!(first_break(&store), None);

        // The last record replaced by one whose hash links (edited along
        // with its hash): the chain walks, the kept head does not match.
        let body = String::from_utf8(all[5].2.clone())
            .expect("utf-8")
            .replace("ALLOW", "DENY");
        let forged_hash = chain::link(&all[4].1, body.as_bytes());
        store
            .conn()
            .execute(
                "UPDATE decisions SET body = ?1, hash = ?2 WHERE seq = 6",
                params![body, &forged_hash[..]],
            )
            .expect("forge");
        let (seq, reason) = first_break(&store).expect("replaced");
        assert_eq!(seq, 6, "{reason}");
        assert!(reason.contains("not the one received"), "{reason}");

        // The last two deleted: nothing to walk into, the head says 6.
        sql("DELETE FROM decisions WHERE seq >= 5");
        let (seq, reason) = first_break(&store).expect("deleted");
        assert_eq!(seq, 5, "{reason}");
        assert!(reason.contains("records 5..=6 are missing"), "{reason}");

        // All of them: the instance is still verified, and breaks at 1.
        sql("DELETE FROM decisions");
        let report = store.verify(None).expect("verify all");
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].first_break.as_ref().map(|b| b.seq), Some(1));
    }

    #[test]
    fn retention_cuts_a_prefix_and_what_is_left_still_verifies() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DecisionStore::open(&dir.path().join("cp.db")).expect("open");
        // Records 1..=8 made at 10:00:01..08.
        let mut prev = GENESIS;
        let all = records(1, 8, &mut prev);
        let mut head = store.head("i1").expect("head");
        store
            .append("i1", &mut head, &incoming(&all))
            .expect("append");
        let at = |s: &str| crate::decision_log::time::parse_micros(s).expect("time") as i64;

        // Keep what was made from 10:00:05 on: 1..=4 go.
        let deleted = store.expire(at("2026-11-24T10:00:05Z")).expect("expire");
        assert_eq!(deleted, 4);
        let report = store.verify(Some("i1")).expect("verify");
        assert!(
            report[0].first_break.is_none(),
            "{:?}",
            report[0].first_break
        );
        assert_eq!(
            (report[0].records, report[0].after_seq, report[0].last_seq),
            (4, 4, 8)
        );
        assert!(store.get("d4").expect("get").is_none());
        assert!(store.get("d5").expect("get").is_some());
        // Again: nothing more is old enough.
        assert_eq!(store.expire(at("2026-11-24T10:00:05Z")).expect("again"), 0);
        // A record without a readable time goes by its receipt, and one
        // from a clock running ahead by its receipt too: neither stops or
        // stretches the cut (ages as if received at 10:00:05 / 10:00:06).
        {
            let conn = store.conn();
            conn.execute(
                "UPDATE decisions SET time_us = NULL, received_us = ?1 WHERE seq = 5",
                params![at("2026-11-24T10:00:05Z")],
            )
            .expect("unreadable time");
            conn.execute(
                "UPDATE decisions SET time_us = ?1, received_us = ?2 WHERE seq = 6",
                params![at("2030-01-01T00:00:00Z"), at("2026-11-24T10:00:06Z")],
            )
            .expect("clock ahead");
        }
        assert_eq!(
            store
                .expire(at("2026-11-24T10:00:06.5Z"))
                .expect("by receipt"),
            2
        );
        assert!(store.get("d6").expect("get").is_none());
        assert!(store.get("d7").expect("get").is_some());

        // A record from before receipt times, its own time unreadable: it
        // ages from the upgrade (the next open), no longer stopping the cut.
        {
            let conn = store.conn();
            conn.execute(
                "UPDATE decisions SET time_us = NULL, received_us = NULL WHERE seq = 7",
                [],
            )
            .expect("legacy row");
            conn.execute_batch("PRAGMA user_version = 0")
                .expect("older store");
        }
        drop(store);
        let before = crate::decision_log::time::now_micros() as i64;
        let store = DecisionStore::open(&dir.path().join("cp.db")).expect("reopen");
        assert_eq!(
            store.expire(before).expect("young"),
            0,
            "ages from the upgrade"
        );
        let after = crate::decision_log::time::now_micros() as i64 + 1;
        assert_eq!(store.expire(after).expect("aged"), 2, "7, and 8 behind it");
        assert!(store.get("d7").expect("get").is_none());

        // The chain continues across the cut, even with every record gone.
        assert_eq!(store.expire(at("2026-11-25T00:00:00Z")).expect("all"), 0);
        let mut head = store.head("i1").expect("head");
        assert_eq!(head.0, 8, "continues from the anchor");
        let more = records(9, 10, &mut prev);
        assert!(
            store
                .append("i1", &mut head, &incoming(&more))
                .expect("append")
                .is_empty(),
            "no break at the cut"
        );
        let report = store.verify(Some("i1")).expect("verify");
        assert!(
            report[0].first_break.is_none(),
            "{:?}",
            report[0].first_break
        );

        // An edit after the cut is still found.
        store
            .conn()
            .execute(
                "UPDATE decisions SET body = replace(body, 'ALLOW', 'DENY') WHERE seq = 10",
                [],
            )
            .expect("tamper");
        let report = store.verify(Some("i1")).expect("verify");
        assert_eq!(report[0].first_break.as_ref().map(|b| b.seq), Some(10));
    }

    /// Shipped batches are unpacked and stored two at a time across all
    /// streams, and a stream waiting for a turn is answered once one frees:
    /// without the limit the first ack comes while both turns are held, and
    /// a turn never given back hangs the batches after it.
    #[tokio::test]
    async fn at_most_two_batches_are_stored_at_once_and_each_gives_its_turn_back() {
        use crate::api::pb::v1::decision_log_client::DecisionLogClient;
        use crate::api::pb::v1::decision_log_server::DecisionLogServer;
        use std::time::Duration;

        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(DecisionStore::open(&dir.path().join("cp.db")).expect("open"));
        let service = DecisionLogService::new(store.clone());
        let storing = service.storing.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DecisionLogServer::new(service))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );

        let mut prev = GENESIS;
        let mut batch = |from: u64, to: u64| {
            let mut text = Vec::new();
            for (_, hash, body) in records(from, to, &mut prev) {
                chain::write_line(&mut text, &hash, &body);
            }
            RecordBatch {
                instance_id: "i1".into(),
                first_seq: from,
                count: (to - from + 1) as u32,
                lines_deflate: Vec::new(),
                lines_lz4: crate::decision_log::shipper::compress(&text).expect("packs"),
            }
        };
        let (tx, rx) = mpsc::channel(4);
        tx.send(RecordBatch {
            instance_id: "i1".into(),
            ..RecordBatch::default()
        })
        .await
        .expect("hello");
        let mut client = DecisionLogClient::connect(url).await.expect("connect");
        let mut inbound = client
            .ship(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        // Read acks on their own task, so waiting for one can time out
        // without cancelling a read half done.
        let (acks_tx, mut acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(ack)) = inbound.message().await {
                let _ = acks_tx.send(ack);
            }
        });
        let next = Duration::from_secs(10);
        let hello = tokio::time::timeout(next, acks.recv())
            .await
            .expect("hello ack");
        assert_eq!(hello.expect("ack").acked_seq, 0);

        // Both turns taken (as by two other streams' batches): a batch waits.
        let first_turn = storing.clone().acquire_owned().await.expect("turn");
        let second_turn = storing.clone().acquire_owned().await.expect("turn");
        tx.send(batch(1, 3)).await.expect("send");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), acks.recv())
                .await
                .is_err(),
            "a batch was stored while both turns were held"
        );
        assert_eq!(store.head("i1").expect("head").0, 0, "nothing stored yet");
        drop(first_turn);
        let ack = tokio::time::timeout(next, acks.recv()).await.expect("ack");
        assert_eq!(ack.expect("ack").acked_seq, 3);

        // One turn left: each batch must give it back for the next.
        for from in [4, 7, 10] {
            tx.send(batch(from, from + 2)).await.expect("send");
            let ack = tokio::time::timeout(next, acks.recv())
                .await
                .expect("the turn came back");
            assert_eq!(ack.expect("ack").acked_seq, from + 2);
        }
        assert_eq!(storing.available_permits(), 1);
        drop(second_turn);
        assert_eq!(
            storing.available_permits(),
            DecisionLogService::STORING_AT_ONCE
        );
        assert!(
            store.verify(Some("i1")).expect("verify")[0]
                .first_break
                .is_none()
        );
    }
}
