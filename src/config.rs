//! `system.conf`: the global limits (R38-R42) and monitoring (Prometheus
//! textfile, webhook, notify command), read once at start-up.
//!
//! Format: UTF-8 text (a leading byte order mark is ignored) of at most 1 MiB;
//! `key = value` lines (`key=value` too), `#` comments on their own line or after an
//! unquoted value, blank lines; a value may be in single or double quotes. Binary
//! content (invalid UTF-8, control characters) is refused.
//! Keys are spelled exactly as in [`KEYS`], the one table that documents them
//! (`config show`, the system.conf(5) man page and etc/system.conf.example are
//! checked against it).
//!
//! `bk_tsk_thd * i2vp_transbuffer <= 32 MiB` (R40). When `Max_ThreadNum_PerHost`
//! is not set and `bk_tsk_thd` is below its default 4, it defaults to `bk_tsk_thd`
//! instead, so that lowering one key alone stays valid. Every error is one line that
//! starts with `<path>:<line>:` and names the key, the value and what is allowed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::error::{invalid, refused};
use crate::repo::Compression;
use crate::units::{format_size, parse_size, KIB, MIB};

pub const KEY_TASKS: &str = "bk_tsk_thd";
pub const KEY_TRANSBUFFER: &str = "i2vp_transbuffer";
pub const KEY_PER_HOST: &str = "Max_ThreadNum_PerHost";
pub const KEY_IO_TIMEOUT: &str = "io_timeout";
pub const KEY_COMPRESSION: &str = "compression";
pub const KEY_PROMETHEUS: &str = "prometheus_textfile";
pub const KEY_NOTIFY_URL: &str = "notify_url";
pub const KEY_NOTIFY_ON: &str = "notify_on";
pub const KEY_NOTIFY_HEADER: &str = "notify_header_file";
pub const KEY_NOTIFY_COMMAND: &str = "notify_command";
pub const KEY_NOTIFY_TIMEOUT: &str = "notify_timeout";

/// One key of system.conf, documented.
#[derive(Debug, Clone, Copy)]
pub struct KeyDoc {
    pub key: &'static str,
    /// The default as written in the file (`-` for "not set").
    pub default: &'static str,
    pub allowed: &'static str,
    pub meaning: &'static str,
}

/// Every key, in file order: the one list of what system.conf accepts.
pub const KEYS: [KeyDoc; 11] = [
    KeyDoc {
        key: KEY_TASKS,
        default: "8",
        allowed: "an integer >= 1; bk_tsk_thd x i2vp_transbuffer <= 32 MiB",
        meaning: "Maximum number of tasks running at once on this host (backup, restore and migration tasks; not transient recovery). Tasks over the limit wait in state pending.",
    },
    KeyDoc {
        key: KEY_TRANSBUFFER,
        default: "4M",
        allowed: "a power of two from 64K to 32M; a bare number is MiB",
        meaning: "Transfer block size: how much one task reads, transfers and stores at a time; also the chunk size of a new repository.",
    },
    KeyDoc {
        key: KEY_PER_HOST,
        default: "4",
        allowed: "an integer >= 1, at most bk_tsk_thd",
        meaning: "Maximum number of tasks running at once against one virtualization host (defaults to bk_tsk_thd when that is lower).",
    },
    KeyDoc {
        key: KEY_IO_TIMEOUT,
        default: "120",
        allowed: "whole seconds from 1 to 86400: 120, 90s, 2m (a bare number is seconds)",
        meaning: "How long a sent QMP command, NBD request or libvirt call may wait for its answer before the hypervisor is taken to be stuck and the task fails cleanly. Time in a bandwidth pause window does not count.",
    },
    KeyDoc {
        key: KEY_COMPRESSION,
        default: "zstd",
        allowed: "zstd or none",
        meaning: "How backups store new chunks: zstd (level 1, only where it shrinks a chunk, each checked to decode before it is stored) or none (every chunk as it is: a full backup takes about half the CPU and stores more bytes; for few cores, or storage that compresses by itself). Restores, verify and copies read both forms.",
    },
    KeyDoc {
        key: KEY_PROMETHEUS,
        default: "-",
        allowed: "an absolute path in an existing directory, ending in .prom",
        meaning: "A Prometheus textfile (node_exporter's textfile collector) that every vmbackup process ending a task rewrites atomically with the metrics of every rule, mode 0644.",
    },
    KeyDoc {
        key: KEY_NOTIFY_URL,
        default: "-",
        allowed: "an http:// or https:// URL",
        meaning: "Webhook: a JSON POST for each event in notify_on (docs/JSON.md, Notifications). A rule may set its own (rule edit --notify-url).",
    },
    KeyDoc {
        key: KEY_NOTIFY_ON,
        default: "failure,fallback",
        allowed: "a comma-separated list of failure, fallback, success",
        meaning: "Which events notify: failure (a failed, interrupted or skipped task; damage found by verify), fallback (a backup that had to run as a full unexpectedly), success (a completed task).",
    },
    KeyDoc {
        key: KEY_NOTIFY_HEADER,
        default: "-",
        allowed: "a readable file whose first line is 'Header-Name: value'",
        meaning: "A secret header sent with every webhook, e.g. 'Authorization: Bearer ...'; kept out of system.conf so that file can stay world-readable.",
    },
    KeyDoc {
        key: KEY_NOTIFY_COMMAND,
        default: "-",
        allowed: "a shell command line",
        meaning: "A program run (with /bin/sh -c) for each event in notify_on, the same JSON on its standard input: sendmail and the like.",
    },
    KeyDoc {
        key: KEY_NOTIFY_TIMEOUT,
        default: "10s",
        allowed: "a duration from 1s to 60s (10s, 1m; a bare number is seconds)",
        meaning: "How long one webhook attempt or the notify command may take. A webhook is tried 3 times with backoff; notifications add at most 4 times this to a process's exit.",
    },
];

