//! Registered targets (R4): directories that hold backup repositories.

use anyhow::Result;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::platforms::{list_or_none, names_using};
use super::State;

#[derive(Debug, Clone, Serialize)]
pub struct TargetRow {
    pub name: String,
    pub path: String,
    pub created_at: String,
}

fn from_row(r: &rusqlite::Row) -> rusqlite::Result<TargetRow> {
    Ok(TargetRow {
        name: r.get(0)?,
        path: r.get(1)?,
        created_at: r.get(2)?,
    })
}

impl State {
    pub fn targets(&self) -> Result<Vec<TargetRow>> {
        let mut st = self
            .conn()
            .prepare("SELECT name, path, created_at FROM targets ORDER BY name")?;
        let rows = st
            .query_map([], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn target(&self, name: &str) -> Result<Option<TargetRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, path, created_at FROM targets WHERE name = ?1",
                [name],
                from_row,
            )
            .optional()?)
    }

    /// The target called `name`, or a validation error listing the registered ones (R4).
    pub fn require_target(&self, name: &str) -> Result<TargetRow> {
        match self.target(name)? {
            Some(t) => Ok(t),
            None => Err(crate::error::invalid(
                "--target",
                name,
                format!(
                    "not a registered target (R4); registered: {}",
                    list_or_none(self.targets()?.iter().map(|t| t.name.as_str()))
                ),
            )),
        }
    }

    pub fn add_target(&mut self, name: &str, path: &str) -> Result<()> {
        self.write(|tx| {
            let exists: bool = tx.query_row(
                "SELECT COUNT(*) > 0 FROM targets WHERE name = ?1",
                [name],
                |r| r.get(0),
            )?;
            if exists {
                return Err(crate::error::invalid(
                    "target name",
                    name,
                    "already registered; pick another name",
                ));
            }
            tx.execute(
                "INSERT INTO targets (name, path, created_at) VALUES (?1, ?2, ?3)",
                params![name, path, super::now_text()],
            )?;
            Ok(())
        })
    }

    /// Remove a target; refused while a rule uses it.
    pub fn remove_target(&mut self, name: &str) -> Result<()> {
        self.write(|tx| {
            let rules = names_using(
                tx,
                "SELECT name FROM rules WHERE target = ?1 ORDER BY name",
                name,
            )?;
            if !rules.is_empty() {
                return Err(crate::error::refused(format!(
                    "target '{name}' is used by rule(s) {}; remove those rules first",
                    rules.join(", ")
                )));
            }
            if tx.execute("DELETE FROM targets WHERE name = ?1", [name])? == 0 {
                return Err(crate::error::invalid(
                    "target",
                    name,
                    "not a registered target",
                ));
            }
            Ok(())
        })
    }
}
