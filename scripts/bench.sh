#!/usr/bin/env bash
# Benchmark (issue 12): vmbackup's data path side by side with copying the disk.
#
#   scripts/bench.sh
#
# One command from a clean clone, as root; prints a table and the goals' verdicts.
# It is a script that prints figures, not a test. docs/BENCHMARKS.md has the method
# and the results; this header is the short form:
#
# - The disk: SIZE_GIB (4) GiB qcow2 with 40% pseudo-random bytes, 30% text that
#   zstd shrinks about 2.5x, 30% never written, in extents of 64 KiB..64 MiB in a
#   seeded order (scripts/bench/gendisk.py; SEED=1 gives the same bytes on every
#   machine). Attached as a virtio disk to a running (paused) qemu-system-x86_64.
# - Steps, each RUNS (3) times: nbdcopy to a file from `qemu-nbd --read-only` of the
#   same image; qemu-img convert from that NBD export to raw; qemu-img convert of
#   the qcow2 to raw (and again with -t none: direct I/O, as vmbackup restores;
#   shown, not a goal); vmbackup full into an empty repository; vmbackup inc after 1%
#   of the disk changed (256 KiB pieces of random bytes at seeded places, written
#   through the guest device); vmbackup restore of that incremental to a raw file
#   (checked identical to the disk with qemu-img compare, and sparse); the full
#   again with system.conf `compression = none` (shown, not a goal).
# - Before every timed step the inputs of the step are read into the page cache
#   (the image; the repository for a restore), after 4 GiB were written to and
#   deleted from /dev/shm (this machine's memory balloon makes the first writes
#   into a cold page cache 3-5x slower). `sync` runs inside the timed span.
# - Per step: wall time (median, min, max), CPU user and system of the tool, CPU of
#   the server process (qemu-nbd or QEMU), peak RSS, bytes stored (the bytes of
#   the files; the fan-out directories the object store made are counted apart).
# - Scale (SCALE=1, default): SCALE_VMS (8) VMs of SCALE_MIB (1024) MiB each, one
#   full alone and all fulls at once (bk_tsk_thd = 8); a state database of
#   STATE_RULES (1000) rules x STATE_VMS (10) VMs x STATE_DAYS (365) days of task
#   history (scripts/bench/genstate.py) answering rule list, task list --all and
#   stats; a SPARSE_GIB (1024) GiB sparse disk backed up and restored.
#
# env: RUNS SIZE_GIB SEED SCALE SCALE_VMS SCALE_MIB STATE_RULES STATE_VMS STATE_DAYS
#      SPARSE_GIB BENCH_DIR (/var/tmp/vmbackup-bench) VMB (a vmbackup binary to measure)
#      BENCH_ACCEL (tcg; the VM only serves its disk, paused: kvm gains nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNS=${RUNS:-3}
SIZE_GIB=${SIZE_GIB:-4}
SEED=${SEED:-1}
SCALE=${SCALE:-1}
SCALE_VMS=${SCALE_VMS:-8}
SCALE_MIB=${SCALE_MIB:-1024}
STATE_RULES=${STATE_RULES:-1000}
STATE_VMS=${STATE_VMS:-10}
STATE_DAYS=${STATE_DAYS:-365}
SPARSE_GIB=${SPARSE_GIB:-1024}
B=${BENCH_DIR:-/var/tmp/vmbackup-bench}
TASKS=8      # bk_tsk_thd
BUF_MIB=4    # i2vp_transbuffer
LIB="$ROOT/scripts/bench"

if [ "$(id -u)" = 0 ]; then
  scripts/install-deps.sh
  command -v /usr/bin/time >/dev/null || apt-get install -y -q time >/dev/null
fi
for tool in qemu-system-x86_64 qemu-img qemu-nbd nbdcopy openssl python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (scripts/install-deps.sh)" >&2; exit 1; }
done
if [ -z "${VMB:-}" ]; then
  cargo build --release --quiet
  VMB="$ROOT/target/release/vmbackup"
fi

# Everything but the cache of generated images starts afresh.
mkdir -p "$B/cache"
find "$B" -mindepth 1 -maxdepth 1 ! -name cache -exec rm -rf {} +
mkdir -p "$B/qmp"
need=$(( SIZE_GIB * 3 ))   # image + one output + repository, in GiB (about)
avail=$(( $(df -Pk "$B" | awk 'NR==2{print $4}') >> 20 ))
if [ "$avail" -lt "$need" ]; then
  echo "bench: $B has $avail GiB free, the benchmark needs about $need GiB (SIZE_GIB=$SIZE_GIB)" >&2
  exit 1
