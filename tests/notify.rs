//! Monitoring against real tasks: the Prometheus textfile after a failure and
//! after a success (parsed), and webhook payloads received by a local HTTP
//! listener for a failed task, a skipped run (R28), a task whose process was
//! killed (interrupted), retries, and the bound on how long notifications may
//! delay a process's exit; `notify_command` and `notify test`.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{DiskSpec, Env, TestVm, MIB};

/// What the listener does with one request.
#[derive(Clone, Copy)]
enum Reply {
    Status(u16),
    /// Read the request, never answer (until the test ends).
    Hang,
}

/// One request the listener received.
#[derive(Debug, Clone)]
struct Received {
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: serde_json::Value,
    at: Instant,
}

/// A local HTTP endpoint that records every POST. Replies follow `script`,
/// then 200.
struct Hook {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Hook {
    fn start(script: Vec<Reply>) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook/s3cret-path", listener.local_addr().unwrap());
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut script = script.into_iter();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let reply = script.next().unwrap_or(Reply::Status(200));
                let sink = sink.clone();
                std::thread::spawn(move || serve(conn, reply, &sink));
            }
        });
        Hook { url, got }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Wait (up to 30 s) until `n` requests arrived.
    fn wait_for(&self, n: usize) -> Vec<Received> {
        let t = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "expected {n} webhook requests, got {got:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve(conn: TcpStream, reply: Reply, sink: &Mutex<Vec<Received>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            if k == "content-length" {
                len = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    sink.lock().unwrap().push(Received {
        headers,
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        at: Instant::now(),
    });
    let mut conn = conn;
    match reply {
        Reply::Status(code) => {
            let _ = write!(
                conn,
                "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
        Reply::Hang => std::thread::sleep(Duration::from_secs(120)),
    }
}

/// A lab with one VM `n1` in rule `nr`, system.conf with `conf` lines.
fn lab(conf: &str) -> (Env, TestVm) {
    let env = Env::new();
    std::fs::write(&env.config, conf).unwrap();
    let vm = env.vm("n1", &[DiskSpec::qcow2("vda", 8 * MIB)], true);
    vm.write_random("vda", 0, MIB, 3);
    env.add_lab("t1");
    env.add_rule("nr", "lab", "n1", "t1", &["--once", "2030-01-01 00:00"]);
    (env, vm)
}

fn check_times(body: &serde_json::Value) {
    for key in ["time", "started", "finished"] {
        let t = body[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} in {body}"));
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.as_bytes()[19] == b'.',
            "{key} = {t}"
        );
    }
}

/// `name{rule="..",vm=".."} value` lines of a textfile, with HELP and TYPE
/// checked for every metric that has values.
fn parse_metrics(text: &str) -> BTreeMap<(String, String, String), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let (name, labels) = series.split_once('{').expect("labels");
        let labels = labels.trim_end_matches('}');
        let mut rule = String::new();
        let mut vm = String::new();
        for kv in labels.split(',') {
            let (k, v) = kv.split_once('=').unwrap();
            let v = v.trim_matches('"').to_string();
            match k {
                "rule" => rule = v,
                "vm" => vm = v,
                other => panic!("unexpected label {other}"),
            }
        }
        assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        out.insert((name.to_string(), rule, vm), value.parse().unwrap());
    }
    out
}

fn metric(m: &BTreeMap<(String, String, String), f64>, name: &str) -> Option<f64> {
    m.get(&(name.to_string(), "nr".to_string(), "n1".to_string()))
        .copied()
}

