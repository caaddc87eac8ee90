//! Output for people (aligned tables, `key: value` blocks) and scripts (`--json`).
//!
//! JSON field names are part of the interface (documented in README.md); tables
//! are not meant to be parsed.

use std::borrow::Cow;
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
    write_lines(&mut std::io::stdout().lock(), [args]);
}

/// Print lines on stdout in one buffered write (a table of 10,000 rows is one
/// write, not 10,000).
fn stdout_lines(lines: impl IntoIterator<Item = impl std::fmt::Display>) {
    write_lines(
        &mut std::io::BufWriter::new(std::io::stdout().lock()),
        lines,
    );
}

/// Write `lines` to `out` and flush, stopping quietly once stdout is closed.
fn write_lines(out: &mut impl Write, lines: impl IntoIterator<Item = impl std::fmt::Display>) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let written = lines
        .into_iter()
        .try_for_each(|l| writeln!(out, "{l}"))
        .and_then(|()| out.flush());
    if written.is_err() {
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

/// `--no-header`: tables leave out their header line.
static NO_HEADER: AtomicBool = AtomicBool::new(false);

pub fn set_no_header(on: bool) {
    NO_HEADER.store(on, Ordering::Relaxed);
}

/// Columns a table may use: the terminal's width when stdout is one (`COLUMNS`
/// first, then the terminal's own size), else unlimited (a pipe to `awk`
/// gets whole cells).
fn table_width() -> Option<usize> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .or_else(|| {
            rustix::termios::tcgetwinsize(std::io::stdout())
                .ok()
                .map(|w| usize::from(w.ws_col))
        })
        .filter(|w| *w > 0)
}

/// Narrowest a column is cut to when the table is too wide.
const MIN_COLUMN: usize = 8;

/// A plain text table: a header row and aligned columns, two spaces apart. On a
/// terminal, long cells are cut (ending in `…`) so that rows fit its width.
pub struct Table<'a> {
    header: Vec<Cow<'a, str>>,
    rows: Vec<Vec<Cow<'a, str>>>,
}

impl<'a> Table<'a> {
    pub fn new(header: &[&str]) -> Table<'a> {
        Table {
            header: header.iter().map(|h| Cow::Owned(h.to_string())).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.into_iter().map(Cow::Owned).collect());
    }

    /// A row whose cells may borrow text that outlives the table (a listing
    /// of ten thousand VMs repeats each rule's name, target and policy).
    pub fn row_of(&mut self, cells: Vec<Cow<'a, str>>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        stdout_lines(self.lines(table_width(), NO_HEADER.load(Ordering::Relaxed)));
    }

    /// The table's lines, fitted to `width` columns when given.
    fn lines(&self, width: Option<usize>, no_header: bool) -> Vec<String> {
        let n = self.header.len();
        let mut widths = vec![0usize; n];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(text_width(c));
            }
        }
        if let Some(limit) = width {
            fit(&mut widths, limit);
        }
        let skip = usize::from(no_header);
        std::iter::once(&self.header)
            .chain(&self.rows)
            .skip(skip)
            .map(|r| {
                let mut line = String::with_capacity(widths.iter().sum::<usize>() + 2 * n);
                for (i, c) in r.iter().enumerate().take(n) {
                    let cell = cut(c, widths[i]);
                    line.push_str(&cell);
                    if i + 1 < n {
                        let pad = widths[i].saturating_sub(text_width(&cell)) + 2;
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                }
                line.truncate(line.trim_end().len());
                line
            })
            .collect()
    }
}

/// Narrow the widest columns, one character at a time, until the columns and
/// their two-space gaps fit `limit` (or every column is at [`MIN_COLUMN`]).
fn fit(widths: &mut [usize], limit: usize) {
    let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
    while total(widths) > limit {
        let Some((i, _)) = widths
            .iter()
            .enumerate()
            .filter(|(_, w)| **w > MIN_COLUMN)
            .max_by_key(|(_, w)| **w)
        else {
            return;
        };
        widths[i] -= 1;
    }
}

/// The characters in `text` (its bytes when ASCII, the common case, found
/// without decoding).
fn text_width(text: &str) -> usize {
    if text.is_ascii() {
        text.len()
    } else {
        text.chars().count()
    }
}

/// `cell` in at most `width` characters, ending in `…` when cut.
fn cut(cell: &str, width: usize) -> Cow<'_, str> {
    if text_width(cell) <= width {
        return Cow::Borrowed(cell);
    }
    let kept: String = cell.chars().take(width.saturating_sub(1)).collect();
    Cow::Owned(format!("{kept}…"))
}

/// `yes` / `no`.
pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_the_width_and_can_drop_their_header() {
        let mut t = Table::new(&["ID", "RULE", "WAITING FOR"]);
        t.row(vec![
            "1".into(),
            "web".into(),
            "waiting for a slot: 8 of 8 tasks running (bk_tsk_thd) and a very long explanation"
                .into(),
        ]);
        let whole = t.lines(None, false);
        assert!(whole[1].ends_with("explanation"), "{whole:?}");
        let fitted = t.lines(Some(40), false);
        assert!(fitted.iter().all(|l| l.chars().count() <= 40), "{fitted:?}");
        assert!(
            fitted[1].ends_with('…') && fitted[1].starts_with("1   web"),
            "{fitted:?}"
        );
        let bare = t.lines(Some(40), true);
        assert_eq!(bare.len(), 1);
        assert!(bare[0].starts_with("1 "));
        // Too narrow for every column: columns stop at their minimum.
        let tiny = t.lines(Some(5), false);
        assert!(tiny[1].contains('…'));
    }
}
