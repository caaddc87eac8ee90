//! Applying retention (`prune`) and removing chosen points (`forget`), under
//! the repository lock (shared) and each VM's lock. The decisions are the pure
//! plan of `retention.rs`; this module reads the repository and the state
//! store, takes the locks and removes points. It never prints: callers get
//! reports.
//!
//! A removed point's chunks stay until garbage collection finds that no point
//! refers to them (`repo::gc`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use chrono::{DateTime, TimeZone};
use serde::Serialize;

use super::retention::{plan, Action, Mark, Retention};
use crate::error::{busy, exit_code_of, invalid, refused, ExitCode};
use crate::level::Level;
use crate::repo::{vm_key, PointList, RepoLock, Repository};
use crate::state::rules::RuleRow;
use crate::state::State;

/// The plan for one VM's points, and whether it was applied.
#[derive(Debug, Clone, Serialize)]
pub struct VmPrune {
    pub rule: String,
    /// The VM's name; for an orphaned VM key, the key (`<platform>/<vm>`).
    pub vm: String,
    /// True for points of a VM key no rule owns: listed, kept, removable by `forget`.
    pub orphaned: bool,
    /// The retention applied, in words.
    pub retention: String,
    pub points: Vec<Mark>,
    /// Why this VM was not pruned (its lock was busy, ...), or `None`.
    pub error: Option<String>,
    #[serde(skip)]
    pub code: ExitCode,
}

impl VmPrune {
    /// Points that stay.
    pub fn kept(&self) -> usize {
        self.points.len() - self.removals()
    }

    /// Points marked for removal.
    pub fn removals(&self) -> usize {
        self.points
            .iter()
            .filter(|m| m.action == Action::Remove)
            .count()
    }
}

/// Prune every VM of `rule` (or only `only_vm`) at `now`; with `dry_run`,
/// plan only. Per-VM failures (a busy VM lock: exit 4) are in the reports; an
/// unreachable repository is an error.
pub fn prune_rule<Tz: TimeZone>(
    state: &State,
    rule: &RuleRow,
    only_vm: Option<&str>,
    dry_run: bool,
    now: &DateTime<Tz>,
) -> Result<Vec<VmPrune>> {
    if let Some(vm) = only_vm {
        rule.require_vm(vm)?;
    }
    let retention = Retention::of(&rule.settings.policy);
    let Some(repo) = super::rule_repository(state, rule)? else {
        return Ok(Vec::new());
    };
    let repo_lock = match dry_run {
        true => None,
        false => match repo.lock_shared("prune") {
            Ok(l) => Some(l),
            Err(e) if exit_code_of(&e) == ExitCode::Busy => {
                return Ok(rule
                    .vms
                    .iter()
                    .filter(|v| only_vm.is_none_or(|o| o == v.vm))
                    .map(|v| VmPrune {
                        rule: rule.name.clone(),
                        vm: v.vm.clone(),
                        orphaned: false,
                        retention: retention.to_string(),
                        points: Vec::new(),
                        error: Some(format!("{e:#}")),
                        code: ExitCode::Busy,
                    })
                    .collect())
            }
            Err(e) => return Err(e),
        },
    };
    let mut out = Vec::new();
    for v in rule
        .vms
        .iter()
        .filter(|v| only_vm.is_none_or(|o| o == v.vm))
    {
        let key = vm_key(&rule.settings.platform, &v.vm);
        let protected = state.points_in_use(&rule.name, &v.vm)?;
        let mut report = VmPrune {
            rule: rule.name.clone(),
            vm: v.vm.clone(),
            orphaned: false,
            retention: retention.to_string(),
            points: Vec::new(),
            error: None,
            code: ExitCode::Ok,
        };
        match prune_vm(&repo, repo_lock.as_ref(), &key, retention, now, &protected) {
            Ok(marks) => report.points = marks,
            Err(e) => {
                report.code = exit_code_of(&e);
                report.error = Some(format!("{e:#}"));
            }
        }
        out.push(report);
    }
    if only_vm.is_none() {
        for key in orphaned_keys(state, rule, &repo)? {
            let list = repo.list_points(&key)?;
            let points = list
                .all_ids()
                .into_iter()
                .map(|p| Mark {
                    level: list.points.iter().find(|m| m.point == p).map(|m| m.level),
                    point: p,
                    action: Action::Keep,
                    reason:
                        "orphaned: no rule owns this VM; remove its points with 'vmbackup forget'"
                            .into(),
                })
                .collect();
            out.push(VmPrune {
                rule: rule.name.clone(),
                vm: key,
                orphaned: true,
                retention: Retention::KeepAll.to_string(),
                points,
                error: None,
                code: ExitCode::Ok,
            });
        }
    }
    Ok(out)
}

