//! docs/JSON.md cannot go stale: every leaf subcommand has a section there, and
//! every command is run here with `--json` against a real VM, its output checked
//! field by field against the documented types (every documented field present,
//! no undocumented one, timestamps in the one documented form). Notifications
//! (through `notify_command`) are checked against their documented type too.
//!
//! A command added later fails `every_subcommand_is_documented` until it has a
//! section, and `every_command_prints_what_docs_json_md_says` until it is run
//! here (add it to the session below).

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::json_doc::{check, check_output, parse_ty, read_doc, Doc, Prints, Ty};
use common::{wait_for, DiskSpec, Env, MIB};
use serde_json::Value;

/// Leaf subcommands of the CLI, as `vmbackup a b`, and the commands that have
/// subcommands but run on their own too (`vmbackup recover`).
fn leaf_commands() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, path: &str, out: &mut BTreeSet<String>) {
        let subs: Vec<&clap::Command> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help" && !s.is_hide_set())
            .collect();
        if subs.is_empty() || (path != "vmbackup" && !cmd.is_subcommand_required_set()) {
            out.insert(path.to_string());
        }
        for s in subs {
            walk(s, &format!("{path} {}", s.get_name()), out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&vmbackup::cli::command(), "vmbackup", &mut out);
    out
}

/// Whether `section` is `vmbackup <command> --<flag>` (a flag that changes
/// what the command prints, as `verify --boot`) of a command in `leaves` that
/// has that flag.
fn is_flag_section(section: &str, leaves: &BTreeSet<String>) -> bool {
    let Some((command, flag)) = section.split_once(" --") else {
        return false;
    };
    if !leaves.contains(command) {
        return false;
    }
    let mut cmd = vmbackup::cli::command();
    for word in command.split(' ').skip(1) {
        match cmd.find_subcommand(word) {
            Some(sub) => cmd = sub.clone(),
            None => return false,
        }
    }
    let found = cmd.get_arguments().any(|a| a.get_long() == Some(flag));
    found
}

#[test]
fn every_subcommand_is_documented() {
    let doc = read_doc();
    let leaves = leaf_commands();
    let documented: BTreeSet<String> = doc
        .commands
        .keys()
        .filter(|k| !is_flag_section(k, &leaves))
        .cloned()
        .collect();
    let missing: Vec<&String> = leaves.difference(&documented).collect();
    let stale: Vec<&String> = documented.difference(&leaves).collect();
    assert!(
        missing.is_empty(),
        "commands without a section in docs/JSON.md: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "docs/JSON.md documents commands that do not exist: {stale:?}"
    );
}

#[test]
fn the_checker_finds_what_is_wrong() {
    let doc = read_doc();
    let errors = |v: Value, ty: &str| {
        let mut e = Vec::new();
        check(&doc, &v, &parse_ty(ty), "$", &mut e);
        e
    };
    let good = serde_json::json!({"error": "x", "exit_code": 2});
    assert!(errors(good, "Error").is_empty());
    let extra = serde_json::json!({"error": "x", "exit_code": 2, "hint": "y"});
    assert!(errors(extra, "Error")[0].contains("'hint' is not documented"));
    let missing = serde_json::json!({"error": "x"});
    assert!(errors(missing, "Error")[0].contains("'exit_code' is missing"));
    let wrong = serde_json::json!({"error": 1, "exit_code": "2"});
    assert_eq!(errors(wrong, "Error").len(), 2);
    let note = |time: &str| serde_json::json!({"type": "note", "time": time, "message": "m"});
    assert!(errors(note("2026-12-03T08:30:00.123Z"), "Event").is_empty());
    for bad in [
        "2026-12-03T08:30:00Z",
        "2026-12-03T08:30:00.123+00:00",
        "2026-12-03 08:30",
    ] {
        assert!(!errors(note(bad), "Event").is_empty(), "{bad} passed");
    }
    assert!(!errors(serde_json::json!({"type": "nope"}), "Event").is_empty());
    assert!(errors(Value::Null, "string?").is_empty());
    assert!(!errors(Value::Null, "[string]").is_empty());
}

/// A lab session that runs commands with `--json` and checks each.
struct Session {
    env: Env,
    doc: Doc,
    ran: BTreeSet<String>,
}

impl Session {
    /// `vmbackup --json ARGS`, expecting `code`; checks stdout against the
    /// section of the command (the leading words of `args` that name one).
    fn run_code(&mut self, code: i32, args: &[&str]) -> String {
        let out = self.env.cmd().arg("--json").args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "vmbackup --json {args:?}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let command = self.command_of(args);
        if code == 0 || matches!(self.doc.commands[&command], Prints::Lines(..)) {
            check_output(&self.doc, &command, &stdout);
        } else {
            let v: Value = serde_json::from_str(&stdout).unwrap();
            let mut errors = Vec::new();
            check(&self.doc, &v, &Ty::Named("Error".into()), "$", &mut errors);
            assert!(errors.is_empty(), "{errors:?}");
        }
        self.ran.insert(command);
        stdout
    }

    fn run(&mut self, args: &[&str]) -> String {
        self.run_code(0, args)
    }

    fn command_of(&self, args: &[&str]) -> String {
        let mut best = String::new();
        let mut path = String::from("vmbackup");
        for a in args {
            path = format!("{path} {a}");
            if self.doc.commands.contains_key(&path) {
                best = path.clone();
            }
        }
        assert!(!best.is_empty(), "no documented command for {args:?}");
        // A flag that changes what the command prints has its own section.
        for a in args.iter().filter(|a| a.starts_with("--")) {
            let flagged = format!("{best} {a}");
            if self.doc.commands.contains_key(&flagged) {
                return flagged;
            }
        }
        best
    }
}

#[test]
fn every_command_prints_what_docs_json_md_says() {
    let env = Env::new();
    let notes = env.path("notifications.jsonl");
    std::fs::write(
        &env.config,
        format!(
            "notify_on = failure,fallback,success\nnotify_command = cat >> {}\n",
            notes.display()
        ),
    )
    .unwrap();
    let j1 = env.vm("j1", &[DiskSpec::qcow2("vda", 8 * MIB)], true);
    j1.write_random("vda", 0, 2 * MIB, 1);
    let _j2 = env.vm("j2", &[DiskSpec::qcow2("vda", 8 * MIB)], true);
    _j2.write_random("vda", 0, MIB, 2);
    let _j3 = env.vm("j3", &[DiskSpec::qcow2("vda", 4 * MIB)], true);
    let _j4 = env.vm("j4", &[DiskSpec::qcow2("vda", 4 * MIB)], true);
    _j4.write_random("vda", 0, MIB, 4);
    let target = env.path("target");
    std::fs::create_dir_all(&target).unwrap();
    let mut s = Session {
        env,
        doc: read_doc(),
        ran: BTreeSet::new(),
    };
    let qmp = s.env.qmp_dir.to_str().unwrap().to_string();
    let target = target.to_str().unwrap().to_string();

    s.run(&["config", "show"]);
    s.run(&[
        "platform",
        "add",
        "lab",
        "--type",
        "qemu",
        "--qmp-dir",
        &qmp,
    ]);
    s.run(&["platform", "refresh", "lab"]);
    s.run(&["platform", "list"]);
    s.run(&["platform", "show", "lab"]);
    s.run(&["platform", "vms", "lab"]);
    s.run(&["target", "add", "t1", "--path", &target]);
    s.run(&["target", "mark", "t1"]);
    s.run(&["target", "list"]);
    s.run(&["target", "show", "t1"]);
    s.run(&[
        "rule",
        "add",
        "r1",
        "--platform",
        "lab",
        "--vm",
        "j1",
        "--target",
        "t1",
        "--schedule",
        "full daily at 01:00",
        "--retention",
        "2",
        "--bandwidth",
        "sat,sun 00:00-06:00 20MiB/s",
    ]);
    s.run(&["rule", "edit", "r1", "--retention", "3"]);
    s.run(&[
        "rule",
        "add",
        "r2",
        "--platform",
        "lab",
        "--vm",
        "j2",
        "--target",
        "t1",
        "--once",
        "2030-01-01 00:00",
        "--bandwidth",
        "mon-sun 00:00-24:00 pause",
        "--notify-url",
        "none",
    ]);
    s.run(&["rule", "add-vm", "r2", "--vm", "j3"]);
    s.run(&["rule", "stop", "r2", "--vm", "j3"]);
    s.run(&["rule", "start", "r2", "--vm", "j3"]);

    // Tasks: a full and an inc, a restore, nothing due.
    s.run(&["run-now", "r1", "--level", "full"]);
    j1.write_random("vda", 4 * MIB, MIB, 3);
    s.run(&["run-now", "r1", "--level", "inc"]);
    let dest = s.env.path("restored");
    s.run(&[
        "restore",
        "r1",
        "--vm",
        "j1",
        "--to",
        dest.to_str().unwrap(),
    ]);
    s.run(&["run-due"]);
    s.run(&["rule", "list"]);
    s.run(&["rule", "show", "r1"]);
    let points = s.run(&["points", "r1", "--vm", "j1"]);
    let first: Value = serde_json::from_str(&points).unwrap();
    let first = first[0]["point"].as_str().unwrap().to_string();
    s.run(&["points", "r1"]);
    s.run(&["prune", "r1", "--dry-run"]);
    s.run(&["prune", "r1"]);
    s.run(&["forget", "r1", "--vm", "j1", "--point", &first, "--dry-run"]);
    s.run(&["gc", "r1", "--dry-run"]);
    s.run(&["verify", "r1"]);
    s.run(&["stats", "r1", "--tasks"]);
    s.run(&["logs", "r1"]);
    s.run(&["cleanup", "r1"]);

    // A transient recovery of j1's point (served over NBD, no VM): listed,
    // resumed (its server runs: nothing to do), its migration abort refused
    // (it does not migrate), stopped. Then a boot verification that fails
    // (exit 2, in its summary): j1 runs in qemu-storage-daemon, there is no VM
    // to boot.
    let rec = s.run(&["recover", "r1", "--vm", "j1", "--transient"]);
    let rec: Value = serde_json::from_str(rec.trim()).unwrap();
    let id = rec["tasks"][0]["outcome"]["recovery"].to_string();
    s.run(&["recover", "list"]);
    s.run(&["recover", "resume", &id]);
    s.run_code(2, &["recover", "abort", &id]);
    s.run(&["recover", "stop", &id]);
    s.run(&["recover", "list", "--all"]);
    s.run_code(
        2,
        &[
            "verify",
            "r1",
            "--vm",
            "j1",
            "--boot",
            "--expect",
            "VMB-NEVER-PRINTED",
            "--timeout",
            "2",
            "--accel",
            "tcg",
        ],
    );
    s.run(&["notify", "test"]);
    s.run(&["completions", "bash"]);

    // Encryption and copies: a rule on an encrypted target, its key slots,
    // its copy to a second encrypted target.
    let k1 = s.env.path("k1.key");
    let k2 = s.env.path("k2.key");
    s.run(&["key", "generate", k1.to_str().unwrap()]);
    s.run(&["key", "generate", k2.to_str().unwrap()]);
    for (name, dir) in [("t2", "target2"), ("t3", "target3")] {
        let dir = s.env.path(dir);
        std::fs::create_dir_all(&dir).unwrap();
        s.run(&[
            "target",
            "add",
            name,
            "--path",
            dir.to_str().unwrap(),
            "--encrypt",
            "--key-file",
            k1.to_str().unwrap(),
        ]);
    }
    s.run(&["target", "show", "t2"]);
    s.run(&[
        "rule",
        "add",
        "r3",
        "--platform",
        "lab",
        "--vm",
        "j4",
        "--target",
        "t2",
        "--schedule",
        "full daily at 01:00",
        "--copy-to",
        "t3",
        "--copy-retention",
        "1",
    ]);
    s.run(&["run-now", "r3", "--level", "full"]);
    s.run(&["copy", "r3", "--to", "t3"]);
    s.run(&["points", "--target", "t3", "--vm", "lab/j4"]);
    s.run(&["rule", "show", "r3"]);
    let added = s.run(&["key", "add", "t2", "--key-file", k2.to_str().unwrap()]);
    let added: Value = serde_json::from_str(&added).unwrap();
    let slot = added["slots"][0]["slot"].as_str().unwrap().to_string();
    s.run(&["key", "list", "t2"]);
    s.run(&["key", "remove", "t2", &slot]);

    // A run held by a pause window, cancelled: pending/running lines, an
    // interrupted result; `task cancel` of a finished task is an error document.
    let bin = assert_cmd::cargo::cargo_bin("vmbackup");
    let held = Command::new(&bin)
        .env("VMBACKUP_STATE", &s.env.state)
        .env("VMBACKUP_CONFIG", &s.env.config)
        .args(["--json", "run-now", "r2", "--vm", "j2", "--level", "full"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let env = &s.env;
    let mut held_id = 0;
    wait_for(
        || {
            let list = env.json(&["task", "list"]);
            match list
                .as_array()
                .and_then(|l| l.iter().find(|t| t["phase"] == "running"))
            {
                Some(t) => {
                    held_id = t["id"].as_i64().unwrap();
                    true
                }
                None => false,
            }
        },
        "the paused task running",
    );
    s.run(&["task", "list"]);
    s.run(&["task", "cancel", &held_id.to_string()]);
    let out = held.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    check_output(
        &s.doc,
        "vmbackup run-now",
        &String::from_utf8_lossy(&out.stdout),
    );
    s.run(&["task", "list", "--all"]);
    s.run_code(2, &["task", "cancel", &held_id.to_string()]);

    // The daemon: notes, then SIGTERM.
    let mut daemon = Command::new(&bin)
        .env("VMBACKUP_STATE", &s.env.state)
        .env("VMBACKUP_CONFIG", &s.env.config)
        .args(["--json", "daemon"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = daemon.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
        text
    });
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    assert_eq!(daemon.wait().unwrap().code(), Some(130));
    let text = reader.join().unwrap();
    assert!(text.contains("\"type\":\"note\""), "{text}");
    check_output(&s.doc, "vmbackup daemon", &text);
    s.ran.insert("vmbackup daemon".into());

    // Removals last.
    s.run(&["rule", "remove", "r2", "--vm", "j3"]);
    s.run(&["rule", "remove", "r2"]);
    s.run(&["rule", "remove", "r1"]);
    s.run(&["rule", "remove", "r3"]);
    s.run(&["target", "remove", "t3"]);
    s.run(&["target", "remove", "t1"]);
    s.run(&["platform", "remove", "lab"]);
    s.run_code(2, &["rule", "show", "nope"]);

    let documented: BTreeSet<String> = s.doc.commands.keys().cloned().collect();
    let not_run: Vec<&String> = documented.difference(&s.ran).collect();
    assert!(
        not_run.is_empty(),
        "documented commands this test does not run: {not_run:?}"
    );

    // Every notification the commands sent (notify_command appends one line each).
    let sent = std::fs::read_to_string(&notes).unwrap();
    let events: BTreeSet<String> = sent
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let mut errors = Vec::new();
            check(
                &s.doc,
                &v,
                &Ty::Named("Notification".into()),
                "$",
                &mut errors,
            );
            assert!(errors.is_empty(), "notification {l}: {errors:?}");
            v["event"].as_str().unwrap().to_string()
        })
        .collect();
    for e in ["completed", "interrupted", "test"] {
        assert!(events.contains(e), "no {e} notification in:\n{sent}");
    }
}
