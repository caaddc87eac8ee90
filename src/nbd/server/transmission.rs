//! The transmission phase of one connection: read requests, work on up to
//! [`MAX_IN_FLIGHT`] at once on the blocking pool, send each reply whole through
//! one writer task (replies leave in the order they finish; clients match them
//! by cookie).
//!
//! Reads answer with structured replies when negotiated: `OFFSET_DATA` chunks
//! for data and `OFFSET_HOLE` chunks for zero runs, or one data chunk when the
//! client sets `NBD_CMD_FLAG_DF`; simple replies otherwise. `BLOCK_STATUS`
//! answers `base:allocation`. The export is read-only: `WRITE`, `TRIM` and
//! `WRITE_ZEROES` fail with `EPERM`; `FLUSH` succeeds; `CACHE` prefetches.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Semaphore};

use super::{Piece, Session, Stats, BASE_ALLOCATION_ID, MAX_IN_FLIGHT, MAX_READ};
use crate::nbd::proto::{self, Request, *};

/// Descriptors sent in one block status reply at most.
const MAX_DESCRIPTORS: usize = 1024;

/// A reply ready to send: its parts, written back to back.
type Frame = Vec<Bytes>;

pub(super) async fn serve<R, W>(mut rd: R, wr: W, session: Session, stats: Arc<Stats>) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (frames, queued) = mpsc::channel::<Frame>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_frames(queued, wr));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let session = Arc::new(session);
    let mut work = tokio::task::JoinSet::new();
    let result = loop {
        let mut head = [0u8; REQUEST_LEN];
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(anyhow::Error::from(e).context("reading a request")),
        }
        let req = match Request::parse(&head) {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if req.command == CMD_DISC {
            break Ok(());
        }
        if req.command == CMD_WRITE {
            // Keep the framing: the payload follows, whatever we answer.
            if req.length > MAX_READ {
                break Err(anyhow::anyhow!("client sent a {}-byte write", req.length));
            }
            let mut sink = (&mut rd).take(u64::from(req.length));
            if let Err(e) = tokio::io::copy(&mut sink, &mut tokio::io::sink()).await {
                break Err(e.into());
            }
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break Ok(());
        };
        let session = session.clone();
        let frames = frames.clone();
        let stats = stats.clone();
        work.spawn(async move {
            let frame = answer(&session, &req, &stats).await;
            let _ = frames.send(frame).await;
            drop(permit);
        });
        while work.try_join_next().is_some() {}
    };
    // Answer what was asked before the client left or disconnected.
    while work.join_next().await.is_some() {}
    drop(frames);
    let written = writer.await.context("NBD writer task")?;
    result.and(written)
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut queued: mpsc::Receiver<Frame>,
    wr: W,
) -> Result<()> {
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(frame) = queued.recv().await {
        for part in frame {
            wr.write_all(&part).await.context("sending a reply")?;
        }
        if queued.is_empty() {
            wr.flush().await.context("sending a reply")?;
        }
    }
    wr.flush().await?;
    let _ = wr.shutdown().await;
    Ok(())
}

/// The whole reply to one request.
async fn answer(session: &Session, req: &Request, stats: &Stats) -> Frame {
    let size = session.export.source.size();
    let in_range = req.length > 0
        && req
            .offset
            .checked_add(u64::from(req.length))
            .is_some_and(|end| end <= size);
    let refuse = |errno: u32, msg: &str| error_reply(session, req.cookie, errno, msg);
    match req.command {
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => refuse(EPERM, "the export is read-only"),
        CMD_FLUSH => done_reply(session, req.cookie),
        CMD_READ => {
            if req.length > MAX_READ {
                return refuse(EOVERFLOW, "read larger than the maximum block size");
            }
            if !in_range {
                return refuse(EINVAL, "read outside the export");
            }
            if req.flags & CMD_FLAG_DF != 0 && !session.structured {
                return refuse(EINVAL, "DF needs structured replies");
            }
            let source = session.export.source.clone();
            let (offset, len) = (req.offset, req.length);
            match tokio::task::spawn_blocking(move || source.read(offset, len)).await {
                Ok(Ok(pieces)) => {
                    stats
                        .bytes_served
                        .fetch_add(u64::from(len), Ordering::Relaxed);
                    read_reply(session, req, pieces)
                }
                Ok(Err(e)) => {
                    tracing::warn!(
                        "NBD export '{}': read of {len} bytes at {offset} failed: {e:#}",
                        session.export.name
                    );
                    refuse(EIO, &format!("{e:#}"))
                }
                Err(e) => refuse(EIO, &format!("read task failed: {e}")),
            }
        }
        CMD_CACHE => {
            if !in_range {
                return refuse(EINVAL, "cache request outside the export");
            }
            let source = session.export.source.clone();
            let (offset, len) = (req.offset, req.length.min(MAX_READ));
            tokio::task::spawn_blocking(move || source.prefetch(offset, len));
            done_reply(session, req.cookie)
        }
        CMD_BLOCK_STATUS => {
            if !session.base_allocation {
                return refuse(EINVAL, "no meta context was selected");
            }
            if !in_range {
                return refuse(EINVAL, "block status outside the export");
            }
            let source = session.export.source.clone();
            let (offset, len) = (req.offset, u64::from(req.length));
            match tokio::task::spawn_blocking(move || source.allocation(offset, len)).await {
                Ok(Ok(runs)) => block_status_reply(req, &runs),
                Ok(Err(e)) => refuse(EIO, &format!("{e:#}")),
                Err(e) => refuse(EIO, &format!("block status task failed: {e}")),
            }
        }
        _ => refuse(EINVAL, "unknown command"),
    }
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[Bytes]) -> Frame {
    let len: usize = payload.iter().map(Bytes::len).sum();
    let mut frame = Vec::with_capacity(1 + payload.len());
    frame.push(Bytes::copy_from_slice(&proto::encode_chunk_header(
        flags, kind, cookie, len as u32,
    )));
    frame.extend(payload.iter().cloned());
    frame
}

