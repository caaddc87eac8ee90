//! Inventory of one QEMU process: its name, run state and disks (R3, R36, R43).
//!
//! qemu-system: the disks are the guest block devices with inserted media
//! (`query-block`), named by device id (`vda`). qemu-storage-daemon has no devices
//! and no `query-name`: its disks are the top-level user nodes of the block graph,
//! named by node name. Each disk is the format node holding the data (below any
//! filters), which is where dirty bitmaps live.
//!
//! R43: a disk a snapshot cannot cover gets a reason in `DiskInfo::uncoverable`:
//! SCSI passthrough (`scsi-block`/`scsi-generic` bypass the block layer, so neither
//! fleecing nor dirty bitmaps see their writes), shareable (`share-rw=on`: another
//! writer may change it), removable media and read-only nodes. `host_device` alone
//! is not passthrough: a raw LV under virtio-blk goes through the block layer.

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::graph::BlockGraph;
use crate::platform::qmp::{is_qmp_error, Qmp};
use crate::platform::{DiskInfo, VmInfo};

/// What kind of QEMU process answers on a QMP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmKind {
    /// qemu-system-*: a VM with guest devices.
    System,
    /// qemu-storage-daemon: block nodes only.
    StorageDaemon,
}

/// A VM as queried just now.
pub struct VmState {
    pub info: VmInfo,
    pub kind: VmKind,
    pub graph: BlockGraph,
}

/// Query name, status and disks. `stem` is the QMP socket's file stem, the name
/// when QEMU has none.
pub fn query_vm(qmp: &mut Qmp, stem: &str) -> Result<VmState> {
    let (name, kind) = match qmp.execute("query-name", Value::Null) {
        Ok(v) => (
            v["name"].as_str().unwrap_or(stem).to_string(),
            VmKind::System,
        ),
        Err(e) if is_qmp_error(&e, "CommandNotFound") => (stem.to_string(), VmKind::StorageDaemon),
        Err(e) => return Err(e),
    };
    let status = match kind {
        VmKind::System => qmp.execute("query-status", Value::Null)?["status"]
            .as_str()
            .unwrap_or("unknown")
            .to_string(),
        VmKind::StorageDaemon => "running".to_string(),
    };
    let graph = BlockGraph::query(qmp)?;
    let disks = match kind {
        VmKind::System => device_disks(qmp, &graph)?,
        VmKind::StorageDaemon => graph
            .top_nodes()
            .into_iter()
            .map(|node| disk_info(&graph, node, node, None))
            .collect(),
    };
    Ok(VmState {
        info: VmInfo {
            name,
            status,
            disks,
            error: None,
            identity: Some(identity_of(qmp.socket())),
        },
        kind,
        graph,
    })
}

/// A QEMU VM's identity (`VmInfo::identity`): the canonical path of its QMP
/// socket, so a second platform on the same directory, a symlink to it or to the
/// socket finds the same VM.
pub fn identity_of(socket: &std::path::Path) -> String {
    let path = socket
        .canonicalize()
        .unwrap_or_else(|_| socket.to_path_buf());
    format!("qemu:{}", path.display())
}

/// Disks of a qemu-system VM: block devices with inserted media.
fn device_disks(qmp: &mut Qmp, graph: &BlockGraph) -> Result<Vec<DiskInfo>> {
    let blocks = qmp.execute("query-block", Value::Null)?;
    let mut disks = Vec::new();
    for b in blocks.as_array().context("query-block: not a list")? {
        let Some(root) = b["inserted"]["node-name"].as_str() else {
            continue;
        };
        let node = graph.data_node(root);
        let qdev = b["qdev"].as_str().unwrap_or("");
        let name = device_id(qdev)
            .or_else(|| b["device"].as_str().filter(|d| !d.is_empty()))
            .unwrap_or(node);
        let device_reason = if qdev.is_empty() {
            None
        } else {
            device_uncoverable(qmp, qdev, b["removable"].as_bool().unwrap_or(false))
        };
        disks.push(disk_info(graph, node, name, device_reason));
    }
    Ok(disks)
}

/// `vda` from `/machine/peripheral/vda/virtio-backend`; a bare `cd` is already an
/// id; anonymous devices (`/machine/peripheral-anon/...`) have none.
fn device_id(qdev: &str) -> Option<&str> {
    if let Some(rest) = qdev.strip_prefix("/machine/peripheral/") {
        return rest.split('/').next().filter(|id| !id.is_empty());
    }
    (!qdev.is_empty() && !qdev.starts_with('/')).then_some(qdev)
}

/// R43 reasons that come from the guest device. QOM lookups that fail (a device
/// type without the property) count as "not set".
fn device_uncoverable(qmp: &mut Qmp, qdev: &str, removable: bool) -> Option<String> {
    let device_type = qmp
        .execute("qom-get", json!({ "path": qdev, "property": "type" }))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    if device_type == "scsi-block" || device_type == "scsi-generic" {
        return Some(format!("SCSI passthrough LUN ({device_type})"));
    }
    let share_rw = qmp
        .execute("qom-get", json!({ "path": qdev, "property": "share-rw" }))
        .ok()
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if share_rw {
        return Some("shareable disk (share-rw=on): other writers bypass the snapshot".into());
    }
    if removable {
        return Some(format!("removable media ({device_type})"));
    }
    None
}

fn disk_info(
    graph: &BlockGraph,
    node: &str,
    name: &str,
    device_reason: Option<String>,
) -> DiskInfo {
    let n = graph.node(node);
    let format = n.map(|n| n.drv.clone()).unwrap_or_default();
    let protocol = n
        .and_then(|n| n.child("file"))
        .and_then(|c| graph.node(c))
        .map(|c| c.drv.as_str())
        .unwrap_or("");
    let uncoverable = device_reason.or_else(|| {
        if format == "host_cdrom" || protocol == "host_cdrom" {
            Some("host CD-ROM passthrough (host_cdrom)".into())
        } else if n.is_some_and(|n| n.read_only) {
            Some("read-only disk".into())
        } else {
            None
        }
    });
    DiskInfo {
        name: name.to_string(),
        node: node.to_string(),
        file: n.and_then(|n| n.file.clone()),
        cbt: format == "qcow2",
        format,
        size: n.map(|n| n.size).unwrap_or(0),
        uncoverable,
    }
}

#[cfg(test)]
mod tests {
    use super::device_id;

    #[test]
    fn device_ids_from_qdev_paths() {
        assert_eq!(
            device_id("/machine/peripheral/vda/virtio-backend"),
            Some("vda")
        );
        assert_eq!(device_id("cd"), Some("cd"));
        assert_eq!(
            device_id("/machine/peripheral-anon/device[0]/virtio-backend"),
            None
        );
        assert_eq!(device_id(""), None);
    }
}
