//! The private staging directory of a restore, inside its destination.
//!
//! vmbackup runs as root and the destination may be a directory others can write
//! to, so nothing is created there by a name someone could predict or pre-create:
//! a directory `.vmbackup-restore-<random>` is made with `mkdirat` (mode 0700,
//! which fails if the name exists), opened with `O_NOFOLLOW` and checked, and
//! everything else happens relative to that open directory: files are created
//! with `O_CREAT|O_EXCL|O_NOFOLLOW`, child processes (`qemu-img`) are handed
//! `/proc/<pid>/fd/<n>/<name>`, which names that very directory whatever is
//! renamed or planted meanwhile, and each finished image is moved out with
//! `renameat2(RENAME_NOREPLACE)` (a plain rename with `--force`). Dropping the
//! [`Staging`] removes what is left in it and the directory itself.
//!
//! A restore killed before that (SIGKILL, power loss) leaves the directory; its
//! path is recorded in the task row, and `cleanup` or the next restore into the
//! same destination removes it ([`remove_stale`]).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

/// Every staging directory's name starts with this.
pub const PREFIX: &str = ".vmbackup-restore-";

/// A private directory inside the destination, open.
#[derive(Debug)]
pub struct Staging {
    /// The destination directory, open (the images are moved into it).
    dest: OwnedFd,
    dest_path: PathBuf,
    dir: OwnedFd,
    name: String,
    /// Names created inside and not yet moved out (removed on drop).
    files: Vec<String>,
}

impl Staging {
    /// Make the staging directory inside `dest` (an existing directory).
    pub fn create(dest: &Path) -> Result<Staging> {
        let dest_fd = rustix::fs::open(
            dest,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open destination directory {}", dest.display()))?;
        let mut attempts = 0;
        let name = loop {
            let name = format!("{PREFIX}{}", random_hex()?);
            match rustix::fs::mkdirat(&dest_fd, name.as_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => break name,
                Err(Errno::EXIST) if attempts < 16 => attempts += 1,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot create a staging directory in {}", dest.display())
                    })
                }
            }
        };
        let dir = rustix::fs::openat(
            &dest_fd,
            name.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open staging directory {name} in {}", dest.display()))?;
        let st = rustix::fs::fstat(&dir)?;
        if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
            bail!(
                "staging directory {name} in {} is not private to this user: refusing to write into it",
                dest.display()
            );
        }
        Ok(Staging {
            dest: dest_fd,
            dest_path: dest.to_path_buf(),
            dir,
            name,
            files: Vec::new(),
        })
    }

    /// The staging directory's path (for the task row and messages).
    pub fn path(&self) -> PathBuf {
        self.dest_path.join(&self.name)
    }

    /// Create `name` inside, new, mode 0600, for reading and writing.
    pub fn create_file(&mut self, name: &str) -> Result<File> {
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("cannot create {} in {}", name, self.path().display()))?;
        self.files.push(name.to_string());
        Ok(File::from(fd))
    }

    /// A path naming `name` inside this very directory, for a child process: the
    /// directory is reached through this process's open descriptor.
    pub fn child_path(&mut self, name: &str) -> PathBuf {
        if !self.files.iter().any(|f| f == name) {
            self.files.push(name.to_string());
        }
        PathBuf::from(format!(
            "/proc/{}/fd/{}/{name}",
            std::process::id(),
            self.dir.as_raw_fd()
        ))
    }

    /// Set `name`'s mode and make its data durable (it must be a regular file).
    pub fn finish_file(&self, name: &str, mode: u32) -> Result<()> {
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open {} in {}", name, self.path().display()))?;
        let st = rustix::fs::fstat(&fd)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            bail!("{name} in {} is not a regular file", self.path().display());
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
            .with_context(|| format!("cannot set the mode of {name}"))?;
        File::from(fd)
            .sync_all()
            .with_context(|| format!("cannot fsync {name}"))
    }

    /// Move `name` out to `<dest>/<final_name>`; an existing entry there is an
    /// error unless `replace`.
    pub fn publish(&mut self, name: &str, final_name: &str, replace: bool) -> Result<PathBuf> {
        let flags = if replace {
            RenameFlags::empty()
        } else {
            RenameFlags::NOREPLACE
        };
        let target = self.dest_path.join(final_name);
        match rustix::fs::renameat_with(&self.dir, name, &self.dest, final_name, flags) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                return Err(crate::error::invalid(
                    "--to",
                    self.dest_path.display(),
                    format!(
                        "{} appeared during the restore; pass --force to overwrite",
                        target.display()
                    ),
                ))
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot move {name} to {}", target.display()))
            }
        }
        self.files.retain(|f| f != name);
        Ok(target)
    }

    /// Remove `name` inside (an intermediate file).
    pub fn remove(&mut self, name: &str) {
        let _ = rustix::fs::unlinkat(&self.dir, name, AtFlags::empty());
        self.files.retain(|f| f != name);
    }

    /// fsync the destination directory (the renames into it).
    pub fn sync_dest(&self) -> Result<()> {
        rustix::fs::fsync(&self.dest)
            .with_context(|| format!("cannot fsync directory {}", self.dest_path.display()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for f in std::mem::take(&mut self.files) {
            let _ = rustix::fs::unlinkat(&self.dir, f.as_str(), AtFlags::empty());
        }
        let _ = rustix::fs::unlinkat(&self.dest, self.name.as_str(), AtFlags::REMOVEDIR);
    }
}

/// 16 hex digits from the kernel's random source.
fn random_hex() -> Result<String> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Remove the staging directory a killed restore left at `path`, if it is one:
/// a directory (not a symlink) of this user whose name has [`PREFIX`]. Returns
/// whether something was removed.
pub fn remove_stale(path: &Path) -> Result<bool> {
    let is_ours_by_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(PREFIX));
    if !is_ours_by_name {
        bail!(
            "{} is not a vmbackup staging directory; left alone",
            path.display()
        );
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
    };
    use std::os::unix::fs::MetadataExt;
    if !meta.file_type().is_dir() || meta.uid() != rustix::process::geteuid().as_raw() {
        bail!(
            "{} is not a staging directory of this user; left alone",
            path.display()
        );
    }
    // remove_dir_all does not follow symlinks, inside or at the top.
    std::fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(true)
}
