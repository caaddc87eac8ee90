//! Format constants and the repository config file `vmbackup-repo.toml`.
//!
//! Every stored object starts with an 8-byte magic naming its type and version
//! (docs/FORMAT.md, "Object types"). WARNING: never change a magic's meaning; a new
//! layout gets a new magic, and readers refuse magics they do not know.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::invalid;
use crate::units::{format_size, KIB, MIB};

/// The repository format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// The name of the config file at the repository root.
pub const CONFIG_FILE: &str = "vmbackup-repo.toml";

/// Magic of a chunk object, version 1.
pub const CHUNK_MAGIC: [u8; 8] = *b"VMBCHNK1";
/// Magic of a delta object (a base chunk plus patches), version 1.
pub const DELTA_MAGIC: [u8; 8] = *b"VMBDLTA1";
/// Magic of a disk index object, version 1.
pub const INDEX_MAGIC: [u8; 8] = *b"VMBINDX1";

/// Smallest chunk size a point may use (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = (64 * KIB) as u32;
/// Largest chunk size a point may use (32 MiB).
pub const MAX_CHUNK_SIZE: u32 = (32 * MIB) as u32;

/// Check a chunk size: a power of two from 64 KiB to 32 MiB.
pub fn check_chunk_size(size: u32) -> Result<()> {
    if size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(invalid(
            "chunk size",
            format_size(u64::from(size)),
            "expected a power of two from 64K to 32M",
        ))
    }
}

/// Check the magic at the start of `bytes` read from `path`. A magic of the
/// vmbackup family that this build does not know is refused with a hint to upgrade.
pub fn check_magic(bytes: &[u8], expected: &[u8; 8], path: &Path) -> Result<()> {
    let Some(found) = bytes.get(..8) else {
        bail!(
            "{} is too short ({} bytes) to be a vmbackup object",
            path.display(),
            bytes.len()
        );
    };
    if found == expected {
        return Ok(());
    }
    let expected = String::from_utf8_lossy(expected);
    if found.starts_with(b"VMB") {
        bail!(
            "{} has object type '{}', which this vmbackup cannot read (it reads '{expected}'); \
             a newer vmbackup wrote it",
            path.display(),
            found.escape_ascii()
        );
    }
    bail!(
        "{} is not a vmbackup object (magic '{}', expected '{expected}')",
        path.display(),
        found.escape_ascii()
    )
}

/// The contents of `vmbackup-repo.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Repository format version; readers refuse versions they do not know.
    pub format: u32,
    /// Chunk digest algorithm; only `"blake3"`.
    pub digest: String,
    /// Chunk compression; only `"zstd"` (chunks may still be stored raw).
    pub compression: String,
}

impl RepoConfig {
    /// The config a new repository gets.
    pub fn current() -> RepoConfig {
        RepoConfig {
            format: FORMAT_VERSION,
            digest: "blake3".to_string(),
            compression: "zstd".to_string(),
        }
    }

    /// Parse and validate the config file's text (read from `what`, for messages).
    pub fn parse(text: &str, what: &str) -> Result<RepoConfig> {
        let config: RepoConfig = toml::from_str(text)
            .with_context(|| format!("cannot parse repository config {what}"))?;
        config
            .check()
            .with_context(|| format!("repository config {what}"))?;
        Ok(config)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("cannot serialize repository config")
    }

    fn check(&self) -> Result<()> {
        if self.format != FORMAT_VERSION {
            bail!(
                "repository format {} is not supported (this vmbackup reads format {FORMAT_VERSION})",
                self.format
            );
        }
        if self.digest != "blake3" {
            bail!("digest '{}' is not supported (only 'blake3')", self.digest);
        }
        if self.compression != "zstd" {
            bail!(
                "compression '{}' is not supported (only 'zstd')",
                self.compression
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_powers_of_two_in_range() {
        for ok in [64 * 1024, 4 * 1024 * 1024, 32 * 1024 * 1024] {
            check_chunk_size(ok).unwrap();
        }
        for bad in [0, 4096, 32 * 1024, 3 * 1024 * 1024, 64 * 1024 * 1024] {
            let err = check_chunk_size(bad).unwrap_err();
            assert_eq!(
                crate::error::exit_code_of(&err),
                crate::error::ExitCode::Usage
            );
        }
    }

    #[test]
    fn unknown_magics_are_refused_clearly() {
        let p = Path::new("/r/x");
        check_magic(b"VMBCHNK1rest", &CHUNK_MAGIC, p).unwrap();
        let newer = check_magic(b"VMBCHNK2rest", &CHUNK_MAGIC, p).unwrap_err();
        assert!(newer.to_string().contains("'VMBCHNK2'"), "{newer}");
        assert!(newer.to_string().contains("newer vmbackup"), "{newer}");
        let other = check_magic(b"\x89PNG\r\n\x1a\n", &INDEX_MAGIC, p).unwrap_err();
        assert!(
            other.to_string().contains("not a vmbackup object"),
            "{other}"
        );
        let short = check_magic(b"VMB", &INDEX_MAGIC, p).unwrap_err();
        assert!(short.to_string().contains("too short"), "{short}");
    }

    #[test]
    fn config_round_trips_and_future_versions_are_refused() {
        let text = RepoConfig::current().to_toml().unwrap();
        assert_eq!(
            RepoConfig::parse(&text, CONFIG_FILE).unwrap(),
            RepoConfig::current()
        );
        let newer = "format = 2\ndigest = \"blake3\"\ncompression = \"zstd\"\n";
        let err = RepoConfig::parse(newer, CONFIG_FILE).unwrap_err();
        assert!(
            format!("{err:#}").contains("repository format 2 is not supported"),
            "{err:#}"
        );
    }
}
