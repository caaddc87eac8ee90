#!/usr/bin/env bash
# vmbackup and virtnbdbackup side by side on the same libvirt domain (issue 9).
#
# A private libvirtd (scripts/test-libvirtd.sh) runs one TCG domain with a SIZE_MIB
# qcow2 disk: in interleaved regions, 40% random bytes, 30% text, 30% never written.
# Each of RUNS runs, for each tool in turn on the same domain (its chain started on a
# domain without checkpoints: virtnbdbackup refuses other tools' checkpoints):
#   full         into an empty repository / output directory
#   (1% of the disk changes: 64 KiB writes at scattered places, through the guest's
#    virtio disk — the same writes for both tools)
#   incremental  on top of that full; checked to have really run as an incremental
#   restore      of the incremental to files; checked byte-exact against a shadow
# Every timed step starts with the same page cache preparation (the domain's image
# read once, untimed) and ends with `sync` inside the timed span. Printed: medians
# of wall time and CPU time (user + system), peak RSS, bytes stored by the full and
# added by the incremental. Not a test; figures go in docs/BENCHMARKS.md (measure on
# a quiet machine).
#
#   scripts/bench-libvirt.sh     env: RUNS=3 SIZE_MIB=4096 BENCH_DIR=/var/tmp/vmbackup-bench-libvirt VMB=<binary>
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-4096}
B=${BENCH_DIR:-/var/tmp/vmbackup-bench-libvirt}
[ "$(id -u)" = 0 ] || { echo "bench-libvirt: run as root (libvirtd, QEMU)" >&2; exit 1; }

scripts/install-deps.sh
need=()
command -v /usr/bin/time >/dev/null || need+=(time)
command -v virtnbdbackup >/dev/null || need+=(virtnbdbackup)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
if [ -z "${VMB:-}" ]; then
  cargo build --release --quiet
  VMB="$ROOT/target/release/vmbackup"
fi

scripts/test-libvirtd.sh stop "$B/libvirtd" 2>/dev/null || true
rm -rf "$B"; mkdir -p "$B"; chmod 0755 "$B"
URI=$(scripts/test-libvirtd.sh start "$B/libvirtd")
trap 'scripts/test-libvirtd.sh stop "$B/libvirtd"' EXIT
export LIBVIRT_DEFAULT_URI=$URI
export VMBACKUP_STATE="$B/state/state.db" VMBACKUP_CONFIG="$B/system.conf"
printf 'bk_tsk_thd = 8\ni2vp_transbuffer = 4M\nMax_ThreadNum_PerHost = 4\n' > "$VMBACKUP_CONFIG"
DOM=vmbackup-bench

