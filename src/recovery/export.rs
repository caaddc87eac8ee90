//! A restore point as NBD exports: one per disk, named by the disk, served from
//! a [`PointReader`] (zero slots are holes in `base:allocation`, so `qemu-img
//! convert`, `nbdcopy` and mirror jobs skip them).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;

use crate::nbd::server::{serve_unix, BlockSource, Export, Piece, RunningServer};
use crate::nbd::{STATE_HOLE, STATE_ZERO};
use crate::repo::{Manifest, Repository};
use crate::restore::{PointReader, Span, DEFAULT_CACHE_BYTES};

/// One disk of a point, as an NBD block source.
struct DiskSource {
    reader: Arc<PointReader>,
    disk: usize,
}

impl BlockSource for DiskSource {
    fn size(&self) -> u64 {
        self.reader.disk_index(self.disk).disk_size
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<Piece>> {
        let spans = self.reader.spans(self.disk, offset, u64::from(len))?;
        Ok(spans
            .into_iter()
            .map(|s| match s {
                Span::Data(b) => Piece::Data(b),
                Span::Zero(n) => Piece::Zero(n as u32),
            })
            .collect())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        Ok(self
            .reader
            .allocation(self.disk, offset, len)
            .into_iter()
            .map(|(n, zero)| (n, if zero { STATE_HOLE | STATE_ZERO } else { 0 }))
            .collect())
    }

    fn prefetch(&self, offset: u64, len: u32) {
        self.reader.prefetch(self.disk, offset, u64::from(len));
    }
}

/// Serve every disk of the point `reader` reads on a unix socket at `socket`.
/// Must run inside a tokio runtime.
pub fn serve_point(reader: Arc<PointReader>, vm: &str, socket: &Path) -> Result<RunningServer> {
    let exports = reader
        .disk_names()
        .enumerate()
        .map(|(disk, name)| Export {
            name: name.to_string(),
            description: format!("VM '{vm}' disk '{name}' at point {}", reader.point()),
            source: Arc::new(DiskSource {
                reader: reader.clone(),
                disk,
            }),
        })
        .collect();
    serve_unix(socket, exports)
}

/// Serve every disk of `point` (VM `vm`, key `vm_key`) from this process, on
/// `<dir>/nbd.sock` (`dir`: a private directory of the caller's), with the
/// default cache. Returns the server (stop it with `rt.block_on(server.stop())`)
/// and its socket.
pub fn serve_here(
    repo: &Repository,
    vm_key: &str,
    vm: &str,
    point: &Manifest,
    dir: &Path,
    rt: &tokio::runtime::Handle,
) -> Result<(RunningServer, PathBuf)> {
    let reader = Arc::new(PointReader::open(
        Arc::new(repo.clone()),
        vm_key,
        point,
        DEFAULT_CACHE_BYTES,
    )?);
    let socket = dir.join("nbd.sock");
    let _in = rt.enter();
    Ok((serve_point(reader, vm, &socket)?, socket))
}

/// The NBD URI of an export on a unix socket.
pub fn unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}
