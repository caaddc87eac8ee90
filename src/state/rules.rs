//! Backup rules and their VMs (R1-R10, R34, R35, R37, R43).
//!
//! Admission of a rule or a VM into a rule is decided here, once, inside one
//! IMMEDIATE transaction: the name is free (R1), the platform (R2) and target (R4)
//! are registered, each VM is in the platform's cached list (R3), no VM is already
//! in another rule (R35) and every disk of every VM can be covered by a snapshot
//! (R43). Policies and bandwidth windows arrive already validated (`crate::policy`).

use std::collections::HashMap;

use anyhow::Result;
use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;

use super::platforms::{list_or_none, PlatformRow};
use super::State;
use crate::error::{busy, invalid, refused};
use crate::platform::Quiesce;
use crate::policy::bandwidth::Window;
use crate::policy::Policy;
use crate::task::TaskKind;

/// Settings of a rule, as given to `rule add`.
#[derive(Debug, Clone, Serialize)]
pub struct RuleSettings {
    pub platform: String,
    pub target: String,
    /// Sub-directory of the target that holds this rule's repository (R5).
    pub subdir: String,
    /// R6: use CBT exactly when the VM supports it.
    pub auto_cbt: bool,
    /// R7: the user's own choice when `auto_cbt` is off.
    pub cbt: bool,
    pub lan_free: bool,
    pub delete_data: bool,
    /// R10: freeze guest file systems around the snapshot.
    pub quiesce: Quiesce,
    /// Back up through an NBD server the VM already runs on plain TCP, readable
    /// by anyone reaching its port during the backup (refused otherwise).
    pub allow_plain_tcp_export: bool,
    pub policy: Policy,
    pub bandwidth: Vec<Window>,
}

/// A VM of a rule and its per-VM state (`started`, `stopped`, `completed`).
#[derive(Debug, Clone, Serialize)]
pub struct RuleVm {
    pub vm: String,
    pub state: String,
    #[serde(rename = "added", serialize_with = "crate::timefmt::stored")]
    pub added_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleRow {
    pub name: String,
    #[serde(flatten)]
    pub settings: RuleSettings,
    #[serde(rename = "created", serialize_with = "crate::timefmt::stored")]
    pub created_at: String,
    /// The rule's own webhook: `None` uses system.conf's `notify_url`; `"none"`
    /// sends none for this rule.
    pub notify_url: Option<String>,
    /// The automatic offsite copy: every new point is copied to this target
    /// after its backup (`rule edit --copy-to`); `None`: no copy.
    pub copy_to: Option<String>,
    /// Periods (of the rule's schedules) of copied points the copy keeps;
    /// `None`: every copied point.
    pub copy_retention: Option<u32>,
    pub vms: Vec<RuleVm>,
}

impl RuleRow {
    /// A stand-in for the rule of a repository found on a target with no rule
    /// in the state (`restore --target`): named `TARGET:PATH` (never a rule's
    /// name, which has no ':'), on that target and path, for VMs of `platform`.
    /// It reads that repository and never creates one (it has no completed backup).
    pub fn found(target: &str, path: &str, platform: &str) -> RuleRow {
        RuleRow {
            name: format!("{target}:{path}"),
            settings: RuleSettings {
                platform: platform.to_string(),
                target: target.to_string(),
                subdir: path.to_string(),
                auto_cbt: true,
                cbt: true,
                lan_free: false,
                delete_data: false,
                quiesce: Quiesce::Off,
                allow_plain_tcp_export: false,
                policy: Policy::Periodic {
                    schedules: Vec::new(),
                    retention: None,
                },
                bandwidth: Vec::new(),
            },
            created_at: super::now_text(),
            notify_url: None,
            copy_to: None,
            copy_retention: None,
            vms: Vec::new(),
        }
    }

    pub fn has_vm(&self, vm: &str) -> bool {
        self.vms.iter().any(|v| v.vm == vm)
    }

