# Shared by the benchmark scripts (bench.sh, bench-prune.sh); sourced, not run.
# Each function uses $B (the benchmark directory) and sets nothing else but what
# it says.

# bench_disk SIZE_GIB MIX: $B/disk.qcow2 of SIZE_GIB GiB in 64 MiB regions; region r
# gets kind MIX[r % len(MIX)]: R random bytes, T log-like text (compresses), Z never
# written (a hole). "RRRRTTTZZZ" = 40% random, 30% text, 30% zero.
bench_disk() {
  local raw="$B/source.raw"
  truncate -s "$1G" "$raw"
  python3 - "$raw" "$1" "$2" <<'PY'
import os, sys
path, gib, mix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
region = 64 << 20
text = b"".join(b"2026-11-24 12:%02d:%02d host%03d kernel: eth0 link up, 1000 Mbps full duplex seq=%d\n"
                % (i % 60, i % 59, i % 997, i) for i in range(200000))
with open(path, "r+b") as f:
    for r in range((gib << 30) // region):
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

# bench_vm: serve $B/disk.qcow2 as VM "bench" (QMP socket in $B/qmp, stopped on
# exit); sets GUEST, the NBD URI a guest's writes go to.
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
  trap 'kill $(cat "$BENCH_PIDFILE") 2>/dev/null || true' EXIT
  GUEST="nbd+unix:///guest?socket=$nbd"
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
