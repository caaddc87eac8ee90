//! The table of requests in flight on one connection, shared by the callers (who
//! add requests and wait) and the reply reader (who fills and completes them).
//!
//! Each request gets a unique cookie and a oneshot channel. A reply chunk for a
//! cookie is applied to its [`Pending`] entry; the last chunk completes it. When
//! the connection breaks, [`Inflight::fail_all`] completes every entry with the
//! reason and refuses new requests, so no caller waits forever.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, Error};
use tokio::sync::oneshot;

/// What a request is and what its reply has delivered so far.
#[derive(Debug)]
pub enum Op {
    /// `NBD_CMD_READ`: `buf` holds any bytes at first (a reused buffer);
    /// `covered` records the ranges that data and hole chunks (zeros) have
    /// written, which must tile it exactly before the read succeeds.
    Read {
        offset: u64,
        buf: Vec<u8>,
        covered: Coverage,
    },
    /// `NBD_CMD_BLOCK_STATUS`: one (context id, descriptors) entry per chunk.
    BlockStatus { chunks: Vec<(u32, Vec<(u32, u32)>)> },
    /// Commands whose reply carries nothing but success or an error (write, flush).
    Plain,
}

/// The ranges of a read's buffer that its reply has written. A read succeeds
/// only when they tile the buffer exactly: every byte written once, so nothing
/// of the buffer's earlier use can reach the caller, and a server that sends
/// overlapping chunks (which the NBD protocol forbids) or too few is refused.
#[derive(Debug, Default)]
pub struct Coverage {
    ranges: Vec<std::ops::Range<usize>>,
}

impl Coverage {
    /// Record that `range` of the buffer was written.
    pub fn add(&mut self, range: std::ops::Range<usize>) {
        if !range.is_empty() {
            self.ranges.push(range);
        }
    }

    /// Ok when the ranges tile `[0, len)`; else why not.
    pub fn check(&mut self, len: usize) -> Result<(), String> {
        self.ranges.sort_unstable_by_key(|r| r.start);
        let mut end = 0;
        for r in &self.ranges {
            if r.start < end {
                return Err(format!("chunks overlap at byte {} of the request", r.start));
            }
            if r.start > end {
                break;
            }
            end = r.end;
        }
        let answered: usize = self.ranges.iter().map(|r| r.len()).sum();
        if end != len {
            return Err(format!("answered {answered} of {len} bytes"));
        }
        Ok(())
    }
}

/// One request waiting for (the rest of) its reply.
#[derive(Debug)]
pub struct Pending {
    pub op: Op,
    /// The first error the server reported for this request.
    pub error: Option<String>,
    done: oneshot::Sender<Result<Op, Error>>,
}

impl Pending {
    /// Record a request error; the first one wins.
    pub fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(message);
        }
    }

    /// Hand the result to the waiting caller (who may have gone away).
    pub fn complete(self) {
        let result = match self.error {
            Some(message) => Err(anyhow!(message)),
            None => Ok(self.op),
        };
        let _ = self.done.send(result);
    }
}

#[derive(Default)]
struct Table {
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
    broken: Option<String>,
}

/// Shared between the client handle, the writer task and the reader task.
#[derive(Default)]
pub struct Inflight {
    table: Mutex<Table>,
}

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic elsewhere while holding the lock leaves the table usable.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Add a request; its cookie and the channel its result arrives on. Fails
    /// when the connection is already broken.
    pub fn register(&self, op: Op) -> Result<(u64, oneshot::Receiver<Result<Op, Error>>), Error> {
        let mut table = self.lock();
        if let Some(reason) = &table.broken {
            return Err(anyhow!(reason.clone()));
        }
        let cookie = table.next_cookie;
        table.next_cookie += 1;
        let (done, waiter) = oneshot::channel();
        table.pending.insert(
            cookie,
            Pending {
                op,
                error: None,
                done,
            },
        );
        Ok((cookie, waiter))
    }

    /// Take a request out to apply a reply chunk to it.
    pub fn take(&self, cookie: u64) -> Option<Pending> {
        self.lock().pending.remove(&cookie)
    }

    /// Put a request back after a chunk that was not its last; completes it with
    /// the connection's error instead if the connection broke meanwhile.
    pub fn put_back(&self, cookie: u64, mut pending: Pending) {
        let mut table = self.lock();
        if let Some(reason) = &table.broken {
            let reason = reason.clone();
            drop(table);
            pending.error = Some(reason);
            pending.complete();
            return;
        }
        table.pending.insert(cookie, pending);
    }

    /// Drop a request that never reached the server.
    pub fn cancel(&self, cookie: u64) {
        self.lock().pending.remove(&cookie);
    }

    /// The connection is unusable: fail every pending request and all later ones.
    /// The first reason sticks.
    pub fn fail_all(&self, reason: impl Into<String>) {
        let mut table = self.lock();
        if table.broken.is_none() {
            table.broken = Some(reason.into());
        }
        let reason = table.broken.clone().unwrap_or_default();
        let pending: Vec<Pending> = table.pending.drain().map(|(_, p)| p).collect();
        drop(table);
        for mut p in pending {
            p.error = Some(reason.clone());
            p.complete();
        }
    }

    /// Why the connection broke (for a caller whose result channel closed).
    pub fn broken_reason(&self) -> String {
        self.lock()
            .broken
            .clone()
            .unwrap_or_else(|| "NBD connection closed".to_string())
    }

    /// Number of requests waiting for replies.
    pub fn count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Whether no request is waiting for a reply.
    pub fn is_empty(&self) -> bool {
        self.lock().pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_all_completes_everyone_and_refuses_new_requests() {
        let inflight = Inflight::default();
        let (c1, mut w1) = inflight.register(Op::Plain).unwrap();
        let (c2, mut w2) = inflight.register(Op::Plain).unwrap();
        assert_ne!(c1, c2);
        // Entry 2 is out being filled by the reader when the connection breaks.
        let p2 = inflight.take(c2).unwrap();
        inflight.fail_all("server went away");
        inflight.fail_all("a later reason");
        let e1 = w1.try_recv().unwrap().unwrap_err();
        assert_eq!(e1.to_string(), "server went away");
        inflight.put_back(c2, p2);
        let e2 = w2.try_recv().unwrap().unwrap_err();
        assert_eq!(e2.to_string(), "server went away");
        assert_eq!(
            inflight.register(Op::Plain).unwrap_err().to_string(),
            "server went away"
        );
        assert_eq!(inflight.count(), 0);
        assert!(inflight.is_empty());
    }

    #[test]
    fn first_request_error_wins() {
        let inflight = Inflight::default();
        let (c, mut w) = inflight.register(Op::Plain).unwrap();
        let mut p = inflight.take(c).unwrap();
        p.fail("first".into());
        p.fail("second".into());
        p.complete();
        assert_eq!(w.try_recv().unwrap().unwrap_err().to_string(), "first");
    }
}
