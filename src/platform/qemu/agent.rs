//! Quiesce (R10) for the `qemu` platform: the QEMU guest agent, reached over the
//! unix socket of the VM's `org.qemu.guest_agent.0` channel.
//!
//! The socket is found on the VM's command line (through the QMP socket's peer
//! pid): a `virtserialport` (or `virtconsole`) device named
//! `org.qemu.guest_agent.0` whose `chardev` is a listening unix socket
//! (`-chardev socket,id=ID,path=PATH,server=on`). vmbackup connects as the
//! agent's client, resynchronises (`guest-sync-delimited`), and sends
//! `guest-fsfreeze-freeze` before the snapshot transaction and
//! `guest-fsfreeze-thaw` right after it. A VM started another way (libvirt's
//! fd-passed channels, no channel at all) has no reachable agent.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::platform::{freeze_marker, FreezeOutcome, Note, Quiesce};

/// The agent's channel name.
pub const CHANNEL: &str = "org.qemu.guest_agent.0";

/// How long the agent may take to answer a sync (it may not run at all).
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a freeze or thaw may take (the guest flushes its file systems).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent's socket from a QEMU command line, if it has a reachable one.
pub fn socket_from_cmdline(args: &[String]) -> Option<PathBuf> {
    let values = |opt: &str| -> Vec<&str> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let a = args[i].as_str();
            let dashless = a.trim_start_matches('-');
            if (a.starts_with('-')) && dashless == opt {
                if let Some(v) = args.get(i + 1) {
                    out.push(v.as_str());
                }
                i += 1;
            } else if let Some(v) = a
                .strip_prefix('-')
                .map(|a| a.trim_start_matches('-'))
                .and_then(|a| a.strip_prefix(opt))
                .and_then(|a| a.strip_prefix('='))
            {
                out.push(v);
            }
            i += 1;
        }
        out
    };
    let keys = |v: &str| -> Vec<(String, String)> {
        v.split(',')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (String::new(), kv.to_string()),
            })
            .collect()
    };
    let get = |kv: &[(String, String)], k: &str| {
        kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    };
    let chardev = values("device").into_iter().find_map(|d| {
        let kv = keys(d);
        let driver = kv.first().map(|(k, v)| {
            if k.is_empty() || k == "driver" {
                v.as_str()
            } else {
                ""
            }
        })?;
        let port = matches!(driver, "virtserialport" | "virtconsole");
        (port && get(&kv, "name").as_deref() == Some(CHANNEL))
            .then(|| get(&kv, "chardev"))
            .flatten()
    })?;
    values("chardev").into_iter().find_map(|c| {
        let kv = keys(c);
        let backend = kv.first().map(|(_, v)| v.as_str())?;
        let listening = get(&kv, "server").is_some_and(|s| s == "on" || s.is_empty())
            || kv.iter().any(|(k, v)| k.is_empty() && v == "server");
        (backend == "socket" && get(&kv, "id").as_deref() == Some(chardev.as_str()) && listening)
            .then(|| get(&kv, "path").map(PathBuf::from))
            .flatten()
    })
}

/// A conversation with the guest agent.
struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Agent {
    /// Connect and resynchronise: anything a previous client left unread is skipped.
    fn connect(socket: &Path) -> Result<Agent> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connect to the guest agent socket {}", socket.display()))?;
        stream.set_read_timeout(Some(SYNC_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut agent = Agent {
            reader: BufReader::new(stream),
            writer,
        };
        let id = u64::from(std::process::id()) << 16 | u64::from(rand_u16());
        agent.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}))?;
        // The reply follows a 0xFF byte; skip up to it, then read the line.
        let mut byte = [0u8; 1];
        loop {
            agent
                .reader
                .read_exact(&mut byte)
                .context("the guest agent did not answer guest-sync")?;
            if byte[0] == 0xff {
                break;
            }
        }
        loop {
            let reply = agent.line()?;
            if reply["return"] == id {
                return Ok(agent);
            }
        }
    }

    fn send(&mut self, v: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(v)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .context("write to the guest agent")
    }

    fn line(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self
            .reader
            .read_line(&mut line)
            .context("read from the guest agent")?
            == 0
        {
            bail!("the guest agent closed the connection");
        }
        serde_json::from_str(line.trim_start_matches('\u{ff}'))
            .with_context(|| format!("the guest agent sent {line:?}"))
    }

    fn execute(&mut self, cmd: &str, timeout: Duration) -> Result<Value> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        self.send(&json!({ "execute": cmd }))?;
        let reply = self.line()?;
        if let Some(e) = reply.get("error") {
            bail!("{cmd}: {}", e["desc"].as_str().unwrap_or("error"));
        }
        Ok(reply["return"].clone())
    }
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u16
}

