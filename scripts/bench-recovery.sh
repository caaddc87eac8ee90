#!/usr/bin/env bash
# Benchmark: serving a restore point over vmbackup's own NBD server (recovery)
# side by side with restoring it to a file (issue 11). Not a test.
#
# Builds the same kind of disk as scripts/bench.sh (40% random, 30% text, 30% zero,
# interleaved 64 MiB regions), backs it up once (a full), then RUNS times:
#   restore          vmbackup restore --to DIR (raw file, durable)
#   export->null     nbdcopy from a transient recovery's export to null:
#   export->file     nbdcopy from the export to a raw file, then fsync (durable, as restore)
#   first-byte       from 'vmbackup recover --transient' until the first 4 KiB of the
#                    disk were read through the export (qemu-io)
#   recover-ready    'vmbackup recover --transient' alone (until the export is ready)
#   server-peak-rss  the recovery's NBD server process after both copies (VmHWM)
# and prints medians, GiB/s and the goal's verdict: the export serves at least
# 80% of what restore achieves. Before every timed step ~4 GiB are written to and
# deleted from /dev/shm (see scripts/bench.sh).
#
#   scripts/bench-recovery.sh   env: RUNS=3 SIZE_MIB=4096 BENCH_DIR=/var/tmp/vmbackup-bench-recovery VMB=<binary>
#   SIZE_MIB=256 RUNS=1 scripts/bench-recovery.sh     (a smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-4096}
B=${BENCH_DIR:-/var/tmp/vmbackup-bench-recovery}

. scripts/bench-lib.sh
bench_prepare
echo "== building a ${SIZE_MIB} MiB disk (40% random, 30% text, 30% zero)"
bench_disk "$SIZE_MIB" RRRRTTTZZZ
bench_vm
trap 'stop_recoveries; bench_vm_stop' EXIT
"$VMB" -q platform add lab --type qemu --qmp-dir "$B/qmp"
"$VMB" -q target add t --path "$B/target"
"$VMB" -q rule add bench --platform lab --vm bench --target t --schedule "full daily at 01:00"
"$VMB" -q run-now bench --level full
POINT=$("$VMB" --json points bench --vm bench | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["point"])')

stop_recoveries() {
  for id in $("$VMB" --json recover list 2>/dev/null | python3 -c 'import json,sys; [print(r["id"]) for r in json.load(sys.stdin)["recoveries"]]' 2>/dev/null); do
    "$VMB" -q recover stop "$id" >/dev/null 2>&1 || true
  done
}

# A transient recovery of the point; sets RECOVERY, SERVER (its server's pid) and URI.
recover() {
  "$VMB" --json recover bench --vm bench --point "$POINT" --transient > "$B/recover.json"
  read -r RECOVERY SERVER URI < <(python3 -c 'import json,sys
d = json.load(open(sys.argv[1]))["tasks"][0]["outcome"]
print(d["recovery"], d["server_pid"], d["disks"][0]["uri"])' "$B/recover.json")
}

now() { date +%s.%N; }

for run in $(seq 1 "$RUNS"); do
  echo "== run $run/$RUNS"
  rm -rf "$B/restore"; warm; bench_timed restore "$VMB" -q restore bench --vm bench --point "$POINT" --to "$B/restore"
  RESTORED="$B/restore/vda.raw"

  warm
  t0=$(now); recover; t1=$(now)
  qemu-io -r -f raw -c "read 0 4k" "$URI" >/dev/null; t2=$(now)
  echo "recover-ready $(echo "$t1 - $t0" | bc) 0" >> "$B/results"
  echo "first-byte $(echo "$t2 - $t0" | bc) 0" >> "$B/results"
  warm; bench_timed export-null nbdcopy "$URI" null:
  rm -f "$B/out.raw"; warm
  bench_timed export-file sh -c "nbdcopy '$URI' '$B/out.raw' && sync '$B/out.raw'"
  cmp -s "$B/out.raw" "$RESTORED" || { echo "bench-recovery: the export differs from the restored image" >&2; exit 1; }
  echo "server-peak-rss 0 $(awk '/VmHWM/{print $2}' "/proc/$SERVER/status")" >> "$B/results"
  "$VMB" -q recover stop "$RECOVERY" >/dev/null
  rm -f "$B/out.raw"
done

python3 - "$B/results" "$SIZE_MIB" <<'PY'
import statistics, sys
from collections import defaultdict
res, mib = sys.argv[1], int(sys.argv[2])
t, m = defaultdict(list), defaultdict(list)
for line in open(res):
    name, secs, rss = line.split()
    t[name].append(float(secs)); m[name].append(int(rss))
size = mib << 20
print(f"\n{'step':<14} {'median s':>9} {'GiB/s':>7} {'peak RSS MiB':>13}   runs (s)")
for name in ["restore", "export-null", "export-file", "first-byte", "recover-ready", "server-peak-rss"]:
    med = statistics.median(t[name])
    rate = size / med / (1 << 30) if name in ("restore", "export-null", "export-file") else float("nan")
    if name == "server-peak-rss":
        med = float("nan")
    rss = max(m[name]) / 1024 if max(m[name]) else float("nan")
    print(f"{name:<14} {med:>9.2f} {rate:>7.2f} {rss:>13.1f}   {', '.join(f'{x:.2f}' for x in t[name])}")
rest = statistics.median(t["restore"])
for name in ["export-file", "export-null"]:
    ratio = rest / statistics.median(t[name])
    print(f"{name:<14} serves {ratio:.2f}x what restore achieves (goal >= 0.8x): {'met' if ratio >= 0.8 else 'NOT met'}")
print(f"first byte     {statistics.median(t['first-byte']):.2f} s after the command started")
PY