fi
export VMBACKUP_CONFIG="$B/system.conf"
printf 'bk_tsk_thd = %d\ni2vp_transbuffer = %dM\nMax_ThreadNum_PerHost = %d\n' \
  "$TASKS" "$BUF_MIB" "$TASKS" > "$VMBACKUP_CONFIG"
RES="$B/results"
: > "$RES"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

# disk NAME SIZE_BYTES SEED [gendisk options]: a generated qcow2 (cached by its arguments)
disk() {
  local name=$1 size=$2 seed=$3; shift 3
  local key; key=$(echo "$size $seed $* $(sha1sum "$LIB/gendisk.py")" | sha1sum | cut -c1-12)
  local img="$B/cache/$name-$key.qcow2"
  if [ ! -f "$img" ]; then
    python3 "$LIB/gendisk.py" "$B/gen.raw" "$size" "$seed" "$@" > "$img.json"
    qemu-img convert -f raw -O qcow2 "$B/gen.raw" "$img.tmp"
    rm -f "$B/gen.raw"
    mv "$img.tmp" "$img"
  fi
  echo "$img"
}

# start_vm NAME IMAGE: a paused qemu-system with IMAGE as virtio disk 'vda'
start_vm() {
  local name=$1 img=$2
  qemu-system-x86_64 -machine "q35,accel=${BENCH_ACCEL:-tcg}" -cpu max -nodefaults -display none -m 64 -S \
    -name "$name" \
    -blockdev "driver=file,node-name=disk0-file,filename=$img" \
    -blockdev driver=qcow2,node-name=disk0,file=disk0-file \
    -device virtio-blk-pci,drive=disk0,id=vda \
    -qmp "unix:$B/qmp/$name.qmp,server=on,wait=off" \
    -pidfile "$B/$name.pid" -daemonize
  PIDS+=("$(cat "$B/$name.pid")")
}
stop_vm() {
  kill "$(cat "$B/$1.pid")" 2>/dev/null || true
  rm -f "$B/qmp/$1.qmp"
}

# fresh_state RULE VMS: a new state database and an empty target with one rule
fresh_state() {
  rm -rf "$B/state" "$B/target"
  mkdir -p "$B/state" "$B/target"
  export VMBACKUP_STATE="$B/state/state.db"
  "$VMB" -q platform add lab --type qemu --qmp-dir "$B/qmp"
  "$VMB" -q target add t --path "$B/target"
  "$VMB" -q rule add "$1" --platform lab --vm "$2" --target t --schedule "full daily at 01:00"
}

