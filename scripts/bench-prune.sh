#!/usr/bin/env bash
# Benchmark: prune + garbage collection (issue 7). Not a test: it prints figures
# for docs/BENCHMARKS.md, which need a quiet machine.
#
# 1. A real repository: a SIZE_GIB disk (in interleaved 64 MiB regions: 25% random
#    bytes, 25% compressible text, 50% zero) served by qemu-storage-daemon; POINTS
#    backups on consecutive simulated days (a full every 7th, incrementals between,
#    each after CHANGE_MIB of random writes at random places), rule retention 7
#    days. Then `vmbackup prune` on the day after the last point and `vmbackup gc`,
#    each timed (wall time, peak RSS) with GNU time; GC's own mark and sweep times
#    come from its JSON report.
# 2. GC's mark on synthetic repositories (examples/gc_mark_bench.rs): indexes
#    naming MARK_MILLIONS million distinct objects over 10 points, marked in a
#    process of its own; wall time and peak RSS, and the slope between the smallest
#    and the largest size: seconds and bytes per million referenced objects.
#
#   scripts/bench-prune.sh
#   env: SIZE_GIB=4 POINTS=200 CHANGE_MIB=8 MARK_MILLIONS="1 2 4"
#        BENCH_DIR=/var/tmp/vmbackup-bench-prune VMB=<binary>
# Smoke test (small, minutes): SIZE_GIB=1 POINTS=12 CHANGE_MIB=4 MARK_MILLIONS="0.1 0.2"
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
ROOT=$(pwd)
SIZE_GIB=${SIZE_GIB:-4}
POINTS=${POINTS:-200}
CHANGE_MIB=${CHANGE_MIB:-8}
MARK_MILLIONS=${MARK_MILLIONS:-1 2 4}
B=${BENCH_DIR:-/var/tmp/vmbackup-bench-prune}

if [ "$(id -u)" = 0 ]; then
  scripts/install-deps.sh
  command -v /usr/bin/time >/dev/null || apt-get install -y -q time >/dev/null
fi
cargo build --release --quiet --example gc_mark_bench
MARK="$ROOT/target/release/examples/gc_mark_bench"
if [ -z "${VMB:-}" ]; then   # VMB=/path/to/vmbackup benchmarks that binary instead
  cargo build --release --quiet
  VMB="$ROOT/target/release/vmbackup"
fi

# The machine and the build, printed with the figures (docs/BENCHMARKS.md wants both).
MACHINE="$(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), \
$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM, kernel $(uname -r), \
$(qemu-storage-daemon --version | head -1), vmbackup $(git rev-parse --short HEAD 2>/dev/null || echo '?') \
($("$VMB" --version 2>/dev/null | head -1 || echo "$VMB"))"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

rm -rf "$B"; mkdir -p "$B/qmp" "$B/target" "$B/state"
export VMBACKUP_STATE="$B/state/state.db" VMBACKUP_CONFIG="$B/system.conf" TZ=UTC
printf 'bk_tsk_thd = 8\ni2vp_transbuffer = 4M\nMax_ThreadNum_PerHost = 4\n' > "$VMBACKUP_CONFIG"

echo "== building a ${SIZE_GIB} GiB disk (25% random, 25% text, 50% zero)"
bench_disk $((SIZE_GIB * 1024)) RTZZ
bench_vm
trap bench_vm_stop EXIT

"$VMB" -q platform add lab --type qemu --qmp-dir "$B/qmp"
"$VMB" -q target add t --path "$B/target"
"$VMB" -q rule add bench --platform lab --vm bench --target t \
  --schedule "full daily at 01:00" --retention 7

day() { date -u -d "2027-01-01 + $1 days" '+%Y-%m-%d 12:00:00'; }
echo "== taking $POINTS points (a full every 7th day, $CHANGE_MIB MiB changed before each)"
: > "$B/results"
for i in $(seq 1 "$POINTS"); do
  [ "$i" -gt 1 ] && bench_scatter "$SIZE_GIB" $(( CHANGE_MIB * 4 ))
  level=inc; [ $(( (i - 1) % 7 )) = 0 ] && level=full
  VMBACKUP_TEST_NOW="$(day "$i")" "$VMB" -q run-now bench --level "$level" >/dev/null
  [ $(( i % 50 )) = 0 ] && echo "   $i points"
