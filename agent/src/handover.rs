//! The agent's side of the hand-over journal (DESIGN.md §7 "Hand-over").
//!
//! An agent started by the master target's power_on hook runs the
//! failed-over machine on the replica files themselves. Before the first
//! write to each 4 KiB block it saves the block's pre-image in the disk's
//! journal ([`rebound_common::handover_journal`]), synced before the block
//! changes, so a change-point can discard what the machine wrote.
//!
//! The journal's header says where the hand-over stands. At start: open ->
//! journal; committed -> nothing to journal; fenced, missing or not a
//! journal -> refuse to start (the master target is restoring the replica,
//! or the configuration is wrong). While running, the master target
//! replaces the file at the path (commit, change-point): within
//! [`CHECK_EVERY`] of its next write the agent notices; a committed journal
//! stops journaling, anything else fails every further write with an IO
//! error. The agent never writes the disk unjournaled while it may matter.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rebound_common::handover_journal::{read_state, JournalError, JournalState, JournalWriter};

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
    mode: Mode,
    last_check: Instant,
}

#[derive(Debug)]
enum Mode {
    /// Saving pre-images before writes.
    Journaling(JournalWriter),
    /// The replication was committed: writes go straight to the disk.
    Committed,
    /// The journal at the path is no longer this one and not committed:
    /// every write fails (the reason, for the error).
    Refusing(String),
}

impl Mode {
    fn is_journaling(&self) -> bool {
        matches!(self, Mode::Journaling(_))
    }
}

impl Handover {
    /// Opens the journal at `path` for disk `disk` of `disk_size` bytes.
    /// `None` (logged) when it is committed: there is nothing to journal.
    /// An error naming the disk, the path and what to do when it is
    /// fenced, missing or not a journal.
    pub fn open(disk: &str, path: &Path, disk_size: u64) -> Result<Option<Handover>, AgentError> {
        Self::open_checking(disk, path, disk_size, CHECK_EVERY)
    }

