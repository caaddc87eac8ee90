#!/usr/bin/env bash
# The kill campaign (docs/RELIABILITY.md): SIGKILL vmbackup at distinct moments
# of fulls, incrementals, differentials and restores of a real VM, let the next
# runs and `cleanup` repair, then restore every listed point against its shadow
# digest and check that QEMU holds no vmbackup block job, export, node or extra
# bitmap and that no scratch or staging file is left. Prints the counts; exits 1
# when anything does not hold.
#
#   scripts/faults.sh          # 24 kills (6 per kind)
#   scripts/faults.sh 40       # more
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --quiet --bin vmbackup
CARGO_BIN_EXE_vmbackup="$PWD/target/release/vmbackup" \
  cargo run --release --quiet --example kill_campaign -- "${1:-24}"
