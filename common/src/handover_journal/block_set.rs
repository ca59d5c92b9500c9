//! Sets of blocks as runs, for the saved and restored blocks of a journal.

use std::collections::BTreeMap;

/// Blocks as a set of disjoint runs `start -> end` (exclusive), so memory
/// follows how fragmented the writes are, not the disk's size.
#[derive(Debug, Default, Clone)]
pub(super) struct BlockSet {
    pub(super) runs: BTreeMap<u64, u64>,
}

impl BlockSet {
    pub(super) fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.runs.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.runs.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.runs.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.runs.remove(&s);
        }
        self.runs.insert(start, end);
    }

    /// The runs of `start..end` not in the set.
    pub(super) fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let mut cur = start;
        if let Some((_, &e)) = self.runs.range(..=start).next_back() {
            cur = cur.max(e);
        }
        for (&s, &e) in self.runs.range(start..end) {
            if s > cur {
                out.push((cur, s));
            }
            cur = cur.max(e);
        }
        if cur < end {
            out.push((cur, end));
        }
        out
    }

    pub(super) fn len(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }
}
