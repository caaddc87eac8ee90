//! `manifest.json`: what a point is, and its commit marker.
//!
//! A point exists exactly when its manifest exists; the manifest is renamed in
//! after every index and chunk it refers to is durable. docs/FORMAT.md has a
//! complete example.

use std::path::Path;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::format::FORMAT_VERSION;
use super::names::{index_file_name, parse_point_id};
use crate::level::Level;

/// The manifest of one committed point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version (= repository format version, 1).
    pub format: u32,
    /// The VM this point belongs to.
    pub vm: ManifestVm,
    /// The point id, `YYYYMMDDTHHMMSSZ` (also the directory name).
    pub point: String,
    /// The level the point was written as (after any fallback to full).
    pub level: Level,
    /// The point this one was taken against: for inc the previous point, for
    /// diff the full; `None` for a full.
    pub base: Option<String>,
    /// The full this point's chain starts from; `None` for a full.
    pub full: Option<String>,
    /// Always `completed`: incomplete points have no manifest.
    pub status: PointStatus,
    #[serde(with = "rfc3339")]
    pub started: DateTime<Utc>,
    #[serde(with = "rfc3339")]
    pub finished: DateTime<Utc>,
    /// Why an inc or diff ran as a full (R26, R27); `None` otherwise.
    pub fallback_reason: Option<String>,
    /// The VM's configuration as the platform reported it (opaque to the repo).
    pub vm_config: serde_json::Value,
    /// The platform's changed-block tracking token for this point (opaque to the
    /// repo; libvirt: the checkpoint), handed back when this point is a base.
    /// Absent in manifests of platforms that need none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<serde_json::Value>,
    /// One entry per backed-up disk.
    pub disks: Vec<ManifestDisk>,
    /// Sums over `disks`.
    pub totals: ManifestTotals,
}

/// The VM a point belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestVm {
    /// Platform name as registered (R2).
    pub platform: String,
    /// VM name on that platform.
    pub name: String,
}

/// The state recorded in a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointStatus {
    Completed,
}

/// One disk of a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// The disk's name on the platform (e.g. `vda`, a QEMU node or device name).
    pub name: String,
    /// Disk size in bytes.
    pub size: u64,
    /// Chunk size of this disk's index.
    pub chunk_size: u32,
    /// Index file name inside the point directory (`<encoded name>.idx`).
    pub index: String,
    /// Bytes read from the source for this point.
    pub bytes_read: u64,
    /// Bytes of new chunk objects written to the target (compressed, with headers).
    pub bytes_written: u64,
    /// Chunks this point stored.
    pub new_chunks: u64,
    /// Chunk slots that referred to chunks already in the repository.
    pub reused_chunks: u64,
    /// Slots that are all zeros (not stored).
    pub zero_slots: u64,
}

/// Sums of the per-disk counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestTotals {
    pub size: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub new_chunks: u64,
    pub reused_chunks: u64,
    pub zero_slots: u64,
}

impl ManifestTotals {
    /// The totals of `disks` (saturating: a damaged manifest's counters may not
    /// add up, and must not crash a reader).
    pub fn of(disks: &[ManifestDisk]) -> ManifestTotals {
        let mut t = ManifestTotals::default();
        for d in disks {
            t.size = t.size.saturating_add(d.size);
            t.bytes_read = t.bytes_read.saturating_add(d.bytes_read);
            t.bytes_written = t.bytes_written.saturating_add(d.bytes_written);
            t.new_chunks = t.new_chunks.saturating_add(d.new_chunks);
            t.reused_chunks = t.reused_chunks.saturating_add(d.reused_chunks);
            t.zero_slots = t.zero_slots.saturating_add(d.zero_slots);
        }
        t
    }
}

