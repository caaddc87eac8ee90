#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
# install test dependencies (as root), check formatting and lints, run every test
# against real QEMU processes and a private libvirtd.
#
# libvirt: a private virtlogd + libvirtd (scripts/test-libvirtd.sh, no systemd needed)
# runs for the duration of the tests; QEMU runs as libvirt's unprivileged user. While
# the code compiles, libvirt probes QEMU once (its capabilities cache is private, so
# the first domain would otherwise wait for that) and the tiny test guest is built.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# A clean build of every test target takes about 2.5 GB under target/ (debug builds
# keep line tables only, see Cargo.toml). Too little disk is said here, plainly,
# rather than as a linker killed by SIGBUS halfway through the build.
free_mib=$(( $(df -Pk . | awk 'NR == 2 { print $4 }') / 1024 ))
echo "test.sh: $free_mib MiB free on the disk holding target/"
if [ "$free_mib" -lt 3072 ]; then
  echo "test.sh: the build and the tests need at least 3072 MiB free there" >&2
  exit 1
fi
LV=$PWD/target/test-libvirtd
mkdir -p target
VMBACKUP_TEST_LIBVIRT_URI=$(scripts/test-libvirtd.sh start "$LV")
export VMBACKUP_TEST_LIBVIRT_URI
trap 'scripts/test-libvirtd.sh stop "$LV"' EXIT
export VMBACKUP_TEST_GUEST_DIR=$PWD/target/tiny-guest
virsh -c "$VMBACKUP_TEST_LIBVIRT_URI" domcapabilities --virttype qemu >/dev/null 2>&1 &
warm=$!
scripts/tiny-guest.sh "$VMBACKUP_TEST_GUEST_DIR" > target/tiny-guest.log 2>&1 &
guest=$!
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets --no-run
wait "$warm" || true
wait "$guest" || { cat target/tiny-guest.log >&2; echo "test.sh: building the tiny guest failed" >&2; exit 1; }
cargo test --all-targets
