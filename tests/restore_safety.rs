//! The restore write side as root in a directory others may write to (issue 8):
//! no file reached through a planted symlink, no child process handed a path an
//! attacker can pre-create, images 0600 unless `--mode` says otherwise, and what
//! a killed restore leaves is removed by `cleanup` or the next restore there.

mod common;
use common::*;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

struct Lab {
    env: Env,
    vm: TestVm,
    /// The disk's digest at the time of the backup (what a restore must give).
    want: String,
}

fn lab(size: u64) -> Lab {
    let env = Env::new();
    std::fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", size)], true);
    vm.write_random("disk0", 0, size, 7);
    env.add_lab("t");
    env.add_rule("r", "lab", "vm1", "t", &["--once", "2099-01-01 00:00"]);
    env.ok(&["run-now", "r", "--level", "full"]);
    let want = vm.shadow_digest("disk0");
    Lab { env, vm, want }
}

/// `vmbackup restore r --vm vm1 EXTRA...` started in the background.
fn spawn_restore(env: &Env, extra: &[&str]) -> Proc {
    let mut args = vec!["restore", "r", "--vm", "vm1"];
    args.extend_from_slice(extra);
    env.spawn(&args, &[])
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn qcow2_digest(env: &Env, image: &Path) -> String {
    let raw = env.path("converted.raw");
    let _ = std::fs::remove_file(&raw);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    file_digest(&raw)
}

#[test]
fn a_symlink_planted_in_the_destination_is_never_followed() {
    let l = lab(16 * MIB);
    let dest = l.env.path("shared");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o777)).unwrap();
    let victim = l.env.path("victim");
    std::fs::write(&victim, "root's precious file").unwrap();

    let child = spawn_restore(
        &l.env,
        &["--to", dest.to_str().unwrap(), "--format", "qcow2"],
    );
    // What an attacker can predict from the restore's pid: the name qemu-img was
    // once told to write to, and the raw intermediate.
    let pid = child.pid();
    for name in [
        format!(".disk0.qcow2.partial-{pid}.qcow2"),
        format!(".disk0.qcow2.partial-{pid}.raw.qcow2"),
    ] {
        std::os::unix::fs::symlink(&victim, dest.join(name)).unwrap();
    }
    let (code, err) = child.wait();
    assert_eq!(code, Some(0), "{err}");
    let now = std::fs::read(&victim).unwrap();
    assert!(
        now == b"root's precious file",
        "the restore wrote through a planted symlink: the victim now holds {} bytes starting {:?}",
        now.len(),
        String::from_utf8_lossy(&now[..now.len().min(4)])
    );
    let image = dest.join("disk0.qcow2");
    let meta = std::fs::symlink_metadata(&image).unwrap();
    assert!(
        meta.file_type().is_file(),
        "{image:?} is not a regular file"
    );
    assert_eq!(qcow2_digest(&l.env, &image), l.want);
    // Only the image and the attacker's own symlinks are there: no staging left.
    let left: Vec<String> = names_in(&dest)
        .into_iter()
        .filter(|n| !n.contains(&format!("partial-{pid}")))
        .collect();
    assert_eq!(left, ["disk0.qcow2"]);
}

