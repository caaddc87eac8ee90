//! `run-due` and `daemon`: turn rule policies into tasks (R11-R14, R28).
//!
//! For every started VM of every rule, [`due_specs`] finds the run due now from
//! the VM's watermark (see `schedule.rs`) and logs what it folds or notices (missed
//! slots, a clock behind the watermark). Admission records the slot, so a slot runs
//! at most once across all processes. A one-time rule's VM is marked `completed`
//! when its run is admitted.
//!
//! After every completed backup of a rule with a copy target (`rule edit
//! --copy-to`), a copy task copies the new point there and prunes the copy
//! ([`copy_follow_up`], also after `run-now`).
//!
//! After a VM's last scheduled backup of the day ([`follow_ups`]): a prune task
//! applies the rule's retention to the VM (R17), unless that backup or the VM's
//! newest backup failed or was interrupted (R18, logged on the backup's task);
//! then a GC task collects the rule's repository when its last collection is a
//! day old.

use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Local, Utc};

use super::schedule::{due_run, last_slot_of_day, next_slot, parse_slot, slot_text};
use super::{join, Job, Runner, TaskResult, TaskSpec};
use crate::lifecycle::retention::Retention;
use crate::policy::Policy;
use crate::state::State;
use crate::task::{LogLevel, TaskState};

/// The daemon looks at rule changes and signals this often.
const TICK: Duration = Duration::from_secs(1);

/// The watermark of a VM: its newest recorded slot, else when it joined the rule.
fn watermark(state: &State, rule: &str, vm: &str, added_at: &str) -> Result<DateTime<Utc>> {
    let text = state.last_schedule_slot(rule, vm)?;
    Ok(text
        .as_deref()
        .and_then(parse_slot)
        .or_else(|| parse_slot(added_at))
        .unwrap_or_else(Utc::now))
}

/// Everything due at `now`, with notes for the log (missed slots, clock behind).
pub fn due_specs(state: &State, now: DateTime<Local>) -> Result<(Vec<TaskSpec>, Vec<String>)> {
    let mut specs = Vec::new();
    let mut notes = Vec::new();
    for rule in state.rules()? {
        for v in rule.vms.iter().filter(|v| v.state == "started") {
            let mark = watermark(state, &rule.name, &v.vm, &v.added_at)?;
            let Some(due) = due_run(&rule.settings.policy, mark, &now) else {
                if mark > now.with_timezone(&Utc)
                    && state.last_schedule_slot(&rule.name, &v.vm)?.is_some()
                {
                    notes.push(format!(
                        "rule '{}' VM '{}': the host clock ({}) is before the last run slot ({}); nothing runs twice, the next run is the first slot after it",
                        rule.name, v.vm, now.format("%Y-%m-%d %H:%M:%S"), mark.with_timezone(&Local).format("%Y-%m-%d %H:%M")
                    ));
                }
                continue;
            };
            let slot = slot_text(due.slot);
            if matches!(rule.settings.policy, Policy::Once { .. })
                && state.schedule_slot_recorded(&rule.name, &v.vm, &slot)?
            {
                continue;
            }
            let mut task_notes = Vec::new();
            if !due.missed.is_empty() {
                task_notes.push(format!(
                    "{} earlier slot(s) were missed (first {}); they run once now, as one {} backup",
                    due.missed.len(),
                    due.missed[0].with_timezone(&Local).format("%Y-%m-%d %H:%M"),
                    due.level
                ));
                notes.push(format!(
                    "rule '{}' VM '{}': {}",
                    rule.name, v.vm, task_notes[0]
                ));
            }
            specs.push(TaskSpec {
                rule: rule.clone(),
                vm: v.vm.clone(),
                job: Job::Backup {
                    level: due.level,
                    slot: Some(slot),
                    notes: task_notes,
                },
            });
        }
    }
    Ok((specs, notes))
}

/// The earliest next slot of any started VM, for the daemon's sleep.
pub fn next_wake(state: &State, now: DateTime<Local>) -> Result<Option<DateTime<Utc>>> {
    let mut best: Option<DateTime<Utc>> = None;
    for rule in state.rules()? {
        for v in rule.vms.iter().filter(|v| v.state == "started") {
            let mark = watermark(state, &rule.name, &v.vm, &v.added_at)?;
            if let Some(at) = next_slot(&rule.settings.policy, mark, &now) {
                best = Some(best.map_or(at, |b| b.min(at)));
            }
        }
    }
    Ok(best)
}