    /// The VM called `vm`, or a validation error listing the rule's VMs.
    pub fn require_vm(&self, vm: &str) -> Result<&RuleVm> {
        self.vms.iter().find(|v| v.vm == vm).ok_or_else(|| {
            invalid(
                "--vm",
                vm,
                format!(
                    "not in rule '{}'; its VMs: {}",
                    self.name,
                    list_or_none(self.vms.iter().map(|v| v.vm.as_str()))
                ),
            )
        })
    }
}

/// `rules.quiesce` (INTEGER): 0 off, 1 require, 2 try (rows from before `try`
/// existed hold 0 or 1, which keep their meaning).
fn quiesce_to_sql(q: Quiesce) -> i64 {
    match q {
        Quiesce::Off => 0,
        Quiesce::Require => 1,
        Quiesce::Try => 2,
    }
}

fn quiesce_from_sql(v: i64) -> Quiesce {
    match v {
        0 => Quiesce::Off,
        2 => Quiesce::Try,
        _ => Quiesce::Require,
    }
}

const COLS: &str = "name, platform, target, subdir, auto_cbt, cbt, lan_free, delete_data, quiesce, policy, bandwidth, created_at, allow_plain_tcp_export";

fn from_row(r: &rusqlite::Row) -> rusqlite::Result<RuleRow> {
    let policy: String = r.get(9)?;
    let bandwidth: String = r.get(10)?;
    let bad = |e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(9, rusqlite::types::Type::Text, Box::new(e))
    };
    Ok(RuleRow {
        name: r.get(0)?,
        settings: RuleSettings {
            platform: r.get(1)?,
            target: r.get(2)?,
            subdir: r.get(3)?,
            auto_cbt: r.get(4)?,
            cbt: r.get(5)?,
            lan_free: r.get(6)?,
            delete_data: r.get(7)?,
            quiesce: quiesce_from_sql(r.get(8)?),
            allow_plain_tcp_export: r.get(12)?,
            policy: serde_json::from_str(&policy).map_err(bad)?,
            bandwidth: serde_json::from_str(&bandwidth).map_err(bad)?,
        },
        created_at: r.get(11)?,
        notify_url: r.get(13)?,
        copy_to: r.get(14)?,
        copy_retention: r.get(15)?,
        vms: Vec::new(),
    })
}

/// The columns [`rule_vm`] reads, after the rule's name.
const VM_COLS: &str = "rule, vm, state, added_at";

/// A `rule_vms` row read as [`VM_COLS`]: (rule, VM).
fn rule_vm(r: &rusqlite::Row) -> rusqlite::Result<(String, RuleVm)> {
    Ok((
        r.get(0)?,
        RuleVm {
            vm: r.get(1)?,
            state: r.get(2)?,
            added_at: r.get(3)?,
        },
    ))
}

fn load_vms(conn: &rusqlite::Connection, rule: &mut RuleRow) -> Result<()> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {VM_COLS} FROM rule_vms WHERE rule = ?1 ORDER BY vm"
    ))?;
    rule.vms = st
        .query_map([&rule.name], |r| Ok(rule_vm(r)?.1))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

