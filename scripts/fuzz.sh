#!/usr/bin/env bash
# The parser property tests (tests/parsers_never_panic.rs) with many more cases
# than the suite runs: every decoder of untrusted bytes (NBD replies and handshake,
# QMP messages, chunk/delta/index objects, manifests, system.conf) must give a
# value or an error for each input: no panic, no hang, no allocation beyond the
# object's declared bound.
#
#   scripts/fuzz.sh            # 100000 cases per property (long: 20000 took 12 minutes
#                              # on a loaded 2-core machine)
#   scripts/fuzz.sh 20000      # fewer
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-100000}
# The test profile, as in the suite: overflow checks and debug assertions on
# (an arithmetic overflow must show as a failure), dependencies optimised.
PROPTEST_CASES=$cases cargo test --test parsers_never_panic -- --test-threads 2
