//! `system.conf`: the global limits (R38-R42), read once at start-up.
//!
//! Format: UTF-8 text (a leading byte order mark is ignored) of at most 1 MiB;
//! `key = value` lines (`key=value` too), `#` comments on their own line or after an
//! unquoted value, blank lines; a value may be in single or double quotes. Binary
//! content (invalid UTF-8, control characters) is refused. Keys, spelled exactly:
//!
//! | key | meaning | default | allowed |
//! |---|---|---|---|
//! | `bk_tsk_thd` | max concurrent tasks (R38) | 8 | integer >= 1 |
//! | `i2vp_transbuffer` | transfer block = chunk size (R39) | 4M | power of two, 64K..=32M; bare number = MiB |
//! | `Max_ThreadNum_PerHost` | max concurrent tasks per host (R42) | 4 | integer >= 1, <= `bk_tsk_thd` |
//! | `io_timeout` | how long a sent QMP command or NBD request may wait for its answer | 120 | 1 s..=1 day; `120`, `90s`, `2m` (a bare number is seconds) |
//!
//! and `bk_tsk_thd * i2vp_transbuffer <= 32 MiB` (R40). When `Max_ThreadNum_PerHost`
//! is not set and `bk_tsk_thd` is below its default 4, it defaults to `bk_tsk_thd`
//! instead, so that lowering one key alone stays valid. Every error is one line that
//! starts with `<path>:<line>:` and names the key, the value and what is allowed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::error::{invalid, refused};
use crate::units::{format_size, parse_size, KIB, MIB};

pub const KEY_TASKS: &str = "bk_tsk_thd";
pub const KEY_TRANSBUFFER: &str = "i2vp_transbuffer";
pub const KEY_PER_HOST: &str = "Max_ThreadNum_PerHost";
pub const KEY_IO_TIMEOUT: &str = "io_timeout";
const KNOWN_KEYS: [&str; 4] = [KEY_TASKS, KEY_TRANSBUFFER, KEY_PER_HOST, KEY_IO_TIMEOUT];

pub const DEFAULT_TASKS: u32 = 8;
pub const DEFAULT_TRANSBUFFER: u64 = 4 * MIB;
pub const DEFAULT_PER_HOST: u32 = 4;
pub const MIN_TRANSBUFFER: u64 = 64 * KIB;
pub const MAX_TRANSBUFFER: u64 = 32 * MIB;
/// Ceiling of `bk_tsk_thd * i2vp_transbuffer` (R40).
pub const MAX_BUFFERED: u64 = 32 * MIB;
/// How long a sent QMP command or NBD request may wait for its answer: a
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

/// The source of each setting of a [`SystemConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub bk_tsk_thd: Source,
    pub i2vp_transbuffer: Source,
    pub max_threads_per_host: Source,
    pub io_timeout: Source,
}

/// The global limits.
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
    pub sources: Sources,
}

impl Default for SystemConfig {
    fn default() -> SystemConfig {
        SystemConfig {
            bk_tsk_thd: DEFAULT_TASKS,
            i2vp_transbuffer: DEFAULT_TRANSBUFFER,
            max_threads_per_host: DEFAULT_PER_HOST,
            io_timeout: DEFAULT_IO_TIMEOUT,
            sources: Sources {
                bk_tsk_thd: Source::Default,
                i2vp_transbuffer: Source::Default,
                max_threads_per_host: Source::Default,
                io_timeout: Source::Default,
            },
        }
    }
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
    /// Display form: `8`, `4MiB`.
    pub value: String,
    /// The value as a number (bytes for sizes).
    pub bytes_or_number: u64,
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

