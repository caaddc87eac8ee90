//! The libvirt platform: the domains of a libvirt daemon, through libvirt's C API
//! (loaded at run time, [`ffi`]).
//!
//! - Inventory (R3, R36, R43): every domain, running or shut off, with its disks
//!   (`<target dev>`, source, format, size). CD-ROMs and floppies are skipped;
//!   `device='lun'`, `<shareable/>` disks and SCSI `<hostdev>`s cannot be covered by
//!   a snapshot and are refused at backup time. Network and read-only disks are
//!   backed up; changed-block tracking needs qcow2 disks the domain writes.
//! - A running domain ([`online`]): one libvirt checkpoint per point, named
//!   `vmbackup-<POINT>`, created with a pull-mode `virDomainBackupBegin`, which
//!   exports every disk over NBD (libvirt does the fleecing); incrementals and
//!   differentials export the bitmap of the base point's checkpoint.
//! - A shut-off domain ([`offline`]): each disk is read with `qemu-nbd --read-only`,
//!   with the persistent bitmap of the base point's checkpoint (`-B`). No checkpoint
//!   can be created offline: the point's token names the newest checkpoint there is.
//! - Checkpoints ([`checkpoints`]): only `vmbackup-*` ones are ever created,
//!   redefined or deleted; lost ones are redefined from the XML kept in the manifest.
//! - Quiesce (R10, [`quiesce`]): `virDomainFSFreeze`/`FSThaw` through the guest
//!   agent, around `virDomainBackupBegin` only.
//!
//! Restore as a new domain ([`xml::new_domain_xml`]): the point's domain XML with a
//! new name, no UUID and MACs, its disks on the restored images; defined, maybe
//! started.
//!
//! Remote URIs (`qemu+ssh://`, `qemu+tls://`) give inventory, configuration and
//! restore-as-new-domain; their backups need an NBD export over TCP with TLS, which
//! is refused with a clear error until vmbackup's NBD client speaks TLS.

pub mod checkpoints;
pub mod ffi;
pub mod offline;
pub mod online;
pub mod quiesce;
pub mod xml;

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::json;

use self::ffi::{Connection, Domain};
use super::{
    BackupRequest, CleanupReport, DefinedVm, DiskInfo, NewVm, Platform, Snapshot, TrackingToken,
    VmHandle, VmInfo,
};

/// A libvirt daemon, connected.
pub struct LibvirtPlatform {
    conn: Arc<Connection>,
    uri: String,
    host: String,
}

impl LibvirtPlatform {
    pub fn connect(uri: &str) -> Result<LibvirtPlatform> {
        let conn = Connection::open(uri)?;
        let host = conn.hostname().unwrap_or_else(|_| "localhost".into());
        Ok(LibvirtPlatform {
            conn: Arc::new(conn),
            uri: uri.to_string(),
            host,
        })
    }

    /// Whether the daemon runs on another host (ssh, tls, tcp transports with a
    /// host name). Local: `qemu:///system`, `qemu+unix:///system`.
    pub fn is_remote(&self) -> bool {
        is_remote_uri(&self.uri)
    }
}

/// `driver[+transport]://[host]/path[?query]`: remote when a host is named or the
/// transport is not unix.
pub fn is_remote_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    let transport = scheme.split_once('+').map(|(_, t)| t);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    match transport {
        None | Some("unix") => !host.is_empty() && host != "localhost",
        Some(_) => true,
    }
}

impl Platform for LibvirtPlatform {
    fn reachable(&self) -> Result<()> {
        if self.conn.is_alive() {
            Ok(())
        } else {
            bail!("libvirt connection to {} is closed", self.uri)
        }
    }

