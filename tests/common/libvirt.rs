//! libvirt test harness: the private libvirtd (scripts/test-libvirtd.sh) and TCG
//! domains named with the test process's pid, destroyed and undefined (with their
//! checkpoint metadata) on drop.
//!
//! `VMBACKUP_TEST_LIBVIRT_URI` (set by scripts/test.sh) names the daemon; without it
//! the tests start (or reuse) one under `target/test-libvirtd`. The tiny guest
//! (kernel + initramfs with qemu-guest-agent, scripts/tiny-guest.sh) is
//! [`super::tiny_guest`]. A test that cannot get either fails: it never skips.
//!
//! Guest writes go through QEMU's `qemu-io` HMP command on the running domain (or
//! `qemu-io` on the image of a shut-off one) and into a raw shadow file per disk,
//! the oracle restores are compared with.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{file_digest, pseudo_random, run, tiny_guest};

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The private libvirtd's URI.
pub fn uri() -> String {
    static URI: OnceLock<String> = OnceLock::new();
    URI.get_or_init(|| {
        if let Ok(u) = std::env::var("VMBACKUP_TEST_LIBVIRT_URI") {
            return u;
        }
        let script = repo_dir().join("scripts/test-libvirtd.sh");
        let dir = repo_dir().join("target/test-libvirtd");
        run(script.to_str().unwrap(), &["start", dir.to_str().unwrap()])
            .trim()
            .to_string()
    })
    .clone()
}

/// The private daemon's directory (scripts/test-libvirtd.sh's DIR), from its
/// socket in [`uri`] (`...?socket=DIR/run/libvirt-sock`).
fn daemon_dir() -> PathBuf {
    let u = uri();
    let socket = u
        .split_once("socket=")
        .map(|(_, s)| s.split('&').next().unwrap())
        .unwrap_or_else(|| panic!("the test daemon's URI {u} names no socket"));
    Path::new(socket)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The private libvirtd's process id (to stop it in a test).
pub fn libvirtd_pid() -> u32 {
    let f = daemon_dir().join("run/libvirtd.pid");
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .trim()
        .parse()
        .unwrap()
}

/// The same daemon reached as a remote host: `qemu+tcp://127.0.0.1:PORT/system`.
pub fn tcp_uri() -> String {
    let f = daemon_dir().join("run/tcp-uri");
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e} (restart the test libvirtd)", f.display()))
        .trim()
        .to_string()
}

/// The CA and client certificate for the daemon's TLS backup exports (vmbackup's
/// `--tls-dir`); QEMU's server side is in the same directory.
pub fn tls_dir() -> PathBuf {
    daemon_dir().join("etc/pki/qemu")
}

/// Scratch files of remote-style backups left in QEMU's directory of the daemon.
pub fn remote_scratch_files() -> Vec<PathBuf> {
    std::fs::read_dir(daemon_dir().join("lib/qemu"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmbackup-")
        })
        .collect()
}

/// `virsh -c URI ARGS`, panicking with its output on failure.
pub fn virsh(args: &[&str]) -> String {
    let u = uri();
    let mut a = vec!["-c", u.as_str()];
    a.extend_from_slice(args);
    run("virsh", &a)
}

/// `virsh` that may fail: (success, stdout + stderr).
pub fn virsh_try(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// What the tiny guest does when the domain boots from it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// No OS: the CPU idles; disks are written through HMP qemu-io.
    None,
    /// The tiny guest, printing the SHA-256 of /dev/vda.
    Checksum,
    /// The tiny guest mounting /dev/vda (ext4) and running qemu-guest-agent.
    Agent,
}

/// One disk of a test domain.
#[derive(Clone)]
pub struct Disk {
    pub target: String,
    pub size: u64,
    pub format: &'static str,
    /// Start from this raw content (e.g. an ext4 file system) instead of zeros.
    pub content: Option<PathBuf>,
}

impl Disk {
    pub fn qcow2(target: &str, size: u64) -> Disk {
        Disk {
            target: target.into(),
            size,
            format: "qcow2",
            content: None,
        }
    }
}

