//! The chunk store: objects `chunks/ab/cd/<64-hex id>`, each a chunk (id =
//! digest of its content) or a delta (id = digest of its encoding, see `delta`),
//! kept in the repository's [`Store`].
//!
//! An object is written once and never rewritten; its name is trusted. Inserts
//! use the store's deferred put, so a backup never waits for a disk flush per
//! chunk: [`ChunkStore::flush`] makes every object inserted (or found present)
//! durable before a point's manifest is written. Inserts are safe from many
//! threads and processes at once: the same id always has the same bytes.
//!
//! Quarantine (docs/FORMAT.md, "Quarantine"): an object that was read whole
//! and does not decode is moved aside to `quarantine/<hex>.<time>`, never
//! deleted. Its name is then free, so the next backup that meets the same
//! content stores it again, and every point naming it is whole again. I/O
//! errors quarantine nothing.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use chrono::Utc;

use super::chunk::{decode_chunk_named, digest_hex, encode_chunk_with, parse_digest_hex, Digest};
use super::codec::{Codec, Compression};
use super::crypto::{Naming, Unauthentic};
use super::delta::{decode_delta_named, encode_delta, Delta, BASE_OFFSET};
use super::format::DELTA_MAGIC;
use super::index::Slot;
use super::store::Store;

/// The key prefix of chunk and delta objects.
pub const CHUNKS_PREFIX: &str = "chunks/";
/// The key prefix of quarantined objects.
pub const QUARANTINE_PREFIX: &str = "quarantine/";

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

/// Why an object could not be read.
#[derive(Debug)]
pub enum ChunkError {
    /// No object has this id.
    Missing,
    /// The object exists but does not decode to content with this id; it was
    /// quarantined (or the reason says why it could not be).
    Corrupt { reason: String },
    /// The object could not be read (permissions, I/O error): nothing is moved.
    Unreadable { source: anyhow::Error },
}

/// The content-addressed object store of a repository.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    store: Arc<dyn Store>,
    /// The same objects as stored (encrypted ones still sealed), for quarantine.
    raw: Arc<dyn Store>,
    /// How ids are computed (keyed in an encrypted repository).
    naming: Naming,
    /// How new objects are encoded (system.conf `compression`).
    compression: Compression,
}

/// The key of the object with id `digest`: `chunks/ab/cd/<hex>`.
pub fn object_key(digest: &Digest) -> String {
    let hex = digest_hex(digest);
    format!("{CHUNKS_PREFIX}{}/{}/{hex}", &hex[..2], &hex[2..4])
}

/// The id named by an object key, if it is one.
pub fn digest_of_key(key: &str) -> Option<Digest> {
    let rest = key.strip_prefix(CHUNKS_PREFIX)?;
    let (dirs, hex) = rest.rsplit_once('/')?;
    let digest = parse_digest_hex(hex)?;
    (dirs == format!("{}/{}", &hex[..2], &hex[2..4])).then_some(digest)
}

impl ChunkStore {
    /// The objects in `store` (the repository's view).
    #[cfg(test)]
    pub(crate) fn new(store: Arc<dyn Store>) -> ChunkStore {
        ChunkStore::with_naming(store.clone(), store, Naming::Plain)
    }

    /// The objects in `store` (decrypting, when the repository is encrypted),
    /// stored as in `raw`, named by `naming`.
    pub(crate) fn with_naming(
        store: Arc<dyn Store>,
        raw: Arc<dyn Store>,
        naming: Naming,
    ) -> ChunkStore {
        ChunkStore {
            store,
            raw,
            naming,
            compression: Compression::default(),
        }
    }

    /// The same objects, new ones encoded with `compression`.
    pub(crate) fn with_compression(&self, compression: Compression) -> ChunkStore {
        ChunkStore {
            compression,
            ..self.clone()
        }
    }

    /// Hash `data`, and store it (compressed as this store says) unless a chunk
    /// with that digest exists.
    pub fn insert(&self, data: &[u8]) -> Result<Inserted> {
        let digest = self.naming.chunk_id(data);
        self.store_object(digest, |key| {
            Codec::with(|codec| {
                let object = encode_chunk_with(codec, data, self.compression)
                    .with_context(|| format!("cannot encode chunk {}", digest_hex(&digest)))?;
                self.store
                    .put_if_absent_deferred_parts(key, &object.parts())?;
                Ok(object.len() as u64)
            })
        })
    }

