//! Which level a backup really runs at, and against which base (R26, R27).
//!
//! A pure function of the request, the committed points and the VM's disks, so
//! every fallback rule is tested without QEMU. The platform may still refuse an
//! inc/diff later (its bitmap is missing or inconsistent); the engine then runs a
//! full with [`Fallback::cbt_unavailable`].

use crate::level::Level;
use crate::platform::DiskInfo;
use crate::repo::Manifest;

/// The decision: level, base point and, when it differs from the request, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelPlan {
    pub level: Level,
    /// Inc: the newest point. Diff: the newest full. Full: none.
    pub base: Option<String>,
    /// The newest full (the root of the chain), if any.
    pub latest_full: Option<String>,
    /// Why the requested inc/diff runs as a full.
    pub fallback: Option<FullInstead>,
}

/// Why an inc/diff runs as a full, and whether that was planned.
///
/// Planned by configuration (logged at info, exit code 0): the VM's very first
/// backup, quick backup (CBT) switched off for the rule, a disk that cannot
/// hold a dirty bitmap (raw), a chunk size changed in system.conf. Unexpected
/// (a warning, exit code 1, a `fallback` notification): tracking lost or
/// unusable, no full while points exist, a disk added or resized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullInstead {
    pub reason: String,
    pub planned: bool,
}

impl FullInstead {
    fn planned(reason: String) -> Option<FullInstead> {
        Some(FullInstead {
            reason,
            planned: true,
        })
    }

    fn unexpected(reason: String) -> Option<FullInstead> {
        Some(FullInstead {
            reason,
            planned: false,
        })
    }
}

/// Whether changed-block tracking is in use for this VM (R6, R7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracking {
    On,
    /// Off, with the reason (rule setting, or a disk that cannot hold bitmaps).
    Off(String),
}

/// Decide the tracking mode from the rule's settings and the disks (R6, R7).
pub fn tracking(auto_cbt: bool, cbt: bool, disks: &[DiskInfo]) -> Tracking {
    if !auto_cbt && !cbt {
        return Tracking::Off("quick backup (CBT) is switched off for this rule (R7)".into());
    }
    match disks.iter().find(|d| !d.cbt) {
        Some(d) => Tracking::Off(format!(
            "disk '{}' ({}) does not support changed-block tracking (R26)",
            d.name, d.format
        )),
        None => Tracking::On,
    }
}

/// Plan the level for a `requested` backup given the committed `points` (oldest
/// first), the VM's current `disks` and the configured `chunk_size`.
pub fn plan_level(
    requested: Level,
    points: &[Manifest],
    disks: &[DiskInfo],
    chunk_size: u32,
    tracking: &Tracking,
) -> LevelPlan {
    let (latest, latest_full) = super::chain_heads(points);
    let full = |fallback: Option<FullInstead>| LevelPlan {
        level: Level::Full,
        base: None,
        latest_full: latest_full.map(|p| p.point.clone()),
        fallback,
    };
    if requested == Level::Full {
        return LevelPlan {
            level: Level::Full,
            base: None,
            latest_full: latest_full.map(|p| p.point.clone()),
            fallback: None,
        };
    }
    let Some(full_point) = latest_full else {
        return full(if points.is_empty() {
            FullInstead::planned(format!(
                "this is the VM's first backup, so this {requested} runs as a full (R27)"
            ))
        } else {
            FullInstead::unexpected(format!(
                "no full backup exists although {} point(s) do, so this {requested} runs as a full (R27)",
                points.len()
            ))
        });
    };
    if let Tracking::Off(why) = tracking {
        return full(FullInstead::planned(format!(
            "{why}; this {requested} runs as a full"
        )));
    }
    let base = match requested {
        Level::Inc => latest.expect("a full exists, so a newest point does"),
        _ => full_point,
    };
    for d in disks {
        match base.disks.iter().find(|b| b.name == d.name) {
            None => return full(FullInstead::unexpected(format!("disk '{}' is not in base point {} (disk added); this {requested} runs as a full", d.name, base.point))),
            Some(b) if b.size != d.size => {
                return full(FullInstead::unexpected(format!(
                    "disk '{}' changed size ({} -> {} bytes) since point {}; this {requested} runs as a full",
                    d.name, b.size, d.size, base.point
                )))
            }
            Some(b) if b.chunk_size != chunk_size => {
                return full(FullInstead::planned(format!(
                    "chunk size changed ({} -> {} bytes, i2vp_transbuffer) since point {}; this {requested} runs as a full",
                    b.chunk_size, chunk_size, base.point
                )))
            }
            Some(_) => {}
        }
    }
    LevelPlan {
        level: requested,
        base: Some(base.point.clone()),
        latest_full: Some(full_point.point.clone()),
        fallback: None,
    }
}

