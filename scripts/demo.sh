#!/usr/bin/env bash
# vmbackup end to end on an embedded default, in a throwaway directory:
#   a demo VM (qemu-storage-daemon serving one 256 MiB qcow2 disk, written to over
#   NBD as a guest would), a local directory target, a rule with a weekly
#   full + incremental policy; then a full backup, more guest writes, an
#   incremental backup, a restore of the latest point (with the image mode
#   chosen), cleanup (with manifests' secrets redacted), and a digest comparison
#   between the restored image and the VM's disk; then a transient recovery of
#   that point (served over NBD by vmbackup, a write into its overlay, the
#   repository unchanged) and its stop; then the retention plan, the first full
#   forgotten, garbage collection, and the incremental restored again; an offsite
#   copy on a second target and a restore from it.
#   As root, the same with a libvirt domain (a private libvirtd,
#   scripts/test-libvirtd.sh): checkpoints, quiesce=try, the same daemon reached
#   as a remote host (backup over NBD with TLS), and a restore as a new domain.
#
#   scripts/demo.sh            (as root on a fresh Debian 12: installs QEMU tools first)
#   DEMO_DIR=/some/dir scripts/demo.sh   keep everything in that directory
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "$(id -u)" = 0 ]; then
  scripts/install-deps.sh
fi
for c in qemu-storage-daemon qemu-img qemu-io cargo; do
  command -v $c >/dev/null || { echo "demo: $c is missing (run as root to install, or install qemu-utils)" >&2; exit 1; }
done

echo "== building vmbackup (release)"
cargo build --release --quiet
VMB="$ROOT/target/release/vmbackup"

DEMO=${DEMO_DIR:-$(mktemp -d /tmp/vmbackup-demo.XXXXXX)}
mkdir -p "$DEMO/qmp" "$DEMO/target" "$DEMO/state"
export VMBACKUP_STATE="$DEMO/state/state.db" VMBACKUP_CONFIG="$DEMO/system.conf"
cp etc/system.conf.example "$VMBACKUP_CONFIG"
NBD="$DEMO/nbd.sock"
GUEST="nbd+unix:///guest?socket=$NBD"
PIDFILE="$DEMO/qsd.pid"

stop_vm() {
  if [ -f "$PIDFILE" ]; then
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
  fi
}
trap stop_vm EXIT

echo "== starting demo VM 'demo' in $DEMO"
rm -f "$DEMO/qmp/demo.qmp" "$NBD"
qemu-img create -q -f qcow2 "$DEMO/demo-vda.qcow2" 256M
qemu-storage-daemon \
  --blockdev driver=file,node-name=vda-file,filename="$DEMO/demo-vda.qcow2" \
  --blockdev driver=qcow2,node-name=vda,file=vda-file \
  --chardev socket,id=qmp0,path="$DEMO/qmp/demo.qmp",server=on,wait=off \
  --monitor chardev=qmp0 \
  --nbd-server addr.type=unix,addr.path="$NBD" \
  --export type=nbd,id=guest,node-name=vda,name=guest,writable=on \
  --pidfile "$PIDFILE" --daemonize

guest_write() { # OFFSET LENGTH: random bytes, as a guest would write them
  head -c "$2" /dev/urandom > "$DEMO/chunk.bin"
  qemu-io -f raw -c "write -s $DEMO/chunk.bin $1 $2" "$GUEST" >/dev/null
}
echo "== the guest writes 24 MiB"
guest_write 0 8M; guest_write 64M 8M; guest_write 200M 8M

run() { echo "\$ vmbackup $*"; "$VMB" "$@"; }
run platform add lab --type qemu --qmp-dir "$DEMO/qmp"
run platform vms lab
[ -e "$DEMO/demo.key" ] || run key generate "$DEMO/demo.key"  # the demo's target is encrypted (README "Encryption")
run target add local --path "$DEMO/target" --encrypt --key-file "$DEMO/demo.key"
run rule add demo --platform lab --vm demo --target local \
  --schedule "full weekly on sun at 01:00" --schedule "inc weekly on mon-sat at 01:00" --retention 2
run rule show demo
run run-now demo --level full

echo "== the guest writes 1 MiB more"
guest_write 100M 512K; guest_write 3M 512K
run run-now demo --level inc
run points demo --vm demo
run verify demo
run key list local
run restore demo --vm demo --to "$DEMO/restore" --mode 0640
ls -l "$DEMO/restore"     # the image is 0640 (0600 without --mode); nothing else is left there
run cleanup demo --redact # secrets on VM command lines never reach a manifest; this also cleans older ones

