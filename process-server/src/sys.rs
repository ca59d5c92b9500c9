//! The libc calls std does not wrap: the crate's only `unsafe` code, each
//! block with its `SAFETY` reasoning, so every other module can forbid
//! `unsafe` outright.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Bytes an unprivileged writer can still allocate on the filesystem
/// holding `path` (`statvfs`: available blocks × fragment size).
pub(crate) fn available_bytes(path: &Path) -> io::Result<u64> {
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
mod tests {
    #[test]
    fn a_directory_has_some_space_and_a_missing_one_says_so() {
        let d = tempfile::tempdir().unwrap();
        assert!(super::available_bytes(d.path()).unwrap() > 0);
        let e = super::available_bytes(&d.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
