//! Launching a VM from the configuration captured at backup: the QEMU command
//! line of the VM's process (manifest `vm_config.cmdline`), rewritten.
//!
//! What changes (and nothing else does):
//! - each backed-up disk points at a new image (an overlay over the export, or a
//!   restored image): its `-blockdev` format node keeps its node name and gets
//!   the new file (its protocol child `-blockdev` goes), or its `-drive` gets
//!   `file=`/`format=`;
//! - a new name (`-name`) and a new QMP socket; old monitors (`-qmp`, `-monitor`,
//!   `-mon` and their chardevs), `-daemonize`, `-pidfile`, `-S`, `-incoming`,
//!   `-loadvm` and displays (`-vnc`, `-spice`, `-display`, `-nographic`) go;
//!   `-display none` is added;
//! - chardevs that name files or sockets of the original VM are moved into the
//!   recovery's directory; serial ports write to files there;
//! - no network unless asked: every `-netdev`/`-net`/`-nic` and NIC `-device`
//!   goes, and with `--net`/`--net-bridge` the same NIC models come back with
//!   new MACs on user networking or the bridge;
//! - KVM when `/dev/kvm` is usable, else TCG with a default CPU (`--accel`
//!   chooses: some nested hosts have a `/dev/kvm` whose guests never run);
//! - secrets redacted at backup (`<redacted>`) must be supplied by
//!   `--set-secret ID=FILE`; the launch fails naming each missing one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::error::{invalid, refused};

/// What the backup stored in place of a secret's value (issue 8's redaction).
pub use crate::platform::redact::REDACTED;

/// Flags that take no value on QEMU's command line.
const FLAGS: &[&str] = &[
    "S",
    "daemonize",
    "nodefaults",
    "no-shutdown",
    "no-reboot",
    "enable-kvm",
    "nographic",
    "snapshot",
    "no-user-config",
    "no-hpet",
    "no-acpi",
    "full-screen",
    "s",
    "usb",
    "no-fd-bootchk",
    "only-migratable",
    "preconfig",
    "no-graphic",
];

/// Options of the original VM that a recovered VM must not have.
const DROPPED: &[&str] = &[
    "qmp",
    "qmp-pretty",
    "monitor",
    "daemonize",
    "pidfile",
    "S",
    "incoming",
    "loadvm",
    "vnc",
    "spice",
    "display",
    "nographic",
    "no-graphic",
    "D",
    "chroot",
    "runas",
    "snapshot",
];

/// The network of a launched VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Net {
    /// No network device at all (the default: the original VM may still run).
    None,
    /// The VM's NIC models with new MACs on QEMU user networking.
    User,
    /// The VM's NIC models with new MACs on a host bridge.
    Bridge(String),
}

/// How to launch a VM from a captured configuration (the CLI's flags).
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The new VM's name; `None`: `<vm>-recovered`.
    pub name: Option<String>,
    pub net: Net,
    /// `--set-secret ID=FILE`: secret objects redacted at backup.
    pub secrets: BTreeMap<String, PathBuf>,
    pub accel: Accel,
}

/// The accelerator of a launched VM (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when `/dev/kvm` is usable (QEMU falls back to TCG when KVM cannot
    /// start), else TCG.
    #[default]
    Auto,
    /// KVM only: the launch fails where KVM does not work.
    Kvm,
    /// TCG (emulation) with a default CPU, even where `/dev/kvm` exists.
    Tcg,
}

impl Accel {
    /// QEMU's `-accel` values, in order of preference.
    fn accels(self) -> &'static [&'static str] {
        match self {
            Accel::Auto if super::launch::kvm_available() => &["kvm", "tcg"],
            Accel::Auto | Accel::Tcg => &["tcg"],
            Accel::Kvm => &["kvm"],
        }
    }
}

/// A disk of the VM and the image it runs on now.
#[derive(Debug, Clone)]
pub struct DiskImage {
    /// The disk's name (guest device id, e.g. `vda`, or node name).
    pub name: String,
    /// The format node the platform reported (where the data was).
    pub node: String,
    /// The image file the platform reported.
    pub file: Option<String>,
    /// The new image and its format (`qcow2`, `raw`).
    pub image: PathBuf,
    pub format: String,
}

