//! Names of everything vmbackup creates inside QEMU and in the run directory.
//!
//! All carry [`PREFIX`], so leftovers of a crashed run are recognisable and nothing
//! of the user's is ever touched:
//! - persistent bitmaps `vmbackup-inc-<POINT>` (changes since point POINT) and
//!   `vmbackup-diff-<FULL>` (changes since full FULL); temporary non-persistent
//!   `vmbackup-tmp-<NEWPOINT>`;
//! - fleecing nodes `vmbackup-fleece-<disknode>` and `...-file` (QEMU limits node
//!   names to 31 characters: longer ones become `vmbackup-fleece<N>`, N = disk index);
//! - block job `vmbackup-job-<disknode>`, NBD export (id = name) `vmbackup-<disknode>`;
//! - in the VM's private scratch directory (one per VM, named by a hash, so VM
//!   names never collide nor make paths long): `fleece-<N>.qcow2` for the `N`th
//!   disk and, when we start QEMU's NBD server ourselves, `nbd.sock`.
//!
//! Point ids sort by time as strings (`20261124T120000Z`), which cleanup relies on.

use std::path::{Path, PathBuf};

pub const PREFIX: &str = "vmbackup-";
pub const INC_PREFIX: &str = "vmbackup-inc-";
pub const DIFF_PREFIX: &str = "vmbackup-diff-";
pub const TMP_PREFIX: &str = "vmbackup-tmp-";
pub const FLEECE_PREFIX: &str = "vmbackup-fleece";
pub const JOB_PREFIX: &str = "vmbackup-job-";

/// QEMU rejects longer node names.
const MAX_NODE_NAME: usize = 31;

/// The kinds of dirty bitmap vmbackup owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapKind {
    Inc,
    Diff,
    Tmp,
}

pub fn inc_bitmap(point: &str) -> String {
    format!("{INC_PREFIX}{point}")
}

pub fn diff_bitmap(point: &str) -> String {
    format!("{DIFF_PREFIX}{point}")
}

pub fn tmp_bitmap(point: &str) -> String {
    format!("{TMP_PREFIX}{point}")
}

/// Kind and point id of one of our bitmaps; `None` for anything else.
pub fn parse_bitmap(name: &str) -> Option<(BitmapKind, &str)> {
    if let Some(point) = name.strip_prefix(INC_PREFIX) {
        Some((BitmapKind::Inc, point))
    } else if let Some(point) = name.strip_prefix(DIFF_PREFIX) {
        Some((BitmapKind::Diff, point))
    } else {
        name.strip_prefix(TMP_PREFIX)
            .map(|point| (BitmapKind::Tmp, point))
    }
}

/// The fleecing overlay's node name for disk node `node`, the `index`th disk.
pub fn fleece_node(node: &str, index: usize) -> String {
    let long = format!("{FLEECE_PREFIX}-{node}");
    if long.len() + "-file".len() <= MAX_NODE_NAME {
        long
    } else {
        format!("{FLEECE_PREFIX}{index}")
    }
}

/// The protocol node under the fleecing overlay.
pub fn fleece_file_node(fleece_node: &str) -> String {
    format!("{fleece_node}-file")
}

pub fn job_id(node: &str) -> String {
    format!("{JOB_PREFIX}{node}")
}

/// Block export id, which is also the NBD export name.
pub fn export_id(node: &str) -> String {
    format!("{PREFIX}{node}")
}

/// The fleecing image of the `index`th disk in the VM's scratch directory.
pub fn fleece_image(scratch: &Path, index: usize) -> PathBuf {
    scratch.join(format!("fleece-{index}.qcow2"))
}

/// Whether a file in a VM's scratch directory is one of its fleecing images.
pub fn is_fleece_image(file_name: &str) -> bool {
    file_name.starts_with("fleece-") && file_name.ends_with(".qcow2")
}

/// The socket of an NBD server vmbackup starts inside QEMU.
pub fn nbd_socket(scratch: &Path) -> PathBuf {
    scratch.join("nbd.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_names_parse_back() {
        assert_eq!(
            parse_bitmap(&inc_bitmap("20261124T120000Z")),
            Some((BitmapKind::Inc, "20261124T120000Z"))
        );
        assert_eq!(
            parse_bitmap(&diff_bitmap("P")),
            Some((BitmapKind::Diff, "P"))
        );
        assert_eq!(parse_bitmap(&tmp_bitmap("P")), Some((BitmapKind::Tmp, "P")));
        assert_eq!(parse_bitmap("cbt0"), None);
    }

    #[test]
    fn fleece_node_names_fit_qemu_limit() {
        assert_eq!(fleece_node("disk0", 0), "vmbackup-fleece-disk0");
        let long = fleece_node("libvirt-1-format", 3);
        assert_eq!(long, "vmbackup-fleece3");
        assert!(fleece_file_node(&fleece_node("abcdefghij", 0)).len() <= MAX_NODE_NAME);
    }

    #[test]
    fn scratch_files_are_recognised() {
        let img = fleece_image(Path::new("/run/0123456789abcdef"), 3);
        let name = img.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "fleece-3.qcow2");
        assert!(is_fleece_image(name));
        assert!(!is_fleece_image("nbd.sock"));
    }
}