    fn inventory(&self) -> Result<Vec<VmInfo>> {
        let mut vms = Vec::new();
        for dom in self.conn.domains()? {
            vms.push(vm_info(&dom, &self.host).unwrap_or_else(|e| VmInfo {
                name: dom.name(),
                status: String::new(),
                disks: Vec::new(),
                error: Some(format!("{e:#}")),
                identity: None,
            }));
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }

    fn define_vm(&self, vm: &NewVm) -> Result<DefinedVm> {
        let Some(old) = domain_xml_of(vm.config) else {
            bail!(
                "the point's VM configuration holds no libvirt domain XML (was it taken on \
                 a libvirt platform?); restore to files instead"
            );
        };
        if self.conn.domain(vm.name).is_ok() {
            return Err(crate::error::invalid(
                "--as-vm",
                vm.name,
                "a domain of this name exists on the platform; pick a new name",
            ));
        }
        let disks: Vec<xml::RestoredDisk> = vm
            .disks
            .iter()
            .map(|(target, image, format)| xml::RestoredDisk {
                target,
                image,
                format,
            })
            .collect();
        let new_xml = xml::new_domain_xml(old, vm.name, &disks)?;
        let dom = self.conn.define(&new_xml)?;
        if vm.start {
            dom.start()?;
        }
        Ok(DefinedVm {
            name: dom.name(),
            identity: Some(identity(&self.host, &dom.uuid()?)),
            started: vm.start,
        })
    }

    fn open_vm(&self, vm: &str) -> Result<Box<dyn VmHandle>> {
        let dom = self.conn.domain(vm)?;
        let uuid = dom.uuid()?;
        drop(dom);
        Ok(Box::new(LibvirtVm {
            conn: self.conn.clone(),
            name: vm.to_string(),
            uuid,
            host: self.host.clone(),
            remote: self.is_remote(),
            active: None,
        }))
    }
}

/// A domain's identity (`VmInfo::identity`, R35): `libvirt:<host>/<UUID>`.
fn identity(host: &str, uuid: &str) -> String {
    format!("libvirt:{host}/{uuid}")
}

/// The domain XML in a point's `vm_config` (see `VmHandle::config`).
pub fn domain_xml_of(config: &serde_json::Value) -> Option<&str> {
    config["domain_xml"].as_str()
}

/// One domain as the platform reports it.
fn vm_info(dom: &Domain, host: &str) -> Result<VmInfo> {
    let state = dom.state()?;
    let xml = dom.xml(0)?;
    let mut disks = Vec::new();
    for d in xml::domain_disks(&xml)? {
        if matches!(d.device.as_str(), "cdrom" | "floppy") {
            continue;
        }
        let uncoverable = if d.device == "lun" {
            Some("SCSI LUN passthrough (device='lun'): writes bypass the snapshot".to_string())
        } else if d.shareable {
            Some("shareable disk (<shareable/>): other writers bypass the snapshot".to_string())
        } else {
            None
        };
        let size = dom.disk_capacity(&d.target).unwrap_or(0);
        disks.push(DiskInfo {
            name: d.target.clone(),
            node: d.target.clone(),
            file: d.source.clone(),
            cbt: d.format == "qcow2" && !d.read_only,
            format: d.format.clone(),
            size,
            uncoverable,
        });
    }
    for h in xml::scsi_hostdevs(&xml)? {
        disks.push(DiskInfo {
            name: h.clone(),
            node: h,
            file: None,
            format: "hostdev".into(),
            size: 0,
            cbt: false,
            uncoverable: Some("host SCSI device passed through (<hostdev>)".into()),
        });
    }
    let mut status = state.word().to_string();
    if !state.persistent {
        status.push_str(" (transient)");
    }
    Ok(VmInfo {
        name: dom.name(),
        status,
        disks,
        error: None,
        identity: Some(identity(host, &dom.uuid()?)),
    })
}

/// One domain, opened for backup work.
pub struct LibvirtVm {
    conn: Arc<Connection>,
    name: String,
    uuid: String,
    host: String,
    remote: bool,
    active: Option<Active>,
}

/// The open backup view.
enum Active {
    Online(online::View),
    Offline(offline::View),
}

impl LibvirtVm {
    fn domain(&self) -> Result<Domain<'_>> {
        self.conn.domain(&self.name)
    }
}

impl VmHandle for LibvirtVm {
    fn info(&mut self) -> Result<VmInfo> {
        vm_info(&self.domain()?, &self.host)
    }

