#!/usr/bin/env python3
"""QMP chores for the benchmark (no vmbackup involved).

    qmp.py SOCK change DEVICE DISK_SIZE PERCENT SEED WORKDIR
        Write PERCENT % of the disk as 256 KiB pieces of pseudo-random bytes
        (seeded) at distinct 256 KiB-aligned places, through the virtio disk
        DEVICE (HMP qemu-io on its backend), as a guest would, then flush.
        Prints the changed bytes.
    qmp.py SOCK drop-bitmaps
        Remove every dirty bitmap of every node (a fresh start for the next run).
"""
import json
import os
import random
import socket
import sys

PIECE = 256 << 10


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, /, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise SystemExit(f"QMP {name}: {r['error']['desc']}")


def qemu_io(q, device, command):
    """Run a qemu-io command on the block backend of guest device `device`."""
    out = q.cmd("human-monitor-command",
                **{"command-line": f'qemu-io -d {device}/virtio-backend "{command}"'})
    if "error" in out.lower() or "failed" in out.lower() or "conflict" in out.lower():
        raise SystemExit(f"qemu-io {command}: {out.strip()}")


def change(q, device, size, percent, seed, workdir):
    rng = random.Random(seed)
    slots = size // PIECE
    count = max(1, int(size * percent / 100) // PIECE)
    places = rng.sample(range(slots), count)
    piece = os.path.join(workdir, "piece")
    for i, slot in enumerate(places):
        with open(piece, "wb") as f:
            f.write(rng.randbytes(PIECE))
        qemu_io(q, device, f"write -s {piece} {slot * PIECE} {PIECE}")
    qemu_io(q, device, "flush")
    os.unlink(piece)
    print(count * PIECE)


def drop_bitmaps(q):
    for dev in q.cmd("query-block"):
        node = dev.get("inserted", {}).get("node-name")
        for b in dev.get("inserted", {}).get("dirty-bitmaps", []):
            q.cmd("block-dirty-bitmap-remove", node=node, name=b["name"])


def main():
    sock, what, *rest = sys.argv[1:]
    q = Qmp(sock)
    if what == "change":
        device, size, percent, seed, workdir = rest
        change(q, device, int(size), float(percent), int(seed), workdir)
    elif what == "drop-bitmaps":
        drop_bitmaps(q)
    else:
        raise SystemExit(f"unknown command {what}")


if __name__ == "__main__":
    main()
