//! Shared harness for integration tests: real QEMU processes in temp dirs.
//!
//! [`TestVm`] starts a qemu-storage-daemon (QSD) "VM" with one or more disks, a QMP
//! socket named `<vm>.qmp` inside a QMP directory (what `platform add --qmp-dir`
//! points at) and, optionally, an NBD server with one writable export per disk
//! (`guest-<node>`), through which tests write as a guest would (qemu-io).
//!
//! Every write also goes into a raw *shadow* file per disk: an oracle independent of
//! vmbackup and QEMU, holding what the disk must contain. `shadow_digest` at backup
//! time is what a restore of that point must match.
#![allow(dead_code)]

pub mod json_doc;
pub mod libvirt;
pub mod s3proxy;
pub mod seaweedfs;
pub mod store_contract;
pub mod system_vm;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1024 * 1024;

/// One disk of a test VM.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub node: String,
    pub size: u64,
    pub format: &'static str,
    /// Opened `read-only=on` (both blockdevs): a disk a snapshot cannot cover (R43).
    pub read_only: bool,
}

impl DiskSpec {
    pub fn qcow2(node: &str, size: u64) -> DiskSpec {
        DiskSpec {
            node: node.into(),
            size,
            format: "qcow2",
            read_only: false,
        }
    }
    /// A qcow2 disk the VM opens read-only (an attached ISO, a shared base): R43.
    pub fn qcow2_read_only(node: &str, size: u64) -> DiskSpec {
        DiskSpec {
            read_only: true,
            ..DiskSpec::qcow2(node, size)
        }
    }
    pub fn raw(node: &str, size: u64) -> DiskSpec {
        DiskSpec {
            node: node.into(),
            size,
            format: "raw",
            read_only: false,
        }
    }
}

/// A running qemu-storage-daemon standing in for a VM.
pub struct TestVm {
    pub name: String,
    pub work: PathBuf,
    pub qmp_sock: PathBuf,
    pub nbd_sock: Option<PathBuf>,
    pub disks: Vec<DiskSpec>,
    /// More qemu-storage-daemon arguments (e.g. `--object secret,...`).
    pub extra_args: Vec<String>,
    child: Option<Child>,
    /// `(node, host byte offset)`: reads of the image file at that offset fail
    /// with EIO (a `blkdebug` node between the format node and its file).
    read_error: Option<(String, u64)>,
}

impl TestVm {
    /// Start a VM named `name` whose QMP socket is `<qmp_dir>/<name>.qmp`, its images
    /// and shadows under `work`. `nbd`: also start an NBD server with guest exports.
    pub fn start(qmp_dir: &Path, work: &Path, name: &str, disks: &[DiskSpec], nbd: bool) -> TestVm {
        TestVm::start_with(qmp_dir, work, name, disks, nbd, &[])
    }

