//! Client-side encryption of a repository (docs/FORMAT.md, "Encryption").
//!
//! An encrypted repository has a random 32-byte master key, kept only wrapped
//! in key slots (`keys/<slot id>`, JSON): each slot wraps it with AES-256-GCM
//! under a key-encryption key derived from a key file (32 random bytes,
//! BLAKE3 keyed hash with the slot's salt) or from a passphrase (Argon2id,
//! memory-hard). Two subkeys come from the master key (BLAKE3 `derive_key`):
//! one encrypts every object, one names chunks and deltas (keyed BLAKE3), so
//! the store cannot tell which content is shared with anything it knows.
//!
//! [`Sealed`] is a [`Store`] view that encrypts on write and decrypts and
//! authenticates on read: `VMBCRYP1 || nonce (12) || ciphertext || tag (16)`,
//! with the object's key (relative to the repository) as associated data, so
//! an object moved to another name fails too. The config and the key slots
//! are the only objects stored in clear.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::chunk::Digest;
use super::store::{ObjectInfo, Store};

/// Magic of an encrypted object.
pub const SEALED_MAGIC: [u8; 8] = *b"VMBCRYP1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes an encrypted object has beyond its plaintext.
pub const SEALED_OVERHEAD: u64 = (SEALED_MAGIC.len() + NONCE_LEN + TAG_LEN) as u64;
/// The key prefix of key slots (stored in clear).
pub const KEYS_PREFIX: &str = "keys/";
/// The cipher an encrypted repository's config names.
pub const CIPHER: &str = "aes-256-gcm";

const CONTEXT_OBJECTS: &str = "vmbackup 2026-12 repository object encryption v1";
const CONTEXT_NAMES: &str = "vmbackup 2026-12 repository object names v1";
const CONTEXT_ID: &str = "vmbackup 2026-12 repository key id v1";
const SLOT_AAD: &[u8] = b"vmbackup key slot v1";

/// Argon2id cost of new passphrase slots: 64 MiB, 3 passes, 1 lane.
const ARGON2_MEMORY_KIB: u32 = 64 * 1024;
const ARGON2_ITERATIONS: u32 = 3;
const ARGON2_LANES: u32 = 1;

/// Where a target's key comes from (recorded in the state store; never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// A key file: 64 hex digits (`vmbackup key generate`).
    KeyFile(PathBuf),
    /// A file holding a passphrase (its first line).
    PassphraseFile(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::KeyFile(p) => write!(f, "key file {}", p.display()),
            KeySource::PassphraseFile(p) => write!(f, "passphrase file {}", p.display()),
        }
    }
}

/// What a key source holds, read from its file.
enum Credential {
    Key([u8; 32]),
    Passphrase(Vec<u8>),
}

impl KeySource {
    fn read(&self) -> Result<Credential> {
        match self {
            KeySource::KeyFile(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read key file {}", path.display()))?;
                parse_key(text.trim())
                    .map(Credential::Key)
                    .with_context(|| format!("key file {} is not 64 hex digits", path.display()))
            }
            KeySource::PassphraseFile(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read passphrase file {}", path.display()))?;
                let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.is_empty() {
                    bail!("passphrase file {} is empty", path.display());
                }
                Ok(Credential::Passphrase(line.to_vec()))
            }
        }
    }

    /// Check that the file can be read and holds a key or a passphrase.
    pub fn check(&self) -> Result<()> {
        self.read().map(|_| ())
    }
}

fn parse_key(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 || !bytes.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, out) in key.iter_mut().enumerate() {
        *out = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    OsRng.fill_bytes(&mut b);
    b
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    if text.len() % 2 != 0 {
        bail!("odd number of hex digits");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|e| anyhow!("{e}")))
        .collect()
}

/// Write a new key file: 32 random bytes as 64 hex digits and a newline,
/// created exclusively (never over an existing file or through a link), 0600.
pub fn generate_key_file(path: &Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .with_context(|| format!("cannot create key file {}", path.display()))?;
    writeln!(f, "{}", hex(&random::<32>()))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write key file {}", path.display()))
}

/// How a slot's key-encryption key is derived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "kebab-case")]
pub enum Kdf {
    /// `BLAKE3-keyed(key file bytes, "vmbackup key slot v1" || salt)`.
    Blake3Keyed,
    /// Argon2id (v0x13) of the passphrase with the salt.
    Argon2id {
        memory_kib: u32,
        iterations: u32,
        lanes: u32,
    },
}

