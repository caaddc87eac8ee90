//! The command line, as clap types. Only `cli` sees these; handlers turn them into
//! resolved values before calling the engine. Man pages and shell completions are
//! generated from these definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use clap_complete::ArgValueCandidates;

use super::complete;

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

/// Options every command takes, listed apart in every `--help`.
const GLOBAL: &str = "Global options";

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// State database [default: /var/lib/vmbackup/state.db as root,
    /// $XDG_STATE_HOME/vmbackup/state.db otherwise]
    #[arg(long, global = true, env = "VMBACKUP_STATE", value_name = "PATH", help_heading = GLOBAL, value_hint = clap::ValueHint::FilePath)]
    pub state: Option<PathBuf>,
    /// System configuration file; one given here (or in VMBACKUP_CONFIG) must exist
    /// [default: /etc/vmbackup/system.conf; missing means built-in defaults]
    #[arg(long, global = true, env = "VMBACKUP_CONFIG", value_name = "PATH", help_heading = GLOBAL, value_hint = clap::ValueHint::FilePath)]
    pub config: Option<PathBuf>,
    /// Machine-readable output: a JSON document, or JSON lines for commands that
    /// run tasks (docs/JSON.md)
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,
    /// Tables without their header line (for awk and cut)
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub no_header: bool,
    /// Less output: warnings and errors only (no progress lines)
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = GLOBAL)]
    pub quiet: bool,
    /// More output: -v adds debug detail (QMP traffic, NBD negotiation, extents;
    /// secrets redacted) and task log lines, -vv everything
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = GLOBAL)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    // R2, R36
    /// Register and inspect virtualization platforms
    #[command(subcommand)]
    Platform(PlatformCmd),
    // R4
    /// Register and inspect backup targets
    #[command(subcommand)]
    Target(TargetCmd),
    /// Client-side encryption keys: generate a key file, manage key slots
    #[command(subcommand)]
    Key(KeyCmd),
    // R1-R37
    /// Define, change, start, stop and remove backup rules
    #[command(subcommand)]
    Rule(RuleCmd),
    // R38-R42
    /// Show the effective system configuration
    #[command(subcommand)]
    Config(ConfigCmd),
    // R32, R38
    /// Back up a rule's VMs now, in this process, within the slot limits
    RunNow(RunNowArgs),
    /// Run rules unattended in the foreground: wake at each due run (for systemd)
    Daemon,
    /// Run whatever is due now (and missed slots, once), wait, exit (for cron/timers)
    RunDue,
    // R41
    /// List or cancel tasks
    #[command(subcommand)]
    Task(TaskCmd),
    // R32
    /// Show the log lines of a rule's tasks
    Logs(LogsArgs),
    /// List the restore points of a rule's VMs (damaged and orphaned ones too)
    Points(PointsArgs),
    // R15-R21
    /// Apply retention now: remove points outside the rule's retention
    #[command(after_long_help = PRUNE_HELP)]
    Prune(PruneArgs),
    /// Remove chosen points of a VM (refused while a restore reads them)
    Forget(ForgetArgs),
    /// Free the space of removed points: delete the objects no point refers to
    #[command(after_long_help = GC_HELP)]
    Gc(GcArgs),
    /// Restore a point to image files, as a new VM, in place, or a whole rule's VMs
    #[command(after_long_help = RESTORE_HELP)]
    Restore(RestoreArgs),
    /// Copy a rule's points to another target (an offsite copy): only the points
    /// and objects it lacks, each checked before it is sent; resumes after an
    /// interruption
    Copy(CopyArgs),
    /// Run a VM straight from a restore point (transient), move it to production
    /// storage while it runs (instant), list, stop, resume or abort recoveries
    Recover(RecoverArgs),
    /// The NBD server process of a recovery (started by 'recover', not by hand)
    #[command(hide = true)]
    RecoverServe {
        /// The recovery to serve
        #[arg(value_name = "ID")]
        id: i64,
    },
    /// Re-read and re-hash backup data; report missing or corrupt chunks; with
    /// --boot, boot a point and judge it
    Verify(VerifyArgs),
    // R44
    /// Remove leftovers of interrupted runs on platforms and targets
    Cleanup(CleanupArgs),
    /// Statistics of a rule's backups: successes and failures per day and month,
    /// bytes, points, last success, failed tasks not yet viewed
    Stats(StatsArgs),
    /// Test the notifications configured in system.conf (webhook, command)
    #[command(subcommand)]
    Notify(NotifyCmd),
    /// Print a shell completion script (it completes names from the state too)
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum PlatformCmd {
    /// Register a platform and read its VM list
    Add {
        /// Name for the platform (1-64 of A-Z a-z 0-9 . _ -)
        name: String,
        /// Platform type
        #[arg(long = "type", value_enum)]
        kind: PlatformKind,
        /// qemu: directory holding one QMP unix socket per VM (*.qmp or *.sock)
        #[arg(long, value_name = "DIR", value_hint = clap::ValueHint::DirPath)]
        qmp_dir: Option<PathBuf>,
        /// libvirt: connection URI (qemu:///system, qemu+ssh://host/system, qemu+tls://host/system)
        #[arg(long, value_name = "URI")]
        uri: Option<String>,
        /// libvirt, remote host: directory with ca-cert.pem, client-cert.pem and
        /// client-key.pem; backups of its running domains are read over NBD with TLS
        /// (the host's qemu.conf backup_tls_x509_cert_dir holds the server side)
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
    },
    /// List registered platforms
    List,
    /// Show one platform with its cached VM list
    Show {
        /// The platform
        #[arg(add = ArgValueCandidates::new(complete::platforms))]
        name: String,
    },
    // R36
    /// Re-read the VM list of a platform
    Refresh {
        /// The platform
        #[arg(add = ArgValueCandidates::new(complete::platforms))]
        name: String,
    },
    /// Remove a platform (refused while a rule uses it)
    Remove {
        /// The platform
        #[arg(add = ArgValueCandidates::new(complete::platforms))]
        name: String,
    },
    // R35
    /// List a platform's VMs with disks, CBT support and protecting rule
    Vms {
        /// The platform
        #[arg(add = ArgValueCandidates::new(complete::platforms))]
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
    /// Register a target: a directory, or an S3 bucket, under which backup
    /// repositories live; writes the target marker into it (or adopts the one there)
    Add(Box<TargetAddArgs>),
    /// Write the target marker into a target registered without one (or adopt
    /// the marker found there) once it is mounted; backups refuse an unmarked target
    Mark {
        /// The registered target
        #[arg(add = ArgValueCandidates::new(complete::targets))]
        name: String,
    },
    /// List registered targets
    List,
    /// Show one target
    Show {
        /// The target
        #[arg(add = ArgValueCandidates::new(complete::targets))]
        name: String,
    },
    /// Remove a target (refused while a rule uses it; data stays on disk)
    Remove {
        /// The target
        #[arg(add = ArgValueCandidates::new(complete::targets))]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct TargetAddArgs {
    /// Name for the target (1-64 of A-Z a-z 0-9 . _ -)
    pub name: String,
    /// An existing directory (a mounted backup disk, NFS share, ...)
    #[arg(
        long,
        value_name = "DIR",
        value_hint = clap::ValueHint::DirPath,
        required_unless_present = "s3",
        conflicts_with = "s3"
    )]
    pub path: Option<PathBuf>,
    /// S3-compatible object store endpoint, https://HOST[:PORT] (plain http only
    /// to loopback, or with --allow-http)
    #[arg(long, value_name = "URL", requires = "bucket")]
    pub s3: Option<String>,
    /// Bucket (it must exist)
    #[arg(long, value_name = "BUCKET", requires = "s3")]
    pub bucket: Option<String>,
    /// Key prefix inside the bucket [default: none]
    #[arg(long, value_name = "PREFIX", requires = "s3")]
    pub prefix: Option<String>,
    /// Region to sign requests for
    #[arg(
        long,
        value_name = "REGION",
        requires = "s3",
        default_value = "us-east-1"
    )]
    pub region: String,
    /// AWS shared-credentials file (read by every process that opens the
    /// target; only its path is stored)
    #[arg(
        long,
        value_name = "FILE",
        requires = "s3",
        conflicts_with = "credentials"
    )]
    pub credentials_file: Option<PathBuf>,
    /// Profile in the credentials file
    #[arg(
        long,
        value_name = "NAME",
        requires = "credentials_file",
        default_value = "default"
    )]
    pub profile: String,
    /// Take credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of each process
    #[arg(long, value_enum, value_name = "SOURCE", requires = "s3")]
    pub credentials: Option<CredentialSource>,
    /// PEM file of CA certificates to trust for the endpoint
    #[arg(long, value_name = "FILE", requires = "s3")]
    pub ca_file: Option<PathBuf>,
    /// Allow plain http to a host that is not loopback (data and signatures in clear)
    #[arg(long, requires = "s3")]
    pub allow_http: bool,
    /// Encrypt every repository created on this target (client-side, AES-256-GCM,
    /// keyed chunk names); needs --key-file or --passphrase-file. A LOST KEY MEANS
    /// LOST BACKUPS
    #[arg(long)]
    pub encrypt: bool,
    /// Key file (64 hex digits, 'vmbackup key generate'); only its path is stored
    #[arg(
        long,
        value_name = "FILE",
        requires = "encrypt",
        conflicts_with = "passphrase_file"
    )]
    pub key_file: Option<PathBuf>,
    /// File holding a passphrase (first line), stretched with Argon2id
    #[arg(long, value_name = "FILE", requires = "encrypt")]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Write a new key file: 32 random bytes as 64 hex digits, mode 0600 (never
    /// over an existing file). Keep a copy somewhere safe: a lost key means lost backups
    Generate {
        /// Where to write it (must not exist)
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// List the key slots of the encrypted repositories of a target's rules
    List {
        /// The target
        target: String,
    },
    /// Add a key slot for another key file or passphrase to every encrypted
    /// repository of a target's rules (opened with the target's key)
    Add {
        /// The target (registered with --encrypt)
        target: String,
        /// The new key file ('vmbackup key generate')
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "passphrase_file",
            conflicts_with = "passphrase_file"
        )]
        key_file: Option<PathBuf>,
        /// A file holding the new passphrase (first line), stretched with Argon2id
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Remove a key slot from every repository of a target's rules (never the
    /// last slot, nor the slot the target's registered key opens)
    Remove {
        /// The target
        target: String,
        /// Slot id, as 'vmbackup key list' shows it
        #[arg(value_name = "SLOT")]
        slot: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CredentialSource {
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)
    Environment,
}

