#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
# install test dependencies (as root), check formatting and lints, run every test
# against real QEMU processes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
