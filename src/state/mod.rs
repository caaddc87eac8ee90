//! The SQLite state store: configuration (platforms, targets, rules) and history (tasks).
//!
//! One file (`state.db`), WAL mode, a busy timeout so concurrent `vmbackup`
//! processes wait for each other instead of failing, and a schema versioned with
//! `PRAGMA user_version` and upgraded by forward-only migrations ([`schema`]).
//! Writes that check-then-change run inside an IMMEDIATE transaction, so two
//! processes can never both pass a check (e.g. R35) and both write.
//!
//! The repository on the target is the source of truth for backup data; this store
//! is the source of truth for configuration and task history.

pub mod logs;
pub mod platforms;
pub mod recoveries;
pub mod rules;
pub mod schema;
pub mod slots;
pub mod targets;
pub mod tasks;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, TransactionBehavior};

/// An open state store.
pub struct State {
    conn: Connection,
    path: PathBuf,
}

impl State {
    /// Open (creating if needed) the state database at `path`: directory 0700,
    /// file 0600, WAL, busy timeout, schema migrated to the current version.
    pub fn open(path: &Path) -> Result<State> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("cannot create state directory {}", dir.display()))?;
            }
        }
        if !path.exists() {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create state file {}", path.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open state file {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        for side in ["-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{side}", path.display()));
            if p.exists() {
                let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o600));
            }
        }
        let mut state = State {
            conn,
            path: path.to_path_buf(),
        };
        schema::migrate(&mut state.conn)
            .with_context(|| format!("cannot migrate state file {}", path.display()))?;
        Ok(state)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read-only access for queries.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Run `f` in an IMMEDIATE transaction (the write lock is taken up front, so
    /// checks inside `f` see what no other process can change until commit).
    pub fn write<T>(&mut self, f: impl FnOnce(&rusqlite::Transaction) -> Result<T>) -> Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .context("cannot lock the state store for writing")?;
        let out = f(&tx)?;
        tx.commit().context("cannot commit to the state store")?;
        Ok(out)
    }
}

/// Now, as stored in the database: RFC 3339 UTC with seconds.
pub fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Names of platforms, targets and rules: 1-64 of `[A-Za-z0-9._-]`, starting with a
/// letter or digit (they appear in paths and command lines).
pub fn check_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(crate::error::invalid(
            field,
            name,
            "use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
        ))
    }
}
