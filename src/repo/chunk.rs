//! The chunk object: one chunk's bytes, compressed or raw, behind a fixed header.
//!
//! ```text
//! offset size  field
//!  0      8    magic "VMBCHNK1"
//!  8      1    compression: 0 raw, 1 zstd
//!  9      3    reserved, zero
//! 12      4    uncompressed length, u32 little-endian
//! 16      4    payload length, u32 little-endian
//! 20      n    payload (n = payload length; the object ends here)
//! ```
//!
//! The chunk's id is the BLAKE3 digest of its uncompressed bytes, so a reader
//! verifies everything it decodes by re-hashing.

use anyhow::{bail, Context, Result};

use super::codec::{Codec, Compression};
use super::crypto::Naming;
use super::format::{CHUNK_MAGIC, MAX_CHUNK_SIZE};

/// A chunk's id: BLAKE3 of its uncompressed bytes.
pub type Digest = [u8; 32];

/// Length of the chunk object header.
pub const CHUNK_HEADER_LEN: usize = 20;

const COMPRESSION_RAW: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;

/// The lowercase hex form of a digest (64 characters), as used in chunk file names.
pub fn digest_hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse the 64-character lowercase hex form of a digest.
pub fn parse_digest_hex(text: &str) -> Option<Digest> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, out) in digest.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&bytes[2 * i..2 * i + 2]).ok()?;
        *out = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

/// The digest of `data`.
pub fn digest_of(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

/// A chunk object ready to be stored: its header, and a payload that borrows
/// either the content (raw) or the codec's output (zstd). Written as two parts,
/// so the content is never copied into an object buffer first.
pub struct EncodedChunk<'a> {
    header: [u8; CHUNK_HEADER_LEN],
    payload: &'a [u8],
}

impl EncodedChunk<'_> {
    /// The object's bytes, in order.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.header, self.payload]
    }

    /// The object's length in bytes.
    pub fn len(&self) -> usize {
        CHUNK_HEADER_LEN + self.payload.len()
    }

    /// The object as one buffer.
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts().concat()
    }
}

/// Encode `data` as a chunk object: zstd when `mode` allows it and that shrinks
/// it (checked by the codec: the payload decompresses to `data`), raw otherwise.
pub fn encode_chunk_with<'a>(
    codec: &'a mut Codec,
    data: &'a [u8],
    mode: Compression,
) -> Result<EncodedChunk<'a>> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&n| n <= MAX_CHUNK_SIZE)
        .with_context(|| format!("chunk of {} bytes exceeds the 32 MiB limit", data.len()))?;
    let (compression, payload) = match codec.compress(data, mode)? {
        Some(packed) => (COMPRESSION_ZSTD, packed),
        None => (COMPRESSION_RAW, data),
    };
    let payload_len = u32::try_from(payload.len()).context("chunk payload too large")?;
    let mut header = [0u8; CHUNK_HEADER_LEN];
    header[..8].copy_from_slice(&CHUNK_MAGIC);
    header[8] = compression;
    header[12..16].copy_from_slice(&len.to_le_bytes());
    header[16..20].copy_from_slice(&payload_len.to_le_bytes());
    Ok(EncodedChunk { header, payload })
}

/// [`encode_chunk_with`] this thread's codec, as one buffer.
#[cfg(test)]
pub fn encode_chunk(data: &[u8]) -> Result<Vec<u8>> {
    Codec::with(|c| Ok(encode_chunk_with(c, data, Compression::Zstd)?.to_vec()))
}

/// Decode a chunk object and check that its content hashes to `expected`.
/// Errors say what is wrong without naming the file; the caller adds that.
pub fn decode_chunk(object: &[u8], expected: &Digest) -> Result<Vec<u8>> {
    decode_chunk_named(object, expected, &Naming::Plain)
}

/// [`decode_chunk`] in a repository whose chunk ids are computed by `naming`.
pub fn decode_chunk_named(object: &[u8], expected: &Digest, naming: &Naming) -> Result<Vec<u8>> {
    if object.len() < CHUNK_HEADER_LEN {
        bail!("truncated header ({} bytes)", object.len());
    }
    if object[..8] != CHUNK_MAGIC {
        bail!(
            "unknown object magic '{}' (expected '{}')",
            object[..8].escape_ascii(),
            CHUNK_MAGIC.escape_ascii()
        );
    }
    let compression = object[8];
    if object[9..12] != [0u8; 3] {
        bail!("reserved header bytes are not zero");
    }
    let len = read_u32(object, 12);
    let payload_len = read_u32(object, 16);
    if len > MAX_CHUNK_SIZE {
        bail!("uncompressed length {len} exceeds the 32 MiB limit");
    }
    let payload = &object[CHUNK_HEADER_LEN..];
    if payload.len() != payload_len as usize {
        bail!(
            "payload is {} bytes, header says {payload_len}",
            payload.len()
        );
    }
    // Into a reused buffer (crate::buffers): no fresh 4 MiB per chunk.
    let mut data = crate::buffers::take(len as usize);
    match compression {
        COMPRESSION_RAW => data.extend_from_slice(payload),
        COMPRESSION_ZSTD => super::codec::decompress_into(payload, &mut data)?,
        other => bail!("unknown compression {other}"),
    }
    if data.len() != len as usize {
        bail!("content is {} bytes, header says {len}", data.len());
    }
    let actual = naming.chunk_id(&data);
    if &actual != expected {
        bail!("content hashes to {}", digest_hex(&actual));
    }
    Ok(data)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_chunks_are_stored_zstd_and_round_trip() {
        let data = b"abcd".repeat(16 * 1024);
        let object = encode_chunk(&data).unwrap();
        assert_eq!(object[8], COMPRESSION_ZSTD);
        assert!(object.len() < data.len() / 10);
        assert_eq!(decode_chunk(&object, &digest_of(&data)).unwrap(), data);
    }

    #[test]
    fn incompressible_chunks_are_stored_raw() {
        let mut data = vec![0u8; 64 * 1024];
        let mut x: u32 = 0x1234_5678;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let object = encode_chunk(&data).unwrap();
        assert_eq!(object[8], COMPRESSION_RAW);
        assert_eq!(object.len(), CHUNK_HEADER_LEN + data.len());
        assert_eq!(&object[CHUNK_HEADER_LEN..], &data[..]);
        assert_eq!(decode_chunk(&object, &digest_of(&data)).unwrap(), data);
    }

    #[test]
    fn damaged_objects_are_refused() {
        let data = b"hello world ".repeat(1000);
        let digest = digest_of(&data);
        let good = encode_chunk(&data).unwrap();

        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        assert!(decode_chunk(&flipped, &digest).is_err());

        assert!(decode_chunk(&good[..good.len() - 1], &digest).is_err());
        assert!(decode_chunk(&good[..10], &digest).is_err());

        let mut magic = good.clone();
        magic[7] = b'9';
        let err = decode_chunk(&magic, &digest).unwrap_err();
        assert!(err.to_string().contains("VMBCHNK9"), "{err}");

        let other = digest_of(b"other");
        let err = decode_chunk(&good, &other).unwrap_err();
        assert!(err.to_string().contains(&digest_hex(&digest)), "{err}");
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = digest_of(b"x");
        let hex = digest_hex(&d);
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_digest_hex(&hex), Some(d));
        assert_eq!(parse_digest_hex(&hex.to_uppercase()), None);
        assert_eq!(parse_digest_hex(&hex[1..]), None);
    }
}