/// After admission: a one-time rule's VM is done for good (R11).
fn mark_once_completed(state: &mut State, spec: &TaskSpec) {
    if matches!(spec.rule.settings.policy, Policy::Once { .. }) {
        if let Err(e) = state.set_rule_vm_state(&spec.rule.name, Some(&spec.vm), "completed") {
            tracing::warn!(
                "rule '{}' VM '{}': cannot mark completed: {e:#}",
                spec.rule.name,
                spec.vm
            );
        }
    }
}

/// Run what is due now and wait for it, then each VM's follow-ups (`run-due`).
pub fn run_due(runner: &std::sync::Arc<Runner>) -> Result<Vec<TaskResult>> {
    let mut state = State::open(&runner.config().state_path)?;
    let (specs, notes) = due_specs(&state, runner.config().clock.now())?;
    for n in &notes {
        runner.events().note(n);
    }
    let mut started = Vec::new();
    for spec in specs {
        if runner.cancelled() {
            break;
        }
        if let Some(s) = runner.submit(spec.clone())? {
            mark_once_completed(&mut state, &spec);
            started.push((spec, s));
        }
    }
    let mut results = Vec::new();
    for (spec, s) in started {
        let r = match s {
            Ok(h) => join(h),
            Err(skipped) => skipped,
        };
        let point = r.outcome.as_ref().and_then(|o| o.point()).map(String::from);
        let follow = follow_ups(runner, &spec, r.task, r.status, point.as_deref());
        results.push(r);
        results.extend(follow);
    }
    Ok(results)
}

/// What follows a finished task (module docs): after every completed backup,
/// its copy when the rule has one (`rule edit --copy-to`); after the VM's last
/// scheduled backup of the day, its prune and then its repository's GC, each
/// run as a task and waited for. Returns their results.
pub fn follow_ups(
    runner: &std::sync::Arc<Runner>,
    spec: &TaskSpec,
    task: i64,
    status: TaskState,
    point: Option<&str>,
) -> Vec<TaskResult> {
    let mut out: Vec<TaskResult> = copy_follow_up(runner, spec, status, point)
        .into_iter()
        .collect();
    let Job::Backup {
        slot: Some(slot), ..
    } = &spec.job
    else {
        return out;
    };
    let policy = &spec.rule.settings.policy;
    let Some(slot) = parse_slot(slot) else {
        return out;
    };
    if runner.cancelled()
        || status == TaskState::Skipped
        || !last_slot_of_day(policy, &slot.with_timezone(&Local))
    {
        return out;
    }
    let run = |job: Job| {
        let vm = if matches!(job, Job::Gc) {
            String::new()
        } else {
            spec.vm.clone()
        };
        run_follow_up(runner, spec.rule.clone(), vm, job)
    };
    if matches!(Retention::of(policy), Retention::Periods { .. }) {
        match prune_blocked(runner, spec, status) {
            Some(why) => {
                if let Ok(mut state) = State::open(&runner.config().state_path) {
                    let _ = state.log(task, LogLevel::Warn, &format!("not pruning: {why}"));
                }
                tracing::info!(
                    "rule '{}' VM '{}': not pruning: {why}",
                    spec.rule.name,
                    spec.vm
                );
            }
            None => out.extend(run(Job::Prune)),
        }
    }
    if gc_due(runner, spec) {
        out.extend(run(Job::Gc));
    }
    out
}

/// After a completed backup (scheduled or `run-now`) of a rule with a copy
/// target, a copy task of the new point, run and waited for. The rule is read
/// again: a copy set or stopped meanwhile counts.
pub fn copy_follow_up(
    runner: &std::sync::Arc<Runner>,
    spec: &TaskSpec,
    status: TaskState,
    point: Option<&str>,
) -> Option<TaskResult> {
    if !matches!(spec.job, Job::Backup { .. })
        || status != TaskState::Completed
        || runner.cancelled()
    {
        return None;
    }
    let point = point?.to_string();
    let rule = match State::open(&runner.config().state_path).and_then(|s| s.rule(&spec.rule.name))
    {
        Ok(rule) => rule?,
        Err(e) => {
            tracing::warn!(
                "rule '{}': cannot read its copy target: {e:#}",
                spec.rule.name
            );
            return None;
        }
    };
    let to = rule.copy_to.clone()?;
    run_follow_up(runner, rule, spec.vm.clone(), Job::Copy { point, to })
}