#[test]
fn prometheus_textfile_after_failure_and_after_success_and_failed_task_webhook() {
    let hook = Hook::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("vmbackup.prom");
    let header = dir.path().join("header");
    std::fs::write(&header, "X-Vmbackup-Token: t0ps3cret\n").unwrap();
    let (env, mut vm) = lab(&format!(
        "prometheus_textfile = {}\nnotify_url = {}\nnotify_header_file = {}\nnotify_timeout = 5s\n",
        prom.display(),
        hook.url,
        header.display()
    ));

    vm.kill();
    let err = env.fails(3, &["run-now", "nr", "--level", "full"]);
    let text = std::fs::read_to_string(&prom).unwrap();
    let m = parse_metrics(&text);
    assert_eq!(
        metric(&m, "vmbackup_task_failures_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&m, "vmbackup_unviewed_failures"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&m, "vmbackup_last_success_timestamp_seconds"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(metric(&m, "vmbackup_tasks_running"), Some(0.0), "{text}");
    assert_eq!(metric(&m, "vmbackup_last_duration_seconds"), None, "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&prom).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);

    // The failed task's webhook: sent before the process exited.
    let got = hook.received();
    assert_eq!(got.len(), 1, "{got:?} {err}");
    let b = &got[0].body;
    assert_eq!(b["event"], "failed", "{b}");
    assert_eq!(
        (b["rule"].as_str(), b["vm"].as_str()),
        (Some("nr"), Some("n1"))
    );
    assert_eq!(b["status"], "failed");
    assert_eq!(b["kind"], "backup");
    assert_eq!(b["level"], "full");
    assert_eq!(b["exit_code"], 3);
    assert!(b["task"].as_i64().unwrap() > 0);
    assert!(b["error"].as_str().unwrap().contains("n1"), "{b}");
    assert!(b["point"].is_null() && b["host"].as_str().is_some_and(|h| !h.is_empty()));
    check_times(b);
    let h = &got[0].headers;
    assert!(
        h.contains(&("x-vmbackup-token".into(), "t0ps3cret".into())),
        "{h:?}"
    );
    assert!(h
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/json"));
    // The URL's secret path never reaches stderr.
    assert!(!err.contains("s3cret-path"), "{err}");

    // A success: the default notify_on (failure,fallback) sends nothing more.
    vm.restart();
    env.ok(&["run-now", "nr", "--level", "full"]);
    let text = std::fs::read_to_string(&prom).unwrap();
    let m = parse_metrics(&text);
    let last = metric(&m, "vmbackup_last_success_timestamp_seconds").unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(last > now - 120.0 && last <= now + 1.0, "{text}");
    assert!(
        metric(&m, "vmbackup_last_duration_seconds").unwrap() > 0.0,
        "{text}"
    );
    assert!(
        metric(&m, "vmbackup_bytes_read_total").unwrap() >= MIB as f64,
        "{text}"
    );
    assert!(
        metric(&m, "vmbackup_bytes_stored_total").unwrap() > 0.0,
        "{text}"
    );
    assert_eq!(metric(&m, "vmbackup_points"), Some(1.0), "{text}");
    assert_eq!(
        metric(&m, "vmbackup_task_failures_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&m, "vmbackup_last_verify_timestamp_seconds"), None);
    // verify adds its timestamp and damage count; stats resets the unviewed count.
    env.ok(&["verify", "nr"]);
    env.ok(&["stats", "nr"]);
    let m = parse_metrics(&std::fs::read_to_string(&prom).unwrap());
    assert!(metric(&m, "vmbackup_last_verify_timestamp_seconds").unwrap() >= last);
    assert_eq!(metric(&m, "vmbackup_damaged_points"), Some(0.0));
    assert_eq!(metric(&m, "vmbackup_unviewed_failures"), Some(0.0));
    assert_eq!(hook.received().len(), 1, "no notification for a success");
}

#[test]
fn webhook_retries_then_succeeds_and_a_planned_full_is_not_a_fallback() {
    let hook = Hook::start(vec![Reply::Status(500), Reply::Status(503)]);
    let (env, vm) = lab(&format!(
        "notify_url = {}\nnotify_on = failure,fallback,success\nnotify_timeout = 2s\n",
        hook.url
    ));
    // The VM's first backup asked as inc runs as a planned full: exit 0, event
    // `completed`, not `fallback`.
    let out = env
        .cmd()
        .args(["--json", "run-now", "nr", "--level", "inc"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = hook.wait_for(3);
    assert_eq!(got.len(), 3, "two failures, then success: {got:?}");
    assert!(
        got.iter().all(|r| r.body["event"] == "completed"),
        "{got:?}"
    );
    assert_eq!(got[2].body["status"], "completed");
    assert!(got[2].body["point"].as_str().is_some());
    // Backoff between attempts: timeout/10, then timeout/5.
    assert!(got[1].at - got[0].at >= Duration::from_millis(200));
    assert!(got[2].at - got[1].at >= Duration::from_millis(400));
    drop(vm);
}

#[test]
fn notifications_add_at_most_four_timeouts_to_the_exit() {
    let hook = Hook::start(vec![Reply::Hang, Reply::Hang, Reply::Hang]);
    let (env, mut vm) = lab(&format!("notify_url = {}\nnotify_timeout = 1s\n", hook.url));
    vm.kill();
    let out = env
        .cmd()
        .args(["run-now", "nr", "--level", "full"])
        .output()
        .unwrap();
    let exited = chrono::Utc::now();
    assert_eq!(
        out.status.code(),
        Some(3),
        "the task's result, not the webhook's"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(hook.received().len(), 3, "three attempts: {err}");
    assert!(err.contains("notification by webhook"), "{err}");
    assert!(err.contains("after 3 attempt(s)"), "{err}");
    let task = env.json(&["task", "list", "--all"])[0].clone();
    let finished =
        chrono::DateTime::parse_from_rfc3339(task["finished"].as_str().unwrap()).unwrap();
    let added = (exited - finished.with_timezone(&chrono::Utc)).num_milliseconds();
    // 3 attempts of 1 s and 0.3 s of backoff; never more than 4 s.
    assert!(
        (3000..4500).contains(&added),
        "notifications added {added} ms"
    );
    // The failure is in the task's log too.
    let logs = env.ok(&["logs", "nr"]);
    assert!(logs.contains("notification by webhook"), "{logs}");
}

/// Kills a spawned vmbackup process when a test ends early.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn skipped_run_and_killed_process_are_notified() {
    let hook = Hook::start(vec![]);
    let env = Env::new();
    std::fs::write(&env.config, format!("notify_url = {}\n", hook.url)).unwrap();
    let vm = env.vm("n1", &[DiskSpec::qcow2("vda", 8 * MIB)], true);
    vm.write_random("vda", 0, MIB, 3);
    env.add_lab("t1");
    env.add_rule(
        "nr",
        "lab",
        "n1",
        "t1",
        &[
            "--once",
            "2030-01-01 00:00",
            "--bandwidth",
            "mon-sun 00:00-24:00 pause",
        ],
    );
    let mut first = Proc(
        Command::new(assert_cmd::cargo::cargo_bin("vmbackup"))
            .env("VMBACKUP_STATE", &env.state)
            .env("VMBACKUP_CONFIG", &env.config)
            .args(["run-now", "nr", "--level", "full"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_for(
        || {
            env.json(&["task", "list"])
                .as_array()
                .is_some_and(|l| l.iter().any(|t| t["phase"] == "running"))
        },
        "the first task running (paused)",
    );
    // R28: a second run while the first one holds the VM is skipped.
    env.fails(4, &["run-now", "nr", "--level", "full"]);
    let got = hook.wait_for(1);
    assert_eq!(got[0].body["event"], "skipped", "{got:?}");
    assert_eq!(got[0].body["status"], "skipped");
    assert!(got[0].body["error"].as_str().unwrap().contains("R28"));
    assert_eq!(got[0].body["exit_code"], 4);

    // The first process dies; the next vmbackup that looks finds its task.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    env.ok(&["task", "list"]);
    let got = hook.wait_for(2);
    let b = &got[1].body;
    assert_eq!(b["event"], "interrupted", "{got:?}");
    assert_eq!(b["status"], "interrupted");
    assert!(b["error"].as_str().unwrap().contains("is gone"), "{b}");
    check_times(b);
    drop(vm);
}

#[test]
fn notify_command_and_notify_test_and_a_rule_without_webhook() {
    let hook = Hook::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mail");
    let (env, mut vm) = lab(&format!(
        "notify_url = {}\nnotify_command = cat >> {}; echo \" $VMBACKUP_EVENT\" >> {}\n",
        hook.url,
        out.display(),
        out.display()
    ));
    let report = env.json(&["notify", "test"]);
    assert_eq!(
        report["deliveries"].as_array().unwrap().len(),
        2,
        "{report}"
    );
    assert!(report["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["sent"] == true));
    assert_eq!(hook.received()[0].body["event"], "test");
    let mail = std::fs::read_to_string(&out).unwrap();
    let doc: serde_json::Value = serde_json::from_str(mail.lines().next().unwrap()).unwrap();
    assert_eq!(doc["event"], "test");
    assert!(mail.contains(" test"), "{mail}");

    // The rule turns its webhook off: the command still runs.
    env.ok(&["rule", "edit", "nr", "--notify-url", "none"]);
    assert_eq!(env.json(&["rule", "show", "nr"])["notify_url"], "none");
    vm.kill();
    env.fails(3, &["run-now", "nr", "--level", "full"]);
    assert_eq!(hook.received().len(), 1, "no webhook for this rule");
    let mail = std::fs::read_to_string(&out).unwrap();
    assert!(
        mail.contains("\"event\":\"failed\"") && mail.contains(" failed"),
        "{mail}"
    );
    env.refused(
        &["rule", "edit", "nr", "--notify-url", "ftp://x"],
        &["--notify-url", "none"],
    );
    env.ok(&["rule", "edit", "nr", "--notify-url", "default"]);
    assert!(env.json(&["rule", "show", "nr"])["notify_url"].is_null());
    // A rule's webhook URL (its token) never shows in full.
    let secret = "https://hooks.example.com/services/T0/B0/s3cretT0ken";
    env.ok(&["rule", "edit", "nr", "--notify-url", secret]);
    let shown = env.json(&["rule", "show", "nr"])["notify_url"].clone();
    assert_eq!(shown, "https://hooks.example.com/...");
    for args in [
        &["rule", "show", "nr"][..],
        &["rule", "list"],
        &["--json", "rule", "list"],
    ] {
        let out = env.ok(args);
        assert!(!out.contains("s3cretT0ken"), "{out}");
    }
}

#[test]
fn notify_test_without_a_channel_is_a_usage_error() {
    let env = Env::new();
    env.ok(&["rule", "list"]);
    env.refused(&["notify", "test"], &["notify_url", "notify_command"]);
}
