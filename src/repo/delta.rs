//! The delta object: a slot's bytes as a base chunk plus patches.
//!
//! An incremental or differential that changes only part of a slot stores the
//! changed bytes as a delta against the base point's chunk instead of a new
//! chunk, so its cost follows the changed bytes, not the chunk size (R7). A
//! delta's base is always a chunk, never another delta: a slot changed again is
//! stored as one new delta holding the old and the new patches (newer bytes win),
//! and once the patches would cover more than half the slot a full chunk is
//! written instead. So reading a slot takes at most two objects.
//!
//! ```text
//! offset  size  field
//!  0       8    magic "VMBDLTA1"
//!  8      32    base chunk digest
//! 40       4    content length (the slot's length), u32 little-endian
//! 44       4    patch count n, u32 little-endian
//! 48       1    compression of the patch bytes: 0 raw, 1 zstd
//! 49       3    reserved, zero
//! 52       4    patch bytes, uncompressed length, u32 little-endian
//! 56       4    payload length, u32 little-endian
//! 60      8n    patch table: n × (offset u32, length u32), ascending,
//!               non-overlapping, non-empty, inside the content length
//! 60+8n    …    payload: the patch bytes in table order (zstd or raw)
//! ```
//!
//! The delta's id is `BLAKE3("vmbackup delta v1" || base || content length || n
//! || table || patch bytes)` over the uncompressed fields, so a reader verifies a
//! delta by re-hashing it, and its base like any chunk.

use anyhow::{bail, Context, Result};

use super::chunk::{digest_hex, Digest};
use super::codec::{Codec, Compression};
use super::crypto::Naming;
use super::format::{DELTA_MAGIC, MAX_CHUNK_SIZE};

/// Length of the fixed part of the delta header.
pub const DELTA_HEADER_LEN: usize = 60;
/// Offset of the base chunk's digest in a delta object (after the magic).
pub const BASE_OFFSET: usize = 8;
const DOMAIN: &[u8] = b"vmbackup delta v1";

/// Changed bytes at an offset of the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub offset: u32,
    pub data: Vec<u8>,
}

impl Patch {
    /// Where the patch ends. Patches are checked to end inside their slot, so this
    /// fits a u32; `u64` keeps an unchecked one (a decoded table) from overflowing.
    fn end(&self) -> u64 {
        u64::from(self.offset) + self.data.len() as u64
    }
}

/// A slot's content: `base` with `patches` applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub base: Digest,
    pub len: u32,
    pub patches: Vec<Patch>,
}

impl Delta {
    /// A delta of `base` (a slot of `len` bytes) with `patches` in any order;
    /// overlapping patches are resolved in favour of the later one.
    pub fn new(base: Digest, len: u32, patches: Vec<Patch>) -> Result<Delta> {
        let d = Delta {
            base,
            len,
            patches: merge(Vec::new(), patches),
        };
        d.check()?;
        Ok(d)
    }

    /// This delta with `newer` patches laid over its own (same base).
    pub fn updated(self, newer: Vec<Patch>) -> Result<Delta> {
        let d = Delta {
            base: self.base,
            len: self.len,
            patches: merge(self.patches, newer),
        };
        d.check()?;
        Ok(d)
    }

    /// Total patch bytes.
    pub fn patch_bytes(&self) -> u64 {
        self.patches.iter().map(|p| p.data.len() as u64).sum()
    }

    /// The delta's id.
    pub fn id(&self) -> Digest {
        self.id_with(&Naming::Plain)
    }

    /// The delta's id in a repository whose ids are computed by `naming`.
    pub fn id_with(&self, naming: &Naming) -> Digest {
        let mut h = naming.hasher();
        h.update(DOMAIN);
        h.update(&self.base);
        h.update(&self.len.to_le_bytes());
        h.update(&(self.patches.len() as u32).to_le_bytes());
        for p in &self.patches {
            h.update(&p.offset.to_le_bytes());
            h.update(&(p.data.len() as u32).to_le_bytes());
        }
        for p in &self.patches {
            h.update(&p.data);
        }
        *h.finalize().as_bytes()
    }