/// Plan one VM's points and, given the repository lock, remove what the plan
/// removes under the VM's lock (busy: exit 4). Returns the marks.
pub fn prune_vm<Tz: TimeZone>(
    repo: &Repository,
    repo_lock: Option<&RepoLock>,
    key: &str,
    retention: Retention,
    now: &DateTime<Tz>,
    protected: &BTreeMap<String, String>,
) -> Result<Vec<Mark>> {
    let Some(repo_lock) = repo_lock else {
        return Ok(plan(&repo.list_points(key)?, retention, now, protected));
    };
    let lock = repo.lock_vm(repo_lock, key, "prune")?;
    prune_vm_locked(repo, &lock, retention, now, protected)
}

/// Plan the locked VM's points and remove what the plan removes, oldest first.
pub fn prune_vm_locked<Tz: TimeZone>(
    repo: &Repository,
    lock: &crate::repo::VmLock,
    retention: Retention,
    now: &DateTime<Tz>,
    protected: &BTreeMap<String, String>,
) -> Result<Vec<Mark>> {
    let marks = plan(&repo.list_points(lock.vm_key())?, retention, now, protected);
    for m in marks.iter().filter(|m| m.action == Action::Remove) {
        repo.remove_point(lock, &m.point)?;
    }
    Ok(marks)
}

/// VM keys with points in `rule`'s repository that no rule using the same
/// repository owns.
pub fn orphaned_keys(state: &State, rule: &RuleRow, repo: &Repository) -> Result<Vec<String>> {
    let owned: BTreeSet<String> = state
        .rules()?
        .iter()
        .filter(|r| {
            r.settings.target == rule.settings.target && r.settings.subdir == rule.settings.subdir
        })
        .flat_map(|r| r.vms.iter().map(|v| vm_key(&r.settings.platform, &v.vm)))
        .collect();
    Ok(repo
        .list_vms()?
        .into_iter()
        .filter(|k| !owned.contains(k))
        .collect())
}

/// What `forget` removed (or would remove), and what that means for the next
/// backup.
#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub rule: String,
    pub vm: String,
    pub points: Vec<Mark>,
    /// Consequences for the next backup, in words.
    pub notes: Vec<String>,
}

/// Remove `points` of `vm` (a VM of `rule`, or an orphaned VM key in its
/// repository). Unknown ids are a usage error (exit 2), a point an active
/// restore reads or a busy VM lock exit 4; nothing is removed then.
pub fn forget(
    state: &State,
    rule: &RuleRow,
    vm: &str,
    points: &[String],
    dry_run: bool,
) -> Result<ForgetReport> {
    let repo = super::rule_repository(state, rule)?
        .ok_or_else(|| refused(format!("rule '{}' has no points yet", rule.name)))?;
    let orphans = orphaned_keys(state, rule, &repo)?;
    let key = if rule.has_vm(vm) {
        vm_key(&rule.settings.platform, vm)
    } else if orphans.iter().any(|k| k == vm) {
        vm.to_string()
    } else {
        let vms: Vec<&str> = rule.vms.iter().map(|v| v.vm.as_str()).collect();
        return Err(invalid(
            "--vm",
            vm,
            format!(
                "not in rule '{}' (its VMs: {}) nor an orphaned VM key of its repository (orphaned: {})",
                rule.name,
                vms.join(", "),
                if orphans.is_empty() { "none".to_string() } else { orphans.join(", ") }
            ),
        ));
    };
    let check = |list: &PointList| -> Result<Vec<Mark>> {
        let ids = list.all_ids();
        let protected = state.points_in_use(&rule.name, vm)?;
        let mut marks = Vec::new();
        for p in points {
            if !ids.contains(p) {
                return Err(invalid(
                    "--point",
                    p,
                    format!("no such point of VM '{vm}'; points: {}", ids.join(", ")),
                ));
            }
            if let Some(why) = protected.get(p) {
                return Err(busy(format!(
                    "point {p} of VM '{vm}' is {why}; wait for it or cancel it"
                )));
            }
            marks.push(Mark {
                point: p.clone(),
                level: list.points.iter().find(|m| &m.point == p).map(|m| m.level),
                action: Action::Remove,
                reason: match list.damage_of(p) {
                    Some(d) => format!("forgotten (damaged: {})", d.reason),
                    None => "forgotten".into(),
                },
            });
        }
        marks.sort_by(|a, b| a.point.cmp(&b.point));
        marks.dedup_by(|a, b| a.point == b.point);
        Ok(marks)
    };
    let mut report = ForgetReport {
        rule: rule.name.clone(),
        vm: vm.to_string(),
        points: Vec::new(),
        notes: Vec::new(),
    };
    if dry_run {
        let list = repo.list_points(&key)?;
        report.points = check(&list)?;
        report.notes = consequences(&list, &report.points);
        return Ok(report);
    }
    let repo_lock = repo.lock_shared("forget")?;
    let lock = repo.lock_vm(&repo_lock, &key, "forget")?;
    // Checked again under the lock: what is removed is what was checked.
    let list = repo.list_points(&key)?;
    report.points = check(&list)?;
    report.notes = consequences(&list, &report.points);
    for m in &report.points {
        repo.remove_point(&lock, &m.point)
            .with_context(|| format!("forget: VM '{vm}'"))?;
    }
    Ok(report)
}