/// Everything that decides the new command line.
#[derive(Debug, Clone)]
pub struct Rewrite<'a> {
    pub name: &'a str,
    pub disks: &'a [DiskImage],
    pub qmp_socket: &'a Path,
    /// Directory for moved chardev files/sockets and serial logs.
    pub dir: &'a Path,
    pub net: &'a Net,
    pub secrets: &'a BTreeMap<String, PathBuf>,
    /// Boot verification: the first serial port writes here.
    pub serial_log: Option<&'a Path>,
    /// Boot verification: the guest agent's chardev listens here.
    pub agent_socket: Option<&'a Path>,
    /// KVM, TCG, or KVM when usable.
    pub accel: Accel,
    /// `-daemonize -pidfile PATH`.
    pub pidfile: Option<&'a Path>,
}

/// What the rewrite found besides the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub args: Vec<String>,
    /// The VM has a guest agent channel (now on `Rewrite::agent_socket`).
    pub has_agent: bool,
    /// The VM has a display device (a screenshot can be taken).
    pub has_display: bool,
    /// Serial logs written by the VM, in port order.
    pub serial_logs: Vec<PathBuf>,
}

/// One option: its name without dashes, as written, and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Opt {
    name: String,
    dashes: &'static str,
    value: Option<String>,
}

impl Opt {
    fn new(name: &str, value: Option<String>) -> Opt {
        Opt {
            name: name.to_string(),
            dashes: "-",
            value,
        }
    }
}

/// `key=val,...` (QemuOpts, `,,` escapes a comma) or JSON, as a value to read
/// and change.
#[derive(Debug, Clone, PartialEq)]
enum Props {
    Dotted {
        implied: Option<String>,
        pairs: Vec<(String, String)>,
    },
    Json(serde_json::Map<String, Value>),
}

impl Props {
    /// Parse an option value; `implied` names the key of a leading bare word
    /// (`-device virtio-blk-pci,...` → driver).
    fn parse(text: &str) -> Props {
        if text.trim_start().starts_with('{') {
            if let Ok(Value::Object(m)) = serde_json::from_str(text) {
                return Props::Json(m);
            }
        }
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    parts.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        parts.push(cur);
        let mut implied = None;
        let mut pairs = Vec::new();
        for (i, p) in parts.into_iter().enumerate() {
            match p.split_once('=') {
                Some((k, v)) => pairs.push((k.to_string(), v.to_string())),
                None if i == 0 => implied = Some(p),
                None => pairs.push((p, "on".into())),
            }
        }
        Props::Dotted { implied, pairs }
    }

    fn to_text(&self) -> String {
        match self {
            Props::Json(m) => Value::Object(m.clone()).to_string(),
            Props::Dotted { implied, pairs } => {
                let esc = |s: &str| s.replace(',', ",,");
                let mut out: Vec<String> = implied.iter().map(|s| esc(s)).collect();
                out.extend(pairs.iter().map(|(k, v)| format!("{}={}", esc(k), esc(v))));
                out.join(",")
            }
        }
    }

    /// The value of `key` (dotted for nested JSON), as text; `implied_key`
    /// answers for the leading bare word.
    fn get(&self, key: &str, implied_key: &str) -> Option<String> {
        match self {
            Props::Dotted { implied, pairs } => {
                if key == implied_key && implied.is_some() {
                    return implied.clone();
                }
                pairs
                    .iter()
                    .rev()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            }
            Props::Json(m) => {
                let mut v = m.get(key.split('.').next()?)?;
                for part in key.split('.').skip(1) {
                    v = v.get(part)?;
                }
                match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Null | Value::Object(_) | Value::Array(_) => None,
                    other => Some(other.to_string()),
                }
            }
        }
    }

    fn set(&mut self, key: &str, value: &str) {
        match self {
            Props::Dotted { pairs, .. } => {
                pairs.retain(|(k, _)| k != key);
                pairs.push((key.to_string(), value.to_string()));
            }
            Props::Json(m) => {
                m.insert(key.to_string(), Value::String(value.to_string()));
            }
        }
    }

    fn remove(&mut self, key: &str) {
        match self {
            Props::Dotted { pairs, .. } => pairs.retain(|(k, _)| k != key),
            Props::Json(m) => {
                m.remove(key);
            }
        }
    }

    /// Keys (top level) and their text values, for scanning.
    fn entries(&self) -> Vec<(String, String)> {
        match self {
            Props::Dotted { pairs, .. } => pairs.clone(),
            Props::Json(m) => {
                let mut out = Vec::new();
                flatten("", &Value::Object(m.clone()), &mut out);
                out
            }
        }
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Split a command line into the program and its options.
fn parse_args(args: &[String]) -> Result<(String, Vec<Opt>)> {
    let Some(program) = args.first() else {
        bail!("the captured command line is empty");
    };
    let mut opts = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let arg = &args[i];
        let (dashes, body) = if let Some(b) = arg.strip_prefix("--") {
            ("--", b)
        } else if let Some(b) = arg.strip_prefix('-') {
            ("-", b)
        } else {
            // A bare word (a disk image given without -hda): keep it as is.
            opts.push(Opt {
                name: String::new(),
                dashes: "",
                value: Some(arg.clone()),
            });
            i += 1;
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) if dashes == "--" => (n.to_string(), Some(v.to_string())),
            _ => (body.to_string(), None),
        };
        let value = if inline.is_some() || FLAGS.contains(&name.as_str()) {
            inline
        } else {
            i += 1;
            args.get(i).cloned()
        };
        opts.push(Opt {
            name,
            dashes,
            value,
        });
        i += 1;
    }
    Ok((program.clone(), opts))
}

