//! The chunk store: `chunks/ab/cd/<64-hex id>`, one object per file: a chunk
//! (id = digest of its content) or a delta (id = digest of its encoding, see `delta`).
//!
//! Objects are staged (written under a `.tmp-` name) by `insert`, then fsynced and
//! renamed by background threads (`publisher`), so a backup never waits for a disk
//! flush per chunk. A chunk file is written once and never rewritten: its data is fsynced before its
//! name exists, so an existing name is trusted. Directory fsyncs (which make the
//! names durable) are batched: every insert records the chunk's directories, and
//! [`ChunkStore::sync_dirs`] fsyncs them all before a point's manifest is written.
//! Inserts are safe from many threads and processes at once: the same digest
//! written twice produces the same bytes under unique staging names, and the
//! final rename is atomic.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{anyhow, bail, Context, Result};

use super::atomic;
use super::chunk::{decode_chunk, digest_hex, digest_of, encode_chunk, Digest};
use super::delta::{decode_delta, encode_delta, Delta};
use super::index::Slot;
use super::publisher::Publisher;

/// What [`ChunkStore::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// The chunk's id.
    pub digest: Digest,
    /// True when this call stored the chunk; false when it was already present.
    pub new: bool,
    /// Bytes written to the target (header + payload); 0 when not new.
    pub stored_bytes: u64,
}

/// Why a chunk could not be read.
#[derive(Debug)]
pub enum ChunkError {
    /// No file for this digest.
    Missing { path: PathBuf },
    /// The file exists but does not decode to content with this digest.
    Corrupt { path: PathBuf, reason: String },
    /// The file could not be read (permissions, I/O error).
    Unreadable { path: PathBuf, source: io::Error },
}

/// The content-addressed chunk store under `<root>/chunks`.
#[derive(Debug)]
pub struct ChunkStore {
    dir: PathBuf,
    /// Leaf directories (`ab/cd` as a u16) holding chunk names not yet fsynced.
    dirs_to_sync: Mutex<BTreeSet<u16>>,
    /// fsync + rename of staged objects, in the background.
    publisher: Publisher,
}

impl ChunkStore {
    /// The store at `dir` (`<root>/chunks`), which must exist.
    pub(crate) fn new(dir: PathBuf) -> ChunkStore {
        ChunkStore {
            dir,
            dirs_to_sync: Mutex::new(BTreeSet::new()),
            publisher: Publisher::default(),
        }
    }