fn done_reply(session: &Session, cookie: u64) -> Frame {
    if session.structured {
        chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
    } else {
        vec![Bytes::copy_from_slice(&proto::encode_simple_reply(
            0, cookie,
        ))]
    }
}

fn error_reply(session: &Session, cookie: u64, errno: u32, message: &str) -> Frame {
    if session.structured {
        let payload = Bytes::from(proto::error_payload(errno, message));
        chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, &[payload])
    } else {
        vec![Bytes::copy_from_slice(&proto::encode_simple_reply(
            errno, cookie,
        ))]
    }
}

/// Pieces to reply chunks: data as `OFFSET_DATA`, zeros as `OFFSET_HOLE`; one
/// data chunk under DF; the whole buffer after a simple reply header otherwise.
fn read_reply(session: &Session, req: &Request, pieces: Vec<Piece>) -> Frame {
    let whole = !session.structured || req.flags & CMD_FLAG_DF != 0;
    if whole {
        let mut parts = Vec::with_capacity(pieces.len() + 2);
        for piece in pieces {
            parts.push(match piece {
                Piece::Data(b) => b,
                Piece::Zero(n) => Bytes::from(vec![0u8; n as usize]),
            });
        }
        if !session.structured {
            let mut frame = vec![Bytes::copy_from_slice(&proto::encode_simple_reply(
                0, req.cookie,
            ))];
            frame.extend(parts);
            return frame;
        }
        parts.insert(0, Bytes::copy_from_slice(&req.offset.to_be_bytes()));
        return chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, req.cookie, &parts);
    }
    let mut frame = Vec::new();
    let mut at = req.offset;
    let count = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        let flags = if i + 1 == count { REPLY_FLAG_DONE } else { 0 };
        let len = piece.len();
        match piece {
            Piece::Data(b) => {
                let offset = Bytes::copy_from_slice(&at.to_be_bytes());
                frame.extend(chunk(
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    &[offset, b],
                ));
            }
            Piece::Zero(n) => {
                let hole = Bytes::copy_from_slice(&proto::hole_payload(at, n));
                frame.extend(chunk(flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, &[hole]));
            }
        }
        at += u64::from(len);
    }
    frame
}

/// `base:allocation` runs as one `BLOCK_STATUS` chunk; runs longer than a u32
/// are split, at most [`MAX_DESCRIPTORS`] are sent (clients ask again).
fn block_status_reply(req: &Request, runs: &[(u64, u32)]) -> Frame {
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    'runs: for &(mut len, flags) in runs {
        while len > 0 {
            let part = len.min(u64::from(u32::MAX) & !0xfff) as u32;
            descriptors.push((part, flags));
            len -= u64::from(part);
            if descriptors.len() >= MAX_DESCRIPTORS || req.flags & CMD_FLAG_REQ_ONE != 0 {
                break 'runs;
            }
        }
    }
    if descriptors.is_empty() {
        // A source must cover at least one byte; never send an empty status.
        descriptors.push((req.length, 0));
    }
    let payload = Bytes::from(proto::block_status_payload(
        BASE_ALLOCATION_ID,
        &descriptors,
    ));
    chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        &[payload],
    )
}
