//! The backup view of one VM: `begin_backup` and `finish_backup` of the CBT contract.
//!
//! begin: check every disk's preconditions first (nothing changes on refusal), then
//! the NBD server (ours on a unix socket, or the VM's own: refused on plain TCP
//! unless the rule allows it), per disk a fleecing overlay (`qcow2` whose backing
//! is the live disk, its image created 0600), then ONE `transaction` that starts
//! the bitmap generation of the new point and a `blockdev-backup sync=none` job per
//! disk (the point in time), then one read-only export per disk on its fleecing
//! node, with the frozen bitmap as meta context. Each step records what it did in [`ActiveBackup`], so a failure at
//! any step undoes exactly what exists.
//!
//! finish: remove exports (waiting for `BLOCK_EXPORT_DELETED`), cancel jobs (waiting
//! until they are gone), delete fleecing nodes and images, stop our NBD server, then
//! settle the bitmaps: stored → the temporary copy goes, the new generation records
//! and the old one stays (disabled) until the engine's post-commit `cleanup` drops
//! it; not stored → the new bitmaps are merged back into the old ones, which record
//! again.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::agent::Quiescer;
use super::graph::{BlockGraph, BlockNode};
use super::inventory::VmState;
use super::names::{self, BitmapKind};
use super::nbd_server::{self, NbdServer};
use crate::level::Level;
use crate::platform::qmp::{is_qmp_error, Qmp};
use crate::platform::{
    BackupRequest, CbtUnavailable, ChangedBlocks, DiskExport, DiskInfo, Snapshot,
};

/// Granularity of the bitmaps we create (QEMU's default, 64 KiB).
const GRANULARITY: u64 = 64 * 1024;

/// How long to wait for an export or job to go away.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A backup view that is (partly) set up.
pub struct ActiveBackup {
    disks: Vec<DiskRun>,
    /// The transaction ran: bitmaps were changed and jobs started.
    transaction_done: bool,
    nbd: Option<NbdServer>,
}

/// One disk's part of the view, with what has been done so far.
struct DiskRun {
    disk: DiskInfo,
    fleece_node: String,
    fleece_image: PathBuf,
    export: String,
    job: String,
    image_created: bool,
    file_node_added: bool,
    fleece_node_added: bool,
    export_added: bool,
    /// Bitmaps the transaction creates / disables.
    new_inc: Option<String>,
    new_diff: Option<String>,
    disabled_inc: Vec<String>,
    disabled_diff: Vec<String>,
    /// Frozen copy for the export: `(name, source, granularity)`.
    tmp: Option<(String, String, u64)>,
    /// The bitmap exported as `qemu:dirty-bitmap:<name>`.
    export_bitmap: Option<String>,
}

/// Check, then set up the view. On error nothing of ours is left in QEMU.
/// `removed_inconsistent`: `(node, bitmap)` pairs a cleanup of this session
/// removed because they were inconsistent, so a missing base says why.
pub fn begin(
    qmp: &mut Qmp,
    state: &VmState,
    req: &BackupRequest,
    removed_inconsistent: &[(String, String)],
    quiescer: &mut Quiescer,
) -> Result<(ActiveBackup, Snapshot)> {
    let vm = state.info.name.as_str();
    for disk in &state.info.disks {
        if let Some(reason) = &disk.uncoverable {
            bail!(
                "VM '{vm}': disk '{}' cannot be covered by a snapshot: {reason}",
                disk.name
            );
        }
    }
    let leftovers = super::cleanup::leftovers(qmp, state, &req.run_dir)?;
    if !leftovers.is_empty() {
        bail!(
            "VM '{vm}' has leftovers of an interrupted backup ({}): run cleanup first",
            leftovers.join(", ")
        );
    }
    let mut disks = Vec::new();
    for (index, disk) in state.info.disks.iter().enumerate() {
        let node = state.graph.node(&disk.node).with_context(|| {
            format!(
                "VM '{vm}': node '{}' of disk '{}' vanished",
                disk.node, disk.name
            )
        })?;
        disks.push(plan_disk(index, disk, node, req, removed_inconsistent)?);
    }
    let mut active = ActiveBackup {
        disks,
        transaction_done: false,
        nbd: None,
    };
    match set_up(qmp, &mut active, req, vm, quiescer) {
        Ok(snapshot) => Ok((active, snapshot)),
        Err(err) => match finish(qmp, active, false, vm) {
            Ok(()) => Err(err),
            Err(undo) => Err(err.context(format!("undo also failed: {undo:#}"))),
        },
    }
}