/// One key slot: the master key, wrapped (docs/FORMAT.md, "Key slots").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySlot {
    pub format: u32,
    pub id: String,
    pub kdf: Kdf,
    /// Hex, 16 bytes.
    pub salt: String,
    /// Hex, 12 bytes.
    pub nonce: String,
    /// Hex, 48 bytes: the master key encrypted (AES-256-GCM) with its tag.
    pub wrapped_key: String,
    pub created: String,
    pub host: String,
}

fn kek(kdf: &Kdf, salt: &[u8], cred: &Credential) -> Result<Option<[u8; 32]>> {
    match (kdf, cred) {
        (Kdf::Blake3Keyed, Credential::Key(key)) => {
            let mut h = blake3::Hasher::new_keyed(key);
            h.update(SLOT_AAD);
            h.update(salt);
            Ok(Some(*h.finalize().as_bytes()))
        }
        (
            Kdf::Argon2id {
                memory_kib,
                iterations,
                lanes,
            },
            Credential::Passphrase(p),
        ) => {
            let params = argon2::Params::new(*memory_kib, *iterations, *lanes, Some(32))
                .map_err(|e| anyhow!("argon2 parameters: {e}"))?;
            let argon =
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            let mut out = [0u8; 32];
            argon
                .hash_password_into(p, salt, &mut out)
                .map_err(|e| anyhow!("argon2: {e}"))?;
            Ok(Some(out))
        }
        // A key file never opens a passphrase slot, and the other way round.
        _ => Ok(None),
    }
}

impl KeySlot {
    /// Wrap `master` with the credential `source` names.
    fn new(master: &[u8; 32], source: &KeySource) -> Result<KeySlot> {
        let cred = source.read()?;
        let kdf = match cred {
            Credential::Key(_) => Kdf::Blake3Keyed,
            Credential::Passphrase(_) => Kdf::Argon2id {
                memory_kib: ARGON2_MEMORY_KIB,
                iterations: ARGON2_ITERATIONS,
                lanes: ARGON2_LANES,
            },
        };
        let salt = random::<16>();
        let nonce = random::<NONCE_LEN>();
        let kek = kek(&kdf, &salt, &cred)?.expect("the kdf matches the credential");
        let wrapped = Aes256Gcm::new_from_slice(&kek)
            .expect("32-byte key")
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: master,
                    aad: SLOT_AAD,
                },
            )
            .map_err(|_| anyhow!("cannot wrap the master key"))?;
        Ok(KeySlot {
            format: 1,
            id: hex(&random::<8>()),
            kdf,
            salt: hex(&salt),
            nonce: hex(&nonce),
            wrapped_key: hex(&wrapped),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            host: rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
        })
    }

    /// The master key, when `cred` opens this slot.
    fn open(&self, cred: &Credential) -> Result<Option<[u8; 32]>> {
        let salt = unhex(&self.salt)?;
        let nonce = unhex(&self.nonce)?;
        if nonce.len() != NONCE_LEN {
            bail!("key slot {}: bad nonce", self.id);
        }
        let Some(kek) = kek(&self.kdf, &salt, cred)? else {
            return Ok(None);
        };
        let wrapped = unhex(&self.wrapped_key)?;
        let opened = Aes256Gcm::new_from_slice(&kek)
            .expect("32-byte key")
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &wrapped,
                    aad: SLOT_AAD,
                },
            );
        Ok(opened.ok().and_then(|m| m.try_into().ok()))
    }

    pub fn key(&self) -> String {
        format!("{KEYS_PREFIX}{}", self.id)
    }

    /// True when `source` opens this slot.
    pub fn opens(&self, source: &KeySource) -> Result<bool> {
        Ok(self.open(&source.read()?)?.is_some())
    }

    /// `key-file` or `passphrase`.
    pub fn kind(&self) -> &'static str {
        match self.kdf {
            Kdf::Blake3Keyed => "key-file",
            Kdf::Argon2id { .. } => "passphrase",
        }
    }
}

/// A repository's master key and what derives from it.
pub struct MasterKey {
    cipher: Aes256Gcm,
    names: [u8; 32],
    id: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    fn from_bytes(master: &[u8; 32]) -> MasterKey {
        let objects = blake3::derive_key(CONTEXT_OBJECTS, master);
        MasterKey {
            cipher: Aes256Gcm::new_from_slice(&objects).expect("32-byte key"),
            names: blake3::derive_key(CONTEXT_NAMES, master),
            id: hex(&blake3::derive_key(CONTEXT_ID, master)[..8]),
        }
    }

