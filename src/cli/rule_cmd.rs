//! `vmbackup rule ...`: backup rules (R1-R37). Policies are validated by
//! `crate::policy`; admission of VMs (R1-R4, R35, R43) by `crate::state::rules`.

use std::borrow::Cow;
use std::collections::HashMap;

use anyhow::Result;
use chrono::Local;
use serde::Serialize;

use super::args::{
    OnOff, PolicyArgs, QuiesceArg, RetentionArg, RuleAddArgs, RuleCmd, RuleEditArgs,
};
use super::output::{print_done, print_json, yes_no, Table};
use super::views::LastBackup;
use super::Ctx;
use crate::error::{invalid, refused, ExitCode};
use crate::platform::Quiesce;
use crate::policy::bandwidth::{validate_windows, Window};
use crate::policy::{build_policy, Policy};
use crate::state::rules::{RuleRow, RuleSettings};
use crate::state::tasks::{TaskRow, VmSummaries};
use crate::state::State;
use crate::task::TaskState;

pub fn run(ctx: &Ctx, cmd: RuleCmd) -> Result<ExitCode> {
    match cmd {
        RuleCmd::Add(a) => add(ctx, a),
        RuleCmd::Edit(a) => edit(ctx, a),
        RuleCmd::AddVm { name, vm } => {
            ctx.state()?.add_rule_vms(&name, &vm)?;
            done(
                ctx,
                &format!("rule '{name}': added {}", vm.join(", ")),
                serde_json::json!({ "rule": name, "vms": vm }),
            );
            Ok(ExitCode::Ok)
        }
        RuleCmd::Start { name, vm } => set_state(ctx, &name, vm.as_deref(), "started"),
        RuleCmd::Stop { name, vm } => set_state(ctx, &name, vm.as_deref(), "stopped"),
        RuleCmd::Remove {
            name,
            vm,
            delete_data,
            keep_data,
        } => remove(ctx, &name, vm.as_deref(), delete_data, keep_data),
        RuleCmd::List => list(ctx),
        RuleCmd::Show { name } => show(ctx, &name),
    }
}

/// `rule remove` (R9, R37): see `lifecycle::delete`.
fn remove(
    ctx: &Ctx,
    name: &str,
    vm: Option<&str>,
    delete_data: bool,
    keep_data: bool,
) -> Result<ExitCode> {
    let mut state = ctx.state()?;
    let rule = state.require_rule(name)?;
    let delete = delete_data || (rule.settings.delete_data && !keep_data);
    let run_dir = ctx.run_dir()?;
    let io_timeout = ctx.system_config()?.io_timeout;
    let now = crate::clock::Clock::process()
        .now()
        .with_timezone(&chrono::Utc);
    let r =
        crate::lifecycle::delete::remove(&mut state, name, vm, delete, &run_dir, io_timeout, now)?;
    let msg = match (&r.vm, r.rule_removed) {
        (Some(vm), false) => format!("VM '{vm}' removed from rule '{name}'"),
        (Some(vm), true) => {
            format!("VM '{vm}' removed from rule '{name}', its last: rule '{name}' removed")
        }
        (None, _) => format!("rule '{name}' removed"),
    };
    let unreachable: Vec<&crate::lifecycle::delete::Tracking> =
        r.tracking.iter().filter(|t| t.error.is_some()).collect();
    if ctx.json {
        print_done(true, false, &msg, serde_json::to_value(&r)?);
    } else if !ctx.quiet {
        out!("{msg}");
        if !r.data_deleted {
            out!(
                "its backup data stays at {} (delete it with --delete-data)",
                r.location
            );
        } else if r.repository_removed {
            out!(
                "deleted {} point(s): repository {} removed whole",
                r.point_count,
                r.location
            );
        } else {
            out!(
                "deleted {} point(s) from repository {}",
                r.point_count,
                r.location
            );
        }
        if let Some(gc) = &r.gc {
            match (&gc.report, &gc.error) {
                (Some(g), _) => out!(
                    "garbage collection: removed {} object(s) ({})",
                    g.objects_removed,
                    crate::units::format_size(g.bytes_freed)
                ),
                (None, Some(e)) => out!(
                    "garbage collection {e}; the next one ('vmbackup gc', or the daily automatic one) frees the space"
                ),
                (None, None) => {}
            }
        }
        for t in &r.tracking {
            for a in &t.actions {
                out!("{}: {a}", t.vm);
            }
        }
    }
    for t in &unreachable {
        eprintln!(
            "vmbackup: could not reach VM '{}' to remove vmbackup's bitmaps: {}",
            t.vm,
            t.error.as_deref().unwrap_or_default()
        );
    }
    // Done, but a VM keeps vmbackup's bitmaps: a warning (exit 1).
    Ok(if unreachable.is_empty() {
        ExitCode::Ok
    } else {
        ExitCode::Warning
    })
}