/// Decide one disk's bitmaps, refusing with [`CbtUnavailable`] when the base is
/// not provably tracked.
fn plan_disk(
    index: usize,
    disk: &DiskInfo,
    node: &BlockNode,
    req: &BackupRequest,
    removed_inconsistent: &[(String, String)],
) -> Result<DiskRun> {
    let unavailable = |reason: String| -> anyhow::Error {
        CbtUnavailable {
            disk: disk.name.clone(),
            reason,
        }
        .into()
    };
    let fleece_node = names::fleece_node(&disk.node, index);
    let mut run = DiskRun {
        disk: disk.clone(),
        fleece_image: names::fleece_image(&req.run_dir, index),
        fleece_node,
        export: names::export_id(&disk.node),
        job: names::job_id(&disk.node),
        image_created: false,
        file_node_added: false,
        fleece_node_added: false,
        export_added: false,
        new_inc: None,
        new_diff: None,
        disabled_inc: Vec::new(),
        disabled_diff: Vec::new(),
        tmp: None,
        export_bitmap: None,
    };
    let base_bitmap = match req.level {
        Level::Full => None,
        Level::Inc | Level::Diff => {
            let base = req
                .base
                .as_deref()
                .ok_or_else(|| unavailable(format!("no base point given for {}", req.level)))?;
            if !disk.cbt {
                return Err(unavailable(format!(
                    "disk is {}: no persistent bitmaps",
                    disk.format
                )));
            }
            let (name, what) = match req.level {
                Level::Inc => (names::inc_bitmap(base), format!("point {base}")),
                _ => (names::diff_bitmap(base), format!("full {base}")),
            };
            let removed = removed_inconsistent
                .iter()
                .any(|(n, b)| *n == disk.node && *b == name);
            let bitmap = node.bitmap(&name).ok_or_else(|| {
                unavailable(if removed {
                    format!("bitmap for {what} was inconsistent (QEMU stopped uncleanly) and was removed")
                } else {
                    format!("no bitmap for {what}")
                })
            })?;
            if bitmap.inconsistent {
                return Err(unavailable(
                    "bitmap inconsistent (QEMU stopped uncleanly)".into(),
                ));
            }
            if !bitmap.recording {
                return Err(unavailable(format!(
                    "bitmap for {what} is not recording (interrupted run? run cleanup)"
                )));
            }
            Some((name, bitmap.granularity))
        }
    };
    let recording_of = |kind: BitmapKind| -> Vec<String> {
        node.bitmaps
            .iter()
            .filter(|b| b.recording && !b.inconsistent)
            .filter(|b| matches!(names::parse_bitmap(&b.name), Some((k, _)) if k == kind))
            .map(|b| b.name.clone())
            .collect()
    };
    if req.track && disk.cbt {
        run.new_inc = Some(names::inc_bitmap(&req.new_point));
        run.disabled_inc = recording_of(BitmapKind::Inc);
        if req.level == Level::Full {
            run.new_diff = Some(names::diff_bitmap(&req.new_point));
            run.disabled_diff = recording_of(BitmapKind::Diff);
        }
    }
    if let Some((base, granularity)) = base_bitmap {
        // An enabled bitmap cannot back a read-only export: export the old inc
        // bitmap the transaction disables, else a frozen copy.
        if req.level == Level::Inc && run.disabled_inc.contains(&base) {
            run.export_bitmap = Some(base);
        } else {
            let tmp = names::tmp_bitmap(&req.new_point);
            run.export_bitmap = Some(tmp.clone());
            run.tmp = Some((tmp, base, granularity));
        }
    }
    Ok(run)
}

