//! Lock objects in the store (restic's model): `locks/<id>`, one small JSON
//! object per holder, so locking works on any [`Store`] (no `flock`).
//!
//! | lock              | held by                                   | conflicts with                        |
//! |-------------------|-------------------------------------------|---------------------------------------|
//! | repository shared | backup, cleanup, prune, forget, verify    | repository exclusive                  |
//! | repository exclusive | GC, removing a whole repository        | every other lock                      |
//! | VM `x`            | backup, cleanup, prune, forget of VM `x`  | VM `x`, repository exclusive          |
//!
//! Taking a lock: list the live locks (removing stale ones), refuse on a
//! conflict, create our object, list again and back off (delete ours) if a
//! conflicting lock appeared meanwhile. Two lockers racing may both back off,
//! but never both proceed: each created its object before its second listing,
//! so the later one sees the earlier one. All of it is non-blocking: a conflict
//! is a busy error (exit 4) naming the holder; callers that must wait retry.
//!
//! A holder refreshes its object's heartbeat every [`HEARTBEAT`]; the object
//! says until when it is valid (`expires`). A lock is stale, and removed by the
//! next locker, when it expired, or when its holder ran on this machine and
//! its process is gone (pid and process start time, so a reused pid does not
//! keep a dead lock alive). A holder whose object disappeared, or that could
//! not refresh it before it expired, has lost the lock: [`RepoLock::check`]
//! fails, and writers check before they commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::store::Store;
use crate::error::busy;

/// The key prefix of lock objects.
pub const LOCKS_PREFIX: &str = "locks/";
/// How often a holder refreshes its lock object.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// How long a lock object stays valid after its last refresh.
pub const VALIDITY: Duration = Duration::from_secs(300);

/// What a lock covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LockScope {
    /// The whole repository (shared or exclusive).
    Repository,
    /// One VM's points (always exclusive).
    Vm { vm: String },
}

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// The content of a lock object (docs/FORMAT.md, "Locks").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub id: String,
    pub scope: LockScope,
    pub mode: LockMode,
    /// What the holder does: `backup`, `gc`, `prune`, ...
    pub purpose: String,
    pub host: String,
    /// `/etc/machine-id` of the holder's machine, when it has one.
    pub machine_id: Option<String>,
    pub pid: u32,
    /// The holder process's start time (clock ticks since boot, Linux).
    pub pid_start: Option<u64>,
    /// RFC 3339 UTC.
    pub created: String,
    pub heartbeat: String,
    pub expires: String,
}

impl LockInfo {
    fn new(scope: LockScope, mode: LockMode, purpose: &str) -> LockInfo {
        let now = Utc::now();
        let pid = std::process::id();
        let id = format!(
            "{}-{pid}-{:016x}",
            now.format("%Y%m%dT%H%M%SZ"),
            super::store::unique_u64()
        );
        let mut info = LockInfo {
            id,
            scope,
            mode,
            purpose: purpose.to_string(),
            host: hostname(),
            machine_id: machine_id(),
            pid,
            pid_start: process_start(pid),
            created: stamp(now),
            heartbeat: String::new(),
            expires: String::new(),
        };
        info.refresh(now);
        info
    }

    fn refresh(&mut self, now: DateTime<Utc>) {
        self.heartbeat = stamp(now);
        self.expires = stamp(now + chrono::Duration::from_std(VALIDITY).unwrap_or_default());
    }

    fn key(&self) -> String {
        format!("{LOCKS_PREFIX}{}", self.id)
    }

    fn expires_at(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.expires)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// Why this lock is stale, or `None` while its holder may be alive.
    pub fn stale_reason(&self, now: DateTime<Utc>) -> Option<String> {
        match self.expires_at() {
            Some(t) if now > t => {
                return Some(format!(
                    "its heartbeat stopped (valid until {})",
                    self.expires
                ))
            }
            None => return Some(format!("its expiry '{}' is not a time", self.expires)),
            Some(_) => {}
        }
        let same_machine = match (&self.machine_id, machine_id()) {
            (Some(a), Some(b)) => *a == b,
            _ => self.host == hostname(),
        };
        if same_machine && !process_alive(self.pid, self.pid_start) {
            return Some(format!("process {} on {} is gone", self.pid, self.host));
        }
        None
    }

