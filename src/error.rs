//! Exit codes and the few typed errors that decide them.
//!
//! Policy (ripgrep's, adapted): modules return `anyhow::Result` with context that
//! names the object (`platform 'lab'`, `disk 'vda'`, `point 20261124T120000Z`).
//! Only three conditions need a type because they change the exit code:
//! [`Error::Invalid`] (bad input, exit 2, nothing changed), [`Error::Busy`] (a lock,
//! slot or overlapping run, exit 4) and [`Error::Interrupted`] (a signal, exit 130).
//! Everything else that fails is exit 3. `main` maps an error to its code once,
//! with [`exit_code_of`]; nothing deeper calls `std::process::exit`.

use std::fmt::Display;

/// The process exit codes, documented in README.md and the man page.
///
/// Ordered by severity, not by number, so the worst of several results is their
/// `max`: interrupted > failed > busy/skipped > usage > warning > ok. (A failed
/// VM must not hide behind another VM's skip.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// Everything asked for was done.
    Ok = 0,
    /// Done, with warnings (e.g. an incremental ran as a full, R26/R27).
    Warning = 1,
    /// Usage or validation error; nothing was changed.
    Usage = 2,
    /// A task or operation failed.
    Failed = 3,
    /// A lock or slot was held by someone else, or the run was skipped (R28).
    Busy = 4,
    /// Interrupted by SIGINT/SIGTERM.
    Interrupted = 130,
}

impl ExitCode {
    pub fn code(self) -> u8 {
        self as u8
    }

    fn severity(self) -> u8 {
        match self {
            ExitCode::Ok => 0,
            ExitCode::Warning => 1,
            ExitCode::Usage => 2,
            ExitCode::Busy => 3,
            ExitCode::Failed => 4,
            ExitCode::Interrupted => 5,
        }
    }
}

impl Ord for ExitCode {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.severity().cmp(&other.severity())
    }
}

impl PartialOrd for ExitCode {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Errors that carry their own exit code. Messages are one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: the message names the field, the value and what is allowed.
    #[error("{0}")]
    Invalid(String),
    /// Someone else holds what we need (lock, slot), or a run was skipped.
    #[error("{0}")]
    Busy(String),
    /// Stopped by a signal.
    #[error("interrupted")]
    Interrupted,
}

/// `invalid <field> '<value>': <allowed>` — the one shape of every validation error.
pub fn invalid(field: &str, value: impl Display, allowed: impl Display) -> anyhow::Error {
    Error::Invalid(format!("invalid {field} '{value}': {allowed}")).into()
}

/// A validation error whose message is already complete (e.g. a rule conflict).
pub fn refused(msg: impl Into<String>) -> anyhow::Error {
    Error::Invalid(msg.into()).into()
}

/// A lock, slot or overlap error (exit 4).
pub fn busy(msg: impl Into<String>) -> anyhow::Error {
    Error::Busy(msg.into()).into()
}

/// The exit code an error stands for: the first typed [`Error`] in its chain decides.
pub fn exit_code_of(err: &anyhow::Error) -> ExitCode {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<Error>() {
            return match e {
                Error::Invalid(_) => ExitCode::Usage,
                Error::Busy(_) => ExitCode::Busy,
                Error::Interrupted => ExitCode::Interrupted,
            };
        }
        if let Some(e) = cause.downcast_ref::<clap::Error>() {
            return if e.use_stderr() {
                ExitCode::Usage
            } else {
                ExitCode::Ok
            };
        }
    }
    ExitCode::Failed
}

/// True when the error chain contains [`Error::Interrupted`].
pub fn is_interrupted(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|c| matches!(c.downcast_ref::<Error>(), Some(Error::Interrupted)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn typed_error_decides_code_even_under_context() {
        let e = invalid("--retention", 65, "allowed 0..=64 (R15)");
        assert_eq!(exit_code_of(&e), ExitCode::Usage);
        let e: anyhow::Error = Err::<(), _>(busy("locked"))
            .context("rule 'r1'")
            .unwrap_err();
        assert_eq!(exit_code_of(&e), ExitCode::Busy);
        assert_eq!(exit_code_of(&anyhow::anyhow!("io")), ExitCode::Failed);
        // The worst of several results: a failure outranks a skip.
        assert_eq!(ExitCode::Busy.max(ExitCode::Failed), ExitCode::Failed);
        assert_eq!(
            ExitCode::Failed.max(ExitCode::Interrupted),
            ExitCode::Interrupted
        );
        assert_eq!(ExitCode::Ok.max(ExitCode::Warning), ExitCode::Warning);
        assert_eq!(
            invalid("--retention", 65, "allowed 0..=64").to_string(),
            "invalid --retention '65': allowed 0..=64"
        );
    }
}
