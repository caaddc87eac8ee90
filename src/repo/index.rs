//! The disk index: one complete map of a disk at one point, slot by slot.
//!
//! Slot `i` covers bytes `i * chunk_size .. min((i + 1) * chunk_size, disk_size)`;
//! the last slot may be short. A slot is either all zeros (not stored) or a chunk
//! digest. Every point's index is complete, whatever its level, so any point
//! restores from its own index alone.
//!
//! ```text
//! offset size    field
//!  0      8      magic "VMBINDX1"
//!  8      8      disk size in bytes, u64 little-endian
//! 16      4      chunk size in bytes, u32 little-endian
//! 20      4      reserved, zero
//! 24      8      slot count, u64 little-endian (= ceil(disk size / chunk size))
//! 32     32      checksum: BLAKE3(bytes 0..32 || entries)
//! 64     33*n    entries: kind u8 (0 zero, 1 chunk, 2 delta) + 32-byte digest or delta id
//!                (zeros for kind 0)
//! ```

use anyhow::{bail, Context, Result};

use super::chunk::Digest;
use super::format::{check_chunk_size, INDEX_MAGIC};

/// Length of the index header.
pub const INDEX_HEADER_LEN: usize = 64;
/// Length of one index entry.
pub const INDEX_ENTRY_LEN: usize = 33;

const KIND_ZERO: u8 = 0;
const KIND_CHUNK: u8 = 1;
const KIND_DELTA: u8 = 2;

/// One chunk-sized slot of a disk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Slot {
    /// Every byte is zero; nothing is stored.
    Zero,
    /// The slot's bytes are the chunk with this digest.
    Chunk(Digest),
    /// The slot's bytes are the delta object with this id applied to its base chunk.
    Delta(Digest),
}

/// A disk's content at one point, as chunk slots.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DiskIndex {
    pub disk_size: u64,
    pub chunk_size: u32,
    pub slots: Vec<Slot>,
}

impl DiskIndex {
    /// An index of an all-zero disk. Panics if `chunk_size` is 0.
    pub fn new_zero(disk_size: u64, chunk_size: u32) -> DiskIndex {
        DiskIndex {
            disk_size,
            chunk_size,
            slots: vec![Slot::Zero; slot_count(disk_size, chunk_size) as usize],
        }
    }

    /// The byte offset where slot `i` starts.
    pub fn slot_offset(&self, i: usize) -> u64 {
        i as u64 * u64::from(self.chunk_size)
    }

    /// The length of slot `i` in bytes (the chunk size, or less for the last slot).
    pub fn slot_len(&self, i: usize) -> usize {
        let remaining = self.disk_size.saturating_sub(self.slot_offset(i));
        remaining.min(u64::from(self.chunk_size)) as usize
    }

    /// Number of zero slots.
    pub fn zero_slots(&self) -> u64 {
        self.slots.iter().filter(|s| **s == Slot::Zero).count() as u64
    }

    /// Check that the index is self-consistent: a valid chunk size and as many
    /// slots as the disk size needs.
    pub fn check(&self) -> Result<()> {
        check_chunk_size(self.chunk_size)?;
        let expected = slot_count(self.disk_size, self.chunk_size);
        if self.slots.len() as u64 != expected {
            bail!(
                "index has {} slots, but a {}-byte disk in {}-byte chunks needs {expected}",
                self.slots.len(),
                self.disk_size,
                self.chunk_size
            );
        }
        Ok(())
    }

