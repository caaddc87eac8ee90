//! `vmbackup key ...`: client-side encryption keys (docs/FORMAT.md,
//! "Encryption"). `generate` writes a key file; `list`, `add` and `remove`
//! manage the key slots of the encrypted repositories of a target's rules,
//! opened with the target's registered key.

use std::path::Path;

use anyhow::Result;

use super::args::KeyCmd;
use super::output::{print_json, Table};
use super::Ctx;
use crate::error::{invalid, refused, ExitCode};
use crate::lifecycle::rule_repository;
use crate::repo::crypto::generate_key_file;
use crate::repo::{KeySource, Repository};
use crate::state::State;

pub fn run(ctx: &Ctx, cmd: KeyCmd) -> Result<ExitCode> {
    match cmd {
        KeyCmd::Generate { file } => {
            if file.exists() || file.is_symlink() {
                return Err(invalid(
                    "key file",
                    file.display(),
                    "exists already; a key file is never overwritten",
                ));
            }
            generate_key_file(&file)?;
            if ctx.json {
                print_json(&serde_json::json!({
                    "message": "key file written",
                    "path": absolute(&file),
                }));
            } else if !ctx.quiet {
                out!(
                    "key file {} written (mode 0600). Keep a copy off this host: without it the backups it encrypts cannot be read",
                    file.display()
                );
            }
            Ok(ExitCode::Ok)
        }
        KeyCmd::List { target } => {
            let state = ctx.state()?;
            let (_, repos) = repositories(&state, &target)?;
            let mut rows = Vec::new();
            for (rule, repo) in &repos {
                for slot in repo.key_slots()? {
                    rows.push(serde_json::json!({
                        "rule": rule,
                        "repository": repo.location(),
                        "id": slot.id,
                        "kind": slot.kind(),
                        "created": slot.created,
                        "host": slot.host,
                    }));
                }
            }
            if ctx.json {
                print_json(&serde_json::json!({ "target": target, "slots": rows }));
            } else {
                let mut t = Table::new(&["RULE", "SLOT", "KIND", "CREATED", "HOST"]);
                for r in &rows {
                    let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                    t.row(vec![f("rule"), f("id"), f("kind"), f("created"), f("host")]);
                }
                t.print();
            }
            Ok(ExitCode::Ok)
        }
        KeyCmd::Add {
            target,
            key_file,
            passphrase_file,
        } => {
            let state = ctx.state()?;
            let (current, repos) = repositories(&state, &target)?;
            let new = match (key_file, passphrase_file) {
                (Some(f), _) => KeySource::KeyFile(f),
                (None, Some(f)) => KeySource::PassphraseFile(f),
                (None, None) => {
                    return Err(invalid(
                        "--key-file",
                        "(none)",
                        "give --key-file or --passphrase-file",
                    ))
                }
            };
            new.check()
                .map_err(|e| invalid("key", &new, format!("{e:#}")))?;
            let mut added = Vec::new();
            for (rule, repo) in &repos {
                let id = repo.add_key_slot(&current, &new)?;
                added.push(serde_json::json!({ "rule": rule, "slot": id }));
            }
            if ctx.json {
                print_json(&serde_json::json!({
                    "message": format!("key slot added to {} repositories", added.len()),
                    "target": target,
                    "slots": added,
                }));
            } else if !ctx.quiet {
                out!(
                    "key slot added to {} repositories of target '{target}'",
                    added.len()
                );
            }
            Ok(ExitCode::Ok)
        }
        KeyCmd::Remove { target, slot } => {
            let state = ctx.state()?;
            let (current, repos) = repositories(&state, &target)?;
            let mut removed = 0;
            for (_, repo) in &repos {
                if repo.remove_key_slot(&current, &slot)? {
                    removed += 1;
                }
            }
            if removed == 0 {
                return Err(invalid(
                    "key slot",
                    &slot,
                    "no repository of the target has it ('vmbackup key list')",
                ));
            }
            if ctx.json {
                print_json(&serde_json::json!({
                    "message": format!("key slot removed from {removed} repositories"),
                    "target": target,
                    "slot": slot,
                }));
            } else if !ctx.quiet {
                out!("key slot {slot} removed from {removed} repositories of target '{target}'");
            }
            Ok(ExitCode::Ok)
        }
    }
}

/// The target's registered key and the encrypted repositories of its rules.
fn repositories(state: &State, target: &str) -> Result<(KeySource, Vec<(String, Repository)>)> {
    let t = state.require_target(target)?;
    let Some(key) = t.key.clone() else {
        return Err(refused(format!(
            "target '{target}' is not encrypted (register one with 'target add --encrypt')"
        )));
    };
    let mut repos = Vec::new();
    for rule in state.rules()? {
        if rule.settings.target != target {
            continue;
        }
        if let Some(repo) = rule_repository(state, &rule)? {
            repos.push((rule.name.clone(), repo));
        }
    }
    Ok((key, repos))
}

fn absolute(p: &Path) -> String {
    p.canonicalize()
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