pub const DEFAULT_TASKS: u32 = 8;
pub const DEFAULT_TRANSBUFFER: u64 = 4 * MIB;
pub const DEFAULT_PER_HOST: u32 = 4;
pub const MIN_TRANSBUFFER: u64 = 64 * KIB;
pub const MAX_TRANSBUFFER: u64 = 32 * MIB;
/// Ceiling of `bk_tsk_thd * i2vp_transbuffer` (R40).
pub const MAX_BUFFERED: u64 = 32 * MIB;
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a sent QMP command, NBD request or libvirt call may wait for its answer: a
/// hypervisor that answers nothing for this long is taken to be stuck. Time a
/// task spends in a bandwidth pause does not count (no request is out).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_IO_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File { path: PathBuf, line: usize },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
        }
    }
}

/// Which events are notified (`notify_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyOn {
    /// Failed, interrupted or skipped tasks; damage found by verify.
    pub failure: bool,
    /// Backups that ran as a full unexpectedly.
    pub fallback: bool,
    /// Completed tasks.
    pub success: bool,
}

impl Default for NotifyOn {
    fn default() -> NotifyOn {
        NotifyOn {
            failure: true,
            fallback: true,
            success: false,
        }
    }
}

impl fmt::Display for NotifyOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<&str> = [
            (self.failure, "failure"),
            (self.fallback, "fallback"),
            (self.success, "success"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, w)| *w)
        .collect();
        f.write_str(&words.join(","))
    }
}

/// Monitoring and notification settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Monitoring {
    pub prometheus_textfile: Option<PathBuf>,
    pub notify_url: Option<String>,
    pub notify_on: NotifyOn,
    pub notify_header_file: Option<PathBuf>,
    pub notify_command: Option<String>,
    pub notify_timeout: Duration,
}

/// The global limits and monitoring settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemConfig {
    /// Max concurrent backup, restore and migration tasks (R38).
    pub bk_tsk_thd: u32,
    /// Transfer block and chunk size in bytes (R39).
    pub i2vp_transbuffer: u64,
    /// Max concurrent tasks per virtualization host (R42).
    pub max_threads_per_host: u32,
    /// The deadline of every QMP command and NBD request ([`DEFAULT_IO_TIMEOUT`]).
    pub io_timeout: Duration,
    /// How backups store new chunks and deltas.
    pub compression: Compression,
    pub monitoring: Monitoring,
    /// Where each key set in the file was set; keys not listed have their default.
    pub sources: BTreeMap<&'static str, Source>,
}

impl Default for SystemConfig {
    fn default() -> SystemConfig {
        SystemConfig {
            bk_tsk_thd: DEFAULT_TASKS,
            i2vp_transbuffer: DEFAULT_TRANSBUFFER,
            max_threads_per_host: DEFAULT_PER_HOST,
            io_timeout: DEFAULT_IO_TIMEOUT,
            compression: Compression::default(),
            monitoring: Monitoring {
                notify_timeout: DEFAULT_NOTIFY_TIMEOUT,
                ..Monitoring::default()
            },
            sources: BTreeMap::new(),
        }
    }
}

/// What [`KEYS`] says `key` allows (for errors that say no more than that).
fn allowed(key: &str) -> &'static str {
    KEYS.iter()
        .find(|k| k.key == key)
        .map_or("-", |k| k.allowed)
}

