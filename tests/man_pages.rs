//! The committed man pages (man/*.1, man/system.conf.5) are generated from the
//! clap definitions, the examples table (src/cli/examples.rs), the manual's
//! exit status, environment and files (src/cli/manual.rs) and system.conf's key
//! table (src/config.rs), and must not go stale. Regenerate with:
//! VMBACKUP_UPDATE_MAN=1 cargo test --test man_pages

use std::io::Write;
use std::path::Path;

use vmbackup::cli::{examples, manual};

/// Escape text for roff: backslashes, and a leading `.` or `'`.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// `.SH TITLE` and `.TP` entries.
fn tagged(out: &mut Vec<u8>, title: &str, items: &[(String, String)]) {
    writeln!(out, ".SH \"{title}\"").unwrap();
    for (tag, text) in items {
        writeln!(out, ".TP\n\\fB{}\\fR\n{}", roff(tag), roff(text)).unwrap();
    }
}

/// Paragraphs of plain text (blank-line separated) as `.PP` blocks.
fn paragraphs(out: &mut Vec<u8>, text: &str) {
    for p in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        writeln!(out, ".PP\n{}", roff(&p.replace('\n', " "))).unwrap();
    }
}

/// One page: clap_mangen's title, name, synopsis, description, options and
/// subcommands, then the command's own long text, EXAMPLES, and for the top
/// page EXIT STATUS, ENVIRONMENT, FILES and SEE ALSO.
fn page(cmd: &clap::Command, path: &str, subpages: &[String]) -> Vec<u8> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out).unwrap();
    man.render_name_section(&mut out).unwrap();
    man.render_synopsis_section(&mut out).unwrap();
    man.render_description_section(&mut out).unwrap();
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out).unwrap();
    }
    if cmd.get_subcommands().next().is_some() {
        man.render_subcommands_section(&mut out).unwrap();
    }
    // A command's own long text (prune: how retention works), without the
    // examples `--help` appends to it.
    if let Some(long) = cmd.get_after_long_help().map(|h| h.to_string()) {
        let own = long.split(examples::HEADING).next().unwrap_or("").trim();
        let mut parts = own.splitn(2, "\n\n");
        let title = parts.next().unwrap_or("").trim();
        writeln!(out, ".SH \"{}\"", roff(title)).unwrap();
        paragraphs(&mut out, parts.next().unwrap_or(""));
    }
    let ex = examples::of(path).unwrap_or_else(|| panic!("{path} has no examples"));
    writeln!(out, ".SH EXAMPLES\n.nf").unwrap();
    for line in ex.lines() {
        writeln!(out, "{}", roff(line)).unwrap();
    }
    writeln!(out, ".fi").unwrap();
    if path == "vmbackup" {
        let status: Vec<(String, String)> = manual::exit_status()
            .into_iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect();
        tagged(&mut out, "EXIT STATUS", &status);
        writeln!(
            out,
            ".PP\n{}",
            roff("With several tasks, the worst result wins: 130 > 3 > 4 > 2 > 1 > 0.")
        )
        .unwrap();
        let env: Vec<(String, String)> = manual::ENVIRONMENT
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tagged(&mut out, "ENVIRONMENT", &env);
        let files: Vec<(String, String)> = manual::FILES
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tagged(&mut out, "FILES", &files);
    }
    writeln!(out, ".SH \"SEE ALSO\"").unwrap();
    let mut refs: Vec<String> = subpages.iter().map(|p| format!("{}(1)", roff(p))).collect();
    if path == "vmbackup" {
        refs.push("system.conf(5)".into());
    } else {
        refs.push("vmbackup(1)".into());
    }
    writeln!(out, "{}", refs.join(", ")).unwrap();
    man.render_version_section(&mut out).unwrap();
    out
}

/// The page `name` of the command `path` (`vmbackup rule add-vm`), then its
/// subcommands' pages.
fn render(cmd: &clap::Command, name: &str, path: &str, out: &mut Vec<(String, Vec<u8>)>) {
    let cmd = cmd.clone().name(name.to_string());
    let subs: Vec<&clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .collect();
    let subpages: Vec<String> = subs
        .iter()
        .map(|s| format!("{name}-{}", s.get_name()))
        .collect();
    out.push((format!("{name}.1"), page(&cmd, path, &subpages)));
    for sub in subs {
        render(
            sub,
            &format!("{name}-{}", sub.get_name()),
            &format!("{path} {}", sub.get_name()),
            out,
        );
    }
}

