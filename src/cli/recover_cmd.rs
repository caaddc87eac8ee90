//! `recover`: transient and instant recovery of a rule's VMs (R32, R34), and
//! `recover list/stop/resume/abort`. Recoveries are runner tasks: a recovery
//! task (no slot, R38) handed to a background server process, and for instant
//! recovery a migration task (a slot) run here.

use std::sync::Arc;

use anyhow::Result;

use super::args::{RecoverArgs, RecoverCmd, RecoverStartArgs};
use super::output::{print_json, Table};
use super::process::TaskSession;
use super::progress_view::CliEvents;
use super::restore_cmd::{chosen_points, conclude, launch_options};
use super::Ctx;
use crate::error::{invalid, ExitCode};
use crate::platform::PlatformSpec;
use crate::recovery::{self, RecoverOptions};
use crate::repo::vm_key;
use crate::runner::{Job, Outcome, TaskResult, TaskSpec};
use crate::state::recoveries::{RecoveryMode, RecoveryStage};

pub fn recover(ctx: &Ctx, a: RecoverArgs) -> Result<ExitCode> {
    match a.cmd {
        Some(RecoverCmd::List { all }) => list(ctx, all),
        Some(RecoverCmd::Stop { id, keep_overlays }) => stop(ctx, id, keep_overlays),
        Some(RecoverCmd::Resume { id }) => resume(ctx, id),
        Some(RecoverCmd::Abort { id }) => abort(ctx, id),
        None => start(ctx, a.start),
    }
}

/// The hidden `recover-serve ID`: the background server's main.
pub fn serve(ctx: &Ctx, id: i64) -> Result<ExitCode> {
    recovery::server::check_startable(&ctx.state()?, id)?;
    recovery::server::run(&ctx.state_path, id)?;
    Ok(ExitCode::Ok)
}

/// A task session whose front end shows nothing on stdout under `--json` (the
/// command prints its summary line only).
fn session(ctx: &Ctx) -> Result<TaskSession> {
    TaskSession::start_with(
        ctx,
        Arc::new(CliEvents::new(
            false,
            ctx.quiet || ctx.json,
            ctx.verbose > 0,
        )),
    )
}

