//! NBD server: vmbackup serves read-only disks of its own (a restore point's
//! disks, for recovery) to any NBD client — QEMU's block driver, `qemu-img`,
//! `nbdcopy`, `nbdinfo`.
//!
//! What it speaks: the fixed newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`), structured replies,
//! the `base:allocation` meta context (so clients skip what reads as zeros),
//! and many requests in flight per connection, on several connections at once.
//! Exports are read-only: writes, trims and write-zeroes get `EPERM`.
//!
//! ```text
//! listener ──accept──► client task: options (handshake.rs) ──► transmission.rs
//!                         requests ──spawn──► BlockSource (blocking pool) ──► reply frames
//!                                                                  └──► writer task ──► socket
//! ```
//!
//! What is served is a [`BlockSource`]: a size, the bytes of a range (as data
//! and zero pieces) and its allocation. The server knows nothing of
//! repositories; `crate::recovery` plugs a restore point in.

mod handshake;
mod transmission;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest read served in one request (advertised as the maximum block size).
pub const MAX_READ: u32 = 32 * 1024 * 1024;
/// Requests of one connection being worked on at once; more wait in the socket.
pub const MAX_IN_FLIGHT: usize = 64;
/// Connections served at once; more wait in the listen queue.
pub const MAX_CLIENTS: usize = 64;
/// The id of `base:allocation` on every connection (the only meta context).
const BASE_ALLOCATION_ID: u32 = 1;

/// A piece of the bytes of a range: data, or a run of zeros sent as a hole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Data(Bytes),
    Zero(u32),
}

impl Piece {
    pub fn len(&self) -> u32 {
        match self {
            Piece::Data(b) => b.len() as u32,
            Piece::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one export serves. Called from blocking threads, several at once.
pub trait BlockSource: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The bytes of `[offset, offset + len)` (inside the size) as pieces in order,
    /// adding up to `len`.
    fn read(&self, offset: u64, len: u32) -> Result<Vec<Piece>>;
    /// Allocation of `[offset, offset + len)` as `(length, flags)` runs in order
    /// (flags: [`crate::nbd::STATE_HOLE`] | [`crate::nbd::STATE_ZERO`]); they cover
    /// at least one byte and at most the range.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>>;
    /// A hint that `[offset, offset + len)` will be read soon (`NBD_CMD_CACHE`).
    fn prefetch(&self, _offset: u64, _len: u32) {}
}

/// One named export.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    /// Shown by `nbdinfo` (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    pub source: Arc<dyn BlockSource>,
}

/// Counters of a running server (for logs and tests).
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_served: AtomicU64,
}

/// A running server; dropping it does not stop it: call [`RunningServer::stop`].
pub struct RunningServer {
    path: PathBuf,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<Stats>,
}

impl RunningServer {
    /// The unix socket it listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stop accepting, close every connection, remove the socket.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on a new unix socket at `path` (mode 0600; its directory should be
/// private) and serve `exports` until stopped. Must run inside a tokio runtime.
pub fn serve_unix(path: &Path, exports: Vec<Export>) -> Result<RunningServer> {
    let mut names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        bail!("NBD exports must have distinct names: {names:?}");
    }
    let listener = bind_private(path)?;
    let (shutdown, stopped) = watch::channel(false);
    let stats = Arc::new(Stats::default());
    let task = tokio::spawn(accept_loop(
        listener,
        Arc::new(exports),
        stopped,
        stats.clone(),
    ));
    Ok(RunningServer {
        path: path.to_path_buf(),
        shutdown,
        task,
        stats,
    })
}

/// Bind a unix socket at `path` and make it 0600. A socket file nobody listens
/// on (left by a killed server) is replaced; anything else there is refused.
fn bind_private(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let live = std::os::unix::net::UnixStream::connect(path).is_ok();
        if !meta.file_type().is_socket() || live {
            bail!(
                "{} exists{}; refusing to replace it",
                path.display(),
                if live {
                    " and a server answers on it"
                } else {
                    " and is not a socket"
                }
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on unix socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

async fn accept_loop(
    listener: UnixListener,
    exports: Arc<Vec<Export>>,
    mut stopped: watch::Receiver<bool>,
    stats: Arc<Stats>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let mut clients = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = stopped.changed() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let stream = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("NBD server: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let n = stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let exports = exports.clone();
        let stats = stats.clone();
        clients.spawn(async move {
            if let Err(e) = serve_client(stream, exports, stats).await {
                tracing::debug!("NBD client {n}: {e:#}");
            }
            drop(permit);
        });
        // Reap finished clients so the set does not grow without bound.
        while clients.try_join_next().is_some() {}
    }
    clients.shutdown().await;
}

async fn serve_client(
    stream: tokio::net::UnixStream,
    exports: Arc<Vec<Export>>,
    stats: Arc<Stats>,
) -> Result<()> {
    let (rd, wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::with_capacity(64 * 1024, rd);
    let mut wr = wr;
    let Some(session) = handshake::negotiate(&mut rd, &mut wr, &exports).await? else {
        return Ok(());
    };
    transmission::serve(rd, wr, session, stats).await
}

/// What the handshake settled for one connection.
pub(crate) struct Session {
    pub export: Export,
    pub structured: bool,
    /// `base:allocation` was selected (its id is [`BASE_ALLOCATION_ID`]).
    pub base_allocation: bool,
}

/// Transmission flags of every export.
fn transmission_flags(structured: bool) -> u16 {
    use crate::nbd::proto::*;
    let mut flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}