fn done(ctx: &Ctx, msg: &str, fields: serde_json::Value) {
    print_done(ctx.json, ctx.quiet, msg, fields);
}

fn set_state(ctx: &Ctx, name: &str, vm: Option<&str>, to: &str) -> Result<ExitCode> {
    ctx.state()?.set_rule_vm_state(name, vm, to)?;
    let msg = match vm {
        Some(vm) => format!("rule '{name}' VM '{vm}' {to}"),
        None => format!("rule '{name}' {to}"),
    };
    done(ctx, &msg, serde_json::json!({ "rule": name, "vm": vm }));
    Ok(ExitCode::Ok)
}

fn parse_windows(specs: &[String]) -> Result<Vec<Window>> {
    let windows = specs
        .iter()
        .map(|s| s.parse::<Window>())
        .collect::<Result<Vec<_>>>()?;
    validate_windows(&windows)?;
    Ok(windows)
}

fn add(ctx: &Ctx, a: RuleAddArgs) -> Result<ExitCode> {
    let now = Local::now().naive_local();
    let policy = build_policy(
        a.policy.once.as_deref(),
        &a.policy.schedule,
        a.policy.retention.and_then(retention_units),
        now,
    )?;
    let bandwidth = parse_windows(&a.policy.bandwidth)?;
    let subdir = a.path.clone().unwrap_or_else(|| a.name.clone());
    let settings = RuleSettings {
        platform: a.platform,
        target: a.target,
        subdir,
        auto_cbt: !a.no_auto_cbt,
        cbt: a.cbt.is_none_or(|c| c == OnOff::On),
        lan_free: a.lan_free,
        delete_data: a.delete_data,
        quiesce: match a.quiesce {
            None => Quiesce::Off,
            Some(QuiesceArg::Require) => Quiesce::Require,
            Some(QuiesceArg::Try) => Quiesce::Try,
        },
        allow_plain_tcp_export: a.allow_plain_tcp_export,
        policy,
        bandwidth,
    };
    let notify_url = a
        .notify_url
        .as_deref()
        .map(|u| notify_setting(u, false))
        .transpose()?;
    let mut state = ctx.state()?;
    // Checked before the rule is added: a refused copy adds nothing.
    let copy_to = match a.copy_to.as_deref() {
        None | Some(COPY_NONE) => None,
        Some(to) => {
            state.check_copy_target(&settings.target, to)?;
            Some(to.to_string())
        }
    };
    let copy_retention = copy_retention_setting(&settings.policy, a.copy_retention)?;
    if copy_to.is_none() && copy_retention.is_some() {
        return Err(no_copy_for_retention(a.copy_retention));
    }
    state.add_rule(&a.name, &settings, &a.vm)?;
    if let Some(url) = notify_url {
        state.set_rule_notify_url(&a.name, url.as_deref())?;
    }
    if copy_to.is_some() {
        state.set_rule_copy(&a.name, copy_to.as_deref(), copy_retention)?;
    }
    done(
        ctx,
        &format!("rule '{}' added with {} VM(s)", a.name, a.vm.len()),
        serde_json::json!({ "rule": a.name }),
    );
    Ok(ExitCode::Ok)
}

/// `--copy-to none`: no automatic copy.
const COPY_NONE: &str = "none";