impl FullInstead {
    /// The platform found the VM's tracking missing or unusable (R26): unexpected.
    pub fn cbt_unavailable(requested: Level, err: &crate::platform::CbtUnavailable) -> FullInstead {
        FullInstead {
            reason: format!("{err}; this {requested} runs as a full (R26)"),
            planned: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{ManifestDisk, ManifestTotals, ManifestVm, PointStatus};

    fn disk(name: &str, size: u64, cbt: bool) -> DiskInfo {
        DiskInfo {
            name: name.into(),
            node: name.into(),
            file: None,
            format: if cbt { "qcow2" } else { "raw" }.into(),
            size,
            cbt,
            uncoverable: None,
        }
    }

    fn point(id: &str, level: Level, size: u64, chunk: u32) -> Manifest {
        let now = chrono::Utc::now();
        Manifest {
            format: 1,
            vm: ManifestVm {
                platform: "p".into(),
                name: "vm".into(),
            },
            point: id.into(),
            level,
            base: None,
            full: None,
            status: PointStatus::Completed,
            started: now,
            finished: now,
            fallback_reason: None,
            vm_config: serde_json::Value::Null,
            tracking: None,
            disks: vec![ManifestDisk {
                name: "vda".into(),
                size,
                chunk_size: chunk,
                index: "vda.idx".into(),
                bytes_read: 0,
                bytes_written: 0,
                new_chunks: 0,
                reused_chunks: 0,
                zero_slots: 0,
            }],
            totals: ManifestTotals::default(),
        }
    }

    const C: u32 = 4 << 20;

    #[test]
    fn r27_inc_without_full_runs_as_full() {
        let p = plan_level(Level::Inc, &[], &[disk("vda", 100, true)], C, &Tracking::On);
        assert_eq!(p.level, Level::Full);
        let why = p.fallback.unwrap();
        assert!(why.reason.contains("R27") && why.planned, "{why:?}");
        // Points but no full (the fulls went): unexpected.
        let incs = [point("20260102T000000Z", Level::Inc, 100, C)];
        let p = plan_level(
            Level::Inc,
            &incs,
            &[disk("vda", 100, true)],
            C,
            &Tracking::On,
        );
        let why = p.fallback.unwrap();
        assert!(why.reason.contains("R27") && !why.planned, "{why:?}");
        let p = plan_level(
            Level::Diff,
            &[],
            &[disk("vda", 100, true)],
            C,
            &Tracking::On,
        );
        assert_eq!(p.level, Level::Full);
    }

    #[test]
    fn inc_bases_on_newest_point_diff_on_newest_full() {
        let pts = [
            point("20260101T000000Z", Level::Full, 100, C),
            point("20260102T000000Z", Level::Inc, 100, C),
        ];
        let d = [disk("vda", 100, true)];
        let inc = plan_level(Level::Inc, &pts, &d, C, &Tracking::On);
        assert_eq!(
            (inc.level, inc.base.as_deref(), inc.fallback),
            (Level::Inc, Some("20260102T000000Z"), None)
        );
        let diff = plan_level(Level::Diff, &pts, &d, C, &Tracking::On);
        assert_eq!(
            (diff.level, diff.base.as_deref()),
            (Level::Diff, Some("20260101T000000Z"))
        );
        assert_eq!(diff.latest_full.as_deref(), Some("20260101T000000Z"));
    }

    #[test]
    fn r26_tracking_off_or_raw_disk_runs_as_full() {
        let pts = [point("20260101T000000Z", Level::Full, 100, C)];
        let raw = [disk("vda", 100, false)];
        let t = tracking(true, true, &raw);
        assert!(matches!(t, Tracking::Off(_)));
        let p = plan_level(Level::Inc, &pts, &raw, C, &t);
        assert_eq!(p.level, Level::Full);
        let why = p.fallback.unwrap();
        assert!(why.reason.contains("R26") && why.planned, "{why:?}");
        let off = tracking(false, false, &[disk("vda", 100, true)]);
        assert!(matches!(off, Tracking::Off(ref r) if r.contains("R7")));
        assert_eq!(
            tracking(true, false, &[disk("vda", 100, true)]),
            Tracking::On
        );
    }

    #[test]
    fn resize_added_disk_and_chunk_change_run_as_full() {
        let pts = [point("20260101T000000Z", Level::Full, 100, C)];
        let resized = plan_level(
            Level::Inc,
            &pts,
            &[disk("vda", 200, true)],
            C,
            &Tracking::On,
        );
        let why = resized.fallback.unwrap();
        assert!(why.reason.contains("changed size") && !why.planned);
        let added = plan_level(
            Level::Inc,
            &pts,
            &[disk("vda", 100, true), disk("vdb", 5, true)],
            C,
            &Tracking::On,
        );
        let why = added.fallback.unwrap();
        assert!(why.reason.contains("disk added") && !why.planned);
        let chunk = plan_level(
            Level::Inc,
            &pts,
            &[disk("vda", 100, true)],
            C / 2,
            &Tracking::On,
        );
        let why = chunk.fallback.unwrap();
        assert!(why.reason.contains("chunk size") && why.planned);
    }
}