echo "== monitoring: statistics, the Prometheus textfile, a notification"
run stats demo --period week
{ echo "prometheus_textfile = $DEMO/vmbackup.prom"
  echo "notify_command = cat >> $DEMO/notifications.jsonl"; } >> "$VMBACKUP_CONFIG"
run run-now demo --level inc
grep '^vmbackup_last_success_timestamp_seconds' "$DEMO/vmbackup.prom"
run notify test
tail -1 "$DEMO/notifications.jsonl"
run logs demo -n 5

echo "== comparing the restored image with the VM's disk"
qemu-img convert -f raw -O raw "$GUEST" "$DEMO/vm-now.raw"
A=$(sha256sum < "$DEMO/restore/vda.raw" | cut -d' ' -f1)
B=$(sha256sum < "$DEMO/vm-now.raw" | cut -d' ' -f1)
echo "restored image: sha256 $A"
echo "VM disk now:    sha256 $B"
if [ "$A" = "$B" ]; then
  echo "OK: the restored latest point is byte-identical to the VM's disk"
else
  echo "MISMATCH: restored image differs from the VM's disk" >&2
  exit 1
fi
echo "== transient recovery: the latest point served over NBD by vmbackup itself, writes in an overlay"
repo_sum() { (cd "$DEMO/target" && find . -type f | sort | xargs cat | sha256sum | cut -d' ' -f1); }
REPO_BEFORE=$(repo_sum)
echo "\$ vmbackup --json recover demo --vm demo --transient"
"$VMB" --json recover demo --vm demo --transient > "$DEMO/recover.json"
read -r RID URI OVERLAY < <(python3 -c 'import json,sys
d = json.load(open(sys.argv[1]))["tasks"][0]["outcome"]
print(d["recovery"], d["disks"][0]["uri"], d["disks"][0]["overlay"])' "$DEMO/recover.json")
echo "recovery $RID serves $URI; the VM's writes would go to $OVERLAY"
run recover list
qemu-img convert -f raw -O raw "$URI" "$DEMO/served.raw"
C=$(sha256sum < "$DEMO/served.raw" | cut -d' ' -f1)
echo "served disk:    sha256 $C"
[ "$C" = "$A" ] || { echo "MISMATCH: the served point differs from the restored image" >&2; exit 1; }
echo "== a write through the overlay (as the recovered VM would write)"
qemu-io -f qcow2 -c "write -P 0x5a 1M 64k" "$OVERLAY" >/dev/null
qemu-img map --output=json "$OVERLAY" | python3 -c 'import json,sys
own = [e for e in json.load(sys.stdin) if e["depth"] == 0 and e["data"]]
print("data in the overlay itself:", ", ".join("%d bytes at %d" % (e["length"], e["start"]) for e in own))'
run recover stop "$RID"
if [ "$(repo_sum)" = "$REPO_BEFORE" ]; then
  echo "OK: the repository is unchanged by the recovery"
else
  echo "MISMATCH: the recovery changed the repository" >&2
  exit 1
fi

echo "== lifecycle: the retention plan, forgetting the first full, garbage collection"
run prune demo --dry-run
FIRST=$("$VMB" --json points demo --vm demo | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["point"])')
run forget demo --vm demo --point "$FIRST"
run gc demo
run verify demo
echo "== the incremental still restores on its own (every point has a complete index)"
run restore demo --vm demo --to "$DEMO/restore2"
C=$(sha256sum < "$DEMO/restore2/vda.raw" | cut -d' ' -f1)
if [ "$C" = "$B" ]; then
  echo "OK: after forget + gc, the incremental restores byte-identical"
else
  echo "MISMATCH after forget + gc" >&2
  exit 1
fi

echo "== an offsite copy on a second target (encrypted with the same key), and a restore from the copy alone"
mkdir -p "$DEMO/offsite"
# The demo's target is encrypted: its copy goes to a target registered with the same key.
run target add offsite --path "$DEMO/offsite" --encrypt --key-file "$DEMO/demo.key"
run copy demo --to offsite
run points demo --from offsite
run restore demo --vm demo --from offsite --to "$DEMO/restore-offsite"
C=$(sha256sum < "$DEMO/restore-offsite/vda.raw" | cut -d' ' -f1)
if [ "$C" = "$B" ]; then
  echo "OK: the copy on target 'offsite' restores byte-identical"
else
  echo "MISMATCH: the restore from the copy differs" >&2
  exit 1
fi

if [ "$(id -u)" = 0 ]; then
  echo "== libvirt: a private libvirtd and a running TCG domain 'demo-lv'"
  chmod 0755 "$DEMO"   # QEMU runs as libvirt-qemu and must reach the image
  LV="$DEMO/libvirtd"
  URI=$(scripts/test-libvirtd.sh start "$LV")
  trap 'stop_vm; scripts/test-libvirtd.sh stop "$LV"' EXIT
  qemu-img create -q -f qcow2 "$DEMO/lv-vda.qcow2" 64M
  cat > "$DEMO/demo-lv.xml" <<XML
<domain type='qemu'><name>demo-lv</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os><features><acpi/></features>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='$DEMO/lv-vda.qcow2'/><target dev='vda' bus='virtio'/><alias name='ua-vda'/></disk>
<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>
XML
  virsh -q -c "$URI" define "$DEMO/demo-lv.xml" >/dev/null
  virsh -q -c "$URI" start demo-lv >/dev/null
  lv_write() { # OFFSET LENGTH: random bytes through the domain's virtio disk
    head -c "$2" /dev/urandom > "$DEMO/lv-chunk.bin"; chmod 0644 "$DEMO/lv-chunk.bin"
    virsh -q -c "$URI" qemu-monitor-command demo-lv --hmp \
      "qemu-io -d /machine/peripheral/ua-vda/virtio-backend \"write -s $DEMO/lv-chunk.bin $1 $2\"" >/dev/null
  }
  lv_write 0 4M; lv_write 32M 2M
  run platform add kvm --type libvirt --uri "$URI"
  run platform vms kvm
  run rule add demo-lv --platform kvm --vm demo-lv --target local \
    --schedule "full weekly on sun at 01:00" --schedule "inc weekly on mon-sat at 01:00" --quiesce=try
  run run-now demo-lv --level full || [ $? = 1 ]   # exit 1: no guest agent, crash-consistent
  lv_write 1M 256K
  run run-now demo-lv --level inc || [ $? = 1 ]
  virsh -c "$URI" checkpoint-list demo-lv
  mkdir -m 0755 "$DEMO/lv-restore"   # QEMU's user must reach the restored image
  run restore demo-lv --vm demo-lv --to "$DEMO/lv-restore" --format qcow2 --as-vm demo-lv-copy
  qemu-img convert -U -O raw "$DEMO/lv-vda.qcow2" "$DEMO/lv-now.raw"
  qemu-img convert -O raw "$DEMO/lv-restore/vda.qcow2" "$DEMO/lv-restored.raw"
  A=$(sha256sum < "$DEMO/lv-restored.raw" | cut -d' ' -f1)
  B=$(sha256sum < "$DEMO/lv-now.raw" | cut -d' ' -f1)
  echo "restored domain disk: sha256 $A"
  echo "domain disk now:      sha256 $B"
  [ "$A" = "$B" ] || { echo "MISMATCH: the libvirt restore differs from the domain's disk" >&2; exit 1; }
  echo "OK: byte-identical; new domain 'demo-lv-copy' defined on the restored image:"
  virsh -c "$URI" list --all

  echo "== libvirt as a remote host: the same daemon over TCP, backups over NBD with TLS"
  RURI=$(cat "$LV/run/tcp-uri")   # qemu+tcp://127.0.0.1:PORT/system (test daemon: auth none)
  run rule remove demo-lv          # a domain is in one rule only (R35)
  run platform remove kvm          # ... and reached through one platform only
  run platform add kvm-remote --type libvirt --uri "$RURI" --tls-dir "$LV/etc/pki/qemu"
  run rule add demo-remote --platform kvm-remote --vm demo-lv --target local \
    --schedule "full weekly on sun at 01:00" --schedule "inc weekly on mon-sat at 01:00"
  run run-now demo-remote --level full
  lv_write 8M 512K
  run run-now demo-remote --level inc
  mkdir -m 0755 "$DEMO/lv-remote-restore"
  run restore demo-remote --vm demo-lv --to "$DEMO/lv-remote-restore"
  qemu-img convert -U -O raw "$DEMO/lv-vda.qcow2" "$DEMO/lv-now.raw"
  A=$(sha256sum < "$DEMO/lv-remote-restore/vda.raw" | cut -d' ' -f1)
  B=$(sha256sum < "$DEMO/lv-now.raw" | cut -d' ' -f1)
  echo "restored over TLS: sha256 $A"
  echo "domain disk now:   sha256 $B"
  [ "$A" = "$B" ] || { echo "MISMATCH: the remote (TLS) restore differs from the domain's disk" >&2; exit 1; }
  echo "OK: byte-identical through the TLS export"
fi
echo "(demo files kept in $DEMO)"
