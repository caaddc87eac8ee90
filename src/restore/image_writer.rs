//! Writing a restored raw image: sparse, and with direct I/O where the file
//! system takes it (`direct_io.rs` says why).
//!
//! The copy into the page cache was most of a restore's CPU
//! (docs/BENCHMARKS.md). So the image is written with `O_DIRECT` (as
//! `qemu-img convert -t none` does) through a [`DirectWriter`]: each run of
//! non-zero 4 KiB blocks is copied into one aligned buffer and written from
//! there; the disk's last partial block is padded and the file cut back to the
//! disk's size at [`ImageWriter::finish`]; a file system that refuses
//! `O_DIRECT` (when set, or on the first write) gets every write through the
//! page cache. Either way all-zero 4 KiB blocks are not written (the file is
//! sparse, its size set beforehand), and the caller fsyncs the file once at
//! the end.

use std::fs::File;

use crate::backup::disk::is_zero;
use crate::direct_io::{DirectWriter, BLOCK};

/// How an [`ImageWriter`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// `O_DIRECT` (partial last blocks padded, then cut back).
    Direct,
    /// Through the page cache.
    Buffered,
}

/// Writes slots of one raw image (module docs). One thread writes.
pub struct ImageWriter<'a> {
    out: DirectWriter<'a>,
}

impl<'a> ImageWriter<'a> {
    /// A writer for `file`, trying `O_DIRECT` when `want` is
    /// [`WriteMode::Direct`]; `buf` is its aligned staging memory (it grows to
    /// the longest run of non-zero blocks in a slot).
    pub fn new(file: &'a File, want: WriteMode, buf: &'a mut Vec<u8>) -> ImageWriter<'a> {
        ImageWriter {
            out: DirectWriter::new(file, want == WriteMode::Direct, buf, usize::MAX),
        }
    }

    /// How the writer writes now (it can fall back to the page cache on the
    /// first refused direct write).
    pub fn mode(&self) -> WriteMode {
        if self.out.is_direct() {
            WriteMode::Direct
        } else {
            WriteMode::Buffered
        }
    }

    /// Write `data` (a slot) at `offset`, a multiple of [`BLOCK`], skipping
    /// all-zero 4 KiB blocks. Returns the bytes written.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<usize> {
        let mut written = 0;
        for (start, end) in nonzero_runs(data) {
            self.out
                .write_at(offset + start as u64, &[&data[start..end]])?;
            written += end - start;
        }
        Ok(written)
    }

    /// Cut the image back to `size`, the disk's, where its last partial
    /// block was padded.
    pub fn finish(self, size: u64) -> std::io::Result<()> {
        self.out.finish(size)
    }
}

/// The `[start, end)` runs of `data` made of non-zero 4 KiB blocks (the last
/// block may be short).
fn nonzero_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let zero_at = |i: usize| is_zero(&data[i..(i + BLOCK).min(data.len())]);
    let mut runs = Vec::new();
    let mut i = 0;
    while i < data.len() {
        while i < data.len() && zero_at(i) {
            i += BLOCK;
        }
        let start = i;
        while i < data.len() && !zero_at(i) {
            i += BLOCK;
        }
        if i > start {
            runs.push((start, i.min(data.len())));
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A slot of `len` bytes: blocks 0-1 data, 2-3 zero, 4.. data; a short
    /// slot (under 4 blocks) has block 0 zero, the rest data. The last
    /// (possibly partial) block is data.
    fn slot(len: usize, seed: u8) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
            .collect();
        if len >= 4 * BLOCK {
            v[2 * BLOCK..4 * BLOCK].fill(0);
        } else {
            v[..BLOCK].fill(0);
        }
        v
    }

    fn write_image(dir: &std::path::Path, want: WriteMode) -> (Vec<u8>, WriteMode, u64) {
        // Three slots of 64 KiB and a short last one (not a block multiple).
        let slot_len = 64 << 10;
        let size = 3 * slot_len + 5000;
        let path = dir.join(format!("{want:?}.raw"));
        let file = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(size as u64).unwrap();
        let mut expect = vec![0u8; size];
        let mut buf = Vec::new();
        let mut w = ImageWriter::new(&file, want, &mut buf);
        // Out of order, as the restore's workers deliver them; slot 1 is all zero.
        for (n, len) in [(3, 5000), (0, slot_len), (2, slot_len), (1, slot_len)] {
            let data = if n == 1 {
                vec![0; len]
            } else {
                slot(len, n as u8)
            };
            let off = n * slot_len;
            let written = w.write(off as u64, &data).unwrap();
            let nonzero: usize = data
                .chunks(BLOCK)
                .filter(|b| !is_zero(b))
                .map(|b| b.len())
                .sum();
            assert_eq!(written, nonzero, "slot {n}");
            expect[off..off + len].copy_from_slice(&data);
        }
        let mode = w.mode();
        w.finish(size as u64).unwrap();
        file.sync_all().unwrap();
        drop(file);
        // Before reading it back: on ramfs a read fills the holes it crosses.
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), size);
        assert!(
            got == expect,
            "{want:?}: the image differs from the slots written"
        );
        (got, mode, allocated)
    }

    #[test]
    fn both_modes_write_the_same_sparse_image() {
        // The checkout's file system, where images are usually restored: not
        // the tmpfs of /tmp on some machines.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let (direct, mode, direct_alloc) = write_image(dir.path(), WriteMode::Direct);
        let (buffered, bmode, buffered_alloc) = write_image(dir.path(), WriteMode::Buffered);
        assert_eq!(bmode, WriteMode::Buffered);
        assert!(direct == buffered);
        // Holes where the zeros are: slot 1 (64 KiB) and 2 blocks in each data slot.
        let size = 3 * (64 << 10) + 5000;
        for alloc in [direct_alloc, buffered_alloc] {
            assert!(
                alloc <= size - (64 << 10),
                "not sparse: {alloc} bytes allocated"
            );
        }
        if crate::direct_io::takes_direct(dir.path()) {
            assert_eq!(
                mode,
                WriteMode::Direct,
                "O_DIRECT is accepted here but was not used"
            );
        } else {
            eprintln!("this file system refuses O_DIRECT: only the page-cache path ran");
        }
        // On ramfs, which refuses O_DIRECT, a writer asked for direct I/O
        // writes through the page cache: the same bytes, as sparse.
        let refusing = crate::direct_io::RefusingDir::new();
        let (fallback, fmode, fallback_alloc) = write_image(refusing.path(), WriteMode::Direct);
        assert_eq!(fmode, WriteMode::Buffered);
        assert!(fallback == buffered);
        assert!(
            fallback_alloc <= size - (64 << 10),
            "not sparse on ramfs: {fallback_alloc} bytes allocated"
        );
    }

    #[test]
    fn runs_cover_exactly_the_nonzero_blocks() {
        let mut data = vec![0u8; 10 * BLOCK + 100];
        assert!(nonzero_runs(&data).is_empty());
        data[BLOCK + 7] = 1; // block 1
        data[2 * BLOCK] = 1; // block 2: joins block 1
        data[6 * BLOCK + 4095] = 1; // block 6
        data[10 * BLOCK + 99] = 1; // the short last block
        assert_eq!(
            nonzero_runs(&data),
            vec![
                (BLOCK, 3 * BLOCK),
                (6 * BLOCK, 7 * BLOCK),
                (10 * BLOCK, 10 * BLOCK + 100)
            ]
        );
    }
}
