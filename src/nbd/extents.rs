//! Turning `BLOCK_STATUS` descriptors into the extents callers see: placed at
//! absolute offsets, clipped to the range asked for, adjacent equal-flag extents
//! merged. No I/O.

use anyhow::{ensure, Result};

/// A run of bytes with the same status flags in one meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Append descriptors `(length, flags)` that start at `at` to `out`, stopping at
/// `end` (the last extent may overshoot it and is clipped). Returns where the
/// descriptors stopped: `end`, or earlier when the server answered short.
pub fn append(out: &mut Vec<Extent>, at: u64, end: u64, descriptors: &[(u32, u32)]) -> Result<u64> {
    let mut pos = at;
    for &(length, flags) in descriptors {
        if pos >= end {
            break;
        }
        ensure!(
            length > 0,
            "server sent a zero-length extent at offset {pos}"
        );
        let length = u64::from(length).min(end - pos);
        push_merged(
            out,
            Extent {
                offset: pos,
                length,
                flags,
            },
        );
        pos += length;
    }
    ensure!(pos > at, "server sent no extents for offset {at}");
    Ok(pos)
}

fn push_merged(out: &mut Vec<Extent>, extent: Extent) {
    if let Some(last) = out.last_mut() {
        if last.flags == extent.flags && last.end() == extent.offset {
            last.length += extent.length;
            return;
        }
    }
    out.push(extent);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, length: u64, flags: u32) -> Extent {
        Extent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn clips_the_last_extent_and_merges_equal_neighbours() {
        let mut out = Vec::new();
        let pos = append(
            &mut out,
            100,
            1000,
            &[(50, 0), (50, 0), (200, 3), (5000, 0)],
        )
        .unwrap();
        assert_eq!(pos, 1000);
        assert_eq!(out, vec![e(100, 100, 0), e(200, 200, 3), e(400, 600, 0)]);
    }

    #[test]
    fn short_answers_continue_and_merge_across_calls() {
        let mut out = Vec::new();
        let pos = append(&mut out, 0, 1000, &[(100, 1), (100, 0)]).unwrap();
        assert_eq!(pos, 200);
        let pos = append(&mut out, pos, 1000, &[(300, 0), (500, 1)]).unwrap();
        assert_eq!(pos, 1000);
        assert_eq!(out, vec![e(0, 100, 1), e(100, 400, 0), e(500, 500, 1)]);
    }

    #[test]
    fn no_progress_is_an_error() {
        let mut out = Vec::new();
        assert!(append(&mut out, 0, 10, &[]).is_err());
        let err = append(&mut out, 0, 10, &[(0, 1)]).unwrap_err();
        assert!(err.to_string().contains("zero-length extent at offset 0"));
    }
}
