//! The NBD client against real servers: qemu-storage-daemon (a VM's guest export)
//! and qemu-nbd (offline images with a persistent dirty bitmap, TCP, error
//! injection through blkdebug). Oracles: the harness's shadow files, `qemu-img
//! convert`, and libnbd's `nbdinfo --map`.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmbackup::nbd::{parse_uri, Extent, NbdAddr, NbdClient, BASE_ALLOCATION, DIRTY};

const KIB: u64 = 1024;
/// Hang guard only: generous, never a speed assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// A qemu-nbd child process, killed on drop.
struct QemuNbd {
    child: Child,
    addr: NbdAddr,
    log: PathBuf,
}

impl QemuNbd {
    /// Serve `image` as export `disk` on a unix socket in `dir`; `extra` goes
    /// before the image argument. `-e 8`: qemu-nbd allows one client by default,
    /// and the tests connect nbdinfo beside the client under test.
    fn unix(dir: &Path, extra: &[&str], image: &str) -> QemuNbd {
        let sock = dir.join(format!("nbd-{}.sock", unique()));
        let mut args = vec!["-k", sock.to_str().unwrap(), "-x", "disk", "-t", "-e", "8"];
        args.extend_from_slice(extra);
        args.push(image);
        QemuNbd::start(dir, &args, NbdAddr::Unix { path: sock.clone() })
    }

    /// Serve `image` as export `disk` on a free loopback TCP port.
    fn tcp(dir: &Path, extra: &[&str], image: &str) -> QemuNbd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let port_text = port.to_string();
        let mut args = vec![
            "-b",
            "127.0.0.1",
            "-p",
            &port_text,
            "-x",
            "disk",
            "-t",
            "-e",
            "8",
        ];
        args.extend_from_slice(extra);
        args.push(image);
        let addr = NbdAddr::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        QemuNbd::start(dir, &args, addr)
    }

    fn start(dir: &Path, args: &[&str], addr: NbdAddr) -> QemuNbd {
        let log = dir.join(format!("qemu-nbd-{}.log", unique()));
        let child = Command::new("qemu-nbd")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start qemu-nbd");
        let mut server = QemuNbd { child, addr, log };
        wait_for(|| server.accepts(), "qemu-nbd to listen");
        server
    }

    fn accepts(&mut self) -> bool {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "qemu-nbd exited ({status}): {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        match &self.addr {
            NbdAddr::Unix { path } => std::os::unix::net::UnixStream::connect(path).is_ok(),
            NbdAddr::Tcp { host, port } | NbdAddr::Tls { host, port, .. } => {
                std::net::TcpStream::connect((host.as_str(), *port)).is_ok()
            }
        }
    }

    fn uri(&self) -> String {
        match &self.addr {
            NbdAddr::Unix { path } => format!("nbd+unix:///disk?socket={}", path.display()),
            NbdAddr::Tcp { host, port } => format!("nbd://{host}:{port}/disk"),
            NbdAddr::Tls { .. } => panic!("qemu-nbd in these tests serves no TLS"),
        }
    }

    /// The address as the client's messages show it.
    fn addr_text(&self) -> String {
        match &self.addr {
            NbdAddr::Unix { path } => format!("unix:{}", path.display()),
            NbdAddr::Tcp { host, port } => format!("{host}:{port}"),
            NbdAddr::Tls { host, port, .. } => format!("tls:{host}:{port}"),
        }
    }

    fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn signal(pid: u32, sig: &str) {
    run("kill", &[&format!("-{sig}"), &pid.to_string()]);
}