echo "== a ${SIZE_MIB} MiB disk: 40% random, 30% text, 30% never written"
SHADOW="$B/shadow.raw"
python3 - "$SHADOW" "$SIZE_MIB" <<'PY'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
size = mib << 20
region = max(1 << 20, size // 64)
rng = random.Random(9)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
with open(path, "wb") as f:
    f.truncate(size)
    for r in range(size // region):
        kind = r % 10   # 0-3 random, 4-6 text, 7-9 never written
        f.seek(r * region)
        if kind < 4:
            f.write(os.urandom(region))
        elif kind < 7:
            out = bytearray()
            while len(out) < region:
                out += b" ".join(rng.choice(words) for _ in range(12)) + b".\n"
            f.write(out[:region])
PY
qemu-img convert -q -f raw -O qcow2 "$SHADOW" "$B/vda.qcow2"
cat > "$B/domain.xml" <<XML
<domain type='qemu'><name>$DOM</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os><features><acpi/></features>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='$B/vda.qcow2'/><target dev='vda' bus='virtio'/><alias name='ua-vda'/></disk>
<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>
XML
virsh -q define "$B/domain.xml" >/dev/null
virsh -q start "$DOM" >/dev/null

"$VMB" -q platform add lv --type libvirt --uri "$URI"
mkdir -p "$B/target"
"$VMB" -q target add t --path "$B/target"
"$VMB" -q rule add bench --platform lv --vm "$DOM" --target t --schedule "full daily at 01:00"

prepare() { cat "$B/vda.qcow2" > /dev/null; }   # the same page cache state for every step
# timed NAME CMD: run CMD then sync, both inside the timed span; record wall s, CPU s, peak RSS KiB
timed() {
  local name=$1 cmd=$2
  prepare
  /usr/bin/time -f '%e %U %S %M' -o "$B/time.out" sh -c "$cmd && sync" >"$B/last.out" 2>"$B/last.err" ||
    { echo "bench-libvirt: $name failed:" >&2; cat "$B/last.out" "$B/last.err" >&2; exit 1; }
  read -r wall usr sys rss < "$B/time.out"
  echo "$name $wall $(echo "$usr + $sys" | bc) $rss" >> "$B/results"
}
change_one_percent() { # the run's 64 KiB pieces at scattered places, through the guest's disk
  while read -r off; do
    virsh -q qemu-monitor-command "$DOM" --hmp \
      "qemu-io -d /machine/peripheral/ua-vda/virtio-backend \"write -s $B/piece $off 64k\"" >/dev/null
    dd if="$B/piece" of="$SHADOW" bs=64k seek=$((off / 65536)) conv=notrunc status=none
  done < "$B/changes"
}
bytes() { du -sb "$1" | cut -f1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

: > "$B/results"; : > "$B/sizes"
# virtnbdbackup refuses to work on a domain with checkpoints it did not create, so
# each tool's chain starts on a domain without checkpoints (vmbackup would not mind).
drop_checkpoints() {
  for cp in $(virsh checkpoint-list "$DOM" --name --topological | tac); do
    virsh -q checkpoint-delete "$DOM" "$cp" >/dev/null
  done
}
check_restore() { # TOOL IMAGE: byte-exact against the shadow
  local raw="$B/check.raw"
  qemu-img convert -q -O raw "$2" "$raw"
  [ "$(sha "$raw")" = "$(sha "$SHADOW")" ] || { echo "bench-libvirt: $1's restore differs from the disk" >&2; exit 1; }
  rm -f "$raw"
}
for run in $(seq 1 "$RUNS"); do
  echo "== run $run/$RUNS"
  head -c $((64 << 10)) /dev/urandom > "$B/piece"; chmod 0644 "$B/piece"
  python3 - "$run" "$(( (SIZE_MIB << 20) / 100 / (64 << 10) ))" "$(( (SIZE_MIB << 20) / (64 << 10) ))" "$B" <<'PY'
import random, sys
run, n, slots, b = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
with open(f"{b}/changes", "w") as out:
    for i in sorted(random.Random(1000 + run).sample(range(slots), n)):
        out.write(f"{i * 65536}\n")
PY

  # Each run's chain starts afresh: the rule and its data are removed and added
  # again (a repository that vanished under a rule with backups is an error).
  if [ "$run" -gt 1 ]; then
    "$VMB" -q rule remove bench --delete-data >/dev/null
    "$VMB" -q rule add bench --platform lv --vm "$DOM" --target t --schedule "full daily at 01:00"
  fi
  drop_checkpoints; rm -rf "$B/r-vmb"
  timed vmbackup-full "'$VMB' -q run-now bench --level full"
  full_vmb=$(bytes "$B/target/bench")
  change_one_percent
  timed vmbackup-inc "'$VMB' -q run-now bench --level inc"
  inc_vmb=$(( $(bytes "$B/target/bench") - full_vmb ))
  level=$("$VMB" --json points bench --vm "$DOM" | python3 -c 'import json,sys; p=json.load(sys.stdin)[-1]; print(p["level"], p["bytes_read"])')
  case $level in inc\ *) ;; *) echo "bench-libvirt: vmbackup's incremental ran as: $level" >&2; exit 1 ;; esac
  [ "${level#inc }" -lt $(( (SIZE_MIB << 20) / 20 )) ] || { echo "bench-libvirt: vmbackup's inc read ${level#inc } bytes" >&2; exit 1; }
  timed vmbackup-restore "'$VMB' -q restore bench --vm '$DOM' --to '$B/r-vmb'"
  check_restore vmbackup "$B/r-vmb/vda.raw"

  drop_checkpoints; rm -rf "$B/vnbd" "$B/r-vnbd"
  timed virtnbdbackup-full "virtnbdbackup -U '$URI' -d $DOM -l full -o '$B/vnbd' --noprogress"
  full_vnbd=$(bytes "$B/vnbd")
  change_one_percent
  timed virtnbdbackup-inc "virtnbdbackup -U '$URI' -d $DOM -l inc -o '$B/vnbd' --noprogress"
  inc_vnbd=$(( $(bytes "$B/vnbd") - full_vnbd ))
  ls "$B"/vnbd/vda.inc.virtnbdbackup.1.data* >/dev/null 2>&1 ||
    { echo "bench-libvirt: virtnbdbackup wrote no incremental data file:" >&2; ls "$B/vnbd" >&2; exit 1; }
  timed virtnbdrestore "virtnbdrestore -U '$URI' -i '$B/vnbd' -o '$B/r-vnbd' --noprogress"
  check_restore virtnbdbackup "$(ls "$B"/r-vnbd/vda* | head -1)"

  echo "$full_vmb $inc_vmb $full_vnbd $inc_vnbd" >> "$B/sizes"
  echo "   both restores byte-exact; both incrementals ran as incrementals"
done

echo
echo "libvirt $(libvirtd --version | awk '{print $NF}'), $(qemu-system-x86_64 --version | head -1), virtnbdbackup $(virtnbdbackup -V 2>&1 | tail -1), $SIZE_MIB MiB disk, $RUNS run(s), medians"
python3 - "$B/results" "$B/sizes" <<'PY'
import statistics, sys
from collections import defaultdict
wall, cpu, rss = defaultdict(list), defaultdict(list), defaultdict(list)
for line in open(sys.argv[1]):
    n, w, c, r = line.split()
    wall[n].append(float(w)); cpu[n].append(float(c)); rss[n].append(int(r))
sizes = [list(map(int, l.split())) for l in open(sys.argv[2])]
med = lambda i: statistics.median(s[i] for s in sizes) / (1 << 20)
print(f"{'step':<22} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}   wall per run")
for n in ["vmbackup-full", "virtnbdbackup-full", "vmbackup-inc", "virtnbdbackup-inc", "vmbackup-restore", "virtnbdrestore"]:
    print(f"{n:<22} {statistics.median(wall[n]):>8.2f} {statistics.median(cpu[n]):>8.2f} {max(rss[n]) / 1024:>13.1f}   {', '.join(f'{x:.2f}' for x in wall[n])}")
print(f"\nstored by the full:        vmbackup {med(0):8.1f} MiB   virtnbdbackup {med(2):8.1f} MiB")
print(f"added by the incremental:  vmbackup {med(1):8.1f} MiB   virtnbdbackup {med(3):8.1f} MiB")
PY