fn props(opt: &Opt) -> Props {
    Props::parse(opt.value.as_deref().unwrap_or(""))
}

/// NIC drivers: a `-device` with a `netdev` property.
fn is_nic(p: &Props) -> bool {
    p.get("netdev", "driver").is_some()
}

/// A random MAC in QEMU's locally administered range `52:54:00:xx:xx:xx`.
pub fn new_mac() -> String {
    let mut b = [0u8; 3];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        b = [(t >> 16) as u8, (t >> 8) as u8, t as u8];
    }
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// The secrets a captured command line lacks (`-object secret,id=ID,data=<redacted>`),
/// and other redacted values nobody can supply (option and key).
pub fn missing_secrets(cmdline: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let (_, opts) = parse_args(cmdline)?;
    let mut secrets = Vec::new();
    let mut others = Vec::new();
    for o in &opts {
        let p = props(o);
        for (k, v) in p.entries() {
            if v != REDACTED {
                continue;
            }
            let is_secret = o.name == "object"
                && p.get("qom-type", "qom-type").as_deref() == Some("secret")
                && k == "data";
            match (is_secret, p.get("id", "qom-type")) {
                (true, Some(id)) => secrets.push(id),
                _ => others.push(format!("-{} {k}", o.name)),
            }
        }
    }
    Ok((secrets, others))
}

