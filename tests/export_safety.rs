//! Disk data on the network (issue 8): QEMU runs at most one NBD server. When
//! the VM's QEMU already runs one on plain TCP (no TLS), an export added to it
//! could be read by anyone reaching the port during the backup: the backup is
//! refused (exit 3, naming the address) unless the rule allows it explicitly.

mod common;
use common::*;

use std::process::{Child, Command, Stdio};

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QSD "VM" whose own NBD server listens on plain TCP at 127.0.0.1:`port`.
fn tcp_vm(env: &Env) -> (Qsd, u16) {
    let work = env.path("vms/vm1");
    std::fs::create_dir_all(&work).unwrap();
    let img = work.join("disk0.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 1M",
            img.to_str().unwrap(),
        ],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sock = env.qmp_dir.join("vm1.qmp");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk0-file,filename={}",
            img.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=disk0,file=disk0-file"])
        .arg("--chardev")
        .arg(format!(
            "socket,id=q,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["--monitor", "chardev=q"])
        .arg("--nbd-server")
        .arg(format!(
            "addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vm = Qsd(child);
    wait_for(
        || sock.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "QSD with a TCP NBD server",
    );
    (vm, port)
}

fn exports(env: &Env) -> serde_json::Value {
    qmp_session(
        &env.qmp_dir.join("vm1.qmp"),
        &[r#"{"execute":"query-block-exports"}"#],
    )[0]["return"]
        .clone()
}

#[test]
fn a_backup_through_a_plain_tcp_nbd_server_is_refused_unless_allowed() {
    let env = Env::new();
    let (_vm, port) = tcp_vm(&env);
    env.add_lab("t");
    env.add_rule("r", "lab", "vm1", "t", &["--once", "2099-01-01 00:00"]);
    let err = env.fails(3, &["run-now", "r", "--level", "full"]);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("plain TCP"), "{err}");
    assert!(err.contains("--allow-plain-tcp-export"), "{err}");
    assert_eq!(exports(&env), serde_json::json!([]), "an export was added");
    assert!(env
        .json(&["points", "r", "--vm", "vm1"])
        .as_array()
        .unwrap()
        .is_empty());

    // A rule that allows it explicitly backs the VM up through that server.
    env.ok(&["rule", "remove", "r"]);
    env.add_rule(
        "r2",
        "lab",
        "vm1",
        "t",
        &["--once", "2099-01-01 00:00", "--allow-plain-tcp-export"],
    );
    let show = env.json(&["rule", "show", "r2"]);
    assert_eq!(show["allow_plain_tcp_export"], true, "{show}");
    env.ok(&["run-now", "r2", "--level", "full"]);
    assert_eq!(exports(&env), serde_json::json!([]), "the export stayed");
    let dest = env.path("restored");
    env.ok(&[
        "restore",
        "r2",
        "--vm",
        "vm1",
        "--to",
        dest.to_str().unwrap(),
    ]);
    let mut want = vec![0x5au8; MIB as usize];
    want.resize(8 * MIB as usize, 0);
    let expected = env.path("expected.raw");
    std::fs::write(&expected, want).unwrap();
    assert_eq!(file_digest(&dest.join("disk0.raw")), file_digest(&expected));
}
