//! `Publisher`: fsync-and-rename of staged files on background threads (the
//! local store's deferred puts).
//!
//! A chunk's name must never exist before its data is durable (an existing
//! chunk is trusted), so every chunk is fsynced before its rename. Doing that
//! inline would hold the backup's chunk buffer through a disk flush; instead
//! the local store stages the file (a plain write into the page cache) and hands
//! it here, and several threads fsync and rename staged files in parallel.
//! [`Publisher::flush`] waits until every handed-over file is published (or
//! reports the first failure); a point is committed only after it returns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use anyhow::{anyhow, Result};

use super::atomic::{Publish, Staged};

/// Threads publishing staged files: fsyncs wait on the disk, not the CPU, and
/// overlapping them lets the disk batch the flushes.
const THREADS: usize = 8;

#[derive(Debug, Default)]
struct Progress {
    /// Final paths of files handed over and not yet published (with how many
    /// copies are in flight: two writers may stage the same object).
    pending: HashMap<PathBuf, usize>,
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    progress: Mutex<Progress>,
    idle: Condvar,
}

/// Publishes staged files in the background (see module docs).
#[derive(Debug, Default)]
pub struct Publisher {
    queue: Mutex<Option<Sender<Staged>>>,
    shared: Arc<Shared>,
}

impl Publisher {
    /// Hand over a staged file. Fails at once if an earlier file failed.
    pub fn submit(&self, staged: Staged) -> Result<()> {
        {
            let mut p = self
                .shared
                .progress
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = &p.error {
                return Err(anyhow!("an earlier chunk write failed: {e}"));
            }
            *p.pending.entry(staged.path().to_path_buf()).or_default() += 1;
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = queue.get_or_insert_with(|| self.start());
        tx.send(staged)
            .map_err(|_| anyhow!("chunk publisher threads are gone"))
    }

    /// True when a file for `path` was handed over and is not published yet
    /// (so an insert of the same object need not stage it again).
    pub fn is_pending(&self, path: &Path) -> bool {
        self.shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending
            .contains_key(path)
    }

    /// Wait until every submitted file is published; the first failure, if any.
    pub fn flush(&self) -> Result<()> {
        let mut p = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while !p.pending.is_empty() {
            p = self
                .shared
                .idle
                .wait(p)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match &p.error {
            Some(e) => Err(anyhow!("{e}")),
            None => Ok(()),
        }
    }

    fn start(&self) -> Sender<Staged> {
        let (tx, rx) = channel::<Staged>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..THREADS {
            let (rx, shared) = (rx.clone(), self.shared.clone());
            std::thread::spawn(move || publish_loop(&rx, &shared));
        }
        tx
    }
}

/// Runs until the publisher (the sender) is dropped and the queue is empty.
fn publish_loop(rx: &Mutex<Receiver<Staged>>, shared: &Shared) {
    loop {
        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(staged) = job else { return };
        let path = staged.path().to_path_buf();
        let result = staged.publish(Publish::IfAbsent);
        let mut p = shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = result {
            p.error.get_or_insert(format!("{e:#}"));
        }
        if let Some(n) = p.pending.get_mut(&path) {
            *n -= 1;
            if *n == 0 {
                p.pending.remove(&path);
            }
        }
        if p.pending.is_empty() {
            shared.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::store::atomic::stage_file;

    #[test]
    fn flush_waits_for_every_file_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let p = Publisher::default();
        for i in 0..50 {
            let path = dir.path().join(format!("f{i}"));
            p.submit(stage_file(&path, format!("data {i}").as_bytes()).unwrap())
                .unwrap();
        }
        p.flush().unwrap();
        for i in 0..50 {
            assert_eq!(
                std::fs::read_to_string(dir.path().join(format!("f{i}"))).unwrap(),
                format!("data {i}")
            );
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            50,
            "no staging files left"
        );

        // A staged file whose directory vanished cannot be published.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let staged = stage_file(&sub.join("x"), b"x").unwrap();
        std::fs::remove_dir_all(&sub).unwrap();
        p.submit(staged).unwrap();
        assert!(p.flush().is_err());
        assert!(
            p.submit(stage_file(&dir.path().join("y"), b"y").unwrap())
                .is_err(),
            "later submits fail fast"
        );
    }
}
