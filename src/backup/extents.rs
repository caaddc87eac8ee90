//! `ExtentSet`: sorted, merged byte ranges of a disk, and the arithmetic the reader
//! needs on them (what is allocated, what is dirty, what must be read, which chunk
//! slots are touched).

use crate::nbd::Extent;

/// Sorted, non-overlapping, non-adjacent half-open byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentSet {
    ranges: Vec<(u64, u64)>,
}

impl ExtentSet {
    /// The single range `[0, len)` (or nothing when `len` is 0).
    pub fn whole(len: u64) -> ExtentSet {
        let mut s = ExtentSet::default();
        s.push(0, len);
        s
    }

    /// The extents whose flags satisfy `keep`, merged.
    pub fn from_extents(extents: &[Extent], keep: impl Fn(u32) -> bool) -> ExtentSet {
        let mut s = ExtentSet::default();
        for e in extents.iter().filter(|e| keep(e.flags)) {
            s.push(e.offset, e.offset + e.length);
        }
        s
    }

    /// Build from ranges in any order, overlapping or not.
    pub fn from_ranges(mut ranges: Vec<(u64, u64)>) -> ExtentSet {
        ranges.sort_unstable();
        let mut s = ExtentSet::default();
        for (a, b) in ranges {
            s.push(a, b);
        }
        s
    }

    /// Append a range that starts at or after the last one's start.
    fn push(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some(last) = self.ranges.last_mut() {
            debug_assert!(start >= last.0, "ranges must be pushed in order");
            if start <= last.1 {
                last.1 = last.1.max(end);
                return;
            }
        }
        self.ranges.push((start, end));
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total bytes covered.
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a).sum()
    }

    /// Bytes in both sets.
    pub fn intersect(&self, other: &ExtentSet) -> ExtentSet {
        let (mut i, mut j) = (0, 0);
        let mut out = ExtentSet::default();
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a0, a1) = self.ranges[i];
            let (b0, b1) = other.ranges[j];
            out.push(a0.max(b0), a1.min(b1));
            if a1 < b1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        out
    }

    /// Bytes in `self` but not in `other`.
    pub fn subtract(&self, other: &ExtentSet) -> ExtentSet {
        let mut out = ExtentSet::default();
        let mut j = 0;
        for &(a0, a1) in &self.ranges {
            let mut start = a0;
            while j < other.ranges.len() && other.ranges[j].1 <= start {
                j += 1;
            }
            let mut k = j;
            while k < other.ranges.len() && other.ranges[k].0 < a1 {
                let (b0, b1) = other.ranges[k];
                out.push(start, b0.min(a1));
                start = start.max(b1);
                if b1 >= a1 {
                    break;
                }
                k += 1;
            }
            out.push(start, a1);
        }
        out
    }

    /// The parts of the set inside `[start, end)`, clipped to it.
    pub fn clip(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self.ranges.partition_point(|r| r.1 <= start);
        self.ranges[first..]
            .iter()
            .take_while(move |r| r.0 < end)
            .map(move |&(a, b)| (a.max(start), b.min(end)))
    }

    /// Indexes of the `chunk_size` slots that this set touches, ascending, no repeats.
    pub fn slots(&self, chunk_size: u64) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for &(a, b) in &self.ranges {
            let first = a / chunk_size;
            let last = (b - 1) / chunk_size;
            let from = match out.last() {
                Some(&l) if l >= first => l + 1,
                _ => first,
            };
            out.extend(from..=last);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(r: &[(u64, u64)]) -> ExtentSet {
        ExtentSet::from_ranges(r.to_vec())
    }

    #[test]
    fn merge_and_total() {
        let s = set(&[(10, 20), (0, 5), (5, 8), (15, 30)]);
        assert_eq!(s.ranges(), &[(0, 8), (10, 30)]);
        assert_eq!(s.total(), 28);
        assert!(ExtentSet::whole(0).is_empty());
    }

    #[test]
    fn from_extents_filters_flags() {
        let ex = [
            Extent {
                offset: 0,
                length: 4,
                flags: 0,
            },
            Extent {
                offset: 4,
                length: 4,
                flags: 3,
            },
            Extent {
                offset: 8,
                length: 4,
                flags: 0,
            },
        ];
        assert_eq!(
            ExtentSet::from_extents(&ex, |f| f & 2 == 0).ranges(),
            &[(0, 4), (8, 12)]
        );
        assert_eq!(
            ExtentSet::from_extents(&ex, |f| f & 1 == 1).ranges(),
            &[(4, 8)]
        );
    }

    #[test]
    fn intersect_and_subtract() {
        let a = set(&[(0, 10), (20, 30), (40, 50)]);
        let b = set(&[(5, 25), (45, 100)]);
        assert_eq!(a.intersect(&b).ranges(), &[(5, 10), (20, 25), (45, 50)]);
        assert_eq!(a.subtract(&b).ranges(), &[(0, 5), (25, 30), (40, 45)]);
        assert_eq!(b.subtract(&a).ranges(), &[(10, 20), (50, 100)]);
        assert_eq!(a.subtract(&ExtentSet::default()), a);
        assert!(a.subtract(&ExtentSet::whole(100)).is_empty());
        // Several holes punched into one range.
        let c = set(&[(0, 100)]).subtract(&set(&[(10, 20), (30, 40), (90, 120)]));
        assert_eq!(c.ranges(), &[(0, 10), (20, 30), (40, 90)]);
    }

    #[test]
    fn clip_and_slots() {
        let a = set(&[(0, 10), (20, 30), (40, 50)]);
        assert_eq!(a.clip(5, 25).collect::<Vec<_>>(), vec![(5, 10), (20, 25)]);
        assert_eq!(a.clip(30, 40).count(), 0);
        assert_eq!(a.slots(16), vec![0, 1, 2, 3]);
        assert_eq!(set(&[(0, 1), (15, 17), (63, 64)]).slots(16), vec![0, 1, 3]);
    }
}
