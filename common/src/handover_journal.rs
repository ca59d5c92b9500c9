//! The hand-over journal (DESIGN.md §7 "Hand-over").
//!
//! After a failover the machine runs on the replica files themselves. So
//! that a change-point can still give exactly the chosen point, the agent
//! of the failed-over machine saves each 4 KiB block's pre-image here before
//! the first write to it since hand-over; the master target restores those
//! pre-images into the replica (discarding what the machine wrote) before it
//! rolls back, and marks the journal committed at commit (what the machine
//! wrote becomes the base). Both sides use this module: the agent the
//! [`JournalWriter`], the master target [`create`], [`replace`], [`fence`],
//! [`restore_into`], [`has_records`] and [`read_state`].
//!
//! The journal never simply disappears while the replication is handed
//! over: its header carries a [`JournalState`]. `Open` while the machine
//! runs; `Fenced` once the master target wrote the pre-images back (the
//! machine must not run until the next hand-over makes a fresh `Open`
//! journal); `Committed` once what the machine wrote is the base. An agent
//! only writes through an `Open` journal, so an agent (re)started at the
//! wrong moment refuses instead of writing into a replica being restored.
//!
//! Format (little endian), one file per disk:
//!
//! ```text
//! header  magic "RBHOJRNL" | version u32 | block size u32 (4096) | disk size u64
//!         | state u32 (1 open, 2 fenced, 3 committed) | reserved u32 (0)
//!         | first 8 bytes of blake3(the 32 bytes before)                 40 bytes
//! record  offset u64 | len u32 | batch u64 | blake3(offset ‖ len ‖ batch ‖ data) 32 B
//!         | data (len bytes)
//! ```
//!
//! A record holds whole blocks: `offset` and `len` are multiples of 4096,
//! `0 < len <= 1 MiB`, and it ends within the disk rounded up to a block
//! (a last partial block is saved padded with zeroes). Order of durability:
//! a record is written and fdatasynced before the block it saves changes, so
//! a torn or bad record at the tail saves blocks that were never
//! overwritten; the writer cuts such a tail at open and readers stop there.
//! Records synced together form a batch; `batch` is the journal offset
//! where the record's batch begins. Only the last batch can be torn (its
//! records may reach the disk in any order), so a bad record followed
//! anywhere by a valid record of a *later* batch is damage, not a torn tail:
//! the writer refuses to open and readers fail ([`JournalError::Damaged`]).
//! Each block is saved at most once: the first record of a block holds its
//! pre-image (readers of a journal written otherwise still take the first).
//!
//! Ownership: the agent holds an exclusive `flock` on its journal for as long
//! as it journals, so the master target's [`fence`] knows when the machine
//! can no longer write.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use block_set::BlockSet;
pub use record::Record;
use record::{read_record, record_hash, scan};

/// The unit the journal saves: a block's pre-image is kept whole.
pub const BLOCK_SIZE: u64 = 4096;
/// The longest record (the writer splits longer runs).
pub const MAX_RECORD_LEN: u32 = 1 << 20;
const MAGIC: [u8; 8] = *b"RBHOJRNL";
const VERSION: u32 = 2;
/// Bytes of the header.
pub const HEADER_LEN: u64 = 40;
/// Bytes of a record before its data.
pub const RECORD_HEADER_LEN: u64 = 8 + 4 + 8 + 32;
/// How often [`fence`] retries the lock.
const FENCE_POLL: Duration = Duration::from_millis(50);

/// Where a hand-over stands, from the journal's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalState {
    /// The machine runs: its agent saves pre-images here before writing.
    Open,
    /// The master target wrote the pre-images back: the machine must not
    /// run until the next hand-over makes a fresh open journal.
    Fenced,
    /// Committed: what the machine wrote is the base, nothing to journal.
    Committed,
}

impl JournalState {
    fn code(self) -> u32 {
        match self {
            JournalState::Open => 1,
            JournalState::Fenced => 2,
            JournalState::Committed => 3,
        }
    }

    fn from_code(code: u32) -> Option<JournalState> {
        match code {
            1 => Some(JournalState::Open),
            2 => Some(JournalState::Fenced),
            3 => Some(JournalState::Committed),
            _ => None,
        }
    }
}

impl std::fmt::Display for JournalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JournalState::Open => "open",
            JournalState::Fenced => "fenced",
            JournalState::Committed => "committed",
        })
    }
}

