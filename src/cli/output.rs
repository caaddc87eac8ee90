//! Output for people (aligned tables, `key: value` blocks) and scripts (`--json`).
//!
//! JSON field names are part of the interface (documented in README.md); tables
//! are not meant to be parsed.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// Set once stdout cannot be written (its reader went away).
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Write one line of command output. When stdout's reader has gone away
/// (`vmbackup task list | head -1`), later output is dropped silently and the
/// command carries on: a backup is never abandoned because a pipe closed.
/// Every line the CLI prints to stdout goes through here (macro `out!`).
pub fn stdout_line(args: std::fmt::Arguments) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .is_err()
    {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Print a value as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => out!("{s}"),
        Err(e) => eprintln!("vmbackup: cannot encode JSON: {e}"),
    }
}

/// The result of an action command (`rule add`, `target remove`, ...): with
/// `--json`, `{"message": ..., <fields>}` (docs/JSON.md); otherwise the message,
/// unless `-q`.
pub fn print_done(json: bool, quiet: bool, message: &str, fields: serde_json::Value) {
    if json {
        let mut doc = serde_json::json!({ "message": message });
        if let (Some(d), serde_json::Value::Object(f)) = (doc.as_object_mut(), fields) {
            d.extend(f);
        }
        print_json(&doc);
    } else if !quiet {
        out!("{message}");
    }
}

/// A plain text table: a header row and aligned columns, two spaces apart.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let n = self.header.len();
        let mut width = vec![0usize; n];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(n) {
                if i + 1 == n {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}  ", w = width[i]));
                }
            }
            out!("{}", line.trim_end());
        }
    }
}

/// `yes` / `no`.
pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}
