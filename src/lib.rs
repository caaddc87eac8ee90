//! vmbackup: agentless, image-level VM backup with changed-block tracking.
//!
//! Data flows one way (docs/ARCHITECTURE.md has the picture):
//!
//! ```text
//! cli ──► state (SQLite: platforms, targets, rules, tasks)
//!  │
//!  └─► backup ──► platform (QMP: snapshot + dirty bitmaps, NBD exports)
//!        │          └─► nbd (client: BLOCK_STATUS, pipelined READ)
//!        └─► repo (chunk store, point indexes, manifests, locks: objects in a Store)
//!  restore ◄── repo
//!  lifecycle ──► repo (a rule's repository, retention, forget, GC, delete data)
//! ```
//!
//! The CLI (`cli`) turns arguments into resolved values; nothing below it knows clap.

pub mod backup;
pub mod buffers;
pub mod cli;
pub mod clock;
pub mod config;
pub mod direct_io;
pub mod error;
pub mod level;
pub mod lifecycle;
pub mod monitor;
pub mod nbd;
pub mod platform;
pub mod policy;
pub mod private_dir;
pub mod recovery;
pub mod repo;
pub mod restore;
pub mod runner;
pub mod state;
pub mod stats;
pub mod task;
pub mod timefmt;
pub mod units;
