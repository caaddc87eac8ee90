//! Names on the target: VM keys, point ids and disk index file names.
//!
//! Everything a user or a hypervisor names (platform, VM, disk) is encoded before it
//! becomes part of a path: each byte outside `[A-Za-z0-9._-]` becomes `%XX`
//! (uppercase hex), as does a leading `.`, so no name can be `.`, `..`, hidden, or
//! contain `/`. The encoding is injective (`%` itself is encoded), so two different
//! names never share a path. Point ids are UTC timestamps that sort chronologically.

use anyhow::Result;
use chrono::{DateTime, NaiveDateTime, Utc};

use crate::error::invalid;

/// The `strftime` pattern of a point id, e.g. `20261124T120000Z`.
const POINT_ID_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// The file name suffix of a disk index.
pub const INDEX_SUFFIX: &str = ".idx";

/// Encode one name (platform, VM or disk) as a single safe path component.
pub fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, byte) in name.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.');
        if plain && !(i == 0 && byte == b'.') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The repository key of a VM: `<platform>/<vm>`, both encoded ([`encode_name`]).
/// It names the directory `vms/<platform>/<vm>/` (two path levels).
pub fn vm_key(platform: &str, vm: &str) -> String {
    format!("{}/{}", encode_name(platform), encode_name(vm))
}

/// Check that `key` is a VM key as [`vm_key`] makes them, so it can safely be
/// joined to a path.
pub fn check_vm_key(key: &str) -> Result<()> {
    let parts: Vec<&str> = key.split('/').collect();
    let well_formed = parts.len() == 2 && parts.iter().all(|p| is_encoded_component(p));
    if well_formed {
        Ok(())
    } else {
        Err(invalid(
            "VM key",
            key,
            "expected <platform>/<vm>, both non-empty and encoded",
        ))
    }
}

/// The file name of a disk's index inside a point directory: `<encoded disk>.idx`.
pub fn index_file_name(disk: &str) -> String {
    format!("{}{INDEX_SUFFIX}", encode_name(disk))
}

/// A new point id for a backup started at `now`: `YYYYMMDDTHHMMSSZ` in UTC.
pub fn new_point_id(now: DateTime<Utc>) -> String {
    now.format(POINT_ID_FORMAT).to_string()
}

/// Parse and validate a point id; it must be exactly what [`new_point_id`] writes.
pub fn parse_point_id(id: &str) -> Result<DateTime<Utc>> {
    let allowed = "expected a UTC timestamp YYYYMMDDTHHMMSSZ, e.g. 20261124T120000Z";
    let parsed = NaiveDateTime::parse_from_str(id, POINT_ID_FORMAT)
        .map_err(|_| invalid("point id", id, allowed))?
        .and_utc();
    if new_point_id(parsed) != id {
        return Err(invalid("point id", id, allowed));
    }
    Ok(parsed)
}

fn is_encoded_component(part: &str) -> bool {
    !part.is_empty()
        && !part.starts_with('.')
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'%'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn vm_keys_are_two_safe_path_levels() {
        assert_eq!(vm_key("lab", "web01"), "lab/web01");
        assert_eq!(vm_key("lab", "a/b c"), "lab/a%2Fb%20c");
        assert_eq!(vm_key(".", ".."), "%2E/%2E.");
        assert_eq!(vm_key("p", ".hidden"), "p/%2Ehidden");
        assert_eq!(vm_key("p", "50%"), "p/50%25");
        assert_eq!(vm_key("p", "ü"), "p/%C3%BC");
        for key in [
            vm_key("lab", "web01"),
            vm_key(".", ".."),
            vm_key("x", "a/b"),
        ] {
            check_vm_key(&key).unwrap();
        }
    }

    #[test]
    fn encoding_is_injective_on_tricky_names() {
        let names = ["a/b", "a%2Fb", "a b", "a%20b", ".", "%2E", "..", "%2E."];
        let mut encoded: Vec<String> = names.iter().map(|n| encode_name(n)).collect();
        encoded.sort();
        encoded.dedup();
        assert_eq!(encoded.len(), names.len());
    }

    #[test]
    fn malformed_vm_keys_are_refused_with_usage_error() {
        for key in [
            "",
            "lab",
            "lab/",
            "/web",
            "lab/../x",
            "lab/web/x",
            "../web",
            "lab/..",
        ] {
            let err = check_vm_key(key).unwrap_err();
            assert_eq!(
                crate::error::exit_code_of(&err),
                crate::error::ExitCode::Usage,
                "{key}"
            );
        }
    }

    #[test]
    fn point_ids_round_trip_and_sort_chronologically() {
        let t = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 5).unwrap();
        let id = new_point_id(t);
        assert_eq!(id, "20261124T120005Z");
        assert_eq!(parse_point_id(&id).unwrap(), t);
        let later = new_point_id(Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert!(id < later);
    }

    #[test]
    fn bad_point_ids_are_refused() {
        for id in [
            "",
            "20261124T120000",
            "20261124T120000z",
            "2026-11-24T12:00:00Z",
            "20261324T120000Z",
            "20261124T1200000Z",
            "+20261124T120000Z",
            "../20261124T120000Z",
        ] {
            assert!(parse_point_id(id).is_err(), "{id}");
        }
    }

    #[test]
    fn index_file_names_are_encoded() {
        assert_eq!(index_file_name("vda"), "vda.idx");
        assert_eq!(index_file_name("drive/0"), "drive%2F0.idx");
    }
}
