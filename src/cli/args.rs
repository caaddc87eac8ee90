//! The command line, as clap types. Only `cli` sees these; handlers turn them into
//! resolved values before calling the engine. Man pages and shell completions are
//! generated from these definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Agentless, image-level VM backup with changed-block tracking.
///
/// Exit codes: 0 ok; 1 done with warnings; 2 usage or validation error (nothing
/// changed); 3 task failed; 4 busy, locked or skipped; 130 interrupted.
#[derive(Debug, Parser)]
#[command(
    name = "vmbackup",
    version,
    max_term_width = 100,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// State database [default: /var/lib/vmbackup/state.db as root,
    /// $XDG_STATE_HOME/vmbackup/state.db otherwise]
    #[arg(long, global = true, env = "VMBACKUP_STATE", value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// System configuration file (a missing default file means built-in defaults)
    /// [default: /etc/vmbackup/system.conf]
    #[arg(long, global = true, env = "VMBACKUP_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Machine-readable output: JSON documents for list/show, JSON lines for progress
    #[arg(long, global = true)]
    pub json: bool,
    /// Less output (warnings and errors only)
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More output (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register and inspect virtualization platforms (R2, R36)
    #[command(subcommand)]
    Platform(PlatformCmd),
    /// Register and inspect backup targets (R4)
    #[command(subcommand)]
    Target(TargetCmd),
    /// Define, change, start, stop and remove backup rules (R1-R37)
    #[command(subcommand)]
    Rule(RuleCmd),
    /// Show the effective system configuration (R38-R42)
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Back up a rule's VMs now, in this process, within the slot limits (R32, R38)
    RunNow(RunNowArgs),
    /// Run rules unattended in the foreground: wake at each due run (for systemd)
    Daemon,
    /// Run whatever is due now (and missed slots, once), wait, exit (for cron/timers)
    RunDue,
    /// List or cancel tasks (R41)
    #[command(subcommand)]
    Task(TaskCmd),
    /// Show the log lines of a rule's tasks (R32)
    Logs(LogsArgs),
    /// List the restore points of a rule's VMs (damaged and orphaned ones too)
    Points(PointsArgs),
    /// Apply retention now: remove points outside the rule's retention (R15-R21)
    #[command(after_long_help = PRUNE_HELP)]
    Prune(PruneArgs),
    /// Remove chosen points of a VM (refused while a restore reads them)
    Forget(ForgetArgs),
    /// Free the space of removed points: delete the objects no point refers to
    #[command(after_long_help = GC_HELP)]
    Gc(GcArgs),
    /// Restore a point to image files, as a new VM, in place, or a whole rule's VMs
    Restore(RestoreArgs),
    /// Run a VM straight from a restore point (transient), move it to production
    /// storage while it runs (instant), list, stop, resume or abort recoveries
    Recover(RecoverArgs),
    /// The NBD server process of a recovery (started by 'recover', not by hand)
    #[command(hide = true)]
    RecoverServe {
        #[arg(value_name = "ID")]
        id: i64,
    },
    /// Re-read and re-hash backup data; report missing or corrupt chunks; with
    /// --boot, boot a point and judge it
    Verify(VerifyArgs),
    /// Remove leftovers of interrupted runs on platforms and targets (R44)
    Cleanup(CleanupArgs),
    /// Print a shell completion script
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum PlatformCmd {
    /// Register a platform and read its VM list
    Add {
        name: String,
        /// Platform type
        #[arg(long = "type", value_enum)]
        kind: PlatformKind,
        /// qemu: directory holding one QMP unix socket per VM (*.qmp or *.sock)
        #[arg(long, value_name = "DIR")]
        qmp_dir: Option<PathBuf>,
        /// libvirt: connection URI (qemu:///system, qemu+ssh://host/system, qemu+tls://host/system)
        #[arg(long, value_name = "URI")]
        uri: Option<String>,
    },
    /// List registered platforms
    List,
    /// Show one platform with its cached VM list
    Show { name: String },
    /// Re-read the VM list of a platform (R36)
    Refresh { name: String },
    /// Remove a platform (refused while a rule uses it)
    Remove { name: String },
    /// List a platform's VMs with disks, CBT support and protecting rule (R35)
    Vms {
        name: String,
        /// Query the platform now instead of showing the cached list
        #[arg(long)]
        refresh: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PlatformKind {
    /// QEMU processes (qemu-system, qemu-storage-daemon) reached over QMP sockets
    Qemu,
    /// Domains of a libvirt daemon (checkpoints and pull-mode backups)
    Libvirt,
}

#[derive(Debug, Subcommand)]
pub enum TargetCmd {
    /// Register a target: a directory under which backup repositories live;
    /// writes the target marker into it
    Add {
        /// Name for the target (1-64 of A-Z a-z 0-9 . _ -)
        name: String,
        /// An existing directory (a mounted backup disk, NFS share, ...)
        #[arg(long, value_name = "DIR")]
        path: PathBuf,
    },
    /// Write the target marker into a target registered without one (or adopt
    /// the marker found there) once it is mounted; backups refuse an unmarked target
    Mark {
        /// The registered target
        name: String,
    },
    /// List registered targets
    List,
    /// Show one target
    Show { name: String },
    /// Remove a target (refused while a rule uses it; data stays on disk)
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Create a backup rule
    Add(RuleAddArgs),
    /// Change a rule's schedules, retention and bandwidth windows (R34)
    Edit(RuleEditArgs),
    /// Add a VM to a rule; it inherits the rule's settings (R34)
    AddVm {
        name: String,
        #[arg(long, required = true, value_name = "VM")]
        vm: Vec<String>,
    },
    /// Start a rule, or one of its VMs
    Start {
        name: String,
        #[arg(long, value_name = "VM")]
        vm: Option<String>,
    },
    /// Stop a rule, or one of its VMs (no new runs start)
    Stop {
        name: String,
        #[arg(long, value_name = "VM")]
        vm: Option<String>,
    },
    /// Remove a rule, or one VM from it (refused while a restore runs, R37)
    Remove {
        name: String,
        #[arg(long, value_name = "VM")]
        vm: Option<String>,
    },
    /// List rules
    List,
    /// Show a rule: settings, compiled schedules, next runs, per-VM state
    Show { name: String },
}

#[derive(Debug, Args)]
pub struct RuleAddArgs {
    pub name: String,
    /// Registered platform the VMs live on (R2)
    #[arg(long)]
    pub platform: String,
    /// VM(s) from the platform's VM list (R3); repeat or comma-separate
    #[arg(long, required = true, value_delimiter = ',', value_name = "VM")]
    pub vm: Vec<String>,
    /// Registered target (R4)
    #[arg(long)]
    pub target: String,
    /// Sub-directory of the target for this rule's repository (R5) [default: the rule name]
    #[arg(long, value_name = "SUBDIR")]
    pub path: Option<String>,
    /// Do not choose quick backup (CBT) automatically; use --cbt (R6)
    #[arg(long, requires = "cbt")]
    pub no_auto_cbt: bool,
    /// Quick backup (CBT) on or off, with --no-auto-cbt (R7)
    #[arg(long, value_enum, requires = "no_auto_cbt")]
    pub cbt: Option<OnOff>,
    /// Read disk images directly when reachable from this host (R8)
    #[arg(long)]
    pub lan_free: bool,
    /// Delete the rule's backup data when the rule is removed (R9)
    #[arg(long)]
    pub delete_data: bool,
    /// Freeze guest file systems through the guest agent while the snapshot is
    /// taken: "require" (the default when given bare) fails a backup whose guest agent
    /// does not answer, "try" then takes a crash-consistent one with a warning
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true,
          default_missing_value = "require", value_name = "MODE")]
    pub quiesce: Option<QuiesceArg>,
    /// Accept backing up through an NBD server the VM's QEMU already runs on plain
    /// TCP (no TLS): anyone reaching that port can read the disk during the backup.
    /// Without it such a backup is refused
    #[arg(long)]
    pub allow_plain_tcp_export: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// One-time run at this local time, "YYYY-MM-DD HH:MM" (R11-R13)
    #[arg(long, value_name = "TIME", conflicts_with_all = ["schedule", "retention"])]
    pub once: Option<String>,
    /// Periodic run: "<full|inc|diff> <daily|weekly|monthly|quarterly> [on DAYS] at HH:MM[,HH:MM...]";
    /// at most two (R14, R22-R25)
    #[arg(long, value_name = "SPEC")]
    pub schedule: Vec<String>,
    /// Keep the current period's points and those of the N periods before it
    /// (the schedules' period: days, weeks Monday to Sunday, months, quarters),
    /// 0..=64; "all" keeps every point (the default). See 'vmbackup prune --help'
    #[arg(long, value_name = "N|all", value_parser = parse_retention)]
    pub retention: Option<RetentionArg>,
    /// Bandwidth window: "DAYS HH:MM-HH:MM RATE" with RATE like 20MiB/s, or "pause" (R29)
    #[arg(long, value_name = "WINDOW")]
    pub bandwidth: Vec<String>,
}

/// `--retention N` or `--retention all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionArg {
    /// Keep every point.
    All,
    /// Keep the current period and N before it (range checked by the policy).
    Periods(u32),
}

