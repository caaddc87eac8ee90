//! Shell completion that knows the user's objects: rule, VM, platform, target,
//! point and task names come from the state store, `--to`/`--path` complete
//! directories. It is clap_complete's dynamic mode (pinned in Cargo.toml: its
//! protocol between script and program is not stable across versions): the
//! script `vmbackup completions SHELL` prints calls `vmbackup` back with
//! [`ENV`] set, and the candidate functions here answer.
//!
//! A candidate function never fails and never creates anything: without a
//! state database it offers nothing.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap_complete::CompletionCandidate;

use crate::state::State;

/// The variable that makes `vmbackup` answer a completion request.
pub const ENV: &str = "VMBACKUP_COMPLETE";

/// The registration script for `shell` (what `vmbackup completions` prints).
pub fn script(shell: clap_complete::Shell) -> Result<String> {
    let name = shell.to_string();
    let shells = clap_complete::env::Shells::builtins();
    let completer = shells
        .completer(&name)
        .with_context(|| format!("no dynamic completion for {name}"))?;
    // The script calls this very binary back, wherever it is installed.
    let bin = std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "vmbackup".into());
    let mut buf = Vec::new();
    completer.write_registration(ENV, "vmbackup", "vmbackup", &bin, &mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The words of the command line being completed (after `--`).
fn words() -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--") {
        Some(i) => args[i + 1..].to_vec(),
        None => args,
    }
}

/// The value of option `--name` on the line being completed.
fn option(words: &[String], name: &str) -> Option<String> {
    let flag = format!("--{name}");
    let eq = format!("--{name}=");
    words.iter().enumerate().find_map(|(i, w)| {
        if let Some(v) = w.strip_prefix(&eq) {
            Some(v.to_string())
        } else if *w == flag {
            words.get(i + 1).filter(|v| !v.is_empty()).cloned()
        } else {
            None
        }
    })
}

/// The state store the command line names (`--state`, `VMBACKUP_STATE`, the
/// default), when it exists.
fn state() -> Option<State> {
    let words = words();
    let path = option(&words, "state")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("VMBACKUP_STATE").map(PathBuf::from))
        .or_else(|| super::default_state_path().ok())?;
    if !path.exists() {
        return None;
    }
    State::open(&path).ok()
}

fn candidates(names: impl IntoIterator<Item = String>) -> Vec<CompletionCandidate> {
    names.into_iter().map(CompletionCandidate::new).collect()
}

/// Rule names.
pub fn rules() -> Vec<CompletionCandidate> {
    let Some(state) = state() else {
        return Vec::new();
    };
    candidates(
        state
            .rules()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name),
    )
}

/// VM names: of the rule on the line when there is one, else of every
/// platform's VM list.
pub fn vms() -> Vec<CompletionCandidate> {
    let Some(state) = state() else {
        return Vec::new();
    };
    if let Some(rule) = rule_on_line(&state) {
        return candidates(rule.vms.into_iter().map(|v| v.vm));
    }
    let mut names: Vec<String> = state
        .platforms()
        .unwrap_or_default()
        .into_iter()
        .flat_map(|p| p.vms.into_iter().map(|v| v.name))
        .collect();
    names.sort();
    names.dedup();
    candidates(names)
}

/// Platform names.
pub fn platforms() -> Vec<CompletionCandidate> {
    let Some(state) = state() else {
        return Vec::new();
    };
    candidates(
        state
            .platforms()
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.name),
    )
}

/// Target names.
pub fn targets() -> Vec<CompletionCandidate> {
    let Some(state) = state() else {
        return Vec::new();
    };
    candidates(
        state
            .targets()
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.name),
    )
}

/// Point ids of the rule and `--vm` on the line, newest first, read from the
/// repository (so pruned points are not offered); `latest` too.
pub fn points() -> Vec<CompletionCandidate> {
    let Some(state) = state() else {
        return Vec::new();
    };
    let (Some(rule), Some(vm)) = (rule_on_line(&state), option(&words(), "vm")) else {
        return Vec::new();
    };
    let Ok(Some(repo)) = crate::lifecycle::rule_repository(&state, &rule) else {
        return Vec::new();
    };
    let key = crate::repo::vm_key(&rule.settings.platform, &vm);
    let mut ids = repo
        .list_points(&key)
        .map(|l| l.all_ids())
        .unwrap_or_default();
    ids.reverse();
    ids.insert(0, "latest".into());
    candidates(ids)
}

/// Task ids, newest first, each with its kind, rule and VM as help.
pub fn tasks() -> Vec<CompletionCandidate> {
    let Some(state) = state() else {
        return Vec::new();
    };
    let rule = rule_on_line(&state).map(|r| r.name);
    state
        .tasks(false, 200)
        .unwrap_or_default()
        .into_iter()
        .filter(|t| rule.as_ref().is_none_or(|r| *r == t.rule))
        .map(|t| {
            CompletionCandidate::new(t.id.to_string()).help(Some(
                format!("{} {} {} {}", t.kind, t.rule, t.vm, t.state).into(),
            ))
        })
        .collect()
}

/// The rule the line names: the first word that is a rule's name.
fn rule_on_line(state: &State) -> Option<crate::state::rules::RuleRow> {
    let words = words();
    let rules = state.rules().ok()?;
    words
        .iter()
        .skip(1)
        .filter(|w| !w.starts_with('-'))
        .find_map(|w| rules.iter().find(|r| r.name == *w).cloned())
}