/// Poll an async condition (hang guard: panics after 10 s).
async fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let guard = tokio::time::timeout(Duration::from_secs(10), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    guard
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// A 16 MiB qcow2 laid out as: data [0,1M), hole, data [2M,2M+64K), data
/// [5M,5M+4K), write-zeroes [8M,8M+128K), data [12M,15M). Bitmap `b0` is added
/// after the first write, so it records exactly the later writes.
fn layered_image(dir: &Path) -> PathBuf {
    let img = dir.join("img.qcow2");
    let img_s = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "16M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 1M", img_s],
    );
    run("qemu-img", &["bitmap", "--add", img_s, "b0"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 2M 64k",
            "-c",
            "write -P 0x33 5M 4k",
            "-c",
            "write -z 8M 128k",
            "-c",
            "write -P 0x44 12M 3M",
            img_s,
        ],
    );
    img
}

/// `nbdinfo --map[=CONTEXT]` as extents, adjacent equal-flag lines merged (the
/// client merges too; servers may split the same run differently).
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<Extent> {
    let map_arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = run("nbdinfo", &[&map_arg, uri]);
    let mut extents: Vec<Extent> = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let e = Extent {
            offset: cols[0].parse().unwrap(),
            length: cols[1].parse().unwrap(),
            flags: cols[2].parse().unwrap(),
        };
        match extents.last_mut() {
            Some(last) if last.flags == e.flags && last.offset + last.length == e.offset => {
                last.length += e.length
            }
            _ => extents.push(e),
        }
    }
    extents
}

/// `extents` restricted to [start, end).
fn clip(extents: &[Extent], start: u64, end: u64) -> Vec<Extent> {
    extents
        .iter()
        .filter_map(|e| {
            let s = e.offset.max(start);
            let t = (e.offset + e.length).min(end);
            (s < t).then(|| Extent {
                offset: s,
                length: t - s,
                flags: e.flags,
            })
        })
        .collect()
}

fn raw_copy(uri: &str, out: &Path) -> Vec<u8> {
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

/// The whole disk read with 64 requests of 256 KiB in flight at once on one
/// connection equals the shadow byte for byte; holes read as zeros, and reads
/// across data/hole boundaries at odd offsets are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_disk_read_with_64_requests_in_flight_matches_shadow() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = TestVm::start(
        &tmp.path().join("qmp"),
        &tmp.path().join("vm"),
        "vm",
        &[DiskSpec::qcow2("disk0", 16 * MIB)],
        true,
    );
    vm.write_random("disk0", 0, MIB, 1);
    vm.write_random("disk0", 3 * MIB + 4 * KIB, 300 * KIB, 2);
    vm.write("disk0", 9 * MIB, 64 * KIB, 0x5a);
    vm.write_zeroes("disk0", 9 * MIB + 16 * KIB, 16 * KIB);
    vm.write_random("disk0", 16 * MIB - 128 * KIB, 128 * KIB, 3);
    let shadow = std::fs::read(vm.shadow("disk0")).unwrap();

    let addr = NbdAddr::Unix {
        path: vm.nbd_sock.clone().unwrap(),
    };
    let client = Arc::new(
        NbdClient::connect(&addr, "guest-disk0", &[BASE_ALLOCATION])
            .await
            .unwrap(),
    );
    assert_eq!(client.size(), 16 * MIB);
    assert!(!client.read_only());
    assert_eq!(client.max_request(), 32 * MIB as u32);

    // Stop the server so that all 64 requests are provably in flight together.
    signal(vm.pid(), "STOP");
    let chunk = 256 * KIB;
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let client = client.clone();
        reads.spawn(async move { (i, client.read(i * chunk, chunk as u32).await) });
    }
    wait_until(|| client.in_flight() == 64, "64 reads in flight").await;
    signal(vm.pid(), "CONT");
    let mut disk = vec![0u8; shadow.len()];
    let all = tokio::time::timeout(HANG_GUARD, async {
        while let Some(joined) = reads.join_next().await {
            let (i, data) = joined.unwrap();
            let at = (i * chunk) as usize;
            disk[at..at + chunk as usize].copy_from_slice(&data.unwrap());
        }
    });
    all.await.expect("reads hung");
    assert_eq!(client.in_flight(), 0);
    assert!(disk == shadow, "disk read over NBD differs from the shadow");

    // A never-written range is a hole in base:allocation and reads as zeros.
    let map = client.extents(BASE_ALLOCATION, 6 * MIB, MIB).await.unwrap();
    assert_eq!(
        map,
        vec![Extent {
            offset: 6 * MIB,
            length: MIB,
            flags: vmbackup::nbd::STATE_HOLE | vmbackup::nbd::STATE_ZERO
        }]
    );
    assert!(client
        .read(6 * MIB, MIB as u32)
        .await
        .unwrap()
        .iter()
        .all(|b| *b == 0));

    // Odd offsets and lengths across data/hole and data/zero boundaries.
    for (offset, len) in [
        (MIB - 777, 5000u32),
        (3 * MIB + 4 * KIB - 1, 3),
        (3 * MIB + 304 * KIB - 100, 70_001),
        (9 * MIB + 16 * KIB - 13, 16 * 1024 + 26),
        (16 * MIB - 1, 1),
    ] {
        let got = client.read(offset, len).await.unwrap();
        assert_eq!(
            got,
            &shadow[offset as usize..(offset + len as u64) as usize],
            "read {len} at {offset}"
        );
    }

    // Requests the client must refuse, with messages naming the request.
    let e = client.read(16 * MIB - 4, 8).await.unwrap_err();
    assert!(format!("{e:#}").contains("beyond the end"), "{e:#}");
    let e = client.read(0, 32 * MIB as u32 + 1).await.unwrap_err();
    assert!(format!("{e:#}").contains("maximum request"), "{e:#}");

    Arc::try_unwrap(client).ok().unwrap().close().await.unwrap();
}

