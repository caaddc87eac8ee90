//! The reply side of a connection: one task reads every reply and routes it, by
//! cookie, to the request waiting for it.
//!
//! Framing follows mini-redis' `Connection`: bytes go into a buffer, a header is
//! parsed once the buffer holds a whole one (check, parse, advance), a clean EOF
//! is one at a frame boundary and EOF inside a frame is an error. Read data is
//! not parsed from the buffer but copied straight into the request's own buffer.
//!
//! A reply that breaks the protocol (bad magic, unknown cookie, oversized chunk)
//! or an I/O error ends the task and fails every pending request; an error the
//! server reports for one request fails that request only.

use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::inflight::{Inflight, Op, Pending};
use super::proto::{self, ReplyHeader};

/// Bytes buffered per socket read (headers and small payloads).
const BUFFER: usize = 64 * 1024;

/// Largest non-data chunk payload accepted (block status lists, error texts).
const MAX_METADATA_CHUNK: u32 = 64 * 1024 * 1024;

/// Buffered reply frames over the socket's read half.
pub struct ReplyStream<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> ReplyStream<R> {
    pub fn new(inner: R) -> ReplyStream<R> {
        ReplyStream {
            inner,
            buf: vec![0u8; BUFFER],
            start: 0,
            end: 0,
        }
    }

    /// The next reply header; `None` on a clean EOF (between replies).
    pub async fn header(&mut self) -> Result<Option<ReplyHeader>> {
        loop {
            if let Some((header, used)) = ReplyHeader::parse(&self.buf[self.start..self.end])? {
                self.start += used;
                return Ok(Some(header));
            }
            if self.fill().await? == 0 {
                if self.start == self.end {
                    return Ok(None);
                }
                bail!("NBD server closed the connection inside a reply header");
            }
        }
    }

    /// Read more bytes after what is buffered; returns how many (0 = EOF).
    async fn fill(&mut self) -> Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self
            .inner
            .read(&mut self.buf[self.end..])
            .await
            .context("reading from the NBD server")?;
        self.end += n;
        Ok(n)
    }

    /// Fill `dst` with the next bytes: buffered ones first, the rest straight from
    /// the socket.
    pub async fn payload(&mut self, dst: &mut [u8]) -> Result<()> {
        let buffered = (self.end - self.start).min(dst.len());
        dst[..buffered].copy_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        if buffered < dst.len() {
            self.inner
                .read_exact(&mut dst[buffered..])
                .await
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        anyhow!("NBD server closed the connection inside a reply payload")
                    } else {
                        anyhow!(e).context("reading from the NBD server")
                    }
                })?;
        }
        Ok(())
    }

    /// A payload of `len` bytes as an owned vector.
    pub async fn payload_vec(&mut self, len: u32) -> Result<Vec<u8>> {
        let mut data = vec![0u8; len as usize];
        self.payload(&mut data).await?;
        Ok(data)
    }
}

/// Fails every pending request when the reader stops for any reason, including
/// the task being aborted or its runtime shutting down.
struct FailOnExit(Arc<Inflight>);

impl Drop for FailOnExit {
    fn drop(&mut self) {
        self.0.fail_all("NBD connection closed");
    }
}

/// Read replies until EOF or a connection error, routing each to its request.
pub async fn run<R: AsyncRead + Unpin>(
    stream: R,
    inflight: Arc<Inflight>,
    label: String,
    max_payload: u32,
) {
    let _guard = FailOnExit(inflight.clone());
    let mut replies = ReplyStream::new(stream);
    let reason = match route_replies(&mut replies, &inflight, &label, max_payload).await {
        Ok(()) => format!("NBD server {label} closed the connection"),
        Err(e) => connection_failed(&label, &e),
    };
    inflight.fail_all(reason);
}

fn connection_failed(label: &str, error: &anyhow::Error) -> String {
    format!("NBD connection to {label} failed: {error:#}")
}