/// What went wrong with a hand-over journal; each names the journal.
#[derive(Debug, Error)]
pub enum JournalError {
    #[error("hand-over journal {path} does not exist")]
    Missing { path: PathBuf },
    #[error(
        "hand-over journal {path} is locked by another process (another agent of the \
         failed-over machine, or the master target fencing it); stop that process first"
    )]
    Locked { path: PathBuf },
    #[error(
        "hand-over journal {path} is still locked after {waited:?}: the failed-over \
         machine's agent still runs; stop it (the power_off hook) and retry"
    )]
    StillHeld { path: PathBuf, waited: Duration },
    #[error(
        "hand-over journal {path} is {state}, not open: only the agent of a running, \
         handed-over machine journals, and only into an open journal"
    )]
    NotOpen { path: PathBuf, state: JournalState },
    #[error("{path} is not a hand-over journal ({reason}); remove it or point to the right file")]
    NotAJournal { path: PathBuf, reason: &'static str },
    #[error(
        "hand-over journal {path} is for a disk of {journal} bytes but the disk has {disk} \
         bytes: it belongs to another disk"
    )]
    SizeMismatch {
        path: PathBuf,
        journal: u64,
        disk: u64,
    },
    #[error(
        "a change of {len} bytes at offset {offset} ends past the end of the disk \
         ({disk_size} bytes) of hand-over journal {path}"
    )]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        disk_size: u64,
    },
    #[error("cannot read the disk at offset {offset} to save its pre-image in {path}: {source}")]
    DiskRead {
        path: PathBuf,
        offset: u64,
        source: io::Error,
    },
    #[error(
        "cannot write the pre-image at offset {offset} from {path} into the replica: {source}"
    )]
    ReplicaWrite {
        path: PathBuf,
        offset: u64,
        source: io::Error,
    },
    #[error(
        "hand-over journal {path} is damaged at offset {offset}: pre-images synced after it \
         follow, so the damage is not a torn tail and the blocks saved there are lost; the \
         replica cannot be put back exactly as it was handed over"
    )]
    Damaged { path: PathBuf, offset: u64 },
    #[error("cannot {op} hand-over journal {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| {
        if source.kind() == io::ErrorKind::NotFound && matches!(op, "open" | "lock") {
            JournalError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            JournalError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn header_bytes(disk_size: u64, state: JournalState) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    h[16..24].copy_from_slice(&disk_size.to_le_bytes());
    h[24..28].copy_from_slice(&state.code().to_le_bytes());
    let sum = blake3::hash(&h[..32]);
    h[32..].copy_from_slice(&sum.as_bytes()[..8]);
    h
}

/// Reads and checks the header; returns the disk size and the state.
fn read_header(file: &File, path: &Path) -> Result<(u64, JournalState), JournalError> {
    let bad = |reason| JournalError::NotAJournal {
        path: path.to_path_buf(),
        reason,
    };
    let mut h = [0u8; HEADER_LEN as usize];
    match file.read_exact_at(&mut h, 0) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(bad("shorter than its header"))
        }
        r => r.map_err(io_err("read", path))?,
    }
    if h[..8] != MAGIC {
        return Err(bad("wrong magic"));
    }
    if h[8..12] != VERSION.to_le_bytes() {
        return Err(bad("unknown version"));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&h[16..24]);
    let disk_size = u64::from_le_bytes(size);
    let mut code = [0u8; 4];
    code.copy_from_slice(&h[24..28]);
    let state = JournalState::from_code(u32::from_le_bytes(code)).ok_or(bad("unknown state"))?;
    if h != header_bytes(disk_size, state) {
        return Err(bad("damaged header"));
    }
    Ok((disk_size, state))
}

/// Creates an empty open journal for a disk of `disk_size` bytes at
/// `path`, replacing any file there; see [`replace`].
pub fn create(path: &Path, disk_size: u64) -> Result<(), JournalError> {
    replace(path, disk_size, JournalState::Open)
}

