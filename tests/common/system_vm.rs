//! qemu-system VMs for recovery tests: TCG, one qcow2 disk `vda` (virtio-blk,
//! node `disk0`), a QMP socket in the env's QMP directory, optionally the tiny
//! guest of `scripts/tiny-guest.sh` as kernel and initramfs.
//!
//! The guest's disk is written through the VM's own block layer (HMP `qemu-io`
//! on the device's backend, as a guest's writes would go) and into a raw
//! *shadow* file: the oracle of what the disk holds. What a running VM reads is
//! checked from outside through an NBD export of its node ([`export_digest`]).
//!
//! HMP `qemu-io` prints its own output on QEMU's stdout, not in the monitor's
//! reply; the reply carries only the monitor's errors ("Error: Device does not
//! have a block device backend"), so [`hmp_qemu_io`] requires an empty reply.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{accepts, file_digest, qmp_session, run, tiny_guest, wait_for, Env};

/// A qemu-system VM started by a test (killed on drop).
pub struct SystemVm {
    pub name: String,
    pub qmp: PathBuf,
    pub image: PathBuf,
    pub shadow: PathBuf,
    pub serial: PathBuf,
    child: Option<Child>,
}

/// What the VM has besides its disk.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// Boot the tiny guest (kernel + initramfs); else no OS (SeaBIOS idles).
    pub tiny_guest: bool,
    /// A virtio NIC on user networking.
    pub nic: bool,
    /// A VGA display device (for screenshots).
    pub vga: bool,
    /// A guest agent channel (`org.qemu.guest_agent.0`, on `<vm dir>/qga.sock`);
    /// the tiny guest runs qemu-ga on it.
    pub agent: bool,
    /// More arguments, as given.
    pub extra: Vec<String>,
}

