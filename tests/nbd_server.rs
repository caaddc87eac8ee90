//! vmbackup's own NBD server against real clients, before any repository code is
//! involved: libnbd's `nbdinfo` and `nbdcopy`, `qemu-img` and `qemu-io` (QEMU's NBD
//! block driver), and vmbackup's own client. The export serves an in-memory disk
//! whose 64 KiB blocks of zeros are holes; the oracle is that buffer.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use vmbackup::nbd::server::{serve_unix, BlockSource, Export, Piece, RunningServer};
use vmbackup::nbd::{NbdAddr, NbdClient, BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};

const KIB: u64 = 1024;
const BLOCK: u64 = 64 * KIB;

/// A disk in memory: a block of all zeros is a hole.
struct MemDisk(Bytes);

impl MemDisk {
    fn zero_block(&self, i: u64) -> bool {
        let start = (i * BLOCK) as usize;
        let end = ((i + 1) * BLOCK).min(self.0.len() as u64) as usize;
        self.0[start..end].iter().all(|&b| b == 0)
    }
}

impl BlockSource for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> anyhow::Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        let end = offset + u64::from(len);
        let mut at = offset;
        while at < end {
            let i = at / BLOCK;
            let stop = ((i + 1) * BLOCK).min(end);
            let n = (stop - at) as u32;
            pieces.push(if self.zero_block(i) {
                Piece::Zero(n)
            } else {
                Piece::Data(self.0.slice(at as usize..stop as usize))
            });
            at = stop;
        }
        Ok(pieces)
    }

    fn allocation(&self, offset: u64, len: u64) -> anyhow::Result<Vec<(u64, u32)>> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let i = at / BLOCK;
            let stop = ((i + 1) * BLOCK).min(end);
            let flags = if self.zero_block(i) {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            match runs.last_mut() {
                Some(last) if last.1 == flags => last.0 += stop - at,
                _ => runs.push((stop - at, flags)),
            }
            at = stop;
        }
        Ok(runs)
    }
}

/// A 16 MiB disk: random data, patterns, and zero runs that are holes.
fn disk_bytes() -> Vec<u8> {
    let mut d = vec![0u8; 16 * MIB as usize];
    d[..MIB as usize].copy_from_slice(&pseudo_random(MIB as usize, 7));
    d[(4 * MIB) as usize..(4 * MIB + 192 * KIB) as usize].fill(0x11);
    d[(9 * MIB + 4 * KIB) as usize..(9 * MIB + 8 * KIB) as usize].fill(0x22);
    let tail = 16 * MIB - 300 * KIB;
    d[tail as usize..].copy_from_slice(&pseudo_random(300 * KIB as usize, 9));
    d
}

struct Served {
    _rt: tokio::runtime::Runtime,
    server: Option<RunningServer>,
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    data: Vec<u8>,
}

impl Served {
    fn new() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let data = disk_bytes();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let exports = vec![
            Export {
                name: "vda".into(),
                description: "test disk vda".into(),
                source: Arc::new(MemDisk(Bytes::from(data.clone()))),
            },
            Export {
                name: "small".into(),
                description: "a second export".into(),
                source: Arc::new(MemDisk(Bytes::from(vec![0x5au8; 4096]))),
            },
        ];
        let server = rt.block_on(async { serve_unix(&sock, exports) }).unwrap();
        Served {
            _rt: rt,
            server: Some(server),
            _dir: dir,
            sock,
            data,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn dir(&self) -> &Path {
        self.sock.parent().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self._rt.block_on(s.stop());
        }
    }
}

fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

