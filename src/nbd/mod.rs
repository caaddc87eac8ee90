//! NBD client: how vmbackup reads disks from a hypervisor's NBD export.
//!
//! One [`NbdClient`] is one connection to one export, negotiated with the fixed
//! newstyle handshake, structured replies, the requested meta contexts
//! (`base:allocation`, `qemu:dirty-bitmap:NAME`) and the server's block size
//! limits. Its methods take `&self`, so many reads can be in flight at once on the
//! one connection; this is what keeps a backup fast when the server is far away.
//!
//! ```text
//! callers ──register──► inflight (cookie → request) ◄──route by cookie── reader task ◄── socket
//!    └──────queue bytes──► writer task ──────────────────────────────────────────────► socket
//! ```
//!
//! Files: [`proto`] wire format (no I/O), [`handshake`] option haggling,
//! [`client`] the public handle and writer, [`reader`] reply framing and routing,
//! [`inflight`] the request table, [`extents`] block status assembly, [`tls`] TLS
//! (`NBD_OPT_STARTTLS`, x509 certificates), [`uri`] NBD URIs. Errors name the export, the request (offset, length) and the server's
//! message; a broken connection fails every pending request with one reason.

pub mod client;
pub mod extents;
pub mod handshake;
pub mod inflight;
pub mod proto;
pub mod reader;
pub mod server;
pub mod tls;
pub mod uri;

pub use crate::platform::NbdAddr;
pub use client::NbdClient;
pub use extents::Extent;
pub use uri::parse_uri;

/// `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the extent reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME`: the extent changed since the bitmap started.
pub const DIRTY: u32 = 1;

/// The meta context that reports allocation (holes and zeros).
pub const BASE_ALLOCATION: &str = "base:allocation";
