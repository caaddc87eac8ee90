//! `--help` a newcomer can use: every subcommand has examples, every argument a
//! description, no requirement ids (R1..R44 belong in code and docs), global
//! options apart from a command's own; usage errors keep clap's "did you mean"
//! tip in one line; `--config` naming a missing file is an error for every
//! command; completions complete names from the state.

mod common;

use common::{DiskSpec, Env, MIB};

fn walk(cmd: &clap::Command, path: &str, f: &mut dyn FnMut(&clap::Command, &str)) {
    f(cmd, path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        walk(sub, &format!("{path} {}", sub.get_name()), f);
    }
}

/// Whether `text` names a requirement (`R1`..`R44`, `(R2, R36)`, `R15-R21`).
fn has_requirement_id(text: &str) -> bool {
    let b = text.as_bytes();
    (0..b.len()).any(|i| {
        b[i] == b'R'
            && (i == 0 || !b[i - 1].is_ascii_alphanumeric())
            && b.get(i + 1).is_some_and(u8::is_ascii_digit)
            && !b
                .get(i + 2..)
                .and_then(|r| r.iter().find(|c| !c.is_ascii_digit()))
                .is_some_and(|c| c.is_ascii_alphabetic())
    })
}

#[test]
fn help_has_examples_descriptions_and_no_requirement_ids() {
    assert!(has_requirement_id("(R2, R36)") && has_requirement_id("R15-R21"));
    assert!(!has_requirement_id("RAM, R2D2x, 20MiB") && !has_requirement_id("QR code"));
    let cmd = vmbackup::cli::command();
    let mut problems = Vec::new();
    walk(&cmd, "vmbackup", &mut |c, path| {
        let texts: Vec<String> = [
            c.get_about(),
            c.get_long_about(),
            c.get_after_help(),
            c.get_after_long_help(),
        ]
        .into_iter()
        .flatten()
        .map(|s| s.to_string())
        .collect();
        if c.get_about().is_none() {
            problems.push(format!("{path}: no description"));
        }
        let examples = texts.iter().any(|t| t.contains("Examples:"));
        if !examples {
            problems.push(format!("{path}: no examples"));
        }
        for t in &texts {
            if has_requirement_id(t) {
                problems.push(format!("{path}: requirement id in {t:?}"));
            }
        }
        for a in c.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            let long = a.get_long_help().map(|h| h.to_string()).unwrap_or_default();
            if help.trim().is_empty() && long.trim().is_empty() {
                problems.push(format!("{path}: argument {id} has no description"));
            }
            let values: Vec<String> = a
                .get_possible_values()
                .iter()
                .filter_map(|v| v.get_help().map(|h| h.to_string()))
                .collect();
            for t in std::iter::once(&help).chain([&long]).chain(values.iter()) {
                if has_requirement_id(t) {
                    problems.push(format!("{path}: requirement id in --{id}: {t:?}"));
                }
            }
            if a.is_global_set() && a.get_help_heading() != Some("Global options") {
                problems.push(format!("{path}: global --{id} not under 'Global options'"));
            }
        }
    });
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn help_lists_global_options_apart_and_shows_examples() {
    let env = Env::new();
    let out = env.ok(&["rule", "add", "--help"]);
    let own = out.find("Options:").expect("own options");
    let global = out.find("Global options:").expect("global options");
    assert!(own < global, "{out}");
    assert!(
        out.contains("Examples:") && out.contains("vmbackup rule add web"),
        "{out}"
    );
    assert!(
        out[global..].contains("--json") && !out[..global].contains("--json"),
        "{out}"
    );
}

#[test]
fn usage_errors_keep_clap_tips_in_one_line() {
    let env = Env::new();
    let err = env.fails(2, &["rule", "shwo", "web"]);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("'shwo'") && err.contains("similar subcommand") && err.contains("'show'"),
        "{err}"
    );
    assert!(err.contains("vmbackup rule --help"), "{err}");
    let err = env.fails(2, &["run-now", "web", "--levle", "full"]);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--levle") && err.contains("--level"), "{err}");
    assert!(err.contains("vmbackup run-now --help"), "{err}");
}

#[test]
fn a_config_given_explicitly_must_exist_for_every_command() {
    let env = Env::new();
    env.ok(&["rule", "list"]);
    let missing = env.path("no-such.conf");
    for args in [
        &["rule", "list"][..],
        &["task", "list"],
        &["platform", "list"],
        &["logs", "x"],
    ] {
        let mut a = vec!["--config", missing.to_str().unwrap()];
        a.extend_from_slice(args);
        env.refused(&a, &["--config", "no such file"]);
    }
}

/// The names the completion engine offers for the last word of `line`, as
/// bash asks it (the registration script of `vmbackup completions bash`);
/// options, which an empty word is offered too, are left out.
fn complete(env: &Env, line: &[&str]) -> Vec<String> {
    let out = env
        .cmd()
        .env("VMBACKUP_COMPLETE", "bash")
        .env("_CLAP_COMPLETE_INDEX", (line.len() - 1).to_string())
        .env("_CLAP_IFS", "\n")
        .arg("--")
        .args(line)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|w| !w.starts_with('-'))
        .map(String::from)
        .collect()
}

#[test]
fn completions_offer_names_from_the_state_and_directories() {
    let env = Env::new();
    let _vm = env.vm("cvm1", &[DiskSpec::qcow2("vda", 4 * MIB)], true);
    env.add_lab("t1");
    env.add_rule("web", "lab", "cvm1", "t1", &["--once", "2030-01-01 00:00"]);
    for shell in ["bash", "zsh", "fish"] {
        let script = env.ok(&["completions", shell]);
        assert!(script.contains("VMBACKUP_COMPLETE"), "{shell}: {script}");
    }
    assert_eq!(complete(&env, &["vmbackup", "run"]), ["run-now", "run-due"]);
    assert_eq!(complete(&env, &["vmbackup", "rule", "show", ""]), ["web"]);
    assert_eq!(complete(&env, &["vmbackup", "stats", "w"]), ["web"]);
    assert_eq!(
        complete(&env, &["vmbackup", "platform", "vms", ""]),
        ["lab"]
    );
    assert_eq!(complete(&env, &["vmbackup", "target", "show", ""]), ["t1"]);
    let vms = complete(&env, &["vmbackup", "points", "web", "--vm", ""]);
    assert_eq!(vms, ["cvm1"]);
    env.ok(&["run-now", "web", "--level", "full"]);
    let points = complete(
        &env,
        &["vmbackup", "restore", "web", "--vm", "cvm1", "--point", ""],
    );
    assert_eq!(points.len(), 2, "{points:?}");
    assert_eq!(points[0], "latest");
    assert!(
        points[1].ends_with('Z') && points[1].len() == 16,
        "{points:?}"
    );
    let tasks = complete(&env, &["vmbackup", "logs", "web", "--task", ""]);
    assert_eq!(tasks, ["1"]);
    // Directories for --to and --path.
    std::fs::create_dir_all(env.path("dirs/sub")).unwrap();
    std::fs::write(env.path("dirs/file"), b"x").unwrap();
    let prefix = format!("{}/", env.path("dirs").display());
    let dirs = complete(
        &env,
        &[
            "vmbackup", "restore", "web", "--vm", "cvm1", "--to", &prefix,
        ],
    );
    assert!(dirs.iter().any(|d| d.ends_with("sub/")), "{dirs:?}");
    assert!(!dirs.iter().any(|d| d.ends_with("file")), "{dirs:?}");
}
