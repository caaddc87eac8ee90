//! One disk of a backup: extents → pipelined NBD reads → chunks → `DiskIndex`.
//!
//! The disk is cut into slots of `chunk_size` bytes. A full reads every allocated
//! extent (`base:allocation` without the zero flag) and stores each slot as a
//! chunk. An inc/diff starts from the base point's index and reads only dirty
//! extents that hold data (dirty extents that now read as zeros are zero
//! patches, not reads). A slot changed only in part is stored as a delta: its
//! changed bytes against the base point's chunk, which is not even read, so both
//! transfer and storage follow the changed bytes (R7; repo/delta.rs). Slots no
//! read touches keep the base's entry.
//!
//! Healing (docs/FORMAT.md, "Quarantine"): slots whose base entry names a
//! quarantined object are read again whole, and a slot whose base object turns
//! out missing or corrupt while it is being stored (corrupt ones are
//! quarantined by the read) is read again whole from the VM too, never stored
//! against a bad base. An inc/diff whose base index cannot be used reads the
//! whole disk, as a full.
//!
//! Concurrency: up to [`task_slots`] slots are in flight per task (shared by
//! the VM's disks), each holding one chunk buffer of the process's pool (shared
//! with its other backups: the memory bound), and each slot's reads are split
//! into pieces issued together, so several NBD requests are always outstanding.
//! Hashing, compression and chunk writes run on blocking threads, at most one
//! per core ([`cpu_count`]) in the whole process: the other slots in flight keep
//! reading meanwhile, and the codec's per-thread buffers stay one set per core
//! however many backups run.
//!
//! Every NBD request waits at most `io_timeout` for its answer; once the task is
//! cancelled, its connection is closed at once (reads in flight fail), so a
//! stuck hypervisor cannot hold a cancelled task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::extents::ExtentSet;
use crate::error::Error;
use crate::nbd::{NbdClient, DIRTY, STATE_ZERO};
use crate::platform::{ChangedBlocks, DiskExport};
use crate::repo::{ChunkError, Delta, DiskIndex, Patch, Repository, Slot};
use crate::task::progress::Progress;

/// What to back up for one disk.
pub struct DiskPlan {
    pub export: DiskExport,
    /// The base point's index for inc/diff; `None` for a full (also when the
    /// snapshot tracks changes but the base cannot be used: everything is read).
    pub base: Option<DiskIndex>,
    /// Slots of `base` that name quarantined objects: read again whole.
    pub reread: Vec<u64>,
    pub chunk_size: u32,
}

/// Shared by all disks of one backup task.
#[derive(Clone)]
pub struct Pipeline {
    pub repo: Arc<Repository>,
    /// Slots in flight for the whole task: one per core compressing, two more
    /// reading ([`task_slots`]).
    pub permits: Arc<Semaphore>,
    /// Chunk buffers of the whole process, shared with its other backups
    /// (bounds memory: 3 × bk_tsk_thd; see `runner`).
    pub buffers: Arc<Semaphore>,
    pub progress: Arc<dyn Progress>,
    pub cancel: Arc<AtomicBool>,
    /// Bandwidth windows of the rule (R29): every source read waits for tokens.
    pub throttle: Arc<crate::task::throttle::Throttle>,
    /// How long one NBD request may wait for its answer (system.conf).
    pub io_timeout: Duration,
}

/// How often a disk's connection looks at the task's cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// Tests only, like the test clock (`VMBACKUP_TEST_NOW`): an NBD URI that
/// replaces the address and export of every disk of a full backup, so a test can
/// put a server with injected faults (nbdkit's delay and error filters) in front
/// of the data. Read nowhere else.
const TEST_NBD_URI: &str = "VMBACKUP_TEST_NBD_URI";

/// Where to read a disk from: its export, unless a test overrides it (fulls only:
/// a stand-in server has no dirty bitmap).
fn source_of(export: &DiskExport) -> Result<(crate::nbd::NbdAddr, String)> {
    match std::env::var(TEST_NBD_URI) {
        Ok(uri) if export.changes.is_none() => crate::nbd::parse_uri(&uri),
        _ => Ok((export.addr.clone(), export.export.clone())),
    }
}

