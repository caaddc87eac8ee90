//! The payload codec: how the bytes of a chunk or delta object are compressed,
//! and the check that makes a stored object decode to what was given (the one
//! place to add another codec or wrap objects, e.g. encryption).
//!
//! [`Codec::compress`] returns zstd level 1 output only when it is smaller than
//! its input and decompresses to exactly that input: every compressed payload
//! is decompressed again and compared before anything is stored (docs/FORMAT.md,
//! "What guarantees a chunk decodes to its digest"). A failed comparison is an
//! error, so a faulty compressor (or memory) fails the backup instead of storing
//! a chunk that would not decode to its digest. With system.conf
//! `compression = none` ([`Compression::None`]) every payload is left raw.
//!
//! It is made cheap three ways: a probe of a few small samples skips the full
//! compression of incompressible data (random bytes, encrypted or already
//! compressed files) and stores it raw; the zstd contexts, the output buffer and
//! the check's window are kept per thread and reused, so encoding allocates and
//! zeroes nothing per chunk; and the check decompresses into a small window that
//! stays in the CPU cache while it is compared, instead of a second chunk-sized
//! buffer.
//!
//! Reading is [`decompress_into`], with a zstd decompression context kept per
//! thread (a restore decodes thousands of chunks on a few threads).

use std::cell::RefCell;

use anyhow::{bail, Context, Result};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

/// zstd level of new payloads (fast; the big wins are dedup and zero slots).
const ZSTD_LEVEL: i32 = 1;
/// Bytes of each probe sample.
const PROBE_LEN: usize = 16 * 1024;
/// Samples probed, spread evenly over the payload.
const PROBES: usize = 4;
/// Payloads shorter than this are compressed without a probe.
const PROBE_MIN: usize = 4 * PROBES * PROBE_LEN;
/// A sample is compressible when zstd saves at least 1/32 of it.
const PROBE_GAIN_DIV: usize = 32;
/// Decompressed bytes compared per step of the check.
const CHECK_WINDOW: usize = 128 * 1024;

/// Tests only, like the test clock (`VMBACKUP_TEST_NOW`): when set, one byte of
/// every compressed payload is flipped after compression and before the check
/// (a compressor fault), so a test can see the check refuse to store it. Read
/// nowhere else.
const TEST_CORRUPT_COMPRESSOR: &str = "VMBACKUP_TEST_CORRUPT_COMPRESSOR";

/// How new payloads are stored (system.conf `compression`). Either way every
/// reader decodes both forms: the object header says which one it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// zstd level 1 where it shrinks the payload, checked to decode; raw
    /// otherwise (module docs).
    #[default]
    Zstd,
    /// Every payload raw: about half the CPU of a full backup, more bytes
    /// stored (for storage that compresses by itself, or fast disks and few
    /// cores).
    None,
}

impl Compression {
    /// Every value with its name in system.conf.
    pub const ALL: [(Compression, &'static str); 2] =
        [(Compression::Zstd, "zstd"), (Compression::None, "none")];

    /// The name in system.conf.
    pub fn as_str(self) -> &'static str {
        Compression::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map(|(_, name)| *name)
            .expect("every value is listed")
    }

    /// The value named `name`, if one is.
    pub fn parse(name: &str) -> Option<Compression> {
        Compression::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(c, _)| *c)
    }
}

/// Per-thread zstd state and buffers (module docs).
pub struct Codec {
    compressor: zstd::bulk::Compressor<'static>,
    checker: Decoder<'static>,
    out: Vec<u8>,
    window: Vec<u8>,
    /// Flip a byte of every compressed payload (the test fault).
    corrupt: bool,
}

thread_local! {
    static CODEC: RefCell<Option<Codec>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Append the decompression of the zstd `payload` to `out`, which has room for
/// its content (the header's length): at most that many bytes are written.
/// Uses this thread's decompression context (created on first use).
pub fn decompress_into(payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match &mut *slot {
            Some(d) => d,
            empty => empty.insert(
                zstd::bulk::Decompressor::new().context("cannot set up zstd decompression")?,
            ),
        };
        d.decompress_to_buffer(payload, out)
            .context("zstd payload does not decompress")?;
        Ok(())
    })
}

