//! [`PointReader`]: a restore point's disks readable at any offset.
//!
//! A read maps to slots through the disk's index; a zero slot is answered
//! without I/O; a chunk or delta slot is read through the repository, which
//! decodes it and verifies its digest, and the decoded bytes go into a bounded
//! LRU cache shared by every disk of the point (as PBS's `CachedChunkReader`).
//! Concurrent reads of one slot decode it once: later readers wait for the
//! first. Everything here is synchronous; callers on an async runtime use its
//! blocking pool.
//!
//! The reader needs two things from a repository ([`PointStore`]): a disk's index
//! at a point, and one slot's bytes. That is the whole read API recovery and
//! restore depend on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use lru::LruCache;

use crate::repo::{digest_hex, Digest, DiskIndex, Manifest, Repository, Slot};

/// Decoded slots kept by default: 64 MiB (16 chunks of 4 MiB).
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// What a [`PointReader`] reads from a repository.
pub trait PointStore: Send + Sync {
    /// The index of `disk` at `point` of the VM `vm_key`.
    fn load_index(&self, vm_key: &str, point: &str, disk: &str) -> Result<DiskIndex>;
    /// The verified bytes of a chunk or delta slot of `len` bytes.
    fn read_slot(&self, slot: &Slot, len: usize) -> Result<Vec<u8>>;
}

impl PointStore for Repository {
    fn load_index(&self, vm_key: &str, point: &str, disk: &str) -> Result<DiskIndex> {
        Repository::load_index(self, vm_key, point, disk)
    }

    fn read_slot(&self, slot: &Slot, len: usize) -> Result<Vec<u8>> {
        self.chunks().read_slot(slot, len)
    }
}

/// A run of a disk's bytes: data, or zeros (a zero slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Span {
    Data(Bytes),
    Zero(u64),
}

/// One disk of the point.
struct Disk {
    name: String,
    index: DiskIndex,
}

/// Counters (for tests, logs and the benchmark).
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Slots decoded from the repository.
    pub slot_reads: AtomicU64,
    /// Reads of chunk slots answered from the cache.
    pub cache_hits: AtomicU64,
}

/// A point's disks, readable at any offset, with a cache of decoded slots.
pub struct PointReader {
    store: Arc<dyn PointStore>,
    point: String,
    disks: Vec<Disk>,
    cache: SlotCache,
    stats: ReaderStats,
}

impl PointReader {
    /// Load the indexes of every disk of `manifest`'s point of VM `vm_key`.
    pub fn open(
        store: Arc<dyn PointStore>,
        vm_key: &str,
        manifest: &Manifest,
        cache_bytes: usize,
    ) -> Result<PointReader> {
        let mut disks = Vec::new();
        for d in &manifest.disks {
            let index = store.load_index(vm_key, &manifest.point, &d.name)?;
            if index.disk_size != d.size {
                bail!(
                    "index of disk '{}' at point {} says {} bytes, the manifest {}",
                    d.name,
                    manifest.point,
                    index.disk_size,
                    d.size
                );
            }
            disks.push(Disk {
                name: d.name.clone(),
                index,
            });
        }
        Ok(PointReader {
            store,
            point: manifest.point.clone(),
            disks,
            cache: SlotCache::new(cache_bytes),
            stats: ReaderStats::default(),
        })
    }

    pub fn point(&self) -> &str {
        &self.point
    }

    /// The disks' names, in manifest order.
    pub fn disk_names(&self) -> impl Iterator<Item = &str> {
        self.disks.iter().map(|d| d.name.as_str())
    }

    /// The number of a disk by name (what the other methods take).
    pub fn disk(&self, name: &str) -> Result<usize> {
        self.disks
            .iter()
            .position(|d| d.name == name)
            .ok_or_else(|| anyhow!("point {} has no disk '{name}'", self.point))
    }

    /// A disk's index.
    pub fn disk_index(&self, disk: usize) -> &DiskIndex {
        &self.disks[disk].index
    }

    pub fn stats(&self) -> &ReaderStats {
        &self.stats
    }