/// Closes a disk's connection when the task is cancelled; stops with the disk.
struct CancelWatch(tokio::task::JoinHandle<()>);

impl CancelWatch {
    fn start(client: &Arc<NbdClient>, cancel: Arc<AtomicBool>) -> CancelWatch {
        let client = Arc::downgrade(client);
        CancelWatch(tokio::spawn(async move {
            loop {
                if cancel.load(Ordering::SeqCst) {
                    if let Some(c) = client.upgrade() {
                        c.abort("interrupted: the task was cancelled");
                    }
                    return;
                }
                tokio::time::sleep(CANCEL_POLL).await;
            }
        }))
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Cores this process may use (hashing and compression of backups, decoding of
/// restores); 2 when the system does not say.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Slots in flight per backup task: one per core being hashed and compressed,
/// two more being read meanwhile.
pub fn task_slots() -> usize {
    cpu_count() + 2
}

/// Slots being hashed, compressed and stored at once in this process: one per core.
fn cpu_slots() -> &'static Semaphore {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| Semaphore::new(cpu_count()))
}

/// Counters for the manifest and the task's log.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskStats {
    /// Bytes the plan reads: allocated data for a full, changed data for an inc/diff.
    pub to_read: u64,
    /// Changed bytes that now read as zeros (an inc/diff writes them as zero patches).
    pub zeroed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub new_chunks: u64,
}

/// Back up one disk; returns its complete index for the new point. A failure
/// once the task is cancelled is an interruption (exit 130), whatever broke.
pub async fn backup_disk(plan: DiskPlan, pipe: Pipeline) -> Result<(DiskIndex, DiskStats)> {
    let cancel = pipe.cancel.clone();
    match back_up(plan, pipe).await {
        Err(e) if cancel.load(Ordering::SeqCst) && !crate::error::is_interrupted(&e) => {
            Err(anyhow::Error::from(Error::Interrupted).context(format!("{e:#}")))
        }
        other => other,
    }
}

async fn back_up(plan: DiskPlan, pipe: Pipeline) -> Result<(DiskIndex, DiskStats)> {
    let disk = plan.export.disk.clone();
    let name = disk.name.clone();
    let cs = plan.chunk_size as u64;
    let mut contexts = vec!["base:allocation"];
    if let Some(c) = plan.export.changes.as_ref().and_then(|c| c.meta_context()) {
        contexts.push(c);
    }
    let (addr, export) = source_of(&plan.export)?;
    let client = NbdClient::connect_with_timeout(&addr, &export, &contexts, pipe.io_timeout)
        .await
        .with_context(|| format!("disk '{name}': cannot open NBD export '{export}'"))?;
    let client = Arc::new(client);
    let _watch = CancelWatch::start(&client, pipe.cancel.clone());
    let size = client.size();
    if size != disk.size {
        bail!(
            "disk '{name}': export is {size} bytes but the disk is {} bytes",
            disk.size
        );
    }

    let alloc = client
        .extents("base:allocation", 0, size)
        .await
        .with_context(|| format!("disk '{name}': block status"))?;
    let data = ExtentSet::from_extents(&alloc, |f| f & STATE_ZERO == 0);
    let (data_ranges, data_bytes) = (data.ranges().len(), data.total());
    let (index, read, zero) = match (&plan.export.changes, plan.base) {
        (None, _) | (Some(_), None) => (
            DiskIndex::new_zero(size, plan.chunk_size),
            data.clone(),
            ExtentSet::default(),
        ),
        (Some(changes), Some(mut base)) => {
            if base.disk_size != size || base.chunk_size != plan.chunk_size {
                bail!(
                    "disk '{name}': base index geometry differs from the disk (size or chunk size)"
                );
            }
            let dirty = match changes {
                ChangedBlocks::MetaContext(ctx) => {
                    let dirty = client
                        .extents(ctx, 0, size)
                        .await
                        .with_context(|| format!("disk '{name}': dirty bitmap"))?;
                    ExtentSet::from_extents(&dirty, |f| f & DIRTY != 0)
                }
                ChangedBlocks::Extents(list) => ExtentSet::from_ranges(
                    list.iter()
                        .map(|&(off, len)| (off.min(size), off.saturating_add(len).min(size)))
                        .filter(|(a, b)| a < b)
                        .collect(),
                ),
            };
            let mut read = dirty.intersect(&data);
            if !plan.reread.is_empty() {
                let whole: Vec<(u64, u64)> = plan
                    .reread
                    .iter()
                    .map(|&s| (s * cs, ((s + 1) * cs).min(size)))
                    .collect();
                for &s in &plan.reread {
                    base.slots[s as usize] = Slot::Zero;
                }
                let again = ExtentSet::from_ranges(whole).intersect(&data);
                read = ExtentSet::from_ranges(
                    read.ranges()
                        .iter()
                        .chain(again.ranges())
                        .copied()
                        .collect(),
                );
            }
            (base, read, dirty.subtract(&data))
        }
    };
    pipe.progress.disk_total(&name, read.total());

    let touched =
        ExtentSet::from_ranges(read.ranges().iter().chain(zero.ranges()).copied().collect())
            .slots(cs);
    tracing::debug!(
        "disk '{name}': {} bytes; {} extent(s) with data ({} bytes), {} to read in {} extent(s), {} changed to zeros, {} slot(s) of {cs} bytes touched",
        size,
        data_ranges,
        data_bytes,
        read.total(),
        read.ranges().len(),
        zero.total(),
        touched.len()
    );
    // One request per contiguous range of a slot: reads are clipped to their slot,
    // so no request is larger than the chunk size (i2vp_transbuffer, R39), nor than
    // the server's maximum. Slots in flight keep several requests outstanding.
    let piece = client.max_request() as u64;
    let read = Arc::new(read);
    let zero = Arc::new(zero);
    let data = Arc::new(data);
    let mut index = index;
    let mut stats = DiskStats {
        to_read: read.total(),
        zeroed: zero.total(),
        ..DiskStats::default()
    };
    let mut tasks: JoinSet<Result<SlotDone>> = JoinSet::new();

    for slot in touched {
        let permit = pipe
            .permits
            .clone()
            .acquire_owned()
            .await
            .context("permit pool closed")?;
        let buffer = pipe
            .buffers
            .clone()
            .acquire_owned()
            .await
            .context("buffer pool closed")?;
        while let Some(done) = tasks.try_join_next() {
            apply(&mut index, &mut stats, done.context("slot task panicked")??);
        }
        if pipe.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted.into());
        }
        let start = slot * cs;
        let len = cs.min(size - start) as usize;
        let job = SlotJob {
            slot: slot as usize,
            start,
            len,
            base: index.slots[slot as usize],
            piece,
            client: client.clone(),
            read: read.clone(),
            zero: zero.clone(),
            data: data.clone(),
            pipe: pipe.clone(),
            disk: name.clone(),
        };
        tasks.spawn(async move {
            let _permits = (permit, buffer);
            job.run().await
        });
    }
    while let Some(done) = tasks.join_next().await {
        apply(&mut index, &mut stats, done.context("slot task panicked")??);
    }
    if let Ok(client) = Arc::try_unwrap(client) {
        let _ = client.close().await;
    }
    Ok((index, stats))
}

