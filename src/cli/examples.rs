//! Examples for every command's `--help` (and so its man page), in one table
//! beside the clap definitions rather than inside them, so `args.rs` stays a
//! readable list of arguments. A test (tests/cli_help.rs) checks every
//! subcommand has some.

/// Examples per command path (`vmbackup rule add`); comments start with `#`.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "vmbackup",
        "# a QEMU host, a target, a rule that backs up two VMs every night
vmbackup platform add lab --type qemu --qmp-dir /run/qemu
vmbackup target add nas --path /mnt/backup
vmbackup rule add web --platform lab --vm web01,web02 --target nas \\
    --schedule \"full weekly on sun at 01:00\" --schedule \"inc weekly on mon-sat at 01:00\" \\
    --retention 4
vmbackup run-now web --level full
vmbackup restore web --vm web01 --to /srv/restore
# unattended: systemctl enable --now vmbackup.service (or run-due from cron)",
    ),
    (
        "vmbackup platform",
        "vmbackup platform add lab --type qemu --qmp-dir /run/qemu
vmbackup platform vms lab --refresh",
    ),
    (
        "vmbackup platform add",
        "# one QMP socket per VM (*.qmp, *.sock) in the directory
vmbackup platform add lab --type qemu --qmp-dir /run/qemu
# the domains of a libvirt daemon, here or over ssh
vmbackup platform add kvm1 --type libvirt --uri qemu:///system
vmbackup platform add kvm2 --type libvirt --uri qemu+ssh://root@kvm2/system",
    ),
    ("vmbackup platform list", "vmbackup platform list\nvmbackup --json platform list"),
    ("vmbackup platform show", "vmbackup platform show lab"),
    (
        "vmbackup platform refresh",
        "# after starting or stopping VMs
vmbackup platform refresh lab",
    ),
    ("vmbackup platform remove", "vmbackup platform remove lab"),
    (
        "vmbackup platform vms",
        "vmbackup platform vms lab
vmbackup platform vms lab --refresh",
    ),
    (
        "vmbackup target",
        "vmbackup target add nas --path /mnt/backup\nvmbackup target show nas",
    ),
    (
        "vmbackup target add",
        "# an existing directory (mount it first); a marker is written into it
vmbackup target add nas --path /mnt/backup",
    ),
    ("vmbackup target list", "vmbackup target list"),
    ("vmbackup target show", "vmbackup target show nas"),
    (
        "vmbackup target mark",
        "# a target registered before markers existed, once its disk is mounted
vmbackup target mark nas",
    ),
    ("vmbackup target remove", "vmbackup target remove nas"),
    (
        "vmbackup key",
        "vmbackup key generate /root/offsite.key
vmbackup key list offsite",
    ),
    (
        "vmbackup key generate",
        "# keep a copy somewhere safe: a lost key means lost backups
vmbackup key generate /root/offsite.key",
    ),
    (
        "vmbackup key list",
        "vmbackup key list offsite",
    ),
    (
        "vmbackup key add",
        "vmbackup key generate /root/second.key
vmbackup key add offsite --key-file /root/second.key
vmbackup key add offsite --passphrase-file /root/offsite.pass",
    ),
    (
        "vmbackup key remove",
        "vmbackup key list offsite
vmbackup key remove offsite 3f9c0a1b2c3d4e5f",
    ),
    (
        "vmbackup rule",
        "vmbackup rule list\nvmbackup rule show web\nvmbackup rule stop web --vm web02",
    ),
    (
        "vmbackup rule add",
        "vmbackup rule add web --platform lab --vm web01,web02 --target nas \\
    --schedule \"full weekly on sun at 01:00\" --schedule \"inc weekly on mon-sat at 01:00\" \\
    --retention 4 --bandwidth \"mon-fri 08:00-18:00 20MiB/s\"
# once, at a local time
vmbackup rule add migrate --platform lab --vm db01 --target nas --once \"2026-12-24 22:00\"
# file systems frozen through the guest agent when it answers
vmbackup rule add files --platform kvm1 --vm fs01 --target nas \\
    --schedule \"full daily at 03:00\" --quiesce=try
# its own webhook
vmbackup rule add db --platform lab --vm db01 --target nas \\
    --schedule \"full daily at 02:00\" --notify-url https://alerts.example.com/hooks/db",
    ),
    (
        "vmbackup rule edit",
        "vmbackup rule edit web --retention 8
vmbackup rule edit web --bandwidth \"mon-fri 08:00-18:00 pause\"
vmbackup rule edit web --clear-bandwidth --notify-url none
# copy every new point to target offsite; the copy keeps 30 days
vmbackup rule edit web --copy-to offsite --copy-retention 30",
    ),
    ("vmbackup rule add-vm", "vmbackup rule add-vm web --vm web03"),
    (
        "vmbackup rule start",
        "vmbackup rule start web\nvmbackup rule start web --vm web02",
    ),
    (
        "vmbackup rule stop",
        "vmbackup rule stop web\nvmbackup rule stop web --vm web02",
    ),
    (
        "vmbackup rule remove",
        "vmbackup rule remove web --vm web02
vmbackup rule remove web
# also delete its backup points (and its repository when no other rule uses it)
vmbackup rule remove old --delete-data",
    ),
    (
        "vmbackup rule list",
        "vmbackup rule list
# VMs without a successful backup, for a script
vmbackup --json rule list | jq -r '.[] | .name as $r | .vms[] | select(.last_backup == null) | \"\\($r) \\(.vm)\"'",
    ),
    ("vmbackup rule show", "vmbackup rule show web"),
    ("vmbackup config", "vmbackup config show"),
    (
        "vmbackup config show",
        "vmbackup config show\nvmbackup --config ./test.conf config show",
    ),
    (
        "vmbackup run-now",
        "vmbackup run-now web --level full
vmbackup run-now web --vm web01 --level inc
vmbackup --json run-now web --level inc | tail -1",
    ),
    (
        "vmbackup daemon",
        "# as a systemd service (etc/systemd/vmbackup.service)
systemctl enable --now vmbackup.service
vmbackup daemon",
    ),
    (
        "vmbackup run-due",
        "# from cron, every minute (exit code 4: a run was skipped)
* * * * * root /usr/local/bin/vmbackup -q run-due",
    ),
    ("vmbackup task", "vmbackup task list\nvmbackup task cancel 42"),
    (
        "vmbackup task list",
        "vmbackup task list\nvmbackup task list --all",
    ),
    ("vmbackup task cancel", "vmbackup task cancel 42"),
    (
        "vmbackup logs",
        "vmbackup logs web --vm web01 -n 50
vmbackup logs web --since 2h
vmbackup logs web --task 42
vmbackup logs web --follow",
    ),
    (
        "vmbackup points",
        "vmbackup points web\nvmbackup points web --vm web01
# a new host with no rule in the state: the VM's points on a target
vmbackup points --target offsite --vm lab/web01",
    ),
    (
        "vmbackup prune",
        "vmbackup prune web --dry-run\nvmbackup prune web --vm web01\nvmbackup --json prune",
    ),
    (
        "vmbackup forget",
        "vmbackup forget web --vm web01 --point 20261124T010000Z --dry-run
vmbackup forget web --vm web01 --point 20261124T010000Z,20261125T010000Z",
    ),
    (
        "vmbackup gc",
        "vmbackup gc --dry-run\nvmbackup gc web\nvmbackup --json gc --target nas",
    ),
    (
        "vmbackup restore",
        "vmbackup restore web --vm web01 --to /srv/restore
vmbackup restore web --vm web01 --point 20261124T010000Z --to /srv/restore --format qcow2
# libvirt: also define the restored point as a new domain, and start it
vmbackup restore files --vm fs01 --to /var/lib/libvirt/images/fs01-copy --format qcow2 \\
    --as-vm fs01-copy --start
# qemu: the images plus a launch script web01-copy.sh, network on a bridge
vmbackup restore web --vm web01 --to /srv/web01-copy --as-vm web01-copy --net-bridge br0
# every VM of the rule as it was at a time, into /srv/restore/<VM>/
vmbackup restore web --all --at \"2026-11-24 01:00\" --to /srv/restore
# back into the VM's own images (the VM stopped); its next backup is a full
vmbackup restore web --vm web01 --in-place
# a new host with no rule in the state: from the repository on the target that holds the VM
vmbackup restore --target offsite --vm lab/web01 --to /srv/restore",
    ),
    (
        "vmbackup copy",
        "vmbackup copy web --to offsite
vmbackup copy web --vm web01 --point latest --to offsite
vmbackup points web --from offsite",
    ),
    (
        "vmbackup verify",
        "vmbackup verify
vmbackup verify web --vm web01
# weekly, from a systemd timer (etc/systemd/vmbackup-verify.timer)
systemctl enable --now vmbackup-verify.timer
# boot the latest point without network and wait for the guest agent
vmbackup verify web --vm web01 --boot
# or for a line on the serial console
vmbackup verify web --vm web01 --boot --expect \"login:\" --timeout 600",
    ),
    (
        "vmbackup recover",
        "# run web01 straight from its latest point; writes go to overlays
vmbackup recover web --vm web01 --transient --start
# serve the point over NBD only (no VM): prints the NBD URIs
vmbackup recover web --vm web01 --point 20261124T010000Z --transient
# run it now and move its disks to production storage while it runs
vmbackup recover web --vm web01 --instant --to /var/lib/vms/web01
vmbackup recover list
vmbackup recover stop 17",
    ),
    (
        "vmbackup recover list",
        "vmbackup recover list\nvmbackup recover list --all",
    ),
    (
        "vmbackup recover stop",
        "vmbackup recover stop 17
# keep the VM's writes (the overlays) for later inspection
vmbackup recover stop 17 --keep-overlays",
    ),
    (
        "vmbackup recover resume",
        "# after a reboot or a crash: restart the server, finish the migration
vmbackup recover resume 17",
    ),
    (
        "vmbackup recover abort",
        "# give up moving the disks; the VM runs on as a transient recovery
vmbackup recover abort 17",
    ),
    (
        "vmbackup recover-serve",
        "# started by 'vmbackup recover', not by hand
vmbackup recover-serve 17",
    ),
    (
        "vmbackup cleanup",
        "vmbackup cleanup\nvmbackup cleanup web --redact",
    ),
    (
        "vmbackup stats",
        "vmbackup stats web
vmbackup stats web --vm web01 --period month
vmbackup stats web --tasks --failed
# from a monitoring script: read without marking failures viewed
vmbackup --json stats web --peek",
    ),
    ("vmbackup notify", "vmbackup notify test"),
    (
        "vmbackup notify test",
        "vmbackup notify test\nvmbackup notify test --rule db",
    ),
    (
        "vmbackup completions",
        "# completes subcommands, options and rule, VM, platform, target, point and task names
echo 'source <(vmbackup completions bash)' >> ~/.bashrc
vmbackup completions fish > ~/.config/fish/completions/vmbackup.fish",
    ),
];

/// The examples of command `path` (`vmbackup rule add`), one per line.
pub fn of(path: &str) -> Option<&'static str> {
    EXAMPLES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, text)| *text)
}

/// The heading [`add`] puts before examples in `--help`.
pub const HEADING: &str = "Examples:";

/// The examples of `path`, as a help section.
fn examples_of(path: &str) -> Option<String> {
    of(path).map(|text| {
        let body: Vec<String> = text.lines().map(|l| format!("  {l}")).collect();
        format!("{HEADING}\n{}", body.join("\n"))
    })
}

/// `cmd` (named `path`) and its subcommands with their examples after their
/// help; a command's own long help (`after_long_help`) keeps its text first.
pub fn add(mut cmd: clap::Command, path: &str) -> clap::Command {
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in subs {
        let sub_path = format!("{path} {name}");
        cmd = cmd.mut_subcommand(&name, |s| add(s, &sub_path));
    }
    let Some(examples) = examples_of(path) else {
        return cmd;
    };
    let long = cmd.get_after_long_help().map(|h| h.to_string());
    let cmd = cmd.after_help(examples.clone());
    match long {
        Some(long) => cmd.after_long_help(format!("{long}\n\n{examples}")),
        None => cmd,
    }
}
