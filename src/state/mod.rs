//! The SQLite state store: configuration (platforms, targets, rules) and history (tasks).
//!
//! One file (`state.db`), WAL mode, a busy timeout so concurrent `vmbackup`
//! processes wait for each other instead of failing (up to [`BUSY_WAIT`]; then a
//! busy error, exit 4, naming the file and the process holding it, [`db_error`]), and a schema versioned with
//! `PRAGMA user_version` and upgraded by forward-only migrations ([`schema`]).
//! Writes that check-then-change run inside an IMMEDIATE transaction, so two
//! processes can never both pass a check (e.g. R35) and both write.
//!
//! The repository on the target is the source of truth for backup data; this store
//! is the source of truth for configuration and task history.

pub mod figures;
pub mod logs;
pub mod platforms;
pub mod recoveries;
pub mod rules;
pub mod schema;
pub mod slots;
pub mod targets;
pub mod tasks;
pub mod vm_status;

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, TransactionBehavior};

/// How long a command waits for another process's write to the state store
/// before it gives up with a busy error (exit 4).
pub const BUSY_WAIT: Duration = Duration::from_secs(10);

/// An open state store.
pub struct State {
    conn: Connection,
    path: PathBuf,
}

impl State {
    /// Open (creating if needed) the state database at `path`: directory 0700
    /// (`private_dir`: tightened if others can read it, refused if they can write),
    /// file 0600, WAL, busy timeout, schema migrated to the current version.
    pub fn open(path: &Path) -> Result<State> {
        State::open_inner(path).map_err(|e| db_error(path, e))
    }

    fn open_inner(path: &Path) -> Result<State> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::private_dir::ensure(dir, "state directory")?;
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
        conn.busy_timeout(BUSY_WAIT)?;
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
        let path = self.path.clone();
        let run = || -> Result<T> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .context("cannot lock the state store for writing")?;
            let out = f(&tx)?;
            tx.commit().context("cannot commit to the state store")?;
            Ok(out)
        };
        run().map_err(|e| db_error(&path, e))
    }
}

/// A state-store error as people should see it: SQLite busy becomes a busy
/// error (exit 4) naming the database file and, where /proc/locks shows it, the
/// process holding it; any other SQLite error names the file. Errors that are
/// not SQLite's (a refused rule, say) pass unchanged.
pub fn db_error(path: &Path, err: anyhow::Error) -> anyhow::Error {
    let sqlite = err
        .chain()
        .find_map(|c| c.downcast_ref::<rusqlite::Error>())
        .and_then(|e| e.sqlite_error_code());
    match sqlite {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            let holders = lock_holders(path);
            let who = if holders.is_empty() {
                "another process".to_string()
            } else {
                holders.join(", ")
            };
            crate::error::busy(format!(
                "state database {} is busy: {who} held it for more than {} s; try again when it is done",
                path.display(),
                BUSY_WAIT.as_secs()
            ))
        }
        Some(_) if !format!("{err:#}").contains(&path.display().to_string()) => {
            err.context(format!("state database {}", path.display()))
        }
        _ => err,
    }
}

/// The other processes holding a lock on the database or its WAL files, as
/// `pid N (command)`, writers first (from /proc/locks; empty when unknown).
fn lock_holders(path: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let inodes: Vec<(u64, u64)> = ["", "-wal", "-shm"]
        .iter()
        .filter_map(|side| fs::metadata(format!("{}{side}", path.display())).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let Ok(locks) = fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let me = std::process::id().to_string();
    let mut found: Vec<(bool, String)> = Vec::new();
    for line in locks.lines() {
        // `1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF` ("->" marks waiters).
        let f: Vec<&str> = line.split_whitespace().filter(|w| *w != "->").collect();
        let (Some(rw), Some(pid), Some(id)) = (f.get(3), f.get(4), f.get(5)) else {
            continue;
        };
        let mut parts = id.split(':');
        let (Some(major), Some(minor), Some(ino)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(major), Ok(minor), Ok(ino)) = (
            u64::from_str_radix(major, 16),
            u64::from_str_radix(minor, 16),
            ino.parse::<u64>(),
        ) else {
            continue;
        };
        let ours = inodes.iter().any(|&(dev, i)| {
            i == ino
                && rustix::fs::major(dev) as u64 == major
                && rustix::fs::minor(dev) as u64 == minor
        });
        if !ours || *pid == me || pid.starts_with('-') {
            continue;
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let who = format!("pid {pid} ({})", comm.trim());
        if !found.iter().any(|(_, w)| *w == who) {
            found.push((*rw == "WRITE", who));
        }
    }
    found.sort_by_key(|(write, _)| !write);
    found.into_iter().map(|(_, w)| w).collect()
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
