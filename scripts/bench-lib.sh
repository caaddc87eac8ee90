# Shared by the benchmark scripts (bench-prune.sh, bench-recovery.sh, bench-s3.sh);
# sourced, not run. Each function uses $B (the benchmark directory) and sets
# nothing else but what it says.

# bench_disk SIZE_MIB MIX: $B/disk.qcow2 of SIZE_MIB MiB (a multiple of 64) in 64 MiB
# regions; region r gets kind MIX[r % len(MIX)]: R random bytes, T log-like text
# (compresses), Z never written (a hole). "RRRRTTTZZZ" = 40% random, 30% text, 30% zero.
bench_disk() {
  [ $(($1 % 64)) = 0 ] || { echo "bench: the disk size ($1 MiB) must be a multiple of 64 MiB" >&2; exit 2; }
  local raw="$B/source.raw"
  truncate -s "$1M" "$raw"
  python3 - "$raw" "$1" "$2" <<'PY'
import os, sys
path, mib, mix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
region = 64 << 20
text = b"".join(b"2026-11-24 12:%02d:%02d host%03d kernel: eth0 link up, 1000 Mbps full duplex seq=%d\n"
                % (i % 60, i % 59, i % 997, i) for i in range(200000))
with open(path, "r+b") as f:
    for r in range((mib << 20) // region):
        kind = mix[r % len(mix)]
        f.seek(r * region)
        if kind == "R":
            f.write(os.urandom(region))
        elif kind == "T":
            off = 0
            while off < region:
                n = min(len(text), region - off)
                f.write(text[:n]); off += n
PY
  qemu-img convert -f raw -O qcow2 "$raw" "$B/disk.qcow2"
  rm -f "$raw"
}

# bench_vm: serve $B/disk.qcow2 as VM "bench" with qemu-storage-daemon (QMP socket
# in $B/qmp); sets GUEST, the NBD URI a guest's writes go to. bench_vm_stop ends it.
bench_vm() {
  local nbd="$B/nbd.sock"
  BENCH_PIDFILE="$B/qsd.pid"
  qemu-storage-daemon \
    --blockdev driver=file,node-name=vda-file,filename="$B/disk.qcow2" \
    --blockdev driver=qcow2,node-name=vda,file=vda-file \
    --chardev socket,id=qmp0,path="$B/qmp/bench.qmp",server=on,wait=off --monitor chardev=qmp0 \
    --nbd-server addr.type=unix,addr.path="$nbd" \
    --export type=nbd,id=guest,node-name=vda,name=guest,writable=on \
    --pidfile "$BENCH_PIDFILE" --daemonize
  GUEST="nbd+unix:///guest?socket=$nbd"
}
bench_vm_stop() {
  [ -n "${BENCH_PIDFILE:-}" ] && kill "$(cat "$BENCH_PIDFILE")" 2>/dev/null || true
}

# bench_prepare: install what is needed (as root), build the release binary unless
# VMB names one (sets VMB), start $B afresh with qmp/, target/, state/ and a
# system.conf (bk_tsk_thd = 8, i2vp_transbuffer = 4M, Max_ThreadNum_PerHost = 4);
# exports VMBACKUP_STATE and VMBACKUP_CONFIG; empties $B/results.
bench_prepare() {
  if [ "$(id -u)" = 0 ]; then
    scripts/install-deps.sh
    command -v /usr/bin/time >/dev/null || apt-get install -y -q time >/dev/null
  fi
  if [ -z "${VMB:-}" ]; then
    cargo build --release --quiet
    VMB="$(pwd)/target/release/vmbackup"
  fi
  rm -rf "$B"; mkdir -p "$B/qmp" "$B/target" "$B/state"
  export VMBACKUP_STATE="$B/state/state.db" VMBACKUP_CONFIG="$B/system.conf"
  printf 'bk_tsk_thd = 8\ni2vp_transbuffer = 4M\nMax_ThreadNum_PerHost = 4\n' > "$VMBACKUP_CONFIG"
  : > "$B/results"
}

# warm: write and delete ~4 GiB in /dev/shm (untimed): this machine's memory balloon
# makes writes into a cold page cache 3-5x slower than into a warm one.
warm() {
  dd if=/dev/zero of=/dev/shm/vmbackup-bench-warm bs=4M count=1024 status=none
  rm -f /dev/shm/vmbackup-bench-warm
}

# bench_scatter SIZE_GIB PIECES: PIECES writes of 256 KiB of random bytes at random
# places of the guest's disk.
bench_scatter() {
  head -c $((256 << 10)) /dev/urandom > "$B/piece"
  local cmds=() slots=$(( ($1 << 30) / (256 << 10) ))
  for _ in $(seq 1 "$2"); do
    cmds+=(-c "write -s $B/piece $(( (RANDOM * 32768 + RANDOM) % slots * (256 << 10) )) 256k")
  done
  qemu-io -f raw "${cmds[@]}" "$GUEST" >/dev/null
}

# bench_timed NAME CMD...: run once under GNU time; "NAME seconds peak-RSS-KiB" is
# appended to $B/results, stdout goes to $B/NAME.out.
bench_timed() {
  local name=$1; shift
  /usr/bin/time -f '%e %M' -o "$B/time.out" "$@" >"$B/$name.out" 2>"$B/$name.err" \
    || { cat "$B/$name.err" >&2; exit 1; }
  read -r secs rss < "$B/time.out"
  echo "$name $secs $rss" >> "$B/results"
}
