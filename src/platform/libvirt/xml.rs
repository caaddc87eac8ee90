//! libvirt XML: what vmbackup reads from domain, backup-job and checkpoint XML,
//! and the backup and checkpoint documents it writes. Pure functions, unit-tested.
//!
//! Reading uses roxmltree; writing is a few fixed templates with every value
//! XML-escaped.

use std::path::Path;

use anyhow::{Context, Result};

/// One `<disk>` of a domain definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// `<target dev>`: `vda`, `sdb`, ...
    pub target: String,
    /// `device` attribute: `disk`, `lun`, `cdrom`, `floppy`.
    pub device: String,
    /// `type` attribute: `file`, `block`, `network`, `volume`, `dir`.
    pub kind: String,
    /// `<driver type>`: `qcow2`, `raw`, ... (empty when not given).
    pub format: String,
    /// The file or device path; `protocol:name` for network disks.
    pub source: Option<String>,
    pub read_only: bool,
    pub shareable: bool,
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>> {
    roxmltree::Document::parse(xml).context("libvirt returned XML that does not parse")
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

/// The disks of a domain definition, in document order.
pub fn domain_disks(xml: &str) -> Result<Vec<DomainDisk>> {
    let doc = parse(xml)?;
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for d in devices.children().filter(|c| c.has_tag_name("disk")) {
        let source = child(d, "source").and_then(|s| {
            s.attribute("file")
                .or(s.attribute("dev"))
                .or(s.attribute("dir"))
                .map(str::to_string)
                .or_else(|| match (s.attribute("protocol"), s.attribute("name")) {
                    (Some(p), Some(n)) => Some(format!("{p}:{n}")),
                    (Some(p), None) => Some(p.to_string()),
                    _ => s
                        .attribute("volume")
                        .map(|v| format!("{}/{v}", s.attribute("pool").unwrap_or(""))),
                })
        });
        out.push(DomainDisk {
            target: child(d, "target")
                .and_then(|t| t.attribute("dev"))
                .unwrap_or("")
                .to_string(),
            device: d.attribute("device").unwrap_or("disk").to_string(),
            kind: d.attribute("type").unwrap_or("file").to_string(),
            format: child(d, "driver")
                .and_then(|t| t.attribute("type"))
                .unwrap_or("")
                .to_string(),
            source,
            read_only: child(d, "readonly").is_some(),
            shareable: child(d, "shareable").is_some(),
        });
    }
    Ok(out)
}

/// Host SCSI devices passed through to the guest (`<hostdev type='scsi'>` and
/// `scsi_host`): disks no snapshot covers (R43). One description each.
pub fn scsi_hostdevs(xml: &str) -> Result<Vec<String>> {
    let doc = parse(xml)?;
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(Vec::new());
    };
    Ok(devices
        .children()
        .filter(|c| c.has_tag_name("hostdev"))
        .filter(|h| matches!(h.attribute("type"), Some("scsi") | Some("scsi_host")))
        .map(|h| {
            let addr = h
                .descendants()
                .find_map(|n| n.attribute("name").or(n.attribute("wwpn")))
                .unwrap_or("");
            format!(
                "hostdev-{}{}",
                h.attribute("type").unwrap_or(""),
                if addr.is_empty() {
                    String::new()
                } else {
                    format!(":{addr}")
                }
            )
        })
        .collect())
}

/// The uid:gid QEMU runs as, from a running domain's DAC security label
/// (`<seclabel model='dac'><label>+64055:+64055</label>`).
pub fn dac_owner(xml: &str) -> Result<Option<(u32, u32)>> {
    let doc = parse(xml)?;
    let label = doc
        .root_element()
        .children()
        .filter(|c| c.has_tag_name("seclabel") && c.attribute("model") == Some("dac"))
        .find_map(|s| child(s, "label").and_then(|l| l.text()));
    Ok(label.and_then(|l| {
        let (u, g) = l.trim().split_once(':')?;
        Some((
            u.trim_start_matches('+').parse().ok()?,
            g.trim_start_matches('+').parse().ok()?,
        ))
    }))
}

/// XML-escape a text or attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// One disk of a backup job: its target and scratch file, or `None` to leave it out.
pub struct BackupDisk<'a> {
    pub target: &'a str,
    pub scratch: Option<&'a Path>,
}

