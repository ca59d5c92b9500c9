//! The libc calls std does not wrap: the crate's only `unsafe` code, each
//! block with its `SAFETY` comment, so the rest of the crate can deny
//! `unsafe` outright.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Makes `len` bytes at `offset` read as zeroes: punches a hole (keeping
/// the size), or writes zeroes where the filesystem cannot punch.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid open descriptor with plain integer args.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
            let zeros = vec![0u8; (1 << 20).min(len as usize)];
            let mut o = offset;
            let end = offset + len;
            while o < end {
                let n = (end - o).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], o)?;
                o += n as u64;
            }
            Ok(())
        }
        _ => Err(err),
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to
/// the device, without waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
/// Not a durability step: the fdatasync that follows still is. It lets the
/// device write one window while the next is read and checked, instead of
/// all of it at the fdatasync; a failure only loses that overlap.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range on an open fd; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Kills every process of process group `pgid` (a hook started in its own
/// group) with SIGKILL.
pub(crate) fn kill_process_group(pgid: u32) {
    // SAFETY: kill(2) with plain integer arguments; it touches no memory of
    // ours. A negative pid names the process group.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}