/// A TCG domain of the private libvirtd.
pub struct TestDomain {
    pub name: String,
    pub work: PathBuf,
    pub disks: Vec<Disk>,
    pub xml: String,
    _tmp: tempfile::TempDir,
}

impl TestDomain {
    /// Define (not start) domain `<tag>-<pid>` with `disks`; `agent_channel` adds the
    /// guest agent's virtio channel.
    pub fn define(tag: &str, disks: &[Disk], boot: Boot, agent_channel: bool) -> TestDomain {
        let tmp = tempfile::Builder::new()
            .prefix("vmbackup-lv-")
            .tempdir()
            .unwrap();
        // QEMU runs as libvirt-qemu: it must reach the images and the guest files.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let work = tmp.path().to_path_buf();
        let name = format!("{tag}-{}", std::process::id());
        let mut devices = String::new();
        for d in disks {
            let img = work.join(format!("{}.{}", d.target, d.format));
            let shadow = work.join(format!("{}.shadow", d.target));
            match &d.content {
                Some(src) => {
                    fs::copy(src, &shadow).unwrap();
                    run(
                        "qemu-img",
                        &[
                            "convert",
                            "-q",
                            "-f",
                            "raw",
                            "-O",
                            d.format,
                            src.to_str().unwrap(),
                            img.to_str().unwrap(),
                        ],
                    );
                }
                None => {
                    run(
                        "qemu-img",
                        &[
                            "create",
                            "-q",
                            "-f",
                            d.format,
                            img.to_str().unwrap(),
                            &d.size.to_string(),
                        ],
                    );
                    fs::File::create(&shadow).unwrap().set_len(d.size).unwrap();
                }
            }
            devices.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{}'/>\
                 <source file='{}'/><target dev='{}' bus='virtio'/><alias name='ua-{}'/></disk>\n",
                d.format,
                img.display(),
                d.target,
                d.target,
            ));
        }
        let os = match boot {
            Boot::None => String::new(),
            b => {
                let (k, i) = tiny_guest();
                let kernel = work.join("vmlinuz");
                let initrd = work.join("initrd.gz");
                fs::copy(k, &kernel).unwrap();
                fs::copy(i, &initrd).unwrap();
                let args = match b {
                    Boot::Checksum => "vmb.sum=/dev/vda",
                    _ => "vmb.agent=1",
                };
                format!(
                    "<kernel>{}</kernel><initrd>{}</initrd><cmdline>console=ttyS0 panic=-1 quiet {args}</cmdline>",
                    kernel.display(),
                    initrd.display()
                )
            }
        };
        let channel = if agent_channel {
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        } else {
            ""
        };
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>{mem}</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type>{os}</os><features><acpi/></features>\
             <devices>{devices}{channel}\
             <serial type='file'><source path='{serial}'/><target port='0'/></serial>\
             <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
            mem = if boot == Boot::None { 64 } else { 256 },
            serial = work.join("serial.log").display(),
        );
        let file = work.join("domain.xml");
        fs::write(&file, &xml).unwrap();
        virsh(&["define", file.to_str().unwrap()]);
        TestDomain {
            name,
            work,
            disks: disks.to_vec(),
            xml,
            _tmp: tmp,
        }
    }

    pub fn start(&self) {
        virsh(&["start", &self.name]);
    }

    /// Stop QEMU (SIGTERM first: a clean stop that stores the bitmaps).
    pub fn destroy(&self) {
        virsh(&["destroy", &self.name, "--graceful"]);
    }

    pub fn is_running(&self) -> bool {
        virsh(&["domstate", &self.name]).trim() == "running"
    }

    pub fn image(&self, target: &str) -> PathBuf {
        let d = self.disk(target);
        self.work.join(format!("{}.{}", d.target, d.format))
    }

    pub fn shadow(&self, target: &str) -> PathBuf {
        self.work.join(format!("{target}.shadow"))
    }

    fn disk(&self, target: &str) -> &Disk {
        self.disks
            .iter()
            .find(|d| d.target == target)
            .expect("no such disk")
    }

    /// Write `len` bytes of `pattern` at `offset`, as the guest would, and into
    /// the shadow.
    pub fn write(&self, target: &str, offset: u64, len: u64, pattern: u8) {
        self.qemu_io(target, &format!("write -P {pattern:#x} {offset} {len}"));
        self.shadow_write(target, offset, &vec![pattern; len as usize]);
    }

    /// Write pseudo-random bytes from `seed`.
    pub fn write_random(&self, target: &str, offset: u64, len: u64, seed: u64) {
        let data = pseudo_random(len as usize, seed);
        let src = self.work.join(format!("rand-{seed}.bin"));
        fs::write(&src, &data).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
        self.qemu_io(
            target,
            &format!("write -s {} {offset} {len}", src.display()),
        );
        self.shadow_write(target, offset, &data);
        let _ = fs::remove_file(src);
    }

    fn shadow_write(&self, target: &str, offset: u64, data: &[u8]) {
        let f = OpenOptions::new()
            .write(true)
            .open(self.shadow(target))
            .unwrap();
        f.write_all_at(data, offset).unwrap();
    }

    fn qemu_io(&self, target: &str, cmd: &str) {
        if self.is_running() {
            let hmp =
                format!("qemu-io -d /machine/peripheral/ua-{target}/virtio-backend \"{cmd}\"");
            let out = virsh(&["qemu-monitor-command", &self.name, "--hmp", &hmp]);
            assert!(
                !out.to_lowercase().contains("error"),
                "qemu-io {cmd}: {out}"
            );
        } else {
            let img = self.image(target);
            let d = self.disk(target);
            let out = run(
                "qemu-io",
                &["-f", d.format, "-c", cmd, img.to_str().unwrap()],
            );
            assert!(out.contains("wrote"), "qemu-io {cmd}: {out}");
        }
    }

    pub fn shadow_digest(&self, target: &str) -> String {
        file_digest(&self.shadow(target))
    }

    /// Our and others' checkpoints, sorted.
    pub fn checkpoints(&self) -> Vec<String> {
        let mut v: Vec<String> = virsh(&["checkpoint-list", &self.name, "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// Whether libvirt runs a backup job for the domain.
    pub fn has_backup_job(&self) -> bool {
        virsh_try(&["backup-dumpxml", &self.name]).0
    }

    /// The guest's serial console output so far.
    pub fn serial(&self) -> String {
        fs::read_to_string(self.work.join("serial.log")).unwrap_or_default()
    }

    /// Wait until the serial console shows `needle` (the guest boots under TCG).
    pub fn wait_serial(&self, needle: &str) -> String {
        let t = Instant::now();
        loop {
            let s = self.serial();
            if s.contains(needle) {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "domain {} never printed {needle:?}; console:\n{s}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait until libvirt reaches the guest agent (the guest opens its port a little
    /// after starting qemu-ga).
    pub fn wait_agent(&self) {
        let t = Instant::now();
        loop {
            let (ok, out) = virsh_try(&[
                "qemu-agent-command",
                &self.name,
                r#"{"execute":"guest-ping"}"#,
            ]);
            if ok {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "the guest agent of {} never answered: {out}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A guest agent command through libvirt (`virsh qemu-agent-command`).
    pub fn agent(&self, cmd: &str) -> serde_json::Value {
        let out = virsh(&["qemu-agent-command", &self.name, cmd]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("agent reply {out:?}: {e}"))
    }

    /// Our per-run socket directories left in /var/tmp for this domain.
    pub fn socket_dirs(&self) -> Vec<PathBuf> {
        let uuid = virsh(&["domuuid", &self.name]).trim().to_string();
        fs::read_dir("/var/tmp")
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains(&format!("vmbackup-{uuid}-")))
            .collect()
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        let _ = virsh_try(&["destroy", &self.name]);
        let _ = virsh_try(&["undefine", &self.name, "--checkpoints-metadata", "--nvram"]);
    }
}

/// An ext4 file system image of `size` bytes (for the agent guest's /dev/vda).
pub fn ext4_image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("ext4.raw");
    fs::File::create(&p).unwrap().set_len(size).unwrap();
    run("mkfs.ext4", &["-q", "-F", p.to_str().unwrap()]);
    p
}
