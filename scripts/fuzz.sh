#!/usr/bin/env bash
# The parser property tests (tests/parsers_never_panic.rs) with many more cases
# than the suite runs: every decoder of untrusted bytes (NBD replies and handshake,
# QMP messages, chunk/delta/index objects, manifests, system.conf) must give a
# value or an error for each input: no panic, no hang, no allocation beyond the
# object's declared bound.
#
#   scripts/fuzz.sh            # 100000 cases per property (a first build, then about 10 minutes)
#   scripts/fuzz.sh 20000      # fewer
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-100000}
# Optimised, but with overflow checks and debug assertions: an arithmetic
# overflow must show as a failure here, as it does in the suite's debug build.
# A target directory of its own keeps the normal release build untouched.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/fuzz}"
export CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true
PROPTEST_CASES=$cases cargo test --release --test parsers_never_panic -- --test-threads 2