/// `--copy-retention` as stored (`None`: keep every copied point), checked
/// against the rule's policy as `--retention` is.
fn copy_retention_setting(policy: &Policy, r: Option<RetentionArg>) -> Result<Option<u32>> {
    let Some(RetentionArg::Periods(n)) = r else {
        return Ok(None);
    };
    if n > crate::policy::MAX_RETENTION {
        return Err(invalid(
            "--copy-retention",
            n,
            format!(
                "allowed 0..={}, in units of the rule's schedule period, or all",
                crate::policy::MAX_RETENTION
            ),
        ));
    }
    if policy.period().is_none() {
        return Err(invalid(
            "--copy-retention",
            n,
            "applies to periodic policies only; this rule runs once: allowed all",
        ));
    }
    Ok(Some(n))
}

/// `--copy-retention` for a rule that copies nowhere.
fn no_copy_for_retention(r: Option<RetentionArg>) -> anyhow::Error {
    let shown = match r {
        Some(RetentionArg::Periods(n)) => n.to_string(),
        _ => "all".to_string(),
    };
    invalid(
        "--copy-retention",
        shown,
        "the rule has no copy; give --copy-to TARGET with it",
    )
}

/// `--retention all` → keep all (`None`); `--retention N` → N periods.
fn retention_units(r: RetentionArg) -> Option<u32> {
    match r {
        RetentionArg::All => None,
        RetentionArg::Periods(n) => Some(n),
    }
}

/// `rule edit`: every policy flag left out keeps its value (sysadmin review B2).
fn edit(ctx: &Ctx, a: RuleEditArgs) -> Result<ExitCode> {
    let PolicyArgs {
        once,
        schedule,
        retention,
        bandwidth,
    } = &a.policy;
    if once.is_none()
        && schedule.is_empty()
        && retention.is_none()
        && bandwidth.is_empty()
        && !a.clear_bandwidth
        && a.notify_url.is_none()
        && a.copy_to.is_none()
        && a.copy_retention.is_none()
    {
        return Err(refused(
            "rule edit: nothing to change; give --once, --schedule, --retention, --bandwidth, --clear-bandwidth, --notify-url, --copy-to or --copy-retention (R34)",
        ));
    }
    let notify_url = a
        .notify_url
        .as_deref()
        .map(|u| notify_setting(u, true))
        .transpose()?;
    let mut state = ctx.state()?;
    let rule = state.require_rule(&a.name)?;
    let now = Local::now().naive_local();
    let (current_specs, current_retention) = match &rule.settings.policy {
        Policy::Periodic {
            schedules,
            retention,
        } => (
            schedules.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            *retention,
        ),
        Policy::Once { .. } => (Vec::new(), None),
    };
    let new_retention = match retention {
        Some(r) => retention_units(*r),
        None => current_retention,
    };
    let policy = if once.is_some() {
        build_policy(once.as_deref(), &[], None, now)?
    } else if !schedule.is_empty() {
        build_policy(None, schedule, new_retention, now)?
    } else if let Some(r) = retention {
        // Only the retention changes: re-validate it with the rule's schedules.
        if current_specs.is_empty() {
            let shown = match r {
                RetentionArg::All => "all".to_string(),
                RetentionArg::Periods(n) => n.to_string(),
            };
            return Err(invalid(
                "--retention",
                shown,
                "applies to periodic policies only; this rule runs once (R15)",
            ));
        }
        build_policy(None, &current_specs, new_retention, now)?
    } else {
        rule.settings.policy.clone()
    };
    let windows = if a.clear_bandwidth {
        Vec::new()
    } else if bandwidth.is_empty() {
        rule.settings.bandwidth.clone()
    } else {
        parse_windows(bandwidth)?
    };
    // The copy: checked in full before anything changes.
    let copy = match (a.copy_to.as_deref(), a.copy_retention) {
        (None, None) => None,
        (Some(COPY_NONE), Some(r)) => {
            return Err(invalid(
                "--copy-retention",
                match r {
                    RetentionArg::All => "all".to_string(),
                    RetentionArg::Periods(n) => n.to_string(),
                },
                "does not go with --copy-to none",
            ))
        }
        (Some(COPY_NONE), None) => Some((None, None)),
        (to, r) => {
            let to = match to {
                Some(to) => {
                    state.check_copy_target(&rule.settings.target, to)?;
                    to.to_string()
                }
                None => rule
                    .copy_to
                    .clone()
                    .ok_or_else(|| no_copy_for_retention(r))?,
            };
            let retention = match r {
                Some(r) => copy_retention_setting(&policy, Some(r))?,
                None => rule.copy_retention,
            };
            Some((Some(to), retention))
        }
    };
    state.edit_rule_policy(&a.name, &policy, &windows)?;
    if let Some(url) = notify_url {
        state.set_rule_notify_url(&a.name, url.as_deref())?;
    }
    if let Some((to, retention)) = &copy {
        state.set_rule_copy(&a.name, to.as_deref(), *retention)?;
    }
    let msg = format!("rule '{}' updated", a.name);
    // What the next prune would remove under the new policy (when it changed).
    let removable = if policy == rule.settings.policy {
        None
    } else {
        let edited = state.require_rule(&a.name)?;
        let now = crate::clock::Clock::process().now();
        match crate::lifecycle::prune::prune_rule(&state, &edited, None, true, &now) {
            Ok(plans) => Some(plans.iter().map(|p| p.removals()).sum::<usize>()),
            Err(e) => {
                eprintln!("vmbackup: cannot tell what the next prune removes: {e:#}");
                None
            }
        }
    };
    done(
        ctx,
        &msg,
        serde_json::json!({ "rule": a.name, "prune_would_remove_count": removable }),
    );
    if !ctx.json && !ctx.quiet {
        if let Some(n) = removable.filter(|n| *n > 0) {
            out!(
                "the next prune removes {n} point(s) outside the new retention ('vmbackup prune {} --dry-run' lists them)",
                a.name
            );
        }
    }
    Ok(ExitCode::Ok)
}

