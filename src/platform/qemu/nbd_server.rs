//! QEMU's built-in NBD server: start one for a backup, or find the one it runs.
//!
//! QEMU runs at most one NBD server and has no command that reports its address.
//! vmbackup starts its own on a unix socket in the VM's private scratch directory
//! (0700). When `nbd-server-start` says "already running" (qemu-storage-daemon
//! started with `--nbd-server`), the address comes from the process command line,
//! found through the QMP socket's peer pid (`/proc/PID/cmdline`). Such a server on
//! plain TCP (no TLS) would let anyone who reaches its port read the disk while
//! the export exists: that is refused unless the rule allows it explicitly.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::names;
use crate::platform::qmp::{is_qmp_error, Qmp};
use crate::platform::NbdAddr;

/// The NBD server a backup exports through.
#[derive(Debug, Clone)]
pub struct NbdServer {
    pub addr: NbdAddr,
    /// Our socket, when we started the server (and must stop it).
    pub started: Option<PathBuf>,
}

/// Start a server on a unix socket in the VM's scratch directory `run_dir`, or
/// find the running one; one on plain TCP only when `allow_plain_tcp`.
pub fn start_or_find(
    qmp: &mut Qmp,
    run_dir: &Path,
    vm: &str,
    allow_plain_tcp: bool,
) -> Result<NbdServer> {
    let socket = names::nbd_socket(run_dir);
    let args = json!({ "addr": { "type": "unix", "data": { "path": socket } } });
    match qmp.execute("nbd-server-start", args) {
        Ok(_) => {
            // QEMU creates the socket with its umask: it serves disk data, 0600.
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) =
                std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            {
                let _ = stop(qmp, &socket);
                return Err(e).with_context(|| format!("cannot make {} private", socket.display()));
            }
            Ok(NbdServer {
                addr: NbdAddr::Unix {
                    path: socket.clone(),
                },
                started: Some(socket),
            })
        }
        Err(e) if is_qmp_error(&e, "already running") => {
            let pid = qmp.peer_pid()?;
            let cmdline = read_cmdline(pid)?;
            let server = server_from_cmdline(&cmdline).with_context(|| {
                format!(
                    "VM '{vm}' already runs an NBD server, but its address is not on the \
                     command line of pid {pid} (started over QMP by another tool?)"
                )
            })?;
            if let NbdAddr::Tcp { .. } = server.addr {
                if server.tls {
                    bail!(
                        "VM '{vm}' already runs an NBD server at {} with TLS, which vmbackup's \
                         NBD client does not speak yet; QEMU runs one NBD server only",
                        server.listen
                    );
                }
                if !allow_plain_tcp {
                    bail!(
                        "VM '{vm}' already runs an NBD server on plain TCP at {} (no TLS): \
                         during the backup anyone reaching that port could read the disk; \
                         refusing (a rule made with --allow-plain-tcp-export accepts it)",
                        server.listen
                    );
                }
            }
            let mut addr = server.addr;
            if let NbdAddr::Unix { path } = &mut addr {
                if path.is_relative() {
                    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
                        .with_context(|| format!("read working directory of pid {pid}"))?;
                    *path = cwd.join(&*path);
                }
            }
            Ok(NbdServer {
                addr,
                started: None,
            })
        }
        Err(e) => Err(e).with_context(|| format!("start NBD server for VM '{vm}'")),
    }
}

/// Stop the server we started on `socket` and remove the socket file.
pub fn stop(qmp: &mut Qmp, socket: &Path) -> Result<()> {
    match qmp.execute("nbd-server-stop", Value::Null) {
        Ok(_) => {}
        Err(e) if is_qmp_error(&e, "not running") => {}
        Err(e) => return Err(e),
    }
    remove_file_if_exists(socket)
}

/// Remove a file; a missing one is fine.
pub fn remove_file_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
    }
}

/// The arguments of process `pid`.
pub fn read_cmdline(pid: u32) -> Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("read command line of pid {pid}"))?;
    Ok(raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// The NBD server a command line starts (`--nbd-server`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdlineServer {
    /// Where to connect to it (a wildcard listen address becomes loopback).
    pub addr: NbdAddr,
    /// The address as configured, for messages (`0.0.0.0:10809`, a socket path).
    pub listen: String,
    /// The server requires TLS (`tls-creds`).
    pub tls: bool,
}

/// The address of `--nbd-server` (dotted keys or JSON) on a command line.
pub fn nbd_addr_from_cmdline(args: &[String]) -> Option<NbdAddr> {
    server_from_cmdline(args).map(|s| s.addr)
}

