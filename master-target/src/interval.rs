//! Which blocks one interval of the retention journal saved, and where.
//!
//! An interval is the span between two consecutive tags; its index is what
//! apply asks ("has this interval saved block b yet?") and what point maps
//! are built from.

use std::collections::HashMap;

/// The blocks one interval's journal has saved, and where.
///
/// The current interval needs a membership test per written block (a hash
/// map); a closed interval is only ever enumerated (to build point maps and
/// pick blocks for rollback), so it shrinks to a plain vector: 16 bytes per
/// retained block.
#[derive(Debug)]
pub(crate) struct IntervalIndex {
    /// Length of the journal file (bytes of valid records).
    pub len: u64,
    blocks: Blocks,
}

#[derive(Debug)]
enum Blocks {
    Open(HashMap<u64, u64>),
    Closed(Vec<(u64, u64)>),
}

impl IntervalIndex {
    pub fn new_open() -> IntervalIndex {
        IntervalIndex {
            len: 0,
            blocks: Blocks::Open(HashMap::new()),
        }
    }

    /// An index from scanned entries; duplicates (never written by this
    /// code) keep their first record.
    pub fn from_scan(entries: Vec<(u64, u64)>, len: u64, open: bool) -> IntervalIndex {
        if open {
            let mut m = HashMap::with_capacity(entries.len());
            for (k, off) in entries {
                m.entry(k).or_insert(off);
            }
            IntervalIndex {
                len,
                blocks: Blocks::Open(m),
            }
        } else {
            let mut v = entries;
            v.shrink_to_fit();
            IntervalIndex {
                len,
                blocks: Blocks::Closed(v),
            }
        }
    }

    pub fn contains(&self, key: u64) -> bool {
        match &self.blocks {
            Blocks::Open(m) => m.contains_key(&key),
            Blocks::Closed(v) => v.iter().any(|&(k, _)| k == key),
        }
    }

    pub fn insert(&mut self, key: u64, offset: u64) {
        match &mut self.blocks {
            Blocks::Open(m) => {
                m.entry(key).or_insert(offset);
            }
            Blocks::Closed(v) => v.push((key, offset)),
        }
    }

    pub fn count(&self) -> usize {
        match &self.blocks {
            Blocks::Open(m) => m.len(),
            Blocks::Closed(v) => v.len(),
        }
    }

    /// Every (key, record offset), in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(u64, u64)) {
        match &self.blocks {
            Blocks::Open(m) => m.iter().for_each(|(&k, &o)| f(k, o)),
            Blocks::Closed(v) => v.iter().for_each(|&(k, o)| f(k, o)),
        }
    }

    /// The interval ended (a tag): turn the map into a compact vector.
    pub fn close(&mut self) {
        if let Blocks::Open(m) = &mut self.blocks {
            let mut v: Vec<(u64, u64)> = m.drain().collect();
            v.sort_unstable_by_key(|&(_, off)| off);
            v.shrink_to_fit();
            self.blocks = Blocks::Closed(v);
        }
    }
}
