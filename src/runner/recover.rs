//! Taking back what dead processes left (R44): their slot leases, their tasks
//! (marked interrupted) and, on the VM, the engine's leftovers (fleecing nodes,
//! exports, frozen bitmaps), removed by the platform's cleanup under the VM's lock.

use std::path::Path;

use anyhow::{Context, Result};

use crate::backup::repair_leftovers;
use crate::platform::Platform;
use crate::repo::{vm_key, Repository};
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
    match repo {
        Some(repo) => {
            let repo_lock = repo.lock_shared("cleanup")?;
            let lock = repo.lock_vm(&repo_lock, &vm_key(platform_name, vm), "cleanup")?;
            Ok(repair_leftovers(repo, &lock, handle.as_mut(), run_dir)?.1)
        }
        // No backup ever reached this repository: nothing to reconcile with.
        None => {
            std::fs::create_dir_all(run_dir)
                .with_context(|| format!("cannot create {}", run_dir.display()))?;
            Ok(handle.cleanup(None, None, run_dir)?.actions)
        }
    }
}

/// Reclaim the leases and tasks of dead processes and clean up their VMs. Each
/// outcome is logged on the interrupted task and returned as a line for stderr.
pub fn reclaim(state: &mut State, run_dir: &Path) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for r in state.reclaim_dead()? {
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
            let plat = crate::platform::connect(&prow.kind, Path::new(&prow.qmp_dir))?;
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
