//! Failure tests of the backup engine, end to end: the real binary against real
//! qemu-storage-daemon VMs, with targets on real (tmpfs, ramfs) file systems.
//!
//! The invariant every test checks: a restored point is byte-identical to the VM
//! disk at snapshot time (the shadow copy kept when the backup ran), and after any
//! failure no change is lost: the next incremental restores byte-exact (R26, R44).

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

const RULE: &str = "r1";
const VM: &str = "vm1";
const DISK: &str = "disk0";

/// One VM with one qcow2 disk, a platform, a target and a rule protecting the VM.
/// Field order is drop order: the VM stops and the target is unmounted before the
/// temp dir goes.
struct Lab {
    vm: TestVm,
    mount: Option<Mount>,
    target: PathBuf,
    env: Env,
}

impl Lab {
    /// A lab whose target is a directory in the env.
    fn new(disk_size: u64) -> Lab {
        let env = Env::new();
        let target = env.path("target");
        fs::create_dir_all(&target).unwrap();
        Lab::with_target(env, target, None, disk_size)
    }

    /// A lab whose target is a tmpfs of `size` bytes.
    fn on_tmpfs(disk_size: u64, size: u64) -> Lab {
        Lab::on_mount(disk_size, |target| Mount::tmpfs(target, size))
    }

    /// A lab whose target is the file system `mount` mounts on the directory.
    fn on_mount(disk_size: u64, mount: impl FnOnce(&Path) -> Mount) -> Lab {
        let env = Env::new();
        let target = env.path("target");
        fs::create_dir_all(&target).unwrap();
        let mount = mount(&target);
        Lab::with_target(env, target, Some(mount), disk_size)
    }

    fn with_target(env: Env, target: PathBuf, mount: Option<Mount>, disk_size: u64) -> Lab {
        let vm = env.vm(VM, &[DiskSpec::qcow2(DISK, disk_size)], true);
        let qmp_dir = env.qmp_dir.to_str().unwrap().to_string();
        env.ok(&[
            "platform",
            "add",
            "lab",
            "--type",
            "qemu",
            "--qmp-dir",
            &qmp_dir,
        ]);
        env.ok(&["target", "add", "t", "--path", target.to_str().unwrap()]);
        env.add_rule(
            RULE,
            "lab",
            VM,
            "t",
            &[
                "--schedule",
                "full weekly on sun at 01:00",
                "--schedule",
                "inc weekly on mon-sat at 01:00",
                "--retention",
                "2",
            ],
        );
        Lab {
            vm,
            mount,
            target,
            env,
        }
    }

    fn repo(&self) -> PathBuf {
        self.target.join(RULE)
    }

    fn vm_dir(&self) -> PathBuf {
        self.repo().join("vms/lab").join(VM)
    }

    fn run_dir(&self) -> PathBuf {
        self.env.path("state/run")
    }

    /// `run-now --json`: exit code, JSON lines, stderr.
    fn run_now(&self, level: &str) -> Run {
        let out = self
            .env
            .cmd()
            .args(["--json", "run-now", RULE, "--level", level])
            .output()
            .unwrap();
        Run::parse(out.status.code(), &out.stdout, &out.stderr)
    }