fn parse_retention(text: &str) -> Result<RetentionArg, String> {
    match text {
        "all" => Ok(RetentionArg::All),
        n => n
            .parse()
            .map(RetentionArg::Periods)
            .map_err(|_| "expected a number of periods 0..=64, or 'all'".to_string()),
    }
}

#[derive(Debug, Args)]
pub struct RuleEditArgs {
    pub name: String,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Remove every bandwidth window
    #[arg(long, conflicts_with = "bandwidth")]
    pub clear_bandwidth: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuiesceArg {
    Require,
    Try,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print each setting, its value and where it came from
    Show,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LevelArg {
    Full,
    Inc,
    Diff,
}

#[derive(Debug, Args)]
pub struct RunNowArgs {
    pub rule: String,
    /// Only this VM of the rule [default: every VM]
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Backup level; inc/diff run as full when no full exists or CBT is unavailable (R26, R27)
    #[arg(long, value_enum)]
    pub level: LevelArg,
}

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Pending and running tasks: rule, VM, level, state, percent, rate, why pending
    List {
        /// Also finished tasks (the newest 100)
        #[arg(long)]
        all: bool,
    },
    /// Stop a task cleanly (bitmap merged back, exports removed); it ends interrupted
    Cancel {
        #[arg(value_name = "ID")]
        id: i64,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub rule: String,
    /// Only this VM's tasks
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Only this task
    #[arg(long, value_name = "ID")]
    pub task: Option<i64>,
    /// Keep printing new lines as they are written
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct PointsArgs {
    pub rule: String,
    /// Only this VM [default: every VM of the rule, and orphaned VM keys in its repository]
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Only this rule [default: every rule]
    pub rule: Option<String>,
    /// Only this VM of the rule
    #[arg(long, value_name = "VM", requires = "rule")]
    pub vm: Option<String>,
    /// Show what would be removed, and why, without removing anything
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    pub rule: String,
    /// The VM (or an orphaned VM key, `<platform>/<vm>`, as 'vmbackup points' lists it)
    #[arg(long, value_name = "VM")]
    pub vm: String,
    /// Point id(s) to remove; repeat or comma-separate
    #[arg(long, required = true, value_delimiter = ',', value_name = "ID")]
    pub point: Vec<String>,
    /// Show what would be removed without removing anything
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only this rule's repository [default: the repositories of every rule]
    #[arg(conflicts_with = "target")]
    pub rule: Option<String>,
    /// Only the repositories of the rules on this target
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
    /// Count what would be deleted without deleting anything (backups may run
    /// meanwhile: their new objects count as garbage until they commit)
    #[arg(long)]
    pub dry_run: bool,
}

/// The man page text of `gc`.
const GC_HELP: &str = "\
HOW IT WORKS

Garbage collection reads every index of every point of a repository and marks each chunk and delta they name (and each delta's base chunk), then deletes every other object, and staging files killed writers left more than an hour ago. It holds the repository's exclusive lock: backups that start meanwhile wait (pending) until it is done. A repository whose lock is busy is deferred, never waited for (exit 4). It refuses to sweep while any point's manifest or index cannot be read: 'vmbackup points' lists such damaged points, 'vmbackup forget' removes them. Quarantined objects are never deleted.

The daemon and run-due run it automatically at most once a day per repository, after pruning, when the lock is free.

EXAMPLES

vmbackup gc --dry-run

vmbackup gc web

vmbackup --json gc --target nas";

/// The man page text of `prune`: retention with the seed's examples.
const PRUNE_HELP: &str = "\
HOW RETENTION WORKS

A point belongs to the local-time period holding its start. Retention N keeps every point of the current period and of the N periods before it, in the unit of the rule's schedules: days; weeks, Monday to Sunday; months; quarters. Retention 0 days keeps today's points only; 1 day keeps today's and yesterday's; 0 weeks keeps this week's, from Monday on.

Never removed: the VM's newest point; its newest full (the full that today's incremental depends on); a point a running restore reads. A rule without retention (--retention all) and a one-time rule keep every point.

Every point has its own complete index, so every kept point restores on its own. Example, retention 0 days with a full and daily incrementals: after day 2's incremental, day 1's incrementals are removed and the full stays; day 1's changes live on in day 2's point, which restores byte-exact although the point it was taken against is gone.

The daemon and run-due prune a VM after its last scheduled backup of the day completed, and not while its newest backup failed or was interrupted. This command prunes now. The data of removed points is freed by garbage collection ('vmbackup gc', also run once a day automatically).

EXAMPLES

vmbackup prune web --dry-run

vmbackup prune web --vm web01

vmbackup --json prune";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    pub rule: String,
    /// The VM to restore (or --all)
    #[arg(long, value_name = "VM", required_unless_present = "all")]
    pub vm: Option<String>,
    /// Point id, or "latest"
    #[arg(long, default_value = "latest", value_name = "ID")]
    pub point: String,
    /// Directory to write one image per disk into (with --all: DIR/<VM>/)
    #[arg(long, value_name = "DIR", required_unless_present = "in_place")]
    pub to: Option<PathBuf>,
    /// Image format
    #[arg(long, value_enum, default_value = "raw")]
    pub format: ImageFormat,
    /// Overwrite existing image files
    #[arg(long)]
    pub force: bool,
    /// Also make a new VM called NAME on the restored images, from the point's VM
    /// configuration: libvirt defines a domain (the domain XML with a new UUID and
    /// new MAC addresses); qemu gets a launch script DIR/NAME.sh (the captured
    /// command line with new MACs and QMP socket, no network unless --net or
    /// --net-bridge)
    #[arg(long, value_name = "NAME", conflicts_with_all = ["all", "in_place"])]
    pub as_vm: Option<String>,
    /// Start the new VM once made
    #[arg(long, requires = "as_vm")]
    pub start: bool,
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// Write the point back into the VM's own disk images (refused while they are
    /// open); the VM's next backup is a full
    #[arg(long, conflicts_with_all = ["to", "all", "force"])]
    pub in_place: bool,
    /// Every VM of the rule: each one's latest point (or the newest at or before
    /// --at) into DIR/<VM>/
    #[arg(long, conflicts_with_all = ["vm", "point"])]
    pub all: bool,
    /// With --all: the newest point at or before this time ("YYYY-MM-DD HH:MM", local)
    #[arg(long, value_name = "TIME", requires = "all")]
    pub at: Option<String>,
    /// Permissions of the image files, in octal (a disk holds everything the VM
    /// holds: only root may read it unless you say otherwise)
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub mode: u32,
}

/// How a VM is launched from a captured configuration.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Give the VM network: its NIC models with new MACs on user networking
    #[arg(long, conflicts_with = "net_bridge")]
    pub net: bool,
    /// Give the VM network on this host bridge (new MACs)
    #[arg(long, value_name = "BRIDGE")]
    pub net_bridge: Option<String>,
    /// Supply a secret redacted at backup: ID of the secret object, FILE holding it
    #[arg(long, value_name = "ID=FILE")]
    pub set_secret: Vec<String>,
    /// Accelerator of the launched VM: auto = KVM when /dev/kvm is usable, else TCG
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
}

impl LaunchArgs {
    /// Whether any launch flag was given (they apply to a launch only).
    pub fn given(&self) -> bool {
        self.net
            || self.net_bridge.is_some()
            || !self.set_secret.is_empty()
            || self.accel != AccelArg::Auto
    }
}

/// `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

impl From<AccelArg> for crate::recovery::cmdline::Accel {
    fn from(a: AccelArg) -> Self {
        use crate::recovery::cmdline::Accel;
        match a {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        }
    }
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RecoverArgs {
    #[command(subcommand)]
    pub cmd: Option<RecoverCmd>,
    #[command(flatten)]
    pub start: RecoverStartArgs,
}

#[derive(Debug, Args)]
pub struct RecoverStartArgs {
    /// The rule whose point to recover
    #[arg(required = true)]
    pub rule: Option<String>,
    /// The VM (or --all)
    #[arg(long, value_name = "VM", required_unless_present = "all")]
    pub vm: Option<String>,
    /// Point id, or "latest"
    #[arg(long, default_value = "latest", value_name = "ID")]
    pub point: String,
    /// Every VM of the rule, each from its latest point
    #[arg(long, conflicts_with_all = ["vm", "point"])]
    pub all: bool,
    /// Serve the point and keep writes in overlays; nothing is migrated
    #[arg(long, required_unless_present = "instant", conflicts_with = "instant")]
    pub transient: bool,
    /// Start as transient, then move the disks to --to while the VM runs
    #[arg(long, requires = "to")]
    pub instant: bool,
    /// Launch the VM from the configuration captured at backup
    #[arg(long)]
    pub start: bool,
    /// The recovered VM's name [default: <VM>-recovered-<ID>]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Where the overlays go [default: <state dir>/recover/<ID>/]
    #[arg(long, value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// Instant recovery: the directory of the new images
    #[arg(long, value_name = "DIR")]
    pub to: Option<PathBuf>,
    #[command(flatten)]
    pub launch: LaunchArgs,
}

#[derive(Debug, Subcommand)]
pub enum RecoverCmd {
    /// Recoveries that run: server, VM, overlays, task
    List {
        /// Also stopped ones
        #[arg(long)]
        all: bool,
    },
    /// Stop the VM and the server and remove the overlays
    Stop {
        #[arg(value_name = "ID")]
        id: i64,
        /// Keep the overlays (the VM's writes)
        #[arg(long)]
        keep_overlays: bool,
    },
    /// Restart a recovery's server if it died, and finish an interrupted migration
    Resume {
        #[arg(value_name = "ID")]
        id: i64,
    },
    /// Cancel a migration and remove its partial images; the VM keeps running as a
    /// transient recovery
    Abort {
        #[arg(value_name = "ID")]
        id: i64,
    },
}

/// An octal file mode without setuid, setgid or sticky bits: `0640`, `600`.
fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if !digits.is_empty() && digits.len() <= 4 && mode <= 0o777 => Ok(mode),
        _ => Err("allowed an octal mode from 0000 to 0777, e.g. 0640".into()),
    }
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this rule [default: every rule]
    #[arg(required_if_eq("boot", "true"))]
    pub rule: Option<String>,
    #[arg(long, value_name = "VM", requires = "rule")]
    pub vm: Option<String>,
    #[arg(long, value_name = "ID", requires = "vm")]
    pub point: Option<String>,
    /// Boot the point (latest by default) from a transient recovery without
    /// network and judge it by its serial console (--expect) or, without
    /// --expect, by its guest agent answering a ping
    #[arg(long)]
    pub boot: bool,
    /// With --boot: a regular expression the serial console must print (judged
    /// by the console even when the VM has a guest agent)
    #[arg(long, value_name = "REGEX", requires = "boot")]
    pub expect: Option<String>,
    /// With --boot: accelerator (auto = KVM when /dev/kvm is usable, else TCG)
    #[arg(long, value_enum, default_value = "auto", requires = "boot")]
    pub accel: AccelArg,
    /// With --boot: seconds to wait for the guest
    #[arg(long, value_name = "S", default_value = "300", requires = "boot")]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Only this rule [default: every rule]
    pub rule: Option<String>,
    /// Also remove secret values (passwords, keys, `-object secret` data) from the
    /// VM command lines stored in manifests written by earlier versions
    #[arg(long)]
    pub redact: bool,
}