fn set_up(
    qmp: &mut Qmp,
    active: &mut ActiveBackup,
    req: &BackupRequest,
    vm: &str,
    quiescer: &mut Quiescer,
) -> Result<Snapshot> {
    // The NBD server first: one that must not serve disk data (plain TCP, not
    // allowed) refuses the backup before the snapshot exists.
    let server = nbd_server::start_or_find(qmp, &req.run_dir, vm, req.allow_plain_tcp_export)?;
    let addr = server.addr.clone();
    active.nbd = Some(server);
    for run in &mut active.disks {
        create_fleece_image(&run.fleece_image, run.disk.size)?;
        run.image_created = true;
        let file_node = names::fleece_file_node(&run.fleece_node);
        qmp.execute(
            "blockdev-add",
            json!({ "driver": "file", "node-name": file_node, "filename": run.fleece_image }),
        )
        .with_context(|| format!("VM '{vm}' disk '{}': add fleecing file node", run.disk.name))?;
        run.file_node_added = true;
        qmp.execute(
            "blockdev-add",
            json!({ "driver": "qcow2", "node-name": run.fleece_node, "file": file_node,
                    "backing": run.disk.node }),
        )
        .with_context(|| format!("VM '{vm}' disk '{}': add fleecing node", run.disk.name))?;
        run.fleece_node_added = true;
    }
    let actions: Vec<Value> = active.disks.iter().flat_map(transaction_actions).collect();
    // R10: guest file systems are frozen only around the transaction.
    quiescer.freeze()?;
    let started = qmp
        .execute("transaction", json!({ "actions": actions }))
        .with_context(|| format!("VM '{vm}': start the snapshot transaction"));
    let thawed = quiescer.thaw();
    started?;
    active.transaction_done = true;
    thawed?;
    let mut exports = Vec::new();
    for run in &mut active.disks {
        let mut args = json!({ "type": "nbd", "id": run.export, "name": run.export,
                               "node-name": run.fleece_node, "writable": false });
        if let Some(bitmap) = &run.export_bitmap {
            args["bitmaps"] = json!([{ "node": run.disk.node, "name": bitmap }]);
        }
        qmp.execute("block-export-add", args)
            .with_context(|| format!("VM '{vm}' disk '{}': add NBD export", run.disk.name))?;
        run.export_added = true;
        exports.push(DiskExport {
            disk: run.disk.clone(),
            addr: addr.clone(),
            export: run.export.clone(),
            changes: run
                .export_bitmap
                .as_ref()
                .map(|b| ChangedBlocks::MetaContext(format!("qemu:dirty-bitmap:{b}"))),
        });
    }
    Ok(Snapshot {
        exports,
        notes: quiescer.note().into_iter().collect(),
    })
}

/// The transaction's actions for one disk: new bitmap generation, frozen copy,
/// and the fleecing job, all at one instant.
fn transaction_actions(run: &DiskRun) -> Vec<Value> {
    let node = &run.disk.node;
    let mut actions = Vec::new();
    let mut rotate = |new: &Option<String>, old: &[String]| {
        if let Some(new) = new {
            actions.push(json!({ "type": "block-dirty-bitmap-add", "data": {
                "node": node, "name": new, "persistent": true, "granularity": GRANULARITY } }));
        }
        for old in old {
            actions.push(json!({ "type": "block-dirty-bitmap-disable",
                                 "data": { "node": node, "name": old } }));
        }
    };
    rotate(&run.new_inc, &run.disabled_inc);
    rotate(&run.new_diff, &run.disabled_diff);
    if let Some((tmp, source, granularity)) = &run.tmp {
        actions.push(json!({ "type": "block-dirty-bitmap-add", "data": {
            "node": node, "name": tmp, "persistent": false, "disabled": true,
            "granularity": granularity } }));
        actions.push(json!({ "type": "block-dirty-bitmap-merge", "data": {
            "node": node, "target": tmp, "bitmaps": [source] } }));
    }
    actions.push(json!({ "type": "blockdev-backup", "data": {
        "device": node, "target": run.fleece_node, "sync": "none", "job-id": run.job } }));
    actions
}