/// A pull-mode backup job exporting over a unix socket; `incremental` names the
/// checkpoint whose changes the export's dirty bitmap holds.
pub fn backup_xml(socket: &Path, disks: &[BackupDisk], incremental: Option<&str>) -> String {
    let mut x = String::from("<domainbackup mode='pull'>\n");
    if let Some(cp) = incremental {
        x.push_str(&format!("  <incremental>{}</incremental>\n", escape(cp)));
    }
    x.push_str(&format!(
        "  <server transport='unix' socket='{}'/>\n  <disks>\n",
        escape(&socket.to_string_lossy())
    ));
    for d in disks {
        match d.scratch {
            Some(scratch) => x.push_str(&format!(
                "    <disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk>\n",
                escape(d.target),
                escape(&scratch.to_string_lossy())
            )),
            None => x.push_str(&format!(
                "    <disk name='{}' backup='no'/>\n",
                escape(d.target)
            )),
        }
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

/// A checkpoint named `name` with a bitmap on each disk whose flag is true.
pub fn checkpoint_xml(name: &str, disks: &[(&str, bool)]) -> String {
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>vmbackup</description>\n  <disks>\n",
        escape(name)
    );
    for (target, bitmap) in disks {
        x.push_str(&format!(
            "    <disk name='{}' checkpoint='{}'/>\n",
            escape(target),
            if *bitmap { "bitmap" } else { "no" }
        ));
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    x
}

/// One disk of a running backup job: the NBD export name and, for an incremental,
/// the bitmap exported as `qemu:dirty-bitmap:<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDisk {
    pub target: String,
    pub export: String,
    pub bitmap: Option<String>,
}

/// The disks of a running backup job's XML (`virDomainBackupGetXMLDesc`), and the
/// unix socket its NBD server listens on.
pub fn backup_job(xml: &str) -> Result<(Option<String>, Vec<JobDisk>)> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let socket = child(root, "server")
        .and_then(|s| s.attribute("socket"))
        .map(str::to_string);
    let mut disks = Vec::new();
    if let Some(list) = child(root, "disks") {
        for d in list.children().filter(|c| c.has_tag_name("disk")) {
            if d.attribute("backup") == Some("no") {
                continue;
            }
            let target = d.attribute("name").unwrap_or("").to_string();
            disks.push(JobDisk {
                export: d.attribute("exportname").unwrap_or(&target).to_string(),
                bitmap: d.attribute("exportbitmap").map(str::to_string),
                target,
            });
        }
    }
    Ok((socket, disks))
}

/// A checkpoint's XML made fit for redefinition: without `<parent>` (the parent
/// may be gone; every bitmap records on its own, so the chain is not needed).
pub fn checkpoint_for_redefine(xml: &str) -> Result<String> {
    let doc = parse(xml)?;
    let mut out = xml.to_string();
    if let Some(parent) = child(doc.root_element(), "parent") {
        out.replace_range(parent.range(), "");
    }
    Ok(out)
}

/// `(disk, bitmap)` of a checkpoint's XML, for disks with `checkpoint='bitmap'`.
pub fn checkpoint_bitmaps(xml: &str) -> Result<Vec<(String, String)>> {
    let doc = parse(xml)?;
    let name = child(doc.root_element(), "name")
        .and_then(|n| n.text())
        .unwrap_or("")
        .to_string();
    let Some(list) = child(doc.root_element(), "disks") else {
        return Ok(Vec::new());
    };
    Ok(list
        .children()
        .filter(|d| d.has_tag_name("disk") && d.attribute("checkpoint") == Some("bitmap"))
        .map(|d| {
            (
                d.attribute("name").unwrap_or("").to_string(),
                d.attribute("bitmap").unwrap_or(&name).to_string(),
            )
        })
        .collect())
}

/// The XML with every secret attribute value replaced, by the rule that redacts
/// command lines ([`crate::platform::redact::is_secret_key`]: `passwd`, `key`,
/// `token`, ...; references such as `uuid` stay). libvirt already leaves out
/// passwords when asked without `VIR_DOMAIN_XML_SECURE`; this is the second line.
/// `keymap` (a keyboard layout) is not a secret.
pub fn redact(xml: &str) -> Result<String> {
    let doc = parse(xml)?;
    let mut edits = Vec::new();
    for n in doc.descendants().filter(|n| n.is_element()) {
        for a in n.attributes() {
            let name = a.name();
            if crate::platform::redact::is_secret_key(name)
                && name != "keymap"
                && a.value() != crate::platform::redact::REDACTED
            {
                edits.push((a.range_value(), escape(crate::platform::redact::REDACTED)));
            }
        }
    }
    if edits.is_empty() {
        return Ok(xml.to_string());
    }
    apply(xml, edits)
}

