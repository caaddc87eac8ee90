//! Registered platforms (R2) and their cached VM inventory (R36).

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};

use super::State;
use crate::platform::{PlatformSpec, VmInfo};

/// A registered platform with its cached inventory (`platform show --json`
/// shapes it for scripts in cli/platform_cmd.rs).
#[derive(Debug, Clone)]
pub struct PlatformRow {
    pub name: String,
    /// Type and connection parameters.
    pub spec: PlatformSpec,
    pub created_at: String,
    pub refreshed_at: Option<String>,
    pub vms: Vec<VmInfo>,
}

impl PlatformRow {
    /// The cached VM called `name`.
    pub fn vm(&self, name: &str) -> Option<&VmInfo> {
        self.vms.iter().find(|v| v.name == name)
    }
}

fn from_row(r: &rusqlite::Row) -> rusqlite::Result<PlatformRow> {
    let spec: String = r.get(1)?;
    let inv: String = r.get(4)?;
    Ok(PlatformRow {
        name: r.get(0)?,
        spec: PlatformSpec::from_json(&spec).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into())
        })?,
        created_at: r.get(2)?,
        refreshed_at: r.get(3)?,
        vms: serde_json::from_str(&inv).unwrap_or_default(),
    })
}

const COLS: &str = "name, spec, created_at, refreshed_at, inventory";

impl State {
    pub fn platforms(&self) -> Result<Vec<PlatformRow>> {
        let mut st = self
            .conn()
            .prepare(&format!("SELECT {COLS} FROM platforms ORDER BY name"))?;
        let rows = st
            .query_map([], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn platform(&self, name: &str) -> Result<Option<PlatformRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM platforms WHERE name = ?1"),
                [name],
                from_row,
            )
            .optional()?)
    }

    /// The platform called `name`, or a validation error listing the registered ones (R2).
    pub fn require_platform(&self, name: &str) -> Result<PlatformRow> {
        match self.platform(name)? {
            Some(p) => Ok(p),
            None => Err(crate::error::invalid(
                "--platform",
                name,
                format!(
                    "not a registered platform (R2); registered: {}",
                    list_or_none(self.platforms()?.iter().map(|p| p.name.as_str()))
                ),
            )),
        }
    }

    /// Register a platform with its first inventory. Refuses a duplicate name, and
    /// a platform that reaches a VM another platform already reaches (the same
    /// identity: the same QMP directory or libvirt domain), R35.
    pub fn add_platform(&mut self, name: &str, spec: &PlatformSpec, vms: &[VmInfo]) -> Result<()> {
        let inv = serde_json::to_string(vms)?;
        self.write(|tx| {
            let exists: bool = tx.query_row("SELECT COUNT(*) > 0 FROM platforms WHERE name = ?1", [name], |r| r.get(0))?;
            if exists {
                return Err(crate::error::invalid("platform name", name, "already registered; pick another name"));
            }
            let mut st = tx.prepare("SELECT name, inventory FROM platforms ORDER BY name")?;
            let others = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (other, inventory) in others {
                let known: Vec<VmInfo> = serde_json::from_str(&inventory).unwrap_or_default();
                for vm in vms {
                    let Some(id) = &vm.identity else { continue };
                    if let Some(same) = known.iter().find(|k| k.identity.as_ref() == Some(id)) {
                        return Err(crate::error::refused(format!(
                            "VM '{}' ({id}) is already reached through platform '{other}' (as '{}'); \
                             a second platform on the same VMs would put them in two rules (R35)",
                            vm.name, same.name
                        )));
                    }
                }
            }
            let now = super::now_text();
            tx.execute(
                "INSERT INTO platforms (name, spec, created_at, refreshed_at, inventory) VALUES (?1, ?2, ?3, ?3, ?4)",
                params![name, spec.to_json(), now, inv],
            )?;
            Ok(())
        })
    }

    /// Replace the cached inventory (R36).
    pub fn set_inventory(&mut self, name: &str, vms: &[VmInfo]) -> Result<()> {
        let inv = serde_json::to_string(vms)?;
        self.write(|tx| {
            tx.execute(
                "UPDATE platforms SET inventory = ?2, refreshed_at = ?3 WHERE name = ?1",
                params![name, inv, super::now_text()],
            )
            .context("cannot store inventory")?;
            Ok(())
        })
    }

    /// Remove a platform; refused while a rule uses it.
    pub fn remove_platform(&mut self, name: &str) -> Result<()> {
        self.write(|tx| {
            let rules = names_using(
                tx,
                "SELECT name FROM rules WHERE platform = ?1 ORDER BY name",
                name,
            )?;
            if !rules.is_empty() {
                return Err(crate::error::refused(format!(
                    "platform '{name}' is used by rule(s) {}; remove those rules first",
                    rules.join(", ")
                )));
            }
            let n = tx.execute("DELETE FROM platforms WHERE name = ?1", [name])?;
            if n == 0 {
                return Err(crate::error::invalid(
                    "platform",
                    name,
                    "not a registered platform",
                ));
            }
            Ok(())
        })
    }
}

pub(crate) fn names_using(tx: &rusqlite::Transaction, sql: &str, arg: &str) -> Result<Vec<String>> {
    let mut st = tx.prepare(sql)?;
    let v = st
        .query_map([arg], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(v)
}

/// `a, b, c` or `(none)`.
pub fn list_or_none<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}
