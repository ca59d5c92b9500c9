//! `applied.seq`: the applied seq and the current interval, persisted after
//! every apply batch with one small pwrite and one fdatasync.
//!
//! `state.json` is replaced atomically (temp file, fsync, rename, directory
//! fsync): right for fields that change rarely (rollback, resync window,
//! hand-over), too slow for a seq that advances many times a second. This
//! file has a fixed size and two slots, each in its own 4 KiB block; each
//! store writes the slot the previous store did not, then fdatasyncs. A
//! store torn by a crash leaves the other slot, with the previous value,
//! readable; the slot with the highest counter and a good checksum wins.
//!
//! Durable order: the file is created whole (temp file, fsync, rename,
//! directory fsync) before its first store; a store is acknowledged only
//! after its fdatasync. Both fields only grow, and `state.json` is still
//! written (with the same fields) when a rare field changes, so recovery
//! takes the larger of the two sources for each field. A replication from
//! before this file existed has only `state.json`: the file is created
//! from it on open.
//!
//! Slot layout (little endian, 40 bytes):
//! ```text
//! magic "RBS1" | reserved [4] | counter u64 | applied_seq u64 | interval u64 | checksum u64
//! ```
//! `checksum` is the first 8 bytes of blake3 over the first 32 bytes.

use crate::error::{io_err, MtError, Result};
use crate::storage::{sync_data, Storage, Target};
use rebound_common::durable::write_atomic;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: [u8; 4] = *b"RBS1";
const SLOT: u64 = 4096;
const RECORD: usize = 40;

/// The fields `applied.seq` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqRecord {
    pub applied_seq: u64,
    pub interval: u64,
}

/// The open `applied.seq` of a replication.
#[derive(Debug)]
pub(crate) struct SeqFile {
    file: File,
    path: PathBuf,
    /// Counter of the next store; its slot is `counter % 2`.
    counter: u64,
}

fn encode(counter: u64, rec: SeqRecord) -> [u8; RECORD] {
    let mut b = [0u8; RECORD];
    b[..4].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&counter.to_le_bytes());
    b[16..24].copy_from_slice(&rec.applied_seq.to_le_bytes());
    b[24..32].copy_from_slice(&rec.interval.to_le_bytes());
    let sum = blake3::hash(&b[..32]);
    b[32..40].copy_from_slice(&sum.as_bytes()[..8]);
    b
}

/// (counter, record) of a slot, if it is intact.
fn decode(b: &[u8; RECORD]) -> Option<(u64, SeqRecord)> {
    if b[..4] != MAGIC || blake3::hash(&b[..32]).as_bytes()[..8] != b[32..40] {
        return None;
    }
    let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
    Some((
        u(8..16),
        SeqRecord {
            applied_seq: u(16..24),
            interval: u(24..32),
        },
    ))
}

impl SeqFile {
    /// Opens `path`, creating it from `initial` (the values of `state.json`)
    /// when it does not exist. Returns the file and the values it holds.
    pub fn open(path: &Path, initial: SeqRecord) -> Result<(SeqFile, SeqRecord)> {
        if !path.exists() {
            let mut bytes = vec![0u8; (2 * SLOT) as usize];
            bytes[..RECORD].copy_from_slice(&encode(1, initial));
            write_atomic(path, &bytes)
                .map_err(io_err(|| format!("cannot create {}", path.display())))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(|| format!("cannot open {}", path.display())))?;
        let mut best: Option<(u64, SeqRecord)> = None;
        for slot in 0..2 {
            let mut b = [0u8; RECORD];
            match file.read_exact_at(&mut b, slot * SLOT) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => continue,
                Err(e) => return Err(MtError::io(format!("cannot read {}", path.display()), e)),
            }
            if let Some((c, r)) = decode(&b) {
                if best.is_none_or(|(bc, _)| c > bc) {
                    best = Some((c, r));
                }
            }
        }
        let Some((counter, rec)) = best else {
            return Err(MtError::DataLoss(format!(
                "{} is corrupt (neither slot is readable): the applied seq is unknown; restore it from a backup or remove the replication directory and resync",
                path.display()
            )));
        };
        Ok((
            SeqFile {
                file,
                path: path.to_path_buf(),
                counter: counter + 1,
            },
            rec,
        ))
    }

    /// Persists `rec` durably (pwrite of one slot, fdatasync) through
    /// `storage`.
    pub fn store(&mut self, rec: SeqRecord, storage: &dyn Storage) -> Result<()> {
        let b = encode(self.counter, rec);
        let at = (self.counter % 2) * SLOT;
        storage
            .write_all_at(Target::AppliedSeq, &self.file, &b, at)
            .map_err(io_err(|| format!("cannot write {}", self.path.display())))?;
        sync_data(storage, Target::AppliedSeq, &self.file, &self.path)?;
        self.counter += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Disk;

    fn rec(a: u64, i: u64) -> SeqRecord {
        SeqRecord {
            applied_seq: a,
            interval: i,
        }
    }

    #[test]
    fn created_from_initial_then_latest_store_wins() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("applied.seq");
        let (mut f, r) = SeqFile::open(&p, rec(7, 2)).unwrap();
        assert_eq!(r, rec(7, 2));
        f.store(rec(9, 2), &Disk).unwrap();
        f.store(rec(12, 3), &Disk).unwrap();
        drop(f);
        // `initial` is ignored once the file exists.
        let (mut f, r) = SeqFile::open(&p, rec(0, 0)).unwrap();
        assert_eq!(r, rec(12, 3));
        f.store(rec(13, 3), &Disk).unwrap();
        assert_eq!(SeqFile::open(&p, rec(0, 0)).unwrap().1, rec(13, 3));
    }

    #[test]
    fn torn_slot_falls_back_to_the_other() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("applied.seq");
        let (mut f, _) = SeqFile::open(&p, rec(1, 0)).unwrap();
        f.store(rec(5, 0), &Disk).unwrap(); // counter 2 → slot 0
        f.store(rec(6, 1), &Disk).unwrap(); // counter 3 → slot 1
        drop(f);
        let raw = OpenOptions::new().write(true).open(&p).unwrap();
        raw.write_all_at(&[0xff; 8], SLOT + 20).unwrap(); // tear slot 1
        assert_eq!(SeqFile::open(&p, rec(0, 0)).unwrap().1, rec(5, 0));
        raw.write_all_at(&[0xff; 8], 20).unwrap(); // and slot 0
        assert!(matches!(
            SeqFile::open(&p, rec(0, 0)),
            Err(MtError::DataLoss(_))
        ));
    }
}
