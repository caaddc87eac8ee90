//! Registered targets (R4): where backup repositories live, as a typed
//! [`TargetSpec`] (one JSON column), and the id of the marker `target add` /
//! `target mark` wrote there (`repo::target`).

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::platforms::{list_or_none, names_using};
use super::State;
use crate::repo::{KeySource, TargetSpec};

#[derive(Debug, Clone, Serialize)]
pub struct TargetRow {
    pub name: String,
    pub spec: TargetSpec,
    /// The id in the target's marker; `None` until `target mark` (targets
    /// registered before markers existed).
    pub marker_id: Option<String>,
    #[serde(rename = "created", serialize_with = "crate::timefmt::stored")]
    pub created_at: String,
    /// Where the key of an encrypted target comes from; `None`: unencrypted.
    pub key: Option<KeySource>,
}

const COLS: &str = "name, spec, marker_id, created_at, key";

fn from_row(r: &rusqlite::Row) -> rusqlite::Result<TargetRow> {
    let spec: String = r.get(1)?;
    let spec = serde_json::from_str(&spec).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(TargetRow {
        name: r.get(0)?,
        spec,
        marker_id: r.get(2)?,
        created_at: r.get(3)?,
        key: match r.get::<_, Option<String>>(4)? {
            None => None,
            Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    4,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?),
        },
    })
}

impl State {
    pub fn targets(&self) -> Result<Vec<TargetRow>> {
        let mut st = self
            .conn()
            .prepare(&format!("SELECT {COLS} FROM targets ORDER BY name"))?;
        let rows = st
            .query_map([], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn target(&self, name: &str) -> Result<Option<TargetRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM targets WHERE name = ?1"),
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

    pub fn add_target(
        &mut self,
        name: &str,
        spec: &TargetSpec,
        marker_id: &str,
        key: Option<&KeySource>,
    ) -> Result<()> {
        let spec = serde_json::to_string(spec).context("cannot serialize the target spec")?;
        let key = key.map(serde_json::to_string).transpose()?;
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
                &format!("INSERT INTO targets ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
                params![name, spec, marker_id, super::now_text(), key],
            )?;
            Ok(())
        })
    }

    /// Record the id of the marker found in or written into a target.
    pub fn set_target_marker(&mut self, name: &str, marker_id: &str) -> Result<()> {
        self.write(|tx| {
            if tx.execute(
                "UPDATE targets SET marker_id = ?2 WHERE name = ?1",
                params![name, marker_id],
            )? == 0
            {
                return Err(crate::error::invalid(
                    "target",
                    name,
                    "not a registered target",
                ));
            }
            Ok(())
        })
    }

    /// Remove a target; refused while a rule uses it.
    pub fn remove_target(&mut self, name: &str) -> Result<()> {
        self.write(|tx| {
            let rules = names_using(
                tx,
                "SELECT name FROM rules WHERE target = ?1 OR copy_to = ?1 ORDER BY name",
                name,
            )?;
            if !rules.is_empty() {
                return Err(crate::error::refused(format!(
                    "target '{name}' is used by rule(s) {} (as their target or --copy-to); remove those rules or their copy first",
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Migration 3 turns the `path` column of existing rows into a spec.
    #[test]
    fn existing_targets_keep_their_path_as_a_directory_spec() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        {
            let mut conn = rusqlite::Connection::open(&db).unwrap();
            super::super::schema::migrate_to(&mut conn, 2).unwrap();
            conn.execute(
                "INSERT INTO targets (name, path, created_at) VALUES ('nas', '/mnt/b''x', 'now')",
                [],
            )
            .unwrap();
        }
        let state = State::open(&db).unwrap();
        let t = state.require_target("nas").unwrap();
        assert_eq!(
            t.spec,
            TargetSpec::Directory {
                path: "/mnt/b'x".into()
            }
        );
        assert_eq!(t.marker_id, None);
    }
}