#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Create a backup rule
    Add(RuleAddArgs),
    // R34
    /// Change a rule's schedules, retention, bandwidth windows, webhook and copy
    Edit(RuleEditArgs),
    // R34
    /// Add a VM to a rule; it inherits the rule's settings
    AddVm {
        /// The rule
        #[arg(add = ArgValueCandidates::new(complete::rules))]
        name: String,
        /// VM(s) from the rule's platform; repeat or comma-separate
        #[arg(long, required = true, value_delimiter = ',', value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
        vm: Vec<String>,
    },
    /// Start a rule, or one of its VMs
    Start {
        /// The rule
        #[arg(add = ArgValueCandidates::new(complete::rules))]
        name: String,
        /// Only this VM of the rule
        #[arg(long, value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
        vm: Option<String>,
    },
    /// Stop a rule, or one of its VMs (no new runs start)
    Stop {
        /// The rule
        #[arg(add = ArgValueCandidates::new(complete::rules))]
        name: String,
        /// Only this VM of the rule
        #[arg(long, value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
        vm: Option<String>,
    },
    // R37, R9
    /// Remove a rule, or one VM from it (refused while any of its tasks runs);
    /// removes vmbackup's bitmaps or checkpoints from its VMs; deletes its backup data
    /// with --delete-data or the rule's delete-data setting
    Remove {
        /// The rule
        #[arg(add = ArgValueCandidates::new(complete::rules))]
        name: String,
        /// Only this VM, not the rule
        #[arg(long, value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
        vm: Option<String>,
        /// Delete the backup data too: the VMs' points, and the repository
        /// itself when no other rule uses it (then garbage collection frees the rest)
        #[arg(long, conflicts_with = "keep_data")]
        delete_data: bool,
        /// Keep the backup data although the rule was added with --delete-data
        #[arg(long)]
        keep_data: bool,
    },
    /// List rules
    List,
    /// Show a rule: settings, compiled schedules, next runs, per-VM state
    Show {
        /// The rule
        #[arg(add = ArgValueCandidates::new(complete::rules))]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct RuleAddArgs {
    // R1
    /// Name for the new rule (1-64 of A-Z a-z 0-9 . _ -)
    pub name: String,
    // R2
    /// Registered platform the VMs live on
    #[arg(long, add = ArgValueCandidates::new(complete::platforms))]
    pub platform: String,
    // R3
    /// VM(s) from the platform's VM list; repeat or comma-separate
    #[arg(long, required = true, value_delimiter = ',', value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
    pub vm: Vec<String>,
    // R4
    /// Registered target
    #[arg(long, add = ArgValueCandidates::new(complete::targets))]
    pub target: String,
    // R5
    /// Sub-directory of the target for this rule's repository [default: the rule name]
    #[arg(long, value_name = "SUBDIR")]
    pub path: Option<String>,
    // R6
    /// Do not choose quick backup (CBT) automatically; use --cbt
    #[arg(long, requires = "cbt")]
    pub no_auto_cbt: bool,
    // R7
    /// Quick backup (CBT) on or off, with --no-auto-cbt
    #[arg(long, value_enum, requires = "no_auto_cbt")]
    pub cbt: Option<OnOff>,
    // R8
    /// Read disk images directly when reachable from this host
    #[arg(long)]
    pub lan_free: bool,
    // R9
    /// Delete the rule's backup data when the rule is removed
    #[arg(long)]
    pub delete_data: bool,
    // R10
    /// Freeze guest file systems through the guest agent while the snapshot is
    /// taken: "require" (the default when given bare) fails a backup whose guest agent
    /// does not answer, "try" then takes a crash-consistent one with a warning
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true,
          default_missing_value = "require", value_name = "MODE")]
    pub quiesce: Option<QuiesceArg>,
    /// This rule's webhook instead of system.conf's notify_url, or "none"
    #[arg(long, value_name = "URL")]
    pub notify_url: Option<String>,
    /// Accept backing up through an NBD server the VM's QEMU already runs on plain
    /// TCP (no TLS): anyone reaching that port can read the disk during the backup.
    /// Without it such a backup is refused
    #[arg(long)]
    pub allow_plain_tcp_export: bool,
    /// After each successful backup, copy the new point to this target (a copy
    /// task of its own, taking a slot), then prune the copy with --copy-retention;
    /// "none": no copy
    #[arg(long, value_name = "TARGET", add = ArgValueCandidates::new(complete::targets))]
    pub copy_to: Option<String>,
    /// Periods of copied points the copy keeps, as --retention counts them
    /// (0..=64), or "all" (the default)
    #[arg(long, value_name = "N|all", value_parser = parse_retention, requires = "copy_to")]
    pub copy_retention: Option<RetentionArg>,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    // R11-R13
    /// One-time run at this local time, "YYYY-MM-DD HH:MM"
    #[arg(long, value_name = "TIME", conflicts_with_all = ["schedule", "retention"])]
    pub once: Option<String>,
    // R14, R22-R25
    /// Periodic run: "<full|inc|diff> <daily|weekly|monthly|quarterly> [on DAYS] at HH:MM[,HH:MM...]";
    /// at most two, one of them a full, sharing one period
    #[arg(long, value_name = "SPEC")]
    pub schedule: Vec<String>,
    /// Keep the current period's points and those of the N periods before it
    /// (the schedules' period: days, weeks Monday to Sunday, months, quarters),
    /// 0..=64; "all" keeps every point (the default). See 'vmbackup prune --help'
    #[arg(long, value_name = "N|all", value_parser = parse_retention)]
    pub retention: Option<RetentionArg>,
    // R29
    /// Bandwidth window: "DAYS HH:MM-HH:MM RATE" with RATE like 20MiB/s, or "pause"
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
    /// The rule
    #[arg(add = ArgValueCandidates::new(complete::rules))]
    pub name: String,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Remove every bandwidth window
    #[arg(long, conflicts_with = "bandwidth")]
    pub clear_bandwidth: bool,
    /// This rule's webhook: a URL, "none" (no webhook for this rule) or
    /// "default" (system.conf's notify_url)
    #[arg(long, value_name = "URL")]
    pub notify_url: Option<String>,
    /// After each successful backup, copy the new point to this target (a copy
    /// task of its own, taking a slot), then prune the copy with --copy-retention;
    /// "none": stop copying (the copy made so far stays)
    #[arg(long, value_name = "TARGET", add = ArgValueCandidates::new(complete::targets))]
    pub copy_to: Option<String>,
    /// Periods of copied points the copy keeps, as --retention counts them
    /// (0..=64), or "all"
    #[arg(long, value_name = "N|all", value_parser = parse_retention)]
    pub copy_retention: Option<RetentionArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuiesceArg {
    /// A backup whose guest agent does not answer fails
    Require,
    /// Without an answering guest agent, a crash-consistent backup with a warning
    Try,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Quick backup (changed-block tracking) on
    On,
    /// Every backup reads every allocated block
    Off,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print each setting, its value and where it came from
    Show,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LevelArg {
    /// Every allocated block
    Full,
    /// What changed since the newest point
    Inc,
    /// What changed since the newest full
    Diff,
}

#[derive(Debug, Args)]
pub struct RunNowArgs {
    /// The rule
    #[arg(add = ArgValueCandidates::new(complete::rules))]
    pub rule: String,
    /// Only this VM of the rule [default: every VM]
    #[arg(long, value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
    pub vm: Option<String>,
    // R26, R27
    /// Backup level; inc/diff run as full when no full exists or CBT is unavailable
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
        /// The task's id (as 'vmbackup task list' shows it)
        #[arg(value_name = "ID", add = ArgValueCandidates::new(complete::tasks))]
        id: i64,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The rule
    #[arg(add = ArgValueCandidates::new(complete::rules))]
    pub rule: String,
    /// Only this VM's tasks
    #[arg(long, value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
    pub vm: Option<String>,
    /// Only this task (of this rule)
    #[arg(long, value_name = "ID", add = ArgValueCandidates::new(complete::tasks))]
    pub task: Option<i64>,
    /// Only lines written since this time: RFC 3339 (2026-12-03T08:00:00Z) or a
    /// duration ago (30m, 2h, 1d)
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Only the newest N lines (then, with --follow, new ones)
    #[arg(short = 'n', long = "lines", value_name = "N")]
    pub lines: Option<u32>,
    /// Keep printing new lines as they are written
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct PointsArgs {
    /// The rule
    #[arg(required_unless_present = "target", add = ArgValueCandidates::new(complete::rules))]
    pub rule: Option<String>,
    /// Only this VM [default: every VM of the rule, and orphaned VM keys in its
    /// repository]; with --target, PLATFORM/VM
    #[arg(long, value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
    pub vm: Option<String>,
    /// List the rule's copy on this target ('vmbackup copy') instead of its own
    #[arg(long, value_name = "TARGET")]
    pub from: Option<String>,
    /// With no rule in the state (a new host): list VM PLATFORM/VM's points in
    /// the repository of this target that holds them, found from the target's layout
    #[arg(long, value_name = "TARGET", conflicts_with_all = ["rule", "from"], requires = "vm",
          add = ArgValueCandidates::new(complete::targets))]
    pub target: Option<String>,
    /// With --target: the repository's path on the target, when several hold the VM
    #[arg(long, value_name = "SUBDIR", requires = "target")]
    pub path: Option<String>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Only this rule [default: every rule]
    #[arg(add = ArgValueCandidates::new(complete::rules))]
    pub rule: Option<String>,
    /// Only this VM of the rule
    #[arg(long, value_name = "VM", requires = "rule", add = ArgValueCandidates::new(complete::vms))]
    pub vm: Option<String>,
    /// Show what would be removed, and why, without removing anything
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The rule
    #[arg(add = ArgValueCandidates::new(complete::rules))]
    pub rule: String,
    /// The VM (or an orphaned VM key, `<platform>/<vm>`, as 'vmbackup points' lists it)
    #[arg(long, value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
    pub vm: String,
    /// Point id(s) to remove; repeat or comma-separate
    #[arg(long, required = true, value_delimiter = ',', value_name = "ID", add = ArgValueCandidates::new(complete::points))]
    pub point: Vec<String>,
    /// Show what would be removed without removing anything
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only this rule's repository [default: the repositories of every rule]
    #[arg(conflicts_with = "target", add = ArgValueCandidates::new(complete::rules))]
    pub rule: Option<String>,
    /// Only the repositories of the rules on this target
    #[arg(long, value_name = "NAME", add = ArgValueCandidates::new(complete::targets))]
    pub target: Option<String>,
    /// Count what would be deleted without deleting anything (backups may run
    /// meanwhile: their new objects count as garbage until they commit)
    #[arg(long)]
    pub dry_run: bool,
}