/// Atomically replaces the file at `path` with an empty journal in `state`
/// for a disk of `disk_size` bytes (written to a temporary file, synced,
/// renamed over `path`, directory synced): a new inode, so an agent still
/// journaling into the old one sees it was replaced, and at no moment is
/// the path missing. Mode 0600; the directory is created if missing.
pub fn replace(path: &Path, disk_size: u64, state: JournalState) -> Result<(), JournalError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err("create the directory of", path))?;
            if let Some(up) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::durable::fsync_dir(up).map_err(io_err("sync the directory of", path))?;
            }
        }
    }
    crate::durable::write_atomic_mode(path, &header_bytes(disk_size, state), 0o600)
        .map_err(io_err("create", path))
}

/// The state and disk size of the journal at `path` (its header only).
pub fn read_state(path: &Path) -> Result<(JournalState, u64), JournalError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let (disk_size, state) = read_header(&file, path)?;
    Ok((state, disk_size))
}

/// Removes the journal and syncs its directory; a missing journal is fine.
pub fn remove(path: &Path) -> Result<(), JournalError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("remove", path)(e)),
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    crate::durable::fsync_dir(dir.unwrap_or(Path::new(".")))
        .map_err(io_err("sync the directory of", path))
}

/// True when the journal holds at least one valid record (the machine
/// changed a block since hand-over); a missing, fenced or committed journal
/// holds none (only an open journal is ever written).
pub fn has_records(path: &Path) -> Result<bool, JournalError> {
    match JournalReader::open(path) {
        Ok(mut r) => Ok(r.next().transpose()?.is_some()),
        Err(JournalError::Missing { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The agent's side: saves pre-images before writes. Holds an exclusive
/// `flock` on the journal until dropped.
#[derive(Debug)]
pub struct JournalWriter {
    path: PathBuf,
    file: File,
    disk_size: u64,
    /// Where the next record goes (the end of the valid journal).
    end: u64,
    saved: BlockSet,
    /// (device, inode) of the open file, to notice the path was replaced.
    identity: (u64, u64),
}

impl JournalWriter {
    /// Opens the existing open journal at `path` for a disk of `disk_size`
    /// bytes: locks it (error [`JournalError::Locked`] when another process
    /// holds it; [`JournalError::NotOpen`] when it is fenced or committed),
    /// cuts a torn or bad tail (synced) and rebuilds the set of
    /// saved blocks, so each block is saved at most once across restarts.
    pub fn open(path: &Path, disk_size: u64) -> Result<JournalWriter, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        if !try_lock(&file).map_err(io_err("lock", path))? {
            return Err(JournalError::Locked {
                path: path.to_path_buf(),
            });
        }
        let (journal, state) = read_header(&file, path)?;
        if state != JournalState::Open {
            return Err(JournalError::NotOpen {
                path: path.to_path_buf(),
                state,
            });
        }
        if journal != disk_size {
            return Err(JournalError::SizeMismatch {
                path: path.to_path_buf(),
                journal,
                disk: disk_size,
            });
        }
        let meta = file.metadata().map_err(io_err("stat", path))?;
        let file_len = meta.len();
        let mut saved = BlockSet::default();
        let end = scan(&file, path, file_len, disk_size, |r| {
            let first = r.offset / BLOCK_SIZE;
            saved.insert(first, first + r.blocks());
        })?;
        if end < file_len {
            file.set_len(end)
                .map_err(io_err("cut the torn tail of", path))?;
            file.sync_all()
                .map_err(io_err("sync the cut tail of", path))?;
            tracing::warn!(
                journal = %path.display(),
                cut_bytes = file_len - end,
                "cut a torn or damaged tail off the hand-over journal (its blocks were never overwritten)"
            );
        }
        Ok(JournalWriter {
            path: path.to_path_buf(),
            file,
            disk_size,
            end,
            saved,
            identity: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks saved so far (since hand-over, across restarts).
    pub fn saved_blocks(&self) -> u64 {
        self.saved.len()
    }

    /// Saves the pre-image of every block of `offset..offset + len` not yet
    /// saved, reading it from `disk`, with one fdatasync of the journal;
    /// call it before writing that range. Returns the blocks saved now.
    pub fn save_before_write(
        &mut self,
        disk: &File,
        offset: u64,
        len: u64,
    ) -> Result<u64, JournalError> {
        self.save(disk, offset, len, false)
    }

    /// [`Self::save_before_write`] for a zeroing (write-zeroes or trim):
    /// blocks that already read as zeroes do not change, so they are not
    /// saved (nor marked saved; a later write saves them). Holes of the
    /// disk file read as zeroes, so they are skipped without reading
    /// (`lseek(SEEK_DATA)`, where the file system tells). What remains:
    /// the data extents of the range not saved yet are read (up to 1 MiB at
    /// a time, holes inside such a read included) while the caller holds
    /// its write path; a trim of a full disk reads all its data once (a
    /// block saved or found zero is not read again by later trims).
    pub fn save_before_zero(
        &mut self,
        disk: &File,
        offset: u64,
        len: u64,
    ) -> Result<u64, JournalError> {
        self.save(disk, offset, len, true)
    }

    fn save(
        &mut self,
        disk: &File,
        offset: u64,
        len: u64,
        skip_zero_blocks: bool,
    ) -> Result<u64, JournalError> {
        if len == 0 {
            return Ok(0);
        }
        if offset.checked_add(len).is_none_or(|e| e > self.disk_size) {
            return Err(JournalError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                disk_size: self.disk_size,
            });
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len).div_ceil(BLOCK_SIZE);
        let max_blocks = u64::from(MAX_RECORD_LEN) / BLOCK_SIZE;
        let mut end = self.end;
        let mut done = Vec::new();
        for (s, e) in self.saved.missing(first, last) {
            let mut b = s;
            while b < e {
                if skip_zero_blocks {
                    match next_data(disk, b * BLOCK_SIZE) {
                        None => break,
                        Some(at) => b = b.max(at / BLOCK_SIZE),
                    }
                    if b >= e {
                        break;
                    }
                }
                let n = (e - b).min(max_blocks);
                let mut data = vec![0u8; (n * BLOCK_SIZE) as usize];
                crate::chunk::read_full_at(disk, &mut data, b * BLOCK_SIZE).map_err(|source| {
                    JournalError::DiskRead {
                        path: self.path.clone(),
                        offset: b * BLOCK_SIZE,
                        source,
                    }
                })?;
                for (rs, re) in non_zero_runs(&data, skip_zero_blocks) {
                    let at = b + rs;
                    let bytes = &data[(rs * BLOCK_SIZE) as usize..(re * BLOCK_SIZE) as usize];
                    end = self.append(end, self.end, at * BLOCK_SIZE, bytes)?;
                    done.push((at, b + re));
                }
                b += n;
            }
        }
        if done.is_empty() {
            return Ok(0);
        }
        self.file
            .sync_data()
            .map_err(io_err("fdatasync", &self.path))?;
        self.end = end;
        let mut count = 0;
        for (s, e) in done {
            self.saved.insert(s, e);
            count += e - s;
        }
        Ok(count)
    }

    /// Writes one record of the batch that began at `batch` at `at`;
    /// returns where the next goes.
    fn append(&self, at: u64, batch: u64, offset: u64, data: &[u8]) -> Result<u64, JournalError> {
        let len = data.len() as u32;
        let mut rec = Vec::with_capacity(RECORD_HEADER_LEN as usize + data.len());
        rec.extend_from_slice(&offset.to_le_bytes());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&batch.to_le_bytes());
        rec.extend_from_slice(record_hash(offset, len, batch, data).as_bytes());
        rec.extend_from_slice(data);
        self.file
            .write_all_at(&rec, at)
            .map_err(io_err("append to", &self.path))?;
        Ok(at + rec.len() as u64)
    }

    /// False when the path no longer names the file this writer holds
    /// (deleted, or replaced: committed, fenced or handed over again), and
    /// this journal no longer counts; [`read_state`] of the path says why.
    pub fn is_at_path(&self) -> Result<bool, JournalError> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok((m.dev(), m.ino()) == self.identity),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", &self.path)(e)),
        }
    }
}

/// Where data begins at or after `from` in `disk` (`None`: only a hole
/// follows). Where the file system cannot tell (a block device, an error),
/// `from` itself: read it.
fn next_data(disk: &File, from: u64) -> Option<u64> {
    match crate::sys::seek_data(disk, from) {
        Ok(at) => Some(at.max(from)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => None,
        Err(_) => Some(from),
    }
}

/// Takes an exclusive `flock` without waiting: false when another open
/// file description holds it. It lasts until the file is closed.
fn try_lock(file: &File) -> io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The runs of blocks (start, end) of `data` to save: all of it, or with
/// `skip_zero` only the blocks that are not all zeroes.
fn non_zero_runs(data: &[u8], skip_zero: bool) -> Vec<(u64, u64)> {
    let n = data.len() as u64 / BLOCK_SIZE;
    if !skip_zero {
        return vec![(0, n)];
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
        let i = i as u64;
        if crate::chunk::is_zero(block) {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.1 == i => r.1 = i + 1,
            _ => runs.push((i, i + 1)),
        }
    }
    runs
}

/// Reads the valid records of a journal, in order; stops at a torn tail
/// (it does not cut it: reading never changes the journal). Opening fails
/// with [`JournalError::Damaged`] when the journal is damaged before its
/// tail.
#[derive(Debug)]
pub struct JournalReader {
    path: PathBuf,
    file: File,
    disk_size: u64,
    file_len: u64,
    pos: u64,
    done: bool,
}

impl JournalReader {
    pub fn open(path: &Path) -> Result<JournalReader, JournalError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let (disk_size, _) = read_header(&file, path)?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let file_len = scan(&file, path, len, disk_size, |_| {})?;
        Ok(JournalReader {
            path: path.to_path_buf(),
            file,
            disk_size,
            file_len,
            pos: HEADER_LEN,
            done: false,
        })
    }

    /// The size of the disk the journal is for.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Bytes of the journal read and valid so far.
    pub fn valid_len(&self) -> u64 {
        self.pos
    }
}

impl Iterator for JournalReader {
    type Item = Result<Record, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match read_record(&self.file, self.pos, self.file_len, self.disk_size) {
            Ok(Some((r, _))) => {
                self.pos += RECORD_HEADER_LEN + r.data.len() as u64;
                Some(Ok(r))
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(io_err("read", &self.path)(e)))
            }
        }
    }
}

