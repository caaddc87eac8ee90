//! A rule's repository: `<target>/<rule path>`, opened from the state store.
//!
//! A missing repository is an error, never a new one (docs/FORMAT.md, "Target
//! marker"): the target must carry the marker whose id the state store recorded
//! at `target add` / `target mark`, and a rule's repository is created only by
//! the rule's first backup, i.e. while the state records no completed backup
//! of the rule. Otherwise it is missing, most likely because the target is not
//! mounted, and that fails (exit 3) without creating anything.

use std::sync::Arc;

use anyhow::{anyhow, Result};

use crate::repo::target::read_marker;
use crate::repo::{Repository, Store};
use crate::state::rules::RuleRow;
use crate::state::targets::TargetRow;
use crate::state::State;

/// Open the target's store and check its marker against the state store.
pub fn open_target(target: &TargetRow) -> Result<Arc<dyn Store>> {
    let place = format!("target '{}' at {}", target.name, target.spec.location());
    let store = target.spec.open().map_err(|e| anyhow!("{place}: {e:#}"))?;
    let mark_hint = format!(
        "once it is mounted, run 'vmbackup target mark {}'",
        target.name
    );
    let marker = read_marker(store.as_ref()).map_err(|e| anyhow!("{place}: {e:#}"))?;
    match (marker, &target.marker_id) {
        (None, _) => Err(anyhow!(
            "{place} has no vmbackup target marker (not mounted?); {mark_hint}"
        )),
        (Some(_), None) => Err(anyhow!(
            "{place} was registered before target markers; {mark_hint}"
        )),
        (Some(m), Some(id)) if m.target_id != *id => Err(anyhow!(
            "{place} holds the marker of another target ('{}', id {}), not of '{}' (id {id}): wrong disk mounted?",
            m.name,
            m.target_id,
            target.name
        )),
        (Some(_), Some(_)) => Ok(store),
    }
}

/// The rule's repository, or `None` while it has none because no backup of the
/// rule completed yet ("no points yet"). A repository that should exist and
/// does not is an error.
pub fn rule_repository(state: &State, rule: &RuleRow) -> Result<Option<Repository>> {
    let target = state.require_target(&rule.settings.target)?;
    let store = open_target(&target)?;
    if Repository::exists_in(store.clone(), &rule.settings.subdir)? {
        return Repository::open_keyed(store, &rule.settings.subdir, target.key.as_ref()).map(Some);
    }
    if state.has_completed_backup(&rule.name, &rule.created_at)? {
        return Err(missing(&target, rule));
    }
    Ok(None)
}

/// The rule's repository for a backup: created by the rule's first backup.
pub fn repository_for_backup(state: &State, rule: &RuleRow) -> Result<Repository> {
    let target = state.require_target(&rule.settings.target)?;
    let store = open_target(&target)?;
    if Repository::exists_in(store.clone(), &rule.settings.subdir)? {
        return Repository::open_keyed(store, &rule.settings.subdir, target.key.as_ref());
    }
    if state.has_completed_backup(&rule.name, &rule.created_at)? {
        return Err(missing(&target, rule));
    }
    Repository::create_keyed(store, &rule.settings.subdir, target.key.as_ref())
}

/// The copy of the rule's repository `source` on target `to` (the rule's path
/// there), created as a copy of `source` when absent (offsite copy).
pub fn copy_repository(
    state: &State,
    rule: &RuleRow,
    source: &Repository,
    to: &str,
) -> Result<Repository> {
    let target = state.require_target(to)?;
    if target.name == rule.settings.target {
        return Err(crate::error::invalid(
            "--to",
            to,
            "is the rule's own target; give another target",
        ));
    }
    let store = open_target(&target)?;
    source.create_copy(store, &rule.settings.subdir, target.key.as_ref())
}

/// The repository a restore of the rule reads: the rule's own, or its copy
/// on target `from` (`restore --from`), which must exist there.
pub fn restore_repository(state: &State, rule: &RuleRow, from: Option<&str>) -> Result<Repository> {
    let Some(from) = from else {
        return rule_repository_with_points(state, rule);
    };
    let target = state.require_target(from)?;
    let store = open_target(&target)?;
    if !Repository::exists_in(store.clone(), &rule.settings.subdir)? {
        return Err(anyhow!(
            "target '{}' holds no copy of rule '{}' (no repository at {}/{})",
            target.name,
            rule.name,
            target.spec.location(),
            rule.settings.subdir
        ));
    }
    Repository::open_keyed(store, &rule.settings.subdir, target.key.as_ref())
}

fn missing(target: &TargetRow, rule: &RuleRow) -> anyhow::Error {
    anyhow!(
        "target '{}' at {}: repository of rule '{}' missing; not mounted? (nothing was created)",
        target.name,
        target.spec.location(),
        rule.name
    )
}

/// The rule's repository for reading points (restore, recovery, boot
/// verification): refused (exit 4) while the rule has none yet.
pub fn rule_repository_with_points(state: &State, rule: &RuleRow) -> Result<Repository> {
    rule_repository(state, rule)?.ok_or_else(|| {
        crate::error::refused(format!(
            "rule '{}' has no restore points yet (no backup completed)",
            rule.name
        ))
    })
}
