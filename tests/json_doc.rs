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

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, DiskSpec, Env, MIB};
use serde_json::Value;

/// A field's documented type.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    Str,
    Int,
    Num,
    Bool,
    Time,
    Any,
    Lit(String),
    Named(String),
    Array(Box<Ty>),
    Nullable(Box<Ty>),
}

fn parse_ty(s: &str) -> Ty {
    let s = s.trim().trim_matches('`');
    if let Some(inner) = s.strip_suffix('?') {
        return Ty::Nullable(Box::new(parse_ty(inner)));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return Ty::Array(Box::new(parse_ty(inner)));
    }
    if let Some(lit) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return Ty::Lit(lit.to_string());
    }
    match s {
        "string" => Ty::Str,
        "integer" => Ty::Int,
        "number" => Ty::Num,
        "boolean" => Ty::Bool,
        "time" => Ty::Time,
        "any" => Ty::Any,
        name => {
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric()) && !name.is_empty(),
                "bad type {name:?} in docs/JSON.md"
            );
            Ty::Named(name.to_string())
        }
    }
}

#[derive(Debug, Clone)]
enum TypeDef {
    Object(Vec<(String, Ty)>),
    OneOf(Vec<String>),
}

#[derive(Debug, Clone)]
enum Prints {
    Document(Ty),
    Lines(Ty, Option<Ty>),
    Nothing,
}

struct Doc {
    commands: BTreeMap<String, Prints>,
    types: BTreeMap<String, TypeDef>,
}

/// The `### ...` sections of docs/JSON.md after "How this file is read".
fn read_doc() -> Doc {
    let text = include_str!("../docs/JSON.md");
    let body = &text[text
        .find("## How this file is read by the test")
        .expect("the doc explains its format")..];
    let mut commands = BTreeMap::new();
    let mut types = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut fields: Vec<(String, Ty)> = Vec::new();
    let flush = |name: &Option<String>,
                 fields: &mut Vec<(String, Ty)>,
                 types: &mut BTreeMap<String, TypeDef>| {
        if let Some(n) = name {
            if !n.starts_with("vmbackup") && !types.contains_key(n) {
                types.insert(n.clone(), TypeDef::Object(std::mem::take(fields)));
            }
        }
        fields.clear();
    };
    for line in body.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            flush(&current, &mut fields, &mut types);
            current = Some(h.trim().to_string());
            continue;
        }
        let Some(name) = &current else { continue };
        if let Some(p) = line.strip_prefix("Prints: ") {
            assert!(
                name.starts_with("vmbackup"),
                "Prints: in type section {name}"
            );
            let p = p.trim();
            let prints = if p == "nothing" {
                Prints::Nothing
            } else if let Some(t) = p.strip_prefix("document ") {
                Prints::Document(parse_ty(t))
            } else if let Some(rest) = p.strip_prefix("lines ") {
                match rest.split_once(", the last one ") {
                    Some((t, last)) => Prints::Lines(parse_ty(t), Some(parse_ty(last))),
                    None => Prints::Lines(parse_ty(rest), None),
                }
            } else {
                panic!("bad Prints: line for {name}: {p}")
            };
            assert!(
                commands.insert(name.clone(), prints).is_none(),
                "{name} twice"
            );
        } else if let Some(list) = line.strip_prefix("One of: ") {
            let variants = list
                .split(',')
                .map(|v| v.trim().trim_matches('`').to_string())
                .collect();
            types.insert(name.clone(), TypeDef::OneOf(variants));
        } else if line.starts_with("| `") {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // ["", field, type, meaning, ""]
            assert!(cells.len() >= 4, "bad row in {name}: {line}");
            fields.push((cells[1].trim_matches('`').to_string(), parse_ty(cells[2])));
        }
    }
    flush(&current, &mut fields, &mut types);
    let doc = Doc { commands, types };
    // Every named type is defined; no field twice.
    let mut referenced = Vec::new();
    fn names(t: &Ty, out: &mut Vec<String>) {
        match t {
            Ty::Named(n) => out.push(n.clone()),
            Ty::Array(t) | Ty::Nullable(t) => names(t, out),
            _ => {}
        }
    }
    for p in doc.commands.values() {
        match p {
            Prints::Document(t) => names(t, &mut referenced),
            Prints::Lines(t, last) => {
                names(t, &mut referenced);
                if let Some(l) = last {
                    names(l, &mut referenced);
                }
            }
            Prints::Nothing => {}
        }
    }
    for (name, def) in &doc.types {
        match def {
            TypeDef::Object(f) => {
                let set: BTreeSet<&String> = f.iter().map(|(k, _)| k).collect();
                assert_eq!(set.len(), f.len(), "a field twice in {name}");
                assert!(!f.is_empty(), "type {name} has no fields");
                for (_, t) in f {
                    names(t, &mut referenced);
                }
            }
            TypeDef::OneOf(v) => referenced.extend(v.iter().cloned()),
        }
    }
    for r in referenced {
        assert!(
            doc.types.contains_key(&r),
            "type {r} is used but not defined in docs/JSON.md"
        );
    }
    doc
}