    /// `len` bytes of `disk` at `offset`, copied into one buffer.
    pub fn read_at(&self, disk: usize, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        for span in self.spans(disk, offset, len as u64)? {
            match span {
                Span::Data(b) => out.extend_from_slice(&b),
                Span::Zero(n) => out.resize(out.len() + n as usize, 0),
            }
        }
        Ok(out)
    }

    /// The bytes of `disk` in `[offset, offset + len)` as spans, in order, one or
    /// more per slot touched; data spans share the cached buffers (no copy).
    pub fn spans(&self, disk: usize, offset: u64, len: u64) -> Result<Vec<Span>> {
        let d = &self.disks[disk];
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= d.index.disk_size)
            .ok_or_else(|| {
                anyhow!(
                    "read of {len} bytes at {offset} is outside disk '{}' ({} bytes)",
                    d.name,
                    d.index.disk_size
                )
            })?;
        let chunk = u64::from(d.index.chunk_size);
        let mut spans = Vec::new();
        let mut at = offset;
        while at < end {
            let i = (at / chunk) as usize;
            let slot_start = d.index.slot_offset(i);
            let stop = (slot_start + chunk).min(end);
            match d.index.slots[i] {
                Slot::Zero => match spans.last_mut() {
                    Some(Span::Zero(n)) => *n += stop - at,
                    _ => spans.push(Span::Zero(stop - at)),
                },
                _ => {
                    let bytes = self.slot(disk, i)?;
                    let from = (at - slot_start) as usize;
                    let to = (stop - slot_start) as usize;
                    spans.push(Span::Data(bytes.slice(from..to)));
                }
            }
            at = stop;
        }
        Ok(spans)
    }

    /// The whole of slot `i` of `disk`, from the cache or decoded now. A zero
    /// slot is zeros, made without I/O.
    pub fn slot(&self, disk: usize, i: usize) -> Result<Bytes> {
        let d = &self.disks[disk];
        let slot = d.index.slots[i];
        let len = d.index.slot_len(i);
        let key = match slot {
            Slot::Zero => return Ok(Bytes::from(vec![0u8; len])),
            Slot::Chunk(k) | Slot::Delta(k) => k,
        };
        let (bytes, hit) = self.cache.get_or_load(key, || {
            self.stats.slot_reads.fetch_add(1, Ordering::Relaxed);
            self.store
                .read_slot(&slot, len)
                .map(Bytes::from)
                .with_context(|| {
                    format!(
                        "disk '{}' slot {i} ({}) at point {}",
                        d.name,
                        digest_hex(&key),
                        self.point
                    )
                })
        })?;
        if hit {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(bytes)
    }

    /// Allocation of `[offset, offset + len)` of `disk` as `(length, zero)` runs:
    /// zero slots are `true` (holes), chunk and delta slots `false`.
    pub fn allocation(&self, disk: usize, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let d = &self.disks[disk];
        let end = (offset.saturating_add(len)).min(d.index.disk_size);
        let chunk = u64::from(d.index.chunk_size);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let i = (at / chunk) as usize;
            let stop = (d.index.slot_offset(i) + chunk).min(end);
            let zero = d.index.slots[i] == Slot::Zero;
            match runs.last_mut() {
                Some(last) if last.1 == zero => last.0 += stop - at,
                _ => runs.push((stop - at, zero)),
            }
            at = stop;
        }
        runs
    }

    /// Decode the slots of `[offset, offset + len)` into the cache now.
    pub fn prefetch(&self, disk: usize, offset: u64, len: u64) {
        if let Err(e) = self.spans(disk, offset, len) {
            tracing::debug!("prefetch of point {}: {e:#}", self.point);
        }
    }
}

/// One decode in progress: waiters block on the condvar until it is done.
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Result<Bytes, String>>>,
    ready: Condvar,
}

/// Decoded slots by digest (chunk or delta id: both name their content), kept
/// within a byte budget, least recently used out first.
struct SlotCache {
    budget: usize,
    inner: Mutex<CacheInner>,
}

