//! `vmbackup target ...`: where backup repositories live (R4, R5).
//!
//! `target add` registers a directory or an S3 bucket (credentials are read
//! from a file or the environment by each process; only where they come from
//! is stored) and writes the target marker into it;
//! `target mark` writes (or adopts) the marker of a target registered before
//! markers existed, once it is mounted (docs/FORMAT.md, "Target marker").

use std::path::Path;

use anyhow::{Context, Result};

use super::args::{CredentialSource, TargetAddArgs, TargetCmd};
use super::output::{print_done, print_json, Table};
use super::Ctx;
use crate::error::{invalid, refused, ExitCode};
use crate::repo::store::{S3Credentials, S3Spec, S3Store};
use crate::repo::target::{read_marker, write_marker, TargetMarker};
use crate::repo::{KeySource, TargetSpec};
use crate::state::check_name;

pub fn run(ctx: &Ctx, cmd: TargetCmd) -> Result<ExitCode> {
    match cmd {
        TargetCmd::Add(args) => add(ctx, *args),
        TargetCmd::Mark { name } => mark(ctx, &name),
        TargetCmd::List => {
            let rows = ctx.state()?.targets()?;
            if ctx.json {
                print_json(&rows);
            } else {
                let mut t = Table::new(&["NAME", "LOCATION", "MARKED", "CREATED"]);
                for r in rows {
                    let marked = if r.marker_id.is_some() { "yes" } else { "no" };
                    t.row(vec![
                        r.name,
                        r.spec.to_string(),
                        marked.into(),
                        r.created_at,
                    ]);
                }
                t.print();
            }
            Ok(ExitCode::Ok)
        }
        TargetCmd::Show { name } => {
            let state = ctx.state()?;
            let t = state.require_target(&name)?;
            let users: Vec<String> = state
                .rules()?
                .into_iter()
                .filter(|r| r.settings.target == name)
                .map(|r| r.name)
                .collect();
            let reachable = crate::lifecycle::open_target(&t).map(|_| ());
            if ctx.json {
                let mut v = serde_json::to_value(&t)?;
                v["rules"] = serde_json::json!(users);
                v["reachable"] = serde_json::json!(reachable.is_ok());
                v["error"] = serde_json::json!(reachable.as_ref().err().map(|e| format!("{e:#}")));
                print_json(&v);
            } else {
                out!("name:     {}", t.name);
                out!("location: {}", t.spec);
                out!(
                    "marker:   {}",
                    t.marker_id
                        .as_deref()
                        .unwrap_or("(none: run 'vmbackup target mark')")
                );
                out!("created:  {}", t.created_at);
                out!(
                    "rules:    {}",
                    if users.is_empty() {
                        "(none)".into()
                    } else {
                        users.join(", ")
                    }
                );
                match &reachable {
                    Ok(()) => out!("state:    reachable"),
                    Err(e) => out!("state:    unreachable: {e:#}"),
                }
            }
            Ok(ExitCode::Ok)
        }
        TargetCmd::Remove { name } => {
            ctx.state()?.remove_target(&name)?;
            print_done(
                ctx.json,
                ctx.quiet,
                &format!("target '{name}' removed (its data and marker stay on disk)"),
                serde_json::json!({ "target": name }),
            );
            Ok(ExitCode::Ok)
        }
    }
}

/// Longest target directory: the repository's own paths below it (rule
/// sub-directory, VM, point, chunk names) must fit PATH_MAX (4096).
const MAX_TARGET_PATH: usize = 1024;

fn add(ctx: &Ctx, args: TargetAddArgs) -> Result<ExitCode> {
    let name = args.name.as_str();
    check_name("target name", name)?;
    let spec = match (&args.path, &args.s3) {
        (Some(path), _) => directory_spec(path)?,
        (None, Some(endpoint)) => s3_spec(&args, endpoint)?,
        (None, None) => return Err(invalid("--path", "(none)", "give --path DIR or --s3 URL")),
    };
    let mut state = ctx.state()?;
    if let Some(t) = state.target(name)? {
        return Err(invalid(
            "target name",
            &t.name,
            "already registered; pick another name",
        ));
    }
    let key = key_source(&args)?;
    let store = spec.open()?;
    if let TargetSpec::S3(_) = &spec {
        // Endpoint, bucket and credentials, checked before anything is written.
        check_s3_access(&spec)?;
    }
    // The marker first (a target already marked keeps its id: the same disk or
    // bucket registered again, e.g. in a new state store), then the row.
    let marker = write_marker(store.as_ref(), &TargetMarker::new(name))?;
    state.add_target(name, &spec, &marker.target_id, key.as_ref())?;
    print_done(
        ctx.json,
        ctx.quiet,
        &format!("target '{name}' added: {}", spec.location()),
        serde_json::json!({ "target": name, "spec": spec, "marker_id": marker.target_id }),
    );
    Ok(ExitCode::Ok)
}

