//! The agent's side of the hand-over journal (DESIGN.md §7 "Hand-over").
//!
//! An agent started by the master target's power_on hook runs the
//! failed-over machine on the replica files themselves. Before the first
//! write to each 4 KiB block it saves the block's pre-image in the disk's
//! journal ([`rebound_common::handover_journal`]), synced before the block
//! changes, so a change-point can discard what the machine wrote. The
//! master target deletes the journal at commit (what the machine wrote
//! becomes the base); the agent notices within [`CHECK_EVERY`] of its next
//! write, stops journaling and releases the file.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rebound_common::handover_journal::{JournalError, JournalWriter};

use crate::AgentError;

/// How often the write path checks that the journal is still the one at its
/// path (one stat).
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The journal of one disk, while the agent journals into it.
#[derive(Debug)]
pub struct Handover {
    disk: String,
    path: PathBuf,
    check_every: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// `None` once the journal was deleted or replaced.
    writer: Option<JournalWriter>,
    last_check: Instant,
}

impl Handover {
    /// Opens the journal at `path` for disk `disk` of `disk_size` bytes.
    /// `None` (with a warning) when the path does not exist: the
    /// replication was committed, there is nothing to journal.
    pub fn open(disk: &str, path: &Path, disk_size: u64) -> Result<Option<Handover>, AgentError> {
        Self::open_checking(disk, path, disk_size, CHECK_EVERY)
    }

    fn open_checking(
        disk: &str,
        path: &Path,
        disk_size: u64,
        check_every: Duration,
    ) -> Result<Option<Handover>, AgentError> {
        let writer = match JournalWriter::open(path, disk_size) {
            Ok(w) => w,
            Err(JournalError::Missing { .. }) => {
                tracing::warn!(
                    disk,
                    journal = %path.display(),
                    "the hand-over journal does not exist (the replication was committed): \
                     writes to this disk are not journaled"
                );
                return Ok(None);
            }
            Err(e) => {
                return Err(AgentError::Disk {
                    name: disk.to_string(),
                    path: path.to_path_buf(),
                    message: format!("cannot journal the failed-over machine's writes: {e}"),
                })
            }
        };
        tracing::info!(
            disk,
            journal = %path.display(),
            saved_blocks = writer.saved_blocks(),
            "journaling each block's pre-image before its first write since hand-over"
        );
        Ok(Some(Handover {
            disk: disk.to_string(),
            path: path.to_path_buf(),
            check_every,
            state: Mutex::new(State {
                writer: Some(writer),
                last_check: Instant::now(),
            }),
        }))
    }

    /// Saves the pre-images of `offset..offset + len` of `disk` that are not
    /// saved yet (synced) before a write (`zero` false) or a zeroing.
    pub fn before_change(&self, disk: &File, offset: u64, len: u64, zero: bool) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.writer.is_some() && st.last_check.elapsed() >= self.check_every {
            st.last_check = Instant::now();
            self.check(&mut st);
        }
        let Some(w) = st.writer.as_mut() else {
            return Ok(());
        };
        let saved = if zero {
            w.save_before_zero(disk, offset, len)
        } else {
            w.save_before_write(disk, offset, len)
        };
        saved.map(|_| ()).map_err(io::Error::other)
    }

    /// Drops the writer (and its lock) when the path no longer names its
    /// journal. A failed stat keeps journaling: saving too much is safe.
    fn check(&self, st: &mut State) {
        let Some(w) = &st.writer else { return };
        match w.is_at_path() {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(
                    disk = %self.disk,
                    journal = %self.path.display(),
                    saved_blocks = w.saved_blocks(),
                    "the hand-over journal was removed or replaced (the replication was \
                     committed): no longer journaling this disk's writes"
                );
                st.writer = None;
            }
            Err(e) => {
                tracing::warn!(disk = %self.disk, error = %e, "cannot check the hand-over journal; still journaling")
            }
        }
    }

    /// True while writes are journaled.
    pub fn is_journaling(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .writer
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Capture;
    use crate::dirty_log::DirtyLog;
    use crate::disk::Disk;
    use rebound_common::handover_journal::{self, restore_into};
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    fn hash(p: &Path) -> blake3::Hash {
        blake3::hash(&std::fs::read(p).unwrap())
    }

    fn replica(dir: &Path) -> PathBuf {
        let p = dir.join("replica.img");
        let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn restoring_the_journal_gives_the_content_at_hand_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = replica(dir.path());
        let at_handover = hash(&p);
        let j = dir.path().join("disk0.journal");
        handover_journal::create(&j, 4 * MIB).unwrap();
        let d = Disk::open(0, "disk0", &p)
            .unwrap()
            .with_handover_journal(Some(&j))
            .unwrap();
        assert!(d.is_journaling());
        // Through the ordering point, as the machine's NBD writes go.
        let (dlog, _) = DirtyLog::open(&dir.path().join("dirty.log"), &[4]).unwrap();
        let cap = Capture::new("m1", vec![Arc::new(d)], Arc::new(dlog), 64 * MIB);
        cap.write(0, 3000, &[1u8; 10_000], false).unwrap();
        cap.write(0, 4096, &[2u8; 4096], true).unwrap();
        cap.zero(0, MIB, 2 * MIB, false).unwrap();
        cap.write(0, 4 * MIB - 512, &[3u8; 512], false).unwrap();
        assert_ne!(hash(&p), at_handover);
        drop(cap);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        restore_into(&j, &f).unwrap();
        assert_eq!(hash(&p), at_handover);
    }

    #[test]
    fn a_deleted_journal_stops_journaling() {
        let dir = tempfile::tempdir().unwrap();
        let p = replica(dir.path());
        let j = dir.path().join("disk0.journal");
        handover_journal::create(&j, 4 * MIB).unwrap();
        let h = Handover::open_checking("disk0", &j, 4 * MIB, Duration::from_millis(20))
            .unwrap()
            .unwrap();
        let f = std::fs::File::open(&p).unwrap();
        h.before_change(&f, 0, 4096, false).unwrap();
        let old = std::fs::File::open(&j).unwrap();
        assert!(old.try_lock().is_err(), "the agent holds its journal");
        let kept = dir.path().join("kept.journal");
        std::fs::hard_link(&j, &kept).unwrap();
        handover_journal::remove(&j).unwrap();
        h.before_change(&f, 4096, 4096, false).unwrap();
        assert!(h.is_journaling(), "checked at most every check_every");
        std::thread::sleep(Duration::from_millis(30));
        h.before_change(&f, 8192, 4096, false).unwrap();
        assert!(!h.is_journaling());
        old.try_lock()
            .expect("the agent released the removed journal");
        let blocks: u64 = handover_journal::JournalReader::open(&kept)
            .unwrap()
            .map(|r| r.unwrap().blocks())
            .sum();
        assert_eq!(blocks, 2, "nothing saved once the removal was seen");
    }

    #[test]
    fn a_missing_journal_means_no_journaling_and_a_foreign_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = replica(dir.path());
        let j = dir.path().join("disk0.journal");
        let d = Disk::open(0, "disk0", &p)
            .unwrap()
            .with_handover_journal(Some(&j))
            .unwrap();
        assert!(!d.is_journaling());
        d.write_at(&[1u8; 4096], 0).unwrap();
        handover_journal::create(&j, MIB).unwrap();
        let e = Disk::open(0, "disk0", &p)
            .unwrap()
            .with_handover_journal(Some(&j))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("disk0") && e.contains(&j.display().to_string()),
            "{e}"
        );
    }
}
