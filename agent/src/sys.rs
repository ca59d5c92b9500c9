//! The agent's only unsafe code: thin wrappers around the libc calls std
//! does not offer (hole punching, the host name, page-cache residency and
//! advice, memory locking and the I/O-flusher mark). Each wrapper takes safe arguments, so the rest of the crate
//! denies unsafe code.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `fallocate(2)` with `mode` over `len` bytes at `offset`.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd (borrowed from `file`) with
    // integer arguments; it touches no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The host name; empty when it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // when the name fits, and we stop at the first NUL or the buffer end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The system's page size, when it can be read.
pub fn page_size() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (p > 0).then_some(p as u64)
}

/// `mincore(2)` over `len` bytes of `file` from the page-aligned `offset`:
/// one byte per `page` bytes, bit 0 set = cached. `None` when the mapping
/// or the call fails.
pub fn resident_pages(file: &File, offset: u64, len: u64, page: u64) -> Option<Vec<u8>> {
    // SAFETY: a fresh read-only mapping of an open fd, without
    // MAP_POPULATE: nothing is read, no page is touched; the result is
    // checked and the mapping is unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    let mut cached = vec![0u8; len.div_ceil(page) as usize];
    // SAFETY: `ptr` maps `len` bytes; `cached` has one byte per page.
    let rc = unsafe { libc::mincore(ptr, len as usize, cached.as_mut_ptr()) };
    // SAFETY: unmaps exactly the mapping made above, once.
    unsafe {
        libc::munmap(ptr, len as usize);
    }
    (rc == 0).then_some(cached)
}

/// `posix_fadvise(2)`: advice only, so a failure is ignored.
pub fn fadvise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
    // SAFETY: posix_fadvise on an open fd; it reads no memory of ours.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            advice,
        );
    }
}

/// `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`: every page the agent
/// has touched or will touch stays in RAM. `MCL_ONFAULT` locks pages as they
/// are first used instead of populating every mapping up front (thread
/// stacks, allocator reservations), so the locked set is the working set.
pub fn lock_memory() -> io::Result<()> {
    // SAFETY: mlockall takes only flags and touches no memory of ours.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `PR_SET_IO_FLUSHER` (Linux 5.6): not in the libc crate for glibc targets.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// `prctl(PR_SET_IO_FLUSHER, 1)`: memory reclaim done on behalf of this
/// process does not wait on the I/O it is itself serving.
pub fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; PR_SET_IO_FLUSHER reads no
    // pointer.
    let rc = unsafe {
        libc::prctl(
            PR_SET_IO_FLUSHER,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether every page may be locked: root (CAP_IPC_LOCK ignores the limit)
/// or an unlimited `RLIMIT_MEMLOCK`.
pub fn may_lock_all_memory() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: geteuid has no preconditions; getrlimit writes only into
    // `lim`, a valid rlimit we own.
    let (euid, rc) = unsafe {
        (
            libc::geteuid(),
            libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim),
        )
    };
    euid == 0 || (rc == 0 && lim.rlim_cur == libc::RLIM_INFINITY)
}