/// `base:allocation` and `qemu:dirty-bitmap:b0` extents equal `nbdinfo --map`,
/// over the whole disk and clipped to a sub-range; the dirty extents are exactly
/// the writes made after the bitmap was added, rounded to its 64 KiB granularity
/// (the changed blocks an incremental copies, R26).
#[tokio::test]
async fn extents_match_nbdinfo_map_for_allocation_and_dirty_bitmap() {
    let tmp = tempfile::tempdir().unwrap();
    let img = layered_image(tmp.path());
    let server = QemuNbd::unix(
        tmp.path(),
        &["-r", "-f", "qcow2", "-B", "b0"],
        img.to_str().unwrap(),
    );
    let bitmap = "qemu:dirty-bitmap:b0";
    let client = NbdClient::connect(&server.addr, "disk", &[BASE_ALLOCATION, bitmap])
        .await
        .unwrap();
    assert!(client.read_only());
    let size = client.size();
    assert_eq!(size, 16 * MIB);

    let want_alloc = nbdinfo_map(&server.uri(), None);
    let alloc = client.extents(BASE_ALLOCATION, 0, size).await.unwrap();
    assert_eq!(alloc, want_alloc);
    assert!(alloc.iter().any(|e| e.flags == 0) && alloc.iter().any(|e| e.flags == 3));
    // The write-zeroes range is reported as zero, not data.
    let zeroes = client
        .extents(BASE_ALLOCATION, 8 * MIB, 128 * KIB)
        .await
        .unwrap();
    assert!(zeroes
        .iter()
        .all(|e| e.flags & vmbackup::nbd::STATE_ZERO != 0));

    let (start, end) = (MIB + 513, 13 * MIB - 7);
    let sub = client
        .extents(BASE_ALLOCATION, start, end - start)
        .await
        .unwrap();
    assert_eq!(sub, clip(&want_alloc, start, end));
    assert_eq!(sub.first().unwrap().offset, start);
    assert_eq!(sub.last().unwrap().offset + sub.last().unwrap().length, end);

    let want_dirty = nbdinfo_map(&server.uri(), Some(bitmap));
    let dirty = client.extents(bitmap, 0, size).await.unwrap();
    assert_eq!(dirty, want_dirty);
    let dirty_ranges: Vec<(u64, u64)> = dirty
        .iter()
        .filter(|e| e.flags & DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(
        dirty_ranges,
        vec![
            (2 * MIB, 64 * KIB),
            (5 * MIB, 64 * KIB),
            (8 * MIB, 128 * KIB),
            (12 * MIB, 3 * MIB)
        ]
    );

    let e = client
        .extents("qemu:dirty-bitmap:other", 0, size)
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("'qemu:dirty-bitmap:other' was not selected"),
        "{e:#}"
    );
    client.close().await.unwrap();
}

