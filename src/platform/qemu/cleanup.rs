//! Repair after an interrupted run (R44): remove every `vmbackup-*` export, job,
//! fleecing node, scratch file and NBD server of ours, and reconcile the bitmaps
//! with the newest committed point, as `finish_backup` would have left them.
//!
//! Bitmap rules, per disk node, for inc bitmaps against `latest_point` and diff
//! bitmaps against `latest_full`:
//! - temporary and inconsistent bitmaps of ours are removed;
//! - if the bitmap of the latest point exists, older generations are removed,
//!   newer ones (an uncommitted run) are merged into it and removed, and it records;
//! - if it does not exist, disabled generations are removed (they track nothing
//!   any more; the next run is a full anyway) and recording ones are left alone.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::backup::{cancel_job, delete_node, remove_action, remove_export, run_transaction};
use super::graph::{Bitmap, BlockGraph, BlockNode};
use super::inventory::VmState;
use super::names::{self, BitmapKind};
use super::nbd_server;
use crate::platform::qmp::Qmp;
use crate::platform::CleanupReport;

/// Things of ours a new run would collide with (empty = clean).
pub fn leftovers(qmp: &mut Qmp, state: &VmState, run_dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for id in our_exports(qmp)? {
        found.push(format!("export {id}"));
    }
    for id in our_jobs(qmp)? {
        found.push(format!("block job {id}"));
    }
    for node in state.graph.nodes.keys() {
        if node.starts_with(names::PREFIX) {
            found.push(format!("node {node}"));
        }
    }
    for (node, bitmaps) in state.graph.our_bitmaps() {
        for b in bitmaps {
            if matches!(names::parse_bitmap(&b.name), Some((BitmapKind::Tmp, _))) {
                found.push(format!("bitmap {} on {}", b.name, node.name));
            }
        }
    }
    let socket = names::nbd_socket(run_dir);
    if socket.exists() {
        found.push(format!("NBD socket {}", socket.display()));
    }
    Ok(found)
}

/// Remove leftovers and reconcile bitmaps; idempotent.
pub fn cleanup(
    qmp: &mut Qmp,
    vm: &str,
    latest_point: Option<&str>,
    latest_full: Option<&str>,
    run_dir: &Path,
) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let actions = &mut report.actions;
    for id in our_exports(qmp)? {
        remove_export(qmp, &id).with_context(|| format!("VM '{vm}': remove export {id}"))?;
        actions.push(format!("removed NBD export {id}"));
    }
    for id in our_jobs(qmp)? {
        cancel_job(qmp, &id).with_context(|| format!("VM '{vm}': cancel block job {id}"))?;
        actions.push(format!("cancelled block job {id}"));
    }
    let graph = BlockGraph::query(qmp)?;
    let mut ours: Vec<&String> = graph
        .nodes
        .keys()
        .filter(|n| n.starts_with(names::PREFIX))
        .collect();
    // Overlays before the file nodes under them.
    ours.sort_by_key(|n| n.ends_with("-file"));
    for node in ours {
        delete_node(qmp, node).with_context(|| format!("VM '{vm}': delete node {node}"))?;
        actions.push(format!("deleted block node {node}"));
    }
    let socket = names::nbd_socket(run_dir);
    if socket.exists() {
        let theirs = qmp
            .peer_pid()
            .and_then(nbd_server::read_cmdline)
            .map(|args| nbd_server::nbd_addr_from_cmdline(&args).is_some())
            .unwrap_or(false);
        if theirs {
            nbd_server::remove_file_if_exists(&socket)?;
            actions.push(format!("removed stale socket {}", socket.display()));
        } else {
            nbd_server::stop(qmp, &socket)
                .with_context(|| format!("VM '{vm}': stop NBD server on {}", socket.display()))?;
            actions.push(format!("stopped NBD server on {}", socket.display()));
        }
    }
    remove_scratch_files(run_dir, actions)?;
    let graph = BlockGraph::query(qmp)?;
    for (node, bitmaps) in graph.our_bitmaps() {
        settle_node(qmp, node, &bitmaps, latest_point, latest_full, actions)
            .with_context(|| format!("VM '{vm}': reconcile bitmaps of node {}", node.name))?;
    }
    Ok(report)
}

