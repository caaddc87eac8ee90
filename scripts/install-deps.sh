#!/usr/bin/env bash
# Install what vmbackup's tests and demo need on Debian 12 (bookworm), as root. Idempotent.
#
#   qemu-storage-daemon, qemu-img, qemu-io, qemu-nbd  (package qemu-utils; 10.0.x expected)
#   qemu-system-x86_64 of the SAME version as qemu-utils (TCG VMs in tests)
#   nbdinfo, nbdcopy (libnbd-bin): independent NBD oracles in tests and the benchmark
#   nbdkit with its delay and error filters: injected NBD faults in tests and scripts/faults.sh
#   libvirtd, virtlogd, virsh, libvirt.so.0 (libvirt-daemon-system, libvirt-clients,
#     libvirt-daemon-driver-qemu): the libvirt platform's tests run a private libvirtd
#     (scripts/test-libvirtd.sh). vmbackup itself needs only libvirt.so.0 (libvirt0),
#     and only for libvirt platforms: it loads the library at run time.
#   xz-utils, e2fsprogs: the tiny test guest (scripts/tiny-guest.sh)
#
# Debian bookworm's qemu-system-x86 is 7.2, and qemu-utils 10.x "Breaks" its
# qemu-system-common: installing it plainly would REMOVE qemu-utils 10. When
# qemu-utils is a bookworm-backports build, take qemu-system from the same
# backports suite, pinned to the exact installed version, through a private apt
# state directory (/etc/apt is not modified).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
need=()
have qemu-storage-daemon && have qemu-img && have qemu-io || need+=(qemu)
have qemu-system-x86_64 || need+=(qemu-system)
have nbdinfo && have nbdcopy || need+=(libnbd-bin)
have nbdkit || need+=(nbdkit)
have libvirtd && have virtlogd && have virsh || need+=(libvirt)
have xz && have mkfs.ext4 || need+=(xz-utils e2fsprogs)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-deps: missing ${need[*]}; run this script as root to install them" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold)
apt-get update -q >/dev/null

if ! have qemu-storage-daemon || ! have qemu-img; then
  "${APT[@]}" qemu-utils >/dev/null
fi
if ! have nbdinfo || ! have nbdcopy; then
  "${APT[@]}" libnbd-bin >/dev/null
fi
if ! have nbdkit; then
  "${APT[@]}" nbdkit >/dev/null
fi
if ! have xz || ! have mkfs.ext4; then
  "${APT[@]}" xz-utils e2fsprogs >/dev/null
fi
if ! have qemu-system-x86_64; then
  QU=$(dpkg-query -W -f '${Version}' qemu-utils)
  if [[ $QU == *bpo12* ]]; then
    B=/var/tmp/vmbackup-apt-bpo
    mkdir -p "$B/lists/partial" "$B/archives/partial"
    MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2=="bookworm"{print $1; exit}')
    [ -n "$MIRROR" ] || { echo "install-deps: no bookworm apt source configured" >&2; exit 1; }
    echo "deb $MIRROR bookworm-backports main" > "$B/sources.list"
    O=(-o "Dir::Etc::sourcelist=$B/sources.list" -o "Dir::State::lists=$B/lists" -o "Dir::Cache::archives=$B/archives")
    apt-get "${O[@]}" update -q >/dev/null
    "${APT[@]}" "${O[@]}" "qemu-system-x86=$QU" "qemu-system-common=$QU" "qemu-system-data=$QU" \
      seabios/bookworm-backports >/dev/null
  else
    "${APT[@]}" qemu-system-x86 >/dev/null
  fi
fi
# After qemu-system: libvirt 9.0 (bookworm) does not depend on qemu-system and runs the
# backports QEMU installed above. Its daemons are started by the tests, never as services.
if ! have libvirtd || ! have virtlogd || ! have virsh; then
  "${APT[@]}" libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu >/dev/null
fi
for c in qemu-storage-daemon qemu-img qemu-io qemu-system-x86_64 nbdinfo nbdcopy nbdkit libvirtd virtlogd virsh; do
  have "$c" || { echo "install-deps: $c still missing" >&2; exit 1; }
done
echo "install-deps: $(qemu-img --version | head -1); $(qemu-system-x86_64 --version | head -1); $(nbdinfo --version | head -1); $(nbdkit --version | head -1); $(libvirtd --version)"
