//! NBD over TLS (`NBD_OPT_STARTTLS`) against a real qemu-storage-daemon with
//! `tls-creds-x509` and `verify-peer=on`, certificates made by
//! scripts/test-certs.sh (openssl). What a remote libvirt host's backup export is.
//!
//! - the whole disk read over TLS is byte-identical to the image, and meta
//!   contexts (`base:allocation`) work over TLS;
//! - a server certificate from another CA is refused;
//! - a server without TLS is refused (never a fallback to clear text);
//! - a TLS directory missing a file fails before connecting, naming the file.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use vmbackup::nbd::{NbdAddr, NbdClient, BASE_ALLOCATION};

const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A CA with server and client certificates in `dir` (scripts/test-certs.sh).
fn certs(dir: &Path) -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/test-certs.sh");
    run(script.to_str().unwrap(), &[dir.to_str().unwrap()]);
    dir.to_path_buf()
}

/// qemu-storage-daemon exporting `image` (raw) as `disk` on 127.0.0.1, with TLS
/// from `tls` (server side, client certificates verified) or without.
struct Qsd {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Qsd {
    fn start(dir: &Path, image: &Path, tls: Option<&Path>) -> Qsd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut args: Vec<String> = Vec::new();
        let mut server = format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}");
        if let Some(tls) = tls {
            args.push("--object".into());
            args.push(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                tls.display()
            ));
            server.push_str(",tls-creds=tls0");
        }
        args.extend([
            "--blockdev".to_string(),
            format!(
                "driver=file,filename={},node-name=disk0,read-only=on",
                image.display()
            ),
            "--nbd-server".into(),
            server,
            "--export".into(),
            "type=nbd,id=e0,node-name=disk0,name=disk".into(),
        ]);
        let log = dir.join(format!("qsd-{port}.log"));
        let child = Command::new("qemu-storage-daemon")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start qemu-storage-daemon");
        let mut qsd = Qsd { child, port, log };
        wait_for(|| qsd.accepts(), "qemu-storage-daemon to listen");
        qsd
    }

    fn accepts(&mut self) -> bool {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "qemu-storage-daemon exited ({status}): {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    fn tls_addr(&self, host: &str, tls_dir: &Path) -> NbdAddr {
        NbdAddr::Tls {
            host: host.into(),
            port: self.port,
            tls_dir: tls_dir.to_path_buf(),
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 24 MiB raw image: random data, a zero hole, more random data.
fn image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.raw");
    let mut data = pseudo_random(24 * MIB as usize, 9);
    data[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    std::fs::write(&path, &data).unwrap();
    path
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(addr: &NbdAddr, contexts: &[&str]) -> anyhow::Result<NbdClient> {
    NbdClient::connect_with_timeout(addr, "disk", contexts, IO_TIMEOUT).await
}

#[test]
fn whole_disk_read_over_tls_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(&dir.path().join("pki"));
    let img = image(dir.path());
    let qsd = Qsd::start(dir.path(), &img, Some(&tls));
    let addr = qsd.tls_addr("127.0.0.1", &tls);
    let rt = runtime();
    let (read, extents) = rt.block_on(async {
        let client = connect(&addr, &[BASE_ALLOCATION]).await.unwrap();
        assert_eq!(client.size(), 24 * MIB);
        let extents = client
            .extents(BASE_ALLOCATION, 0, client.size())
            .await
            .unwrap();
        // Many requests in flight at once on the one TLS stream.
        let client = std::sync::Arc::new(client);
        let size = client.size();
        let step = u64::from(client.max_request().min(1 << 20));
        let reads: Vec<_> = (0..size)
            .step_by(step as usize)
            .map(|off| {
                let c = client.clone();
                tokio::spawn(async move { c.read(off, step.min(size - off) as u32).await })
            })
            .collect();
        let mut out = Vec::new();
        for part in reads {
            out.extend_from_slice(&part.await.unwrap().unwrap());
        }
        let client = std::sync::Arc::into_inner(client).unwrap();
        client.close().await.unwrap();
        (out, extents)
    });
    let copy = dir.path().join("read.raw");
    std::fs::write(&copy, &read).unwrap();
    assert_eq!(
        file_digest(&copy),
        file_digest(&img),
        "read over TLS differs"
    );
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    assert_eq!(
        covered,
        24 * MIB,
        "base:allocation over TLS covers the disk"
    );
}

#[test]
fn server_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server_tls = certs(&dir.path().join("server-pki"));
    let other = certs(&dir.path().join("other-pki"));
    let img = image(dir.path());
    let qsd = Qsd::start(dir.path(), &img, Some(&server_tls));
    let err = runtime()
        .block_on(connect(&qsd.tls_addr("127.0.0.1", &other), &[]))
        .err()
        .expect("a server certificate from another CA must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("TLS handshake"), "{msg}");
    // Both CAs carry the same subject: rustls finds the issuer by name and the
    // signature check fails (BadSignature); either way the peer is invalid.
    assert!(msg.contains("invalid peer certificate"), "{msg}");

    // The right CA but a name the certificate does not carry.
    let err = runtime()
        .block_on(connect(&qsd.tls_addr("127.0.0.2", &server_tls), &[]))
        .err();
    // 127.0.0.2 reaches the loopback listener only on hosts that route all of
    // 127/8 locally (Linux does); the certificate names 127.0.0.1 only.
    let msg = format!(
        "{:#}",
        err.expect("a certificate for another name must be refused")
    );
    assert!(
        msg.contains("NotValidForName") || msg.contains("Connection refused"),
        "{msg}"
    );
}

#[test]
fn server_without_tls_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(&dir.path().join("pki"));
    let img = image(dir.path());
    let qsd = Qsd::start(dir.path(), &img, None);
    let err = runtime()
        .block_on(connect(&qsd.tls_addr("127.0.0.1", &tls), &[]))
        .err()
        .expect("a server without TLS must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("does not offer TLS"), "{msg}");
    assert!(msg.contains("NBD_OPT_STARTTLS"), "{msg}");
}

#[test]
fn tls_directory_missing_a_file_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(&dir.path().join("pki"));
    let img = image(dir.path());
    let qsd = Qsd::start(dir.path(), &img, Some(&tls));
    std::fs::remove_file(tls.join("client-key.pem")).unwrap();
    let err = runtime()
        .block_on(connect(&qsd.tls_addr("127.0.0.1", &tls), &[]))
        .err()
        .expect("a missing client key must fail");
    assert!(format!("{err:#}").contains("client-key.pem"), "{err:#}");
}
