//! The storage seam: a repository is a set of named objects in a [`Store`].
//!
//! Everything in `repo/` (and everything above it) reads and writes the
//! repository through this trait only, so the same code runs on a directory
//! ([`LocalStore`]) and, later, on an object store. The trait follows restic's
//! `Backend` and rustic_core's `ReadBackend` + `WriteBackend`: whole-object and
//! ranged reads, put-if-absent and put-replace, a listing by prefix, delete. It
//! has nothing an object store cannot do: no rename, no file locks, no
//! directories (a "directory" is a key prefix), and listings are delivered to a
//! visitor, so a paginated listing never has to be held in memory.
//!
//! Keys are the paths docs/FORMAT.md specifies (`chunks/ab/cd/<hex>`,
//! `vms/<platform>/<vm>/<point>/manifest.json`, ...), `/`-separated, each
//! component from `A-Z a-z 0-9 . _ % -` and never empty, `.`, `..` or starting
//! with `.` ([`check_key`]). docs/FORMAT.md ("Store operations") says how each
//! operation maps to a directory and to S3.
//!
//! Durability: `put` and `put_if_absent` are durable when they return. Deferred
//! puts ([`Store::put_if_absent_deferred`]) and deletes are durable once a later
//! [`Store::flush`] returns; a writer flushes before it writes anything that
//! refers to them (a point's manifest).

mod atomic;
mod local;
mod publisher;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::error::invalid;

pub use atomic::sync_dir;
pub(crate) use atomic::unique_u64;
pub use local::LocalStore;

/// One object as a listing reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The full key (including the listed prefix).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the object was last written.
    pub modified: SystemTime,
}

/// A flat namespace of immutable-by-convention objects (see module docs).
///
/// Implementations are shared by many threads: every method takes `&self`.
pub trait Store: Send + Sync + fmt::Debug {
    /// A short human description of where the store is (`/mnt/backup`,
    /// `s3://bucket/prefix`), for messages.
    fn location(&self) -> String;

    /// The whole object, or `None` when no object has this key.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Up to `len` bytes from `offset` (fewer at the object's end), or `None`
    /// when no object has this key.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Option<Vec<u8>>>;

    /// True when an object has this key, or a deferred put of it by this handle
    /// is in flight. On stores whose names become durable separately from their
    /// data (directories), the next [`Store::flush`] also makes this name
    /// durable, so a writer may rely on what it saw exist.
    fn exists(&self, key: &str) -> Result<bool>;

    /// Create the object unless one has this key; true when this call created
    /// it. Durable on return.
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool>;

    /// Create or replace the object. Readers see the old or the new object,
    /// never a mix. Durable on return.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;

    /// Like [`Store::put_if_absent`], but the write may complete in the
    /// background: the object is durable (and visible to other handles) once
    /// [`Store::flush`] returns, and a failure is reported at the latest there.
    fn put_if_absent_deferred(&self, key: &str, bytes: Vec<u8>) -> Result<()>;

    /// Wait for every deferred put of this handle, and make durable every name
    /// this handle created, saw exist or deleted.
    fn flush(&self) -> Result<()>;

    /// Call `each` for every object whose key starts with `prefix`, in no
    /// particular order. Objects being written (staging files) are not listed.
    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectInfo) -> Result<()>) -> Result<()>;

    /// Delete the object; deleting a missing key is not an error. Durable after
    /// the next [`Store::flush`].
    fn delete(&self, key: &str) -> Result<()>;

    /// Remove partial writes under `prefix` that a killed writer left and that
    /// are at least `min_age` old (staging files of a directory, incomplete
    /// multipart uploads of an object store). Returns a description of each.
    fn remove_stale_partials(&self, prefix: &str, min_age: Duration) -> Result<Vec<String>>;
}

/// Where a target's store is: one JSON value in the state store (`targets.spec`).
/// New kinds of targets are new variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TargetSpec {
    /// A directory on a local or mounted file system.
    Directory { path: PathBuf },
}

