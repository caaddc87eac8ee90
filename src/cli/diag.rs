//! Diagnostics on stderr through `tracing`: warnings always, `-v` adds debug
//! detail (QMP traffic, NBD negotiation, extents; secrets redacted by
//! `platform::redact`), `-vv` everything. Lines read `TIME vmbackup: LEVEL:
//! message`; under systemd's journal (`JOURNAL_STREAM` set) the time is left to
//! the journal. The CLI's own progress and daemon lines use [`stderr_line`],
//! which stamps them the same way.
//!
//! Task log lines (R32) are not diagnostics: they go to the state store through
//! the runner and are shown by the CLI's task display.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Whether stderr lines carry their own time (not under the journal, which
/// stamps them itself).
fn timestamps() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_none()
}

/// `TIME vmbackup: message` on stderr.
pub fn stderr_line(message: &str) {
    if timestamps() {
        eprintln!(
            "{} vmbackup: {message}",
            crate::timefmt::log_time(chrono::Utc::now())
        );
    } else {
        eprintln!("vmbackup: {message}");
    }
}

/// Install the stderr subscriber for `verbose` (the count of `-v`).
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => Level::WARN,
        1 => Level::DEBUG,
        _ => Level::TRACE,
    };
    let format = Lines {
        timestamps: timestamps(),
    };
    // A second call (tests calling `main` twice) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(format)
        .try_init();
}

/// `2026-12-03 09:30:00.123 +01:00 vmbackup: warning: message`.
struct Lines {
    timestamps: bool,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.timestamps {
            write!(w, "{} ", crate::timefmt::log_time(chrono::Utc::now()))?;
        }
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        write!(w, "vmbackup: {level}: ")?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}
