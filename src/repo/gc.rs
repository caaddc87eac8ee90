//! Garbage collection: mark every object a committed point refers to, sweep
//! the rest of `chunks/`, through the [`Store`](super::Store) trait only
//! (docs/FORMAT.md, "Garbage collection").
//!
//! - Mark: every index of every point of every VM is read whole (checksums
//!   checked); each chunk and delta it names is marked, and each delta's base
//!   chunk (read from the delta's header). If any manifest, index or delta
//!   header cannot be read, GC refuses to sweep: the objects only that point
//!   names would look like garbage.
//! - Sweep: every object under `chunks/` not marked is deleted; staging
//!   leftovers older than an hour too. Quarantined objects are never touched.
//! - Safety: the repository lock is held exclusively (no backup can be relying
//!   on an object it found present), and re-checked while sweeping.
//! - Memory: the mark set is one sorted array of 32-byte ids, plus a buffer of
//!   at most an eighth of it for new ids, merged in place: about 32-36 bytes per
//!   referenced object, whatever the repository's size.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::chunk::{digest_hex, Digest};
use super::chunk_store::{digest_of_key, CHUNKS_PREFIX};
use super::index::Slot;
use super::lock::{LockMode, RepoLock};
use super::Repository;

/// The key of the record of the last garbage collection.
pub const LAST_GC_KEY: &str = "gc.json";
/// Re-check the lock after this many deletions.
const LOCK_CHECK_EVERY: u64 = 1000;

/// What a garbage collection did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Points whose indexes were read.
    pub point_count: u64,
    /// Distinct objects the points refer to (chunks, deltas, deltas' bases).
    pub referenced_count: u64,
    /// Referenced objects that are absent (quarantined or lost; `verify` says which).
    pub missing_count: u64,
    /// Objects under `chunks/` that stay.
    #[serde(rename = "kept_count")]
    pub objects_kept: u64,
    /// Objects deleted (dry: that would be).
    #[serde(rename = "removed_count")]
    pub objects_removed: u64,
    /// Their size in bytes.
    pub bytes_freed: u64,
    /// Staging leftovers of killed writers deleted.
    #[serde(rename = "staging_removed_count")]
    pub staging_removed: u64,
    /// How long marking took.
    pub mark_seconds: f64,
    /// How long sweeping took.
    pub sweep_seconds: f64,
}

/// The record `gc.json`: when the last (real) garbage collection finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastGc {
    /// RFC 3339 UTC.
    pub finished: String,
    pub objects_removed: u64,
    pub bytes_freed: u64,
}

/// The set of marked ids (module docs: bounded memory).
#[derive(Debug, Default)]
pub struct MarkSet {
    sorted: Vec<Digest>,
    pending: Vec<Digest>,
}

impl MarkSet {
    /// Mark `d`.
    pub fn insert(&mut self, d: Digest) {
        self.pending.push(d);
        if self.pending.len() >= (self.sorted.len() / 8).max(1 << 16) {
            self.merge();
        }
    }

    /// Fold the pending ids into the sorted array, in place (merged from the back).
    fn merge(&mut self) {
        let mut new = std::mem::take(&mut self.pending);
        new.sort_unstable();
        new.dedup();
        new.retain(|d| self.sorted.binary_search(d).is_err());
        let (n, m) = (self.sorted.len(), new.len());
        self.sorted.reserve_exact(m);
        self.sorted.resize(n + m, [0u8; 32]);
        let (mut i, mut j) = (n, m);
        while j > 0 {
            let k = i + j - 1;
            if i > 0 && self.sorted[i - 1] > new[j - 1] {
                self.sorted[k] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[k] = new[j - 1];
                j -= 1;
            }
        }
    }

    /// Finish marking: every id is in the sorted array.
    pub fn seal(&mut self) {
        self.merge();
        self.pending = Vec::new();
    }

    /// True when `d` was marked (after [`MarkSet::seal`]).
    pub fn contains(&self, d: &Digest) -> bool {
        self.sorted.binary_search(d).is_ok()
    }

    /// Marked ids (after [`MarkSet::seal`]).
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// True when nothing was marked.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty() && self.pending.is_empty()
    }

    /// The sorted ids (after [`MarkSet::seal`]).
    pub fn ids(&self) -> &[Digest] {
        &self.sorted
    }
}

