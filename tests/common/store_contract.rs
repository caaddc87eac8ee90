//! The `Store` contract (docs/FORMAT.md, "Storage operations"), checked the
//! same way on every implementation: a directory (tests/repo_format.rs) and
//! S3 on SeaweedFS (tests/s3_store.rs). `s` must be empty.

use std::collections::BTreeSet;

use vmbackup::repo::Store;

/// Every key under `prefix`, as `list` gives them.
pub fn keys(s: &dyn Store, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    s.list(prefix, &mut |i| {
        out.insert(i.key);
        Ok(())
    })
    .unwrap();
    out
}

/// Put-if-absent, get and ranges, replace, keys with '%', string prefixes,
/// deferred puts over more than one listing page (1000 keys), deletes.
pub fn check_store_contract(s: &dyn Store) {
    assert!(s
        .put_if_absent("r/chunks/ab/cd/x1", b"hello world")
        .unwrap());
    assert!(!s.put_if_absent("r/chunks/ab/cd/x1", b"other").unwrap());
    assert_eq!(s.get("r/chunks/ab/cd/x1").unwrap().unwrap(), b"hello world");
    assert_eq!(
        s.get_range("r/chunks/ab/cd/x1", 6, 100).unwrap().unwrap(),
        b"world"
    );
    assert_eq!(
        s.get_range("r/chunks/ab/cd/x1", 0, 5).unwrap().unwrap(),
        b"hello"
    );
    assert_eq!(
        s.get_range("r/chunks/ab/cd/x1", 50, 5).unwrap().unwrap(),
        b""
    );
    assert_eq!(s.get("r/none").unwrap(), None);
    assert_eq!(s.get_range("r/none", 0, 1).unwrap(), None);
    assert!(s.exists("r/chunks/ab/cd/x1").unwrap());
    assert!(!s.exists("r/none").unwrap());
    s.put("r/config", b"a").unwrap();
    s.put("r/config", b"b").unwrap();
    assert_eq!(s.get("r/config").unwrap().unwrap(), b"b");
    // Keys hold '%' (encoded VM names): stored and listed as given.
    s.put("r/vms/lab/web%2001/p/manifest.json", b"{}").unwrap();
    assert!(keys(s, "r/vms/").contains("r/vms/lab/web%2001/p/manifest.json"));

    // Prefixes are string prefixes, not directories.
    for k in ["vms/a/1/m", "vms/a/2/m", "vms/ab/1/m"] {
        s.put(k, b"x").unwrap();
    }
    assert_eq!(keys(s, "vms/a/").len(), 2);
    assert_eq!(keys(s, "vms/a").len(), 3);

    // Deferred puts: visible to this handle at once, durable after flush.
    for i in 0..1100 {
        s.put_if_absent_deferred(&format!("many/{i:05}"), format!("v{i}").into_bytes())
            .unwrap();
    }
    assert!(s.exists("many/01099").unwrap());
    s.flush().unwrap();
    assert_eq!(keys(s, "many/").len(), 1100);
    assert_eq!(s.get("many/00777").unwrap().unwrap(), b"v777");

    // Deletes: absent is not an error.
    s.delete("many/00001").unwrap();
    s.delete("many/00001").unwrap();
    assert!(!s.exists("many/00001").unwrap());
}