/// Leaf subcommands of the CLI, as `vmbackup a b`.
fn leaf_commands() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, path: &str, out: &mut BTreeSet<String>) {
        let subs: Vec<&clap::Command> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help" && !s.is_hide_set())
            .collect();
        if subs.is_empty() {
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

#[test]
fn every_subcommand_is_documented() {
    let doc = read_doc();
    let leaves = leaf_commands();
    let documented: BTreeSet<String> = doc.commands.keys().cloned().collect();
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

fn is_time(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

/// Errors of `v` against `t`, each naming the JSON path.
fn check(doc: &Doc, v: &Value, t: &Ty, path: &str, errors: &mut Vec<String>) {
    let bad = |errors: &mut Vec<String>, want: &str| {
        errors.push(format!("{path}: expected {want}, got {v}"));
    };
    match t {
        Ty::Nullable(_) if v.is_null() => {}
        Ty::Nullable(inner) => check(doc, v, inner, path, errors),
        Ty::Str if !v.is_string() => bad(errors, "a string"),
        Ty::Int if !(v.is_i64() || v.is_u64()) => bad(errors, "an integer"),
        Ty::Num if !v.is_number() => bad(errors, "a number"),
        Ty::Bool if !v.is_boolean() => bad(errors, "a boolean"),
        Ty::Time if !v.as_str().is_some_and(is_time) => {
            bad(errors, "a time like 2026-12-03T08:30:00.123Z")
        }
        Ty::Lit(l) if v.as_str() != Some(l.as_str()) => bad(errors, &format!("\"{l}\"")),
        Ty::Array(inner) => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check(doc, item, inner, &format!("{path}[{i}]"), errors);
                }
            }
            None => bad(errors, "an array"),
        },
        Ty::Named(name) => match &doc.types[name] {
            TypeDef::Object(fields) => {
                let Some(obj) = v.as_object() else {
                    return bad(errors, &format!("a {name} object"));
                };
                for (k, ft) in fields {
                    match obj.get(k) {
                        Some(fv) => check(doc, fv, ft, &format!("{path}.{k}"), errors),
                        None => errors.push(format!("{path}: {name} field '{k}' is missing")),
                    }
                }
                for k in obj.keys() {
                    if !fields.iter().any(|(f, _)| f == k) {
                        errors.push(format!("{path}: field '{k}' is not documented in {name}"));
                    }
                }
            }
            TypeDef::OneOf(variants) => {
                let mut tried = Vec::new();
                for variant in variants {
                    let mut e = Vec::new();
                    check(doc, v, &Ty::Named(variant.clone()), path, &mut e);
                    if e.is_empty() {
                        return;
                    }
                    tried.push(format!("{variant}: {}", e.join("; ")));
                }
                errors.push(format!(
                    "{path}: {v} is none of {name}: {}",
                    tried.join(" | ")
                ));
            }
        },
        _ => {}
    }
}

/// Check one command's stdout against its section.
fn check_output(doc: &Doc, command: &str, stdout: &str) {
    let prints = doc
        .commands
        .get(command)
        .unwrap_or_else(|| panic!("{command} has no section in docs/JSON.md"));
    let mut errors = Vec::new();
    match prints {
        Prints::Document(t) => {
            let v: Value = serde_json::from_str(stdout)
                .unwrap_or_else(|e| panic!("{command}: not one JSON document ({e}):\n{stdout}"));
            check(doc, &v, t, "$", &mut errors);
        }
        Prints::Lines(t, last) => {
            let lines: Vec<Value> = stdout
                .lines()
                .map(|l| {
                    serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("{command}: not JSON ({e}): {l}"))
                })
                .collect();
            assert!(!lines.is_empty(), "{command}: no JSON lines");
            for (i, v) in lines.iter().enumerate() {
                check(doc, v, t, &format!("line {}", i + 1), &mut errors);
            }
            if let Some(last) = last {
                check(doc, lines.last().unwrap(), last, "last line", &mut errors);
                let summaries = lines.iter().filter(|l| l["type"] == "summary").count();
                assert_eq!(summaries, 1, "{command}: one summary line:\n{stdout}");
            }
        }
        Prints::Nothing => {}
    }
    assert!(
        errors.is_empty(),
        "{command} does not print what docs/JSON.md says:\n{}\n--- output:\n{stdout}",
        errors.join("\n")
    );
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
    s.run(&["notify", "test"]);
    s.run(&["completions", "bash"]);

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
