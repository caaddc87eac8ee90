//! The committed man pages (man/*.1) are generated from the clap definitions and
//! must not go stale. Regenerate with: VMBACKUP_UPDATE_MAN=1 cargo test --test man_pages

use std::path::Path;

fn render(cmd: &clap::Command, name: &str, out: &mut Vec<(String, Vec<u8>)>) {
    let cmd = cmd.clone().name(name.to_string());
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf).unwrap();
    out.push((format!("{name}.1"), buf));
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        render(sub, &format!("{name}-{}", sub.get_name()), out);
    }
}

#[test]
fn man_pages_are_fresh() {
    let mut cmd = vmbackup::cli::command();
    cmd.build();
    let mut pages = Vec::new();
    render(&cmd, "vmbackup", &mut pages);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    if std::env::var_os("VMBACKUP_UPDATE_MAN").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "1") {
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