struct SlotDone {
    slot: usize,
    result: Slot,
    bytes_read: u64,
    /// Stored bytes when the chunk was new.
    written: Option<u64>,
}

fn apply(index: &mut DiskIndex, stats: &mut DiskStats, done: SlotDone) {
    index.slots[done.slot] = done.result;
    stats.bytes_read += done.bytes_read;
    if let Some(w) = done.written {
        stats.new_chunks += 1;
        stats.bytes_written += w;
    }
}

struct SlotJob {
    slot: usize,
    start: u64,
    len: usize,
    base: Slot,
    piece: u64,
    client: Arc<NbdClient>,
    read: Arc<ExtentSet>,
    zero: Arc<ExtentSet>,
    /// Every allocated range of the disk (what a whole-slot read reads).
    data: Arc<ExtentSet>,
    pipe: Pipeline,
    disk: String,
}

impl SlotJob {
    async fn run(self) -> Result<SlotDone> {
        let end = self.start + self.len as u64;
        let mut patches = self.fetch(&self.read, end).await?;
        if self.pipe.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted.into());
        }
        let mut bytes_read = patches.iter().map(|p| p.data.len() as u64).sum();
        for (a, b) in self.zero.clip(self.start, end) {
            patches.push(Patch {
                offset: (a - self.start) as u32,
                data: vec![0u8; (b - a) as usize],
            });
        }
        let stored = self.store(self.base, patches).await?;
        let (result, written) = match stored {
            Stored::Slot(slot, written) => (slot, written),
            Stored::BaseUnusable(why) => {
                // Heal: the whole slot from the VM, stored without the bad base.
                self.pipe.progress.log(
                    crate::task::progress::LogLevel::Warn,
                    &format!(
                        "disk '{}' slot {}: {why}; the slot is read again from the VM",
                        self.disk, self.slot
                    ),
                );
                let whole = self.fetch(&self.data, end).await?;
                bytes_read += whole.iter().map(|p| p.data.len() as u64).sum::<u64>();
                match self.store(Slot::Zero, whole).await? {
                    Stored::Slot(slot, written) => (slot, written),
                    Stored::BaseUnusable(why) => {
                        bail!("disk '{}' slot {}: {why}", self.disk, self.slot)
                    }
                }
            }
        };
        Ok(SlotDone {
            slot: self.slot,
            result,
            bytes_read,
            written,
        })
    }

    /// Store the slot's new content (`patches` over `base`) on a blocking thread.
    async fn store(&self, base: Slot, patches: Vec<Patch>) -> Result<Stored> {
        let repo = self.pipe.repo.clone();
        let len = self.len;
        let _core = cpu_slots().acquire().await.context("CPU pool closed")?;
        tokio::task::spawn_blocking(move || store_slot(&repo, base, len, patches))
            .await?
            .with_context(|| format!("disk '{}' slot {}", self.disk, self.slot))
    }

    /// Read this slot's part of `ranges` (dirty, or for a full or a slot read
    /// again, allocated) from the source: one request per contiguous range, all
    /// in flight together.
    async fn fetch(&self, ranges: &ExtentSet, end: u64) -> Result<Vec<Patch>> {
        let mut reads = JoinSet::new();
        for (a, b) in ranges.clip(self.start, end) {
            let mut off = a;
            while off < b {
                if self.pipe.cancel.load(Ordering::Relaxed) {
                    return Err(Error::Interrupted.into());
                }
                let n = self.piece.min(b - off);
                let client = self.client.clone();
                let throttle = self.pipe.throttle.clone();
                reads.spawn(async move {
                    throttle.acquire(n).await?;
                    client.read(off, n as u32).await.map(|d| (off, d))
                });
                off += n;
            }
        }
        let mut patches = Vec::new();
        while let Some(r) = reads.join_next().await {
            let (off, data) = r
                .context("read task panicked")?
                .with_context(|| format!("disk '{}': read", self.disk))?;
            self.pipe.progress.advance(&self.disk, data.len() as u64);
            patches.push(Patch {
                offset: (off - self.start) as u32,
                data,
            });
        }
        Ok(patches)
    }
}

