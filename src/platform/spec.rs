//! What a registered platform is: its type and connection parameters, as one typed
//! value stored as JSON in the state store (`platforms.spec`).
//!
//! Adding a platform type is adding a variant here and a driver module; nothing
//! else in the state store, the runner or the CLI knows a type's parameters.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A platform's type with its connection parameters. Serialized with a `type` tag:
/// `{"type":"qemu","qmp_dir":"/run/qemu"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PlatformSpec {
    /// QEMU processes, one QMP unix socket per VM in a directory.
    Qemu { qmp_dir: PathBuf },
    /// Domains of a libvirt daemon (`qemu:///system`, `qemu+ssh://host/system`, ...).
    /// `tls_dir`: for a remote host, the CA and client certificate its TLS backup
    /// exports are read with (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
    Libvirt {
        uri: String,
        #[serde(default)]
        tls_dir: Option<PathBuf>,
    },
}

/// The type of a platform, without parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlatformKind {
    Qemu,
    Libvirt,
}

impl std::fmt::Display for PlatformKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlatformKind::Qemu => "qemu",
            PlatformKind::Libvirt => "libvirt",
        })
    }
}

impl PlatformSpec {
    pub fn kind(&self) -> PlatformKind {
        match self {
            PlatformSpec::Qemu { .. } => PlatformKind::Qemu,
            PlatformSpec::Libvirt { .. } => PlatformKind::Libvirt,
        }
    }

    /// Where the platform is, for listings: the QMP directory or the URI.
    pub fn address(&self) -> String {
        match self {
            PlatformSpec::Qemu { qmp_dir } => qmp_dir.display().to_string(),
            PlatformSpec::Libvirt { uri, .. } => uri.clone(),
        }
    }

    /// Why a new VM cannot be defined on this platform from a point's `vm_config`
    /// (restore as a new VM); `None` when it can. libvirt defines a domain from the
    /// point's domain XML; a qemu platform (a directory of QMP sockets, no
    /// definitions) gets a launch script from the point's captured command line.
    pub fn why_no_new_vm(&self, config: &serde_json::Value) -> Option<String> {
        match self {
            PlatformSpec::Qemu { .. } => super::qemu::cmdline_of(config).is_none().then(|| {
                "the point holds no captured QEMU command line (taken on another platform type); restore to files instead".into()
            }),
            PlatformSpec::Libvirt { .. } => super::libvirt::domain_xml_of(config).is_none().then(|| {
                "the point holds no libvirt domain XML (taken on another platform type); restore to files instead".into()
            }),
        }
    }

    /// The JSON stored in the state store.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a platform spec always serializes")
    }

    /// Parse the stored JSON.
    pub fn from_json(text: &str) -> anyhow::Result<PlatformSpec> {
        serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("stored platform spec {text:?} is not valid: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_through_tagged_json() {
        let q = PlatformSpec::Qemu {
            qmp_dir: "/run/qemu".into(),
        };
        assert_eq!(q.to_json(), r#"{"type":"qemu","qmp_dir":"/run/qemu"}"#);
        assert_eq!(PlatformSpec::from_json(&q.to_json()).unwrap(), q);
        let l = PlatformSpec::Libvirt {
            uri: "qemu:///system".into(),
            tls_dir: None,
        };
        assert_eq!(
            l.to_json(),
            r#"{"type":"libvirt","uri":"qemu:///system","tls_dir":null}"#
        );
        assert_eq!(PlatformSpec::from_json(&l.to_json()).unwrap(), l);
        // Rows stored before tls_dir existed.
        assert_eq!(
            PlatformSpec::from_json(r#"{"type":"libvirt","uri":"qemu:///system"}"#).unwrap(),
            l
        );
        assert!(PlatformSpec::from_json(r#"{"type":"vsphere"}"#).is_err());
    }
}
