//! Disk data on the network (issue 8): QEMU runs at most one NBD server. When
//! the VM's QEMU already runs one on plain TCP (no TLS), an export added to it
//! could be read by anyone reaching the port during the backup: the backup is
//! refused (exit 3, naming the address) unless the rule allows it explicitly.

mod common;
use common::*;

/// A QSD "VM" whose own NBD server listens on plain TCP at 127.0.0.1:`port`.
fn tcp_vm(env: &Env) -> (Proc, u16) {
    let work = env.path("vms/vm1");
    std::fs::create_dir_all(&work).unwrap();
    let img = work.join("disk0.qcow2");
    qcow2_image(&img, 8 * MIB, 0x5a, MIB);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let vm = Qsd::new()
        .qcow2_disk("disk0", &img)
        .qmp(&env.qmp_dir.join("vm1.qmp"))
        .nbd_tcp(port)
        .start();
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
    assert_eq!(
        env.restored_digest("r2", "vm1", None, "disk0"),
        pattern_digest(0x5a, MIB, 8 * MIB)
    );
}
