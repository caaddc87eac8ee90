//! Quiesce (R10) for libvirt domains: `virDomainFSFreeze` / `virDomainFSThaw`,
//! which go through the QEMU guest agent inside the domain.
//!
//! Freezing is recorded first (a marker file in the run directory, see
//! [`crate::platform::freeze_marker`]), so that a run killed while the guest is
//! frozen is thawed by the next run of the VM, `vmbackup cleanup`, or the reclaim
//! of its task. Only guests vmbackup froze are ever thawed.

use std::path::Path;

use anyhow::Result;

use super::ffi::Domain;
use crate::platform::{freeze_marker, FreezeOutcome, Quiesce};

/// Freeze the guest's file systems as `mode` asks (see [`FreezeOutcome`]).
pub fn freeze(dom: &Domain, uuid: &str, mode: Quiesce, run_dir: &Path) -> Result<FreezeOutcome> {
    if mode == Quiesce::Off {
        return Ok(FreezeOutcome::NotAsked);
    }
    let marker = freeze_marker::create(run_dir, uuid)?;
    match dom.fs_freeze() {
        Ok(n) => {
            crate::platform::hold_frozen_for_tests();
            Ok(FreezeOutcome::Frozen(n))
        }
        Err(e) => {
            freeze_marker::remove(&marker)?;
            FreezeOutcome::no_agent(
                mode,
                &dom.name(),
                &format!("{e:#}"),
                "run qemu-guest-agent in the guest and give the domain a guest agent \
                 channel (<channel type='unix'><target type='virtio' \
                 name='org.qemu.guest_agent.0'/></channel>)",
            )
        }
    }
}

/// Thaw what [`freeze`] froze and drop the marker.
pub fn thaw(dom: &Domain, uuid: &str, run_dir: &Path) -> Result<()> {
    dom.fs_thaw()?;
    freeze_marker::remove(&freeze_marker::path(run_dir, uuid))
}

/// Thaw a guest an interrupted run left frozen (its marker is there).
pub fn thaw_leftover(
    dom: &Domain,
    uuid: &str,
    run_dir: &Path,
    actions: &mut Vec<String>,
) -> Result<()> {
    if !freeze_marker::path(run_dir, uuid).exists() {
        return Ok(());
    }
    if dom.state()?.is_active() {
        let n = dom.fs_thaw()?;
        actions.push(format!(
            "thawed {n} guest file system(s) an interrupted run left frozen"
        ));
    }
    freeze_marker::remove(&freeze_marker::path(run_dir, uuid))
}
