//! The libvirt platform against a real (private) libvirtd with TCG domains, QEMU
//! running as libvirt's unprivileged user: discovery (R3, R36, R43), checkpoint
//! chains restored byte-exact against a shadow (R7, R26, R27), shut-off domains,
//! lost checkpoints, SIGKILL mid-backup (R44), quiesce through the guest agent (R10),
//! rule removal deleting vmbackup's checkpoints (R9).
//! The daemon comes from scripts/test.sh (or is started by the harness).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::json_doc::assert_documented;
use common::libvirt::{
    ext4_image, libvirtd_pid, remote_scratch_files, tcp_uri, tls_dir, uri, virsh, virsh_try, Boot,
    Disk, TestDomain,
};
use common::{file_digest, Env, MIB};
use serde_json::Value;

/// A vmbackup environment with platform `lv` (the private libvirtd), target `t`
/// and rule `r` protecting `dom`.
struct Lab {
    env: Env,
    dom: TestDomain,
}

fn lab(dom: TestDomain, rule_extra: &[&str]) -> Lab {
    lab_on(dom, &["--uri", &uri()], rule_extra)
}

/// [`lab`] with the platform added with `platform_args` (`--uri ...`).
fn lab_on(dom: TestDomain, platform_args: &[&str], rule_extra: &[&str]) -> Lab {
    let env = Env::new();
    let mut add = vec!["platform", "add", "lv", "--type", "libvirt"];
    add.extend_from_slice(platform_args);
    env.ok(&add);
    let target = env.path("target");
    std::fs::create_dir_all(&target).unwrap();
    env.ok(&["target", "add", "t", "--path", target.to_str().unwrap()]);
    let mut extra = vec!["--schedule", "full daily at 01:00"];
    extra.extend_from_slice(rule_extra);
    env.add_rule("r", "lv", &dom.name, "t", &extra);
    Lab { env, dom }
}