cpu_of() { # CPU seconds (user + system) of process $1 so far; 0 when none
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
  sed 's/.*) //' "/proc/$1/stat" | awk -v t="$(getconf CLK_TCK)" '{print ($12 + $13) / t}'
}
warm() { # page cache: fill and free /dev/shm, then read the step's inputs
  dd if=/dev/zero of=/dev/shm/vmbackup-bench-warm bs=4M count=1024 status=none
  rm -f /dev/shm/vmbackup-bench-warm
  [ $# -eq 0 ] || find "$@" -type f -exec cat {} + > /dev/null
}
# timed STEP SERVER_PID CMD...: run CMD then sync; record wall, user, sys, peak RSS
# (KiB) and the server's CPU; the command's stderr is kept in $B/STEP.err
timed() {
  local step=$1 server=$2; shift 2
  local c0; c0=$(cpu_of "$server")
  /usr/bin/time -f '%e %U %S %M' -o "$B/time.out" sh -c '"$@" > /dev/null && sync' sh "$@" \
    2> "$B/$step.err" || { cat "$B/$step.err" >&2; exit 1; }
  local c1; c1=$(cpu_of "$server")
  echo "step $step $(cat "$B/time.out") $(awk -v a="$c0" -v b="$c1" 'BEGIN{print b - a}')" >> "$RES"
}
# bytes_of DIR...: the bytes of the files (objects, indexes, manifests) under DIR;
# dirs_of DIR...: how many directories (the object store's fan-out; each takes a
# file-system block, counted apart: it is the file system's, not data written)
bytes_of() { find "$@" -type f -printf '%s\n' | awk '{s += $1} END {printf "%.0f\n", s}'; }
dirs_of() { find "$@" -type d | wc -l; }
record() { echo "value $1 $2" >> "$RES"; }

echo "== disk: ${SIZE_GIB} GiB, seed $SEED"
IMG=$(disk bench $((SIZE_GIB << 30)) "$SEED")
cp "$IMG.json" "$B/layout.json"
record size $((SIZE_GIB << 30))
record allocated "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["random"] + d["text"])' "$IMG.json")"
# The VM writes into its disk: work on a copy, keep the cached original clean.
cp --sparse=always "$IMG" "$B/bench.qcow2"
start_vm bench "$B/bench.qcow2"
QEMU=$(cat "$B/bench.pid")
NBDSOCK="$B/qemu-nbd.sock"

has_compression=$("$VMB" config show 2>/dev/null | grep -q '^compression' && echo 1 || echo 0)
for run in $(seq 1 "$RUNS"); do
  echo "== run $run/$RUNS"
  python3 "$LIB/qmp.py" "$B/qmp/bench.qmp" drop-bitmaps
  qemu-nbd --read-only --persistent --shared=8 --socket="$NBDSOCK" --fork --pid-file="$B/qemu-nbd.pid" \
    --image-opts "driver=qcow2,file.driver=file,file.filename=$B/bench.qcow2,file.locking=off"
  QNBD=$(cat "$B/qemu-nbd.pid")
  warm "$B/bench.qcow2"; timed nbdcopy "$QNBD" nbdcopy "nbd+unix:///?socket=$NBDSOCK" "$B/out.raw"
  rm -f "$B/out.raw"
  warm "$B/bench.qcow2"; timed qemu-img-nbd "$QNBD" qemu-img convert -f raw -O raw "nbd+unix:///?socket=$NBDSOCK" "$B/out.raw"
  rm -f "$B/out.raw"
  kill "$QNBD"
  warm "$B/bench.qcow2"; timed qemu-img-qcow2 "" qemu-img convert -U -f qcow2 -O raw "$B/bench.qcow2" "$B/out.raw"
  rm -f "$B/out.raw"
  # The same with direct I/O for the output, as vmbackup's restore writes (shown, not a goal)
  warm "$B/bench.qcow2"; timed qemu-img-direct "" qemu-img convert -t none -U -f qcow2 -O raw "$B/bench.qcow2" "$B/out.raw"
  rm -f "$B/out.raw"

  fresh_state bench bench
  warm "$B/bench.qcow2"; timed vmbackup-full "$QEMU" "$VMB" -v run-now bench --level full
  full_bytes=$(bytes_of "$B/target") full_dirs=$(dirs_of "$B/target")
  record stored-full "$full_bytes"
  changed=$(python3 "$LIB/qmp.py" "$B/qmp/bench.qmp" change vda $((SIZE_GIB << 30)) 1 $((SEED * 1000 + run)) "$B")
  record changed "$changed"
  warm "$B/bench.qcow2"; timed vmbackup-inc "$QEMU" "$VMB" -v run-now bench --level inc
  record stored-inc $(( $(bytes_of "$B/target") - full_bytes ))
  record dirs-inc $(( $(dirs_of "$B/target") - full_dirs ))
  grep -E 'phase|took' "$B/vmbackup-inc.err" | sed "s/^/inc-v run $run: /" >> "$B/inc-phases.log" || true
  warm "$B/target"; timed vmbackup-restore "" "$VMB" restore bench --vm bench --to "$B/restore"
  out=$(find "$B/restore" -name '*.raw')
  record restore-allocated $(( $(du -k "$out" | cut -f1) * 1024 ))
  qemu-img compare -q -U -f raw -F qcow2 "$out" "$B/bench.qcow2" \
    || { echo "bench: the restored disk differs from the source" >&2; exit 1; }
  rm -rf "$B/restore"
  # The same full with system.conf compression = none (shown, not a goal)
  if [ "$has_compression" = 1 ]; then
    python3 "$LIB/qmp.py" "$B/qmp/bench.qmp" drop-bitmaps
    fresh_state bench bench
    echo 'compression = none' >> "$VMBACKUP_CONFIG"
    warm "$B/bench.qcow2"; timed vmbackup-full-none "$QEMU" "$VMB" -v run-now bench --level full
    sed -i '/^compression = none$/d' "$VMBACKUP_CONFIG"
    record stored-full-none "$(bytes_of "$B/target")"
  fi
done
stop_vm bench
rm -f "$B/bench.qcow2"

if [ "$SCALE" = 1 ]; then
  echo "== scale: $SCALE_VMS fulls at once (${SCALE_MIB} MiB disks)"
  vms=()
  for i in $(seq 1 "$SCALE_VMS"); do
    img=$(disk scale$i $((SCALE_MIB << 20)) $((SEED * 100 + i)))
    cp --sparse=always "$img" "$B/sc$i.qcow2"
    record scale-allocated-$i "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["random"] + d["text"])' "$img.json")"
    start_vm "sc$i" "$B/sc$i.qcow2"
    vms+=("sc$i")
  done
  all=$(IFS=,; echo "${vms[*]}")
  for run in $(seq 1 "$RUNS"); do
    fresh_state one sc1
    warm "$B/sc1.qcow2"; timed scale-one "" "$VMB" -q run-now one --level full
    fresh_state many "$all"
    warm "$B"/sc*.qcow2; timed scale-all "" "$VMB" -q run-now many --level full
  done
  for v in "${vms[@]}"; do stop_vm "$v"; rm -f "$B/$v.qcow2"; done
  rm -rf "$B/target"

  echo "== scale: state of $STATE_RULES rules x $STATE_VMS VMs x $STATE_DAYS days"
  key=$(echo "$STATE_RULES $STATE_VMS $STATE_DAYS $SEED $(sha1sum "$LIB/genstate.py") $("$VMB" --version)" | sha1sum | cut -c1-12)
  db="$B/cache/state-$key.db"
  if [ ! -f "$db" ]; then
    rm -rf "$B/state" && mkdir -p "$B/state" "$B/tq"
    export VMBACKUP_STATE="$B/state/state.db"
    start_vm template "$(disk tiny $((64 << 20)) 1)"
    "$VMB" -q platform add lab --type qemu --qmp-dir "$B/qmp"
    "$VMB" -q target add t --path "$B/tq"
    "$VMB" -q rule add template --platform lab --vm template --target t --schedule "full weekly on sun at 01:00" --schedule "inc weekly on mon,tue,wed,thu,fri,sat at 01:00"
    stop_vm template
    python3 "$LIB/genstate.py" "$VMBACKUP_STATE" template "$STATE_RULES" "$STATE_VMS" "$STATE_DAYS" "$SEED"
    mv "$VMBACKUP_STATE" "$db"
  fi
  export VMBACKUP_STATE="$db"
  has_stats=$("$VMB" stats --help >/dev/null 2>&1 && echo 1 || echo 0)
  for i in $(seq 0 5); do   # the first round only warms the page cache
    # stats reads one rule's year of history (r0000: STATE_VMS VMs)
    queries=("rule list" "task list --all")
    [ "$has_stats" = 1 ] && queries+=("stats r0000")
    for q in "${queries[@]}"; do
      s=$(python3 - "$VMB" $q <<'PY'
import subprocess, sys, time
t = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(time.perf_counter() - t)
PY
)
      [ "$i" = 0 ] || echo "query $(echo "$q" | cut -d' ' -f1-2 | tr ' ' -) $s" >> "$RES"
    done
  done
  [ "$has_stats" = 1 ] || echo "note stats is not a command of this build" >> "$RES"

  echo "== scale: a ${SPARSE_GIB} GiB sparse disk"
  img=$(disk sparse $((SPARSE_GIB << 30)) "$SEED" --random 0.0002 --text 0.0001 --max-extent $((16 << 20)))
  cp --sparse=always "$img" "$B/sparse.qcow2"
  start_vm sparse "$B/sparse.qcow2"
  fresh_state sparse sparse
  warm "$B/sparse.qcow2"; timed sparse-full "" "$VMB" -q run-now sparse --level full
  warm "$B/target"; timed sparse-restore "" "$VMB" -q restore sparse --vm sparse --to "$B/restore"
  out=$(find "$B/restore" -name '*.raw')
  qemu-img compare -q -U -f raw -F qcow2 "$out" "$B/sparse.qcow2" \
    || { echo "bench: the restored sparse disk differs from the source" >&2; exit 1; }
  record sparse-restore-allocated $(( $(du -k "$out" | cut -f1) * 1024 ))
  stop_vm sparse
  rm -rf "$B/restore" "$B/sparse.qcow2" "$B/target"
fi

python3 "$LIB/report.py" "$RES" "$TASKS" "$BUF_MIB" "$RUNS"
[ ! -s "$B/inc-phases.log" ] || { echo; echo "incremental, -v phase lines:"; cat "$B/inc-phases.log"; }
