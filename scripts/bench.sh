#!/usr/bin/env bash
# Benchmark: vmbackup against qemu-img convert and nbdcopy on the same source.
#
# Builds a 4 GiB qcow2 disk (about 40% random, 30% compressible text, 30% zero, in
# interleaved 64 MiB regions), serves it from qemu-storage-daemon over an NBD unix
# socket, and prints the median wall time and peak RSS of RUNS runs of:
#   qemu-img convert  NBD -> raw file            (the baseline; it does not fsync)
#   qemu-img+fsync    the same, then fsync of the output (vmbackup's writes are durable)
#   nbdcopy           NBD -> raw file
#   vmbackup full     into a fresh repository
#   vmbackup inc      after 1% of the disk changed
#   vmbackup restore  of the newest point to a raw file
# Before every timed step, ~4 GiB are written to and deleted from /dev/shm
# (untimed, the same for every tool): this machine's memory balloon makes writes
# into a cold page cache 3-5x slower than into a warm one, which would swamp the
# ratios. Output: a table and the targets' verdicts (issue 3). Not a test.
#
#   scripts/bench.sh        env: RUNS=3 SIZE_GIB=4 BENCH_DIR=/var/tmp/vmbackup-bench VMB=<binary>
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SIZE_GIB=${SIZE_GIB:-4}
B=${BENCH_DIR:-/var/tmp/vmbackup-bench}

SIZE_MIB=$((SIZE_GIB * 1024))
. scripts/bench-lib.sh
bench_prepare
bench_disk
bench_serve
trap bench_stop EXIT

change_one_percent() { # 1% of the disk, random bytes at scattered places
  local n=$(( (SIZE_GIB << 30) / 100 / (256 << 10) ))
  head -c $((256 << 10)) /dev/urandom > "$B/piece"
  local cmds=()
  for i in $(seq 1 "$n"); do
    cmds+=(-c "write -s $B/piece $(( (RANDOM * 32768 + RANDOM) % ((SIZE_GIB << 30) / (256 << 10)) * (256 << 10) )) 256k")
  done
  qemu-io -f raw "${cmds[@]}" "$GUEST" >/dev/null
}

for run in $(seq 1 "$RUNS"); do
  echo "== run $run/$RUNS"
  rm -f "$B/out.raw"; warm; timed qemu-img-convert qemu-img convert -f raw -O raw "$GUEST" "$B/out.raw"
  rm -f "$B/out.raw"; warm; timed qemu-img+fsync sh -c "qemu-img convert -f raw -O raw '$GUEST' '$B/out.raw' && sync '$B/out.raw'"
  rm -f "$B/out.raw"; warm; timed nbdcopy nbdcopy "$GUEST" "$B/out.raw"
  rm -f "$B/out.raw"
  rm -rf "$B/target/bench"; warm; timed vmbackup-full "$VMB" -q run-now bench --level full
  change_one_percent; warm; timed vmbackup-inc "$VMB" -q run-now bench --level inc
  rm -rf "$B/restore"; warm; timed vmbackup-restore "$VMB" -q restore bench --vm bench --to "$B/restore"
done
STORED=$(du -sk "$B/target/bench/chunks" | cut -f1)

python3 - "$B/results" "$SIZE_GIB" "$STORED" <<'PY'
import statistics, sys
from collections import defaultdict
res, gib, stored = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t, m = defaultdict(list), defaultdict(list)
for line in open(res):
    name, secs, rss = line.split()
    t[name].append(float(secs)); m[name].append(int(rss))
size = gib << 30
print(f"\n{'step':<18} {'median s':>9} {'GiB/s':>7} {'peak RSS MiB':>13}   runs (s)")
for name in ["qemu-img-convert", "qemu-img+fsync", "nbdcopy", "vmbackup-full", "vmbackup-inc", "vmbackup-restore"]:
    med = statistics.median(t[name])
    rate = (size / med / (1 << 30)) if name != "vmbackup-inc" else float("nan")
    print(f"{name:<18} {med:>9.2f} {rate:>7.2f} {max(m[name]) / 1024:>13.1f}   {', '.join(f'{x:.2f}' for x in t[name])}")
base = statistics.median(t["qemu-img-convert"])
full = statistics.median(t["vmbackup-full"])
inc = statistics.median(t["vmbackup-inc"])
rest = statistics.median(t["vmbackup-restore"])
budget = 64 + 3 * 8 * 4
rss = max(max(m[n]) for n in ["vmbackup-full", "vmbackup-inc", "vmbackup-restore"]) / 1024
print(f"\nrepository after {len(t['vmbackup-full'])} fulls + incs: {stored / 1024:.0f} MiB of chunks for a {gib} GiB disk")
def verdict(ok): return "met" if ok else "NOT met"
durable = statistics.median(t["qemu-img+fsync"])
print(f"full throughput   {base / full:.2f}x qemu-img convert (target >= 0.8x): {verdict(base / full >= 0.8)}; {durable / full:.2f}x qemu-img convert + fsync")
print(f"incremental       {inc:.2f} s vs {0.03 * full + 0.5:.2f} s = 3% of full + 0.5 s: {verdict(inc <= 0.03 * full + 0.5)}")
print(f"restore           {base / rest:.2f}x qemu-img convert (target >= 0.9x): {verdict(base / rest >= 0.9)}; {durable / rest:.2f}x qemu-img convert + fsync")
print(f"peak RSS          {rss:.1f} MiB vs 64 MiB + 3 x 8 x 4 MiB = {budget} MiB: {verdict(rss <= budget)}")
PY