#[test]
fn nbdinfo_sees_a_read_only_multi_conn_export_with_base_allocation() {
    let s = Served::new();
    let out = run("nbdinfo", &["--json", &s.uri("vda")]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vda");
    assert_eq!(e["export-size"], 16 * MIB);
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_df"], true);
    assert_eq!(e["description"], "test disk vda");
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["base:allocation"]);
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["TLS"], false);

    let list = run("nbdinfo", &["--list", "--json", &s.uri("")]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vda", "small"]);

    // An unknown export is refused with the names of those that exist.
    let out = Command::new("nbdinfo").arg(s.uri("nope")).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope"), "{err}");

    // The socket is the server's own: 0600.
    let mode = std::fs::metadata(&s.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn nbdinfo_map_shows_zero_blocks_as_holes() {
    let s = Served::new();
    let out = run("nbdinfo", &["--map", "--json", &s.uri("vda")]);
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let runs: Vec<(u64, u64, u64)> = map
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    let data = 0u64;
    let hole = 3u64;
    let tail_block = (16 * MIB - 300 * KIB) / BLOCK * BLOCK;
    assert_eq!(
        runs,
        vec![
            (0, MIB, data),
            (MIB, 3 * MIB, hole),
            (4 * MIB, 192 * KIB, data),
            (4 * MIB + 192 * KIB, 5 * MIB - 192 * KIB, hole),
            (9 * MIB, BLOCK, data),
            (9 * MIB + BLOCK, tail_block - 9 * MIB - BLOCK, hole),
            (tail_block, 16 * MIB - tail_block, data),
        ]
    );
}

#[test]
fn nbdcopy_and_qemu_img_copy_the_export_byte_exact_with_many_requests_in_flight() {
    let s = Served::new();
    let want = digest(&s.data);
    // nbdcopy: 4 connections (multi-conn), 64 requests in flight each, and two
    // copies at once: several clients.
    let a = s.dir().join("a.raw");
    let b = s.dir().join("b.raw");
    let uri = s.uri("vda");
    let copies: Vec<_> = [&a, &b]
        .iter()
        .map(|out| {
            Command::new("nbdcopy")
                .args(["-C", "4", "-R", "64", "--request-size", "65536", &uri])
                .arg(out)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in copies {
        assert!(c.wait().unwrap().success());
    }
    assert_eq!(file_digest(&a), want);
    assert_eq!(file_digest(&b), want);
    // Holes stay holes: the copy is sparse.
    let allocated = run("du", &["-k", a.to_str().unwrap()]);
    let kib: u64 = allocated
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(kib < 3 * 1024, "copy is not sparse: {kib} KiB allocated");

    let c = s.dir().join("c.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            c.to_str().unwrap(),
        ],
    );
    assert_eq!(file_digest(&c), want);
    let q = s.dir().join("c.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &uri,
            q.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            q.to_str().unwrap(),
            c.to_str().unwrap(),
        ],
    );
}

#[test]
fn qemu_block_driver_reads_patterns_and_cannot_write() {
    let s = Served::new();
    let uri = s.uri("vda");
    let io = |cmd: &str| {
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", cmd, &uri])
            .output()
            .unwrap()
    };
    for cmd in [
        "read -P 0x11 4M 192k",
        "read -P 0x22 9220k 4k",
        "read -P 0 2M 64k",
        "read -P 0 9M 4k",
    ] {
        let out = io(cmd);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success()
                && text.contains("read ")
                && !text.contains("Pattern verification failed"),
            "{cmd}: {text}"
        );
    }
    // Opened for writing, QEMU's driver sees a read-only export.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 0 4k", &uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("wrote 4096"), "write went through: {text}");
}

#[test]
fn vmbackup_client_reads_block_status_and_gets_eperm_on_write() {
    let s = Served::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let addr = NbdAddr::Unix {
            path: s.sock.clone(),
        };
        let c = NbdClient::connect(&addr, "vda", &[BASE_ALLOCATION])
            .await
            .unwrap();
        assert!(c.read_only() && c.can_multi_conn());
        assert_eq!(c.size(), 16 * MIB);
        let ext = c.extents(BASE_ALLOCATION, 0, 16 * MIB).await.unwrap();
        let data: u64 = ext.iter().filter(|e| e.flags == 0).map(|e| e.length).sum();
        assert_eq!(
            data,
            MIB + 192 * KIB + BLOCK + (16 * MIB - (16 * MIB - 300 * KIB) / BLOCK * BLOCK)
        );
        // Reads crossing data and holes, many at once.
        let c = Arc::new(c);
        let want = Arc::new(s.data.clone());
        let mut reads = tokio::task::JoinSet::new();
        for i in 0..64u64 {
            let (c, want) = (c.clone(), want.clone());
            reads.spawn(async move {
                let at = (i * 256 * KIB) as usize;
                let got = c.read(at as u64, (256 * KIB) as u32).await.unwrap();
                assert_eq!(got, want[at..at + (256 * KIB) as usize], "read {i}");
            });
        }
        while let Some(r) = reads.join_next().await {
            r.unwrap();
        }
        let c = Arc::into_inner(c).unwrap();
        // An unknown export is refused with the server's list of exports.
        let err = NbdClient::connect(&addr, "nope", &[]).await.err().unwrap();
        assert!(
            format!("{err:#}").contains("exports: vda, small"),
            "{err:#}"
        );
        let err = c.write(0, &[1u8; 4096]).await.unwrap_err();
        assert!(format!("{err:#}").contains("read-only"), "{err:#}");
        // Reads outside the export fail with a reason, the connection survives.
        let small = NbdClient::connect(&addr, "small", &[]).await.unwrap();
        assert_eq!(small.read(0, 4096).await.unwrap(), vec![0x5a; 4096]);
        small.close().await.unwrap();
        c.close().await.unwrap();
    });
}