/// Create the fleecing image: the file first, new and 0600 (`O_EXCL|O_NOFOLLOW`;
/// it holds the disk's old data) and owned by the scratch directory's owner,
/// then `qemu-img create` formats it in place.
fn create_fleece_image(path: &PathBuf, size: u64) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .with_context(|| format!("cannot create fleecing image {}", path.display()))?;
    // A scratch directory handed to a QEMU running as another user: the image
    // is that user's too (QEMU opens it itself), still 0600.
    if let Some(dir) = path.parent() {
        let owner =
            std::fs::metadata(dir).with_context(|| format!("cannot stat {}", dir.display()))?;
        if owner.uid() != rustix::process::geteuid().as_raw() {
            std::os::unix::fs::fchown(&file, Some(owner.uid()), Some(owner.gid()))
                .with_context(|| format!("cannot hand {} to QEMU's user", path.display()))?;
        }
    }
    drop(file);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .context("run qemu-img")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        bail!(
            "qemu-img create {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Tear the view down and settle the bitmaps. Every step is tried; the error
/// lists all that failed.
pub fn finish(qmp: &mut Qmp, active: ActiveBackup, committed: bool, vm: &str) -> Result<()> {
    let mut failed: Vec<String> = Vec::new();
    let mut step = |what: String, result: Result<()>| {
        if let Err(e) = result {
            failed.push(format!("{what}: {e:#}"));
        }
    };
    for run in active.disks.iter().filter(|r| r.export_added) {
        step(
            format!("remove export {}", run.export),
            remove_export(qmp, &run.export),
        );
    }
    if active.transaction_done {
        for run in &active.disks {
            step(format!("cancel job {}", run.job), cancel_job(qmp, &run.job));
        }
    }
    for run in &active.disks {
        if run.fleece_node_added {
            step(
                format!("delete node {}", run.fleece_node),
                delete_node(qmp, &run.fleece_node),
            );
        }
        if run.file_node_added {
            let file_node = names::fleece_file_node(&run.fleece_node);
            step(
                format!("delete node {file_node}"),
                delete_node(qmp, &file_node),
            );
        }
        if run.image_created {
            step(
                format!("remove {}", run.fleece_image.display()),
                nbd_server::remove_file_if_exists(&run.fleece_image),
            );
        }
    }
    if let Some(socket) = active.nbd.as_ref().and_then(|s| s.started.as_ref()) {
        step("stop NBD server".into(), nbd_server::stop(qmp, socket));
    }
    if active.transaction_done {
        let graph = BlockGraph::query(qmp);
        for run in &active.disks {
            let result = match &graph {
                Ok(graph) if committed => drop_tmp_bitmaps(qmp, graph, run),
                Ok(_) => roll_back_bitmaps(qmp, run),
                Err(e) => Err(anyhow!("{e:#}")),
            };
            step(
                format!("settle bitmaps of disk '{}'", run.disk.name),
                result,
            );
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "VM '{vm}': ending the backup view failed ({}); run cleanup",
            failed.join("; ")
        )
    }
}

/// Stored: only the temporary frozen copy goes. The old generation stays until
/// the manifest is written (the engine's `cleanup` then removes it, or merges the
/// new one back if the commit failed).
fn drop_tmp_bitmaps(qmp: &mut Qmp, graph: &BlockGraph, run: &DiskRun) -> Result<()> {
    let node = &run.disk.node;
    let Some(current) = graph.node(node) else {
        bail!("node '{node}' vanished");
    };
    let actions = current
        .bitmaps
        .iter()
        .filter(|b| matches!(names::parse_bitmap(&b.name), Some((BitmapKind::Tmp, _))))
        .map(|b| remove_action(node, &b.name))
        .collect();
    run_transaction(qmp, actions)
}

/// Not committed: changes since the old base, including those made during this
/// run, must stay tracked by the old bitmaps.
fn roll_back_bitmaps(qmp: &mut Qmp, run: &DiskRun) -> Result<()> {
    let node = &run.disk.node;
    let mut actions = Vec::new();
    for (new, old) in [
        (&run.new_inc, &run.disabled_inc),
        (&run.new_diff, &run.disabled_diff),
    ] {
        let Some(new) = new else { continue };
        for old in old {
            actions.push(json!({ "type": "block-dirty-bitmap-merge", "data": {
                "node": node, "target": old, "bitmaps": [new] } }));
            actions.push(json!({ "type": "block-dirty-bitmap-enable",
                                 "data": { "node": node, "name": old } }));
        }
        actions.push(remove_action(node, new));
    }
    if let Some((tmp, _, _)) = &run.tmp {
        actions.push(remove_action(node, tmp));
    }
    run_transaction(qmp, actions)
}

pub fn remove_action(node: &str, bitmap: &str) -> Value {
    json!({ "type": "block-dirty-bitmap-remove", "data": { "node": node, "name": bitmap } })
}

pub fn run_transaction(qmp: &mut Qmp, actions: Vec<Value>) -> Result<()> {
    if !actions.is_empty() {
        qmp.execute("transaction", json!({ "actions": actions }))?;
    }
    Ok(())
}

/// Remove an export (dropping clients) and wait until QEMU says it is gone.
pub fn remove_export(qmp: &mut Qmp, id: &str) -> Result<()> {
    match qmp.execute("block-export-del", json!({ "id": id, "mode": "hard" })) {
        Ok(_) => {}
        Err(e) if is_qmp_error(&e, "not found") => return Ok(()),
        Err(e) => return Err(e),
    }
    qmp.wait_event(
        "BLOCK_EXPORT_DELETED",
        |ev| ev["data"]["id"] == id,
        TEARDOWN_TIMEOUT,
    )?;
    Ok(())
}

/// Cancel a block job and wait until it no longer exists.
pub fn cancel_job(qmp: &mut Qmp, id: &str) -> Result<()> {
    if !job_exists(qmp, id)? {
        return Ok(());
    }
    match qmp.execute("block-job-cancel", json!({ "device": id, "force": true })) {
        Ok(_) => {}
        Err(e) if !job_exists(qmp, id)? => {
            drop(e);
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    for _ in 0..10 {
        if !job_exists(qmp, id)? {
            return Ok(());
        }
        qmp.wait_event(
            "JOB_STATUS_CHANGE",
            |ev| ev["data"]["id"] == id && ev["data"]["status"] == "null",
            TEARDOWN_TIMEOUT,
        )?;
    }
    bail!("block job '{id}' did not go away after cancel")
}

fn job_exists(qmp: &mut Qmp, id: &str) -> Result<bool> {
    let jobs = qmp.execute("query-block-jobs", Value::Null)?;
    Ok(jobs
        .as_array()
        .is_some_and(|jobs| jobs.iter().any(|j| j["device"] == id)))
}

/// `blockdev-del`; a node that is already gone is fine.
pub fn delete_node(qmp: &mut Qmp, node: &str) -> Result<()> {
    match qmp.execute("blockdev-del", json!({ "node-name": node })) {
        Ok(_) => Ok(()),
        Err(e) if is_qmp_error(&e, "Failed to find node") || is_qmp_error(&e, "Cannot find") => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}