/// Mark every object the repository's points refer to. Fails when a point's
/// manifest or index, or a referenced delta's header, cannot be read.
pub fn mark(repo: &Repository) -> Result<(MarkSet, u64)> {
    let mut marks = MarkSet::default();
    let mut deltas = MarkSet::default();
    let mut points = 0;
    for vm in repo.list_vms()? {
        let list = repo.list_points(&vm)?;
        if let Some(d) = list.damaged.first() {
            bail!(
                "garbage collection refuses to sweep: point {} of VM '{vm}' cannot be read ({}); the objects it names would look like garbage. Repair it, or remove it with 'vmbackup forget'",
                d.point,
                d.reason
            );
        }
        for m in &list.points {
            points += 1;
            for disk in &m.disks {
                let index = repo
                    .load_index(&vm, &m.point, &disk.name)
                    .with_context(|| {
                        format!(
                        "garbage collection refuses to sweep: point {} of VM '{vm}' cannot be read",
                        m.point
                    )
                    })?;
                for slot in &index.slots {
                    match slot {
                        Slot::Zero => {}
                        Slot::Chunk(d) => marks.insert(*d),
                        Slot::Delta(id) => {
                            marks.insert(*id);
                            deltas.insert(*id);
                        }
                    }
                }
            }
        }
    }
    deltas.seal();
    for id in deltas.ids() {
        let base = repo.chunks().delta_base(id).with_context(|| {
            format!(
                "garbage collection refuses to sweep: the base of delta {} cannot be read ('vmbackup verify' quarantines a damaged delta)",
                digest_hex(id)
            )
        })?;
        // Absent (quarantined or lost): nothing more to keep for it.
        if let Some(base) = base {
            marks.insert(base);
        }
    }
    marks.seal();
    Ok((marks, points))
}

/// Collect garbage (module docs). `lock` must be the repository's exclusive
/// lock, or, for a dry run, any repository lock. `now` is recorded in
/// `gc.json` (the clock the automatic collection's once-a-day rule reads).
pub fn collect(
    repo: &Repository,
    lock: &RepoLock,
    dry_run: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<GcReport> {
    if !dry_run && lock.mode() != LockMode::Exclusive {
        bail!("garbage collection needs the repository's exclusive lock");
    }
    lock.check()?;
    let started = Instant::now();
    let (marks, point_count) = mark(repo)?;
    let mut report = GcReport {
        dry_run,
        point_count,
        referenced_count: marks.len() as u64,
        mark_seconds: started.elapsed().as_secs_f64(),
        ..GcReport::default()
    };
    let sweep_started = Instant::now();
    lock.check()?;
    let mut present = 0u64;
    repo.store().list(CHUNKS_PREFIX, &mut |info| {
        // Names that are not object ids are not ours to delete.
        let Some(digest) = digest_of_key(&info.key) else {
            return Ok(());
        };
        if marks.contains(&digest) {
            report.objects_kept += 1;
            present += 1;
            return Ok(());
        }
        report.objects_removed += 1;
        report.bytes_freed += info.size;
        if !dry_run {
            if report.objects_removed % LOCK_CHECK_EVERY == 0 {
                lock.check()?;
            }
            repo.store().delete(&info.key)?;
        }
        Ok(())
    })?;
    if !dry_run {
        report.staging_removed = repo.remove_stale_partials()?.len() as u64;
        repo.store().flush()?;
        let last = LastGc {
            finished: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            objects_removed: report.objects_removed,
            bytes_freed: report.bytes_freed,
        };
        repo.store()
            .put(LAST_GC_KEY, &serde_json::to_vec_pretty(&last)?)?;
    }
    report.missing_count = marks.len() as u64 - present;
    report.sweep_seconds = sweep_started.elapsed().as_secs_f64();
    Ok(report)
}

/// When the last real garbage collection of `repo` finished, if ever.
pub fn last_gc(repo: &Repository) -> Result<Option<LastGc>> {
    match repo.store().get(LAST_GC_KEY)? {
        None => Ok(None),
        Some(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> Digest {
        *blake3::hash(&n.to_le_bytes()).as_bytes()
    }

    #[test]
    fn mark_set_holds_every_id_once_in_order() {
        let mut m = MarkSet::default();
        // Enough ids to merge several times, each inserted twice.
        for _ in 0..2 {
            for n in 0..200_000u64 {
                m.insert(id(n * 7 % 200_000));
            }
        }
        m.seal();
        assert_eq!(m.len(), 200_000);
        assert!(
            m.ids().windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );
        for n in (0..200_000).step_by(997) {
            assert!(m.contains(&id(n)));
        }
        assert!(!m.contains(&id(200_001)));
        // Bounded: no spare capacity beyond a merge's growth.
        assert!(
            m.sorted.capacity() <= 200_000 + (1 << 16),
            "{}",
            m.sorted.capacity()
        );
    }
}