    /// `run-now` as a child process, for signals.
    fn spawn_run_now(&self, level: &str) -> RunNowChild {
        let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("vmbackup"));
        cmd.env("VMBACKUP_STATE", &self.env.state)
            .env("VMBACKUP_CONFIG", &self.env.config)
            .env_remove("XDG_STATE_HOME")
            .args(["--json", "run-now", RULE, "--level", level])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        RunNowChild {
            child: Some(cmd.spawn().expect("start vmbackup run-now")),
        }
    }

    /// A backup that must succeed at `level` (exit 0); returns its point id.
    fn backup(&self, level: &str) -> String {
        let run = self.run_now(level);
        assert_eq!(run.code, Some(0), "run-now {level}: {run:?}");
        let o = run.outcome();
        assert_eq!(o["level"], level, "{run:?}");
        o["point"].as_str().unwrap().to_string()
    }

    /// Committed points, oldest first: (id, level).
    fn points(&self) -> Vec<(String, String)> {
        let v = self.env.json(&["points", RULE, "--vm", VM]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["point"].as_str().unwrap().to_string(),
                    p["level"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Restore `point` as raw and compare with the shadow copy `expected`.
    fn assert_restores(&self, point: &str, expected: &Path) {
        self.assert_restores_in(&self.env.path("."), point, expected);
    }

    /// [`Lab::assert_restores`], restoring into a directory under `dir`.
    fn assert_restores_in(&self, dir: &Path, point: &str, expected: &Path) {
        let to = dir.join(format!("restore-{point}"));
        self.env.ok(&[
            "restore",
            RULE,
            "--vm",
            VM,
            "--point",
            point,
            "--to",
            to.to_str().unwrap(),
        ]);
        assert_eq!(
            file_digest(&to.join(format!("{DISK}.raw"))),
            file_digest(expected),
            "restored point {point} differs from the disk at backup time"
        );
        fs::remove_dir_all(&to).unwrap();
    }

    /// Everything of vmbackup's left in QEMU and the run dir (empty = clean).
    fn leftovers(&self) -> Vec<String> {
        let r = self.vm.qmp(&[
            r#"{"execute":"query-block-exports"}"#,
            r#"{"execute":"query-block-jobs"}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        ]);
        let mut found = Vec::new();
        for e in r[0]["return"].as_array().unwrap() {
            let id = e["id"].as_str().unwrap();
            if id.starts_with("vmbackup-") {
                found.push(format!("export {id}"));
            }
        }
        for j in r[1]["return"].as_array().unwrap() {
            found.push(format!("job {}", j["device"]));
        }
        for n in r[2]["return"].as_array().unwrap() {
            let name = n["node-name"].as_str().unwrap();
            if name.starts_with("vmbackup-") {
                found.push(format!("node {name}"));
            }
            for b in n["dirty-bitmaps"].as_array().cloned().unwrap_or_default() {
                let b = b["name"].as_str().unwrap_or_default();
                if b.starts_with("vmbackup-tmp-") {
                    found.push(format!("bitmap {b} on {name}"));
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.run_dir()) {
            for e in entries {
                found.push(format!("run dir file {:?}", e.unwrap().file_name()));
            }
        }
        found
    }

    /// Our bitmaps on the disk: (name, recording, inconsistent), sorted.
    fn bitmaps(&self) -> Vec<(String, bool, bool)> {
        let r = self
            .vm
            .qmp(&[r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#]);
        let mut out = Vec::new();
        for n in r[0]["return"].as_array().unwrap() {
            if n["node-name"] != DISK {
                continue;
            }
            for b in n["dirty-bitmaps"].as_array().cloned().unwrap_or_default() {
                out.push((
                    b["name"].as_str().unwrap().to_string(),
                    b["recording"].as_bool().unwrap(),
                    b["inconsistent"].as_bool().unwrap_or(false),
                ));
            }
        }
        out.sort();
        out
    }

    /// The newest backup task row: (id, state, phase).
    fn last_task(&self) -> Option<(i64, String, Option<String>)> {
        let conn = rusqlite::Connection::open(&self.env.state).ok()?;
        conn.query_row(
            "SELECT id, state, phase FROM tasks WHERE kind = 'backup' ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok()
    }

    /// Point directories in the repository, committed or not (none when the
    /// VM has no object in the repository yet).
    fn point_dirs(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.vm_dir()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    /// Write `mib` MiB of random data in 16 MiB pieces from `offset`.
    fn write_random_mib(&self, offset: u64, mib: u64, seed: u64) {
        for i in 0..mib.div_ceil(16) {
            let len = (mib - i * 16).min(16) * MIB;
            self.vm
                .write_random(DISK, offset + i * 16 * MIB, len, seed + i);
        }
    }

    /// Start a backup in a child and stop it (SIGSTOP) while it reads the disks.
    fn stopped_mid_backup(&self, level: &str) -> RunNowChild {
        let before = self.last_task().map(|t| t.0);
        let mut child = self.spawn_run_now(level);
        let pid = child.pid();
        wait_long(
            || {
                assert!(child.running(), "run-now exited before it could be stopped");
                self.last_task().is_some_and(|(id, state, phase)| {
                    Some(id) != before && state == "running" && phase.as_deref() == Some("running")
                })
            },
            "the backup task's phase 'running'",
        );
        signal(pid, "STOP");
        let (_, state, _) = self.last_task().unwrap();
        assert_eq!(
            state, "running",
            "the backup finished before it could be interrupted"
        );
        child
    }
}

/// The result of one `run-now --json`.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    lines: Vec<Value>,
    stderr: String,
}

impl Run {
    fn parse(code: Option<i32>, stdout: &[u8], stderr: &[u8]) -> Run {
        let lines = String::from_utf8_lossy(stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        Run {
            code,
            lines,
            stderr: String::from_utf8_lossy(stderr).into_owned(),
        }
    }

    fn summary(&self) -> &Value {
        self.lines
            .iter()
            .find(|l| l["type"] == "summary")
            .unwrap_or_else(|| panic!("no summary: {self:?}"))
    }

    fn vm(&self) -> &Value {
        &self.summary()["tasks"][0]
    }

    fn outcome(&self) -> &Value {
        &self.vm()["outcome"]
    }

    /// Every warning logged, one string.
    fn warnings(&self) -> String {
        self.lines
            .iter()
            .filter(|l| l["type"] == "log" && l["level"] == "warn")
            .map(|l| l["message"].as_str().unwrap_or_default().to_string() + "\n")
            .collect()
    }
}

/// A `run-now` child process, killed on drop.
struct RunNowChild {
    child: Option<Child>,
}

impl RunNowChild {
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    fn wait(mut self) -> Run {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        Run::parse(out.status.code(), &out.stdout, &out.stderr)
    }
}

impl Drop for RunNowChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    run("kill", &[&format!("-{sig}"), &pid.to_string()]);
}

/// Poll `cond` until it holds; a guard against hanging forever, not a timing check.
fn wait_long(mut cond: impl FnMut() -> bool, what: &str) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A file system mounted for the test, unmounted on drop.
struct Mount {
    path: PathBuf,
}

impl Mount {
    /// A tmpfs of `size` bytes.
    fn tmpfs(path: &Path, size: u64) -> Mount {
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                path.to_str().unwrap(),
            ],
        );
        Mount { path: path.into() }
    }

    /// A ramfs: a file system that refuses O_DIRECT at open.
    fn ramfs(path: &Path) -> Mount {
        run("mount", &["-t", "ramfs", "ramfs", path.to_str().unwrap()]);
        Mount { path: path.into() }
    }

    fn remount(&self, opts: &str) {
        run(
            "mount",
            &[
                "-o",
                &format!("remount,{opts}"),
                self.path.to_str().unwrap(),
            ],
        );
    }

    /// Bytes in use.
    fn used(&self) -> u64 {
        let out = run("df", &["-B1", "--output=used", self.path.to_str().unwrap()]);
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Files under `dir` whose names contain `needle`, recursively.
fn files_named(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_named(&p, needle));
        } else if p.file_name().unwrap().to_string_lossy().contains(needle) {
            out.push(p);
        }
    }
    out
}

fn inc_bitmap(point: &str) -> String {
    format!("vmbackup-inc-{point}")
}

fn diff_bitmap(point: &str) -> String {
    format!("vmbackup-diff-{point}")
}

/// After a full `f` (and nothing else committed), tracking is "since f" twice.
fn tracking_since(f: &str) -> Vec<(String, bool, bool)> {
    vec![(diff_bitmap(f), true, false), (inc_bitmap(f), true, false)]
}

/// A full of a 256 MiB disk with a little data, then ~200 MiB of new guest data:
/// the inc after it reads long enough to be interrupted.
fn lab_with_big_change() -> (Lab, String) {
    let lab = Lab::new(256 * MIB);
    lab.vm.write(DISK, 0, MIB, 0x5a);
    let full = lab.backup("full");
    lab.write_random_mib(16 * MIB, 200, 100);
    (lab, full)
}

#[test]
fn r44_sigkill_mid_backup_then_cleanup_then_inc_restores() {
    let (lab, full) = lab_with_big_change();
    let child = lab.stopped_mid_backup("inc");
    // Stopped while reading: no index is written yet, so the point has no
    // object in the repository (a store has no empty directories); only the
    // chunks it stored, which GC removes.
    assert_eq!(lab.point_dirs(), vec![full.clone()]);
    signal(child.pid(), "KILL");
    let run = child.wait();
    assert_eq!(run.code, None, "killed by a signal: {run:?}");

    // No new point; tracking since the full is still there, nothing lost.
    assert_eq!(lab.points(), vec![(full.clone(), "full".to_string())]);
    let names: Vec<String> = lab.bitmaps().into_iter().map(|b| b.0).collect();
    assert!(names.contains(&inc_bitmap(&full)), "{names:?}");
    assert!(names.contains(&diff_bitmap(&full)), "{names:?}");
    assert!(!lab.leftovers().is_empty(), "a killed run leaves its view");
    // Tracked only by the killed run's new bitmap: cleanup must merge it back.
    lab.vm.write(DISK, 240 * MIB, MIB, 0xa1);

    let out = lab.env.ok(&["cleanup", RULE]);
    assert!(out.contains("removed NBD export vmbackup-disk0"), "{out}");
    assert!(out.contains("merged uncommitted bitmap"), "{out}");
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    assert_eq!(lab.bitmaps(), tracking_since(&full));
    assert_eq!(lab.point_dirs(), vec![full.clone()]);
    assert_eq!(lab.env.ok(&["cleanup", RULE]).trim(), "nothing to clean up");

    let expected = lab.vm.keep_shadow(DISK, "inc");
    let inc = lab.backup("inc");
    lab.assert_restores(&inc, &expected);
    assert_eq!(lab.point_dirs(), vec![full, inc]);
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}

#[test]
fn r44_sigkill_mid_backup_next_run_cleans_up_by_itself() {
    let (lab, full) = lab_with_big_change();
    let child = lab.stopped_mid_backup("inc");
    signal(child.pid(), "KILL");
    assert_eq!(child.wait().code, None);
    assert!(!lab.leftovers().is_empty());
    lab.vm.write(DISK, 240 * MIB, MIB, 0xa2);

    let expected = lab.vm.keep_shadow(DISK, "inc");
    let run = lab.run_now("inc");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.outcome()["level"], "inc");
    assert_eq!(run.outcome()["base"], full.as_str());
    // The runner reclaims the dead task's lease before the new run and cleans up
    // its leftovers (R44), reporting on stderr and in the dead task's log.
    assert!(
        run.stderr.contains("cleanup after the interrupted run")
            && run.stderr.contains("removed NBD export"),
        "{run:?}"
    );
    let inc = run.outcome()["point"].as_str().unwrap().to_string();
    lab.assert_restores(&inc, &expected);
    assert_eq!(lab.point_dirs(), vec![full, inc.clone()]);
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    assert_eq!(
        lab.bitmaps(),
        vec![
            (diff_bitmap(&lab.points()[0].0), true, false),
            (inc_bitmap(&inc), true, false)
        ]
    );
}

#[test]
fn r44_sigkill_mid_diff_then_cleanup_removes_the_frozen_copy() {
    let (lab, full) = lab_with_big_change();
    let child = lab.stopped_mid_backup("diff");
    signal(child.pid(), "KILL");
    assert_eq!(child.wait().code, None);
    let left = lab.leftovers();
    assert!(
        left.iter().any(|l| l.starts_with("bitmap vmbackup-tmp-")),
        "a diff exports a frozen copy of the diff bitmap: {left:?}"
    );
    lab.vm.write(DISK, 240 * MIB, MIB, 0xa4);

    let out = lab.env.ok(&["cleanup", RULE]);
    assert!(
        out.contains("removed temporary bitmap vmbackup-tmp-"),
        "{out}"
    );
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    assert_eq!(lab.bitmaps(), tracking_since(&full));

    let expected = lab.vm.keep_shadow(DISK, "diff");
    let diff = lab.backup("diff");
    lab.assert_restores(&diff, &expected);
}

#[test]
fn sigint_mid_backup_exits_130_and_rolls_back() {
    let (lab, full) = lab_with_big_change();
    let child = lab.stopped_mid_backup("inc");
    // A write during the run: after the snapshot, so only the rollback keeps it.
    lab.vm.write(DISK, 240 * MIB, MIB, 0xa3);
    signal(child.pid(), "INT");
    signal(child.pid(), "CONT");
    let run = child.wait();
    assert_eq!(run.code, Some(130), "{run:?}");
    assert_eq!(run.vm()["status"], "interrupted", "{run:?}");
    assert_eq!(lab.last_task().unwrap().1, "interrupted");
    assert_eq!(lab.points(), vec![(full.clone(), "full".to_string())]);
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    assert_eq!(lab.bitmaps(), tracking_since(&full));
    assert_eq!(lab.point_dirs(), vec![full.clone()]);

    let expected = lab.vm.keep_shadow(DISK, "inc");
    let inc = lab.backup("inc");
    lab.assert_restores(&inc, &expected);
}

#[test]
fn r26_qemu_killed_after_full_bitmap_missing_runs_full() {
    let mut lab = Lab::new(32 * MIB);
    lab.vm.write_random(DISK, 0, 4 * MIB, 1);
    let full = lab.backup("full");
    lab.vm.kill();
    lab.vm.restart();
    assert_eq!(lab.bitmaps(), vec![], "QEMU never stored the bitmaps");
    lab.vm.write_random(DISK, 8 * MIB, 2 * MIB, 2);

    let expected = lab.vm.keep_shadow(DISK, "fallback");
    let run = lab.run_now("inc");
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.summary()["exit_code"], 1);
    let o = run.outcome();
    assert_eq!(o["level"], "full");
    assert_eq!(o["requested"], "inc");
    assert_eq!(o["fallback_planned"], false, "tracking lost is unexpected");
    let why = o["fallback"].as_str().unwrap();
    assert!(
        why.contains(&format!("no bitmap for point {full}")),
        "{why}"
    );
    assert!(run.warnings().contains(why), "{run:?}");
    let point = o["point"].as_str().unwrap();
    lab.assert_restores(point, &expected);
    assert_eq!(lab.bitmaps(), tracking_since(point));

    lab.vm.write(DISK, 20 * MIB, MIB, 0x33);
    let expected = lab.vm.keep_shadow(DISK, "inc");
    let inc = lab.backup("inc");
    lab.assert_restores(&inc, &expected);
}

#[test]
fn r26_qemu_killed_with_stored_bitmap_inconsistent_runs_full() {
    let mut lab = Lab::new(32 * MIB);
    lab.vm.write_random(DISK, 0, 4 * MIB, 1);
    let full = lab.backup("full");
    lab.vm.quit();
    lab.vm.restart();
    assert_eq!(
        lab.bitmaps(),
        tracking_since(&full),
        "stored by a clean quit"
    );
    lab.vm.write_random(DISK, 8 * MIB, 2 * MIB, 2);
    lab.vm.kill();
    lab.vm.restart();
    let names: Vec<(String, bool)> = lab.vm.bitmaps(DISK);
    assert_eq!(
        names,
        vec![(diff_bitmap(&full), true), (inc_bitmap(&full), true)],
        "an unclean stop marks stored bitmaps inconsistent"
    );

    let expected = lab.vm.keep_shadow(DISK, "fallback");
    let run = lab.run_now("inc");
    assert_eq!(run.code, Some(1), "{run:?}");
    let o = run.outcome();
    assert_eq!(o["level"], "full");
    let why = o["fallback"].as_str().unwrap();
    assert!(why.contains("inconsistent"), "fallback reason: {why}");
    let warnings = run.warnings();
    assert!(
        warnings.contains(&format!(
            "removed inconsistent bitmap {}",
            inc_bitmap(&full)
        )),
        "{warnings}"
    );
    let point = o["point"].as_str().unwrap();
    lab.assert_restores(point, &expected);
    assert_eq!(
        lab.bitmaps(),
        tracking_since(point),
        "the inconsistent bitmaps are gone"
    );

    lab.vm.write(DISK, 20 * MIB, MIB, 0x44);
    let expected = lab.vm.keep_shadow(DISK, "inc");
    let inc = lab.backup("inc");
    lab.assert_restores(&inc, &expected);
}

#[test]
fn corrupt_chunk_fails_verify_and_restore_with_exit_3() {
    let lab = Lab::new(16 * MIB);
    lab.vm.write_random(DISK, 0, 4 * MIB, 9);
    let full = lab.backup("full");
    let chunks = files_named(&lab.repo().join("chunks"), "");
    assert!(!chunks.is_empty());
    let victim = &chunks[0];
    let digest = victim.file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(victim, &bytes).unwrap();

    let out = lab.env.cmd().args(["verify", RULE]).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}");
    for needle in [full.as_str(), DISK, digest.as_str()] {
        assert!(
            text.contains(needle),
            "verify output lacks {needle:?}:\n{text}"
        );
    }

    let to = lab.env.path("restore");
    let err = lab.env.fails(
        3,
        &["restore", RULE, "--vm", VM, "--to", to.to_str().unwrap()],
    );
    assert!(err.contains(&digest), "{err}");
    // Progress lines aside (stderr is not a terminal), the error is one line.
    let errors: Vec<&str> = err.lines().filter(|l| !l.contains("vm1/disk0 ")).collect();
    assert_eq!(errors.len(), 1, "one-line error: {err}");
    let left: Vec<_> = fs::read_dir(&to)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "restore left files behind: {left:?}");
}

/// The compress-then-check guarantee (docs/FORMAT.md, "What guarantees a chunk
/// decodes to its digest"): with the test fault hook flipping a byte of every
/// compressed payload, the backup fails and stores no chunk, no point; without
/// it, the next full stores and restores byte-exact.
#[test]
fn corrupted_compressor_output_fails_the_backup_and_stores_nothing() {
    let lab = Lab::new(16 * MIB);
    lab.vm.write(DISK, 0, 8 * MIB, 0x41);
    let out = lab
        .env
        .cmd()
        .env("VMBACKUP_TEST_CORRUPT_COMPRESSOR", "1")
        .args(["--json", "run-now", RULE, "--level", "full"])
        .output()
        .unwrap();
    let run = Run::parse(out.status.code(), &out.stdout, &out.stderr);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stderr.contains("zstd round trip of a new payload"),
        "{}",
        run.stderr
    );
    assert_eq!(lab.points(), vec![]);
    assert_eq!(lab.point_dirs(), Vec::<String>::new());
    assert_eq!(
        files_named(&lab.repo().join("chunks"), ""),
        Vec::<PathBuf>::new()
    );
    assert_eq!(files_named(&lab.repo(), ".tmp-"), Vec::<PathBuf>::new());
    assert_eq!(lab.leftovers(), Vec::<String>::new());

    let expected = lab.vm.keep_shadow(DISK, "full");
    let full = lab.backup("full");
    lab.assert_restores(&full, &expected);
}

/// A target on a file system that refuses O_DIRECT at open (ramfs; tmpfs before
/// Linux 6.6): chunk objects and the restored image go through the page cache,
/// and a full and an inc restore exact onto the same file system. (A refused
/// open has already created the file: the page-cache write must not open the
/// name anew, or every chunk write fails.)
#[test]
fn a_target_that_refuses_direct_io_backs_up_and_restores_exact() {
    let lab = Lab::on_mount(32 * MIB, Mount::ramfs);
    lab.vm.write_random(DISK, 0, 6 * MIB, 1);
    lab.vm.write(DISK, 20 * MIB, MIB, 0x5a);
    let expected_full = lab.vm.keep_shadow(DISK, "full");
    let full = lab.backup("full");
    lab.vm.write_random(DISK, 8 * MIB, 2 * MIB, 2);
    let expected_inc = lab.vm.keep_shadow(DISK, "inc");
    let inc = lab.backup("inc");
    assert_eq!(files_named(&lab.repo(), ".tmp-"), Vec::<PathBuf>::new());
    lab.assert_restores_in(&lab.target, &full, &expected_full);
    lab.assert_restores_in(&lab.target, &inc, &expected_inc);
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}

#[test]
fn target_full_fails_cleanly_and_keeps_changes_tracked() {
    let lab = Lab::on_tmpfs(64 * MIB, 4 * MIB);
    let tmpfs = lab.mount.as_ref().unwrap();
    lab.vm.write_random(DISK, 0, 12 * MIB, 1);

    let run = lab.run_now("full");
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stderr.contains("No space left"), "{}", run.stderr);
    assert_eq!(lab.points(), vec![]);
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    assert_eq!(
        lab.bitmaps(),
        vec![],
        "a failed first full leaves no bitmaps"
    );
    assert_eq!(lab.point_dirs(), Vec::<String>::new());
    assert_eq!(files_named(&lab.repo(), ".tmp-"), Vec::<PathBuf>::new());

    tmpfs.remount(&format!("size={}", 64 * MIB));
    let expected = lab.vm.keep_shadow(DISK, "full");
    let full = lab.backup("full");
    lab.assert_restores(&full, &expected);

    // An inc that runs out of space after a good full.
    tmpfs.remount(&format!("size={}", tmpfs.used() + MIB));
    lab.vm.write_random(DISK, 32 * MIB, 8 * MIB, 2);
    let run = lab.run_now("inc");
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stderr.contains("No space left"), "{}", run.stderr);
    assert_eq!(lab.points(), vec![(full.clone(), "full".to_string())]);
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    assert_eq!(lab.bitmaps(), tracking_since(&full));
    assert_eq!(lab.point_dirs(), vec![full.clone()]);
    assert_eq!(files_named(&lab.repo(), ".tmp-"), Vec::<PathBuf>::new());

    tmpfs.remount(&format!("size={}", 64 * MIB));
    lab.vm.write(DISK, 50 * MIB, MIB, 0x77);
    let expected = lab.vm.keep_shadow(DISK, "inc");
    let run = lab.run_now("inc");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.outcome()["level"], "inc", "not a fallback full");
    assert_eq!(run.outcome()["base"], full.as_str());
    lab.assert_restores(run.outcome()["point"].as_str().unwrap(), &expected);
}