/// system.conf is read up to this size: a larger file, or one that never ends
/// (`/dev/zero`), is refused instead of filling memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// At most `MAX_FILE_BYTES + 1` bytes of `path` (one more tells "too large").
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// One setting as `config show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigEntry {
    pub key: &'static str,
    /// Display form: `8`, `4MiB`, a path; `null` when not set.
    pub value: Option<String>,
    /// The value as a number (bytes for sizes, seconds for durations); `null`
    /// for settings that are not numbers.
    pub number: Option<u64>,
    /// `default` or `<path>:<line>`.
    pub source: String,
}

impl SystemConfig {
    /// Read `path`. A missing file gives the defaults unless the path was given
    /// explicitly (`--config`), when it is an error.
    pub fn load(path: &Path, explicit: bool) -> anyhow::Result<SystemConfig> {
        let bytes = match read_bounded(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(SystemConfig::default())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(refused(format!(
                    "system.conf '{}' not found (given explicitly)",
                    path.display()
                )))
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading system.conf '{}'", path.display()))
            }
        };
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(refused(format!(
                "system.conf '{}' is larger than {} (a text file of a few lines is expected; is it the right file?)",
                path.display(),
                format_size(MAX_FILE_BYTES)
            )));
        }
        // A UTF-8 byte order mark (some editors write one) is not part of the text.
        let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            refused(format!(
                "{}:{line}: not text: invalid UTF-8 (system.conf holds 'key = value' lines)",
                path.display()
            ))
        })?;
        SystemConfig::parse(text, path)
    }

    /// Where `key`'s value came from.
    pub fn source(&self, key: &str) -> Source {
        self.sources.get(key).cloned().unwrap_or(Source::Default)
    }

    /// Parse system.conf text; `origin` names the file in messages and sources.
    pub fn parse(text: &str, origin: &Path) -> anyhow::Result<SystemConfig> {
        let mut config = SystemConfig::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let at = |err: anyhow::Error| refused(format!("{}:{line}: {err}", origin.display()));
            if let Some(c) = raw.chars().find(|c| c.is_control() && *c != '\t') {
                return Err(at(refused(format!(
                    "not text: control character U+{:04X} (system.conf holds 'key = value' lines)",
                    u32::from(c)
                ))));
            }
            let Some((key, value)) = split_line(raw).map_err(at)? else {
                continue;
            };
            let key = known_key(key).map_err(at)?;
            if let Some(Source::File { line: first, .. }) = config.sources.get(key) {
                return Err(at(refused(format!(
                    "duplicate key {key}, first set on line {first}"
                ))));
            }
            config.set(key, value).map_err(at)?;
            config.sources.insert(
                key,
                Source::File {
                    path: origin.to_path_buf(),
                    line,
                },
            );
        }
        config.check_together(origin)?;
        Ok(config)
    }

    /// Set one key from its text.
    fn set(&mut self, key: &'static str, value: &str) -> anyhow::Result<()> {
        match key {
            KEY_TASKS => self.bk_tsk_thd = parse_count(key, value, "an integer >= 1 (R38)")?,
            KEY_TRANSBUFFER => self.i2vp_transbuffer = parse_transbuffer(value)?,
            KEY_PER_HOST => {
                self.max_threads_per_host =
                    parse_count(key, value, "an integer >= 1, at most bk_tsk_thd (R42)")?
            }
            KEY_IO_TIMEOUT => self.io_timeout = parse_io_timeout(value)?,
            KEY_COMPRESSION => {
                self.compression = Compression::parse(value)
                    .ok_or_else(|| invalid(key, value, format!("allowed {}", allowed(key))))?
            }
            KEY_PROMETHEUS => self.monitoring.prometheus_textfile = Some(parse_textfile(value)?),
            KEY_NOTIFY_URL => self.monitoring.notify_url = Some(parse_url(key, value)?),
            KEY_NOTIFY_ON => self.monitoring.notify_on = parse_notify_on(value)?,
            KEY_NOTIFY_HEADER => {
                let path = PathBuf::from(value);
                read_header_file(&path).map_err(|e| invalid(key, value, format!("{e:#}")))?;
                self.monitoring.notify_header_file = Some(path);
            }
            KEY_NOTIFY_COMMAND => {
                if value.trim().is_empty() {
                    return Err(invalid(key, value, "allowed a shell command line"));
                }
                self.monitoring.notify_command = Some(value.to_string());
            }
            _ => self.monitoring.notify_timeout = parse_timeout(value)?,
        }
        Ok(())
    }

    /// R40 and R42, which tie the keys to each other.
    fn check_together(&mut self, origin: &Path) -> anyhow::Result<()> {
        let buffered = u64::from(self.bk_tsk_thd) * self.i2vp_transbuffer;
        if buffered > MAX_BUFFERED {
            let fitting = MAX_BUFFERED / u64::from(self.bk_tsk_thd);
            return Err(refused(format!(
                "{}: {KEY_TASKS} {} ({}) x {KEY_TRANSBUFFER} {} ({}) = {} exceeds {} (R40); lower one of them, e.g. {KEY_TRANSBUFFER} = {}",
                origin.display(),
                self.bk_tsk_thd,
                self.source(KEY_TASKS),
                format_size(self.i2vp_transbuffer),
                self.source(KEY_TRANSBUFFER),
                format_size(buffered),
                format_size(MAX_BUFFERED),
                format_size(largest_power_of_two_at_most(fitting).max(MIN_TRANSBUFFER)),
            )));
        }
        if self.max_threads_per_host > self.bk_tsk_thd {
            if self.source(KEY_PER_HOST) == Source::Default {
                self.max_threads_per_host = self.bk_tsk_thd;
            } else {
                return Err(refused(format!(
                    "{}: invalid {KEY_PER_HOST} '{}': allowed at most {KEY_TASKS} = {} ({}) (R42)",
                    self.source(KEY_PER_HOST),
                    self.max_threads_per_host,
                    self.bk_tsk_thd,
                    self.source(KEY_TASKS)
                )));
            }
        }
        Ok(())
    }

    /// The settings, in file order, for `config show`.
    pub fn entries(&self) -> Vec<ConfigEntry> {
        let m = &self.monitoring;
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        KEYS.iter()
            .map(|k| {
                let (value, number) = match k.key {
                    KEY_TASKS => (
                        Some(self.bk_tsk_thd.to_string()),
                        Some(u64::from(self.bk_tsk_thd)),
                    ),
                    KEY_TRANSBUFFER => (
                        Some(format_size(self.i2vp_transbuffer)),
                        Some(self.i2vp_transbuffer),
                    ),
                    KEY_PER_HOST => (
                        Some(self.max_threads_per_host.to_string()),
                        Some(u64::from(self.max_threads_per_host)),
                    ),
                    KEY_IO_TIMEOUT => (
                        Some(humantime::format_duration(self.io_timeout).to_string()),
                        Some(self.io_timeout.as_secs()),
                    ),
                    KEY_COMPRESSION => (Some(self.compression.as_str().to_string()), None),
                    KEY_PROMETHEUS => (path(&m.prometheus_textfile), None),
                    KEY_NOTIFY_URL => (m.notify_url.clone(), None),
                    KEY_NOTIFY_ON => (Some(m.notify_on.to_string()), None),
                    KEY_NOTIFY_HEADER => (path(&m.notify_header_file), None),
                    KEY_NOTIFY_COMMAND => (m.notify_command.clone(), None),
                    _ => (
                        Some(format!("{}s", m.notify_timeout.as_secs())),
                        Some(m.notify_timeout.as_secs()),
                    ),
                };
                ConfigEntry {
                    key: k.key,
                    value,
                    number,
                    source: self.source(k.key).to_string(),
                }
            })
            .collect()
    }
}

