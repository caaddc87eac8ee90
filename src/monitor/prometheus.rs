//! The Prometheus textfile (node_exporter's textfile collector format): the
//! state of every rule's VMs, rendered from the state store alone and written
//! atomically, mode 0644, by whichever process ends a task.
//!
//! Metric names carry the `vmbackup_` prefix and their unit; every series has
//! the labels `rule` and `vm`. README "Monitoring" shows an alert on
//! `time() - vmbackup_last_success_timestamp_seconds`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::state::State;
use crate::timefmt;

/// One metric: name, type, help, and a value per (rule, VM) when it has one.
struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    values: Vec<(String, String, f64)>,
}

/// The text of the file for the current state.
pub fn render(state: &State) -> Result<String> {
    let figures = state.figures(None, None)?;
    let mut metrics = [
        Metric {
            name: "vmbackup_last_success_timestamp_seconds",
            kind: "gauge",
            help: "Unix time the VM's last successful backup finished (0: never).",
            values: Vec::new(),
        },
        Metric {
            name: "vmbackup_last_duration_seconds",
            kind: "gauge",
            help: "How long the VM's last successful backup took.",
            values: Vec::new(),
        },
        Metric {
            name: "vmbackup_bytes_read_total",
            kind: "counter",
            help: "Bytes read from the VM's disks by completed backups.",
            values: Vec::new(),
        },
        Metric {
            name: "vmbackup_bytes_stored_total",
            kind: "counter",
            help: "Bytes of new data completed backups wrote to the target (after dedup and compression).",
            values: Vec::new(),
        },
        Metric {
            name: "vmbackup_task_failures_total",
            kind: "counter",
            help: "Failed or interrupted tasks of the VM, of every kind.",
            values: Vec::new(),
        },
        Metric {
            name: "vmbackup_unviewed_failures",
            kind: "gauge",
            help: "Failed tasks not yet viewed with 'vmbackup stats'.",
            values: Vec::new(),
        },
        Metric {
            name: "vmbackup_points",
            kind: "gauge",
            help: "Restore points of the VM in its repository.",
            values: Vec::new(),
        },
        Metric {
            name: "vmbackup_tasks_running",
            kind: "gauge",
            help: "Tasks of the VM running now.",
            values: Vec::new(),
        },
        Metric {
            name: "vmbackup_last_verify_timestamp_seconds",
            kind: "gauge",
            help: "Unix time 'vmbackup verify' last checked the VM's points.",
            values: Vec::new(),
        },
        Metric {
            name: "vmbackup_damaged_points",
            kind: "gauge",
            help: "Points with missing or corrupt chunks found by the last verify.",
            values: Vec::new(),
        },
    ];
    let unix = |text: &str| timefmt::parse(text).map(|t| t.timestamp_millis() as f64 / 1000.0);
    for rule in state.rules()? {
        let unviewed = state.unviewed_failures(&rule.name, None)?;
        for v in &rule.vms {
            let f = figures
                .get(&(rule.name.clone(), v.vm.clone()))
                .cloned()
                .unwrap_or_default();
            let status = state.vm_status(&rule.name, &v.vm)?;
            let mut put = |i: usize, value: f64| {
                metrics[i]
                    .values
                    .push((rule.name.clone(), v.vm.clone(), value));
            };
            let (started, finished) = match &f.last_backup {
                Some((s, f)) => (s.as_deref().and_then(unix), unix(f)),
                None => (None, None),
            };
            put(0, finished.unwrap_or(0.0));
            if let (Some(s), Some(f)) = (started, finished) {
                put(1, (f - s).max(0.0));
            }
            put(2, f.bytes_read as f64);
            put(3, f.bytes_written as f64);
            put(4, f.failures as f64);
            put(5, unviewed.get(&v.vm).copied().unwrap_or(0) as f64);
            if let Some(points) = status.points {
                put(6, points as f64);
            }
            put(7, f.running as f64);
            if let Some(at) = status.last_verify.as_deref().and_then(unix) {
                put(8, at);
                put(9, status.damaged_points.unwrap_or(0) as f64);
            }
        }
    }
    let mut out = String::new();
    for m in &metrics {
        let _ = writeln!(out, "# HELP {} {}", m.name, m.help);
        let _ = writeln!(out, "# TYPE {} {}", m.name, m.kind);
        for (rule, vm, value) in &m.values {
            let _ = writeln!(
                out,
                "{}{{rule=\"{}\",vm=\"{}\"}} {value}",
                m.name,
                escape(rule),
                escape(vm)
            );
        }
    }
    Ok(out)
}

/// A label value in the exposition format: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Render and write the file at `path` atomically, mode 0644 (node_exporter
/// runs as another user): staged as a hidden `.<name>.tmp-<pid>-<n>` (created
/// `O_EXCL|O_NOFOLLOW`; node_exporter reads only `*.prom`), fsynced, renamed
/// over the file, directory fsynced.
pub fn write(state: &State, path: &Path) -> Result<()> {
    let text = render(state)?;
    write_atomically(path, text.as_bytes())
        .with_context(|| format!("prometheus_textfile {}", path.display()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().context("no directory")?;
    let name = path
        .file_name()
        .context("no file name")?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:x}",
        std::process::id(),
        crate::repo::store::unique_u64()
    ));
    let staged = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        // Exactly 0644 whatever the umask.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if staged.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    staged?;
    crate::repo::store::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn the_file_is_replaced_atomically_with_mode_0644() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmbackup.prom");
        write_atomically(&path, b"a 1\n").unwrap();
        write_atomically(&path, b"a 2\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vmbackup.prom")]);
    }

    #[test]
    fn an_empty_state_renders_help_and_type_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("state.db")).unwrap();
        let text = render(&state).unwrap();
        assert_eq!(text.lines().count(), 20, "{text}");
        assert!(text
            .lines()
            .all(|l| l.starts_with("# HELP vmbackup_") || l.starts_with("# TYPE vmbackup_")));
    }
}