impl State {
    pub fn rules(&self) -> Result<Vec<RuleRow>> {
        let mut st = self.conn().prepare(&format!(
            "SELECT {COLS}, notify_url, copy_to, copy_retention FROM rules ORDER BY name"
        ))?;
        let mut rules: Vec<RuleRow> = st
            .query_map([], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        // Every rule's VMs in one statement, not one per rule (listings).
        let mut st = self
            .conn()
            .prepare(&format!("SELECT {VM_COLS} FROM rule_vms ORDER BY rule, vm"))?;
        let mut vms: HashMap<String, Vec<RuleVm>> = HashMap::new();
        for row in st.query_map([], rule_vm)? {
            let (rule, vm) = row?;
            vms.entry(rule).or_default().push(vm);
        }
        for r in &mut rules {
            r.vms = vms.remove(&r.name).unwrap_or_default();
        }
        Ok(rules)
    }

    pub fn rule(&self, name: &str) -> Result<Option<RuleRow>> {
        let row = self
            .conn()
            .query_row(
                &format!(
                    "SELECT {COLS}, notify_url, copy_to, copy_retention FROM rules WHERE name = ?1"
                ),
                [name],
                from_row,
            )
            .optional()?;
        match row {
            Some(mut r) => {
                load_vms(self.conn(), &mut r)?;
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    /// The rule called `name`, or a validation error listing the existing ones.
    pub fn require_rule(&self, name: &str) -> Result<RuleRow> {
        match self.rule(name)? {
            Some(r) => Ok(r),
            None => Err(invalid(
                "rule",
                name,
                format!(
                    "no such rule; rules: {}",
                    list_or_none(self.rules()?.iter().map(|r| r.name.as_str()))
                ),
            )),
        }
    }

    /// The rule that protects VM `vm` of platform `platform` (R35).
    pub fn rule_of_vm(&self, platform: &str, vm: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT rule FROM rule_vms WHERE platform = ?1 AND vm = ?2",
                [platform, vm],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Create a rule with its VMs, all checks in one transaction (see module docs).
    pub fn add_rule(&mut self, name: &str, s: &RuleSettings, vms: &[String]) -> Result<()> {
        super::check_name("rule name", name)?;
        check_subdir(&s.subdir)?;
        if vms.is_empty() {
            return Err(invalid("--vm", "", "give at least one VM (R3)"));
        }
        let policy = serde_json::to_string(&s.policy)?;
        let bandwidth = serde_json::to_string(&s.bandwidth)?;
        let platform = self.require_platform(&s.platform)?;
        self.require_target(&s.target)?;
        self.write(|tx| {
            let exists: bool = tx.query_row("SELECT COUNT(*) > 0 FROM rules WHERE name = ?1", [name], |r| r.get(0))?;
            if exists {
                return Err(invalid("rule name", name, "a rule with this name exists; names are unique (R1)"));
            }
            for vm in vms {
                admit_vm(tx, name, &platform, vm)?;
            }
            tx.execute(
                &format!("INSERT INTO rules ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![name, s.platform, s.target, s.subdir, s.auto_cbt, s.cbt, s.lan_free, s.delete_data, quiesce_to_sql(s.quiesce), policy, bandwidth, super::now_text(), s.allow_plain_tcp_export],
            )?;
            for vm in vms {
                insert_vm(tx, name, &platform, vm)?;
            }
            Ok(())
        })
    }

    /// Add VMs to a rule; they inherit the rule's settings and policy (R34). All
    /// are admitted in one transaction: one refused VM adds none of them.
    pub fn add_rule_vms(&mut self, rule: &str, vms: &[String]) -> Result<()> {
        let r = self.require_rule(rule)?;
        let platform = self.require_platform(&r.settings.platform)?;
        self.write(|tx| {
            for vm in vms {
                admit_vm(tx, rule, &platform, vm)?;
                insert_vm(tx, rule, &platform, vm)?;
            }
            Ok(())
        })
    }

    /// Change only the policy and bandwidth windows of a rule (R34).
    pub fn edit_rule_policy(
        &mut self,
        rule: &str,
        policy: &Policy,
        bandwidth: &[Window],
    ) -> Result<()> {
        let p = serde_json::to_string(policy)?;
        let b = serde_json::to_string(bandwidth)?;
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE rules SET policy = ?2, bandwidth = ?3 WHERE name = ?1",
                params![rule, p, b],
            )?;
            if n == 0 {
                return Err(invalid("rule", rule, "no such rule"));
            }
            // A new one-time start re-arms VMs that had completed the old one.
            if matches!(policy, Policy::Once { .. }) {
                tx.execute(
                    "UPDATE rule_vms SET state = 'started' WHERE rule = ?1 AND state = 'completed'",
                    [rule],
                )?;
            }
            Ok(())
        })
    }

    /// The rule's own webhook setting (see [`RuleRow::notify_url`]).
    pub fn rule_notify_url(&self, rule: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT notify_url FROM rules WHERE name = ?1",
                [rule],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    /// Set the rule's webhook: a URL, `"none"`, or `None` for system.conf's.
    pub fn set_rule_notify_url(&mut self, rule: &str, url: Option<&str>) -> Result<()> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE rules SET notify_url = ?2 WHERE name = ?1",
                params![rule, url],
            )?;
            if n == 0 {
                return Err(invalid("rule", rule, "no such rule"));
            }
            Ok(())
        })
    }

    /// `--copy-to TO` for a rule on target `own`: a registered target other
    /// than `own`, encrypted exactly when `own` is (a copy keeps the source's
    /// key slots; a usage error listing the allowed ones otherwise).
    pub fn check_copy_target(&self, own: &str, to: &str) -> Result<()> {
        let encrypted = self.target(own)?.map(|t| t.key.is_some());
        let why = match self.target(to)? {
            _ if to == own => "is the rule's own target",
            None => "not a registered target",
            Some(t) if encrypted.is_some_and(|e| e != t.key.is_some()) => {
                if t.key.is_some() {
                    "is encrypted and the rule's target is not (a copy is encrypted exactly when its source is)"
                } else {
                    "is not encrypted and the rule's target is (a copy is encrypted exactly when its source is)"
                }
            }
            Some(_) => return Ok(()),
        };
        let others: Vec<_> = self
            .targets()?
            .into_iter()
            .filter(|t| encrypted.is_none_or(|e| e == t.key.is_some()))
            .collect();
        Err(invalid(
            "--copy-to",
            to,
            format!(
                "{why}; allowed: another registered target ({}), or none",
                list_or_none(others.iter().map(|t| t.name.as_str()).filter(|t| *t != own))
            ),
        ))
    }