fn start(ctx: &Ctx, a: RecoverStartArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(a.rule.as_deref().unwrap_or_default())?;
    let repo = crate::lifecycle::rule_repository_with_points(&state, &rule)?;
    let prow = state.require_platform(&rule.settings.platform)?;
    let (chosen, missing) = chosen_points(&repo, &rule, a.all, a.vm.as_deref(), &a.point, None)?;
    if a.all && a.name.is_some() {
        return Err(invalid(
            "--name",
            a.name.unwrap_or_default(),
            "one name cannot name every VM of --all",
        ));
    }
    let target_dir = match (&a.to, a.instant) {
        (Some(d), true) => {
            let d = std::path::absolute(d).unwrap_or_else(|_| d.clone());
            if !d.is_dir() {
                return Err(invalid(
                    "--to",
                    d.display(),
                    "must be an existing directory",
                ));
            }
            Some(d)
        }
        (Some(d), false) => return Err(invalid("--to", d.display(), "goes with --instant")),
        _ => None,
    };
    if let Some(d) = &a.overlay_dir {
        if !d.is_dir() {
            return Err(invalid(
                "--overlay-dir",
                d.display(),
                "must be an existing directory",
            ));
        }
    }
    let launch = launch_options(&a.launch, a.name.clone())?;
    // The instantly recovered VM joins its platform as a QMP socket in its directory.
    let qmp_dir = match (&prow.spec, a.instant) {
        (_, false) => None,
        (PlatformSpec::Qemu { qmp_dir }, true) => Some(qmp_dir.clone()),
        (PlatformSpec::Libvirt { .. }, true) => {
            return Err(invalid(
                "--instant",
                "",
                format!(
                    "platform '{}' is libvirt: an instantly recovered VM joins a qemu platform's QMP directory; use --transient, or restore --as-vm",
                    prow.name
                ),
            ))
        }
    };
    let mode = if a.instant {
        RecoveryMode::Instant
    } else {
        RecoveryMode::Transient
    };
    let opts = RecoverOptions {
        mode,
        start: a.start || a.instant,
        launch,
        overlay_dir: a
            .overlay_dir
            .as_ref()
            .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone())),
        target_dir,
        qmp_dir,
        resume: None,
    };
    if opts.start {
        // A configuration that cannot launch is refused before anything starts.
        for (_, m) in &chosen {
            let (secrets, others) = match recovery::captured_cmdline(m) {
                Some(line) => recovery::cmdline::missing_secrets(&line)?,
                None => {
                    return Err(crate::error::refused(format!(
                        "point {} has no captured QEMU command line",
                        m.point
                    )))
                }
            };
            let lacking: Vec<&String> = secrets
                .iter()
                .filter(|s| !opts.launch.secrets.contains_key(*s))
                .collect();
            if !lacking.is_empty() || !others.is_empty() {
                return Err(crate::error::refused(format!(
                    "point {} lacks secret(s) redacted at backup: {}; supply each with --set-secret ID=FILE",
                    m.point,
                    lacking.iter().map(|s| s.as_str()).chain(others.iter().map(String::as_str)).collect::<Vec<_>>().join(", ")
                )));
            }
        }
    }
    drop(state);
    for vm in &missing {
        eprintln!("vmbackup: {vm}: no restore point; not recovered");
    }
    let session = session(ctx)?;
    let runner = &session.runner;
    let specs = chosen
        .into_iter()
        .map(|(vm, m)| TaskSpec {
            rule: rule.clone(),
            vm,
            job: Job::Recover {
                point: Box::new(m),
                opts: opts.clone(),
            },
        })
        .collect();
    let mut results = runner.run_all(specs)?;
    if a.instant {
        let migrations: Vec<TaskSpec> = results
            .iter()
            .filter_map(|r| match &r.outcome {
                Some(Outcome::Recovery(rep)) => Some(TaskSpec {
                    rule: rule.clone(),
                    vm: r.vm.clone(),
                    job: Job::Migrate {
                        recovery: rep.recovery,
                    },
                }),
                _ => None,
            })
            .collect();
        if !ctx.json {
            print_recoveries(&results);
        }
        let done = runner.run_all(migrations)?;
        results.extend(done);
    } else if !ctx.json {
        print_recoveries(&results);
    }
    let code = conclude(ctx, &session, &rule.name, &results, &missing);
    session.finish();
    Ok(code)
}

/// The command line and the stop hint of each started recovery.
fn print_recoveries(results: &[TaskResult]) {
    for r in results {
        let Some(Outcome::Recovery(rep)) = &r.outcome else {
            continue;
        };
        if rep.vm.is_none() {
            match (&rep.command_line, &rep.command_line_error) {
                (Some(line), _) => out!("{}: QEMU command line: {}", r.vm, shell_line(line)),
                (None, Some(e)) => out!("{}: no QEMU command line: {e}", r.vm),
                _ => {}
            }
        }
        out!(
            "{}: recovery {} runs; stop it with 'vmbackup recover stop {}'",
            r.vm,
            rep.recovery,
            rep.recovery
        );
    }
}