/// The secret header of `notify_header_file`: its first non-empty line,
/// `Name: value`.
pub fn read_header_file(path: &Path) -> anyhow::Result<(String, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    let Some((name, value)) = line.split_once(':') else {
        anyhow::bail!(
            "{}: the first line must be 'Header-Name: value'",
            path.display()
        );
    };
    let name = name.trim();
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if !ok || value.trim().is_empty() {
        anyhow::bail!(
            "{}: the first line must be 'Header-Name: value'",
            path.display()
        );
    }
    Ok((name.to_string(), value.trim().to_string()))
}

fn parse_textfile(value: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(value);
    let allowed = "allowed an absolute path in an existing directory, ending in .prom (node_exporter reads *.prom)";
    if !path.is_absolute() || path.extension().is_none_or(|e| e != "prom") {
        return Err(invalid(KEY_PROMETHEUS, value, allowed));
    }
    if !path.parent().is_some_and(Path::is_dir) {
        return Err(invalid(
            KEY_PROMETHEUS,
            value,
            "its directory does not exist (create it, or install node_exporter's textfile directory)",
        ));
    }
    Ok(path)
}

/// An `http://` or `https://` URL (also `rule edit --notify-url`).
pub fn parse_url(field: &str, value: &str) -> anyhow::Result<String> {
    match reqwest::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            Ok(value.to_string())
        }
        _ => Err(invalid(field, value, "allowed an http:// or https:// URL")),
    }
}