    /// Set the rule's automatic copy: to target `to` (registered, not the
    /// rule's own) with `retention`, or none (`to` = `None`).
    pub fn set_rule_copy(
        &mut self,
        rule: &str,
        to: Option<&str>,
        retention: Option<u32>,
    ) -> Result<()> {
        let r = self.require_rule(rule)?;
        if let Some(to) = to {
            self.check_copy_target(&r.settings.target, to)?;
        }
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE rules SET copy_to = ?2, copy_retention = ?3 WHERE name = ?1",
                params![rule, to, retention],
            )?;
            if n == 0 {
                return Err(invalid("rule", rule, "no such rule"));
            }
            Ok(())
        })
    }

    /// Set the state of one VM or all VMs of a rule (`started`, `stopped`, `completed`).
    pub fn set_rule_vm_state(&mut self, rule: &str, vm: Option<&str>, state: &str) -> Result<()> {
        let r = self.require_rule(rule)?;
        if let Some(vm) = vm {
            r.require_vm(vm)?;
        }
        self.write(|tx| {
            match vm {
                Some(vm) => tx.execute(
                    "UPDATE rule_vms SET state = ?3 WHERE rule = ?1 AND vm = ?2",
                    params![rule, vm, state],
                )?,
                None => tx.execute(
                    "UPDATE rule_vms SET state = ?2 WHERE rule = ?1",
                    params![rule, state],
                )?,
            };
            Ok(())
        })
    }

    /// Refused (busy, exit 4) while a task of the rule (or of its VM `vm`) is
    /// queued, pending or running, or a recovery of it serves a point until
    /// it is stopped (R37): what `rule remove` checks before it deletes data.
    pub fn check_removable(&self, rule: &str, vm: Option<&str>) -> Result<()> {
        refuse_if_active(self.conn(), rule, vm)
    }

    /// Remove a rule, or one VM from it. Refused (busy, exit 4) while any task
    /// of the rule (or of that VM) is queued, pending or running: a backup, a
    /// restore (R37), a recovery. Removing the last VM removes the rule.
    pub fn remove_rule(&mut self, rule: &str, vm: Option<&str>) -> Result<()> {
        let r = self.require_rule(rule)?;
        if let Some(vm) = vm {
            r.require_vm(vm)?;
        }
        self.write(|tx| {
            refuse_if_active(tx, rule, vm)?;
            match vm {
                Some(vm) => {
                    tx.execute(
                        "DELETE FROM rule_vms WHERE rule = ?1 AND vm = ?2",
                        [rule, vm],
                    )?;
                    let left: i64 = tx.query_row(
                        "SELECT COUNT(*) FROM rule_vms WHERE rule = ?1",
                        [rule],
                        |r| r.get(0),
                    )?;
                    if left == 0 {
                        tx.execute("DELETE FROM rules WHERE name = ?1", [rule])?;
                    }
                }
                None => {
                    tx.execute("DELETE FROM rules WHERE name = ?1", [rule])?;
                }
            }
            Ok(())
        })
    }
}

/// [`State::check_removable`] on a connection or inside a transaction.
fn refuse_if_active(conn: &rusqlite::Connection, rule: &str, vm: Option<&str>) -> Result<()> {
    let Some((id, kind, v)) = active_task(conn, rule, vm)? else {
        return Ok(());
    };
    let how = if kind == TaskKind::Recovery {
        "stop it first with 'vmbackup recover stop'"
    } else {
        "wait for it or cancel it first"
    };
    Err(busy(format!(
        "rule '{rule}' has a {kind} in progress (task {id}, VM '{v}'); {how} (R37)"
    )))
}