    /// Apply the patches to the base chunk's bytes.
    pub fn apply(&self, base: &mut [u8]) -> Result<()> {
        if base.len() != self.len as usize {
            bail!(
                "base chunk {} has {} bytes, the delta expects {}",
                digest_hex(&self.base),
                base.len(),
                self.len
            );
        }
        for p in &self.patches {
            base[p.offset as usize..p.end() as usize].copy_from_slice(&p.data);
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        if self.len == 0 || self.len > MAX_CHUNK_SIZE {
            bail!("delta content length {} is out of range", self.len);
        }
        let mut prev_end = 0u64;
        for (i, p) in self.patches.iter().enumerate() {
            if p.data.is_empty()
                || (i > 0 && u64::from(p.offset) < prev_end)
                || p.end() > u64::from(self.len)
            {
                bail!("delta patch {i} (offset {}, {} bytes) is empty, overlapping or outside the slot", p.offset, p.data.len());
            }
            prev_end = p.end();
        }
        Ok(())
    }
}

/// `older` then `newer` laid over it: ascending, non-overlapping patches, where
/// bytes of `newer` win and touching patches are joined.
fn merge(older: Vec<Patch>, newer: Vec<Patch>) -> Vec<Patch> {
    let mut all: Vec<(u64, u64)> = older
        .iter()
        .chain(&newer)
        .filter(|p| !p.data.is_empty())
        .map(|p| (u64::from(p.offset), p.end()))
        .collect();
    all.sort_unstable();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (a, b) in all {
        match ranges.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => ranges.push((a, b)),
        }
    }
    ranges
        .into_iter()
        .map(|(a, b)| {
            let mut data = vec![0u8; (b - a) as usize];
            for p in older.iter().chain(&newer) {
                let start = u64::from(p.offset);
                let (s, e) = (start.max(a), p.end().min(b));
                if s < e {
                    data[(s - a) as usize..(e - a) as usize]
                        .copy_from_slice(&p.data[(s - start) as usize..(e - start) as usize]);
                }
            }
            // `a` is some patch's offset, a u32.
            Patch {
                offset: a as u32,
                data,
            }
        })
        .collect()
}