/// Freeze every guest file system; returns how many.
pub fn freeze(socket: &Path) -> Result<u32> {
    let n = Agent::connect(socket)?.execute("guest-fsfreeze-freeze", FREEZE_TIMEOUT)?;
    Ok(n.as_u64().unwrap_or(0) as u32)
}

/// Thaw every guest file system; returns how many.
pub fn thaw(socket: &Path) -> Result<u32> {
    let n = Agent::connect(socket)?.execute("guest-fsfreeze-thaw", FREEZE_TIMEOUT)?;
    Ok(n.as_u64().unwrap_or(0) as u32)
}

/// Freeze and thaw around the snapshot transaction, as the rule asks.
pub struct Quiescer<'a> {
    pub mode: Quiesce,
    /// The agent's socket, when the VM has a reachable channel.
    pub socket: Option<PathBuf>,
    pub vm: &'a str,
    pub run_dir: &'a Path,
    pub outcome: FreezeOutcome,
}

impl Quiescer<'_> {
    /// Before the transaction. `require` without an answering agent fails here,
    /// before anything changed.
    pub fn freeze(&mut self) -> Result<()> {
        if self.mode == Quiesce::Off {
            return Ok(());
        }
        let Some(socket) = self.socket.clone() else {
            self.outcome = FreezeOutcome::no_agent(
                self.mode,
                self.vm,
                &format!(
                    "the VM's command line has no {CHANNEL} channel on a listening unix socket"
                ),
                &fix(),
            )?;
            return Ok(());
        };
        let marker = freeze_marker::create(self.run_dir, self.vm)?;
        match freeze(&socket) {
            Ok(n) => {
                self.outcome = FreezeOutcome::Frozen(n);
                crate::platform::hold_frozen_for_tests();
                Ok(())
            }
            Err(e) => {
                // A failed freeze may have frozen some: thaw what it can.
                let _ = thaw(&socket);
                freeze_marker::remove(&marker)?;
                self.outcome =
                    FreezeOutcome::no_agent(self.mode, self.vm, &format!("{e:#}"), &fix())?;
                Ok(())
            }
        }
    }

    /// After the transaction (whether it worked or not).
    pub fn thaw(&mut self) -> Result<()> {
        if !self.outcome.is_frozen() {
            return Ok(());
        }
        let socket = self.socket.as_deref().expect("frozen through a socket");
        thaw(socket).with_context(|| format!("VM '{}': thaw guest file systems", self.vm))?;
        freeze_marker::remove(&freeze_marker::path(self.run_dir, self.vm))
    }

    pub fn note(&self) -> Option<Note> {
        self.outcome.note()
    }
}

fn fix() -> String {
    format!(
        "run qemu-guest-agent in the guest and start the VM with its channel, e.g. \
         -chardev socket,id=qga0,path=/run/qga-VM.sock,server=on,wait=off -device virtio-serial \
         -device virtserialport,chardev=qga0,name={CHANNEL}"
    )
}

/// Thaw a guest an interrupted run left frozen (its marker is there).
pub fn thaw_leftover(
    vm: &str,
    socket: Option<&Path>,
    run_dir: &Path,
    actions: &mut Vec<String>,
) -> Result<()> {
    let marker = freeze_marker::path(run_dir, vm);
    if !marker.exists() {
        return Ok(());
    }
    if let Some(socket) = socket {
        let n = thaw(socket).with_context(|| format!("VM '{vm}': thaw guest file systems"))?;
        actions.push(format!(
            "thawed {n} guest file system(s) an interrupted run left frozen"
        ));
    }
    freeze_marker::remove(&marker)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn the_agent_socket_is_found_on_the_command_line() {
        let cmd = args(
            "qemu-system-x86_64 -chardev socket,id=qga0,path=/run/q/qga.sock,server=on,wait=off \
             -device virtio-serial-pci -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        );
        assert_eq!(
            socket_from_cmdline(&cmd),
            Some(PathBuf::from("/run/q/qga.sock"))
        );
        let dashed = args(
            "q --chardev=socket,id=a,path=/x.sock,server --device=virtserialport,name=org.qemu.guest_agent.0,chardev=a",
        );
        assert_eq!(socket_from_cmdline(&dashed), Some(PathBuf::from("/x.sock")));
        // libvirt passes the channel as an fd: not reachable.
        let fd = args(
            "q -chardev socket,id=charchannel0,fd=33,server=on,wait=off \
             -device virtserialport,chardev=charchannel0,name=org.qemu.guest_agent.0",
        );
        assert_eq!(socket_from_cmdline(&fd), None);
        assert_eq!(socket_from_cmdline(&args("q -S")), None);
        let other = args(
            "q -chardev socket,id=c,path=/y,server=on -device virtserialport,chardev=c,name=com.example",
        );
        assert_eq!(socket_from_cmdline(&other), None);
    }
}