/// Submit one follow-up task and wait for it.
fn run_follow_up(
    runner: &std::sync::Arc<Runner>,
    rule: crate::state::rules::RuleRow,
    vm: String,
    job: Job,
) -> Option<TaskResult> {
    let name = rule.name.clone();
    match runner.submit(TaskSpec { rule, vm, job }) {
        Ok(Some(Ok(h))) => Some(join(h)),
        Ok(Some(Err(skipped))) => Some(skipped),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("rule '{name}': cannot start a follow-up task: {e:#}");
            None
        }
    }
}

/// Why the VM's retention must not run now (R18), if it must not.
fn prune_blocked(runner: &Runner, spec: &TaskSpec, status: TaskState) -> Option<String> {
    if status != TaskState::Completed {
        return Some(format!(
            "this backup {status}; nothing expired is pruned until a backup completes (R18)"
        ));
    }
    State::open(&runner.config().state_path)
        .and_then(|s| s.prune_blocked(&spec.rule.name, &spec.vm))
        .unwrap_or_else(|e| Some(format!("cannot read the task history: {e:#}")))
}

/// True when the rule's repository is due for its daily garbage collection.
fn gc_due(runner: &Runner, spec: &TaskSpec) -> bool {
    let now = runner.config().clock.now().with_timezone(&Utc);
    State::open(&runner.config().state_path)
        .and_then(|state| crate::lifecycle::rule_repository(&state, &spec.rule))
        .and_then(|repo| match repo {
            Some(repo) => crate::lifecycle::gc::gc_due(&repo, now),
            None => Ok(false),
        })
        .unwrap_or(false)
}

/// Run rules until cancelled (`daemon`): wake at the next due slot, at a rule
/// change made by any process, or at a signal; never a busy loop.
pub fn daemon(
    runner: &std::sync::Arc<Runner>,
    on_result: &dyn Fn(&TaskResult),
) -> Result<Vec<TaskResult>> {
    let mut state = State::open(&runner.config().state_path)?;
    let clock = runner.config().clock;
    let mut running: Vec<(TaskSpec, JoinHandle<TaskResult>)> = Vec::new();
    // Follow-ups of finished backups (prune, GC), each chain on its thread.
    let mut following: Vec<JoinHandle<Vec<TaskResult>>> = Vec::new();
    let mut finished = Vec::new();
    while !runner.cancelled() {
        let now = clock.now();
        let (specs, notes) = due_specs(&state, now)?;
        for n in &notes {
            runner.events().note(n);
        }
        for spec in specs {
            match runner.submit(spec.clone())? {
                Some(Ok(h)) => {
                    mark_once_completed(&mut state, &spec);
                    running.push((spec, h));
                }
                Some(Err(skipped)) => {
                    on_result(&skipped);
                    finished.push(skipped);
                }
                None => {}
            }
        }
        let generation = state.config_generation()?;
        let wake = next_wake(&state, clock.now())?;
        if let Some(at) = wake {
            runner.events().note(&format!(
                "next run at {}",
                at.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S")
            ));
        }
        loop {
            let (done, still): (Vec<_>, Vec<_>) =
                running.into_iter().partition(|(_, h)| h.is_finished());
            running = still;
            for (spec, h) in done {
                let r = join(h);
                on_result(&r);
                let (runner, task, status) = (runner.clone(), r.task, r.status);
                let point = r.outcome.as_ref().and_then(|o| o.point()).map(String::from);
                following.push(std::thread::spawn(move || {
                    follow_ups(&runner, &spec, task, status, point.as_deref())
                }));
                finished.push(r);
            }
            let (done, still): (Vec<_>, Vec<_>) =
                following.into_iter().partition(|h| h.is_finished());
            following = still;
            for h in done {
                for r in h.join().unwrap_or_default() {
                    on_result(&r);
                    finished.push(r);
                }
            }
            if runner.cancelled() || state.config_generation()? != generation {
                break;
            }
            if wake.is_some_and(|at| clock.now() >= at) {
                break;
            }
            let sleep = wake.map_or(TICK, |at| clock.real_until(&at).min(TICK));
            std::thread::sleep(sleep.max(Duration::from_millis(10)));
        }
    }
    for (_, h) in running {
        let r = join(h);
        on_result(&r);
        finished.push(r);
    }
    for h in following {
        for r in h.join().unwrap_or_default() {
            on_result(&r);
            finished.push(r);
        }
    }
    Ok(finished)
}