    /// The domain XML (the persistent definition where there is one), fetched
    /// without secure fields (no passwords) and redacted like command lines.
    fn config(&mut self) -> Result<serde_json::Value> {
        let dom = self.domain()?;
        let state = dom.state()?;
        let flags = if state.persistent {
            ffi::XML_INACTIVE
        } else {
            0
        };
        Ok(json!({
            "kind": "libvirt",
            "uuid": self.uuid,
            "persistent": state.persistent,
            "domain_xml": xml::redact(&dom.xml(flags)?)?,
        }))
    }

    fn begin_backup(&mut self, req: &BackupRequest) -> Result<Snapshot> {
        if self.active.is_some() {
            bail!("domain '{}': a backup view is already open", self.name);
        }
        let conn = self.conn.clone();
        let dom = conn.domain(&self.name)?;
        let info = vm_info(&dom, &self.host)?;
        if let Some(d) = info.disks.iter().find(|d| d.uncoverable.is_some()) {
            bail!(
                "domain '{}': disk '{}' cannot be covered by a snapshot: {}",
                self.name,
                d.name,
                d.uncoverable.as_deref().unwrap_or_default()
            );
        }
        let (active, snapshot) = if dom.state()?.is_active() {
            if self.remote {
                bail!(
                    "domain '{}' runs on a remote libvirt host: its backup export must be \
                     NBD over TCP with TLS, which vmbackup does not speak yet; back it up \
                     with vmbackup on that host (qemu:///system)",
                    self.name
                );
            }
            let (view, snap) = online::begin(&dom, &self.uuid, &info, req)?;
            (Active::Online(view), snap)
        } else {
            if self.remote {
                bail!(
                    "domain '{}' is shut off on a remote libvirt host: its images can only \
                     be read on that host",
                    self.name
                );
            }
            let (view, snap) = offline::begin(&dom, &self.uuid, &info, req)?;
            (Active::Offline(view), snap)
        };
        self.active = Some(active);
        Ok(snapshot)
    }

    fn finish_backup(&mut self, stored: bool) -> Result<Option<TrackingToken>> {
        let Some(active) = self.active.take() else {
            bail!("domain '{}': no backup view is open", self.name);
        };
        match active {
            Active::Online(view) => online::finish(&self.domain()?, view, stored),
            Active::Offline(view) => offline::finish(view, stored),
        }
    }

    /// The domain itself: one running QEMU per domain.
    fn running_identity(&mut self) -> Result<Option<String>> {
        Ok(Some(identity(&self.host, &self.uuid)))
    }

    fn cleanup(
        &mut self,
        latest_point: Option<&str>,
        latest_full: Option<&str>,
        run_dir: &Path,
    ) -> Result<CleanupReport> {
        if self.active.is_some() {
            bail!(
                "domain '{}': a backup view is open in this process; finish it first",
                self.name
            );
        }
        let dom = self.domain()?;
        let mut report = CleanupReport::default();
        let actions = &mut report.actions;
        quiesce::thaw_leftover(&dom, &self.uuid, run_dir, actions)
            .with_context(|| format!("domain '{}': thaw", self.name))?;
        online::remove_leftovers(&dom, &self.uuid, actions)
            .with_context(|| format!("domain '{}': end the interrupted backup job", self.name))?;
        offline::remove_leftovers(&self.uuid, run_dir, actions)?;
        if dom.state()?.is_active() {
            checkpoints::settle(&dom, latest_point, latest_full, actions)
                .with_context(|| format!("domain '{}': checkpoints", self.name))?;
        }
        Ok(report)
    }
}

impl std::fmt::Debug for LibvirtVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtVm")
            .field("name", &self.name)
            .field("uuid", &self.uuid)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::is_remote_uri;

    #[test]
    fn remote_uris_are_told_from_local_ones() {
        assert!(!is_remote_uri("qemu:///system"));
        assert!(!is_remote_uri("qemu+unix:///system?socket=/tmp/s"));
        assert!(!is_remote_uri("qemu:///session"));
        assert!(is_remote_uri("qemu+ssh://root@kvm1/system"));
        assert!(is_remote_uri("qemu+tls://kvm1.example/system"));
        assert!(is_remote_uri("qemu://kvm1/system"));
    }
}