fn remove_scratch_files(run_dir: &Path, actions: &mut Vec<String>) -> Result<()> {
    let entries = match std::fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("list {}", run_dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("list {}", run_dir.display()))?;
        let name = entry.file_name();
        if names::is_fleece_image(&name.to_string_lossy()) {
            nbd_server::remove_file_if_exists(&entry.path())?;
            actions.push(format!("removed scratch file {}", entry.path().display()));
        }
    }
    Ok(())
}

/// One node's bitmaps: drop temporary and inconsistent ones, reconcile generations.
fn settle_node(
    qmp: &mut Qmp,
    node: &BlockNode,
    bitmaps: &[&Bitmap],
    latest_point: Option<&str>,
    latest_full: Option<&str>,
    actions: &mut Vec<String>,
) -> Result<()> {
    let mut tx = Vec::new();
    let mut done = Vec::new();
    let mut inc: Vec<(&str, &Bitmap)> = Vec::new();
    let mut diff: Vec<(&str, &Bitmap)> = Vec::new();
    for b in bitmaps {
        let Some((kind, point)) = names::parse_bitmap(&b.name) else {
            continue;
        };
        if kind == BitmapKind::Tmp || b.inconsistent {
            tx.push(remove_action(&node.name, &b.name));
            let what = if b.inconsistent {
                "inconsistent"
            } else {
                "temporary"
            };
            done.push(format!("removed {what} bitmap {} on {}", b.name, node.name));
        } else if kind == BitmapKind::Inc {
            inc.push((point, b));
        } else {
            diff.push((point, b));
        }
    }
    reconcile(&node.name, latest_point, &inc, &mut tx, &mut done);
    reconcile(&node.name, latest_full, &diff, &mut tx, &mut done);
    run_transaction(qmp, tx)?;
    actions.extend(done);
    Ok(())
}

/// Actions that leave one kind of bitmap relative to `latest` (module docs).
fn reconcile(
    node: &str,
    latest: Option<&str>,
    list: &[(&str, &Bitmap)],
    tx: &mut Vec<Value>,
    done: &mut Vec<String>,
) {
    let anchor = latest.and_then(|l| list.iter().find(|(p, _)| *p == l));
    let Some((latest, anchor)) = anchor else {
        for (_, b) in list.iter().filter(|(_, b)| !b.recording) {
            tx.push(remove_action(node, &b.name));
            done.push(format!(
                "removed orphaned disabled bitmap {} on {node}",
                b.name
            ));
        }
        return;
    };
    for (point, b) in list {
        if point > latest {
            tx.push(json!({ "type": "block-dirty-bitmap-merge", "data": {
                "node": node, "target": anchor.name, "bitmaps": [b.name] } }));
            tx.push(remove_action(node, &b.name));
            done.push(format!(
                "merged uncommitted bitmap {} into {} on {node}",
                b.name, anchor.name
            ));
        } else if point < latest {
            tx.push(remove_action(node, &b.name));
            done.push(format!("removed superseded bitmap {} on {node}", b.name));
        }
    }
    if !anchor.recording {
        tx.push(json!({ "type": "block-dirty-bitmap-enable",
                        "data": { "node": node, "name": anchor.name } }));
        done.push(format!("re-enabled bitmap {} on {node}", anchor.name));
    }
}

fn our_exports(qmp: &mut Qmp) -> Result<Vec<String>> {
    let list = qmp.execute("query-block-exports", Value::Null)?;
    Ok(ids(&list, "id", names::PREFIX))
}

fn our_jobs(qmp: &mut Qmp) -> Result<Vec<String>> {
    let list = qmp.execute("query-block-jobs", Value::Null)?;
    Ok(ids(&list, "device", names::JOB_PREFIX))
}

fn ids(list: &Value, key: &str, prefix: &str) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v[key].as_str())
        .filter(|id| id.starts_with(prefix))
        .map(str::to_string)
        .collect()
}
