//! Removing a rule, or one VM from it (R9, R37): its data when asked, and
//! vmbackup's change tracking on its VMs always.
//!
//! - Refused (busy, exit 4) while any task of the rule (or of that VM) is
//!   active: a backup, a restore (R37), a recovery. Nothing changes then.
//! - With `--delete-data` (or the rule's delete-data setting, which
//!   `--keep-data` overrides): the locks are taken first (busy: exit 4, nothing
//!   changed), then the rule leaves the state store, then the data goes. A
//!   repository no other rule uses is removed whole (under its exclusive
//!   lock); otherwise the VMs' points are removed and the repository is
//!   garbage-collected at once if its lock is free (deferred otherwise, said).
//! - Without it, the data stays where it is, and the report says where.
//! - Every removed VM that can be reached loses vmbackup's bitmaps (and any
//!   leftover of an interrupted run); the ones that cannot be reached are listed.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::gc::{collect_now, RepoGc};
use crate::repo::{vm_key, RepoLock, Repository, VmLock};
use crate::state::State;

/// What removing a rule (or a VM from it) did.
#[derive(Debug, Clone, Serialize)]
pub struct Removal {
    pub rule: String,
    /// The VM removed, or `None` for the whole rule.
    pub vm: Option<String>,
    /// True when the rule itself is gone (its last VM removed).
    pub rule_removed: bool,
    /// True when the rule's data was deleted.
    pub data_deleted: bool,
    /// Points deleted.
    pub point_count: u64,
    /// True when the repository was removed whole.
    pub repository_removed: bool,
    /// Where the data is (kept) or was (deleted).
    pub location: String,
    /// The garbage collection that followed deleting points (shared repository).
    pub gc: Option<RepoGc>,
    /// Per removed VM: what was removed from it, or why it could not be reached.
    pub tracking: Vec<Tracking>,
}

/// vmbackup's traces removed from one VM.
#[derive(Debug, Clone, Serialize)]
pub struct Tracking {
    pub vm: String,
    pub actions: Vec<String>,
    /// Why the VM could not be reached (its bitmaps stay), or `None`.
    pub error: Option<String>,
}

/// What the data deletion holds while the rule leaves the state store.
enum Held {
    Nothing,
    Whole(Repository, RepoLock),
    Points(Repository, RepoLock, Vec<VmLock>),
}

/// Remove rule `name` (or its VM `vm`), deleting its data when `delete_data`.
pub fn remove(
    state: &mut State,
    name: &str,
    vm: Option<&str>,
    delete_data: bool,
    run_dir: &Path,
    io_timeout: Duration,
    now: DateTime<Utc>,
) -> Result<Removal> {
    let rule = state.require_rule(name)?;
    if let Some(vm) = vm {
        rule.require_vm(vm)?;
    }
    state.check_removable(name, vm)?;
    let vms: Vec<String> = match vm {
        Some(vm) => vec![vm.to_string()],
        None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
    };
    let rule_removed = vm.is_none() || rule.vms.len() == 1;
    let target = state.require_target(&rule.settings.target)?;
    let mut report = Removal {
        rule: name.to_string(),
        vm: vm.map(str::to_string),
        rule_removed,
        data_deleted: delete_data,
        point_count: 0,
        repository_removed: false,
        location: format!(
            "{}/{}",
            target.spec.location().trim_end_matches('/'),
            rule.settings.subdir
        ),
        gc: None,
        tracking: Vec::new(),
    };
    // Locks first: when one is busy, nothing has changed yet.
    let held = if delete_data {
        match super::rule_repository(state, &rule)? {
            None => Held::Nothing,
            Some(repo) => {
                report.location = repo.location().to_string();
                let shared = state.rules()?.iter().any(|r| {
                    r.name != rule.name
                        && r.settings.target == rule.settings.target
                        && r.settings.subdir == rule.settings.subdir
                });
                if rule_removed && !shared {
                    let lock = repo.lock_exclusive("delete-data")?;
                    Held::Whole(repo, lock)
                } else {
                    let lock = repo.lock_shared("delete-data")?;
                    let vm_locks = vms
                        .iter()
                        .map(|v| {
                            repo.lock_vm(&lock, &vm_key(&rule.settings.platform, v), "delete-data")
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Held::Points(repo, lock, vm_locks)
                }
            }
        }
    } else {
        Held::Nothing
    };
    state.remove_rule(name, vm)?;
    match held {
        Held::Nothing => {}
        Held::Whole(repo, lock) => {
            for key in repo.list_vms()? {
                report.point_count += repo.list_points(&key)?.all_ids().len() as u64;
            }
            repo.destroy(&lock)
                .with_context(|| format!("rule '{name}' is removed, but deleting its repository {} failed; delete the directory by hand", repo.location()))?;
            report.repository_removed = true;
        }
        Held::Points(repo, lock, vm_locks) => {
            for l in &vm_locks {
                for point in repo.list_points(l.vm_key())?.all_ids() {
                    repo.remove_point(l, &point)?;
                    report.point_count += 1;
                }
            }
            drop(vm_locks);
            drop(lock);
            let mut gc = collect_now(&repo, now);
            gc.target = rule.settings.target.clone();
            // The rules that still use the repository.
            gc.rules = state
                .rules()?
                .into_iter()
                .filter(|r| {
                    r.settings.target == rule.settings.target
                        && r.settings.subdir == rule.settings.subdir
                })
                .map(|r| r.name)
                .collect();
            report.gc = Some(gc);
        }
    }
    report.tracking = forget_tracking(state, &rule.settings.platform, &vms, run_dir, io_timeout);
    Ok(report)
}

/// Remove vmbackup's bitmaps and leftovers from each VM that can be reached.
fn forget_tracking(
    state: &State,
    platform: &str,
    vms: &[String],
    run_dir: &Path,
    io_timeout: Duration,
) -> Vec<Tracking> {
    let plat = state
        .require_platform(platform)
        .and_then(|p| crate::platform::connect(&p.spec, io_timeout));
    vms.iter()
        .map(|vm| {
            let done = plat
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .and_then(|plat| {
                    let mut handle = plat.open_vm(vm)?;
                    let scratch = crate::backup::scratch_dir(run_dir, platform, vm)?;
                    Ok(handle.forget_tracking(&scratch.path)?.actions)
                });
            match done {
                Ok(actions) => Tracking {
                    vm: vm.clone(),
                    actions,
                    error: None,
                },
                Err(e) => Tracking {
                    vm: vm.clone(),
                    actions: Vec::new(),
                    error: Some(format!("{e:#}")),
                },
            }
        })
        .collect()
}
