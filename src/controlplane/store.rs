//! The control plane's embedded store (SQLite): every revision of every
//! bundle, and which revision is active. Writes are rare (publish, rollback);
//! sidecar polls are answered from memory by the server, not from here.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(
        "bundle `{name}` revision `{revision}` is already stored with different contents; publish a new revision"
    )]
    Conflict { name: String, revision: String },
    #[error("bundle `{name}` has no revision `{revision}`")]
    NoSuchRevision { name: String, revision: String },
}

/// One stored revision (without its bytes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RevisionInfo {
    pub revision: String,
    pub digest: String,
    pub signer: String,
    pub size: u64,
    pub published_at: String,
    pub active: bool,
}

/// A bundle's active revision with its archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRevision {
    pub name: String,
    pub revision: String,
    pub digest: String,
    pub archive: Vec<u8>,
}

/// What `put` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Created,
    /// The same revision with the same bytes was already there.
    Unchanged,
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS revisions (
               name TEXT NOT NULL,
               revision TEXT NOT NULL,
               digest TEXT NOT NULL,
               signer TEXT NOT NULL,
               archive BLOB NOT NULL,
               published_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
               PRIMARY KEY (name, revision)
             );
             CREATE TABLE IF NOT EXISTS active (
               name TEXT PRIMARY KEY,
               revision TEXT NOT NULL
             );",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (every
        // write is one statement or one transaction), so keep going.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a revision and makes it active, in one transaction.
    pub fn publish(
        &self,
        name: &str,
        revision: &str,
        digest: &str,
        signer: &str,
        archive: &[u8],
    ) -> Result<Put, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT digest FROM revisions WHERE name = ?1 AND revision = ?2",
                params![name, revision],
                |r| r.get(0),
            )
            .optional()?;
        let put = match existing {
            Some(d) if d == digest => Put::Unchanged,
            Some(_) => {
                return Err(StoreError::Conflict {
                    name: name.into(),
                    revision: revision.into(),
                });
            }
            None => {
                tx.execute(
                    "INSERT INTO revisions (name, revision, digest, signer, archive) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![name, revision, digest, signer, archive],
                )?;
                Put::Created
            }
        };
        tx.execute(
            "INSERT INTO active (name, revision) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET revision = excluded.revision",
            params![name, revision],
        )?;
        tx.commit()?;
        Ok(put)
    }

    /// Makes an already stored revision the active one (rollback or forward).
    pub fn activate(&self, name: &str, revision: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        let known: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM revisions WHERE name = ?1 AND revision = ?2)",
            params![name, revision],
            |r| r.get(0),
        )?;
        if !known {
            return Err(StoreError::NoSuchRevision {
                name: name.into(),
                revision: revision.into(),
            });
        }
        conn.execute(
            "INSERT INTO active (name, revision) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET revision = excluded.revision",
            params![name, revision],
        )?;
        Ok(())
    }

    /// The active revision of every bundle.
    pub fn all_active(&self) -> Result<Vec<ActiveRevision>, StoreError> {
        self.query_active("", params![])
    }

    /// One bundle's active revision.
    pub fn active(&self, name: &str) -> Result<Option<ActiveRevision>, StoreError> {
        Ok(self.query_active("WHERE a.name = ?1", params![name])?.pop())
    }

    fn query_active(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<ActiveRevision>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT a.name, a.revision, r.digest, r.archive FROM active a
             JOIN revisions r ON r.name = a.name AND r.revision = a.revision {filter}"
        ))?;
        let rows = stmt.query_map(args, |r| {
            Ok(ActiveRevision {
                name: r.get(0)?,
                revision: r.get(1)?,
                digest: r.get(2)?,
                archive: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One stored revision's archive.
    pub fn archive(&self, name: &str, revision: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT archive FROM revisions WHERE name = ?1 AND revision = ?2",
                params![name, revision],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Every stored revision of a bundle, newest first.
    pub fn revisions(&self, name: &str) -> Result<Vec<RevisionInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT r.revision, r.digest, r.signer, length(r.archive), r.published_at,
                    r.revision = (SELECT revision FROM active WHERE name = r.name)
             FROM revisions r WHERE r.name = ?1 ORDER BY r.published_at DESC, r.rowid DESC",
        )?;
        let rows = stmt.query_map(params![name], |r| {
            Ok(RevisionInfo {
                revision: r.get(0)?,
                digest: r.get(1)?,
                signer: r.get(2)?,
                size: r.get::<_, i64>(3)?.try_into().unwrap_or(0),
                published_at: r.get(4)?,
                active: r.get::<_, Option<bool>>(5)?.unwrap_or(false),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_rollback_and_conflicts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("cp.db")).expect("opens");
        assert_eq!(
            store.publish("b", "r1", "d1", "k", b"one").expect("r1"),
            Put::Created
        );
        assert_eq!(
            store.publish("b", "r1", "d1", "k", b"one").expect("again"),
            Put::Unchanged
        );
        assert!(matches!(
            store.publish("b", "r1", "d9", "k", b"other"),
            Err(StoreError::Conflict { .. })
        ));
        store.publish("b", "r2", "d2", "k", b"two").expect("r2");
        assert_eq!(
            store.active("b").expect("query").map(|a| a.revision),
            Some("r2".into())
        );
        store.activate("b", "r1").expect("rollback");
        assert_eq!(
            store.active("b").expect("query").map(|a| a.archive),
            Some(b"one".to_vec())
        );
        assert!(matches!(
            store.activate("b", "r7"),
            Err(StoreError::NoSuchRevision { .. })
        ));
        let revs = store.revisions("b").expect("list");
        assert_eq!(revs.len(), 2);
        assert!(revs.iter().any(|r| r.revision == "r1" && r.active));
        drop(store);
        // Survives a restart.
        let store = Store::open(&dir.path().join("cp.db")).expect("reopens");
        assert_eq!(store.all_active().expect("all").len(), 1);
    }
}