#[test]
fn target_read_only_fails_naming_the_path_and_leaves_the_vm_alone() {
    let lab = Lab::on_tmpfs(16 * MIB, 32 * MIB);
    let tmpfs = lab.mount.as_ref().unwrap();
    lab.vm.write_random(DISK, 0, 2 * MIB, 1);
    let full = lab.backup("full");
    lab.vm.write(DISK, 4 * MIB, MIB, 0x21);

    tmpfs.remount("ro");
    let before = lab.bitmaps();
    let run = lab.run_now("inc");
    assert_eq!(run.code, Some(3), "{run:?}");
    let err = run.vm()["error"].as_str().unwrap();
    assert!(err.contains(lab.target.to_str().unwrap()), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(lab.bitmaps(), before, "the VM's tracking is untouched");
    assert_eq!(before, tracking_since(&full));
    assert_eq!(lab.leftovers(), Vec::<String>::new());

    tmpfs.remount("rw");
    let expected = lab.vm.keep_shadow(DISK, "inc");
    let inc = lab.backup("inc");
    lab.assert_restores(&inc, &expected);
}

#[test]
fn second_run_of_the_same_vm_is_busy_and_the_first_completes() {
    let lab = Lab::new(128 * MIB);
    let full = lab.backup("full");
    lab.write_random_mib(0, 96, 7);
    let expected = lab.vm.keep_shadow(DISK, "inc");
    let first = lab.stopped_mid_backup("inc");

    let second = lab.run_now("inc");
    assert_eq!(second.code, Some(4), "{second:?}");
    assert_eq!(second.vm()["status"], "skipped");
    let err = second.vm()["error"].as_str().unwrap();
    assert!(err.contains("still running (R28)"), "{err}");

    signal(first.pid(), "CONT");
    let run = first.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.outcome()["level"], "inc");
    assert_eq!(run.outcome()["base"], full.as_str());
    lab.assert_restores(run.outcome()["point"].as_str().unwrap(), &expected);
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}