impl Codec {
    fn new() -> Result<Codec> {
        Ok(Codec {
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)
                .context("cannot set up zstd compression")?,
            checker: Decoder::new().context("cannot set up zstd decompression")?,
            out: Vec::new(),
            window: vec![0u8; CHECK_WINDOW],
            corrupt: std::env::var_os(TEST_CORRUPT_COMPRESSOR).is_some(),
        })
    }

    /// Run `f` with this thread's codec (created on first use).
    pub fn with<R>(f: impl FnOnce(&mut Codec) -> Result<R>) -> Result<R> {
        CODEC.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(Codec::new()?);
            }
            f(slot.as_mut().expect("just set"))
        })
    }

    /// `data` compressed with zstd and checked, or `None` when it is to be
    /// stored raw (`mode` is [`Compression::None`], the probe found it
    /// incompressible, or compression did not shrink it). An error when the
    /// compressed form does not decompress to `data`: nothing may be stored then.
    pub fn compress(&mut self, data: &[u8], mode: Compression) -> Result<Option<&[u8]>> {
        if mode == Compression::None || self.incompressible(data)? {
            return Ok(None);
        }
        let n = self.compress_into_out(data)?;
        if n >= data.len() {
            return Ok(None);
        }
        if self.corrupt {
            self.out[n / 2] ^= 0x20;
        }
        self.check(data)?;
        Ok(Some(&self.out))
    }

    /// True when every probe sample of a large `data` stays incompressible.
    fn incompressible(&mut self, data: &[u8]) -> Result<bool> {
        if data.len() < PROBE_MIN {
            return Ok(false);
        }
        let step = data.len() / PROBES;
        for i in 0..PROBES {
            let sample = &data[i * step..i * step + PROBE_LEN];
            let n = self.compress_into_out(sample)?;
            if n + PROBE_LEN / PROBE_GAIN_DIV <= PROBE_LEN {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Compress `data` into `self.out`; its length.
    fn compress_into_out(&mut self, data: &[u8]) -> Result<usize> {
        self.out.clear();
        self.out
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        self.compressor
            .compress_to_buffer(data, &mut self.out)
            .context("zstd compression failed")
    }

    /// Decompress `self.out` window by window and compare it with `data`.
    fn check(&mut self, data: &[u8]) -> Result<()> {
        const WHAT: &str = "zstd round trip of a new payload";
        self.checker
            .reinit()
            .context("cannot reset zstd decompression")?;
        let mut input = InBuffer::around(&self.out);
        let mut pos = 0;
        loop {
            let mut output = OutBuffer::around(&mut self.window[..]);
            let hint = self
                .checker
                .run(&mut input, &mut output)
                .with_context(|| format!("{WHAT} failed"))?;
            let got = output.as_slice();
            if got.len() > data.len() - pos || got != &data[pos..pos + got.len()] {
                bail!("{WHAT} returned different bytes");
            }
            pos += got.len();
            if hint == 0 {
                break;
            }
            if got.is_empty() && input.pos() == self.out.len() {
                bail!("{WHAT} ended early");
            }
        }
        if pos != data.len() || input.pos() != self.out.len() {
            bail!("{WHAT} returned {pos} of {} bytes", data.len());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, mut x: u32) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressible_payloads_round_trip_and_noise_is_left_raw() {
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(100_000);
        let small = b"abc".repeat(1000);
        Codec::with(|c| {
            let packed = c
                .compress(&text, Compression::Zstd)?
                .expect("text shrinks")
                .to_vec();
            assert!(packed.len() < text.len() / 10);
            assert_eq!(zstd::bulk::decompress(&packed, text.len())?, text);
            assert!(
                c.compress(&small, Compression::Zstd)?.is_some(),
                "small payloads skip the probe"
            );
            assert!(
                c.compress(&noise(4 << 20, 7), Compression::Zstd)?.is_none(),
                "probe says raw"
            );
            assert!(
                c.compress(&noise(1000, 7), Compression::Zstd)?.is_none(),
                "no gain, raw"
            );
            Ok(())
        })
        .unwrap();
    }

    /// `none` stores every payload raw, however well it compresses; the names
    /// round trip.
    #[test]
    fn compression_none_leaves_every_payload_raw() {
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(100_000);
        Codec::with(|c| {
            assert!(c.compress(&text, Compression::None)?.is_none());
            assert!(c.compress(&text, Compression::Zstd)?.is_some());
            Ok(())
        })
        .unwrap();
        for (mode, name) in Compression::ALL {
            assert_eq!(Compression::parse(name), Some(mode));
            assert_eq!(mode.as_str(), name);
        }
        assert_eq!(Compression::parse("lz4"), None);
        assert_eq!(Compression::default(), Compression::Zstd);
    }

    #[test]
    fn a_payload_half_noise_half_text_is_still_compressed() {
        let mut data = noise(2 << 20, 3);
        data.extend(b"lorem ipsum dolor sit amet ".repeat(80_000));
        data.truncate(4 << 20);
        Codec::with(|c| {
            assert!(c.compress(&data, Compression::Zstd)?.is_some());
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_corrupted_compressor_output_is_refused() {
        let text = b"some text that compresses well. ".repeat(50_000);
        let mut c = Codec::new().unwrap();
        c.corrupt = true;
        let err = c.compress(&text, Compression::Zstd).unwrap_err();
        assert!(
            format!("{err:#}").contains("zstd round trip of a new payload"),
            "{err:#}"
        );
        // The same codec works again once the fault is gone.
        c.corrupt = false;
        assert!(c.compress(&text, Compression::Zstd).unwrap().is_some());
    }
}