/// `--notify-url`: a URL, `none`, or (for `rule edit`) `default`; `None` stands
/// for system.conf's notify_url.
fn notify_setting(value: &str, allow_default: bool) -> Result<Option<String>> {
    match value {
        crate::monitor::NOTIFY_URL_NONE => Ok(Some(value.to_string())),
        "default" if allow_default => Ok(None),
        url => match crate::config::parse_url("--notify-url", url) {
            Ok(u) => Ok(Some(u)),
            Err(_) => Err(invalid(
                "--notify-url",
                url,
                if allow_default {
                    "allowed an http:// or https:// URL, none, or default"
                } else {
                    "allowed an http:// or https:// URL, or none"
                },
            )),
        },
    }
}

/// What a listing works out once and reuses for every rule: whether each
/// platform and target can be reached (a remote libvirt host or an S3 target
/// costs a round trip, and a thousand rules share a few of them), the next
/// runs of each policy (rules mostly share a few policies), and each VM's
/// newest tasks and unviewed failures (a statement for all rules, not one per
/// rule).
struct ListingCache {
    platforms: HashMap<String, bool>,
    targets: HashMap<String, bool>,
    next_runs: HashMap<String, Vec<NextRun>>,
    /// Per (rule, VM) of the rules listed, VMs with no task left out; each
    /// taken out as its VM is shown.
    summaries: VmSummaries,
}

impl ListingCache {
    /// For a listing of every rule (`Some(rule)`: of that one).
    fn new(state: &State, rule: Option<&str>) -> Result<ListingCache> {
        Ok(ListingCache {
            platforms: HashMap::new(),
            targets: HashMap::new(),
            next_runs: HashMap::new(),
            summaries: state.vm_summaries(rule)?,
        })
    }

