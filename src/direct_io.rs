//! Direct I/O (`O_DIRECT`): writing files that will not be read back soon
//! without copying them into the page cache.
//!
//! A backup's chunk objects and a restore's images are written once and not
//! read again by this process; through the page cache each byte costs a copy
//! into freshly allocated cache pages and, on a hypervisor host, pushes out the
//! running VMs' cached data (Veeam writes its backup files unbuffered, and
//! `qemu-img convert -t none` is the usual advice for large copies). Direct I/O
//! needs offsets, lengths and memory aligned to the device's logical block:
//! [`BLOCK`] (4 KiB) covers 512- and 4096-byte sectors. Some file systems refuse
//! `O_DIRECT` (when set, or on the first write); the callers then write through
//! the page cache, the same bytes.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

/// Alignment of direct I/O offsets, lengths and memory.
pub const BLOCK: usize = 4096;

/// Set or clear `O_DIRECT` on `file` (its open file description).
pub fn set_direct(file: &File, on: bool) -> std::io::Result<()> {
    let flags = fcntl_getfl(file)?;
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    fcntl_setfl(file, flags).map_err(std::io::Error::from)
}

/// True for the error a file system gives for a direct write it cannot do.
pub fn is_refused(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::InvalidInput
}

/// The [`BLOCK`]-aligned part of `buf`, `len` rounded up to a block long (`buf`
/// grows when needed and is meant to be kept for the next call).
pub fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let len = len.next_multiple_of(BLOCK);
    if buf.len() < len + BLOCK {
        *buf = vec![0; len + BLOCK];
    }
    let skip = buf.as_ptr().align_offset(BLOCK);
    &mut buf[skip..skip + len]
}

/// Writes ranges of one file with `O_DIRECT` where its file system takes it,
/// through the page cache where it does not: the one mechanism behind chunk
/// objects ([`write_file`]) and restored images (`restore::image_writer`).
///
/// Data is copied into an aligned buffer in pieces and written from there; a
/// range that ends inside a block is padded with zeros to the block's end, so
/// [`DirectWriter::finish`] cuts the file back to its length. A file system
/// that refuses `O_DIRECT` when it is set gets every write through the page
/// cache; one that refuses the first direct write gets that write and every
/// later one through the page cache (the same bytes either way).
pub struct DirectWriter<'a> {
    file: &'a File,
    direct: bool,
    /// Aligned staging memory, kept by the caller across writers.
    buf: &'a mut Vec<u8>,
    /// The most bytes copied and written at once.
    piece: usize,
    /// The end of the furthest padded write, to cut back at `finish`.
    padded_end: u64,
    /// Tests only: direct writes that succeed before every later one is
    /// refused as a file system would (EINVAL), so the switch to the page
    /// cache in the middle of a range runs.
    #[cfg(test)]
    refuse_after: Option<usize>,
}

impl<'a> DirectWriter<'a> {
    /// A writer for `file`, setting `O_DIRECT` on it when `want_direct` and the
    /// file system takes it; `buf` is the aligned staging memory (grown to
    /// `piece` plus a block at most) and `piece` the most bytes per write.
    pub fn new(
        file: &'a File,
        want_direct: bool,
        buf: &'a mut Vec<u8>,
        piece: usize,
    ) -> DirectWriter<'a> {
        let direct = want_direct && set_direct(file, true).is_ok();
        DirectWriter {
            file,
            direct,
            buf,
            piece: piece.max(BLOCK),
            padded_end: 0,
            #[cfg(test)]
            refuse_after: None,
        }
    }

    /// True while the writer writes with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Write the concatenation of `parts` at `offset`, a multiple of [`BLOCK`].
    pub fn write_at(&mut self, offset: u64, parts: &[&[u8]]) -> std::io::Result<()> {
        debug_assert_eq!(offset % BLOCK as u64, 0, "direct writes start at a block");
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = 0;
        while self.direct && done < len {
            let piece = aligned(self.buf, self.piece.min(len - done));
            let filled = copy_from(parts, done, piece);
            piece[filled..].fill(0); // a last partial block's padding
            let at = offset + done as u64;
            #[cfg(test)]
            let refused = match &mut self.refuse_after {
                Some(0) => Some(std::io::Error::from_raw_os_error(
                    rustix::io::Errno::INVAL.raw_os_error(),
                )),
                Some(n) => {
                    *n -= 1;
                    None
                }
                None => None,
            };
            #[cfg(not(test))]
            let refused = None;
            match refused.map_or_else(|| self.file.write_all_at(piece, at), Err) {
                Ok(()) => {
                    if filled < piece.len() {
                        self.padded_end = self.padded_end.max(at + piece.len() as u64);
                    }
                    done += filled;
                }
                Err(e) if is_refused(&e) => {
                    set_direct(self.file, false)?;
                    self.direct = false;
                }
                Err(e) => return Err(e),
            }
        }
        // Through the page cache: what is left when the writer is not (or no
        // longer) direct, straight from the parts.
        let mut at = offset;
        let mut skip = done;
        for p in parts {
            let from = skip.min(p.len());
            skip -= from;
            if from < p.len() {
                self.file.write_all_at(&p[from..], at + from as u64)?;
            }
            at += p.len() as u64;
        }
        Ok(())
    }

    /// Cut the file to `len` where a padded block went past it.
    pub fn finish(self, len: u64) -> std::io::Result<()> {
        if self.padded_end > len {
            self.file.set_len(len)?;
        }
        Ok(())
    }
}

