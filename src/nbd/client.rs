//! [`NbdClient`]: one connection to one export, many requests in flight.
//!
//! After the handshake the socket is split. Callers (`&self` methods, so many can
//! run at once from `join!`, `JoinSet` or tasks holding an `Arc<NbdClient>`)
//! register a request in the [`Inflight`] table and queue its encoded bytes to the
//! writer task, which batches whatever is queued into one flush. The reader task
//! ([`super::reader`]) routes each reply to its request by cookie. Queueing is
//! synchronous, so a caller that gives up mid-request never leaves half a request
//! on the wire.
//!
//! Deadlines: the handshake, and every request from the moment it is queued
//! (time spent before, e.g. in a bandwidth window, does not count), wait at most
//! the connection's `io_timeout` for their answer. A request that gets none fails
//! the whole connection (the server is stuck; a late reply could not be trusted
//! to be routed) with a message saying so. [`NbdClient::abort`] fails it at once
//! (a cancelled task).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::extents::{self, Extent};
use super::handshake::{self, Negotiated};
use super::inflight::{Coverage, Inflight, Op};
use super::proto::{self, Request};
use super::reader;
use super::tls;
use crate::platform::NbdAddr;

/// Largest request size used even when a server allows more.
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// Length asked for per `BLOCK_STATUS` (no payload, so not bound by the block
/// size limit; servers may answer less and [`NbdClient::extents`] loops).
const BLOCK_STATUS_STEP: u64 = 1 << 30;

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// A connection to one NBD export.
pub struct NbdClient {
    export: String,
    /// The server's address, as messages show it.
    label: String,
    /// How long a request may wait for its answer.
    io_timeout: Duration,
    negotiated: Negotiated,
    max_request: u32,
    inflight: Arc<Inflight>,
    requests: Option<mpsc::UnboundedSender<Vec<u8>>>,
    writer: Option<JoinHandle<Result<()>>>,
    reader: Option<JoinHandle<()>>,
}

impl NbdClient {
    /// Connect to `export` at `addr`, selecting the meta `contexts` (e.g.
    /// `base:allocation`, `qemu:dirty-bitmap:NAME`); each must exist. Requests
    /// wait at most system.conf's default `io_timeout` for their answers.
    pub async fn connect(addr: &NbdAddr, export: &str, contexts: &[&str]) -> Result<NbdClient> {
        NbdClient::connect_with_timeout(addr, export, contexts, crate::config::DEFAULT_IO_TIMEOUT)
            .await
    }

    /// [`NbdClient::connect`] whose handshake and requests each wait at most
    /// `io_timeout` for the server.
    pub async fn connect_with_timeout(
        addr: &NbdAddr,
        export: &str,
        contexts: &[&str],
        io_timeout: Duration,
    ) -> Result<NbdClient> {
        let label = addr_label(addr);
        let handshake = async {
            let (mut rd, mut wr) = open(addr, export)
                .await
                .with_context(|| format!("connecting to NBD server {label}"))?;
            let negotiated = handshake::options(&mut rd, &mut wr, export, contexts)
                .await
                .with_context(|| format!("NBD handshake with {label} for export '{export}'"))?;
            anyhow::Ok((rd, wr, negotiated))
        };
        let (rd, wr, negotiated) = tokio::time::timeout(io_timeout, handshake)
            .await
            .map_err(|_| {
                anyhow!(
                    "NBD server {label}: no answer within {} (io_timeout) during the handshake for export '{export}'",
                    humantime::format_duration(io_timeout)
                )
            })??;
        let max_request = negotiated.max_block.min(MAX_REQUEST);
        let inflight = Arc::new(Inflight::default());
        let (requests, queued) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_requests(queued, wr, inflight.clone(), label.clone()));
        let reader = tokio::spawn(reader::run(
            rd,
            inflight.clone(),
            label.clone(),
            max_request,
        ));
        Ok(NbdClient {
            export: export.to_string(),
            label,
            io_timeout,
            negotiated,
            max_request,
            inflight,
            requests: Some(requests),
            writer: Some(writer),
            reader: Some(reader),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.negotiated.size
    }

    /// Largest read or write accepted: the server's maximum block size, at most 32 MiB.
    pub fn max_request(&self) -> u32 {
        self.max_request
    }

    /// The server's minimum block size (offsets and lengths must be multiples).
    pub fn min_block(&self) -> u32 {
        self.negotiated.min_block
    }

    /// The server's preferred block size.
    pub fn preferred_block(&self) -> u32 {
        self.negotiated.preferred_block
    }

    pub fn read_only(&self) -> bool {
        self.negotiated.transmission_flags & proto::FLAG_READ_ONLY != 0
    }

    /// Whether the server allows several connections to this export at once.
    pub fn can_multi_conn(&self) -> bool {
        self.negotiated.transmission_flags & proto::FLAG_CAN_MULTI_CONN != 0
    }

    pub fn export(&self) -> &str {
        &self.export
    }

    /// Requests sent (or queued) and not yet fully answered.
    pub fn in_flight(&self) -> usize {
        self.inflight.count()
    }

    /// Extents of `context` covering exactly [offset, offset+length): loops
    /// BLOCK_STATUS until covered (servers may answer short), clips the last
    /// extent, merges adjacent equal-flag extents.
    pub async fn extents(&self, context: &str, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.extents_inner(context, offset, length)
            .await
            .with_context(|| {
                format!(
                    "block status of '{context}' for {length} bytes at offset {offset} \
                     on NBD export '{}'",
                    self.export
                )
            })
    }

    async fn extents_inner(&self, context: &str, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let id = self
            .negotiated
            .contexts
            .iter()
            .find(|(name, _)| name == context)
            .map(|(_, id)| *id)
            .ok_or_else(|| anyhow!("meta context '{context}' was not selected at connect"))?;
        self.check_range(offset, length)?;
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let step = (end - pos).min(BLOCK_STATUS_STEP) as u32;
            let op = Op::BlockStatus { chunks: Vec::new() };
            let Op::BlockStatus { chunks } = self
                .submit(proto::CMD_BLOCK_STATUS, pos, step, op, None)
                .await?
            else {
                bail!("internal error: block status request completed as another kind");
            };
            let descriptors = chunks
                .iter()
                .find(|(c, _)| *c == id)
                .map(|(_, d)| d.as_slice())
                .ok_or_else(|| anyhow!("server sent no status for offset {pos}"))?;
            pos = extents::append(&mut out, pos, end, descriptors)?;
        }
        Ok(out)
    }