    /// True when the rule's platform and its target (with its marker) answer.
    fn reachable(&mut self, state: &State, rule: &RuleRow) -> Result<bool> {
        let s = &rule.settings;
        let platform = match self.platforms.get(&s.platform) {
            Some(&up) => up,
            None => {
                let up = state.platform(&s.platform)?.is_some_and(|p| {
                    crate::platform::connect(&p.spec, crate::platform::qmp::DEFAULT_TIMEOUT)
                        .and_then(|p| p.reachable())
                        .is_ok()
                });
                self.platforms.insert(s.platform.clone(), up);
                up
            }
        };
        if !platform {
            return Ok(false);
        }
        Ok(match self.targets.get(&s.target) {
            Some(&up) => up,
            None => {
                let up = state
                    .target(&s.target)?
                    .is_some_and(|t| crate::lifecycle::open_target(&t).is_ok());
                self.targets.insert(s.target.clone(), up);
                up
            }
        })
    }
}

/// A VM's R31 state as `rule show` reports it, from its newest task (`last`)
/// and its stored state.
fn vm_state(
    state: &State,
    rule: &RuleRow,
    last: Option<&TaskRow>,
    stored: &str,
    cache: &mut ListingCache,
) -> Result<String> {
    if let Some(t) = last {
        if t.state == TaskState::Running {
            return Ok(match t.phase.as_deref() {
                Some("running") | None => format!(
                    "running {:.0}% {}/s ({})",
                    t.percent,
                    crate::units::format_size(t.rate),
                    t.bw_limit.as_deref().unwrap_or("unlimited")
                ),
                Some(p) => p.to_string(),
            });
        }
        if matches!(t.state, TaskState::Pending | TaskState::Queued) {
            return Ok(t.state.to_string());
        }
    }
    // R31 unknown: the platform or the target (with its marker) cannot be reached.
    if stored != "stopped" && !cache.reachable(state, rule)? {
        return Ok("unknown".into());
    }
    Ok(match stored {
        "started" => "idle".into(),
        other => other.into(),
    })
}

/// A VM of a rule as `rule list` and `rule show` print it (R31, R33).
#[derive(Serialize)]
struct VmView {
    vm: String,
    /// The R31 state.
    state: String,
    #[serde(serialize_with = "crate::timefmt::stored")]
    added: String,
    unviewed_failures: u64,
    last_backup: Option<LastBackup>,
    last_task: Option<TaskRow>,
}

fn vm_views(state: &State, rule: &RuleRow, cache: &mut ListingCache) -> Result<Vec<VmView>> {
    let now = crate::clock::Clock::process()
        .now()
        .with_timezone(&chrono::Utc);
    rule.vms
        .iter()
        .map(|v| {
            let summary = cache
                .summaries
                .get_mut(&rule.name)
                .and_then(|vms| vms.remove(&v.vm));
            let last_backup = summary
                .as_ref()
                .and_then(|s| s.backup())
                .and_then(|r| LastBackup::of(r, now));
            let unviewed_failures = summary.as_ref().map_or(0, |s| s.unviewed_failures);
            let last_task = summary.map(|s| s.newest);
            Ok(VmView {
                vm: v.vm.clone(),
                state: vm_state(state, rule, last_task.as_ref(), &v.state, cache)?,
                added: v.added_at.clone(),
                unviewed_failures,
                last_backup,
                last_task,
            })
        })
        .collect()
}

/// A rule as `rule list` and `rule show --json` print it (docs/JSON.md, "Rule").
#[derive(Serialize)]
struct RuleDoc {
    name: String,
    platform: String,
    target: String,
    subdir: String,
    auto_cbt: bool,
    cbt: bool,
    lan_free: bool,
    delete_data: bool,
    /// `off`, `require` or `try`.
    quiesce: String,
    allow_plain_tcp_export: bool,
    policy: PolicyDoc,
    policy_text: String,
    schedules: Vec<ScheduleView>,
    next_runs: Vec<NextRun>,
    /// Bandwidth windows as written (`mon-fri 08:00-18:00 20MiB/s`).
    bandwidth: Vec<String>,
    notify_url: Option<String>,
    /// The target every new point is copied to after its backup.
    copy_to: Option<String>,
    /// Periods of copied points the copy keeps; `None`: all.
    copy_retention: Option<u32>,
    #[serde(serialize_with = "crate::timefmt::stored")]
    created: String,
    vms: Vec<VmView>,
}