/// Copy the bytes of the concatenated `parts` from `skip` on into `out`, as
/// many as fit; returns how many.
fn copy_from(parts: &[&[u8]], mut skip: usize, out: &mut [u8]) -> usize {
    let mut filled = 0;
    for p in parts {
        if filled == out.len() {
            break;
        }
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let n = (p.len() - skip).min(out.len() - filled);
        out[filled..filled + n].copy_from_slice(&p[skip..skip + n]);
        filled += n;
        skip = 0;
    }
    filled
}

/// Memory of [`write_file`] per thread: one piece of a file at a time.
const PIECE: usize = 1 << 20;

thread_local! {
    static PIECE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write the concatenation of `parts` as the whole content of `file`, a new
/// empty file: with `O_DIRECT` when `want_direct` and the file system takes
/// it, in pieces of at most 1 MiB copied through a per-thread buffer (a
/// [`DirectWriter`]). True when it was written direct.
pub fn write_file(file: &File, parts: &[&[u8]], want_direct: bool) -> std::io::Result<bool> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    PIECE_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let mut w = DirectWriter::new(file, want_direct, &mut buf, PIECE);
        w.write_at(0, parts)?;
        let direct = w.is_direct();
        w.finish(len as u64)?;
        Ok(direct)
    })
}

/// True when the file system of directory `dir` takes `O_DIRECT` (probed on a
/// file of its own, removed again).
#[cfg(test)]
pub(crate) fn takes_direct(dir: &std::path::Path) -> bool {
    let path = dir.join(".direct-probe");
    let probe = File::create(&path).unwrap();
    let direct = set_direct(&probe, true).is_ok();
    drop(probe);
    std::fs::remove_file(&path).unwrap();
    direct
}

/// A directory on ramfs, a file system that refuses `O_DIRECT` (at open and at
/// fcntl), so that the fallbacks run for real: mounted for the test (the tests
/// run as root, as vmbackup does), unmounted on drop.
#[cfg(test)]
pub(crate) struct RefusingDir {
    dir: tempfile::TempDir,
}

#[cfg(test)]
impl RefusingDir {
    pub(crate) fn new() -> RefusingDir {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir.path())
            .status()
            .expect("cannot run mount");
        assert!(
            status.success(),
            "cannot mount a ramfs on {} (the tests run as root)",
            dir.path().display()
        );
        let refusing = RefusingDir { dir };
        assert!(
            !takes_direct(refusing.path()),
            "ramfs took O_DIRECT: this test would not test a refusal"
        );
        refusing
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

#[cfg(test)]
impl Drop for RefusingDir {
    fn drop(&mut self) {
        // Before the TempDir removes the (then empty) mount point.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_file_writes_exactly_the_parts() {
        // The checkout's file system, which takes O_DIRECT here (tmpfs /tmp
        // may not), and ramfs, which refuses it.
        let here = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let refusing = RefusingDir::new();
        for dir in [here.path(), refusing.path()] {
            let direct_here = takes_direct(dir);
            // Lengths around the block and piece sizes; two and three parts.
            for (i, len) in [
                0,
                1,
                60,
                4095,
                4096,
                4097,
                PIECE,
                PIECE + 60,
                3 * PIECE + 4097,
            ]
            .into_iter()
            .enumerate()
            {
                let data: Vec<u8> = (0..len).map(|j| (j % 251) as u8 | 1).collect();
                let cut = len.min(60);
                let parts: Vec<&[u8]> = if i % 2 == 0 {
                    vec![&data[..cut], &data[cut..]]
                } else {
                    vec![&data[..cut / 2], &data[cut / 2..cut], &data[cut..]]
                };
                for want_direct in [true, false] {
                    let path = dir.join(format!("f{i}-{want_direct}"));
                    let file = File::options()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .unwrap();
                    let direct = write_file(&file, &parts, want_direct).unwrap();
                    let what = format!("length {len}, {}, direct {want_direct}", dir.display());
                    assert_eq!(direct, want_direct && direct_here, "{what}");
                    drop(file);
                    assert!(std::fs::read(&path).unwrap() == data, "{what}");
                }
            }
        }
    }

    /// A file system that takes `O_DIRECT` when it is set and then refuses a
    /// direct write (the refusal simulated after `n` good writes): the rest of
    /// that range and every later one go through the page cache, and the file
    /// holds exactly the bytes written, the padding of the last direct piece
    /// cut back or overwritten.
    #[test]
    fn a_direct_write_refused_midway_finishes_through_the_page_cache() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let piece = 4 * BLOCK;
        let data: Vec<u8> = (0..10 * BLOCK + 100).map(|j| (j % 253) as u8 | 1).collect();
        let (first, second) = data.split_at(6 * BLOCK);
        for n in 0..5 {
            let path = dir.path().join(format!("f{n}"));
            let file = File::create_new(&path).unwrap();
            let mut buf = Vec::new();
            let mut w = DirectWriter::new(&file, true, &mut buf, piece);
            w.refuse_after = Some(n);
            // The direct path, whether or not this file system takes O_DIRECT
            // (where it does not, the same aligned pieces go through the cache).
            w.direct = true;
            w.write_at(0, &[&first[..100], &first[100..]]).unwrap();
            assert_eq!(w.is_direct(), n >= 2, "{n} good writes: 6 blocks take 2");
            w.write_at(first.len() as u64, &[second]).unwrap();
            assert_eq!(
                w.is_direct(),
                n >= 4,
                "{n} good writes: 4 blocks and 100 bytes take 2 more"
            );
            w.finish(data.len() as u64).unwrap();
            drop(file);
            assert!(std::fs::read(&path).unwrap() == data, "refused after {n}");
        }
    }
}