/// The man page text of `restore`.
const RESTORE_HELP: &str = "\
HOW IMAGES ARE WRITTEN

Every chunk is checked against its digest as it is read; a missing or corrupt one fails the restore, naming the disk and the slot. Images are made in a private staging directory inside the destination and moved out only when complete. Raw images are sparse: zero slots and all-zero 4 KiB blocks are holes. They are written with direct I/O (O_DIRECT) where the destination's file system allows it, so a large restore does not fill the page cache and push out the running VMs' cached data; where it does not, through the page cache. Each image is fsynced once, at the end. Backups write their chunk objects to a directory target the same way.";

/// The man page text of `gc`.
const GC_HELP: &str = "\
HOW IT WORKS

Garbage collection reads every index of every point of a repository and marks each chunk and delta they name (and each delta's base chunk), then deletes every other object, and staging files killed writers left more than an hour ago. It holds the repository's exclusive lock: backups that start meanwhile wait (pending) until it is done. A repository whose lock is busy is deferred, never waited for (exit 4). It refuses to sweep while any point's manifest or index cannot be read: 'vmbackup points' lists such damaged points, 'vmbackup forget' removes them. Quarantined objects are never deleted.

The daemon and run-due run it automatically at most once a day per repository, after pruning, when the lock is free.";

/// The man page text of `prune`: retention with the seed's examples.
const PRUNE_HELP: &str = "\
HOW RETENTION WORKS

A point belongs to the local-time period holding its start. Retention N keeps every point of the current period and of the N periods before it, in the unit of the rule's schedules: days; weeks, Monday to Sunday; months; quarters. Retention 0 days keeps today's points only; 1 day keeps today's and yesterday's; 0 weeks keeps this week's, from Monday on.

Never removed: the VM's newest point; its newest full (the full that today's incremental depends on); a point a running restore reads. A rule without retention (--retention all) and a one-time rule keep every point.