    /// The key id the repository config records (16 hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key that names chunks and deltas (keyed BLAKE3).
    pub fn name_key(&self) -> [u8; 32] {
        self.names
    }

    fn seal(&self, key: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let nonce = random::<NONCE_LEN>();
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: key.as_bytes(),
                },
            )
            .map_err(|_| anyhow!("cannot encrypt {key}"))?;
        let mut out = Vec::with_capacity(ct.len() + 20);
        out.extend_from_slice(&SEALED_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn open(&self, key: &str, object: &[u8]) -> Result<Vec<u8>, Unauthentic> {
        let bad = || Unauthentic {
            key: key.to_string(),
        };
        if object.len() < SEALED_OVERHEAD as usize || object[..8] != SEALED_MAGIC {
            return Err(bad());
        }
        self.cipher
            .decrypt(
                Nonce::from_slice(&object[8..8 + NONCE_LEN]),
                Payload {
                    msg: &object[8 + NONCE_LEN..],
                    aad: key.as_bytes(),
                },
            )
            .map_err(|_| bad())
    }
}

/// An encrypted object that does not authenticate: tampered with, damaged,
/// or moved from another name.
#[derive(Debug, thiserror::Error)]
#[error("object {key} fails authentication (damaged or tampered with)")]
pub struct Unauthentic {
    pub key: String,
}

/// The key slots of a store (a repository's raw view).
pub fn read_slots(raw: &dyn Store) -> Result<Vec<KeySlot>> {
    let mut keys = Vec::new();
    raw.list(KEYS_PREFIX, &mut |i| {
        keys.push(i.key);
        Ok(())
    })?;
    let mut slots = Vec::new();
    for key in keys {
        let Some(bytes) = raw.get(&key)? else {
            continue;
        };
        let slot: KeySlot = serde_json::from_slice(&bytes)
            .with_context(|| format!("cannot parse key slot {key}"))?;
        slots.push(slot);
    }
    Ok(slots)
}

/// Create a master key and its first slot (written to `raw` now).
pub fn create_master(raw: &dyn Store, source: &KeySource) -> Result<MasterKey> {
    let master = random::<32>();
    let slot = KeySlot::new(&master, source)?;
    raw.put_if_absent(&slot.key(), &serde_json::to_vec_pretty(&slot)?)?;
    Ok(MasterKey::from_bytes(&master))
}

/// Open the master key whose id is `key_id` with `source`. "Wrong key" names
/// the source and how many slots it tried.
pub fn unlock(raw: &dyn Store, source: &KeySource, key_id: &str) -> Result<MasterKey> {
    let slots = read_slots(raw)?;
    let cred = source.read()?;
    for slot in &slots {
        if let Some(master) = slot.open(&cred)? {
            let key = MasterKey::from_bytes(&master);
            if key.id() == key_id {
                return Ok(key);
            }
        }
    }
    bail!(
        "wrong key: {source} opens none of the {} key slot(s) of {} (key id {key_id})",
        slots.len(),
        raw.location()
    )
}

/// Add a slot for `new` to the repository whose master key `key` is.
pub fn add_slot(
    raw: &dyn Store,
    key_source: &KeySource,
    key_id: &str,
    new: &KeySource,
) -> Result<String> {
    let slots = read_slots(raw)?;
    let cred = key_source.read()?;
    for slot in &slots {
        if let Some(master) = slot.open(&cred)? {
            if MasterKey::from_bytes(&master).id() == key_id {
                let added = KeySlot::new(&master, new)?;
                raw.put_if_absent(&added.key(), &serde_json::to_vec_pretty(&added)?)?;
                return Ok(added.id);
            }
        }
    }
    bail!(
        "wrong key: {key_source} opens no key slot of {}",
        raw.location()
    )
}

/// A store view that encrypts every object except the config and key slots
/// (module docs). Keys are relative to the repository.
#[derive(Debug)]
pub struct Sealed {
    inner: Arc<dyn Store>,
    key: Arc<MasterKey>,
}

impl Sealed {
    pub fn new(inner: Arc<dyn Store>, key: Arc<MasterKey>) -> Sealed {
        Sealed { inner, key }
    }
}

fn in_clear(key: &str) -> bool {
    key == super::CONFIG_FILE || key.starts_with(KEYS_PREFIX)
}