/// Writes every pre-image of the journal at `journal` into `replica` (the
/// first record of a block wins; bytes past the disk's end are not
/// written) and fdatasyncs the replica. Returns the blocks restored. Call it
/// under a [`fence`], so that nothing writes the replica meanwhile.
pub fn restore_into(journal: &Path, replica: &File) -> Result<u64, JournalError> {
    let reader = JournalReader::open(journal)?;
    let disk_size = reader.disk_size();
    let replica_err = |offset| {
        move |source| JournalError::ReplicaWrite {
            path: journal.to_path_buf(),
            offset,
            source,
        }
    };
    let mut r = replica;
    let size = r.seek(SeekFrom::End(0)).map_err(replica_err(0))?;
    if size != disk_size {
        return Err(JournalError::SizeMismatch {
            path: journal.to_path_buf(),
            journal: disk_size,
            disk: size,
        });
    }
    let mut restored = BlockSet::default();
    for rec in reader {
        let rec = rec?;
        let first = rec.offset / BLOCK_SIZE;
        for (s, e) in restored.missing(first, first + rec.blocks()) {
            let at = s * BLOCK_SIZE;
            let upto = (e * BLOCK_SIZE).min(disk_size);
            let from = ((s - first) * BLOCK_SIZE) as usize;
            let bytes = &rec.data[from..from + (upto - at) as usize];
            replica.write_all_at(bytes, at).map_err(replica_err(at))?;
            restored.insert(s, e);
        }
    }
    replica.sync_data().map_err(replica_err(0))?;
    Ok(restored.len())
}

/// Held while the master target works on a journal: proof that no agent
/// journals into it (and so writes the replica) until it is dropped.
#[derive(Debug)]
pub struct JournalFence {
    path: PathBuf,
    _file: File,
}

impl JournalFence {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes an exclusive lock on the journal at `path`, waiting up to
/// `timeout` for the agent that holds it to stop; error
/// [`JournalError::StillHeld`] naming the path when it still holds it, and
/// [`JournalError::Missing`] when there is no journal.
pub fn fence(path: &Path, timeout: Duration) -> Result<JournalFence, JournalError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let start = Instant::now();
    loop {
        if try_lock(&file).map_err(io_err("lock", path))? {
            return Ok(JournalFence {
                path: path.to_path_buf(),
                _file: file,
            });
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(JournalError::StillHeld {
                path: path.to_path_buf(),
                waited,
            });
        }
        std::thread::sleep(FENCE_POLL.min(timeout - waited));
    }
}

mod block_set;
mod record;
#[cfg(test)]
mod tests;
