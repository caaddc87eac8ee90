//! Garbage collection of the repositories rules use: which repositories, the
//! lock (exclusive, never waited for: a busy repository is deferred), and the
//! once-a-day rule of the automatic run. The mark and sweep is `repo::gc`.

use std::collections::BTreeMap;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{exit_code_of, ExitCode};
use crate::repo::gc::{collect, last_gc, GcReport};
use crate::repo::Repository;
use crate::state::rules::RuleRow;
use crate::state::State;
use crate::task::TaskState;

/// The automatic GC runs at most this often per repository.
pub const AUTO_GC_INTERVAL: chrono::Duration = chrono::Duration::hours(24);

/// Which repositories `gc` collects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every rule's repository.
    All,
    /// The repository of one rule.
    Rule(String),
    /// The repositories of the rules on one target.
    Target(String),
}

/// What happened to one repository.
#[derive(Debug, Clone, Serialize)]
pub struct RepoGc {
    pub target: String,
    /// Where the repository is (`/mnt/backup/web`).
    pub location: String,
    /// The rules using it.
    pub rules: Vec<String>,
    /// `completed`; `skipped` (deferred: the lock was busy, or no repository
    /// yet: see `error`); `failed` (refused: a point cannot be read).
    pub status: TaskState,
    pub report: Option<GcReport>,
    pub error: Option<String>,
    #[serde(skip)]
    pub code: ExitCode,
}

impl RepoGc {
    /// A repository of `rule` that was not collected, and why.
    pub fn not_run(rule: &RuleRow, why: &str) -> RepoGc {
        RepoGc {
            target: rule.settings.target.clone(),
            location: rule.settings.subdir.clone(),
            rules: vec![rule.name.clone()],
            status: TaskState::Skipped,
            report: None,
            error: Some(why.to_string()),
            code: ExitCode::Ok,
        }
    }
}

/// Collect the selected repositories (module docs); `dry_run` only counts.
pub fn gc(
    state: &State,
    selection: &Selection,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<Vec<RepoGc>> {
    let rules: Vec<RuleRow> = match selection {
        Selection::All => state.rules()?,
        Selection::Rule(r) => vec![state.require_rule(r)?],
        Selection::Target(t) => {
            state.require_target(t)?;
            state
                .rules()?
                .into_iter()
                .filter(|r| &r.settings.target == t)
                .collect()
        }
    };
    // Rules may share a repository (same target and path): collect it once.
    let mut groups: BTreeMap<(String, String), Vec<RuleRow>> = BTreeMap::new();
    for r in rules {
        groups
            .entry((r.settings.target.clone(), r.settings.subdir.clone()))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for ((target, subdir), rules) in groups {
        let names: Vec<String> = rules.iter().map(|r| r.name.clone()).collect();
        let mut entry = RepoGc {
            target,
            location: subdir,
            rules: names,
            status: TaskState::Completed,
            report: None,
            error: None,
            code: ExitCode::Ok,
        };
        match super::rule_repository(state, &rules[0]) {
            Ok(Some(repo)) => {
                entry.location = repo.location().to_string();
                collect_one(&repo, dry_run, now, &mut entry);
            }
            Ok(None) => {
                entry.status = TaskState::Skipped;
                entry.error = Some("no repository yet (no backup completed)".into());
            }
            Err(e) => fail(&mut entry, e),
        }
        out.push(entry);
    }
    Ok(out)
}

/// Collect one repository unless its lock is busy (then deferred).
fn collect_one(repo: &Repository, dry_run: bool, now: DateTime<Utc>, entry: &mut RepoGc) {
    let lock = if dry_run {
        repo.lock_shared("gc --dry-run")
    } else {
        repo.lock_exclusive("gc")
    };
    let lock = match lock {
        Ok(l) => l,
        Err(e) if exit_code_of(&e) == ExitCode::Busy => {
            entry.status = TaskState::Skipped;
            entry.error = Some(format!("deferred: {e:#}"));
            entry.code = ExitCode::Busy;
            return;
        }
        Err(e) => return fail(entry, e),
    };
    match collect(repo, &lock, dry_run, now) {
        Ok(r) => entry.report = Some(r),
        Err(e) => fail(entry, e),
    }
}

fn fail(entry: &mut RepoGc, e: anyhow::Error) {
    entry.status = TaskState::Failed;
    entry.code = exit_code_of(&e).max(ExitCode::Failed);
    entry.error = Some(format!("{e:#}"));
}

/// True when the last garbage collection of `repo` finished more than
/// [`AUTO_GC_INTERVAL`] before `now` (or never ran, or ran "in the future":
/// the clock was set back).
pub fn gc_due(repo: &Repository, now: DateTime<Utc>) -> Result<bool> {
    let Some(last) = last_gc(repo)? else {
        return Ok(true);
    };
    let finished = DateTime::parse_from_rfc3339(&last.finished).map(|t| t.with_timezone(&Utc));
    Ok(!finished.is_ok_and(|t| now - t < AUTO_GC_INTERVAL && t <= now))
}

/// The automatic GC of one repository: only when the last one finished more
/// than [`AUTO_GC_INTERVAL`] before `now`, and only when the exclusive lock is
/// free at once (never waited for). `None` when it was not due.
pub fn gc_if_due(repo: &Repository, now: DateTime<Utc>) -> Result<Option<RepoGc>> {
    if !gc_due(repo, now)? {
        return Ok(None);
    }
    let mut entry = RepoGc {
        target: String::new(),
        location: repo.location().to_string(),
        rules: Vec::new(),
        status: TaskState::Completed,
        report: None,
        error: None,
        code: ExitCode::Ok,
    };
    collect_one(repo, false, now, &mut entry);
    Ok(Some(entry))
}
