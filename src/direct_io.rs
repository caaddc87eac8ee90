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

/// Memory of [`write_file`] per thread: one piece of a file at a time.
const PIECE: usize = 1 << 20;

thread_local! {
    static PIECE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write the concatenation of `parts` as the whole content of `file`, a new
/// empty file opened with `O_DIRECT`: in aligned pieces of at most 1 MiB
/// copied through a per-thread buffer, the last block padded with zeros and
/// the file then cut to its length. When the file system refuses the direct
/// write, `O_DIRECT` is cleared and everything is written through the page
/// cache. True when it was written direct.
pub fn write_file(file: &File, parts: &[&[u8]]) -> std::io::Result<bool> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let direct = PIECE_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let mut part = 0; // parts[part][at..] is next
        let mut at = 0;
        let mut offset = 0;
        while offset < len {
            let piece = aligned(&mut buf, PIECE.min(len - offset));
            let mut filled = 0;
            while filled < piece.len() && part < parts.len() {
                let n = (parts[part].len() - at).min(piece.len() - filled);
                piece[filled..filled + n].copy_from_slice(&parts[part][at..at + n]);
                filled += n;
                at += n;
                if at == parts[part].len() {
                    part += 1;
                    at = 0;
                }
            }
            piece[filled..].fill(0); // the last block's padding
            match file.write_all_at(piece, offset as u64) {
                Ok(()) => offset += filled,
                Err(e) if is_refused(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    })?;
    if !direct {
        set_direct(file, false)?;
        let mut offset = 0u64;
        for p in parts {
            file.write_all_at(p, offset)?;
            offset += p.len() as u64;
        }
    }
    if len % BLOCK != 0 || !direct {
        file.set_len(len as u64)?;
    }
    Ok(direct)
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
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn write_file_writes_exactly_the_parts() {
        // The checkout's file system (tmpfs /tmp may differ).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let direct_here = takes_direct(dir.path());
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
            let path = dir.path().join(format!("f{i}"));
            let mut open = File::options();
            open.write(true).create_new(true);
            if direct_here {
                open.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
            }
            let file = open.open(&path).unwrap();
            let direct = write_file(&file, &parts).unwrap();
            assert_eq!(direct, direct_here, "length {len}");
            drop(file);
            assert!(std::fs::read(&path).unwrap() == data, "length {len}");
        }
        if !direct_here {
            eprintln!("this file system refuses O_DIRECT: only the page-cache path ran");
        }
    }
}
