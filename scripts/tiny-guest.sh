#!/usr/bin/env bash
# The tiny test guest: Debian's kernel and a busybox initramfs that also holds
# qemu-guest-agent and the modules for virtio disks, the virtio console (the
# agent's channel) and ext4. Nothing is installed on the host: the packages are
# downloaded (apt-get download) and unpacked (dpkg -x).
#
#   scripts/tiny-guest.sh DIR      -> DIR/vmlinuz, DIR/initrd.gz
#
# DIR is a cache shared by every test of a run (scripts/test.sh builds it once into
# $VMBACKUP_TEST_GUEST_DIR) and by the demo: when both files exist and were built by
# this version of the script, it does nothing. Concurrent callers wait for each
# other (flock on DIR/.lock); each file appears complete or not at all.
#
# The guest's /init waits for /dev/vda, then acts on its kernel command line, in order:
#   vmb.marker=1    the disk's first line (offset 0, NULs ignored) must be
#                   "VMBACKUP-MARKER <word>": prints "VMB-MARKER <word>"; without it
#                   prints "VMB-NO-MARKER /dev/vda" and powers off at once (a guest that
#                   does not boot: what `verify --boot` must catch)
#   vmb.sum=DEV     print "VMB-SUM <sha256 of DEV>" on the serial console
#   vmb.agent=1     mount /dev/vda (ext4) on /mnt and run qemu-ga on the virtio port
#                   org.qemu.guest_agent.0 (its fsfreeze freezes /mnt, in the guest)
# and prints "VMB-READY" once it is done with them. It never writes to its disk and
# never powers off by itself otherwise.
# NEVER run qemu-ga on the host: its fsfreeze would freeze the host's file systems.
#
# Boot it with a virtio-blk disk and a serial console, e.g.
#   qemu-system-x86_64 -machine q35 -m 256 -nodefaults -serial file:serial.log \
#     -kernel DIR/vmlinuz -initrd DIR/initrd.gz -append "console=ttyS0 quiet vmb.sum=/dev/vda" \
#     -blockdev driver=file,node-name=f0,filename=disk.qcow2 \
#     -blockdev driver=qcow2,node-name=disk0,file=f0 -device virtio-blk-pci,drive=disk0
set -euo pipefail
OUT=${1:?usage: $0 DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
exec 9>"$OUT/.lock"
flock 9
VERSION=$(sha256sum < "$0" | cut -d' ' -f1)
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.gz" ] && [ "$(cat "$OUT/.version" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
W=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$W"' EXIT
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ] && [ "$(id -u)" = 0 ]; then   # empty package lists on a fresh machine
  apt-get update -q >/dev/null
  KPKG=$(kernel_pkg)
fi
[ -n "$KPKG" ] || { echo "tiny-guest: no linux-image package known to apt (apt-get update?)" >&2; exit 1; }
mkdir -p "$W/debs" "$W/x" "$W/root/bin" "$W/root/lib/modules" "$W/root/usr/sbin"
download() { (cd "$W/debs" && apt-get download -q "$KPKG" busybox-static qemu-guest-agent libnuma1 liburing2 >/dev/null 2>&1); }
if ! download; then   # stale package lists: the kernel's version moved on
  [ "$(id -u)" = 0 ] && apt-get update -q >/dev/null
  rm -f "$W"/debs/*.deb
  download || { echo "tiny-guest: apt-get download $KPKG busybox-static qemu-guest-agent failed" >&2; exit 1; }
fi
for d in "$W"/debs/*.deb; do dpkg -x "$d" "$W/x"; done
cp "$W"/x/boot/vmlinuz-* "$W/vmlinuz"
cp "$W/x/bin/busybox" "$W/root/bin/"
cp "$W/x/usr/sbin/qemu-ga" "$W/root/usr/sbin/"
# qemu-ga's shared libraries: from the unpacked packages when there, else the host's.
LIBS="$W/x/usr/lib/x86_64-linux-gnu:$W/x/lib/x86_64-linux-gnu"
LD_LIBRARY_PATH=$LIBS ldd "$W/x/usr/sbin/qemu-ga" | awk '/=> \//{print $3} /^\s*\/lib/{print $1}' |
  while read -r lib; do
    dest="$W/root/lib/x86_64-linux-gnu"; mkdir -p "$dest"
    cp -L "$lib" "$dest/"
  done
mkdir -p "$W/root/lib64"; cp -L /lib64/ld-linux-x86-64.so.2 "$W/root/lib64/"
# Modules with their dependencies (the "depends=" of each module's .modinfo), each
# after what it needs.
unpack() { case $1 in *.xz) xz -dc "$1" ;; *.zst) zstd -qdc "$1" ;; *) cat "$1" ;; esac; }
MODDIR=$(ls -d "$W"/x/lib/modules/*)
order=()
add() {
  local m=$1 path dep
  path=$(find "$MODDIR" -name "$m.ko*" -o -name "${m//_/-}.ko*" | head -1)
  [ -n "$path" ] || return 0   # built into the kernel
  for p in "${order[@]:-}"; do [ "$p" = "$path" ] && return 0; done
  for dep in $(unpack "$path" | grep -ao 'depends=[a-z0-9_,-]*' | head -1 | cut -d= -f2 | tr ',' ' '); do add "$dep"; done
  order+=("$path")
}
for m in virtio_pci virtio_blk virtio_console crc32c_generic ext4; do add "$m"; done
: > "$W/root/lib/modules/order"
for p in "${order[@]}"; do
  n=${p##*/}; n=${n%%.ko*}
  unpack "$p" > "$W/root/lib/modules/$n.ko"
  echo "$n" >> "$W/root/lib/modules/order"
done
cat > "$W/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /mnt /run /tmp /var/run
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p"; }
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ "$(arg vmb.marker)" = 1 ]; then
  line=$(dd if=/dev/vda bs=64 count=1 2>/dev/null | tr -d '\000' | head -n 1)
  case "$line" in
    "VMBACKUP-MARKER "*) echo "VMB-MARKER ${line#VMBACKUP-MARKER }" ;;
    *) echo "VMB-NO-MARKER /dev/vda"; sync; poweroff -f ;;
  esac
fi
SUM=$(arg vmb.sum)
[ -n "$SUM" ] && echo "VMB-SUM $(sha256sum "$SUM" | cut -d' ' -f1)"
if [ "$(arg vmb.agent)" = 1 ]; then
  mount -t ext4 /dev/vda /mnt && echo "VMB-MOUNTED"
  port=
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
  done
  [ -n "$port" ] && { /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /run -d && echo "VMB-AGENT $port"; }
fi
echo "VMB-READY"
while true; do sleep 3600; done
INIT
chmod +x "$W/root/init"
(cd "$W/root" && find . | "$W/root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$W/initrd.gz"
# Publish: each file appears complete or not at all; the version last.
rm -f "$OUT/.version"
mv "$W/vmlinuz" "$OUT/vmlinuz"; mv "$W/initrd.gz" "$OUT/initrd.gz"
echo "$VERSION" > "$OUT/.version"
echo "tiny-guest: $KPKG -> $OUT/vmlinuz $OUT/initrd.gz ($(du -k "$OUT/initrd.gz" | cut -f1) KiB initramfs)"
