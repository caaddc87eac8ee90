//! QMP client: one synchronous conversation with a QEMU monitor over a unix socket.
//!
//! QMP is newline-delimited JSON. The server greets (`{"QMP": ...}`), we enable
//! commands with `qmp_capabilities`, then send `{"execute", "arguments", "id"}` and
//! read `{"return", "id"}` or `{"error": {"class", "desc"}, "id"}`. Events
//! (`{"event", "data", "timestamp"}`) may arrive between any two messages; they are
//! queued and handed out by [`Qmp::wait_event`].
//!
//! Deadlines: every command's wait for its answer is bounded by the session's
//! timeout (system.conf `io_timeout`), so a stopped QEMU fails a command instead
//! of hanging vmbackup; after such a timeout the session is broken and every
//! later command fails at once (no second wait on a hypervisor known to be
//! stuck). A session given a cancel flag ([`Qmp::watch_cancel`]) stops waiting
//! [`CANCEL_GRACE`] after the flag is set: long enough to tear a backup view down
//! on a healthy QEMU, short enough that a cancelled task on a stuck one ends at
//! once (its leftovers are repaired when QEMU answers again).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// How long one command (or the greeting) may wait for its answer unless the
/// session is given another timeout: system.conf's default `io_timeout`.
pub const DEFAULT_TIMEOUT: Duration = crate::config::DEFAULT_IO_TIMEOUT;

/// How long a session keeps waiting for QEMU once its cancel flag is set.
pub const CANCEL_GRACE: Duration = Duration::from_secs(3);

/// How often a wait looks at the cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Events kept for [`Qmp::wait_event`]; older ones are dropped beyond this.
const MAX_QUEUED_EVENTS: usize = 4096;

/// The longest message accepted. Real ones stay far below (the largest reply,
/// `query-named-block-nodes` of a big VM, is a few MiB); a peer that sends more
/// without a newline is not a QMP monitor, and is not buffered without end.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// A command QEMU answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("QMP command '{command}' failed: {desc}")]
pub struct QmpError {
    pub command: String,
    /// QMP error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, ...).
    pub class: String,
    pub desc: String,
}

/// An open QMP session.
pub struct Qmp {
    socket: PathBuf,
    stream: UnixStream,
    /// Bytes read from the socket that do not form a complete line yet.
    pending: Vec<u8>,
    /// How much of `pending` is known to hold no newline (each byte is searched once).
    scanned: usize,
    next_id: u64,
    events: VecDeque<Value>,
    timeout: Duration,
    /// Set when the task using this session is cancelled ([`Qmp::watch_cancel`]).
    cancel: Option<Arc<AtomicBool>>,
    /// When this session first saw the cancel flag set.
    cancelled_at: Option<Instant>,
    /// Why the session is unusable (a command got no answer in time).
    broken: Option<String>,
}

impl Qmp {
    /// Connect, read the greeting and negotiate capabilities.
    pub fn connect(socket: &Path) -> Result<Qmp> {
        Qmp::connect_with_timeout(socket, DEFAULT_TIMEOUT)
    }

    /// [`Qmp::connect`] with a per-command timeout.
    pub fn connect_with_timeout(socket: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connect to QMP socket {}", socket.display()))?;
        stream
            .set_write_timeout(Some(timeout))
            .with_context(|| format!("set write timeout on QMP socket {}", socket.display()))?;
        let mut qmp = Qmp {
            socket: socket.to_path_buf(),
            stream,
            pending: Vec::new(),
            scanned: 0,
            next_id: 1,
            events: VecDeque::new(),
            timeout,
            cancel: None,
            cancelled_at: None,
            broken: None,
        };
        let greeting = qmp.read_message(Instant::now() + timeout)?;
        if greeting.get("QMP").is_none() {
            bail!(
                "QMP socket {} did not greet with a QMP banner: {greeting}",
                socket.display()
            );
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// The socket this session talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stop waiting for answers [`CANCEL_GRACE`] after `cancel` is set.
    pub fn watch_cancel(&mut self, cancel: Arc<AtomicBool>) {
        self.cancel = Some(cancel);
    }

    /// Run one command; `args` is `Value::Null` for none. Returns the `return` value.
    /// A QMP error becomes a [`QmpError`] (inside anyhow) naming the command.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value> {
        if let Some(why) = &self.broken {
            bail!("QMP command '{command}' not sent: {why}");
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if !args.is_null() {
            request["arguments"] = args;
        }
        // -v shows the traffic, always through the secret redaction.
        if tracing::enabled!(tracing::Level::DEBUG) {
            let shown = match request.get("arguments") {
                Some(a) => format!(" {}", crate::platform::redact::for_log(a)),
                None => String::new(),
            };
            tracing::debug!("QMP {} -> {command}{shown}", self.socket.display());
        }
        let mut line = request.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes()).with_context(|| {
            format!("send QMP command '{command}' to {}", self.socket.display())
        })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let msg = match self.read_message(deadline) {
                Ok(msg) => msg,
                Err(e) => {
                    // An answer is owed and did not come: QEMU is stuck (or the
                    // wait was cancelled). Later commands must not wait again.
                    if self.broken.is_none() {
                        self.broken = Some(format!("QEMU did not answer '{command}': {e:#}"));
                    }
                    return Err(e.context(format!("QMP command '{command}'")));
                }
            };
            if msg.get("event").is_some() {
                self.queue_event(msg);
                continue;
            }
            match msg.get("id").and_then(Value::as_u64) {
                // A reply to an earlier command that timed out: skip it.
                Some(other) if other != id => continue,
                _ => {}
            }
            if let Some(err) = msg.get("error") {
                log_reply(&self.socket, command, &msg);
                return Err(QmpError {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("").to_string(),
                    desc: err["desc"].as_str().unwrap_or("").to_string(),
                }
                .into());
            }
            log_reply(&self.socket, command, &msg);
            return match msg.get("return") {
                Some(ret) => Ok(ret.clone()),
                None => bail!("QMP command '{command}': unexpected reply {msg}"),
            };
        }
    }

