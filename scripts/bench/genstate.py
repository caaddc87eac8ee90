#!/usr/bin/env python3
"""Grow a vmbackup state database into a large installation's, for timing.

    genstate.py DB TEMPLATE_RULE RULES VMS DAYS SEED

DB was made by vmbackup itself (so its schema is current) and holds one rule,
TEMPLATE_RULE. That rule is copied RULES times (r0000, r0001, ...), each with
VMS made-up VMs, and every VM gets DAYS days of history as a daemon would have
left it: one backup task a day (a full on Sundays, otherwise an incremental;
about 2% failed, 1% interrupted), its three log lines and its schedule_runs
row. The template rule is removed. Columns are taken from the database, so
columns other branches add keep their defaults.
"""
import datetime as dt
import random
import sqlite3
import sys


def columns(db, table):
    return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]


def main():
    path, template, rules, vms, days, seed = sys.argv[1:]
    rules, vms, days = int(rules), int(vms), int(days)
    rng = random.Random(int(seed))
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    rule_cols = columns(db, "rules")
    platform = db.execute("SELECT platform FROM rules WHERE name = ?", (template,)).fetchone()[0]
    sel = ", ".join("?" if c == "name" else c for c in rule_cols)
    vm_cols = set(columns(db, "rule_vms"))
    task_cols = set(columns(db, "tasks"))
    start = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)

    def ts(t):
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"

    with db:
        db.execute("DELETE FROM rule_vms WHERE rule = ?", (template,))
        for r in range(rules):
            name = f"r{r:04d}"
            db.execute(f"INSERT INTO rules ({', '.join(rule_cols)}) SELECT {sel} FROM rules WHERE name = ?",
                       (name, template))
            for v in range(vms):
                row = {"rule": name, "platform": platform, "vm": f"vm{r:04d}-{v:02d}",
                       "state": "started", "added_at": ts(start)}
                keys = [k for k in row if k in vm_cols]
                db.execute(f"INSERT INTO rule_vms ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                           [row[k] for k in keys])
        db.execute("DELETE FROM rules WHERE name = ?", (template,))

    task_keys = [k for k in ("kind", "rule", "vm", "level", "state", "phase", "percent", "bytes_done",
                             "bytes_total", "point", "message", "pid", "created_at", "started_at",
                             "finished_at", "rate") if k in task_cols]
    insert_task = f"INSERT INTO tasks ({', '.join(task_keys)}) VALUES ({', '.join('?' * len(task_keys))})"
    next_id = (db.execute("SELECT COALESCE(MAX(id), 0) FROM tasks").fetchone()[0] or 0) + 1
    for day in range(days):
        date = start + dt.timedelta(days=day)
        tasks, logs, runs = [], [], []
        for r in range(rules):
            for v in range(vms):
                created = date + dt.timedelta(hours=1, seconds=rng.randrange(3600))
                took = dt.timedelta(seconds=rng.randrange(20, 900))
                level = "full" if date.weekday() == 6 else "inc"
                roll = rng.random()
                state = "completed" if roll > 0.03 else ("failed" if roll > 0.01 else "interrupted")
                size = rng.randrange(1 << 30, 64 << 30)
                done = size if state == "completed" else size // 3
                point = created.strftime("%Y%m%dT%H%M%SZ") if state == "completed" else None
                msg = None if state == "completed" else f"{state}: simulated history"
                row = {"kind": "backup", "rule": f"r{r:04d}", "vm": f"vm{r:04d}-{v:02d}",
                       "level": level, "state": state, "phase": None,
                       "percent": 100.0 if state == "completed" else 33.0, "bytes_done": done,
                       "bytes_total": size, "point": point, "message": msg, "pid": 4242,
                       "created_at": ts(created), "started_at": ts(created),
                       "finished_at": ts(created + took), "rate": 0}
                tasks.append([row[k] for k in task_keys])
                tid = next_id
                next_id += 1
                logs += [(tid, ts(created), "info", f"{level} backup started"),
                         (tid, ts(created), "info", "phase running"),
                         (tid, ts(created + took), "info" if state == "completed" else "error",
                          f"{state} after {took.seconds} s")]
                runs.append((f"r{r:04d}", f"vm{r:04d}-{v:02d}",
                             ts(date + dt.timedelta(hours=1)), level, tid, "queued", ts(created)))
        with db:
            db.executemany(insert_task, tasks)
            db.executemany("INSERT INTO task_logs (task, ts, level, message) VALUES (?, ?, ?, ?)", logs)
            db.executemany("INSERT OR IGNORE INTO schedule_runs (rule, vm, slot, level, task, outcome, recorded_at)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?)", runs)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    print(f"{rules} rules, {rules * vms} VMs, {days * rules * vms} tasks")


if __name__ == "__main__":
    main()