    /// Store a delta object (a base chunk plus patches) unless it exists.
    pub fn insert_delta(&self, delta: &Delta) -> Result<Inserted> {
        let id = delta.id_with(&self.naming);
        self.store_object(id, |key| {
            let object = encode_delta(delta, self.compression)
                .with_context(|| format!("cannot encode delta {}", digest_hex(&id)))?;
            let len = object.len() as u64;
            self.store.put_if_absent_deferred(key, object)?;
            Ok(len)
        })
    }

    /// The object `id` as its writer encoded it (a chunk, or a delta when
    /// `delta`), decoded and checked first (a corrupt one is quarantined): what
    /// a copy sends to another repository. A delta's base chunk id comes with it.
    pub fn read_encoded(
        &self,
        id: &Digest,
        delta: bool,
    ) -> Result<(Vec<u8>, Option<Digest>), ChunkError> {
        let object = self.read_object(id)?;
        let checked = if delta {
            decode_delta_named(&object, id, &self.naming).map(|d| Some(d.base))
        } else {
            decode_chunk_named(&object, id, &self.naming).map(|_| None)
        };
        match checked {
            Ok(base) => Ok((object, base)),
            Err(e) => Err(self.quarantine(id, &object, e)),
        }
    }

    /// Store an object read with [`ChunkStore::read_encoded`] from a repository
    /// with the same naming, unless that name exists.
    pub fn insert_encoded(&self, id: &Digest, object: Vec<u8>) -> Result<Inserted> {
        self.store_object(*id, |key| {
            let len = object.len() as u64;
            self.store.put_if_absent_deferred(key, object)?;
            Ok(len)
        })
    }

    /// Unless an object named `digest` exists, let `put` encode and store it
    /// (deferred) under the key it is given; `put` returns the stored length.
    fn store_object(
        &self,
        digest: Digest,
        put: impl FnOnce(&str) -> Result<u64>,
    ) -> Result<Inserted> {
        let key = object_key(&digest);
        if self.store.exists(&key)? {
            return Ok(Inserted {
                digest,
                new: false,
                stored_bytes: 0,
            });
        }
        let stored_bytes =
            put(&key).with_context(|| format!("cannot store object {}", digest_hex(&digest)))?;
        Ok(Inserted {
            digest,
            new: true,
            stored_bytes,
        })
    }

    /// True when an object with this id exists (its content is not read).
    pub fn contains(&self, digest: &Digest) -> Result<bool> {
        self.store.exists(&object_key(digest))
    }

    /// Read a chunk, decompress it and check its digest. A missing or corrupt
    /// chunk is an error naming the digest.
    pub fn get(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.read_checked(digest)
            .map_err(|e| loud("chunk", digest, e))
    }

    /// Read a delta object and check its id (its base is not read).
    pub fn get_delta(&self, id: &Digest) -> Result<Delta> {
        self.read_delta_checked(id)
            .map_err(|e| loud("delta", id, e))
    }

    /// The base chunk a delta names, read from the delta's header alone (its
    /// magic is checked, the rest is not): `None` when the delta is missing, an
    /// error when its header is damaged.
    pub fn delta_base(&self, id: &Digest) -> Result<Option<Digest>> {
        let end = BASE_OFFSET + 32;
        let Some(head) = self.store.get_range(&object_key(id), 0, end as u64)? else {
            return Ok(None);
        };
        if head.len() < end || head[..BASE_OFFSET] != DELTA_MAGIC {
            bail!("delta {} has a damaged header", digest_hex(id));
        }
        let mut base = [0u8; 32];
        base.copy_from_slice(&head[BASE_OFFSET..end]);
        Ok(Some(base))
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
        let object = self.read_object(digest)?;
        let decoded = decode_chunk_named(&object, digest, &self.naming)
            .map_err(|e| self.quarantine(digest, &object, e));
        crate::buffers::give(object);
        decoded
    }

    /// Like [`ChunkStore::get_delta`], with the kind of failure as a value.
    pub fn read_delta_checked(&self, id: &Digest) -> Result<Delta, ChunkError> {
        let object = self.read_object(id)?;
        decode_delta_named(&object, id, &self.naming).map_err(|e| self.quarantine(id, &object, e))
    }