fn parse_notify_on(value: &str) -> anyhow::Result<NotifyOn> {
    let mut on = NotifyOn {
        failure: false,
        fallback: false,
        success: false,
    };
    for word in value.split(',').map(str::trim) {
        match word {
            "failure" => on.failure = true,
            "fallback" => on.fallback = true,
            "success" => on.success = true,
            _ => {
                return Err(invalid(
                    KEY_NOTIFY_ON,
                    value,
                    "allowed a comma-separated list of failure, fallback, success",
                ))
            }
        }
    }
    Ok(on)
}

fn parse_timeout(value: &str) -> anyhow::Result<Duration> {
    let parsed = match value.trim().parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(value.trim()).ok(),
    };
    match parsed {
        Some(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(60) && d.subsec_nanos() == 0 => Ok(d),
        _ => Err(invalid(
            KEY_NOTIFY_TIMEOUT,
            value,
            "allowed a whole number of seconds from 1s to 60s, e.g. 10s, 1m (a bare number is seconds)",
        )),
    }
}

/// `None` for blank and comment lines, else the key and the unquoted value.
fn split_line(raw: &str) -> anyhow::Result<Option<(&str, &str)>> {
    let line = raw.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let Some((key, rest)) = line.split_once('=') else {
        return Err(refused(format!("expected 'key = value', got '{line}'")));
    };
    let (key, rest) = (key.trim(), rest.trim());
    let value = match rest.chars().next() {
        Some(quote @ ('"' | '\'')) => {
            let inner = &rest[1..];
            let Some(close) = inner.find(quote) else {
                return Err(refused(format!(
                    "unterminated quote in value of {key}: {rest}"
                )));
            };
            let after = inner[close + 1..].trim();
            if !after.is_empty() && !after.starts_with('#') {
                return Err(refused(format!(
                    "unexpected text after the quoted value of {key}: {after}"
                )));
            }
            &inner[..close]
        }
        _ => rest.split('#').next().unwrap_or_default().trim(),
    };
    Ok(Some((key, value)))
}

fn known_key(key: &str) -> anyhow::Result<&'static str> {
    if let Some(known) = KEYS.iter().find(|k| k.key == key) {
        return Ok(known.key);
    }
    let hint = match KEYS.iter().find(|k| k.key.eq_ignore_ascii_case(key)) {
        Some(known) => format!(" (did you mean {}? keys are case-sensitive)", known.key),
        None => String::new(),
    };
    let all: Vec<&str> = KEYS.iter().map(|k| k.key).collect();
    Err(refused(format!(
        "unknown key '{key}'{hint}; known keys: {}",
        all.join(", ")
    )))
}

fn parse_count(key: &str, value: &str, allowed: &str) -> anyhow::Result<u32> {
    match value.parse::<u32>() {
        Ok(n) if n >= 1 && value.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(invalid(key, value, format!("allowed {allowed}"))),
    }
}

fn parse_transbuffer(value: &str) -> anyhow::Result<u64> {
    match parse_size(value, MIB) {
        Some(bytes)
            if bytes.is_power_of_two() && (MIN_TRANSBUFFER..=MAX_TRANSBUFFER).contains(&bytes) =>
        {
            Ok(bytes)
        }
        _ => Err(invalid(
            KEY_TRANSBUFFER,
            value,
            "allowed a power of two from 64K to 32M, e.g. 512K, 4M, 4MiB (a bare number is MiB) (R39)",
        )),
    }
}

/// `120` (seconds), `90s`, `2m`: whole seconds from 1 s to a day.
fn parse_io_timeout(value: &str) -> anyhow::Result<Duration> {
    let parsed = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value.parse::<u64>().ok().map(Duration::from_secs)
    } else {
        humantime::parse_duration(value).ok()
    };
    match parsed {
        Some(d) if d >= Duration::from_secs(1) && d <= MAX_IO_TIMEOUT && d.subsec_nanos() == 0 => {
            Ok(d)
        }
        _ => Err(invalid(
            KEY_IO_TIMEOUT,
            value,
            "allowed whole seconds from 1 to 86400, e.g. 120, 90s, 2m (a bare number is seconds)",
        )),
    }
}