    fn conflicts_with(&self, scope: &LockScope, mode: LockMode) -> bool {
        let exclusive_repo =
            |s: &LockScope, m: LockMode| *s == LockScope::Repository && m == LockMode::Exclusive;
        if exclusive_repo(scope, mode) || exclusive_repo(&self.scope, self.mode) {
            return true;
        }
        match (&self.scope, scope) {
            (LockScope::Vm { vm: a }, LockScope::Vm { vm: b }) => a == b,
            _ => false,
        }
    }

    /// "gc (exclusive) by pid 123 on host h since T".
    pub fn describe(&self) -> String {
        let mode = match self.mode {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusive",
        };
        format!(
            "{} ({mode}) by pid {} on {} since {}",
            self.purpose, self.pid, self.host, self.created
        )
    }
}

/// The live lock objects of a store; stale ones are removed on the way.
/// An object that cannot be parsed counts as a live lock (it may be a newer
/// vmbackup's): refusing is safe, ignoring it is not.
pub fn live_locks(store: &dyn Store) -> Result<Vec<LockInfo>> {
    let mut keys = Vec::new();
    store.list(LOCKS_PREFIX, &mut |info| {
        keys.push(info.key);
        Ok(())
    })?;
    let now = Utc::now();
    let mut live = Vec::new();
    for key in keys {
        // Released between the listing and now: gone, not a conflict.
        let Some(bytes) = store.get(&key)? else {
            continue;
        };
        match serde_json::from_slice::<LockInfo>(&bytes) {
            Ok(info) if info.key() == key => match info.stale_reason(now) {
                Some(_) => store.delete(&key)?,
                None => live.push(info),
            },
            _ => bail!(
                "lock object {key} cannot be read; if no vmbackup uses this repository, delete it"
            ),
        }
    }
    Ok(live)
}

/// The state a held lock shares with its heartbeat thread.
#[derive(Debug)]
struct Shared {
    store: Arc<dyn Store>,
    info: Mutex<LockInfo>,
    lost: AtomicBool,
}

impl Shared {
    /// Fails when the lock was lost: its object is gone or expired.
    fn check(&self, what: &str) -> Result<()> {
        let info = self
            .info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let present = self.store.get(&info.key())?.is_some();
        let valid = info.expires_at().is_some_and(|t| Utc::now() <= t);
        if self.lost.load(Ordering::SeqCst) || !present || !valid {
            bail!(
                "the lock on {what} was lost (lock object {} was removed or expired); stopping",
                info.key()
            );
        }
        Ok(())
    }

    /// Refresh the heartbeat; false once the lock is lost.
    fn refresh(&self) -> bool {
        let mut info = self.info.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Utc::now();
        // Past our own expiry another locker may already have removed us and
        // taken the lock: re-creating the object would let both proceed.
        let expired = info.expires_at().is_none_or(|t| now > t);
        let present = matches!(self.store.get(&info.key()), Ok(Some(_)));
        if expired || !present {
            self.lost.store(true, Ordering::SeqCst);
            return false;
        }
        info.refresh(now);
        if let Ok(json) = serde_json::to_vec(&*info) {
            // A failed refresh is retried at the next beat, while still valid.
            let _ = self.store.put(&info.key(), &json);
        }
        true
    }
}

