//! `restore`: a restore point back to image files, as a new VM (`--as-vm`), into
//! the VM's own images (`--in-place`), or every VM of a rule (`--all`, R34), as
//! tasks of the runner (they take slots, R38, and can be cancelled).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;

use super::args::{ImageFormat as ImageArg, LaunchArgs, RestoreArgs};
use super::process::TaskSession;
use super::Ctx;
use crate::error::{invalid, ExitCode};
use crate::lifecycle::repository::{found_repository, parse_platform_vm};
use crate::lifecycle::restore_repository;
use crate::platform::PlatformSpec;
use crate::recovery::cmdline::{LaunchOptions, Net};
use crate::repo::{encode_name, vm_key, Manifest, Repository};
use crate::restore::ImageFormat;
use crate::runner::{Job, RestoreTo, TaskResult, TaskSpec};
use crate::state::rules::RuleRow;

/// `--net`, `--net-bridge`, `--set-secret` as launch options.
pub fn launch_options(a: &LaunchArgs, name: Option<String>) -> Result<LaunchOptions> {
    let net = match (&a.net_bridge, a.net) {
        (Some(br), _) => Net::Bridge(br.clone()),
        (None, true) => Net::User,
        (None, false) => Net::None,
    };
    let mut secrets = BTreeMap::new();
    for s in &a.set_secret {
        let (id, file) = s
            .split_once('=')
            .filter(|(id, f)| !id.is_empty() && !f.is_empty())
            .ok_or_else(|| invalid("--set-secret", s, "expected ID=FILE"))?;
        let path = std::path::absolute(file).unwrap_or_else(|_| PathBuf::from(file));
        if !path.is_file() {
            return Err(invalid(
                "--set-secret",
                s,
                format!("{} is not a file", path.display()),
            ));
        }
        secrets.insert(id.to_string(), path);
    }
    Ok(LaunchOptions {
        name,
        net,
        secrets,
        accel: a.accel.into(),
    })
}

/// A point id for "the newest point at or before" a local time `YYYY-MM-DD HH:MM`.
pub fn point_at(text: &str) -> Result<String> {
    use chrono::TimeZone;
    let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M")
        .map_err(|_| invalid("--at", text, "expected \"YYYY-MM-DD HH:MM\" (local time)"))?;
    let local = chrono::Local
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(|| invalid("--at", text, "no such local time (daylight saving gap)"))?;
    Ok(local
        .with_timezone(&chrono::Utc)
        .format("%Y%m%dT%H%M%SZ")
        .to_string())
}

/// VMs with the point chosen for each, and the VMs that have none.
type GroupPoints = (Vec<(String, Manifest)>, Vec<String>);

/// The points a restore or recovery uses: with `all`, [`group_points`];
/// otherwise `vm`'s point `point` (`latest`: the newest). Validated here,
/// before any task is recorded: bad input changes nothing.
pub fn chosen_points(
    repo: &Repository,
    rule: &RuleRow,
    all: bool,
    vm: Option<&str>,
    point: &str,
    at: Option<String>,
) -> Result<GroupPoints> {
    if all {
        return group_points(repo, rule, at.as_deref());
    }
    let vm = vm.unwrap_or_default();
    rule.require_vm(vm)?;
    let key = vm_key(&rule.settings.platform, vm);
    let point = (point != "latest").then_some(point);
    Ok((
        vec![(
            vm.to_string(),
            crate::restore::select_point(repo, &key, point)?,
        )],
        Vec::new(),
    ))
}

/// The point of each VM of `rule` a group operation uses (R34): the newest, or
/// the newest at or before `at`. VMs without such a point are listed apart.
pub fn group_points(repo: &Repository, rule: &RuleRow, at: Option<&str>) -> Result<GroupPoints> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for v in &rule.vms {
        let key = vm_key(&rule.settings.platform, &v.vm);
        let point = repo
            .list_points(&key)?
            .points
            .into_iter()
            .rev()
            .find(|m| at.is_none_or(|at| m.point.as_str() <= at));
        match point {
            Some(m) => found.push((v.vm.clone(), m)),
            None => missing.push(v.vm.clone()),
        }
    }
    Ok((found, missing))
}

