//! How the engine reports what it is doing (R30, R31) without knowing who listens.
//!
//! The runner records every event in the task's row and log (`runner::record`)
//! and hands it on to a display the CLI provides (terminal bars, JSON lines);
//! tests use [`Silent`].

use crate::level::Level;

/// The R31 phases a backup goes through, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Preparing,
    BackingUpConfig,
    QueryingChanges,
    CheckingData,
    Running,
}

impl Phase {
    /// The name stored in the task row and shown by `rule show` / `task list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::BackingUpConfig => "backing up VM configuration",
            Phase::QueryingChanges => "querying changed data",
            Phase::CheckingData => "checking data",
            Phase::Running => "running",
        }
    }
}

/// Severity of a task log line (R32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub const ALL: [LogLevel; 3] = [LogLevel::Info, LogLevel::Warn, LogLevel::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Receiver of engine events. Called from several threads at once.
pub trait Progress: Send + Sync {
    fn phase(&self, phase: Phase);
    /// The level the backup really runs at (after any fallback).
    fn level(&self, _level: Level) {}
    /// How many bytes this disk will read from the source.
    fn disk_total(&self, disk: &str, total: u64);
    /// `bytes` more were read from this disk.
    fn advance(&self, disk: &str, bytes: u64);
    fn log(&self, level: LogLevel, message: &str);
}

/// A [`Progress`] that ignores everything.
pub struct Silent;

impl Progress for Silent {
    fn phase(&self, _: Phase) {}
    fn disk_total(&self, _: &str, _: u64) {}
    fn advance(&self, _: &str, _: u64) {}
    fn log(&self, _: LogLevel, _: &str) {}
}
