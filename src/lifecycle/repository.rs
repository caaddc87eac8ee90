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

/// The repositories on a target and the VMs with points in each, found from
/// the target's layout alone (docs/FORMAT.md, "Layout"): a repository is a
/// path holding `vmbackup-repo.toml`, a VM's point is
/// `<repo>/vms/<platform>/<vm>/<point-id>/manifest.json`. One listing of the
/// whole target; nothing is created. Repository path → VM keys, sorted.
pub fn repositories_on(
    store: &dyn Store,
) -> Result<std::collections::BTreeMap<String, std::collections::BTreeSet<String>>> {
    use crate::repo::{check_vm_key, parse_point_id, CONFIG_FILE, MANIFEST_FILE};
    let mut configs = std::collections::BTreeSet::new();
    let mut vms: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    store.list("", &mut |info| {
        let parts: Vec<&str> = info.key.split('/').collect();
        let n = parts.len();
        if n >= 2 && parts[n - 1] == CONFIG_FILE {
            configs.insert(parts[..n - 1].join("/"));
        } else if n >= 6
            && parts[n - 1] == MANIFEST_FILE
            && parts[n - 5] == "vms"
            && parse_point_id(parts[n - 2]).is_ok()
        {
            let key = format!("{}/{}", parts[n - 4], parts[n - 3]);
            if check_vm_key(&key).is_ok() {
                vms.entry(parts[..n - 5].join("/")).or_default().insert(key);
            }
        }
        Ok(())
    })?;
    Ok(configs
        .into_iter()
        .map(|path| {
            let keys = vms.remove(&path).unwrap_or_default();
            (path, keys)
        })
        .collect())
}

/// `--vm PLATFORM/VM` of `points`/`restore --target`: the platform and VM names.
pub fn parse_platform_vm(text: &str) -> Result<(String, String)> {
    match text.split_once('/') {
        Some((p, v)) if !p.is_empty() && !v.is_empty() => Ok((p.to_string(), v.to_string())),
        _ => Err(crate::error::invalid(
            "--vm",
            text,
            "with --target, allowed PLATFORM/VM: the platform and VM names the points were made under (e.g. lab/web01)",
        )),
    }
}

/// A VM's repository on target `target` with no rule in the state (a new host
/// after losing the old one, `points`/`restore --target`): the one repository
/// of the target that holds points of `platform`/`vm`, or the one at `path`.
/// Returns the repository's path and the repository, opened with the target's
/// key; never creates anything.
pub fn found_repository(
    state: &State,
    target: &str,
    platform: &str,
    vm: &str,
    path: Option<&str>,
) -> Result<(String, Repository)> {
    let row = state.require_target(target).map_err(|_| {
        crate::error::invalid(
            "--target",
            target,
            format!(
                "not a registered target; registered: {} (register it again with 'vmbackup target add': it adopts the repositories there)",
                crate::state::platforms::list_or_none(
                    state.targets().unwrap_or_default().iter().map(|t| t.name.as_str())
                )
            ),
        )
    })?;
    let store = open_target(&row)?;
    let key = crate::repo::vm_key(platform, vm);
    let shown = format!("{platform}/{vm}");
    let found = repositories_on(store.as_ref())?;
    let holding: Vec<&String> = found
        .iter()
        .filter(|(p, keys)| keys.contains(&key) && path.is_none_or(|want| want == p.as_str()))
        .map(|(p, _)| p)
        .collect();
    let chosen = match (holding.as_slice(), path) {
        ([one], _) => (*one).clone(),
        ([], Some(want)) => {
            return Err(crate::error::invalid(
                "--path",
                want,
                format!(
                    "no repository with points of VM '{shown}' there; repositories of target '{target}': {}",
                    describe(&found)
                ),
            ))
        }
        ([], None) => {
            return Err(crate::error::invalid(
                "--vm",
                &shown,
                format!(
                    "no points of this VM on target '{target}'; repositories there and their VMs: {}",
                    describe(&found)
                ),
            ))
        }
        (many, _) => {
            return Err(crate::error::invalid(
                "--path",
                "",
                format!(
                    "VM '{shown}' has points in several repositories of target '{target}': {}; give --path with one of them",
                    many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ))
        }
    };
    let repo = Repository::open_keyed(store, &chosen, row.key.as_ref())?;
    Ok((chosen, repo))
}

/// `web (lab/web01, lab/web02); db (none)`, or `none`.
fn describe(
    found: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> String {
    if found.is_empty() {
        return "none".into();
    }
    found
        .iter()
        .map(|(p, keys)| {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            format!(
                "{p} ({})",
                if keys.is_empty() {
                    "no points".to_string()
                } else {
                    keys.join(", ")
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