#[test]
fn a_symlink_at_the_final_name_is_refused_without_force() {
    let l = lab(4 * MIB);
    let dest = l.env.path("out");
    std::fs::create_dir_all(&dest).unwrap();
    // A dangling symlink where the image goes: it "does not exist" to stat(2).
    std::os::unix::fs::symlink(l.env.path("nowhere/x"), dest.join("disk0.raw")).unwrap();
    let err = l.env.fails(
        2,
        &[
            "restore",
            "r",
            "--vm",
            "vm1",
            "--to",
            dest.to_str().unwrap(),
        ],
    );
    assert!(err.contains("--force"), "{err}");
    assert!(
        std::fs::symlink_metadata(dest.join("disk0.raw"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the symlink was replaced without --force"
    );
    // With --force the symlink itself is replaced; nothing is written through it.
    l.env.ok(&[
        "restore",
        "r",
        "--vm",
        "vm1",
        "--to",
        dest.to_str().unwrap(),
        "--force",
    ]);
    assert!(!l.env.path("nowhere").exists());
    let meta = std::fs::symlink_metadata(dest.join("disk0.raw")).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(file_digest(&dest.join("disk0.raw")), l.want);
}

#[test]
fn restored_images_are_0600_unless_mode_says_otherwise() {
    let l = lab(4 * MIB);
    for (format, ext) in [("raw", "raw"), ("qcow2", "qcow2")] {
        let dest = l.env.path(&format!("plain-{format}"));
        l.env.ok(&[
            "restore",
            "r",
            "--vm",
            "vm1",
            "--to",
            dest.to_str().unwrap(),
            "--format",
            format,
        ]);
        let image = dest.join(format!("disk0.{ext}"));
        let mode = std::fs::metadata(&image).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o600, "{image:?} has mode {mode:o}");
        // A destination vmbackup had to create is private too.
        let dir_mode = std::fs::metadata(&dest).unwrap().mode() & 0o7777;
        assert_eq!(dir_mode, 0o700, "{dest:?} has mode {dir_mode:o}");
    }
    let dest = l.env.path("shared-0640");
    l.env.ok(&[
        "restore",
        "r",
        "--vm",
        "vm1",
        "--to",
        dest.to_str().unwrap(),
        "--mode",
        "0640",
    ]);
    let mode = std::fs::metadata(dest.join("disk0.raw")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    assert_eq!(file_digest(&dest.join("disk0.raw")), l.want);
    for bad in ["0999", "4755", "rw-r-----", ""] {
        l.env.refused(
            &[
                "restore",
                "r",
                "--vm",
                "vm1",
                "--to",
                l.env.path("never").to_str().unwrap(),
                "--mode",
                bad,
            ],
            &["--mode"],
        );
    }
    assert!(!l.env.path("never").exists());
}

/// Start a restore, SIGKILL it once it has begun writing, return the destination.
fn killed_restore(l: &Lab, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    let mut child = spawn_restore(&l.env, &["--to", dest.to_str().unwrap()]);
    let started = Instant::now();
    // Wait until image data is being written (a file, directly in the
    // destination or in a directory inside it).
    let writing = || {
        std::fs::read_dir(dest).unwrap().any(|e| {
            let p = e.unwrap().path();
            p.is_file()
                || (p.is_dir() && std::fs::read_dir(&p).is_ok_and(|mut d| d.next().is_some()))
        })
    };
    loop {
        if writing() {
            break;
        }
        assert!(
            child.child().try_wait().unwrap().is_none(),
            "the restore ended before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing written"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.child().kill().unwrap();
    child.wait();
    assert!(
        !names_in(dest).is_empty(),
        "the killed restore left nothing to test"
    );
}

#[test]
fn cleanup_removes_what_a_killed_restore_left() {
    let l = lab(64 * MIB);
    let dest = l.env.path("killed");
    killed_restore(&l, &dest);
    // The task row says where the restore wrote.
    let tasks = l.env.json(&["task", "list", "--all"]);
    let row = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "restore")
        .unwrap()
        .clone();
    let staging = row["staging"].as_str().unwrap_or_else(|| panic!("{row}"));
    assert!(
        Path::new(staging).starts_with(dest.canonicalize().unwrap()),
        "{row}"
    );
    assert!(Path::new(staging).is_dir(), "{row}");
    let out = l.env.ok(&["cleanup", "r"]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(names_in(&dest), Vec::<String>::new(), "{out}");
    let tasks = l.env.json(&["task", "list", "--all"]);
    let restore = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "restore")
        .unwrap()
        .clone();
    assert_eq!(restore["status"], "interrupted", "{restore}");
}

#[test]
fn the_next_restore_into_the_directory_removes_what_a_killed_one_left() {
    let l = lab(64 * MIB);
    let dest = l.env.path("killed");
    killed_restore(&l, &dest);
    l.env.ok(&[
        "restore",
        "r",
        "--vm",
        "vm1",
        "--to",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(names_in(&dest), ["disk0.raw"]);
    assert_eq!(file_digest(&dest.join("disk0.raw")), l.want);
    drop(l.vm);
}