impl TargetSpec {
    /// Open the target's store. A directory that does not exist is an error
    /// (an unmounted target must never become a new, empty one).
    pub fn open(&self) -> Result<Arc<dyn Store>> {
        match self {
            TargetSpec::Directory { path } => Ok(Arc::new(LocalStore::open(path)?)),
        }
    }

    /// A short human description (`/mnt/backup`).
    pub fn location(&self) -> String {
        match self {
            TargetSpec::Directory { path } => path.display().to_string(),
        }
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::Directory { path } => write!(f, "directory {}", path.display()),
        }
    }
}

/// A view of a store under a key prefix (a repository inside a target).
/// Keys given to it are relative to the prefix.
#[derive(Debug)]
pub struct Prefixed {
    inner: Arc<dyn Store>,
    /// Empty, or ends with `/`.
    prefix: String,
}

impl Prefixed {
    /// The store under `path` (`web`, `site/web`), or the whole store for `""`.
    pub fn new(inner: Arc<dyn Store>, path: &str) -> Result<Prefixed> {
        let path = path.trim_matches('/');
        if !path.is_empty() {
            check_key(path)?;
        }
        Ok(Prefixed {
            inner,
            prefix: if path.is_empty() {
                String::new()
            } else {
                format!("{path}/")
            },
        })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl Store for Prefixed {
    fn location(&self) -> String {
        let base = self.inner.location();
        if self.prefix.is_empty() {
            base
        } else {
            format!(
                "{}/{}",
                base.trim_end_matches('/'),
                self.prefix.trim_end_matches('/')
            )
        }
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get(&self.full(key))
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Option<Vec<u8>>> {
        self.inner.get_range(&self.full(key), offset, len)
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(&self.full(key))
    }
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        self.inner.put_if_absent(&self.full(key), bytes)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.inner.put(&self.full(key), bytes)
    }
    fn put_if_absent_deferred(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.inner.put_if_absent_deferred(&self.full(key), bytes)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectInfo) -> Result<()>) -> Result<()> {
        let strip = self.prefix.len();
        self.inner.list(&self.full(prefix), &mut |mut info| {
            info.key = info.key.split_off(strip);
            each(info)
        })
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(&self.full(key))
    }
    fn remove_stale_partials(&self, prefix: &str, min_age: Duration) -> Result<Vec<String>> {
        self.inner
            .remove_stale_partials(&self.full(prefix), min_age)
    }
}

/// Check that `key` is a well-formed key (module docs): the one rule every
/// store applies before it touches anything.
pub fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && !c.contains(atomic::TMP_INFIX)
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "object key",
            key,
            "expected '/'-separated names of A-Z a-z 0-9 . _ % - (none empty or starting with '.')",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        for ok in [
            "chunks/ab/cd/0123",
            "vms/lab/web%2001/20261124T120000Z/manifest.json",
            "vmbackup-repo.toml",
        ] {
            check_key(ok).unwrap();
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/./b",
            ".lock",
            "a/.hidden",
            "a b",
            "x.tmp-1-2",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn target_specs_are_tagged_json() {
        let spec = TargetSpec::Directory {
            path: "/mnt/backup".into(),
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(json, r#"{"type":"directory","path":"/mnt/backup"}"#);
        assert_eq!(serde_json::from_str::<TargetSpec>(&json).unwrap(), spec);
        assert!(serde_json::from_str::<TargetSpec>(r#"{"type":"tape"}"#).is_err());
    }

    #[test]
    fn prefixed_view_strips_and_adds_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let repo = Prefixed::new(store.clone(), "site/web").unwrap();
        repo.put("a/b", b"x").unwrap();
        assert_eq!(store.get("site/web/a/b").unwrap().unwrap(), b"x");
        let mut keys = Vec::new();
        repo.list("", &mut |i| {
            keys.push(i.key);
            Ok(())
        })
        .unwrap();
        assert_eq!(keys, vec!["a/b".to_string()]);
        assert!(repo.location().ends_with("/site/web"));
        assert!(Prefixed::new(store, "../x").is_err());
    }
}