/// A policy for scripts: its kind, the one-time run (UTC) or the schedules with
/// their retention.
#[derive(Serialize)]
struct PolicyDoc {
    /// `once` or `periodic`.
    kind: &'static str,
    #[serde(with = "crate::timefmt::json_opt")]
    once: Option<chrono::DateTime<chrono::Utc>>,
    schedules: Vec<String>,
    retention: Option<u32>,
}

#[derive(Serialize)]
struct ScheduleView {
    spec: String,
    cron: Vec<String>,
}

#[derive(Clone, Serialize)]
struct NextRun {
    #[serde(with = "crate::timefmt::json")]
    time: chrono::DateTime<chrono::Utc>,
    level: String,
}

/// A rule's own webhook as listings show it: `none`, or only its scheme and
/// host (a webhook URL often carries its token); `None` when the rule uses
/// system.conf's.
fn shown_notify_url(rule: &RuleRow) -> Option<String> {
    rule.notify_url.as_deref().map(|u| {
        if u == crate::monitor::NOTIFY_URL_NONE {
            u.to_string()
        } else {
            crate::monitor::notify::redact_url(u)
        }
    })
}

fn rule_doc(state: &State, rule: &RuleRow, cache: &mut ListingCache) -> Result<RuleDoc> {
    let s = &rule.settings;
    let utc = |at: chrono::NaiveDateTime| {
        crate::policy::schedule::place_in_zone(&Local, at).map(|t| t.with_timezone(&chrono::Utc))
    };
    let (policy, schedules) = match &s.policy {
        Policy::Periodic {
            schedules,
            retention,
        } => (
            PolicyDoc {
                kind: "periodic",
                once: None,
                schedules: schedules.iter().map(|sc| sc.to_string()).collect(),
                retention: *retention,
            },
            schedules
                .iter()
                .map(|sc| ScheduleView {
                    spec: sc.to_string(),
                    cron: sc.cron_exprs(),
                })
                .collect(),
        ),
        Policy::Once { at } => (
            PolicyDoc {
                kind: "once",
                once: utc(*at),
                schedules: Vec::new(),
                retention: None,
            },
            Vec::new(),
        ),
    };
    let policy_text = s.policy.to_string();
    let next_runs = cache
        .next_runs
        .entry(policy_text.clone())
        .or_insert_with(|| {
            s.policy
                .next_runs(Local::now().naive_local(), 5)
                .into_iter()
                .filter_map(|(at, level)| {
                    Some(NextRun {
                        time: utc(at)?,
                        level: level.to_string(),
                    })
                })
                .collect()
        })
        .clone();
    Ok(RuleDoc {
        name: rule.name.clone(),
        platform: s.platform.clone(),
        target: s.target.clone(),
        subdir: s.subdir.clone(),
        auto_cbt: s.auto_cbt,
        cbt: s.cbt,
        lan_free: s.lan_free,
        delete_data: s.delete_data,
        quiesce: s.quiesce.to_string(),
        allow_plain_tcp_export: s.allow_plain_tcp_export,
        policy,
        policy_text,
        schedules,
        next_runs,
        bandwidth: s.bandwidth.iter().map(|w| w.to_string()).collect(),
        notify_url: shown_notify_url(rule),
        copy_to: rule.copy_to.clone(),
        copy_retention: rule.copy_retention,
        created: rule.created_at.clone(),
        vms: vm_views(state, rule, cache)?,
    })
}