/// What storing a slot gave.
enum Stored {
    /// The slot's new entry, and the stored bytes when its object was new.
    Slot(Slot, Option<u64>),
    /// The base object the slot's delta would need is missing or corrupt (a
    /// corrupt one was quarantined by the read): read the slot whole instead.
    BaseUnusable(String),
}

/// Store a slot whose new content is `patches` (slot-relative, disjoint) laid
/// over `base`. A partly changed slot with stored content becomes a delta: only
/// the changed bytes are written, and the base chunk is not even read (its name
/// is checked). A slot whose patches would cover more than half of it becomes a
/// chunk again, as does every slot of a full, of a zero base, or rewritten whole.
fn store_slot(repo: &Repository, base: Slot, len: usize, patches: Vec<Patch>) -> Result<Stored> {
    let covered: usize = patches.iter().map(|p| p.data.len()).sum();
    if covered < len && base != Slot::Zero {
        let delta = match base {
            Slot::Delta(id) => match repo.chunks().read_delta_checked(&id) {
                Ok(old) => old.updated(patches)?,
                Err(e) => return unusable("delta", &id, e),
            },
            Slot::Chunk(b) => {
                if !repo.chunks().contains(&b)? {
                    return unusable("chunk", &b, ChunkError::Missing);
                }
                Delta::new(b, len as u32, patches)?
            }
            Slot::Zero => unreachable!("checked above"),
        };
        if delta.patch_bytes() * 2 <= len as u64 {
            let ins = repo.chunks().insert_delta(&delta)?;
            return Ok(Stored::Slot(
                Slot::Delta(ins.digest),
                ins.new.then_some(ins.stored_bytes),
            ));
        }
        let mut data = match repo.chunks().read_checked(&delta.base) {
            Ok(data) => data,
            Err(e) => return unusable("chunk", &delta.base, e),
        };
        delta.apply(&mut data)?;
        let stored = store_chunk(repo, &data);
        crate::buffers::give(data);
        return stored;
    }
    let data = assemble(len, patches);
    let stored = store_chunk(repo, &data);
    crate::buffers::give(data);
    stored
}