    /// The index object's bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.check()?;
        let mut bytes = Vec::with_capacity(INDEX_HEADER_LEN + self.slots.len() * INDEX_ENTRY_LEN);
        bytes.extend_from_slice(&INDEX_MAGIC);
        bytes.extend_from_slice(&self.disk_size.to_le_bytes());
        bytes.extend_from_slice(&self.chunk_size.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 4]);
        bytes.extend_from_slice(&(self.slots.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&[0u8; 32]); // checksum, filled in below
        for slot in &self.slots {
            match slot {
                Slot::Zero => {
                    bytes.push(KIND_ZERO);
                    bytes.extend_from_slice(&[0u8; 32]);
                }
                Slot::Chunk(digest) => {
                    bytes.push(KIND_CHUNK);
                    bytes.extend_from_slice(digest);
                }
                Slot::Delta(id) => {
                    bytes.push(KIND_DELTA);
                    bytes.extend_from_slice(id);
                }
            }
        }
        let checksum = checksum_of(&bytes);
        bytes[32..64].copy_from_slice(&checksum);
        Ok(bytes)
    }

    /// Decode an index object. The magic must already have been checked by the
    /// caller (who knows the path); everything else is checked here.
    pub fn decode(bytes: &[u8]) -> Result<DiskIndex> {
        if bytes.len() < INDEX_HEADER_LEN {
            bail!("truncated header ({} bytes)", bytes.len());
        }
        if bytes[..8] != INDEX_MAGIC {
            bail!("unknown object magic '{}'", bytes[..8].escape_ascii());
        }
        let disk_size = u64::from_le_bytes(field(bytes, 8));
        let chunk_size = u32::from_le_bytes(field(bytes, 16));
        let reserved: [u8; 4] = field(bytes, 20);
        let count = u64::from_le_bytes(field(bytes, 24));
        let stored_checksum: [u8; 32] = field(bytes, 32);
        let entries = &bytes[INDEX_HEADER_LEN..];
        let expected_len = count.checked_mul(INDEX_ENTRY_LEN as u64);
        if expected_len != Some(entries.len() as u64) {
            bail!(
                "torn or truncated: {} entry bytes for {count} slots",
                entries.len()
            );
        }
        if checksum_of(bytes) != stored_checksum {
            bail!("checksum mismatch: the index is corrupt");
        }
        if reserved != [0u8; 4] {
            bail!("reserved header bytes are not zero");
        }
        let slots = entries
            .chunks_exact(INDEX_ENTRY_LEN)
            .enumerate()
            .map(|(i, entry)| decode_entry(entry).with_context(|| format!("slot {i}")))
            .collect::<Result<Vec<Slot>>>()?;
        let index = DiskIndex {
            disk_size,
            chunk_size,
            slots,
        };
        index.check()?;
        Ok(index)
    }
}

fn slot_count(disk_size: u64, chunk_size: u32) -> u64 {
    disk_size.div_ceil(u64::from(chunk_size))
}

/// BLAKE3 over the header's first 32 bytes and all entries (the checksum field
/// itself, bytes 32..64, is skipped).
fn checksum_of(object: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&object[..32]);
    hasher.update(&object[INDEX_HEADER_LEN..]);
    *hasher.finalize().as_bytes()
}

fn decode_entry(entry: &[u8]) -> Result<Slot> {
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&entry[1..]);
    match entry[0] {
        KIND_ZERO if digest == [0u8; 32] => Ok(Slot::Zero),
        KIND_ZERO => bail!("zero slot with a non-zero digest"),
        KIND_CHUNK => Ok(Slot::Chunk(digest)),
        KIND_DELTA => Ok(Slot::Delta(digest)),
        other => bail!("unknown slot kind {other}"),
    }
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::chunk::digest_of;

    const CS: u32 = 64 * 1024;

    fn sample() -> DiskIndex {
        let mut index = DiskIndex::new_zero(3 * u64::from(CS) + 100, CS);
        index.slots[1] = Slot::Chunk(digest_of(b"one"));
        index.slots[3] = Slot::Chunk(digest_of(b"tail"));
        index
    }

    #[test]
    fn slots_cover_the_disk_and_the_last_one_is_short() {
        let index = sample();
        assert_eq!(index.slots.len(), 4);
        assert_eq!(index.slot_len(0), CS as usize);
        assert_eq!(index.slot_len(3), 100);
        assert_eq!(index.slot_offset(3), 3 * u64::from(CS));
        assert_eq!(DiskIndex::new_zero(2 * u64::from(CS), CS).slots.len(), 2);
        assert_eq!(DiskIndex::new_zero(0, CS).slots.len(), 0);
    }

    #[test]
    fn index_round_trips_with_zero_and_chunk_slots() {
        let index = sample();
        let bytes = index.encode().unwrap();
        assert_eq!(bytes.len(), INDEX_HEADER_LEN + 4 * INDEX_ENTRY_LEN);
        assert_eq!(&bytes[..8], b"VMBINDX1");
        let back = DiskIndex::decode(&bytes).unwrap();
        assert_eq!(back, index);
        assert_eq!(back.zero_slots(), 2);
    }

    #[test]
    fn torn_or_corrupt_indexes_are_detected() {
        let bytes = sample().encode().unwrap();
        let err = DiskIndex::decode(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(DiskIndex::decode(&bytes[..40]).is_err());
        for at in [8, 16, 20, 40, 64, 64 + INDEX_ENTRY_LEN + 5, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            assert!(
                DiskIndex::decode(&bad).is_err(),
                "flip at {at} not detected"
            );
        }
    }

    #[test]
    fn inconsistent_indexes_are_not_written() {
        let mut index = sample();
        index.slots.pop();
        assert!(index.encode().is_err());
        assert!(DiskIndex::new_zero(1 << 20, 4096).encode().is_err());
    }
}