struct CacheInner {
    lru: LruCache<Digest, Bytes>,
    bytes: usize,
    loading: HashMap<Digest, Arc<Flight>>,
}

impl SlotCache {
    fn new(budget: usize) -> SlotCache {
        SlotCache {
            budget,
            inner: Mutex::new(CacheInner {
                lru: LruCache::unbounded(),
                bytes: 0,
                loading: HashMap::new(),
            }),
        }
    }

    /// The cached bytes of `key` (and `true`), or `load`'s (and `false`); one
    /// load per key at a time.
    fn get_or_load(
        &self,
        key: Digest,
        load: impl FnOnce() -> Result<Bytes>,
    ) -> Result<(Bytes, bool)> {
        let flight = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(b) = inner.lru.get(&key) {
                return Ok((b.clone(), true));
            }
            match inner.loading.get(&key) {
                Some(f) => Some(f.clone()),
                None => {
                    inner.loading.insert(key, Arc::new(Flight::default()));
                    None
                }
            }
        };
        if let Some(flight) = flight {
            let mut done = flight.done.lock().unwrap_or_else(PoisonError::into_inner);
            while done.is_none() {
                done = flight
                    .ready
                    .wait(done)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            return match done.as_ref() {
                Some(Ok(b)) => Ok((b.clone(), true)),
                Some(Err(e)) => Err(anyhow!("{e}")),
                None => unreachable!("loop ends when the decode is done"),
            };
        }
        let result = load();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let flight = inner.loading.remove(&key);
        if let Ok(b) = &result {
            if b.len() <= self.budget {
                inner.bytes += b.len();
                if let Some(old) = inner.lru.put(key, b.clone()) {
                    inner.bytes -= old.len();
                }
                while inner.bytes > self.budget {
                    match inner.lru.pop_lru() {
                        Some((_, old)) => inner.bytes -= old.len(),
                        None => break,
                    }
                }
            }
        }
        drop(inner);
        if let Some(flight) = flight {
            let mut done = flight.done.lock().unwrap_or_else(PoisonError::into_inner);
            *done = Some(match &result {
                Ok(b) => Ok(b.clone()),
                Err(e) => Err(format!("{e:#}")),
            });
            flight.ready.notify_all();
        }
        result.map(|b| (b, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::digest_of;

    /// Slots in memory, counting reads; a slot whose digest is in `broken` fails.
    struct MemStore {
        index: DiskIndex,
        chunks: HashMap<Digest, Vec<u8>>,
        reads: AtomicU64,
    }

    impl PointStore for MemStore {
        fn load_index(&self, _: &str, _: &str, _: &str) -> Result<DiskIndex> {
            Ok(self.index.clone())
        }
        fn read_slot(&self, slot: &Slot, len: usize) -> Result<Vec<u8>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            let Slot::Chunk(d) = slot else {
                bail!("not a chunk")
            };
            let data = self
                .chunks
                .get(d)
                .cloned()
                .ok_or_else(|| anyhow!("chunk missing"))?;
            assert_eq!(data.len(), len);
            Ok(data)
        }
    }

    fn manifest(size: u64) -> Manifest {
        let text = format!(
            r#"{{"format":1,"vm":{{"platform":"p","name":"v"}},"point":"20260101T000000Z","level":"full",
            "base":null,"full":null,"status":"completed","started":"2026-01-01T00:00:00Z",
            "finished":"2026-01-01T00:00:01Z","fallback_reason":null,"vm_config":null,
            "disks":[{{"name":"vda","size":{size},"chunk_size":65536,"index":"vda.idx","bytes_read":0,
            "bytes_written":0,"new_chunks":0,"reused_chunks":0,"zero_slots":0}}],
            "totals":{{"size":{size},"bytes_read":0,"bytes_written":0,"new_chunks":0,"reused_chunks":0,"zero_slots":0}}}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    /// 4 slots of 64 KiB plus a short one: data, zero, data, zero, data(1000).
    fn store() -> (Arc<MemStore>, Vec<u8>) {
        let size = 4 * 65536 + 1000;
        let mut disk = vec![0u8; size];
        let mut index = DiskIndex::new_zero(size as u64, 65536);
        let mut chunks = HashMap::new();
        for (i, fill) in [(0usize, 1u8), (2, 2), (4, 3)] {
            let start = i * 65536;
            let end = (start + 65536).min(size);
            for (k, b) in disk[start..end].iter_mut().enumerate() {
                *b = fill.wrapping_add(k as u8);
            }
            let d = digest_of(&disk[start..end]);
            chunks.insert(d, disk[start..end].to_vec());
            index.slots[i] = Slot::Chunk(d);
        }
        (
            Arc::new(MemStore {
                index,
                chunks,
                reads: AtomicU64::new(0),
            }),
            disk,
        )
    }

    #[test]
    fn reads_at_any_offset_equal_the_disk_and_zero_slots_cost_no_io() {
        let (store, disk) = store();
        let r =
            PointReader::open(store.clone(), "p/v", &manifest(disk.len() as u64), 1 << 20).unwrap();
        let vda = r.disk("vda").unwrap();
        for (off, len) in [
            (0u64, 10usize),
            (65530, 20),
            (65536, 65536),
            (100_000, 160_000),
            (262_144, 1000),
            (0, disk.len()),
        ] {
            assert_eq!(
                r.read_at(vda, off, len).unwrap(),
                disk[off as usize..off as usize + len],
                "{off}+{len}"
            );
        }
        // Three chunk slots, each decoded once whatever the reads.
        assert_eq!(store.reads.load(Ordering::SeqCst), 3);
        let before = store.reads.load(Ordering::SeqCst);
        assert_eq!(r.read_at(vda, 65536, 65536).unwrap(), vec![0u8; 65536]);
        assert_eq!(
            store.reads.load(Ordering::SeqCst),
            before,
            "a zero slot was read"
        );
        assert_eq!(
            r.allocation(vda, 0, disk.len() as u64),
            vec![
                (65536, false),
                (65536, true),
                (65536, false),
                (65536, true),
                (1000, false)
            ]
        );
        assert!(r.read_at(vda, disk.len() as u64 - 10, 11).is_err());
        assert!(r.disk("vdb").is_err());
    }

    #[test]
    fn the_cache_stays_within_its_budget_and_concurrent_reads_decode_once() {
        let (store, disk) = store();
        // Room for one slot: reading slots 0, 2, 0 decodes slot 0 twice.
        let r =
            PointReader::open(store.clone(), "p/v", &manifest(disk.len() as u64), 65536).unwrap();
        for off in [0u64, 2 * 65536, 0] {
            r.read_at(0, off, 10).unwrap();
        }
        assert_eq!(store.reads.load(Ordering::SeqCst), 3);

        let (store, disk) = self::store();
        let r = Arc::new(
            PointReader::open(store.clone(), "p/v", &manifest(disk.len() as u64), 1 << 20).unwrap(),
        );
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let r = r.clone();
                s.spawn(move || r.read_at(0, t * 100, 4096).unwrap());
            }
        });
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        assert_eq!(r.stats().cache_hits.load(Ordering::SeqCst), 7);
    }

    #[test]
    fn a_failed_decode_names_disk_slot_and_digest_and_is_not_cached() {
        let (store, disk) = store();
        let mut broken = MemStore {
            index: store.index.clone(),
            chunks: HashMap::new(),
            reads: AtomicU64::new(0),
        };
        broken.chunks.clear();
        let r = PointReader::open(
            Arc::new(broken),
            "p/v",
            &manifest(disk.len() as u64),
            1 << 20,
        )
        .unwrap();
        let err = format!("{:#}", r.read_at(0, 2 * 65536, 10).unwrap_err());
        assert!(
            err.contains("disk 'vda' slot 2") && err.contains("chunk missing"),
            "{err}"
        );
        assert!(r.read_at(0, 2 * 65536, 10).is_err());
    }
}