impl Manifest {
    /// Parse a manifest read from `path`, refusing other format versions.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        let manifest: Manifest = serde_json::from_str(text)
            .with_context(|| format!("cannot parse manifest {}", path.display()))?;
        if manifest.format != FORMAT_VERSION {
            bail!(
                "manifest {} has format {}, this vmbackup reads format {FORMAT_VERSION}",
                path.display(),
                manifest.format
            );
        }
        Ok(manifest)
    }

    /// Check the manifest's own consistency: point ids, level vs base/full, disk
    /// index names, unique disk names and totals.
    pub fn check(&self) -> Result<()> {
        let point = parse_point_id(&self.point)?;
        for dep in [&self.base, &self.full].into_iter().flatten() {
            if parse_point_id(dep)? >= point {
                bail!("base point {dep} is not older than point {}", self.point);
            }
        }
        match (self.level, &self.base, &self.full) {
            (Level::Full, None, None) => {}
            (Level::Full, _, _) => bail!("a full point has no base or full"),
            (Level::Inc, Some(_), Some(_)) => {}
            (Level::Diff, Some(base), Some(full)) if base == full => {}
            (Level::Diff, Some(_), Some(_)) => bail!("a diff point's base must be its full"),
            (level, _, _) => bail!("a {level} point needs both base and full"),
        }
        let mut names: Vec<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            bail!("disk names are not unique");
        }
        for disk in &self.disks {
            if disk.index != index_file_name(&disk.name) {
                bail!(
                    "disk '{}' has index file '{}', expected '{}'",
                    disk.name,
                    disk.index,
                    index_file_name(&disk.name)
                );
            }
        }
        if self.totals != ManifestTotals::of(&self.disks) {
            bail!("totals are not the sum of the disks");
        }
        Ok(())
    }

    /// The manifest as pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec_pretty(self).context("cannot serialize manifest")?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

/// RFC 3339 timestamps for chrono without its serde feature.
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("invalid RFC 3339 time '{text}': {e}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A valid full-point manifest with one disk `vda`.
    pub(crate) fn sample(platform: &str, vm: &str, point: &str) -> Manifest {
        let started = parse_point_id(point).unwrap();
        let disks = vec![ManifestDisk {
            name: "vda".into(),
            size: 1 << 20,
            chunk_size: 64 * 1024,
            index: "vda.idx".into(),
            bytes_read: 1 << 20,
            bytes_written: 1000,
            new_chunks: 3,
            reused_chunks: 1,
            zero_slots: 12,
        }];
        Manifest {
            format: FORMAT_VERSION,
            vm: ManifestVm {
                platform: platform.into(),
                name: vm.into(),
            },
            point: point.into(),
            level: Level::Full,
            base: None,
            full: None,
            status: PointStatus::Completed,
            started,
            finished: started + chrono::Duration::seconds(42),
            fallback_reason: None,
            vm_config: serde_json::json!({"cmdline": ["qemu-system-x86_64"]}),
            tracking: None,
            totals: ManifestTotals::of(&disks),
            disks,
        }
    }

    #[test]
    fn manifest_json_round_trips() {
        let m = sample("lab", "web01", "20261124T120000Z");
        m.check().unwrap();
        let json = m.to_json().unwrap();
        let text = String::from_utf8(json).unwrap();
        assert!(
            text.contains("\"started\": \"2026-11-24T12:00:00Z\""),
            "{text}"
        );
        assert!(text.contains("\"level\": \"full\""), "{text}");
        assert_eq!(Manifest::parse(&text, Path::new("m.json")).unwrap(), m);
        assert_eq!(
            m.started,
            Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
        );
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        let good = sample("lab", "web01", "20261124T120000Z");
        let mut m = good.clone();
        m.level = Level::Inc;
        assert!(m.check().is_err(), "inc without base");
        m.base = Some("20261123T120000Z".into());
        m.full = Some("20261120T120000Z".into());
        m.check().unwrap();
        m.level = Level::Diff;
        assert!(m.check().is_err(), "diff whose base is not its full");
        m.base = Some("20261125T120000Z".into());
        m.level = Level::Inc;
        assert!(m.check().is_err(), "base newer than the point");

        let mut m = good.clone();
        m.totals.bytes_read += 1;
        assert!(m.check().is_err(), "totals");
        let mut m = good.clone();
        m.disks[0].index = "../x.idx".into();
        assert!(m.check().is_err(), "index name");
        let mut m = good;
        m.format = 2;
        let text = String::from_utf8(m.to_json().unwrap()).unwrap();
        let err = Manifest::parse(&text, Path::new("m.json")).unwrap_err();
        assert!(err.to_string().contains("format 2"), "{err}");
    }
}