Every point has its own complete index, so every kept point restores on its own. Example, retention 0 days with a full and daily incrementals: after day 2's incremental, day 1's incrementals are removed and the full stays; day 1's changes live on in day 2's point, which restores byte-exact although the point it was taken against is gone.

The daemon and run-due prune a VM after its last scheduled backup of the day completed, and not while its newest backup failed or was interrupted. This command prunes now. The data of removed points is freed by garbage collection ('vmbackup gc', also run once a day automatically).";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    /// A raw image, sparse
    Raw,
    /// A qcow2 image (converted with qemu-img)
    Qcow2,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The rule
    #[arg(required_unless_present = "target", add = ArgValueCandidates::new(complete::rules))]
    pub rule: Option<String>,
    /// The VM to restore (or --all); with --target, PLATFORM/VM
    #[arg(long, value_name = "VM", required_unless_present = "all", add = ArgValueCandidates::new(complete::vms))]
    pub vm: Option<String>,
    /// Point id, or "latest"
    #[arg(long, default_value = "latest", value_name = "ID", add = ArgValueCandidates::new(complete::points))]
    pub point: String,
    /// Directory to write one image per disk into (with --all: DIR/<VM>/)
    #[arg(long, value_name = "DIR", required_unless_present = "in_place", value_hint = clap::ValueHint::DirPath)]
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
    /// Read the rule's copy on this target ('vmbackup copy') instead of its own
    #[arg(long, value_name = "TARGET", conflicts_with = "in_place")]
    pub from: Option<String>,
    /// With no rule in the state (a new host): restore VM PLATFORM/VM from the
    /// repository of this target that holds its points, found from the target's layout
    #[arg(long, value_name = "TARGET", conflicts_with_all = ["rule", "from", "all", "in_place", "as_vm"],
          add = ArgValueCandidates::new(complete::targets))]
    pub target: Option<String>,
    /// With --target: the repository's path on the target, when several hold the VM
    #[arg(long, value_name = "SUBDIR", requires = "target")]
    pub path: Option<String>,
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
    #[arg(required = true, add = ArgValueCandidates::new(complete::rules))]
    pub rule: Option<String>,
    /// The VM (or --all)
    #[arg(long, value_name = "VM", required_unless_present = "all", add = ArgValueCandidates::new(complete::vms))]
    pub vm: Option<String>,
    /// Point id, or "latest"
    #[arg(long, default_value = "latest", value_name = "ID", add = ArgValueCandidates::new(complete::points))]
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
    #[arg(long, value_name = "DIR", value_hint = clap::ValueHint::DirPath)]
    pub overlay_dir: Option<PathBuf>,
    /// Instant recovery: the directory of the new images
    #[arg(long, value_name = "DIR", value_hint = clap::ValueHint::DirPath)]
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
        /// The recovery (see 'vmbackup recover list')
        #[arg(value_name = "ID")]
        id: i64,
        /// Keep the overlays (the VM's writes)
        #[arg(long)]
        keep_overlays: bool,
    },
    /// Restart a recovery's server if it died, and finish an interrupted migration
    Resume {
        /// The recovery (see 'vmbackup recover list')
        #[arg(value_name = "ID")]
        id: i64,
    },
    /// Cancel a migration and remove its partial images; the VM keeps running as a
    /// transient recovery
    Abort {
        /// The recovery (see 'vmbackup recover list')
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
pub struct CopyArgs {
    /// The rule whose repository is copied
    pub rule: String,
    /// Only this VM [default: every VM with points in the rule's repository]
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Only this point and the points it is based on ("latest": the newest)
    #[arg(long, value_name = "ID", requires = "vm")]
    pub point: Option<String>,
    /// The target that receives the copy (the rule's path there)
    #[arg(long, value_name = "TARGET")]
    pub to: String,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this rule [default: every rule]
    #[arg(required_if_eq("boot", "true"), add = ArgValueCandidates::new(complete::rules))]
    pub rule: Option<String>,
    /// Only this VM of the rule
    #[arg(long, value_name = "VM", requires = "rule", add = ArgValueCandidates::new(complete::vms))]
    pub vm: Option<String>,
    /// Only this point of the VM
    #[arg(long, value_name = "ID", requires = "vm", add = ArgValueCandidates::new(complete::points))]
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
    #[arg(add = ArgValueCandidates::new(complete::rules))]
    pub rule: Option<String>,
    /// Also remove secret values (passwords, keys, `-object secret` data) from the
    /// VM command lines stored in manifests written by earlier versions
    #[arg(long)]
    pub redact: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeriodArg {
    /// The last 7 days, per day
    Week,
    /// The last 30 days, per day
    Month,
    /// The last 12 months, per month
    Year,
    /// All three charts
    All,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The rule
    #[arg(add = ArgValueCandidates::new(complete::rules))]
    pub rule: String,
    /// Only this VM of the rule
    #[arg(long, value_name = "VM", add = ArgValueCandidates::new(complete::vms))]
    pub vm: Option<String>,
    /// Which charts to show (and, with --tasks, which tasks to list)
    #[arg(long, value_enum, default_value = "all")]
    pub period: PeriodArg,
    /// Do not mark the failures shown as viewed
    #[arg(long)]
    pub peek: bool,
    /// Also list the tasks, with their errors
    #[arg(long)]
    pub tasks: bool,
    /// With --tasks: only failed and interrupted tasks
    #[arg(long, requires = "tasks")]
    pub failed: bool,
}

#[derive(Debug, Subcommand)]
pub enum NotifyCmd {
    /// Send a sample notification (event "test") now, on every configured channel
    Test {
        /// Use this rule's webhook setting (rule edit --notify-url)
        #[arg(long, add = ArgValueCandidates::new(complete::rules))]
        rule: Option<String>,
    },
}