    /// Wait for an event named `name` whose message satisfies `matches` (it gets the
    /// whole event object, `data` included). Events already queued count. Other
    /// events stay queued.
    pub fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let is_wanted = |ev: &Value| ev["event"] == name && matches(ev);
        if let Some(pos) = self.events.iter().position(is_wanted) {
            return Ok(self.events.remove(pos).unwrap_or(Value::Null));
        }
        if let Some(why) = &self.broken {
            bail!("not waiting for QMP event {name}: {why}");
        }
        let deadline = Instant::now() + timeout.min(self.timeout);
        loop {
            let msg = self
                .read_message(deadline)
                .with_context(|| format!("wait for QMP event {name}"))?;
            if msg.get("event").is_none() {
                continue;
            }
            if is_wanted(&msg) {
                return Ok(msg);
            }
            self.queue_event(msg);
        }
    }

    /// The pid of the QEMU process at the other end (SO_PEERCRED).
    pub fn peer_pid(&self) -> Result<u32> {
        let cred = rustix::net::sockopt::get_socket_peercred(&self.stream).with_context(|| {
            format!(
                "read peer credentials of QMP socket {}",
                self.socket.display()
            )
        })?;
        Ok(cred.pid.as_raw_nonzero().get() as u32)
    }

    /// The user and group the QEMU process at the other end runs as (SO_PEERCRED).
    pub fn peer_user(&self) -> Result<(u32, u32)> {
        let cred = rustix::net::sockopt::get_socket_peercred(&self.stream).with_context(|| {
            format!(
                "read peer credentials of QMP socket {}",
                self.socket.display()
            )
        })?;
        Ok((cred.uid.as_raw(), cred.gid.as_raw()))
    }

    fn queue_event(&mut self, event: Value) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Next JSON message, reading more from the socket until `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            let newline = self.pending[self.scanned..]
                .iter()
                .position(|&b| b == b'\n');
            if let Some(at) = newline {
                let line: Vec<u8> = self.pending.drain(..=self.scanned + at).collect();
                self.scanned = 0;
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text).with_context(|| {
                    format!("bad JSON from QMP socket {}: {text}", self.socket.display())
                });
            }
            self.scanned = self.pending.len();
            if self.pending.len() > MAX_MESSAGE {
                bail!(
                    "QMP socket {} sent a message longer than {} MiB: not a QMP monitor?",
                    self.socket.display(),
                    MAX_MESSAGE >> 20
                );
            }
            let now = Instant::now();
            let (deadline, cancelled) = self.deadline_with_cancel(deadline, now);
            if now >= deadline {
                if cancelled {
                    bail!(
                        "QMP socket {}: gave up waiting for QEMU {}s after the task was cancelled",
                        self.socket.display(),
                        CANCEL_GRACE.as_secs()
                    );
                }
                bail!(
                    "QMP socket {}: no answer within {} (io_timeout): is QEMU stopped or hung?",
                    self.socket.display(),
                    humantime::format_duration(self.timeout)
                );
            }
            let mut wait = (deadline - now).max(Duration::from_millis(1));
            if self.cancel.is_some() {
                wait = wait.min(CANCEL_POLL);
            }
            self.stream
                .set_read_timeout(Some(wait))
                .with_context(|| format!("set read timeout on {}", self.socket.display()))?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("QMP socket {} closed by QEMU", self.socket.display()),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("read QMP socket {}", self.socket.display()))
                }
            }
        }
    }
}

impl Qmp {
    /// `deadline`, or earlier once the cancel flag has been set for
    /// [`CANCEL_GRACE`]; and whether the cancel decides it.
    fn deadline_with_cancel(&mut self, deadline: Instant, now: Instant) -> (Instant, bool) {
        let set = self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst));
        if set && self.cancelled_at.is_none() {
            self.cancelled_at = Some(now);
        }
        match self.cancelled_at.map(|at| at + CANCEL_GRACE) {
            Some(end) if end < deadline => (end, true),
            _ => (deadline, false),
        }
    }
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("socket", &self.socket)
            .field("queued_events", &self.events.len())
            .finish()
    }
}

/// Replies longer than this are cut at debug level (-v); -vv shows them whole.
const DEBUG_REPLY_CHARS: usize = 2000;

/// A reply at debug level (cut) or trace level (whole), secrets redacted.
fn log_reply(socket: &Path, command: &str, msg: &Value) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let text = crate::platform::redact::for_log(msg).to_string();
    if tracing::enabled!(tracing::Level::TRACE) || text.len() <= DEBUG_REPLY_CHARS {
        tracing::debug!("QMP {} <- {command}: {text}", socket.display());
    } else {
        let cut = text
            .char_indices()
            .take_while(|(i, _)| *i < DEBUG_REPLY_CHARS)
            .last()
            .map_or(0, |(i, c)| i + c.len_utf8());
        tracing::debug!(
            "QMP {} <- {command}: {}... ({} more bytes; -vv shows all)",
            socket.display(),
            &text[..cut],
            text.len() - cut
        );
    }
}

/// Whether `err` is a QMP error whose description contains `text`.
pub fn is_qmp_error(err: &anyhow::Error, text: &str) -> bool {
    err.chain()
        .filter_map(|c| c.downcast_ref::<QmpError>())
        .any(|e| e.desc.contains(text) || e.class == text)
}
