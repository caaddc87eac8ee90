//! The target marker: `vmbackup-target.json` at the root of a target's store,
//! written by `target add` (or `target mark`), naming the target's id.
//!
//! A repository is created only where the marker is present and names the
//! registered target: an unmounted directory (no marker) or another target's
//! disk mounted in its place (another id) is refused, never filled with a new,
//! empty repository (docs/FORMAT.md, "Target marker").

use anyhow::{Context, Result};
use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::store::{unique_u64, Store};

/// The marker's key at the root of a target's store.
pub const MARKER_KEY: &str = "vmbackup-target.json";

/// The content of the marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetMarker {
    /// 1.
    pub format: u32,
    /// 32 lowercase hex digits, chosen at `target add`; recorded in the state store.
    pub target_id: String,
    /// The target's name when it was marked (for humans).
    pub name: String,
    /// RFC 3339 UTC.
    pub created: String,
}

impl TargetMarker {
    /// A new marker with a fresh id.
    pub fn new(name: &str) -> TargetMarker {
        TargetMarker {
            format: 1,
            target_id: format!("{:016x}{:016x}", unique_u64(), unique_u64()),
            name: name.to_string(),
            created: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        }
    }
}

/// The marker of a store, or `None` when it has none.
pub fn read_marker(store: &dyn Store) -> Result<Option<TargetMarker>> {
    let Some(bytes) = store.get(MARKER_KEY)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .with_context(|| format!("cannot parse {MARKER_KEY} in {}", store.location()))
}

/// Write `marker` unless the store has one; returns the marker the store has
/// afterwards (ours, or the one found).
pub fn write_marker(store: &dyn Store, marker: &TargetMarker) -> Result<TargetMarker> {
    let json = serde_json::to_vec_pretty(marker)?;
    if store.put_if_absent(MARKER_KEY, &json)? {
        return Ok(marker.clone());
    }
    read_marker(store)?.with_context(|| format!("{MARKER_KEY} in {} vanished", store.location()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::store::LocalStore;

    #[test]
    fn a_marker_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(read_marker(&s).unwrap(), None);
        let a = TargetMarker::new("nas");
        assert_eq!(a.target_id.len(), 32);
        assert_eq!(write_marker(&s, &a).unwrap(), a);
        let b = TargetMarker::new("other");
        assert_ne!(a.target_id, b.target_id);
        assert_eq!(write_marker(&s, &b).unwrap(), a, "the first marker stays");
        assert_eq!(read_marker(&s).unwrap(), Some(a));
    }
}
