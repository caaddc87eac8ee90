# Shared helpers of scripts/bench-recovery.sh (sourced, not run):
# the benchmark machine's setup, the source disk, its qemu-storage-daemon and
# the timing helpers. The caller sets RUNS, SIZE_MIB (a multiple of 64) and B
# (the benchmark directory) and is in the project's root.

# Install what is needed (as root) and build the release binary unless VMB names one.
bench_prepare() {
  if [ "$(id -u)" = 0 ]; then
    scripts/install-deps.sh
    command -v /usr/bin/time >/dev/null || apt-get install -y -q time >/dev/null
  fi
  if [ -z "${VMB:-}" ]; then   # VMB=/path/to/vmbackup benchmarks that binary instead
    cargo build --release --quiet
    VMB="$(pwd)/target/release/vmbackup"
  fi
  rm -rf "$B"; mkdir -p "$B/qmp" "$B/target" "$B/state"
  export VMBACKUP_STATE="$B/state/state.db" VMBACKUP_CONFIG="$B/system.conf"
  printf 'bk_tsk_thd = 8\ni2vp_transbuffer = 4M\nMax_ThreadNum_PerHost = 4\n' > "$VMBACKUP_CONFIG"
  : > "$B/results"
}

# $B/disk.qcow2 of SIZE_MIB: interleaved 64 MiB regions, 40% random bytes, 30%
# compressible text (log-like lines), 30% zero (unallocated).
bench_disk() {
  echo "== building a ${SIZE_MIB} MiB disk (40% random, 30% text, 30% zero)"
  local raw="$B/source.raw"
  truncate -s "${SIZE_MIB}M" "$raw"
  python3 - "$raw" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
region = 64 << 20
text = b"".join(b"2026-11-24 12:%02d:%02d host%03d kernel: eth0 link up, 1000 Mbps full duplex seq=%d\n"
                % (i % 60, i % 59, i % 997, i) for i in range(200000))
with open(path, "r+b") as f:
    for r in range((mib << 20) // region):
        kind = r % 10   # 0-3 random, 4-6 text, 7-9 zero (hole)
        f.seek(r * region)
        if kind < 4:
            f.write(os.urandom(region))
        elif kind < 7:
            off = 0
            while off < region:
                n = min(len(text), region - off)
                f.write(text[:n]); off += n
PY
  qemu-img convert -f raw -O qcow2 "$raw" "$B/disk.qcow2"
  rm -f "$raw"
}

# Serve $B/disk.qcow2 as VM 'bench' (QMP $B/qmp/bench.qmp, writable NBD export
# GUEST); register platform 'lab', target 't' and rule 'bench'.
bench_serve() {
  local nbd="$B/nbd.sock"
  BENCH_QSD_PID="$B/qsd.pid"
  qemu-storage-daemon \
    --blockdev driver=file,node-name=vda-file,filename="$B/disk.qcow2" \
    --blockdev driver=qcow2,node-name=vda,file=vda-file \
    --chardev socket,id=qmp0,path="$B/qmp/bench.qmp",server=on,wait=off --monitor chardev=qmp0 \
    --nbd-server addr.type=unix,addr.path="$nbd" \
    --export type=nbd,id=guest,node-name=vda,name=guest,writable=on \
    --pidfile "$BENCH_QSD_PID" --daemonize
  GUEST="nbd+unix:///guest?socket=$nbd"
  "$VMB" -q platform add lab --type qemu --qmp-dir "$B/qmp"
  "$VMB" -q target add t --path "$B/target"
  "$VMB" -q rule add bench --platform lab --vm bench --target t --schedule "full daily at 01:00"
}

bench_stop() {
  [ -n "${BENCH_QSD_PID:-}" ] && kill "$(cat "$BENCH_QSD_PID")" 2>/dev/null || true
}

# Write and delete ~4 GiB in /dev/shm (untimed): this machine's memory balloon
# makes writes into a cold page cache 3-5x slower than into a warm one.
warm() {
  dd if=/dev/zero of=/dev/shm/vmbackup-bench-warm bs=4M count=1024 status=none
  rm -f /dev/shm/vmbackup-bench-warm
}

# timed NAME CMD...: run once, append "NAME seconds peak-RSS-KiB" to $B/results.
timed() {
  local name=$1; shift
  local tf="$B/time.out"
  /usr/bin/time -f '%e %M' -o "$tf" "$@" >/dev/null 2>"$B/last.err" || { cat "$B/last.err" >&2; exit 1; }
  read -r secs rss < "$tf"
  echo "$name $secs $rss" >> "$B/results"
}