impl SystemVm {
    /// Create `<env>/vms/<name>/vda.qcow2` of `size` and start the VM, paused (`-S`).
    pub fn start(env: &Env, name: &str, size: u64, opts: &VmOptions) -> SystemVm {
        let dir = env.path(&format!("vms/{name}"));
        fs::create_dir_all(&dir).unwrap();
        let image = dir.join("vda.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                image.to_str().unwrap(),
                &size.to_string(),
            ],
        );
        let shadow = dir.join("vda.shadow");
        File::create(&shadow).unwrap().set_len(size).unwrap();
        let mut vm = SystemVm {
            name: name.to_string(),
            qmp: env.qmp_dir.join(format!("{name}.qmp")),
            serial: dir.join("serial.log"),
            image,
            shadow,
            child: None,
        };
        vm.launch(opts);
        vm
    }

    /// Start the VM again on its image (after [`SystemVm::quit`]).
    pub fn launch(&mut self, opts: &VmOptions) {
        assert!(self.child.is_none(), "VM {} still runs", self.name);
        let _ = fs::remove_file(&self.qmp);
        let mut args: Vec<String> = [
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-m",
            if opts.tiny_guest { "256" } else { "64" },
            "-S",
            "-name",
            &self.name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if opts.tiny_guest {
            let (kernel, initrd) = tiny_guest();
            args.extend([
                "-kernel".into(),
                kernel.display().to_string(),
                "-initrd".into(),
                initrd.display().to_string(),
                "-append".into(),
                format!(
                    "console=ttyS0 quiet panic=-1 no_timer_check vmb.marker=1 vmb.sum=/dev/vda{}",
                    if opts.agent { " vmb.agent=1" } else { "" }
                ),
                "-serial".into(),
                format!("file:{}", self.serial.display()),
            ]);
        }
        args.extend([
            "-blockdev".into(),
            format!(
                "driver=file,node-name=disk0-file,filename={}",
                self.image.display()
            ),
            "-blockdev".into(),
            "driver=qcow2,node-name=disk0,file=disk0-file".into(),
            "-device".into(),
            "virtio-blk-pci,drive=disk0,id=vda".into(),
        ]);
        if opts.nic {
            args.extend([
                "-netdev".into(),
                "user,id=n0".into(),
                "-device".into(),
                "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56".into(),
            ]);
        }
        if opts.vga {
            args.extend(["-device".into(), "VGA".into()]);
        }
        if opts.agent {
            let sock = self.image.with_file_name("qga.sock");
            args.extend([
                "-device".into(),
                "virtio-serial-pci".into(),
                "-chardev".into(),
                format!("socket,id=qga0,path={},server=on,wait=off", sock.display()),
                "-device".into(),
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
            ]);
        }
        args.extend(["-display".into(), "none".into()]);
        args.extend(opts.extra.iter().cloned());
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp.display()),
        ]);
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        self.child = Some(child);
        wait_for(|| accepts(&self.qmp), "VM QMP socket");
    }

    /// Write `len` bytes of `pattern` at `offset` through the VM's disk, and
    /// into the shadow.
    pub fn write(&self, offset: u64, len: u64, pattern: u8) {
        hmp_qemu_io(&self.qmp, &format!("write -P {pattern:#x} {offset} {len}"));
        self.shadow_write(offset, &vec![pattern; len as usize]);
    }

    /// Write `data` (a multiple of 512 bytes) at `offset`, and into the shadow.
    pub fn write_bytes(&self, offset: u64, data: &[u8], scratch: &Path) {
        fs::write(scratch, data).unwrap();
        hmp_qemu_io(
            &self.qmp,
            &format!("write -s {} {offset} {}", scratch.display(), data.len()),
        );
        self.shadow_write(offset, data);
    }

    /// The tiny guest's marker line at offset 0 (in a 512-byte block).
    pub fn write_marker(&self, word: &str, scratch: &Path) {
        self.write_bytes(0, &marker_block(word), scratch);
    }

    fn shadow_write(&self, offset: u64, data: &[u8]) {
        let f = OpenOptions::new().write(true).open(&self.shadow).unwrap();
        f.write_all_at(data, offset).unwrap();
    }

    /// BLAKE3 of the shadow: what the disk holds now.
    pub fn shadow_digest(&self) -> String {
        file_digest(&self.shadow)
    }

    /// Copy the shadow aside: the disk's content at this moment.
    pub fn keep_shadow(&self, tag: &str) -> PathBuf {
        let p = self.shadow.with_extension(format!("{tag}.expected"));
        fs::copy(&self.shadow, &p).unwrap();
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not running").id()
    }

    /// QMP `quit` and wait for the process (qcow2 metadata is written).
    pub fn quit(&mut self) {
        if let Some(mut c) = self.child.take() {
            qmp_session(&self.qmp, &[r#"{"execute":"quit"}"#]);
            let _ = c.wait();
        }
    }
}

impl Drop for SystemVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The tiny guest's marker: `VMBACKUP-MARKER <word>\n`, zero-padded to 512 bytes.
pub fn marker_block(word: &str) -> Vec<u8> {
    let mut b = format!("VMBACKUP-MARKER {word}\n").into_bytes();
    b.resize(512, 0);
    b
}

/// HMP `qemu-io` on the disk `vda` of the VM behind `qmp` (through the guest
/// device's block backend). Panics on any reply text: the monitor's errors.
pub fn hmp_qemu_io(qmp: &Path, cmd: &str) {
    let line = serde_json::json!({
        "execute": "human-monitor-command",
        "arguments": { "command-line": format!("qemu-io -d vda/virtio-backend \"{cmd}\"") }
    })
    .to_string();
    let r = qmp_session(qmp, &[&line]);
    let reply = r[0]["return"]
        .as_str()
        .unwrap_or_else(|| panic!("qemu-io {cmd}: {}", r[0]));
    assert!(reply.trim().is_empty(), "qemu-io {cmd}: {reply}");
}

/// What the VM behind `qmp` reads from its node `node` now: an NBD export of
/// the node (read-only) copied with nbdcopy into `dir`, its BLAKE3.
pub fn export_digest(qmp: &Path, node: &str, dir: &Path) -> String {
    let sock = dir.join(format!("export-{node}.sock"));
    let out = dir.join(format!("export-{node}.raw"));
    let _ = fs::remove_file(&sock);
    let _ = fs::remove_file(&out);
    let start = serde_json::json!({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": sock}}}})
    .to_string();
    let add = serde_json::json!({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "test-read", "node-name": node, "name": "test-read", "writable": false}})
    .to_string();
    let r = qmp_session(qmp, &[&start, &add]);
    assert!(
        r.iter().all(|v| v.get("return").is_some()),
        "export {node}: {r:?}"
    );
    let uri = format!("nbd+unix:///test-read?socket={}", sock.display());
    let copied = Command::new("nbdcopy")
        .args([&uri, out.to_str().unwrap()])
        .output();
    let stop = qmp_session(
        qmp,
        &[
            r#"{"execute":"block-export-del","arguments":{"id":"test-read"}}"#,
            r#"{"execute":"nbd-server-stop"}"#,
        ],
    );
    let copied = copied.expect("run nbdcopy");
    assert!(
        copied.status.success(),
        "nbdcopy of {node}: {}",
        String::from_utf8_lossy(&copied.stderr)
    );
    assert!(stop.iter().all(|v| v.get("return").is_some()), "{stop:?}");
    let d = file_digest(&out);
    let _ = fs::remove_file(&out);
    d
}

/// BLAKE3 of an image's guest-visible bytes (`qemu-img convert -U` to raw).
pub fn image_digest(image: &Path, scratch: &Path) -> String {
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            image.to_str().unwrap(),
            scratch.to_str().unwrap(),
        ],
    );
    let d = file_digest(scratch);
    let _ = fs::remove_file(scratch);
    d
}

/// The shadow `base` with `len` bytes of `pattern` at `offset`: a new file
/// `out`, its digest.
pub fn patched_digest(base: &Path, out: &Path, writes: &[(u64, u64, u8)]) -> String {
    fs::copy(base, out).unwrap();
    let f = OpenOptions::new().write(true).open(out).unwrap();
    for &(offset, len, pattern) in writes {
        f.write_all_at(&vec![pattern; len as usize], offset)
            .unwrap();
    }
    file_digest(out)
}

/// SHA-256 (hex) of a whole file: what the tiny guest prints for its disk
/// (`VMB-SUM`, kernel argument `vmb.sum=/dev/vda`).
pub fn guest_sum(path: &Path) -> String {
    run("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
