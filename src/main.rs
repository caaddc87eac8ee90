//! The `vmbackup` binary: everything lives in the library; see `cli::main`.

fn main() -> std::process::ExitCode {
    fixed_mmap_threshold();
    vmbackup::cli::main()
}

/// Chunk buffers (`i2vp_transbuffer`, 4 MiB by default) come from and go back
/// to the kernel: glibc's malloc otherwise raises its mmap threshold after the
/// first large free and from then on keeps freed buffers in per-thread arenas,
/// where eight concurrent backups held about 60 MiB more than the bound of
/// docs/BENCHMARKS.md (R39's memory goal). A fixed threshold turns that off.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const THRESHOLD: libc::c_int = 1 << 20;
        // SAFETY: mallopt only changes allocator parameters; called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        }
    }
}
