//! Safe wrappers over the libc calls std does not offer. Keeping them here
//! leaves the rest of the crate free of unsafe code (only this module and
//! the allocator in [`crate::block_cache`] may use it).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::OnceLock;
use std::time::Duration;

/// Waits until `fd` is readable (for a listener: a connection is pending)
/// or `timeout` has passed. Errors (EINTR) end the wait early; callers
/// retry in a loop anyway.
pub(crate) fn wait_readable(fd: impl AsFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd that outlives the call, holding a
    // descriptor borrowed for the call, and the count is 1.
    unsafe {
        libc::poll(&mut pfd, 1, ms);
    }
}

/// Fixes glibc's mmap threshold at `bytes` (see [`crate::alloc`]). Does
/// nothing with another C library.
pub(crate) fn set_mmap_threshold(bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; any value is valid.
    unsafe {
        libc::mallopt(
            libc::M_MMAP_THRESHOLD,
            libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX),
        );
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// The size of a memory page (4096 if the system will not say).
pub(crate) fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
    })
}

/// The offset of the first data at or after `start` in `file`
/// (`lseek(SEEK_DATA)`); ENXIO when there is none. Moves the file offset.
pub(crate) fn seek_data(file: &File, start: u64) -> io::Result<u64> {
    let start =
        libc::off_t::try_from(start).map_err(|_| io::Error::from_raw_os_error(libc::ENXIO))?;
    // SAFETY: lseek on a descriptor borrowed for the call; the result is
    // checked.
    let next = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_DATA) };
    u64::try_from(next).map_err(|_| io::Error::last_os_error())
}

/// A read-only shared mapping of part of a file, unmapped on drop.
///
/// The bytes are read while the file may be written, as a `pread` would
/// read them; a file truncated under the mapping would raise SIGBUS, so
/// callers map only files nobody truncates while they are served.
pub(crate) struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    /// Maps `len` (> 0) bytes of `file` from the page-aligned `offset`, all
    /// inside the file, with the pages populated up front.
    pub(crate) fn new(file: &File, offset: u64, len: usize) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh read-only mapping of an open fd; the kernel checks
        // the arguments and the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes until drop.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Bytes an unprivileged writer can still allocate on the filesystem
/// holding `path` (`statvfs`: available blocks × fragment size). The process
/// server's cache and the master target wait on it after ENOSPC.
pub fn available_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call and `st`
    // points to writable memory of the size statvfs fills.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod available_bytes_tests {
    #[test]
    fn a_directory_has_some_space_and_a_missing_one_says_so() {
        let d = tempfile::tempdir().unwrap();
        assert!(super::available_bytes(d.path()).unwrap() > 0);
        let e = super::available_bytes(&d.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
