#!/usr/bin/env bash
# Longer runs of the randomized lifecycle test (tests/lifecycle_property.rs):
# more seeds and more steps than CI runs. Each seed is a sequence of guest
# writes, backups, failed backups, retention changes, prunes, forgets and GCs
# over simulated days against a real qemu-storage-daemon; a failure prints the
# seed and the steps so far (rerun one seed with LIFECYCLE_SEEDS=N).
#
#   scripts/lifecycle-soak.sh                 # seeds 1..16, 150 steps each
#   LIFECYCLE_SEEDS=7 LIFECYCLE_STEPS=500 scripts/lifecycle-soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export LIFECYCLE_SEEDS="${LIFECYCLE_SEEDS:-$(seq -s, 1 16)}"
export LIFECYCLE_STEPS="${LIFECYCLE_STEPS:-150}"
echo "seeds $LIFECYCLE_SEEDS, $LIFECYCLE_STEPS steps each"
exec cargo test --release --test lifecycle_property -- --nocapture
