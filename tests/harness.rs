//! Self-test of the QEMU test harness: guest writes land in the disk and the shadow alike.

mod common;
use common::*;

#[test]
fn guest_writes_match_shadow() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = TestVm::start(
        &tmp.path().join("qmp"),
        &tmp.path().join("vm1"),
        "vm1",
        &[DiskSpec::qcow2("disk0", 16 * MIB)],
        true,
    );
    vm.write("disk0", MIB, 64 * 1024, 0x11);
    vm.write_random("disk0", 5 * MIB, 3 * 4096, 7);
    vm.write_zeroes("disk0", MIB, 4096);
    let out = tmp.path().join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-f",
            "raw",
            "-O",
            "raw",
            &vm.guest_uri("disk0"),
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(file_digest(&out), vm.shadow_digest("disk0"));
    assert_ne!(vm.shadow_digest("disk0"), {
        let z = tmp.path().join("zero");
        std::fs::File::create(&z)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        file_digest(&z)
    });
    let r = vm.qmp(&[r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#]);
    assert!(r[0]["return"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["node-name"] == "disk0"));
}
