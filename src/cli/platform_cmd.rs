//! `vmbackup platform ...`: register platforms and look at their VMs (R2, R3, R35, R36, R43).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::args::{PlatformCmd, PlatformKind};
use super::output::{print_done, print_json, yes_no, Table};
use super::Ctx;
use crate::error::{invalid, ExitCode};
use crate::platform::{self, PlatformSpec, VmInfo};
use crate::state::platforms::PlatformRow;
use crate::state::{check_name, State};
use crate::units::format_size;

pub fn run(ctx: &Ctx, cmd: PlatformCmd) -> Result<ExitCode> {
    match cmd {
        PlatformCmd::Add {
            name,
            kind,
            qmp_dir,
            uri,
        } => add(ctx, &name, spec_of(kind, qmp_dir, uri)?),
        PlatformCmd::List => list(ctx),
        PlatformCmd::Show { name } => show(ctx, &name),
        PlatformCmd::Refresh { name } => refresh(ctx, &name),
        PlatformCmd::Remove { name } => {
            ctx.state()?.remove_platform(&name)?;
            print_done(
                ctx.json,
                ctx.quiet,
                &format!("platform '{name}' removed"),
                serde_json::json!({ "platform": name }),
            );
            Ok(ExitCode::Ok)
        }
        PlatformCmd::Vms { name, refresh: now } => {
            if now {
                refresh_inventory(ctx, &name)?;
            }
            vms(ctx, &name)
        }
    }
}

/// Longest QMP directory: `<dir>/<name>.qmp` must fit a unix socket path.
const MAX_QMP_DIR: usize = 100;

/// The platform spec from `platform add` arguments: each type's parameters are
/// required with it and refused with another type.
fn spec_of(
    kind: PlatformKind,
    qmp_dir: Option<PathBuf>,
    uri: Option<String>,
) -> Result<PlatformSpec> {
    match kind {
        PlatformKind::Qemu => {
            if let Some(uri) = uri {
                return Err(invalid(
                    "--uri",
                    uri,
                    "only with --type libvirt; --type qemu takes --qmp-dir",
                ));
            }
            let Some(dir) = qmp_dir else {
                return Err(invalid(
                    "--qmp-dir",
                    "(missing)",
                    "required with --type qemu: the directory holding QMP sockets (*.qmp, *.sock)",
                ));
            };
            Ok(PlatformSpec::Qemu {
                qmp_dir: qemu_dir(&dir)?,
            })
        }
        PlatformKind::Libvirt => {
            if let Some(dir) = qmp_dir {
                return Err(invalid(
                    "--qmp-dir",
                    dir.display(),
                    "only with --type qemu; --type libvirt takes --uri",
                ));
            }
            let Some(uri) = uri else {
                return Err(invalid(
                    "--uri",
                    "(missing)",
                    "required with --type libvirt: a libvirt URI such as qemu:///system or qemu+ssh://host/system",
                ));
            };
            if !uri.contains("://") {
                return Err(invalid(
                    "--uri",
                    uri,
                    "a libvirt URI such as qemu:///system or qemu+ssh://host/system",
                ));
            }
            Ok(PlatformSpec::Libvirt { uri })
        }
    }
}

fn qemu_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(invalid(
            "--qmp-dir",
            dir.display(),
            "must be an existing directory holding QMP sockets (*.qmp, *.sock)",
        ));
    }
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    if dir.as_os_str().len() > MAX_QMP_DIR {
        return Err(invalid(
            "--qmp-dir",
            dir.display(),
            format!("must be at most {MAX_QMP_DIR} bytes long: the QMP sockets in it must fit a unix socket path (108 bytes)"),
        ));
    }
    Ok(dir)
}

fn add(ctx: &Ctx, name: &str, spec: PlatformSpec) -> Result<ExitCode> {
    check_name("platform name", name)?;
    let mut state = ctx.state()?;
    if state.platform(name)?.is_some() {
        return Err(invalid(
            "platform name",
            name,
            "already registered; pick another name",
        ));
    }
    // A platform that cannot be reached is bad input here: nothing is registered.
    let plat = platform::connect(&spec, ctx.system_config()?.io_timeout).map_err(|e| {
        invalid(
            "--uri",
            spec.address(),
            format!("cannot connect ({e:#}); check the URI and that libvirtd runs"),
        )
    })?;
    let vms = plat.inventory()?;
    state.add_platform(name, &spec, &vms)?;
    report_inventory(ctx, name, &vms, "added");
    Ok(ExitCode::Ok)
}

/// Query the platform and store its VM list (R36).
fn refresh_inventory(ctx: &Ctx, name: &str) -> Result<(State, Vec<VmInfo>)> {
    let mut state = ctx.state()?;
    let row = state.require_platform(name)?;
    let io_timeout = ctx.system_config()?.io_timeout;
    let vms = platform::connect(&row.spec, io_timeout)?
        .inventory()
        .with_context(|| format!("platform '{name}'"))?;
    state.set_inventory(name, &vms)?;
    Ok((state, vms))
}

fn refresh(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let (_, vms) = refresh_inventory(ctx, name)?;
    report_inventory(ctx, name, &vms, "refreshed");
    Ok(ExitCode::Ok)
}

fn report_inventory(ctx: &Ctx, name: &str, vms: &[VmInfo], verb: &str) {
    let bad = vms.iter().filter(|v| v.error.is_some()).count();
    let msg = format!(
        "platform '{name}' {verb}: {} VM(s), {bad} unreachable",
        vms.len()
    );
    if ctx.json {
        print_done(
            true,
            false,
            &msg,
            serde_json::json!({ "platform": name, "vm_count": vms.len(), "unreachable_count": bad }),
        );
    } else if !ctx.quiet {
        out!("{msg}");
        for v in vms.iter().filter(|v| v.error.is_some()) {
            out!("  {}: {}", v.name, v.error.as_deref().unwrap_or_default());
        }
    }
}