    /// [`TestVm::start`] with more qemu-storage-daemon arguments.
    pub fn start_with(
        qmp_dir: &Path,
        work: &Path,
        name: &str,
        disks: &[DiskSpec],
        nbd: bool,
        extra_args: &[&str],
    ) -> TestVm {
        fs::create_dir_all(qmp_dir).unwrap();
        fs::create_dir_all(work).unwrap();
        for d in disks {
            let img = work.join(format!("{}.{}", d.node, d.format));
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
            let shadow = File::create(work.join(format!("{}.shadow", d.node))).unwrap();
            shadow.set_len(d.size).unwrap();
        }
        let mut vm = TestVm {
            name: name.into(),
            work: work.into(),
            qmp_sock: qmp_dir.join(format!("{name}.qmp")),
            nbd_sock: nbd.then(|| work.join("nbd.sock")),
            disks: disks.to_vec(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            child: None,
            read_error: None,
        };
        vm.launch();
        vm
    }

    fn launch(&mut self) {
        let _ = fs::remove_file(&self.qmp_sock);
        let mut args: Vec<String> = Vec::new();
        for d in &self.disks {
            let img = self.image(&d.node);
            let ro = if d.read_only { ",read-only=on" } else { "" };
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,node-name={}-file,filename={}{ro}",
                d.node,
                img.display()
            ));
            let mut file = format!("{}-file", d.node);
            if let Some((_, offset)) = self.read_error.as_ref().filter(|(n, _)| *n == d.node) {
                args.push("--blockdev".into());
                args.push(format!(
                    "driver=blkdebug,node-name={n}-dbg,image={n}-file,\
                     inject-error.0.event=read_aio,inject-error.0.errno=5,\
                     inject-error.0.once=off,inject-error.0.iotype=read,\
                     inject-error.0.sector={}",
                    offset / 512,
                    n = d.node
                ));
                file = format!("{}-dbg", d.node);
            }
            args.push("--blockdev".into());
            args.push(format!(
                "driver={},node-name={},file={file}{ro}",
                d.format, d.node
            ));
        }
        args.extend(self.extra_args.iter().cloned());
        args.push("--chardev".into());
        args.push(format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            self.qmp_sock.display()
        ));
        args.push("--monitor".into());
        args.push("chardev=qmp0".into());
        if let Some(sock) = &self.nbd_sock {
            let _ = fs::remove_file(sock);
            args.push("--nbd-server".into());
            args.push(format!("addr.type=unix,addr.path={}", sock.display()));
            for d in &self.disks {
                args.push("--export".into());
                args.push(format!(
                    "type=nbd,id=guest-{n},node-name={n},name=guest-{n},writable={w}",
                    n = d.node,
                    w = if d.read_only { "off" } else { "on" }
                ));
            }
        }
        let child = Command::new("qemu-storage-daemon")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(self.work.join("qsd.log")).unwrap())
            .spawn()
            .expect("start qemu-storage-daemon");
        self.child = Some(child);
        wait_for(|| accepts(&self.qmp_sock), "QMP socket");
        if let Some(sock) = &self.nbd_sock {
            wait_for(|| accepts(sock), "NBD socket");
        }
    }

    pub fn image(&self, node: &str) -> PathBuf {
        let d = self.disk(node);
        self.work.join(format!("{}.{}", d.node, d.format))
    }

    pub fn shadow(&self, node: &str) -> PathBuf {
        self.work.join(format!("{node}.shadow"))
    }

    fn disk(&self, node: &str) -> &DiskSpec {
        self.disks
            .iter()
            .find(|d| d.node == node)
            .expect("no such disk")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not running").id()
    }

    pub fn guest_uri(&self, node: &str) -> String {
        let sock = self
            .nbd_sock
            .as_ref()
            .expect("VM started without NBD server");
        format!("nbd+unix:///guest-{node}?socket={}", sock.display())
    }

    /// Write `len` bytes of `pattern` at `offset`, as the guest would (qemu-io over
    /// the writable NBD export), and into the shadow.
    pub fn write(&self, node: &str, offset: u64, len: u64, pattern: u8) {
        self.qemu_io(node, &format!("write -P {pattern:#x} {offset} {len}"));
        let f = OpenOptions::new()
            .write(true)
            .open(self.shadow(node))
            .unwrap();
        let buf = vec![pattern; len as usize];
        f.write_all_at(&buf, offset).unwrap();
    }

    /// Write-zeroes request (reads back as zero; may become a hole).
    pub fn write_zeroes(&self, node: &str, offset: u64, len: u64) {
        self.qemu_io(node, &format!("write -z {offset} {len}"));
        let f = OpenOptions::new()
            .write(true)
            .open(self.shadow(node))
            .unwrap();
        f.write_all_at(&vec![0u8; len as usize], offset).unwrap();
    }

    /// Several writes of pseudo-random (incompressible) bytes from a seed.
    pub fn write_random(&self, node: &str, offset: u64, len: u64, seed: u64) {
        let data = pseudo_random(len as usize, seed);
        let src = self.work.join(format!("rand-{seed}.bin"));
        fs::write(&src, &data).unwrap();
        // qemu-io's `write -s FILE` writes a file's bytes through the guest export.
        self.qemu_io(node, &format!("write -s {} {offset} {len}", src.display()));
        let f = OpenOptions::new()
            .write(true)
            .open(self.shadow(node))
            .unwrap();
        f.write_all_at(&data, offset).unwrap();
        let _ = fs::remove_file(src);
    }

    fn qemu_io(&self, node: &str, cmd: &str) {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &self.guest_uri(node)])
            .output()
            .expect("run qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("wrote"),
            "qemu-io {cmd:?} failed: {text}"
        );
    }

    /// BLAKE3 hex of the shadow (what the disk holds now).
    pub fn shadow_digest(&self, node: &str) -> String {
        file_digest(&self.shadow(node))
    }

    /// Copy the shadow aside (content at this moment), return the copy's path.
    pub fn keep_shadow(&self, node: &str, tag: &str) -> PathBuf {
        let p = self.work.join(format!("{node}.{tag}.expected"));
        fs::copy(self.shadow(node), &p).unwrap();
        p
    }

    /// SIGKILL the daemon (an unclean stop: persistent bitmaps become inconsistent).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Clean stop through QMP `quit` (bitmaps are stored in the qcow2).
    pub fn quit(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = qmp_oneshot(&self.qmp_sock, r#"{"execute":"quit"}"#);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop cleanly and start again with reads of the image file of `node` at
    /// host byte `offset` failing with EIO (QEMU's blkdebug driver); `None`
    /// removes the fault.
    pub fn restart_with_read_error(&mut self, node: &str, offset: Option<u64>) {
        self.quit();
        self.read_error = offset.map(|o| (node.to_string(), o));
        self.launch();
    }

    /// Where guest byte `guest_offset` of `node` lives in its image file
    /// (`qemu-img map`; the image may be in use).
    pub fn host_offset(&self, node: &str, guest_offset: u64) -> u64 {
        let out = run(
            "qemu-img",
            &[
                "map",
                "-U",
                "--output=json",
                self.image(node).to_str().unwrap(),
            ],
        );
        let map: serde_json::Value = serde_json::from_str(&out).unwrap();
        for e in map.as_array().unwrap() {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            if (start..start + len).contains(&guest_offset) && e["data"] == true {
                return e["offset"].as_u64().unwrap() + (guest_offset - start);
            }
        }
        panic!("guest offset {guest_offset} of {node} is not allocated: {out}");
    }

    /// Start again on the same images (after `kill` or `quit`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.launch();
    }

    /// Send QMP commands (JSON text) and return the replies (events skipped).
    pub fn qmp(&self, cmds: &[&str]) -> Vec<serde_json::Value> {
        qmp_session(&self.qmp_sock, cmds)
    }

    /// What vmbackup left in this QEMU: block jobs, and exports and nodes named
    /// `vmbackup-*` (empty = nothing).
    pub fn qemu_leftovers(&self) -> Vec<String> {
        let r = self.qmp(&[
            r#"{"execute":"query-block-jobs"}"#,
            r#"{"execute":"query-block-exports"}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        ]);
        let mut found = Vec::new();
        for j in r[0]["return"].as_array().unwrap() {
            found.push(format!("block job {}", j["device"]));
        }
        for (what, list, key) in [("export", &r[1], "id"), ("node", &r[2], "node-name")] {
            for e in list["return"].as_array().unwrap() {
                let id = e[key].as_str().unwrap_or_default();
                if id.starts_with("vmbackup-") {
                    found.push(format!("{what} {id}"));
                }
            }
        }
        found
    }

    /// Names of the dirty bitmaps on a node with their `inconsistent` flag.
    pub fn bitmaps(&self, node: &str) -> Vec<(String, bool)> {
        let r = self.qmp(&[r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#]);
        let mut out = Vec::new();
        for n in r[0]["return"].as_array().unwrap() {
            if n["node-name"] == node {
                for b in n["dirty-bitmaps"].as_array().cloned().unwrap_or_default() {
                    out.push((
                        b["name"].as_str().unwrap().to_string(),
                        b["inconsistent"].as_bool().unwrap_or(false),
                    ));
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a server accepts connections on the unix socket `path`: the file
/// appears at bind(2), a moment before listen(2), when a connect is still refused.
pub fn accepts(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// A QMP conversation for tests: greeting, capabilities, then `cmds`; events skipped.
pub fn qmp_session(sock: &Path, cmds: &[&str]) -> Vec<serde_json::Value> {
    use std::io::BufRead;
    use std::os::unix::net::UnixStream;
    let s = UnixStream::connect(sock).expect("connect QMP");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut read = || loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("event").is_none() {
            return v;
        }
    };
    read();
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    read();
    cmds.iter()
        .map(|c| {
            // One write: QEMU runs a command as soon as its JSON is complete,
            // so after `quit` a separate newline could meet a closed socket.
            w.write_all(format!("{c}\n").as_bytes()).unwrap();
            read()
        })
        .collect()
}

fn qmp_oneshot(sock: &Path, cmd: &str) -> std::io::Result<()> {
    use std::os::unix::net::UnixStream;
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf)?;
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    let _ = s.read(&mut buf)?;
    s.write_all(format!("{cmd}\n").as_bytes())?; // one write, as in qmp_session
    let _ = s.read(&mut buf);
    Ok(())
}

/// BLAKE3 hex digest of a file's bytes.
pub fn file_digest(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

/// Deterministic incompressible bytes (xorshift64*).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The tiny test guest's kernel and initramfs (scripts/tiny-guest.sh), one build
/// per test run for every test: into `VMBACKUP_TEST_GUEST_DIR` (scripts/test.sh
/// sets it and builds the guest while the tests compile) or `target/tiny-guest`.
/// The script does nothing when its current version is there, and fails the test
/// when it cannot build one.
pub fn tiny_guest() -> (PathBuf, PathBuf) {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::var_os("VMBACKUP_TEST_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/tiny-guest"));
        let script = root.join("scripts/tiny-guest.sh");
        run(script.to_str().unwrap(), &[dir.to_str().unwrap()]);
        dir
    });
    (dir.join("vmlinuz"), dir.join("initrd.gz"))
}

/// Run a command, panic with its output when it fails.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An env with one VM `vm` (a qcow2 disk `disk0` of `size` bytes, NBD guest
/// export), platform `lab`, target `t`, and rule `r` over the VM with `policy`
/// options; `i2vp_transbuffer` (the chunk size) is `chunk`.
pub fn lab_with_rule(chunk: &str, vm: &str, size: u64, policy: &[&str]) -> (Env, TestVm) {
    let env = Env::new();
    fs::write(&env.config, format!("i2vp_transbuffer = {chunk}\n")).unwrap();
    let vm = env.vm(vm, &[DiskSpec::qcow2("disk0", size)], true);
    env.add_lab("t");
    env.add_rule("r", "lab", &vm.name, "t", policy);
    (env, vm)
}

/// Files under `dir`, recursively (0 when it does not exist).
pub fn files_under(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| match e {
            Ok(e) if e.path().is_dir() => files_under(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

/// Write a repository lock object (docs/FORMAT.md, "Locks") at `path` held by
/// this test process, which is alive: vmbackup sees a live holder of a lock of
/// the repository in `mode` (`shared`, `exclusive`) for `purpose`.
pub fn write_live_lock(path: &Path, mode: &str, purpose: &str) {
    let id = path.file_name().unwrap().to_str().unwrap();
    let host = run("uname", &["-n"]).trim().to_string();
    let stat = fs::read_to_string(format!("/proc/{}/stat", std::process::id())).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let lock = serde_json::json!({
        "id": id,
        "scope": {"kind": "repository"},
        "mode": mode,
        "purpose": purpose,
        "host": host,
        "machine_id": fs::read_to_string("/etc/machine-id").ok().map(|s| s.trim().to_string()),
        "pid": std::process::id(),
        "pid_start": start,
        "created": "2026-11-30T01:00:00Z",
        "heartbeat": "2099-01-01T00:00:00Z",
        "expires": "2099-01-01T00:05:00Z",
    });
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, serde_json::to_vec(&lock).unwrap()).unwrap();
}

/// Poll `cond` for up to 10 s.
pub fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The arguments of `rule add NAME --platform P --vm VMS --target T EXTRA...`.
pub fn rule_add<'a>(
    name: &'a str,
    platform: &'a str,
    vms: &'a str,
    target: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "rule",
        "add",
        name,
        "--platform",
        platform,
        "--vm",
        vms,
        "--target",
        target,
    ];
    args.extend_from_slice(extra);
    args
}

/// A weekly full on Sunday and an incremental on the other days.
pub const WEEKLY_FULL_AND_INC: [&str; 4] = [
    "--schedule",
    "full weekly on sun at 01:00",
    "--schedule",
    "inc weekly on mon-sat at 01:00",
];

/// An isolated vmbackup environment: its own state file, system.conf and QMP dir.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub config: PathBuf,
    pub qmp_dir: PathBuf,
}

/// A test that fails midway must not leave a recovery's NBD server or VM
/// running: whatever recovery of this env is not stopped has its processes
/// killed (only processes whose command line or environment name this env's
/// directory: a reused pid is left alone).
impl Drop for Env {
    fn drop(&mut self) {
        if !self.state.exists() {
            return;
        }
        let Ok(conn) = rusqlite::Connection::open(&self.state) else {
            return;
        };
        let pids: Vec<i64> = conn
            .prepare("SELECT server_pid, vm_pid FROM recoveries WHERE stage != 'stopped'")
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok([r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?])
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map(|rows| rows.into_iter().flatten().flatten().collect())
            .unwrap_or_default();
        let ours = self.dir.path().to_string_lossy().into_owned();
        for pid in pids {
            let names_us = ["cmdline", "environ"].iter().any(|f| {
                fs::read(format!("/proc/{pid}/{f}"))
                    .is_ok_and(|b| String::from_utf8_lossy(&b).contains(&ours))
            });
            if names_us {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state/state.db");
        let config = dir.path().join("system.conf");
        fs::write(&config, "# test defaults\n").unwrap();
        let qmp_dir = dir.path().join("qmp");
        fs::create_dir_all(&qmp_dir).unwrap();
        Env {
            dir,
            state,
            config,
            qmp_dir,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Start a QSD test VM whose QMP socket is in this env's QMP dir.
    pub fn vm(&self, name: &str, disks: &[DiskSpec], nbd: bool) -> TestVm {
        TestVm::start(
            &self.qmp_dir,
            &self.path(&format!("vms/{name}")),
            name,
            disks,
            nbd,
        )
    }

    /// Register this env's QMP dir as platform `lab` and the directory
    /// `<env>/target` as target `target`.
    pub fn add_lab(&self, target: &str) {
        self.add_platform();
        let dir = self.path("target");
        fs::create_dir_all(&dir).unwrap();
        self.ok(&["target", "add", target, "--path", dir.to_str().unwrap()]);
    }

    /// Register this env's QMP dir as platform `lab`.
    pub fn add_platform(&self) {
        self.ok(&[
            "platform",
            "add",
            "lab",
            "--type",
            "qemu",
            "--qmp-dir",
            self.qmp_dir.to_str().unwrap(),
        ]);
    }

    /// `run-now RULE --level LEVEL --json`, expecting success: the point made
    /// for the rule's first VM.
    pub fn backup_point(&self, rule: &str, level: &str) -> String {
        let out = self.ok(&["--json", "run-now", rule, "--level", level]);
        let summary: serde_json::Value = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|v: &serde_json::Value| v["type"] == "summary")
            .unwrap_or_else(|| panic!("no summary: {out}"));
        summary["tasks"][0]["outcome"]["point"]
            .as_str()
            .unwrap_or_else(|| panic!("no point: {summary}"))
            .to_string()
    }

    /// `rule add NAME --platform P --vm VMS --target T EXTRA...`, expecting success.
    pub fn add_rule(&self, name: &str, platform: &str, vms: &str, target: &str, extra: &[&str]) {
        self.ok(&rule_add(name, platform, vms, target, extra));
    }

    /// `vmbackup` with this env's state and config.
    pub fn cmd(&self) -> assert_cmd::Command {
        let mut c = assert_cmd::Command::cargo_bin("vmbackup").unwrap();
        c.env("VMBACKUP_STATE", &self.state)
            .env("VMBACKUP_CONFIG", &self.config)
            .env_remove("XDG_STATE_HOME");
        c
    }

    /// `vmbackup` with this env's state and config as a plain std Command, for
    /// children a test runs side by side (spawn, signal, wait).
    pub fn child_cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmbackup"));
        c.env("VMBACKUP_STATE", &self.state)
            .env("VMBACKUP_CONFIG", &self.config)
            .env_remove("XDG_STATE_HOME")
            .stdin(Stdio::null());
        c
    }

    /// `vmbackup` with the test clock at `now` (`YYYY-MM-DD HH:MM:SS`), in UTC:
    /// point ids, schedules and retention then follow simulated days.
    pub fn cmd_at(&self, now: &str) -> assert_cmd::Command {
        let mut c = self.cmd();
        c.env("TZ", "UTC").env("VMBACKUP_TEST_NOW", now);
        c
    }

    /// `run-now RULE --level LEVEL --json`, at `now` when given: the exit code,
    /// the summary line (panics without one), and the tasks' log messages
    /// followed by stderr.
    pub fn run_now_at(
        &self,
        now: Option<&str>,
        rule: &str,
        level: &str,
    ) -> (i32, serde_json::Value, String) {
        let mut c = match now {
            Some(now) => self.cmd_at(now),
            None => self.cmd(),
        };
        let out = c
            .args(["--json", "run-now", rule, "--level", level])
            .output()
            .unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let summary = lines
            .iter()
            .find(|v| v["type"] == "summary")
            .cloned()
            .unwrap_or_else(|| panic!("run-now {rule} {level}: no summary: {out:?}"));
        let mut logs: Vec<String> = lines
            .iter()
            .filter(|v| v["type"] == "log")
            .map(|v| v["message"].as_str().unwrap_or_default().to_string())
            .collect();
        logs.push(String::from_utf8_lossy(&out.stderr).into_owned());
        (out.status.code().unwrap_or(-1), summary, logs.join("\n"))
    }

    /// `vmbackup ARGS` with the test clock at `now` (UTC wall time, `TZ=UTC`).
    pub fn run_at(&self, now: &str, args: &[&str]) -> std::process::Output {
        self.cmd()
            .env("TZ", "UTC")
            .env("VMBACKUP_TEST_NOW", now)
            .args(args)
            .output()
            .unwrap()
    }

    /// Run, expect exit 0, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "vmbackup {args:?} failed ({:?}):\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run, expect exit `code`, return stderr.
    pub fn fails(&self, code: i32, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "vmbackup {args:?}: expected exit {code}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Run with `--json`, expect exit 0, parse stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// Every row of every table, for "a refused command changes nothing" checks.
    pub fn dump(&self) -> String {
        if !self.state.exists() {
            return "(no state file)".into();
        }
        let conn = rusqlite::Connection::open(&self.state).unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut out = String::new();
        for t in tables {
            let mut st = conn.prepare(&format!("SELECT * FROM {t}")).unwrap();
            let n = st.column_count();
            let mut rows: Vec<String> = st
                .query_map([], |r| {
                    let mut line = Vec::new();
                    for i in 0..n {
                        let v: rusqlite::types::Value = r.get(i)?;
                        line.push(format!("{v:?}"));
                    }
                    Ok(line.join("|"))
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            rows.sort();
            out.push_str(&format!("[{t}]\n{}\n", rows.join("\n")));
        }
        out
    }

    /// Expect `args` to be refused with exit 2, a one-line error containing
    /// every one of `needles`, and no change to the state.
    pub fn refused(&self, args: &[&str], needles: &[&str]) {
        let before = self.dump();
        let err = self.fails(2, args);
        for n in needles {
            assert!(err.contains(n), "error for {args:?} lacks {n:?}:\n{err}");
        }
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "error is not one line:\n{err}"
        );
        assert_eq!(
            before,
            self.dump(),
            "refused command {args:?} changed the state"
        );
    }
}

/// A process a test starts itself (a hypervisor built by [`Qsd`] or
/// [`qemu_system`], a `vmbackup` from [`Env::spawn`]), killed when dropped.
pub struct Proc(Option<Child>);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// The child, for `try_wait` or `kill`.
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    /// Wait for it to end: its exit code and what it wrote to stderr (when piped).
    pub fn wait(mut self) -> (Option<i32>, String) {
        let mut child = self.0.take().expect("running");
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (child.wait().unwrap().code(), err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A qemu-storage-daemon command line built step by step, for a VM that needs
/// more than [`TestVm`] gives: objects on its command line, several QMP
/// monitors, an NBD server on TCP, another user. `start` waits until every
/// socket it listens on accepts.
#[derive(Default)]
pub struct Qsd {
    args: Vec<String>,
    sockets: Vec<PathBuf>,
    tcp: Option<u16>,
    user: Option<u32>,
}

impl Qsd {
    pub fn new() -> Qsd {
        Qsd::default()
    }

    /// A qcow2 disk: node `node` on `image`.
    pub fn qcow2_disk(mut self, node: &str, image: &Path) -> Qsd {
        self.args.extend([
            "--blockdev".into(),
            format!(
                "driver=file,node-name={node}-file,filename={}",
                image.display()
            ),
            "--blockdev".into(),
            format!("driver=qcow2,node-name={node},file={node}-file"),
        ]);
        self
    }

    /// A QMP monitor on the unix socket `path` (one more per call).
    pub fn qmp(mut self, path: &Path) -> Qsd {
        let id = format!("qmp{}", self.sockets.len());
        self.args.extend([
            "--chardev".into(),
            format!("socket,id={id},path={},server=on,wait=off", path.display()),
            "--monitor".into(),
            format!("chardev={id}"),
        ]);
        self.sockets.push(path.to_path_buf());
        self
    }

    /// The NBD server on a unix socket, with a writable export `guest` of `node`.
    pub fn nbd_unix(mut self, path: &Path, node: &str) -> Qsd {
        self.args.extend([
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", path.display()),
            "--export".into(),
            format!("type=nbd,id=guest,node-name={node},name=guest,writable=on"),
        ]);
        self.sockets.push(path.to_path_buf());
        self
    }

    /// The NBD server on plain TCP at 127.0.0.1:`port`, no export.
    pub fn nbd_tcp(mut self, port: u16) -> Qsd {
        self.args.extend([
            "--nbd-server".into(),
            format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        ]);
        self.tcp = Some(port);
        self
    }

    /// Any other arguments (`--object ...`).
    pub fn args(mut self, args: &[&str]) -> Qsd {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Run as user and group `id` (through setpriv).
    pub fn run_as(mut self, id: u32) -> Qsd {
        self.user = Some(id);
        self
    }

    pub fn start(self) -> Proc {
        let mut cmd = match self.user {
            Some(id) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={id}"),
                    format!("--regid={id}"),
                    "--clear-groups".into(),
                    "qemu-storage-daemon".into(),
                ]);
                c
            }
            None => Command::new("qemu-storage-daemon"),
        };
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon");
        let proc = Proc(Some(child));
        wait_for(
            || {
                self.sockets.iter().all(|s| accepts(s))
                    && self
                        .tcp
                        .is_none_or(|p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok())
            },
            "qemu-storage-daemon sockets",
        );
        proc
    }
}

/// A qemu-system VM (TCG, paused, no OS) called `name` with QMP at `qmp` and
/// `extra` arguments (disks, devices).
pub fn qemu_system(qmp: &Path, name: &str, extra: &[String]) -> Proc {
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-S",
        ])
        .args(["-name", name])
        .args(extra)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    let proc = Proc(Some(child));
    wait_for(|| accepts(qmp), "qemu-system QMP socket");
    proc
}

/// A qcow2 image of `size` bytes whose first `len` bytes are `pattern`.
pub fn qcow2_image(path: &Path, size: u64, pattern: u8, len: u64) {
    let p = path.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p, &size.to_string()],
    );
    if len > 0 {
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {pattern:#x} 0 {len}"),
                p,
            ],
        );
    }
}

/// BLAKE3 hex of `size` bytes whose first `len` are `pattern`, zeros after.
pub fn pattern_digest(pattern: u8, len: u64, size: u64) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&vec![pattern; len as usize]);
    h.update(&vec![0u8; (size - len) as usize]);
    h.finalize().to_hex().to_string()
}

impl Env {
    /// `vmbackup ARGS` in the background with this env's state and config and
    /// the extra environment `vars` (stdout discarded, stderr piped).
    pub fn spawn(&self, args: &[&str], vars: &[(&str, &str)]) -> Proc {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin("vmbackup"));
        c.env("VMBACKUP_STATE", &self.state)
            .env("VMBACKUP_CONFIG", &self.config)
            .env_remove("XDG_STATE_HOME")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in vars {
            c.env(k, v);
        }
        Proc(Some(c.spawn().expect("start vmbackup")))
    }

    /// Wait until a task of this env is running and has read data; its id.
    pub fn wait_transferring(&self) -> i64 {
        let running = || {
            self.json(&["task", "list"])
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["status"] == "running" && t["bytes_done"].as_u64().unwrap_or(0) > 0)
                .map(|t| t["id"].as_i64().unwrap())
        };
        wait_for(|| running().is_some(), "a task transferring data");
        running().unwrap()
    }

    /// Restore `rule`'s `vm` (latest point unless `point`) into a fresh directory;
    /// the BLAKE3 hex of the raw image of `disk` (the directory is removed again).
    pub fn restored_digest(&self, rule: &str, vm: &str, point: Option<&str>, disk: &str) -> String {
        let dest = self.path(&format!(
            "restored-{rule}-{vm}-{}",
            point.unwrap_or("latest")
        ));
        let _ = fs::remove_dir_all(&dest);
        let mut args = vec!["restore", rule, "--vm", vm, "--to", dest.to_str().unwrap()];
        if let Some(p) = point {
            args.extend(["--point", p]);
        }
        self.ok(&args);
        let digest = file_digest(&dest.join(format!("{disk}.raw")));
        fs::remove_dir_all(&dest).unwrap();
        digest
    }
}
