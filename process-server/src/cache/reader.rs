//! The reader of a replication's cache: its frames in seq order, as the
//! forwarder streams them to the master target. Reads only synced data
//! (the segment table's lengths), so nothing leaves the process server
//! before it is durable, and follows the writer's rotations and the
//! trimming of applied segments.

use super::replication::Replication;
use crate::segment::{self, EntryError};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

/// Why the cache could not give the next frames.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("cannot open cache segment {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cache segment {}: {source}", path.display())]
    Entry { path: PathBuf, source: EntryError },
    #[error("the master target needs seq {need} next, but the cache holds it no longer (the next cached frame starts at seq {have}); the master target lost applied data, so the replication needs a resync")]
    Gap { need: u64, have: u64 },
}

/// A frame read from the cache for sending.
#[derive(Debug)]
pub struct Item {
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: Vec<u8>,
}

struct OpenSegment {
    name: u64,
    file: File,
    offset: u64,
}

/// How often in one read a segment may vanish (trimmed) before the read
/// gives up and returns what it has.
const MAX_MISSES: u32 = 3;

/// Reads a replication's cached frames in seq order, from `next_seq` on.
pub struct Cursor {
    rep: Arc<Replication>,
    next_seq: u64,
    open: Option<OpenSegment>,
}

impl Cursor {
    pub fn new(rep: Arc<Replication>, next_seq: u64) -> Cursor {
        Cursor {
            rep,
            next_seq,
            open: None,
        }
    }

    fn open_segment(&mut self, name: u64) -> Result<bool, ReadError> {
        let path = self.rep.segments_dir().join(segment::file_name(name));
        match File::open(&path) {
            Ok(file) => {
                self.open = Some(OpenSegment {
                    name,
                    file,
                    offset: 0,
                });
                Ok(true)
            }
            // Trimmed meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(ReadError::Open { path, source }),
        }
    }

    /// Reads up to about `budget` bytes of frames (blocking). Empty when
    /// everything durable has been read.
    pub fn read(&mut self, budget: u64) -> Result<Vec<Item>, ReadError> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut misses = 0;
        while bytes < budget {
            let Some(seg) = self.open.as_mut() else {
                // The segment holding next_seq, else the oldest one.
                let next = self.next_seq;
                let target = self.rep.with_segments(|s| {
                    s.map
                        .range(..=next)
                        .next_back()
                        .or_else(|| s.map.iter().next())
                        .map(|(n, _)| *n)
                });
                let Some(name) = target else { break };
                if !self.open_segment(name)? {
                    misses += 1;
                    if misses > MAX_MISSES {
                        break;
                    }
                }
                continue;
            };
            let name = seg.name;
            let (committed, later) = self.rep.with_segments(|s| {
                (
                    s.map.get(&name).map(|m| m.len),
                    s.map.range(name + 1..).next().map(|(n, _)| *n),
                )
            });
            let Some(committed) = committed else {
                // Trimmed: find the segment holding next_seq again.
                self.open = None;
                continue;
            };
            if seg.offset >= committed {
                match later {
                    Some(n) => {
                        self.open = None;
                        if !self.open_segment(n)? {
                            misses += 1;
                            if misses > MAX_MISSES {
                                break;
                            }
                        }
                        continue;
                    }
                    None => break,
                }
            }
            match segment::read_entry(&seg.file, seg.offset, committed) {
                Ok(Some((meta, frame))) => {
                    seg.offset = meta.end();
                    if meta.last_seq < self.next_seq {
                        continue;
                    }
                    if meta.first_seq > self.next_seq {
                        return Err(ReadError::Gap {
                            need: self.next_seq,
                            have: meta.first_seq,
                        });
                    }
                    self.next_seq = meta.last_seq + 1;
                    bytes += frame.len() as u64;
                    out.push(Item {
                        first_seq: meta.first_seq,
                        last_seq: meta.last_seq,
                        bytes: frame,
                    });
                }
                Ok(None) => break,
                Err(source) => {
                    return Err(ReadError::Entry {
                        path: self.rep.segments_dir().join(segment::file_name(name)),
                        source,
                    })
                }
            }
        }
        Ok(out)
    }
}

/// Every entry stored for `rep`, duplicates and overlaps included, in
/// segment order: what is on disk, for checking the writer.
#[cfg(test)]
pub(crate) fn read_all(rep: &Replication) -> Result<Vec<(segment::EntryMeta, Vec<u8>)>, ReadError> {
    let mut out = Vec::new();
    for (name, meta) in rep.segments() {
        let path = rep.segments_dir().join(segment::file_name(name));
        let f = File::open(&path).map_err(|source| ReadError::Open {
            path: path.clone(),
            source,
        })?;
        let mut off = 0;
        while let Some((m, bytes)) =
            segment::read_entry(&f, off, meta.len).map_err(|source| ReadError::Entry {
                path: path.clone(),
                source,
            })?
        {
            off = m.end();
            out.push((m, bytes));
        }
    }
    Ok(out)
}