async fn route_replies<R: AsyncRead + Unpin>(
    replies: &mut ReplyStream<R>,
    inflight: &Inflight,
    label: &str,
    max_payload: u32,
) -> Result<()> {
    while let Some(header) = replies.header().await? {
        let cookie = header.cookie();
        let mut pending = inflight
            .take(cookie)
            .ok_or_else(|| anyhow!("reply for unknown request cookie {cookie}"))?;
        let applied = match header {
            ReplyHeader::Simple { error, .. } => simple_reply(replies, &mut pending, error)
                .await
                .map(|()| true),
            ReplyHeader::Structured {
                flags,
                kind,
                length,
                ..
            } => chunk(replies, &mut pending, kind, length, max_payload)
                .await
                .map(|()| flags & proto::REPLY_FLAG_DONE != 0),
        };
        match applied {
            Ok(true) => {
                finish(&mut pending);
                pending.complete();
            }
            Ok(false) => inflight.put_back(cookie, pending),
            Err(e) => {
                // Mark the connection broken before this caller hears of it, so
                // every caller sees the same reason.
                let reason = connection_failed(label, &e);
                inflight.fail_all(reason.clone());
                pending.error = Some(reason);
                pending.complete();
                return Err(e);
            }
        }
    }
    Ok(())
}

async fn simple_reply<R: AsyncRead + Unpin>(
    replies: &mut ReplyStream<R>,
    pending: &mut Pending,
    error: u32,
) -> Result<()> {
    if error != 0 {
        pending.fail(format!("server error {}", proto::errno_name(error)));
        return Ok(());
    }
    match &mut pending.op {
        Op::Read { buf, covered, .. } => {
            replies.payload(buf).await?;
            covered.add(0..buf.len());
        }
        Op::BlockStatus { .. } => pending.fail("server sent a simple reply to BLOCK_STATUS".into()),
        Op::Plain => {}
    }
    Ok(())
}

/// Apply one structured reply chunk to its request.
async fn chunk<R: AsyncRead + Unpin>(
    replies: &mut ReplyStream<R>,
    pending: &mut Pending,
    kind: u16,
    length: u32,
    max_payload: u32,
) -> Result<()> {
    if kind == proto::REPLY_TYPE_OFFSET_DATA {
        ensure!(
            length >= 8 && length - 8 <= max_payload,
            "OFFSET_DATA chunk of {length} bytes"
        );
        let mut at = [0u8; 8];
        replies.payload(&mut at).await?;
        let data_offset = proto::be_u64(&at);
        let data_len = length - 8;
        match &mut pending.op {
            Op::Read {
                offset,
                buf,
                covered,
            } => match slot(*offset, buf.len(), data_offset, data_len) {
                Some(range) => {
                    replies.payload(&mut buf[range.clone()]).await?;
                    covered.add(range);
                }
                None => {
                    let what = format!(
                        "server sent {data_len} bytes at offset {data_offset}, \
                         outside the request"
                    );
                    replies.payload_vec(data_len).await?;
                    pending.fail(what);
                }
            },
            _ => {
                replies.payload_vec(data_len).await?;
                pending.fail("server sent read data to a request that is not a read".into());
            }
        }
        return Ok(());
    }

    ensure!(
        length <= MAX_METADATA_CHUNK,
        "reply chunk type {kind} of {length} bytes"
    );
    let payload = replies.payload_vec(length).await?;
    match kind {
        proto::REPLY_TYPE_NONE => {}
        proto::REPLY_TYPE_OFFSET_HOLE => {
            let (hole_offset, hole_len) = proto::parse_hole(&payload)?;
            match &mut pending.op {
                Op::Read {
                    offset,
                    buf,
                    covered,
                } => match slot(*offset, buf.len(), hole_offset, hole_len) {
                    Some(range) => {
                        buf[range.clone()].fill(0);
                        covered.add(range);
                    }
                    None => pending.fail(format!(
                        "server sent a {hole_len}-byte hole at offset {hole_offset}, \
                         outside the request"
                    )),
                },
                _ => pending.fail("server sent a hole to a request that is not a read".into()),
            }
        }
        proto::REPLY_TYPE_BLOCK_STATUS => {
            let (context, descriptors) = proto::parse_block_status(&payload)?;
            match &mut pending.op {
                Op::BlockStatus { chunks, .. } => chunks.push((context, descriptors)),
                _ => pending.fail("server sent block status to a request that is not one".into()),
            }
        }
        _ if kind & proto::REPLY_TYPE_FLAG_ERROR != 0 => {
            let error = proto::parse_error_chunk(kind, &payload)?;
            pending.fail(error.to_string());
        }
        _ => pending.fail(format!("server sent unknown reply chunk type {kind}")),
    }
    Ok(())
}