    /// Parse system.conf text; `origin` names the file in messages and sources.
    pub fn parse(text: &str, origin: &Path) -> anyhow::Result<SystemConfig> {
        let mut config = SystemConfig::default();
        let mut seen: Vec<(&'static str, usize)> = Vec::new();
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
            if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
                return Err(at(refused(format!(
                    "duplicate key {key}, first set on line {first}"
                ))));
            }
            seen.push((key, line));
            let source = Source::File {
                path: origin.to_path_buf(),
                line,
            };
            match key {
                KEY_TASKS => {
                    config.bk_tsk_thd =
                        parse_count(key, value, "an integer >= 1 (R38)").map_err(at)?;
                    config.sources.bk_tsk_thd = source;
                }
                KEY_TRANSBUFFER => {
                    config.i2vp_transbuffer = parse_transbuffer(value).map_err(at)?;
                    config.sources.i2vp_transbuffer = source;
                }
                KEY_IO_TIMEOUT => {
                    config.io_timeout = parse_io_timeout(value).map_err(at)?;
                    config.sources.io_timeout = source;
                }
                _ => {
                    config.max_threads_per_host =
                        parse_count(key, value, "an integer >= 1, at most bk_tsk_thd (R42)")
                            .map_err(at)?;
                    config.sources.max_threads_per_host = source;
                }
            }
        }
        config.check_together(origin)?;
        Ok(config)
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
                self.sources.bk_tsk_thd,
                format_size(self.i2vp_transbuffer),
                self.sources.i2vp_transbuffer,
                format_size(buffered),
                format_size(MAX_BUFFERED),
                format_size(largest_power_of_two_at_most(fitting).max(MIN_TRANSBUFFER)),
            )));
        }
        if self.max_threads_per_host > self.bk_tsk_thd {
            if self.sources.max_threads_per_host == Source::Default {
                self.max_threads_per_host = self.bk_tsk_thd;
            } else {
                return Err(refused(format!(
                    "{}: invalid {KEY_PER_HOST} '{}': allowed at most {KEY_TASKS} = {} ({}) (R42)",
                    self.sources.max_threads_per_host,
                    self.max_threads_per_host,
                    self.bk_tsk_thd,
                    self.sources.bk_tsk_thd
                )));
            }
        }
        Ok(())
    }

    /// The settings, in file order, for `config show`.
    pub fn entries(&self) -> Vec<ConfigEntry> {
        vec![
            ConfigEntry {
                key: KEY_TASKS,
                value: self.bk_tsk_thd.to_string(),
                bytes_or_number: u64::from(self.bk_tsk_thd),
                source: self.sources.bk_tsk_thd.to_string(),
            },
            ConfigEntry {
                key: KEY_TRANSBUFFER,
                value: format_size(self.i2vp_transbuffer),
                bytes_or_number: self.i2vp_transbuffer,
                source: self.sources.i2vp_transbuffer.to_string(),
            },
            ConfigEntry {
                key: KEY_PER_HOST,
                value: self.max_threads_per_host.to_string(),
                bytes_or_number: u64::from(self.max_threads_per_host),
                source: self.sources.max_threads_per_host.to_string(),
            },
            ConfigEntry {
                key: KEY_IO_TIMEOUT,
                value: humantime::format_duration(self.io_timeout).to_string(),
                bytes_or_number: self.io_timeout.as_secs(),
                source: self.sources.io_timeout.to_string(),
            },
        ]
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
    if let Some(known) = KNOWN_KEYS.iter().find(|k| **k == key) {
        return Ok(known);
    }
    let hint = match KNOWN_KEYS.iter().find(|k| k.eq_ignore_ascii_case(key)) {
        Some(known) => format!(" (did you mean {known}? keys are case-sensitive)"),
        None => String::new(),
    };
    Err(refused(format!(
        "unknown key '{key}'{hint}; known keys: {}",
        KNOWN_KEYS.join(", ")
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
        for key in KNOWN_KEYS {
            let commented = format!("# {key} = ");
            assert!(example.contains(&commented), "{key} not documented");
        }
        for rid in ["R38", "R39", "R40", "R41", "R42"] {
            assert!(example.contains(rid), "{rid} not cited");
        }
        // Uncommenting every setting gives the defaults too.
        let mut uncommented = example.to_string();
        for key in KNOWN_KEYS {
            uncommented = uncommented.replace(&format!("# {key} = "), &format!("{key} = "));
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
        assert!(matches!(config.sources.bk_tsk_thd, Source::File { .. }));
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
        assert_eq!(config.sources.max_threads_per_host, Source::Default);
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

    #[test]
    fn unknown_key_named_with_known_ones() {
        let msg = error("bk_tsk_thd = 4\nthreads = 4");
        assert_eq!(
            msg,
            "/etc/vmbackup/system.conf:2: unknown key 'threads'; known keys: bk_tsk_thd, i2vp_transbuffer, Max_ThreadNum_PerHost, io_timeout"
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
        let shown: Vec<(&str, &str, u64, &str)> = entries
            .iter()
            .map(|e| {
                (
                    e.key,
                    e.value.as_str(),
                    e.bytes_or_number,
                    e.source.as_str(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("bk_tsk_thd", "8", 8, "default"),
                (
                    "i2vp_transbuffer",
                    "512KiB",
                    512 * KIB,
                    "/etc/vmbackup/system.conf:2"
                ),
                ("Max_ThreadNum_PerHost", "4", 4, "default"),
                ("io_timeout", "2m", 120, "default"),
            ]
        );
        let json = serde_json::to_string(&entries[1]).unwrap();
        assert_eq!(
            json,
            r#"{"key":"i2vp_transbuffer","value":"512KiB","bytes_or_number":524288,"source":"/etc/vmbackup/system.conf:2"}"#
        );
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
            config.sources.bk_tsk_thd,
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