/// Rewrite a captured command line (see the module docs).
pub fn rewrite(cmdline: &[String], rw: &Rewrite) -> Result<Launch> {
    let (program, mut opts) = parse_args(cmdline)?;
    let prog_name = Path::new(&program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !prog_name.starts_with("qemu-system") {
        return Err(refused(format!(
            "the VM's captured configuration runs '{prog_name}', not qemu-system: there is no VM to start \
             (use the NBD URIs or overlays instead)"
        )));
    }
    secrets(&mut opts, rw.secrets)?;
    // Which chardevs belong to monitors (dropped with them).
    let monitor_chardevs: Vec<String> = opts
        .iter()
        .filter(|o| o.name == "mon")
        .filter_map(|o| props(o).get("chardev", "chardev"))
        .collect();
    let agent_chardev: Option<String> = opts
        .iter()
        .filter(|o| o.name == "device")
        .map(props)
        .find(|p| p.get("name", "driver").as_deref() == Some("org.qemu.guest_agent.0"))
        .and_then(|p| p.get("chardev", "driver"));
    let has_display = opts.iter().any(|o| {
        let p = props(o);
        (o.name == "vga" && o.value.as_deref() != Some("none"))
            || (o.name == "device" && {
                let d = p.get("driver", "driver").unwrap_or_default().to_lowercase();
                d.contains("vga")
                    || d.contains("qxl")
                    || d.contains("bochs-display")
                    || d.contains("ramfb")
            })
    });
    disks(&mut opts, rw.disks)?;
    let nic_models = network(&mut opts);

    let mut out: Vec<Opt> = Vec::new();
    let mut serial_logs = Vec::new();
    let mut serial_n = 0usize;
    let accels = rw.accel.accels();
    let kvm = accels.contains(&"kvm");
    let mut kvm_requested = false;
    for o in opts {
        let name = o.name.as_str();
        if DROPPED.contains(&name) || name == "name" || name == "mon" {
            continue;
        }
        match name {
            "enable-kvm" => {
                kvm_requested = true;
                continue;
            }
            "accel" => {
                let p = props(&o);
                kvm_requested |= p.get("accel", "accel").as_deref() == Some("kvm");
                continue;
            }
            "machine" | "M" => {
                let mut p = props(&o);
                if let Some(a) = p.get("accel", "type") {
                    kvm_requested |= a.contains("kvm");
                    p.remove("accel");
                }
                out.push(Opt {
                    value: Some(p.to_text()),
                    ..o
                });
                continue;
            }
            "cpu"
                if !kvm
                    && o.value
                        .as_deref()
                        .is_some_and(|v| v.split(',').next() == Some("host")) =>
            {
                out.push(Opt::new("cpu", Some("max".into())));
                continue;
            }
            "serial" => {
                let log = match (serial_n, rw.serial_log) {
                    (0, Some(path)) => path.to_path_buf(),
                    _ => rw.dir.join(format!("serial{serial_n}.log")),
                };
                serial_n += 1;
                out.push(Opt::new("serial", Some(format!("file:{}", log.display()))));
                serial_logs.push(log);
                continue;
            }
            "chardev" => {
                let mut p = props(&o);
                let id = p.get("id", "backend").unwrap_or_default();
                if monitor_chardevs.contains(&id) {
                    continue;
                }
                let backend = p.get("backend", "backend").unwrap_or_default();
                if agent_chardev.as_deref() == Some(id.as_str()) {
                    if let Some(sock) = rw.agent_socket {
                        p = Props::Dotted {
                            implied: Some("socket".into()),
                            pairs: vec![
                                ("id".into(), id.clone()),
                                ("path".into(), sock.display().to_string()),
                                ("server".into(), "on".into()),
                                ("wait".into(), "off".into()),
                            ],
                        };
                        out.push(Opt {
                            value: Some(p.to_text()),
                            ..o
                        });
                        continue;
                    }
                }
                let safe_id: String = id
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                match backend.as_str() {
                    "socket" if p.get("path", "backend").is_some() => {
                        p.set(
                            "path",
                            &rw.dir
                                .join(format!("chardev-{safe_id}.sock"))
                                .display()
                                .to_string(),
                        );
                    }
                    "file" | "pipe" => {
                        p.set(
                            "path",
                            &rw.dir
                                .join(format!("chardev-{safe_id}.log"))
                                .display()
                                .to_string(),
                        );
                    }
                    "stdio" => {
                        p = Props::Dotted {
                            implied: Some("null".into()),
                            pairs: vec![("id".into(), id.clone())],
                        }
                    }
                    _ => {}
                }
                out.push(Opt {
                    value: Some(p.to_text()),
                    ..o
                });
                continue;
            }
            _ => out.push(o),
        }
    }
    if rw.serial_log.is_some() && serial_n == 0 {
        let log = rw.serial_log.map(Path::to_path_buf).unwrap_or_default();
        out.push(Opt::new("serial", Some(format!("file:{}", log.display()))));
        serial_logs.push(log);
    }
    if kvm_requested && !kvm {
        tracing::info!("the VM ran with KVM; it runs under TCG here");
    }
    for a in accels {
        out.push(Opt::new("accel", Some(a.to_string())));
    }
    out.push(Opt::new("name", Some(rw.name.to_string())));
    out.push(Opt::new(
        "qmp",
        Some(format!(
            "unix:{},server=on,wait=off",
            rw.qmp_socket.display()
        )),
    ));
    out.push(Opt::new("display", Some("none".into())));
    for (i, model) in nic_models.iter().enumerate() {
        let id = format!("vmbnet{i}");
        let backend = match rw.net {
            Net::None => continue,
            Net::User => format!("user,id={id}"),
            Net::Bridge(br) => format!("bridge,id={id},br={br}"),
        };
        out.push(Opt::new("netdev", Some(backend)));
        out.push(Opt::new(
            "device",
            Some(format!("{model},netdev={id},mac={}", new_mac())),
        ));
    }
    if *rw.net == Net::None || nic_models.is_empty() {
        out.push(Opt::new("nic", Some("none".into())));
    }
    if let Some(pidfile) = rw.pidfile {
        out.push(Opt::new("daemonize", None));
        out.push(Opt::new("pidfile", Some(pidfile.display().to_string())));
    }
    let mut args = vec![program];
    for o in out {
        if !o.name.is_empty() {
            args.push(format!("{}{}", o.dashes, o.name));
        }
        if let Some(v) = o.value {
            args.push(v);
        }
    }
    Ok(Launch {
        args,
        has_agent: agent_chardev.is_some(),
        has_display,
        serial_logs,
    })
}

/// Put supplied secrets in place of redacted ones; fail naming what is missing.
fn secrets(opts: &mut [Opt], supplied: &BTreeMap<String, PathBuf>) -> Result<()> {
    let mut missing = Vec::new();
    let mut other = Vec::new();
    let mut used = Vec::new();
    for o in opts.iter_mut() {
        let mut p = props(o);
        let redacted: Vec<String> = p
            .entries()
            .into_iter()
            .filter(|(_, v)| v == REDACTED)
            .map(|(k, _)| k)
            .collect();
        if redacted.is_empty() {
            continue;
        }
        let id = p.get("id", "qom-type");
        let is_secret =
            o.name == "object" && p.get("qom-type", "qom-type").as_deref() == Some("secret");
        for key in redacted {
            match (&id, is_secret && key == "data") {
                (Some(id), true) => match supplied.get(id) {
                    Some(file) => {
                        p.remove("data");
                        p.set("file", &file.display().to_string());
                        used.push(id.clone());
                    }
                    None => missing.push(id.clone()),
                },
                _ => other.push(format!("-{} {key}", o.name)),
            }
        }
        o.value = Some(p.to_text());
    }
    if !other.is_empty() {
        return Err(refused(format!(
            "the captured configuration has redacted values that cannot be supplied: {}; \
             start the VM by hand from the printed command line",
            other.join(", ")
        )));
    }
    if !missing.is_empty() {
        return Err(refused(format!(
            "the captured configuration lacks the secret(s) {} (redacted at backup); \
             supply each with --set-secret ID=FILE",
            missing.join(", ")
        )));
    }
    if let Some(extra) = supplied.keys().find(|k| !used.contains(k)) {
        return Err(invalid(
            "--set-secret",
            extra,
            "the captured configuration has no redacted secret object with this id",
        ));
    }
    Ok(())
}

/// Point each disk at its new image.
fn disks(opts: &mut Vec<Opt>, disks: &[DiskImage]) -> Result<()> {
    for d in disks {
        // The device named like the disk says which node it uses.
        let node = opts
            .iter()
            .filter(|o| o.name == "device")
            .map(props)
            .find(|p| p.get("id", "driver").as_deref() == Some(d.name.as_str()))
            .and_then(|p| p.get("drive", "driver"))
            .unwrap_or_else(|| d.node.clone());
        let blockdev = opts.iter().position(|o| {
            o.name == "blockdev"
                && props(o).get("node-name", "driver").as_deref() == Some(node.as_str())
        });
        if let Some(i) = blockdev {
            let old = props(&opts[i]);
            let child = old.get("file", "driver");
            let mut pairs = vec![
                ("driver".to_string(), d.format.clone()),
                ("node-name".to_string(), node.clone()),
                ("file.driver".to_string(), "file".to_string()),
                ("file.filename".to_string(), d.image.display().to_string()),
            ];
            for key in ["discard", "detect-zeroes", "cache.direct", "cache.no-flush"] {
                if let Some(v) = old.get(key, "driver") {
                    pairs.push((key.to_string(), v));
                }
            }
            opts[i].value = Some(
                Props::Dotted {
                    implied: None,
                    pairs,
                }
                .to_text(),
            );
            opts[i].dashes = "-";
            if let Some(child) = child {
                opts.retain(|o| {
                    !(o.name == "blockdev"
                        && props(o).get("node-name", "driver").as_deref() == Some(child.as_str()))
                });
            }
            continue;
        }
        let drive = opts.iter().position(|o| {
            let p = props(o);
            o.name == "drive"
                && (p.get("id", "file").as_deref() == Some(d.name.as_str())
                    || (d.file.is_some() && p.get("file", "file") == d.file))
        });
        match drive {
            Some(i) => {
                let mut p = props(&opts[i]);
                if let Props::Dotted {
                    implied: Some(f),
                    pairs,
                } = &mut p
                {
                    pairs.insert(0, ("file".into(), f.clone()));
                }
                if let Props::Dotted { implied, .. } = &mut p {
                    *implied = None;
                }
                p.set("file", &d.image.display().to_string());
                p.set("format", &d.format);
                opts[i].value = Some(p.to_text());
            }
            None => {
                return Err(refused(format!(
                    "cannot find disk '{}' (node '{node}'{}) on the captured command line: \
                     only -blockdev and -drive disks can be rewritten",
                    d.name,
                    d.file
                        .as_deref()
                        .map(|f| format!(", file {f}"))
                        .unwrap_or_default()
                )))
            }
        }
    }
    Ok(())
}

/// Drop every network option and NIC device; returns the NIC models, in order.
fn network(opts: &mut Vec<Opt>) -> Vec<String> {
    let mut models = Vec::new();
    opts.retain(|o| {
        let p = props(o);
        match o.name.as_str() {
            "netdev" => false,
            "nic" | "net" => {
                if let Some(m) = p.get("model", "type") {
                    models.push(m);
                } else if o.name == "nic" && o.value.as_deref() != Some("none") {
                    models.push("virtio-net-pci".into());
                }
                false
            }
            "device" if is_nic(&p) => {
                if let Some(d) = p.get("driver", "driver") {
                    models.push(d);
                }
                false
            }
            _ => true,
        }
    });
    models
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn rw<'a>(
        disks: &'a [DiskImage],
        secrets: &'a BTreeMap<String, PathBuf>,
        net: &'a Net,
    ) -> Rewrite<'a> {
        Rewrite {
            name: "web01-rec",
            disks,
            qmp_socket: Path::new("/r/vm.qmp"),
            dir: Path::new("/r"),
            net,
            secrets,
            serial_log: None,
            agent_socket: None,
            accel: Accel::Tcg,
            pidfile: Some(Path::new("/r/vm.pid")),
        }
    }

    fn vda() -> Vec<DiskImage> {
        vec![DiskImage {
            name: "vda".into(),
            node: "disk0".into(),
            file: Some("/vm/web01.qcow2".into()),
            image: "/r/vda.overlay.qcow2".into(),
            format: "qcow2".into(),
        }]
    }

    const CAPTURED: &str = "/usr/bin/qemu-system-x86_64 -name web01 -machine q35,accel=kvm -enable-kvm -cpu host -m 256 \
        -blockdev driver=file,node-name=disk0-file,filename=/vm/web01.qcow2 \
        -blockdev driver=qcow2,node-name=disk0,file=disk0-file,discard=unmap \
        -device virtio-blk-pci,drive=disk0,id=vda \
        -netdev tap,id=n0,ifname=tap0 -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 \
        -chardev socket,id=qga0,path=/run/web01-qga.sock,server=on,wait=off \
        -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
        -chardev socket,id=mon0,path=/run/web01.mon,server=on,wait=off -mon chardev=mon0,mode=control \
        -qmp unix:/run/qemu/web01.qmp,server=on,wait=off -vnc :1 -S -daemonize -pidfile /run/web01.pid -serial stdio";

    #[test]
    fn a_captured_command_line_becomes_a_recovered_vm() {
        let disks = vda();
        let none = BTreeMap::new();
        let launch = rewrite(&args(CAPTURED), &rw(&disks, &none, &Net::None)).unwrap();
        let line = launch.args.join(" ");
        for gone in [
            "web01.qcow2",
            "disk0-file",
            "tap0",
            "52:54:00:12:34:56",
            "/run/web01.mon",
            "mon0",
            "/run/qemu/web01.qmp",
            "-vnc",
            " -S ",
            "/run/web01.pid",
            "stdio",
            "-enable-kvm",
            "accel=kvm",
            "-cpu host",
            "/run/web01-qga.sock",
        ] {
            assert!(!line.contains(gone), "{gone} still in {line}");
        }
        for kept in [
            "-blockdev driver=qcow2,node-name=disk0,file.driver=file,file.filename=/r/vda.overlay.qcow2,discard=unmap",
            "-device virtio-blk-pci,drive=disk0,id=vda",
            "-name web01-rec",
            "-qmp unix:/r/vm.qmp,server=on,wait=off",
            "-display none",
            "-nic none",
            "-accel tcg",
            "-cpu max",
            "-machine q35",
            "-serial file:/r/serial0.log",
            "-chardev socket,id=qga0,server=on,wait=off,path=/r/chardev-qga0.sock",
            "-daemonize -pidfile /r/vm.pid",
        ] {
            assert!(line.contains(kept), "{kept} not in {line}");
        }
        assert!(launch.has_agent);
        assert!(!launch.has_display);
        assert_eq!(launch.serial_logs, vec![PathBuf::from("/r/serial0.log")]);
    }

    #[test]
    fn network_comes_back_only_when_asked_with_new_macs() {
        let disks = vda();
        let none = BTreeMap::new();
        let user = rewrite(&args(CAPTURED), &rw(&disks, &none, &Net::User))
            .unwrap()
            .args
            .join(" ");
        assert!(
            user.contains(
                "-netdev user,id=vmbnet0 -device virtio-net-pci,netdev=vmbnet0,mac=52:54:00:"
            ),
            "{user}"
        );
        assert!(!user.contains("52:54:00:12:34:56") && !user.contains("-nic none"));
        let br = rewrite(
            &args(CAPTURED),
            &rw(&disks, &none, &Net::Bridge("br0".into())),
        )
        .unwrap()
        .args
        .join(" ");
        assert!(br.contains("-netdev bridge,id=vmbnet0,br=br0"), "{br}");
    }

    #[test]
    fn redacted_secrets_must_be_supplied_by_id() {
        let line = format!("{CAPTURED} -object secret,id=sec0,data={REDACTED},format=base64 -object secret,id=sec1,data={REDACTED}");
        let disks = vda();
        let none = BTreeMap::new();
        let err = rewrite(&args(&line), &rw(&disks, &none, &Net::None))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sec0, sec1") && err.contains("--set-secret"),
            "{err}"
        );
        assert_eq!(
            missing_secrets(&args(&line)).unwrap().0,
            vec!["sec0", "sec1"]
        );
        let mut some = BTreeMap::new();
        some.insert("sec0".to_string(), PathBuf::from("/k/sec0"));
        let err = rewrite(&args(&line), &rw(&disks, &some, &Net::None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sec1") && !err.contains("sec0"), "{err}");
        some.insert("sec1".to_string(), PathBuf::from("/k/sec1"));
        let ok = rewrite(&args(&line), &rw(&disks, &some, &Net::None))
            .unwrap()
            .args
            .join(" ");
        assert!(
            ok.contains("-object secret,id=sec0,format=base64,file=/k/sec0"),
            "{ok}"
        );
        some.insert("nope".to_string(), PathBuf::from("/k/x"));
        let err = rewrite(&args(&line), &rw(&disks, &some, &Net::None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--set-secret 'nope'"), "{err}");
    }

    #[test]
    fn drive_disks_and_json_blockdevs_are_rewritten_and_unknown_ones_refused() {
        let none = BTreeMap::new();
        let line =
            "qemu-system-x86_64 -drive file=/vm/web01.qcow2,if=virtio,format=qcow2,cache=none";
        let out = rewrite(&args(line), &rw(&vda(), &none, &Net::None))
            .unwrap()
            .args
            .join(" ");
        assert!(
            out.contains("-drive if=virtio,cache=none,file=/r/vda.overlay.qcow2,format=qcow2"),
            "{out}"
        );
        let json = vec![
            "qemu-system-x86_64".to_string(),
            "-blockdev".into(),
            r#"{"driver":"qcow2","node-name":"disk0","file":{"driver":"file","filename":"/vm/web01.qcow2"}}"#.into(),
        ];
        let out = rewrite(&json, &rw(&vda(), &none, &Net::None))
            .unwrap()
            .args
            .join(" ");
        assert!(
            out.contains("node-name=disk0,file.driver=file,file.filename=/r/vda.overlay.qcow2"),
            "{out}"
        );
        let err = rewrite(
            &args("qemu-system-x86_64 -hda /vm/other.img"),
            &rw(&vda(), &none, &Net::None),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot find disk 'vda'"), "{err}");
        let err = rewrite(
            &args("qemu-storage-daemon --blockdev x"),
            &rw(&vda(), &none, &Net::None),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not qemu-system"), "{err}");
    }

    #[test]
    fn qemu_opts_commas_are_escaped_both_ways() {
        let p = Props::parse("file,id=c0,path=/a,,b");
        assert_eq!(p.get("path", "backend").as_deref(), Some("/a,b"));
        assert_eq!(p.to_text(), "file,id=c0,path=/a,,b");
    }
}
