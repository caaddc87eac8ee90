//! The `vmbackup` binary: everything lives in the library; see `cli::main`.

fn main() -> std::process::ExitCode {
    vmbackup::cli::main()
}