    /// The directory holding the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the chunk file for `digest`.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.leaf_dir(leaf_of(digest)).join(digest_hex(digest))
    }

    /// Hash `data`, and store it compressed unless a chunk with that digest exists.
    pub fn insert(&self, data: &[u8]) -> Result<Inserted> {
        let digest = digest_of(data);
        self.store_object(digest, || {
            encode_chunk(data)
                .with_context(|| format!("cannot encode chunk {}", digest_hex(&digest)))
        })
    }

    /// Store a delta object (a base chunk plus patches) unless it exists.
    pub fn insert_delta(&self, delta: &Delta) -> Result<Inserted> {
        let id = delta.id();
        self.store_object(id, || {
            encode_delta(delta).with_context(|| format!("cannot encode delta {}", digest_hex(&id)))
        })
    }

    /// Write the object `encode` builds under `digest`, unless that name exists.
    fn store_object(
        &self,
        digest: Digest,
        encode: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Inserted> {
        let path = self.path_of(&digest);
        let leaf = leaf_of(&digest);
        if path.exists() || self.publisher.is_pending(&path) {
            // Another writer may have renamed it in without its directory fsync
            // yet: whoever commits a point referring to it must fsync this dir.
            self.record_dir(leaf);
            return Ok(Inserted {
                digest,
                new: false,
                stored_bytes: 0,
            });
        }
        let object = encode()?;
        let leaf_dir = self.leaf_dir(leaf);
        fs::create_dir_all(&leaf_dir)
            .with_context(|| format!("cannot create chunk directory {}", leaf_dir.display()))?;
        self.record_dir(leaf);
        let staged = atomic::stage_file(&path, &object)
            .with_context(|| format!("cannot store object {}", digest_hex(&digest)))?;
        self.publisher.submit(staged)?;
        Ok(Inserted {
            digest,
            new: true,
            stored_bytes: object.len() as u64,
        })
    }

    /// True when a chunk file for `digest` exists (its content is not read).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path_of(digest).exists()
    }

    /// Read a chunk, decompress it and check its digest. A missing or corrupt
    /// chunk is an error naming the digest and the file.
    pub fn get(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.read_checked(digest)
            .map_err(|e| loud("chunk", digest, e))
    }

    /// Read a delta object and check its id (its base is not read).
    pub fn get_delta(&self, id: &Digest) -> Result<Delta> {
        self.read_delta_checked(id)
            .map_err(|e| loud("delta", id, e))
    }

    /// The bytes of a slot of `len` bytes: zeros, a chunk, or a delta applied to
    /// its base chunk. Everything read is verified.
    pub fn read_slot(&self, slot: &Slot, len: usize) -> Result<Vec<u8>> {
        let data = match slot {
            Slot::Zero => vec![0u8; len],
            Slot::Chunk(d) => self.get(d)?,
            Slot::Delta(id) => {
                let delta = self.get_delta(id)?;
                let mut data = self.get(&delta.base)?;
                delta
                    .apply(&mut data)
                    .with_context(|| format!("delta {}", digest_hex(id)))?;
                data
            }
        };
        if data.len() != len {
            bail!(
                "slot content is {} bytes, the index expects {len}",
                data.len()
            );
        }
        Ok(data)
    }

    /// Like [`ChunkStore::get`], with the kind of failure as a value (for verify).
    pub fn read_checked(&self, digest: &Digest) -> Result<Vec<u8>, ChunkError> {
        let (path, object) = self.read_object(digest)?;
        decode_chunk(&object, digest).map_err(|e| ChunkError::Corrupt {
            path,
            reason: format!("{e:#}"),
        })
    }

    /// Like [`ChunkStore::get_delta`], with the kind of failure as a value.
    pub fn read_delta_checked(&self, id: &Digest) -> Result<Delta, ChunkError> {
        let (path, object) = self.read_object(id)?;
        decode_delta(&object, id).map_err(|e| ChunkError::Corrupt {
            path,
            reason: format!("{e:#}"),
        })
    }

    fn read_object(&self, digest: &Digest) -> Result<(PathBuf, Vec<u8>), ChunkError> {
        let path = self.path_of(digest);
        match fs::read(&path) {
            Ok(object) => Ok((path, object)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ChunkError::Missing { path }),
            Err(source) => Err(ChunkError::Unreadable { path, source }),
        }
    }

    /// Remove staging files (`*.tmp-*`) at least `min_age` old: what a writer
    /// killed between staging and publishing left behind. Younger ones may belong
    /// to a backup in progress (removing one of those would only fail that backup).
    pub fn remove_stale_staging(&self, min_age: std::time::Duration) -> Result<Vec<PathBuf>> {
        let now = std::time::SystemTime::now();
        let mut removed = Vec::new();
        for outer in sub_dirs(&self.dir)? {
            for leaf in sub_dirs(&outer)? {
                for entry in fs::read_dir(&leaf)
                    .with_context(|| format!("cannot list {}", leaf.display()))?
                {
                    let entry = entry.with_context(|| format!("cannot list {}", leaf.display()))?;
                    if !atomic::is_tmp_name(&entry.file_name().to_string_lossy()) {
                        continue;
                    }
                    let modified = entry.metadata().and_then(|m| m.modified());
                    let old = modified
                        .is_ok_and(|m| now.duration_since(m).is_ok_and(|age| age >= min_age));
                    if old {
                        let path = entry.path();
                        match fs::remove_file(&path) {
                            Ok(()) => removed.push(path),
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => {
                                return Err(e)
                                    .with_context(|| format!("cannot remove {}", path.display()))
                            }
                        }
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Wait until every object inserted so far is durable under its final name
    /// (inserts return once the object is staged; see the module docs).
    pub fn flush(&self) -> Result<()> {
        self.publisher.flush()
    }

    /// fsync every chunk directory touched since the last call (leaf, its parent,
    /// and the store root), so every chunk name inserted so far is durable.
    /// Holds the set while syncing: a concurrent caller returns only once the
    /// directories it needs are durable.
    pub fn sync_dirs(&self) -> Result<()> {
        // Every staged object must have its name before the names are made durable.
        self.publisher.flush()?;
        let mut pending = self
            .dirs_to_sync
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut parents = BTreeSet::new();
        for &leaf in pending.iter() {
            atomic::sync_dir(&self.leaf_dir(leaf))?;
            parents.insert(leaf >> 8);
        }
        for &parent in &parents {
            atomic::sync_dir(&self.dir.join(format!("{parent:02x}")))?;
        }
        if !pending.is_empty() {
            atomic::sync_dir(&self.dir)?;
        }
        pending.clear();
        Ok(())
    }

    fn record_dir(&self, leaf: u16) {
        self.dirs_to_sync
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(leaf);
    }

    fn leaf_dir(&self, leaf: u16) -> PathBuf {
        self.dir
            .join(format!("{:02x}", leaf >> 8))
            .join(format!("{:02x}", leaf & 0xff))
    }
}

/// The sub-directories of `dir` (the `ab` and `cd` levels of the store).
fn sub_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// A [`ChunkError`] as a one-line error naming the object and its file.
fn loud(what: &str, digest: &Digest, e: ChunkError) -> anyhow::Error {
    let hex = digest_hex(digest);
    match e {
        ChunkError::Missing { path } => anyhow!("{what} {hex} is missing ({})", path.display()),
        ChunkError::Corrupt { path, reason } => {
            anyhow!("{what} {hex} is corrupt ({}): {reason}", path.display())
        }
        ChunkError::Unreadable { path, source } => {
            anyhow!("cannot read {what} {hex} ({}): {source}", path.display())
        }
    }
}

/// The leaf directory of a digest: its first two bytes (`ab/cd`).
fn leaf_of(digest: &Digest) -> u16 {
    u16::from_be_bytes([digest[0], digest[1]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let chunks = dir.path().join("chunks");
        fs::create_dir(&chunks).unwrap();
        (dir, ChunkStore::new(chunks))
    }

    #[test]
    fn stale_staging_files_are_removed_young_ones_kept() {
        let (_dir, store) = store();
        let digest = store.insert(b"published").unwrap().digest;
        store.flush().unwrap();
        let leaf = store.path_of(&digest).parent().unwrap().to_path_buf();
        let stale = leaf.join("deadbeef.tmp-1-0000000000000001");
        let young = leaf.join("deadbeef.tmp-1-0000000000000002");
        fs::write(&stale, b"x").unwrap();
        fs::write(&young, b"y").unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 3600);
        fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        let removed = store
            .remove_stale_staging(std::time::Duration::from_secs(3600))
            .unwrap();
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists() && young.exists());
        assert_eq!(
            store.get(&digest).unwrap(),
            b"published",
            "published chunks are untouched"
        );
    }

    #[test]
    fn insert_stores_once_and_get_returns_the_content() {
        let (_dir, store) = store();
        let data = b"block ".repeat(10_000);
        let first = store.insert(&data).unwrap();
        assert!(first.new);
        assert!(first.stored_bytes > 0 && first.stored_bytes < data.len() as u64);
        // Still being published: a second insert does not stage it again.
        assert!(!store.insert(&data).unwrap().new);
        store.flush().unwrap();
        let path = store.path_of(&first.digest);
        let hex = digest_hex(&first.digest);
        assert!(path.ends_with(format!("{}/{}/{hex}", &hex[..2], &hex[2..4])));
        assert_eq!(fs::metadata(&path).unwrap().len(), first.stored_bytes);

        let second = store.insert(&data).unwrap();
        assert_eq!(second.digest, first.digest);
        assert!(!second.new);
        assert_eq!(second.stored_bytes, 0);
        assert!(store.contains(&first.digest));
        assert_eq!(store.get(&first.digest).unwrap(), data);
        store.sync_dirs().unwrap();
        let leaf_entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leaf_entries.len(), 1, "no staging files left behind");
    }

    #[test]
    fn flipped_byte_and_deleted_chunk_are_loud_errors_naming_the_digest() {
        let (_dir, store) = store();
        let a = store.insert(&b"a".repeat(5000)).unwrap().digest;
        let b = store.insert(&b"b".repeat(5000)).unwrap().digest;
        store.flush().unwrap();
        let path_a = store.path_of(&a);
        let mut bytes = fs::read(&path_a).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&path_a, bytes).unwrap();
        let err = store.get(&a).unwrap_err().to_string();
        assert!(
            err.contains(&digest_hex(&a)) && err.contains("corrupt"),
            "{err}"
        );
        assert!(err.contains(&path_a.display().to_string()), "{err}");

        fs::remove_file(store.path_of(&b)).unwrap();
        assert!(!store.contains(&b));
        let err = store.get(&b).unwrap_err().to_string();
        assert!(
            err.contains(&digest_hex(&b)) && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn concurrent_inserts_of_overlapping_data_store_every_chunk_once() {
        let (_dir, store) = store();
        let store = Arc::new(store);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut digests = Vec::new();
                    for i in 0..50u32 {
                        // Every thread inserts the same 50 chunks, in a different order.
                        let n = (i + t * 13) % 50;
                        let data = format!("chunk number {n} ").repeat(500);
                        digests.push((n, store.insert(data.as_bytes()).unwrap().digest));
                    }
                    digests
                })
            })
            .collect();
        let mut all = BTreeSet::new();
        for t in threads {
            for (n, d) in t.join().unwrap() {
                all.insert((n, d));
            }
        }
        assert_eq!(
            all.len(),
            50,
            "same data gave the same digest in every thread"
        );
        store.sync_dirs().unwrap();
        for (n, d) in &all {
            let expected = format!("chunk number {n} ").repeat(500);
            assert_eq!(store.get(d).unwrap(), expected.as_bytes());
        }
        let mut files = 0;
        for ab in fs::read_dir(store.dir()).unwrap() {
            for cd in fs::read_dir(ab.unwrap().path()).unwrap() {
                for f in fs::read_dir(cd.unwrap().path()).unwrap() {
                    let name = f.unwrap().file_name().into_string().unwrap();
                    assert!(!atomic::is_tmp_name(&name), "{name}");
                    files += 1;
                }
            }
        }
        assert_eq!(files, 50);
    }
}
