//! The command-line front end: parse, resolve, dispatch, print, map errors to exit codes.
//!
//! `args` holds the clap definitions; one module per command group turns them into
//! resolved values and calls the engine (`state`, `platform`, `backup`, `restore`).
//! The engine never sees clap types. Errors are printed once, here, as one line
//! (`vmbackup: <error>: <cause>`), and mapped to an exit code by
//! [`crate::error::exit_code_of`].

/// `println!` for command output, through [`output::stdout_line`].
macro_rules! out {
    () => {
        $crate::cli::output::stdout_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::stdout_line(format_args!($($arg)*))
    };
}

pub mod args;
mod backup_cmd;
mod cleanup_cmd;
mod complete;
mod config_cmd;
mod copy_cmd;
mod daemon_cmd;
mod diag;
pub mod examples;
mod key_cmd;
mod lifecycle_cmd;
mod logs_cmd;
pub mod manual;
mod notify_cmd;
pub mod output;
mod platform_cmd;
mod points_cmd;
mod process;
mod progress_view;
mod recover_cmd;
mod restore_cmd;
mod rule_cmd;
mod stats_cmd;
mod target_cmd;
mod task_cmd;
mod views;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches};

use crate::config::SystemConfig;
use crate::error::{exit_code_of, ExitCode};
use crate::state::State;
use args::{Cli, Command};

/// The clap command tree with every command's examples (for parsing, man
/// pages and completions).
pub fn command() -> clap::Command {
    examples::add(Cli::command(), "vmbackup")
}

/// Longest state directory: `<dir>/run/<16>/nbd.sock` must fit the 107 bytes of
/// a unix socket path (`backup::scratch_dir`, `platform::qemu` names).
const MAX_STATE_DIR: usize = 107 - "/run/0123456789abcdef/nbd.sock".len();

/// Resolved global settings every handler gets.
pub struct Ctx {
    pub state_path: PathBuf,
    pub config_path: PathBuf,
    /// The config path was given explicitly (flag or env): it must exist.
    pub config_explicit: bool,
    pub json: bool,
    pub quiet: bool,
    pub verbose: u8,
}

impl Ctx {
    fn resolve(g: &args::GlobalArgs) -> Result<Ctx> {
        let state_path = match &g.state {
            // Absolute: paths below it are handed to QEMU, whose working
            // directory is not ours.
            Some(p) => std::path::absolute(p)
                .map_err(|e| crate::error::invalid("--state", p.display(), e))?,
            None => default_state_path()?,
        };
        let dir_len = state_path.parent().map_or(0, |d| d.as_os_str().len());
        if dir_len > MAX_STATE_DIR {
            return Err(crate::error::invalid(
                "--state",
                state_path.display(),
                format!("the state directory may be at most {MAX_STATE_DIR} bytes long: NBD sockets below it (run/<16 characters>/nbd.sock) must fit a unix socket path (108 bytes)"),
            ));
        }
        let (config_path, config_explicit) = match &g.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from("/etc/vmbackup/system.conf"), false),
        };
        // Every command, whether it reads system.conf or not: a file named on
        // purpose that is not there is a mistake worth hearing about.
        if config_explicit && !config_path.exists() {
            return Err(crate::error::invalid(
                "--config",
                config_path.display(),
                "no such file (a system.conf given with --config or VMBACKUP_CONFIG must exist)",
            ));
        }
        output::set_no_header(g.no_header);
        Ok(Ctx {
            state_path,
            config_path,
            config_explicit,
            json: g.json,
            quiet: g.quiet,
            verbose: g.verbose,
        })
    }

    /// Open the state store.
    pub fn state(&self) -> Result<State> {
        State::open(&self.state_path)
    }

    /// Load and validate system.conf.
    pub fn system_config(&self) -> Result<SystemConfig> {
        SystemConfig::load(&self.config_path, self.config_explicit)
    }

    /// Metrics and notifications as system.conf configures them.
    pub fn monitor(&self) -> Result<crate::monitor::Monitor> {
        crate::monitor::Monitor::new(&self.system_config()?.monitoring, &self.state_path)
    }

    /// Scratch space for fleecing images and our own NBD sockets: `<state dir>/run`,
    /// created private (0700) or checked to be (`private_dir`).
    pub fn run_dir(&self) -> Result<PathBuf> {
        let dir = self
            .state_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("run");
        crate::private_dir::ensure(&dir, "run directory")?;
        Ok(dir)
    }
}