/// `--encrypt` with `--key-file` or `--passphrase-file`: the file must hold a
/// key (or a passphrase) now; only its absolute path is stored.
fn key_source(args: &TargetAddArgs) -> Result<Option<KeySource>> {
    if !args.encrypt {
        return Ok(None);
    }
    let (option, file, make): (&str, &Path, fn(std::path::PathBuf) -> KeySource) =
        match (&args.key_file, &args.passphrase_file) {
            (Some(f), _) => ("--key-file", f, KeySource::KeyFile),
            (None, Some(f)) => ("--passphrase-file", f, KeySource::PassphraseFile),
            (None, None) => {
                return Err(invalid(
                    "--encrypt",
                    "(no key)",
                    "give --key-file FILE (vmbackup key generate FILE) or --passphrase-file FILE",
                ))
            }
        };
    let abs = file
        .canonicalize()
        .map_err(|e| invalid(option, file.display(), format!("cannot be read ({e})")))?;
    let source = make(abs);
    source
        .check()
        .map_err(|e| invalid(option, file.display(), format!("{e:#}")))?;
    Ok(Some(source))
}

fn directory_spec(path: &Path) -> Result<TargetSpec> {
    // A missing directory is refused rather than created: it is often an unmounted
    // mount point, and backups written beneath it would fill the root file system.
    if !path.is_dir() {
        return Err(invalid(
            "--path",
            path.display(),
            "must be an existing directory (create or mount it first)",
        ));
    }
    if rustix::fs::access(
        path,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    )
    .is_err()
    {
        return Err(invalid(
            "--path",
            path.display(),
            "must be a directory this user can write to",
        ));
    }
    let abs = path
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    if abs.as_os_str().len() > MAX_TARGET_PATH {
        return Err(invalid(
            "--path",
            abs.display(),
            format!("must be at most {MAX_TARGET_PATH} bytes long (repository paths below it must fit the system's limit of 4096)"),
        ));
    }
    Ok(TargetSpec::Directory { path: abs })
}

fn s3_spec(args: &TargetAddArgs, endpoint: &str) -> Result<TargetSpec> {
    let credentials = match (&args.credentials_file, args.credentials) {
        (Some(file), _) => {
            if !file.is_file() {
                return Err(invalid(
                    "--credentials-file",
                    file.display(),
                    "must be an existing AWS shared-credentials file",
                ));
            }
            let abs = file
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", file.display()))?;
            S3Credentials::File {
                path: abs,
                profile: args.profile.clone(),
            }
        }
        (None, Some(CredentialSource::Environment)) => S3Credentials::Environment,
        (None, None) => {
            return Err(invalid(
                "--credentials-file",
                "(none)",
                "give --credentials-file FILE [--profile NAME] or --credentials environment",
            ))
        }
    };
    let ca_file = match &args.ca_file {
        Some(f) if !f.is_file() => {
            return Err(invalid(
                "--ca-file",
                f.display(),
                "must be an existing PEM file",
            ))
        }
        Some(f) => Some(
            f.canonicalize()
                .with_context(|| format!("cannot resolve {}", f.display()))?,
        ),
        None => None,
    };
    let spec = S3Spec {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        bucket: args.bucket.clone().unwrap_or_default(),
        prefix: args
            .prefix
            .as_deref()
            .unwrap_or("")
            .trim_matches('/')
            .to_string(),
        region: args.region.clone(),
        credentials,
        ca_file,
        allow_http: args.allow_http,
    };
    spec.check()?;
    Ok(TargetSpec::S3(spec))
}

/// `target add` checks an S3 target by listing its bucket: a wrong endpoint,
/// bucket or key fails here (exit 3), before anything is registered.
fn check_s3_access(spec: &TargetSpec) -> Result<()> {
    if let TargetSpec::S3(s3) = spec {
        S3Store::open(s3)?.check_access()?;
    }
    Ok(())
}

/// Write the marker into a registered target (or adopt the one there) and
/// record its id. Refused when the target already records another marker.
fn mark(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let mut state = ctx.state()?;
    let t = state.require_target(name)?;
    let store = t.spec.open().with_context(|| format!("target '{name}'"))?;
    let found = read_marker(store.as_ref())?;
    let marker = match (&found, &t.marker_id) {
        (Some(m), Some(id)) if m.target_id != *id => {
            return Err(refused(format!(
                "target '{name}' at {} holds the marker of another target ('{}', id {}); this target's id is {id}: is the right disk mounted?",
                t.spec.location(),
                m.name,
                m.target_id
            )))
        }
        (Some(m), _) => m.clone(),
        (None, _) => write_marker(store.as_ref(), &TargetMarker::new(name))?,
    };
    state.set_target_marker(name, &marker.target_id)?;
    print_done(
        ctx.json,
        ctx.quiet,
        &format!(
            "target '{name}' marked at {} (id {})",
            t.spec.location(),
            marker.target_id
        ),
        serde_json::json!({ "target": name, "marker_id": marker.target_id }),
    );
    Ok(ExitCode::Ok)
}