/// Encode a delta object; its payload goes through the codec (compressed only
/// when `mode` allows it and that shrinks it, and then checked), like a chunk's.
pub fn encode_delta(d: &Delta, mode: Compression) -> Result<Vec<u8>> {
    d.check()?;
    let mut bytes = Vec::with_capacity(d.patch_bytes() as usize);
    for p in &d.patches {
        bytes.extend_from_slice(&p.data);
    }
    let raw_len = u32::try_from(bytes.len()).context("delta too large")?;
    Codec::with(|codec| {
        let (compression, payload) = match codec.compress(&bytes, mode)? {
            Some(packed) => (1u8, packed),
            None => (0u8, &bytes[..]),
        };
        let mut out = Vec::with_capacity(DELTA_HEADER_LEN + 8 * d.patches.len() + payload.len());
        out.extend_from_slice(&DELTA_MAGIC);
        out.extend_from_slice(&d.base);
        out.extend_from_slice(&d.len.to_le_bytes());
        out.extend_from_slice(&(d.patches.len() as u32).to_le_bytes());
        out.push(compression);
        out.extend_from_slice(&[0u8; 3]);
        out.extend_from_slice(&raw_len.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        for p in &d.patches {
            out.extend_from_slice(&p.offset.to_le_bytes());
            out.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(payload);
        Ok(out)
    })
}

/// Decode a delta object and check that it hashes to `expected`.
pub fn decode_delta(object: &[u8], expected: &Digest) -> Result<Delta> {
    decode_delta_named(object, expected, &Naming::Plain)
}

/// [`decode_delta`] in a repository whose ids are computed by `naming`.
pub fn decode_delta_named(object: &[u8], expected: &Digest, naming: &Naming) -> Result<Delta> {
    if object.len() < DELTA_HEADER_LEN {
        bail!("truncated delta header ({} bytes)", object.len());
    }
    if object[..8] != DELTA_MAGIC {
        bail!(
            "unknown object magic '{}' (expected '{}')",
            object[..8].escape_ascii(),
            DELTA_MAGIC.escape_ascii()
        );
    }
    let mut base = [0u8; 32];
    base.copy_from_slice(&object[8..40]);
    let len = u32_at(object, 40);
    let n = u32_at(object, 44) as usize;
    let compression = object[48];
    if object[49..52] != [0u8; 3] {
        bail!("reserved delta header bytes are not zero");
    }
    let raw_len = u32_at(object, 52) as usize;
    let payload_len = u32_at(object, 56) as usize;
    let table_end = DELTA_HEADER_LEN
        .checked_add(n.checked_mul(8).context("bad patch count")?)
        .context("bad patch count")?;
    if object.len() != table_end.saturating_add(payload_len) || raw_len > MAX_CHUNK_SIZE as usize {
        bail!(
            "delta object is {} bytes, its header says {}",
            object.len(),
            table_end.saturating_add(payload_len)
        );
    }
    let payload = &object[table_end..];
    let bytes = match compression {
        0 => payload.to_vec(),
        1 => {
            let mut bytes = Vec::with_capacity(raw_len);
            super::codec::decompress_into(payload, &mut bytes)?;
            bytes
        }
        other => bail!("unknown compression {other}"),
    };
    if bytes.len() != raw_len {
        bail!(
            "patch bytes are {} long, the header says {raw_len}",
            bytes.len()
        );
    }
    let mut patches = Vec::with_capacity(n);
    let mut at = 0usize;
    for i in 0..n {
        let offset = u32_at(object, DELTA_HEADER_LEN + 8 * i);
        let plen = u32_at(object, DELTA_HEADER_LEN + 8 * i + 4) as usize;
        let data = bytes
            .get(at..at + plen)
            .context("patch table runs past the patch bytes")?
            .to_vec();
        at += plen;
        patches.push(Patch { offset, data });
    }
    if at != bytes.len() {
        bail!("patch table covers {at} of {} patch bytes", bytes.len());
    }
    let d = Delta { base, len, patches };
    d.check()?;
    let actual = d.id_with(naming);
    if &actual != expected {
        bail!("delta hashes to {}", digest_hex(&actual));
    }
    Ok(d)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut f = [0u8; 4];
    f.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::chunk::digest_of;

    fn p(offset: u32, byte: u8, n: usize) -> Patch {
        Patch {
            offset,
            data: vec![byte; n],
        }
    }

    #[test]
    fn round_trip_and_apply() {
        let base = vec![7u8; 1000];
        let d = Delta::new(digest_of(&base), 1000, vec![p(900, 1, 100), p(0, 2, 10)]).unwrap();
        let obj = encode_delta(&d, Compression::Zstd).unwrap();
        let back = decode_delta(&obj, &d.id()).unwrap();
        assert_eq!(back, d);
        let mut content = base.clone();
        back.apply(&mut content).unwrap();
        assert_eq!(&content[..10], &[2u8; 10]);
        assert_eq!(&content[10..900], &[7u8; 890][..]);
        assert_eq!(&content[900..], &[1u8; 100]);
    }

    #[test]
    fn newer_patches_win_and_touching_ones_join() {
        let d = Delta::new([1; 32], 100, vec![p(10, 1, 20)]).unwrap();
        let d = d.updated(vec![p(20, 2, 20), p(40, 3, 5)]).unwrap();
        assert_eq!(d.patches.len(), 1);
        let q = &d.patches[0];
        assert_eq!((q.offset, q.data.len()), (10, 35));
        assert_eq!(&q.data[..10], &[1u8; 10]);
        assert_eq!(&q.data[10..30], &[2u8; 20]);
        assert_eq!(&q.data[30..], &[3u8; 5]);
        assert_eq!(d.patch_bytes(), 35);
    }

    #[test]
    fn damage_and_bad_patches_are_refused() {
        let d = Delta::new([9; 32], 64, vec![p(8, 5, 8)]).unwrap();
        let obj = encode_delta(&d, Compression::Zstd).unwrap();
        let mut bad = obj.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_delta(&bad, &d.id()).is_err());
        assert!(decode_delta(&obj[..obj.len() - 1], &d.id()).is_err());
        assert!(decode_delta(&obj, &[0; 32]).is_err());
        assert!(
            Delta::new([9; 32], 64, vec![p(60, 1, 8)]).is_err(),
            "patch past the end"
        );
        let mut wrong_base = vec![0u8; 63];
        assert!(d.apply(&mut wrong_base).is_err());
    }
}