impl Lab {
    /// `run-now --json`: (exit code, the VM's summary entry, every JSON line).
    fn run_now(&self, level: &str) -> (i32, Value, Vec<Value>) {
        let out = self
            .env
            .cmd()
            .args(["--json", "run-now", "r", "--level", level])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_documented("vmbackup run-now", &stdout);
        let lines: Vec<Value> = stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let summary = lines
            .iter()
            .find(|v| v["type"] == "summary")
            .unwrap_or_else(|| {
                panic!(
                    "no summary: {lines:?}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .clone();
        (
            out.status.code().unwrap(),
            summary["tasks"][0].clone(),
            lines,
        )
    }

    /// A backup that must run at `level` and succeed; returns its point id and
    /// the log messages.
    fn backup(&self, requested: &str, level: &str, code: i32) -> (String, Vec<String>) {
        let (c, vm, lines) = self.run_now(requested);
        assert_eq!(c, code, "{requested} backup: {vm}\n{lines:?}");
        assert_eq!(vm["outcome"]["level"], level, "{vm}");
        (
            vm["outcome"]["point"].as_str().unwrap().to_string(),
            logs(&lines),
        )
    }

    /// Start an inc whose transfers pause all day, so it holds its backup job
    /// open; SIGKILL it once the job and its checkpoint (the `checkpoints`-th
    /// of ours) exist; check libvirt's job is left behind; lift the pause.
    fn kill_an_inc_with_its_job_open(&self, checkpoints: usize) {
        let d = &self.dom;
        self.env.ok(&[
            "rule",
            "edit",
            "r",
            "--bandwidth",
            "mon-sun 00:00-24:00 pause",
        ]);
        let mut run = spawn(&self.env, &[], &["run-now", "r", "--level", "inc"]);
        wait_until(
            || d.has_backup_job() && ours(&d.checkpoints()).len() == checkpoints,
            "the inc's backup job",
        );
        run.sigkill();
        assert!(
            d.has_backup_job(),
            "a killed run leaves libvirt's job behind"
        );
        self.env.ok(&["rule", "edit", "r", "--clear-bandwidth"]);
    }

    /// Restore `point` and return the digest of disk `target`.
    fn restored(&self, point: &str, target: &str) -> String {
        let dir = self.env.path(&format!("restore-{point}"));
        self.env.ok(&[
            "restore",
            "r",
            "--vm",
            &self.dom.name,
            "--point",
            point,
            "--to",
            dir.to_str().unwrap(),
        ]);
        file_digest(&dir.join(format!("{target}.raw")))
    }
}

fn logs(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["type"] == "log")
        .map(|l| {
            format!(
                "{}: {}",
                l["level"].as_str().unwrap_or(""),
                l["message"].as_str().unwrap_or("")
            )
        })
        .collect()
}

fn has(logs: &[String], needle: &str) -> bool {
    logs.iter().any(|l| l.contains(needle))
}

fn ours(cps: &[String]) -> Vec<String> {
    cps.iter()
        .filter(|c| c.starts_with("vmbackup-"))
        .cloned()
        .collect()
}

#[test]
fn discovery_lists_domains_disks_and_refuses_uncoverable_ones_r3_r36_r43() {
    let a = TestDomain::define(
        "disc-a",
        &[
            Disk::qcow2("vda", 16 * MIB),
            Disk {
                format: "raw",
                ..Disk::qcow2("vdb", 8 * MIB)
            },
        ],
        Boot::None,
        false,
    );
    a.start();
    let env = Env::new();
    let added = env.ok(&[
        "--json",
        "platform",
        "add",
        "lv",
        "--type",
        "libvirt",
        "--uri",
        &uri(),
    ]);
    assert_documented("vmbackup platform add", &added);
    let vms = env.json(&["platform", "vms", "lv"]);
    let vm = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == a.name.as_str())
        .unwrap_or_else(|| panic!("{} not listed: {vms}", a.name))
        .clone();
    assert_eq!(vm["status"], "running", "{vm}");
    let uuid = virsh(&["domuuid", &a.name]).trim().to_string();
    assert!(vm["identity"].as_str().unwrap().ends_with(&uuid), "{vm}");
    let disks = vm["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{vm}");
    assert_eq!(
        (
            &disks[0]["name"],
            &disks[0]["format"],
            &disks[0]["size"],
            &disks[0]["cbt"]
        ),
        (
            &Value::from("vda"),
            &Value::from("qcow2"),
            &Value::from(16 * MIB),
            &Value::from(true)
        )
    );
    assert_eq!(disks[0]["file"], a.image("vda").to_str().unwrap());
    assert_eq!(
        (&disks[1]["format"], &disks[1]["cbt"]),
        (&Value::from("raw"), &Value::from(false))
    );

    // A shut-off domain with a CD-ROM (skipped) and a shareable disk (R43), found
    // by `platform refresh` (R36).
    let b = TestDomain::define("disc-b", &[Disk::qcow2("vda", 8 * MIB)], Boot::None, false);
    let mut xml = virsh(&["dumpxml", &b.name, "--inactive"]);
    xml = xml.replace(
        "</devices>",
        &format!(
            "<disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
             <target dev='vdc' bus='virtio'/><shareable/></disk></devices>",
            b.work.join("shared.raw").display()
        ),
    );
    std::fs::File::create(b.work.join("shared.raw"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    std::fs::write(b.work.join("b.xml"), &xml).unwrap();
    virsh(&["define", b.work.join("b.xml").to_str().unwrap()]);
    let listed = |env: &Env| {
        env.json(&["platform", "vms", "lv"])
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == b.name.as_str())
            .cloned()
    };
    assert!(listed(&env).is_none(), "cached list, not refreshed yet");
    let refreshed = env.ok(&["--json", "platform", "refresh", "lv"]);
    assert_documented("vmbackup platform refresh", &refreshed);
    let vb = listed(&env).expect("refresh lists the new domain");
    // What scripts read of a libvirt platform is what docs/JSON.md says.
    for (command, args) in [
        ("vmbackup platform list", &["platform", "list"][..]),
        ("vmbackup platform show", &["platform", "show", "lv"]),
        ("vmbackup platform vms", &["platform", "vms", "lv"]),
    ] {
        let out = env.ok(&[&["--json"][..], args].concat());
        assert_documented(command, &out);
    }
    let shown = env.json(&["platform", "show", "lv"]);
    assert_eq!(
        (
            &shown["type"],
            &shown["uri"],
            &shown["qmp_dir"],
            &shown["tls_dir"]
        ),
        (
            &Value::from("libvirt"),
            &Value::from(uri()),
            &Value::Null,
            &Value::Null
        ),
        "{shown}"
    );
    assert_eq!(vb["status"], "shut off", "{vb}");
    let names: Vec<&str> = vb["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vda", "vdc"], "the CD-ROM is skipped: {vb}");
    assert!(
        vb["disks"][1]["uncoverable"]
            .as_str()
            .unwrap()
            .contains("shareable"),
        "{vb}"
    );
    let target = env.path("target");
    std::fs::create_dir_all(&target).unwrap();
    env.ok(&["target", "add", "t", "--path", target.to_str().unwrap()]);
    env.refused(
        &[
            "rule",
            "add",
            "r",
            "--platform",
            "lv",
            "--vm",
            &b.name,
            "--target",
            "t",
            "--schedule",
            "full daily at 01:00",
        ],
        &["vdc", "shareable"],
    );
    // Bad platform input changes nothing (exit 2, one line naming the field).
    env.refused(
        &["platform", "add", "x", "--type", "libvirt"],
        &["--uri", "required"],
    );
    env.refused(
        &[
            "platform",
            "add",
            "x",
            "--type",
            "libvirt",
            "--uri",
            &uri(),
            "--qmp-dir",
            "/tmp",
        ],
        &["--qmp-dir", "--type qemu"],
    );
}

#[test]
fn running_domain_full_inc_diff_chain_restores_byte_exact_r7_r27() {
    let dom = TestDomain::define("chain", &[Disk::qcow2("vda", 32 * MIB)], Boot::None, false);
    dom.start();
    let l = lab(dom, &[]);
    let d = &l.dom;
    // Another tool's checkpoint: left alone, and it does not disturb ours.
    virsh(&[
        "checkpoint-create-as",
        &d.name,
        "--name",
        "othertool.0",
        "--diskspec",
        "vda,checkpoint=bitmap",
    ]);
    d.write_random("vda", 0, 4 * MIB, 1);
    d.write("vda", 20 * MIB, MIB, 0x5a);

    let (p1, _) = l.backup("inc", "full", 0); // R27: no full yet (planned: exit 0)
    let e1 = d.shadow_digest("vda");
    assert_eq!(ours(&d.checkpoints()), [format!("vmbackup-{p1}")]);

    d.write("vda", MIB, 64 * 1024, 0x11);
    d.write_random("vda", 10 * MIB, 3 * MIB, 2);
    let (p2, _) = l.backup("inc", "inc", 0);
    let e2 = d.shadow_digest("vda");
    // The next inc's base (p2) and the next diff's (the full p1) stay.
    assert_eq!(
        ours(&d.checkpoints()),
        [format!("vmbackup-{p1}"), format!("vmbackup-{p2}")]
    );

    d.write("vda", 30 * MIB, 4096, 0x22);
    let (p3, _) = l.backup("diff", "diff", 0);
    let e3 = d.shadow_digest("vda");
    d.write("vda", 0, 8192, 0x33);
    let (p4, _) = l.backup("inc", "inc", 0);
    let e4 = d.shadow_digest("vda");
    assert_eq!(
        ours(&d.checkpoints()),
        [format!("vmbackup-{p1}"), format!("vmbackup-{p4}")]
    );
    assert!(
        d.checkpoints().contains(&"othertool.0".to_string()),
        "{:?}",
        d.checkpoints()
    );

    let pts = l.env.json(&["points", "r", "--vm", &d.name]);
    let read: Vec<u64> = pts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["bytes_read"].as_u64().unwrap())
        .collect();
    assert!(
        read[1] <= 4 * MIB + 64 * 1024,
        "the inc read only the changes: {read:?}"
    );
    assert!(read[3] <= 64 * 1024, "{read:?}");
    for (p, e) in [(&p1, &e1), (&p2, &e2), (&p3, &e3), (&p4, &e4)] {
        assert_eq!(&l.restored(p, "vda"), e, "point {p}");
    }
    assert!(!d.has_backup_job());
    assert!(d.socket_dirs().is_empty(), "{:?}", d.socket_dirs());
    // The manifest keeps the checkpoint XML (the tracking token).
    let m = std::fs::read_to_string(
        l.env
            .path(&format!("target/r/vms/lv/{}/{p4}/manifest.json", d.name)),
    )
    .unwrap();
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["tracking"]["checkpoint"], format!("vmbackup-{p4}"));
    assert!(m["tracking"]["xml"]
        .as_str()
        .unwrap()
        .contains("<domaincheckpoint>"));
    assert!(m["vm_config"]["domain_xml"]
        .as_str()
        .unwrap()
        .contains(&d.name));

    // R9: removing the rule with its data deletes our checkpoints (never
    // another tool's) and the repository.
    let v = l.env.json(&["rule", "remove", "r", "--delete-data"]);
    assert_eq!(v["repository_removed"], true, "{v}");
    assert_eq!(v["tracking"][0]["error"], Value::Null, "{v}");
    assert_eq!(ours(&d.checkpoints()), Vec::<String>::new());
    assert_eq!(d.checkpoints(), ["othertool.0"]);
    assert!(!l.env.path("target/r").exists());
}

