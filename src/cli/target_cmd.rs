//! `vmbackup target ...`: directories that hold backup repositories (R4, R5).

use std::path::Path;

use anyhow::{Context, Result};

use super::args::TargetCmd;
use super::output::{print_json, Table};
use super::Ctx;
use crate::error::{invalid, ExitCode};
use crate::state::check_name;

pub fn run(ctx: &Ctx, cmd: TargetCmd) -> Result<ExitCode> {
    match cmd {
        TargetCmd::Add { name, path } => add(ctx, &name, &path),
        TargetCmd::List => {
            let rows = ctx.state()?.targets()?;
            if ctx.json {
                print_json(&rows);
            } else {
                let mut t = Table::new(&["NAME", "PATH", "CREATED"]);
                for r in rows {
                    t.row(vec![r.name, r.path, r.created_at]);
                }
                t.print();
            }
            Ok(ExitCode::Ok)
        }
        TargetCmd::Show { name } => {
            let state = ctx.state()?;
            let t = state.require_target(&name)?;
            let users: Vec<String> = state
                .rules()?
                .into_iter()
                .filter(|r| r.settings.target == name)
                .map(|r| r.name)
                .collect();
            if ctx.json {
                let mut v = serde_json::to_value(&t)?;
                v["rules"] = serde_json::json!(users);
                print_json(&v);
            } else {
                out!("name:     {}", t.name);
                out!("path:     {}", t.path);
                out!("created:  {}", t.created_at);
                out!(
                    "rules:    {}",
                    if users.is_empty() {
                        "(none)".into()
                    } else {
                        users.join(", ")
                    }
                );
            }
            Ok(ExitCode::Ok)
        }
        TargetCmd::Remove { name } => {
            ctx.state()?.remove_target(&name)?;
            if ctx.json {
                print_json(&serde_json::json!({ "removed": name }));
            } else if !ctx.quiet {
                out!("target '{name}' removed (its data stays on disk)");
            }
            Ok(ExitCode::Ok)
        }
    }
}

fn add(ctx: &Ctx, name: &str, path: &Path) -> Result<ExitCode> {
    check_name("target name", name)?;
    // A missing directory is refused rather than created: it is often an unmounted
    // mount point, and backups written beneath it would fill the root file system.
    if !path.is_dir() {
        return Err(invalid(
            "--path",
            path.display(),
            "must be an existing directory (create or mount it first)",
        ));
    }
    if rustix::fs::access(
        path,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    )
    .is_err()
    {
        return Err(invalid(
            "--path",
            path.display(),
            "must be a directory this user can write to",
        ));
    }
    let abs = path
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    ctx.state()?.add_target(name, &abs.to_string_lossy())?;
    if ctx.json {
        print_json(&serde_json::json!({ "target": name, "path": abs }));
    } else if !ctx.quiet {
        out!("target '{name}' added: {}", abs.display());
    }
    Ok(ExitCode::Ok)
}