    /// Read `len` bytes at `offset` (len <= max_request) into an owned buffer;
    /// holes read as zeros.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.read_inner(offset, len).await.with_context(|| {
            format!(
                "reading {len} bytes at offset {offset} from NBD export '{}'",
                self.export
            )
        })
    }

    async fn read_inner(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        // A reused buffer (crate::buffers), not cleared: a read succeeds only
        // when its reply wrote every byte exactly once (`Coverage`), so none of
        // an earlier chunk's bytes can be returned.
        let op = Op::Read {
            offset,
            buf: crate::buffers::take_overwritten(len as usize),
            covered: Coverage::default(),
        };
        match self.submit(proto::CMD_READ, offset, len, op, None).await? {
            Op::Read { buf, .. } => Ok(buf),
            _ => bail!("internal error: read request completed as another kind"),
        }
    }

    /// Write `data` at `offset` (at most max_request bytes).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_inner(offset, data).await.with_context(|| {
            format!(
                "writing {} bytes at offset {offset} to NBD export '{}'",
                data.len(),
                self.export
            )
        })
    }

    async fn write_inner(&self, offset: u64, data: &[u8]) -> Result<()> {
        ensure!(!self.read_only(), "the export is read-only");
        let len = u32::try_from(data.len())
            .ok()
            .filter(|l| *l <= self.max_request)
            .ok_or_else(|| anyhow!("larger than the maximum request of {}", self.max_request))?;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.submit(proto::CMD_WRITE, offset, len, Op::Plain, Some(data))
            .await?;
        Ok(())
    }

    /// Make completed writes durable (a no-op when the server has no flush).
    pub async fn flush(&self) -> Result<()> {
        if self.negotiated.transmission_flags & proto::FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.submit(proto::CMD_FLUSH, 0, 0, Op::Plain, None)
            .await
            .with_context(|| format!("flushing NBD export '{}'", self.export))?;
        Ok(())
    }

    /// Fail every request now and from now on with `reason`, and close the
    /// connection (the writer and reader tasks end): for a cancelled task, whose
    /// server may never answer.
    pub fn abort(&self, reason: &str) {
        self.inflight.fail_all(reason);
        self.close_socket();
    }

    fn close_socket(&self) {
        if let Some(writer) = &self.writer {
            writer.abort();
        }
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }

    /// Send `NBD_CMD_DISC`, then shut the connection down.
    pub async fn close(mut self) -> Result<()> {
        let disc = Request {
            flags: 0,
            command: proto::CMD_DISC,
            cookie: u64::MAX,
            offset: 0,
            length: 0,
        };
        if let Some(requests) = self.requests.take() {
            // A failed send means the writer already stopped; its result says why.
            let _ = requests.send(disc.encode().to_vec());
        }
        let written = match self.writer.take() {
            Some(writer) => writer.await.map_err(|e| anyhow!("NBD writer task: {e}"))?,
            None => Ok(()),
        };
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
        written.with_context(|| format!("closing NBD export '{}'", self.export))
    }

    /// Register a request, queue it for the writer and wait for its reply.
    async fn submit(
        &self,
        command: u16,
        offset: u64,
        length: u32,
        op: Op,
        payload: Option<&[u8]>,
    ) -> Result<Op> {
        let (cookie, done) = self.inflight.register(op)?;
        let request = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        let mut frame = Vec::with_capacity(proto::REQUEST_LEN + payload.map_or(0, |p| p.len()));
        frame.extend_from_slice(&request.encode());
        if let Some(payload) = payload {
            frame.extend_from_slice(payload);
        }
        let queued = match &self.requests {
            Some(requests) => requests.send(frame).is_ok(),
            None => false,
        };
        if !queued {
            self.inflight.cancel(cookie);
            bail!(self.inflight.broken_reason());
        }
        match tokio::time::timeout(self.io_timeout, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(anyhow!(self.inflight.broken_reason())),
            Err(_) => {
                let reason = format!(
                    "NBD server {}: no answer within {} (io_timeout): is the hypervisor stopped or hung?",
                    self.label,
                    humantime::format_duration(self.io_timeout)
                );
                self.inflight.fail_all(reason.clone());
                self.close_socket();
                Err(anyhow!(self.inflight.broken_reason()))
            }
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size() => Ok(()),
            _ => bail!("beyond the end of the export ({} bytes)", self.size()),
        }
    }

    fn check_request(&self, offset: u64, len: u32) -> Result<()> {
        ensure!(
            len <= self.max_request,
            "larger than the maximum request of {} bytes",
            self.max_request
        );
        self.check_range(offset, u64::from(len))?;
        let min = u64::from(self.min_block());
        let end = offset + u64::from(len);
        ensure!(
            offset % min == 0 && (end % min == 0 || end == self.size()),
            "not aligned to the server's minimum block size of {min} bytes"
        );
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

/// How an address appears in messages.
fn addr_label(addr: &NbdAddr) -> String {
    match addr {
        NbdAddr::Unix { path } => format!("unix:{}", path.display()),
        NbdAddr::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
        NbdAddr::Tcp { host, port } => format!("{host}:{port}"),
        NbdAddr::Tls { host, port, .. } if host.contains(':') => format!("tls:[{host}]:{port}"),
        NbdAddr::Tls { host, port, .. } => format!("tls:{host}:{port}"),
    }
}

/// Connect and run the handshake up to the options: the greeting, the client
/// flags and, for [`NbdAddr::Tls`], `NBD_OPT_STARTTLS` and the TLS handshake.
async fn open(addr: &NbdAddr, export: &str) -> Result<(ReadHalf, WriteHalf)> {
    let (mut rd, mut wr): (ReadHalf, WriteHalf) = match addr {
        NbdAddr::Unix { path } => {
            let (rd, wr) = UnixStream::connect(path).await?.into_split();
            (Box::new(rd), Box::new(wr))
        }
        NbdAddr::Tcp { host, port } => {
            let (rd, wr) = tcp(host, *port).await?.into_split();
            (Box::new(rd), Box::new(wr))
        }
        NbdAddr::Tls {
            host,
            port,
            tls_dir,
        } => {
            // The certificates first: a bad directory is not the server's fault.
            let config = tls::client_config(tls_dir)?;
            let mut stream = tcp(host, *port).await?;
            {
                let (mut rd, mut wr) = stream.split();
                handshake::begin(&mut rd, &mut wr).await?;
                handshake::starttls(&mut rd, &mut wr, export).await?;
            }
            let (rd, wr) = tokio::io::split(tls::connect(config, host, stream).await?);
            return Ok((Box::new(rd), Box::new(wr)));
        }
    };
    handshake::begin(&mut rd, &mut wr).await?;
    Ok((rd, wr))
}

async fn tcp(host: &str, port: u16) -> Result<TcpStream> {
    let stream = TcpStream::connect((host, port)).await?;
    // Requests are small and pipelined; do not let Nagle hold them back.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Write queued requests, batching what is queued into one flush; on a write
/// error fail everything. Ends (shutting the socket's write side) when the
/// client drops its sender.
async fn write_requests(
    mut queued: mpsc::UnboundedReceiver<Vec<u8>>,
    wr: WriteHalf,
    inflight: Arc<Inflight>,
    label: String,
) -> Result<()> {
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(frame) = queued.recv().await {
        if let Err(e) = write_batch(&mut wr, &mut queued, frame).await {
            let reason = format!("NBD connection to {label} failed: sending a request: {e}");
            inflight.fail_all(reason.clone());
            return Err(anyhow!(reason));
        }
    }
    // Best effort: the server may already have closed after NBD_CMD_DISC.
    let _ = wr.shutdown().await;
    Ok(())
}

async fn write_batch(
    wr: &mut BufWriter<WriteHalf>,
    queued: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    first: Vec<u8>,
) -> std::io::Result<()> {
    wr.write_all(&first).await?;
    while let Ok(frame) = queued.try_recv() {
        wr.write_all(&frame).await?;
    }
    wr.flush().await
}
