//! Copying points to another repository (offsite copy, issue 13 section 3).
//!
//! The destination is a copy of the source repository
//! ([`Repository::create_copy`]: same config, key slots and master key, so
//! objects keep their names). A point is copied as a backup writes one: every
//! object its indexes name (and each delta's base) that the destination lacks
//! is read from the source, decoded and checked, and stored; then its indexes;
//! its manifest last. Points and objects the destination has are skipped, so a
//! copy that was interrupted resumes where it stopped (its incomplete point is
//! removed first, under the destination VM's lock). Every object read from
//! the source is paced by the rule's bandwidth windows (a [`Throttle`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use anyhow::{bail, Context, Result};

use super::chunk::{digest_hex, Digest};
use super::chunk_store::loud;
use super::index::Slot;
use super::manifest::Manifest;
use super::{manifest_key, Repository, VmLock};
use crate::error::invalid;
use crate::task::throttle::Throttle;

/// What one VM's copy did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CopyReport {
    /// Points copied now, oldest first.
    pub points_copied: Vec<String>,
    /// Points the destination had already.
    pub points_present: Vec<String>,
    /// Objects (chunks and deltas) sent, and their stored bytes.
    pub sent_count: u64,
    pub sent_bytes: u64,
    /// Objects the destination had already.
    pub present_count: u64,
}

/// Copy the points of VM `vm_key` from `src` to `dst` (a copy of it): all the
/// points the destination lacks, or only `point` (`"latest"`: the newest) and
/// the points it was based on.
pub fn copy_vm(
    src: &Repository,
    dst: &Repository,
    vm_key: &str,
    point: Option<&str>,
    throttle: &Throttle,
) -> Result<CopyReport> {
    let _src_lock = src.lock_shared("copy")?;
    let dst_lock = dst.lock_shared("copy")?;
    let vm_lock = dst.lock_vm(&dst_lock, vm_key, "copy")?;
    copy_vm_locked(src, dst, &vm_lock, point, throttle)
}

/// [`copy_vm`] for a caller that holds the source's shared lock and the
/// destination VM's lock `vm_lock` (a copy task takes them while pending).
pub fn copy_vm_locked(
    src: &Repository,
    dst: &Repository,
    vm_lock: &VmLock,
    point: Option<&str>,
    throttle: &Throttle,
) -> Result<CopyReport> {
    let vm_key = vm_lock.vm_key();
    dst.remove_incomplete_points(vm_lock)?;

    let points = src.list_points(vm_key)?.points;
    let wanted = select(&points, point)?;
    let mut report = CopyReport::default();
    let mut seen: HashSet<Digest> = HashSet::new();
    for manifest in points.iter().filter(|m| wanted.contains(&m.point)) {
        let id = &manifest.point;
        if dst.store().exists(&manifest_key(vm_key, id))? {
            report.points_present.push(id.clone());
            continue;
        }
        let mut writer = dst.begin_point(vm_lock, id)?;
        for disk in &manifest.disks {
            let index = src.load_index(vm_key, id, &disk.name)?;
            for slot in &index.slots {
                match slot {
                    Slot::Zero => {}
                    Slot::Chunk(d) => {
                        copy_object(src, dst, d, false, throttle, &mut seen, &mut report)?
                    }
                    Slot::Delta(d) => {
                        copy_object(src, dst, d, true, throttle, &mut seen, &mut report)?
                    }
                }
            }
            writer.write_index(&disk.name, &index)?;
        }
        writer
            .commit_copy(manifest)
            .with_context(|| format!("cannot copy point {id} of VM '{vm_key}'"))?;
        report.points_copied.push(id.clone());
    }
    Ok(report)
}

/// The ids of the points to copy: every point, or `point` and its base and
/// full (transitively, those still in the source).
fn select(points: &[Manifest], point: Option<&str>) -> Result<BTreeSet<String>> {
    let by_id: BTreeMap<&str, &Manifest> = points.iter().map(|m| (m.point.as_str(), m)).collect();
    let Some(point) = point else {
        return Ok(by_id.keys().map(|s| s.to_string()).collect());
    };
    let start = match point {
        "latest" => points.last().map(|m| m.point.as_str()),
        id => by_id.get(id).map(|m| m.point.as_str()),
    };
    let Some(start) = start else {
        return Err(invalid(
            "--point",
            point,
            "no such point of this VM in the source ('vmbackup points RULE --vm VM')",
        ));
    };
    let mut out = BTreeSet::new();
    let mut todo = vec![start];
    while let Some(id) = todo.pop() {
        if !out.insert(id.to_string()) {
            continue;
        }
        if let Some(m) = by_id.get(id) {
            for dep in [&m.base, &m.full].into_iter().flatten() {
                if by_id.contains_key(dep.as_str()) {
                    todo.push(dep);
                }
            }
        }
    }
    Ok(out)
}

/// Send object `id` (and a delta's base) unless the destination has it.
fn copy_object(
    src: &Repository,
    dst: &Repository,
    id: &Digest,
    delta: bool,
    throttle: &Throttle,
    seen: &mut HashSet<Digest>,
    report: &mut CopyReport,
) -> Result<()> {
    if !seen.insert(*id) {
        return Ok(());
    }
    let kind = if delta { "delta" } else { "chunk" };
    let base = if dst.chunks().contains(id)? {
        report.present_count += 1;
        if !delta {
            return Ok(());
        }
        // Its base must be there too (a copy interrupted between the two).
        dst.chunks().delta_base(id)?
    } else {
        let (object, base) = src
            .chunks()
            .read_encoded(id, delta)
            .map_err(|e| loud(kind, id, e))
            .context("cannot copy")?;
        throttle.acquire_blocking(object.len() as u64)?;
        let inserted = dst.chunks().insert_encoded(id, object)?;
        report.sent_count += u64::from(inserted.new);
        report.sent_bytes += inserted.stored_bytes;
        base
    };
    match base {
        Some(base) => copy_object(src, dst, &base, false, throttle, seen, report),
        None if delta => bail!("delta {} has no base", digest_hex(id)),
        None => Ok(()),
    }
}