    fn read_object(&self, digest: &Digest) -> Result<Vec<u8>, ChunkError> {
        match self.store.get(&object_key(digest)) {
            Ok(Some(object)) => Ok(object),
            Ok(None) => Err(ChunkError::Missing),
            // An encrypted object that fails authentication is corrupt: the
            // bytes as stored go to quarantine.
            Err(e) if e.downcast_ref::<Unauthentic>().is_some() => {
                match self.raw.get(&object_key(digest)) {
                    Ok(Some(stored)) => Err(self.quarantine_raw(digest, &stored, e)),
                    Ok(None) => Err(ChunkError::Missing),
                    Err(source) => Err(ChunkError::Unreadable { source }),
                }
            }
            Err(source) => Err(ChunkError::Unreadable { source }),
        }
    }

    /// Move an object that failed decoding aside (module docs): a copy under
    /// `quarantine/`, then the original is deleted. Returns the error to report.
    fn quarantine(&self, digest: &Digest, object: &[u8], why: anyhow::Error) -> ChunkError {
        if Arc::ptr_eq(&self.store, &self.raw) {
            return self.quarantine_raw(digest, object, why);
        }
        // Encrypted: move the object as stored (the decoded bytes are not it).
        match self.raw.get(&object_key(digest)) {
            Ok(Some(stored)) => self.quarantine_raw(digest, &stored, why),
            _ => ChunkError::Corrupt {
                reason: format!("{why:#}; could not read it again to quarantine it"),
            },
        }
    }

    fn quarantine_raw(&self, digest: &Digest, object: &[u8], why: anyhow::Error) -> ChunkError {
        let reason = format!("{why:#}");
        let hex = digest_hex(digest);
        let stamp = super::names::new_point_id(Utc::now());
        let moved = (|| -> Result<String> {
            for n in 0..100 {
                let key = match n {
                    0 => format!("{QUARANTINE_PREFIX}{hex}.{stamp}"),
                    n => format!("{QUARANTINE_PREFIX}{hex}.{stamp}-{n}"),
                };
                if self.raw.put_if_absent(&key, object)? {
                    self.raw.delete(&object_key(digest))?;
                    self.raw.flush()?;
                    return Ok(key);
                }
            }
            bail!("too many quarantined copies of {hex}")
        })();
        let reason = match moved {
            Ok(key) => format!("{reason}; moved to {key}"),
            Err(e) => format!("{reason}; could not quarantine it: {e:#}"),
        };
        ChunkError::Corrupt { reason }
    }

    /// Ids of quarantined objects that no object in the store has replaced yet
    /// (what the next backup must read again from the VM).
    pub fn quarantined_missing(&self) -> Result<HashSet<Digest>> {
        let mut out = HashSet::new();
        for digest in self.quarantined()? {
            if !self.contains(&digest)? {
                out.insert(digest);
            }
        }
        Ok(out)
    }