    fn open_checking(
        disk: &str,
        path: &Path,
        disk_size: u64,
        check_every: Duration,
    ) -> Result<Option<Handover>, AgentError> {
        let refuse = |message: String| AgentError::Disk {
            name: disk.to_string(),
            path: path.to_path_buf(),
            message,
        };
        let writer = match JournalWriter::open(path, disk_size) {
            Ok(w) => w,
            Err(JournalError::NotOpen {
                state: JournalState::Committed,
                ..
            }) => {
                tracing::info!(
                    disk,
                    journal = %path.display(),
                    "the hand-over journal is committed (what the machine wrote is the base): \
                     writes to this disk are not journaled"
                );
                return Ok(None);
            }
            Err(JournalError::NotOpen { state, .. }) => {
                return Err(refuse(format!(
                    "the hand-over journal {} is {state}: a change-point is under way: the MT's \
                     hand-over powers the machine on again; do not start this agent by hand",
                    path.display()
                )))
            }
            Err(JournalError::Missing { .. }) => {
                return Err(refuse(format!(
                    "the hand-over journal {} is gone: if the replication was committed, remove \
                     the handover_journal line from agent.toml",
                    path.display()
                )))
            }
            Err(e) => {
                return Err(refuse(format!(
                    "cannot journal the failed-over machine's writes: {e}"
                )))
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
                mode: Mode::Journaling(writer),
                last_check: Instant::now(),
            }),
        }))
    }

    /// Saves the pre-images of `offset..offset + len` of `disk` that are not
    /// saved yet (synced) before a write (`zero` false) or a zeroing. An
    /// error means the change must not happen.
    pub fn before_change(&self, disk: &File, offset: u64, len: u64, zero: bool) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(st.mode, Mode::Journaling(_)) && st.last_check.elapsed() >= self.check_every {
            st.last_check = Instant::now();
            self.check(&mut st);
        }
        let w = match &mut st.mode {
            Mode::Journaling(w) => w,
            Mode::Committed => return Ok(()),
            Mode::Refusing(why) => {
                return Err(io::Error::other(format!(
                    "disk {}: write refused: {why}",
                    self.disk
                )))
            }
        };
        let saved = if zero {
            w.save_before_zero(disk, offset, len)
        } else {
            w.save_before_write(disk, offset, len)
        };
        saved.map(|_| ()).map_err(io::Error::other)
    }

    /// Drops the writer (and its lock) when the path no longer names its
    /// journal: a committed journal there stops journaling, anything else
    /// refuses every further write (logged once). A failed stat keeps
    /// journaling: saving too much is safe.
    fn check(&self, st: &mut State) {
        let Mode::Journaling(w) = &st.mode else {
            return;
        };
        match w.is_at_path() {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(disk = %self.disk, error = %e, "cannot check the hand-over journal; still journaling");
                return;
            }
        }
        let saved_blocks = w.saved_blocks();
        st.mode = match read_state(&self.path) {
            Ok((JournalState::Committed, _)) => {
                tracing::info!(
                    disk = %self.disk,
                    journal = %self.path.display(),
                    saved_blocks,
                    "the hand-over journal was committed (what the machine wrote is the base): \
                     no longer journaling this disk's writes"
                );
                Mode::Committed
            }
            found => {
                let why = match found {
                    Ok((state, _)) => format!(
                        "the hand-over journal {} was replaced by a {state} one: a change-point \
                         is under way (the MT's hand-over powers the machine on again)",
                        self.path.display()
                    ),
                    Err(e) => format!("the hand-over journal was replaced: {e}"),
                };
                tracing::error!(disk = %self.disk, journal = %self.path.display(), saved_blocks,
                    "{why}: every further write to this disk fails; stop this agent");
                Mode::Refusing(why)
            }
        };
    }

    /// True while writes are journaled.
    pub fn is_journaling(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mode
            .is_journaling()
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

    /// A running agent's journal at `j` (checked every 20 ms), a disk file
    /// for it, and a hard link `kept` to the journal it holds.
    fn running(dir: &Path) -> (Handover, File, PathBuf, PathBuf) {
        let p = replica(dir);
        let j = dir.join("disk0.journal");
        handover_journal::create(&j, 4 * MIB).unwrap();
        let h = Handover::open_checking("disk0", &j, 4 * MIB, Duration::from_millis(20))
            .unwrap()
            .unwrap();
        let f = std::fs::File::open(&p).unwrap();
        h.before_change(&f, 0, 4096, false).unwrap();
        let kept = dir.join("kept.journal");
        std::fs::hard_link(&j, &kept).unwrap();
        (h, f, j, kept)
    }

    fn saved_blocks(j: &Path) -> u64 {
        handover_journal::JournalReader::open(j)
            .unwrap()
            .map(|r| r.unwrap().blocks())
            .sum()
    }

    #[test]
    fn a_committed_journal_stops_journaling() {
        let dir = tempfile::tempdir().unwrap();
        let (h, f, j, kept) = running(dir.path());
        let old = std::fs::File::open(&j).unwrap();
        assert!(old.try_lock().is_err(), "the agent holds its journal");
        handover_journal::replace(&j, 4 * MIB, JournalState::Committed).unwrap();
        h.before_change(&f, 4096, 4096, false).unwrap();
        assert!(h.is_journaling(), "checked at most every check_every");
        std::thread::sleep(Duration::from_millis(30));
        h.before_change(&f, 8192, 4096, false).unwrap();
        assert!(!h.is_journaling());
        old.try_lock()
            .expect("the agent released the committed journal");
        assert_eq!(
            saved_blocks(&kept),
            2,
            "nothing saved once the commit was seen"
        );
    }

    #[test]
    fn a_fenced_removed_or_replaced_journal_fails_every_further_write() {
        for how in ["fenced", "removed", "foreign"] {
            let dir = tempfile::tempdir().unwrap();
            let (h, f, j, kept) = running(dir.path());
            match how {
                "fenced" => handover_journal::replace(&j, 4 * MIB, JournalState::Fenced).unwrap(),
                "removed" => handover_journal::remove(&j).unwrap(),
                _ => {
                    let other = dir.path().join("other");
                    std::fs::write(&other, b"not a journal").unwrap();
                    std::fs::rename(&other, &j).unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(30));
            for _ in 0..2 {
                let e = h.before_change(&f, 8192, 4096, false).unwrap_err();
                assert!(e.to_string().contains("disk0"), "{how}: {e}");
                assert!(h.before_change(&f, 0, 4096, true).is_err(), "{how}");
            }
            assert!(!h.is_journaling(), "{how}");
            assert_eq!(saved_blocks(&kept), 1, "{how}");
        }
    }

    #[test]
    fn start_journals_an_open_journal_only_and_refuses_fenced_or_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = replica(dir.path());
        let j = dir.path().join("disk0.journal");
        let open = |j: &Path| {
            Disk::open(0, "disk0", &p)
                .unwrap()
                .with_handover_journal(Some(j))
        };
        let e = open(&j).unwrap_err().to_string();
        assert!(
            e.contains("disk0") && e.contains(&j.display().to_string()),
            "{e}"
        );
        assert!(e.contains("remove the handover_journal line"), "{e}");
        handover_journal::replace(&j, 4 * MIB, JournalState::Fenced).unwrap();
        let e = open(&j).unwrap_err().to_string();
        assert!(
            e.contains("disk0") && e.contains("a change-point is under way"),
            "{e}"
        );
        handover_journal::replace(&j, 4 * MIB, JournalState::Committed).unwrap();
        let d = open(&j).unwrap();
        assert!(!d.is_journaling());
        d.write_at(&[1u8; 4096], 0).unwrap();
        handover_journal::create(&j, MIB).unwrap();
        let e = open(&j).unwrap_err().to_string();
        assert!(
            e.contains("disk0") && e.contains(&j.display().to_string()),
            "{e}"
        );
        handover_journal::create(&j, 4 * MIB).unwrap();
        assert!(open(&j).unwrap().is_journaling());
    }

    #[test]
    fn a_journal_damaged_before_its_tail_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let (h, f, j, _kept) = running(dir.path());
        h.before_change(&f, MIB, 4096, false).unwrap();
        drop(h);
        let jf = std::fs::OpenOptions::new().write(true).open(&j).unwrap();
        use std::os::unix::fs::FileExt;
        let at = handover_journal::HEADER_LEN + handover_journal::RECORD_HEADER_LEN + 9;
        jf.write_all_at(&[0xEE], at).unwrap();
        let e = Handover::open("disk0", &j, 4 * MIB)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("disk0") && e.contains("damaged at offset"),
            "{e}"
        );
    }
}