/// system.conf(5) from config::KEYS.
fn system_conf_page() -> Vec<u8> {
    let mut out = Vec::new();
    let version = env!("CARGO_PKG_VERSION");
    writeln!(
        out,
        ".TH system.conf 5 \"\" \"vmbackup {version}\" \"File Formats\""
    )
    .unwrap();
    writeln!(
        out,
        ".SH NAME\nsystem.conf \\- vmbackup global limits, monitoring and notifications"
    )
    .unwrap();
    writeln!(out, ".SH SYNOPSIS\n/etc/vmbackup/system.conf").unwrap();
    writeln!(out, ".SH DESCRIPTION").unwrap();
    paragraphs(&mut out, "UTF-8 text of 'key = value' lines ('key=value' too), '#' comments on their own line or after an unquoted value, blank lines; a value may be in single or double quotes. Keys are case-sensitive. A missing default file means the defaults below; a file given with --config or VMBACKUP_CONFIG must exist. 'vmbackup config show' prints each effective value and where it came from. Every error is one line that starts with <path>:<line>: and names the key, the value and what is allowed (exit 2).");
    writeln!(out, ".SH KEYS").unwrap();
    for k in vmbackup::config::KEYS.iter() {
        writeln!(
            out,
            ".TP\n\\fB{}\\fR = \\fI{}\\fR\n{}\n.br\nAllowed: {}.",
            roff(k.key),
            roff(if k.default == "-" {
                "(not set)"
            } else {
                k.default
            }),
            roff(k.meaning),
            roff(k.allowed)
        )
        .unwrap();
    }
    writeln!(
        out,
        ".PP\n{}",
        roff("bk_tsk_thd x i2vp_transbuffer may not exceed 32 MiB.")
    )
    .unwrap();
    writeln!(out, ".SH EXAMPLES\n.nf").unwrap();
    for line in [
        "bk_tsk_thd = 4",
        "i2vp_transbuffer = 8M",
        "prometheus_textfile = /var/lib/prometheus/node-exporter/vmbackup.prom",
        "notify_url = https://alerts.example.com/hooks/vmbackup",
        "notify_header_file = /etc/vmbackup/notify-header",
        "notify_command = mail -s \"vmbackup alert\" root",
    ] {
        writeln!(out, "{}", roff(line)).unwrap();
    }
    writeln!(
        out,
        ".fi\n.SH \"SEE ALSO\"\nvmbackup(1), vmbackup\\-config\\-show(1)"
    )
    .unwrap();
    out
}

/// Every page, as (file name, roff text).
fn pages() -> Vec<(String, Vec<u8>)> {
    let mut cmd = vmbackup::cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    render(&cmd, "vmbackup", "vmbackup", &mut pages);
    pages.push(("system.conf.5".into(), system_conf_page()));
    pages
}

#[test]
fn man_pages_are_fresh() {
    let pages = pages();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    if std::env::var_os("VMBACKUP_UPDATE_MAN").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "1" || e == "5") {
                std::fs::remove_file(p).unwrap();
            }
        }
        for (name, body) in &pages {
            std::fs::write(dir.join(name), body).unwrap();
        }
    }
    let mut stale = Vec::new();
    for (name, body) in &pages {
        if std::fs::read(dir.join(name)).ok().as_deref() != Some(body.as_slice()) {
            stale.push(name.clone());
        }
    }
    let committed = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert!(
        stale.is_empty(),
        "stale man pages (run VMBACKUP_UPDATE_MAN=1 cargo test --test man_pages): {stale:?}"
    );
    assert_eq!(
        committed,
        pages.len(),
        "man/ holds pages for commands that no longer exist"
    );
}

#[test]
fn man_pages_have_the_sections_a_manual_needs_and_no_dangling_references() {
    // The generated pages (man_pages_are_fresh checks they are the committed
    // ones), so that this test does not read files being regenerated.
    let pages = pages();
    let text_of = |name: &str| {
        let (_, body) = pages.iter().find(|(n, _)| n == name).expect(name);
        String::from_utf8(body.clone()).unwrap()
    };
    let top = text_of("vmbackup.1");
    for section in [
        "EXIT STATUS",
        "ENVIRONMENT",
        "FILES",
        "EXAMPLES",
        "SEE ALSO",
    ] {
        assert!(
            top.contains(&format!(".SH \"{section}\"")) || top.contains(&format!(".SH {section}")),
            "vmbackup.1 lacks {section}"
        );
    }
    for code in ["0", "1", "2", "3", "4", "130"] {
        assert!(
            top.contains(&format!("\\fB{code}\\fR")),
            "exit status {code}"
        );
    }
    let conf = text_of("system.conf.5");
    for k in vmbackup::config::KEYS.iter() {
        assert!(
            conf.contains(&format!("\\fB{}\\fR", k.key.replace('-', "\\-"))),
            "system.conf.5 lacks {}",
            k.key
        );
    }
    let names: Vec<String> = pages.iter().map(|(n, _)| n.clone()).collect();
    for page in &names {
        let text = text_of(page);
        if page.ends_with(".1") {
            assert!(text.contains(".SH EXAMPLES"), "{page} has no EXAMPLES");
        }
        // Every `name(N)` reference names a page that exists.
        for (i, _) in text.match_indices("(1)").chain(text.match_indices("(5)")) {
            let start = text[..i]
                .rfind(|c: char| c.is_whitespace() || c == ',')
                .map_or(0, |s| s + 1);
            let name = text[start..i]
                .replace("\\-", "-")
                .replace("\\fB", "")
                .replace("\\fR", "");
            let section = &text[i + 1..i + 2];
            let file = format!("{name}.{section}");
            if name.starts_with("vmbackup") || name == "system.conf" {
                assert!(
                    names.contains(&file),
                    "{page} refers to {file}, which does not exist"
                );
            }
        }
    }
    assert!(!names.iter().any(|n| n.starts_with("vmbackup-help")));
}