fn list(ctx: &Ctx) -> Result<ExitCode> {
    let state = ctx.state()?;
    // One read transaction: a consistent snapshot, and no lock taken and
    // released around each of the thousands of reads below.
    let _snapshot = state.conn().unchecked_transaction()?;
    let rules = state.rules()?;
    let mut cache = ListingCache::new(&state, None)?;
    if ctx.json {
        let docs: Vec<RuleDoc> = rules
            .iter()
            .map(|r| rule_doc(&state, r, &mut cache))
            .collect::<Result<_>>()?;
        print_json(&docs);
        return Ok(ExitCode::Ok);
    }
    let mut t = Table::new(&[
        "RULE",
        "VM",
        "STATE",
        "LAST BACKUP",
        "UNVIEWED FAILURES",
        "PLATFORM",
        "TARGET",
        "POLICY",
    ]);
    // The table needs a rule's VM views and policy, not its whole document
    // (schedules, cron forms, next runs); each rule's views are dropped once
    // its rows are made.
    let policies: Vec<String> = rules
        .iter()
        .map(|r| r.settings.policy.to_string())
        .collect();
    for (rule, policy) in rules.iter().zip(&policies) {
        for v in vm_views(&state, rule, &mut cache)? {
            t.row_of(vec![
                Cow::Borrowed(&rule.name),
                v.vm.into(),
                v.state.into(),
                v.last_backup
                    .as_ref()
                    .map_or(Cow::Borrowed("never"), |b| b.human().into()),
                v.unviewed_failures.to_string().into(),
                Cow::Borrowed(&rule.settings.platform),
                Cow::Borrowed(&rule.settings.target),
                Cow::Borrowed(policy),
            ]);
        }
    }
    t.print();
    Ok(ExitCode::Ok)
}

fn show(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(name)?;
    let doc = rule_doc(
        &state,
        &rule,
        &mut ListingCache::new(&state, Some(&rule.name))?,
    )?;
    if ctx.json {
        print_json(&doc);
        return Ok(ExitCode::Ok);
    }
    let s = &rule.settings;
    let (schedules, next, vms) = (&doc.schedules, &doc.next_runs, &doc.vms);
    out!("name:         {}", rule.name);
    out!("platform:     {}", s.platform);
    out!("target:       {} (sub-directory {})", s.target, s.subdir);
    let cbt = if s.auto_cbt {
        "auto (when the VM supports it)".to_string()
    } else {
        yes_no(s.cbt)
    };
    out!("quick backup: {cbt}");
    out!("lan-free:     {}", yes_no(s.lan_free));
    out!("delete data:  {}", yes_no(s.delete_data));
    out!("quiesce:      {}", s.quiesce);
    out!(
        "notify url:   {}",
        shown_notify_url(&rule).unwrap_or_else(|| "system.conf's notify_url".into())
    );
    match &rule.copy_to {
        Some(to) => out!(
            "copy to:      {to} after each backup, {}",
            copy_retention_text(&s.policy, rule.copy_retention)
        ),
        None => out!("copy to:      none"),
    }
    if s.allow_plain_tcp_export {
        out!("exports:      plain TCP allowed (--allow-plain-tcp-export)");
    }
    out!("policy:       {}", s.policy);
    for sc in schedules {
        out!("  {}  =>  cron {}", sc.spec, sc.cron.join(" | "));
    }
    if s.bandwidth.is_empty() {
        out!("bandwidth:    unlimited");
    } else {
        for (i, w) in s.bandwidth.iter().enumerate() {
            out!(
                "{}{w}",
                if i == 0 {
                    "bandwidth:    "
                } else {
                    "              "
                }
            );
        }
    }
    out!("next runs:");
    if next.is_empty() {
        out!("  (none)");
    }
    for n in next {
        out!("  {}  {}", crate::timefmt::human_time(n.time), n.level);
    }
    out!();
    let mut t = Table::new(&[
        "VM",
        "STATE",
        "LAST BACKUP",
        "POINT",
        "UNVIEWED FAILURES",
        "LAST TASK",
    ]);
    for v in vms {
        let last_task = match &v.last_task {
            Some(t) => format!("{} {} {}", t.id, t.kind, t.state),
            None => "-".into(),
        };
        t.row(vec![
            v.vm.clone(),
            v.state.clone(),
            v.last_backup
                .as_ref()
                .map_or("never".into(), LastBackup::human),
            v.last_backup
                .as_ref()
                .and_then(|b| b.point.clone())
                .unwrap_or_else(|| "-".into()),
            v.unviewed_failures.to_string(),
            last_task,
        ]);
    }
    t.print();
    Ok(ExitCode::Ok)
}

/// The copy's retention in words: `retention 3 days`, `keep all`.
fn copy_retention_text(policy: &Policy, retention: Option<u32>) -> String {
    crate::lifecycle::retention::Retention::of_copy(policy, retention).to_string()
}
