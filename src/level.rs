//! Backup levels (R14): what a point holds relative to earlier points.

use std::fmt;
use std::str::FromStr;

/// A backup level. A full holds every allocated block; an incremental the blocks
/// changed since the newest point; a differential those changed since the newest full.
/// Every point's index is complete either way (see docs/FORMAT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Full,
    Inc,
    Diff,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Full => "full",
            Level::Inc => "inc",
            Level::Diff => "diff",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Level> {
        match s {
            "full" => Ok(Level::Full),
            "inc" | "incremental" => Ok(Level::Inc),
            "diff" | "differential" => Ok(Level::Diff),
            _ => Err(crate::error::invalid(
                "level",
                s,
                "allowed: full, inc, diff",
            )),
        }
    }
}
