//! The writes and syncs that make the MT's data durable, behind one small
//! trait so tests can make any of them fail.
//!
//! Apply and rollback write the retention journal, the replicas, the
//! pre-images, the applied seq, `state.json` and the catalog appends
//! through [`Storage`]; the real
//! implementation ([`Disk`]) is plain pwrite / fallocate / fdatasync. Tests
//! substitute a storage that fails the n-th write or fdatasync of one kind
//! of file, which is how a crash or a failing disk is simulated: the
//! product code has no test hooks of its own.
//!
use crate::error::MtError;
use crate::sys::zero_range;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Which kind of file a write or sync is for (what a test aims a fault at,
/// and what an error names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// An interval's retention journal.
    Journal,
    /// A replica disk.
    Replica,
    /// A rollback's pre-image file.
    PreImages,
    /// `applied.seq`.
    AppliedSeq,
    /// `state.json` (its new copy, before the rename).
    State,
    /// The recovery-point catalog `points.log`.
    Catalog,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Journal => "retention journal",
            Target::Replica => "replica",
            Target::PreImages => "pre-image file",
            Target::AppliedSeq => "applied.seq",
            Target::State => "state.json",
            Target::Catalog => "recovery-point catalog",
        }
    }
}

/// The durable-write operations of the MT.
pub trait Storage: Send + Sync + 'static {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, target: Target, file: &File, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes.
    fn zero_range(&self, target: Target, file: &File, offset: u64, len: u64) -> io::Result<()>;
    /// fdatasync. After a failure the file's content on the device is
    /// unknown (Linux may have dropped the dirty pages and marked them
    /// clean), so callers must not trust what they read back.
    fn sync_data(&self, target: Target, file: &File) -> io::Result<()>;
}

/// The real storage: the files as they are.
#[derive(Debug, Default, Clone, Copy)]
pub struct Disk;

impl Storage for Disk {
    fn write_all_at(&self, _: Target, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(buf, offset)
    }

    fn zero_range(&self, _: Target, file: &File, offset: u64, len: u64) -> io::Result<()> {
        zero_range(file, offset, len)
    }

    fn sync_data(&self, _: Target, file: &File) -> io::Result<()> {
        file.sync_data()
    }
}

/// fdatasyncs `file` (at `path`) through `storage`. A failure is
/// [`MtError::Sync`], which poisons the replication the file belongs to.
pub(crate) fn sync_data(
    storage: &dyn Storage,
    target: Target,
    file: &File,
    path: &Path,
) -> Result<(), MtError> {
    storage
        .sync_data(target, file)
        .map_err(|source| MtError::Sync {
            target,
            path: path.to_path_buf(),
            source,
        })
}

/// Opens `path` for reading and writing, creating it if it does not exist
/// (never truncating).
pub(crate) fn open_or_create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

#[cfg(test)]
pub(crate) use faulty::{Faulty, Op};

#[cfg(test)]
mod faulty {
    use super::{Disk, Storage, Target};
    use std::fs::File;
    use std::io;
    use std::sync::Mutex;

    /// The operation a fault is aimed at.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Op {
        /// A write or a zeroing.
        Write,
        Sync,
    }

    /// A storage that behaves like [`Disk`] until an armed fault fires:
    /// the `nth` (1-based) call of `op` on `target` counted from arming
    /// fails with EIO. With `crash` every call after it fails too, as if
    /// the process had died there. [`Faulty::arm_full`] fills the disk
    /// instead.
    #[derive(Default)]
    pub(crate) struct Faulty {
        plan: Mutex<Option<Plan>>,
    }

    struct Plan {
        op: Op,
        /// None: any file.
        target: Option<Target>,
        left: usize,
        crash: bool,
        fired: bool,
        /// The error of a failing call.
        errno: i32,
        /// Once fired, only calls of `op` fail (a full disk fails writes,
        /// not the syncs of what was written).
        only_op: bool,
    }

    impl Faulty {
        pub fn arm(&self, op: Op, target: Target, nth: usize, crash: bool) {
            *self.plan.lock().unwrap() = Some(Plan {
                op,
                target: Some(target),
                left: nth,
                crash,
                fired: false,
                errno: libc::EIO,
                only_op: false,
            });
        }

        /// The disk fills: from the `nth` write on (of any file) every
        /// write fails with ENOSPC until [`Faulty::disarm`].
        pub fn arm_full(&self, nth: usize) {
            *self.plan.lock().unwrap() = Some(Plan {
                op: Op::Write,
                target: None,
                left: nth,
                crash: true,
                fired: false,
                errno: libc::ENOSPC,
                only_op: true,
            });
        }

        pub fn disarm(&self) {
            *self.plan.lock().unwrap() = None;
        }

        /// Whether the armed fault has fired.
        pub fn fired(&self) -> bool {
            self.plan.lock().unwrap().as_ref().is_some_and(|p| p.fired)
        }

        fn check(&self, op: Op, target: Target) -> io::Result<()> {
            let mut plan = self.plan.lock().unwrap();
            let Some(p) = plan.as_mut() else {
                return Ok(());
            };
            let err = io::Error::from_raw_os_error(p.errno);
            if p.fired {
                let fails = p.crash && (!p.only_op || p.op == op);
                return if fails { Err(err) } else { Ok(()) };
            }
            if p.op == op && p.target.is_none_or(|t| t == target) {
                p.left -= 1;
                if p.left == 0 {
                    p.fired = true;
                    return Err(err);
                }
            }
            Ok(())
        }
    }

    impl Storage for Faulty {
        fn write_all_at(&self, t: Target, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
            self.check(Op::Write, t)?;
            Disk.write_all_at(t, file, buf, offset)
        }

        fn zero_range(&self, t: Target, file: &File, offset: u64, len: u64) -> io::Result<()> {
            self.check(Op::Write, t)?;
            Disk.zero_range(t, file, offset, len)
        }

        fn sync_data(&self, t: Target, file: &File) -> io::Result<()> {
            self.check(Op::Sync, t)?;
            Disk.sync_data(t, file)
        }
    }
}
