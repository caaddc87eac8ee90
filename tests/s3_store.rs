//! The S3 store (issue 13) against a real, replicated SeaweedFS cluster
//! (tests/common/seaweedfs.rs): every `Store` operation as docs/FORMAT.md maps
//! it to S3, paginated listings, multipart uploads and their cleanup, wrong
//! credentials, and put-if-absent on a server that honours `If-None-Match`
//! and through a proxy that strips it (as Garage ignores it).

mod common;
use common::s3proxy::StripProxy;
use common::seaweedfs::{cluster, ACCESS_KEY, SECRET_KEY};
use common::store_contract::keys;

use std::time::Duration;

use vmbackup::repo::store::{S3Credentials, S3Spec, S3Store, MULTIPART_THRESHOLD};
use vmbackup::repo::Store;

fn spec(endpoint: &str, bucket: &str, prefix: &str, dir: &std::path::Path) -> S3Spec {
    S3Spec {
        endpoint: endpoint.to_string(),
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        region: "us-east-1".into(),
        credentials: S3Credentials::File {
            path: cluster().credentials_file(dir, "backup"),
            profile: "backup".into(),
        },
        ca_file: None,
        allow_http: false,
    }
}

#[test]
fn every_store_operation_round_trips_on_a_replicated_seaweedfs() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let bucket = c.bucket();
    let s = S3Store::open(&spec(&c.endpoint, &bucket, "site/a", dir.path())).unwrap();
    s.check_access().unwrap();
    assert!(
        s.conditional_writes().unwrap(),
        "SeaweedFS honours If-None-Match"
    );

    common::store_contract::check_store_contract(&s);

    // Objects outside the prefix, or whose names are not keys, are not listed.
    let other = S3Store::open(&spec(&c.endpoint, &bucket, "", dir.path())).unwrap();
    other.put("site/b/x", b"1").unwrap();
    assert!(!keys(&s, "").iter().any(|k| k.contains("site/b")));
    assert!(keys(&other, "site/a/r/").contains("site/a/r/config"));
}

#[test]
fn large_objects_go_in_parts_and_killed_uploads_are_aborted() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let bucket = c.bucket();
    let s = S3Store::open(&spec(&c.endpoint, &bucket, "", dir.path())).unwrap();
    let big: Vec<u8> = (0..MULTIPART_THRESHOLD + 3 * 1024 * 1024 + 17)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    assert!(s.put_if_absent("big/one", &big).unwrap());
    assert!(!s.put_if_absent("big/one", b"x").unwrap());
    assert_eq!(s.get("big/one").unwrap().unwrap(), big);
    s.put_if_absent_deferred("big/two", big.clone()).unwrap();
    s.flush().unwrap();
    let off = MULTIPART_THRESHOLD as u64 - 10;
    assert_eq!(
        s.get_range("big/two", off, 20).unwrap().unwrap(),
        &big[off as usize..off as usize + 20]
    );

    // A writer killed mid-upload leaves an incomplete multipart upload.
    common::seaweedfs::start_incomplete_multipart(&c.endpoint, &bucket, "big/partial");
    let young = s
        .remove_stale_partials("big/", Duration::from_secs(3600))
        .unwrap();
    assert!(young.is_empty(), "{young:?}");
    let removed = s.remove_stale_partials("big/", Duration::ZERO).unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(removed[0].contains("big/partial"), "{removed:?}");
    assert!(s
        .remove_stale_partials("big/", Duration::ZERO)
        .unwrap()
        .is_empty());
    assert_eq!(s.get("big/one").unwrap().unwrap().len(), big.len());
}

#[test]
fn wrong_credentials_and_missing_buckets_fail_without_leaking_the_secret() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let bucket = c.bucket();
    let creds = dir.path().join("bad");
    std::fs::write(
        &creds,
        format!("[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = wrong-{SECRET_KEY}\n"),
    )
    .unwrap();
    let mut bad = spec(&c.endpoint, &bucket, "", dir.path());
    bad.credentials = S3Credentials::File {
        path: creds,
        profile: "default".into(),
    };
    let err = format!(
        "{:#}",
        S3Store::open(&bad).unwrap().check_access().unwrap_err()
    );
    assert!(!err.contains(SECRET_KEY), "{err}");
    assert!(err.contains("cannot list"), "{err}");

    let missing = spec(&c.endpoint, "no-such-bucket", "", dir.path());
    let err = format!(
        "{:#}",
        S3Store::open(&missing).unwrap().check_access().unwrap_err()
    );
    assert!(err.contains("no-such-bucket"), "{err}");
}

#[test]
fn put_if_absent_stays_correct_when_the_server_ignores_if_none_match() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let bucket = c.bucket();
    let proxy = StripProxy::start(c.s3_port);
    let s = S3Store::open(&spec(&proxy.endpoint(), &bucket, "", dir.path())).unwrap();
    assert!(
        !s.conditional_writes().unwrap(),
        "through the proxy the header is gone: detected"
    );
    assert!(
        proxy.stripped() > 0,
        "the proxy saw If-None-Match and removed it"
    );
    assert!(s.put_if_absent("m/first", b"one").unwrap());
    assert!(!s.put_if_absent("m/first", b"two").unwrap());
    assert_eq!(s.get("m/first").unwrap().unwrap(), b"one", "never replaced");
    s.put_if_absent_deferred("m/second", b"a".to_vec()).unwrap();
    s.flush().unwrap();
    s.put_if_absent_deferred("m/second", b"b".to_vec()).unwrap();
    s.flush().unwrap();
    assert_eq!(s.get("m/second").unwrap().unwrap(), b"a");
    // The probe object is gone.
    let direct = S3Store::open(&spec(&c.endpoint, &bucket, "", dir.path())).unwrap();
    assert_eq!(keys(&direct, "").len(), 2);
}
