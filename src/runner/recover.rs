//! Taking back what dead processes left (R44): their slot leases, their tasks
//! (marked interrupted) and, on the VM, the engine's leftovers (fleecing nodes,
//! exports, frozen bitmaps), removed by the platform's cleanup under the VM's lock;
//! and the staging directories of killed restores, recorded with their tasks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::backup::{repair_leftovers, scratch_dir};
use crate::error::ExitCode;
use crate::monitor::notify::Event;
use crate::monitor::Monitor;
use crate::platform::Platform;
use crate::repo::{vm_key, Repository};
use crate::state::slots::Reclaimed;
use crate::state::State;
use crate::task::LogLevel;

/// Clean up one VM after an interrupted run: lock it in the repository (when the
/// repository exists), drop incomplete points, then let the platform remove its
/// leftovers and reconcile tracking with the newest committed point. Returns one
/// line per action.
pub fn cleanup_vm(
    plat: &dyn Platform,
    repo: Option<&Repository>,
    platform_name: &str,
    vm: &str,
    run_dir: &Path,
) -> Result<Vec<String>> {
    let mut handle = plat.open_vm(vm).with_context(|| format!("VM '{vm}'"))?;
    let scratch = scratch_dir(run_dir, platform_name, vm)?;
    match repo {
        Some(repo) => {
            let repo_lock = repo.lock_shared("cleanup")?;
            let lock = repo.lock_vm(&repo_lock, &vm_key(platform_name, vm), "cleanup")?;
            Ok(repair_leftovers(repo, &lock, handle.as_mut(), &scratch.path)?.1)
        }
        // No backup ever reached this repository: nothing to reconcile with.
        None => Ok(handle.cleanup(None, None, &scratch.path)?.actions),
    }
}

/// Mark the tasks of dead processes interrupted and release their leases (R44),
/// telling the monitor about each (metrics, an `interrupted` notification).
pub fn reclaim_tasks(state: &mut State, monitor: &Monitor) -> Result<Vec<Reclaimed>> {
    let reclaimed = state.reclaim_dead()?;
    for r in &reclaimed {
        monitor.task_ended(
            state,
            r.task.id,
            Some(Event::Interrupted),
            ExitCode::Interrupted.code(),
        );
    }
    Ok(reclaimed)
}

/// Reclaim the leases and tasks of dead processes and clean up their VMs. Each
/// outcome is logged on the interrupted task and returned as a line for stderr.
pub fn reclaim(
    state: &mut State,
    run_dir: &Path,
    io_timeout: std::time::Duration,
    monitor: &Monitor,
) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for r in reclaim_tasks(state, monitor)? {
        let t = &r.task;
        lines.push(format!(
            "task {} ({} rule '{}' VM '{}') {}",
            t.id,
            t.kind,
            t.rule,
            t.vm,
            t.message.as_deref().unwrap_or("interrupted")
        ));
        if !r.needs_cleanup {
            continue;
        }
        let res = (|| -> Result<Vec<String>> {
            let rule = state.require_rule(&t.rule)?;
            let prow = state.require_platform(&rule.settings.platform)?;
            let plat = crate::platform::connect(&prow.spec, io_timeout)?;
            let repo = crate::lifecycle::rule_repository(state, &rule)?;
            cleanup_vm(plat.as_ref(), repo.as_ref(), &prow.name, &t.vm, run_dir)
        })();
        let (level, msg) = match res {
            Ok(actions) if actions.is_empty() => (LogLevel::Info, "cleanup after the interrupted run: nothing left over".to_string()),
            Ok(actions) => (LogLevel::Info, format!("cleanup after the interrupted run: {}", actions.join("; "))),
            Err(e) => (LogLevel::Warn, format!("cleanup after the interrupted run failed: {e:#}; the next backup of this VM or 'vmbackup cleanup' repeats it")),
        };
        state.log(t.id, level, &msg)?;
        lines.push(format!("task {} VM '{}': {msg}", t.id, t.vm));
    }
    Ok(lines)
}

/// Remove the staging directories that ended restores left (killed ones: a
/// finished restore removes its own), optionally only those into `dest` or of
/// the rules `rules`. Returns one line per directory removed or refused.
pub fn remove_stale_restores(
    state: &mut State,
    dest: Option<&Path>,
    rules: Option<&[String]>,
) -> Result<Vec<String>> {
    let dest = match dest.map(Path::canonicalize) {
        Some(Ok(d)) => Some(d.to_string_lossy().into_owned()),
        // A destination that does not exist holds nothing to remove.
        Some(Err(_)) => return Ok(Vec::new()),
        None => None,
    };
    let mut lines = Vec::new();
    for t in state.ended_restores_with_staging(dest.as_deref())? {
        if rules.is_some_and(|r| !r.contains(&t.rule)) {
            continue;
        }
        let (Some(staging), Some(task_dest)) = (t.staging.as_deref(), t.dest.as_deref()) else {
            continue;
        };
        let path = PathBuf::from(staging);
        match crate::restore::remove_stale_staging(&path) {
            Ok(true) => lines.push(format!(
                "removed {} left by restore task {} (rule '{}' VM '{}')",
                path.display(),
                t.id,
                t.rule,
                t.vm
            )),
            Ok(false) => {}
            // Not ours (replaced by someone else): left alone, and forgotten.
            Err(e) => lines.push(format!("restore task {}: {e:#}", t.id)),
        }
        state.set_task_staging(t.id, task_dest, None)?;
    }
    Ok(lines)
}

/// Redact the secrets in the VM configuration of every manifest of `repo`
/// (`cleanup --redact`: manifests written before redaction existed), each
/// rewritten atomically under its VM's lock. Returns one line per manifest.
pub fn redact_manifests(repo: &Repository) -> Result<Vec<String>> {
    let repo_lock = repo.lock_shared("cleanup --redact")?;
    let mut lines = Vec::new();
    for key in repo.list_vms()? {
        let lock = repo.lock_vm(&repo_lock, &key, "cleanup --redact")?;
        for mut manifest in repo.list_points(&key)?.points {
            if crate::platform::redact::redact_vm_config(&mut manifest.vm_config) {
                repo.rewrite_manifest(&lock, &manifest)?;
                lines.push(format!(
                    "redacted secrets in the manifest of point {} of VM '{}'",
                    manifest.point, manifest.vm.name
                ));
            }
        }
    }
    Ok(lines)
}
