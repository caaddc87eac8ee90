#!/usr/bin/env python3
"""Print the benchmark's table and the goals of issue 12 from its results file.

    report.py RESULTS TASKS BUF_MIB RUNS

RESULTS lines: `step NAME wall user sys peak_rss_kib server_cpu`,
`value NAME N`, `query NAME seconds`, `note TEXT`.
"""
import statistics
import sys
from collections import defaultdict

res, tasks, buf_mib, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
steps, values, queries, notes = defaultdict(list), defaultdict(list), defaultdict(list), []
for line in open(res):
    kind, rest = line.split(" ", 1)
    if kind == "step":
        name, *nums = rest.split()
        steps[name].append([float(x) for x in nums])
    elif kind == "value":
        name, n = rest.split()
        values[name].append(int(n))
    elif kind == "query":
        name, s = rest.split()
        queries[name].append(float(s))
    else:
        notes.append(rest.strip())

MIB = 1 << 20
med = statistics.median


def col(name, i):
    return [r[i] for r in steps[name]]


size = values["size"][0]
alloc = values["allocated"][0]
print(f"\ndisk: {size / (1 << 30):.0f} GiB, {alloc / 1e9:.2f} GB allocated; {runs} runs; "
      f"bk_tsk_thd = {tasks}, i2vp_transbuffer = {buf_mib} MiB")
print(f"\n{'step':<18} {'median s':>8} {'min':>6} {'max':>6} {'MB/s':>6} {'user s':>7} {'sys s':>6} "
      f"{'server s':>8} {'RSS MiB':>8}")
rate_bytes = {"vmbackup-inc": None, "sparse-full": None, "sparse-restore": None}
for name in ["nbdcopy", "qemu-img-nbd", "qemu-img-qcow2", "qemu-img-direct", "vmbackup-full", "vmbackup-inc",
             "vmbackup-restore", "vmbackup-full-none", "scale-one", "scale-all", "sparse-full", "sparse-restore"]:
    if name not in steps:
        continue
    wall = col(name, 0)
    if name == "scale-one":
        moved = values["scale-allocated-1"][0]
    elif name == "scale-all":
        moved = sum(v[0] for k, v in values.items() if k.startswith("scale-allocated-"))
    else:
        moved = rate_bytes.get(name, alloc)
    rate = f"{moved / med(wall) / 1e6:6.0f}" if moved else f"{'-':>6}"
    print(f"{name:<18} {med(wall):8.2f} {min(wall):6.2f} {max(wall):6.2f} {rate} {med(col(name, 1)):7.2f} "
          f"{med(col(name, 2)):6.2f} {med(col(name, 4)):8.2f} {max(col(name, 3)) / 1024:8.1f}")

if values["stored-full"]:
    print(f"\nstored by a full: {med(values['stored-full']) / 1e6:.0f} MB; by the incremental: "
          f"{med(values['stored-inc']) / 1e6:.1f} MB for {med(values['changed']) / 1e6:.1f} MB changed "
          f"(bytes of files; it also made {med(values['dirs-inc']):.0f} fan-out directories); "
          f"restored image allocates {med(values['restore-allocated']) / 1e6:.0f} MB "
          f"of {size / 1e9:.1f} GB")
if values["stored-full-none"]:
    print(f"stored by a full with compression = none: {med(values['stored-full-none']) / 1e6:.0f} MB")
for name, secs in sorted(queries.items()):
    print(f"state query {name.replace('-', ' '):<16} median {med(secs) * 1000:6.1f} ms "
          f"(min {min(secs) * 1000:.1f}, max {max(secs) * 1000:.1f})")
for n in notes:
    print(f"note: {n}")


def verdict(ok):
    return "met" if ok else "NOT met"


print("\ngoals (issue 12; ratios of medians)")
budget = 64 + 3 * tasks * buf_mib
if "vmbackup-full" in steps and "nbdcopy" in steps:
    r = med(col("vmbackup-full", 0)) / med(col("nbdcopy", 0))
    print(f"  full / nbdcopy                    {r:5.2f}x  (<= 1.0x)   {verdict(r <= 1.0)}")
if "vmbackup-full-none" in steps and "nbdcopy" in steps:
    r = med(col("vmbackup-full-none", 0)) / med(col("nbdcopy", 0))
    print(f"  [shown, not a goal] full with compression = none / nbdcopy  {r:5.2f}x")
if "vmbackup-inc" in steps:
    s = med(col("vmbackup-inc", 0))
    limit = 0.35 * size / (4 << 30)
    print(f"  incremental after 1% change       {s:5.2f} s  (<= {limit:.2f} s)  {verdict(s <= limit)}"
          + ("" if size == 4 << 30 else "  [goal scaled from 0.35 s on 4 GiB]"))
if "vmbackup-restore" in steps and "qemu-img-qcow2" in steps:
    r = med(col("vmbackup-restore", 0)) / med(col("qemu-img-qcow2", 0))
    sparse = med(values["restore-allocated"]) <= alloc * 1.02
    print(f"  restore / qemu-img qcow2->raw     {r:5.2f}x  (<= 1.1x)   {verdict(r <= 1.1)}; "
          f"output sparse: {verdict(sparse)}")
if values["stored-inc"]:
    r = med(values["stored-inc"]) / med(values["changed"])
    print(f"  incremental stored / changed      {r:5.3f}x (<= 1.00x, 2 decimals) {verdict(round(r, 2) <= 1.0)}")
rss = max(max(col(n, 3)) for n in steps if n.startswith(("vmbackup", "scale", "sparse"))) / 1024
print(f"  peak RSS (any vmbackup step)      {rss:5.1f} MiB (<= 64 + 3 x {tasks} x {buf_mib} = {budget} MiB)  "
      f"{verdict(rss <= budget)}")
if "scale-all" in steps:
    one = values["scale-allocated-1"][0] / med(col("scale-one", 0))
    allv = sum(v[0] for k, v in values.items() if k.startswith("scale-allocated-")) / med(col("scale-all", 0))
    print(f"  {len([k for k in values if k.startswith('scale-allocated-')])} fulls at once / one full (MB/s)"
          f"      {allv / one:5.2f}x  (>= 0.90x)  {verdict(allv / one >= 0.9)}")
for name, secs in sorted(queries.items()):
    print(f"  state: {name.replace('-', ' '):<26} {med(secs) * 1000:5.1f} ms (< 100 ms)  "
          f"{verdict(med(secs) < 0.1)}")