fn shell_line(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn list(ctx: &Ctx, all: bool) -> Result<ExitCode> {
    let state = ctx.state()?;
    let views = recovery::list(&state, all)?;
    if ctx.json {
        print_json(&serde_json::json!({ "recoveries": views }));
        return Ok(ExitCode::Ok);
    }
    let mut t = Table::new(&[
        "ID",
        "TASK",
        "RULE",
        "VM",
        "POINT",
        "MODE",
        "STAGE",
        "SERVER",
        "RECOVERED VM",
        "SOCKET",
    ]);
    for v in &views {
        let r = &v.row;
        t.row(vec![
            r.id.to_string(),
            format!(
                "{} {}",
                r.task,
                v.status.map(|s| s.to_string()).unwrap_or_default()
            ),
            r.rule.clone(),
            r.vm.clone(),
            r.point.clone(),
            r.mode.to_string(),
            r.stage.to_string(),
            if v.server_running {
                format!("pid {}", r.server_pid.unwrap_or(0))
            } else {
                "stopped".into()
            },
            match (&r.vm_name, v.vm_running) {
                (Some(n), true) => format!("{n} (pid {})", r.vm_pid.unwrap_or(0)),
                (Some(n), false) => format!("{n} (not running)"),
                (None, _) => "-".into(),
            },
            r.socket.clone(),
        ]);
    }
    t.print();
    Ok(ExitCode::Ok)
}

fn stop(ctx: &Ctx, id: i64, keep: bool) -> Result<ExitCode> {
    let report = recovery::stop(&ctx.state_path, id, keep)?;
    if ctx.json {
        print_json(&serde_json::json!({
            "message": format!("recovery {id} stopped"),
            "recovery": id,
            "actions": report.actions,
            "kept_overlays": report.kept_overlays,
        }));
    } else {
        for a in &report.actions {
            out!("{a}");
        }
        for k in &report.kept_overlays {
            out!("kept overlay {k}");
        }
        out!("recovery {id} stopped");
    }
    Ok(ExitCode::Ok)
}

fn resume(ctx: &Ctx, id: i64) -> Result<ExitCode> {
    // Started first: it reclaims what dead processes left (R44).
    let session = session(ctx)?;
    let runner = &session.runner;
    let state = ctx.state()?;
    let views = recovery::list(&state, true)?;
    let v = views.into_iter().find(|v| v.row.id == id).ok_or_else(|| {
        invalid(
            "recovery",
            id,
            "no such recovery; see 'vmbackup recover list'",
        )
    })?;
    let row = v.row.clone();
    if matches!(row.stage, RecoveryStage::Stopped | RecoveryStage::Migrated) {
        return Err(crate::error::refused(format!(
            "recovery {id} is {}; nothing to resume",
            row.stage
        )));
    }
    let rule = state.require_rule(&row.rule)?;
    let repo = crate::lifecycle::rule_repository_with_points(&state, &rule)?;
    let point = repo.load_manifest(&vm_key(&rule.settings.platform, &row.vm), &row.point)?;
    drop(state);
    let mut results = Vec::new();
    if !v.server_running {
        let opts = RecoverOptions {
            mode: row.mode,
            start: false,
            launch: crate::recovery::cmdline::LaunchOptions {
                name: None,
                net: crate::recovery::cmdline::Net::None,
                secrets: Default::default(),
                accel: Default::default(),
            },
            overlay_dir: None,
            target_dir: None,
            qmp_dir: None,
            resume: Some(id),
        };
        results.extend(runner.run_all(vec![TaskSpec {
            rule: rule.clone(),
            vm: row.vm.clone(),
            job: Job::Recover {
                point: Box::new(point),
                opts,
            },
        }])?);
    }
    let migrating = row.stage == RecoveryStage::Migrating
        || (row.mode == RecoveryMode::Instant && row.stage == RecoveryStage::Serving);
    if migrating && results.iter().all(|r| r.code == ExitCode::Ok) {
        results.extend(runner.run_all(vec![TaskSpec {
            rule: rule.clone(),
            vm: row.vm.clone(),
            job: Job::Migrate { recovery: id },
        }])?);
    }
    if results.is_empty() && !ctx.json {
        out!("recovery {id}: its server runs and nothing is left to migrate");
    }
    let code = conclude(ctx, &session, &rule.name, &results, &[]);
    session.finish();
    Ok(code)
}

fn abort(ctx: &Ctx, id: i64) -> Result<ExitCode> {
    // A migration task whose process died ends interrupted first.
    super::process::reclaim_dead_now(ctx)?;
    let actions = recovery::mirror::abort(&ctx.state_path, id)?;
    if ctx.json {
        print_json(&serde_json::json!({
            "message": format!("migration of recovery {id} aborted; it runs as a transient recovery"),
            "recovery": id,
            "actions": actions,
        }));
    } else {
        for a in &actions {
            out!("{a}");
        }
        out!("migration of recovery {id} aborted; the VM runs as a transient recovery until 'vmbackup recover stop {id}'");
    }
    Ok(ExitCode::Ok)
}
