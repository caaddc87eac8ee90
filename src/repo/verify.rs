//! Verifying a point: every chunk and delta its indexes refer to (and each
//! delta's base chunk) is read, decompressed and re-hashed. Each distinct object
//! is checked once per point. Reading quarantines what does not decode
//! (`chunk_store`); a missing object that is in quarantine is reported as such,
//! and a quarantined object that is present and sound again counts as healed.

use std::collections::HashSet;
use std::fmt;

use anyhow::{bail, Context, Result};

use super::chunk::{digest_hex, Digest};
use super::chunk_store::{ChunkError, ChunkStore};
use super::index::{DiskIndex, Slot};
use super::manifest::Manifest;

/// The outcome of verifying one point.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Distinct chunks read and re-hashed.
    pub chunks_checked: u64,
    /// Objects that were quarantined once and are whole again (a later backup
    /// stored the same content).
    pub healed: u64,
    /// One entry per bad chunk (reported at the first slot referring to it).
    pub problems: Vec<Problem>,
    /// Why the point's manifest or an index cannot be used (then no chunk was
    /// checked).
    pub damaged: Option<String>,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.damaged.is_none()
    }
}

/// A chunk a point needs that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub disk: String,
    pub slot: u64,
    pub digest: Digest,
    pub kind: ProblemKind,
}

/// What is wrong with a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// The chunk file does not exist.
    Missing,
    /// The chunk file exists but is damaged; the reason says how.
    Corrupt(String),
    /// The object was quarantined (it did not decode) and no backup has stored
    /// its content again yet.
    Quarantined,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            ProblemKind::Missing => "missing".to_string(),
            ProblemKind::Corrupt(reason) => format!("corrupt: {reason}"),
            ProblemKind::Quarantined => "quarantined (it was corrupt); the next backup stores it again if the VM still holds that content".to_string(),
        };
        write!(
            f,
            "disk '{}' slot {}: chunk {} {what}",
            self.disk,
            self.slot,
            digest_hex(&self.digest)
        )
    }
}

/// Check `indexes` (one per disk of `manifest`, in its order) against the
/// store; `quarantined` holds the ids of every object ever quarantined.
pub(crate) fn verify_indexes(
    store: &ChunkStore,
    manifest: &Manifest,
    indexes: &[DiskIndex],
    quarantined: &HashSet<Digest>,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut seen: HashSet<Digest> = HashSet::new();
    for (disk, index) in manifest.disks.iter().zip(indexes) {
        if (index.disk_size, index.chunk_size) != (disk.size, disk.chunk_size) {
            bail!(
                "index of disk '{}' does not match the manifest (size {} / chunk size {} vs {} / {})",
                disk.name,
                index.disk_size,
                index.chunk_size,
                disk.size,
                disk.chunk_size
            );
        }
        for (slot, entry) in index.slots.iter().enumerate() {
            let len = index.slot_len(slot);
            // A delta needs itself and its base chunk; each object is checked once.
            let chunk = match entry {
                Slot::Zero => continue,
                Slot::Chunk(digest) => *digest,
                Slot::Delta(id) => {
                    if !seen.insert(*id) {
                        continue;
                    }
                    report.chunks_checked += 1;
                    match store.read_delta_checked(id) {
                        Ok(delta) if delta.len as usize == len => {
                            report.healed += u64::from(quarantined.contains(id));
                            delta.base
                        }
                        Ok(delta) => {
                            let why =
                                format!("delta for {} bytes, the slot needs {len}", delta.len);
                            report.problems.push(problem(
                                disk,
                                slot,
                                id,
                                ProblemKind::Corrupt(why),
                            ));
                            continue;
                        }
                        Err(e) => {
                            let kind = problem_kind(e, "delta", id, quarantined)?;
                            report.problems.push(problem(disk, slot, id, kind));
                            continue;
                        }
                    }
                }
            };
            if !seen.insert(chunk) {
                continue;
            }
            report.chunks_checked += 1;
            let kind = match store.read_checked(&chunk) {
                Ok(data) if data.len() == len => {
                    report.healed += u64::from(quarantined.contains(&chunk));
                    continue;
                }
                Ok(data) => {
                    ProblemKind::Corrupt(format!("{} bytes long, the slot needs {len}", data.len()))
                }
                Err(e) => problem_kind(e, "chunk", &chunk, quarantined)?,
            };
            report.problems.push(problem(disk, slot, &chunk, kind));
        }
    }
    Ok(report)
}

fn problem(
    disk: &super::manifest::ManifestDisk,
    slot: usize,
    digest: &Digest,
    kind: ProblemKind,
) -> Problem {
    Problem {
        disk: disk.name.clone(),
        slot: slot as u64,
        digest: *digest,
        kind,
    }
}

/// A missing or corrupt object is a problem to report; an unreadable one (I/O,
/// permissions) stops verification with an error.
fn problem_kind(
    e: ChunkError,
    what: &str,
    digest: &Digest,
    quarantined: &HashSet<Digest>,
) -> Result<ProblemKind> {
    match e {
        ChunkError::Missing if quarantined.contains(digest) => Ok(ProblemKind::Quarantined),
        ChunkError::Missing => Ok(ProblemKind::Missing),
        ChunkError::Corrupt { reason } => Ok(ProblemKind::Corrupt(reason)),
        ChunkError::Unreadable { source } => {
            Err(source).with_context(|| format!("cannot read {what} {}", digest_hex(digest)))
        }
    }
}