/// Where a platform is, in JSON: its type and every type's parameter (`null`
/// for the other types), so that every field is always there (docs/JSON.md).
#[derive(Serialize)]
struct Address {
    #[serde(rename = "type")]
    kind: String,
    qmp_dir: Option<String>,
    uri: Option<String>,
}

impl Address {
    fn of(spec: &PlatformSpec) -> Address {
        let (qmp_dir, uri) = match spec {
            PlatformSpec::Qemu { qmp_dir } => (Some(qmp_dir.display().to_string()), None),
            PlatformSpec::Libvirt { uri } => (None, Some(uri.clone())),
        };
        Address {
            kind: spec.kind().to_string(),
            qmp_dir,
            uri,
        }
    }
}

fn list(ctx: &Ctx) -> Result<ExitCode> {
    let rows = ctx.state()?.platforms()?;
    if ctx.json {
        #[derive(Serialize)]
        struct Item<'a> {
            name: &'a str,
            #[serde(flatten)]
            address: Address,
            vm_count: usize,
            #[serde(serialize_with = "crate::timefmt::stored")]
            created: &'a str,
            #[serde(serialize_with = "crate::timefmt::stored_opt")]
            refreshed: Option<String>,
        }
        let items: Vec<Item> = rows
            .iter()
            .map(|p| Item {
                name: &p.name,
                address: Address::of(&p.spec),
                vm_count: p.vms.len(),
                created: &p.created_at,
                refreshed: p.refreshed_at.clone(),
            })
            .collect();
        print_json(&items);
        return Ok(ExitCode::Ok);
    }
    let mut t = Table::new(&["NAME", "TYPE", "ADDRESS", "VMS", "REFRESHED"]);
    for p in &rows {
        t.row(vec![
            p.name.clone(),
            p.spec.kind().to_string(),
            p.spec.address(),
            p.vms.len().to_string(),
            p.refreshed_at.clone().unwrap_or_default(),
        ]);
    }
    t.print();
    Ok(ExitCode::Ok)
}

fn show(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let state = ctx.state()?;
    let p = state.require_platform(name)?;
    if ctx.json {
        #[derive(Serialize)]
        struct Doc<'a> {
            name: &'a str,
            #[serde(flatten)]
            address: Address,
            #[serde(serialize_with = "crate::timefmt::stored")]
            created: &'a str,
            #[serde(serialize_with = "crate::timefmt::stored_opt")]
            refreshed: Option<String>,
            vms: Vec<VmItem>,
        }
        print_json(&Doc {
            name: &p.name,
            address: Address::of(&p.spec),
            created: &p.created_at,
            refreshed: p.refreshed_at.clone(),
            vms: vm_items(&state, &p)?,
        });
        return Ok(ExitCode::Ok);
    }
    out!("name:       {}", p.name);
    out!("type:       {}", p.spec.kind());
    out!("address:    {}", p.spec.address());
    out!("created:    {}", p.created_at);
    out!(
        "refreshed:  {}",
        p.refreshed_at.as_deref().unwrap_or("never")
    );
    out!("vms:        {}", p.vms.len());
    out!();
    print_vm_table(&vm_items(&state, &p)?);
    Ok(ExitCode::Ok)
}

/// A VM as `platform vms` shows it: the inventory plus the rule protecting it (R35).
#[derive(Serialize)]
struct VmItem {
    #[serde(flatten)]
    vm: VmInfo,
    #[serde(skip)]
    name: String,
    rule: Option<String>,
}

fn vm_items(state: &State, p: &PlatformRow) -> Result<Vec<VmItem>> {
    p.vms
        .iter()
        .map(|v| {
            Ok(VmItem {
                vm: v.clone(),
                name: v.name.clone(),
                rule: state.rule_of_vm(&p.name, &v.name)?,
            })
        })
        .collect()
}

fn vms(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let state = ctx.state()?;
    let p = state.require_platform(name)?;
    let items = vm_items(&state, &p)?;
    if ctx.json {
        print_json(&items);
    } else {
        print_vm_table(&items);
    }
    Ok(ExitCode::Ok)
}

fn print_vm_table(items: &[VmItem]) {
    let mut t = Table::new(&[
        "VM", "STATUS", "DISK", "FORMAT", "SIZE", "CBT", "RULE", "NOTE",
    ]);
    for it in items {
        let rule = it
            .rule
            .as_ref()
            .map(|r| format!("in rule {r}"))
            .unwrap_or_default();
        if let Some(err) = &it.vm.error {
            t.row(vec![
                it.name.clone(),
                "unreachable".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                rule.clone(),
                err.clone(),
            ]);
            continue;
        }
        if it.vm.disks.is_empty() {
            t.row(vec![
                it.name.clone(),
                it.vm.status.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                rule.clone(),
                "no disks".into(),
            ]);
        }
        for (i, d) in it.vm.disks.iter().enumerate() {
            let (vm, status, rule) = if i == 0 {
                (it.name.clone(), it.vm.status.clone(), rule.clone())
            } else {
                (String::new(), String::new(), String::new())
            };
            let note = d
                .uncoverable
                .as_ref()
                .map(|r| format!("not coverable: {r} (R43)"))
                .unwrap_or_default();
            t.row(vec![
                vm,
                status,
                d.name.clone(),
                d.format.clone(),
                format_size(d.size),
                yes_no(d.cbt),
                rule,
                note,
            ]);
        }
    }
    t.print();
}