/// A lock object this process holds; released (deleted) on drop.
#[derive(Debug)]
struct Held {
    shared: Arc<Shared>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Held {
    /// Take a lock (module docs), or fail at once with a busy error.
    fn acquire(
        store: &Arc<dyn Store>,
        scope: LockScope,
        mode: LockMode,
        purpose: &str,
        what: &str,
    ) -> Result<Held> {
        let refuse = |holder: &LockInfo| busy(format!("{what} is locked: {}", holder.describe()));
        if let Some(c) = live_locks(store.as_ref())?
            .iter()
            .find(|l| l.conflicts_with(&scope, mode))
        {
            return Err(refuse(c));
        }
        let info = LockInfo::new(scope.clone(), mode, purpose);
        let key = info.key();
        let json = serde_json::to_vec(&info)?;
        if !store
            .put_if_absent(&key, &json)
            .with_context(|| format!("cannot create lock object {key}"))?
        {
            bail!("lock object {key} exists already");
        }
        let conflict = live_locks(store.as_ref()).map(|locks| {
            locks
                .into_iter()
                .find(|l| l.id != info.id && l.conflicts_with(&scope, mode))
        });
        match conflict {
            Ok(None) => {}
            Ok(Some(c)) => {
                let _ = store.delete(&key);
                return Err(refuse(&c));
            }
            Err(e) => {
                let _ = store.delete(&key);
                return Err(e);
            }
        }
        let shared = Arc::new(Shared {
            store: store.clone(),
            info: Mutex::new(info),
            lost: AtomicBool::new(false),
        });
        let (stop, beats) = channel::<()>();
        let beat = shared.clone();
        let thread = std::thread::spawn(move || loop {
            match beats.recv_timeout(HEARTBEAT) {
                Err(RecvTimeoutError::Timeout) => {
                    if !beat.refresh() {
                        return;
                    }
                }
                _ => return,
            }
        });
        Ok(Held {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn check(&self, what: &str) -> Result<()> {
        self.shared.check(what)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let key = self
            .shared
            .info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .key();
        // Best effort: a lock left behind is stale once this process is gone.
        let _ = self.shared.store.delete(&key);
        let _ = self.shared.store.flush();
    }
}

/// A repository lock (shared or exclusive) held by this process.
#[derive(Debug)]
pub struct RepoLock {
    held: Held,
    mode: LockMode,
    location: String,
}

impl RepoLock {
    pub(crate) fn acquire(
        store: &Arc<dyn Store>,
        mode: LockMode,
        purpose: &str,
    ) -> Result<RepoLock> {
        let location = store.location();
        let what = format!("repository {location}");
        Ok(RepoLock {
            held: Held::acquire(store, LockScope::Repository, mode, purpose, &what)?,
            mode,
            location,
        })
    }

    /// Shared or exclusive.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Fails when the lock was lost (see module docs).
    pub fn check(&self) -> Result<()> {
        self.held.check(&format!("repository {}", self.location))
    }

    /// The repository (its location) this lock belongs to.
    pub(crate) fn location(&self) -> &str {
        &self.location
    }
}

/// Proof that this process is the one writer of a VM's points. It is taken
/// under a repository lock, and valid only while both are held.
#[derive(Debug)]
pub struct VmLock {
    held: Held,
    repo: Arc<Shared>,
    vm_key: String,
    location: String,
}

impl VmLock {
    pub(crate) fn acquire(
        store: &Arc<dyn Store>,
        repo: &RepoLock,
        vm_key: &str,
        purpose: &str,
    ) -> Result<VmLock> {
        let what = format!("VM '{vm_key}'");
        let scope = LockScope::Vm {
            vm: vm_key.to_string(),
        };
        Ok(VmLock {
            held: Held::acquire(store, scope, LockMode::Exclusive, purpose, &what)?,
            repo: repo.held.shared.clone(),
            vm_key: vm_key.to_string(),
            location: repo.location.clone(),
        })
    }

    /// The VM key this lock covers.
    pub fn vm_key(&self) -> &str {
        &self.vm_key
    }

    /// Fails when this lock or the repository lock it was taken under was lost
    /// (see module docs).
    pub fn check(&self) -> Result<()> {
        self.held.check(&format!("VM '{}'", self.vm_key))?;
        self.repo.check(&format!("repository {}", self.location))
    }

    /// The repository (its location) this lock belongs to.
    pub(crate) fn location(&self) -> &str {
        &self.location
    }
}

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn machine_id() -> Option<String> {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A process's start time: field 22 of `/proc/<pid>/stat` (after the command
/// name, which may itself hold spaces and parentheses).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// True while process `pid` runs and, when known, started at `start`.
fn process_alive(pid: u32, start: Option<u64>) -> bool {
    match (process_start(pid), start) {
        (None, _) => false,
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{exit_code_of, ExitCode};
    use crate::repo::store::LocalStore;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path()).unwrap());
        (dir, s)
    }

    fn lock_count(s: &dyn Store) -> usize {
        let mut n = 0;
        s.list(LOCKS_PREFIX, &mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        n
    }

    #[test]
    fn shared_locks_coexist_exclusive_excludes_everything() {
        let (_d, s) = store();
        let a = RepoLock::acquire(&s, LockMode::Shared, "backup").unwrap();
        let _b = RepoLock::acquire(&s, LockMode::Shared, "prune").unwrap();
        let err = RepoLock::acquire(&s, LockMode::Exclusive, "gc").unwrap_err();
        assert_eq!(exit_code_of(&err), ExitCode::Busy);
        assert!(err.to_string().contains("(shared) by pid"), "{err}");
        assert_eq!(lock_count(s.as_ref()), 2, "the refused locker left nothing");
        a.check().unwrap();
        drop(a);
        drop(_b);
        assert_eq!(lock_count(s.as_ref()), 0);
        let gc = RepoLock::acquire(&s, LockMode::Exclusive, "gc").unwrap();
        let err = RepoLock::acquire(&s, LockMode::Shared, "backup").unwrap_err();
        assert!(err.to_string().contains("gc (exclusive)"), "{err}");
        let err = VmLock::acquire(&s, &gc, "lab/web01", "backup").unwrap_err();
        assert_eq!(exit_code_of(&err), ExitCode::Busy);
        drop(gc);
    }

    #[test]
    fn vm_locks_exclude_the_same_vm_only() {
        let (_d, s) = store();
        let repo = RepoLock::acquire(&s, LockMode::Shared, "backup").unwrap();
        let held = VmLock::acquire(&s, &repo, "lab/web01", "backup").unwrap();
        let err = VmLock::acquire(&s, &repo, "lab/web01", "prune").unwrap_err();
        assert_eq!(exit_code_of(&err), ExitCode::Busy);
        assert!(
            err.to_string().contains("VM 'lab/web01' is locked"),
            "{err}"
        );
        let _other = VmLock::acquire(&s, &repo, "lab/db01", "backup").unwrap();
        held.check().unwrap();
        drop(held);
        let again = VmLock::acquire(&s, &repo, "lab/web01", "prune").unwrap();
        drop(repo);
        assert!(
            again.check().is_err(),
            "valid only under the repository lock"
        );
    }

    #[test]
    fn stale_locks_are_removed_live_ones_kept() {
        let (_d, s) = store();
        // A holder on this machine whose process is gone.
        let mut dead = LockInfo::new(LockScope::Repository, LockMode::Exclusive, "gc");
        dead.pid = u32::MAX - 1;
        dead.pid_start = Some(1);
        // A holder on another machine whose heartbeat stopped long ago.
        let mut expired = LockInfo::new(LockScope::Repository, LockMode::Exclusive, "gc");
        expired.id.push_str("-x");
        expired.host = "elsewhere".into();
        expired.machine_id = Some("other".into());
        expired.expires = "2000-01-01T00:00:00Z".into();
        // A holder on another machine that is alive.
        let mut remote = LockInfo::new(LockScope::Repository, LockMode::Shared, "backup");
        remote.id.push_str("-y");
        remote.host = "elsewhere".into();
        remote.machine_id = Some("other".into());
        for l in [&dead, &expired, &remote] {
            s.put(&l.key(), &serde_json::to_vec(l).unwrap()).unwrap();
        }
        let live = live_locks(s.as_ref()).unwrap();
        assert_eq!(live, vec![remote.clone()]);
        assert_eq!(lock_count(s.as_ref()), 1);
        // This process is alive: its own lock is not stale.
        let mine = LockInfo::new(LockScope::Repository, LockMode::Shared, "backup");
        assert_eq!(mine.stale_reason(Utc::now()), None);
    }

    #[test]
    fn a_lock_whose_object_vanished_is_lost() {
        let (_d, s) = store();
        let l = RepoLock::acquire(&s, LockMode::Shared, "backup").unwrap();
        l.check().unwrap();
        let key = l.held.shared.info.lock().unwrap().key();
        s.delete(&key).unwrap();
        assert!(l.check().unwrap_err().to_string().contains("was lost"));
        assert!(
            !l.held.shared.refresh(),
            "the heartbeat does not re-create it"
        );
    }

    #[test]
    fn unreadable_lock_objects_refuse_rather_than_being_ignored() {
        let (_d, s) = store();
        s.put("locks/garbage", b"not json").unwrap();
        let err = RepoLock::acquire(&s, LockMode::Shared, "backup").unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
    }
}