pub fn restore(ctx: &Ctx, a: RestoreArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    // With --target, no rule in the state (a new host): the repository that
    // holds the VM's points on the target, found from its layout.
    let (rule, repo, found_vm) = match &a.target {
        Some(target) => {
            let (platform, vm) = parse_platform_vm(a.vm.as_deref().unwrap_or_default())?;
            let (path, repo) = found_repository(&state, target, &platform, &vm, a.path.as_deref())?;
            (RuleRow::found(target, &path, &platform), repo, Some(vm))
        }
        None => {
            let rule = state.require_rule(a.rule.as_deref().unwrap_or_default())?;
            let repo = restore_repository(&state, &rule, a.from.as_deref())?;
            (rule, repo, None)
        }
    };
    let format = match a.format {
        ImageArg::Raw => ImageFormat::Raw,
        ImageArg::Qcow2 => ImageFormat::Qcow2,
    };
    let launch = launch_options(&a.launch, a.as_vm.clone())?;
    if a.as_vm.is_none() && a.launch.given() {
        return Err(invalid(LAUNCH_FLAGS, "", "they go with --as-vm"));
    }
    if let Some(name) = &a.as_vm {
        crate::state::check_name("--as-vm", name)?;
    }
    // Points are chosen (and so validated) before a task is recorded: bad input
    // changes nothing.
    let at = a.at.as_deref().map(point_at).transpose()?;
    let (chosen, missing) = match found_vm {
        Some(vm) => {
            let key = vm_key(&rule.settings.platform, &vm);
            let point = (a.point != "latest").then_some(a.point.as_str());
            let manifest = crate::restore::select_point(&repo, &key, point)?;
            (vec![(vm, manifest)], Vec::new())
        }
        None => chosen_points(&repo, &rule, a.all, a.vm.as_deref(), &a.point, at)?,
    };
    let mut specs = Vec::new();
    for (vm, manifest) in chosen {
        let to = if a.in_place {
            RestoreTo::InPlace
        } else {
            let base = a.to.clone().unwrap_or_default();
            let dest = if a.all {
                base.join(encode_name(&vm))
            } else {
                base
            };
            match &a.as_vm {
                Some(name) => {
                    check_as_vm(
                        ctx, &state, &rule, name, &manifest, &dest, format, &a.launch,
                    )?;
                    RestoreTo::AsVm {
                        dest,
                        format,
                        force: a.force,
                        mode: a.mode,
                        launch: launch.clone(),
                        start: a.start,
                    }
                }
                None => RestoreTo::Files {
                    dest,
                    format,
                    force: a.force,
                    mode: a.mode,
                },
            }
        };
        specs.push(TaskSpec {
            rule: rule.clone(),
            vm,
            job: Job::Restore {
                point: Box::new(manifest),
                to,
                from: a.from.clone(),
            },
        });
    }
    drop(state);
    for vm in &missing {
        eprintln!(
            "vmbackup: {vm}: no restore point{}; not restored",
            a.at.as_deref()
                .map(|t| format!(" at or before {t}"))
                .unwrap_or_default()
        );
    }
    let session = TaskSession::start(ctx)?;
    let results = session.runner.run_all(specs)?;
    let code = conclude(ctx, &session, &rule.name, &results, &missing);
    session.finish();
    Ok(code)
}

/// The flags of a launch from the captured configuration (qemu platforms).
const LAUNCH_FLAGS: &str = "--net/--net-bridge/--set-secret/--accel";

/// `--as-vm NAME`: refused (exit 2) before anything is written when the
/// platform cannot make that VM from the point. libvirt defines a domain from
/// the point's domain XML (a name it already has is refused; the domain keeps
/// its own network and secrets); qemu gets a launch script, whose command line
/// is built now (secrets redacted at backup must be supplied).
#[allow(clippy::too_many_arguments)]
fn check_as_vm(
    ctx: &Ctx,
    state: &crate::state::State,
    rule: &RuleRow,
    name: &str,
    point: &Manifest,
    dest: &std::path::Path,
    format: ImageFormat,
    launch: &LaunchArgs,
) -> Result<()> {
    let prow = state.require_platform(&rule.settings.platform)?;
    if let Some(why) = prow.spec.why_no_new_vm(&point.vm_config) {
        return Err(invalid(
            "--as-vm",
            name,
            format!("platform '{}': {why}", prow.name),
        ));
    }
    match &prow.spec {
        PlatformSpec::Qemu { .. } => {
            let opts = launch_options(launch, Some(name.to_string()))?;
            crate::recovery::as_vm::plan(point, dest, format, &opts)?;
        }
        PlatformSpec::Libvirt { .. } => {
            if launch.given() {
                return Err(invalid(
                    LAUNCH_FLAGS,
                    "",
                    format!(
                        "platform '{}' is libvirt: the new domain keeps the network and secrets of its XML; these flags are for a qemu platform's launch script",
                        prow.name
                    ),
                ));
            }
            let taken = crate::platform::connect(&prow.spec, ctx.system_config()?.io_timeout)?
                .inventory()?
                .iter()
                .any(|v| v.name == name);
            if taken {
                return Err(invalid(
                    "--as-vm",
                    name,
                    format!(
                        "platform '{}' has a VM of this name; pick a new name",
                        prow.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The exit code of a restore, recovery or boot verification by severity (a
/// VM without a point counts as failed), and with `--json` its summary line
/// (docs/JSON.md, "Summary").
pub fn conclude(
    ctx: &Ctx,
    session: &TaskSession,
    rule: &str,
    results: &[TaskResult],
    missing: &[String],
) -> ExitCode {
    let mut worst = session.exit_code(results);
    if !missing.is_empty() {
        worst = worst.max(ExitCode::Failed);
    }
    if ctx.json {
        session.print_group_summary(Some(rule), results, missing, worst);
    }
    worst
}