/// The `--nbd-server` (dotted keys or JSON) of a command line.
pub fn server_from_cmdline(args: &[String]) -> Option<CmdlineServer> {
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let value = match arg.split_once('=') {
            Some((opt, v)) if opt == "--nbd-server" || opt == "-nbd-server" => Some(v),
            _ if arg == "--nbd-server" || arg == "-nbd-server" => {
                i += 1;
                args.get(i).map(String::as_str)
            }
            _ => None,
        };
        if let Some(addr) = value.and_then(parse_server_option) {
            return Some(addr);
        }
        i += 1;
    }
    None
}

fn parse_server_option(value: &str) -> Option<CmdlineServer> {
    if value.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(value).ok()?;
        let addr = &v["addr"];
        let data = if addr["data"].is_object() {
            &addr["data"]
        } else {
            addr
        };
        return socket_addr(
            addr["type"].as_str()?,
            data["path"].as_str(),
            data["host"].as_str(),
            data["port"]
                .as_str()
                .map(str::to_string)
                .or_else(|| data["port"].as_u64().map(|p| p.to_string())),
            v["tls-creds"].as_str().is_some_and(|c| !c.is_empty()),
        );
    }
    let mut kind = None;
    let mut path = None;
    let mut host = None;
    let mut port = None;
    let mut tls = false;
    for pair in value.split(',') {
        match pair.split_once('=') {
            Some(("addr.type", v)) => kind = Some(v),
            Some(("addr.path", v)) => path = Some(v),
            Some(("addr.host", v)) => host = Some(v),
            Some(("addr.port", v)) => port = Some(v.to_string()),
            Some(("tls-creds", v)) => tls = !v.is_empty(),
            _ => {}
        }
    }
    socket_addr(kind?, path, host, port, tls)
}

fn socket_addr(
    kind: &str,
    path: Option<&str>,
    host: Option<&str>,
    port: Option<String>,
    tls: bool,
) -> Option<CmdlineServer> {
    match kind {
        "unix" => Some(CmdlineServer {
            addr: NbdAddr::Unix {
                path: PathBuf::from(path?),
            },
            listen: path?.to_string(),
            tls,
        }),
        "inet" => {
            let configured = host.unwrap_or("");
            let connect = match configured {
                "" | "0.0.0.0" => "127.0.0.1",
                "::" => "::1",
                h => h,
            };
            let port: u16 = port?.parse().ok()?;
            let shown = if configured.is_empty() {
                "0.0.0.0"
            } else {
                configured
            };
            Some(CmdlineServer {
                addr: NbdAddr::Tcp {
                    host: connect.to_string(),
                    port,
                },
                listen: if shown.contains(':') {
                    format!("[{shown}]:{port}")
                } else {
                    format!("{shown}:{port}")
                },
                tls,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unix_address_from_dotted_option() {
        let cmd = args(&[
            "qemu-storage-daemon",
            "--blockdev",
            "driver=file,node-name=f,filename=/x",
            "--nbd-server",
            "addr.type=unix,addr.path=/run/q/nbd.sock",
        ]);
        assert_eq!(
            nbd_addr_from_cmdline(&cmd),
            Some(NbdAddr::Unix {
                path: "/run/q/nbd.sock".into()
            })
        );
    }

    #[test]
    fn inet_address_from_dotted_and_json_options() {
        let dotted = args(&[
            "q",
            "--nbd-server=addr.type=inet,addr.host=0.0.0.0,addr.port=10809",
        ]);
        let expected = NbdAddr::Tcp {
            host: "127.0.0.1".into(),
            port: 10809,
        };
        assert_eq!(nbd_addr_from_cmdline(&dotted), Some(expected.clone()));
        let json = args(&[
            "q",
            "--nbd-server",
            r#"{"addr":{"type":"inet","host":"0.0.0.0","port":"10809"}}"#,
        ]);
        assert_eq!(nbd_addr_from_cmdline(&json), Some(expected));
    }

    #[test]
    fn listen_address_and_tls_as_configured() {
        let plain = server_from_cmdline(&args(&[
            "q",
            "--nbd-server",
            "addr.type=inet,addr.host=0.0.0.0,addr.port=10809",
        ]))
        .unwrap();
        assert_eq!((plain.listen.as_str(), plain.tls), ("0.0.0.0:10809", false));
        let tls = server_from_cmdline(&args(&[
            "q",
            "--nbd-server",
            r#"{"addr":{"type":"inet","host":"::","port":"10809"},"tls-creds":"tls0"}"#,
        ]))
        .unwrap();
        assert_eq!((tls.listen.as_str(), tls.tls), ("[::]:10809", true));
    }

    #[test]
    fn no_server_option_means_no_address() {
        assert_eq!(
            nbd_addr_from_cmdline(&args(&["qemu-system-x86_64", "-S"])),
            None
        );
    }
}