/// Asking for a context or an export the server does not have fails at connect
/// with a message naming it (and, for contexts, what the server does offer).
#[tokio::test]
async fn missing_context_and_missing_export_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let img = layered_image(tmp.path());
    let server = QemuNbd::unix(
        tmp.path(),
        &["-r", "-f", "qcow2", "-B", "b0"],
        img.to_str().unwrap(),
    );
    let e = NbdClient::connect(
        &server.addr,
        "disk",
        &[BASE_ALLOCATION, "qemu:dirty-bitmap:gone"],
    )
    .await
    .err()
    .unwrap();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("no meta context 'qemu:dirty-bitmap:gone'"),
        "{msg}"
    );
    assert!(msg.contains("qemu:dirty-bitmap:b0"), "{msg}");
    assert!(msg.contains("export 'disk'"), "{msg}");

    for contexts in [&[][..], &[BASE_ALLOCATION][..]] {
        let e = NbdClient::connect(&server.addr, "nosuch", contexts)
            .await
            .err()
            .unwrap();
        let msg = format!("{e:#}");
        assert!(msg.contains("no export 'nosuch'"), "{msg}");
    }

    let e = NbdClient::connect(
        &NbdAddr::Unix {
            path: tmp.path().join("absent.sock"),
        },
        "disk",
        &[],
    )
    .await
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("absent.sock"), "{e:#}");
}

/// TCP works like a unix socket: the whole image read with pipelined requests
/// equals `qemu-img convert` of the same export, and the address parses from
/// its URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_transport_reads_the_whole_image() {
    let tmp = tempfile::tempdir().unwrap();
    let img = layered_image(tmp.path());
    let server = QemuNbd::tcp(tmp.path(), &["-r", "-f", "qcow2"], img.to_str().unwrap());
    let (addr, export) = parse_uri(&server.uri()).unwrap();
    assert_eq!(addr, server.addr);
    let want = raw_copy(&server.uri(), &tmp.path().join("want.raw"));

    let client = Arc::new(
        NbdClient::connect(&addr, &export, &[BASE_ALLOCATION])
            .await
            .unwrap(),
    );
    let step = u64::from(client.max_request()).min(MIB);
    let mut reads = tokio::task::JoinSet::new();
    let mut offset = 0;
    while offset < client.size() {
        let len = step.min(client.size() - offset) as u32;
        let c = client.clone();
        reads.spawn(async move { (offset, c.read(offset, len).await) });
        offset += u64::from(len);
    }
    let mut got = vec![0u8; client.size() as usize];
    tokio::time::timeout(HANG_GUARD, async {
        while let Some(joined) = reads.join_next().await {
            let (at, data) = joined.unwrap();
            let data = data.unwrap();
            got[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
    })
    .await
    .expect("reads hung");
    assert!(got == want, "TCP read differs from qemu-img convert");
    assert!(got[12 * MIB as usize..15 * MIB as usize]
        .iter()
        .all(|b| *b == 0x44));
    let map = client
        .extents(BASE_ALLOCATION, 0, client.size())
        .await
        .unwrap();
    assert_eq!(map, nbdinfo_map(&server.uri(), None));
    Arc::try_unwrap(client).ok().unwrap().close().await.unwrap();
}

/// A server killed with requests in flight fails every one of them with an error
/// saying the connection is gone (none hangs), and later requests fail at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_fails_all_pending_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let img = layered_image(tmp.path());
    let mut server = QemuNbd::unix(tmp.path(), &["-r", "-f", "qcow2"], img.to_str().unwrap());
    let client = Arc::new(NbdClient::connect(&server.addr, "disk", &[]).await.unwrap());

    server.signal("STOP");
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..32u64 {
        let c = client.clone();
        reads.spawn(async move { c.read(i * 512 * KIB, 512 * 1024).await });
    }
    wait_until(|| client.in_flight() == 32, "32 reads in flight").await;
    server.kill();

    let mut failures = Vec::new();
    tokio::time::timeout(HANG_GUARD, async {
        while let Some(joined) = reads.join_next().await {
            failures.push(
                joined
                    .unwrap()
                    .expect_err("read succeeded from a killed server"),
            );
        }
    })
    .await
    .expect("pending reads hung after the server died");
    assert_eq!(failures.len(), 32);
    // One reason, the connection's, for every pending read and every later one.
    let reason = |e: &anyhow::Error| e.root_cause().to_string();
    let first = reason(&failures[0]);
    assert!(
        first.contains("closed the connection") || first.contains("Connection reset"),
        "{first}"
    );
    for e in &failures {
        let msg = format!("{e:#}");
        assert!(msg.contains("from NBD export 'disk'"), "{msg}");
        assert!(msg.contains(&server.addr_text()), "{msg}");
        assert_eq!(reason(e), first);
    }
    let later = tokio::time::timeout(HANG_GUARD, client.read(0, 4096))
        .await
        .expect("read on a dead connection hung");
    assert_eq!(reason(&later.unwrap_err()), first);
    assert_eq!(client.in_flight(), 0);
}

