#!/usr/bin/env bash
# A tiny Linux guest for vmbackup's recovery tests and demo: Debian's kernel and a
# busybox initramfs, taken from Debian packages with `apt-get download` and
# `dpkg -x` (nothing is installed on the host).
#
#   scripts/tiny-guest.sh OUTDIR      -> OUTDIR/vmlinuz, OUTDIR/initrd.gz
#
# OUTDIR is a cache: when both files exist the script does nothing, so callers
# (the test harness, scripts/demo.sh) build it once and share it. Concurrent
# callers wait for each other (flock on OUTDIR/.lock).
#
# Boot it with a virtio-blk disk and a serial console, e.g.
#   qemu-system-x86_64 -machine q35 -m 256 -nodefaults -serial file:serial.log \
#     -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.gz -append "console=ttyS0 quiet" \
#     -blockdev driver=file,node-name=f0,filename=disk.qcow2 \
#     -blockdev driver=qcow2,node-name=disk0,file=f0 -device virtio-blk-pci,drive=disk0,id=vda
#
# What the guest's /init does, in order (every line it prints starts "VMBACKUP-GUEST: "):
#   1. loads the virtio modules and waits for /dev/vda;
#   2. checks the disk: its first line (at offset 0, NULs ignored) must be
#      "VMBACKUP-MARKER <word>". Without it: prints "no marker on /dev/vda" and powers
#      off at once (a guest that does not boot);
#   3. prints "marker <word>" and "md5 <hex>" of the disk's first 4 MiB (what it read);
#   4. writes "VMBACKUP-GUEST-WROTE <word>" into the 4 KiB block at offset 4 MiB, syncs;
#   5. prints "ready <word>" and stays up (idle) until the VM is stopped.
# The disk must be at least 8 MiB.
set -euo pipefail

OUT=${1:?usage: tiny-guest.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec 9>"$OUT/.lock"
flock 9
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.gz" ]; then
  exit 0
fi

W=$(mktemp -d "${TMPDIR:-/tmp}/vmbackup-tiny-guest.XXXXXX")
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/debs" "$W/x" "$W/initrd/bin" "$W/initrd/lib/modules"

kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}
KPKG=$(kernel_package)
if [ -z "$KPKG" ]; then
  # A fresh machine may have no package lists yet.
  apt-get update -q >/dev/null
  KPKG=$(kernel_package)
fi
[ -n "$KPKG" ] || { echo "tiny-guest: cannot find Debian's kernel package (apt-cache depends linux-image-amd64)" >&2; exit 1; }
download() { (cd "$W/debs" && apt-get download -q "$KPKG" busybox-static >/dev/null 2>&1); }
if ! download; then
  apt-get update -q >/dev/null
  download || { echo "tiny-guest: apt-get download $KPKG busybox-static failed" >&2; exit 1; }
fi
for d in "$W"/debs/*.deb; do dpkg -x "$d" "$W/x"; done

cp "$W"/x/boot/vmlinuz-* "$W/vmlinuz"
cp "$W/x/bin/busybox" "$W/initrd/bin/busybox"
MODULES="virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev virtio/virtio_pci block/virtio_blk"
for m in $MODULES; do
  f=$(find "$W/x/lib/modules" -path "*/drivers/$m.ko*" | head -1)
  [ -n "$f" ] || { echo "tiny-guest: module $m not in $KPKG" >&2; exit 1; }
  case $f in
    *.xz) xz -dc "$f" ;;
    *.zst) zstd -dc "$f" ;;
    *) cat "$f" ;;
  esac > "$W/initrd/lib/modules/${m#*/}.ko"
done

cat > "$W/initrd/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "VMBACKUP-GUEST: $*"; }
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -b /dev/vda ]; then say "no disk /dev/vda"; poweroff -f; fi
line=$(dd if=/dev/vda bs=64 count=1 2>/dev/null | tr -d '\000' | head -n 1)
case "$line" in
  "VMBACKUP-MARKER "*) word=${line#VMBACKUP-MARKER } ;;
  *) say "no marker on /dev/vda"; sync; poweroff -f ;;
esac
say "marker $word"
say "md5 $(dd if=/dev/vda bs=1048576 count=4 2>/dev/null | md5sum | cut -d' ' -f1)"
printf 'VMBACKUP-GUEST-WROTE %s\n' "$word" | dd of=/dev/vda bs=4096 seek=1024 conv=sync,notrunc 2>/dev/null
sync
say "ready $word"
while :; do sleep 3600; done
EOF
chmod 0755 "$W/initrd/init"
(cd "$W/initrd" && find . | "$W/x/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$W/initrd.gz"

# Publish: each file appears complete or not at all.
mv "$W/vmlinuz" "$OUT/.vmlinuz.tmp" && mv "$OUT/.vmlinuz.tmp" "$OUT/vmlinuz"
mv "$W/initrd.gz" "$OUT/.initrd.gz.tmp" && mv "$OUT/.initrd.gz.tmp" "$OUT/initrd.gz"
echo "tiny-guest: $KPKG + busybox-static -> $OUT/vmlinuz, $OUT/initrd.gz"