/// The first active task of `rule` (of its VM `vm`, when given); a recovery
/// that serves a point until it is stopped counts as one.
fn active_task(
    conn: &rusqlite::Connection,
    rule: &str,
    vm: Option<&str>,
) -> Result<Option<(i64, TaskKind, String)>> {
    let mut st = conn.prepare(&format!(
        "SELECT id, kind, vm FROM tasks WHERE rule = ?1 AND state IN {}
         UNION ALL SELECT id, 'recovery', vm FROM recoveries WHERE rule = ?1 AND stage != 'stopped'
         ORDER BY 1",
        super::tasks::ACTIVE_STATES
    ))?;
    let rows = st
        .query_map([rule], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<Vec<(i64, TaskKind, String)>>>()?;
    // A repository task (GC, no VM) belongs to every VM of the rule.
    Ok(rows
        .into_iter()
        .find(|(_, _, v)| vm.is_none_or(|want| want == v || v.is_empty())))
}

/// Longest repository sub-directory (R5): a file name's limit, so it always
/// fits a path with the repository's own names below it.
pub const MAX_SUBDIR: usize = 255;

/// The repository sub-directory: relative, no `..`, names as for rules, at most
/// [`MAX_SUBDIR`] bytes (R5). It defaults to the rule's name, which is checked first.
fn check_subdir(subdir: &str) -> Result<()> {
    let ok = !subdir.is_empty()
        && subdir.len() <= MAX_SUBDIR
        && !subdir.starts_with('/')
        && subdir.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
        });
    if ok {
        Ok(())
    } else {
        Err(invalid("--path", subdir, format!("must be a relative sub-directory of the target of at most {MAX_SUBDIR} bytes (A-Z a-z 0-9 . _ - and /, no '..') (R5)")))
    }
}

/// Longest encoded VM or disk name: a file name (a VM's directory in the
/// repository, a disk's index file) must fit 255 bytes.
const MAX_ENCODED_NAME: usize = 250;

/// Checks R3, R35 and R43 for one VM joining `rule`.
fn admit_vm(tx: &Transaction, rule: &str, platform: &PlatformRow, vm: &str) -> Result<()> {
    let Some(info) = platform.vm(vm) else {
        return Err(invalid(
            "--vm",
            vm,
            format!(
                "not in the VM list of platform '{}' (R3); its VMs: {} (run 'vmbackup platform refresh {}' if it is new)",
                platform.name,
                list_or_none(platform.vms.iter().map(|v| v.name.as_str())),
                platform.name
            ),
        ));
    };
    if let Some(err) = &info.error {
        return Err(refused(format!("VM '{vm}' cannot be queried: {err}")));
    }
    let too_long = |name: &str| crate::repo::encode_name(name).len() > MAX_ENCODED_NAME;
    if too_long(vm) {
        return Err(invalid(
            "--vm",
            vm,
            format!("the name is too long to name a directory in the repository (at most {MAX_ENCODED_NAME} bytes once encoded; rename the VM)"),
        ));
    }
    if let Some(d) = info.disks.iter().find(|d| too_long(&d.name)) {
        return Err(refused(format!(
            "VM '{vm}' disk '{}': the name is too long to name a file in the repository (at most {MAX_ENCODED_NAME} bytes once encoded)",
            d.name
        )));
    }
    let owner: Option<String> = tx
        .query_row(
            "SELECT rule FROM rule_vms WHERE platform = ?1 AND vm = ?2",
            [&platform.name, vm],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(owner) = owner {
        let msg = if owner == rule {
            format!("VM '{vm}' is already in rule '{rule}'")
        } else {
            format!("VM '{vm}' is already protected by rule '{owner}'; a VM can be in one rule only (R35)")
        };
        return Err(refused(msg));
    }
    if let Some(id) = &info.identity {
        let other: Option<(String, String, String)> = tx
            .query_row(
                "SELECT rule, platform, vm FROM rule_vms WHERE identity = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        if let Some((owner, p, as_vm)) = other {
            return Err(refused(format!(
                "VM '{vm}' ({id}) is already protected by rule '{owner}' through platform '{p}' (as '{as_vm}'); a VM can be in one rule only (R35)"
            )));
        }
    }
    if let Some(d) = info.disks.iter().find(|d| d.uncoverable.is_some()) {
        return Err(refused(format!(
            "VM '{vm}' disk '{}' cannot be covered by a snapshot: {} (R43)",
            d.name,
            d.uncoverable.as_deref().unwrap_or_default()
        )));
    }
    Ok(())
}

fn insert_vm(tx: &Transaction, rule: &str, platform: &PlatformRow, vm: &str) -> Result<()> {
    let identity = platform.vm(vm).and_then(|v| v.identity.clone());
    tx.execute(
        "INSERT INTO rule_vms (rule, platform, vm, state, added_at, identity) VALUES (?1, ?2, ?3, 'started', ?4, ?5)",
        params![rule, platform.name, vm, super::now_text(), identity],
    )?;
    Ok(())
}