/// An error the server reports for one request (EIO injected into writes with
/// blkdebug) fails that request only: reads in flight beside it and after it
/// succeed on the same connection.
#[tokio::test]
async fn server_error_fails_only_its_request() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("err.qcow2");
    let img_s = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "4M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x6b 0 1M", img_s],
    );
    let opts = format!(
        "driver=qcow2,file.driver=blkdebug,file.image.driver=file,file.image.filename={img_s},\
         file.inject-error.0.event=write_aio,file.inject-error.0.errno=5,\
         file.inject-error.0.iotype=write"
    );
    let server = QemuNbd::unix(tmp.path(), &["--image-opts"], &opts);
    let client = NbdClient::connect(&server.addr, "disk", &[]).await.unwrap();
    assert!(!client.read_only());

    let data = vec![0xeeu8; 4096];
    let (written, read) = tokio::join!(client.write(64 * KIB, &data), client.read(0, 65536));
    let msg = format!("{:#}", written.unwrap_err());
    assert!(
        msg.contains("writing 4096 bytes at offset 65536 to NBD export 'disk'"),
        "{msg}"
    );
    assert!(msg.contains("EIO"), "{msg}");
    assert!(read.unwrap().iter().all(|b| *b == 0x6b));
    let after = client.read(64 * KIB, 4096).await.unwrap();
    assert!(
        after.iter().all(|b| *b == 0x6b),
        "the failed write must not have landed"
    );
    client.close().await.unwrap();
}

/// Writes and flush go through to the disk: what the client wrote is what the
/// client and `qemu-img convert` read back.
#[tokio::test]
async fn write_and_flush_land_on_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = TestVm::start(
        &tmp.path().join("qmp"),
        &tmp.path().join("vm"),
        "vm",
        &[DiskSpec::qcow2("disk0", 4 * MIB)],
        true,
    );
    let (addr, export) = parse_uri(&vm.guest_uri("disk0")).unwrap();
    let client = NbdClient::connect(&addr, &export, &[]).await.unwrap();
    let data = pseudo_random(100_000, 9);
    let at = MIB + 12_345;
    client.write(at, &data).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.read(at, data.len() as u32).await.unwrap(), data);
    client.close().await.unwrap();
    let disk = raw_copy(&vm.guest_uri("disk0"), &tmp.path().join("disk.raw"));
    assert_eq!(&disk[at as usize..at as usize + data.len()], &data[..]);
    assert!(disk[..at as usize].iter().all(|b| *b == 0));
}
