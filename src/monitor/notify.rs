//! Notifications: one JSON document per event (docs/JSON.md, "Notifications"),
//! POSTed to a webhook and/or piped into a command (`notify_command`).
//!
//! A webhook gets up to [`ATTEMPTS`] attempts of `timeout` each, with backoff
//! (timeout/10, then timeout/5) between them; it is retried on connection
//! errors, timeouts, 408, 429 and 5xx answers. The command runs once, killed
//! after `timeout`. Neither ever fails a task: a failure is a warning (stderr
//! through `tracing`, and the task's log when there is a task).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::state::tasks::TaskRow;
use crate::task::TaskState;

/// Webhook attempts per notification.
pub const ATTEMPTS: u32 = 3;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// A task failed.
    Failed,
    /// A task was interrupted: by a signal, `task cancel`, or its process died.
    Interrupted,
    /// A run was skipped because the VM's previous task was still active (R28).
    Skipped,
    /// A backup had to run as a full for an unexpected reason (tracking lost,
    /// base missing while points exist).
    Fallback,
    /// `verify` found points with missing or corrupt chunks.
    Damaged,
    /// A task completed.
    Completed,
    /// `vmbackup notify test`.
    Test,
}

/// The `notify_on` group an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Failure,
    Fallback,
    Success,
    /// Sent whatever `notify_on` says.
    Always,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Failed => "failed",
            Event::Interrupted => "interrupted",
            Event::Skipped => "skipped",
            Event::Fallback => "fallback",
            Event::Damaged => "damaged",
            Event::Completed => "completed",
            Event::Test => "test",
        }
    }

    pub fn group(self) -> Group {
        match self {
            Event::Failed | Event::Interrupted | Event::Skipped | Event::Damaged => Group::Failure,
            Event::Fallback => Group::Fallback,
            Event::Completed => Group::Success,
            Event::Test => Group::Always,
        }
    }

    /// The event of a task that ended in `status`; `unexpected_full` is the
    /// reason a completed backup ran as a full unexpectedly.
    pub fn of_end(status: TaskState, unexpected_full: bool) -> Option<Event> {
        match status {
            TaskState::Completed if unexpected_full => Some(Event::Fallback),
            TaskState::Completed => Some(Event::Completed),
            TaskState::Failed => Some(Event::Failed),
            TaskState::Interrupted => Some(Event::Interrupted),
            TaskState::Skipped => Some(Event::Skipped),
            _ => None,
        }
    }
}

/// The document sent (docs/JSON.md, "Notifications"). Every field is present.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub event: Event,
    #[serde(with = "crate::timefmt::json")]
    pub time: DateTime<Utc>,
    /// The backup host's name.
    pub host: String,
    pub rule: Option<String>,
    pub vm: Option<String>,
    pub task: Option<i64>,
    /// `backup`, `restore`, or `verify` for damage found by verify.
    pub kind: Option<String>,
    pub status: Option<crate::task::TaskState>,
    /// The level a backup asked for.
    pub level: Option<String>,
    pub point: Option<String>,
    /// What went wrong (or why a backup ran as a full), in one line.
    pub error: Option<String>,
    #[serde(with = "crate::timefmt::json_opt")]
    pub started: Option<DateTime<Utc>>,
    #[serde(with = "crate::timefmt::json_opt")]
    pub finished: Option<DateTime<Utc>>,
    pub exit_code: Option<u8>,
}

/// This host's name, for the `host` field.
pub fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

impl Notification {
    /// An event with no task (verify damage, a test).
    pub fn new(event: Event) -> Notification {
        Notification {
            event,
            time: Utc::now(),
            host: host_name(),
            rule: None,
            vm: None,
            task: None,
            kind: None,
            status: None,
            level: None,
            point: None,
            error: None,
            started: None,
            finished: None,
            exit_code: None,
        }
    }

    /// The event of a task, from its (ended) row.
    pub fn of_task(event: Event, row: &TaskRow, exit_code: Option<u8>) -> Notification {
        let time = |t: &Option<String>| t.as_deref().and_then(crate::timefmt::parse);
        Notification {
            rule: Some(row.rule.clone()),
            vm: Some(row.vm.clone()),
            task: Some(row.id),
            kind: Some(row.kind.to_string()),
            status: Some(row.state),
            level: row.level.clone(),
            point: row.point.clone(),
            error: row.message.clone(),
            started: time(&row.started_at),
            finished: time(&row.finished_at),
            exit_code,
            ..Notification::new(event)
        }
    }
}

/// Where and how to send.
#[derive(Debug, Clone)]
pub struct Channels {
    pub url: Option<String>,
    /// The secret header (name, value).
    pub header: Option<(String, String)>,
    pub command: Option<String>,
    pub timeout: Duration,
}

/// The outcome of one channel, for `notify test` and the warnings.
pub type Sent = Result<String, String>;