fn largest_power_of_two_at_most(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        1 << (63 - n.leading_zeros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{exit_code_of, ExitCode};

    fn parse(text: &str) -> anyhow::Result<SystemConfig> {
        SystemConfig::parse(text, Path::new("/etc/vmbackup/system.conf"))
    }

    /// The error message, after checking it is a one-line usage error (exit 2).
    fn error(text: &str) -> String {
        let err = parse(text).expect_err(text);
        assert_eq!(exit_code_of(&err), ExitCode::Usage, "{err}");
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        msg
    }

    #[test]
    fn r38_r39_r42_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, SystemConfig::default());
        assert_eq!(config.bk_tsk_thd, 8);
        assert_eq!(config.i2vp_transbuffer, 4 * MIB);
        assert_eq!(config.max_threads_per_host, 4);
    }

    #[test]
    fn example_file_documents_every_key_at_its_default() {
        let example = include_str!("../etc/system.conf.example");
        let config = parse(example).unwrap();
        assert_eq!(config, SystemConfig::default());
        for key in KEYS.iter().map(|k| k.key) {
            let commented = format!("# {key} = ");
            assert!(example.contains(&commented), "{key} not documented");
        }
        for rid in ["R38", "R39", "R40", "R41", "R42"] {
            assert!(example.contains(rid), "{rid} not cited");
        }
        // Uncommenting every setting gives the defaults too.
        let mut uncommented = example.to_string();
        for k in KEYS.iter().filter(|k| k.default != "-") {
            uncommented = uncommented.replace(&format!("# {} = ", k.key), &format!("{} = ", k.key));
        }
        let config = parse(&uncommented).unwrap();
        assert_eq!(
            (
                config.bk_tsk_thd,
                config.i2vp_transbuffer,
                config.max_threads_per_host
            ),
            (8, 4 * MIB, 4)
        );
        assert!(matches!(config.source(KEY_TASKS), Source::File { .. }));
        assert_eq!(config.monitoring, SystemConfig::default().monitoring);
    }

    #[test]
    fn r39_transbuffer_spellings() {
        for (value, bytes) in [
            ("4", 4 * MIB),
            ("4M", 4 * MIB),
            ("4MiB", 4 * MIB),
            ("512K", 512 * KIB),
            ("64K", 64 * KIB),
            ("\"2M\"", 2 * MIB),
            ("'1MiB'", MIB),
            ("1M # one MiB", MIB),
        ] {
            let config = parse(&format!("i2vp_transbuffer = {value}")).unwrap();
            assert_eq!(config.i2vp_transbuffer, bytes, "{value}");
        }
        let config = parse("i2vp_transbuffer=32M\nbk_tsk_thd=1\nMax_ThreadNum_PerHost=1").unwrap();
        assert_eq!(config.i2vp_transbuffer, 32 * MIB);
    }

    #[test]
    fn r39_transbuffer_must_be_a_power_of_two_in_range() {
        for bad in ["3M", "32K", "64M", "0", "1.5M", "4X", ""] {
            let msg = error(&format!("\n# c\ni2vp_transbuffer = {bad}"));
            assert!(
                msg.starts_with(&format!(
                    "/etc/vmbackup/system.conf:3: invalid i2vp_transbuffer '{bad}': allowed a power of two from 64K to 32M"
                )),
                "{msg}"
            );
            assert!(msg.contains("(R39)"), "{msg}");
        }
    }

    #[test]
    fn r38_task_count_must_be_positive_integer() {
        for bad in ["0", "-1", "eight", "8.0", "+8", ""] {
            let msg = error(&format!("bk_tsk_thd = {bad}"));
            assert_eq!(
                msg,
                format!("/etc/vmbackup/system.conf:1: invalid bk_tsk_thd '{bad}': allowed an integer >= 1 (R38)")
            );
        }
        assert_eq!(parse("bk_tsk_thd = 2").unwrap().bk_tsk_thd, 2);
    }

    #[test]
    fn r40_tasks_times_buffer_at_most_32_mib() {
        assert!(parse("bk_tsk_thd = 8\ni2vp_transbuffer = 4M").is_ok());
        assert!(parse("bk_tsk_thd = 512\ni2vp_transbuffer = 64K").is_ok());
        let msg = error("bk_tsk_thd = 16");
        assert_eq!(
            msg,
            "/etc/vmbackup/system.conf: bk_tsk_thd 16 (/etc/vmbackup/system.conf:1) x i2vp_transbuffer 4MiB (default) = 64MiB exceeds 32MiB (R40); lower one of them, e.g. i2vp_transbuffer = 2MiB"
        );
        let msg = error("i2vp_transbuffer = 8M");
        assert!(msg.contains("= 64MiB exceeds 32MiB (R40)"), "{msg}");
        assert!(error("bk_tsk_thd = 4294967295").contains("(R40)"));
    }

    #[test]
    fn r42_per_host_at_most_tasks() {
        let msg = error("bk_tsk_thd = 2\nMax_ThreadNum_PerHost = 3");
        assert_eq!(
            msg,
            "/etc/vmbackup/system.conf:2: invalid Max_ThreadNum_PerHost '3': allowed at most bk_tsk_thd = 2 (/etc/vmbackup/system.conf:1) (R42)"
        );
        let config = parse("bk_tsk_thd = 2\nMax_ThreadNum_PerHost = 2").unwrap();
        assert_eq!(config.max_threads_per_host, 2);
        // Unset, the default 4 follows a lower bk_tsk_thd.
        let config = parse("bk_tsk_thd = 2").unwrap();
        assert_eq!(config.max_threads_per_host, 2);
        assert_eq!(config.source(KEY_PER_HOST), Source::Default);
        let msg = error("Max_ThreadNum_PerHost = 0");
        assert!(msg.contains("invalid Max_ThreadNum_PerHost '0'") && msg.contains("(R42)"));
    }

    #[test]
    fn io_timeout_spellings_and_limits() {
        assert_eq!(parse("").unwrap().io_timeout, Duration::from_secs(120));
        for (value, secs) in [
            ("2", 2),
            ("90s", 90),
            ("2m", 120),
            ("'1h'", 3600),
            ("86400", 86400),
        ] {
            let config = parse(&format!("io_timeout = {value}")).unwrap();
            assert_eq!(config.io_timeout, Duration::from_secs(secs), "{value}");
        }
        for bad in ["0", "0s", "500ms", "1.5", "2 days", "-1", "x", ""] {
            let msg = error(&format!("io_timeout = {bad}"));
            assert!(
                msg.starts_with(&format!("/etc/vmbackup/system.conf:1: invalid io_timeout '{bad}': allowed whole seconds from 1 to 86400")),
                "{msg}"
            );
        }
    }

    /// Every name of `Compression` is accepted and documented; anything else
    /// is refused naming the key and the allowed values.
    #[test]
    fn compression_values() {
        assert_eq!(parse("").unwrap().compression, Compression::Zstd);
        let doc = KEYS.iter().find(|k| k.key == KEY_COMPRESSION).unwrap();
        for (mode, name) in Compression::ALL {
            let config = parse(&format!("compression = {name}")).unwrap();
            assert_eq!(config.compression, mode);
            assert!(doc.allowed.contains(name), "{name} documented");
        }
        for bad in ["lz4", "ZSTD", "off", ""] {
            let msg = error(&format!("compression = {bad}"));
            assert_eq!(
                msg,
                format!("/etc/vmbackup/system.conf:1: invalid compression '{bad}': allowed zstd or none")
            );
        }
    }

    #[test]
    fn unknown_key_named_with_known_ones() {
        let msg = error("bk_tsk_thd = 4\nthreads = 4");
        assert_eq!(
            msg,
            "/etc/vmbackup/system.conf:2: unknown key 'threads'; known keys: bk_tsk_thd, i2vp_transbuffer, Max_ThreadNum_PerHost, io_timeout, compression, prometheus_textfile, notify_url, notify_on, notify_header_file, notify_command, notify_timeout"
        );
        let msg = error("max_threadnum_perhost = 4");
        assert!(msg.contains("did you mean Max_ThreadNum_PerHost?"), "{msg}");
    }

    #[test]
    fn duplicate_key_refused() {
        let msg = error("bk_tsk_thd = 4\n\nbk_tsk_thd=6");
        assert_eq!(
            msg,
            "/etc/vmbackup/system.conf:3: duplicate key bk_tsk_thd, first set on line 1"
        );
    }

    #[test]
    fn malformed_lines_refused() {
        let msg = error("# ok\nbk_tsk_thd 4");
        assert_eq!(
            msg,
            "/etc/vmbackup/system.conf:2: expected 'key = value', got 'bk_tsk_thd 4'"
        );
        let msg = error("i2vp_transbuffer = \"4M");
        assert!(msg.contains(":1: unterminated quote"), "{msg}");
        let msg = error("i2vp_transbuffer = \"4M\" 5");
        assert!(
            msg.contains(":1: unexpected text after the quoted value"),
            "{msg}"
        );
    }

    #[test]
    fn entries_show_values_and_sources() {
        let config = parse("\ni2vp_transbuffer = 512K\n").unwrap();
        let entries = config.entries();
        let shown: Vec<(&str, Option<&str>, Option<u64>, &str)> = entries
            .iter()
            .map(|e| (e.key, e.value.as_deref(), e.number, e.source.as_str()))
            .collect();
        assert_eq!(
            shown[..3],
            [
                ("bk_tsk_thd", Some("8"), Some(8), "default"),
                (
                    "i2vp_transbuffer",
                    Some("512KiB"),
                    Some(512 * KIB),
                    "/etc/vmbackup/system.conf:2"
                ),
                ("Max_ThreadNum_PerHost", Some("4"), Some(4), "default"),
            ]
        );
        assert_eq!(entries.len(), KEYS.len());
        assert_eq!(shown[3], ("io_timeout", Some("2m"), Some(120), "default"));
        assert_eq!(shown[4], ("compression", Some("zstd"), None, "default"));
        assert_eq!(shown[5], ("prometheus_textfile", None, None, "default"));
        assert_eq!(
            shown[7],
            ("notify_on", Some("failure,fallback"), None, "default")
        );
        assert_eq!(
            shown[10],
            ("notify_timeout", Some("10s"), Some(10), "default")
        );
        let json = serde_json::to_string(&entries[1]).unwrap();
        assert_eq!(
            json,
            r#"{"key":"i2vp_transbuffer","value":"512KiB","number":524288,"source":"/etc/vmbackup/system.conf:2"}"#
        );
    }

    #[test]
    fn monitoring_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let prom = dir.path().join("vmbackup.prom");
        let header = dir.path().join("header");
        std::fs::write(&header, "Authorization: Bearer s3cret\n").unwrap();
        let text = format!(
            "prometheus_textfile = {}\nnotify_url = https://hooks.example/x\nnotify_on = failure,success\nnotify_header_file = {}\nnotify_command = mail -s vmbackup root\nnotify_timeout = 3s\n",
            prom.display(),
            header.display()
        );
        let config = parse(&text).unwrap();
        let m = &config.monitoring;
        assert_eq!(m.prometheus_textfile.as_deref(), Some(prom.as_path()));
        assert_eq!(m.notify_url.as_deref(), Some("https://hooks.example/x"));
        assert_eq!(
            m.notify_on,
            NotifyOn {
                failure: true,
                fallback: false,
                success: true
            }
        );
        assert_eq!(m.notify_command.as_deref(), Some("mail -s vmbackup root"));
        assert_eq!(m.notify_timeout, Duration::from_secs(3));
        assert_eq!(
            read_header_file(&header).unwrap(),
            ("Authorization".to_string(), "Bearer s3cret".to_string())
        );
        for (bad, needle) in [
            (
                "prometheus_textfile = relative.prom",
                "invalid prometheus_textfile",
            ),
            (
                "prometheus_textfile = /no/such/dir/x.prom",
                "directory does not exist",
            ),
            ("notify_url = ftp://x/", "invalid notify_url 'ftp://x/'"),
            ("notify_url = not a url", "http:// or https://"),
            (
                "notify_on = failure,sometimes",
                "failure, fallback, success",
            ),
            ("notify_timeout = 0", "invalid notify_timeout"),
            ("notify_timeout = 2m", "1s to 60s"),
            (
                "notify_header_file = /no/such/file",
                "invalid notify_header_file",
            ),
        ] {
            let msg = error(bad);
            assert!(msg.contains(needle), "{bad}: {msg}");
        }
        std::fs::write(&header, "no colon here\n").unwrap();
        let msg = error(&format!("notify_header_file = {}", header.display()));
        assert!(msg.contains("Header-Name: value"), "{msg}");
    }

    #[test]
    fn load_missing_file_defaults_unless_explicit() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("system.conf");
        assert_eq!(
            SystemConfig::load(&missing, false).unwrap(),
            SystemConfig::default()
        );
        let err = SystemConfig::load(&missing, true).unwrap_err();
        assert_eq!(exit_code_of(&err), ExitCode::Usage);
        assert!(err.to_string().contains("not found"), "{err}");
        std::fs::write(&missing, "bk_tsk_thd = 2\n").unwrap();
        let config = SystemConfig::load(&missing, true).unwrap();
        assert_eq!(config.bk_tsk_thd, 2);
        assert_eq!(
            config.source(KEY_TASKS),
            Source::File {
                path: missing.clone(),
                line: 1
            }
        );
        // A directory is not a file: an I/O failure naming the path (exit 3).
        let err = SystemConfig::load(dir.path(), false).unwrap_err();
        assert_eq!(exit_code_of(&err), ExitCode::Failed);
        assert!(
            format!("{err:#}").contains("reading system.conf"),
            "{err:#}"
        );
    }
}