/// A base object that cannot be used: missing or corrupt heals, I/O fails.
fn unusable(what: &str, id: &crate::repo::Digest, e: ChunkError) -> Result<Stored> {
    let hex = crate::repo::digest_hex(id);
    match e {
        ChunkError::Missing => Ok(Stored::BaseUnusable(format!(
            "base {what} {hex} is missing"
        ))),
        ChunkError::Corrupt { reason } => Ok(Stored::BaseUnusable(format!(
            "base {what} {hex} is corrupt: {reason}"
        ))),
        ChunkError::Unreadable { source } => {
            Err(source).with_context(|| format!("cannot read base {what} {hex}"))
        }
    }
}

/// Slots of `index` whose entry names an object of `quarantined`: a chunk or a
/// delta in it, or a delta whose base chunk is (a delta that is missing or
/// whose header is damaged counts too).
pub fn slots_naming(
    chunks: &crate::repo::ChunkStore,
    index: &DiskIndex,
    quarantined: &std::collections::HashSet<crate::repo::Digest>,
) -> Result<Vec<u64>> {
    let mut bases = std::collections::HashMap::new();
    let mut out = Vec::new();
    for (i, slot) in index.slots.iter().enumerate() {
        let bad = match slot {
            Slot::Zero => false,
            Slot::Chunk(d) => quarantined.contains(d),
            Slot::Delta(id) => {
                if quarantined.contains(id) {
                    true
                } else {
                    if !bases.contains_key(id) {
                        bases.insert(*id, chunks.delta_base(id).ok().flatten());
                    }
                    bases[id].is_none_or(|b| quarantined.contains(&b))
                }
            }
        };
        if bad {
            out.push(i as u64);
        }
    }
    Ok(out)
}

/// The slot's bytes from patches over zeros; a single patch covering the slot is
/// used as it is (no copy).
fn assemble(len: usize, mut patches: Vec<Patch>) -> Vec<u8> {
    if patches.len() == 1 && patches[0].offset == 0 && patches[0].data.len() == len {
        return patches.pop().map(|p| p.data).unwrap_or_default();
    }
    let mut buf = crate::buffers::take(len);
    buf.resize(len, 0);
    for p in patches {
        buf[p.offset as usize..p.offset as usize + p.data.len()].copy_from_slice(&p.data);
        crate::buffers::give(p.data);
    }
    buf
}

fn store_chunk(repo: &Repository, data: &[u8]) -> Result<Stored> {
    if is_zero(data) {
        return Ok(Stored::Slot(Slot::Zero, None));
    }
    let ins = repo.chunks().insert(data)?;
    Ok(Stored::Slot(
        Slot::Chunk(ins.digest),
        ins.new.then_some(ins.stored_bytes),
    ))
}

/// True when every byte is zero (16-byte word compares; the compiler vectorises them).
pub fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(16);
    let tail = words.remainder();
    words
        .map(|w| u128::from_ne_bytes(w.try_into().expect("16-byte word")))
        .all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}