done
BEFORE=$(du -sk "$B/target/bench/chunks" | cut -f1)
OBJECTS=$(find "$B/target/bench/chunks" -type f | wc -l)

echo "== prune and gc"
export VMBACKUP_TEST_NOW="$(day $((POINTS + 1)))"
bench_timed prune "$VMB" --json prune bench
bench_timed gc "$VMB" --json gc
unset VMBACKUP_TEST_NOW
AFTER=$(du -sk "$B/target/bench/chunks" | cut -f1)

echo "== gc mark on synthetic repositories ($MARK_MILLIONS million objects)"
for m in $MARK_MILLIONS; do
  rm -rf "$B/synth"; mkdir -p "$B/synth"
  "$MARK" generate "$B/synth" "$m" 10 >/dev/null
  bench_timed "mark-$m" "$MARK" mark "$B/synth"
done
rm -rf "$B/synth"

python3 - "$B" "$SIZE_GIB" "$POINTS" "$CHANGE_MIB" "$BEFORE" "$AFTER" "$OBJECTS" "$MARK_MILLIONS" \
  "$MACHINE" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
b, gib, points, change, before, after, objects = sys.argv[1:8]
millions = [float(x) for x in sys.argv[8].split()]
machine, load_start, load_end = sys.argv[9:12]
print(f"\nmachine: {machine}")
print(f"load average: {load_start} at the start, {load_end} at the end "
      "(figures mean something only when both are well below the CPU count)")
print("method: one run of each step under GNU time (wall time, peak RSS); release build; "
      "system.conf bk_tsk_thd = 8, i2vp_transbuffer = 4M; "
      f"SIZE_GIB={gib} POINTS={points} CHANGE_MIB={change} MARK_MILLIONS=\"{sys.argv[8]}\"")
res = {}
for line in open(f"{b}/results"):
    name, secs, rss = line.split()
    res[name] = (float(secs), int(rss) / 1024)
prune = json.load(open(f"{b}/prune.out"))
removed = sum(1 for v in prune["vms"] for p in v["points"] if p["action"] == "remove")
kept = sum(1 for v in prune["vms"] for p in v["points"] if p["action"] == "keep")
gc = json.load(open(f"{b}/gc.out"))["repositories"][0]["report"]
print(f"\nrepository: {points} points of a {gib} GiB disk ({change} MiB changed per point), "
      f"{objects} objects, {int(before) / 1024:.0f} MiB of chunks")
print(f"{'step':<10} {'wall s':>8} {'peak RSS MiB':>13}   details")
s, m = res["prune"]
print(f"{'prune':<10} {s:>8.2f} {m:>13.1f}   {removed} points removed, {kept} kept")
s, m = res["gc"]
print(f"{'gc':<10} {s:>8.2f} {m:>13.1f}   mark {gc['mark_seconds']:.2f} s ({gc['point_count']} points, "
      f"{gc['referenced_count']} referenced), sweep {gc['sweep_seconds']:.2f} s: "
      f"{gc['removed_count']} objects, {gc['bytes_freed'] / 2**20:.0f} MiB freed "
      f"({int(after) / 1024:.0f} MiB of chunks left)")
print(f"\n{'mark, synthetic':<16} {'wall s':>8} {'peak RSS MiB':>13}")
for x in millions:
    s, m = res[f"mark-{x:g}" if f"mark-{x:g}" in res else f"mark-{x}"]
    print(f"{x:>6g} M objects  {s:>8.2f} {m:>13.1f}")
if len(millions) > 1:
    lo, hi = millions[0], millions[-1]
    key = lambda x: f"mark-{x:g}" if f"mark-{x:g}" in res else f"mark-{x}"
    (s0, m0), (s1, m1) = res[key(lo)], res[key(hi)]
    per_s = (s1 - s0) / (hi - lo)
    per_b = (m1 - m0) * 2**20 / ((hi - lo) * 1e6)
    print(f"per million referenced objects: {per_s:.2f} s to mark, "
          f"{per_b * 1e6 / 2**20:.1f} MiB held ({per_b:.1f} bytes per object)")
print("\nRecord these lines, with the machine and load lines, under \"Prune and garbage "
      "collection\" in docs/BENCHMARKS.md (the method is described there).")
PY