/// One restored disk of a new domain: its target, image and image format.
pub struct RestoredDisk<'a> {
    pub target: &'a str,
    pub image: &'a Path,
    pub format: &'a str,
}

/// A domain definition for a new domain made from a backed-up one: new name, no
/// UUID and no MAC addresses (libvirt makes new ones), no NVRAM path (a fresh one
/// from the template), each restored disk a file on its restored image, CD-ROMs
/// empty. Everything else (devices, addresses, boot order, kernel) is kept.
pub fn new_domain_xml(xml: &str, name: &str, disks: &[RestoredDisk]) -> Result<String> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    match child(root, "name") {
        Some(n) => edits.push((n.range(), format!("<name>{}</name>", escape(name)))),
        None => anyhow::bail!("the stored domain XML has no <name>"),
    }
    if let Some(u) = child(root, "uuid") {
        edits.push((u.range(), String::new()));
    }
    if let Some(nvram) = child(root, "os").and_then(|os| child(os, "nvram")) {
        edits.push((nvram.range(), String::new()));
    }
    let Some(devices) = child(root, "devices") else {
        return apply(xml, edits);
    };
    for dev in devices.children().filter(|c| c.is_element()) {
        if dev.has_tag_name("interface") {
            if let Some(mac) = child(dev, "mac") {
                edits.push((mac.range(), String::new()));
            }
            continue;
        }
        if !dev.has_tag_name("disk") {
            continue;
        }
        let target = child(dev, "target")
            .and_then(|t| t.attribute("dev"))
            .unwrap_or("");
        let device = dev.attribute("device").unwrap_or("disk");
        if let Some(r) = disks.iter().find(|d| d.target == target) {
            let mut kept = String::new();
            for c in dev.children() {
                let drop = c.is_element()
                    && [
                        "driver",
                        "source",
                        "backingStore",
                        "auth",
                        "mirror",
                        "encryption",
                        "reservations",
                    ]
                    .iter()
                    .any(|t| c.has_tag_name(*t));
                if !drop {
                    kept.push_str(&xml[c.range()]);
                }
            }
            edits.push((
                dev.range(),
                format!(
                    "<disk type='file' device='{}'><driver name='qemu' type='{}'/><source file='{}'/>{kept}</disk>",
                    escape(device),
                    escape(r.format),
                    escape(&r.image.to_string_lossy())
                ),
            ));
        } else if matches!(device, "cdrom" | "floppy") {
            if let Some(src) = child(dev, "source") {
                edits.push((src.range(), String::new()));
            }
        }
    }
    apply(xml, edits)
}