/// Send `n` on every channel, the webhook and the command side by side; returns
/// one result per channel used.
pub fn send(n: &Notification, ch: &Channels) -> Vec<(String, Sent)> {
    let body = match serde_json::to_vec(n) {
        Ok(b) => b,
        Err(e) => return vec![("encoding".into(), Err(e.to_string()))],
    };
    std::thread::scope(|s| {
        let hook = ch.url.as_ref().map(|url| {
            let body = &body;
            s.spawn(move || (format!("webhook {}", redact_url(url)), post(url, ch, body)))
        });
        let cmd = ch.command.as_ref().map(|cmd| {
            let body = &body;
            s.spawn(move || {
                (
                    "notify_command".to_string(),
                    run_command(cmd, n, body, ch.timeout),
                )
            })
        });
        [hook, cmd]
            .into_iter()
            .flatten()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| ("notification".into(), Err("sender panicked".into())))
            })
            .collect()
    })
}

/// `https://hooks.example/...`: a webhook URL may carry a token in its path or
/// query, so messages name only its scheme and host.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!("{}://{}/...", u.scheme(), u.host_str().unwrap_or("?")),
        Err(_) => "(invalid URL)".into(),
    }
}

/// Make ring the process's TLS provider (reqwest is built without one); once.
fn tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn post(url: &str, ch: &Channels, body: &[u8]) -> Sent {
    tls_provider();
    let client = reqwest::blocking::Client::builder()
        .timeout(ch.timeout)
        .user_agent(concat!("vmbackup/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let started = Instant::now();
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            std::thread::sleep(ch.timeout / 10 * (1 << (attempt - 2)));
        }
        let mut req = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some((name, value)) = &ch.header {
            req = req.header(name.as_str(), value.as_str());
        }
        match req.send() {
            Ok(resp) if resp.status().is_success() => {
                return Ok(format!(
                    "HTTP {} (attempt {attempt})",
                    resp.status().as_u16()
                ))
            }
            Ok(resp) => {
                let code = resp.status().as_u16();
                last = format!("HTTP {code}");
                if !(code == 408 || code == 429 || code >= 500) {
                    break;
                }
            }
            Err(e) if e.is_timeout() => last = format!("no answer within {:?}", ch.timeout),
            Err(e) => last = without_url(e),
        }
        tracing::debug!(
            "webhook attempt {attempt} to {} failed: {last}",
            redact_url(url)
        );
    }
    Err(format!(
        "{last} after {} attempt(s) in {:.1}s",
        ATTEMPTS,
        started.elapsed().as_secs_f64()
    ))
}

/// A reqwest error's message without the URL it names (it may carry a token).
fn without_url(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

fn run_command(cmd: &str, n: &Notification, body: &[u8], timeout: Duration) -> Sent {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("VMBACKUP_EVENT", n.event.as_str())
        .env("VMBACKUP_RULE", opt(&n.rule))
        .env("VMBACKUP_VM", opt(&n.vm))
        .env(
            "VMBACKUP_STATUS",
            n.status.map(|s| s.to_string()).unwrap_or_default(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start /bin/sh: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is not an error.
        let _ = stdin.write_all(body).and_then(|()| stdin.write_all(b"\n"));
    }
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok("exit 0".into()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                let err = err.lines().next().unwrap_or("").trim().to_string();
                return Err(format!(
                    "{status}{}",
                    if err.is_empty() {
                        String::new()
                    } else {
                        format!(": {err}")
                    }
                ));
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("killed after {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_fall_into_the_notify_on_groups() {
        assert_eq!(
            Event::of_end(TaskState::Completed, false),
            Some(Event::Completed)
        );
        assert_eq!(
            Event::of_end(TaskState::Completed, true),
            Some(Event::Fallback)
        );
        assert_eq!(Event::of_end(TaskState::Running, false), None);
        for e in [
            Event::Failed,
            Event::Interrupted,
            Event::Skipped,
            Event::Damaged,
        ] {
            assert_eq!(e.group(), Group::Failure);
        }
        assert_eq!(Event::Fallback.group(), Group::Fallback);
        assert_eq!(Event::Completed.group(), Group::Success);
        assert_eq!(Event::Test.group(), Group::Always);
        let json = serde_json::to_value(Notification::new(Event::Test)).unwrap();
        assert_eq!(json["event"], "test");
        assert!(json["task"].is_null() && json["started"].is_null());
    }

    #[test]
    fn urls_lose_their_secrets_in_messages() {
        assert_eq!(
            redact_url("https://hooks.example/services/T0/B0/s3cret?token=x"),
            "https://hooks.example/..."
        );
    }

    #[test]
    fn the_command_gets_the_json_and_a_bound() {
        let n = Notification::new(Event::Test);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got");
        let cmd = format!("cat > {} && test \"$VMBACKUP_EVENT\" = test", out.display());
        let r = run_command(&cmd, &n, b"{\"event\":\"test\"}", Duration::from_secs(5));
        assert_eq!(r, Ok("exit 0".into()));
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"event\":\"test\"}\n"
        );
        let r = run_command("echo nope >&2; exit 3", &n, b"{}", Duration::from_secs(5));
        assert!(r.as_ref().unwrap_err().contains("nope"), "{r:?}");
        let t = Instant::now();
        let r = run_command("sleep 30", &n, b"{}", Duration::from_secs(1));
        assert!(r.unwrap_err().contains("killed"));
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
