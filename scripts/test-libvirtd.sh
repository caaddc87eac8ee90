#!/usr/bin/env bash
# A private libvirtd + virtlogd for the tests (no systemd needed), as on a real host:
# QEMU runs as libvirt's unprivileged user (libvirt-qemu), domains are TCG.
#
#   scripts/test-libvirtd.sh start DIR    start both daemons (or reuse the ones DIR has
#                                         running), print the connection URI
#   scripts/test-libvirtd.sh stop DIR     destroy and undefine every domain they run,
#                                         stop them (only the ones started from DIR)
#
# The daemons run in their own mount namespace in which /etc/libvirt, /run/libvirt,
# /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt are directories under DIR:
# they share nothing with a libvirtd the host may run (its config, domains, sockets),
# and the system's libvirt configuration is never edited. Clients outside the namespace
# connect with qemu:///system?socket=DIR/run/libvirt-sock.
set -euo pipefail
cmd=${1:-}; DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

stop() {
  if [ -S "$DIR/run/libvirt-sock" ] && [ -f "$DIR/run/libvirtd.pid" ]; then
    local u="qemu:///system?socket=$DIR/run/libvirt-sock"
    for dom in $(virsh -c "$u" list --all --name 2>/dev/null); do
      virsh -c "$u" destroy "$dom" >/dev/null 2>&1 || true
      virsh -c "$u" undefine "$dom" --checkpoints-metadata --nvram >/dev/null 2>&1 || true
    done
  fi
  for d in libvirtd virtlogd; do
    f=$DIR/run/$d.pid
    [ -f "$f" ] || continue
    p=$(cat "$f")
    if kill -TERM "$p" 2>/dev/null; then
      for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$p" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

case $cmd in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
URI="qemu:///system?socket=$DIR/run/libvirt-sock"
if [ -f "$DIR/run/libvirtd.pid" ] && kill -0 "$(cat "$DIR/run/libvirtd.pid")" 2>/dev/null &&
   virsh -c "$URI" uri >/dev/null 2>&1; then
  echo "$URI"; exit 0
fi
command -v libvirtd >/dev/null && command -v virtlogd >/dev/null || {
  echo "test-libvirtd: libvirtd/virtlogd missing: run scripts/install-deps.sh" >&2; exit 1; }
stop
for d in etc etc/qemu run lib lib/qemu cache log; do mkdir -p "$DIR/$d"; done
# QEMU (libvirt-qemu) traverses /var/lib/libvirt and /run/libvirt to its own dirs.
chmod 0755 "$DIR/run" "$DIR/lib" "$DIR/cache" "$DIR/log" "$DIR/etc"
chown libvirt-qemu:libvirt-qemu "$DIR/lib/qemu"
cat > "$DIR/etc/libvirtd.conf" <<CONF
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "2:file:$DIR/log/libvirtd.log"
CONF
cat > "$DIR/etc/virtlogd.conf" <<CONF
log_outputs = "2:file:$DIR/log/virtlogd.log"
CONF
cat > "$DIR/etc/qemu.conf" <<CONF
user = "libvirt-qemu"
group = "libvirt-qemu"
CONF
: > "$DIR/etc/libvirt.conf"

unshare --mount --propagation private -- bash -euo pipefail -c '
  DIR=$1
  for pair in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
    mkdir -p "${pair#*:}"
    mount --bind "$DIR/${pair%%:*}" "${pair#*:}"
  done
  # As udev sets it up on a real host: /dev/kvm 0660 root:kvm, so libvirt-qemu (in
  # group kvm) may open it. Without udev it is root-only here, libvirt then finds
  # its cached QEMU capabilities stale at every call and probes QEMU again (~45 s).
  # A node of our own, bound over /dev/kvm in this namespace only.
  if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    mkdir -p "$DIR/dev"
    mount -t tmpfs -o size=64k,mode=0755 vmbackup-test-dev "$DIR/dev"
    mknod -m 0660 "$DIR/dev/kvm" c 10 232
    chgrp kvm "$DIR/dev/kvm"
    mount --bind "$DIR/dev/kvm" /dev/kvm
  fi
  virtlogd -d -p "$DIR/run/virtlogd.pid"
  libvirtd -d -p "$DIR/run/libvirtd.pid"
' _ "$DIR"
for _ in $(seq 300); do
  virsh -c "$URI" uri >/dev/null 2>&1 && { echo "$URI"; exit 0; }
  sleep 0.1
done
echo "test-libvirtd: libvirtd did not answer on $DIR/run/libvirt-sock in 30 s (log: $DIR/log/libvirtd.log)" >&2
stop
exit 1
