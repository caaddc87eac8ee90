//! Chunk-sized buffers reused from one chunk to the next.
//!
//! A backup reads, and a restore decodes, one `i2vp_transbuffer` (4 MiB by
//! default) buffer per slot. Allocated afresh, each is either a new mapping
//! whose pages the kernel faults in and clears (a restore profile spent a
//! tenth of its time there), or, once glibc has raised its mmap threshold,
//! memory its per-thread arenas keep after the free (8 concurrent fulls held
//! about 60 MiB more than the memory bound of docs/BENCHMARKS.md). Here buffers
//! that are done with go back to a small process-wide free list ([`give`]) and
//! the next [`take`] reuses one.
//!
//! A buffer from [`take`] is empty (length 0): its previous content cannot be
//! read by mistake. [`take_overwritten`] is the one exception, for a reader
//! that proves it overwrote every byte. The list holds at most [`KEPT`] buffers, each between
//! [`MIN_KEPT`] and [`MAX_KEPT`] bytes of capacity, and small buffers never pile
//! up in it. A new buffer is made only when no kept one fits, so the buffers
//! that exist at once are about the most that were in use at once: the process's
//! chunk-buffer budget (3 × `bk_tsk_thd`, `runner::BUFFERS_PER_TASK`), which
//! [`KEPT`] covers for the default `bk_tsk_thd` of 8 and more. Peak RSS of 8
//! concurrent fulls was the same with 8 or 32 kept (docs/BENCHMARKS.md).

use std::sync::Mutex;

/// Buffers kept at most (module docs).
pub const KEPT: usize = 32;
/// Smallest capacity worth keeping: below this, malloc serves from its heap.
pub const MIN_KEPT: usize = 1 << 20;
/// Largest capacity kept: the largest chunk (32 MiB) plus an object header.
pub const MAX_KEPT: usize = (32 << 20) + 4096;

/// A bounded list of buffers to reuse (module docs); the process has one.
pub struct FreeList {
    bufs: Mutex<Vec<Vec<u8>>>,
}

impl FreeList {
    pub const fn new() -> FreeList {
        FreeList {
            bufs: Mutex::new(Vec::new()),
        }
    }

    /// An empty buffer with room for at least `capacity` bytes: a kept one when
    /// one is large enough, else a new one.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        match self.kept(capacity) {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// A kept buffer with room for `capacity` bytes, as its last use left it.
    fn kept(&self, capacity: usize) -> Option<Vec<u8>> {
        if capacity < MIN_KEPT {
            return None;
        }
        let mut free = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let i = free.iter().position(|b| b.capacity() >= capacity)?;
        Some(free.swap_remove(i))
    }

    /// A buffer of exactly `len` bytes whose content is unspecified: a kept
    /// one keeps the bytes of its last use (zeros only past its old length),
    /// where [`FreeList::take`] would have them cleared again (4 MiB of
    /// zeros per NBD read were 3.5% of a full backup's samples). Only for a
    /// caller that writes every byte before any is read and checks that it did
    /// (the NBD client: `nbd::inflight::Coverage`).
    pub fn take_overwritten(&self, len: usize) -> Vec<u8> {
        match self.kept(len) {
            Some(mut buf) => {
                buf.truncate(len);
                buf.resize(len, 0);
                buf
            }
            None => vec![0; len],
        }
    }

    /// Keep a buffer for a later [`FreeList::take`]; dropped when it is too
    /// small or too large, or when the list is full.
    pub fn give(&self, buf: Vec<u8>) {
        if !(MIN_KEPT..=MAX_KEPT).contains(&buf.capacity()) {
            return;
        }
        let mut free = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEPT {
            free.push(buf);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.bufs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Default for FreeList {
    fn default() -> Self {
        FreeList::new()
    }
}

static FREE: FreeList = FreeList::new();

/// [`FreeList::take`] from the process's list.
pub fn take(capacity: usize) -> Vec<u8> {
    FREE.take(capacity)
}

/// [`FreeList::take_overwritten`] from the process's list.
pub fn take_overwritten(len: usize) -> Vec<u8> {
    FREE.take_overwritten(len)
}

/// [`FreeList::give`] to the process's list.
pub fn give(buf: Vec<u8>) {
    FREE.give(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_empty_and_the_list_stays_bounded() {
        let list = FreeList::new();
        let mut a = list.take(4 << 20);
        assert!(a.is_empty() && a.capacity() >= 4 << 20);
        a.extend_from_slice(&[7u8; 1000]);
        let ptr = a.as_ptr();
        list.give(a);
        let b = list.take(2 << 20);
        assert_eq!(b.as_ptr(), ptr, "the kept buffer is reused");
        assert!(b.is_empty(), "its old content is not visible");
        assert!(
            list.take(8 << 20).capacity() >= 8 << 20,
            "nothing kept is large enough: a new one"
        );
        // Too small, too large: never kept.
        list.give(Vec::with_capacity(4096));
        list.give(Vec::with_capacity(MAX_KEPT + 1));
        assert_eq!(list.len(), 0);
        for _ in 0..KEPT + 4 {
            list.give(Vec::with_capacity(MIN_KEPT));
        }
        assert_eq!(list.len(), KEPT);
    }

    /// `take_overwritten` reuses a kept buffer without clearing what fits in
    /// its old length, and zero-fills only past it.
    #[test]
    fn overwritten_buffers_are_reused_at_the_asked_length() {
        let list = FreeList::new();
        let mut a = list.take(2 << 20);
        a.resize(2 << 20, 7);
        let ptr = a.as_ptr();
        list.give(a);
        let b = list.take_overwritten(1 << 20);
        assert_eq!((b.as_ptr(), b.len()), (ptr, 1 << 20));
        list.give(b);
        let c = list.take_overwritten(2 << 20);
        assert_eq!((c.as_ptr(), c.len()), (ptr, 2 << 20));
        assert!(c[1 << 20..].iter().all(|&x| x == 0), "past the old length");
        let d = list.take_overwritten(3 << 20);
        assert!(d.len() == 3 << 20 && d.iter().all(|&x| x == 0), "a new one");
    }
}
