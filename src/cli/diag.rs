//! Diagnostics on stderr through `tracing`: warnings always, `-v` adds debug
//! detail, `-vv` everything. Lines read `TIME vmbackup: LEVEL: message`; under
//! systemd's journal (`JOURNAL_STREAM` set) the time is left to the journal.
//!
//! Task log lines (R32) are not diagnostics: they go to the state store through
//! the runner and are shown by the CLI's task display.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Install the stderr subscriber for `verbose` (the count of `-v`).
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => Level::WARN,
        1 => Level::DEBUG,
        _ => Level::TRACE,
    };
    let format = Lines {
        timestamps: std::env::var_os("JOURNAL_STREAM").is_none(),
    };
    // A second call (tests calling `main` twice) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(format)
        .try_init();
}

/// `2026-12-03T08:30:00.123Z vmbackup: warning: message`.
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
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            write!(w, "{now} ")?;
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