/// Apply non-overlapping replacements of byte ranges.
fn apply(xml: &str, mut edits: Vec<(std::ops::Range<usize>, String)>) -> Result<String> {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (r, text) in edits {
        out.replace_range(r, &text);
    }
    parse(&out).context("the rewritten domain XML does not parse")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='qemu' id='3'>
  <name>web</name>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web.qcow2' index='2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/x.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='block' device='lun'>
      <source dev='/dev/sdz'/>
      <target dev='sdb' bus='scsi'/>
      <shareable/>
    </disk>
    <hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/></source></hostdev>
  </devices>
</domain>"#;

    #[test]
    fn disks_sources_and_flags_are_read() {
        let d = domain_disks(DOMAIN).unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(
            (
                d[0].target.as_str(),
                d[0].format.as_str(),
                d[0].source.as_deref()
            ),
            ("vda", "qcow2", Some("/var/lib/libvirt/images/web.qcow2"))
        );
        assert_eq!(d[1].source.as_deref(), Some("rbd:pool/img"));
        assert!(d[2].read_only && d[2].device == "cdrom");
        assert!(d[3].shareable && d[3].device == "lun");
        assert_eq!(scsi_hostdevs(DOMAIN).unwrap(), ["hostdev-scsi:scsi_host0"]);
        assert_eq!(dac_owner(DOMAIN).unwrap(), Some((64055, 64055)));
    }

    #[test]
    fn backup_and_checkpoint_documents_escape_values() {
        let x = backup_xml(
            Path::new("/run/a'b/nbd.sock"),
            &[
                BackupDisk {
                    target: "vda",
                    scratch: Some(Path::new("/run/s/vda.scratch")),
                },
                BackupDisk {
                    target: "sda",
                    scratch: None,
                },
            ],
            Some("vmbackup-P1"),
        );
        assert!(x.contains("<incremental>vmbackup-P1</incremental>"), "{x}");
        assert!(x.contains("socket='/run/a&apos;b/nbd.sock'"), "{x}");
        assert!(x.contains("<disk name='sda' backup='no'/>"), "{x}");
        roxmltree::Document::parse(&x).unwrap();
        let c = checkpoint_xml("vmbackup-P2", &[("vda", true), ("vdb", false)]);
        assert!(c.contains("<disk name='vdb' checkpoint='no'/>"), "{c}");
        roxmltree::Document::parse(&c).unwrap();
    }

    #[test]
    fn a_new_domain_gets_a_new_name_no_uuid_no_macs_and_the_restored_disks() {
        let xml = r#"<domain type='kvm'><name>web</name><uuid>8f0c0c47-1111-2222-3333-444455556666</uuid>
  <os><type>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
  <devices>
    <disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>
      <source protocol='rbd' name='pool/web'><host name='mon1'/></source><auth username='x'><secret type='ceph' uuid='u'/></auth>
      <target dev='vda' bus='virtio'/><boot order='1'/><address type='pci' slot='0x04'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/a.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
  </devices></domain>"#;
        let out = new_domain_xml(
            xml,
            "web-restored",
            &[RestoredDisk {
                target: "vda",
                image: Path::new("/srv/r/vda.qcow2"),
                format: "qcow2",
            }],
        )
        .unwrap();
        assert!(out.contains("<name>web-restored</name>"), "{out}");
        for gone in ["<uuid>", "52:54:00", "nvram", "rbd", "auth", "/iso/a.iso"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        let disks = domain_disks(&out).unwrap();
        assert_eq!(
            (
                disks[0].kind.as_str(),
                disks[0].format.as_str(),
                disks[0].source.as_deref()
            ),
            ("file", "qcow2", Some("/srv/r/vda.qcow2"))
        );
        assert!(
            out.contains("<boot order='1'/>") && out.contains("slot='0x04'"),
            "{out}"
        );
        assert_eq!(disks[1].device, "cdrom");
        assert!(out.contains("<interface type='network'>"), "{out}");
    }

    #[test]
    fn secret_attributes_are_redacted_like_command_lines() {
        let xml = "<domain><devices><graphics type='vnc' passwd='hunter2' keymap='de'/>\
                   <disk><auth username='u'><secret type='ceph' uuid='abc'/></auth></disk>\
                   </devices></domain>";
        let r = redact(xml).unwrap();
        assert!(
            !r.contains("hunter2") && r.contains("passwd='&lt;redacted&gt;'"),
            "{r}"
        );
        assert!(r.contains("keymap='de'") && r.contains("uuid='abc'"), "{r}");
        assert_eq!(redact(&r).unwrap(), r);
    }

    #[test]
    fn job_and_checkpoint_xml_are_read() {
        let job = "<domainbackup mode='pull'><server transport='unix' socket='/s'/><disks>\
            <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='cp0' exportname='vda' exportbitmap='backup-vda'/>\
            <disk name='sda' backup='no'/></disks></domainbackup>";
        let (socket, disks) = backup_job(job).unwrap();
        assert_eq!(socket.as_deref(), Some("/s"));
        assert_eq!(
            disks,
            [JobDisk {
                target: "vda".into(),
                export: "vda".into(),
                bitmap: Some("backup-vda".into())
            }]
        );
        let cp = "<domaincheckpoint><name>vmbackup-P2</name><parent><name>vmbackup-P1</name></parent>\
            <creationTime>1</creationTime><disks><disk name='vda' checkpoint='bitmap' bitmap='vmbackup-P2'/>\
            <disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>";
        let r = checkpoint_for_redefine(cp).unwrap();
        assert!(
            !r.contains("parent") && r.contains("<creationTime>1"),
            "{r}"
        );
        assert_eq!(
            checkpoint_bitmaps(cp).unwrap(),
            [("vda".to_string(), "vmbackup-P2".to_string())]
        );
    }
}