    /// Ids of every object ever quarantined (healed or not).
    pub fn quarantined(&self) -> Result<HashSet<Digest>> {
        let mut out = HashSet::new();
        self.store.list(QUARANTINE_PREFIX, &mut |info| {
            let name = &info.key[QUARANTINE_PREFIX.len()..];
            if let Some(d) = name.get(..64).and_then(parse_digest_hex) {
                out.insert(d);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Wait until every object inserted so far is durable under its final name,
    /// and every name found present is durable too.
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }
}

/// A [`ChunkError`] as a one-line error naming the object.
pub(crate) fn loud(what: &str, digest: &Digest, e: ChunkError) -> anyhow::Error {
    let hex = digest_hex(digest);
    match e {
        ChunkError::Missing => anyhow!("{what} {hex} is missing"),
        ChunkError::Corrupt { reason } => anyhow!("{what} {hex} is corrupt: {reason}"),
        ChunkError::Unreadable { source } => anyhow!("cannot read {what} {hex}: {source:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::chunk::digest_of;
    use crate::repo::store::LocalStore;
    use std::collections::BTreeSet;
    use std::fs;
    use std::path::PathBuf;

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::new(Arc::new(LocalStore::open(dir.path()).unwrap()));
        (dir, s)
    }

    fn file_of(dir: &tempfile::TempDir, d: &Digest) -> PathBuf {
        dir.path().join(object_key(d))
    }

    #[test]
    fn object_keys_round_trip() {
        let d = digest_of(b"x");
        let key = object_key(&d);
        let hex = digest_hex(&d);
        assert_eq!(key, format!("chunks/{}/{}/{hex}", &hex[..2], &hex[2..4]));
        assert_eq!(digest_of_key(&key), Some(d));
        assert_eq!(digest_of_key(&format!("chunks/00/00/{hex}")), None);
        assert_eq!(digest_of_key("vms/x"), None);
    }

    #[test]
    fn insert_stores_once_and_get_returns_the_content() {
        let (dir, store) = store();
        let data = b"block ".repeat(10_000);
        let first = store.insert(&data).unwrap();
        assert!(first.new);
        assert!(first.stored_bytes > 0 && first.stored_bytes < data.len() as u64);
        // Still being published: a second insert does not stage it again.
        assert!(!store.insert(&data).unwrap().new);
        store.flush().unwrap();
        let path = file_of(&dir, &first.digest);
        assert_eq!(fs::metadata(&path).unwrap().len(), first.stored_bytes);

        let second = store.insert(&data).unwrap();
        assert_eq!(second.digest, first.digest);
        assert!(!second.new);
        assert_eq!(second.stored_bytes, 0);
        assert!(store.contains(&first.digest).unwrap());
        assert_eq!(store.get(&first.digest).unwrap(), data);
        let leaf_entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leaf_entries.len(), 1, "no staging files left behind");
    }

    #[test]
    fn corrupt_objects_are_quarantined_missing_ones_reported() {
        let (dir, store) = store();
        let a = store.insert(&b"a".repeat(5000)).unwrap().digest;
        let b = store.insert(&b"b".repeat(5000)).unwrap().digest;
        store.flush().unwrap();
        let path_a = file_of(&dir, &a);
        let mut bytes = fs::read(&path_a).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&path_a, &bytes).unwrap();
        let err = store.get(&a).unwrap_err().to_string();
        assert!(
            err.contains(&digest_hex(&a)) && err.contains("corrupt"),
            "{err}"
        );
        assert!(err.contains("moved to quarantine/"), "{err}");
        assert!(!path_a.exists(), "moved aside");
        let q: Vec<_> = fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(q.len(), 1);
        assert_eq!(fs::read(&q[0]).unwrap(), bytes, "never deleted");
        assert_eq!(store.quarantined_missing().unwrap(), HashSet::from([a]));
        // The same content stored again heals it.
        store.insert(&b"a".repeat(5000)).unwrap();
        store.flush().unwrap();
        assert!(store.quarantined_missing().unwrap().is_empty());
        assert_eq!(store.quarantined().unwrap(), HashSet::from([a]));
        assert_eq!(store.get(&a).unwrap(), b"a".repeat(5000));

        fs::remove_file(file_of(&dir, &b)).unwrap();
        assert!(!store.contains(&b).unwrap());
        let err = store.get(&b).unwrap_err().to_string();
        assert!(
            err.contains(&digest_hex(&b)) && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn delta_base_is_read_from_the_header() {
        let (_dir, store) = store();
        let base = store.insert(&b"base".repeat(4096)).unwrap().digest;
        let delta = Delta::new(
            base,
            4 * 4096,
            vec![crate::repo::Patch {
                offset: 3,
                data: b"xyz".to_vec(),
            }],
        )
        .unwrap();
        let id = store.insert_delta(&delta).unwrap().digest;
        store.flush().unwrap();
        assert_eq!(store.delta_base(&id).unwrap(), Some(base));
        assert_eq!(store.delta_base(&digest_of(b"none")).unwrap(), None);
    }

    #[test]
    fn concurrent_inserts_of_overlapping_data_store_every_chunk_once() {
        let (dir, store) = store();
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
        store.flush().unwrap();
        for (n, d) in &all {
            let expected = format!("chunk number {n} ").repeat(500);
            assert_eq!(store.get(d).unwrap(), expected.as_bytes());
        }
        let mut files = 0;
        for ab in fs::read_dir(dir.path().join("chunks")).unwrap() {
            for cd in fs::read_dir(ab.unwrap().path()).unwrap() {
                for f in fs::read_dir(cd.unwrap().path()).unwrap() {
                    let name = f.unwrap().file_name().into_string().unwrap();
                    assert!(!name.contains(".tmp-"), "{name}");
                    files += 1;
                }
            }
        }
        assert_eq!(files, 50);
    }
}