/// Where `[at, at+len)` falls inside a request of `buf_len` bytes at `offset`.
fn slot(offset: u64, buf_len: usize, at: u64, len: u32) -> Option<std::ops::Range<usize>> {
    let start = at.checked_sub(offset)?;
    let end = start.checked_add(u64::from(len))?;
    if end > buf_len as u64 {
        return None;
    }
    Some(start as usize..end as usize)
}

/// Checks made when the last chunk arrived without an error.
fn finish(pending: &mut Pending) {
    if pending.error.is_some() {
        return;
    }
    if let Op::Read {
        offset,
        buf,
        covered,
    } = &mut pending.op
    {
        if let Err(why) = covered.check(buf.len()) {
            let message = format!("server's reply to the read at offset {offset}: {why}");
            pending.fail(message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::inflight::Coverage;
    use super::*;

    #[tokio::test]
    async fn clean_eof_only_between_frames() {
        let mut frame = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        frame.extend_from_slice(&0u32.to_be_bytes());
        frame.extend_from_slice(&3u64.to_be_bytes());
        let mut s = ReplyStream::new(&frame[..]);
        assert_eq!(s.header().await.unwrap().unwrap().cookie(), 3);
        assert!(s.header().await.unwrap().is_none());

        let mut s = ReplyStream::new(&frame[..10]);
        let e = s.header().await.unwrap_err();
        assert!(e.to_string().contains("inside a reply header"), "{e}");
    }

    #[tokio::test]
    async fn payload_takes_buffered_bytes_then_the_socket() {
        let mut frame = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        frame.extend_from_slice(&0u32.to_be_bytes());
        frame.extend_from_slice(&1u64.to_be_bytes());
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        frame.extend_from_slice(&data);
        let mut s = ReplyStream::new(&frame[..]);
        s.header().await.unwrap().unwrap();
        let mut got = vec![0u8; data.len()];
        s.payload(&mut got).await.unwrap();
        assert_eq!(got, data);
        let mut more = [0u8; 1];
        let e = s.payload(&mut more).await.unwrap_err();
        assert!(e.to_string().contains("inside a reply payload"), "{e}");
    }

    /// A read's reply must write each byte of its buffer exactly once.
    #[test]
    fn coverage_must_tile_the_buffer() {
        let check = |ranges: &[(usize, usize)]| {
            let mut c = Coverage::default();
            for &(a, b) in ranges {
                c.add(a..b);
            }
            c.check(100)
        };
        assert_eq!(check(&[(0, 100)]), Ok(()));
        assert_eq!(check(&[(60, 100), (0, 10), (10, 60)]), Ok(()), "any order");
        assert_eq!(
            check(&[(0, 50), (50, 50), (50, 100)]),
            Ok(()),
            "empty chunks"
        );
        assert_eq!(check(&[]), Err("answered 0 of 100 bytes".into()));
        assert_eq!(
            check(&[(0, 40), (60, 100)]),
            Err("answered 80 of 100 bytes".into())
        );
        assert_eq!(check(&[(10, 100)]), Err("answered 90 of 100 bytes".into()));
        // Byte counts that add up, but overlap: half the buffer never written.
        assert_eq!(
            check(&[(0, 50), (0, 50)]),
            Err("chunks overlap at byte 0 of the request".into())
        );
        assert_eq!(
            check(&[(0, 60), (40, 100)]),
            Err("chunks overlap at byte 40 of the request".into())
        );
    }

    #[test]
    fn slot_rejects_ranges_outside_the_request() {
        assert_eq!(slot(100, 50, 110, 10), Some(10..20));
        assert_eq!(slot(100, 50, 100, 50), Some(0..50));
        assert_eq!(slot(100, 50, 99, 10), None);
        assert_eq!(slot(100, 50, 141, 10), None);
        assert_eq!(slot(100, 50, u64::MAX, 10), None);
    }
}