/// What removing `removed` from `list` means for the next backup.
pub fn consequences(list: &PointList, removed: &[Mark]) -> Vec<String> {
    let gone: BTreeSet<&str> = removed.iter().map(|m| m.point.as_str()).collect();
    let (newest, newest_full) = crate::backup::chain_heads(&list.points);
    let left: Vec<_> = list
        .points
        .iter()
        .filter(|m| !gone.contains(m.point.as_str()))
        .cloned()
        .collect();
    let mut notes = Vec::new();
    if !left.iter().any(|m| m.level == Level::Full) {
        if !list.points.is_empty() {
            notes.push(
                "no full is left: the next incremental or differential runs as a full (R27)"
                    .to_string(),
            );
        }
        return notes;
    }
    if let Some(n) = newest.filter(|n| gone.contains(n.point.as_str())) {
        notes.push(format!(
            "the newest point {} is removed: changed-block tracking follows it, so the next incremental runs as a full",
            n.point
        ));
    }
    if let Some(f) = newest_full.filter(|f| gone.contains(f.point.as_str())) {
        notes.push(format!(
            "the newest full {} is removed: the next differential runs as a full",
            f.point
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{parse_point_id, Manifest, ManifestTotals, ManifestVm, PointStatus};

    fn point(id: &str, level: Level) -> Manifest {
        let t = parse_point_id(id).unwrap();
        Manifest {
            format: 1,
            vm: ManifestVm {
                platform: "lab".into(),
                name: "vm".into(),
            },
            point: id.into(),
            level,
            base: None,
            full: None,
            status: PointStatus::Completed,
            started: t,
            finished: t,
            fallback_reason: None,
            vm_config: serde_json::Value::Null,
            tracking: None,
            disks: Vec::new(),
            totals: ManifestTotals::default(),
        }
    }

    fn removing(ids: &[&str]) -> Vec<Mark> {
        ids.iter()
            .map(|p| Mark {
                point: p.to_string(),
                level: None,
                action: Action::Remove,
                reason: "forgotten".into(),
            })
            .collect()
    }

    #[test]
    fn forgetting_the_chain_heads_says_what_the_next_backup_does() {
        let list = PointList {
            points: vec![
                point("20261101T000000Z", Level::Full),
                point("20261108T000000Z", Level::Full),
                point("20261109T000000Z", Level::Inc),
            ],
            damaged: Vec::new(),
        };
        assert!(consequences(&list, &removing(&["20261101T000000Z"])).is_empty());
        let n = consequences(&list, &removing(&["20261108T000000Z"]));
        assert_eq!(n.len(), 1);
        assert!(n[0].contains("next differential runs as a full"), "{n:?}");
        let n = consequences(&list, &removing(&["20261109T000000Z"]));
        assert!(n[0].contains("next incremental runs as a full"), "{n:?}");
        let n = consequences(&list, &removing(&["20261101T000000Z", "20261108T000000Z"]));
        assert_eq!(
            n,
            ["no full is left: the next incremental or differential runs as a full (R27)"]
        );
    }
}