fn default_state_path() -> Result<PathBuf> {
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/vmbackup/state.db"));
    }
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".local/state"),
            None => anyhow::bail!("cannot find a state directory: set --state, VMBACKUP_STATE, XDG_STATE_HOME or HOME"),
        },
    };
    Ok(base.join("vmbackup/state.db"))
}

/// Entry point of the binary.
pub fn main() -> std::process::ExitCode {
    // Shell completion requests (the scripts `completions` prints) end here.
    clap_complete::CompleteEnv::with_factory(command)
        .var(complete::ENV)
        .complete();
    let parsed = command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let msg = one_line(&e);
            eprintln!("vmbackup: {msg}");
            if std::env::args().any(|a| a == "--json") {
                output::print_json(
                    &serde_json::json!({ "error": msg, "exit_code": ExitCode::Usage.code() }),
                );
            }
            return std::process::ExitCode::from(ExitCode::Usage.code());
        }
        Err(e) => {
            // --help, --version
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
    };
    diag::init(cli.global.verbose);
    // -v: the whole command's time, next to the steps of its tasks (fixed costs).
    let watch = crate::task::stopwatch::Stopwatch::start("the command");
    let json = cli.global.json;
    let result = Ctx::resolve(&cli.global).and_then(|ctx| {
        let state_path = ctx.state_path.clone();
        // A state-store error from any query names the file (busy: exit 4).
        dispatch(&ctx, cli.command).map_err(|e| crate::state::db_error(&state_path, e))
    });
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            let code = exit_code_of(&err);
            eprintln!("vmbackup: {err:#}");
            if json {
                output::print_json(&serde_json::json!({
                    "error": format!("{err:#}"),
                    "exit_code": code.code(),
                }));
            }
            code
        }
    };
    watch.total();
    std::process::ExitCode::from(code.code())
}

/// A clap usage error as one line: its first paragraph (which names the
/// argument and, for a bad value, the possible values), clap's tips ("a
/// similar subcommand exists: 'show'"), and which `--help` to read.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let first: Vec<&str> = lines
        .iter()
        .copied()
        .take_while(|l| !l.is_empty())
        .collect();
    let mut msg = first.join(" ").trim_start_matches("error: ").to_string();
    for tip in lines.iter().filter(|l| l.starts_with("tip:")) {
        msg.push_str("; ");
        msg.push_str(tip);
    }
    // `Usage: vmbackup rule show <NAME>` → `vmbackup rule --help` for an
    // unknown subcommand of `rule`, `vmbackup rule show --help` otherwise.
    let usage = lines
        .iter()
        .find_map(|l| l.strip_prefix("Usage: "))
        .unwrap_or("vmbackup");
    let path: Vec<&str> = usage
        .split_whitespace()
        .take_while(|w| !w.starts_with(['<', '[', '-']))
        .collect();
    msg.push_str(&format!(" (see '{} --help')", path.join(" ")));
    msg
}

fn dispatch(ctx: &Ctx, cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Platform(c) => platform_cmd::run(ctx, c),
        Command::Target(c) => target_cmd::run(ctx, c),
        Command::Key(c) => key_cmd::run(ctx, c),
        Command::Rule(c) => rule_cmd::run(ctx, c),
        Command::Config(c) => config_cmd::run(ctx, c),
        Command::Completions { shell } => {
            out!("{}", complete::script(shell)?.trim_end());
            Ok(ExitCode::Ok)
        }
        Command::RunNow(a) => backup_cmd::run_now(ctx, a),
        Command::Daemon => daemon_cmd::daemon(ctx),
        Command::RunDue => daemon_cmd::run_due(ctx),
        Command::Task(c) => task_cmd::run(ctx, c),
        Command::Logs(a) => logs_cmd::logs(ctx, a),
        Command::Points(a) => points_cmd::points(ctx, a),
        Command::Restore(a) => restore_cmd::restore(ctx, a),
        Command::Copy(a) => copy_cmd::run(ctx, a),
        Command::Recover(a) => recover_cmd::recover(ctx, a),
        Command::RecoverServe { id } => recover_cmd::serve(ctx, id),
        Command::Verify(a) => points_cmd::verify(ctx, a),
        Command::Prune(a) => lifecycle_cmd::prune(ctx, a),
        Command::Forget(a) => lifecycle_cmd::forget(ctx, a),
        Command::Gc(a) => lifecycle_cmd::gc(ctx, a),
        Command::Cleanup(a) => cleanup_cmd::cleanup(ctx, a),
        Command::Stats(a) => stats_cmd::stats(ctx, a),
        Command::Notify(c) => notify_cmd::run(ctx, c),
    }
}