#[test]
fn lost_checkpoints_are_redefined_or_the_run_falls_back_to_full_r26() {
    let dom = TestDomain::define("lost", &[Disk::qcow2("vda", 16 * MIB)], Boot::None, false);
    dom.start();
    let l = lab(dom, &[]);
    let d = &l.dom;
    d.write_random("vda", 0, 2 * MIB, 3);
    let (p1, _) = l.backup("full", "full", 0);
    d.write("vda", 5 * MIB, 64 * 1024, 0x44);

    // The domain is redefined: libvirt forgets its checkpoints, the bitmaps stay
    // in the image (stored by QEMU's clean stop).
    let xml = virsh(&["dumpxml", &d.name, "--inactive"]);
    std::fs::write(d.work.join("again.xml"), xml).unwrap();
    let redefine = || {
        d.destroy();
        virsh(&["undefine", &d.name, "--checkpoints-metadata"]);
        virsh(&["define", d.work.join("again.xml").to_str().unwrap()]);
        d.start();
        assert!(ours(&d.checkpoints()).is_empty());
    };
    redefine();
    let (p2, logs) = l.backup("inc", "inc", 0);
    assert!(has(&logs, "redefined it from the repository"), "{logs:?}");
    assert_eq!(l.restored(&p2, "vda"), d.shadow_digest("vda"));
    assert!(ours(&d.checkpoints()).contains(&format!("vmbackup-{p1}")));

    // Lost again, and now its bitmaps are gone too: a full, with the reason.
    redefine();
    let nodes = virsh(&[
        "qemu-monitor-command",
        &d.name,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let nodes: Value = serde_json::from_str(&nodes).unwrap();
    for n in nodes["return"].as_array().unwrap() {
        for b in n["dirty-bitmaps"].as_array().cloned().unwrap_or_default() {
            let cmd = serde_json::json!({"execute":"block-dirty-bitmap-remove","arguments":{"node":n["node-name"],"name":b["name"]}});
            virsh(&["qemu-monitor-command", &d.name, &cmd.to_string()]);
        }
    }
    d.write("vda", 9 * MIB, 4096, 0x55);
    let (p3, logs) = l.backup("inc", "full", 1);
    assert!(
        has(&logs, "cannot be redefined") && has(&logs, "R26"),
        "{logs:?}"
    );
    assert_eq!(l.restored(&p3, "vda"), d.shadow_digest("vda"));
}

/// A `run-now` child process, killed on drop.
struct Running(Option<Child>);

impl Running {
    /// SIGKILL the process (no handler runs) and reap it.
    fn sigkill(&mut self) {
        let mut child = self.0.take().expect("still running");
        child.kill().unwrap();
        let _ = child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `vmbackup ARGS` in the background, with extra environment variables.
fn spawn(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Running {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("vmbackup"));
    cmd.env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", &env.config)
        .env_remove("XDG_STATE_HOME")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    Running(Some(cmd.spawn().unwrap()))
}

fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_mid_backup_then_the_next_inc_cleans_up_and_is_exact_r44() {
    let dom = TestDomain::define("kill", &[Disk::qcow2("vda", 16 * MIB)], Boot::None, false);
    dom.start();
    let l = lab(dom, &[]);
    let d = &l.dom;
    d.write_random("vda", 0, 2 * MIB, 4);
    let (p1, _) = l.backup("full", "full", 0);
    d.write_random("vda", 4 * MIB, 4 * MIB, 5);
    l.kill_an_inc_with_its_job_open(2);
    d.write("vda", 12 * MIB, 64 * 1024, 0x66); // after the kill: must not be lost
    let (p2, _) = l.backup("inc", "inc", 0);
    // The dead run's task was reclaimed first: its log says what was repaired.
    let logs = l.env.ok(&["logs", "r"]);
    assert!(
        logs.contains("ended the backup job of an interrupted run"),
        "{logs}"
    );
    assert_eq!(l.restored(&p2, "vda"), d.shadow_digest("vda"));
    assert!(!d.has_backup_job());
    assert_eq!(
        ours(&d.checkpoints()),
        [format!("vmbackup-{p1}"), format!("vmbackup-{p2}")]
    );
    assert!(d.socket_dirs().is_empty(), "{:?}", d.socket_dirs());
}

#[test]
fn shut_off_domain_chain_reads_images_with_qemu_nbd_r26() {
    let dom = TestDomain::define("off", &[Disk::qcow2("vda", 16 * MIB)], Boot::None, false);
    let l = lab(dom, &[]);
    let d = &l.dom;
    d.write_random("vda", 0, 2 * MIB, 6); // shut off: written into the image
    let (p1, logs) = l.backup("full", "full", 0);
    assert!(
        has(&logs, "qemu-nbd") && has(&logs, "image lock"),
        "{logs:?}"
    );
    assert_eq!(l.restored(&p1, "vda"), d.shadow_digest("vda"));
    // No checkpoint can exist yet: the first inc runs as a full, online.
    d.start();
    d.write("vda", 3 * MIB, 64 * 1024, 0x77);
    let (p2, logs) = l.backup("inc", "full", 1);
    assert!(has(&logs, "no libvirt checkpoint"), "{logs:?}");
    d.write_random("vda", 6 * MIB, MIB, 7);
    d.destroy();
    // Offline inc: the bitmap of p2's checkpoint, through qemu-nbd -B.
    let (p3, _) = l.backup("inc", "inc", 0);
    let e3 = d.shadow_digest("vda");
    d.write("vda", 9 * MIB, 4096, 0x78); // offline write, tracked by the bitmap
    let (p4, _) = l.backup("inc", "inc", 0);
    let e4 = d.shadow_digest("vda");
    let (p5, _) = l.backup("diff", "diff", 0);
    d.start();
    d.write("vda", 11 * MIB, 4096, 0x79);
    let (p6, _) = l.backup("inc", "inc", 0);
    for (p, e) in [
        (&p3, &e3),
        (&p4, &e4),
        (&p5, &e4),
        (&p6, &d.shadow_digest("vda")),
    ] {
        assert_eq!(&l.restored(p, "vda"), e, "point {p}");
    }
    let pts = l.env.json(&["points", "r", "--vm", &d.name]);
    let read4 = pts[3]["bytes_read"].as_u64().unwrap();
    assert!(
        read4 < 2 * MIB,
        "the offline inc read only changes: {read4}"
    );
    assert_eq!(pts[1]["point"], p2.as_str());
    let files: Vec<String> = std::fs::read_dir(l.env.path("state/run"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(files.iter().all(|f| !f.contains("qnbd")), "{files:?}");
}

#[test]
fn quiesce_freezes_through_the_guest_agent_and_a_killed_run_is_thawed_r10_r44() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = ext4_image(tmp.path(), 64 * MIB);
    let disk = Disk {
        content: Some(fs),
        ..Disk::qcow2("vda", 64 * MIB)
    };
    let dom = TestDomain::define("qga", &[disk], Boot::Agent, true);
    dom.start();
    let l = lab(dom, &["--quiesce"]);
    let d = &l.dom;
    d.wait_serial("VMB-AGENT");
    d.wait_agent();
    assert_eq!(
        d.agent(r#"{"execute":"guest-fsfreeze-status"}"#)["return"],
        "thawed"
    );
    let (_, logs) = l.backup("full", "full", 0);
    assert!(has(&logs, "froze 1 guest file system"), "{logs:?}");
    assert_eq!(
        d.agent(r#"{"execute":"guest-fsfreeze-status"}"#)["return"],
        "thawed"
    );

    // Killed while the guest is frozen: the guest stays frozen until vmbackup's
    // next run, cleanup or reclaim thaws it.
    let hold = l.env.path("frozen");
    let mut run = spawn(
        &l.env,
        &[("VMBACKUP_TEST_HOLD_FROZEN", hold.to_str().unwrap())],
        &["run-now", "r", "--level", "inc"],
    );
    wait_until(|| hold.exists(), "the guest frozen");
    assert_eq!(
        d.agent(r#"{"execute":"guest-fsfreeze-status"}"#)["return"],
        "frozen"
    );
    run.sigkill();
    assert_eq!(
        d.agent(r#"{"execute":"guest-fsfreeze-status"}"#)["return"],
        "frozen"
    );
    let out = l.env.ok(&["cleanup", "r"]);
    assert!(out.contains("thawed 1 guest file system"), "{out}");
    assert_eq!(
        d.agent(r#"{"execute":"guest-fsfreeze-status"}"#)["return"],
        "thawed"
    );
    let (_, logs) = l.backup("inc", "inc", 0);
    assert!(has(&logs, "froze 1 guest file system"), "{logs:?}");
}

#[test]
fn quiesce_without_an_agent_fails_with_require_and_warns_with_try_r10() {
    let dom = TestDomain::define("noqga", &[Disk::qcow2("vda", 8 * MIB)], Boot::None, false);
    dom.start();
    let l = lab(dom, &["--quiesce=require"]);
    let (code, vm, _) = l.run_now("full");
    assert_eq!(code, 3, "{vm}");
    let err = vm["error"].as_str().unwrap();
    assert!(
        err.contains("guest agent")
            && err.contains("org.qemu.guest_agent.0")
            && err.contains("--quiesce=try"),
        "{err}"
    );
    assert!(!l.dom.has_backup_job());
    assert!(
        ours(&l.dom.checkpoints()).is_empty(),
        "a refused run creates no checkpoint"
    );

    let l2 = lab(
        TestDomain::define("noqga2", &[Disk::qcow2("vda", 8 * MIB)], Boot::None, false),
        &["--quiesce=try"],
    );
    l2.dom.start();
    l2.dom.write("vda", 0, MIB, 0x12);
    let (p, logs) = l2.backup("full", "full", 1);
    assert!(has(&logs, "crash-consistent"), "{logs:?}");
    assert_eq!(l2.restored(&p, "vda"), l2.dom.shadow_digest("vda"));
    let _ = virsh_try(&["list"]);
}

#[test]
fn restore_as_a_new_domain_that_starts_and_reads_its_disk() {
    let dom = TestDomain::define("src", &[Disk::qcow2("vda", 8 * MIB)], Boot::Checksum, false);
    dom.write_random("vda", 0, 3 * MIB, 8); // shut off: into the image
    dom.start();
    let l = lab(dom, &[]);
    let d = &l.dom;
    d.write("vda", 5 * MIB, 64 * 1024, 0x31);
    let (p1, _) = l.backup("full", "full", 0);
    let expected = common::run("sha256sum", &[d.shadow("vda").to_str().unwrap()]);
    let expected = expected.split_whitespace().next().unwrap().to_string();
    d.destroy();
    let _ = std::fs::remove_file(d.work.join("serial.log"));

    let new = format!("{}-restored", d.name);
    let _cleanup = Undefine(new.clone());
    let to = d.work.join("restored");
    // Bad input is refused before anything is written.
    l.env.refused(
        &[
            "restore",
            "r",
            "--vm",
            &d.name,
            "--to",
            to.to_str().unwrap(),
            "--as-vm",
            &d.name,
        ],
        &["--as-vm", "pick a new name"],
    );
    // A domain keeps its XML's network and secrets: launch flags are for qemu's
    // launch script.
    let to_arg = to.to_str().unwrap();
    let restore = ["restore", "r", "--vm", &d.name, "--to", to_arg];
    l.env.refused(
        &[&restore[..], &["--as-vm", &new, "--net"]].concat(),
        &["--net/--net-bridge/--set-secret/--accel", "libvirt"],
    );
    l.env.refused(
        &[
            "restore",
            "r",
            "--vm",
            &d.name,
            "--to",
            to.to_str().unwrap(),
            "--start",
        ],
        &["--as-vm"],
    );
    assert!(!to.exists());
    // QEMU (libvirt-qemu) must reach the restored images: a directory it can enter.
    std::fs::create_dir(&to).unwrap();
    std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = l.env.ok(&[
        "--json",
        "restore",
        "r",
        "--vm",
        &d.name,
        "--point",
        &p1,
        "--to",
        to.to_str().unwrap(),
        "--format",
        "qcow2",
        "--as-vm",
        &new,
        "--start",
    ]);
    assert_documented("vmbackup restore", &out);
    let out: Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {out}"));
    let new_vm = &out["tasks"][0]["outcome"]["new_vm"];
    assert_eq!(new_vm["name"], new.as_str(), "{out}");
    assert_eq!(new_vm["running"], true, "{out}");
    let xml = virsh(&["dumpxml", &new]);
    assert!(
        xml.contains(&to.join("vda.qcow2").display().to_string()),
        "{xml}"
    );
    assert_ne!(virsh(&["domuuid", &new]), virsh(&["domuuid", &d.name]));
    // The new domain boots and reads its disk: the guest prints its checksum.
    let console = d.wait_serial("VMB-SUM");
    let sum = console
        .lines()
        .find_map(|l| l.strip_prefix("VMB-SUM "))
        .unwrap()
        .trim();
    assert_eq!(
        sum, expected,
        "the restored domain reads the backed-up disk"
    );
}

/// Destroys and undefines a domain the test made through vmbackup.
struct Undefine(String);

impl Drop for Undefine {
    fn drop(&mut self) {
        let _ = virsh_try(&["destroy", &self.0]);
        let _ = virsh_try(&["undefine", &self.0, "--checkpoints-metadata", "--nvram"]);
    }
}

/// A remote host (the private libvirtd reached over TCP, as `qemu+tcp://` would
/// reach another machine): the backup export is NBD over TCP with TLS, verified
/// with the CA and client certificate of `--tls-dir`; full + inc + an inc after a
/// SIGKILL mid-backup restore byte-exact; no job, checkpoint or scratch file left.
#[test]
fn remote_host_backups_go_over_nbd_with_tls_and_restore_exact() {
    let remote = tcp_uri();
    let tls = tls_dir();
    let tls = tls.to_str().unwrap();
    // Bad --tls-dir input: exit 2 naming the field, nothing registered.
    let env = Env::new();
    env.refused(
        &[
            "platform",
            "add",
            "x",
            "--type",
            "libvirt",
            "--uri",
            &remote,
            "--tls-dir",
            "/nonexistent",
        ],
        &["--tls-dir", "ca-cert.pem"],
    );
    let empty = env.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    env.refused(
        &[
            "platform",
            "add",
            "x",
            "--type",
            "libvirt",
            "--uri",
            &remote,
            "--tls-dir",
            empty.to_str().unwrap(),
        ],
        &["--tls-dir", "ca-cert.pem"],
    );
    env.refused(
        &[
            "platform",
            "add",
            "x",
            "--type",
            "libvirt",
            "--uri",
            &uri(),
            "--tls-dir",
            tls,
        ],
        &["--tls-dir", "remote"],
    );
    assert_eq!(env.json(&["platform", "list"]), serde_json::json!([]));

    let dom = TestDomain::define("remote", &[Disk::qcow2("vda", 32 * MIB)], Boot::None, false);
    dom.start();
    // Without --tls-dir a remote platform lists its domains, but a backup is refused.
    let plain = lab_on(
        TestDomain::define(
            "remote-plain",
            &[Disk::qcow2("vda", 8 * MIB)],
            Boot::None,
            false,
        ),
        &["--uri", &remote],
        &[],
    );
    plain.dom.start();
    let (code, vm, lines) = plain.run_now("full");
    assert_ne!(code, 0, "{vm}");
    let text = serde_json::to_string(&lines).unwrap();
    assert!(text.contains("--tls-dir") && text.contains("TLS"), "{text}");
    assert!(ours(&plain.dom.checkpoints()).is_empty());

    let l = lab_on(dom, &["--uri", &remote, "--tls-dir", tls], &[]);
    let shown = l.env.ok(&["platform", "show", "lv"]);
    assert!(shown.contains(&format!("tls dir:    {tls}")), "{shown}");
    for (command, args) in [
        ("vmbackup platform list", &["platform", "list"][..]),
        ("vmbackup platform show", &["platform", "show", "lv"]),
    ] {
        let out = l.env.ok(&[&["--json"][..], args].concat());
        assert_documented(command, &out);
    }
    let shown = l.env.json(&["platform", "show", "lv"]);
    assert_eq!(
        (&shown["uri"], &shown["tls_dir"]),
        (&Value::from(remote.as_str()), &Value::from(tls)),
        "{shown}"
    );
    let d = &l.dom;
    d.write_random("vda", 0, 6 * MIB, 21);
    let (p1, _) = l.backup("full", "full", 0);
    let e1 = d.shadow_digest("vda");
    d.write_random("vda", 16 * MIB, 2 * MIB, 22);
    d.write("vda", 31 * MIB, 4096, 0x77);
    let (p2, _) = l.backup("inc", "inc", 0);
    let e2 = d.shadow_digest("vda");
    assert_eq!(
        ours(&d.checkpoints()),
        [format!("vmbackup-{p1}"), format!("vmbackup-{p2}")]
    );

    // SIGKILL while the inc's job is open: the next run ends the job (recognised
    // by its scratch files' names on the host) and its inc is exact.
    d.write_random("vda", 8 * MIB, MIB, 23);
    l.kill_an_inc_with_its_job_open(3);
    let (p3, _) = l.backup("inc", "inc", 0);
    let e3 = d.shadow_digest("vda");
    let logs = l.env.ok(&["logs", "r"]);
    assert!(
        logs.contains("ended the backup job of an interrupted run"),
        "{logs}"
    );

    for (p, e) in [(&p1, &e1), (&p2, &e2), (&p3, &e3)] {
        assert_eq!(&l.restored(p, "vda"), e, "point {p}");
    }
    assert!(!d.has_backup_job());
    assert_eq!(
        ours(&d.checkpoints()),
        [format!("vmbackup-{p1}"), format!("vmbackup-{p3}")]
    );
    assert!(
        remote_scratch_files().is_empty(),
        "{:?}",
        remote_scratch_files()
    );

    // A shut-off domain of a remote host: refused, saying why.
    d.destroy();
    let (code, vm, lines) = l.run_now("inc");
    assert_ne!(code, 0, "{vm}");
    let text = serde_json::to_string(&lines).unwrap();
    assert!(text.contains("shut off on a remote libvirt host"), "{text}");
}

/// A libvirtd that stops answering (SIGSTOP): every libvirt call is bounded by
/// io_timeout (plus libvirt's keepalive), so vmbackup never waits for it forever.
/// (a) Stopped while a backup's job is open and vmbackup is told to stop
/// (SIGTERM, as systemd does): ending the job cannot reach the daemon, the run
/// still exits while the daemon is stopped. (b) Stopped before a run: the run
/// fails (exit 3) naming the libvirt call. Once the daemon runs again, `cleanup`
/// ends the job and drops the uncommitted checkpoint; the next inc is exact (R44).
#[test]
fn a_stopped_libvirtd_fails_the_task_within_io_timeout_and_cleanup_repairs() {
    let dom = TestDomain::define("stall", &[Disk::qcow2("vda", 32 * MIB)], Boot::None, false);
    dom.start();
    let l = lab(dom, &[]);
    std::fs::write(&l.env.config, "io_timeout = 5\n").unwrap();
    let d = &l.dom;
    d.write_random("vda", 0, 4 * MIB, 31);
    let (p1, _) = l.backup("full", "full", 0);
    d.write_random("vda", 8 * MIB, 4 * MIB, 32);
    let daemon = libvirtd_pid().to_string();
    let signal = |sig: &str, pid: &str| {
        Command::new("kill").args([sig, pid]).status().unwrap();
    };
    let start = |name: &str| {
        let err_file = l.env.path(name);
        let child = Command::new(assert_cmd::cargo::cargo_bin("vmbackup"))
            .env("VMBACKUP_STATE", &l.env.state)
            .env("VMBACKUP_CONFIG", &l.env.config)
            .env_remove("XDG_STATE_HOME")
            .args(["run-now", "r", "--level", "inc"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .spawn()
            .unwrap();
        (child, err_file)
    };
    // Wait for the run to end while the daemon is stopped; then resume it.
    let end_while_stopped = |child: &mut Child, err_file: &std::path::Path| {
        let stopped = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            // Hang guard only: without the deadlines vmbackup waits forever.
            if stopped.elapsed() > Duration::from_secs(300) {
                signal("-CONT", &daemon);
                let _ = child.kill();
                panic!("vmbackup still waits for a stopped libvirtd after 300 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        println!(
            "FIGURE libvirtd_stall_to_exit_seconds={:.1}",
            stopped.elapsed().as_secs_f64()
        );
        signal("-CONT", &daemon);
        (status, std::fs::read_to_string(err_file).unwrap())
    };

    // (a) The job is open, the transfer paused; the daemon stops, vmbackup is told
    // to stop.
    l.env.ok(&[
        "rule",
        "edit",
        "r",
        "--bandwidth",
        "mon-sun 00:00-24:00 pause",
    ]);
    let (mut child, err_file) = start("stall-a.err");
    wait_until(
        || d.has_backup_job() && ours(&d.checkpoints()).len() == 2,
        "the inc's backup job",
    );
    signal("-STOP", &daemon);
    signal("-TERM", &child.id().to_string());
    let (status, err) = end_while_stopped(&mut child, &err_file);
    assert_ne!(status.code(), Some(0), "{err}");
    assert!(
        err.contains("did not answer virDomain")
            || err.contains("keepalive")
            || err.contains("socket is closed"),
        "the error says libvirt did not answer: {err}"
    );
    l.env.ok(&["cleanup", "r"]);
    assert!(!d.has_backup_job());
    assert_eq!(ours(&d.checkpoints()), [format!("vmbackup-{p1}")]);
    assert!(d.socket_dirs().is_empty(), "{:?}", d.socket_dirs());

    // (b) The daemon is stopped before the run connects.
    l.env.ok(&["rule", "edit", "r", "--clear-bandwidth"]);
    signal("-STOP", &daemon);
    let (mut child, err_file) = start("stall-b.err");
    let (status, err) = end_while_stopped(&mut child, &err_file);
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(
        err.contains("did not answer virConnectOpen within 5s"),
        "{err}"
    );
    l.env.ok(&["cleanup", "r"]);
    assert!(!d.has_backup_job());
    assert_eq!(ours(&d.checkpoints()), [format!("vmbackup-{p1}")]);

    let (p2, _) = l.backup("inc", "inc", 0);
    assert_eq!(l.restored(&p2, "vda"), d.shadow_digest("vda"));
}
