//! `applied.seq`: the master target's last reported applied seq, kept in
//! the replication's cache directory.
//!
//! The cache may answer an agent's hello from its own durable seq while the
//! master target is silent; that is safe only when the cache still holds
//! everything the master target applied. A cache that lost records the
//! master target already applied (a torn or lost segment tail) would resume
//! the agent below the MT's seq, and the MT would skip the resent seqs as
//! already applied. So the applied seq is kept on disk (synced before any
//! segment is trimmed on its account) and the hello is refused while the
//! durable seq is below it and the MT cannot be asked.

use rebound_common::durable::write_atomic;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use tracing::warn;

const FILE_NAME: &str = "applied.seq";

/// The stored applied seq of the replication in `dir`; 0 when there is none
/// (a new replication, or a cache kept before the file existed). A file
/// that cannot be read or parsed is logged and taken as 0: the hello then
/// falls back to the durable seq, as before the file existed.
pub(super) fn load(dir: &Path, id: &str) -> u64 {
    let path = dir.join(FILE_NAME);
    match fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(seq) => seq,
            Err(e) => {
                warn!(replication = %id, path = %path.display(), "the stored master target applied seq is unreadable ({e}); it is ignored until the master target reports its seq again");
                0
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => {
            warn!(replication = %id, path = %path.display(), "cannot read the stored master target applied seq: {e}; it is ignored until the master target reports its seq again");
            0
        }
    }
}

/// Stores `seq` as the replication's applied seq, synced (blocking).
///
/// The text has a fixed width, so once the file exists it is overwritten
/// in place (one small write and a data sync, no new block: it still
/// works on a full disk, where trimming applied segments is what frees
/// space); the first time it is written atomically.
pub(super) fn store(dir: &Path, seq: u64) -> io::Result<()> {
    let path = dir.join(FILE_NAME);
    let text = format!("{seq:020}\n");
    match OpenOptions::new().write(true).open(&path) {
        Ok(file) => {
            file.write_all_at(text.as_bytes(), 0)?;
            file.sync_data()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_atomic(&path, text.as_bytes()),
        Err(e) => Err(e),
    }
}