impl Store for Sealed {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.inner.get(key)? {
            Some(b) if !in_clear(key) => Ok(Some(self.key.open(key, &b)?)),
            other => Ok(other),
        }
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Option<Vec<u8>>> {
        if in_clear(key) {
            return self.inner.get_range(key, offset, len);
        }
        // AEAD authenticates whole objects: read, open, then slice.
        Ok(self.get(key)?.map(|b| {
            let start = (offset as usize).min(b.len());
            let end = start.saturating_add(len as usize).min(b.len());
            b[start..end].to_vec()
        }))
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        if in_clear(key) {
            return self.inner.put_if_absent(key, bytes);
        }
        self.inner.put_if_absent(key, &self.key.seal(key, bytes)?)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        if in_clear(key) {
            return self.inner.put(key, bytes);
        }
        self.inner.put(key, &self.key.seal(key, bytes)?)
    }
    fn put_if_absent_deferred(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        if in_clear(key) {
            return self.inner.put_if_absent_deferred(key, bytes);
        }
        let sealed = self.key.seal(key, &bytes)?;
        self.inner.put_if_absent_deferred(key, sealed)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectInfo) -> Result<()>) -> Result<()> {
        self.inner.list(prefix, &mut |mut info| {
            if !in_clear(&info.key) {
                info.size = info.size.saturating_sub(SEALED_OVERHEAD);
            }
            each(info)
        })
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }
    fn remove_stale_partials(&self, prefix: &str, min_age: Duration) -> Result<Vec<String>> {
        self.inner.remove_stale_partials(prefix, min_age)
    }
}

/// How chunk and delta ids are computed: BLAKE3 of the content, or, in an
/// encrypted repository, BLAKE3 keyed with the master key's name key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Plain,
    Keyed([u8; 32]),
}

impl Naming {
    /// A hasher for an id.
    pub fn hasher(&self) -> blake3::Hasher {
        match self {
            Naming::Plain => blake3::Hasher::new(),
            Naming::Keyed(k) => blake3::Hasher::new_keyed(k),
        }
    }

    /// The id of a chunk's content.
    pub fn chunk_id(&self, data: &[u8]) -> Digest {
        let mut h = self.hasher();
        h.update(data);
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::store::LocalStore;

    #[test]
    fn slots_open_with_their_key_only_and_objects_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let keyfile = dir.path().join("k");
        generate_key_file(&keyfile).unwrap();
        assert!(generate_key_file(&keyfile).is_err(), "never over a file");
        let mode = std::fs::metadata(&keyfile).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let other = dir.path().join("k2");
        generate_key_file(&other).unwrap();
        let pass = dir.path().join("p");
        std::fs::write(&pass, "correct horse\n").unwrap();

        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        let raw: Arc<dyn Store> = Arc::new(LocalStore::open(&repo).unwrap());
        let source = KeySource::KeyFile(keyfile.clone());
        let master = create_master(raw.as_ref(), &source).unwrap();
        let id = master.id().to_string();
        assert_eq!(unlock(raw.as_ref(), &source, &id).unwrap().id(), id);
        let err = unlock(raw.as_ref(), &KeySource::KeyFile(other.clone()), &id)
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrong key"), "{err}");
        add_slot(
            raw.as_ref(),
            &source,
            &id,
            &KeySource::PassphraseFile(pass.clone()),
        )
        .unwrap();
        assert_eq!(
            unlock(raw.as_ref(), &KeySource::PassphraseFile(pass), &id)
                .unwrap()
                .id(),
            id
        );

        let sealed = Sealed::new(raw.clone(), Arc::new(master));
        sealed.put("vms/a/manifest.json", b"secret text").unwrap();
        let stored = raw.get("vms/a/manifest.json").unwrap().unwrap();
        assert_eq!(&stored[..8], b"VMBCRYP1");
        assert!(!stored.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            sealed.get("vms/a/manifest.json").unwrap().unwrap(),
            b"secret text"
        );
        assert_eq!(
            sealed
                .get_range("vms/a/manifest.json", 7, 100)
                .unwrap()
                .unwrap(),
            b"text"
        );
        // Moved to another name, or one bit flipped: refused.
        raw.put("vms/b/manifest.json", &stored).unwrap();
        assert!(sealed.get("vms/b/manifest.json").is_err());
        let mut bad = stored.clone();
        bad[30] ^= 1;
        raw.put("vms/a/manifest.json", &bad).unwrap();
        let err = sealed.get("vms/a/manifest.json").unwrap_err();
        assert!(err.downcast_ref::<Unauthentic>().is_some(), "{err}");
        assert_ne!(
            Naming::Keyed([1; 32]).chunk_id(b"x"),
            Naming::Plain.chunk_id(b"x")
        );
    }
}
