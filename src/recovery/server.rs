//! The background server process of a recovery (`vmbackup recover-serve ID`,
//! started by `recover`, never by hand): it serves the recovery's point on its
//! unix socket until `recover stop` (SIGTERM) or `task cancel`. It runs in its
//! own process group, so the terminal's Ctrl-C does not reach it, and ignores
//! SIGHUP; it owns the recovery task (its pid is in the task row), so a dead
//! server shows as an interrupted task, and `recover resume` restarts it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::export::serve_point;
use crate::repo::vm_key;
use crate::restore::{PointReader, DEFAULT_CACHE_BYTES};
use crate::state::State;
use crate::task::{LogLevel, TaskState};

/// The line the server prints on stdout once it listens.
const READY: &str = "ready";
/// How long `recover` waits for the server to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Start the server of recovery `id`; returns its pid once it listens.
pub fn spawn(state_path: &Path, id: i64, dir: &Path) -> Result<u32> {
    let exe = std::env::current_exe().context("cannot find the vmbackup executable")?;
    let log_path = dir.join("server.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut child = Command::new(exe)
        .arg("--state")
        .arg(state_path)
        .args(["recover-serve", &id.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the recovery's NBD server")?;
    let stdout = child.stdout.take().context("no pipe from the server")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let mut failed = |why: String| {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        anyhow!(
            "the recovery's NBD server {why}: {}",
            log.trim().lines().last().unwrap_or("no message")
        )
    };
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) if line.trim() == READY => Ok(child.id()),
        Ok(_) => Err(failed("did not start".into())),
        Err(_) => Err(failed(format!(
            "was not ready within {} s",
            READY_TIMEOUT.as_secs()
        ))),
    }
}

/// The server's main (the hidden `recover-serve` subcommand).
pub fn run(state_path: &Path, id: i64) -> Result<()> {
    let mut state = State::open(state_path)?;
    let row = state.require_recovery(id)?;
    let rule = state.require_rule(&row.rule)?;
    let repo = crate::lifecycle::rule_repository_with_points(&state, &rule)?;
    let key = vm_key(&rule.settings.platform, &row.vm);
    let manifest = repo.load_manifest(&key, &row.point)?;
    let reader = Arc::new(PointReader::open(
        Arc::new(repo),
        &key,
        &manifest,
        DEFAULT_CACHE_BYTES,
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let task = row.task;
    let result = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let server = serve_point(reader.clone(), &row.vm, Path::new(&row.socket))?;
        let mut out = std::io::stdout();
        writeln!(out, "{READY}")?;
        out.flush()?;
        tracing::info!(
            "recovery {id}: serving point {} on {}",
            row.point,
            row.socket
        );
        let me = Some(i64::from(std::process::id()));
        // The task is handed to this process once `recover` has finished starting.
        let mut owned = false;
        let why = loop {
            tokio::select! {
                _ = term.recv() => break Ending::Signal,
                _ = int.recv() => break Ending::Signal,
                _ = hup.recv() => continue,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match state.task(task) {
                Ok(Some(t)) if t.pid == me && t.state.is_active() => owned = true,
                Ok(Some(t)) if owned || !t.state.is_active() => break Ending::TakenOver,
                Ok(Some(_)) => {}
                Ok(None) => break Ending::TakenOver,
                Err(e) => tracing::warn!("cannot read task {task}: {e:#}"),
            }
            if cancel_requested(&state, task) {
                break Ending::Cancelled;
            }
        };
        let stats = server.stats();
        let served = stats
            .bytes_served
            .load(std::sync::atomic::Ordering::Relaxed);
        let connections = stats.connections.load(std::sync::atomic::Ordering::Relaxed);
        server.stop().await;
        Ok::<_, anyhow::Error>((why, served, connections, owned))
    });
    let (why, served, connections, owned) = result?;
    if !owned {
        // Stopped while `recover` was still starting: it records the outcome.
        return Ok(());
    }
    let line = format!(
        "NBD server stopped after {connections} connection(s), {} served",
        crate::units::format_size(served)
    );
    match why {
        Ending::TakenOver => {
            let _ = state.log(task, LogLevel::Info, &line);
        }
        Ending::Signal | Ending::Cancelled => {
            let msg = if why == Ending::Cancelled {
                "interrupted: cancelled; the recovered VM (if any) keeps running without its backing \
                 until 'vmbackup recover resume' or 'recover stop'"
            } else {
                "interrupted: the NBD server was stopped by a signal; 'vmbackup recover resume' restarts it"
            };
            let _ = state.log(task, LogLevel::Warn, &line);
            state.end_task(task, TaskState::Interrupted, None, Some(msg))?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// `recover stop` (or the migration) took the task over and ends it.
    TakenOver,
    Signal,
    Cancelled,
}

fn cancel_requested(state: &State, task: i64) -> bool {
    state
        .conn()
        .query_row(
            "SELECT cancel_requested FROM tasks WHERE id = ?1",
            [task],
            |r| r.get::<_, i64>(0),
        )
        .is_ok_and(|c| c != 0)
}

/// Refuse to run the server by hand for a recovery that is not starting.
pub fn check_startable(state: &State, id: i64) -> Result<()> {
    let row = state.require_recovery(id)?;
    if row.stage == crate::state::recoveries::RecoveryStage::Stopped {
        bail!("recovery {id} is stopped");
    }
    Ok(())
}
