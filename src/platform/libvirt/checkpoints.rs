//! vmbackup's libvirt checkpoints: `vmbackup-<POINT>`, one per point taken while
//! the domain ran. libvirt keeps every checkpoint's bitmaps recording, so "changes
//! since point P" is the bitmap of P's checkpoint, whatever came after it.
//!
//! - Which checkpoint a point's changes start from is its tracking token,
//!   `{"checkpoint": NAME, "xml": XML}`, stored in the manifest.
//! - A checkpoint libvirt lost (domain undefined and defined again, a transient
//!   domain restarted) is redefined from that XML when its bitmaps are still in the
//!   images; otherwise the inc/diff runs as a full, with the reason (R26).
//! - After a commit (and after a crash), only the checkpoints the next incremental
//!   and differential need are kept: the newest at or before the newest point and
//!   the newest at or before the newest full. Deleting one makes libvirt merge its
//!   bitmaps, so no change is lost. Checkpoints without the prefix are never touched.

use anyhow::{Context, Result};
use serde_json::json;

use super::ffi::{self, Checkpoint, Domain};
use super::xml;
use crate::platform::{CbtUnavailable, TrackingToken};

pub const PREFIX: &str = "vmbackup-";

/// The checkpoint of point `point`.
pub fn name(point: &str) -> String {
    format!("{PREFIX}{point}")
}

/// The point id of one of our checkpoints; `None` for anyone else's.
pub fn point_of(name: &str) -> Option<&str> {
    let point = name.strip_prefix(PREFIX)?;
    crate::repo::parse_point_id(point).ok().map(|_| point)
}

/// The token of a checkpoint: its name and XML (without the domain).
pub fn token(cp: &Checkpoint) -> Result<TrackingToken> {
    Ok(json!({ "checkpoint": cp.name(), "xml": cp.xml()? }))
}

/// The checkpoint a token names, and its XML.
pub fn from_token(token: &TrackingToken) -> Option<(&str, &str)> {
    Some((token["checkpoint"].as_str()?, token["xml"].as_str()?))
}

/// Of our checkpoint point ids (any order), the ones to keep: the newest at or
/// before `latest` and the newest at or before `latest_full`.
pub fn to_keep<'a>(
    ours: &[&'a str],
    latest: Option<&str>,
    latest_full: Option<&str>,
) -> Vec<&'a str> {
    let newest_upto =
        |limit: Option<&str>| limit.and_then(|l| ours.iter().copied().filter(|p| *p <= l).max());
    let mut keep: Vec<&str> = [newest_upto(latest), newest_upto(latest_full)]
        .into_iter()
        .flatten()
        .collect();
    keep.sort_unstable();
    keep.dedup();
    keep
}

/// Our newest checkpoint, if any.
pub fn newest<'d>(dom: &'d Domain) -> Result<Option<Checkpoint<'d>>> {
    Ok(dom
        .checkpoints()?
        .into_iter()
        .filter(|c| point_of(&c.name()).is_some())
        .max_by_key(|c| c.name()))
}

/// Delete every checkpoint of ours that no future backup needs (module docs).
pub fn settle(
    dom: &Domain,
    latest: Option<&str>,
    latest_full: Option<&str>,
    actions: &mut Vec<String>,
) -> Result<()> {
    let all = dom.checkpoints()?;
    let names: Vec<String> = all.iter().map(|c| c.name()).collect();
    let ours: Vec<&str> = names.iter().filter_map(|n| point_of(n)).collect();
    let keep = to_keep(&ours, latest, latest_full);
    // Newest first: each deletion merges into a parent that still exists.
    let mut doomed: Vec<(&str, &Checkpoint)> = names
        .iter()
        .zip(&all)
        .filter(|(n, _)| point_of(n).is_some_and(|p| !keep.contains(&p)))
        .map(|(n, c)| (n.as_str(), c))
        .collect();
    doomed.sort_by(|a, b| b.0.cmp(a.0));
    for (n, cp) in doomed {
        cp.delete()?;
        actions.push(format!(
            "deleted checkpoint {n} (no future backup needs it)"
        ));
    }
    Ok(())
}

/// Make sure the checkpoint a base point's token names exists, redefining it from
/// the token's XML when libvirt lost it. Returns its name, or [`CbtUnavailable`]
/// saying why the changes since `base` cannot be had.
pub fn ensure(
    dom: &Domain,
    disk: &str,
    base: &str,
    token: Option<&TrackingToken>,
    notes: &mut Vec<String>,
) -> Result<String> {
    let unavailable = |reason: String| -> anyhow::Error {
        CbtUnavailable {
            disk: disk.to_string(),
            reason,
        }
        .into()
    };
    let Some((name, cp_xml)) = token.and_then(from_token) else {
        return Err(unavailable(format!(
            "point {base} has no libvirt checkpoint (it was taken while the domain was \
             shut off and no checkpoint existed)"
        )));
    };
    if dom.checkpoint(name)?.is_some() {
        return Ok(name.to_string());
    }
    let redefine = xml::checkpoint_for_redefine(cp_xml)?;
    match dom.checkpoint_create(
        &redefine,
        ffi::CHECKPOINT_CREATE_REDEFINE | ffi::CHECKPOINT_CREATE_REDEFINE_VALIDATE,
    ) {
        Ok(_) => {
            notes.push(format!(
                "checkpoint {name} of point {base} was lost by libvirt (domain redefined, \
                 transient or host restarted); redefined it from the repository"
            ));
            Ok(name.to_string())
        }
        Err(e) => Err(unavailable(format!(
            "checkpoint {name} of point {base} was lost and cannot be redefined ({e:#})"
        ))),
    }
    .with_context(|| format!("checkpoint {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_point_checkpoints_are_recognised() {
        assert_eq!(
            point_of("vmbackup-20261124T120000Z"),
            Some("20261124T120000Z")
        );
        assert_eq!(point_of("vmbackup-tmp"), None);
        assert_eq!(point_of("virtnbdbackup.0"), None);
        assert_eq!(name("20261124T120000Z"), "vmbackup-20261124T120000Z");
    }

    #[test]
    fn the_next_inc_and_diff_bases_are_kept() {
        let ours = ["P1", "P2", "P3", "P4"];
        // newest point P3, newest full P1: P4 is an uncommitted run's, P2 superseded.
        assert_eq!(to_keep(&ours, Some("P3"), Some("P1")), ["P1", "P3"]);
        // An offline point P5 without a checkpoint: P4 tracks everything since it.
        assert_eq!(to_keep(&ours, Some("P5"), Some("P5")), ["P4"]);
        assert_eq!(to_keep(&ours, None, None), Vec::<&str>::new());
        assert_eq!(to_keep(&ours, Some("P0"), None), Vec::<&str>::new());
    }
}
