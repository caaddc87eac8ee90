//! Schema migrations: forward only, one SQL batch per version, applied in order.
//!
//! `PRAGMA user_version` holds the number of migrations applied. A database newer
//! than this binary is refused rather than guessed at.

use anyhow::{bail, Result};
use rusqlite::Connection;

/// Each entry upgrades from version `i` to `i + 1`. Never edit a released entry;
/// append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: configuration and task history.
    r#"
    CREATE TABLE platforms (
        name         TEXT PRIMARY KEY,
        kind         TEXT NOT NULL,
        qmp_dir      TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        refreshed_at TEXT,
        inventory    TEXT NOT NULL DEFAULT '[]'   -- JSON: [VmInfo]
    );
    CREATE TABLE targets (
        name       TEXT PRIMARY KEY,
        path       TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE rules (
        name        TEXT PRIMARY KEY,
        platform    TEXT NOT NULL REFERENCES platforms(name),
        target      TEXT NOT NULL REFERENCES targets(name),
        subdir      TEXT NOT NULL DEFAULT '',
        auto_cbt    INTEGER NOT NULL,
        cbt         INTEGER NOT NULL,
        lan_free    INTEGER NOT NULL,
        delete_data INTEGER NOT NULL,
        quiesce     INTEGER NOT NULL,
        policy      TEXT NOT NULL,               -- JSON: policy::Policy
        bandwidth   TEXT NOT NULL DEFAULT '[]',  -- JSON: [policy::bandwidth::Window]
        created_at  TEXT NOT NULL
    );
    CREATE TABLE rule_vms (
        rule     TEXT NOT NULL REFERENCES rules(name) ON DELETE CASCADE,
        platform TEXT NOT NULL,
        vm       TEXT NOT NULL,
        state    TEXT NOT NULL DEFAULT 'started',  -- started | stopped | completed
        added_at TEXT NOT NULL,
        PRIMARY KEY (rule, vm),
        UNIQUE (platform, vm)                      -- R35: one rule per VM
    );
    CREATE TABLE tasks (
        id          INTEGER PRIMARY KEY,
        kind        TEXT NOT NULL,                 -- backup | restore
        rule        TEXT NOT NULL,
        vm          TEXT NOT NULL,
        level       TEXT,
        state       TEXT NOT NULL,                 -- queued | pending | running | completed | failed | skipped | interrupted
        phase       TEXT,                          -- R31 state while running
        percent     REAL NOT NULL DEFAULT 0,
        bytes_done  INTEGER NOT NULL DEFAULT 0,
        bytes_total INTEGER NOT NULL DEFAULT 0,
        point       TEXT,
        message     TEXT,
        pid         INTEGER,
        created_at  TEXT NOT NULL,
        started_at  TEXT,
        finished_at TEXT
    );
    CREATE INDEX tasks_by_rule ON tasks(rule, vm, id);
    CREATE TABLE task_logs (
        id      INTEGER PRIMARY KEY,
        task    INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
        ts      TEXT NOT NULL,
        level   TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX task_logs_by_task ON task_logs(task, id);
    "#,
    // 2: the runner: slot leases, schedule bookkeeping, live rate and limit of a
    // task, cancel requests, and a generation counter bumped by every rule change.
    r#"
    ALTER TABLE tasks ADD COLUMN rate INTEGER NOT NULL DEFAULT 0;   -- bytes/s now (R30)
    ALTER TABLE tasks ADD COLUMN bw_limit TEXT;                      -- window in force (R29)
    ALTER TABLE tasks ADD COLUMN waiting TEXT;                       -- why pending (R41)
    ALTER TABLE tasks ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX tasks_by_state ON tasks(state);
    CREATE TABLE slot_leases (
        task      INTEGER PRIMARY KEY REFERENCES tasks(id) ON DELETE CASCADE,
        pid       INTEGER NOT NULL,
        platform  TEXT NOT NULL,
        heartbeat INTEGER NOT NULL                -- unix seconds, real time
    );
    CREATE TABLE schedule_runs (
        rule        TEXT NOT NULL,
        vm          TEXT NOT NULL,
        slot        TEXT NOT NULL,                -- the scheduled instant, RFC 3339 UTC
        level       TEXT NOT NULL,
        task        INTEGER,
        outcome     TEXT NOT NULL,                -- queued | skipped
        recorded_at TEXT NOT NULL,
        PRIMARY KEY (rule, vm, slot)
    );
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('config_generation', 0);
    CREATE TRIGGER rules_ins AFTER INSERT ON rules BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'config_generation'; END;
    CREATE TRIGGER rules_upd AFTER UPDATE ON rules BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'config_generation'; END;
    CREATE TRIGGER rules_del AFTER DELETE ON rules BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'config_generation'; END;
    CREATE TRIGGER rule_vms_ins AFTER INSERT ON rule_vms BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'config_generation'; END;
    CREATE TRIGGER rule_vms_upd AFTER UPDATE ON rule_vms BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'config_generation'; END;
    CREATE TRIGGER rule_vms_del AFTER DELETE ON rule_vms BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'config_generation'; END;
    "#,
    // 3 (lifecycle): a target is a typed spec, one JSON column (repo::TargetSpec,
    // e.g. {"type":"directory","path":"/mnt/backup"}), plus the id of the marker
    // written into it (NULL for targets registered before markers: `target mark`).
    r#"
    ALTER TABLE targets ADD COLUMN spec TEXT NOT NULL DEFAULT '{}';
    UPDATE targets SET spec = json_object('type', 'directory', 'path', path);
    ALTER TABLE targets DROP COLUMN path;
    ALTER TABLE targets ADD COLUMN marker_id TEXT;
    "#,
    // 4: hardening (issue 8): where a restore writes, so what a killed one left is
    // found and removed; VM identities; plain-TCP exports allowed per rule.
    r#"
    ALTER TABLE tasks ADD COLUMN dest TEXT;      -- restore: destination directory (absolute)
    ALTER TABLE tasks ADD COLUMN staging TEXT;   -- restore: its private staging directory, while it may exist
    -- One VM, one rule (R35) across platforms: the VM's identity (platform::VmInfo::identity),
    -- and the running VM a backup task works on (VmHandle::running_identity).
    ALTER TABLE rule_vms ADD COLUMN identity TEXT;
    CREATE UNIQUE INDEX rule_vms_by_identity ON rule_vms(identity) WHERE identity IS NOT NULL;
    ALTER TABLE tasks ADD COLUMN vm_identity TEXT;
    -- Exports through a VM's own NBD server on plain TCP only when the rule says so.
    ALTER TABLE rules ADD COLUMN allow_plain_tcp_export INTEGER NOT NULL DEFAULT 0;
    "#,
    // 5 (libvirt): a platform's type and connection parameters become one typed JSON value
    // (platform::PlatformSpec, `{"type":"qemu","qmp_dir":...}`); existing rows keep
    // their platform.
    r#"
    ALTER TABLE platforms ADD COLUMN spec TEXT NOT NULL DEFAULT '{}';
    UPDATE platforms SET spec = json_object('type', kind, 'qmp_dir', qmp_dir);
    ALTER TABLE platforms DROP COLUMN qmp_dir;
    ALTER TABLE platforms DROP COLUMN kind;
    "#,
    // 6 (operating): what a finished backup produced, so stats and metrics read
    // only this store (R33), and per-VM counters: failed tasks viewed by `stats`,
    // points kept, the last verify and the damage it found.
    r#"
    ALTER TABLE tasks ADD COLUMN bytes_read INTEGER;     -- completed backups: bytes read from the source
    ALTER TABLE tasks ADD COLUMN bytes_written INTEGER;  -- completed backups: bytes of new data written to the target
    ALTER TABLE tasks ADD COLUMN run_level TEXT;         -- completed backups: the level the point was written as
    CREATE INDEX tasks_by_rule_finished ON tasks(rule, finished_at);
    CREATE TABLE vm_status (
        rule                    TEXT NOT NULL,
        vm                      TEXT NOT NULL,
        failures_viewed_through INTEGER NOT NULL DEFAULT 0, -- R33: failed tasks with a larger id are unviewed
        points                  INTEGER,  -- points in the repository after the last task that changed them
        last_verify             TEXT,     -- when verify last checked this VM (RFC 3339 UTC)
        damaged_points          INTEGER,  -- points with missing or corrupt chunks found by that verify
        PRIMARY KEY (rule, vm)
    );
    "#,
    // 7 (operating): a rule's own webhook (NULL: system.conf's notify_url;
    // 'none': no webhook for this rule).
    r#"
    ALTER TABLE rules ADD COLUMN notify_url TEXT;
    "#,
    // 8 (s3, issue 13): where an encrypted target's key comes from (JSON
    // repo::KeySource: {"key_file": PATH} or {"passphrase_file": PATH}; never the
    // key itself); NULL for an unencrypted target.
    r#"
    ALTER TABLE targets ADD COLUMN key TEXT;
    "#,
    // 9 (recovery, issue 11): a recovery outlives the command that started it: a
    // background NBD server serves the point, a VM may run on overlays, an
    // instant recovery migrates to new images. One row per recovery, its id the
    // id of the task that started it; `task` is the recovery task serving it now.
    // The `point` of its task rows protects the served point from prune.
    r#"
    CREATE TABLE recoveries (
        id         INTEGER PRIMARY KEY,
        task       INTEGER NOT NULL,
        rule       TEXT NOT NULL,
        vm         TEXT NOT NULL,
        point      TEXT NOT NULL,
        mode       TEXT NOT NULL,                -- transient | instant | boot-verify
        stage      TEXT NOT NULL,                -- serving | migrating | migrated | stopped
        dir        TEXT NOT NULL,                -- private directory: socket, overlays, logs
        socket     TEXT NOT NULL,                -- the NBD server's unix socket
        server_pid INTEGER,
        vm_name    TEXT,                         -- the recovered VM (when started)
        vm_pid     INTEGER,
        vm_qmp     TEXT,
        disks      TEXT NOT NULL DEFAULT '[]',   -- JSON: [recovery::RecoveredDisk]
        target_dir TEXT,                         -- instant: where the new images go
        qmp_dir    TEXT,                         -- instant: the platform's QMP directory
        migration_task INTEGER,                  -- instant: the task mirroring it (last one)
        created    TEXT NOT NULL,
        finished   TEXT
    );
    CREATE INDEX recoveries_by_stage ON recoveries(stage);
    CREATE TABLE vm_resets (
        rule    TEXT NOT NULL,
        vm      TEXT NOT NULL,
        reason  TEXT NOT NULL,                   -- why the next backup must be a full
        created TEXT NOT NULL,
        PRIMARY KEY (rule, vm)
    );
    "#,
    // 10 (s3, issue 13): a rule's automatic offsite copy: the target that gets a
    // copy of every new point (NULL: none), and the copy's own retention in
    // periods of the rule's schedules (NULL: keep every copied point).
    r#"
    ALTER TABLE rules ADD COLUMN copy_to TEXT;
    ALTER TABLE rules ADD COLUMN copy_retention INTEGER;
    "#,
    // 11 (data path, issue 12): the failed and interrupted tasks of a rule's VMs
    // without reading every task it ever ran (`rule list`, `stats`: R33's
    // unviewed failures). The list is TaskState::FAILURE_SQL; a query uses this
    // index only when it names the same list (a test checks the plan).
    r#"
    CREATE INDEX tasks_failures_by_rule ON tasks(rule, vm, id)
        WHERE state IN ('failed','interrupted');
    "#,
    // 12 (data path, issue 12): each VM's newest task, newest completed backup
    // and unviewed failures (R33: failed tasks newer than the viewed mark) as
    // columns of its vm_status row, so listings read one small row per VM
    // instead of searching the task history. The triggers below keep the
    // three exact on every insert, state change and delete of a task and every
    // move of the viewed mark (a test checks them against the task history
    // after random changes). The failure
    // list is TaskState::FAILURE_SQL, "completed backup" is
    // tasks::COMPLETED_BACKUP_SQL (a test checks both are spelled here).
    // A task never changes its id, kind, rule or VM; were it to, the last
    // trigger recomputes both VMs. (Migration 13 replaced the triggers that
    // recompute with ones reading the one view vm_recount.)
    r#"
    ALTER TABLE vm_status ADD COLUMN last_task INTEGER;          -- tasks.id of the VM's newest task
    ALTER TABLE vm_status ADD COLUMN last_backup INTEGER;        -- tasks.id of its newest completed backup
    ALTER TABLE vm_status ADD COLUMN unviewed_failures INTEGER NOT NULL DEFAULT 0;
    -- A new row (a VM's first task, or a counter set first): all three from the history.
    CREATE TRIGGER vm_status_ins AFTER INSERT ON vm_status BEGIN
        UPDATE vm_status SET
          last_task = (SELECT MAX(t.id) FROM tasks t WHERE t.rule = new.rule AND t.vm = new.vm),
          last_backup = (SELECT MAX(t.id) FROM tasks t WHERE t.rule = new.rule AND t.vm = new.vm
                           AND (kind = 'backup' AND state = 'completed')),
          unviewed_failures = (SELECT COUNT(*) FROM tasks t WHERE t.rule = new.rule AND t.vm = new.vm
                                 AND t.state IN ('failed','interrupted') AND t.id > new.failures_viewed_through)
        WHERE rule = new.rule AND vm = new.vm;
    END;
    -- The viewed mark moved: count again from it (a range of tasks_failures_by_rule).
    CREATE TRIGGER vm_status_viewed AFTER UPDATE OF failures_viewed_through ON vm_status BEGIN
        UPDATE vm_status SET
          unviewed_failures = (SELECT COUNT(*) FROM tasks t WHERE t.rule = new.rule AND t.vm = new.vm
                                 AND t.state IN ('failed','interrupted') AND t.id > new.failures_viewed_through)
        WHERE rule = new.rule AND vm = new.vm;
    END;
    -- A new task. The UPDATE comes first: when the VM has no row yet it changes
    -- nothing, and the INSERT then creates the row, whose trigger counts this
    -- task once; when the row exists, the INSERT is ignored.
    CREATE TRIGGER tasks_status_ins AFTER INSERT ON tasks BEGIN
        UPDATE vm_status SET
          last_task = MAX(COALESCE(last_task, 0), new.id),
          last_backup = CASE WHEN (new.kind = 'backup' AND new.state = 'completed')
                             THEN MAX(COALESCE(last_backup, 0), new.id) ELSE last_backup END,
          unviewed_failures = unviewed_failures
            + (new.state IN ('failed','interrupted') AND new.id > failures_viewed_through)
        WHERE rule = new.rule AND vm = new.vm;
        INSERT OR IGNORE INTO vm_status (rule, vm) VALUES (new.rule, new.vm);
    END;
    -- A task changed state: it may have become (or stopped being) the newest
    -- completed backup or an unviewed failure.
    CREATE TRIGGER tasks_status_upd AFTER UPDATE OF state ON tasks
    WHEN old.state IS NOT new.state BEGIN
        UPDATE vm_status SET
          last_backup = CASE
            WHEN (new.kind = 'backup' AND new.state = 'completed')
              THEN MAX(COALESCE(last_backup, 0), new.id)
            WHEN last_backup = new.id
              THEN (SELECT MAX(t.id) FROM tasks t WHERE t.rule = new.rule AND t.vm = new.vm
                      AND (kind = 'backup' AND state = 'completed'))
            ELSE last_backup END,
          unviewed_failures = unviewed_failures + (new.id > failures_viewed_through)
            * ((new.state IN ('failed','interrupted')) - (old.state IN ('failed','interrupted')))
        WHERE rule = new.rule AND vm = new.vm;
    END;
    -- A task deleted, or (never done) moved to another id, kind, rule or VM:
    -- its VMs' three values from the history again.
    CREATE TRIGGER tasks_status_del AFTER DELETE ON tasks BEGIN
        UPDATE vm_status SET failures_viewed_through = failures_viewed_through
        WHERE rule = old.rule AND vm = old.vm;
        UPDATE vm_status SET
          last_task = (SELECT MAX(t.id) FROM tasks t WHERE t.rule = old.rule AND t.vm = old.vm),
          last_backup = (SELECT MAX(t.id) FROM tasks t WHERE t.rule = old.rule AND t.vm = old.vm
                           AND (kind = 'backup' AND state = 'completed'))
        WHERE rule = old.rule AND vm = old.vm;
    END;
    CREATE TRIGGER tasks_status_move AFTER UPDATE OF id, kind, rule, vm ON tasks BEGIN
        UPDATE vm_status SET failures_viewed_through = failures_viewed_through
        WHERE (rule = old.rule AND vm = old.vm) OR (rule = new.rule AND vm = new.vm);
        UPDATE vm_status SET
          last_task = (SELECT MAX(t.id) FROM tasks t WHERE t.rule = vm_status.rule AND t.vm = vm_status.vm),
          last_backup = (SELECT MAX(t.id) FROM tasks t WHERE t.rule = vm_status.rule AND t.vm = vm_status.vm
                           AND (kind = 'backup' AND state = 'completed'))
        WHERE (rule = old.rule AND vm = old.vm) OR (rule = new.rule AND vm = new.vm);
        INSERT OR IGNORE INTO vm_status (rule, vm) VALUES (new.rule, new.vm);
    END;
    -- Existing state: all three for the rows already there, then a row for
    -- every other VM with a task (the insert trigger fills it).
    UPDATE vm_status SET failures_viewed_through = failures_viewed_through;
    UPDATE vm_status SET
      last_task = (SELECT MAX(t.id) FROM tasks t WHERE t.rule = vm_status.rule AND t.vm = vm_status.vm),
      last_backup = (SELECT MAX(t.id) FROM tasks t WHERE t.rule = vm_status.rule AND t.vm = vm_status.vm
                       AND (kind = 'backup' AND state = 'completed'));
    INSERT OR IGNORE INTO vm_status (rule, vm) SELECT DISTINCT rule, vm FROM tasks;
    "#,
    // 13 (review of 12): the recomputation of a VM's three kept values from its
    // task history, said once. Migration 12 spelled it in five places; the view
    // vm_recount is now the one definition, and the triggers that recompute
    // (a new vm_status row, a moved viewed mark, a state change away from the
    // newest completed backup, a delete, a move) read it. A trigger's `WHERE
    // r.rule = .. AND r.vm = ..` makes SQLite evaluate the view for that one
    // row, and only the columns it selects (a test checks the plans).
    r#"
    CREATE VIEW vm_recount AS SELECT s.rule, s.vm,
        (SELECT MAX(t.id) FROM tasks t WHERE t.rule = s.rule AND t.vm = s.vm) AS last_task,
        (SELECT MAX(t.id) FROM tasks t WHERE t.rule = s.rule AND t.vm = s.vm
           AND (kind = 'backup' AND state = 'completed')) AS last_backup,
        (SELECT COUNT(*) FROM tasks t WHERE t.rule = s.rule AND t.vm = s.vm
           AND t.state IN ('failed','interrupted') AND t.id > s.failures_viewed_through)
          AS unviewed_failures
      FROM vm_status s;
    DROP TRIGGER vm_status_ins;
    CREATE TRIGGER vm_status_ins AFTER INSERT ON vm_status BEGIN
        UPDATE vm_status SET (last_task, last_backup, unviewed_failures) =
          (SELECT last_task, last_backup, unviewed_failures FROM vm_recount r
           WHERE r.rule = new.rule AND r.vm = new.vm)
        WHERE rule = new.rule AND vm = new.vm;
    END;
    DROP TRIGGER vm_status_viewed;
    CREATE TRIGGER vm_status_viewed AFTER UPDATE OF failures_viewed_through ON vm_status BEGIN
        UPDATE vm_status SET unviewed_failures =
          (SELECT unviewed_failures FROM vm_recount r WHERE r.rule = new.rule AND r.vm = new.vm)
        WHERE rule = new.rule AND vm = new.vm;
    END;
    DROP TRIGGER tasks_status_upd;
    CREATE TRIGGER tasks_status_upd AFTER UPDATE OF state ON tasks
    WHEN old.state IS NOT new.state BEGIN
        UPDATE vm_status SET
          last_backup = CASE
            WHEN (new.kind = 'backup' AND new.state = 'completed')
              THEN MAX(COALESCE(last_backup, 0), new.id)
            WHEN last_backup = new.id
              THEN (SELECT r.last_backup FROM vm_recount r WHERE r.rule = new.rule AND r.vm = new.vm)
            ELSE last_backup END,
          unviewed_failures = unviewed_failures + (new.id > failures_viewed_through)
            * ((new.state IN ('failed','interrupted')) - (old.state IN ('failed','interrupted')))
        WHERE rule = new.rule AND vm = new.vm;
    END;
    DROP TRIGGER tasks_status_del;
    CREATE TRIGGER tasks_status_del AFTER DELETE ON tasks BEGIN
        UPDATE vm_status SET (last_task, last_backup, unviewed_failures) =
          (SELECT last_task, last_backup, unviewed_failures FROM vm_recount r
           WHERE r.rule = vm_status.rule AND r.vm = vm_status.vm)
        WHERE rule = old.rule AND vm = old.vm;
    END;
    DROP TRIGGER tasks_status_move;
    CREATE TRIGGER tasks_status_move AFTER UPDATE OF id, kind, rule, vm ON tasks BEGIN
        UPDATE vm_status SET (last_task, last_backup, unviewed_failures) =
          (SELECT last_task, last_backup, unviewed_failures FROM vm_recount r
           WHERE r.rule = vm_status.rule AND r.vm = vm_status.vm)
        WHERE (rule = old.rule AND vm = old.vm) OR (rule = new.rule AND vm = new.vm);
        INSERT OR IGNORE INTO vm_status (rule, vm) VALUES (new.rule, new.vm);
    END;
    "#,
];

/// The SQL of migration `version` (1-based), for tests that check what it says.
#[cfg(test)]
pub(crate) fn migration(version: usize) -> &'static str {
    MIGRATIONS[version - 1]
}

/// The schema version this binary writes.
pub const VERSION: u32 = MIGRATIONS.len() as u32;

/// Bring the database to [`VERSION`], each step in its own transaction.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    migrate_to(conn, VERSION)
}

/// Bring the database to version `target` (tests start from older versions).
pub(crate) fn migrate_to(conn: &mut Connection, target: u32) -> Result<()> {
    let current: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > VERSION {
        bail!(
            "state schema version {current} is newer than this vmbackup understands ({VERSION}); \
             use a newer vmbackup"
        );
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target as usize)
        .skip(current as usize)
    {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Re-check under the write lock: another process may have migrated meanwhile.
        let now: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if now as usize > i {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_rows_keep_their_platform_through_the_spec_migration() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute(
            "INSERT INTO platforms (name, kind, qmp_dir, created_at) VALUES ('lab', 'qemu', '/run/q', 'now')",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let spec: String = conn
            .query_row("SELECT spec FROM platforms WHERE name = 'lab'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(
            crate::platform::PlatformSpec::from_json(&spec).unwrap(),
            crate::platform::PlatformSpec::Qemu {
                qmp_dir: "/run/q".into()
            }
        );
    }
}
