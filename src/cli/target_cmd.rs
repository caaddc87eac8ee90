//! `vmbackup target ...`: where backup repositories live (R4, R5).
//!
//! `target add` registers a directory and writes the target marker into it;
//! `target mark` writes (or adopts) the marker of a target registered before
//! markers existed, once it is mounted (docs/FORMAT.md, "Target marker").

use std::path::Path;

use anyhow::{Context, Result};

use super::args::TargetCmd;
use super::output::{print_done, print_json, Table};
use super::Ctx;
use crate::error::{invalid, refused, ExitCode};
use crate::repo::target::{read_marker, write_marker, TargetMarker};
use crate::repo::TargetSpec;
use crate::state::check_name;

pub fn run(ctx: &Ctx, cmd: TargetCmd) -> Result<ExitCode> {
    match cmd {
        TargetCmd::Add { name, path } => add(ctx, &name, &path),
        TargetCmd::Mark { name } => mark(ctx, &name),
        TargetCmd::List => {
            let rows = ctx.state()?.targets()?;
            if ctx.json {
                print_json(&rows);
            } else {
                let mut t = Table::new(&["NAME", "LOCATION", "MARKED", "CREATED"]);
                for r in rows {
                    let marked = if r.marker_id.is_some() { "yes" } else { "no" };
                    t.row(vec![
                        r.name,
                        r.spec.to_string(),
                        marked.into(),
                        r.created_at,
                    ]);
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
            let reachable = crate::lifecycle::open_target(&t).map(|_| ());
            if ctx.json {
                let mut v = serde_json::to_value(&t)?;
                v["rules"] = serde_json::json!(users);
                v["reachable"] = serde_json::json!(reachable.is_ok());
                v["error"] = serde_json::json!(reachable.as_ref().err().map(|e| format!("{e:#}")));
                print_json(&v);
            } else {
                out!("name:     {}", t.name);
                out!("location: {}", t.spec);
                out!(
                    "marker:   {}",
                    t.marker_id
                        .as_deref()
                        .unwrap_or("(none: run 'vmbackup target mark')")
                );
                out!("created:  {}", t.created_at);
                out!(
                    "rules:    {}",
                    if users.is_empty() {
                        "(none)".into()
                    } else {
                        users.join(", ")
                    }
                );
                match &reachable {
                    Ok(()) => out!("state:    reachable"),
                    Err(e) => out!("state:    unreachable: {e:#}"),
                }
            }
            Ok(ExitCode::Ok)
        }
        TargetCmd::Remove { name } => {
            ctx.state()?.remove_target(&name)?;
            print_done(
                ctx.json,
                ctx.quiet,
                &format!("target '{name}' removed (its data and marker stay on disk)"),
                serde_json::json!({ "target": name }),
            );
            Ok(ExitCode::Ok)
        }
    }
}

/// Longest target directory: the repository's own paths below it (rule
/// sub-directory, VM, point, chunk names) must fit PATH_MAX (4096).
const MAX_TARGET_PATH: usize = 1024;

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
    if abs.as_os_str().len() > MAX_TARGET_PATH {
        return Err(invalid(
            "--path",
            abs.display(),
            format!("must be at most {MAX_TARGET_PATH} bytes long (repository paths below it must fit the system's limit of 4096)"),
        ));
    }
    let spec = TargetSpec::Directory { path: abs.clone() };
    let mut state = ctx.state()?;
    if let Some(t) = state.target(name)? {
        return Err(invalid(
            "target name",
            &t.name,
            "already registered; pick another name",
        ));
    }
    // The marker first (a directory already marked keeps its id: the same disk
    // registered again, e.g. in a new state store), then the row.
    let store = spec.open()?;
    let marker = write_marker(store.as_ref(), &TargetMarker::new(name))?;
    state.add_target(name, &spec, &marker.target_id)?;
    print_done(
        ctx.json,
        ctx.quiet,
        &format!("target '{name}' added: {}", abs.display()),
        serde_json::json!({ "target": name, "spec": spec, "marker_id": marker.target_id }),
    );
    Ok(ExitCode::Ok)
}

/// Write the marker into a registered target (or adopt the one there) and
/// record its id. Refused when the target already records another marker.
fn mark(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let mut state = ctx.state()?;
    let t = state.require_target(name)?;
    let store = t.spec.open().with_context(|| format!("target '{name}'"))?;
    let found = read_marker(store.as_ref())?;
    let marker = match (&found, &t.marker_id) {
        (Some(m), Some(id)) if m.target_id != *id => {
            return Err(refused(format!(
                "target '{name}' at {} holds the marker of another target ('{}', id {}); this target's id is {id}: is the right disk mounted?",
                t.spec.location(),
                m.name,
                m.target_id
            )))
        }
        (Some(m), _) => m.clone(),
        (None, _) => write_marker(store.as_ref(), &TargetMarker::new(name))?,
    };
    state.set_target_marker(name, &marker.target_id)?;
    print_done(
        ctx.json,
        ctx.quiet,
        &format!(
            "target '{name}' marked at {} (id {})",
            t.spec.location(),
            marker.target_id
        ),
        serde_json::json!({ "target": name, "marker_id": marker.target_id }),
    );
    Ok(ExitCode::Ok)
}
